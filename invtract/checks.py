"""Checks made before any heavy work, and warnings for results that are empty for a visible reason.

The commands call these at their top, as scilpy's ``assert_inputs_exist`` /
``assert_outputs_exist`` do: every input is an existing, readable file (a directory given as an
image says so); every output has a known extension, lies in an existing writable folder, is not
a directory, is distinct from every other output and input, and exists only with ``--force``;
numbers are in range; memory estimates (seeds x points, nodes^2, FOD size) fit in the memory
available. Each failure raises a :class:`~invtract.errors.ConfigError` /
:class:`~invtract.errors.FormatError` whose one-line message names the option to change.

:func:`warn` prints one line ``invtract: warning: ...`` (logger ``invtract``; shown with
``-q`` too). The ``warn_*`` helpers detect what makes a result empty or degenerate: no valid
FOD voxel, seeds outside the image, tracks and labels in different spaces, nothing tracked.

Positions are scanner mm (RAS+); an image covers voxel coordinates ``[-0.5, n - 0.5]`` on each
axis (voxel centres at integers).
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterable, Sequence

import numpy as np

from .errors import ConfigError, FormatError

__all__ = [
    "check_input_files",
    "check_output_files",
    "check_int",
    "check_float",
    "available_memory",
    "format_bytes",
    "check_memory",
    "image_memory_bytes",
    "check_sqlite_storage",
    "warn",
    "any_valid_fod_voxel",
    "warn_degenerate_fod",
    "distance_outside_mm",
    "warn_points_outside",
]

log = logging.getLogger("invtract")

#: share of seeds / endpoints outside an image above which a warning is printed (as compare)
OUTSIDE_WARN_FRACTION = 0.05


# ------------------------------------------------------------------------------------------
# paths
# ------------------------------------------------------------------------------------------
def check_input_files(inputs: Iterable[tuple[str, str | os.PathLike | None]]) -> None:
    """Every ``(what, path)`` with a path is an existing, readable file.

    Args:
        inputs: pairs of a description used in messages (e.g. ``"FOD image"``,
            ``"--seeds"``) and a path (``None`` = option not given, skipped).

    Raises:
        FormatError: missing, a directory, or unreadable (the message names ``what`` and path).
    """
    for what, path in inputs:
        if path is None:
            continue
        path = os.fspath(path)
        if os.path.isdir(path):
            raise FormatError(f"{what} {path} is a directory, not a file")
        if not os.path.exists(path):
            raise FormatError(f"{what} not found: {path}")
        if not os.access(path, os.R_OK):
            raise FormatError(f"{what} {path} is not readable (permission denied)")


def _has_suffix(path: str, suffixes: Sequence[str]) -> bool:
    low = path.lower()
    return any(low.endswith(s) for s in suffixes)


def _same_file(a: str, b: str) -> bool:
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)  # hard links, case-insensitive file systems
    except OSError:
        return False


def _check_writable_folder(folder: str, what: str, path: str) -> None:
    if not os.path.isdir(folder):
        raise ConfigError(f"folder of {what} {path} does not exist: {folder}")
    try:  # os.access is always true for root; a probe file tells the truth
        fd, probe = tempfile.mkstemp(prefix=".invtract-write-test-", dir=folder)
    except OSError as err:
        raise ConfigError(
            f"cannot write {what} {path}: folder {folder} is not writable ({err.strerror})"
        ) from None
    os.close(fd)
    os.unlink(probe)


def check_output_files(
    outputs: Sequence[tuple[str, str | os.PathLike | None, Sequence[str] | None]],
    *,
    force: bool,
    inputs: Iterable[tuple[str, str | os.PathLike | None]] = (),
    force_flag: str = "--force",
) -> None:
    """Outputs can be written, and writing them loses nothing that was not asked for.

    Args:
        outputs: ``(what, path, suffixes)`` per output; ``path`` None = not requested;
            ``suffixes`` the known extensions (lower case, e.g. ``(".tck", ".trk")``) or None
            for any name.
        force: overwrite existing outputs (``--force``); never a directory, never an input.
        inputs: ``(what, path)`` of the command's inputs, which no output may name.
        force_flag: the option named in the "exists" message.

    Raises:
        ConfigError: unknown extension, an output that is a directory, exists without
            ``force``, names the same file as another output or an input, or whose folder is
            missing or not writable.
    """
    given = [(w, os.fspath(p), s) for w, p, s in outputs if p is not None]
    sources = [(w, os.fspath(p)) for w, p in inputs if p is not None]
    for i, (what, path, suffixes) in enumerate(given):
        if suffixes is not None and not _has_suffix(path, suffixes):
            raise ConfigError(
                f"{what} {path}: unknown extension; use one of {', '.join(suffixes)}"
            )
        if os.path.isdir(path):
            raise ConfigError(f"{what} {path} is a directory; give a file name")
        for other, opath, _ in given[:i]:
            if _same_file(path, opath):
                raise ConfigError(f"{what} and {other} name the same file {path}: give another")
        for other, ipath in sources:
            if _same_file(path, ipath):
                raise ConfigError(f"{what} {path} is also the input {other}: it would be lost")
        if os.path.lexists(path) and not force:
            raise ConfigError(f"{what} exists: {path} (use {force_flag} to overwrite it)")
        _check_writable_folder(os.path.dirname(os.path.abspath(path)), what, path)


# ------------------------------------------------------------------------------------------
# numbers
# ------------------------------------------------------------------------------------------
def check_int(
    option: str, value: int | None, minimum: int | None = None, maximum: int | None = None
) -> None:
    """``minimum <= value <= maximum`` (bounds optional; None value = not given)."""
    if value is None:
        return
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        if maximum is None:
            rule = f">= {minimum}"
        elif minimum is None:
            rule = f"<= {maximum}"
        else:
            rule = f"in [{minimum}, {maximum}]"
        raise ConfigError(f"{option} must be {rule}, got {value}")


def check_float(
    option: str, value: float | None, *, minimum: float | None = None, positive: bool = False
) -> None:
    """``value`` is finite, ``>= minimum`` and (``positive``) ``> 0``; None = not given."""
    if value is None:
        return
    v = float(value)
    if not np.isfinite(v):
        raise ConfigError(f"{option} must be a finite number, got {value}")
    if positive and not v > 0:
        raise ConfigError(f"{option} must be > 0, got {value}")
    if minimum is not None and v < minimum:
        raise ConfigError(f"{option} must be >= {minimum}, got {value}")


# ------------------------------------------------------------------------------------------
# memory
# ------------------------------------------------------------------------------------------
def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (``MemAvailable``), None if unknown."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return None


def format_bytes(n: float) -> str:
    """``n`` bytes in the largest binary unit that keeps it >= 1 (``"18.6 GiB"``)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError  # pragma: no cover


