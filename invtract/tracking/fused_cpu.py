"""Fused CPU engine: MRtrix3 3.0.3 ``tckgen -algorithm SD_Stream`` in one numba kernel.

Each seed's whole streamline (seed checks, peak search at the seed, both halves, RK4, ROIs,
length rules, downsampling, max-length truncation) is tracked inside compiled code, in parallel
over seeds on Python threads (the kernel releases the GIL; see ``_run_rows``). Arithmetic
follows the C++ types step by step (float32 where MRtrix uses ``float``, float64 where it uses
``double``) so that streamlines match tckgen point for point; the rules and the order of
operations are those of the spec (``sd_stream_spec.md`` §2-§7) and of the MRtrix3 sources named
next to each helper below.

Exactness notes (places where the C++ source or its compiled form, not the maths, decides the
bits; checked against the disassembly of the Debian 3.0.3 ``tckgen``, SSE2, no FMA):

* Interpolation (``core/interp/linear.h``): each coefficient is ``coeff_vec.dot(factors)``, an
  Eigen dot product of two fixed-size 8-vectors evaluated with 4-wide SSE packets:
  ``t_k = c_k w_k + c_{k+4} w_{k+4}``, then ``(t_0 + t_2) + (t_1 + t_3)`` (corner
  ``k = x + 2y + 4z``). ``_SUM_ORDER_EIGEN = False`` switches to a plain sequential sum.
* ``scanner2voxel * p`` (double): rows 0-1 are one SSE2 packet, ``((a0 + a1) + a2) + t``; row 2
  is ``(a0 + a1) + (a2 + t)``. Float32 image-ROI transforms: ``(a0 + a1) + (a2 + t)`` per row.
* Eigen float 3-vector reductions (dot, squaredNorm) sum as ``a0 + (a1 + a2)``; ``normalize()``
  divides each component by ``sqrt(squaredNorm)``.
* The start direction is normalised twice, as tckgen does (once where it is made --
  ``random_direction()`` or the ``-seed_direction`` parser -- and again in ``SDStream::init``):
  pass the *raw* direction (the unnormalised random vector, or the user's triple).
* Image ROIs use MRtrix's float32 copy of their scanner->voxel transform (``roi.h``: ``Mask``
  stores ``scanner2voxel.cast<float>()``), evaluated in float32.
* Bit-exact output also needs the Legendre table built with glibc ``cosf`` row angles and the
  FOD's scanner->voxel matrix computed as MRtrix does (from the image header, Eigen's cofactor
  inverse); with those, every tested configuration (first order, RK4, downsampling with
  truncation, include / exclude / mask spheres, min / max length) matched tckgen bit for bit.
* Inputs decide marginal steps: a peak search that converges on its 50th iteration, or a
  cutoff / angle test within float32 rounding, follows ulp-level changes of p and u. The
  transform must therefore be the one tckgen read (``fod.mif``'s double-precision header, not a
  NIfTI copy's float32 sform), and seeds/directions tckgen's own: real_msmt15 ``whole.tck``
  streamline 2168 re-tracked on ``fod.nii.gz`` has 103 points here *and in tckgen run on that
  file*, 84 on ``fod.mif``; with the seeds file's positions and the replayed random directions
  all 7132 streamlines of that file come out bit for bit (``test_fused_cpu.py``).

Public API: :func:`track_fused_cpu`, :func:`track_fused_cpu_peaks` (the same kernel, also
returning each point's peak direction: the hard pass of the differentiable tracker) and
:func:`available`.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass

import numpy as np

from ..fod.legendre import legendre_index, legendre_table, lut_increment, n_legendre
from ..fod.peak_tables import peak_tables
from ..fod.sh_layout import lmax_from_n
from ..params import ResolvedParameters
from .numba_import import NUMBA_ERROR as _NUMBA_ERROR
from .numba_import import njit, numba
from .rules import (
    FOV_HALF_VOXEL,
    LUT_LAST_ROW,
    PEAK_MAX_ITERATIONS,
    PEAK_MAX_STEP_RAD,
    PEAK_TOLERANCE_RAD,
    POLE_SIN_THRESHOLD,
    SQRT2,
    WEIGHT_THRESHOLD,
    track_rejection,
)
from .types import (
    TERM_ADD_TO_TCK,
    EngineResult,
    ImageRoi,
    Reject,
    RoiSet,
    SphereRoi,
    Term,
    concat_results,
)

__all__ = [
    "track_fused_cpu",
    "track_fused_cpu_peaks",
    "prepare_fod",
    "FusedFOD",
    "available",
    "warmup",
]


def available() -> bool:
    """True when numba imported, i.e. the compiled engine can run."""
    return numba is not None


_TARGET_READY = False


def _prepare_numba_target() -> None:
    """Initialise numba's CPU target (once) without letting it import scipy.linalg.

    On first use numba imports ``scipy.linalg`` (0.3 s, a fifth of ``invtract track``'s whole
    run) only to record whether a BLAS exists for ``np.correlate`` / ``np.convolve``; no kernel
    uses them. When scipy.linalg is not loaded yet, that import is made to fail for the
    duration, so numba records "no BLAS" for those two functions in this process (they then use
    a plain loop); everything else, ``np.dot`` included, still finds scipy's BLAS when compiled.
    """
    global _TARGET_READY
    if _TARGET_READY or numba is None:
        return

    from numba.core.registry import cpu_target

    blocked = "scipy.linalg" not in sys.modules
    if blocked:
        sys.modules["scipy.linalg"] = None  # type: ignore[assignment]
    try:
        cpu_target.target_context.refresh()
    finally:
        if blocked:
            del sys.modules["scipy.linalg"]
    _TARGET_READY = True


_JIT = dict(cache=True, fastmath=False, error_model="numpy", boundscheck=False, nogil=True)
# Compile structure (cold start): numba inlines ``inline="always"`` helpers by deep-copying
# their IR into the caller and re-running its passes on it, once per site and level of
# nesting: that inlining was half of the first compilation. Inlining therefore stops at one
# compiled step: ``_step`` (a plain call, once per step) inlines ``_next``, which calls the
# interpolation ``_sample`` and the peak search ``_get_peak`` (each compiled once and shared
# with the seed test and the seed's peak search, which goes through ``_step``; the calls cost
# ~3% of the kernel's time per step, inlined copies ~2 s of every first compile). The scalar
# helpers (``_dot3``, ``_normalize3``, ``_round_half_away``) are compiled calls that LLVM
# inlines (no arrays, no reference counts). Call sites pass typed values (``np.int64(1)``,
# ``np.bool_(False)``), not literals, so that every kernel has one specialisation per kind of
# ``rois`` argument: the region arrays, or None when there are no regions, and then numba
# prunes the ``rois is not None`` branches before typing and the region code is not compiled
# at all (``tests/tracking/test_compile_structure.py``).

#: Eigen's SSE evaluation order of the 8-corner dot product (see module docstring).
_SUM_ORDER_EIGEN = True

# term / reject codes as plain ints for the kernels
_CONTINUE = int(Term.CONTINUE)
_EXIT_IMAGE = int(Term.EXIT_IMAGE)
_MODEL = int(Term.MODEL)
_HIGH_CURVATURE = int(Term.HIGH_CURVATURE)
_LENGTH_EXCEED = int(Term.LENGTH_EXCEED)
_EXIT_MASK = int(Term.EXIT_MASK)
_ENTER_EXCLUDE = int(Term.ENTER_EXCLUDE)
_TRAVERSE_ALL_INCLUDE = int(Term.TRAVERSE_ALL_INCLUDE)
_ADD_TO_TCK = np.array([bool(TERM_ADD_TO_TCK[Term(t)]) for t in range(len(Term))], dtype=np.bool_)

_ACCEPTED = int(Reject.ACCEPTED)
_INVALID_SEED = int(Reject.INVALID_SEED)
_TOO_SHORT = int(Reject.TRACK_TOO_SHORT)

# ROI set identifiers
_ROI_INCLUDE, _ROI_EXCLUDE, _ROI_MASK, _ROI_ORDERED = 0, 1, 2, 3

# indices into the float / int parameter vectors handed to the kernel
_FP_STEP, _FP_CUTOFF, _FP_DOT, _FP_COS_RK4, _FP_MINLEN, _FP_MAXLEN, _FP_INC = range(7)
(
    _IP_MAXPTS,
    _IP_MINPTS,
    _IP_MINPOST,
    _IP_MAXPOST,
    _IP_DOWNSAMPLE,
    _IP_RK4,
    _IP_UNIDIR,
    _IP_STOP,
    _IP_LMAX,
    _IP_NINC,
    _IP_NORD,
    _IP_NEXC,
    _IP_NMASK,
) = range(_IP_LEN := 13)

_SQRT2 = SQRT2  # Math::sqrt2 (double), from the rulebook
#: "no such Legendre term" in the kernel's unsigned index tables (see _kernel_tables)
_ABSENT = np.uint64(2**63)
_MAX_BUFFER_POINTS = 1_000_000


# --------------------------------------------------------------------------------------------
# small float helpers
# --------------------------------------------------------------------------------------------

#: the rulebook's ``track_rejected``, compiled into the kernel
_track_rejection = njit(inline="always", **_JIT)(track_rejection)


@njit(**_JIT)
def _round_half_away(v):
    """std::round for float32 / float64 (half away from zero), returned as int64."""
    a = abs(v)
    r = np.floor(a)
    if a - r >= 0.5:
        r += 1.0
    if v < 0:
        return -np.int64(r)
    return np.int64(r)


@njit(**_JIT)
def _dot3(ax, ay, az, bx, by, bz):
    """Eigen Vector3f::dot order: x*x' + (y*y' + z*z')."""
    return ax * bx + (ay * by + az * bz)


