"""The tracking front door: seeding with tckgen's semantics, chunked engine runs, a summary.

``track(fod, seeding, params, ...)`` reproduces ``tckgen -algorithm SD_Stream`` (single-threaded,
``MRTRIX_RNG_SEED=rng_seed``) for the seeding mechanisms of :class:`Seeding`, on an
:class:`~invtract.fod.field.FODField`, and returns :class:`~invtract.streamlines.Streamlines`.
The seeding and selection rules themselves are in :mod:`invtract.tracking.runner` (torch-free).
Positions are scanner mm (RAS+).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import ConfigError
from ..fod.field import FODField
from ..params import ResolvedParameters, TrackingParameters
from ..streamlines import Streamlines
from .engines import run_engine
from .runner import SeedChecker, Seeding, default_engine, run_seeding, seed_vertices
from .types import RoiSet

__all__ = ["Seeding", "TrackingResult", "track", "SeedChecker"]


@dataclass
class TrackingResult:
    """Output of :func:`track`.

    Attributes:
        streamlines: accepted streamlines (scanner mm), in seed order.
        seed_index: ``[S]`` index of the seed vertex in each streamline.
        seed_ids: ``[S]`` index of the seed (in generation order) each streamline came from.
        params: resolved parameters used.
        summary: counts in MRtrix's categories (see :func:`summarise`).
        engine: the engine name used.
    """

    streamlines: Streamlines
    seed_index: np.ndarray
    seed_ids: np.ndarray
    params: ResolvedParameters
    summary: dict
    engine: str
    header: dict = field(default_factory=dict)

    @property
    def seed_points(self) -> np.ndarray:
        """``[S, 3]`` the seed vertex of each streamline (scanner mm)."""
        points = self.streamlines.points.detach().cpu().numpy()
        return seed_vertices(points, self.streamlines.lengths.cpu().numpy(), self.seed_index)


def track(
    fod: FODField,
    seeding: Seeding,
    params: TrackingParameters | ResolvedParameters,
    *,
    voxel_sizes=None,
    rois: RoiSet | None = None,
    engine: str = "auto",
    select: int | None = None,
    max_seeds: int | None = None,
    rng_seed: int | None = None,
    batch_size: int = 4096,
    progress: Callable[[int, int], None] | None = None,
    act=None,
) -> TrackingResult:
    """Track streamlines as ``tckgen -algorithm SD_Stream -nthreads 0`` does.

    Args:
        fod: the FOD field (scanner-frame SH, MRtrix3 basis).
        seeding: the seed mechanism.
        params: tracking parameters (resolved with ``voxel_sizes`` when not yet resolved).
        voxel_sizes: the FOD voxel sizes (mm), needed to resolve defaults.
        rois: include / exclude / mask regions.
        engine: ``"auto"`` (fastest for the device), ``"torch"`` or ``"numba"``.
        select: stop once this many streamlines are accepted (infinite seeders; tckgen default
            5000). Ignored for finite seeders, which track every seed.
        max_seeds: stop after this many seeds (tckgen ``-seeds``; default 1000 x select).
        rng_seed: seed of the MRtrix-compatible random stream (``MRTRIX_RNG_SEED``); random
            when None.
        batch_size: seeds per engine call.
        progress: called as ``progress(seeds_done, selected)``.
        act: anatomically-constrained tracking (``-act``): an
            :class:`~invtract.tracking.act.ActImage`. Unresolved ``params`` then get ACT's
            defaults (cutoff x 0.5, minimum length 2 x voxel); tracked by the numba engine.

    Returns:
        A :class:`TrackingResult`.
    """
    if act is not None:
        engine = _act_engine(engine)
        if isinstance(params, TrackingParameters) and voxel_sizes is not None:
            from .act import act_parameters

            params = act_parameters(params, voxel_sizes)
    if isinstance(params, TrackingParameters):
        if voxel_sizes is None:
            raise ConfigError("voxel_sizes is required to resolve tracking parameters")
        params = params.resolve(voxel_sizes)
    rois = rois or RoiSet()
    if engine == "auto":
        engine = default_engine(fod.device)
    sh = fod.sh_flat.detach().cpu().numpy().reshape(*fod.shape, -1)
    s2v = fod.scanner2voxel.cpu().numpy()
    extra, seed_check = {}, None
    if act is not None:
        from .act_cpu import act_seed_checker

        extra, seed_check = {"act": act}, act_seed_checker(sh, s2v, rois, act)
    out = run_seeding(
        sh,
        s2v,
        seeding,
        params,
        lambda pos, dirs: run_engine(engine, fod, pos, dirs, params, rois, **extra),
        seed_check=seed_check,
        rois=rois,
        select=select,
        max_seeds=max_seeds,
        rng_seed=rng_seed,
        batch_size=batch_size,
        progress=progress,
    )
    sl = Streamlines(torch.from_numpy(out.points), torch.from_numpy(out.lengths))
    return TrackingResult(
        streamlines=sl,
        seed_index=out.seed_index,
        seed_ids=out.seed_ids,
        params=params,
        summary=out.summary,
        engine=engine,
    )


def _act_engine(engine: str) -> str:
    """The engine that tracks with ACT: numba (the only one with the ACT rules so far)."""
    from .runner import numba_available

    if engine not in ("auto", "numba", "triton") or not numba_available():
        raise ConfigError(
            f"ACT (-act) is implemented in the numba engine only (asked: {engine!r}"
            + ("" if numba_available() else "; numba is not installed")
            + ")"
        )
    return "numba"
