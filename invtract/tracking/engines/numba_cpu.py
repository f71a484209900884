"""The ``numba`` engine: the compiled CPU kernel of :mod:`invtract.tracking.fused_cpu` behind
the common engine interface (see :mod:`invtract.tracking.engines`)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from ...fod.field import FODField
from ...params import ResolvedParameters
from ..types import EngineResult, RoiSet

__all__ = ["track"]


def track(
    field: FODField,
    seeds: torch.Tensor | np.ndarray,
    init_dirs: torch.Tensor | np.ndarray,
    params: ResolvedParameters,
    rois: RoiSet | None = None,
    batch_size: int = 8192,
    progress: Callable[[int], None] | None = None,
    act=None,
) -> EngineResult:
    """Track ``seeds [N, 3]`` (scanner mm) from raw ``init_dirs [N, 3]`` with the numba kernel.

    The field is handed over as a float32 view (no copy of the whole FOD per chunk of seeds).
    With ``act`` (an :class:`~invtract.tracking.act.ActImage`) the ACT kernel tracks
    (:func:`~invtract.tracking.act_cpu.track_fused_cpu_act`; ``params`` must carry ACT's
    defaults).
    """
    from .. import fused_cpu

    sh = np.asarray(field.sh_flat.detach().cpu().numpy(), np.float32).reshape(*field.shape, -1)
    s2v = field.scanner2voxel.cpu().numpy()
    seeds = np.asarray(seeds.cpu() if torch.is_tensor(seeds) else seeds, np.float32)
    init = np.asarray(init_dirs.cpu() if torch.is_tensor(init_dirs) else init_dirs, np.float32)
    if act is not None:
        from ..act_cpu import track_fused_cpu_act

        out = track_fused_cpu_act(sh, s2v, seeds, init, params, act, rois or RoiSet())
    else:
        out = fused_cpu.track_fused_cpu(sh, s2v, seeds, init, params, rois or RoiSet())
    if progress is not None:
        progress(seeds.shape[0])
    return out
