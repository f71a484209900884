"""Fidelity benchmark: re-track every tckgen reference in ../shared/data and compare.

Prints one JSON object: per reference, the number of streamlines, the fraction with symmetric
Hausdorff distance < 0.1 / 0.5 / 1 mm, the fraction with identical point count, the fraction
bit-identical, and the median and max point-wise distance (mm).

Each reference is re-tracked on the FOD tckgen read (the header's ``source``, e.g. ``fod.mif``;
``--fod-name`` forces another file such as the NIfTI copy) from its seeds file, streamline by
streamline (``mode: "seeds"``). Whole-volume references (``-seed_grid_per_voxel``, random
initial directions) are also replayed as whole runs with tckgen's random stream
(``mode: "replay"``, ``MRTRIX_RNG_SEED`` = ``--rng-seed``, 20240601 for the shared data), which
checks which seeds produce streamlines as well. ``tckgen -act`` references (header keys ``act``,
``crop_at_gmwmi``) are tracked with ACT (numba engine). Usage:

    python benchmarks/parity.py [--engine torch|numba|auto] [--data ../shared/data] [--limit N]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from invtract.io.tractogram import load_tractogram_header
from invtract.tracking.act import act_from_header
from invtract.tracking.reference import compare_reference, replay_reference

HERE = Path(__file__).resolve().parent


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", default=str(HERE.parent.parent / "shared" / "data"))
    p.add_argument("--engine", default="torch")
    p.add_argument(
        "--limit", type=int, default=None, help="streamlines per reference (default all)"
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--fod-name", help="FOD file in each case folder (default: header's source)")
    p.add_argument("--rng-seed", type=int, default=20240601, help="the references' RNG seed")
    p.add_argument("--no-replay", action="store_true", help="skip whole-run replays")
    args = p.parse_args(argv)
    data = Path(args.data)
    out = {"engine": args.engine, "device": args.device, "references": []}
    for case in sorted(d for d in data.iterdir() if d.is_dir()):
        for seeds in sorted(case.glob("*_seeds.txt")):
            tck = case / (seeds.name[: -len("_seeds.txt")] + ".tck")
            header = load_tractogram_header(tck)
            fod = case / (args.fod_name or header.get("source", "fod.nii.gz"))
            if not fod.exists():
                fod = case / "fod.nii.gz"
            act = act_from_header(header, case)  # -act / -crop_at_gmwmi references
            t0 = time.time()
            r = compare_reference(tck, seeds, fod, engine=args.engine, limit=args.limit,
                                  device=args.device, act=act)  # fmt: skip
            records = [dict(r, mode="seeds")]
            whole = "init_direction" not in header
            if whole and "-seed_grid_per_voxel" in header.get("command_history", ""):
                if not args.no_replay and args.limit is None:
                    t1 = time.time()
                    rr = replay_reference(
                        tck, fod, args.rng_seed, engine=args.engine, device=args.device, act=act
                    )
                    records.append(dict(rr, seconds=round(time.time() - t1, 2)))
            records[0]["seconds"] = round(time.time() - t0, 2)
            for r in records:
                r["case"], r["fod"] = case.name, fod.name
                out["references"].append(r)
                msg = f"{case.name}/{tck.name} [{r['mode']}]: "
                msg += f"{r['frac_hausdorff_lt_0.1']:.4f} within 0.1 mm, "
                msg += f"{r['frac_same_count']:.4f} same count, "
                msg += f"{r['frac_bit_exact']:.4f} bit-exact ({r['n']})"
                if r["mode"] == "replay":
                    msg += f"; generated {r['generated']} vs {r['ref_generated']}"
                print(msg, file=sys.stderr)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
