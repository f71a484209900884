"""The ``torch`` engine: :func:`invtract.tracking.tracker.track_torch` (any torch device).

The plain PyTorch reference implementation of SD_Stream; it imports no numba.
"""

from __future__ import annotations

from ..tracker import track_torch as track

__all__ = ["track"]
