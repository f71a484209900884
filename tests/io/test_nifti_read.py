"""The nibabel-free reader of plain 3-D NIfTI-1 images gives exactly what nibabel's path gives.

Each image is loaded twice through :func:`invtract.io.image.load_image`: once as it is (plain
3-D files take :func:`read_plain_nifti`) and once with that reader switched off (nibabel);
data, affine, voxel sizes and transform must be equal bit for bit. Synthetic files cover the
byte orders, integer and float types, intensity scaling, uncompressed files and oblique /
qform-only / no-transform headers; headers nibabel would fix or reject go to nibabel.
"""

from __future__ import annotations

import gzip
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from invtract.io import image as image_module
from invtract.io.image import load_image
from invtract.io.nifti_read import read_plain_nifti

REPO = Path(__file__).resolve().parents[2]
FILES = [
    "../shared/data/phantom_cross90/wm_mask.nii.gz", "../shared/data/phantom_cross90/roi_B.nii.gz",
    "../shared/data/real_msmt15/mask.nii.gz", "../shared/data/real_msmt15/roi_A.nii.gz",
    "tests/data/tckgen_refs/roi_incl_u8.nii.gz", "tests/data/tckgen_refs/mask_box.nii.gz",
    "tests/data/tckgen_refs/roi_lps_f32.nii.gz", "tests/data/tckgen_refs/roi_oblique_u8.nii.gz",
    "tests/data/csd/mask.nii.gz", "tests/data/connectome/real_msmt15_parc.nii.gz",
    "tests/data/connectome/phantom_cross90_parc.nii.gz",
]  # fmt: skip


def _both(path: Path, monkeypatch):
    fast = load_image(path)
    with monkeypatch.context() as m:
        m.setattr(image_module, "read_plain_nifti", lambda p: None)
        slow = load_image(path)
    return fast, slow


def _assert_same(a, b):
    assert a.data.dtype == b.data.dtype and a.data.shape == b.data.shape
    assert a.data.tobytes() == b.data.tobytes()
    for x, y in ((a.affine, b.affine), (a.voxel_sizes, b.voxel_sizes), (a.transform, b.transform)):
        assert np.asarray(x).tobytes() == np.asarray(y).tobytes()


@pytest.mark.parametrize("name", FILES)
def test_data_files_read_as_nibabel_reads_them(name, monkeypatch):
    path = REPO / name
    if not path.is_file():
        pytest.skip(f"{path} not present")
    assert read_plain_nifti(str(path)) is not None  # the plain path is the one taken
    _assert_same(*_both(path, monkeypatch))


def _write(path: Path, data, affine, *, order="<", slope=None, inter=0.0, qform_only=False):
    img = nib.Nifti1Image(data, affine)
    img.set_sform(affine, code=0 if qform_only else 2)
    img.set_qform(affine, code=1)
    if slope is not None:
        img.header.set_slope_inter(slope, inter)
    if order == ">":
        img = nib.Nifti1Image(
            data.astype(data.dtype.newbyteorder(">")), None, img.header.as_byteswapped(">")
        )
    nib.save(img, str(path))
    return path


@pytest.mark.parametrize("kind", ["i16_le", "u8_be", "f32_scaled", "i32_qform", "f64_oblique_nii",
                                  "u16_noxform"])  # fmt: skip
def test_synthetic_images(kind, tmp_path, monkeypatch):
    rng = np.random.default_rng(3)
    affine = np.diag([1.5, -2.0, 2.5, 1.0])
    affine[:3, 3] = [10.0, -4.0, 7.25]
    if "oblique" in kind:
        c, s = np.cos(0.3), np.sin(0.3)
        affine[:3, :3] = affine[:3, :3] @ np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    dtype = {"i16": np.int16, "u8": np.uint8, "f32": np.float32, "i32": np.int32,
             "f64": np.float64, "u16": np.uint16}[kind.split("_")[0]]  # fmt: skip
    data = (rng.random((5, 4, 3)) * 100).astype(dtype)
    name = tmp_path / ("img.nii" if kind.endswith("_nii") else "img.nii.gz")
    path = _write(name, data, affine, order=">" if "_be" in kind else "<",
                  slope=0.5 if "scaled" in kind else None, inter=3.0,
                  qform_only="qform" in kind)  # fmt: skip
    if kind == "u16_noxform":
        hdr = nib.load(str(path)).header
        hdr["sform_code"], hdr["qform_code"] = 0, 0
        nib.save(nib.Nifti1Image(data, None, hdr), str(path))
    assert read_plain_nifti(str(path)) is not None
    fast, slow = _both(path, monkeypatch)
    _assert_same(fast, slow)
    if "scaled" in kind:
        want = np.sort(data.astype(np.float64).ravel()) * 0.5 + 3.0  # (axes realigned)
        assert np.allclose(np.sort(fast.data.ravel()), want)


def test_unusual_headers_go_to_nibabel(tmp_path):
    data = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    path = _write(tmp_path / "a.nii", data, np.eye(4))
    raw = bytearray(path.read_bytes())
    assert read_plain_nifti(str(path)) is not None
    odd = bytearray(raw)
    odd[76:80] = np.float32(2.0).tobytes()  # pixdim[0] = 2: nibabel resets it
    (tmp_path / "b.nii").write_bytes(bytes(odd))
    four_d = _write(tmp_path / "c.nii.gz", data[..., None], np.eye(4))
    (tmp_path / "d.nii.gz").write_bytes(gzip.compress(bytes(raw[:380])))  # truncated
    for name in ("b.nii", "c.nii.gz", "d.nii.gz"):
        assert read_plain_nifti(str(tmp_path / name)) is None, name
    assert four_d.is_file()


def test_connectome_command_imports_no_heavy_modules(tmp_path):
    """``invtract connectome`` on a .tck and a NIfTI parcellation: no nibabel, scipy, torch."""
    tck = REPO.parent / "shared" / "data" / "real_msmt15" / "whole.tck"
    if not tck.is_file():
        pytest.skip("shared data not present")
    parc = REPO / "tests" / "data" / "connectome" / "real_msmt15_parc.nii.gz"
    code = (
        "import sys\nfrom invtract.cli import main\n"
        f"assert main(['-q', 'connectome', {str(tck)!r}, {str(parc)!r}, "
        f"{str(tmp_path / 'o.csv')!r}]) == 0\n"
        "heavy = ('nibabel', 'scipy', 'torch', 'dipy', 'numba')\n"
        "print(sorted(m for m in heavy if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    assert (tmp_path / "o.csv").is_file()
