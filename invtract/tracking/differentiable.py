"""Differentiable SD_Stream tracking: hard forward pass, exact gradients, O(1)-in-length backward.

The forward pass is the hard tracker: every point is the one ``invtract track`` writes (the
rules come from :func:`~invtract.tracking.propagator.sd_stream_next`). Gradients come from
replaying the discrete recursion with the decisions (which seeds survive, how many steps each
half takes, which lobe each peak search chose) held fixed:

    c_k = trilinear(sh, p_k)                         (linear in sh, piecewise linear in p_k)
    u_k = implicit_peak(c_k, u*_k)                   (value u*_k; implicit-function Jacobian)
    A_k = c_k . Y(u*_k)                              (envelope theorem)
    p_{k+1} = p_k + h u_k
    log s_{k+1} = log s_k + log sig((A_k - cutoff) / T_A) + log sig((u_{k-1}.u_k - cos_max) / T_c)

with s_0 = sig((A_0 - cutoff) / T_A) at the seed and u_{-1} = u_0 (the seed peak; -u_0 for the
second half). ``weights`` = s are the soft survival weights: the forward pass never uses them,
they only carry gradients to ``cutoff`` and ``angle_deg``.

Two gradient paths evaluate the same formulation:

* ``path="plain"``: one autograd graph over all steps (memory grows with length; reference).
* ``path="efficient"``: a custom :class:`torch.autograd.Function` whose backward sweeps the steps
  in reverse, rebuilding one step's local graph at a time from the stored points and peak
  directions (an adjoint of the discrete recursion). Extra memory: 24 bytes (float32) per
  streamline-step besides the outputs, independent of graph size.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError, ShapeError
from ..fod.field import FODField
from ..fod.interp import corner_weights, world_to_voxel
from ..fod.peak_grad import implicit_peak, peak_amplitude, refine_peak
from ..params import ResolvedParameters, TrackingParameters
from ..streamlines import Streamlines
from .propagator import normalise_eigen, sd_stream_next
from .types import Reject, Term

__all__ = ["DiffTrackResult", "track_differentiable"]


@dataclass
class DiffTrackResult:
    """Accepted streamlines of :func:`track_differentiable`, padded, in seed order.

    Attributes:
        points: ``[S, L, 3]`` vertices, scanner mm; rows padded with zeros beyond ``lengths``.
        mask: ``[S, L]`` bool, True for real vertices.
        lengths: ``[S]`` int64 vertex counts.
        weights: ``[S, L]`` soft survival weights in (0, 1) (0 in padding).
        seed_index: ``[S]`` int64 vertex index of the seed within each streamline.
        seed_ids: ``[S]`` int64 row of ``seeds`` each streamline came from.
        status: ``[N]`` int64 :class:`~invtract.tracking.types.Reject` code per seed.
        term: ``[N, 2]`` int64 :class:`~invtract.tracking.types.Term` code of each half.
    """

    points: torch.Tensor
    mask: torch.Tensor
    lengths: torch.Tensor
    weights: torch.Tensor
    seed_index: torch.Tensor
    seed_ids: torch.Tensor
    status: torch.Tensor
    term: torch.Tensor

    def streamlines(self) -> Streamlines:
        """The packed container (``points[mask]``; differentiable)."""
        return Streamlines(self.points[self.mask], self.lengths)

    def packed_weights(self) -> torch.Tensor:
        """``[P]`` weights aligned with :meth:`streamlines` points."""
        return self.weights[self.mask]


# ----------------------------------------------------------------------------------------------
# hard forward pass: records the discrete structure and the converged peaks
# ----------------------------------------------------------------------------------------------


@dataclass
class _Half:
    start_rows: torch.Tensor  # [n0] accepted-local rows that start this half
    rows: list  # per step: [n_k] accepted-local rows (sorted)
    sub: list  # per step: [n_k] positions of rows in the previous step's rows
    p: list  # per step: [n_k, 3] point before the step
    u_star: list  # per step: [n_k, 3] converged peak used for the step


@dataclass
class _Structure:
    seeds: torch.Tensor  # [S, 3] hard seed points (field dtype)
    u0: torch.Tensor  # [S, 3] seed peak direction u*_0
    halves: list  # [_Half, _Half]
    n1: torch.Tensor  # [S] points added by the first half
    n2: torch.Tensor  # [S]
    seed_ids: torch.Tensor  # [S]
    status: torch.Tensor  # [N]
    term: torch.Tensor  # [N, 2]


def _hard_step(field, pos, u, params, refine):
    if refine <= 0:
        return sd_stream_next(field, pos, u, params)
    c, valid = field.sample(pos)
    term = torch.full((pos.shape[0],), int(Term.CONTINUE), dtype=torch.int64, device=pos.device)
    term[~valid] = int(Term.EXIT_IMAGE)
    amp, new_u = field.peak(c, u)
    new_u = refine_peak(c, new_u, field.lmax, refine)
    ok_amp = torch.isfinite(amp) & (amp >= params.cutoff)
    term[valid & ~ok_amp] = int(Term.MODEL)
    dot = u[:, 0] * new_u[:, 0] + (u[:, 1] * new_u[:, 1] + u[:, 2] * new_u[:, 2])
    term[valid & ok_amp & (dot < params.dot_threshold)] = int(Term.HIGH_CURVATURE)
    go = term == int(Term.CONTINUE)
    step = torch.tensor(params.step_mm, dtype=pos.dtype, device=pos.device)
    new_pos = torch.where(go[:, None], pos + new_u * step, pos)
    return new_pos, torch.where(go[:, None], new_u, u), amp, term


def _run_half(field, p0, u0, count0, active, params, refine):
    """Hard-track one half for ``active`` rows; returns per-step records (global rows)."""
    rows, ps, us = [], [], []
    n = p0.shape[0]
    nadd = torch.zeros(n, dtype=torch.int64, device=p0.device)
    term = torch.full((n,), -1, dtype=torch.int64, device=p0.device)
    idx = torch.nonzero(active, as_tuple=False).flatten()
    pos, u, count = p0[idx], u0[idx], count0[idx].clone()
    while idx.numel() > 0:
        new_p, new_u, _, t = _hard_step(field, pos, u, params, refine)
        cont = t == int(Term.CONTINUE)
        rows.append(idx[cont])
        ps.append(pos[cont])
        us.append(new_u[cont])
        nadd[idx[cont]] += 1
        count = count + cont.to(torch.int64)
        t = torch.where(cont & (count >= params.max_points), int(Term.LENGTH_EXCEED), t)
        fin = t != int(Term.CONTINUE)
        term[idx[fin]] = t[fin]
        keep = ~fin
        idx, pos, u, count = idx[keep], new_p[keep], new_u[keep], count[keep]
    return rows, ps, us, nadd, term


@torch.no_grad()
def _hard_forward(field: FODField, seeds, init_dirs, params: ResolvedParameters, refine: int):
    dev, dt = field.device, field.dtype
    n = seeds.shape[0]
    seeds = seeds.detach().to(device=dev, dtype=dt)
    init = init_dirs.detach().to(device=dev, dtype=dt)
    status = torch.full((n,), int(Reject.ACCEPTED), dtype=torch.int64, device=dev)
    term = torch.full((n, 2), -1, dtype=torch.int64, device=dev)
    ok = torch.isfinite(seeds).all(-1)
    safe = torch.where(ok[:, None], seeds, torch.zeros_like(seeds))
    c, valid = field.sample(safe)
    ok &= valid
    d = normalise_eigen(torch.nan_to_num(init, nan=0.0))
    amp, u0 = field.peak(c, torch.where(ok[:, None], d, torch.ones_like(d)))
    if refine > 0:
        u0 = refine_peak(c, u0, field.lmax, refine)
    ok &= torch.isfinite(amp) & (amp >= params.cutoff)
    status[~ok] = int(Reject.INVALID_SEED)
    u0 = torch.where(ok[:, None], u0, torch.zeros_like(u0))
    ones = torch.ones(n, dtype=torch.int64, device=dev)
    r1, p1, s1, n1, t1 = _run_half(field, safe, u0, ones, ok, params, refine)
    term[:, 0] = torch.where(ok, t1, term[:, 0])
    second = ok & (not params.unidirectional)
    r2, p2, s2, n2, t2 = _run_half(field, safe, -u0, 1 + n1, second, params, refine)
    term[:, 1] = torch.where(second, t2, term[:, 1])
    total = 1 + n1 + n2
    status = torch.where(ok & (total == 1), int(Reject.NO_PROPAGATION_FROM_SEED), status)
    status = torch.where(
        ok & (total > 1) & (total < params.min_points), int(Reject.TRACK_TOO_SHORT), status
    )
    acc = status == int(Reject.ACCEPTED)
    seed_ids = torch.nonzero(acc, as_tuple=False).flatten()
    local = torch.full((n,), -1, dtype=torch.int64, device=dev)
    local[seed_ids] = torch.arange(seed_ids.numel(), device=dev)

    def restrict(start_mask, rows, ps, us):
        start = local[torch.nonzero(start_mask & acc, as_tuple=False).flatten()]
        out = _Half(start, [], [], [], [])
        prev = start
        for r, p, u in zip(rows, ps, us):
            keep = acc[r]
            if not bool(keep.any()):
                break
            lr = local[r[keep]]
            out.rows.append(lr)
            out.sub.append(torch.searchsorted(prev, lr))
            out.p.append(p[keep])
            out.u_star.append(u[keep])
            prev = lr
        return out

    halves = [restrict(ok, r1, p1, s1), restrict(second, r2, p2, s2)]
    return _Structure(
        safe[seed_ids], u0[seed_ids], halves, n1[seed_ids], n2[seed_ids], seed_ids, status, term
    )


# ----------------------------------------------------------------------------------------------
# the differentiable formulation (shared by both gradient paths)
# ----------------------------------------------------------------------------------------------


@dataclass
class _Consts:
    shape: tuple
    s2v: torch.Tensor
    lmax: int
    t_amp: float
    t_cos: float
    eps: float


def _gather_corners(sh_flat, p, consts):
    v = world_to_voxel(p, consts.s2v)
    index, weights, _ = corner_weights(v, consts.shape, weight_dtype=sh_flat.dtype)
    return index, weights


def _interp(corners, weights):
    # same summation order as interp.sample_fod (corner 0 first)
    out = corners[:, 0] * weights[:, 0:1]
    for k in range(1, 8):
        out = out + corners[:, k] * weights[:, k : k + 1]
    return out


def _seed_fn(corners, weights, u0_star, cutoff, consts, need_grad=True):
    c = _interp(corners, weights)
    u0 = implicit_peak(c, u0_star, consts.lmax, consts.eps) if need_grad else u0_star
    A = peak_amplitude(c, u0_star, consts.lmax).to(torch.float64)
    cl = F.logsigmoid((A - cutoff.to(torch.float64)) / consts.t_amp)
    return u0, cl


def _step_fn(corners, weights, p, u_prev, u_star, h, cutoff, cos_max, consts, need_grad=True):
    c = _interp(corners, weights)
    u = implicit_peak(c, u_star, consts.lmax, consts.eps) if need_grad else u_star
    A = peak_amplitude(c, u_star, consts.lmax).to(torch.float64)
    cos = (u_prev.to(torch.float64) * u.to(torch.float64)).sum(-1)
    logw = F.logsigmoid((A - cutoff.to(torch.float64)) / consts.t_amp) + F.logsigmoid(
        (cos - cos_max.to(torch.float64)) / consts.t_cos
    )
    p_next = p + u * h.to(p.dtype)
    return p_next, u, logw


def _plain(sh_flat, seeds, h, cutoff, cos_max, st: _Structure, consts: _Consts):
    """One autograd graph through all steps. Returns (pts_rec, cl_rec, cl_seed)."""
    idx, w = _gather_corners(sh_flat, seeds, consts)
    u0, cl_seed = _seed_fn(sh_flat[idx], w, st.u0, cutoff, consts)
    pts, cls = [], []
    for hi, half in enumerate(st.halves):
        sign = 1.0 if hi == 0 else -1.0
        rows = half.start_rows
        p, u_prev, cl = seeds[rows], sign * u0[rows], cl_seed[rows]
        for k in range(len(half.rows)):
            sub = half.sub[k]
            p, u_prev, cl = p[sub], u_prev[sub], cl[sub]
            idx, w = _gather_corners(sh_flat, p, consts)
            p, u_prev, logw = _step_fn(
                sh_flat[idx], w, p, u_prev, half.u_star[k], h, cutoff, cos_max, consts
            )
            cl = cl + logw
            pts.append(p)
            cls.append(cl)
    empty3 = seeds.new_zeros((0, 3))
    pts_rec = torch.cat(pts, 0) if pts else empty3
    cl_rec = torch.cat(cls, 0) if cls else cl_seed.new_zeros(0)
    return pts_rec, cl_rec, cl_seed


class _Adjoint(torch.autograd.Function):
    """Forward: outputs of the recursion from stored values (no graph). Backward: reverse sweep
    that rebuilds each step's local graph from the stored point and peak direction."""

    @staticmethod
    def forward(ctx, sh_flat, seeds, h, cutoff, cos_max, st, consts):
        ctx.st, ctx.consts = st, consts
        ctx.save_for_backward(sh_flat, seeds, h, cutoff, cos_max)
        with torch.no_grad():
            idx, w = _gather_corners(sh_flat, seeds, consts)
            _, cl_seed = _seed_fn(sh_flat[idx], w, st.u0, cutoff, consts, need_grad=False)
            pts, cls = [], []
            for hi, half in enumerate(st.halves):
                sign = 1.0 if hi == 0 else -1.0
                rows = half.start_rows
                u_prev, cl = sign * st.u0[rows], cl_seed[rows]
                for k in range(len(half.rows)):
                    sub = half.sub[k]
                    u_prev, cl = u_prev[sub], cl[sub]
                    p = half.p[k]
                    idx, w = _gather_corners(sh_flat, p, consts)
                    p_next, u_prev, logw = _step_fn(
                        sh_flat[idx],
                        w,
                        p,
                        u_prev,
                        half.u_star[k],
                        h,
                        cutoff,
                        cos_max,
                        consts,
                        need_grad=False,
                    )
                    cl = cl + logw
                    pts.append(p_next)
                    cls.append(cl)
        pts_rec = torch.cat(pts, 0) if pts else seeds.new_zeros((0, 3))
        cl_rec = torch.cat(cls, 0) if cls else cl_seed.new_zeros(0)
        return pts_rec, cl_rec, cl_seed

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_pts, g_cl, g_seed):
        sh_flat, seeds, h, cutoff, cos_max = ctx.saved_tensors
        st, consts = ctx.st, ctx.consts
        dt = seeds.dtype
        dev = seeds.device
        S = seeds.shape[0]
        want = ctx.needs_input_grad
        g_sh = torch.zeros_like(sh_flat) if want[0] else None
        scal = [torch.zeros((), dtype=torch.float64, device=dev) for _ in range(3)]
        sh_det = sh_flat.detach()
        h_l = h.detach().requires_grad_(True)
        cut_l = cutoff.detach().requires_grad_(True)
        cm_l = cos_max.detach().requires_grad_(True)
        a_p0 = torch.zeros((S, 3), dtype=dt, device=dev)
        a_u0 = torch.zeros((S, 3), dtype=dt, device=dev)
        a_cl0 = (
            g_seed.to(torch.float64).clone()
            if g_seed is not None
            else torch.zeros(S, dtype=torch.float64, device=dev)
        )
        g_pts = g_pts if g_pts is not None else torch.zeros((0, 3), dtype=dt, device=dev)
        g_cl = g_cl if g_cl is not None else torch.zeros(0, dtype=torch.float64, device=dev)
        # record offsets in output order
        offsets, off = [], 0
        for half in st.halves:
            o = []
            for r in half.rows:
                o.append(off)
                off += r.numel()
            offsets.append(o)
        full_g_pts = g_pts.numel() > 0
        full_g_cl = g_cl.numel() > 0
        for hi in (1, 0):
            half = st.halves[hi]
            K = len(half.rows)
            if K == 0:
                continue
            sign = 1.0 if hi == 0 else -1.0
            n_last = half.rows[-1].numel()
            a_p = torch.zeros((n_last, 3), dtype=dt, device=dev)
            a_u = torch.zeros((n_last, 3), dtype=dt, device=dev)
            a_cl = torch.zeros(n_last, dtype=torch.float64, device=dev)
            for k in range(K - 1, -1, -1):
                o, n_k = offsets[hi][k], half.rows[k].numel()
                if full_g_pts:
                    a_p = a_p + g_pts[o : o + n_k]
                if full_g_cl:
                    a_cl = a_cl + g_cl[o : o + n_k].to(torch.float64)
                # previous state (point before the step and previous direction), leaves
                p_l = half.p[k].detach().requires_grad_(True)
                if k > 0:
                    up = half.u_star[k - 1][half.sub[k]]
                else:
                    up = sign * st.u0[half.start_rows][half.sub[0]]
                up_l = up.detach().requires_grad_(True)
                with torch.enable_grad():
                    idx, w = _gather_corners(sh_det, p_l, consts)
                    corners = sh_det[idx].requires_grad_(want[0])
                    p_next, u, logw = _step_fn(
                        corners, w, p_l, up_l, half.u_star[k], h_l, cut_l, cm_l, consts
                    )
                    inputs = [p_l, up_l, h_l, cut_l, cm_l] + ([corners] if want[0] else [])
                    grads = torch.autograd.grad(
                        [p_next, u, logw], inputs, [a_p, a_u, a_cl], allow_unused=True
                    )
                gp, gu = grads[0], grads[1]
                for j in range(3):
                    if grads[2 + j] is not None:
                        scal[j] = scal[j] + grads[2 + j].to(torch.float64)
                if want[0] and grads[5] is not None:
                    g_sh.index_add_(0, idx.reshape(-1), grads[5].reshape(-1, g_sh.shape[1]))
                gp = gp if gp is not None else torch.zeros_like(a_p)
                gu = gu if gu is not None else torch.zeros_like(a_u)
                # scatter to the previous step's rows
                n_prev = half.rows[k - 1].numel() if k > 0 else half.start_rows.numel()
                sub = half.sub[k]
                a_p = torch.zeros((n_prev, 3), dtype=dt, device=dev).index_add_(0, sub, gp)
                a_u = torch.zeros((n_prev, 3), dtype=dt, device=dev).index_add_(0, sub, gu)
                a_cl = torch.zeros(n_prev, dtype=torch.float64, device=dev).index_add_(
                    0, sub, a_cl
                )
            rows = half.start_rows
            a_p0.index_add_(0, rows, a_p)
            a_u0.index_add_(0, rows, sign * a_u)
            a_cl0.index_add_(0, rows, a_cl)
        # seed
        p_l = seeds.detach().requires_grad_(True)
        with torch.enable_grad():
            idx, w = _gather_corners(sh_det, p_l, consts)
            corners = sh_det[idx].requires_grad_(want[0])
            u0, cl_seed = _seed_fn(corners, w, st.u0, cut_l, consts)
            inputs = [p_l, cut_l] + ([corners] if want[0] else [])
            grads = torch.autograd.grad([u0, cl_seed], inputs, [a_u0, a_cl0], allow_unused=True)
        if grads[0] is not None:
            a_p0 = a_p0 + grads[0]
        if grads[1] is not None:
            scal[1] = scal[1] + grads[1].to(torch.float64)
        if want[0] and grads[2] is not None:
            g_sh.index_add_(0, idx.reshape(-1), grads[2].reshape(-1, g_sh.shape[1]))
        outs = [g_sh, a_p0 if want[1] else None]
        for j, t in enumerate((h, cutoff, cos_max)):
            outs.append(scal[j].to(t.dtype).reshape(t.shape) if want[2 + j] else None)
        return (*outs, None, None)


