"""Soft survival factors for ACT's tissue tests: differentiable stand-ins for ``check_structural``.

Each comparison of MRtrix3's ``Tissues`` tests (``ACT/tissues.h``, the rulebook's
:func:`~invtract.tracking.rules.is_csf` etc.) becomes a logistic step of its margin,
``sigmoid((a - b) / tau)``; a test that is a conjunction becomes the product of its steps. With
``tau == 0`` every function returns the hard test exactly (the rulebook's ``>=`` / ``>``), and
as ``tau -> 0`` the soft value tends to it wherever no margin is exactly zero (a tie: measure
zero for interpolated tissues; the soft value there is 1/2 per tied comparison).

Per step of a streamline, :func:`step_outcomes` splits the tracked point's fate into the
mutually exclusive outcomes of ``check_structural``'s order: no tissue data (EXIT_IMAGE), CSF
(ENTER_CSF: the streamline is rejected), cortical GM (ENTER_CGM: a good end), and continuing
(in WM, or deeper into sub-cortical GM). :func:`survival` turns the continue probabilities into
the probability of reaching each step, and :func:`end_weights` into the weight of ending at each
step in each way -- the factors a fit multiplies its per-step losses by, as for the cutoff and
angle tests. Shapes: tissues ``[..., 5]`` (cgm, sgm, wm, csf, path; clamped to [0, 1]),
per-step quantities ``[N, T]``. Pure functions; gradients flow to the tissues (and through a
differentiable 5TT sample, :func:`invtract.fod.interp.sample_fod`, to positions).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..fod.interp import nonzero_rows
from .rules import GMWMI_ACCURACY, TISSUE_SUM_THRESHOLD

__all__ = [
    "TissueImage",
    "tissues_soft",
    "soft_ge",
    "soft_classes",
    "soft_valid",
    "soft_seed_ok",
    "step_outcomes",
    "continue_in_sgm",
    "survival",
    "end_weights",
]


@dataclass(frozen=True)
class TissueImage:
    """A 5TT image as differentiable samples read it: ``flat [X*Y*Z, 6]`` float64 (the five
    volumes with NaN as 0, then 1 where a voxel had a NaN), ``shape (X, Y, Z)``,
    ``scanner2voxel [3, 4]`` float64 and ``nonzero [X*Y*Z]`` (a voxel with any non-zero
    volume: MRtrix's masked interpolator finds data there)."""

    flat: torch.Tensor
    shape: tuple
    scanner2voxel: torch.Tensor
    nonzero: torch.Tensor

    @classmethod
    def from_act(cls, act, device="cpu") -> TissueImage:
        """From an :class:`~invtract.tracking.act.ActImage` (MRtrix voxel order)."""
        data = torch.as_tensor(np.asarray(act.data, np.float64), device=device)
        flat = data.reshape(-1, data.shape[-1])
        nan = torch.isnan(flat).any(-1, keepdim=True)
        nonzero = nonzero_rows(flat)
        flat = torch.cat([torch.nan_to_num(flat, nan=0.0), nan.to(flat.dtype)], -1)
        s2v = torch.as_tensor(np.asarray(act.scanner2voxel, np.float64)[:3, :4], device=device)
        return cls(flat, tuple(int(v) for v in data.shape[:3]), s2v, nonzero)


def tissues_soft(img: TissueImage, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 5TT at scanner points ``pos [N, 3]`` (mm) as ``Tissues::set`` reads it, but
    differentiable in ``pos``: ``(tissues [N, 5] float64 clamped to [0, 1], has_data [N])``.

    Trilinear interpolation with the masked interpolator's "no data" rules (outside the field
    of view, an all-zero nearest voxel, a NaN among the weighted corners) through
    :func:`invtract.fod.interp.sample_fod`; rows without data are zero. The tissue-sum test is
    left to :func:`soft_valid`. Positions are float64 here while the tracker interpolates in
    float32, so a point exactly on a tissue tie can be classified differently (measure zero)."""
    from ..fod.interp import sample_fod

    out, ok = sample_fod(img.flat, img.shape, img.scanner2voxel, pos, img.nonzero)
    ok = ok & ~(out[:, 5].detach() > 0)
    tis = torch.where(ok[:, None], out[:, :5], torch.zeros_like(out[:, :5])).clamp(0.0, 1.0)
    return tis, ok


def soft_ge(a: torch.Tensor, b, tau: float, strict: bool = False) -> torch.Tensor:
    """``a >= b`` (``a > b`` when ``strict``) as ``sigmoid((a - b) / tau)``; the hard test
    (as a float 0/1 tensor) when ``tau == 0``."""
    if tau == 0:
        return (a > b if strict else a >= b).to(a.dtype)
    return torch.sigmoid((a - b) / tau)


def soft_classes(tis: torch.Tensor, tau: float) -> dict:
    """Soft ``is_csf``, ``is_sgm``, ``is_gm``, ``is_path`` and ``cgm >= sgm`` of ``tis [..., 5]``
    (each ``[...]``), products of the rulebook's comparisons."""
    c, s, w, f, p = tis.unbind(-1)
    gm = c + s
    return {
        "is_csf": soft_ge(f, c, tau) * soft_ge(f, s, tau) * soft_ge(f, w, tau)
        * soft_ge(f, p, tau),
        "is_sgm": soft_ge(s, c, tau, True) * soft_ge(s, w, tau) * soft_ge(s, f, tau, True)
        * soft_ge(s, p, tau, True),
        "is_gm": soft_ge(gm, w, tau) * soft_ge(gm, f, tau, True) * soft_ge(gm, p, tau, True),
        "is_path": soft_ge(p, c, tau) * soft_ge(p, s, tau) * soft_ge(p, w, tau)
        * soft_ge(p, f, tau, True),
        "cgm_ge_sgm": soft_ge(c, s, tau),
    }  # fmt: skip


def soft_valid(tis: torch.Tensor, has_data: torch.Tensor, tau: float) -> torch.Tensor:
    """``Tissues::set``'s validity: data at the point (discrete) and the tissue sum at least
    0.5 (soft)."""
    return has_data.to(tis.dtype) * soft_ge(tis.sum(-1), TISSUE_SUM_THRESHOLD, tau)


def soft_seed_ok(tis: torch.Tensor, tau: float) -> torch.Tensor:
    """ACT's seed test (:func:`~invtract.tracking.rules.act_seed_ok`) for valid tissues: SGM,
    or not CSF with some WM and ``GM - WM < 0.01``."""
    k = soft_classes(tis, tau)
    c, s, w = tis[..., 0], tis[..., 1], tis[..., 2]
    other = (1 - k["is_csf"]) * soft_ge(w, 0.0, tau, True)
    other = other * (1 - soft_ge((c + s) - w, GMWMI_ACCURACY, tau))
    return k["is_sgm"] + (1 - k["is_sgm"]) * other


def step_outcomes(tis: torch.Tensor, has_data: torch.Tensor, tau: float) -> dict:
    """The outcome probabilities of ``check_structural`` at each tracked point.

    Args:
        tis: ``[N, T, 5]`` tissues at the points (clamped to [0, 1]).
        has_data: ``[N, T]`` bool, the masked 5TT interpolator found data there.
        tau: softness (0: the hard tests).

    Returns:
        ``exit_image``, ``enter_csf``, ``enter_cgm``, ``cont`` (WM, or deeper into SGM), each
        ``[N, T]``, summing to 1 at every point. (Leaving SGM, ``EXIT_SGM``, depends on the path
        before the point and is left to the caller.)
    """
    k = soft_classes(tis, tau)
    valid = soft_valid(tis, has_data, tau)
    not_csf = valid * (1 - k["is_csf"])
    return {
        "exit_image": 1 - valid,
        "enter_csf": valid * k["is_csf"],
        "enter_cgm": not_csf * k["is_gm"] * k["cgm_ge_sgm"],
        "cont": not_csf * (1 - k["is_gm"] * k["cgm_ge_sgm"]),
    }


def continue_in_sgm(tis: torch.Tensor, has_data: torch.Tensor, tau: float) -> torch.Tensor:
    """The part of :func:`step_outcomes`' ``cont`` that goes deeper into sub-cortical GM (GM,
    not CSF, ``cgm < sgm``): where a failed model test is a good end (TERM_IN_SGM) rather
    than a rejection. Shape as ``has_data``."""
    k = soft_classes(tis, tau)
    not_csf = soft_valid(tis, has_data, tau) * (1 - k["is_csf"])
    return not_csf * k["is_gm"] * (1 - k["cgm_ge_sgm"])


def survival(cont: torch.Tensor) -> torch.Tensor:
    """``[N, T]`` probability of reaching point t (all points before it continued):
    ``S_t = prod_{k < t} cont_k`` (``S_0 = 1``)."""
    ones = torch.ones_like(cont[..., :1])
    return torch.cumprod(torch.cat([ones, cont[..., :-1]], -1), -1)


def end_weights(outcomes: dict) -> dict:
    """Weights of ending at each point in each way: ``S_t * p_t`` for ``exit_image``,
    ``enter_csf`` (a rejection under ACT) and ``enter_cgm``, each ``[N, T]``, plus ``beyond``
    ``[N]``: the probability of continuing past the last point (another rule ends it)."""
    S = survival(outcomes["cont"])
    out = {name: S * outcomes[name] for name in ("exit_image", "enter_csf", "enter_cgm")}
    out["beyond"] = S[..., -1] * outcomes["cont"][..., -1]
    return out
