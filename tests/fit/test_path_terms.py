"""The target-path terms (invtract.fit.path_terms): ``reach`` (FOD amplitudes along the target
paths), ``tangent`` (the target's directions are FOD peaks) and ``replay`` (each target step
replayed alone lands on the target's direction), differentiable in the learned rows."""

from __future__ import annotations

import pytest
import torch

from invtract.data import example_path
from invtract.fit import objective
from invtract.fit.objective import LossConfig, PairedTarget, paired_terms
from invtract.fit.optimise import c_order_fod
from invtract.fit.path_terms import (
    learned_amplitudes,
    learned_contractions,
    reach_sum,
    replay_sum,
    tangent_sum,
)
from invtract.fod.field import FODField
from invtract.fod.interp import corner_weights, world_to_voxel
from invtract.io.image import load_fod
from invtract.io.seeds import seeds_from_reference
from invtract.io.tractogram import load_tractogram


def _example(dtype=torch.float32):
    img = load_fod(example_path("fod"))
    sh = torch.from_numpy(c_order_fod(img.data)).clone().to(dtype)
    return FODField.from_array(sh, img.affine), img


def _points(field, img, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.tensor(field.shape, dtype=torch.float64)
    vox = torch.rand(n, 3, generator=g, dtype=torch.float64) * (X - 1)
    A = torch.as_tensor(img.affine, dtype=torch.float64)
    pts = vox @ A[:3, :3].T + A[:3, 3]
    u = torch.nn.functional.normalize(torch.randn(n, 3, generator=g, dtype=torch.float64), dim=-1)
    return pts, u


def test_learned_amplitudes_equal_step_amplitudes_and_pass_gradcheck():
    """The value is objective.step_amplitudes' (float32 field); the gradient to the learned
    rows is exact (float64 gradcheck through FODField.with_rows)."""
    field, img = _example()
    pts, u = _points(field, img, 300)
    X, Y, Z = field.shape
    vox = torch.arange(0, X * Y * Z, 2)
    rows = field.sh_flat[vox].clone().requires_grad_(True)
    learned = field.with_rows(vox, rows)
    a = learned_amplitudes(learned, pts, u)
    assert a.requires_grad
    torch.testing.assert_close(a.detach(), objective.step_amplitudes(learned, pts, u))
    assert (a != 0).sum() > 60

    f64 = FODField.from_array(field.sh_flat.reshape(X, Y, Z, -1).double(), img.affine)
    some = torch.nonzero(a.detach() != 0).flatten()[:2]
    p, d = pts[some], u[some]
    v = world_to_voxel(p, f64.scanner2voxel)
    few = torch.unique(corner_weights(v, f64.shape, torch.float64)[0])  # their corners
    r64 = f64.sh_flat[few].clone().requires_grad_(True)

    def amplitudes(r):
        return learned_amplitudes(f64.with_rows(few, r), p, d)

    assert torch.autograd.gradcheck(amplitudes, (r64,), eps=1e-6, atol=1e-7)


def test_learned_amplitudes_without_learned_rows_are_detached():
    field, img = _example()
    pts, u = _points(field, img, 50)
    a = learned_amplitudes(field, pts, u)
    assert not a.requires_grad
    torch.testing.assert_close(a, objective.step_amplitudes(field, pts, u))


def _paired_example():
    tck = example_path("target")
    target = load_tractogram(tck)
    pos, dirs, ti = seeds_from_reference(tck, example_path("target_seeds"))
    target = target.select(torch.as_tensor(ti))
    return PairedTarget.build(target, torch.as_tensor(pos), torch.as_tensor(dirs))


def test_reach_is_zero_where_the_fod_reproduces_the_target_and_grows_when_a_path_is_cut():
    """On tckgen's own FOD every step of the targets is above the cutoff: with a margin of 0
    the term is (nearly) zero. Cutting the FOD along the bundle
    (amplitudes scaled down in the learned voxels) makes the path part charge, and its
    gradient raises the learned rows' amplitude along the path (descent lowers the term)."""
    field, img = _example()
    paired = _paired_example()
    zero = reach_sum(field, paired.halves, paired.counts, 0.1, margin=0.0)
    per_pair = float(zero) / len(paired)
    assert per_pair < 0.05  # mm x relative amplitude per pair (softplus floor and a few stops)

    pts = paired.streamlines.points.double()
    flat = torch.unique(_voxels_of(field, img, pts))
    rows = (field.sh_flat[flat] * 0.05).clone().requires_grad_(True)
    cut = field.with_rows(flat, rows)
    loss = reach_sum(cut, paired.halves, paired.counts, 0.1, margin=0.1)
    assert float(loss.detach()) / len(paired) > 10 * per_pair + 1.0
    loss.backward()
    with torch.no_grad():
        stepped = rows - 1e-3 * rows.grad / rows.grad.abs().max()
    again = reach_sum(
        field.with_rows(flat, stepped), paired.halves, paired.counts, 0.1, margin=0.1
    )
    assert float(again) < float(loss.detach())


def _voxels_of(field, img, pts):
    A = torch.linalg.inv(torch.as_tensor(img.affine, dtype=torch.float64))
    v = torch.round(pts @ A[:3, :3].T + A[:3, 3]).long()
    X, Y, Z = field.shape
    ok = ((v >= 0) & (v < torch.tensor([X, Y, Z]))).all(-1)
    v = v[ok]
    return (v[:, 0] * Y + v[:, 1]) * Z + v[:, 2]


def test_reach_is_a_known_weight_and_reaches_the_paired_terms():
    paired = _paired_example()
    assert LossConfig.from_dict({"weights": {"reach": 1.0}}).active() == ["reach"]
    assert LossConfig.from_dict({"reach_margin": 0.2}).reach_margin == 0.2
    assert "reach" in objective.TERMS
    with pytest.raises(Exception, match="reach needs"):

        class _Res:
            seed_ids = torch.zeros(0, dtype=torch.long)
            points = torch.zeros(0, 3)

        paired_terms(_Res(), paired, LossConfig.from_dict({"weights": {"reach": 1.0}}))


def test_a_fod_fit_with_reach_reopens_a_weakened_path():
    """A bundle fit of the FOD with ``reach`` alone, on the example FOD scaled down to 7%
    (most target steps below the cutoff's margin): ``loss/reach`` is logged and falls."""
    import dataclasses

    import numpy as np

    from invtract.fit.optimise import fit
    from invtract.params import TrackingParameters
    from invtract.tracking.api import Seeding

    img = load_fod(example_path("fod"))
    img = dataclasses.replace(img, data=np.asarray(img.data, np.float32) * 0.07)
    pos, dirs, ti = seeds_from_reference(example_path("target"), example_path("target_seeds"))
    idx = np.arange(0, 96, 24)
    sl = load_tractogram(example_path("target")).select(torch.as_tensor(ti[idx]))
    cfg = {
        "fit": {"iterations": 4, "heldout_fraction": 0.0},
        "loss": {"weights": {"mdf": 1.0, "reach": 1.0}},
        "optimizer": {"lr_sh": 0.02},
    }
    params = TrackingParameters(step_mm=1.0, min_length_mm=10.0, max_length_mm=200.0)
    res = fit(img, sl, params, seeding=Seeding("list", positions=pos[idx], directions=dirs[idx]),
              learn=("sh",), config=cfg)  # fmt: skip
    reach = [h["loss/reach"] for h in res.history]
    assert reach[0] > 0.1
    assert reach[-1] < 0.05 * reach[0]


def test_learned_contractions_equal_the_sampled_fod_and_pass_gradcheck():
    """``c(p) . v`` for two vectors per point: the value is the trilinear FOD's (0 without
    data), the gradient to the learned rows exact (float64 gradcheck)."""
    field, img = _example(torch.float64)
    pts, _ = _points(field, img, 200, seed=3)
    K = field.sh_flat.shape[1]
    vecs = torch.randn(2, 200, K, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    X, Y, Z = field.shape
    vox = torch.arange(0, X * Y * Z, 3)
    learned = field.with_rows(vox, field.sh_flat[vox].clone().requires_grad_(True))
    c, ok = field.sample(pts)
    got = learned_contractions(learned, pts, vecs)
    want = torch.where(ok[None], (c[None] * vecs).sum(-1), torch.zeros(()))
    torch.testing.assert_close(got.detach(), want)
    assert got.requires_grad and (got != 0).sum() > 100

    some = torch.nonzero(ok).flatten()[:2]
    p, w = pts[some], vecs[:, some]
    few = torch.unique(corner_weights(world_to_voxel(p, field.scanner2voxel), field.shape,
                                      torch.float64)[0])  # fmt: skip
    r = field.sh_flat[few].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda rows: learned_contractions(field.with_rows(few, rows), p, w), (r,), eps=1e-6
    )


def test_tangent_is_near_zero_on_the_fod_tckgen_tracked():
    """The example target is tckgen's on the example FOD: every step leaves along a FOD peak,
    so the tangential gradient is ~0 there; on the FOD with 10% coefficient noise it is not."""
    field, img = _example(torch.float64)
    paired = _paired_example()
    on_truth = float(tangent_sum(field, paired.halves, paired.counts, 0.1)) / len(paired)
    g = torch.Generator().manual_seed(5)
    sh = field.sh_flat
    noisy = sh + 0.1 * sh.abs().mean() * torch.randn(sh.shape, generator=g, dtype=sh.dtype)
    noisy = torch.where(sh != 0, noisy, sh)
    X, Y, Z = field.shape
    other = FODField.from_array(noisy.reshape(X, Y, Z, -1), img.affine)
    on_noisy = float(tangent_sum(other, paired.halves, paired.counts, 0.1)) / len(paired)
    assert on_noisy > 0.1
    assert on_truth < 1e-3 * on_noisy


def test_tangent_passes_gradcheck_and_descent_aligns_the_peaks():
    """float64 gradcheck of ``tangent`` in the learned rows of a few target voxels; no gradient
    to the cutoff (a unit); a gradient step on a perturbed FOD lowers it."""
    field, img = _example(torch.float64)
    paired = _paired_example().subset([0, 1])
    halves, counts = paired.halves[:, :, :6], paired.counts.clamp_max(6)
    pts = halves[:, :, :5].reshape(-1, 3).double()
    few = torch.unique(corner_weights(world_to_voxel(pts, field.scanner2voxel), field.shape,
                                      torch.float64)[0])  # fmt: skip
    r = (field.sh_flat[few] * 1.1 + 0.01).clone().requires_grad_(True)
    cut = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)

    def term(rows, c):
        return tangent_sum(field.with_rows(few, rows), halves, counts, c)

    assert float(term(r, cut).detach()) > 0
    assert torch.autograd.gradcheck(lambda rows: term(rows, cut), (r,), eps=1e-6)
    loss = term(r, cut)
    loss.backward()
    assert cut.grad is None
    with torch.no_grad():
        stepped = r - 1e-3 * r.grad / r.grad.abs().max()
    assert float(term(stepped, 0.1)) < float(loss.detach())


