"""Optuna outer search over tracking (or fit) parameters, the library of ``invtract calibrate``.

Pieces, from the inside out:

* :class:`SearchSpace` / :func:`load_space`: a TOML file in ``configs/search/`` mapping config
  names to distributions (``[params.NAME] type/low/high/log/step/choices``), plus the sampler,
  pruner, heartbeat (``[study]``), score (``[loss]``) and hybrid fit settings (``[hybrid]``).
* :class:`CalibrationProblem` / :func:`load_problem`: the FOD, the target bundle, one seed per
  target streamline (exact tckgen seeds from ``-output_seeds``, or each streamline's midpoint and
  local direction) and the fixed tracking parameters; :meth:`CalibrationProblem.evaluate` tracks
  once and scores (:mod:`invtract.fit.scoring`).
* :class:`Objective`: one Optuna trial. ``blackbox`` tracks once with the suggested values;
  ``hybrid`` runs a short gradient fit (``invtract.fit.optimise.fit``) from the suggested values
  and reports its loss every few iterations so that pruners stop bad trials early. A trial
  that raises an :class:`~invtract.errors.InvtractError` (e.g. ``FitDiverged``), a numeric or
  runtime error, or ends with a NaN/inf loss, returns NaN: Optuna records it as FAIL and the
  reason is kept in the trial's ``fail_reason`` user attribute. The study goes on.
* :func:`make_storage` / :func:`create_study`: an ``RDBStorage`` (SQLite in the run folder by
  default, PostgreSQL/MySQL for many machines) with a heartbeat, so that the running trial of a
  killed worker becomes FAIL after ``grace_period`` seconds; finished trials are never touched.
* :func:`run_search` / :func:`run_worker`: ``n_trials`` more trials on a study, split over
  ``workers`` local processes (``multiprocessing`` spawn); each runs ``study.optimize`` with its
  exact share, so a call adds exactly ``n_trials`` finished trials unless a worker dies.
* :func:`summarise_study` / :func:`write_outputs`: ``best.json``, ``trials.csv``,
  ``param_importance.png``, ``loss_vs_trial.png`` (written atomically).

Every trial writes TensorBoard scalars (``loss/total``, ``tracking/*``, ``param/*``,
``time/trial_s``) into ``<run>/tb/trial_NNNNN`` plus an hparams record, so TensorBoard's
HPARAMS tab compares trials.
"""

from __future__ import annotations

import csv
import dataclasses
import inspect
import io
import json
import logging
import math
import multiprocessing as mp
import os
import socket
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import optuna
import torch

from ..errors import ConfigError, FitDiverged, InvtractError
from ..io.seeds import midpoint_seeds
from ..params import TrackingParameters
from ..streamlines import Streamlines
from .optimise import read_toml
from .scoring import Score, ScoreConfig, score_tracking

