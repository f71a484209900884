"""The engines' "record peaks" mode and the differentiable tracker's hard pass built on it.

The differentiable tracker tracks nothing itself: an engine records the streamlines and the
peak behind every point (:func:`~invtract.tracking.engines.get_peak_engine`), and one builder
turns any engine's record into the tape. Here: the torch engine's record against the numba
kernel's (within float32 rounding drift) and against
``track_torch`` (the same engine, bit for bit), the tapes the two engines give, float64 and
``refine`` through the torch engine (gradcheck, unidirectional included), and that the hard
pass goes through an engine.
"""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
import torch
from phantoms import bending_fibre_fod, gradcheck_case, gradcheck_fod_seed_step

from invtract.errors import ConfigError
from invtract.fod.field import FODField
from invtract.params import TrackingParameters
from invtract.tracking import differentiable
from invtract.tracking.differentiable import track_differentiable
from invtract.tracking.engines import get_peak_engine, numba_available
from invtract.tracking.tracker import track_torch, track_torch_peaks
from invtract.tracking.types import Reject

#: the torch engine against the numba kernel (mm): the conformance suite allows 1e-5 on its
#: short cases (``test_conformance.py`` checks the differentiable hard pass there too); over
#: these 400-point streamlines at |p| ~ 40 mm (float32 ulp 3.8e-6) the torch engine's
#: different float32 rounding drifts by up to 3 ulps
TOL_TORCH_MM = 2e-5

needs_numba = pytest.mark.skipif(not numba_available(), reason="numba is not installed")


