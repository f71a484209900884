"""``tckgen -seed_gmwmi IMAGE`` (with ``-act 5TT``): seeds on the grey-/white-matter interface.

MRtrix3 3.0.3 (``seeding/gmwmi.cpp``, ``seeding/basic.cpp`` ``Rejection``, ``ACT/gmwmi.cpp``
``GMWMI_finder``) draws each seed in three stages, all with the tractography random stream:

1. rejection sampling in the seed image (realigned, cropped to the bounding box of its
   non-zero voxels plus a one-voxel margin): a voxel by three uniform integers, accepted when
   its value is at least ``uniform * max``, then a uniform position inside it;
2. ``find_interface``: projected onto the interface by gradient steps on ``GM - WM`` of the
   linearly interpolated 5TT (central differences of 0.001 mm, steps at most half the smallest
   voxel, at most 10 steps); a failed projection restarts at stage 1;
3. ``perturb``: a uniform shift of up to +- 2 voxels within the interface's tangent plane (two
   uniforms, the second axis's drawn first as tckgen's build does), projected again; a
   failure restarts at stage 1.

The tissue reads are :func:`invtract.tracking.act_cpu._tissues` with the plain (unmasked)
linear interpolator, as the interface search of ``-crop_at_gmwmi``. Arithmetic is float32 where
MRtrix's is (``Eigen::Vector3f``) and double where it mixes in double constants. Positions are
scanner mm (RAS+).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError, ShapeError
from ..io.geometry import (
    realign,
    sanitise_transform,
    subset_transform,
    true_voxel_box,
    voxel2scanner,
)
from ..io.image import Image, load_image
from .act import ActImage
from .act_cpu import _act_arrays, _is_csf, _is_path, _tissues
from .fused_cpu import _JIT, njit
from .rng import MRtrixRNG
from .rules import GMWMI_ACCURACY, GMWMI_MAX_ITERS, GMWMI_PERTURBATION

__all__ = ["RejectionImage", "GmwmiSeeder", "load_gmwmi_seeder"]

f32 = np.float32
_HALF_H = 0.5 * GMWMI_PERTURBATION  # double, as ``p[axis] -= 0.5 * GMWMI_PERTURBATION``
_INV_H = np.float32(1.0 / GMWMI_PERTURBATION)  # ``grad *= (1.0 / GMWMI_PERTURBATION)``


# --------------------------------------------------------------------------------------------
# Stage 1: rejection sampling in the seed image (seeding/basic.cpp, Rejection)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RejectionImage:
    """A seed image as ``Seeding::Rejection`` holds it.

    Attributes:
        values: ``[n0, n1, n2]`` float32, realigned and cropped to the non-zero voxels' box
            plus a one-voxel margin.
        vox2scanner: ``[3, 4]`` float32, cropped voxel coordinates -> scanner mm.
        max: the largest value (float32).
    """

    values: np.ndarray
    vox2scanner: np.ndarray
    max: np.float32

    @classmethod
    def from_image(cls, image: Image) -> RejectionImage:
        """Crop a 3-D (or one-volume 4-D) seed image as ``Rejection::Rejection``.

        Raises:
            ShapeError: not 3-D; ConfigError: negative or no non-zero values.
        """
        data = np.asarray(image.data, np.float32)
        if data.ndim == 4 and data.shape[3] == 1:
            data = data[..., 0]
        if data.ndim != 3:
            raise ShapeError(f"{image.path}: seed image must be 3-D, got shape {data.shape}")
        T, spacing = sanitise_transform(image.transform, image.voxel_sizes)
        geo = realign(T, spacing, data.shape)
        data = np.ascontiguousarray(geo.reorient(data))
        nonzero = data != 0  # NaN counts as non-zero (``if (value)``)
        if np.any(data < 0):
            raise ConfigError(f"{image.path}: negative values in a rejection-sampling seed image")
        finite = data[nonzero & np.isfinite(data)]
        vmax = f32(finite.max()) if finite.size else f32(0)
        if not vmax > 0:
            raise ConfigError(f"{image.path}: seed image is empty")
        lo, size = true_voxel_box(nonzero)
        crop = data[lo[0] : lo[0] + size[0], lo[1] : lo[1] + size[1], lo[2] : lo[2] + size[2]]
        sub = subset_transform(geo.transform, geo.spacing, lo)
        M = voxel2scanner(sub, geo.spacing)[:3].astype(np.float32)
        return cls(np.ascontiguousarray(crop), M, vmax)

    def draw(self, rng: MRtrixRNG) -> np.ndarray:
        """One seed ``[3]`` float32 scanner mm (``Rejection::get_seed``), drawn by a compiled
        loop over peeked random outputs; exactly the outputs tckgen uses are consumed."""
        out = np.empty(3, np.float32)
        block = 4096
        while True:
            used = _rejection_nb(rng.peek(block), self.values, self.max, self.vox2scanner, out)
            if used > 0:
                rng.skip(used)
                return out
            rng.skip(-used)  # whole rejected attempts; the next one starts the next block
            if used == 0:
                block *= 2


_TWO32 = np.float32(2.0**32)
_BELOW_ONE = np.float32(1.0) - np.float32(2.0**-24)
_LOW32 = np.uint64(0xFFFFFFFF)


@njit(inline="always", **_JIT)
def _uniform_nb(r):
    """``generate_canonical<float>`` of one 32-bit output (as :meth:`MRtrixRNG.uniform`)."""
    u = np.float32(np.float32(r) / _TWO32)
    return _BELOW_ONE if u >= np.float32(1.0) else u


@njit(**_JIT)
def _randint_nb(raw, k, n):
    """GCC's ``uniform_int_distribution<int> (0, n - 1)`` from ``raw[k:]``: (value, next k),
    or (-1, k) when ``raw`` runs out (as :meth:`MRtrixRNG.randint`)."""
    un = np.uint64(n)
    if k >= raw.shape[0]:
        return -1, k
    product = raw[k] * un
    k += 1
    low = product & _LOW32
    if low < un:
        threshold = (np.uint64(2**32) - un) % un
        while low < threshold:
            if k >= raw.shape[0]:
                return -1, k
            product = raw[k] * un
            k += 1
            low = product & _LOW32
    return np.int64(product >> np.uint64(32)), k


@njit(**_JIT)
def _rejection_nb(raw, values, vmax, M, out):
    """``Rejection::get_seed`` on the outputs ``raw``: the number used (> 0) with the seed in
    ``out [3]``, or minus the number used by whole rejected attempts when ``raw`` runs out."""
    n0, n1, n2 = values.shape
    k = 0
    while True:
        start = k
        i, k = _randint_nb(raw, k, n0)
        if i < 0:
            return -start
        j, k = _randint_nb(raw, k, n1)
        if j < 0:
            return -start
        m, k = _randint_nb(raw, k, n2)
        if m < 0 or k >= raw.shape[0]:
            return -start
        selector = _uniform_nb(raw[k]) * vmax
        k += 1
        if not values[i, j, m] < selector:
            break
    if k + 3 > raw.shape[0]:
        return -start
    half = np.float32(0.5)
    v0 = (np.float32(i) + _uniform_nb(raw[k])) - half
    v1 = (np.float32(j) + _uniform_nb(raw[k + 1])) - half
    v2 = (np.float32(m) + _uniform_nb(raw[k + 2])) - half
    for r in range(3):
        out[r] = (M[r, 0] * v0 + M[r, 1] * v1) + (M[r, 2] * v2 + M[r, 3])
    return k + 3


# --------------------------------------------------------------------------------------------
# Stages 2 and 3: the interface search (ACT/gmwmi.cpp, GMWMI_finder)
# --------------------------------------------------------------------------------------------


@njit(inline="always", **_JIT)
def _sq3(x, y, z):
    """Eigen's squared norm of a 3-vector: ``x^2 + (y^2 + z^2)`` (float32)."""
    return x * x + (y * y + z * z)


