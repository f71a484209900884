"""Optuna outer search over tracking (or fit) parameters, the library of ``invtract calibrate``.

Pieces, from the inside out:

* :class:`SearchSpace` / :func:`load_space` (:mod:`~invtract.fit.search_space`): a TOML file in
  ``configs/search/`` mapping config names to distributions (``[params.NAME]
  type/low/high/log/step/choices``), plus the sampler, pruner, heartbeat (``[study]``), score
  (``[loss]``) and hybrid fit settings (``[hybrid]``).
* :class:`CalibrationProblem` / :func:`load_problem`: the FOD, the target bundle, one seed per
  target streamline (exact tckgen seeds from ``-output_seeds``, or each streamline's midpoint and
  local direction) and the fixed tracking parameters; :meth:`CalibrationProblem.evaluate` tracks
  once and scores (:mod:`invtract.fit.scoring`).
* :class:`Objective`: one Optuna trial. ``blackbox`` tracks once with the suggested values;
  ``hybrid`` runs a short gradient fit from the suggested values (:func:`hybrid_fit`: the bundle
  fit's Problem run by the one Trainer) and reports its loss every few iterations
  (:class:`OptunaPruning`) so that pruners stop bad trials early. A trial that
  raises an :class:`~invtract.errors.InvtractError` (e.g. ``FitDiverged``), a numeric or runtime
  error, or ends with a NaN/inf loss, returns NaN: Optuna records it as FAIL and the reason is kept
  in the trial's ``fail_reason`` user attribute. The study goes on.
* :func:`make_storage` / :func:`create_study` (:mod:`~invtract.fit.search_study`): an
  ``RDBStorage`` (SQLite in the run folder by default, PostgreSQL/MySQL for many machines) with a
  heartbeat, so that the running trial of a killed worker becomes FAIL after ``grace_period``
  seconds; finished trials are never touched.
* :func:`run_search` / :func:`run_worker`: ``n_trials`` more trials on a study, split over
  ``workers`` local processes (``multiprocessing`` spawn); each runs ``study.optimize`` with its
  exact share, so a call adds exactly ``n_trials`` finished trials unless a worker dies.
* :func:`summarise_study` / :func:`write_outputs` (:mod:`~invtract.fit.search_report`):
  ``best.json``, ``trials.csv``, ``param_importance.png``, ``loss_vs_trial.png`` (written
  atomically).

Every trial writes TensorBoard scalars (``loss/total``, ``tracking/*``, ``param/*``,
``time/trial_s``) into ``<run>/tb/trial_NNNNN`` plus an hparams record, so TensorBoard's HPARAMS
tab compares trials.
"""

from __future__ import annotations

import logging
import math
import multiprocessing as mp
import os
import socket
import sys
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import optuna
import torch

from ..errors import ConfigError, FitDiverged, InvtractError
from ..io.seeds import midpoint_seeds
from ..params import TrackingParameters
from ..streamlines import Streamlines
from .scoring import Score, ScoreConfig, score_tracking

if TYPE_CHECKING:  # annotations only
    from ..fod.field import FODField

__all__ = [
    "TRACKING_NAMES",
    "ParamSpec",
    "SearchSpace",
    "load_space",
    "CalibrationProblem",
    "load_problem",
    "Objective",
    "hybrid_fit",
    "OptunaPruning",
    "default_storage_url",
    "make_storage",
    "build_sampler",
    "build_pruner",
    "create_study",
    "SearchJob",
    "run_search",
    "run_worker",
    "split_trials",
    "resolve_run_dir",
    "record_run",
    "summarise_study",
    "format_summary",
    "write_outputs",
]
from .search_report import (  # noqa: F401  (re-exported: invtract.fit.search is the API)
    _trial_rows,
    format_summary,
    record_run,
    resolve_run_dir,
    summarise_study,
    write_outputs,
)
from .search_space import TRACKING_NAMES, ParamSpec, SearchSpace, load_space  # noqa: F401
from .search_study import (  # noqa: F401
    _FINISHED,
    _redact,
    build_pruner,
    build_sampler,
    create_study,
    default_storage_url,
    make_storage,
)

