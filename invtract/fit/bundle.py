"""The bundle fit as a :class:`~invtract.fit.trainer.Problem`: data, loss and evaluation.

Each iteration tracks a minibatch of training seeds (drawn from a generator seeded with
``(seed, iteration)``, the same on every rank; a data-parallel rank tracks its contiguous
share) with :func:`~invtract.tracking.differentiable.track_differentiable`, scores it with
:func:`~invtract.fit.objective.paired_terms` and adds the parameter terms (``centre`` on the
whole batch's target, ``anchor``, the FOD priors, the diffusion-signal term ``signal`` of
``--dwi`` (:class:`~invtract.fit.signal_term.SignalTerm`, weighted by ``[loss.weights] signal``),
:meth:`Problem.add_term` terms) once.

The data terms of :data:`SHARDABLE_TERMS` (``mdf``, ``vertex``, ``extent``, ``margin``,
``reach``, ``tangent``) are sums over pairs divided by the batch size: a rank's share is its sum
divided by the *batch's* size, so the shares add up to the single-process loss. ``paired``,
``chamfer``, ``length`` and ``density`` are not such sums and are refused in a data-parallel
fit.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch

from ..errors import ConfigError
from ..streamlines import Streamlines
from .distributed import SINGLE, World
from .objective import (
    FOD_TERMS,
    SIGNAL_TERMS,
    TERMS,
    LossConfig,
    PairedTarget,
    centre_term,
    fod_priors,
    paired_terms,
    target_features,
)
from .reparam import LearnedState
from .trainer import Problem, StepOutput

__all__ = ["BundleProblem", "SHARDABLE_TERMS", "split_indices", "fod_overlap"]

#: target pairs per call of target_features when they are computed once (a fixed FOD)
FEATURE_CHUNK = 64

#: data terms that are sums over pairs (a data-parallel fit may use only these)
SHARDABLE_TERMS = ("mdf", "vertex", "extent", "margin", "reach", "tangent", "replay")


def split_indices(n: int, frac: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(train, heldout)`` sorted indices of ``n`` pairs; ``round(frac n)`` held out (at
    most ``n - 1``), drawn with a generator seeded with ``seed``."""
    g = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(n, generator=g).numpy()
    n_held = min(int(round(frac * n)) if n > 1 else 0, n - 1)
    return np.sort(perm[n_held:]), np.sort(perm[:n_held])


def fod_overlap(sh0: torch.Tensor, affine, points: torch.Tensor) -> int:
    """How many of ``points [P, 3]`` (scanner mm) lie in a voxel of the FOD grid whose
    coefficients are finite and not all zero."""
    shape = np.asarray(sh0.shape[:3])
    inv = np.linalg.inv(np.asarray(affine, np.float64))
    pts = points.detach().cpu().numpy().astype(np.float64)
    vox = np.rint(pts @ inv[:3, :3].T + inv[:3, 3]).astype(np.int64)
    inside = np.all((vox >= 0) & (vox < shape), 1)
    if not inside.any():
        return 0
    idx = torch.as_tensor(vox[inside])
    c = sh0[idx[:, 0], idx[:, 1], idx[:, 2]]
    good = torch.isfinite(c).all(-1) & (c != 0).any(-1)
    return int(good.sum())