@njit(**_JIT)
def _diff_at(tt, Mt, q, tbuf, tis):
    """(valid, GM - WM) of the plain-interpolated tissues at ``q`` [3]."""
    ok = _tissues(tt, False, Mt, q[0], q[1], q[2], tbuf, tis)
    return ok, (tis[0] + tis[1]) - tis[2]


@njit(**_JIT)
def _cf_min_step(tt, Mt, p, min_vox, out, tbuf, tis):
    """``get_cf_min_step``: a Newton step on GM - WM along its gradient into ``out`` [3]."""
    zero = np.float32(0.0)
    g = np.zeros(3, dtype=np.float32)
    q = np.empty(3, dtype=np.float32)
    for axis in range(3):
        q[0], q[1], q[2] = p[0], p[1], p[2]
        q[axis] = np.float32(np.float64(p[axis]) - _HALF_H)
        ok_m, d_m = _diff_at(tt, Mt, q, tbuf, tis)
        q[axis] = np.float32(np.float64(p[axis]) + _HALF_H)
        ok_p, d_p = _diff_at(tt, Mt, q, tbuf, tis)
        if not ok_m or not ok_p:
            out[0], out[1], out[2] = zero, zero, zero
            return
        g[axis] = d_p - d_m
    for axis in range(3):
        g[axis] = g[axis] * _INV_H
    sq = _sq3(g[0], g[1], g[2])
    if sq == zero:
        out[0], out[1], out[2] = zero, zero, zero
        return
    ok, diff = _diff_at(tt, Mt, p, tbuf, tis)
    s = diff / sq
    for axis in range(3):
        out[axis] = -g[axis] * s
    norm = np.sqrt(_sq3(out[0], out[1], out[2]))
    if np.float64(norm) > 0.5 * np.float64(min_vox):
        scale = np.float32(0.5 * np.float64(min_vox) / np.float64(norm))
        for axis in range(3):
            out[axis] = out[axis] * scale


