"""Fused Triton engine: MRtrix3 3.0.3 ``tckgen -algorithm SD_Stream`` in one GPU kernel.

One Triton program owns ``BLOCK`` lanes; each lane owns one streamline at a time and loops over
its evaluations inside the kernel: the seed's peak search, then every step of the first half,
then every step of the second half (interpolation, peak ascent to convergence, the cutoff /
angle / FOV / length tests, the move), and when its streamline ends it takes the next seed of its
strided list (seed ``lane + k * lanes``). One launch tracks a whole chunk of seeds; chunks bound
the output buffer (``[chunk, max_points + 2, 3]`` float32). On CPU the same kernel runs under
the Triton interpreter (``TRITON_INTERPRET=1`` set before this module is imported), which is how
CI tests it.

Arithmetic mirrors :mod:`invtract.tracking.fused_cpu` operation by operation (float32 where
MRtrix uses ``float``, float64 where it uses ``double``; the same summation orders, the
interpolation's Eigen packet order, the peak finder's sequential sums over its (l, m) tables):

* divisions and square roots use ``tl.div_rn`` / ``tl.sqrt_rn`` (Triton's ``/`` and
  ``tl.sqrt`` are approximate on NVIDIA GPUs);
* launches pass ``enable_fp_fusion=False`` so that no multiply-add is contracted to an FMA;
* ``sinf``/``cosf``/``acosf``/``atan2f``: under the interpreter they are glibc's own float
  functions (numba ufuncs: the very calls the numba engine and tckgen make), so interpreted runs
  reproduce the numba engine bit for bit; on CUDA they are evaluated in float64 (libdevice) and
  rounded to float32, which differs from glibc by one ulp in a few percent of calls (glibc's float
  functions are not correctly rounded). The effect on GPU points is to be measured (see
  ``docs/engines.md``).

Scope: all of SD_Stream, as fused_cpu ``_track_seed`` (FOV / zero-voxel / NaN interpolation,
LUT peak ascent with the 50-iteration cap, cutoff, angle, minimum / maximum length by point
count, bidirectional joining or ``unidirectional``), and ACT as act_cpu:

* RK4 (``-rk4``, Exec::next_rk4): a step is five evaluations; a lane runs them as sub-phases of
  its loop (``sub`` 0..4), so lanes of one program may be at different sub-evaluations;
* regions (include, ordered include, exclude, mask; spheres and image masks; ``-stop``): the
  rows of fused_cpu ``_flatten_rois``, tested at the seed (``check_seed``) and after every step
  in Exec::iterate's order; the include visitation is a per-lane bit set;
* downsampling (``-downsample``) with ``check_downsampled_length`` and ``truncate_maxlength``:
  on the host after the kernel (numpy float32, the same operations as the numba engine), on
  the accepted streamlines only;
* ACT (``-act``, ``act=``; the ``ACT`` constexpr): the 5TT sampled as act_cpu ``_tissues``
  (masked for tracking, unmasked for the interface search; the stencil of :func:`_corners`,
  shared with the FOD), ACT's seed test and ``seed_is_unidirectional`` (per-lane one-way
  streamlines), ``check_structural`` after each step, TERM_IN_SGM, ``apply_priors`` and its
  rejection reasons, ``truncate_exit_sgm`` (a loop over the SGM stretch with the FOD amplitude
  ``PrecomputedAL::value``), ``-crop_at_gmwmi`` (bisection along the Hermite spline) and its
  length re-check (on the host), the SGM seed's WM requirement. Constants: rules' names as
  ``tl.constexpr``; the float64 ones (tissue-sum threshold, interface accuracy) after the 5TT
  transform. No backtracking (tckgen does not allow it for SD_Stream either).

Refused (:func:`supported`): an unbounded ``max_points`` (``downsample x angle >= 360 deg``;
the numba engine refuses it too); the ``triton`` engine of
:mod:`invtract.tracking.engines.triton_gpu` raises a ConfigError.

Public API: :func:`track_fused_triton`, :func:`supported`, :func:`available`,
:func:`unavailable_reason`.
"""

from __future__ import annotations

import math
import os
import time
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..fod.legendre import legendre_index, legendre_table, lut_increment, n_legendre
from ..fod.sh_layout import lmax_from_n
from ..params import ResolvedParameters
from .lengths import segment_lengths, truncate_maxlength
from .rules import (
    FOV_HALF_VOXEL,
    GMWMI_ACCURACY,
    GMWMI_HERMITE_TENSION,
    GMWMI_MAX_ITERS,
    GMWMI_NORMAL_PERTURBATION,
    LUT_LAST_ROW,
    PEAK_MAX_ITERATIONS,
    PEAK_MAX_STEP_RAD,
    PEAK_TOLERANCE_RAD,
    POLE_SIN_THRESHOLD,
    SQRT2,
    TERM_ADD_TO_TCK,
    TISSUE_SUM_THRESHOLD,
    WEIGHT_THRESHOLD,
)
from .types import EngineResult, Reject, RoiSet, Term, concat_results

if TYPE_CHECKING:  # pragma: no cover
    from .act import ActImage

__all__ = [
    "track_fused_triton",
    "supported",
    "available",
    "unavailable_reason",
    "INTERPRET",
]

try:  # pragma: no cover - depends on the installation
    import triton
    import triton.language as tl

    _TRITON_ERROR: Exception | None = None
except Exception as exc:  # pragma: no cover - only without triton
    triton = None
    tl = None
    _TRITON_ERROR = exc

#: The kernels were built for the Triton interpreter (``TRITON_INTERPRET=1`` at import).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")

_CONTINUE = int(Term.CONTINUE)
_EXIT_IMAGE = int(Term.EXIT_IMAGE)
_MODEL = int(Term.MODEL)
_HIGH_CURVATURE = int(Term.HIGH_CURVATURE)
_LENGTH_EXCEED = int(Term.LENGTH_EXCEED)
_ACCEPTED = int(Reject.ACCEPTED)
_INVALID_SEED = int(Reject.INVALID_SEED)
_NO_PROPAGATION = int(Reject.NO_PROPAGATION_FROM_SEED)
_TOO_SHORT = int(Reject.TRACK_TOO_SHORT)
_EXIT_MASK = int(Term.EXIT_MASK)
_ENTER_EXCLUDE = int(Term.ENTER_EXCLUDE)
_TRAVERSE_ALL_INCLUDE = int(Term.TRAVERSE_ALL_INCLUDE)
_EXCLUDED = int(Reject.ENTER_EXCLUDE_REGION)
_MISSED_INCLUDE = int(Reject.MISSED_INCLUDE_REGION)
_ENTER_CGM = int(Term.ENTER_CGM)
_ENTER_CSF = int(Term.ENTER_CSF)
_EXIT_SGM = int(Term.EXIT_SGM)
_TERM_IN_SGM = int(Term.TERM_IN_SGM)
_CALIBRATOR = int(Term.CALIBRATOR)
_TRACK_TOO_LONG = int(Reject.TRACK_TOO_LONG)
_ACT_POOR = int(Reject.ACT_POOR_TERMINATION)
_ACT_FAILED_WM = int(Reject.ACT_FAILED_WM_REQUIREMENT)
#: region sets of the kernel's ROI rows (the codes of fused_cpu ``_flatten_rois``, checked in
#: :func:`_roi_arrays`)
_ROI_INCLUDE, _ROI_EXCLUDE, _ROI_MASK, _ROI_ORDERED = 0, 1, 2, 3
#: the terms whose last point the kernel keeps: rules ``TERM_ADD_TO_TCK`` (ENTER_CGM and
#: ENTER_CSF only occur with ACT)
_KERNEL_ADDS = {Term.CONTINUE, Term.LENGTH_EXCEED, Term.ENTER_EXCLUDE, Term.TRAVERSE_ALL_INCLUDE,
                Term.ENTER_CGM, Term.ENTER_CSF}  # fmt: skip
assert _KERNEL_ADDS == {t for t in Term if TERM_ADD_TO_TCK[t]}

_MAX_BUFFER_POINTS = 1_000_000
#: float64 constants the kernel reads from the end of its transform array (``k_ptr``):
#: ``Math::sqrt2``, then ANGLE_TOLERANCE, which is also the pole test's threshold
_F64_CONSTANTS = (SQRT2, PEAK_TOLERANCE_RAD)
#: float64 constants after the 5TT's 3x4 transform (``mt_ptr``): the tissue-sum threshold of
#: ``Tissues::set`` and the interface accuracy (both compared in double by MRtrix)
_F64_ACT_CONSTANTS = (TISSUE_SUM_THRESHOLD, GMWMI_ACCURACY)
assert POLE_SIN_THRESHOLD == PEAK_TOLERANCE_RAD  # one launch value serves both tests


def unavailable_reason() -> str | None:
    """Why the engine cannot run in this process, or None when it can."""
    if triton is None:
        return f"triton is not importable: {_TRITON_ERROR}"
    if not INTERPRET and not torch.cuda.is_available():
        return (
            "no CUDA device, and the Triton interpreter is off (set TRITON_INTERPRET=1 before "
            "invtract.tracking.fused_triton is imported to run the kernel on CPU)"
        )
    return None


def available() -> bool:
    """True when the kernel can run: triton imported, and CUDA present or interpreter on."""
    return unavailable_reason() is None


def supported(params: ResolvedParameters, rois: RoiSet | None = None, act=None) -> bool:
    """True when the kernel implements this configuration (otherwise use numba / torch).

    Every SD_Stream rule is in the kernel (first order and RK4, downsampling with the length
    check and truncation, include / ordered include / exclude / mask regions as spheres or
    images, ``-stop``), and ACT's with ``act`` (an :class:`~invtract.tracking.act.ActImage`);
    not: an unbounded ``max_points`` (``downsample x angle >= 360 deg``). ``rois`` and ``act``
    are accepted for the interface (any :class:`RoiSet`, any 5TT is covered).
    """
    del rois, act
    return int(params.max_points) + 2 <= _MAX_BUFFER_POINTS


# --------------------------------------------------------------------------------------------
# float32 transcendental functions (see the module notes)
# --------------------------------------------------------------------------------------------

if triton is not None and INTERPRET:
    from triton.runtime.interpreter import TensorHandle as _TensorHandle

    def _glibc_ufuncs():
        try:
            import numba

            sig1 = ["float32(float32)"]
            sig2 = ["float32(float32, float32)"]
            return (
                numba.vectorize(sig1)(lambda x: math.sin(x)),
                numba.vectorize(sig1)(lambda x: math.cos(x)),
                numba.vectorize(sig1)(lambda x: math.acos(x)),
                numba.vectorize(sig2)(lambda y, x: math.atan2(y, x)),
            )
        except Exception:  # pragma: no cover - numba missing: float64 then round

            def via64(f):
                return lambda *a: f(*(np.asarray(v, np.float64) for v in a)).astype(np.float32)

            return via64(np.sin), via64(np.cos), via64(np.arccos), via64(np.arctan2)

    _UF_SIN = _UF_COS = _UF_ACOS = _UF_ATAN2 = None

    def _ufuncs():
        global _UF_SIN, _UF_COS, _UF_ACOS, _UF_ATAN2
        if _UF_SIN is None:
            _UF_SIN, _UF_COS, _UF_ACOS, _UF_ATAN2 = _glibc_ufuncs()
        return _UF_SIN, _UF_COS, _UF_ACOS, _UF_ATAN2

    def _wrap(data, like):
        data = np.ascontiguousarray(data, dtype=np.float32)
        return tl.core.tensor(_TensorHandle(data, tl.float32), like.type)

    def _sinf(x):
        return _wrap(_ufuncs()[0](x.handle.data), x)

    def _cosf(x):
        return _wrap(_ufuncs()[1](x.handle.data), x)

    def _acosf(x):
        return _wrap(_ufuncs()[2](x.handle.data), x)

    def _atan2f(y, x):
        return _wrap(_ufuncs()[3](y.handle.data, x.handle.data), y)

elif triton is not None:  # pragma: no cover - compiled for CUDA
    from triton.language.extra import libdevice

    @triton.jit
    def _sinf(x):
        return libdevice.sin(x.to(tl.float64)).to(tl.float32)

    @triton.jit
    def _cosf(x):
        return libdevice.cos(x.to(tl.float64)).to(tl.float32)

    @triton.jit
    def _acosf(x):
        return libdevice.acos(x.to(tl.float64)).to(tl.float32)

    @triton.jit
    def _atan2f(y, x):
        return libdevice.atan2(y.to(tl.float64), x.to(tl.float64)).to(tl.float32)


# --------------------------------------------------------------------------------------------
# kernel
# --------------------------------------------------------------------------------------------

