"""Tractogram files (``.tck``, ``.trk``, ``.trx``) <-> :class:`~invtract.streamlines.Streamlines`.

Points are always float32 scanner mm (RAS+), as ``.tck`` stores them. ``.trk`` files are
converted to RAS+ mm by nibabel (``Tractogram.to_world``); ``.trx`` stores RAS+ mm positions.
``ArraySequence`` and nibabel/trx objects never leave this module.

Convention: ``.tck`` layout of MRtrix3 ``src/dwi/tractography/file.h`` / ``file_base.h``
(spec section 7.2): text header from ``mrtrix tracks`` to ``END`` with ``key: value`` lines
(repeated keys for multi-line values), ``file: . OFFSET``, then float32 LE triplets with a NaN
triplet after each streamline and an Inf triplet at the end.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from ..arrays import to_numpy
from ..errors import FormatError, InvtractError
from .image import Image
from .mif import atomic_output
from .tck_header import _TCK_MAGIC, TRACTOGRAM_SUFFIXES
from .tck_header import check_readable as _check_readable
from .tck_header import read_tck_header as _read_tck_header
from .tck_header import tractogram_suffix as _suffix
from .tractogram_meta import trk_header_fields, trx_group_fields, trx_header_fields

if TYPE_CHECKING:  # annotations only
    from ..streamlines import Streamlines


class PackedLike(Protocol):
    """Anything holding packed streamlines: ``points`` ``[P, 3]`` and ``lengths`` ``[S]``."""

    points: object
    lengths: object


__all__ = [
    "TRACTOGRAM_SUFFIXES",
    "load_tractogram",
    "load_tractogram_header",
    "save_tractogram",
    "TckStream",
    "stream_tck",
]

#: Keys written by the writer itself; user values for them are ignored.
_TCK_RESERVED = ("count", "datatype", "file")


def _trx_module():
    try:
        from trx import trx_file_memmap
    except ImportError as err:  # pragma: no cover - trx-python is a declared dependency
        raise FormatError(
            ".trx support needs trx-python (pip install trx-python); "
            "convert to .tck with `tff_convert_tractogram` otherwise"
        ) from err
    return trx_file_memmap


def load_tractogram(path: str | os.PathLike, reference: Image | None = None) -> Streamlines:
    """Load a tractogram as packed float32 streamlines in scanner mm (RAS+).

    An empty tractogram (valid header, no streamlines) loads as an empty :class:`Streamlines`;
    callers decide whether that is an error.

    Args:
        path: ``.tck``, ``.trk`` or ``.trx`` file.
        reference: unused for these formats (all three carry world coordinates / their own
            grid); accepted for API symmetry with :func:`save_tractogram`.

    Returns:
        :class:`Streamlines` on CPU with float32 ``points`` ``[P, 3]`` (scanner mm).

    Raises:
        FormatError: missing file, unknown extension, malformed or truncated file (no magic
            number, no END, missing delimiter, header ``count`` larger than the data),
            non-finite coordinates. The message includes the path.
    """
    from ..streamlines import Streamlines

    del reference
    path = str(path)
    suffix = _check_readable(path)
    if suffix == ".trx":
        lines = _load_trx(path)
    else:
        lines = _load_nibabel(path, suffix)
    if len(lines) == 0:
        return Streamlines.empty()
    sl = Streamlines.from_list(lines)
    if not bool(np.isfinite(sl.points.numpy()).all()):
        bad = np.flatnonzero(~np.isfinite(sl.points.numpy()).all(axis=1))
        raise FormatError(
            f"{path}: tractogram contains {bad.size} vertices with non-finite coordinates"
        )
    return sl


def _load_nibabel(path: str, suffix: str) -> list[np.ndarray]:
    import nibabel as nib  # here: writing a .tck (invtract track) never imports nibabel
    from nibabel.streamlines.tractogram_file import DataError, HeaderError

    try:
        tfile = nib.streamlines.load(path)
        streamlines = tfile.streamlines  # RAS+ mm (to_world applied by nibabel)
        lines = [np.asarray(s, dtype=np.float32) for s in streamlines]
    except (HeaderError, DataError) as err:
        raise FormatError(f"{path}: malformed {suffix} file ({err})") from err
    except (ValueError, OSError, EOFError, UnicodeDecodeError, KeyError) as err:
        raise FormatError(
            f"{path}: cannot read {suffix} file ({type(err).__name__}: {err})"
        ) from err
    if suffix == ".tck":
        count = tfile.header.get("count")
        if count is not None:
            try:
                expected = int(str(count).strip())
            except ValueError:
                expected = None
            if expected is not None and expected != len(lines):
                raise FormatError(
                    f"{path}: header says count: {expected} but the file holds {len(lines)} "
                    "streamlines (truncated or still being written?)"
                )
    return lines


def _load_trx(path: str) -> list[np.ndarray]:
    tmm = _trx_module()
    try:
        trx = tmm.load(path)
    except Exception as err:  # trx-python raises assorted types on bad input
        raise FormatError(f"{path}: cannot read .trx file ({type(err).__name__}: {err})") from err
    try:
        seq = trx.streamlines
        lines = [np.array(s, dtype=np.float32) for s in seq]
    finally:
        trx.close()
    return lines


# --------------------------------------------------------------------------------------------
# headers


def load_tractogram_header(path: str | os.PathLike) -> dict[str, str]:
    """Header key/values of a tractogram file, as strings.

    For ``.tck`` these are MRtrix's own keys (``step_size``, ``max_angle``, ``threshold``,
    ``min_dist``, ``max_dist``, ``init_direction``, ``count``, ``total_count``,
    ``command_history``, ``file``, ``datatype``, ...); repeated keys are joined with ``"\\n"``.
    For ``.trk`` the nibabel header fields are returned (``count`` = number of streamlines);
    for ``.trx`` the JSON header (``count`` = ``NB_STREAMLINES``).

    Args:
        path: tractogram file.

    Returns:
        ``dict[str, str]``.

    Raises:
        FormatError: missing file, unknown extension or malformed header.
    """
    path = str(path)
    suffix = _check_readable(path)
    if suffix == ".tck":
        return _read_tck_header(path)
    if suffix == ".trk":
        import nibabel as nib
        from nibabel.streamlines import Field
        from nibabel.streamlines.tractogram_file import DataError, HeaderError

        try:
            hdr = nib.streamlines.load(path, lazy_load=True).header
        except (HeaderError, DataError, ValueError, OSError, EOFError) as err:
            raise FormatError(f"{path}: malformed .trk file ({err})") from err
        out = {str(k): _to_str(v) for k, v in hdr.items() if not str(k).startswith("_")}
        out["count"] = str(int(hdr[Field.NB_STREAMLINES]))
        return out
    tmm = _trx_module()
    try:
        trx = tmm.load(path)
    except Exception as err:
        raise FormatError(f"{path}: cannot read .trx file ({type(err).__name__}: {err})") from err
    try:
        out = {str(k): _to_str(v) for k, v in trx.header.items()}
        out["count"] = str(int(trx.header["NB_STREAMLINES"]))
    finally:
        trx.close()
    return out


def _to_str(value) -> str:
    if isinstance(value, bytes):
        return value.decode("latin-1")
    if isinstance(value, np.ndarray):
        if value.dtype.kind == "S":
            return b"".join(value.ravel().tolist()).decode("latin-1").rstrip("\x00")
        return json.dumps(value.tolist())
    return str(value)


# --------------------------------------------------------------------------------------------
# writing


#: the keys of nibabel's ``TckFile.create_empty_header()`` (``Field.MAGIC_NUMBER``, ...), kept
#: here so that writing a ``.tck`` needs no nibabel import (0.06 s of ``invtract track``)
_MAGIC, _COUNT = "magic_number", "nb_streamlines"
_NOT_WRITTEN = {_MAGIC, _COUNT, "endianness", "voxel_to_rasmm"}


def _empty_tck_header() -> dict:
    """The header nibabel's ``_empty_tck_header()`` returns."""
    return {_MAGIC: _TCK_MAGIC, _COUNT: 0, "datatype": "Float32LE"}


