"""Throughput of the fused Triton engine on one CUDA GPU (goal: >= 500 M steps/s at 1 M seeds).

Case: ``../shared/data/real_msmt15`` (lmax 8, default SD_Stream rules, both directions). Seeds
are uniform random points in the voxels of ``mask.nii.gz`` with random (Gaussian) raw start
directions, fixed RNG seed. For each seed count the engine runs once to warm up and then
``--repeats`` times; the best wall time is reported (kernels, on-device packing and the copy of
the packed points to the host included).

Compile time and start-up are measured in fresh processes with their own Triton cache folder:
``compile_s`` is the first launch with an empty cache (compilation included), ``warm_start_s``
is a second process's import + first launch with that cache (the goal is < 5 s). Prints one
JSON object; without CUDA it prints ``{"cuda": false, ...}`` and exits 0.

Usage: ``python benchmarks/speed_gpu.py [--seeds 10000 100000 1000000] [--repeats 2]``
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CASE = REPO.parent / "shared" / "data" / "real_msmt15"


def load_case():
    import nibabel as nib

    img = nib.load(str(CASE / "fod.nii.gz"))
    sh = np.asarray(img.dataobj, dtype=np.float32)
    mask = np.asarray(nib.load(str(CASE / "mask.nii.gz")).dataobj) > 0
    return sh, img.affine, img.header.get_zooms()[:3], mask


def random_seeds(mask, affine, n, seed=0):
    """``n`` uniform random points in the mask's voxels (scanner mm) and raw directions."""
    rng = np.random.default_rng(seed)
    vox = np.argwhere(mask)
    pick = vox[rng.integers(0, len(vox), n)] + rng.uniform(-0.5, 0.5, (n, 3))
    pts = pick @ affine[:3, :3].T + affine[:3, 3]
    return pts.astype(np.float32), rng.normal(size=(n, 3)).astype(np.float32)


def _child(mode: str) -> None:
    """One fresh process: import + one tiny launch; prints the seconds taken as JSON."""
    t0 = time.perf_counter()
    import torch

    from invtract.params import TrackingParameters
    from invtract.tracking.fused_triton import track_fused_triton

    sh, affine, vox, mask = load_case()
    params = TrackingParameters().resolve(vox)
    seeds, dirs = random_seeds(mask, affine, 256)
    t1 = time.perf_counter()
    track_fused_triton(sh, np.linalg.inv(affine)[:3], seeds, dirs, params)
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    print(json.dumps({"mode": mode, "total_s": t2 - t0, "first_launch_s": t2 - t1}))


def _run_child(mode: str, cache: str) -> dict:
    env = dict(os.environ, TRITON_CACHE_DIR=cache, PYTHONPATH=str(REPO))
    env.pop("TRITON_INTERPRET", None)
    out = subprocess.run(
        [sys.executable, __file__, "--child", mode],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--child", choices=["compile", "warm"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        _child(args.child)
        return 0

    import torch

    if not torch.cuda.is_available():
        print(json.dumps({"cuda": False, "reason": "no CUDA device: nothing measured"}))
        return 0
    sys.path.insert(0, str(REPO))
    from invtract.params import TrackingParameters
    from invtract.tracking.fused_triton import track_fused_triton

    result = {"cuda": True, "device": torch.cuda.get_device_name(0), "case": str(CASE.name)}
    with tempfile.TemporaryDirectory() as cache:
        result["compile_s"] = _run_child("compile", cache)["first_launch_s"]
        warm = _run_child("warm", cache)
        result["warm_start_s"] = warm["total_s"]
        result["warm_first_launch_s"] = warm["first_launch_s"]

    sh, affine, vox, mask = load_case()
    params = TrackingParameters().resolve(vox)
    s2v = np.linalg.inv(affine)[:3]
    sh_dev = torch.as_tensor(sh, device="cuda")
    runs = []
    for n in args.seeds:
        seeds, dirs = random_seeds(mask, affine, n)
        seeds_d = torch.as_tensor(seeds, device="cuda")
        dirs_d = torch.as_tensor(dirs, device="cuda")
        track_fused_triton(sh_dev, s2v, seeds_d, dirs_d, params)  # warm-up
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        best = None
        for _ in range(max(1, args.repeats)):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            res = track_fused_triton(sh_dev, s2v, seeds_d, dirs_d, params)
            torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            best = dt if best is None else min(best, dt)
        steps = int(res.counts["steps"])
        runs.append(
            {
                "seeds": n,
                "seconds": best,
                "steps": steps,
                "steps_per_s": steps / best,
                "streamlines": int(res.accepted.sum()),
                "streamlines_per_s": float(res.accepted.sum()) / best,
                "seeds_per_s": n / best,
                "chunks": int(res.counts["chunks"]),
                "peak_gpu_mem_gb": torch.cuda.max_memory_allocated() / 2**30,
            }
        )
    result["runs"] = runs
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
