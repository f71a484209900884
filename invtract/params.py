"""Tracking parameters with tckgen's SD_Stream defaults, and the derived constants.

All lengths are millimetres (scanner space), angles degrees. ``TrackingParameters`` holds what
the user asked for (``None`` means "tckgen's default"); :meth:`TrackingParameters.resolve` turns
it, given the FOD's voxel sizes, into a :class:`ResolvedParameters` whose every number is
computed in float32 exactly as MRtrix3 3.0.x does (``SharedBase::set_step_and_angle``,
``set_num_points`` in ``src/dwi/tractography/tracking/shared.cpp``), so that point counts match.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from .errors import ConfigError

__all__ = ["TrackingParameters", "ResolvedParameters", "geometric_voxel_size", "DEFAULTS"]

f32 = np.float32

#: MRtrix3 ``Tracking::Defaults`` used by SD_Stream (non-ACT).
DEFAULTS = {
    "step_voxels_first_order": 0.1,
    "step_voxels_rk4": 0.25,
    "angle_deg": 60.0,
    "cutoff": 0.1,
    "min_length_voxels": 5.0,
    "max_length_voxels": 100.0,
    "select": 5000,
    "seed_to_select_ratio": 1000,
}


def _sinf(x: np.float32) -> np.float32:
    return f32(math.sin(float(x)))


def _asinf(x: np.float32) -> np.float32:
    return f32(math.asin(float(x)))


def _cosf(x: np.float32) -> np.float32:
    return f32(math.cos(float(x)))


def geometric_voxel_size(voxel_sizes_mm) -> np.float32:
    """MRtrix's ``vox()``: float(pow(s0*s1*s2 (double), float(1/3))).

    Convention: ``SharedBase::vox()`` in ``tracking/shared.h``.
    """
    s = [float(v) for v in voxel_sizes_mm][:3]
    prod = s[0] * s[1] * s[2]
    return f32(prod ** float(f32(1.0 / 3.0)))


@dataclass(frozen=True)
class TrackingParameters:
    """User-facing SD_Stream options; ``None`` resolves to tckgen's default.

    Args:
        step_mm: step size (mm); default 0.1 x voxel (0.25 x voxel with ``rk4``).
        angle_deg: maximum angle between successive steps (degrees); default 60.
        cutoff: FOD amplitude threshold for tracking and seeding; default 0.1.
        min_length_mm: minimum streamline length (mm); default 5 x voxel.
        max_length_mm: maximum streamline length (mm); default 100 x voxel.
        rk4: fourth-order Runge-Kutta integration (tckgen ``-rk4``).
        downsample: keep every R-th point (tckgen ``-downsample``); 1 = keep all.
        unidirectional: track from the seed in one direction only.
        stop: stop once all include regions have been visited (``-stop``).
        seed_direction: fixed initial direction ``(x, y, z)`` (scanner frame), or None for random.
    """

    step_mm: float | None = None
    angle_deg: float | None = None
    cutoff: float | None = None
    min_length_mm: float | None = None
    max_length_mm: float | None = None
    rk4: bool = False
    downsample: int = 1
    unidirectional: bool = False
    stop: bool = False
    seed_direction: tuple[float, float, float] | None = None

    def __post_init__(self) -> None:
        checks = [
            ("step_mm", self.step_mm, lambda v: v > 0, "must be > 0"),
            ("angle_deg", self.angle_deg, lambda v: 0 < v <= 180, "must be in (0, 180]"),
            ("cutoff", self.cutoff, lambda v: v >= 0, "must be >= 0"),
            ("min_length_mm", self.min_length_mm, lambda v: v >= 0, "must be >= 0"),
            ("max_length_mm", self.max_length_mm, lambda v: v > 0, "must be > 0"),
        ]
        for name, value, ok, msg in checks:
            if value is None:
                continue
            if not math.isfinite(float(value)) or not ok(float(value)):
                raise ConfigError(f"{name} {msg}, got {value}")
        if int(self.downsample) < 1:
            raise ConfigError(f"downsample must be >= 1, got {self.downsample}")
        if self.seed_direction is not None:
            d = np.asarray(self.seed_direction, dtype=np.float64)
            if d.shape != (3,) or not np.all(np.isfinite(d)) or np.linalg.norm(d) == 0:
                raise ConfigError(f"seed_direction must be 3 finite numbers, not all zero: {d}")
        if (
            self.min_length_mm is not None
            and self.max_length_mm is not None
            and self.min_length_mm > self.max_length_mm
        ):
            raise ConfigError("min_length_mm must not exceed max_length_mm")

    def replace(self, **changes) -> TrackingParameters:
        return dataclasses.replace(self, **changes)

    def resolve(self, voxel_sizes_mm) -> ResolvedParameters:
        """Fill defaults from the FOD's voxel sizes and compute tckgen's derived constants."""
        vox = geometric_voxel_size(voxel_sizes_mm)
        frac = DEFAULTS["step_voxels_rk4"] if self.rk4 else DEFAULTS["step_voxels_first_order"]
        step = f32(self.step_mm) if self.step_mm is not None else f32(f32(frac) * vox)
        max_dist = (
            f32(self.max_length_mm)
            if self.max_length_mm is not None
            else f32(f32(DEFAULTS["max_length_voxels"]) * vox)
        )
        min_dist = (
            f32(self.min_length_mm)
            if self.min_length_mm is not None
            else f32(f32(DEFAULTS["min_length_voxels"]) * vox)
        )
        angle_deg = f32(self.angle_deg if self.angle_deg is not None else DEFAULTS["angle_deg"])
        cutoff = f32(self.cutoff if self.cutoff is not None else DEFAULTS["cutoff"])
        # set_step_and_angle: angle (float) *= pi/180 (double), stored as float
        angle_rad = f32(float(angle_deg) * (math.pi / 180.0))
        cos_max = _cosf(angle_rad)
        min_radius = f32(step / f32(f32(2.0) * _sinf(f32(f32(0.5) * angle_rad))))
        if self.rk4:
            # The per-evaluation test of SDStream::next is disabled (angle pi); RK4 tests d1.d5.
            dot_threshold = _cosf(f32(math.pi))
            cos_max_rk4 = cos_max
        else:
            dot_threshold = cos_max
            cos_max_rk4 = cos_max
        # set_num_points
        R = int(self.downsample)
        angle_pre = f32(f32(2.0) * _asinf(f32(step / f32(f32(2.0) * min_radius))))
        max_step_post = f32(f32(R) * step)
        angle_post = f32(f32(R) * angle_pre)
        if angle_post > f32(2.0 * math.pi):
            min_step_post = f32(0.0)
        else:
            min_step_post = f32(f32(2.0) * min_radius * _sinf(f32(f32(0.5) * angle_post)))
        n_min_pre = 1 + int(math.ceil(float(f32(min_dist / step))))
        if min_step_post != 0:
            n_max_pre = 3 + int(math.ceil(float(f32(f32(f32(R) * max_dist) / min_step_post))))
        else:
            n_max_pre = 2**62
        n_min_post = (
            3 + int(math.ceil(float(f32(min_dist / min_step_post)))) if min_step_post else 2**62
        )
        n_max_post = 1 + int(math.floor(float(f32(max_dist / max_step_post))))
        return ResolvedParameters(
            voxel_size=float(vox),
            step_mm=float(step),
            angle_deg=float(angle_deg),
            cutoff=float(cutoff),
            min_length_mm=float(min_dist),
            max_length_mm=float(max_dist),
            rk4=bool(self.rk4),
            downsample=R,
            unidirectional=bool(self.unidirectional),
            stop=bool(self.stop),
            seed_direction=(
                None
                if self.seed_direction is None
                else tuple(float(x) for x in np.asarray(self.seed_direction, dtype=np.float64))
            ),
            dot_threshold=float(dot_threshold),
            cos_max_rk4=float(cos_max_rk4),
            min_points=n_min_pre,
            max_points=n_max_pre,
            min_points_post=n_min_post,
            max_points_post=n_max_post,
        )


@dataclass(frozen=True)
class ResolvedParameters:
    """Fully numeric SD_Stream parameters (every float is exactly representable in float32).

    Attributes:
        voxel_size: geometric mean voxel size (mm), MRtrix's ``vox()``.
        step_mm, angle_deg, cutoff, min_length_mm, max_length_mm: as tckgen uses them.
        dot_threshold: minimum dot product of successive directions tested in each evaluation
            (cos of the angle; -1 with RK4, whose own test uses ``cos_max_rk4``).
        min_points: fewest points a streamline needs before downsampling (``1 + ceil(Lmin/h)``).
        max_points: tracking stops once a streamline has this many points.
        min_points_post, max_points_post: the same limits after downsampling (``-downsample``).
    """

    voxel_size: float
    step_mm: float
    angle_deg: float
    cutoff: float
    min_length_mm: float
    max_length_mm: float
    rk4: bool
    downsample: int
    unidirectional: bool
    stop: bool
    seed_direction: tuple[float, float, float] | None
    dot_threshold: float
    cos_max_rk4: float
    min_points: int
    max_points: int
    min_points_post: int
    max_points_post: int

    def header(self) -> dict[str, str]:
        """The ``.tck`` header keys tckgen writes for these parameters (MRtrix key names)."""

        def fmt(x: float) -> str:
            return f"{np.float32(x):.9g}"

        h = {
            "method": "SDStream",
            "step_size": fmt(self.step_mm),
            "max_angle": fmt(self.angle_deg),
            "threshold": fmt(self.cutoff),
            "init_threshold": fmt(self.cutoff),
            "min_dist": fmt(self.min_length_mm),
            "max_dist": fmt(self.max_length_mm),
            "rk4": str(int(self.rk4)),
            "unidirectional": str(int(self.unidirectional)),
            "stop_on_all_include": str(int(self.stop)),
            "sh_precomputed": "1",
        }
        if self.downsample > 1:
            h["downsample_factor"] = str(self.downsample)
        if self.seed_direction is not None:
            h["init_direction"] = ",".join(f"{v:.9g}" for v in self.seed_direction)
        return h
