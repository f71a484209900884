"""ACT overhead: numba tracking with and without ``-act`` on the sift_phantom (same seeds).

Prints one JSON object: for each mode the best-of-``--repeat`` kernel seconds, propagation
steps and seconds per million steps; ``overhead_per_step`` = ACT / no-ACT time per step - 1
(the issue's goal: <= 0.20). Both runs are single-threaded (the ACT kernel runs one thread,
like ``tckgen -nthreads 0``), after a warm-up call (numba compile excluded). Seeds: random
points in the phantom's mask with random directions (``--seeds``, fixed RNG). ``act_sgm``: the
same seeds on ``tests/data/act/5tt_sgm.mif`` (sub-cortical GM: EXIT_SGM truncations).

``gmwmi``: ``-seed_gmwmi`` end to end (seeding, ACT seed checks, tracking; ``--select``
streamlines, ``MRTRIX_RNG_SEED`` 20240601): invtract's seconds (best of ``--repeat``, warm) and,
when ``tckgen`` is on the PATH, tckgen's wall seconds for the same command (``-nthreads 0``) and
whether the outputs are bit-identical.

    python benchmarks/act_overhead.py [--data ../shared/data] [--seeds 20000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
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


def _gmwmi(case: Path, fod, select: int, repeat: int) -> dict:
    """-seed_gmwmi end to end: invtract (warm) and tckgen seconds, bit-identity."""
    from invtract.fod.field import FODField
    from invtract.io.tractogram import load_tractogram
    from invtract.tracking.api import Seeding, track
    from invtract.tracking.seeding_gmwmi import load_gmwmi_seeder

    act = load_act(case / "5tt.mif")
    field = FODField.from_image(fod)

    def run():
        seeding = Seeding("gmwmi", gmwmi=load_gmwmi_seeder(case / "gmwmi.mif", act))
        return track(field, seeding, TrackingParameters(),
                     engine="numba", select=select, rng_seed=20240601, act=act)  # fmt: skip

    run()
    sec, res = _best(run, repeat)
    out = {"select": select, "invtract_seconds": round(sec, 4),
           "generated": int(res.summary["generated"])}  # fmt: skip
    if shutil.which("tckgen") is None:
        return out
    with tempfile.TemporaryDirectory() as tmp:
        tck = os.path.join(tmp, "g.tck")
        cmd = ["tckgen", str(case / "fods.mif"), tck, "-algorithm", "SD_Stream", "-act",
               str(case / "5tt.mif"), "-seed_gmwmi", str(case / "gmwmi.mif"), "-select",
               str(select), "-nthreads", "0", "-quiet", "-force"]  # fmt: skip
        env = dict(os.environ, MRTRIX_RNG_SEED="20240601")
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, env=env)
        out["tckgen_seconds"] = round(time.perf_counter() - t0, 4)
        ref = load_tractogram(tck).to_list()
    ours = res.streamlines.to_list()
    out["bit_identical"] = len(ref) == len(ours) and all(
        a.shape == b.shape and np.array_equal(a, b) for a, b in zip(ours, ref)
    )
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", default=str(HERE.parent.parent / "shared" / "data"))
    p.add_argument("--seeds", type=int, default=20000)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--select", type=int, default=2000, help="streamlines of the gmwmi run")
    args = p.parse_args(argv)
    case = Path(args.data) / "sift_phantom"
    fod = load_fod(case / "fods.mif")
    act = load_act(case / "5tt.mif")
    params = act_parameters(TrackingParameters(), fod.voxel_sizes).resolve(fod.voxel_sizes)
    pos, dirs = _seeds(load_mask(case / "mask.mif"), args.seeds, np.random.default_rng(1))
    s2v = np.linalg.inv(fod.affine)[:3]
    sh = np.ascontiguousarray(fod.data, np.float32)
    sgm = load_act(HERE.parent / "tests" / "data" / "act" / "5tt_sgm.mif")
    runs = {
        "no_act": lambda: track_fused_cpu(sh, s2v, pos, dirs, params, nthreads=1, pool="numba"),
        "act": lambda: track_fused_cpu_act(sh, s2v, pos, dirs, params, act),
        "act_sgm": lambda: track_fused_cpu_act(sh, s2v, pos, dirs, params, sgm),
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
    for name in ("act", "act_sgm"):
        out[f"overhead_per_step_{name}" if name != "act" else "overhead_per_step"] = round(
            out[name]["us_per_step"] / out["no_act"]["us_per_step"] - 1, 4
        )
    out["gmwmi"] = _gmwmi(case, fod, args.select, args.repeat)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
