"""Streaming ``.tck`` writer: same bytes as the one-shot writer, atomic, count set at the end."""

from __future__ import annotations

import numpy as np
import pytest

from invtract.errors import InvtractError
from invtract.io import load_tractogram, load_tractogram_header, save_tractogram
from invtract.io.tractogram import stream_tck
from invtract.streamlines import Streamlines


def _lines(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [np.cumsum(rng.standard_normal((2 + i % 7, 3)), 0).astype(np.float32) for i in range(n)]


def _packed(lines):
    pts = np.concatenate(lines) if lines else np.zeros((0, 3), np.float32)
    return pts, np.array([len(x) for x in lines], np.int64)


HEADER = {"step_size": "0.25", "command_history": "a: b\nsecond line", "total_count": "0"}


def test_stream_equals_one_shot_writer(tmp_path):
    lines = _lines(23)
    save_tractogram(tmp_path / "one.tck", Streamlines.from_list(lines), header=HEADER)
    header = dict(HEADER, total_count="0")
    with stream_tck(tmp_path / "many.tck", header) as out:
        for part in (lines[:5], [], lines[5:6], lines[6:]):  # chunks, one of them empty
            out.write(*_packed(part))
        assert out.count == 23 and out.vertices == sum(len(x) for x in lines)
    assert (tmp_path / "one.tck").read_bytes() == (tmp_path / "many.tck").read_bytes()
    back = load_tractogram(tmp_path / "many.tck")
    np.testing.assert_array_equal(back.points.numpy(), _packed(lines)[0])


def test_late_header_values(tmp_path):
    path = tmp_path / "late.tck"
    with stream_tck(path, HEADER, late_keys=("total_count", "max_num_seeds")) as out:
        out.write(*_packed(_lines(4)))
        out.late.update(total_count="1234", max_num_seeds="98765")
    hdr = load_tractogram_header(path)
    assert hdr["count"] == "0000000004"
    assert hdr["total_count"] == "1234" and hdr["max_num_seeds"] == "98765"
    assert hdr["step_size"] == "0.25"
    assert len(load_tractogram(path)) == 4


def test_interrupted_stream_leaves_nothing(tmp_path):
    path = tmp_path / "out.tck"
    with pytest.raises(KeyboardInterrupt):
        with stream_tck(path, HEADER) as out:
            out.write(*_packed(_lines(3)))
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
    # an existing output is left as it was
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with stream_tck(path, HEADER, overwrite=True) as out:
            out.write(*_packed(_lines(3)))
            raise RuntimeError("stop")
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.tck"]


def test_stream_refuses_existing_and_bad_input(tmp_path):
    path = tmp_path / "x.tck"
    path.write_bytes(b"")
    with pytest.raises(InvtractError, match="exists"):
        with stream_tck(path, HEADER):
            pass
    with pytest.raises(InvtractError, match="lengths"):
        with stream_tck(tmp_path / "y.tck", HEADER) as out:
            out.write(np.zeros((3, 3), np.float32), np.array([2]))
    assert not (tmp_path / "y.tck").exists()
