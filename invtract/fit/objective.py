"""The fit objective: paired loss terms between tracked and target streamlines, plus FOD priors.

Every target streamline ``i`` provides one seed, so tracked streamline ``i`` is compared with
target streamline ``i`` (the *paired* setting). Both are split at their seed vertex into two
halves that run outward from the seed; the first tracked half (tckgen's first direction,
stored reversed before the seed) is matched with the target half that leaves the seed in the
same direction.

Terms (all scanner mm unless stated; each is a mean over paired streamlines):

* ``mdf``: common-extent paired MDF. Each half pair is resampled at ``n_points`` equal arc
  lengths over ``min(len_tracked, len_target)`` (the extent both reach; detached) and the mean
  point distance is taken, weighted by that extent. A length mismatch (a wrong cutoff or
  angle) therefore does not bend the shape term, so the step gradient comes from geometry
  (e.g. the outward drift of Euler steps on a curve, ~ length x step / (2 radius)).
* ``vertex``: index-paired vertex distance. tckgen puts vertex ``k`` of a half ``k`` steps
  from the seed (arc length ~ ``k x step``), and so does the tracker; vertex ``k`` of each
  tracked half is compared with vertex ``k`` of its target half, over the common index range
  ``k < min(n_tracked, n_target)`` of the pair, weighted by the tracked vertex's survival
  weight (detached, so the term never pays to kill a vertex) and averaged per pair. A step
  error ``e`` displaces vertex ``k`` by ~``k e`` along the path, so the term is a V in the step
  with its minimum (zero) at the target's step and a gradient of ~the mean vertex arc length
  per unit ``log step`` everywhere; the arc-length-resampled ``mdf`` compares the same curve
  at any step and only feels the step through the small geometric drift of Euler steps,
  which on real data is non-monotone (it fitted ``bundleA_step0.5`` at 0.55). A wrong angle or
  cutoff changes only where the halves end, not the common range, so it does not bias the
  step. Gradients reach the step (and the SH coefficients) through the tracked points.
* ``extent``: survival-weighted mis-extent. For every tracked vertex at arc length ``a`` from
  the seed, with segment length ``d`` and soft survival weight ``s`` (from
  :func:`~invtract.tracking.differentiable.track_differentiable`): ``d (1 - s)`` if the target
  half reaches ``a`` (the vertex should survive), ``d s`` otherwise (it overshoots), plus the
  length the tracked half falls short of the target (a constant). Its gradient is the only one
  that reaches ``angle_deg`` and ``cutoff``: overshooting vertices pull the thresholds tighter,
  vertices inside the target's extent pull them looser. At a low temperature it tends to
  ``|len_tracked - len_target|`` per half.
* ``margin``: a hinge on the hard survival test in log-threshold space, the params fit's
  threshold term (mm x log units). Along each tracked half, ``M_j`` is the largest turn
  (degrees) and ``m_j`` the smallest peak amplitude met from the seed to vertex ``j``
  (:func:`running_features`); the vertex survives the hard test iff
  ``a_j = log angle - log M_j > 0`` and ``c_j = log m_j - log cutoff > 0``. Vertices within
  the target's extent are charged how far either margin is negative; a half that overshoots
  the target charges its overshoot times the positive margin of its first vertex beyond the
  target's end, for the test that can kill it without killing a vertex that must survive;
  a half that stopped short of the target charges the violations of the target's own
  vertices beyond its end (features computed along the target) (:func:`margin_hinge`).
  Unlike survival weights (a product of per-step sigmoids, whose gradient vanishes a few
  temperatures from the threshold), the hinge's gradient does not vanish however far the
  threshold is from where it binds (60 deg when the target stopped at 1 deg), and it is zero
  on the interval of thresholds that reproduce the target. Gradients reach only
  ``angle_deg`` and ``cutoff`` (the features are detached).
* ``centre``: a tie-break inside the interval of thresholds that reproduce the target (where
  ``margin`` is ~0): ``sqrt((log v - log v_c)^2 + 1e-4)`` for the angle and the cutoff, ``v_c``
  the geometric centre of the threshold's feasible interval read from the batch's *target*
  halves (:func:`feasible_box`: the angle must exceed every target turn and be below the turn
  of every target stop that only the angle test can explain; the cutoff must be below every
  target amplitude and above the amplitude of every stop only the cutoff test can explain).
  Only where both ends are known (the threshold binds somewhere); elsewhere ``anchor`` keeps
  the threshold at tckgen's default. Without it ``anchor`` leaves the threshold on the edge of
  the interval nearest the default (34.4 deg on ``bundleA_angle30``, interval [29.8, 34.2]);
  the centre halves the worst-case error over the values the target cannot tell apart.
* ``reach``: a hinge on the FOD amplitude of every step of every target half (each must stay
  above the cutoff by the relative margin ``reach_margin``; :mod:`invtract.fit.path_terms`):
  it keeps the targets' paths open in a learned FOD, where the survival weights of ``extent``
  lose their gradient once an amplitude is far below the cutoff. Gradients reach the learned
  FOD rows and ``cutoff``; it needs no tracking.
* ``tangent``: the squared tangential gradient of the FOD amplitude at every step of every
  target half along the step (over ``cutoff^2``; :mod:`invtract.fit.path_terms`): SD_Stream
  steps along FOD peaks, so it is ~0 on the FOD the target was tracked on. Quadratic in the
  learned FOD rows; no tracking.
* ``replay``: each target step replayed alone (the MRtrix ascent from the target's previous
  direction, no gradient) and a robust loss on the angle from the peak it finds to the
  target's step, through the peak's implicit Jacobian
  (:func:`~invtract.fit.path_terms.replay_sum`, ``replay_sigma_deg``); ~0 on the FOD the
  target was tracked on. No tracking.
* ``paired``, ``chamfer``, ``length``, ``density``: :func:`invtract.losses.paired_loss` (full
  streamlines, MDF + coverage, weighted by each streamline's mean survival weight),
  :func:`~invtract.losses.chamfer_loss` (unpaired), :func:`~invtract.losses.length_loss` (W1
  of the length histograms) and ``1 - corr`` of the track-density maps (unitless).
* FOD priors (:func:`fod_priors`): ``nonneg`` (squared negative amplitude on a dense sphere),
  ``smooth`` (squared difference of the coefficient *change* between 6-neighbour voxels),
  ``prior`` (squared change from the starting FOD).

A seed that gives no tracked streamline is charged its target's whole length in ``extent``
(a constant: no gradient).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import ConfigError
from ..streamlines import Streamlines

__all__ = [
    "TERMS",
    "FOD_TERMS",
    "LossConfig",
    "PairedTarget",
    "split_halves",
    "resample_halves",
    "paired_terms",
    "fod_priors",
    "fibonacci_sphere",
    "soft_temperature",
    "running_features",
    "margin_hinge",
    "vertex_distance",
    "feasible_box",
]

#: tractogram loss terms (keys of ``LossConfig.weights``)
TERMS = (
    "mdf", "vertex", "extent", "margin", "centre", "reach", "tangent", "replay",
    "paired", "chamfer", "length", "density",
)  # fmt: skip
#: data terms that read the target paths alone (no tracking; :mod:`invtract.fit.path_terms`)
TARGET_ONLY_TERMS = ("reach", "tangent", "replay")
#: FOD regulariser terms
FOD_TERMS = ("nonneg", "smooth", "prior")
#: regulariser of the learned thresholds (computed by :func:`invtract.fit.optimise.fit`)
PARAM_TERMS = ("anchor",)
#: diffusion-signal term (computed by :class:`invtract.fit.signal_term.SignalTerm`, ``--dwi``)
SIGNAL_TERMS = ("signal",)


@dataclass(frozen=True)
class LossConfig:
    """The ``[loss]`` table of a fit config.

    Attributes:
        weights: term name -> weight (missing or 0 = not computed). Tractogram terms are in mm
            (``density`` unitless); FOD terms in squared SH units.
        n_points: resampling points per half (``mdf``) or streamline (``paired``, ``chamfer``).
        temperature_mm: softness of the soft minima in ``paired`` / ``chamfer`` (mm).
        radius_mm: coverage radius of ``paired`` (mm).
        coverage_weight: mm per unit uncovered fraction in ``paired``.
        sphere_points: directions of the dense sphere for ``nonneg``.
        reach_margin: ``reach``'s relative amplitude margin about the cutoff
            (:mod:`invtract.fit.path_terms`).
    """

    weights: dict = field(default_factory=lambda: {"mdf": 1.0, "extent": 1.0})
    n_points: int = 16
    temperature_mm: float = 0.5
    radius_mm: float = 1.0
    coverage_weight: float = 1.0
    sphere_points: int = 256
    reach_margin: float = 0.1
    replay_sigma_deg: float = 10.0

    @classmethod
    def from_dict(cls, d: Mapping | None) -> LossConfig:
        """Validate a ``[loss]`` table (``weights`` is its ``[loss.weights]`` sub-table)."""
        from .config import table_fields

        d = table_fields(cls, d, "loss")
        w = {k: float(v) for k, v in dict(d.pop("weights", {"mdf": 1.0, "extent": 1.0})).items()}
        known = TERMS + FOD_TERMS + PARAM_TERMS + SIGNAL_TERMS
        bad = sorted(set(w) - set(known))
        if bad:
            raise ConfigError(f"[loss.weights]: unknown terms {bad}; known {known}")
        if any(not math.isfinite(v) or v < 0 for v in w.values()):
            raise ConfigError(f"[loss.weights] must be finite and >= 0: {w}")
        cfg = cls(weights=w, **d)
        if int(cfg.n_points) < 2:
            raise ConfigError(f"[loss] n_points must be >= 2, got {cfg.n_points}")
        return cfg

    def active(self, names=TERMS) -> list[str]:
        """Names among ``names`` with a non-zero weight."""
        return [k for k in names if self.weights.get(k, 0.0) > 0]


# ----------------------------------------------------------------------------------------------
# halves
# ----------------------------------------------------------------------------------------------
def split_halves(
    points: torch.Tensor, lengths: torch.Tensor, seed_index: torch.Tensor, extra=None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Split padded streamlines at their seed into two halves running outward from the seed.

    Half 0 is vertices ``seed, seed-1, ..., 0`` (tckgen's first direction), half 1 is
    ``seed, seed+1, ..., n-1``. Padding repeats each half's last vertex (zero-length segments).

    Args:
        points: ``[S, L, 3]`` padded vertices (mm).
        lengths: ``[S]`` vertex counts.
        seed_index: ``[S]`` seed vertex of each streamline.
        extra: optional ``[S, L]`` per-vertex values (e.g. survival weights) split the same way.

    Returns:
        ``(halves [S, 2, H, 3], counts [S, 2], extra_halves [S, 2, H] or None)``.

    Gradients:
        Through ``points`` and ``extra`` (a gather).
    """
    S, L = points.shape[:2]
    dev = points.device
    si = seed_index.to(dev).long()
    n = lengths.to(dev).long()
    c0 = si + 1
    c1 = n - si
    H = int(max(int(c0.max()) if S else 1, int(c1.max()) if S else 1, 1))
    j = torch.arange(H, device=dev)
    i0 = (si[:, None] - torch.minimum(j[None], (c0 - 1)[:, None])).clamp(0, max(L - 1, 0))
    i1 = (si[:, None] + torch.minimum(j[None], (c1 - 1)[:, None])).clamp(0, max(L - 1, 0))
    idx = torch.stack([i0, i1], 1)  # [S, 2, H]
    flat = idx.reshape(S, 2 * H)
    halves = torch.gather(points, 1, flat[..., None].expand(S, 2 * H, 3)).reshape(S, 2, H, 3)
    ex = None
    if extra is not None:
        ex = torch.gather(extra, 1, flat).reshape(S, 2, H)
    return halves, torch.stack([c0, c1], 1), ex