@njit(**_JIT)
def _normalize3(x, y, z):
    """Eigen normalize(): divide by sqrt(squaredNorm) when squaredNorm > 0 (float32)."""
    sq = x * x + (y * y + z * z)
    if sq > np.float32(0.0):
        s = np.float32(math.sqrt(sq))
        return x / s, y / s, z / s
    return x, y, z


# --------------------------------------------------------------------------------------------
# FOD interpolation (spec §2; core/interp/{base,linear,masked}.h, tracking/method.h get_data)
# --------------------------------------------------------------------------------------------


@njit(**_JIT)
def _sample(sh, M, px, py, pz, out):
    """Interpolate the SH coefficients at scanner point p (float32) into ``out``.

    ``sh`` is ``[X, Y, Z, K]`` with each voxel's K coefficients contiguous (C order, or a
    strided view such as a memory-mapped ``.mif`` whose spatial axes are in another order).

    Returns False for "no data" (outside the FOV, all-zero nearest voxel, NaN c_0).
    """
    return _interp(sh, M, px, py, pz, out, True)


@njit(inline="always", **_JIT)
def _interp(sh, M, px, py, pz, out, masked):
    """:func:`_sample`; with ``masked`` False an all-zero nearest voxel still counts as data
    (MRtrix's plain, unmasked interpolator, e.g. ACT's 5TT image when cropping)."""
    nx = sh.shape[0]
    ny = sh.shape[1]
    nz = sh.shape[2]
    K = sh.shape[3]
    dx = np.float64(px)
    dy = np.float64(py)
    dz = np.float64(pz)
    # Eigen's 3x4 affine times [p, 1] as tckgen's build evaluates it: rows 0-1 as one SSE2
    # packet (sequential multiply-adds), row 2 as a scalar pairwise reduction.
    v0 = ((M[0, 0] * dx + M[0, 1] * dy) + M[0, 2] * dz) + M[0, 3]
    v1 = ((M[1, 0] * dx + M[1, 1] * dy) + M[1, 2] * dz) + M[1, 3]
    v2 = (M[2, 0] * dx + M[2, 1] * dy) + (M[2, 2] * dz + M[2, 3])
    # exclusive FOV test; written so that NaN counts as outside
    if not (v0 > -FOV_HALF_VOXEL and v0 < nx - FOV_HALF_VOXEL):
        return False
    if not (v1 > -FOV_HALF_VOXEL and v1 < ny - FOV_HALF_VOXEL):
        return False
    if not (v2 > -FOV_HALF_VOXEL and v2 < nz - FOV_HALF_VOXEL):
        return False
    # implicit mask: no data if every coefficient of the nearest voxel is 0 (NaN != 0 counts
    # as data); read in place, so untouched parts of a memory-mapped FOD are never loaded
    if masked:
        nearest = sh[_round_half_away(v0), _round_half_away(v1), _round_half_away(v2)]
        empty = True
        for k in range(K):
            if nearest[k] != 0.0:
                empty = False
                break
        if empty:
            return False
    fl0 = np.floor(v0)
    fl1 = np.floor(v1)
    fl2 = np.floor(v2)
    f0 = v0 - fl0
    f1 = v1 - fl1
    f2 = v2 - fl2
    if v0 < 0.0 or v0 > nx - 1.0:
        f0 = 0.0
    if v1 < 0.0 or v1 > ny - 1.0:
        f1 = 0.0
    if v2 < 0.0 or v2 > nz - 1.0:
        f2 = 0.0
    c0 = np.int64(fl0)
    c1 = np.int64(fl1)
    c2 = np.int64(fl2)
    x0 = min(max(c0, 0), nx - 1)
    x1 = min(max(c0 + 1, 0), nx - 1)
    y0 = min(max(c1, 0), ny - 1)
    y1 = min(max(c1 + 1, 0), ny - 1)
    z0 = min(max(c2, 0), nz - 1)
    z1 = min(max(c2 + 1, 0), nz - 1)
    wx0 = np.float32(1.0 - f0)
    wx1 = np.float32(f0)
    wy0 = np.float32(1.0 - f1)
    wy1 = np.float32(f1)
    wz0 = np.float32(1.0 - f2)
    wz1 = np.float32(f2)
    eps = np.float32(WEIGHT_THRESHOLD)
    zero = np.float32(0.0)
    # corner k = x + 2y + 4z; weight = wx * (wy * wz)
    w0 = wx0 * (wy0 * wz0)
    w1 = wx1 * (wy0 * wz0)
    w2 = wx0 * (wy1 * wz0)
    w3 = wx1 * (wy1 * wz0)
    w4 = wx0 * (wy0 * wz1)
    w5 = wx1 * (wy0 * wz1)
    w6 = wx0 * (wy1 * wz1)
    w7 = wx1 * (wy1 * wz1)
    if w0 < eps:
        w0 = zero
    if w1 < eps:
        w1 = zero
    if w2 < eps:
        w2 = zero
    if w3 < eps:
        w3 = zero
    if w4 < eps:
        w4 = zero
    if w5 < eps:
        w5 = zero
    if w6 < eps:
        w6 = zero
    if w7 < eps:
        w7 = zero
    a0 = sh[x0, y0, z0]
    a1 = sh[x1, y0, z0]
    a2 = sh[x0, y1, z0]
    a3 = sh[x1, y1, z0]
    a4 = sh[x0, y0, z1]
    a5 = sh[x1, y0, z1]
    a6 = sh[x0, y1, z1]
    a7 = sh[x1, y1, z1]
    if _SUM_ORDER_EIGEN:
        for k in range(K):
            t0 = a0[k] * w0 + a4[k] * w4
            t1 = a1[k] * w1 + a5[k] * w5
            t2 = a2[k] * w2 + a6[k] * w6
            t3 = a3[k] * w3 + a7[k] * w7
            out[k] = (t0 + t2) + (t1 + t3)
    else:
        for k in range(K):
            s = a0[k] * w0
            s += a1[k] * w1
            s += a2[k] * w2
            s += a3[k] * w3
            s += a4[k] * w4
            s += a5[k] * w5
            s += a6[k] * w6
            s += a7[k] * w7
            out[k] = s
    return not np.isnan(out[0])


# --------------------------------------------------------------------------------------------
# Peak search (spec §3; core/math/SH.h get_peak / derivatives / PrecomputedAL, float32)
# --------------------------------------------------------------------------------------------


