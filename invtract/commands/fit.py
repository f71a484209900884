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

A fraction of the target ([fit] heldout_fraction, default 0.2) is never used for gradients;
its losses are logged as loss/heldout/* so over-fitting shows.

Configuration precedence: defaults < --config FILE < --set SECTION.KEY=VALUE and the
--SECTION.KEY flags < the named flags (--iterations, --device). The tracking flags give the
starting (or fixed) parameters; unset ones are tckgen's defaults (min/max length from the
target's .tck header when present).

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
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import logging
import math
import os
import platform
import shlex
import sys
from pathlib import Path

from ..errors import ConfigError, InvtractError
from .track import add_tracking_options, tracking_parameters

log = logging.getLogger("invtract.fit")

_CONFIG_DIRS = (Path("configs"), Path(__file__).resolve().parents[2] / "configs")
_LEARN = {
    "params": ["step_mm", "angle_deg", "cutoff"],
    "fod": ["sh"],
    "both": ["step_mm", "angle_deg", "cutoff", "sh"],
}
#: settings of ``--example`` (a complete params fit on CPU in under 2 minutes)
EXAMPLE_OVERRIDES = {
    "fit": {"iterations": 24, "seeds_per_iteration": 8, "image_every": 5},
}


def _run_folder(args):
    """``(run_dir, checkpoint path, completed iterations or None)``; checks --resume."""
    from ..fit.checkpoint import checkpoint_iteration
    from ..fit.runlog import resolve_run_dir

    run_dir = resolve_run_dir(args.run)
    ckpt = run_dir / "checkpoint.pt"
    start_it = checkpoint_iteration(ckpt) if args.resume else None
    if args.resume and start_it is None:
        raise ConfigError(f"--resume: no checkpoint in {run_dir}")
    if not args.resume and ckpt.exists():
        raise ConfigError(f"{run_dir} already holds a run: use --resume or another --run")
    return run_dir, ckpt, start_it


def find_config(spec: str) -> Path:
    """A config path, or a bare name looked up in ``./configs`` then the repository's."""
    cands = [Path(spec), Path(spec + ".toml")]
    if "/" not in spec and os.sep not in spec:
        for d in _CONFIG_DIRS:
            cands += [d / spec, d / f"{spec}.toml"]
    else:
        cands += [_CONFIG_DIRS[1].parent / spec, _CONFIG_DIRS[1].parent / (spec + ".toml")]
    for c in cands:
        if c.is_file():
            return c
    raise ConfigError(f"config {spec!r} not found (tried {', '.join(map(str, cands))})")


def _parse_value(text: str):
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _set_key(over: dict, dotted: str, value) -> None:
    parts = dotted.split(".")
    if len(parts) < 2:
        raise ConfigError(f"config key must be SECTION.KEY, got {dotted!r}")
    d = over
    for p in parts[:-1]:
        d = d.setdefault(p, {})
    d[parts[-1]] = value


def _flat_keys(cfg: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in cfg.items():
        if isinstance(v, dict) and k != "weights":
            out += _flat_keys(v, f"{prefix}{k}.")
        elif k == "weights":
            from ..fit.objective import FOD_TERMS, TERMS

            out += [f"{prefix}weights.{t}" for t in TERMS + FOD_TERMS]
        else:
            out.append(prefix + k)
    return out


def toml_dumps(cfg: dict) -> str:
    """A small TOML writer for nested tables of numbers, strings, bools and lists."""

    def val(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v) if math.isfinite(v) else ('"nan"' if v != v else '"inf"')
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(val(x) for x in v) + "]"
        return json.dumps(str(v))

    lines: list[str] = []

    def table(name: str, d: dict) -> None:
        scalars = {k: v for k, v in d.items() if not isinstance(v, dict)}
        subs = {k: v for k, v in d.items() if isinstance(v, dict)}
        if name:
            lines.append(f"\n[{name}]")
        for k, v in scalars.items():
            if v is not None:
                lines.append(f"{k} = {val(v)}")
        for k, v in subs.items():
            table(f"{name}.{k}" if name else k, v)

    table("", cfg)
    return "\n".join(lines).lstrip() + "\n"


def _versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in ("invtract", "torch", "numpy", "scipy", "nibabel", "dipy", "tensorboard"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    try:
        import subprocess

        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parents[2],
        ).stdout.strip()
        out["git_sha"] = sha or None
    except (OSError, subprocess.SubprocessError):
        out["git_sha"] = None
    return out


class Fit:
    name = "fit"
    help = "fit tracking parameters or FOD coefficients to a target bundle (gradient descent)"

    @staticmethod
    def add_arguments(p: argparse.ArgumentParser) -> None:
        g = p.add_argument_group("inputs")
        g.add_argument("--target", help="target bundle (.tck, .trk, .trx), scanner mm")
        g.add_argument(
            "--target-seeds", help="tckgen -output_seeds file of the target (exact seeds)"
        )
        g.add_argument("--fod", help="FOD image (.nii, .nii.gz, .mif), SH coefficients")
        g.add_argument(
            "--example",
            action="store_true",
            help="fit the bundled phantom target (true step 1.0 mm) from tckgen's defaults",
        )
        c = p.add_argument_group(
            "connectome target (instead of --target; see docs/connectome_fit.md)"
        )
        c.add_argument(
            "--target-connectome",
            metavar="MATRIX",
            help="target connectome (tck2connectome CSV/TSV): fit whole-brain tracking to it",
        )
        c.add_argument(
            "--parcellation", metavar="LABELS", help="node parcellation image (with MATRIX)"
        )
        c.add_argument(
            "--seed-image",
            metavar="MASK",
            help="whole-brain seed mask (default: voxels with a non-zero FOD); see [seeding]",
        )
        from ..fit.signal_term import add_signal_arguments

        add_signal_arguments(p)
        r = p.add_argument_group("fit")
        r.add_argument(
            "--fit",
            choices=sorted(_LEARN),
            default="params",
            help="params: step/angle/cutoff; fod: SH coefficients; both (default params)",
        )
        r.add_argument(
            "--config",
            help="config TOML (path, or a name in configs/: fit_params, fit_fod, "
            "fit_connectome); default fit_params for --fit params, fit_fod otherwise, "
            "fit_connectome with --target-connectome",
        )
        r.add_argument("--run", help="run folder: a bare NAME goes to runs/NAME, a path as given")
        r.add_argument("--iterations", type=int, help="iterations (overrides [fit] iterations)")
        r.add_argument("--device", choices=("cpu", "cuda"), help="device ([fit] device)")
        r.add_argument(
            "--resume", action="store_true", help="continue the run from its last checkpoint"
        )
        r.add_argument(
            "--set",
            action="append",
            default=[],
            metavar="SECTION.KEY=VALUE",
            help="override any config key (repeatable), e.g. --set optimizer.lr=0.05",
        )
        r.add_argument("--no-tensorboard", action="store_true", help="no TensorBoard events")
        r.add_argument("--no-progress", action="store_true", help="no progress bar")
        from ..fit.optimise import DEFAULT_CONFIG

        c = p.add_argument_group("config keys (each overrides the config file)")
        for key in _flat_keys(DEFAULT_CONFIG):
            c.add_argument(
                f"--{key}",
                dest=f"cfg:{key}",
                metavar="V",
                default=None,
                help=argparse.SUPPRESS if key.startswith("loss.weights.") else None,
            )
        add_tracking_options(p)

    @staticmethod
    def run(args) -> int:
        import torch

        from ..fit.optimise import fit, load_config
        from ..fit.runlog import RunLogger

        if getattr(args, "target_connectome", None) or getattr(args, "parcellation", None):
            return _run_connectome(args)
        if getattr(args, "seed_image", None):
            raise ConfigError("--seed-image applies to --target-connectome fits only")
        # ------- CHECKS -------
        if getattr(args, "dwi", None) and not args.target and not args.example:
            from ..fit.signal_term import run_csd_only

            return run_csd_only(args)
        if args.example:
            from ..data import example_path

            if args.target or args.fod:
                raise ConfigError("--example uses the bundled data: no --target / --fod")
            args.target = str(example_path("target"))
            args.target_seeds = str(example_path("target_seeds"))
            args.fod = str(example_path("fod"))
        for flag in ("target", "fod"):
            v = getattr(args, flag)
            if not v:
                raise ConfigError(f"--{flag} is required (or --example)")
            if not os.path.exists(v):
                raise InvtractError(f"--{flag}: file not found: {v}")
        if args.target_seeds and not os.path.exists(args.target_seeds):
            raise InvtractError(f"--target-seeds: file not found: {args.target_seeds}")
        _check_run_options(args)
        cfg_path = find_config(
            args.config
            or ("fit_params" if args.fit == "params" else "fit_fod_dwi" if args.dwi else "fit_fod")
        )
        start = json.loads(json.dumps(EXAMPLE_OVERRIDES)) if args.example else {}
        cfg = load_config(cfg_path, _collect_overrides(args, start))
        from ..fit.optimise import FitConfig

        FitConfig.from_dict(cfg)  # validate before loading data
        run_dir, ckpt, start_it = _run_folder(args)
        params0 = tracking_parameters(args)

        # ------- DATA -------
        from ..io.image import load_fod
        from ..io.seeds import seeds_from_reference
        from ..io.tractogram import load_tractogram, load_tractogram_header
        from ..tracking.api import Seeding

        img = load_fod(args.fod, sh_basis=args.sh_basis)
        from ..fit.signal_term import signal_from_args

        signal = signal_from_args(args, img)
        target = load_tractogram(args.target)
        if len(target) == 0:
            raise ConfigError(f"{args.target}: the target bundle has no streamlines")
        if args.target_seeds:
            pos, dirs, ti = seeds_from_reference(args.target, args.target_seeds)
            target = target.select(torch.as_tensor(ti))
        else:
            from ..io.seeds import midpoint_seeds

            pos, dirs = midpoint_seeds(target)
        if str(args.target).endswith(".tck"):
            params0 = _header_lengths(load_tractogram_header(args.target), params0)
        seeding = Seeding("list", positions=pos, directions=dirs)

        # ------- RUN -------
        argv = ["invtract"] + [shlex.quote(a) for a in getattr(args, "_argv", sys.argv[1:])]
        logger = RunLogger(run_dir, tensorboard=not args.no_tensorboard, purge_step=start_it)
        record = dict(cfg)
        record["tracking"] = {
            k: (list(v) if isinstance(v, tuple) else v)
            for k, v in dataclasses.asdict(params0).items()
            if v is not None
        }
        record["inputs"] = {
            "target": os.path.abspath(args.target),
            "target_seeds": os.path.abspath(args.target_seeds) if args.target_seeds else "",
            "fod": os.path.abspath(args.fod),
            "fit": args.fit,
            "config": str(cfg_path),
        }
        if not args.resume:
            logger.write_text("config.toml", toml_dumps(record))
            logger.write_text("command.txt", " ".join(argv) + "\n")
            logger.write_json("versions.json", _versions())
        else:
            with open(run_dir / "command.txt", "a", encoding="utf-8") as f:
                f.write(" ".join(argv) + "\n")
        log.info(
            "run folder %s%s", run_dir, f" (resuming at iteration {start_it})" if start_it else ""
        )
        try:
            result = fit(
                img,
                target,
                params0,
                seeding=seeding,
                config=cfg,
                logger=logger,
                voxel_sizes=img.voxel_sizes,
                checkpoint=ckpt,
                resume=args.resume,
                progress=not args.no_progress,
                signal=signal,
            )
        except KeyboardInterrupt:
            logger.close()
            log.warning("interrupted: continue with the same command and --resume")
            raise
        except InvtractError:
            logger.close()
            raise
        try:
            summary = finish_run(run_dir, logger, result, img, target, pos, dirs, params0, cfg)
        finally:
            logger.close()
        print(json.dumps({k: summary[k] for k in _PRINTED if k in summary}, indent=2))
        return 0


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


def _header_lengths(header: dict, params):
    changes = {}
    for key, name in (("min_dist", "min_length_mm"), ("max_dist", "max_length_mm")):
        if getattr(params, name) is None and key in header:
            try:
                changes[name] = float(header[key])
            except ValueError:
                pass
    return params.replace(**changes) if changes else params


def _hard_score(field, vsz, params, pos, dirs, target, index) -> tuple[float, object]:
    """Paired MDF (mm, 20 points) of hard tracking from the seeds ``index``."""
    import torch

    from ..fit.scoring import ScoreConfig, score_tracking
    from ..tracking.api import Seeding, track

    if len(index) == 0:
        return math.nan, None
    sub = target.select(torch.as_tensor(index))
    with torch.no_grad():
        res = track(
            field,
            Seeding("list", positions=pos[index], directions=dirs[index]),
            params,
            voxel_sizes=vsz,
            rng_seed=0,
        )
    sc = score_tracking(res.streamlines, res.seed_ids, sub, pos[index], ScoreConfig())
    return float(sc.loss), res


def finish_run(run_dir, logger, result, img, target, pos, dirs, params0, cfg) -> dict:
    """Write fitted.tck, fitted_fod.nii.gz, result.json and the hparams record."""
    import torch

    from ..fod.field import FODField
    from ..io.image import save_nifti
    from ..io.tractogram import save_tractogram
    from ..tracking.api import Seeding, track

    run_dir = Path(run_dir)
    vsz = tuple(img.voxel_sizes)
    field0 = FODField.from_array(img.data, img.affine)
    field1 = field0 if result.sh is None else FODField.from_array(result.sh, img.affine)
    p1 = result.params
    tr, ho = result.train_index, result.heldout_index
    start_h, _ = _hard_score(field0, vsz, params0, pos, dirs, target, ho)
    final_h, _ = _hard_score(field1, vsz, p1, pos, dirs, target, ho)
    start_t, _ = _hard_score(field0, vsz, params0, pos, dirs, target, tr)
    final_t, _ = _hard_score(field1, vsz, p1, pos, dirs, target, tr)
    with torch.no_grad():
        res = track(
            field1,
            Seeding("list", positions=pos, directions=dirs),
            p1,
            voxel_sizes=vsz,
            rng_seed=0,
        )
    save_tractogram(run_dir / "fitted.tck", res.streamlines, header=res.header, overwrite=True)
    if result.sh is not None:
        save_nifti(run_dir / "fitted_fod.nii.gz", result.sh.numpy(), img.affine, like=img.path)
    r0 = params0.resolve(vsz)
    r1 = p1.resolve(vsz)
    summary = {
        "step_mm": r1.step_mm,
        "angle_deg": r1.angle_deg,
        "cutoff": r1.cutoff,
        "final_loss": result.final_loss,
        "best_loss": result.best_loss,
        "best_iteration": result.best_iteration,
        "best_params": {
            "step_mm": result.best_params.resolve(vsz).step_mm,
            "angle_deg": result.best_params.resolve(vsz).angle_deg,
            "cutoff": result.best_params.resolve(vsz).cutoff,
        },
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
    over = {} if over is None else over
    for k, v in vars(args).items():
        if k.startswith("cfg:") and v is not None:
            _set_key(over, k[4:], _parse_value(v))
    for item in args.set:
        if "=" not in item:
            raise ConfigError(f"--set needs SECTION.KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        _set_key(over, k.strip(), _parse_value(v))
    _set_key(over, "fit.learn", _LEARN[args.fit])
    if args.iterations is not None:
        _set_key(over, "fit.iterations", args.iterations)
    if args.device:
        _set_key(over, "fit.device", args.device)
    return over


def _run_connectome(args) -> int:
    """``invtract fit --target-connectome MATRIX --parcellation LABELS --fod FOD``."""
    import numpy as np

    from ..fit.connectome_fit import fit_connectome, load_connectome_config, read_connectome
    from ..fit.runlog import RunLogger
    from ..losses.connectome import as_label_volume, csv_delimiter, format_connectome

    # ------- CHECKS -------
    if args.example or args.target or args.target_seeds:
        raise ConfigError("--target-connectome replaces --target / --target-seeds / --example")
    for flag in ("target_connectome", "parcellation", "fod"):
        v = getattr(args, flag)
        name = "--" + flag.replace("_", "-")
        if not v:
            raise ConfigError(f"{name} is required with --target-connectome")
        if not os.path.exists(v):
            raise InvtractError(f"{name}: file not found: {v}")
    if args.seed_image and not os.path.exists(args.seed_image):
        raise InvtractError(f"--seed-image: file not found: {args.seed_image}")
    _check_run_options(args)
    cfg_path = find_config(args.config or "fit_connectome")
    cfg = load_connectome_config(cfg_path, _collect_overrides(args))
    run_dir, ckpt, start_it = _run_folder(args)
    params0 = tracking_parameters(args)

    # ------- DATA -------
    from ..io.image import load_fod, load_image, load_mask

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

    # ------- RUN -------
    argv = ["invtract"] + [shlex.quote(a) for a in getattr(args, "_argv", sys.argv[1:])]
    logger = RunLogger(run_dir, tensorboard=not args.no_tensorboard, purge_step=start_it)
    record = dict(cfg)
    record["tracking"] = {
        k: (list(v) if isinstance(v, tuple) else v)
        for k, v in dataclasses.asdict(params0).items()
        if v is not None
    }
    record["inputs"] = {
        "target_connectome": os.path.abspath(args.target_connectome),
        "parcellation": os.path.abspath(args.parcellation),
        "fod": os.path.abspath(args.fod),
        "seed_image": os.path.abspath(args.seed_image) if args.seed_image else "",
        "fit": args.fit,
        "config": str(cfg_path),
    }
    if not args.resume:
        logger.write_text("config.toml", toml_dumps(record))
        logger.write_text("command.txt", " ".join(argv) + "\n")
        logger.write_json("versions.json", _versions())
    else:
        with open(run_dir / "command.txt", "a", encoding="utf-8") as f:
            f.write(" ".join(argv) + "\n")
    try:
        result = fit_connectome(
            img,
            labels,
            target,
            params0,
            seed_mask=seed_mask,
            config=cfg,
            logger=logger,
            voxel_sizes=img.voxel_sizes,
            checkpoint=ckpt,
            resume=args.resume,
            progress=not args.no_progress,
        )
        vsz = tuple(img.voxel_sizes)
        r0, r1 = params0.resolve(vsz), result.params.resolve(vsz)
        rb = result.best_params.resolve(vsz)
        summary = {
            "step_mm": r1.step_mm,
            "angle_deg": r1.angle_deg,
            "cutoff": r1.cutoff,
            "start_correlation": result.start_correlation,
            "final_correlation": result.final_correlation,
            "final_loss": result.final_loss,
            "best_loss": result.best_loss,
            "best_iteration": result.best_iteration,
            "best_params": {"step_mm": rb.step_mm, "angle_deg": rb.angle_deg, "cutoff": rb.cutoff},
            "start": {"step_mm": r0.step_mm, "angle_deg": r0.angle_deg, "cutoff": r0.cutoff},
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
    except KeyboardInterrupt:
        logger.close()
        log.warning("interrupted: continue with the same command and --resume")
        raise
    finally:
        logger.close()
    keys = ("step_mm", "angle_deg", "cutoff", "start_correlation", "final_correlation",
            "final_loss", "best_loss")  # fmt: skip
    print(json.dumps({k: summary[k] for k in keys}, indent=2))
    return 0
