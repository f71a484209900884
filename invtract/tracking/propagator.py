"""One SD_Stream propagation step (first order or RK4), batched over streamlines.

Convention: ``algorithms/sd_stream.h: SDStream::next`` and ``tracking/exec.h: next_rk4``
(spec §5.2, §5.3). A step samples the FOD at the current point, ascends to the peak starting
from the previous direction, applies the amplitude (cutoff) and curvature tests, and moves by
one step along the new direction (float32: p + u * h). ROI and length rules are applied by the
tracker after the step.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from ..fod.field import FODField
from ..fod.peak_grad import refine_peak
from ..params import ResolvedParameters
from .types import Term

__all__ = ["sd_stream_next", "sd_stream_step", "normalise_eigen"]


def normalise_eigen(u: torch.Tensor) -> torch.Tensor:
    """``u / |u|`` with Eigen's float order (x^2 + (y^2 + z^2)); rows of norm 0 unchanged."""
    n2 = u[:, 0] * u[:, 0] + (u[:, 1] * u[:, 1] + u[:, 2] * u[:, 2])
    return torch.where((n2 > 0)[:, None], u / torch.sqrt(n2)[:, None], u)


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a[:, 0] * b[:, 0] + (a[:, 1] * b[:, 1] + a[:, 2] * b[:, 2])


@torch.no_grad()
def sd_stream_next(
    field: FODField,
    pos: torch.Tensor,
    u: torch.Tensor,
    params: ResolvedParameters,
    refine: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``SDStream::next``: one evaluation from ``(pos [N, 3], u [N, 3])``.

    ``refine > 0`` (the differentiable tracker's option, not tckgen's) polishes each converged
    peak with that many float64 Newton iterations
    (:func:`~invtract.fod.peak_grad.refine_peak`) before the curvature test and the move; the
    amplitude tested is the unpolished one.

    Returns:
        ``(new_pos [N, 3], new_dir [N, 3], amplitude [N], term [N] int64)``; ``term`` is
        ``Term.CONTINUE`` (0), ``EXIT_IMAGE``, ``MODEL`` or ``HIGH_CURVATURE``. Where ``term`` is
        not CONTINUE, the returned position and direction are the inputs.
    """
    c, valid = field.sample(pos)
    term = torch.full((pos.shape[0],), int(Term.CONTINUE), dtype=torch.int64, device=pos.device)
    term[~valid] = int(Term.EXIT_IMAGE)
    amp, new_u = field.peak(c, u)
    if refine > 0:
        new_u = refine_peak(c, new_u, field.lmax, refine)
    ok_amp = torch.isfinite(amp) & (amp >= params.cutoff)
    term[valid & ~ok_amp] = int(Term.MODEL)
    curv = _dot(u, new_u) < params.dot_threshold
    term[valid & ok_amp & curv] = int(Term.HIGH_CURVATURE)
    go = term == int(Term.CONTINUE)
    step = torch.tensor(params.step_mm, dtype=pos.dtype, device=pos.device)
    moved = pos + new_u * step
    new_pos = torch.where(go[:, None], moved, pos)
    new_dir = torch.where(go[:, None], new_u, u)
    return new_pos, new_dir, amp, term


@torch.no_grad()
def sd_stream_step(
    field: FODField,
    pos: torch.Tensor,
    u: torch.Tensor,
    params: ResolvedParameters,
    refine: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One propagation step: first order, or RK4 when ``params.rk4``.

    Args:
        field: the FOD.
        pos: ``[N, 3]`` current points, scanner mm (float32).
        u: ``[N, 3]`` previous step directions (unit).
        params: resolved tracking parameters.
        refine: Newton polish of each peak (first order only; see :func:`sd_stream_next`).

    Returns:
        ``(new_pos [N, 3], new_dir [N, 3], term [N])`` with ``term`` a :class:`Term` code
        (CONTINUE when the step succeeded).

    Gradients:
        None: this is the hard forward step. :mod:`invtract.tracking.differentiable` replays it
        with gradients.
    """
    if not params.rk4:
        new_pos, new_dir, _, term = sd_stream_next(field, pos, u, params, refine)
        return new_pos, new_dir, term
    if refine > 0:
        raise ConfigError("refine (Newton-polished peaks) needs first-order stepping, not -rk4")
    return _rk4_step(field, pos, u, params)


def _rk4_step(field, pos, u, params):
    N = pos.shape[0]
    term = torch.zeros(N, dtype=torch.int64, device=pos.device)
    half = torch.tensor(float(torch.tensor(0.5 * params.step_mm, dtype=torch.float32)))
    half = half.to(device=pos.device, dtype=pos.dtype)
    step = torch.tensor(params.step_mm, dtype=pos.dtype, device=pos.device)

    def evaluate(p, d, term):
        _, nd, _, t = sd_stream_next(field, p, d, params)
        term = torch.where(term == 0, t, term)
        return nd, term

    d1, term = evaluate(pos, u, term)
    d2, term = evaluate(pos + d1 * half, u, term)
    d3, term = evaluate(pos + d2 * half, u, term)
    d4, term = evaluate(pos + d3 * step, normalise_eigen(d2 + d3), term)
    two = torch.tensor(2.0, dtype=pos.dtype, device=pos.device)
    final_dir = normalise_eigen(((d1 + d2 * two) + d3 * two) + d4)
    final_pos = pos + final_dir * step
    d5, term = evaluate(final_pos, final_dir, term)
    curv = (term == 0) & (_dot(d1, d5) < params.cos_max_rk4)
    term = torch.where(curv, torch.full_like(term, int(Term.HIGH_CURVATURE)), term)
    go = term == 0
    return (
        torch.where(go[:, None], final_pos, pos),
        torch.where(go[:, None], final_dir, u),
        term,
    )
