"""An FOD image on a device, ready for sampling and peak finding: the one FOD type that
carries the coefficients with their geometry (affine, voxel sizes, scanner->voxel)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..io.geometry import scanner2voxel
from .interp import sample_fod
from .peaks import mrtrix_peak
from .sh import lmax_from_n

if TYPE_CHECKING:  # annotations only
    from ..io.image import Image

__all__ = ["FODField"]


@dataclass
class FODField:
    """SH coefficients on a voxel grid, flattened for gathers.

    Attributes:
        sh_flat: ``[X*Y*Z, K]`` coefficients (MRtrix3 basis, scanner frame).
        shape: (X, Y, Z).
        scanner2voxel: ``[3, 4]`` float64 tensor (scanner mm -> voxel coordinates).
        nonzero_flat: ``[X*Y*Z]`` bool, the voxel has a non-zero (or NaN) coefficient.
        lmax: SH degree.
        affine: ``[4, 4]`` float64 numpy, voxel index -> scanner mm (RAS+), when built from
            one (:meth:`from_image`, :meth:`from_array`); None for a field made from a
            scanner->voxel transform alone.
        voxel_sizes: ``(3,)`` voxel sizes in mm (the image's own for :meth:`from_image`, the
            affine's column norms for :meth:`from_array` unless given); None with ``affine``.
    """

    sh_flat: torch.Tensor
    shape: tuple
    scanner2voxel: torch.Tensor
    nonzero_flat: torch.Tensor
    lmax: int
    affine: np.ndarray | None = None
    voxel_sizes: tuple | None = None

    @classmethod
    def from_image(
        cls,
        image: Image,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> FODField:
        """Build from a loaded FOD :class:`~invtract.io.image.Image` (``data`` ``[X, Y, Z, K]``),
        carrying its affine and voxel sizes.

        The coefficients are copied at most once: not at all when ``image.data`` already is a
        C-ordered array of ``dtype`` in memory on the CPU (the field then shares it); once into
        C order otherwise (e.g. a memory-mapped ``.mif`` or an FOD stored as MRtrix stores it,
        ``+1,+2,+3,+0``, since the gathers index voxels in C order).
        """
        return cls.from_array(
            image.data, image.affine, device, dtype, voxel_sizes=image.voxel_sizes, copy=False
        )

    @classmethod
    def from_array(
        cls,
        sh: np.ndarray | torch.Tensor,
        affine: np.ndarray,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        voxel_sizes: tuple | None = None,
        copy: bool = True,
    ) -> FODField:
        """Build from an ``[X, Y, Z, K]`` array and its ``[4, 4]`` voxel->scanner affine.

        A numpy ``sh`` is copied once into a C-ordered tensor of ``dtype`` (with ``copy=False``
        only if it is not one already: the field may then share it). If ``sh`` is a tensor
        that requires grad, the field stays differentiable w.r.t. it. ``voxel_sizes`` (mm)
        default to the affine's column norms.
        """
        if torch.is_tensor(sh):
            sh_t = sh.to(device=device, dtype=dtype)
        else:
            sh_t = _numpy_to_tensor(sh, dtype, copy).to(device=device)
        shape = tuple(int(s) for s in sh_t.shape[:3])
        K = int(sh_t.shape[3])
        flat = sh_t.reshape(-1, K)
        affine = np.array(affine, np.float64)
        s2v = torch.as_tensor(scanner2voxel(affine), device=device)
        nonzero = (flat.detach() != 0).any(-1)
        if voxel_sizes is None:
            voxel_sizes = np.linalg.norm(affine[:3, :3], axis=0)
        sizes = tuple(float(v) for v in voxel_sizes[:3])
        return cls(flat, shape, s2v, nonzero, lmax_from_n(K), affine, sizes)

    @property
    def sh(self) -> torch.Tensor:
        """``[X, Y, Z, K]`` view of the coefficients."""
        return self.sh_flat.reshape(*self.shape, -1)

    @property
    def device(self) -> torch.device:
        return self.sh_flat.device

    @property
    def dtype(self) -> torch.dtype:
        return self.sh_flat.dtype

    def sample(self, pos_mm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(coeffs [N, K], valid [N])`` at scanner points ``[N, 3]`` (see ``sample_fod``)."""
        return sample_fod(
            self.sh_flat, self.shape, self.scanner2voxel, pos_mm, nonzero_flat=self.nonzero_flat
        )

    def peak(self, coeffs: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """MRtrix peak ascent (no grad): ``(amplitude [N], direction [N, 3])``."""
        return mrtrix_peak(coeffs.detach(), u.detach(), self.lmax)


def _numpy_to_tensor(sh: np.ndarray, dtype: torch.dtype, copy: bool) -> torch.Tensor:
    """One C-ordered CPU tensor of ``dtype`` from a numpy array: one copy at most (none when
    ``copy`` is False and ``sh`` is already such an array in memory)."""
    np_dtype = torch.empty((), dtype=dtype).numpy().dtype
    arr = np.asarray(sh)
    mapped = isinstance(arr, np.memmap) or isinstance(arr.base, np.memmap)
    if not copy and not mapped and arr.dtype == np_dtype and arr.flags.c_contiguous:
        if arr.flags.writeable:
            return torch.from_numpy(arr)
    out = torch.empty(arr.shape, dtype=dtype)
    out.numpy()[...] = arr  # any strides / dtype, straight into the result
    return out
