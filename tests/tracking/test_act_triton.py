"""ACT (``tckgen -act``) in the Triton kernel, bit for bit the numba ACT kernel (interpreter).

The numba kernel (:mod:`invtract.tracking.act_cpu`) writes what tckgen 3.0.3 writes on the ACT
references (``test_act.py``); here the Triton kernel, run by the Triton interpreter
(``TRITON_INTERPRET=1``, CPU), must write the same: every point, status, termination, seed
index and start direction, on a few seeds of each reference case (the reference's own seeds and
directions, seeds in WM, SGM and pathology with random directions, seeds on a GM-WM interface
that track one way). The interpreter runs a few evaluations a second, so the cases are tiny and
``slow``; the lane-wise rules (tissue classes, seed test, ``check_structural``,
``apply_priors``), the 5TT interpolation and the FOD amplitude are checked against the rulebook
and act_cpu on their own in fast tests. On CUDA see ``test_triton_gpu.py``.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import os
from pathlib import Path

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton", reason="triton is not installed")

from invtract.io.image import load_fod  # noqa: E402
from invtract.io.seeds import seeds_from_reference  # noqa: E402
from invtract.io.tractogram import load_tractogram_header  # noqa: E402
from invtract.params import TrackingParameters  # noqa: E402
from invtract.tracking import fused_cpu, fused_triton, rules  # noqa: E402
from invtract.tracking.act import ActImage, act_from_header, act_parameters, load_act  # noqa: E402
from invtract.tracking.reference import parameters_from_header  # noqa: E402
from invtract.tracking.types import EngineResult, Reject, Term  # noqa: E402

from .reference_data import need_data  # noqa: E402

tl = triton.language
LOCAL = Path(__file__).resolve().parents[1] / "data" / "act"

pytestmark = [
    pytest.mark.skipif(not fused_cpu.available(), reason="numba (the reference) is missing"),
    pytest.mark.skipif(
        not fused_triton.INTERPRET,
        reason="bit-for-bit checks run in the Triton interpreter (CUDA: test_triton_gpu.py)",
    ),
]


# --------------------------------------------------------------------------------------------
# the lane-wise rules against the rulebook
# --------------------------------------------------------------------------------------------

if fused_triton.INTERPRET:

    @triton.jit
    def _rules_kernel(x_ptr, st_ptr, out_ptr, acc_ptr, N, BLOCK: tl.constexpr):
        """Per row ``(cgm, sgm, wm, csf, path)`` and state ``(valid, depth, sgm_seed, to_wm)``:
        the kernel's tissue classes, seed test and check_structural."""
        i = tl.arange(0, BLOCK)
        m = i < N
        c = tl.load(x_ptr + i * 5, mask=m, other=0.0)
        s = tl.load(x_ptr + i * 5 + 1, mask=m, other=0.0)
        w = tl.load(x_ptr + i * 5 + 2, mask=m, other=0.0)
        f = tl.load(x_ptr + i * 5 + 3, mask=m, other=0.0)
        p = tl.load(x_ptr + i * 5 + 4, mask=m, other=0.0)
        valid = tl.load(st_ptr + i * 4, mask=m, other=0) != 0
        depth = tl.load(st_ptr + i * 4 + 1, mask=m, other=0)
        sgm_seed = tl.load(st_ptr + i * 4 + 2, mask=m, other=0) != 0
        to_wm = tl.load(st_ptr + i * 4 + 3, mask=m, other=0) != 0
        acc = tl.load(acc_ptr)
        o = out_ptr + i * 8
        tl.store(o, fused_triton._is_csf(c, s, w, f, p).to(tl.int32), mask=m)
        tl.store(o + 1, fused_triton._is_sgm(c, s, w, f, p).to(tl.int32), mask=m)
        tl.store(o + 2, fused_triton._is_gm(c, s, w, f, p).to(tl.int32), mask=m)
        tl.store(o + 3, fused_triton._is_path(c, s, w, f, p).to(tl.int32), mask=m)
        tl.store(o + 4, fused_triton._act_seed_ok(c, s, w, f, p, acc).to(tl.int32), mask=m)
        t, d2, w2 = fused_triton._check_structural(m, valid, c, s, w, f, p, depth, sgm_seed,
                                                   to_wm)  # fmt: skip
        tl.store(o + 5, t, mask=m)
        tl.store(o + 6, d2, mask=m)
        tl.store(o + 7, w2.to(tl.int32), mask=m)

    @triton.jit
    def _priors_kernel(t_ptr, out_ptr, N, BLOCK: tl.constexpr):
        """Per row ``(term, depth, in_path)``: the kernel's apply_priors."""
        i = tl.arange(0, BLOCK)
        m = i < N
        t = tl.load(t_ptr + i * 3, mask=m, other=0)
        depth = tl.load(t_ptr + i * 3 + 1, mask=m, other=0)
        in_path = tl.load(t_ptr + i * 3 + 2, mask=m, other=0) != 0
        t2, excluded, reason = fused_triton._act_priors(t, depth, in_path)
        tl.store(out_ptr + i * 3, t2, mask=m)
        tl.store(out_ptr + i * 3 + 1, excluded.to(tl.int32), mask=m)
        tl.store(out_ptr + i * 3 + 2, reason, mask=m)

    @triton.jit
    def _tissues_kernel(p_ptr, out_ptr, tt_ptr, tnz_ptr, mt_ptr, TX, TY, TZ, N,
                        BLOCK: tl.constexpr, MASKED: tl.constexpr):  # fmt: skip
        """The kernel's 5TT interpolation at each point: ``(interp, valid, five tissues)``."""
        i = tl.arange(0, BLOCK)
        m = i < N
        px = tl.load(p_ptr + i * 3, mask=m, other=0.0)
        py = tl.load(p_ptr + i * 3 + 1, mask=m, other=0.0)
        pz = tl.load(p_ptr + i * 3 + 2, mask=m, other=0.0)
        ok, valid, c, s, w, f, p = fused_triton._tissues(px, py, pz, m, tt_ptr, tnz_ptr, mt_ptr,
                                                         TX, TY, TZ, BLOCK, MASKED)  # fmt: skip
        o = out_ptr + i * 7
        tl.store(o, ok.to(tl.float32), mask=m)
        tl.store(o + 1, valid.to(tl.float32), mask=m)
        tl.store(o + 2, c, mask=m)
        tl.store(o + 3, s, mask=m)
        tl.store(o + 4, w, mask=m)
        tl.store(o + 5, f, mask=m)
        tl.store(o + 6, p, mask=m)

    @triton.jit
    def _amplitude_kernel(u_ptr, cs_ptr, out_ptr, lut_ptr, NAL, inc, tab_ptr, k_ptr, N,
                          BLOCK: tl.constexpr, NS: tl.constexpr):  # fmt: skip
        """The kernel's FOD amplitude along each direction (coefficients ``cs[k, lane]``)."""
        lane = tl.arange(0, BLOCK)
        m = lane < N
        ux = tl.load(u_ptr + lane * 3, mask=m, other=1.0)
        uy = tl.load(u_ptr + lane * 3 + 1, mask=m, other=0.0)
        uz = tl.load(u_ptr + lane * 3 + 2, mask=m, other=0.0)
        v = fused_triton._amplitude(cs_ptr, lane, BLOCK, ux, uy, uz, m, lut_ptr, NAL, inc,
                                    tab_ptr, k_ptr, BLOCK, NS)  # fmt: skip
        tl.store(out_ptr + lane, v, mask=m)