# ----------------------------------------------------------------------------------------------
# public entry
# ----------------------------------------------------------------------------------------------


def _as_scalar(x, default: float, dtype) -> torch.Tensor:
    if x is None:
        return torch.tensor(float(default), dtype=dtype)
    if torch.is_tensor(x):
        if x.numel() != 1:
            raise ShapeError(f"expected a scalar tensor, got shape {tuple(x.shape)}")
        return x.reshape(())
    return torch.tensor(float(x), dtype=dtype)


def _resolve(params, voxel_sizes, step, angle, cutoff) -> ResolvedParameters:
    if isinstance(params, ResolvedParameters):
        base = TrackingParameters(
            step_mm=params.step_mm,
            angle_deg=params.angle_deg,
            cutoff=params.cutoff,
            min_length_mm=params.min_length_mm,
            max_length_mm=params.max_length_mm,
            rk4=params.rk4,
            downsample=params.downsample,
            unidirectional=params.unidirectional,
            stop=params.stop,
            seed_direction=params.seed_direction,
        )
    else:
        base = params or TrackingParameters()
    changes = {}
    for name, val in (("step_mm", step), ("angle_deg", angle), ("cutoff", cutoff)):
        if val is not None:
            changes[name] = float(val.detach()) if torch.is_tensor(val) else float(val)
    if changes:
        base = dataclasses.replace(base, **changes)
    rp = base.resolve(voxel_sizes)
    if rp.rk4 or rp.downsample > 1 or rp.stop:
        raise ConfigError(
            "track_differentiable supports first-order SD_Stream without "
            "-rk4, -downsample or -stop"
        )
    return rp