@njit(**_JIT)
def _get_peak(c, ux, uy, uz, lut, inc, zint, zflt, pint, pflt, mstart, lmax, AL):
    """Newton-style ascent from direction u; returns (amplitude, ux, uy, uz).

    Amplitude is NaN (and u NaN) after 50 iterations without convergence.
    """
    f0 = np.float32(0.0)
    f1c = np.float32(1.0)
    half = np.float32(0.5)
    mhalf = np.float32(-0.5)
    quarter = np.float32(0.25)
    nAL = AL.shape[0]
    nzon = zint.shape[0]
    for _it in range(PEAK_MAX_ITERATIONS):
        az = math.atan2(uy, ux)
        el = math.acos(uz)
        sel = math.sin(el)
        cel = math.cos(el)
        caz1 = math.cos(az)
        saz1 = math.sin(az)
        atpole = sel < POLE_SIN_THRESHOLD
        # --- Legendre lookup (PrecomputedAL::set / get)
        fr2 = el / inc
        if fr2 != fr2:
            row = 0
            fr1 = f1c
            fr2 = f0
        else:
            ii = int(fr2)
            if ii < 0:
                row = 0
                fr1 = f1c
                fr2 = f0
            elif ii >= LUT_LAST_ROW:
                row = LUT_LAST_ROW
                fr1 = f1c
                fr2 = f0
            else:
                row = ii
                fr2 = fr2 - np.float32(ii)
                fr1 = f1c - fr2
        r0 = np.uint64(row) * np.uint64(nAL)
        if fr2 != f0:
            r1 = r0 + np.uint64(nAL)
            for e in range(nAL):
                ue = np.uint64(e)
                AL[ue] = fr1 * lut[r0 + ue] + fr2 * lut[r1 + ue]
        else:
            for e in range(nAL):
                ue = np.uint64(e)
                AL[ue] = fr1 * lut[r0 + ue]
        # --- derivatives
        amplitude = c[0] * AL[0]
        dEl = f0
        dAz = f0
        dEl2 = f0
        dElAz = f0
        dAz2 = f0
        for z in range(nzon):
            v = c[zint[z, 0]]
            a = zint[z, 1]
            amplitude += v * AL[a]
            dEl += v * zflt[z, 0] * AL[a + np.uint64(1)]
            dEl2 += (v * (zflt[z, 1] * AL[a + np.uint64(2)] - zflt[z, 2] * AL[a])) * half
        for m in range(1, lmax + 1):
            fm = np.float32(m)
            if m == 1:  # 1 * az == az exactly: the same cosf / sinf values
                caz = np.float32(_SQRT2 * np.float64(caz1))
                saz = np.float32(_SQRT2 * np.float64(saz1))
            else:
                maz = fm * az
                caz = np.float32(_SQRT2 * np.float64(math.cos(maz)))
                saz = np.float32(_SQRT2 * np.float64(math.sin(maz)))
            for qq in range(mstart[m], mstart[m + 1]):
                qi = np.uint64(qq) * np.uint64(7)
                qf = np.uint64(qq) * np.uint64(5)
                vp = c[pint[qi]]
                vm = c[pint[qi + np.uint64(1)]]
                alm = AL[pint[qi + np.uint64(2)]]
                A = vp * caz + vm * saz
                amplitude += A * alm
                tmp = pflt[qf] * AL[pint[qi + np.uint64(3)]]
                if pint[qi + np.uint64(4)] != _ABSENT:
                    tmp -= pflt[qf + np.uint64(1)] * AL[pint[qi + np.uint64(4)]]
                tmp = tmp * mhalf
                dEl += A * tmp
                tmp2 = pflt[qf + np.uint64(2)] * alm
                if m == 1:
                    tmp2 -= pflt[qf + np.uint64(3)] * AL[pint[qi + np.uint64(5)]]
                else:
                    tmp2 += pflt[qf + np.uint64(3)] * AL[pint[qi + np.uint64(5)]]
                if pint[qi + np.uint64(6)] != _ABSENT:
                    tmp2 += pflt[qf + np.uint64(4)] * AL[pint[qi + np.uint64(6)]]
                tmp2 = tmp2 * quarter
                dEl2 += A * tmp2
                B = vm * caz - vp * saz
                if atpole:
                    dAz += B * tmp
                else:
                    mB = fm * B
                    dElAz += mB * tmp
                    dAz += mB * alm
                    dAz2 -= ((A * fm) * fm) * alm
        if not atpole:
            dAz = dAz / sel
            dElAz = dElAz / sel
            dAz2 = dAz2 / (sel * sel)
        # --- one ascent step
        nrm = np.float32(math.sqrt(dEl * dEl + dAz * dAz))
        gAz = f0
        gEl = f0
        if nrm != f0:
            gAz = dAz / nrm
            gEl = dEl / nrm
        s1 = gAz * dAz + gEl * dEl
        s2 = np.float32(
            (
                np.float64(gAz * gAz * dAz2)
                + ((2.0 * np.float64(gAz)) * np.float64(gEl)) * np.float64(dElAz)
            )
            + np.float64(gEl * gEl * dEl2)
        )
        if s2 != f0:
            dt = -s1 / s2
        else:
            dt = f0
        if dt < 0.0:
            dt = -dt
        if dt > PEAK_MAX_STEP_RAD:
            dt = np.float32(PEAK_MAX_STEP_RAD)
        if dt != dt:
            # NaN step: u becomes NaN and stays NaN; the search can only fail
            return np.float32(np.nan), np.float32(np.nan), np.float32(np.nan), np.float32(np.nan)
        gEl = gEl * dt
        gAz = gAz * dt
        ux = ux + ((gEl * caz1) * cel - gAz * saz1)
        uy = uy + ((gEl * saz1) * cel + gAz * caz1)
        uz = uz - gEl * sel
        ux, uy, uz = _normalize3(ux, uy, uz)
        if dt < PEAK_TOLERANCE_RAD:
            return amplitude, ux, uy, uz
    nan = np.float32(np.nan)
    return nan, nan, nan, nan


# --------------------------------------------------------------------------------------------
# ROIs (src/dwi/tractography/roi.h)
# --------------------------------------------------------------------------------------------


@njit(inline="always", **_JIT)
def _roi_contains(r, px, py, pz, roi_kind, roi_sph, roi_mat, roi_dim, roi_off, roi_mask):
    if roi_kind[r] == 0:
        dx = roi_sph[r, 0] - px
        dy = roi_sph[r, 1] - py
        dz = roi_sph[r, 2] - pz
        return dx * dx + (dy * dy + dz * dz) <= roi_sph[r, 3]
    # float32 3x4 affine times [p, 1]: pairwise reduction (a0 + a1) + (a2 + t), as compiled
    v0 = (roi_mat[r, 0] * px + roi_mat[r, 1] * py) + (roi_mat[r, 2] * pz + roi_mat[r, 3])
    v1 = (roi_mat[r, 4] * px + roi_mat[r, 5] * py) + (roi_mat[r, 6] * pz + roi_mat[r, 7])
    v2 = (roi_mat[r, 8] * px + roi_mat[r, 9] * py) + (roi_mat[r, 10] * pz + roi_mat[r, 11])
    if not (np.isfinite(v0) and np.isfinite(v1) and np.isfinite(v2)):
        return False
    i0 = _round_half_away(v0)
    i1 = _round_half_away(v1)
    i2 = _round_half_away(v2)
    n0 = roi_dim[r, 0]
    n1 = roi_dim[r, 1]
    n2 = roi_dim[r, 2]
    if i0 < 0 or i0 >= n0 or i1 < 0 or i1 >= n1 or i2 < 0 or i2 >= n2:
        return False
    return roi_mask[roi_off[r] + (i0 * n1 + i1) * n2 + i2] != 0


@njit(**_JIT)
def _in_set(which, px, py, pz, roi_set, roi_kind, roi_sph, roi_mat, roi_dim, roi_off, roi_mask):
    for r in range(roi_set.shape[0]):
        if roi_set[r] == which:
            if _roi_contains(
                r, px, py, pz, roi_kind, roi_sph, roi_mat, roi_dim, roi_off, roi_mask
            ):
                return True
    return False


@njit(**_JIT)
def _visit(px, py, pz, state, roi_set, roi_bit, roi_kind, roi_sph, roi_mat, roi_dim, roi_off,
           roi_mask):  # fmt: skip
    """IncludeROIVisitation::operator(): state = [visited bits, ordered next index, valid]."""
    for r in range(roi_set.shape[0]):
        if roi_set[r] == _ROI_INCLUDE:
            if _roi_contains(
                r, px, py, pz, roi_kind, roi_sph, roi_mat, roi_dim, roi_off, roi_mask
            ):
                state[0] |= np.int64(1) << roi_bit[r]
    if state[2] != 0:
        for r in range(roi_set.shape[0]):
            if roi_set[r] == _ROI_ORDERED:
                if _roi_contains(
                    r, px, py, pz, roi_kind, roi_sph, roi_mat, roi_dim, roi_off, roi_mask
                ):
                    n = roi_bit[r]
                    if n == state[1]:
                        state[1] += 1
                    elif n != state[1] - 1:
                        state[2] = 0
                    break


@njit(**_JIT)
def _seed_usable(px, py, pz, sh, M, cbuf, ip, rois):
    """``check_seed`` (finite, inside the masks, outside the excludes) and SDStream::init's
    "data at the seed" (``cbuf`` gets the coefficients): whether the seed is tracked at all,
    and so whether tckgen draws a random direction for it. ``rois``: the arrays of
    :func:`_flatten_rois`, or None (no regions: the region code is not compiled)."""
    if not (np.isfinite(px) and np.isfinite(py) and np.isfinite(pz)):
        return False
    if rois is not None:
        roi_set, roi_bit, roi_kind, roi_sph, roi_mat, roi_dim, roi_off, roi_mask = rois
        # typed set codes: literal ones would compile one _in_set per code
        mask_code, exclude_code = np.int64(_ROI_MASK), np.int64(_ROI_EXCLUDE)
        if ip[_IP_NMASK] > 0 and not _in_set(mask_code, px, py, pz, roi_set, roi_kind,
                                             roi_sph, roi_mat, roi_dim, roi_off,
                                             roi_mask):  # fmt: skip
            return False
        if ip[_IP_NEXC] > 0 and _in_set(exclude_code, px, py, pz, roi_set, roi_kind, roi_sph,
                                        roi_mat, roi_dim, roi_off, roi_mask):  # fmt: skip
            return False
    return _sample(sh, M, px, py, pz, cbuf)


@njit(**_JIT)
def _all_visited(state, n_inc, n_ord):
    full = (np.int64(1) << n_inc) - 1
    return state[0] == full and state[2] != 0 and state[1] == n_ord


# --------------------------------------------------------------------------------------------
# One propagation step (SDStream::next, Exec::next_rk4)
# --------------------------------------------------------------------------------------------


