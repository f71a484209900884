"""Image geometry exactly as MRtrix3 3.0.3 holds it: header transform, axis realignment and
the voxel <-> scanner transforms, reproduced to the last bit of every double.

MRtrix keeps, per image, a ``[3, 4]`` image->scanner ``transform`` with unit-norm columns and
separate voxel sizes ("spacing"). On opening an image it (1) normalises columns that are not
unit length to 1e-6 (``Header::sanitise_transform``), (2) permutes and flips the first three
axes so that the transform is closest to RAS (``Header::realign_transform``), and then every
consumer builds ``voxel2scanner = transform * diag(spacing)`` and ``scanner2voxel`` as Eigen's
inverse of it (``core/transform.h``). tckgen's interpolation, seeding and ROIs all start from
these doubles; a NIfTI's raw sform (what nibabel reports) differs from them in the last bits of
float32, which is enough to move streamlines by ~1e-4 mm. Functions here are pure numpy on
float64 and follow the evaluation order of the compiled C++ (Eigen 3.4, SSE2, no FMA):

* a 3-vector norm or dot product of doubles sums ``(a0 + a1) + a2`` (one 2-wide packet, then
  the tail);
* the 3x3 inverse is Eigen's cofactor formula (``Eigen/src/LU/InverseImpl.h``), the affine
  inverse's translation ``-(L^-1 t)`` with ``(a0 + a1) + a2`` for rows 0-1 (one packet) and
  ``a0 + (a1 + a2)`` for row 2.

Convention: MRtrix3 3.0.3 ``core/header.cpp`` (``sanitise_transform``, ``realign_transform``),
``core/axes.cpp`` (``get_permutation_to_make_axial``), ``core/transform.h``,
``core/adapter/subset.h`` (translation of a cropped image).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "MRtrixGeometry",
    "norm3",
    "sanitise_transform",
    "realign",
    "voxel2scanner",
    "scanner2voxel",
    "subset_transform",
    "true_voxel_box",
]


def norm3(v: np.ndarray) -> float:
    """Eigen ``norm()`` of a double 3-vector: ``sqrt((v0^2 + v1^2) + v2^2)``."""
    v = np.asarray(v, np.float64)
    return float(np.sqrt((v[0] * v[0] + v[1] * v[1]) + v[2] * v[2]))


@dataclass(frozen=True)
class MRtrixGeometry:
    """Spatial geometry of an image as MRtrix holds it after opening.

    Attributes:
        transform: ``[3, 4]`` float64 image->scanner transform, unit-norm columns, mm.
        spacing: ``(3,)`` voxel sizes in mm, per (realigned) axis.
        shape: ``(3,)`` voxel counts per (realigned) axis.
        perm: ``(3,)`` realigned axis ``j`` is the file's axis ``perm[j]``.
        flip: ``(3,)`` per realigned axis, whether it runs opposite to the file's axis.
    """

    transform: np.ndarray
    spacing: tuple
    shape: tuple
    perm: tuple = (0, 1, 2)
    flip: tuple = (False, False, False)

    @property
    def voxel2scanner(self) -> np.ndarray:
        """``[4, 4]`` float64 voxel index -> scanner mm (``transform * diag(spacing)``)."""
        return voxel2scanner(self.transform, self.spacing)

    @property
    def scanner2voxel(self) -> np.ndarray:
        """``[3, 4]`` float64 scanner mm -> voxel coordinates (Eigen's affine inverse)."""
        return scanner2voxel(self.voxel2scanner)

    def reorient(self, data: np.ndarray) -> np.ndarray:
        """Bring ``data`` ``[X, Y, Z, ...]`` in the file's axis order into realigned order
        (a view: axes transposed by ``perm``, realigned axes with ``flip`` reversed)."""
        order = list(self.perm) + list(range(3, data.ndim))
        out = np.transpose(data, order)
        for j in range(3):
            if self.flip[j]:
                out = np.flip(out, axis=j)
        return out


def sanitise_transform(transform: np.ndarray, spacing) -> tuple[np.ndarray, tuple]:
    """``Header::sanitise_transform``: columns whose norm is not 1 to 1e-6 are all normalised
    and the voxel sizes scaled by the norms. Returns ``(transform [3, 4], spacing (3,))``."""
    T = np.array(transform, np.float64)[:3, :4]
    sp = [float(s) for s in spacing[:3]]
    if not any(abs(norm3(T[:, i]) - 1.0) > 1.0e-6 for i in range(3)):
        return T, tuple(sp)
    for i in range(3):
        length = norm3(T[:, i])
        T[:, i] = T[:, i] / length
        sp[i] = sp[i] * length
    return T, tuple(sp)


def _axial_permutation(T: np.ndarray) -> tuple[list[int], list[bool]]:
    """``Axes::get_permutation_to_make_axial``: for each scanner axis (row) the image axis
    with the largest |cosine| (first on ties), made distinct, and which image axes to flip."""
    perm = [int(np.argmax(np.abs(T[r, :3]))) for r in range(3)]

    def not_any_of(a: int, b: int) -> int:
        return next(i for i in range(3) if i != a and i != b)

    if perm[0] == perm[1]:
        perm[1] = not_any_of(perm[0], perm[2])
    if perm[0] == perm[2]:
        perm[2] = not_any_of(perm[0], perm[1])
    if perm[1] == perm[2]:
        perm[2] = not_any_of(perm[0], perm[1])
    flip = [False, False, False]
    for r in range(3):
        flip[perm[r]] = bool(T[r, perm[r]] < 0.0)
    return perm, flip


def realign(transform: np.ndarray, spacing, shape) -> MRtrixGeometry:
    """``Header::realign_transform``: the geometry after MRtrix permutes/flips the axes of an
    opened image towards RAS.

    Args:
        transform: ``[3, 4]`` unit-column image->scanner transform as read (after
            :func:`sanitise_transform`).
        spacing: ``(3,)`` voxel sizes (mm) of the file's axes.
        shape: ``(3,)`` voxel counts of the file's axes.

    Returns:
        :class:`MRtrixGeometry` of the realigned image (``perm``/``flip`` map file axes to it).
    """
    T = np.array(transform, np.float64)[:3, :4]
    spacing = tuple(float(s) for s in spacing[:3])
    shape = tuple(int(n) for n in shape[:3])
    perm, flip = _axial_permutation(T)
    if perm == [0, 1, 2] and not any(flip):
        return MRtrixGeometry(T, spacing, shape)
    for i in range(3):
        if flip[i]:
            length = float(shape[i] - 1) * spacing[i]
            T[:3, i] = -T[:3, i]
            T[:3, 3] = T[:3, 3] - length * T[:3, i]
    T[:, :3] = T[:, perm]
    return MRtrixGeometry(
        T,
        tuple(spacing[p] for p in perm),
        tuple(shape[p] for p in perm),
        tuple(perm),
        tuple(flip[p] for p in perm),
    )


def voxel2scanner(transform: np.ndarray, spacing) -> np.ndarray:
    """``[4, 4]`` float64 ``transform * diag(spacing)`` (each linear entry rounded once)."""
    A = np.eye(4)
    A[:3, :4] = np.asarray(transform, np.float64)[:3, :4]
    A[:3, :3] = A[:3, :3] * np.asarray(spacing[:3], np.float64)[None, :]
    return A


def _cofactor(m: np.ndarray, i: int, j: int) -> float:
    i1, i2, j1, j2 = (i + 1) % 3, (i + 2) % 3, (j + 1) % 3, (j + 2) % 3
    return m[i1, j1] * m[i2, j2] - m[i1, j2] * m[i2, j1]


def _inverse3(m: np.ndarray) -> np.ndarray:
    """Eigen's 3x3 cofactor inverse (``compute_inverse<..., 3>``), same rounding."""
    c0 = np.array([_cofactor(m, 0, 0), _cofactor(m, 1, 0), _cofactor(m, 2, 0)])
    det = (c0[0] * m[0, 0] + c0[1] * m[1, 0]) + c0[2] * m[2, 0]
    invdet = 1.0 / det
    r = np.empty((3, 3))
    for i, j in ((1, 2), (2, 1), (2, 2), (1, 0), (1, 1), (2, 0)):
        r[i, j] = _cofactor(m, j, i) * invdet
    r[0, :] = c0 * invdet
    return r


def scanner2voxel(v2s: np.ndarray) -> np.ndarray:
    """``[3, 4]`` float64: Eigen's ``Transform<double, 3, AffineCompact>::inverse()`` of a
    voxel->scanner ``[3, 4]`` / ``[4, 4]`` affine, bit for bit."""
    v2s = np.asarray(v2s, np.float64)
    L = _inverse3(v2s[:3, :3])
    t = v2s[:3, 3]
    out = np.empty((3, 4))
    out[:, :3] = L
    # rows 0-1 are one SSE2 packet summed left to right; row 2 is the scalar tail, which the
    # compiled product sums as a0 + (a1 + a2) (checked against Eigen 3.4 / g++ 12 -O2)
    out[:2, 3] = -((L[:2, 0] * t[0] + L[:2, 1] * t[1]) + L[:2, 2] * t[2])
    out[2, 3] = -(L[2, 0] * t[0] + (L[2, 1] * t[1] + L[2, 2] * t[2]))
    return out


def subset_transform(transform: np.ndarray, spacing, start) -> np.ndarray:
    """``[3, 4]`` transform of a crop starting at voxel ``start`` (``Adapter::Subset``):
    the translation gains ``(start_j * spacing_j) * T[i, j]``, added for j = 0, 1, 2 in turn."""
    T = np.array(transform, np.float64)[:3, :4]
    for j in range(3):
        for i in range(3):
            T[i, 3] = T[i, 3] + (float(start[j]) * float(spacing[j])) * T[i, j]
    return T


def true_voxel_box(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(start [3], size [3])`` of the bounding box of ``mask``'s true voxels with a one-voxel
    margin, clipped to the image, as ``Mask::__get_mask`` (``roi.cpp``) crops seed and ROI
    masks. ``mask`` ``[X, Y, Z]`` bool with at least one true voxel."""
    idx = np.argwhere(mask)
    start = np.maximum(idx.min(0) - 1, 0)
    size = np.minimum(np.asarray(mask.shape) - start, idx.max(0) + 2 - start)
    return start, size
