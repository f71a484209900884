"""Fit tracking parameters or FOD coefficients to a target bundle by gradient descent.

Every target streamline provides one seed (its tckgen seed with --target-seeds FILE, tckgen's
-output_seeds; otherwise its middle vertex and local direction), so tracked streamline i is
compared with target streamline i. The default loss (configs/fit_params.toml) is the
common-extent paired MDF (shape, mm) plus the survival-weighted mis-extent (mm), which is what
carries gradients to the angle and the cutoff; unpaired (chamfer), paired_loss, length and
density terms can be weighted in through [loss.weights].

--fit params   learn step (mm), angle (deg) and cutoff through bounded reparametrisations
               ([bounds]); the soft-survival temperature anneals ([temperature]).
--fit fod      learn the SH coefficients of the voxels the target passes through (+ margin),
               regularised by non-negative amplitude on a dense sphere, smoothness of the
               change and closeness to the input FOD ([loss.weights] nonneg/smooth/prior);
               writes fitted_fod.nii.gz on the input's grid and header.
--fit both     both, jointly or alternating ([fit] mode).
--dwi DWI --response RESPONSE [--fslgrad BVECS BVALS] [--mask MASK]
               with --fit fod|both: add the diffusion-signal term (CSD's forward model and
               non-negativity penalty, [loss.weights] signal; default config fit_fod_dwi);
               without --target: CSD alone (as dwi2fod csd), writes fitted_fod.nii.gz.

A fraction of the target ([fit] heldout_fraction, default 0.2) is never used for gradients;
its losses are logged as loss/heldout/* so over-fitting shows.

Configuration precedence: defaults < --example < --config FILE < --set SECTION.KEY=VALUE
and the --SECTION.KEY flags < the named flags (--iterations, --device, --fit). The
tracking flags give the starting (or fixed) parameters; unset ones are tckgen's defaults
(min/max length from the target's .tck header when present).

Run folder (--run NAME: runs/NAME; --run PATH: PATH; default runs/<timestamp>_fit):
config.toml (resolved), command.txt, versions.json, metrics.jsonl (one line per iteration),
tb/ (TensorBoard: loss/*, param/step_mm, param/angle_deg, param/cutoff, grad_norm/*,
histograms of FOD changes, bundle images, hparams), checkpoint.pt, result.json (final and best
losses, fitted step_mm / angle_deg / cutoff), fitted.tck (hard tracking with the fitted values
from every target seed), fitted_fod.nii.gz (--fit fod/both). --resume continues an interrupted
run from its last checkpoint and ends where an uninterrupted run ends. A loss that becomes NaN
or Inf stops the run with an error and keeps the last good checkpoint.

Monitoring:  tensorboard --logdir runs/NAME/tb

Examples:
  invtract fit --example --run example
  invtract fit --target bundle.tck --target-seeds bundle_seeds.txt --fod fod.nii.gz \\
      --fit params --run bundleA --iterations 60
  invtract fit --target bundle.tck --fod fod.nii.gz --fit fod --config configs/fit_fod.toml
  invtract fit --target bundle.tck --fod fod.nii.gz --fit fod --dwi dwi.mif \\
      --response response_wm.txt --mask mask.mif
  invtract fit --fit fod --dwi dwi.mif --response response_wm.txt --mask mask.mif --run csd
  invtract fit --target-connectome matrix.csv --parcellation parc.mif --fod fod.mif \\
      --act 5tt.mif [--crop-at-gmwmi] [--seed-gmwmi gmwmi.mif]   (ACT tracking; ACT's defaults)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import shlex
import sys
from pathlib import Path

from ..errors import ConfigError, InvtractError
from .options import add_options, add_target_options
from .track import (
    add_act_options,
    add_seed_gmwmi_option,
    add_tracking_options,
    check_act_args,
    load_act_args,
    tracking_parameters,
)

log = logging.getLogger("invtract.fit")

_LEARN = {
    "params": ["step_mm", "angle_deg", "cutoff"],
    "fod": ["sh"],
    "both": ["step_mm", "angle_deg", "cutoff", "sh"],
}
#: settings of ``--example`` (a complete params fit on CPU in under 2 minutes); they sit
#: between the defaults and --config: defaults < --example < --config < --set / flags
EXAMPLE_OVERRIDES = {
    "fit": {"iterations": 24, "seeds_per_iteration": 8, "image_every": 5},
}


#: the connectome target's inputs: ``(flag, metavar, help)``
_CONNECTOME_OPTIONS = (
    ("--target-connectome", "MATRIX",
     "target connectome (tck2connectome CSV/TSV): fit whole-brain tracking to it"),
    ("--parcellation", "LABELS", "node parcellation image (with MATRIX)"),
    ("--seed-image", "MASK",
     "whole-brain seed mask (default: voxels with a non-zero FOD); see [seeding]"),
)  # fmt: skip


#: the fit's on/off flags: ``(flag, help)``
_SWITCHES = (
    ("--resume", "continue the run from its last checkpoint"),
    ("--no-tensorboard", "no TensorBoard events"),
    ("--no-progress", "no progress bar"),
)


def _add_fit_options(r) -> None:
    """``--fit``, ``--config``, ``--run``, ``--iterations``, ``--device``, ``--resume``,
    ``--set``, ``--no-tensorboard``, ``--no-progress`` and ``--nproc`` on group ``r``."""
    r.add_argument(
        "--fit",
        choices=sorted(_LEARN),
        default="params",
        help="params: step/angle/cutoff; fod: SH coefficients; both (default params)",
    )
    r.add_argument(
        "--config",
        help="config TOML (path, or a name in configs/: fit_params, fit_fod, "
        "fit_fod_dwi, fit_connectome); default fit_params for --fit params, fit_fod "
        "otherwise (fit_fod_dwi with --dwi), fit_connectome with --target-connectome",
    )
    r.add_argument("--run", help="run folder: a bare NAME goes to runs/NAME, a path as given")
    r.add_argument("--iterations", type=int, help="iterations (overrides [fit] iterations)")
    r.add_argument("--device", choices=("cpu", "cuda"), help="device ([fit] device)")
    r.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override any config key (repeatable), e.g. --set optimizer.lr=0.05",
    )
    for flag, text in _SWITCHES:
        r.add_argument(flag, action="store_true", help=text)
    r.add_argument(
        "--nproc",
        type=int,
        default=1,
        metavar="N",
        help="data-parallel fit in N local processes (torch.distributed, gloo on CPU): "
        "seeds sharded, gradients summed, the same result as one process; under torchrun "
        "the environment's process group is used instead",
    )


def _add_config_keys(c) -> None:
    """One ``--SECTION.KEY V`` flag per config key on group ``c`` (the loss weights hidden)."""
    from ..fit.config import flat_keys
    from ..fit.objective import FOD_TERMS, SIGNAL_TERMS, TERMS
    from ..fit.optimise import DEFAULT_CONFIG

    weights = TERMS + FOD_TERMS + SIGNAL_TERMS
    for key in flat_keys(DEFAULT_CONFIG, free={"weights": weights}):
        c.add_argument(
            f"--{key}",
            dest=f"cfg:{key}",
            metavar="V",
            default=None,
            help=argparse.SUPPRESS if key.startswith("loss.weights.") else None,
        )


def find_config(spec: str) -> Path:
    """A config path, or a bare name looked up in ``./configs`` then the package's configs
    (:func:`invtract.fit.config.find_config`, the one lookup)."""
    from ..fit.config import find_config as find

    return find(spec)


def _run_folder(args, world_main: bool = True):
    """``(run_dir, checkpoint path, completed iterations or None)``; checks --resume and that
    the folder can be written (one-line errors)."""
    from ..fit.checkpoint import checkpoint_iteration
    from ..fit.runlog import resolve_run_dir
    from ..io.atomic import check_writable_dir

    run_dir = resolve_run_dir(args.run)
    ckpt = run_dir / "checkpoint.pt"
    start_it = checkpoint_iteration(ckpt) if args.resume else None
    if args.resume and start_it is None:
        raise ConfigError(f"--resume: no checkpoint in {run_dir}")
    if not args.resume and ckpt.exists():
        if not getattr(args, "force", False):
            raise ConfigError(
                f"{run_dir} already holds a run: use --resume, --force or another --run"
            )
        _clear_run(run_dir)
    if world_main:
        check_writable_dir(run_dir)
    return run_dir, ckpt, start_it


def _argv(args) -> list[str]:
    return ["invtract"] + [shlex.quote(a) for a in getattr(args, "_argv", None) or sys.argv[1:]]


#: what a fit writes in its run folder (``--force`` removes these before a fresh run)
_RUN_FILES = (
    "checkpoint.pt",
    "metrics.jsonl",
    "result.json",
    "config.toml",
    "command.txt",
    "versions.json",
    "fitted.tck",
    "fitted_fod.nii.gz",
    "fitted_connectome.csv",
)


def _clear_run(run_dir: Path) -> None:
    """``--force``: remove a previous run's outputs (only the files a fit writes, and tb/)."""
    import shutil

    for name in _RUN_FILES:
        (run_dir / name).unlink(missing_ok=True)
    shutil.rmtree(run_dir / "tb", ignore_errors=True)
    log.info("--force: removed the previous run's outputs in %s", run_dir)


