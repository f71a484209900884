"""Scratch arrays: large working copies kept in the page cache, not in the process's memory.

A whole-brain fit needs one C-ordered copy of the FOD (1.8 GB for HCP) but reads only the part
its streamlines pass through. :func:`scratch_array` puts that copy in a shared mapping of an
unlinked temporary file: pages the fit touches are resident, the rest stay in the page cache
(reclaimable, never swapped) and, once :func:`release` drops them from the process, do not
count in its resident set. This is how MRtrix3 reads images (memory-mapped). The file has no
name on disk: nothing is left behind however the process ends.

Writes go to the file through the page cache, so a page released after a write keeps the
written values (a shared mapping reloads the page cache's, up-to-date contents); that is what
makes releasing safe here and not on a copy-on-write mapping of an input file.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import tempfile

import numpy as np

__all__ = ["scratch_array", "scratch_or_memory", "is_scratch", "release"]

log = logging.getLogger("invtract")

#: arrays of at most this many bytes stay in memory (:func:`scratch_or_memory`)
SCRATCH_BYTES = 256 * 2**20


def scratch_array(shape: tuple, dtype, folder: str | os.PathLike | None = None) -> np.memmap:
    """A writable, zero-filled C-ordered array of ``shape`` and ``dtype`` in a shared mapping
    of an unlinked temporary file in ``folder`` (default: the system's temporary folder).

    The file's blocks are allocated up front, so a full disk is an ``OSError`` here, not a
    crash (``SIGBUS``) at the first write that finds no space.

    Raises:
        OSError: ``folder`` cannot hold the array (or cannot be written).
    """
    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    with tempfile.TemporaryFile(dir=folder) as f:  # the mapping keeps the file alive
        _allocate(f.fileno(), nbytes)
        return np.memmap(f, dtype=dtype, mode="w+", shape=tuple(shape))


def scratch_or_memory(shape: tuple, dtype, folder: bool | str | os.PathLike = True) -> np.ndarray:
    """A zero-filled array of ``shape`` and ``dtype``: in memory up to :data:`SCRATCH_BYTES`
    or with ``folder`` False, else a :func:`scratch_array` in ``folder`` (True: the system's
    temporary folder, ``TMPDIR``), or in memory when that folder cannot hold it (with a warning
    that says why and what to set)."""
    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    if folder is False or nbytes <= SCRATCH_BYTES:
        return np.zeros(shape, dtype)
    where = None if folder is True else folder
    try:
        return scratch_array(shape, dtype, where)
    except OSError as err:
        gb = nbytes / 1e9
        place = where or tempfile.gettempdir()
        log.warning(
            "no %.2f GB scratch file in %s (%s): kept in memory instead (set TMPDIR to a folder "
            "with room)", gb, place, err.strerror or err,
        )  # fmt: skip
        return np.zeros(shape, dtype)


def _allocate(fd: int, nbytes: int) -> None:
    """Reserve ``nbytes`` of disk for the file ``fd`` (where the file system cannot, the file
    is only extended: a sparse file, as before)."""
    if nbytes <= 0:
        return
    try:
        os.posix_fallocate(fd, 0, nbytes)
    except AttributeError:  # not POSIX (Windows): np.memmap extends the file
        pass
    except OSError as err:
        if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise


def is_scratch(arr) -> bool:
    """True when ``arr`` is (a view of) a :func:`scratch_array` (a shared, writable mapping)."""
    from .voxel_major import memmap_of

    m = memmap_of(arr)
    return m is not None and m.mode == "w+"


def release(arr) -> None:
    """Drop a scratch array's pages from the process's resident set (their values stay in the
    page cache and file); nothing for any other array."""
    from .voxel_major import file_mapping

    mapping = file_mapping(arr) if is_scratch(arr) else None
    if mapping is not None:
        mapping.madvise(mmap.MADV_DONTNEED)
