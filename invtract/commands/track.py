"""Track streamlines with SD_Stream, reproducing MRtrix3's ``tckgen -algorithm SD_Stream``.

Units: positions and lengths in scanner millimetres (RAS+, as .tck stores them), angles in
degrees. Defaults are tckgen's, derived from the FOD voxel size v (geometric mean):
step 0.1 v (0.25 v with --rk4), angle 60 deg per step, cutoff 0.1 (also the seed threshold),
minlength 5 v, maxlength 100 v.

Seeding (exactly one): --seeds FILE (N x 3 or N x 6 text/CSV, or a tckgen -output_seeds file),
--seed-grid-per-voxel MASK G, --seed-random-per-voxel MASK K, --seed-image MASK (with
--select, default 5000), --seed-sphere x,y,z,r. With --rng-seed S the run replays
`MRTRIX_RNG_SEED=S tckgen ... -nthreads 0`, including which seeds are rejected.

Regions (--mask, --include, --exclude) take an image or a sphere "x,y,z,r" (mm), and may be
repeated. The output is written to a temporary name and renamed when complete.

Example:
    invtract track fod.nii.gz out.tck --seed-grid-per-voxel mask.nii.gz 2 --rng-seed 1
"""

from __future__ import annotations

import argparse
import functools
import gc
import logging
import os
import shlex
import sys
import time

import numpy as np

from ..errors import ConfigError, InvtractError
from ..params import TrackingParameters

log = logging.getLogger("invtract.track")


def _floats(text: str, n: int, what: str) -> tuple:
    try:
        vals = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise ConfigError(f"{what} must be {n} comma-separated numbers, got {text!r}") from None
    if len(vals) != n or not all(np.isfinite(vals)):
        raise ConfigError(f"{what} must be {n} comma-separated finite numbers, got {text!r}")
    return vals


def parse_roi(spec: str, name: str):
    """An ROI from an image path or a sphere ``x,y,z,r`` (mm)."""
    from ..io.image import load_mask
    from ..tracking.types import ImageRoi, SphereRoi

    if not os.path.exists(spec) and spec.count(",") == 3:
        x, y, z, r = _floats(spec, 4, f"--{name} sphere")
        if r < 0:
            raise ConfigError(f"--{name} sphere radius must be >= 0")
        return SphereRoi((x, y, z), r, spec)
    img = load_mask(spec)
    return ImageRoi(np.asarray(img.data, bool), np.linalg.inv(img.affine)[:3], spec)


def add_tracking_options(p: argparse.ArgumentParser) -> None:
    """Tracking-parameter flags shared by track / fit / calibrate."""
    g = p.add_argument_group("tracking parameters (tckgen names; units mm / degrees)")
    g.add_argument("--step", type=float, help="step size (mm); default 0.1 x voxel size")
    g.add_argument("--angle", type=float, help="max angle between steps (deg); default 60")
    g.add_argument("--cutoff", type=float, help="FOD amplitude cutoff; default 0.1")
    g.add_argument("--minlength", type=float, help="min length (mm); default 5 x voxel size")
    g.add_argument("--maxlength", type=float, help="max length (mm); default 100 x voxel size")
    g.add_argument("--rk4", action="store_true", help="4th-order Runge-Kutta integration")
    g.add_argument("--downsample", type=int, default=1, help="keep every R-th point (default 1)")
    g.add_argument(
        "--seed-direction", metavar="X,Y,Z", help="fixed initial direction (scanner frame)"
    )
    g.add_argument(
        "--seed-unidirectional", action="store_true", help="track in one direction only"
    )
    g.add_argument("--sh-basis", default="mrtrix", help="SH basis of the FOD (default mrtrix)")


def tracking_parameters(args) -> TrackingParameters:
    sd = _floats(args.seed_direction, 3, "--seed-direction") if args.seed_direction else None
    return TrackingParameters(
        step_mm=args.step,
        angle_deg=args.angle,
        cutoff=args.cutoff,
        min_length_mm=args.minlength,
        max_length_mm=args.maxlength,
        rk4=args.rk4,
        downsample=args.downsample,
        unidirectional=args.seed_unidirectional,
        stop=getattr(args, "stop", False),
        seed_direction=sd,
    )


