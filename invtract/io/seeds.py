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
import re
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError, FormatError, ShapeError
from .mif import atomic_output

__all__ = [
    "SeedTable",
    "load_seeds",
    "write_seeds",
    "seeds_from_reference",
    "midpoint_seeds",
    "SEEDS_HEADER",
]

#: Column header line written by tckgen (line 2 of an ``-output_seeds`` file).
SEEDS_HEADER = "#Track_index,Seed_index,Pos_x,Pos_y,Pos_z,"

_SPLIT = re.compile(r"[,\s]+")


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


def _to_float(token: str, path: str, lineno: int) -> float:
    try:
        return float(token)
    except ValueError as err:
        raise FormatError(f"{path}:{lineno}: non-numeric value {token!r}") from err


def _to_index(token: str, path: str, lineno: int, name: str) -> int:
    try:
        f = float(token)
    except ValueError as err:
        raise FormatError(f"{path}:{lineno}: non-numeric {name} {token!r}") from err
    if not f.is_integer():
        raise FormatError(f"{path}:{lineno}: {name} must be an integer, got {token!r}")
    value = int(token) if token.lstrip("+-").isdigit() else int(f)
    if value < 0:
        raise FormatError(f"{path}:{lineno}: {name} must be >= 0, got {value}")
    return value


def load_seeds(path: str | os.PathLike) -> SeedTable:
    """Read a seed file (tckgen ``-output_seeds`` CSV or a plain 3/6-column list).

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
    if not os.path.isfile(path):
        raise FormatError(f"{path}: no such file")
    try:
        with open(path, encoding="utf-8") as f:
            text_lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise FormatError(f"{path}: cannot read seed file ({err})") from err

    command: str | None = None
    tckgen_header = False
    rows: list[tuple[int, list[str]]] = []
    for lineno, raw in enumerate(text_lines, 1):
        stripped = raw.strip()
        if stripped.startswith("#"):
            compact = stripped.replace(" ", "").lower()
            if compact.startswith("#track_index,seed_index"):
                tckgen_header = True
            elif lineno == 1:
                command = stripped[1:].strip()
            continue
        content = stripped.split("#", 1)[0].strip()
        if not content:
            continue
        tokens = [t for t in _SPLIT.split(content) if t]
        rows.append((lineno, tokens))
    if not rows:
        raise FormatError(f"{path}: no seeds found (empty file or comments only)")

    ncols = len(rows[0][1])
    if tckgen_header and ncols != 5:
        raise FormatError(
            f"{path}:{rows[0][0]}: tckgen seed rows need 5 values "
            f"(Track_index,Seed_index,Pos_x,Pos_y,Pos_z), got {ncols}"
        )
    if ncols not in (3, 5, 6):
        raise FormatError(
            f"{path}:{rows[0][0]}: expected 3 columns (x y z), 6 (x y z dx dy dz) or the tckgen "
            f"5-column format, got {ncols}"
        )
    for lineno, tokens in rows:
        if len(tokens) != ncols:
            raise FormatError(
                f"{path}:{lineno}: expected {ncols} values like the first seed row, "
                f"got {len(tokens)}"
            )

    n = len(rows)
    positions = np.empty((n, 3), dtype=np.float64)
    directions = np.empty((n, 3), dtype=np.float64) if ncols == 6 else None
    track_index = np.empty(n, dtype=np.int64) if ncols == 5 else None
    seed_index = np.empty(n, dtype=np.int64) if ncols == 5 else None
    for r, (lineno, tokens) in enumerate(rows):
        if ncols == 5:
            track_index[r] = _to_index(tokens[0], path, lineno, "Track_index")
            seed_index[r] = _to_index(tokens[1], path, lineno, "Seed_index")
            pos_tokens = tokens[2:5]
        else:
            pos_tokens = tokens[:3]
        xyz = [_to_float(t, path, lineno) for t in pos_tokens]
        if not all(math.isfinite(v) for v in xyz):
            raise FormatError(f"{path}:{lineno}: non-finite seed coordinate {xyz}")
        positions[r] = xyz
        if directions is not None:
            d = [_to_float(t, path, lineno) for t in tokens[3:6]]
            norm = math.sqrt(sum(v * v for v in d)) if all(math.isfinite(v) for v in d) else 0.0
            if not math.isfinite(norm) or norm == 0.0:
                raise FormatError(
                    f"{path}:{lineno}: seed direction {d} is zero-length or non-finite"
                )
            directions[r] = [v / norm for v in d]
    return SeedTable(
        positions=positions.astype(np.float32),
        directions=None if directions is None else directions.astype(np.float32),
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
    sl = load_tractogram(tck_path)
    pts = sl.points.numpy().astype(np.float64)
    lengths = sl.lengths.numpy()
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    n = len(table)
    positions = np.empty((n, 3), dtype=np.float32)
    directions = np.empty((n, 3), dtype=np.float32)
    for r in range(n):
        t = int(table.track_index[r])
        s = int(table.seed_index[r])
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
    return positions, directions, table.track_index.copy()


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
