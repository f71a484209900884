"""Seeds to streamlines with tckgen's rules, for any engine, without torch.

:func:`run_seeding` draws seeds in tckgen's order (:class:`Seeding`), gives every seed that
passes ``check_seed`` one start direction from the MRtrix-compatible random stream, hands
chunks of seeds to an engine, stops infinite seeders at ``select`` / ``max_seeds`` exactly as
``tckgen -nthreads 0`` does, and counts the outcome in MRtrix's categories. Positions are
scanner mm (RAS+). :func:`invtract.tracking.api.track` is the torch front (an FOD field in,
:class:`~invtract.streamlines.Streamlines` out); ``invtract track`` calls this module directly,
so its compiled CPU path never imports torch.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError
from ..params import ResolvedParameters
from .rng import MRtrixRNG
from .rules import seed_limits
from .seeding import MaskGrid, SeedImageSampler, grid_per_voxel, random_per_voxel
from .types import (
    REJECT_NAMES,
    TERM_NAMES,
    EngineResult,
    Reject,
    RoiSet,
    Term,
    concat_results,
)

__all__ = [
    "Seeding",
    "SeedChecker",
    "SeedingResult",
    "StreamlineChunk",
    "run_seeding",
    "summarise",
    "Tally",
    "default_engine",
    "numba_available",
    "seed_vertices",
]

#: a chunk of seeds ``[n, 3]`` and start directions ``[n, 3]`` -> the engine's result
ChunkRunner = Callable[[np.ndarray, np.ndarray], EngineResult]


@dataclass
class StreamlineChunk:
    """The accepted streamlines of one chunk of seeds, in seed order (numpy, scanner mm).

    Attributes:
        points: ``[P, 3]`` float32 vertices, packed.
        lengths: ``[S]`` vertex count of each streamline.
        seed_index: ``[S]`` index of the seed vertex in each streamline.
        seed_ids: ``[S]`` index of the seed (in generation order, over the whole run).
    """

    points: np.ndarray
    lengths: np.ndarray
    seed_index: np.ndarray
    seed_ids: np.ndarray


#: receives each chunk's accepted streamlines (e.g. appends them to a file)
StreamlineSink = Callable[[StreamlineChunk], None]


@dataclass
class Seeding:
    """How seeds are generated (one mechanism per run, as tckgen's finite/infinite rules).

    Attributes:
        kind: ``"list"`` (explicit positions), ``"grid"`` (``-seed_grid_per_voxel``),
            ``"random_per_voxel"`` (``-seed_random_per_voxel``), ``"image"`` (``-seed_image``)
            ``"sphere"`` (``-seed_sphere``) or ``"gmwmi"`` (``-seed_gmwmi``, with ``-act``).
        positions: ``[N, 3]`` scanner mm, for ``"list"``.
        directions: ``[N, 3]`` initial directions for ``"list"`` (optional).
        mask: ``[X, Y, Z]`` bool mask and ``affine`` ``[4, 4]`` for the mask-based kinds.
        transform: the mask's ``[3, 4]`` unit-column MRtrix transform and ``voxel_sizes``
            (mm), as :class:`~invtract.io.image.Image` carries them; with them the seeds are
            tckgen's bit for bit (optional: derived from ``affine`` when None).
        count: grid points per axis (``grid``) or seeds per voxel (``random_per_voxel``).
        sphere: ``(x, y, z, r)`` mm for ``"sphere"``.
        gmwmi: the :class:`~invtract.tracking.seeding_gmwmi.GmwmiSeeder` for ``"gmwmi"``.
    """

    kind: str
    positions: np.ndarray | None = None
    directions: np.ndarray | None = None
    mask: np.ndarray | None = None
    affine: np.ndarray | None = None
    count: int = 1
    sphere: tuple | None = None
    transform: np.ndarray | None = None
    voxel_sizes: tuple | None = None
    gmwmi: object | None = None

    @classmethod
    def from_mask(cls, kind: str, image, count: int = 1) -> Seeding:
        """A mask-based seeding (``"grid"``, ``"random_per_voxel"``, ``"image"``) from a mask
        :class:`~invtract.io.image.Image` (``load_mask``), keeping its MRtrix geometry so that
        the seeds are tckgen's bit for bit."""
        return cls(
            kind,
            mask=np.asarray(image.data, bool),
            affine=image.affine,
            count=count,
            transform=image.transform,
            voxel_sizes=image.voxel_sizes,
        )

    def mask_grid(self) -> MaskGrid:
        """The seed mask as tckgen traverses it (realigned, cropped)."""
        return MaskGrid.from_image(self.mask, self.affine, self.transform, self.voxel_sizes)

    @property
    def finite(self) -> bool:
        return self.kind in ("list", "grid", "random_per_voxel")


@dataclass
class SeedingResult:
    """Output of :func:`run_seeding` (numpy; positions in scanner mm).

    Attributes:
        points: ``[P, 3]`` float32 vertices of the accepted streamlines, packed in seed order.
        lengths: ``[S]`` vertex count of each accepted streamline.
        seed_index: ``[S]`` index of the seed vertex in each streamline.
        seed_ids: ``[S]`` index of the seed (in generation order) each streamline came from.
        summary: counts in MRtrix's categories (see :func:`summarise`).
    """

    points: np.ndarray
    lengths: np.ndarray
    seed_index: np.ndarray
    seed_ids: np.ndarray
    summary: dict

    @property
    def seed_points(self) -> np.ndarray:
        """``[S, 3]`` the seed vertex of each streamline (scanner mm)."""
        return seed_vertices(self.points, self.lengths, self.seed_index)


def seed_vertices(points: np.ndarray, lengths: np.ndarray, seed_index: np.ndarray) -> np.ndarray:
    """``[S, 3]`` the seed vertex of each of the packed streamlines (``points`` ``[P, 3]``,
    ``lengths`` ``[S]``, ``seed_index`` ``[S]`` within each streamline)."""
    offsets = np.cumsum(lengths) - lengths
    return np.asarray(points)[offsets + np.asarray(seed_index)].reshape(-1, 3)


def numba_available() -> bool:
    """True when the compiled CPU engine imports (numba installed)."""
    try:
        from . import fused_cpu
    except Exception:  # pragma: no cover - depends on installation
        return False
    return bool(getattr(fused_cpu, "available", lambda: False)())


def default_engine(device) -> str:
    """The fastest engine available for ``device`` (a torch device or its name)."""
    kind = str(device).split(":")[0]
    if kind == "cuda" and importlib.util.find_spec("triton") is not None:
        return "triton"
    if kind == "cpu" and numba_available():
        return "numba"
    return "torch"


def run_seeding(
    sh,
    scanner2voxel: np.ndarray | None,
    seeding: Seeding,
    params: ResolvedParameters,
    run_chunk: ChunkRunner,
    *,
    rois: RoiSet | None = None,
    select: int | None = None,
    max_seeds: int | None = None,
    rng_seed: int | None = None,
    batch_size: int = 4096,
    progress: Callable[[int, int], None] | None = None,
    seed_check: Callable[[np.ndarray], np.ndarray] | None = None,
    sink: StreamlineSink | None = None,
) -> SeedingResult:
    """Track from every seed of ``seeding`` as ``tckgen -algorithm SD_Stream -nthreads 0``.

    Args:
        sh: ``[X, Y, Z, K]`` SH coefficients (MRtrix3 basis, scanner frame) and
            ``scanner2voxel`` ``[3, 4]``, or a :class:`~invtract.tracking.fused_cpu.FusedFOD`
            (then ``scanner2voxel`` is unused): the FOD the engine tracks, used here for the
            seed checks that decide which seeds draw a random direction.
        seeding: the seed mechanism.
        params: resolved tracking parameters.
        run_chunk: ``run_chunk(positions [n, 3], directions [n, 3]) -> EngineResult``.
        rois: include / exclude / mask regions (the engine must use the same).
        select: stop once this many streamlines are accepted (infinite seeders; tckgen default
            5000). Ignored for finite seeders, which track every seed.
        max_seeds: stop after this many seeds (tckgen ``-seeds``; default 1000 x select).
        rng_seed: seed of the MRtrix-compatible random stream (``MRTRIX_RNG_SEED``); random
            when None.
        batch_size: seeds per engine call.
        progress: called as ``progress(seeds_done, selected)``.
        seed_check: replaces :class:`SeedChecker` (``[n, 3] -> [n]`` bool), e.g. with ACT's
            seed test added (:func:`invtract.tracking.act_cpu.act_seed_checker`).
        sink: if given, each chunk's accepted streamlines go to ``sink`` as they are tracked
            and are not kept (memory does not grow with the number of streamlines); the
            result then holds only the summary (no points, no per-streamline arrays).
    """
    rois = rois or RoiSet()
    if rng_seed is None:
        rng_seed = int.from_bytes(os.urandom(4), "little")
    rng = MRtrixRNG(rng_seed)
    fixed = None
    if params.seed_direction is not None:
        fixed = np.asarray(params.seed_direction, np.float32)
    if not seeding.finite:
        select, max_seeds = seed_limits(select, max_seeds)
        if select <= 0 and max_seeds <= 0:
            raise ConfigError("an infinite seed mechanism needs --select or a seed count")
    checker = seed_check or SeedChecker(sh, scanner2voxel, rois)
    parts: list[EngineResult] = []
    tally = Tally()
    n_seen = 0
    stream = _seed_stream(seeding, checker, rng, fixed, batch_size)
    for pos, dirs in stream:
        over = pos[:0], dirs[:0]  # seeds of this chunk past the -seeds limit
        if not seeding.finite and max_seeds:
            over = pos[max_seeds - n_seen :], dirs[max_seeds - n_seen :]
            pos, dirs = pos[: max_seeds - n_seen], dirs[: max_seeds - n_seen]
            if pos.shape[0] == 0:  # the seed limit was reached with the previous chunk
                _track_last_seed(tally, run_chunk, over, stream)
                break
        if pos.shape[0] == 0:
            break
        res = run_chunk(pos, dirs)
        acc = res.accepted
        if not seeding.finite and select and tally.selected + int(acc.sum()) >= select:
            cut = int(np.flatnonzero(acc)[select - tally.selected - 1]) + 1
            if cut < res.status.shape[0]:  # the seed after the last selected one, tracked
                tally.add_after_end(_slice_result(res, cut, cut + 1))
            else:
                _track_last_seed(tally, run_chunk, over, stream)
            res = _truncate_result(res, cut)
        elif not seeding.finite and max_seeds and n_seen + res.status.shape[0] >= max_seeds:
            _track_last_seed(tally, run_chunk, over, stream)
        tally.add(res)
        if sink is None:
            parts.append(res)
        else:
            acc = res.accepted
            sink(StreamlineChunk(res.points, res.lengths[acc], res.seed_index[acc],
                                 n_seen + np.flatnonzero(acc)))  # fmt: skip
        n_seen += res.status.shape[0]
        if progress is not None:
            progress(n_seen, tally.selected)
        if not seeding.finite and (
            (select and tally.selected >= select) or (max_seeds and n_seen >= max_seeds)
        ):
            break
    res = concat_results(parts)
    acc = res.accepted
    return SeedingResult(
        points=res.points,
        lengths=res.lengths[acc],
        seed_index=res.seed_index[acc],
        seed_ids=np.flatnonzero(acc),
        summary=tally.summary(params),
    )


class SeedChecker:
    """Which seeds consume a random direction, decided before tracking (spec §4.2 step 1, 2.1):
    ``check_seed`` and "data at the seed" (:func:`~invtract.tracking.rules.seed_usable`), with
    the fused kernel's own test (:class:`~invtract.tracking.fused_cpu.SeedTest`) whatever
    engine then tracks, or the torch engine's when numba is absent (the same rule:
    ``test_conformance.py``).

    Args:
        sh: ``[X, Y, Z, K]`` SH coefficients; scanner2voxel: ``[3, 4]`` (scanner mm -> voxel);
            or a prepared :class:`~invtract.tracking.fused_cpu.FusedFOD` (no copy, no scan).
    """

    def __init__(self, sh, scanner2voxel: np.ndarray | None, rois: RoiSet) -> None:
        if numba_available():
            from .fused_cpu import SeedTest

            self._test = SeedTest(sh, scanner2voxel, rois)
        else:
            from .tracker import seed_test_torch

            if hasattr(sh, "M"):  # a FusedFOD prepared for the compiled engine
                sh, scanner2voxel = sh.sh, sh.M
            self._test = seed_test_torch(sh, scanner2voxel, rois)

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
            grid = seeding.mask_grid()
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
        grid = seeding.mask_grid()
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
    if seeding.kind in ("image", "sphere", "gmwmi"):
        if seeding.kind == "gmwmi":

            def draw():
                return seeding.gmwmi.next(rng)

        elif seeding.kind == "image":
            sampler = SeedImageSampler(seeding.mask_grid(), rng)
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


class Tally:
    """Running counts of a tracking run in MRtrix's categories, chunk by chunk (constant
    memory): see :func:`summarise`."""

    def __init__(self) -> None:
        self.status: dict[int, int] = {}
        self.terms: dict[int, int] = {}
        self.selected = 0
        self.segments = 0  # sum over accepted streamlines of (vertices - 1)
        self.steps = 0
        # the seed tckgen's tracker makes after the last one written (see _track_last_seed):
        # in the rejection and termination tables only
        self.after_status: dict[int, int] = {}
        self.after_terms: dict[int, int] = {}

    def add(self, result: EngineResult) -> Tally:
        """Count one chunk's ``EngineResult``; returns self."""
        for counts, values in ((self.status, result.status), (self.terms, result.term)):
            codes, n = np.unique(np.asarray(values, np.int64).ravel(), return_counts=True)
            for c, k in zip(codes.tolist(), n.tolist()):
                counts[c] = counts.get(c, 0) + k
        lengths = result.lengths[result.accepted]
        self.selected += int(lengths.size)
        self.segments += int((lengths - 1).sum())
        self.steps += int(result.counts.get("steps", 0))
        return self

    def add_after_end(self, result: EngineResult) -> Tally:
        """Count the rejections and terminations of seeds tracked after the run's end."""
        for counts, values in ((self.after_status, result.status),
                               (self.after_terms, result.term)):  # fmt: skip
            codes, n = np.unique(np.asarray(values, np.int64).ravel(), return_counts=True)
            for c, k in zip(codes.tolist(), n.tolist()):
                counts[c] = counts.get(c, 0) + k
        return self

    def summary(self, params: ResolvedParameters) -> dict:
        """The counts as :func:`summarise` reports them."""
        status = {c: self.status.get(c, 0) + self.after_status.get(c, 0)
                  for c in set(self.status) | set(self.after_status)}  # fmt: skip
        terms = {c: self.terms.get(c, 0) + self.after_terms.get(c, 0)
                 for c in set(self.terms) | set(self.after_terms)}  # fmt: skip
        rejected = {
            REJECT_NAMES.get(r, r.name): status[int(r)]
            for r in Reject
            if r != Reject.ACCEPTED and status.get(int(r), 0)
        }
        terminations = {
            TERM_NAMES.get(t, t.name): terms[int(t)] for t in Term if terms.get(int(t), 0)
        }
        seeds = sum(self.status.values())
        step = params.step_mm * max(params.downsample, 1)
        mean_len = self.segments / self.selected * step if self.selected else 0.0
        return {
            "seeds": seeds,
            "generated": seeds - self.status.get(int(Reject.INVALID_SEED), 0),
            "selected": self.selected,
            "rejected": rejected,
            "terminations": terminations,
            "mean_length_mm": float(mean_len),
            "steps": self.steps,
        }


def summarise(result: EngineResult, params: ResolvedParameters) -> dict:
    """Counts in MRtrix's categories: seeds, streamlines generated, selected, rejections by
    reason, terminations by reason (per half), mean length (mm)."""
    return Tally().add(result).summary(params)


def _truncate_result(res: EngineResult, n: int) -> EngineResult:
    return _slice_result(res, 0, n)


def _slice_result(res: EngineResult, a: int, b: int) -> EngineResult:
    """Seeds ``a:b`` of ``res`` (their points included)."""
    acc = res.accepted
    before = int(res.lengths[:a][acc[:a]].sum())
    npts = int(res.lengths[a:b][acc[a:b]].sum())
    return dataclasses.replace(
        res,
        points=res.points[before : before + npts],
        lengths=res.lengths[a:b],
        seed_index=res.seed_index[a:b],
        status=res.status[a:b],
        term=res.term[a:b],
        init_dir=res.init_dir[a:b],
    )


def _track_last_seed(tally: Tally, run_chunk: ChunkRunner, rest, stream) -> None:
    """tckgen's tracker makes one more streamline than its writer takes: once ``-select`` or
    ``-seeds`` is reached the writer returns false only on the next item, whose seed test,
    rejection and terminations are counted in ``-info``'s tables (not in the seed, generated
    or selected counts; ``write_kernel.cpp``, ``exec.h`` 3.0.3). Track that seed (the first of
    ``rest``, else of the stream's next chunk) into ``tally``'s after-the-end counts."""
    pos, dirs = rest
    if pos.shape[0] == 0:
        pos, dirs = next(stream, (pos, dirs))
    if pos.shape[0]:
        tally.add_after_end(run_chunk(pos[:1], dirs[:1]))