def test_tangent_is_a_known_weight_computed_without_tracking():
    """``[loss.weights] tangent`` is accepted and ``paired_terms`` computes it even when no
    seed gave a streamline (it reads the targets alone)."""
    field, _ = _example()
    paired = _paired_example()
    cfg = LossConfig.from_dict({"weights": {"tangent": 1.0}})
    assert cfg.active() == ["tangent"] and "tangent" in objective.TARGET_ONLY_TERMS

    class _Res:
        seed_ids = torch.zeros(0, dtype=torch.long)
        points = torch.zeros(0, 3)

    out = paired_terms(_Res(), paired, cfg, field=field, cutoff=0.1)
    want = tangent_sum(field, paired.halves, paired.counts, 0.1) / len(paired)
    torch.testing.assert_close(out["tangent"], want.to(out["tangent"].dtype))
    assert out["n_missing"] == len(paired)


def test_path_terms_in_chunks_equal_one_shot_and_no_grad_skips_only_the_gradient(monkeypatch):
    """The terms evaluate target steps in chunks of ``STEP_CHUNK`` (bounded temporaries on a
    whole-brain bundle): the value equals the one-shot evaluation bit for bit, the gradient to
    float32 rounding (a row met by several chunks sums their parts in another order); under
    ``no_grad`` (the selection, held-out evaluations) the value is the same."""
    from invtract.fit import path_terms

    field, img = _example()
    paired = _paired_example()
    pts = paired.streamlines.points.double()
    flat = torch.unique(_voxels_of(field, img, pts))
    base = field.sh_flat[flat] * 0.2

    def both(chunk):
        monkeypatch.setattr(path_terms, "STEP_CHUNK", chunk)
        out = []
        for fn in (
            lambda f: reach_sum(f, paired.halves, paired.counts, 0.1, margin=0.1),
            lambda f: tangent_sum(f, paired.halves, paired.counts, 0.1),
            lambda f: replay_sum(f, paired.halves, paired.counts, 0.1, 10.0),
        ):
            rows = base.clone().requires_grad_(True)
            value = fn(field.with_rows(flat, rows))
            value.backward()
            with torch.no_grad():
                plain = fn(field.with_rows(flat, rows))
            out.append((value.detach(), rows.grad, plain))
        return out

    n_steps = int((paired.counts - 1).clamp_min(0).sum())
    one_shot, chunked = both(n_steps + 1), both(97)
    assert n_steps > 5 * 97
    for (v1, g1, p1), (v2, g2, p2) in zip(one_shot, chunked):
        assert float(v1) > 0 and g1.abs().sum() > 0
        assert torch.equal(v1, v2)
        torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-6 * float(g1.abs().max()))
        assert torch.equal(p1, v1) and torch.equal(p2, v1)


