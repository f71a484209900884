"""Seed files: tckgen -output_seeds CSV, plain coordinate lists, reference seeds."""

from __future__ import annotations

import os

import numpy as np
import pytest

from invtract.errors import FormatError, ShapeError
from invtract.io import load_seeds, load_tractogram, seeds_from_reference, write_seeds


def _seed_files(root):
    files = sorted(root.glob("*/*_seeds.txt"))
    assert len(files) >= 10
    return files


def test_shared_seed_files_load_and_roundtrip_bytes(shared_data, tmp_path):
    for path in _seed_files(shared_data):
        table = load_seeds(path)
        assert table.positions.dtype == np.float32 and table.positions.shape[1] == 3
        assert table.track_index.dtype == np.int64 and table.seed_index.dtype == np.int64
        assert table.directions is None
        assert table.command.startswith(("tckgen fod.mif", "tckgen fods.mif"))
        np.testing.assert_array_equal(table.track_index, np.arange(len(table)))
        out = tmp_path / "rt.txt"
        write_seeds(out, table.track_index, table.seed_index, table.positions, table.command)
        assert out.read_bytes() == path.read_bytes(), path


def test_seeds_from_reference_shared(shared_data):
    for path in _seed_files(shared_data):
        tck = path.with_name(path.name.replace("_seeds.txt", ".tck"))
        table = load_seeds(path)
        pos, dirs, track = seeds_from_reference(tck, path)
        assert pos.shape == dirs.shape == (len(table), 3)
        np.testing.assert_allclose(pos, table.positions, atol=1e-4)
        np.testing.assert_allclose(np.linalg.norm(dirs, axis=1), 1.0, atol=1e-6)
        np.testing.assert_array_equal(track, table.track_index)
        assert len(load_tractogram(tck)) == len(table)


def test_seeds_from_reference_recipe(tmp_path, test_data):
    # tiny.tck: streamline 0 = (0,0,0),(1,0,0),(2,0.5,0); streamline 1 along +y.
    seeds = tmp_path / "s.txt"
    write_seeds(seeds, [0, 1], [1, 0], [[1, 0, 0], [0, 1, 0]], "tckgen x")
    pos, dirs, track = seeds_from_reference(test_data / "tiny.tck", seeds)
    np.testing.assert_allclose(pos, [[1, 0, 0], [0, 1, 0]])
    np.testing.assert_allclose(dirs, [[-1, 0, 0], [0, 1, 0]])  # back-difference / s == 0
    np.testing.assert_array_equal(track, [0, 1])
    write_seeds(seeds, [0], [3], [[0, 0, 0]], "x")
    with pytest.raises(FormatError, match="beyond"):
        seeds_from_reference(test_data / "tiny.tck", seeds)
    write_seeds(seeds, [2], [0], [[0, 0, 0]], "x")
    with pytest.raises(FormatError, match="streamline 2"):
        seeds_from_reference(test_data / "tiny.tck", seeds)
    (tmp_path / "plain.txt").write_text("1 2 3\n")
    with pytest.raises(FormatError, match="Track_index"):
        seeds_from_reference(test_data / "tiny.tck", tmp_path / "plain.txt")


@pytest.mark.parametrize(
    "text",
    ["1 2 3\n4 5 6\n", "1,2,3\n4,5,6\n", "# header\n1, 2, 3,\n\n4\t5 6  # trailing\n"],
)
def test_plain_positions(tmp_path, text):
    p = tmp_path / "s.txt"
    p.write_text(text)
    t = load_seeds(p)
    np.testing.assert_array_equal(t.positions, [[1, 2, 3], [4, 5, 6]])
    assert t.directions is None and t.track_index is None and t.seed_index is None


def test_plain_positions_and_directions(tmp_path):
    p = tmp_path / "s.txt"
    p.write_text("0 0 0 0 0 2\n1,1,1,3,4,0\n")
    t = load_seeds(p)
    np.testing.assert_allclose(t.directions, [[0, 0, 1], [0.6, 0.8, 0]])
    assert t.directions.dtype == np.float32


