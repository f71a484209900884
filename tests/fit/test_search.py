"""Tests of the Optuna outer search (invtract.fit.search) on a tiny phantom (seconds each)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch

from invtract.errors import ConfigError, FitDiverged
from invtract.fit import search
from invtract.fit.scoring import Score, ScoreConfig

REPO = Path(__file__).resolve().parents[2]
TRUE_CUTOFF = 0.5


# ------------------------------------------------------------------------------------------
# phantom: 10 x 10 x 6 voxels of 1 mm, lmax 4, one fibre population along x whose amplitude
# falls from 1.0 to 0.19 along x, so the cutoff decides where streamlines stop.
# ------------------------------------------------------------------------------------------
def make_phantom(folder: Path) -> dict:
    from invtract.fod.field import FODField
    from invtract.fod.sh import sh_basis
    from invtract.io.image import save_nifti
    from invtract.io.seeds import write_seeds
    from invtract.io.tractogram import save_tractogram
    from invtract.params import TrackingParameters
    from invtract.tracking.api import Seeding, track

    g = torch.Generator().manual_seed(0)
    u = torch.randn(400, 3, generator=g, dtype=torch.float64)
    u = u / u.norm(dim=-1, keepdim=True)
    f = torch.exp(-8.0 * (1.0 - u[:, 0] ** 2))
    coef = torch.linalg.lstsq(sh_basis(u, 4), f[:, None]).solution[:, 0].numpy()
    amp = 1.0 - 0.09 * np.arange(10)
    sh = (amp[:, None, None, None] * np.ones((10, 10, 6, 1)) * coef).astype(np.float32)
    affine = np.eye(4)
    fod = folder / "fod.nii.gz"
    save_nifti(fod, sh, affine)
    ys, zs = np.meshgrid(np.linspace(3.0, 6.0, 4), np.linspace(2.0, 3.0, 2), indexing="ij")
    pos = np.stack([np.full(ys.size, 1.3), ys.ravel(), zs.ravel()], -1).astype(np.float32)
    dirs = np.tile(np.array([[1.0, 0.0, 0.0]], np.float32), (len(pos), 1))
    params = TrackingParameters(step_mm=0.2, cutoff=TRUE_CUTOFF, min_length_mm=1.0)
    res = track(
        FODField.from_array(sh, affine),
        Seeding("list", positions=pos, directions=dirs),
        params,
        rng_seed=0,
    )
    assert len(res.streamlines) == len(pos)
    tck = folder / "target.tck"
    header = dict(res.params.header())
    save_tractogram(tck, res.streamlines, header=header)
    seeds = folder / "target_seeds.txt"
    write_seeds(seeds, np.arange(len(pos)), res.seed_index, res.seed_points, "test")
    return {"fod": str(fod), "target": str(tck), "seeds": str(seeds)}


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> dict:
    return make_phantom(tmp_path_factory.mktemp("phantom"))


def write_space(folder: Path, extra_study: str = "", params: str | None = None) -> str:
    """A fast search space (cutoff only, random sampler, 1 s heartbeat)."""
    params = params or textwrap.dedent(
        """
        [params.cutoff]
        type = "float"
        low = 0.1
        high = 0.9
        """
    )
    text = (
        textwrap.dedent(
            f"""
            [study]
            sampler = "random"
            pruner = "none"
            heartbeat_interval = 1
            grace_period = 2
            {extra_study}
            [loss]
            name = "paired_mdf"
            n_points = 12
            """
        )
        + params
    )
    path = folder / f"space_{uuid.uuid4().hex[:6]}.toml"
    path.write_text(text)
    return str(path)


def make_job(phantom: dict, folder: Path, space: str, **kw) -> search.SearchJob:
    folder.mkdir(parents=True, exist_ok=True)
    kw.setdefault("storage", search.default_storage_url(folder))
    return search.SearchJob(
        target=phantom["target"],
        fod=phantom["fod"],
        space=space,
        study=kw.pop("study", "s"),
        run_dir=str(folder),
        target_seeds=phantom["seeds"],
        seed=kw.pop("seed", 0),
        tensorboard=kw.pop("tensorboard", False),
        **kw,
    )


def states(study: optuna.Study) -> list[str]:
    return [t.state.name for t in study.get_trials(deepcopy=False)]


# ------------------------------------------------------------------------------------------
# spaces
# ------------------------------------------------------------------------------------------
def test_shipped_spaces_load():
    sd = search.load_space("sd_stream")
    assert list(sd.params) == ["step_mm", "angle_deg", "cutoff"]
    assert sd.mode == "blackbox" and all(p.log for p in sd.params.values())
    sd.check_mode("blackbox")
    fh = search.load_space(REPO / "configs/search/fit_hparams.toml")
    assert fh.mode == "hybrid" and "lr" in fh.params
    with pytest.raises(ConfigError, match="hybrid"):
        fh.check_mode("blackbox")


@pytest.mark.parametrize(
    "table, match",
    [
        ("[params.cutoff]\nlow = 1.0\nhigh = 0.5\n", "low < high"),
        ("[params.cutoff]\nlow = 0.0\nhigh = 1.0\nlog = true\n", "log scale"),
        ('[params.cutoff]\ntype = "normal"\nlow = 0\nhigh = 1\n', "type"),
        ("[params.cutoff]\nlow = 0.1\nhigh = 1\nbogus = 2\n", "unknown keys"),
        ('[params.x]\ntype = "categorical"\nchoices = []\n', "non-empty"),
        ("[study]\nsampler = 'nope'\n", "no \\[params"),
        ("[loss]\nname = 'nope'\n[params.cutoff]\nlow = 0.1\nhigh = 1\n", "loss"),
    ],
)
def test_space_validation(tmp_path, table, match):
    p = tmp_path / "bad.toml"
    p.write_text(table)
    with pytest.raises(ConfigError, match=match):
        search.load_space(p)


def test_unknown_space_name():
    with pytest.raises(ConfigError, match="not found"):
        search.load_space("no_such_space")


def test_split_trials_exact():
    for n in range(0, 9):
        for w in range(1, 5):
            shares = search.split_trials(n, w)
            assert sum(shares) == n and max(shares) - min(shares) <= 1


def test_resolve_run_dir(tmp_path):
    assert search.resolve_run_dir("abc", "s", tmp_path) == tmp_path / "abc"
    assert search.resolve_run_dir("./x/y", "s", tmp_path) == Path("./x/y")
    new = search.resolve_run_dir(None, "st", tmp_path)
    assert new.parent == tmp_path and new.name.endswith("_st")
    old = tmp_path / "20000101-000000_st"
    old.mkdir()
    (old / "config.toml").write_text("")
    assert search.resolve_run_dir(None, "st", tmp_path) == old


# ------------------------------------------------------------------------------------------
# problem and score
# ------------------------------------------------------------------------------------------
def test_true_parameters_score_zero(phantom):
    prob = search.load_problem(phantom["target"], phantom["fod"], target_seeds=phantom["seeds"])
    assert prob.fixed.min_length_mm == pytest.approx(1.0)  # from the .tck header
    true, _ = prob.evaluate({"step_mm": 0.2, "cutoff": TRUE_CUTOFF})
    off, _ = prob.evaluate({"step_mm": 0.2, "cutoff": 0.8})
    assert true.loss < 1e-3 and true.n_missing == 0
    assert off.loss > 0.3


def test_midpoint_seeds_and_missing_penalty(phantom):
    prob = search.load_problem(phantom["target"], phantom["fod"], fixed={"step_mm": 0.2})
    sc, _ = prob.evaluate({"cutoff": TRUE_CUTOFF})
    assert sc.loss < 0.3  # midpoint seeds: close, not exact
    # a cutoff above every amplitude: no streamline at all, every seed pays its penalty
    dead, _ = prob.evaluate({"cutoff": 5.0})
    assert dead.n_missing == dead.n_seeds and np.isfinite(dead.loss) and dead.loss > sc.loss
    prob.score = ScoreConfig(missing_penalty=7.0)
    assert prob.evaluate({"cutoff": 5.0})[0].loss == pytest.approx(7.0)


# ------------------------------------------------------------------------------------------
# studies
# ------------------------------------------------------------------------------------------
def test_reproducible(phantom, tmp_path):
    space = write_space(tmp_path)
    runs = []
    for name in ("a", "b"):
        job = make_job(phantom, tmp_path / name, space, seed=3)
        study = search.run_search(job, 3)
        runs.append([t.params["cutoff"] for t in study.trials])
    assert runs[0] == runs[1] and len(set(runs[0])) == 3


def test_resume_after_interruption(phantom, tmp_path, monkeypatch):
    space = write_space(tmp_path)
    job = make_job(phantom, tmp_path / "run", space)
    real = search.CalibrationProblem.evaluate
    calls = {"n": 0}

    def flaky(self, values):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # Ctrl-C in the middle of trial 2
        return real(self, values)

    monkeypatch.setattr(search.CalibrationProblem, "evaluate", flaky)
    with pytest.raises(KeyboardInterrupt):
        search.run_search(job, 5)
    monkeypatch.setattr(search.CalibrationProblem, "evaluate", real)
    st = optuna.load_study(study_name="s", storage=job.storage)
    assert states(st) == ["COMPLETE", "COMPLETE", "FAIL"]
    before = [(t.number, t.value, t.params) for t in st.trials[:2]]
    st = search.run_search(job, 4)  # the same call again resumes: 4 more trials
    assert states(st) == ["COMPLETE", "COMPLETE", "FAIL"] + ["COMPLETE"] * 4
    assert [(t.number, t.value, t.params) for t in st.trials[:2]] == before


def test_two_workers_one_sqlite_study(phantom, tmp_path):
    space = write_space(tmp_path)
    run = tmp_path / "run"
    job = make_job(phantom, run, space, tensorboard=True)
    study = search.run_search(job, 6, workers=2)
    trials = study.get_trials()
    assert sorted(t.number for t in trials) == list(range(6))
    assert states(study) == ["COMPLETE"] * 6
    assert len({t.user_attrs["worker"] for t in trials}) == 2
    paths = search.write_outputs(study, run)
    best = json.loads(paths["best"].read_text())
    assert set(best["params"]) == {"cutoff"} and best["loss"] == min(t.value for t in trials)
    rows = paths["trials"].read_text().splitlines()
    assert rows[0].startswith("number,state,loss,cutoff") and len(rows) == 7
    for key in ("importance", "loss_vs_trial"):
        assert paths[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    tb = sorted(p.name for p in (run / "tb").iterdir())
    assert tb == [f"trial_{i:05d}" for i in range(6)]
    assert not list(run.glob(".*.tmp"))  # atomic writes leave nothing behind


def test_failing_trials_recorded_study_continues(phantom, tmp_path, monkeypatch):
    space = write_space(tmp_path)
    job = make_job(phantom, tmp_path / "run", space)
    real = search.CalibrationProblem.evaluate
    calls = {"n": 0}

    def bad(self, values):
        calls["n"] += 1
        if calls["n"] == 2:
            raise FitDiverged("loss became inf")
        if calls["n"] == 3:
            return Score(float("nan"), 8, 0, 0.0), None
        return real(self, values)

    monkeypatch.setattr(search.CalibrationProblem, "evaluate", bad)
    study = search.run_search(job, 4)
    assert states(study) == ["COMPLETE", "FAIL", "FAIL", "COMPLETE"]
    reasons = [t.user_attrs.get("fail_reason", "") for t in study.trials]
    assert "FitDiverged: loss became inf" in reasons[1]
    assert "non-finite" in reasons[2]
    summary = search.summarise_study(study)
    assert summary["states"] == {"COMPLETE": 2, "FAIL": 2}
    assert "FitDiverged" in search.format_summary(study)


def _fake_hybrid_fit(problem, init, *, steps, callbacks=(), hyper=None, **kwargs):
    """Stands in for search.hybrid_fit: the loss curve is lr * (10 - step)."""
    lr = hyper["lr"]
    for step in range(steps):
        for cb in callbacks:
            cb(step, lr * (10.0 - step), {})
    return lr * (10.0 - steps + 1)


def test_hybrid_pruned_trial(phantom, tmp_path, monkeypatch):
    monkeypatch.setattr(search, "hybrid_fit", _fake_hybrid_fit)
    space = write_space(
        tmp_path,
        extra_study="mode = 'hybrid'",
        params='[params.lr]\ntype = "categorical"\nchoices = [1.0, 100.0]\n'
        "[hybrid]\nsteps = 8\nreport_every = 2\n",
    )
    text = Path(space).read_text().replace('pruner = "none"', 'pruner = "median"')
    text = text.replace("[study]", "[study]\npruner_options = {n_startup_trials = 1}", 1)
    Path(space).write_text(text)
    job = make_job(phantom, tmp_path / "run", space, mode="hybrid", tensorboard=True)
    sp = search.load_space(space)
    study = search.create_study(search.make_storage(job.storage), "s", sp, mode="hybrid")
    study.enqueue_trial({"lr": 1.0})
    study.enqueue_trial({"lr": 100.0})
    study = search.run_search(job, 2)
    t0, t1 = study.trials
    assert t0.state.name == "COMPLETE" and t0.value == pytest.approx(3.0)
    assert t1.state.name == "PRUNED" and t1.user_attrs["forward_passes"] < 8
    assert t0.intermediate_values == {0: 10.0, 2: 8.0, 4: 6.0, 6: 4.0, 7: 3.0}


def test_hybrid_with_real_fit(phantom, tmp_path):
    """Hybrid trials run the real gradient fit (a few iterations) and report to Optuna."""
    space = write_space(
        tmp_path,
        extra_study="mode = 'hybrid'",
        params='[params.lr]\ntype = "float"\nlow = 0.01\nhigh = 0.1\nlog = true\n'
        '[hybrid]\nsteps = 2\nreport_every = 1\nlearn = ["cutoff"]\n',
    )
    job = make_job(phantom, tmp_path / "run", space, mode="hybrid")
    study = search.run_search(job, 2)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
    for t in study.trials:
        assert np.isfinite(t.value) and len(t.intermediate_values) >= 1


def test_mode_mismatch_on_resume(phantom, tmp_path, monkeypatch):
    space = write_space(tmp_path)
    job = make_job(phantom, tmp_path / "run", space)
    search.run_search(job, 1)
    sp = search.load_space(space)
    with pytest.raises(ConfigError, match="blackbox mode"):
        search.create_study(job.storage, "s", sp, mode="hybrid")


_CHILD = """
import sys, time, optuna
from invtract.fit.search import make_storage
st = make_storage(sys.argv[1], heartbeat_interval=1, grace_period=2)
study = optuna.load_study(study_name="s", storage=st)
def objective(trial):
    trial.suggest_float("cutoff", 0.1, 0.9)
    if trial.number == 0:
        return 1.0
    time.sleep(600)
