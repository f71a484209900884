"""Unit tests of invtract.checks: paths, numbers, memory estimates and degenerate data."""

from __future__ import annotations

import os
import stat

import nibabel as nib
import numpy as np
import pytest

from invtract import checks
from invtract.errors import ConfigError, FormatError
from invtract.io.image import Image, save_mif


def test_input_files(tmp_path):
    f = tmp_path / "a.nii"
    f.write_bytes(b"x")
    checks.check_input_files([("FOD", f), ("--seeds", None)])
    with pytest.raises(FormatError, match="FOD not found: .*nope"):
        checks.check_input_files([("FOD", tmp_path / "nope")])
    with pytest.raises(FormatError, match="is a directory, not a file"):
        checks.check_input_files([("FOD", tmp_path)])


def test_output_files_rules(tmp_path):
    out, other = tmp_path / "o.tck", tmp_path / "in.nii"
    other.write_bytes(b"x")
    ok = [("output", out, (".tck",)), ("--output-seeds", tmp_path / "s.txt", None)]
    checks.check_output_files(ok, force=False, inputs=[("FOD", other)])
    assert sorted(os.listdir(tmp_path)) == ["in.nii"]  # the write probe is removed
    cases = [
        ([("output", tmp_path / "o.TCKX", (".tck",))], {}, "unknown extension"),
        ([("output", out, None), ("--output-seeds", out, None)], {}, "name the same file"),
        ([("output", other, None)], {"inputs": [("FOD", other)]}, "also the input FOD"),
        ([("output", tmp_path / "no" / "o.tck", None)], {}, "does not exist"),
        ([("output", tmp_path, None)], {}, "is a directory"),
    ]
    for outputs, kw, words in cases:
        with pytest.raises(ConfigError, match=words):
            checks.check_output_files(outputs, force=True, **kw)
    out.write_bytes(b"old")
    with pytest.raises(ConfigError, match=r"output exists: .*o.tck \(use -force"):
        checks.check_output_files([("output", out, None)], force=False, force_flag="-force")
    checks.check_output_files([("output", out, None)], force=True)


