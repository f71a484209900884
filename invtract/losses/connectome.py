"""Structural connectomes from streamlines: ``tck2connectome``'s hard counts and a soft version.

Hard assignment (:func:`assign_endpoints`, :func:`connectome_matrix`) re-expresses MRtrix3
3.0.x ``tck2connectome`` with its defaults (``src/dwi/tractography/connectome/tck2nodes.cpp``,
``matrix.cpp``, ``metric.h``; ``cmd/tck2connectome.cpp``):

* **Radial search** (``-assignment_radial_search R``, default 4 mm). A table of integer voxel
  offsets is built once: every offset o in the cube ``|o_i| <= ceil((R + h) / min(spacing))``
  whose grid length ``|o * spacing|`` is ``< R + h`` (h = half the voxel diagonal), sorted by
  that length, ties kept in z-outer/y/x-inner order. For an endpoint p the walk starts at the
  voxel ``c = round(scanner2voxel @ p)`` (halves away from zero) and visits ``c + o`` in table
  order, with ``d = |p - voxel2scanner @ (c + o)|`` in mm; the best distance starts at R. A
  voxel whose ``d`` is below the best so far, that lies inside the image and has a non-zero
  label becomes the answer; the walk stops once ``d > best + 2 h``. So the node is the label of
  the nearest labelled voxel centre strictly closer than R (first in table order on exact ties),
  or 0. Endpoints outside the image are searched the same way (only voxels inside count).
* **End voxels** (``-assignment_end_voxels``): the label of ``round(scanner2voxel @ p)``, 0
  outside the image.
* A streamline's two endpoints are its first and last vertex; a one-vertex streamline uses that
  vertex for both ends (as MRtrix). A streamline with no vertex, which crashes
  ``tck2connectome`` 3.0.3, is assigned (0, 0) here.
* **Matrix.** Nodes are ``0..max(label)`` (``max`` over the whole image; labels missing from
  the image keep an all-zero row and column). A streamline adds its weight (1 by default, times
  the optional metric factor) to the edge ``(min(a, b), max(a, b))``. The output drops node 0
  unless ``keep_unassigned``; it is the upper triangle (diagonal included) unless ``symmetric``;
  ``zero_diagonal`` clears the diagonal after that.

Conventions: streamline points are scanner mm (RAS+); the label image affine maps voxel indices
(integer = voxel centre) to scanner mm; all hard geometry is done in float64 from the float32
(or other) points, like MRtrix. MRtrix additionally re-orients images so that their voxel axes
are near the scanner axes before searching; for images whose affine is already near-diagonal
with positive diagonal (all test data) this is the identity. For other orientations only the
tie-breaking order between exactly equidistant voxels can differ.

The soft connectome (:func:`soft_connectome`) gives each endpoint a distribution over nodes
``0..L``: for every label l within the radius, with ``d_l`` the distance to its nearest voxel
centre, the weight is ``exp(-d_l / T) - exp(-R / T)``; node 0 (unassigned) has weight
``exp(-R / T)``. The weights are continuous in the endpoint position (a label fades in at the
search radius) and, as ``T -> 0``, all the mass goes to the hard assignment.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..arrays import to_numpy
from ..errors import ConfigError, FormatError, ShapeError
from ..io.geometry import scanner2voxel
from ..streamlines import Streamlines

__all__ = [
    "LabelVolume",
    "as_label_volume",
    "radial_search_offsets",
    "assign_endpoints",
    "connectome_matrix",
    "soft_connectome",
    "connectome_loss",
    "connectome_correlation",
    "format_connectome",
    "csv_delimiter",
]

_ASSIGNMENTS = ("radial", "end_voxels")
_SCALES = ("none", "length", "invlength", "invnodevol")


# ------------------------------------------------------------------------------------------
# label volumes
# ------------------------------------------------------------------------------------------
class LabelVolume:
    """A validated parcellation: integer labels on a voxel grid.

    Attributes:
        labels: ``[X, Y, Z]`` int64 array, 0 = no node.
        affine: ``[4, 4]`` float64, voxel indices (centres at integers) -> scanner mm (RAS+).
        spacing: ``(3,)`` float64 voxel sizes in mm (column norms of the affine).
        n_nodes: the largest label (nodes are ``1..n_nodes``; some may be absent).
    """

    def __init__(self, labels: np.ndarray, affine: np.ndarray, name: str = "labels") -> None:
        self.labels = labels
        self.affine = affine
        self.name = name
        self.spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
        self.n_nodes = int(labels.max()) if labels.size else 0
        self.scanner2voxel = scanner2voxel(affine)
        self.voxel2scanner = affine[:3].copy()

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(n) for n in self.labels.shape)

    def node_volumes(self) -> np.ndarray:
        """``[n_nodes + 1]`` number of voxels of each label (index 0 = background)."""
        return np.bincount(self.labels.ravel(), minlength=self.n_nodes + 1).astype(np.float64)


def as_label_volume(labels) -> LabelVolume:
    """Validate a parcellation given as an ``Image``, a ``(data, affine)`` pair or a LabelVolume.

    Args:
        labels: an object with ``data`` and ``affine`` attributes (``invtract.io.image.Image``),
            a ``(data [X, Y, Z], affine [4, 4])`` tuple, or a :class:`LabelVolume`.

    Returns:
        The :class:`LabelVolume`.

    Raises:
        ShapeError: the data are not 3-D (a trailing axis of size 1 is dropped, as MRtrix does)
            or the affine is not a finite invertible ``[4, 4]``.
        FormatError: a label is not a finite non-negative integer.
    """
    if isinstance(labels, LabelVolume):
        return labels
    if hasattr(labels, "data") and hasattr(labels, "affine"):
        data, affine = labels.data, labels.affine
        name = str(getattr(labels, "path", None) or "labels")
    elif isinstance(labels, (tuple, list)) and len(labels) == 2:
        data, affine = labels
        name = "labels"
    else:
        raise ConfigError(
            "labels must be an Image, a (data, affine) pair or a LabelVolume, "
            f"got {type(labels).__name__}"
        )
    if torch.is_tensor(data):
        data = data.detach().cpu().numpy()
    if torch.is_tensor(affine):
        affine = affine.detach().cpu().numpy()
    data = np.asarray(data)
    affine = np.asarray(affine, dtype=np.float64)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise ShapeError(
            f"{name}: parcellation must be a 3-D volume of node labels, got shape {data.shape}"
        )
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise ShapeError(f"{name}: affine must be a finite [4, 4] matrix, got {affine.shape}")
    if abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise ShapeError(f"{name}: affine is singular")
    if data.dtype == bool:
        data = data.astype(np.int64)
    if np.issubdtype(data.dtype, np.floating):
        if not np.all(np.isfinite(data)):
            raise FormatError(f"{name}: parcellation contains NaN or infinite values")
        if np.any(np.round(data) != data):
            raise FormatError(f"{name}: parcellation must contain integer labels only")
    elif not np.issubdtype(data.dtype, np.integer):
        raise FormatError(f"{name}: parcellation has non-numeric type {data.dtype}")
    if data.size and data.min() < 0:
        raise FormatError(f"{name}: parcellation labels must be non-negative")
    return LabelVolume(data.astype(np.int64), affine, name)


def radial_search_offsets(spacing: Sequence[float], radius_mm: float) -> np.ndarray:
    """The integer voxel offsets of MRtrix's radial search, in the order they are visited.

    Args:
        spacing: voxel sizes (mm) along the three voxel axes.
        radius_mm: the search radius R (mm).

    Returns:
        ``[K, 3]`` int64 offsets (i, j, k), sorted by grid length ``|o * spacing|`` (ties in
        z-outer, y, x-inner order); only offsets shorter than ``R + h`` are kept, with h the
        half voxel diagonal.
    """
    sx, sy, sz = (float(s) for s in spacing)
    half_diag = np.sqrt((0.5 * sz) ** 2 + (0.5 * sy) ** 2 + (0.5 * sx) ** 2)
    reach = radius_mm + half_diag
    m = int(np.ceil(reach / min(sx, sy, sz)))
    r = np.arange(-m, m + 1)
    oz, oy, ox = np.meshgrid(r, r, r, indexing="ij")  # z outer, x inner (C order)
    ox, oy, oz = ox.ravel(), oy.ravel(), oz.ravel()
    dist = np.sqrt((oz * sz) ** 2 + (oy * sy) ** 2 + (ox * sx) ** 2)
    keep = dist < reach
    order = np.argsort(dist[keep], kind="stable")
    return np.stack([ox[keep], oy[keep], oz[keep]], axis=1)[order].astype(np.int64)


def _round_half_away(v: np.ndarray) -> np.ndarray:
    """``std::round``: nearest integer, halves away from zero (exact for all floats)."""
    t = np.trunc(v)
    return (t + np.where(np.abs(v - t) >= 0.5, np.sign(v), 0.0)).astype(np.int64)


def _apply_affine(m34: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``m34 @ [x, 1]`` for ``x [..., 3]`` float64, summed left to right like Eigen."""
    out = np.empty(x.shape, dtype=np.float64)
    for r in range(3):
        out[..., r] = m34[r, 0] * x[..., 0] + m34[r, 1] * x[..., 1] + m34[r, 2] * x[..., 2]
        out[..., r] += m34[r, 3]
    return out


