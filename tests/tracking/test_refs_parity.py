"""Bit-exact parity with tckgen on every input kind (``tests/data/tckgen_refs``).

Each reference is re-run from its recorded ``tckgen`` command line with invtract's own
seeding (FOD and ROI images read as MRtrix reads them, seeds generated from the ROI, random
directions from the replayed MRtrix random stream) and must match tckgen streamline for
streamline, bit for bit, in the same order, with the same number of streamlines generated.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from invtract.io.tractogram import load_tractogram, load_tractogram_header
from invtract.tracking.tckgen_replay import parse_tckgen_command, replay_command

REFS = Path(__file__).resolve().parents[1] / "data" / "tckgen_refs"
RNG_SEED = 20240601
NAMES = sorted(p.stem for p in REFS.glob("*.tck"))

pytest.importorskip("numba")


def test_references_present():
    assert len(NAMES) >= 6
    assert sum(p.stat().st_size for p in REFS.iterdir()) < 3_000_000


@pytest.mark.parity
@pytest.mark.parametrize("name", NAMES)
def test_tckgen_command_bit_exact(name):
    r = replay_command(REFS / f"{name}.tck", RNG_SEED, engine="numba")
    assert r["ref_kept"] > 0
    assert (r["kept"], r["generated"]) == (r["ref_kept"], r["ref_generated"])
    assert r["frac_bit_exact"] == 1.0, r


@pytest.mark.parity
def test_wrong_rng_seed_is_detected():
    """The comparison can fail: another MRTRIX_RNG_SEED gives other streamlines."""
    r = replay_command(REFS / "s4321_random.tck", RNG_SEED + 1, engine="numba")
    assert r["frac_bit_exact"] < 0.5


def test_parse_tckgen_command():
    header = load_tractogram_header(REFS / "oblique_image.tck")
    cmd = parse_tckgen_command(header["command_history"])
    assert cmd.fod == "fod_l6_oblique.nii.gz"
    assert cmd.seed == ("image", "roi_lps_f32.nii.gz", 1)
    assert (cmd.select, cmd.seeds, cmd.rois) == (150, None, [])
    grid = parse_tckgen_command(
        "tckgen f.mif o.tck -seed_grid_per_voxel m.mif 3 -include 1,2,3,4 -seeds 10 -force"
    )
    assert grid.seed == ("grid", "m.mif", 3) and grid.rois == [("include", "1,2,3,4")]
    assert grid.seeds == 10
    assert len(load_tractogram(REFS / "oblique_image.tck").to_list()) == 150
    assert np.isfinite(np.concatenate(load_tractogram(REFS / "las_grid.tck").to_list())).all()


def _same_streamlines(a_path, b_path) -> bool:
    a, b = load_tractogram(a_path).to_list(), load_tractogram(b_path).to_list()
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


@pytest.mark.parity
@pytest.mark.parametrize(
    "name, args",
    [
        (
            "oblique_image",
            ["fod_l6_oblique.nii.gz", "--seed-image", "roi_lps_f32.nii.gz", "--select", "150",
             "--step", "0.4", "--angle", "40", "--rng-seed", str(RNG_SEED)],
        ),
        (
            "rois_grid",
            ["fod_l4_s4321.mif.gz", "--seed-grid-per-voxel", "roi_A.mif", "3",
             "--seed-direction=0.55,0.8,0.23", "--include", "roi_incl_u8.nii.gz",
             "--exclude", "27,-56,-25,2.5", "--mask", "mask.mif", "--minlength", "5"],
        ),
    ],
)  # fmt: skip
def test_invtract_track_cli_equals_tckgen(tmp_path, monkeypatch, name, args):
    """``invtract track`` with tckgen's options gives tckgen's file, streamline for
    streamline (a NIfTI FOD on a rotated header with -seed_image from a float ROI; a strided
    .mif.gz with include / exclude / mask regions)."""
    from invtract.cli import main

    monkeypatch.chdir(REFS)
    out = tmp_path / "out.tck"
    assert main(["-q", "track", args[0], str(out), "--engine", "numba", *args[1:]]) == 0
    assert _same_streamlines(out, REFS / f"{name}.tck")
