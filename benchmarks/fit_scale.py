"""Whole-brain fit scale: ``invtract fit --fit params`` of a ~500-streamline bundle on the
synthetic whole-brain FOD of ``benchmarks/scale.py``; prints one JSON object.

Builds the phantom of :mod:`benchmarks.scale` (``--size full``: 200 x 233 x 215 x 45 float32
``fod.mif``, 1.80 GB), makes a target bundle with ``tckgen -algorithm SD_Stream`` at a
non-default step (``--true-step``, default 0.5 mm against tckgen's 0.125 mm; ``--true-cutoff``,
``--true-angle`` default to tckgen's: the arcs run to ``max_dist`` at a constant fibre weight,
so on this phantom cutoff and angle never bind and only the step is identifiable), seeded in a
small sphere on the commissural arcs (``-seed_sphere``, ``-select --streamlines``,
``-output_seeds``), then runs ``invtract fit --target bundle.tck --target-seeds seeds.txt
--fod fod.mif --fit params`` as a whole process from tckgen's defaults, once in one process and
once with ``--nproc 2``. For each run: wall seconds, peak RSS (``/usr/bin/time``'s ``%M``: the
largest single process; and the peak of the summed RSS of the process tree, sampled every
0.1 s), iterations, final and best loss, recovered against true parameters; then the
``--nproc 2`` result's largest relative difference from the single-process ``result.json``
and its speed-up.

Usage: ``python benchmarks/fit_scale.py [--size full|half|small] [--streamlines 500]
[--iterations 60] [--fit params|fod] [--dwi] [--csd-alone] [--no-nproc2] [--keep]
[--workdir DIR] [--reuse DIR] [--no-warm]``
(``--reuse``: the folder of an earlier ``--keep`` run of the same size, phantom not rebuilt;
``--no-warm``: skip the untimed one-iteration fit that fills the numba cache; ``--fit fod``:
the same bundle fit learning the FOD instead, for its time and memory: the goals are the params
fit's; ``--dwi`` (with ``--fit fod``): the fit also gets the signal term, ``--dwi dwi.mif
--response response.txt --mask mask.mif`` (default config ``fit_fod_dwi``), on a DWI synthesised
from the phantom FOD (:data:`N_DIRS` directions at b = 2000 and one b = 0, Gaussian noise of
1/30 of a single-fibre voxel's b = 0 signal; the mask is the phantom's brain ellipsoid);
``--csd-alone``: also ``invtract fit --fit fod --dwi`` without a target (CSD over the whole
mask) and ``dwi2fod csd`` on the same files, timed side by side)
(``full`` needs ~4 GB of free disk and ~4 GB of memory per fitting process).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from scale import (  # noqa: E402
    RNG_SEED,
    SIZES,
    VOX,
    build_phantom,
    run_measured,
    tck_counts,
)

#: gradient directions of the synthetic DWI (``--dwi``), b = 2000
N_DIRS = 30
#: zonal SH response of the synthetic DWI (l = 0 .. 8, b = 2000; the phantom's dwi2response)
RESPONSE_ZSH = (1211.2, -732.1, 255.3, -65.1, 12.1)

#: keys of result.json compared between the one-process and the --nproc 2 fits
COMPARED = ("step_mm", "angle_deg", "cutoff", "final_loss", "best_loss")


def _tree_rss_kb(root: int) -> int:
    """Summed resident set (kB) of ``root`` and all its descendants (from ``/proc``)."""
    total, todo, seen = 0, [root], set()
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
                        break
            for tid in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{tid}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return total


def run_tree_measured(cmd: list, env: dict, cwd: str) -> dict:
    """:func:`scale.run_measured`, plus the peak summed RSS (MB) of the process tree."""
    peak = [0]
    done = threading.Event()

    def sample():
        me = os.getpid()
        while not done.is_set():
            kids = []
            for tid in os.listdir(f"/proc/{me}/task"):
                try:
                    with open(f"/proc/{me}/task/{tid}/children") as f:
                        kids += [int(c) for c in f.read().split()]
                except FileNotFoundError:
                    continue
            peak[0] = max(peak[0], sum(_tree_rss_kb(k) for k in kids))
            done.wait(0.1)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        out = run_measured(cmd, env=env, cwd=cwd)
    finally:
        done.set()
        t.join()
    out["rss_tree_peak_MB"] = peak[0] / 1024.0
    return out


def _seed_centre(phantom: dict) -> list[float]:
    """A point (scanner mm) on the top of the commissural arcs, away from the other families:
    normalised (0, 0, 0.27) of the brain ellipsoid (see ``scale._populations``)."""
    X, Y, Z = phantom["shape"][:3]
    return [0.0, 0.0, 0.27 * 0.38 * Z * VOX]


def make_target(work: str, phantom: dict, args) -> dict:
    """``bundle.tck`` and ``seeds.txt`` by tckgen (SD_Stream, the true cutoff and angle); one
    thread and a fixed ``MRTRIX_RNG_SEED``, so every run fits the same target."""
    c = _seed_centre(phantom)
    sphere = ",".join(f"{v:.4f}" for v in c) + f",{args.seed_radius}"
    cmd = ["tckgen", "fod.mif", "bundle.tck", "-algorithm", "SD_Stream", "-seed_sphere", sphere,
           "-select", str(args.streamlines), "-cutoff", str(args.true_cutoff),
           "-angle", str(args.true_angle), "-output_seeds", "seeds.txt", "-nthreads", "0",
           *(["-step", str(args.true_step)] if args.true_step else []),
           "-force", "-quiet"]  # fmt: skip
    r = run_measured(cmd, dict(os.environ, MRTRIX_RNG_SEED=str(RNG_SEED)), cwd=work)
    r.pop("stdout", None)
    return {"seed_sphere_mm": sphere, **r, **tck_counts(os.path.join(work, "bundle.tck"))}


def make_dwi(work: str, phantom: dict) -> dict:
    """``dwi.mif`` (``[X, Y, Z, 1 + N_DIRS]`` float32 with its ``dw_scheme``), ``mask.mif``
    (the brain ellipsoid: non-zero FOD) and ``response.txt`` from ``fod.nii``, slab by slab."""
    import torch
    from scale import _mif_header, phantom_affine

    from invtract.fit.objective import fibonacci_sphere
    from invtract.fod.csd import Response, csd_model, predict_signal
    from invtract.io.mif import write_mif

    t0 = time.perf_counter()
    X, Y, Z, K = phantom["shape"]
    affine = phantom_affine((X, Y, Z))
    grad = np.zeros((1 + N_DIRS, 4))
    grad[1:, :3] = fibonacci_sphere(N_DIRS).numpy()
    grad[1:, 3] = 2000.0
    zsh = np.array([RESPONSE_ZSH])
    with open(os.path.join(work, "response.txt"), "w") as f:
        f.write("# Shells: 2000\n" + " ".join(f"{v:g}" for v in zsh[0]) + "\n")
    model = csd_model(grad, Response(zsh, (2000.0,)))
    b0_per_c0 = zsh[0, 0] * math.sqrt(4 * math.pi)
    sigma = b0_per_c0 * 0.5 * 0.28 / 30.0  # a single-fibre voxel's c0 is ~0.5 * 0.28
    scheme = [f"dw_scheme: {g[0]:.8f},{g[1]:.8f},{g[2]:.8f},{g[3]:g}" for g in grad]
    fod = np.memmap(os.path.join(work, "fod.nii"), np.float32, "r", offset=352,
                    shape=(X, Y, Z, K), order="F")  # fmt: skip
    mask = np.zeros((X, Y, Z), bool)
    rng = np.random.default_rng(RNG_SEED)
    with open(os.path.join(work, "dwi.mif"), "wb") as f:
        f.write(_mif_header((X, Y, Z, 1 + N_DIRS), affine, "Float32LE", "+1,+2,+3,+0", scheme))
        for z in range(Z):
            c = torch.from_numpy(np.ascontiguousarray(fod[:, :, z, :], np.float64)).reshape(-1, K)
            sig = np.empty((c.shape[0], 1 + N_DIRS))
            sig[:, 0] = b0_per_c0 * c[:, 0].numpy()
            sig[:, 1:] = predict_signal(c, model.M).numpy()
            inside = c[:, 0].numpy() != 0
            sig[inside] += rng.normal(0.0, sigma, (int(inside.sum()), 1 + N_DIRS))
            sig[~inside] = 0.0
            mask[:, :, z] = inside.reshape(X, Y)
            f.write(sig.reshape(X, Y, -1).transpose(1, 0, 2).astype(np.float32).tobytes())
    write_mif(os.path.join(work, "mask.mif"), mask.astype(np.uint8), affine)
    return {"n_directions": N_DIRS, "bvalue": 2000.0, "noise_sigma": sigma,
            "mask_voxels": int(mask.sum()), "dwi_GB": X * Y * Z * (1 + N_DIRS) * 4 / 1e9,
            "t_generate_s": time.perf_counter() - t0}  # fmt: skip


DWI_ARGS = ["--dwi", "dwi.mif", "--response", "response.txt", "--mask", "mask.mif"]


def run_csd_alone(work: str, args) -> dict:
    """``invtract fit --fit fod --dwi`` without a target (CSD over the mask) and ``dwi2fod
    csd`` on the same files, each as a whole process."""
    env = dict(os.environ, PYTHONPATH=str(REPO), NUMBA_NUM_THREADS=str(args.threads))
    cmd = [sys.executable, "-m", "invtract.cli", "-q", "fit", "--fit", "fod", *DWI_ARGS,
           "--run", os.path.join(work, "csd"), "--no-tensorboard", "--no-progress",
           "--force"]  # fmt: skip
    print("invtract fit --dwi (CSD alone) ...", file=sys.stderr)
    ours = run_measured(cmd, env=env, cwd=work)
    ours.pop("stdout", None)
    mr = ["dwi2fod", "csd", "dwi.mif", "response.txt", "csd_mrtrix.mif", "-lmax", "8",
          "-mask", "mask.mif", "-nthreads", str(args.threads), "-force", "-quiet"]  # fmt: skip
    print("dwi2fod csd ...", file=sys.stderr)
    theirs = run_measured(mr, env=dict(os.environ), cwd=work)
    theirs.pop("stdout", None)
    return {"invtract": ours, "dwi2fod": theirs}


def run_fit(work: str, run: str, args, nproc: int) -> dict:
    """``invtract fit`` as a whole process; its measurements and result.json."""
    cmd = [sys.executable, "-m", "invtract.cli", "-q", "fit", "--target", "bundle.tck",
           "--target-seeds", "seeds.txt", "--fod", "fod.mif", "--fit", args.fit,
           "--run", os.path.join(work, run), "--iterations", str(args.iterations),
           "--no-tensorboard", "--no-progress", "--nproc", str(nproc), "--force",
           *(DWI_ARGS if args.dwi else [])]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(REPO), NUMBA_NUM_THREADS=str(args.threads))
    print(f"invtract fit --nproc {nproc} ...", file=sys.stderr)
    r = run_tree_measured(cmd, env, work)
    r.pop("stdout", None)
    with open(os.path.join(work, run, "result.json")) as f:
        res = json.load(f)
    if args.dwi:
        sig = res.get("signal") or {}
        r["signal"] = {k: sig.get(k) for k in ("sigma", "spatial", "weight") if k in sig}
    keys = ("step_mm", "angle_deg", "cutoff", "final_loss", "best_loss", "best_iteration",
            "iterations", "n_train", "n_heldout", "start_heldout_mdf_mm",
            "final_heldout_mdf_mm", "n_fitted_streamlines")  # fmt: skip
    return {**r, **{k: res.get(k) for k in keys}}


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-300)


def _run(args, work: str) -> dict:
    if args.reuse:
        X, Y, Z = SIZES[args.size]
        phantom = {"shape": [X, Y, Z, 45], "voxel_mm": VOX, "fod_GB": X * Y * Z * 45 * 4 / 1e9}
        phantom["reused"] = True
    else:
        print(f"building the {args.size} phantom in {work} ...", file=sys.stderr)
        phantom = build_phantom(SIZES[args.size], work)
        for k in ("_fibre", "_affine"):
            phantom.pop(k)
    dwi = None
    if args.dwi:
        print("synthetic DWI ...", file=sys.stderr)
        dwi = make_dwi(work, phantom)
    print("tckgen target ...", file=sys.stderr)
    target = make_target(work, phantom, args)
    if not args.no_warm:  # compile (or load from the cache) the kernels, untimed
        warm = argparse.Namespace(**{**vars(args), "iterations": 1})
        run_fit(work, "warm", warm, 1)
    one = run_fit(work, "fit1", args, 1)
    true = {"step_mm": args.true_step or 0.1 * VOX, "angle_deg": args.true_angle,
            "cutoff": args.true_cutoff}  # fmt: skip
    out = {
        "case": f"synthetic whole-brain phantom ({args.size}), SD_Stream bundle, {args.fit} fit",
        "phantom": phantom,
        "target": target,
        "true": true,
        "threads": args.threads,
        "fit": one,
        "recovered_error": {k: one[k] - v for k, v in true.items()},
    }
    if dwi is not None:
        out["dwi"] = dwi
        out["case"] += " with the signal term (--dwi)"
        if args.csd_alone:
            out["csd_alone"] = run_csd_alone(work, args)
    if not args.no_nproc2:
        two = run_fit(work, "fit2", args, 2)
        out["fit_nproc2"] = two
        out["nproc2_max_rel_diff"] = max(_rel(one[k], two[k]) for k in COMPARED)
        out["nproc2_speedup"] = one["wall_s"] / two["wall_s"]
    out["goals"] = {"wall_s_max": 90.0, "rss_peak_MB_max": 3500.0, "nproc2_rel_diff_max": 1e-9}
    out["load_average"] = os.getloadavg()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="full")
    ap.add_argument("--streamlines", type=int, default=500, help="target streamlines")
    ap.add_argument("--true-cutoff", type=float, default=0.1)
    ap.add_argument("--true-angle", type=float, default=60.0)
    ap.add_argument(
        "--true-step", type=float, default=0.5, help="target step (mm; 0: tckgen's default)"
    )
    ap.add_argument("--seed-radius", type=float, default=3.0, help="seed sphere radius (mm)")
    ap.add_argument("--iterations", type=int, default=60)
    ap.add_argument(
        "--fit",
        choices=("params", "fod"),
        default="params",
        help="what the fit learns (the goals are for params; fod: the FOD fit's time and memory)",
    )
    ap.add_argument(
        "--dwi", action="store_true", help="fod fit with the signal term (synthetic DWI)"
    )
    ap.add_argument(
        "--csd-alone", action="store_true", help="with --dwi: CSD alone and dwi2fod, timed"
    )
    ap.add_argument("--threads", type=int, default=2, help="NUMBA_NUM_THREADS")
    ap.add_argument("--no-nproc2", action="store_true", help="skip the --nproc 2 fit")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    ap.add_argument("--workdir", help="parent folder of the temporary folder")
    ap.add_argument("--reuse", help="a folder holding this size's fod.mif (kept --keep run)")
    ap.add_argument("--no-warm", action="store_true", help="skip the untimed warm-up fit")
    args = ap.parse_args(argv)
    if args.dwi and args.fit != "fod":
        ap.error("--dwi needs --fit fod")
    if args.csd_alone and not args.dwi:
        ap.error("--csd-alone needs --dwi")
    if shutil.which("tckgen") is None:
        print(json.dumps({"error": "tckgen (MRtrix3) not found on PATH"}))
        return 1
    work = args.reuse or tempfile.mkdtemp(prefix="invtract_fit_scale_", dir=args.workdir)
    try:
        result = _run(args, work)
    finally:
        if args.keep or args.reuse:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result, indent=1, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