def test_output_same_file_through_links(tmp_path):
    """A symbolic or hard link to an input is the input."""
    src = tmp_path / "fod.nii"
    src.write_bytes(b"x")
    (tmp_path / "sym.tck").symlink_to(src)
    os.link(src, tmp_path / "hard.tck")
    for name in ("sym.tck", "hard.tck"):
        with pytest.raises(ConfigError, match="also the input"):
            checks.check_output_files(
                [("output", tmp_path / name, None)], force=True, inputs=[("FOD", src)]
            )


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into mode-0555 folders")
def test_output_unwritable_folder(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        with pytest.raises(ConfigError, match="not writable"):
            checks.check_output_files([("output", ro / "o.tck", None)], force=False)
    finally:
        ro.chmod(0o755)


def test_numbers():
    checks.check_int("--batch-size", 1, 1)
    checks.check_int("--rng-seed", None, 0, 10)
    with pytest.raises(ConfigError, match=r"--batch-size must be >= 1, got 0"):
        checks.check_int("--batch-size", 0, 1)
    with pytest.raises(ConfigError, match=r"--rng-seed must be in \[0, 10\], got 11"):
        checks.check_int("--rng-seed", 11, 0, 10)
    with pytest.raises(ConfigError, match=r"must be <= 3"):
        checks.check_int("--x", 4, maximum=3)
    checks.check_float("--r", 0.0, minimum=0.0)
    for value, kw, words in [(np.nan, {}, "finite"), (0.0, {"positive": True}, "> 0"),
                             (-1.0, {"minimum": 0.0}, ">= 0.0")]:  # fmt: skip
        with pytest.raises(ConfigError, match=words):
            checks.check_float("--r", value, **kw)


def test_memory(monkeypatch):
    assert checks.available_memory() > 0
    assert checks.format_bytes(512) == "512 B"
    assert checks.format_bytes(18.6 * 2**30) == "18.6 GiB"
    assert checks.format_bytes(29.1 * 2**40) == "29.1 TiB"
    monkeypatch.setattr(checks, "available_memory", lambda: 2**30)
    checks.check_memory(2**30, "x", "y")
    with pytest.raises(
        ConfigError, match=r"^thing needs about 2\.0 GiB .* 1\.0 GiB available: do"
    ):
        checks.check_memory(2**31, "thing", "do less")
    monkeypatch.setattr(checks, "available_memory", lambda: None)
    checks.check_memory(2**60, "x", "y")  # unknown: no refusal


def test_image_memory_from_header_only(tmp_path):
    hdr = nib.Nifti1Header()
    hdr.set_data_shape((10, 20, 30, 45))
    hdr.set_data_dtype(np.float32)
    path = tmp_path / "h.nii"
    with open(path, "wb") as fh:
        hdr.write_to(fh)  # no data at all
    assert checks.image_memory_bytes(path, peak_factor=1.0) == 10 * 20 * 30 * 45 * 4
    mif = tmp_path / "m.mif"
    save_mif(mif, Image(np.zeros((3, 4, 5, 6), np.float32), np.eye(4), (1, 1, 1)))
    assert checks.image_memory_bytes(mif) == 4 * 4 * 3 * 4 * 5 * 6
    assert checks.image_memory_bytes(tmp_path / "nope.nii") is None


def test_sqlite_storage(tmp_path):
    db = tmp_path / "s.db"
    checks.check_sqlite_storage(f"sqlite:///{db}", "--storage", must_exist=False)
    checks.check_sqlite_storage("postgresql://u@h/db", "--storage", must_exist=True)
    with pytest.raises(ConfigError, match="no such database"):
        checks.check_sqlite_storage(f"sqlite:///{db}", "--storage", must_exist=True)
    with pytest.raises(ConfigError, match="folder of the database does not exist"):
        checks.check_sqlite_storage(f"sqlite:///{tmp_path}/no/s.db", "--x", must_exist=False)
    assert not db.exists()


def test_any_valid_fod_voxel_in_chunks():
    """One valid voxel anywhere (here the last) is found whatever the chunking."""
    sh = np.zeros((5, 6, 7, 6), np.float32)
    sh[0, 0, 0] = np.nan
    sh[1, 2, 3, 5] = -np.inf
    assert not checks.any_valid_fod_voxel(sh)
    sh[4, 5, 6, 1] = 0.5
    for chunk in (1, 7, 1 << 16):
        assert checks.any_valid_fod_voxel(sh, chunk_voxels=chunk)
    sh[4, 5, 6, 0] = np.nan
    assert not checks.any_valid_fod_voxel(sh, chunk_voxels=7)


def test_warn_degenerate_fod(caplog):
    caplog.set_level("WARNING", logger="invtract")
    good = np.ones((2, 2, 2, 6), np.float32)
    assert not checks.warn_degenerate_fod(good, "f")
    assert checks.warn_degenerate_fod(good[..., :1], "f")
    assert checks.warn_degenerate_fod(np.full_like(good, np.nan), "f")
    inf = good.copy()
    inf[..., 3] = -np.inf
    assert checks.warn_degenerate_fod(inf, "f")
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 3 and all(m.startswith("warning: FOD f ") for m in msgs)
    assert "lmax 0" in msgs[0] and "no valid voxel" in msgs[1]


def test_distance_outside_rotated_grid():
    """Against the distance to the nearest of many points sampled in the box, for a rotated,
    anisotropic, translated grid."""
    c, s = np.cos(0.4), np.sin(0.4)
    rot = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag([2.0, 1.0, 3.0])
    affine[:3, 3] = (5.0, -3.0, 1.0)
    shape = (4, 5, 2)
    g = [np.linspace(-0.5, n - 0.5, 41) for n in shape]
    box = np.stack(np.meshgrid(*g, indexing="ij"), -1).reshape(-1, 3)
    box_mm = box @ affine[:3, :3].T + affine[:3, 3]
    pts = np.array([[5.0, -3.0, 1.0], [30.0, 0.0, 0.0], [0.0, 0.0, -9.0], [-4.0, 9.0, 12.0]])
    got = checks.distance_outside_mm(pts, shape, affine)
    brute = np.linalg.norm(pts[:, None] - box_mm[None], axis=2).min(1)
    assert got[0] == 0.0
    np.testing.assert_allclose(got, brute, atol=0.15)  # the sample spacing of the box


def test_warn_points_outside(caplog):
    caplog.set_level("WARNING", logger="invtract")
    affine, shape = np.eye(4), (10, 10, 10)
    inside = np.zeros((100, 3))
    assert not checks.warn_points_outside(inside, shape, affine, "seeds", "img", "x")
    few = inside.copy()
    few[:5] = 100.0  # 5% outside: tolerated
    assert not checks.warn_points_outside(few, shape, affine, "seeds", "img", "x")
    few[:6] = 100.0
    assert checks.warn_points_outside(few, shape, affine, "seeds", "img", "x")
    assert not checks.warn_points_outside(few, shape, affine, "seeds", "img", "x", 200.0)
    assert checks.warn_points_outside(few + 1000, shape, affine, "seeds", "img", "x")
    msgs = [r.getMessage() for r in caplog.records]
    assert msgs[0].startswith("warning: 6 of 100 seeds lie outside img (x)")
    assert msgs[1].startswith("warning: all 100 seeds lie outside img (x)")


def test_valid_voxel_scan_never_copies_a_strided_fod_whole():
    """A voxel-major FOD whose spatial axes are not in C order (a memory-mapped .mif) is
    scanned slab by slab in memory order: no whole-array copy (reshape of a strided view)."""
    import tracemalloc

    base = np.zeros((40, 40, 40, 15), np.float32)  # [Z, Y, X, K] in memory
    sh = base.transpose(2, 1, 0, 3)  # [X, Y, Z, K] view, K contiguous, x fastest spatially
    sh[5, 6, 39, 2] = 1.0  # the only valid voxel, in the last slab in memory order
    tracemalloc.start()
    assert checks.any_valid_fod_voxel(sh, chunk_voxels=1600)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < base.nbytes // 4
