"""Density maps vs dipy.tracking.utils.density_map, soft -> hard limits, losses, gradcheck."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from invtract.errors import ConfigError, ShapeError
from invtract.losses import (
    density_correlation,
    density_map,
    soft_dice,
    soft_occupancy,
    track_density,
    world_to_voxel,
)
from invtract.losses.metrics import dice
from invtract.streamlines import Streamlines


def _inside_lines(path, shape, affine, n=None):
    """Streamlines whose vertices all fall in the grid (dipy raises on the others)."""
    import nibabel as nib

    lines = [np.asarray(s, np.float64) for s in nib.streamlines.load(str(path)).streamlines]
    inv = np.linalg.inv(affine)
    keep = []
    for s in lines[: n or len(lines)]:
        ijk = np.floor(s @ inv[:3, :3].T + inv[:3, 3] + 0.5)
        if (ijk >= 0).all() and (ijk < np.asarray(shape)).all():
            keep.append(s)
    return keep


@pytest.fixture(scope="module")
def real(shared_data):
    import nibabel as nib

    img = nib.load(str(shared_data / "real_msmt15" / "mask.nii.gz"))
    lines = _inside_lines(shared_data / "real_msmt15" / "whole.tck", img.shape, img.affine, 3000)
    return lines, img.shape, img.affine


def test_convention_voxel_centre():
    affine = np.array([[2.0, 0, 0, -10], [0, 2, 0, 4], [0, 0, 3, 1], [0, 0, 0, 1]])
    centre = torch.tensor([[-10 + 2 * 3, 4 + 2 * 1, 1 + 3 * 2]], dtype=torch.float64)
    torch.testing.assert_close(
        world_to_voxel(centre, affine), torch.tensor([[3.0, 1, 2]], dtype=torch.float64)
    )
    sl = Streamlines.from_list([centre.numpy()], dtype=torch.float64)
    assert density_map(sl, (5, 5, 5), affine)[3, 1, 2] == 1
    assert float(track_density(sl, (5, 5, 5), affine)[3, 1, 2]) == pytest.approx(1.0)


def test_density_map_matches_dipy(real):
    from dipy.tracking.utils import density_map as dipy_density

    lines, shape, affine = real
    assert len(lines) > 300
    ref = dipy_density(lines, affine, shape)
    got = density_map(Streamlines.from_list(lines, dtype=torch.float64), shape, affine)
    np.testing.assert_array_equal(got.numpy(), ref)


def test_density_map_phantom_matches_dipy(shared_data):
    import nibabel as nib
    from dipy.tracking.utils import density_map as dipy_density

    img = nib.load(str(shared_data / "phantom_cross90" / "mask.nii.gz"))
    lines = _inside_lines(
        shared_data / "phantom_cross90" / "bundleB_default.tck", img.shape, img.affine
    )
    ref = dipy_density(lines, img.affine, img.shape)
    got = density_map(Streamlines.from_list(lines), img.shape, img.affine)
    np.testing.assert_array_equal(got.numpy(), ref)


def test_outside_vertices(real):
    _, shape, affine = real
    sl = Streamlines.from_list([np.array([[1e4, 0, 0], [0, 0, 0.0]])])
    with pytest.raises(ShapeError):
        density_map(sl, shape, affine)
    assert int(density_map(sl, shape, affine, outside="drop").sum()) <= 1


def test_soft_converges_to_hard(real):
    lines, shape, affine = real
    sl = Streamlines.from_list(lines[:400], dtype=torch.float64)
    hard = density_map(sl, shape, affine)
    # nearest-voxel vertex counts
    ijk = torch.floor(world_to_voxel(sl.points, affine) + 0.5).long()
    counts = torch.zeros(shape, dtype=torch.float64)
    counts.index_put_(tuple(ijk.T), torch.ones(len(ijk), dtype=torch.float64), accumulate=True)
    errs, dices = [], []
    for t in (0.1, 0.01, 1e-3, 1e-5):
        soft = track_density(sl, shape, affine, temperature_vox=t)
        errs.append(float((soft - counts).abs().sum() / counts.sum()))
        dices.append(float(soft_dice(soft, hard > 0, temperature=t)))
    assert errs == sorted(errs, reverse=True) and errs[-1] < 1e-3
    assert dices == sorted(dices) and dices[-1] == pytest.approx(1.0, abs=1e-6)
    occ = soft_occupancy(track_density(sl, shape, affine, temperature_vox=1e-5), 1e-5) > 0.5
    assert dice(occ, hard) == pytest.approx(1.0)


def test_trilinear_mass_and_length_weights():
    line = torch.stack(
        [torch.linspace(0.3, 3.3, 13, dtype=torch.float64)]
        + [torch.full((13,), 1.4, dtype=torch.float64)] * 2,
        -1,
    )
    sl = Streamlines.from_list([line], dtype=torch.float64)
    d = track_density(sl, (6, 4, 4), np.eye(4))
    assert float(d.sum()) == pytest.approx(13.0)
    dl = track_density(sl, (6, 4, 4), np.eye(4), per_point="length")
    assert float(dl.sum()) == pytest.approx(3.0)  # mm of streamline
    w = track_density(sl, (6, 4, 4), np.eye(4), weights=torch.tensor([0.5], dtype=torch.float64))
    torch.testing.assert_close(w, 0.5 * d)


def test_losses_on_real(real):
    lines, shape, affine = real
    a = Streamlines.from_list(lines[:300], dtype=torch.float64)
    b = Streamlines.from_list(lines[150:450], dtype=torch.float64)
    da, db = track_density(a, shape, affine), track_density(b, shape, affine)
    assert float(density_correlation(da, da)) == pytest.approx(1.0)
    assert -1.0 <= float(density_correlation(da, db)) < 1.0
    assert float(soft_dice(da, da, 1.0)) < 1.0  # soft occupancy < 1
    assert float(soft_dice(da, db, 1.0)) < float(soft_dice(da, da, 1.0))


def test_cardinality_and_exceptions():
    empty = track_density(Streamlines.empty(), (2, 3, 4), np.eye(4))
    assert empty.shape == (2, 3, 4) and float(empty.sum()) == 0
    sl = Streamlines.from_list([np.zeros((2, 3))])
    with pytest.raises(ShapeError):
        track_density(sl, (2, 3, 4), np.zeros((4, 4)))
    with pytest.raises(ShapeError):
        track_density(sl, (2, 3, 4), np.eye(4), weights=torch.ones(3))
    with pytest.raises(ConfigError):
        track_density(sl, (2, 3, 4), np.eye(4), per_point="mass")
    with pytest.raises(ConfigError):
        track_density(sl, (2, 3, 4), np.eye(4), temperature_vox=0.0)
    with pytest.raises(ShapeError):
        density_correlation(torch.zeros(2, 2, 2), torch.zeros(2, 2, 3))


@pytest.mark.parametrize("temperature", [None, 0.5])
@pytest.mark.parametrize("per_point", ["count", "length"])
def test_gradcheck_splat(temperature, per_point):
    g = torch.Generator().manual_seed(0)
    pts = (0.2 + 2.6 * torch.rand(7, 3, dtype=torch.float64, generator=g)).requires_grad_()
    w = torch.rand(2, dtype=torch.float64, generator=g).requires_grad_()
    pw = torch.rand(7, dtype=torch.float64, generator=g).requires_grad_()
    lengths = torch.tensor([3, 4])
    target = torch.rand(4, 4, 4, dtype=torch.float64, generator=g)

    def f(p, w, pw):
        sl = Streamlines(p, lengths)
        d = track_density(
            sl,
            (4, 4, 4),
            np.eye(4),
            weights=w,
            point_weights=pw,
            temperature_vox=temperature,
            per_point=per_point,
            chunk_size=3,
        )
        return (d * target).sum()

    assert torch.autograd.gradcheck(f, (pts, w, pw))


def test_gradcheck_density_losses():
    g = torch.Generator().manual_seed(1)
    pts = (0.2 + 2.6 * torch.rand(7, 3, dtype=torch.float64, generator=g)).requires_grad_()
    lengths = torch.tensor([3, 4])
    target = torch.rand(4, 4, 4, dtype=torch.float64, generator=g)
    dens = lambda p: track_density(Streamlines(p, lengths), (4, 4, 4), np.eye(4))  # noqa: E731
    assert torch.autograd.gradcheck(lambda p: density_correlation(dens(p), target), (pts,))
    assert torch.autograd.gradcheck(lambda p: soft_dice(dens(p), target, 0.5), (pts,))