def _noisy(field, img, scale, seed=5):
    g = torch.Generator().manual_seed(seed)
    sh = field.sh_flat
    noisy = sh + scale * sh.abs().mean() * torch.randn(sh.shape, generator=g, dtype=sh.dtype)
    noisy = torch.where(sh != 0, noisy, sh)
    return FODField.from_array(noisy.reshape(*field.shape, -1), img.affine)


def test_replay_is_near_zero_on_the_fod_tckgen_tracked():
    """The example target is tckgen's on the example FOD: the ascent from each step's previous
    direction finds the target's next direction (to float32 rounding); with 30% coefficient
    noise it does not."""
    field, img = _example()
    paired = _paired_example()
    on_truth = float(replay_sum(field, paired.halves, paired.counts, 0.1, 10.0)) / len(paired)
    other = _noisy(field, img, 0.3)
    on_noisy = float(replay_sum(other, paired.halves, paired.counts, 0.1, 10.0)) / len(paired)
    assert on_noisy > 1e-4
    assert on_truth < 1e-3 * on_noisy


def _replayed_value(field, halves, counts, sigma_deg):
    """``replay``'s value from first principles: the float64 peaks polished to critical points
    (``refine_peak``), ``|t|^2 = 1 - (u* . u1)^2``, the Cauchy loss, times the step length."""
    from invtract.fod.peak_grad import refine_peak

    h = halves.double()
    d = torch.nn.functional.normalize(h[:, :, 1:] - h[:, :, :-1], dim=-1)
    n = (h[:, :, 1:] - h[:, :, :-1]).norm(dim=-1)
    j = torch.arange(1, h.shape[2] - 1)
    inner = j < (counts[..., None] - 1)
    p, u0, u1, step = h[:, :, 1:-1][inner], d[:, :, :-1][inner], d[:, :, 1:][inner], n[:, :, 1:]
    c, _ = field.sample(p)
    _, peak = field.peak(c, u0)
    peak = refine_peak(c, peak, field.lmax, iterations=6)
    s2 = torch.deg2rad(torch.tensor(sigma_deg, dtype=torch.float64)) ** 2
    r2 = 1 - (peak * u1).sum(-1) ** 2
    return (step[inner] * s2 * torch.log1p(r2 / s2)).sum()


