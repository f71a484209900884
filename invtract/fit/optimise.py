"""Gradient fit of tracking parameters and/or FOD coefficients to a paired target bundle.

:func:`fit` is a plain loop: pick a minibatch of training seeds, track them with
:func:`~invtract.tracking.differentiable.track_differentiable`, evaluate
:func:`~invtract.fit.objective.paired_terms` (+ FOD priors), back-propagate, take an
optimiser step, log, checkpoint. A fraction of the target (``heldout_fraction``) is never used
for gradients; its losses are evaluated every ``eval_every`` iterations.

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
``[optimizer] lr`` to ``lr_end``.

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

import copy
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError
from ..io.seeds import midpoint_seeds
from ..params import TrackingParameters
from ..streamlines import Streamlines
from .checkpoint import fit_state, restore_fit_state, save_checkpoint
from .descent import annealed, descend
from .objective import (
    FOD_TERMS,
    TERMS,
    LossConfig,
    PairedTarget,
    fod_priors,
    paired_terms,
    soft_temperature,
)

__all__ = [
    "PARAM_NAMES",
    "DEFAULT_CONFIG",
    "FitConfig",
    "FitResult",
    "fit",
    "midpoint_seeds",
    "merge_config",
    "load_config",
]

log = logging.getLogger(__name__)

#: learnable tracking parameters
PARAM_NAMES = ("step_mm", "angle_deg", "cutoff")

#: defaults of every config key (the TOML files in configs/ document them)
DEFAULT_CONFIG: dict = {
    "fit": {
        "learn": ["step_mm", "angle_deg", "cutoff"],
        "iterations": 60,
        "seeds_per_iteration": 32,
        "heldout_fraction": 0.2,
        "seed": 0,
        "mode": "joint",
        "eval_every": 5,
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
        "lr_sh": 0.01,
        "grad_clip": 0.0,
    },
    "temperature": {
        "amplitude_start": 0.1,
        "amplitude_end": 0.02,
        "angle_start_deg": 2.0,
        "angle_end_deg": 0.5,
        "margin_start": 0.1,
        "margin_end": 0.003,
        "schedule": "geometric",
    },
    "bounds": {"step_mm": [0.02, 5.0], "angle_deg": [0.5, 90.0], "cutoff": [0.01, 3.0]},
    "fod": {"margin_vox": 1},
    "loss": {
        "n_points": 16,
        "temperature_mm": 0.5,
        "radius_mm": 1.0,
        "coverage_weight": 1.0,
        "sphere_points": 256,
        "weights": {"mdf": 1.0, "vertex": 1.0, "margin": 1.0, "centre": 0.05, "anchor": 0.01},
    },
}

#: keyword aliases accepted by fit() (Optuna hybrid names) -> config keys
_ALIASES = {
    "lr": ("optimizer", "lr"),
    "lr_sh": ("optimizer", "lr_sh"),
    "optimizer": ("optimizer", "name"),
    "temperature_mm": ("loss", "temperature_mm"),
    "coverage_weight": ("loss", "coverage_weight"),
    "radius_mm": ("loss", "radius_mm"),
    "n_points": ("loss", "n_points"),
    "seeds_per_iteration": ("fit", "seeds_per_iteration"),
    "heldout_fraction": ("fit", "heldout_fraction"),
    "iterations": ("fit", "iterations"),
    "mode": ("fit", "mode"),
    "seed": ("fit", "seed"),
}


def merge_config(base: Mapping, override: Mapping) -> dict:
    """Deep merge (tables merge, other values replace); unknown sections/keys raise."""
    out = copy.deepcopy(dict(base))
    for k, v in override.items():
        if k not in out:
            raise ConfigError(f"unknown config key {k!r}; known: {sorted(out)}")
        if isinstance(out[k], dict) and k != "weights":
            if not isinstance(v, Mapping):
                raise ConfigError(f"config [{k}] must be a table")
            out[k] = merge_config(out[k], v)
        elif k == "weights":
            out[k] = dict(v)
        else:
            out[k] = v
    return out


def read_toml(path: str | Path) -> dict:
    """A TOML file as a dict; ConfigError when it cannot be read or parsed."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    try:
        return tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise ConfigError(f"{path}: cannot read config ({err})") from err


