"""SD_Stream with anatomically-constrained tracking (``tckgen -act``) in the torch engine.

The same MRtrix3 3.0.3 rules as the numba kernel (:mod:`invtract.tracking.act_cpu`), applied to
a batch of seeds that advance together: the ACT seed test and ``seed_is_unidirectional``,
``check_structural`` after every successful step (EXIT_IMAGE, ENTER_CSF, ENTER_CGM, the SGM
depth count, EXIT_SGM), TERM_IN_SGM for a method failure in SGM; then per streamline, on the
host: ``apply_priors`` (:func:`~invtract.tracking.rules.act_priors`), ``truncate_exit_sgm``,
``-crop_at_gmwmi`` and ``track_rejected`` with ACT's rules. The tissue tests are vectorised
forms of :mod:`invtract.tracking.rules`' (checked equal in ``tests/tracking/test_act_torch.py``).

Tissues are the 5TT image sampled with :func:`sample_eigen` (MRtrix's masked trilinear
interpolator with the numba kernel's arithmetic; unmasked for the interface search) and set as
``Tissues::set``.
Positions are scanner mm (RAS+), float32; ``[N, 3]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..fod.field import FODField
from ..fod.interp import nonzero_rows
from ..fod.legendre import legendre_index, legendre_table, lut_increment, n_legendre
from ..params import ResolvedParameters
from .act import ActImage
from .propagator import normalise_eigen, sd_stream_step
from .rules import (
    FOV_HALF_VOXEL,
    GMWMI_ACCURACY,
    GMWMI_HERMITE_TENSION,
    GMWMI_MAX_ITERS,
    GMWMI_NORMAL_PERTURBATION,
    SQRT2,
    TISSUE_SUM_THRESHOLD,
    WEIGHT_THRESHOLD,
    act_exclusion_reason,
    act_priors,
    is_path,
)
from .tracker import (
    _ADD_TO_TCK,
    _IncludeState,
    _seed_check,
    check_length_post,
    downsample_track,
    region_checks,
)
from .types import EngineResult, Reject, RoiSet, Term, concat_results

__all__ = ["ActField", "tissues_at", "tissue_classes", "track_torch_act"]

_CONT = int(Term.CONTINUE)
f32 = np.float32


@dataclass
class ActField:
    """The 5TT image as torch gathers read it: ``flat [X*Y*Z, 5]`` float32, ``shape``,
    ``scanner2voxel [3, 4]`` float64, ``nonzero [X*Y*Z]`` (masked interpolation)."""

    flat: torch.Tensor
    shape: tuple
    scanner2voxel: torch.Tensor
    nonzero: torch.Tensor

    @classmethod
    def from_act(cls, act: ActImage, device="cpu") -> ActField:
        data = torch.as_tensor(np.ascontiguousarray(act.data, np.float32), device=device)
        flat = data.reshape(-1, data.shape[-1])
        s2v = torch.as_tensor(np.asarray(act.scanner2voxel, np.float64)[:3, :4], device=device)
        return cls(flat, tuple(int(v) for v in data.shape[:3]), s2v, nonzero_rows(flat))


def sample_eigen(flat, shape, scanner2voxel, pos, nonzero=None):
    """Trilinear samples of ``flat [X*Y*Z, K]`` float32 at ``pos [N, 3]`` (scanner mm) with the
    numba kernel's arithmetic (``fused_cpu._interp``: voxel coordinates in double in Eigen's
    order, float32 weights ``wx * (wy * wz)`` below 1e-6 dropped, corners added pairwise as
    tckgen's build does), so that tissue and FOD comparisons tie-break as tckgen's. With
    ``nonzero [X*Y*Z]`` an all-zero nearest voxel is "no data" (masked interpolator).
    Returns ``(values [N, K], ok [N])``; rows not ok are zero. No gradients."""
    M = scanner2voxel.to(dtype=torch.float64, device=pos.device)
    d = pos.to(torch.float64)
    v = torch.stack([((M[0, 0] * d[:, 0] + M[0, 1] * d[:, 1]) + M[0, 2] * d[:, 2]) + M[0, 3],
                     ((M[1, 0] * d[:, 0] + M[1, 1] * d[:, 1]) + M[1, 2] * d[:, 2]) + M[1, 3],
                     (M[2, 0] * d[:, 0] + M[2, 1] * d[:, 1]) + (M[2, 2] * d[:, 2] + M[2, 3])],
                    -1)  # fmt: skip
    n = torch.tensor(shape, dtype=torch.float64, device=pos.device)
    ok = ((v > -FOV_HALF_VOXEL) & (v < n - FOV_HALF_VOXEL)).all(-1)
    v = torch.where(ok[:, None], v, torch.zeros_like(v))
    nmax = torch.tensor(shape, dtype=torch.int64, device=pos.device) - 1
    strides = (shape[1] * shape[2], shape[2], 1)

    def flat_index(ijk):
        return ijk[:, 0] * strides[0] + ijk[:, 1] * strides[1] + ijk[:, 2]

    if nonzero is not None:
        near = (torch.sign(v) * torch.floor(torch.abs(v) + 0.5)).to(torch.int64)
        ok = ok & nonzero[flat_index(torch.minimum(near.clamp(min=0), nmax))]
    fl = torch.floor(v)
    f = torch.where((v < 0.0) | (v > n - 1.0), torch.zeros_like(v), v - fl)
    lo = torch.minimum(fl.to(torch.int64).clamp(min=0), nmax)
    hi = torch.minimum((fl.to(torch.int64) + 1).clamp(min=0), nmax)
    w = ((1.0 - f).to(torch.float32), f.to(torch.float32))
    a, wt = [], []
    for k in range(8):  # corner k = x + 2y + 4z
        bits = (k & 1, (k >> 1) & 1, (k >> 2) & 1)
        ijk = torch.stack([(hi if b else lo)[:, ax] for ax, b in enumerate(bits)], -1)
        wk = w[bits[0]][:, 0] * (w[bits[1]][:, 1] * w[bits[2]][:, 2])
        wt.append(torch.where(wk < WEIGHT_THRESHOLD, torch.zeros_like(wk), wk)[:, None])
        a.append(flat[flat_index(ijk)])
    t = [a[k] * wt[k] + a[k + 4] * wt[k + 4] for k in range(4)]
    out = (t[0] + t[2]) + (t[1] + t[3])
    ok = ok & ~torch.isnan(out[:, 0])
    return torch.where(ok[:, None], out, torch.zeros_like(out)), ok


def tissues_at(act: ActField, pos: torch.Tensor, masked: bool = True):
    """``Tissues::set`` at scanner points ``pos [N, 3]``: ``(tissues [N, 5] clamped to [0, 1],
    valid [N])``; invalid rows (no data, any NaN, sum below 0.5) are zero."""
    out, ok = sample_eigen(act.flat, act.shape, act.scanner2voxel, pos,
                           act.nonzero if masked else None)  # fmt: skip
    ok = ok & ~torch.isnan(out).any(-1)
    tis = torch.where(ok[:, None], out.clamp(0.0, 1.0), torch.zeros_like(out))
    c, s, w, f, p = tis.unbind(-1)
    total = (((c + s) + w) + f) + p
    valid = ok & (total.double() >= TISSUE_SUM_THRESHOLD)
    return tis, valid


def tissue_classes(tis: torch.Tensor) -> dict:
    """The ``Tissues`` class tests of :mod:`invtract.tracking.rules`, vectorised over
    ``tis [N, 5]``: ``is_csf``, ``is_sgm``, ``is_gm``, ``is_path``, ``seed_ok``, each ``[N]``."""
    c, s, w, f, p = tis.unbind(-1)
    gm = c + s
    csf = (f >= c) & (f >= s) & (f >= w) & (f >= p)
    sgm = (s > c) & (s >= w) & (s > f) & (s > p)
    return {
        "is_csf": csf,
        "is_sgm": sgm,
        "is_gm": (gm >= w) & (gm > f) & (gm > p),
        "is_path": (p >= c) & (p >= s) & (p >= w) & (p > f),
        "seed_ok": sgm | (~csf & (w > 0) & ~((gm - w).double() >= GMWMI_ACCURACY)),
    }


@dataclass
class _ActState:
    """Per-streamline ``ACT_Method_additions`` members and the last fetched tissues."""

    depth: torch.Tensor  # [n] int64 sgm_depth
    seed_in_sgm: torch.Tensor  # [n] bool
    to_wm: torch.Tensor  # [n] bool sgm_seed_to_wm
    tis: torch.Tensor  # [n, 5]
    valid: torch.Tensor  # [n] bool


def _check_structural(st: _ActState, idx: torch.Tensor, tis, valid) -> torch.Tensor:
    """``check_structural`` for rows ``idx`` with their new tissues; updates ``st``."""
    st.tis[idx], st.valid[idx] = tis, valid
    k = tissue_classes(tis)
    depth = st.depth[idx]
    t = torch.full_like(depth, _CONT)
    t = torch.where(~valid, int(Term.EXIT_IMAGE), t)
    csf = valid & k["is_csf"]
    t = torch.where(csf, torch.where(depth > 0, int(Term.EXIT_SGM), int(Term.ENTER_CSF)), t)
    gm = valid & ~csf & k["is_gm"]
    t = torch.where(gm & (tis[:, 0] >= tis[:, 1]), int(Term.ENTER_CGM), t)
    deeper = gm & (tis[:, 0] < tis[:, 1])
    other = valid & ~csf & ~k["is_gm"] & (depth > 0)
    first_wm = other & st.seed_in_sgm[idx] & ~st.to_wm[idx]
    t = torch.where(other & ~first_wm, int(Term.EXIT_SGM), t)
    st.depth[idx] = torch.where(deeper, depth + 1, torch.where(first_wm, 0, depth))
    st.to_wm[idx] = st.to_wm[idx] | first_wm
    return t


def _act_half(field, act, st, p0, u0, count0, active, inc, params, rois, max_new):
    """``gen_track_unidir`` for all ``active`` rows (before ``apply_priors``): returns
    ``(buf [n, max_new, 3], nadd [n], term [n])``."""
    n, dev = p0.shape[0], p0.device
    buf = torch.zeros((n, max_new, 3), dtype=p0.dtype, device=dev)
    nadd = torch.zeros(n, dtype=torch.int64, device=dev)
    term = torch.full((n,), -1, dtype=torch.int64, device=dev)
    pos, u, count, alive = p0.clone(), u0.clone(), count0.clone(), active.clone()
    add_table = _ADD_TO_TCK.to(dev)
    while True:
        idx = torch.nonzero(alive, as_tuple=False).flatten()
        if idx.numel() == 0:
            break
        new_p, new_u, t = sd_stream_step(field, pos[idx], u[idx], params)
        t = torch.where((t != _CONT) & (st.depth[idx] > 0), int(Term.TERM_IN_SGM), t)
        cont = t == _CONT
        if bool(cont.any()):
            tis, valid = tissues_at(act, new_p[cont])
            t[cont] = _check_structural(st, idx[cont], tis, valid)
        t = region_checks(t, idx, new_p, rois, inc, params.stop)
        cont = t == _CONT
        add = add_table[t]
        ai = idx[add]
        buf[ai, nadd[ai]] = new_p[add]
        nadd[ai] += 1
        count[ai] += 1
        t = torch.where(cont & (count[idx] >= params.max_points), int(Term.LENGTH_EXCEED), t)
        pos[idx], u[idx] = new_p, new_u
        fin = t != _CONT
        term[idx[fin]] = t[fin]
        alive[idx[fin]] = False
    return buf, nadd, term


# --------------------------------------------------------------------------------------------
# Per streamline, on the host: truncate_exit_sgm, crop_at_gmwmi, track_rejected
# --------------------------------------------------------------------------------------------


def _unit_rows(d: np.ndarray) -> np.ndarray:
    """Eigen's ``normalized()`` of float32 rows ``[m, 3]`` (unchanged when zero)."""
    d = d.astype(np.float32)
    sq = d[:, 0] * d[:, 0] + (d[:, 1] * d[:, 1] + d[:, 2] * d[:, 2])
    norm = np.where(sq > 0, np.sqrt(sq), f32(1.0)).astype(np.float32)
    return d / norm[:, None]


