"""One gradient-descent step and the annealing schedule, shared by the bundle fit and the
connectome fit.

The rules live here once: a non-finite loss or gradient stops the run with
:class:`~invtract.errors.FitDiverged` (the last good checkpoint stays on disk), gradients are
clipped by their joint norm, and in ``alternate`` mode even iterations step the tracking
parameters and odd ones the SH coefficients.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch

from ..errors import FitDiverged

__all__ = ["descend", "annealed"]


def descend(
    total: torch.Tensor,
    it: int,
    z: dict,
    delta: torch.Tensor | None,
    opt_p,
    opt_sh,
    *,
    grad_clip: float,
    alternate: bool,
    checkpoint=None,
    detail: str = "",
    before_params_step: Callable[[], None] | None = None,
    after_params_step: Callable[[], None] | None = None,
) -> dict:
    """Back-propagate ``total`` and step the optimisers.

    Args:
        total: the scalar loss of iteration ``it``.
        z: unconstrained parameters (name -> scalar tensor) that ``opt_p`` steps.
        delta: the learned SH change that ``opt_sh`` steps, or None.
        grad_clip: clip the joint gradient norm of ``z`` and ``delta`` to this (0: off).
        alternate: step ``opt_p`` on even iterations and ``opt_sh`` on odd ones (when both
            exist) instead of both every iteration.
        checkpoint: the run's checkpoint path, named in the FitDiverged message.
        detail: appended to the message when the loss is not finite.
        before_params_step / after_params_step: called around ``opt_p.step()`` (learning-rate
            schedule, projection onto bounds).

    Returns:
        ``{"loss": float, "grads": {"grad/NAME": float}, "grad_norm_params": float,
        "grad_norm_sh": float}`` (gradients before clipping).
    """
    kept = f"the last good checkpoint is kept in {checkpoint}" if checkpoint else ""
    loss = float(total.detach())
    if not math.isfinite(loss):
        raise FitDiverged(f"the loss became {loss} at iteration {it}{detail}; " + kept)
    for o in (opt_p, opt_sh):
        if o is not None:
            o.zero_grad(set_to_none=True)
    if total.requires_grad:
        total.backward()
    grads = {f"grad/{k}": float(v.grad) if v.grad is not None else 0.0 for k, v in z.items()}
    gn_p = math.sqrt(sum(x * x for x in grads.values()))
    gn_sh = float(delta.grad.norm()) if delta is not None and delta.grad is not None else 0.0
    if not (math.isfinite(gn_p) and math.isfinite(gn_sh)):
        raise FitDiverged(f"a gradient became non-finite at iteration {it}; " + kept)
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(
            list(z.values()) + ([delta] if delta is not None else []), grad_clip
        )
    both = opt_p is not None and opt_sh is not None
    step_p = opt_p is not None and not (alternate and both and it % 2 == 1)
    step_sh = opt_sh is not None and not (alternate and both and it % 2 == 0)
    if step_p:
        if before_params_step is not None:
            before_params_step()
        opt_p.step()
        if after_params_step is not None:
            after_params_step()
    if step_sh:
        opt_sh.step()
    return {"loss": loss, "grads": grads, "grad_norm_params": gn_p, "grad_norm_sh": gn_sh}


def annealed(t: Mapping, it: int, iterations: int, start: str, end: str) -> float:
    """The value of ``t[start]`` -> ``t[end]`` at iteration ``it`` of ``iterations`` under
    ``t["schedule"]``: ``"constant"`` (start), ``"linear"`` or geometric (otherwise); the end
    value is reached at the last iteration."""
    f = min(it / max(iterations - 1, 1), 1.0)
    a, b = float(t[start]), float(t[end])
    if t["schedule"] == "constant":
        return a
    if t["schedule"] == "linear":
        return a + (b - a) * f
    return a * (b / a) ** f
