"""``.mif`` data are memory-mapped copy-on-write: no copy on load, the file never changes."""

from __future__ import annotations

import numpy as np
import pytest

from invtract.errors import FormatError
from invtract.io.image import load_fod
from invtract.io.mif import read_mif, write_mif


def _fod(tmp_path):
    rng = np.random.default_rng(1)
    data = rng.standard_normal((5, 6, 4, 15)).astype(np.float32)
    path = tmp_path / "fod.mif"
    write_mif(path, data, np.diag([2.0, 2.0, 2.0, 1.0]))
    return path, data


def _mapped(arr: np.ndarray) -> bool:
    while arr is not None:
        if isinstance(arr, np.memmap) and arr._mmap is not None:
            return True
        arr = arr.base if isinstance(arr.base, np.ndarray) else None
    return False


def test_native_float32_is_mapped_not_copied(tmp_path, mrtrix):
    path, data = _fod(tmp_path)
    arr, *_ = read_mif(path)
    np.testing.assert_array_equal(arr, data)
    assert _mapped(arr)
    # stored volume by volume: load_fod makes the tracker's layout once (C order, unmapped)
    img = load_fod(path)
    assert not _mapped(img.data) and img.data.transpose(2, 1, 0, 3).flags.c_contiguous
    np.testing.assert_array_equal(img.data, data)
    # stored voxel by voxel (MRtrix's default for FODs), float32 without scaling: no copy
    fast = tmp_path / "fast.mif"
    mrtrix("mrconvert", path, fast, "-strides", "2,3,4,1")
    assert _mapped(load_fod(fast).data)


def test_writes_stay_private(tmp_path, mrtrix):
    path, data = _fod(tmp_path)
    mrtrix("mrconvert", path, tmp_path / "fast.mif", "-strides", "2,3,4,1")
    path = tmp_path / "fast.mif"
    before = path.read_bytes()
    img = load_fod(path)
    assert _mapped(img.data)
    img.data[...] = 7.0  # copy-on-write: this process sees it, the file does not
    assert float(img.data[0, 0, 0, 0]) == 7.0
    assert path.read_bytes() == before
    np.testing.assert_array_equal(read_mif(path)[0], data)


def test_truncated_mapped_data_is_an_error(tmp_path):
    path, _ = _fod(tmp_path)
    blob = path.read_bytes()
    path.write_bytes(blob[:-8])
    with pytest.raises(FormatError, match="truncated"):
        read_mif(path)


def test_volume_fastest_layout_is_a_voxel_major_view(tmp_path, mrtrix):
    path, data = _fod(tmp_path)
    fast = tmp_path / "fast.mif"
    mrtrix("mrconvert", path, fast, "-strides", "2,3,4,1")
    arr, *_ = read_mif(fast)
    np.testing.assert_array_equal(arr, data)
    assert _mapped(arr)
    assert arr.strides[3] == 4 and not arr.flags.c_contiguous  # [z, y, x, k] in memory
