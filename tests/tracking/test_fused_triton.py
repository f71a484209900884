"""Fused Triton engine under the Triton interpreter: parity with the numba engine and tckgen.

Without a CUDA device the kernel runs on CPU tensors under ``TRITON_INTERPRET=1`` (set here
before the module is imported). The interpreter is slow (tens of ms per kernel-loop iteration),
so the default tests use short references and small subsets; the full reference files are
``slow``. Streamlines are re-tracked from their own seeds as in ``test_fused_cpu.py``.
"""

from __future__ import annotations

import math
import os
import warnings

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton", reason="triton is not installed (pip install triton)")

from reference_data import load_reference, need_data, split

from invtract.errors import ConfigError, InvtractWarning  # noqa: E402
from invtract.fod.field import FODField  # noqa: E402
from invtract.fod.legendre import plm_sph_column  # noqa: E402
from invtract.params import TrackingParameters  # noqa: E402
from invtract.tracking import fused_cpu, fused_triton  # noqa: E402
from invtract.tracking.engines import triton_gpu  # noqa: E402
from invtract.tracking.types import Reject, RoiSet, SphereRoi, Term  # noqa: E402

pytestmark = [
    pytest.mark.skipif(
        not fused_triton.available(), reason=str(fused_triton.unavailable_reason())
    ),
    pytest.mark.skipif(not fused_cpu.available(), reason="numba (the reference) is missing"),
]

TOL_MM = 1e-5


def _load_fod(case: str):
    """The FOD tckgen read: ``fod.mif``, whose text header keeps the transform in double
    precision (the NIfTI copy's float32 sform moves real-data points by up to 1e-4 mm)."""
    from invtract.io.mif import read_mif

    data, affine, voxel_sizes, _ = read_mif(str(need_data(case, "fod.mif")))
    return np.asarray(data, dtype=np.float32), np.asarray(affine), tuple(voxel_sizes)[:3]


def _assert_same(ours, ref, tol=TOL_MM):
    """Same decisions and counts as ``ref``; points within ``tol`` mm. Returns max distance."""
    np.testing.assert_array_equal(ours.status, ref.status)
    np.testing.assert_array_equal(ours.lengths, ref.lengths)
    np.testing.assert_array_equal(ours.seed_index, ref.seed_index)
    np.testing.assert_array_equal(ours.term, ref.term)
    assert ours.counts["steps"] == ref.counts["steps"]
    np.testing.assert_allclose(ours.init_dir, ref.init_dir, rtol=0, atol=1e-6)
    if ours.points.size == 0:
        return 0.0
    dist = float(np.linalg.norm(ours.points - ref.points, axis=1).max())
    assert dist <= tol, dist
    return dist


def _retrack(case: str, name: str, rows: slice, max_length_mm: float | None = None):
    """Track the reference's own seeds (selected ``rows``) with both engines.

    ``max_length_mm`` shortens the streamlines (the interpreter's time is set by the longest
    one): each half then stops at the point-count limit, and the output is a window around the
    seed of tckgen's streamline.
    """
    sh, affine, vox = _load_fod(case)
    header, streamlines, table = load_reference(case, name)
    table = table[rows]
    seeds, dirs, refs = [], [], []
    for track, s in table:
        ref = streamlines[track]
        nb = ref[s - 1] if s > 0 else ref[s + 1]
        seeds.append(ref[s])
        dirs.append((nb - ref[s]) if s > 0 else (ref[s] - nb))
        refs.append((ref, s))
    params = TrackingParameters(
        step_mm=float(header["step_size"]),
        angle_deg=float(header["max_angle"]),
        cutoff=float(header["threshold"]),
        min_length_mm=float(header["min_dist"]) if max_length_mm is None else 0.0,
        max_length_mm=float(header["max_dist"]) if max_length_mm is None else max_length_mm,
    ).resolve(vox)
    s2v = np.linalg.inv(affine)[:3]
    seeds, dirs = np.array(seeds), np.array(dirs)
    if "init_direction" in header:  # tckgen -seed_direction: the exact raw start direction
        raw = np.array([float(v) for v in header["init_direction"].split(",")], np.float32)
        dirs = np.tile(raw, (len(seeds), 1))
    ours = fused_triton.track_fused_triton(sh, s2v, seeds, dirs, params)
    numba = fused_cpu.track_fused_cpu(sh, s2v, seeds, dirs, params)
    return ours, numba, refs


