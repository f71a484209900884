"""Fit checkpoints: one file, written atomically (temporary name, then ``os.replace``)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from ..errors import FormatError

__all__ = ["save_checkpoint", "load_checkpoint", "checkpoint_iteration"]


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """Write ``state`` (tensors, numbers, lists, dicts) to ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read a checkpoint written by :func:`save_checkpoint`."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except (OSError, RuntimeError, EOFError) as err:
        raise FormatError(f"{path}: cannot read checkpoint ({err})") from err


def checkpoint_iteration(path: str | os.PathLike) -> int | None:
    """Completed iterations recorded in a checkpoint, or None if there is none."""
    if not Path(path).is_file():
        return None
    return int(load_checkpoint(path)["iteration"])
