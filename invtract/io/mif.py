"""A small reader/writer for the MRtrix3 image format (``.mif``, ``.mih`` + data, ``.mif.gz``).

Format (MRtrix3 ``docs/getting_started/image_data.rst``, ``core/formats/mrtrix_utils.{h,cpp}``):
a text header that starts with the line ``mrtrix image`` and ends with ``END``, made of
``key: value`` lines. Compulsory keys: ``dim``, ``vox``, ``layout``, ``datatype`` and ``file``;
optional ``transform`` (three rows of the 3x4 image->scanner transform with unit-norm columns)
and ``scaling`` (``offset,scale``: value = offset + scale * stored). Everything after ``#`` on a
header line is a comment. ``file: . OFFSET`` means the data follow in the same file at byte
OFFSET; ``file: name [OFFSET]`` points to a separate file (relative to the header's folder).

Voxel order of the returned array. ``layout`` gives, per axis, the rank of its stride (0 =
fastest in memory) and a sign (``-`` = stored in decreasing index order). The returned
**spatial** axes are in *storage* order (fastest spatial axis first, each traversed in storage
direction) with the affine adjusted to match -- exactly what nibabel reports for the image
after ``mrconvert x.mif x.nii``. Non-spatial axes (volumes) are returned in their logical
index order (so SH coefficient k is volume k whatever the stored layout).

Convention: MRtrix3 ``core/formats/mrtrix_utils.h`` (``read_mrtrix_header``), ``parse_axes``
and ``get_mrtrix_file_path``; bit-packed data are most-significant-bit first
(``core/image_io/fetch_store.cpp``); a missing transform defaults to the identity rotation
centred on the image (``Header`` sanitising).
"""

from __future__ import annotations

import gzip
import os
import re
from dataclasses import dataclass, field

import numpy as np

from ..errors import FormatError
from .atomic import atomic_output

__all__ = ["MifHeader", "read_mif", "read_mif_header", "write_mif", "MIF_SUFFIXES"]

MIF_SUFFIXES = (".mif", ".mih", ".mif.gz")

_MAGIC = "mrtrix image"

# name (lower case, without byte order) -> numpy kind/size; byte order appended separately.
_DTYPES = {
    "int8": "i1",
    "uint8": "u1",
    "int16": "i2",
    "uint16": "u2",
    "int32": "i4",
    "uint32": "u4",
    "int64": "i8",
    "uint64": "u8",
    "float32": "f4",
    "float64": "f8",
}


@dataclass
class MifHeader:
    """Parsed MRtrix image header (all axes in the header's own logical order).

    Attributes:
        dim: size of each axis.
        vox: voxel size of each axis (mm for the spatial axes).
        layout: signed stride rank per axis (``+0`` fastest), as parsed from ``layout``.
        datatype: the ``datatype`` string as written (e.g. ``Float32LE``, ``Bit``).
        transform: ``[3, 4]`` image->scanner transform (unit-norm columns; mm translation).
        scaling: ``(offset, scale)``.
        data_file: path of the file holding the data.
        offset: byte offset of the data in ``data_file``.
        keyval: all other keys (repeated keys joined with newlines).
    """

    dim: list[int]
    vox: list[float]
    layout: list[int]
    datatype: str
    transform: np.ndarray
    scaling: tuple[float, float] = (0.0, 1.0)
    data_file: str = ""
    offset: int = 0
    keyval: dict[str, str] = field(default_factory=dict)


def _is_gz(path: str) -> bool:
    return path.lower().endswith(".gz")


