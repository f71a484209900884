"""Images: NIfTI / MRtrix readers, FOD and mask validation, writers."""

from __future__ import annotations

import gzip
import os

import nibabel as nib
import numpy as np
import pytest

from invtract.errors import ConfigError, FormatError, ShapeError
from invtract.io import (
    Image,
    check_same_grid,
    load_fod,
    load_image,
    load_mask,
    save_mif,
    save_nifti,
)
from invtract.io.mif import read_mif_header

CASES = ("real_msmt15", "phantom_cross90")
ROI = {"real_msmt15": "roi_A", "phantom_cross90": "roi_B"}


def _affine(rot_deg: float = 20.0, vox=(2.0, 2.5, 3.0), origin=(-10.0, 5.0, 3.0)) -> np.ndarray:
    c, s = np.cos(np.radians(rot_deg)), np.sin(np.radians(rot_deg))
    rot = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    aff = np.eye(4)
    aff[:3, :3] = rot * np.asarray(vox)[None, :]
    aff[:3, 3] = origin
    return aff


def _write_mif(path, data_bytes: bytes, header_lines: list[str], gz: bool = False) -> None:
    text = "mrtrix image\n" + "\n".join(header_lines) + "\n"
    offset = 256
    head = (text + f"file: . {offset}\nEND\n").encode()
    blob = head + b"\0" * (offset - len(head)) + data_bytes
    if gz:
        with gzip.open(path, "wb") as f:
            f.write(blob)
    else:
        with open(path, "wb") as f:
            f.write(blob)


# -- shared data: .mif == .nii.gz -------------------------------------------------------------
@pytest.mark.parametrize("case", CASES)
def test_shared_fod_mif_equals_nifti(shared_data, case):
    a = load_fod(shared_data / case / "fod.mif")
    b = load_fod(shared_data / case / "fod.nii.gz")
    assert a.data.dtype == np.float32 and b.data.dtype == np.float32
    assert a.shape == b.shape and a.shape[3] == 45
    np.testing.assert_array_equal(a.data, b.data)
    np.testing.assert_allclose(a.affine, b.affine, atol=1e-4)
    np.testing.assert_allclose(a.voxel_sizes, b.voxel_sizes, rtol=1e-6)
    np.testing.assert_allclose(a.affine, nib.load(shared_data / case / "fod.nii.gz").affine)
    check_same_grid(a, b, "fod.mif vs fod.nii.gz")


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("which", ["mask", "roi"])
def test_shared_mask_mif_equals_nifti(shared_data, case, which):
    name = "mask" if which == "mask" else ROI[case]
    a = load_mask(shared_data / case / f"{name}.mif")
    b = load_mask(shared_data / case / f"{name}.nii.gz")
    assert a.data.dtype == bool and a.data.ndim == 3
    np.testing.assert_array_equal(a.data, b.data)
    np.testing.assert_allclose(a.affine, b.affine, atol=1e-4)
    expected = {"real_msmt15": (2218, 8), "phantom_cross90": (2940, 12)}[case]
    assert int(a.data.sum()) == expected[0 if which == "mask" else 1]


def test_shared_real_geometry(shared_data):
    im = load_image(shared_data / "real_msmt15" / "fod.mif")
    assert im.voxel_sizes == (2.5, 2.5, 2.5)
    np.testing.assert_allclose(im.affine[0], [2.4963, 0.1075, 0.0829, 4.0162], atol=1e-4)
    np.testing.assert_allclose(im.scanner2voxel @ np.r_[im.affine[:3, 3], 1.0], 0, atol=1e-9)


# -- MRtrix layouts / datatypes vs mrconvert --------------------------------------------------
@pytest.mark.parametrize("strides", ["-1,3,-2", "3,-1,2", "2,3,1"])
def test_mif_layouts_match_mrconvert_mask(shared_data, mrtrix, tmp_path, strides):
    src = shared_data / "real_msmt15" / "mask.mif"
    mif, nii = tmp_path / "m.mif", tmp_path / "m.nii"
    mrtrix("mrconvert", src, mif, "-strides", strides, "-datatype", "uint8")
    mrtrix("mrconvert", mif, nii)
    a, b = load_mask(mif), load_mask(nii)
    np.testing.assert_array_equal(a.data, b.data)
    np.testing.assert_allclose(a.affine, b.affine, atol=1e-4)
    # same geometry as the original: every true voxel maps to the same world point set
    ref = load_mask(src)

    def pts(im):
        world = (im.affine[:3, :3] @ np.argwhere(im.data).T).T + im.affine[:3, 3]
        return np.sort(np.round(world, 3), axis=0)

    np.testing.assert_allclose(pts(a), pts(ref), atol=1e-3)