def _check_reference(case, name, rows, max_length_mm=None, tol_tckgen=TOL_MM):
    ours, numba, refs = _retrack(case, name, rows, max_length_mm)
    d_numba = _assert_same(ours, numba)
    worst = 0.0
    for pts, s_ours, (ref, s) in zip(split(ours), ours.seed_index, refs):
        if max_length_mm is None:
            assert len(pts) == len(ref) and s_ours == s
            window = ref
        else:  # a window of tckgen's streamline, centred on the same seed point
            lo = s - s_ours
            assert lo >= 0 and lo + len(pts) <= len(ref)
            window = ref[lo : lo + len(pts)]
        worst = max(worst, float(np.linalg.norm(pts - window, axis=1).max()))
    assert worst <= tol_tckgen, worst
    print(f"{case}/{name}[{rows}]: {len(refs)} streamlines, max distance to numba "
          f"{d_numba:.2e} mm, to tckgen {worst:.2e} mm")  # fmt: skip


@pytest.mark.parity
@pytest.mark.parametrize(
    "case,name,rows,max_length_mm",
    [
        ("real_msmt15", "bundleA_default", slice(0, 216, 27), 5.0),
        ("phantom_cross90", "bundleB_default", slice(0, 96, 12), 4.0),
    ],
)
def test_parity_windows(case, name, rows, max_length_mm):
    """8 seeds of each default bundle, shortened: same counts and points as numba and tckgen."""
    _check_reference(case, name, rows, max_length_mm)


@pytest.mark.slow
@pytest.mark.parity
@pytest.mark.parametrize(
    "case,name,rows",
    [
        ("real_msmt15", "bundleA_default", slice(0, 216, 6)),  # 36 streamlines, ~2 min
        ("phantom_cross90", "bundleB_default", slice(0, 96, 3)),  # 32 streamlines
        ("real_msmt15", "bundleA_cutoff0.3", slice(0, 216, 6)),
        ("real_msmt15", "bundleA_angle30", slice(0, 216, 6)),
        ("real_msmt15", "bundleA_step0.5", slice(None)),
        ("phantom_cross90", "bundleB_cutoff1.0", slice(None)),
        ("phantom_cross90", "bundleB_angle1", slice(0, 96, 3)),
        ("phantom_cross90", "bundleB_step1.0", slice(None)),
    ],
)
def test_parity_references_slow(case, name, rows):
    _check_reference(case, name, rows)


@pytest.mark.slow
@pytest.mark.parity
def test_parity_whole_brain_slow():
    """Random start directions: tckgen's draw is only known as normalize(p[s-1] - p[s]), so the
    seed's peak search may start elsewhere and converge within its 1e-4 rad tolerance; the
    streamlines then agree with tckgen to ~1e-4 mm at worst, and with the numba engine exactly."""
    _check_reference("real_msmt15", "whole", slice(0, None, 97), tol_tckgen=1e-3)


@pytest.mark.slow
@pytest.mark.parity
def test_whole_streamline_2168_matches_tckgen_slow():
    """Regression (numba twin in test_fused_cpu.py): real whole.tck streamline 2168, whose last
    step's peak search gives up after 50 iterations in tckgen, on fod.mif: 84 points, bit for
    bit as tckgen and the numba engine (~35 s under the interpreter)."""
    from invtract.io.seeds import seeds_from_reference

    sh, affine, vox = _load_fod("real_msmt15")
    header, streamlines, _ = load_reference("real_msmt15", "whole")
    pos, dirs, track = seeds_from_reference(
        need_data("real_msmt15", "whole.tck"), need_data("real_msmt15", "whole_seeds.txt")
    )
    i = int(np.flatnonzero(track == 2168)[0])
    pos, dirs = pos[i : i + 1], dirs[i : i + 1]
    params = TrackingParameters(
        step_mm=float(header["step_size"]),
        angle_deg=float(header["max_angle"]),
        cutoff=float(header["threshold"]),
        min_length_mm=float(header["min_dist"]),
        max_length_mm=float(header["max_dist"]),
    ).resolve(vox)
    s2v = np.linalg.inv(affine)[:3]
    ours = fused_triton.track_fused_triton(sh, s2v, pos, dirs, params)
    numba = fused_cpu.track_fused_cpu(sh, s2v, pos, dirs, params)
    _assert_same(ours, numba)
    ref = streamlines[2168]
    assert len(ref) == 84
    assert ours.lengths.tolist() == [84] and ours.seed_index.tolist() == [40]
    assert np.abs(ours.points.astype(np.float64) - ref).max() <= 1e-4


