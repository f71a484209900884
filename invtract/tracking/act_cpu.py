"""SD_Stream with anatomically-constrained tracking (``tckgen -act``) in the numba CPU kernel.

The ACT driver of :mod:`invtract.tracking.fused_cpu`: the same propagation step, interpolation,
peak search and region tests (imported from it), with MRtrix3 3.0.3's ACT rules around them
(the rules and constants from :mod:`invtract.tracking.rules`):

* seed: ``check_seed`` adds the ACT seed test (tissues valid, SGM, or not CSF with some WM and
  GM - WM < 0.01); ``gen_track`` then asks ``seed_is_unidirectional`` (a seed in GM with WM
  below GM tracks one way only, away from GM, probed at +- 0.001 mm along its peak).
* every step (``Exec::iterate``): after a successful method step ``check_structural`` at the
  new point (EXIT_IMAGE when the tissues are invalid, ENTER_CSF, ENTER_CGM, the SGM depth
  count); a method failure inside SGM becomes TERM_IN_SGM.
* each half (``gen_track_unidir``): ``apply_priors`` (exclusion, ACT_POOR_TERMINATION /
  TRACK_TOO_LONG / ENTER_EXCLUDE_REGION), ``truncate_exit_sgm`` on an EXIT_SGM end (cut at
  the point of the sub-cortical stretch where the FOD amplitude along the incoming segment is
  lowest), ``-crop_at_gmwmi`` on an ENTER_CGM end
  (``GMWMI_finder::find_interface``: bisection along a Hermite spline).
* the streamline (``track_rejected``, ``check_downsampled_length``): the SGM-seed WM
  requirement, and with cropping the length re-measured (too long = rejected under ACT).

Tissues are sampled as ``Interp::Masked<Interp::Linear>`` (the kernel's ``_sample`` on the 5TT
volumes: FOV, all-zero nearest voxel, the 1e-6 weight threshold, Eigen's summation order) and
set as ``Tissues::set`` (NaN -> invalid, clamp to [0, 1], valid iff the sum >= 0.5). The
interface search uses the unmasked interpolator. Not implemented: ACT backtracking (not valid
for SD_Stream in tckgen either).

Layout: positions are scanner mm (float32), tissue images ``[X, Y, Z, 5]`` in MRtrix voxel
order (:func:`invtract.tracking.act.load_act`).
"""

from __future__ import annotations

import math
import time

import numpy as np

from .act import ActImage
from .fused_cpu import (
    _ACCEPTED,
    _ADD_TO_TCK,
    _CONTINUE,
    _ENTER_EXCLUDE,
    _EXIT_IMAGE,
    _EXIT_MASK,
    _FP_CUTOFF,
    _FP_INC,
    _FP_MAXLEN,
    _FP_MINLEN,
    _IP_DOWNSAMPLE,
    _IP_LMAX,
    _IP_MAXPOST,
    _IP_MAXPTS,
    _IP_MINPOST,
    _IP_MINPTS,
    _IP_NEXC,
    _IP_NINC,
    _IP_NMASK,
    _IP_NORD,
    _IP_RK4,
    _IP_STOP,
    _IP_UNIDIR,
    _JIT,
    _LENGTH_EXCEED,
    _ROI_EXCLUDE,
    _ROI_MASK,
    _SQRT2,
    _TOO_SHORT,
    _TRAVERSE_ALL_INCLUDE,
    _all_visited,
    _downsample,
    _get_peak,
    _in_set,
    _interp,
    _kernel_inputs,
    _normalize3,
    _reverse,
    _sample,
    _seg_norm,
    _start_direction,
    _start_seed,
    _step,
    _visit,
    n_legendre_nb,
    njit,
)
from .rules import (
    GMWMI_ACCURACY,
    GMWMI_HERMITE_TENSION,
    GMWMI_MAX_ITERS,
    GMWMI_NORMAL_PERTURBATION,
    LUT_LAST_ROW,
    TISSUE_SUM_THRESHOLD,
    act_exclusion_reason,
    act_priors,
    act_seed_ok,
    is_csf,
    is_gm,
    is_path,
    is_sgm,
)
from .types import EngineResult, Reject, RoiSet, Term, concat_results

