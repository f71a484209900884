"""Image geometry as MRtrix3 3.0.3 holds it: NIfTI transform, realignment, Eigen's inverse.

The ``*_HEX`` values below were printed by a small C++ program that runs the same steps with
Eigen 3.4.0 (the version tckgen 3.0.3 was built with) compiled by g++ 12 -O2 (SSE2, no FMA):
``Header`` reading, ``realign_transform``, ``transform * diag(spacing)`` and
``Transform::inverse()``. They pin the last bit of every double; the tckgen references in
``tests/data/tckgen_refs`` check the same end to end (``tests/tracking/test_refs_parity.py``).
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from invtract.io.geometry import realign, sanitise_transform, scanner2voxel, voxel2scanner
from invtract.io.image import load_fod, load_mask
from invtract.io.nifti_transform import nifti_transform

# real_msmt15/fod.nii.gz (sform, float32 srow): MRtrix's voxel2scanner and scanner2voxel
REAL_V2S_HEX = (
    "0x1.3f87286769626p+1 0x1.b845194644e2ep-4 0x1.538b41f4a2537p-4 0x1.0109dcp+2 "
    "-0x1.258af8b246ec1p-4 0x1.2b8da796b4275p+1 -0x1.c0b52e03277d6p-1 -0x1.18bc3ap+6 "
    "-0x1.d82fd2af96872p-4 0x1.bed4315a62852p-1 0x1.2b817eab186d8p+1 -0x1.a13874p+5"
)
REAL_S2V_HEX = (
    "0x1.98feec09ead1cp-2 -0x1.77bc4fa0bf56fp-7 -0x1.2e3306b0ffcaap-6 -0x1.af7754d420e9p+1 "
    "0x1.19c5c4e8b9b1dp-6 0x1.7f6da13978078p-2 0x1.1df87cec35ac1p-3 0x1.0bf18f173e365p+5 "
    "0x1.b29dfb2d689e8p-7 -0x1.1f2c3b2b7c192p-3 0x1.7f5e14d1f2d64p-2 0x1.342ce29becaa5p+3"
)
# tckgen_refs/fod_l10_qform.nii.gz (qform only, qfac -1; realigned: axis 0 flipped)
QFORM_V2S_HEX = (
    "0x1.3f872b7a97309p+1 0x1.b8458ae42e444p-4 0x1.538e2b5f81872p-4 0x1.7a7bf06ee03a8p+3 "
    "-0x1.258a8d68c7d6dp-4 0x1.2b8da3092bf62p+1 -0x1.c0b52ee408f71p-1 -0x1.fb0639f63fb4ep+5 "
    "-0x1.d8329a7ea7692p-4 0x1.bed4329afd2c7p-1 0x1.2b81842bdf41bp+1 -0x1.8f0ab9ae47674p+5"
)
QFORM_S2V_HEX = (
    "0x1.98fee5bf80d5cp-2 -0x1.77bb8ce3fd7e1p-7 -0x1.2e34d63393d1ep-6 -0x1.97bbea8626e72p+2 "
    "0x1.19c6227eab3a8p-6 0x1.7f6da71252259p-2 0x1.1df87974ecb3dp-3 0x1.e7e320c97bbbbp+4 "
    "0x1.b2a16ee61d01p-7 -0x1.1f2c3c337bb2fp-3 0x1.7f5e0b716dd82p-2 0x1.342cae5aee2dap+3"
)


def _hex(text: str) -> np.ndarray:
    return np.array([float.fromhex(v) for v in text.split()]).reshape(3, 4)


def test_nifti_sform_as_mrtrix_reads_it(shared_data):
    path = shared_data / "real_msmt15" / "fod.nii.gz"
    fod = load_fod(path)
    np.testing.assert_array_equal(fod.affine[:3], _hex(REAL_V2S_HEX))
    np.testing.assert_array_equal(fod.scanner2voxel, _hex(REAL_S2V_HEX))
    # not nibabel's raw sform (which is what made NIfTI tracking drift by ~1e-4 mm)
    raw = nib.load(path).affine
    assert not np.array_equal(fod.affine, raw)
    np.testing.assert_allclose(fod.affine, raw, atol=1e-6)
    # nor numpy's LU inverse in general
    assert fod.voxel_sizes == (2.5, 2.5, 2.5)


def test_nifti_qform_flipped_is_realigned(test_data):
    path = test_data / "tckgen_refs" / "fod_l10_qform.nii.gz"
    img = nib.load(path)
    assert int(img.header["sform_code"]) == 0 and img.header["pixdim"][0] < 0
    fod = load_fod(path)
    np.testing.assert_array_equal(fod.affine[:3], _hex(QFORM_V2S_HEX))
    np.testing.assert_array_equal(fod.scanner2voxel, _hex(QFORM_S2V_HEX))
    # stored x-reversed; MRtrix (and so load_fod) flips it back to RAS order
    np.testing.assert_array_equal(fod.data, np.asarray(img.dataobj, np.float32)[::-1])
    np.testing.assert_allclose(fod.affine, np.asarray(img.affine) @ _flip_x(12), atol=1e-4)


def _flip_x(n: int) -> np.ndarray:
    F = np.eye(4)
    F[0, 0], F[0, 3] = -1.0, n - 1
    return F


def test_scanner2voxel_is_eigen_not_lapack():
    """Eigen's cofactor inverse differs from numpy's LU inverse in the last bits; ours is
    Eigen's (above), and it inverts to within rounding."""
    v2s = np.eye(4)
    v2s[:3] = _hex(REAL_V2S_HEX)
    ours = scanner2voxel(v2s)
    lapack = np.linalg.inv(v2s)[:3]
    assert not np.array_equal(ours, lapack)
    np.testing.assert_allclose(ours, lapack, rtol=0, atol=1e-13)
    np.testing.assert_allclose(ours @ v2s, np.eye(4)[:3], atol=1e-14)


