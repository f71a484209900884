"""Streamline distances for fitting: MDF, a paired loss and a soft-min set (Chamfer) loss.

All functions take :class:`~invtract.streamlines.Streamlines` (resampled here by arc length,
see :mod:`invtract.losses.resample`) or already resampled ``[S, n, 3]`` tensors. Points and
distances are scanner mm.

Definitions (Garyfallidis et al. 2012, as ``dipy.tracking.distances.bundles_distances_mdf``):

* direct distance ``d(a, b) = mean_k |a_k - b_k|``, flipped ``d(a, flip(b))``;
* ``MDF(a, b) = min(direct, flipped)``.

Soft minima use a temperature ``T`` (mm) and the *normalised* log-sum-exp
``softmin_T(x) = -T log(mean_j w_j exp(-x_j / T) / mean_j w_j)``. It is never below the hard
minimum, and exceeds it by at most ``T log(N)`` for ``N`` candidates, so it converges to the
hard minimum as ``T -> 0``; ``T == 0`` gives the hard minimum itself (gradient of the arg-min).

Memory: the set loss never materialises the ``[Sa, Sb]`` distance matrix with its autograd
graph; blocks of ``chunk_size x chunk_size`` pairs are computed, reduced and, in the backward
pass, recomputed (the pattern of a checkpointed kernel).
"""

from __future__ import annotations

import math

import torch
from torch.utils.checkpoint import checkpoint

from ..errors import ConfigError, ShapeError
from ..streamlines import Streamlines
from .resample import as_resampled, resample, safe_norm

__all__ = [
    "mdf",
    "min_mdf",
    "chamfer_loss",
    "paired_mdf",
    "paired_coverage",
    "paired_loss",
]


def _check_temperature(temperature_mm: float) -> float:
    t = float(temperature_mm)
    if not t >= 0.0 or math.isinf(t):
        raise ConfigError(f"temperature_mm must be finite and >= 0, got {temperature_mm}")
    return t


def _check_chunk(chunk_size: int) -> int:
    c = int(chunk_size)
    if c < 1:
        raise ConfigError(f"chunk_size must be >= 1, got {chunk_size}")
    return c