def _lookup(vol: LabelVolume, vox: np.ndarray) -> np.ndarray:
    """Labels at integer voxels ``[..., 3]``; 0 outside the image."""
    shape = np.asarray(vol.shape)
    inside = np.all((vox >= 0) & (vox < shape), axis=-1)
    out = np.zeros(vox.shape[:-1], dtype=np.int64)
    v = vox[inside]
    out[inside] = vol.labels[v[:, 0], v[:, 1], v[:, 2]]
    return out


# ------------------------------------------------------------------------------------------
# hard assignment
# ------------------------------------------------------------------------------------------
def _endpoints(streamlines) -> tuple[np.ndarray, np.ndarray]:
    """``(ends [S, 2, 3] float64, has_points [S] bool)`` from Streamlines or a list of arrays."""
    if isinstance(streamlines, Streamlines):
        pts = streamlines.points.detach().cpu().numpy()
        lengths = streamlines.lengths.detach().cpu().numpy().astype(np.int64)
    else:
        arrs = [np.asarray(s, dtype=np.float64).reshape(-1, 3) for s in streamlines]
        lengths = np.array([a.shape[0] for a in arrs], dtype=np.int64)
        pts = np.concatenate(arrs, axis=0) if arrs else np.zeros((0, 3))
    pts = pts.astype(np.float64)
    S = lengths.shape[0]
    has = lengths > 0
    first = np.cumsum(lengths) - lengths
    ends = np.full((S, 2, 3), np.nan, dtype=np.float64)
    ends[has, 0] = pts[first[has]]
    ends[has, 1] = pts[first[has] + lengths[has] - 1]
    return ends, has


