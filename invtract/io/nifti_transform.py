"""The image->scanner transform of a NIfTI header, as MRtrix3 3.0.3 reads it.

MRtrix does not use the raw sform (nibabel's ``img.affine``): it takes the sform rows
(float32 in NIfTI-1, promoted to double) when ``sform_code != 0``, divides each of the first
three columns by its Euclidean norm, and takes the voxel sizes from ``pixdim`` (absolute
values; the column norms instead when any ``pixdim`` differs from its norm by more than 1e-5
relative). Otherwise, when ``qform_code != 0``, it builds the rotation from the quaternion
(``w = sqrt(1 - (b^2 + c^2 + d^2))``, or a normalised ``(0, b, c, d)`` when that is below
1e-7), negates the third column when ``pixdim[0] < 0``, and uses ``pixdim`` as voxel sizes.
With neither code the transform is MRtrix's default (identity rotation, image centred on the
origin). The voxel-index -> scanner affine is then ``transform * diag(spacing)`` (see
:mod:`invtract.io.geometry`), which differs from the raw sform in the last float32 bits.

Convention: MRtrix3 3.0.3 ``core/file/nifti_utils.cpp`` (``fetch``), ``core/transform.h``
(``Transform::get_default``); the config options ``NIfTIUseSform`` (default true) and
``AnalyseLeftToRight`` are taken at their defaults.
"""

from __future__ import annotations

import numpy as np

from .geometry import norm3

__all__ = ["nifti_transform", "default_transform"]


def default_transform(shape, spacing) -> np.ndarray:
    """``[3, 4]`` ``Transform::get_default``: identity rotation, translation
    ``(-0.5 * (n - 1)) * spacing`` per axis."""
    T = np.zeros((3, 4))
    T[:3, :3] = np.eye(3)
    for i in range(3):
        T[i, 3] = (-0.5 * float(shape[i] - 1)) * float(spacing[i])
    return T


def _quaternion_matrix(b: float, c: float, d: float) -> np.ndarray:
    """Eigen ``Quaterniond(0, b, c, d)`` completed as MRtrix does, then ``toRotationMatrix``."""
    x, y, z = float(b), float(c), float(d)
    sq = (x * x + z * z) + (y * y + 0.0)  # Eigen squaredNorm of (x, y, z, w=0): 2 packets
    w = 1.0 - sq
    if w < 1.0e-7:
        n = np.sqrt(sq)
        x, y, z, w = x / n, y / n, z / n, 0.0
    else:
        w = float(np.sqrt(w))
    tx, ty, tz = 2.0 * x, 2.0 * y, 2.0 * z
    twx, twy, twz = tx * w, ty * w, tz * w
    txx, txy, txz = tx * x, ty * x, tz * x
    tyy, tyz, tzz = ty * y, tz * y, tz * z
    return np.array(
        [
            [1.0 - (tyy + tzz), txy - twz, txz + twy],
            [txy + twz, 1.0 - (txx + tzz), tyz - twx],
            [txz - twy, tyz + twx, 1.0 - (txx + tyy)],
        ]
    )


def nifti_transform(header) -> tuple[np.ndarray, tuple]:
    """``(transform [3, 4] float64 unit columns, spacing (3,) mm)`` of a NIfTI-1/2 header.

    Args:
        header: a nibabel ``Nifti1Header`` / ``Nifti2Header`` (fields at their stored
            precision: float32 for NIfTI-1, float64 for NIfTI-2).

    Returns:
        The header transform and voxel sizes of the file's first three axes, before
        MRtrix's realignment (:func:`invtract.io.geometry.realign`) and sanitising.
    """
    dims = [max(abs(int(n)), 1) for n in header["dim"][1:4]]
    pixdim = [abs(float(p)) for p in header["pixdim"][1:4]]
    spacing = tuple(pixdim)
    transform = default_transform(dims, spacing)
    if int(header["sform_code"]) != 0:
        M = np.array(
            [[float(v) for v in header[k]] for k in ("srow_x", "srow_y", "srow_z")], np.float64
        )
        rescale = any(abs(pixdim[a] / norm3(M[:, a]) - 1.0) > 1e-5 for a in range(3))
        sp = []
        for a in range(3):
            length = norm3(M[:, a])
            M[:, a] = M[:, a] / length
            sp.append(length if rescale else pixdim[a])
        transform, spacing = M, tuple(sp)
    elif int(header["qform_code"]) != 0:
        Q = np.zeros((3, 4))
        Q[:, :3] = _quaternion_matrix(
            header["quatern_b"], header["quatern_c"], header["quatern_d"]
        )
        Q[:, 3] = [float(header[k]) for k in ("qoffset_x", "qoffset_y", "qoffset_z")]
        if float(header["pixdim"][0]) < 0.0:
            Q[:, 2] = -Q[:, 2]
        transform, spacing = Q, tuple(pixdim)
    return transform, spacing
