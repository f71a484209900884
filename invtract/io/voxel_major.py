"""4-D images in the tracker's layout -- MRtrix's voxel order, each voxel's K values
contiguous -- made in blocks, the result allocated once.

A NIfTI's voxels are read once, in blocks, straight into that layout.

A NIfTI stores its volumes one after the other (x fastest, then y, z, volume); the tracker
reads all K coefficients of a voxel at once and wants them contiguous (as MRtrix stores FODs,
layout ``+1,+2,+3,+0``), after MRtrix's axis realignment
(:meth:`invtract.io.geometry.MRtrixGeometry.reorient`).
Converting the whole memory-mapped file at once faults every file page into the process
(counted in its RSS) beside the full-size result, and numpy's transposing copy of a 4-D array
strides through memory badly. Here the result is allocated once and filled block by block
from the file through a small buffer:

* uncompressed ``.nii``: z-slabs (all volumes of a few slices: one strip per volume, read at
  its offset), so each block of the result is written once, contiguously (the result keeps
  the file's voxel order, volumes innermost);
* gzip'd ``.nii.gz`` (read sequentially: a gzip stream cannot seek backwards cheaply):
  groups of whole volumes in file order, about a fifth of the image at a time.

Intensity scaling is applied per block exactly as :func:`invtract.io.image.load_image` does
(``float32(raw * slope + inter)`` in double). Peak memory: the float32 result plus one block.
"""

from __future__ import annotations

import contextlib
import math
import mmap
from typing import TYPE_CHECKING

import numpy as np

from ..errors import FormatError
from .geometry import MRtrixGeometry

if TYPE_CHECKING:  # annotations only
    import nibabel as nib

__all__ = [
    "read_voxel_major",
    "copy_voxel_major",
    "is_voxel_major",
    "file_order_view",
    "scaled_float32",
    "empty_float32",
    "masked_voxel_values",
    "read_masked_volumes",
    "released_slabs",
    "memmap_of",
    "file_mapping",
]

#: Upper bound (bytes) of the read buffer (and of a slab) for an uncompressed file or a copy;
#: also at most an eighth of the image.
BLOCK_BYTES = 64 * 2**20
#: gzip'd files are read in this many groups of volumes (the result is swept once per group).
GZIP_PASSES = 5
#: Bytes asked of the file per read call (a gzip reader allocates a temporary of that size).
READ_BYTES = 4 * 2**20


def scaled_float32(raw: np.ndarray, scaling: tuple) -> np.ndarray:
    """``float32(inter + slope * raw)`` (double arithmetic, as MRtrix's scaled fetch); float32
    data with no scaling are returned as they are (no copy)."""
    inter, slope = scaling
    if slope != 1.0 or inter != 0.0:
        return (raw.astype(np.float64) * slope + inter).astype(np.float32)
    return raw.astype(np.float32, copy=False)