def check_memory(nbytes: float, what: str, advice: str) -> None:
    """Refuse work whose memory estimate exceeds the memory available now.

    Args:
        nbytes: estimated peak bytes.
        what: what needs it, e.g. ``"--seed-grid-per-voxel: 277,250,000 seeds"``.
        advice: what to change, e.g. ``"use a smaller grid G"``.

    Raises:
        ConfigError: ``nbytes`` > :func:`available_memory` (one line, both sizes).
    """
    avail = available_memory()
    if avail is not None and nbytes > avail:
        raise ConfigError(
            f"{what} needs about {format_bytes(nbytes)} of memory, more than the "
            f"{format_bytes(avail)} available: {advice}"
        )


def image_memory_bytes(path: str | os.PathLike, peak_factor: float = 4.0) -> int | None:
    """Estimated peak bytes to load an image as float32, from its header alone.

    ``peak_factor`` float32 copies (raw data, scaled copy, reordering; a 1.4 GB FOD peaked at
    5.7 GB). None when the header cannot be read (the loader then reports the problem).
    """
    path = os.fspath(path)
    low = path.lower()
    try:
        if low.endswith((".mif", ".mih", ".mif.gz")):
            from .io.mif import read_mif_header

            shape = read_mif_header(path).dim
        else:
            import nibabel as nib

            shape = nib.load(path).shape
    except Exception:  # unreadable here: the loader raises the one-line error
        return None
    return int(peak_factor * 4 * int(np.prod([int(d) for d in shape], dtype=np.float64)))


