"""Length-distribution loss: 1-D Wasserstein distance between streamline-length distributions.

The exact ``W1`` between two (weighted) empirical distributions is the area between their
CDFs, ``sum_k |F_u(x_k) - F_v(x_k)| (x_{k+1} - x_k)`` over the merged sorted sample values,
as in ``scipy.stats.wasserstein_distance``. It is the limit of the histogram distance as the
bins shrink, needs no bin width, and is differentiable w.r.t. the samples (through the sorted
values) and the weights (through the CDFs).
"""

from __future__ import annotations

import torch

from ..errors import ShapeError
from ..streamlines import Streamlines
from .resample import arc_lengths

__all__ = ["arc_lengths", "wasserstein_1d", "length_loss"]


def _cdf_at(sorted_x, sorted_w, at):
    """Weighted CDF of ``sorted_x`` evaluated at ``at`` (right-continuous)."""
    idx = torch.searchsorted(sorted_x.detach(), at.detach(), right=True)  # [K]
    cw = torch.cat([sorted_w.new_zeros(1), torch.cumsum(sorted_w, 0)])
    return cw[idx] / cw[-1]


def wasserstein_1d(
    u: torch.Tensor,
    v: torch.Tensor,
    u_weights: torch.Tensor | None = None,
    v_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Exact 1-D Wasserstein-1 (earth mover's) distance between two weighted samples.

    Args:
        u: ``[N]`` samples (any unit, e.g. mm).
        v: ``[M]`` samples in the same unit.
        u_weights: optional ``[N]`` non-negative weights (need not sum to 1).
        v_weights: optional ``[M]`` non-negative weights.

    Returns:
        Scalar distance, unit of the samples. Equals ``scipy.stats.wasserstein_distance``.

    Shape:
        ``(N,)``, ``(M,)`` -> ``()``.

    Gradients:
        Differentiable w.r.t. ``u``, ``v`` and both weight vectors (subgradient at ties).

    Raises:
        ShapeError: an input is empty or not 1-D, or weights do not match their samples.
    """
    if u.ndim != 1 or v.ndim != 1 or u.numel() == 0 or v.numel() == 0:
        raise ShapeError(f"need two non-empty 1-D samples, got {tuple(u.shape)}, {tuple(v.shape)}")
    dtype = torch.promote_types(u.dtype, v.dtype)
    u, v = u.to(dtype), v.to(dtype)
    uw = u.new_ones(u.shape) if u_weights is None else u_weights.to(dtype)
    vw = v.new_ones(v.shape) if v_weights is None else v_weights.to(dtype)
    if uw.shape != u.shape or vw.shape != v.shape:
        raise ShapeError("weights must have the shape of their samples")
    us, ui = torch.sort(u)
    vs, vi = torch.sort(v)
    allv, _ = torch.sort(torch.cat([u, v]))
    deltas = allv[1:] - allv[:-1]  # [N+M-1]
    at = allv[:-1]
    fu = _cdf_at(us, uw[ui], at)
    fv = _cdf_at(vs, vw[vi], at)
    return (torch.abs(fu - fv) * deltas).sum()


def length_loss(
    tracked: Streamlines | torch.Tensor,
    target: Streamlines | torch.Tensor,
    *,
    weights: torch.Tensor | None = None,
    target_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """``W1`` between the length distributions of two tractograms (mm).

    Args:
        tracked: streamlines (their arc lengths are used) or ``[S]`` lengths (mm).
        target: streamlines or ``[T]`` lengths (mm).
        weights: optional ``[S]`` weights of the tracked streamlines (e.g. soft survival).
        target_weights: optional ``[T]`` weights of the target streamlines.

    Returns:
        Scalar in mm: how far (on average) lengths must move to match the target histogram.

    Shape:
        ``(S,)``, ``(T,)`` -> ``()``.

    Gradients:
        Differentiable w.r.t. the tracked points (through the arc lengths) and ``weights``.
    """
    la = arc_lengths(tracked) if isinstance(tracked, Streamlines) else tracked
    lb = arc_lengths(target) if isinstance(target, Streamlines) else target
    return wasserstein_1d(la, lb, weights, target_weights)
