"""Scratch arrays (invtract.io.scratch): a working copy in an unlinked file's shared mapping,
resident only where touched; the FOD fit's copy and its NIfTI output through them."""

from __future__ import annotations

import gzip
import os
import tempfile

import numpy as np
import pytest
import torch

from invtract.fit.optimise import c_order_fod, fod_field
from invtract.io import image as image_io
from invtract.io import scratch, voxel_major
from invtract.io.image import Image, save_nifti
from invtract.io.scratch import is_scratch, release, scratch_array


def _rss_kb() -> int:
    with open("/proc/self/status") as f:
        return next(int(x.split()[1]) for x in f if x.startswith("VmRSS"))


def test_a_scratch_array_has_no_name_keeps_its_values_and_leaves_memory_when_released(tmp_path):
    a = scratch_array((64, 1024, 1024), np.float32, tmp_path)  # 256 MiB
    assert list(tmp_path.iterdir()) == []  # unlinked: nothing left behind
    assert is_scratch(a) and is_scratch(a[3:5]) and not is_scratch(np.zeros(3))
    assert float(a[7].max()) == 0.0
    a[:] = 2.5
    if os.path.exists("/proc/self/status"):
        before = _rss_kb()
        release(a)
        assert before - _rss_kb() > 200 * 1024  # the written pages left the resident set
    assert float(a[40].sum()) == 2.5 * 1024 * 1024  # ... and kept their values
    plain = np.ones(4)
    release(plain)  # not a scratch array: nothing happens
    assert plain.sum() == 4


def test_c_order_fod_into_scratch_equals_the_copy_in_memory(tmp_path, monkeypatch):
    monkeypatch.setattr(voxel_major, "BLOCK_BYTES", 3000)  # many slabs
    monkeypatch.setattr(scratch, "SCRATCH_BYTES", 0)  # any size goes to a scratch file
    rng = np.random.default_rng(0)
    src = np.asfortranarray(rng.standard_normal((6, 5, 7, 15)).astype(np.float32))
    src[2, 3] = 0  # all-zero voxels
    mem, scr = c_order_fod(src), c_order_fod(src, tmp_path)
    assert is_scratch(scr) and not is_scratch(mem) and scr.flags.c_contiguous
    assert np.array_equal(mem, scr)
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    f_mem, f_scr = (fod_field(Image(a, aff, (2.0, 2.0, 2.0), "x")) for a in (mem, scr))
    assert torch.equal(f_mem.nonzero_flat, f_scr.nonzero_flat)
    assert int((~f_scr.nonzero_flat).sum()) == 7
    f_scr.sh_flat[3] = 9.0  # the field shares the scratch copy (a fit writes its rows there)
    assert float(scr.reshape(-1, 15)[3, 0]) == 9.0


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_save_nifti_of_a_scratch_array_writes_the_same_image(tmp_path, monkeypatch, suffix):
    """A scratch array is written volume group by volume group from released slabs: the file
    holds the same bytes as nibabel's own writer makes from an array in memory."""
    monkeypatch.setattr(voxel_major, "BLOCK_BYTES", 4000)
    monkeypatch.setattr(image_io, "SAVE_VOLUME_GROUP", 4)
    a = np.random.default_rng(1).standard_normal((7, 5, 6, 11)).astype(np.float32)
    s = scratch_array(a.shape, np.float32, tmp_path)
    s[:] = a
    aff = np.diag([1.25, 1.5, 2.0, 1.0])
    aff[:3, 3] = [3, -4, 5]
    save_nifti(tmp_path / f"mem{suffix}", a, aff)
    save_nifti(tmp_path / f"scr{suffix}", s, aff)
    raw = [(tmp_path / f"{n}{suffix}").read_bytes() for n in ("mem", "scr")]
    if suffix.endswith(".gz"):
        raw = [gzip.decompress(r) for r in raw]
    assert len(raw[0]) > a.nbytes and raw[0] == raw[1]
    assert np.array_equal(image_io.load_image(tmp_path / f"scr{suffix}").data, a)


