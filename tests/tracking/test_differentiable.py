"""Differentiable tracking: forward parity, plain vs efficient, finite differences, no NaN."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from phantoms import bending_fibre_fod as _phantom
from phantoms import gradcheck_case, gradcheck_fod_seed_step

from invtract.fod.field import FODField
from invtract.params import TrackingParameters
from invtract.tracking import differentiable
from invtract.tracking.differentiable import track_differentiable
from invtract.tracking.engines import ENGINES, numba_available
from invtract.tracking.tracker import track_torch
from invtract.tracking.types import Reject

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
REAL = DATA / "real_msmt15"
AXIS = torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64)


def _loss(res):
    return ((res.points.double() @ AXIS) * res.weights.double()).sum()


def _real(dtype=torch.float64, n=2, max_length=12.1):
    nib = pytest.importorskip("nibabel")
    if not (REAL / "fod.nii.gz").exists():
        pytest.skip("shared data not available")
    from invtract.io.seeds import seeds_from_reference

    img = nib.load(str(REAL / "fod.nii.gz"))
    sh = torch.tensor(np.asarray(img.dataobj, np.float32)).to(dtype)
    pos, d, _ = seeds_from_reference(
        REAL / "bundleA_default.tck", REAL / "bundleA_default_seeds.txt"
    )
    params = TrackingParameters(max_length_mm=max_length, min_length_mm=1.0).resolve(
        img.header.get_zooms()[:3]
    )
    return sh, img.affine, torch.tensor(pos[:n]).to(dtype), torch.tensor(d[:n]).to(dtype), params


@pytest.mark.parity
def test_forward_equals_hard_tracker_on_shared_bundle(monkeypatch):
    nib = pytest.importorskip("nibabel")
    if not (REAL / "fod.nii.gz").exists():
        pytest.skip("shared data not available")
    from invtract.io.seeds import seeds_from_reference

    img = nib.load(str(REAL / "fod.nii.gz"))
    sh = np.asarray(img.dataobj, np.float32)
    pos, d, _ = seeds_from_reference(
        REAL / "bundleA_default.tck", REAL / "bundleA_default_seeds.txt"
    )
    pos, d = torch.tensor(pos[:24]), torch.tensor(d[:24])
    params = TrackingParameters().resolve(img.header.get_zooms()[:3])
    field = FODField.from_array(sh, img.affine)
    hard = track_torch(field, pos, d, params)
    with monkeypatch.context() as mp:  # the torch hard pass (CUDA / no-numba fallback)
        mp.setattr(differentiable, "HARD_PASS", "torch")
        res = track_differentiable(
            FODField.from_array(torch.tensor(sh, requires_grad=True), img.affine), pos, d, params
        )
    sl = res.streamlines()
    assert np.array_equal(sl.lengths.numpy(), hard.lengths[hard.lengths > 0])
    assert np.abs(sl.points.detach().numpy() - hard.points).max() <= 1e-5
    assert np.array_equal(res.seed_index.numpy(), hard.seed_index[hard.lengths > 0])
    if not numba_available():
        return
    # default on CPU: the fused numba hard pass, bit for bit the numba engine's streamlines
    # (tckgen's); the torch engine can differ from them by float32 ulps (up to ~1e-4 mm at
    # full length), never in lengths here
    nb = ENGINES["numba"](field, pos, d, params)
    res = track_differentiable(
        FODField.from_array(torch.tensor(sh, requires_grad=True), img.affine), pos, d, params
    )
    sl = res.streamlines()
    assert np.array_equal(sl.lengths.numpy(), nb.lengths[nb.lengths > 0])
    assert np.array_equal(sl.points.detach().numpy(), nb.points)
    assert np.array_equal(res.seed_index.numpy(), nb.seed_index[nb.lengths > 0])
    assert np.array_equal(res.status.numpy(), nb.status.astype(np.int64))
    assert np.array_equal(res.term.numpy(), nb.term.astype(np.int64))


def _grads(path, sh, affine, seeds, dirs, params, refine=0):
    sh = sh.clone().requires_grad_(True)
    seeds = seeds.clone().requires_grad_(True)
    dirs = dirs.clone().requires_grad_(True)
    h = torch.tensor(params.step_mm, dtype=sh.dtype, requires_grad=True)
    ang = torch.tensor(params.angle_deg, dtype=torch.float64, requires_grad=True)
    cut = torch.tensor(params.cutoff, dtype=torch.float64, requires_grad=True)
    res = track_differentiable(
        FODField.from_array(sh, affine),
        seeds,
        dirs,
        params,
        step_mm=h,
        angle_deg=ang,
        cutoff=cut,
        path=path,
        refine=refine,
        temperature=0.2,
    )
    _loss(res).backward()
    return res, [sh.grad, seeds.grad, dirs.grad, h.grad, ang.grad, cut.grad]


def test_plain_and_efficient_agree_float64():
    sh, affine, seeds, dirs, params = _real()
    _, ga = _grads("plain", sh, affine, seeds, dirs, params)
    _, gb = _grads("efficient", sh, affine, seeds, dirs, params)
    for a, b in zip(ga, gb):
        assert torch.isfinite(b).all()
        scale = a.abs().max().clamp_min(1e-300)
        assert ((a - b).abs().max() / scale) < 1e-6
    assert gb[2].abs().max() == 0  # init_dirs: zero a.e. (basin of attraction)


def _fd_check(sh, affine, seeds, dirs, params, refine=4, eps=1e-6):
    res, g = _grads("efficient", sh, affine, seeds, dirs, params, refine=refine)
    lengths = res.lengths

    def f(sh_=sh, seeds_=seeds, h=params.step_mm, ang=params.angle_deg, cut=params.cutoff):
        with torch.no_grad():
            r = track_differentiable(
                FODField.from_array(sh_, affine),
                seeds_,
                dirs,
                params,
                step_mm=torch.tensor(h, dtype=sh.dtype),
                angle_deg=torch.tensor(ang, dtype=torch.float64),
                cutoff=torch.tensor(cut, dtype=torch.float64),
                refine=refine,
                temperature=0.2,
            )
        assert torch.equal(r.lengths, lengths), "discrete structure changed under perturbation"
        return float(_loss(r))

    # FOD: the coefficient with the largest gradient; seed: x of the first seed
    flat = g[0].reshape(-1)
    j = int(flat.abs().argmax())
    e = torch.zeros_like(flat)
    e[j] = eps
    checks = [
        (float(flat[j]), f(sh_=sh + e.reshape(sh.shape)), f(sh_=sh - e.reshape(sh.shape))),
    ]
    ds = torch.zeros_like(seeds)
    ds[0, 0] = eps
    checks.append((float(g[1][0, 0]), f(seeds_=seeds + ds), f(seeds_=seeds - ds)))
    checks.append((float(g[3]), f(h=params.step_mm + eps), f(h=params.step_mm - eps)))
    checks.append((float(g[4]), f(ang=params.angle_deg + eps), f(ang=params.angle_deg - eps)))
    checks.append((float(g[5]), f(cut=params.cutoff + eps), f(cut=params.cutoff - eps)))
    for name, (an, fp, fm) in zip(["sh", "seed", "step", "angle", "cutoff"], checks):
        fd = (fp - fm) / (2 * eps)
        assert abs(an - fd) <= 1e-5 * max(abs(fd), 1e-3), (name, an, fd)


def test_finite_differences_real_fod():
    _fd_check(*_real(n=2, max_length=10.1))


def test_finite_differences_phantom():
    sh, affine = _phantom((6, 6, 6))
    seeds = torch.tensor([[0.37, 0.21, -0.4], [1.13, 0.52, 0.33]], dtype=torch.float64)
    dirs = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    params = TrackingParameters(step_mm=0.3, min_length_mm=0.5, max_length_mm=5.05).resolve(
        (2.0, 2.0, 2.0)
    )
    _fd_check(sh, affine, seeds, dirs, params)


def test_gradcheck_k_steps_phantom():
    sh, affine, seed, dirs, params, mask = gradcheck_case()  # mask: learnable subset of voxels
    case = (sh, affine, seed, dirs, params.resolve((2.0, 2.0, 2.0)), mask)
    assert gradcheck_fod_seed_step(case)


def test_no_nan_at_discontinuities():
    sh, affine = _phantom((4, 4, 4))
    # seed exactly on a voxel face, and streamlines that leave the field of view
    seeds = torch.tensor([[-2.1, -1.9, -2.05], [0.9, 1.1, 0.95], [0.4, 0.2, 3.0]])
    seeds = seeds.double().requires_grad_(True)
    dirs = torch.tensor([[0.0, 0.0, 1.0]] * 3, dtype=torch.float64)
    params = TrackingParameters(step_mm=0.2, min_length_mm=0.2).resolve((2.0, 2.0, 2.0))
    shg = sh.clone().requires_grad_(True)
    for path in ("plain", "efficient"):
        res = track_differentiable(
            FODField.from_array(shg, affine), seeds, dirs, params, path=path
        )
        assert (res.term == 3).any()  # EXIT_IMAGE happened
        _loss(res).backward()
        assert torch.isfinite(shg.grad).all() and torch.isfinite(seeds.grad).all()
        shg.grad = None
        seeds.grad = None


def test_plain_and_efficient_agree_ragged_phantom():
    # several streamlines whose halves end at different steps (exercises the reverse sweep's
    # per-step alive prefixes), float64
    sh, affine = _phantom((6, 6, 6))
    g = torch.Generator().manual_seed(3)
    seeds = (torch.rand(6, 3, generator=g, dtype=torch.float64) - 0.5) * 6.0
    dirs = torch.tensor([[0.0, 0.0, 1.0]] * 6, dtype=torch.float64)
    params = TrackingParameters(step_mm=0.3, min_length_mm=0.5, max_length_mm=30.0).resolve(
        (2.0, 2.0, 2.0)
    )
    res, ga = _grads("plain", sh, affine, seeds, dirs, params)
    _, gb = _grads("efficient", sh, affine, seeds, dirs, params)
    assert len(set((res.seed_index).tolist())) > 1 and len(set(res.lengths.tolist())) > 1
    for a, b in zip(ga, gb):
        scale = a.abs().max().clamp_min(1e-300)
        assert ((a - b).abs().max() / scale) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_compiled_backward_equals_torch_sweep(monkeypatch, dtype):
    # the numba reverse sweep (CPU default) against the torch sweep (CUDA / no-numba fallback):
    # FOD, seeds, step, angle and cutoff gradients, ragged halves, several threads' blocks
    from invtract.tracking import adjoint_cpu, differentiable

    if not adjoint_cpu.available():
        pytest.skip("numba not available")
    sh, affine = _phantom((6, 6, 6))
    g = torch.Generator().manual_seed(5)
    seeds = ((torch.rand(7, 3, generator=g, dtype=torch.float64) - 0.5) * 6.0).to(dtype)
    dirs = torch.tensor([[0.0, 0.0, 1.0]] * 7, dtype=dtype)
    params = TrackingParameters(step_mm=0.3, min_length_mm=0.5, max_length_mm=30.0).resolve(
        (2.0, 2.0, 2.0)
    )
    out, res = {}, {}
    for backend in ("torch", "numba"):
        monkeypatch.setattr(differentiable, "ADJOINT_BACKEND", backend)
        res[backend], out[backend] = _grads("efficient", sh.to(dtype), affine, seeds, dirs, params)
    # the tape's points (recomputed from the peaks) and weights agree as well
    ra, rb = res["torch"], res["numba"]
    assert len(set(rb.lengths.tolist())) > 1 and torch.equal(ra.lengths, rb.lengths)
    assert torch.equal(ra.points, rb.points)
    assert torch.allclose(ra.weights, rb.weights, rtol=1e-12 if dtype == torch.float64 else 1e-5)
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    for name, a, b in zip(["sh", "seeds", "dirs", "h", "angle", "cutoff"], *out.values()):
        assert torch.isfinite(b).all(), name
        a, b = a.double(), b.double()
        scale = a.abs().max().clamp_min(1e-300)
        assert float((a - b).abs().max() / scale) <= tol, name
    # per-thread FOD buffers (blocks) give the same sums
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    _, g3 = _grads("efficient", sh.to(dtype), affine, seeds, dirs, params)
    for a, b in zip(out["numba"], g3):
        a, b = a.double(), b.double()
        assert float((a - b).abs().max() / a.abs().max().clamp_min(1e-300)) <= tol * 1e-2


def test_fused_hard_pass_float32(monkeypatch):
    # float32 on CPU: the hard pass runs in the fused numba kernel (chunked over the seeds);
    # its tape gives the torch hard pass's lengths and decisions, and gradients within float32
    # rounding of the torch pass's, with plain and efficient agreeing on it; NaN seeds /
    # directions are rejected, never NaN gradients
    if not numba_available():
        pytest.skip("numba not available")
    sh, affine = _phantom((6, 6, 6), dtype=torch.float32)
    g = torch.Generator().manual_seed(7)
    seeds = ((torch.rand(9, 3, generator=g, dtype=torch.float64) - 0.5) * 6.0).float()
    dirs = torch.tensor([[0.0, 0.0, 1.0]] * 9)
    seeds[4] = float("nan")
    params = TrackingParameters(step_mm=0.3, min_length_mm=0.5, max_length_mm=30.0).resolve(
        (2.0, 2.0, 2.0)
    )
    calls = []
    from invtract.tracking import fused_cpu

    real = fused_cpu.track_fused_cpu_peaks
    monkeypatch.setattr(
        fused_cpu, "track_fused_cpu_peaks", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    res, out = {}, {}
    for hp in ("torch", "fused"):
        monkeypatch.setattr(differentiable, "HARD_PASS", hp)
        res[hp], out[hp] = _grads("efficient", sh, affine, seeds, dirs, params)
    assert len(calls) == 1
    a, b = res["torch"], res["fused"]
    assert len(set(b.lengths.tolist())) > 1 and torch.equal(a.lengths, b.lengths)
    assert torch.equal(a.seed_ids, b.seed_ids) and torch.equal(a.seed_index, b.seed_index)
    assert 4 not in b.seed_ids.tolist()
    assert (a.points - b.points).abs().max() <= 1e-4
    for x, y in zip(out["torch"], out["fused"]):
        assert torch.isfinite(y).all()
        x, y = x.double(), y.double()
        assert float((x - y).abs().max() / x.abs().max().clamp_min(1e-300)) <= 1e-3
    # chunking over the seeds changes nothing
    monkeypatch.setattr(differentiable, "PEAK_CHUNK", 2)
    c, gc = _grads("efficient", sh, affine, seeds, dirs, params)
    assert torch.equal(c.points, b.points) and torch.equal(c.weights, b.weights)
    for x, y in zip(out["fused"], gc):
        assert torch.equal(x, y)
    assert len(calls) == 6
    # a NaN start direction rejects the seed (tckgen; the torch pass tracks from the zero
    # vector instead)
    dn = dirs.clone()
    dn[6] = float("nan")
    d, gd = _grads("efficient", sh, affine, seeds, dn, params)
    assert int(d.status[6]) == int(Reject.INVALID_SEED) and 6 not in d.seed_ids.tolist()
    assert all(torch.isfinite(x).all() for x in gd)
    # plain autograd on the fused tape agrees with the efficient sweep
    _, gp = _grads("plain", sh, affine, seeds, dirs, params)
    for x, y in zip(gp, out["fused"]):
        x, y = x.double(), y.double()
        assert float((x - y).abs().max() / x.abs().max().clamp_min(1e-300)) <= 1e-4


def test_unidirectional_forward_is_seed_first_like_the_tracker():
    """-seed_unidirectional: the same points as the hard tracker, seed first, and gradients
    reach the FOD through the reordering."""
    from invtract.data import example_path
    from invtract.fod.field import FODField
    from invtract.io.image import load_fod, load_mask
    from invtract.tracking.api import Seeding, track

    fod, mask = load_fod(example_path("fod")), load_mask(example_path("mask"))
    p = TrackingParameters(unidirectional=True, seed_direction=(1, 0, 0)).resolve(fod.voxel_sizes)
    hard = track(
        FODField.from_array(fod.data, fod.affine),
        Seeding("grid", mask=mask.data, affine=mask.affine, count=1),
        p,
        engine="numba",
        rng_seed=1,
    )
    seeds = torch.tensor(hard.seed_points[:40])
    sh = torch.tensor(fod.data, requires_grad=True)
    res = track_differentiable(
        FODField.from_array(sh, fod.affine), seeds, torch.tensor([[1.0, 0, 0]] * 40), p
    )
    ours, ref = res.streamlines().to_list(), hard.streamlines.to_list()[:40]
    assert (res.seed_index == 0).all() and len(ours) == 40
    assert all(a.shape == b.shape and np.abs(a - b).max() < 1e-4 for a, b in zip(ours, ref))
    (res.points[..., 0] * res.weights).sum().backward()
    assert torch.isfinite(sh.grad).all() and sh.grad.abs().sum() > 0


def test_outputs_and_tape_are_freed_without_the_cycle_collector():
    """Once the loss and result are dropped, the points (and the tape the backward node holds)
    are freed by reference counting alone: no output -> grad_fn -> ctx -> output cycle that
    would keep every iteration's tape alive in a fitting loop until a garbage collection."""
    import gc
    import weakref

    sh, affine = _phantom()
    seeds = torch.tensor([[0.1, 0.2, 0.3], [-0.4, 0.1, 0.2]], dtype=torch.float64)
    dirs = torch.tensor([[0.0, 0.2, 1.0]], dtype=torch.float64).expand(2, 3).contiguous()
    params = TrackingParameters(max_length_mm=10.0, min_length_mm=1.0)
    gc.disable()
    try:
        learn = sh.clone().requires_grad_(True)
        res = track_differentiable(FODField.from_array(learn, affine), seeds, dirs, params)
        assert len(res.lengths) > 0
        alive = weakref.ref(res.points)
        loss = _loss(res)
        loss.backward()
        del res, loss
        assert alive() is None
    finally:
        gc.enable()
