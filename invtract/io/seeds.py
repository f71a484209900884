"""Seed files: tckgen ``-output_seeds`` CSV and plain coordinate lists (scanner mm, RAS+).

Accepted inputs of :func:`load_seeds`:

* tckgen ``-output_seeds`` files: ``# <command>``, ``#Track_index,Seed_index,Pos_x,Pos_y,Pos_z,``
  then one ``track,seed,x,y,z,`` row per written streamline (trailing comma);
* plain text with 3 columns (x y z) or 6 columns (x y z dx dy dz: position and initial
  direction), separated by commas and/or whitespace, with optional ``#`` comments.

Convention: MRtrix3 ``src/dwi/tractography/tracking/write_kernel.{h,cpp}`` (spec section 7.3):
9-significant-digit floats (``max_digits10`` of float), trailing comma, extra empty last line.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError, FormatError, ShapeError
from .mif import atomic_output

__all__ = [
    "SeedTable",
    "load_seeds",
    "write_seeds",
    "seeds_from_reference",
    "seeds_at_vertices",
    "midpoint_seeds",
    "SEEDS_HEADER",
]

#: Column header line written by tckgen (line 2 of an ``-output_seeds`` file).
SEEDS_HEADER = "#Track_index,Seed_index,Pos_x,Pos_y,Pos_z,"


@dataclass
class SeedTable:
    """Seeds read from a file.

    Attributes:
        positions: ``[N, 3]`` float32 seed positions, scanner mm (RAS+).
        directions: ``[N, 3]`` float32 unit initial directions (scanner frame), or ``None``.
        track_index: ``[N]`` int64 0-based streamline index in the matching .tck (tckgen
            ``Track_index``), or ``None``.
        seed_index: ``[N]`` int64 0-based index of the seed vertex within that streamline
            (tckgen ``Seed_index``), or ``None``.
        command: the command line recorded on line 1 of a tckgen seeds file, or ``None``.
    """

    positions: np.ndarray
    directions: np.ndarray | None = None
    track_index: np.ndarray | None = None
    seed_index: np.ndarray | None = None
    command: str | None = None

    def __len__(self) -> int:
        return int(self.positions.shape[0])


def _read_text(path: str) -> list[str]:
    if not os.path.isfile(path):
        raise FormatError(f"{path}: no such file")
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise FormatError(f"{path}: cannot read seed file ({err})") from err


def _header(lines: list[str]) -> tuple[str | None, bool]:
    """``(command on line 1, whether the tckgen column header is present)``."""
    command = None
    if lines and lines[0].strip().startswith("#"):
        command = lines[0].strip()[1:].strip()
    compact = (ln.replace(" ", "").lower() for ln in lines if ln.strip().startswith("#"))
    tckgen = any(c.startswith("#track_index,seed_index") for c in compact)
    if tckgen and command and command.replace(" ", "").lower().startswith("track_index"):
        command = None
    return command, tckgen


def _table(path: str, lines: list[str]) -> tuple[np.ndarray, list[int]]:
    """The numeric rows (``[N, C]`` float64, by ``numpy.loadtxt``) and their 1-based lines.

    Commas count as whitespace (tckgen's rows end in one); ``#`` starts a comment. When
    numpy refuses the text, the first offending line is found for the message.
    """
    numbered = [(i, ln.split("#", 1)[0].replace(",", " ")) for i, ln in enumerate(lines, 1)]
    numbered = [(i, ln) for i, ln in numbered if ln.strip()]
    if not numbered:
        raise FormatError(f"{path}: no seeds found (empty file or comments only)")
    linenos = [i for i, _ in numbered]
    try:
        data = np.loadtxt([ln for _, ln in numbered], dtype=np.float64, ndmin=2)
    except ValueError as err:
        raise _locate_error(path, numbered) from err
    return data, linenos


def _locate_error(path: str, numbered: list[tuple[int, str]]) -> FormatError:
    """The message for the first row that has another column count or a non-number."""
    ncols = len(numbered[0][1].split())
    for lineno, text in numbered:
        tokens = text.split()
        if len(tokens) != ncols:
            return FormatError(
                f"{path}:{lineno}: expected {ncols} values like the first seed row, "
                f"got {len(tokens)}"
            )
        try:
            np.asarray(tokens, dtype=np.float64)
        except ValueError:
            return FormatError(f"{path}:{lineno}: non-numeric value in {text.strip()!r}")
    return FormatError(f"{path}: cannot parse the seed rows")


def _check_columns(path: str, data: np.ndarray, linenos: list[int], tckgen: bool) -> None:
    ncols = data.shape[1]
    if tckgen and ncols != 5:
        raise FormatError(
            f"{path}:{linenos[0]}: tckgen seed rows need 5 values "
            f"(Track_index,Seed_index,Pos_x,Pos_y,Pos_z), got {ncols}"
        )
    if ncols not in (3, 5, 6):
        raise FormatError(
            f"{path}:{linenos[0]}: expected 3 columns (x y z), 6 (x y z dx dy dz) or the tckgen "
            f"5-column format, got {ncols}"
        )


def _first_bad(path: str, bad: np.ndarray, linenos: list[int], message: str, values) -> None:
    """Raise ``FormatError`` at the line of the first row flagged in ``bad`` ``[N]``.

    ``message`` is formatted with that row of ``values`` (``{}``).
    """
    if bad.any():
        r = int(np.flatnonzero(bad)[0])
        shown = values[r].tolist() if np.ndim(values[r]) else f"{values[r]:g}"
        raise FormatError(f"{path}:{linenos[r]}: " + message.format(shown))


def _indices(path: str, data: np.ndarray, linenos: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """tckgen's ``Track_index`` / ``Seed_index`` columns as int64, checked."""
    for col, name in ((0, "Track_index"), (1, "Seed_index")):
        v = data[:, col]
        _first_bad(path, v != np.round(v), linenos, name + " must be an integer, got {}", v)
        _first_bad(path, v < 0, linenos, name + " must be >= 0, got {}", v)
    return data[:, 0].astype(np.int64), data[:, 1].astype(np.int64)


def load_seeds(path: str | os.PathLike) -> SeedTable:
    """Read a seed file (tckgen ``-output_seeds`` CSV or a plain 3/6-column list).

    The rows are read by ``numpy.loadtxt`` (commas as whitespace, ``#`` comments).

    Args:
        path: text file. Positions are scanner mm (RAS+); optional directions (6-column
            files) are normalised to unit length.

    Returns:
        :class:`SeedTable`. For tckgen files ``track_index``/``seed_index`` are set and
        ``directions`` is ``None``; for 6-column files ``directions`` is set.

    Raises:
        FormatError: missing/unreadable file, no seed rows, wrong or inconsistent column
            count, non-numeric values, non-finite coordinates, zero-length directions. The
            message names the file and (1-based) line.
    """
    path = str(path)
    lines = _read_text(path)
    command, tckgen = _header(lines)
    data, linenos = _table(path, lines)
    _check_columns(path, data, linenos, tckgen)
    track_index = seed_index = directions = None
    if data.shape[1] == 5:
        track_index, seed_index = _indices(path, data, linenos)
        positions = data[:, 2:5]
    else:
        positions = data[:, :3]
    finite = np.isfinite(positions).all(axis=1)
    _first_bad(path, ~finite, linenos, "non-finite seed coordinate {}", positions)
    if data.shape[1] == 6:
        d = data[:, 3:6]
        norm = np.linalg.norm(d, axis=1)
        bad = ~(np.isfinite(norm) & (norm > 0))
        _first_bad(path, bad, linenos, "seed direction {} is zero-length or non-finite", d)
        directions = (d / norm[:, None]).astype(np.float32)
    return SeedTable(
        positions=positions.astype(np.float32),
        directions=directions,
        track_index=track_index,
        seed_index=seed_index,
        command=command,
    )


def _fmt(value: float) -> str:
    """A float32 value with 9 significant digits, as MRtrix's ``str(float)``."""
    return f"{float(np.float32(value)):.9g}"


def write_seeds(
    path: str | os.PathLike,
    track_index: np.ndarray,
    seed_index: np.ndarray,
    positions: np.ndarray,
    command: str,
) -> None:
    """Write a seeds file in tckgen's ``-output_seeds`` format, atomically.

    Line 1 is ``# <command>``, line 2 :data:`SEEDS_HEADER`, then one
    ``track,seed,x,y,z,`` row per streamline (floats as float32 with ``%.9g``), then an
    extra empty line.

    Args:
        path: output text file (replaced if it exists).
        track_index: ``[N]`` 0-based streamline indices in the matching .tck.
        seed_index: ``[N]`` 0-based seed vertex index within each streamline.
        positions: ``[N, 3]`` seed positions, scanner mm (RAS+).
        command: command line recorded on line 1 (without the leading ``# ``).

    Raises:
        ShapeError: inconsistent array shapes.
    """
    pos = np.asarray(positions, dtype=np.float32).reshape(-1, 3) if np.size(positions) else None
    track = np.asarray(track_index, dtype=np.int64).reshape(-1)
    seed = np.asarray(seed_index, dtype=np.int64).reshape(-1)
    n = track.shape[0]
    if pos is None:
        pos = np.zeros((0, 3), dtype=np.float32)
    if seed.shape[0] != n or pos.shape[0] != n:
        raise ShapeError(
            f"write_seeds: track_index [{n}], seed_index [{seed.shape[0]}] and positions "
            f"{tuple(pos.shape)} must have the same length N"
        )
    out = [f"# {command}", SEEDS_HEADER]
    for t, s, p in zip(track.tolist(), seed.tolist(), pos):
        out.append(f"{t},{s},{_fmt(p[0])},{_fmt(p[1])},{_fmt(p[2])},")
    text = "\n".join(out) + "\n\n"
    with atomic_output(path) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)


