"""A field's learned rows (``FODField.with_rows``) as the differentiable FOD input: gradients
w.r.t. the rows only, equal to the whole-coefficient gradient gathered at the learned voxels."""

from __future__ import annotations

import pytest
import torch
from phantoms import bending_fibre_fod as _phantom
from phantoms import gradcheck_case

from invtract.fod.field import FODField
from invtract.params import TrackingParameters
from invtract.tracking import adjoint_cpu, differentiable
from invtract.tracking.differentiable import track_differentiable

AXIS = torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64)


def _loss(res):
    return ((res.points.double() @ AXIS) * res.weights.double()).sum()


def _setup(n_seeds=7, dtype=torch.float64):
    sh, affine = _phantom((6, 6, 6))
    g = torch.Generator().manual_seed(5)
    seeds = ((torch.rand(n_seeds, 3, generator=g, dtype=torch.float64) - 0.5) * 6.0).to(dtype)
    dirs = torch.tensor([[0.0, 0.0, 1.0]] * n_seeds, dtype=dtype)
    params = TrackingParameters(step_mm=0.3, min_length_mm=0.5, max_length_mm=30.0).resolve(
        (2.0, 2.0, 2.0)
    )
    mask = torch.zeros(sh.shape[:3], dtype=torch.bool)
    mask[1:5, 1:5, 2:5] = True  # learned voxels; the tracks also touch voxels outside
    voxels = torch.nonzero(mask.reshape(-1)).flatten()
    return sh.to(dtype), affine, seeds, dirs, params, voxels


def _full_grad(sh, affine, seeds, dirs, params, path="efficient"):
    shg = sh.clone().requires_grad_(True)
    res = track_differentiable(
        FODField.from_array(shg, affine), seeds, dirs, params, temperature=0.2, path=path
    )
    _loss(res).backward()
    return res, shg.grad.reshape(-1, sh.shape[-1])


def _rows_grad(sh, affine, seeds, dirs, params, voxels, path="efficient"):
    base = FODField.from_array(sh.clone(), affine)
    rows = sh.reshape(-1, sh.shape[-1])[voxels].clone().requires_grad_(True)
    fod = base.with_rows(voxels, rows)
    res = track_differentiable(fod, seeds, dirs, params, temperature=0.2, path=path)
    _loss(res).backward()
    return res, rows.grad


def _rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / a.abs().max().clamp_min(1e-300))


def test_with_rows_writes_in_place_and_remembers_the_rows():
    sh, affine, _, _, _, voxels = _setup()
    base = FODField.from_array(sh.clone(), affine)
    rows = torch.zeros(voxels.numel(), sh.shape[-1], dtype=sh.dtype, requires_grad=True)
    fod = base.with_rows(voxels, rows)
    assert fod.sh_flat.data_ptr() == base.sh_flat.data_ptr()  # no copy of the grid
    assert torch.equal(base.sh_flat[voxels], torch.zeros_like(rows))  # written in place
    others = torch.ones(sh.reshape(-1, sh.shape[-1]).shape[0], dtype=torch.bool)
    others[voxels] = False
    assert torch.equal(base.sh_flat[others], sh.reshape(-1, sh.shape[-1])[others])
    assert not fod.nonzero_flat[voxels].any() and fod.nonzero_flat[others].any()
    assert fod.requires_grad and not fod.sh_flat.requires_grad
    assert fod.detach().learned is None and not fod.detach().requires_grad
    # another dtype: one differentiable copy whose gradient still reaches the rows
    f32 = fod.to(dtype=torch.float32)
    assert f32.learned is None and f32.sh_flat.requires_grad
    f32.sh_flat[voxels].sum().backward()
    assert torch.equal(rows.grad, torch.ones_like(rows))


@pytest.mark.parametrize("backend", ["numba", "torch"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_rows_gradient_equals_full_gradient_at_the_voxels(monkeypatch, backend, dtype):
    if backend == "numba" and not adjoint_cpu.available():
        pytest.skip("numba not available")
    monkeypatch.setattr(differentiable, "ADJOINT_BACKEND", backend)
    sh, affine, seeds, dirs, params, voxels = _setup(dtype=dtype)
    res_f, g_full = _full_grad(sh, affine, seeds, dirs, params)
    res_r, g_rows = _rows_grad(sh, affine, seeds, dirs, params, voxels)
    assert torch.equal(res_f.points, res_r.points) and torch.equal(res_f.weights, res_r.weights)
    assert g_rows.shape == (voxels.numel(), sh.shape[-1]) and g_rows.dtype == dtype
    # the tracks touch learned and unlearned voxels: both gradients are non-trivial
    others = torch.ones(g_full.shape[0], dtype=torch.bool)
    others[voxels] = False
    assert g_full[others].abs().max() > 0 and g_rows.abs().max() > 0
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    assert _rel(g_full[voxels], g_rows) <= tol
    # several threads' buffers give the same rows gradient
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    _, g3 = _rows_grad(sh, affine, seeds, dirs, params, voxels)
    assert _rel(g_rows, g3) <= tol


def test_rows_plain_path_equals_efficient_path_float64():
    sh, affine, seeds, dirs, params, voxels = _setup()
    _, ga = _rows_grad(sh, affine, seeds, dirs, params, voxels, path="plain")
    _, gb = _rows_grad(sh, affine, seeds, dirs, params, voxels, path="efficient")
    assert ga.abs().max() > 0 and _rel(ga, gb) < 1e-6


def test_gradcheck_rows_efficient_path():
    sh, affine, seed, dirs, params, mask = gradcheck_case()
    params = params.resolve((2.0, 2.0, 2.0))
    voxels = torch.nonzero(mask.reshape(-1)).flatten()

    def f(rows):
        # a fresh buffer per call: the rows are written into it in place
        fod = FODField.from_array(sh.clone(), affine).with_rows(voxels, rows)
        r = track_differentiable(fod, seed, dirs, params, refine=4, temperature=0.2)
        return r.points[r.mask], r.weights[r.mask]

    rows = sh.reshape(-1, sh.shape[-1])[voxels].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(f, (rows,), eps=1e-6, atol=1e-6, fast_mode=True)


def test_rewriting_the_rows_before_backward_is_an_error():
    sh, affine, seeds, dirs, params, voxels = _setup()
    base = FODField.from_array(sh.clone(), affine)
    rows = sh.reshape(-1, sh.shape[-1])[voxels].clone().requires_grad_(True)
    res = track_differentiable(base.with_rows(voxels, rows), seeds, dirs, params)
    base.with_rows(voxels, rows.detach() * 2.0)  # the buffer changes under the saved graph
    with pytest.raises(RuntimeError, match="inplace"):
        _loss(res).backward()