class Track:
    name = "track"
    help = "track streamlines with SD_Stream (tckgen-compatible)"
    fast_exit = True  # see invtract.cli.entry

    @staticmethod
    def add_arguments(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "fod", nargs="?", help="FOD image (.nii, .nii.gz, .mif, .mih), SH coefficients"
        )
        p.add_argument("output", nargs="?", help="output tractogram (.tck, .trk, .trx)")
        p.add_argument(
            "--example",
            action="store_true",
            help="use the bundled phantom FOD (then the only positional argument is OUTPUT); "
            "seeds on a 1-per-voxel grid in its mask unless a seeding option is given",
        )
        s = p.add_argument_group("seeding (exactly one)")
        s.add_argument("--seeds", metavar="FILE", help="seed list: N x 3 / N x 6 / tckgen CSV")
        s.add_argument("--seed-image", metavar="MASK", help="random seeds in a mask")
        s.add_argument(
            "--seed-grid-per-voxel", nargs=2, metavar=("MASK", "G"), help="G^3 grid per voxel"
        )
        s.add_argument(
            "--seed-random-per-voxel", nargs=2, metavar=("MASK", "K"), help="K random per voxel"
        )
        s.add_argument("--seed-sphere", metavar="X,Y,Z,R", help="random seeds in a sphere (mm)")
        s.add_argument("--select", type=int, help="stop at N accepted streamlines (default 5000)")
        s.add_argument("--max-seeds", type=int, help="stop after N seeds (tckgen -seeds)")
        s.add_argument("--rng-seed", type=int, help="seed of the tckgen-compatible random stream")
        s.add_argument("--output-seeds", metavar="FILE", help="write seeds in tckgen's format")
        add_tracking_options(p)
        r = p.add_argument_group("regions (image or sphere x,y,z,r; repeatable)")
        r.add_argument("--mask", action="append", default=[], help="tracking mask")
        r.add_argument("--include", action="append", default=[], help="must be visited")
        r.add_argument("--exclude", action="append", default=[], help="must not be entered")
        r.add_argument("--stop", action="store_true", help="stop once all includes are visited")
        e = p.add_argument_group("execution")
        e.add_argument(
            "--engine",
            default="auto",
            choices=["auto", "torch", "numba", "triton"],
            help="tracking engine",
        )
        e.add_argument("--device", default="cpu", help="cpu or cuda (torch engine)")
        e.add_argument("--dtype", default="float32", choices=["float32", "float64"])
        e.add_argument("--batch-size", type=int, default=4096, help="seeds per chunk")
        e.add_argument("--force", action="store_true", help="overwrite existing outputs")

    @staticmethod
    def run(args) -> int:
        # A one-shot command whose data are numpy arrays (no reference cycles to collect): the
        # cycle collector's passes over the objects numba creates at import cost ~0.1 s.
        gc.disable()
        try:
            return _run(args)
        finally:
            gc.enable()