def _tissue_grid() -> np.ndarray:
    """Tissue rows full of ties (values 0, 1/4, ..., 1) and GM - WM around GMWMI_ACCURACY."""
    vals = np.float32([0.0, 0.25, 0.5, 0.75, 1.0])
    rows = [np.float32(r) for r in itertools.product(vals, repeat=5)]
    w = np.float32(0.5) - np.float32(rules.GMWMI_ACCURACY)
    for _ in range(4):
        w = np.nextafter(w, np.float32(0.0))
    for _ in range(9):  # cgm 0.5, wm a few ulps around 0.49: GM - WM straddles 0.01
        rows.append(np.float32([0.5, 0.0, w, 0.0, 0.0]))
        w = np.nextafter(w, np.float32(1.0))
    return np.ascontiguousarray(np.stack(rows), np.float32)


def test_lane_rules_are_the_rulebook():
    """Tissue classes, the seed test and check_structural: every row and state, as rules.* and
    act_cpu ``_check_structural`` decide them."""
    from invtract.tracking.act_cpu import _check_structural

    x = _tissue_grid()
    states = [(1, 0, 0, 0), (1, 2, 0, 0), (1, 2, 1, 0), (1, 2, 1, 1), (0, 1, 0, 0)]
    seen = collections.Counter()
    for state in states:
        st = np.tile(np.int32(state), (x.shape[0], 1))
        out = np.zeros((x.shape[0], 8), np.int32)
        acc = torch.tensor([rules.GMWMI_ACCURACY], dtype=torch.float64)
        _rules_kernel[(1,)](torch.from_numpy(x), torch.from_numpy(st), torch.from_numpy(out),
                            acc, x.shape[0], BLOCK=4096)  # fmt: skip
        for row, o in zip(x, out):
            args = tuple(row)
            expect = [rules.is_csf(*args), rules.is_sgm(*args), rules.is_gm(*args),
                      rules.is_path(*args), rules.act_seed_ok(*args)]  # fmt: skip
            assert o[:5].tolist() == [int(e) for e in expect], (row, o)
            s = np.int64([state[1], state[2], state[3], state[0]])  # act_cpu's state order
            term = _check_structural(s, row)
            assert (o[5], o[6], o[7]) == (term, s[0], s[2]), (row, state, o)
            seen[Term(int(term)).name] += 1
    assert {"CONTINUE", "EXIT_IMAGE", "ENTER_CSF", "ENTER_CGM", "EXIT_SGM"} <= set(seen)