@njit(inline="always", **_JIT)
def _next(px, py, pz, ux, uy, uz, step, sh, M, cbuf, fp, lut, zint, zflt, pint, pflt,
          mstart, lmax, AL):  # fmt: skip
    """SDStream::next from (p, u): returns (term, p', u')."""
    if not _sample(sh, M, px, py, pz, cbuf):  # a call: the interpolation compiled once
        return _EXIT_IMAGE, px, py, pz, ux, uy, uz
    amp, nx, ny, nz = _get_peak(
        cbuf, ux, uy, uz, lut, fp[_FP_INC], zint, zflt, pint, pflt, mstart, lmax, AL
    )
    if not np.isfinite(amp) or amp < fp[_FP_CUTOFF]:
        return _MODEL, px, py, pz, nx, ny, nz
    if _dot3(ux, uy, uz, nx, ny, nz) < fp[_FP_DOT]:
        return _HIGH_CURVATURE, px, py, pz, nx, ny, nz
    return _CONTINUE, px + nx * step, py + ny * step, pz + nz * step, nx, ny, nz


@njit(**_JIT)
def _step(px, py, pz, ux, uy, uz, rk4, sh, M, cbuf, fp, lut, zint, zflt, pint, pflt,
          mstart, lmax, AL):  # fmt: skip
    """Exec::iterate's method step, first order or RK4 (Exec::next_rk4). Returns (term, p', u').

    When the step fails, p' is p and u' the direction of the failing evaluation (its peak for
    MODEL and HIGH_CURVATURE): the halves ignore it, the seed's peak search reads it.

    RK4's five SDStream::next evaluations go through one call site (numba inlines it once):
    d1 at p from u; d2 at p + d1 h/2 from u; d3 at p + d2 h/2 from u; d4 at p + d3 h from
    normalize(d2 + d3); u' = normalize(d1 + 2 d2 + 2 d3 + d4), p' = p + u' h; d5 at p' from u'
    (amplitude tested); then d1.d5 >= cos_max_rk4.
    """
    h = fp[_FP_STEP]
    hh = np.float32(0.5 * np.float64(h))
    two = np.float32(2.0)
    n_eval = 5 if rk4 else 1
    d1x = d1y = d1z = d2x = d2y = d2z = d3x = d3y = d3z = np.float32(0.0)
    nx = ny = nz = np.float32(0.0)
    fx = px
    fy = py
    fz = pz
    for k in range(n_eval):
        if k == 0:
            qx, qy, qz, sx, sy, sz = px, py, pz, ux, uy, uz
        elif k == 1:
            qx, qy, qz, sx, sy, sz = px + d1x * hh, py + d1y * hh, pz + d1z * hh, ux, uy, uz
        elif k == 2:
            qx, qy, qz, sx, sy, sz = px + d2x * hh, py + d2y * hh, pz + d2z * hh, ux, uy, uz
        elif k == 3:
            qx, qy, qz = px + d3x * h, py + d3y * h, pz + d3z * h
            sx, sy, sz = _normalize3(d2x + d3x, d2y + d3y, d2z + d3z)
        else:
            qx, qy, qz = fx, fy, fz
            sx, sy, sz = nx, ny, nz
        t, ax, ay, az, dx, dy, dz = _next(qx, qy, qz, sx, sy, sz, h, sh, M, cbuf, fp,
                                          lut, zint, zflt, pint, pflt, mstart, lmax,
                                          AL)  # fmt: skip
        if t != _CONTINUE:
            return t, px, py, pz, dx, dy, dz
        if k == 0:
            if not rk4:
                return _CONTINUE, ax, ay, az, dx, dy, dz
            d1x, d1y, d1z = dx, dy, dz
        elif k == 1:
            d2x, d2y, d2z = dx, dy, dz
        elif k == 2:
            d3x, d3y, d3z = dx, dy, dz
        elif k == 3:
            nx, ny, nz = _normalize3(
                ((d1x + d2x * two) + d3x * two) + dx,
                ((d1y + d2y * two) + d3y * two) + dy,
                ((d1z + d2z * two) + d3z * two) + dz,
            )
            fx = px + nx * h
            fy = py + ny * h
            fz = pz + nz * h
        else:
            if _dot3(d1x, d1y, d1z, dx, dy, dz) < fp[_FP_COS_RK4]:
                return _HIGH_CURVATURE, px, py, pz, ux, uy, uz
    return _CONTINUE, fx, fy, fz, nx, ny, nz


# --------------------------------------------------------------------------------------------
# One seed (Exec::operator(), seed_track, gen_track, gen_track_unidir, track_rejected,
# Downsampler, check_downsampled_length, truncate_maxlength)
# --------------------------------------------------------------------------------------------


@njit(**_JIT)
def _reverse(buf, n):
    i = 0
    j = n - 1
    while i < j:
        for d in range(3):
            tmp = buf[i, d]
            buf[i, d] = buf[j, d]
            buf[j, d] = tmp
        i += 1
        j -= 1


@njit(inline="always", **_JIT)
def _seg_norm(buf, i):
    dx = buf[i, 0] - buf[i - 1, 0]
    dy = buf[i, 1] - buf[i - 1, 1]
    dz = buf[i, 2] - buf[i - 1, 2]
    return np.float32(math.sqrt(dx * dx + (dy * dy + dz * dz)))


@njit(**_JIT)
def _truncate_maxlength(buf, n, seed, max_dist):
    """Exec::truncate_maxlength (iterative form). Returns (n, seed)."""
    while True:
        length_sum = np.float32(0.0)
        index = 1
        while index < n:
            seg = _seg_norm(buf, index)
            if length_sum + seg > max_dist:
                break
            length_sum += seg
            index += 1
        if index >= n:
            return n, seed
        if seed >= index:
            n = seed + 1
            _reverse(buf, n)
            seed = n - 1 - seed
            continue
        dx = buf[index, 0] - buf[index - 1, 0]
        dy = buf[index, 1] - buf[index - 1, 1]
        dz = buf[index, 2] - buf[index - 1, 2]
        dx, dy, dz = _normalize3(dx, dy, dz)
        rem = max_dist - length_sum
        buf[index, 0] = buf[index - 1, 0] + dx * rem
        buf[index, 1] = buf[index - 1, 1] + dy * rem
        buf[index, 2] = buf[index - 1, 2] + dz * rem
        return index + 1, seed


@njit(**_JIT)
def _track_half(buf, ubuf, rec, n, px, py, pz, ux, uy, uz, state, sh, M, cbuf, fp, ip,
                lut, zint, zflt, pint, pflt, mstart, AL, rois, add_to_tck):  # fmt: skip
    """Exec::gen_track_unidir: returns (n, term, steps).

    With ``rec``, ``ubuf[n]`` receives the direction u held when point ``buf[n]`` was written
    (the converged peak that produced it); stores only, the tracking is unchanged. ``rois``:
    the arrays of :func:`_flatten_rois`, or None (the region tests are then not compiled).
    """
    rk4 = ip[_IP_RK4] != 0
    lmax = ip[_IP_LMAX]
    max_points = ip[_IP_MAXPTS]
    n_mask = ip[_IP_NMASK]
    n_exc = ip[_IP_NEXC]
    n_inc = ip[_IP_NINC]
    n_ord = ip[_IP_NORD]
    stop = ip[_IP_STOP] != 0 and (n_inc + n_ord) > 0
    steps = 0
    while True:
        term, px, py, pz, ux, uy, uz = _step(
            px, py, pz, ux, uy, uz, rk4, sh, M, cbuf, fp, lut, zint, zflt, pint, pflt,
            mstart, lmax, AL
        )  # fmt: skip
        if term == _CONTINUE:
            steps += 1
            if rois is not None:
                roi_set, roi_bit, roi_kind, roi_sph, roi_mat, roi_dim, roi_off, roi_mask = rois
                mask_code, exclude_code = np.int64(_ROI_MASK), np.int64(_ROI_EXCLUDE)
                if n_mask > 0 and not _in_set(mask_code, px, py, pz, roi_set, roi_kind, roi_sph,
                                              roi_mat, roi_dim, roi_off, roi_mask):  # fmt: skip
                    term = _EXIT_MASK
                elif n_exc > 0 and _in_set(exclude_code, px, py, pz, roi_set, roi_kind, roi_sph,
                                           roi_mat, roi_dim, roi_off, roi_mask):  # fmt: skip
                    term = _ENTER_EXCLUDE
                else:
                    if n_inc + n_ord > 0:
                        _visit(px, py, pz, state, roi_set, roi_bit, roi_kind, roi_sph, roi_mat,
                               roi_dim, roi_off, roi_mask)  # fmt: skip
                        if stop and _all_visited(state, n_inc, n_ord):
                            term = _TRAVERSE_ALL_INCLUDE
        if add_to_tck[term]:
            buf[n, 0] = px
            buf[n, 1] = py
            buf[n, 2] = pz
            if rec:
                ubuf[n, 0] = ux
                ubuf[n, 1] = uy
                ubuf[n, 2] = uz
            n += 1
        if term == _CONTINUE and n >= max_points:
            term = _LENGTH_EXCEED
        if term != _CONTINUE:
            return n, term, steps


