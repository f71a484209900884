"""One FOD type (issue 13): the public tracking and fitting functions take an ``FODField``
(coefficients, affine and header voxel sizes in one object) and nothing beside it; tckgen's
defaults come from the header voxel sizes whichever function tracks; gradients reach learnable
coefficients through the field."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
from phantoms import bending_fibre_fod, gradcheck_case

import invtract
from invtract.errors import ShapeError
from invtract.fit.connectome_fit import fit_connectome
from invtract.fit.optimise import fit
from invtract.fod.field import FODField
from invtract.io.image import Image
from invtract.params import TrackingParameters
from invtract.tracking.api import Seeding, track
from invtract.tracking.chunked import accumulate_gradients, accumulate_map_gradients
from invtract.tracking.differentiable import track_differentiable

#: the header's voxel size (mm) and the affine's column norm one float32 ulp above it
HEADER_MM = 2.0
NORM_MM = HEADER_MM * (1.0 + 2.0**-23)


@pytest.mark.parametrize(
    "fn",
    [
        invtract.track,
        track,
        track_differentiable,
        fit,
        fit_connectome,
        accumulate_gradients,
        accumulate_map_gradients,
    ],  # fmt: skip
)
def test_public_functions_take_the_fod_alone(fn):
    names = list(inspect.signature(fn).parameters)
    assert not {"voxel_sizes", "affine", "field", "sh"} & set(names), names
    assert "fod" in names[:3]


def _field(shape=(8, 8, 8)) -> FODField:
    """The bending-fibre phantom (float32) whose header voxel sizes (2 mm) differ from its
    affine's column norms in the last float32 bit, as NIfTI pixdim and sform often do."""
    sh, affine = bending_fibre_fod(shape)
    affine = affine.copy()
    affine[:3, :3] *= NORM_MM / HEADER_MM
    return FODField.from_array(sh.float(), affine, voxel_sizes=(HEADER_MM,) * 3)


def _seeds():
    """``[4, 3]`` seeds (mm) where the fibre runs near z, and their initial directions."""
    seeds = torch.tensor([[-2.0, -1.0, 0.5], [-1.5, 0.2, 1.0], [-2.5, 1.0, -0.5], [0.3, 2.0, 4.0]])
    dirs = torch.tensor([[0.1, 0.2, 1.0]]).expand(4, 3).contiguous()
    return seeds, dirs


def test_default_step_comes_from_the_header_in_every_function():
    field = _field()
    assert field.header_voxel_sizes == (HEADER_MM,) * 3
    params = TrackingParameters(min_length_mm=1.0)
    h_header = params.resolve((HEADER_MM,) * 3).step_mm
    h_norm = params.resolve((NORM_MM,) * 3).step_mm
    assert h_header != h_norm  # the two conventions give different tckgen defaults
    seeds, dirs = _seeds()

    def diff(step=None):
        p = params if step is None else params.replace(step_mm=step)
        return track_differentiable(field, seeds, dirs, p).points

    got = diff()
    assert got.shape[0] == 4 and torch.equal(got, diff(h_header))
    other = diff(h_norm)
    assert got.shape != other.shape or not torch.equal(got, other)
    hard = track(field, Seeding("list", positions=seeds.numpy(), directions=dirs.numpy()), params)
    assert hard.params.step_mm == h_header
    pts = hard.streamlines.to_padded()[0]
    np.testing.assert_array_equal(pts.numpy(), got.detach().numpy())  # bit for bit
    res = fit(field, hard.streamlines, params, seeding=Seeding("list", positions=seeds.numpy(),
              directions=dirs.numpy()), learn=("step_mm",), steps=0)  # fmt: skip
    assert np.float32(res.params.step_mm) == np.float32(h_header)


def test_image_and_field_track_alike():
    """An Image is tracked as ``FODField.from_image`` (its header voxel sizes, float32)."""
    field = _field()
    img = Image(field.sh.numpy(), field.affine, field.voxel_sizes)
    seeds, dirs = _seeds()
    a = track_differentiable(img, seeds, dirs, TrackingParameters(min_length_mm=1.0))
    b = track_differentiable(field, seeds, dirs, TrackingParameters(min_length_mm=1.0))
    assert torch.equal(a.points, b.points) and torch.equal(a.weights, b.weights)


def test_gradients_reach_learnable_coefficients_through_the_field():
    sh, affine, seed, dirs, params, mask = gradcheck_case()  # float64
    base = FODField.from_array(sh, affine)
    assert base.dtype == torch.float64

    def f(learn):
        fod = base.with_sh(torch.where(mask[..., None], learn, sh))
        r = track_differentiable(fod, seed, dirs, params, refine=4, temperature=0.2)
        return r.points[r.mask], r.weights[r.mask]

    learn = sh.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(f, (learn,), eps=1e-6, atol=1e-6, fast_mode=True)
    pts, w = f(learn)
    (pts.sum() + w.sum()).backward()
    assert float(learn.grad[mask].abs().sum()) > 0 and float(learn.grad[~mask].abs().sum()) == 0


def test_with_sh_shares_the_tensor_and_checks_the_grid():
    field = _field((4, 4, 4))
    learn = field.sh.clone().requires_grad_(True)
    g = field.with_sh(learn)
    assert g.sh_flat.data_ptr() == learn.data_ptr() and g.requires_grad
    assert g.voxel_sizes == field.voxel_sizes and g.affine is field.affine
    assert g.detach().sh_flat.data_ptr() == learn.data_ptr() and not g.detach().requires_grad
    with pytest.raises(ShapeError, match="grid"):
        field.with_sh(torch.zeros(4, 4, 5, 15))


def test_with_sh_changed_voxels_update_the_nonzero_mask_as_a_full_pass():
    field = _field((4, 4, 4))
    sh = field.sh.clone()
    sh[0, 0, 0] = 0.0  # a voxel the change empties
    sh[1, 2, 3] += 1.0
    changed = torch.tensor([0, 1 * 16 + 2 * 4 + 3, 5])
    fast, full = field.with_sh(sh, changed=changed), field.with_sh(sh)
    assert not bool(full.nonzero_flat[0]) and bool(field.nonzero_flat[0])
    assert torch.equal(fast.nonzero_flat, full.nonzero_flat)
    assert bool(field.nonzero_flat[0])  # the original field's mask is left as it was


def test_bare_coefficients_in_the_old_calling_form_get_a_clear_error():
    """``track_differentiable(sh, affine, seeds, dirs)`` (the form before the one FOD type)
    raises one ConfigError that names the fix, before any tracking."""
    from invtract.errors import ConfigError

    sh = torch.zeros(4, 4, 4, 15)
    sh[..., 0] = 1.0
    seeds = torch.zeros(2, 3)
    with pytest.raises(ConfigError, match=r"FODField\.from_array\(sh, affine\)"):
        track_differentiable(sh, np.eye(4), seeds, torch.ones(2, 3))
    res = track_differentiable((sh, np.eye(4)), seeds + 1.5, torch.ones(2, 3))
    assert res.points.shape[0] <= 2
