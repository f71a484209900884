"""An FOD image on a device, ready for sampling and peak finding."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..io.geometry import scanner2voxel
from .interp import sample_fod
from .peaks import mrtrix_peak
from .sh import lmax_from_n

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
    """

    sh_flat: torch.Tensor
    shape: tuple
    scanner2voxel: torch.Tensor
    nonzero_flat: torch.Tensor
    lmax: int

    @classmethod
    def from_array(
        cls,
        sh: np.ndarray | torch.Tensor,
        affine: np.ndarray,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> FODField:
        """Build from an ``[X, Y, Z, K]`` array and its ``[4, 4]`` voxel->scanner affine.

        If ``sh`` is a tensor that requires grad, the field stays differentiable w.r.t. it.
        """
        sh_t = torch.as_tensor(sh)
        if not torch.is_tensor(sh):
            sh_t = sh_t.clone()
        sh_t = sh_t.to(device=device, dtype=dtype)
        shape = tuple(int(s) for s in sh_t.shape[:3])
        K = int(sh_t.shape[3])
        flat = sh_t.reshape(-1, K)
        s2v = torch.as_tensor(scanner2voxel(affine), device=device)
        nonzero = (flat.detach() != 0).any(-1)
        return cls(flat, shape, s2v, nonzero, lmax_from_n(K))

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