def test_lane_priors_are_the_rulebook():
    rows = np.int32([(int(t), d, p) for t in Term for d in (0, 3) for p in (0, 1)])
    out = np.zeros_like(rows)
    _priors_kernel[(1,)](torch.from_numpy(rows), torch.from_numpy(out), rows.shape[0], BLOCK=64)
    for (t, d, p), (t2, excluded, reason) in zip(rows, out):
        expect_t, expect_x = rules.act_priors(int(t), int(d), bool(p))
        assert (t2, bool(excluded)) == (expect_t, expect_x), (Term(int(t)).name, d, p)
        if excluded:
            assert reason == rules.act_exclusion_reason(int(t))


def _5tt_with_holes() -> ActImage:
    """The partial-volume 5TT with a NaN voxel and an all-zero voxel inside."""
    act = load_act(LOCAL / "5tt_pv.mif")
    data = np.array(act.data, np.float32)
    data[10, 4, 8, 2] = np.nan
    data[12, 4, 8, :] = 0.0
    return ActImage(data, act.scanner2voxel, act.voxel_sizes)


@pytest.mark.parametrize("masked", [True, False])
def test_5tt_interpolation_is_act_cpu(masked):
    """Masked (tracking) and unmasked (interface search) 5TT interpolation, bit for bit
    act_cpu ``_tissues``: points in and just outside the image, at voxel centres and faces,
    next to the NaN and the all-zero voxel."""
    from invtract.tracking.act_cpu import _act_arrays, _tissues
    from invtract.tracking.fused_cpu import _interp

    act = _5tt_with_holes()
    tt, Mt = _act_arrays(act)
    A = np.linalg.inv(np.vstack([Mt, [0, 0, 0, 1]]))
    rng = np.random.default_rng(5)
    shape = np.array(tt.shape[:3], np.float64)
    v = rng.uniform(-0.7, 1.0, (400, 3)) * (shape - 0.3)
    v[:40] = np.round(v[:40])  # voxel centres
    v[40:80] = np.floor(v[40:80]) + 0.5  # faces
    v[80:120] = np.float64([10, 4, 8]) + rng.uniform(-1.2, 1.2, (40, 3))  # by the NaN voxel
    v[120:160] = np.float64([12, 4, 8]) + rng.uniform(-1.2, 1.2, (40, 3))  # by the empty one
    pts = np.ascontiguousarray((v @ A[:3, :3].T + A[:3, 3]).astype(np.float32))
    t_tt, t_nz, t_mt, TX, TY, TZ, _ = fused_triton._act_inputs(act, torch.device("cpu"))
    out = torch.zeros((pts.shape[0], 7), dtype=torch.float32)
    _tissues_kernel[(1,)](torch.from_numpy(pts), out, t_tt, t_nz, t_mt, TX, TY, TZ,
                          pts.shape[0], BLOCK=512, MASKED=masked)  # fmt: skip
    out = out.numpy()
    tbuf, tis = np.zeros(5, np.float32), np.zeros(5, np.float32)
    kinds = collections.Counter()
    for p, o in zip(pts, out):
        ok = _interp(tt, Mt, p[0], p[1], p[2], tbuf, masked)
        valid = _tissues(tt, masked, Mt, p[0], p[1], p[2], tbuf, tis)
        assert (bool(o[0]), bool(o[1])) == (bool(ok), bool(valid)), p
        assert np.array_equal(o[2:], tis), (p, o, tis)
        kinds[(bool(ok), bool(valid))] += 1
    assert kinds[(True, True)] and kinds[(False, False)] and kinds[(True, False)]