@pytest.mark.parametrize("strides", ["-2,3,4,1", "3,-1,2,4", "1,2,3,4"])
def test_mif_layouts_match_mrconvert_fod(shared_data, mrtrix, tmp_path, strides):
    mif, nii = tmp_path / "f.mif", tmp_path / "f.nii"
    mrtrix("mrconvert", shared_data / "phantom_cross90" / "fod.mif", mif, "-strides", strides)
    mrtrix("mrconvert", mif, nii)
    a, b = load_fod(mif), load_fod(nii)
    np.testing.assert_array_equal(a.data, b.data)
    np.testing.assert_allclose(a.affine, b.affine, atol=1e-5)


def test_mif_negative_volume_stride_keeps_logical_order(shared_data, mrtrix, tmp_path):
    # A reversed volume axis must not reverse the SH coefficients (mrconvert's NIfTI writer
    # does reverse them, so compare with the original instead).
    src = shared_data / "phantom_cross90" / "fod.mif"
    mif = tmp_path / "f.mif"
    mrtrix("mrconvert", src, mif, "-strides", "1,2,3,-4")
    assert read_mif_header(mif).layout[3] < 0
    np.testing.assert_array_equal(load_fod(mif).data, load_fod(src).data)


@pytest.mark.parametrize(
    "datatype", ["int16", "uint16be", "int32le", "float64be", "float32be", "int8", "bit"]
)
def test_mif_datatypes_match_mrconvert(shared_data, mrtrix, tmp_path, datatype):
    src = shared_data / "phantom_cross90" / ("mask.mif" if datatype == "bit" else "fod.mif")
    mif, nii = tmp_path / "x.mif", tmp_path / "x.nii"
    args = ["-coord", "3", "0:2"] if datatype != "bit" else []
    if datatype.startswith(("int", "uint")):  # make integer-valued data first
        mrtrix("mrcalc", src, "1000", "-mult", tmp_path / "s.mif")
        src = tmp_path / "s.mif"
    mrtrix("mrconvert", src, mif, "-datatype", datatype, *args)
    mrtrix("mrconvert", mif, nii, "-datatype", "float64")
    np.testing.assert_allclose(load_image(mif).data, load_image(nii).data, rtol=1e-6, atol=1e-6)


def test_mih_and_mif_gz(shared_data, mrtrix, tmp_path):
    src = shared_data / "real_msmt15" / "fod.mif"
    mrtrix("mrconvert", src, tmp_path / "f.mih")
    mrtrix("mrconvert", src, tmp_path / "f.mif.gz")
    ref = load_fod(src)
    for name in ("f.mih", "f.mif.gz"):
        im = load_fod(tmp_path / name)
        np.testing.assert_array_equal(im.data, ref.data)
        np.testing.assert_allclose(im.affine, ref.affine)


def test_mif_scaling_and_default_transform(tmp_path):
    raw = np.arange(24, dtype="<i2")
    _write_mif(
        tmp_path / "s.mif",
        raw.tobytes(),
        ["dim: 2,3,4", "vox: 2,3,4", "layout: +0,+1,+2", "datatype: Int16LE", "scaling: 1.5,0.5"],
    )
    im = load_image(tmp_path / "s.mif")
    assert im.data.dtype == np.float32
    np.testing.assert_allclose(im.data, 1.5 + 0.5 * raw.reshape(4, 3, 2).transpose(2, 1, 0))
    # no transform: identity rotation, centred on the origin (MRtrix default)
    np.testing.assert_allclose(im.affine[:3, 3], [-1.0, -3.0, -6.0])
    np.testing.assert_allclose(np.diag(im.affine)[:3], [2.0, 3.0, 4.0])


def test_mif_gz_handwritten(tmp_path):
    raw = np.arange(8, dtype=">f4")
    _write_mif(
        tmp_path / "h.mif.gz",
        raw.tobytes(),
        [
            "dim: 2,2,2",
            "vox: 1,1,1",
            "layout: -0,+1,+2  # comment",
            "datatype: Float32BE",
            "transform: 1,0,0,0",
            "transform: 0,1,0,0",
            "transform: 0,0,1,0",
        ],
        gz=True,
    )
    im = load_image(tmp_path / "h.mif.gz")
    # MRtrix's logical order (the transform is already RAS): storage position 0 along axis 0
    # is logical index 1, so the data come back reversed along axis 0, the affine unchanged
    np.testing.assert_array_equal(im.affine, np.eye(4))
    np.testing.assert_array_equal(im.data, raw.astype(np.float32).reshape(2, 2, 2).T[::-1])


_OK = {"dim": "2,2,2", "vox": "1,1,1", "layout": "+0,+1,+2", "datatype": "Float32LE"}


def _hdr(**kw) -> bytes:
    keys = {**_OK, "file": ". 99", **kw}
    lines = [f"{k}: {v}" for k, v in keys.items() if v is not None]
    return ("mrtrix image\n" + "\n".join(lines) + "\nEND\n").encode()