def _arc(halves: torch.Tensor) -> torch.Tensor:
    """``[..., H]`` cumulative arc length from the seed (padding adds zero)."""
    seg = (halves[..., 1:, :] - halves[..., :-1, :]).pow(2).sum(-1).clamp_min(1e-20).sqrt()
    seg = torch.where(seg > 1e-9, seg, torch.zeros_like(seg))
    return torch.cat([torch.zeros_like(seg[..., :1]), seg.cumsum(-1)], -1)


def resample_halves(
    halves: torch.Tensor, counts: torch.Tensor, extent: torch.Tensor, n_points: int
) -> torch.Tensor:
    """Points at ``n_points`` equal arc lengths in ``[0, extent]`` along each half.

    Args:
        halves: ``[S, 2, H, 3]`` from :func:`split_halves`.
        counts: ``[S, 2]`` vertex counts per half.
        extent: ``[S, 2]`` arc length to cover (mm; detached; clipped to the half's length).
        n_points: samples per half.

    Returns:
        ``[S, 2, n_points, 3]`` (mm).

    Gradients:
        Through the vertices (not through ``extent``).
    """
    S, _, H, _ = halves.shape
    cum = _arc(halves)  # [S, 2, H]
    total = cum[..., -1].detach()
    ext = torch.minimum(extent.detach().to(cum.dtype), total)
    t = torch.linspace(0.0, 1.0, n_points, dtype=cum.dtype, device=cum.device)
    q = ext[..., None] * t  # [S, 2, n]
    if H < 2:
        return halves[..., :1, :].expand(S, 2, n_points, 3)
    k = torch.searchsorted(cum.detach().contiguous(), q.contiguous(), right=True) - 1
    hi = (counts.to(k.device)[..., None] - 2).clamp_min(0)
    k = torch.minimum(k.clamp_min(0), hi).clamp(0, H - 2)
    c_k = torch.gather(cum, 2, k)
    c_k1 = torch.gather(cum, 2, k + 1)
    seg = c_k1 - c_k
    frac = torch.where(seg > 1e-9, (q - c_k) / seg.clamp_min(1e-9), torch.zeros_like(q))
    frac = frac.clamp(0.0, 1.0)
    p_k = torch.gather(halves, 2, k[..., None].expand(S, 2, n_points, 3))
    p_k1 = torch.gather(halves, 2, (k + 1)[..., None].expand(S, 2, n_points, 3))
    return p_k + frac[..., None].to(halves.dtype) * (p_k1 - p_k)