def _write_tck_header(fileobj, header: dict) -> None:
    """Write an MRtrix-style ``.tck`` header (up to and including ``END``).

    nibabel's own header writer rejects values that contain ``:`` and cannot write multi-line
    values; MRtrix splits a key/value line at its first colon and writes one line per value
    line under the same key (e.g. ``command_history``). ``header`` is laid out as
    :func:`_empty_tck_header` (nibabel's keys); the body that follows is :func:`_tck_body`'s.
    """
    lines = [f"count: {header[_COUNT]:010}", "datatype: Float32LE"]
    for key, value in header.items():
        if key in _NOT_WRITTEN or key in _TCK_RESERVED or str(key).startswith("_"):
            continue
        for part in str(value).split("\n"):
            lines.append(f"{key}: {part}")
    text = header[_MAGIC] + b"\n" + "\n".join(lines).encode("utf-8")
    # Data offset: the header plus "\nfile: . <offset>\nEND\n" (offset digits included).
    offset = len(text) + len(b"\nfile: . \nEND\n")
    while offset != len(text) + len(f"\nfile: . {offset}\nEND\n".encode()):
        offset = len(text) + len(f"\nfile: . {offset}\nEND\n".encode())
    fileobj.write(text)
    fileobj.write(f"\nfile: . {offset}\nEND\n".encode())


