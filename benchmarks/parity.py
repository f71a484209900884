"""Fidelity benchmark: re-track every tckgen reference in ../shared/data and compare.

Prints one JSON object: per reference, the number of streamlines, the fraction with symmetric
Hausdorff distance < 0.1 / 0.5 / 1 mm, the fraction with identical point count, and the median
and max point-wise distance (mm). Usage:

    python benchmarks/parity.py [--engine torch|numba|auto] [--data ../shared/data] [--limit N]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from invtract.tracking.reference import compare_reference

HERE = Path(__file__).resolve().parent


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", default=str(HERE.parent.parent / "shared" / "data"))
    p.add_argument("--engine", default="torch")
    p.add_argument(
        "--limit", type=int, default=None, help="streamlines per reference (default all)"
    )
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    data = Path(args.data)
    out = {"engine": args.engine, "device": args.device, "references": []}
    for case in sorted(d for d in data.iterdir() if d.is_dir()):
        fod = case / "fod.nii.gz"
        for seeds in sorted(case.glob("*_seeds.txt")):
            tck = case / (seeds.name[: -len("_seeds.txt")] + ".tck")
            t0 = time.time()
            r = compare_reference(tck, seeds, fod, engine=args.engine, limit=args.limit,
                                  device=args.device)  # fmt: skip
            r["case"] = case.name
            r["seconds"] = round(time.time() - t0, 2)
            out["references"].append(r)
            msg = f"{case.name}/{tck.name}: {r['frac_hausdorff_lt_0.1']:.4f} within 0.1 mm, "
            msg += f"{r['frac_same_count']:.4f} same count ({r['n']})"
            print(msg, file=sys.stderr)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