__all__ = ["track_fused_cpu_act", "act_seed_checker"]

_ENTER_CGM = int(Term.ENTER_CGM)
_ENTER_CSF = int(Term.ENTER_CSF)
_EXIT_SGM = int(Term.EXIT_SGM)
_TERM_IN_SGM = int(Term.TERM_IN_SGM)
_NO_PROPAGATION = int(Reject.NO_PROPAGATION_FROM_SEED)
_TRACK_TOO_LONG = int(Reject.TRACK_TOO_LONG)
_ACT_FAILED_WM = int(Reject.ACT_FAILED_WM_REQUIREMENT)
_MISSED_INCLUDE = int(Reject.MISSED_INCLUDE_REGION)

# the ACT state vector (ACT_Method_additions' members and the last Tissues::set)
_SGM_DEPTH, _SEED_IN_SGM, _SGM_SEED_TO_WM, _VALID = range(4)

_is_csf = njit(inline="always", **_JIT)(is_csf)
_is_gm = njit(inline="always", **_JIT)(is_gm)
_is_sgm = njit(inline="always", **_JIT)(is_sgm)
_is_path = njit(inline="always", **_JIT)(is_path)
_act_seed_ok = njit(inline="always", **_JIT)(act_seed_ok)
_act_priors = njit(inline="always", **_JIT)(act_priors)
_act_exclusion_reason = njit(inline="always", **_JIT)(act_exclusion_reason)


# --------------------------------------------------------------------------------------------
# Tissues (ACT/tissues.h, ACT_Method_additions::fetch_tissue_data)
# --------------------------------------------------------------------------------------------


@njit(**_JIT)
def _tissues(tt, masked, Mt, px, py, pz, tbuf, tis):
    """Interpolate the 5TT at p into ``tis`` as ``Tissues::set``; returns validity.

    ``masked``: MRtrix's masked interpolator (an all-zero nearest voxel is "no data"), as ACT's
    tracking uses; False for the plain linear interpolator of the interface search."""
    zero = np.float32(0.0)
    one = np.float32(1.0)
    if not _interp(tt, Mt, px, py, pz, tbuf, masked):
        for k in range(5):
            tis[k] = zero
        return False
    for k in range(5):
        if np.isnan(tbuf[k]):
            for j in range(5):
                tis[j] = zero
            return False
    for k in range(5):
        v = tbuf[k]
        tis[k] = zero if v < zero else (one if v > one else v)
    total = (((tis[0] + tis[1]) + tis[2]) + tis[3]) + tis[4]
    return np.float64(total) >= TISSUE_SUM_THRESHOLD


@njit(inline="always", **_JIT)
def _classes(tis):
    return tis[0], tis[1], tis[2], tis[3], tis[4]


@njit(**_JIT)
def _check_structural(st, tis):
    """``ACT_Method_additions::check_structural`` on the tissues just fetched."""
    if st[_VALID] == 0:
        return _EXIT_IMAGE
    c, s, w, f, p = _classes(tis)
    if _is_csf(c, s, w, f, p):
        return _EXIT_SGM if st[_SGM_DEPTH] > 0 else _ENTER_CSF
    if _is_gm(c, s, w, f, p):
        if c >= s:
            return _ENTER_CGM
        st[_SGM_DEPTH] += 1
    elif st[_SGM_DEPTH] > 0:
        if st[_SEED_IN_SGM] != 0 and st[_SGM_SEED_TO_WM] == 0:
            st[_SGM_SEED_TO_WM] = 1
            st[_SGM_DEPTH] = 0
            return _CONTINUE
        return _EXIT_SGM
    return _CONTINUE


@njit(**_JIT)
def _seed_is_unidirectional(st, tis, tt, Mt, px, py, pz, ux, uy, uz, tbuf, tprobe):
    """``seed_is_unidirectional``: returns (unidirectional, u') with the seed's tissues in
    ``tis`` (restored afterwards)."""
    c, s, w, f, p = _classes(tis)
    if _is_sgm(c, s, w, f, p):
        return False, ux, uy, uz
    if w >= c + s or s >= c:
        return False, ux, uy, uz
    h = np.float32(GMWMI_NORMAL_PERTURBATION)
    _tissues(tt, True, Mt, px + ux * h, py + uy * h, pz + uz * h, tbuf, tprobe)
    plus = (tprobe[0] + tprobe[1]) - tprobe[2]
    _tissues(tt, True, Mt, px - ux * h, py - uy * h, pz - uz * h, tbuf, tprobe)
    minus = (tprobe[0] + tprobe[1]) - tprobe[2]
    if plus - minus > np.float32(0.0):
        return True, -ux, -uy, -uz
    return True, ux, uy, uz


