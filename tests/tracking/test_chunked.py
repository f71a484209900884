"""Gradient accumulation over chunks of seeds equals one pass over all seeds."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from phantoms import bending_fibre_fod

from invtract.fod.field import FODField
from invtract.params import TrackingParameters
from invtract.tracking.chunked import accumulate_gradients, accumulate_map_gradients
from invtract.tracking.differentiable import resolved_parameters, track_differentiable

AXIS = torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64)


def _phantom():
    """The bending-fibre phantom, 7 seeds inside it, a 12 mm maximum length."""
    sh, affine = bending_fibre_fod()
    rng = np.random.default_rng(3)
    seeds = torch.tensor(rng.uniform(-2.0, 2.0, (7, 3)))
    dirs = torch.tensor([[0.1, 0.2, 1.0]]).double().expand(7, 3).contiguous()
    params = TrackingParameters(max_length_mm=12.0, min_length_mm=1.0)
    return sh, affine, seeds, dirs, params


def _loss(res, start=0):
    return ((res.points @ AXIS) * res.weights).sum()


def _leaves(sh, seeds, dirs):
    """``(learn, seeds, dirs, step, cutoff)``: fresh copies of the inputs, the FOD, seeds,
    step and cutoff requiring grad."""
    step = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    cutoff = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    learn = sh.clone().requires_grad_(True)
    return learn, seeds.clone().requires_grad_(True), dirs.clone(), step, cutoff


def _inputs(leaves, affine):
    """The positional FOD, seeds and directions and the keyword arguments (step, cutoff,
    refine 2) of ``_leaves`` for track_differentiable and the chunked helpers."""
    learn, seeds, dirs, step, cutoff = leaves
    kwargs = dict(step_mm=step, cutoff=cutoff, refine=2)
    return (FODField.from_array(learn, affine), seeds, dirs), kwargs


def _one_pass(leaves, affine, params):
    """The reference: track_differentiable over all seeds at once."""
    args, kwargs = _inputs(leaves, affine)
    return track_differentiable(*args, params, **kwargs)


def _max_points(sh, affine, params) -> int:
    """The streamline points that the chunked helpers budget per seed (step 1 mm)."""
    return resolved_parameters(FODField.from_array(sh, affine), params, step_mm=1.0).max_points


def _assert_same_gradients(ours, ref):
    """The leaves' gradients (all but the directions, which get none) agree to rounding."""
    for a, b in zip(ours[:2] + ours[3:], ref[:2] + ref[3:]):
        assert a.grad is not None and b.grad is not None
        assert torch.allclose(a.grad, b.grad, rtol=1e-10, atol=1e-12)


def test_chunked_gradients_equal_one_pass():
    sh, affine, seeds, dirs, params = _phantom()
    ref = _leaves(sh, seeds, dirs)
    res = _one_pass(ref, affine, params)
    assert len(res.lengths) >= 5  # most seeds make streamlines
    total_ref = _loss(res)
    total_ref.backward()

    ours = _leaves(sh, seeds, dirs)
    starts, timings = [], {}

    def loss_fn(out, start):
        starts.append(start)
        return _loss(out)

    args, kwargs = _inputs(ours, affine)
    max_steps = 2 * _max_points(sh, affine, params)
    total = accumulate_gradients(
        loss_fn, *args, params, **kwargs, max_steps=max_steps, timings=timings
    )
    assert starts == [0, 2, 4, 6] and timings["chunks"] == 4  # 2 streamlines per chunk
    assert float(total) == pytest.approx(float(total_ref.detach()), rel=1e-12)
    _assert_same_gradients(ours, ref)
    assert float(ours[0].grad.abs().sum()) > 0 and float(ours[3].grad.abs()) > 0


def test_computed_inputs_are_back_propagated_once():
    """A learnable subset of voxels (``torch.where``) gets the accumulated gradient."""
    sh, affine, seeds, dirs, params = _phantom()
    mask = torch.zeros(sh.shape[:3], dtype=torch.bool)
    mask[1:4, 1:4, 1:4] = True
    learn = sh.clone().requires_grad_(True)
    full = torch.where(mask[..., None], learn, sh)
    accumulate_gradients(
        lambda out, s: _loss(out),
        FODField.from_array(full, affine),
        seeds,
        dirs,
        params,
        max_steps=1,
        refine=2,
    )
    learn_ref = sh.clone().requires_grad_(True)
    full_ref = torch.where(mask[..., None], learn_ref, sh)
    _loss(
        track_differentiable(FODField.from_array(full_ref, affine), seeds, dirs, params, refine=2)
    ).backward()
    assert torch.allclose(learn.grad, learn_ref.grad, rtol=1e-10, atol=1e-12)
    assert float(learn.grad[~mask].abs().sum()) == 0.0


def test_learned_rows_get_their_gradient_alone(monkeypatch):
    """A field of ``FODField.with_rows``: each chunk's FOD gradient is the rows' ``[n, K]``
    (no ``[X*Y*Z, K]`` copy of the coefficients), and the sum equals one pass."""
    sh, affine, seeds, dirs, params = _phantom()
    voxels = torch.arange(0, sh[..., 0].numel(), 3)  # every third voxel is learned

    def learned():
        rows = sh.reshape(-1, sh.shape[-1])[voxels].clone().requires_grad_(True)
        return FODField.from_array(sh.clone(), affine).with_rows(voxels, rows), rows

    fod_ref, rows_ref = learned()
    _loss(track_differentiable(fod_ref, seeds, dirs, params, refine=2)).backward()
    fod, rows = learned()

    def no_copy(self):
        raise AssertionError("the learned rows were spread over a copy of every coefficient")

    monkeypatch.setattr(FODField, "without_rows", no_copy)
    accumulate_gradients(
        lambda out, s: _loss(out), fod, seeds, dirs, params, max_steps=1, refine=2
    )
    assert rows.grad.shape == rows.shape and float(rows.grad.abs().sum()) > 0
    assert torch.allclose(rows.grad, rows_ref.grad, rtol=1e-10, atol=1e-12)


def _contribution(res, start=0):
    """An additive 'map' of the chunk: weighted sums of the x and y coordinates."""
    return torch.stack([(res.points[..., i] * res.weights).sum() for i in (0, 1)])


def _reduce(m):
    """Not a sum over streamlines: the squared distance of the whole map to a target."""
    return ((m - torch.tensor([3.0, -2.0], dtype=m.dtype)) ** 2).sum()


def test_map_gradients_equal_one_pass():
    sh, affine, seeds, dirs, params = _phantom()
    ref = _leaves(sh, seeds, dirs)
    loss_ref = _reduce(_contribution(_one_pass(ref, affine, params)))
    loss_ref.backward()

    ours = _leaves(sh, seeds, dirs)
    timings = {}
    args, kwargs = _inputs(ours, affine)
    max_steps = 3 * _max_points(sh, affine, params)
    loss = accumulate_map_gradients(
        _contribution, _reduce, *args, params, **kwargs, max_steps=max_steps, timings=timings
    )
    assert timings["chunks"] == 3 and timings["map_pass_s"] > 0
    assert float(loss) == pytest.approx(float(loss_ref.detach()), rel=1e-12)
    _assert_same_gradients(ours, ref)
    assert float(ours[0].grad.abs().sum()) > 0 and float(ours[4].grad.abs()) > 0
