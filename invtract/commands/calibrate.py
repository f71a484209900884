"""Calibrate tracking parameters against a target bundle with an Optuna search.

Each trial suggests values from a search space (configs/search/NAME.toml: config name ->
distribution, bounds, log scale, choices), tracks one streamline per target seed and scores it
against the target (default: mean paired MDF in mm, 20 points, direct/flipped minimum; a seed
that yields no streamline is charged the distance of its target to the seed point).

Modes:
  blackbox  each trial tracks once with the suggested parameters (no gradients); default space
            configs/search/sd_stream.toml (step, angle, cutoff).
  hybrid    each trial runs a short gradient fit (invtract fit) with the suggested
            hyper-parameters and reports its loss every few iterations so that the pruner
            (median, Hyperband) stops bad trials early; default space fit_hparams.toml.

Seeds: --target-seeds FILE (the target's tckgen -output_seeds file) gives tckgen's exact seeds;
otherwise every target streamline is seeded at its middle vertex along its local direction.
Parameters that are not searched keep tckgen's defaults, the tracking flags below, or (min/max
length, rk4) the values in the target's .tck header.

Studies, storage and workers:
  --trials N adds N trials to the study: repeating a command resumes and extends it (--force
  deletes the study first and starts afresh). The
  storage is SQLite in the run folder (runs/NAME/study.db) unless --storage gives an Optuna
  storage URL (e.g. postgresql+psycopg2://user:pw@host:5432/db for many machines). --workers W
  starts W processes here on the same study; workers on other machines join by running the same
  command with the same --storage and --study. A killed worker loses only its running trial,
  which is marked FAIL after the heartbeat grace period; a diverged or NaN trial is recorded as
  FAIL with its reason. --seed makes a single-worker study reproducible.

Outputs (run folder: runs/NAME for a bare --run name, the path itself otherwise; without --run,
the newest runs/*_STUDY folder, or a new timestamped one): config.toml (resolved configuration,
command, versions), commands.txt (one timestamped line per invocation), best.json (best
trial's parameters under their config names and its loss), trials.csv (Optuna's
trials_dataframe), the plots of optuna.visualization.matplotlib (loss_vs_trial.png,
param_importance.png, parallel_coordinate.png, slice.png), study.db, and tb/ with one
TensorBoard run per trial plus an hparams summary.

Monitoring:
  tensorboard --logdir runs/NAME/tb          (HPARAMS tab compares trials)
  optuna-dashboard sqlite:///runs/NAME/study.db   (pip install optuna-dashboard; same URL as
                                                   --storage for a database server)
  invtract calibrate --show --storage URL --study NAME    (best trial, table, importances)

Examples:
  invtract calibrate --target bundle.tck --target-seeds bundle_seeds.txt --fod fod.nii.gz \\
      --space sd_stream --trials 50 --workers 2 --run bundleA --seed 1
  invtract calibrate --show --storage sqlite:///runs/bundleA/study.db --study bundle_sd_stream
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import shlex
import shutil
import sys
from pathlib import Path

from .. import checks
from ..errors import ConfigError, InvtractError
from ..params import TrackingParameters
from .options import add_target_options
from .track import add_tracking_options, tracking_parameters

log = logging.getLogger("invtract.calibrate")

_TARGET_SUFFIXES = (".tck", ".trk", ".trx")


def _delete_study(name: str, storage: str) -> None:
    """``--force``: start the study afresh instead of extending it (Optuna's delete_study)."""
    import optuna

    try:
        optuna.delete_study(study_name=name, storage=storage)
    except KeyError:
        return
    log.info("--force: deleted the existing study %r", name)


def _stem(path: str) -> str:
    name = Path(path).name
    for suf in _TARGET_SUFFIXES:
        if name.endswith(suf):
            return name[: -len(suf)]
    return name


class Calibrate:
    name = "calibrate"
    help = "calibrate tracking parameters against a target bundle (Optuna search)"

    @staticmethod
    def add_arguments(p: argparse.ArgumentParser) -> None:
        g = add_target_options(p)
        g.add_argument(
            "--space",
            metavar="NAME|FILE",
            help="search space (configs/search/NAME.toml); default sd_stream "
            "(blackbox) or fit_hparams (hybrid)",
        )
        s = p.add_argument_group("search")
        s.add_argument(
            "--mode", choices=["blackbox", "hybrid"], help="default: the space's [study] mode"
        )
        s.add_argument("--trials", type=int, default=20, help="trials to add (default 20)")
        s.add_argument("--workers", type=int, default=1, help="local worker processes")
        s.add_argument("--storage", metavar="URL", help="Optuna storage URL (default SQLite)")
        s.add_argument("--study", metavar="NAME", help="study name (default TARGET_SPACE)")
        s.add_argument("--run", metavar="NAME|DIR", help="run folder (runs/NAME or a path)")
        s.add_argument("--seed", type=int, help="sampler seed (reproducible with 1 worker)")
        s.add_argument("--timeout", type=float, help="stop each worker after S seconds")
        s.add_argument("--show", action="store_true", help="summarise an existing study and exit")
        s.add_argument(
            "--no-tensorboard", action="store_true", help="do not write per-trial TensorBoard runs"
        )
        s.add_argument(
            "--engine", default="auto", choices=["auto", "torch", "numba"], help="tracking engine"
        )
        add_tracking_options(p)

    @staticmethod
    def run(args) -> int:
        from ..fit import search

        if args.show:
            return _show(args, search)

        # ------- CHECKS -------
        for flag in ("target", "fod"):
            if not getattr(args, flag):
                raise ConfigError(f"--{flag} is required (or use --show)")
        checks.check_input_files(
            [("--target", args.target), ("--fod", args.fod), ("--target-seeds", args.target_seeds)]
        )
        if args.trials < 0:
            raise ConfigError(f"--trials must be >= 0, got {args.trials}")
        if args.workers < 1:
            raise ConfigError(f"--workers must be >= 1, got {args.workers}")
        if args.timeout is not None and args.timeout <= 0:
            raise ConfigError(f"--timeout must be > 0 s, got {args.timeout}")
        space_spec = args.space or ("fit_hparams" if args.mode == "hybrid" else "sd_stream")
        space = search.load_space(space_spec)
        mode = args.mode or space.mode
        space.check_mode(mode)
        fixed = _fixed_parameters(args)
        study_name = args.study or f"{_stem(args.target)}_{space.name}"
        run_dir = search.resolve_run_dir(args.run, study_name)
        if args.storage:  # reachable before anything is created
            checks.check_sqlite_storage(args.storage, "--storage", must_exist=False)
            search.make_storage(args.storage, heartbeat_interval=None)
        if run_dir.exists() and not run_dir.is_dir():
            raise ConfigError(f"--run {run_dir} is a file, not a folder")
        created = not run_dir.exists()
        run_dir.mkdir(parents=True, exist_ok=True)
        storage = args.storage or search.default_storage_url(run_dir)
        if getattr(args, "force", False):
            _delete_study(study_name, storage)

        job = search.SearchJob(
            target=os.path.abspath(args.target),
            fod=os.path.abspath(args.fod),
            space=space.path or space_spec,
            storage=storage,
            study=study_name,
            run_dir=str(run_dir.resolve()),
            mode=mode,
            target_seeds=os.path.abspath(args.target_seeds) if args.target_seeds else None,
            fixed=fixed,
            sh_basis=args.sh_basis,
            engine=args.engine,
            seed=args.seed,
            timeout=args.timeout,
            tensorboard=not args.no_tensorboard,
            progress=sys.stderr.isatty(),
        )
        argv = ["invtract"] + [shlex.quote(a) for a in getattr(args, "_argv", sys.argv[1:])]
        search.record_run(
            run_dir,
            dataclasses.replace(job, storage=search._redact(storage)),
            space,
            argv,
            {"trials": args.trials, "workers": args.workers},
        )
        log.info(
            "study %r (%s mode) in %s; run folder %s",
            study_name,
            mode,
            search._redact(storage),
            run_dir,
        )

        # ------- SEARCH -------
        try:
            search.run_search(job, args.trials, workers=args.workers)
        except KeyboardInterrupt:
            _finish(search, job, run_dir)
            raise
        except InvtractError:
            if created:
                _remove_if_unused(job, run_dir)
            raise
        _finish(search, job, run_dir)
        return 0


def _fixed_parameters(args) -> dict:
    """Tracking flags that differ from tckgen's defaults, as TrackingParameters fields."""
    given = tracking_parameters(args)
    default = TrackingParameters()
    out = {}
    for f in dataclasses.fields(TrackingParameters):
        v = getattr(given, f.name)
        if v != getattr(default, f.name):
            out[f.name] = list(v) if isinstance(v, tuple) else v
    if "seed_direction" in out:
        out["seed_direction"] = tuple(out["seed_direction"])
    return out


def _remove_if_unused(job, run_dir: Path) -> None:
    """Remove the run folder this command created when the search failed before any trial
    (bad inputs found by the workers): a failed command leaves nothing behind."""
    import optuna

    try:
        study = optuna.load_study(study_name=job.study, storage=job.storage)
        if study.get_trials(deepcopy=False):
            return
    except Exception:  # no study or no database: nothing of value in the folder
        pass
    shutil.rmtree(run_dir, ignore_errors=True)


def _finish(search, job, run_dir: Path) -> None:
    import optuna

    storage = search.make_storage(job.storage, heartbeat_interval=None)
    study = optuna.load_study(study_name=job.study, storage=storage)
    paths = search.write_outputs(study, run_dir)
    print(search.format_summary(study, max_rows=20))
    log.info("outputs: %s", ", ".join(str(p) for p in paths.values()))


def _show(args, search) -> int:
    import optuna

    storage = args.storage
    if storage:
        checks.check_sqlite_storage(storage, "--storage", must_exist=True)
    if not storage and args.run:
        run_dir = search.resolve_run_dir(args.run, args.study or "")
        if not (run_dir / "study.db").is_file():
            raise InvtractError(f"no study.db in {run_dir}; give --storage URL")
        storage = search.default_storage_url(run_dir)
    if not storage:
        raise ConfigError("--show needs --storage URL (and --study NAME)")
    st = search.make_storage(storage, heartbeat_interval=None)
    names = optuna.get_all_study_names(storage=st)
    name = args.study
    if name is None:
        if len(names) != 1:
            raise ConfigError(f"--show needs --study NAME; studies here: {names}")
        name = names[0]
    if name not in names:
        raise InvtractError(f"no study {name!r} in {search._redact(storage)}; found {names}")
    study = optuna.load_study(study_name=name, storage=st)
    print(search.format_summary(study))
    if args.run:
        run_dir = search.resolve_run_dir(args.run, name)
        paths = search.write_outputs(study, run_dir)
        log.info("outputs: %s", ", ".join(str(p) for p in paths.values()))
    return 0