__all__ = [
    "TRACKING_NAMES",
    "ParamSpec",
    "SearchSpace",
    "load_space",
    "CalibrationProblem",
    "load_problem",
    "Objective",
    "load_fit",
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

log = logging.getLogger(__name__)

#: config names that are :class:`~invtract.params.TrackingParameters` fields
TRACKING_NAMES = (
    "step_mm",
    "angle_deg",
    "cutoff",
    "min_length_mm",
    "max_length_mm",
    "rk4",
    "downsample",
)

#: errors inside a trial that make it FAIL (with its reason) instead of stopping the study
_TRIAL_ERRORS = (InvtractError, ArithmeticError, RuntimeError, MemoryError)

_FINISHED = (
    optuna.trial.TrialState.COMPLETE,
    optuna.trial.TrialState.PRUNED,
    optuna.trial.TrialState.FAIL,
)


# ------------------------------------------------------------------------------------------
# search space
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ParamSpec:
    """One searched parameter.

    Attributes:
        name: config name (a :data:`TRACKING_NAMES` entry, or a fit keyword in hybrid mode).
        type: ``"float"``, ``"int"`` or ``"categorical"``.
        low, high: bounds (inclusive) for ``float`` / ``int``, in the parameter's unit.
        log: sample on a log scale (``low > 0``).
        step: grid step for ``float`` / ``int`` (not with ``log``).
        choices: the values of a ``categorical``.
    """

    name: str
    type: str = "float"
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple = ()

    @classmethod
    def from_dict(cls, name: str, d: Mapping) -> ParamSpec:
        """Validate one ``[params.NAME]`` table."""
        d = dict(d)
        unknown = sorted(set(d) - {"type", "low", "high", "log", "step", "choices"})
        if unknown:
            raise ConfigError(f"[params.{name}]: unknown keys {unknown}")
        kind = d.get("type", "categorical" if "choices" in d else "float")
        if kind not in ("float", "int", "categorical"):
            raise ConfigError(f"[params.{name}] type must be float, int or categorical: {kind!r}")
        if kind == "categorical":
            choices = tuple(d.get("choices", ()))
            if not choices:
                raise ConfigError(f"[params.{name}] categorical needs a non-empty 'choices'")
            return cls(name, kind, choices=choices)
        try:
            low, high = float(d["low"]), float(d["high"])
        except KeyError as err:
            raise ConfigError(f"[params.{name}] needs 'low' and 'high'") from err
        log_ = bool(d.get("log", False))
        step = d.get("step")
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            raise ConfigError(f"[params.{name}] needs finite low < high, got {low}, {high}")
        if log_ and low <= 0:
            raise ConfigError(f"[params.{name}] log scale needs low > 0, got {low}")
        if log_ and step is not None:
            raise ConfigError(f"[params.{name}] 'step' and 'log' cannot be combined")
        if kind == "int":
            if low != int(low) or high != int(high):
                raise ConfigError(f"[params.{name}] int bounds must be integers")
            step = int(step) if step is not None else 1
        return cls(name, kind, low, high, log_, step)

    def suggest(self, trial: optuna.Trial):
        """Draw this parameter in ``trial``."""
        if self.type == "categorical":
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.type == "int":
            return trial.suggest_int(
                self.name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log
            )
        return trial.suggest_float(self.name, self.low, self.high, step=self.step, log=self.log)

    def to_dict(self) -> dict:
        """The ``[params.NAME]`` table."""
        if self.type == "categorical":
            return {"type": "categorical", "choices": list(self.choices)}
        d = {"type": self.type, "low": self.low, "high": self.high, "log": self.log}
        if self.step is not None:
            d["step"] = self.step
        return d


@dataclass(frozen=True)
class SearchSpace:
    """A search-space file: parameters, study settings, score and hybrid settings.

    Attributes:
        name: the file stem (``sd_stream``).
        params: config name -> :class:`ParamSpec`, in file order.
        study: the ``[study]`` table (``mode``, ``sampler``, ``sampler_options``, ``pruner``,
            ``pruner_options``, ``patience``, ``heartbeat_interval``, ``grace_period``).
        loss: the ``[loss]`` table.
        hybrid: the ``[hybrid]`` table (``steps``, ``report_every``, ``learn``, ``fixed``).
        path: the file it came from.
    """

    name: str
    params: dict[str, ParamSpec]
    study: dict = field(default_factory=dict)
    loss: ScoreConfig = field(default_factory=ScoreConfig)
    hybrid: dict = field(default_factory=dict)
    path: str | None = None

    _STUDY_KEYS = (
        "mode",
        "sampler",
        "sampler_options",
        "pruner",
        "pruner_options",
        "patience",
        "heartbeat_interval",
        "grace_period",
    )
    _HYBRID_KEYS = ("steps", "report_every", "learn", "fixed")

    @classmethod
    def from_dict(cls, d: Mapping, name: str = "space", path: str | None = None) -> SearchSpace:
        """Validate a parsed TOML document."""
        where = path or name
        unknown = sorted(set(d) - {"params", "study", "loss", "hybrid"})
        if unknown:
            raise ConfigError(f"{where}: unknown tables {unknown} (params, study, loss, hybrid)")
        raw = d.get("params") or {}
        if not raw:
            raise ConfigError(f"{where}: no [params.NAME] tables: nothing to search")
        params = {k: ParamSpec.from_dict(k, v) for k, v in raw.items()}
        study = dict(d.get("study") or {})
        bad = sorted(set(study) - set(cls._STUDY_KEYS))
        if bad:
            raise ConfigError(f"{where}: [study] unknown keys {bad}; known: {cls._STUDY_KEYS}")
        if study.get("mode", "blackbox") not in ("blackbox", "hybrid"):
            raise ConfigError(f"{where}: [study] mode must be blackbox or hybrid")
        hybrid = dict(d.get("hybrid") or {})
        bad = sorted(set(hybrid) - set(cls._HYBRID_KEYS))
        if bad:
            raise ConfigError(f"{where}: [hybrid] unknown keys {bad}; known: {cls._HYBRID_KEYS}")
        for key in ("steps", "report_every"):
            if key in hybrid and int(hybrid[key]) < 1:
                raise ConfigError(f"{where}: [hybrid] {key} must be >= 1")
        loss = ScoreConfig.from_dict(d.get("loss"))
        return cls(name, params, study, loss, hybrid, path)

    @property
    def mode(self) -> str:
        """The space's default mode (``[study] mode``, default ``blackbox``)."""
        return self.study.get("mode", "blackbox")

    def suggest(self, trial: optuna.Trial) -> dict:
        """Draw every parameter: config name -> value."""
        return {name: spec.suggest(trial) for name, spec in self.params.items()}

    def check_mode(self, mode: str) -> None:
        """Raise :class:`ConfigError` if the parameters cannot be used in ``mode``."""
        if mode == "blackbox":
            other = [n for n in self.params if n not in TRACKING_NAMES]
            if other:
                raise ConfigError(
                    f"{self.path or self.name}: blackbox mode can only search tracking "
                    f"parameters {TRACKING_NAMES}; got {other} (fit hyper-parameters need "
                    "--mode hybrid)"
                )
        elif mode != "hybrid":
            raise ConfigError(f"mode must be 'blackbox' or 'hybrid', got {mode!r}")

    def to_dict(self) -> dict:
        """The space as a TOML-able document."""
        return {
            "study": dict(self.study),
            "loss": self.loss.to_dict(),
            "hybrid": dict(self.hybrid),
            "params": {k: v.to_dict() for k, v in self.params.items()},
        }


def load_space(spec: str | os.PathLike) -> SearchSpace:
    """Load a search space from a path, or a bare name looked up in ``configs/search/``.

    Args:
        spec: ``configs/search/sd_stream.toml``, ``configs/search/sd_stream`` or
            ``sd_stream`` (searched in ``./configs/search`` then the bundled spaces).

    Returns:
        The validated :class:`SearchSpace`.

    Raises:
        ConfigError: file not found, not TOML, or invalid.
    """
    from ..configs import find_config

    path = find_config(spec, sub="search", what="search space")
    doc = read_toml(path)
    name = path.name[: -len(".toml")] if path.name.endswith(".toml") else path.name
    return SearchSpace.from_dict(doc, name=name, path=str(path.resolve()))


# ------------------------------------------------------------------------------------------
# the problem: FOD + target + seeds
# ------------------------------------------------------------------------------------------
@dataclass
class CalibrationProblem:
    """What a trial needs: FOD, paired target, seeds, fixed parameters and score.

    Attributes:
        field: the FOD field.
        voxel_sizes: FOD voxel sizes (mm), to resolve tckgen's defaults.
        seed_positions: ``[S, 3]`` seeds (scanner mm), seed ``i`` paired with ``target[i]``.
        seed_directions: ``[S, 3]`` initial directions.
        target: ``S`` target streamlines (mm).
        fixed: parameters that are not searched (None fields = tckgen defaults).
        score: the score configuration.
        engine: tracking engine (``auto``, ``torch``, ``numba``).
    """

    field: object
    voxel_sizes: tuple
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
                voxel_sizes=self.voxel_sizes,
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
    changes = {}
    for key, name in (("min_dist", "min_length_mm"), ("max_dist", "max_length_mm")):
        if getattr(fixed, name) is None and key in header:
            try:
                changes[name] = float(header[key])
            except ValueError:
                pass
    if not fixed.rk4 and str(header.get("rk4", "0")).strip() == "1":
        changes["rk4"] = True
    if changes:
        log.info("from the target header: %s", changes)
    return fixed.replace(**changes)


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
    fld = FODField.from_array(img.data, img.affine)
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
        tuple(float(v) for v in img.voxel_sizes),
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
def load_fit() -> Callable:
    """``invtract.fit.optimise.fit``, or :class:`ConfigError` if the module is absent."""
    try:
        from .optimise import fit  # type: ignore[import-not-found]
    except ImportError as err:
        raise ConfigError("hybrid mode needs invtract fit (not available yet)") from err
    return fit


def _call_fit(fit_fn: Callable, problem: CalibrationProblem, init, kwargs: dict):
    """Call ``fit_fn(field, target, init, **kwargs)``, dropping keywords it does not take.

    The hybrid hook's contract with the fit module: ``fit(fod, target, params, *, seeding,
    steps, on_step, logger, learn, score, **hyper_parameters)`` returning an object with
    ``best_loss`` (or a number). ``on_step(step, loss, ...)`` is called after each iteration.
    """
    sig = inspect.signature(fit_fn)
    takes_any = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
    if not takes_any:
        dropped = sorted(k for k in kwargs if k not in sig.parameters)
        if dropped:
            log.debug("fit() does not take %s; not passed", dropped)
        kwargs = {k: v for k, v in kwargs.items() if k in sig.parameters}
    return fit_fn(problem.field, problem.target, init, **kwargs)


class Objective:
    """One Optuna trial: suggest -> track (or fit) -> score.

    Args:
        problem: the calibration problem.
        space: the search space.
        mode: ``"blackbox"`` or ``"hybrid"``.
        tb_dir: folder for per-trial TensorBoard runs (``None``: no TensorBoard).
        fit_fn: hybrid mode's fit function (default :func:`load_fit`).

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
        if mode == "hybrid" and fit_fn is None:
            self.fit_fn = load_fit()

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

        def on_step(step: int, loss, *args, **kwargs) -> None:
            loss = float(loss)
            trial.set_user_attr("forward_passes", int(step) + 1)
            trial.set_user_attr("last_loss", loss)
            if writer is not None:
                writer.add_scalar("loss/total", loss, step)
            if not math.isfinite(loss):
                raise FitDiverged(f"loss {loss} at iteration {step}")
            if step % every == 0 or step == steps - 1:
                trial.report(loss, step)
                if trial.should_prune():
                    raise optuna.TrialPruned(f"pruned at iteration {step} (loss {loss:.4g})")

        kwargs = dict(
            seeding=self.problem.seeding(),
            steps=steps,
            on_step=on_step,
            logger=writer,
            score=self.problem.score,
            voxel_sizes=self.problem.voxel_sizes,
            **({"learn": tuple(hy["learn"])} if "learn" in hy else {}),
            **hyper,
        )
        result = _call_fit(self.fit_fn, self.problem, init, kwargs)
        loss = getattr(result, "best_loss", result)
        return float(loss)

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
# storage, sampler, pruner, study
# ------------------------------------------------------------------------------------------
def default_storage_url(run_dir: str | os.PathLike) -> str:
    """``sqlite:///<run_dir>/study.db`` (absolute path)."""
    return f"sqlite:///{Path(run_dir).resolve() / 'study.db'}"


def _stale_trial_logged(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    log.warning(
        "trial %d had no heartbeat (its worker died or was killed): marked FAIL", trial.number
    )


def make_storage(
    url: str, *, heartbeat_interval: int | None = 10, grace_period: int | None = None
) -> optuna.storages.RDBStorage:
    """An Optuna ``RDBStorage`` with a heartbeat.

    Args:
        url: SQLAlchemy URL (``sqlite:///path/study.db``,
            ``postgresql+psycopg2://user@host:port/db``, ``mysql+pymysql://...``).
        heartbeat_interval: seconds between heartbeats of a running trial (None: off).
        grace_period: seconds without heartbeat after which a running trial is failed
            (default ``2 * heartbeat_interval``).

    Returns:
        The storage (tables created if needed).

    Raises:
        ConfigError: not a database URL, or the database cannot be reached.
    """
    if "://" not in url:
        raise ConfigError(f"--storage must be a database URL (sqlite:///..., postgresql://...), "
                          f"got {url!r}")  # fmt: skip
    kwargs: dict = {}
    if url.startswith("sqlite"):
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 120}}
    else:
        kwargs["engine_kwargs"] = {"pool_pre_ping": True}
    if heartbeat_interval:
        kwargs["heartbeat_interval"] = int(heartbeat_interval)
        kwargs["grace_period"] = int(grace_period) if grace_period else None
        params = inspect.signature(optuna.storages.RDBStorage).parameters
        cb = "heartbeat_stale_trial_callback"
        kwargs[cb if cb in params else "failed_trial_callback"] = _stale_trial_logged
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.simplefilter("ignore", FutureWarning)
        try:
            return optuna.storages.RDBStorage(url, **kwargs)
        except ImportError as err:
            raise ConfigError(f"storage {url!r} needs a database driver: {err}") from err
        except Exception as err:  # sqlalchemy OperationalError and friends
            if type(err).__module__.startswith("sqlalchemy"):
                raise ConfigError(f"cannot open storage {_redact(url)}: {err}") from err
            raise


