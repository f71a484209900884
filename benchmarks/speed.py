"""Throughput of the fused CPU engine against ``tckgen -nthreads 2`` on the same FOD and seeds.

Case: ``../shared/data/real_msmt15`` with ``-seed_grid_per_voxel mask.mif 2`` (17,744 seeds) and
tckgen's random initial directions. Our side builds the grid seeds and replays tckgen's
single-thread RNG stream with the package's own seeding code (``tracking.seeding``,
``tracking.rng``), then tracks with :func:`track_fused_cpu`.

Timings are wall clock of whole processes: ``cold`` runs with an empty numba cache (includes
compilation), ``warm`` runs in fresh processes that load the cache; tckgen is timed the same
way, interleaved with ours because the machine is shared. ``cli_warm`` times the command a user
runs, ``invtract track fod.mif out.tck --seed-grid-per-voxel mask.mif 2 --rng-seed S`` (a whole
process: imports, loading, seeding, tracking, writing the .tck), which is what the goal is about;
``fused_warm`` is the same work as a lean script that skips the CLI. Prints one JSON object.

The package's bytecode is compiled first (``compileall``), as ``pip install`` does: in an
editable checkout under ``PYTHONDONTWRITEBYTECODE=1`` (these machines set it) every process
would otherwise recompile every invtract module from source.

Usage: ``python benchmarks/speed.py [--repeats 3] [--threads 2]``
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CASE = REPO.parent / "shared" / "data" / "real_msmt15"
RNG_SEED = 20240601
GRID = 2


def run_ours(threads: int, memory: bool = False) -> dict:
    """One tracking run in this process; returns timings and counts (JSON-able).

    With ``memory`` a second, untimed tracking call runs under tracemalloc (which slows Python
    code and compilation, so it never runs in a timed process).
    """
    import tracemalloc

    t_start = time.perf_counter()
    import nibabel as nib

    from invtract.params import TrackingParameters
    from invtract.tracking import fused_cpu
    from invtract.tracking.rng import MRtrixRNG
    from invtract.tracking.seeding import MaskGrid, grid_per_voxel

    t_import = time.perf_counter()
    img = nib.load(str(CASE / "fod.nii.gz"))
    sh = np.asarray(img.dataobj, dtype=np.float32)
    s2v = np.linalg.inv(img.affine)[:3]
    mask = np.asarray(nib.load(str(CASE / "mask.nii.gz")).dataobj) != 0
    seeds = grid_per_voxel(MaskGrid.from_image(mask, img.affine), GRID)
    params = TrackingParameters().resolve(img.header.get_zooms()[:3])
    t_load = time.perf_counter()
    has_data = fused_cpu.seeds_have_data(sh, s2v, seeds)  # tckgen draws a direction for these
    dirs = np.full(seeds.shape, np.nan, np.float32)
    dirs[has_data] = MRtrixRNG(RNG_SEED).directions(int(has_data.sum()))
    t_dirs = time.perf_counter()
    res = fused_cpu.track_fused_cpu(sh, s2v, seeds, dirs, params, nthreads=threads)
    t_track = time.perf_counter()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    py_peak = float("nan")
    if memory:
        tracemalloc.start()
        fused_cpu.track_fused_cpu(sh, s2v, seeds, dirs, params, nthreads=threads)
        _, py_peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    acc = res.accepted
    return {
        "seeds": int(len(seeds)),
        "accepted": int(acc.sum()),
        "vertices": int(res.lengths[acc].sum()),
        "steps": int(res.counts["steps"]),
        "t_import_s": t_import - t_start,
        "t_load_s": t_load - t_import,
        "t_seeds_dirs_s": t_dirs - t_load,
        "t_track_s": t_track - t_dirs,
        "t_track_kernel_s": float(res.counts["seconds"]),
        "t_total_s": t_track - t_start,
        "tracemalloc_peak_MB": py_peak / 1e6,
        "rss_peak_MB": rss,
    }


def _child(threads: int, cache_dir: str, memory: bool = False) -> dict:
    env = dict(os.environ, NUMBA_CACHE_DIR=cache_dir)
    cmd = [sys.executable, __file__, "--child", "--threads", str(threads)]
    cmd += ["--memory"] if memory else []
    t0 = time.perf_counter()
    out = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, check=True)
    wall = time.perf_counter() - t0
    data = json.loads(out.stdout.strip().splitlines()[-1])
    data["wall_s"] = wall
    return data


def _timed_run(cmd: list, env: dict, out: str) -> dict:
    """Wall time of a tracking command run in the case folder, and what it wrote to ``out``."""
    import nibabel as nib

    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, cwd=CASE, check=True, capture_output=True)
    wall = time.perf_counter() - t0
    lengths = [len(s) for s in nib.streamlines.load(out).streamlines]
    return {"wall_s": wall, "accepted": len(lengths), "vertices": int(sum(lengths))}


def _tckgen(threads: int, out_dir: str) -> dict:
    out = os.path.join(out_dir, "tckgen.tck")
    cmd = ["tckgen", "fod.mif", out, "-algorithm", "SD_Stream", "-seed_grid_per_voxel"]
    cmd += ["mask.mif", str(GRID), "-nthreads", str(threads), "-force", "-quiet"]
    return _timed_run(cmd, dict(os.environ, MRTRIX_RNG_SEED=str(RNG_SEED)), out)


def _cli(cache_dir: str, out_dir: str) -> dict:
    out = os.path.join(out_dir, "invtract.tck")
    cmd = [sys.executable, "-m", "invtract.cli", "-q", "track", "fod.mif", out]
    cmd += ["--seed-grid-per-voxel", "mask.mif", str(GRID), "--rng-seed", str(RNG_SEED), "--force"]
    return _timed_run(cmd, dict(os.environ, NUMBA_CACHE_DIR=cache_dir), out)


def _rate(d: dict) -> dict:
    w = d["wall_s"]
    out = {"streamlines_per_s": d["accepted"] / w, "vertices_per_s": d["vertices"] / w}
    if "steps" in d:
        out["steps_per_s"] = d["steps"] / w
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--memory", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(run_ours(args.threads, args.memory)))
        return 0
    if not CASE.exists():
        print(json.dumps({"error": f"reference data not found at {CASE}"}))
        return 1
    import compileall

    import invtract

    compileall.compile_dir(os.path.dirname(invtract.__file__), quiet=1)
    work = tempfile.mkdtemp(prefix="invtract_speed_")
    cache = os.path.join(work, "numba_cache")
    try:
        cold = _child(args.threads, cache)
        _cli(cache, work)  # compiles the CLI path's kernels into the cache
        warm, tck, cli = [], [], []
        for _ in range(args.repeats):
            tck.append(_tckgen(args.threads, work))
            warm.append(_child(args.threads, cache))
            cli.append(_cli(cache, work))
        tck0 = _tckgen(0, work)
        mem = _child(args.threads, cache, memory=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def median_run(runs):
        return sorted(runs, key=lambda d: d["wall_s"])[len(runs) // 2]

    w, t, c = median_run(warm), median_run(tck), median_run(cli)
    result = {
        "case": "real_msmt15 -seed_grid_per_voxel mask.mif 2 (random initial directions)",
        "threads": args.threads,
        "seeds": w["seeds"],
        "tckgen": {
            **t,
            **_rate(t),
            "wall_all_s": [round(x["wall_s"], 3) for x in tck],
            "nthreads0_single": tck0,
        },
        "fused_cold": {**cold, **_rate(cold)},
        "fused_warm": {**w, **_rate(w), "wall_all_s": [round(x["wall_s"], 3) for x in warm]},
        "cli_warm": {**c, **_rate(c), "wall_all_s": [round(x["wall_s"], 3) for x in cli]},
        "fused_memory": {
            "tracemalloc_peak_MB": mem["tracemalloc_peak_MB"],
            "rss_peak_MB": mem["rss_peak_MB"],
        },
        "compile_s_estimate": cold["t_track_s"] - w["t_track_s"],
        "ratio_vertices_per_s_warm_vs_tckgen": _rate(w)["vertices_per_s"]
        / _rate(t)["vertices_per_s"],
        "ratio_vertices_per_s_cli_warm_vs_tckgen": _rate(c)["vertices_per_s"]
        / _rate(t)["vertices_per_s"],
        "ratio_vertices_per_s_cold_vs_tckgen": _rate(cold)["vertices_per_s"]
        / _rate(t)["vertices_per_s"],
        "ratio_tracking_kernel_only_vs_tckgen": (w["vertices"] / w["t_track_kernel_s"])
        / _rate(t)["vertices_per_s"],
        "reference_nthreads0_accepted": 7132,
        "load_average": os.getloadavg(),
    }
    print(json.dumps(result, indent=1, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