@njit(**_JIT)
def _downsample(b, n, seed, R):
    """MRtrix's ``Downsampler`` (ratio ``R > 1``) of the streamline ``b[:n]`` in place, keeping
    the seed point, the first and the last point: the new ``(n, seed)``."""
    if n <= 2:
        return n, seed
    index_old = R
    if seed != 0:
        index_old = ((seed - 1) % R) + 1
        seed = 1 + (seed - index_old) // R
    index_new = 1
    while index_old < n - 1:
        b[index_new, 0] = b[index_old, 0]
        b[index_new, 1] = b[index_old, 1]
        b[index_new, 2] = b[index_old, 2]
        index_new += 1
        index_old += R
    b[index_new, 0] = b[n - 1, 0]
    b[index_new, 1] = b[n - 1, 1]
    b[index_new, 2] = b[n - 1, 2]
    return index_new + 1, seed


@njit(**_JIT)
def _track_seed(i, row, seeds, dirs, buf, ubuf, rec, out_n, out_seed, out_status, out_term, out_u0,
                out_steps, sh, M, fp, fp_seed, ip, lut, zint, zflt, pint, pflt, mstart, rois,
                add_to_tck, cbuf, AL, state):  # fmt: skip
    """Track seed ``i`` into ``buf[row]`` (and its per-point peaks into ``ubuf[row]`` with
    ``rec``; ``ubuf`` is then laid out like ``buf``, else it is a dummy and never written).

    ``rois``: the arrays of :func:`_flatten_rois` or None (no regions: not compiled).
    ``fp_seed``: ``fp`` with the curvature test off (see :func:`_seed_params`), for the
    seed's peak search."""
    _start_seed(i, state, out_n, out_seed, out_term, out_u0, out_steps, out_status)
    px = seeds[i, 0]
    py = seeds[i, 1]
    pz = seeds[i, 2]
    if not _seed_usable(px, py, pz, sh, M, cbuf, ip, rois):
        return
    ok, ux, uy, uz = _start_direction(dirs, i)
    if not ok:
        return
    # SDStream::init's peak search and amplitude test: one first-order evaluation of the step
    # (the same compiled code as every step: the peak search is compiled once) at the seed,
    # whose data _seed_usable found, without the curvature test (fp_seed); it returns the
    # peak (NaN if the search failed) and MODEL below the cutoff
    t, _, _, _, ux, uy, uz = _step(px, py, pz, ux, uy, uz, np.bool_(False), sh, M, cbuf,
                                   fp_seed, lut, zint, zflt, pint, pflt, mstart, ip[_IP_LMAX],
                                   AL)  # fmt: skip
    out_u0[i, 0] = ux
    out_u0[i, 1] = uy
    out_u0[i, 2] = uz
    if t != _CONTINUE:
        return
    # --- gen_track
    n_inc = ip[_IP_NINC]
    n_ord = ip[_IP_NORD]
    if rois is not None and n_inc + n_ord > 0:
        roi_set, roi_bit, roi_kind, roi_sph, roi_mat, roi_dim, roi_off, roi_mask = rois
        _visit(px, py, pz, state, roi_set, roi_bit, roi_kind, roi_sph, roi_mat, roi_dim,
               roi_off, roi_mask)  # fmt: skip
    b = buf[row]
    ub = ubuf[row] if rec else ubuf[0]
    b[0, 0] = px
    b[0, 1] = py
    b[0, 2] = pz
    # np.int64(1), not the literal 1: a literal argument would compile a second _track_half
    n, t0, s0 = _track_half(b, ub, rec, np.int64(1), px, py, pz, ux, uy, uz, state, sh, M, cbuf,
                            fp, ip, lut, zint, zflt, pint, pflt, mstart, AL, rois,
                            add_to_tck)  # fmt: skip
    out_term[i, 0] = t0
    steps = s0
    excluded = t0 == _ENTER_EXCLUDE
    seed = 0
    if not excluded and ip[_IP_UNIDIR] == 0:
        _reverse(b, n)
        if rec:
            _reverse(ub, n)
        seed = n - 1
        qx = b[n - 1, 0]
        qy = b[n - 1, 1]
        qz = b[n - 1, 2]
        n, t1, s1 = _track_half(b, ub, rec, n, qx, qy, qz, -ux, -uy, -uz, state, sh, M,
                                cbuf, fp, ip, lut, zint, zflt, pint, pflt, mstart, AL, rois,
                                add_to_tck)  # fmt: skip
        out_term[i, 1] = t1
        steps += s1
        excluded = t1 == _ENTER_EXCLUDE
    out_steps[i] = steps
    # --- track_rejected (the rulebook's tests, in its order)
    missed = n_inc + n_ord > 0 and not _all_visited(state, n_inc, n_ord)
    reject = _track_rejection(n, excluded, missed, ip[_IP_MINPTS])
    if reject != _ACCEPTED:
        out_status[i] = reject
        return
    # --- Downsampler + check_downsampled_length
    R = ip[_IP_DOWNSAMPLE]
    if R > 1:
        n, seed = _downsample(b, n, seed, R)
        if not (n > ip[_IP_MINPOST] and n < ip[_IP_MAXPOST]):
            length = np.float32(0.0)
            for k in range(1, n):
                length += _seg_norm(b, k)
            if length < fp[_FP_MINLEN]:
                out_status[i] = _TOO_SHORT
                return
            if length > fp[_FP_MAXLEN]:
                n, seed = _truncate_maxlength(b, n, seed, fp[_FP_MAXLEN])
    out_status[i] = _ACCEPTED
    out_n[i] = n
    out_seed[i] = seed


@njit(**_JIT)
def _start_seed(i, state, out_n, out_seed, out_term, out_u0, out_steps, out_status):
    """Reset seed ``i``'s outputs (nothing tracked, status invalid seed, NaN start direction)
    and the region-visit ``state`` before it is tracked (the plain and the ACT kernel)."""
    state[0] = 0
    state[1] = 0
    state[2] = 1
    out_n[i] = 0
    out_seed[i] = -1
    out_term[i, 0] = -1
    out_term[i, 1] = -1
    out_steps[i] = 0
    nan = np.float32(np.nan)
    out_u0[i, 0] = nan
    out_u0[i, 1] = nan
    out_u0[i, 2] = nan
    out_status[i] = _INVALID_SEED


@njit(**_JIT)
def _start_direction(dirs, i):
    """Seed ``i``'s start direction as tckgen uses it: ``(finite, ux, uy, uz)``.

    tckgen normalises it twice: once where it is made (random_direction() or the
    -seed_direction parser in SharedBase) and again in SDStream::init().
    """
    ux, uy, uz = _normalize3(dirs[i, 0], dirs[i, 1], dirs[i, 2])
    ux, uy, uz = _normalize3(ux, uy, uz)
    return np.isfinite(ux) and np.isfinite(uy) and np.isfinite(uz), ux, uy, uz


@njit(**_JIT)
def n_legendre_nb(lmax):
    h = lmax // 2 + 1
    return h * h


@njit(**_JIT)
def _seed_params(fp):
    """``fp`` for SDStream::init's peak search at the seed: the curvature test off (a dot
    threshold of -inf, which no direction fails)."""
    fp_seed = fp.copy()
    fp_seed[_FP_DOT] = -np.inf
    return fp_seed


@njit(**_JIT)
def _track_rows(w, nworkers, rec, seeds, dirs, buf, ubuf, out_n, out_seed, out_status, out_term,
                out_u0, out_steps, sh, M, fp, ip, lut, zint, zflt, pint, pflt, mstart, rois,
                add_to_tck):  # fmt: skip
    """Seeds ``w, w + nworkers, ...`` into their rows of ``buf`` (with ``rec``, each point's
    peak into ``ubuf``, laid out like ``buf``; else ``ubuf`` is a dummy). Serial: one call per
    Python thread (the GIL is released; see :func:`_run_rows`). The inputs are shared, not
    copied: each call from Python unboxes its own reference counts for them, so threads do not
    contend on one counter's cache line."""
    N = seeds.shape[0]
    cbuf = np.empty(sh.shape[3], dtype=np.float32)
    AL = np.empty(n_legendre_nb(ip[_IP_LMAX]), dtype=np.float32)
    state = np.zeros(3, dtype=np.int64)
    fp_seed = _seed_params(fp)
    for i in range(w, N, nworkers):
        _track_seed(i, i, seeds, dirs, buf, ubuf, rec, out_n, out_seed, out_status, out_term,
                    out_u0, out_steps, sh, M, fp, fp_seed, ip, lut, zint, zflt, pint, pflt,
                    mstart, rois, add_to_tck, cbuf, AL, state)  # fmt: skip