log = logging.getLogger(__name__)

#: errors inside a trial that make it FAIL (with its reason) instead of stopping the study
_TRIAL_ERRORS = (InvtractError, ArithmeticError, RuntimeError, MemoryError)


# ------------------------------------------------------------------------------------------
# the problem: FOD + target + seeds
# ------------------------------------------------------------------------------------------
@dataclass
class CalibrationProblem:
    """What a trial needs: FOD, paired target, seeds, fixed parameters and score.

    Attributes:
        field: the FOD (:class:`~invtract.fod.field.FODField`; its header voxel sizes resolve
            tckgen's defaults).
        seed_positions: ``[S, 3]`` seeds (scanner mm), seed ``i`` paired with ``target[i]``.
        seed_directions: ``[S, 3]`` initial directions.
        target: ``S`` target streamlines (mm).
        fixed: parameters that are not searched (None fields = tckgen defaults).
        score: the score configuration.
        engine: tracking engine (``auto``, ``torch``, ``numba``).
    """

    field: FODField
    seed_positions: np.ndarray
    seed_directions: np.ndarray
    target: Streamlines
    fixed: TrackingParameters = field(default_factory=TrackingParameters)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    engine: str = "auto"

    def tracking_parameters(self, values: Mapping) -> TrackingParameters:
        """``fixed`` with the tracking entries of ``values`` (config names) substituted."""
        changes = {k: v for k, v in values.items() if k in TRACKING_NAMES}
        if "downsample" in changes:
            changes["downsample"] = int(changes["downsample"])
        if "rk4" in changes:
            changes["rk4"] = bool(changes["rk4"])
        return self.fixed.replace(**changes)

    def seeding(self):
        """The seeds as a :class:`~invtract.tracking.api.Seeding` list."""
        from ..tracking.api import Seeding

        return Seeding("list", positions=self.seed_positions, directions=self.seed_directions)

    def track(self, params: TrackingParameters):
        """One forward tracking pass from every seed (no gradients)."""
        from ..tracking.api import track

        with torch.no_grad():
            return track(
                self.field,
                self.seeding(),
                params,
                engine=self.engine,
                rng_seed=0,
            )

    def evaluate(self, values: Mapping) -> tuple[Score, object]:
        """Track with ``values`` and score against the target: ``(Score, TrackingResult)``."""
        res = self.track(self.tracking_parameters(values))
        sc = score_tracking(
            res.streamlines, res.seed_ids, self.target, self.seed_positions, self.score
        )
        return sc, res


def _header_fixed(header: Mapping, fixed: TrackingParameters) -> TrackingParameters:
    """Fill unset length limits and ``rk4`` from a tckgen header (``min_dist``/``max_dist``)."""
    from .config import header_lengths

    out = header_lengths(header, fixed)
    if not fixed.rk4 and str(header.get("rk4", "0")).strip() == "1":
        out = out.replace(rk4=True)
    if out != fixed:
        log.info("from the target header: %s", out)
    return out


