"""Length-distribution loss: W1 vs scipy, on real lengths, and gradcheck."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import wasserstein_distance

from invtract.errors import ShapeError
from invtract.losses import arc_lengths, length_loss, wasserstein_1d
from invtract.streamlines import Streamlines


def test_matches_scipy_weighted():
    rng = np.random.default_rng(0)
    u, v = rng.normal(30, 5, 100), rng.normal(35, 8, 77)
    uw, vw = rng.random(100), rng.random(77)
    t = torch.tensor
    assert float(wasserstein_1d(t(u), t(v))) == pytest.approx(wasserstein_distance(u, v), 1e-12)
    got = float(wasserstein_1d(t(u), t(v), t(uw), t(vw)))
    assert got == pytest.approx(wasserstein_distance(u, v, uw, vw), rel=1e-12)


def test_length_loss_on_real_bundles(shared_data):
    import nibabel as nib
    from dipy.tracking.streamline import length

    d = shared_data / "real_msmt15"
    a = [
        np.asarray(s, np.float64)
        for s in nib.streamlines.load(str(d / "bundleA_default.tck")).streamlines
    ]
    b = [
        np.asarray(s, np.float64)
        for s in nib.streamlines.load(str(d / "bundleA_cutoff0.3.tck")).streamlines
    ]
    sa = Streamlines.from_list(a, dtype=torch.float64)
    sb = Streamlines.from_list(b, dtype=torch.float64)
    ref = wasserstein_distance(length(a), length(b))
    assert float(length_loss(sa, sb)) == pytest.approx(ref, rel=1e-9)
    assert float(length_loss(sa, sa)) == pytest.approx(0.0, abs=1e-12)
    assert float(length_loss(arc_lengths(sa), arc_lengths(sb))) == pytest.approx(ref, rel=1e-9)


def test_exceptions():
    with pytest.raises(ShapeError):
        wasserstein_1d(torch.zeros(0), torch.ones(3))
    with pytest.raises(ShapeError):
        wasserstein_1d(torch.zeros(2), torch.ones(3), torch.ones(3))


def test_gradcheck():
    g = torch.Generator().manual_seed(1)
    u = torch.randn(5, dtype=torch.float64, generator=g).requires_grad_()
    v = torch.randn(4, dtype=torch.float64, generator=g).requires_grad_()
    w = (torch.rand(5, dtype=torch.float64, generator=g) + 0.1).requires_grad_()
    assert torch.autograd.gradcheck(wasserstein_1d, (u, v, w))
    pts = torch.randn(9, 3, dtype=torch.float64, generator=g).requires_grad_()
    target = torch.tensor([1.0, 2.5, 7.0], dtype=torch.float64)
    lengths = torch.tensor([4, 5])
    assert torch.autograd.gradcheck(
        lambda p, sw: length_loss(Streamlines(p, lengths), target, weights=sw),
        (pts, w[:2].detach().clone().requires_grad_()),
    )