def _tracking_record(params0) -> dict:
    return {
        k: (list(v) if isinstance(v, tuple) else v)
        for k, v in dataclasses.asdict(params0).items()
        if v is not None
    }


def _open_run(args, run_dir, start_it, cfg: dict, params0, inputs: dict):
    """The run's :class:`~invtract.fit.runlog.RunLogger`, with config.toml, command.txt and
    versions.json written (a resumed run appends to command.txt)."""
    from ..fit.config import toml_dumps
    from ..fit.runlog import RunLogger

    logger = RunLogger(run_dir, tensorboard=not args.no_tensorboard, purge_step=start_it)
    record = {**cfg, "tracking": _tracking_record(params0), "inputs": inputs}
    logger.record_run(toml_dumps(record), _argv(args), resume=args.resume)
    log.info(
        "run folder %s%s", run_dir, f" (resuming at iteration {start_it})" if start_it else ""
    )
    return logger


class Fit:
    """``invtract fit``: a bundle (``--target``), connectome (``--target-connectome``) or
    CSD-alone (``--dwi`` without a target) fit in a run folder (see the module docstring)."""

    name = "fit"
    help = "fit tracking parameters or FOD coefficients to a target bundle (gradient descent)"

    @staticmethod
    def add_arguments(p: argparse.ArgumentParser) -> None:
        g = add_target_options(p)
        g.add_argument(
            "--example",
            action="store_true",
            help="fit the bundled phantom target (true step 1.0 mm) from tckgen's defaults",
        )
        title = "connectome target (instead of --target; see docs/connectome_fit.md)"
        cg = p.add_argument_group(title)
        add_options(cg, _CONNECTOME_OPTIONS)
        add_seed_gmwmi_option(cg)
        from ..fit.signal_term import add_signal_arguments

        add_signal_arguments(p)
        _add_fit_options(p.add_argument_group("fit"))
        _add_config_keys(p.add_argument_group("config keys (each overrides the config file)"))
        add_tracking_options(p)
        add_act_options(p)

    @staticmethod
    def run(args) -> int:
        if getattr(args, "target_connectome", None) or getattr(args, "parcellation", None):
            if getattr(args, "dwi", None):
                raise ConfigError("--dwi applies to bundle fits (--target) and CSD alone only")
            return _run_connectome(args)
        for flag in ("seed_image", "act", "crop_at_gmwmi", "seed_gmwmi"):
            if getattr(args, flag, None):
                name = "--" + flag.replace("_", "-")
                raise ConfigError(f"{name} applies to --target-connectome fits only")
        if getattr(args, "dwi", None) and not (args.target or args.example):
            from ..fit.signal_term import run_csd_only

            return run_csd_only(args)
        cfg, cfg_path = _bundle_checks(args)
        started = _start(args, cfg)
        if started is None:
            return 0
        world, run_dir, ckpt, start_it = started
        data = _bundle_data(args, world)
        params0 = data["params0"]
        logger = None
        if world.is_main:
            inputs = {
                "target": os.path.abspath(args.target),
                "target_seeds": os.path.abspath(args.target_seeds) if args.target_seeds else "",
                "fod": os.path.abspath(args.fod),
                "fit": args.fit,
                "config": str(cfg_path),
                **_signal_inputs(args),
            }
            logger = _open_run(args, run_dir, start_it, cfg, params0, inputs)
        with _closing(logger):
            result = _bundle_fit(args, cfg, data, logger, ckpt, world)
            if not world.is_main:
                return 0
            summary = finish_run(
                run_dir, logger, result, data["img"], data["target"], data["pos"], data["dirs"],
                params0, cfg, signal=data["signal"],
            )  # fmt: skip
        print(json.dumps({k: summary[k] for k in _PRINTED if k in summary}, indent=2))
        return 0


