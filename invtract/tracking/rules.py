"""The SD_Stream rulebook: every MRtrix3 3.0.3 constant and rule that the engines share, once.

Each engine reads this module instead of restating it: the numba kernels use its names as
module globals (numba freezes a global into the compiled code as a literal, so the kernels are
as fast as with the numbers written in place), the Triton kernel takes them as
``tl.constexpr`` globals or as launch arguments, and the torch engine, the differentiable
tracker and the seeding code import them. ``tests/tracking/test_rules.py`` pins every kernel
to these values (no kernel may carry its own copy of a number below), and
``tests/tracking/test_conformance.py`` checks that every engine follows the rules.

Numba's on-disk cache (``cache=True``) is keyed by the kernel's own source file, not by the
globals it froze: after changing a value here, delete the ``*.nbi`` / ``*.nbc`` files under
``invtract/tracking/__pycache__`` (or touch ``fused_cpu.py`` and ``adjoint_cpu.py``) so that
the kernels recompile with it.

This module is a leaf: it imports nothing from invtract but :mod:`invtract.tracking.types` and
:data:`invtract.params.DEFAULTS`, needs neither torch nor numba, and anything may import it
(the FOD modules included).

Sources (MRtrix3 3.0.3): ``core/math/SH.h`` (peak ascent, ``PrecomputedAL``, ``Math::sqrt2``),
``core/interp/linear.h`` and ``base.h`` (interpolation weights, field of view),
``tracking/exec.h`` (``gen_track``, ``iterate``, ``track_rejected``), ``tracking/types.h``
(``term_add_to_tck``), ``tracking/shared.cpp`` and ``tractography.h`` (defaults, ``-select``),
spec §2-§7 of ``../shared/docs/sd_stream_spec.md``.
"""

from __future__ import annotations

from ..params import DEFAULTS
from .types import TERM_ADD_TO_TCK, Reject, Term

__all__ = [
    "PEAK_MAX_ITERATIONS",
    "PEAK_MAX_STEP_RAD",
    "PEAK_TOLERANCE_RAD",
    "POLE_SIN_THRESHOLD",
    "LUT_ROWS",
    "LUT_LAST_ROW",
    "SQRT2",
    "WEIGHT_THRESHOLD",
    "FOV_HALF_VOXEL",
    "TERM_ADD_TO_TCK",
    "REJECTION_ORDER",
    "DEFAULT_SELECT",
    "SEEDS_PER_SELECT",
    "inside_fov",
    "seed_usable",
    "no_propagation",
    "too_short",
    "track_rejection",
    "seed_limits",
    "ACT_CUTOFF_MULTIPLIER",
    "ACT_MIN_LENGTH_VOXELS",
    "TISSUE_SUM_THRESHOLD",
    "GMWMI_ACCURACY",
    "GMWMI_NORMAL_PERTURBATION",
    "GMWMI_PERTURBATION",
    "GMWMI_MAX_ITERS",
    "GMWMI_HERMITE_TENSION",
    "TISSUES_5TT",
    "is_cgm",
    "is_sgm",
    "is_wm",
    "is_csf",
    "is_path",
    "is_gm",
    "act_seed_ok",
    "act_priors",
    "act_exclusion_reason",
    "act_default_cutoff",
]

# --------------------------------------------------------------------------------------------
# Peak ascent (core/math/SH.h: get_peak; spec §3.3)
# --------------------------------------------------------------------------------------------

#: iterations of the ascent before it gives up (amplitude and direction become NaN)
PEAK_MAX_ITERATIONS = 50
#: cap of one ascent step (``MAX_DIR_CHANGE``; tested and assigned in float32)
PEAK_MAX_STEP_RAD = 0.2
#: the ascent stops once a step is shorter than this (``ANGLE_TOLERANCE``, compared in double)
PEAK_TOLERANCE_RAD = 1e-4
#: ``sin(elevation)`` below this is "at the pole" (the azimuthal derivatives change form)
POLE_SIN_THRESHOLD = 1e-4
#: ``Math::sqrt2`` in double: the m != 0 factor of the real SH basis
SQRT2 = 1.41421356237309504880

