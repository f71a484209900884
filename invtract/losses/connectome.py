"""Structural connectomes from streamlines: the soft, differentiable version of ``tck2connectome``.

The hard connectome (``tck2connectome``'s exact counts, scalings and statistics) lives in
:mod:`invtract.evaluation.connectome` (numpy only) and is re-exported here:
:func:`assign_endpoints`, :func:`connectome_matrix`, :func:`format_connectome`, ...

The soft connectome (:func:`soft_connectome`) gives each endpoint a distribution over nodes
``0..L``: for every label l within the radius, with ``d_l`` the distance to its nearest voxel
centre, the weight is ``exp(-d_l / T) - exp(-R / T)``; node 0 (unassigned) has weight
``exp(-R / T)``. The weights are continuous in the endpoint position (a label fades in at the
search radius) and, as ``T -> 0``, all the mass goes to the hard assignment.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import ConfigError, ShapeError
from ..evaluation.connectome import (
    LabelVolume,
    as_label_volume,
    assign_endpoints,
    connectome_matrix,
    csv_delimiter,
    format_connectome,
    layout_matrix,
    radial_search_offsets,
)
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


def _layout(full, keep_unassigned: bool, symmetric: bool, zero_diagonal: bool):
    """tck2connectome's output layout from an upper-triangular ``[N+1, N+1]`` accumulator
    (tensor: differentiable; array: :func:`~invtract.evaluation.connectome.layout_matrix`)."""
    if not torch.is_tensor(full):
        return layout_matrix(full, keep_unassigned, symmetric, zero_diagonal)
    upper = torch.triu(full)
    out = upper + torch.triu(upper, 1).T if symmetric else upper
    if zero_diagonal:
        out = out * (1.0 - torch.eye(out.shape[0], dtype=out.dtype, device=out.device))
    return out if keep_unassigned else out[1:, 1:]


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