def _start(args, cfg: dict):
    """``None`` when ``--nproc N`` has run the whole fit in N processes
    (:func:`_spawned`); otherwise this process's ``(world, run_dir, checkpoint path, completed
    iterations or None)``."""
    if _spawned(args, cfg):
        return None
    from ..fit.distributed import from_environment

    world = from_environment(cfg["fit"]["device"])
    return (world, *_run_folder(args, world.is_main))


@contextlib.contextmanager
def _closing(logger):
    """Close the run's logger (if any) however the fit ends; on Ctrl-C, say how to resume."""
    try:
        yield
    except KeyboardInterrupt:
        log.warning("interrupted: continue with the same command and --resume")
        raise
    finally:
        if logger is not None:
            logger.close()


def _bundle_checks(args) -> tuple[dict, Path]:
    """Inputs exist, options and the layered config are valid: ``(config, config path)``."""
    from ..fit.optimise import load_config

    if args.example:
        from ..data import example_path

        if args.target or args.fod:
            raise ConfigError("--example uses the bundled data: no --target / --fod")
        args.target = str(example_path("target"))
        args.target_seeds = str(example_path("target_seeds"))
        args.fod = str(example_path("fod"))
    _require_files(args, ("target", "fod"), ("target_seeds",), "(or --example)")
    _check_run_options(args)
    from ..fit.signal_term import check_signal_args, check_signal_config

    dwi = check_signal_args(args)
    name = "fit_params" if args.fit == "params" else "fit_fod_dwi" if dwi else "fit_fod"
    default = find_config(name)
    cfg_path = find_config(args.config) if args.config else None
    example = EXAMPLE_OVERRIDES if args.example else None
    over = _collect_overrides(args)
    cfg = load_config(cfg_path, over, example=example, base=None if cfg_path else default)
    spatial = cfg.get("signal", {}).get("spatial", 0.0)
    check_signal_config(cfg["loss"]["weights"], cfg["fit"]["learn"], dwi, spatial)
    return cfg, cfg_path or default


