"""Arc-length resampling vs dipy's set_number_of_points, edge cases and gradcheck."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from invtract.errors import ConfigError, ShapeError
from invtract.losses import arc_lengths, resample, resample_padded
from invtract.losses.resample import as_resampled
from invtract.streamlines import Streamlines


def _load(path, n=None):
    import nibabel as nib

    lines = [np.asarray(s, np.float64) for s in nib.streamlines.load(str(path)).streamlines]
    return lines[:n] if n else lines


@pytest.mark.parametrize("n_points", [2, 12, 20, 50])
def test_matches_dipy_on_real_tracks(shared_data, n_points):
    from dipy.tracking.streamline import length, set_number_of_points

    lines = _load(shared_data / "real_msmt15" / "whole.tck", 400)
    sl = Streamlines.from_list(lines, dtype=torch.float64)
    ref = np.stack(set_number_of_points(lines, n_points))
    np.testing.assert_allclose(resample(sl, n_points).numpy(), ref, atol=1e-9)
    np.testing.assert_allclose(arc_lengths(sl).numpy(), length(lines), rtol=1e-12)


def test_different_step_sizes_give_same_curve():
    # the same arc sampled at 0.25 mm and 1 mm resamples to (nearly) the same points
    def arc(step):
        t = torch.arange(0, 20 + 1e-9, step, dtype=torch.float64) / 10.0
        return torch.stack([10 * torch.cos(t), 10 * torch.sin(t), 0 * t], -1)

    sl = Streamlines.from_list([arc(0.25), arc(1.0)], dtype=torch.float64)
    r = resample(sl, 11)
    torch.testing.assert_close(r[0], r[1], atol=2e-3, rtol=0)


def test_cardinality_and_degenerate():
    sl = Streamlines.from_list(
        [np.zeros((1, 3)), [[0, 0, 0], [0, 0, 0], [1, 0, 0]], [[0, 0, 0], [2, 0, 0]]],
        dtype=torch.float64,
    )
    r = resample(sl, 3)
    assert r.shape == (3, 3, 3)
    torch.testing.assert_close(r[0], torch.zeros(3, 3, dtype=torch.float64))
    torch.testing.assert_close(r[1, :, 0], torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64))
    torch.testing.assert_close(r[2, :, 0], torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64))
    assert resample(Streamlines.empty(), 5).shape == (0, 5, 3)
    assert arc_lengths(Streamlines.empty()).shape == (0,)


def test_padded_and_as_resampled():
    sl = Streamlines.from_list([np.random.default_rng(0).normal(size=(n, 3)) for n in (3, 7)])
    padded, _ = sl.to_padded()
    torch.testing.assert_close(resample_padded(padded, sl.lengths, 9), resample(sl, 9))
    r = resample(sl, 9)
    assert as_resampled(r, 4) is r
    with pytest.raises(ShapeError):
        as_resampled(torch.zeros(3, 3), 4)


def test_exceptions():
    with pytest.raises(ConfigError):
        resample(Streamlines.from_list([np.zeros((2, 3))]), 1)


def test_gradcheck():
    g = torch.Generator().manual_seed(0)
    pts = torch.randn(9, 3, dtype=torch.float64, generator=g).requires_grad_()
    lengths = torch.tensor([4, 5])
    assert torch.autograd.gradcheck(lambda p: resample(Streamlines(p, lengths), 6), (pts,))
    assert torch.autograd.gradcheck(lambda p: arc_lengths(Streamlines(p, lengths)), (pts,))


def test_gradient_finite_with_repeated_vertices():
    pts = torch.tensor([[0, 0, 0], [0, 0, 0], [1, 0, 0]], dtype=torch.float64, requires_grad=True)
    resample(Streamlines(pts, torch.tensor([3])), 4).sum().backward()
    assert torch.isfinite(pts.grad).all()