if triton is not None:
    # Kernels may only read constexpr globals. Float64 constants (sqrt(2), the 1e-4 tolerances)
    # travel in the transform array instead: a Python float constant would be rounded to
    # float32 before it meets a float64 operand.
    _K_NAN = tl.constexpr(float("nan"))
    # scalar arguments that may equal 1 must not become constexpr (the kernel calls .to on some)
    _NO_SPECIALIZE = ["C", "NX", "NY", "NZ", "K", "NAL", "max_points", "min_points", "L",
                      "unidir", "R", "n_inc", "n_ord", "n_mask", "n_exc", "stop", "TX", "TY",
                      "TZ", "crop"]  # fmt: skip
    _K_CONTINUE = tl.constexpr(_CONTINUE)
    _K_EXIT_IMAGE = tl.constexpr(_EXIT_IMAGE)
    _K_MODEL = tl.constexpr(_MODEL)
    _K_HIGH_CURVATURE = tl.constexpr(_HIGH_CURVATURE)
    _K_LENGTH_EXCEED = tl.constexpr(_LENGTH_EXCEED)
    _K_ACCEPTED = tl.constexpr(_ACCEPTED)
    _K_INVALID_SEED = tl.constexpr(_INVALID_SEED)
    _K_NO_PROPAGATION = tl.constexpr(_NO_PROPAGATION)
    _K_TOO_SHORT = tl.constexpr(_TOO_SHORT)
    _K_EXIT_MASK = tl.constexpr(_EXIT_MASK)
    _K_ENTER_EXCLUDE = tl.constexpr(_ENTER_EXCLUDE)
    _K_TRAVERSE_ALL_INCLUDE = tl.constexpr(_TRAVERSE_ALL_INCLUDE)
    _K_EXCLUDED = tl.constexpr(_EXCLUDED)
    _K_MISSED_INCLUDE = tl.constexpr(_MISSED_INCLUDE)
    _K_ROI_INCLUDE = tl.constexpr(_ROI_INCLUDE)
    _K_ROI_EXCLUDE = tl.constexpr(_ROI_EXCLUDE)
    _K_ROI_MASK = tl.constexpr(_ROI_MASK)
    _K_ROI_ORDERED = tl.constexpr(_ROI_ORDERED)
    # the rulebook's float32 / integer constants
    _K_FOV_HALF = tl.constexpr(FOV_HALF_VOXEL)
    _K_WEIGHT_EPS = tl.constexpr(WEIGHT_THRESHOLD)
    _K_MAX_STEP = tl.constexpr(PEAK_MAX_STEP_RAD)
    _K_MAX_ITERATIONS = tl.constexpr(PEAK_MAX_ITERATIONS)
    _K_LUT_LAST_ROW = tl.constexpr(LUT_LAST_ROW)
    # ACT: terms, rejections and the rulebook's constants (float64 ones travel in mt_ptr)
    _K_INF = tl.constexpr(float("inf"))
    _K_ENTER_CGM = tl.constexpr(_ENTER_CGM)
    _K_ENTER_CSF = tl.constexpr(_ENTER_CSF)
    _K_EXIT_SGM = tl.constexpr(_EXIT_SGM)
    _K_TERM_IN_SGM = tl.constexpr(_TERM_IN_SGM)
    _K_CALIBRATOR = tl.constexpr(_CALIBRATOR)
    _K_TRACK_TOO_LONG = tl.constexpr(_TRACK_TOO_LONG)
    _K_ACT_POOR = tl.constexpr(_ACT_POOR)
    _K_ACT_FAILED_WM = tl.constexpr(_ACT_FAILED_WM)
    _K_NORMAL_PERTURBATION = tl.constexpr(GMWMI_NORMAL_PERTURBATION)
    _K_HERMITE_TENSION = tl.constexpr(GMWMI_HERMITE_TENSION)
    _K_GMWMI_MAX_ITERS = tl.constexpr(GMWMI_MAX_ITERS)

    @triton.jit
    def _normalize3(x, y, z):
        """Eigen normalize(): divide by sqrt(x*x + (y*y + z*z)) when that is > 0 (float32)."""
        sq = x * x + (y * y + z * z)
        pos = sq > 0.0
        s = tl.sqrt_rn(tl.where(pos, sq, 1.0))
        return (
            tl.where(pos, tl.div_rn(x, s), x),
            tl.where(pos, tl.div_rn(y, s), y),
            tl.where(pos, tl.div_rn(z, s), z),
        )

    @triton.jit
    def _corners(px, py, pz, live, m_ptr, nz_ptr, NX, NY, NZ, MASKED: tl.constexpr):
        """The trilinear stencil at scanner point p (float32) of an ``[NX, NY, NZ, ...]`` grid
        with the 3x4 float64 scanner->voxel transform at ``m_ptr`` (spec §2, fused_cpu
        ``_interp``).

        Returns ``(ok, o0..o7, w0..w7)``: ``ok`` = live, inside the field of view and, when
        ``MASKED``, a nearest voxel that is not all-zero (``nz_ptr``: int8 per voxel); the
        corners' voxel indices (int64, corner k = x + 2y + 4z) and float32 weights (those below
        the threshold set to 0, the rest not renormalised).
        """
        dx = px.to(tl.float64)
        dy = py.to(tl.float64)
        dz = pz.to(tl.float64)
        m00 = tl.load(m_ptr + 0)
        m01 = tl.load(m_ptr + 1)
        m02 = tl.load(m_ptr + 2)
        m03 = tl.load(m_ptr + 3)
        m10 = tl.load(m_ptr + 4)
        m11 = tl.load(m_ptr + 5)
        m12 = tl.load(m_ptr + 6)
        m13 = tl.load(m_ptr + 7)
        m20 = tl.load(m_ptr + 8)
        m21 = tl.load(m_ptr + 9)
        m22 = tl.load(m_ptr + 10)
        m23 = tl.load(m_ptr + 11)
        v0 = ((m00 * dx + m01 * dy) + m02 * dz) + m03
        v1 = ((m10 * dx + m11 * dy) + m12 * dz) + m13
        v2 = (m20 * dx + m21 * dy) + (m22 * dz + m23)
        nxf = NX.to(tl.float64)
        nyf = NY.to(tl.float64)
        nzf = NZ.to(tl.float64)
        inside = live & (v0 > -_K_FOV_HALF) & (v0 < nxf - _K_FOV_HALF)
        inside = inside & (v1 > -_K_FOV_HALF) & (v1 < nyf - _K_FOV_HALF)
        inside = inside & (v2 > -_K_FOV_HALF) & (v2 < nzf - _K_FOV_HALF)
        v0 = tl.where(inside, v0, 0.0)
        v1 = tl.where(inside, v1, 0.0)
        v2 = tl.where(inside, v2, 0.0)
        # std::round (half away from zero) of the in-FOV coordinates (v > -0.5 there)
        g0 = tl.floor(tl.abs(v0))
        g1 = tl.floor(tl.abs(v1))
        g2 = tl.floor(tl.abs(v2))
        r0 = tl.where(tl.abs(v0) - g0 >= 0.5, g0 + 1.0, g0)
        r1 = tl.where(tl.abs(v1) - g1 >= 0.5, g1 + 1.0, g1)
        r2 = tl.where(tl.abs(v2) - g2 >= 0.5, g2 + 1.0, g2)
        r0 = tl.where(v0 < 0.0, -r0, r0).to(tl.int32)
        r1 = tl.where(v1 < 0.0, -r1, r1).to(tl.int32)
        r2 = tl.where(v2 < 0.0, -r2, r2).to(tl.int32)
        if MASKED:
            nzv = tl.load(nz_ptr + ((r0 * NY + r1) * NZ + r2), mask=inside, other=0)
            ok = inside & (nzv != 0)
        else:
            ok = inside
        fl0 = tl.floor(v0)
        fl1 = tl.floor(v1)
        fl2 = tl.floor(v2)
        f0 = tl.where((v0 < 0.0) | (v0 > nxf - 1.0), 0.0, v0 - fl0)
        f1 = tl.where((v1 < 0.0) | (v1 > nyf - 1.0), 0.0, v1 - fl1)
        f2 = tl.where((v2 < 0.0) | (v2 > nzf - 1.0), 0.0, v2 - fl2)
        c0 = fl0.to(tl.int32)
        c1 = fl1.to(tl.int32)
        c2 = fl2.to(tl.int32)
        x0 = tl.minimum(tl.maximum(c0, 0), NX - 1)
        x1 = tl.minimum(tl.maximum(c0 + 1, 0), NX - 1)
        y0 = tl.minimum(tl.maximum(c1, 0), NY - 1)
        y1 = tl.minimum(tl.maximum(c1 + 1, 0), NY - 1)
        z0 = tl.minimum(tl.maximum(c2, 0), NZ - 1)
        z1 = tl.minimum(tl.maximum(c2 + 1, 0), NZ - 1)
        wx0 = (1.0 - f0).to(tl.float32)
        wx1 = f0.to(tl.float32)
        wy0 = (1.0 - f1).to(tl.float32)
        wy1 = f1.to(tl.float32)
        wz0 = (1.0 - f2).to(tl.float32)
        wz1 = f2.to(tl.float32)
        eps = _K_WEIGHT_EPS
        w0 = wx0 * (wy0 * wz0)
        w1 = wx1 * (wy0 * wz0)
        w2 = wx0 * (wy1 * wz0)
        w3 = wx1 * (wy1 * wz0)
        w4 = wx0 * (wy0 * wz1)
        w5 = wx1 * (wy0 * wz1)
        w6 = wx0 * (wy1 * wz1)
        w7 = wx1 * (wy1 * wz1)
        w0 = tl.where(w0 < eps, 0.0, w0)
        w1 = tl.where(w1 < eps, 0.0, w1)
        w2 = tl.where(w2 < eps, 0.0, w2)
        w3 = tl.where(w3 < eps, 0.0, w3)
        w4 = tl.where(w4 < eps, 0.0, w4)
        w5 = tl.where(w5 < eps, 0.0, w5)
        w6 = tl.where(w6 < eps, 0.0, w6)
        w7 = tl.where(w7 < eps, 0.0, w7)
        o0 = ((x0 * NY + y0) * NZ + z0).to(tl.int64)
        o1 = ((x1 * NY + y0) * NZ + z0).to(tl.int64)
        o2 = ((x0 * NY + y1) * NZ + z0).to(tl.int64)
        o3 = ((x1 * NY + y1) * NZ + z0).to(tl.int64)
        o4 = ((x0 * NY + y0) * NZ + z1).to(tl.int64)
        o5 = ((x1 * NY + y0) * NZ + z1).to(tl.int64)
        o6 = ((x0 * NY + y1) * NZ + z1).to(tl.int64)
        o7 = ((x1 * NY + y1) * NZ + z1).to(tl.int64)
        return ok, o0, o1, o2, o3, o4, o5, o6, o7, w0, w1, w2, w3, w4, w5, w6, w7

    @triton.jit
    def _sample(px, py, pz, live, sh_ptr, nz_ptr, m_ptr, cs_ptr, lane, LANES, NX, NY, NZ, K,
                BLOCK: tl.constexpr, KP: tl.constexpr, KC: tl.constexpr):  # fmt: skip
        """Interpolate the SH coefficients at p into the scratch ``cs[k * LANES + lane]``.

        Returns the per-lane "has data" flag (FOV, nearest voxel not all-zero, c_0 not NaN);
        spec §2, fused_cpu ``_sample``.
        """
        ok, o0, o1, o2, o3, o4, o5, o6, o7, w0, w1, w2, w3, w4, w5, w6, w7 = _corners(
            px, py, pz, live, m_ptr, nz_ptr, NX, NY, NZ, True
        )
        # voxel offsets in int64 (large volumes x K)
        Kl = K.to(tl.int64)
        o0 = (o0 * Kl)[:, None]
        o1 = (o1 * Kl)[:, None]
        o2 = (o2 * Kl)[:, None]
        o3 = (o3 * Kl)[:, None]
        o4 = (o4 * Kl)[:, None]
        o5 = (o5 * Kl)[:, None]
        o6 = (o6 * Kl)[:, None]
        o7 = (o7 * Kl)[:, None]
        # KC coefficients at a time (registers on CUDA; one pass under the interpreter)
        for k0 in tl.static_range(0, KP, KC):
            kk = k0 + tl.arange(0, KC)[None, :]
            m2 = ok[:, None] & (kk < K)
            a0 = tl.load(sh_ptr + (o0 + kk), mask=m2, other=0.0)
            a1 = tl.load(sh_ptr + (o1 + kk), mask=m2, other=0.0)
            a2 = tl.load(sh_ptr + (o2 + kk), mask=m2, other=0.0)
            a3 = tl.load(sh_ptr + (o3 + kk), mask=m2, other=0.0)
            a4 = tl.load(sh_ptr + (o4 + kk), mask=m2, other=0.0)
            a5 = tl.load(sh_ptr + (o5 + kk), mask=m2, other=0.0)
            a6 = tl.load(sh_ptr + (o6 + kk), mask=m2, other=0.0)
            a7 = tl.load(sh_ptr + (o7 + kk), mask=m2, other=0.0)
            # Eigen's 4-wide packet order of the 8-corner dot product (fused_cpu
            # _SUM_ORDER_EIGEN)
            t0 = a0 * w0[:, None] + a4 * w4[:, None]
            t1 = a1 * w1[:, None] + a5 * w5[:, None]
            t2 = a2 * w2[:, None] + a6 * w6[:, None]
            t3 = a3 * w3[:, None] + a7 * w7[:, None]
            c = (t0 + t2) + (t1 + t3)
            tl.store(cs_ptr + (kk.to(tl.int64) * LANES + lane[:, None]), c, mask=m2)
        tl.debug_barrier()
        first = tl.load(cs_ptr + lane, mask=ok, other=0.0)
        return ok & (first == first)

    @triton.jit
    def _derivs_seq(cs_ptr, lane, LANES, lut_ptr, ra, rb, w1, w2, ic, az, atpole, tab_ptr,
                    flt_ptr, sqrt2, active, BLOCK: tl.constexpr,
                    NS: tl.constexpr):  # fmt: skip
        """The six sums of SH.h ``derivatives``, one slot after the other (a lane per thread).

        Same terms and order of additions as the tiled variant in :func:`_get_peak`; this form
        keeps a lane's state in one thread's registers (meant for CUDA; slow to interpret).
        ``ra``/``rb``/``w1``/``w2``/``ic``: ``[BLOCK]`` LUT rows and weights.
        """
        amplitude = tl.zeros([BLOCK], tl.float32)
        dEl = tl.zeros([BLOCK], tl.float32)
        dEl2 = tl.zeros([BLOCK], tl.float32)
        dAz = tl.zeros([BLOCK], tl.float32)
        dElAz = tl.zeros([BLOCK], tl.float32)
        dAz2 = tl.zeros([BLOCK], tl.float32)
        caz = tl.zeros([BLOCK], tl.float32)
        saz = tl.zeros([BLOCK], tl.float32)
        mprev = -1
        for sl in range(NS):
            zon = tl.load(tab_ptr + 9 * sl) != 0
            cp = tl.load(tab_ptr + 9 * sl + 1)
            cm = tl.load(tab_ptr + 9 * sl + 2)
            m = tl.load(tab_ptr + 9 * sl + 3)
            i0 = tl.load(tab_ptr + 9 * sl + 4)
            i1 = tl.load(tab_ptr + 9 * sl + 5)
            i2 = tl.load(tab_ptr + 9 * sl + 6)
            i3 = tl.load(tab_ptr + 9 * sl + 7)
            i4 = tl.load(tab_ptr + 9 * sl + 8)
            f0 = tl.load(flt_ptr + 5 * sl)
            f1 = tl.load(flt_ptr + 5 * sl + 1)
            f2 = tl.load(flt_ptr + 5 * sl + 2)
            f3 = tl.load(flt_ptr + 5 * sl + 3)
            f4 = tl.load(flt_ptr + 5 * sl + 4)
            vp = tl.load(cs_ptr + (cp * LANES + lane), mask=active, other=0.0)
            vm = tl.load(cs_ptr + (cm * LANES + lane), mask=active, other=0.0)
            la = tl.load(lut_ptr + (ra + i0), mask=active, other=0.0)
            lb = tl.load(lut_ptr + (rb + i0), mask=active, other=0.0)
            al0 = tl.where(ic, w1 * la + w2 * lb, w1 * la)
            la = tl.load(lut_ptr + (ra + i1), mask=active, other=0.0)
            lb = tl.load(lut_ptr + (rb + i1), mask=active, other=0.0)
            al1 = tl.where(ic, w1 * la + w2 * lb, w1 * la)
            la = tl.load(lut_ptr + (ra + i2), mask=active, other=0.0)
            lb = tl.load(lut_ptr + (rb + i2), mask=active, other=0.0)
            al2 = tl.where(ic, w1 * la + w2 * lb, w1 * la)
            la = tl.load(lut_ptr + (ra + i3), mask=active, other=0.0)
            lb = tl.load(lut_ptr + (rb + i3), mask=active, other=0.0)
            al3 = tl.where(ic, w1 * la + w2 * lb, w1 * la)
            la = tl.load(lut_ptr + (ra + i4), mask=active, other=0.0)
            lb = tl.load(lut_ptr + (rb + i4), mask=active, other=0.0)
            al4 = tl.where(ic, w1 * la + w2 * lb, w1 * la)
            if m != mprev:  # slots are sorted by m: cos / sin once per m
                maz = m.to(tl.float32) * az
                caz = (sqrt2 * _cosf(maz).to(tl.float64)).to(tl.float32)
                saz = (sqrt2 * _sinf(maz).to(tl.float64)).to(tl.float32)
            mprev = m
            fm = m.to(tl.float32)
            z_amp = vp * al0
            z_del = (vp * f0) * al1
            z_del2 = (vp * (f1 * al2 - f2 * al0)) * 0.5
            A = vp * caz + vm * saz
            tmp = f0 * al1
            tmp = tmp - f1 * al2
            tmp = tmp * -0.5
            tmp2 = f2 * al0
            tmp2 = tmp2 + f3 * al3
            tmp2 = tmp2 + f4 * al4
            tmp2 = tmp2 * 0.25
            B = vm * caz - vp * saz
            mB = fm * B
            amplitude = amplitude + tl.where(zon, z_amp, A * al0)
            dEl = dEl + tl.where(zon, z_del, A * tmp)
            dEl2 = dEl2 + tl.where(zon, z_del2, A * tmp2)
            dAz = dAz + tl.where(zon, 0.0, tl.where(atpole, B * tmp, mB * al0))
            dElAz = dElAz + tl.where(zon | atpole, 0.0, mB * tmp)
            dAz2 = dAz2 + tl.where(zon | atpole, 0.0, -(((A * fm) * fm) * al0))
        return amplitude, dEl, dEl2, dAz, dElAz, dAz2

    @triton.jit
    def _derivs_tile(lut_ptr, ra, rb, w1c, w2c, ic, act2, i0, i1, i2, i3, i4, f0, f1, f2, f3,
                     f4, fm, t_zon, vp, vm, az, atpole, sqrt2, k8, s3, BLOCK: tl.constexpr,
                     NS: tl.constexpr):  # fmt: skip
        """The six sums of SH.h ``derivatives`` with every slot's terms in a ``[BLOCK, SP]`` tile.

        The terms are formed elementwise as fused_cpu forms them; the sums then add them one slot
        after the other in float32 (extraction of one slot per row by a masked sum is exact), in
        the C++ order. Few, wide operations: the variant the interpreter runs quickly.
        """
        # PrecomputedAL::get, inlined (the interpreter pays for every nested call):
        # (1 - w) row_i + w row_{i+1}, or row_i when w == 0
        la = tl.load(lut_ptr + (ra + i0), mask=act2, other=0.0)
        lb = tl.load(lut_ptr + (rb + i0), mask=act2, other=0.0)
        al0 = tl.where(ic, w1c * la + w2c * lb, w1c * la)
        la = tl.load(lut_ptr + (ra + i1), mask=act2, other=0.0)
        lb = tl.load(lut_ptr + (rb + i1), mask=act2, other=0.0)
        al1 = tl.where(ic, w1c * la + w2c * lb, w1c * la)
        la = tl.load(lut_ptr + (ra + i2), mask=act2, other=0.0)
        lb = tl.load(lut_ptr + (rb + i2), mask=act2, other=0.0)
        al2 = tl.where(ic, w1c * la + w2c * lb, w1c * la)
        la = tl.load(lut_ptr + (ra + i3), mask=act2, other=0.0)
        lb = tl.load(lut_ptr + (rb + i3), mask=act2, other=0.0)
        al3 = tl.where(ic, w1c * la + w2c * lb, w1c * la)
        la = tl.load(lut_ptr + (ra + i4), mask=act2, other=0.0)
        lb = tl.load(lut_ptr + (rb + i4), mask=act2, other=0.0)
        al4 = tl.where(ic, w1c * la + w2c * lb, w1c * la)
        # --- zonal slots (l, 0): v = c_l0; AL at (a, a+1, a+2)
        z_amp = vp * al0
        z_del = (vp * f0) * al1
        z_del2 = (vp * (f1 * al2 - f2 * al0)) * 0.5
        # --- pair slots (l, +-m): AL at (m, m-1, m+1, |m-2| or 1, m+2); absent terms
        # have zero factors (t - 0 * x == t exactly)
        maz = fm * az[:, None]
        caz = (sqrt2 * _cosf(maz).to(tl.float64)).to(tl.float32)
        saz = (sqrt2 * _sinf(maz).to(tl.float64)).to(tl.float32)
        A = vp * caz + vm * saz
        p_amp = A * al0
        tmp = f0 * al1
        tmp = tmp - f1 * al2
        tmp = tmp * -0.5
        p_del = A * tmp
        # f3 carries the sign of the P_l^{|m-2|} term (negative for m == 1)
        tmp2 = f2 * al0
        tmp2 = tmp2 + f3 * al3
        tmp2 = tmp2 + f4 * al4
        tmp2 = tmp2 * 0.25
        p_del2 = A * tmp2
        B = vm * caz - vp * saz
        mB = fm * B
        pole2 = atpole[:, None]
        p_daz = tl.where(pole2, B * tmp, mB * al0)
        p_delaz = tl.where(pole2, 0.0, mB * tmp)
        p_daz2 = tl.where(pole2, 0.0, -(((A * fm) * fm) * al0))
        # --- the six sums, stacked as [BLOCK, 8, SP] and folded slot by slot
        T = tl.where(t_zon, z_amp, p_amp)[:, None, :]
        T = tl.where(k8 == 1, tl.where(t_zon, z_del, p_del)[:, None, :], T)
        T = tl.where(k8 == 2, tl.where(t_zon, z_del2, p_del2)[:, None, :], T)
        T = tl.where(k8 == 3, tl.where(t_zon, 0.0, p_daz)[:, None, :], T)
        T = tl.where(k8 == 4, tl.where(t_zon, 0.0, p_delaz)[:, None, :], T)
        T = tl.where(k8 == 5, tl.where(t_zon, 0.0, p_daz2)[:, None, :], T)
        acc = tl.zeros([BLOCK, 8], tl.float32)
        for j in tl.static_range(NS):
            # one non-zero term per row plus zeros: the extraction is exact
            acc = acc + tl.sum(tl.where(s3 == j, T, 0.0), axis=2)
        k2 = tl.arange(0, 8)[None, :]
        amplitude = tl.sum(tl.where(k2 == 0, acc, 0.0), axis=1)
        dEl = tl.sum(tl.where(k2 == 1, acc, 0.0), axis=1)
        dEl2 = tl.sum(tl.where(k2 == 2, acc, 0.0), axis=1)
        dAz = tl.sum(tl.where(k2 == 3, acc, 0.0), axis=1)
        dElAz = tl.sum(tl.where(k2 == 4, acc, 0.0), axis=1)
        dAz2 = tl.sum(tl.where(k2 == 5, acc, 0.0), axis=1)
        return amplitude, dEl, dEl2, dAz, dElAz, dAz2

    @triton.jit
    def _get_peak(cs_ptr, lane, LANES, ux, uy, uz, active, lut_ptr, NAL, inc, tab_ptr,
                  flt_ptr, k_ptr, BLOCK: tl.constexpr, SP: tl.constexpr, NS: tl.constexpr,
                  SEQ: tl.constexpr):  # fmt: skip
        """Math::SH::get_peak (float32, LUT): returns (amplitude, ux, uy, uz) per lane.

        Lanes that do not converge within 50 iterations (or take a NaN step) get NaN. The
        ``NS`` (l, m) terms are formed in a ``[BLOCK, SP]`` tile exactly as fused_cpu
        ``_get_peak`` forms them, then summed one slot after the other in float32, in the
        tables' order (zonal l = 0, 2, ..., then m = 1..lmax, l ascending): the same order of
        additions as the C++ loops, so the results are the same bits.
        """
        r_amp = tl.full([BLOCK], _K_NAN, tl.float32)
        r_x = tl.full([BLOCK], _K_NAN, tl.float32)
        r_y = tl.full([BLOCK], _K_NAN, tl.float32)
        r_z = tl.full([BLOCK], _K_NAN, tl.float32)
        sqrt2 = tl.load(k_ptr)  # float64 Math::sqrt2
        tol = tl.load(k_ptr + 1)  # float64 1e-4 (ANGLE_TOLERANCE and the pole test)
        lane2 = lane[:, None]
        # --- slot tables (see _tables): padded slots have zero factors and index 0
        ss = tl.arange(0, SP)
        sm = ss < NS
        t_zon = tl.load(tab_ptr + 9 * ss, mask=sm, other=0)[None, :] != 0
        t_cp = tl.load(tab_ptr + 9 * ss + 1, mask=sm, other=0)[None, :]
        t_cm = tl.load(tab_ptr + 9 * ss + 2, mask=sm, other=0)[None, :]
        t_m = tl.load(tab_ptr + 9 * ss + 3, mask=sm, other=0)[None, :]
        i0 = tl.load(tab_ptr + 9 * ss + 4, mask=sm, other=0)[None, :]
        i1 = tl.load(tab_ptr + 9 * ss + 5, mask=sm, other=0)[None, :]
        i2 = tl.load(tab_ptr + 9 * ss + 6, mask=sm, other=0)[None, :]
        i3 = tl.load(tab_ptr + 9 * ss + 7, mask=sm, other=0)[None, :]
        i4 = tl.load(tab_ptr + 9 * ss + 8, mask=sm, other=0)[None, :]
        f0 = tl.load(flt_ptr + 5 * ss, mask=sm, other=0.0)[None, :]
        f1 = tl.load(flt_ptr + 5 * ss + 1, mask=sm, other=0.0)[None, :]
        f2 = tl.load(flt_ptr + 5 * ss + 2, mask=sm, other=0.0)[None, :]
        f3 = tl.load(flt_ptr + 5 * ss + 3, mask=sm, other=0.0)[None, :]
        f4 = tl.load(flt_ptr + 5 * ss + 4, mask=sm, other=0.0)[None, :]
        fm = t_m.to(tl.float32)
        # --- the coefficients do not change during the search
        cmask = active[:, None] & sm[None, :]
        vp = tl.load(cs_ptr + (t_cp * LANES + lane2), mask=cmask, other=0.0)
        vm = tl.load(cs_ptr + (t_cm * LANES + lane2), mask=cmask & (~t_zon), other=0.0)
        k8 = tl.arange(0, 8)[None, :, None]
        s3 = ss[None, None, :]
        it = tl.zeros([BLOCK], tl.int32)
        while tl.max(active.to(tl.int32), axis=0) > 0:
            az = _atan2f(uy, ux)
            el = _acosf(uz)
            sel = _sinf(el)
            atpole = sel.to(tl.float64) < tol
            # --- Legendre lookup (PrecomputedAL::set)
            row, w1, w2 = _lut_row(el, inc)
            ra = (row * NAL)[:, None]
            rb = (tl.minimum(row + 1, _K_LUT_LAST_ROW) * NAL)[:, None]
            w1c = w1[:, None]
            w2c = w2[:, None]
            ic = (w2 != 0.0)[:, None]
            act2 = active[:, None]
            if SEQ:
                amplitude, dEl, dEl2, dAz, dElAz, dAz2 = _derivs_seq(
                    cs_ptr, lane, LANES, lut_ptr, row * NAL,
                    tl.minimum(row + 1, _K_LUT_LAST_ROW) * NAL,
                    w1, w2, w2 != 0.0, az, atpole, tab_ptr, flt_ptr, sqrt2, active, BLOCK, NS
                )  # fmt: skip
            else:
                amplitude, dEl, dEl2, dAz, dElAz, dAz2 = _derivs_tile(
                    lut_ptr, ra, rb, w1c, w2c, ic, act2, i0, i1, i2, i3, i4, f0, f1, f2, f3,
                    f4, fm, t_zon, vp, vm, az, atpole, sqrt2, k8, s3, BLOCK, NS
                )  # fmt: skip
            sel_safe = tl.where(atpole, 1.0, sel)
            dAz = tl.where(atpole, dAz, tl.div_rn(dAz, sel_safe))
            dElAz = tl.where(atpole, dElAz, tl.div_rn(dElAz, sel_safe))
            dAz2 = tl.where(atpole, dAz2, tl.div_rn(dAz2, sel_safe * sel_safe))
            # --- one ascent step
            nrm = tl.sqrt_rn(dEl * dEl + dAz * dAz)
            nz = nrm != 0.0
            nrm_safe = tl.where(nz, nrm, 1.0)
            gAz = tl.where(nz, tl.div_rn(dAz, nrm_safe), 0.0)
            gEl = tl.where(nz, tl.div_rn(dEl, nrm_safe), 0.0)
            s1 = gAz * dAz + gEl * dEl
            s2 = (
                ((gAz * gAz) * dAz2).to(tl.float64)
                + ((2.0 * gAz.to(tl.float64)) * gEl.to(tl.float64)) * dElAz.to(tl.float64)
            ) + ((gEl * gEl) * dEl2).to(tl.float64)
            s2 = s2.to(tl.float32)
            s2nz = s2 != 0.0
            dt = tl.where(s2nz, tl.div_rn(-s1, tl.where(s2nz, s2, 1.0)), 0.0)
            dt = tl.where(dt < 0.0, -dt, dt)
            dt = tl.where(dt > _K_MAX_STEP, _K_MAX_STEP, dt)
            active = active & (dt == dt)  # NaN step: the search fails (result stays NaN)
            gEl = gEl * dt
            gAz = gAz * dt
            caz1 = _cosf(az)
            saz1 = _sinf(az)
            cel = _cosf(el)
            nx = ux + ((gEl * caz1) * cel - gAz * saz1)
            ny = uy + ((gEl * saz1) * cel + gAz * caz1)
            nzz = uz - gEl * sel
            nx, ny, nzz = _normalize3(nx, ny, nzz)
            conv = active & (dt.to(tl.float64) < tol)
            r_amp = tl.where(conv, amplitude, r_amp)
            r_x = tl.where(conv, nx, r_x)
            r_y = tl.where(conv, ny, r_y)
            r_z = tl.where(conv, nzz, r_z)
            ux = tl.where(active, nx, ux)
            uy = tl.where(active, ny, uy)
            uz = tl.where(active, nzz, uz)
            it += 1
            active = active & (~conv) & (it < _K_MAX_ITERATIONS)
        return r_amp, r_x, r_y, r_z

    @triton.jit
    def _lut_row(el, inc):
        """``PrecomputedAL::set`` at elevation ``el``: the table row and the interpolation
        weights ``(row, w1, w2)`` (a NaN elevation or one off the table: its edge row, w2 0)."""
        fr = tl.div_rn(el, inc)
        isnan = fr != fr
        frs = tl.where(isnan, 0.0, fr)
        ii = frs.to(tl.int32)
        edge = isnan | (ii < 0) | (ii >= _K_LUT_LAST_ROW)
        row = tl.where(ii < 0, 0, tl.where(ii >= _K_LUT_LAST_ROW, _K_LUT_LAST_ROW, ii))
        row = tl.where(isnan, 0, row)
        w2 = tl.where(edge, 0.0, frs - ii.to(tl.float32))
        w1 = tl.where(edge, 1.0, 1.0 - w2)
        return row, w1, w2

    @triton.jit
    def _dot3(ax, ay, az, bx, by, bz):
        """Eigen Vector3f::dot order: x*x' + (y*y' + z*z') (float32)."""
        return ax * bx + (ay * by + az * bz)

    @triton.jit
    def _round_half_away(v):
        """std::round (half away from zero) of float32 ``v``, as a float32 value."""
        a = tl.abs(v)
        r = tl.floor(a)
        r = tl.where(a - r >= 0.5, r + 1.0, r)
        return tl.where(v < 0.0, -r, r)

    @triton.jit
    def _roi_contains(r, px, py, pz, act, ri_ptr, rf_ptr, rmask_ptr):
        """roi.h: whether p (float32 scanner mm) lies in region ``r`` (fused_cpu
        ``_roi_contains``).

        A sphere: ``|c - p|^2 <= radius^2`` in float32. An image mask: its float32 3x4
        scanner->voxel transform, nearest voxel (``std::round``), outside the grid is outside.
        ``ri_ptr``: ``[R, 8]`` int64 rows ``(set, bit, kind, n0, n1, n2, offset, 0)``;
        ``rf_ptr``: ``[R, 16]`` float32 rows ``(c0, c1, c2, radius^2, transform 3x4)``.
        """
        kind = tl.load(ri_ptr + r * 8 + 2)
        fb = rf_ptr + r * 16
        dx = tl.load(fb) - px
        dy = tl.load(fb + 1) - py
        dz = tl.load(fb + 2) - pz
        in_sphere = dx * dx + (dy * dy + dz * dz) <= tl.load(fb + 3)
        v0 = (tl.load(fb + 4) * px + tl.load(fb + 5) * py) + (
            tl.load(fb + 6) * pz + tl.load(fb + 7)
        )
        v1 = (tl.load(fb + 8) * px + tl.load(fb + 9) * py) + (
            tl.load(fb + 10) * pz + tl.load(fb + 11)
        )
        v2 = (tl.load(fb + 12) * px + tl.load(fb + 13) * py) + (
            tl.load(fb + 14) * pz + tl.load(fb + 15)
        )
        i0 = _round_half_away(v0)
        i1 = _round_half_away(v1)
        i2 = _round_half_away(v2)
        n0 = tl.load(ri_ptr + r * 8 + 3)
        n1 = tl.load(ri_ptr + r * 8 + 4)
        n2 = tl.load(ri_ptr + r * 8 + 5)
        inb = (v0 - v0 == 0.0) & (v1 - v1 == 0.0) & (v2 - v2 == 0.0)
        inb = inb & (i0 >= 0.0) & (i0 < n0.to(tl.float32))
        inb = inb & (i1 >= 0.0) & (i1 < n1.to(tl.float32))
        inb = inb & (i2 >= 0.0) & (i2 < n2.to(tl.float32))
        j0 = tl.where(inb, i0, 0.0).to(tl.int64)
        j1 = tl.where(inb, i1, 0.0).to(tl.int64)
        j2 = tl.where(inb, i2, 0.0).to(tl.int64)
        idx = tl.load(ri_ptr + r * 8 + 6) + (j0 * n1 + j1) * n2 + j2
        image = (j0 * 0 + kind) != 0  # (a loaded scalar cannot join a mask directly)
        mval = tl.load(rmask_ptr + idx, mask=act & inb & image, other=0)
        in_image = inb & (mval != 0)
        return act & tl.where(image, in_image, in_sphere)

    @triton.jit
    def _in_set(which, px, py, pz, act, ri_ptr, rf_ptr, rmask_ptr, R, BLOCK: tl.constexpr):
        """Whether p lies in any region of set ``which`` (fused_cpu ``_in_set``)."""
        hit = tl.zeros([BLOCK], tl.int1)
        for r in range(R):
            if tl.load(ri_ptr + r * 8) == which:
                hit = hit | _roi_contains(r, px, py, pz, act, ri_ptr, rf_ptr, rmask_ptr)
        return hit

    @triton.jit
    def _visit(px, py, pz, act, vis, ordn, valid, ri_ptr, rf_ptr, rmask_ptr, R,
               BLOCK: tl.constexpr):  # fmt: skip
        """IncludeROIVisitation::operator() (fused_cpu ``_visit``): ``vis`` int64 bits of the
        include regions entered, ``ordn`` the next ordered region due, ``valid`` False once an
        ordered region was entered out of order. Returns the updated ``(vis, ordn, valid)``."""
        one = tl.full([BLOCK], 1, tl.int64)
        found = tl.zeros([BLOCK], tl.int1)
        for r in range(R):
            which = tl.load(ri_ptr + r * 8)
            bit = tl.load(ri_ptr + r * 8 + 1)
            if which == _K_ROI_INCLUDE:
                c = _roi_contains(r, px, py, pz, act, ri_ptr, rf_ptr, rmask_ptr)
                vis = tl.where(c, vis | (one << bit), vis)
            if which == _K_ROI_ORDERED:
                c = _roi_contains(r, px, py, pz, act & valid & (~found), ri_ptr, rf_ptr,
                                  rmask_ptr)  # fmt: skip
                b32 = bit.to(tl.int32)
                valid = valid & (~(c & (b32 != ordn) & (b32 != ordn - 1)))
                ordn = tl.where(c & (b32 == ordn), ordn + 1, ordn)
                found = found | c
        return vis, ordn, valid

    # ----------------------------------------------------------------------------------------
    # ACT (act_cpu's rules, lane by lane; the tissue tests are rules.is_* as lane masks)
    # ----------------------------------------------------------------------------------------

    @triton.jit
    def _tissues(px, py, pz, live, tt_ptr, tnz_ptr, mt_ptr, TX, TY, TZ, BLOCK: tl.constexpr,
                 MASKED: tl.constexpr):  # fmt: skip
        """``Tissues::set`` of the 5TT interpolated at p (act_cpu ``_tissues``).

        ``tt_ptr``: ``[TX, TY, TZ, 5]`` float32 (MRtrix voxel order), ``tnz_ptr`` its int8
        "voxel not all-zero" map, ``mt_ptr``: float64 scanner->voxel 3x4, then
        TISSUE_SUM_THRESHOLD and GMWMI_ACCURACY. ``MASKED``: ACT's masked interpolator (an
        all-zero nearest voxel is no data); unmasked for the interface search.

        Returns ``(interp, valid, cgm, sgm, wm, csf, path)``: ``interp`` = data there and cgm not
        NaN (fused_cpu ``_interp``'s result); the five clamped to [0, 1] (all 0 without data or
        with a NaN); ``valid`` = data, no NaN and sum >= the threshold (compared in float64).
        """
        ok, o0, o1, o2, o3, o4, o5, o6, o7, w0, w1, w2, w3, w4, w5, w6, w7 = _corners(
            px, py, pz, live, mt_ptr, tnz_ptr, TX, TY, TZ, MASKED
        )
        kk = tl.arange(0, 8)[None, :]
        m2 = ok[:, None] & (kk < 5)
        a0 = tl.load(tt_ptr + (o0 * 5)[:, None] + kk, mask=m2, other=0.0)
        a1 = tl.load(tt_ptr + (o1 * 5)[:, None] + kk, mask=m2, other=0.0)
        a2 = tl.load(tt_ptr + (o2 * 5)[:, None] + kk, mask=m2, other=0.0)
        a3 = tl.load(tt_ptr + (o3 * 5)[:, None] + kk, mask=m2, other=0.0)
        a4 = tl.load(tt_ptr + (o4 * 5)[:, None] + kk, mask=m2, other=0.0)
        a5 = tl.load(tt_ptr + (o5 * 5)[:, None] + kk, mask=m2, other=0.0)
        a6 = tl.load(tt_ptr + (o6 * 5)[:, None] + kk, mask=m2, other=0.0)
        a7 = tl.load(tt_ptr + (o7 * 5)[:, None] + kk, mask=m2, other=0.0)
        # Eigen's packet order, as _sample
        t0 = a0 * w0[:, None] + a4 * w4[:, None]
        t1 = a1 * w1[:, None] + a5 * w5[:, None]
        t2 = a2 * w2[:, None] + a6 * w6[:, None]
        t3 = a3 * w3[:, None] + a7 * w7[:, None]
        v = (t0 + t2) + (t1 + t3)
        # one column each (the other terms are exact zeros)
        c = tl.sum(tl.where(kk == 0, v, 0.0), axis=1)
        s = tl.sum(tl.where(kk == 1, v, 0.0), axis=1)
        w = tl.sum(tl.where(kk == 2, v, 0.0), axis=1)
        f = tl.sum(tl.where(kk == 3, v, 0.0), axis=1)
        p = tl.sum(tl.where(kk == 4, v, 0.0), axis=1)
        interp = ok & (c == c)
        good = interp & (s == s) & (w == w) & (f == f) & (p == p)
        c = tl.where(good, tl.minimum(tl.maximum(c, 0.0), 1.0), 0.0)
        s = tl.where(good, tl.minimum(tl.maximum(s, 0.0), 1.0), 0.0)
        w = tl.where(good, tl.minimum(tl.maximum(w, 0.0), 1.0), 0.0)
        f = tl.where(good, tl.minimum(tl.maximum(f, 0.0), 1.0), 0.0)
        p = tl.where(good, tl.minimum(tl.maximum(p, 0.0), 1.0), 0.0)
        total = (((c + s) + w) + f) + p
        valid = good & (total.to(tl.float64) >= tl.load(mt_ptr + 12))
        return interp, valid, c, s, w, f, p

    @triton.jit
    def _is_csf(c, s, w, f, p):
        """rules.is_csf, lane-wise."""
        return (f >= c) & (f >= s) & (f >= w) & (f >= p)

    @triton.jit
    def _is_sgm(c, s, w, f, p):
        """rules.is_sgm, lane-wise."""
        return (s > c) & (s >= w) & (s > f) & (s > p)

    @triton.jit
    def _is_gm(c, s, w, f, p):
        """rules.is_gm, lane-wise (GM = cgm + sgm in float32)."""
        gm = c + s
        return (gm >= w) & (gm > f) & (gm > p)

    @triton.jit
    def _is_path(c, s, w, f, p):
        """rules.is_path, lane-wise."""
        return (p >= c) & (p >= s) & (p >= w) & (p > f)

    @triton.jit
    def _act_seed_ok(c, s, w, f, p, accuracy):
        """rules.act_seed_ok, lane-wise (``accuracy``: GMWMI_ACCURACY as a float64 scalar)."""
        near = ((c + s) - w).to(tl.float64) >= accuracy
        return _is_sgm(c, s, w, f, p) | ((~_is_csf(c, s, w, f, p)) & (w > 0.0) & (~near))

    @triton.jit
    def _act_priors(t, depth, in_path):
        """rules.act_priors and rules.act_exclusion_reason, lane-wise: ``(term', excluded,
        reason)`` for the term ``t`` a half stopped on."""
        bad = (t == _K_ENTER_CSF) | (t == _K_LENGTH_EXCEED) | (t == _K_ENTER_EXCLUDE)
        poor = (t == _K_CALIBRATOR) | (t == _K_MODEL) | (t == _K_HIGH_CURVATURE)
        in_sgm = poor & (depth > 0)
        excluded = bad | (poor & (~in_sgm) & (~in_path))
        reason = tl.where(t == _K_LENGTH_EXCEED, _K_TRACK_TOO_LONG,
                          tl.where(t == _K_ENTER_EXCLUDE, _K_EXCLUDED, _K_ACT_POOR))  # fmt: skip
        return tl.where(in_sgm, _K_TERM_IN_SGM, t), excluded, reason

    @triton.jit
    def _check_structural(chk, valid, c, s, w, f, p, depth, sgm_seed, to_wm):
        """``ACT_Method_additions::check_structural`` on lanes ``chk`` (act_cpu
        ``_check_structural``): returns ``(term, depth, to_wm)`` (term CONTINUE elsewhere)."""
        csf = valid & _is_csf(c, s, w, f, p)
        gm = valid & (~csf) & _is_gm(c, s, w, f, p)
        wm_like = valid & (~csf) & (~_is_gm(c, s, w, f, p)) & (depth > 0)
        first_wm = wm_like & sgm_seed & (~to_wm)
        t = tl.where(valid, _K_CONTINUE, _K_EXIT_IMAGE)
        t = tl.where(csf, tl.where(depth > 0, _K_EXIT_SGM, _K_ENTER_CSF), t)
        t = tl.where(gm & (c >= s), _K_ENTER_CGM, t)
        t = tl.where(wm_like & (~first_wm), _K_EXIT_SGM, t)
        depth = tl.where(chk & gm & (~(c >= s)), depth + 1, depth)
        depth = tl.where(chk & first_wm, 0, depth)
        return tl.where(chk, t, _K_CONTINUE), depth, to_wm | (chk & first_wm)

    @triton.jit
    def _seed_unidirectional(go, px, py, pz, ux, uy, uz, c, s, w, f, p, tt_ptr, tnz_ptr, mt_ptr,
                             TX, TY, TZ, BLOCK: tl.constexpr):  # fmt: skip
        """``seed_is_unidirectional`` on lanes ``go`` (act_cpu ``_seed_is_unidirectional``):
        a seed in GM with WM below GM tracks one way, away from GM (tissues probed at
        p +- u x GMWMI_NORMAL_PERTURBATION). Returns ``(unidirectional, u')``."""
        probe = go & (~_is_sgm(c, s, w, f, p)) & (~((w >= c + s) | (s >= c)))
        h = _K_NORMAL_PERTURBATION
        _, _, c1, s1, w1, _, _ = _tissues(px + ux * h, py + uy * h, pz + uz * h, probe, tt_ptr,
                                          tnz_ptr, mt_ptr, TX, TY, TZ, BLOCK, True)  # fmt: skip
        _, _, c2, s2, w2, _, _ = _tissues(px - ux * h, py - uy * h, pz - uz * h, probe, tt_ptr,
                                          tnz_ptr, mt_ptr, TX, TY, TZ, BLOCK, True)  # fmt: skip
        plus = (c1 + s1) - w1
        minus = (c2 + s2) - w2
        flip = probe & (plus - minus > 0.0)
        return probe, tl.where(flip, -ux, ux), tl.where(flip, -uy, uy), tl.where(flip, -uz, uz)

    @triton.jit
    def _buf_pos(j, n1, second):
        """Where point ``j`` of the streamline in travel order (act_cpu's buffer: first half
        reversed once the second half runs) sits in this kernel's buffer (seed, first half,
        second half, all forward from the seed)."""
        return tl.where(second & (j < n1), n1 - 1 - j, j)

    @triton.jit
    def _amplitude(cs_ptr, lane, LANES, ux, uy, uz, active, lut_ptr, NAL, inc, tab_ptr, k_ptr,
                   BLOCK: tl.constexpr, NS: tl.constexpr):  # fmt: skip
        """FOD amplitude along unit u of the coefficients in the scratch (``PrecomputedAL::
        value``, act_cpu ``_amplitude``): Legendre rows interpolated at ``acos(u_z)``, the
        azimuth rotated term by term from ``(u_x, u_y) / r_xy``, each m > 0 term added in
        double and rounded back to float32, in the slot tables' order."""
        sqrt2 = tl.load(k_ptr)
        row, w1, w2 = _lut_row(_acosf(uz), inc)
        ic = w2 != 0.0
        ra = row * NAL
        rb = tl.minimum(row + 1, _K_LUT_LAST_ROW) * NAL
        rxy = tl.sqrt_rn(uy * uy + ux * ux)
        has = rxy != 0.0
        rs = tl.where(has, rxy, 1.0)
        cp = tl.where(has, tl.div_rn(ux, rs), 1.0)
        sp = tl.where(has, tl.div_rn(uy, rs), 0.0)
        v = tl.zeros([BLOCK], tl.float32)
        c0 = tl.full([BLOCK], 1.0, tl.float32)
        s0 = tl.zeros([BLOCK], tl.float32)
        mprev = 0
        for sl in range(NS):
            zon = tl.load(tab_ptr + 9 * sl) != 0
            ci = tl.load(tab_ptr + 9 * sl + 1)
            cmi = tl.load(tab_ptr + 9 * sl + 2)
            m = tl.load(tab_ptr + 9 * sl + 3)
            i0 = tl.load(tab_ptr + 9 * sl + 4)
            la = tl.load(lut_ptr + (ra + i0), mask=active, other=0.0)
            lb = tl.load(lut_ptr + (rb + i0), mask=active, other=0.0)
            al = tl.where(ic, w1 * la + w2 * lb, w1 * la)
            vp = tl.load(cs_ptr + (ci * LANES + lane), mask=active, other=0.0)
            vm = tl.load(cs_ptr + (cmi * LANES + lane), mask=active, other=0.0)
            if m != mprev:  # slots are sorted by m, every m in 1..lmax present: one turn each
                cm = c0 * cp - s0 * sp
                s0 = s0 * cp + c0 * sp
                c0 = cm
            mprev = m
            inner = c0 * vp + s0 * vm
            pair = (v.to(tl.float64) + (al.to(tl.float64) * sqrt2) * inner.to(tl.float64)).to(
                tl.float32
            )
            v = tl.where(zon, v + al * vp, pair)
        return v

    @triton.jit
    def _truncate_exit_sgm(go, n, n1, second, depth, pts_ptr, pbase, sh_ptr, nz_ptr, m_ptr,
                           cs_ptr, lane, LANES, NX, NY, NZ, K, lut_ptr, NAL, inc, tab_ptr,
                           BLOCK: tl.constexpr, KP: tl.constexpr, KC: tl.constexpr,
                           NS: tl.constexpr):  # fmt: skip
        """``Exec::truncate_exit_sgm`` on lanes ``go`` (act_cpu ``_truncate_exit_sgm``): of the
        last ``depth`` points keep up to the first where the FOD amplitude along the incoming
        segment is lowest (0 without FOD data). Returns the new point counts."""
        best = n - 1
        lowest = tl.full([BLOCK], _K_INF, tl.float32)
        k = 0
        while tl.max((go & (k < depth)).to(tl.int32), axis=0) > 0:
            a = go & (k < depth)
            i = n - depth + k
            bi = pbase + _buf_pos(i, n1, second).to(tl.int64) * 3
            bj = pbase + _buf_pos(i - 1, n1, second).to(tl.int64) * 3
            xi = tl.load(pts_ptr + bi, mask=a, other=0.0)
            yi = tl.load(pts_ptr + bi + 1, mask=a, other=0.0)
            zi = tl.load(pts_ptr + bi + 2, mask=a, other=0.0)
            xj = tl.load(pts_ptr + bj, mask=a, other=0.0)
            yj = tl.load(pts_ptr + bj + 1, mask=a, other=0.0)
            zj = tl.load(pts_ptr + bj + 2, mask=a, other=0.0)
            dx, dy, dz = _normalize3(xi - xj, yi - yj, zi - zj)
            okf = _sample(xi, yi, zi, a, sh_ptr, nz_ptr, m_ptr, cs_ptr, lane, LANES, NX, NY, NZ,
                          K, BLOCK, KP, KC)  # fmt: skip
            amp = _amplitude(cs_ptr, lane, LANES, dx, dy, dz, okf, lut_ptr, NAL, inc, tab_ptr,
                             m_ptr + 12, BLOCK, NS)  # fmt: skip
            value = tl.where(okf, amp, 0.0)
            better = a & (value < lowest)
            lowest = tl.where(better, value, lowest)
            best = tl.where(better, i, best)
            k += 1
        return tl.where(go, best + 1, n)

    @triton.jit
    def _crop_at_gmwmi(go, n, n1, second, pts_ptr, pbase, tt_ptr, tnz_ptr, mt_ptr, TX, TY, TZ,
                       BLOCK: tl.constexpr):  # fmt: skip
        """``-crop_at_gmwmi`` on lanes ``go`` (act_cpu ``_crop_end``, ``GMWMI_finder::
        find_interface``): where the last segment crosses the GM-WM interface, move the last
        point onto it by bisection along the Hermite spline through the last three points and
        their extrapolation (unmasked tissues)."""
        accuracy = tl.load(mt_ptr + 13)
        pe = pbase + _buf_pos(n - 1, n1, second).to(tl.int64) * 3
        pq = pbase + _buf_pos(n - 2, n1, second).to(tl.int64) * 3
        pr = pbase + _buf_pos(n - 3, n1, second).to(tl.int64) * 3
        ex = tl.load(pts_ptr + pe, mask=go, other=0.0)
        ey = tl.load(pts_ptr + pe + 1, mask=go, other=0.0)
        ez = tl.load(pts_ptr + pe + 2, mask=go, other=0.0)
        qx = tl.load(pts_ptr + pq, mask=go, other=0.0)
        qy = tl.load(pts_ptr + pq + 1, mask=go, other=0.0)
        qz = tl.load(pts_ptr + pq + 2, mask=go, other=0.0)
        rx = tl.load(pts_ptr + pr, mask=go, other=0.0)
        ry = tl.load(pts_ptr + pr + 1, mask=go, other=0.0)
        rz = tl.load(pts_ptr + pr + 2, mask=go, other=0.0)
        oke, _, ce, se, we, _, _ = _tissues(ex, ey, ez, go, tt_ptr, tnz_ptr, mt_ptr, TX, TY, TZ,
                                            BLOCK, False)  # fmt: skip
        okq, _, cq, sq, wq, _, _ = _tissues(qx, qy, qz, go, tt_ptr, tnz_ptr, mt_ptr, TX, TY, TZ,
                                            BLOCK, False)  # fmt: skip
        gm_e = ce + se
        gm_p = cq + sq
        cross = ((gm_e > we) & (gm_p < wq)) | ((gm_e < we) & (gm_p > wq))
        gate = go & oke & okq & cross & (~((gm_e - we).to(tl.float64) < accuracy))
        # curvature = (e - q) - (q - r); extrapolated point = e + ((e - q) + curvature)
        ax = ex - qx
        ay = ey - qy
        az = ez - qz
        fx = ex + (ax + (ax - (qx - rx)))
        fy = ey + (ay + (ay - (qy - ry)))
        fz = ez + (az + (az - (qz - rz)))
        t = tl.full([BLOCK], _K_HERMITE_TENSION, tl.float32) * 0.5
        lo = tl.zeros([BLOCK], tl.float32)
        hi = tl.full([BLOCK], 1.0, tl.float32)
        bx = ex
        by = ey
        bz = ez
        act = gate
        for _ in range(_K_GMWMI_MAX_ITERS):
            mu = ((lo + hi).to(tl.float64) * 0.5).to(tl.float32)
            p2 = mu * mu
            p3 = mu * p2
            w0 = (0.5 - t) * ((2.0 * p2 - p3) - mu)
            w1 = (1.0 + (1.5 + t) * p3) - (2.5 + t) * p2
            w2 = ((2.0 + 2.0 * t) * p2 + (0.5 - t) * mu) - (1.5 + t) * p3
            w3 = (0.5 - t) * (p3 - p2)
            hx = ((w0 * rx + w1 * qx) + w2 * ex) + w3 * fx
            hy = ((w0 * ry + w1 * qy) + w2 * ey) + w3 * fy
            hz = ((w0 * rz + w1 * qz) + w2 * ez) + w3 * fz
            _, _, c, s, w, _, _ = _tissues(hx, hy, hz, act, tt_ptr, tnz_ptr, mt_ptr, TX, TY, TZ,
                                           BLOCK, False)  # fmt: skip
            gm = c + s
            into_wm = act & (w > gm)
            into_gm = act & (~(w > gm))
            lo = tl.where(into_wm, mu, lo)
            hi = tl.where(into_gm, mu, hi)
            bx = tl.where(into_gm, hx, bx)
            by = tl.where(into_gm, hy, by)
            bz = tl.where(into_gm, hz, bz)
            act = act & (~(into_gm & ((gm - w).to(tl.float64) < accuracy)))
        tl.store(pts_ptr + pe, bx, mask=gate)
        tl.store(pts_ptr + pe + 1, by, mask=gate)
        tl.store(pts_ptr + pe + 2, bz, mask=gate)

    @triton.jit(do_not_specialize=_NO_SPECIALIZE)
    def _sd_stream_kernel(
        seeds_ptr, dirs_ptr, sh_ptr, nz_ptr, m_ptr, lut_ptr, tab_ptr, flt_ptr, cs_ptr, pts_ptr,
        n_ptr, n1_ptr, status_ptr, term_ptr, u0_ptr, steps_ptr, C, NX, NY, NZ, K, NAL, step,
        cutoff, dot_thr, inc, max_points, min_points, L, unidir, hstep, cos_rk4, ri_ptr, rf_ptr,
        rmask_ptr, R, n_inc, n_ord, n_mask, n_exc, stop, tt_ptr, tnz_ptr, mt_ptr, TX, TY, TZ,
        crop, BLOCK: tl.constexpr, KP: tl.constexpr, KC: tl.constexpr, SP: tl.constexpr,
        NS: tl.constexpr, SEQ: tl.constexpr, RK4: tl.constexpr, ROIS: tl.constexpr,
        ACT: tl.constexpr,
    ):  # fmt: skip
        """Track seeds ``lane, lane + lanes, ...`` of a chunk (Exec::operator(), gen_track,
        gen_track_unidir, iterate, next_rk4, SDStream::init / next, track_rejected).

        Lane phases: 0 = a new seed (sample + peak at the seed), 1 = first half, 2 = second
        half, 3 = no seeds left. Every loop iteration is one evaluation (sample + peak) per lane;
        with ``RK4`` a step takes five (``sub`` = 0..4: d1 at p, d2 at p + d1 h/2, d3 at
        p + d2 h/2, d4 at p + d3 h from normalize(d2 + d3), d5 at the new point). With ``ROIS``
        the mask / exclude / include regions (``ri_ptr``, ``rf_ptr``, ``rmask_ptr``, ``R`` rows)
        are tested at the seed and after every step, as fused_cpu ``_track_half`` does.

        With ``ACT`` (act_cpu's rules; the 5TT at ``tt_ptr`` / ``tnz_ptr`` / ``mt_ptr``, see
        :func:`_tissues`): ACT's seed test and ``seed_is_unidirectional`` at the seed; after a
        step ``check_structural`` before the region tests, a method failure inside SGM is
        TERM_IN_SGM; each half ends with ``apply_priors``, ``truncate_exit_sgm`` on EXIT_SGM and,
        with ``crop``, the GM-WM interface crop on ENTER_CGM; a seed in SGM must reach WM.
        """
        pid = tl.program_id(0)
        LANES = tl.num_programs(0) * BLOCK
        lane = pid * BLOCK + tl.arange(0, BLOCK)
        sid = lane
        phase = tl.where(sid < C, 0, 3)
        px = tl.zeros([BLOCK], tl.float32)
        py = tl.zeros([BLOCK], tl.float32)
        pz = tl.zeros([BLOCK], tl.float32)
        ux = tl.zeros([BLOCK], tl.float32)
        uy = tl.zeros([BLOCK], tl.float32)
        uz = tl.zeros([BLOCK], tl.float32)
        p0x = tl.zeros([BLOCK], tl.float32)
        p0y = tl.zeros([BLOCK], tl.float32)
        p0z = tl.zeros([BLOCK], tl.float32)
        u0x = tl.zeros([BLOCK], tl.float32)
        u0y = tl.zeros([BLOCK], tl.float32)
        u0z = tl.zeros([BLOCK], tl.float32)
        # RK4 state: sub-evaluation, d1..d3, the new direction and point (after d4)
        sub = tl.zeros([BLOCK], tl.int32)
        d1x = tl.zeros([BLOCK], tl.float32)
        d1y = tl.zeros([BLOCK], tl.float32)
        d1z = tl.zeros([BLOCK], tl.float32)
        d2x = tl.zeros([BLOCK], tl.float32)
        d2y = tl.zeros([BLOCK], tl.float32)
        d2z = tl.zeros([BLOCK], tl.float32)
        d3x = tl.zeros([BLOCK], tl.float32)
        d3y = tl.zeros([BLOCK], tl.float32)
        d3z = tl.zeros([BLOCK], tl.float32)
        wx = tl.zeros([BLOCK], tl.float32)
        wy = tl.zeros([BLOCK], tl.float32)
        wz = tl.zeros([BLOCK], tl.float32)
        fx = tl.zeros([BLOCK], tl.float32)
        fy = tl.zeros([BLOCK], tl.float32)
        fz = tl.zeros([BLOCK], tl.float32)
        # region state (IncludeROIVisitation) and "a half entered an exclude region"
        vis = tl.zeros([BLOCK], tl.int64)
        ordn = tl.zeros([BLOCK], tl.int32)
        valid = tl.zeros([BLOCK], tl.int32) == 0
        excl = tl.zeros([BLOCK], tl.int1)
        full = (tl.full([BLOCK], 1, tl.int64) << n_inc.to(tl.int64)) - 1
        n = tl.zeros([BLOCK], tl.int32)
        n1 = tl.zeros([BLOCK], tl.int32)
        steps = tl.zeros([BLOCK], tl.int32)
        uni = (tl.zeros([BLOCK], tl.int32) + unidir) != 0
        # (per-lane copies: a scalar comparison cannot join a lane mask under the interpreter)
        has_mask = (tl.zeros([BLOCK], tl.int32) + n_mask) > 0
        has_exc = (tl.zeros([BLOCK], tl.int32) + n_exc) > 0
        has_inc = (tl.zeros([BLOCK], tl.int32) + (n_inc + n_ord)) > 0
        stops = (tl.zeros([BLOCK], tl.int32) + stop) != 0
        # why a half excluded the streamline; per-lane unidirectional (ACT's seed rule)
        xr = tl.full([BLOCK], _K_EXCLUDED, tl.int32)
        uni_l = uni
        # ACT state: SGM depth, seed in SGM / it reached WM, the last tissues and their validity
        depth = tl.zeros([BLOCK], tl.int32)
        sgm_seed = tl.zeros([BLOCK], tl.int1)
        to_wm = tl.zeros([BLOCK], tl.int1)
        tvalid = tl.zeros([BLOCK], tl.int1)
        tc = tl.zeros([BLOCK], tl.float32)
        ts = tl.zeros([BLOCK], tl.float32)
        tw = tl.zeros([BLOCK], tl.float32)
        tf = tl.zeros([BLOCK], tl.float32)
        tp = tl.zeros([BLOCK], tl.float32)
        crop_l = (tl.zeros([BLOCK], tl.int32) + crop) != 0
        maxp_l = tl.zeros([BLOCK], tl.int32) + max_points
        while tl.max((phase < 3).to(tl.int32), axis=0) > 0:
            live = phase < 3
            isseed = phase == 0
            stepping = (phase == 1) | (phase == 2)
            s64 = sid.to(tl.int64)
            # --- a new seed: position and the twice-normalised raw start direction
            sx = tl.load(seeds_ptr + s64 * 3, mask=isseed, other=0.0)
            sy = tl.load(seeds_ptr + s64 * 3 + 1, mask=isseed, other=0.0)
            sz = tl.load(seeds_ptr + s64 * 3 + 2, mask=isseed, other=0.0)
            ddx = tl.load(dirs_ptr + s64 * 3, mask=isseed, other=1.0)
            ddy = tl.load(dirs_ptr + s64 * 3 + 1, mask=isseed, other=0.0)
            ddz = tl.load(dirs_ptr + s64 * 3 + 2, mask=isseed, other=0.0)
            ddx, ddy, ddz = _normalize3(ddx, ddy, ddz)
            ddx, ddy, ddz = _normalize3(ddx, ddy, ddz)
            px = tl.where(isseed, sx, px)
            py = tl.where(isseed, sy, py)
            pz = tl.where(isseed, sz, pz)
            ux = tl.where(isseed, ddx, ux)
            uy = tl.where(isseed, ddy, uy)
            uz = tl.where(isseed, ddz, uz)
            sub = tl.where(isseed, 0, sub)
            dfin = (ddx - ddx == 0.0) & (ddy - ddy == 0.0) & (ddz - ddz == 0.0)
            # --- where this evaluation samples (q) and where its peak search starts (s)
            qx = px
            qy = py
            qz = pz
            sx = ux
            sy = uy
            sz = uz
            if RK4:
                hx = tl.where(sub == 1, d1x, d2x)
                hy = tl.where(sub == 1, d1y, d2y)
                hz = tl.where(sub == 1, d1z, d2z)
                half = (sub == 1) | (sub == 2)
                qx = tl.where(half, px + hx * hstep, qx)
                qy = tl.where(half, py + hy * hstep, qy)
                qz = tl.where(half, pz + hz * hstep, qz)
                qx = tl.where(sub == 3, px + d3x * step, qx)
                qy = tl.where(sub == 3, py + d3y * step, qy)
                qz = tl.where(sub == 3, pz + d3z * step, qz)
                qx = tl.where(sub == 4, fx, qx)
                qy = tl.where(sub == 4, fy, qy)
                qz = tl.where(sub == 4, fz, qz)
                ex, ey, ez = _normalize3(d2x + d3x, d2y + d3y, d2z + d3z)
                sx = tl.where(sub == 3, ex, tl.where(sub == 4, wx, sx))
                sy = tl.where(sub == 3, ey, tl.where(sub == 4, wy, sy))
                sz = tl.where(sub == 3, ez, tl.where(sub == 4, wz, sz))
            # --- the seed's region tests (check_seed: inside a mask, outside the excludes)
            seed_roi = isseed
            if ROIS:
                inm = _in_set(_K_ROI_MASK, px, py, pz, isseed, ri_ptr, rf_ptr, rmask_ptr, R,
                              BLOCK)  # fmt: skip
                inx = _in_set(_K_ROI_EXCLUDE, px, py, pz, isseed, ri_ptr, rf_ptr, rmask_ptr, R,
                              BLOCK)  # fmt: skip
                seed_roi = isseed & ((~has_mask) | inm) & (~(has_exc & inx))
            if ACT:  # check_seed's ACT test (act_cpu _act_seed_usable)
                _, tv, c, s, w, f, p = _tissues(px, py, pz, seed_roi, tt_ptr, tnz_ptr, mt_ptr,
                                                TX, TY, TZ, BLOCK, True)  # fmt: skip
                in_sgm = _is_sgm(c, s, w, f, p)
                seed_roi = seed_roi & tv & _act_seed_ok(c, s, w, f, p, tl.load(mt_ptr + 13))
                tvalid = tl.where(isseed, tv, tvalid)
                tc = tl.where(isseed, c, tc)
                ts = tl.where(isseed, s, ts)
                tw = tl.where(isseed, w, tw)
                tf = tl.where(isseed, f, tf)
                tp = tl.where(isseed, p, tp)
                depth = tl.where(isseed, 0, depth)
                sgm_seed = tl.where(isseed, in_sgm, sgm_seed)
                to_wm = to_wm & (~isseed)
            # --- one evaluation: FOD at q, peak from s
            ok = _sample(qx, qy, qz, live & (stepping | seed_roi), sh_ptr, nz_ptr, m_ptr,
                         cs_ptr, lane, LANES, NX, NY, NZ, K, BLOCK, KP, KC)  # fmt: skip
            tl.debug_barrier()
            search = ok & (stepping | dfin)
            amp, vx, vy, vz = _get_peak(cs_ptr, lane, LANES, sx, sy, sz, search, lut_ptr, NAL,
                                        inc, tab_ptr, flt_ptr, m_ptr + 12, BLOCK, SP, NS,
                                        SEQ)  # fmt: skip
            good = search & (amp - amp == 0.0) & (amp >= cutoff)
            # --- seed lanes (SDStream::init, then gen_track)
            seed_ok = isseed & good
            seed_bad = isseed & (~good)
            uni_l = tl.where(isseed, uni, uni_l)
            if ACT:
                if tl.max((seed_ok & (~uni)).to(tl.int32), axis=0) > 0:
                    one_way, vx, vy, vz = _seed_unidirectional(
                        seed_ok & (~uni), px, py, pz, vx, vy, vz, tc, ts, tw, tf, tp, tt_ptr,
                        tnz_ptr, mt_ptr, TX, TY, TZ, BLOCK
                    )  # fmt: skip
                    uni_l = uni_l | one_way
            tl.store(u0_ptr + s64 * 3, vx, mask=isseed & search)
            tl.store(u0_ptr + s64 * 3 + 1, vy, mask=isseed & search)
            tl.store(u0_ptr + s64 * 3 + 2, vz, mask=isseed & search)
            pbase = s64 * L * 3
            tl.store(pts_ptr + pbase, px, mask=seed_ok)
            tl.store(pts_ptr + pbase + 1, py, mask=seed_ok)
            tl.store(pts_ptr + pbase + 2, pz, mask=seed_ok)
            p0x = tl.where(seed_ok, px, p0x)
            p0y = tl.where(seed_ok, py, p0y)
            p0z = tl.where(seed_ok, pz, p0z)
            u0x = tl.where(seed_ok, vx, u0x)
            u0y = tl.where(seed_ok, vy, u0y)
            u0z = tl.where(seed_ok, vz, u0z)
            n = tl.where(isseed, 1, n)
            steps = tl.where(isseed, 0, steps)
            excl = excl & (~isseed)
            xr = tl.where(isseed, _K_EXCLUDED, xr)
            if ROIS:
                vis = tl.where(isseed, 0, vis)
                ordn = tl.where(isseed, 0, ordn)
                valid = valid | isseed
                vis, ordn, valid = _visit(px, py, pz, seed_ok & has_inc, vis,
                                          ordn, valid, ri_ptr, rf_ptr, rmask_ptr, R,
                                          BLOCK)  # fmt: skip
            # --- stepping lanes: SDStream::next from (q, s)
            t = tl.where(ok, _K_CONTINUE, _K_EXIT_IMAGE)
            t = tl.where(ok & (~good), _K_MODEL, t)
            dot = _dot3(sx, sy, sz, vx, vy, vz)
            t = tl.where((t == _K_CONTINUE) & (dot < dot_thr), _K_HIGH_CURVATURE, t)
            if RK4:  # Exec::next_rk4: the step ends at the first failed evaluation or at d5
                ec = stepping & (t == _K_CONTINUE)
                d1x = tl.where(ec & (sub == 0), vx, d1x)
                d1y = tl.where(ec & (sub == 0), vy, d1y)
                d1z = tl.where(ec & (sub == 0), vz, d1z)
                d2x = tl.where(ec & (sub == 1), vx, d2x)
                d2y = tl.where(ec & (sub == 1), vy, d2y)
                d2z = tl.where(ec & (sub == 1), vz, d2z)
                d3x = tl.where(ec & (sub == 2), vx, d3x)
                d3y = tl.where(ec & (sub == 2), vy, d3y)
                d3z = tl.where(ec & (sub == 2), vz, d3z)
                nx, ny, nz = _normalize3(
                    ((d1x + d2x * 2.0) + d3x * 2.0) + vx,
                    ((d1y + d2y * 2.0) + d3y * 2.0) + vy,
                    ((d1z + d2z * 2.0) + d3z * 2.0) + vz,
                )
                at3 = ec & (sub == 3)
                wx = tl.where(at3, nx, wx)
                wy = tl.where(at3, ny, wy)
                wz = tl.where(at3, nz, wz)
                fx = tl.where(at3, px + nx * step, fx)
                fy = tl.where(at3, py + ny * step, fy)
                fz = tl.where(at3, pz + nz * step, fz)
                at4 = ec & (sub == 4)
                t = tl.where(at4 & (_dot3(d1x, d1y, d1z, vx, vy, vz) < cos_rk4),
                             _K_HIGH_CURVATURE, t)  # fmt: skip
                stepped = stepping & ((t != _K_CONTINUE) | (sub == 4))
                sub = tl.where(stepping & (~stepped), sub + 1, 0)
                newx = fx
                newy = fy
                newz = fz
                nux = wx
                nuy = wy
                nuz = wz
            else:
                stepped = stepping
                newx = px + vx * step
                newy = py + vy * step
                newz = pz + vz * step
                nux = vx
                nuy = vy
                nuz = vz
            if ACT:  # a method failure inside SGM (Exec::iterate)
                t = tl.where(stepped & (t != _K_CONTINUE) & (depth > 0), _K_TERM_IN_SGM, t)
            cont = stepped & (t == _K_CONTINUE)
            px = tl.where(cont, newx, px)
            py = tl.where(cont, newy, py)
            pz = tl.where(cont, newz, pz)
            ux = tl.where(cont, nux, tl.where(seed_ok, vx, ux))
            uy = tl.where(cont, nuy, tl.where(seed_ok, vy, uy))
            uz = tl.where(cont, nuz, tl.where(seed_ok, vz, uz))
            steps = tl.where(cont, steps + 1, steps)
            if ACT:  # the tissues at the new point, check_structural
                _, tv, c, s, w, f, p = _tissues(px, py, pz, cont, tt_ptr, tnz_ptr, mt_ptr, TX,
                                                TY, TZ, BLOCK, True)  # fmt: skip
                tvalid = tl.where(cont, tv, tvalid)
                tc = tl.where(cont, c, tc)
                ts = tl.where(cont, s, ts)
                tw = tl.where(cont, w, tw)
                tf = tl.where(cont, f, tf)
                tp = tl.where(cont, p, tp)
                ta, depth, to_wm = _check_structural(cont, tv, c, s, w, f, p, depth, sgm_seed,
                                                     to_wm)  # fmt: skip
                t = tl.where(cont, ta, t)
                cont = cont & (t == _K_CONTINUE)
            if ROIS:  # Exec::iterate's region tests after a step
                inm = _in_set(_K_ROI_MASK, px, py, pz, cont & has_mask, ri_ptr, rf_ptr,
                              rmask_ptr, R, BLOCK)  # fmt: skip
                t = tl.where(cont & has_mask & (~inm), _K_EXIT_MASK, t)
                chk = cont & (t == _K_CONTINUE)
                inx = _in_set(_K_ROI_EXCLUDE, px, py, pz, chk & has_exc, ri_ptr, rf_ptr,
                              rmask_ptr, R, BLOCK)  # fmt: skip
                t = tl.where(chk & inx, _K_ENTER_EXCLUDE, t)
                chk = cont & (t == _K_CONTINUE) & has_inc
                vis, ordn, valid = _visit(px, py, pz, chk, vis, ordn, valid, ri_ptr, rf_ptr,
                                          rmask_ptr, R, BLOCK)  # fmt: skip
                allv = (vis == full) & valid & (ordn == n_ord)
                t = tl.where(chk & stops & allv, _K_TRAVERSE_ALL_INCLUDE, t)
            # the point a step ended on is kept iff TERM_ADD_TO_TCK[term]
            add = stepped & ((t == _K_CONTINUE) | (t == _K_ENTER_EXCLUDE)
                             | (t == _K_TRAVERSE_ALL_INCLUDE))  # fmt: skip
            if ACT:
                add = add | (stepped & ((t == _K_ENTER_CGM) | (t == _K_ENTER_CSF)))
            pb = pbase + n.to(tl.int64) * 3
            tl.store(pts_ptr + pb, px, mask=add)
            tl.store(pts_ptr + pb + 1, py, mask=add)
            tl.store(pts_ptr + pb + 2, pz, mask=add)
            n = tl.where(add, n + 1, n)
            t = tl.where(stepped & (t == _K_CONTINUE) & (n >= max_points), _K_LENGTH_EXCEED, t)
            ended = stepped & (t != _K_CONTINUE)
            end1 = ended & (phase == 1)
            end2 = ended & (phase == 2)
            if ACT:  # gen_track_unidir's end of a half
                in_path = tvalid & _is_path(tc, ts, tw, tf, tp)
                ta, xa, why = _act_priors(t, depth, in_path)
                t = tl.where(ended, ta, t)
                trunc = ended & (t == _K_EXIT_SGM)
                if tl.max(trunc.to(tl.int32), axis=0) > 0:
                    n = _truncate_exit_sgm(trunc, n, n1, phase == 2, depth, pts_ptr, pbase, sh_ptr,
                                           nz_ptr, m_ptr, cs_ptr, lane, LANES, NX, NY, NZ, K,
                                           lut_ptr, NAL, inc, tab_ptr, BLOCK, KP, KC,
                                           NS)  # fmt: skip
                xa = ended & xa
                cut = ended & (~xa) & (t == _K_ENTER_CGM) & crop_l & (n >= 3)
                if tl.max(cut.to(tl.int32), axis=0) > 0:
                    _crop_at_gmwmi(cut, n, n1, phase == 2, pts_ptr, pbase, tt_ptr, tnz_ptr,
                                   mt_ptr, TX, TY, TZ, BLOCK)  # fmt: skip
                excl = excl | xa
                xr = tl.where(xa, why, xr)
            else:
                excl = excl | (ended & (t == _K_ENTER_EXCLUDE))
            tl.store(term_ptr + s64 * 2, t.to(tl.int8), mask=end1)
            tl.store(term_ptr + s64 * 2 + 1, t.to(tl.int8), mask=end2)
            # a unidirectional streamline keeps its order (n1 = 1: nothing to reverse)
            n1 = tl.where(end1, tl.where(uni_l & (~uni), 1, n), n1)
            go2 = end1 & (~uni_l) & (~excl)
            depth = tl.where(go2, 0, depth)  # reverse_track
            px = tl.where(go2, p0x, px)
            py = tl.where(go2, p0y, py)
            pz = tl.where(go2, p0z, pz)
            ux = tl.where(go2, -u0x, ux)
            uy = tl.where(go2, -u0y, uy)
            uz = tl.where(go2, -u0z, uz)
            phase = tl.where(seed_ok | go2, phase + 1, phase)
            # --- finished streamlines (track_rejected, rules.REJECTION_ORDER) and the next seed
            fin = (end1 & (uni_l | excl)) | end2
            missed = has_inc & (~((vis == full) & valid & (ordn == n_ord)))
            status = tl.where(missed, _K_MISSED_INCLUDE, _K_ACCEPTED)
            if ACT:  # an SGM seed must reach WM (not for the seed test, max_points == 2)
                status = tl.where(sgm_seed & (~to_wm) & (maxp_l != 2), _K_ACT_FAILED_WM, status)
            status = tl.where(n < min_points, _K_TOO_SHORT, status)
            status = tl.where((n == 1) & (min_points > 1), _K_NO_PROPAGATION, status)
            status = tl.where(excl, xr, status)
            status = tl.where(seed_bad, _K_INVALID_SEED, status)
            done = fin | seed_bad
            tl.store(status_ptr + s64, status.to(tl.int8), mask=done)
            tl.store(n_ptr + s64, tl.where(status == _K_ACCEPTED, n, 0), mask=done)
            tl.store(n1_ptr + s64, n1, mask=fin)
            tl.store(steps_ptr + s64, steps, mask=fin)
            sid = tl.where(done, sid + LANES, sid)
            phase = tl.where(done, tl.where(sid < C, 0, 3), phase)