def load_problem(
    target: str | os.PathLike,
    fod: str | os.PathLike,
    *,
    target_seeds: str | os.PathLike | None = None,
    fixed: TrackingParameters | Mapping | None = None,
    score: ScoreConfig | None = None,
    sh_basis: str = "mrtrix",
    engine: str = "auto",
    use_header: bool = True,
) -> CalibrationProblem:
    """Load the FOD and the target bundle and derive one seed per target streamline.

    Args:
        target: target tractogram (.tck/.trk/.trx), scanner mm.
        fod: FOD image (SH coefficients).
        target_seeds: tckgen ``-output_seeds`` file of ``target``: exact seeds (only the
            streamlines listed there are used). Otherwise each target streamline is seeded at
            its middle vertex along its local direction.
        fixed: parameters that are not searched (a mapping of TrackingParameters fields).
        score: the score (default :class:`ScoreConfig`).
        sh_basis: SH basis of the FOD file.
        engine: tracking engine.
        use_header: take unset ``min_length_mm``/``max_length_mm``/``rk4`` from the target's
            tckgen header.

    Returns:
        :class:`CalibrationProblem`.
    """
    from ..fod.field import FODField
    from ..io.image import load_fod
    from ..io.seeds import seeds_from_reference
    from ..io.tractogram import load_tractogram, load_tractogram_header

    if isinstance(fixed, Mapping):
        fixed = TrackingParameters(**fixed)
    fixed = fixed or TrackingParameters()
    img = load_fod(fod, sh_basis=sh_basis)
    fld = FODField.from_image(img)
    sl = load_tractogram(target)
    if len(sl) == 0:
        raise ConfigError(f"{target}: the target bundle has no streamlines")
    if target_seeds is not None:
        pos, dirs, ti = seeds_from_reference(target, target_seeds)
        sl = sl.select(torch.as_tensor(ti))
    else:
        pos, dirs = midpoint_seeds(sl)
    if use_header and str(target).endswith(".tck"):
        try:
            fixed = _header_fixed(load_tractogram_header(target), fixed)
        except InvtractError:
            pass
    return CalibrationProblem(
        fld,
        pos,
        dirs,
        sl,
        fixed,
        score or ScoreConfig(),
        engine,
    )


# ------------------------------------------------------------------------------------------
# the objective
# ------------------------------------------------------------------------------------------
class OptunaPruning:
    """Trainer callback: report the iteration's loss to an Optuna trial every ``every``
    iterations (and at the last) and raise :class:`optuna.TrialPruned` when its pruner says so;
    a non-finite loss raises :class:`~invtract.errors.FitDiverged`."""

    def __init__(self, trial: optuna.Trial, every: int, steps: int, writer=None) -> None:
        self.trial, self.every, self.steps, self.writer = trial, max(int(every), 1), steps, writer

    def __call__(self, step: int, loss, *args, **kwargs) -> None:
        loss = float(loss)
        self.trial.set_user_attr("forward_passes", int(step) + 1)
        self.trial.set_user_attr("last_loss", loss)
        if self.writer is not None:
            self.writer.add_scalar("loss/total", loss, step)
        if not math.isfinite(loss):
            raise FitDiverged(f"loss {loss} at iteration {step}")
        if step % self.every == 0 or step == self.steps - 1:
            self.trial.report(loss, step)
            if self.trial.should_prune():
                raise optuna.TrialPruned(f"pruned at iteration {step} (loss {loss:.4g})")


def hybrid_fit(
    problem: CalibrationProblem,
    init: TrackingParameters,
    *,
    steps: int,
    callbacks=(),
    logger=None,
    learn=None,
    hyper: Mapping | None = None,
) -> float:
    """A short gradient fit from ``init`` (the bundle fit's Problem run by the one
    :class:`~invtract.fit.trainer.Trainer`); returns its best (selection) loss.

    Args:
        problem: the calibration problem (FOD field, target, seeds).
        init: starting tracking parameters (the trial's suggestion).
        steps: iterations.
        callbacks: Trainer callbacks (e.g. :class:`OptunaPruning`).
        logger: a bare ``SummaryWriter`` (the trial's) or None.
        learn: what to learn (default: the fit config's).
        hyper: fit config overrides by alias (``lr``, ``temperature_mm``, ...).
    """
    from .optimise import build_problem, resolve_config
    from .runlog import WriterLogger
    from .trainer import Trainer, TrainSettings

    cfg = resolve_config(None, steps, learn, hyper or {})
    fit_problem = build_problem(cfg, problem.field, problem.target, init, problem.seeding())
    trainer = Trainer(
        TrainSettings.from_config(cfg.raw),
        logger=None if logger is None else WriterLogger(logger),
        callbacks=list(callbacks),
    )
    return float(trainer.fit(fit_problem).best["loss"])


