"""Time and peak memory of every tractogram loss and its gradient.

Prints one JSON object. For each device (CPU, and CUDA when available) and each size (default
1k, 10k, 100k streamlines) it runs each loss forward and forward+backward once (after a small
warm-up) and records wall time and the peak memory above the level before the call (CPU: peak
resident set size, sampled every millisecond, with glibc's mmap threshold pinned so freed
tensors go back to the OS; CUDA: ``torch.cuda.max_memory_allocated``).

Streamlines are the real whole-volume tractogram ``real_msmt15/whole.tck`` (7,132 streamlines,
~100 vertices each at 0.25 mm), tiled with a small jitter to the requested count; a synthetic
set of the same shape is used when ``../shared/data`` is absent. The paired target is a
perturbed copy with a different step size (resampled at 0.5 mm).

Reference cost of one forward tracking pass of the same number of streamlines:
``invtract.tracking.differentiable.track_differentiable`` (hard forward, no gradient) on the
real FOD, timed on ``--track-seeds`` seeds and scaled linearly; and MRtrix ``tckgen``'s measured
single-thread throughput on the same FOD (``../shared/data/baseline_tckgen.txt``).

CPU timings use one thread by default (``--threads``), like the tckgen baseline, and are
insensitive to other processes competing for cores.

The Chamfer (unpaired set) loss is ``O(Sa * Sb)``; it is run only up to ``--chamfer-max``
streamlines (default 1,000; ``--full`` raises it to 10,000).

Usage:
    python benchmarks/losses.py [--sizes 1000 10000 100000] [--devices cpu cuda] [--full]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE.parent.parent / "shared" / "data"

if __name__ == "__main__" and os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:
    # pin the mmap threshold so freed tensors are unmapped and RSS tracks live memory
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(128 * 1024)
    os.execv(sys.executable, [sys.executable, *sys.argv])

import numpy as np  # noqa: E402
import torch  # noqa: E402

from invtract.losses import (  # noqa: E402
    chamfer_loss,
    density_correlation,
    length_loss,
    paired_loss,
    resample,
    soft_dice,
    track_density,
)
from invtract.streamlines import Streamlines  # noqa: E402

TCKGEN_SELECTED_PER_S = 3460.0  # real_msmt15, 1 thread (baseline_tckgen.txt)


def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _PeakRSS:
    def __enter__(self):
        self.base = self.peak = _rss()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss())
            time.sleep(0.001)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _rss())

    @property
    def mb(self) -> float:
        return (self.peak - self.base) / 2**20


def _measure(fn, device: torch.device, backward: bool) -> dict:
    def run():
        out = fn()
        if backward:
            out.backward()
        return out

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        run()
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        return {"s": dt, "peak_mb": (torch.cuda.max_memory_allocated() - base) / 2**20}
    with _PeakRSS() as m:
        t0 = time.perf_counter()
        run()
        dt = time.perf_counter() - t0
    return {"s": dt, "peak_mb": m.mb}


def _base_lines() -> tuple[list[np.ndarray], str]:
    tck = DATA / "real_msmt15" / "whole.tck"
    if tck.exists():
        import nibabel as nib

        lines = [np.asarray(s, np.float32) for s in nib.streamlines.load(str(tck)).streamlines]
        return lines, str(tck)
    rng = np.random.default_rng(0)
    lines = []
    for _ in range(2000):
        n = int(rng.integers(50, 340))
        d = rng.normal(size=3)
        d /= np.linalg.norm(d)
        steps = d + 0.05 * np.cumsum(rng.normal(size=(n, 3)), 0)
        steps /= np.linalg.norm(steps, axis=1, keepdims=True)
        lines.append((rng.normal(scale=20, size=3) + 0.25 * np.cumsum(steps, 0)).astype("f4"))
    return lines, "synthetic (no ../shared/data)"


def _tile(lines: list[np.ndarray], n: int, seed: int) -> Streamlines:
    rng = np.random.default_rng(seed)
    idx = np.arange(n) % len(lines)
    pts = np.concatenate([lines[i] for i in idx])
    pts = pts + rng.normal(scale=0.3, size=(len(idx), 3)).astype("f4").repeat(
        [len(lines[i]) for i in idx], 0
    )
    lengths = torch.tensor([len(lines[i]) for i in idx])
    return Streamlines(torch.from_numpy(pts.astype("f4")), lengths)


def _target_of(sl: Streamlines) -> Streamlines:
    """A perturbed copy at half the vertex density (a different step size)."""
    out = []
    for line in sl.to_list():
        out.append(line[::2] + 0.2)
    return Streamlines.from_list(out)


def _grid(sl: Streamlines):
    lo = sl.points.min(0).values.double().numpy() - 2
    hi = sl.points.max(0).values.double().numpy() + 2
    vs = 1.0
    shape = tuple(int(x) for x in np.ceil((hi - lo) / vs) + 1)
    aff = np.diag([vs, vs, vs, 1.0])
    aff[:3, 3] = lo
    return shape, aff


def _tracking_reference(n_seeds: int, device: torch.device) -> dict:
    """Hard forward tracking time per streamline on the real FOD (None if unavailable)."""
    try:
        from invtract.fod.field import FODField
        from invtract.io.image import load_fod
        from invtract.tracking.differentiable import track_differentiable

        fod = load_fod(DATA / "real_msmt15" / "fod.nii.gz")
        seeds = np.loadtxt(
            DATA / "real_msmt15" / "whole_seeds.txt", delimiter=",", usecols=(2, 3, 4)
        )[:n_seeds]
        rng = np.random.default_rng(0)
        dirs = rng.normal(size=seeds.shape)
        dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
        field = FODField.from_image(fod, device=device)
        args = (
            torch.as_tensor(seeds, dtype=torch.float32, device=device),
            torch.as_tensor(dirs, dtype=torch.float32, device=device),
        )
        with torch.no_grad():
            track_differentiable(field, args[0][:8], args[1][:8])
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            res = track_differentiable(field, *args)
            if device.type == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
        n = int(res.lengths.numel())
        return {
            "source": "invtract track_differentiable (hard forward, no grad), real_msmt15 FOD",
            "seeds": int(len(seeds)),
            "streamlines": n,
            "mean_vertices": float(res.lengths.double().mean()) if n else None,
            "seconds": dt,
            "s_per_streamline": dt / max(n, 1),
        }
    except Exception as exc:  # the tracker is optional here: report why it is missing
        return {"source": "invtract track_differentiable", "error": f"{type(exc).__name__}: {exc}"}


def _losses(sl, target, target_density, shape, aff, n_points, temperature):
    """name -> closure computing a scalar loss with gradients w.r.t. ``sl.points``."""

    def fresh():
        return Streamlines(sl.points.detach().requires_grad_(), sl.lengths)

    def density():
        d = track_density(fresh(), shape, aff)
        return (1 - density_correlation(d, target_density)) + (1 - soft_dice(d, target_density))

    return {
        "resample": lambda: resample(fresh(), n_points).sum(),
        "paired": lambda: paired_loss(fresh(), target, n_points, temperature_mm=temperature),
        "density": density,
        "length": lambda: length_loss(fresh(), target),
        "chamfer": lambda: chamfer_loss(fresh(), target, 20, temperature_mm=temperature),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    p.add_argument("--devices", nargs="+", default=None, help="default: cpu (+ cuda if present)")
    p.add_argument("--n-points", type=int, default=32)
    p.add_argument("--temperature-mm", type=float, default=0.5)
    p.add_argument("--chamfer-max", type=int, default=1000)
    p.add_argument("--full", action="store_true", help="chamfer up to 10k streamlines")
    p.add_argument("--track-seeds", type=int, default=200)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1, as the single-thread tckgen baseline; 0 = torch's)",
    )
    args = p.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    devices = args.devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    chamfer_max = max(args.chamfer_max, 10000) if args.full else args.chamfer_max
    lines, source = _base_lines()
    out = {
        "torch": torch.__version__,
        "cpu_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "streamlines_source": source,
        "n_points": args.n_points,
        "temperature_mm": args.temperature_mm,
        "results": [],
        "tracking_reference": {},
        "checks": {},
    }
    for dev_name in devices:
        device = torch.device(dev_name)
        track_ref = _tracking_reference(args.track_seeds, device) if DATA.exists() else {}
        out["tracking_reference"][dev_name] = track_ref
        for size in args.sizes:
            sl = _tile(lines, size, seed=size).to(device)
            target = _target_of(sl.to("cpu")).to(device)
            shape, aff = _grid(sl.to("cpu"))
            with torch.no_grad():
                target_density = track_density(target, shape, aff)
            fns = _losses(
                sl, target, target_density, shape, aff, args.n_points, args.temperature_mm
            )
            warm = _tile(lines, 64, seed=1).to(device)
            warm_fns = _losses(
                warm, _target_of(warm.to("cpu")).to(device), target_density, shape, aff,
                args.n_points, args.temperature_mm,
            )  # fmt: skip
            for name, fn in fns.items():
                row = {
                    "loss": name,
                    "device": dev_name,
                    "n_streamlines": size,
                    "n_vertices": int(sl.points.shape[0]),
                }
                if name == "chamfer" and size > chamfer_max:
                    row["skipped"] = f"O(S^2) set loss; run with --chamfer-max >= {size}"
                    out["results"].append(row)
                    continue
                warm_fns[name]().backward()
                fwd = _measure(fn, device, backward=False)
                both = _measure(fn, device, backward=True)
                row.update(
                    forward_s=round(fwd["s"], 4),
                    forward_peak_mb=round(fwd["peak_mb"], 1),
                    forward_backward_s=round(both["s"], 4),
                    forward_backward_peak_mb=round(both["peak_mb"], 1),
                )
                s_per = track_ref.get("s_per_streamline")
                if s_per:
                    row["tracking_forward_s_est"] = round(s_per * size, 4)
                if device.type == "cpu":
                    row["tckgen_1thread_s_est"] = round(size / TCKGEN_SELECTED_PER_S, 4)
                out["results"].append(row)
                print(f"{dev_name} {name:9s} {size:7d}: {row}", file=sys.stderr)
    for dev_name in devices:
        for name in ("paired", "density"):
            rows = [
                r
                for r in out["results"]
                if r["device"] == dev_name and r["loss"] == name and "forward_backward_s" in r
            ]
            for ref_key in ("tracking_forward_s_est", "tckgen_1thread_s_est"):
                have = [r for r in rows if ref_key in r]
                if not have:
                    continue
                ok = {str(r["n_streamlines"]): r["forward_backward_s"] < r[ref_key] for r in have}
                check = f"{dev_name}_{name}_fwd_bwd_cheaper_than_{ref_key[:-6]}"
                out["checks"][check] = {"all": all(ok.values()), "per_size": ok}
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