# --------------------------------------------------------------------------------------------
# Legendre lookup table (core/math/SH.h: PrecomputedAL; spec §3.1)
# --------------------------------------------------------------------------------------------

#: rows of the table, at polar angles n * float(pi / (LUT_ROWS - 1))
LUT_ROWS = 512
#: the last row: lookups at or past it use it with weight 1
LUT_LAST_ROW = LUT_ROWS - 1

# --------------------------------------------------------------------------------------------
# Interpolation (core/interp/linear.h, base.h, masked.h; spec §2)
# --------------------------------------------------------------------------------------------

#: trilinear weights (float32) below this are set to 0; the rest are not renormalised
WEIGHT_THRESHOLD = 1e-6
#: field of view: voxel coordinate v is inside iff -0.5 < v < n - 0.5 (both bounds exclusive)
FOV_HALF_VOXEL = 0.5


def inside_fov(v, n):
    """The field-of-view rule on one axis: ``-0.5 < v < n - 0.5`` (False for NaN).

    Args:
        v: voxel coordinate(s) (float64; a scalar, numpy array or tensor).
        n: voxel count along that axis.
    """
    return (v > -FOV_HALF_VOXEL) & (v < n - FOV_HALF_VOXEL)


# --------------------------------------------------------------------------------------------
# Seeds, rejections, lengths (tracking/exec.h; spec §4.2, §5.4, §6)
# --------------------------------------------------------------------------------------------


def seed_usable(finite, in_mask, in_exclude, has_data):
    """``check_seed`` then the "data at the seed" test of ``SDStream::init``: a seed is tracked
    (and, without ``-seed_direction``, draws a random start direction) iff its position is
    finite, inside a ``-mask`` region (when any), outside every ``-exclude`` region and the FOD
    has data there. The peak search at the seed then decides INVALID_SEED once more
    (amplitude below the cutoff, or no convergence); there is no retry.

    Elementwise on ``[N]`` bool numpy arrays or tensors (``in_mask`` all True when there are
    no mask regions)."""
    return finite & in_mask & ~in_exclude & has_data


#: ``track_rejected``'s tests, in the order they are made (the first that holds is counted).
#: Seeds rejected before tracking are INVALID_SEED; TRACK_TOO_LONG and the ACT reasons do not
#: occur without ACT.
REJECTION_ORDER = (
    Reject.ENTER_EXCLUDE_REGION,
    Reject.NO_PROPAGATION_FROM_SEED,
    Reject.TRACK_TOO_SHORT,
    Reject.MISSED_INCLUDE_REGION,
)


def no_propagation(n_points, min_points):
    """NO_PROPAGATION_FROM_SEED: the streamline is the seed alone *and* ``min_points > 1``.

    With ``-minlength 0`` (``min_points == 1``) a single-point streamline is accepted and
    written (MRtrix: "seedtest algorithm uses min_num_points = 1"). Elementwise on arrays.
    """
    return (n_points == 1) & (min_points > 1)


def too_short(n_points, min_points):
    """TRACK_TOO_SHORT: fewer points than ``min_points = 1 + ceil(min_length / step)``
    (before downsampling; after it, the length rule of ``check_downsampled_length``)."""
    return n_points < min_points


def track_rejection(n_points: int, excluded: bool, missed_include: bool, min_points: int) -> int:
    """``track_rejected`` for one tracked seed: the :class:`Reject` code as an int
    (``Reject.ACCEPTED`` = -1 when the streamline is written), tests in
    :data:`REJECTION_ORDER`. Plain scalar code: the numba kernel compiles this function."""
    if excluded:
        return _ENTER_EXCLUDE_REGION
    if n_points == 1 and min_points > 1:
        return _NO_PROPAGATION
    if n_points < min_points:
        return _TRACK_TOO_SHORT
    if missed_include:
        return _MISSED_INCLUDE_REGION
    return _ACCEPTED


