"""The ``triton`` engine: the fused Triton kernel of :mod:`invtract.tracking.fused_triton`
behind the common engine interface, with its fallback where Triton cannot run."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
import torch

from ...errors import ConfigError, InvtractWarning
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
    batch_size: int | None = None,
    progress: Callable[[int], None] | None = None,
    act=None,
) -> EngineResult:
    """Track with the Triton kernel; without a usable Triton, another engine, with a warning.

    The kernel covers every SD_Stream rule (first order and RK4, downsampling, regions, see
    :func:`~invtract.tracking.fused_triton.supported`) and, with ``act`` (an
    :class:`~invtract.tracking.act.ActImage`; ``params`` carrying ACT's defaults), ACT's. Without
    a usable Triton (no CUDA and the interpreter off) the numba engine tracks when the field is
    on the CPU and numba is available, otherwise the torch engine.

    Raises:
        ConfigError: for an unbounded ``max_points`` (``downsample x angle >= 360 deg``),
            which no fused engine can buffer (numba refuses it too).
    """
    from .. import fused_triton
    from . import get_engine, numba_available

    rois = rois or RoiSet()
    if not fused_triton.supported(params, rois, act):
        raise ConfigError(
            f"triton engine: max_points={int(params.max_points)} is unbounded (downsample "
            f"{params.downsample} x angle {params.angle_deg} deg >= 360 deg); use a smaller "
            "angle or downsampling factor"
        )
    reason = fused_triton.unavailable_reason()
    if reason is not None:
        name = "numba" if field.device.type == "cpu" and numba_available() else "torch"
        warnings.warn(f"triton engine: {reason}; using the {name} engine", InvtractWarning, 2)
        extra = {} if act is None else {"act": act}
        return get_engine(name)(field, seeds, init_dirs, params, rois, progress=progress, **extra)
    sh = field.sh_flat.detach().reshape(*field.shape, -1)
    s2v = field.scanner2voxel.detach().cpu().numpy()
    out = fused_triton.track_fused_triton(
        sh, s2v, seeds, init_dirs, params, rois, chunk_size=batch_size, act=act
    )
    if progress is not None:
        progress(int(np.asarray(out.lengths).shape[0]))
    return out