def _read_header_lines(path: str) -> tuple[list[str], bytes | None]:
    """Header lines between magic and END, plus (for .gz) the whole decompressed file."""
    if _is_gz(path):
        try:
            with gzip.open(path, "rb") as f:
                blob = f.read()
        except (OSError, EOFError) as err:
            raise FormatError(f"{path}: cannot decompress MRtrix image ({err})") from err
        stream_lines = iter(blob.splitlines(keepends=True))
    else:
        blob = None
        try:
            fh = open(path, "rb")  # noqa: SIM115 - closed below
        except OSError as err:
            raise FormatError(f"{path}: cannot open MRtrix image ({err})") from err
        stream_lines = fh
    lines: list[str] = []
    try:
        first = next(stream_lines, b"")
        if first.rstrip(b"\r\n").decode("latin-1").strip() != _MAGIC:
            raise FormatError(
                f"{path}: not an MRtrix image (first line must be {_MAGIC!r}, got {first[:40]!r})"
            )
        found_end = False
        for raw in stream_lines:
            line = raw.decode("utf-8", errors="replace")
            line = line.split("#", 1)[0].strip()
            if line == "END":
                found_end = True
                break
            lines.append(line)
        if not found_end and not path.lower().endswith(".mih"):  # .mih may end at EOF
            raise FormatError(f"{path}: MRtrix header has no END line (truncated?)")
    finally:
        if blob is None:
            fh.close()
    return lines, blob


def _parse_floats(text: str, key: str, path: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",")]
    except ValueError as err:
        raise FormatError(f"{path}: invalid {key!r} entry {text!r}") from err


def _parse_layout(spec: str, ndim: int, path: str) -> list[int]:
    """``+0,-1,+2`` -> ranks with signs encoded as +-(rank+1)."""
    parts = spec.split(",")
    out = []
    for part in parts:
        m = re.fullmatch(r"\s*([+-]?)(\d+)\s*", part)
        if m is None:
            raise FormatError(f"{path}: malformed layout specification {spec!r}")
        rank = int(m.group(2)) + 1
        out.append(-rank if m.group(1) == "-" else rank)
    if len(out) != ndim:
        raise FormatError(f"{path}: layout {spec!r} has {len(out)} axes but dim has {ndim}")
    if sorted(abs(v) for v in out) != list(range(1, ndim + 1)):
        raise FormatError(f"{path}: layout {spec!r} is not a permutation of 0..{ndim - 1}")
    return out


def read_mif_header(path: str | os.PathLike) -> MifHeader:
    """Parse the header of an MRtrix image.

    Args:
        path: ``.mif``, ``.mih`` or ``.mif.gz`` file.

    Returns:
        The parsed :class:`MifHeader` (axes in the header's logical order).

    Raises:
        FormatError: missing/unreadable file, no ``mrtrix image`` magic, missing END or a
            missing/invalid compulsory key. The message names the file.
    """
    header, _ = _parse(str(path))
    return header


def _parse(path: str) -> tuple[MifHeader, bytes | None]:
    if not os.path.isfile(path):
        raise FormatError(f"{path}: no such file")
    lines, blob = _read_header_lines(path)
    keyval: dict[str, list[str]] = {}
    transform_rows: list[list[float]] = []
    for line in lines:
        if not line:
            continue
        if ":" not in line:
            continue  # MRtrix ignores malformed key/value lines (INFO message)
        key, value = (s.strip() for s in line.split(":", 1))
        if not key or not value:
            continue
        if key.lower() == "transform":
            transform_rows.append(_parse_floats(value, "transform", path))
        else:
            keyval.setdefault(key.lower() if key.lower() in _COMPULSORY else key, []).append(value)

    def need(key: str) -> str:
        if key not in keyval:
            raise FormatError(f"{path}: missing {key!r} specification in MRtrix image header")
        return keyval.pop(key)[0]

    try:
        dim = [int(x) for x in need("dim").split(",")]
    except ValueError as err:
        raise FormatError(f"{path}: invalid 'dim' entry") from err
    if any(d < 1 for d in dim):
        raise FormatError(f"{path}: invalid dimensions {dim}")
    ndim = len(dim)
    vox = _parse_floats(need("vox"), "vox", path)
    if len(vox) < min(3, ndim) or any(v < 0 for v in vox):
        raise FormatError(f"{path}: invalid 'vox' entry {vox}")
    vox = (vox + [1.0] * ndim)[:ndim]
    datatype = need("datatype")
    _numpy_dtype(datatype, path)  # validate early
    layout = _parse_layout(need("layout"), ndim, path)
    scaling = (0.0, 1.0)
    if "scaling" in keyval:
        sc = _parse_floats(keyval.pop("scaling")[0], "scaling", path)
        if len(sc) != 2:
            raise FormatError(f"{path}: invalid 'scaling' entry (need offset,scale)")
        scaling = (sc[0], sc[1])

    transform = _default_transform(dim, vox)
    if transform_rows:
        if len(transform_rows) < 3 or any(len(r) != 4 for r in transform_rows[:3]):
            raise FormatError(f"{path}: invalid 'transform' specification (need 3 rows of 4)")
        transform = np.asarray(transform_rows[:3], dtype=np.float64)
        if not np.all(np.isfinite(transform)):
            # MRtrix resets it to the default with a warning; its grid would then be unrelated
            # to the scanner space of the seeds and tracks, so it is an error here.
            raise FormatError(f"{path}: 'transform' has NaN or infinite entries")

    file_spec = need("file").split()
    fname = file_spec[0]
    try:
        offset = int(file_spec[1]) if len(file_spec) > 1 else 0
    except ValueError as err:
        raise FormatError(f"{path}: invalid data offset in 'file' entry") from err
    if fname == ".":
        if offset <= 0:
            raise FormatError(f"{path}: invalid offset for embedded MRtrix image data")
        data_file = path
    else:
        if blob is not None:
            raise FormatError(f"{path}: compressed .mif.gz must embed its data ('file: .')")
        data_file = fname if os.path.isabs(fname) else os.path.join(os.path.dirname(path), fname)
    header = MifHeader(
        dim=dim,
        vox=vox,
        layout=layout,
        datatype=datatype,
        transform=transform,
        scaling=scaling,
        data_file=data_file,
        offset=offset,
        keyval={k: "\n".join(v) for k, v in keyval.items()},
    )
    return header, blob


