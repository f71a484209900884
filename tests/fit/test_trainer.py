"""The one training loop (Trainer) on toy Problems: convergence, selection, resume, callbacks,
divergence, extra loss terms; and the config schema's layering and errors."""

from __future__ import annotations

import math
import os
import pickle
import statistics

import pytest
import torch

from invtract.errors import ConfigError, FitDiverged, FormatError
from invtract.fit.checkpoint import load_checkpoint, save_checkpoint
from invtract.fit.config import merge_config, toml_dumps
from invtract.fit.distributed import SINGLE
from invtract.fit.optimise import DEFAULT_CONFIG, load_config
from invtract.fit.reparam import LearnedState
from invtract.fit.trainer import EarlyStopping, Problem, StepOutput, Trainer, TrainSettings


class VProblem(Problem):
    """Loss ``|log step - log 1.0|`` (a V in log step, minimum at step 1 mm), like the
    ``vertex`` term; the starting step is 0.2 mm."""

    def __init__(self, lose_at: int | None = None):
        super().__init__()
        self.config = {"toy": "v"}
        sh0 = torch.zeros(2, 2, 2, 1)
        self.state = LearnedState(
            {"step_mm": 0.2, "angle_deg": 60.0, "cutoff": 0.1},
            ["step_mm"], DEFAULT_CONFIG["bounds"], "log", sh0,
        )  # fmt: skip
        self.lose_at = lose_at

    def _loss(self, vals):
        return (torch.log(torch.as_tensor(vals["step_mm"])) - 0.0).abs()

    def training_step(self, it, world):
        vals = self.state.values()
        total = self._loss(vals)
        terms = {"v": float(total.detach())}
        extra = self._extra({"iteration": it, "values": vals, "world": world})
        total = total + sum(extra.values())
        terms.update({k: float(v) for k, v in extra.items()})
        n = 0 if it == self.lose_at else 1
        return StepOutput(total=total, terms=terms, n_tracked=n)

    def selection_loss(self, world):
        return float(self._loss(self.state.values(detach=True)))


def _settings(**kw):
    base = dict(iterations=40, optimizer="signum", lr=0.3, lr_end=0.005, beta1=0.5,
                flip_decay=0.5, eval_every=1)  # fmt: skip
    base.update(kw)
    return TrainSettings(**base)


def test_signum_flip_decay_converges_where_a_fixed_schedule_oscillates():
    plain = Trainer(_settings(flip_decay=1.0)).fit(VProblem())
    damped = Trainer(_settings()).fit(VProblem())
    # the V's minimum is at log step 0; the plain schedule ends one lr_end-sized step off
    assert damped.final_loss < 1e-3 < plain.history[-2]["loss/select"] + plain.final_loss
    assert damped.final_loss <= 1.1 * damped.best["loss"] + 1e-9
    assert abs(damped.best["values"]["step_mm"] - 1.0) < 2e-3


class ShProblem(Problem):
    """Loss ``|rows - 1|^2`` over 8 learned SH rows (Adam); at iteration ``spike_at`` the
    gradient is that of ``1e6 x`` a term on one coefficient (a near-singular peak's Jacobian in
    the tracking gradient), or nothing at all with ``drop_at``."""

    def __init__(self, spike_at=None, drop_at=None):
        super().__init__()
        self.config = {"toy": "sh"}
        self.state = LearnedState(
            {"step_mm": 0.2, "angle_deg": 60.0, "cutoff": 0.1},
            ["sh"], DEFAULT_CONFIG["bounds"], "log", torch.zeros(2, 2, 2, 3),
            voxels=torch.arange(8),
        )  # fmt: skip
        self.spike_at, self.drop_at = spike_at, drop_at

    def _loss(self):
        return (self.state.rows() - 1).pow(2).sum()

    def training_step(self, it, world):
        total = self._loss()
        if it == self.spike_at:
            total = total + 1e6 * self.state.rows()[3, 1]
        if it == self.drop_at:
            total = total * 0
        return StepOutput(total=total, terms={"l": float(total.detach())})

    def selection_loss(self, world):
        with torch.no_grad():
            return float(self._loss())


def _sh_settings(**kw):
    return TrainSettings(iterations=60, optimizer="adam", lr=0.1, lr_sh=0.05, **kw)


