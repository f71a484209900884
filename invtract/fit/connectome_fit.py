"""Fit tracking parameters and/or the FOD so that whole-brain tracking reproduces a connectome.

:func:`fit_connectome` tracks a whole-brain seed set (a mask, one or more seeds per voxel,
random initial directions) with :func:`~invtract.tracking.differentiable.track_differentiable`
every iteration, turns the tracked streamlines into a differentiable *expected* connectome
(:func:`survival_connectome`), compares it with the target (:func:`~invtract.losses.connectome.
connectome_loss` after the configured normalisation) and takes a gradient step on the bounded
parameters (the reparametrisation of :mod:`invtract.fit.optimise`) and/or an additive change of
the SH coefficients (regularised by :func:`~invtract.fit.objective.fod_priors`).

Why not the tracker's own survival weights. ``track_differentiable`` returns
``w_j = prod_k sig(margin_k / T)``, a product over every step. For the connectome that
surrogate is badly calibrated: over ``n`` steps the survival is about
``exp(-n exp(-delta / T))`` for a margin ``delta``, so its soft threshold sits
``T ln(n / ln 2)`` above the cutoff (0.6 amplitude units for 400 steps at T = 0.1) and moves
with the streamline's length; and :func:`~invtract.losses.connectome.
expected_endpoint_connectome` only lets the last ``tail`` vertices carry end mass, so an early
termination (e.g. in a crossing, which is what a higher cutoff does) is placed back near the
old end: the gradient is flat or points the wrong way. Here the survival to vertex ``j`` of a
half is ``sig(min_{1 <= k < j} x_k)`` with the normalised margin
``x_k = min((A_k - cutoff) / T_amp, (u_{k-1} . u_k - cos(angle)) / T_cos)``: the hard rule
(a half continues while every test passes) with one sigmoid on its tightest test, whatever the
length. ``A_k`` and ``u_k`` are recomputed from the tracked points (``u_k`` the step direction
leaving ``p_k``, ``A_k = c(p_k) . Y(u_k)`` by the envelope theorem), so gradients reach
``cutoff`` and ``angle_deg`` directly, and ``step_mm`` and the SH coefficients through the
points and the amplitudes. The end mass of every vertex along the whole half (in bins of about
``bin_mm``) gets the soft radial node assignment of :func:`~invtract.losses.connectome.
soft_connectome`; the two halves are combined with the minimum-length rule applied softly
(pairs of ends whose total length is below the minimum carry no mass), and each streamline is
weighted by the soft acceptance of its seed's amplitude test. With hard weights (``T -> 0``)
the result is the tck2connectome count matrix of the tracked streamlines.

The remaining hard events (seeds that are rejected at the *current* parameters, where a
streamline would go beyond the end it has now, lobe switches) carry no gradient: starting
from a cutoff above the target's, the fit only sees that ends should move outward where the
current streamlines stop. ``[temperature]`` anneals from large (gradients from far away) to
small (faithful).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..arrays import to_numpy
from ..errors import ConfigError, ShapeError
from ..losses.connectome import (
    _layout,
    _soft_node_probs,
    as_label_volume,
    connectome_correlation,
    connectome_loss,
    connectome_matrix,
    radial_search_offsets,
)
from ..params import TrackingParameters
from .config import layered_config, merge_config, validate
from .descent import annealed
from .distributed import SINGLE, World
from .objective import FOD_TERMS, LossConfig, fod_priors, soft_temperature
from .optimise import COMMON_DEFAULTS, COMMON_RULES, fod_field, rules
from .reparam import PARAM_NAMES, LearnedState
from .trainer import Problem, StepOutput, Trainer, TrainSettings

__all__ = [
    "CONNECTOME_DEFAULTS",
    "ConnectomeFitResult",
    "load_connectome_config",
    "read_connectome",
    "whole_brain_seeds",
    "half_margins",
    "survival_connectome",
    "hard_connectome",
    "fast_tracking",
    "check_act_tracker",
    "check_act_inputs",
    "fit_connectome",
]

log = logging.getLogger(__name__)

#: defaults of every key of a connectome fit config (configs/fit_connectome.toml documents them)
CONNECTOME_DEFAULTS: dict = {
    **COMMON_DEFAULTS,
    "fit": {
        **COMMON_DEFAULTS["fit"],
        "iterations": 30,
        "image_every": 5,
        "tracker": "fast",
        "space": "bounded",
    },  # fmt: skip
    "seeding": {"per_voxel": 1, "placement": "grid", "resample": False, "max_seeds": 0},
    "optimizer": {
        **COMMON_DEFAULTS["optimizer"],
        "name": "adam",
        "lr": 0.15,
        "lr_end": 0.0,
        "beta1": 0.9,
        "flip_decay": 1.0,
    },  # fmt: skip
    "temperature": {
        **COMMON_DEFAULTS["temperature"],
        "amplitude_start": 0.3,
        "amplitude_end": 0.03,
        "angle_start_deg": 5.0,
        "angle_end_deg": 1.0,
        "tissue_start": 0.1,
        "tissue_end": 0.02,
    },  # fmt: skip
    "fod": {"region": "mask", "margin_vox": 0},
    "loss": {
        "kind": "correlation",
        "normalise": "density",
        "include_diagonal": False,
        "temperature_mm": 1.0,
        "radius_mm": 4.0,
        "bin_mm": 1.0,
        "sphere_points": 256,
        "weights": {"connectome": 1.0},
    },
}

_LOSS_TERMS = ("connectome",)


#: validation rules of the connectome fit config (the shared ones plus its own)
CONNECTOME_RULES: dict = {
    **COMMON_RULES,
    **rules(
        positive=[
            "loss.temperature_mm",
            "loss.radius_mm",
            "loss.bin_mm",
            "temperature.tissue_start",
            "temperature.tissue_end",
        ],  # fmt: skip
        choices={
            "fit.tracker": ("fast", "differentiable"),
            "seeding.placement": ("grid", "random"),
            "optimizer.name": ("adam", "sgd", "signum"),
            "loss.kind": ("correlation", "frobenius"),
            "loss.normalise": ("counts", "density", "row"),
            "fod.region": ("mask", "nonzero"),
        },
        at_least={"seeding.per_voxel": 1, "seeding.max_seeds": 0},
    ),
}


def load_connectome_config(path: str | Path | None, overrides: Mapping | None = None) -> dict:
    """:data:`CONNECTOME_DEFAULTS` < TOML ``path`` < ``overrides`` (unknown keys raise)."""
    cfg = layered_config(CONNECTOME_DEFAULTS, path, overrides, ignore=("tracking", "inputs"))
    validate_config(cfg)
    return cfg


def validate_config(cfg: Mapping) -> None:
    """Raise :class:`ConfigError` for an invalid connectome fit config."""
    validate(cfg, CONNECTOME_RULES)
    w = cfg["loss"]["weights"]
    unknown = sorted(set(w) - set(_LOSS_TERMS) - set(FOD_TERMS))
    if unknown:
        raise ConfigError(
            f"loss.weights: unknown terms {unknown}; known {_LOSS_TERMS + FOD_TERMS}"
        )
    if any(not math.isfinite(float(v)) or float(v) < 0 for v in w.values()):
        raise ConfigError(f"loss.weights must be finite and >= 0: {dict(w)}")


def read_connectome(path: str | Path) -> np.ndarray:
    """A connectome matrix file as ``tck2connectome`` writes it (CSV, TSV or spaces).

    Raises:
        ConfigError: the file is not a square matrix of finite non-negative numbers.
    """
    text = Path(path).read_text(encoding="utf-8")
    rows = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = [x for x in line.replace(",", " ").replace("\t", " ").split(" ") if x]
        try:
            rows.append([float(x) for x in parts])
        except ValueError as err:
            raise ConfigError(f"{path}: not a numeric matrix ({err})") from err
    if not rows or any(len(r) != len(rows) for r in rows):
        raise ConfigError(f"{path}: the connectome must be a square matrix")
    m = np.asarray(rows, np.float64)
    if not np.all(np.isfinite(m)) or (m < 0).any():
        raise ConfigError(f"{path}: connectome entries must be finite and >= 0")
    return m


# ----------------------------------------------------------------------------------------------
# seeds
# ----------------------------------------------------------------------------------------------
def whole_brain_seeds(
    mask: np.ndarray,
    affine: np.ndarray,
    *,
    per_voxel: int = 1,
    placement: str = "grid",
    max_seeds: int = 0,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Seeds in every voxel of ``mask`` with uniformly random initial directions.

    Args:
        mask: ``[X, Y, Z]`` seed mask (non-zero = seed voxel).
        affine: ``[4, 4]`` voxel -> scanner mm.
        per_voxel: ``placement="grid"``: a regular ``per_voxel`` x ``per_voxel`` x
            ``per_voxel`` grid per voxel (tckgen's ``-seed_grid_per_voxel``); ``"random"``:
            ``per_voxel`` uniform positions per voxel (``-seed_random_per_voxel``).
        placement: ``"grid"`` or ``"random"``.
        max_seeds: keep a random subset of this size (0 = all).
        seed: random generator seed (directions, positions, subset).

    Returns:
        ``(positions [N, 3], directions [N, 3])`` float32, scanner mm / unit vectors.
    """
    rng = np.random.default_rng(int(seed))
    ijk = np.argwhere(np.asarray(mask) != 0).astype(np.float64)
    if ijk.shape[0] == 0:
        raise ConfigError("the seed mask is empty")
    if placement == "grid":
        g = int(per_voxel)
        off = (np.arange(g) + 0.5) / g - 0.5
        oz, oy, ox = np.meshgrid(off, off, off, indexing="ij")
        offs = np.stack([ox.ravel(), oy.ravel(), oz.ravel()], 1)
        vox = (ijk[:, None, :] + offs[None]).reshape(-1, 3)
    elif placement == "random":
        vox = np.repeat(ijk, int(per_voxel), axis=0)
        vox = vox + rng.uniform(-0.5, 0.5, size=vox.shape)
    else:
        raise ConfigError(f"placement must be grid or random, got {placement!r}")
    pos = vox @ np.asarray(affine)[:3, :3].T + np.asarray(affine)[:3, 3]
    d = rng.normal(size=pos.shape)
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    if max_seeds and max_seeds < pos.shape[0]:
        keep = np.sort(rng.choice(pos.shape[0], size=int(max_seeds), replace=False))
        pos, d = pos[keep], d[keep]
    return pos.astype(np.float32), d.astype(np.float32)


