"""MDF, set and paired losses vs dipy on real tractograms; soft -> hard limits; gradcheck."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from invtract.errors import ConfigError, ShapeError
from invtract.losses import (
    chamfer_loss,
    mdf,
    min_mdf,
    paired_coverage,
    paired_loss,
    paired_mdf,
    resample,
)
from invtract.streamlines import Streamlines


def _lines(path, n=None):
    import nibabel as nib

    lines = [np.asarray(s, np.float64) for s in nib.streamlines.load(str(path)).streamlines]
    return lines[:n] if n else lines


@pytest.fixture(scope="module")
def bundles(shared_data):
    d = shared_data / "real_msmt15"
    a = _lines(d / "bundleA_default.tck")
    b = _lines(d / "bundleA_angle30.tck")
    return a, b


def _sl(lines):
    return Streamlines.from_list(lines, dtype=torch.float64)


def test_mdf_matches_dipy(bundles):
    from dipy.tracking.distances import bundles_distances_mdf
    from dipy.tracking.streamline import set_number_of_points

    a, b = bundles
    ref = bundles_distances_mdf(set_number_of_points(a, 20), set_number_of_points(b, 20))
    got = mdf(_sl(a), _sl(b), 20, chunk_size=64).numpy()
    # dipy accumulates in float32
    np.testing.assert_allclose(got, ref, atol=1e-5)
    np.testing.assert_allclose(
        min_mdf(_sl(a), _sl(b), chunk_size=37).numpy(), ref.min(1), atol=1e-5
    )


def test_min_mdf_whole_tractogram_subset(shared_data):
    from dipy.tracking.distances import bundles_distances_mdf
    from dipy.tracking.streamline import set_number_of_points

    lines = _lines(shared_data / "phantom_cross90" / "whole.tck", 300)
    a, b = lines[:120], lines[120:]
    ref = bundles_distances_mdf(set_number_of_points(a, 12), set_number_of_points(b, 12))
    got = min_mdf(_sl(a), _sl(b), 12, chunk_size=50).numpy()
    np.testing.assert_allclose(got, ref.min(1), atol=1e-5)


def test_soft_min_converges_to_hard(bundles):
    a, b = (_sl(x) for x in bundles)
    ra, rb = resample(a, 20), resample(b, 20)
    hard = min_mdf(ra, rb)
    errors = []
    for t in (1.0, 0.1, 0.01, 0.001):
        soft = min_mdf(ra, rb, temperature_mm=t, chunk_size=64)
        assert bool((soft >= hard - 1e-9).all())  # normalised soft-min is an upper bound
        assert float((soft - hard).max()) <= t * math.log(2 * len(b)) + 1e-9
        errors.append(float((soft - hard).abs().max()))
    assert errors == sorted(errors, reverse=True) and errors[-1] < 0.01
    hard_c = chamfer_loss(ra, rb, temperature_mm=0.0)
    expected = 0.5 * (hard.mean() + min_mdf(rb, ra).mean())
    torch.testing.assert_close(hard_c, expected)
    assert abs(float(chamfer_loss(ra, rb, temperature_mm=1e-3)) - float(hard_c)) < 0.01


def test_chunk_size_does_not_change_result(bundles):
    a, b = (_sl(x[:50]) for x in bundles)
    vals = [chamfer_loss(a, b, temperature_mm=0.5, chunk_size=c) for c in (1, 7, 1000)]
    for v in vals[1:]:
        torch.testing.assert_close(v, vals[0])


def test_paired_mdf_matches_dipy_diagonal(bundles):
    from dipy.tracking.distances import bundles_distances_mdf
    from dipy.tracking.streamline import set_number_of_points

    a, b = bundles
    n = min(len(a), len(b))
    ref = np.diag(
        bundles_distances_mdf(set_number_of_points(a[:n], 32), set_number_of_points(b[:n], 32))
    )
    got = paired_mdf(_sl(a[:n]), _sl(b[:n]), 32).numpy()
    np.testing.assert_allclose(got, ref, atol=1e-5)
    soft = paired_mdf(_sl(a[:n]), _sl(b[:n]), 32, temperature_mm=1e-4).numpy()
    np.testing.assert_allclose(soft, ref, atol=1e-3)


def test_paired_different_steps_and_coverage():
    def line(x0, x1, step):
        x = torch.arange(x0, x1 + 1e-9, step, dtype=torch.float64)
        return torch.stack([x, 0 * x, 0 * x], -1)

    target = Streamlines.from_list([line(0, 20, 0.25), line(0, 20, 0.25)], dtype=torch.float64)
    tracked = Streamlines.from_list([line(0, 20, 1.0), line(0, 10, 0.5)], dtype=torch.float64)
    d = paired_mdf(tracked, target, 21)
    assert float(d[0]) == pytest.approx(0.0, abs=1e-9)  # step size does not matter
    assert float(d[1]) > 2.0
    cov = paired_coverage(tracked, target, 41, radius_mm=0.3, temperature_mm=0.0)
    assert float(cov[0]) == 1.0
    assert float(cov[1]) == pytest.approx(21 / 41)  # half of the target covered (+ 1 sample)
    soft = paired_coverage(tracked, target, 41, radius_mm=0.3, temperature_mm=1e-3)
    torch.testing.assert_close(soft, cov, atol=1e-3, rtol=0)
    loss = paired_loss(tracked, target, 21, reduction="none", temperature_mm=0.0, radius_mm=0.3)
    assert float(loss[1]) > float(loss[0])


def test_paired_coverage_on_real_bundles(bundles):
    # the 30-degree tracks are shorter: they cover part of the default tracks from the same seed
    a, b = bundles
    n = min(len(a), len(b))
    cov = paired_coverage(_sl(b[:n]), _sl(a[:n]), 32, radius_mm=1.0, temperature_mm=0.0)
    assert 0.0 <= float(cov.min()) and float(cov.max()) <= 1.0
    assert float(cov.mean()) < 1.0


def test_exceptions():
    a = torch.zeros(3, 5, 3)
    with pytest.raises(ShapeError):
        mdf(a, torch.zeros(2, 4, 3))
    with pytest.raises(ShapeError):
        paired_mdf(a, torch.zeros(2, 5, 3))
    with pytest.raises(ShapeError):
        min_mdf(a, torch.zeros(0, 5, 3))
    with pytest.raises(ShapeError):
        min_mdf(a, a, weights_b=torch.ones(2))
    with pytest.raises(ConfigError):
        min_mdf(a, a, temperature_mm=-1.0)
    with pytest.raises(ConfigError):
        paired_loss(a, a, reduction="median")


def test_weights_remove_candidates():
    a = torch.tensor([[[0.0, 0, 0], [1, 0, 0]]], dtype=torch.float64)
    b = torch.cat([a, a + 5.0])
    w = torch.tensor([0.0, 1.0], dtype=torch.float64)
    assert float(min_mdf(a, b, weights_b=w)) == pytest.approx(5 * math.sqrt(3))
    soft = float(min_mdf(a, b, temperature_mm=0.01, weights_b=w))
    # only the two orientations of the second candidate remain: bound T log 2
    assert 5 * math.sqrt(3) <= soft <= 5 * math.sqrt(3) + 0.01 * math.log(2)
    w = w.clone().requires_grad_()
    chamfer_loss(a, b, temperature_mm=0.5, weights_b=w).backward()
    assert torch.isfinite(w.grad).all()


def _rand(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, dtype=torch.float64, generator=g).requires_grad_()


def test_gradcheck_set_losses():
    a, b = _rand(3, 4, 3, seed=0), _rand(5, 4, 3, seed=1)
    w = torch.rand(5, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) + 0.1
    w.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda a, b, w: min_mdf(a, b, temperature_mm=0.5, weights_b=w, chunk_size=2), (a, b, w)
    )
    assert torch.autograd.gradcheck(lambda a, b: min_mdf(a, b, chunk_size=2), (a, b))
    assert torch.autograd.gradcheck(
        lambda a, b, w: chamfer_loss(
            a, b, temperature_mm=0.5, weights_a=w[:3], weights_b=w, chunk_size=2
        ),
        (a, b, w),
    )
    assert torch.autograd.gradcheck(lambda a, b: mdf(a, b, chunk_size=2), (a, b))


def test_gradcheck_paired_losses():
    a, b = _rand(3, 4, 3, seed=3), _rand(3, 4, 3, seed=4)
    assert torch.autograd.gradcheck(lambda a, b: paired_mdf(a, b, temperature_mm=0.3), (a, b))
    pa, pb = _rand(9, 3, seed=5), _rand(9, 3, seed=6)
    la, lb = torch.tensor([4, 5]), torch.tensor([5, 4])
    w = torch.tensor([0.3, 0.9], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, y, w: paired_loss(
            Streamlines(x, la),
            Streamlines(y, lb),
            6,
            weights=w,
            temperature_mm=0.3,
            radius_mm=0.5,
            chunk_size=1,
        ),
        (pa, pb, w),
    )
