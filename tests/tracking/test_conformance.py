"""Conformance suite: every engine follows every rule of :mod:`invtract.tracking.rules`.

An engine x case table on a small phantom written for it (``tests/data/conformance``:
``make_fixtures.py`` builds ``fod.mif`` and runs tckgen 3.0.3 once per case and seed; see its
``commands.txt``). The phantom has curved fibres that leave through the field-of-view faces,
a NaN voxel, all-zero voxels and a sub-threshold column; the seeds sit on voxel centres, faces
and edges, just inside and exactly on the field-of-view bounds, next to the NaN voxel and in
the weak column. The cases: default rules, minimum length 0 (single-point streamlines),
include / exclude / mask regions, ``-stop``, ordered include regions (in and out of order),
RK4 (also with minimum length 0), downsampling with truncation at the maximum length,
unidirectional tracking, maximum length by point count, a small angle.

* numba: bit for bit what tckgen wrote, seed by seed (the references).
* torch: the same decisions (status, point counts, seed index, terminations) and points within
  1e-5 mm of numba.
* Triton (interpreter, ``TRITON_INTERPRET=1``): bit for bit numba in every case (RK4,
  downsampling and the regions are in the kernel; ``fused_triton.supported`` holds for all).
* The differentiable tracker: the same decisions and points in the cases it covers; it refuses
  ``-rk4``, ``-downsample`` and ``-stop`` with a ConfigError (it takes no regions).
* The seeding code's seed test (numba ``SeedTest``, or the torch engine's without numba) takes
  the same decisions.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from invtract.fod.field import FODField  # noqa: E402
from invtract.io.mif import read_mif  # noqa: E402
from invtract.params import TrackingParameters  # noqa: E402
from invtract.tracking import fused_cpu  # noqa: E402
from invtract.tracking.tracker import seed_usable_torch, track_torch  # noqa: E402
from invtract.tracking.types import (  # noqa: E402
    EngineResult,
    ImageRoi,
    Reject,
    RoiSet,
    SphereRoi,
    Term,
)

DATA = Path(__file__).resolve().parents[1] / "data" / "conformance"
TOL_TORCH_MM = 1e-5

_spec = importlib.util.spec_from_file_location("conformance_fixtures", DATA / "make_fixtures.py")
fixtures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fixtures)

CASES = list(fixtures.CASES)

needs_numba = pytest.mark.skipif(not fused_cpu.available(), reason="numba is not installed")


def _fod():
    data, affine, _, _ = read_mif(str(DATA / "fod.mif"))
    return np.asarray(data, np.float32), np.asarray(affine, np.float64)


def _inputs(case: str):
    """``(sh, scanner2voxel [3, 4], seeds [S, 3], dirs [S, 3], params, rois)`` of a case."""
    sh, affine = _fod()
    o = fixtures.options(case)
    params = TrackingParameters(
        step_mm=o["step"],
        angle_deg=o.get("angle"),
        min_length_mm=o["minlength"],
        max_length_mm=o["maxlength"],
        rk4=bool(o.get("rk4")),
        downsample=int(o.get("downsample", 1)),
        unidirectional=bool(o.get("unidirectional")),
        stop=bool(o.get("stop")),
    ).resolve((1.0, 1.0, 1.0))

    def spheres(key):
        return tuple(SphereRoi(*fixtures.sphere_mm(s)) for s in o.get(key, ()))

    rois = RoiSet(
        include=spheres("include"),
        exclude=spheres("exclude"),
        mask=spheres("mask"),
        include_ordered=spheres("include_ordered"),
    )
    seeds = np.stack([fixtures.scanner_seed(v) for v in fixtures.SEEDS_VOX])
    dirs = np.tile(np.float32(o["direction"]), (len(seeds), 1))
    return sh, np.linalg.inv(affine)[:3], seeds, dirs, params, rois


def _split(res: EngineResult) -> list[np.ndarray]:
    """Per seed: its streamline ``[n, 3]`` (empty when rejected)."""
    out, start = [], 0
    for n in res.lengths:
        out.append(res.points[start : start + n])
        start += n
    return out


def _field(sh, s2v):
    """The float32 :class:`FODField` of ``sh [X, Y, Z, K]`` on the grid of ``s2v [3, 4]``."""
    affine = np.vstack([np.linalg.inv(np.vstack([s2v, [0, 0, 0, 1]]))[:3], [0, 0, 0, 1]])
    return FODField.from_array(sh, affine)


def _run(engine: str, case: str) -> EngineResult:
    sh, s2v, seeds, dirs, params, rois = _inputs(case)
    if engine == "numba":
        return fused_cpu.track_fused_cpu(sh, s2v, seeds, dirs, params, rois)
    if engine == "torch":
        return track_torch(_field(sh, s2v), seeds, dirs, params, rois)
    from invtract.tracking import fused_triton

    return fused_triton.track_fused_triton(sh, s2v, seeds, dirs, params, rois)


_NUMBA: dict[str, EngineResult] = {}


def _numba(case: str) -> EngineResult:
    if case not in _NUMBA:
        _NUMBA[case] = _run("numba", case)
    return _NUMBA[case]


def _same_decisions(ours: EngineResult, ref: EngineResult) -> None:
    np.testing.assert_array_equal(ours.status, ref.status)
    np.testing.assert_array_equal(ours.lengths, ref.lengths)
    np.testing.assert_array_equal(ours.seed_index, ref.seed_index)
    np.testing.assert_array_equal(ours.term, ref.term)


def test_the_table_covers_every_rule():
    """The references exercise what the suite claims (so a passing table means something)."""
    seen = {}
    for case in CASES:
        res = _numba(case) if fused_cpu.available() else None
        ref = np.load(DATA / f"{case}.npz")
        seen[case] = ref["lengths"]
        assert (ref["returncode"] == 0).all()
        if res is not None:
            seen[case + "_status"] = set(res.status.tolist())
    assert 1 in seen["minlength0"]  # tckgen wrote a single-point streamline
    assert seen["ordered"].any() and not seen["ordered_reversed"].any()
    if fused_cpu.available():
        assert int(Reject.INVALID_SEED) in seen["default_status"]
        assert int(Reject.MISSED_INCLUDE_REGION) in seen["ordered_reversed_status"]
        assert int(Reject.ENTER_EXCLUDE_REGION) in seen["regions_status"]
        for case in ("default", "angle"):
            assert {3, 5, 6} & set(_numba(case).term.ravel().tolist())


@needs_numba
@pytest.mark.parametrize("case", CASES)
def test_numba_is_tckgen_bit_for_bit(case):
    ref = np.load(DATA / f"{case}.npz")
    res = _numba(case)
    np.testing.assert_array_equal(res.lengths, ref["lengths"])
    np.testing.assert_array_equal(res.seed_index, ref["seed_index"])
    assert np.array_equal(res.points, ref["points"])  # every coordinate, bit for bit


@needs_numba
@pytest.mark.parametrize("case", CASES)
def test_torch_follows_the_same_rules(case):
    res, ref = _run("torch", case), _numba(case)
    _same_decisions(res, ref)
    for a, b in zip(_split(res), _split(ref)):
        if len(a):
            assert float(np.abs(a.astype(np.float64) - b).max()) <= TOL_TORCH_MM


#: the interpreter runs a few evaluations a second: the short case by default, the rest ``slow``
_TRITON_CASES = [
    pytest.param(c, marks=() if c == "maxlength" else pytest.mark.slow) for c in CASES
]


def _triton():
    pytest.importorskip("triton", reason="triton is not installed")
    from invtract.tracking import fused_triton

    if not fused_triton.available():
        pytest.skip(str(fused_triton.unavailable_reason()))
    return fused_triton


@needs_numba
@pytest.mark.parametrize("case", _TRITON_CASES)
def test_triton_is_numba_bit_for_bit(case):
    _triton()
    res, ref = _run("triton", case), _numba(case)
    _same_decisions(res, ref)
    assert np.array_equal(res.points, ref.points)
    np.testing.assert_array_equal(res.init_dir, ref.init_dir)


#: a few seeds per rule (``slow``: RK4 alone takes ~20 s under the interpreter)
_TRITON_QUICK = {
    "rk4_minlength0": [5, 7, 15],  # invalid seed; 4 and 2 points (RK4 steps to the FOV edge)
    "regions": [0, 4, 11],  # exits the mask; enters the exclude region; misses the include
    "ordered": [0, 7, 11],  # both ordered regions in order; too short twice
    "downsample": [0, 7, 15],  # truncated at the maximum length; downsampled short ones
}


def _image_roi(sphere: SphereRoi, vox: float, angle: float) -> ImageRoi:
    """``sphere`` rasterised on an oblique grid of ``vox`` mm voxels (rotated by ``angle`` rad
    about z), as an image region."""
    c, r = np.asarray(sphere.centre, np.float64), float(sphere.radius)
    ca, sa = np.cos(angle), np.sin(angle)
    rot = np.array([[ca, -sa, 0.0], [sa, ca, 0.0], [0.0, 0.0, 1.0]])
    n = int(np.ceil(2 * r / vox)) + 3
    v2s = np.eye(4)
    v2s[:3, :3] = rot * vox
    v2s[:3, 3] = c - rot @ np.full(3, (n - 1) / 2 * vox)
    ijk = np.stack(np.meshgrid(*[np.arange(n)] * 3, indexing="ij"), -1).reshape(-1, 3)
    inside = np.linalg.norm(ijk @ v2s[:3, :3].T + v2s[:3, 3] - c, axis=1) <= r
    return ImageRoi(inside.reshape(n, n, n), np.linalg.inv(v2s)[:3])


@needs_numba
def test_triton_kernel_regions_and_downsampling():
    """The default run's Triton check (~15 s under the interpreter; RK4 is in the ``slow``
    tests, five evaluations a step cost too much here): image include and mask regions on
    oblique grids, a sphere exclude region and downsampling with the maximum length in one
    launch, bit for bit numba: an accepted streamline (exits the mask, then the length limit),
    one that misses the include region, one that enters the exclude region, one too short."""
    fused_triton = _triton()
    sh, s2v, seeds, dirs, _, spheres = _inputs("regions")
    rois = RoiSet(
        include=(_image_roi(spheres.include[0], 0.8, 0.3),),
        exclude=spheres.exclude,
        mask=(_image_roi(spheres.mask[0], 1.3, 0.3),),
    )
    params = TrackingParameters(
        step_mm=0.5, min_length_mm=1.0, max_length_mm=4.0, downsample=3
    ).resolve((1.0, 1.0, 1.0))
    pick = [0, 3, 4, 7]
    res = fused_triton.track_fused_triton(sh, s2v, seeds[pick], dirs[pick], params, rois)
    ref = fused_cpu.track_fused_cpu(sh, s2v, seeds[pick], dirs[pick], params, rois)
    R = Reject
    expect = [R.ACCEPTED, R.MISSED_INCLUDE_REGION, R.ENTER_EXCLUDE_REGION, R.TRACK_TOO_SHORT]
    assert ref.status.tolist() == [int(r) for r in expect]
    assert ref.term[0].tolist() == [int(Term.EXIT_MASK), int(Term.LENGTH_EXCEED)]
    _same_decisions(res, ref)
    assert np.array_equal(res.points, ref.points)


@needs_numba
@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(_TRITON_QUICK))
def test_triton_kernel_rules_on_a_few_seeds(case):
    """RK4, regions (mask / include / exclude, ordered) and downsampling with truncation at
    the maximum length, in the kernel, bit for bit numba (and so tckgen) on a few seeds."""
    fused_triton = _triton()
    sh, s2v, seeds, dirs, params, rois = _inputs(case)
    pick = _TRITON_QUICK[case]
    res = fused_triton.track_fused_triton(sh, s2v, seeds[pick], dirs[pick], params, rois)
    ref = fused_cpu.track_fused_cpu(sh, s2v, seeds[pick], dirs[pick], params, rois)
    _same_decisions(res, ref)
    assert np.array_equal(res.points, ref.points)
    assert res.lengths.any()  # something was tracked


def test_every_case_is_in_the_triton_kernel():
    """No case needs a fallback: the kernel covers every rule of the table."""
    pytest.importorskip("triton", reason="triton is not installed")
    from invtract.tracking import fused_triton

    for case in CASES:
        _, _, _, _, params, rois = _inputs(case)
        assert fused_triton.supported(params, rois), case


@needs_numba
@pytest.mark.parametrize("case", ["default", "regions", "minlength0"])
def test_seed_test_is_one_rule(case):
    """The seeding code's seed test: numba's ``SeedTest`` and the torch engine's agree (FOV
    edges, NaN neighbourhood, zero voxels, mask and exclude regions)."""
    sh, s2v, seeds, _, _, rois = _inputs(case)
    extra = np.float32([[np.nan, 0, 0], [0, np.inf, 0]])
    seeds = np.concatenate([seeds, extra])
    ours = seed_usable_torch(sh, s2v, seeds, rois)
    ref = fused_cpu.SeedTest(sh, s2v, rois)(seeds)
    np.testing.assert_array_equal(ours, ref)
    assert ours.any() and not ours.all()


#: cases the differentiable tracker's hard pass covers (no RK4, downsampling, regions)
_DIFF_CASES = ["default", "maxlength", "unidirectional", "angle"]
#: cases it refuses (a ConfigError, not other streamlines)
_DIFF_REFUSED = ["rk4", "rk4_minlength0", "downsample", "stop"]


@pytest.mark.parametrize("case", _DIFF_REFUSED)
def test_differentiable_tracker_refuses_what_it_does_not_cover(case):
    from invtract.errors import ConfigError
    from invtract.tracking import differentiable

    sh, s2v, seeds, dirs, params, _ = _inputs(case)
    with pytest.raises(ConfigError, match="rk4, -downsample or -stop"):
        differentiable.track_differentiable(
            _field(sh, s2v), torch.as_tensor(seeds), torch.as_tensor(dirs), params
        )


@needs_numba
@pytest.mark.parametrize("hard_pass", ["auto", "torch"])
@pytest.mark.parametrize("case", _DIFF_CASES)
def test_differentiable_hard_pass_follows_the_same_rules(case, hard_pass, monkeypatch):
    """``track_differentiable``'s forward points are the tracker's: recorded by the numba
    kernel ("auto": float32 CPU) and by the torch engine ("torch")."""
    from invtract.tracking import differentiable

    monkeypatch.setattr(differentiable, "HARD_PASS", hard_pass)
    sh, s2v, seeds, dirs, params, _ = _inputs(case)
    out = differentiable.track_differentiable(
        _field(sh, s2v), torch.as_tensor(seeds), torch.as_tensor(dirs), params
    )
    ref = _numba(case)
    np.testing.assert_array_equal(out.status.numpy(), ref.status)
    np.testing.assert_array_equal(out.term.numpy(), ref.term)
    acc = np.flatnonzero(ref.status == int(Reject.ACCEPTED))
    np.testing.assert_array_equal(out.seed_ids.numpy(), acc)
    np.testing.assert_array_equal(out.lengths.numpy(), ref.lengths[acc])
    np.testing.assert_array_equal(out.seed_index.numpy(), ref.seed_index[acc])
    ours = out.streamlines().points.detach().numpy()
    assert float(np.abs(ours.astype(np.float64) - ref.points).max()) <= TOL_TORCH_MM


@needs_numba
@pytest.mark.parametrize("unidirectional", [False, True])
def test_triton_downsampling_pass_is_numba_bit_for_bit(unidirectional, monkeypatch):
    """The Triton engine's downsampling (on the host after the kernel) on many streamlines,
    without the interpreter: numba's raw streamlines (downsample 1, the same ``max_points``)
    through ``fused_triton._downsample`` and ``_check_downsampled_length`` equal numba's
    downsampled ones, truncations at the maximum length (and, both ways, the reversal of
    ``truncate_maxlength``) included."""
    pytest.importorskip("triton", reason="triton is not installed")
    import dataclasses

    from invtract.tracking import fused_triton

    calls = {"truncated": 0, "reversed": 0}
    truncate = fused_triton.truncate_maxlength

    def counted(b, seed, max_dist):
        out, new_seed = truncate(b, seed, max_dist)
        calls["truncated"] += 1
        calls["reversed"] += new_seed != seed
        return out, new_seed

    monkeypatch.setattr(fused_triton, "truncate_maxlength", counted)
    sh, s2v, _, _, _, _ = _inputs("default")
    rng = np.random.default_rng(3)
    lo, hi = np.float32(fixtures.OFFSET), np.float32(fixtures.OFFSET) + fixtures.SHAPE
    seeds = rng.uniform(lo, hi - 1, (400, 3)).astype(np.float32)
    dirs = rng.normal(size=(400, 3)).astype(np.float32)
    for maxlen in (4.0, 7.5):
        params = TrackingParameters(
            step_mm=0.5, min_length_mm=1.0, max_length_mm=maxlen, downsample=3,
            unidirectional=unidirectional,
        ).resolve((1.0, 1.0, 1.0))  # fmt: skip
        raw = fused_cpu.track_fused_cpu(
            sh, s2v, seeds, dirs, dataclasses.replace(params, downsample=1)
        )
        ref = fused_cpu.track_fused_cpu(sh, s2v, seeds, dirs, params)
        ours = fused_triton._check_downsampled_length(
            fused_triton._downsample(raw, params), params, act=False
        )
        _same_decisions(ours, ref)
        assert np.array_equal(ours.points, ref.points)
        assert ref.accepted.sum() > 50
    assert calls["truncated"] > 50
    assert (calls["reversed"] > 0) != unidirectional  # a unidirectional seed is point 0