@pytest.mark.parametrize(
    "text, match",
    [
        ("", "no seeds"),
        ("# only a comment\n\n", "no seeds"),
        ("1 2\n", r"s.txt:1: expected 3 columns"),
        ("1 2 3\n4 5 6 7\n", r"s.txt:2: expected 3 values"),
        ("1 2 3\n1 x 3\n", r"s.txt:2: non-numeric"),
        ("1 2 nan\n", r"s.txt:1: non-finite"),
        ("1 2 inf\n", r"s.txt:1: non-finite"),
        ("1 2 3 0 0 0\n", r"s.txt:1: seed direction .* zero-length"),
        ("#c\n#Track_index,Seed_index,Pos_x,Pos_y,Pos_z,\n0,1,2,3,\n", r"s.txt:3: tckgen"),
        ("#c\n#Track_index,Seed_index,Pos_x,Pos_y,Pos_z,\n0,1.5,2,3,4,\n", r"s.txt:3: Seed"),
        ("#c\n#Track_index,Seed_index,Pos_x,Pos_y,Pos_z,\n", "no seeds"),
    ],
)
def test_seed_errors(tmp_path, text, match):
    p = tmp_path / "s.txt"
    p.write_text(text)
    with pytest.raises(FormatError, match=match):
        load_seeds(p)


def test_missing_file(tmp_path):
    with pytest.raises(FormatError, match="no such file"):
        load_seeds(tmp_path / "none.txt")


def test_write_seeds_format(tmp_path):
    p = tmp_path / "w.txt"
    write_seeds(
        p, np.array([0, 1]), np.array([34, 0]), np.array([[30.0368099, -1e-7, 2.5]] * 2), "cmd a"
    )
    lines = p.read_text().split("\n")
    assert lines[0] == "# cmd a"
    assert lines[1] == "#Track_index,Seed_index,Pos_x,Pos_y,Pos_z,"
    assert lines[2] == "0,34,30.0368099,-1.00000001e-07,2.5,"
    assert lines[4:] == ["", ""]  # rows end with "\n", then one extra empty line
    assert os.listdir(tmp_path) == ["w.txt"]
    with pytest.raises(ShapeError):
        write_seeds(p, [0, 1], [0], [[0, 0, 0]] * 2, "x")


@pytest.mark.parametrize(
    "text, match",
    [
        ("# c\n\n1 2 3\n\n4 5 nan\n", r"s.txt:5: non-finite"),
        ("# c\n1,2,3,\n# x\n4,5\n", r"s.txt:4: expected 3 values"),
        (
            "#c\n#Track_index,Seed_index,Pos_x,Pos_y,Pos_z,\n0,1,2,3,4,\n-1,0,2,3,4,\n",
            r":4: Track",
        ),
    ],
)
def test_seed_errors_name_the_file_line(tmp_path, text, match):
    """Lines count comments and blank lines (numpy.loadtxt reads only the data rows)."""
    p = tmp_path / "s.txt"
    p.write_text(text)
    with pytest.raises(FormatError, match=match):
        load_seeds(p)


def test_tckgen_seed_file_columns(shared_data):
    t = load_seeds(shared_data / "phantom_cross90" / "bundleB_default_seeds.txt")
    raw = np.genfromtxt(shared_data / "phantom_cross90" / "bundleB_default_seeds.txt",
                        delimiter=",", comments="#")[:, :5]  # fmt: skip
    np.testing.assert_array_equal(t.track_index, raw[:, 0].astype(np.int64))
    np.testing.assert_array_equal(t.seed_index, raw[:, 1].astype(np.int64))
    np.testing.assert_array_equal(t.positions, raw[:, 2:5].astype(np.float32))
    assert t.command.startswith("tckgen ") and t.directions is None
