"""Data terms that read the target's steps alone (no tracking): ``reach``, ``tangent`` and
``replay`` (each step replayed alone by the peak ascent; :func:`replay_sum`).

``reach`` and ``tangent`` evaluate the learned FOD at the start ``p`` of every step of every
target half, along the step's direction ``u``, and are exact in the learned FOD rows
(:func:`learned_amplitudes`, :func:`learned_contractions`: trilinear weights times a vector of
the SH basis, through :meth:`~invtract.fod.field.FODField.with_rows`).

**reach** keeps the target's paths open. SD_Stream stops a streamline at the first step whose
FOD peak amplitude is below the cutoff (tckgen's "model" stop), so every step a target half
took had an amplitude above it. When a fit lowers an amplitude on a target's path below the
cutoff it builds a "wall": streamlines through it stop short, and the soft survival weights of
``extent`` (a product of sigmoids about the cutoff) lose their gradient a few temperatures
below it, so nothing takes the wall down. ``reach`` is a hinge on the amplitudes themselves,
whose gradient does not vanish:

    reach = sum over the steps of every target half of  d h(delta - x),   x = A / cutoff - 1

``d`` the step length (mm), ``A = c(p) . Y(u)`` the FOD amplitude at the step's start ``p``
along its direction ``u``, ``h(x) = tau softplus(x / tau)`` (~ ``max(x, 0)``, ``tau`` =
:data:`REACH_TAU`) and ``delta`` = ``[loss] reach_margin`` (relative). The amplitude along a
direction is a lower bound on the peak amplitude near it, so the term keeps the path open
whatever the peak search finds. Positions and directions are the target's (no gradient);
amplitudes are exact in the FOD coefficients (the learned rows of
:meth:`~invtract.fod.field.FODField.with_rows`) and in the cutoff.

Only the paths: hinges that also pushed amplitudes *below* the cutoff where the targets stop
(the rejected step at each target's end, the first step of a tracked half past its target's
end) dug negative lobes into the FOD on the tuning cases (docs/csd.md).

**tangent** asks the target's directions to be FOD peaks. SD_Stream steps along the peak the
ascent finds at ``p`` (spec 5.2: forward Euler), so the tangential gradient ``g`` of the
amplitude at ``(p, u)`` is ~0 on every step of a target on the FOD tckgen tracked:

    tangent = sum over the steps of every target half of  d |g|^2 / cutoff^2

``g = (c(p) . dY/de1 (u), c(p) . dY/de2 (u))`` (amplitude per radian, ``e1, e2`` orthonormal
tangents of ``u``) is linear in the coefficients, so the term is a quadratic in the learned
rows. On real_msmt15's bundleA it is 1e-4 per target on the full-data FOD against 1.6e3 on the
20-direction CSD (docs/csd.md).
"""

from __future__ import annotations

import torch

__all__ = [
    "learned_amplitudes",
    "learned_contractions",
    "reach_sum",
    "tangent_sum",
    "replay_sum",
    "target_turns",
    "replayed_peaks",
]

#: hinge softness (relative amplitude units)
REACH_TAU = 0.02
#: target steps evaluated at a time: bounds the ``[steps, K]`` float64 temporaries (basis
#: values and derivatives, trilinear corner rows) that a whole training set's targets would
#: otherwise hold at once (~3 kB a step: 400 MB for a 500-streamline whole-brain bundle)
STEP_CHUNK = 16384


def _chunks(n: int):
    """Slices of ``range(n)`` of at most :data:`STEP_CHUNK` (one empty slice when ``n = 0``).
    Each step's value is computed alone, so the concatenated chunks equal the one-shot values
    bit for bit; a learned row's gradient sums its chunks' parts (equal up to rounding)."""
    return [slice(a, min(n, a + STEP_CHUNK)) for a in range(0, n, STEP_CHUNK)] or [slice(0, 0)]