_COMPULSORY = ("dim", "vox", "layout", "datatype", "scaling", "file")


def _default_transform(dim: list[int], vox: list[float]) -> np.ndarray:
    """Identity rotation with the image centred on the scanner origin (MRtrix default)."""
    t = np.zeros((3, 4), dtype=np.float64)
    t[:3, :3] = np.eye(3)
    for a in range(min(3, len(dim))):
        t[a, 3] = -0.5 * (dim[a] - 1) * vox[a]
    return t


def _numpy_dtype(datatype: str, path: str) -> np.dtype | None:
    """numpy dtype for an MRtrix datatype string; ``None`` for ``Bit``."""
    name = datatype.strip().lower()
    if name == "bit":
        return None
    order = "<"
    if name.endswith("le"):
        name = name[:-2]
    elif name.endswith("be"):
        name, order = name[:-2], ">"
    else:
        order = "="
    if name not in _DTYPES:
        raise FormatError(
            f"{path}: unsupported MRtrix datatype {datatype!r} (supported: Bit, "
            "Int8/UInt8, Int16/32/64, UInt16/32/64, Float32, Float64, with LE/BE suffix)"
        )
    return np.dtype(order + _DTYPES[name])


def read_mif(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, tuple, MifHeader]:
    """Read an MRtrix image.

    Uncompressed data in native byte order are memory-mapped copy-on-write (nothing is read
    until used; writes to the array never reach the file) and returned as a view in the order
    described below, without a copy; ``.mif.gz``, ``Bit`` and byte-swapped data are read into
    memory.

    Args:
        path: ``.mif``, ``.mih`` (with its data file) or ``.mif.gz``.

    Returns:
        ``(data, affine, voxel_sizes, header)``: ``data`` with its stored dtype (``bool`` for
        ``Bit``) and **no** intensity scaling applied (see ``header.scaling``), spatial axes in
        storage order (see module docstring); ``affine`` ``[4, 4]`` float64 voxel index ->
        scanner mm (RAS+) for that order; ``voxel_sizes`` the three spatial voxel sizes (mm)
        in that order; ``header`` the raw parsed header.

    Raises:
        FormatError: malformed header, unsupported datatype or truncated data (names the file).
    """
    path = str(path)
    header, blob = _parse(path)
    dim = header.dim
    n = int(np.prod(dim, dtype=np.int64))
    dtype = _numpy_dtype(header.datatype, path)
    if blob is None and dtype is not None and dtype.isnative:
        flat = _map_data(path, header, dtype, n)
    else:
        flat = _read_data(path, header, blob, dtype, n)
    data, affine, voxel_sizes = _to_storage_order(flat, header)
    return data, affine, voxel_sizes, header