def test_replay_gradient_matches_finite_differences_through_the_peak_search():
    """float64: the term's value is the replayed peaks' (polished) Cauchy loss, and its
    gradient in the learned rows (the peaks' implicit Jacobian) matches central differences of
    that value, the peak search rerun at each perturbed FOD. No gradient to the cutoff."""
    field, img = _example(torch.float64)
    field = _noisy(field, img, 0.3)
    paired = _paired_example().subset([0, 1, 2])
    halves, counts = paired.halves[:, :, :12], paired.counts.clamp_max(12)
    pts = halves.reshape(-1, 3).double()
    few = torch.unique(corner_weights(world_to_voxel(pts, field.scanner2voxel), field.shape,
                                      torch.float64)[0])  # fmt: skip
    r = field.sh_flat[few].clone().requires_grad_(True)
    cut = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    value = replay_sum(field.with_rows(few, r), halves, counts, cut, 10.0)
    assert float(value.detach()) > 1e-5
    torch.testing.assert_close(
        value.detach(), _replayed_value(field, halves, counts, 10.0), rtol=1e-3, atol=0
    )
    value.backward()
    assert cut.grad is None and r.grad.abs().sum() > 0
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        v = torch.randn(r.shape, generator=g, dtype=torch.float64)
        eps = 1e-5 / float(v.abs().max())
        f_plus, f_minus = (
            _replayed_value(field.with_rows(few, (r + s * eps * v).detach()), halves, counts, 10.0)
            for s in (1, -1)
        )
        fd = float(f_plus - f_minus) / (2 * eps)
        assert abs(fd - float((r.grad * v).sum())) <= 1e-2 * abs(fd) + 1e-9


def test_replay_is_a_known_weight_computed_without_tracking():
    """``[loss.weights] replay`` reaches ``paired_terms`` (targets alone) with its sigma."""
    field, _ = _example()
    paired = _paired_example()
    cfg = LossConfig.from_dict({"weights": {"replay": 1.0}, "replay_sigma_deg": 5.0})
    assert cfg.active() == ["replay"] and "replay" in objective.TARGET_ONLY_TERMS

    class _Res:
        seed_ids = torch.zeros(0, dtype=torch.long)
        points = torch.zeros(0, 3)

    out = paired_terms(_Res(), paired, cfg, field=field, cutoff=0.1)
    want = replay_sum(field, paired.halves, paired.counts, 0.1, 5.0) / len(paired)
    torch.testing.assert_close(out["replay"], want.to(out["replay"].dtype))