# ----------------------------------------------------------------------------------------------
# target
# ----------------------------------------------------------------------------------------------
@dataclass
class PairedTarget:
    """Target streamlines split at their seeds, ready for :func:`paired_terms`.

    Attributes:
        streamlines: the ``S`` target streamlines (mm).
        seeds: ``[S, 3]`` seed points (mm).
        directions: ``[S, 3]`` initial tracking directions.
        halves: ``[S, 2, H, 3]`` target halves, oriented like the tracked ones (half 0 leaves
            the seed along ``directions``).
        counts: ``[S, 2]`` vertices per half.
        half_length: ``[S, 2]`` arc length of each half (mm).
    """

    streamlines: Streamlines
    seeds: torch.Tensor
    directions: torch.Tensor
    halves: torch.Tensor
    counts: torch.Tensor
    half_length: torch.Tensor

    @classmethod
    def build(cls, target: Streamlines, seeds, directions) -> PairedTarget:
        """Split ``target`` at the vertex nearest to each seed and orient the halves.

        Args:
            target: ``S`` target streamlines (mm).
            seeds: ``[S, 3]`` seed points (mm), seed ``i`` on streamline ``i``.
            directions: ``[S, 3]`` initial directions of the tracker at the seeds.
        """
        if len(target) != len(seeds):
            raise ConfigError(f"{len(target)} target streamlines but {len(seeds)} seeds")
        pts, pmask = target.to(dtype=torch.float32).to_padded()
        pts = pts.detach()
        lengths = pmask.sum(-1)
        seeds_t = torch.as_tensor(np.asarray(seeds), dtype=torch.float32)
        dirs_t = torch.as_tensor(np.asarray(directions), dtype=torch.float32)
        L = pts.shape[1]
        valid = torch.arange(L)[None] < lengths[:, None]
        d = (pts - seeds_t[:, None]).pow(2).sum(-1).masked_fill(~valid, float("inf"))
        si = d.argmin(1)
        halves, counts, _ = split_halves(pts, lengths, si)
        # orient: half 0 must leave the seed along the tracker's first direction
        step0 = halves[:, 0, 1] - halves[:, 0, 0]
        step1 = halves[:, 1, 1] - halves[:, 1, 0]
        s0 = (step0 * dirs_t).sum(-1)
        s1 = (step1 * dirs_t).sum(-1)
        swap = torch.where(counts[:, 0] > 1, s0 < 0, s1 > 0)
        halves = torch.where(swap[:, None, None, None], halves.flip(1), halves)
        counts = torch.where(swap[:, None], counts.flip(1), counts)
        hl = _arc(halves)[..., -1]
        return cls(target, seeds_t, dirs_t, halves, counts, hl)

    def __len__(self) -> int:
        return int(self.seeds.shape[0])

    def subset(self, index) -> PairedTarget:
        """The pairs ``index`` (a ``[M]`` index tensor or array)."""
        idx = torch.as_tensor(np.asarray(index), dtype=torch.long)
        return PairedTarget(
            self.streamlines.select(idx),
            self.seeds[idx],
            self.directions[idx],
            self.halves[idx],
            self.counts[idx],
            self.half_length[idx],
        )


# ----------------------------------------------------------------------------------------------
# terms
# ----------------------------------------------------------------------------------------------
def paired_terms(res, target: PairedTarget, config: LossConfig, *, shape=None, affine=None,
                 field=None, angle_deg=None, cutoff=None, log_temperature=0.05,
                 box_reduce=None, target_feats=None):  # fmt: skip
    """Loss terms of one tracking result against its paired target.

    Args:
        res: a :class:`~invtract.tracking.differentiable.DiffTrackResult` tracked from
            ``target.seeds`` / ``target.directions`` (``res.seed_ids`` index the pairs).
        target: the paired target.
        config: weights and settings.
        shape, affine: FOD grid, needed for ``density``.
        field, angle_deg, cutoff: the FOD as tracked (:class:`~invtract.fod.field.FODField`;
            ``reach`` differentiates its learned rows, ``margin`` / ``centre`` read it without
            gradient) and the current thresholds (floats or 0-d tensors, may require grad),
            needed by ``margin``, ``centre`` and ``reach``.
        log_temperature: hinge softness ``tau`` of ``margin`` (log units).
        box_reduce: combines ``margin``'s batch bounds across the shards of a data-parallel
            batch (see :func:`margin_hinge`); called even when nothing was tracked here.
        target_feats: :func:`target_features` of every pair of ``target`` (leading dimension
            ``len(target)``) on ``field``, when the caller holds them (a fixed FOD: they do not
            change between iterations); None: computed here for the tracked pairs.

    Returns:
        ``{name: 0-d tensor}`` for every active term (mm; ``density`` unitless), plus
        ``"n_missing"`` (float: seeds without a tracked streamline).

    Gradients:
        Through ``res.points`` and ``res.weights`` (hence to sh, step, angle and cutoff).
    """
    active = config.active(TERMS)
    n_pairs = len(target)
    ids = res.seed_ids.long().cpu()
    S = int(ids.numel())
    out: dict = {"n_missing": float(n_pairs - S)}
    dev = res.points.device
    dt = torch.float64
    tl = target.half_length.to(dev, dt)  # [P, 2]
    missing = torch.ones(n_pairs, dtype=torch.bool)
    missing[ids] = False
    missing_len = tl.sum(-1)[missing.to(dev)].sum()
    for name in TARGET_ONLY_TERMS:  # read the targets alone: every pair, tracked or not
        if name in active:
            out[name] = _target_only_term(name, target, field, cutoff, config).to(dev)
    if S == 0:
        untracked = [k for k in active if k not in TARGET_ONLY_TERMS]
        out.update(_untracked_terms(untracked, missing_len, n_pairs, box_reduce))
        return out
    halves, counts, w = split_halves(res.points, res.lengths, res.seed_index, res.weights)
    cum = _arc(halves.detach()).to(dt)  # [S, 2, H]
    mylen = cum[..., -1]
    t_sel = tl[ids.to(dev)]
    if "mdf" in active:
        out["mdf"] = _mdf_term(halves, counts, mylen, t_sel, target, ids, missing, config)
    if "vertex" in active:
        per = vertex_distance(
            halves, counts, w, target.halves[ids].to(dev), target.counts[ids].to(dev)
        )
        out["vertex"] = per.sum() / n_pairs
    if "extent" in active:
        out["extent"] = (_extent_sum(cum, counts, t_sel, w) + missing_len) / n_pairs
    if "margin" in active or "centre" in active:
        if field is None or angle_deg is None or cutoff is None:
            raise ConfigError("margin / centre need the FOD field, angle_deg and cutoff")
        tracked = (halves, counts, cum, t_sel)
        thresholds = (field, angle_deg, cutoff, log_temperature)
        out.update(
            _threshold_terms(
                res, target, ids, tracked, active, thresholds, box_reduce, target_feats
            )
        )
    out.update(_streamline_terms(res, target, ids, config, active, shape, affine))
    return out