def _example(n=150, unidirectional=False, dtype=torch.float32):
    """The packaged example FOD, ``n`` seeds spread over its mask, mixed start directions."""
    from invtract.data import example_path
    from invtract.io.image import load_fod, load_mask

    fod, mask = load_fod(example_path("fod")), load_mask(example_path("mask"))
    ijk = np.argwhere(mask.data)[:: max(1, int(mask.data.sum()) // n)][:n].astype(np.float64)
    g = np.random.default_rng(3)
    ijk += g.uniform(-0.45, 0.45, ijk.shape)
    seeds = ijk @ fod.affine[:3, :3].T + fod.affine[:3, 3]
    dirs = g.normal(size=seeds.shape)
    params = TrackingParameters(
        max_length_mm=80.0, min_length_mm=5.0, unidirectional=unidirectional
    ).resolve(fod.voxel_sizes)
    field = FODField.from_array(torch.as_tensor(fod.data), fod.affine, dtype=dtype)
    return field, torch.tensor(seeds).to(dtype), torch.tensor(dirs).to(dtype), params


def _rows(rec, i):
    n = int(rec.lengths[i])
    return rec.points[i, :n].double().numpy(), rec.peaks[i, :n].double().numpy()


@needs_numba
@pytest.mark.parametrize("unidirectional", [False, True])
def test_torch_record_is_the_numba_record(unidirectional):
    """Same decisions and layout as the numba kernel's record; points and peaks within the
    torch engine's tolerance; its points are ``track_torch``'s, bit for bit."""
    field, seeds, dirs, params = _example(unidirectional=unidirectional)
    ours = track_torch_peaks(field, seeds, dirs, params)
    _, numba_peaks = get_peak_engine("numba", field)
    ref = numba_peaks(field, seeds, dirs, params)
    for key in ("status", "term", "lengths", "seed_index"):
        np.testing.assert_array_equal(getattr(ours, key).numpy(), getattr(ref, key).numpy())
    acc = np.flatnonzero(ours.status.numpy() == int(Reject.ACCEPTED))
    assert acc.size > 20 and len(set(ours.lengths[acc].tolist())) > 5
    if unidirectional:
        assert (ours.seed_index[acc] == 0).all() and (ours.term[:, 1] == -1).all()
    else:
        assert (ours.seed_index[acc] > 0).any()
    for i in acc:
        (p, u), (q, v) = _rows(ours, i), _rows(ref, i)
        assert np.abs(p - q).max() <= TOL_TORCH_MM
        s = int(ours.seed_index[i])
        peaks = np.delete(np.arange(p.shape[0]), s)  # no peak at the seed
        assert np.abs(u[peaks] - v[peaks]).max() <= 1e-5
        # the peak behind each point is the step it moved along: p = p_prev + h u
        prev = np.where(peaks < s, peaks + 1, peaks - 1)
        np.testing.assert_allclose(p[peaks], p[prev] + params.step_mm * u[peaks], atol=1e-5)
    np.testing.assert_allclose(ours.init_dir[acc].numpy(), ref.init_dir[acc].numpy(), atol=1e-6)
    hard = track_torch(field, seeds, dirs, params)
    np.testing.assert_array_equal(ours.lengths.numpy(), hard.lengths)
    packed = np.concatenate([ours.points[i, : ours.lengths[i]].numpy() for i in acc])
    assert np.array_equal(packed, hard.points)
    # without points (the differentiable tracker's call): the same peaks and decisions
    for record in (track_torch_peaks, numba_peaks):
        lean = record(field, seeds, dirs, params, with_points=False)
        full = ours if record is track_torch_peaks else ref
        assert lean.points is None and torch.equal(lean.status, full.status)
        for i in acc:
            cols = np.delete(np.arange(int(full.lengths[i])), int(full.seed_index[i]))
            assert torch.equal(lean.peaks[i, cols], full.peaks[i, cols])


@needs_numba
@pytest.mark.parametrize("unidirectional", [False, True])
def test_torch_tape_is_the_numba_tape(unidirectional, monkeypatch):
    """The hard pass through either engine gives the same tape (one builder): decisions and
    halves equal, peaks and points within 1e-5, soft weights to float32 rounding."""
    field, seeds, dirs, params = _example(unidirectional=unidirectional)
    sh = field.sh_flat.reshape(*field.shape, -1)
    tapes = {}
    for engine in ("numba", "torch"):
        monkeypatch.setattr(differentiable, "HARD_PASS", engine)
        res = track_differentiable(FODField.from_array(sh, field.affine), seeds, dirs, params)
        tapes[engine] = res
    a, b = tapes["torch"], tapes["numba"]
    for key in ("lengths", "seed_index", "seed_ids", "status", "term"):
        assert torch.equal(getattr(a, key), getattr(b, key)), key
    assert a.lengths.numel() > 20 and len(set(a.lengths.tolist())) > 5
    assert float((a.points - b.points).abs().max()) <= TOL_TORCH_MM
    w = a.mask
    assert torch.allclose(a.weights[w], b.weights[w], rtol=1e-4, atol=1e-6)


def test_float64_and_refine_record_through_the_torch_engine():
    """float64 and ``refine`` (the differentiable tracker's options) are the torch engine's:
    the record's points are ``track_torch``'s for float64; with refine > 0 every recorded peak
    is the Newton-polished one, and the point it wrote moved along it exactly."""
    sh, affine = bending_fibre_fod((6, 6, 6))
    g = torch.Generator().manual_seed(11)
    seeds = (torch.rand(12, 3, generator=g, dtype=torch.float64) - 0.5) * 6.0
    dirs = torch.tensor([[0.0, 0.1, 1.0]] * 12, dtype=torch.float64)
    params = TrackingParameters(step_mm=0.3, min_length_mm=0.5, max_length_mm=30.0).resolve(
        (2.0, 2.0, 2.0)
    )
    field = FODField.from_array(sh, affine, dtype=torch.float64)
    assert get_peak_engine("auto", field)[0] == "torch"
    with pytest.raises(ConfigError, match="float32 CPU FOD"):
        get_peak_engine("numba", field)
    plain = track_torch_peaks(field, seeds, dirs, params)
    hard = track_torch(field, seeds, dirs, params)
    acc = np.flatnonzero(plain.status.numpy() == int(Reject.ACCEPTED))
    assert acc.size > 5 and plain.points.dtype == torch.float64
    np.testing.assert_array_equal(plain.lengths.numpy(), hard.lengths)
    packed = np.concatenate([plain.points[i, : plain.lengths[i]].numpy() for i in acc])
    assert np.array_equal(packed.astype(np.float32), hard.points)
    ref = track_torch_peaks(field, seeds, dirs, params, refine=4)
    assert torch.equal(ref.status, plain.status)
    moved = 0.0
    for i in acc:
        n, s = int(ref.lengths[i]), int(ref.seed_index[i])
        p, u = ref.points[i, :n], ref.peaks[i, :n]
        ks = torch.tensor([k for k in range(n) if k != s])
        prev = torch.where(ks < s, ks + 1, ks - 1)
        assert torch.equal(p[ks], p[prev] + u[ks] * params.step_mm)
        moved = max(moved, float((u[ks] - plain.peaks[i, ks]).abs().max()))
    assert 0.0 < moved < 1e-2  # polished: not tckgen's peak, but next to it


def test_unidirectional_refine_gradcheck():
    """float64, ``-seed_unidirectional`` and ``refine``: the torch-engine tape turned round
    (seed first), and the efficient path's gradients pass gradcheck."""
    sh, affine, seed, dirs, params, mask = gradcheck_case(unidirectional=True)
    case = (sh, affine, seed, dirs, params.resolve((2.0, 2.0, 2.0)), mask)

    def seed_first(r, seed):
        assert (r.seed_index == 0).all() and int(r.lengths[0]) > 3
        assert torch.equal(r.points[0, 0], seed[0].detach())

    assert gradcheck_fod_seed_step(case, check=seed_first)


def test_the_hard_pass_is_an_engine_and_differentiable_has_no_tracker(monkeypatch):
    """``differentiable.py`` holds no tracking loop and restates no rule: it neither steps nor
    searches peaks nor judges seeds and lengths; its hard pass is an engine's record."""
    src = Path(differentiable.__file__).read_text()
    tree = ast.parse(src)
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    attrs = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
    for gone in ("_run_half", "_Arena", "_hard_forward_fused", "_use_fused"):
        assert not hasattr(differentiable, gone), gone
    rules = {"sd_stream_next", "sd_stream_step", "refine_peak", "normalise_eigen"}
    rules |= {"no_propagation", "too_short", "track_rejection", "seed_usable"}
    assert not (rules & (names | imported)), rules & (names | imported)
    # no peak search, no length limit, no termination codes
    assert not ({"peak", "max_points", "min_points"} & attrs)
    assert "Term" not in names
    assert "get_peak_engine" in imported
    # and the record comes from the engine: a spy on the torch engine's record-peaks mode
    from invtract.tracking.engines import torch as torch_engine

    calls = []
    real = torch_engine.track_peaks
    monkeypatch.setattr(
        torch_engine, "track_peaks", lambda *a, **k: calls.append(a[2].shape[0]) or real(*a, **k)
    )
    monkeypatch.setattr(differentiable, "PEAK_CHUNK", 5)
    sh, affine = bending_fibre_fod((4, 4, 4))
    seeds = torch.tensor([[0.37, 0.21, -0.4]] * 7, dtype=torch.float64)
    dirs = torch.tensor([[0.0, 0.0, 1.0]] * 7, dtype=torch.float64)
    params = TrackingParameters(step_mm=0.5, min_length_mm=0.5).resolve((2.0, 2.0, 2.0))
    res = track_differentiable(FODField.from_array(sh, affine), seeds, dirs, params)
    assert calls == [5, 2] and res.lengths.numel() == 7
    # no seeds: no engine call, an empty result
    calls.clear()
    empty = track_differentiable(FODField.from_array(sh, affine), seeds[:0], dirs[:0], params)
    assert calls == [] and empty.points.shape == (0, 0, 3) and empty.status.numel() == 0


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_record_and_tape(dtype):
    """On CUDA the torch engine records (Triton has no record-peaks mode): the record stays on
    the device, each point moved along its recorded peak exactly, the decisions are CPU's
    (CUDA's rounding of transcendental functions may flip a rare marginal one), the tape's
    points are the record's bit for bit, and plain autograd and the torch reverse sweep agree
    on the CUDA tape."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    field, seeds, dirs, params = _example(dtype=dtype)
    sh = field.sh_flat.reshape(*field.shape, -1)
    cuda = FODField.from_array(sh, field.affine, device="cuda", dtype=dtype)
    assert get_peak_engine("auto", cuda)[0] == "torch"
    a = track_torch_peaks(field, seeds, dirs, params)
    b = track_torch_peaks(cuda, seeds.cuda(), dirs.cuda(), params)
    assert b.points.is_cuda and b.peaks.is_cuda and b.status.is_cuda
    same = (a.status == b.status.cpu()) & (a.lengths == b.lengths.cpu())
    assert float(same.double().mean()) >= 0.95
    acc = torch.nonzero(b.status.cpu() == int(Reject.ACCEPTED)).flatten().tolist()
    assert len(acc) > 20
    for i in acc:
        n, s = int(b.lengths[i]), int(b.seed_index[i])
        ks = torch.tensor([k for k in range(n) if k != s], device="cuda")
        prev = torch.where(ks < s, ks + 1, ks - 1)
        assert torch.equal(b.points[i, ks], b.points[i, prev] + b.peaks[i, ks] * params.step_mm)
        if same[i]:
            assert float((a.points[i, :n] - b.points[i, :n].cpu()).abs().max()) <= 1e-3
    axis = torch.tensor([0.3, -0.2, 0.5], device="cuda", dtype=torch.float64)
    grads = {}
    for path in ("plain", "efficient"):
        shg = sh.detach().cuda().clone().requires_grad_(True)
        res = track_differentiable(
            FODField.from_array(shg, field.affine),
            seeds.cuda(),
            dirs.cuda(),
            params,
            path=path,
            temperature=0.2,
        )
        ((res.points.double() @ axis) * res.weights.double()).sum().backward()
        grads[path] = shg.grad.double()
    assert torch.equal(res.status, b.status) and torch.equal(res.seed_ids.cpu(), torch.tensor(acc))
    packed = torch.cat([b.points[i, : b.lengths[i]] for i in acc])
    assert torch.equal(res.streamlines().points.detach(), packed)
    ga, gb = grads["plain"], grads["efficient"]
    assert torch.isfinite(gb).all() and float(gb.abs().max()) > 0
    tol = 1e-6 if dtype == torch.float64 else 1e-3
    assert float((ga - gb).abs().max() / ga.abs().max()) <= tol
