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

tckgen command lines can be pasted: options as MRtrix3 3.0.3 spells them (-seed_image,
-seed_grid_per_voxel, -select, -seeds N (number of seeds: our --max-seeds), -output_seeds,
-nthreads, -info, -quiet, -force, ...) are accepted alongside ours, and so is a leading
"tckgen" (`invtract tckgen fod.mif out.tck -algorithm SD_Stream ...` works too).

Examples:
    invtract track fod.nii.gz out.tck --seed-grid-per-voxel mask.nii.gz 2 --rng-seed 1
    invtract track fod.mif out.tck -algorithm SD_Stream -seed_sphere -10,0,0,6 -select 100
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

from .. import checks
from ..errors import ConfigError
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
    from ..tracking.rois import image_roi
    from ..tracking.types import SphereRoi

    if not os.path.exists(spec) and spec.count(",") == 3:
        x, y, z, r = _floats(spec, 4, f"--{name} sphere")
        if r < 0:
            raise ConfigError(f"--{name} sphere radius must be >= 0")
        return SphereRoi((x, y, z), r, spec)
    return image_roi(load_mask(spec), spec)


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
    from ..io.sh_basis import SH_BASES

    g.add_argument(
        "--sh-basis",
        default="mrtrix",
        choices=SH_BASES,
        metavar="BASIS",
        help="SH basis of the FOD, named as DIPY / scilpy name them: "
        f"{', '.join(SH_BASES)} (default mrtrix = tournier07; DIPY's CSD writes "
        "descoteaux07_legacy unless told legacy=False)",
    )


class _Unsupported(argparse.Action):
    """A tckgen option invtract does not implement: a one-line usage error naming it."""

    def __call__(self, parser, namespace, values, option_string=None):
        name = "-" + option_string.lstrip("-").replace("-", "_")
        parser.error(f"{name} is not supported by invtract ({self.const})")