@njit(**_JIT)
def _track_block(start, stop, L, seeds, dirs, out_n, out_seed, out_status, out_term, out_u0,
                 out_steps, sh, M, fp, ip, lut, zint, zflt, pint, pflt, mstart, rois,
                 add_to_tck):  # fmt: skip
    """Seeds ``start .. stop - 1``, one at a time in an ``[1, L, 3]`` scratch row; accepted
    streamlines appended, in seed order, to a packed ``[P, 3]`` array grown by doubling.

    Returns ``(points, P)``: ``points[:P]`` holds the block's accepted streamlines (their
    lengths are ``out_n[start:stop]``). Memory is what was tracked, not ``L`` per seed."""
    scratch = np.empty((1, L, 3), dtype=np.float32)
    no_u = np.empty((1, 1, 3), dtype=np.float32)
    cbuf = np.empty(sh.shape[3], dtype=np.float32)
    AL = np.empty(n_legendre_nb(ip[_IP_LMAX]), dtype=np.float32)
    state = np.zeros(3, dtype=np.int64)
    fp_seed = _seed_params(fp)
    pts = np.empty((max(64, 16 * (stop - start)), 3), dtype=np.float32)
    used = 0
    # typed (not literal) row and rec: the same _track_seed specialisation as _track_rows'
    row0 = np.int64(0)
    no_rec = np.bool_(False)
    for i in range(start, stop):
        _track_seed(i, row0, seeds, dirs, scratch, no_u, no_rec, out_n, out_seed, out_status,
                    out_term, out_u0, out_steps, sh, M, fp, fp_seed, ip, lut, zint, zflt, pint,
                    pflt, mstart, rois, add_to_tck, cbuf, AL, state)  # fmt: skip
        n = out_n[i]
        if used + n > pts.shape[0]:
            grown = np.empty((max(2 * pts.shape[0], used + n), 3), dtype=np.float32)
            for k in range(used):  # a loop: slice assignment compiles ~3 s of error formatting
                grown[k, 0] = pts[k, 0]
                grown[k, 1] = pts[k, 1]
                grown[k, 2] = pts[k, 2]
            pts = grown
        for k in range(n):
            pts[used + k, 0] = scratch[0, k, 0]
            pts[used + k, 1] = scratch[0, k, 1]
            pts[used + k, 2] = scratch[0, k, 2]
        used += n
    return pts, used


@njit(**_JIT)
def _seeds_usable_kernel(sh, M, ip, rois, seeds, out):
    cbuf = np.empty(sh.shape[3], dtype=np.float32)
    for i in range(seeds.shape[0]):
        out[i] = _seed_usable(seeds[i, 0], seeds[i, 1], seeds[i, 2], sh, M, cbuf, ip, rois)


# --------------------------------------------------------------------------------------------
# Python side: tables, ROI flattening, chunking
# --------------------------------------------------------------------------------------------


def _sh_tables(lmax: int):
    """``_get_peak``'s index and float32 factor tables, in SH.h ``derivatives``' loop order.

    Zonal rows (l = 2, 4, ..., lmax), then for m = 1..lmax the rows (l, m) with l ascending
    (``mstart[m]:mstart[m + 1]``). The factors are those of :class:`invtract.fod.peaks.PeakTables`
    (one place for the derivative rule, shared with the torch engine); only the layout differs:

    * ``zint`` = (SH index of (l, 0), table entry of (l, 0)); ``zflt`` = (sqrt(l(l+1)),
      sqrt(l(l+1)(l-1)(l+2)), l(l+1)).
    * ``pint`` = (SH index of (l, +m), of (l, -m), entries of P_l^m, P_l^{m-1}, P_l^{m+1} or -1,
      P_l^{|m-2|}, P_l^{m+2} or -1); ``pflt`` = the five square-root factors, the fourth
      unsigned (the kernel subtracts it for m = 1).
    """
    T = peak_tables(lmax).arrays
    zint, zflt = [], []
    for l in range(2, lmax + 1, 2):
        e = legendre_index(l, 0)
        zint.append((T["ip"][e], e))
        zflt.append((T["ka"][e], T["k0"][e], -T["k1"][e]))
    pint, pflt = [], []
    mstart = [0, 0]
    for m in range(1, lmax + 1):
        for l in range(m + (m & 1), lmax + 1, 2):
            e = legendre_index(l, m)
            ib = T["ib"][e] if l > m else -1
            j2 = T["j2"][e] if l > m + 1 else -1
            pint.append((T["ip"][e], T["im"][e], e, T["ia"][e], ib, T["j1"][e], j2))
            pflt.append((T["ka"][e], T["kb"][e], T["k0"][e], abs(T["k1"][e]), T["k2"][e]))
        mstart.append(len(pint))
    zint_a = np.array(zint, dtype=np.int64).reshape(-1, 2)
    zflt_a = np.array(zflt, dtype=np.float32).reshape(-1, 3)
    pint_a = np.array(pint, dtype=np.int64).reshape(-1, 7)
    pflt_a = np.array(pflt, dtype=np.float32).reshape(-1, 5)
    return zint_a, zflt_a, pint_a, pflt_a, np.array(mstart, dtype=np.int64)


def _kernel_lut(lmax: int) -> np.ndarray:
    """The float32 Legendre lookup table ``_get_peak`` reads: row-major, rows of
    ``n_legendre(lmax)``, flattened (read with unsigned offsets)."""
    lut = np.ascontiguousarray(legendre_table(lmax), dtype=np.float32)
    assert lut.shape[1] == n_legendre(lmax)
    return lut.reshape(-1)


def _kernel_tables(lmax: int):
    """:func:`_sh_tables` in the layout ``_get_peak`` reads: index tables unsigned (numba
    then emits no negative-index wraparound on each table lookup), ``pint`` and ``pflt``
    flattened row-major (rows of 7 and 5), -1 ("no such term") as :data:`_ABSENT`.
    About 8 % of the kernel's time on a real FOD; the arithmetic is unchanged."""
    zint, zflt, pint, pflt, mstart = _sh_tables(lmax)
    pint_u = np.where(pint < 0, 0, pint).astype(np.uint64)
    pint_u[pint < 0] = _ABSENT
    return zint.astype(np.uint64), zflt, pint_u.reshape(-1), pflt.reshape(-1), mstart


def _flatten_rois(rois: RoiSet | None):
    """Flatten a RoiSet into the kernel's arrays; returns (arrays tuple, counts dict)."""
    entries = []
    if rois is not None:
        for which, group in (
            (_ROI_INCLUDE, rois.include),
            (_ROI_EXCLUDE, rois.exclude),
            (_ROI_MASK, rois.mask),
            (_ROI_ORDERED, rois.include_ordered),
        ):
            for bit, roi in enumerate(group):
                entries.append((which, bit, roi))
    n_inc = sum(1 for e in entries if e[0] == _ROI_INCLUDE)
    if n_inc > 62:
        raise ValueError(f"at most 62 include regions are supported, got {n_inc}")
    R = len(entries)
    roi_set = np.zeros(R, dtype=np.int64)
    roi_bit = np.zeros(R, dtype=np.int64)
    roi_kind = np.zeros(R, dtype=np.int64)
    roi_sph = np.zeros((R, 4), dtype=np.float32)
    roi_mat = np.zeros((R, 12), dtype=np.float32)
    roi_dim = np.zeros((R, 3), dtype=np.int64)
    roi_off = np.zeros(R, dtype=np.int64)
    masks = []
    offset = 0
    for r, (which, bit, roi) in enumerate(entries):
        roi_set[r] = which
        roi_bit[r] = bit
        if isinstance(roi, SphereRoi):
            c = np.asarray(roi.centre, dtype=np.float32)
            rad = np.float32(roi.radius)
            roi_sph[r] = (c[0], c[1], c[2], rad * rad)
        elif isinstance(roi, ImageRoi):
            m = np.ascontiguousarray(np.asarray(roi.mask).astype(bool))
            if m.ndim != 3:
                raise ValueError(f"ImageRoi mask must be 3-D, got shape {m.shape}")
            S = np.asarray(roi.scanner2voxel, dtype=np.float64).reshape(-1)[:12].reshape(3, 4)
            roi_kind[r] = 1
            roi_mat[r] = S.astype(np.float32).reshape(-1)
            roi_dim[r] = m.shape
            roi_off[r] = offset
            masks.append(m.reshape(-1).astype(np.uint8))
            offset += m.size
        else:
            raise TypeError(f"unsupported ROI type {type(roi).__name__}")
    roi_mask = np.concatenate(masks) if masks else np.zeros(1, dtype=np.uint8)
    counts = {
        "include": n_inc,
        "exclude": sum(1 for e in entries if e[0] == _ROI_EXCLUDE),
        "mask": sum(1 for e in entries if e[0] == _ROI_MASK),
        "ordered": sum(1 for e in entries if e[0] == _ROI_ORDERED),
    }
    return (roi_set, roi_bit, roi_kind, roi_sph, roi_mat, roi_dim, roi_off, roi_mask), counts


