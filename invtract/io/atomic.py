"""One atomic writer: every file invtract writes appears complete or not at all.

The data goes to a temporary file in the destination's folder (so the final ``os.replace`` is a
rename on one file system), is flushed to disk, and replaces ``path`` only when complete; on
any error the temporary file is removed and ``path`` is left as it was.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from ..errors import InvtractError

__all__ = ["atomic_write", "atomic_write_text", "atomic_write_bytes", "check_writable_dir"]


def check_writable_dir(folder: str | os.PathLike) -> Path:
    """Create ``folder`` (and parents) and check that files can be created in it.

    Raises:
        InvtractError: one line naming the folder when it cannot be created or written.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise InvtractError(f"{folder}: cannot write there ({err.strerror or err})") from err
    return folder


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` to produce the file, then move it onto ``path`` atomically.

    Args:
        path: the destination (its folder is created).
        write: writes the complete file at the temporary path it is given (e.g.
            ``lambda p: torch.save(obj, p)``).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        InvtractError: the folder cannot be created or written (one line).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise InvtractError(f"{path}: cannot write ({err.strerror or err})") from err
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_write`)."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    return atomic_write(path, write)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`atomic_write`)."""
    return atomic_write_bytes(path, text.encode("utf-8"))