def test_fod_amplitude_is_act_cpu():
    """The EXIT_SGM truncation metric (``PrecomputedAL::value``), bit for bit act_cpu
    ``_amplitude``: random directions, the poles and the equator's axes."""
    from invtract.fod.legendre import legendre_table, lut_increment, n_legendre
    from invtract.tracking.act_cpu import _amplitude
    from invtract.tracking.fused_cpu import _FP_INC, _kernel_inputs

    fod = load_fod(need_data("sift_phantom", "fods.mif"))
    data = np.asarray(fod.data, np.float32)
    params = TrackingParameters().resolve(fod.voxel_sizes)
    one = np.ones((1, 3), np.float32)
    k = _kernel_inputs(data, fod.scanner2voxel, one, one, params, None)
    fp, _, lut, zint, _, pint, _, mstart = k.consts
    rng = np.random.default_rng(11)
    u = rng.normal(size=(60, 3))
    u = np.vstack([u / np.linalg.norm(u, axis=1, keepdims=True), np.eye(3), -np.eye(3)])
    u = np.ascontiguousarray(u, np.float32)
    flat = data.reshape(-1, data.shape[-1])
    coeffs = flat[rng.choice(np.flatnonzero(flat[:, 0] > 0.1), u.shape[0])]
    B = 128
    cs = np.zeros((data.shape[-1], B), np.float32)
    cs[:, : u.shape[0]] = coeffs.T
    tab, _, NS = fused_triton._tables(8)
    out = torch.zeros(u.shape[0], dtype=torch.float32)
    lut_t = torch.as_tensor(np.array(legendre_table(8), np.float32).reshape(-1))
    _amplitude_kernel[(1,)](torch.from_numpy(u), torch.from_numpy(cs.reshape(-1)), out, lut_t,
                            n_legendre(8), float(lut_increment()), torch.from_numpy(tab),
                            torch.tensor([rules.SQRT2], dtype=torch.float64), u.shape[0],
                            BLOCK=B, NS=NS)  # fmt: skip
    for i in range(u.shape[0]):
        ref = _amplitude(coeffs[i], u[i, 0], u[i, 1], u[i, 2], lut, fp[_FP_INC], zint, pint,
                         mstart, 8)  # fmt: skip
        assert np.float32(out[i].item()) == ref, (i, u[i], out[i].item(), ref)