@pytest.mark.parametrize("perm", [(0, 1, 2), (1, 0, 2), (2, 0, 1), (1, 2, 0)])
@pytest.mark.parametrize(
    "flip", [(False, False, False), (True, False, True), (False, True, False)]
)
def test_realign_recovers_ras_order(tmp_path, shared_data, perm, flip):
    """A NIfTI written with permuted / reversed axes loads in MRtrix's RAS order: same data
    as the original, same geometry up to the float32 sform."""
    src = nib.load(shared_data / "real_msmt15" / "fod.nii.gz")
    data = np.asarray(src.dataobj, np.float32)
    A = np.asarray(src.affine)
    out, B = np.transpose(data, list(perm) + [3]), np.eye(4)
    B[:3, :3] = A[:3, :3][:, list(perm)]
    B[:3, 3] = A[:3, 3]
    for j in range(3):
        if flip[j]:
            n = out.shape[j]
            out = np.flip(out, axis=j)
            B[:3, 3] = B[:3, 3] + B[:3, j] * (n - 1)
            B[:3, j] = -B[:3, j]
    nib.save(nib.Nifti1Image(np.ascontiguousarray(out), B), tmp_path / "p.nii")
    ref, got = load_fod(shared_data / "real_msmt15" / "fod.nii.gz"), load_fod(tmp_path / "p.nii")
    np.testing.assert_array_equal(got.data, ref.data)
    np.testing.assert_allclose(got.affine, ref.affine, rtol=0, atol=2e-5)
    np.testing.assert_allclose(got.voxel_sizes, ref.voxel_sizes, rtol=1e-6)


@pytest.mark.parametrize("strides", ["-1,2,3,4", "4,3,2,1", "-2,3,-1,4", "1,-2,-3,-4"])
def test_mif_any_strides_bit_identical(tmp_path, shared_data, mrtrix, strides):
    """Strides only change the memory layout: data, affine and inverse are bit-identical."""
    src = shared_data / "real_msmt15" / "fod.mif"
    out = tmp_path / "s.mif"
    mrtrix("mrconvert", str(src), str(out), "-strides", strides, "-quiet")
    ref, got = load_fod(src), load_fod(out)
    np.testing.assert_array_equal(got.data, ref.data)
    np.testing.assert_array_equal(got.affine, ref.affine)
    np.testing.assert_array_equal(got.scanner2voxel, ref.scanner2voxel)


def test_mask_mif_nifti_same_voxels(shared_data, test_data):
    a = load_mask(shared_data / "real_msmt15" / "roi_A.mif")
    b = load_mask(shared_data / "real_msmt15" / "roi_A.nii.gz")
    np.testing.assert_array_equal(a.data, b.data)
    assert a.transform is not None and a.transform.shape == (3, 4)


def test_sanitise_rescales_non_unit_columns():
    T = np.hstack([np.eye(3) * 1.01, np.array([[1.0], [2.0], [3.0]])])
    T2, sp = sanitise_transform(T, (2.0, 2.0, 2.0))
    np.testing.assert_allclose(np.linalg.norm(T2[:, :3], axis=0), 1.0)
    np.testing.assert_allclose(sp, (2.02, 2.02, 2.02))
    same, sp_same = sanitise_transform(np.hstack([np.eye(3), T[:, 3:]]), (2.0, 2.0, 2.0))
    assert sp_same == (2.0, 2.0, 2.0)


def test_realign_translation_keeps_voxel_positions():
    """After realignment every voxel centre stays where it was in scanner space."""
    rng = np.random.default_rng(3)
    R = np.linalg.qr(rng.normal(size=(3, 3)))[0]
    T = np.hstack([R, rng.uniform(-50, 50, (3, 1))])
    spacing, shape = (1.5, 2.0, 2.5), (7, 5, 4)
    geo = realign(T, spacing, shape)
    A0, A1 = voxel2scanner(T, spacing), geo.voxel2scanner
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).reshape(-1, 3)
    world0 = idx @ A0[:3, :3].T + A0[:3, 3]
    moved = np.zeros_like(idx)
    for j in range(3):
        k = idx[:, geo.perm[j]]
        moved[:, j] = shape[geo.perm[j]] - 1 - k if geo.flip[j] else k
    world1 = moved @ A1[:3, :3].T + A1[:3, 3]
    np.testing.assert_allclose(world1, world0, atol=1e-9)
    assert np.all(np.diag(A1[:3, :3]) >= 0)  # each scanner axis runs along +its image axis


def test_nifti_transform_rescales_on_pixdim_mismatch():
    h = nib.Nifti1Header()
    h.set_data_shape((4, 4, 4))
    A = np.diag([2.0, 3.0, 4.0, 1.0])
    h.set_sform(A, code=1)
    h["pixdim"][1:4] = [2.0, 3.0, 4.0]
    T, sp = nifti_transform(h)
    np.testing.assert_array_equal(T[:, :3], np.eye(3))
    assert sp == (2.0, 3.0, 4.0)
    h["pixdim"][1:4] = [1.0, 1.0, 1.0]  # inconsistent: MRtrix takes the column norms
    assert nifti_transform(h)[1] == (2.0, 3.0, 4.0)
