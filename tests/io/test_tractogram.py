"""Tractogram I/O: shared tckgen outputs, malformed files, round trips, atomic writes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from invtract.errors import FormatError, InvtractError
from invtract.io import Image, load_tractogram, load_tractogram_header, save_tractogram
from invtract.streamlines import Streamlines


def _shared_tcks(root: Path) -> list[Path]:
    return sorted(root.glob("*/*.tck"))


def _grid() -> Image:
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    aff[:3, 3] = [-39.0, -39.0, -5.0]
    return Image(np.zeros((40, 40, 6), np.float32), aff, (2.0, 2.0, 2.0))


def _lines(n: int = 5, seed: int = 0) -> Streamlines:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        steps = rng.standard_normal((3 + i, 3)) * 0.5
        out.append(np.cumsum(steps, axis=0) + rng.uniform(-20, 20, 3))
    return Streamlines.from_list(out)


def test_shared_tcks_match_manifest(shared_data):
    manifest = json.loads((shared_data / "manifest.json").read_text())
    tcks = _shared_tcks(shared_data)
    assert len(tcks) >= 10
    for tck in tcks:
        sl = load_tractogram(tck)
        hdr = load_tractogram_header(tck)
        assert sl.points.dtype == torch.float32 and sl.points.shape[1] == 3
        assert len(sl) == int(hdr["count"]) > 0
        assert bool(torch.isfinite(sl.points).all())
        ref = nib.streamlines.load(tck).streamlines
        np.testing.assert_array_equal(sl.points.numpy(), ref.get_data())
        entry = manifest.get(tck.parent.name, {}).get("tractograms", {}).get(tck.name)
        if entry is None:  # e.g. analytic ground-truth bundles are not tckgen outputs
            continue
        assert len(sl) == entry["n_streamlines"] and int(sl.lengths.sum()) == entry["n_points"]
        for key in ("count", "step_size", "max_angle", "threshold", "min_dist", "max_dist"):
            if key in entry:
                assert hdr[key] == entry[key], (tck, key)


def test_shared_bundle_header(shared_data):
    hdr = load_tractogram_header(shared_data / "real_msmt15" / "bundleA_default.tck")
    expected = {
        "step_size": "0.25",
        "max_angle": "60",
        "threshold": "0.100000001",
        "min_dist": "12.5",
        "max_dist": "250",
        "init_direction": "0.55,0.8,0.23",
        "count": "214",
        "total_count": "216",
        "method": "SDStream",
    }
    assert {k: hdr[k] for k in expected} == expected
    assert hdr["command_history"].startswith("tckgen fod.mif bundleA_default.tck")


def test_tiny_fixture(test_data):
    sl = load_tractogram(test_data / "tiny.tck")
    assert sl.lengths.tolist() == [3, 4]
    np.testing.assert_allclose(sl[0].numpy(), [[0, 0, 0], [1, 0, 0], [2, 0.5, 0]])
    assert load_tractogram_header(test_data / "tiny.tck")["step_size"] == "0.5"


def test_zero_streamlines_is_empty(test_data):
    sl = load_tractogram(test_data / "zero_streamlines.tck")
    assert len(sl) == 0 and sl.points.shape == (0, 3)


@pytest.mark.parametrize(
    "name, match",
    [
        ("empty.tck", "magic"),
        ("no_magic.tck", "magic"),
        ("truncated_header.tck", "END"),
        ("truncated_data.tck", None),
        ("truncated_at_delimiter.tck", None),
        ("nonfinite.tck", "non-finite"),
    ],
)
def test_malformed_tck(test_data, name, match):
    path = test_data / name
    with pytest.raises(FormatError, match=match) as info:
        load_tractogram(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("name", ["empty.tck", "no_magic.tck", "truncated_header.tck"])
def test_malformed_tck_header(test_data, name):
    with pytest.raises(FormatError, match=name):
        load_tractogram_header(test_data / name)


def test_missing_and_unknown(tmp_path):
    with pytest.raises(FormatError, match="no such file"):
        load_tractogram(tmp_path / "nope.tck")
    (tmp_path / "x.vtk").write_text("x")
    with pytest.raises(FormatError, match="unknown tractogram extension"):
        load_tractogram(tmp_path / "x.vtk")
    with pytest.raises(FormatError, match="unknown tractogram extension"):
        save_tractogram(tmp_path / "y.vtk", _lines())
    (tmp_path / "bad.trx").write_bytes(b"not a zip")
    with pytest.raises(FormatError, match="bad.trx"):
        load_tractogram(tmp_path / "bad.trx")
    (tmp_path / "bad.trk").write_bytes(b"TRACK" + b"\0" * 20)
    with pytest.raises(FormatError, match="bad.trk"):
        load_tractogram(tmp_path / "bad.trk")


@pytest.mark.parametrize("ext", ["tck", "trk", "trx"])
@pytest.mark.parametrize("n", [0, 1, 5])
def test_roundtrip(tmp_path, ext, n):
    sl = _lines(n)
    path = tmp_path / f"out.{ext}"
    save_tractogram(path, sl, reference=_grid())
    back = load_tractogram(path)
    assert back.lengths.tolist() == sl.lengths.tolist()
    atol = 1e-4 if ext == "trk" else 0.0  # .trk stores voxmm: float32 rounding
    np.testing.assert_allclose(back.points.numpy(), sl.points.numpy(), atol=atol)
    assert int(load_tractogram_header(path)["count"]) == n
    assert os.listdir(tmp_path) == [path.name]  # no temporary files left behind


def test_trk_grid_from_reference(tmp_path):
    save_tractogram(tmp_path / "o.trk", _lines(), reference=_grid())
    hdr = nib.streamlines.load(tmp_path / "o.trk").header
    np.testing.assert_allclose(hdr["voxel_to_rasmm"], _grid().affine)
    assert tuple(hdr["dimensions"]) == (40, 40, 6)


_HEADER = {
    "step_size": "0.25",
    "max_angle": "60",
    "threshold": "0.1",
    "min_dist": "12.5",
    "max_dist": "250",
    "init_direction": "0.55,0.8,0.23",
    "total_count": "216",
    "command_history": "invtract track a.mif b.tck\ninvtract fit x: y",
    "count": "999",  # ignored: always the number written
}


def test_tck_header_written(tmp_path):
    path = tmp_path / "h.tck"
    save_tractogram(path, _lines(3), header=_HEADER)
    nib_hdr = nib.streamlines.load(path).header
    for key in ("step_size", "max_angle", "init_direction", "total_count", "command_history"):
        assert nib_hdr[key] == _HEADER[key]
    ours = load_tractogram_header(path)
    assert int(ours["count"]) == 3 and ours["command_history"] == _HEADER["command_history"]
    assert {k: ours[k] for k in ("threshold", "min_dist", "max_dist")} == {
        "threshold": "0.1",
        "min_dist": "12.5",
        "max_dist": "250",
    }


def test_tck_header_read_by_tckinfo(tmp_path, mrtrix):
    path = tmp_path / "h.tck"
    save_tractogram(path, _lines(3), header=_HEADER)
    info = mrtrix("tckinfo", path)
    assert "step_size:            0.25" in info and "init_direction:       0.55,0.8,0.23" in info
    assert "invtract fit x: y" in info


def test_tck_count_read_by_tckinfo(tmp_path, mrtrix):
    save_tractogram(tmp_path / "a.tck", _lines(4))
    out = mrtrix("tckinfo", tmp_path / "a.tck", "-count")
    assert "actual count in file: 4" in out


def test_overwrite_and_reference_errors(tmp_path):
    path = tmp_path / "o.tck"
    save_tractogram(path, _lines(2))
    with pytest.raises(InvtractError, match="exists"):
        save_tractogram(path, _lines(3))
    assert len(load_tractogram(path)) == 2
    save_tractogram(path, _lines(3), overwrite=True)
    assert len(load_tractogram(path)) == 3
    with pytest.raises(InvtractError, match="reference"):
        save_tractogram(tmp_path / "o.trk", _lines(2))
    with pytest.raises(InvtractError, match="header key"):
        save_tractogram(tmp_path / "k.tck", _lines(2), header={"bad:key": "1"})


@pytest.mark.parametrize("ext", ["tck", "trk"])
def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch, ext):
    from nibabel.streamlines import trk

    import invtract.io.tractogram as tractogram_io

    owner, name = (tractogram_io, "_write_tck") if ext == "tck" else (trk.TrkFile, "save")
    original = getattr(owner, name)

    def partial(*args):
        original(*args)
        raise KeyboardInterrupt  # interrupted after bytes were written

    monkeypatch.setattr(owner, name, partial)
    target = tmp_path / f"o.{ext}"
    with pytest.raises(KeyboardInterrupt):
        save_tractogram(target, _lines(2), reference=_grid())
    assert os.listdir(tmp_path) == []


def test_tck_body_matches_nibabel_writer(tmp_path):
    """The block-written .tck is byte for byte what nibabel's streamline-by-streamline
    ``TckFile.save`` writes with the same header writer (including an empty tractogram), and
    the header keys kept without nibabel are nibabel's."""
    from nibabel.streamlines import Field, Tractogram
    from nibabel.streamlines.tck import TckFile

    import invtract.io.tractogram as tractogram_io

    assert tractogram_io._empty_tck_header() == TckFile.create_empty_header()
    assert (tractogram_io._MAGIC, tractogram_io._COUNT) == (
        Field.MAGIC_NUMBER,
        Field.NB_STREAMLINES,
    )

    class _NibabelBodyWriter(TckFile):
        _write_header = staticmethod(tractogram_io._write_tck_header)

    for n in (0, 1, 4):
        sl = _lines(n) if n else Streamlines.empty()
        ours, theirs = tmp_path / f"ours{n}.tck", tmp_path / f"theirs{n}.tck"
        header = {"step_size": "0.5", "command_history": "a: b\nc"}
        save_tractogram(ours, sl, header=header)
        lines = [np.asarray(line, np.float32) for line in sl.to_list()]
        writer = _NibabelBodyWriter(Tractogram(lines, affine_to_rasmm=np.eye(4)), header)
        writer.save(str(theirs))
        assert ours.read_bytes() == theirs.read_bytes()


def test_cuda_or_grad_tensors_are_detached(tmp_path):
    sl = _lines(2)
    sl = Streamlines(sl.points.clone().requires_grad_(True), sl.lengths)
    save_tractogram(tmp_path / "g.tck", sl)
    assert len(load_tractogram(tmp_path / "g.tck")) == 2