def _target_only_term(name, target, field, cutoff, config) -> torch.Tensor:
    """``reach``, ``tangent`` or ``replay`` (:mod:`invtract.fit.path_terms`) per pair, on every
    pair's target path."""
    from .path_terms import reach_sum, replay_sum, tangent_sum

    if field is None or cutoff is None:
        raise ConfigError(f"{name} needs the FOD field and the cutoff")
    if name == "reach":
        total = reach_sum(field, target.halves, target.counts, cutoff, config.reach_margin)
    elif name == "replay":
        total = replay_sum(field, target.halves, target.counts, cutoff, config.replay_sigma_deg)
    else:
        total = tangent_sum(field, target.halves, target.counts, cutoff)
    return total / len(target)


def _untracked_terms(active, missing_len: torch.Tensor, n_pairs: int, box_reduce) -> dict:
    """The terms of a shard in which nothing was tracked: ``extent`` is the missing target
    length (mm, per pair), every other term 0; ``margin`` still takes part in the collective
    ``box_reduce``."""
    dt = torch.float64
    if box_reduce is not None and "margin" in active:
        box_reduce(torch.zeros((), dtype=dt), torch.full((), math.inf, dtype=dt))
    zero = torch.zeros((), dtype=dt, device=missing_len.device)
    return {k: zero + (missing_len / max(n_pairs, 1) if k == "extent" else 0.0) for k in active}


def _threshold_terms(
    res, target: PairedTarget, ids, tracked, active, thresholds, box_reduce, target_feats=None
):
    """``margin`` and ``centre`` (the terms that read the FOD along the halves) of
    :func:`paired_terms`. ``tracked``: ``(halves, counts, arc lengths, target half lengths)``
    of the tracked pairs ``ids``; ``thresholds``: ``(field, angle_deg, cutoff,
    log_temperature)``; ``target_feats``: :func:`target_features` of every pair, computed once
    (indexed by ``ids``), else computed here."""
    halves, counts, cum, t_sel = tracked
    field, angle_deg, cutoff, log_temperature = thresholds
    dev = res.points.device
    if target_feats is None:
        tfeats = target_features(target, ids, field, dev)
    else:
        tfeats = {k: v[ids.to(v.device)] for k, v in target_feats.items()}
    out = {}
    if "margin" in active:
        feats = running_features(halves.detach(), counts, res.term[ids.to(res.term.device)], field)
        hinge = margin_hinge(
            feats, cum, t_sel, counts, angle_deg, cutoff, log_temperature,
            target=tfeats, box_reduce=box_reduce,
        )  # fmt: skip
        out["margin"] = hinge.to(dev) / len(target)
    if "centre" in active:
        out["centre"] = centre_term(tfeats, angle_deg, cutoff).to(dev)
    return out


def _mdf_term(halves, counts, mylen, t_sel, target: PairedTarget, ids, missing, config):
    """``mdf``: the common-extent paired MDF per pair (missing pairs: target vs seed point),
    summed and divided by the number of pairs."""
    dev, dt = halves.device, torch.float64
    ext = torch.minimum(mylen, t_sel)
    a = resample_halves(halves, counts, ext, config.n_points)
    th = target.halves[ids].to(dev)
    b = resample_halves(th, target.counts[ids].to(dev), ext, config.n_points)
    per_half = (a - b).to(dt).pow(2).sum(-1).clamp_min(1e-12).sqrt().mean(-1)  # [S, 2]
    per = (per_half * ext).sum(-1) / ext.sum(-1).clamp_min(1e-6)
    miss_pen = _missing_mdf(target, missing).to(dev, dt)
    return (per.sum() + miss_pen) / len(target)


def _extent_sum(cum, counts, t_sel, w) -> torch.Tensor:
    """Survival-weighted over- and under-reach plus the short fall of every half (mm)."""
    dev, dt = cum.device, torch.float64
    seg = torch.cat([torch.zeros_like(cum[..., :1]), cum[..., 1:] - cum[..., :-1]], -1)
    real = torch.arange(cum.shape[2], device=dev)[None, None] < counts[..., None]
    inside = (cum <= t_sel[..., None] + 1e-6) & real
    outside = (~inside) & real
    short = (t_sel - cum[..., -1]).clamp_min(0)  # [S, 2]
    s = w.to(dt)
    over = (seg * s * outside).sum((-1, -2))
    under = (seg * (1 - s) * inside).sum((-1, -2))
    return over.sum() + under.sum() + short.sum()


