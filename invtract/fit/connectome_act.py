"""ACT's tissue terminations in the survival connectome (``fit --target-connectome --act``).

:func:`~invtract.fit.connectome_fit.survival_connectome` with ``act`` replaces the end mass of
each half by the one ``tckgen -act`` implies (MRtrix3 3.0.3 ``tracking/exec.h`` ``iterate`` /
``apply_priors``, ``ACT/act.h`` ``check_structural``). Vertex ``j`` of a half (``j = 0`` the
seed, ``n`` the last tracked vertex) is reached with probability
``A_j = S_j C_j``: ``S_j = sig(min_{1 <= k < j} x_k)`` the model tests (amplitude and
angle margins, as without ACT) and ``C_j = prod_{1 <= k < j} cont_k`` the tissue tests, where
``cont_k`` is :func:`~invtract.tracking.act_soft.step_outcomes`' continue outcome of the 5TT
sampled (trilinear, differentiable in position: :func:`~invtract.tracking.act_soft.
tissues_soft`) at the vertex. At a reached vertex the outcomes split as ``check_structural``
orders them:

* ENTER_CGM: a good end at ``j`` (the point is written);
* EXIT_IMAGE (no tissue data, tissue sum < 0.5): a good end at ``j - 1`` (not written);
* ENTER_CSF: the streamline is rejected (the mass is lost);
* continue: then a failed model test (amplitude, angle) rejects the streamline in WM (ACT's
  poor termination: mass lost) and ends it well in sub-cortical GM (TERM_IN_SGM).

What continues past the last tracked vertex ``n`` is counted as ending at ``n`` (where the
hard tracking stopped it; as without ACT), so with every temperature -> 0 an accepted
streamline puts all its mass on its last vertex and the result is tck2connectome's count of the
hard ACT tracking. The seed gets ACT's seed test (:func:`~invtract.tracking.act_soft.
soft_seed_ok`, valid tissues). Not softened (held at the hard tracking's outcome): EXIT_SGM
and its truncation, the SGM-seed WM requirement, ``-crop_at_gmwmi`` (the cropped end is where
the mass of the last vertex is assigned) and the maximum length; streamlines the hard tracking
rejected carry no mass at all. Gradients reach ``cutoff`` / ``angle_deg`` and the SH
coefficients through ``S_j`` (rejection instead of an end) and the step through the positions
(tissues and node assignment).

Shapes: ``[S, H]`` per half (``S`` streamlines, ``H`` vertices from the seed outwards).
"""

from __future__ import annotations

import math

import torch

from ..tracking.act_soft import (
    continue_in_sgm,
    soft_seed_ok,
    soft_valid,
    step_outcomes,
    survival,
    tissues_soft,
)

__all__ = [
    "half_end_mass",
    "model_survival",
    "vertex_outcomes",
    "vertex_end_mass",
    "bin_mass",
    "seed_factor",
]


def half_end_mass(points, seed_index, lengths, half: int, ctx: dict):
    """:func:`~invtract.fit.connectome_fit._half_end_mass` under ACT: ``(E [S, nb, n] float64,
    R [S, nb])``, the binned end mass of one half with its soft node assignment and each bin's
    representative step count (a large negative number for no bin)."""
    from ..losses.connectome import _soft_node_probs
    from .connectome_fit import _half_index

    S, L = points.shape[:2]
    idx, n_steps = _half_index(seed_index, lengths, half, L)
    surv = model_survival(points, idx, n_steps, ctx)
    e = vertex_end_mass(surv, vertex_outcomes(points, idx, n_steps, ctx), n_steps)
    mass, r = bin_mass(e, n_steps, int(ctx["b"]))
    rows = torch.arange(S, device=points.device)[:, None]
    rep = idx.gather(1, r.clamp(0, idx.shape[1] - 1))
    probs = _soft_node_probs(
        points[rows, rep].reshape(-1, 3), ctx["vol"], ctx["label_t"], ctx["offsets"],
        ctx["radius_mm"], ctx["temperature_mm"],
    ).reshape(S, r.shape[1], ctx["n"])  # fmt: skip
    reps = torch.where(r >= 0, r, torch.full_like(r, -(10**9)))
    return mass[..., None] * probs.to(torch.float64), reps


