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


@pytest.mark.parametrize("basis", SH_BASES)
@pytest.mark.parametrize("lmax", [2, 8])
def test_conversion_is_dipys(basis, lmax):
    """The map equals DIPY's convert_sh_* applied directly (both directions)."""
    from dipy.reconst.shm import (
        convert_sh_descoteaux_tournier,
        convert_sh_from_legacy,
        convert_sh_to_legacy,
    )

    c = np.random.default_rng(lmax).standard_normal((7, (lmax + 1) * (lmax + 2) // 2))
    direct = {
        "mrtrix": lambda x: x,
        "tournier07": lambda x: x,
        "tournier07_legacy": lambda x: convert_sh_from_legacy(x, "tournier07"),
        "descoteaux07_legacy": convert_sh_descoteaux_tournier,
        "descoteaux07": lambda x: convert_sh_descoteaux_tournier(
            convert_sh_to_legacy(x, "descoteaux07")
        ),
    }[basis]
    np.testing.assert_allclose(to_mrtrix_basis(c, basis), direct(c), rtol=1e-15, atol=0)
    np.testing.assert_allclose(from_mrtrix_basis(direct(c), basis), c, rtol=1e-15, atol=1e-15)


def _bright_phantom():
    from invtract.data import example_path
    from invtract.io.image import load_fod

    return load_fod(example_path("fod")).data


@pytest.mark.parametrize("true", ["mrtrix", "descoteaux07_legacy"])
def test_wrong_family_warns(true):
    """An FOD written in one family and read in the other leaves negative lobes: warned,
    naming the basis that removes them; read right, no warning."""
    from invtract.io.sh_basis import SHBasisWarning, guess_basis, warn_if_other_basis

    raw = from_mrtrix_basis(_bright_phantom(), true)
    wrong = "descoteaux07" if true == "mrtrix" else "tournier07"
    with pytest.warns(SHBasisWarning, match=true):
        others = warn_if_other_basis(to_mrtrix_basis(raw, wrong), wrong)
    assert true in others
    right, shares = guess_basis(to_mrtrix_basis(raw, true), true)
    assert right == [] and shares[true] < 0.04 < shares[wrong]


def test_legacy_descoteaux_read_as_new_warns(shared_data):
    """The issue's case: DIPY's CSD writes descoteaux07_legacy; read as descoteaux07 (real
    FOD, whose lobes are not axis-aligned) it is flagged."""
    import nibabel as nib

    from invtract.io.sh_basis import guess_basis

    fod = np.asarray(nib.load(shared_data / "real_msmt15" / "fod.nii.gz").dataobj, np.float32)
    raw = from_mrtrix_basis(fod, "descoteaux07_legacy")
    others, shares = guess_basis(to_mrtrix_basis(raw, "descoteaux07"), "descoteaux07")
    assert others == ["descoteaux07_legacy"], shares
    assert guess_basis(to_mrtrix_basis(raw, "descoteaux07_legacy"), "descoteaux07_legacy")[0] == []