def learned_amplitudes(field, points: torch.Tensor, dirs: torch.Tensor) -> torch.Tensor:
    """``[n]`` float64 FOD amplitudes ``c(p) . Y(u)`` at ``points [n, 3]`` (scanner mm) along
    unit ``dirs [n, 3]`` (0 where the FOD has no data), differentiable in the learned rows of
    ``field`` (``field.learned = (voxels, rows)``, see
    :meth:`~invtract.fod.field.FODField.with_rows`); without learned rows, detached.

    The value is :func:`~invtract.fit.objective.step_amplitudes`'; the gradient to a learned
    row is ``w Y(u)`` for each trilinear corner weight ``w`` of a point in that voxel."""
    from ..fod.sh import sh_basis
    from .objective import step_amplitudes

    points, dirs = points.detach(), dirs.detach()
    base = step_amplitudes(field, points, dirs).to(points.device)
    if not _has_learned(field) or points.shape[0] == 0:
        return base
    dev = field.learned[1].device
    Y = sh_basis(dirs.to(dev, torch.float64), field.lmax)  # [n, K]
    corr = _learned_correction(field, points, Y[None])[0]
    return base.to(dev) + torch.where(base.to(dev) != 0, corr, torch.zeros_like(corr))


def learned_contractions(field, points: torch.Tensor, vecs: torch.Tensor) -> torch.Tensor:
    """``[D, n]`` float64 ``c(p) . v`` at ``points [n, 3]`` (scanner mm) for the coefficient
    vectors ``vecs [D, n, K]`` (``c(p)`` the trilinear FOD, 0 where it has no data),
    differentiable in the learned rows of ``field`` like :func:`learned_amplitudes`."""
    points = points.detach()
    c, valid = field.sample(points)  # [n, K]
    dev = vecs.device
    base = (c.detach().to(dev, torch.float64)[None] * vecs).sum(-1)
    base = torch.where(valid.to(dev)[None], base, torch.zeros_like(base))
    if not _has_learned(field) or points.shape[0] == 0:
        return base
    corr = _learned_correction(field, points, vecs.to(field.learned[1].device))
    return base.to(corr.device) + torch.where(
        valid.to(corr.device)[None], corr, torch.zeros_like(corr)
    )


def _has_learned(field) -> bool:
    """Learned rows that a gradient should reach (not under ``no_grad``: the correction is
    zero-valued, so skipping it leaves the value unchanged)."""
    learned = getattr(field, "learned", None)
    return learned is not None and learned[1].requires_grad and torch.is_grad_enabled()


def _learned_correction(field, points: torch.Tensor, vecs: torch.Tensor) -> torch.Tensor:
    """``[D, n]`` zero-valued tensors whose gradient to each learned row is the sum over the
    points' trilinear corners in that voxel of ``w v`` (``vecs [D, n, K]``)."""
    from ..fod.interp import corner_weights, world_to_voxel

    voxels, rows = field.learned
    dev = rows.device
    order = torch.argsort(voxels)
    sorted_vox = voxels[order]
    v = world_to_voxel(points.to(dev), field.scanner2voxel.to(dev))
    index, w, _ = corner_weights(v, field.shape, weight_dtype=torch.float64)
    pos = torch.searchsorted(sorted_vox, index).clamp_max(max(len(sorted_vox) - 1, 0))
    hit = sorted_vox[pos] == index  # [n, 8] corner is a learned voxel
    r = rows.to(torch.float64)[order[pos]]  # [n, 8, K]
    rv = torch.einsum("nck,dnk->dnc", r, vecs.to(torch.float64))  # [D, n, 8]
    return (torch.where(hit[None], rv - rv.detach(), torch.zeros_like(rv)) * w[None]).sum(-1)


def _hinge(x: torch.Tensor) -> torch.Tensor:
    return REACH_TAU * torch.nn.functional.softplus(x / REACH_TAU)


def _steps(halves: torch.Tensor, counts: torch.Tensor):
    """``(start points [m, 3], unit directions [m, 3], lengths [m])`` of the real steps of
    ``halves [S, 2, H, 3]`` (step ``j`` from vertex ``j`` to ``j + 1``)."""
    d = halves[..., 1:, :] - halves[..., :-1, :]
    H = halves.shape[2]
    valid = torch.arange(max(H - 1, 0), device=halves.device)[None, None] < (
        counts.to(halves.device)[..., None] - 1
    )
    dd = d[valid].to(torch.float64)
    n = dd.norm(dim=-1)
    u = dd / n.clamp_min(1e-12)[:, None]
    return halves[..., :-1, :][valid].to(torch.float64), u, n


