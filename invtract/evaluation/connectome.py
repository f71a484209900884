"""``tck2connectome`` (MRtrix3 3.0.3) re-expressed in numpy: hard node assignment and matrix.

Sources: ``cmd/tck2connectome.cpp``; ``src/dwi/tractography/connectome/{tck2nodes.cpp,
matrix.cpp, metric.h, connectome.cpp}``; ``src/dwi/tractography/streamline.h`` (length);
``core/math/math.h`` (``load_vector``). Every rule below is one function here.

* **Radial search** (``-assignment_radial_search R``, default 4 mm). A table of integer voxel
  offsets is built once: every offset o in the cube ``|o_i| <= ceil((R + h) / min(spacing))``
  whose grid length ``|o * spacing|`` is ``< R + h`` (h = half the voxel diagonal), sorted by
  that length, ties kept in z-outer/y/x-inner order. For an endpoint p MRtrix walks the table
  from the voxel ``c = round(scanner2voxel @ p)`` (halves away from zero) with
  ``d = |p - voxel2scanner @ (c + o)|`` (mm, float64), keeping a labelled voxel inside the
  image when ``d`` is below the best so far (which starts at R) and stopping once
  ``d > best + 2 h``. Since p lies within h of c's centre, no voxel after the stop can be
  closer, so the node is the label of the nearest labelled voxel centre strictly closer than
  R, the first in table order on exact ties, or 0: that is what :func:`assign_endpoints`
  computes, for all endpoints at once.
* **End voxels** (``-assignment_end_voxels``): the label of ``round(scanner2voxel @ p)``, 0
  outside the image.
* A streamline's endpoints are its first and last vertex (one vertex: both). A streamline with
  no vertex, which crashes tck2connectome 3.0.3, is assigned (0, 0) here.
* **Contribution** of a streamline (``Metric``): ``1``; times its length
  (``-scale_length``) or ``1 / length`` (``-scale_invlength``, 0 for fewer than two
  vertices), the length summed in float32 segment by segment like ``Tractography::length``;
  times its ``-scale_file`` value; times ``2 / (V_a + V_b)`` (``-scale_invnodevol``, node
  volumes in voxels, 0 when both are 0). All in float64, then stored as float32 (``factor``).
  Its weight (``-tck_weights_in``, default 1) is float32 too.
* **Matrix** over nodes ``0..max(label)`` (``max`` over the whole image), one value per edge
  ``{a, b}``, accumulated in streamline order in float64 (float32 when ``max(label) >= 1024``):
  ``-stat_edge sum`` adds ``factor * weight``; ``mean`` divides that sum by the sum of weights
  (edges with none stay 0); ``min`` / ``max`` keep the extreme ``factor`` (weights ignored),
  NaN for edges no streamline reached.
* **Output**: node 0 dropped unless ``keep_unassigned``; upper triangle (lower zeros) unless
  ``symmetric``; ``zero_diagonal`` clears the diagonal; each value printed like Eigen's
  ``FullPrecision`` (``%.15g`` for float64, ``%.6g`` for float32) joined by ``,`` (``*csv``),
  tab (``*tsv``) or space, ``\\n`` after every row.

Conventions: streamline points are scanner mm (RAS+); the label image affine maps voxel indices
(integer = voxel centre) to scanner mm; geometry is float64 from the float32 points, like
MRtrix. MRtrix re-orients images so that their voxel axes are near the scanner axes before
searching; for images whose affine is already near-diagonal with positive diagonal (all test
data) this is the identity; otherwise only the order between exactly equidistant voxels can
differ.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import numpy as np

from ..arrays import to_numpy
from ..errors import ConfigError, FormatError, ShapeError
from ..io.geometry import scanner2voxel
from .tracks import Packed, as_packed

__all__ = [
    "ASSIGNMENTS",
    "PAIR_ASSIGNMENTS",
    "SCALES",
    "STATISTICS",
    "FLOAT32_NODE_LIMIT",
    "LabelVolume",
    "as_label_volume",
    "radial_search_offsets",
    "assign_endpoints",
    "assign_nodes",
    "point_labels",
    "mrtrix_lengths",
    "edge_factors",
    "accumulate_edges",
    "layout_matrix",
    "connectome_matrix",
    "read_vector",
    "csv_delimiter",
    "format_connectome",
    "format_vector",
    "format_assignments",
    "accumulate_connectome",
]

log = logging.getLogger(__name__)

ASSIGNMENTS = ("radial", "end_voxels", "reverse", "forward", "all_voxels")
#: the modes that give each streamline exactly two nodes (its two endpoints)
PAIR_ASSIGNMENTS = ASSIGNMENTS[:4]
SCALES = ("none", "length", "invlength")
STATISTICS = ("sum", "mean", "min", "max")
#: tck2connectome stores the matrix in float32 from this many nodes on (``node_count_ram_limit``)
FLOAT32_NODE_LIMIT = 1024


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

    def missing_nodes(self) -> list[int]:
        """Labels in ``1..n_nodes`` that no voxel carries (tck2connectome warns about them)."""
        return [int(i) for i in np.flatnonzero(self.node_volumes()[1:] == 0) + 1]


def _unpack_labels(labels) -> tuple[np.ndarray, np.ndarray, str]:
    if hasattr(labels, "data") and hasattr(labels, "affine"):
        name = str(getattr(labels, "path", None) or "labels")
        return to_numpy(labels.data), to_numpy(labels.affine), name
    if isinstance(labels, (tuple, list)) and len(labels) == 2:
        return to_numpy(labels[0]), to_numpy(labels[1]), "labels"
    raise ConfigError(
        "labels must be an Image, a (data, affine) pair or a LabelVolume, "
        f"got {type(labels).__name__}"
    )


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
    data, affine, name = _unpack_labels(labels)
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


# ------------------------------------------------------------------------------------------
# endpoint assignment
# ------------------------------------------------------------------------------------------
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


def point_labels(vol: LabelVolume, points: np.ndarray, *, chunk: int = 1 << 14) -> np.ndarray:
    """``[P]`` int64 label of the voxel holding each point ``[P, 3]`` (scanner mm).

    The voxel is ``round(scanner2voxel @ p)`` (float64 from the stored points, summed left to
    right like Eigen, halves away from zero); 0 outside the image or for a non-finite point.
    Column by column, in place, with one unsigned bounds test per axis, ``chunk`` points at a
    time (the temporaries stay in cache): the fast form of :func:`_round_half_away` and
    :func:`_lookup` for every vertex of a tractogram.
    """
    pts = np.asarray(points)
    out = np.empty(pts.shape[0], dtype=np.int64)
    labels = np.ascontiguousarray(vol.labels).ravel()
    for s in range(0, pts.shape[0], chunk):
        inside, flat = _voxel_index(vol, pts[s : s + chunk])
        out[s : s + chunk] = np.where(inside, labels[np.where(inside, flat, 0)], 0)
    return out


def _voxel_index(vol: LabelVolume, pts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(inside [P] bool, flat [P] int64)``: each point's voxel as a C-order index."""
    m = vol.scanner2voxel
    dims = vol.labels.shape
    strides = (dims[1] * dims[2], dims[2], 1)
    coords = [pts[:, i].astype(np.float64) for i in range(3)]
    flat = np.zeros(pts.shape[0], dtype=np.int64)
    inside = np.ones(pts.shape[0], dtype=bool)
    with np.errstate(invalid="ignore"):  # NaN / inf -> a huge index, outside
        for r in range(3):
            c = m[r, 0] * coords[0]
            c += m[r, 1] * coords[1]
            c += m[r, 2] * coords[2]
            c += m[r, 3]
            t = np.trunc(c)
            c -= t  # exact: the fractional part, with the sign of c
            t += c >= 0.5
            t -= c <= -0.5
            index = t.astype(np.int64)
            inside &= index.view(np.uint64) < dims[r]  # negatives wrap to huge values
            index *= strides[r]
            flat += index
    return inside, flat