_ACCEPTED = int(Reject.ACCEPTED)
_ENTER_EXCLUDE_REGION = int(Reject.ENTER_EXCLUDE_REGION)
_NO_PROPAGATION = int(Reject.NO_PROPAGATION_FROM_SEED)
_TRACK_TOO_SHORT = int(Reject.TRACK_TOO_SHORT)
_MISSED_INCLUDE_REGION = int(Reject.MISSED_INCLUDE_REGION)

# Which points are kept: the point at which a half stopped is appended iff
# ``TERM_ADD_TO_TCK[term]`` (types.py, from ``types.h``): CONTINUE, LENGTH_EXCEED,
# ENTER_EXCLUDE, TRAVERSE_ALL_INCLUDE (and the ACT entries); EXIT_IMAGE / MODEL /
# HIGH_CURVATURE / EXIT_MASK are not appended. The seed is always the first point of a half.

# --------------------------------------------------------------------------------------------
# Seed counts (tckgen -select / -seeds; spec §4.3)
# --------------------------------------------------------------------------------------------

#: ``-select`` default for infinite seeders (streamlines accepted before stopping)
DEFAULT_SELECT = int(DEFAULTS["select"])
#: ``-seeds`` default: this many seeds per selected streamline
SEEDS_PER_SELECT = int(DEFAULTS["seed_to_select_ratio"])


def seed_limits(select: int | None, max_seeds: int | None) -> tuple[int, int]:
    """``(select, max_seeds)`` of an infinite seeder as tckgen resolves them (0 = no limit).

    ``select`` defaults to :data:`DEFAULT_SELECT`; ``max_seeds`` to ``SEEDS_PER_SELECT x
    select`` (0 when select is 0). Finite seeders ignore both and track every seed.
    """
    select = DEFAULT_SELECT if select is None else int(select)
    if max_seeds is None:
        max_seeds = SEEDS_PER_SELECT * select if select > 0 else 0
    return select, int(max_seeds)


# --------------------------------------------------------------------------------------------
# Anatomically-constrained tracking, -act (ACT/act.h, tissues.h, method.h, gmwmi.h,
# tracking/exec.h iterate / apply_priors / gen_track_unidir, tractography.h defaults)
# --------------------------------------------------------------------------------------------

#: ``Defaults::cutoff_act_multiplier``: with -act the default cutoff is 0.5 x 0.1
ACT_CUTOFF_MULTIPLIER = 0.5
#: ``Defaults::minlength_voxels_withact``: with -act the default minimum length is 2 x voxel
ACT_MIN_LENGTH_VOXELS = 2.0
#: ``TISSUE_SUM_THRESHOLD``: tissues are valid iff their (clamped) sum is >= this (double)
TISSUE_SUM_THRESHOLD = 0.5
#: ``GMWMI_ACCURACY``: |GM - WM| below this is "at the interface" (double)
GMWMI_ACCURACY = 0.01
#: ``GMWMI_NORMAL_PERTURBATION``: seed_is_unidirectional probes pos +- dir x this (mm, float)
GMWMI_NORMAL_PERTURBATION = 0.001
#: ``GMWMI_PERTURBATION``: finite-difference step of the interface search (mm)
GMWMI_PERTURBATION = 0.001
#: ``GMWMI_MAX_ITERS_TO_FIND_BOUNDARY``: bisection / gradient iterations of the interface search
GMWMI_MAX_ITERS = 10
#: ``GMWMI_HERMITE_TENSION``: tension of the Hermite spline the endpoint is cropped along
GMWMI_HERMITE_TENSION = 0.1
#: the five tissue volumes of a 5TT image, in order
TISSUES_5TT = ("cgm", "sgm", "wm", "csf", "path")


def is_cgm(cgm, sgm, wm, csf, path):
    """``Tissues::is_cgm``: cortical GM is (one of) the largest, strictly above CSF and path."""
    return cgm >= sgm and cgm >= wm and cgm > csf and cgm > path


def is_sgm(cgm, sgm, wm, csf, path):
    """``Tissues::is_sgm``."""
    return sgm > cgm and sgm >= wm and sgm > csf and sgm > path