class Objective:
    """One Optuna trial: suggest -> track (or fit) -> score.

    Args:
        problem: the calibration problem.
        space: the search space.
        mode: ``"blackbox"`` or ``"hybrid"``.
        tb_dir: folder for per-trial TensorBoard runs (``None``: no TensorBoard).
        fit_fn: hybrid mode's fit function ``fit_fn(fod, target, init, *, seeding, steps,
            on_step, logger, [learn], **hyper) -> result with best_loss`` (e.g. a
            wrapper of :func:`invtract.fit.optimise.fit`); default None: :func:`hybrid_fit`
            (the Trainer directly).

    Returns (when called):
        The trial's loss (mm), or NaN for a failed trial (Optuna records FAIL); raises
        :class:`optuna.TrialPruned` when the pruner stops a hybrid trial.
    """

    def __init__(
        self,
        problem: CalibrationProblem,
        space: SearchSpace,
        *,
        mode: str = "blackbox",
        tb_dir: str | os.PathLike | None = None,
        fit_fn: Callable | None = None,
    ) -> None:
        space.check_mode(mode)
        self.problem = problem
        self.space = space
        self.mode = mode
        self.tb_dir = Path(tb_dir) if tb_dir is not None else None
        self.fit_fn = fit_fn

    def __call__(self, trial: optuna.Trial) -> float:
        values = self.space.suggest(trial)
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        t0 = time.perf_counter()
        writer = self._writer(trial.number)
        loss = float("nan")
        state = "fail"
        try:
            if self.mode == "blackbox":
                loss = self._blackbox(trial, values, writer)
            else:
                loss = self._hybrid(trial, values, writer)
            state = "complete"
        except optuna.TrialPruned:
            state = "pruned"
            loss = float(trial.user_attrs.get("last_loss", float("nan")))
            raise
        except _TRIAL_ERRORS as exc:
            reason = f"{type(exc).__name__}: {exc}"
            trial.set_user_attr("fail_reason", reason[:1000])
            log.warning("trial %d failed: %s", trial.number, reason)
            return float("nan")
        finally:
            wall = time.perf_counter() - t0
            trial.set_user_attr("wall_s", round(wall, 4))
            if writer is not None:
                self._close_writer(writer, values, loss, state, wall)
        if not math.isfinite(loss):
            trial.set_user_attr("fail_reason", f"non-finite loss {loss}")
            log.warning("trial %d failed: non-finite loss %s", trial.number, loss)
            return float("nan")
        return loss

    # -- modes ---------------------------------------------------------------------------------
    def _blackbox(self, trial: optuna.Trial, values: dict, writer) -> float:
        sc, res = self.problem.evaluate(values)
        trial.set_user_attr("forward_passes", 1)
        trial.set_user_attr("n_missing", sc.n_missing)
        trial.set_user_attr("mean_length_mm", round(sc.mean_length_mm, 4))
        if writer is not None:
            writer.add_scalar("loss/total", sc.loss, 0)
            writer.add_scalar("tracking/missing_fraction", sc.n_missing / max(sc.n_seeds, 1), 0)
            writer.add_scalar("tracking/mean_length_mm", sc.mean_length_mm, 0)
        return sc.loss

    def _hybrid(self, trial: optuna.Trial, values: dict, writer) -> float:
        hy = self.space.hybrid
        steps = int(hy.get("steps", 30))
        every = int(hy.get("report_every", 5))
        init = self.problem.tracking_parameters(values)
        hyper = dict(hy.get("fixed") or {})
        hyper.update({k: v for k, v in values.items() if k not in TRACKING_NAMES})

        prune = OptunaPruning(trial, every, steps, writer)
        learn = tuple(hy["learn"]) if "learn" in hy else None
        if self.fit_fn is None:
            return hybrid_fit(self.problem, init, steps=steps, callbacks=[prune], logger=writer,
                              learn=learn, hyper=hyper)  # fmt: skip
        # a caller's own fit function: fit_fn(fod, target, init, **keywords) -> best_loss
        result = self.fit_fn(
            self.problem.field, self.problem.target, init, seeding=self.problem.seeding(),
            steps=steps, on_step=prune, logger=writer, **({"learn": learn} if learn else {}),
            **hyper,
        )  # fmt: skip
        return float(getattr(result, "best_loss", result))

    # -- TensorBoard ---------------------------------------------------------------------------
    def _writer(self, number: int):
        if self.tb_dir is None:
            return None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(log_dir=str(self.tb_dir / f"trial_{number:05d}"))

    def _close_writer(self, writer, values: dict, loss: float, state: str, wall: float) -> None:
        try:
            for k, v in values.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    writer.add_scalar(f"param/{k}", v, 0)
            writer.add_scalar("time/trial_s", wall, 0)
            if state != "fail" and math.isfinite(loss):
                hp = {k: (v if isinstance(v, (int, float, str, bool)) else str(v))
                      for k, v in values.items()}  # fmt: skip
                writer.add_hparams(hp, {"hparam/loss": loss}, run_name=".")
        finally:
            writer.close()