# --------------------------------------------------------------------------------------------
# GM-WM interface cropping (ACT/gmwmi.cpp: GMWMI_finder::find_interface (track, end))
# --------------------------------------------------------------------------------------------


@njit(**_JIT)
def _crop_end(b, n, tt, Mt, tbuf, tprobe):
    """Replace the last point ``b[n - 1]`` by the interface point (``-crop_at_gmwmi``)."""
    if n < 3:
        return
    last = n - 1
    ex, ey, ez = b[last, 0], b[last, 1], b[last, 2]
    qx, qy, qz = b[last - 1, 0], b[last - 1, 1], b[last - 1, 2]
    if not _interp(tt, Mt, ex, ey, ez, tbuf, False):
        return
    _tissues(tt, False, Mt, ex, ey, ez, tbuf, tprobe)
    gm_e = tprobe[0] + tprobe[1]
    wm_e = tprobe[2]
    if not _interp(tt, Mt, qx, qy, qz, tbuf, False):
        return
    _tissues(tt, False, Mt, qx, qy, qz, tbuf, tprobe)
    gm_p = tprobe[0] + tprobe[1]
    wm_p = tprobe[2]
    if not ((gm_e > wm_e and gm_p < wm_p) or (gm_e < wm_e and gm_p > wm_p)):
        return
    if np.float64(gm_e - wm_e) < GMWMI_ACCURACY:
        return
    # curvature = (t[l] - t[l-1]) - (t[l-1] - t[l-2]); extrap = (t[l] - t[l-1]) + curvature
    d = np.empty((4, 3), dtype=np.float32)
    for k in range(3):
        a = b[last, k] - b[last - 1, k]
        curv = a - (b[last - 1, k] - b[last - 2, k])
        d[0, k] = b[last - 2, k]
        d[1, k] = b[last - 1, k]
        d[2, k] = b[last, k]
        d[3, k] = b[last, k] + (a + curv)
    f = np.float32
    t = f(0.5) * f(GMWMI_HERMITE_TENSION)
    lo = f(0.0)
    hi = f(1.0)
    bx, by, bz = ex, ey, ez
    for _ in range(GMWMI_MAX_ITERS):
        mu = f(0.5 * np.float64(lo + hi))
        p2 = mu * mu
        p3 = mu * p2
        w0 = (f(0.5) - t) * ((f(2.0) * p2 - p3) - mu)
        w1 = (f(1.0) + (f(1.5) + t) * p3) - (f(2.5) + t) * p2
        w2 = ((f(2.0) + f(2.0) * t) * p2 + (f(0.5) - t) * mu) - (f(1.5) + t) * p3
        w3 = (f(0.5) - t) * (p3 - p2)
        hx = ((w0 * d[0, 0] + w1 * d[1, 0]) + w2 * d[2, 0]) + w3 * d[3, 0]
        hy = ((w0 * d[0, 1] + w1 * d[1, 1]) + w2 * d[2, 1]) + w3 * d[3, 1]
        hz = ((w0 * d[0, 2] + w1 * d[1, 2]) + w2 * d[2, 2]) + w3 * d[3, 2]
        _tissues(tt, False, Mt, hx, hy, hz, tbuf, tprobe)
        gm = tprobe[0] + tprobe[1]
        wm = tprobe[2]
        if wm > gm:
            lo = mu
        else:
            hi = mu
            bx, by, bz = hx, hy, hz
            if np.float64(gm - wm) < GMWMI_ACCURACY:
                break
    b[last, 0] = bx
    b[last, 1] = by
    b[last, 2] = bz


# --------------------------------------------------------------------------------------------
# One half and one seed (Exec::iterate, gen_track_unidir, seed_track, gen_track, operator())
# --------------------------------------------------------------------------------------------