def is_wm(cgm, sgm, wm, csf, path):
    """``Tissues::is_wm``: WM strictly the largest."""
    return wm > cgm and wm > sgm and wm > csf and wm > path


def is_csf(cgm, sgm, wm, csf, path):
    """``Tissues::is_csf``: CSF ties win."""
    return csf >= cgm and csf >= sgm and csf >= wm and csf >= path


def is_path(cgm, sgm, wm, csf, path):
    """``Tissues::is_path``."""
    return path >= cgm and path >= sgm and path >= wm and path > csf


def is_gm(cgm, sgm, wm, csf, path):
    """``Tissues::is_gm``: GM = cgm + sgm (float32 sum) at least WM, above CSF and path."""
    gm = cgm + sgm
    return gm >= wm and gm > csf and gm > path


def act_seed_ok(cgm, sgm, wm, csf, path):
    """``ACT_Method_additions::check_seed`` given valid tissues: an SGM seed is allowed; else the
    seed must not be CSF, must have some WM and GM - WM below :data:`GMWMI_ACCURACY`."""
    # (self-contained: numba compiles this function; the tests are is_sgm and is_csf)
    if sgm > cgm and sgm >= wm and sgm > csf and sgm > path:
        return True
    if (csf >= cgm and csf >= sgm and csf >= wm and csf >= path) or not wm > 0.0:
        return False
    return not ((cgm + sgm) - wm) >= GMWMI_ACCURACY


def act_priors(term: int, sgm_depth: int, in_pathology: bool) -> tuple[int, bool]:
    """``Exec::apply_priors`` with -act: ``(term', excluded)`` for the term a half stopped on.

    ENTER_CSF, LENGTH_EXCEED and ENTER_EXCLUDE exclude the streamline; CALIBRATOR / MODEL /
    HIGH_CURVATURE become TERM_IN_SGM inside SGM, else exclude it unless in pathology
    (poor structural termination); ENTER_CGM, EXIT_IMAGE, EXIT_MASK, EXIT_SGM, TERM_IN_SGM,
    TRAVERSE_ALL_INCLUDE are good terminations. Plain scalar code (compiled by numba)."""
    if term == _ENTER_CSF or term == _LENGTH_EXCEED_T or term == _ENTER_EXCLUDE_T:
        return term, True
    if term == _CALIBRATOR or term == _MODEL_T or term == _HIGH_CURVATURE_T:
        if sgm_depth > 0:
            return _TERM_IN_SGM, False
        return term, not in_pathology
    return term, False


def act_exclusion_reason(term: int) -> int:
    """The :class:`Reject` code counted when a half excluded the streamline (``gen_track_unidir``):
    ACT_POOR_TERMINATION (CALIBRATOR, ENTER_CSF, MODEL, HIGH_CURVATURE), TRACK_TOO_LONG
    (LENGTH_EXCEED) or ENTER_EXCLUDE_REGION."""
    if term == _LENGTH_EXCEED_T:
        return _TRACK_TOO_LONG
    if term == _ENTER_EXCLUDE_T:
        return _ENTER_EXCLUDE_REGION
    return _ACT_POOR_TERMINATION


def act_default_cutoff(cutoff_default: float) -> float:
    """SD_Stream's default cutoff under -act (``cutoff_fod x cutoff_act_multiplier``, float32)."""
    import numpy as np

    return float(np.float32(cutoff_default) * np.float32(ACT_CUTOFF_MULTIPLIER))


_ENTER_CSF = int(Term.ENTER_CSF)
_LENGTH_EXCEED_T = int(Term.LENGTH_EXCEED)
_ENTER_EXCLUDE_T = int(Term.ENTER_EXCLUDE)
_CALIBRATOR = int(Term.CALIBRATOR)
_MODEL_T = int(Term.MODEL)
_HIGH_CURVATURE_T = int(Term.HIGH_CURVATURE)
_TERM_IN_SGM = int(Term.TERM_IN_SGM)
_TRACK_TOO_LONG = int(Reject.TRACK_TOO_LONG)
_ACT_POOR_TERMINATION = int(Reject.ACT_POOR_TERMINATION)
