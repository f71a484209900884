"""The tracking front door: seeding with tckgen's semantics, chunked engine runs, a summary.

``track(fod, seeding, params, ...)`` reproduces ``tckgen -algorithm SD_Stream`` (single-threaded,
``MRTRIX_RNG_SEED=rng_seed``) for the seeding mechanisms below. Positions are scanner mm (RAS+).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import ConfigError
from ..fod.field import FODField
from ..params import ResolvedParameters, TrackingParameters
from ..streamlines import Streamlines
from .rng import MRtrixRNG
from .seeding import MaskGrid, SeedImageSampler, grid_per_voxel, random_per_voxel
from .tracker import run_engine
from .types import (
    REJECT_NAMES,
    TERM_NAMES,
    EngineResult,
    Reject,
    RoiSet,
    Term,
    concat_results,
)

__all__ = ["Seeding", "TrackingResult", "track", "SeedChecker"]


@dataclass
class Seeding:
    """How seeds are generated (one mechanism per run, as tckgen's finite/infinite rules).

    Attributes:
        kind: ``"list"`` (explicit positions), ``"grid"`` (``-seed_grid_per_voxel``),
            ``"random_per_voxel"`` (``-seed_random_per_voxel``), ``"image"`` (``-seed_image``)
            or ``"sphere"`` (``-seed_sphere``).
        positions: ``[N, 3]`` scanner mm, for ``"list"``.
        directions: ``[N, 3]`` initial directions for ``"list"`` (optional).
        mask: ``[X, Y, Z]`` bool mask and ``affine`` ``[4, 4]`` for the mask-based kinds.
        count: grid points per axis (``grid``) or seeds per voxel (``random_per_voxel``).
        sphere: ``(x, y, z, r)`` mm for ``"sphere"``.
    """

    kind: str
    positions: np.ndarray | None = None
    directions: np.ndarray | None = None
    mask: np.ndarray | None = None
    affine: np.ndarray | None = None
    count: int = 1
    sphere: tuple | None = None

    @property
    def finite(self) -> bool:
        return self.kind in ("list", "grid", "random_per_voxel")


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
        if len(self.streamlines) == 0:
            return np.zeros((0, 3), np.float32)
        offs = self.streamlines.offsets.cpu().numpy()
        return self.streamlines.points.cpu().numpy()[offs + self.seed_index]


class SeedChecker:
    """Which seeds consume a random direction, decided before tracking (spec §4.2 step 1, 2.1):
    ``check_seed`` and "data at the seed", with the fused kernel's own rule
    (:class:`~invtract.tracking.fused_cpu.SeedTest`) whatever engine then tracks."""

    def __init__(self, field: FODField, rois: RoiSet) -> None:
        from .fused_cpu import SeedTest

        sh = field.sh_flat.detach().cpu().numpy().reshape(*field.shape, -1)
        self._test = SeedTest(sh, field.scanner2voxel.cpu().numpy(), rois)

    def __call__(self, p: np.ndarray) -> np.ndarray:
        return self._test(p)


def _seed_stream(seeding: Seeding, checker: SeedChecker, rng: MRtrixRNG, fixed_dir, chunk: int):
    """Yield ``(positions [n, 3], directions [n, 3])`` chunks in tckgen's draw order."""

    def direction_for(ok: bool):
        if fixed_dir is not None:
            return fixed_dir
        if not ok:
            return np.full(3, np.nan, np.float32)
        return rng.direction()

    if seeding.kind in ("list", "grid"):
        if seeding.kind == "grid":
            grid = MaskGrid.from_image(seeding.mask, seeding.affine)
            pos = grid_per_voxel(grid, seeding.count)
            given = None
        else:
            pos = np.asarray(seeding.positions, np.float32).reshape(-1, 3)
            given = seeding.directions
        for start in range(0, pos.shape[0], chunk):
            p = pos[start : start + chunk]
            if given is not None:
                d = np.asarray(given[start : start + chunk], np.float32)
            elif fixed_dir is not None:
                d = np.broadcast_to(fixed_dir, p.shape).astype(np.float32)
            else:  # one random direction per seed that passes the checks, in seed order
                ok = checker(p)
                d = np.full(p.shape, np.nan, np.float32)
                d[ok] = rng.directions(int(ok.sum()))
            yield p, d
        return
    if seeding.kind == "random_per_voxel":
        grid = MaskGrid.from_image(seeding.mask, seeding.affine)
        gen = random_per_voxel(grid, seeding.count, rng)
        done = False
        while not done:
            ps, ds = [], []
            for _ in range(chunk):
                try:
                    p = next(gen)
                except StopIteration:
                    done = True
                    break
                ps.append(p)
                ds.append(direction_for(bool(checker(p[None])[0])))
            if ps:
                yield np.stack(ps), np.stack(ds)
        return
    if seeding.kind in ("image", "sphere"):
        if seeding.kind == "image":
            sampler = SeedImageSampler(MaskGrid.from_image(seeding.mask, seeding.affine), rng)
            draw = sampler.next
        else:
            cx, cy, cz, r = (np.float32(v) for v in seeding.sphere)
            centre = np.array([cx, cy, cz], np.float32)

            def draw():
                while True:
                    q = np.array(
                        [np.float32(2) * rng.uniform() - np.float32(1) for _ in range(3)],
                        np.float32,
                    )
                    if q[0] * q[0] + (q[1] * q[1] + q[2] * q[2]) <= 1.0:
                        return centre + r * q

        while True:
            ps, ds = [], []
            for _ in range(chunk):
                p = draw()
                ps.append(p)
                ds.append(direction_for(bool(checker(p[None])[0])))
            yield np.stack(ps), np.stack(ds)
    raise ConfigError(f"unknown seeding kind {seeding.kind!r}")


def summarise(result: EngineResult, params: ResolvedParameters) -> dict:
    """Counts in MRtrix's categories: seeds, streamlines generated, selected, rejections by
    reason, terminations by reason (per half), mean length (mm)."""
    status = result.status.astype(int)
    accepted = status == int(Reject.ACCEPTED)
    rejected = {
        REJECT_NAMES.get(Reject(r), Reject(r).name): int((status == int(r)).sum())
        for r in Reject
        if r != Reject.ACCEPTED and (status == int(r)).any()
    }
    terms = result.term.astype(int).ravel()
    terminations = {
        TERM_NAMES.get(Term(t), Term(t).name): int((terms == int(t)).sum())
        for t in Term
        if (terms == int(t)).any()
    }
    lengths = result.lengths[accepted]
    seed_rejected = int((status == int(Reject.INVALID_SEED)).sum())
    step = params.step_mm * max(params.downsample, 1)
    mean_len = float((lengths - 1).mean() * step) if lengths.size else 0.0
    return {
        "seeds": int(status.size),
        "generated": int(status.size - seed_rejected),
        "selected": int(accepted.sum()),
        "rejected": rejected,
        "terminations": terminations,
        "mean_length_mm": mean_len,
        "steps": int(result.counts.get("steps", 0)),
    }


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

    Returns:
        A :class:`TrackingResult`.
    """
    if isinstance(params, TrackingParameters):
        if voxel_sizes is None:
            raise ConfigError("voxel_sizes is required to resolve tracking parameters")
        params = params.resolve(voxel_sizes)
    rois = rois or RoiSet()
    if rng_seed is None:
        rng_seed = int.from_bytes(os.urandom(4), "little")
    rng = MRtrixRNG(rng_seed)
    fixed = None
    if params.seed_direction is not None:
        fixed = np.asarray(params.seed_direction, np.float32)
    if engine == "auto":
        from .tracker import default_engine

        engine = default_engine(fod.device)
    if not seeding.finite:
        select = 5000 if select is None else int(select)
        if max_seeds is None:
            max_seeds = 1000 * select if select > 0 else 0
        if select <= 0 and max_seeds <= 0:
            raise ConfigError("an infinite seed mechanism needs --select or a seed count")
    checker = SeedChecker(fod, rois)
    parts: list[EngineResult] = []
    n_seen = 0
    n_selected = 0
    for pos, dirs in _seed_stream(seeding, checker, rng, fixed, batch_size):
        if not seeding.finite and max_seeds:
            pos, dirs = pos[: max_seeds - n_seen], dirs[: max_seeds - n_seen]
        if pos.shape[0] == 0:
            break
        res = run_engine(engine, fod, pos, dirs, params, rois)
        acc = res.accepted
        if not seeding.finite and select and n_selected + int(acc.sum()) >= select:
            cut = int(np.flatnonzero(acc)[select - n_selected - 1]) + 1
            res = _truncate_result(res, cut)
        parts.append(res)
        n_seen += res.status.shape[0]
        n_selected += int(res.accepted.sum())
        if progress is not None:
            progress(n_seen, n_selected)
        if not seeding.finite and (
            (select and n_selected >= select) or (max_seeds and n_seen >= max_seeds)
        ):
            break
    res = concat_results(parts)
    acc = res.accepted
    sl = Streamlines(torch.from_numpy(res.points), torch.from_numpy(res.lengths[acc]))
    summary = summarise(res, params)
    return TrackingResult(
        streamlines=sl,
        seed_index=res.seed_index[acc],
        seed_ids=np.flatnonzero(acc),
        params=params,
        summary=summary,
        engine=engine,
    )


def _truncate_result(res: EngineResult, n: int) -> EngineResult:
    acc = res.accepted[:n]
    npts = int(res.lengths[:n][acc].sum())
    return dataclasses.replace(
        res,
        points=res.points[:npts],
        lengths=res.lengths[:n],
        seed_index=res.seed_index[:n],
        status=res.status[:n],
        term=res.term[:n],
        init_dir=res.init_dir[:n],
    )