def _run(args) -> int:
    from ..io.image import load_fod, load_mask
    from ..io.seeds import load_seeds, write_seeds
    from ..io.tractogram import save_tractogram, stream_tck
    from ..tracking.fused_cpu import prepare_fod
    from ..tracking.runner import Seeding, default_engine, run_seeding
    from ..tracking.types import RoiSet

    # ------- CHECKS -------
    if args.example:
        from ..data import example_path

        if args.output is None:
            args.fod, args.output = str(example_path("fod")), args.fod
        if not (args.seeds or args.seed_image or args.seed_random_per_voxel):
            if not (args.seed_grid_per_voxel or args.seed_sphere):
                args.seed_grid_per_voxel = [str(example_path("mask")), "1"]
        if args.rng_seed is None:
            args.rng_seed = 1
    if args.fod is None or args.output is None:
        raise ConfigError("usage: invtract track FOD OUTPUT [options] (or --example OUTPUT)")
    mechs = [
        m
        for m in ("seeds", "seed_image", "seed_grid_per_voxel", "seed_random_per_voxel")
        if getattr(args, m)
    ] + (["seed_sphere"] if args.seed_sphere else [])
    if len(mechs) != 1:
        raise ConfigError(
            "give exactly one seeding option (--seeds, --seed-image, --seed-grid-per-voxel, "
            f"--seed-random-per-voxel, --seed-sphere); got {len(mechs)}"
        )
    if not os.path.exists(args.fod):
        raise InvtractError(f"FOD image not found: {args.fod}")
    for out in [args.output] + ([args.output_seeds] if args.output_seeds else []):
        if os.path.exists(out) and not args.force:
            raise InvtractError(f"output exists: {out} (use --force to overwrite)")
    if args.device.startswith("cuda") and not _cuda_available():
        raise ConfigError("--device cuda requested but CUDA is not available")
    params = tracking_parameters(args)

    # ------- LOAD -------
    t0 = time.time()
    fod = load_fod(args.fod, sh_basis=args.sh_basis)
    rois = RoiSet(
        include=tuple(parse_roi(x, "include") for x in args.include),
        exclude=tuple(parse_roi(x, "exclude") for x in args.exclude),
        mask=tuple(parse_roi(x, "mask") for x in args.mask),
    )
    if args.seeds:
        table = load_seeds(args.seeds)
        seeding = Seeding("list", positions=table.positions, directions=table.directions)
    elif args.seed_sphere:
        seeding = Seeding("sphere", sphere=_floats(args.seed_sphere, 4, "--seed-sphere"))
    else:
        which = args.seed_image or args.seed_grid_per_voxel or args.seed_random_per_voxel
        path = which if isinstance(which, str) else which[0]
        m = load_mask(path)
        kind = "image" if args.seed_image else (
            "grid" if args.seed_grid_per_voxel else "random_per_voxel"
        )  # fmt: skip
        count = 1 if isinstance(which, str) else int(which[1])
        if count < 1:
            raise ConfigError("seeds per voxel must be >= 1")
        seeding = Seeding(kind, mask=np.asarray(m.data, bool), affine=m.affine, count=count)
    resolved = params.resolve(fod.voxel_sizes)

    # ------- TRACK -------
    engine = default_engine(args.device) if args.engine == "auto" else args.engine
    scanner2voxel = np.linalg.inv(np.asarray(fod.affine, np.float64))[:3]
    kfod = prepare_fod(fod.data, scanner2voxel)  # once: shared by seed checks and chunks
    if engine == "numba":
        fod.data = kfod.sh  # one copy of the FOD in memory, not two
    command = " ".join(
        ["invtract"] + [shlex.quote(a) for a in getattr(args, "_argv", sys.argv[1:])]
    )
    header = _output_header(args, resolved, rois, engine, command)
    bar = _progress_bar(args)
    track = functools.partial(
        run_seeding,
        kfod,
        None,
        seeding,
        resolved,
        _chunk_runner(engine, kfod, fod, args, resolved, rois),
        rois=rois,
        select=args.select,
        max_seeds=args.max_seeds,
        rng_seed=args.rng_seed,
        batch_size=args.batch_size,
        progress=bar.update_to if bar else None,
    )
    seeds = _SeedRows() if args.output_seeds else None
    if args.output.lower().endswith(".tck"):  # streamed to disk chunk by chunk, as tckgen
        late = ("total_count", "max_num_seeds")
        with stream_tck(args.output, header, overwrite=args.force, late_keys=late) as out:
            res = track(sink=lambda chunk: _sink(out, seeds, chunk))
            out.late.update(_late_header(res.summary))
    else:
        res = track()
        header.update(_late_header(res.summary))
        save_tractogram(args.output, res, header=header, overwrite=args.force,
                        reference=args.fod)  # fmt: skip
        if seeds is not None:
            seeds.add(res.points, res.lengths, res.seed_index)
    if bar:
        bar.close()
    if seeds is not None:
        write_seeds(args.output_seeds, *seeds.arrays(), command)
    _print_summary(res.summary, engine, time.time() - t0)
    return 0


def _output_header(args, resolved, rois, engine: str, command: str) -> dict:
    """The output's header entries known before tracking (tckgen's keys)."""
    header = dict(resolved.header())
    header.update(
        {
            "source": str(args.fod),
            "command_history": command,
            "total_count": "0",
            "max_num_seeds": "0",
            "invtract_engine": engine,
        }
    )
    for kind, regions in (("include", rois.include), ("exclude", rois.exclude)):
        for roi in regions:
            header.setdefault("roi", "")
            header["roi"] += f"{kind} {roi.name}\n"
    if "roi" in header:
        header["roi"] = header["roi"].rstrip("\n")
    return header