def _redact(url: str) -> str:
    head, sep, tail = url.partition("://")
    if "@" in tail and ":" in tail.split("@", 1)[0]:
        user = tail.split("@", 1)[0].split(":", 1)[0]
        return f"{head}{sep}{user}:***@{tail.split('@', 1)[1]}"
    return url


def build_sampler(study_cfg: Mapping, seed: int | None = None) -> optuna.samplers.BaseSampler:
    """Sampler from ``[study] sampler`` (``tpe`` default, ``random``, ``qmc``, ``gp``,
    ``cmaes``) and ``sampler_options``; seeded with ``seed``."""
    name = study_cfg.get("sampler", "tpe")
    opts = dict(study_cfg.get("sampler_options") or {})
    table = {
        "tpe": optuna.samplers.TPESampler,
        "random": optuna.samplers.RandomSampler,
        "qmc": optuna.samplers.QMCSampler,
        "gp": getattr(optuna.samplers, "GPSampler", None),
        "cmaes": optuna.samplers.CmaEsSampler,
    }
    cls = table.get(name)
    if cls is None:
        raise ConfigError(f"[study] sampler must be one of {sorted(table)}, got {name!r}")
    if name == "tpe":
        opts.setdefault("constant_liar", True)  # parallel workers do not all pick one point
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        try:
            return cls(seed=seed, **opts)
        except TypeError as err:
            raise ConfigError(f"[study] sampler_options for {name}: {err}") from err