class _Algorithm(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        if str(values).lower() != "sd_stream":
            parser.error(f"-algorithm {values}: invtract implements SD_Stream only")
        setattr(namespace, self.dest, "SD_Stream")


#: tckgen options that do not change SD_Stream's output (spec section 5.5), accepted so that
#: pasted command lines run: name -> (metavar, type)
_NO_EFFECT = {
    "trials": int,
    "seed-cutoff": float,
    "max-attempts-per-seed": int,
    "power": float,
    "samples": int,
}
#: tckgen options invtract does not implement: name -> (number of values, reason)
_UNSUPPORTED = {
    "backtrack": (0, "tckgen: backtracking is not valid for deterministic algorithms"),
    "seed-dynamic": (1, "no SIFT-model dynamic seeding"),
    "seed-rejection": (1, "no rejection-sampling seeding"),
    "include-ordered": (1, "ordered include regions are not implemented"),
    "noprecomputed": (0, "the Legendre table is always precomputed"),
    "grad": (1, "SD_Stream tracks an FOD image; no diffusion gradients are read"),
    "fslgrad": (2, "SD_Stream tracks an FOD image; no diffusion gradients are read"),
}


def add_tckgen_only_options(p: argparse.ArgumentParser) -> None:
    """tckgen's options that have no invtract counterpart: ``-algorithm`` (SD_Stream only),
    the ones without effect on SD_Stream, and the unsupported ones (a clear error)."""
    import textwrap

    text = (
        "accepted without effect on SD_Stream: "
        + ", ".join(f"-{n.replace('-', '_')}" for n in _NO_EFFECT)
        + "; not supported: "
        + ", ".join(f"-{n.replace('-', '_')}" for n in _UNSUPPORTED)
    )
    g = p.add_argument_group("tckgen compatibility", textwrap.fill(text, 78))
    g.add_argument(
        "--algorithm",
        action=_Algorithm,
        default="SD_Stream",
        metavar="NAME",
        help="tracking algorithm: SD_Stream (the only one; any case)",
    )
    for name, kind in _NO_EFFECT.items():
        g.add_argument(f"--{name}", type=kind, help=argparse.SUPPRESS)
    for name, (nargs, why) in _UNSUPPORTED.items():
        g.add_argument(
            f"--{name}", nargs=nargs, action=_Unsupported, const=why, help=argparse.SUPPRESS
        )


def check_sh_basis(sh, basis: str, path: str) -> None:
    """Warn (one line) when the FOD looks like another SH basis than ``basis``. Skipped for an
    MRtrix image read in MRtrix's basis (MRtrix writes no other; the check imports
    scipy.special through DIPY, ~0.3 s of start-up)."""
    from ..io.mif import MIF_SUFFIXES
    from ..io.sh_basis import warn_if_other_basis

    if basis in ("mrtrix", "tournier07") and str(path).lower().endswith(tuple(MIF_SUFFIXES)):
        return
    warn_if_other_basis(sh, basis, source=str(path))


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
        add_seed_gmwmi_option(s)
        s.add_argument("--select", type=int, help="stop at N accepted streamlines (default 5000)")
        s.add_argument("--max-seeds", type=int, help="stop after N seeds (tckgen -seeds)")
        s.add_argument("--rng-seed", type=int, help="seed of the tckgen-compatible random stream")
        s.add_argument("--output-seeds", metavar="FILE", help="write seeds in tckgen's format")
        add_tracking_options(p)
        add_act_options(p)
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
        add_tckgen_only_options(p)

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
    ] + [m for m in ("seed_sphere", "seed_gmwmi") if getattr(args, m, None)]
    if len(mechs) != 1:
        raise ConfigError(
            "give exactly one seeding option (--seeds, --seed-image, --seed-grid-per-voxel, "
            f"--seed-random-per-voxel, --seed-sphere, --seed-gmwmi); got {len(mechs)}"
        )
    _check_arguments(args)
    check_act_args(args)
    if args.device.startswith("cuda") and not _cuda_available():
        raise ConfigError("--device cuda requested but CUDA is not available")
    params = tracking_parameters(args)
    nbytes = checks.image_memory_bytes(args.fod)
    if nbytes is not None:
        checks.check_memory(nbytes, f"loading FOD {args.fod}", "crop or downsample the FOD")

    # ------- LOAD -------
    t0 = time.time()
    fod = load_fod(args.fod, sh_basis=args.sh_basis)
    check_sh_basis(fod.data, args.sh_basis, args.fod)
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
    elif args.seed_gmwmi:
        seeding = None  # built with the 5TT image below
    else:
        which = args.seed_image or args.seed_grid_per_voxel or args.seed_random_per_voxel
        path = which if isinstance(which, str) else which[0]
        m = load_mask(path)
        kind = "image" if args.seed_image else (
            "grid" if args.seed_grid_per_voxel else "random_per_voxel"
        )  # fmt: skip
        count = 1 if isinstance(which, str) else _seed_count(which)
        seeding = Seeding.from_mask(kind, m, count)
    act = load_act_args(args)
    if args.seed_gmwmi:
        from ..tracking.seeding_gmwmi import load_gmwmi_seeder

        seeding = Seeding("gmwmi", gmwmi=load_gmwmi_seeder(args.seed_gmwmi, act))
    if act is not None:
        from ..tracking.act import act_parameters

        params = act_parameters(params, fod.voxel_sizes)
    resolved = params.resolve(fod.voxel_sizes)
    _check_seeding(seeding, fod, resolved, args)

    # ------- TRACK -------
    engine = default_engine(args.device) if args.engine == "auto" else args.engine
    if act is not None and engine not in ("torch", "triton"):
        engine = "numba"  # ACT: numba, or the torch / Triton engine when asked for
    scanner2voxel = fod.scanner2voxel
    kfod = prepare_fod(fod.data, scanner2voxel)  # once: shared by seed checks and chunks
    if engine == "numba":
        fod.data = kfod.sh  # one copy of the FOD in memory, not two
    command = " ".join(
        ["invtract"] + [shlex.quote(a) for a in getattr(args, "_argv", sys.argv[1:])]
    )
    header = _output_header(args, resolved, rois, engine, command, act)
    progress = _progress(args, seeding)
    runner, seed_check = _runners(engine, kfod, fod, args, resolved, rois, act)
    track = functools.partial(
        run_seeding,
        kfod,
        None,
        seeding,
        resolved,
        runner,
        seed_check=seed_check,
        rois=rois,
        select=args.select,
        max_seeds=args.max_seeds,
        rng_seed=args.rng_seed,
        batch_size=args.batch_size,
        progress=progress.update,
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
        save_tractogram(args.output, res, header=header, overwrite=args.force, reference=args.fod,
                        data_per_streamline=_seed_data(args.output, res))  # fmt: skip
        if seeds is not None:
            seeds.add(res.points, res.lengths, res.seed_index)
    progress.close()
    # why nothing came out, in one line: a degenerate FOD (checked only then: scanning a
    # whole-brain FOD would read it all) or the counts of the rejections
    if res.summary["selected"] == 0 and not checks.warn_degenerate_fod(kfod.sh, args.fod):
        why = ", ".join(f"{k} {v}" for k, v in res.summary["rejected"].items()) or "none"
        checks.warn(f"no streamline selected from {res.summary['seeds']} seeds (rejected: {why})")
    if seeds is not None:
        write_seeds(args.output_seeds, *seeds.arrays(), command)
    if args.info and not getattr(args, "quiet", False):
        for line in info_report(res.summary, rois, params.stop):
            print(f"invtract track: [INFO] {line}", file=sys.stderr)
    _print_summary(res.summary, engine, time.time() - t0)
    return 0


def _runners(engine: str, kfod, fod, args, params, rois, act):
    """``(run(positions, directions) -> EngineResult, seed_check or None)``: the engine's
    chunk runner, or ACT's compiled kernel and seed test with ``--act``."""
    if act is None:
        return _chunk_runner(engine, kfod, fod, args, params, rois), None
    from ..tracking.act_cpu import act_seed_checker, track_fused_cpu_act

    sh, s2v = kfod.sh, kfod.M
    if engine == "triton":  # the Triton kernel's ACT (numba / torch where it cannot run)
        import torch

        from ..fod.field import FODField
        from ..tracking.engines import run_engine

        field = FODField.from_image(fod, device=args.device, dtype=torch.float32)
        return (lambda pos, dirs: run_engine("triton", field, pos, dirs, params, rois, act=act),
                act_seed_checker(sh, s2v, rois, act))  # fmt: skip
    if engine == "torch":  # the PyTorch ACT tracker; the same seed test decides the draws
        import torch

        from ..fod.field import FODField
        from ..tracking.act_torch import track_torch_act

        dtype = torch.float64 if args.dtype == "float64" else torch.float32
        field = FODField.from_image(fod, device=args.device, dtype=dtype)
        return (lambda pos, dirs: track_torch_act(field, pos, dirs, params, act, rois),
                act_seed_checker(sh, s2v, rois, act))  # fmt: skip

    def run(pos, dirs):
        return track_fused_cpu_act(sh, s2v, pos, dirs, params, act, rois)

    return run, act_seed_checker(sh, s2v, rois, act)


def _output_header(args, resolved, rois, engine: str, command: str, act=None) -> dict:
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
    if act is not None:
        header.update({"act": str(args.act), "backtrack": "0"})
        if act.crop_at_gmwmi:
            header["crop_at_gmwmi"] = "1"
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


#: bytes per seed while seeds are generated (positions, voxel coordinates, directions, float32)
_SEED_BYTES = 36
#: bytes per vertex of a tracked streamline (float32 x, y, z)
_POINT_BYTES = 12


def _roi_images(specs: list[str]) -> list[str]:
    """The entries of --mask / --include / --exclude that name images (not x,y,z,r spheres)."""
    return [x for x in specs if os.path.exists(x) or x.count(",") != 3]


def _check_arguments(args) -> None:
    """Inputs, outputs and numeric options, before anything is loaded (see invtract.checks)."""
    from ..io.tractogram import TRACTOGRAM_SUFFIXES

    grid = args.seed_grid_per_voxel or args.seed_random_per_voxel
    inputs = [
        ("FOD image", args.fod),
        ("--seeds", args.seeds),
        ("--seed-image", args.seed_image),
        ("seed mask", grid[0] if grid else None),
    ]
    for name in ("mask", "include", "exclude"):
        inputs += [(f"--{name}", x) for x in _roi_images(getattr(args, name))]  # fmt: skip
    checks.check_input_files(inputs)
    checks.check_output_files(
        [
            ("output", args.output, TRACTOGRAM_SUFFIXES),
            ("--output-seeds", args.output_seeds, None),
        ],
        force=args.force,
        inputs=inputs,
    )
    checks.check_int("--batch-size", args.batch_size, 1)
    checks.check_int("--rng-seed", args.rng_seed, 0, 2**32 - 1)
    checks.check_int("--select", args.select, 0)
    checks.check_int("--max-seeds", args.max_seeds, 0)
    checks.check_int("--downsample", args.downsample, 1)
    if grid:
        _seed_count(grid)
    if args.seed_sphere:
        *_, r = _floats(args.seed_sphere, 4, "--seed-sphere")
        checks.check_float("--seed-sphere radius", r, minimum=0.0)


def _seed_count(option: list[str]) -> int:
    """G of --seed-grid-per-voxel MASK G / K of --seed-random-per-voxel MASK K (an int >= 1)."""
    try:
        count = int(option[1])
    except ValueError:
        raise ConfigError(f"seeds per voxel must be an integer >= 1, got {option[1]!r}") from None
    checks.check_int("seeds per voxel", count, 1)
    return count


def _check_seeding(seeding, fod, params, args) -> None:
    """Memory of the seeds and of one engine chunk; a warning for seeds outside the FOD."""
    per_seed = _SEED_BYTES + _POINT_BYTES * min(params.min_points_post, params.max_points_post)
    if seeding.kind == "list":
        n = len(seeding.positions)
    elif seeding.finite:
        voxels = int(np.count_nonzero(seeding.mask))
        n = voxels * (seeding.count**3 if seeding.kind == "grid" else seeding.count)
    else:
        n = 5000 if args.select is None else args.select
    option = {"grid": "--seed-grid-per-voxel", "random_per_voxel": "--seed-random-per-voxel",
              "list": "--seeds"}.get(seeding.kind, "--select")  # fmt: skip
    checks.check_memory(
        n * per_seed,
        f"{option}: {n:,} seeds (a kept streamline has at least {params.min_points_post} points)",
        f"use fewer seeds ({option})",
    )
    # the compiled engine tracks each seed into one scratch row per thread and keeps only the
    # accepted points; the ACT kernel still holds a [batch, max_points + 2, 3] buffer
    act = bool(getattr(args, "act", None))
    rows = args.batch_size if act else _thread_count(args)
    what = f"{rows} seeds at a time" if act else f"{rows} thread(s)"
    checks.check_memory(
        rows * (params.max_points + 2) * _POINT_BYTES,
        f"tracking on {what} with up to {params.max_points:,} points per streamline "
        f"(--maxlength {params.max_length_mm:g} mm / step {params.step_mm:g} mm)",
        "lower --maxlength" + (" or --batch-size" if act else ""),
    )
    _warn_seeds_outside(seeding, fod, args.fod)


def _thread_count(args) -> int:
    n = getattr(args, "nthreads", None)
    return max(1, int(n)) if n is not None else max(1, os.cpu_count() or 1)


def _warn_seeds_outside(seeding, fod, path: str, most: int = 100_000) -> None:
    """Warn when the seeds (at most ``most`` of them, evenly spaced, or the seed mask's
    voxels) lie outside the FOD image: they are rejected there, as by tckgen."""
    image = f"the FOD image {path}"
    if seeding.kind == "sphere":
        x, y, z, r = seeding.sphere
        if checks.distance_outside_mm(np.array([[x, y, z]]), fod.shape, fod.affine)[0] > r:
            checks.warn(f"--seed-sphere {x:g},{y:g},{z:g},{r:g} lies outside {image}: "
                        "every seed is rejected")  # fmt: skip
        return
    if seeding.kind == "gmwmi":  # seeds are moved within the 5TT image, checked by tracking
        return
    if seeding.kind == "list":
        pts, what = np.asarray(seeding.positions), "seeds"
    else:
        vox = np.argwhere(seeding.mask).astype(np.float64)
        pts, what = vox @ seeding.affine[:3, :3].T + seeding.affine[:3, 3], "seed mask voxels"
    pts = pts[:: max(1, len(pts) // most)]
    checks.warn_points_outside(pts, fod.shape, fod.affine, what, image, "rejected as seeds")


def _seed_data(output: str, res) -> dict | None:
    """Seeds per streamline for .trk / .trx outputs (a .tck keeps them in --output-seeds)."""
    if output.lower().endswith(".tck"):
        return None
    from ..io.tractogram_meta import per_streamline_seeds

    return per_streamline_seeds(res.seed_points, res.seed_index)


def add_seed_gmwmi_option(group) -> None:
    """``--seed-gmwmi IMAGE`` on ``group`` (track and fit share it)."""
    group.add_argument(
        "--seed-gmwmi",
        metavar="IMAGE",
        help="random seeds on the GM-WM interface (e.g. 5tt2gmwmi's image; needs --act)",
    )


def add_act_options(p: argparse.ArgumentParser):
    """A new argument group of ``p`` with ``--act 5TT`` and ``--crop-at-gmwmi`` (track and fit
    share them; checked by :func:`check_act_args`, loaded by :func:`load_act_args`)."""
    a = p.add_argument_group("anatomically-constrained tracking (tckgen -act)")
    a.add_argument(
        "--act",
        metavar="5TT",
        help="five-tissue-type image: ACT rules and defaults (cutoff x 0.5, minlength 2 x "
        "voxel); numba engine (or --engine torch / triton)",
    )
    a.add_argument(
        "--crop-at-gmwmi",
        action="store_true",
        help="move streamline ends in cortical GM onto the GM-WM interface (needs --act)",
    )
    return a


def check_act_args(args) -> None:
    """``--act`` / ``--crop-at-gmwmi`` / ``--seed-gmwmi`` checks before any heavy work."""
    if getattr(args, "crop_at_gmwmi", False) and not getattr(args, "act", None):
        raise ConfigError("--crop-at-gmwmi needs --act")
    if getattr(args, "seed_gmwmi", None):
        if not getattr(args, "act", None):
            raise ConfigError("--seed-gmwmi needs --act (the 5TT image the seeds are moved in)")
        checks.check_input_files([("--seed-gmwmi image", args.seed_gmwmi)])
    if getattr(args, "act", None):
        checks.check_input_files([("--act 5TT image", args.act)])


def load_act_args(args):
    """The checked 5TT image of ``--act`` (None without it)."""
    if not getattr(args, "act", None):
        return None
    from ..tracking.act import load_act

    return load_act(args.act, crop_at_gmwmi=args.crop_at_gmwmi)


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

        n = getattr(args, "nthreads", None)
        threads = None if n is None else max(1, int(n))  # -nthreads 0: single-threaded
        return lambda pos, dirs: track_fused_cpu(
            kfod, None, pos, dirs, params, rois, nthreads=threads
        )
    import torch

    from ..fod.field import FODField
    from ..tracking.engines import run_engine

    dtype = torch.float64 if args.dtype == "float64" else torch.float32
    field = FODField.from_image(fod, device=args.device, dtype=dtype)
    return lambda pos, dirs: run_engine(engine, field, pos, dirs, params, rois)


def _seed_fail(summary: dict) -> int:
    return 0


class _SeedProgress:
    """tckgen's progress line (``[ 45%]     8000 seeds,     3100 selected``): the percentage
    of seeds for a finite seeder, of ``select`` for an infinite one."""

    def __init__(self, args, seeding) -> None:
        from ..progress import Progress

        self.finite = seeding.finite
        total = _finite_seed_count(seeding) if seeding.finite else (args.select or 5000)
        quiet = bool(getattr(args, "quiet", False))
        self.bar = Progress("invtract track", total, enabled=not quiet)

    def update(self, seeds: int, selected: int) -> None:
        self.bar.update(seeds if self.finite else selected, _progress_text(seeds, selected))

    def close(self) -> None:
        self.bar.done()


def _progress(args, seeding) -> _SeedProgress:
    return _SeedProgress(args, seeding)


def _progress_text(seeds: int, selected: int) -> str:
    return f"{seeds:8d} seeds, {selected:8d} selected"


def _finite_seed_count(seeding) -> int:
    """Seeds a finite seeder yields: the list, or mask voxels x per-voxel count."""
    if seeding.kind == "list":
        return int(np.asarray(seeding.positions).shape[0])
    per_voxel = seeding.count**3 if seeding.kind == "grid" else seeding.count
    return int(np.count_nonzero(seeding.mask)) * int(per_voxel)


def info_report(summary: dict, rois, stop: bool) -> list[str]:
    """tckgen ``-info``'s end-of-run statistics (``shared.cpp``), one string per line:
    termination reasons as percentages of all terminations (3 significant digits), then
    rejection counts; mask / exclude / include / ``-stop`` lines only when those are used."""
    terms = summary["terminations"]
    total = sum(terms.values())
    shown = ["Calibrator sub-threshold", "Exited image", "Diffusion model sub-threshold"]
    shown += ["Excessive curvature", "Max length exceeded"]
    shown += ["Exited mask"] * bool(rois.mask) + ["Entered exclusion region"] * bool(rois.exclude)
    shown += ["Traversed all include regions"] * bool(stop)
    lines = [f"Total number of track terminations: {total}", "Termination reason probabilities:"]
    for name in shown:
        pct = 100.0 * terms.get(name, 0) / total if total else float("nan")
        lines.append(f"  {name}: {pct:.3g}%")
    rejected = ["Invalid seed point", "No propagation from seed", "Shorter than minimum length"]
    rejected += ["Entered exclusion region"] * bool(rois.exclude)
    rejected += ["Missed inclusion region"] * bool(rois.include)
    lines.append("Track rejection counts:")
    lines += [f"  {name}: {summary['rejected'].get(name, 0)}" for name in rejected]
    return lines


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