def track_differentiable(
    sh: torch.Tensor,
    affine,
    seeds: torch.Tensor,
    init_dirs: torch.Tensor,
    params: TrackingParameters | ResolvedParameters | None = None,
    *,
    step_mm: float | torch.Tensor | None = None,
    angle_deg: float | torch.Tensor | None = None,
    cutoff: float | torch.Tensor | None = None,
    temperature: float | tuple[float, float] = 0.02,
    path: str = "efficient",
    refine: int = 0,
    eps: float = 1e-6,
    voxel_sizes=None,
) -> DiffTrackResult:
    """Track SD_Stream streamlines whose points are differentiable.

    The forward pass is the hard tracker (the points equal ``invtract track``'s for the same
    seeds and initial directions). Gradients of any function of ``points`` / ``weights`` reach
    ``sh``, ``seeds``, ``init_dirs``, ``step_mm``, ``angle_deg`` and ``cutoff``.

    Args:
        sh: ``[X, Y, Z, K]`` SH coefficients (MRtrix3 basis, scanner frame); float32 gives
            tckgen parity, float64 gives gradient checks. May require grad, or be built from a
            learnable subset of voxels (``torch.where(mask[..., None], learn, fixed)``).
        affine: ``[4, 4]`` voxel -> scanner (mm) transform.
        seeds: ``[N, 3]`` seed points, scanner mm (may require grad).
        init_dirs: ``[N, 3]`` initial directions (may require grad; see Gradients).
        params: remaining tracking parameters (defaults: tckgen's). ``-rk4``, ``-downsample``,
            ``-stop`` and ROIs are not supported here.
        step_mm: step size (mm), float or 0-d tensor (may require grad). None: from ``params``.
        angle_deg: maximum angle (degrees), float or 0-d tensor (may require grad).
        cutoff: FOD amplitude cutoff, float or 0-d tensor (may require grad).
        temperature: T of the soft survival weights, one value for both tests or
            ``(T_amplitude, T_cos)``; amplitudes and cosines are divided by it.
        path: ``"efficient"`` (reverse-sweep backward, memory independent of graph depth) or
            ``"plain"`` (one autograd graph; reference).
        refine: float64 Riemannian Newton iterations that polish each MRtrix peak (0 = tckgen
            parity; > 0 makes every peak an exact critical point, so the points are a smooth
            function of the inputs between discrete events: used for finite-difference checks).
        eps: Hessian eigenvalue guard of :func:`~invtract.fod.peak_grad.implicit_peak`.
        voxel_sizes: voxel sizes (mm) used to resolve defaults, as in the image header (the
            ``Image.voxel_sizes`` of :func:`~invtract.io.image.load_fod`); derived from the
            affine's column norms when None, which can differ from the header in the last
            float32 bit and so change the default step. Ignored for ``ResolvedParameters``.

    Returns:
        A :class:`DiffTrackResult` (accepted streamlines only).

    Gradients:
        * ``sh``: exact (trilinear interpolation is linear; peaks by the implicit function
          theorem; amplitudes by the envelope theorem).
        * ``seeds``, points: exact where the trilinear weights are smooth (a.e.; at a voxel centre
          plane the one-sided derivative of the current cell is used).
        * ``step_mm``: exact.
        * ``init_dirs``: zero (the seed peak depends on the start direction only through which
          basin of attraction it lies in: piecewise constant).
        * ``cutoff``, ``angle_deg``: only through ``weights`` (soft survival surrogate); the points
          do not depend on them.
        * Discrete events (a lobe switch, leaving the field of view, entering an all-zero voxel,
          the length limits, seed rejection) are held fixed: zero gradient, never NaN/Inf.

    Example:
        >>> res = track_differentiable(sh, affine, seeds, dirs, step_mm=h)  # doctest: +SKIP
        >>> (res.points.sum(-1) * res.weights).sum().backward()  # doctest: +SKIP
    """
    if path not in ("efficient", "plain"):
        raise ConfigError(f"unknown path {path!r}; valid: efficient, plain")
    if sh.ndim != 4:
        raise ShapeError(f"sh must be [X, Y, Z, K], got {tuple(sh.shape)}")
    if seeds.ndim != 2 or seeds.shape[-1] != 3 or init_dirs.shape != seeds.shape:
        raise ShapeError(
            f"seeds and init_dirs must be [N, 3], got {tuple(seeds.shape)}, "
            f"{tuple(init_dirs.shape)}"
        )
    dt = sh.dtype
    affine = np.asarray(affine.detach().cpu() if torch.is_tensor(affine) else affine, np.float64)
    vox = np.sqrt((affine[:3, :3] ** 2).sum(0)) if voxel_sizes is None else voxel_sizes
    rp = _resolve(params, vox, step_mm, angle_deg, cutoff)
    field = FODField.from_array(sh.detach(), affine, device=sh.device, dtype=dt)
    if torch.is_tensor(step_mm):  # move by the exact step (float64 runs); decisions unchanged
        rp = dataclasses.replace(rp, step_mm=float(step_mm.detach()))
    st = _hard_forward(field, seeds, init_dirs, rp, refine)
    t_amp, t_cos = (temperature, temperature) if np.isscalar(temperature) else temperature
    consts = _Consts(field.shape, field.scanner2voxel, field.lmax, float(t_amp), float(t_cos), eps)
    h = _as_scalar(step_mm, rp.step_mm, dt).to(dt)
    if not torch.is_tensor(step_mm):
        h = torch.tensor(rp.step_mm, dtype=dt)
    cut = _as_scalar(cutoff, rp.cutoff, torch.float64)
    if torch.is_tensor(angle_deg):
        cos_max = torch.cos(angle_deg.reshape(()).to(torch.float64) * (math.pi / 180.0))
    else:
        cos_max = torch.tensor(rp.dot_threshold, dtype=torch.float64)
    sh_flat = sh.reshape(-1, sh.shape[-1])
    sid = st.seed_ids
    # seeds of accepted streamlines: hard values, gradient routed to the caller's tensor
    seeds_acc = st.seeds + (seeds[sid].to(dt) - seeds[sid].to(dt).detach())
    if path == "plain":
        pts_rec, cl_rec, cl_seed = _plain(sh_flat, seeds_acc, h, cut, cos_max, st, consts)
    else:
        pts_rec, cl_rec, cl_seed = _Adjoint.apply(sh_flat, seeds_acc, h, cut, cos_max, st, consts)
    if init_dirs.requires_grad:  # documented zero gradient (basin of attraction)
        zero = torch.nan_to_num(init_dirs[sid]).sum(-1) * 0.0
        cl_seed = cl_seed + zero.to(cl_seed.dtype)
    return _assemble(st, seeds_acc, pts_rec, cl_rec, cl_seed)


