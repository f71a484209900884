"""Fit checkpoints: one file, written atomically (temporary name, then ``os.replace``)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from ..errors import ConfigError, FormatError

__all__ = [
    "save_checkpoint",
    "load_checkpoint",
    "checkpoint_iteration",
    "fit_state",
    "restore_fit_state",
]


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


def fit_state(iteration: int, config: dict, z: dict, delta, opt_p, opt_sh, **extra) -> dict:
    """The checkpoint dict of a fit after ``iteration`` completed iterations (what
    :func:`restore_fit_state` reads back): copies of ``z`` and ``delta``, the optimiser states,
    the ``config`` it was made with, and ``extra`` entries (history, best, ...) as given."""
    return {
        "iteration": iteration,
        "z": {k: v.detach().clone() for k, v in z.items()},
        "delta": None if delta is None else delta.detach().cpu().clone(),
        "opt_p": None if opt_p is None else opt_p.state_dict(),
        "opt_sh": None if opt_sh is None else opt_sh.state_dict(),
        "config": config,
        **extra,
    }


def restore_fit_state(path, config: dict, z: dict, delta, opt_p, opt_sh) -> dict:
    """Load a fit checkpoint made with ``config`` and copy its state back in place.

    Copies the unconstrained parameters ``z`` (name -> tensor), the SH change ``delta`` (when
    not None) and the optimiser states; returns the whole checkpoint dict for the rest (history,
    best, iteration, ...). Raises ConfigError if the checkpoint was made with another config.
    """
    st = load_checkpoint(path)
    if st.get("config") != config:
        raise ConfigError(
            f"{path}: the checkpoint was made with another configuration; "
            "start a new run instead of --resume"
        )
    with torch.no_grad():
        for k, v in st["z"].items():
            z[k].copy_(v)
        if delta is not None:
            delta.copy_(st["delta"].to(delta.device))
    if opt_p is not None and st.get("opt_p") is not None:
        opt_p.load_state_dict(st["opt_p"])
    if opt_sh is not None and st.get("opt_sh") is not None:
        opt_sh.load_state_dict(st["opt_sh"])
    return st
