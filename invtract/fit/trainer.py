"""One training loop for every fit: :class:`Trainer` runs a :class:`Problem`.

The split follows PyTorch Lightning's Trainer / LightningModule: the *Problem* (the bundle fit
of :mod:`invtract.fit.optimise`, the connectome fit of :mod:`invtract.fit.connectome_fit`)
owns its data, its learnable state (:class:`~invtract.fit.reparam.LearnedState`), its loss and
its evaluation; the *Trainer* owns everything around them, once:

* the optimisers (:data:`~invtract.fit.reparam.OPTIMIZERS`: Signum, Adam, SGD for the
  tracking parameters, with the geometric ``lr`` -> ``lr_end`` schedule; ``lr_sh`` for the SH
  change), gradient clipping, ``alternate`` mode, projection onto the bounds;
* the SH spike guard (``[optimizer] sh_spike``, default 5): an SH gradient whose norm is above
  that multiple of the median norm of the previous iterations is dropped (``sh_spike_mode =
  "skip"``) or scaled to that bound (``"clip"``). Such spikes come from the tracking gradient
  through a near-flat peak (a Riemannian Hessian eigenvalue near 0: the peak's exact Jacobian
  is huge and valid only in a tiny region). Adam takes a spike's sign for many steps and then
  nearly freezes those coefficients, so one spike used to end the useful part of a FOD fit;
  skipping leaves every other step untouched (no spike in 148 of 169 benchmark fits);
* divergence: a NaN / Inf loss or gradient, or a batch in which no streamline was tracked,
  stops the run with :class:`~invtract.errors.FitDiverged` (the last checkpoint is kept);
* model selection: every ``eval_every`` iterations (and at the last) the Problem's
  :meth:`Problem.selection_loss` (deterministic, the whole training set) is evaluated after the
  step; the best iterate (lowest, starting values included) is what the fit returns;
* checkpoints every ``checkpoint_every`` iterations (tensors, numbers and strings only, read
  back with ``weights_only=True``) and ``resume``;
* logging (``metrics.jsonl``, TensorBoard scalars, the Problem's images), a progress bar,
  callbacks ``callback(iteration, loss, record)`` after every iteration (Optuna pruning:
  raise ``optuna.TrialPruned``; :class:`EarlyStopping` raises :class:`StopTraining`, which
  ends the run normally);
* data parallelism (:mod:`invtract.fit.distributed`): gradients and reported numbers summed
  over ranks, rank 0 logs and checkpoints.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import FitDiverged
from .checkpoint import load_checkpoint, save_checkpoint
from .distributed import SINGLE, World
from .reparam import LearnedState, build_optimizer

__all__ = [
    "TrainSettings",
    "StepOutput",
    "Problem",
    "Trainer",
    "TrainResult",
    "StopTraining",
    "EarlyStopping",
]

log = logging.getLogger(__name__)


class StopTraining(Exception):
    """Raised by a callback to end the run after the current iteration (not an error)."""


@dataclass(frozen=True)
class TrainSettings:
    """The loop's settings, read from a fit config's ``[fit]`` and ``[optimizer]`` tables."""

    iterations: int
    optimizer: str = "signum"
    lr: float = 0.3
    lr_end: float | None = None
    beta1: float = 0.9
    beta2: float = 0.999
    flip_decay: float = 1.0
    sign_eps: float = 1e-9
    lr_sh: float = 0.01
    grad_clip: float = 0.0
    sh_spike: float = 5.0
    sh_spike_mode: str = "skip"
    alternate: bool = False
    eval_every: int = 5
    image_every: int = 0
    checkpoint_every: int = 1
    converge_below: float = 0.0

    @classmethod
    def from_config(cls, cfg: Mapping) -> TrainSettings:
        """From a validated config dict (keys missing from a table keep the defaults here;
        ``lr_end`` 0 or absent: a constant learning rate)."""
        f, o = cfg["fit"], cfg["optimizer"]
        return cls(
            iterations=int(f["iterations"]),
            optimizer=str(o["name"]),
            lr=float(o["lr"]),
            lr_end=float(o["lr_end"]) if o.get("lr_end") else None,
            beta1=float(o.get("beta1", 0.9)),
            beta2=float(o.get("beta2", 0.999)),
            flip_decay=float(o.get("flip_decay", 1.0)),
            sign_eps=float(o.get("sign_eps", 1e-9)),
            lr_sh=float(o["lr_sh"]),
            grad_clip=float(o["grad_clip"]),
            sh_spike=float(o.get("sh_spike", cls.sh_spike)),
            sh_spike_mode=str(o.get("sh_spike_mode", cls.sh_spike_mode)),
            alternate=f.get("mode", "joint") == "alternate",
            eval_every=max(int(f.get("eval_every", 5)), 1),
            image_every=max(int(f.get("image_every", 0)), 0),
            checkpoint_every=max(int(f.get("checkpoint_every", 1)), 1),
            converge_below=max(float(f.get("converge_below", 0.0)), 0.0),
        )

    def lr_at(self, it: int) -> float:
        """Learning rate of the tracking parameters at iteration ``it`` (geometric decay)."""
        if self.lr_end is None:
            return self.lr
        frac = min(it / max(self.iterations - 1, 1), 1.0)
        return self.lr * (self.lr_end / self.lr) ** frac

    def is_eval(self, it: int) -> bool:
        return (it + 1) % self.eval_every == 0 or it == self.iterations - 1

    def converged(self, run: Mapping) -> bool:
        """The stopping rule: the last evaluated selection loss is at most ``converge_below``
        times the starting one (the data are fit; further steps could only wander over
        values the data cannot tell apart). Off when ``converge_below`` is 0."""
        last = run["history"][-1].get("loss/select") if run["history"] else None
        sel0 = run.get("sel0")
        return bool(self.converge_below and last is not None and sel0 and
                    last <= self.converge_below * sel0)  # fmt: skip


@dataclass
class StepOutput:
    """One rank's share of an iteration's loss.

    Attributes:
        total: 0-d tensor; summed over ranks it is the iteration's loss.
        terms: ``{name: float}`` shares of the loss terms (summed over ranks for the log).
        counts: ``{name: float}`` numbers summed over ranks as they are (``tracking/*``).
        n_tracked: streamlines this rank tracked (0 on every rank: :class:`FitDiverged`).
        record: extra ``{tag: float}`` for the log, the same on every rank.
        aux: anything :meth:`Problem.log_images` needs (rank 0's).
    """

    total: torch.Tensor
    terms: dict
    counts: dict = field(default_factory=dict)
    n_tracked: int = 1
    record: dict = field(default_factory=dict)
    aux: object = None


class Problem:
    """What a fit learns and how it is scored; subclasses implement the methods below.

    Attributes:
        config: the validated config dict (a checkpoint is only resumed with the same one).
        state: the :class:`~invtract.fit.reparam.LearnedState`.
        extra_terms: ``name -> (weight, fn)``; ``fn(context)`` returns a 0-d tensor added to
            the training loss as ``weight * fn(context)`` and logged as ``loss/NAME``; see
            :meth:`add_term`.
    """

    config: dict
    state: LearnedState

    def __init__(self) -> None:
        self.extra_terms: dict[str, tuple[float, Callable]] = {}

    def add_term(self, name: str, fn: Callable[[dict], torch.Tensor], weight: float = 1.0):
        """Add a loss term: ``fn(context)`` with ``context`` holding ``iteration``, ``values``
        (tracking values, differentiable), ``sh`` (``[X, Y, Z, K]`` current SH coefficients,
        differentiable in the learned change), ``result`` (the differentiable tracking
        result of this rank's batch) and ``world``. Terms other than the data terms are
        parameter terms: a data-parallel fit adds them on rank 0 only, so ``fn`` must not
        depend on the rank's shard unless it scales itself by the shard's share."""
        self.extra_terms[name] = (float(weight), fn)

    def _extra(self, context: dict) -> dict:
        """The :meth:`add_term` terms of ``context`` (rank 0 only), which gets ``sh`` here: the
        whole current FOD, a new tensor when ``sh`` is learned, made only for such terms."""
        world = context.get("world", SINGLE)
        if not world.is_main or not self.extra_terms:
            return {}
        context = {**context, "sh": self.state.sh()}
        return {k: w * fn(context) for k, (w, fn) in self.extra_terms.items()}

    def check(self, world: World) -> None:
        """Raise a one-line error before iterating when the fit cannot work."""

    def training_step(self, it: int, world: World) -> StepOutput:
        raise NotImplementedError

    def selection_loss(self, world: World) -> float:
        """Deterministic loss of the current values (summed over ranks by the Problem)."""
        raise NotImplementedError

    def evaluate(self, it: int, world: World) -> dict:
        """Evaluation records (``{tag: float}``) after iteration ``it``'s step."""
        return {}

    def summarise(self, counts: dict) -> dict:
        """The log records of ``counts`` summed over ranks (e.g. a mean from a sum and a
        count); default: as they are."""
        return counts

    def log_images(self, logger, it: int, out: StepOutput) -> None:
        """Images / histograms of iteration ``it`` (rank 0)."""

    def extra_state(self) -> dict:
        """Problem state for checkpoints (tensors, numbers, strings)."""
        return {}

    def load_extra_state(self, st: Mapping) -> None:
        """Read back :meth:`extra_state`."""


@dataclass
class TrainResult:
    """What :meth:`Trainer.fit` returns.

    Attributes:
        history: one record per iteration (as in ``metrics.jsonl``).
        best: ``{"loss", "iteration", "values", "snapshot"}`` of the best evaluated iterate;
            ``iteration`` counts completed iterations (0: the starting values).
        final_loss: selection loss of the last iterate.
        final_values: tracking values of the last iterate.
        evaluation: the last :meth:`Problem.evaluate` record.
        iterations: iterations run in total (including those before a resume).
        wall_s: seconds spent in this call.
        stopped_early: a callback raised :class:`StopTraining`.
    """

    history: list
    best: dict
    final_loss: float
    final_values: dict
    evaluation: dict
    iterations: int
    wall_s: float
    stopped_early: bool = False


class EarlyStopping:
    """Callback: stop when ``loss/select`` has not improved by ``min_delta`` (relative) over
    ``patience`` evaluations."""

    def __init__(self, patience: int = 3, min_delta: float = 1e-3) -> None:
        self.patience, self.min_delta = int(patience), float(min_delta)
        self.best, self.bad = math.inf, 0

    def __call__(self, it: int, loss: float, record: Mapping) -> None:
        sel = record.get("loss/select")
        if sel is None:
            return
        if sel < self.best * (1 - self.min_delta):
            self.best, self.bad = sel, 0
            return
        self.bad += 1
        if self.bad >= self.patience:
            raise StopTraining(f"no improvement in {self.patience} evaluations")


class Trainer:
    """Runs a :class:`Problem` (see the module docstring).

    Args:
        settings: :class:`TrainSettings`.
        logger: a :class:`~invtract.fit.runlog.RunLogger` (or an adapter), rank 0 only.
        checkpoint: checkpoint path (written by rank 0), or None.
        resume: continue from ``checkpoint`` when it exists.
        progress: tqdm bar (rank 0).
        callbacks: ``callback(iteration, loss, record)`` after each iteration.
        world: the :class:`~invtract.fit.distributed.World` (default: one process).
    """

    def __init__(
        self,
        settings: TrainSettings,
        *,
        logger=None,
        checkpoint: str | Path | None = None,
        resume: bool = False,
        progress: bool = False,
        callbacks: Sequence[Callable] = (),
        world: World = SINGLE,
    ) -> None:
        self.s = settings
        self.world = world
        self.logger = logger if world.is_main else None
        self.checkpoint = checkpoint
        self.resume = resume
        self.progress = progress and world.is_main
        self.callbacks = [c for c in callbacks if c is not None]

    # -- optimisers -----------------------------------------------------------------------------
    def _optimisers(self, state: LearnedState):
        s = self.s
        opt_p = build_optimizer(
            s.optimizer, list(state.z.values()), s.lr, s.beta1, s.beta2, s.flip_decay, s.sign_eps
        )
        opt_sh = None
        if state.delta is not None:
            name = "sgd" if s.optimizer == "sgd" else "adam"
            opt_sh = build_optimizer(name, [state.delta], s.lr_sh, 0.9, 0.999)
        return opt_p, opt_sh

    def _spike_guard(self, gn_sh: float, state: LearnedState, history: list) -> float:
        """Where the SH gradient's norm is above ``sh_spike`` x the median norm of the previous
        iterations, drop it (``skip``) or scale it to that bound (``clip``); returns the
        factor applied (1: untouched)."""
        past = [r["grad_norm/sh"] for r in history if r.get("grad_norm/sh")]
        if not (self.s.sh_spike > 0 and past and state.delta is not None):
            return 1.0
        bound = self.s.sh_spike * statistics.median(past)
        if gn_sh <= bound:
            return 1.0
        factor = 0.0 if self.s.sh_spike_mode == "skip" else bound / gn_sh
        state.delta.grad.mul_(factor)
        log.info("SH gradient spike: norm %.4g > %.4g; scaled by %.3g", gn_sh, bound, factor)
        return factor

    def _step(self, it: int, out: StepOutput, state: LearnedState, opts, history) -> dict:
        """Back-propagate, sum gradients over ranks, check, clip and step."""
        opt_p, opt_sh = opts
        loss = self.world.sum({"l": float(out.total.detach())})["l"]
        kept = (
            f"; the last good checkpoint is kept in {self.checkpoint}" if self.checkpoint else ""
        )
        if not math.isfinite(loss):
            terms = {k: round(v, 6) for k, v in out.terms.items()}
            raise FitDiverged(f"the loss became {loss} at iteration {it} ({terms}){kept}")
        for o in opts:
            if o is not None:
                o.zero_grad(set_to_none=False)
        tensors = state.tensors()
        if out.total.requires_grad:
            out.total.backward()
        for t in tensors:
            if t.grad is None:
                t.grad = torch.zeros_like(t)
        self.world.all_reduce_([t.grad for t in tensors])
        grads = {f"grad/{k}": float(v.grad) for k, v in state.z.items()}
        gn_p = math.sqrt(sum(x * x for x in grads.values()))
        gn_sh = float(state.delta.grad.norm()) if state.delta is not None else 0.0
        if not (math.isfinite(gn_p) and math.isfinite(gn_sh)):
            raise FitDiverged(f"a gradient became non-finite at iteration {it}{kept}")
        spike = self._spike_guard(gn_sh, state, history)
        if self.s.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(tensors, self.s.grad_clip)
        both = opt_p is not None and opt_sh is not None
        if opt_p is not None and not (self.s.alternate and both and it % 2 == 1):
            for grp in opt_p.param_groups:
                grp["lr"] = self.s.lr_at(it)
            opt_p.step()
            state.project()
        if opt_sh is not None and not (self.s.alternate and both and it % 2 == 0):
            opt_sh.step()
        return {"loss": loss, "grads": grads, "grad_norm/params": gn_p, "grad_norm/sh": gn_sh,
                "grad_scale/sh": spike}  # fmt: skip

    # -- checkpoints ----------------------------------------------------------------------------
    def _save(self, it_done: int, problem: Problem, opts, run: dict) -> None:
        if self.checkpoint is None or not self.world.is_main:
            return
        opt_p, opt_sh = opts
        best = dict(run["best"])
        save_checkpoint(
            self.checkpoint,
            {
                "iteration": it_done,
                "config": problem.config,
                "learned": problem.state.snapshot(),
                "opt_p": None if opt_p is None else opt_p.state_dict(),
                "opt_sh": None if opt_sh is None else opt_sh.state_dict(),
                "history": run["history"],
                "best": best,
                "evaluation": run["evaluation"],
                "sel0": run.get("sel0"),
                "extra": problem.extra_state(),
            },
        )

    def _restore(self, problem: Problem, opts) -> dict | None:
        if not (self.resume and self.checkpoint is not None and Path(self.checkpoint).is_file()):
            return None
        from ..errors import ConfigError

        st = load_checkpoint(self.checkpoint)
        if st.get("config") != problem.config:
            raise ConfigError(
                f"{self.checkpoint}: the checkpoint was made with another configuration; "
                "start a new run instead of --resume"
            )
        problem.state.restore(st["learned"])
        for o, key in zip(opts, ("opt_p", "opt_sh")):
            if o is not None and st.get(key) is not None:
                o.load_state_dict(st[key])
        problem.load_extra_state(st.get("extra", {}))
        log.info("resumed from %s at iteration %d", self.checkpoint, st["iteration"])
        return {
            "it0": int(st["iteration"]),
            "history": list(st["history"]),
            "best": dict(st["best"]),
            "evaluation": dict(st.get("evaluation", {})),
            "sel0": st.get("sel0"),
        }

    # -- the loop -------------------------------------------------------------------------------
    def fit(self, problem: Problem) -> TrainResult:
        """Run ``problem`` for ``settings.iterations`` iterations (from a checkpoint when
        resuming); see the module docstring."""
        t_start = time.perf_counter()
        state = problem.state
        opts = self._optimisers(state)
        run = self._restore(problem, opts)
        if run is None:
            problem.check(self.world)
            sel0 = problem.selection_loss(self.world)
            run = {"it0": 0, "history": [], "evaluation": {}, "best": self._best(sel0, 0, state),
                   "sel0": sel0}  # fmt: skip
        bar = self._bar(run["it0"])
        stopped = False
        try:
            if self.s.converged(run):  # resumed from a run that had converged
                raise StopTraining("converged")
            for it in range(run["it0"], self.s.iterations):
                self._iteration(it, problem, opts, run, bar)
        except StopTraining as why:
            log.info("stopped early: %s", why)
            stopped = True
        finally:
            if bar is not None:
                bar.close()
            if self.logger is not None:
                self.logger.flush()
        final_values = state.floats()
        if stopped or not run["history"] or "loss/select" not in run["history"][-1]:
            final_loss = problem.selection_loss(self.world)
        else:
            final_loss = run["history"][-1]["loss/select"]
        if final_loss < run["best"]["loss"]:
            run["best"] = self._best(final_loss, len(run["history"]), state)
        return TrainResult(
            history=run["history"],
            best=run["best"],
            final_loss=float(final_loss),
            final_values=final_values,
            evaluation=run["evaluation"],
            iterations=len(run["history"]),
            wall_s=time.perf_counter() - t_start,
            stopped_early=stopped,
        )

    @staticmethod
    def _best(loss: float, iteration: int, state: LearnedState) -> dict:
        return {
            "loss": float(loss),
            "iteration": int(iteration),
            "values": state.floats(),
            "snapshot": state.snapshot(),
        }

    def _iteration(self, it: int, problem: Problem, opts, run: dict, bar) -> None:
        t0 = time.perf_counter()
        state = problem.state
        before = state.floats()
        out = problem.training_step(it, self.world)
        n_tracked = self.world.sum({"n": out.n_tracked})["n"]
        if n_tracked == 0:
            kept = (
                f"; the last good checkpoint is kept in {self.checkpoint}"
                if self.checkpoint
                else ""
            )
            raise FitDiverged(
                f"no streamline was tracked at iteration {it} (step {before['step_mm']:.4g} mm, "
                f"angle {before['angle_deg']:.4g} deg, cutoff {before['cutoff']:.4g}){kept}"
            )
        step = self._step(it, out, state, opts, run["history"])
        rec = {"iteration": it, "loss/total": step["loss"]}
        rec.update({f"loss/{k}": v for k, v in self.world.sum(out.terms).items()})
        rec.update(problem.summarise(self.world.sum(out.counts)))
        rec.update({f"param/{k}": v for k, v in before.items()})
        rec.update(out.record)
        rec.update({"lr/params": self.s.lr_at(it), "grad_norm/params": step["grad_norm/params"]})
        rec.update({"grad_norm/sh": step["grad_norm/sh"], **step["grads"]})
        if step["grad_scale/sh"] != 1.0:
            rec["grad_scale/sh"] = step["grad_scale/sh"]
        if self.s.is_eval(it):
            ev = problem.evaluate(it, self.world)
            run["evaluation"] = ev
            rec.update(ev)
            sel = problem.selection_loss(self.world)
            rec["loss/select"] = sel
            if sel < run["best"]["loss"]:
                run["best"] = self._best(sel, it + 1, state)
        rec["time/step_s"] = time.perf_counter() - t0
        run["history"].append(rec)
        self._log(it, problem, out, rec, bar)
        if (it + 1) % self.s.checkpoint_every == 0 or it == self.s.iterations - 1:
            self._save(it + 1, problem, opts, run)
        for cb in self.callbacks:
            cb(it, step["loss"], rec)
        if self.s.converged(run):
            raise StopTraining(
                f"converged: selection loss {rec['loss/select']:.4g} <= "
                f"{self.s.converge_below:g} x its start {run['sel0']:.4g}"
            )

    def _log(self, it: int, problem: Problem, out: StepOutput, rec: dict, bar) -> None:
        if self.logger is not None:
            self.logger.scalars(it, {k: v for k, v in rec.items() if k != "iteration"})
            self.logger.metrics(rec)
            every = self.s.image_every
            if every and (it % every == 0 or it == self.s.iterations - 1):
                problem.log_images(self.logger, it, out)
        if bar is not None:
            post = {k[6:]: f"{v:.4g}" for k, v in rec.items() if k.startswith("param/")}
            bar.set_postfix(loss=f"{rec['loss/total']:.4g}", **post)
            bar.update(1)

    def _bar(self, initial: int):
        if not self.progress:
            return None
        from ..progress import iteration_bar  # tqdm on a terminal, a few lines off one

        return iteration_bar(self.s.iterations, initial, "fit")