def _radial_nodes(
    vol: LabelVolume, p: np.ndarray, radius_mm: float, chunk_size: int
) -> np.ndarray:
    """Radial-search node of each point ``p [E, 3]`` (float64 scanner mm) -> ``[E]`` int64."""
    offsets = radial_search_offsets(vol.spacing, radius_mm)  # [K, 3]
    sx, sy, sz = vol.spacing
    half_diag = np.sqrt((0.5 * sz) ** 2 + (0.5 * sy) ** 2 + (0.5 * sx) ** 2)
    out = np.zeros(p.shape[0], dtype=np.int64)
    K = offsets.shape[0]
    step = max(1, chunk_size // max(K, 1))
    for start in range(0, p.shape[0], step):
        pc = p[start : start + step]  # [E, 3]
        ok = np.all(np.isfinite(pc), axis=1)
        pc = np.where(ok[:, None], pc, 0.0)
        centre = _round_half_away(_apply_affine(vol.scanner2voxel, pc))  # [E, 3]
        vox = centre[:, None, :] + offsets[None]  # [E, K, 3]
        pos = _apply_affine(vol.voxel2scanner, vox.astype(np.float64))
        diff = pc[:, None, :] - pos
        dist = np.sqrt(diff[..., 0] ** 2 + diff[..., 1] ** 2 + diff[..., 2] ** 2)  # [E, K]
        lab = _lookup(vol, vox)  # [E, K]
        # best distance *before* visiting offset k: min(R, candidate distances seen so far)
        cand = np.where(lab > 0, dist, np.inf)
        best = np.minimum.accumulate(cand, axis=1)
        before = np.concatenate([np.full((pc.shape[0], 1), np.inf), best[:, :-1]], axis=1)
        before = np.minimum(before, radius_mm)
        stop = dist > before + 2.0 * half_diag
        alive = ~np.logical_or.accumulate(stop, axis=1)
        update = alive & (lab > 0) & (dist < before)
        k_last = K - 1 - np.argmax(update[:, ::-1], axis=1)
        found = update.any(axis=1) & ok
        out[start : start + step] = np.where(found, lab[np.arange(pc.shape[0]), k_last], 0)
    return out


def assign_endpoints(
    streamlines: Streamlines | Sequence[np.ndarray],
    labels,
    radius_mm: float = 4.0,
    *,
    assignment: str = "radial",
    chunk_size: int = 4_000_000,
) -> np.ndarray:
    """Node of each streamline endpoint, exactly as ``tck2connectome``.

    Args:
        streamlines: :class:`~invtract.streamlines.Streamlines` or a sequence of ``[L_i, 3]``
            arrays, scanner mm (RAS+).
        labels: the parcellation (see :func:`as_label_volume`).
        radius_mm: radial search radius R in mm (``-assignment_radial_search``); an endpoint
            gets a node only from a labelled voxel centre strictly closer than R.
        assignment: ``"radial"`` (default) or ``"end_voxels"`` (``-assignment_end_voxels``:
            the label of the voxel containing the endpoint).
        chunk_size: number of (endpoint, offset) pairs processed at once (memory bound).

    Returns:
        ``[S, 2]`` int64 node indices of the first and last vertex (0 = unassigned).

    Shape:
        streamlines: ``S`` streamlines; output ``(S, 2)``.

    Gradients:
        None (integer output).

    Raises:
        ConfigError: unknown ``assignment`` or a non-positive radius.
    """
    if assignment not in _ASSIGNMENTS:
        raise ConfigError(f"assignment must be one of {_ASSIGNMENTS}, got {assignment!r}")
    if assignment == "radial" and not (np.isfinite(radius_mm) and radius_mm > 0):
        raise ConfigError(f"radius_mm must be a positive number of mm, got {radius_mm}")
    vol = as_label_volume(labels)
    ends, _ = _endpoints(streamlines)
    flat = ends.reshape(-1, 3)
    if assignment == "end_voxels":
        ok = np.all(np.isfinite(flat), axis=1)
        vox = _round_half_away(_apply_affine(vol.scanner2voxel, np.where(ok[:, None], flat, 0)))
        nodes = np.where(ok, _lookup(vol, vox), 0)
    else:
        nodes = _radial_nodes(vol, flat, float(radius_mm), chunk_size)
    return nodes.reshape(-1, 2)


def _layout(
    full: np.ndarray | torch.Tensor, keep_unassigned: bool, symmetric: bool, zero_diagonal: bool
):
    """tck2connectome's output layout from an upper-triangular ``[N+1, N+1]`` accumulator."""
    if torch.is_tensor(full):
        upper = torch.triu(full)
        out = upper + torch.triu(upper, 1).T if symmetric else upper
        if zero_diagonal:
            out = out * (1.0 - torch.eye(out.shape[0], dtype=out.dtype, device=out.device))
    else:
        upper = np.triu(full)
        out = upper + np.triu(upper, 1).T if symmetric else upper
        if zero_diagonal:
            out = out * (1.0 - np.eye(out.shape[0]))
    return out if keep_unassigned else out[1:, 1:]


def connectome_matrix(
    streamlines: Streamlines | Sequence[np.ndarray],
    labels,
    radius_mm: float = 4.0,
    symmetric: bool = False,
    zero_diagonal: bool = False,
    keep_unassigned: bool = False,
    *,
    assignment: str = "radial",
    weights: np.ndarray | torch.Tensor | None = None,
    scale: str = "none",
    assignments: np.ndarray | None = None,
) -> np.ndarray:
    """Streamline-count connectome, laid out exactly like ``tck2connectome``'s CSV.

    Args:
        streamlines: :class:`~invtract.streamlines.Streamlines` or ``[L_i, 3]`` arrays (mm).
        labels: parcellation (see :func:`as_label_volume`).
        radius_mm: radial search radius (mm).
        symmetric: fill the lower triangle too (``-symmetric``).
        zero_diagonal: set the diagonal to 0 (``-zero_diagonal``).
        keep_unassigned: keep node 0 as the first row/column (``-keep_unassigned``).
        assignment: ``"radial"`` or ``"end_voxels"`` (see :func:`assign_endpoints`).
        weights: optional ``[S]`` per-streamline weights (``-tck_weights_in``).
        scale: ``"none"`` (counts), ``"length"`` / ``"invlength"`` (times / divided by the
            polyline length in mm; ``-scale_length`` / ``-scale_invlength``) or
            ``"invnodevol"`` (times ``2 / (V_a + V_b)``, node volumes in voxels;
            ``-scale_invnodevol``).
        assignments: precomputed ``[S, 2]`` output of :func:`assign_endpoints` (skips it).

    Counts (and ``end_voxels``, ``invnodevol``) reproduce tck2connectome 3.0.3 to the printed
    digit; ``length``/``invlength`` agree to about 1e-8 relative (MRtrix sums lengths in float32
    in an order that is not reproduced).

    Returns:
        ``[N, N]`` float64 matrix, ``N = max(label)`` (``+ 1`` with ``keep_unassigned``);
        row/column i is node i (i + 1 without node 0); upper triangle unless ``symmetric``.

    Shape:
        weights: ``(S,)``; output ``(N, N)``.

    Gradients:
        None (see :func:`soft_connectome` for a differentiable version).
    """
    if scale not in _SCALES:
        raise ConfigError(f"scale must be one of {_SCALES}, got {scale!r}")
    vol = as_label_volume(labels)
    nodes = (
        assign_endpoints(streamlines, vol, radius_mm, assignment=assignment)
        if assignments is None
        else np.asarray(assignments, dtype=np.int64)
    )
    S = nodes.shape[0]
    factor = np.ones(S, dtype=np.float64)
    if scale in ("length", "invlength"):
        sl = streamlines
        if not isinstance(sl, Streamlines):
            sl = Streamlines.from_list(list(sl), dtype=torch.float64)
        length = sl.segment_lengths().detach().cpu().double().numpy()
        if scale == "length":
            factor = length
        else:
            npts = sl.lengths.cpu().numpy()
            factor = np.where(npts > 1, 1.0 / np.where(length > 0, length, 1.0), 0.0)
    elif scale == "invnodevol":
        vols = vol.node_volumes()
        total = vols[nodes[:, 0]] + vols[nodes[:, 1]]
        factor = np.where(total > 0, 2.0 / np.where(total > 0, total, 1.0), 0.0)
    factor = factor.astype(np.float32).astype(np.float64)  # MRtrix stores factors as float
    if weights is not None:
        w = to_numpy(weights)
        if w.shape != (S,):
            raise ShapeError(f"weights must be [S] = [{S}], got {tuple(w.shape)}")
        factor = factor * w.astype(np.float32).astype(np.float64)
    n = vol.n_nodes + 1
    lo, hi = np.minimum(nodes[:, 0], nodes[:, 1]), np.maximum(nodes[:, 0], nodes[:, 1])
    full = np.zeros(n * n, dtype=np.float64)
    np.add.at(full, lo * n + hi, factor)
    return _layout(full.reshape(n, n), keep_unassigned, symmetric, zero_diagonal)


# ------------------------------------------------------------------------------------------
# CSV formatting (tck2connectome's)
# ------------------------------------------------------------------------------------------
def csv_delimiter(path) -> str:
    """MRtrix's delimiter for a matrix file: tab for ``*tsv``, comma for ``*csv``, else space."""
    name = str(path)
    if name.endswith("tsv"):
        return "\t"
    if name.endswith("csv"):
        return ","
    return " "


def format_connectome(matrix: np.ndarray, delimiter: str = ",") -> str:
    """Text of a matrix as ``tck2connectome`` writes it.

    Each row on one line, values joined by ``delimiter``, each value printed like a C++ stream
    at 15 significant digits (``%.15g``: integers without a decimal point), ``\\n`` after every
    row including the last.
    """
    m = np.asarray(matrix, dtype=np.float64)
    if m.ndim != 2:
        raise ShapeError(f"matrix must be 2-D, got shape {m.shape}")
    return "".join(delimiter.join(f"{v:.15g}" for v in row) + "\n" for row in m)


# ------------------------------------------------------------------------------------------
# soft, differentiable connectome
# ------------------------------------------------------------------------------------------
def _soft_endpoints(points, lengths) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ends [S, 2, 3], has_points [S])`` from Streamlines or padded points; differentiable."""
    if isinstance(points, Streamlines):
        lengths = points.lengths
        pts = points.points
        first = torch.cumsum(lengths, 0) - lengths
        last = first + lengths - 1
        has = lengths > 0
        first = torch.where(has, first, 0)
        last = torch.where(has, last, 0)
        if pts.shape[0] == 0:
            pts = pts.new_zeros(1, 3)
        return torch.stack([pts[first], pts[last]], dim=1), has
    if not torch.is_tensor(points) or points.ndim != 3 or points.shape[-1] != 3:
        shape = tuple(points.shape) if hasattr(points, "shape") else type(points).__name__
        raise ShapeError(f"points must be Streamlines or a [S, L, 3] tensor, got {shape}")
    S, L, _ = points.shape
    if lengths is None:
        lengths = torch.full((S,), L, dtype=torch.int64, device=points.device)
    lengths = torch.as_tensor(lengths, device=points.device).to(torch.int64)
    if lengths.shape != (S,):
        raise ShapeError(f"lengths must be [S] = [{S}], got {tuple(lengths.shape)}")
    if bool((lengths > L).any()):
        raise ShapeError(f"lengths exceed the padded length {L}")
    has = lengths > 0
    rows = torch.arange(S, device=points.device)
    last = (lengths - 1).clamp_min(0)
    if L == 0:
        return points.new_zeros(S, 2, 3), has
    return torch.stack([points[:, 0], points[rows, last]], dim=1), has


def _soft_node_probs(
    p: torch.Tensor,
    vol: LabelVolume,
    label_t: torch.Tensor,
    offsets: torch.Tensor,
    radius_mm: float,
    temperature_mm: float,
) -> torch.Tensor:
    """Node distribution ``[E, N + 1]`` of endpoints ``p [E, 3]`` (column 0 = unassigned)."""
    dtype, dev = p.dtype, p.device
    A = torch.as_tensor(vol.voxel2scanner, dtype=dtype, device=dev)  # [3, 4]
    Ainv = torch.as_tensor(vol.scanner2voxel, dtype=torch.float64, device=dev)
    with torch.no_grad():
        v = p.detach().to(torch.float64) @ Ainv[:, :3].T + Ainv[:, 3]
        t = torch.trunc(v)
        centre = (t + torch.where((v - t).abs() >= 0.5, torch.sign(v), 0.0)).to(torch.int64)
        vox = centre[:, None, :] + offsets[None]  # [E, K, 3]
        shape = torch.tensor(vol.shape, device=dev)
        inside = ((vox >= 0) & (vox < shape)).all(dim=-1)
        flat = (vox[..., 0] * shape[1] + vox[..., 1]) * shape[2] + vox[..., 2]
        lab = torch.where(inside, label_t[torch.where(inside, flat, 0)], 0)  # [E, K]
    centres = vox.to(dtype) @ A[:, :3].T + A[:, 3]  # [E, K, 3]
    sq = ((p[:, None, :] - centres) ** 2).sum(-1)
    dist = torch.sqrt(sq.clamp_min(1e-24))  # safe at a voxel centre
    n = vol.n_nodes + 1
    d_label = torch.full((p.shape[0], n), radius_mm, dtype=dtype, device=dev)
    d_label = d_label.scatter_reduce(1, lab, dist, reduce="amin", include_self=True)
    # per-endpoint shift for stability (the probabilities do not depend on it)
    shift = d_label[:, 1:].min(dim=1).values.detach() if n > 1 else d_label[:, 0].detach()
    scale = 1.0 / temperature_mm
    w_r = torch.exp(-(radius_mm - shift) * scale)  # [E]
    w = (torch.exp(-(d_label - shift[:, None]) * scale) - w_r[:, None]).clamp_min(0.0)
    w = torch.cat([w_r[:, None], w[:, 1:]], dim=1)
    return w / w.sum(dim=1, keepdim=True)


def soft_connectome(
    points: torch.Tensor | Streamlines,
    lengths: torch.Tensor | None,
    labels,
    temperature_mm: float,
    radius_mm: float = 4.0,
    weights: torch.Tensor | None = None,
    *,
    symmetric: bool = False,
    zero_diagonal: bool = False,
    keep_unassigned: bool = False,
    chunk_size: int = 2_000_000,
) -> torch.Tensor:
    """Differentiable connectome: soft endpoint assignment that tends to ``tck2connectome``.

    Each endpoint p gets probabilities over nodes ``0..N``: with ``d_l(p)`` the distance (mm)
    to the nearest voxel centre labelled l (searched within the radius, as the hard search),
    ``w_l = max(exp(-d_l / T) - exp(-R / T), 0)`` for l >= 1 and ``w_0 = exp(-R / T)``, then
    normalised. A streamline s adds ``weights[s] * outer(a_s, b_s)`` (first and last endpoint
    distributions) to the matrix, folded onto the upper triangle like the hard count. As
    ``T -> 0`` the result converges to :func:`connectome_matrix` (except for endpoints exactly
    equidistant from two labels, which get split).

    Args:
        points: padded ``[S, L, 3]`` positions (scanner mm) or
            :class:`~invtract.streamlines.Streamlines` (then ``lengths`` is ignored).
        lengths: ``[S]`` number of valid vertices per streamline (``None``: all ``L``).
            Streamlines with 0 vertices contribute nothing.
        labels: parcellation (see :func:`as_label_volume`).
        temperature_mm: softness T (mm) > 0.
        radius_mm: search radius R (mm), as ``-assignment_radial_search``.
        weights: optional ``[S]`` per-streamline weights (e.g. soft survival), default 1.
        symmetric: fill the lower triangle (as :func:`connectome_matrix`).
        zero_diagonal: zero the diagonal.
        keep_unassigned: keep node 0 as the first row/column.
        chunk_size: (endpoint, voxel) pairs evaluated at once; bounds memory.

    Returns:
        ``[N, N]`` tensor (``N + 1`` with ``keep_unassigned``), dtype of ``points``.

    Shape:
        points: ``(S, L, 3)``; lengths, weights: ``(S,)``; output ``(N, N)``.

    Gradients:
        Flow to ``points`` (only through the first and last valid vertex of each streamline)
        and to ``weights``. ``d_l`` is the distance to the nearest voxel of label l, so the
        gradient is continuous except where that nearest voxel changes.
    """
    if not (np.isfinite(temperature_mm) and temperature_mm > 0):
        raise ConfigError(f"temperature_mm must be > 0, got {temperature_mm}")
    if not (np.isfinite(radius_mm) and radius_mm > 0):
        raise ConfigError(f"radius_mm must be > 0, got {radius_mm}")
    vol = as_label_volume(labels)
    ends, has = _soft_endpoints(points, lengths)  # [S, 2, 3], [S]
    if not ends.is_floating_point():
        raise ConfigError(f"points must be floating point, got {ends.dtype}")
    S = ends.shape[0]
    dtype, dev = ends.dtype, ends.device
    w_s = has.to(dtype)
    if weights is not None:
        if weights.shape != (S,):
            raise ShapeError(f"weights must be [S] = [{S}], got {tuple(weights.shape)}")
        w_s = w_s * weights.to(dtype)
    n = vol.n_nodes + 1
    offsets = torch.as_tensor(radial_search_offsets(vol.spacing, radius_mm), device=dev)
    label_t = torch.as_tensor(vol.labels.ravel(), device=dev)
    step = max(1, chunk_size // (2 * max(offsets.shape[0], 1)))
    full = ends.new_zeros(n, n)
    for start in range(0, S, step):
        e = ends[start : start + step]
        probs = _soft_node_probs(
            e.reshape(-1, 3), vol, label_t, offsets, float(radius_mm), float(temperature_mm)
        ).reshape(e.shape[0], 2, n)
        a = probs[:, 0] * w_s[start : start + step, None]
        full = full + a.T @ probs[:, 1]
    # fold (i, j) and (j, i) onto the upper triangle: edge {i, j} counted once
    full = torch.triu(full) + torch.tril(full, -1).T
    return _layout(full, keep_unassigned, symmetric, zero_diagonal)


def _half_tail(seed_index, lengths, tail: int, half: int, L: int):
    """Vertex indices ``[S, tail]`` of one half's last ``tail`` vertices, innermost first."""
    dev = seed_index.device
    k = torch.arange(tail, device=dev)
    if half == 0:  # from the seed towards vertex 0
        end = torch.zeros_like(seed_index)
        n_half = seed_index + 1
        start = torch.clamp(n_half - tail, min=0)  # offset from the seed outward
        idx = seed_index[:, None] - (start[:, None] + k[None])
        valid = (start[:, None] + k[None]) < n_half[:, None]
        idx = torch.where(valid, idx, end[:, None])
    else:  # from the seed towards the last vertex
        n_half = lengths - seed_index
        start = torch.clamp(n_half - tail, min=0)
        idx = seed_index[:, None] + start[:, None] + k[None]
        valid = (start[:, None] + k[None]) < n_half[:, None]
        idx = torch.where(valid, idx, (lengths - 1)[:, None])
    return idx.clamp(0, max(L - 1, 0)), valid