class BundleProblem(Problem):
    """A paired target bundle: tracked streamline ``i`` is compared with target ``i``.

    Args:
        cfg: the validated :class:`~invtract.fit.optimise.FitConfig`.
        fod: the starting FOD, an :class:`~invtract.fod.field.FODField` of float32 C-ordered
            coefficients on the fit's device (:func:`~invtract.fit.optimise.fod_field`): held
            once, the learned state and every tracking call view it. When ``sh`` is learned,
            the fit owns these coefficients: the learned rows are written into them in place
            (:meth:`~invtract.fod.field.FODField.with_rows`) at each evaluation.
        resolved: the starting tracking parameters, tckgen's defaults resolved.
        paired: the whole paired target; ``train_idx`` / ``held_idx`` split it.
        voxels: ``[V]`` flat indices of the learned voxels (``sh``), else None.
        signal: the diffusion-signal term, ``signal(sh [V, K], voxels [V]) -> 0-d tensor``
            (:class:`~invtract.fit.signal_term.SignalTerm`), or None; a parameter term
            ``signal`` of the learned voxels. Its ``gradient_hook(sh_start [V, K])``, when it
            returns a hook, is registered on the learned change (``--fod-updates rotation``).
    """

    def __init__(self, cfg, fod, resolved, paired: PairedTarget, train_idx, held_idx,
                 voxels=None, signal=None, world: World = SINGLE):  # fmt: skip
        super().__init__()
        self.cfg, self.config = cfg, cfg.raw
        self.fod, self.resolved = fod, resolved
        self.affine = fod.voxel2scanner
        self.dev = fod.device
        sh0 = fod.sh
        start = {k: getattr(resolved, k) for k in ("step_mm", "angle_deg", "cutoff")}
        self.state = LearnedState(start, cfg.learn, cfg.bounds, cfg.space, sh0, voxels)
        self.train_idx, self.held_idx = train_idx, held_idx
        self.train, self.held = paired.subset(train_idx), paired.subset(held_idx)
        self.data_cfg = _without(cfg.loss, ("centre",))
        self.basis = self._basis(sh0.shape[-1])
        self.signal = self._signal(signal, world)
        self.fixed_field = None
        self._tfeats: dict = {}
        self._selected = None  # (values, selection loss) last computed
        self.running = bool({"margin", "centre"} & set(cfg.loss.active(TERMS)))
        if self.state.delta is None:  # the FOD is fixed: the one field for all
            self.fixed_field = fod

    def _signal(self, signal, world: World):
        """``signal`` after checking it against the config, its coupling weight chosen and the
        coupled start applied (on rank 0 alone under ``--nproc``: :meth:`World.on_main`); its
        gradient hook registered."""
        from .signal_term import check_signal_config, parse_spatial

        check_signal_config(self.cfg.loss.weights, self.cfg.learn, signal is not None)
        st = self.state
        if signal is None or st.delta is None:
            return None
        signal.spatial = parse_spatial(self.config.get("signal", {}).get("spatial", 0.0))
        coupled = self.config.get("signal", {}).get("start", "csd") == "coupled"  # docs/csd.md
        change = signal.adopt(
            world.on_main(lambda: signal.prepare(st.sh0_rows, st.voxels, coupled))
        )
        if change is not None:
            with torch.no_grad():
                st.delta.add_(change.to(st.delta))
        hook = getattr(signal, "gradient_hook", lambda _: None)(st.sh0_rows)
        if hook is not None:
            st.delta.register_hook(hook)
        return signal

    def _basis(self, K: int):
        if self.state.delta is None or "nonneg" not in self.cfg.loss.active(FOD_TERMS):
            return None
        from ..fod.sh import lmax_from_n, sh_basis
        from .objective import fibonacci_sphere

        return sh_basis(fibonacci_sphere(self.cfg.loss.sphere_points), lmax_from_n(K)).to(self.dev)

    def _fod_of(self, grad: bool):
        """The current FOD: the fixed field itself when the FOD is not learned, else the
        field with the learned rows (written into the fit's coefficients in place;
        differentiable in the learned change when ``grad``)."""
        if self.fixed_field is not None:
            return self.fixed_field
        st = self.state
        rows = st.rows()
        return self.fod.with_rows(st.voxels, rows if grad else rows.detach())

    # -- checks ---------------------------------------------------------------------------------
    def check(self, world: World) -> None:
        """One-line errors before iterating: no overlap of target and FOD, no trackable seed,
        or a data term that cannot be sharded in a data-parallel fit."""
        if world.size > 1:
            bad = sorted(set(self.cfg.loss.active(TERMS)) - set(SHARDABLE_TERMS) - {"centre"})
            if bad:
                raise ConfigError(f"--nproc > 1 supports the terms {SHARDABLE_TERMS}; not {bad}")
        pts = self.train.streamlines.points
        if fod_overlap(self.fod.sh, self.affine, pts) == 0:
            lo, hi = pts.min(0).values.tolist(), pts.max(0).values.tolist()
            raise ConfigError(
                "the target bundle and the FOD do not overlap: no target vertex lies in a voxel "
                f"with a finite, non-zero FOD (target spans {_box(lo, hi)} mm)"
            )
        loss, n = self._loss_on(self.train, len(self.train) - 1, world, grad=False, final=True)
        self._selected = (self._state_key(), loss)  # the starting values' selection loss
        if n == 0:
            v = self.state.floats()
            raise ConfigError(
                f"no target streamline can be tracked from its seed at the starting parameters "
                f"(step {v['step_mm']:.4g} mm, angle {v['angle_deg']:.4g} deg, cutoff "
                f"{v['cutoff']:.4g}): check the FOD, the seeds and --cutoff"
            )

    # -- losses ---------------------------------------------------------------------------------
    def _track(self, sub: PairedTarget, it: int, vals: Mapping, fod):
        from ..tracking.differentiable import track_differentiable

        t_amp, t_cos, _, _ = self.cfg.temperatures(
            it, float(torch.as_tensor(vals["angle_deg"]).detach())
        )
        return track_differentiable(
            fod, sub.seeds.to(self.dev), sub.directions.to(self.dev), self.resolved,
            step_mm=vals["step_mm"], angle_deg=vals["angle_deg"], cutoff=vals["cutoff"],
            temperature=(t_amp, t_cos), path=self.cfg.path,
        )  # fmt: skip

    def _target_feats(self, whole: PairedTarget, rows) -> dict | None:
        """:func:`~invtract.fit.objective.target_features` of the pairs ``rows`` of ``whole``
        (``self.train`` or ``self.held``): with a fixed FOD, computed once per split (in chunks
        of pairs) and indexed; None when the FOD is learned or no term needs them."""
        if self.fixed_field is None or not self.running:
            return None
        name = "train" if whole is self.train else "held"
        if name not in self._tfeats:
            parts = [
                target_features(
                    whole,
                    torch.arange(a, min(len(whole), a + FEATURE_CHUNK)),
                    self.fixed_field,
                    self.dev,
                )  # fmt: skip
                for a in range(0, len(whole), FEATURE_CHUNK)
            ]
            self._tfeats[name] = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        idx = torch.as_tensor(np.asarray(rows), dtype=torch.long)
        return {k: v[idx.to(v.device)] for k, v in self._tfeats[name].items()}

    def _data_terms(self, sub: PairedTarget, it: int, vals, n_batch: int, grad: bool,
                    world: World, feats=None):  # fmt: skip
        """This shard's data terms (scaled to the batch), its tracking result and the FOD
        tracked (``feats``: the target features of ``sub``'s pairs, see
        :meth:`_target_feats`)."""
        with torch.set_grad_enabled(grad):
            fod = self._fod_of(grad)
            res = self._track(sub, it, vals, fod)
            terms = paired_terms(
                res, sub, self.data_cfg, shape=self.state.shape[:3], affine=self.affine,
                field=fod, angle_deg=vals["angle_deg"],
                cutoff=vals["cutoff"], log_temperature=self.cfg.margin_temperature(it),
                box_reduce=world.box if world.size > 1 else None, target_feats=feats,
            )  # fmt: skip
        n_missing = terms.pop("n_missing", 0.0)
        share = len(sub) / max(n_batch, 1)
        return {k: v * share for k, v in terms.items()}, n_missing, res, fod

    def _loss_on(self, target: PairedTarget, it: int, world: World, grad: bool, final=False):
        """``(loss, n_tracked)`` of the data terms on all of ``target`` (no gradient), summed
        over ranks; ``final``: at the last iteration's temperatures."""
        rows = world.shard(len(target))
        mine = target.subset(rows)
        it = self.cfg.iterations - 1 if final else it
        vals = self.state.values(detach=True)
        terms, _, res, _ = self._data_terms(
            mine, it, vals, len(target), grad, world, self._target_feats(target, rows)
        )
        w = self.cfg.loss.weights
        part = {"loss": float(sum(w.get(k, 0.0) * float(v) for k, v in terms.items()))}
        part["n"] = float(res.seed_ids.numel())
        tot = world.sum(part)
        return tot["loss"], int(tot["n"])

    def _batch(self, it: int) -> np.ndarray:
        g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + it)
        n = len(self.train)
        return torch.randperm(n, generator=g)[: min(self.cfg.seeds_per_iteration, n)].sort()[0]

    def training_step(self, it: int, world: World) -> StepOutput:
        batch = self._batch(it).numpy()
        mine = batch[world.shard(len(batch))]
        sub = self.train.subset(mine)
        vals = self.state.values()
        terms, n_missing, res, fod = self._data_terms(
            sub, it, vals, len(batch), True, world, self._target_feats(self.train, mine)
        )
        ctx = {"iteration": it, "values": vals, "result": res, "world": world}
        terms.update(self._param_terms(batch, res, mine, vals, world, fod.detach()))
        terms.update(self._extra(ctx))
        w = self.cfg.loss.weights
        total = sum(w.get(k, 0.0) * v for k, v in terms.items() if k not in self.extra_terms)
        total = total + sum(v for k, v in terms.items() if k in self.extra_terms)
        if not torch.is_tensor(total):
            total = torch.tensor(float(total), dtype=torch.float64)
        n_pts = float(res.lengths.sum()) if len(res.lengths) else 0.0
        return StepOutput(
            total=total,
            terms={k: float(torch.as_tensor(v).detach()) for k, v in terms.items()},
            counts={
                "tracking/n_missing": n_missing,
                "tracking/n_seeds": float(len(sub)),
                "points": n_pts,
                "tracked": float(res.seed_ids.numel()),
            },  # fmt: skip
            n_tracked=int(res.seed_ids.numel()),
            record=self._temperature_record(
                it, float(torch.as_tensor(vals["angle_deg"]).detach())
            ),
            aux=(sub, res),
        )

    def _param_terms(self, batch, res, mine, vals, world: World, field) -> dict:
        """``centre`` (on the whole batch's tracked targets, sampling the detached FOD
        ``field`` of this iteration), ``anchor`` and the FOD priors: computed on rank 0 only
        (they do not depend on the shard)."""
        out = {}
        active = self.cfg.loss.active(TERMS + ("anchor",))
        if "centre" in active:
            tracked = torch.zeros(len(batch), dtype=torch.float64)
            at = np.searchsorted(batch, mine[res.seed_ids.cpu().numpy()])  # batch is sorted
            tracked[torch.as_tensor(at, dtype=torch.long)] = 1.0
            world.all_reduce_([tracked])
            if world.is_main:
                ids = torch.as_tensor(np.flatnonzero(tracked.numpy() > 0))
                feats = self._target_feats(self.train, batch[ids.numpy()])
                if feats is None:
                    feats = target_features(self.train.subset(batch), ids, field, self.dev)
                out["centre"] = centre_term(feats, vals["angle_deg"], vals["cutoff"]).to(self.dev)
        if not world.is_main:
            return out
        z = self.state.z
        if "anchor" in active:
            anc = [
                (torch.log(vals[k]) - math.log(self.state.start[k])).pow(2).add(1e-4).sqrt()
                for k in ("angle_deg", "cutoff")
                if k in z
            ]
            if anc:
                out["anchor"] = torch.stack(anc).sum()
        if self.state.delta is not None:
            st = self.state
            sh_l = st.rows()
            out.update(
                fod_priors(sh_l, st.delta, st.voxels, st.shape[:3], self.cfg.loss, self.basis)
            )
            if self.signal is not None and "signal" in self.cfg.loss.active(SIGNAL_TERMS):
                out["signal"] = self.signal(sh_l, st.voxels)
        return out

    def summarise(self, counts: dict) -> dict:
        """``tracking/mean_points`` (vertices per tracked streamline) from the summed counts."""
        out = dict(counts)
        pts, n = out.pop("points", 0.0), out.pop("tracked", 0.0)
        out["tracking/mean_points"] = pts / n if n else 0.0
        return out

    def _temperature_record(self, it: int, angle: float) -> dict:
        _, t_cos, ta, tdeg = self.cfg.temperatures(it, angle)
        return {
            "temperature/amplitude": ta, "temperature/angle_deg": tdeg, "temperature/cos": t_cos,
            "temperature/margin": self.cfg.margin_temperature(it),
        }  # fmt: skip

    def _state_key(self):
        """The learned values as floats (None when the FOD is learned: no reuse)."""
        return None if self.state.delta is not None else tuple(self.state.floats().items())

    def selection_loss(self, world: World) -> float:
        """Data loss of the current values on the whole training set (no gradient), at the
        last iteration's temperatures: comparable across iterations; plus the weighted signal
        term with ``--dwi`` (every rank holds the same term and FOD: no communication). The data
        loss is reused when the values have not changed since it was last computed
        (:meth:`check` computes the start's)."""
        key = self._state_key()
        if key is not None and self._selected is not None and self._selected[0] == key:
            return self._selected[1] + self._signal_sel()
        loss = self._loss_on(self.train, 0, world, grad=False, final=True)[0]
        self._selected = (key, loss)
        return loss + self._signal_sel()

    def _signal_sel(self) -> float:
        """``[loss.weights] signal`` x the signal term of the current FOD (0 without one)."""
        st, w = self.state, self.cfg.loss.weights.get("signal", 0.0)
        if self.signal is None or st.delta is None or not w:
            return 0.0
        with torch.no_grad():
            return w * float(self.signal(st.rows(), st.voxels))

    def evaluate(self, it: int, world: World) -> dict:
        """Held-out data terms (``loss/heldout/*``) at iteration ``it``'s temperatures."""
        if len(self.held) == 0:
            return {}
        rows = world.shard(len(self.held))
        mine = self.held.subset(rows)
        vals = self.state.values(detach=True)
        terms, n_missing, _, _ = self._data_terms(
            mine, it, vals, len(self.held), False, world, self._target_feats(self.held, rows)
        )
        part = {k: float(v) for k, v in terms.items()}
        w = self.cfg.loss.weights
        part["total"] = sum(w.get(k, 0.0) * v for k, v in part.items())
        part["n_missing"] = n_missing
        return {f"loss/heldout/{k}": v for k, v in world.sum(part).items()}

    def log_images(self, logger, it: int, out: StepOutput) -> None:
        from .runlog import bundle_figure

        sub, res = out.aux
        tracked = Streamlines(res.points.detach()[res.mask].cpu(), res.lengths.cpu()).to_list()
        target = [np.asarray(s) for s in sub.streamlines.to_list()]
        logger.figure("bundle/projection", bundle_figure(target, tracked, f"iteration {it}"), it)
        logger.figure("bundle/density", bundle_figure(target, tracked, density=True), it)
        delta = self.state.delta
        if delta is not None:
            logger.histogram("fod/delta", delta.detach().cpu().numpy().ravel(), it)
            logger.histogram("fod/delta_norm", delta.detach().norm(dim=-1).cpu().numpy(), it)


def _without(loss: LossConfig, names) -> LossConfig:
    import dataclasses

    return dataclasses.replace(
        loss, weights={k: v for k, v in loss.weights.items() if k not in names}
    )


def _box(lo, hi) -> str:
    return " x ".join(f"[{a:.1f}, {b:.1f}]" for a, b in zip(lo, hi))
