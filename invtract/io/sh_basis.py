"""Conversion of DIPY / scilpy spherical-harmonic coefficient conventions to MRtrix3's basis.

Basis names as DIPY and scilpy write them: ``descoteaux07`` / ``tournier07`` (DIPY
``legacy=False``) and ``descoteaux07_legacy`` / ``tournier07_legacy`` (``legacy=True``, the
default of DIPY's fits); ``mrtrix`` is ``tournier07``. The conversions are DIPY's
(``convert_sh_descoteaux_tournier``, ``convert_sh_to_legacy``, ``convert_sh_from_legacy``):
each permutes coefficients within an order l, flips some signs and rescales some by sqrt(2).
:func:`guess_basis` flags an FOD whose amplitudes look like another basis's.

Convention: MRtrix3 ``core/math/SH.h`` (``index``: volume ``l(l+1)/2 + m``) and
``docs/concepts/spherical_harmonics.rst``; DIPY ``dipy/reconst/shm.py``
(``real_sh_descoteaux``, ``real_sh_tournier`` with ``legacy=True/False``).
"""

from __future__ import annotations

from functools import lru_cache
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
    "SHBasisWarning",
    "guess_basis",
    "negative_share",
    "warn_if_other_basis",
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


def _dipy_to_mrtrix(coeffs: np.ndarray, basis: str) -> np.ndarray:
    """DIPY's own conversions, ``basis`` -> MRtrix3 (= DIPY ``tournier07``, ``legacy=False``)."""
    from dipy.reconst.shm import (
        convert_sh_descoteaux_tournier,
        convert_sh_from_legacy,
        convert_sh_to_legacy,
    )

    if basis == "tournier07_legacy":
        return convert_sh_from_legacy(coeffs, "tournier07")
    if basis == "descoteaux07":  # -> descoteaux07_legacy first
        coeffs = convert_sh_to_legacy(coeffs, "descoteaux07")
    # DIPY: legacy descoteaux07 <-> non-legacy tournier07 (MRtrix3) is a permutation
    return convert_sh_descoteaux_tournier(coeffs)


@lru_cache(maxsize=32)
def _index_map(lmax: int, basis: str) -> tuple[np.ndarray, np.ndarray]:
    """``(src [K], scale [K])`` such that ``c_mrtrix[..., v] = c_dipy[..., src[v]] * scale[v]``.

    Read off DIPY's conversion of the identity (each basis change is a signed, scaled
    permutation within each order l), so DIPY defines the convention and the map applies to
    numpy arrays and torch tensors alike (differentiably).
    """
    K = n_for_lmax(lmax)
    if basis in ("mrtrix", "tournier07"):
        return np.arange(K, dtype=np.int64), np.ones(K, dtype=np.float64)
    M = _dipy_to_mrtrix(np.eye(K), basis)  # row i: the image of basis vector i
    src = np.abs(M).argmax(axis=0)
    scale = M[src, np.arange(K)]
    if np.count_nonzero(M) != K or not np.all(scale != 0):  # pragma: no cover - DIPY changed
        raise ConfigError(f"DIPY's {basis!r} conversion is not a signed permutation")
    return src.astype(np.int64), scale


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


class SHBasisWarning(UserWarning):
    """The FOD's amplitudes look like another SH basis than the one it was read with."""


#: negative share of the squared amplitude above which an FOD looks mis-read, and the factor
#: by which another basis must reduce it to be named (real CSD FODs read in their own basis:
#: 0.01-0.02; read in the other family: 0.10-0.24; see tests/io/test_sh_basis.py)
_NEGATIVE_SHARE = 0.04
_BETTER_BY = 3.0


def negative_share(coeffs: np.ndarray, directions: int = 500) -> float:
    """Share of an FOD's squared amplitude that is negative, over the sphere.

    Args:
        coeffs: ``[N, K]`` SH coefficients in the MRtrix3 basis.
        directions: number of evenly spread (Fibonacci) unit directions evaluated.

    Returns:
        ``sum(min(a, 0)^2) / sum(a^2)`` over all N voxels and directions (0 = no negative
        lobe; NaN when all amplitudes are 0).
    """
    from dipy.reconst.shm import real_sh_tournier

    i = np.arange(directions) + 0.5
    theta = np.arccos(1.0 - 2.0 * i / directions)
    phi = np.pi * (1.0 + 5.0**0.5) * i
    lmax = _lmax_from_last_axis(coeffs)
    B, _, _ = real_sh_tournier(lmax, theta, phi, legacy=False)  # MRtrix3's basis
    a = np.asarray(coeffs, np.float64) @ B.T
    total = float((a * a).sum())
    return float((np.minimum(a, 0.0) ** 2).sum() / total) if total > 0 else float("nan")


def guess_basis(
    coeffs: np.ndarray, basis: str, max_voxels: int = 2000
) -> tuple[list[str], dict[str, float]]:
    """Whether an FOD read in ``basis`` looks like it was written in another basis.

    Reading coefficients in the wrong basis leaves large negative lobes (the descoteaux and
    tournier families, or DIPY's legacy and non-legacy descoteaux07, mixed up); read in the
    right one, a CSD FOD is almost non-negative. The brightest voxels (l = 0 coefficient) are
    re-read in every basis of :data:`SH_BASES` and their negative share compared.

    Args:
        coeffs: ``[..., K]`` SH coefficients already converted to the MRtrix3 basis from
            ``basis`` (as :func:`invtract.io.image.load_fod` returns them).
        basis: the basis they were read in.
        max_voxels: at most this many of the brightest voxels are evaluated.

    Returns:
        ``(others, shares)``: when the given basis looks wrong, the bases (in
        :data:`SH_BASES` order; ``tournier07`` left out beside its alias ``mrtrix``) that
        remove most of its negative lobes, else ``[]``; and the negative share under each
        basis name. (Legacy tournier07 damps every non-zonal term by sqrt(2), so it always
        looks slightly smoother than tournier07: both are named when either fits.)
    """
    _check_basis(basis)
    c = np.asarray(coeffs, np.float64).reshape(-1, np.shape(coeffs)[-1])
    c = c[np.isfinite(c).all(axis=1) & (c[:, 0] > 0)]
    if c.shape[0] == 0:
        return [], {}
    keep = np.argsort(c[:, 0])[::-1][:max_voxels]
    raw = from_mrtrix_basis(c[keep], basis)
    shares = {b: negative_share(to_mrtrix_basis(raw, b)) for b in SH_BASES if b != "mrtrix"}
    shares = {"mrtrix": shares["tournier07"], **shares}
    given = shares[basis]
    if not given > _NEGATIVE_SHARE:
        return [], shares
    others = [b for b in SH_BASES if b != "tournier07" and shares[b] * _BETTER_BY < given]
    return others, shares


def warn_if_other_basis(coeffs: np.ndarray, basis: str, source: str = "the FOD") -> list[str]:
    """Emit an :class:`SHBasisWarning` (one line) when :func:`guess_basis` names other bases
    for ``coeffs`` (MRtrix3-basis coefficients read from ``basis``); returns them."""
    import warnings

    others, shares = guess_basis(coeffs, basis)
    if others:
        alts = ", ".join(f"{100 * shares[b]:.0f}% as {b!r}" for b in others)
        warnings.warn(
            f"{source} read in SH basis {basis!r} has large negative lobes "
            f"({100 * shares[basis]:.0f}% of its squared amplitude; {alts}): check "
            "--sh-basis (DIPY's fits write descoteaux07_legacy unless legacy=False)",
            SHBasisWarning,
            stacklevel=2,
        )
    return others