def _endpoints(tracks: Packed) -> np.ndarray:
    """``[S, 2, 3]`` float64 first and last vertex of each streamline (NaN when it has none)."""
    lengths = tracks.lengths
    has = lengths > 0
    first = tracks.first
    ends = np.full((len(tracks), 2, 3), np.nan, dtype=np.float64)
    ends[has, 0] = tracks.points[first[has]]
    ends[has, 1] = tracks.points[first[has] + lengths[has] - 1]
    return ends


def _padded_labels(vol: LabelVolume, offsets: np.ndarray) -> tuple[np.ndarray, int]:
    """``(labels padded by 2 m, m)``, m the largest offset: one copy for every lookup."""
    m = int(np.abs(offsets).max()) if offsets.size else 0
    return np.pad(vol.labels.astype(np.int32), 2 * m), m


def _padded_lookup(vol: LabelVolume, padded, centre: np.ndarray, offsets: np.ndarray):
    """Labels at ``centre [E, 3] + offsets [K, 3]`` -> ``[E, K]`` (0 outside the image).

    One gather in the label volume padded by ``2 m`` (:func:`_padded_labels`), so no per-pair
    bounds test is needed; centres farther out than ``m`` see no voxel of the image.
    """
    data, m = padded
    dims = np.asarray(data.shape)
    reach = np.all((centre >= -m) & (centre < np.asarray(vol.shape) + m), axis=1)
    strides = np.array([dims[1] * dims[2], dims[2], 1])
    flat_c = np.where(reach, (centre + 2 * m) @ strides, 0)
    flat_o = offsets @ strides
    lab = data.ravel()[flat_c[:, None] + flat_o[None, :]]
    lab[~reach] = 0
    return lab


