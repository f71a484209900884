"""calibrate's outputs through the libraries: trials.csv from Optuna's trials_dataframe, the
plots from optuna.visualization.matplotlib, commands.txt through fit/runlog."""

from __future__ import annotations

import dataclasses

import optuna
import pandas as pd
import pytest
import tomllib

from invtract.fit import search_report as report
from invtract.fit.search import load_space

PNG = b"\x89PNG\r\n\x1a\n"


def _study(n: int, fail_at: int | None = None) -> optuna.Study:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name="toy", sampler=optuna.samplers.RandomSampler(seed=1))
    study.set_user_attr("mode", "blackbox")

    def objective(trial):
        x = trial.suggest_float("step_mm", 0.1, 1.0, log=True)
        c = trial.suggest_float("cutoff", 0.05, 0.5)
        trial.set_user_attr("n_missing", trial.number % 3)
        trial.set_user_attr("worker", 0)
        if trial.number == fail_at:
            raise RuntimeError("boom")
        return (x - 0.3) ** 2 + c

    study.optimize(objective, n_trials=n, catch=(RuntimeError,))
    return study


def test_trials_csv_is_optunas_dataframe(tmp_path):
    study = _study(8, fail_at=3)
    paths = report.write_outputs(study, tmp_path)
    got = pd.read_csv(paths["trials"])
    ref = study.trials_dataframe()
    assert list(got.columns[:5]) == ["number", "state", "loss", "step_mm", "cutoff"]
    assert got["number"].tolist() == ref["number"].tolist()
    assert got["state"].tolist() == ref["state"].tolist()
    pd.testing.assert_series_equal(got["loss"], ref["value"], check_names=False)
    pd.testing.assert_series_equal(got["cutoff"], ref["params_cutoff"], check_names=False)
    assert got["n_missing"].tolist() == [i % 3 for i in range(8)]
    assert got.loc[3, "state"] == "FAIL" and got["duration_s"].notna().all()
    assert str(got["worker"].dtype) == "int64"  # integers stay integers in the file


def test_study_plots_are_optunas(tmp_path, monkeypatch):
    calls = []
    from optuna.visualization import matplotlib as ovm

    for name in ("plot_optimization_history", "plot_param_importances",
                 "plot_parallel_coordinate", "plot_slice"):  # fmt: skip
        real = getattr(ovm, name)
        monkeypatch.setattr(
            ovm, name, lambda *a, _r=real, _n=name, **k: calls.append(_n) or _r(*a, **k)
        )  # noqa: E501
    paths = report.write_outputs(_study(6), tmp_path)
    assert len(calls) == 4
    for key in ("loss_vs_trial", "importance", "parallel_coordinate", "slice"):
        assert paths[key].read_bytes()[:8] == PNG, key
    one = report.write_outputs(_study(1), tmp_path / "one")  # too few trials: placeholders
    assert one["importance"].read_bytes()[:8] == PNG


def test_empty_study_outputs(tmp_path):
    study = optuna.create_study(study_name="empty")
    paths = report.write_outputs(study, tmp_path)
    assert paths["trials"].read_text().startswith("number,state,loss,")
    assert "no completed trial" in report.format_summary(study)


@dataclasses.dataclass
class _Job:
    study: str
    seed: int


def test_record_run_goes_through_runlog(tmp_path):
    space = load_space("sd_stream")
    argv = ["invtract", "calibrate", "--study", "x"]
    report.record_run(tmp_path, _Job("x", 0), space, argv, {"trials": 2})
    report.record_run(tmp_path, _Job("x", 0), space, argv + ["--trials", "3"], {"trials": 3})
    lines = (tmp_path / "commands.txt").read_text().splitlines()
    assert len(lines) == 2 and lines[1].split("\t")[1].endswith("--trials 3")
    cfg = tomllib.loads((tmp_path / "config.toml").read_text())
    assert cfg["run"] == {"trials": 3} and cfg["versions"]["numpy"]
    assert "optuna" in cfg["versions"] and cfg["job"] == {"study": "x", "seed": 0}


@pytest.mark.parametrize("n", [0, 3])
def test_format_summary_table(n):
    study = _study(n) if n else optuna.create_study()
    text = report.format_summary(study)
    assert ("step_mm" in text) == bool(n)


def test_text_attributes_stay_text(tmp_path):
    study = optuna.create_study()
    study.optimize(lambda t: t.set_user_attr("worker", "host:12") or 1.0, n_trials=2)
    got = pd.read_csv(report.write_outputs(study, tmp_path)["trials"])
    assert got["worker"].tolist() == ["host:12", "host:12"]
