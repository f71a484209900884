"""Build a streamline-count connectome from a tractogram and a node parcellation.

Re-implements MRtrix3 ``tck2connectome`` with its default assignment and output: each
streamline endpoint gets the label of the nearest labelled voxel centre of the parcellation
strictly within the radial search distance (``-assignment_radial_search``, default 4 mm), 0 if
there is none; the streamline adds 1 to the edge between its two nodes. The output is a CSV in
tck2connectome's format: one row per node 1..max(label) (labels absent from the image keep an
all-zero row), upper triangle with diagonal, comma-separated, every row ending in a newline.
Streamlines not assigned at both ends are dropped unless --keep-unassigned (node 0 then is the
first row and column).

Inputs: TRACKS is a tractogram (.tck/.trk/.trx; points in scanner mm, RAS+); PARCELLATION is a
3-D image of non-negative integer labels (0 = no node), NIfTI or MRtrix .mif.

Example:
    invtract connectome whole.tck parcellation.nii.gz connectome.csv --symmetric

equals ``tck2connectome whole.tck parcellation.nii.gz connectome.csv -symmetric`` (MRtrix3
3.0.3), count for count.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
from pathlib import Path

import numpy as np

from .. import checks
from ..errors import ConfigError, FormatError, InvtractError

__all__ = ["Connectome"]

log = logging.getLogger("invtract")


def _write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, then rename it into place."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", newline="") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


#: peak bytes per matrix entry: float64 accumulator and layout copies, then the CSV text
_BYTES_PER_EDGE = 36


def _warn_missing_nodes(labels, shown: int = 10) -> None:
    """Warn about node numbers 1..max absent from the parcellation (the first ``shown``)."""
    present = np.zeros(labels.n_nodes + 1, bool)
    present[np.unique(labels.labels)] = True
    missing = np.flatnonzero(~present[1:]) + 1
    if missing.size:
        more = f", ... ({missing.size} in all)" if missing.size > shown else ""
        head = ", ".join(str(int(m)) for m in missing[:shown])
        checks.warn(f"nodes missing from the parcellation (empty rows): {head}{more}")


def _endpoints(tracks) -> np.ndarray:
    """``[2 S, 3]`` first and last vertex of every non-empty streamline (scanner mm)."""
    lengths = tracks.lengths.cpu().numpy()
    points = tracks.points.detach().cpu().numpy()
    first = np.cumsum(lengths) - lengths
    keep = lengths > 0
    return np.concatenate([points[first[keep]], points[(first + lengths - 1)[keep]]])


class Connectome:
    """``invtract connectome``: tck2connectome-compatible streamline-count matrix."""

    name = "connectome"
    help = "streamline-count connectome from a tractogram and a parcellation (tck2connectome)"

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("tracks", metavar="TRACKS", help="input tractogram (.tck/.trk/.trx)")
        parser.add_argument(
            "parcellation",
            metavar="PARCELLATION",
            help="3-D image of node labels (non-negative integers; 0 = no node)",
        )
        parser.add_argument("output", metavar="OUT.csv", help="output connectome matrix")
        parser.add_argument(
            "--assignment-radial-search",
            type=float,
            default=4.0,
            metavar="MM",
            help="radial search distance for endpoint assignment, in mm (default: 4)",
        )
        parser.add_argument("--symmetric", action="store_true", help="fill the lower triangle too")
        parser.add_argument(
            "--zero-diagonal", action="store_true", help="set the matrix diagonal to zero"
        )
        parser.add_argument(
            "--keep-unassigned",
            action="store_true",
            help="keep unassigned streamlines as node 0 (first row and column)",
        )
        parser.add_argument("--force", action="store_true", help="overwrite OUT.csv if it exists")

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        # ------- CHECKS (before loading any data) -------
        radius = float(args.assignment_radial_search)
        if not (np.isfinite(radius) and radius > 0):
            raise ConfigError(f"--assignment-radial-search must be > 0 mm, got {radius}")
        inputs = [("tractogram", args.tracks), ("parcellation", args.parcellation)]
        checks.check_input_files(inputs)
        checks.check_output_files([("output", args.output, None)], force=args.force, inputs=inputs)
        out = Path(args.output)

        from ..io.image import load_image
        from ..io.tractogram import load_tractogram
        from ..losses.connectome import (
            as_label_volume,
            connectome_matrix,
            csv_delimiter,
            format_connectome,
        )

        log.info("Loading parcellation %s", args.parcellation)
        try:
            image = load_image(args.parcellation)
        except InvtractError:
            raise
        except Exception as exc:  # nibabel / parser errors -> one-line user error
            raise FormatError(f"cannot read parcellation {args.parcellation}: {exc}") from exc
        labels = as_label_volume(image)
        if labels.n_nodes == 0:
            raise FormatError(f"parcellation {args.parcellation} contains no labels > 0")
        n = labels.n_nodes + 1
        checks.check_memory(
            n * n * _BYTES_PER_EDGE,
            f"parcellation {args.parcellation}: its largest label {labels.n_nodes:,} makes a "
            f"{n:,} x {n:,} matrix, which",
            "number the nodes 1..N without gaps (MRtrix labelconvert)",
        )

        log.info("Loading tractogram %s", args.tracks)
        try:
            tracks = load_tractogram(args.tracks)
        except InvtractError:
            raise
        except Exception as exc:
            raise FormatError(f"cannot read tractogram {args.tracks}: {exc}") from exc
        if len(tracks) == 0:
            raise FormatError(f"tractogram {args.tracks} contains no streamlines")

        _warn_missing_nodes(labels)
        ends = _endpoints(tracks)
        checks.warn_points_outside(ends, labels.shape, labels.affine, "streamline endpoints",
                                   f"the parcellation {args.parcellation}",
                                   f"over {radius:g} mm out: no node", radius)  # fmt: skip

        matrix = connectome_matrix(
            tracks,
            labels,
            radius,
            symmetric=args.symmetric,
            zero_diagonal=args.zero_diagonal,
            keep_unassigned=args.keep_unassigned,
        )
        if not np.any(matrix):
            checks.warn(f"no streamline joins two nodes: the connectome of {args.tracks} is zero")
        _write_atomic(out, format_connectome(matrix, csv_delimiter(out)))
        log.info("Wrote %d x %d connectome to %s", matrix.shape[0], matrix.shape[1], out)
        return 0
