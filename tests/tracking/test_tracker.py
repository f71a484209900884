"""Tracker rules: derived parameters, RNG replay, seeding order and parity with tckgen."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from invtract.errors import ConfigError
from invtract.fod.field import FODField
from invtract.fod.sh import sh_basis
from invtract.io.image import load_fod, load_mask
from invtract.io.seeds import load_seeds
from invtract.io.tractogram import load_tractogram, load_tractogram_header
from invtract.params import TrackingParameters
from invtract.tracking.api import Seeding, track
from invtract.tracking.reference import compare_reference
from invtract.tracking.rng import MRtrixRNG
from invtract.tracking.seeding import MaskGrid, grid_per_voxel
from invtract.tracking.types import Reject, SphereRoi


def test_mt19937_replay_known_values():
    # std::mt19937 with its default seed 5489: first output and the 10000th (C++ standard)
    rng = MRtrixRNG(5489)
    first = rng.raw()
    for _ in range(9998):
        rng.raw()
    assert first == 3499211612
    assert rng.raw() == 4123659995


def test_rng_uniform_and_randint_ranges():
    rng = MRtrixRNG(7)
    u = np.array([rng.uniform() for _ in range(2000)])
    assert u.dtype == np.float32 and (u >= 0).all() and (u < 1).all()
    k = np.array([rng.randint(5) for _ in range(2000)])
    assert set(k.tolist()) == {0, 1, 2, 3, 4}
    d = rng.direction()
    assert float(d @ d) <= 1.0


@pytest.mark.parametrize("block", [64, 1 << 16])
def test_bulk_directions_consume_the_stream_like_single_draws(block):
    one, bulk = MRtrixRNG(20240601, block=block), MRtrixRNG(20240601, block=997)
    singles = np.stack([one.direction() for _ in range(3000)])
    assert np.array_equal(bulk.directions(3000), singles)
    assert bulk.directions(0).shape == (0, 3)
    assert [bulk.raw() for _ in range(5)] == [one.raw() for _ in range(5)]


@pytest.mark.parametrize(
    "vox,step,lmin,lmax,nmin,nmax",
    [((2.5,) * 3, 0.25, 12.5, 250, 51, 1003), ((2.0,) * 3, 0.2, 10, 200, 51, 1003)],
)
def test_defaults_derived_from_voxel_size(vox, step, lmin, lmax, nmin, nmax):
    r = TrackingParameters().resolve(vox)
    assert r.step_mm == pytest.approx(step) and r.min_length_mm == pytest.approx(lmin)
    assert r.max_length_mm == pytest.approx(lmax)
    assert (r.min_points, r.max_points) == (nmin, nmax)
    rk = TrackingParameters(rk4=True).resolve(vox)
    assert (rk.min_points, rk.max_points) == (21, 403) and rk.dot_threshold == -1.0


def test_defaults_equal_tckgen_headers(shared_data):
    for case in ("real_msmt15", "phantom_cross90"):
        fod = load_fod(shared_data / case / "fod.nii.gz")
        h = load_tractogram_header(shared_data / case / "whole.tck")
        hdr = TrackingParameters().resolve(fod.voxel_sizes).header()
        for key in ("step_size", "max_angle", "threshold", "min_dist", "max_dist"):
            assert float(hdr[key]) == pytest.approx(float(h[key]), rel=1e-7), key


def test_invalid_parameters_raise():
    for kw in ({"step_mm": -1}, {"angle_deg": 0}, {"cutoff": float("nan")}, {"downsample": 0}):
        with pytest.raises(ConfigError):
            TrackingParameters(**kw)


def test_grid_seeds_equal_tckgen_seed_positions(shared_data):
    d = shared_data / "real_msmt15"
    m = load_mask(d / "roi_A.nii.gz")
    seeds = grid_per_voxel(MaskGrid.from_image(m.data, m.affine), 3)
    ref = load_seeds(d / "bundleA_default_seeds.txt").positions
    assert seeds.shape == (216, 3)
    dist = np.linalg.norm(seeds[:, None] - ref[None], axis=-1).min(0)
    assert dist.max() < 1e-4


@pytest.mark.parity
def test_whole_volume_random_directions_replay_tckgen(shared_data):
    """MRTRIX_RNG_SEED replay: which seeds are rejected and every streamline (phantom)."""
    d = shared_data / "phantom_cross90"
    fod, mask = load_fod(d / "fod.nii.gz"), load_mask(d / "mask.nii.gz")
    field = FODField.from_image(fod)
    res = track(
        field,
        Seeding("grid", mask=mask.data, affine=mask.affine, count=1),
        TrackingParameters(),
        engine="torch",
        rng_seed=20240601,
    )
    h = load_tractogram_header(d / "whole.tck")
    assert res.summary["seeds"] == int(h["max_num_seeds"])
    assert res.summary["generated"] == int(h["total_count"])
    ref = load_tractogram(d / "whole.tck").to_list()
    ours = res.streamlines.to_list()
    assert len(ours) == len(ref) == int(h["count"])
    same = [a.shape == b.shape and np.abs(a - b).max() < 1e-3 for a, b in zip(ours, ref)]
    assert np.mean(same) >= 0.99


@pytest.mark.parity
@pytest.mark.parametrize(
    "case,name", [("real_msmt15", "bundleA_default"), ("phantom_cross90", "bundleB_cutoff1.0")]
)
def test_parity_with_tckgen_references(shared_data, case, name):
    d = shared_data / case
    r = compare_reference(
        d / f"{name}.tck", d / f"{name}_seeds.txt", d / "fod.nii.gz", engine="torch"
    )
    assert r["frac_hausdorff_lt_0.5"] >= 0.98
    assert r["frac_same_count"] >= 0.98


def _straight_field(shape=(12, 5, 5)):
    """A straight fibre along x everywhere (lmax 4), 1 mm voxels, origin at voxel 0."""
    d = torch.randn(3000, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    d = d / d.norm(dim=-1, keepdim=True)
    f = torch.exp(-20 * (1 - d[:, 0] ** 2))
    c = torch.linalg.lstsq(sh_basis(d, 4), f[:, None]).solution[:, 0].float()
    sh = c.expand(*shape, -1).clone().numpy()
    return FODField.from_array(sh, np.eye(4)), sh


def test_straight_line_lengths_and_rois():
    field, _ = _straight_field()
    seeds = np.array([[5.0, 2.0, 2.0]], np.float32)
    dirs = np.array([[1.0, 0.0, 0.0]], np.float32)
    p = TrackingParameters(step_mm=0.5, min_length_mm=1.0).resolve((1, 1, 1))
    res = track(field, Seeding("list", positions=seeds, directions=dirs), p, engine="torch")
    pts = res.streamlines[0].numpy()
    # the point at which "no data" is detected is kept: up to one step outside the FOV
    assert 11.5 <= pts[:, 0].max() < 12.0 and -1.0 < pts[:, 0].min() <= -0.5
    assert np.allclose(np.abs(np.diff(pts[:, 0])), 0.5, atol=1e-3)
    # an exclude sphere on the path rejects the streamline
    from invtract.tracking.types import RoiSet

    rois = RoiSet(exclude=(SphereRoi((8.0, 2.0, 2.0), 0.6),))
    res2 = track(field, Seeding("list", positions=seeds, directions=dirs), p, rois=rois,
                 engine="torch")  # fmt: skip
    assert len(res2.streamlines) == 0 and res2.summary["rejected"]
    # a mask sphere truncates it (EXIT_MASK: last point inside)
    rois = RoiSet(mask=(SphereRoi((5.0, 2.0, 2.0), 2.0),))
    res3 = track(field, Seeding("list", positions=seeds, directions=dirs), p, rois=rois,
                 engine="torch")  # fmt: skip
    pts3 = res3.streamlines[0].numpy()
    assert np.all(np.linalg.norm(pts3 - seeds, axis=1) <= 2.0 + 1e-5)
    assert pts3.shape[0] == 9  # 4 steps each way inside radius 2 at step 0.5
    # max length: count-based, N_max = 3 + ceil(Lmax / h)
    p4 = TrackingParameters(step_mm=0.5, min_length_mm=1.0, max_length_mm=2.0).resolve((1, 1, 1))
    res4 = track(field, Seeding("list", positions=seeds, directions=dirs), p4, engine="torch")
    assert res4.streamlines.lengths[0] == p4.max_points + 1
    # min length rejects short tracks
    p5 = TrackingParameters(step_mm=0.5, min_length_mm=50.0).resolve((1, 1, 1))
    res5 = track(field, Seeding("list", positions=seeds, directions=dirs), p5, engine="torch")
    assert len(res5.streamlines) == 0
    assert res5.summary["rejected"] == {"Shorter than minimum length": 1}


def test_torch_buffers_follow_what_is_tracked_not_max_length():
    """The torch engine sizes its point buffers by the streamlines tracked: a 1e9 mm maximum
    length (2e11 points: TBs if allocated up front) tracks the same streamline as 100 mm, and
    halves longer than the first buffer (256 points at 0.02 mm steps) grow it."""
    field, _ = _straight_field()
    seeds = np.array([[5.0, 2.0, 2.0]], np.float32)
    dirs = np.array([[1.0, 0.0, 0.0]], np.float32)
    out = []
    for max_len in (100.0, 1e9):
        p = TrackingParameters(step_mm=0.02, min_length_mm=1.0, max_length_mm=max_len)
        p = p.resolve((1, 1, 1))
        res = track(field, Seeding("list", positions=seeds, directions=dirs), p, engine="torch")
        out.append(res.streamlines[0].numpy())
    assert out[0].shape[0] > 2 * 256 and np.array_equal(out[0], out[1])


def test_seed_rejections():
    field, _ = _straight_field()
    seeds = np.array([[5.0, 2.0, 2.0], [np.nan, 0, 0], [50.0, 2.0, 2.0]], np.float32)
    dirs = np.array([[1.0, 0.0, 0.0], [1, 0, 0], [1, 0, 0]], np.float32)
    p = TrackingParameters(step_mm=0.5, min_length_mm=1.0, cutoff=0.05).resolve((1, 1, 1))
    res = track(field, Seeding("list", positions=seeds, directions=dirs), p, engine="torch")
    assert res.summary["rejected"].get("Invalid seed point") == 2
    assert list(res.seed_ids) == [0]
    _ = Reject


@pytest.mark.parity
def test_harness_uses_header_seed_direction_and_replays_whole_runs(shared_data):
    """The parity harness starts bundles from the header's init_direction (tckgen's
    -seed_direction) and replays grid-seeded whole runs with the RNG: both bit-exact here."""
    from invtract.tracking.reference import parameters_from_header, replay_reference

    d = shared_data / "phantom_cross90"
    h = load_tractogram_header(d / "bundleB_default.tck")
    assert parameters_from_header(h).seed_direction == (1.0, 0.0, 0.0)
    r = compare_reference(
        d / "bundleB_default.tck", d / "bundleB_default_seeds.txt", d / "fod.mif", engine="numba"
    )
    assert r["n"] == 96 and r["frac_bit_exact"] == 1.0
    rr = replay_reference(d / "whole.tck", d / "fod.mif", 20240601, engine="numba")
    assert rr["generated"] == rr["ref_generated"] == 1219
    assert rr["kept"] == rr["ref_kept"] == rr["n"] == 695
    assert rr["frac_bit_exact"] == 1.0 and not rr["rejected_by_us"]


@pytest.mark.parametrize(
    "options",
    [
        {"unidirectional": True},
        {"downsample": 4, "min_length_mm": 3.0, "max_length_mm": 12.0},
        {"downsample": 3, "rk4": True},
    ],
)
def test_torch_engine_agrees_with_fused_engine(options):
    """The reference engine's host assembly (seed order, downsampling, max-length truncation
    with reversal) against the fused engine, which is bit-exact with tckgen on these rules."""
    from invtract.data import example_path

    fod = load_fod(example_path("fod"))
    mask = load_mask(example_path("mask"))
    field = FODField.from_image(fod)
    seeding = Seeding("grid", mask=mask.data, affine=mask.affine, count=1)
    runs = [
        track(
            field,
            seeding,
            TrackingParameters(**options),
            engine=engine,
            rng_seed=1,
        )  # fmt: skip
        for engine in ("torch", "numba")
    ]
    ours, fused = (r.streamlines.to_list() for r in runs)
    assert len(ours) == len(fused) > 100
    assert np.array_equal(runs[0].seed_index, runs[1].seed_index)
    assert all(a.shape == b.shape and np.abs(a - b).max() < 1e-3 for a, b in zip(ours, fused))


@pytest.mark.parametrize("act", [False, True])
def test_length_check_after_downsampling_truncates_or_rejects_with_act(act):
    """``check_downsampled_length``: outside the point-count bounds the float32 length decides;
    over maxlength the track is truncated to exactly maxlength, or rejected under ACT."""
    from invtract.tracking.tracker import check_length_post

    params = TrackingParameters(
        step_mm=1.0, min_length_mm=2.0, max_length_mm=4.5, downsample=2
    ).resolve((2.0, 2.0, 2.0))
    line = np.stack([np.zeros(8), np.zeros(8), np.arange(8.0)], -1).astype(np.float32)
    pts, s, rej = check_length_post(line[::2], 1, params, act=act)  # 0, 2, 4, 6 mm
    if act:
        assert rej == Reject.TRACK_TOO_LONG and pts is not None
    else:
        assert rej is None and s == 1 and pts.shape[0] == 4
        assert float(np.linalg.norm(np.diff(pts, axis=0), axis=1).sum()) == pytest.approx(4.5)
    _, _, rej = check_length_post(line[:2], 0, params, act=act)  # 1 mm: too short either way
    assert rej == Reject.TRACK_TOO_SHORT
