"""Soft connectome (-> hard as T -> 0, gradients) and the connectome losses."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from connectome_data import FIXTURES

from invtract.errors import ConfigError, ShapeError
from invtract.io.image import load_image
from invtract.io.tractogram import load_tractogram
from invtract.losses.connectome import (
    connectome_correlation,
    connectome_loss,
    connectome_matrix,
    soft_connectome,
)


def _tiny_case(seed: int = 0):
    """A 5 x 4 x 3 grid (oblique 2 mm affine) with labels 1..3 and four 3-vertex streamlines."""
    rng = np.random.default_rng(seed)
    labels = np.zeros((5, 4, 3), np.int64)
    labels[:2, :, :] = 1
    labels[3:, :2, :] = 2
    labels[3:, 2:, 1:] = 3
    c, s = np.cos(0.2), np.sin(0.2)
    affine = np.array([[2 * c, -2 * s, 0, -4.0], [2 * s, 2 * c, 0, -3.0], [0, 0, 2, -2.0],
                       [0, 0, 0, 1]])  # fmt: skip
    vox = rng.uniform([-0.8, -0.8, -0.8], [4.8, 3.8, 2.8], size=(4, 3, 3))
    pts = vox @ affine[:3, :3].T + affine[:3, 3]
    return torch.tensor(pts, dtype=torch.float64), (labels, affine)


@pytest.mark.parametrize("case", ["phantom_cross90", "real_msmt15"])
def test_soft_tends_to_hard(case, shared_data):
    sl = load_tractogram(shared_data / case / "whole.tck").to(dtype=torch.float64)
    sl = sl.select(torch.arange(0, len(sl), 3))
    labels = load_image(FIXTURES / f"{case}_parc.nii.gz")
    hard = connectome_matrix(sl, labels, keep_unassigned=True)
    errors = []
    for T in (1.0, 0.1, 1e-2, 1e-4):
        soft = soft_connectome(sl, None, labels, T, keep_unassigned=True).numpy()
        np.testing.assert_allclose(soft.sum(), len(sl), rtol=1e-12)
        errors.append(np.abs(soft - hard).sum())
    assert all(b <= a + 1e-9 for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.05 * max(1.0, errors[0] / 100), errors  # only near-ties left
    np.testing.assert_array_equal(np.round(soft), hard)


def test_soft_padded_equals_packed_and_layout_options():
    pts, labels = _tiny_case()
    lengths = torch.tensor([3, 2, 3, 1])
    from invtract.streamlines import Streamlines

    sl = Streamlines.from_padded(pts, lengths)
    for kw in ({}, {"symmetric": True}, {"zero_diagonal": True, "keep_unassigned": True}):
        a = soft_connectome(pts, lengths, labels, 0.5, 3.0, **kw)
        b = soft_connectome(sl, None, labels, 0.5, 3.0, **kw)
        torch.testing.assert_close(a, b)
    hard = connectome_matrix(sl, labels, 3.0, symmetric=True)
    soft = soft_connectome(sl, None, labels, 1e-4, 3.0, symmetric=True)
    np.testing.assert_allclose(soft.numpy(), hard, atol=1e-9)


def test_gradcheck_soft_connectome():
    pts, labels = _tiny_case(1)
    pts = pts.clone().requires_grad_(True)
    weights = torch.tensor([1.0, 0.7, 1.3, 0.4], dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([3, 2, 3, 3])

    def f(p, w):
        return soft_connectome(p, lengths, labels, 1.5, 3.0, w, keep_unassigned=True)

    assert torch.autograd.gradcheck(f, (pts, weights), eps=1e-6, atol=1e-7)
    out = f(pts, weights).sum()
    (g,) = torch.autograd.grad(out, pts)
    assert torch.all(g[1, 2] == 0)  # beyond the streamline's length: no gradient
    assert torch.all(g[:, 1][[0, 2, 3]] == 0)  # interior vertices: no gradient


@pytest.mark.parametrize("kind", ["correlation", "frobenius"])
@pytest.mark.parametrize("normalise", ["counts", "density", "row"])
def test_gradcheck_losses(kind, normalise):
    g = torch.Generator().manual_seed(0)
    pred = torch.triu(torch.rand(5, 5, generator=g, dtype=torch.float64) + 0.1)
    target = torch.triu(torch.rand(5, 5, generator=g, dtype=torch.float64) * 10)
    pred.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda p: connectome_loss(p, target, kind=kind, normalise=normalise), (pred,)
    )
    # upper-triangular and symmetric layouts of the same connectome give the same loss
    sym = target + torch.triu(target, 1).T
    assert torch.isclose(
        connectome_loss(sym, target, kind, normalise), torch.zeros((), dtype=torch.float64),
        atol=1e-6,
    )  # fmt: skip


def test_loss_through_soft_connectome_decreases():
    pts, labels = _tiny_case(2)
    target = connectome_matrix([p.numpy() for p in pts], labels, 3.0)
    pts = pts + 0.8 * torch.randn(pts.shape, generator=torch.Generator().manual_seed(3))
    pts = pts.double().requires_grad_(True)
    loss0 = connectome_loss(soft_connectome(pts, None, labels, 1.0, 3.0), target, "frobenius")
    loss0.backward()
    with torch.no_grad():
        stepped = pts - 0.05 * pts.grad
    loss1 = connectome_loss(soft_connectome(stepped, None, labels, 1.0, 3.0), target, "frobenius")
    assert loss1.item() < loss0.item()


def test_connectome_correlation():
    a = np.triu(np.arange(16.0).reshape(4, 4))
    assert connectome_correlation(a, 2 * a + 1) == pytest.approx(1.0)
    assert connectome_correlation(a, a + np.triu(a, 1).T) == pytest.approx(1.0)
    assert connectome_correlation(torch.tensor(a), -a) == pytest.approx(-1.0)
    assert np.isnan(connectome_correlation(np.ones((3, 3)), a[:3, :3]))
    loss = connectome_loss(torch.tensor(a), 3 * a)
    assert float(loss) == pytest.approx(0.0, abs=1e-12)


def test_soft_and_loss_errors():
    pts, labels = _tiny_case()
    with pytest.raises(ConfigError):
        soft_connectome(pts, None, labels, 0.0)
    with pytest.raises(ShapeError):
        soft_connectome(pts[0], None, labels, 1.0)
    with pytest.raises(ShapeError):
        soft_connectome(pts, torch.tensor([3, 3]), labels, 1.0)
    with pytest.raises(ShapeError):
        connectome_loss(torch.zeros(3, 3), torch.zeros(4, 4))
    with pytest.raises(ConfigError):
        connectome_loss(torch.zeros(3, 3), torch.zeros(3, 3), kind="l1")
    with pytest.raises(ConfigError):
        connectome_loss(torch.zeros(3, 3), torch.zeros(3, 3), normalise="max")
