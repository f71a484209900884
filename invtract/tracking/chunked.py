"""Gradient accumulation over chunks of seeds: memory bounded whatever the streamline length.

:func:`accumulate_gradients` tracks the seeds of :func:`~invtract.tracking.differentiable.
track_differentiable` a chunk at a time, at most ``max_steps // max_points`` streamlines per
chunk (so at most about ``max_steps`` streamline-steps are alive at once), evaluates the
caller's loss on each chunk and back-propagates it before the next chunk is tracked. The
gradients reaching the inputs are those of the sum of the chunk losses, which is the loss of
all streamlines whenever that loss is a sum over streamlines (a paired distance to target
streamlines, a sum of per-point terms, ...).

:func:`accumulate_map_gradients` covers losses of a map that streamlines add up to (a density
map, endpoint counts, a connectivity matrix): ``L = reduce_fn(M)``, ``M = sum of
contribution_fn(chunk)``. A first pass sums M without gradients, dL/dM is taken once, and a
second pass back-propagates ``<dL/dM, contribution>`` chunk by chunk (the chain rule, M being
a sum): exact gradients for one more forward pass.

Memory is then that of one chunk plus the gradients of the inputs: doubling the length halves
the streamlines per chunk instead of doubling what is kept. Time is that of one
forward+backward over all seeds, plus a small per-chunk overhead.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import torch

from ..fod.field import FODField, as_fod_field
from ..params import ResolvedParameters, TrackingParameters
from .differentiable import DiffTrackResult, resolved_parameters, track_differentiable

__all__ = ["accumulate_gradients", "accumulate_map_gradients", "DEFAULT_MAX_STEPS"]

#: streamline-steps alive at once by default (about 60 MB on CPU at ~56 bytes per step)
DEFAULT_MAX_STEPS = 2**20

#: keyword arguments of track_differentiable that may hold tensors requiring grad
_PARAMETERS = ("step_mm", "angle_deg", "cutoff")


def accumulate_gradients(
    loss_fn: Callable[[DiffTrackResult, int], torch.Tensor],
    fod: FODField,
    seeds: torch.Tensor,
    init_dirs: torch.Tensor,
    params: TrackingParameters | ResolvedParameters | None = None,
    *,
    max_steps: int = DEFAULT_MAX_STEPS,
    timings: dict | None = None,
    **track_kwargs,
) -> torch.Tensor:
    """Sum of ``loss_fn`` over chunks of seeds, with gradients accumulated into the inputs.

    Args:
        loss_fn: ``loss_fn(result, start) -> 0-d tensor`` for the chunk of seeds
            ``seeds[start:start + n]`` (``result.seed_ids`` index within the chunk).
        fod, seeds, init_dirs, params, track_kwargs: as for
            :func:`~invtract.tracking.differentiable.track_differentiable` (``step_mm``,
            ``angle_deg``, ``cutoff``, ``temperature``, ``path``, ...). Positions in scanner
            mm, ``seeds`` / ``init_dirs`` ``[N, 3]``.
        max_steps: streamline-steps per chunk (at least one streamline per chunk).
        timings: if a dict, receives ``forward_s`` (tracking and loss evaluation) and
            ``backward_s`` (back-propagation) summed over chunks, and ``chunks``.

    Returns:
        The total loss, detached. Gradients are added to ``.grad`` of the leaves behind
        the FOD's coefficients (``fod.sh_flat``, or the learned rows ``[n, K]`` of a field of
        :meth:`~invtract.fod.field.FODField.with_rows`), ``seeds``, ``init_dirs`` and tensor-valued
        ``step_mm`` / ``angle_deg`` / ``cutoff`` (as ``total.backward()`` would do): inputs
        that are themselves computed (``fod.with_sh(torch.where(mask, learn, fixed))``) are
        back-propagated through once, at the end.
    """
    fod = as_fod_field(fod)
    # the differentiable FOD input: the learned rows of FODField.with_rows, else all coefficients
    coeffs = fod.sh_flat if fod.learned is None else fod.learned[1]
    inputs = {"sh": coeffs, "seeds": seeds, "init_dirs": init_dirs}
    inputs.update({k: track_kwargs.pop(k) for k in _PARAMETERS if k in track_kwargs})
    bounds = _chunk_bounds(fod, params, inputs, int(seeds.shape[0]), max_steps)
    # detached stand-ins: each chunk's graph ends at them, so the inputs' own graphs (if any)
    # are traversed once, at the end, with the accumulated gradients
    local = {
        k: v.detach().requires_grad_(v.requires_grad) if torch.is_tensor(v) else v
        for k, v in inputs.items()
    }
    # the same values: the field's non-zero mask stays valid (no pass over the FOD)
    if fod.learned is None:
        local_fod = dataclasses.replace(fod, sh_flat=local["sh"])
    else:  # the rows' gradient alone (no [X*Y*Z, K] copy or gradient)
        local_fod = dataclasses.replace(fod, learned=(fod.learned[0], local["sh"]))
    wanted = [k for k, v in local.items() if torch.is_tensor(v) and v.requires_grad]
    grads = {k: torch.zeros_like(local[k]) for k in wanted}
    total = torch.zeros((), dtype=torch.float64)
    t_fwd = t_bwd = 0.0
    for start, stop in bounds:
        t0 = time.perf_counter()
        out = track_differentiable(
            local_fod, local["seeds"][start:stop], local["init_dirs"][start:stop], params,
            **{k: local[k] for k in _PARAMETERS if k in local}, **track_kwargs,
        )  # fmt: skip
        loss = loss_fn(out, start)
        t1 = time.perf_counter()
        if wanted and loss.requires_grad:
            got = torch.autograd.grad(loss, [local[k] for k in wanted], allow_unused=True)
            for k, g in zip(wanted, got):
                if g is not None:
                    grads[k] += g
        total += loss.detach().double().cpu()
        t_bwd += time.perf_counter() - t1
        t_fwd += t1 - t0
        del out, loss
    t1 = time.perf_counter()
    computed = []
    for k in wanted:  # leaves accumulate as backward() would; computed inputs propagate once
        if inputs[k].is_leaf:
            g = grads[k].to(inputs[k].dtype)
            inputs[k].grad = g if inputs[k].grad is None else inputs[k].grad + g
        else:
            computed.append(k)
    if computed:
        torch.autograd.backward([inputs[k] for k in computed], [grads[k] for k in computed])
    t_bwd += time.perf_counter() - t1
    if timings is not None:
        timings.update(forward_s=t_fwd, backward_s=t_bwd, chunks=len(bounds))
    return total


def accumulate_map_gradients(
    contribution_fn: Callable[[DiffTrackResult, int], torch.Tensor],
    reduce_fn: Callable[[torch.Tensor], torch.Tensor],
    fod: FODField,
    seeds: torch.Tensor,
    init_dirs: torch.Tensor,
    params: TrackingParameters | ResolvedParameters | None = None,
    *,
    max_steps: int = DEFAULT_MAX_STEPS,
    timings: dict | None = None,
    **track_kwargs,
) -> torch.Tensor:
    """``reduce_fn(M)`` for the map ``M = sum over chunks of contribution_fn(result, start)``,
    with its gradients accumulated into the inputs, one chunk of streamlines in memory at once.

    Args:
        contribution_fn: a chunk's additive share of the map (any fixed shape, e.g. a soft
            density ``[X, Y, Z]``), from its :class:`DiffTrackResult` and first seed's index.
        reduce_fn: the loss of the whole map (a 0-d tensor); it should depend on ``M`` and
            constants only (its own parameters get no gradient here).
        The other arguments: as :func:`accumulate_gradients`; ``timings`` also receives
        ``map_pass_s``, the first (no-gradient) pass.

    Returns:
        The loss, detached; the inputs' ``.grad`` as after ``reduce_fn(M).backward()``.
    """
    fod = as_fod_field(fod)
    kw = dict(track_kwargs)
    params_now = {k: (v.detach() if torch.is_tensor(v) else v) for k, v in kw.items()}
    bounds = _chunk_bounds(fod, params, track_kwargs, int(seeds.shape[0]), max_steps)
    t0 = time.perf_counter()
    total_map = None
    with torch.no_grad():
        for start, stop in bounds:
            out = track_differentiable(
                fod.detach(), seeds.detach()[start:stop], init_dirs.detach()[start:stop],
                params, **params_now,
            )  # fmt: skip
            share = contribution_fn(out, start)
            total_map = share if total_map is None else total_map + share
            del out
    if total_map is None:
        raise ValueError("no seeds: the map is empty")
    map_pass = time.perf_counter() - t0
    total_map = total_map.detach().requires_grad_(True)
    loss = reduce_fn(total_map)
    (map_grad,) = torch.autograd.grad(loss, [total_map])

    def linearised(out: DiffTrackResult, start: int) -> torch.Tensor:
        return (contribution_fn(out, start) * map_grad).sum()

    accumulate_gradients(
        linearised, fod, seeds, init_dirs, params, max_steps=max_steps, timings=timings,
        **kw,
    )  # fmt: skip
    if timings is not None:
        timings["map_pass_s"] = map_pass
    return loss.detach()


def _chunk_bounds(fod: FODField, params, values: dict, n: int, max_steps: int) -> list:
    """``[(start, stop), ...]`` over ``n`` seeds, at most ``max_steps // max_points`` seeds
    (at least one) per chunk, for the parameters the tracker will resolve (``values`` holds
    any ``step_mm`` / ``angle_deg`` / ``cutoff`` overrides)."""
    overrides = (values.get(k) for k in _PARAMETERS)
    resolved = resolved_parameters(fod, params, *overrides)
    per_chunk = max(1, int(max_steps) // max(int(resolved.max_points), 1))
    return [(a, min(n, a + per_chunk)) for a in range(0, n, per_chunk)]
