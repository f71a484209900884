"""Scores for black-box calibration: how far a tracked bundle is from a target bundle.

The calibration tracks one streamline per target seed, so the natural score is *paired*:
tracked streamline ``i`` (from seed ``i``) against target streamline ``i``. A seed that yields
no streamline (rejected as too short, or invalid) is charged a penalty, so that "track nothing"
never looks good. All distances are scanner mm. Scores are plain floats (no gradients): the
gradient fit uses :mod:`invtract.losses` directly.

Scores (``[loss] name`` in a search-space file):

* ``paired_mdf`` (default): mean over seeds of MDF(tracked_i, target_i) (both resampled to
  ``n_points``; min of direct/flipped), a missing streamline counting ``missing_penalty``.
* ``paired_loss``: :func:`invtract.losses.paired_loss` (MDF + ``coverage_weight`` x uncovered
  fraction), same penalty for missing streamlines.
* ``chamfer``: :func:`invtract.losses.chamfer_loss` between the tracked and target sets (no
  pairing), plus ``missing_weight`` x the fraction of seeds without a streamline.
* ``length``: :func:`invtract.losses.length_loss` (W1 of the length histograms, mm), plus the
  same missing-fraction term.

``missing_penalty = "seed"`` (default) charges a missing streamline the MDF between its target
and a streamline collapsed onto its seed point: the score of a zero-length streamline, so the
score stays continuous as streamlines shrink below the minimum length. A number charges that
many mm instead.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import ConfigError
from ..streamlines import Streamlines

__all__ = ["SCORES", "ScoreConfig", "Score", "score_tracking"]

#: score names accepted in ``[loss] name``
SCORES = ("paired_mdf", "paired_loss", "chamfer", "length")


@dataclass(frozen=True)
class ScoreConfig:
    """The ``[loss]`` table of a search-space file.

    Attributes:
        name: one of :data:`SCORES`.
        n_points: points per streamline after arc-length resampling.
        missing_penalty: ``"seed"`` or a distance in mm charged per seed with no streamline
            (paired scores).
        missing_weight: mm charged per unit fraction of seeds without a streamline
            (``chamfer``, ``length``).
        coverage_weight: ``paired_loss`` only: mm per unit uncovered fraction.
        radius_mm: ``paired_loss`` only: coverage radius (mm).
    """

    name: str = "paired_mdf"
    n_points: int = 20
    missing_penalty: str | float = "seed"
    missing_weight: float = 10.0
    coverage_weight: float = 1.0
    radius_mm: float = 1.0

    @classmethod
    def from_dict(cls, d: Mapping | None) -> ScoreConfig:
        """Validate and build from a ``[loss]`` table (``None`` = defaults)."""
        from .config import table_fields

        cfg = cls(**table_fields(cls, d, "loss"))
        if cfg.name not in SCORES:
            raise ConfigError(f"[loss] name must be one of {SCORES}, got {cfg.name!r}")
        if int(cfg.n_points) < 2:
            raise ConfigError(f"[loss] n_points must be >= 2, got {cfg.n_points}")
        mp = cfg.missing_penalty
        if isinstance(mp, str):
            if mp != "seed":
                raise ConfigError(f"[loss] missing_penalty must be 'seed' or mm, got {mp!r}")
        elif not (isinstance(mp, (int, float)) and math.isfinite(mp) and mp >= 0):
            raise ConfigError(f"[loss] missing_penalty must be 'seed' or >= 0 mm, got {mp!r}")
        return cfg

    def to_dict(self) -> dict:
        """The table as written in a config file."""
        return {
            "name": self.name,
            "n_points": int(self.n_points),
            "missing_penalty": self.missing_penalty,
            "missing_weight": float(self.missing_weight),
            "coverage_weight": float(self.coverage_weight),
            "radius_mm": float(self.radius_mm),
        }


@dataclass
class Score:
    """Result of :func:`score_tracking`.

    Attributes:
        loss: the score (mm); NaN/inf only if the inputs were non-finite.
        n_seeds: number of seeds (= target streamlines).
        n_missing: seeds that produced no streamline.
        mean_length_mm: mean length of the tracked streamlines (0 if none).
    """

    loss: float
    n_seeds: int
    n_missing: int
    mean_length_mm: float


def _paired_terms(
    tracked: Streamlines,
    seed_ids: np.ndarray,
    target: Streamlines,
    seed_points: np.ndarray,
    cfg: ScoreConfig,
) -> torch.Tensor:
    """``[S]`` per-seed distances, missing seeds charged their penalty."""
    from ..losses import paired_loss, paired_mdf, resample

    n = int(cfg.n_points)
    S = len(target)
    tgt = resample(target.to(dtype=torch.float64), n)  # [S, n, 3]
    per = torch.empty(S, dtype=torch.float64)
    have = np.zeros(S, bool)
    have[seed_ids] = True
    if len(tracked):
        tr = tracked.to(dtype=torch.float64)
        sub = target.select(torch.as_tensor(seed_ids)).to(dtype=torch.float64)
        if cfg.name == "paired_loss":
            d = paired_loss(
                tr, sub, n, coverage_weight=cfg.coverage_weight, radius_mm=cfg.radius_mm,
                temperature_mm=0.0, reduction="none",
            )  # fmt: skip
        else:
            d = paired_mdf(resample(tr, n), tgt[torch.as_tensor(seed_ids)], n)
        per[torch.as_tensor(seed_ids)] = d.detach()
    miss = ~have
    if miss.any():
        if cfg.missing_penalty == "seed":
            sp = torch.as_tensor(seed_points[miss], dtype=torch.float64)[:, None, :]
            pen = (tgt[torch.as_tensor(miss)] - sp).norm(dim=-1).mean(-1)
            if cfg.name == "paired_loss":
                pen = pen + cfg.coverage_weight
        else:
            pen = torch.full((int(miss.sum()),), float(cfg.missing_penalty), dtype=torch.float64)
        per[torch.as_tensor(miss)] = pen
    return per


@torch.no_grad()
def score_tracking(
    tracked: Streamlines,
    seed_ids: np.ndarray,
    target: Streamlines,
    seed_points: np.ndarray,
    cfg: ScoreConfig | None = None,
) -> Score:
    """Score a tracking run against the target bundle it was seeded from.

    Args:
        tracked: accepted streamlines (scanner mm), in seed order.
        seed_ids: ``[T]`` index of the seed each tracked streamline came from (into
            ``target`` / ``seed_points``).
        target: ``S`` target streamlines, target ``i`` paired with seed ``i`` (mm).
        seed_points: ``[S, 3]`` seed positions (mm), for the missing-streamline penalty.
        cfg: the score to compute (default: paired MDF, 20 points, seed penalty).

    Returns:
        :class:`Score`.
    """
    cfg = cfg or ScoreConfig()
    seed_ids = np.asarray(seed_ids, np.int64)
    S = len(target)
    n_missing = S - len(np.unique(seed_ids))
    mean_len = _mean_len(tracked) if len(tracked) else 0.0
    if S == 0:
        raise ConfigError("the target bundle has no streamlines")
    if cfg.name in ("paired_mdf", "paired_loss"):
        loss = float(_paired_terms(tracked, seed_ids, target, seed_points, cfg).mean())
    else:
        from ..losses import chamfer_loss, length_loss

        missing = cfg.missing_weight * n_missing / S
        if len(tracked) == 0:
            return Score(float("inf"), S, n_missing, 0.0)
        a, b = tracked.to(dtype=torch.float64), target.to(dtype=torch.float64)
        if cfg.name == "chamfer":
            base = chamfer_loss(a, b, int(cfg.n_points), temperature_mm=0.0)
        else:
            base = length_loss(a, b)
        loss = float(base) + missing
    return Score(loss, S, n_missing, mean_len)


def _mean_len(sl: Streamlines) -> float:
    from ..losses import arc_lengths

    return float(arc_lengths(sl.to(dtype=torch.float64)).mean())