@njit(**_JIT)
def _act_half(b, n, px, py, pz, ux, uy, uz, state, st, tis, sh, M, cbuf, fp, ip, lut,
              zint, zflt, pint, pflt, mstart, AL, rois, tt, Mt, tbuf,
              add_to_tck):  # fmt: skip
    """``gen_track_unidir`` with ACT (no backtracking): returns (n, term, steps) where term is
    after ``apply_priors``; the caller decides exclusion."""
    roi_set, roi_bit, roi_kind, roi_sph, roi_mat, roi_dim, roi_off, roi_mask = rois
    rk4 = ip[_IP_RK4] != 0
    lmax = ip[_IP_LMAX]
    max_points = ip[_IP_MAXPTS]
    n_inc = ip[_IP_NINC]
    n_ord = ip[_IP_NORD]
    stop = ip[_IP_STOP] != 0 and (n_inc + n_ord) > 0
    steps = 0
    while True:
        term, px, py, pz, ux, uy, uz = _step(
            px, py, pz, ux, uy, uz, rk4, sh, M, cbuf, fp, lut, zint, zflt, pint, pflt,
            mstart, lmax, AL
        )  # fmt: skip
        if term != _CONTINUE:
            if st[_SGM_DEPTH] > 0:
                term = _TERM_IN_SGM
        else:
            steps += 1
            st[_VALID] = 1 if _tissues(tt, True, Mt, px, py, pz, tbuf, tis) else 0
            term = _check_structural(st, tis)
            if term != _CONTINUE:
                pass
            elif ip[_IP_NMASK] > 0 and not _in_set(_ROI_MASK, px, py, pz, roi_set, roi_kind,
                                                   roi_sph, roi_mat, roi_dim, roi_off,
                                                   roi_mask):  # fmt: skip
                term = _EXIT_MASK
            elif ip[_IP_NEXC] > 0 and _in_set(_ROI_EXCLUDE, px, py, pz, roi_set, roi_kind,
                                              roi_sph, roi_mat, roi_dim, roi_off,
                                              roi_mask):  # fmt: skip
                term = _ENTER_EXCLUDE
            elif n_inc + n_ord > 0:
                _visit(px, py, pz, state, roi_set, roi_bit, roi_kind, roi_sph, roi_mat, roi_dim,
                       roi_off, roi_mask)  # fmt: skip
                if stop and _all_visited(state, n_inc, n_ord):
                    term = _TRAVERSE_ALL_INCLUDE
        if add_to_tck[term]:
            b[n, 0] = px
            b[n, 1] = py
            b[n, 2] = pz
            n += 1
        if term == _CONTINUE and n >= max_points:
            term = _LENGTH_EXCEED
        if term != _CONTINUE:
            return n, term, steps


@njit(**_JIT)
def _amplitude(c, ux, uy, uz, lut, inc, zint, pint, mstart, lmax):
    """FOD amplitude along unit u: ``PrecomputedAL::value`` (SD_Stream's ``FOD (dir)``).

    Legendre values interpolated between table rows at the elevation ``acos(u_z)`` (float32),
    the azimuth rotated term by term from ``(u_x, u_y) / r_xy``; each m > 0 term is added in
    double (``Math::sqrt2`` is a double) and the sum rounded back to float32."""
    f0 = np.float32(0.0)
    f1 = np.float32(1.0)
    nAL = np.uint64(n_legendre_nb(lmax))
    el = math.acos(uz)
    fr2 = el / inc
    row = 0
    fr1 = f1
    if fr2 != fr2:
        fr2 = f0
    else:
        ii = int(fr2)
        if ii < 0 or ii >= LUT_LAST_ROW:
            row = 0 if ii < 0 else LUT_LAST_ROW
            fr2 = f0
        else:
            row = ii
            fr2 = fr2 - np.float32(ii)
            fr1 = f1 - fr2
    r0 = np.uint64(row) * nAL
    r1 = r0 + nAL
    rxy = np.float32(math.sqrt(uy * uy + ux * ux))
    cp = ux / rxy if rxy != f0 else f1
    sp = uy / rxy if rxy != f0 else f0
    v = f0
    al = fr1 * lut[r0]
    if fr2 != f0:
        al += fr2 * lut[r1]
    v += al * c[0]
    for z in range(zint.shape[0]):
        e = zint[z, 1]
        al = fr1 * lut[r0 + e]
        if fr2 != f0:
            al += fr2 * lut[r1 + e]
        v += al * c[zint[z, 0]]
    c0 = f1
    s0 = f0
    for m in range(1, lmax + 1):
        cm = c0 * cp - s0 * sp
        sm = s0 * cp + c0 * sp
        for qq in range(mstart[m], mstart[m + 1]):
            qi = np.uint64(qq) * np.uint64(7)
            e = pint[qi + np.uint64(2)]
            al = fr1 * lut[r0 + e]
            if fr2 != f0:
                al += fr2 * lut[r1 + e]
            inner = cm * c[pint[qi]] + sm * c[pint[qi + np.uint64(1)]]
            v = np.float32(np.float64(v) + (np.float64(al) * _SQRT2) * np.float64(inner))
        c0 = cm
        s0 = sm
    return v