def seeds_from_reference(
    tck_path: str | os.PathLike,
    seeds_path: str | os.PathLike,
    unidirectional: bool | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Seed positions and initial directions that reproduce an existing tckgen output.

    For every row of the seeds file (streamline ``t``, seed vertex ``s``), with ``p`` the
    vertices of streamline ``t``: ``p0 = p[s]`` and ``u = normalize(p[s-1] - p[s])`` (the
    first tracking direction of a bidirectional track, stored reversed before the seed), or
    ``u = normalize(p[1] - p[0])`` when ``s == 0`` for a unidirectional track; for a
    bidirectional one with ``s == 0`` the first half was empty and ``p[1]`` lies along ``-u0``,
    so ``u = normalize(p[0] - p[1])``. ``unidirectional`` None reads the ``.tck`` header
    (absent key: forward difference).

    Args:
        tck_path: the ``.tck`` written by tckgen.
        seeds_path: its ``-output_seeds`` file.

    Returns:
        ``(positions [N, 3] float32 scanner mm, directions [N, 3] float32 unit vectors,
        track_index [N] int64)`` in seeds-file row order.

    Raises:
        FormatError: seeds file without Track_index/Seed_index columns, indices out of range,
            a one-vertex streamline or a zero-length first step.

    Convention:
        spec section 8.3, recipe 3 (``Exec::gen_track`` joining of the two halves).
    """
    from .tractogram import load_tractogram

    if unidirectional is None:
        from .tractogram import load_tractogram_header

        # tckgen always records it; without the key the file's direction convention is unknown,
        # so keep the plain forward difference
        unidirectional = load_tractogram_header(tck_path).get("unidirectional", "1") == "1"
    table = load_seeds(seeds_path)
    if table.track_index is None or table.seed_index is None:
        raise FormatError(
            f"{seeds_path}: not a tckgen -output_seeds file (needs Track_index and Seed_index)"
        )
    pos, dirs = seeds_at_vertices(
        load_tractogram(tck_path), table.track_index, table.seed_index, unidirectional,
        names=(str(tck_path), str(seeds_path)),
    )  # fmt: skip
    return pos, dirs, table.track_index.copy()


def seeds_at_vertices(
    sl,
    track_index: np.ndarray,
    seed_index: np.ndarray,
    unidirectional: bool = False,
    names: tuple[str, str] = ("the tractogram", "the seeds"),
) -> tuple[np.ndarray, np.ndarray]:
    """Seed positions and initial directions at given vertices of given streamlines.

    The rule of :func:`seeds_from_reference` (which reads the indices from a seeds file);
    here they come as arrays, e.g. a tractogram's ``seed_index`` data per streamline.

    Args:
        sl: :class:`~invtract.streamlines.Streamlines` (scanner mm).
        track_index, seed_index: ``[N]`` streamline and vertex indices.
        unidirectional: the tractogram was tracked in one direction only.
        names: the tractogram's and the seeds' names, for messages.

    Returns:
        ``(positions [N, 3] float32 scanner mm, directions [N, 3] float32 unit vectors)``.
    """
    tck_path, seeds_path = names
    pts = sl.points.numpy().astype(np.float64)
    lengths = sl.lengths.numpy()
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    n = len(track_index)
    positions = np.empty((n, 3), dtype=np.float32)
    directions = np.empty((n, 3), dtype=np.float32)
    for r in range(n):
        t = int(track_index[r])
        s = int(seed_index[r])
        if t >= len(lengths):
            raise FormatError(
                f"{seeds_path}: row {r} refers to streamline {t} but {tck_path} has {len(lengths)}"
            )
        length = int(lengths[t])
        if s >= length:
            raise FormatError(
                f"{seeds_path}: row {r}: seed vertex {s} beyond streamline {t} ({length} vertices)"
            )
        if length < 2:
            raise FormatError(f"{tck_path}: streamline {t} has a single vertex (no direction)")
        base = offsets[t]
        p0 = pts[base + s]
        if s > 0:
            step = pts[base + s - 1] - p0
        else:
            step = pts[base + 1] - pts[base]
            if not unidirectional:
                step = -step
        norm = float(np.linalg.norm(step))
        if norm == 0.0 or not math.isfinite(norm):
            raise FormatError(f"{tck_path}: streamline {t} has a zero-length step at the seed")
        positions[r] = p0
        directions[r] = step / norm
    return positions, directions


def midpoint_seeds(sl) -> tuple[np.ndarray, np.ndarray]:
    """Each streamline's middle vertex and its local (central-difference) direction."""
    pos = np.empty((len(sl), 3), np.float32)
    dirs = np.empty((len(sl), 3), np.float32)
    for i, p in enumerate(sl.to_list()):
        p = np.asarray(p, np.float64)
        if p.shape[0] < 2:
            raise ConfigError(f"target streamline {i} has fewer than 2 vertices")
        m = p.shape[0] // 2
        d = p[min(m + 1, p.shape[0] - 1)] - p[max(m - 1, 0)]
        nrm = np.linalg.norm(d)
        if not nrm > 0:
            raise ConfigError(f"target streamline {i} has a zero-length middle segment")
        pos[i], dirs[i] = p[m], d / nrm
    return pos, dirs
