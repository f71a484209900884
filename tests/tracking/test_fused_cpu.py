"""Fused CPU engine: parity with tckgen reference tractograms, and every tracking rule.

Reference data: ``<repo>/../shared/data`` (see its README). Streamlines are re-tracked from
their own seeds (``X_seeds.txt``) with p0 = tck[s] and u_init = normalize(tck[s-1] - tck[s]).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from reference_data import load_reference, need_data, split

from invtract.fod.legendre import plm_sph_column
from invtract.params import TrackingParameters
from invtract.tracking import fused_cpu
from invtract.tracking.types import ImageRoi, Reject, RoiSet, SphereRoi, Term

pytestmark = pytest.mark.skipif(not fused_cpu.available(), reason="numba is not available")


#: (case, tractogram, every-k-th streamline) -- whole-brain files are subsampled for speed
REFERENCES = [
    ("real_msmt15", "bundleA_default", 1),
    ("real_msmt15", "bundleA_cutoff0.3", 1),
    ("real_msmt15", "bundleA_angle30", 1),
    ("real_msmt15", "bundleA_step0.5", 1),
    ("real_msmt15", "whole", 7),
    ("phantom_cross90", "bundleB_default", 1),
    ("phantom_cross90", "bundleB_cutoff1.0", 1),
    ("phantom_cross90", "bundleB_angle1", 1),
    ("phantom_cross90", "bundleB_step1.0", 1),
    ("phantom_cross90", "whole", 3),
]


def _load_fod(case: str):
    nib = pytest.importorskip("nibabel")
    img = nib.load(str(need_data(case, "fod.nii.gz")))
    sh = np.asarray(img.dataobj, dtype=np.float32)
    return sh, np.linalg.inv(img.affine)[:3], img.header.get_zooms()[:3]


def _params_from_header(header, voxel_sizes, **extra) -> TrackingParameters:
    def f(key):
        return float(header[key])

    return TrackingParameters(
        step_mm=f("step_size"),
        angle_deg=f("max_angle"),
        cutoff=f("threshold"),
        min_length_mm=f("min_dist"),
        max_length_mm=f("max_dist"),
        **extra,
    )


@pytest.mark.parametrize("case,name,every", REFERENCES)
def test_parity_with_tckgen(case, name, every):
    sh, s2v, vox = _load_fod(case)
    header, streamlines, table = load_reference(case, name)
    rows = table[::every]
    refs, seeds, dirs = [], [], []
    for track, s in rows:
        ref = streamlines[track]
        nb = ref[s - 1] if s > 0 else ref[s + 1]
        refs.append((ref, s))
        seeds.append(ref[s])
        dirs.append((nb - ref[s]) if s > 0 else (ref[s] - nb))
    params = _params_from_header(header, vox).resolve(vox)
    res = fused_cpu.track_fused_cpu(sh, s2v, np.array(seeds), np.array(dirs), params)
    ours = split(res)
    same, close, misses = 0, 0, []
    for i, (ref, s) in enumerate(refs):
        if len(ours[i]) == len(ref) and res.seed_index[i] == s:
            same += 1
            dist = float(np.linalg.norm(ours[i] - ref, axis=1).max())
            if dist < 1e-3:
                close += 1
            else:
                misses.append((i, "distance", dist))
        else:
            misses.append((i, "count", len(ours[i]), len(ref), int(res.status[i])))
    n = len(refs)
    for miss in misses[:20]:
        print(f"{case}/{name} miss:", miss)
    print(f"{case}/{name}: {n} streamlines, same count {same}, within 1e-3 mm {close}")
    assert same >= 0.99 * n
    assert close >= 0.99 * n
    assert res.counts["steps"] > 0


def test_phantom_bundle_is_bit_exact():
    """Axis-aligned phantom + exact -seed_direction: identical float32 vertices to tckgen."""
    sh, s2v, vox = _load_fod("phantom_cross90")
    header, streamlines, table = load_reference("phantom_cross90", "bundleB_default")
    seeds = np.array([streamlines[t][s] for t, s in table])
    dirs = np.tile(np.float32([1, 0, 0]), (len(seeds), 1))
    params = _params_from_header(header, vox).resolve(vox)
    res = fused_cpu.track_fused_cpu(sh, s2v, seeds, dirs, params)
    ours = split(res)
    exact = sum(np.array_equal(ours[i], streamlines[t]) for i, (t, _) in enumerate(table))
    assert exact == len(table)


# --------------------------------------------------------------------------------------------
# synthetic single-fibre FOD along +x (hand-computable geometry)
# --------------------------------------------------------------------------------------------

LMAX = 8
SHAPE = (60, 7, 7)  # 1 mm voxels, identity affine: voxel (i, j, k) is at (i, j, k) mm


def _fibre_x_coefficients(lmax: int = LMAX) -> np.ndarray:
    """SH of an axially symmetric lobe around +x: c_lm = Y_lm(x) (MRtrix basis)."""
    K = (lmax + 1) * (lmax + 2) // 2
    c = np.zeros(K, dtype=np.float64)
    for m in range(lmax + 1):
        col = plm_sph_column(lmax, m, np.float32(0.0))  # theta = pi/2
        start = m if m % 2 == 0 else m + 1
        for l in range(start, lmax + 1, 2):
            base = l * (l + 1) // 2
            c[base + m] = col[l] * (math.sqrt(2.0) if m else 1.0)  # cos(0) = 1, sin(0) = 0
    return c.astype(np.float32)


@pytest.fixture(scope="module")
def straight():
    sh = np.broadcast_to(_fibre_x_coefficients(), SHAPE + (45,)).copy()
    s2v = np.hstack([np.eye(3), np.zeros((3, 1))])
    return sh, s2v


def _track(straight, seeds, dirs=None, rois=None, **kw):
    sh, s2v = straight
    seeds = np.asarray(seeds, dtype=np.float32).reshape(-1, 3)
    if dirs is None:
        dirs = np.tile(np.float32([1, 0, 0]), (len(seeds), 1))
    params = TrackingParameters(**kw).resolve((1.0, 1.0, 1.0))
    return params, fused_cpu.track_fused_cpu(sh, s2v, seeds, dirs, params, rois=rois)


def test_straight_fibre_geometry(straight):
    params, res = _track(straight, [[30.0, 3.0, 3.0]])
    assert res.status[0] == Reject.ACCEPTED
    pts = split(res)[0]
    s = res.seed_index[0]
    np.testing.assert_array_equal(pts[s], [30.0, 3.0, 3.0])
    # the first half runs along +u0 and is stored reversed: x decreases along the output
    assert pts[0, 0] > 59.0 and pts[-1, 0] < 0.0
    np.testing.assert_allclose(np.abs(res.init_dir[0]), [1, 0, 0], atol=1e-6)
    seg = np.linalg.norm(np.diff(pts, axis=0), axis=1)
    np.testing.assert_allclose(seg, params.step_mm, rtol=1e-4)
    # both halves end one step outside the FOV (x <= -0.5 or x >= 59.5): EXIT_IMAGE
    assert list(res.term[0]) == [Term.EXIT_IMAGE, Term.EXIT_IMAGE]
    assert 59.5 <= pts[0, 0] < 59.5 + params.step_mm + 1e-4
    assert -0.5 - params.step_mm - 1e-4 < pts[-1, 0] <= -0.5
    assert res.counts["steps"] == len(pts) - 1


def test_seed_rejections(straight):
    sh, _ = straight
    seeds = [[np.nan, 3, 3], [-1.0, 3, 3], [30.0, 3, 3], [30.0, 3, 3]]
    dirs = np.float32([[1, 0, 0], [1, 0, 0], [0, 1, 0], [np.nan, 0, 0]])
    _, res = _track(straight, seeds, dirs=dirs)
    # NaN seed, outside the image, and a NaN start direction are invalid seeds
    assert res.status[0] == Reject.INVALID_SEED and res.status[1] == Reject.INVALID_SEED
    assert res.status[3] == Reject.INVALID_SEED
    assert list(res.term[0]) == [-1, -1]
    # starting orthogonal to the fibre: gradient ascent stays on the y great circle where the
    # lobe is a minimum -> amplitude below cutoff (or no convergence) -> invalid seed
    assert res.status[2] in (Reject.INVALID_SEED, Reject.ACCEPTED)
    assert res.lengths[0] == res.lengths[1] == 0 and res.seed_index[0] == -1


def test_seed_below_cutoff_keeps_its_peak(straight):
    # SDStream::init at the seed: the peak search (through the kernel's step, curvature test
    # off) converges on the fibre from an oblique start; below the cutoff the seed is invalid
    # but its init_dir is still that peak, not the start direction
    seeds = [[30.0, 3, 3], [30.0, 3, 3]]
    dirs = np.float32([[1, 0.2, 0.1], [1, 0.2, 0.1]])
    _, ok = _track(straight, seeds, dirs=dirs)
    _, low = _track(straight, seeds, dirs=dirs, cutoff=1e3)
    assert list(ok.status) == [Reject.ACCEPTED] * 2
    assert list(low.status) == [Reject.INVALID_SEED] * 2 and list(low.lengths) == [0, 0]
    np.testing.assert_allclose(np.abs(ok.init_dir), [[1, 0, 0]] * 2, atol=1e-5)
    assert np.array_equal(low.init_dir, ok.init_dir)
    # the start direction is oblique to the fibre (~13 deg): the peak is not the start
    assert float(np.abs(ok.init_dir[0]) @ (dirs[0] / np.linalg.norm(dirs[0]))) < 0.98


def test_max_length_counts_points(straight):
    params, res = _track(straight, [[30.0, 3.0, 3.0]], max_length_mm=2.0, min_length_mm=0.5)
    n_max = params.max_points
    # the first half saturates at n_max points, the second half still takes one step
    assert res.lengths[0] == n_max + 1
    assert res.seed_index[0] == n_max - 1
    assert list(res.term[0]) == [Term.LENGTH_EXCEED, Term.LENGTH_EXCEED]


def test_min_length_rule(straight):
    # seeds closer and closer to the far +x end: total length shrinks only on one side, so use
    # unidirectional tracking to get lengths (59.5 - x0) / h
    xs = np.array([57.0, 58.0, 58.6, 59.0, 59.3], dtype=np.float32)
    seeds = np.stack([xs, np.full_like(xs, 3), np.full_like(xs, 3)], axis=1)
    _, free = _track(straight, seeds, unidirectional=True, min_length_mm=0.0)
    assert np.all(free.status == Reject.ACCEPTED)
    params, res = _track(straight, seeds, unidirectional=True, min_length_mm=1.0)
    for i in range(len(xs)):
        n = free.lengths[i]
        if n == 1:
            expected = Reject.NO_PROPAGATION_FROM_SEED
        elif n < params.min_points:
            expected = Reject.TRACK_TOO_SHORT
        else:
            expected = Reject.ACCEPTED
        assert res.status[i] == expected, (i, n, params.min_points)
    assert (res.status == Reject.TRACK_TOO_SHORT).any() and (res.status == Reject.ACCEPTED).any()


def test_include_exclude_mask_spheres(straight):
    seed = [[30.0, 3.0, 3.0]]
    _, hit = _track(straight, seed, rois=RoiSet(include=(SphereRoi((40.0, 3.0, 3.0), 1.0),)))
    _, miss = _track(straight, seed, rois=RoiSet(include=(SphereRoi((40.0, 6.0, 3.0), 1.0),)))
    assert hit.status[0] == Reject.ACCEPTED
    assert miss.status[0] == Reject.MISSED_INCLUDE_REGION
    # exclude on the +x (first) half: appended, whole streamline rejected, 2nd half not tracked
    _, exc = _track(straight, seed, rois=RoiSet(exclude=(SphereRoi((35.0, 3.0, 3.0), 1.0),)))
    assert exc.status[0] == Reject.ENTER_EXCLUDE_REGION
    assert list(exc.term[0]) == [Term.ENTER_EXCLUDE, -1]
    _, exc_seed = _track(straight, seed, rois=RoiSet(exclude=(SphereRoi((30.0, 3.0, 3.0), 0.5),)))
    assert exc_seed.status[0] == Reject.INVALID_SEED
    # -mask sphere of radius 2: the point leaving it is not appended
    mask = RoiSet(mask=(SphereRoi((30.0, 3.0, 3.0), 2.0),))
    params, msk = _track(straight, seed, rois=mask, min_length_mm=1.0)
    assert msk.status[0] == Reject.ACCEPTED
    pts = split(msk)[0]
    assert list(msk.term[0]) == [Term.EXIT_MASK, Term.EXIT_MASK]
    assert np.all(np.linalg.norm(pts - [30.0, 3.0, 3.0], axis=1) <= 2.0 + 1e-5)
    assert abs(len(pts) - (2 * round(2.0 / params.step_mm) + 1)) <= 2
    _, out = _track(straight, seed, rois=RoiSet(mask=(SphereRoi((10.0, 3.0, 3.0), 2.0),)))
    assert out.status[0] == Reject.INVALID_SEED


def test_stop_at_include(straight):
    seed = [[30.0, 3.0, 3.0]]
    rois = RoiSet(include=(SphereRoi((35.0, 3.0, 3.0), 0.5),))
    params, res = _track(straight, seed, rois=rois, stop=True, min_length_mm=0.0)
    pts = split(res)[0]
    s = res.seed_index[0]
    assert list(res.term[0]) == [Term.TRAVERSE_ALL_INCLUDE, Term.TRAVERSE_ALL_INCLUDE]
    # first half stops at the first point inside the sphere (appended) ...
    assert np.linalg.norm(pts[0] - [35.0, 3.0, 3.0]) <= 0.5 + 1e-5
    assert np.linalg.norm(pts[1] - [35.0, 3.0, 3.0]) > 0.5
    # ... and the second half, with every region already visited, after one step
    assert len(pts) == s + 2


def test_image_rois(straight):
    sh, _ = straight
    s2v = np.hstack([np.eye(3), np.zeros((3, 1))])
    block = np.zeros(SHAPE, dtype=bool)
    block[44:46, 2:5, 2:5] = True  # contains x in [43.5, 45.5)
    seed = [[30.0, 3.0, 3.0]]
    _, inc = _track(straight, seed, rois=RoiSet(include=(ImageRoi(block, s2v),)))
    assert inc.status[0] == Reject.ACCEPTED
    _, exc = _track(straight, seed, rois=RoiSet(exclude=(ImageRoi(block, s2v),)))
    assert exc.status[0] == Reject.ENTER_EXCLUDE_REGION
    assert list(exc.term[0]) == [Term.ENTER_EXCLUDE, -1]
    # as -mask: voxels x in 26..34 keep the streamline within [25.5, 34.5)
    slab = np.zeros(SHAPE, dtype=bool)
    slab[26:35] = True
    _, msk = _track(straight, seed, rois=RoiSet(mask=(ImageRoi(slab, s2v),)), min_length_mm=1.0)
    pts = split(msk)[0]
    assert list(msk.term[0]) == [Term.EXIT_MASK, Term.EXIT_MASK]
    assert pts[:, 0].max() < 34.5 and pts[:, 0].max() >= 34.4 - 1e-4
    assert pts[:, 0].min() >= 25.5 and pts[:, 0].min() < 25.6 + 1e-4
    off_path = np.zeros(SHAPE, dtype=bool)
    off_path[44:46, 5:7, 5:7] = True
    _, miss = _track(straight, seed, rois=RoiSet(include=(ImageRoi(off_path, s2v),)))
    assert miss.status[0] == Reject.MISSED_INCLUDE_REGION
    # an image ROI with its own (shifted, 2 mm) grid: voxel centres at 2*i - 10 mm
    grid = np.zeros((40, 8, 8), dtype=bool)
    grid[25, 6:8, 6:8] = True  # x in [39, 41), y and z in [1, 5) mm: crossed at x = 40
    s2v2 = np.array([[0.5, 0, 0, 5.0], [0, 0.5, 0, 5.0], [0, 0, 0.5, 5.0]])
    _, inc2 = _track(straight, seed, rois=RoiSet(include=(ImageRoi(grid, s2v2),)))
    assert inc2.status[0] == Reject.ACCEPTED


def test_rk4_and_downsample_smoke(straight):
    seed = [[30.0, 3.0, 3.0]]
    p_rk4, rk4 = _track(straight, seed, rk4=True)
    assert rk4.status[0] == Reject.ACCEPTED
    pts = split(rk4)[0]
    np.testing.assert_allclose(np.linalg.norm(np.diff(pts, axis=0), axis=1), p_rk4.step_mm, 1e-4)
    # RK4 tests the end point of each step, so even the last point has data (inside the FOV)
    assert list(rk4.term[0]) == [Term.EXIT_IMAGE, Term.EXIT_IMAGE]
    assert pts[:, 0].max() < 59.5 and pts[:, 0].min() > -0.5
    p_ds, ds = _track(straight, seed, downsample=3)
    _, full = _track(straight, seed)
    d, f = split(ds)[0], split(full)[0]
    s_full, s_ds = full.seed_index[0], ds.seed_index[0]
    np.testing.assert_array_equal(d[s_ds], f[s_full])
    np.testing.assert_array_equal(d[0], f[0])
    np.testing.assert_array_equal(d[-1], f[-1])
    seg = np.linalg.norm(np.diff(d[1:-1], axis=0), axis=1)
    np.testing.assert_allclose(seg, 3 * p_ds.step_mm, rtol=1e-3)
    # downsampling with a maximum length truncates to exactly that length
    p_tr, tr = _track(straight, seed, downsample=3, max_length_mm=5.0, min_length_mm=1.0)
    t = split(tr)[0]
    assert tr.status[0] == Reject.ACCEPTED
    assert abs(np.linalg.norm(np.diff(t, axis=0), axis=1).sum() - 5.0) < 1e-4


def test_rk4_and_downsample_on_real_fod():
    sh, s2v, vox = _load_fod("real_msmt15")
    header, streamlines, table = load_reference("real_msmt15", "bundleA_default")
    seeds = np.array([streamlines[t][s] for t, s in table])
    dirs = np.tile(np.float32([0.55, 0.8, 0.23]), (len(seeds), 1))
    for kw in ({"rk4": True}, {"downsample": 4}, {"rk4": True, "downsample": 2}):
        params = TrackingParameters(**kw).resolve(vox)
        res = fused_cpu.track_fused_cpu(sh, s2v, seeds, dirs, params, nthreads=1)
        acc = res.accepted
        assert acc.mean() > 0.8, kw
        assert np.all(res.seed_index[acc] >= 0)
        assert np.all(res.seed_index[acc] < res.lengths[acc])
        assert res.points.shape[0] == res.lengths.sum()


def test_chunking_and_threads_do_not_change_results(straight):
    rng = np.random.default_rng(0)
    seeds = np.stack(
        [rng.uniform(5, 55, 64), rng.uniform(1, 5, 64), rng.uniform(1, 5, 64)], axis=1
    ).astype(np.float32)
    dirs = rng.normal(size=(64, 3)).astype(np.float32)
    sh, s2v = straight
    params = TrackingParameters().resolve((1.0, 1.0, 1.0))
    a = fused_cpu.track_fused_cpu(sh, s2v, seeds, dirs, params, nthreads=1, chunk_size=7)
    for pool in ("numba", "threads"):
        b = fused_cpu.track_fused_cpu(sh, s2v, seeds, dirs, params, nthreads=2, pool=pool)
        np.testing.assert_array_equal(a.points, b.points)
        np.testing.assert_array_equal(a.lengths, b.lengths)
        np.testing.assert_array_equal(a.status, b.status)
        np.testing.assert_array_equal(a.term, b.term)
        assert a.counts["steps"] == b.counts["steps"]
    with pytest.raises(ValueError, match="pool"):
        fused_cpu.track_fused_cpu(sh, s2v, seeds, dirs, params, pool="openmp")


# --------------------------------------------------------------------------------------------
# real_msmt15/whole.tck with tckgen's own inputs: fod.mif's transform, the seeds file's
# positions, the replayed random directions
# --------------------------------------------------------------------------------------------

#: ``MRTRIX_RNG_SEED`` of the shared whole-volume tractograms (data README, "Determinism")
RNG_SEED = 20240601


def _read_mif(case: str, name: str):
    """An image as tckgen read it: the ``.mif`` header keeps the transform in double precision
    (a NIfTI copy's float32 sform moves real-data points by up to 1e-4 mm, enough to flip a
    marginal peak search or threshold test)."""
    from invtract.io.mif import read_mif

    data, affine, voxel_sizes, _ = read_mif(str(need_data(case, name)))
    return np.asarray(data), np.asarray(affine, np.float64), tuple(voxel_sizes)[:3]


def test_whole_streamline_2168_matches_tckgen():
    """Regression: streamline 2168 (84 points) ends at a step whose peak search gives up after
    50 iterations in tckgen. On fod.mif this engine reproduces it bit for bit; on fod.nii.gz
    it has 103 points, as tckgen itself has when run on fod.nii.gz (a different input)."""
    from invtract.io.seeds import seeds_from_reference

    data, affine, vox = _read_mif("real_msmt15", "fod.mif")
    header, streamlines, _ = load_reference("real_msmt15", "whole")
    pos, dirs, track = seeds_from_reference(
        need_data("real_msmt15", "whole.tck"), need_data("real_msmt15", "whole_seeds.txt")
    )
    row = int(np.flatnonzero(track == 2168)[0])
    params = _params_from_header(header, vox).resolve(vox)
    res = fused_cpu.track_fused_cpu(
        data.astype(np.float32), np.linalg.inv(affine)[:3], pos[row : row + 1],
        dirs[row : row + 1], params,
    )  # fmt: skip
    ref = streamlines[2168]
    assert len(ref) == 84
    assert res.lengths.tolist() == [84] and res.seed_index.tolist() == [40]
    assert np.abs(res.points.astype(np.float64) - ref).max() <= 1e-4


@pytest.mark.parity
def test_whole_volume_replay_is_bit_exact():
    """-seed_grid_per_voxel mask.mif 2 with tckgen's RNG replayed: the same 13,598 of 17,744
    seeds produce streamlines (e.g. seed 17,456's peak search gives up), and all 7132 kept
    streamlines equal tckgen's bit for bit, seeds included."""
    from invtract.io.seeds import load_seeds
    from invtract.tracking.rng import MRtrixRNG
    from invtract.tracking.seeding import MaskGrid, grid_per_voxel

    data, affine, vox = _read_mif("real_msmt15", "fod.mif")
    mask, mask_affine, _ = _read_mif("real_msmt15", "mask.mif")
    header, streamlines, _ = load_reference("real_msmt15", "whole")
    sh, s2v = data.astype(np.float32), np.linalg.inv(affine)[:3]
    seeds = grid_per_voxel(MaskGrid.from_image(mask.astype(bool), mask_affine), 2)
    assert len(seeds) == int(header["max_num_seeds"]) == 17744
    # one random direction per seed with data, drawn in seed order
    has_data = fused_cpu.seeds_have_data(sh, s2v, seeds)
    dirs = np.full(seeds.shape, np.nan, np.float32)
    dirs[has_data] = MRtrixRNG(RNG_SEED).directions(int(has_data.sum()))
    params = _params_from_header(header, vox).resolve(vox)
    res = fused_cpu.track_fused_cpu(sh, s2v, seeds, dirs, params)
    generated = res.status != int(Reject.INVALID_SEED)
    assert not generated[17456]
    assert int(generated.sum()) == int(header["total_count"]) == 13598
    kept = np.flatnonzero(res.accepted)
    assert len(kept) == int(header["count"]) == len(streamlines) == 7132
    table = load_seeds(need_data("real_msmt15", "whole_seeds.txt"))
    np.testing.assert_array_equal(seeds[kept], np.asarray(table.positions, np.float32))
    ours = split(res)
    exact = sum(
        ours[i].shape == streamlines[k].shape and np.array_equal(ours[i], streamlines[k])
        for k, i in enumerate(kept)
    )
    assert exact == 7132


@pytest.mark.parametrize(
    "case,name", [("real_msmt15", "bundleA_default"), ("phantom_cross90", "whole")]
)
def test_peaks_variant_same_streamlines(case, name):
    # track_fused_cpu_peaks (the differentiable tracker's hard pass): the same kernel, so the
    # same points, lengths, statuses and terms bit for bit, on 1 and 2 threads; its recorded
    # peak at each vertex is the direction that step moved along (p = p_prev + h u, float32)
    sh, s2v, vox = _load_fod(case)
    header, streamlines, table = load_reference(case, name)
    rows = table[:300]
    seeds = np.array([streamlines[t][s] for t, s in rows])
    dirs = np.array(
        [
            (streamlines[t][s - 1] - streamlines[t][s])
            if s > 0
            else (streamlines[t][s] - streamlines[t][s + 1])
            for t, s in rows
        ]
    )
    dirs[::17] = np.nan  # a few rejected seeds
    params = _params_from_header(header, vox).resolve(vox)
    ref = fused_cpu.track_fused_cpu(sh, s2v, seeds, dirs, params)
    h = np.float32(params.step_mm)
    for threads in (1, 2):
        out = fused_cpu.track_fused_cpu_peaks(sh, s2v, seeds, dirs, params, threads=threads)
        assert np.array_equal(out["lengths"], ref.lengths)
        assert np.array_equal(out["status"], ref.status.astype(np.int64))
        assert np.array_equal(out["term"], ref.term.astype(np.int64))
        acc = ref.lengths > 0
        assert np.array_equal(out["seed_index"][acc], ref.seed_index[acc])
        assert np.array_equal(out["init_dir"], ref.init_dir, equal_nan=True)
        assert out["steps"] == ref.counts["steps"]
        P, U = out["points"], out["peaks"]
        pts = np.concatenate([P[i, :n] for i, n in enumerate(ref.lengths)])
        assert np.array_equal(pts, ref.points)
        checked = 0
        for i in np.flatnonzero(acc):
            s, n = out["seed_index"][i], out["lengths"][i]
            after = P[i, s : n - 1] + U[i, s + 1 : n] * h  # second half, outward
            before = P[i, 1 : s + 1] + U[i, :s] * h  # first half, outward (reversed)
            assert np.array_equal(after, P[i, s + 1 : n])
            assert np.array_equal(before, P[i, :s])
            assert np.allclose(np.linalg.norm(U[i, :s], axis=-1), 1.0, atol=1e-5)
            checked += n - 1
        assert checked > 1000


def test_peaks_variant_rejects_rk4(straight):
    sh, s2v = straight
    params = TrackingParameters(rk4=True).resolve((1.0, 1.0, 1.0))
    with pytest.raises(ValueError):
        fused_cpu.track_fused_cpu_peaks(sh, s2v, np.zeros((1, 3)), np.ones((1, 3)), params)


def test_target_preparation_skips_scipy_but_leaves_it_usable():
    """The compiled engine starts numba without importing scipy.linalg (0.3 s), and scipy and
    numba's BLAS-backed np.dot still work afterwards in the same process."""
    import subprocess
    import sys

    code = """
import sys, numpy as np
from invtract.tracking import fused_cpu
fused_cpu.seeds_have_data(np.ones((2, 2, 2, 1), np.float32), np.eye(4)[:3], np.zeros((1, 3)))
assert 'scipy.linalg' not in sys.modules, 'scipy.linalg was imported'
import scipy.linalg
import numba
dot = numba.njit(lambda a, b: np.dot(a, b))
assert dot(np.ones(3), np.arange(3.0)) == 3.0
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_batch_peaks_equal_the_torch_ascent():
    """``fused_cpu.peaks`` (the kernel's ``_get_peak`` over a batch of start directions) finds
        the peaks :func:`invtract.fod.peaks.mrtrix_peak` finds, to float32 rounding, on the real
        FOD at random points and start directions (a search that stops at the 50th iteration may
    end either side of it)."""
    import torch

    from invtract.fit.optimise import c_order_fod
    from invtract.fod.field import FODField
    from invtract.fod.peaks import mrtrix_peak
    from invtract.io.image import load_fod

    img = load_fod(need_data("real_msmt15", "fod.nii.gz"))
    affine = img.affine
    field = FODField.from_array(torch.from_numpy(c_order_fod(img.data)).float(), affine)
    g = torch.Generator().manual_seed(3)
    X = torch.tensor(field.shape, dtype=torch.float64)
    vox = torch.rand(4000, 3, generator=g, dtype=torch.float64) * (X - 1)
    A = torch.as_tensor(affine, dtype=torch.float64)
    c, ok = field.sample((vox @ A[:3, :3].T + A[:3, 3]).float())
    u = torch.nn.functional.normalize(torch.randn(4000, 3, generator=g), dim=-1)
    a_ref, d_ref = mrtrix_peak(c, u, field.lmax)
    a, d = fused_cpu.peaks(c.numpy(), u.numpy(), field.lmax)
    assert int(ok.sum()) > 1000 and np.isfinite(a).sum() > 1000
    both = np.isfinite(a) & np.isfinite(a_ref.numpy())
    assert (np.isnan(a) != np.isnan(a_ref.numpy())).sum() <= 4  # searches at 50 iterations
    np.testing.assert_allclose(a[both], a_ref.numpy()[both], rtol=1e-5, atol=1e-6)
    cos = (d[both] * d_ref.numpy()[both]).sum(-1)
    assert np.degrees(np.arccos(np.clip(cos, -1, 1))).max() < 0.05