@njit(**_JIT)
def _truncate_exit_sgm(b, n, depth, sh, M, cbuf, lut, inc, zint, pint, mstart, lmax):
    """``Exec::truncate_exit_sgm``: of the last ``depth`` points (the sub-cortical stretch),
    keep up to the first one where the FOD amplitude along the incoming segment is lowest
    (0 where there is no FOD data). Returns the new point count."""
    best = n - 1
    lowest = np.float32(np.inf)
    for i in range(n - depth, n):
        ux, uy, uz = _normalize3(b[i, 0] - b[i - 1, 0], b[i, 1] - b[i - 1, 1],
                                 b[i, 2] - b[i - 1, 2])  # fmt: skip
        value = np.float32(0.0)
        if _sample(sh, M, b[i, 0], b[i, 1], b[i, 2], cbuf):
            value = _amplitude(cbuf, ux, uy, uz, lut, inc, zint, pint, mstart, lmax)
        if value < lowest:
            lowest = value
            best = i
    return best + 1


@njit(**_JIT)
def _act_finish_half(b, n, term, st, tis, crop, tt, Mt, tbuf, tprobe, sh, M, cbuf, fp, ip, lut,
                     zint, pint, mstart):  # fmt: skip
    """``apply_priors`` + the EXIT_SGM / crop steps of ``gen_track_unidir``.

    Returns (n, term, reject): the point count after any truncation, and the :class:`Reject`
    code when the half excluded the streamline, else ``_ACCEPTED``."""
    in_path = st[_VALID] != 0 and _is_path(tis[0], tis[1], tis[2], tis[3], tis[4])
    term, excluded = _act_priors(term, st[_SGM_DEPTH], in_path)
    if term == _EXIT_SGM:
        n = _truncate_exit_sgm(b, n, st[_SGM_DEPTH], sh, M, cbuf, lut, fp[_FP_INC], zint, pint,
                               mstart, ip[_IP_LMAX])  # fmt: skip
    if excluded:
        return n, term, _act_exclusion_reason(term)
    if term == _ENTER_CGM and crop:
        _crop_end(b, n, tt, Mt, tbuf, tprobe)
    return n, term, _ACCEPTED


@njit(**_JIT)
def _act_seed_usable(px, py, pz, st, tis, sh, M, cbuf, ip, rois, tt, Mt, tbuf):
    """``check_seed`` with ACT, then the data test of ``SDStream::init``."""
    roi_set, roi_bit, roi_kind, roi_sph, roi_mat, roi_dim, roi_off, roi_mask = rois
    if not (np.isfinite(px) and np.isfinite(py) and np.isfinite(pz)):
        return False
    if ip[_IP_NMASK] > 0 and not _in_set(_ROI_MASK, px, py, pz, roi_set, roi_kind, roi_sph,
                                         roi_mat, roi_dim, roi_off, roi_mask):  # fmt: skip
        return False
    if ip[_IP_NEXC] > 0 and _in_set(_ROI_EXCLUDE, px, py, pz, roi_set, roi_kind, roi_sph,
                                    roi_mat, roi_dim, roi_off, roi_mask):  # fmt: skip
        return False
    st[_SGM_DEPTH] = 0
    valid = _tissues(tt, True, Mt, px, py, pz, tbuf, tis)
    st[_VALID] = 1 if valid else 0
    if not valid:
        return False
    c, s, w, f, p = _classes(tis)
    if _is_sgm(c, s, w, f, p):
        st[_SEED_IN_SGM] = 1
        st[_SGM_SEED_TO_WM] = 0
    else:
        st[_SEED_IN_SGM] = 0
        if not _act_seed_ok(c, s, w, f, p):
            return False
    return _sample(sh, M, px, py, pz, cbuf)