@njit(**_JIT)
def _fail(p):
    nan = np.float32(np.nan)
    p[0], p[1], p[2] = nan, nan, nan
    return False


@njit(**_JIT)
def find_interface_nb(tt, Mt, p, min_vox, tbuf, tis):
    """``GMWMI_finder::find_interface (p)``: move ``p`` [3] float32 onto the interface in place;
    False (and ``p`` NaN) when no acceptable interface point is found."""
    step = np.zeros(3, dtype=np.float32)
    iters = 0
    while True:
        _cf_min_step(tt, Mt, p, min_vox, step, tbuf, tis)
        for a in range(3):
            p[a] = p[a] + step[a]
        valid = _tissues(tt, False, Mt, p[0], p[1], p[2], tbuf, tis)
        if not (valid and _sq3(step[0], step[1], step[2]) != np.float32(0.0)):
            break
        if not np.float64(abs((tis[0] + tis[1]) - tis[2])) > GMWMI_ACCURACY:
            break
        iters += 1
        if iters >= GMWMI_MAX_ITERS:
            break
    c, s, w, f, pa = tis[0], tis[1], tis[2], tis[3], tis[4]
    gm = c + s
    if (not valid or _is_csf(c, s, w, f, pa) or _is_path(c, s, w, f, pa) or w == np.float32(0.0)
            or np.float64(abs(gm - w)) > GMWMI_ACCURACY):  # fmt: skip
        return _fail(p)
    if gm >= w:
        return True
    _cf_min_step(tt, Mt, p, min_vox, step, tbuf, tis)
    if not (np.isfinite(step[0]) and np.isfinite(step[1]) and np.isfinite(step[2])):
        return True
    if _sq3(step[0], step[1], step[2]) == np.float32(0.0):
        return _fail(p)
    half_vox = 0.5 * np.float64(min_vox)
    while True:
        for a in range(3):
            step[a] = step[a] * np.float32(1.5)
            p[a] = p[a] + step[a]
        valid = _tissues(tt, False, Mt, p[0], p[1], p[2], tbuf, tis)
        gm = tis[0] + tis[1]
        if valid and gm >= tis[2] and np.float64(gm - tis[2]) < GMWMI_ACCURACY:
            return True
        if not np.float64(np.sqrt(_sq3(step[0], step[1], step[2]))) < half_vox:
            break
    return _fail(p)


@njit(inline="always", **_JIT)
def _normalized(x, y, z):
    """Eigen's ``normalized()``: divided by the norm, unchanged when the norm is 0."""
    n2 = _sq3(x, y, z)
    if n2 > np.float32(0.0):
        n = np.sqrt(n2)
        return x / n, y / n, z / n
    return x, y, z


@njit(inline="always", **_JIT)
def _cross(ax, ay, az, bx, by, bz):
    return ay * bz - az * by, az * bx - ax * bz, ax * by - ay * bx


