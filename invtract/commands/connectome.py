"""Build a connectome from a tractogram and a node parcellation, as MRtrix3 ``tck2connectome``.

Re-implements MRtrix3 3.0.3 ``tck2connectome``: output byte-identical to its file for every
option below (rules and sources in ``invtract.evaluation.connectome``).

Assignment: each streamline endpoint gets the label of the nearest labelled voxel centre
strictly within the radial search distance (--assignment-radial-search, default 4 mm), 0 if
there is none; or, with --assignment-end-voxels, the label of the voxel holding the endpoint;
--assignment-reverse-search MM walks inwards along the streamline (0: to its midpoint);
--assignment-forward-search MM searches a 45-degree cone ahead of the endpoint;
--assignment-all-voxels assigns the streamline to every node it passes through (all pairs).
--vector writes one value per node instead of a matrix (the node of each streamline's end).

Contribution of a streamline to the edge between its two nodes: 1, times its length
(--scale-length) or its inverse (--scale-invlength), times its value in --scale-file, times
2 / (sum of the two node volumes in voxels) (--scale-invnodevol); weighted by its
--tck-weights-in value. --stat-edge combines the contributions of an edge: sum (default),
mean (weighted), min or max (NaN for edges no streamline reached).

Output: a matrix with one row per node 1..max(label) (labels absent from the image keep an
all-zero row), upper triangle with diagonal (--symmetric: both), values separated by commas
(*.csv), tabs (*.tsv) or spaces, every row ending in a newline. Streamlines not assigned at
both ends are dropped unless --keep-unassigned (node 0 then is the first row and column).
--out-assignments writes each streamline's two nodes, one line per streamline.

Inputs: TRACKS is a tractogram (.tck/.trk/.trx; points in scanner mm, RAS+); PARCELLATION is a
3-D image of non-negative integer labels (0 = no node), NIfTI or MRtrix .mif.

Examples:
    invtract connectome whole.tck parcellation.nii.gz connectome.csv --symmetric
    invtract connectome whole.tck nodes.mif lengths.csv --scale-length --stat-edge mean
    invtract connectome whole.tck nodes.mif sift2.csv --tck-weights-in weights.txt \\
        --out-assignments assignments.txt

The first equals ``tck2connectome whole.tck parcellation.nii.gz connectome.csv -symmetric``
(MRtrix3 3.0.3), byte for byte.
"""

from __future__ import annotations

import argparse
import logging
import shlex
from pathlib import Path

import numpy as np

from .. import checks
from ..errors import ConfigError, FormatError, InvtractError

__all__ = ["Connectome"]

log = logging.getLogger("invtract")

STATISTICS = ("sum", "mean", "min", "max")


def _write_atomic(path: Path, text: str) -> None:
    """Write ``text`` through the one atomic writer (temporary file, renamed into place)."""
    from ..io.atomic import atomic_write_text

    atomic_write_text(path, text)