@njit(**_JIT)
def _act_post(b, n, seed, excluded_reason, missed, st, ip, fp, crop):
    """``track_rejected`` with ACT then ``check_downsampled_length`` (with -crop_at_gmwmi or
    -downsample: downsampled in place, then an over-long streamline is rejected, not truncated).
    Returns ``(status, n, seed)``: ``_ACCEPTED`` or a :class:`Reject` code, and the point count
    and seed index after downsampling."""
    if excluded_reason != _ACCEPTED:
        return excluded_reason, n, seed
    min_points = ip[_IP_MINPTS]
    if n == 1 and min_points > 1:
        return _NO_PROPAGATION, n, seed
    if n < min_points:
        return _TOO_SHORT, n, seed
    if ip[_IP_MAXPTS] != 2 and st[_SEED_IN_SGM] != 0 and st[_SGM_SEED_TO_WM] == 0:
        return _ACT_FAILED_WM, n, seed
    if missed:
        return _MISSED_INCLUDE, n, seed
    R = ip[_IP_DOWNSAMPLE]
    if not crop and R <= 1:
        return _ACCEPTED, n, seed
    if R > 1:
        n, seed = _downsample(b, n, seed, R)
    if not (n > ip[_IP_MINPOST] and n < ip[_IP_MAXPOST]):
        length = np.float32(0.0)
        for k in range(1, n):
            length += _seg_norm(b, k)
        if length < fp[_FP_MINLEN]:
            return _TOO_SHORT, n, seed
        if length > fp[_FP_MAXLEN]:
            return _TRACK_TOO_LONG, n, seed
    return _ACCEPTED, n, seed