def _streamline_terms(res, target: PairedTarget, ids, config, active, shape, affine) -> dict:
    """The whole-streamline terms ``paired``, ``chamfer``, ``length``, ``density``."""
    out: dict = {}
    dt = torch.float64
    need_sl = [k for k in ("paired", "chamfer", "length", "density") if k in active]
    if not need_sl:
        return out
    sl = res.streamlines()
    sl = Streamlines(sl.points.to(dt), sl.lengths)
    tgt = target.streamlines.select(ids).to(dtype=dt)
    mask = res.mask
    mean_w = (res.weights * mask).sum(-1) / mask.sum(-1).clamp_min(1)
    from ..losses import chamfer_loss, length_loss, paired_loss

    if "paired" in active:
        out["paired"] = paired_loss(
            sl,
            tgt,
            config.n_points,
            coverage_weight=config.coverage_weight,
            radius_mm=config.radius_mm,
            temperature_mm=config.temperature_mm,
            weights=mean_w.to(dt),
        )
    if "chamfer" in active:
        full = target.streamlines.to(dtype=dt)
        out["chamfer"] = chamfer_loss(
            sl, full, config.n_points, temperature_mm=config.temperature_mm
        )
    if "length" in active:
        out["length"] = length_loss(sl, target.streamlines.to(dtype=dt), weights=mean_w.to(dt))
    if "density" in active:
        if shape is None or affine is None:
            raise ConfigError("the density term needs the FOD grid (shape, affine)")
        from ..losses import density_correlation, track_density

        d_a = track_density(sl, shape, affine)
        d_b = track_density(target.streamlines.to(dtype=dt), shape, affine)
        out["density"] = 1.0 - density_correlation(d_a.to(dt), d_b.to(dt))
    return out


def target_features(target: PairedTarget, ids: torch.Tensor, field, device=None) -> dict:
    """Running features (:func:`running_features`) of the target halves of pairs ``ids``,
    each half ending with its stop event (the peak search from its last vertex), plus their
    arc lengths ``cum [S, 2, H]`` (mm) and ``counts [S, 2]``."""
    dev = device if device is not None else target.halves.device
    th = target.halves[ids].to(dev)
    tc = target.counts[ids].to(dev)
    tfeats = running_features(th, tc, torch.full_like(tc, int(_term_model())), field)
    tfeats["cum"] = _arc(th.to(torch.float64))
    tfeats["counts"] = tc
    return tfeats


def centre_term(tfeats: dict, angle_deg, cutoff) -> torch.Tensor:
    """The ``centre`` term: ``sum_k sqrt((log v_k - c_k)^2 + 1e-4)`` over the learned (grad-
    requiring) angle and cutoff, ``c_k`` the log-centre of the interval
    :func:`feasible_box` reads from the target features ``tfeats``; 0 where an end is unknown."""
    dt = torch.float64
    box = feasible_box(tfeats)
    parts = []
    for v, (lo, hi) in ((angle_deg, box["angle_deg"]), (cutoff, box["cutoff"])):
        if torch.is_tensor(v) and v.requires_grad and 0 < lo < hi < math.inf:
            c = 0.5 * (math.log(lo) + math.log(hi))
            parts.append((torch.log(v.to(dt)) - c).pow(2).add(1e-4).sqrt())
    return torch.stack(parts).sum() if parts else torch.zeros((), dtype=dt)


def vertex_distance(
    halves: torch.Tensor,
    counts: torch.Tensor,
    weights: torch.Tensor | None,
    target_halves: torch.Tensor,
    target_counts: torch.Tensor,
) -> torch.Tensor:
    """Index-paired distance of each pair: vertex ``k`` of a tracked half vs vertex ``k`` of its
    target half (``k`` steps from the seed), over their common index range.

    Args:
        halves: ``[S, 2, H, 3]`` tracked halves (:func:`split_halves`, mm).
        counts: ``[S, 2]`` vertices per tracked half.
        weights: ``[S, 2, H]`` survival weights of the tracked vertices (detached here: the
            term never pays to kill a vertex), or None (all 1).
        target_halves: ``[S, 2, H', 3]`` the paired target halves, oriented alike (mm).
        target_counts: ``[S, 2]`` vertices per target half.

    Returns:
        ``[S]`` float64 weighted mean distance (mm) over vertices ``1 <= k < min(n, n')`` of
        both halves (0 for a pair with no common vertex beyond the seed).

    Gradients:
        Through ``halves`` (hence to the step and the SH coefficients), not ``weights``.
    """
    dt = torch.float64
    dev = halves.device
    H = min(int(halves.shape[2]), int(target_halves.shape[2]))
    k = torch.minimum(counts.to(dev), target_counts.to(dev))  # [S, 2]
    j = torch.arange(H, device=dev)
    m = ((j[None, None] < k[..., None]) & (j[None, None] >= 1)).to(dt)
    if weights is not None:
        m = m * weights[..., :H].detach().to(dt)
    diff = halves[:, :, :H].to(dt) - target_halves[:, :, :H].to(dev, dt)
    d = diff.pow(2).sum(-1).clamp_min(1e-12).sqrt()
    return (d * m).sum((-1, -2)) / m.sum((-1, -2)).clamp_min(1e-6)


def _term_model():
    from ..tracking.types import Term

    return Term.MODEL


@torch.no_grad()
def feasible_box(tfeats: dict) -> dict:
    """Intervals of angle and cutoff that the target halves' features allow (this batch).

    Every target vertex survived, so ``angle > a_lo`` (the largest target turn) and
    ``cutoff < c_hi`` (the smallest target amplitude). A target half whose stop event (the
    peak search from its last vertex, :func:`running_features` with every half ``stopped``)
    has amplitude ``>= c_hi`` cannot have been stopped by the cutoff; if its turn exceeds
    ``a_lo`` the angle stopped it: ``angle < turn``. One whose turn is ``<= a_lo`` cannot have
    been stopped by the angle; if its amplitude is in ``(0, c_hi)`` the cutoff stopped it:
    ``cutoff > amplitude`` (amplitude 0: it left the FOD's support or the image). Stops that
    either test could explain are ignored.

    Args:
        tfeats: :func:`running_features` of the target halves plus their ``counts``.

    Returns:
        ``{"angle_deg": (lo, hi), "cutoff": (lo, hi)}`` floats; ``hi = inf`` / ``lo = 0`` where
        no stop bounds that side.
    """
    n = tfeats["counts"].to(tfeats["max_turn"].device)
    real = n >= 2
    last = (n - 1).clamp_min(0)[..., None]
    mt = torch.gather(tfeats["max_turn"], 2, last)[..., 0]
    ma = torch.gather(tfeats["min_amp"], 2, last)[..., 0]
    if not bool(real.any()):
        return {"angle_deg": (0.0, math.inf), "cutoff": (0.0, math.inf)}
    a_lo = float(mt[real].max())
    c_hi = float(ma[real].min())
    st, sa = tfeats["stop_turn"], tfeats["stop_amp"]
    by_angle = real & (sa >= c_hi) & (st > a_lo)
    by_cut = real & (st <= a_lo) & (sa > 0) & (sa < c_hi)
    a_hi = float(st[by_angle].min()) if bool(by_angle.any()) else math.inf
    c_lo = float(sa[by_cut].max()) if bool(by_cut.any()) else 0.0
    return {"angle_deg": (a_lo, a_hi), "cutoff": (c_lo, c_hi)}


