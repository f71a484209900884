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
import time
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
from .checkpoint import fit_state, restore_fit_state, save_checkpoint
from .descent import annealed, descend
from .objective import FOD_TERMS, LossConfig, fod_priors, soft_temperature
from .optimise import PARAM_NAMES, _fod_arrays, _from_z, _to_z, layered_config, merge_config

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
    "fit_connectome",
]

log = logging.getLogger(__name__)

#: defaults of every key of a connectome fit config (configs/fit_connectome.toml documents them)
CONNECTOME_DEFAULTS: dict = {
    "fit": {
        "learn": ["step_mm", "angle_deg", "cutoff"],
        "iterations": 30,
        "seed": 0,
        "eval_every": 5,
        "image_every": 5,
        "checkpoint_every": 1,
        "path": "efficient",
        "device": "cpu",
        "mode": "joint",
        "tracker": "fast",
    },
    "seeding": {
        "per_voxel": 1,
        "placement": "grid",
        "resample": False,
        "max_seeds": 0,
    },
    "optimizer": {"name": "adam", "lr": 0.15, "lr_sh": 0.01, "grad_clip": 0.0},
    "temperature": {
        "amplitude_start": 0.3,
        "amplitude_end": 0.03,
        "angle_start_deg": 5.0,
        "angle_end_deg": 1.0,
        "schedule": "geometric",
    },
    "bounds": {"step_mm": [0.02, 5.0], "angle_deg": [0.5, 90.0], "cutoff": [0.01, 3.0]},
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


def load_connectome_config(path: str | Path | None, overrides: Mapping | None = None) -> dict:
    """:data:`CONNECTOME_DEFAULTS` < TOML ``path`` < ``overrides`` (unknown keys raise)."""
    cfg = layered_config(CONNECTOME_DEFAULTS, path, overrides, ignore=("tracking", "inputs"))
    validate_config(cfg)
    return cfg


def validate_config(cfg: Mapping) -> None:
    """Raise :class:`ConfigError` for an invalid connectome fit config."""
    f, s, o, t, ls = cfg["fit"], cfg["seeding"], cfg["optimizer"], cfg["temperature"], cfg["loss"]
    learn = tuple(f["learn"])
    bad = sorted(set(learn) - set(PARAM_NAMES) - {"sh"})
    if bad or not learn:
        raise ConfigError(f"[fit] learn must name {PARAM_NAMES + ('sh',)}, got {learn}")
    if int(f["iterations"]) < 0:
        raise ConfigError("[fit] iterations must be >= 0")
    if f["mode"] not in ("joint", "alternate"):
        raise ConfigError(f"[fit] mode must be joint or alternate, got {f['mode']!r}")
    if f["path"] not in ("efficient", "plain"):
        raise ConfigError("[fit] path must be efficient or plain")
    if f["tracker"] not in ("fast", "differentiable"):
        raise ConfigError(f"[fit] tracker must be fast or differentiable, got {f['tracker']!r}")
    if int(s["per_voxel"]) < 1 or int(s["max_seeds"]) < 0:
        raise ConfigError("[seeding] per_voxel must be >= 1 and max_seeds >= 0")
    if s["placement"] not in ("grid", "random"):
        raise ConfigError(f"[seeding] placement must be grid or random, got {s['placement']!r}")
    if o["name"] not in ("adam", "sgd"):
        raise ConfigError(f"[optimizer] name must be adam or sgd, got {o['name']!r}")
    if t["schedule"] not in ("geometric", "linear", "constant"):
        raise ConfigError("[temperature] schedule must be geometric, linear or constant")
    for k in ("amplitude_start", "amplitude_end", "angle_start_deg", "angle_end_deg"):
        if not float(t[k]) > 0:
            raise ConfigError(f"[temperature] {k} must be > 0")
    for k in PARAM_NAMES:
        lo, hi = (float(x) for x in cfg["bounds"][k])
        if not (0 < lo < hi and math.isfinite(hi)):
            raise ConfigError(f"[bounds] {k} needs 0 < low < high, got {lo}, {hi}")
    if ls["kind"] not in ("correlation", "frobenius"):
        raise ConfigError(f"[loss] kind must be correlation or frobenius, got {ls['kind']!r}")
    if ls["normalise"] not in ("counts", "density", "row"):
        raise ConfigError(
            f"[loss] normalise must be counts, density or row, got {ls['normalise']!r}"
        )
    for k in ("temperature_mm", "radius_mm", "bin_mm"):
        if not float(ls[k]) > 0:
            raise ConfigError(f"[loss] {k} must be > 0")
    w = {k: float(v) for k, v in ls["weights"].items()}
    unknown = sorted(set(w) - set(_LOSS_TERMS) - set(FOD_TERMS))
    if unknown:
        raise ConfigError(
            f"[loss.weights]: unknown terms {unknown}; known {_LOSS_TERMS + FOD_TERMS}"
        )
    if any(not math.isfinite(v) or v < 0 for v in w.values()):
        raise ConfigError(f"[loss.weights] must be finite and >= 0: {w}")
    if cfg["fod"]["region"] not in ("mask", "nonzero"):
        raise ConfigError("[fod] region must be mask or nonzero")


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


def survival_connectome(
    res,
    sh: torch.Tensor,
    affine,
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
) -> torch.Tensor:
    """Differentiable expected connectome of a whole-brain tracking (see the module docstring).

    Args:
        res: :class:`~invtract.tracking.differentiable.DiffTrackResult`.
        sh: ``[X, Y, Z, K]`` SH coefficients used for tracking (may require grad).
        affine: ``[4, 4]`` voxel -> scanner mm of ``sh``.
        labels: parcellation (see :func:`~invtract.losses.connectome.as_label_volume`).
        cutoff, angle_deg: floats or 0-d tensors (may require grad).
        temperature: ``(T_amp, T_cos)`` of the survival sigmoid (amplitude units, cosine).
        min_points: tckgen's minimum number of points (the min-length rule, applied softly).
        step_mm: step (mm; sets the bin size in vertices).
        temperature_mm, radius_mm: soft radial node assignment (mm).
        bin_mm: end positions are binned along each half in bins of about this length.
        symmetric: fill the lower triangle.

    Returns:
        ``[N, N]`` tensor in tck2connectome's layout (upper triangle), float64.

    Gradients:
        To ``cutoff`` and ``angle_deg`` (survival), to ``sh`` (amplitudes and, through
        ``res.points``, the geometry) and to the step (through ``res.points``).
    """
    vol = as_label_volume(labels)
    n = vol.n_nodes + 1
    points, seed_index, lengths = res.points, res.seed_index, res.lengths
    S, L = points.shape[:2]
    dev = points.device
    if S == 0:
        return _layout(torch.zeros(n, n, dtype=torch.float64, device=dev), False, symmetric, False)
    t_amp, t_cos = (float(temperature[0]), float(temperature[1]))
    affine = np.asarray(affine, np.float64)
    s2v = torch.as_tensor(np.linalg.inv(affine)[:3], dtype=torch.float64, device=dev)
    shape = tuple(int(x) for x in sh.shape[:3])
    K = sh.shape[-1]
    from ..fod.sh import lmax_from_n

    lmax = lmax_from_n(K)
    sh_flat = sh.reshape(-1, K)
    cos_max = (
        torch.cos(torch.as_tensor(angle_deg, dtype=torch.float64) * (math.pi / 180.0))
        if torch.is_tensor(angle_deg)
        else math.cos(math.radians(float(angle_deg)))
    )
    b = max(1, int(round(float(bin_mm) / max(float(step_mm), 1e-6))))
    offsets = torch.as_tensor(radial_search_offsets(vol.spacing, radius_mm), device=dev)
    label_t = torch.as_tensor(vol.labels.ravel(), device=dev)
    rows = torch.arange(S, device=dev)
    # seed acceptance: amplitude test at the seed along the first step direction
    s_seed = seed_index
    nb_first = torch.where(seed_index > 0, seed_index - 1, seed_index + 1).clamp(0, L - 1)
    p_seed = points[rows, s_seed]
    u_seed = (points[rows, nb_first] - p_seed).detach()
    u_seed = u_seed / u_seed.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    a_seed = _amplitude(sh_flat, s2v, shape, p_seed, u_seed, lmax)
    cut64 = torch.as_tensor(cutoff, dtype=torch.float64)
    w_seed = torch.sigmoid((a_seed - cut64) / t_amp)  # [S]
    E, R = [], []
    for half in (0, 1):
        idx, nst = _half_index(seed_index, lengths, half, L)
        H = idx.shape[1]
        x = half_margins(
            points, idx, nst, sh_flat, s2v, shape, lmax, cutoff, cos_max, t_amp, t_cos
        )
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
            kk = k_arg[use]
            key = ss * H + kk
            uniq, inv = torch.unique(key, return_inverse=True)
            xs = _margins_at(
                points, idx, uniq // H, uniq % H, sh_flat, s2v, shape, lmax,
                cutoff, cos_max, t_amp, t_cos,
            )  # fmt: skip
            surv = surv.masked_scatter(use, torch.sigmoid(xs[inv]))
        # the last bin ends the half: no survival beyond n
        past_end = (need_j[..., 1] > nst[:, None]) & ok
        s_hi = torch.where(past_end, torch.zeros_like(surv[..., 1]), surv[..., 1])
        mass = torch.where(ok, (surv[..., 0] - s_hi).clamp_min(0.0), torch.zeros_like(s_hi))
        rep = idx.gather(1, r.clamp(0, H - 1))  # vertex of each representative
        pr = points[rows[:, None], rep].reshape(-1, 3)
        probs = _soft_node_probs(
            pr, vol, label_t, offsets, float(radius_mm), float(temperature_mm)
        ).reshape(S, nb, n)
        E.append(mass[..., None] * probs.to(torch.float64))
        R.append(torch.where(ok, r, torch.full_like(r, -(10**9))))
    ok_len = (1 + R[0][:, :, None] + R[1][:, None, :]) >= int(min_points)  # [S, nb0, nb1]
    F2 = torch.einsum("sij,sjm->sim", ok_len.to(torch.float64), E[1])
    full = torch.einsum("sin,sim->nm", E[0] * w_seed[:, None, None], F2)
    full = torch.triu(full) + torch.tril(full, -1).T
    return _layout(full, False, symmetric, False)


@dataclass
class _Tracked:
    points: torch.Tensor  # [S, L, 3]
    seed_index: torch.Tensor  # [S]
    lengths: torch.Tensor  # [S]


def fast_tracking(sh, affine, voxel_sizes, positions, directions, params, step_mm=None):
    """Hard tracking with the fast engine, padded, for :func:`survival_connectome`.

    The points carry no gradient except to ``step_mm`` (a 0-d tensor): with the step
    directions held fixed, vertex ``k`` of a half is ``seed + (h / h0) (p_k - seed)``, i.e.
    the first-order effect of the step on where the streamline is, without the change of the
    peaks along the way (``[fit] tracker = "differentiable"`` gives the exact one).

    Returns:
        An object with ``points [S, L, 3]``, ``seed_index [S]``, ``lengths [S]``.
    """
    res = _track_hard(sh, affine, voxel_sizes, positions, directions, params)
    pts, _ = res.streamlines.to_padded()
    lengths = res.streamlines.lengths.to(torch.int64)
    pts = pts.to(torch.float64)
    seed_index = torch.as_tensor(np.asarray(res.seed_index), dtype=torch.int64)
    if torch.is_tensor(step_mm) and step_mm.requires_grad and pts.shape[0]:
        h0 = float(step_mm.detach())
        seed_pt = pts[torch.arange(pts.shape[0]), seed_index][:, None]
        pts = seed_pt + (step_mm.to(torch.float64) / h0) * (pts - seed_pt)
    return _Tracked(pts, seed_index, lengths.to(torch.int64))


def _track_hard(sh, affine, voxel_sizes, positions, directions, params):
    """Hard tracking (the fastest engine) of ``sh`` from explicit seeds and directions."""
    from ..fod.field import FODField
    from ..tracking.api import Seeding, track

    sh_np = to_numpy(sh)
    field = FODField.from_array(sh_np, np.asarray(affine, np.float64))
    with torch.no_grad():
        return track(
            field,
            Seeding("list", positions=positions, directions=directions),
            params,
            voxel_sizes=voxel_sizes,
            rng_seed=0,
        )


def hard_connectome(sh, affine, voxel_sizes, positions, directions, params, labels, radius_mm):
    """tck2connectome counts of hard tracking (fast engine) from the given seeds.

    Returns:
        ``(matrix [N, N] float64, n_streamlines)``.
    """
    res = _track_hard(sh, affine, voxel_sizes, positions, directions, params)
    return connectome_matrix(res.streamlines, labels, radius_mm), len(res.streamlines)


# ----------------------------------------------------------------------------------------------
# the fit loop
# ----------------------------------------------------------------------------------------------
@dataclass
class ConnectomeFitResult:
    """What :func:`fit_connectome` returns.

    Attributes:
        params: fitted tracking parameters (final iterate).
        sh: fitted SH coefficients ``[X, Y, Z, K]`` float32 when ``sh`` was learned, else None.
        history: one dict per iteration (as ``metrics.jsonl``).
        best_loss, best_iteration, best_params: lowest training loss and where.
        final_loss: loss of the last iteration.
        start_correlation, final_correlation: hard (tck2connectome) correlation of the
            evaluation tracking with the target, before and after.
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


def _learned_region(sh0: torch.Tensor, mask, region: str, margin: int) -> torch.Tensor:
    nz = (sh0 != 0).any(-1).numpy()
    if region == "mask" and mask is not None:
        m = np.asarray(mask) != 0
        if margin > 0:
            from scipy.ndimage import binary_dilation

            m = binary_dilation(m, iterations=margin)
        nz &= m
    return torch.as_tensor(np.flatnonzero(nz.ravel()), dtype=torch.long)


def fit_connectome(
    fod,
    labels,
    target: np.ndarray | torch.Tensor,
    params: TrackingParameters | None = None,
    *,
    seed_mask: np.ndarray | None = None,
    seeds: tuple[np.ndarray, np.ndarray] | None = None,
    config: Mapping | None = None,
    logger=None,
    voxel_sizes=None,
    checkpoint: str | Path | None = None,
    resume: bool = False,
    progress: bool = False,
    on_step: Callable | None = None,
    evaluate: bool = True,
) -> ConnectomeFitResult:
    """Fit step / angle / cutoff and/or SH coefficients to a target connectome.

    Args:
        fod: :class:`~invtract.io.image.Image`, FODField or ``(sh, affine)``.
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
        voxel_sizes: header voxel sizes (tckgen's defaults).
        checkpoint, resume: checkpoint file; continue from it.
        progress: tqdm bar.
        on_step: ``on_step(iteration, loss, record)`` after every iteration.
        evaluate: compute the hard correlation before / after (and every ``eval_every``).

    Returns:
        :class:`ConnectomeFitResult`.

    Raises:
        ConfigError: invalid config or inputs; FitDiverged: a NaN / Inf loss or gradient.
    """
    from ..tracking.differentiable import track_differentiable

    t_start = time.perf_counter()
    raw = merge_config(CONNECTOME_DEFAULTS, config or {})
    validate_config(raw)
    fcfg, scfg, ocfg, tcfg = raw["fit"], raw["seeding"], raw["optimizer"], raw["temperature"]
    lcfg = raw["loss"]
    weights = {k: float(v) for k, v in lcfg["weights"].items()}
    learn = tuple(fcfg["learn"])
    iterations = int(fcfg["iterations"])
    params = params or TrackingParameters()
    dev = torch.device(fcfg["device"])
    sh0, affine, vsz = _fod_arrays(fod, voxel_sizes)
    vol = as_label_volume(labels)
    target = np.asarray(to_numpy(target), np.float64)
    n_nodes = vol.n_nodes
    if target.shape != (n_nodes, n_nodes):
        raise ShapeError(
            f"target connectome is {target.shape}, the parcellation has {n_nodes} nodes "
            f"(max label): expected ({n_nodes}, {n_nodes})"
        )
    target = np.triu(target)  # tck2connectome's upper triangle (a symmetric file is folded)
    resolved = params.resolve(vsz)
    start = {
        "step_mm": resolved.step_mm,
        "angle_deg": resolved.angle_deg,
        "cutoff": resolved.cutoff,
    }
    bounds = {k: tuple(float(x) for x in raw["bounds"][k]) for k in PARAM_NAMES}
    for k in PARAM_NAMES:
        if k in learn and not bounds[k][0] <= start[k] <= bounds[k][1]:
            raise ConfigError(f"start {k} = {start[k]} lies outside [bounds] {bounds[k]}")
    if seeds is None and seed_mask is None:
        seed_mask = (sh0 != 0).any(-1).numpy()

    def seed_set(it: int | None):
        if seeds is not None:
            return np.asarray(seeds[0], np.float32), np.asarray(seeds[1], np.float32)
        s = int(fcfg["seed"]) if it is None else int(fcfg["seed"]) * 1_000_003 + 7919 * (it + 1)
        return whole_brain_seeds(
            seed_mask,
            affine,
            per_voxel=int(scfg["per_voxel"]),
            placement=str(scfg["placement"]),
            max_seeds=int(scfg["max_seeds"]),
            seed=s,
        )

    eval_pos, eval_dirs = seed_set(None)

    z = {
        k: torch.tensor(_to_z(start[k], *bounds[k]), dtype=torch.float64, requires_grad=True)
        for k in PARAM_NAMES
        if k in learn
    }
    learn_sh = "sh" in learn
    K = sh0.shape[-1]
    sh0_flat = sh0.reshape(-1, K).to(dev)
    voxels = delta = basis = None
    if learn_sh:
        voxels = _learned_region(
            sh0, seed_mask, raw["fod"]["region"], int(raw["fod"]["margin_vox"])
        ).to(dev)
        delta = torch.zeros(voxels.numel(), K, dtype=torch.float32, device=dev, requires_grad=True)
        if weights.get("nonneg", 0.0) > 0:
            from ..fod.sh import lmax_from_n, sh_basis
            from .objective import fibonacci_sphere

            basis = sh_basis(fibonacci_sphere(int(lcfg["sphere_points"])), lmax_from_n(K)).to(dev)
    prior_cfg = LossConfig(
        weights={k: v for k, v in weights.items() if k in FOD_TERMS},
        sphere_points=int(lcfg["sphere_points"]),
    )
    opt_cls = torch.optim.Adam if ocfg["name"] == "adam" else torch.optim.SGD
    opt_p = opt_cls(list(z.values()), lr=float(ocfg["lr"])) if z else None
    opt_sh = opt_cls([delta], lr=float(ocfg["lr_sh"])) if learn_sh else None
    target_t = torch.as_tensor(target, dtype=torch.float64, device=dev)

    def values(detach=False) -> dict:
        out = {}
        for k in PARAM_NAMES:
            if k in z:
                v = _from_z(z[k], *bounds[k])
                out[k] = v.detach() if detach else v
            else:
                out[k] = start[k]
        return out

    def current_sh():
        if not learn_sh:
            return sh0_flat.reshape(sh0.shape)
        return sh0_flat.index_add(0, voxels, delta).reshape(sh0.shape)

    def as_params(vals: Mapping) -> TrackingParameters:
        return params.replace(**{k: float(vals[k]) for k in PARAM_NAMES if k in z})

    def hard_eval(vals, sh) -> tuple[float, np.ndarray]:
        m, _ = hard_connectome(
            sh, affine, vsz, eval_pos, eval_dirs, as_params(vals), vol, float(lcfg["radius_mm"])
        )
        return connectome_correlation(m, target), m

    # resume -----------------------------------------------------------------------------------
    history: list = []
    best = {"loss": math.inf, "iteration": -1, "values": dict(start)}
    it0 = 0
    start_corr, start_m = math.nan, np.zeros_like(target)
    if resume and checkpoint is not None and Path(checkpoint).is_file():
        st = restore_fit_state(checkpoint, raw, z, delta if learn_sh else None, opt_p, opt_sh)
        history, best, it0 = st["history"], st["best"], st["iteration"]
        start_corr, start_m = st["start_correlation"], np.asarray(st["start_matrix"])
        log.info("resumed from %s at iteration %d", checkpoint, it0)
    elif evaluate:
        start_corr, start_m = hard_eval(start, sh0)

    def save(it_done: int) -> None:
        if checkpoint is None:
            return
        state = fit_state(
            it_done, raw, z, delta, opt_p, opt_sh, history=history, best=best,
            start_correlation=start_corr, start_matrix=start_m,
        )  # fmt: skip
        save_checkpoint(checkpoint, state)

    if logger is not None and it0 == 0 and getattr(logger, "writer", None) is not None:
        logger.writer.add_image("connectome/target", _matrix_image(target), 0)

    bar = None
    if progress:
        from ..progress import iteration_bar  # tqdm on a terminal, a few lines off one

        bar = iteration_bar(iterations, it0, "fit")
    pos_t = dirs_t = None
    p_np, d_np = eval_pos, eval_dirs
    try:
        for it in range(it0, iterations):
            t0 = time.perf_counter()
            if bool(scfg["resample"]) or pos_t is None:
                p_np, d_np = seed_set(it) if bool(scfg["resample"]) else (eval_pos, eval_dirs)
                pos_t = torch.as_tensor(p_np, device=dev)
                dirs_t = torch.as_tensor(d_np, device=dev)
            vals = values()
            ta = annealed(tcfg, it, iterations, "amplitude_start", "amplitude_end")
            tdeg = annealed(tcfg, it, iterations, "angle_start_deg", "angle_end_deg")
            ang = float(torch.as_tensor(vals["angle_deg"]).detach())
            t_amp, t_cos = soft_temperature(ta, tdeg, ang)
            sh = current_sh()
            step_now = float(torch.as_tensor(vals["step_mm"]).detach())
            rp_now = as_params({k: float(torch.as_tensor(v).detach()) for k, v in vals.items()})
            if fcfg["tracker"] == "fast":
                res = fast_tracking(sh, affine, vsz, p_np, d_np, rp_now, vals["step_mm"])
            else:
                res = track_differentiable(
                    sh,
                    affine,
                    pos_t,
                    dirs_t,
                    resolved,
                    step_mm=vals["step_mm"],
                    angle_deg=vals["angle_deg"],
                    cutoff=vals["cutoff"],
                    temperature=(t_amp, t_cos),
                    path=str(fcfg["path"]),
                    voxel_sizes=vsz,
                )
            min_points = rp_now.resolve(vsz).min_points
            pred = survival_connectome(
                res,
                sh,
                affine,
                vol,
                cutoff=vals["cutoff"],
                angle_deg=vals["angle_deg"],
                temperature=(t_amp, t_cos),
                min_points=min_points,
                step_mm=step_now,
                temperature_mm=float(lcfg["temperature_mm"]),
                radius_mm=float(lcfg["radius_mm"]),
                bin_mm=float(lcfg["bin_mm"]),
            )
            terms = {
                "connectome": connectome_loss(
                    pred,
                    target_t,
                    kind=str(lcfg["kind"]),
                    normalise=str(lcfg["normalise"]),
                    include_diagonal=bool(lcfg["include_diagonal"]),
                )
            }
            if learn_sh:
                sh_l = sh0_flat[voxels] + delta
                terms.update(fod_priors(sh_l, delta, voxels, sh0.shape[:3], prior_cfg, basis))
            total = sum(weights.get(k, 0.0) * v for k, v in terms.items())
            if not torch.is_tensor(total):
                total = torch.tensor(float(total), dtype=torch.float64)
            vals_before = {k: float(torch.as_tensor(v).detach()) for k, v in vals.items()}
            step = descend(
                total, it, z, delta if learn_sh else None, opt_p, opt_sh,
                grad_clip=float(ocfg["grad_clip"]), alternate=fcfg["mode"] == "alternate",
                checkpoint=checkpoint,
            )  # fmt: skip
            loss, grads = step["loss"], step["grads"]
            gn_p, gn_sh = step["grad_norm_params"], step["grad_norm_sh"]
            if loss < best["loss"]:
                best = {"loss": loss, "iteration": it, "values": vals_before}
            pred_np = pred.detach().cpu().numpy()
            rec = {
                "iteration": it,
                "loss/total": loss,
                **{f"loss/{k}": float(torch.as_tensor(v).detach()) for k, v in terms.items()},
                "connectome/correlation_soft": connectome_correlation(pred_np, target),
                "tracking/n_seeds": int(pos_t.shape[0]),
                "tracking/n_streamlines": int(res.points.shape[0]),
                **{f"param/{k}": v for k, v in vals_before.items()},
                "temperature/amplitude": ta,
                "temperature/angle_deg": tdeg,
                "grad_norm/params": gn_p,
                "grad_norm/sh": gn_sh,
                **grads,
                "time/step_s": time.perf_counter() - t0,
            }
            last = it == iterations - 1
            if evaluate and ((it + 1) % max(int(fcfg["eval_every"]), 1) == 0 or last):
                vals_after = {k: float(v) for k, v in values(detach=True).items()}
                rec["connectome/correlation_hard"], _ = hard_eval(
                    vals_after, current_sh().detach()
                )
            history.append(rec)
            if logger is not None:
                logger.scalars(it, {k: v for k, v in rec.items() if k != "iteration"})
                logger.metrics(rec)
                every = int(fcfg["image_every"])
                if every and (it % every == 0 or last):
                    if getattr(logger, "writer", None) is not None:
                        logger.writer.add_image("connectome/current", _matrix_image(pred_np), it)
                    logger.figure(
                        "connectome/matrices",
                        matrix_figure(pred_np, target, f"iteration {it}"),
                        it,
                    )
                    if learn_sh:
                        logger.histogram("fod/delta_norm", delta.detach().norm(dim=-1).cpu(), it)
            if bar is not None:
                bar.set_postfix(
                    loss=f"{loss:.4g}", **{k: f"{v:.4g}" for k, v in vals_before.items()}
                )
                bar.update(1)
            if (it + 1) % max(int(fcfg["checkpoint_every"]), 1) == 0 or last:
                save(it + 1)
            if on_step is not None:
                on_step(it, loss, rec)
    finally:
        if bar is not None:
            bar.close()
        if logger is not None:
            logger.flush()

    final_vals = {k: float(v) for k, v in values(detach=True).items()}
    sh_out = current_sh().detach().cpu().to(torch.float32) if learn_sh else None
    final_corr, final_m = math.nan, np.zeros_like(target)
    if evaluate:
        final_corr, final_m = hard_eval(final_vals, current_sh().detach())
    return ConnectomeFitResult(
        params=as_params(final_vals),
        sh=sh_out,
        history=history,
        best_loss=float(best["loss"]),
        best_iteration=int(best["iteration"]),
        best_params=as_params(best["values"]),
        final_loss=float(history[-1]["loss/total"]) if history else math.nan,
        start_correlation=float(start_corr),
        final_correlation=float(final_corr),
        start_matrix=start_m,
        final_matrix=final_m,
        iterations=len(history),
        wall_s=time.perf_counter() - t_start,
    )