def _assemble(st: _Structure, seeds_acc, pts_rec, cl_rec, cl_seed) -> DiffTrackResult:
    S = st.seed_ids.numel()
    dev = seeds_acc.device
    lengths = 1 + st.n1 + st.n2
    L = int(lengths.max()) if S else 0
    rows_all, cols_all = [], []
    for hi, half in enumerate(st.halves):
        for k, r in enumerate(half.rows):
            rows_all.append(r)
            cols_all.append(st.n1[r] - 1 - k if hi == 0 else st.n1[r] + 1 + k)
    ar = torch.arange(S, device=dev)
    rows_all.append(ar)
    cols_all.append(st.n1)
    flat = torch.cat(rows_all) * L + torch.cat(cols_all) if S else ar
    pts = torch.cat([pts_rec, seeds_acc], 0)
    cls = torch.cat([cl_rec, cl_seed], 0)
    points = pts.new_zeros((S * L, 3)).index_put((flat,), pts).reshape(S, L, 3)
    logw = cls.new_full((S * L,), -math.inf).index_put((flat,), cls).reshape(S, L)
    mask = torch.arange(L, device=dev)[None, :] < lengths[:, None]
    weights = torch.exp(logw)
    return DiffTrackResult(
        points=points,
        mask=mask,
        lengths=lengths,
        weights=weights,
        seed_index=st.n1.clone(),
        seed_ids=st.seed_ids,
        status=st.status,
        term=st.term,
    )
