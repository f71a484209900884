"""Optuna studies of ``invtract calibrate``: storage (SQLite, PostgreSQL, with a heartbeat),
sampler and pruner from ``[study]``, and study creation / resumption."""

from __future__ import annotations

import inspect
import logging
import os
import warnings
from collections.abc import Mapping
from pathlib import Path

import optuna

from ..errors import ConfigError
from .search_space import SearchSpace

log = logging.getLogger(__name__)

_FINISHED = (
    optuna.trial.TrialState.COMPLETE,
    optuna.trial.TrialState.PRUNED,
    optuna.trial.TrialState.FAIL,
)


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
    table = {
        "tpe": optuna.samplers.TPESampler,
        "random": optuna.samplers.RandomSampler,
        "qmc": optuna.samplers.QMCSampler,
        "gp": getattr(optuna.samplers, "GPSampler", None),
        "cmaes": optuna.samplers.CmaEsSampler,
    }
    extra = {"constant_liar": True} if study_cfg.get("sampler", "tpe") == "tpe" else {}
    # constant_liar: parallel TPE workers do not all pick one point
    return _from_table(study_cfg, "sampler", "tpe", table, seed=seed, defaults=extra)


def _from_table(study_cfg: Mapping, kind: str, default: str, table: Mapping, *, defaults=None,
                **kwargs):  # fmt: skip
    """``table[study_cfg[kind]](**kwargs, **study_cfg[kind + "_options"])`` with one-line
    ConfigErrors for an unknown name or bad options (``defaults``: options set unless given)."""
    name = study_cfg.get(kind, default)
    opts = {**(defaults or {}), **dict(study_cfg.get(f"{kind}_options") or {})}
    cls = table.get(name)
    if cls is None:
        raise ConfigError(f"[study] {kind} must be one of {sorted(table)}, got {name!r}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        try:
            return cls(**kwargs, **opts)
        except TypeError as err:
            raise ConfigError(f"[study] {kind}_options for {name}: {err}") from err


def build_pruner(study_cfg: Mapping) -> optuna.pruners.BasePruner:
    """Pruner from ``[study] pruner`` (``median`` default, ``hyperband``, ``percentile``,
    ``successive_halving``, ``none``) and ``pruner_options``, wrapped in
    ``PatientPruner`` when ``patience`` is set."""
    table = {
        "median": optuna.pruners.MedianPruner,
        "hyperband": optuna.pruners.HyperbandPruner,
        "percentile": optuna.pruners.PercentilePruner,
        "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
        "none": optuna.pruners.NopPruner,
    }
    pruner = _from_table(study_cfg, "pruner", "median", table)
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
