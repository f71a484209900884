"""One atomic writer: every file invtract writes appears complete or not at all.

The data goes to a temporary file in the destination's folder (so the final ``os.replace`` is a
rename on one file system) and replaces ``path`` only when complete; on any error, Ctrl-C or
SIGTERM (the CLI turns it into an exception) the temporary file is removed and ``path`` is left
as it was. A process killed outright (SIGKILL, power loss) cannot clean up: its temporary file
carries its process id (``.NAME.<pid>-<hex>.tmp<suffix>``), and the next write of the same
output removes the temporary files of processes that no longer run.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from ..errors import InvtractError

__all__ = [
    "atomic_output",
    "atomic_write",
    "atomic_write_text",
    "atomic_write_bytes",
    "check_writable_dir",
    "remove_stale_temporaries",
]


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


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        path.unlink()


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Remove the temporary files that killed processes left for ``path`` (their process id is
    in the name and no such process runs); another running writer's files are kept.

    Returns:
        The paths removed.
    """
    target = Path(path)
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.(\d+)-[0-9a-f]{{12}}\.tmp")
    removed = []
    try:
        entries = list(target.parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        m = pattern.match(entry.name)
        if m and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1))):
            with contextlib.suppress(OSError):
                _remove(entry)
                removed.append(entry)
    return removed


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, suffix: str = "") -> Iterator[str]:
    """Yield a temporary file name next to ``path``; move it onto ``path`` on success.

    The temporary file lives in the same folder (so ``os.replace`` is atomic) and is removed if
    the body raises (or is interrupted), so nothing half-written is ever left at ``path``.
    Stale temporary files of killed earlier runs are removed first.

    Args:
        path: final output file name.
        suffix: suffix of the temporary name (writers that dispatch on the extension, such as
            nibabel and trx-python, need the real extension here).
    """
    target = Path(path)
    remove_stale_temporaries(target)
    # Not created here, so the writer creates it with the usual (umask) permissions.
    tmp = target.parent / f".{target.name}.{os.getpid()}-{uuid.uuid4().hex[:12]}.tmp{suffix}"
    try:
        yield str(tmp)
        os.replace(tmp, target)
    finally:
        _remove(tmp)


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` to produce the file, then move it onto ``path`` atomically.

    Args:
        path: the destination (its folder is created).
        write: writes the complete file at the temporary path it is given (e.g.
            ``lambda p: torch.save(obj, p)``).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        InvtractError: the folder cannot be created (one line).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InvtractError(f"{path}: cannot write ({err.strerror or err})") from err
    with atomic_output(path) as tmp:
        write(tmp)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_write`), flushed to disk."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    return atomic_write(path, write)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`atomic_write`)."""
    return atomic_write_bytes(path, text.encode("utf-8"))