# ------------------------------------------------------------------------------------------
# running: jobs and workers
# ------------------------------------------------------------------------------------------
@dataclass
class SearchJob:
    """Everything a worker process needs (picklable).

    Attributes:
        target, fod, space: input paths (``space`` may be a bare name).
        storage: database URL; study: study name; run_dir: the run folder.
        mode: ``blackbox`` or ``hybrid``.
        target_seeds: tckgen ``-output_seeds`` file of the target, or None (midpoint seeds).
        fixed: fixed :class:`~invtract.params.TrackingParameters` fields.
        sh_basis, engine: as for ``invtract track``.
        seed: sampler seed (None: random).
        timeout: seconds per worker (None: none).
        tensorboard: write ``<run>/tb/trial_NNNNN``.
        progress: show a progress bar.
    """

    target: str
    fod: str
    space: str
    storage: str
    study: str
    run_dir: str
    mode: str = "blackbox"
    target_seeds: str | None = None
    fixed: dict = field(default_factory=dict)
    sh_basis: str = "mrtrix"
    engine: str = "auto"
    seed: int | None = None
    timeout: float | None = None
    tensorboard: bool = True
    progress: bool = False

    def heartbeat(self, space: SearchSpace) -> tuple[int | None, int | None]:
        hb = space.study.get("heartbeat_interval", 10)
        return (int(hb) if hb else None), space.study.get("grace_period")

    def problem(self, space: SearchSpace) -> CalibrationProblem:
        return load_problem(
            self.target,
            self.fod,
            target_seeds=self.target_seeds,
            fixed=self.fixed,
            score=space.loss,
            sh_basis=self.sh_basis,
            engine=self.engine,
        )


