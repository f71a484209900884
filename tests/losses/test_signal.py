"""The diffusion-signal loss term: gradcheck, zero at the CSD FOD, data-set scale, fit hook."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from invtract.data import example_path
from invtract.fit.objective import fibonacci_sphere
from invtract.fit.optimise import fit
from invtract.fit.signal_term import SignalTerm
from invtract.fod.csd import Response, csd_model, csd_solve, predict_signal
from invtract.io.image import load_fod
from invtract.io.seeds import seeds_from_reference
from invtract.io.tractogram import load_tractogram
from invtract.losses.signal import noise_variance, signal_loss
from invtract.params import TrackingParameters
from invtract.tracking.api import Seeding

#: the phantom's dwi2response response (b = 2000, lmax 8)
RESPONSE = Response(np.array([[1211.2, -732.1, 255.3, -65.1, 12.1]]), (2000.0,))


def _grad(n_dirs=60, n_b0=3, bval=2000.0) -> np.ndarray:
    d = fibonacci_sphere(n_dirs).numpy()
    g = np.zeros((n_b0 + n_dirs, 4))
    g[n_b0:, :3] = d
    g[n_b0:, 3] = bval
    return g


def _synthetic(fod: np.ndarray, grad: np.ndarray, sigma: float, seed: int = 0) -> np.ndarray:
    """DWI ``[..., N_all]`` of an FOD under the response, plus Gaussian noise ``sigma``."""
    model = csd_model(grad, RESPONSE)
    K = model.n_coeffs
    c = torch.as_tensor(fod.reshape(-1, fod.shape[-1])[:, :K], dtype=torch.float64)
    s = predict_signal(c, model.M).numpy()
    out = np.zeros((c.shape[0], grad.shape[0]))
    out[:, model.volumes] = s
    out[:, grad[:, 3] <= 10] = RESPONSE.zsh[0, 0] * math.sqrt(4 * math.pi) * c[:, :1].numpy()
    out += np.random.default_rng(seed).normal(0.0, sigma, out.shape)
    return out.reshape(fod.shape[:-1] + (grad.shape[0],)).astype(np.float32)


@pytest.fixture(scope="module")
def voxels():
    """Signals of 4 crossing/single-fibre voxels of the bundled phantom FOD, SNR ~30."""
    img = load_fod(example_path("fod"))
    c = img.data.reshape(-1, img.data.shape[-1])
    amp = np.abs(c[:, 0])
    pick = np.argsort(amp)[-4:]
    g = _grad()
    dwi = _synthetic(c[pick], g, sigma=10.0)
    model = csd_model(g, RESPONSE)
    sig = torch.as_tensor(dwi[:, model.volumes], dtype=torch.float64)
    return model, sig


def test_gradcheck(voxels):
    model, sig = voxels
    F = csd_solve(sig[:2], model)
    var = noise_variance(sig, model)
    torch.manual_seed(0)
    c = (F + 0.05 * torch.randn_like(F)).requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x: signal_loss(x, sig[:2], model, var, None), (c,), eps=1e-6, atol=1e-7
    )


def test_zero_and_stationary_at_csd(voxels):
    model, sig = voxels
    F = csd_solve(sig, model)
    var = noise_variance(sig, model, F)
    from invtract.fod.csd import csd_objective

    ref = csd_objective(F, sig, model)
    c = F.clone().requires_grad_(True)
    v = signal_loss(c, sig, model, var, ref)
    v.backward()
    assert abs(float(v.detach())) < 1e-12
    assert float(c.grad.abs().max()) < 1e-8
    torch.manual_seed(1)
    for _ in range(3):  # the CSD FOD is the minimum: any change costs
        assert float(signal_loss(F + 0.02 * torch.randn_like(F), sig, model, var, ref)) > 0


def test_noise_variance_tracks_the_noise():
    """sigma^2 from the CSD residual follows the true noise once it dominates the misfit of
    the constraint (this FOD has negative lobes CSD damps; the residual dof are 60 - ~45)."""
    img = load_fod(example_path("fod"))
    c = img.data.reshape(-1, img.data.shape[-1])
    c = c[np.abs(c[:, 0]) > 0.2][:200]
    g = _grad()
    model = csd_model(g, RESPONSE)
    est = []
    for sigma in (5.0, 20.0):
        dwi = _synthetic(c, g, sigma=sigma, seed=3)
        v = noise_variance(torch.as_tensor(dwi[:, model.volumes]), model)
        est.append(math.sqrt(v) / sigma)
    # residual dof: 60 measurements - ~45 coefficients (fewer effective with the constraint)
    assert 0.6 < est[1] < 1.05, est
    assert est[1] * 20.0 > 2.0 * est[0] * 5.0  # grows with the noise


@pytest.mark.slow
def test_signal_term_in_a_fod_fit():
    """fit(signal=SignalTerm): the term is logged, and with a large weight it falls."""
    img = load_fod(example_path("fod"))
    g = _grad()
    dwi = _synthetic(img.data, g, sigma=20.0, seed=5)
    term = SignalTerm.build(dwi, g, RESPONSE, mask=np.abs(img.data[..., 0]) > 0.1)
    inside = int((np.abs(img.data[..., 0]) > 0.1).sum())
    assert term.signals.shape == (inside, 60) and int(term.usable.sum()) == inside
    assert term.variance > 0
    pos, dirs, ti = seeds_from_reference(example_path("target"), example_path("target_seeds"))
    idx = np.arange(0, 96, 32)
    sl = load_tractogram(example_path("target")).select(torch.as_tensor(ti[idx]))
    res = fit(
        img,
        sl,
        TrackingParameters(step_mm=1.0, min_length_mm=10.0, max_length_mm=200.0),
        seeding=Seeding("list", positions=pos[idx], directions=dirs[idx]),
        learn=("sh",),
        signal=term,
        config={
            "fit": {"iterations": 4, "heldout_fraction": 0.0},
            "optimizer": {"lr_sh": 0.01},
            "loss": {"weights": {"mdf": 0.01, "signal": 100.0}},
        },
    )
    s = [r["loss/signal"] for r in res.history]
    assert len(s) == 4 and s[0] > 0 and s[-1] < s[0], s


def test_signal_term_holds_the_usable_voxels_only(voxels):
    """``signals`` has one row per usable voxel (C order); ``signal`` reads them by flat
    index; rows that do not match the usable voxels are refused."""
    from invtract.errors import ShapeError

    model, sig = voxels
    n = len(sig)
    usable = torch.ones(2 * n, dtype=torch.bool)
    usable[::2] = False  # the signals sit at the odd flat indices
    ref = torch.zeros(2 * n, dtype=torch.float64)
    term = SignalTerm(model, sig.float(), usable, ref, 1.0, None)
    picked = torch.tensor([2 * n - 1, 1, 5])
    assert torch.equal(term.signal(picked), sig.float()[[n - 1, 0, 2]])
    with pytest.raises(ShapeError, match="signal rows"):
        SignalTerm(model, sig.float(), torch.ones(2 * n, dtype=torch.bool), ref, 1.0, None)


def test_rotation_hook_projects_on_rotations(voxels):
    """--fod-updates rotation: the gradient hook keeps only each voxel's rotation components."""
    model, sig = voxels
    F = csd_solve(sig, model)
    term = SignalTerm(model, sig.float(), torch.ones(len(sig), dtype=torch.bool),
                      torch.zeros(len(sig), dtype=torch.float64), 1.0, None,
                      updates="rotation")  # fmt: skip
    from invtract.fod.csd import rotation_generators

    hook = term.gradient_hook(F)
    torch.manual_seed(0)
    g = torch.randn_like(F)
    p = hook(g)
    L = rotation_generators(8)
    G = torch.einsum("ikj,vj->vki", L, F)  # [V, K, 3]
    # p lies in span(G) and g - p is orthogonal to it
    assert float(torch.einsum("vk,vki->vi", g - p, G).abs().max()) < 1e-6
    torch.testing.assert_close(hook(p), p)
    assert SignalTerm(model, sig.float(), term.usable, term.reference, 1.0, None)\
        .gradient_hook(F) is None  # fmt: skip