def build_pruner(study_cfg: Mapping) -> optuna.pruners.BasePruner:
    """Pruner from ``[study] pruner`` (``median`` default, ``hyperband``, ``percentile``,
    ``successive_halving``, ``none``) and ``pruner_options``, wrapped in
    ``PatientPruner`` when ``patience`` is set."""
    name = study_cfg.get("pruner", "median")
    opts = dict(study_cfg.get("pruner_options") or {})
    table = {
        "median": optuna.pruners.MedianPruner,
        "hyperband": optuna.pruners.HyperbandPruner,
        "percentile": optuna.pruners.PercentilePruner,
        "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
        "none": optuna.pruners.NopPruner,
    }
    cls = table.get(name)
    if cls is None:
        raise ConfigError(f"[study] pruner must be one of {sorted(table)}, got {name!r}")
    try:
        pruner = cls(**opts)
    except TypeError as err:
        raise ConfigError(f"[study] pruner_options for {name}: {err}") from err
    if study_cfg.get("patience") is not None:
        pruner = optuna.pruners.PatientPruner(pruner, patience=int(study_cfg["patience"]))
    return pruner


def create_study(
    storage: optuna.storages.BaseStorage | str,
    study_name: str,
    space: SearchSpace,
    *,
    seed: int | None = None,
    worker: int = 0,
    mode: str | None = None,
) -> optuna.Study:
    """Create or load (``load_if_exists``) a minimising study with the space's sampler/pruner.

    The sampler seed is ``seed + 7919 * worker + (trials already in the study)``: one worker
    on a fresh study is reproducible, workers differ, and a resumed study does not replay the
    first suggestions. The study records ``mode`` and the space; loading a study made in
    another mode raises :class:`ConfigError`.
    """
    mode = mode or space.mode
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study = optuna.create_study(
            storage=storage,
            study_name=study_name,
            direction="minimize",
            pruner=build_pruner(space.study),
            load_if_exists=True,
        )
    n = len(study.get_trials(deepcopy=False))
    if seed is not None:
        study.sampler = build_sampler(space.study, int(seed) + 7919 * int(worker) + n)
    else:
        study.sampler = build_sampler(space.study, None)
    attrs = study.user_attrs
    if "mode" in attrs and attrs["mode"] != mode:
        raise ConfigError(
            f"study {study_name!r} was made in {attrs['mode']} mode; cannot add {mode} trials "
            "(use another --study)"
        )
    if "mode" not in attrs:
        study.set_user_attr("mode", mode)
        study.set_user_attr("space", space.to_dict())
    return study


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
    if job.mode == "hybrid":
        load_fit()
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