def _tck_body(points: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """``[P + S, 3]`` float32 LE: each streamline's vertices followed by a NaN triplet (the
    body nibabel's ``TckFile.save`` writes streamline by streamline, without the Inf end)."""
    body = np.empty((points.shape[0] + lengths.size, 3), dtype="<f4")
    delimiters = np.cumsum(lengths + 1) - 1
    is_point = np.ones(body.shape[0], dtype=bool)
    is_point[delimiters] = False
    body[is_point] = points
    body[delimiters] = np.nan
    return body


def _write_tck(path: str, points: np.ndarray, lengths: np.ndarray, header: dict) -> None:
    """Write a complete ``.tck``: the header (:func:`_write_tck_header`), the body
    (:func:`_tck_body`) and the Inf triplet that ends it."""
    full = _empty_tck_header()
    full.update(header)
    full[_COUNT] = int(lengths.size)
    with open(path, "wb") as f:
        _write_tck_header(f, full)
        f.write(_tck_body(points, lengths).tobytes())
        f.write(np.full(3, np.inf, "<f4").tobytes())


#: width of the header values a :class:`TckStream` fills in when it closes
_LATE_WIDTH = 20


class TckStream:
    """A ``.tck`` being written chunk by chunk (made by :func:`stream_tck`).

    Attributes:
        count: streamlines written so far.
        vertices: vertices written so far.
        late: values of the header keys filled in at the end (``late_keys`` of
            :func:`stream_tck`).
    """

    def __init__(self, f, header: dict[str, str], late: tuple[str, ...]) -> None:
        self._f = f
        self.count = 0
        self.vertices = 0
        self.late: dict[str, str] = {}  # values of the late keys, written at the end
        full = _empty_tck_header()
        full.update({k: v for k, v in header.items() if k not in late})
        for key in late:  # blank now, filled in place at the end (same width)
            full[key] = "0".ljust(_LATE_WIDTH)
        full[_COUNT] = 0
        _write_tck_header(f, full)
        text = self._read_back_header()
        self._slots = {"count": _value_slot(text, "count", 10)}
        self._slots.update({k: _value_slot(text, k, _LATE_WIDTH) for k in late})

    def _read_back_header(self) -> bytes:
        end = self._f.tell()
        self._f.seek(0)
        text = self._f.read(end)
        self._f.seek(end)
        return text

    def write(self, points: np.ndarray, lengths: np.ndarray) -> None:
        """Append packed streamlines: ``points`` ``[P, 3]`` scanner mm, ``lengths`` ``[S]``."""
        points = np.asarray(points, dtype=np.float32).reshape(-1, 3)
        lengths = np.asarray(lengths, dtype=np.int64).reshape(-1)
        if int(lengths.sum()) != points.shape[0]:
            raise InvtractError(f"{points.shape[0]} points but lengths sum to {lengths.sum()}")
        ends = np.cumsum(lengths)
        for s0 in range(0, lengths.size, 1024):  # in slices: a few MB of body at a time
            s1 = min(lengths.size, s0 + 1024)
            p0, p1 = (ends[s0 - 1] if s0 else 0), ends[s1 - 1]
            body = _tck_body(points[p0:p1], lengths[s0:s1])
            self._f.write(memoryview(body).cast("B"))  # no bytes copy
        self.count += int(lengths.size)
        self.vertices += int(points.shape[0])

    def _finish(self, late: dict[str, str]) -> None:
        self._f.write(np.full(3, np.inf, "<f4").tobytes())
        values = {"count": f"{self.count:010d}"}
        for key, (_, width) in self._slots.items():
            if key != "count":
                values[key] = str(late.get(key, "0")).ljust(width)
        for key, value in values.items():
            at, width = self._slots[key]
            if len(value) != width:
                raise InvtractError(f".tck header value {key}={value!r} too long")
            self._f.seek(at)
            self._f.write(value.encode())
        self._f.flush()


def _value_slot(text: bytes, key: str, width: int) -> tuple[int, int]:
    """Byte offset and width of ``key``'s value in a written header."""
    marker = f"\n{key}: ".encode()
    at = text.index(marker) + len(marker)
    return at, width


@contextlib.contextmanager
def stream_tck(
    path: str | os.PathLike,
    header: dict[str, str] | None = None,
    overwrite: bool = False,
    late_keys: tuple[str, ...] = (),
) -> Iterator[TckStream]:
    """Write a ``.tck`` in chunks, as tckgen does: memory does not grow with the streamlines.

    The header is written first with a zero ``count``; :meth:`TckStream.write` appends
    streamlines; on leaving the block the Inf terminator is written, ``count`` is set in place,
    and the file (written under a temporary name in the same folder) is renamed onto ``path``.
    If the block raises (or is interrupted), the temporary file is removed and nothing is left
    at ``path``.

    Args:
        path: output ``.tck``.
        header: header entries (see :func:`save_tractogram`).
        overwrite: replace an existing file.
        late_keys: header keys whose values are known only at the end (e.g. ``total_count``):
            set ``stream.late[key]`` before the block ends; written space-padded to
            20 characters (MRtrix and nibabel strip the padding).

    Yields:
        :class:`TckStream`.
    """
    path = str(path)
    if _suffix(path) != ".tck":
        raise FormatError(f"{path}: stream_tck writes .tck only")
    _check_writable(path, overwrite)
    tck_header = _validate_header(header)
    with atomic_output(path, suffix=".tck") as tmp, open(tmp, "w+b") as f:
        stream = TckStream(f, tck_header, tuple(late_keys))
        yield stream
        stream._finish(stream.late)


def _check_writable(path: str, overwrite: bool) -> None:
    if os.path.lexists(path) and not overwrite:
        raise InvtractError(f"{path}: output exists (use overwrite=True / -f to replace it)")
    if not Path(path).parent.is_dir():
        raise InvtractError(f"{path}: output folder does not exist")


def _validate_header(header: dict[str, str] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in (header or {}).items():
        key = str(key)
        if not key or ":" in key or "\n" in key or key != key.strip() or key.startswith("_"):
            raise InvtractError(f"invalid .tck header key {key!r}")
        if key in _TCK_RESERVED:
            continue
        out[key] = str(value)
    return out


def _reference_grid(reference: Image | str | os.PathLike | None, path: str):
    if reference is None:
        raise InvtractError(
            f"{path}: saving .trk/.trx needs a reference image (the grid: affine and shape)"
        )
    if not isinstance(reference, Image):
        from .image import load_image

        reference = load_image(reference)
    affine = np.asarray(reference.affine, dtype=np.float64)
    shape = tuple(int(s) for s in reference.shape[:3])
    zooms = tuple(float(z) for z in reference.voxel_sizes)
    return affine, shape, zooms


def save_tractogram(
    path: str | os.PathLike,
    streamlines: Streamlines | PackedLike,
    header: dict[str, str] | None = None,
    reference: Image | str | os.PathLike | None = None,
    overwrite: bool = False,
    data_per_streamline: dict | None = None,
) -> None:
    """Write streamlines (scanner mm, RAS+) to ``.tck``, ``.trk`` or ``.trx``.

    The file is written under a temporary name in the same folder and moved into place with
    ``os.replace`` only when complete, so an interrupted write leaves nothing at ``path``.

    Args:
        path: output file; the extension selects the format.
        streamlines: streamlines to write: a :class:`Streamlines`, or any object with packed
            ``points`` ``[P, 3]`` and ``lengths`` ``[S]`` (numpy arrays or tensors; detached
            and moved to CPU as float32).
        header: ``.tck`` only: extra header entries under these exact MRtrix names
            (``step_size``, ``max_angle``, ``threshold``, ``min_dist``, ``max_dist``,
            ``init_direction``, ``total_count``, ...); multi-line values become repeated keys.
            ``count`` is always the number of streamlines written. ``.trk`` / ``.trx`` keep
            the same entries (:mod:`invtract.io.tractogram_meta`).
        reference: image (or image file) defining the voxel grid; required for ``.trk`` and
            ``.trx``, ignored for ``.tck``.
        overwrite: replace an existing file.
        data_per_streamline: ``.trk`` / ``.trx`` only: ``{name: [S, k] array}`` (e.g.
            :func:`~invtract.io.tractogram_meta.per_streamline_seeds`).

    Raises:
        InvtractError: ``path`` exists and ``overwrite`` is False; ``.trk``/``.trx`` without
            ``reference``; invalid header key.
        FormatError: unknown extension; trx-python missing.
    """
    path = str(path)
    suffix = _suffix(path)
    if suffix not in TRACTOGRAM_SUFFIXES:
        raise FormatError(
            f"{path}: unknown tractogram extension {suffix or '(none)'!r}; "
            f"supported: {', '.join(TRACTOGRAM_SUFFIXES)}"
        )
    _check_writable(path, overwrite)
    points = np.ascontiguousarray(to_numpy(streamlines.points), dtype=np.float32)
    lengths = to_numpy(streamlines.lengths).astype(np.int64)

    if suffix == ".tck":
        tck_header = _validate_header(header)
        with atomic_output(path, suffix=".tck") as tmp:
            _write_tck(tmp, points, lengths, tck_header)
        return

    import nibabel as nib
    from nibabel.streamlines import Field, Tractogram

    ends = np.cumsum(lengths)
    lines = np.split(points, ends[:-1]) if lengths.size else []
    tractogram = Tractogram(
        lines, affine_to_rasmm=np.eye(4), data_per_streamline=data_per_streamline or {}
    )

    affine, shape, zooms = _reference_grid(reference, path)
    if suffix == ".trk":
        trk_header = {
            Field.VOXEL_TO_RASMM: affine,
            Field.DIMENSIONS: shape,
            Field.VOXEL_SIZES: zooms,
            Field.VOXEL_ORDER: "".join(nib.aff2axcodes(affine)),
            **trk_header_fields(header),
        }
        with atomic_output(path, suffix=".trk") as tmp:
            nib.streamlines.TrkFile(tractogram, header=trk_header).save(tmp)
        return

    tmm = _trx_module()
    ref_header = nib.Nifti1Header()
    ref_header.set_data_shape(shape)
    ref_header.set_zooms(zooms)
    ref_header.set_sform(affine, code=1)
    ref_header.set_qform(affine, code=1)
    trx = tmm.TrxFile.from_tractogram(tractogram, ref_header)
    trx.header.update(trx_header_fields(header))
    groups, dpg = trx_group_fields(header, int(lengths.size))
    trx.groups.update(groups)
    trx.data_per_group.update(dpg)
    try:
        with atomic_output(path, suffix=".trx") as tmp:
            tmm.save(trx, tmp)
    finally:
        trx.close()
