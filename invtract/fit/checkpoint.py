"""Fit checkpoints: one file of tensors, numbers, strings, lists and dicts.

Written through the one atomic writer (:func:`invtract.io.atomic.atomic_write`) and read with
``torch.load(..., weights_only=True)``: a checkpoint is data, never code, so a crafted pickle
(e.g. one that would call a function on load) is refused with a one-line
:class:`~invtract.errors.FormatError`.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch

from ..errors import FormatError
from ..io.atomic import atomic_write

__all__ = ["save_checkpoint", "load_checkpoint", "checkpoint_iteration"]


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """Write ``state`` (tensors, numbers, strings, lists, dicts) to ``path`` atomically."""
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read a checkpoint written by :func:`save_checkpoint` (``weights_only=True``).

    Raises:
        FormatError: unreadable, not a checkpoint, or holding anything but plain data.
    """
    try:
        st = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise FormatError(f"{path}: not a plain-data invtract checkpoint ({first})") from None
    if not isinstance(st, dict) or "iteration" not in st:
        raise FormatError(f"{path}: not an invtract fit checkpoint")
    return st


def checkpoint_iteration(path: str | os.PathLike) -> int | None:
    """Completed iterations recorded in a checkpoint, or None if there is none."""
    if not Path(path).is_file():
        return None
    return int(load_checkpoint(path)["iteration"])