def precomputed_value(c: np.ndarray, u: np.ndarray, lmax: int) -> np.float32:
    """``PrecomputedAL::value``: the FOD amplitude of coefficients ``c [K]`` along unit
    ``u [3]`` with the Legendre table interpolated between its rows (float32; the m > 0 terms
    added in double), as SD_Stream's ``FOD (dir)`` and the numba kernel's ``_amplitude``."""
    table, inc = _legendre(lmax), lut_increment()
    el = np.arccos(np.float32(u[2]))
    fr2 = f32(el / inc)
    row, fr1 = 0, f32(1.0)
    if not np.isfinite(fr2) or int(fr2) < 0 or int(fr2) >= table.shape[0] - 1:
        row = 0 if not np.isfinite(fr2) or int(fr2) < 0 else table.shape[0] - 1
        fr2 = f32(0.0)
    else:
        row = int(fr2)
        fr2 = f32(fr2 - f32(row))
        fr1 = f32(f32(1.0) - fr2)

    def al(l: int, m: int) -> np.float32:
        e = legendre_index(l, m)
        v = f32(fr1 * table[row, e])
        return f32(v + fr2 * table[row + 1, e]) if fr2 != 0 else v

    ux, uy = f32(u[0]), f32(u[1])
    rxy = f32(np.sqrt(f32(uy * uy + ux * ux)))
    cp, sp = (f32(ux / rxy), f32(uy / rxy)) if rxy != 0 else (f32(1.0), f32(0.0))
    v = f32(0.0)
    for l in range(0, lmax + 1, 2):
        v = f32(v + al(l, 0) * f32(c[l * (l + 1) // 2]))
    c0, s0 = f32(1.0), f32(0.0)
    for m in range(1, lmax + 1):
        cm, sm = f32(c0 * cp - s0 * sp), f32(s0 * cp + c0 * sp)
        for l in range(m + (m & 1), lmax + 1, 2):
            centre = l * (l + 1) // 2
            inner = f32(cm * f32(c[centre + m]) + sm * f32(c[centre - m]))
            v = f32(np.float64(v) + (np.float64(al(l, m)) * SQRT2) * np.float64(inner))
        c0, s0 = cm, sm
    return v


_TABLES: dict = {}


def _legendre(lmax: int) -> np.ndarray:
    if lmax not in _TABLES:
        _TABLES[lmax] = np.asarray(legendre_table(lmax), np.float32).reshape(-1, n_legendre(lmax))
    return _TABLES[lmax]


def truncate_exit_sgm(field: FODField, tck: np.ndarray, depth: int) -> np.ndarray:
    """``Exec::truncate_exit_sgm``: ``tck [n, 3]`` cut after the point of its last ``depth``
    where the FOD amplitude along the incoming segment is lowest (0 without FOD data)."""
    n = tck.shape[0]
    sel = np.arange(n - depth, n)
    dirs = _unit_rows(tck[sel] - tck[sel - 1])
    pts = torch.as_tensor(tck[sel], dtype=torch.float32, device=field.device)
    flat = field.sh_flat.detach().to(torch.float32)
    c, ok = sample_eigen(flat, field.shape, field.scanner2voxel, pts, field.nonzero_flat)
    c, ok = c.cpu().numpy(), ok.cpu().numpy()
    values = [precomputed_value(c[j], dirs[j], field.lmax) if ok[j] else f32(0.0)
              for j in range(sel.shape[0])]  # fmt: skip
    best, lowest = n - 1, np.inf
    for i, v in zip(sel, values):
        if v < lowest:
            best, lowest = int(i), v
    return tck[: best + 1]


def _hermite(mu: np.float32, d: np.ndarray) -> np.ndarray:
    """``Math::Hermite<float>`` with tension 0.1 at ``mu`` over the 4 points ``d [4, 3]``."""
    t = f32(0.5) * f32(GMWMI_HERMITE_TENSION)
    p2 = mu * mu
    p3 = mu * p2
    w0 = (f32(0.5) - t) * ((f32(2.0) * p2 - p3) - mu)
    w1 = (f32(1.0) + (f32(1.5) + t) * p3) - (f32(2.5) + t) * p2
    w2 = ((f32(2.0) + f32(2.0) * t) * p2 + (f32(0.5) - t) * mu) - (f32(1.5) + t) * p3
    w3 = (f32(0.5) - t) * (p3 - p2)
    return (((w0 * d[0] + w1 * d[1]) + w2 * d[2]) + w3 * d[3]).astype(np.float32)


def crop_at_gmwmi(act: ActField, tck: np.ndarray) -> np.ndarray:
    """``GMWMI_finder::find_interface (track, end)``: the last point of ``tck [n, 3]`` moved
    onto the GM-WM interface by bisection along a Hermite spline (unmasked tissues)."""
    if tck.shape[0] < 3:
        return tck

    def gm_wm(q: np.ndarray):
        tis, _ = tissues_at(act, torch.as_tensor(q[None], device=act.flat.device), masked=False)
        c, s, w = (f32(v) for v in tis[0, :3].cpu().numpy())
        return c + s, w

    end, prev = tck[-1], tck[-2]
    (gm_e, wm_e), (gm_p, wm_p) = gm_wm(end), gm_wm(prev)
    if not ((gm_e > wm_e and gm_p < wm_p) or (gm_e < wm_e and gm_p > wm_p)):
        return tck
    if np.float64(gm_e - wm_e) < GMWMI_ACCURACY:
        return tck
    a = end - prev
    d = np.stack([tck[-3], prev, end, end + (a + (a - (prev - tck[-3])))]).astype(np.float32)
    lo, hi, best = f32(0.0), f32(1.0), end
    for _ in range(GMWMI_MAX_ITERS):
        mu = f32(0.5 * np.float64(lo + hi))
        h = _hermite(mu, d)
        gm, wm = gm_wm(h)
        if wm > gm:
            lo = mu
        else:
            hi, best = mu, h
            if np.float64(gm - wm) < GMWMI_ACCURACY:
                break
    out = tck.copy()
    out[-1] = best
    return out


def _rejection(tck, s, reason, seed_in_sgm, to_wm, missed, crop, params):
    """``track_rejected`` with ACT, then ``check_downsampled_length`` (``-downsample`` or
    ``-crop_at_gmwmi``: downsampled, then :func:`~invtract.tracking.tracker.check_length_post`
    with ACT: over-long is rejected). Returns ``(status, tck, seed index)`` after
    downsampling."""
    n = tck.shape[0]
    if reason != int(Reject.ACCEPTED):
        return reason, tck, s
    if n == 1 and params.min_points > 1:
        return int(Reject.NO_PROPAGATION_FROM_SEED), tck, s
    if n < params.min_points:
        return int(Reject.TRACK_TOO_SHORT), tck, s
    if params.max_points != 2 and seed_in_sgm and not to_wm:
        return int(Reject.ACT_FAILED_WM_REQUIREMENT), tck, s
    if missed:
        return int(Reject.MISSED_INCLUDE_REGION), tck, s
    if not crop and params.downsample <= 1:
        return int(Reject.ACCEPTED), tck, s
    tck, s = downsample_track(tck, s, int(params.downsample))
    tck, s, rejected = check_length_post(tck, s, params, act=True)
    return int(Reject.ACCEPTED if rejected is None else rejected), tck, s


def _finish_half(field, act, crop, tck, term, st: _ActState, i: int):
    """``apply_priors`` + EXIT_SGM truncation + crop for row ``i``: ``(tck, term, reason)``."""
    tis = st.tis[i].cpu().numpy()
    in_path = bool(st.valid[i]) and is_path(*(f32(v) for v in tis))
    depth = int(st.depth[i])
    term, excluded = act_priors(int(term), depth, in_path)
    if term == int(Term.EXIT_SGM):
        tck = truncate_exit_sgm(field, tck, depth)
    if excluded:
        return tck, term, act_exclusion_reason(term)
    if term == int(Term.ENTER_CGM) and crop:
        tck = crop_at_gmwmi(act, tck)
    return tck, term, int(Reject.ACCEPTED)


# --------------------------------------------------------------------------------------------
# Seeds and chunks
# --------------------------------------------------------------------------------------------


def _seed_state(act: ActField, safe: torch.Tensor, ok: torch.Tensor):
    """``check_seed`` with ACT: ``(ok' [n], state)``; tissues fetched with the masked
    interpolator (an SGM seed is allowed, else ``seed_ok``)."""
    n = safe.shape[0]
    tis, valid = tissues_at(act, safe)
    k = tissue_classes(tis)
    st = _ActState(
        depth=torch.zeros(n, dtype=torch.int64, device=safe.device),
        seed_in_sgm=valid & k["is_sgm"],
        to_wm=torch.zeros(n, dtype=torch.bool, device=safe.device),
        tis=tis,
        valid=valid,
    )
    return ok & valid & k["seed_ok"], st


def _unidirectional(act: ActField, st: _ActState, safe, u0, ok):
    """``seed_is_unidirectional``: ``(unidir [n], u0')``; a seed in GM with WM below GM tracks
    away from GM only, probed at +- 0.001 mm along its peak."""
    c, s, w = st.tis[:, 0], st.tis[:, 1], st.tis[:, 2]
    k = tissue_classes(st.tis)
    uni = ok & ~k["is_sgm"] & ~(w >= c + s) & ~(s >= c)
    h = torch.tensor(f32(GMWMI_NORMAL_PERTURBATION), dtype=safe.dtype, device=safe.device)
    plus, _ = tissues_at(act, safe + u0 * h)
    minus, _ = tissues_at(act, safe - u0 * h)
    grad = ((plus[:, 0] + plus[:, 1]) - plus[:, 2]) - ((minus[:, 0] + minus[:, 1]) - minus[:, 2])
    flip = uni & (grad > 0)
    return uni, torch.where(flip[:, None], -u0, u0)


@torch.no_grad()
def _track_chunk_act(field, act, seeds, init_dirs, params, rois, crop):
    dev, dt = field.device, field.dtype
    n = seeds.shape[0]
    seeds = seeds.to(device=dev, dtype=dt)
    ok, safe, c = _seed_check(field, seeds, rois)
    ok, st = _seed_state(act, safe, ok)
    d = normalise_eigen(torch.nan_to_num(init_dirs.to(device=dev, dtype=dt), nan=0.0))
    amp, u0 = field.peak(c, torch.where(ok[:, None], d, torch.ones_like(d)))
    ok &= torch.isfinite(amp) & (amp >= params.cutoff)
    u0 = torch.where(ok[:, None], u0, torch.full_like(u0, float("nan")))
    uni, u0 = _unidirectional(act, st, safe, torch.nan_to_num(u0), ok)
    uni = uni | bool(params.unidirectional)
    u0 = torch.where(ok[:, None], u0, torch.full_like(u0, float("nan")))
    inc = _IncludeState(rois, n, dev)
    if inc.any:
        inc.visit(torch.arange(n, device=dev), safe)
    max_new = params.max_points + 1
    ones = torch.ones(n, dtype=torch.int64, device=dev)
    buf1, n1, t1 = _act_half(field, act, st, safe, torch.nan_to_num(u0), ones, ok, inc, params,
                             rois, max_new)  # fmt: skip
    rows = np.flatnonzero(ok.cpu().numpy())
    p0 = safe.cpu().numpy()
    b1, n1n, t1n = buf1.cpu().numpy(), n1.cpu().numpy(), t1.cpu().numpy()
    first, term = {}, np.full((n, 2), -1, np.int64)
    reason = np.full(n, int(Reject.INVALID_SEED), np.int64)
    second = torch.zeros(n, dtype=torch.bool, device=dev)
    count2 = torch.ones(n, dtype=torch.int64, device=dev)
    for i in rows:
        tck = np.concatenate([p0[i : i + 1], b1[i, : n1n[i]]]).astype(np.float32)
        tck, term[i, 0], reason[i] = _finish_half(field, act, crop, tck, t1n[i], st, i)
        first[i] = tck
        if reason[i] == int(Reject.ACCEPTED) and not bool(uni[i]):
            second[i], count2[i] = True, tck.shape[0]
    st.depth.zero_()  # reverse_track
    buf2, n2, t2 = _act_half(field, act, st, safe, -torch.nan_to_num(u0), count2, second, inc,
                             params, rois, max_new)  # fmt: skip
    b2, n2n, t2n = buf2.cpu().numpy(), n2.cpu().numpy(), t2.cpu().numpy()
    missed = (~inc.all_visited()).cpu().numpy() if inc.any else np.zeros(n, bool)
    status = np.full(n, int(Reject.INVALID_SEED), np.int64)
    lengths, seed_index, parts = np.zeros(n, np.int64), np.full(n, -1, np.int64), []
    for i in rows:
        tck, s = first[i], 0
        if bool(second[i]):
            s = tck.shape[0] - 1
            tck = np.concatenate([tck[::-1], b2[i, : n2n[i]]]).astype(np.float32)
            tck, term[i, 1], reason[i] = _finish_half(field, act, crop, tck, t2n[i], st, i)
        flags = (bool(st.seed_in_sgm[i]), bool(st.to_wm[i]), bool(missed[i]))
        status[i], tck, s = _rejection(tck, s, int(reason[i]), *flags, crop, params)
        if status[i] == int(Reject.ACCEPTED):
            parts.append(tck)
            lengths[i], seed_index[i] = tck.shape[0], s
    points = np.concatenate(parts).astype(np.float32) if parts else np.zeros((0, 3), np.float32)
    return EngineResult(
        points=points,
        lengths=lengths,
        seed_index=seed_index,
        status=status.astype(np.int8),
        term=term.astype(np.int8),
        init_dir=u0.cpu().numpy().astype(np.float32),
        counts={"steps": int(lengths.sum())},
    )


def track_torch_act(
    field: FODField,
    seeds: torch.Tensor | np.ndarray,
    init_dirs: torch.Tensor | np.ndarray,
    params: ResolvedParameters,
    act: ActImage,
    rois: RoiSet | None = None,
    batch_size: int = 4096,
) -> EngineResult:
    """SD_Stream with ACT in plain PyTorch (any device), the rules of the numba ACT kernel.

    Args:
        field: the FOD; seeds: ``[N, 3]`` scanner mm; init_dirs: ``[N, 3]`` raw directions;
        params: resolved, with ACT's defaults (:func:`invtract.tracking.act.act_parameters`);
        act: the 5TT image (:func:`invtract.tracking.act.load_act`); rois: regions;
        batch_size: seeds tracked together.

    Returns:
        :class:`EngineResult` (terminations and rejections in MRtrix's ACT categories).

    """
    rois = rois or RoiSet()
    tt = ActField.from_act(act, field.device)
    seeds = torch.as_tensor(np.asarray(seeds) if not torch.is_tensor(seeds) else seeds)
    dirs = torch.as_tensor(np.asarray(init_dirs) if not torch.is_tensor(init_dirs) else init_dirs)
    parts = []
    for start in range(0, max(seeds.shape[0], 1), batch_size):
        stop = min(seeds.shape[0], start + batch_size)
        parts.append(_track_chunk_act(field, tt, seeds[start:stop], dirs[start:stop], params,
                                      rois, bool(act.crop_at_gmwmi)))  # fmt: skip
    return concat_results(parts)


def act_seed_checker_torch(field: FODField, rois: RoiSet, act: ActImage):
    """Which seeds tckgen -act tracks at all (``check_seed`` with ACT's test, then data at the
    seed), for :func:`invtract.tracking.runner.run_seeding` when numba is absent:
    ``f([n, 3]) -> [n]`` bool."""
    tt = ActField.from_act(act, field.device)

    @torch.no_grad()
    def check(p: np.ndarray) -> np.ndarray:
        pos = torch.as_tensor(np.asarray(p, np.float32).reshape(-1, 3), device=field.device)
        ok, safe, _ = _seed_check(field, pos.to(field.dtype), rois or RoiSet())
        return _seed_state(tt, safe, ok)[0].cpu().numpy()

    return check