def _map_data(path: str, header: MifHeader, dtype: np.dtype, n: int) -> np.ndarray:
    """The data as a copy-on-write memory map: nothing is read until used, pages are shared
    with the page cache, and writes stay private to the process (the file is never changed)."""
    need = header.offset + n * dtype.itemsize
    try:
        size = os.path.getsize(header.data_file)
    except OSError as err:
        raise FormatError(f"{path}: cannot read image data ({err})") from err
    if size < need:
        raise FormatError(
            f"{path}: image data truncated (need {n * dtype.itemsize} bytes at offset "
            f"{header.offset} of {header.data_file}, found {max(0, size - header.offset)})"
        )
    if n == 0:
        return np.zeros(0, dtype)
    return np.memmap(header.data_file, dtype=dtype, mode="c", offset=header.offset, shape=(n,))


def _read_data(path: str, header: MifHeader, blob, dtype, n: int) -> np.ndarray:
    """The data read into memory (gzip, bit-packed or non-native byte order)."""
    nbytes = (n + 7) // 8 if dtype is None else n * dtype.itemsize
    if blob is not None:
        buf = blob[header.offset : header.offset + nbytes]
    else:
        try:
            with open(header.data_file, "rb") as f:
                f.seek(header.offset)
                buf = f.read(nbytes)
        except OSError as err:
            raise FormatError(f"{path}: cannot read image data ({err})") from err
    if len(buf) < nbytes:
        raise FormatError(
            f"{path}: image data truncated (need {nbytes} bytes at offset {header.offset} "
            f"of {header.data_file}, found {len(buf)})"
        )
    if dtype is None:
        return np.unpackbits(np.frombuffer(buf, dtype=np.uint8), bitorder="big")[:n].astype(bool)
    return np.frombuffer(buf, dtype=dtype).astype(dtype.newbyteorder("="), copy=True)


def _to_storage_order(
    flat: np.ndarray, header: MifHeader
) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    dim, layout = header.dim, header.layout
    ndim = len(dim)
    ranks = [abs(v) - 1 for v in layout]
    # Axes ordered slowest -> fastest for a C-order reshape.
    slow_to_fast = sorted(range(ndim), key=lambda a: -ranks[a])
    arr = flat.reshape([dim[a] for a in slow_to_fast])
    # arr axis p holds logical axis slow_to_fast[p]; bring them to logical order.
    arr = np.transpose(arr, [slow_to_fast.index(a) for a in range(ndim)])
    # Now arr[..] is indexed by storage position along each logical axis.
    n_sp = min(3, ndim)
    # Non-spatial axes with a negative stride: storage position 0 is logical index n-1.
    for a in range(n_sp, ndim):
        if layout[a] < 0:
            arr = np.flip(arr, axis=a)
    # Spatial axes: storage order (fastest first), kept in storage direction.
    spatial = sorted(range(n_sp), key=lambda a: ranks[a])
    arr = np.transpose(arr, spatial + list(range(n_sp, ndim)))  # a view: no copy

    vox = np.asarray(header.vox, dtype=np.float64)
    t = header.transform
    cols = t[:, :3] * vox[None, :3] if n_sp == 3 else _pad_cols(t, vox, n_sp)
    affine = np.eye(4, dtype=np.float64)
    translation = t[:, 3].copy()
    for out_axis, a in enumerate(spatial):
        col = cols[:, a]
        if layout[a] < 0:
            translation += (dim[a] - 1) * col
            col = -col
        affine[:3, out_axis] = col
    affine[:3, 3] = translation
    voxel_sizes = tuple(float(vox[a]) for a in spatial)
    return arr, affine, voxel_sizes


def _pad_cols(t: np.ndarray, vox: np.ndarray, n_sp: int) -> np.ndarray:
    cols = t[:, :3].copy()
    cols[:, :n_sp] *= vox[None, :n_sp]
    return cols