#: points per FOD sampling call of :func:`step_amplitudes` (its corners: ~90 MB at K = 45)
SAMPLE_CHUNK = 65536


@torch.no_grad()
def step_amplitudes(field, points: torch.Tensor, dirs: torch.Tensor) -> torch.Tensor:
    """``[n]`` float64 FOD amplitudes ``c(p) . Y(u)`` at ``points [n, 3]`` (mm) along unit
    ``dirs [n, 3]`` (0 where the FOD has no data): compiled
    (:func:`~invtract.tracking.adjoint_cpu.point_amplitudes`) for a float32 CPU field with
    numba, else :meth:`FODField.sample` and ``peak_amplitude`` in chunks of points (memory
    flat in length)."""
    from ..fod.peak_grad import peak_amplitude
    from ..tracking import adjoint_cpu

    if field.device.type == "cpu" and field.dtype == torch.float32 and adjoint_cpu.available():
        amp = adjoint_cpu.point_amplitudes(
            np.ascontiguousarray(field.sh_flat.detach().numpy()),
            field.nonzero_flat.numpy(), field.scanner2voxel.numpy(), field.shape, field.lmax,
            points.detach().numpy(), dirs.detach().numpy(), threads=torch.get_num_threads(),
        )  # fmt: skip
        return torch.from_numpy(amp)
    out = torch.empty(points.shape[0], dtype=torch.float64, device=points.device)
    for a in range(0, points.shape[0], SAMPLE_CHUNK):
        b = min(points.shape[0], a + SAMPLE_CHUNK)
        c, _ = field.sample(points[a:b])
        out[a:b] = peak_amplitude(c, dirs[a:b], field.lmax).to(torch.float64)
    return out


@torch.no_grad()
def running_features(
    halves: torch.Tensor, counts: torch.Tensor, term: torch.Tensor, field
) -> dict:
    """Running max turn and min amplitude along each half, and the event that stopped it.

    Vertex ``j >= 1`` of a half was reached by a step from vertex ``j-1`` along
    ``u_{j-1} = normalise(p_j - p_{j-1})`` (SD_Stream: the FOD peak at ``p_{j-1}``); its amplitude
    is ``A_j = FOD(p_{j-1}) . Y(u_{j-1})`` and its turn ``theta_j = angle(u_{j-2}, u_{j-1})``
    (``theta_1 = 0``: the first step leaves along the seed peak). The *stop event* of a half
    is the rejected step from its last vertex: the peak search from ``u_{n-2}`` at ``p_{n-1}``
    gives its amplitude and turn.

    Args:
        halves: ``[S, 2, H, 3]`` from :func:`split_halves` (detached, mm).
        counts: ``[S, 2]`` vertices per half.
        term: ``[S, 2]`` :class:`~invtract.tracking.types.Term` of each half.
        field: the :class:`~invtract.fod.field.FODField` that was tracked.

    Returns:
        dict of float64 tensors: ``max_turn`` / ``min_amp`` ``[S, 2, H]`` (degrees / FOD
        amplitude, running from the seed), ``stop_turn`` / ``stop_amp`` ``[S, 2]`` (running
        values including the stop event) and ``stopped`` ``[S, 2]`` bool (the half ended on
        the cutoff or the angle test and has a stop event).
    """
    from ..tracking.types import Term

    S, _, H, _ = halves.shape
    dev = halves.device
    h = halves.to(field.dtype)
    d = h[..., 1:, :] - h[..., :-1, :]  # [S, 2, H-1, 3]
    nrm = d.norm(dim=-1, keepdim=True)
    steps = counts[..., None].to(dev) - 1  # valid step directions: j < n-1
    jj = torch.arange(max(H - 1, 0), device=dev)
    valid = jj[None, None] < steps
    u = torch.where(valid[..., None], d / nrm.clamp_min(1e-12), torch.zeros_like(d))
    # amplitude of each step (at its start vertex, along its direction)
    amp = torch.zeros(S, 2, max(H - 1, 0), dtype=torch.float64, device=dev)
    if valid.any():
        amp[valid] = step_amplitudes(field, h[..., :-1, :][valid], u[valid])
    cos = (u[..., 1:, :].double() * u[..., :-1, :].double()).sum(-1).clamp(-1, 1)
    turn = torch.rad2deg(torch.arccos(cos))  # step j+1 vs step j
    turn = torch.where(valid[..., 1:], turn, torch.zeros_like(turn))
    turn = torch.cat([torch.zeros_like(amp[..., :1]), turn], -1)  # per step; step 0: 0
    big = torch.full_like(amp, math.inf)
    amp_v = torch.where(valid, amp, big)
    # per vertex j (j >= 1 <- step j-1); vertex 0: the seed (amplitude of step 0, no turn)
    max_turn = torch.cat([torch.zeros_like(turn[..., :1]), turn.cummax(-1).values], -1)
    min_amp = torch.cat([amp_v[..., :1], amp_v.cummin(-1).values], -1)
    # padding repeats the last real value
    n = counts.to(dev).long()
    last = (n - 1).clamp_min(0)
    idx = torch.minimum(torch.arange(H, device=dev)[None, None], last[..., None])
    max_turn = torch.gather(max_turn, 2, idx)
    min_amp = torch.gather(min_amp, 2, idx)
    # stop event from the last vertex
    stopped = (term.to(dev) == int(Term.MODEL)) | (term.to(dev) == int(Term.HIGH_CURVATURE))
    stopped &= n >= 2
    stop_turn, stop_amp = _stop_event(h, u, last, stopped, max_turn, min_amp, field)
    return {
        "max_turn": max_turn,
        "min_amp": min_amp,
        "stop_turn": stop_turn,
        "stop_amp": stop_amp,
        "stopped": stopped,
    }