def empty_float32(shape: tuple) -> np.ndarray:
    """An uninitialised float32 array of ``shape`` (C order) in its own anonymous memory map,
    released with the array.

    Not ``np.empty``: numpy asks the kernel for transparent huge pages on large allocations,
    and where the kernel compacts memory on such a fault (``defrag = madvise``, the default)
    filling a 1.8 GB FOD took 6.7 s of CPU against 1.0 s with ordinary pages (shared 2-core
    VM); the tracker reads the FOD as well from 4 KiB pages (a mapped ``.mif`` has nothing
    else).
    """
    n = int(np.prod(shape, dtype=np.int64))
    if n * 4 < 2**21 or not hasattr(mmap, "MAP_ANONYMOUS"):  # small, or not a POSIX system
        return np.empty(shape, np.float32)
    buffer = mmap.mmap(-1, n * 4, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return np.frombuffer(buffer, np.float32, count=n).reshape(shape)


def is_voxel_major(data: np.ndarray) -> bool:
    """``[X, Y, Z, K]`` with each voxel's K values contiguous, voxels not overlapping, no axis
    reversed (any voxel order: the tracker reads such an array, e.g. a memory-mapped ``.mif``,
    in place)."""
    item = data.itemsize
    return (
        data.ndim == 4
        and (data.strides[3] == item or data.shape[3] == 1)
        and all(
            t >= item * data.shape[3] or n == 1 for t, n in zip(data.strides[:3], data.shape[:3])
        )
    )


def copy_voxel_major(src: np.ndarray, scaling: tuple = (0.0, 1.0)) -> np.ndarray:
    """A new float32 copy of ``src`` ``[X, Y, Z, K]`` stored as MRtrix stores FODs (``K``
    fastest, then x, y, z: :func:`is_voxel_major`) from any strides (e.g. a
    memory-mapped ``.mif`` stored volume by volume), scaled, made slab by slab along axis 2 so
    that no full-size temporary exists beside the result. The file pages of a memory-mapped
    ``src`` are released after each slab (they would otherwise all count in the process's
    resident memory beside the result)."""
    X, Y, Z, K = src.shape
    out = empty_float32((Z, Y, X, K)).transpose(2, 1, 0, 3)
    S = _slab_slices(X * Y * K * src.itemsize, Z)
    mapping = file_mapping(src)
    for z0 in range(0, Z, S):
        out[:, :, z0 : z0 + S] = scaled_float32(src[:, :, z0 : z0 + S], scaling)
        if mapping is not None:
            mapping.madvise(mmap.MADV_DONTNEED)  # read-only use: pages reload from the file
    return out


def memmap_of(arr) -> np.memmap | None:
    """The ``np.memmap`` that ``arr`` is (a view of), with a live mapping; else None."""
    while isinstance(arr, np.ndarray):
        if isinstance(arr, np.memmap) and isinstance(arr._mmap, mmap.mmap):
            return arr
        arr = arr.base
    return None


def file_mapping(arr: np.ndarray) -> mmap.mmap | None:
    """The ``mmap`` behind a (view of a) read-only-used ``np.memmap`` (:func:`memmap_of`), if
    the platform can release its pages."""
    m = memmap_of(arr) if hasattr(mmap, "MADV_DONTNEED") else None
    return None if m is None else m._mmap


def released_slabs(src: np.ndarray, spatial: bool = False):
    """Yield ``(index, axis)``: the slabs of ``src`` (about :data:`BLOCK_BYTES` each; the
    index tuple selects one) along its axis slowest in memory (among the first three with
    ``spatial``). When ``src`` is memory-mapped, the mapping's pages are released from the
    resident set after each slab is used (read-only use: they reload from the file if touched
    again), so reading the whole of it costs one slab of resident memory, not the file."""
    axes = src.ndim if not spatial else min(3, src.ndim)
    ax = int(np.argmax(np.abs(src.strides[:axes]))) if axes else 0
    n = src.shape[ax] if src.ndim else 1
    per = max(1, BLOCK_BYTES // max(1, src.nbytes // max(1, n)))
    mapping = file_mapping(src)
    for a in range(0, n, per):
        yield (slice(None),) * ax + (slice(a, min(n, a + per)),), ax
        if mapping is not None:
            mapping.madvise(mmap.MADV_DONTNEED)


def file_order_view(out: np.ndarray, geometry: MRtrixGeometry) -> np.ndarray:
    """The view of a realigned ``[X', Y', Z', K]`` array in the file's axis order and
    direction: the inverse of :meth:`MRtrixGeometry.reorient` (no copy)."""
    view = out
    for j in range(3):
        if geometry.flip[j]:
            view = np.flip(view, axis=j)
    inverse = [list(geometry.perm).index(a) for a in range(3)]
    return np.transpose(view, inverse + list(range(3, out.ndim)))


def _allocate(file_shape: tuple, geometry: MRtrixGeometry, scratch=False) -> np.ndarray:
    """A new float32 ``[X', Y', Z', K]`` array in realigned order, stored voxel by voxel with
    the *file's* axes as the memory order (its x fastest, z slowest, K innermost) and every
    stride positive: a slab of file slices is then one contiguous block of it (for an axial
    file, MRtrix's own FOD layout ``+1,+2,+3,+0``). ``scratch``: see :func:`read_voxel_major`."""
    from .scratch import scratch_or_memory

    X, Y, Z, K = file_shape
    if scratch is False:
        memory = empty_float32((Z, Y, X, K))  # memory axis 2 - a holds file axis a
    else:
        memory = scratch_or_memory((Z, Y, X, K), np.float32, scratch)
    return np.transpose(memory, [2 - p for p in geometry.perm] + [3])


def read_voxel_major(
    img: nib.Nifti1Image, geometry: MRtrixGeometry, scaling: tuple, path: str, scratch=False
) -> np.ndarray:
    """Read a 4-D NIfTI's voxels into a new float32 ``[X', Y', Z', K]`` array in the realigned
    (MRtrix) axis order, scaled.

    Args:
        img: the opened image (its data not read yet).
        geometry: :func:`invtract.io.geometry.realign` of the image's header.
        scaling: ``(inter, slope)``.
        path: the file, for error messages.
        scratch: True (the temporary folder) or a folder: a large result is a scratch array
            there (:func:`invtract.io.scratch.scratch_or_memory`), filled slab by slab with
            its pages released; a ``.nii.gz`` is then first unpacked into a temporary file
            there, so that it too is read in slabs, not in passes over the whole result.

    Returns:
        float32 ``[X', Y', Z', K]``, each voxel's K values contiguous, all strides positive,
        voxels in the file's storage order (:func:`is_voxel_major`).

    Raises:
        FormatError: the file ends before its data do.
    """
    from .scratch import is_scratch, release

    proxy = img.dataobj
    out = _allocate(tuple(int(s) for s in proxy.shape), geometry, scratch)
    dst = file_order_view(out, geometry)  # [X, Y, Z, K] in the file's order, writes into out
    from nibabel.openers import ImageOpener  # here: nibabel is only needed for 4-D NIfTIs

    gz = str(path).lower().endswith(".gz")
    with ImageOpener(proxy.file_like) as f:
        unpacked = _unpacked(f, scratch) if gz and is_scratch(out) else None
        if gz and unpacked is None:  # a gzip stream: passes over the whole result
            _fill_volume_groups(f, dst, proxy, scaling, path)
            return out
        with unpacked or contextlib.nullcontext(f) as raw:
            _fill_slabs(raw, dst, proxy, scaling, path, after=lambda: release(out))
    return out


def _unpacked(f, folder):
    """A temporary file (unlinked, in ``folder``; True: the temporary folder) holding the
    whole decompressed stream ``f``, or None (with a warning) when the folder has no room."""
    import logging
    import shutil
    import tempfile

    try:
        tmp = tempfile.TemporaryFile(dir=None if folder is True else folder)
        try:
            shutil.copyfileobj(f, tmp, READ_BYTES)
            tmp.flush()
        except BaseException:
            tmp.close()
            raise
    except OSError as err:
        logging.getLogger("invtract").warning(
            "could not unpack the image into a temporary file (%s): reading it in passes over "
            "the whole result instead (set TMPDIR to a folder with room)",
            err.strerror or err,
        )
        f.seek(0)
        return None
    return tmp


def _read_exact(f, buf: np.ndarray, path: str) -> None:
    view = memoryview(buf.reshape(-1)).cast("B")
    got = 0
    while got < view.nbytes:
        n = f.readinto(view[got : got + READ_BYTES])
        if not n:
            raise FormatError(
                f"{path}: NIfTI data truncated (file ends {view.nbytes - got} bytes early "
                "in a block)"
            )
        got += n


def _slab_slices(slice_bytes: int, Z: int) -> int:
    """Slices per slab: at most :data:`BLOCK_BYTES` and an eighth of the image (so that the
    buffer stays small beside a small image too), at least one."""
    budget = min(BLOCK_BYTES, slice_bytes * Z // 8)
    return max(1, min(Z, budget // max(1, slice_bytes)))


def _fill_slabs(f, dst: np.ndarray, proxy, scaling: tuple, path: str, after=None) -> None:
    """Uncompressed file: for each slab of ``S`` file z-slices, one strip per volume;
    ``after()`` after each slab, if given."""
    X, Y, Z, K = dst.shape
    item = proxy.dtype.itemsize
    slice_bytes = X * Y * item
    S = _slab_slices(K * slice_bytes, Z)
    buf = np.empty((K, S, Y, X), proxy.dtype)  # C order over reversed axes = the file's order
    for z0 in range(0, Z, S):
        z1 = min(Z, z0 + S)
        block = buf[:, : z1 - z0]
        for k in range(K):
            f.seek(int(proxy.offset) + (k * Z + z0) * slice_bytes)
            _read_exact(f, block[k], path)
        dst[:, :, z0:z1, :] = scaled_float32(block, scaling).transpose(3, 2, 1, 0)
        if after is not None:
            after()


def _fill_volume_groups(f, dst: np.ndarray, proxy, scaling: tuple, path: str) -> None:
    """Compressed file, read front to back (:func:`_chosen_volume_groups`: all of them)."""
    volumes = np.arange(dst.shape[3])
    for into, src in _chosen_volume_groups(f, proxy, volumes, path):
        dst[..., into] = scaled_float32(src, scaling).transpose(3, 2, 1, 0)


def _chosen_volume_groups(f, proxy, volumes: np.ndarray, path: str):
    """A compressed file's chosen volumes, read front to back in groups of ``G`` whole volumes
    (a fifth of the chosen ones): yields ``(into, raw [g, Z, Y, X])``, ``into`` the positions
    in ``volumes`` of the group's chosen volumes (a slice when the group is all chosen, in
    order), ``raw`` their values in the file's order (the buffer: use it before the next).
    Groups with no chosen volume are dropped; reading stops after the last chosen one."""
    X, Y, Z = (int(s) for s in proxy.shape[:3])
    G = max(1, math.ceil(volumes.size / GZIP_PASSES))
    buf = np.empty((G, Z, Y, X), proxy.dtype)
    f.seek(int(proxy.offset))
    end = int(volumes.max()) + 1 if volumes.size else 0
    for k0 in range(0, end, G):
        k1 = min(end, k0 + G)
        block = buf[: k1 - k0]
        _read_exact(f, block, path)
        into = np.flatnonzero((volumes >= k0) & (volumes < k1))
        if into.size == 0:
            continue
        group = np.arange(k0, k1)
        if np.array_equal(volumes[into], group) and np.array_equal(into, into[0] + group - k0):
            yield slice(into[0], into[0] + k1 - k0), block  # the whole group, in order
        else:
            yield into, block[volumes[into] - k0]


def read_masked_volumes(
    img: nib.Nifti1Image,
    geometry: MRtrixGeometry,
    scaling: tuple,
    path: str,
    volumes: np.ndarray,
    mask: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`masked_voxel_values` of a gzip'd 4-D NIfTI, read front to back once: only the
    chosen volumes at the voxels of ``mask`` (realigned ``[X', Y', Z']``) are kept, as
    ``[M, n]`` rows (M: the mask's voxels), never the whole grid.

    Returns:
        ``(values [U, n] float32, index [U] int64)``: rows of the voxels whose chosen values
        are all finite, in C order of the realigned grid, and their flat indices.
    """
    from nibabel.openers import ImageOpener  # here: nibabel is only needed for NIfTIs

    volumes = np.asarray(volumes, dtype=np.int64)
    real_index = np.arange(int(np.prod(geometry.shape)), dtype=np.int64).reshape(geometry.shape)
    file_index = file_order_view(real_index, geometry)  # [X, Y, Z] in the file's axes
    keep = None if mask is None else file_order_view(np.asarray(mask, bool), geometry)
    index = file_index.reshape(-1) if keep is None else file_index[keep]
    out = np.empty((index.size, volumes.size), np.float32)
    with ImageOpener(img.dataobj.file_like) as f:
        for into, raw in _chosen_volume_groups(f, img.dataobj, volumes, path):
            rows = raw.transpose(3, 2, 1, 0)  # [X, Y, Z, g], the file's axes
            rows = rows.reshape(-1, rows.shape[3]) if keep is None else rows[keep]
            out[:, into] = scaled_float32(rows, scaling)
    order = np.argsort(index, kind="stable")
    index, out = index[order], out[order]
    finite = np.isfinite(out).all(-1)
    return out[finite], index[finite]


def masked_voxel_values(
    src: np.ndarray,
    volumes: np.ndarray,
    mask: np.ndarray | None = None,
    scaling: tuple = (0.0, 1.0),
) -> tuple[np.ndarray, np.ndarray]:
    """``(values [U, n] float32, index [U] int64)``: ``src[..., volumes]`` (scaled by
    ``(inter, slope)``) at the voxels of ``src [X, Y, Z, N]`` inside ``mask [X, Y, Z]`` (all
    when None) whose ``n`` values are all finite, in C order of the grid; ``index`` holds
    their flat (C-order) indices.

    Read slab by slab along the spatial axis slowest in memory. The pages of a memory-mapped
    ``src`` (a ``.mif``) are released from the process's resident set after each slab, so the
    peak is the result plus one slab, not the image (e.g. a whole-brain DWI's shell over its
    brain mask: a quarter of the grid's voxels, a fraction of its volumes).
    """
    shape = tuple(int(s) for s in src.shape[:3])
    volumes = np.asarray(volumes, dtype=np.int64)
    values, index = [], []
    for sl, ax in released_slabs(src, spatial=True):
        block = scaled_float32(np.asarray(src[sl][..., volumes]), scaling)
        keep = np.isfinite(block).all(-1)
        if mask is not None:
            keep &= np.asarray(mask[sl], dtype=bool)
        pos = list(np.nonzero(keep))
        pos[ax] += sl[ax].start
        index.append(np.ravel_multi_index(pos, shape))
        values.append(block[keep])
        del block, keep
    index = np.concatenate(index)
    values = np.concatenate(values)
    if ax != 0:  # slabs across the C order: sort the rows back into it
        order = np.argsort(index, kind="stable")
        index, values = index[order], values[order]
    return values, index
