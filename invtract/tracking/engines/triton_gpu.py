"""The ``triton`` engine: the fused Triton kernel of :mod:`invtract.tracking.fused_triton`
behind the common engine interface, with its fallback for what the kernel does not cover."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
import torch

from ...errors import InvtractWarning
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
) -> EngineResult:
    """Track with the Triton kernel; unsupported configurations fall back, with a warning.

    RK4, downsampling and regions (see :func:`~invtract.tracking.fused_triton.supported`), or
    no usable Triton, run on the numba engine when the field is on the CPU and numba is
    available, otherwise on the torch engine.
    """
    from .. import fused_triton
    from . import get_engine, numba_available

    rois = rois or RoiSet()
    if not fused_triton.supported(params, rois) or not fused_triton.available():
        why = fused_triton.unavailable_reason() or "RK4 / downsample / ROIs are not in the kernel"
        name = "numba" if field.device.type == "cpu" and numba_available() else "torch"
        warnings.warn(f"triton engine: {why}; using the {name} engine", InvtractWarning, 2)
        return get_engine(name)(field, seeds, init_dirs, params, rois, progress=progress)
    sh = field.sh_flat.detach().reshape(*field.shape, -1)
    s2v = field.scanner2voxel.detach().cpu().numpy()
    out = fused_triton.track_fused_triton(
        sh, s2v, seeds, init_dirs, params, rois, chunk_size=batch_size
    )
    if progress is not None:
        progress(int(np.asarray(out.lengths).shape[0]))
    return out
