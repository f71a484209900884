"""The batched SD_Stream tracker: the plain PyTorch reference engine (``engines.torch``).

Convention: ``tracking/exec.h`` (``gen_track``, ``gen_track_unidir``, ``iterate``,
``track_rejected``) and spec §4.2-§5.4, §7.1. All streamlines of a chunk advance together with
per-streamline alive masks; there is no Python loop over streamlines. Positions are scanner mm
(RAS+), float32 by default as in MRtrix.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import ConfigError, ShapeError
from ..fod.field import FODField
from ..fod.interp import nonzero_rows
from ..fod.peak_grad import refine_peak
from ..fod.sh_layout import lmax_from_n
from ..params import ResolvedParameters
from .lengths import track_length, truncate_maxlength
from .propagator import normalise_eigen, sd_stream_step
from .rois import any_contains, roi_contains
from .rules import seed_usable, track_rejection
from .types import (
    TERM_ADD_TO_TCK,
    EngineResult,
    PeakRecord,
    Reject,
    RoiSet,
    Term,
    concat_results,
)

__all__ = [
    "track_torch",
    "track_torch_peaks",
    "seed_test_torch",
    "seed_usable_torch",
    "downsample_track",
    "check_length_post",
]


class _IncludeState:
    """``IncludeROIVisitation`` for a batch of ``n`` streamlines (``roi.h``).

    ``visited [n, n_inc]``: which ``-include`` regions were entered; ``ord_next [n]``: the next
    ``-include_ordered`` region expected; ``ord_valid [n]``: no ordered region was entered out
    of order (re-entering the previous one is allowed).
    """

    def __init__(self, rois: RoiSet, n: int, device) -> None:
        self.rois = rois
        self.visited = torch.zeros((n, len(rois.include)), dtype=torch.bool, device=device)
        self.ord_next = torch.zeros(n, dtype=torch.int64, device=device)
        self.ord_valid = torch.ones(n, dtype=torch.bool, device=device)

    @property
    def any(self) -> bool:
        return bool(self.rois.include or self.rois.include_ordered)

    def visit(self, rows: torch.Tensor, pos: torch.Tensor) -> None:
        """Record the points ``pos [m, 3]`` of streamlines ``rows [m]``."""
        for j, roi in enumerate(self.rois.include):
            self.visited[rows, j] |= roi_contains(roi, pos)
        if not self.rois.include_ordered:
            return
        # the first ordered region (in order) containing the point, or -1
        first = torch.full((rows.shape[0],), -1, dtype=torch.int64, device=pos.device)
        for j in reversed(range(len(self.rois.include_ordered))):
            first = torch.where(roi_contains(self.rois.include_ordered[j], pos), j, first)
        nxt, valid = self.ord_next[rows], self.ord_valid[rows]
        hit = valid & (first >= 0)
        self.ord_next[rows] = torch.where(hit & (first == nxt), nxt + 1, nxt)
        self.ord_valid[rows] = valid & ~(hit & (first != nxt) & (first != nxt - 1))

    def all_visited(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """``[m]`` bool: every include region visited, the ordered ones all and in order."""
        rows = slice(None) if rows is None else rows
        n_ord = len(self.rois.include_ordered)
        return self.visited[rows].all(-1) & self.ord_valid[rows] & (self.ord_next[rows] == n_ord)


def region_checks(
    t: torch.Tensor, idx: torch.Tensor, new_p: torch.Tensor, rois, inc: _IncludeState, stop: bool
) -> torch.Tensor:
    """The region tests of one step, in tckgen's order, for the streamlines still going.

    Args:
        t: ``[n]`` the step's termination codes so far (``Term.CONTINUE`` = going on).
        idx: ``[n]`` the streamlines' rows (for the include-visit state).
        new_p: ``[n, 3]`` the new points, scanner mm.
        rois: the :class:`~invtract.tracking.types.RoiSet`; inc: its include-visit state.
        stop: ``-stop`` (end once every include region was visited).

    Returns:
        ``[n]`` the codes with EXIT_MASK, ENTER_EXCLUDE and TRAVERSE_ALL_INCLUDE applied.
    """
    cont = t == int(Term.CONTINUE)
    if rois.mask:
        t = torch.where(cont & ~any_contains(rois.mask, new_p), int(Term.EXIT_MASK), t)
        cont = t == int(Term.CONTINUE)
    if rois.exclude:
        t = torch.where(cont & any_contains(rois.exclude, new_p), int(Term.ENTER_EXCLUDE), t)
        cont = t == int(Term.CONTINUE)
    if inc.any:
        inc.visit(idx[cont], new_p[cont])
        if stop:
            done = torch.zeros_like(cont)
            done[cont] = inc.all_visited(idx[cont])
            t = torch.where(done, int(Term.TRAVERSE_ALL_INCLUDE), t)
    return t


def _track_half(field, p0, u0, count0, active, inc: _IncludeState, params, rois, max_new,
                bufs=None, col0=None, refine=0):  # fmt: skip
    """Track one half for all ``active`` rows from ``(p0, u0)``.

    Returns ``(bufs, nadd [n], term [n], excluded [n], steps)``. ``bufs`` maps ``"points"``
    and / or ``"peaks"`` (record mode) to ``[n, R, 3]`` buffers (R grown as needed, at most
    ``max_new``; default: a fresh points buffer): the k-th point appended to row r (not the
    seed) goes to column ``col0[r] + k`` (``col0`` defaults to 0) of ``points``, and the peak
    it moved along to the same place of ``peaks``. ``inc`` records
    include visits; ``refine`` is :func:`~invtract.tracking.propagator.sd_stream_step`'s.
    """
    n = p0.shape[0]
    dev = p0.device
    if bufs is None:  # sized by what is tracked: doubled as the longest half grows
        bufs = {
            "points": torch.zeros((n, min(max_new, _FIRST_ROWS), 3), dtype=p0.dtype, device=dev)
        }
    if col0 is None:
        col0 = torch.zeros(n, dtype=torch.int64, device=dev)
    nadd = torch.zeros(n, dtype=torch.int64, device=dev)
    term = torch.full((n,), -1, dtype=torch.int64, device=dev)
    excluded = torch.zeros(n, dtype=torch.bool, device=dev)
    pos, u = p0.clone(), u0.clone()
    count = count0.clone()
    alive = active.clone()
    steps = torch.zeros((), dtype=torch.int64, device=dev)
    add_to_tck = _ADD_TO_TCK.to(dev)
    # bound on the columns used: a row adds at most one point per step
    top = int(col0.max()) if n else 0
    CONT = int(Term.CONTINUE)
    while True:
        idx = torch.nonzero(alive, as_tuple=False).flatten()
        if idx.numel() == 0:
            break
        new_p, new_u, t = sd_stream_step(field, pos[idx], u[idx], params, refine)
        t = region_checks(t, idx, new_p, rois, inc, params.stop)
        cont = t == CONT
        add = add_to_tck[t]
        ai = idx[add]
        if top >= next(iter(bufs.values())).shape[1]:
            bufs = _room_for_one_more(bufs, col0 + nadd, max_new)
        top += 1
        col = col0[ai] + nadd[ai]
        for key, buf in bufs.items():
            buf[ai, col] = (new_p if key == "points" else new_u)[add]
        nadd[ai] += 1
        count[ai] += 1
        steps += add.sum()
        t = torch.where(cont & (count[idx] >= params.max_points), int(Term.LENGTH_EXCEED), t)
        pos[idx] = new_p
        u[idx] = new_u
        fin = t != CONT
        term[idx[fin]] = t[fin]
        excluded[idx[fin & (t == int(Term.ENTER_EXCLUDE))]] = True
        alive[idx[fin]] = False
    return bufs, nadd, term, excluded, int(steps)


#: first size of a half's point buffer (rows per streamline); it doubles as halves grow
_FIRST_ROWS = 256


def _room_for_one_more(bufs: dict, used: torch.Tensor, max_new: int) -> dict:
    """``bufs`` (name -> ``[n, R, 3]``) with room for one more point per row after ``used [n]``
    filled columns (R doubled, at most ``max_new``)."""
    rows = next(iter(bufs.values())).shape[1]
    if rows >= max_new or int(used.max()) < rows:
        return bufs
    for k, buf in list(bufs.items()):  # in place: each old buffer goes once it is copied
        g = buf.new_zeros((buf.shape[0], min(max_new, 2 * rows), 3))
        g[:, :rows] = buf
        bufs[k] = g
        del buf, g
    return bufs


#: the rulebook's "which points are kept", indexed by Term code
_ADD_TO_TCK = torch.tensor([bool(TERM_ADD_TO_TCK[Term(t)]) for t in range(len(Term))])


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


def check_length_post(
    points: np.ndarray, seed_index: int, params: ResolvedParameters, act: bool = False
):
    """Length rule after downsampling (spec §5.4): ``(points, seed_index, reject_or_None)``.

    Convention: ``Exec::check_downsampled_length`` / ``truncate_maxlength``: outside the
    point-count bounds ``(min_points_post, max_points_post)`` the float32 length is measured; a
    track shorter than minlength is rejected; one longer than maxlength is cut where its length
    from the first vertex reaches maxlength; if that would drop the seed, the part up to the
    seed is reversed (the seed becomes vertex 0) and cut instead. With ``act`` (ACT) a track
    longer than maxlength is rejected (TRACK_TOO_LONG) instead.
    """
    n = points.shape[0]
    if params.min_points_post < n < params.max_points_post:
        return points, seed_index, None
    pts = points.astype(np.float32)
    length = track_length(pts)
    if length < params.min_length_mm:
        return points, seed_index, Reject.TRACK_TOO_SHORT
    if act:
        too_long = length > params.max_length_mm
        return points, seed_index, (Reject.TRACK_TOO_LONG if too_long else None)
    if length <= params.max_length_mm:
        return points, seed_index, None
    return (*truncate_maxlength(pts, seed_index, params.max_length_mm), None)


def _seed_check(field: FODField, seeds: torch.Tensor, rois: RoiSet):
    """``check_seed`` and the data at the seed (:func:`~invtract.tracking.rules.seed_usable`).

    Returns ``(ok [N] bool, safe [N, 3] (non-finite rows zeroed), coeffs [N, K])``.
    """
    finite = torch.isfinite(seeds).all(-1)
    safe = torch.where(finite[:, None], seeds, torch.zeros_like(seeds))
    in_mask = any_contains(rois.mask, safe) if rois.mask else torch.ones_like(finite)
    in_exclude = any_contains(rois.exclude, safe) if rois.exclude else torch.zeros_like(finite)
    c, has_data = field.sample(safe)
    return seed_usable(finite, in_mask, in_exclude, has_data), safe, c


@torch.no_grad()
def seed_test_torch(
    sh: np.ndarray, scanner2voxel: np.ndarray, rois: RoiSet | None = None
) -> Callable[[np.ndarray], np.ndarray]:
    """The torch engine's seed test for an FOD ``sh [X, Y, Z, K]`` with ``scanner2voxel
    [3, 4]``: a function of ``seeds [N, 3]`` (scanner mm) returning ``[N]`` bool, which seeds
    the engine tracks at all (the seeding code's check when numba is absent; the numba
    kernel's ``SeedTest`` otherwise). The field is built once, not per call."""
    sh_t = torch.as_tensor(np.ascontiguousarray(sh, np.float32))
    flat = sh_t.reshape(-1, sh_t.shape[-1])
    field = FODField(
        flat,
        tuple(int(v) for v in sh_t.shape[:3]),
        torch.as_tensor(np.asarray(scanner2voxel, np.float64)[:3, :4]),
        nonzero_rows(flat),
        lmax_from_n(int(sh_t.shape[-1])),
    )
    rois = rois or RoiSet()

    def usable(seeds: np.ndarray) -> np.ndarray:
        pos = torch.as_tensor(np.asarray(seeds, np.float32).reshape(-1, 3))
        return _seed_check(field, pos, rois)[0].numpy()

    return usable


def seed_usable_torch(
    sh: np.ndarray, scanner2voxel: np.ndarray, seeds: np.ndarray, rois: RoiSet | None = None
) -> np.ndarray:
    """``[N]`` bool: :func:`seed_test_torch` applied once to ``seeds [N, 3]`` (scanner mm)."""
    return seed_test_torch(sh, scanner2voxel, rois)(seeds)


@dataclass
class _SeedStart:
    """The seeds of a chunk after ``check_seed`` and the peak search at the seed."""

    ok: torch.Tensor  # [n] bool: tracked
    safe: torch.Tensor  # [n, 3] seeds, non-finite rows zeroed
    u0: torch.Tensor  # [n, 3] seed peak (NaN where the seed was rejected)
    term: torch.Tensor  # [n, 2] int64, -1
    inc: _IncludeState


def _seed_start(field, seeds, init_dirs, params, rois, refine=0) -> _SeedStart:
    """``check_seed``, the start direction and the peak search at the seed (``gen_track``)."""
    dev, dt = field.device, field.dtype
    n = seeds.shape[0]
    seeds = seeds.to(device=dev, dtype=dt)
    init = init_dirs.to(device=dev, dtype=dt)
    ok, safe, c = _seed_check(field, seeds, rois)
    d = normalise_eigen(torch.nan_to_num(init, nan=0.0))
    amp, u0 = field.peak(c, torch.where(ok[:, None], d, torch.ones_like(d)))
    if refine > 0:
        u0 = refine_peak(c, u0, field.lmax, refine)
    ok &= torch.isfinite(amp) & (amp >= params.cutoff)
    u0 = torch.where(ok[:, None], u0, torch.full_like(u0, float("nan")))
    inc = _IncludeState(rois, n, dev)
    if inc.any:  # gen_track: the seed itself is a visit
        inc.visit(torch.arange(n, device=dev), safe)
    term = torch.full((n, 2), -1, dtype=torch.int64, device=dev)
    return _SeedStart(ok, safe, u0, term, inc)


def _rejections(st: _SeedStart, total, excluded, params) -> np.ndarray:
    """``[n]`` int64 ``Reject`` code per seed (``track_rejected``: the rulebook's tests in its
    order, for every tracked seed; INVALID_SEED for the others)."""
    ok = st.ok.cpu().numpy()
    status = np.where(ok, int(Reject.ACCEPTED), int(Reject.INVALID_SEED)).astype(np.int64)
    n = ok.shape[0]
    total = total.cpu().numpy()
    missed = (~st.inc.all_visited()).cpu().numpy() if st.inc.any else np.zeros(n, bool)
    excl = excluded.cpu().numpy()
    for i in np.flatnonzero(ok):
        status[i] = track_rejection(
            int(total[i]), bool(excl[i]), bool(missed[i]), int(params.min_points)
        )
    return status


@torch.no_grad()
def _track_chunk(field: FODField, seeds, init_dirs, params: ResolvedParameters, rois: RoiSet):
    dev = field.device
    n = seeds.shape[0]
    st = _seed_start(field, seeds, init_dirs, params, rois)
    ok, safe, u0, term, inc = st.ok, st.safe, st.u0, st.term, st.inc
    max_new = params.max_points + 1
    ones = torch.ones(n, dtype=torch.int64, device=dev)
    bufs1, n1, t1, exc1, steps1 = _track_half(
        field, safe, torch.nan_to_num(u0), ones, ok, inc, params, rois, max_new
    )
    term[:, 0] = torch.where(ok, t1, term[:, 0])
    second = ok & ~exc1 & (not params.unidirectional)
    bufs2, n2, t2, exc2, steps2 = _track_half(
        field, safe, -torch.nan_to_num(u0), 1 + n1, second, inc, params, rois, max_new
    )
    term[:, 1] = torch.where(second, t2, term[:, 1])
    status_np = _rejections(st, 1 + n1 + n2, exc1 | exc2, params)
    # assemble on the host
    buf1, buf2 = bufs1["points"].cpu().numpy(), bufs2["points"].cpu().numpy()
    n1_np, n2_np = n1.cpu().numpy(), n2.cpu().numpy()
    p0 = safe.cpu().numpy()
    total = 1 + n1_np + n2_np
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


def track_torch_peaks(
    field: FODField,
    seeds: torch.Tensor,
    init_dirs: torch.Tensor,
    params: ResolvedParameters,
    refine: int = 0,
    with_points: bool = True,
) -> PeakRecord:
    """The torch engine's "record peaks" mode: the streamlines of :func:`track_torch` (no
    ROIs), unpacked, with the converged peak behind every point.

    The same tracking as :func:`track_torch` (every point, length, status and term is the one
    it gives), in the layout of :func:`~invtract.tracking.fused_cpu.track_fused_cpu_peaks`
    (each row as written: the first half reversed, the seed, the second half), on the field's
    device and in its dtype. All ``seeds`` are tracked together: the caller chunks them. Used
    by the hard pass of :func:`~invtract.tracking.differentiable.track_differentiable`.

    Args:
        field: the FOD (float32 or float64, any device).
        seeds: ``[N, 3]`` seed points, scanner mm.
        init_dirs: ``[N, 3]`` initial directions (normalised here).
        params: resolved parameters (first order, no downsampling).
        refine: float64 Newton iterations polishing every peak (the seed's included) before it
            is used (0: tckgen's peaks; see :func:`~invtract.tracking.propagator.sd_stream_next`).
        with_points: False: ``points`` is None (not buffered: half the memory, for a caller
            that recomputes them from the seeds and the peaks).

    Returns:
        A :class:`~invtract.tracking.types.PeakRecord` with ``L`` the longest row.
    """
    if params.rk4 or params.downsample > 1:
        raise ConfigError("track_torch_peaks supports first-order stepping without downsampling")
    seeds = torch.as_tensor(seeds)
    init_dirs = torch.as_tensor(init_dirs)
    if seeds.ndim != 2 or seeds.shape[-1] != 3 or init_dirs.shape != seeds.shape:
        raise ShapeError(
            f"seeds and init_dirs must be [N, 3], got {tuple(seeds.shape)}, "
            f"{tuple(init_dirs.shape)}"
        )
    return _peak_chunk(field, seeds, init_dirs, params, refine, with_points)


@torch.no_grad()
def _peak_chunk(
    field: FODField, seeds, init_dirs, params, refine: int, with_points: bool
) -> PeakRecord:
    """:func:`track_torch_peaks`: both halves written into one ``[n, R, 3]`` row per seed (and
    the peaks into a second), the first half turned round in place before the second follows,
    as the fused kernel does."""
    rois = RoiSet()
    dev, dt = field.device, field.dtype
    n = seeds.shape[0]
    st = _seed_start(field, seeds, init_dirs, params, rois, refine)
    ok, safe, u0, term = st.ok, st.safe, st.u0, st.term
    max_cols = params.max_points + 2
    keys = ("points", "peaks") if with_points else ("peaks",)
    bufs = {k: torch.zeros((n, min(max_cols, _FIRST_ROWS), 3), dtype=dt, device=dev) for k in keys}
    if with_points:
        bufs["points"][:, 0] = safe
    ones = torch.ones(n, dtype=torch.int64, device=dev)
    bufs, n1, t1, _, steps1 = _track_half(
        field, safe, torch.nan_to_num(u0), ones, ok, st.inc, params, rois, max_cols,
        bufs, ones, refine,
    )  # fmt: skip
    term[:, 0] = torch.where(ok, t1, term[:, 0])
    n2 = torch.zeros_like(n1)
    steps2 = 0
    if not params.unidirectional:
        idx = _reversed_index(n1 + 1, bufs["peaks"].shape[1])  # the seed now at column n1
        for k in keys:
            bufs[k] = bufs[k].gather(1, idx[..., None].expand(-1, -1, 3))
        del idx
        bufs, n2, t2, _, steps2 = _track_half(
            field, safe, -torch.nan_to_num(u0), 1 + n1, ok, st.inc, params, rois, max_cols,
            bufs, 1 + n1, refine,
        )  # fmt: skip
        term[:, 1] = torch.where(ok, t2, term[:, 1])
    total = 1 + n1 + n2
    status = torch.from_numpy(_rejections(st, total, torch.zeros_like(ok), params)).to(dev)
    acc = status == int(Reject.ACCEPTED)
    seed_col = torch.zeros_like(n1) if params.unidirectional else n1
    L = int(total.max()) if n else 0
    return PeakRecord(
        points=bufs["points"][:, :L] if with_points else None,
        peaks=bufs["peaks"][:, :L],
        lengths=torch.where(acc, total, 0),
        seed_index=torch.where(acc, seed_col, -1),
        status=status,
        term=term,
        init_dir=u0,
        steps=int(steps1 + steps2),
    )


def _reversed_index(n: torch.Tensor, R: int) -> torch.Tensor:
    """``[N, R]`` column index putting the first ``n[i]`` entries of row i in reverse order."""
    j = torch.arange(R, device=n.device)[None, :]
    return torch.where(j < n[:, None], n[:, None] - 1 - j, j)
