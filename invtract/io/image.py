"""Images: FODs and masks from NIfTI (nibabel) and MRtrix .mif/.mih.

PLACEHOLDER: minimal NIfTI-only version; the io helper replaces it.
"""

from __future__ import annotations

from dataclasses import dataclass

import nibabel as nib
import numpy as np

__all__ = ["Image", "load_image", "load_fod", "load_mask"]


@dataclass
class Image:
    """A 3-D or 4-D image on a voxel grid.

    Attributes:
        data: ``[X, Y, Z]`` or ``[X, Y, Z, K]`` array (float32 for FODs, bool for masks).
        affine: ``[4, 4]`` float64, voxel indices (centres at integers) -> scanner mm (RAS+).
        voxel_sizes: ``(3,)`` voxel sizes in mm (pixdim).
        path: source file, if any.
    """

    data: np.ndarray
    affine: np.ndarray
    voxel_sizes: tuple
    path: str | None = None

    @property
    def shape(self) -> tuple:
        return self.data.shape

    @property
    def scanner2voxel(self) -> np.ndarray:
        """``[3, 4]`` float64 inverse of the affine."""
        return np.linalg.inv(self.affine)[:3]


def load_image(path) -> Image:
    img = nib.load(str(path))
    data = np.asarray(img.get_fdata(dtype=np.float32))
    return Image(data, np.asarray(img.affine, np.float64), tuple(img.header.get_zooms()[:3]), str(path))


def load_fod(path, sh_basis: str = "mrtrix") -> Image:
    return load_image(path)


def load_mask(path) -> Image:
    im = load_image(path)
    d = im.data
    return Image(np.isfinite(d) & (np.abs(d) >= 0.5), im.affine, im.voxel_sizes, im.path)
