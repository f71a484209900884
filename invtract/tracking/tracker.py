"""The batched SD_Stream tracker (plain PyTorch reference engine) and the engine registry.

Convention: ``tracking/exec.h`` (``gen_track``, ``gen_track_unidir``, ``iterate``,
``track_rejected``) and spec §4.2-§5.4, §7.1. All streamlines of a chunk advance together with
per-streamline alive masks; there is no Python loop over streamlines. Positions are scanner mm
(RAS+), float32 by default as in MRtrix.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from ..errors import ConfigError
from ..fod.field import FODField
from ..params import ResolvedParameters
from .propagator import normalise_eigen, sd_stream_step
from .rois import any_contains, roi_contains
from .runner import default_engine, numba_available
from .types import EngineResult, Reject, RoiSet, Term, concat_results

__all__ = [
    "track_torch",
    "ENGINES",
    "run_engine",
    "default_engine",
    "numba_available",
    "downsample_track",
    "check_length_post",
]


def _track_half(field, p0, u0, count0, active, visited, params, rois, max_new):
    """Track one half for all ``active`` rows from ``(p0, u0)``.

    Returns ``(buf [n, max_new, 3], nadd [n], term [n], excluded [n], visited, steps)``; ``buf``
    rows hold the appended points in order (not including the seed).
    """
    n = p0.shape[0]
    dev = p0.device
    buf = torch.zeros((n, max_new, 3), dtype=p0.dtype, device=dev)
    nadd = torch.zeros(n, dtype=torch.int64, device=dev)
    term = torch.full((n,), -1, dtype=torch.int64, device=dev)
    excluded = torch.zeros(n, dtype=torch.bool, device=dev)
    pos, u = p0.clone(), u0.clone()
    count = count0.clone()
    alive = active.clone()
    steps = 0
    CONT = int(Term.CONTINUE)
    while True:
        idx = torch.nonzero(alive, as_tuple=False).flatten()
        if idx.numel() == 0:
            break
        new_p, new_u, t = sd_stream_step(field, pos[idx], u[idx], params)
        cont = t == CONT
        if rois.mask:
            t = torch.where(cont & ~any_contains(rois.mask, new_p), int(Term.EXIT_MASK), t)
            cont = t == CONT
        if rois.exclude:
            t = torch.where(cont & any_contains(rois.exclude, new_p), int(Term.ENTER_EXCLUDE), t)
            cont = t == CONT
        if rois.include:
            vis = visited[idx]
            for j, roi in enumerate(rois.include):
                vis[:, j] |= cont & roi_contains(roi, new_p)
            visited[idx] = vis
            if params.stop:
                t = torch.where(cont & vis.all(-1), int(Term.TRAVERSE_ALL_INCLUDE), t)
                cont = t == CONT
        add = cont | (t == int(Term.ENTER_EXCLUDE)) | (t == int(Term.TRAVERSE_ALL_INCLUDE))
        ai = idx[add]
        buf[ai, nadd[ai]] = new_p[add]
        nadd[ai] += 1
        count[ai] += 1
        steps += int(add.sum())
        t = torch.where(cont & (count[idx] >= params.max_points), int(Term.LENGTH_EXCEED), t)
        pos[idx] = new_p
        u[idx] = new_u
        fin = t != CONT
        term[idx[fin]] = t[fin]
        excluded[idx[fin & (t == int(Term.ENTER_EXCLUDE))]] = True
        alive[idx[fin]] = False
    return buf, nadd, term, excluded, visited, steps


def downsample_track(points: np.ndarray, seed_index: int, ratio: int) -> tuple[np.ndarray, int]:
    """MRtrix's downsampler: keep every ``ratio``-th point, the seed, the first and the last.

    Convention: ``resampling/downsampler.cpp`` (spec §7.1).
    """
    n = points.shape[0]
    if ratio <= 1 or n <= 2:
        return points, seed_index
    s = seed_index
    j0 = ((s - 1) % ratio) + 1 if s > 0 else ratio
    keep = [0] + list(range(j0, n - 1, ratio)) + [n - 1]
    new_seed = 1 + (s - j0) // ratio if s > 0 else 0
    return points[keep], new_seed


def _segment_lengths(points: np.ndarray) -> np.ndarray:
    """``[n - 1]`` float32 |p_i - p_{i-1}|, summed as x² + (y² + z²) (MRtrix's float order)."""
    d = np.diff(points.astype(np.float32), axis=0)
    return np.sqrt(d[:, 0] * d[:, 0] + (d[:, 1] * d[:, 1] + d[:, 2] * d[:, 2]))


def _cut_index(seg: np.ndarray, lmax: float) -> tuple[int, np.float32]:
    """First vertex index whose segment would take the float32 running length past ``lmax``
    (``len(seg) + 1`` if none), and the length up to the vertex before it."""
    total = np.float32(0.0)
    for i, s in enumerate(seg, start=1):
        if total + s > np.float32(lmax):
            return i, total
        total = np.float32(total + s)
    return len(seg) + 1, total


def check_length_post(points: np.ndarray, seed_index: int, params: ResolvedParameters):
    """Length rule after downsampling (spec §5.4): ``(points, seed_index, reject_or_None)``.

    Convention: ``Exec::check_length`` / ``truncate_maxlength``: a track longer than maxlength
    is cut where its length from the first vertex reaches maxlength; if that would drop the
    seed, the part up to the seed is reversed (the seed becomes vertex 0) and cut instead.
    """
    n = points.shape[0]
    if params.min_points_post < n < params.max_points_post:
        return points, seed_index, None
    pts = points.astype(np.float32)
    seg = _segment_lengths(pts)
    length = np.float32(0.0)
    for s_k in seg:  # sequential float32 sum, as MRtrix
        length = np.float32(length + s_k)
    if length < params.min_length_mm:
        return points, seed_index, Reject.TRACK_TOO_SHORT
    if length <= params.max_length_mm:
        return points, seed_index, None
    s = seed_index
    cut, done = _cut_index(seg, params.max_length_mm)
    if cut <= s:
        pts, s = pts[: s + 1][::-1].copy(), 0
        seg = _segment_lengths(pts)
        cut, done = _cut_index(seg, params.max_length_mm)
    if cut >= pts.shape[0]:
        return pts, s, None
    out = pts[: cut + 1].copy()
    d = out[cut] - out[cut - 1]
    sq = d[0] * d[0] + (d[1] * d[1] + d[2] * d[2])
    if sq > 0:
        d = d / np.sqrt(sq)
    out[cut] = out[cut - 1] + d * (np.float32(params.max_length_mm) - done)
    return out, s, None


@torch.no_grad()
def _track_chunk(field: FODField, seeds, init_dirs, params: ResolvedParameters, rois: RoiSet):
    dev = field.device
    dt = field.dtype
    n = seeds.shape[0]
    seeds = seeds.to(device=dev, dtype=dt)
    init = init_dirs.to(device=dev, dtype=dt)
    status = torch.full((n,), int(Reject.ACCEPTED), dtype=torch.int64, device=dev)
    term = torch.full((n, 2), -1, dtype=torch.int64, device=dev)
    ok = torch.isfinite(seeds).all(-1)
    safe = torch.where(ok[:, None], seeds, torch.zeros_like(seeds))
    if rois.mask:
        ok &= any_contains(rois.mask, safe)
    if rois.exclude:
        ok &= ~any_contains(rois.exclude, safe)
    c, valid = field.sample(safe)
    ok &= valid
    d = normalise_eigen(torch.nan_to_num(init, nan=0.0))
    amp, u0 = field.peak(c, torch.where(ok[:, None], d, torch.ones_like(d)))
    ok &= torch.isfinite(amp) & (amp >= params.cutoff)
    status[~ok] = int(Reject.INVALID_SEED)
    u0 = torch.where(ok[:, None], u0, torch.full_like(u0, float("nan")))
    n_inc = len(rois.include)
    visited = torch.zeros((n, n_inc), dtype=torch.bool, device=dev)
    for j, roi in enumerate(rois.include):
        visited[:, j] = roi_contains(roi, safe)
    max_new = params.max_points + 1
    ones = torch.ones(n, dtype=torch.int64, device=dev)
    buf1, n1, t1, exc1, visited, steps1 = _track_half(
        field, safe, torch.nan_to_num(u0), ones, ok, visited, params, rois, max_new
    )
    term[:, 0] = torch.where(ok, t1, term[:, 0])
    second = ok & ~exc1 & (not params.unidirectional)
    buf2, n2, t2, exc2, visited, steps2 = _track_half(
        field, safe, -torch.nan_to_num(u0), 1 + n1, second, visited, params, rois, max_new
    )
    term[:, 1] = torch.where(second, t2, term[:, 1])
    excluded = exc1 | exc2
    # assemble on the host
    buf1, buf2 = buf1.cpu().numpy(), buf2.cpu().numpy()
    n1_np, n2_np = n1.cpu().numpy(), n2.cpu().numpy()
    p0 = safe.cpu().numpy()
    status_np = status.cpu().numpy()
    status_np[(excluded & ok).cpu().numpy()] = int(Reject.ENTER_EXCLUDE_REGION)
    missed = (~visited.all(-1)).cpu().numpy() if n_inc else np.zeros(n, bool)
    # the rejections of gen_track / track_rejected, in their order
    total = 1 + n1_np + n2_np
    for reject, hit in (
        (Reject.NO_PROPAGATION_FROM_SEED, total == 1),
        (Reject.TRACK_TOO_SHORT, total < params.min_points),
        (Reject.MISSED_INCLUDE_REGION, missed),
    ):
        status_np[(status_np == int(Reject.ACCEPTED)) & hit] = int(reject)
    rows = np.flatnonzero(status_np == int(Reject.ACCEPTED))
    # streamline of row i: the first half reversed, the seed, the second half (seed at index
    # n1); unidirectional: the seed, then the one half (seed at index 0). Built packed:
    # vertex j of row r comes from the reversed half, the seed or the forward half.
    if params.unidirectional:
        rev, n_rev, fwd = buf2, np.zeros_like(n1_np), buf1
    else:
        rev, n_rev, fwd = buf1, n1_np, buf2
    counts = total[rows]
    r = np.repeat(rows, counts)
    j = np.arange(r.size) - np.repeat(np.cumsum(counts) - counts, counts)
    a = n_rev[r]
    points = np.empty((r.size, 3), buf1.dtype)
    m1, m0, m2 = j < a, j == a, j > a
    points[m1] = rev[r[m1], a[m1] - 1 - j[m1]]
    points[m0] = p0[r[m0]]
    points[m2] = fwd[r[m2], j[m2] - a[m2] - 1]
    lengths = np.zeros(n, np.int64)
    seed_index = np.full(n, -1, np.int64)
    lengths[rows], seed_index[rows] = counts, n_rev[rows]
    if params.downsample > 1:
        lines = np.split(points, np.cumsum(counts)[:-1]) if rows.size else []
        kept = []
        for i, pts in zip(rows, lines):
            pts, s_i = downsample_track(pts, int(n_rev[i]), params.downsample)
            pts, s_i, rej = check_length_post(pts, s_i, params)
            if rej is not None:
                status_np[i], lengths[i], seed_index[i] = int(rej), 0, -1
                continue
            kept.append(pts)
            lengths[i], seed_index[i] = pts.shape[0], s_i
        points = np.concatenate(kept, 0) if kept else np.zeros((0, 3), np.float32)
    points = points.astype(np.float32, copy=False)
    return EngineResult(
        points=points,
        lengths=lengths,
        seed_index=seed_index,
        status=status_np.astype(np.int8),
        term=term.cpu().numpy().astype(np.int8),
        init_dir=u0.cpu().numpy().astype(np.float32),
        counts={"steps": int(steps1 + steps2)},
    )


def track_torch(
    field: FODField,
    seeds: torch.Tensor | np.ndarray,
    init_dirs: torch.Tensor | np.ndarray,
    params: ResolvedParameters,
    rois: RoiSet | None = None,
    batch_size: int = 4096,
    progress: Callable[[int], None] | None = None,
) -> EngineResult:
    """Track from ``seeds`` with the plain PyTorch engine (the reference implementation).

    Args:
        field: the FOD (see :class:`~invtract.fod.field.FODField`).
        seeds: ``[N, 3]`` seed points, scanner mm (RAS+).
        init_dirs: ``[N, 3]`` initial directions (scanner frame; normalised here; NaN rows are
            fine for seeds that will be rejected).
        params: resolved parameters.
        rois: include / exclude / mask regions.
        batch_size: seeds tracked together (bounds memory: ~12 bytes x max_points x 2 per seed).
        progress: called with the number of seeds done after each chunk.

    Returns:
        An :class:`~invtract.tracking.types.EngineResult` (accepted streamlines in seed order).
    """
    rois = rois or RoiSet()
    if rois.include_ordered:
        raise ConfigError("ordered include regions are not supported yet")
    seeds = torch.as_tensor(np.asarray(seeds) if not torch.is_tensor(seeds) else seeds)
    init_dirs = torch.as_tensor(
        np.asarray(init_dirs) if not torch.is_tensor(init_dirs) else init_dirs
    )
    n = seeds.shape[0]
    parts = []
    for start in range(0, max(n, 1), batch_size):
        stop = min(n, start + batch_size)
        parts.append(_track_chunk(field, seeds[start:stop], init_dirs[start:stop], params, rois))
        if progress is not None:
            progress(stop - start)
    return concat_results(parts)


def _numba_engine(field, seeds, init_dirs, params, rois=None, batch_size=8192, progress=None):
    from . import fused_cpu

    # a view of a float32 CPU field (no copy of the whole FOD per chunk of seeds)
    sh = np.asarray(field.sh_flat.detach().cpu().numpy(), np.float32).reshape(*field.shape, -1)
    s2v = field.scanner2voxel.cpu().numpy()
    seeds = np.asarray(seeds.cpu() if torch.is_tensor(seeds) else seeds, np.float32)
    init = np.asarray(init_dirs.cpu() if torch.is_tensor(init_dirs) else init_dirs, np.float32)
    out = fused_cpu.track_fused_cpu(sh, s2v, seeds, init, params, rois or RoiSet())
    if progress is not None:
        progress(seeds.shape[0])
    return out


def _triton_engine(*args, **kwargs):  # lazy: importing triton takes about a second
    from .fused_triton import triton_engine

    return triton_engine(*args, **kwargs)


#: name -> engine function (same signature as :func:`track_torch`)
ENGINES: dict[str, Callable[..., EngineResult]] = {
    "torch": track_torch,
    "numba": _numba_engine,
    "triton": _triton_engine,
}


def run_engine(name: str, *args, **kwargs) -> EngineResult:
    """Dispatch to ``ENGINES[name]``; unknown names raise ConfigError listing valid ones."""
    if name == "auto":
        name = default_engine(args[0].device)
    if name not in ENGINES:
        raise ConfigError(f"unknown engine {name!r}; valid: auto, {', '.join(ENGINES)}")
    return ENGINES[name](*args, **kwargs)