def check_sqlite_storage(url: str, option: str, *, must_exist: bool) -> None:
    """An Optuna ``sqlite:///PATH`` storage: its folder exists (and the file, if ``must_exist``).

    Other URLs (``postgresql://...``) are left to the database driver.
    """
    if not url.startswith("sqlite:"):
        return
    path = url.split(":///", 1)[1] if ":///" in url else ""
    if not path or path == ":memory:":
        return
    if must_exist and not os.path.isfile(path):
        raise ConfigError(f"{option}: no such database {path}")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ConfigError(f"{option}: folder of the database does not exist: {folder}")


# ------------------------------------------------------------------------------------------
# warnings for empty or degenerate results
# ------------------------------------------------------------------------------------------
def warn(message: str) -> None:
    """One line ``invtract: warning: <message>`` on the ``invtract`` logger (kept by ``-q``)."""
    log.warning("warning: %s", message)


def any_valid_fod_voxel(sh: np.ndarray, chunk_voxels: int = 1 << 16) -> bool:
    """Whether some voxel of ``sh`` ``[X, Y, Z, K]`` has K finite coefficients, not all zero
    (the only voxels where SD_Stream can find a peak). Scans slabs of about ``chunk_voxels``
    voxels along the spatial axis slowest in memory (views: a memory-mapped or strided FOD is
    read in file order, never copied whole) and stops at the first slab holding one."""
    axis = int(np.argmax(np.abs(sh.strides[:3])))
    moved = np.moveaxis(sh, axis, 0)
    per_slab = max(1, int(np.prod(moved.shape[1:3])))
    step = max(1, chunk_voxels // per_slab)
    for start in range(0, moved.shape[0], step):
        block = moved[start : start + step].reshape(-1, sh.shape[-1])  # copies one slab at most
        if np.any(np.isfinite(block).all(1) & (block != 0).any(1)):
            return True
    return False


def warn_degenerate_fod(sh: np.ndarray, path: str) -> bool:
    """Warn (one line) when no streamline can be tracked in the FOD ``sh`` ``[X, Y, Z, K]``:
    lmax 0 (no direction information) or no voxel with finite, non-zero coefficients.
    Returns True when it warned."""
    if sh.shape[-1] == 1:
        warn(f"FOD {path} has lmax 0 (one volume): it holds no directions, nothing can be tracked")
        return True
    if not any_valid_fod_voxel(sh):
        warn(
            f"FOD {path} has no valid voxel (every voxel has a NaN/Inf coefficient or is all "
            "zero): nothing can be tracked"
        )
        return True
    return False


def distance_outside_mm(points_mm: np.ndarray, shape: Sequence[int], affine: np.ndarray):
    """``[N]`` distance (mm) from each point ``[N, 3]`` (scanner mm) to the box covered by an
    image of spatial ``shape`` with voxel -> scanner ``affine`` ``[4, 4]``; 0 inside.

    Exact for affines with orthogonal axes (rotations, flips, voxel scaling); for sheared
    ones the per-axis voxel sizes approximate it.
    """
    pts = np.asarray(points_mm, np.float64).reshape(-1, 3)
    affine = np.asarray(affine, np.float64)
    vox = (pts - affine[:3, 3]) @ np.linalg.inv(affine[:3, :3]).T
    hi = np.asarray(shape[:3], np.float64) - 0.5
    beyond = np.maximum(-0.5 - vox, 0.0) + np.maximum(vox - hi, 0.0)  # in voxels per axis
    return np.linalg.norm(beyond * np.linalg.norm(affine[:3, :3], axis=0), axis=1)


def warn_points_outside(
    points_mm: np.ndarray,
    shape: Sequence[int],
    affine: np.ndarray,
    what: str,
    image: str,
    consequence: str,
    margin_mm: float = 0.0,
) -> bool:
    """Warn when more than 5% of ``points_mm`` ``[N, 3]`` lie over ``margin_mm`` outside the
    image (``shape``, ``affine``): a sign that they are in another space. Returns True when
    it warned."""
    n = int(np.asarray(points_mm).reshape(-1, 3).shape[0])
    if n == 0:
        return False
    out = int(np.count_nonzero(distance_outside_mm(points_mm, shape, affine) > margin_mm))
    if out <= OUTSIDE_WARN_FRACTION * n:
        return False
    share = "all" if out == n else f"{out} of"
    warn(
        f"{share} {n} {what} lie outside {image} ({consequence}); are they in the same "
        "space as the image?"
    )
    return True