@pytest.mark.parametrize(
    "content, match",
    [
        (b"", "not an MRtrix image"),
        (b"not an image\nEND\n", "not an MRtrix image"),
        (b"mrtrix image\ndim: 2,2,2\n", "no END"),
        (_hdr(dim=None), "dim"),
        (_hdr(layout="+0,+0,+2"), "layout"),
        (_hdr(datatype="CFloat32"), "datatype"),
        (_hdr(file=". 90") + b"\0" * 20, "truncated"),
        (_hdr(file="missing.dat"), "cannot read image data"),
    ],
    ids=["empty", "no_magic", "no_end", "no_dim", "bad_layout", "complex", "truncated", "no_dat"],
)
def test_mif_malformed(tmp_path, content, match):
    p = tmp_path / "bad.mif"
    p.write_bytes(content)
    with pytest.raises(FormatError, match=match) as info:
        load_image(p)
    assert str(p) in str(info.value)


# -- load_fod validation ----------------------------------------------------------------------
def _nifti(tmp_path, data, affine=None, name="x.nii.gz", **hdr):
    img = nib.Nifti1Image(np.asarray(data), _affine() if affine is None else affine)
    for k, v in hdr.items():
        img.header[k] = v
    path = tmp_path / name
    nib.save(img, path)
    return path


def test_load_fod_missing_and_unknown(tmp_path):
    with pytest.raises(FormatError, match="no such file"):
        load_fod(tmp_path / "nope.nii.gz")
    (tmp_path / "x.img").write_bytes(b"")
    with pytest.raises(FormatError, match="unsupported image format"):
        load_fod(tmp_path / "x.img")
    (tmp_path / "junk.nii").write_bytes(b"junk" * 10)
    with pytest.raises(FormatError, match="junk.nii"):
        load_fod(tmp_path / "junk.nii")


def test_load_fod_shape_errors(tmp_path):
    with pytest.raises(ShapeError, match="4-D"):
        load_fod(_nifti(tmp_path, np.zeros((3, 3, 3), np.float32)))
    with pytest.raises(ShapeError, match=r"10 volumes.*1, 6, 15, 28, 45"):
        load_fod(_nifti(tmp_path, np.zeros((3, 3, 3, 10), np.float32)))


@pytest.mark.parametrize("bad", ["singular", "nan"])
def test_load_fod_bad_affine(tmp_path, bad):
    aff = _affine()
    if bad == "singular":
        aff[:3, 2] = aff[:3, 0]
    else:
        aff[0, 3] = np.nan
    img = nib.Nifti1Image(np.zeros((2, 2, 2, 6), np.float32), aff)
    nib.save(img, tmp_path / "a.nii")
    with pytest.raises(FormatError, match="affine"):
        load_fod(tmp_path / "a.nii")


def test_load_fod_nan_allowed_and_scaling(tmp_path):
    data = np.ones((2, 2, 2, 6), np.int16)
    path = _nifti(tmp_path, data, scl_slope=0.25, scl_inter=1.0)
    im = load_fod(path)
    assert im.data.dtype == np.float32
    np.testing.assert_allclose(im.data, 1.25)
    f = np.ones((2, 2, 2, 15), np.float32)
    f[0, 0, 0] = np.nan
    im = load_fod(_nifti(tmp_path, f, name="nan.nii"))
    assert np.isnan(im.data[0, 0, 0]).all() and np.isfinite(im.data[1]).all()
    assert im.voxel_sizes == pytest.approx((2.0, 2.5, 3.0))


def test_load_fod_basis(tmp_path):
    rng = np.random.default_rng(0)
    data = rng.standard_normal((2, 2, 2, 15)).astype(np.float32)
    path = _nifti(tmp_path, data)
    np.testing.assert_array_equal(load_fod(path, sh_basis="tournier07").data, data)
    legacy = load_fod(path, sh_basis="tournier07_legacy").data
    np.testing.assert_allclose(legacy[..., 0], data[..., 0])
    np.testing.assert_allclose(legacy[..., 1], data[..., 1] / np.sqrt(2), rtol=1e-6)
    with pytest.raises(ConfigError, match="descoteaux07_legacy"):
        load_fod(path, sh_basis="fsl")


# -- load_mask --------------------------------------------------------------------------------
def test_load_mask_float_rule(tmp_path):
    vals = np.array([0.0, 0.49, 0.5, -0.5, -0.49, np.nan, np.inf, 2.0], np.float32)
    im = load_mask(_nifti(tmp_path, vals.reshape(2, 2, 2)))
    expected = np.array([0, 0, 1, 1, 0, 0, 0, 1], bool).reshape(2, 2, 2)
    np.testing.assert_array_equal(im.data, expected)
    assert im.data.dtype == bool


