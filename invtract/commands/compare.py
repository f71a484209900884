"""Compare two tractograms with the field's standard metrics.

A is the candidate (e.g. a tracked or fitted tractogram) and B the target (e.g. the reference
bundle); the two files may be in any supported format (.tck, .trk, .trx) and must be in the
same scanner space (RAS+ mm).

Metrics (units in the table and in the JSON key names; full definitions in
``invtract.losses.metrics``):

  counts, mean/median lengths and the Wasserstein distance between length distributions;
  Dice (voxel sets where dipy's density_map is non-zero), weighted Dice, density correlation,
  Tractometer overlap (|A∩B|/|B|) and overreach (|A\\B|/|B|);
  bundle adjacency (dipy: both sets resampled to 20 points, 5 mm MDF threshold);
  bundle-level MDF, MAM and Hausdorff (each streamline's nearest neighbour in the other set);
  paired Hausdorff (exact, on the vertices) and MDF of streamline i of A vs i of B, when both
  have the same count (median, max, fraction within 0.1/0.5/1 mm);
  connectome correlation, with --parcellation (needs invtract.losses.connectome).

Density metrics use the grid of --reference; without it, a 1 mm isotropic grid around both
tractograms (stated in the JSON under "reference_grid"). Vertices outside the reference grid
(MRtrix appends the exit point, up to a step past the image) are left out of the density maps;
more than 5% outside is an error.

Examples:
  invtract compare fit.tck target.tck --reference fod.nii.gz --json metrics.json
  invtract compare a.trx b.tck --reference t1.nii.gz --parcellation aparc.nii.gz
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
from pathlib import Path

from .. import checks
from ..errors import ConfigError

__all__ = ["Compare"]

log = logging.getLogger(__name__)


def _fmt(v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.6g}"
    return str(v)


def format_table(res: dict, names: tuple[str, str] = ("A", "B")) -> str:
    """The metrics of :func:`~invtract.losses.metrics.compare_tractograms` as a text table."""
    units = res.get("units", {})
    rows = [(k, _fmt(res[k]), units[k]) for k in units]
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    lines = [f"A = {names[0]}", f"B = {names[1]}"]
    grid = res.get("reference_grid", {})
    lines.append(
        f"density grid: {grid.get('source')}"
        + (f" {grid['path']}" if grid.get("path") else "")
        + f", shape {tuple(grid.get('shape', ()))}"
    )
    lines.append("")
    lines.append(f"{'metric':<{w0}}  {'value':>{w1}}  unit")
    lines.append(f"{'-' * w0}  {'-' * w1}  {'-' * 11}")
    lines += [f"{k:<{w0}}  {v:>{w1}}  {u}" for k, v, u in rows]
    for note in res.get("notes", []):
        lines.append(f"note: {note}")
    return "\n".join(lines)


def _write_json_atomic(path: Path, obj: dict) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(obj, fh, indent=2, allow_nan=False)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class Compare:
    """``invtract compare A B``: print (and save) every metric between two tractograms."""

    name = "compare"
    help = "metrics between two tractograms (MDF, Hausdorff, Dice, bundle adjacency, ...)"

    @staticmethod
    def add_arguments(parser) -> None:
        parser.add_argument("a", metavar="A", help="candidate tractogram (.tck/.trk/.trx)")
        parser.add_argument("b", metavar="B", help="target tractogram (.tck/.trk/.trx)")
        parser.add_argument(
            "--reference",
            metavar="IMAGE",
            help="image whose voxel grid is used for the density metrics (and to read .trk)",
        )
        parser.add_argument(
            "--parcellation", metavar="LABELS", help="label image for the connectome correlation"
        )
        parser.add_argument("--json", metavar="OUT", help="also write all metrics to this JSON")
        parser.add_argument(
            "-f", "--force", action="store_true", help="overwrite the --json file if it exists"
        )
        group = parser.add_argument_group("metric options")
        group.add_argument(
            "--n-points",
            type=int,
            default=20,
            help="resampling points for MDF / bundle adjacency (default: 20, as dipy)",
        )
        group.add_argument(
            "--threshold-mm",
            type=float,
            default=5.0,
            help="bundle-adjacency MDF threshold in mm (default: 5)",
        )
        group.add_argument(
            "--bundle-sample",
            type=int,
            default=1000,
            help="max query streamlines per set for bundle-level MAM/Hausdorff (default: 1000)",
        )

    @staticmethod
    def run(args) -> int:
        # ------- CHECKS (before any data is loaded) -------
        inputs = [("A", args.a), ("B", args.b), ("--reference", args.reference),
                  ("--parcellation", args.parcellation)]  # fmt: skip
        checks.check_input_files(inputs)
        checks.check_output_files([("--json", args.json, None)], force=args.force, inputs=inputs)
        out = Path(args.json) if args.json else None
        if args.n_points < 2:
            raise ConfigError(f"--n-points must be >= 2, got {args.n_points}")
        if not args.threshold_mm > 0:
            raise ConfigError(f"--threshold-mm must be > 0, got {args.threshold_mm}")
        if args.bundle_sample < 1:
            raise ConfigError(f"--bundle-sample must be >= 1, got {args.bundle_sample}")

        from ..io.image import load_image
        from ..io.tractogram import load_tractogram
        from ..losses.metrics import compare_tractograms

        log.info("Loading %s and %s", args.a, args.b)
        a = load_tractogram(args.a, reference=args.reference)
        b = load_tractogram(args.b, reference=args.reference)
        reference = load_image(args.reference) if args.reference else None
        labels = load_image(args.parcellation) if args.parcellation else None
        res = compare_tractograms(
            a,
            b,
            reference=reference,
            parcellation=labels,
            n_points=args.n_points,
            ba_threshold_mm=args.threshold_mm,
            bundle_sample=args.bundle_sample,
            names=(str(args.a), str(args.b)),
        )
        res["inputs"] = {
            "a": str(args.a),
            "b": str(args.b),
            "reference": args.reference,
            "parcellation": args.parcellation,
        }
        sys.stdout.write(format_table(res, (str(args.a), str(args.b))) + "\n")
        if out is not None:
            _write_json_atomic(out, res)
            log.info("Wrote %s", out)
        return 0
