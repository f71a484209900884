"""Forward tracking passes to calibrate: black-box Optuna search vs the gradient fit vs hybrid.

For each shared target with known parameters, runs the black-box search of
``invtract calibrate`` (default space ``configs/search/sd_stream.toml``: step, angle, cutoff;
paired-MDF score with the target's exact tckgen seeds) ``--repeats`` times with different
sampler seeds, and reports the number of forward tracking passes (= trials) and the wall time
the search needs to first reach a loss within 5% of the best loss it finds
(``loss <= 1.05 * best``), as medians over repeats. The loss at the true parameters (0 up to
float rounding: the tracker reproduces tckgen) is printed for reference.

Gradient column: :func:`invtract.fit.optimise.fit` from tckgen's defaults with
``configs/fit_params.toml`` (``--fit-iterations``, ``--fit-seeds`` seeds per iteration). Every
iterate's parameters are scored afterwards with the *same* black-box score (hard tracking of
all the target's seeds, paired MDF); the gradient fit's cost to reach iterate ``k`` is ``k``
differentiable passes plus one hard pass to score the result (``passes = k + 1``). A
differentiable pass tracks only ``--fit-seeds`` seeds (the black-box pass tracks all of
them) and costs more per seed (reverse sweep); both ``passes`` and ``streamlines_tracked``
and the wall time are reported.

Hybrid column: ``invtract calibrate --mode hybrid`` (Optuna suggests the starting values, each
trial runs a ``--hybrid-steps`` gradient fit); each trial's fitted parameters are scored with
the same hard score; passes = fit iterations + 1 scoring pass per trial, cumulated over trials.

Besides "within 5% of its own best" (which flatters a search that stalls), the number of
passes to reach fixed absolute losses (``--abs-thresholds``, mm) is reported for every column
(``null`` = never reached). The goal is ``gradient.passes <= blackbox.passes / 5``.

Usage:
    python benchmarks/search_vs_gradient.py [--trials 60] [--repeats 3] [--data ../shared/data]
        [--fit-iterations 40] [--fit-seeds 24] [--hybrid-trials 4] [--hybrid-steps 10]

Prints one JSON document on stdout.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from invtract.fit import search  # noqa: E402
from invtract.fit.optimise import fit, load_config  # noqa: E402

TARGETS = [
    {
        "name": "real_msmt15/bundleA_step0.5",
        "fod": "real_msmt15/fod.nii.gz",
        "target": "real_msmt15/bundleA_step0.5.tck",
        "seeds": "real_msmt15/bundleA_step0.5_seeds.txt",
        "true_params": {"step_mm": 0.5},
    },
    {
        "name": "phantom_cross90/bundleB_cutoff1.0",
        "fod": "phantom_cross90/fod.nii.gz",
        "target": "phantom_cross90/bundleB_cutoff1.0.tck",
        "seeds": "phantom_cross90/bundleB_cutoff1.0_seeds.txt",
        "true_params": {"cutoff": 1.0},
    },
]


def passes_to_within(losses: list[float], rel: float = 0.05) -> tuple[int, float]:
    """(1-based trial at which ``loss <= (1 + rel) * best`` first holds, that best)."""
    finite = [v for v in losses if math.isfinite(v)]
    best = min(finite)
    thr = best * (1.0 + rel)
    return next(i + 1 for i, v in enumerate(losses) if v <= thr), best


def passes_to_abs(losses: list[float], thresholds) -> dict:
    """``{threshold: 1-based index of the first loss <= threshold, or None}``."""
    return {
        str(t): next((i + 1 for i, v in enumerate(losses) if v <= t), None) for t in thresholds
    }


def run_blackbox(problem, space, trials: int, seed: int, thresholds=()) -> dict:
    study = optuna.create_study(
        direction="minimize", sampler=search.build_sampler(space.study, seed)
    )
    objective = search.Objective(problem, space, mode="blackbox", tb_dir=None)
    walls: list[float] = []

    def timed(trial):
        t0 = time.perf_counter()
        try:
            return objective(trial)
        finally:
            walls.append(time.perf_counter() - t0)

    study.optimize(timed, n_trials=trials)
    losses = [t.value if t.value is not None else math.inf for t in study.trials]
    n, best = passes_to_within(losses)
    b = study.best_trial
    return {
        "sampler_seed": seed,
        "passes_to_abs": passes_to_abs(losses, thresholds),
        "passes_to_within_5pct": n,
        "wall_s_to_within_5pct": round(sum(walls[:n]), 3),
        "best_loss_mm": best,
        "best_params": b.params,
        "total_wall_s": round(sum(walls), 3),
    }


def _score(problem, values: dict) -> float:
    return float(problem.evaluate(values)[0].loss)


def run_gradient(problem, iterations: int, n_seeds: int, seed: int, thresholds=()) -> dict:
    """Gradient fit from tckgen's defaults; every iterate scored with the black-box score."""
    cfg = load_config(REPO / "configs" / "fit_params.toml")
    cfg["fit"].update(
        {
            "iterations": iterations,
            "seeds_per_iteration": n_seeds,
            "seed": seed,
            "eval_every": 10**6,
        }
    )
    cfg["fit"]["heldout_fraction"] = 0.0
    t0 = time.perf_counter()
    res = fit(
        problem.field,
        problem.target,
        problem.fixed,
        seeding=problem.seeding(),
        voxel_sizes=problem.voxel_sizes,
        config=cfg,
    )
    wall = time.perf_counter() - t0
    names = ("step_mm", "angle_deg", "cutoff")
    traj = [{k: h[f"param/{k}"] for k in names} for h in res.history]
    traj.append({k: getattr(res.params, k) for k in names})
    t1 = time.perf_counter()
    losses = [_score(problem, v) for v in traj]  # losses[k]: after k gradient passes
    eval_wall = (time.perf_counter() - t1) / len(traj)
    step_s = [h["time/step_s"] for h in res.history]
    # cost of "iterate k, then one scoring pass": k differentiable passes + 1 hard pass
    n, best = passes_to_within(losses)  # 1-based index = k + 1
    k = n - 1
    return {
        "fit_seed": seed,
        "iterations": res.iterations,
        "seeds_per_iteration": n_seeds,
        "passes_to_within_5pct": n,
        "streamlines_tracked_to_within_5pct": k * n_seeds + len(problem.target),
        "wall_s_to_within_5pct": round(sum(step_s[:k]) + eval_wall, 3),
        "passes_to_abs": passes_to_abs(losses, thresholds),
        "best_loss_mm": best,
        "final_loss_mm": losses[-1],
        "final_params": traj[-1],
        "loss_by_pass": [round(v, 4) for v in losses],
        "total_wall_s": round(wall, 3),
    }


