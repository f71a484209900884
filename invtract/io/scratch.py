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

import mmap
import os
import tempfile

import numpy as np

__all__ = ["scratch_array", "is_scratch", "release"]


def scratch_array(shape: tuple, dtype, folder: str | os.PathLike | None = None) -> np.memmap:
    """A writable, zero-filled C-ordered array of ``shape`` and ``dtype`` in a shared mapping
    of an unlinked temporary file in ``folder`` (default: the system's temporary folder)."""
    with tempfile.TemporaryFile(dir=folder) as f:  # the mapping keeps the file alive
        return np.memmap(f, dtype=dtype, mode="w+", shape=tuple(shape))


def _mapping(arr) -> np.memmap | None:
    while isinstance(arr, np.ndarray):
        if isinstance(arr, np.memmap):
            return arr
        arr = arr.base
    return None


def is_scratch(arr) -> bool:
    """True when ``arr`` is (a view of) a :func:`scratch_array` (a shared, writable mapping)."""
    m = _mapping(arr)
    return m is not None and m.mode == "w+" and isinstance(m._mmap, mmap.mmap)


def release(arr) -> None:
    """Drop a scratch array's pages from the process's resident set (their values stay in the
    page cache and file); nothing for any other array."""
    if is_scratch(arr) and hasattr(mmap, "MADV_DONTNEED"):
        _mapping(arr)._mmap.madvise(mmap.MADV_DONTNEED)