def _add_assignment(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("streamline assignment (tck2connectome's)")
    exclusive = group.add_mutually_exclusive_group()
    exclusive.add_argument(
        "--assignment-radial-search",
        type=float,
        default=None,
        metavar="MM",
        help="radial search from each endpoint for the nearest node voxel within MM (default 4)",
    )
    exclusive.add_argument(
        "--assignment-end-voxels",
        action="store_true",
        help="use the label of the voxel holding each endpoint",
    )
    exclusive.add_argument(
        "--assignment-reverse-search",
        type=float,
        default=None,
        metavar="MM",
        help="walk inwards from each endpoint (at most MM along the streamline; 0: to its "
        "midpoint) to the first vertex in a node",
    )
    exclusive.add_argument(
        "--assignment-forward-search",
        type=float,
        default=None,
        metavar="MM",
        help="search ahead of each endpoint, in a 45-degree cone up to MM, for a node voxel",
    )
    exclusive.add_argument(
        "--assignment-all-voxels",
        action="store_true",
        help="assign each streamline to every node its vertices lie in",
    )


def _assignment(args: argparse.Namespace) -> tuple[str, float]:
    """``(mode, distance in mm)`` from the exclusive assignment options."""
    if args.assignment_end_voxels:
        return "end_voxels", 0.0
    if args.assignment_all_voxels:
        return "all_voxels", 0.0
    for mode in ("reverse", "forward"):
        value = getattr(args, f"assignment_{mode}_search")
        if value is not None:
            if not (np.isfinite(value) and value >= 0):
                raise ConfigError(f"--assignment-{mode}-search must be >= 0 mm, got {value}")
            return mode, float(value)
    radius = 4.0 if args.assignment_radial_search is None else args.assignment_radial_search
    if not (np.isfinite(radius) and radius >= 0):  # 0: as tck2connectome, nothing assigned
        raise ConfigError(f"--assignment-radial-search must be >= 0 mm, got {radius}")
    return "radial", float(radius)


def _add_metric(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("edge values (tck2connectome's metric options)")
    lengths = group.add_mutually_exclusive_group()
    lengths.add_argument(
        "--scale-length", action="store_true", help="scale each contribution by its length (mm)"
    )
    lengths.add_argument(
        "--scale-invlength", action="store_true", help="scale each contribution by 1 / length"
    )
    group.add_argument(
        "--scale-invnodevol",
        action="store_true",
        help="scale each contribution by 2 / (sum of the two node volumes, in voxels)",
    )
    group.add_argument(
        "--scale-file",
        metavar="PATH",
        help="scale each contribution by the streamline's value in this vector file",
    )
    group.add_argument(
        "--stat-edge",
        choices=STATISTICS,
        default="sum",
        help="statistic combining the contributions of an edge (default: sum)",
    )
    group.add_argument(
        "--tck-weights-in", metavar="PATH", help="text file of per-streamline weights"
    )


def _add_output(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("output")
    group.add_argument("--symmetric", action="store_true", help="fill the lower triangle too")
    group.add_argument(
        "--zero-diagonal", action="store_true", help="set the matrix diagonal to zero"
    )
    group.add_argument(
        "--keep-unassigned",
        action="store_true",
        help="keep unassigned streamlines as node 0 (first row and column)",
    )
    group.add_argument(
        "--out-assignments",
        metavar="PATH",
        help="write the two nodes of each streamline to this text file",
    )
    group.add_argument(
        "--vector",
        action="store_true",
        help="write one value per node (the node of each streamline's end) instead of a matrix",
    )
    group.add_argument(
        "-f", "--force", action="store_true", help="overwrite output files that exist"
    )


#: peak bytes per matrix entry: float64 accumulator and layout copies, then the CSV text
_BYTES_PER_EDGE = 36


def _check_args(args: argparse.Namespace) -> tuple[tuple[str, float], list[Path]]:
    """Validate every option before any data is read; ``((mode, distance), outputs)``."""
    mode = _assignment(args)
    inputs = [("tractogram", args.tracks), ("parcellation", args.parcellation)]
    inputs += [("--scale-file", args.scale_file), ("--tck-weights-in", args.tck_weights_in)]
    checks.check_input_files(inputs)
    named = [("output", args.output, None), ("--out-assignments", args.out_assignments, None)]
    checks.check_output_files(named, force=args.force, inputs=inputs)
    outputs = [Path(p) for _, p, _ in named if p is not None]
    return mode, outputs


def _check_matrix_memory(labels, parcellation: str) -> None:
    """Refuse a parcellation whose largest label makes a matrix too large for memory."""
    n = labels.n_nodes + 1
    checks.check_memory(
        n * n * _BYTES_PER_EDGE,
        f"parcellation {parcellation}: its largest label {labels.n_nodes:,} makes a "
        f"{n:,} x {n:,} matrix, which",
        "number the nodes 1..N without gaps (MRtrix labelconvert)",
    )


def _warn_missing_nodes(missing: list[int], shown: int = 10) -> None:
    """Warn about node numbers 1..max absent from the parcellation (the first ``shown``)."""
    if missing:
        more = f", ... ({len(missing)} in all)" if len(missing) > shown else ""
        head = ", ".join(str(m) for m in missing[:shown])
        checks.warn(f"nodes missing from the parcellation (empty rows): {head}{more}")


def _warn_endpoints_outside(tracks, labels, radius: float, args: argparse.Namespace) -> None:
    """One warning when streamline endpoints lie farther than ``radius`` outside the labels."""
    first = tracks.first
    keep = tracks.lengths > 0
    ends = np.concatenate(
        [tracks.points[first[keep]], tracks.points[(first + tracks.lengths - 1)[keep]]]
    )
    checks.warn_points_outside(ends, labels.labels.shape, labels.affine, "streamline endpoints",
                               f"the parcellation {args.parcellation}",
                               f"over {radius:g} mm out: no node", radius)  # fmt: skip


def _load_inputs(args: argparse.Namespace):
    """``(labels, tracks)``; reader failures become one-line :class:`FormatError`."""
    from ..evaluation.connectome import as_label_volume
    from ..evaluation.tracks import load_packed
    from ..io.image import load_image

    log.info("Loading parcellation %s", args.parcellation)
    try:
        labels = as_label_volume(load_image(args.parcellation))
    except InvtractError:
        raise
    except Exception as exc:  # nibabel / parser errors -> one-line user error
        raise FormatError(f"cannot read parcellation {args.parcellation}: {exc}") from exc
    if labels.n_nodes == 0:
        raise FormatError(f"parcellation {args.parcellation} contains no labels > 0")
    log.info("Loading tractogram %s", args.tracks)
    try:
        tracks = load_packed(args.tracks)
    except InvtractError:
        raise
    except Exception as exc:
        raise FormatError(f"cannot read tractogram {args.tracks}: {exc}") from exc
    if len(tracks) == 0:
        raise FormatError(f"tractogram {args.tracks} contains no streamlines")
    return labels, tracks


def _per_streamline(path: str | None, what: str, n: int) -> np.ndarray | None:
    """A per-streamline vector file, checked against the streamline count (as MRtrix)."""
    if path is None:
        return None
    from ..evaluation.connectome import read_vector

    values = read_vector(path, what)
    if values.shape[0] < n:
        raise FormatError(f"{what} {path} has {values.shape[0]} values for {n} streamlines")
    if values.shape[0] > n:
        log.warning("%s %s has %d values for %d streamlines", what, path, values.shape[0], n)
    return values[:n]


def _warn_empty_nodes(matrix_full: np.ndarray, missing: list[int]) -> None:
    """tck2connectome's warning for nodes (present in the image) that no streamline reached."""
    upper = np.triu(matrix_full)
    hit = np.isfinite(upper) & (upper != 0)
    visited = hit.any(axis=0) | hit.any(axis=1)
    empty = [i for i in range(1, visited.size) if not visited[i] and i not in missing]
    if empty:
        more = f", ... ({len(empty)} in all)" if len(empty) > 10 else ""
        head = ", ".join(map(str, empty[:10]))
        log.warning("nodes without any streamline assigned: %s%s", head, more)


class Connectome:
    """``invtract connectome``: tck2connectome-compatible connectome matrix."""

    name = "connectome"
    help = "connectome from a tractogram and a parcellation (tck2connectome, byte-identical)"

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("tracks", metavar="TRACKS", help="input tractogram (.tck/.trk/.trx)")
        parser.add_argument(
            "parcellation",
            metavar="PARCELLATION",
            help="3-D image of node labels (non-negative integers; 0 = no node)",
        )
        parser.add_argument("output", metavar="OUT.csv", help="output connectome matrix")
        _add_assignment(parser)
        _add_metric(parser)
        _add_output(parser)

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        (mode, distance), outputs = _check_args(args)
        from ..evaluation import connectome as ev

        labels, tracks = _load_inputs(args)
        _check_matrix_memory(labels, args.parcellation)
        missing = labels.missing_nodes()
        _warn_missing_nodes(missing)
        if mode == "radial":
            _warn_endpoints_outside(tracks, labels, distance, args)
        n = len(tracks)
        weights = _per_streamline(args.tck_weights_in, "streamline weights file", n)
        values = _per_streamline(args.scale_file, "scale file", n)
        nodes = ev.assign_nodes(tracks, labels, distance, assignment=mode)
        scale = "length" if args.scale_length else "invlength" if args.scale_invlength else "none"
        factors = ev.edge_factors(
            tracks,
            nodes,
            scale=scale,
            scale_values=values,
            node_volumes=labels.node_volumes() if args.scale_invnodevol else None,
        )
        w = np.ones(n, np.float32) if weights is None else weights.astype(np.float32)
        full = ev.accumulate_connectome(
            nodes, factors, w, labels.n_nodes, args.stat_edge, vector=args.vector
        )
        command = shlex.join(["invtract", *(getattr(args, "_argv", None) or [])])
        if args.vector:
            _write_vector(args, full, outputs[0], command)
        else:
            _write_matrix(args, full, missing, outputs[0])
        if len(outputs) > 1:
            if args.vector and isinstance(nodes, np.ndarray):
                nodes = nodes[:, 1]
            _write_atomic(outputs[1], ev.format_assignments(nodes, command))
            log.info("Wrote the assignments of %d streamlines to %s", n, outputs[1])
        return 0


def _write_matrix(args: argparse.Namespace, full: np.ndarray, missing: list[int], out: Path):
    """Lay out and write the matrix as tck2connectome does (with its empty-node warning)."""
    from ..evaluation import connectome as ev

    _warn_empty_nodes(full, missing)
    matrix = ev.layout_matrix(full, args.keep_unassigned, args.symmetric, args.zero_diagonal)
    if not np.any(matrix):
        checks.warn(f"no streamline joins two nodes: the connectome of {args.tracks} is zero")
    _write_atomic(out, ev.format_connectome(matrix, ev.csv_delimiter(out)))
    log.info("Wrote %d x %d connectome to %s", matrix.shape[0], matrix.shape[1], out)


def _write_vector(args: argparse.Namespace, full: np.ndarray, out: Path, command: str):
    """Write the ``--vector`` output (tck2connectome ignores -symmetric / -zero_diagonal)."""
    from ..evaluation import connectome as ev

    for flag in ("symmetric", "zero_diagonal"):
        if getattr(args, flag):
            log.warning("--%s does not apply to --vector; ignored", flag.replace("_", "-"))
    values = full if args.keep_unassigned else full[1:]
    _write_atomic(out, ev.format_vector(values, ev.csv_delimiter(out), command))
    log.info("Wrote the connectivity vector of %d nodes to %s", values.shape[0], out)
