"""A small NIfTI-1 reader for plain 3-D images, without nibabel (start-up of light commands).

Importing nibabel costs about as much as importing numpy (it pulls in scipy, urllib, email,
...). ``invtract connectome`` only reads a 3-D label image, so :mod:`invtract.io.image` reads
such files here and keeps nibabel for everything else. Only files nibabel would load without
changing a field are accepted (NIfTI-1, single file ``n+1``, a plain integer or float
datatype, ``pixdim[0]`` of +-1 or 0, non-negative voxel sizes, known qform / sform codes, at
most three axes, a finite intercept where the slope applies); anything else gives ``None`` and
the caller uses nibabel, whose checks and error messages then apply.

Layout (NIfTI-1 standard, ``nifti1.h``): a 348-byte header in the file's byte order (told by
``sizeof_hdr == 348``), the voxels from byte ``vox_offset``, first axis fastest (Fortran
order); ``.nii.gz`` is the same file gzip-compressed.
"""

from __future__ import annotations

import gzip

import numpy as np

__all__ = ["HEADER_DTYPE", "read_plain_nifti"]

#: the NIfTI-1 header, field names as nibabel's (so :func:`nifti_transform` reads either)
HEADER_DTYPE = np.dtype(
    [
        ("sizeof_hdr", "i4"), ("data_type", "S10"), ("db_name", "S18"), ("extents", "i4"),
        ("session_error", "i2"), ("regular", "S1"), ("dim_info", "u1"), ("dim", "i2", (8,)),
        ("intent_p1", "f4"), ("intent_p2", "f4"), ("intent_p3", "f4"), ("intent_code", "i2"),
        ("datatype", "i2"), ("bitpix", "i2"), ("slice_start", "i2"), ("pixdim", "f4", (8,)),
        ("vox_offset", "f4"), ("scl_slope", "f4"), ("scl_inter", "f4"), ("slice_end", "i2"),
        ("slice_code", "u1"), ("xyzt_units", "u1"), ("cal_max", "f4"), ("cal_min", "f4"),
        ("slice_duration", "f4"), ("toffset", "f4"), ("glmax", "i4"), ("glmin", "i4"),
        ("descrip", "S80"), ("aux_file", "S24"), ("qform_code", "i2"), ("sform_code", "i2"),
        ("quatern_b", "f4"), ("quatern_c", "f4"), ("quatern_d", "f4"), ("qoffset_x", "f4"),
        ("qoffset_y", "f4"), ("qoffset_z", "f4"), ("srow_x", "f4", (4,)),
        ("srow_y", "f4", (4,)), ("srow_z", "f4", (4,)), ("intent_name", "S16"), ("magic", "S4"),
    ]
)  # fmt: skip
#: NIfTI datatype code -> numpy type (the plain numeric ones)
_DATATYPES = {
    2: "u1", 4: "i2", 8: "i4", 16: "f4", 64: "f8",
    256: "i1", 512: "u2", 768: "u4", 1024: "i8", 1280: "u8",
}  # fmt: skip
_XFORM_CODES = range(0, 6)


def _header(raw: bytes) -> tuple[np.void, str] | None:
    """``(header record, byte order)`` in the file's byte order, or ``None`` (not NIfTI-1)."""
    if len(raw) < HEADER_DTYPE.itemsize:
        return None
    for order in ("<", ">"):
        hdr = np.frombuffer(raw, HEADER_DTYPE.newbyteorder(order), count=1)[0]
        if int(hdr["sizeof_hdr"]) == 348:
            return hdr, order
    return None


def _plain(hdr: np.void) -> bool:
    """Whether nibabel would load ``hdr`` as it is (see the module docstring)."""
    ndim = int(hdr["dim"][0])
    pixdim = hdr["pixdim"]
    slope, inter = float(hdr["scl_slope"]), float(hdr["scl_inter"])
    return (
        bytes(hdr["magic"]) == b"n+1"
        and int(hdr["datatype"]) in _DATATYPES
        and int(hdr["bitpix"]) == 8 * np.dtype(_DATATYPES[int(hdr["datatype"])]).itemsize
        and 1 <= ndim <= 3
        and all(int(n) >= 1 for n in hdr["dim"][1 : ndim + 1])
        and float(pixdim[0]) in (-1.0, 0.0, 1.0)
        and all(float(p) >= 0 for p in pixdim[1:4])
        and int(hdr["qform_code"]) in _XFORM_CODES
        and int(hdr["sform_code"]) in _XFORM_CODES
        and float(hdr["vox_offset"]) >= 352
        and float(hdr["vox_offset"]) == int(hdr["vox_offset"])
        and (slope == 0 or not np.isfinite(slope) or np.isfinite(inter))
    )


def read_plain_nifti(path: str) -> tuple[np.void, np.ndarray, tuple[float, float]] | None:
    """``(header, data, (inter, slope))`` of a plain NIfTI-1 image of at most three axes.

    Args:
        path: ``.nii`` or ``.nii.gz`` file.

    Returns:
        The header record (fields as stored, read like nibabel's header), the unscaled voxel
        data ``[X, Y, Z]`` (first axes only, as stored; a read-only array), and the intensity
        scaling (``(0.0, 1.0)`` when ``scl_slope`` is 0 or not finite, as nibabel); or
        ``None`` for anything else (other files are nibabel's). ``OSError`` propagates.
    """
    opener = gzip.open if path.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read(HEADER_DTYPE.itemsize)
            found = _header(raw)
            if found is None or not _plain(found[0]):
                return None
            hdr, order = found
            ndim = int(hdr["dim"][0])
            shape = tuple(int(n) for n in hdr["dim"][1 : ndim + 1])
            dtype = np.dtype(_DATATYPES[int(hdr["datatype"])]).newbyteorder(order)
            f.seek(int(hdr["vox_offset"]))
            size = int(np.prod(shape)) * dtype.itemsize
            body = f.read(size)
    except (EOFError, gzip.BadGzipFile):
        return None  # truncated / corrupt: nibabel reports it
    if len(body) < size:
        return None
    data = np.frombuffer(body, dtype=dtype).reshape(shape, order="F")
    slope, inter = float(hdr["scl_slope"]), float(hdr["scl_inter"])
    if slope == 0 or not np.isfinite(slope):
        return hdr, data, (0.0, 1.0)
    return hdr, data, (inter, slope)
