"""ACT overhead: numba tracking with and without ``-act`` on the sift_phantom (same seeds).

Prints one JSON object: for each mode the best-of-``--repeat`` kernel seconds, propagation
steps and seconds per million steps; ``overhead_per_step`` = ACT / no-ACT time per step - 1
(the issue's goal: <= 0.20). Both runs are single-threaded (the ACT kernel runs one thread,
like ``tckgen -nthreads 0``), after a warm-up call (numba compile excluded). Seeds: random
points in the phantom's mask with random directions (``--seeds``, fixed RNG).

    python benchmarks/act_overhead.py [--data ../shared/data] [--seeds 20000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from invtract.io.image import load_fod, load_mask
from invtract.params import TrackingParameters
from invtract.tracking.act import act_parameters, load_act
from invtract.tracking.act_cpu import track_fused_cpu_act
from invtract.tracking.fused_cpu import track_fused_cpu

HERE = Path(__file__).resolve().parent


def _seeds(mask, n: int, rng: np.random.Generator):
    vox = np.argwhere(np.asarray(mask.data, bool)).astype(np.float64)
    pick = vox[rng.integers(0, len(vox), n)] + rng.uniform(-0.5, 0.5, (n, 3))
    pos = (mask.affine[:3, :3] @ pick.T).T + mask.affine[:3, 3]
    dirs = rng.normal(size=(n, 3))
    return pos.astype(np.float32), dirs.astype(np.float32)


def _best(fn, repeat: int):
    best, out = np.inf, None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", default=str(HERE.parent.parent / "shared" / "data"))
    p.add_argument("--seeds", type=int, default=20000)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args(argv)
    case = Path(args.data) / "sift_phantom"
    fod = load_fod(case / "fods.mif")
    act = load_act(case / "5tt.mif")
    params = act_parameters(TrackingParameters(), fod.voxel_sizes).resolve(fod.voxel_sizes)
    pos, dirs = _seeds(load_mask(case / "mask.mif"), args.seeds, np.random.default_rng(1))
    s2v = np.linalg.inv(fod.affine)[:3]
    sh = np.ascontiguousarray(fod.data, np.float32)
    runs = {
        "no_act": lambda: track_fused_cpu(sh, s2v, pos, dirs, params, nthreads=1, pool="numba"),
        "act": lambda: track_fused_cpu_act(sh, s2v, pos, dirs, params, act),
    }
    out = {"seeds": args.seeds, "note": "single thread, best of repeat, compile excluded"}
    for name, fn in runs.items():
        fn()  # warm-up / compile
        sec, res = _best(fn, args.repeat)
        steps = int(res.counts["steps"])
        out[name] = {
            "seconds": round(sec, 4),
            "steps": steps,
            "selected": int(res.accepted.sum()),
            "us_per_step": round(1e6 * sec / max(steps, 1), 4),
        }
    out["overhead_per_step"] = round(
        out["act"]["us_per_step"] / out["no_act"]["us_per_step"] - 1, 4
    )
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
