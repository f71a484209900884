"""Diffusion gradient tables: from a ``.mif`` header (``dw_scheme``) or FSL ``bvecs``/``bvals``.

Conventions (MRtrix3 3.0.3 ``core/dwi/gradient.cpp``, ``core/dwi/shells.cpp``):

* A table is ``[N, 4]``: unit direction ``(x, y, z)`` in the scanner frame (RAS+) and the
  b-value (s/mm^2), one row per image volume. ``.mif`` headers store it in this form
  (``dw_scheme``); directions are normalised on reading and, when a norm differs from 1 by
  more than ``exp(0.01)`` in the squared norm, the b-value is scaled by the squared norm
  (MRtrix's automatic ``-bvalue_scaling``). A ``[0, 0, 0]`` direction stays zero.
* FSL ``bvecs`` are given in the image's voxel axes (as the NIfTI file stores them), in a
  left-handed frame: the x component is negated when the determinant of the image's affine is
  positive, then the vector is rotated into the scanner frame by the rotation of the affine.
* Shells: b-values ``<= 10`` (``BZeroThreshold``) are b=0; the others are clustered as MRtrix
  does (density clustering with ``|b - b'| < 80`` and at least 3 neighbours); shells are
  sorted by mean b-value, b=0 first.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError, FormatError, ShapeError

__all__ = [
    "BZERO_THRESHOLD",
    "Shell",
    "normalise_scheme",
    "parse_dw_scheme",
    "read_mif_scheme",
    "load_fsl_gradients",
    "fsl_to_scanner",
    "shells",
]

#: b-values at or below this are b=0 (MRtrix ``BZeroThreshold`` default)
BZERO_THRESHOLD = 10.0
#: half-width of a b-value cluster (MRtrix ``BValueEpsilon`` default)
_BVALUE_EPSILON = 80.0
#: neighbours a non-zero b-value needs to found or grow a shell
_MIN_LINKAGE = 3


@dataclass(frozen=True)
class Shell:
    """One b-value shell.

    Attributes:
        volumes: ``[n]`` indices of its volumes in the table (ascending).
        mean: mean b-value (s/mm^2).
        is_bzero: True for the b=0 "shell".
    """

    volumes: np.ndarray
    mean: float
    is_bzero: bool


def normalise_scheme(grad: np.ndarray) -> np.ndarray:
    """Normalise a ``[N, 4]`` table as MRtrix reads it (unit directions, b-value scaling).

    Returns:
        ``[N, 4]`` float64 copy.
    """
    g = np.array(grad, dtype=np.float64)
    if g.ndim != 2 or g.shape[1] < 4:
        raise ShapeError(f"gradient table must be [N, 4], got {g.shape}")
    g = g[:, :4]
    sq = (g[:, :3] ** 2).sum(1)
    nz = sq > 0
    g[nz, :3] /= np.sqrt(sq[nz])[:, None]
    if nz.any() and np.abs(np.log(sq[nz])).max() > 0.01:
        g[nz, 3] *= sq[nz]
    return g


def parse_dw_scheme(text: str) -> np.ndarray:
    """``[N, 4]`` raw table from a ``dw_scheme`` header value (rows separated by newlines)."""
    rows = [r for r in text.replace(";", "\n").splitlines() if r.strip()]
    try:
        g = np.array([[float(v) for v in r.split(",")] for r in rows], dtype=np.float64)
    except ValueError as e:
        raise FormatError(f"dw_scheme: cannot parse {text[:80]!r}: {e}") from None
    if g.ndim != 2 or g.shape[1] != 4:
        raise FormatError(f"dw_scheme must have 4 values per row, got shape {g.shape}")
    return g


def read_mif_scheme(path: str | os.PathLike) -> np.ndarray:
    """Normalised ``[N, 4]`` table from the ``dw_scheme`` of a ``.mif`` header.

    Raises:
        FormatError: no ``dw_scheme`` in the header, or its rows do not match the volumes.
    """
    from .mif import read_mif_header

    hdr = read_mif_header(path)
    text = hdr.keyval.get("dw_scheme")
    if not text:
        raise FormatError(f"{path}: no dw_scheme in the header (give --fslgrad BVECS BVALS)")
    g = parse_dw_scheme(text)
    n_vol = hdr.dim[3] if len(hdr.dim) > 3 else 1
    if g.shape[0] != n_vol:
        raise FormatError(f"{path}: dw_scheme has {g.shape[0]} rows for {n_vol} volumes")
    return normalise_scheme(g)


def _read_rows(path: str | os.PathLike, rows: int, what: str) -> np.ndarray:
    try:
        a = np.atleast_2d(np.loadtxt(path, dtype=np.float64))
    except (OSError, ValueError) as e:
        raise FormatError(f"cannot read FSL {what} {path}: {e}") from None
    if a.shape[0] != rows:
        if a.shape[1] == rows:
            a = a.T
        else:
            raise FormatError(f"FSL {what} {path} must have {rows} rows or columns, got {a.shape}")
    return a


def fsl_to_scanner(bvecs: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Rotate FSL ``[3, N]`` bvecs (image axes, left-handed) into ``[N, 3]`` scanner directions.

    Args:
        bvecs: ``[3, N]`` vectors in the NIfTI file's voxel axes.
        affine: ``[4, 4]`` voxel -> scanner (mm) affine of that file.
    """
    b = np.array(bvecs, dtype=np.float64)
    lin = np.asarray(affine, dtype=np.float64)[:3, :3]
    if np.linalg.det(lin) > 0:
        b[0] = -b[0]
    u, _, vt = np.linalg.svd(lin / np.linalg.norm(lin, axis=0))
    rot = u @ vt  # nearest rotation (polar decomposition), as Eigen's Transform::rotation()
    return (rot @ b).T