study.optimize(objective, n_trials=2)
"""


def test_killed_worker_loses_only_running_trial(phantom, tmp_path):
    space = write_space(tmp_path)
    job = make_job(phantom, tmp_path / "run", space)
    search.run_search(job, 0)  # creates the study
    child = subprocess.Popen([sys.executable, "-c", _CHILD, job.storage])
    try:
        st = optuna.load_study(study_name="s", storage=job.storage)
        deadline = time.time() + 60
        while time.time() < deadline:
            if states(st) == ["COMPLETE", "RUNNING"]:
                break
            time.sleep(0.2)
        assert states(st) == ["COMPLETE", "RUNNING"]
        time.sleep(1.5)  # a heartbeat or two
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    time.sleep(2.5)  # past the grace period
    study = search.run_search(job, 2)
    assert states(study) == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]
    assert study.trials[0].value == 1.0  # the finished trial is untouched
    rows = search._trial_rows(study)[1]
    assert "worker died" in rows[1][-1]


# ------------------------------------------------------------------------------------------
# PostgreSQL (a real server: .ci/postgres.sh starts one and exports the URL)
# ------------------------------------------------------------------------------------------
def _postgres_url() -> str:
    url = os.environ.get("INVTRACT_TEST_POSTGRES_URL")
    if not url:
        pytest.skip(
            "INVTRACT_TEST_POSTGRES_URL is not set: start a server with "
            '`eval "$(.ci/postgres.sh start)"` to run the PostgreSQL test'
        )
    try:
        import sqlalchemy

        eng = sqlalchemy.create_engine(url, connect_args={"connect_timeout": 5})
        with eng.connect():
            pass
        eng.dispose()
    except Exception as err:  # no driver, no server
        pytest.skip(f"PostgreSQL at INVTRACT_TEST_POSTGRES_URL is unreachable: {err}")
    return url


def test_postgres_two_workers(phantom, tmp_path):
    url = _postgres_url()
    space = write_space(tmp_path)
    name = f"test_{uuid.uuid4().hex[:10]}"
    job = make_job(phantom, tmp_path / "run", space, storage=url, study=name)
    try:
        study = search.run_search(job, 6, workers=2)
        trials = study.get_trials()
        assert sorted(t.number for t in trials) == list(range(6))
        assert states(study) == ["COMPLETE"] * 6
        assert len({t.user_attrs["worker"] for t in trials}) == 2
        study = search.run_search(job, 2)  # resume on the server
        assert len(study.trials) == 8
    finally:
        optuna.delete_study(study_name=name, storage=url)


# ------------------------------------------------------------------------------------------
# benchmarks/search_vs_gradient.py: pass accounting (the acceptance benchmark's own logic)
# ------------------------------------------------------------------------------------------
def _benchmark_module():
    import importlib.util

    path = REPO / "benchmarks" / "search_vs_gradient.py"
    spec = importlib.util.spec_from_file_location("search_vs_gradient", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_benchmark_threshold_and_ratio_bounds():
    b = _benchmark_module()
    assert b.threshold(1.0) == pytest.approx(1.05)
    assert b.threshold(1e-6, floor=1e-3) == pytest.approx(1e-6 + 1e-3)  # exact reproductions
    trace = [{"passes": i + 1, "wall_s": float(i), "loss": v} for i, v in enumerate([3, 2, 1])]
    assert b.first_reach(trace, 2.0)["passes"] == 2 and b.first_reach(trace, 0.5) is None
    assert b.median_passes([10, None, 30]) == 30 and b.median_passes([None, None, 5]) == math.inf
    assert b.ratio(50, 10, 300, 61) == {"value": 5.0, "bound": "exact", "text": "5.00"}
    assert b.ratio(math.inf, 10, 300, 61)["bound"] == "lower"  # black-box never reached
    assert b.ratio(math.inf, 10, 300, 61)["value"] == 30.0
    assert b.ratio(50, math.inf, 300, 61)["bound"] == "upper"  # the gradient fit never reached
    assert b.ratio(math.inf, math.inf, 300, 61)["value"] is None
    assert b.finite_or_none({"a": [math.inf, 1.0], "b": math.nan}) == {"a": [None, 1.0], "b": None}


def test_benchmark_scores_every_method_with_the_common_score(phantom):
    """Black-box trial n = n passes; gradient iterate k = k + 1 passes, scored like black-box."""
    b = _benchmark_module()
    b._setup_worker()
    space = search.load_space("sd_stream")
    prob = search.load_problem(
        phantom["target"], phantom["fod"], target_seeds=phantom["seeds"], score=space.loss
    )
    bb = b.run_blackbox(prob, space, 3, seed=0)
    assert [p["passes"] for p in bb["trace"]] == [1, 2, 3]
    assert bb["trace"][0]["loss"] == pytest.approx(prob.evaluate(bb["trace"][0]["params"])[0].loss)
    gr = b.run_gradient(prob, iterations=2, n_seeds=4, seed=0)
    assert [p["passes"] for p in gr["trace"]] == [1, 2, 3]  # theta_0, theta_1, final theta_2
    assert gr["trace"][0]["loss"] == pytest.approx(prob.evaluate({})[0].loss)  # tckgen defaults
    walls = [p["wall_s"] for p in gr["trace"]]
    assert walls == sorted(walls) and gr["seeds_per_iteration"] == 4