def _signal_inputs(args) -> dict:
    """The signal term's input files for the run record (none without ``--dwi``)."""
    if not getattr(args, "dwi", None):
        return {}
    out = {"dwi": os.path.abspath(args.dwi)}
    resp = [args.response] if isinstance(args.response, str) else list(args.response)
    out["response"] = (
        [os.path.abspath(r) for r in resp] if len(resp) > 1 else os.path.abspath(resp[0])
    )
    out["mask"] = os.path.abspath(args.mask) if args.mask else ""
    out["fslgrad"] = [os.path.abspath(f) for f in args.fslgrad or []]
    return out


def _bundle_data(args, world=None) -> dict:
    """The FOD image, the target (with its seeds), the starting tracking parameters and the
    signal term (``--dwi``, else None; solved on rank 0 and broadcast under ``world``).

    A large FOD (over :data:`invtract.io.scratch.SCRATCH_BYTES`) is copied into a scratch file
    in the temporary folder (``TMPDIR``; :mod:`invtract.io.scratch`): the fit then holds in
    memory only the part it reads."""
    import torch

    from ..fit.config import header_lengths
    from ..fit.optimise import c_order_fod
    from ..io.image import load_fod
    from ..io.seeds import seeds_from_reference
    from ..io.tractogram import load_tractogram, load_tractogram_header

    params0 = tracking_parameters(args)
    img = load_fod(args.fod, sh_basis=args.sh_basis, scratch=True)
    # one C-ordered copy that the fit and finish_run share (a mapped .mif's pages released)
    img = dataclasses.replace(img, data=c_order_fod(img.data, scratch=True))
    target = load_tractogram(args.target)
    if len(target) == 0:
        raise ConfigError(f"{args.target}: the target bundle has no streamlines")
    if args.target_seeds:
        pos, dirs, ti = seeds_from_reference(args.target, args.target_seeds)
        target = target.select(torch.as_tensor(ti))
    else:  # seed_index of a .trk/.trx written by invtract track, else midpoints
        from ..tracking.api import fit_target

        target, pos, dirs = fit_target(args.target)
    if str(args.target).endswith(".tck"):
        params0 = header_lengths(load_tractogram_header(args.target), params0)
    from ..fit.signal_term import signal_from_args

    signal = signal_from_args(args, img, world=world)
    return {"img": img, "target": target, "pos": pos, "dirs": dirs, "params0": params0,
            "signal": signal}  # fmt: skip


