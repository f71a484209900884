"""numba, or stand-ins when it cannot be imported (the compiled CPU kernels are then
unavailable, and the torch engine runs alone).

``numba``: the module, or None. ``njit``: numba's decorator, or one that returns the function
unchanged. ``NUMBA_ERROR``: why the import failed (None when it did not).
"""

from __future__ import annotations

try:  # pragma: no cover - exercised implicitly
    import numba
    from numba import njit

    NUMBA_ERROR: Exception | None = None
except Exception as exc:  # pragma: no cover - only without numba
    numba = None
    NUMBA_ERROR = exc

    def njit(*args, **kwargs):
        if len(args) == 1 and callable(args[0]) and not kwargs:
            return args[0]
        return lambda f: f


__all__ = ["numba", "njit", "NUMBA_ERROR"]