def _voxel_distance(vol: LabelVolume, p: np.ndarray, vox: np.ndarray) -> np.ndarray:
    """``|p - voxel2scanner @ vox|`` in float64 with MRtrix's operation order; ``[E]`` mm."""
    diff = p - _apply_affine(vol.voxel2scanner, vox.astype(np.float64))
    return np.sqrt(diff[:, 0] ** 2 + diff[:, 1] ** 2 + diff[:, 2] ** 2)


def _radial_nodes(vol: LabelVolume, p: np.ndarray, radius_mm: float, max_pairs: int):
    """Radial-search node of each point ``p [E, 3]`` (float64 scanner mm) -> ``[E]`` int64.

    The distance is only evaluated for labelled voxels whose grid length is at most
    ``min(d0, R) + h``, with d0 the distance to the first labelled voxel in table order: the
    point lies within h (half a voxel diagonal) of its centre voxel, so every voxel farther
    out in the table is at least as far as that one. A first pass looks only at the offsets
    up to ``2 h`` (enough for every point whose own voxel is labelled); the points it does
    not settle get the whole table.
    """
    offsets = radial_search_offsets(vol.spacing, radius_mm)  # [K, 3]
    grid = np.sqrt(((offsets * vol.spacing) ** 2).sum(axis=1))  # ascending
    half_diag = float(np.sqrt(((0.5 * vol.spacing) ** 2).sum()))
    padded = _padded_labels(vol, offsets)
    ok = np.all(np.isfinite(p), axis=1)
    p = np.where(ok[:, None], p, 0.0)
    centre = _round_half_away(_apply_affine(vol.scanner2voxel, p))  # [E, 3]
    out = np.zeros(p.shape[0], dtype=np.int64)
    todo = np.flatnonzero(ok)
    near = int(np.searchsorted(grid, 2 * half_diag * (1 + 1e-9), side="right"))
    for size in sorted({max(1, min(near, grid.size)), grid.size}):
        table = (offsets[:size], grid, half_diag, radius_mm, size == grid.size)
        step = max(1, max_pairs // size)
        settled_all = np.zeros(todo.size, dtype=bool)
        for start in range(0, todo.size, step):
            idx = todo[start : start + step]
            nodes, settled = _radial_pass(vol, padded, p[idx], centre[idx], table)
            out[idx[settled]] = nodes[settled]
            settled_all[start : start + step] = settled
        todo = todo[~settled_all]
    return out


def _radial_pass(vol: LabelVolume, padded, pc: np.ndarray, centre: np.ndarray, table):
    """One radial-search pass over a prefix of the offset table; ``(nodes [E], settled [E])``.

    A point is settled when every voxel that could beat its first labelled one lies in the
    prefix (always, for the whole table).
    """
    offsets, grid, half_diag, radius_mm, whole = table
    lab = _padded_lookup(vol, padded, centre, offsets)  # [E, K']
    has = lab > 0
    any_label = has.any(axis=1)
    first = np.argmax(has, axis=1)
    d0 = np.where(any_label, _voxel_distance(vol, pc, centre + offsets[first]), np.inf)
    bound = (np.minimum(d0, radius_mm) + half_diag) * (1 + 1e-9)
    reach = np.searchsorted(grid, bound, side="right")  # in the whole table
    settled = np.ones(pc.shape[0], bool) if whole else any_label & (reach <= offsets.shape[0])
    e, k = np.nonzero(has & (np.arange(offsets.shape[0])[None, :] < reach[:, None]))
    d = _voxel_distance(vol, pc[e], centre[e] + offsets[k])
    dist = np.full(lab.shape, np.inf)
    dist[e, k] = np.where(d < radius_mm, d, np.inf)
    best = np.argmin(dist, axis=1)  # first in table order on exact ties
    rows = np.arange(pc.shape[0])
    found = np.isfinite(dist[rows, best])
    return np.where(found, lab[rows, best], 0), settled


def assign_endpoints(
    streamlines,
    labels,
    radius_mm: float = 4.0,
    *,
    assignment: str = "radial",
    chunk_size: int = 4_000_000,
) -> np.ndarray:
    """Node of each streamline endpoint, exactly as ``tck2connectome``.

    Args:
        streamlines: :class:`~invtract.streamlines.Streamlines`, :class:`Packed` or a sequence
            of ``[L_i, 3]`` arrays, scanner mm (RAS+).
        labels: the parcellation (see :func:`as_label_volume`).
        radius_mm: the mode's distance in mm, rounded to float32 like MRtrix's option:
            the radial search radius R (an endpoint gets a node only from a labelled voxel
            centre strictly closer than R), or the longest reverse / forward search.
        assignment: ``"radial"`` (default), ``"end_voxels"`` (the label of the voxel holding
            the endpoint), ``"reverse"`` or ``"forward"`` (see
            :mod:`invtract.evaluation.connectome_modes`).
        chunk_size: number of (endpoint, offset) pairs processed at once (memory bound).

    Returns:
        ``[S, 2]`` int64 node indices of the first and last vertex (0 = unassigned).

    Raises:
        ConfigError: unknown or list-valued ``assignment`` (``"all_voxels"``: use
            :func:`assign_nodes`), a negative radius or search distance (a radius of 0 assigns
            nothing, as in tck2connectome: the search keeps voxels strictly within it).
    """
    if assignment not in PAIR_ASSIGNMENTS:
        raise ConfigError(f"assignment must be one of {PAIR_ASSIGNMENTS}, got {assignment!r}")
    distance = float(np.float32(radius_mm))
    if assignment == "radial" and not (np.isfinite(distance) and distance >= 0):
        raise ConfigError(f"radius_mm must be >= 0 mm, got {radius_mm}")
    if assignment in ("reverse", "forward") and not (np.isfinite(distance) and distance >= 0):
        raise ConfigError(f"the {assignment} search distance must be >= 0 mm, got {radius_mm}")
    vol = as_label_volume(labels)
    tracks = as_packed(streamlines)
    if assignment in ("reverse", "forward"):
        from . import connectome_modes as modes

        search = (
            modes.reverse_search_nodes if assignment == "reverse" else modes.forward_search_nodes
        )
        return search(vol, tracks, distance)
    flat = _endpoints(tracks).reshape(-1, 3)
    if assignment == "end_voxels":
        nodes = point_labels(vol, flat)
    else:
        nodes = _radial_nodes(vol, flat, distance, chunk_size)
    return nodes.reshape(-1, 2)


def assign_nodes(streamlines, labels, radius_mm: float = 4.0, *, assignment: str = "radial"):
    """Nodes of each streamline in any mode: ``[S, 2]`` array, or a list for ``all_voxels``.

    ``assignment="all_voxels"`` (``-assignment_all_voxels``) gives ``S`` sorted int64 arrays of
    the distinct labels the streamline's vertices lie in; every other mode is
    :func:`assign_endpoints`.
    """
    if assignment != "all_voxels":
        return assign_endpoints(streamlines, labels, radius_mm, assignment=assignment)
    from .connectome_modes import all_voxel_nodes

    return all_voxel_nodes(as_label_volume(labels), as_packed(streamlines))


# ------------------------------------------------------------------------------------------
# per-streamline contribution
# ------------------------------------------------------------------------------------------
def mrtrix_lengths(streamlines, *, max_elements: int = 1 << 24) -> np.ndarray:
    """Polyline length of each streamline as ``Tractography::length`` computes it (float32).

    Each segment's norm is ``sqrt(dx^2 + (dy^2 + dz^2))`` in float32 (the order of Eigen's
    vectorised ``Vector3f::norm`` in the 3.0.3 build: ``((dx^2 + dy^2) + dz^2)`` differs in the
    last bit for a few streamlines in a hundred, found by running tck2connectome -scale_length on
    single streamlines) and the norms are summed in float32 from the first segment on.

    Args:
        streamlines: streamlines in scanner mm (see :func:`~invtract.evaluation.tracks.as_packed`).
        max_elements: accepted for compatibility (the sums are no longer padded blocks).

    Returns:
        ``[S]`` float32 lengths in mm (0 for one vertex, NaN for none, as MRtrix).
    """
    tracks = as_packed(streamlines)
    pts = tracks.points.astype(np.float32)
    n = tracks.lengths
    out = np.where(n > 0, np.float32(0), np.float32(np.nan)).astype(np.float32)
    if pts.shape[0] < 2:
        return out
    diff = pts[1:] - pts[:-1]
    seg = np.sqrt(diff[:, 0] * diff[:, 0] + (diff[:, 1] * diff[:, 1] + diff[:, 2] * diff[:, 2]))
    out[n > 1] = _sequential_sums(seg, tracks.first[n > 1], n[n > 1] - 1)
    return out


def _sequential_sums(values: np.ndarray, start: np.ndarray, count: np.ndarray) -> np.ndarray:
    """``values[start[i] : start[i] + count[i]].sum()`` for every i, each added in order in
    the dtype of ``values`` (as a C++ loop would), without padding.

    Rows sorted longest first: at step j every row longer than j adds its j-th value (a
    prefix of the sorted rows); the last few long rows are finished one by one.
    """
    order = np.argsort(-count, kind="stable")
    first, size = start[order], count[order]
    total = np.zeros(order.size, dtype=values.dtype)
    active = np.searchsorted(-size, -np.arange(int(size[0]) if size.size else 0), side="left")
    j = 0
    while j < active.size and active[j] > 32:
        k = active[j]
        total[:k] += values[first[:k] + j]
        j += 1
    for i in range(int(active[j]) if j < active.size else 0):  # rows still longer than j
        rest = values[first[i] + j : first[i] + size[i]]
        total[i] = np.add.accumulate(np.concatenate([total[i : i + 1], rest]))[-1]
    out = np.empty_like(total)
    out[order] = total
    return out


def edge_factors(
    streamlines,
    nodes: np.ndarray,
    *,
    scale: str = "none",
    scale_values: np.ndarray | None = None,
    node_volumes: np.ndarray | None = None,
) -> np.ndarray:
    """Each streamline's contribution before weighting (MRtrix ``Metric``), as float32.

    Args:
        streamlines: streamlines in scanner mm (only read for ``length`` / ``invlength``).
        nodes: ``[S, 2]`` assigned nodes (:func:`assign_endpoints`), or ``S`` node arrays
            (:func:`assign_nodes` with ``all_voxels``).
        scale: ``"none"``, ``"length"`` (times the length in mm) or ``"invlength"`` (divided by
            it; 0 for fewer than two vertices).
        scale_values: optional ``[S]`` values (``-scale_file``) multiplied in.
        node_volumes: optional ``[N + 1]`` voxel counts per node: times ``2 / (V_a + V_b)``
            (``-scale_invnodevol``; 0 when both are 0); for node lists ``n / sum(V)``.

    Returns:
        ``[S]`` float32 factors.
    """
    if scale not in SCALES:
        raise ConfigError(f"scale must be one of {SCALES}, got {scale!r}")
    S = len(nodes)
    result = np.ones(S, dtype=np.float64)
    if scale != "none":
        tracks = as_packed(streamlines)
        length = mrtrix_lengths(tracks).astype(np.float64)
        if scale == "length":
            result = result * length
        else:
            long_enough = tracks.lengths > 1
            result = np.where(long_enough, result / np.where(long_enough, length, 1.0), 0.0)
    if scale_values is not None:
        values = np.asarray(scale_values, dtype=np.float64)
        if values.shape[0] < S:
            raise ConfigError(
                f"the scale file has {values.shape[0]} values for {S} streamlines "
                "(tck2connectome: does not contain enough entries for this tractogram)"
            )
        result = result * values[:S]
    if node_volumes is not None:
        count, total = _node_volume_sums(nodes, node_volumes)
        result = np.where(total != 0, result * count / np.where(total != 0, total, 1.0), 0.0)
    return result.astype(np.float32)


def _node_volume_sums(nodes, node_volumes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(count, total)`` per streamline: its number of nodes and their summed volumes.

    ``nodes`` is an ``[S, 2]`` array (count 2) or a list of node arrays (all-voxels mode).
    """
    if isinstance(nodes, np.ndarray):
        return np.full(nodes.shape[0], 2.0), node_volumes[nodes[:, 0]] + node_volumes[nodes[:, 1]]
    from .connectome_modes import pack_lists

    flat, counts = pack_lists(nodes)
    owner = np.repeat(np.arange(counts.shape[0]), counts)
    # integer voxel counts: exact in float64 whatever the order of the sum
    total = np.bincount(owner, weights=node_volumes[flat], minlength=counts.shape[0])
    return counts.astype(np.float64), total


# ------------------------------------------------------------------------------------------
# the matrix
# ------------------------------------------------------------------------------------------
def accumulate_edges(
    nodes: np.ndarray,
    factors: np.ndarray,
    weights: np.ndarray,
    n_nodes: int,
    statistic: str = "sum",
) -> np.ndarray:
    """tck2connectome's per-edge statistic as a full ``[N + 1, N + 1]`` upper-triangular matrix.

    Args:
        nodes: ``[S, 2]`` node pairs.
        factors: ``[S]`` float32 contributions (:func:`edge_factors`).
        weights: ``[S]`` float32 streamline weights.
        n_nodes: the largest label N.
        statistic: ``"sum"``, ``"mean"``, ``"min"`` or ``"max"`` (``-stat_edge``).

    Returns:
        ``[N + 1, N + 1]`` matrix, float64 (float32 from :data:`FLOAT32_NODE_LIMIT` nodes),
        values at ``[min(a, b), max(a, b)]``; the lower triangle is unused (zero).
    """
    if statistic not in STATISTICS:
        raise ConfigError(f"statistic must be one of {STATISTICS}, got {statistic!r}")
    dtype = np.float32 if n_nodes >= FLOAT32_NODE_LIMIT else np.float64
    n = n_nodes + 1
    lo, hi = np.minimum(nodes[:, 0], nodes[:, 1]), np.maximum(nodes[:, 0], nodes[:, 1])
    edge = lo * n + hi
    value = factors.astype(dtype)
    if statistic in ("min", "max"):
        data = np.full(n * n, np.inf if statistic == "min" else -np.inf, dtype=dtype)
        (np.minimum if statistic == "min" else np.maximum).at(data, edge, value)
        data[~np.isfinite(data)] = np.nan
        return data.reshape(n, n)
    w = weights.astype(dtype)
    data = _sequential_sum(edge, value * w, n * n, dtype)
    if statistic == "mean":
        counts = _sequential_sum(edge, w, n * n, dtype)
        data = np.where(counts != 0, data / np.where(counts != 0, counts, 1), data)
    return data.reshape(n, n)


def _sequential_sum(index: np.ndarray, values: np.ndarray, size: int, dtype) -> np.ndarray:
    """``out[index[i]] += values[i]`` in order, accumulated in ``dtype`` (like MRtrix's loop)."""
    if dtype == np.float64:
        return np.bincount(index, weights=values.astype(np.float64), minlength=size)
    out = np.zeros(size, dtype=dtype)
    np.add.at(out, index, values.astype(dtype))
    return out


def accumulate_connectome(
    nodes,
    factors: np.ndarray,
    weights: np.ndarray,
    n_nodes: int,
    statistic: str = "sum",
    *,
    vector: bool = False,
) -> np.ndarray:
    """The edge matrix (or ``-vector``) for any assignment mode, before the output layout.

    Args:
        nodes: ``[S, 2]`` node pairs, or ``S`` node arrays (``all_voxels``).
        factors, weights: ``[S]`` float32 contributions and weights.
        n_nodes: the largest label N.
        statistic: ``-stat_edge``.
        vector: tck2connectome's ``-vector``: one value per node, from each streamline's
            second node (pairs) or every node of its list (``[0]`` for an empty list).

    Returns:
        ``[N + 1, N + 1]`` upper-triangular matrix (see :func:`accumulate_edges`), or the
        ``[N + 1]`` vector (index 0 = unassigned).
    """
    if isinstance(nodes, np.ndarray):
        pairs, owner = nodes, np.arange(nodes.shape[0])
        if vector:
            pairs = np.stack([np.zeros_like(nodes[:, 1]), nodes[:, 1]], axis=1)
    else:
        from .connectome_modes import pack_lists, packed_pairs

        flat, counts = pack_lists(nodes)
        if vector:  # every node of the list; 0 for an empty list
            width = np.maximum(counts, 1)
            targets = np.zeros(int(width.sum()), dtype=np.int64)
            targets[~np.repeat(counts == 0, width)] = flat
            owner = np.repeat(np.arange(counts.shape[0]), width)
            pairs = np.stack([np.zeros_like(targets), targets], axis=1)
        else:
            pairs, owner = packed_pairs(flat, counts)
    full = accumulate_edges(pairs, factors[owner], weights[owner], n_nodes, statistic)
    return full[0] if vector else full


def layout_matrix(
    full: np.ndarray, keep_unassigned: bool, symmetric: bool, zero_diagonal: bool
) -> np.ndarray:
    """tck2connectome's output layout from an upper-triangular ``[N+1, N+1]`` matrix."""
    upper = np.triu(full)
    out = upper + np.triu(upper, 1).T if symmetric else upper
    if zero_diagonal:
        out = out.copy()
        np.fill_diagonal(out, 0.0)
    return out if keep_unassigned else out[1:, 1:]


def connectome_matrix(
    streamlines,
    labels,
    radius_mm: float = 4.0,
    symmetric: bool = False,
    zero_diagonal: bool = False,
    keep_unassigned: bool = False,
    *,
    assignment: str = "radial",
    weights=None,
    scale: str = "none",
    scale_invnodevol: bool = False,
    scale_values=None,
    statistic: str = "sum",
    assignments=None,
    vector: bool = False,
) -> np.ndarray:
    """Connectome laid out exactly like ``tck2connectome``'s output.

    Args:
        streamlines: :class:`~invtract.streamlines.Streamlines`, :class:`Packed` or ``[L_i, 3]``
            arrays (scanner mm).
        labels: parcellation (see :func:`as_label_volume`).
        radius_mm: the assignment distance (mm): radial search radius, or the longest
            reverse / forward search.
        symmetric: fill the lower triangle too (``-symmetric``; ignored with ``vector``).
        zero_diagonal: set the diagonal to 0 (``-zero_diagonal``; ignored with ``vector``).
        keep_unassigned: keep node 0 as the first row/column (``-keep_unassigned``).
        assignment: one of :data:`ASSIGNMENTS` (see :func:`assign_nodes`).
        weights: optional ``[S]`` per-streamline weights (``-tck_weights_in``).
        scale: ``"none"``, ``"length"`` or ``"invlength"`` (``-scale_length`` /
            ``-scale_invlength``); the old spelling ``scale="invnodevol"`` is accepted.
        scale_invnodevol: times ``2 / (V_a + V_b)`` (``-scale_invnodevol``).
        scale_values: optional ``[S]`` per-streamline factors (``-scale_file``).
        statistic: ``"sum"``, ``"mean"``, ``"min"`` or ``"max"`` (``-stat_edge``).
        assignments: precomputed output of :func:`assign_nodes` (skips it).
        vector: ``-vector``: one value per node (see :func:`accumulate_connectome`).

    Returns:
        ``[N, N]`` matrix (``N + 1`` with ``keep_unassigned``), ``N = max(label)``; row/column i
        is node i (i + 1 without node 0); float64 (float32 from 1024 nodes, as MRtrix);
        ``[N]`` (``[N + 1]``) with ``vector``. :func:`format_connectome` (matrix) and
        :func:`format_vector` of it are byte-identical to tck2connectome 3.0.3's file.
    """
    if scale == "invnodevol":
        scale, scale_invnodevol = "none", True
    vol = as_label_volume(labels)
    tracks = as_packed(streamlines)
    if assignments is None:
        nodes = assign_nodes(tracks, vol, radius_mm, assignment=assignment)
    elif isinstance(assignments, np.ndarray) or assignment != "all_voxels":
        nodes = np.asarray(assignments, dtype=np.int64)
    else:
        nodes = [np.asarray(n, dtype=np.int64) for n in assignments]
    S = len(nodes)
    factors = edge_factors(
        tracks,
        nodes,
        scale=scale,
        scale_values=None if scale_values is None else to_numpy(scale_values),
        node_volumes=vol.node_volumes() if scale_invnodevol else None,
    )
    w = np.ones(S, dtype=np.float32)
    if weights is not None:
        w = to_numpy(weights).astype(np.float32)
        if w.shape != (S,):
            raise ShapeError(f"weights must be [S] = [{S}], got {tuple(w.shape)}")
    full = accumulate_connectome(nodes, factors, w, vol.n_nodes, statistic, vector=vector)
    if vector:
        return full if keep_unassigned else full[1:]
    return layout_matrix(full, keep_unassigned, symmetric, zero_diagonal)


# ------------------------------------------------------------------------------------------
# files (MRtrix's text formats)
# ------------------------------------------------------------------------------------------
def read_vector(path: str | os.PathLike, what: str = "vector") -> np.ndarray:
    """A numeric vector file as MRtrix's ``load_vector`` reads it (float64).

    ``#`` starts a comment; values are separated by spaces, commas, semicolons or tabs; the
    file holds one row or one column.

    Raises:
        FormatError: unreadable, empty, non-numeric, uneven rows, or a matrix.
    """
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise FormatError(f"cannot read {what} file {path}: {exc}") from exc
    rows = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            tokens = [t for t in line.replace(",", " ").replace(";", " ").split() if t]
            try:
                rows.append([float(t) for t in tokens])
            except ValueError as exc:
                raise FormatError(f"{what} file {path}: not numeric: {line!r}") from exc
    if not rows:
        raise FormatError(f"{what} file {path} contains no data")
    if any(len(r) != len(rows[0]) for r in rows):
        raise FormatError(f"{what} file {path}: uneven rows")
    m = np.asarray(rows, dtype=np.float64)
    if m.shape[1] == 1:
        return m[:, 0]
    if m.shape[0] > 1:
        raise FormatError(f"{what} file {path} contains a matrix, not a vector")
    return m[0]


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

    Each row on one line, values joined by ``delimiter``, each printed like a C++ stream at
    Eigen's full precision (``%.15g`` for float64, ``%.6g`` for a float32 matrix: integers
    without a decimal point, ``nan`` for NaN), ``\\n`` after every row including the last.
    """
    m = np.asarray(matrix)
    if m.ndim != 2:
        raise ShapeError(f"matrix must be 2-D, got shape {m.shape}")
    fmt = "%.6g" if m.dtype == np.float32 else "%.15g"
    return "".join(delimiter.join([fmt % v for v in row.tolist()]) + "\n" for row in m)


def format_vector(values: np.ndarray, delimiter: str, command_line: str) -> str:
    """``-vector`` text as MRtrix's ``save_vector`` writes it.

    ``# command_history: <command line>``, then the values on one line joined by
    ``delimiter``, each printed at 10 significant digits (``%.10g``), and ``\\n``.
    """
    body = delimiter.join(f"{v:.10g}" for v in np.asarray(values).tolist())
    return f"# command_history: {command_line}\n{body}\n"


def format_assignments(nodes, command_line: str) -> str:
    """``-out_assignments`` text: ``# <command line>`` then one line per streamline.

    Args:
        nodes: ``[S, 2]`` node pairs (``a b`` per line), ``[S]`` nodes (``-vector``), or ``S``
            node arrays (``all_voxels``: the sorted nodes, ``0`` for none).
        command_line: the command, for the header line.
    """
    if isinstance(nodes, np.ndarray):
        rows = nodes.reshape(nodes.shape[0], -1).tolist()
    else:
        rows = [np.asarray(n).tolist() or [0] for n in nodes]
    body = "".join(" ".join(map(str, r)) + "\n" for r in rows)
    return f"# {command_line}\n" + body