# --------------------------------------------------------------------------------------------
# tracking: Triton against numba on the ACT references
# --------------------------------------------------------------------------------------------


def _fod():
    fod = load_fod(need_data("sift_phantom", "fods.mif"))
    return np.asarray(fod.data, np.float32), np.asarray(fod.scanner2voxel), fod.voxel_sizes


def _reference(name: str):
    """``(tck path, ActImage, params)`` of an ACT reference (shared or tests/data/act)."""
    shared = need_data("sift_phantom")
    tck = (shared if (shared / f"{name}.tck").exists() else LOCAL) / f"{name}.tck"
    header = load_tractogram_header(tck)
    act = act_from_header(header, tck.parent)
    _, _, vox = _fod()
    params = act_parameters(parameters_from_header(header), vox).resolve(vox)
    return tck, act, params


def _tissue_seeds(act: ActImage, volume: int, n: int, rng) -> np.ndarray:
    """``n`` random scanner points in voxels where tissue ``volume`` is above 0.3."""
    vox = np.argwhere(np.asarray(act.data[..., volume]) > 0.3)
    v = vox[rng.choice(len(vox), n)] + rng.uniform(-0.5, 0.5, (n, 3))
    A = np.linalg.inv(np.vstack([act.scanner2voxel, [0, 0, 0, 1]]))
    return (v @ A[:3, :3].T + A[:3, 3]).astype(np.float32)