def run_hybrid(problem, space, trials: int, steps: int, seed: int, thresholds=()) -> dict:
    """``calibrate --mode hybrid``; each trial's fitted parameters scored like black-box."""
    hy_space = dataclasses.replace(space, hybrid={"steps": steps, "report_every": steps})
    rows: list[dict] = []

    def fit_fn(fod, target, init, **kw):
        kw = {**kw, "config": {"fit": {"heldout_fraction": 0.0, "eval_every": 10**6}}}
        res = fit(fod, target, init, **kw)
        vals = {k: getattr(res.params, k) for k in ("step_mm", "angle_deg", "cutoff")}
        t0 = time.perf_counter()
        rows.append(
            {
                "loss": _score(problem, vals),
                "passes": res.iterations + 1,
                "wall_s": res.wall_s + (time.perf_counter() - t0),
                "params": vals,
            }
        )
        return res

    study = optuna.create_study(
        direction="minimize", sampler=search.build_sampler(space.study, seed)
    )
    objective = search.Objective(problem, hy_space, mode="hybrid", tb_dir=None, fit_fn=fit_fn)
    study.optimize(objective, n_trials=trials)
    cum = np.cumsum([r["passes"] for r in rows]).tolist()
    cw = np.cumsum([r["wall_s"] for r in rows]).tolist()
    losses = [r["loss"] for r in rows]
    n, best = passes_to_within(losses)
    ab = passes_to_abs(losses, thresholds)
    return {
        "sampler_seed": seed,
        "steps_per_trial": steps,
        "trials": len(rows),
        "passes_to_within_5pct": cum[n - 1],
        "wall_s_to_within_5pct": round(cw[n - 1], 3),
        "passes_to_abs": {k: (None if v is None else cum[v - 1]) for k, v in ab.items()},
        "best_loss_mm": best,
        "trial_losses_mm": [round(v, 4) for v in losses],
        "trial_params": [r["params"] for r in rows],
    }


