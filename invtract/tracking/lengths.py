"""Exec's length rules on one streamline, in numpy float32 with MRtrix's operation order: the
segment lengths, the length (a sequential float32 sum), and ``truncate_maxlength``.

Convention: ``tracking/exec.h`` (``check_downsampled_length``, ``truncate_maxlength``), spec
§5.4. Points are ``[n, 3]`` scanner mm. A leaf of numpy alone: the torch engine
(:mod:`invtract.tracking.tracker`) and the Triton engine's host tail
(:mod:`invtract.tracking.fused_triton`) both import it (neither may import the other); the
numba kernels carry the same rules compiled (``fused_cpu._truncate_maxlength``).
"""

from __future__ import annotations

import numpy as np

__all__ = ["segment_lengths", "track_length", "truncate_maxlength"]


def segment_lengths(points: np.ndarray) -> np.ndarray:
    """``[n - 1]`` float32 ``|p_i - p_{i-1}|`` of ``points [n, 3]``, summed as x² + (y² + z²)
    (Eigen's float order)."""
    d = np.diff(points.astype(np.float32, copy=False), axis=0)
    return np.sqrt(d[:, 0] * d[:, 0] + (d[:, 1] * d[:, 1] + d[:, 2] * d[:, 2]))


def track_length(points: np.ndarray) -> np.float32:
    """The length (mm) of ``points [n, 3]``: its segment lengths summed one after the other in
    float32, as the C++ loop."""
    length = np.float32(0.0)
    for s in segment_lengths(points):
        length = np.float32(length + s)
    return length


def _cut_index(seg: np.ndarray, lmax: float) -> tuple[int, np.float32]:
    """First vertex index whose segment would take the float32 running length past ``lmax``
    (``len(seg) + 1`` if none), and the length up to the vertex before it."""
    total = np.float32(0.0)
    for i, s in enumerate(seg, start=1):
        if total + s > np.float32(lmax):
            return i, total
        total = np.float32(total + s)
    return len(seg) + 1, total


def truncate_maxlength(
    points: np.ndarray, seed_index: int, max_length_mm: float
) -> tuple[np.ndarray, int]:
    """``Exec::truncate_maxlength`` on one streamline ``points [n, 3]`` (float32 arithmetic):
    ``(points [m, 3] float32, seed_index)``, cut where its length from the first vertex reaches
    ``max_length_mm``, the last vertex moved along its segment to make it exactly that; if the
    cut would drop the seed, the part up to the seed is reversed (the seed becomes vertex 0)
    and cut instead. A streamline no longer than the limit comes back whole (as float32)."""
    pts, s = points.astype(np.float32), seed_index
    cut, done = _cut_index(segment_lengths(pts), max_length_mm)
    if cut <= s:
        pts, s = pts[: s + 1][::-1].copy(), 0
        cut, done = _cut_index(segment_lengths(pts), max_length_mm)
    if cut >= pts.shape[0]:
        return pts, s
    out = pts[: cut + 1].copy()
    d = out[cut] - out[cut - 1]
    sq = d[0] * d[0] + (d[1] * d[1] + d[2] * d[2])
    if sq > 0:
        d = d / np.sqrt(sq)
    out[cut] = out[cut - 1] + d * (np.float32(max_length_mm) - done)
    return out, s
