"""MRtrix3 real spherical-harmonic basis: sizes, indices and exact evaluation.

Convention (``core/math/SH.h``, spec §1.2): real, orthonormal, even degrees only, Condon-Shortley
phase included; coefficient (l, m) is stored at ``l(l+1)/2 + m``; Y_l0 = P_l^0,
Y_l,+m = sqrt2 P_l^m cos(m phi), Y_l,-m = sqrt2 P_l^m sin(m phi). Directions are unit vectors in
the scanner (world) frame, never voxel axes. This module gives the *exact* basis in Cartesian
form (differentiable, any float dtype); the tracker forward pass uses the MRtrix lookup table
(``legendre.py``).
"""

from __future__ import annotations

import math

import torch

from ..errors import ShapeError
from .sh_layout import lmax_from_n, n_coeffs, sh_index

__all__ = ["n_coeffs", "lmax_from_n", "sh_index", "sh_basis", "sh_amplitude"]


def _legendre_normalised(lmax: int, x: torch.Tensor, s: torch.Tensor) -> dict:
    """P-bar_l^m(x) with x = cos(theta), s = sin(theta) >= 0, via stable recursions.

    Written in terms of (x, s) polynomials so it stays smooth (and differentiable) everywhere.
    Returns dict[(l, m)] -> tensor, for 0 <= m <= l <= lmax.
    """
    P = {}
    inv4pi = 1.0 / math.sqrt(4.0 * math.pi)
    pmm = torch.full_like(x, inv4pi)
    for m in range(lmax + 1):
        if m > 0:
            # P_m^m = -sqrt((2m+1)/(2m)) * s * P_{m-1}^{m-1}
            pmm = -math.sqrt((2.0 * m + 1.0) / (2.0 * m)) * s * pmm
        P[(m, m)] = pmm
        if m + 1 <= lmax:
            P[(m + 1, m)] = math.sqrt(2.0 * m + 3.0) * x * pmm
        for n in range(m + 2, lmax + 1):
            a = math.sqrt((4.0 * n * n - 1.0) / (n * n - m * m))
            b = math.sqrt(((n - 1.0) ** 2 - m * m) / (4.0 * (n - 1.0) ** 2 - 1.0))
            P[(n, m)] = a * (x * P[(n - 1, m)] - b * P[(n - 2, m)])
    return P


def sh_basis(dirs: torch.Tensor, lmax: int) -> torch.Tensor:
    """Evaluate the MRtrix3 basis at unit directions.

    Args:
        dirs: ``[..., 3]`` unit vectors, scanner frame.
        lmax: even maximum degree.

    Returns:
        ``[..., K]`` basis values, K = (lmax+1)(lmax+2)/2, dtype of ``dirs``.

    Gradients:
        Smooth in ``dirs`` everywhere (cos(m phi), sin(m phi) are expanded as polynomials of
        x, y, so there is no singularity at the poles).
    """
    if dirs.shape[-1] != 3:
        raise ShapeError(f"dirs must be [..., 3], got {tuple(dirs.shape)}")
    x, y, z = dirs.unbind(-1)
    rho2 = x * x + y * y
    # s^m cos(m phi) = Re((x + iy)^m), s^m sin(m phi) = Im((x + iy)^m): work with these and
    # P-bar_l^m / s^m so everything is polynomial.
    Pt = _legendre_normalised(lmax, z, torch.ones_like(z))  # P-bar_l^m(z) / s^m
    out = [None] * n_coeffs(lmax)
    re = torch.ones_like(x)
    im = torch.zeros_like(x)
    sqrt2 = math.sqrt(2.0)
    for m in range(lmax + 1):
        if m > 0:
            re, im = re * x - im * y, re * y + im * x
        for l in range(m + (m & 1), lmax + 1, 2):
            if m == 0:
                out[sh_index(l, 0)] = Pt[(l, 0)]
            else:
                out[sh_index(l, m)] = sqrt2 * Pt[(l, m)] * re
                out[sh_index(l, -m)] = sqrt2 * Pt[(l, m)] * im
    del rho2
    return torch.stack(out, dim=-1)


def sh_amplitude(coeffs: torch.Tensor, dirs: torch.Tensor) -> torch.Tensor:
    """FOD amplitude ``sum_k c_k Y_k(u)``.

    Args:
        coeffs: ``[..., K]`` MRtrix3-basis coefficients.
        dirs: ``[..., 3]`` unit directions (scanner frame), broadcastable with ``coeffs``.

    Returns:
        ``[...]`` amplitudes. Differentiable w.r.t. both arguments.
    """
    lmax = lmax_from_n(coeffs.shape[-1])
    return (sh_basis(dirs, lmax) * coeffs).sum(-1)
