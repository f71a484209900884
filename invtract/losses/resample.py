"""Differentiable arc-length resampling and arc lengths of packed streamlines.

Everything works on the packed representation of :class:`~invtract.streamlines.Streamlines`
(``points [P, 3]`` + ``lengths [S]``), so memory is ``O(P + S * n_points)`` and no padded
``[S, L, 3]`` tensor is built. Points are scanner mm (RAS+).

Convention: the same definition as ``dipy.tracking.streamline.set_number_of_points``: the
``n`` output points sit at arc lengths ``k / (n - 1) * total`` (``k = 0 .. n - 1``) along the
polyline, so the first and last points are the polyline's end points.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError, ShapeError
from ..streamlines import Streamlines

__all__ = ["resample", "resample_padded", "arc_lengths", "as_resampled", "safe_norm"]


def safe_norm(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Euclidean norm whose gradient is 0 (not NaN) where the norm is 0.

    Args:
        x: any tensor.
        dim: reduced dimension.

    Returns:
        ``x.norm(dim=dim)``.

    Gradients:
        Differentiable w.r.t. ``x``; the (sub)gradient at ``x == 0`` is taken as 0.
    """
    sq = (x * x).sum(dim)
    pos = sq > 0
    return torch.where(pos, torch.sqrt(torch.where(pos, sq, torch.ones_like(sq))), 0.0 * sq)


def _packed_arc(sl: Streamlines) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-vertex arc length from its own streamline's start, the streamline ids, the totals.

    The running sum is accumulated in float64 (a float32 cumsum over millions of vertices
    would lose ~1 mm) and cast back to the points' dtype.
    """
    pts = sl.points
    S = len(sl)
    sid = torch.repeat_interleave(torch.arange(S, device=pts.device), sl.lengths)  # [P]
    seg = safe_norm(pts[1:] - pts[:-1])  # [P-1]
    seg = torch.where(sid[1:] == sid[:-1], seg, 0.0 * seg)
    cum = torch.cumsum(seg.to(torch.float64), 0)
    cum = torch.cat([cum.new_zeros(1), cum])  # [P]: arc length up to vertex p (global)
    offsets = sl.offsets
    cum = cum - cum[offsets][sid]
    total = cum[offsets + sl.lengths - 1]  # [S]
    return cum, sid, total


def arc_lengths(streamlines: Streamlines) -> torch.Tensor:
    """Polyline length of every streamline.

    Args:
        streamlines: ``S`` streamlines, scanner mm.

    Returns:
        ``[S]`` lengths in mm, dtype of the points (0 for single-vertex streamlines).

    Shape:
        Input ``points (P, 3)``, ``lengths (S,)``; output ``(S,)``.

    Gradients:
        Differentiable w.r.t. ``streamlines.points`` (gradient 0 across repeated vertices).
    """
    if len(streamlines) == 0:
        return streamlines.points.new_zeros(0)
    _, _, total = _packed_arc(streamlines)
    return total.to(streamlines.dtype)


def resample(streamlines: Streamlines, n_points: int) -> torch.Tensor:
    """Resample every streamline to ``n_points`` points equally spaced in arc length.

    Args:
        streamlines: ``S`` streamlines with any number of vertices each, scanner mm.
        n_points: number of output points per streamline (>= 2).

    Returns:
        ``[S, n_points, 3]`` resampled points, scanner mm, same dtype/device as the input.
        A streamline of one vertex (or of zero length) becomes ``n_points`` copies of it.

    Shape:
        Input ``points (P, 3)``, ``lengths (S,)``; output ``(S, n_points, 3)``.

    Gradients:
        Differentiable w.r.t. ``streamlines.points``, including through the arc-length
        positions of the samples. Which segment a sample falls in is chosen without gradient
        (piecewise-smooth, like any linear interpolation).

    Raises:
        ConfigError: ``n_points < 2``.
    """
    n_points = int(n_points)
    if n_points < 2:
        raise ConfigError(f"n_points must be >= 2, got {n_points}")
    pts = streamlines.points
    S = len(streamlines)
    if S == 0:
        return pts.new_zeros((0, n_points, 3))
    lengths = streamlines.lengths
    offsets = streamlines.offsets
    cum64, sid, total64 = _packed_arc(streamlines)
    frac = torch.linspace(0.0, 1.0, n_points, dtype=torch.float64, device=pts.device)  # [n]
    with torch.no_grad():
        # search keys 2*s + u (u in [0, 1]) keep streamlines apart without a padded tensor
        tot = total64.detach()
        u = torch.where(tot[sid] > 0, cum64.detach() / tot[sid].clamp_min(1e-300), 0.0)
        key = 2.0 * sid.to(torch.float64) + u
        tkey = 2.0 * torch.arange(S, device=pts.device, dtype=torch.float64)[:, None] + frac
        idx = torch.searchsorted(key, tkey.reshape(-1), right=True).reshape(S, n_points) - 1
        lo = offsets[:, None]
        last = (offsets + lengths - 1)[:, None]
        idx = torch.minimum(torch.maximum(idx, lo), torch.maximum(last - 1, lo))
        nxt = torch.minimum(idx + 1, last)
    cum = cum64.to(pts.dtype)
    total = total64.to(pts.dtype)
    t = frac.to(pts.dtype)[None, :] * total[:, None]  # [S, n] target arc length
    c0 = cum[idx]
    d = cum[nxt] - c0
    pos = d > 0
    w = torch.where(pos, (t - c0) / torch.where(pos, d, torch.ones_like(d)), 0.0 * d)
    p0 = pts[idx]  # [S, n, 3]
    return p0 + w[..., None] * (pts[nxt] - p0)


def resample_padded(padded: torch.Tensor, lengths: torch.Tensor, n_points: int) -> torch.Tensor:
    """:func:`resample` for padded input.

    Args:
        padded: ``[S, L, 3]`` points, scanner mm; entries past ``lengths`` are ignored.
        lengths: ``[S]`` number of valid vertices per streamline.
        n_points: output points per streamline (>= 2).

    Returns:
        ``[S, n_points, 3]`` resampled points (mm).

    Shape:
        ``(S, L, 3)``, ``(S,)`` -> ``(S, n_points, 3)``.

    Gradients:
        Differentiable w.r.t. ``padded`` (zero gradient in the padding).
    """
    return resample(Streamlines.from_padded(padded, lengths), n_points)


def as_resampled(x: Streamlines | torch.Tensor, n_points: int) -> torch.Tensor:
    """Return ``[S, n_points, 3]``: resample a :class:`Streamlines`, or check a resampled tensor.

    Args:
        x: streamlines (any vertex counts) or an already resampled ``[S, n, 3]`` tensor (mm).
        n_points: points per streamline when ``x`` must be resampled.

    Returns:
        ``[S, n, 3]`` tensor (``x`` itself if it is already a tensor).

    Shape:
        ``(S, n, 3)``.

    Gradients:
        Differentiable w.r.t. the points of ``x``.

    Raises:
        ShapeError: ``x`` is a tensor that is not ``[S, n, 3]``.
    """
    if isinstance(x, Streamlines):
        return resample(x, n_points)
    if not torch.is_tensor(x) or x.ndim != 3 or x.shape[-1] != 3:
        shape = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
        raise ShapeError(f"expected Streamlines or a [S, n, 3] tensor, got {shape}")
    return x