def reach_sum(field, target_halves, target_counts, cutoff, margin) -> torch.Tensor:
    """Sum over the pairs' target halves of ``d h(delta - x)`` over their steps (mm x
    relative amplitude; module docstring).

    Args:
        field: the tracked :class:`~invtract.fod.field.FODField` (learned rows may require
            grad).
        target_halves: ``[P, 2, H, 3]`` target halves of the pairs (mm), every pair of the
            batch, tracked or not.
        target_counts: ``[P, 2]`` vertices per target half.
        cutoff: the current cutoff (float or 0-d tensor, may require grad).
        margin: ``delta``, the relative amplitude margin.

    Returns:
        0-d float64 tensor.
    """
    cut = torch.as_tensor(cutoff, dtype=torch.float64)
    p, u, d = _steps(target_halves.detach(), target_counts)
    keep = d > 1e-9
    p, u, d = p[keep], u[keep], d[keep]
    a = torch.cat([learned_amplitudes(field, p[s], u[s]) for s in _chunks(p.shape[0])])
    x = a / cut.to(a.device) - 1
    return (d.to(a.device) * _hinge(margin - x)).sum()


def tangent_sum(field, target_halves, target_counts, cutoff) -> torch.Tensor:
    """Sum over the steps of the target halves of ``d |g|^2 / cutoff^2``, ``g`` the FOD's
    tangential gradient at the step's start ``p`` along its direction ``u`` (``[2]``: the
    derivatives of ``c(p) . Y`` along two orthonormal tangents of ``u``; amplitude per radian).

    SD_Stream steps along the FOD's peak at ``p`` (the ascent from the previous direction), so
    on the FOD tckgen tracked ``g`` is ~0 at every step of a target: the term asks the learned
    FOD to have its peaks along the targets. ``g`` is linear in the coefficients, so the term is
    a quadratic in the learned rows (:func:`learned_contractions`); it needs no tracking.

    Args:
        field: the FOD (learned rows may require grad).
        target_halves: ``[P, 2, H, 3]`` target halves (mm); target_counts: ``[P, 2]``.
        cutoff: the cutoff (float or 0-d tensor): the amplitude unit, detached (the term would
            otherwise pull a learned cutoff up to shrink itself).

    Returns:
        0-d float64 tensor (mm).
    """
    p, u, d = _steps(target_halves.detach(), target_counts)
    keep = d > 1e-9
    p, u, d = p[keep], u[keep], d[keep]
    if p.shape[0] == 0:
        return torch.zeros((), dtype=torch.float64)
    g = torch.cat([_tangent_gradient(field, p[s], u[s]) for s in _chunks(p.shape[0])], 1)
    cut = float(torch.as_tensor(cutoff).detach())  # a unit: no pull on a learned cutoff
    return (d.to(g.device) * g.pow(2).sum(0)).sum() / cut**2


