"""How even-order SH coefficients are laid out in an FOD image's volumes (no torch).

Convention: MRtrix3 ``core/math/SH.h``: ``NforL`` (count), ``LforN`` with ``Math::SH::check``'s
exact-count rule, and ``index`` (volume ``l(l+1)/2 + m``, l = 0, 2, ..., lmax, m = -l..l).
"""

from __future__ import annotations

import math

from ..errors import ShapeError

__all__ = ["n_coeffs", "lmax_for_n", "lmax_from_n", "sh_index", "valid_sh_counts"]


def n_coeffs(lmax: int) -> int:
    """Number of coefficients for even ``lmax``: (lmax+1)(lmax+2)/2."""
    return (lmax + 1) * (lmax + 2) // 2


def lmax_for_n(n: int) -> int | None:
    """The even ``lmax`` that has exactly ``n`` coefficients, or ``None`` if there is none."""
    if n < 1:
        return None
    lmax = 2 * int(math.floor((math.sqrt(1.0 + 8.0 * n) - 3.0) / 4.0))
    return lmax if n_coeffs(lmax) == n else None


def lmax_from_n(n: int) -> int:
    """lmax for ``n`` coefficients; raises ShapeError if ``n`` is not a valid count."""
    lmax = lmax_for_n(n)
    if lmax is None:
        valid = ", ".join(f"{n_coeffs(lm)} (lmax {lm})" for lm in range(0, 13, 2))
        raise ShapeError(
            f"{n} volumes is not a valid number of SH coefficients; expected one of {valid}"
        )
    return lmax


def sh_index(l: int, m: int) -> int:
    """Volume index of coefficient (l, m): l(l+1)/2 + m."""
    return l * (l + 1) // 2 + m


def valid_sh_counts(max_lmax: int = 16) -> list[int]:
    """Valid volume counts ``[1, 6, 15, 28, 45, ...]`` for lmax = 0, 2, ..., ``max_lmax``."""
    return [n_coeffs(lmax) for lmax in range(0, max_lmax + 1, 2)]
