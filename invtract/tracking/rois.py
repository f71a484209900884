"""Region-of-interest membership tests (``-include``, ``-exclude``, ``-mask``), batched.

Convention (``src/dwi/tractography/roi.h``, ``roi.cpp``): an image ROI is MRtrix's ``Mask``:
the image cropped to the bounding box of its true voxels plus a one-voxel margin, with the
crop's scanner->voxel transform (tckgen holds it as float32); it contains p when the nearest
voxel (std::round, halves away from zero) is inside the crop and true. A sphere contains p
when |p - centre|^2 <= r^2.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..errors import ConfigError
from ..io.geometry import scanner2voxel, subset_transform, true_voxel_box, voxel2scanner
from .seeding import _split_affine
from .types import ImageRoi, SphereRoi

if TYPE_CHECKING:  # torch is imported where the batched tests run, not on import
    import torch

    from ..io.image import Image

__all__ = ["image_roi", "roi_contains", "any_contains"]


def image_roi(image: Image, name: str = "") -> ImageRoi:
    """An :class:`ImageRoi` exactly as tckgen builds its ``Mask`` from a mask image.

    Args:
        image: a mask from :func:`invtract.io.image.load_mask` (bool ``[X, Y, Z]`` in MRtrix's
            realigned axes, with its header ``transform`` and voxel sizes).
        name: text for the ``.tck`` header.

    Raises:
        ConfigError: the mask has no true voxel (tckgen refuses it too).

    Returns:
        The ROI on the cropped grid, ``scanner2voxel`` ``[3, 4]`` float64 of the crop (Eigen's
        inverse; the engines cast it to float32 as tckgen does).
    """
    mask = np.asarray(image.data, bool)
    if not mask.any():
        raise ConfigError(f"cannot use image {image.path or name} as ROI: image is empty")
    if image.transform is not None:
        T, spacing = image.transform, image.voxel_sizes
    else:
        T, spacing = _split_affine(image.affine)
    start, size = true_voxel_box(mask)
    crop = mask[tuple(slice(a, a + n) for a, n in zip(start, size))]
    s2v = scanner2voxel(voxel2scanner(subset_transform(T, spacing, start), spacing))
    return ImageRoi(np.ascontiguousarray(crop), s2v, name)


def roi_contains(roi, pos_mm: torch.Tensor) -> torch.Tensor:
    """``[N]`` bool: whether each scanner point ``[N, 3]`` lies in ``roi``."""
    import torch

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
    import torch

    out = torch.zeros(pos_mm.shape[0], dtype=torch.bool, device=pos_mm.device)
    for roi in rois:
        out |= roi_contains(roi, pos_mm)
    return out
