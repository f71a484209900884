"""`.trk` / `.trx` written by `invtract track` carry the tracking header and the seeds."""

from __future__ import annotations

import numpy as np
import pytest

from invtract.cli import main
from invtract.io.seeds import load_seeds
from invtract.io.tractogram import load_tractogram, load_tractogram_header
from invtract.io.tractogram_meta import (
    TRK_TEXT_BYTES,
    read_tracking_metadata,
    trk_header_fields,
)


def _track(out, *extra):
    assert main(["-q", "track", "--example", str(out), "--seed-direction", "1,0,0",
                 "--step", "0.5", *extra]) == 0  # fmt: skip


@pytest.mark.parametrize("suffix", [".trk", ".trx"])
def test_trk_trx_carry_parameters_command_and_seeds(suffix, tmp_path):
    tck, other = tmp_path / "a.tck", tmp_path / f"a{suffix}"
    _track(tck, "--output-seeds", str(tmp_path / "seeds.txt"))
    _track(other)
    ref = load_tractogram_header(tck)
    header, data = read_tracking_metadata(other)
    for key in ("step_size", "max_angle", "threshold", "min_dist", "max_dist",
                "init_direction", "method", "source"):  # fmt: skip
        assert header[key] == ref[key], key
    cmd = header["command_history"]
    assert cmd.startswith("invtract ")
    # .trk's 444-byte text field may cut a long command line (a long tmp path) with "..."
    assert suffix in cmd or (suffix == ".trk" and cmd.endswith("..."))
    seeds = load_seeds(tmp_path / "seeds.txt")
    sl = load_tractogram(other).to_list()
    assert data["seed_point"].shape == (len(sl), 3)
    np.testing.assert_array_equal(data["seed_index"][:, 0], seeds.seed_index)
    np.testing.assert_allclose(data["seed_point"], seeds.positions, atol=1e-5)
    for pts, s, p in zip(sl, data["seed_index"][:, 0].astype(int), data["seed_point"]):
        np.testing.assert_allclose(pts[s], p, atol=1e-4)


def test_trk_text_is_cut_to_its_field():
    text = trk_header_fields({"step_size": "0.2", "command_history": "x" * 1000})["reserved"]
    assert len(text) == TRK_TEXT_BYTES and text.startswith(b"step_size: 0.2\ncommand_history")
    assert text.endswith(b"...")


def test_trx_group_carries_numeric_parameters(tmp_path):
    """The .trx holds a 'tracking' group of every streamline with the numeric parameters as
    data per group, read back by trx-python itself (and after a TRX round trip)."""
    import trx.trx_file_memmap as tmm

    from invtract.io.tractogram_meta import TRX_GROUP

    out = tmp_path / "a.trx"
    _track(out)
    header, data = read_tracking_metadata(out)
    trx = tmm.load(str(out))
    try:
        n = len(trx.streamlines)
        groups = np.array(trx.groups[TRX_GROUP])
        dpg = {k: np.array(v) for k, v in trx.data_per_group[TRX_GROUP].items()}
        copy = trx.deepcopy()  # trx-python's own copy keeps groups and their data
    finally:
        trx.close()
    np.testing.assert_array_equal(groups, np.arange(n))
    assert dpg["step_size"].shape == (1, 1) and dpg["step_size"][0, 0] == np.float32(0.5)
    assert float(header["step_size"]) == 0.5
    np.testing.assert_array_equal(dpg["init_direction"], [[1, 0, 0]])
    for key in ("max_angle", "threshold", "min_dist", "max_dist"):
        assert dpg[key][0, 0] == np.float32(header[key]), key
    assert "command_history" not in dpg and "method" not in dpg  # text stays in the header
    tmm.save(copy, str(tmp_path / "b.trx"))
    copy.close()
    again = tmm.load(str(tmp_path / "b.trx"))
    try:
        max_dist = np.array(again.data_per_group[TRX_GROUP]["max_dist"])
        seed_index = np.array(again.data_per_streamline["seed_index"])
    finally:
        again.close()
    assert max_dist[0, 0] == dpg["max_dist"][0, 0]
    np.testing.assert_array_equal(seed_index, data["seed_index"])
