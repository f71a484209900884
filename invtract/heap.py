"""Give the C heap's free memory back to the operating system.

glibc serves allocations below its (dynamic, up to 32 MB) mmap threshold from the process
heap and keeps what is freed there for reuse. A phase that makes and drops hundreds of tensors
of a few MB each (the signal term's CSD solves, the coupled start's L-BFGS over the learned
voxels) leaves that memory resident for the rest of the run: 0.5 GB of a whole-brain
``invtract fit --dwi``. :func:`release_free_heap` after such a phase hands it back.
"""

from __future__ import annotations

import ctypes
import functools

__all__ = ["release_free_heap"]


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError):  # not glibc (macOS, musl, Windows)
        return None


def release_free_heap() -> bool:
    """Return the heap's free pages to the system (``malloc_trim(0)``); False where the C
    library has no such call (nothing is done)."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