def _bundle(n=3):
    img = load_fod(example_path("fod"))
    pos, dirs, ti = seeds_from_reference(example_path("target"), example_path("target_seeds"))
    idx = np.arange(0, 96, 96 // n)[:n]
    sl = load_tractogram(example_path("target")).select(torch.as_tensor(ti[idx]))
    return img, sl, Seeding("list", positions=pos[idx], directions=dirs[idx])


def test_signal_term_config_is_checked_by_the_bundle_problem():
    """A positive signal weight needs the term; the term needs the FOD learned."""
    from invtract.errors import ConfigError
    from invtract.fit.optimise import build_problem, resolve_config

    img, sl, seeding = _bundle()
    g = _grad()
    term = SignalTerm.build(np.zeros(img.data.shape[:3] + (len(g),), np.float32) + 1.0, g,
                            RESPONSE, mask=np.abs(img.data[..., 0]) > 0.1)  # fmt: skip
    params = TrackingParameters(step_mm=1.0)
    cfg = resolve_config({"loss": {"weights": {"mdf": 1.0, "signal": 1.0}}}, learn=("sh",))
    with pytest.raises(ConfigError, match=r"signal = 1 needs the diffusion signal"):
        build_problem(cfg, img, sl, params, seeding)
    cfg = resolve_config({"loss": {"weights": {"mdf": 1.0, "signal": 1.0}}}, learn=("cutoff",))
    with pytest.raises(ConfigError, match="use --fit fod or --fit both"):
        build_problem(cfg, img, sl, params, seeding, signal=term)
    with pytest.raises(ConfigError, match="unknown terms"):
        resolve_config({"loss": {"weights": {"signals": 1.0}}})


def test_rotation_hook_is_registered_on_the_learned_change():
    """--fod-updates rotation through the bundle Problem: the gradient reaching the learned
    change is the hook's projection of the loss gradient, voxel by voxel."""
    from invtract.fit.optimise import build_problem, resolve_config

    img, sl, seeding = _bundle()
    g = _grad()
    n = int(np.prod(img.data.shape[:3]))
    model = csd_model(g, RESPONSE)
    cfg = resolve_config({"loss": {"weights": {"mdf": 1.0, "signal": 1.0}}}, learn=("sh",))
    params = TrackingParameters(step_mm=1.0)
    fields = (torch.zeros(n, model.volumes.size), torch.ones(n, dtype=torch.bool),
              torch.zeros(n, dtype=torch.float64), 1.0, None)  # fmt: skip
    term = SignalTerm(model, *fields, updates="rotation")
    st = build_problem(cfg, img, sl, params, seeding, signal=term).state
    torch.manual_seed(1)
    direction = torch.randn_like(st.delta)
    (st.delta * direction).sum().backward()
    expected = term.gradient_hook(st.sh0_flat[st.voxels])(direction)
    torch.testing.assert_close(st.delta.grad, expected)
    assert float((st.delta.grad - direction).abs().max()) > 1e-3  # it did project
    free_term = SignalTerm(model, *fields, updates="free")
    free = build_problem(cfg, img, sl, params, seeding, signal=free_term).state
    (free.delta * direction).sum().backward()
    torch.testing.assert_close(free.delta.grad, direction)


def test_selection_loss_includes_the_weighted_signal_term():
    """The returned iterate is the best of the data terms + the weighted signal term."""
    from invtract.fit.distributed import SINGLE
    from invtract.fit.optimise import build_problem, resolve_config

    img, sl, seeding = _bundle()
    g = _grad()
    dwi = _synthetic(img.data, g, sigma=20.0, seed=5)
    term = SignalTerm.build(dwi, g, RESPONSE, mask=np.abs(img.data[..., 0]) > 0.1)
    params = TrackingParameters(step_mm=1.0, min_length_mm=10.0, max_length_mm=200.0)
    sel = {}
    for w in (0.0, 3.0):
        over = {"loss": {"weights": {"mdf": 1.0, "signal": w}}, "signal": {"spatial": 0.3}}
        cfg = resolve_config(over, learn=("sh",))
        pb = build_problem(cfg, img, sl, params, seeding, signal=term if w else None)
        with torch.no_grad():
            pb.state.delta.add_(0.02)  # away from the start: the signal term is > 0
        st = pb.state
        sig = float(term(st.sh0_flat[st.voxels] + st.delta.detach(), st.voxels))
        sel[w] = (pb.selection_loss(SINGLE), sig)
    assert sel[3.0][1] > 0.01
    assert sel[3.0][0] == pytest.approx(sel[0.0][0] + 3.0 * sel[3.0][1], rel=1e-9)


def _broadcast_worker(args, out):
    import os
    import pickle

    from invtract.fit.distributed import from_environment
    from invtract.fit.signal_term import signal_from_args

    world = from_environment("cpu")
    calls = []
    import invtract.fit.signal_term as st

    real = st._build_from_args
    st._build_from_args = lambda *a: calls.append(1) or real(*a)
    term = signal_from_args(args, world=world)
    with open(os.path.join(out, f"rank{world.rank}.pkl"), "wb") as f:
        pickle.dump((len(calls), term.variance, term.signals.numpy(), term.reference), f)
    return 0


@pytest.mark.slow
def test_signal_term_solved_once_and_broadcast_under_nproc(tmp_path):
    """--nproc: rank 0 alone solves CSD; every rank gets the same term."""
    import argparse
    import pickle
    from pathlib import Path

    from invtract.fit.distributed import spawn

    csd = Path(__file__).resolve().parents[1] / "data" / "csd"
    args = argparse.Namespace(dwi=str(csd / "dwi.mif"), response=[str(csd / "response_wm.txt")],
                              mask=str(csd / "mask.mif"), fslgrad=None, fit="fod",
                              target=None, fod_updates="free")  # fmt: skip
    spawn(_broadcast_worker, (args, str(tmp_path)), 2)
    r0, r1 = (pickle.loads((tmp_path / f"rank{r}.pkl").read_bytes()) for r in (0, 1))
    assert r0[0] == 1 and r1[0] == 0  # solved on rank 0 only
    assert r0[1] == r1[1] and np.array_equal(r0[2], r1[2]) and torch.equal(r0[3], r1[3])


def test_neighbour_pairs_and_spatial_coupling():
    """6-neighbour pairs among the given voxels only; the coupling sees degrees l >= 4 only."""
    from invtract.losses.signal import neighbour_pairs, spatial_coupling

    shape = (3, 4, 5)
    pts = [(0, 0, 0), (0, 0, 1), (1, 0, 0), (2, 3, 4), (0, 1, 1), (1, 1, 1)]
    vox = torch.tensor([np.ravel_multi_index(p, shape) for p in pts])
    perm = vox[torch.randperm(6, generator=torch.Generator().manual_seed(0))]
    pairs = neighbour_pairs(perm, shape)
    got = {tuple(sorted(int(x) for x in p)) for p in pairs}
    assert len(pairs) == len(got)
    ijk = [np.unravel_index(int(v), shape) for v in vox]
    want = {
        tuple(sorted((int(vox[a]), int(vox[b]))))
        for a in range(6) for b in range(6)
        if a < b and np.abs(np.subtract(ijk[a], ijk[b])).sum() == 1
    }  # fmt: skip
    assert {tuple(sorted((int(perm[a]), int(perm[b])))) for a, b in pairs.tolist()} == want
    assert len(want) == 4  # (000,001) (000,100) (001,011) (011,111)
    c = torch.zeros(6, 45, dtype=torch.float64)
    c[:, :6] = torch.randn(6, 6, dtype=torch.float64)  # l = 0, 2 differences are free
    p = neighbour_pairs(vox, shape)
    assert float(spatial_coupling(c, p)) == 0.0
    c[0, 10] = 1.0  # an l = 4 coefficient of voxel (0,0,0): two neighbours
    assert float(spatial_coupling(c, p)) == pytest.approx(2.0 / 6)
    x = torch.randn(6, 45, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda y: spatial_coupling(y, p), (x,))


def test_signal_term_spatial_weight_adds_the_coupling(voxels):
    from invtract.losses.signal import neighbour_pairs, spatial_coupling

    model, sig = voxels
    n = len(sig)
    fields = (torch.ones(n, dtype=torch.bool), torch.zeros(n, dtype=torch.float64), 1.0, None)
    term = SignalTerm(model, sig.float(), *fields, grid=((1, 1, n), None))
    c = torch.randn(n, model.n_coeffs, dtype=torch.float64)
    vox = torch.arange(n)
    base = float(term(c, vox))
    term.spatial = 0.7
    pairs = neighbour_pairs(vox, (1, 1, n))
    assert len(pairs) == n - 1
    assert float(term(c, vox)) == pytest.approx(base + 0.7 * float(spatial_coupling(c, pairs)))


def test_low_updates_hook_keeps_degrees_above_4(voxels):
    """--fod-updates low: the gradient reaching the learned change has no l >= 6 part."""
    model, sig = voxels
    n = len(sig)
    fields = (torch.ones(n, dtype=torch.bool), torch.zeros(n, dtype=torch.float64), 1.0, None)
    term = SignalTerm(model, sig.float(), *fields, updates="low")
    g = torch.randn(n, model.n_coeffs)
    out = term.gradient_hook(torch.zeros(n, model.n_coeffs))(g)
    assert torch.equal(out[:, :15], g[:, :15])  # l = 0, 2, 4: 1 + 5 + 9 coefficients
    assert float(out[:, 15:].abs().max()) == 0.0
    assert SignalTerm(model, sig.float(), *fields).gradient_hook(g) is None  # free


def test_other_ranks_adopt_rank0s_coupling_weight_and_coupled_start():
    """Under --nproc only rank 0 cross-validates the coupling weight and solves the coupled
    start (World.on_main); another rank's problem adopts them and starts where rank 0's does."""
    from invtract.fit.distributed import SINGLE, World
    from invtract.fit.optimise import build_problem, resolve_config

    img, sl, seeding = _bundle()
    g = _grad()
    dwi = _synthetic(img.data, g, sigma=20.0, seed=5)
    mask = np.abs(img.data[..., 0]) > 0.1
    params = TrackingParameters(step_mm=1.0, min_length_mm=10.0, max_length_mm=200.0)
    over = {"loss": {"weights": {"mdf": 1.0, "signal": 1.0}},
            "signal": {"spatial": "auto", "start": "coupled"}}  # fmt: skip
    cfg = resolve_config(over, learn=("sh",))
    main_term = SignalTerm.build(dwi, g, RESPONSE, mask=mask)
    prepared = []
    real = main_term.prepare
    main_term.prepare = lambda *a: prepared.append(real(*a)) or prepared[-1]
    main = build_problem(cfg, img, sl, params, seeding, signal=main_term, world=SINGLE)
    assert len(prepared) == 1 and float(main.state.delta.detach().abs().max()) > 0

    class OtherRank(World):
        def on_main(self, fn):  # rank 0's broadcast, without calling fn
            return prepared[0]

    term = SignalTerm.build(dwi, g, RESPONSE, mask=mask)
    term.prepare = term.choose_spatial = lambda *a: pytest.fail("computed on rank 1")
    other = build_problem(cfg, img, sl, params, seeding, signal=term, world=OtherRank(1, 2))
    assert term.spatial == main_term.spatial and term.coupling_cv == main_term.coupling_cv
    torch.testing.assert_close(other.state.delta.detach(), main.state.delta.detach())


def test_noise_sample_is_all_or_an_even_stride():
    from invtract.fit.signal_term import noise_sample

    idx = torch.arange(10, 1010, 2)
    assert torch.equal(noise_sample(idx, 500), idx)
    s = noise_sample(idx, 50)
    assert s.numel() == 50 and s[0] == idx[0] and s[-1] == idx[-1]
    assert bool((s.diff() > 0).all()) and bool(torch.isin(s, idx).all())
    gaps = s.diff().double()
    assert float(gaps.max() - gaps.min()) <= 4  # even: every 20th index +- one


def test_signal_term_solves_csd_only_where_asked(monkeypatch):
    """Beyond NOISE_SAMPLE usable voxels, build() solves the noise sample alone; the fit's
    voxels are solved on first use, with the reference of a term that solved every voxel."""
    import invtract.fit.signal_term as st

    img = load_fod(example_path("fod"))
    g = _grad()
    dwi = _synthetic(img.data, g, sigma=20.0, seed=5)
    mask = np.abs(img.data[..., 0]) > 0.1
    full = SignalTerm.build(dwi, g, RESPONSE, mask=mask)
    assert bool(full.solved.all()) and not bool(full.reference.isnan().any())
    monkeypatch.setattr(st, "NOISE_SAMPLE", 40)
    lazy = SignalTerm.build(dwi, g, RESPONSE, mask=mask)
    n_usable = int(lazy.usable.sum())
    assert n_usable > 200 and int((lazy.solved & lazy.usable).sum()) == 40
    assert lazy.variance == pytest.approx(full.variance, rel=0.5)  # a sample of 40 voxels
    vox = torch.nonzero(lazy.usable).flatten()[::3]
    assert bool(lazy.reference[vox].isnan().any())
    c = 1.01 * csd_solve(lazy.signal(vox).double(), lazy.model)
    lazy.variance = full.variance
    torch.testing.assert_close(lazy(c, vox), full(c, vox), rtol=1e-9, atol=0)
    assert bool(lazy.solved[vox].all())
    torch.testing.assert_close(lazy.reference[vox], full.reference[vox], rtol=1e-9, atol=1e-9)
    assert int((lazy.solved & lazy.usable).sum()) < n_usable  # the others were left alone


def test_csd_alone_in_blocks_equals_one_block(monkeypatch):
    """keep_csd solves SOLVE_BLOCK voxels at a time (bounded memory on a whole brain): the same
    coefficients, references and noise variance as in one block."""
    import invtract.fit.signal_term as st

    img = load_fod(example_path("fod"))
    g = _grad()
    dwi = _synthetic(img.data, g, sigma=20.0, seed=5)
    mask = np.abs(img.data[..., 0]) > 0.1
    one = SignalTerm.build(dwi, g, RESPONSE, mask=mask, keep_csd=True)
    monkeypatch.setattr(st, "SOLVE_BLOCK", 64)
    blocks = SignalTerm.build(dwi, g, RESPONSE, mask=mask, keep_csd=True)
    assert int(one.usable.sum()) > 3 * 64
    torch.testing.assert_close(blocks.csd, one.csd, rtol=0, atol=0)
    torch.testing.assert_close(blocks.reference, one.reference, rtol=1e-12, atol=1e-9)
    assert blocks.variance == pytest.approx(one.variance, rel=1e-12)