def test_a_folder_without_room_is_an_error_up_front_and_the_copy_falls_back_to_memory(
    tmp_path, monkeypatch, caplog
):
    """The scratch file's blocks are reserved before any write (a full disk would otherwise
    kill the process with SIGBUS at some later write); where that fails, the caller's copy is
    kept in memory with a warning naming the folder and TMPDIR."""
    import errno

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    monkeypatch.setattr(scratch, "SCRATCH_BYTES", 0)
    with pytest.raises(OSError, match="No space"):
        scratch_array((1000, 10), np.float32, tmp_path)
    with caplog.at_level("WARNING", logger="invtract"):
        a = scratch.scratch_or_memory((1000, 10), np.float32, tmp_path)
    assert not is_scratch(a) and a.shape == (1000, 10) and float(np.abs(a).max()) == 0.0
    assert "No space left" in caplog.text and "TMPDIR" in caplog.text
    assert list(tmp_path.iterdir()) == []
    b = scratch.scratch_or_memory((10, 10), np.float32, tmp_path / "missing")
    assert not is_scratch(b)
    monkeypatch.undo()
    assert not is_scratch(scratch.scratch_or_memory((10, 10), np.float32, tmp_path))  # small
    monkeypatch.setattr(scratch, "SCRATCH_BYTES", 0)
    assert is_scratch(scratch.scratch_or_memory((10, 10), np.float32, tmp_path))
    assert not is_scratch(scratch.scratch_or_memory((10, 10), np.float32, False))


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_a_nifti_fod_read_into_scratch_equals_the_one_read_into_memory(
    tmp_path, monkeypatch, suffix
):
    """``load_fod(..., scratch=True)`` reads a 4-D NIfTI in slabs into a scratch array (a
    ``.nii.gz`` unpacked to a temporary file first), SH basis conversion included: the same
    values as the read into memory, and no file left behind."""
    from invtract.io.image import load_fod

    monkeypatch.setattr(voxel_major, "BLOCK_BYTES", 5000)
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    rng = np.random.default_rng(2)
    a = rng.standard_normal((9, 7, 8, 15)).astype(np.float32)
    aff = np.diag([-2.0, 2.0, 2.5, 1.0])  # a flipped axis: realigned on reading
    path = tmp_path / f"fod{suffix}"
    save_nifti(path, a, aff)
    for basis in ("mrtrix", "descoteaux07"):
        mem = load_fod(path, sh_basis=basis)
        monkeypatch.setattr(scratch, "SCRATCH_BYTES", 0)
        scr = load_fod(path, sh_basis=basis, scratch=True)
        monkeypatch.setattr(scratch, "SCRATCH_BYTES", 256 * 2**20)
        assert is_scratch(scr.data) and not is_scratch(mem.data)
        assert np.array_equal(scr.data, mem.data) and np.allclose(scr.affine, mem.affine)
    assert [p for p in (tmp_path / "tmp").iterdir() if p.is_file()] == []


def test_a_nifti_gz_that_cannot_be_unpacked_is_read_in_passes(tmp_path, monkeypatch, caplog):
    from invtract.io.image import load_fod

    a = np.random.default_rng(3).standard_normal((5, 4, 6, 6)).astype(np.float32)
    save_nifti(tmp_path / "fod.nii.gz", a, np.eye(4))
    mem = load_fod(tmp_path / "fod.nii.gz")
    monkeypatch.setattr(scratch, "SCRATCH_BYTES", 0)
    import shutil

    def no_room(src, dst, length=0):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(shutil, "copyfileobj", no_room)  # unpacking the .gz fails
    with caplog.at_level("WARNING", logger="invtract"):
        scr = load_fod(tmp_path / "fod.nii.gz", scratch=True)
    assert "could not unpack" in caplog.text and "TMPDIR" in caplog.text
    assert is_scratch(scr.data) and np.array_equal(scr.data, mem.data)


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_a_truncated_nifti_read_into_scratch_is_a_one_line_error(tmp_path, monkeypatch, suffix):
    from invtract.errors import FormatError
    from invtract.io.image import load_fod

    a = np.random.default_rng(4).standard_normal((9, 8, 7, 15)).astype(np.float32)
    path = tmp_path / f"fod{suffix}"
    save_nifti(path, a, np.eye(4))
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) * 2 // 3])
    monkeypatch.setattr(scratch, "SCRATCH_BYTES", 0)
    with pytest.raises(FormatError, match=str(path)):
        load_fod(path, scratch=True)
