"""Tractogram file names and the ``.tck`` text header, without nibabel.

Kept apart from :mod:`invtract.io.tractogram` (which imports nibabel for ``.trk`` and the
writers) so that reading a ``.tck`` straight into arrays
(:func:`invtract.evaluation.tracks.load_packed`) starts fast. Header layout: MRtrix3
``src/dwi/tractography/file.h`` (``mrtrix tracks`` magic line, ``key: value`` lines, ``END``).
"""

from __future__ import annotations

import os

from ..errors import FormatError

__all__ = ["TRACTOGRAM_SUFFIXES", "tractogram_suffix", "check_readable", "read_tck_header"]

TRACTOGRAM_SUFFIXES = (".tck", ".trk", ".trx")

_TCK_MAGIC = b"mrtrix tracks"


def tractogram_suffix(path: str) -> str:
    """The lower-case extension of ``path`` (``".tck"``)."""
    return os.path.splitext(path.lower())[1]


def check_readable(path: str) -> str:
    """The suffix of ``path``, a tractogram file that exists; :class:`FormatError` if not."""
    suffix = tractogram_suffix(path)
    if suffix not in TRACTOGRAM_SUFFIXES:
        raise FormatError(
            f"{path}: unknown tractogram extension {suffix or '(none)'!r}; "
            f"supported: {', '.join(TRACTOGRAM_SUFFIXES)}"
        )
    if not os.path.exists(path):
        raise FormatError(f"{path}: no such file")
    return suffix


def read_tck_header(path: str) -> dict[str, str]:
    """Parse the text header of a .tck file; repeated keys are joined with newlines."""
    try:
        with open(path, "rb") as f:
            magic = f.readline()
            if magic.rstrip(b"\r\n").rstrip() != _TCK_MAGIC:
                raise FormatError(
                    f"{path}: not a .tck file (invalid magic number {magic[:20]!r}, expected "
                    f"{_TCK_MAGIC!r})"
                )
            out: dict[str, list[str]] = {}
            for raw in f:
                line = raw.decode("utf-8", errors="replace").strip()
                if line == "END":
                    return {k: "\n".join(v) for k, v in out.items()}
                if not line or ":" not in line:
                    continue
                key, value = (s.strip() for s in line.split(":", 1))
                out.setdefault(key, []).append(value)
    except OSError as err:
        raise FormatError(f"{path}: cannot read ({err})") from err
    raise FormatError(f"{path}: malformed .tck header (missing END; truncated?)")