def _mean_dist(a: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``[I, J]`` mean point-wise distance between ``a [I, n, 3]`` and ``c [J, n, 3]``."""
    d = torch.cdist(
        a.transpose(0, 1).contiguous(),
        c.transpose(0, 1).contiguous(),
        compute_mode="donot_use_mm_for_euclid_dist",
    )  # [n, I, J]
    return d.mean(0)


def _candidates(b: torch.Tensor, flip: bool) -> torch.Tensor:
    return torch.cat([b, b.flip(1)], 0) if flip else b


def mdf(
    a: Streamlines | torch.Tensor,
    b: Streamlines | torch.Tensor,
    n_points: int = 20,
    *,
    flip: bool = True,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Full matrix of minimum average direct-flip (MDF) distances.

    Equals ``dipy.tracking.distances.bundles_distances_mdf`` on streamlines resampled to
    ``n_points`` (``dipy.tracking.streamline.set_number_of_points``). Builds ``[Sa, Sb]``:
    use :func:`min_mdf` when only each streamline's nearest neighbour is needed.

    Args:
        a: ``Sa`` streamlines or a resampled ``[Sa, n, 3]`` tensor (mm).
        b: ``Sb`` streamlines or a resampled ``[Sb, n, 3]`` tensor (mm).
        n_points: points per streamline when resampling.
        flip: also compare with ``b`` reversed and keep the smaller distance.
        chunk_size: rows and columns per block.

    Returns:
        ``[Sa, Sb]`` distances in mm.

    Shape:
        ``(Sa, n, 3)``, ``(Sb, n, 3)`` -> ``(Sa, Sb)``.

    Gradients:
        Differentiable w.r.t. the points of ``a`` and ``b`` (through the selected direction).
    """
    ra, rb = as_resampled(a, n_points), as_resampled(b, n_points)
    _check_same_n(ra, rb)
    c = _check_chunk(chunk_size)
    rows = []
    for i in range(0, ra.shape[0], c):
        cols = []
        for j in range(0, rb.shape[0], c):
            bj = rb[j : j + c]
            d = _mean_dist(ra[i : i + c], bj)
            if flip:
                d = torch.minimum(d, _mean_dist(ra[i : i + c], bj.flip(1)))
            cols.append(d)
        rows.append(torch.cat(cols, 1) if cols else ra.new_zeros((ra[i : i + c].shape[0], 0)))
    if not rows:
        return ra.new_zeros((0, rb.shape[0]))
    return torch.cat(rows, 0)


def _check_same_n(ra: torch.Tensor, rb: torch.Tensor) -> None:
    if ra.shape[1] != rb.shape[1]:
        raise ShapeError(
            f"both sets need the same points per streamline, got {ra.shape[1]} and {rb.shape[1]}"
        )


class _SoftMinMeanDist(torch.autograd.Function):
    """``out_i = -T * logsumexp_j(-D_ij / T + logw_j)`` streamed over blocks of ``j``.

    ``D_ij`` is the mean point-wise distance between ``a_i`` and candidate ``c_j``. Nothing of
    size ``[Sa, Sc]`` is kept: the backward pass recomputes each block (first-order only).
    """

    @staticmethod
    def forward(ctx, a, c, logw, temperature, chunk_a, chunk_c):
        out = a.new_empty(a.shape[0])
        with torch.no_grad():
            for i in range(0, a.shape[0], chunk_a):
                parts = []
                for j in range(0, c.shape[0], chunk_c):
                    logits = -_mean_dist(a[i : i + chunk_a], c[j : j + chunk_c]) / temperature
                    parts.append(torch.logsumexp(logits + logw[j : j + chunk_c], 1))
                out[i : i + chunk_a] = -temperature * torch.logsumexp(torch.stack(parts, 1), 1)
        ctx.save_for_backward(a, c, logw, out)
        ctx.temperature, ctx.chunk_a, ctx.chunk_c = temperature, chunk_a, chunk_c
        return out

    @staticmethod
    def backward(ctx, grad_out):
        a, c, logw, out = ctx.saved_tensors
        T, ca, cc = ctx.temperature, ctx.chunk_a, ctx.chunk_c
        need_a, need_c, need_w = ctx.needs_input_grad[:3]
        ga = torch.zeros_like(a) if need_a else None
        gc = torch.zeros_like(c) if need_c else None
        gw = torch.zeros_like(logw) if need_w else None
        for i in range(0, a.shape[0], ca):
            ai = a[i : i + ca].detach().requires_grad_(need_a)
            gi = grad_out[i : i + ca, None]
            oi = out[i : i + ca, None]
            for j in range(0, c.shape[0], cc):
                cj = c[j : j + cc].detach().requires_grad_(need_c)
                with torch.enable_grad():
                    d = _mean_dist(ai, cj)
                # d out_i / d D_ij = softmax weight p_ij; d out_i / d logw_j = -T p_ij
                p = torch.exp((oi - d.detach()) / T + logw[j : j + cc]) * gi
                if need_w:
                    gw[j : j + cc] -= T * p.sum(0)
                inputs = [x for x, need in ((ai, need_a), (cj, need_c)) if need]
                if inputs:
                    grads = torch.autograd.grad(d, inputs, grad_outputs=p)
                    if need_a:
                        ga[i : i + ca] += grads[0]
                    if need_c:
                        gc[j : j + cc] += grads[-1]
        return ga, gc, gw, None, None, None


def min_mdf(
    a: Streamlines | torch.Tensor,
    b: Streamlines | torch.Tensor,
    n_points: int = 20,
    *,
    temperature_mm: float = 0.0,
    weights_b: torch.Tensor | None = None,
    flip: bool = True,
    chunk_size: int = 256,
) -> torch.Tensor:
    """Each streamline of ``a``'s (soft) minimum MDF to the set ``b``.

    Args:
        a: ``Sa`` streamlines or resampled ``[Sa, n, 3]`` (mm).
        b: ``Sb`` streamlines or resampled ``[Sb, n, 3]`` (mm), ``Sb >= 1``.
        n_points: points per streamline when resampling.
        temperature_mm: soft-min temperature (mm); 0 = hard minimum.
        weights_b: optional ``[Sb]`` non-negative weights of the candidates (e.g. the
            tracker's soft survival weights); weight 0 removes a candidate.
        flip: consider both orientations of each candidate (MDF); ``False`` = direct only.
        chunk_size: streamlines per block (memory ~ ``chunk_size**2 * n`` floats).

    Returns:
        ``[Sa]`` distances in mm (``>=`` the hard minimum, equal to it when ``T == 0``).

    Shape:
        ``(Sa, n, 3)``, ``(Sb, n, 3)``, weights ``(Sb,)`` -> ``(Sa,)``.

    Gradients:
        Differentiable w.r.t. the points of ``a`` and ``b`` and w.r.t. ``weights_b`` (soft
        case; the hard case gives the gradient of the selected pair only). First order only.

    Raises:
        ShapeError: ``b`` is empty, point counts differ, or ``weights_b`` is not ``[Sb]``.
        ConfigError: negative temperature or chunk size < 1.
    """
    T = _check_temperature(temperature_mm)
    c = _check_chunk(chunk_size)
    ra, rb = as_resampled(a, n_points), as_resampled(b, n_points)
    _check_same_n(ra, rb)
    if rb.shape[0] == 0:
        raise ShapeError("min_mdf needs at least one streamline in b")
    if weights_b is not None and tuple(weights_b.shape) != (rb.shape[0],):
        raise ShapeError(f"weights_b must be [{rb.shape[0]}], got {tuple(weights_b.shape)}")
    cand = _candidates(rb, flip)
    if weights_b is None:
        w = ra.new_ones(cand.shape[0])
    else:
        w = weights_b.to(ra.dtype)
        w = torch.cat([w, w]) if flip else w
    # a zero weight gives a -inf logit (no candidate) with a finite (zero) gradient
    pos = w > 0
    if not bool(pos.any()):
        raise ConfigError("min_mdf: every candidate weight is zero")
    logw = torch.where(pos, torch.log(torch.where(pos, w, torch.ones_like(w))), -math.inf)
    if T == 0.0:
        with torch.no_grad():
            best = torch.empty(ra.shape[0], dtype=torch.int64, device=ra.device)
            penalty = torch.where(w.detach() > 0, 0.0, math.inf)
            for i in range(0, ra.shape[0], c):
                vals, idx = [], []
                for j in range(0, cand.shape[0], c):
                    d = _mean_dist(ra[i : i + c], cand[j : j + c]) + penalty[j : j + c]
                    v, k = d.min(1)
                    vals.append(v)
                    idx.append(k + j)
                k = torch.stack(vals, 1).argmin(1, keepdim=True)
                best[i : i + c] = torch.stack(idx, 1).gather(1, k)[:, 0]
        return safe_norm(ra - cand[best]).mean(-1)
    norm = torch.logsumexp(logw, 0)  # normalised soft-min: never below the hard minimum
    return _SoftMinMeanDist.apply(ra, cand, logw, T, c, c) + T * norm


def chamfer_loss(
    a: Streamlines | torch.Tensor,
    b: Streamlines | torch.Tensor,
    n_points: int = 20,
    *,
    temperature_mm: float = 1.0,
    weights_a: torch.Tensor | None = None,
    weights_b: torch.Tensor | None = None,
    flip: bool = True,
    chunk_size: int = 256,
) -> torch.Tensor:
    """Symmetric soft-min MDF (Chamfer-style) distance between two sets of streamlines.

    ``0.5 * (mean_i softmin_j MDF(a_i, b_j) + mean_j softmin_i MDF(b_j, a_i))``; weights make
    both the means and the candidate sets weighted (a dead tracked streamline neither pays nor
    serves as a match). No pairing between the sets is assumed.

    Args:
        a: ``Sa`` streamlines or resampled ``[Sa, n, 3]`` (mm), e.g. the tracked set.
        b: ``Sb`` streamlines or resampled ``[Sb, n, 3]`` (mm), e.g. the target bundle.
        n_points: points per streamline when resampling.
        temperature_mm: soft-min temperature (mm); 0 = hard (nearest neighbour) Chamfer.
        weights_a: optional ``[Sa]`` non-negative weights (soft survival) of ``a``.
        weights_b: optional ``[Sb]`` non-negative weights of ``b``.
        flip: MDF (both orientations) if ``True``, direct distance otherwise.
        chunk_size: streamlines per block; peak memory ~ ``chunk_size**2 * n`` floats.

    Returns:
        Scalar loss in mm.

    Shape:
        ``(Sa, n, 3)``, ``(Sb, n, 3)`` -> ``()``.

    Gradients:
        Differentiable w.r.t. the points of both sets and both weight vectors.
    """
    ra, rb = as_resampled(a, n_points), as_resampled(b, n_points)
    if ra.shape[0] == 0 or rb.shape[0] == 0:
        raise ShapeError(
            f"chamfer_loss needs two non-empty sets, got {ra.shape[0]}, {rb.shape[0]}"
        )
    kw = dict(n_points=n_points, temperature_mm=temperature_mm, flip=flip, chunk_size=chunk_size)
    d_ab = min_mdf(ra, rb, weights_b=weights_b, **kw)
    d_ba = min_mdf(rb, ra, weights_b=weights_a, **kw)
    return 0.5 * (_weighted_mean(d_ab, weights_a) + _weighted_mean(d_ba, weights_b))


def _weighted_mean(x: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
    if w is None:
        return x.mean()
    w = w.to(x.dtype)
    return (x * w).sum() / w.sum().clamp_min(torch.finfo(x.dtype).tiny)


def _softmin_pair(x: torch.Tensor, y: torch.Tensor, T: float) -> torch.Tensor:
    if T == 0.0:
        return torch.minimum(x, y)
    z = torch.stack([-x / T, -y / T], 0)
    return -T * (torch.logsumexp(z, 0) - math.log(2.0))


def paired_mdf(
    tracked: Streamlines | torch.Tensor,
    target: Streamlines | torch.Tensor,
    n_points: int = 32,
    *,
    temperature_mm: float = 0.0,
    flip: bool = True,
) -> torch.Tensor:
    """MDF between streamline ``i`` of ``tracked`` and streamline ``i`` of ``target``.

    Both are resampled by arc length to the same ``n_points``, so different step sizes and
    vertex counts are fine (the number of points no longer depends on the step).

    Args:
        tracked: ``S`` streamlines or resampled ``[S, n, 3]`` (mm).
        target: ``S`` streamlines or resampled ``[S, n, 3]`` (mm), paired by index.
        n_points: points per streamline when resampling.
        temperature_mm: soft minimum of the direct/flipped distances (mm); 0 = hard ``min``.
        flip: take the direct/flipped minimum; ``False`` = direct distance only.

    Returns:
        ``[S]`` distances in mm.

    Shape:
        ``(S, n, 3)``, ``(S, n, 3)`` -> ``(S,)``.

    Gradients:
        Differentiable w.r.t. the points of both inputs.

    Raises:
        ShapeError: different numbers of streamlines or points.
    """
    T = _check_temperature(temperature_mm)
    ra, rb = as_resampled(tracked, n_points), as_resampled(target, n_points)
    _check_paired(ra, rb)
    direct = safe_norm(ra - rb).mean(-1)
    if not flip:
        return direct
    return _softmin_pair(direct, safe_norm(ra - rb.flip(1)).mean(-1), T)


def _check_paired(ra: torch.Tensor, rb: torch.Tensor) -> None:
    if ra.shape != rb.shape:
        raise ShapeError(
            f"paired sets need equal shapes, got {tuple(ra.shape)} and {tuple(rb.shape)}"
        )


def _coverage_block(q, p, radius, T):
    d = torch.cdist(q, p, compute_mode="donot_use_mm_for_euclid_dist")  # [c, n, m]
    if T == 0.0:
        return (d.min(-1).values < radius).to(q.dtype).mean(-1)
    near = -T * (torch.logsumexp(-d / T, -1) - math.log(d.shape[-1]))
    return torch.sigmoid((radius - near) / T).mean(-1)


def paired_coverage(
    tracked: Streamlines,
    target: Streamlines,
    n_points: int = 32,
    *,
    radius_mm: float = 1.0,
    temperature_mm: float = 0.1,
    n_points_tracked: int | None = None,
    chunk_size: int = 4096,
) -> torch.Tensor:
    """Fraction of each target streamline that its paired tracked streamline covers.

    ``target[i]`` is resampled to ``n_points`` points, ``tracked[i]`` to ``n_points_tracked``
    (default ``2 * n_points - 1``); coverage is the share of target points whose nearest tracked
    point is closer than ``radius_mm``. The soft version uses the soft-min distance and a
    sigmoid of width ``temperature_mm``; both converge to the hard count as ``T -> 0``.
    A tracked streamline that stops early covers only part of its target, whatever its MDF.

    Args:
        tracked: ``S`` tracked streamlines (mm).
        target: ``S`` target streamlines (mm), paired by index.
        n_points: samples along each target streamline.
        radius_mm: distance (mm) under which a target sample counts as covered.
        temperature_mm: softness (mm); 0 = hard indicator (no useful gradient).
        n_points_tracked: samples along each tracked streamline.
        chunk_size: pairs per block (blocks are recomputed in the backward pass).

    Returns:
        ``[S]`` coverage in ``[0, 1]``.

    Shape:
        ``(S,)``.

    Gradients:
        Differentiable w.r.t. the points of both sets when ``temperature_mm > 0``.
    """
    T = _check_temperature(temperature_mm)
    c = _check_chunk(chunk_size)
    m = int(n_points_tracked or 2 * n_points - 1)
    q = as_resampled(target, n_points)
    p = as_resampled(tracked, m)
    if q.shape[0] != p.shape[0]:
        raise ShapeError(f"paired sets need equal counts, got {p.shape[0]} and {q.shape[0]}")
    radius = float(radius_mm)
    grad = torch.is_grad_enabled() and (q.requires_grad or p.requires_grad)
    parts = []
    for i in range(0, q.shape[0], c):
        if grad:
            parts.append(
                checkpoint(
                    _coverage_block, q[i : i + c], p[i : i + c], radius, T, use_reentrant=False
                )
            )
        else:
            parts.append(_coverage_block(q[i : i + c], p[i : i + c], radius, T))
    return torch.cat(parts) if parts else q.new_zeros(0)


def paired_loss(
    tracked: Streamlines,
    target: Streamlines,
    n_points: int = 32,
    *,
    coverage_weight: float = 1.0,
    radius_mm: float = 1.0,
    temperature_mm: float = 0.1,
    weights: torch.Tensor | None = None,
    flip: bool = True,
    reduction: str = "mean",
    chunk_size: int = 4096,
) -> torch.Tensor:
    """Paired tracking loss: MDF plus an uncovered-fraction term, per seeded pair.

    For tracked streamline ``i`` seeded from target streamline ``i``:
    ``loss_i = MDF_T(tracked_i, target_i) + coverage_weight * (1 - coverage_i)`` with
    :func:`paired_mdf` (soft direct/flip minimum) and :func:`paired_coverage` (tracked sampled
    at ``2 * n_points - 1`` points, whose even samples are the MDF samples). The MDF
    term is in mm; the coverage term is a fraction, weighted in mm per unit fraction.

    Args:
        tracked: ``S`` tracked streamlines (mm).
        target: ``S`` target streamlines (mm), paired by index.
        n_points: points per streamline for the MDF and target samples for coverage.
        coverage_weight: mm charged for a completely uncovered target (0 disables the term).
        radius_mm: coverage radius (mm).
        temperature_mm: softness of every minimum and of the coverage indicator (mm).
        weights: optional ``[S]`` weights (e.g. soft survival) for the reduction.
        flip: direct/flipped minimum (MDF) if ``True``.
        reduction: ``"mean"`` (weighted mean), ``"sum"`` (weighted sum) or ``"none"`` (``[S]``).
        chunk_size: pairs per block for the coverage term.

    Returns:
        Scalar (or ``[S]`` for ``reduction="none"``), mm.

    Shape:
        ``(S,)`` inputs paired by index -> ``()`` or ``(S,)``.

    Gradients:
        Differentiable w.r.t. the points of both sets and ``weights``.
    """
    if reduction not in ("mean", "sum", "none"):
        raise ConfigError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    use_cov = bool(coverage_weight)
    if use_cov and isinstance(tracked, Streamlines):
        # one resampling serves both terms: every other of 2n - 1 samples is the n-sampling
        dense = resample(tracked, 2 * n_points - 1)
        ra = dense[:, ::2]
    else:
        ra = dense = as_resampled(tracked, n_points)
    rb = as_resampled(target, n_points)
    per = paired_mdf(ra, rb, n_points, temperature_mm=temperature_mm, flip=flip)
    if use_cov:
        cov = paired_coverage(
            dense,
            rb,
            n_points,
            radius_mm=radius_mm,
            temperature_mm=temperature_mm,
            chunk_size=chunk_size,
        )
        per = per + coverage_weight * (1.0 - cov)
    if weights is not None:
        if tuple(weights.shape) != tuple(per.shape):
            raise ShapeError(f"weights must be {tuple(per.shape)}, got {tuple(weights.shape)}")
        w = weights.to(per.dtype)
    else:
        w = None
    if reduction == "none":
        return per if w is None else per * w
    if reduction == "sum":
        return per.sum() if w is None else (per * w).sum()
    return _weighted_mean(per, w)
