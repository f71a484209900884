"""Conversion of DIPY spherical-harmonic coefficient conventions to MRtrix3's basis.

All bases here share the ordering l = 0, 2, ..., lmax and, within each l, m = -l ... l, so a
conversion only permutes coefficients within an order l, flips some signs and rescales some by
sqrt(2). See spec section 1.3 for the table this module implements.

Convention: MRtrix3 ``core/math/SH.h`` (``index``: volume ``l(l+1)/2 + m``) and
``docs/concepts/spherical_harmonics.rst``; DIPY ``dipy/reconst/shm.py``
(``real_sh_descoteaux``, ``real_sh_tournier`` with ``legacy=True/False``).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from ..arrays import is_tensor
from ..errors import ConfigError, ShapeError
from ..fod.sh_layout import lmax_for_n, valid_sh_counts
from ..fod.sh_layout import n_coeffs as n_for_lmax

if TYPE_CHECKING:  # annotations only
    import torch

__all__ = [
    "SH_BASES",
    "lmax_for_n",
    "n_for_lmax",
    "valid_sh_counts",
    "to_mrtrix_basis",
    "from_mrtrix_basis",
]

#: Accepted basis names. ``mrtrix`` and ``tournier07`` (``legacy=False``) are identical.
#: The plain DIPY names mean ``legacy=False``; DIPY's own default is ``legacy=True``
#: (``*_legacy`` here).
SH_BASES: tuple[str, ...] = (
    "mrtrix",
    "tournier07",
    "tournier07_legacy",
    "descoteaux07",
    "descoteaux07_legacy",
)


def _index_map(lmax: int, basis: str) -> tuple[np.ndarray, np.ndarray]:
    """``(src [K], scale [K])`` such that ``c_mrtrix[..., v] = c_dipy[..., src[v]] * scale[v]``."""
    K = n_for_lmax(lmax)
    src = np.arange(K, dtype=np.int64)
    scale = np.ones(K, dtype=np.float64)
    if basis in ("mrtrix", "tournier07"):
        return src, scale
    for l in range(0, lmax + 1, 2):
        centre = l * (l + 1) // 2  # volume of (l, m=0)
        for m in range(-l, l + 1):
            v = centre + m
            if m == 0:
                continue
            if basis == "tournier07_legacy":
                # DIPY legacy tournier07 lacks the sqrt(2) factor on m != 0.
                scale[v] = 1.0 / math.sqrt(2.0)
            elif basis == "descoteaux07_legacy":
                # Same functions with the sign of m swapped: c_MR[l, m] = c_D[l, -m].
                src[v] = centre - m
            elif basis == "descoteaux07":
                # c_MR[l, -m] = c_D[l, +m];  c_MR[l, +m] = (-1)^m c_D[l, -m]   (m > 0).
                src[v] = centre - m
                if m > 0 and m % 2 == 1:
                    scale[v] = -1.0
    return src, scale


def _check_basis(basis: str) -> None:
    if basis not in SH_BASES:
        raise ConfigError(f"unknown SH basis {basis!r}; valid names are: {', '.join(SH_BASES)}")


def _apply(coeffs, src: np.ndarray, scale: np.ndarray):
    if is_tensor(coeffs):
        import torch

        idx = torch.as_tensor(src, device=coeffs.device)
        sc = torch.as_tensor(scale, dtype=coeffs.dtype, device=coeffs.device)
        return coeffs.index_select(-1, idx) * sc
    arr = np.asarray(coeffs)
    return (arr[..., src] * scale).astype(arr.dtype, copy=False)


def to_mrtrix_basis(coeffs: np.ndarray | torch.Tensor, basis: str) -> np.ndarray | torch.Tensor:
    """Re-express SH coefficients given in ``basis`` in MRtrix3's real SH basis.

    Only the basis convention changes (index mapping, signs, sqrt(2) factors); the frame of
    reference of the directions is untouched (spec section 1.3: DIPY fits are in the bvec frame,
    MRtrix's in scanner space; rotate separately if needed).

    Args:
        coeffs: SH coefficients (unitless FOD amplitude units), last axis = coefficient index
            in DIPY/MRtrix order (l = 0, 2, ...; m = -l ... l). numpy array or torch tensor.
        basis: one of :data:`SH_BASES`.

    Returns:
        Coefficients in the MRtrix3 basis, same type, dtype, device and shape as ``coeffs``.

    Shape:
        ``coeffs``: ``[..., K]`` with K = (lmax+1)(lmax+2)/2 -> ``[..., K]``.

    Gradients:
        Differentiable w.r.t. ``coeffs`` (torch input): a fixed linear map.

    Raises:
        ConfigError: unknown basis name (the message lists the valid names).
        ShapeError: K is not a valid even-lmax coefficient count.
    """
    _check_basis(basis)
    lmax = _lmax_from_last_axis(coeffs)
    src, scale = _index_map(lmax, basis)
    return _apply(coeffs, src, scale)


def from_mrtrix_basis(coeffs: np.ndarray | torch.Tensor, basis: str) -> np.ndarray | torch.Tensor:
    """Inverse of :func:`to_mrtrix_basis`: MRtrix3 coefficients -> ``basis`` coefficients.

    Args:
        coeffs: ``[..., K]`` SH coefficients in the MRtrix3 basis.
        basis: one of :data:`SH_BASES`.

    Returns:
        ``[..., K]`` coefficients in ``basis``, same type as ``coeffs``.

    Raises:
        ConfigError: unknown basis name.
        ShapeError: K is not a valid even-lmax coefficient count.
    """
    _check_basis(basis)
    lmax = _lmax_from_last_axis(coeffs)
    src, scale = _index_map(lmax, basis)
    # c_mr[v] = c_d[src[v]] * scale[v]  =>  c_d[src[v]] = c_mr[v] / scale[v]
    inv_src = np.empty_like(src)
    inv_src[src] = np.arange(src.size)
    inv_scale = np.empty_like(scale)
    inv_scale[src] = 1.0 / scale
    return _apply(coeffs, inv_src, inv_scale)


def _lmax_from_last_axis(coeffs) -> int:
    K = int(coeffs.shape[-1]) if len(coeffs.shape) else 0
    lmax = lmax_for_n(K)
    if lmax is None:
        raise ShapeError(
            f"last axis has {K} SH coefficients; valid counts for even lmax are "
            f"{', '.join(str(n) for n in valid_sh_counts())}"
        )
    return lmax