def _late_header(summary: dict) -> dict:
    """The header entries known once tracking is done."""
    return {
        "total_count": str(summary["generated"] - _seed_fail(summary)),
        "max_num_seeds": str(summary["seeds"]),
    }


class _SeedRows:
    """The ``--output-seeds`` rows (streamline index, seed vertex index, seed position),
    gathered chunk by chunk (~40 bytes per streamline)."""

    def __init__(self) -> None:
        self.index: list[np.ndarray] = []
        self.points: list[np.ndarray] = []

    def add(self, points: np.ndarray, lengths: np.ndarray, seed_index: np.ndarray) -> None:
        from ..tracking.runner import seed_vertices

        self.index.append(np.asarray(seed_index, np.int64))
        self.points.append(seed_vertices(points, lengths, seed_index).astype(np.float32))

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        seed_index = np.concatenate(self.index) if self.index else np.zeros(0, np.int64)
        pos = np.concatenate(self.points) if self.points else np.zeros((0, 3), np.float32)
        return np.arange(seed_index.size), seed_index, pos


def _sink(out, seeds: _SeedRows | None, chunk) -> None:
    out.write(chunk.points, chunk.lengths)
    if seeds is not None:
        seeds.add(chunk.points, chunk.lengths, chunk.seed_index)
    _release_free_memory()


def _release_free_memory() -> None:
    """Hand the C heap's free pages back to the system (glibc ``malloc_trim``; a no-op
    elsewhere): the chunks' buffers are freed, but glibc keeps freed heap memory (its mmap
    threshold rises after large frees), which would show as resident memory."""
    global _TRIM
    if _TRIM is None:
        try:
            import ctypes

            _TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _TRIM = False
    if _TRIM:
        _TRIM(0)


_TRIM = None


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _chunk_runner(engine: str, kfod, fod, args, params, rois):
    """The engine as ``run(positions [n, 3], directions [n, 3]) -> EngineResult``.

    The compiled CPU engine (numba, float32 whatever ``--dtype``) tracks ``kfod`` (the
    :class:`~invtract.tracking.fused_cpu.FusedFOD` prepared once) directly, so this path never
    imports torch (about a second of start-up); the others track an
    :class:`~invtract.fod.field.FODField` on ``--device`` in ``--dtype``.
    """
    if engine == "numba":
        from ..tracking.fused_cpu import track_fused_cpu

        return lambda pos, dirs: track_fused_cpu(kfod, None, pos, dirs, params, rois)
    import torch

    from ..fod.field import FODField
    from ..tracking.tracker import run_engine

    dtype = torch.float64 if args.dtype == "float64" else torch.float32
    field = FODField.from_array(fod.data, fod.affine, device=args.device, dtype=dtype)
    return lambda pos, dirs: run_engine(engine, field, pos, dirs, params, rois)


def _seed_fail(summary: dict) -> int:
    return 0


class _Bar:
    def __init__(self, total):
        from tqdm import tqdm

        self.t = tqdm(total=total, unit="seed", desc="tracking", disable=None, file=sys.stderr)
        self.done = 0

    def update_to(self, seeds, selected):
        self.t.update(seeds - self.done)
        self.done = seeds
        self.t.set_postfix(selected=selected)

    def close(self):
        self.t.close()


def _progress_bar(args):
    try:
        return _Bar(None)
    except ImportError:  # pragma: no cover
        return None


def _print_summary(s: dict, engine: str, seconds: float) -> None:
    lines = [
        f"  seeds tried:           {s['seeds']}",
        f"  streamlines generated: {s['generated']}",
        f"  streamlines selected:  {s['selected']}",
        f"  mean length:           {s['mean_length_mm']:.2f} mm",
        "  rejections:",
        *[f"    {k}: {v}" for k, v in s["rejected"].items()],
        "  terminations (per half):",
        *[f"    {k}: {v}" for k, v in s["terminations"].items()],
        f"  engine: {engine}; {seconds:.2f} s; {s['steps']} steps",
    ]
    log.info("summary\n" + "\n".join(lines))