def model_survival(points, idx, n_steps, ctx: dict) -> torch.Tensor:
    """``S [S, H]`` float64: ``S_j = sig(min_{1 <= k < j} x_k)`` (1 where no test applies),
    with the gradient of each minimum through its arg-min vertex only (as without ACT)."""
    from .connectome_fit import _margins_at, half_margins

    margin_args = (ctx["sh_flat"], ctx["s2v"], ctx["shape"], ctx["lmax"], ctx["cutoff"],
                   ctx["cos_max"], ctx["t_amp"], ctx["t_cos"])  # fmt: skip
    x = half_margins(points, idx, n_steps, *margin_args)
    S, H = x.shape
    cm, cm_i = torch.cummin(x, dim=1)
    cm_before = torch.cat([torch.full_like(cm[:, :1], math.inf), cm[:, :-1]], 1)
    k_before = torch.cat([torch.zeros_like(cm_i[:, :1]), cm_i[:, :-1]], 1)
    use = torch.isfinite(cm_before)
    surv = torch.ones(S, H, dtype=torch.float64, device=points.device)
    if bool(use.any()):
        rows = torch.arange(S, device=points.device)[:, None].expand(S, H)[use]
        uniq, inv = torch.unique(rows * H + k_before[use], return_inverse=True)
        xs = _margins_at(points, idx, uniq // H, uniq % H, *margin_args)
        surv = surv.masked_scatter(use, torch.sigmoid(xs[inv]))
    return surv


def vertex_outcomes(points, idx, n_steps, ctx: dict) -> dict:
    """``check_structural``'s soft outcomes at each vertex ``1 <= j <= n`` of a half: ``cont``,
    ``enter_cgm``, ``exit_image``, ``enter_csf`` and ``sgm`` (the part of ``cont`` in
    sub-cortical GM), each ``[S, H]`` float64; the seed and the padding continue (1, 0, ...)."""
    S, H = idx.shape
    k = torch.arange(H, device=idx.device)[None]
    live = (k >= 1) & (k <= n_steps[:, None])
    rows = torch.arange(S, device=idx.device)[:, None].expand(S, H)
    tau = float(ctx["t_tissue"])
    tis, has = tissues_soft(ctx["tissue"], points[rows[live], idx[live]])
    o = step_outcomes(tis, has, tau)
    o["sgm"] = continue_in_sgm(tis, has, tau)
    out = {}
    for name in ("cont", "enter_cgm", "exit_image", "enter_csf", "sgm"):
        base = torch.full((S, H), 1.0 if name == "cont" else 0.0, dtype=torch.float64,
                          device=idx.device)  # fmt: skip
        out[name] = base.masked_scatter(live, o[name].to(torch.float64))
    return out


def vertex_end_mass(surv: torch.Tensor, o: dict, n_steps: torch.Tensor) -> torch.Tensor:
    """``e [S, H]``: the mass of the half ending well at each vertex (see the module docstring):
    ``A_j cgm_j + A_{j+1} exit_{j+1} + C_j sgm_j (S_j - S_{j+1})`` for ``j < n`` and
    ``A_n (cgm_n + cont_n)`` at ``j = n``; 0 beyond ``n``."""
    C = survival(o["cont"])
    A = surv * C
    k = torch.arange(A.shape[1], device=A.device)[None]
    n = n_steps[:, None]
    zero = torch.zeros_like(A[:, :1])

    def next_(t):
        return torch.cat([t[:, 1:], zero], 1)

    inner = next_(A) * next_(o["exit_image"]) + C * o["sgm"] * (surv - next_(surv))
    e = A * o["enter_cgm"] + torch.where(k < n, inner, torch.zeros_like(inner))
    e = e + torch.where(k == n, A * o["cont"], torch.zeros_like(A))
    return torch.where(k <= n, e, torch.zeros_like(e))


def bin_mass(e: torch.Tensor, n_steps: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The end mass ``e [S, H]`` summed in bins of ``b`` vertices from the last one inwards:
    bin ``i`` holds vertices ``(r_i - b, r_i]`` with ``r_i = n - i b``, down to the seed
    (vertex 0). Returns ``(mass [S, nb], r [S, nb])`` (``r < 0``: no bin, mass 0)."""
    S, H = e.shape
    nb = max(1, -(-H // b))
    i = torch.arange(nb, device=e.device)[None]
    r = n_steps[:, None] - i * b
    ok = r >= 0
    cs = torch.cat([torch.zeros_like(e[:, :1]), e.cumsum(1)], 1)  # cs[j] = sum_{k < j} e_k
    hi = cs.gather(1, (r + 1).clamp(0, H))
    lo = cs.gather(1, (r - b + 1).clamp(0, H))
    return torch.where(ok, hi - lo, torch.zeros_like(hi)), r


def seed_factor(points, seed_index, ctx: dict) -> torch.Tensor:
    """``[S]`` ACT's seed test at each seed vertex: valid tissues and
    :func:`~invtract.tracking.act_soft.soft_seed_ok` (float64)."""
    rows = torch.arange(points.shape[0], device=points.device)
    tau = float(ctx["t_tissue"])
    tis, has = tissues_soft(ctx["tissue"], points[rows, seed_index])
    return soft_valid(tis, has, tau) * soft_seed_ok(tis, tau)