def _bundle_fit(args, cfg, data, logger, ckpt, world):
    from ..fit.optimise import fit
    from ..tracking.api import Seeding

    img = data["img"]
    # the command's own copy of the FOD: the fit writes its learned rows into it (no second
    # copy), and finish_run gives the start back from result.start_rows
    return fit(
        img, data["target"], data["params0"],
        seeding=Seeding("list", positions=data["pos"], directions=data["dirs"]),
        config=cfg, logger=logger, checkpoint=ckpt, resume=args.resume,
        progress=not args.no_progress, world=world, signal=data["signal"], fod_in_place=True,
    )  # fmt: skip


def _spawned(args, cfg: dict) -> bool:
    """With ``--nproc N > 1`` outside a process group: check the run folder, then run this
    same command in N processes (:func:`invtract.fit.distributed.spawn`); True when done."""
    if args.nproc < 1:
        raise ConfigError(f"--nproc must be >= 1, got {args.nproc}")
    if args.nproc == 1 or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return False
    from ..fit.distributed import spawn

    _run_folder(args)
    argv = list(getattr(args, "_argv", None) or sys.argv[1:])
    try:
        spawn(_rank_main, (argv,), args.nproc)
    except Exception as err:  # a rank failed: its last line is the message
        lines = [x for x in str(err).strip().splitlines() if x.strip()]
        last = lines[-1] if lines else repr(err)
        raise InvtractError(f"--nproc {args.nproc}: a rank failed: {last}") from None
    return True


def _rank_main(argv: list[str]) -> int:
    from ..cli import main

    return main(argv)


_PRINTED = (
    "step_mm",
    "angle_deg",
    "cutoff",
    "final_loss",
    "best_loss",
    "heldout_loss",
    "start_heldout_mdf_mm",
    "final_heldout_mdf_mm",
)


def _split_mdf(res, target, pos, index) -> float:
    """Paired MDF (mm, 20 points) of the seeds ``index`` (sorted) in ``res``, a hard tracking
    of every seed (a seed's streamline does not depend on the other seeds: one tracking
    scores every split)."""
    import numpy as np
    import torch

    from ..fit.scoring import ScoreConfig, score_tracking

    if len(index) == 0:
        return math.nan
    index = np.asarray(index, np.int64)
    ids = np.asarray(res.seed_ids, np.int64)
    keep = np.flatnonzero(np.isin(ids, index))
    tracked = res.streamlines.select(torch.as_tensor(keep))
    sub = target.select(torch.as_tensor(index))
    sc = score_tracking(tracked, np.searchsorted(index, ids[keep]), sub, pos[index], ScoreConfig())
    return float(sc.loss)


