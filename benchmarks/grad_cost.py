"""Cost of differentiable tracking: time and added memory, plain autograd vs efficient path.

Run with no arguments: prints one JSON object ``{"runs": [...], "workload": {...}}``. Each run
record has ``n``, ``max_points``, ``path`` (``plain`` / ``efficient`` / ``chunked``), ``device``,
``forward_s`` (the differentiable path's forward: ``track_differentiable`` until it returns,
graph recording on), ``forward_backward_s`` (forward plus ``loss.backward()``),
``peak_mem_mb`` (memory added by the run: CPU peak RSS minus RSS before tracking; CUDA
``torch.cuda.max_memory_allocated`` minus the allocation before) and ``points`` (streamline
vertices produced); efficient records also have ``nograd_forward_s`` (the fastest hard
tracker for the device, same seeds, no gradients: the baseline of the "forward + backward <= 2x
forward" goal; on CPU the fused numba engine, ``invtract track``'s default, on CUDA the Triton
engine when it imports, else ``track_torch``; named in ``nograd_engine``), ``fb_over_nograd``
and ``fb_over_nograd_cpu``, and the same against the torch engine (``track_torch``):
``nograd_forward_torch_s``, ``fb_over_nograd_torch``, ``fb_over_nograd_torch_cpu``. Every record
is measured in a fresh process, after a short warm-up (forward, backward and baselines on 8
seeds, 10 mm) that loads compiled kernels, so none of that is timed (the baseline engine's
warm-up runs after the differentiable run, so that its thread pool cannot affect it).

``chunked`` is the efficient path run through
:func:`~invtract.tracking.chunked.accumulate_gradients` (the same loss, a sum over streamlines,
back-propagated chunk by chunk, at most ``DEFAULT_MAX_STEPS`` streamline-steps alive at once);
its ``forward_s`` is the chunks' tracking and loss evaluation, ``chunks`` their number.

Workload (synthetic, generated here, deterministic): a single-fibre lmax-8 FOD on a
12 x 12 x 220 grid of 2.5 mm voxels whose fibre runs along +z and sways gently in x and y
(direction (0.08 sin(2 pi z / 60), 0.08 cos(2 pi z / 50), 1), z in voxels; lateral drift
< 1 voxel), a delta-like lobe (the truncated SH expansion of a point at the fibre direction) plus
a 5 % isotropic floor. Seeds: uniform in the 2 x 2 voxel core near z = 4 voxels, initial
direction (0, 0, 1). At tckgen's defaults (step 0.25 mm, max length 250 mm = 1003 points) every
streamline runs the full length; "double" doubles ``max_length_mm`` (2003 points). So
N = 10,000 at full length is 10^7 streamline-steps.

Plain autograd keeps a graph of ~4 kB per streamline-step (it would need ~40 GB at N = 10,000,
full length), so it runs at ``--plain-n`` (default 25 and 50) and its memory is also reported
extrapolated to the efficient runs' N (``plain_extrapolated``: affine in N through the two
measured N, since at fixed length it grows linearly in N on top of an N-independent part;
measured records are kept as they are). Its time is not extrapolated: at these N it is mostly
per-step Python overhead, nearly independent of N.
Plain records carry no baseline (``nograd_forward_s``): the time goal concerns the efficient
path.
``--hard-pass`` (``auto``, ``numba`` or ``torch``; recorded as ``hard_pass``) picks the engine
that records the hard pass (``differentiable.HARD_PASS``): ``torch`` times the torch engine's
record-peaks mode, the CUDA / float64 / ``refine`` path, on CPU.
Threads: ``--threads`` (default 1; the machine is shared, and single-threaded timings are
steadier; all paths and the baselines use the same setting: torch threads, and
``NUMBA_NUM_THREADS`` for the numba engine). Under load, wall-clock ratios are
noisy: ``fb_over_nograd_cpu`` is the same ratio in process CPU time (``time.process_time``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time

try:  # run from a checkout without an (editable) install
    import invtract  # noqa: F401
except ImportError:
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

SHAPE = (12, 12, 220)
VOXEL_MM = 2.5
LMAX = 8


def _rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return 0.0


def make_phantom():
    """``(sh [X, Y, Z, 45] float32, affine [4, 4])``: the gently swaying single-fibre FOD."""
    import numpy as np
    import torch

    from invtract.fod.sh import sh_basis

    z = torch.arange(SHAPE[2], dtype=torch.float64)
    d = torch.stack(
        [
            0.08 * torch.sin(2 * math.pi * z / 60.0),
            0.08 * torch.cos(2 * math.pi * z / 50.0),
            torch.ones_like(z),
        ],
        -1,
    )
    d = torch.nn.functional.normalize(d, dim=-1)
    lobe = sh_basis(d, LMAX)  # [Z, K]: delta at d, truncated at lmax 8
    iso = torch.zeros_like(lobe[0])
    iso[0] = 0.05 * float(lobe[0].abs().max())
    sh = (lobe + iso).to(torch.float32)[None, None].expand(SHAPE[0], SHAPE[1], -1, -1)
    affine = np.diag([VOXEL_MM, VOXEL_MM, VOXEL_MM, 1.0])
    affine[:3, 3] = [-15.0, -15.0, -20.0]
    return sh.contiguous(), affine


def _seeds(n: int, affine):
    import numpy as np
    import torch

    rng = np.random.default_rng(0)
    vox = np.stack(
        [rng.uniform(5.0, 7.0, n), rng.uniform(5.0, 7.0, n), rng.uniform(3.5, 4.5, n)], -1
    )
    seeds = torch.tensor(vox @ affine[:3, :3].T + affine[:3, 3], dtype=torch.float32)
    dirs = torch.tensor([[0.0, 0.0, 1.0]]).expand(n, 3).contiguous()
    return seeds, dirs


def _child(n: int, factor: int, path: str, device: str) -> dict:
    import torch

    from invtract.fod.field import FODField
    from invtract.params import TrackingParameters
    from invtract.tracking import differentiable
    from invtract.tracking.chunked import accumulate_gradients
    from invtract.tracking.differentiable import track_differentiable
    from invtract.tracking.engines import ENGINES, numba_available
    from invtract.tracking.tracker import track_torch

    sh, affine = make_phantom()
    sh = sh.to(device)
    seeds, dirs = _seeds(n, affine)
    zooms = (VOXEL_MM,) * 3
    grid = FODField.from_array(sh, affine, voxel_sizes=zooms)  # learnable copies go on it
    base = TrackingParameters().resolve(zooms)
    params = TrackingParameters(max_length_mm=base.max_length_mm * factor).resolve(zooms)
    seeds, dirs = seeds.to(device), dirs.to(device)
    cuda = device.startswith("cuda")

    def sync():
        if cuda:
            torch.cuda.synchronize()

    # warm-up (tables, lazy imports, compiled-kernel cache loads) on a few short streamlines:
    # forward, backward and the baseline, so that none of it is timed below
    short = TrackingParameters(max_length_mm=10.0, min_length_mm=1.0).resolve(zooms)
    shw = sh.clone().requires_grad_(True)
    diff_path = "efficient" if path == "chunked" else path
    w = track_differentiable(grid.with_sh(shw), seeds[:8], dirs[:8], short, path=diff_path)
    (w.points.sum(-1) * w.weights).sum().backward()
    track_torch(FODField.from_array(sh, affine, device=device), seeds[:8], dirs[:8], short)
    del w, shw
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = _rss_mb()
    shg = sh.clone().requires_grad_(True)
    t0, c0 = time.perf_counter(), time.process_time()
    if path == "chunked":  # gradient accumulation over chunks of seeds (a separable loss)
        counted, timings = [], {}

        def loss_fn(out, start):
            counted.append(int(out.lengths.sum()))
            return (out.points.sum(-1) * out.weights).sum()

        accumulate_gradients(loss_fn, grid.with_sh(shg), seeds, dirs, params, timings=timings)
        sync()
        fw = timings["forward_s"]
        points = sum(counted)
    else:
        res = track_differentiable(grid.with_sh(shg), seeds, dirs, params, path=path)
        sync()
        fw = time.perf_counter() - t0
        loss = (res.points.sum(-1) * res.weights).sum()
        loss.backward()
        points = int(res.lengths.sum())
        del res, loss
    sync()
    fb, fb_cpu = time.perf_counter() - t0, time.process_time() - c0
    if cuda:
        mem = (torch.cuda.max_memory_allocated() - before) / 2**20
    else:
        mem = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0 - before
    del shg
    rec = {
        "n": n,
        "max_points": params.max_points,
        "path": path,
        "device": device,
        "forward_s": round(fw, 3),
        "forward_backward_s": round(fb, 3),
        "peak_mem_mb": round(mem, 1),
        "points": points,
        "hard_pass": differentiable.HARD_PASS,
    }
    if path == "chunked":
        rec["chunks"] = timings["chunks"]
    if path == "plain":  # the time goal concerns the efficient paths: no baseline here
        return rec
    field = FODField.from_array(sh, affine, device=device)
    name, engine = _fastest_engine(device, ENGINES, numba_available)
    if name != "torch":  # load its compiled kernels (after the differentiable run)
        engine(field, seeds[:8], dirs[:8], short)
        sync()

    def timed(fn, **kw):
        t0, c0 = time.perf_counter(), time.process_time()
        fn(field, seeds, dirs, params, **kw)
        sync()
        return time.perf_counter() - t0, time.process_time() - c0

    ng, ng_cpu = timed(engine) if name != "torch" else (None, None)
    nt, nt_cpu = timed(track_torch, batch_size=max(n, 1))
    if ng is None:
        ng, ng_cpu = nt, nt_cpu
    rec["nograd_engine"] = name
    rec["nograd_forward_s"] = round(ng, 3)
    rec["fb_over_nograd"] = round(fb / ng, 3)
    rec["fb_over_nograd_cpu"] = round(fb_cpu / ng_cpu, 3)
    rec["nograd_forward_torch_s"] = round(nt, 3)
    rec["fb_over_nograd_torch"] = round(fb / nt, 3)
    rec["fb_over_nograd_torch_cpu"] = round(fb_cpu / nt_cpu, 3)
    return rec


def _fastest_engine(device: str, engines, numba_available):
    """``(name, engine)``: the fastest hard tracker for the device (numba on CPU, Triton on
    CUDA when it imports), else the torch engine."""
    if device.startswith("cuda"):
        try:
            import triton  # noqa: F401

            return "triton", engines["triton"]
        except Exception:
            return "torch", engines["torch"]
    if numba_available():
        return "numba", engines["numba"]
    return "torch", engines["torch"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--paths", nargs="+", default=["plain", "efficient", "chunked"])
    ap.add_argument("--factors", type=int, nargs="+", default=[1, 2])
    ap.add_argument(
        "--plain-n", type=int, nargs="+", default=[25, 50], help="N of the (measured) plain runs"
    )
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--devices", nargs="+", default=None, help="default: cpu (+ cuda)")
    ap.add_argument(
        "--hard-pass",
        choices=["auto", "numba", "torch"],
        default="auto",
        help="engine recording the hard pass (differentiable.HARD_PASS; default auto)",
    )
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        import torch

        from invtract.tracking import differentiable

        torch.set_num_threads(args.threads)
        differentiable.HARD_PASS = args.hard_pass
        n, f, path, dev = args.child
        print(json.dumps(_child(int(n), int(f), path, dev)))
        return 0
    import torch

    devices = args.devices or (["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    env = dict(
        os.environ,
        OMP_NUM_THREADS=str(args.threads),
        MKL_NUM_THREADS=str(args.threads),
        NUMBA_NUM_THREADS=str(args.threads),
    )
    runs = []

    def run(n, f, path, dev):
        cmd = [sys.executable, __file__, "--child", str(n), str(f), path, dev]
        cmd += ["--threads", str(args.threads), "--hard-pass", args.hard_pass]
        out = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if out.returncode != 0:
            err = out.stderr.strip().splitlines()[-1:]
            return {"n": n, "path": path, "device": dev, "factor": f, "error": err}
        return json.loads(out.stdout.strip().splitlines()[-1])

    for dev in devices:
        for f in args.factors:
            if "plain" in args.paths:
                for n in args.plain_n:
                    runs.append(run(n, f, "plain", dev))
            for path in ("efficient", "chunked"):
                if path in args.paths:
                    for n in args.n:
                        runs.append(run(n, f, path, dev))

    # plain extrapolated in N to each efficient run (affine a + b N through the two largest
    # measured N: the plain run has an N-independent part, ~170 MB here, that a proportional
    # scaling from small N would multiply; proportional when only one N was measured)
    def extrapolate(ps, key, n):
        if len(ps) == 1:
            return ps[0][key] * n / ps[0]["n"]
        (n0, y0), (n1, y1) = [(q["n"], q[key]) for q in ps[-2:]]
        return y1 + (y1 - y0) / (n1 - n0) * (n - n1)

    summary = []
    for r in runs:
        if r.get("path") not in ("efficient", "chunked") or "error" in r:
            continue
        ps = sorted(
            (
                q
                for q in runs
                if q.get("path") == "plain"
                and "error" not in q
                and q["device"] == r["device"]
                and q["max_points"] == r["max_points"]
            ),
            key=lambda q: q["n"],
        )
        row = {"n": r["n"], "max_points": r["max_points"], "device": r["device"]}
        row["path"] = r["path"]
        if ps:
            mem = extrapolate(ps, "peak_mem_mb", r["n"])
            row["plain_extrapolated"] = {
                "from_n": [q["n"] for q in ps[-2:]],
                "peak_mem_mb": round(mem, 1),
            }
            row["mem_ratio_plain_over_efficient"] = round(mem / max(r["peak_mem_mb"], 1e-9), 1)
        row["fb_over_nograd"] = r["fb_over_nograd"]
        row["fb_over_nograd_cpu"] = r.get("fb_over_nograd_cpu")
        row["nograd_engine"] = r.get("nograd_engine")
        row["fb_over_nograd_torch"] = r.get("fb_over_nograd_torch")
        row["fb_over_nograd_torch_cpu"] = r.get("fb_over_nograd_torch_cpu")
        summary.append(row)
    for row in summary:
        twin = next(
            (
                q
                for q in summary
                if q["n"] == row["n"]
                and q["device"] == row["device"]
                and q["path"] == row["path"]
                and q["max_points"] > row["max_points"]
            ),
            None,
        )
        if twin is not None:

            def efficient_mem(max_points, row=row):
                return next(
                    r["peak_mem_mb"]
                    for r in runs
                    if r.get("path") == row["path"]
                    and r["n"] == row["n"]
                    and r.get("max_points") == max_points
                    and r["device"] == row["device"]
                )

            a, b = efficient_mem(row["max_points"]), efficient_mem(twin["max_points"])
            row["mem_growth_double_length"] = round(b / max(a, 1e-9), 2)
    workload = {
        "fod": f"synthetic single fibre, lmax {LMAX}, {SHAPE} voxels of {VOXEL_MM} mm",
        "threads": args.threads,
    }
    print(json.dumps({"runs": runs, "summary": summary, "workload": workload}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
