"""Search spaces of ``invtract calibrate``: :class:`SearchSpace` / :func:`load_space` read a TOML
file in ``configs/search/`` mapping config names to Optuna distributions, plus the ``[study]``,
``[loss]`` and ``[hybrid]`` settings."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import optuna

from ..errors import ConfigError
from .config import read_toml
from .scoring import ScoreConfig

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