def finish_run(run_dir, logger, result, img, target, pos, dirs, params0, cfg, signal=None) -> dict:
    """Write fitted.tck, fitted_fod.nii.gz, result.json and the hparams record (with ``signal``,
    the ``--dwi`` term: its residuals in result.json's ``signal``)."""

    from ..fit.optimise import fod_field
    from ..fit.outputs import track_fitted, write_fitted_tck
    from ..io.image import save_nifti

    run_dir = Path(run_dir)
    field = fod_field(img)  # the image's C-ordered data, not copied; its header voxel sizes
    vsz = field.header_voxel_sizes
    p1 = result.params
    tr, ho = result.train_index, result.heldout_index
    learned = result.sh is not None
    if learned:  # the command's FOD buffer holds the start's rows, then the fitted ones
        vox = result.learned_voxels
        fitted_rows = result.sh.reshape(-1, result.sh.shape[-1])[vox].clone()
        field = _rows_written(field, vox, result.start_rows)
    res = track_fitted(field, params0, pos, dirs)  # every seed once per FOD and parameters
    start_h, start_t = (_split_mdf(res, target, pos, i) for i in (ho, tr))
    start_rms = _signal_rms(signal, field, result) if learned else None
    if learned:
        field = _rows_written(field, vox, fitted_rows)
    res = track_fitted(field, p1, pos, dirs)
    final_h, final_t = (_split_mdf(res, target, pos, i) for i in (ho, tr))
    write_fitted_tck(run_dir / "fitted.tck", res, source=getattr(img, "path", None))
    if learned:
        import numpy as np

        fitted = field.sh_flat.reshape(result.sh.shape).numpy()
        if np.may_share_memory(fitted, img.data):  # the command's copy (maybe a scratch file)
            fitted = img.data
        save_nifti(run_dir / "fitted_fod.nii.gz", fitted, img.affine, like=img.path)
    r0 = params0.resolve(vsz)
    r1 = p1.resolve(vsz)
    summary = {
        "step_mm": r1.step_mm,
        "angle_deg": r1.angle_deg,
        "cutoff": r1.cutoff,
        "final_loss": result.final_loss,
        "best_loss": result.best_loss,
        "best_iteration": result.best_iteration,
        "best_params": _values(result.best_params, vsz),
        "final_params": _values(result.final_params or result.params, vsz),
        "heldout_loss": result.heldout.get("total"),
        "heldout_terms": result.heldout,
        "start": {"step_mm": r0.step_mm, "angle_deg": r0.angle_deg, "cutoff": r0.cutoff},
        "start_train_mdf_mm": start_t,
        "final_train_mdf_mm": final_t,
        "start_heldout_mdf_mm": start_h,
        "final_heldout_mdf_mm": final_h,
        "iterations": result.iterations,
        "n_train": int(len(tr)),
        "n_heldout": int(len(ho)),
        "learned": list(cfg["fit"]["learn"]),
        "n_learned_voxels": None
        if result.learned_voxels is None
        else int(len(result.learned_voxels)),
        "fitted_tck": "fitted.tck",
        "n_fitted_streamlines": int(len(res.streamlines)),
    }
    if signal is not None and learned:
        summary["signal"] = _signal_summary(signal, field, result, start_rms)
    logger.write_json("result.json", summary)
    hp = {
        "fit": ",".join(cfg["fit"]["learn"]),
        "lr": cfg["optimizer"]["lr"],
        "iterations": cfg["fit"]["iterations"],
        "seeds_per_iteration": cfg["fit"]["seeds_per_iteration"],
        "start_step_mm": r0.step_mm,
        "start_angle_deg": r0.angle_deg,
        "start_cutoff": r0.cutoff,
    }
    metrics = {
        "hparam/final_loss": summary["final_loss"],
        "hparam/best_loss": summary["best_loss"],
        "hparam/step_mm": r1.step_mm,
        "hparam/angle_deg": r1.angle_deg,
        "hparam/cutoff": r1.cutoff,
    }
    if summary["heldout_loss"] is not None:
        metrics["hparam/heldout_loss"] = summary["heldout_loss"]
    logger.hparams(hp, metrics)
    return summary


def _rows_written(field, voxels, rows):
    """``field`` with ``rows`` written into its own coefficients at ``voxels`` (in place,
    :meth:`~invtract.fod.field.FODField.with_rows`), as a plain field for hard tracking."""
    return dataclasses.replace(field.with_rows(voxels, rows), learned=None)


def _signal_rms(signal, field, result) -> float | None:
    """Mean RMS residual (signal units) of ``field``'s coefficients over the learned voxels
    under the ``--dwi`` term (None without one)."""
    if signal is None:
        return None
    return signal.residual(field.sh_flat.detach(), result.learned_voxels)


def _signal_summary(signal, field, result, start_rms: float) -> dict:
    """The signal term's shell, noise level and mean RMS residual (signal units) of the start
    (``start_rms``) and the fitted FOD (``field``) over the learned voxels (``result.json``'s
    ``signal``)."""
    return {
        "bvalue": signal.model.bvalue,
        "n_directions": int(signal.model.volumes.size),
        "noise_sigma": signal.variance**0.5,
        "start_rms_residual": start_rms,
        "final_rms_residual": _signal_rms(signal, field, result),
        "spatial": signal.spatial,
        "spatial_cv": signal.coupling_cv,
    }


def _values(params, vsz) -> dict:
    r = params.resolve(vsz)
    return {"step_mm": r.step_mm, "angle_deg": r.angle_deg, "cutoff": r.cutoff}


def _require_files(args, required, optional, context: str) -> None:
    """Each ``required`` option is given and exists, each given ``optional`` one exists."""
    for flag in (*required, *optional):
        v = getattr(args, flag)
        name = "--" + flag.replace("_", "-")
        if not v and flag in required:
            raise ConfigError(f"{name} is required {context}")
        if v and not os.path.exists(v):
            raise InvtractError(f"{name}: file not found: {v}")


