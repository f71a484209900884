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


def gradcheck_case(**params):
    """The gradient checks' short tracks on the 4x4x4 bending-fibre phantom (float64).

    Returns:
        ``(sh [4, 4, 4, 15], affine [4, 4], seed [1, 3] (mm), dirs [1, 3] (+z), params, mask)``:
        :class:`~invtract.params.TrackingParameters` with a 0.5 mm step and lengths of
        0.5 to 3.1 mm (``params`` add to or override them; unresolved), and ``mask [4, 4, 4]``
        bool, the learned voxels ``[1:3, 1:3, 1:3]``.
    """
    from invtract.params import TrackingParameters

    sh, affine = bending_fibre_fod((4, 4, 4))
    seed = torch.tensor([[0.37, 0.21, -0.4]], dtype=torch.float64)
    dirs = torch.tensor([[0.0, 0.0, 1.0]], dtype=torch.float64)
    params = TrackingParameters(**{"step_mm": 0.5, "min_length_mm": 0.5, "max_length_mm": 3.1,
                                   **params})  # fmt: skip
    mask = torch.zeros(sh.shape[:3], dtype=torch.bool)
    mask[1:3, 1:3, 1:3] = True
    return sh, affine, seed, dirs, params, mask


def gradcheck_fod_seed_step(case, check=None) -> bool:
    """``torch.autograd.gradcheck`` (float64, fast mode) of the efficient path's points and
    weights (``refine=4``, ``temperature=0.2``) w.r.t. the learned voxels' coefficients, the
    seed and the step, for ``case`` (:func:`gradcheck_case`'s, with resolved parameters);
    ``check(result, seed)`` may assert on every tracking result."""
    from invtract.fod.field import FODField
    from invtract.tracking.differentiable import track_differentiable

    sh, affine, seed, dirs, params, mask = case

    def f(learn, seed, h):
        full = torch.where(mask[..., None], learn, sh)
        r = track_differentiable(
            FODField.from_array(full, affine), seed, dirs, params, step_mm=h, refine=4,
            temperature=0.2,
        )  # fmt: skip
        if check is not None:
            check(r, seed)
        return r.points[r.mask], r.weights[r.mask]

    learn = sh.clone().requires_grad_(True)
    seed = seed.clone().requires_grad_(True)
    h = torch.tensor(float(params.step_mm), dtype=torch.float64, requires_grad=True)
    return torch.autograd.gradcheck(f, (learn, seed, h), eps=1e-6, atol=1e-6, fast_mode=True)
