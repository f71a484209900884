"""What a fit learns, and how it steps: reparametrisation of the tracking parameters, the
learned SH change, and the optimiser registry (Signum, Adam, SGD) with its lr schedule.

Tracking parameters are learned as unconstrained float64 scalars ``z``:

* ``space = "log"``: ``z = log(value)``, clamped into ``log [bounds]`` after every step
  (:meth:`LearnedState.project`), so a step of ``lr`` is a relative change of ``lr`` anywhere;
* ``space = "bounded"``: ``value = exp(log lo + (log hi - log lo) sigmoid(z))``.

The SH coefficients are learned as an additive change ``delta [V, K]`` of the voxels ``voxels
[V]`` (flat indices into the FOD grid).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from ..errors import ConfigError

__all__ = ["PARAM_NAMES", "LearnedState", "Signum", "OPTIMIZERS", "build_optimizer", "to_z"]

#: learnable tracking parameters
PARAM_NAMES = ("step_mm", "angle_deg", "cutoff")


def to_z(value: float, lo: float, hi: float, space: str) -> float:
    """The unconstrained parameter of ``value`` in ``[lo, hi]`` (``space``: log | bounded)."""
    if space == "log":
        return math.log(min(max(value, lo), hi))
    a = (math.log(value) - math.log(lo)) / (math.log(hi) - math.log(lo))
    a = min(max(a, 1e-4), 1 - 1e-4)
    return math.log(a / (1 - a))


def from_z(z: torch.Tensor, lo: float, hi: float, space: str) -> torch.Tensor:
    """Inverse of :func:`to_z` (differentiable)."""
    if space == "log":
        return torch.exp(z)
    return torch.exp(math.log(lo) + (math.log(hi) - math.log(lo)) * torch.sigmoid(z))


class LearnedState:
    """The learnable tensors of a fit and their map to tracking values / SH coefficients.

    Args:
        start: starting value of every name in :data:`PARAM_NAMES` (float).
        learn: the names learned (among :data:`PARAM_NAMES` and ``"sh"``).
        bounds: name -> ``(lo, hi)``.
        space: ``"log"`` or ``"bounded"``.
        sh0: ``[X, Y, Z, K]`` float32 SH coefficients of the FOD (on ``device``), kept as
            ``sh0_flat``; a fit may write the learned rows into it in place
            (:meth:`~invtract.fod.field.FODField.with_rows`): only its other voxels are read.
        voxels: ``[V]`` distinct flat voxel indices whose SH change is learned (None: no
            ``sh``); their starting rows are kept (``sh0_rows [V, K]``).
    """

    def __init__(self, start: Mapping, learn, bounds: Mapping, space: str, sh0, voxels=None):
        self.start = {k: float(start[k]) for k in PARAM_NAMES}
        self.bounds = {k: tuple(float(x) for x in bounds[k]) for k in PARAM_NAMES}
        self.space = space
        self.shape = tuple(sh0.shape)
        self.sh0_flat = sh0.reshape(-1, sh0.shape[-1])
        self.z = {
            k: torch.tensor(
                to_z(self.start[k], *self.bounds[k], space),
                dtype=torch.float64,
                requires_grad=True,
            )  # fmt: skip
            for k in PARAM_NAMES
            if k in learn
        }
        self.voxels = voxels if "sh" in learn else None
        self.delta = self.sh0_rows = None
        if self.voxels is not None:
            self.sh0_rows = self.sh0_flat[self.voxels]  # a copy (index_select)
            self.delta = torch.zeros(
                self.voxels.numel(), self.shape[-1], dtype=torch.float32,
                device=sh0.device, requires_grad=True,
            )  # fmt: skip

    def values(self, detach: bool = False) -> dict:
        """name -> current value (0-d tensor when learned, float otherwise)."""
        out: dict = {}
        for k in PARAM_NAMES:
            if k in self.z:
                v = from_z(self.z[k], *self.bounds[k], self.space)
                out[k] = v.detach() if detach else v
            else:
                out[k] = self.start[k]
        return out

    def floats(self) -> dict:
        """name -> current value as a float."""
        return {k: float(v) for k, v in self.values(detach=True).items()}

    def rows(self) -> torch.Tensor:
        """Current ``[V, K]`` SH coefficients of the learned voxels, ``sh0_rows + delta``
        (differentiable in ``delta``)."""
        return self.sh0_rows + self.delta

    def sh(self) -> torch.Tensor:
        """Current ``[X, Y, Z, K]`` SH coefficients (differentiable in ``delta``): a new
        tensor (one copy of the FOD)."""
        if self.delta is None:
            return self.sh0_flat.reshape(self.shape)
        return self.sh0_flat.index_put((self.voxels,), self.rows()).reshape(self.shape)

    @torch.no_grad()
    def sh_in_place(self) -> torch.Tensor:
        """The current coefficients written into ``sh0_flat`` (the learned rows, in place; no
        copy): its ``[X, Y, Z, K]`` view, no grad. For a fit that owns the buffer."""
        if self.delta is not None:
            self.sh0_flat.index_copy_(0, self.voxels, self.rows().to(self.sh0_flat.dtype))
        return self.sh0_flat.reshape(self.shape)

    def project(self) -> None:
        """Clamp log-space parameters into their bounds (after an optimiser step)."""
        if self.space != "log":
            return
        with torch.no_grad():
            for k, v in self.z.items():
                lo, hi = self.bounds[k]
                v.clamp_(math.log(lo), math.log(hi))

    def tensors(self) -> list:
        """Every learned tensor (``z`` values, then ``delta``)."""
        return list(self.z.values()) + ([self.delta] if self.delta is not None else [])

    def snapshot(self) -> dict:
        """Detached copies of the learned tensors (what :meth:`restore` reads)."""
        return {
            "z": {k: v.detach().clone() for k, v in self.z.items()},
            "delta": None if self.delta is None else self.delta.detach().cpu().clone(),
        }

    def restore(self, snap: Mapping) -> None:
        """Copy a :meth:`snapshot` back in place."""
        with torch.no_grad():
            for k, v in snap["z"].items():
                self.z[k].copy_(v)
            if self.delta is not None and snap.get("delta") is not None:
                self.delta.copy_(snap["delta"].to(self.delta.device))


class Signum(torch.optim.Optimizer):
    """Sign of the gradient's moving average: ``m = beta m + (1 - beta) g; x -= s lr sign(m)``.

    Scale-free like Adam but without its second-moment memory: the thresholds' gradients
    span orders of magnitude, and after a large one Adam's steps stay small for
    ~1/(1-beta2) iterations. In log space every step is a relative change of ``s lr``.

    ``flip_decay`` (Rprop's rule, capped at the schedule): each parameter's factor ``s``
    (starting at 1) is multiplied by ``flip_decay`` when the sign of ``m`` flips and grows
    back by 1.2 (up to 1) while it holds. On a V-shaped loss (the ``vertex`` term in the
    step) a fixed step oscillates around the minimum with the step's amplitude; halving on
    every flip converges to it geometrically. ``flip_decay = 1`` is plain Signum.

    ``eps``: a parameter whose ``|m|`` is at most ``eps`` (loss units per unit of the
    parameter) does not move. Such a gradient carries no information (e.g. ~1e-12 from a hinge
    far from binding), and its sign depends on the order of floating-point sums, so a
    data-parallel fit would otherwise step it differently from a single process.
    """

    def __init__(
        self, params, lr: float = 0.1, beta: float = 0.5, flip_decay: float = 1.0, eps=1e-9
    ):
        super().__init__(params, {"lr": lr, "beta": beta, "flip_decay": flip_decay, "eps": eps})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if "m" not in st:
                    st["m"] = torch.zeros_like(p)
                    st["scale"] = torch.ones_like(p)
                m = st["m"].mul_(group["beta"]).add_(p.grad, alpha=1 - group["beta"])
                sign = torch.sign(m) * (m.abs() > group["eps"])
                prev = st.get("sign")
                if prev is not None and group["flip_decay"] < 1:
                    flipped = (sign * prev) < 0
                    grow = torch.clamp(st["scale"] * 1.2, max=1.0)
                    st["scale"] = torch.where(flipped, st["scale"] * group["flip_decay"], grow)
                st["sign"] = sign
                p.add_(sign * st["scale"], alpha=-group["lr"])


#: optimiser name -> builder ``(params, lr, beta1, beta2, flip_decay, eps) -> Optimizer``
OPTIMIZERS = {
    "signum": lambda ps, lr, b1, b2, fd, eps: Signum(ps, lr=lr, beta=b1, flip_decay=fd, eps=eps),
    "adam": lambda ps, lr, b1, b2, fd, eps: torch.optim.Adam(ps, lr=lr, betas=(b1, b2)),
    "sgd": lambda ps, lr, b1, b2, fd, eps: torch.optim.SGD(ps, lr=lr),
}


def build_optimizer(
    name: str, params: list, lr: float, beta1=0.9, beta2=0.999, flip_decay=1.0, sign_eps=1e-9
):
    """An optimiser of :data:`OPTIMIZERS` over ``params`` (None when ``params`` is empty)."""
    if name not in OPTIMIZERS:
        raise ConfigError(f"optimizer.name must be one of {', '.join(OPTIMIZERS)}, got {name!r}")
    if not params:
        return None
    args = (float(lr), float(beta1), float(beta2), float(flip_decay), float(sign_eps))
    return OPTIMIZERS[name](params, *args)
