"""Compare two tractograms with the field's standard metrics (DIPY's where DIPY has them).

A is the candidate (e.g. a tracked or fitted tractogram) and B the target (e.g. the reference
bundle); the two files may be in any supported format (.tck, .trk, .trx) and must be in the
same scanner space (RAS+ mm).

Metrics (units in the table and in the JSON key names; how each is computed is listed under
"methods" in the JSON; definitions in ``invtract.evaluation.metrics``):

  counts, mean/median lengths and the Wasserstein distance between length distributions;
  Dice (voxel sets where DIPY's density_map is non-zero), weighted Dice, density correlation,
  Tractometer overlap (|A∩B|/|B|) and overreach (|A\\B|/|B|);
  bundle adjacency (DIPY's definition: both sets resampled to --n-points, MDF threshold);
  BUAN shape similarity (dipy.segment.bundles.bundle_shape_similarity);
  bundle-level MDF, MAM and Hausdorff (each streamline's nearest neighbour in the other set);
  paired Hausdorff, MAM and MDF of matched streamlines (median, max, fraction within
  0.1/0.5/1 mm): with --seeds-a/--seeds-b (tckgen -output_seeds files) the streamlines grown
  from the same seed, whatever the counts; without, streamline i of A vs i of B when the
  counts are equal;
  connectome correlation, with --parcellation (tck2connectome's assignment).

Resampling: MDF and bundle adjacency use --n-points points per streamline (default 20, as
DIPY). Bundle-level (all-pairs) MAM and Hausdorff use --resample points (default 20);
--resample none computes them on the raw vertices, as DIPY's bundles_distances_mam on the
loaded streamlines does (slower: cost grows with the square of the vertex count). Paired MAM
and Hausdorff always use the raw vertices. The table states the resampling used.

Density metrics use the grid of --reference; without it, a 1 mm isotropic grid around both
tractograms (stated in the JSON under "reference_grid"). Vertices outside the reference grid
(MRtrix appends the exit point, up to a step past the image) are left out of the density maps;
more than 5% outside is an error.

Examples:
  invtract compare fit.tck target.tck --reference fod.nii.gz --json metrics.json
  invtract compare a.tck b.tck --seeds-a a_seeds.txt --seeds-b b_seeds.txt --resample none
  invtract compare a.trx b.tck --reference t1.nii.gz --parcellation aparc.nii.gz
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
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
    """The metrics of :func:`~invtract.evaluation.compare.compare_tractograms` as a table."""
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
    resample = res.get("resample", "?")
    lines.append(
        f"MDF / bundle adjacency on {res.get('n_points', '?')} points per streamline; "
        + "bundle-level MAM / Hausdorff on "
        + ("the raw vertices" if resample is None else f"{resample} points per streamline")
        + "; paired MAM / Hausdorff on the raw vertices"
    )
    if res.get("pairing"):
        lines.append(f"paired metrics: {res['paired_count']} pairs by {res['pairing']}")
    lines.append("")
    lines.append(f"{'metric':<{w0}}  {'value':>{w1}}  unit")
    lines.append(f"{'-' * w0}  {'-' * w1}  {'-' * 11}")
    lines += [f"{k:<{w0}}  {v:>{w1}}  {u}" for k, v, u in rows]
    for note in res.get("notes", []):
        lines.append(f"note: {note}")
    return "\n".join(lines)


def _write_json_atomic(path: Path, obj: dict) -> None:
    """Strict JSON through the one atomic writer (:mod:`invtract.io.atomic`)."""
    from ..io.atomic import atomic_write_text

    atomic_write_text(path, json.dumps(obj, indent=2, allow_nan=False) + "\n")


def _resample_arg(text: str) -> int | None:
    """``--resample``: a point count >= 2, or ``none`` for the raw vertices."""
    if text.strip().lower() == "none":
        return None
    try:
        n = int(text)
    except ValueError:
        msg = f"expected a number of points or 'none', got {text!r}"
        raise argparse.ArgumentTypeError(msg) from None
    if n < 2:
        raise argparse.ArgumentTypeError(f"needs at least 2 points, got {n}")
    return n


def _seed_per_streamline(path: str, count: int):
    """``[count, 3]`` seed position of each streamline from a seed file (tckgen's
    ``-output_seeds``: rows placed by Track_index; a plain list: row i = streamline i)."""
    import numpy as np

    from ..io.seeds import load_seeds

    table = load_seeds(path)
    index = table.track_index
    if index is None:
        index = np.arange(len(table))
    if len(table) != count or sorted(index.tolist()) != list(range(count)):
        raise ConfigError(
            f"{path}: {len(table)} seeds (track indices {int(index.min())}..{int(index.max())})"
            f" do not give one seed to each of the {count} streamlines"
        )
    out = np.empty((count, 3))
    out[index] = table.positions
    return out


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
            "--resample",
            type=_resample_arg,
            default=20,
            metavar="N|none",
            help="points per streamline for MAM / Hausdorff, or 'none' for the raw vertices "
            "(default: 20)",
        )
        group.add_argument(
            "--seeds-a",
            metavar="SEEDS",
            help="seed of each streamline of A (tckgen -output_seeds); with --seeds-b, paired "
            "metrics compare streamlines from the same seed",
        )
        group.add_argument("--seeds-b", metavar="SEEDS", help="seed of each streamline of B")
        group.add_argument("--no-buan", action="store_true", help="skip the BUAN shape similarity")
        group.add_argument(
            "--buan-threshold-mm",
            type=float,
            default=6.0,
            help="BUAN bundle-adjacency threshold in mm (default: 6, as DIPY)",
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
        if (args.seeds_a is None) != (args.seeds_b is None):
            raise ConfigError("--seeds-a and --seeds-b go together")
        inputs = [("A", args.a), ("B", args.b), ("--reference", args.reference),
                  ("--parcellation", args.parcellation), ("--seeds-a", args.seeds_a),
                  ("--seeds-b", args.seeds_b)]  # fmt: skip
        checks.check_input_files(inputs)
        checks.check_output_files([("--json", args.json, None)], force=args.force, inputs=inputs)
        out = Path(args.json) if args.json else None
        if args.n_points < 2:
            raise ConfigError(f"--n-points must be >= 2, got {args.n_points}")
        if not args.threshold_mm > 0:
            raise ConfigError(f"--threshold-mm must be > 0, got {args.threshold_mm}")
        if args.bundle_sample < 1:
            raise ConfigError(f"--bundle-sample must be >= 1, got {args.bundle_sample}")

        if not args.buan_threshold_mm > 0:
            raise ConfigError(f"--buan-threshold-mm must be > 0, got {args.buan_threshold_mm}")

        from ..evaluation.compare import compare_tractograms
        from ..evaluation.tracks import load_packed
        from ..io.image import load_image

        log.info("Loading %s and %s", args.a, args.b)
        a, b = load_packed(args.a), load_packed(args.b)
        seeds = None
        if args.seeds_a is not None:
            seeds = (_seed_per_streamline(args.seeds_a, len(a)),
                     _seed_per_streamline(args.seeds_b, len(b)))  # fmt: skip
        reference = load_image(args.reference) if args.reference else None
        labels = load_image(args.parcellation) if args.parcellation else None
        res = compare_tractograms(
            a,
            b,
            reference=reference,
            parcellation=labels,
            n_points=args.n_points,
            resample=args.resample,
            ba_threshold_mm=args.threshold_mm,
            bundle_sample=args.bundle_sample,
            seeds=seeds,
            buan=not args.no_buan,
            buan_threshold_mm=args.buan_threshold_mm,
            names=(str(args.a), str(args.b)),
        )
        res["inputs"] = {
            "a": str(args.a),
            "b": str(args.b),
            "reference": args.reference,
            "parcellation": args.parcellation,
            "seeds_a": args.seeds_a,
            "seeds_b": args.seeds_b,
        }
        sys.stdout.write(format_table(res, (str(args.a), str(args.b))) + "\n")
        if out is not None:
            _write_json_atomic(out, res)
            log.info("Wrote %s", out)
        return 0
