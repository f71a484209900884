"""Small synthetic FODs shared by the tracking tests."""

from __future__ import annotations

import numpy as np
import torch

from invtract.fod.sh import sh_basis


def bending_fibre_fod(shape=(4, 4, 4), dtype=torch.float64):
    """A bending single-fibre FOD (lmax 4) on a 2 mm grid: direction turns with x."""
    ijk = torch.stack(torch.meshgrid(*[torch.arange(s) for s in shape], indexing="ij"), -1)
    ang = 0.25 * ijk[..., 0].to(torch.float64) + 0.1 * ijk[..., 1]
    d = torch.stack([torch.sin(ang), 0.2 * torch.ones_like(ang), torch.cos(ang)], -1)
    d = torch.nn.functional.normalize(d, dim=-1)
    sh = sh_basis(d, 4) + 0.02 * sh_basis(torch.tensor([1.0, 0.0, 0.0]).double(), 4)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = [-3.1, -2.9, -3.05]
    return sh.to(dtype), affine
