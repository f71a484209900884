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

With ``--act`` the case is anatomically-constrained tracking (``tckgen -act``):
``../shared/data/sift_phantom`` (``fods.mif``, ``5tt.mif``, ACT's defaults, ``--crop-at-gmwmi``
with ``--crop``), seeds uniform in the voxels where the 5TT's WM is above 0.5; each run also
tracks the first ``--numba-seeds`` seeds with the numba ACT kernel (tckgen-exact, one thread) and
reports its speed and the fraction of those seeds on which both kernels took the same decision
(status, point count, terminations).

Usage: ``python benchmarks/speed_gpu.py [--seeds 10000 100000 1000000] [--repeats 2] [--act
[--crop] [--numba-seeds 20000]]``
"""

from __future__ import annotations

import argparse
import functools
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
ACT_CASE = REPO.parent / "shared" / "data" / "sift_phantom"


def load_case():
    import nibabel as nib

    img = nib.load(str(CASE / "fod.nii.gz"))
    sh = np.asarray(img.dataobj, dtype=np.float32)
    mask = np.asarray(nib.load(str(CASE / "mask.nii.gz")).dataobj) > 0
    return sh, img.affine, img.header.get_zooms()[:3], mask


def load_act_case(crop: bool):
    """``(sh [X, Y, Z, K], scanner->voxel [3, 4], params (ACT defaults), act, WM mask of the
    5TT, its voxel->scanner affine)`` of the ACT case."""
    from invtract.io.image import load_fod
    from invtract.params import TrackingParameters
    from invtract.tracking.act import act_parameters, load_act

    fod = load_fod(ACT_CASE / "fods.mif")
    act = load_act(ACT_CASE / "5tt.mif", crop_at_gmwmi=crop)
    params = act_parameters(TrackingParameters(), fod.voxel_sizes).resolve(fod.voxel_sizes)
    affine = np.linalg.inv(np.vstack([act.scanner2voxel, [0, 0, 0, 1]]))
    wm = np.asarray(act.data[..., 2]) > 0.5
    sh = np.asarray(fod.data, np.float32)
    return sh, np.asarray(fod.scanner2voxel), params, act, wm, affine


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
    ap.add_argument("--act", action="store_true", help="the ACT case (sift_phantom, 5tt.mif)")
    ap.add_argument("--crop", action="store_true", help="ACT with -crop_at_gmwmi")
    ap.add_argument("--numba-seeds", type=int, default=20_000, help="ACT: seeds numba tracks")
    ap.add_argument("--child", choices=["compile", "warm"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.crop and not args.act:
        ap.error("--crop needs --act")
    if min(args.seeds) < 1 or args.numba_seeds < 1:
        ap.error("--seeds and --numba-seeds must be positive")
    if args.child:
        _child(args.child)
        return 0

    import torch

    sys.path.insert(0, str(REPO))
    if not torch.cuda.is_available():
        if args.act:  # the case loads (and the kernels import) without CUDA all the same
            load_act_case(args.crop)
            import invtract.tracking.act_cpu  # noqa: F401
            import invtract.tracking.fused_triton  # noqa: F401
        print(json.dumps({"cuda": False, "reason": "no CUDA device: nothing measured"}))
        return 0
    if args.act:
        print(json.dumps(act_speed(args), indent=1))
        return 0
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
        run = functools.partial(track_fused_triton, sh_dev, s2v, seeds_d, dirs_d, params)
        best, res = _best_of(run, args.repeats)
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


def _best_of(run, repeats: int):
    """``(best seconds, last result)`` of ``run()`` over ``repeats`` timed CUDA runs after one
    warm-up (peak GPU memory statistics reset after the warm-up)."""
    import torch

    run()  # warm-up
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    best, res = None, None
    for _ in range(max(1, repeats)):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        res = run()
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        best = dt if best is None else min(best, dt)
    return best, res


def act_speed(args) -> dict:
    """The ACT case: Triton ACT throughput per seed count, numba ACT on a subset beside it."""
    import torch

    from invtract.tracking.act_cpu import track_fused_cpu_act
    from invtract.tracking.fused_triton import track_fused_triton

    sh, s2v, params, act, wm, affine = load_act_case(args.crop)
    sh_dev = torch.as_tensor(sh, device="cuda")
    result = {"cuda": True, "device": torch.cuda.get_device_name(0), "case": "sift_phantom -act",
              "crop_at_gmwmi": bool(args.crop)}  # fmt: skip
    runs = []
    for n in args.seeds:
        seeds, dirs = random_seeds(wm, affine, n)
        run = functools.partial(track_fused_triton, sh_dev, s2v, seeds, dirs, params, act=act)
        best, res = _best_of(run, args.repeats)
        m = min(n, args.numba_seeds)
        t0 = time.perf_counter()
        ref = track_fused_cpu_act(sh, s2v, seeds[:m], dirs[:m], params, act)
        numba_s = time.perf_counter() - t0
        same = (
            (res.status[:m] == ref.status)
            & (res.lengths[:m] == ref.lengths)
            & (res.term[:m] == ref.term).all(axis=1)
        )
        steps = int(res.counts["steps"])
        runs.append(
            {
                "seeds": n,
                "seconds": best,
                "steps": steps,
                "steps_per_s": steps / best,
                "streamlines": int(res.accepted.sum()),
                "numba_seeds": m,
                "numba_seconds": numba_s,
                "numba_steps_per_s": int(ref.counts["steps"]) / numba_s,
                "same_decisions_frac": float(same.mean()),
            }
        )
    result["runs"] = runs
    return result


if __name__ == "__main__":
    sys.exit(main())