def write_mif(
    path: str | os.PathLike,
    data: np.ndarray,
    affine: np.ndarray,
    keyval: dict[str, str] | None = None,
) -> None:
    """Write an MRtrix image (``.mif`` or ``.mif.gz``) atomically.

    Data are stored with layout ``+0,+1,+2,...`` (axis 0 fastest, all increasing) so the file's
    voxel order equals ``data``'s. ``bool`` data are stored as ``Bit``, floats as ``Float32LE``
    (``Float64LE`` for float64), integers with their own width, little-endian.

    Args:
        path: output file name ending in ``.mif`` or ``.mif.gz``.
        data: ``[X, Y, Z, ...]`` array.
        affine: ``[4, 4]`` voxel index -> scanner mm (RAS+).
        keyval: extra header entries (multi-line values become repeated keys).

    Raises:
        FormatError: unsupported suffix or dtype.
    """
    path = str(path)
    low = path.lower()
    if not (low.endswith(".mif") or low.endswith(".mif.gz")):
        raise FormatError(f"{path}: write_mif supports .mif and .mif.gz only")
    data = np.asarray(data)
    if data.ndim < 3:
        data = data.reshape(data.shape + (1,) * (3 - data.ndim))
    affine = np.asarray(affine, dtype=np.float64)
    vox = np.linalg.norm(affine[:3, :3], axis=0)
    if np.any(vox == 0) or not np.all(np.isfinite(affine)):
        raise FormatError(f"{path}: affine is singular or non-finite")
    rot = affine[:3, :3] / vox[None, :]

    if data.dtype == bool:
        dt_name, payload = "Bit", np.packbits(data.ravel(order="F"), bitorder="big").tobytes()
    else:
        kind = data.dtype.kind
        if kind == "f":
            out_dtype = np.dtype("<f8") if data.dtype.itemsize == 8 else np.dtype("<f4")
        elif kind in "iu":
            out_dtype = data.dtype.newbyteorder("<")
        else:
            raise FormatError(f"{path}: cannot store dtype {data.dtype} in MRtrix format")
        names = {v: k for k, v in _DTYPES.items()}
        base = names[out_dtype.str[1:]]
        dt_name = _CANON[base] + ("LE" if out_dtype.itemsize > 1 else "")
        payload = data.astype(out_dtype).ravel(order="F").tobytes()

    ndim = data.ndim
    vox_all = list(vox) + [1.0] * (ndim - 3)
    lines = [
        _MAGIC,
        "dim: " + ",".join(str(int(s)) for s in data.shape),
        "vox: " + ",".join(f"{v:.10g}" for v in vox_all),
        "layout: " + ",".join(f"+{a}" for a in range(ndim)),
        f"datatype: {dt_name}",
    ]
    for r in range(3):
        lines.append("transform: " + ", ".join(f"{x:.17g}" for x in (*rot[r], affine[r, 3])))
    for key, value in (keyval or {}).items():
        for v in str(value).split("\n"):
            lines.append(f"{key}: {v}")
    text = "\n".join(lines) + "\n"
    # offset must account for its own digits: iterate to a fixed point, align to 16 bytes.
    offset = 0
    while True:
        trailer = f"file: . {offset}\nEND\n"
        need = len(text.encode()) + len(trailer.encode())
        new = -(-need // 16) * 16
        if new == offset:
            break
        offset = new
    head = (text + trailer).encode()
    blob = head + b"\0" * (offset - len(head)) + payload
    _atomic_write_bytes(path, blob, gz=low.endswith(".gz"))


_CANON = {
    "int8": "Int8",
    "uint8": "UInt8",
    "int16": "Int16",
    "uint16": "UInt16",
    "int32": "Int32",
    "uint32": "UInt32",
    "int64": "Int64",
    "uint64": "UInt64",
    "float32": "Float32",
    "float64": "Float64",
}


def _atomic_write_bytes(path: str, blob: bytes, gz: bool = False) -> None:
    with atomic_output(path) as tmp:
        if gz:
            with gzip.open(tmp, "wb") as g:
                g.write(blob)
        else:
            with open(tmp, "wb") as f:
                f.write(blob)
