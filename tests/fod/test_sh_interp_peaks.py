"""SH basis, Legendre table, interpolation and peak finder against independent references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.ndimage as ndi
import scipy.special as sp
import torch
from dipy.reconst.shm import real_sh_tournier

from invtract.errors import ShapeError
from invtract.fod.interp import sample_fod
from invtract.fod.legendre import legendre_index, legendre_table, lut_increment
from invtract.fod.peaks import mrtrix_peak
from invtract.fod.sh import lmax_from_n, n_coeffs, sh_basis


def _dirs(n, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    d = torch.randn(n, 3, generator=g, dtype=dtype)
    return d / d.norm(dim=-1, keepdim=True)


@pytest.mark.parametrize("lmax", [0, 2, 4, 8])
def test_sh_basis_matches_dipy_tournier_nonlegacy(lmax):
    d = _dirs(300)
    d[0] = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
    d[1] = torch.tensor([0.0, 0.0, -1.0], dtype=torch.float64)
    theta = np.arccos(np.clip(d[:, 2].numpy(), -1, 1))
    phi = np.arctan2(d[:, 1].numpy(), d[:, 0].numpy())
    ref, _, _ = real_sh_tournier(lmax, theta, phi, legacy=False)
    np.testing.assert_allclose(sh_basis(d, lmax).numpy(), ref, atol=1e-12)


def test_sh_counts():
    assert [n_coeffs(l) for l in (0, 2, 4, 6, 8)] == [1, 6, 15, 28, 45]
    assert lmax_from_n(45) == 8
    for bad in (0, 2, 44, 46):
        with pytest.raises(ShapeError, match="not a valid number of SH"):
            lmax_from_n(bad)


def test_legendre_table_matches_scipy():
    table = legendre_table(8)
    inc = float(lut_increment())
    assert table.shape == (512, 25)
    for n in (0, 3, 100, 256, 510, 511):
        th = n * inc
        for l in range(0, 9, 2):
            for m in range(l + 1):
                norm = math.sqrt(
                    (2 * l + 1) / (4 * math.pi) * math.factorial(l - m) / math.factorial(l + m)
                )
                ref = norm * sp.lpmv(m, l, math.cos(th))
                # MRtrix builds the table in float32: near the pole 1 - x^2 loses ~4 digits
                assert abs(table[n, legendre_index(l, m)] - ref) < 1e-5 + 5e-4 * abs(ref)


def test_interpolation_matches_map_coordinates():
    rng = np.random.default_rng(0)
    vol = rng.standard_normal((5, 6, 7, 3))
    aff = np.array([[2, 0.1, 0, 3], [0, 1.5, 0.2, -4], [0.1, 0, 2.5, 1], [0, 0, 0, 1.0]])
    vox = np.stack([rng.uniform(0, 4, 400), rng.uniform(0, 5, 400), rng.uniform(0, 6, 400)], -1)
    pos = vox @ aff[:3, :3].T + aff[:3, 3]
    s2v = torch.tensor(np.linalg.inv(aff)[:3])
    c, valid = sample_fod(torch.tensor(vol.reshape(-1, 3)), (5, 6, 7), s2v, torch.tensor(pos))
    ref = np.stack([ndi.map_coordinates(vol[..., k], vox.T, order=1) for k in range(3)], -1)
    assert bool(valid.all())
    np.testing.assert_allclose(c.numpy(), ref, atol=1e-12)


def test_convention_voxel_centre_and_boundaries():
    vol = np.arange(4 * 4 * 4 * 2, dtype=np.float64).reshape(4, 4, 4, 2) + 1.0
    vol[3, 3, 3] = 0.0  # an all-zero voxel -> no data near it
    vol[0, 3, 0, 0] = np.nan  # NaN l=0 -> no data where it is a corner
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    aff[:3, 3] = [-3, -3, -3]
    s2v = torch.tensor(np.linalg.inv(aff)[:3])
    flat = torch.tensor(vol.reshape(-1, 2))

    def at(v):
        p = torch.tensor([v], dtype=torch.float64) @ torch.tensor(aff[:3, :3]).T + torch.tensor(
            aff[:3, 3]
        )
        return sample_fod(flat, (4, 4, 4), s2v, p)

    c, ok = at([1.0, 2.0, 1.0])  # voxel centre samples exactly that voxel
    assert bool(ok[0]) and torch.equal(c[0], torch.tensor(vol[1, 2, 1]))
    assert not bool(at([-0.5, 1, 1])[1][0])  # FOV bound is exclusive
    assert bool(at([-0.49, 1, 1])[1][0])
    c, ok = at([-0.3, 1, 1])  # outer half-voxel clamps to the edge voxel
    assert torch.allclose(c[0], torch.tensor(vol[0, 1, 1]))
    assert not bool(at([2.6, 2.6, 2.6])[1][0])  # nearest voxel all zero
    assert bool(at([2.4, 2.4, 2.4])[1][0])
    assert not bool(at([0.2, 2.7, 0.2])[1][0])  # NaN corner


def _single_fibre(axis, lmax=8, k=20.0):
    d = _dirs(4000, seed=3)
    a = torch.tensor(axis, dtype=torch.float64)
    a = a / a.norm()
    f = torch.exp(-k * (1 - (d @ a) ** 2))
    B = sh_basis(d, lmax)
    return torch.linalg.lstsq(B, f[:, None]).solution[:, 0]


def test_peak_matches_dense_search_and_keeps_hemisphere():
    axes = [(1, 0, 0), (0.3, 0.8, 0.52), (0, 0, 1), (0.1, -0.2, -0.97)]
    c = torch.stack([_single_fibre(a) for a in axes]).float()
    starts = torch.tensor([[0.9, 0.3, 0.1], [0.2, 0.9, 0.3], [0.3, 0.2, 0.9], [0.0, 0.1, 1.0]])
    starts = starts / starts.norm(dim=-1, keepdim=True)
    amp, u = mrtrix_peak(c, starts, 8)
    assert torch.isfinite(amp).all()
    sph = _dirs(100000, seed=9)
    A = c.double() @ sh_basis(sph, 8).T
    best = sph[A.argmax(1)]
    cos = (best * u.double()).sum(-1).abs()
    assert (torch.rad2deg(torch.acos(cos.clamp(max=1))) < 1.0).all()
    assert ((u * starts).sum(-1) > 0).all()  # ascent stays in the start hemisphere
    np.testing.assert_allclose(amp.double(), A.max(1).values, rtol=2e-3)
    amp2, u2 = mrtrix_peak(c, -starts, 8)  # -u gives -(same peak)
    assert torch.allclose(u2, -u, atol=1e-5)
