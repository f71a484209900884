"""Normalised associated Legendre functions and MRtrix3's precomputed lookup table.

Convention: ``core/math/legendre.h`` (``Plm_sph``, array form) and ``core/math/SH.h``
(``PrecomputedAL``). Values include the Condon-Shortley phase and are orthonormal on the sphere.
The table has 512 rows at polar angles theta_n = n * float(pi/511); row entries are indexed
``l*l/4 + m`` for even l and 0 <= m <= l. Everything is computed in float32 with MRtrix's order
of operations, so lookups match tckgen bit for bit in practice.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

from ..tracking.rules import LUT_ROWS

__all__ = [
    "LUT_SIZE",
    "n_legendre",
    "legendre_index",
    "plm_sph_column",
    "plm_sph_columns",
    "legendre_table",
    "lut_increment",
]

f32 = np.float32
LUT_SIZE = LUT_ROWS  # the rulebook's table size, under this module's historical name
_INV_SQRT_4PI = 0.282094791773878


def n_legendre(lmax: int) -> int:
    """Number of (l, m >= 0) entries for even l <= lmax: (lmax/2 + 1)^2."""
    return (lmax // 2 + 1) ** 2


def legendre_index(l: int, m: int) -> int:
    """Entry of P_l^m (l even, 0 <= m <= l) in a table row (MRtrix ``index_mpos``)."""
    return l * l // 4 + m


def plm_sph_column(lmax: int, m: int, x: np.float32) -> np.ndarray:
    """P-bar_n^m(x) for n = 0..lmax (entries n < m are 0), float32, MRtrix's recursion."""
    return plm_sph_columns(lmax, m, np.array([x], dtype=np.float32))[0]


def _load_cosf():
    """glibc's single-precision ``cosf`` (what MRtrix's float table uses), or None."""
    try:
        import ctypes
        import ctypes.util

        libm = ctypes.CDLL(ctypes.util.find_library("m") or "libm.so.6")
        fn = libm.cosf
        fn.restype = ctypes.c_float
        fn.argtypes = [ctypes.c_float]
        return fn
    except (OSError, AttributeError):  # pragma: no cover - non-glibc platforms
        return None


_COSF = _load_cosf()


def cosf(x: np.float32) -> np.float32:
    """float32 cosine as C's ``cosf`` computes it (double cos rounded where libm is absent)."""
    if _COSF is not None:
        return f32(_COSF(float(f32(x))))
    return f32(math.cos(float(f32(x))))


def lut_increment() -> np.float32:
    """Polar-angle spacing of the table rows, float(pi / 511)."""
    return f32(math.pi / (LUT_SIZE - 1))


def plm_sph_columns(lmax: int, m: int, x: np.ndarray) -> np.ndarray:
    """P-bar_n^m(x_i) for n = 0..lmax at each ``x_i``: ``[len(x), lmax + 1]`` float32.

    MRtrix's ``Plm_sph`` recursion with its float32 / double types, evaluated element-wise
    (numpy's arithmetic and square roots are IEEE-rounded, so each value is what the scalar C++
    code gives); entries n < m are 0, as are rows with m > 0 and x^2 >= 1.
    """
    x = x.astype(np.float32)
    out = np.zeros((x.size, lmax + 1), dtype=np.float32)
    x2 = (x * x).astype(np.float32)
    v = np.full(x.size, f32(_INV_SQRT_4PI), dtype=np.float32)
    if m:
        h = np.ones(x.size)  # _helper(1 - x2, 2m), factors multiplied in the same order
        one_minus = 1.0 - x2.astype(np.float64)
        factors = []
        k = 2.0 * m
        while k >= 1.0:
            factors.append(one_minus * (k - 1.0) / k)
            k -= 2.0
        for factor in reversed(factors):
            h = factor * h
        scale = np.sqrt(float(f32(2 * m + 1)) * h)
        v = (v.astype(np.float64) * scale).astype(np.float32)
    if m & 1:
        v = -v
    out[:, m] = v
    if lmax > m:
        f = f32(math.sqrt(float(f32(2 * m + 3))))
        out[:, m + 1] = ((x * f).astype(np.float32) * out[:, m]).astype(np.float32)
        for n in range(m + 2, lmax + 1):
            val = ((x * out[:, n - 1]).astype(np.float32) - (out[:, n - 2] / f)).astype(np.float32)
            f = f32(math.sqrt(float(f32(f32(4 * n * n - 1) / f32(n * n - m * m)))))
            out[:, n] = (val * f).astype(np.float32)
    if m:
        out[x2 >= 1.0] = 0.0
    return out


@lru_cache(maxsize=8)
def legendre_table(lmax: int) -> np.ndarray:
    """MRtrix's ``PrecomputedAL<float>`` table, ``[512, (lmax/2+1)^2]`` float32 (read-only).

    Row n holds P-bar_l^m(cos(n * inc)) for even l <= lmax, 0 <= m <= l, at ``legendre_index``.
    """
    inc = lut_increment()
    cos_el = np.array([cosf(f32(f32(n) * inc)) for n in range(LUT_SIZE)], dtype=np.float32)
    table = np.zeros((LUT_SIZE, n_legendre(lmax)), dtype=np.float32)
    for m in range(lmax + 1):
        cols = plm_sph_columns(lmax, m, cos_el)
        start = m + 1 if (m & 1) else m
        for l in range(start, lmax + 1, 2):
            table[:, legendre_index(l, m)] = cols[:, l]
    table.setflags(write=False)
    return table