def test_load_mask_int_and_4d(tmp_path):
    vals = np.array([0, 1, -3, 0, 7, 0, 0, 2], np.int16).reshape(2, 2, 2, 1)
    im = load_mask(_nifti(tmp_path, vals))
    np.testing.assert_array_equal(im.data, vals[..., 0] != 0)
    with pytest.raises(ShapeError, match="3-D"):
        load_mask(_nifti(tmp_path, np.zeros((2, 2, 2, 3), np.uint8), name="m4.nii"))


def test_check_same_grid():
    a = Image(np.zeros((2, 3, 4)), _affine(), (2.0, 2.5, 3.0))
    b = Image(np.zeros((2, 3, 4, 6)), _affine() + 5e-5, (2.0, 2.5, 3.0))
    check_same_grid(a, b, "a vs b")
    with pytest.raises(ShapeError, match="affine mismatch"):
        check_same_grid(a, Image(b.data, _affine(rot_deg=21.0), (2, 2, 2)), "a vs b")
    with pytest.raises(ShapeError, match="shapes"):
        check_same_grid(a, Image(np.zeros((2, 3, 5)), _affine(), (2, 2, 2)), "a vs b")


# -- writers ----------------------------------------------------------------------------------
def test_save_nifti_roundtrip_like(tmp_path):
    import torch

    rng = np.random.default_rng(1)
    src = nib.Nifti1Image(rng.standard_normal((3, 4, 5, 6)).astype(np.float32), _affine())
    src.header.set_xyzt_units("mm", "sec")
    src.header["descrip"] = b"source fod"
    nib.save(src, tmp_path / "in.nii.gz")
    like = load_fod(tmp_path / "in.nii.gz")
    new = torch.as_tensor(like.data * 2, dtype=torch.float64)
    out = tmp_path / "out.nii.gz"
    save_nifti(out, new, like.affine, like=like)
    back = load_fod(out)
    np.testing.assert_allclose(back.data, like.data * 2, rtol=1e-6)
    np.testing.assert_allclose(back.affine, like.affine, atol=1e-5)
    hdr = nib.load(out).header
    assert hdr.get_data_dtype() == np.float32 and hdr["descrip"].tobytes().startswith(b"source")
    assert sorted(os.listdir(tmp_path)) == ["in.nii.gz", "out.nii.gz"]  # no temp leftovers
    with pytest.raises(FormatError, match="exists"):
        save_nifti(out, new, like.affine, overwrite=False)
    with pytest.raises(ShapeError, match="affine mismatch"):
        save_nifti(tmp_path / "o2.nii", new, _affine(rot_deg=5.0), like=like)


def test_save_nifti_interrupted_leaves_nothing(tmp_path, monkeypatch):
    def boom(img, filename):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(nib, "save", boom)
    with pytest.raises(KeyboardInterrupt):
        save_nifti(tmp_path / "o.nii.gz", np.zeros((2, 2, 2), np.float32), _affine())
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("name", ["o.mif", "o.mif.gz"])
@pytest.mark.parametrize("kind", ["float", "bool"])
def test_save_mif_roundtrip(tmp_path, name, kind):
    rng = np.random.default_rng(2)
    data = rng.standard_normal((3, 4, 5, 6)).astype(np.float32)
    if kind == "bool":
        data = data[..., 0] > 0
    im = Image(data, _affine(), (2.0, 2.5, 3.0))
    save_mif(tmp_path / name, im)
    back = load_mask(tmp_path / name) if kind == "bool" else load_image(tmp_path / name)
    np.testing.assert_array_equal(back.data, data)
    np.testing.assert_allclose(back.affine, im.affine, atol=1e-9)
    assert back.voxel_sizes == pytest.approx(im.voxel_sizes)


def test_save_mif_readable_by_mrtrix(tmp_path, mrtrix):
    data = np.random.default_rng(3).standard_normal((3, 4, 5, 6)).astype(np.float32)
    save_mif(tmp_path / "o.mif", Image(data, _affine(), (2.0, 2.5, 3.0)))
    mrtrix("mrconvert", tmp_path / "o.mif", tmp_path / "o.nii")
    back = load_image(tmp_path / "o.nii")
    np.testing.assert_array_equal(back.data, data)
    np.testing.assert_allclose(back.affine, _affine(), atol=1e-5)
    save_mif(tmp_path / "m.mif", Image(data[..., 0] > 0, _affine(), (2.0, 2.5, 3.0)))
    assert "Bit" in mrtrix("mrinfo", tmp_path / "m.mif", "-datatype")
    mrtrix("mrconvert", tmp_path / "m.mif", tmp_path / "m.nii", "-datatype", "uint8")
    np.testing.assert_array_equal(load_mask(tmp_path / "m.nii").data, data[..., 0] > 0)
