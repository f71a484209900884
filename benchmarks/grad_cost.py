"""Cost of differentiable tracking: time and added memory, plain autograd vs efficient path.

Run with no arguments: prints one JSON object ``{"runs": [...]}``; each record has ``n``,
``max_points``, ``path`` (``plain`` / ``efficient``), ``device``, ``forward_s`` (no-grad forward),
``forward_backward_s`` and ``peak_mem_mb`` (CPU: peak RSS minus RSS before tracking; CUDA:
``torch.cuda.max_memory_allocated``), each measured in a fresh process.

Seeds: uniform random points (fixed RNG) in the mask voxels of the shared real FOD
(``../shared/data/real_msmt15``), fixed ``seed_direction`` (0, 0, 1) as initial direction; "full
default length" is tckgen's default max length (max_points 1003), "double" is 2x max_length_mm.
On this FOD streamlines end well before max length, so doubling it changes few tracks.
``--n 200 1000`` etc. reduces the sizes; ``--paths efficient`` skips plain autograd.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "real_msmt15"


def _rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return 0.0


def _child(n: int, factor: int, path: str, device: str) -> dict:
    import nibabel as nib
    import numpy as np
    import torch

    from invtract.params import TrackingParameters
    from invtract.tracking.differentiable import track_differentiable

    img = nib.load(str(DATA / "fod.nii.gz"))
    sh = torch.tensor(np.asarray(img.dataobj, np.float32), device=device)
    mask = np.asarray(nib.load(str(DATA / "mask.nii.gz")).dataobj) > 0
    rng = np.random.default_rng(0)
    vox = np.argwhere(mask)[rng.integers(0, int(mask.sum()), n)] + rng.uniform(-0.5, 0.5, (n, 3))
    seeds = torch.tensor(vox @ img.affine[:3, :3].T + img.affine[:3, 3], dtype=torch.float32)
    dirs = torch.tensor([[0.0, 0.0, 1.0]]).expand(n, 3).contiguous()
    zooms = img.header.get_zooms()[:3]
    base = TrackingParameters().resolve(zooms)
    params = TrackingParameters(max_length_mm=base.max_length_mm * factor).resolve(zooms)
    seeds, dirs = seeds.to(device), dirs.to(device)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = _rss_mb()
    shg = sh.clone().requires_grad_(True)
    t0 = time.perf_counter()
    res = track_differentiable(shg, img.affine, seeds, dirs, params, path=path, voxel_sizes=zooms)
    loss = (res.points.sum(-1) * res.weights).sum()
    loss.backward()
    if cuda:
        torch.cuda.synchronize()
    fb = time.perf_counter() - t0
    if cuda:
        mem = (torch.cuda.max_memory_allocated() - before) / 2**20
    else:
        mem = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0 - before
    steps = int(res.lengths.sum())
    del res, loss
    t0 = time.perf_counter()
    with torch.no_grad():
        track_differentiable(sh, img.affine, seeds, dirs, params, voxel_sizes=zooms)
    fw = time.perf_counter() - t0
    return {
        "n": n,
        "max_points": params.max_points,
        "path": path,
        "device": device,
        "forward_s": round(fw, 3),
        "forward_backward_s": round(fb, 3),
        "peak_mem_mb": round(mem, 1),
        "points": steps,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--paths", nargs="+", default=["plain", "efficient"])
    ap.add_argument("--factors", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        n, f, path, dev = args.child
        print(json.dumps(_child(int(n), int(f), path, dev)))
        return 0
    import torch

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    runs = []
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    for dev in devices:
        for n in args.n:
            for f in args.factors:
                for path in args.paths:
                    cmd = [sys.executable, __file__, "--child", str(n), str(f), path, dev]
                    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
                    if out.returncode != 0:
                        runs.append(
                            {
                                "n": n,
                                "path": path,
                                "device": dev,
                                "error": out.stderr.strip().splitlines()[-1:],
                            }
                        )
                        continue
                    runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(json.dumps({"runs": runs}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