# --------------------------------------------------------------------------------------------
# a short synthetic fibre along +x: every rule of the kernel, checked against numba
# --------------------------------------------------------------------------------------------

LMAX = 4
SHAPE = (8, 5, 5)  # 1 mm voxels, identity affine


def _fibre_x(lmax: int = LMAX) -> np.ndarray:
    K = (lmax + 1) * (lmax + 2) // 2
    c = np.zeros(K, dtype=np.float64)
    for m in range(lmax + 1):
        col = plm_sph_column(lmax, m, np.float32(0.0))
        for l in range(m if m % 2 == 0 else m + 1, lmax + 1, 2):
            c[l * (l + 1) // 2 + m] = col[l] * (math.sqrt(2.0) if m else 1.0)
    return c.astype(np.float32)


@pytest.fixture(scope="module")
def fibre():
    sh = np.broadcast_to(_fibre_x(), SHAPE + (15,)).copy()
    sh[:, 4, 4] = 0.0  # a zero-filled line: no data there
    sh[3, 1, 1, 0] = np.nan  # a NaN voxel
    return sh, np.hstack([np.eye(3), np.zeros((3, 1))])


def _both(fibre, seeds, dirs, variant="auto", **kw):
    sh, s2v = fibre
    kw.setdefault("step_mm", 0.5)
    params = TrackingParameters(**kw).resolve((1.0, 1.0, 1.0))
    seeds = np.asarray(seeds, np.float32).reshape(-1, 3)
    dirs = np.asarray(dirs, np.float32).reshape(-1, 3)
    ours = fused_triton.track_fused_triton(sh, s2v, seeds, dirs, params, variant=variant)
    ref = fused_cpu.track_fused_cpu(sh, s2v, seeds, dirs, params)
    _assert_same(ours, ref, tol=0.0)
    return params, ours


@pytest.mark.parametrize("variant", ["tile", "seq"])
def test_rules_against_numba(fibre, variant):
    """Both sum variants (``seq`` is the CUDA default) give the numba engine's bits."""
    seeds = [
        [4.0, 2.0, 2.0],  # both halves exit the image
        [4.0, 2.2, 1.7],  # off-grid
        [np.nan, 2.0, 2.0],  # invalid: NaN seed
        [-1.0, 2.0, 2.0],  # invalid: outside the FOV
        [4.0, 4.0, 4.0],  # invalid: zero voxel
        [3.0, 1.0, 1.0],  # invalid: NaN coefficients
        [4.0, 2.0, 2.0],  # invalid: NaN direction
        [6.8, 2.0, 2.0],  # near the end of the fibre
        [4.0, 3.0, 2.0],
    ]
    dirs = np.tile(np.float32([1.0, 0.1, 0.0]), (len(seeds), 1))
    dirs[6] = [np.nan, 0.0, 0.0]
    dirs[8] = [-2.0, 0.3, 0.1]  # raw, unnormalised
    _, res = _both(fibre, seeds, dirs, variant, min_length_mm=2.0)
    assert res.status[0] == Reject.ACCEPTED
    assert list(res.term[0]) == [Term.EXIT_IMAGE, Term.EXIT_IMAGE]
    assert all(res.status[i] == Reject.INVALID_SEED for i in (2, 3, 4, 5, 6))


def test_length_limit_unidirectional_and_angle(fibre):
    seeds = [[4.0, 2.0, 2.0], [2.0, 2.5, 2.5]]
    dirs = [[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]
    params, res = _both(fibre, seeds, dirs, max_length_mm=2.0, min_length_mm=0.5)
    assert list(res.term[0]) == [Term.LENGTH_EXCEED, Term.LENGTH_EXCEED]
    assert res.lengths[0] == params.max_points + 1
    seeds = [[4.0, 2.0, 2.0], [7.3, 2.0, 2.0], [7.45, 2.0, 2.0]]
    _, uni = _both(fibre, seeds, [[1.0, 0.0, 0.0]] * 3, unidirectional=True, min_length_mm=2.0)
    assert np.all(uni.seed_index[uni.accepted] == 0) and np.all(uni.term[:, 1] == -1)
    # the step that leaves the image is kept (x = 7.95 > 7.5): 2 points, too short
    assert list(uni.status) == [Reject.ACCEPTED, Reject.TRACK_TOO_SHORT, Reject.TRACK_TOO_SHORT]
    assert uni.counts["steps"] == 7 + 1 + 1
    # a 1 mm step cannot follow the lobe's peak once it is off-axis: high curvature at 1 deg
    _both(fibre, [[4.0, 2.0, 2.0]], [[1.0, 0.6, 0.0]], angle_deg=1.0, min_length_mm=0.0)


def test_supported_and_fallback(fibre, monkeypatch):
    """Every rule is in the kernel; only an unbounded ``max_points`` is refused (by the kernel
    and the ``triton`` engine, with a clear error), and without Triton the engine falls back to
    numba on CPU, with a warning."""
    base = TrackingParameters(step_mm=0.5).resolve((1.0, 1.0, 1.0))
    rois = RoiSet(include=(SphereRoi((6.0, 2.0, 2.0), 1.0),))
    assert fused_triton.supported(base)
    assert fused_triton.supported(TrackingParameters(rk4=True).resolve((1.0, 1.0, 1.0)))
    assert fused_triton.supported(TrackingParameters(downsample=2).resolve((1, 1, 1)))
    assert fused_triton.supported(base, rois)
    unbounded = TrackingParameters(step_mm=0.5, downsample=4, angle_deg=90.0).resolve((1, 1, 1))
    assert unbounded.max_points + 2 > fused_triton._MAX_BUFFER_POINTS
    assert not fused_triton.supported(unbounded)
    with pytest.raises(ValueError, match="unbounded"):
        fused_triton.track_fused_triton(*fibre, np.zeros((1, 3)), np.ones((1, 3)), unbounded)
    sh, _ = fibre
    field = FODField.from_array(sh, np.eye(4))
    seeds = np.float32([[4.0, 2.0, 2.0]])
    dirs = np.float32([[1.0, 0.0, 0.0]])
    with pytest.raises(ConfigError, match="unbounded"):
        triton_gpu.track(field, seeds, dirs, unbounded)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        direct = triton_gpu.track(field, seeds, dirs, base, rois)
    s2v = np.hstack([np.eye(3), np.zeros((3, 1))])
    ref = fused_cpu.track_fused_cpu(sh, s2v, seeds, dirs, base, rois)
    _assert_same(direct, ref, tol=0.0)
    monkeypatch.setattr(fused_triton, "unavailable_reason", lambda: "no triton here")
    with pytest.warns(InvtractWarning, match="no triton here; using the numba engine"):
        fb = triton_gpu.track(field, seeds, dirs, base, rois)
    _assert_same(fb, ref, tol=0.0)


def test_chunks_and_programs(fibre):
    sh, s2v = fibre
    params = TrackingParameters(step_mm=0.5, min_length_mm=1.0).resolve((1.0, 1.0, 1.0))
    rng = np.random.default_rng(0)
    seeds = rng.uniform([1, 0.5, 0.5], [6, 3.5, 3.5], (4, 3)).astype(np.float32)
    dirs = rng.normal(size=(4, 3)).astype(np.float32)
    one = fused_triton.track_fused_triton(sh, s2v, seeds, dirs, params)
    # 2 seeds per launch, one program of one lane: the lane takes the seeds one after the other
    many = fused_triton.track_fused_triton(sh, s2v, seeds, dirs, params, chunk_size=2,
                                           block=1, programs=1)  # fmt: skip
    assert many.counts["chunks"] == 2
    _assert_same(many, one, tol=0.0)
    _assert_same(one, fused_cpu.track_fused_cpu(sh, s2v, seeds, dirs, params), tol=0.0)