def layered_config(
    defaults: Mapping, path: str | Path | None, overrides: Mapping | None, ignore=("tracking",)
) -> dict:
    """``defaults`` < TOML file ``path`` (its ``ignore`` sections dropped) < ``overrides``."""
    cfg = copy.deepcopy(dict(defaults))
    if path is not None:
        doc = read_toml(path)
        for section in ignore:
            doc.pop(section, None)
        cfg = merge_config(cfg, doc)
    if overrides:
        cfg = merge_config(cfg, overrides)
    return cfg


def load_config(path: str | Path | None, overrides: Mapping | None = None) -> dict:
    """:data:`DEFAULT_CONFIG` < TOML file ``path`` < ``overrides``."""
    return layered_config(DEFAULT_CONFIG, path, overrides)


@dataclass(frozen=True)
class FitConfig:
    """The validated config (see ``configs/fit_params.toml``)."""

    learn: tuple
    iterations: int
    seeds_per_iteration: int
    heldout_fraction: float
    seed: int
    mode: str
    eval_every: int
    image_every: int
    checkpoint_every: int
    path: str
    device: str
    optimizer: str
    lr: float
    lr_sh: float
    grad_clip: float
    temperature: dict
    bounds: dict
    margin_vox: int
    loss: LossConfig
    raw: dict = field(default_factory=dict)
    space: str = "log"
    lr_end: float | None = None

    @classmethod
    def from_dict(cls, cfg: Mapping) -> FitConfig:
        cfg = merge_config(DEFAULT_CONFIG, cfg)
        f, o = cfg["fit"], cfg["optimizer"]
        learn = tuple(f["learn"])
        bad = sorted(set(learn) - set(PARAM_NAMES) - {"sh"})
        if bad or not learn:
            raise ConfigError(f"[fit] learn must name {PARAM_NAMES + ('sh',)}, got {learn}")
        if f["mode"] not in ("joint", "alternate"):
            raise ConfigError(f"[fit] mode must be joint or alternate, got {f['mode']!r}")
        if not 0 <= float(f["heldout_fraction"]) < 1:
            raise ConfigError("[fit] heldout_fraction must be in [0, 1)")
        if int(f["iterations"]) < 0 or int(f["seeds_per_iteration"]) < 1:
            raise ConfigError("[fit] iterations must be >= 0 and seeds_per_iteration >= 1")
        if o["name"] not in ("adam", "sgd", "signum"):
            raise ConfigError(f"[optimizer] name must be adam, sgd or signum, got {o['name']!r}")
        bounds = {}
        for k in PARAM_NAMES:
            lo, hi = (float(x) for x in cfg["bounds"][k])
            if not (0 < lo < hi and math.isfinite(hi)):
                raise ConfigError(f"[bounds] {k} needs 0 < low < high, got {lo}, {hi}")
            bounds[k] = (lo, hi)
        t = cfg["temperature"]
        if t["schedule"] not in ("geometric", "linear", "constant"):
            raise ConfigError("[temperature] schedule must be geometric, linear or constant")
        for k in (
            "amplitude_start",
            "amplitude_end",
            "angle_start_deg",
            "angle_end_deg",
            "margin_start",
            "margin_end",
        ):
            if not float(t[k]) > 0:
                raise ConfigError(f"[temperature] {k} must be > 0")
        if f["path"] not in ("efficient", "plain"):
            raise ConfigError("[fit] path must be efficient or plain")
        if f["space"] not in ("log", "bounded"):
            raise ConfigError(f"[fit] space must be log or bounded, got {f['space']!r}")
        for b in ("beta1", "beta2"):
            if not 0 <= float(o[b]) < 1:
                raise ConfigError(f"[optimizer] {b} must be in [0, 1)")
        lr_end = o.get("lr_end")
        if lr_end is not None and not float(lr_end) > 0:
            raise ConfigError("[optimizer] lr_end must be > 0")
        return cls(
            learn=learn,
            iterations=int(f["iterations"]),
            seeds_per_iteration=int(f["seeds_per_iteration"]),
            heldout_fraction=float(f["heldout_fraction"]),
            seed=int(f["seed"]),
            mode=str(f["mode"]),
            eval_every=max(int(f["eval_every"]), 1),
            image_every=max(int(f["image_every"]), 0),
            checkpoint_every=max(int(f["checkpoint_every"]), 1),
            path=str(f["path"]),
            device=str(f["device"]),
            optimizer=str(o["name"]),
            lr=float(o["lr"]),
            lr_sh=float(o["lr_sh"]),
            grad_clip=float(o["grad_clip"]),
            temperature=dict(t),
            bounds=bounds,
            margin_vox=int(cfg["fod"]["margin_vox"]),
            loss=LossConfig.from_dict(cfg["loss"]),
            raw=cfg,
            space=str(f["space"]),
            lr_end=None if lr_end is None else float(lr_end),
        )

    def _frac(self, it: int) -> float:
        return min(it / max(self.iterations - 1, 1), 1.0)

    def lr_at(self, it: int) -> float:
        """Learning rate of the tracking parameters at iteration ``it`` (geometric decay)."""
        if self.lr_end is None:
            return self.lr
        return self.lr * (self.lr_end / self.lr) ** self._frac(it)

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
        params: fitted tracking parameters (final iterate; numbers, not tensors).
        sh: fitted ``[X, Y, Z, K]`` SH coefficients (float32) when ``sh`` was learned, else None.
        history: one dict per iteration (as in ``metrics.jsonl``).
        best_loss: lowest training loss over iterations.
        final_loss: training loss of the last iteration.
        best_iteration: iteration of ``best_loss``.
        best_params: parameters at ``best_iteration``.
        heldout: last held-out evaluation ``{term: value}`` (empty without held-out seeds).
        train_index, heldout_index: target streamline indices of each split.
        iterations: iterations run in total (including those before a resume).
        wall_s: seconds spent in this call.
        learned_voxels: ``[V]`` flat indices of the learned voxels (``sh``), else None.
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