def expected_endpoint_connectome(
    points: torch.Tensor,
    mask: torch.Tensor,
    weights: torch.Tensor,
    seed_index: torch.Tensor,
    labels,
    temperature_mm: float,
    radius_mm: float = 4.0,
    *,
    tail: int = 40,
    symmetric: bool = False,
    zero_diagonal: bool = False,
    keep_unassigned: bool = False,
) -> torch.Tensor:
    """Soft connectome whose endpoints are *expected* under the tracker's survival weights.

    With survival weights w (cumulative from the seed outward along each half, as
    :func:`~invtract.tracking.differentiable.track_differentiable` returns them), a half ends at
    vertex j with mass ``w_j - w_next`` and at its last vertex with mass ``w_last``. Each half's
    endpoint node distribution is ``e_h = sum_j mass_j * a(p_j)`` with ``a`` the soft radial
    assignment of :func:`soft_connectome`, and streamline s adds ``outer(e_1, e_2) / w_seed``.
    When the weights are hard (0/1) this equals :func:`soft_connectome` on the same streamlines
    weighted by ``w_seed``. Only the last ``tail`` vertices of each half are considered; the mass
    of the vertices before them is placed on the first tail vertex.

    Args:
        points: ``[S, L, 3]`` padded vertices, scanner mm.
        mask: ``[S, L]`` bool, real vertices.
        weights: ``[S, L]`` survival weights in [0, 1].
        seed_index: ``[S]`` index of the seed vertex.
        labels: parcellation (see :func:`as_label_volume`).
        temperature_mm: softness of the label assignment (mm).
        radius_mm: radial search distance (mm).
        tail: vertices per half that may carry end mass.

    Returns:
        ``[N, N]`` tensor laid out as :func:`connectome_matrix`.

    Gradients:
        Flow to ``points`` (tail vertices) and to ``weights`` (hence to cutoff and angle
        through the soft survival surrogate).
    """
    if not (np.isfinite(temperature_mm) and temperature_mm > 0):
        raise ConfigError(f"temperature_mm must be > 0, got {temperature_mm}")
    if points.ndim != 3 or weights.shape != points.shape[:2] or mask.shape != points.shape[:2]:
        raise ShapeError(
            f"need points [S, L, 3] with mask/weights [S, L]; got {tuple(points.shape)}, "
            f"{tuple(mask.shape)}, {tuple(weights.shape)}"
        )
    vol = as_label_volume(labels)
    S, L = points.shape[:2]
    dev, dtype = points.device, points.dtype
    n = vol.n_nodes + 1
    if S == 0:
        return _layout(points.new_zeros(n, n), keep_unassigned, symmetric, zero_diagonal)
    lengths = mask.sum(1)
    seed_index = seed_index.to(device=dev, dtype=torch.int64)
    w = torch.where(mask, weights.to(dtype), torch.zeros_like(weights, dtype=dtype))
    rows = torch.arange(S, device=dev)[:, None]
    w_seed = w[rows[:, 0], seed_index]
    offsets = torch.as_tensor(radial_search_offsets(vol.spacing, radius_mm), device=dev)
    label_t = torch.as_tensor(vol.labels.ravel(), device=dev)
    ends = []
    for half in (0, 1):
        idx, valid = _half_tail(seed_index, lengths, tail, half, L)
        wt = torch.where(valid, w[rows, idx], torch.zeros_like(w[rows, idx]))
        nxt = torch.cat([wt[:, 1:], wt.new_zeros(S, 1)], 1)
        mass = (wt - nxt).clamp_min(0.0)
        # mass inside the tail start goes to its first vertex: w_seed - w_first
        mass = mass.clone()
        mass[:, 0] = mass[:, 0] + (w_seed - wt[:, 0]).clamp_min(0.0)
        pts = points[rows, idx].reshape(-1, 3)
        probs = _soft_node_probs(
            pts, vol, label_t, offsets, float(radius_mm), float(temperature_mm)
        ).reshape(S, tail, n)
        ends.append((mass[..., None] * probs).sum(1))  # [S, n]
    scale = torch.where(w_seed > 0, 1.0 / w_seed.clamp_min(1e-30), torch.zeros_like(w_seed))
    full = (ends[0] * scale[:, None]).T @ ends[1]
    full = torch.triu(full) + torch.tril(full, -1).T
    return _layout(full, keep_unassigned, symmetric, zero_diagonal)


