"""Run folder and outputs of ``invtract calibrate``: ``config.toml`` / ``commands.txt``,
``best.json``, ``trials.csv``, the study plots and the text summary (all written atomically)."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import optuna

from ..io.atomic import atomic_write_bytes, atomic_write_text
from .config import toml_dumps

if TYPE_CHECKING:
    from .search import SearchJob
    from .search_space import SearchSpace

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------
# run folder
# ------------------------------------------------------------------------------------------
def resolve_run_dir(run: str | None, study_name: str, root: str | os.PathLike = "runs") -> Path:
    """The run folder: ``root/NAME`` for a bare name, the path itself otherwise.

    Without ``run``, the newest ``root/*_<study_name>`` folder that holds a ``config.toml``
    is reused (so repeating a command resumes its study); failing that a new
    ``root/<YYYYmmdd-HHMMSS>_<study_name>`` is chosen.
    """
    root = Path(root)
    if run:
        if os.sep in run or "/" in run or run.startswith("."):
            return Path(run)
        return root / run
    old = sorted(p for p in root.glob(f"*_{study_name}") if (p / "config.toml").is_file())
    if old:
        return old[-1]
    return root / f"{time.strftime('%Y%m%d-%H%M%S')}_{study_name}"


def record_run(
    run_dir: Path, job: SearchJob, space: SearchSpace, argv: Sequence[str], extra: Mapping
) -> None:
    """Write ``config.toml`` (resolved job, space, versions) and append argv to
    ``commands.txt`` in the run folder, through the run-folder owner
    (:mod:`invtract.fit.runlog`: atomic writes, the one ``versions()`` record)."""
    from .runlog import append_command, versions

    run_dir.mkdir(parents=True, exist_ok=True)
    job_d = {k: v for k, v in dataclasses.asdict(job).items() if v is not None}
    doc = {
        "command": " ".join(argv),
        "job": job_d,
        "run": dict(extra),
        "versions": {k: v for k, v in versions().items() if v is not None},
        "space": space.to_dict(),
    }
    atomic_write_text(run_dir / "config.toml", toml_dumps(doc))
    append_command(run_dir, list(argv), "commands.txt", timestamp=True)


# ------------------------------------------------------------------------------------------
# summaries and outputs
# ------------------------------------------------------------------------------------------
def _importances(study: optuna.Study) -> dict[str, float]:
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if len(complete) < 2:
        return {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for make in (
            lambda: None,  # optuna's default (fANOVA; needs scikit-learn)
            lambda: optuna.importance.PedAnovaImportanceEvaluator(),
        ):
            try:
                imp = optuna.importance.get_param_importances(study, evaluator=make())
                return {k: float(v) for k, v in imp.items()}
            except (ImportError, ModuleNotFoundError):
                continue
            except (ValueError, RuntimeError, ZeroDivisionError) as err:
                log.info("parameter importances unavailable: %s", err)
                return {}
    return {}


def summarise_study(study: optuna.Study) -> dict:
    """Best trial, counts by state and parameter importances of a study.

    Returns:
        ``{"study", "mode", "n_trials", "states": {STATE: n}, "best": {"trial", "loss",
        "params"} | None, "importances": {name: share}}``.
    """
    trials = study.get_trials(deepcopy=False)
    states: dict[str, int] = {}
    for t in trials:
        states[t.state.name] = states.get(t.state.name, 0) + 1
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    best = None
    if complete:
        b = min(complete, key=lambda t: t.value)
        best = {
            "trial": b.number,
            "loss": float(b.value),
            "params": dict(b.params),
            "user_attrs": {k: v for k, v in b.user_attrs.items() if k != "last_loss"},
        }
    return {
        "study": study.study_name,
        "mode": study.user_attrs.get("mode"),
        "n_trials": len(trials),
        "states": states,
        "best": best,
        "importances": _importances(study),
    }


_ATTRS = ("n_missing", "mean_length_mm", "forward_passes", "wall_s", "worker", "fail_reason")
_INT_COLUMNS = ("number", "n_missing", "forward_passes", "worker")
_DF_ATTRS = ("number", "state", "value", "params", "user_attrs", "datetime_start",
             "datetime_complete", "duration")  # fmt: skip


def trials_table(study: optuna.Study):
    """All trials as a ``pandas.DataFrame``, from Optuna's ``study.trials_dataframe()``.

    Columns: ``number, state, loss`` (Optuna's ``value``), one column per parameter (its
    config name, without Optuna's ``params_`` prefix), ``last_step``, ``datetime_start``,
    ``datetime_complete`` (ISO text, seconds), ``duration_s``, the recorded trial attributes
    (``n_missing, mean_length_mm, forward_passes, wall_s, worker, fail_reason``, then any
    other ``user_attrs`` without their prefix). Missing values are ``NA``.
    """
    import pandas as pd

    trials = study.get_trials(deepcopy=False)
    if not trials:
        return pd.DataFrame(columns=["number", "state", "loss", "last_step", "datetime_start",
                                     "datetime_complete", "duration_s", *_ATTRS])  # fmt: skip
    df = study.trials_dataframe(attrs=_DF_ATTRS).rename(columns={"value": "loss"})
    params = [c for c in df.columns if c.startswith("params_")]
    attrs = [c for c in df.columns if c.startswith("user_attrs_")]
    df = df.rename(columns={c: c[len("params_") :] for c in params})
    df = df.rename(columns={c: c[len("user_attrs_") :] for c in attrs})
    df["last_step"] = pd.array([t.last_step for t in trials], dtype="Int64")
    for col in ("datetime_start", "datetime_complete"):
        df[col] = df[col].map(lambda v: v.isoformat(timespec="seconds") if pd.notna(v) else None)
    df["duration_s"] = df.pop("duration").dt.total_seconds().round(3)
    for col in _ATTRS:
        if col not in df:
            df[col] = None
    failed = (df["state"] == "FAIL") & df["fail_reason"].isna()
    df.loc[failed, "fail_reason"] = "interrupted or worker died (no heartbeat)"
    df = df.drop(columns=[c for c in ("last_loss",) if c in df])
    names = list(dict.fromkeys(k for t in trials for k in t.params))  # first-seen order
    first = ["number", "state", "loss", *names, "last_step", "datetime_start",
             "datetime_complete", "duration_s", *_ATTRS]  # fmt: skip
    df = df[first + [c for c in df.columns if c not in first]]
    for col in _INT_COLUMNS:  # integer attributes stay integers where a trial lacks them
        if col in df and _integral(df[col].dropna().tolist()):
            df[col] = pd.array(df[col].tolist(), dtype="Int64")
    return df


def _integral(values: list) -> bool:
    """Whether ``values`` is non-empty and holds only whole numbers (no bools, no text)."""
    ok = [isinstance(v, (int, float)) and not isinstance(v, bool) for v in values]
    return bool(values) and all(ok) and all(float(v).is_integer() for v in values)


def _trial_rows(study: optuna.Study) -> tuple[list[str], list[list]]:
    """``(header, rows)`` of :func:`trials_table`, with ``None`` for missing values."""
    import pandas as pd

    df = trials_table(study)
    rows = [[None if pd.isna(v) else v for v in r] for r in df.itertuples(index=False)]
    return list(df.columns), rows


def format_summary(study: optuna.Study, max_rows: int = 50) -> str:
    """A text report: best trial, table of trials (last ``max_rows``) and importances."""
    s = summarise_study(study)
    header, rows = _trial_rows(study)
    out = [f"study {s['study']!r} ({s['mode'] or '?'} mode): {s['n_trials']} trials, "
           + ", ".join(f"{k.lower()} {v}" for k, v in sorted(s["states"].items()))]  # fmt: skip
    if s["best"]:
        b = s["best"]
        ps = ", ".join(f"{k}={_fmt(v)}" for k, v in b["params"].items())
        out.append(f"best: trial {b['trial']}, loss {b['loss']:.6g} ({ps})")
    else:
        out.append("best: none (no completed trial)")
    keep = [c for c in header if c not in ("datetime_start", "datetime_complete", "worker")]
    idx = [header.index(c) for c in keep]
    table = [[_fmt(r[i]) for i in idx] for r in rows[-max_rows:]]
    widths = [max(len(c), *(len(r[j]) for r in table)) if table else len(c)
              for j, c in enumerate(keep)]  # fmt: skip
    out.append("")
    out.append("  ".join(c.ljust(w) for c, w in zip(keep, widths)))
    out.extend("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in table)
    if len(rows) > max_rows:
        out.append(f"... ({len(rows) - max_rows} earlier trials not shown)")
    out.append("")
    if s["importances"]:
        out.append("parameter importances:")
        out.extend(f"  {k:<16} {v:.3f}" for k, v in s["importances"].items())
    else:
        out.append("parameter importances: not available (need >= 2 completed trials)")
    return "\n".join(out)


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.5g}"
    return str(v)


def write_outputs(study: optuna.Study, run_dir: str | os.PathLike) -> dict[str, Path]:
    """Write ``best.json``, ``trials.csv`` (:func:`trials_table`) and the study plots of
    ``optuna.visualization.matplotlib``: ``loss_vs_trial.png`` (optimisation history),
    ``param_importance.png``, ``parallel_coordinate.png`` and ``slice.png``, into ``run_dir``
    (each atomically: temporary file + rename).

    ``best.json``: ``{"study", "mode", "trial", "loss", "params": {config name: value},
    "n_trials", "states", "importances"}`` (``trial``/``loss``/``params`` null without a
    completed trial).

    Returns:
        name -> path of the files written.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    s = summarise_study(study)
    b = s["best"] or {}
    best = {
        "study": s["study"],
        "mode": s["mode"],
        "trial": b.get("trial"),
        "loss": b.get("loss"),
        "params": b.get("params"),
        "n_trials": s["n_trials"],
        "states": s["states"],
        "importances": s["importances"],
        "best_trial_attrs": b.get("user_attrs"),
    }
    paths = {"best": run_dir / "best.json", "trials": run_dir / "trials.csv"}
    atomic_write_text(paths["best"], json.dumps(best, indent=2, default=str) + "\n")
    atomic_write_text(
        paths["trials"], trials_table(study).to_csv(index=False, lineterminator="\n")
    )
    paths.update(_plots(study, s, run_dir))
    return paths


def _importance_evaluator():
    """Optuna's default importance evaluator (fANOVA, needs scikit-learn), else PED-ANOVA."""
    try:
        import sklearn  # noqa: F401

        return None
    except ImportError:
        return optuna.importance.PedAnovaImportanceEvaluator()


def _plots(study: optuna.Study, s: dict, run_dir: Path) -> dict[str, Path]:
    """The study plots, drawn by ``optuna.visualization.matplotlib``."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    n_done = sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.get_trials())
    plots = {
        "loss_vs_trial": ("loss_vs_trial.png", lambda: ovm.plot_optimization_history(study)),
        "importance": ("param_importance.png", lambda: ovm.plot_param_importances(
            study, evaluator=_importance_evaluator())),
        "parallel_coordinate": ("parallel_coordinate.png",
                                lambda: ovm.plot_parallel_coordinate(study)),
        "slice": ("slice.png", lambda: ovm.plot_slice(study)),
    }  # fmt: skip
    out = {}
    for key, (name, draw) in plots.items():
        fig = None
        if n_done >= (2 if key == "importance" else 1):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    fig = np.ravel(draw())[0].figure
                except (ValueError, RuntimeError, ZeroDivisionError) as err:
                    log.info("%s plot unavailable: %s", name, err)
        if fig is None:
            fig, ax = plt.subplots(figsize=(6, 3), dpi=100)
            need = 2 if key == "importance" else 1
            ax.text(0.5, 0.5, f"not available (need >= {need} completed trials)", ha="center")
            ax.set_axis_off()
        fig.set_dpi(100)
        out[key] = _save_fig(fig, run_dir / name)
        plt.close(fig)
    return out


def _save_fig(fig, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())
    return path