def _stop_event(h, u, last, stopped, max_turn, min_amp, field):
    """``(stop_turn, stop_amp)`` ``[S, 2]`` of :func:`running_features`: the running values at
    each half's last vertex ``last`` ``[S, 2]``, updated for the ``stopped`` halves with the
    rejected step (the peak search from the last direction ``u`` at the last vertex of ``h``)."""
    stop_turn = torch.gather(max_turn, 2, last[..., None])[..., 0].clone()
    stop_amp = torch.gather(min_amp, 2, last[..., None])[..., 0].clone()
    if not stopped.any():
        return stop_turn, stop_amp
    sel = torch.nonzero(stopped, as_tuple=False)
    si, hi = sel[:, 0], sel[:, 1]
    k = last[si, hi]
    p_last = h[si, hi, k]
    u_prev = u[si, hi, (k - 1).clamp_min(0)]
    c, ok = field.sample(p_last)
    a_new, u_new = field.peak(c, u_prev)
    a_new = torch.where(ok & torch.isfinite(a_new), a_new, torch.zeros_like(a_new))
    u_new = torch.nan_to_num(u_new, nan=0.0)
    cs = (u_prev.double() * u_new.double()).sum(-1).clamp(-1, 1)
    t_new = torch.rad2deg(torch.arccos(cs))
    stop_turn[si, hi] = torch.maximum(stop_turn[si, hi], t_new)
    stop_amp[si, hi] = torch.minimum(stop_amp[si, hi], a_new.to(torch.float64))
    return stop_turn, stop_amp


def margin_hinge(
    feats: dict,
    cum,
    target_len,
    counts,
    angle_deg,
    cutoff,
    tau,
    target: dict | None = None,
    box_reduce=None,
) -> torch.Tensor:
    """Sum over halves of the ``margin`` hinge (mm x log units; see the module docstring).

    With ``a_j = log angle - log M_j`` and ``c_j = log m_j - log cutoff`` (a vertex survives the
    hard test iff both are > 0) and ``h(x) = tau softplus(x / tau)`` (~ ``max(x, 0)``):

    * vertex within the target's extent (must survive both tests): ``d (h(-a_j) + h(-c_j))``;
    * a half that runs beyond the target: its first vertex beyond the target's end must fail
      a test (margins are monotone along a half, so the rest then fail too). Which test can
      kill it is read from the vertices that must survive (this batch): the angle only if
      ``M`` there exceeds every inside turn, the cutoff only if ``m`` is below every inside
      amplitude. The overshoot length is charged ``h(a)`` or ``h(c)`` for the test that can
      kill it, ``min(h(a), h(c))`` if both can (the nearer test; zero once either kills it),
      nothing if neither can;
    * a half stopped short of the target: the target's own vertices beyond the tracked end
      must survive, ``d (h(-a) + h(-c))`` with the target's running features (``target``;
      without it, the half's missing length times the violation of its rejected step).

    Args:
        feats: :func:`running_features` of the tracked halves.
        cum: ``[S, 2, H]`` arc length of each tracked vertex from the seed (mm).
        target_len: ``[S, 2]`` arc length of the paired target halves (mm).
        counts: ``[S, 2]`` vertices per tracked half.
        angle_deg, cutoff: current thresholds (0-d tensors may require grad).
        tau: hinge softness (log units).
        target: :func:`running_features` of the paired target halves plus ``cum`` and
            ``counts`` (as for the tracked ones).
        box_reduce: ``box_reduce(a_lo, c_hi) -> (a_lo, c_hi)``: combines this batch's bounds
            (the largest inside turn, the smallest inside amplitude, 0-d tensors) with those
            of the other shards of a data-parallel batch (max / min); None: this batch alone.

    Returns:
        0-d float64 tensor (gradient to ``angle_deg`` and ``cutoff``).
    """
    tau = float(tau[0] if isinstance(tau, (tuple, list)) else tau)
    dt = torch.float64
    dev = cum.device
    la = torch.log(torch.as_tensor(angle_deg, dtype=dt)).to(dev)
    lc = torch.log(torch.as_tensor(cutoff, dtype=dt)).to(dev)

    def h(x):
        return tau * torch.nn.functional.softplus(x / tau)

    def margins(turn, amp):
        lt = torch.log(turn.to(dev, dt).clamp_min(1e-3))
        lm = torch.log(torch.nan_to_num(amp.to(dev, dt), nan=1e-6, posinf=1e6).clamp_min(1e-6))
        return la - lt, lm - lc

    cum = cum.to(dt)
    seg = torch.cat([torch.zeros_like(cum[..., :1]), cum[..., 1:] - cum[..., :-1]], -1)
    H = cum.shape[-1]
    real = torch.arange(H, device=dev)[None, None] < counts.to(dev)[..., None]
    tl = target_len.to(dev, dt)
    inside = (cum <= tl[..., None] + 1e-6) & real
    outside = (~inside) & real
    a, c = margins(feats["max_turn"], feats["min_amp"])
    under = (seg * (h(-a) + h(-c)) * inside).sum()
    early, beyond_t = _early_charge(feats, target, cum, tl, h, margins)
    over = _overshoot(feats, a, c, h, cum, tl, inside, outside, target, beyond_t, box_reduce)
    return under + over + early


def _early_charge(feats, target, cum, tl, h, margins):
    """``margin``'s charge on halves stopped short of their target (see :func:`margin_hinge`):
    ``(charge, beyond)``, ``beyond`` ``[S, 2, Ht]`` marking the target vertices past the
    tracked end (None without ``target``). ``h`` is the hinge, ``margins(turn, amp)`` the log
    margins ``(a, c)``."""
    dev, dt = cum.device, torch.float64
    if target is None:
        short = (tl - cum[..., -1]).clamp_min(0)
        stopped = feats["stopped"].to(dev)
        a_s, c_s = margins(feats["stop_turn"], feats["stop_amp"])
        return (short * (h(-a_s) + h(-c_s)) * stopped).sum(), None
    tcum = target["cum"].to(dev, dt)
    tseg = torch.cat([torch.zeros_like(tcum[..., :1]), tcum[..., 1:] - tcum[..., :-1]], -1)
    treal = torch.arange(tcum.shape[-1], device=dev)[None, None] < target["counts"][..., None]
    beyond = treal & (tcum > cum[..., -1:] + 1e-6)
    ta, tc = margins(target["max_turn"], target["min_amp"])
    return (tseg * (h(-ta) + h(-tc)) * beyond).sum(), beyond


