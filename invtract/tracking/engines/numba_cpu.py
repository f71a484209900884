"""The ``numba`` engine: the compiled CPU kernel of :mod:`invtract.tracking.fused_cpu` behind
the common engine interface (see :mod:`invtract.tracking.engines`)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from ...errors import ConfigError
from ...fod.field import FODField
from ...params import ResolvedParameters
from ..types import EngineResult, PeakRecord, RoiSet

__all__ = ["track", "track_peaks"]


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


def peaks_unavailable_reason(field: FODField, refine: int = 0) -> str | None:
    """Why :func:`track_peaks` cannot run on ``field`` (None when it can): the kernel is
    float32, CPU, tckgen's peaks only."""
    from .. import fused_cpu

    if not fused_cpu.available():
        return "numba is not installed"
    if field.device.type != "cpu" or field.dtype != torch.float32:
        return f"the kernel needs a float32 CPU FOD, not {field.dtype} on {field.device.type}"
    if refine > 0:
        return "the kernel has no Newton polish of the peaks (refine > 0)"
    return None


def track_peaks(
    field: FODField,
    seeds: torch.Tensor | np.ndarray,
    init_dirs: torch.Tensor | np.ndarray,
    params: ResolvedParameters,
    refine: int = 0,
    with_points: bool = True,
) -> PeakRecord:
    """The "record peaks" mode: :func:`~invtract.tracking.fused_cpu.track_fused_cpu_peaks` (the
    kernel of :func:`track`, no ROIs; same streamlines bit for bit) on all ``seeds [N, 3]`` at
    once, on ``torch.get_num_threads()`` threads, as a
    :class:`~invtract.tracking.types.PeakRecord` (CPU tensors sharing the kernel's arrays; ``L``
    is ``max_points + 2``). ``with_points=False``: ``points`` is None (the kernel's buffer is
    released at once).

    Raises:
        ConfigError: where the kernel cannot run (:func:`peaks_unavailable_reason`).
    """
    from .. import fused_cpu

    reason = peaks_unavailable_reason(field, refine)
    if reason is not None:
        raise ConfigError(f"numba engine, record peaks: {reason}")
    sh = field.sh_flat.detach().numpy().reshape(*field.shape, -1)
    s2v = field.scanner2voxel.numpy()
    seeds = np.asarray(seeds.detach().cpu() if torch.is_tensor(seeds) else seeds, np.float32)
    init = init_dirs.detach().cpu() if torch.is_tensor(init_dirs) else init_dirs
    out = fused_cpu.track_fused_cpu_peaks(
        sh, s2v, seeds, np.asarray(init, np.float32), params, threads=torch.get_num_threads()
    )
    steps, points = out.pop("steps"), out.pop("points")
    return PeakRecord(
        points=torch.from_numpy(points) if with_points else None,
        **{k: torch.from_numpy(v) for k, v in out.items()},
        steps=steps,
    )
