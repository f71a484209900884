"""Gradient tables: .mif dw_scheme, FSL bvecs/bvals (MRtrix conventions), shells."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from invtract.errors import ConfigError, FormatError
from invtract.io.gradients import (
    fsl_to_scanner,
    load_fsl_gradients,
    normalise_scheme,
    read_mif_scheme,
    shells,
)

CSD = Path(__file__).resolve().parents[1] / "data" / "csd"


def test_fsl_matches_mif_header_on_rotated_affine():
    """mrconvert -export_grad_fsl of a DWI whose affine is rotated ~20.7 deg reads back to the
    header's scanner-frame table (the flip of x and the rotation both matter here)."""
    g = read_mif_scheme(CSD / "dwi.mif")
    img = nib.load(CSD / "dwi.nii.gz")
    f = load_fsl_gradients(CSD / "dwi.bvec", CSD / "dwi.bval", img.affine, img.shape[3])
    assert g.shape == (102, 4)
    np.testing.assert_allclose(f[:, :3], g[:, :3], atol=1e-6)
    np.testing.assert_allclose(f[:, 3], g[:, 3], atol=1e-3)
    # without the x flip, or in voxel axes, the directions are clearly wrong
    raw = np.loadtxt(CSD / "dwi.bvec")
    assert np.abs(raw.T - g[:, :3]).max() > 0.1


def test_fsl_phantom_against_grad_b(shared_data):
    d = shared_data / "phantom_cross90"
    img = nib.load(d / "dwi.nii.gz")
    f = load_fsl_gradients(d / "dwi.bvec", d / "dwi.bval", img.affine, img.shape[3])
    g = normalise_scheme(np.loadtxt(d / "grad.b"))
    np.testing.assert_allclose(f[:, :3], g[:, :3], atol=1e-6)
    np.testing.assert_allclose(f[:, 3], g[:, 3], atol=1e-3)


def test_flip_depends_on_determinant():
    v = np.array([[1.0], [0.0], [0.0]])
    pos = fsl_to_scanner(v, np.diag([2.0, 2.0, 2.0, 1.0]))
    neg = fsl_to_scanner(v, np.diag([-2.0, 2.0, 2.0, 1.0]))
    np.testing.assert_allclose(pos, [[-1.0, 0.0, 0.0]])
    np.testing.assert_allclose(neg, [[-1.0, 0.0, 0.0]])  # x axis itself points left
    rot = np.eye(4)
    rot[:3, :3] = [[0, -1, 0], [1, 0, 0], [0, 0, 1]]
    np.testing.assert_allclose(fsl_to_scanner(v, rot), [[0.0, -1.0, 0.0]], atol=1e-12)


def test_shells_real_crop():
    sh = shells(read_mif_scheme(CSD / "dwi.mif"))
    assert [round(s.mean) for s in sh] == [0, 700, 1200, 2800]  # b = 0.5 counts as b=0
    assert [s.volumes.size for s in sh] == [6, 16, 30, 50]
    assert sh[0].is_bzero and not sh[1].is_bzero
    assert sh[3].volumes[0] == 3


def test_shells_cluster_small_deviations():
    b = np.array([0, 5, 995, 1000, 1010, 990, 2000, 2040, 1970, 2010], float)
    g = np.concatenate([np.tile([[0.0, 0.0, 1.0]], (b.size, 1)), b[:, None]], 1)
    sh = shells(g)
    assert [s.volumes.tolist() for s in sh] == [[0, 1], [2, 3, 4, 5], [6, 7, 8, 9]]


def test_bvalue_scaling_and_normalisation():
    g = normalise_scheme([[0, 0, 2.0, 1000], [1, 0, 0, 1000], [0, 0, 0, 0]])
    np.testing.assert_allclose(g[:, :3], [[0, 0, 1], [1, 0, 0], [0, 0, 0]])
    np.testing.assert_allclose(g[:, 3], [4000, 1000, 0])  # norm 2 -> b x 4 (MRtrix auto)
    g = normalise_scheme([[0, 0, 1.001, 1000]])
    assert g[0, 3] == 1000  # within tolerance: no scaling


def test_errors(tmp_path):
    with pytest.raises(ConfigError):
        shells(np.array([[1, 0, 0, 100.0], [0, 1, 0, 900.0], [0, 0, 1, 2000.0]]))
    bad = tmp_path / "b.bvec"
    bad.write_text("1 0\n0 1\n")
    with pytest.raises(FormatError):
        load_fsl_gradients(bad, CSD / "dwi.bval", np.eye(4), 102)
    with pytest.raises(ConfigError):
        load_fsl_gradients(CSD / "dwi.bvec", CSD / "dwi.bval", np.eye(4), 50)
    with pytest.raises(FormatError):
        read_mif_scheme(CSD / "mask.mif")