def _fail_stale(study: optuna.Study) -> None:
    """Mark the running trials of dead workers (no heartbeat for ``grace_period``) FAIL."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def split_trials(n_trials: int, workers: int) -> list[int]:
    """Shares of ``n_trials`` over ``workers`` (differ by at most one, sum exactly)."""
    return [n_trials // workers + (i < n_trials % workers) for i in range(workers)]


def _open(job: SearchJob, space: SearchSpace, worker: int) -> optuna.Study:
    hb, grace = job.heartbeat(space)
    storage = make_storage(job.storage, heartbeat_interval=hb, grace_period=grace)
    return create_study(storage, job.study, space, seed=job.seed, worker=worker, mode=job.mode)


def run_worker(
    job: SearchJob,
    n_trials: int,
    *,
    worker: int = 0,
    objective: Callable | None = None,
    show_progress: bool = False,
) -> None:
    """Run ``n_trials`` trials of ``job`` in this process (joining the study if it exists).

    Args:
        job: the search job.
        n_trials: trials this worker runs (finished in any state).
        worker: worker index (offsets the sampler seed).
        objective: a ready objective (default: built from the job).
        show_progress: Optuna's progress bar.
    """
    space = load_space(job.space)
    space.check_mode(job.mode)
    study = _open(job, space, worker)
    if objective is None:
        tb = Path(job.run_dir) / "tb" if job.tensorboard else None
        objective = Objective(job.problem(space), space, mode=job.mode, tb_dir=tb)
    _fail_stale(study)
    study.optimize(
        objective,
        n_trials=n_trials,
        timeout=job.timeout,
        show_progress_bar=show_progress,
        gc_after_trial=False,
    )


def _worker_main(job: SearchJob, n_trials: int, worker: int, threads: int) -> None:
    """Entry point of a spawned worker process."""
    logging.basicConfig(level=logging.INFO, format=f"invtract[w{worker}]: %(message)s")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    torch.set_num_threads(max(1, threads))
    try:
        run_worker(job, n_trials, worker=worker)
    except KeyboardInterrupt:
        sys.exit(130)
    except InvtractError as err:
        print(f"invtract calibrate worker {worker}: error: {err}", file=sys.stderr)
        sys.exit(1)


def _count_finished(study: optuna.Study, start: int) -> int:
    return sum(1 for t in study.get_trials(deepcopy=False, states=_FINISHED) if t.number >= start)


def run_search(job: SearchJob, n_trials: int, *, workers: int = 1) -> optuna.Study:
    """Add ``n_trials`` trials to the job's study with ``workers`` local processes.

    The study is created (or loaded) here first, so workers only join it; stale trials of
    dead workers are failed. ``workers == 1`` runs in this process; otherwise ``workers``
    spawned processes each run their share (:func:`split_trials`).

    Args:
        job: the search job.
        n_trials: trials to add (>= 0).
        workers: local worker processes (>= 1).

    Returns:
        The study (fresh handle; includes trials of workers elsewhere).

    Raises:
        ConfigError: bad space, mode, storage or inputs (checked before any trial).
        InvtractError: a worker process failed.
    """
    if n_trials < 0 or workers < 1:
        raise ConfigError(f"need trials >= 0 and workers >= 1, got {n_trials}, {workers}")
    space = load_space(job.space)
    space.check_mode(job.mode)
    clash = sorted(set(job.fixed) & set(space.params))
    if clash:
        raise ConfigError(f"{clash} are searched by {space.name}; do not also fix them")
    study = _open(job, space, 0)
    _fail_stale(study)
    if n_trials == 0:
        return study
    if workers == 1:
        run_worker(job, n_trials, show_progress=job.progress)
        return study
    start = len(study.get_trials(deepcopy=False))
    job.problem(space)  # check the inputs once here, not in W processes
    ctx = mp.get_context("spawn")
    threads = max(1, (os.cpu_count() or 1) // workers)
    procs = [
        ctx.Process(target=_worker_main, args=(job, share, i, threads), name=f"worker{i}")
        for i, share in enumerate(split_trials(n_trials, workers))
        if share > 0
    ]
    for p in procs:
        p.start()
    bar = _bar(n_trials, job.progress)
    try:
        while any(p.is_alive() for p in procs):
            time.sleep(0.5)
            if bar is not None:
                bar.n = min(_count_finished(study, start), n_trials)
                bar.refresh()
    except KeyboardInterrupt:
        for p in procs:
            p.join(timeout=30)
        raise
    finally:
        if bar is not None:
            bar.close()
    for p in procs:
        p.join()
    bad = [f"{p.name} (exit {p.exitcode})" for p in procs if p.exitcode != 0]
    if bad:
        raise InvtractError(f"worker processes failed: {', '.join(bad)}")
    return study


def _bar(total: int, show: bool):
    if not show:
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        return None
    return tqdm(total=total, unit="trial", desc="calibrate", disable=None, file=sys.stderr)
