"""invtract.fit: objective pieces, a tiny params fit, a tiny FOD fit, divergence."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from invtract.data import example_path
from invtract.errors import FitDiverged
from invtract.fit import objective
from invtract.fit.objective import PairedTarget, resample_halves, split_halves
from invtract.fit.optimise import fit
from invtract.io.image import load_fod
from invtract.io.seeds import seeds_from_reference
from invtract.io.tractogram import load_tractogram
from invtract.params import TrackingParameters
from invtract.streamlines import Streamlines
from invtract.tracking.api import Seeding


def _tiny(n=5):
    img = load_fod(example_path("fod"))
    pos, dirs, ti = seeds_from_reference(example_path("target"), example_path("target_seeds"))
    idx = np.arange(0, 96, 96 // n)[:n]
    sl = load_tractogram(example_path("target")).select(torch.as_tensor(ti[idx]))
    return img, sl, Seeding("list", positions=pos[idx], directions=dirs[idx])


def _fit_tiny(n: int, step_mm: float, learn, config: dict, **kw):
    """A fit of ``n`` target streamlines (tckgen's seeds) from ``step_mm``."""
    img, sl, seeding = _tiny(n)
    params = TrackingParameters(step_mm=step_mm, min_length_mm=10.0, max_length_mm=200.0)
    return img, fit(img, sl, params, seeding=seeding, learn=learn, config=config,
                    **kw)  # fmt: skip


def test_split_and_resample_line():
    pts = torch.tensor([[[0.0, 0, 0], [1, 0, 0], [2, 0, 0], [3, 0, 0], [0, 0, 0]]])
    halves, counts, _ = split_halves(pts, torch.tensor([4]), torch.tensor([1]))
    assert counts.tolist() == [[2, 3]]
    torch.testing.assert_close(halves[0, 0, :2], torch.tensor([[1.0, 0, 0], [0, 0, 0]]))
    r = resample_halves(halves, counts, torch.tensor([[1.0, 2.0]]), 3)
    torch.testing.assert_close(r[0, 1, :, 0], torch.tensor([1.0, 2.0, 3.0]))
    torch.testing.assert_close(r[0, 0, :, 0], torch.tensor([1.0, 0.5, 0.0]))


def test_paired_target_orients_halves():
    sl = Streamlines.from_list([np.array([[0.0, 0, 0], [1, 0, 0], [2, 0, 0]], np.float32)])
    t = PairedTarget.build(sl, np.array([[1.0, 0, 0]]), np.array([[1.0, 0, 0]]))
    # half 0 leaves the seed along +x (the tracker's first direction)
    assert float(t.halves[0, 0, 1, 0]) == 2.0
    torch.testing.assert_close(t.half_length[0].double(), torch.tensor([1.0, 1.0]).double())


def test_params_fit_moves_step_towards_truth():
    cfg = {"fit": {"iterations": 3, "heldout_fraction": 0.25}, "optimizer": {"lr": 0.1}}
    _, res = _fit_tiny(4, 0.6, ("step_mm",), cfg)
    assert res.iterations == 3 and len(res.history) == 3
    assert res.params.step_mm > 0.6  # the target was tracked at 1.0 mm
    assert res.best_loss <= res.history[0]["loss/total"]
    assert len(res.heldout_index) == 1 and "mdf" in res.heldout
    assert all("param/step_mm" in r for r in res.history)


def test_fod_fit_changes_only_learned_voxels():
    cfg = {
        "fit": {"iterations": 2, "heldout_fraction": 0.0},
        "loss": {
            "weights": {"mdf": 1.0, "extent": 0.2, "nonneg": 1.0, "smooth": 1.0, "prior": 0.5}
        },
    }
    img, res = _fit_tiny(3, 1.0, ("sh",), cfg)
    changed = (res.final_sh.reshape(-1, res.sh.shape[-1]) != torch.as_tensor(img.data).reshape(
        -1, res.sh.shape[-1])).any(-1)  # fmt: skip
    learned = torch.zeros_like(changed)
    learned[res.learned_voxels] = True
    assert bool(changed.any()) and not bool((changed & ~learned).any())
    assert {"nonneg", "smooth", "prior"} <= {k.split("/")[-1] for k in res.history[-1]}


def test_nan_loss_raises_fit_diverged_and_keeps_checkpoint(tmp_path, monkeypatch):
    real = objective.paired_terms
    calls = {"n": 0}

    def poisoned(*a, **k):
        out = real(*a, **k)
        calls["n"] += torch.is_grad_enabled()  # training passes only
        if calls["n"] >= 2:
            out["mdf"] = out["mdf"] * float("nan")
        return out

    monkeypatch.setattr("invtract.fit.bundle.paired_terms", poisoned)
    ck = tmp_path / "ck.pt"
    with pytest.raises(FitDiverged, match="nan"):
        cfg = {"fit": {"iterations": 3, "heldout_fraction": 0.0}}
        _fit_tiny(3, 1.0, ("step_mm",), cfg, checkpoint=ck)
    assert torch.load(ck, weights_only=True)["iteration"] == 1


def _feats(halves):
    """Running features of ``[(turns, amps), (turns, amps)]`` (one streamline, two halves)."""
    mt = torch.tensor([[t for t, _ in halves]], dtype=torch.float64).cummax(-1).values
    ma = torch.tensor([[a for _, a in halves]], dtype=torch.float64).cummin(-1).values
    return {
        "max_turn": mt,
        "min_amp": ma,
        "stop_turn": mt[..., -1],
        "stop_amp": ma[..., -1],
        "stopped": torch.zeros(1, 2, dtype=torch.bool),
    }


def test_margin_hinge_pulls_the_binding_threshold_from_far_away():
    # half 0: 6 vertices 1 mm apart, the target stops after vertex 2 where the turn jumps from
    # 0.9 to 1.5 degrees; half 1 (within the target) has lower amplitudes, so raising the
    # cutoff would kill it: only the angle can explain the overshoot
    feats = _feats(
        [([0.0, 0.5, 0.9, 1.5, 1.5, 1.5], [1.0] * 6), ([0.0, 0.1, 0.2, 0.3, 0.3, 0.3], [0.5] * 6)]
    )
    cum = torch.tensor([[[0.0, 1, 2, 3, 4, 5]] * 2], dtype=torch.float64)
    counts = torch.tensor([[6, 6]])
    tl = torch.tensor([[2.0, 5.0]], dtype=torch.float64)
    angle = torch.tensor(60.0, dtype=torch.float64, requires_grad=True)
    cutoff = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    loss = objective.margin_hinge(feats, cum, tl, counts, angle, cutoff, 0.01)
    loss.backward()
    assert float(angle.grad) > 0.01  # 60 deg, far from 1.5: still pulled down
    assert abs(float(cutoff.grad)) < 1e-12
    # inside the interval (0.9, 1.5) the loss is ~0; below 0.9 a surviving vertex is killed
    for a, zero in ((1.2, True), (0.5, False), (60.0, False)):
        v = objective.margin_hinge(feats, cum, tl, counts, a, 0.1, 0.01)
        assert (float(v) < 0.05) == zero


def test_log_space_and_signum_keep_parameters_in_bounds():
    img, sl, seeding = _tiny(3)
    res = fit(
        img,
        sl,
        TrackingParameters(min_length_mm=10.0, max_length_mm=200.0),
        seeding=seeding,
        learn=("angle_deg", "cutoff"),
        config={
            "fit": {"iterations": 2, "heldout_fraction": 0.0},
            "optimizer": {"name": "signum", "lr": 5.0},
            "bounds": {"angle_deg": [1.0, 90.0], "cutoff": [0.05, 3.0]},
        },
    )
    assert 1.0 <= res.params.angle_deg <= 90.0 and 0.05 <= res.params.cutoff <= 3.0
    assert {"loss/margin", "loss/anchor"} <= set(res.history[-1])


def _arc_halves(step):
    """Two halves of ``n`` vertices ``step`` apart on a circle of radius 10 mm, from (10, 0, 0)."""
    k = torch.arange(8, dtype=torch.float64)
    th = k * step / 10.0
    h0 = torch.stack([10 * torch.cos(th), 10 * torch.sin(th), torch.zeros_like(th)], -1)
    h1 = torch.stack([10 * torch.cos(-th), 10 * torch.sin(-th), torch.zeros_like(th)], -1)
    return torch.stack([h0, h1])[None]  # [1, 2, 8, 3]


def test_vertex_distance_is_zero_when_identical_and_a_v_in_the_step():
    target = _arc_halves(torch.tensor(0.5, dtype=torch.float64))
    counts = torch.tensor([[8, 5]])
    w = torch.ones(1, 2, 8, dtype=torch.float64)
    same = objective.vertex_distance(target.clone(), counts, w, target, counts)
    assert float(same) < 1e-5
    for s, sign in ((0.3, -1.0), (0.45, -1.0), (0.55, 1.0), (0.9, 1.0)):
        step = torch.tensor(s, dtype=torch.float64, requires_grad=True)
        # half 1 of the tracked pair stops earlier (3 vertices): only the common range counts
        tracked = _arc_halves(step)
        d = objective.vertex_distance(tracked, torch.tensor([[8, 3]]), w, target, counts)
        d.sum().backward()
        assert torch.isfinite(step.grad) and float(step.grad) * sign > 1.0
        assert float(d.detach()) > 0.05
    # the survival weights are detached: the term never pays to kill a vertex
    wg = w.clone().requires_grad_(True)
    step = torch.tensor(0.6, dtype=torch.float64, requires_grad=True)
    objective.vertex_distance(_arc_halves(step), counts, wg, target, counts).sum().backward()
    assert wg.grad is None and float(step.grad) > 0


def test_paired_terms_vertex_term_vanishes_at_the_target_step():
    from invtract.tracking.differentiable import track_differentiable

    img, sl, seeding = _tiny(3)
    pt = PairedTarget.build(sl, seeding.positions, seeding.directions)
    cfg = objective.LossConfig.from_dict({"weights": {"vertex": 1.0}})
    params = TrackingParameters(min_length_mm=10.0, max_length_mm=200.0).resolve(img.voxel_sizes)
    out = {}
    for s in (0.8, 1.0, 1.2):
        step = torch.tensor(s, dtype=torch.float64, requires_grad=True)
        res = track_differentiable(img, pt.seeds, pt.directions, params, step_mm=step)
        v = objective.paired_terms(res, pt, cfg)["vertex"]
        v.backward()
        out[s] = (float(v.detach()), float(step.grad))
    assert out[1.0][0] < 1e-3  # the example target was tracked at 1.0 mm
    assert out[0.8][1] < 0 < out[1.2][1]


def test_feasible_box_reads_threshold_intervals_from_target_stops():
    # 2 streamlines x 2 halves, 3 vertices each; every target vertex survived: angle > 30,
    # cutoff < 0.4. Stops: (35 deg, amp 0.6) only the angle explains -> angle < 35;
    # (10 deg, amp 0.2) only the cutoff explains -> cutoff > 0.2; amp 0 (left the FOD) and
    # (40 deg, amp 0.1) (either test) bound nothing.
    turns = torch.tensor([[[0, 5, 30], [0, 2, 3]], [[0, 1, 1], [0, 4, 4]]], dtype=torch.float64)
    amps = torch.tensor([[[1, 0.9, 0.5], [0.7, 0.4, 0.4]], [[1, 1, 1], [0.8, 0.8, 0.8]]])
    tf = {
        "max_turn": turns,
        "min_amp": amps.double(),
        "stop_turn": torch.tensor([[35.0, 10.0], [20.0, 40.0]], dtype=torch.float64),
        "stop_amp": torch.tensor([[0.6, 0.2], [0.0, 0.1]], dtype=torch.float64),
        "counts": torch.tensor([[3, 3], [3, 3]]),
    }
    box = objective.feasible_box(tf)
    assert box["angle_deg"] == pytest.approx((30.0, 35.0))
    assert box["cutoff"] == pytest.approx((0.2, 0.4))
    # without the two informative stops neither threshold is bounded on both sides
    tf["stop_amp"] = torch.tensor([[0.0, 0.0], [0.0, 0.1]], dtype=torch.float64)
    box = objective.feasible_box(tf)
    assert box["angle_deg"][1] == float("inf") and box["cutoff"][0] == 0.0


def test_save_fitted_tck_through_the_python_api_has_tckgen_header_keys(tmp_path):
    """fit.outputs.save_fitted_tck (the API's writer): tckgen's header keys with the given
    parameters, and the streamlines it tracked."""
    from invtract.fit.outputs import save_fitted_tck
    from invtract.fod.field import FODField
    from invtract.io.tractogram import load_tractogram_header

    img, _, seeding = _tiny(4)
    field = FODField.from_image(img)
    params = TrackingParameters(step_mm=0.7, angle_deg=40.0, cutoff=0.15, min_length_mm=10.0)
    out = tmp_path / "fitted.tck"
    res = save_fitted_tck(out, field, params, seeding.positions, seeding.directions,
                          source="fod.nii.gz")  # fmt: skip
    hdr = load_tractogram_header(out)
    for key in ("step_size", "max_angle", "threshold", "min_dist", "max_dist", "source"):
        assert key in hdr, key
    assert float(hdr["step_size"]) == pytest.approx(0.7)
    assert float(hdr["max_angle"]) == pytest.approx(40.0)
    assert float(hdr["threshold"]) == pytest.approx(0.15)
    assert float(hdr["min_dist"]) == pytest.approx(10.0)
    assert len(load_tractogram(out)) == len(res.streamlines) > 0
