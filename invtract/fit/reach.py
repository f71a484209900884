"""The ``reach`` term: keep the target's paths open in the FOD the fit learns.

SD_Stream stops a streamline at the first step whose FOD peak amplitude is below the cutoff
(tckgen's "model" stop), so every step a target half took had an amplitude above it. When a
fit lowers an amplitude on a target's path below the cutoff it builds a "wall": streamlines
through it stop short, and the soft survival weights of ``extent`` (a product of sigmoids
about the cutoff) lose their gradient a few temperatures below it, so nothing takes the wall
down. ``reach`` is a hinge on the amplitudes themselves, whose gradient does not vanish:

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
"""

from __future__ import annotations

import torch

__all__ = ["learned_amplitudes", "reach_sum"]

#: hinge softness (relative amplitude units)
REACH_TAU = 0.02


def learned_amplitudes(field, points: torch.Tensor, dirs: torch.Tensor) -> torch.Tensor:
    """``[n]`` float64 FOD amplitudes ``c(p) . Y(u)`` at ``points [n, 3]`` (scanner mm) along
    unit ``dirs [n, 3]`` (0 where the FOD has no data), differentiable in the learned rows of
    ``field`` (``field.learned = (voxels, rows)``, see
    :meth:`~invtract.fod.field.FODField.with_rows`); without learned rows, detached.

    The value is :func:`~invtract.fit.objective.step_amplitudes`'; the gradient to a learned
    row is ``w Y(u)`` for each trilinear corner weight ``w`` of a point in that voxel."""
    from ..fod.interp import corner_weights, world_to_voxel
    from ..fod.sh import sh_basis
    from .objective import step_amplitudes

    points, dirs = points.detach(), dirs.detach()
    base = step_amplitudes(field, points, dirs).to(points.device)
    learned = getattr(field, "learned", None)
    if learned is None or not learned[1].requires_grad or points.shape[0] == 0:
        return base
    voxels, rows = learned
    dev = rows.device
    order = torch.argsort(voxels)
    sorted_vox = voxels[order]
    v = world_to_voxel(points.to(dev), field.scanner2voxel.to(dev))
    index, w, _ = corner_weights(v, field.shape, weight_dtype=torch.float64)
    pos = torch.searchsorted(sorted_vox, index).clamp_max(max(len(sorted_vox) - 1, 0))
    hit = sorted_vox[pos] == index  # [n, 8] corner is a learned voxel
    slot = order[pos]
    Y = sh_basis(dirs.to(dev, torch.float64), field.lmax)  # [n, K]
    r = rows.to(torch.float64)
    ry = (r[slot] * Y[:, None, :]).sum(-1)  # [n, 8]
    corr = (torch.where(hit, ry - ry.detach(), torch.zeros_like(ry)) * w).sum(-1)
    corr = torch.where(base != 0, corr, torch.zeros_like(corr))
    return base.to(dev) + corr


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
    a = learned_amplitudes(field, p[keep], u[keep])
    x = a / cut.to(a.device) - 1
    return (d[keep].to(a.device) * _hinge(margin - x)).sum()
