"""Tractograms as plain numpy arrays (packed points + per-streamline vertex counts), torch-free.

The hard evaluation code (``invtract connectome``) only needs the vertices, not the
differentiable :class:`~invtract.streamlines.Streamlines` (which imports torch, about a second
of start-up). :func:`as_packed` accepts either, so library callers can pass what they have.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..arrays import to_numpy
from ..errors import FormatError, ShapeError

__all__ = ["Packed", "as_packed", "load_packed"]


@dataclass(frozen=True)
class Packed:
    """Streamlines stored packed, as numpy arrays.

    Attributes:
        points: ``[P, 3]`` float array of all vertices, scanner mm (RAS+), concatenated.
        lengths: ``[S]`` int64 number of vertices of each streamline (``P == lengths.sum()``).
    """

    points: np.ndarray
    lengths: np.ndarray

    def __len__(self) -> int:
        return int(self.lengths.shape[0])

    @property
    def first(self) -> np.ndarray:
        """``[S]`` index into ``points`` of each streamline's first vertex."""
        return np.cumsum(self.lengths) - self.lengths


def as_packed(streamlines) -> Packed:
    """``streamlines`` as :class:`Packed`.

    Args:
        streamlines: a :class:`Packed`, anything with ``points [P, 3]`` and ``lengths [S]``
            (e.g. :class:`~invtract.streamlines.Streamlines`; tensors are moved to numpy), or a
            sequence of ``[L_i, 3]`` arrays.

    Returns:
        :class:`Packed` (points keep their dtype; a list is packed as float64).

    Raises:
        ShapeError: points are not ``[P, 3]`` or the lengths do not add up to ``P``.
    """
    if isinstance(streamlines, Packed):
        return streamlines
    if hasattr(streamlines, "points") and hasattr(streamlines, "lengths"):
        points = to_numpy(streamlines.points)
        lengths = to_numpy(streamlines.lengths).astype(np.int64)
    elif isinstance(streamlines, Sequence) or isinstance(streamlines, np.ndarray):
        arrs = [np.asarray(to_numpy(s), dtype=np.float64).reshape(-1, 3) for s in streamlines]
        lengths = np.array([a.shape[0] for a in arrs], dtype=np.int64)
        points = np.concatenate(arrs, axis=0) if arrs else np.zeros((0, 3))
    else:
        raise ShapeError(
            "streamlines must be Streamlines, Packed or a sequence of [L, 3] arrays, "
            f"got {type(streamlines).__name__}"
        )
    if points.ndim != 2 or points.shape[1] != 3:
        raise ShapeError(f"points must be [P, 3], got {points.shape}")
    if lengths.ndim != 1 or int(lengths.sum()) != points.shape[0] or (lengths < 0).any():
        raise ShapeError(f"lengths must be [S] >= 0 adding up to {points.shape[0]} points")
    return Packed(points, lengths)


_TCK_DTYPES = {"Float32LE": "<f4", "Float32BE": ">f4", "Float64LE": "<f8", "Float64BE": ">f8"}


def _tck_body(path: str) -> Packed | None:
    """A well-formed ``.tck`` read straight into arrays; ``None`` when anything is unusual.

    The layout is MRtrix's (``src/dwi/tractography/file.h``): after the header, ``datatype``
    triplets from byte ``file: . OFFSET``, a NaN triplet after each streamline, an Inf triplet
    at the end. Files this does not recognise (other datatypes, a separate data file, a
    missing terminator, a count that differs from the header's) go through nibabel, whose
    reader gives the detailed error.
    """
    from ..io.tck_header import read_tck_header  # (no nibabel on this path)

    header = read_tck_header(path)
    dtype = _TCK_DTYPES.get(header.get("datatype", "").strip())
    where = header.get("file", "").split()
    if dtype is None or len(where) != 2 or where[0] != "." or not where[1].isdigit():
        return None
    raw = np.fromfile(path, dtype=dtype, offset=int(where[1]))
    raw = raw[: raw.size - raw.size % 3].reshape(-1, 3)
    end = np.flatnonzero(np.isinf(raw[:, 0]))
    if end.size == 0:
        return None
    raw = raw[: end[0]]
    delim = np.flatnonzero(np.isnan(raw[:, 0]))
    if (delim.size and delim[-1] != raw.shape[0] - 1) or (delim.size == 0 and raw.shape[0]):
        return None
    count = header.get("count", "").strip()
    if count.isdigit() and int(count) != delim.size:
        return None
    lengths = np.diff(np.concatenate([[-1], delim])) - 1
    keep = np.ones(raw.shape[0], dtype=bool)
    keep[delim] = False
    rows = np.ascontiguousarray(raw, dtype=np.float32).view("V12").ravel()  # 1 item per vertex
    points = rows[keep].view(np.float32).reshape(-1, 3)  # (a 1-D mask is ~20x faster)
    return Packed(points, lengths.astype(np.int64))


def load_packed(path: str | os.PathLike) -> Packed:
    """Load a tractogram (``.tck``, ``.trk``, ``.trx``) as float32 :class:`Packed`, without torch.

    Same points and checks as :func:`invtract.io.tractogram.load_tractogram` (header count,
    truncation, non-finite vertices): float32 scanner mm (RAS+). A well-formed ``.tck`` is
    read in one ``numpy.fromfile`` (a whole-brain file in milliseconds); everything else
    through the readers of :mod:`invtract.io.tractogram`.

    Raises:
        FormatError: missing, unknown, malformed or truncated file; non-finite coordinates.
    """
    from ..io.tck_header import check_readable

    path = str(path)
    suffix = check_readable(path)
    packed = _tck_body(path) if suffix == ".tck" else None
    if packed is None:
        from ..io import tractogram as io

        lines = io._load_trx(path) if suffix == ".trx" else io._load_nibabel(path, suffix)
        lengths = np.fromiter((len(s) for s in lines), dtype=np.int64, count=len(lines))
        points = np.concatenate(lines) if lines else np.zeros((0, 3))
        packed = Packed(points.astype(np.float32).reshape(-1, 3), lengths)
    if np.isfinite(packed.points.ravel()).all():  # (a reduction over rows of 3 is 20x slower)
        return packed
    bad = ~np.isfinite(packed.points).all(axis=1)
    if bad.any():
        raise FormatError(
            f"{path}: tractogram contains {int(bad.sum())} vertices with non-finite coordinates"
        )
    return packed