@njit(**_JIT)
def tangent_plane_nb(tt, Mt, p, tbuf, tis, plane):
    """``get_normal`` and the two in-plane axes of ``perturb`` into ``plane`` [2, 3];
    False when the normal is not finite (then no random numbers are drawn)."""
    n = np.zeros(3, dtype=np.float32)
    q = np.empty(3, dtype=np.float32)
    for axis in range(3):
        q[0], q[1], q[2] = p[0], p[1], p[2]
        q[axis] = np.float32(np.float64(p[axis]) - _HALF_H)
        _tissues(tt, False, Mt, q[0], q[1], q[2], tbuf, tis)
        m = tis[2] - (tis[0] + tis[1])
        q[axis] = np.float32(np.float64(p[axis]) + _HALF_H)
        _tissues(tt, False, Mt, q[0], q[1], q[2], tbuf, tis)
        n[axis] = (tis[2] - (tis[0] + tis[1])) - m
    nx, ny, nz = _normalized(n[0], n[1], n[2])
    if not (np.isfinite(nx) and np.isfinite(ny) and np.isfinite(nz)):
        return False
    zero, one = np.float32(0.0), np.float32(1.0)
    cx, cy, cz = _cross(nx, ny, nz, zero, zero, one)
    ax, ay, az = _normalized(cx, cy, cz)
    if not (np.isfinite(ax) and np.isfinite(ay) and np.isfinite(az)):
        cx, cy, cz = _cross(nx, ny, nz, zero, one, zero)
        ax, ay, az = _normalized(cx, cy, cz)
    cx, cy, cz = _cross(nx, ny, nz, ax, ay, az)
    bx, by, bz = _normalized(cx, cy, cz)
    plane[0, 0], plane[0, 1], plane[0, 2] = ax, ay, az
    plane[1, 0], plane[1, 1], plane[1, 2] = bx, by, bz
    return True


@njit(**_JIT)
def shift_in_plane_nb(p, plane, ua, ub, max_step):
    """``p += ((ua - 0.5) max_step) plane[0] + ((ub - 0.5) max_step) plane[1]`` (float32)."""
    sa = (ua - np.float32(0.5)) * max_step
    sb = (ub - np.float32(0.5)) * max_step
    for a in range(3):
        p[a] = p[a] + (sa * plane[0, a] + sb * plane[1, a])


# --------------------------------------------------------------------------------------------
# The seeder
# --------------------------------------------------------------------------------------------


class GmwmiSeeder:
    """``Seeding::GMWMI``: ``next(rng)`` returns the next seed ``[3]`` (float32 scanner mm).

    Args:
        seed_image: the ``-seed_gmwmi`` image (e.g. ``5tt2gmwmi``'s output), rejection-sampled.
        act: the ``-act`` 5TT image (:func:`invtract.tracking.act.load_act`).
    """

    def __init__(self, seed_image: RejectionImage, act: ActImage) -> None:
        self.image = seed_image
        self.tt, self.Mt = _act_arrays(act)
        sx, sy, sz = (float(v) for v in act.voxel_sizes)
        self.min_vox = f32(min(sx, min(sy, sz)))
        # 4.0f * std::pow (double product, double (1.0f / 3.0f)), stored as float
        self.max_step = f32(4.0 * math.pow(sx * sy * sz, float(f32(1.0) / f32(3.0))))
        self._tbuf = np.empty(5, np.float32)
        self._tis = np.zeros(5, np.float32)
        self._plane = np.zeros((2, 3), np.float32)

    def _find(self, p: np.ndarray) -> bool:
        return bool(find_interface_nb(self.tt, self.Mt, p, self.min_vox, self._tbuf, self._tis))

    def next(self, rng: MRtrixRNG) -> np.ndarray:
        """``GMWMI::get_seed``: retried until a seed lands on the interface after perturbation."""
        while True:
            p = self.image.draw(rng)
            if not self._find(p):
                continue
            if not tangent_plane_nb(self.tt, self.Mt, p, self._tbuf, self._tis, self._plane):
                continue
            # tckgen's build evaluates the second term's uniform first (checked against
            # tckgen 3.0.3 -output_seeds; the C++ order of evaluation is unspecified)
            ub = rng.uniform()
            ua = rng.uniform()
            shift_in_plane_nb(p, self._plane, ua, ub, self.max_step)
            if self._find(p):
                return p


def load_gmwmi_seeder(path: str | os.PathLike, act: ActImage) -> GmwmiSeeder:
    """A :class:`GmwmiSeeder` for the seed image at ``path`` and the 5TT image ``act``."""
    return GmwmiSeeder(RejectionImage.from_image(load_image(path)), act)