def load_fsl_gradients(
    bvecs: str | os.PathLike, bvals: str | os.PathLike, affine: np.ndarray, n_volumes: int
) -> np.ndarray:
    """Normalised ``[N, 4]`` scanner-frame table from FSL ``bvecs`` / ``bvals`` files.

    Args:
        bvecs, bvals: the FSL files (3 rows / 1 row, or their transposes).
        affine: ``[4, 4]`` affine of the DWI as stored in its NIfTI file.
        n_volumes: volumes of the DWI (checked).
    """
    vecs = _read_rows(bvecs, 3, "bvecs")
    vals = _read_rows(bvals, 1, "bvals")
    if vecs.shape[1] != vals.shape[1]:
        raise FormatError(f"bvecs has {vecs.shape[1]} entries, bvals {vals.shape[1]}")
    if vals.shape[1] != int(n_volumes):
        raise ConfigError(f"bvecs/bvals have {vals.shape[1]} entries for {n_volumes} volumes")
    g = np.concatenate([fsl_to_scanner(vecs, affine), vals.T], 1)
    return normalise_scheme(g)


def _cluster(b: np.ndarray) -> np.ndarray:
    """Cluster labels per volume: 1 = b=0, 2.. = shells in discovery order, 0 = unassigned."""
    n = b.size
    lab = np.zeros(n, np.int64)
    visited = b <= BZERO_THRESHOLD
    lab[visited] = 1
    k = 1
    nonzero = b > BZERO_THRESHOLD

    def region(v: float) -> list[int]:
        return list(np.nonzero(nonzero & (np.abs(v - b) < _BVALUE_EPSILON))[0])

    for i in range(n):
        if visited[i]:
            continue
        visited[i] = True
        nb = region(b[i])
        if len(nb) < _MIN_LINKAGE:
            continue
        k += 1
        lab[i] = k
        j = 0
        while j < len(nb):
            q = nb[j]
            if not visited[q]:
                visited[q] = True
                nb2 = region(b[q])
                if len(nb2) >= _MIN_LINKAGE:
                    nb.extend(nb2)
            if lab[q] == 0:
                lab[q] = k
            j += 1
    return lab


def shells(grad: np.ndarray) -> list[Shell]:
    """The shells of a ``[N, 4]`` table, sorted by mean b-value (b=0 first when present).

    Raises:
        ConfigError: the b-values do not form shells (as MRtrix: none, or more than sqrt(N)).
    """
    b = np.asarray(grad, dtype=np.float64)[:, 3]
    lab = _cluster(b)
    out = []
    for k in range(1, int(lab.max()) + 1):
        vols = np.nonzero(lab == k)[0]
        if vols.size:
            mean = float(b[vols].mean())
            out.append(Shell(vols, mean, mean < BZERO_THRESHOLD))
    if not out or len(out) > np.sqrt(b.size):
        raise ConfigError("the b-values could not be grouped into shells (not a HARDI scheme?)")
    return sorted(out, key=lambda s: s.mean)