def test_sh_gradient_spikes_are_dropped_or_clipped():
    """``sh_spike``: an SH gradient above that multiple of the previous iterations' median norm
    is dropped (``skip``: the run equals one whose loss had no gradient there) or scaled to the
    bound (``clip``); unguarded, Adam's momentum carries the spike on for many steps."""
    free = Trainer(_sh_settings(sh_spike=0.0)).fit(ShProblem(spike_at=10))
    skip = Trainer(_sh_settings(sh_spike=5.0)).fit(ShProblem(spike_at=10))
    drop = Trainer(_sh_settings()).fit(ShProblem(drop_at=10))
    clip = Trainer(_sh_settings(sh_spike=5.0, sh_spike_mode="clip")).fit(ShProblem(spike_at=10))
    assert free.final_loss > 10 * drop.final_loss
    assert skip.final_loss == drop.final_loss and skip.final_values == drop.final_values
    assert skip.history[10]["grad_scale/sh"] == 0.0
    assert all("grad_scale/sh" not in h for i, h in enumerate(skip.history) if i != 10)
    norms = [h["grad_norm/sh"] for h in clip.history]
    bound = 5.0 * statistics.median(norms[:10])
    assert clip.history[10]["grad_scale/sh"] == pytest.approx(bound / norms[10], rel=1e-9)
    assert drop.final_loss < clip.final_loss < free.final_loss


def test_best_iterate_includes_the_start_and_iterations_zero_is_finite():
    out = Trainer(_settings(iterations=0)).fit(VProblem())
    assert out.best["iteration"] == 0 and out.iterations == 0
    assert math.isfinite(out.final_loss) and out.final_loss == out.best["loss"]


def test_resume_ends_where_an_uninterrupted_run_ends(tmp_path):
    full = Trainer(_settings(iterations=12)).fit(VProblem())
    ck = tmp_path / "ck.pt"

    def stop(it, loss, rec):
        if it == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Trainer(_settings(iterations=12), checkpoint=ck, callbacks=[stop]).fit(VProblem())
    assert load_checkpoint(ck)["iteration"] == 5
    resumed = Trainer(_settings(iterations=12), checkpoint=ck, resume=True).fit(VProblem())
    assert resumed.final_values == full.final_values
    assert [h["loss/total"] for h in resumed.history] == [h["loss/total"] for h in full.history]


def test_early_stopping_and_all_streamlines_lost(tmp_path):
    out = Trainer(_settings(iterations=200), callbacks=[EarlyStopping(3, 1e-3)]).fit(VProblem())
    assert out.stopped_early and out.iterations < 200
    ck = tmp_path / "ck.pt"
    with pytest.raises(FitDiverged, match="no streamline was tracked at iteration 3"):
        Trainer(_settings(iterations=6), checkpoint=ck).fit(VProblem(lose_at=3))
    assert load_checkpoint(ck)["iteration"] == 3


def test_stops_once_converged_with_the_last_iterate_the_best(tmp_path):
    """``converge_below``: the first evaluation whose selection loss is at most that fraction
    of the start's ends the fit there, so the last iterate is the best; a resumed converged
    run stops at once with the same result; 0 turns the rule off."""
    ck = tmp_path / "ck.pt"
    out = Trainer(_settings(iterations=200, converge_below=1e-2), checkpoint=ck).fit(VProblem())
    sel = [h["loss/select"] for h in out.history]
    sel0 = math.log(1 / 0.2)
    assert out.stopped_early and out.iterations < 200
    assert sel[-1] <= 1e-2 * sel0 < min(sel[:-1])  # stopped at the first one below
    assert out.final_loss == out.best["loss"] == sel[-1]
    again = Trainer(_settings(iterations=200, converge_below=1e-2), checkpoint=ck,
                    resume=True).fit(VProblem())  # fmt: skip
    assert again.iterations == out.iterations and again.final_values == out.final_values
    off = Trainer(_settings(iterations=60, converge_below=0.0)).fit(VProblem())
    assert not off.stopped_early and off.iterations == 60


def test_extra_loss_term_enters_the_loss_and_the_log():
    p = VProblem()
    p.add_term("pull", lambda ctx: (ctx["values"]["step_mm"] - 0.5) ** 2, weight=2.0)
    out = Trainer(_settings(iterations=2)).fit(p)
    rec = out.history[0]
    assert rec["loss/pull"] == pytest.approx(2.0 * (0.2 - 0.5) ** 2)
    assert rec["loss/total"] == pytest.approx(rec["loss/v"] + rec["loss/pull"])
    assert SINGLE.is_main


