"""SH basis conversions (DIPY conventions -> MRtrix3) checked against dipy's own bases."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from dipy.reconst.shm import real_sh_descoteaux, real_sh_tournier

from invtract.errors import ConfigError, ShapeError
from invtract.io.sh_basis import (
    SH_BASES,
    from_mrtrix_basis,
    lmax_for_n,
    to_mrtrix_basis,
    valid_sh_counts,
)

DIPY = {
    "mrtrix": (real_sh_tournier, False),
    "tournier07": (real_sh_tournier, False),
    "tournier07_legacy": (real_sh_tournier, True),
    "descoteaux07": (real_sh_descoteaux, False),
    "descoteaux07_legacy": (real_sh_descoteaux, True),
}


def _directions(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    v = np.random.default_rng(seed).standard_normal((n, 3))
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    theta = np.arccos(np.clip(v[:, 2], -1, 1))  # polar angle from +z
    phi = np.arctan2(v[:, 1], v[:, 0])  # azimuth from +x
    return theta, phi


@pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")
@pytest.mark.parametrize("basis", SH_BASES)
@pytest.mark.parametrize("lmax", [0, 2, 4, 8])
def test_amplitudes_match_dipy(basis, lmax):
    theta, phi = _directions(200, seed=lmax)
    fn, legacy = DIPY[basis]
    B_src, *_ = fn(lmax, theta, phi, legacy=legacy)
    B_mr, *_ = real_sh_tournier(lmax, theta, phi, legacy=False)  # MRtrix3 basis
    coeffs = np.random.default_rng(1).standard_normal((3, B_src.shape[1]))
    converted = to_mrtrix_basis(coeffs, basis)
    np.testing.assert_allclose(converted @ B_mr.T, coeffs @ B_src.T, atol=1e-12)
    np.testing.assert_allclose(from_mrtrix_basis(converted, basis), coeffs, atol=1e-15)


def test_torch_input_and_gradient():
    c = torch.randn(4, 2, 45, dtype=torch.float64, requires_grad=True)
    out = to_mrtrix_basis(c, "descoteaux07")
    assert out.shape == c.shape and out.dtype == c.dtype
    np.testing.assert_allclose(
        out.detach().numpy(), to_mrtrix_basis(c.detach().numpy(), "descoteaux07")
    )
    assert torch.autograd.gradcheck(
        lambda x: to_mrtrix_basis(x, "tournier07_legacy"), (c[:1, :1],)
    )


def test_dtype_preserved_numpy():
    c = np.ones((2, 15), np.float32)
    assert to_mrtrix_basis(c, "tournier07_legacy").dtype == np.float32


def test_errors():
    with pytest.raises(ConfigError, match="descoteaux07_legacy"):
        to_mrtrix_basis(np.zeros(6), "dipy")
    with pytest.raises(ShapeError, match="1, 6, 15, 28, 45"):
        to_mrtrix_basis(np.zeros(7), "mrtrix")


def test_counts():
    assert valid_sh_counts(8) == [1, 6, 15, 28, 45]
    assert [lmax_for_n(n) for n in (1, 6, 15, 28, 45, 66, 5, 0, 44)] == [
        0, 2, 4, 6, 8, 10, None, None, None,
    ]  # fmt: skip
