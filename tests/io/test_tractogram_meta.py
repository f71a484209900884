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