def _overshoot(feats, a, c, h, cum, tl, inside, outside, target, beyond, box_reduce):
    """``margin``'s overshoot charge: the overshoot length of every half that runs beyond its
    target times the hinge of the test that can kill its first vertex past the target's end
    (see :func:`margin_hinge`)."""
    dev, dt = cum.device, torch.float64
    H = cum.shape[-1]
    # the feasible box left by the vertices that must survive: angle > every inside turn,
    # cutoff < every inside amplitude (this batch)
    with torch.no_grad():
        mt = feats["max_turn"].to(dev, dt)
        ma = feats["min_amp"].to(dev, dt)
        a_lo = torch.where(inside, mt, torch.zeros_like(mt)).max()
        c_hi = torch.where(inside, ma, torch.full_like(ma, math.inf)).min()
        if target is not None:
            tt = target["max_turn"].to(dev, dt)
            tm = target["min_amp"].to(dev, dt)
            a_lo = torch.maximum(a_lo, torch.where(beyond, tt, torch.zeros_like(tt)).max())
            c_hi = torch.minimum(
                c_hi, torch.where(beyond, tm, torch.full_like(tm, math.inf)).min()
            )
        if box_reduce is not None:
            a_lo, c_hi = box_reduce(a_lo, c_hi)
        has_over = outside.any(-1)  # [S, 2]
        first = (
            torch.where(outside, torch.arange(H, device=dev), H).min(-1).values.clamp_max(H - 1)
        )
        m_first = torch.gather(mt, 2, first[..., None])[..., 0]
        a_first = torch.gather(ma, 2, first[..., None])[..., 0]
        # 5% slack: features of the tracked and the target path differ slightly while the
        # step is not yet fitted (turns per step scale with the step)
        can_a = has_over & (m_first > 0.95 * a_lo)
        can_c = has_over & (a_first < 1.05 * c_hi)
        over_len = (cum[..., -1] - tl).clamp_min(0)
    af = torch.gather(a, 2, first[..., None])[..., 0]
    cf = torch.gather(c, 2, first[..., None])[..., 0]
    pen = torch.where(
        can_a & can_c,
        torch.minimum(h(af), h(cf)),
        torch.where(can_a, h(af), torch.where(can_c, h(cf), torch.zeros_like(af))),
    )
    over = (over_len * pen).sum()
    return over


def _missing_mdf(target: PairedTarget, missing: torch.Tensor) -> torch.Tensor:
    """Sum over missing pairs of the mean distance of the target's vertices to its seed."""
    if not bool(missing.any()):
        return torch.zeros((), dtype=torch.float64)
    h = target.halves[missing].to(torch.float64)
    c = target.counts[missing]
    H = h.shape[2]
    real = (torch.arange(H)[None, None] < c[..., None]).to(torch.float64)
    d = (h - target.seeds[missing].to(torch.float64)[:, None, None]).norm(dim=-1)
    return ((d * real).sum((-1, -2)) / real.sum((-1, -2)).clamp_min(1)).sum()


# ----------------------------------------------------------------------------------------------
# FOD regularisers
# ----------------------------------------------------------------------------------------------
def fibonacci_sphere(n: int, dtype=torch.float64) -> torch.Tensor:
    """``[n, 3]`` near-uniform unit directions (Fibonacci lattice, one hemisphere pair)."""
    i = torch.arange(n, dtype=torch.float64) + 0.5
    z = 1.0 - 2.0 * i / n
    r = (1.0 - z * z).clamp_min(0).sqrt()
    phi = i * math.pi * (3.0 - math.sqrt(5.0))
    return torch.stack([r * torch.cos(phi), r * torch.sin(phi), z], -1).to(dtype)


def fod_priors(
    sh_learn: torch.Tensor,
    delta: torch.Tensor,
    voxels: torch.Tensor,
    shape,
    config: LossConfig,
    basis: torch.Tensor | None = None,
) -> dict:
    """FOD regularisers on the learned voxels.

    Args:
        sh_learn: ``[V, K]`` current coefficients of the learned voxels.
        delta: ``[V, K]`` change from the starting FOD.
        voxels: ``[V]`` flat voxel indices (C order of ``shape``).
        shape: the grid ``(X, Y, Z)``.
        config: which terms are active (``nonneg``, ``smooth``, ``prior``).
        basis: ``[M, K]`` SH basis on the dense sphere (computed when None).

    Returns:
        ``{name: 0-d tensor}``: ``nonneg`` = mean over voxels of the mean squared negative
        amplitude; ``smooth`` = mean squared difference of ``delta`` between learned
        6-neighbours; ``prior`` = mean squared ``delta`` per voxel (summed over coefficients).

    Gradients:
        Through ``sh_learn`` and ``delta``.
    """
    out = {}
    active = config.active(FOD_TERMS)
    if "nonneg" in active:
        if basis is None:
            from ..fod.sh import lmax_from_n, sh_basis

            basis = sh_basis(
                fibonacci_sphere(config.sphere_points), lmax_from_n(sh_learn.shape[1])
            )
        amp = sh_learn.to(basis.dtype) @ basis.T
        out["nonneg"] = torch.relu(-amp).pow(2).mean()
    if "smooth" in active:
        X, Y, Z = (int(s) for s in shape)
        lookup = torch.full((X * Y * Z,), -1, dtype=torch.long)
        lookup[voxels.cpu()] = torch.arange(voxels.numel())
        ijk = np.stack(np.unravel_index(voxels.cpu().numpy(), (X, Y, Z)), -1)
        diffs = []
        for ax in range(3):
            nb = ijk.copy()
            nb[:, ax] += 1
            ok = nb[:, ax] < (X, Y, Z)[ax]
            flat = np.ravel_multi_index(tuple(np.where(ok[:, None], nb, 0).T), (X, Y, Z))
            j = lookup[torch.as_tensor(flat)]
            good = torch.as_tensor(ok) & (j >= 0)
            a = torch.nonzero(good).flatten()
            if a.numel():
                diffs.append((delta[a] - delta[j[a].to(delta.device)]).pow(2).sum(-1))
        out["smooth"] = torch.cat(diffs).mean() if diffs else delta.sum() * 0.0
    if "prior" in active:
        out["prior"] = delta.pow(2).sum(-1).mean()
    return out


def soft_temperature(t_amp: float, t_angle_deg: float, angle_deg: float) -> tuple[float, float]:
    """``(T_amplitude, T_cos)`` for :func:`track_differentiable` from a temperature in degrees.

    The cosine test ``u.u' >= cos(angle)`` is softened with ``T_cos = T_angle (rad) x
    sin(angle)``, i.e. a fixed softness in degrees whatever the angle (the cosine moves
    ~60x less per degree at 1 degree than at 60).
    """
    s = math.sin(math.radians(max(min(float(angle_deg), 179.0), 0.05)))
    return float(t_amp), max(math.radians(float(t_angle_deg)) * s, 1e-9)