def test_extra_terms_get_the_whole_fod_made_only_for_them(monkeypatch):
    """An add_term term reads ``sh`` (the current [X, Y, Z, K] coefficients) from its context;
    without such terms the whole FOD is never built (a copy per step when ``sh`` is learned)."""
    p = VProblem()
    monkeypatch.setattr(p.state, "sh", lambda: pytest.fail("sh built with no extra term"))
    Trainer(_settings(iterations=2)).fit(p)
    p = VProblem()
    p.add_term("fod_sum", lambda ctx: ctx["sh"].sum() + float(ctx["sh"].shape == (2, 2, 2, 1)))
    rec = Trainer(_settings(iterations=2)).fit(p).history[0]
    assert rec["loss/fod_sum"] == 1.0  # zero coefficients, the state's grid shape


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_crafted_checkpoint_pickle_is_refused(tmp_path):
    good = tmp_path / "good.pt"
    save_checkpoint(good, {"iteration": 3, "z": {"step_mm": torch.tensor(0.1)}, "cfg": "x"})
    assert load_checkpoint(good)["iteration"] == 3
    bad = tmp_path / "bad.pt"
    torch.save({"iteration": 1, "payload": _Evil()}, bad)
    with pytest.raises(FormatError, match="not a plain-data invtract checkpoint"):
        load_checkpoint(bad)
    raw = tmp_path / "raw.pt"
    raw.write_bytes(pickle.dumps(_Evil()))
    with pytest.raises(FormatError):
        load_checkpoint(raw)


@pytest.mark.parametrize(
    "over, match",
    [
        ({"optimizer": {"lr": "abc"}}, "optimizer.lr must be a number, got 'abc'"),
        ({"optimizer": {"lr": -1.0}}, "optimizer.lr must be > 0, got -1.0"),
        ({"optimizer": {"nope": 1}}, "unknown config key 'optimizer.nope'"),
        ({"fit": {"iterations": 2.5}}, "fit.iterations must be an integer"),
        ({"fit": {"mode": "sideways"}}, "fit.mode must be one of joint, alternate"),
        ({"bounds": {"cutoff": [1.0, 0.5]}}, "bounds.cutoff needs"),
        ({"loss": {"weights": {"mdf": "x"}}}, "loss.weights.mdf must be a finite number"),
    ],
)
def test_config_errors_are_one_line(over, match):
    with pytest.raises(ConfigError, match=match) as e:
        load_config(None, over)
    assert "\n" not in str(e.value)


def test_precedence_defaults_example_config_set(tmp_path):
    example = {"fit": {"iterations": 24, "seeds_per_iteration": 8}}
    path = tmp_path / "c.toml"
    path.write_text(toml_dumps({"fit": {"iterations": 5}, "tracking": {"step_mm": 1.0}}))
    assert load_config(None)["fit"]["iterations"] == DEFAULT_CONFIG["fit"]["iterations"]
    assert load_config(None, example=example)["fit"]["iterations"] == 24
    cfg = load_config(path, example=example)
    assert cfg["fit"]["iterations"] == 5 and cfg["fit"]["seeds_per_iteration"] == 8
    cfg = load_config(path, {"fit": {"iterations": 7}}, example=example)
    assert cfg["fit"]["iterations"] == 7
    # an integer where a float is expected is accepted as the float
    assert merge_config(DEFAULT_CONFIG, {"optimizer": {"lr": 1}})["optimizer"]["lr"] == 1.0


def test_a_weight_flag_changes_that_weight_and_a_config_file_sets_the_terms(tmp_path):
    """``--set loss.weights.X=V`` (the overrides layer) adds or changes ``X`` and keeps the
    other weights; a config file's ``[loss.weights]`` is the whole set of terms."""
    base = DEFAULT_CONFIG["loss"]["weights"]
    cfg = load_config(None, {"loss": {"weights": {"tangent": 0.5, "mdf": 2}}})
    assert cfg["loss"]["weights"] == {**base, "tangent": 0.5, "mdf": 2.0}
    path = tmp_path / "c.toml"
    path.write_text(toml_dumps({"loss": {"weights": {"mdf": 1.0}}}))
    assert load_config(path)["loss"]["weights"] == {"mdf": 1.0}
    cfg = load_config(path, {"loss": {"weights": {"reach": 1}}})
    assert cfg["loss"]["weights"] == {"mdf": 1.0, "reach": 1.0}


def test_shipped_configs_are_the_defaults():
    from invtract.fit.config import find_config
    from invtract.fit.connectome_fit import CONNECTOME_DEFAULTS, load_connectome_config

    assert load_config(find_config("fit_params")) == DEFAULT_CONFIG
    assert load_connectome_config(find_config("fit_connectome")) == CONNECTOME_DEFAULTS
    fod = load_config(find_config("fit_fod"))
    assert fod["optimizer"]["name"] == "adam" and "nonneg" in fod["loss"]["weights"]