def _tangent_gradient(field, p: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``[2, n]`` the FOD's tangential gradient ``g`` at ``p [n, 3]`` along unit ``u [n, 3]``
    (:func:`tangent_sum`), differentiable in the learned rows."""
    from ..fod.peak_grad import basis_directional_derivatives, tangent_basis

    e1, e2 = tangent_basis(u)
    _, dY, _ = basis_directional_derivatives(u, torch.stack([e1, e2]), field.lmax, order=1)
    return learned_contractions(field, p, dY)


def target_turns(halves: torch.Tensor, counts: torch.Tensor):
    """``(p [m, 3], u_prev [m, 3], u_next [m, 3], d [m])``: for each step ``j >= 1`` of the
    target halves (a previous step to come from), its start ``p``, the previous step's and its
    own unit direction and its length (float64)."""
    d = halves[..., 1:, :] - halves[..., :-1, :]
    j = torch.arange(1, max(halves.shape[2] - 1, 1), device=halves.device)
    valid = j[None, None] < (counts.to(halves.device)[..., None] - 1)
    prev, nxt = d[..., :-1, :][valid].double(), d[..., 1:, :][valid].double()
    n1 = nxt.norm(dim=-1)
    p = halves[..., 1:-1, :][valid].double()
    unit = torch.nn.functional.normalize
    return p, unit(prev, dim=-1, eps=1e-12), unit(nxt, dim=-1, eps=1e-12), n1


def replay_sum(field, target_halves, target_counts, cutoff, sigma_deg: float) -> torch.Tensor:
    """Sum over the steps ``j >= 1`` of the target halves of ``d rho(|t - delta|^2)`` (mm x
    rad^2): each step replayed alone, as tckgen would take it from the target's state.

    * At the step's start ``p`` the MRtrix peak ascent (spec 3.3; no gradient) runs from the
      target's previous direction ``u0`` on the current FOD and finds the peak ``u*``: tckgen's
      next direction there.
    * ``t`` is the target's direction ``u1`` in the tangent plane at ``u*`` (radians, ~ the
      angle between them).
    * ``delta = -H^-1 g`` is the peak's implicit displacement
      (:func:`~invtract.fod.peak_grad.implicit_peak`): zero-valued, its gradient is the peak's
      Jacobian in the learned rows. ``H`` is detached, its eigenvalues held <= -A (the peak's
      amplitude): the exact Jacobian of a near-flat peak is unbounded.
    * ``rho(s) = sigma^2 log(1 + s / sigma^2)`` (Cauchy) bounds the pull on lobes far off.

    The gradient moves the peak tckgen would find onto the target's direction, also where the
    ascent ends in another lobe (``tangent`` only shapes the FOD at ``u1``). Steps whose peak
    is not finite or is below the cutoff are left to ``reach``.

    Args:
        field: the FOD (learned rows may require grad).
        target_halves: ``[P, 2, H, 3]`` target halves (mm); target_counts: ``[P, 2]``.
        cutoff: the cutoff (a threshold for the steps, detached).
        sigma_deg: ``sigma`` of ``rho`` (degrees; ``[loss] replay_sigma_deg``).

    Returns:
        0-d float64 tensor.
    """
    p, u0, u1, d = target_turns(target_halves.detach(), target_counts)
    cut = float(torch.as_tensor(cutoff).detach())
    s2 = float(torch.deg2rad(torch.tensor(float(sigma_deg)))) ** 2
    parts = []
    for sl in _chunks(p.shape[0]):
        with torch.no_grad():  # tckgen's next direction from the target's state
            amp, peak = replayed_peaks(field, p[sl], u0[sl])
            ok = torch.isfinite(peak).all(-1) & (amp >= cut) & (d[sl] > 1e-9)
        r2 = _replay_residual(field, p[sl][ok], peak[ok].double(), u1[sl][ok], amp[ok])
        parts.append(d[sl][ok].to(r2.device) * s2 * torch.log1p(r2 / s2))
    return torch.cat(parts).sum()


def replayed_peaks(field, p: torch.Tensor, u0: torch.Tensor):
    """``(amplitude [n], peak [n, 3])``: the MRtrix ascent from ``u0`` on the FOD at ``p``
    (float32, as tckgen), by the numba tracking kernel's peak search when it can run (~7x
    faster than :meth:`~invtract.fod.field.FODField.peak`; both are spec 3.3, equal to float32
    rounding), else by the torch one."""
    from ..tracking import fused_cpu

    c, _ = field.sample(p.to(field.sh_flat.dtype))
    if fused_cpu.available() and c.device.type == "cpu":
        amp, peak = fused_cpu.peaks(c.numpy(), u0.numpy(), field.lmax)
        return torch.from_numpy(amp), torch.from_numpy(peak)
    return field.peak(c.float(), u0.to(c.device, torch.float32))


def _replay_residual(field, p, peak, u1, amp) -> torch.Tensor:
    """``[n]`` ``|t - delta|^2`` of :func:`replay_sum` at converged peaks ``peak [n, 3]`` of
    amplitude ``amp [n]`` (value ``|t|^2``; gradient through ``delta`` in the learned rows)."""
    from ..fod.peak_grad import _peak_operator, _regularised_solve, geometry_from_derivatives

    _, M, e1, e2 = _peak_operator(peak, field.lmax)
    g, H = geometry_from_derivatives(learned_contractions(field, p, M.permute(1, 0, 2)).T)
    x = _regularised_solve(g, H.detach(), amp.to(H))
    delta = -(x - x.detach())  # the peak's displacement in (e1, e2): zero-valued
    t = torch.stack([(u1 * e1).sum(-1), (u1 * e2).sum(-1)], -1)
    return (t - delta).pow(2).sum(-1)