def _atomic_write(path: Path, data: bytes | str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    mode = "wb" if isinstance(data, bytes) else "w"
    with open(tmp, mode, **({} if isinstance(data, bytes) else {"encoding": "utf-8"})) as f:
        f.write(data)
    os.replace(tmp, path)


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return repr(float(v)) if isinstance(v, float) and not math.isfinite(v) else repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, Mapping):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(x)}" for k, x in v.items()) + "}"
    return json.dumps(str(v))


def _toml_key(k: str) -> str:
    return k if k.replace("_", "").replace("-", "").isalnum() else json.dumps(k)


def _to_toml(doc: Mapping, prefix: str = "") -> str:
    """A small TOML writer for nested tables of scalars and lists (``None`` is skipped)."""
    lines = [f"[{prefix}]"] if prefix else []
    tables = []
    for k, v in doc.items():
        if isinstance(v, Mapping):
            tables.append((k, v))
        elif v is not None:
            lines.append(f"{_toml_key(k)} = {_toml_value(v)}")
    text = "\n".join(lines)
    for k, v in tables:
        name = f"{prefix}.{_toml_key(k)}" if prefix else _toml_key(k)
        text += "\n\n" + _to_toml(v, name)
    return text.strip("\n") + "\n"


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
    _atomic_write(run_dir / "config.toml", _to_toml(doc))
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
    _atomic_write(paths["best"], json.dumps(best, indent=2, default=str) + "\n")
    header, rows = _trial_rows(study)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows([["" if v is None else v for v in r] for r in rows])
    _atomic_write(paths["trials"], buf.getvalue())
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
    _atomic_write(path, buf.getvalue())
    return path