# ----------------------------------------------------------------------------------------------
# the expected connectome
# ----------------------------------------------------------------------------------------------
def _half_index(seed_index: torch.Tensor, lengths: torch.Tensor, half: int, L: int):
    """``(idx [S, H], n_steps [S])``: vertex index of the k-th vertex of a half (k=0 seed)."""
    dev = seed_index.device
    n = seed_index if half == 0 else lengths - 1 - seed_index
    H = int(n.max()) + 1 if n.numel() else 1
    k = torch.arange(H, device=dev)[None]
    idx = seed_index[:, None] - k if half == 0 else seed_index[:, None] + k
    valid = k <= n[:, None]
    return torch.where(valid, idx, seed_index[:, None]).clamp(0, max(L - 1, 0)), n


def _amplitude(sh_flat, s2v, shape, p, u, lmax):
    """``c(p) . Y(u)`` (trilinear c; ``u`` detached, envelope theorem) ``[M]`` float64."""
    from ..fod.interp import corner_weights, world_to_voxel
    from ..fod.peak_grad import fast_sh_basis

    v = world_to_voxel(p, s2v)
    index, w, _ = corner_weights(v, shape, weight_dtype=torch.float64)
    Y = fast_sh_basis(u.detach(), lmax)  # [M, K]
    out = p.new_zeros(p.shape[0], dtype=torch.float64)
    for c in range(8):
        out = out + w[:, c] * (sh_flat[index[:, c]].to(torch.float64) * Y).sum(-1)
    return out


def half_margins(
    points: torch.Tensor,
    idx: torch.Tensor,
    n_steps: torch.Tensor,
    sh_flat: torch.Tensor,
    s2v: torch.Tensor,
    shape,
    lmax: int,
    cutoff,
    cos_max,
    t_amp: float,
    t_cos: float,
    chunk: int = 200_000,
) -> torch.Tensor:
    """Normalised margins ``x [S, H]`` of a half (no gradient): +inf where no test applies.

    ``x_k = min((A_k - cutoff) / T_amp, (u_{k-1} . u_k - cos_max) / T_cos)`` for
    ``1 <= k < n_steps`` (the tests at vertex k decide whether the half reaches k + 1); the seed
    test (k = 0) is handled separately. ``u_k = normalise(p_{k+1} - p_k)``.
    """
    with torch.no_grad():
        S, H = idx.shape
        rows = torch.arange(S, device=idx.device)[:, None]
        pts = points.detach()[rows, idx].to(torch.float64)  # [S, H, 3]
        d = pts[:, 1:] - pts[:, :-1]
        u = d / d.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # [S, H-1]
        k = torch.arange(H, device=idx.device)[None]
        valid = (k >= 1) & (k < n_steps[:, None])
        x = torch.full((S, H), math.inf, dtype=torch.float64, device=idx.device)
        if H < 3:
            return x
        flat_s, flat_k = torch.nonzero(valid, as_tuple=True)
        cut = float(torch.as_tensor(cutoff).detach())
        cmax = float(torch.as_tensor(cos_max).detach())
        for a in range(0, flat_s.numel(), chunk):
            s_, k_ = flat_s[a : a + chunk], flat_k[a : a + chunk]
            amp = _amplitude(sh_flat, s2v, shape, pts[s_, k_], u[s_, k_], lmax)
            cos = (u[s_, k_ - 1] * u[s_, k_]).sum(-1)
            x[s_, k_] = torch.minimum((amp - cut) / t_amp, (cos - cmax) / t_cos)
        return x