# ------------------------------------------------------------------------------------------
# comparing connectomes
# ------------------------------------------------------------------------------------------
def _as_tensor(x, like: torch.Tensor | None = None) -> torch.Tensor:
    if torch.is_tensor(x):
        return x
    t = torch.as_tensor(np.asarray(x, dtype=np.float64))
    if like is not None:
        t = t.to(dtype=like.dtype, device=like.device)
    return t


def _normalise(m: torch.Tensor, normalise: str, eps: float) -> torch.Tensor:
    """Upper-triangular ``m`` -> the entries compared, after normalisation (1-D)."""
    upper = torch.triu(m)
    if normalise == "row":
        sym = upper + torch.triu(upper, 1).T
        return sym / (sym.sum(dim=1, keepdim=True) + eps)
    if normalise == "density":
        return upper / (upper.sum() + eps)
    if normalise == "counts":
        return upper
    raise ConfigError(f"normalise must be 'counts', 'density' or 'row', got {normalise!r}")


def _entries(m: torch.Tensor, normalise: str, include_diagonal: bool) -> torch.Tensor:
    n = m.shape[0]
    if normalise == "row":  # full (asymmetric) matrix
        mask = torch.ones(n, n, dtype=torch.bool, device=m.device)
        if not include_diagonal:
            mask &= ~torch.eye(n, dtype=torch.bool, device=m.device)
    else:
        mask = torch.triu(
            torch.ones(n, n, dtype=torch.bool, device=m.device), 0 if include_diagonal else 1
        )
    return m[mask]


