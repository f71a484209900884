"""4-D images read in blocks into the tracker's layout: same values as a whole-array read,
every axis realignment, datatype, scaling and block boundary; no full-size temporaries."""

from __future__ import annotations

import gzip
import mmap
import tracemalloc

import nibabel as nib
import numpy as np
import pytest

from invtract.errors import FormatError, ShapeError
from invtract.io import load_fod, load_image
from invtract.io import voxel_major as vm
from invtract.io.geometry import realign, sanitise_transform
from invtract.io.nifti_transform import nifti_transform
from invtract.io.voxel_major import copy_voxel_major, is_voxel_major

# image axes -> scanner: identity, flipped axes, permuted + flipped, oblique
AFFINES = {
    "ras": np.diag([2.0, 2.0, 2.0, 1.0]),
    "las_flip_y": np.diag([-1.5, -2.0, 2.5, 1.0]),
    "permuted": np.array(
        [[0.0, 0.0, -2.0, 10.0], [2.5, 0.0, 0.0, -3.0], [0.0, -1.25, 0.0, 4.0], [0, 0, 0, 1]]
    ),
    "oblique": np.array(
        [[1.8, -0.87, 0.1, -5.0], [0.87, 1.8, 0.2, 2.0], [-0.1, -0.2, -2.0, 7.0], [0, 0, 0, 1]]
    ),
}


def _expected(path) -> np.ndarray:
    """The whole-array reference: nibabel's scaled array (float32 of the double product),
    realigned as MRtrix3 does."""
    img = nib.load(path)
    raw = np.asanyarray(img.dataobj.get_unscaled())
    slope, inter = img.dataobj.slope, img.dataobj.inter
    slope = 1.0 if slope is None or not np.isfinite(slope) or slope == 0 else float(slope)
    inter = 0.0 if inter is None or not np.isfinite(inter) else float(inter)
    if (slope, inter) != (1.0, 0.0):
        raw = (raw.astype(np.float64) * slope + inter).astype(np.float32)
    transform, spacing = sanitise_transform(*nifti_transform(img.header))
    return realign(transform, spacing, img.shape[:3]).reorient(raw.astype(np.float32))


