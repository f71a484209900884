"""Run a recorded ``tckgen`` command line again with invtract's own seeding, and compare.

A ``tckgen -algorithm SD_Stream -nthreads 0`` tractogram is a pure function of its inputs,
options and ``MRTRIX_RNG_SEED``. :func:`replay_command` reads the ``.tck`` header's
``command_history`` (FOD, seed mechanism and its image, ``-select``, ``-seeds``, ROIs) and
its recorded parameters, tracks with :func:`invtract.tracking.api.track` -- seeds made by
invtract from the seed image, random directions from the replayed MRtrix random stream -- and
compares the result with the reference streamline by streamline, in output order. So it
checks, unlike a replay of the seeds file, the FOD and ROI image geometry, the seed
mechanisms and which seeds produce streamlines.

Paths in the command line are taken relative to the ``.tck``'s folder (run the tckgen command
in that folder, as ``tests/data/tckgen_refs/make_refs.py`` does).
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass, field

import numpy as np

from ..errors import ConfigError
from ..fod.field import FODField
from ..io.image import load_fod, load_mask
from ..io.tractogram import load_tractogram, load_tractogram_header
from .api import Seeding, track
from .reference import _pair_metrics, parameters_from_header
from .rois import image_roi
from .types import RoiSet, SphereRoi

__all__ = ["TckgenCommand", "parse_tckgen_command", "command_rois", "replay_command"]

#: seed options -> (invtract seeding kind, number of values after the option)
_SEED_OPTIONS = {
    "-seed_grid_per_voxel": ("grid", 2),
    "-seed_random_per_voxel": ("random_per_voxel", 2),
    "-seed_image": ("image", 1),
    "-seed_sphere": ("sphere", 1),
    "-seed_gmwmi": ("gmwmi", 1),
}
_ROI_OPTIONS = ("-include", "-exclude", "-mask")
#: options whose runs invtract does not replay (anatomical constraints, other seeders, ...)
_UNSUPPORTED = {
    "-seed_dynamic", "-seed_rejection", "-seed_grid_per_voxel_act",
    "-include_ordered", "-backtrack", "-seeds_file", "-grad", "-fslgrad",
}  # fmt: skip
#: options that take one value and are read from the header's parameters instead
_VALUE_OPTIONS = {
    "-algorithm", "-step", "-angle", "-cutoff", "-minlength", "-maxlength", "-seed_direction",
    "-downsample", "-output_seeds", "-nthreads", "-trials", "-power", "-seed_cutoff",
    "-max_attempts_per_seed", "-config",
}  # fmt: skip


@dataclass
class TckgenCommand:
    """The parts of a tckgen command line that decide which seeds are tracked.

    Attributes:
        fod: FOD image path; seed: ``(kind, path or sphere text, count)``; select / seeds:
            ``-select`` / ``-seeds`` (None when absent); rois: ``(option, spec)`` pairs;
        act: the ``-act`` 5TT image path (None without ACT); crop_at_gmwmi: ``-crop_at_gmwmi``.
    """

    fod: str
    seed: tuple
    select: int | None = None
    seeds: int | None = None
    rois: list = field(default_factory=list)
    act: str | None = None
    crop_at_gmwmi: bool = False


def parse_tckgen_command(command: str) -> TckgenCommand:
    """Parse a ``tckgen`` ``command_history`` line (the trailing ``(version=...)`` allowed)."""
    words = shlex.split(command.split("  (version=")[0])
    if not words or os.path.basename(words[0]) != "tckgen":
        raise ConfigError(f"not a tckgen command line: {command!r}")
    positional, seed, select, seeds, rois = [], None, None, None, []
    act, crop = None, False
    i = 1
    while i < len(words):
        w = words[i]
        if w in _UNSUPPORTED:
            raise ConfigError(f"tckgen option {w} is not replayed by invtract: {command!r}")
        if w in _SEED_OPTIONS:
            kind, n = _SEED_OPTIONS[w]
            seed = (kind, words[i + 1], int(words[i + 2]) if n == 2 else 1)
            i += 1 + n
        elif w in _ROI_OPTIONS:
            rois.append((w[1:], words[i + 1]))
            i += 2
        elif w == "-act":
            act = words[i + 1]
            i += 2
        elif w == "-crop_at_gmwmi":
            crop = True
            i += 1
        elif w in ("-select", "-seeds"):
            value = int(float(words[i + 1]))
            select, seeds = (value, seeds) if w == "-select" else (select, value)
            i += 2
        elif w in _VALUE_OPTIONS:
            i += 2
        elif w.startswith("-") and len(w) > 1 and not w[1].isdigit():
            i += 1  # flags: -force, -quiet, -rk4, -seed_unidirectional, ...
        else:
            positional.append(w)
            i += 1
    if seed is None or len(positional) < 1:
        raise ConfigError(f"tckgen command without FOD or seed option: {command!r}")
    if seed[0] == "gmwmi" and act is None:
        raise ConfigError(f"-seed_gmwmi needs -act: {command!r}")
    return TckgenCommand(positional[0], seed, select, seeds, rois, act, crop)


def _roi(kind: str, spec: str, folder: str):
    path = os.path.join(folder, spec)
    if not os.path.exists(path) and spec.count(",") == 3:
        x, y, z, r = (float(v) for v in spec.split(","))
        return SphereRoi((x, y, z), r, spec)
    return image_roi(load_mask(path), spec)


def command_rois(cmd: TckgenCommand, folder: str) -> RoiSet:
    """The command's ``-include`` / ``-exclude`` / ``-mask`` regions (paths relative to
    ``folder``), built as tckgen builds them."""
    rois = {"include": [], "exclude": [], "mask": []}
    for kind, spec in cmd.rois:
        rois[kind].append(_roi(kind, spec, folder))
    return RoiSet(**{k: tuple(v) for k, v in rois.items()})


def _seeding(cmd: TckgenCommand, folder: str, act) -> Seeding:
    kind, spec, count = cmd.seed
    if kind == "gmwmi":
        from .seeding_gmwmi import load_gmwmi_seeder

        return Seeding("gmwmi", gmwmi=load_gmwmi_seeder(os.path.join(folder, spec), act))
    if kind == "sphere":
        return Seeding("sphere", sphere=tuple(float(v) for v in spec.split(",")))
    return Seeding.from_mask(kind, load_mask(os.path.join(folder, spec)), count)


def replay_command(tck_path, rng_seed: int, engine: str = "numba", batch_size: int = 4096) -> dict:
    """Re-run the tckgen command recorded in ``tck_path`` with invtract's own seeding.

    Args:
        tck_path: a tckgen ``.tck`` made with ``-nthreads 0``.
        rng_seed: the ``MRTRIX_RNG_SEED`` it ran with.
        engine: tracking engine (``"numba"`` is bit-exact).
        batch_size: seeds per engine call.

    Returns:
        The keys of :func:`invtract.tracking.reference.compare_reference` (streamlines paired
        in output order: the i-th of ours with the i-th of tckgen's), plus ``mode``
        (``"command"``), ``kept`` / ``ref_kept`` and ``generated`` / ``ref_generated``.
    """
    header = load_tractogram_header(tck_path)
    folder = os.path.dirname(os.path.abspath(str(tck_path)))
    cmd = parse_tckgen_command(header.get("command_history", "").splitlines()[-1])
    params = parameters_from_header(header)
    fod = load_fod(os.path.join(folder, cmd.fod))
    act = None
    if cmd.act is not None:
        from .act import load_act

        act = load_act(os.path.join(folder, cmd.act), crop_at_gmwmi=cmd.crop_at_gmwmi)
    res = track(
        FODField.from_image(fod),
        _seeding(cmd, folder, act),
        params,
        rois=command_rois(cmd, folder),
        engine=engine,
        select=cmd.select,
        max_seeds=cmd.seeds,
        rng_seed=rng_seed,
        batch_size=batch_size,
        act=act,
    )
    refs = load_tractogram(tck_path).to_list()
    ours = res.streamlines.to_list()
    paired = [ours[i] if i < len(ours) else None for i in range(len(refs))]
    out = {"reference": os.path.basename(str(tck_path)), "engine": res.engine, "mode": "command"}
    out.update(_pair_metrics(paired, refs, np.arange(len(refs))))
    total = header.get("total_count")
    out.update(
        kept=len(ours),
        ref_kept=len(refs),
        generated=int(res.summary["generated"]),
        ref_generated=int(total) if total is not None else None,
    )
    return out
