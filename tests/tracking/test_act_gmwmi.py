"""``tckgen -seed_gmwmi`` (with ``-act``) against MRtrix3 3.0.3.

References: ``../shared/data/sift_phantom/act_gmwmi.tck`` (``-select 2000``, random directions,
``MRTRIX_RNG_SEED=20240601``) and ``tests/data/act/gmwmi_dir_seeds.txt`` (a fixed direction, so
the seeds are the GM-WM interface seeder's own random stream; ``commands.txt``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from invtract.errors import ConfigError
from invtract.io.tractogram import load_tractogram
from invtract.tracking import fused_cpu

from .reference_data import need_data

LOCAL = Path(__file__).resolve().parents[1] / "data" / "act"
numba_only = pytest.mark.skipif(not fused_cpu.available(), reason="numba is not available")
RNG_SEED = 20240601


def _seeder():
    from invtract.tracking.act import load_act
    from invtract.tracking.seeding_gmwmi import load_gmwmi_seeder

    folder = need_data("sift_phantom")
    return load_gmwmi_seeder(folder / "gmwmi.mif", load_act(folder / "5tt.mif"))


@numba_only
def test_seeds_are_tckgens_in_order():
    """tckgen's 10 seeds (those that passed ACT's seed test, in order) are a subsequence of
    our seeder's first 15, bit for bit; the others fail ACT's seed test as in tckgen."""
    from invtract.tracking.rng import MRtrixRNG

    ref = np.loadtxt(LOCAL / "gmwmi_dir_seeds.txt", delimiter=",", comments="#",
                     usecols=(2, 3, 4), dtype=np.float32)  # fmt: skip
    seeder = _seeder()
    rng = MRtrixRNG(RNG_SEED)
    ours = np.stack([seeder.next(rng) for _ in range(15)])
    k = 0
    for p in ours:
        if k < len(ref) and np.array_equal(p, ref[k]):
            k += 1
    assert k == len(ref) == 10


@numba_only
def test_seeds_lie_on_the_interface():
    """Every seed is where GMWMI_finder accepts it: |GM - WM| < 0.01, some WM, not CSF."""
    from invtract.tracking.act_cpu import _tissues
    from invtract.tracking.rng import MRtrixRNG

    seeder = _seeder()
    rng = MRtrixRNG(7)
    tbuf, tis = np.empty(5, np.float32), np.zeros(5, np.float32)
    for _ in range(20):
        p = seeder.next(rng)
        assert _tissues(seeder.tt, False, seeder.Mt, p[0], p[1], p[2], tbuf, tis)
        assert abs((tis[0] + tis[1]) - tis[2]) < 0.01 and tis[2] > 0 and tis[3] < 0.5


def _track_gmwmi(tt: Path, gmwmi: Path, select: int):
    from invtract.fod.field import FODField
    from invtract.io.image import load_fod
    from invtract.params import TrackingParameters
    from invtract.tracking.act import load_act
    from invtract.tracking.api import Seeding, track
    from invtract.tracking.seeding_gmwmi import load_gmwmi_seeder

    fod = load_fod(need_data("sift_phantom", "fods.mif"))
    act = load_act(tt)
    return track(
        FODField.from_image(fod),
        Seeding("gmwmi", gmwmi=load_gmwmi_seeder(gmwmi, act)),
        TrackingParameters(),
        engine="numba",
        select=select,
        rng_seed=RNG_SEED,
        act=act,
    )


def _bit_identical(ours, refs) -> int:
    return sum(a.shape == b.shape and np.array_equal(a, b) for a, b in zip(ours, refs))


@numba_only
def test_first_streamlines_bit_identical():
    """The first 100 of act_gmwmi.tck from the same command (a prefix of the -select 2000 run)."""
    folder = need_data("sift_phantom")
    res = _track_gmwmi(folder / "5tt.mif", folder / "gmwmi.mif", 100)
    refs = load_tractogram(folder / "act_gmwmi.tck").to_list()[:100]
    assert _bit_identical(res.streamlines.to_list(), refs) == 100


@numba_only
def test_subcortical_interface_seeds_bit_identical():
    """act_gmwmi_sgm.tck (5TT with sub-cortical GM: seeds on the SGM-WM interface, streamlines
    that exit SGM or fail to reach WM): 150 / 150 bit-identical, 267 generated as tckgen."""
    res = _track_gmwmi(LOCAL / "5tt_sgm.mif", LOCAL / "gmwmi_sgm.mif", 150)
    refs = load_tractogram(LOCAL / "act_gmwmi_sgm.tck").to_list()
    assert _bit_identical(res.streamlines.to_list(), refs) == len(refs) == 150
    assert res.summary["generated"] == 267
    assert res.summary["rejected"]["Failed to traverse white matter"] == 67
    # tckgen -info: 875, the seed its tracker makes after the 150th streamline included
    assert res.summary["rejected"]["Invalid seed point"] == 875
    assert res.summary["terminations"]["Exiting sub-cortical GM"] == 25


@numba_only
@pytest.mark.slow
def test_replay_of_the_recorded_command_bit_identical():
    """act_gmwmi.tck re-run from its command line: 2000 / 2000 streamlines bit-identical, in
    order, with as many generated as tckgen."""
    from invtract.tracking.tckgen_replay import replay_command

    r = replay_command(need_data("sift_phantom", "act_gmwmi.tck"), RNG_SEED, engine="numba")
    assert (r["kept"], r["generated"]) == (r["ref_kept"], r["ref_generated"]) == (2000, 2000)
    assert r["frac_bit_exact"] == 1.0


def test_seed_gmwmi_needs_act(tmp_path):
    from invtract.cli import main

    folder = need_data("sift_phantom")
    argv = ["track", str(folder / "fods.mif"), str(tmp_path / "x.tck"), "--seed-gmwmi",
            str(folder / "gmwmi.mif")]  # fmt: skip
    with pytest.raises((ConfigError, SystemExit)):
        rc = main(argv)
        if rc:
            raise SystemExit(rc)
    assert not (tmp_path / "x.tck").exists()


def test_rejection_image_refuses_negative_values():
    from invtract.io.image import Image
    from invtract.tracking.seeding_gmwmi import RejectionImage

    data = np.zeros((3, 3, 3), np.float32)
    data[1, 1, 1] = -1
    with pytest.raises(ConfigError, match="negative"):
        RejectionImage.from_image(Image(data, np.eye(4), (1.0, 1.0, 1.0), None, np.eye(4)[:3]))


def test_rng_peek_then_skip_is_the_raw_stream():
    from invtract.tracking.rng import MRtrixRNG

    a, b = MRtrixRNG(5, block=16), MRtrixRNG(5, block=16)
    expected = [a.raw() for _ in range(100)]
    got = []
    for n in (3, 40, 1, 56):
        seen = b.peek(n).tolist()
        assert b.peek(n).tolist() == seen  # peeking does not consume
        b.skip(n)
        got += seen
    assert got == expected
    with pytest.raises(ValueError):
        b.skip(10**6)


def test_tckgen_command_with_act_and_gmwmi_is_parsed():
    from invtract.tracking.tckgen_replay import parse_tckgen_command

    cmd = parse_tckgen_command(
        "tckgen fods.mif out.tck -algorithm SD_Stream -act 5tt.mif -seed_gmwmi gmwmi.mif "
        "-select 2000 -crop_at_gmwmi -nthreads 0  (version=3.0.3)"
    )
    assert cmd.seed == ("gmwmi", "gmwmi.mif", 1) and cmd.act == "5tt.mif"
    assert cmd.crop_at_gmwmi and cmd.select == 2000
    with pytest.raises(ConfigError, match="needs -act"):
        parse_tckgen_command("tckgen fods.mif out.tck -seed_gmwmi gmwmi.mif -select 5")


@numba_only
def test_cli_seed_gmwmi_matches_tckgen(tmp_path):
    """``invtract track`` with tckgen's spelling: the first 50 streamlines of act_gmwmi.tck."""
    from invtract.cli import main

    folder = need_data("sift_phantom")
    out = tmp_path / "g.tck"
    argv = ["track", str(folder / "fods.mif"), str(out), "-algorithm", "SD_Stream", "-act",
            str(folder / "5tt.mif"), "-seed_gmwmi", str(folder / "gmwmi.mif"), "-select", "50",
            "-nthreads", "0", "--rng-seed", str(RNG_SEED), "-quiet"]  # fmt: skip
    assert main(argv) in (0, None)
    ours = load_tractogram(out).to_list()
    refs = load_tractogram(folder / "act_gmwmi.tck").to_list()[:50]
    assert len(ours) == 50 and _bit_identical(ours, refs) == 50