@dataclass(frozen=True)
class FusedFOD:
    """An FOD laid out once for the kernels, shared read-only by every thread and chunk.

    Make it with :func:`prepare_fod` and pass it as ``sh`` to :func:`track_fused_cpu` /
    :class:`SeedTest` when tracking many chunks of seeds on one FOD: the layout, the no-data
    map and the checks are then done once, not per chunk.

    Attributes:
        sh: ``[X, Y, Z, K]`` float32, the K coefficients of each voxel contiguous (C order, or
            a strided view of another voxel order, e.g. a memory-mapped ``.mif``), read-only.
        M: ``[3, 4]`` float64 scanner mm -> voxel.
        lmax: SH order of ``sh``.
    """

    sh: np.ndarray
    M: np.ndarray
    lmax: int


def _voxel_major(sh: np.ndarray) -> bool:
    """Each voxel's coefficients are contiguous and voxels do not overlap (any voxel order)."""
    item = sh.itemsize
    return sh.strides[3] == item and all(
        abs(t) >= item * sh.shape[3] or n == 1 for t, n in zip(sh.strides[:3], sh.shape[:3])
    )


def prepare_fod(sh: np.ndarray | FusedFOD, scanner2voxel: np.ndarray | None) -> FusedFOD:
    """Lay out ``sh`` ``[X, Y, Z, K]`` and ``scanner2voxel`` ``[3, 4]`` for the kernels.

    A float32 ``sh`` whose K coefficients are contiguous per voxel is used as it is, without
    a copy and without reading it (a memory-mapped ``.mif`` stays on disk until tracking
    touches it, as in tckgen); anything else (a NIfTI's volume-major order, another dtype) is
    copied once into C order. The result's ``sh`` is a read-only view.
    """
    if isinstance(sh, FusedFOD):
        return sh
    if not isinstance(sh, np.ndarray) or sh.dtype != np.float32:
        sh = np.asarray(sh, dtype=np.float32)
    if sh.ndim != 4:
        raise ValueError(f"sh must be [X, Y, Z, K], got shape {sh.shape}")
    if not _voxel_major(sh):
        sh = np.ascontiguousarray(sh)
    lmax = lmax_from_n(sh.shape[3])
    M = np.ascontiguousarray(np.asarray(scanner2voxel, dtype=np.float64)[:3, :4])
    if M.shape != (3, 4):
        raise ValueError(f"scanner2voxel must be [3, 4], got {M.shape}")
    sh = sh.view(np.ndarray)
    sh.flags.writeable = False
    return FusedFOD(sh, M, lmax)


def _default_threads() -> int:
    """numba's configured thread count (reading it does not start numba's thread pool)."""
    return max(1, int(numba.config.NUMBA_NUM_THREADS))


def _run_rows(threads: int, rec: bool, args: tuple) -> None:
    """:func:`_track_rows` over all seeds of ``args`` on ``threads`` Python threads.

    Python threads rather than numba's ``prange``: the kernel releases the GIL, and numba's
    threading layer (an OpenMP runtime beside torch's in the same process slowed every later
    torch operation ~20x) is never started.
    """
    n = int(args[0].shape[0])
    T = max(1, min(int(threads), n))
    if T == 1:
        _track_rows(0, 1, rec, *args)
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(T) as ex:
        list(ex.map(lambda w: _track_rows(w, T, rec, *args), range(T)))


class SeedTest:
    """Which seeds the tracker tracks at all (``check_seed`` + data at the seed; tckgen draws a
    random start direction for exactly these): the kernel's own rule, for the seeding code.

    Args:
        sh: ``[X, Y, Z, K]`` SH coefficients; scanner2voxel: ``[3, 4]``; rois: the regions
            (only ``mask`` and ``exclude`` matter here).
    """

    def __init__(self, sh: np.ndarray, scanner2voxel: np.ndarray, rois: RoiSet | None = None):
        if not available():
            raise RuntimeError(f"numba is not available: {_NUMBA_ERROR}")
        _prepare_numba_target()
        fod = prepare_fod(sh, scanner2voxel)
        arrays, counts = _flatten_rois(rois)
        ip = np.zeros(_IP_LEN, dtype=np.int64)
        ip[_IP_NMASK], ip[_IP_NEXC] = counts["mask"], counts["exclude"]
        # only masks and excludes matter here: without them the region code is not compiled
        self._fod = (fod.sh, fod.M, ip, arrays if counts["mask"] + counts["exclude"] else None)

    def __call__(self, seeds: np.ndarray) -> np.ndarray:
        """``[N]`` bool for ``[N, 3]`` scanner-mm seeds."""
        seeds = np.ascontiguousarray(seeds, dtype=np.float32).reshape(-1, 3)
        out = np.zeros(seeds.shape[0], dtype=np.bool_)
        _seeds_usable_kernel(*self._fod, seeds, out)
        return out


def seeds_have_data(sh: np.ndarray, scanner2voxel: np.ndarray, seeds: np.ndarray) -> np.ndarray:
    """``[N]`` bool: the FOD has data at each seed (no regions; see :class:`SeedTest`)."""
    return SeedTest(sh, scanner2voxel)(seeds)


@dataclass
class _KernelInputs:
    """Everything the kernels take besides the per-seed arrays and outputs."""

    seeds: np.ndarray  # [N, 3] float32
    init_dirs: np.ndarray  # [N, 3] float32
    fod: tuple  # (sh, M)
    consts: tuple  # (fp, ip, lut, zint, zflt, pint, pflt, mstart)
    rois: tuple  # the arrays of _flatten_rois
    L: int  # buffer points per streamline (max_points + 2)
    has_rois: bool = True  # any region at all

    @property
    def kernel_rois(self) -> tuple | None:
        """The kernels' ``rois`` argument: None without regions (their code is not compiled)."""
        return self.rois if self.has_rois else None


def _kernel_inputs(sh, scanner2voxel, seeds, init_dirs, params, rois) -> _KernelInputs:
    """Validate and lay out the inputs of :func:`track_fused_cpu` for the kernels."""
    if not available():
        raise RuntimeError(f"numba is not available: {_NUMBA_ERROR}")
    _prepare_numba_target()
    fod = prepare_fod(sh, scanner2voxel)
    lmax = fod.lmax
    seeds = np.ascontiguousarray(seeds, dtype=np.float32).reshape(-1, 3)
    init_dirs = np.ascontiguousarray(init_dirs, dtype=np.float32).reshape(-1, 3)
    if init_dirs.shape[0] != seeds.shape[0]:
        raise ValueError(f"{seeds.shape[0]} seeds but {init_dirs.shape[0]} initial directions")
    lut = _kernel_lut(lmax)
    roi_arrays, roi_counts = _flatten_rois(rois)
    max_points = int(params.max_points)
    if max_points + 2 > _MAX_BUFFER_POINTS:
        raise ValueError(
            f"max_points={max_points} is unbounded for the fused engine (downsample "
            f"{params.downsample} x angle {params.angle_deg} deg >= 360 deg); not supported"
        )
    fp = np.array(
        [
            params.step_mm,
            params.cutoff,
            params.dot_threshold,
            params.cos_max_rk4,
            params.min_length_mm,
            params.max_length_mm,
            lut_increment(),
        ],
        dtype=np.float32,
    )
    ip = np.array(
        [
            max_points,
            params.min_points,
            min(int(params.min_points_post), 2**62),
            min(int(params.max_points_post), 2**62),
            params.downsample,
            int(params.rk4),
            int(params.unidirectional),
            int(params.stop),
            lmax,
            roi_counts["include"],
            roi_counts["ordered"],
            roi_counts["exclude"],
            roi_counts["mask"],
        ],
        dtype=np.int64,
    )
    consts = (fp, ip, lut, *_kernel_tables(lmax))
    fod_arrays = (fod.sh, fod.M)
    has_rois = sum(roi_counts.values()) > 0
    return _KernelInputs(
        seeds, init_dirs, fod_arrays, consts, roi_arrays, max_points + 2, has_rois
    )