def _seeds(tck: Path, act: ActImage, params, n_ref: int, volumes: tuple, want: set, seed=0):
    """The first-direction seeds of ``n_ref`` streamlines of the reference (evenly spaced),
    then seeds in the tissue ``volumes`` with random directions: from a pool of 200 (tracked
    by numba, which is quick), the first one of each outcome in ``want`` (a termination or
    rejection name) and one more."""
    from invtract.tracking.act_cpu import track_fused_cpu_act

    rng = np.random.default_rng(seed)
    pos, dirs, _ = seeds_from_reference(tck, tck.with_name(tck.stem + "_seeds.txt"))
    pick = np.linspace(0, len(pos) - 1, n_ref).round().astype(int)
    pool = np.concatenate([_tissue_seeds(act, v, 200 // len(volumes), rng) for v in volumes])
    pool_dirs = rng.normal(size=pool.shape).astype(np.float32)
    sh, s2v, _ = _fod()
    out = track_fused_cpu_act(sh, s2v, pool, pool_dirs, params, act)
    names = [
        {Reject(int(out.status[i])).name} | {Term(int(t)).name for t in out.term[i] if t >= 0}
        for i in range(pool.shape[0])
    ]
    chosen = [next((i for i, n in enumerate(names) if w in n), None) for w in sorted(want)]
    chosen = sorted({i for i in chosen if i is not None} | {0})
    return (
        np.concatenate([pos[pick], pool[chosen]]).astype(np.float32),
        np.concatenate([dirs[pick], pool_dirs[chosen]]).astype(np.float32),
    )


def _both(seeds, dirs, params, act, rois=None) -> tuple[EngineResult, EngineResult]:
    from invtract.tracking.act_cpu import track_fused_cpu_act

    sh, s2v, _ = _fod()
    ref = track_fused_cpu_act(sh, s2v, seeds, dirs, params, act, rois)
    res = fused_triton.track_fused_triton(sh, s2v, seeds, dirs, params, rois, act=act)
    return res, ref


def _assert_bit_for_bit(res: EngineResult, ref: EngineResult) -> None:
    np.testing.assert_array_equal(res.status, ref.status)
    np.testing.assert_array_equal(res.term, ref.term)
    np.testing.assert_array_equal(res.lengths, ref.lengths)
    np.testing.assert_array_equal(res.seed_index, ref.seed_index)
    assert np.array_equal(res.points, ref.points)  # every coordinate, bit for bit
    np.testing.assert_array_equal(res.init_dir, ref.init_dir)
    assert res.counts["steps"] == ref.counts["steps"]
    # the termination statistics (tckgen -info's tables) follow
    assert _stats(res) == _stats(ref)


def _stats(res: EngineResult) -> tuple[dict, dict]:
    terms = collections.Counter(Term(int(t)).name for t in res.term.ravel() if t >= 0)
    status = collections.Counter(Reject(int(s)).name for s in res.status)
    return dict(terms), dict(status)


#: reference -> (its streamlines, tissue volumes of the extra seeds, outcomes they must show)
_CASES = {
    "act_grid_cutoff0.2": (3, (2,), {"ENTER_CGM", "ACCEPTED", "INVALID_SEED"}),
    "act_grid_crop": (3, (2,), {"ENTER_CGM", "ACCEPTED", "INVALID_SEED"}),
    "act_grid_pv": (2, (2, 4), {"ENTER_CSF", "ACT_POOR_TERMINATION", "INVALID_SEED"}),
    "act_grid_pv_crop": (2, (2, 4), {"ENTER_CGM", "ACT_POOR_TERMINATION", "ENTER_CSF"}),
    "act_grid_sgm": (3, (1,), {"EXIT_SGM", "ACT_FAILED_WM_REQUIREMENT", "TRACK_TOO_SHORT"}),
    "act_grid2_sgm_crop": (3, (1, 2), {"EXIT_SGM", "ENTER_CGM", "EXIT_IMAGE"}),
    "act_gmwmi_sgm": (3, (1, 2), {"EXIT_SGM", "ACCEPTED", "ENTER_CSF"}),
    # -downsample with ACT: downsampled on the host, then ACT's length check (rejects)
    "act_grid_pv_ds3": (2, (2,), {"ENTER_CGM", "ACCEPTED"}),
    "act_grid_pv_crop_ds4_max24": (3, (2,), {"ACCEPTED", "TRACK_TOO_LONG"}),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(_CASES))
def test_triton_act_is_numba_bit_for_bit(name):
    tck, act, params = _reference(name)
    n_ref, volumes, want = _CASES[name]
    seeds, dirs = _seeds(tck, act, params, n_ref, volumes, want)
    res, ref = _both(seeds, dirs, params, act)
    _assert_bit_for_bit(res, ref)
    terms, status = _stats(ref)
    assert want <= set(terms) | set(status), (terms, status)


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, change, want",
    [
        # a short maximum length: LENGTH_EXCEED excludes (TRACK_TOO_LONG under ACT)
        ("act_grid_sgm", {"max_length_mm": 6.0}, {"TRACK_TOO_LONG", "LENGTH_EXCEED"}),
        # a high cutoff: model failures, poor terminations
        ("act_grid2_sgm_crop", {"cutoff": 0.45}, {"MODEL", "ACT_POOR_TERMINATION"}),
        # RK4 (five evaluations a step; ACT's tests after the whole step)
        ("act_grid_pv_crop", {"rk4": True}, {"EXIT_IMAGE", "ACCEPTED", "INVALID_SEED"}),
    ],
)
def test_triton_act_other_parameters(name, change, want):
    tck, act, _ = _reference(name)
    _, _, vox = _fod()
    base = parameters_from_header(load_tractogram_header(tck))
    params = act_parameters(dataclasses.replace(base, **change), vox).resolve(vox)
    seeds, dirs = _seeds(tck, act, params, 2, (1, 2) if act.has_sgm else (2,), want, seed=2)
    res, ref = _both(seeds, dirs, params, act)
    _assert_bit_for_bit(res, ref)
    terms, status = _stats(ref)
    assert want <= set(terms) | set(status), (terms, status)


@pytest.mark.slow
def test_triton_act_with_regions():
    """ACT and regions together (check_structural first, then mask, exclude, include): mask
    spheres of 4 mm around the seeds, an exclude sphere on one streamline, an include sphere
    on another (1.6 mm from their seeds on numba's streamlines without regions)."""
    from invtract.tracking.act_cpu import track_fused_cpu_act
    from invtract.tracking.types import RoiSet, SphereRoi

    tck, act, params = _reference("act_grid_sgm")
    seeds, dirs = _seeds(tck, act, params, 4, (1,), {"EXIT_SGM"})
    sh, s2v, _ = _fod()
    free = track_fused_cpu_act(sh, s2v, seeds, dirs, params, act)
    lines = np.split(free.points, np.cumsum(free.lengths)[:-1])
    near = [
        tuple(float(v) for v in b[min(len(b) - 1, k + 8)])
        for b, k in zip(lines, free.seed_index)
        if len(b)
    ]
    rois = RoiSet(
        mask=tuple(SphereRoi(tuple(float(v) for v in p), 4.0) for p in seeds),
        exclude=(SphereRoi(near[0], 0.5),),
        include=(SphereRoi(near[1], 0.5),),
    )
    res, ref = _both(seeds, dirs, params, act, rois)
    _assert_bit_for_bit(res, ref)
    terms, status = _stats(ref)
    assert {"EXIT_MASK", "ENTER_EXCLUDE_REGION", "MISSED_INCLUDE_REGION"} <= set(terms) | set(
        status
    ), (terms, status)


def _slab_5tt() -> ActImage:
    """The phantom's 5TT with a cortical-GM slab across its WM (two voxel planes at x = 21,
    22 with GM 0.3 / 0.7, WM beyond), so that GM-WM interface points lie where the FOD has
    data, a few mm from the end of the WM."""
    base = load_act(need_data("sift_phantom", "5tt.mif"))
    data = np.array(base.data, np.float32)
    wm = data[..., 2] > 0.5
    for k, cgm in enumerate((0.3, 0.7)):
        plane = data[21 + k]
        plane[wm[21 + k]] = (cgm, 0.0, 1.0 - cgm, 0.0, 0.0)
    return ActImage(data, base.scanner2voxel, base.voxel_sizes)


def _interface_seeds(act: ActImage, n: int) -> np.ndarray:
    """``n`` points on lines along x from the WM past the slab (x = 23.5) into it (x = 22) where
    GM - WM = 0.004 (in GM, below GMWMI_ACCURACY: valid seeds that ``seed_is_unidirectional``
    sends one way, away from GM: towards the near end of the WM)."""
    from invtract.tracking.act_cpu import _act_arrays, _tissues

    tt, Mt = _act_arrays(act)
    A = np.linalg.inv(np.vstack([Mt, [0, 0, 0, 1]]))
    tbuf, tis = np.zeros(5, np.float32), np.zeros(5, np.float32)

    def excess(p):
        _tissues(tt, True, Mt, p[0], p[1], p[2], tbuf, tis)
        return (tis[0] + tis[1]) - tis[2]

    yz = np.argwhere(tt[22, :, :, 2] > 0.2)
    out = []
    for y, z in yz[np.linspace(0, len(yz) - 1, n).round().astype(int)]:
        a = (A[:3, :3] @ [23.5, y, z] + A[:3, 3]).astype(np.float32)
        b = (A[:3, :3] @ [22.0, y, z] + A[:3, 3]).astype(np.float32)
        lo, hi = 0.0, 1.0
        for _ in range(40):
            mid = 0.5 * (lo + hi)
            q = (a + (b - a) * np.float32(mid)).astype(np.float32)
            lo, hi = (mid, hi) if excess(q) < 0.004 else (lo, mid)
        out.append(q)
    return np.array(out, np.float32)


def test_triton_act_unidirectional_seeds_tiny():
    """Seeds on a GM-WM interface track away from GM only (seed index 0, no second half): the
    one ACT tracking case of the default suite (a few seconds)."""
    act = _slab_5tt()
    seeds = _interface_seeds(act, 4)
    dirs = np.random.default_rng(3).normal(size=seeds.shape).astype(np.float32)
    _, _, vox = _fod()
    params = act_parameters(TrackingParameters(min_length_mm=1.0), vox).resolve(vox)
    res, ref = _both(seeds, dirs, params, act)
    _assert_bit_for_bit(res, ref)
    one_way = (ref.status == Reject.ACCEPTED) & (ref.term[:, 1] == -1)
    assert one_way.any() and (ref.seed_index[one_way] == 0).all()


def test_speed_gpu_act_case_parses_without_cuda():
    """``benchmarks/speed_gpu.py --act`` imports, parses and loads its case without CUDA (and
    then says that it measured nothing); ``--crop`` without ``--act`` is a usage error."""
    import json
    import subprocess
    import sys

    if torch.cuda.is_available():
        pytest.skip("with CUDA the benchmark runs: test_triton_gpu.py")
    root = Path(__file__).resolve().parents[2]
    script = str(root / "benchmarks" / "speed_gpu.py")
    need_data("sift_phantom", "5tt.mif")
    env = dict(os.environ, PYTHONPATH=str(root))
    out = subprocess.run([sys.executable, script, "--act", "--crop", "--seeds", "10"],
                         capture_output=True, text=True, timeout=300, env=env)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout) == {"cuda": False, "reason": "no CUDA device: nothing measured"}
    bad = subprocess.run([sys.executable, script, "--crop"], capture_output=True, text=True,
                         timeout=300, env=env)  # fmt: skip
    assert bad.returncode == 2 and "--crop needs --act" in bad.stderr


def _cli(tmp_path, engine: str, interpret: bool, seeds: np.ndarray, dirs: np.ndarray):
    """``invtract track --act 5tt_sgm.mif --engine ENGINE`` from a seed list in a fresh
    process; returns (streamlines, stderr)."""
    import subprocess
    import sys

    from invtract.io.tractogram import load_tractogram

    root = Path(__file__).resolve().parents[2]
    table = tmp_path / "seeds.txt"
    np.savetxt(table, np.hstack([seeds, dirs]), delimiter=",")
    out = tmp_path / f"{engine}.tck"
    env = dict(os.environ, PYTHONPATH=str(root))
    env.pop("TRITON_INTERPRET", None)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    argv = [sys.executable, "-m", "invtract.cli", "track", str(need_data("sift_phantom",
            "fods.mif")), str(out), "--seeds", str(table), "--act", str(LOCAL / "5tt_sgm.mif"),
            "--engine", engine, "--quiet"]  # fmt: skip
    run = subprocess.run(argv, capture_output=True, text=True, timeout=900, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    return load_tractogram(out).to_list(), run.stderr


def _cli_seeds():
    tck, act, params = _reference("act_grid_sgm")
    return _seeds(tck, act, params, 3, (1,), {"ACT_FAILED_WM_REQUIREMENT"})


def test_cli_act_engine_triton_falls_back_without_cuda(tmp_path):
    """``invtract track --act --engine triton`` without CUDA (interpreter off) tracks with the
    numba engine, says so, and writes what ``--engine numba`` writes."""
    if torch.cuda.is_available():
        pytest.skip("with CUDA the triton engine runs")
    seeds, dirs = _cli_seeds()
    ours, err = _cli(tmp_path, "triton", False, seeds, dirs)
    ref, _ = _cli(tmp_path, "numba", False, seeds, dirs)
    assert "using the numba engine" in err
    assert len(ours) == len(ref) > 0
    assert all(np.array_equal(a, b) for a, b in zip(ours, ref))


@pytest.mark.slow
def test_cli_act_engine_triton_in_the_interpreter(tmp_path):
    """The same command run by the Triton kernel (interpreter): the numba engine's streamlines,
    bit for bit."""
    seeds, dirs = _cli_seeds()
    ours, err = _cli(tmp_path, "triton", True, seeds, dirs)
    ref, _ = _cli(tmp_path, "numba", False, seeds, dirs)
    assert "using the numba engine" not in err
    assert len(ours) == len(ref) > 0
    assert all(np.array_equal(a, b) for a, b in zip(ours, ref))
