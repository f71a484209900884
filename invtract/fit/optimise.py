"""Gradient fit of tracking parameters and/or FOD coefficients to a paired target bundle.

:func:`fit` builds a :class:`~invtract.fit.bundle.BundleProblem` (each iteration: a minibatch
of training seeds tracked with :func:`~invtract.tracking.differentiable.track_differentiable`
and scored with :func:`~invtract.fit.objective.paired_terms` + parameter terms) and runs it
with the one training loop, :class:`~invtract.fit.trainer.Trainer` (optimiser, schedule,
checkpoints, logging, best-iterate selection, data parallelism). A fraction of the target
(``heldout_fraction``) is never used for gradients; its losses are evaluated every
``eval_every`` iterations.

Learned quantities (``learn``):

* ``step_mm``, ``angle_deg``, ``cutoff``: ``[fit] space = "log"`` (default) learns
  ``z = log(value)``, projected back into ``[bounds]`` after every step, so an optimiser step
  is a relative change of the same size anywhere in the range (60 -> 1 degree takes as many
  steps as 1 -> 0.017); ``"bounded"`` uses ``value = exp(log lo + (log hi - log lo)
  sigmoid(z))``, whose steps shrink near the bounds.
* ``sh``: an additive change of the SH coefficients of the voxels the training target passes
  through (dilated by ``margin_vox``; voxels where the FOD is all-zero stay zero).

The survival weights' temperature anneals geometrically from ``*_start`` to ``*_end``
(amplitude units, and degrees for the angle test; see
:func:`~invtract.fit.objective.soft_temperature`), and the ``margin`` hinge's from
``margin_start`` to ``margin_end`` (log units). The learning rate decays geometrically from
``[optimizer] lr`` to ``lr_end``; Signum's ``flip_decay`` halves a parameter's step when its
direction flips, so the last iterates settle instead of oscillating around the minimum.

Result: every ``eval_every`` iterations the training data loss on the whole training split
(no gradient, at the last iteration's temperatures) selects the best iterate (starting values
included); :attr:`FitResult.params` are those values, :attr:`FitResult.final_params` the last
iterate's.

``anchor`` (a ``[loss.weights]`` term): ``sum_k sqrt((log v_k - log v0_k)^2 + 1e-4)`` over the
learned angle and cutoff, ``v0`` the starting (tckgen default) values. A weak pull back to the
defaults: where the target does not constrain a threshold (the data terms are flat there), it
stays at tckgen's value instead of drifting. Where the target bounds a threshold on both sides,
``centre`` (weighted above ``anchor``; :func:`~invtract.fit.objective.feasible_box`) moves it
to the middle of that interval instead of its edge nearest the default.

Determinism and resume: the minibatch of iteration ``k`` is drawn from a generator seeded with
``(seed, k)``, and the checkpoint holds the learned tensors, optimiser states, history and
split, so a resumed run ends exactly where an uninterrupted one does (CPU).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError
from ..io.seeds import midpoint_seeds
from ..params import TrackingParameters
from ..streamlines import Streamlines
from .config import layered_config, merge_config, read_toml, validate
from .descent import annealed
from .distributed import SINGLE, World
from .objective import (
    FOD_TERMS,
    PARAM_TERMS,
    SIGNAL_TERMS,
    TERMS,
    LossConfig,
    PairedTarget,
    soft_temperature,
)
from .reparam import PARAM_NAMES
from .trainer import Trainer, TrainSettings

__all__ = [
    "PARAM_NAMES",
    "DEFAULT_CONFIG",
    "RULES",
    "FitConfig",
    "FitResult",
    "fit",
    "build_problem",
    "midpoint_seeds",
    "merge_config",
    "load_config",
    "read_toml",
    "fitted_tracking",
    "TERMS",
]

log = logging.getLogger(__name__)

#: the keys every fit config has (the bundle fit's values; the connectome fit replaces some)
COMMON_DEFAULTS: dict = {
    "fit": {
        "learn": ["step_mm", "angle_deg", "cutoff"],
        "iterations": 60,
        "seed": 0,
        "mode": "joint",
        "eval_every": 5,
        "converge_below": 1e-4,
        "image_every": 10,
        "checkpoint_every": 1,
        "path": "efficient",
        "device": "cpu",
        "space": "log",
    },
    "optimizer": {
        "name": "signum",
        "lr": 0.3,
        "lr_end": 0.005,
        "beta1": 0.5,
        "beta2": 0.999,
        "flip_decay": 0.5,
        "sign_eps": 1e-9,
        "lr_sh": 0.01,
        "grad_clip": 0.0,
        "sh_spike": 5.0,  # SH-gradient spike guard (Trainer._spike_guard; 0: off)
        "sh_spike_mode": "skip",
    },
    "temperature": {
        "amplitude_start": 0.1,
        "amplitude_end": 0.02,
        "angle_start_deg": 2.0,
        "angle_end_deg": 0.5,
        "schedule": "geometric",
    },
    "bounds": {"step_mm": [0.02, 5.0], "angle_deg": [0.5, 90.0], "cutoff": [0.01, 3.0]},
}

#: defaults of every config key (the TOML files in configs/ document them)
DEFAULT_CONFIG: dict = {
    **COMMON_DEFAULTS,
    "fit": {**COMMON_DEFAULTS["fit"], "seeds_per_iteration": 32, "heldout_fraction": 0.2},
    "temperature": {**COMMON_DEFAULTS["temperature"], "margin_start": 0.1, "margin_end": 0.003},
    "fod": {"margin_vox": 1},
    # the diffusion-signal term of --dwi (invtract.fit.signal_term): spatial coupling of the
    # learned voxels' l >= 4 coefficients to their 6 neighbours ("auto": W by cross-validation,
    # invtract.fit.signal_coupling; a number >= 0 forces W; 0: off); --signal-spatial W.
    # start: "csd" (the given FOD) or "coupled" (the learned voxels start at the minimiser of
    # the signal term with its coupling, SignalTerm.start_change)
    "signal": {"spatial": "auto", "start": "csd"},
    "loss": {
        "n_points": 16,
        "temperature_mm": 0.5,
        "radius_mm": 1.0,
        "coverage_weight": 1.0,
        "sphere_points": 256,
        "reach_margin": 0.1,  # reach: relative amplitude margin above the cutoff
        "replay_sigma_deg": 10.0,  # replay: scale of the robust loss on the replayed steps
        "weights": {"mdf": 1.0, "vertex": 1.0, "margin": 1.0, "centre": 0.05, "anchor": 0.01},
    },
}


def rules(*, positive=(), non_negative=(), unit=(), choices=None, at_least=None) -> dict:
    """A rules table for :func:`~invtract.fit.config.validate`: keys that must be > 0,
    >= 0, in [0, 1), one of some ``choices`` (key -> tuple), or >= a number (key -> n)."""
    out: dict = {k: (">", 0) for k in positive}
    out.update({k: (">=", 0) for k in non_negative})
    out.update({k: ("[0,1)", None) for k in unit})
    out.update({k: ("in", tuple(v)) for k, v in (choices or {}).items()})
    out.update({k: (">=", v) for k, v in (at_least or {}).items()})
    return out


#: validation rules shared by every fit config (see :func:`invtract.fit.config.validate`)
COMMON_RULES: dict = {
    "fit.learn": ("subset", PARAM_NAMES + ("sh",)),
    **{f"bounds.{k}": ("bounds", None) for k in PARAM_NAMES},
    **rules(
        positive=["optimizer.lr", "optimizer.lr_sh", "optimizer.flip_decay"]
        + [f"temperature.{k}" for k in COMMON_DEFAULTS["temperature"] if k != "schedule"],
        non_negative=[
            "fit.iterations",
            "fit.image_every",
            "optimizer.grad_clip",
            "optimizer.sh_spike",
            "optimizer.sign_eps",
            "optimizer.lr_end",
        ],  # fmt: skip
        unit=["optimizer.beta1", "optimizer.beta2"],
        choices={
            "fit.mode": ("joint", "alternate"),
            "optimizer.sh_spike_mode": ("skip", "clip"),
            "fit.path": ("efficient", "plain"),
            "fit.device": ("cpu", "cuda"),
            "fit.space": ("log", "bounded"),
            "temperature.schedule": ("geometric", "linear", "constant"),
        },
        at_least={"fit.eval_every": 1, "fit.checkpoint_every": 1},
    ),
}

#: rules of the bundle fit's config
RULES: dict = {
    **COMMON_RULES,
    **rules(
        positive=[
            "temperature.margin_start",
            "temperature.margin_end",
            "loss.temperature_mm",
            "loss.radius_mm",
        ],  # fmt: skip
        non_negative=["fod.margin_vox", "loss.reach_margin", "loss.replay_sigma_deg"],
        unit=["fit.heldout_fraction"],
        choices={"optimizer.name": ("signum", "adam", "sgd"), "signal.start": ("csd", "coupled")},
        at_least={"fit.seeds_per_iteration": 1, "loss.n_points": 2, "loss.sphere_points": 4},
    ),
}

#: keyword aliases accepted by fit() (Optuna hybrid names) -> config keys
_ALIASES = {
    key: (section, name or key)
    for section, keys in {
        "optimizer": ("lr", "lr_sh", ("optimizer", "name")),
        "loss": ("temperature_mm", "coverage_weight", "radius_mm", "n_points"),
        "fit": ("seeds_per_iteration", "heldout_fraction", "iterations", "mode", "seed"),
    }.items()
    for key, name in ((k, None) if isinstance(k, str) else k for k in keys)
}


def load_config(
    path: str | Path | None,
    overrides: Mapping | None = None,
    *,
    example: Mapping | None = None,
    base: str | Path | None = None,
) -> dict:
    """:data:`DEFAULT_CONFIG` < default file ``base`` < ``example`` < TOML file ``path`` <
    ``overrides``, validated (:func:`~invtract.fit.config.layered_config`)."""
    cfg = layered_config(DEFAULT_CONFIG, path, overrides, example=example, base=base)
    FitConfig.from_dict(cfg)
    return cfg


@dataclass(frozen=True)
class FitConfig:
    """The validated config (see ``configs/fit_params.toml``); ``raw`` is the dict."""

    learn: tuple
    iterations: int
    seeds_per_iteration: int
    heldout_fraction: float
    seed: int
    path: str
    device: str
    temperature: dict
    bounds: dict
    margin_vox: int
    loss: LossConfig
    raw: dict = field(default_factory=dict)
    space: str = "log"

    @classmethod
    def from_dict(cls, cfg: Mapping) -> FitConfig:
        """Merge ``cfg`` over the defaults, type-check and validate (:data:`RULES`)."""
        cfg = merge_config(DEFAULT_CONFIG, cfg)
        validate(cfg, RULES)
        f = cfg["fit"]
        known = TERMS + FOD_TERMS + PARAM_TERMS + SIGNAL_TERMS
        bad = sorted(set(cfg["loss"]["weights"]) - set(known))
        if bad:
            raise ConfigError(f"loss.weights: unknown terms {bad}; known {known}")
        if any(v < 0 for v in cfg["loss"]["weights"].values()):
            raise ConfigError(f"loss.weights must be >= 0: {cfg['loss']['weights']}")
        return cls(
            learn=tuple(f["learn"]),
            iterations=int(f["iterations"]),
            seeds_per_iteration=int(f["seeds_per_iteration"]),
            heldout_fraction=float(f["heldout_fraction"]),
            seed=int(f["seed"]),
            path=str(f["path"]),
            device=str(f["device"]),
            temperature=dict(cfg["temperature"]),
            bounds={k: tuple(float(x) for x in cfg["bounds"][k]) for k in PARAM_NAMES},
            margin_vox=int(cfg["fod"]["margin_vox"]),
            loss=LossConfig.from_dict(cfg["loss"]),
            raw=cfg,
            space=str(f["space"]),
        )

    def margin_temperature(self, it: int) -> float:
        """Hinge softness of the ``margin`` term at iteration ``it`` (log units)."""
        return annealed(self.temperature, it, self.iterations, "margin_start", "margin_end")

    def temperatures(self, it: int, angle_deg: float) -> tuple[float, float, float, float]:
        """``(T_amp, T_cos, T_amp, T_angle_deg)`` at iteration ``it``."""
        ta = annealed(self.temperature, it, self.iterations, "amplitude_start", "amplitude_end")
        tdeg = annealed(self.temperature, it, self.iterations, "angle_start_deg", "angle_end_deg")
        amp, cos = soft_temperature(ta, tdeg, angle_deg)
        return amp, cos, ta, tdeg


@dataclass
class FitResult:
    """What :func:`fit` returns.

    Attributes:
        params: the selected (best) iterate's tracking parameters: what ``fitted.tck`` and
            ``result.json`` use (numbers, not tensors).
        sh: the selected iterate's ``[X, Y, Z, K]`` SH coefficients (float32) when ``sh`` was
            learned, else None.
        history: one dict per iteration (as in ``metrics.jsonl``).
        best_loss: selection loss (training data loss on the whole training split) of
            ``params``.
        final_loss: selection loss of the last iterate.
        best_iteration: completed iterations at ``params`` (0: the starting values).
        best_params: the same as ``params`` (kept for callers of earlier versions).
        final_params, final_sh: the last iterate's tracking parameters and SH coefficients
            (``final_sh``: built from ``sh`` and ``final_rows`` when read, one copy).
        heldout: last held-out evaluation ``{term: value}`` (empty without held-out seeds).
        train_index, heldout_index: target streamline indices of each split.
        iterations: iterations run in total (including those before a resume).
        wall_s: seconds spent in this call.
        learned_voxels: ``[V]`` flat indices of the learned voxels (``sh``), else None.
        final_rows: ``[V, K]`` the last iterate's SH coefficients of the learned voxels (the
            others are ``sh``'s), else None.
        start_rows: ``[V, K]`` the starting SH coefficients of the learned voxels (float32),
            else None: with ``fod_in_place`` the caller's array holds the fitted rows, and
            these give the start back.
    """

    params: TrackingParameters
    sh: torch.Tensor | None
    history: list
    best_loss: float
    final_loss: float
    best_iteration: int
    best_params: TrackingParameters
    heldout: dict
    train_index: np.ndarray
    heldout_index: np.ndarray
    iterations: int
    wall_s: float
    learned_voxels: torch.Tensor | None = None
    final_params: TrackingParameters | None = None
    final_rows: torch.Tensor | None = None
    start_rows: torch.Tensor | None = None

    @property
    def final_sh(self) -> torch.Tensor | None:
        """The last iterate's ``[X, Y, Z, K]`` SH coefficients (float32; a new tensor), or
        None when ``sh`` was not learned."""
        if self.final_rows is None or self.sh is None:
            return None
        K = self.sh.shape[-1]
        flat = self.sh.reshape(-1, K).index_put((self.learned_voxels,), self.final_rows)
        return flat.reshape(self.sh.shape)


def c_order_fod(data, scratch: bool | str | os.PathLike = False) -> np.ndarray:
    """``data`` ``[X, Y, Z, K]`` as a C-ordered float32 array: ``data`` itself when it is one,
    else one copy, made slab by slab along the slowest axis in memory. Pages of a memory-mapped
    source (a ``.mif``'s coefficient-major layout, an uncompressed NIfTI) are released from
    the resident set as each slab is copied, so the peak is about one copy, not two.

    ``scratch``: True (the system's temporary folder, ``TMPDIR``) or a folder: a large copy
    (:func:`~invtract.io.scratch.scratch_or_memory`) is then made in a scratch file there (an
    unlinked file's shared mapping), its pages released too: the copy costs one slab of
    memory, and later only the pages a fit touches are resident."""
    if torch.is_tensor(data):
        data = data.detach().cpu().numpy()
    a = np.asarray(data)
    if a.dtype == np.float32 and a.flags.c_contiguous:
        return a
    from ..io.scratch import release, scratch_or_memory
    from ..io.voxel_major import released_slabs

    out = scratch_or_memory(a.shape, np.float32, scratch)
    for sl, _ in released_slabs(a):
        out[sl] = a[sl]
        release(out)
    return out


def fod_field(fod, device: torch.device | str = "cpu"):
    """The fit's FOD: one float32 :class:`~invtract.fod.field.FODField` on ``device`` whose
    ``[X*Y*Z, K]`` coefficients are C-ordered, carrying the header voxel sizes that resolve
    tckgen's defaults.

    Args:
        fod: an :class:`~invtract.fod.field.FODField` (its coefficients, detached: a view
            when float32 and C-ordered), an :class:`~invtract.io.image.Image` (its data: a
            view when C-ordered float32, as after :func:`c_order_fod`, else one copy, a mapped
            file's pages released while copying; its header voxel sizes) or ``(sh [X, Y, Z, K],
            affine [4, 4])`` (voxel sizes: the affine's column norms).
    """
    from ..fod.field import FODField

    if isinstance(fod, FODField):
        field = fod.detach().to(dtype=torch.float32)
        if not field.sh_flat.is_contiguous():
            field = field.with_sh(field.sh_flat.contiguous())
    elif hasattr(fod, "data") and hasattr(fod, "affine"):
        from ..fod.interp import nonzero_rows
        from ..io.scratch import release

        arr = _writable(c_order_fod(fod.data))
        sh = torch.from_numpy(arr)
        # the non-zero mask here, so a scratch copy's pages are released chunk by chunk
        nonzero = nonzero_rows(sh.reshape(-1, sh.shape[-1]), lambda: release(arr))
        field = FODField.from_array(
            sh, fod.affine, voxel_sizes=getattr(fod, "voxel_sizes", None), nonzero=nonzero
        )
    else:
        data, affine = fod
        field = FODField.from_array(torch.from_numpy(_writable(c_order_fod(data))), affine)
    return field.to(device)


def _owned(field, fod):
    """``field`` (the :func:`fod_field` of ``fod``, on the fit's device), its coefficients
    copied once when they share memory with the caller's ``fod`` (a fit that learns ``sh``
    writes into its coefficients: never into the caller's)."""
    if hasattr(fod, "sh_flat"):
        data = fod.sh_flat
    else:
        data = fod.data if hasattr(fod, "data") else fod[0]
    buf = field.sh_flat
    if torch.is_tensor(data):
        data = data.detach()
        shared = data.device == buf.device and (
            data.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr()
        )
    else:
        shared = buf.device.type == "cpu" and np.may_share_memory(np.asarray(data), buf.numpy())
    # the same values: the non-zero mask stays valid
    return dataclasses.replace(field, sh_flat=buf.clone()) if shared else field


def _writable(a: np.ndarray) -> np.ndarray:
    """``a``, or a copy when it is read-only (torch cannot wrap a read-only array)."""
    return a if a.flags.writeable else a.copy()


def learned_voxels(fod, target: Streamlines, margin: int) -> torch.Tensor:
    """``[V]`` flat indices of the voxels ``target`` passes through, dilated by ``margin``
    voxels, where the FOD (an :class:`~invtract.fod.field.FODField`) is not all-zero."""
    from scipy.ndimage import binary_dilation

    shape = tuple(fod.shape)
    pts = target.points.detach().cpu().numpy().astype(np.float64)
    inv = np.linalg.inv(fod.voxel2scanner)
    vox = np.rint(pts @ inv[:3, :3].T + inv[:3, 3]).astype(np.int64)
    ok = np.all((vox >= 0) & (vox < np.array(shape)), 1)
    m = np.zeros(shape, bool)
    m[tuple(vox[ok].T)] = True
    if margin > 0:
        m = binary_dilation(m, iterations=margin)
    m &= fod.nonzero_flat.cpu().numpy().reshape(shape)
    return torch.as_tensor(np.flatnonzero(m.ravel()), dtype=torch.long)


def _apply_hparams(raw: dict, hparams: Mapping) -> dict:
    over: dict = {}
    for k, v in hparams.items():
        if k in _ALIASES:
            sec, key = _ALIASES[k]
        elif "." in k or "__" in k:
            sec, key = k.replace("__", ".").split(".", 1)
        else:
            raise ConfigError(
                f"fit() got an unknown keyword {k!r}; known: {sorted(_ALIASES)} or 'section.key'"
            )
        over.setdefault(sec, {})[key] = v
    return merge_config(raw, over) if over else raw


def resolve_config(config, steps=None, learn=None, hparams: Mapping | None = None) -> FitConfig:
    """The :class:`FitConfig` of ``config`` (dict or FitConfig) with the keyword overrides."""
    raw = (
        config.raw if isinstance(config, FitConfig) else merge_config(DEFAULT_CONFIG, config or {})
    )
    raw = _apply_hparams(raw, hparams or {})
    if steps is not None:
        raw = merge_config(raw, {"fit": {"iterations": int(steps)}})
    if learn is not None:
        raw = merge_config(raw, {"fit": {"learn": list(learn)}})
    return FitConfig.from_dict(raw)


def build_problem(cfg: FitConfig, fod, target: Streamlines, params: TrackingParameters,
                  seeding=None, signal=None, fod_in_place: bool = False,
                  world: World = SINGLE):  # fmt: skip
    """The :class:`~invtract.fit.bundle.BundleProblem` of a fit (checks the target; ``fod``,
    ``signal``, ``fod_in_place``, ``world``: see :func:`fit`)."""
    from .bundle import BundleProblem, split_indices

    if len(target) == 0:
        raise ConfigError("the target bundle has no streamlines")
    if seeding is not None:
        pos = np.asarray(seeding.positions, np.float32)
        dirs = seeding.directions
        dirs = np.asarray(midpoint_seeds(target)[1] if dirs is None else dirs, np.float32)
    else:
        pos, dirs = midpoint_seeds(target)
    paired = PairedTarget.build(target, pos, dirs)
    train_idx, held_idx = split_indices(len(paired), cfg.heldout_fraction, cfg.seed)
    field = fod_field(fod, cfg.device)  # on the fit's device, once
    if "sh" in cfg.learn and not fod_in_place:  # it writes the learned rows into its own
        field = _owned(field, fod)
    voxels = None
    if "sh" in cfg.learn:
        voxels = learned_voxels(field, paired.subset(train_idx).streamlines, cfg.margin_vox)
        voxels = voxels.to(field.device)
    resolved = params.resolve(field.header_voxel_sizes)
    return BundleProblem(cfg, field, resolved, paired, train_idx, held_idx, voxels, signal, world)


def fit(
    fod,
    target: Streamlines,
    params: TrackingParameters | None = None,
    *,
    seeding=None,
    config: Mapping | FitConfig | None = None,
    steps: int | None = None,
    learn=None,
    on_step: Callable | None = None,
    logger=None,
    checkpoint: str | Path | None = None,
    resume: bool = False,
    progress: bool = False,
    callbacks=(),
    world: World = SINGLE,
    signal: Callable | None = None,
    fod_in_place: bool = False,
    **hparams,
) -> FitResult:
    """Fit tracking parameters and/or FOD coefficients to a paired target bundle.

    Args:
        fod: the FOD: an :class:`~invtract.fod.field.FODField` or an
            :class:`~invtract.io.image.Image` (or ``(sh [X,Y,Z,K], affine [4,4])``); its
            header voxel sizes resolve tckgen's defaults (:func:`fod_field`: held once, as
            float32 C-ordered coefficients).
        target: target streamlines (mm); streamline ``i`` pairs with seed ``i``.
        params: starting / fixed tracking parameters (None fields: tckgen defaults).
        seeding: a ``Seeding("list", positions, directions)`` with one seed per target
            streamline (e.g. tckgen's ``-output_seeds``); default: each target streamline's
            middle vertex and local direction.
        config: config dict (``configs/fit_*.toml`` layout) or :class:`FitConfig`.
        steps: iterations (overrides ``[fit] iterations``).
        learn: names to learn (``step_mm``, ``angle_deg``, ``cutoff``, ``sh``); overrides
            ``[fit] learn``.
        on_step: called as ``on_step(iteration, loss, record)`` after each iteration; may raise
            to stop (e.g. ``optuna.TrialPruned``, ``KeyboardInterrupt``).
        logger: a :class:`~invtract.fit.runlog.RunLogger`, a bare ``SummaryWriter``, or None.
        checkpoint: checkpoint file written every ``checkpoint_every`` iterations.
        resume: continue from ``checkpoint`` if it exists.
        progress: show a tqdm progress bar.
        callbacks: more ``callback(iteration, loss, record)`` (e.g.
            :class:`~invtract.fit.trainer.EarlyStopping`).
        world: the data-parallel :class:`~invtract.fit.distributed.World` (default: one
            process).
        signal: the diffusion-signal term (:class:`~invtract.fit.signal_term.SignalTerm`,
            ``--dwi``): ``signal(sh_learned [V, K], voxels [V])``, the loss term ``signal`` of
            the learned voxels, weighted by ``[loss.weights] signal`` (a positive weight needs
            it; it needs ``sh`` learned).
        fod_in_place: a fit that learns ``sh`` writes the learned voxels' rows into ``fod``'s
            own coefficients when they are float32 C-ordered on the fit's device (for callers
            that hold the FOD for the fit alone, like ``invtract fit``: no copy of the FOD; the
            result's ``start_rows`` give the start back). Default: into a copy, made once,
            and only when the fit would otherwise share the caller's array.
        **hparams: config overrides by alias (``lr``, ``temperature_mm``, ``coverage_weight``,
            ``optimizer``, ...) or ``"section.key"``.

    Returns:
        :class:`FitResult` (``params``: the selected iterate).

    Raises:
        ConfigError: invalid config or inputs, a target that does not overlap the FOD, or
            no target streamline trackable at the starting values (before iterating).
        FitDiverged: the loss (or a gradient) became NaN or infinite, or every streamline was
            lost; the last good checkpoint is kept.
    """
    cfg = resolve_config(config, steps, learn, hparams)
    params = params or TrackingParameters()
    if isinstance(params, Mapping):
        params = TrackingParameters(**params)
    if logger is not None and not hasattr(logger, "metrics"):
        from .runlog import WriterLogger

        logger = WriterLogger(logger)
    problem = build_problem(cfg, fod, target, params, seeding, signal, fod_in_place, world)
    trainer = Trainer(
        TrainSettings.from_config(cfg.raw), logger=logger, checkpoint=checkpoint,
        resume=resume, progress=progress, callbacks=[on_step, *callbacks], world=world,
    )  # fmt: skip
    out = trainer.fit(problem)
    return _result(problem, out, params)


def _result(problem, out, params: TrackingParameters) -> FitResult:
    state = problem.state
    learned = [k for k in PARAM_NAMES if k in state.z]
    best = params.replace(**{k: out.best["values"][k] for k in learned})
    final = params.replace(**{k: out.final_values[k] for k in learned})
    sh = final_rows = start_rows = None
    if state.delta is not None:
        final_rows = state.rows().detach().cpu().to(torch.float32)
        start_rows = state.sh0_rows.detach().cpu().to(torch.float32)
        state.restore(out.best["snapshot"])
        # the fit's own coefficients become the fitted FOD (no copy on the CPU)
        sh = state.sh_in_place().cpu().to(torch.float32)
    heldout = {k[len("loss/heldout/") :]: v for k, v in out.evaluation.items()}
    return FitResult(
        params=best, sh=sh, history=out.history, best_loss=out.best["loss"],
        final_loss=out.final_loss, best_iteration=out.best["iteration"], best_params=best,
        heldout=heldout, train_index=problem.train_idx, heldout_index=problem.held_idx,
        iterations=out.iterations, wall_s=out.wall_s,
        learned_voxels=None if state.voxels is None else state.voxels.cpu(), final_params=final,
        final_rows=final_rows, start_rows=start_rows,
    )  # fmt: skip


def fitted_tracking(result: FitResult, base: TrackingParameters) -> TrackingParameters:
    """``base`` with the fitted step, angle and cutoff of ``result``."""
    return dataclasses.replace(
        base,
        step_mm=result.params.step_mm,
        angle_deg=result.params.angle_deg,
        cutoff=result.params.cutoff,
    )
