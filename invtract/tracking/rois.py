"""Region-of-interest membership tests (``-include``, ``-exclude``, ``-mask``), batched.

Convention (``src/dwi/tractography/roi.h``): an image ROI contains p when the nearest voxel of
its own grid (std::round, halves away from zero) is inside the image and true; a sphere
contains p when |p - centre|^2 <= r^2.
"""

from __future__ import annotations

import numpy as np
import torch

from .types import ImageRoi, SphereRoi

__all__ = ["roi_contains", "any_contains"]


def roi_contains(roi, pos_mm: torch.Tensor) -> torch.Tensor:
    """``[N]`` bool: whether each scanner point ``[N, 3]`` lies in ``roi``."""
    if isinstance(roi, SphereRoi):
        c = torch.as_tensor(roi.centre, dtype=pos_mm.dtype, device=pos_mm.device)
        d = pos_mm - c
        d2 = d[:, 0] * d[:, 0] + (d[:, 1] * d[:, 1] + d[:, 2] * d[:, 2])
        return d2 <= float(np.float32(roi.radius) * np.float32(roi.radius))
    if isinstance(roi, ImageRoi):
        M = torch.as_tensor(roi.scanner2voxel, dtype=torch.float64, device=pos_mm.device)
        v = pos_mm.double() @ M[:, :3].T + M[:, 3]
        r = torch.sign(v) * torch.floor(torch.abs(v) + 0.5)
        shape = torch.tensor(roi.mask.shape[:3], device=pos_mm.device, dtype=torch.float64)
        ok = ((r >= 0) & (r < shape)).all(-1) & torch.isfinite(v).all(-1)
        ri = torch.where(ok[:, None], r, torch.zeros_like(r)).to(torch.int64)
        mask = torch.as_tensor(np.ascontiguousarray(roi.mask, dtype=bool), device=pos_mm.device)
        return ok & mask[ri[:, 0], ri[:, 1], ri[:, 2]]
    raise TypeError(f"unknown ROI type {type(roi).__name__}")


def any_contains(rois, pos_mm: torch.Tensor) -> torch.Tensor:
    """``[N]`` bool: the point lies in at least one of ``rois``."""
    out = torch.zeros(pos_mm.shape[0], dtype=torch.bool, device=pos_mm.device)
    for roi in rois:
        out |= roi_contains(roi, pos_mm)
    return out