# ----------------------------------------------------------------------------------------------
# reparametrisation
# ----------------------------------------------------------------------------------------------
def _to_z(value: float, lo: float, hi: float) -> float:
    a = (math.log(value) - math.log(lo)) / (math.log(hi) - math.log(lo))
    a = min(max(a, 1e-4), 1 - 1e-4)
    return math.log(a / (1 - a))


def _from_z(z: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    return torch.exp(math.log(lo) + (math.log(hi) - math.log(lo)) * torch.sigmoid(z))


def _to_param(value: float, lo: float, hi: float, space: str) -> float:
    if space == "log":
        return math.log(min(max(value, lo), hi))
    return _to_z(value, lo, hi)


def _from_param(z: torch.Tensor, lo: float, hi: float, space: str) -> torch.Tensor:
    if space == "log":
        return torch.exp(z)
    return _from_z(z, lo, hi)


class Signum(torch.optim.Optimizer):
    """Sign of the gradient's moving average: ``m = beta m + (1 - beta) g; x -= lr sign(m)``.

    Scale-free like Adam but without its second-moment memory: the thresholds' gradients
    span orders of magnitude (a large hinge far from the threshold, a tiny anchor once a
    threshold is released), and after a large one Adam's steps stay small for ~1/(1-beta2)
    iterations. In log space every step is a relative change of ``lr``.
    """

    def __init__(self, params, lr: float = 0.1, beta: float = 0.5):
        super().__init__(params, {"lr": lr, "beta": beta})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                m = st.get("m")
                if m is None:
                    m = st["m"] = torch.zeros_like(p)
                m.mul_(group["beta"]).add_(p.grad, alpha=1 - group["beta"])
                p.add_(torch.sign(m), alpha=-group["lr"])


def _fod_arrays(fod, voxel_sizes):
    """``(sh [X,Y,Z,K] float32 tensor, affine [4,4], voxel_sizes)`` from a field/image/tuple."""
    from ..fod.field import FODField

    if isinstance(fod, FODField):
        shape = tuple(fod.shape)
        sh = fod.sh_flat.detach().reshape(*shape, -1).to(torch.float32).cpu()
        s2v = np.asarray(fod.scanner2voxel.cpu().numpy(), np.float64)
        affine = np.linalg.inv(np.vstack([s2v, [0, 0, 0, 1]]))
    elif hasattr(fod, "data") and hasattr(fod, "affine"):
        sh = torch.as_tensor(np.asarray(fod.data, np.float32))
        affine = np.asarray(fod.affine, np.float64)
        voxel_sizes = voxel_sizes or getattr(fod, "voxel_sizes", None)
    else:
        data, affine = fod
        sh = torch.as_tensor(np.asarray(data, np.float32))
        affine = np.asarray(affine, np.float64)
    if voxel_sizes is None:
        voxel_sizes = tuple(float(x) for x in np.linalg.norm(affine[:3, :3], axis=0))
    return sh, affine, tuple(float(v) for v in voxel_sizes)


def _learned_voxels(sh0: torch.Tensor, affine, target: Streamlines, margin: int) -> torch.Tensor:
    from scipy.ndimage import binary_dilation

    shape = tuple(sh0.shape[:3])
    pts = target.points.detach().cpu().numpy().astype(np.float64)
    inv = np.linalg.inv(affine)
    vox = np.rint(pts @ inv[:3, :3].T + inv[:3, 3]).astype(np.int64)
    ok = np.all((vox >= 0) & (vox < np.array(shape)), 1)
    m = np.zeros(shape, bool)
    m[tuple(vox[ok].T)] = True
    if margin > 0:
        m = binary_dilation(m, iterations=margin)
    m &= (sh0 != 0).any(-1).numpy()
    return torch.as_tensor(np.flatnonzero(m.ravel()), dtype=torch.long)


def _split(n: int, frac: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    g = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(n, generator=g).numpy()
    n_held = int(round(frac * n)) if n > 1 else 0
    n_held = min(n_held, n - 1)
    return np.sort(perm[n_held:]), np.sort(perm[:n_held])


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


# ----------------------------------------------------------------------------------------------
# fit
# ----------------------------------------------------------------------------------------------
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
    score=None,
    voxel_sizes=None,
    checkpoint: str | Path | None = None,
    resume: bool = False,
    progress: bool = False,
    signal: Callable | None = None,
    **hparams,
) -> FitResult:
    """Fit tracking parameters and/or FOD coefficients to a paired target bundle.

    Args:
        fod: :class:`~invtract.fod.field.FODField`, an :class:`~invtract.io.image.Image`, or
            ``(sh [X,Y,Z,K], affine [4,4])``.
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
        score: accepted for :mod:`invtract.fit.search` compatibility; unused (the fit loss is
            the ``[loss]`` config).
        voxel_sizes: FOD header voxel sizes (mm) to resolve tckgen's defaults (else from
            ``fod``, else the affine's column norms).
        checkpoint: checkpoint file written every ``checkpoint_every`` iterations.
        resume: continue from ``checkpoint`` if it exists.
        progress: show a tqdm progress bar.
        signal: the diffusion-signal term (:class:`~invtract.fit.signal_term.SignalTerm`),
            ``signal(sh_learned [V, K], voxels [V])``; added as ``signal`` when learning the FOD.
        **hparams: config overrides by alias (``lr``, ``temperature_mm``, ``coverage_weight``,
            ``optimizer``, ...) or ``"section.key"``.

    Returns:
        :class:`FitResult`.

    Raises:
        FitDiverged: the loss (or a gradient) became NaN or infinite; the last good checkpoint
            is kept.
        ConfigError: invalid config or inputs.
    """
    from ..tracking.differentiable import track_differentiable

    t_start = time.perf_counter()
    if isinstance(config, FitConfig):
        raw = config.raw
    else:
        raw = merge_config(DEFAULT_CONFIG, config or {})
    raw = _apply_hparams(raw, hparams)
    if steps is not None:
        raw = merge_config(raw, {"fit": {"iterations": int(steps)}})
    if learn is not None:
        raw = merge_config(raw, {"fit": {"learn": list(learn)}})
    cfg = FitConfig.from_dict(raw)
    params = params or TrackingParameters()
    if isinstance(params, Mapping):
        params = TrackingParameters(**params)
    if logger is not None and not hasattr(logger, "metrics"):
        from .runlog import WriterLogger

        logger = WriterLogger(logger)

    dev = torch.device(cfg.device)
    sh0, affine, vsz = _fod_arrays(fod, voxel_sizes)
    resolved = params.resolve(vsz)
    if len(target) == 0:
        raise ConfigError("the target bundle has no streamlines")
    if seeding is not None:
        pos = np.asarray(seeding.positions, np.float32)
        dirs = seeding.directions
        if dirs is None:
            dirs = midpoint_seeds(target)[1]
        dirs = np.asarray(dirs, np.float32)
    else:
        pos, dirs = midpoint_seeds(target)
    paired = PairedTarget.build(target, pos, dirs)
    n = len(paired)
    train_idx, held_idx = _split(n, cfg.heldout_fraction, cfg.seed)
    train_t, held_t = paired.subset(train_idx), paired.subset(held_idx)

    # learnable state --------------------------------------------------------------------------
    start = {
        "step_mm": resolved.step_mm,
        "angle_deg": resolved.angle_deg,
        "cutoff": resolved.cutoff,
    }
    z = {
        k: torch.tensor(
            _to_param(start[k], *cfg.bounds[k], cfg.space), dtype=torch.float64, requires_grad=True
        )
        for k in PARAM_NAMES
        if k in cfg.learn
    }
    learn_sh = "sh" in cfg.learn
    voxels = None
    delta = None
    K = sh0.shape[-1]
    sh0_flat = sh0.reshape(-1, K).to(dev)
    if learn_sh:
        voxels = _learned_voxels(sh0, affine, train_t.streamlines, cfg.margin_vox).to(dev)
        delta = torch.zeros(voxels.numel(), K, dtype=torch.float32, device=dev, requires_grad=True)
        hook = getattr(signal, "gradient_hook", lambda _: None)(sh0_flat[voxels])
        if hook is not None:
            delta.register_hook(hook)
    opt_cls = torch.optim.SGD if cfg.optimizer == "sgd" else torch.optim.Adam
    betas = (float(cfg.raw["optimizer"]["beta1"]), float(cfg.raw["optimizer"]["beta2"]))
    if not z:
        opt_p = None
    elif cfg.optimizer == "adam":
        opt_p = torch.optim.Adam(list(z.values()), lr=cfg.lr, betas=betas)
    elif cfg.optimizer == "signum":
        opt_p = Signum(list(z.values()), lr=cfg.lr, beta=betas[0])
    else:
        opt_p = opt_cls(list(z.values()), lr=cfg.lr)
    opt_sh = opt_cls([delta], lr=cfg.lr_sh) if learn_sh else None
    basis = None
    if learn_sh and "nonneg" in cfg.loss.active(FOD_TERMS):
        from ..fod.sh import lmax_from_n, sh_basis
        from .objective import fibonacci_sphere

        basis = sh_basis(fibonacci_sphere(cfg.loss.sphere_points), lmax_from_n(K)).to(dev)

    def values(detach=False) -> dict:
        out = {}
        for k in PARAM_NAMES:
            if k in z:
                v = _from_param(z[k], *cfg.bounds[k], cfg.space)
                out[k] = v.detach() if detach else v
            else:
                out[k] = start[k]
        return out

    def current_sh():
        if not learn_sh:
            return sh0_flat.reshape(sh0.shape)
        return sh0_flat.index_add(0, voxels, delta).reshape(sh0.shape)

    running = bool({"margin", "centre"} & set(cfg.loss.active(TERMS)))
    fixed_field = None
    if running and not learn_sh:
        from ..fod.field import FODField

        fixed_field = FODField.from_array(sh0.to(dev), affine)

    def feature_field(sh):
        if not running:
            return None
        if fixed_field is not None:
            return fixed_field
        from ..fod.field import FODField

        return FODField.from_array(sh.detach(), affine)

    def run_terms(sub: PairedTarget, it: int, grad: bool):
        vals = values(detach=not grad)
        ang = float(torch.as_tensor(vals["angle_deg"]).detach())
        t_amp, t_cos, _, _ = cfg.temperatures(it, ang)
        with torch.set_grad_enabled(grad):
            sh = current_sh() if grad else current_sh().detach()
            res = track_differentiable(
                sh,
                affine,
                sub.seeds.to(dev),
                sub.directions.to(dev),
                resolved,
                step_mm=vals["step_mm"],
                angle_deg=vals["angle_deg"],
                cutoff=vals["cutoff"],
                temperature=(t_amp, t_cos),
                path=cfg.path,
                voxel_sizes=vsz,
            )
            terms = paired_terms(
                res,
                sub,
                cfg.loss,
                shape=tuple(sh0.shape[:3]),
                affine=affine,
                field=feature_field(sh),
                angle_deg=vals["angle_deg"],
                cutoff=vals["cutoff"],
                log_temperature=cfg.margin_temperature(it),
            )
            if "anchor" in cfg.loss.active(("anchor",)) and grad:
                anc = [
                    (torch.log(vals[k]) - math.log(start[k])).pow(2).add(1e-4).sqrt()
                    for k in ("angle_deg", "cutoff")
                    if k in z
                ]
                if anc:
                    terms["anchor"] = torch.stack(anc).sum()
            if learn_sh:
                sh_l = sh0_flat[voxels] + delta
                terms.update(fod_priors(sh_l, delta, voxels, sh0.shape[:3], cfg.loss, basis))
                if signal is not None and cfg.loss.weights.get("signal", 0.0) > 0:
                    terms["signal"] = signal(sh_l, voxels)
            total = sum(
                cfg.loss.weights.get(k, 0.0) * v for k, v in terms.items() if k != "n_missing"
            )
            if not torch.is_tensor(total):
                total = torch.tensor(float(total), dtype=torch.float64)
        return total, terms, res

    # resume -----------------------------------------------------------------------------------
    history: list = []
    best = {"loss": math.inf, "iteration": -1, "values": dict(start)}
    heldout: dict = {}
    it0 = 0
    ckpt_cfg = {k: v for k, v in raw.items()}
    if resume and checkpoint is not None and Path(checkpoint).is_file():
        st = restore_fit_state(checkpoint, ckpt_cfg, z, delta if learn_sh else None, opt_p, opt_sh)
        history, best, heldout, it0 = st["history"], st["best"], st["heldout"], st["iteration"]
        log.info("resumed from %s at iteration %d", checkpoint, it0)

    def save(it_done: int) -> None:
        if checkpoint is None:
            return
        state = fit_state(
            it_done, ckpt_cfg, z, delta, opt_p, opt_sh, history=history, best=best,
            heldout=heldout, train_index=train_idx, heldout_index=held_idx,
        )  # fmt: skip
        save_checkpoint(checkpoint, state)

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.iterations, initial=it0, desc="fit", unit="it", dynamic_ncols=True)

    n_train = len(train_t)
    try:
        for it in range(it0, cfg.iterations):
            t0 = time.perf_counter()
            g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + it)
            m = min(cfg.seeds_per_iteration, n_train)
            batch = torch.randperm(n_train, generator=g)[:m].sort().values
            sub = train_t.subset(batch.numpy())
            total, terms, res = run_terms(sub, it, grad=True)
            vals_before = {k: float(v) for k, v in values(detach=True).items()}

            def set_lr(it=it):
                for grp in opt_p.param_groups:
                    grp["lr"] = cfg.lr_at(it)

            def project():
                if cfg.space == "log":
                    with torch.no_grad():
                        for k, v in z.items():
                            lo, hi = cfg.bounds[k]
                            v.clamp_(math.log(lo), math.log(hi))

            step = descend(
                total, it, z, delta if learn_sh else None, opt_p, opt_sh,
                grad_clip=cfg.grad_clip, alternate=cfg.mode == "alternate",
                checkpoint=checkpoint,
                detail=f" ({ {k: float(torch.as_tensor(v).detach()) for k, v in terms.items()} })",
                before_params_step=set_lr, after_params_step=project,
            )  # fmt: skip
            loss, grads = step["loss"], step["grads"]
            gn_p, gn_sh = step["grad_norm_params"], step["grad_norm_sh"]
            if loss < best["loss"]:
                best = {"loss": loss, "iteration": it, "values": vals_before}
            vals = {k: float(v) for k, v in values(detach=True).items()}
            t_amp, t_cos, ta, tdeg = cfg.temperatures(it, vals_before["angle_deg"])
            rec = {
                "iteration": it,
                "loss/total": loss,
                **{
                    f"loss/{k}": float(torch.as_tensor(v).detach())
                    for k, v in terms.items()
                    if k != "n_missing"
                },
                "tracking/n_missing": terms.get("n_missing", 0.0),
                "tracking/n_seeds": m,
                "tracking/mean_points": float(res.lengths.float().mean())
                if len(res.lengths)
                else 0.0,
                **{f"param/{k}": v for k, v in vals_before.items()},
                "temperature/amplitude": ta,
                "temperature/angle_deg": tdeg,
                "temperature/cos": t_cos,
                "temperature/margin": cfg.margin_temperature(it),
                "lr/params": cfg.lr_at(it),
                "grad_norm/params": gn_p,
                "grad_norm/sh": gn_sh,
                **grads,
                "time/step_s": time.perf_counter() - t0,
            }
            if (
                held_t is not None
                and len(held_t)
                and ((it + 1) % cfg.eval_every == 0 or it == cfg.iterations - 1)
            ):
                htot, hterms, _ = run_terms(held_t, it, grad=False)
                heldout = {"total": float(htot), **{k: float(v) for k, v in hterms.items()}}
                rec["loss/heldout/total"] = heldout["total"]
                for k, v in hterms.items():
                    if k != "n_missing":
                        rec[f"loss/heldout/{k}"] = float(v)
            history.append(rec)
            if logger is not None:
                logger.scalars(it, {k: v for k, v in rec.items() if k != "iteration"})
                logger.metrics(rec)
                if cfg.image_every and (it % cfg.image_every == 0 or it == cfg.iterations - 1):
                    _log_images(logger, it, sub, res, delta)
            if bar is not None:
                bar.set_postfix(
                    loss=f"{loss:.4g}",
                    step=f"{vals['step_mm']:.4g}",
                    angle=f"{vals['angle_deg']:.4g}",
                    cutoff=f"{vals['cutoff']:.4g}",
                )
                bar.update(1)
            if (it + 1) % cfg.checkpoint_every == 0 or it == cfg.iterations - 1:
                save(it + 1)
            if on_step is not None:
                on_step(it, loss, rec)
    finally:
        if bar is not None:
            bar.close()
        if logger is not None:
            logger.flush()

    final_vals = {k: float(v) for k, v in values(detach=True).items()}
    fitted = params.replace(**{k: final_vals[k] for k in PARAM_NAMES if k in z})
    best_params = params.replace(**{k: best["values"][k] for k in PARAM_NAMES if k in z})
    sh_out = current_sh().detach().cpu().to(torch.float32) if learn_sh else None
    return FitResult(
        params=fitted,
        sh=sh_out,
        history=history,
        best_loss=float(best["loss"]),
        final_loss=float(history[-1]["loss/total"]) if history else math.nan,
        best_iteration=int(best["iteration"]),
        best_params=best_params,
        heldout=heldout,
        train_index=train_idx,
        heldout_index=held_idx,
        iterations=len(history),
        wall_s=time.perf_counter() - t_start,
        learned_voxels=None if voxels is None else voxels.cpu(),
    )


def _log_images(logger, it: int, sub: PairedTarget, res, delta) -> None:
    from .runlog import bundle_figure

    tracked = Streamlines(res.points.detach()[res.mask].cpu(), res.lengths.cpu()).to_list()
    target = [np.asarray(s) for s in sub.streamlines.to_list()]
    logger.figure("bundle/projection", bundle_figure(target, tracked, f"iteration {it}"), it)
    logger.figure("bundle/density", bundle_figure(target, tracked, density=True), it)
    if delta is not None:
        logger.histogram("fod/delta", delta.detach().cpu().numpy().ravel(), it)
        logger.histogram("fod/delta_norm", delta.detach().norm(dim=-1).cpu().numpy(), it)


def fitted_tracking(result: FitResult, base: TrackingParameters) -> TrackingParameters:
    """``base`` with the fitted step, angle and cutoff of ``result``."""
    return dataclasses.replace(
        base,
        step_mm=result.params.step_mm,
        angle_deg=result.params.angle_deg,
        cutoff=result.params.cutoff,
    )


__all__ += ["fitted_tracking", "TERMS"]
