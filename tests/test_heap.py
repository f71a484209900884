"""invtract.heap: the C heap's free memory handed back after allocation-heavy phases."""

from __future__ import annotations

import platform

from invtract.heap import release_free_heap


def test_release_free_heap_trims_where_the_c_library_can():
    glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert release_free_heap() is glibc