def _pearson(x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    xc, yc = x - x.mean(), y - y.mean()
    return (xc * yc).sum() / torch.sqrt((xc * xc).sum() * (yc * yc).sum() + eps * eps)


def _check_pair(pred: torch.Tensor, target: torch.Tensor) -> None:
    if pred.ndim != 2 or pred.shape[0] != pred.shape[1]:
        raise ShapeError(f"connectome must be a square [N, N] matrix, got {tuple(pred.shape)}")
    if target.shape != pred.shape:
        raise ShapeError(
            f"target shape {tuple(target.shape)} does not match prediction {tuple(pred.shape)}"
        )


def connectome_loss(
    pred: torch.Tensor,
    target: torch.Tensor | np.ndarray,
    kind: str = "correlation",
    normalise: str = "counts",
    *,
    include_diagonal: bool = False,
    eps: float = 1e-12,
) -> torch.Tensor:
    """Differentiable distance between two connectomes in tck2connectome's layout.

    Both matrices are read through their upper triangle (so upper-triangular and symmetric
    inputs are equivalent), normalised, then compared:

    * ``kind="correlation"``: ``1 - Pearson`` of the compared entries (0 = perfect linear match).
    * ``kind="frobenius"``: ``||P - T|| / ||T||`` over the compared entries.

    Normalisations: ``"counts"`` (none), ``"density"`` (divide by the total), ``"row"``
    (symmetrise, divide each row by its sum; all off-diagonal entries are then compared).

    Args:
        pred: ``[N, N]`` predicted connectome (e.g. from :func:`soft_connectome`).
        target: ``[N, N]`` target (tensor or array; no gradient needed).
        kind: ``"correlation"`` or ``"frobenius"``.
        normalise: ``"counts"``, ``"density"`` or ``"row"``.
        include_diagonal: compare the diagonal (self-connections) too.
        eps: added to denominators.

    Returns:
        Scalar tensor.

    Shape:
        pred, target: ``(N, N)``; output ``()``.

    Gradients:
        Flow to ``pred`` (and ``target`` if it requires grad); float64 gradcheck-tested.
    """
    pred = _as_tensor(pred)
    target = _as_tensor(target, like=pred)
    _check_pair(pred, target)
    if kind not in ("correlation", "frobenius"):
        raise ConfigError(f"kind must be 'correlation' or 'frobenius', got {kind!r}")
    p = _entries(_normalise(pred, normalise, eps), normalise, include_diagonal)
    t = _entries(_normalise(target, normalise, eps), normalise, include_diagonal)
    if kind == "correlation":
        return 1.0 - _pearson(p, t, eps)
    return torch.sqrt(((p - t) ** 2).sum() + eps * eps) / (torch.sqrt((t * t).sum()) + eps)


def connectome_correlation(
    a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor, *, include_diagonal: bool = False
) -> float:
    """Pearson correlation of the upper triangles of two ``[N, N]`` connectomes.

    Args:
        a, b: ``[N, N]`` matrices (upper-triangular or symmetric; only the upper triangle is
            read).
        include_diagonal: include the diagonal entries.

    Returns:
        The correlation in [-1, 1]; NaN when either triangle is constant.
    """
    a = _as_tensor(a).detach().to(torch.float64).cpu()
    b = _as_tensor(b).detach().to(torch.float64).cpu()
    _check_pair(a, b)
    x = _entries(a, "counts", include_diagonal)
    y = _entries(b, "counts", include_diagonal)
    xc, yc = x - x.mean(), y - y.mean()
    den = float(torch.sqrt((xc * xc).sum() * (yc * yc).sum()))
    return float((xc * yc).sum()) / den if den > 0 else float("nan")