@njit(**_JIT)
def _act_track_seed(i, seeds, dirs, buf, out_n, out_seed, out_status, out_term, out_u0,
                    out_steps, sh, M, fp, ip, lut, zint, zflt, pint, pflt, mstart, rois,
                    tt, Mt, crop, add_to_tck, cbuf, AL, state, st, tis, tbuf,
                    tprobe):  # fmt: skip
    """Track seed ``i`` with ACT into ``buf[i]`` (see :func:`fused_cpu._track_seed`)."""
    roi_set, roi_bit, roi_kind, roi_sph, roi_mat, roi_dim, roi_off, roi_mask = rois
    _start_seed(i, state, out_n, out_seed, out_term, out_u0, out_steps, out_status)
    px = seeds[i, 0]
    py = seeds[i, 1]
    pz = seeds[i, 2]
    if not _act_seed_usable(px, py, pz, st, tis, sh, M, cbuf, ip, rois, tt, Mt,
                            tbuf):  # fmt: skip
        return
    ok, ux, uy, uz = _start_direction(dirs, i)
    if not ok:
        return
    amp, ux, uy, uz = _get_peak(cbuf, ux, uy, uz, lut, fp[_FP_INC], zint, zflt, pint, pflt,
                                mstart, ip[_IP_LMAX], AL)  # fmt: skip
    if not np.isfinite(amp) or amp < fp[_FP_CUTOFF]:
        out_u0[i, 0] = ux
        out_u0[i, 1] = uy
        out_u0[i, 2] = uz
        return
    # --- gen_track
    unidir = ip[_IP_UNIDIR] != 0
    if not unidir:
        unidir, ux, uy, uz = _seed_is_unidirectional(st, tis, tt, Mt, px, py, pz, ux, uy,
                                                     uz, tbuf, tprobe)  # fmt: skip
    out_u0[i, 0] = ux
    out_u0[i, 1] = uy
    out_u0[i, 2] = uz
    n_inc = ip[_IP_NINC]
    n_ord = ip[_IP_NORD]
    if n_inc + n_ord > 0:
        _visit(px, py, pz, state, roi_set, roi_bit, roi_kind, roi_sph, roi_mat, roi_dim,
               roi_off, roi_mask)  # fmt: skip
    b = buf[i]
    b[0, 0] = px
    b[0, 1] = py
    b[0, 2] = pz
    n, t0, steps = _act_half(b, 1, px, py, pz, ux, uy, uz, state, st, tis, sh, M, cbuf,
                             fp, ip, lut, zint, zflt, pint, pflt, mstart, AL, rois, tt, Mt,
                             tbuf, add_to_tck)  # fmt: skip
    n, t0, reason = _act_finish_half(b, n, t0, st, tis, crop, tt, Mt, tbuf, tprobe, sh, M, cbuf,
                                     fp, ip, lut, zint, pint, mstart)  # fmt: skip
    out_term[i, 0] = t0
    seed = 0
    if reason == _ACCEPTED and not unidir:
        _reverse(b, n)
        seed = n - 1
        st[_SGM_DEPTH] = 0  # reverse_track
        n, t1, s1 = _act_half(b, n, b[n - 1, 0], b[n - 1, 1], b[n - 1, 2], -ux, -uy, -uz, state,
                              st, tis, sh, M, cbuf, fp, ip, lut, zint, zflt, pint, pflt,
                              mstart, AL, rois, tt, Mt, tbuf, add_to_tck)  # fmt: skip
        n, t1, reason = _act_finish_half(b, n, t1, st, tis, crop, tt, Mt, tbuf, tprobe, sh, M,
                                         cbuf, fp, ip, lut, zint, pint, mstart)  # fmt: skip
        out_term[i, 1] = t1
        steps += s1
    out_steps[i] = steps
    missed = n_inc + n_ord > 0 and not _all_visited(state, n_inc, n_ord)
    status, n, seed = _act_post(b, n, seed, reason, missed, st, ip, fp, crop)
    out_status[i] = status
    if status == _ACCEPTED:
        out_n[i] = n
        out_seed[i] = seed


@njit(**_JIT)
def _act_track_rows(seeds, dirs, buf, out_n, out_seed, out_status, out_term, out_u0, out_steps,
                    sh, M, fp, ip, lut, zint, zflt, pint, pflt, mstart, rois, tt,
                    Mt, crop, add_to_tck):  # fmt: skip
    """Every seed of the chunk, serially (one call per chunk)."""
    cbuf = np.empty(sh.shape[3], dtype=np.float32)
    AL = np.empty(n_legendre_nb(ip[_IP_LMAX]), dtype=np.float32)
    state = np.zeros(3, dtype=np.int64)
    st = np.zeros(4, dtype=np.int64)
    tis = np.zeros(5, dtype=np.float32)
    tprobe = np.zeros(5, dtype=np.float32)
    tbuf = np.empty(5, dtype=np.float32)
    for i in range(seeds.shape[0]):
        _act_track_seed(i, seeds, dirs, buf, out_n, out_seed, out_status, out_term, out_u0,
                        out_steps, sh, M, fp, ip, lut, zint, zflt, pint, pflt, mstart,
                        rois, tt, Mt, crop, add_to_tck, cbuf, AL, state, st, tis,
                        tbuf, tprobe)  # fmt: skip


@njit(**_JIT)
def _act_seeds_ok_kernel(seeds, tt, Mt, out):
    """The ACT part of ``check_seed`` for every seed (tissues valid and ``act_seed_ok``)."""
    tbuf = np.empty(5, dtype=np.float32)
    tis = np.zeros(5, dtype=np.float32)
    for i in range(seeds.shape[0]):
        px = seeds[i, 0]
        py = seeds[i, 1]
        pz = seeds[i, 2]
        if not (np.isfinite(px) and np.isfinite(py) and np.isfinite(pz)):
            out[i] = False
            continue
        if not _tissues(tt, True, Mt, px, py, pz, tbuf, tis):
            out[i] = False
            continue
        out[i] = _act_seed_ok(tis[0], tis[1], tis[2], tis[3], tis[4])