def _block_size(n: int, threads: int) -> int:
    """Seeds per scheduled block: small enough to balance the threads' load (streamline
    lengths vary a lot), large enough that a block's call overhead (~20 us) is noise."""
    return int(min(256, max(16, n // max(1, 8 * threads))))


def track_fused_cpu(
    sh: np.ndarray | FusedFOD,
    scanner2voxel: np.ndarray | None,
    seeds: np.ndarray,
    init_dirs: np.ndarray,
    params: ResolvedParameters,
    rois: RoiSet | None = None,
    nthreads: int | None = None,
    chunk_size: int = 8192,
    pool: str = "auto",
) -> EngineResult:
    """Track SD_Stream streamlines from every seed, tckgen-exactly, in compiled parallel code.

    Args:
        sh: ``[X, Y, Z, K]`` float32 SH coefficients (MRtrix basis, scanner frame), or a
            :class:`FusedFOD` from :func:`prepare_fod` (then ``scanner2voxel`` is ignored):
            prepare once when tracking many chunks of seeds on one FOD.
        scanner2voxel: ``[3, 4]`` float64, scanner mm -> voxel coordinates of ``sh``.
        seeds: ``[N, 3]`` float32 seed points (scanner mm).
        init_dirs: ``[N, 3]`` raw start directions of the peak search at each seed: the
            ``-seed_direction`` triple or the unnormalised ``random_direction()`` draw. They are
            normalised here twice in float32, as tckgen does (see the module notes); rows may
            be NaN for seeds that get rejected anyway (a NaN row rejects the seed).
        params: resolved tracking parameters (``TrackingParameters.resolve``).
        rois: include / exclude / mask regions, or None.
        nthreads: threads (default: ``NUMBA_NUM_THREADS``, the number of cores).
        chunk_size: seeds per chunk (the per-seed outputs of a chunk are held together).
        pool: ``"auto"`` or ``"threads"`` (the same: blocks of seeds scheduled dynamically on
            Python threads over the serial kernel, which releases the GIL; numba's own thread
            pool is never started); ``"numba"`` is accepted as a synonym, for old callers.

    Memory: the FOD is shared by all threads, never copied; each block of seeds tracks into
    one ``[max_points + 2, 3]`` scratch row and keeps only the accepted points, so memory
    follows what is tracked, not ``max_points`` x seeds.

    Returns:
        :class:`EngineResult`; ``counts`` has ``steps`` (successful propagation steps),
        ``seconds`` (wall time of the tracking kernels) and ``chunks``.
    """
    if pool not in ("auto", "numba", "threads"):
        raise ValueError(f"pool must be 'auto', 'numba' or 'threads', got {pool!r}")
    k = _kernel_inputs(sh, scanner2voxel, seeds, init_dirs, params, rois)
    N = k.seeds.shape[0]
    chunk_size = max(1, int(chunk_size))
    threads = _default_threads() if nthreads is None else max(1, int(nthreads))
    parts = []
    t0 = time.perf_counter()
    with _executor(threads) as ex:
        for start in range(0, N, chunk_size):
            stop = min(N, start + chunk_size)
            parts.append(_track_span(k, start, stop, threads, ex))
    return concat_results(parts, seconds=time.perf_counter() - t0)


class _executor:
    """A thread pool for ``threads`` > 1, else None (the blocks then run in this thread)."""

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self.pool = None

    def __enter__(self):
        if self.threads > 1:
            from concurrent.futures import ThreadPoolExecutor

            self.pool = ThreadPoolExecutor(self.threads)
        return self.pool

    def __exit__(self, *exc) -> None:
        if self.pool is not None:
            self.pool.shutdown()


def _track_span(k: _KernelInputs, start: int, stop: int, threads: int, ex) -> EngineResult:
    """Seeds ``start .. stop - 1`` of ``k`` in blocks (on ``ex`` if given), packed in seed
    order."""
    C = stop - start
    c_n = np.zeros(C, dtype=np.int64)
    c_seed = np.zeros(C, dtype=np.int64)
    c_status = np.zeros(C, dtype=np.int64)
    c_term = np.zeros((C, 2), dtype=np.int64)
    c_u0 = np.zeros((C, 3), dtype=np.float32)
    c_steps = np.zeros(C, dtype=np.int64)
    args = (k.seeds[start:stop], k.init_dirs[start:stop], c_n, c_seed, c_status, c_term, c_u0,
            c_steps, *k.fod, *k.consts, k.kernel_rois, _ADD_TO_TCK)  # fmt: skip
    B = _block_size(C, threads)

    def block(b0: int):
        return _track_block(b0, min(C, b0 + B), k.L, *args)

    starts = range(0, C, B)
    # each block's points trimmed to what it tracked as it arrives (its array grew by
    # doubling), so the chunk holds its points twice at most, while they are joined
    done = ex.map(block, starts) if ex is not None else map(block, starts)
    blocks = [p[:n].copy() if n < p.shape[0] else p for p, n in done]
    out = blocks[0] if len(blocks) == 1 else np.concatenate(blocks or [np.zeros((0, 3))], 0)
    del blocks
    return EngineResult(
        np.ascontiguousarray(out, dtype=np.float32),
        c_n,
        c_seed,
        c_status.astype(np.int8),
        c_term.astype(np.int8),
        c_u0,
        counts={"steps": int(c_steps.sum())},
    )


def track_fused_cpu_peaks(
    sh: np.ndarray,
    scanner2voxel: np.ndarray,
    seeds: np.ndarray,
    init_dirs: np.ndarray,
    params: ResolvedParameters,
    threads: int = 1,
) -> dict:
    """:func:`track_fused_cpu` (no ROIs) that also returns every point's converged peak.

    The same kernel and arithmetic (every point, length, status and term is the one
    :func:`track_fused_cpu` gives), run serially on ``threads`` Python threads (numba's thread
    pool is not started: see :mod:`~invtract.tracking.adjoint_cpu`), unchunked, and unpacked.
    Used by the hard pass of :func:`~invtract.tracking.differentiable.track_differentiable`.

    Returns:
        dict with ``points`` ``[N, L, 3]`` float32 (row i: ``lengths[i]`` vertices, the rest
        undefined; ``L = max_points + 2``), ``peaks`` ``[N, L, 3]`` float32 (at each vertex but
        the seed, the peak direction u the step that wrote it moved along: p = p_prev + h u;
        undefined at the seed and beyond the length), ``lengths``, ``seed_index``, ``status``
        ``[N]`` int64, ``term`` ``[N, 2]`` int64, ``init_dir`` ``[N, 3]`` float32 (the seed
        peak), ``steps``.
    """
    if params.rk4 or params.downsample > 1:
        raise ValueError("track_fused_cpu_peaks supports first-order stepping only")
    k = _kernel_inputs(sh, scanner2voxel, seeds, init_dirs, params, None)
    N = k.seeds.shape[0]
    buf = np.empty((N, k.L, 3), dtype=np.float32)
    ubuf = np.empty((N, k.L, 3), dtype=np.float32)
    out = {
        "lengths": np.zeros(N, dtype=np.int64),
        "seed_index": np.zeros(N, dtype=np.int64),
        "status": np.zeros(N, dtype=np.int64),
        "term": np.zeros((N, 2), dtype=np.int64),
        "init_dir": np.zeros((N, 3), dtype=np.float32),
    }
    c_steps = np.zeros(N, dtype=np.int64)
    outputs = (out["lengths"], out["seed_index"], out["status"], out["term"], out["init_dir"])
    args = (k.seeds, k.init_dirs, buf, ubuf, *outputs, c_steps, *k.fod, *k.consts, k.kernel_rois,
            _ADD_TO_TCK)  # fmt: skip
    _run_rows(threads, True, args)
    out["points"], out["peaks"], out["steps"] = buf, ubuf, int(c_steps.sum())
    return out


@njit(**_JIT)
def _peaks_kernel(c, u, out, lut, inc, zint, zflt, pint, pflt, mstart, lmax):
    """``out[i] = (amplitude, ux, uy, uz)``: :func:`_get_peak` from each ``u[i]`` on ``c[i]``."""
    AL = np.empty(n_legendre_nb(lmax), dtype=np.float32)
    for i in range(c.shape[0]):
        a, x, y, z = _get_peak(c[i], u[i, 0], u[i, 1], u[i, 2], lut, inc, zint, zflt, pint,
                               pflt, mstart, lmax, AL)  # fmt: skip
        out[i, 0], out[i, 1], out[i, 2], out[i, 3] = a, x, y, z


def peaks(c: np.ndarray, u: np.ndarray, lmax: int) -> tuple[np.ndarray, np.ndarray]:
    """The MRtrix peak ascent (spec 3.3) of the tracking kernel, from each start direction:
    ``(amplitude [N], direction [N, 3])`` float32, NaN where it did not converge; the same
    values as :func:`invtract.fod.peaks.mrtrix_peak` on float32 input to float32 rounding
    (test), ~7x faster on one thread.

    Args:
        c: ``[N, K]`` SH coefficients (cast to float32).
        u: ``[N, 3]`` unit start directions (cast to float32).
        lmax: their SH degree.
    """
    if not available():
        raise RuntimeError(f"numba is not available: {_NUMBA_ERROR}")
    _prepare_numba_target()
    c = np.ascontiguousarray(c, dtype=np.float32)
    u = np.ascontiguousarray(u, dtype=np.float32).reshape(-1, 3)
    out = np.empty((c.shape[0], 4), dtype=np.float32)
    _peaks_kernel(c, u, out, _kernel_lut(lmax), lut_increment(), *_kernel_tables(lmax), lmax)
    return out[:, 0].copy(), out[:, 1:].copy()


def warmup() -> float:
    """Compile (or load from cache) every kernel on a tiny problem; returns seconds taken."""
    from ..params import TrackingParameters

    t0 = time.perf_counter()
    sh = np.zeros((3, 3, 3, 6), dtype=np.float32)
    sh[..., 0] = 1.0
    sh[..., 3] = 0.5
    M = np.hstack([np.eye(3), np.zeros((3, 1))])
    params = TrackingParameters().resolve((1.0, 1.0, 1.0))
    track_fused_cpu(sh, M, np.ones((1, 3), np.float32), np.ones((1, 3), np.float32), params)
    seeds_have_data(sh, M, np.ones((1, 3), np.float32))
    return time.perf_counter() - t0