def _write(tmp_path, name, data, affine, slope=None, inter=None):
    img = nib.Nifti1Image(data, affine)
    if slope is not None:
        img.header.set_slope_inter(slope, inter)
    path = tmp_path / name
    nib.save(img, path)
    return path


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of a few kB, so that tiny images cross many (and partial) block boundaries."""
    monkeypatch.setattr(vm, "BLOCK_BYTES", 3000)


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
@pytest.mark.parametrize("geom", sorted(AFFINES))
def test_nifti_blocks_equal_whole_array(tmp_path, small_blocks, suffix, geom):
    rng = np.random.default_rng(1)
    data = rng.standard_normal((7, 6, 9, 15)).astype(np.float32)
    data[1, 2, 3] = np.nan
    path = _write(tmp_path, "f" + suffix, data, AFFINES[geom])
    im = load_fod(path)
    expected = _expected(path)
    assert im.data.dtype == np.float32 and is_voxel_major(im.data)
    assert im.data.shape == expected.shape
    np.testing.assert_array_equal(im.data, expected)
    if geom in ("ras", "las_flip_y"):  # axial: stored as MRtrix stores FODs (+1,+2,+3,+0)
        assert im.data.transpose(2, 1, 0, 3).flags.c_contiguous
    assert geom == "ras" or not np.array_equal(im.data, data)  # realignment did something


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
@pytest.mark.parametrize(
    "dtype, slope, inter",
    [(">f4", None, None), ("<f8", None, None), ("<i2", 0.37, -1.5), ("<f4", 2.0, 0.25)],
)
def test_nifti_blocks_datatypes_and_scaling(tmp_path, small_blocks, suffix, dtype, slope, inter):
    rng = np.random.default_rng(2)
    data = (rng.standard_normal((5, 4, 6, 6)) * 100).astype(dtype)
    path = _write(tmp_path, "s" + suffix, data, AFFINES["las_flip_y"], slope, inter)
    im = load_fod(path)
    assert im.data.dtype == np.float32 and is_voxel_major(im.data)
    np.testing.assert_array_equal(im.data, _expected(path))


def test_gzip_volume_groups_cover_remainder(tmp_path, monkeypatch):
    """45 volumes in groups of 9 (a fifth), then groups of 2 with a remainder of 1."""
    data = np.arange(3 * 4 * 5 * 45, dtype=np.float32).reshape(3, 4, 5, 45)
    path = _write(tmp_path, "g.nii.gz", data, AFFINES["permuted"])
    np.testing.assert_array_equal(load_fod(path).data, _expected(path))
    monkeypatch.setattr(vm, "GZIP_PASSES", 40)
    np.testing.assert_array_equal(load_fod(path).data, _expected(path))


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_truncated_nifti_is_a_format_error(tmp_path, suffix):
    data = np.ones((4, 4, 4, 6), np.float32)
    path = _write(tmp_path, "t.nii", data, AFFINES["ras"])
    blob = path.read_bytes()[:-100]
    out = tmp_path / ("cut" + suffix)
    out.write_bytes(gzip.compress(blob) if suffix == ".nii.gz" else blob)
    with pytest.raises(FormatError, match="cut.nii"):
        load_fod(out)


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_nifti_load_peak_memory_is_one_copy(tmp_path, monkeypatch, suffix):
    """Peak of Python/numpy allocations while loading ~ the float32 result plus one block
    (the whole-array path held two full copies: the file's order and the voxel order)."""
    data = np.random.default_rng(3).standard_normal((40, 30, 20, 15)).astype(np.float32)
    path = _write(tmp_path, "m" + suffix, data, AFFINES["las_flip_y"])
    nbytes = data.nbytes  # 1.44 MB
    monkeypatch.setattr(vm, "BLOCK_BYTES", nbytes // 16)
    monkeypatch.setattr(vm, "GZIP_PASSES", 5)
    monkeypatch.setattr(vm, "READ_BYTES", 16384)
    tracemalloc.start()
    try:
        im = load_fod(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    np.testing.assert_array_equal(im.data, _expected(path))
    assert peak < 1.3 * nbytes, f"peak {peak} bytes for a {nbytes}-byte image"


def test_mif_volume_major_copied_once(tmp_path, mrtrix, monkeypatch):
    """A .mif stored volume by volume (strides 1,2,3,4) comes back voxel-major (a copy), equal
    to the voxel-major .mif of the same image; a voxel-major .mif stays mapped (no copy)."""
    monkeypatch.setattr(vm, "BLOCK_BYTES", 2000)
    data = np.random.default_rng(4).standard_normal((6, 5, 7, 6)).astype(np.float32)
    src = _write(tmp_path, "v.nii", data, AFFINES["oblique"])
    mrtrix("mrconvert", src, tmp_path / "vol.mif", "-strides", "1,2,3,4")
    mrtrix("mrconvert", src, tmp_path / "vox.mif", "-strides", "2,3,4,1")
    a, b = load_image(tmp_path / "vol.mif"), load_image(tmp_path / "vox.mif")
    assert is_voxel_major(a.data) and a.data.dtype == np.float32
    assert not (isinstance(a.data, np.memmap) or isinstance(a.data.base, np.memmap))
    assert isinstance(b.data, np.memmap) or isinstance(b.data.base, np.memmap)
    np.testing.assert_array_equal(a.data, b.data)
    np.testing.assert_array_equal(a.data, load_fod(src).data)


def test_copy_voxel_major_scaling_and_layout():
    rng = np.random.default_rng(5)
    src = np.asfortranarray(rng.integers(-50, 50, (5, 6, 7, 3)).astype(np.int16))
    assert not is_voxel_major(src) and is_voxel_major(np.ascontiguousarray(src))
    assert not is_voxel_major(np.ascontiguousarray(src)[::-1])
    out = copy_voxel_major(src[:, ::-1], (0.5, 0.1))
    assert is_voxel_major(out) and out.dtype == np.float32
    assert out.transpose(2, 1, 0, 3).flags.c_contiguous  # MRtrix's +1,+2,+3,+0
    expected = (src[:, ::-1].astype(np.float64) * 0.1 + 0.5).astype(np.float32)
    np.testing.assert_array_equal(out, expected)


def test_empty_float32_large_is_a_writable_private_mapping():
    a = vm.empty_float32((64, 64, 64, 3))  # 3 MiB: its own anonymous mapping
    assert isinstance(a.base.base.obj, mmap.mmap) and a.flags.writeable and a.flags.c_contiguous
    a[...] = 1.5
    assert a.dtype == np.float32 and float(a.sum()) == 1.5 * a.size
    small = vm.empty_float32((4, 4, 4, 6))
    assert small.shape == (4, 4, 4, 6) and small.dtype == np.float32


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_basis_conversion_in_place_keeps_layout(tmp_path, small_blocks, suffix):
    from invtract.io.sh_basis import to_mrtrix_basis

    data = np.random.default_rng(6).standard_normal((6, 5, 7, 15)).astype(np.float32)
    path = _write(tmp_path, "b" + suffix, data, AFFINES["las_flip_y"])
    im = load_fod(path, sh_basis="descoteaux07_legacy")
    assert is_voxel_major(im.data) and im.data.dtype == np.float32
    expected = to_mrtrix_basis(_expected(path), "descoteaux07_legacy").astype(np.float32)
    np.testing.assert_array_equal(im.data, expected)


@pytest.mark.parametrize("layout", ["c_order", "mapped_z_slowest"])
def test_masked_voxel_values_equal_whole_array(tmp_path, small_blocks, layout):
    """The rows of the chosen volumes at the finite voxels inside the mask, in C order of the
    grid, whatever axis the slabs run along (many slabs, the last partial)."""
    X, Y, Z, N = 6, 5, 7, 4
    data = np.random.default_rng(7).standard_normal((X, Y, Z, N)).astype(np.float32)
    data[1, 2, 3, 2] = np.nan  # a voxel with a non-finite chosen value is left out
    data[2, 0, 4, 3] = np.inf  # one in a volume not chosen is kept
    mask = np.random.default_rng(8).random((X, Y, Z)) > 0.3
    mask[1, 2, 3] = mask[2, 0, 4] = True
    if layout == "c_order":
        src = data
    else:
        path = tmp_path / "zyxn.raw"
        data.transpose(2, 1, 0, 3).tofile(path)
        src = np.memmap(path, np.float32, "c", shape=(Z, Y, X, N)).transpose(2, 1, 0, 3)
        assert int(np.argmax(src.strides[:3])) == 2
    volumes = np.array([0, 2])
    values, index = vm.masked_voxel_values(src, volumes, mask)
    keep = mask & np.isfinite(data[..., volumes]).all(-1)
    assert not keep[1, 2, 3] and keep[2, 0, 4]
    np.testing.assert_array_equal(index, np.flatnonzero(keep))
    np.testing.assert_array_equal(values, data[..., volumes].reshape(-1, 2)[index])
    assert values.dtype == np.float32 and values.flags.c_contiguous
    all_finite, every = vm.masked_voxel_values(src, volumes)
    np.testing.assert_array_equal(every, np.flatnonzero(np.isfinite(data[..., volumes]).all(-1)))


@pytest.mark.parametrize("name", ["v.nii", "v.nii.gz", "vol.mif", "vox.mif", "i2.nii.gz"])
def test_image_file_voxel_values_equal_the_loaded_image(tmp_path, small_blocks, request, name):
    """ImageFile.voxel_values of any layout and format (scaled integers included) are the
    loaded image's values at the masked, finite voxels; shape and affine are load_image's."""
    from invtract.io.image import open_image

    rng = np.random.default_rng(10)
    data = (rng.standard_normal((6, 5, 7, 9)) * 50).astype(np.float32)
    data[2, 3, 4, 5] = np.nan
    src = tmp_path / "v.nii"
    if name == "i2.nii.gz":
        _write(tmp_path, name, np.nan_to_num(data).astype("<i2"), AFFINES["permuted"], 0.5, 2.0)
    else:
        _write(tmp_path, "v.nii", data, AFFINES["permuted"])
    if name == "v.nii.gz":
        _write(tmp_path, name, data, AFFINES["permuted"])
    if name.endswith(".mif"):
        strides = "1,2,3,4" if name == "vol.mif" else "2,3,4,1"
        mrtrix = request.getfixturevalue("mrtrix")  # skips without MRtrix3
        mrtrix("mrconvert", src, tmp_path / name, "-strides", strides)
    whole = load_image(tmp_path / name)
    f = open_image(tmp_path / name)
    assert f.shape == whole.data.shape and np.array_equal(f.affine, whole.affine)
    mask = rng.random(whole.data.shape[:3]) > 0.4
    volumes = np.array([5, 1, 8])
    values, index = f.voxel_values(volumes, mask)
    keep = mask & np.isfinite(whole.data[..., volumes]).all(-1)
    np.testing.assert_array_equal(index, np.flatnonzero(keep))
    np.testing.assert_array_equal(values, whole.data[..., volumes].reshape(-1, 3)[index])
    every, index = f.voxel_values(np.arange(9))  # no mask; gzip'd: whole groups in order
    np.testing.assert_array_equal(index, np.flatnonzero(np.isfinite(whole.data).all(-1)))
    np.testing.assert_array_equal(every, whole.data.reshape(-1, 9)[index])
    with pytest.raises(ShapeError, match="has 9 volumes"):
        f.voxel_values(np.array([2, 9]))
    with pytest.raises(ShapeError, match="4-D"):
        open_image(_write(tmp_path, "three.nii", data[..., 0], AFFINES["ras"]))