@njit(**_JIT)
def _pack(buf, lengths, out, start):
    """Copy the first ``lengths[i]`` points of each row of ``buf`` ``[C, L, 3]`` into ``out``
    from row ``start`` on; returns the next free row."""
    o = start
    for i in range(lengths.shape[0]):
        for k in range(lengths[i]):
            out[o, 0] = buf[i, k, 0]
            out[o, 1] = buf[i, k, 1]
            out[o, 2] = buf[i, k, 2]
            o += 1
    return o


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------


def _act_arrays(act: ActImage):
    tt = np.ascontiguousarray(act.data, dtype=np.float32)
    Mt = np.ascontiguousarray(np.asarray(act.scanner2voxel, dtype=np.float64)[:3, :4])
    return tt, Mt


def track_fused_cpu_act(
    sh: np.ndarray,
    scanner2voxel: np.ndarray,
    seeds: np.ndarray,
    init_dirs: np.ndarray,
    params,
    act: ActImage,
    rois: RoiSet | None = None,
    chunk_size: int = 8192,
) -> EngineResult:
    """SD_Stream with ACT from every seed, tckgen-exactly (single thread, like ``-nthreads 0``).

    Args: as :func:`invtract.tracking.fused_cpu.track_fused_cpu`, plus ``act`` (the 5TT image,
    :func:`invtract.tracking.act.load_act`). ``params`` must already carry ACT's defaults
    (:func:`invtract.tracking.act.act_parameters`).

    Returns:
        :class:`EngineResult`; terminations in MRtrix's categories (ENTER_CGM, ENTER_CSF, ...),
        rejections as :class:`Reject` codes (ACT_POOR_TERMINATION, TRACK_TOO_LONG, ...).
    """
    k = _kernel_inputs(sh, scanner2voxel, seeds, init_dirs, params, rois)
    tt, Mt = _act_arrays(act)
    N = k.seeds.shape[0]
    parts = []
    t0 = time.perf_counter()
    for start in range(0, N, max(1, int(chunk_size))):
        stop = min(N, start + max(1, int(chunk_size)))
        C = stop - start
        buf = np.empty((C, k.L, 3), dtype=np.float32)
        c_n = np.zeros(C, dtype=np.int64)
        c_seed = np.zeros(C, dtype=np.int64)
        c_status = np.zeros(C, dtype=np.int64)
        c_term = np.zeros((C, 2), dtype=np.int64)
        c_u0 = np.zeros((C, 3), dtype=np.float32)
        c_steps = np.zeros(C, dtype=np.int64)
        _act_track_rows(k.seeds[start:stop], k.init_dirs[start:stop], buf, c_n, c_seed,
                        c_status, c_term, c_u0, c_steps, *k.fod, *k.consts, tuple(k.rois), tt,
                        Mt, bool(act.crop_at_gmwmi), _ADD_TO_TCK)  # fmt: skip
        out = np.empty((int(c_n.sum()), 3), dtype=np.float32)
        _pack(buf, c_n, out, 0)
        parts.append(
            EngineResult(
                out,
                c_n,
                c_seed,
                c_status.astype(np.int8),
                c_term.astype(np.int8),
                c_u0,
                counts={"steps": int(c_steps.sum())},
            )  # fmt: skip
        )
    return concat_results(parts, seconds=time.perf_counter() - t0)


def act_seed_checker(sh: np.ndarray, scanner2voxel: np.ndarray, rois: RoiSet, act: ActImage):
    """Which seeds tckgen -act tracks at all (and so draws a random direction for):
    ``check_seed`` with the ACT test, then data at the seed. Returns ``f([n, 3]) -> [n]`` bool
    for :func:`invtract.tracking.runner.run_seeding`'s ``seed_check``."""
    from .runner import SeedChecker

    base = SeedChecker(sh, scanner2voxel, rois)
    tt, Mt = _act_arrays(act)

    def check(p: np.ndarray) -> np.ndarray:
        p = np.ascontiguousarray(p, dtype=np.float32).reshape(-1, 3)
        ok = np.zeros(p.shape[0], dtype=np.bool_)
        _act_seeds_ok_kernel(p, tt, Mt, ok)
        return ok & np.asarray(base(p), bool)

    return check