def _check_run_options(args) -> None:
    """``--iterations`` and ``--device``, for either kind of target."""
    import torch

    if args.iterations is not None and args.iterations < 0:
        raise ConfigError(f"--iterations must be >= 0, got {args.iterations}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: CUDA is not available")


def _collect_overrides(args, over: dict | None = None) -> dict:
    """Config overrides from the command line (flags per key, ``--set``, ``--fit``,
    ``--iterations``, ``--device``), applied on top of ``over``."""
    from ..fit.config import parse_value, set_dotted

    over = {} if over is None else over
    for k, v in vars(args).items():
        if k.startswith("cfg:") and v is not None:
            set_dotted(over, k[4:], parse_value(v))
    for item in args.set:
        if "=" not in item:
            raise ConfigError(f"--set needs SECTION.KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        set_dotted(over, k.strip(), parse_value(v))
    set_dotted(over, "fit.learn", _LEARN[args.fit])
    if getattr(args, "signal_spatial", None) is not None:
        set_dotted(over, "signal.spatial", args.signal_spatial)
    if args.iterations is not None:
        set_dotted(over, "fit.iterations", args.iterations)
    if args.device:
        set_dotted(over, "fit.device", args.device)
    return over


def _run_connectome(args) -> int:
    """``invtract fit --target-connectome MATRIX --parcellation LABELS --fod FOD``."""
    from ..fit.connectome_fit import fit_connectome, load_connectome_config

    # ------- CHECKS -------
    if args.example or args.target or args.target_seeds:
        raise ConfigError("--target-connectome replaces --target / --target-seeds / --example")
    required = ("target_connectome", "parcellation", "fod")
    _require_files(args, required, ("seed_image",), "with --target-connectome")
    check_act_args(args)
    if args.seed_gmwmi and args.seed_image:
        raise ConfigError("give --seed-image or --seed-gmwmi, not both")
    _check_run_options(args)
    cfg_path = find_config(args.config or "fit_connectome")
    cfg = load_connectome_config(cfg_path, _collect_overrides(args))
    act = load_act_args(args)  # a malformed 5TT fails here, before any run folder or tracking
    if act is not None:
        from ..fit.connectome_fit import check_act_tracker

        check_act_tracker(str(cfg["fit"]["tracker"]))
    started = _start(args, cfg)
    if started is None:
        return 0
    world, run_dir, ckpt, start_it = started
    img, labels, target, seed_mask = _connectome_data(args)
    params0 = _connectome_start(args, img, act, cfg)
    seeds = _gmwmi_seeds(args, act, cfg) if args.seed_gmwmi else None

    # ------- RUN -------
    logger = None
    if world.is_main:
        logger = _open_run(
            args, run_dir, start_it, cfg, params0, _connectome_inputs(args, cfg_path)
        )
    with _closing(logger):
        result = fit_connectome(
            img, labels, target, params0, seed_mask=seed_mask, seeds=seeds, config=cfg,
            logger=logger, checkpoint=ckpt, resume=args.resume,
            progress=not args.no_progress, world=world, act=act,
        )  # fmt: skip
        if not world.is_main:
            return 0
        summary = _finish_connectome(args, run_dir, logger, result, img, params0, cfg)
    keys = ("step_mm", "angle_deg", "cutoff", "start_correlation", "final_correlation",
            "final_loss", "best_loss")  # fmt: skip
    print(json.dumps({k: summary[k] for k in keys}, indent=2))
    return 0


def _connectome_inputs(args, cfg_path) -> dict:
    """The connectome fit's input files for the run record."""
    return {
        "target_connectome": os.path.abspath(args.target_connectome),
        "parcellation": os.path.abspath(args.parcellation),
        "fod": os.path.abspath(args.fod),
        "seed_image": os.path.abspath(args.seed_image) if args.seed_image else "",
        "fit": args.fit,
        "config": str(cfg_path),
        **_act_inputs(args),
    }


def _act_inputs(args) -> dict:
    """The ACT inputs of a connectome fit for the run record (none without ``--act``)."""
    if not args.act:
        return {}
    gmwmi = os.path.abspath(args.seed_gmwmi) if args.seed_gmwmi else ""
    return {"act": os.path.abspath(args.act), "crop_at_gmwmi": bool(args.crop_at_gmwmi),
            "seed_gmwmi": gmwmi}  # fmt: skip


def _connectome_start(args, img, act, cfg: dict):
    """The starting tracking parameters: the tracking flags, with ACT's defaults under
    ``--act`` (:func:`~invtract.tracking.act.act_parameters`); checks that the 5TT image can
    drive the fit (:func:`~invtract.fit.connectome_fit.check_act_inputs`)."""
    params0 = tracking_parameters(args)
    if act is None:
        return params0
    from ..fit.connectome_fit import check_act_inputs
    from ..tracking.act import act_parameters

    check_act_inputs(act, img.data.shape[:3], img.affine, str(cfg["fit"]["tracker"]))
    return act_parameters(params0, img.voxel_sizes)


def _gmwmi_seeds(args, act, cfg: dict):
    """``--seed-gmwmi``: ``(positions [N, 3], directions [N, 3])``, N = ``[seeding]
    max_seeds`` (default 1000) seeds drawn as ``tckgen -seed_gmwmi`` draws them (MRtrix's
    random stream seeded by ``[fit] seed``), with uniformly random directions; one fixed set."""
    import numpy as np

    from ..tracking.rng import MRtrixRNG
    from ..tracking.seeding_gmwmi import load_gmwmi_seeder

    n = int(cfg["seeding"]["max_seeds"]) or 1000
    seeder = load_gmwmi_seeder(args.seed_gmwmi, act)
    rng = MRtrixRNG(int(cfg["fit"]["seed"]))
    pos = np.stack([seeder.next(rng) for _ in range(n)]).astype(np.float32)
    d = np.random.default_rng(int(cfg["fit"]["seed"])).normal(size=pos.shape)
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    return pos, d.astype(np.float32)


def _connectome_data(args):
    """``(FOD image, label volume, target matrix, seed mask or None)``."""
    import numpy as np

    from ..fit.connectome_fit import read_connectome
    from ..io.image import load_fod, load_image, load_mask
    from ..losses.connectome import as_label_volume

    img = load_fod(args.fod, sh_basis=args.sh_basis)
    labels = as_label_volume(load_image(args.parcellation))
    target = read_connectome(args.target_connectome)
    seed_mask = None
    if args.seed_image:
        m = load_mask(args.seed_image)
        if tuple(np.asarray(m.data).shape[:3]) != tuple(img.data.shape[:3]) or not np.allclose(
            m.affine, img.affine, atol=1e-4
        ):
            raise ConfigError("--seed-image must be on the FOD's voxel grid")
        seed_mask = np.asarray(m.data) != 0
    return img, labels, target, seed_mask


def _finish_connectome(args, run_dir, logger, result, img, params0, cfg) -> dict:
    """Write fitted_connectome.csv, fitted_fod.nii.gz, result.json and the hparams record."""
    from ..losses.connectome import csv_delimiter, format_connectome

    vsz = tuple(img.voxel_sizes)
    r0, r1 = params0.resolve(vsz), result.params.resolve(vsz)
    summary = {
        **_values(result.params, vsz),
        "start_correlation": result.start_correlation,
        "final_correlation": result.final_correlation,
        "final_loss": result.final_loss,
        "best_loss": result.best_loss,
        "best_iteration": result.best_iteration,
        "best_params": _values(result.best_params, vsz),
        "final_params": _values(result.final_params or result.params, vsz),
        "start": _values(params0, vsz),
        "iterations": result.iterations,
        "learned": list(cfg["fit"]["learn"]),
        "fitted_connectome": "fitted_connectome.csv",
    }
    delim = csv_delimiter(args.target_connectome)
    logger.write_text(
        "fitted_connectome.csv", format_connectome(result.final_matrix, delimiter=delim)
    )
    if result.sh is not None:
        from ..io.image import save_nifti

        save_nifti(run_dir / "fitted_fod.nii.gz", result.sh.numpy(), img.affine, like=img.path)
        summary["fitted_fod"] = "fitted_fod.nii.gz"
    logger.write_json("result.json", summary)
    logger.hparams(
        {
            "fit": ",".join(cfg["fit"]["learn"]),
            "lr": cfg["optimizer"]["lr"],
            "iterations": cfg["fit"]["iterations"],
            "normalise": cfg["loss"]["normalise"],
            "start_cutoff": r0.cutoff,
        },
        {
            "hparam/final_correlation": summary["final_correlation"],
            "hparam/start_correlation": summary["start_correlation"],
            "hparam/final_loss": summary["final_loss"],
            "hparam/cutoff": r1.cutoff,
        },
    )
    return summary