def _median_or_none(xs):
    xs = list(xs)
    return None if any(x is None for x in xs) else statistics.median(xs)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(REPO / ".." / "shared" / "data"))
    ap.add_argument("--space", default="sd_stream")
    ap.add_argument("--trials", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--fit-iterations", type=int, default=40)
    ap.add_argument("--fit-seeds", type=int, default=24)
    ap.add_argument("--fit-repeats", type=int, default=1)
    ap.add_argument("--hybrid-trials", type=int, default=4)
    ap.add_argument("--hybrid-steps", type=int, default=10)
    ap.add_argument("--abs-thresholds", default="0.1,0.05")
    ap.add_argument("--targets", default="", help="comma-separated subset of target names")
    args = ap.parse_args(argv)
    thr = [float(x) for x in args.abs_thresholds.split(",") if x]
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger("invtract").setLevel(logging.WARNING)
    torch.set_num_threads(1)
    space = search.load_space(args.space)
    data = Path(args.data)
    out = {
        "benchmark": "search_vs_gradient",
        "space": space.name,
        "score": space.loss.to_dict(),
        "trials_per_search": args.trials,
        "repeats": args.repeats,
        "criterion": "first trial with loss <= 1.05 x best loss found by that search",
        "abs_criteria_mm": thr,
        "gradient_passes": "k differentiable passes (--fit-seeds seeds each) + 1 hard scoring "
        "pass; hybrid: per trial fit iterations + 1 scoring pass, cumulated",
        "goal": "gradient fit needs >= 5x fewer forward passes than black-box search",
        "machine": {
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "optuna": optuna.__version__,
        },  # fmt: skip
        "targets": [],
    }
    for t in TARGETS:
        if args.targets and t["name"].split("/")[-1] not in args.targets.split(","):
            continue
        problem = search.load_problem(
            data / t["target"], data / t["fod"], target_seeds=data / t["seeds"], score=space.loss
        )
        problem.evaluate({})  # warm-up (JIT compilation) outside the timings
        true_loss = problem.evaluate(t["true_params"])[0].loss
        default_loss = problem.evaluate({})[0].loss
        runs = [
            run_blackbox(problem, space, args.trials, seed, thr) for seed in range(args.repeats)
        ]
        print(f"{t['name']}: black-box done", file=sys.stderr, flush=True)
        grads = [
            run_gradient(problem, args.fit_iterations, args.fit_seeds, seed, thr)
            for seed in range(args.fit_repeats)
        ]
        print(f"{t['name']}: gradient done", file=sys.stderr, flush=True)
        hyb = [
            run_hybrid(problem, space, args.hybrid_trials, args.hybrid_steps, 0, thr)
            if args.hybrid_trials > 0
            else None
        ]
        bb_p = statistics.median(r["passes_to_within_5pct"] for r in runs)
        gr_p = statistics.median(r["passes_to_within_5pct"] for r in grads)
        bb_abs = {str(x): _median_or_none(r["passes_to_abs"][str(x)] for r in runs) for x in thr}
        gr_abs = {str(x): _median_or_none(r["passes_to_abs"][str(x)] for r in grads) for x in thr}
        out["targets"].append(
            {
                "name": t["name"],
                "true_params": t["true_params"],
                "n_seeds": len(problem.target),
                "loss_at_true_params_mm": true_loss,
                "loss_at_tckgen_defaults_mm": default_loss,
                "blackbox": {
                    "passes_to_within_5pct": statistics.median(
                        r["passes_to_within_5pct"] for r in runs
                    ),
                    "wall_s_to_within_5pct": statistics.median(
                        r["wall_s_to_within_5pct"] for r in runs
                    ),
                    "passes_to_abs": bb_abs,
                    "best_loss_mm": statistics.median(r["best_loss_mm"] for r in runs),
                    "runs": runs,
                },
                "gradient": {
                    "passes_to_within_5pct": gr_p,
                    "passes_to_abs": gr_abs,
                    "best_loss_mm": statistics.median(r["best_loss_mm"] for r in grads),
                    "runs": grads,
                },
                "hybrid": hyb[0],
                "ratio_blackbox_over_gradient_passes": {
                    "within_5pct_of_own_best": round(bb_p / gr_p, 3),
                    **{
                        f"loss<={x}mm": (
                            None
                            if bb_abs[str(x)] is None or gr_abs[str(x)] is None
                            else round(bb_abs[str(x)] / gr_abs[str(x)], 3)
                        )
                        for x in thr
                    },
                },
            }
        )
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