# --------------------------------------------------------------------------------------------
# host side
# --------------------------------------------------------------------------------------------


def _tables(lmax: int):
    """Slot tables of the kernel's peak search (SH.h ``derivatives``), in the C++ sum order.

    One slot per (l, m >= 0), l even: first the zonal slots l = 0, 2, ..., lmax, then for
    m = 1..lmax the pair slots (l, +-m), l ascending (fused_cpu's loops). Integer row
    ``(zonal, c index (c_{l,0} or c_{l,+m}), c_{l,-m}, m, i0..i4)`` and float row ``f0..f4``:

    * zonal: LUT entries ``i0..i2 = P_l^0, P_l^1, P_l^2`` and factors ``sqrt(l(l+1))``,
      ``sqrt(l(l+1)(l-1)(l+2))``, ``l(l+1)`` (all zero for l = 0, which only adds c_0 P_0^0);
    * pair: ``i0..i4 = P_l^m, P_l^{m-1}, P_l^{m+1}, P_l^{|m-2|} (P_l^1 if m = 1), P_l^{m+2}``
      and fused_cpu's float32 factors; absent terms get index 0 and factor 0, and the m = 1
      subtraction is folded into the sign of its factor (exact in IEEE arithmetic).
    """
    from .fused_cpu import _sh_tables

    _, zflt_cpu, pint, pflt, mstart = _sh_tables(lmax)
    tab = [(1, 0, 0, 0, legendre_index(0, 0), 0, 0, 0, 0)]
    flt = [(0.0, 0.0, 0.0, 0.0, 0.0)]
    for i, l in enumerate(range(2, lmax + 1, 2)):
        a = legendre_index(l, 0)
        tab.append((1, l * (l + 1) // 2, 0, 0, a, a + 1, a + 2, 0, 0))
        flt.append((*(np.float32(v) for v in zflt_cpu[i]), 0.0, 0.0))
    for m in range(1, lmax + 1):
        for q in range(int(mstart[m]), int(mstart[m + 1])):
            cp, cm, am, amm1, amp1, amm2, amp2 = (int(v) for v in pint[q])
            f0, f1, f2, f3, f4 = (np.float32(v) for v in pflt[q])
            if amp1 < 0:
                amp1, f1 = 0, np.float32(0.0)
            if amp2 < 0:
                amp2, f4 = 0, np.float32(0.0)
            if m == 1:
                f3 = -f3
            tab.append((0, cp, cm, m, am, amm1, amp1, amm2, amp2))
            flt.append((f0, f1, f2, f3, f4))
    return (
        np.array(tab, dtype=np.int32).reshape(-1),
        np.array(flt, dtype=np.float32).reshape(-1),
        len(tab),
    )


def _roi_arrays(rois: RoiSet | None, dev: torch.device):
    """The kernel's region rows from fused_cpu's flattening (one layout of the regions).

    Returns ``(ri [R, 8] int64, rf [R, 16] float32, mask [M] uint8, R, counts)``: ``ri`` rows
    ``(set, bit, kind, n0, n1, n2, offset, 0)``, ``rf`` rows ``(c0, c1, c2, radius^2,
    scanner->voxel 3x4)`` (float32, as roi.h holds them), the image masks concatenated.
    """
    from . import fused_cpu

    codes = (fused_cpu._ROI_INCLUDE, fused_cpu._ROI_EXCLUDE, fused_cpu._ROI_MASK,
             fused_cpu._ROI_ORDERED)  # fmt: skip
    assert codes == (_ROI_INCLUDE, _ROI_EXCLUDE, _ROI_MASK, _ROI_ORDERED)
    (rset, rbit, rkind, rsph, rmat, rdim, roff, rmask), counts = fused_cpu._flatten_rois(rois)
    R = int(rset.shape[0])
    ri = np.zeros((max(R, 1), 8), np.int64)
    rf = np.zeros((max(R, 1), 16), np.float32)
    if R:
        ri[:R, 0], ri[:R, 1], ri[:R, 2] = rset, rbit, rkind
        ri[:R, 3:6], ri[:R, 6] = rdim, roff
        rf[:R, :4], rf[:R, 4:] = rsph, rmat
    as_t = lambda a: torch.as_tensor(np.ascontiguousarray(a), device=dev)  # noqa: E731
    return as_t(ri), as_t(rf), as_t(rmask.astype(np.uint8)), R, counts


def _lengths(pts: np.ndarray, starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Lengths (mm, float32) of the streamlines of ``counts`` points from rows ``starts`` of
    ``pts [P, 3]``: each a sequential float32 sum of its segment lengths, as the C++ loop
    (``check_downsampled_length``), all streamlines at once."""
    seg = segment_lengths(pts) if pts.shape[0] > 1 else np.zeros(0, np.float32)
    length = np.zeros(counts.shape[0], np.float32)
    for k in range(1, int(counts.max()) if counts.size else 0):
        live = counts > k
        length[live] += seg[starts[live] + k - 1]
    return length


def _check_downsampled_length(
    res: EngineResult, params: ResolvedParameters, act: bool
) -> EngineResult:
    """``check_downsampled_length`` on the accepted streamlines of ``res`` (packed in tckgen's
    order; fused_cpu ``_track_seed``'s tail, act_cpu ``_act_post``'s last test): outside the
    point-count bounds ``(min_points_post, max_points_post)`` the length is measured (float32
    sequential sums, all streamlines at once); shorter than the minimum is TRACK_TOO_SHORT;
    longer than the maximum is truncated (``truncate_maxlength``, a Python loop over those
    streamlines only), or, under ACT (``act``), TRACK_TOO_LONG."""
    n = res.lengths.astype(np.int64)
    starts = np.cumsum(n) - n
    check = (res.status == _ACCEPTED) & (n > 0)
    check &= ~((params.min_points_post < n) & (n < params.max_points_post))
    idx = np.flatnonzero(check)
    length = _lengths(res.points, starts[idx], n[idx])
    short = idx[length < np.float32(params.min_length_mm)]
    long = idx[length > np.float32(params.max_length_mm)]
    if not short.size and not long.size:
        return res
    status, lengths, seeds = res.status.copy(), n.copy(), res.seed_index.copy()
    status[short], lengths[short], seeds[short] = _TOO_SHORT, 0, -1
    if act:
        status[long], lengths[long], seeds[long] = _TRACK_TOO_LONG, 0, -1
    pts = res.points[np.repeat(lengths > 0, n)]
    if long.size and not act:  # truncate_maxlength, one streamline at a time
        lines = np.split(res.points, starts[1:])
        for i in long:
            lines[i], seeds[i] = truncate_maxlength(lines[i], int(seeds[i]), params.max_length_mm)
            lengths[i] = lines[i].shape[0]
        pts = np.concatenate([b for b, n_i in zip(lines, lengths) if n_i], 0)
    pts = pts if pts.size else np.zeros((0, 3), np.float32)
    return EngineResult(pts, lengths, seeds, status, res.term, res.init_dir, res.counts)


def _act_inputs(act: ActImage | None, dev: torch.device):
    """The kernel's 5TT arguments: ``(tt [X, Y, Z, 5] float32, tnz [X, Y, Z] int8 (a voxel not
    all-zero; NaN counts as data), mt [14] float64 (scanner->voxel 3x4, then
    :data:`_F64_ACT_CONSTANTS`), X, Y, Z, crop)``; placeholders without ACT."""
    if act is None:
        tt = np.zeros((1, 1, 1, 5), np.float32)
        s2v = np.zeros((3, 4), np.float64)
        crop = False
    else:
        tt = np.ascontiguousarray(act.data, dtype=np.float32)
        if tt.ndim != 4 or tt.shape[3] != 5:
            raise ValueError(f"a 5TT image must be [X, Y, Z, 5], got shape {tt.shape}")
        s2v = np.asarray(act.scanner2voxel, dtype=np.float64)[:3, :4]
        crop = bool(act.crop_at_gmwmi)
    tnz = (tt != 0).any(axis=-1).astype(np.int8)
    mt = np.concatenate([s2v.reshape(-1), np.asarray(_F64_ACT_CONSTANTS, np.float64)])
    as_t = lambda a: torch.as_tensor(np.ascontiguousarray(a), device=dev)  # noqa: E731
    X, Y, Z = (int(v) for v in tt.shape[:3])
    return as_t(tt), as_t(tnz), as_t(mt), X, Y, Z, int(crop)


def _downsample(res: EngineResult, params: ResolvedParameters) -> EngineResult:
    """Exec's Downsampler on the accepted streamlines of ``res`` (fused_cpu ``_track_seed``'s
    tail, float32): keep the first point, every ``R``-th point in phase with the seed and the
    last (the length check follows: :func:`_check_downsampled_length`)."""
    R = int(params.downsample)
    n = res.lengths.astype(np.int64)
    seed = res.seed_index.astype(np.int64)
    starts = np.cumsum(n) - n
    do = n > 2
    first = np.where(seed != 0, (np.maximum(seed, 1) - 1) % R + 1, R)
    new_seed = np.where(do & (seed != 0), 1 + (seed - first) // R, seed)
    mid = np.maximum(0, -(-(n - 1 - first) // R))
    new_n = np.where(do, mid + 2, n)
    rows = np.repeat(np.arange(n.shape[0]), new_n)
    k = np.arange(int(new_n.sum())) - (np.cumsum(new_n) - new_n)[rows]
    src = np.where(k == 0, 0, first[rows] + (k - 1) * R)
    src = np.where(k == new_n[rows] - 1, n[rows] - 1, src)
    src = np.where(do[rows], src, k)
    pts = res.points[starts[rows] + src]
    return EngineResult(pts, new_n, new_seed, res.status, res.term, res.init_dir, res.counts)


def _device() -> torch.device:
    return torch.device("cpu") if INTERPRET else torch.device("cuda")


def _pack(buf, n, n1, unidir):
    """Packed accepted points in streamline order: first half reversed, then the second half.

    The kernel writes each streamline forward from the seed (seed, first half, second half);
    tckgen's layout reverses the first ``n1`` points. ``buf [C, L, 3]``, ``n``/``n1 [C]``.
    """
    dev = buf.device
    lengths = n.to(torch.int64)
    total = int(lengths.sum())
    if total == 0:
        return torch.zeros((0, 3), dtype=torch.float32, device=dev)
    rows = torch.repeat_interleave(torch.arange(buf.shape[0], device=dev), lengths)
    starts = torch.cumsum(lengths, 0) - lengths
    k = torch.arange(total, device=dev) - starts[rows]
    if unidir:
        src = k
    else:
        h = n1.to(torch.int64)[rows]
        src = torch.where(k < h, h - 1 - k, k)
    return buf[rows, src]


def track_fused_triton(
    sh: np.ndarray | torch.Tensor,
    scanner2voxel: np.ndarray,
    seeds: np.ndarray | torch.Tensor,
    init_dirs: np.ndarray | torch.Tensor,
    params: ResolvedParameters,
    rois: RoiSet | None = None,
    chunk_size: int | None = None,
    block: int | None = None,
    programs: int | None = None,
    variant: str = "auto",
    num_warps: int = 4,
    act: ActImage | None = None,
) -> EngineResult:
    """Track SD_Stream streamlines from every seed with the fused Triton kernel.

    Args:
        sh: ``[X, Y, Z, K]`` float32 SH coefficients (MRtrix basis, scanner frame); a CUDA
            tensor is used in place.
        scanner2voxel: ``[3, 4]`` float64, scanner mm -> voxel coordinates of ``sh``.
        seeds: ``[N, 3]`` float32 seed points (scanner mm).
        init_dirs: ``[N, 3]`` raw start directions (normalised twice in float32, as tckgen
            does; see :func:`~invtract.tracking.fused_cpu.track_fused_cpu`).
        params: resolved parameters; must satisfy :func:`supported` (bounded ``max_points``).
        rois: include / exclude / mask regions (spheres or image masks), or None.
        chunk_size: seeds per launch; the output buffer holds ``chunk x (max_points + 2) x 3``
            float32 (default: about 2 GB of buffer on CUDA, 4096 seeds under the interpreter).
        block: lanes per program (default 128 on CUDA, up to 64 under the interpreter).
        programs: programs per launch (default 8 per SM on CUDA, 1 under the interpreter).
        variant: how the peak search forms its sums (same bits either way): ``"seq"``, one slot
            after the other with a lane per thread (default on CUDA), or ``"tile"``, every slot
            in a ``[lanes, slots]`` tile (default under the interpreter, which it runs ~5x
            faster); ``"auto"`` picks as stated.
        num_warps: warps per program (CUDA).
        act: anatomically-constrained tracking (``-act``): the 5TT image
            (:func:`invtract.tracking.act.load_act`, with its ``crop_at_gmwmi``); ``params``
            must already carry ACT's defaults (:func:`invtract.tracking.act.act_parameters`).
            Follows act_cpu (terminations in MRtrix's ACT categories, ACT rejections).

    Returns:
        :class:`EngineResult` (numpy, CPU), as the numba engine; ``counts`` has ``steps``,
        ``seconds`` (wall time of the kernels and packing), ``chunks``.
    """
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(reason)
    if not supported(params, rois, act):
        raise ValueError(
            f"max_points={int(params.max_points)} is unbounded for the Triton kernel (downsample "
            f"{params.downsample} x angle {params.angle_deg} deg >= 360 deg); not supported"
        )
    dev = _device()
    ri, rf, rmask, R, roi_counts = _roi_arrays(rois, dev)
    tt, tnz, mt, TX, TY, TZ, crop = _act_inputs(act, dev)
    sh_t = torch.as_tensor(sh).detach().to(device=dev, dtype=torch.float32).contiguous()
    if sh_t.ndim != 4:
        raise ValueError(f"sh must be [X, Y, Z, K], got shape {tuple(sh_t.shape)}")
    NX, NY, NZ, K = (int(s) for s in sh_t.shape)
    lmax = lmax_from_n(K)
    nonzero = (sh_t != 0).any(dim=-1).to(torch.int8).contiguous()  # NaN counts as non-zero
    M = np.ascontiguousarray(np.asarray(scanner2voxel, dtype=np.float64)[:3, :4])
    m_t = torch.as_tensor(np.concatenate([M.reshape(-1), _F64_CONSTANTS]), device=dev)
    lut = torch.as_tensor(np.array(legendre_table(lmax), dtype=np.float32).reshape(-1), device=dev)
    NAL = n_legendre(lmax)
    tab_np, flt_np, NS = _tables(lmax)
    tab = torch.as_tensor(tab_np, device=dev)
    flt = torch.as_tensor(flt_np, device=dev)
    SP = triton.next_power_of_2(NS)

    seeds_t = torch.as_tensor(seeds).detach().to(device=dev, dtype=torch.float32)
    seeds_t = seeds_t.reshape(-1, 3).contiguous()
    dirs_t = torch.as_tensor(init_dirs).detach().to(device=dev, dtype=torch.float32)
    dirs_t = dirs_t.reshape(-1, 3).contiguous()
    if dirs_t.shape[0] != seeds_t.shape[0]:
        raise ValueError(f"{seeds_t.shape[0]} seeds but {dirs_t.shape[0]} initial directions")
    N = seeds_t.shape[0]
    L = int(params.max_points) + 2
    KP = triton.next_power_of_2(K)
    KC = KP if INTERPRET else min(KP, 8)
    if INTERPRET:
        chunk = int(chunk_size or 4096)
        blk = int(block or min(64, triton.next_power_of_2(max(1, min(N, 64)))))
        nprog_cap = int(programs or 1)
    else:  # pragma: no cover - needs CUDA
        chunk = int(chunk_size or max(1, min(N, (2 << 30) // (L * 12))))
        blk = int(block or 128)
        sms = torch.cuda.get_device_properties(dev).multi_processor_count
        nprog_cap = int(programs or 8 * sms)
    chunk = max(1, chunk)

    parts = []
    if variant not in ("auto", "seq", "tile"):
        raise ValueError(f"variant must be 'auto', 'seq' or 'tile', got {variant!r}")
    seq = variant == "seq" or (variant == "auto" and not INTERPRET)
    launch_kw = {"enable_fp_fusion": False, "num_warps": int(num_warps)}
    # RK4's half step, float(0.5 * double(step)) as Exec::next_rk4 forms it
    hstep = float(np.float32(0.5 * np.float64(np.float32(params.step_mm))))
    t0 = time.perf_counter()
    with np.errstate(all="ignore"):
        for start in range(0, N, chunk):
            stop = min(N, start + chunk)
            C = stop - start
            grid = (max(1, min(triton.cdiv(C, blk), nprog_cap)),)
            lanes = grid[0] * blk
            cs = torch.empty(KP * lanes, dtype=torch.float32, device=dev)
            buf = torch.empty((C, L, 3), dtype=torch.float32, device=dev)
            c_n = torch.zeros(C, dtype=torch.int32, device=dev)
            c_n1 = torch.zeros(C, dtype=torch.int32, device=dev)
            c_status = torch.full((C,), _INVALID_SEED, dtype=torch.int8, device=dev)
            c_term = torch.full((C, 2), -1, dtype=torch.int8, device=dev)
            c_u0 = torch.full((C, 3), float("nan"), dtype=torch.float32, device=dev)
            c_steps = torch.zeros(C, dtype=torch.int32, device=dev)
            _sd_stream_kernel[grid](
                seeds_t[start:stop], dirs_t[start:stop], sh_t, nonzero, m_t, lut, tab, flt,
                cs, buf, c_n, c_n1, c_status, c_term, c_u0, c_steps,
                C, NX, NY, NZ, K, NAL, float(params.step_mm),
                float(params.cutoff), float(params.dot_threshold), float(lut_increment()),
                int(params.max_points), int(params.min_points), L,
                int(bool(params.unidirectional)), hstep, float(np.float32(params.cos_max_rk4)),
                ri, rf, rmask, R, roi_counts["include"], roi_counts["ordered"],
                roi_counts["mask"], roi_counts["exclude"], int(bool(params.stop)),
                tt, tnz, mt, TX, TY, TZ, crop,
                BLOCK=blk, KP=KP, KC=KC, SP=SP, NS=NS, SEQ=seq, RK4=bool(params.rk4),
                ROIS=R > 0, ACT=act is not None, **launch_kw,
            )  # fmt: skip
            pts = _pack(buf, c_n, c_n1, params.unidirectional).cpu().numpy()
            del buf
            st_np = c_status.cpu().numpy()
            si = np.where(params.unidirectional, 0, c_n1.cpu().numpy().astype(np.int64) - 1)
            parts.append(
                EngineResult(
                    pts,
                    c_n.cpu().numpy().astype(np.int64),
                    np.where(st_np == _ACCEPTED, si, -1),
                    st_np,
                    c_term.cpu().numpy(),
                    c_u0.cpu().numpy(),
                    counts={"steps": int(c_steps.sum())},
                )  # fmt: skip
            )
    out = concat_results(parts, seconds=time.perf_counter() - t0)
    if int(params.downsample) > 1:
        out = _downsample(out, params)
    if int(params.downsample) > 1 or (act is not None and act.crop_at_gmwmi):
        out = _check_downsampled_length(out, params, act=act is not None)
    return out
