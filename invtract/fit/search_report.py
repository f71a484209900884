"""Run folder and outputs of ``invtract calibrate``: ``config.toml`` / ``commands.txt``,
``best.json``, ``trials.csv``, the study plots and the text summary (all written atomically)."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import os
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import optuna
import torch

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
    ``commands.txt`` in the run folder."""
    run_dir.mkdir(parents=True, exist_ok=True)
    job_d = {k: v for k, v in dataclasses.asdict(job).items() if v is not None}
    doc = {
        "command": " ".join(argv),
        "job": job_d,
        "run": dict(extra),
        "versions": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "optuna": optuna.__version__,
            "numpy": np.__version__,
            "git": _git_sha(),
        },
        "space": space.to_dict(),
    }
    atomic_write_text(run_dir / "config.toml", toml_dumps(doc))
    with open(run_dir / "commands.txt", "a", encoding="utf-8") as f:
        f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')}\t{' '.join(argv)}\n")


def _git_sha() -> str:
    head = Path(__file__).resolve().parents[2] / ".git" / "HEAD"
    try:
        ref = head.read_text().strip()
        if ref.startswith("ref: "):
            return (head.parent / ref[5:]).read_text().strip()
        return ref
    except OSError:
        return "unknown"


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


def _trial_rows(study: optuna.Study) -> tuple[list[str], list[list]]:
    trials = study.get_trials(deepcopy=False)
    names: list[str] = []
    for t in trials:
        for k in t.params:
            if k not in names:
                names.append(k)
    header = ["number", "state", "loss", *names, "last_step", "datetime_start",
              "datetime_complete", "duration_s", *_ATTRS]  # fmt: skip
    rows = []
    for t in trials:
        dur = (
            (t.datetime_complete - t.datetime_start).total_seconds()
            if t.datetime_complete and t.datetime_start
            else None
        )
        fail = t.user_attrs.get("fail_reason")
        if t.state == optuna.trial.TrialState.FAIL and not fail:
            fail = "interrupted or worker died (no heartbeat)"
        attrs = [t.user_attrs.get(a) for a in _ATTRS[:-1]] + [fail]
        rows.append(
            [
                t.number,
                t.state.name,
                t.value,
                *[t.params.get(n) for n in names],
                t.last_step,
                t.datetime_start.isoformat(timespec="seconds") if t.datetime_start else None,
                t.datetime_complete.isoformat(timespec="seconds") if t.datetime_complete else None,
                round(dur, 3) if dur is not None else None,
                *attrs,
            ]
        )
    return header, rows


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
    """Write ``best.json``, ``trials.csv``, ``param_importance.png`` and
    ``loss_vs_trial.png`` into ``run_dir`` (each atomically: temporary file + rename).

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
    header, rows = _trial_rows(study)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows([["" if v is None else v for v in r] for r in rows])
    atomic_write_text(paths["trials"], buf.getvalue())
    paths.update(_plots(study, s, run_dir))
    return paths


def _plots(study: optuna.Study, s: dict, run_dir: Path) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    out = {}
    trials = study.get_trials(deepcopy=False)
    done = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    if done:
        x = [t.number for t in done]
        y = [t.value for t in done]
        ax.scatter(x, y, s=14, label="completed trial")
        order = np.argsort(x)
        best = np.minimum.accumulate(np.asarray(y)[order])
        ax.step(np.asarray(x)[order], best, where="post", color="C3", label="best so far")
    pruned = [t for t in trials if t.state == optuna.trial.TrialState.PRUNED and t.last_step
              is not None]  # fmt: skip
    if pruned:
        ax.scatter([t.number for t in pruned],
                   [t.intermediate_values[t.last_step] for t in pruned],
                   marker="x", color="0.5", s=14, label="pruned (last report)")  # fmt: skip
    fails = [t.number for t in trials if t.state == optuna.trial.TrialState.FAIL]
    for n in fails:
        ax.axvline(n, color="0.85", lw=0.8, zorder=0)
    ax.set_xlabel("trial")
    ax.set_ylabel("loss (mm)")
    ax.set_title(f"{study.study_name}: loss vs trial ({len(fails)} failed)")
    if done or pruned:
        ax.legend(fontsize=8)
        if done and min(y) > 0 and max(y) / max(min(y), 1e-12) > 50:
            ax.set_yscale("log")
    out["loss_vs_trial"] = _save_fig(fig, run_dir / "loss_vs_trial.png")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3), dpi=100)
    imp = s["importances"]
    if imp:
        names = list(imp)[::-1]
        ax.barh(names, [imp[n] for n in names])
        ax.set_xlabel("importance (share)")
    else:
        ax.text(0.5, 0.5, "not available (need >= 2 completed trials)", ha="center")
        ax.set_axis_off()
    ax.set_title("parameter importance")
    fig.tight_layout()
    out["importance"] = _save_fig(fig, run_dir / "param_importance.png")
    plt.close(fig)
    return out


def _save_fig(fig, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())
    return path