def _margins_at(points, idx, s_, k_, sh_flat, s2v, shape, lmax, cutoff, cos_max, t_amp, t_cos):
    """The margins of :func:`half_margins` at ``(s_, k_)`` pairs, with gradients."""
    rows_i = idx[s_, k_]
    p = points[s_, rows_i]
    p_next = points[s_, idx[s_, k_ + 1]]
    p_prev = points[s_, idx[s_, k_ - 1]]
    d1 = p_next - p
    d0 = p - p_prev
    u1 = d1 / d1.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    u0 = d0 / d0.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    amp = _amplitude(sh_flat, s2v, shape, p, u1.detach(), lmax)
    cos = (u0.to(torch.float64) * u1.to(torch.float64)).sum(-1)
    cut = torch.as_tensor(cutoff, dtype=torch.float64)
    cmax = torch.as_tensor(cos_max, dtype=torch.float64)
    return torch.minimum((amp - cut) / t_amp, (cos - cmax) / t_cos)


def _half_end_mass(points, seed_index, lengths, half: int, ctx: dict):
    """End mass of one half of every streamline, binned along the half, with its soft node
    assignment: ``(E [S, nb, n] float64, R [S, nb])`` (``R``: each bin's representative vertex
    step count, a large negative number for an empty bin). See :func:`survival_connectome`."""
    S, L = points.shape[:2]
    dev = points.device
    rows = torch.arange(S, device=dev)
    b, n = ctx["b"], ctx["n"]
    margin_args = (ctx["sh_flat"], ctx["s2v"], ctx["shape"], ctx["lmax"], ctx["cutoff"],
                   ctx["cos_max"], ctx["t_amp"], ctx["t_cos"])  # fmt: skip
    idx, nst = _half_index(seed_index, lengths, half, L)
    H = idx.shape[1]
    x = half_margins(points, idx, nst, *margin_args)
    cm, cm_i = torch.cummin(x, dim=1)  # cm[j] = min_{k <= j} x_k
    # bins: representatives r_i = n - i b (i = 0..), covering (r_i - b, r_i] within [1, n]
    nb = max(1, (H - 1 + b - 1) // b)
    i = torch.arange(nb, device=dev)[None]
    r = nst[:, None] - i * b  # [S, nb]
    ok = r >= 1
    lo = (r - b + 1).clamp_min(1)
    # S(j) = sig(cm[j - 1]) for j >= 2, 1 for j <= 1; S(n + 1) = 0 (the half ends at n)
    need_j = torch.stack([lo, r + 1], -1)  # [S, nb, 2]
    jm1 = (need_j - 1).clamp(0, H - 1)
    k_arg = torch.gather(cm_i, 1, jm1.reshape(S, -1)).reshape(S, nb, 2)
    finite = torch.isfinite(torch.gather(cm, 1, jm1.reshape(S, -1)).reshape(S, nb, 2))
    use = finite & (need_j >= 2) & ok[..., None]
    surv = torch.ones(S, nb, 2, dtype=torch.float64, device=dev)
    if bool(use.any()):
        ss = rows[:, None, None].expand(S, nb, 2)[use]
        key = ss * H + k_arg[use]
        uniq, inv = torch.unique(key, return_inverse=True)
        xs = _margins_at(points, idx, uniq // H, uniq % H, *margin_args)
        surv = surv.masked_scatter(use, torch.sigmoid(xs[inv]))
    # the last bin ends the half: no survival beyond n
    past_end = (need_j[..., 1] > nst[:, None]) & ok
    s_hi = torch.where(past_end, torch.zeros_like(surv[..., 1]), surv[..., 1])
    mass = torch.where(ok, (surv[..., 0] - s_hi).clamp_min(0.0), torch.zeros_like(s_hi))
    rep = idx.gather(1, r.clamp(0, H - 1))  # vertex of each representative
    pr = points[rows[:, None], rep].reshape(-1, 3)
    probs = _soft_node_probs(
        pr, ctx["vol"], ctx["label_t"], ctx["offsets"], ctx["radius_mm"], ctx["temperature_mm"]
    ).reshape(S, nb, n)
    reps = torch.where(ok, r, torch.full_like(r, -(10**9)))
    return mass[..., None] * probs.to(torch.float64), reps


def survival_connectome(
    res,
    fod,
    labels,
    *,
    cutoff,
    angle_deg,
    temperature: tuple[float, float],
    min_points: int,
    step_mm: float,
    temperature_mm: float = 1.0,
    radius_mm: float = 4.0,
    bin_mm: float = 1.0,
    symmetric: bool = False,
    act=None,
    tissue_temperature: float = 0.05,
) -> torch.Tensor:
    """Differentiable expected connectome of a whole-brain tracking (see the module docstring).

    Args:
        res: :class:`~invtract.tracking.differentiable.DiffTrackResult`.
        fod: the :class:`~invtract.fod.field.FODField` tracked (its coefficients may
            require grad).
        labels: parcellation (see :func:`~invtract.losses.connectome.as_label_volume`).
        cutoff, angle_deg: floats or 0-d tensors (may require grad).
        temperature: ``(T_amp, T_cos)`` of the survival sigmoid (amplitude units, cosine).
        min_points: tckgen's minimum number of points (the min-length rule, applied softly).
        step_mm: step (mm; sets the bin size in vertices).
        temperature_mm, radius_mm: soft radial node assignment (mm).
        bin_mm: end positions are binned along each half in bins of about this length.
        symmetric: fill the lower triangle.
        act: the tracking was ``-act`` (an :class:`~invtract.tracking.act.ActImage` or a
            :class:`~invtract.tracking.act_soft.TissueImage`): ACT's tissue terminations and
            seed test as soft survival factors (:mod:`invtract.fit.connectome_act`).
        tissue_temperature: softness of the tissue tests with ``act`` (partial-volume units).

    Returns:
        ``[N, N]`` tensor in tck2connectome's layout (upper triangle), float64.

    Gradients:
        To ``cutoff`` and ``angle_deg`` (survival), to the FOD's coefficients (amplitudes
        and, through ``res.points``, the geometry) and to the step (through ``res.points``;
        with ``act`` also through the tissues at the vertices).
    """
    vol = as_label_volume(labels)
    n = vol.n_nodes + 1
    points, seed_index, lengths = res.points, res.seed_index, res.lengths
    S, L = points.shape[:2]
    dev = points.device
    if S == 0:
        return _layout(torch.zeros(n, n, dtype=torch.float64, device=dev), False, symmetric, False)
    ctx = _survival_context(fod, vol, cutoff, angle_deg, temperature, dev)
    ctx.update(
        b=max(1, int(round(float(bin_mm) / max(float(step_mm), 1e-6)))),
        offsets=torch.as_tensor(radial_search_offsets(vol.spacing, radius_mm), device=dev),
        radius_mm=float(radius_mm), temperature_mm=float(temperature_mm), n=n,
    )  # fmt: skip
    w_seed = _seed_acceptance(points, seed_index, ctx)  # [S]
    half_mass = _half_end_mass
    if act is not None:
        from ..tracking.act_soft import TissueImage
        from . import connectome_act

        tissue = act if isinstance(act, TissueImage) else TissueImage.from_act(act, dev)
        ctx.update(tissue=tissue, t_tissue=float(tissue_temperature))
        w_seed = w_seed * connectome_act.seed_factor(points, seed_index, ctx)
        half_mass = connectome_act.half_end_mass
    E, R = [], []
    for half in (0, 1):
        mass_probs, reps = half_mass(points, seed_index, lengths, half, ctx)
        E.append(mass_probs)
        R.append(reps)
    ok_len = (1 + R[0][:, :, None] + R[1][:, None, :]) >= int(min_points)  # [S, nb0, nb1]
    F2 = torch.einsum("sij,sjm->sim", ok_len.to(torch.float64), E[1])
    full = torch.einsum("sin,sim->nm", E[0] * w_seed[:, None, None], F2)
    full = torch.triu(full) + torch.tril(full, -1).T
    return _layout(full, False, symmetric, False)


def _survival_context(fod, vol, cutoff, angle_deg, temperature, dev) -> dict:
    """What :func:`_half_end_mass` and :func:`_seed_acceptance` read: the flat SH ``[V, K]``,
    scanner -> voxel ``[3, 4]``, grid shape, lmax, the thresholds (``cos_max`` of the angle,
    a tensor when ``angle_deg`` is one), the temperatures and the parcellation."""
    cos_max = (
        torch.cos(torch.as_tensor(angle_deg, dtype=torch.float64) * (math.pi / 180.0))
        if torch.is_tensor(angle_deg)
        else math.cos(math.radians(float(angle_deg)))
    )
    inv = np.linalg.inv(fod.voxel2scanner)[:3]
    return {
        "sh_flat": fod.sh_flat,
        "s2v": torch.as_tensor(inv, dtype=torch.float64, device=dev),
        "shape": tuple(int(x) for x in fod.shape), "lmax": fod.lmax,
        "cutoff": cutoff, "cos_max": cos_max,
        "t_amp": float(temperature[0]), "t_cos": float(temperature[1]),
        "vol": vol, "label_t": torch.as_tensor(vol.labels.ravel(), device=dev),
    }  # fmt: skip


def _seed_acceptance(points, seed_index, ctx: dict) -> torch.Tensor:
    """``[S]`` soft acceptance of each seed: ``sig((A - cutoff) / T_amp)`` of the amplitude test
    at the seed along the first step direction (float64)."""
    S, L = points.shape[:2]
    rows = torch.arange(S, device=points.device)
    nb_first = torch.where(seed_index > 0, seed_index - 1, seed_index + 1).clamp(0, L - 1)
    p_seed = points[rows, seed_index]
    u_seed = (points[rows, nb_first] - p_seed).detach()
    u_seed = u_seed / u_seed.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    a_seed = _amplitude(ctx["sh_flat"], ctx["s2v"], ctx["shape"], p_seed, u_seed, ctx["lmax"])
    cut64 = torch.as_tensor(ctx["cutoff"], dtype=torch.float64)
    return torch.sigmoid((a_seed - cut64) / ctx["t_amp"])


@dataclass
class _Tracked:
    points: torch.Tensor  # [S, L, 3]
    seed_index: torch.Tensor  # [S]
    lengths: torch.Tensor  # [S]


def fast_tracking(fod, positions, directions, params, step_mm=None, act=None):
    """Hard tracking with the fast engine, padded, for :func:`survival_connectome`.

    The points carry no gradient except to ``step_mm`` (a 0-d tensor): with the step
    directions held fixed, vertex ``k`` of a half is ``seed + (h / h0) (p_k - seed)``, i.e.
    the first-order effect of the step on where the streamline is, without the change of the
    peaks along the way (``[fit] tracker = "differentiable"`` gives the exact one).

    With ``act`` (an :class:`~invtract.tracking.act.ActImage`) the tracking is ``tckgen -act``'s
    (:func:`~invtract.tracking.api.track` with ``act``: unresolved parameters get ACT's
    defaults) and the points carry no step gradient: ACT's ends sit on tissue boundaries
    whatever the step, so scaling the streamline about its seed would move them where ACT
    never puts them (a fit then shrank the step to pull ends out of the nodes).

    Args:
        fod: the FOD (:class:`~invtract.fod.field.FODField` or Image; tracked detached).
        positions, directions: ``[N, 3]`` seeds (scanner mm) and initial directions.

    Returns:
        An object with ``points [S, L, 3]``, ``seed_index [S]``, ``lengths [S]``.
    """
    res = _track_hard(fod, positions, directions, params, act)
    pts, _ = res.streamlines.to_padded()
    lengths = res.streamlines.lengths.to(torch.int64)
    pts = pts.to(torch.float64)
    seed_index = torch.as_tensor(np.asarray(res.seed_index), dtype=torch.int64)
    if torch.is_tensor(step_mm) and step_mm.requires_grad and pts.shape[0] and act is None:
        h0 = float(step_mm.detach())
        seed_pt = pts[torch.arange(pts.shape[0]), seed_index][:, None]
        pts = seed_pt + (step_mm.to(torch.float64) / h0) * (pts - seed_pt)
    return _Tracked(pts, seed_index, lengths.to(torch.int64))


def _track_hard(fod, positions, directions, params, act=None):
    """Hard tracking (the fastest engine; with ``act`` the ACT engine ``invtract track --act``
    uses) of the FOD ``fod`` (its coefficients as they are, not copied) from explicit seeds
    and directions."""
    from ..fod.field import as_fod_field
    from ..tracking.api import Seeding, track

    with torch.no_grad():
        return track(
            as_fod_field(fod).detach().to("cpu"),
            Seeding("list", positions=positions, directions=directions),
            params,
            rng_seed=0,
            act=act,
        )


def hard_connectome(fod, positions, directions, params, labels, radius_mm, act=None):
    """tck2connectome counts of hard tracking (fast engine; ``-act`` with ``act``) from the
    given seeds.

    Returns:
        ``(matrix [N, N] float64, n_streamlines)``.
    """
    res = _track_hard(fod, positions, directions, params, act)
    return connectome_matrix(res.streamlines, labels, radius_mm), len(res.streamlines)


# ----------------------------------------------------------------------------------------------
# the fit loop
# ----------------------------------------------------------------------------------------------
@dataclass
class ConnectomeFitResult:
    """What :func:`fit_connectome` returns.

    Attributes:
        params: the selected (best) iterate's tracking parameters (what result.json reports).
        sh: its SH coefficients ``[X, Y, Z, K]`` float32 when ``sh`` was learned, else None.
        history: one dict per iteration (as ``metrics.jsonl``).
        best_loss, best_iteration, best_params: the selection loss (connectome loss of the
            evaluation seeds at the last iteration's temperatures) of ``params``, the completed
            iterations there (0: the start), and ``params`` again.
        final_loss: selection loss of the last iterate; final_params: its parameters.
        start_correlation, final_correlation: hard (tck2connectome) correlation of the
            evaluation tracking with the target, at the start and at ``params``.
        start_matrix, final_matrix: those hard connectomes.
        iterations: iterations run in total (including before a resume).
        wall_s: seconds spent in this call.
    """

    params: TrackingParameters
    sh: torch.Tensor | None
    history: list
    best_loss: float
    best_iteration: int
    best_params: TrackingParameters
    final_loss: float
    start_correlation: float
    final_correlation: float
    start_matrix: np.ndarray
    final_matrix: np.ndarray
    iterations: int
    wall_s: float
    final_params: TrackingParameters | None = None


def matrix_figure(current: np.ndarray, target: np.ndarray, title: str = ""):
    """Matplotlib figure: current and target connectomes (density-normalised) side by side."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(8, 4), dpi=80)
    for ax, m, name in zip(axes, (current, target), ("current", "target")):
        m = np.asarray(m, np.float64)
        sym = np.triu(m) + np.triu(m, 1).T
        tot = sym.sum()
        im = ax.imshow(sym / tot if tot > 0 else sym, cmap="viridis", interpolation="nearest")
        ax.set_title(f"{name} (fraction of streamlines)")
        ticks = np.arange(m.shape[0])
        ax.set_xticks(ticks, [str(i + 1) for i in ticks])
        ax.set_yticks(ticks, [str(i + 1) for i in ticks])
        fig.colorbar(im, ax=ax, fraction=0.046)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def _matrix_image(m: np.ndarray) -> np.ndarray:
    """``[1, H, W]`` grey image in [0, 1] of a symmetrised, max-normalised matrix."""
    m = np.asarray(m, np.float64)
    sym = np.triu(m) + np.triu(m, 1).T
    mx = sym.max()
    return (sym / mx if mx > 0 else sym)[None].astype(np.float32)


def _learned_region(fod, mask, region: str, margin: int) -> torch.Tensor:
    nz = fod.nonzero_flat.cpu().numpy().reshape(fod.shape)
    if region == "mask" and mask is not None:
        m = np.asarray(mask) != 0
        if margin > 0:
            from scipy.ndimage import binary_dilation

            m = binary_dilation(m, iterations=margin)
        nz &= m
    return torch.as_tensor(np.flatnonzero(nz.ravel()), dtype=torch.long)


class ConnectomeProblem(Problem):
    """Whole-brain tracking scored against a target connectome (see the module docstring).

    Args:
        raw: the validated connectome config.
        fod: the starting FOD, a float32 :class:`~invtract.fod.field.FODField` on the fit's
            device (:func:`~invtract.fit.optimise.fod_field`; its header voxel sizes resolve
            tckgen's defaults): held once, the learned state and the tracking view it.
        params: starting / fixed tracking parameters; ``resolved`` with tckgen's defaults.
        vol: the parcellation (:class:`~invtract.losses.connectome.LabelVolume`).
        target: ``[N, N]`` target (upper triangle).
        seed_set: ``seed_set(iteration or None) -> (positions [N, 3], directions [N, 3])``.
        voxels: ``[V]`` learned voxels (``sh``) or None.
        evaluate: compute hard (tck2connectome) correlations.
        act: the 5TT image (:class:`~invtract.tracking.act.ActImage`) of ``-act`` tracking,
            or None; ``params`` then already carry ACT's defaults.
    """

    def __init__(self, raw, fod, params, vol, target, seed_set, voxels, evaluate,
                 act=None):  # fmt: skip
        super().__init__()
        sh0 = fod.sh
        self.act, self.tissue = act, None
        if act is not None:
            from ..tracking.act_soft import TissueImage

            self.tissue = TissueImage.from_act(act, sh0.device)
        self.config, self.raw = raw, raw
        self.fod, self.affine, self.params, self.vol = fod, fod.voxel2scanner, params, vol
        self.resolved = params.resolve(fod.header_voxel_sizes)
        self.target = target
        self.target_t = torch.as_tensor(target, dtype=torch.float64, device=sh0.device)
        self.seed_set, self.do_eval = seed_set, evaluate
        self.iterations = int(raw["fit"]["iterations"])
        start = {k: getattr(self.resolved, k) for k in PARAM_NAMES}
        self.state = LearnedState(
            start, raw["fit"]["learn"], raw["bounds"], raw["fit"]["space"], sh0, voxels
        )
        self.eval_pos, self.eval_dirs = seed_set(None)
        w = {k: float(v) for k, v in raw["loss"]["weights"].items()}
        self.weights = w
        self.prior_cfg = LossConfig(
            weights={k: v for k, v in w.items() if k in FOD_TERMS},
            sphere_points=int(raw["loss"]["sphere_points"]),
        )
        self.basis = None
        if voxels is not None and w.get("nonneg", 0.0) > 0:
            from ..fod.sh import lmax_from_n, sh_basis
            from .objective import fibonacci_sphere

            n = int(raw["loss"]["sphere_points"])
            self.basis = sh_basis(fibonacci_sphere(n), lmax_from_n(sh0.shape[-1])).to(sh0.device)
        self.start_corr, self.start_m = math.nan, np.zeros_like(target)

    def as_params(self, vals: Mapping) -> TrackingParameters:
        return self.params.replace(**{k: float(vals[k]) for k in PARAM_NAMES if k in self.state.z})

    def hard_eval(self, vals: Mapping, sh, world: World = SINGLE) -> tuple[float, np.ndarray]:
        """``(correlation, counts [N, N])`` of hard tracking from the evaluation seeds (each
        rank tracks its shard; the counts are summed over ranks)."""
        corr, m, _ = self._hard(vals, sh, world)
        return corr, m

    def _hard(self, vals: Mapping, sh, world: World) -> tuple[float, np.ndarray, int]:
        """:meth:`hard_eval` and the number of streamlines tracked (all ranks)."""
        pos, dirs = _shard(self.eval_pos, self.eval_dirs, world)
        m, n = hard_connectome(
            self._fod_of(sh), pos, dirs, self.as_params(vals),
            self.vol, float(self.raw["loss"]["radius_mm"]), act=self.act,
        )  # fmt: skip
        if world.size > 1:
            m = world.all_sum(torch.as_tensor(m)).numpy()
            n = world.sum({"n": n})["n"]
        return connectome_correlation(m, self.target), m, int(n)

    def check(self, world: World) -> None:
        """One-line errors before iterating: the parcellation and the FOD do not overlap, or no
        streamline can be tracked from the seeds at the starting parameters."""
        st = self.state
        if self.act is None:
            _check_overlap(st.sh0_flat.reshape(st.shape), self.affine, self.vol)
        else:  # ACT's nodes lie in grey matter, where the FOD is often zero: the 5TT's data
            a = self.act
            s2v = np.vstack([np.asarray(a.scanner2voxel, np.float64)[:3], [0.0, 0.0, 0.0, 1.0]])
            tissues = torch.as_tensor(np.asarray(a.data, np.float32))
            _check_overlap(tissues, np.linalg.inv(s2v), self.vol, "the 5TT image")
        corr, m, n = self._hard(st.start, st.sh(), world)
        if n == 0:
            v = st.start
            raise ConfigError(
                f"no streamline can be tracked from the {len(self.eval_pos)} seeds at the "
                f"starting parameters (step {v['step_mm']:.4g} mm, angle {v['angle_deg']:.4g} "
                f"deg, cutoff {v['cutoff']:.4g}): check the FOD, the seed mask and --cutoff"
            )
        if self.do_eval:
            self.start_corr, self.start_m = corr, m

    def _loss(self, it: int, pos, dirs, grad: bool, world: World = SINGLE):
        """``(total, terms, pred, res, (T_amp, T_angle))`` of this rank's seeds ``pos`` /
        ``dirs`` at iteration ``it``; ``pred`` is the whole connectome (summed over ranks).
        With ``grad`` the data term is this rank's share (see :func:`_shared_loss`), otherwise
        every rank holds the whole loss."""
        f, t, ls = self.raw["fit"], self.raw["temperature"], self.raw["loss"]
        with torch.set_grad_enabled(grad):
            vals = self.state.values(detach=not grad)
            ta = annealed(t, it, self.iterations, "amplitude_start", "amplitude_end")
            tdeg = annealed(t, it, self.iterations, "angle_start_deg", "angle_end_deg")
            fl = {k: float(torch.as_tensor(v).detach()) for k, v in vals.items()}
            t_amp, t_cos = soft_temperature(ta, tdeg, fl["angle_deg"])
            t_tis = annealed(t, it, self.iterations, "tissue_start", "tissue_end")
            sh = self.state.sh() if grad else self.state.sh().detach()
            fod = self._fod_of(sh)
            res = self._track(f, fod, pos, dirs, vals, fl, (t_amp, t_cos))
            pred = survival_connectome(
                res, fod, self.vol, cutoff=vals["cutoff"],
                angle_deg=vals["angle_deg"], temperature=(t_amp, t_cos),
                min_points=self.as_params(fl).resolve(fod.header_voxel_sizes).min_points,
                step_mm=fl["step_mm"], temperature_mm=float(ls["temperature_mm"]),
                radius_mm=float(ls["radius_mm"]), bin_mm=float(ls["bin_mm"]),
                act=self.tissue, tissue_temperature=t_tis,
            )  # fmt: skip
            pred, data = _shared_loss(pred, self._connectome_loss, world, grad)
            terms = {"connectome": data}
            st = self.state
            if grad and st.delta is not None and world.is_main:
                terms.update(
                    fod_priors(
                        st.rows(), st.delta, st.voxels, st.shape[:3], self.prior_cfg, self.basis
                    )
                )
            total = sum(self.weights.get(k, 0.0) * v for k, v in terms.items())
        return total, terms, pred, res, (ta, tdeg)

    def _connectome_loss(self, pred: torch.Tensor) -> torch.Tensor:
        ls = self.raw["loss"]
        return connectome_loss(
            pred, self.target_t, kind=str(ls["kind"]), normalise=str(ls["normalise"]),
            include_diagonal=bool(ls["include_diagonal"]),
        )  # fmt: skip

    def _fod_of(self, sh):
        """The FOD with the coefficients ``sh`` ``[X, Y, Z, K]``: the starting field itself
        when ``sh`` is its own (no SH learned), else the same grid with ``sh``."""
        if self.state.delta is None and sh.data_ptr() == self.fod.sh_flat.data_ptr():
            return self.fod
        return self.fod.with_sh(sh, changed=self.state.voxels)

    def _track(self, f, fod, pos, dirs, vals, fl, temperature):
        if f["tracker"] == "fast":
            return fast_tracking(
                fod, pos, dirs, self.as_params(fl), vals["step_mm"], act=self.act
            )  # fmt: skip
        from ..tracking.differentiable import track_differentiable

        dev = fod.device
        return track_differentiable(
            fod, torch.as_tensor(pos, device=dev), torch.as_tensor(dirs, device=dev),
            self.resolved, step_mm=vals["step_mm"], angle_deg=vals["angle_deg"],
            cutoff=vals["cutoff"], temperature=temperature, path=str(f["path"]),
        )  # fmt: skip

    def training_step(self, it: int, world: World) -> StepOutput:
        resample = bool(self.raw["seeding"]["resample"])
        pos, dirs = self.seed_set(it) if resample else (self.eval_pos, self.eval_dirs)
        pos, dirs = _shard(pos, dirs, world)
        total, terms, pred, res, (ta, tdeg) = self._loss(it, pos, dirs, grad=True, world=world)
        ctx = {"iteration": it, "values": self.state.values(), "result": res, "world": world}
        extra = self._extra(ctx)
        total = total + sum(extra.values())
        terms.update(extra)
        if not torch.is_tensor(total):
            total = torch.tensor(float(total), dtype=torch.float64)
        pred_np = pred.detach().cpu().numpy()
        record = {
            "connectome/correlation_soft": connectome_correlation(pred_np, self.target),
            "temperature/amplitude": ta, "temperature/angle_deg": tdeg,
        }  # fmt: skip
        return StepOutput(
            total=total,
            terms={k: float(torch.as_tensor(v).detach()) for k, v in terms.items()},
            counts={
                "tracking/n_seeds": float(len(pos)),
                "tracking/n_streamlines": float(res.points.shape[0]),
            },  # fmt: skip
            n_tracked=int(res.points.shape[0]),
            record=record,
            aux=pred_np,
        )

    def selection_loss(self, world: World) -> float:
        """Weighted connectome loss of the evaluation seeds at the last iteration's
        temperatures (no gradient)."""
        it = max(self.iterations - 1, 0)
        pos, dirs = _shard(self.eval_pos, self.eval_dirs, world)
        total, *_ = self._loss(it, pos, dirs, grad=False, world=world)
        return float(total)

    def evaluate(self, it: int, world: World) -> dict:
        if not self.do_eval:
            return {}
        corr, _ = self.hard_eval(self.state.floats(), self.state.sh().detach(), world)
        return {"connectome/correlation_hard": corr}

    def log_images(self, logger, it: int, out: StepOutput) -> None:
        writer = getattr(logger, "writer", None)
        if writer is not None:
            if it == 0:
                writer.add_image("connectome/target", _matrix_image(self.target), 0)
            writer.add_image("connectome/current", _matrix_image(out.aux), it)
        logger.figure(
            "connectome/matrices", matrix_figure(out.aux, self.target, f"iteration {it}"), it
        )
        if self.state.delta is not None:
            logger.histogram("fod/delta_norm", self.state.delta.detach().norm(dim=-1).cpu(), it)

    def extra_state(self) -> dict:
        return {"start_correlation": float(self.start_corr),
                "start_matrix": torch.as_tensor(self.start_m)}  # fmt: skip

    def load_extra_state(self, st: Mapping) -> None:
        self.start_corr = float(st.get("start_correlation", math.nan))
        self.start_m = np.asarray(st.get("start_matrix", torch.zeros(0)).numpy())


def _check_overlap(sh0: torch.Tensor, affine, vol, what: str = "the FOD") -> None:
    """ConfigError unless some labelled voxel of the parcellation ``vol`` lies in a voxel of
    the image ``sh0 [X, Y, Z, K]`` (``what``: the FOD, or the 5TT under ACT) with finite,
    non-zero values."""
    from .bundle import fod_overlap

    ijk = np.argwhere(vol.labels > 0).astype(np.float64)
    ijk = ijk[:: max(1, len(ijk) // 1_000_000)]  # at most ~1e6 points
    pts = ijk @ np.asarray(vol.affine, np.float64)[:3, :3].T + np.asarray(vol.affine)[:3, 3]
    if fod_overlap(sh0, affine, torch.as_tensor(pts)) == 0:
        raise ConfigError(
            f"the parcellation and {what} do not overlap: no labelled voxel lies in a voxel "
            f"of {what} with finite, non-zero values"
        )


def _shard(pos, dirs, world: World):
    """This rank's share of the seeds ``pos`` / ``dirs`` ``[N, 3]`` (all of them with one)."""
    if world.size == 1:
        return pos, dirs
    mine = world.shard(len(pos))
    return pos[mine], dirs[mine]


def _shared_loss(part: torch.Tensor, loss_fn: Callable, world: World, grad: bool):
    """``(whole, loss)``: the connectome summed over ranks and this rank's share of
    ``loss_fn(whole)``.

    The loss is not a sum over streamlines, so ranks cannot split it: every rank evaluates
    ``loss_fn`` on the whole matrix ``P = sum_r P_r`` and back-propagates
    ``dL/dP . P_r`` through its own part; the sum over ranks of these gradients is
    ``dL/dtheta``. With ``grad`` the value is ``L`` on rank 0 and 0 elsewhere (so that the
    trainer's sum over ranks is ``L``); without, ``L`` on every rank. One rank: ``loss_fn(part)``.
    """
    if world.size == 1:
        return part, loss_fn(part)
    whole = world.all_sum(part)
    leaf = whole.clone().requires_grad_(grad)
    loss = loss_fn(leaf)
    if not grad:
        return whole, loss.detach()
    (g,) = torch.autograd.grad(loss, leaf)
    inner = (g * part).sum() if part.requires_grad else part.new_zeros(())
    own = loss.detach() if world.is_main else torch.zeros_like(loss.detach())
    return whole, own + (inner - inner.detach())


def fit_connectome(
    fod,
    labels,
    target: np.ndarray | torch.Tensor,
    params: TrackingParameters | None = None,
    *,
    seed_mask: np.ndarray | None = None,
    seeds: tuple[np.ndarray, np.ndarray] | None = None,
    config: Mapping | None = None,
    evaluate: bool = True,
    logger=None,
    checkpoint: str | Path | None = None,
    resume: bool = False,
    on_step: Callable | None = None,
    progress: bool = False,
    callbacks=(),
    world: World = SINGLE,
    act=None,
) -> ConnectomeFitResult:
    """Fit step / angle / cutoff and/or SH coefficients to a target connectome.

    Args:
        fod: the FOD: an :class:`~invtract.fod.field.FODField` or an
            :class:`~invtract.io.image.Image` (or ``(sh, affine)``); its header voxel sizes
            resolve tckgen's defaults (held once: :func:`~invtract.fit.optimise.fod_field`).
        labels: parcellation (Image, ``(data, affine)`` or LabelVolume); its ``max`` label sets
            the matrix size, which must equal the target's.
        target: ``[N, N]`` target connectome (tck2connectome layout; upper triangle is read).
        params: starting / fixed tracking parameters (None fields: tckgen's defaults).
        seed_mask: ``[X, Y, Z]`` whole-brain seed mask on the FOD grid (default: voxels with a
            non-zero FOD). Seeds follow ``[seeding]``: ``per_voxel``, ``placement``,
            ``max_seeds``; ``resample = true`` draws new seeds (positions for ``random``
            placement, directions always) every iteration, otherwise one fixed set.
        seeds: explicit ``(positions [N, 3], directions [N, 3])`` instead of a mask (fixed).
        config: a connectome config (``configs/fit_connectome.toml`` layout).
        logger: :class:`~invtract.fit.runlog.RunLogger` (or None).
        checkpoint, resume: checkpoint file; continue from it.
        progress: tqdm bar.
        on_step, callbacks: ``callback(iteration, loss, record)`` after every iteration.
        evaluate: compute the hard correlation before / after (and every ``eval_every``).
        world: the data-parallel :class:`~invtract.fit.distributed.World`: each rank tracks
            its share of the seeds, the expected connectomes are summed over ranks before the
            loss, gradients are summed (the result equals one process's).
        act: fit ``tckgen -act`` tracking (:class:`~invtract.tracking.act.ActImage`): the hard
            tracking runs with ACT's rules (as ``invtract track --act``), unset ``params`` get
            ACT's defaults (cutoff x 0.5, minimum length 2 x voxel), and the survival model
            adds the tissue terminations (:mod:`invtract.fit.connectome_act`, softness
            ``[temperature] tissue_start`` -> ``tissue_end``). Needs ``[fit] tracker = "fast"``.

    Returns:
        :class:`ConnectomeFitResult` (``params``: the selected iterate, see
        :class:`~invtract.fit.trainer.Trainer`).

    Raises:
        ConfigError: invalid config or inputs; FitDiverged: a NaN / Inf loss or gradient, or
            no streamline tracked.
    """
    raw = merge_config(CONNECTOME_DEFAULTS, config or {})
    validate_config(raw)
    problem = _connectome_problem(raw, fod, labels, target, params, seed_mask, seeds,
                                  evaluate, act)  # fmt: skip
    trainer = Trainer(
        TrainSettings.from_config(raw), logger=logger, checkpoint=checkpoint, resume=resume,
        progress=progress, callbacks=[on_step, *callbacks], world=world,
    )  # fmt: skip
    out = trainer.fit(problem)
    st = problem.state
    final_vals = out.final_values
    st.restore(out.best["snapshot"])
    sh_out = st.sh().detach().cpu().to(torch.float32) if st.delta is not None else None
    final_corr, final_m = math.nan, np.zeros_like(problem.target)
    if evaluate:
        final_corr, final_m = problem.hard_eval(out.best["values"], st.sh().detach(), world)
    return ConnectomeFitResult(
        params=problem.as_params(out.best["values"]), sh=sh_out, history=out.history,
        best_loss=out.best["loss"], best_iteration=out.best["iteration"],
        best_params=problem.as_params(out.best["values"]), final_loss=out.final_loss,
        start_correlation=float(problem.start_corr), final_correlation=float(final_corr),
        start_matrix=problem.start_m, final_matrix=final_m, iterations=out.iterations,
        wall_s=out.wall_s, final_params=problem.as_params(final_vals),
    )  # fmt: skip


def _connectome_problem(raw, fod, labels, target, params, seed_mask, seeds, evaluate,
                        act=None) -> ConnectomeProblem:  # fmt: skip
    """Check the inputs and build the :class:`ConnectomeProblem`."""
    params = params or TrackingParameters()
    dev = torch.device(raw["fit"]["device"])
    field = fod_field(fod)
    affine, vsz = field.voxel2scanner, field.header_voxel_sizes
    if act is not None:
        from ..tracking.act import act_parameters

        check_act_inputs(act, field.shape, affine, raw["fit"]["tracker"])
        params = act_parameters(params, vsz)
    vol = as_label_volume(labels)
    target = np.asarray(to_numpy(target), np.float64)
    n = vol.n_nodes
    if target.shape != (n, n):
        raise ShapeError(
            f"target connectome is {target.shape}, the parcellation has {n} nodes "
            f"(max label): expected ({n}, {n})"
        )
    resolved = params.resolve(vsz)
    for k in PARAM_NAMES:
        lo, hi = (float(x) for x in raw["bounds"][k])
        if k in raw["fit"]["learn"] and not lo <= getattr(resolved, k) <= hi:
            raise ConfigError(f"start {k} = {getattr(resolved, k)} lies outside [bounds] {lo, hi}")
    if seeds is None and seed_mask is None:
        seed_mask = field.nonzero_flat.cpu().numpy().reshape(field.shape)
    scfg, seed0 = raw["seeding"], int(raw["fit"]["seed"])

    def seed_set(it: int | None):
        if seeds is not None:
            return np.asarray(seeds[0], np.float32), np.asarray(seeds[1], np.float32)
        s = seed0 if it is None else seed0 * 1_000_003 + 7919 * (it + 1)
        return whole_brain_seeds(
            seed_mask, affine, per_voxel=int(scfg["per_voxel"]),
            placement=str(scfg["placement"]), max_seeds=int(scfg["max_seeds"]), seed=s,
        )  # fmt: skip

    voxels = None
    if "sh" in raw["fit"]["learn"]:
        fcfg = raw["fod"]
        voxels = _learned_region(field, seed_mask, fcfg["region"], int(fcfg["margin_vox"])).to(dev)
    return ConnectomeProblem(
        raw, field.to(dev), params, vol, np.triu(target), seed_set, voxels, evaluate, act
    )  # fmt: skip


def check_act_tracker(tracker: str) -> None:
    """ConfigError unless ``[fit] tracker`` can track with ACT (the fast one)."""
    if tracker != "fast":
        raise ConfigError(
            f'--act needs [fit] tracker = "fast" (the {tracker} tracker has no ACT rules)'
        )


def check_act_inputs(act, fod_shape, fod_affine, tracker: str = "fast") -> None:
    """ConfigError unless ``act`` (an :class:`~invtract.tracking.act.ActImage`) can drive a
    connectome fit of the FOD grid ``fod_shape`` / ``fod_affine``: the fast tracker
    (:func:`check_act_tracker`), and a 5TT field of view that overlaps the FOD's (the grids
    may differ, as tckgen's do)."""
    check_act_tracker(tracker)
    lo_f, hi_f = _fov_box(np.asarray(fod_affine, np.float64), fod_shape)
    a2 = np.linalg.inv(np.vstack([np.asarray(act.scanner2voxel, np.float64)[:3], [0, 0, 0, 1]]))
    lo_a, hi_a = _fov_box(a2, act.data.shape[:3])
    if np.any(np.maximum(lo_f, lo_a) >= np.minimum(hi_f, hi_a)):
        raise ConfigError(
            f"the 5TT image {act.path or ''} does not overlap the FOD: its field of view spans "
            f"{np.round(lo_a, 2).tolist()} to {np.round(hi_a, 2).tolist()} mm, the FOD's "
            f"{np.round(lo_f, 2).tolist()} to {np.round(hi_f, 2).tolist()} mm"
        )


def _fov_box(affine: np.ndarray, shape) -> tuple[np.ndarray, np.ndarray]:
    """Scanner-mm bounding box ``(lo [3], hi [3])`` of a grid's field of view (voxel edges)."""
    n = np.asarray(shape[:3], np.float64)
    corners = np.array([[i, j, k] for i in (0, 1) for j in (0, 1) for k in (0, 1)], np.float64)
    vox = corners * n - 0.5
    pts = vox @ affine[:3, :3].T + affine[:3, 3]
    return pts.min(0), pts.max(0)
