"""Differentiable SD_Stream tracking: hard forward pass, exact gradients, O(1)-in-length backward.

The forward pass is the hard tracker: every point is the one ``invtract track`` writes.
Gradients come from replaying the discrete recursion with the decisions (which seeds survive,
how many steps each half takes, which lobe each peak search chose) held fixed:

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
* ``path="efficient"``: a custom :class:`torch.autograd.Function` whose forward returns the hard
  pass's points and weights (as they are, no copies) and whose backward is a closed-form reverse
  sweep of the discrete recursion (its adjoint); no autograd graph is built. On CPU with numba
  the sweep is compiled (:mod:`~invtract.tracking.adjoint_cpu`: one streamline at a time, last
  step to first); otherwise (CUDA, no numba, ``ADJOINT_BACKEND = "torch"``) it is vectorised in
  torch, batched over the streamlines alive at each step, with the implicit peak derivatives
  from :class:`~invtract.fod.peak_grad.PeakJet`. The hard pass records only the converged peak
  of every step (12 bytes per streamline-step in float32, the only state kept besides the
  outputs); the points and weights are then recomputed from the seeds and the peaks.

The hard pass (both paths) tracks nothing here: an engine's "record peaks" mode
(:func:`~invtract.tracking.engines.get_peak_engine`) tracks, with the rules of
:mod:`~invtract.tracking.rules`, and records every point's peak; the tape is built from that
record, one builder for every engine. On CPU with numba for a float32 FOD and ``refine=0`` it
is the fused numba kernel of ``invtract track``
(:func:`~invtract.tracking.fused_cpu.track_fused_cpu_peaks`, same streamlines bit for bit),
else (float64, CUDA, ``refine > 0``; ``HARD_PASS = "torch"`` forces it) the torch engine's
(:func:`~invtract.tracking.tracker.track_torch_peaks`, the streamlines of
``invtract track --engine torch``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError, ShapeError
from ..fod.field import FODField, as_fod_field
from ..fod.interp import corner_weights, world_to_voxel
from ..fod.peak_grad import (
    PeakJet,
    fast_sh_basis,
    implicit_peak,
    peak_amplitude,
)
from ..params import ResolvedParameters, TrackingParameters
from ..streamlines import Streamlines
from .engines import get_peak_engine
from .rules import WEIGHT_THRESHOLD
from .types import PeakRecord, Reject

if TYPE_CHECKING:  # annotations only
    from ..io.image import Image

__all__ = ["DiffTrackResult", "track_differentiable", "resolved_parameters"]


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
# hard forward pass: the tracker's points, plus the converged peaks and the soft weights
# ----------------------------------------------------------------------------------------------


@dataclass
class _Consts:
    shape: tuple
    s2v: torch.Tensor
    lmax: int
    t_amp: float
    t_cos: float
    eps: float
    cut: torch.Tensor  # 0-d float64 (value of the cutoff)
    cos_max: torch.Tensor  # 0-d float64

    def __post_init__(self):
        dev = self.s2v.device
        bits = torch.tensor([[c & 1, (c >> 1) & 1, (c >> 2) & 1] for c in range(8)], device=dev)
        self.bits = bits.bool()  # [8, 3] corner c = x + 2y + 4z
        self.signs = 2.0 * bits.to(torch.float64) - 1.0
        self.shape_t = torch.tensor(self.shape, dtype=torch.float64, device=dev)
        self.nmax = torch.tensor(self.shape, dtype=torch.int64, device=dev) - 1
        self.strides = torch.tensor(
            [self.shape[1] * self.shape[2], self.shape[2], 1], dtype=torch.int64, device=dev
        )


@dataclass
class _Tape:
    """The accepted streamlines in the padded output layout (values only, no graph).

    Column ``n1[s]`` of row s is the seed; the first half's step k wrote column n1 - 1 - k, the
    second half's step k column n1 + 1 + k. ``u_pad`` holds, at each non-seed column, the
    converged peak that produced that point (12 bytes per streamline-step: the only state the
    reverse sweep stores besides the outputs).
    """

    seeds: torch.Tensor  # [S, 3] hard seed points (field dtype)
    u0: torch.Tensor  # [S, 3] seed peak u*_0
    n1: torch.Tensor  # [S] points added by the first half
    n2: torch.Tensor  # [S]
    L: int
    points: torch.Tensor  # [S, L, 3] hard points, zero padding
    u_pad: torch.Tensor  # [S, L, 3] peak per point (undefined at the seed column and padding)
    weights: torch.Tensor  # [S, L] float64 soft survival weight, 0 padding
    seed_ids: torch.Tensor  # [S]
    status: torch.Tensor  # [N]
    term: torch.Tensor  # [N, 2]

    def half(self, hi: int):
        """``(perm, counts, base, sgn)``: rows sorted by decreasing half length; step k of the
        half involves rows ``perm[:counts[k]]`` and writes flat index ``base[:m] + sgn * k``."""
        nh = self.n1 if hi == 0 else self.n2
        order = torch.argsort(nh, descending=True, stable=True)
        hist = torch.bincount(nh, minlength=1).flip(0).cumsum(0).flip(0)  # [max+1]: #(n >= k)
        counts = hist[1:].tolist()  # m_k = #(n > k), k = 0 .. max - 1
        sgn = -1 if hi == 0 else 1
        base = order * self.L + self.n1[order] + sgn  # flat index of step 0's point
        return order, counts, base, sgn


def _log_weight(c, u_star, u_prev, consts: _Consts):
    """log sig((A - cutoff)/T_A) + log sig((u_prev . u - cos_max)/T_c), float64 (no grad)."""
    # = peak_amplitude(c, u_star) (the plain path's value, to rounding), in fewer operations
    A = (c.to(torch.float64) * fast_sh_basis(u_star, consts.lmax)).sum(-1).to(c.dtype)
    cos = (u_prev.to(torch.float64) * u_star.to(torch.float64)).sum(-1)
    A = A.to(torch.float64)
    return F.logsigmoid((A - consts.cut) / consts.t_amp) + F.logsigmoid(
        (cos - consts.cos_max) / consts.t_cos
    )


def _tape_values(tp: _Tape, sh_flat, h: float, consts: _Consts, cl_seed):
    """Fill ``tp.points`` and ``tp.weights`` from the seeds and the stored peaks.

    p_{k+1} = p_k + h u_k in the FOD dtype, as the hard pass moved (same values), and the soft
    weights s_k (the formulation of the module docstring, log-weights accumulated in float64).
    Compiled on CPU when numba is available, else one vectorised torch step at a time.
    """
    if _use_numba(sh_flat.device):
        from . import adjoint_cpu

        adjoint_cpu.tape_values(
            tp.points.numpy(),
            tp.weights.numpy(),
            tp.seeds.numpy(),
            tp.u0.numpy(),
            tp.u_pad.numpy(),
            tp.n1.numpy(),
            tp.n2.numpy(),
            cl_seed.numpy(),
            h,
            sh_flat.contiguous().numpy(),
            consts.s2v.cpu().to(torch.float64).numpy(),
            consts.shape,
            consts.lmax,
            consts.t_amp,
            consts.t_cos,
            float(consts.cut),
            float(consts.cos_max),
            threads=torch.get_num_threads(),
        )
        return
    S, L = tp.n1.numel(), tp.L
    P = tp.points.view(-1, 3)
    Wf = tp.weights.view(-1)
    U = tp.u_pad.view(-1, 3)
    P.zero_()
    Wf.fill_(-math.inf)
    seed_flat = torch.arange(S, device=P.device) * L + tp.n1
    P[seed_flat] = tp.seeds
    Wf[seed_flat] = cl_seed
    step = torch.tensor(h, dtype=P.dtype, device=P.device)
    for hi in (0, 1):
        order, counts, base, sgn = tp.half(hi)
        if not counts:
            continue
        p, u_prev, cl = tp.seeds[order], -tp.u0[order] if hi else tp.u0[order], cl_seed[order]
        for k, m in enumerate(counts):
            p, u_prev, cl = p[:m], u_prev[:m], cl[:m]
            flat = base[:m] + sgn * k
            u = U[flat]
            idx, w = _gather_corners(sh_flat, p, consts)
            cl = cl + _log_weight(_interp(sh_flat[idx], w), u, u_prev, consts)
            p = p + u * step
            P[flat] = p
            Wf[flat] = cl
            u_prev = u
    Wf.exp_()


#: engine whose "record peaks" mode runs the hard pass (both paths;
#: :func:`~invtract.tracking.engines.get_peak_engine`): "auto" (the numba kernel of
#: ``invtract track`` for a float32 CPU FOD with ``refine=0``, else the torch engine), "numba"
#: (an error where the kernel cannot run; "fused" is its former name) or "torch"
HARD_PASS = "auto"

#: seeds per call of the recording engine: each call holds its ``[chunk, L, 3]`` peaks (and
#: the numba kernel its points; untouched pages cost nothing) until its accepted rows' peaks
#: are copied out
PEAK_CHUNK = 8192
#: the same on CUDA, where fewer, larger calls keep the device busy
PEAK_CHUNK_CUDA = 1 << 16


@torch.no_grad()
def _hard_forward(field: FODField, seeds, init_dirs, params, refine: int, consts) -> _Tape:
    """The hard pass: an engine records the streamlines' peaks, chunk by chunk (the accepted
    rows' peaks kept), and the tape is built from them (:func:`_tape_from_records`)."""
    name = "numba" if HARD_PASS == "fused" else HARD_PASS
    _, record_peaks = get_peak_engine(name, field, refine)
    dev, dt = field.device, field.dtype
    seeds = seeds.detach().to(device=dev, dtype=dt)
    init = init_dirs.detach().to(device=dev, dtype=dt)
    n = seeds.shape[0]
    chunk = PEAK_CHUNK_CUDA if dev.type == "cuda" else PEAK_CHUNK
    kept = []
    for a in range(0, n, chunk):
        # no points: the tape recomputes them, the same values, from the seeds and the peaks
        rec = record_peaks(
            field, seeds[a : a + chunk], init[a : a + chunk], params, refine, with_points=False
        )
        kept.append(_accepted_rows(rec, a, params.unidirectional, dev))
        del rec  # the chunk's buffers go before the next call
    return _tape_from_records(kept, seeds, field, params, consts)


def _accepted_rows(rec: PeakRecord, offset: int, unidirectional: bool, dev) -> dict:
    """The tape's part of one chunk's record: its decisions and, for the accepted rows, seed id,
    seed column ``n1``, lengths, seed peak and peaks ``[S_c, L_c, 3]`` (a copy, so that the
    record can be released). A unidirectional row (seed first, as written) is turned round:
    the tape keeps the half tracked along u0 before the seed."""
    status, term = rec.status.to(dev, torch.int64), rec.term.to(dev, torch.int64)
    acc = torch.nonzero(status == int(Reject.ACCEPTED), as_tuple=False).flatten()
    ln = rec.lengths.to(dev)[acc]
    Lc = int(ln.max()) if acc.numel() else 0
    peaks = rec.peaks.to(dev)[acc, :Lc]
    n1 = rec.seed_index.to(dev)[acc]
    if unidirectional:
        peaks = peaks.gather(1, _reversed_within(ln, Lc)[..., None].expand(-1, -1, 3))
        n1 = ln - 1
    return {
        "status": status,
        "term": term,
        "ids": acc + offset,
        "n1": n1,
        "lengths": ln,
        "u0": rec.init_dir.to(dev)[acc],
        "peaks": peaks,
    }


def _reversed_within(lengths: torch.Tensor, L: int) -> torch.Tensor:
    """``[S, L]`` column index turning the first ``lengths[s]`` entries of each row round."""
    j = torch.arange(L, device=lengths.device)[None, :]
    return torch.where(j < lengths[:, None], lengths[:, None] - 1 - j, j)


def _tape_from_records(kept: list, seeds, field: FODField, params, consts) -> _Tape:
    """The :class:`_Tape` of the accepted rows of all chunks (one builder for every engine):
    the peaks padded to the longest row, the seed log-weights, then the points and weights
    recomputed from the seeds and the peaks (:func:`_tape_values`)."""
    dev, dt = field.device, field.dtype

    def cat(key, empty):
        return torch.cat([k[key] for k in kept]) if kept else empty

    i64 = dict(dtype=torch.int64, device=dev)
    status = cat("status", torch.zeros(0, **i64))
    term = cat("term", torch.zeros((0, 2), **i64))
    seed_ids, n1 = cat("ids", torch.zeros(0, **i64)), cat("n1", torch.zeros(0, **i64))
    lengths = cat("lengths", torch.zeros(0, **i64))
    u0 = cat("u0", torch.zeros((0, 3), dtype=dt, device=dev)).to(dt)
    S = seed_ids.numel()
    L = int(lengths.max()) if S else 0
    if len(kept) == 1 and kept[0]["peaks"].shape[1] == L:
        u_pad = kept.pop()["peaks"].to(dt)
    else:
        u_pad = torch.empty((S, L, 3), dtype=dt, device=dev)
        r = 0
        while kept:
            pc = kept.pop(0)["peaks"]
            u_pad[r : r + pc.shape[0], : pc.shape[1]] = pc
            r += pc.shape[0]
    seeds_acc = seeds[seed_ids]
    c, _ = field.sample(seeds_acc)
    A0 = peak_amplitude(c, u0, field.lmax).to(torch.float64)
    cl_seed = F.logsigmoid((A0 - consts.cut) / consts.t_amp)
    tp = _Tape(
        seeds=seeds_acc,
        u0=u0,
        n1=n1,
        n2=lengths - 1 - n1,
        L=L,
        points=torch.empty((S, L, 3), dtype=dt, device=dev),
        u_pad=u_pad,
        weights=torch.empty((S, L), dtype=torch.float64, device=dev),
        seed_ids=seed_ids,
        status=status,
        term=term,
    )
    _tape_values(tp, field.sh_flat, params.step_mm, consts, cl_seed)
    return tp


# ----------------------------------------------------------------------------------------------
# the differentiable formulation: plain autograd (reference)
# ----------------------------------------------------------------------------------------------


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


def _seed_fn(corners, weights, u0_star, cutoff, consts):
    c = _interp(corners, weights)
    u0 = implicit_peak(c, u0_star, consts.lmax, consts.eps)
    A = peak_amplitude(c, u0_star, consts.lmax).to(torch.float64)
    cl = F.logsigmoid((A - cutoff.to(torch.float64)) / consts.t_amp)
    return u0, cl


def _step_fn(corners, weights, p, u_prev, u_star, h, cutoff, cos_max, consts):
    c = _interp(corners, weights)
    u = implicit_peak(c, u_star, consts.lmax, consts.eps)
    A = peak_amplitude(c, u_star, consts.lmax).to(torch.float64)
    cos = (u_prev.to(torch.float64) * u.to(torch.float64)).sum(-1)
    logw = F.logsigmoid((A - cutoff.to(torch.float64)) / consts.t_amp) + F.logsigmoid(
        (cos - cos_max.to(torch.float64)) / consts.t_cos
    )
    p_next = p + u * h.to(p.dtype)
    return p_next, u, logw


def _plain(sh_flat, seeds, h, cutoff, cos_max, tp: _Tape, consts: _Consts):
    """One autograd graph through all steps. Returns (points [S, L, 3], cl [S, L])."""
    S, L = tp.n1.numel(), tp.L
    idx, w = _gather_corners(sh_flat, seeds, consts)
    u0, cl_seed = _seed_fn(sh_flat[idx], w, tp.u0, cutoff, consts)
    u_flat = tp.u_pad.reshape(-1, 3)
    flats = [torch.arange(S, device=seeds.device) * L + tp.n1]
    pts, cls = [seeds], [cl_seed]
    for hi in (0, 1):
        order, counts, base, sgn = tp.half(hi)
        if not counts:
            continue
        p, u_prev, cl = seeds[order], -u0[order] if hi else u0[order], cl_seed[order]
        for k, m in enumerate(counts):
            p, u_prev, cl = p[:m], u_prev[:m], cl[:m]
            flat = base[:m] + sgn * k
            idx, w = _gather_corners(sh_flat, p, consts)
            p, u_prev, logw = _step_fn(
                sh_flat[idx], w, p, u_prev, u_flat[flat], h, cutoff, cos_max, consts
            )
            cl = cl + logw
            pts.append(p)
            cls.append(cl)
            flats.append(flat)
    flat = torch.cat(flats)
    points = seeds.new_zeros((S * L, 3)).index_put((flat,), torch.cat(pts, 0))
    cl_all = cl_seed.new_full((S * L,), -math.inf).index_put((flat,), torch.cat(cls, 0))
    return points.reshape(S, L, 3), cl_all.reshape(S, L)


# ----------------------------------------------------------------------------------------------
# the memory-efficient path: closed-form reverse sweep over the stored peaks
# ----------------------------------------------------------------------------------------------


class _Grads:
    """Accumulators of the reverse sweep."""

    def __init__(self, sh_flat, want_sh: bool):
        self.sh = torch.zeros_like(sh_flat) if want_sh else None
        z = torch.zeros((), dtype=torch.float64, device=sh_flat.device)
        self.h, self.cut, self.cos = z.clone(), z.clone(), z.clone()


def _local_adjoint(sh_flat, consts, p, u_star, u_prev, a_p, a_u, a_l, h, grads, step=True):
    """Adjoint of one step (or of the seed evaluation when ``step`` is False).

    The step maps (p, u_prev) to (p + h u, u, logw) with u = implicit_peak(c(p), u*) and
    logw = log sig((A - cutoff)/T_A) + log sig((u_prev . u - cos_max)/T_c); the seed maps p to
    (u_0, log sig((A_0 - cutoff)/T_A)). Given the adjoints ``a_p`` [m, 3] of the next point
    (step only; the seed's direct term is added by the caller), ``a_u`` [m, 3] of u and ``a_l``
    [m] of logw, returns (adjoint of p [m, 3], adjoint of u_prev [m, 3] or None), float64, and
    adds the FOD / step / cutoff / angle gradients to ``grads``. Closed form, batched over the
    m rows; only [m, 8, K] corner gathers and [m, K] jets, no autograd graph.
    """
    f64 = torch.float64
    dt = sh_flat.dtype
    m = p.shape[0]
    K = sh_flat.shape[1]
    # trilinear corners and weights (as interp.corner_weights, all 8 corners at once), plus
    # their derivatives w.r.t. the per-axis fractions
    v = world_to_voxel(p, consts.s2v)
    n = consts.shape_t
    fl = torch.floor(v)
    edge = (v < 0) | (v > n - 1)
    f = torch.where(edge, torch.zeros_like(v), v - fl).to(dt)  # [m, 3]
    bits = consts.bits  # [8, 3] bool
    wax = torch.where(bits, f[:, None, :], 1.0 - f[:, None, :])  # [m, 8, 3]
    w = wax[..., 0] * (wax[..., 1] * wax[..., 2])
    live = w >= WEIGHT_THRESHOLD  # weights zeroed below the threshold have no gradient
    w = torch.where(live, w, torch.zeros_like(w))  # [m, 8]
    flo = fl.to(torch.int64)
    i0 = torch.minimum(flo.clamp(min=0), consts.nmax)
    i1 = torch.minimum((flo + 1).clamp(min=0), consts.nmax)
    index = (torch.where(bits, i1[:, None, :], i0[:, None, :]) * consts.strides).sum(-1)
    wax = wax.to(f64)
    # d w_c / d f_x = sign_x(c) * product of the other two axis weights
    dwdf = torch.stack(
        [wax[..., 1] * wax[..., 2], wax[..., 0] * wax[..., 2], wax[..., 0] * wax[..., 1]], -1
    ) * (consts.signs * live[..., None])  # [m, 8, 3]
    corners = sh_flat.index_select(0, index.reshape(-1)).reshape(m, 8, K)
    c = (w[:, :, None] * corners).sum(1)  # [m, K]
    # implicit peak geometry at u*
    us = u_star.to(f64)
    jet = PeakJet(us, consts.lmax, dtype=dt)
    q, A = jet.apply(c)
    g1, g2, gu, h11, h22, hpp = q.unbind(-1)
    a = h11 - gu
    d = h22 - gu
    b = 0.5 * (hpp - h11 - h22)
    lam = 0.5 * (a + d) + torch.sqrt((0.5 * (a - d)) ** 2 + b * b)
    shift = torch.nan_to_num(torch.clamp(lam + consts.eps, min=0.0), nan=0.0, posinf=0.0)
    a, d = a - shift, d - shift
    det = a * d - b * b
    x0 = (d * g1 - b * g2) / det
    x1 = (a * g2 - b * g1) / det
    # amplitude term (the plain path rounds A to the FOD dtype before the sigmoid)
    zA = (A.to(dt).to(f64) - consts.cut) / consts.t_amp
    sA = torch.sigmoid(-zA) * a_l / consts.t_amp  # d/dA of the log-weight, times a_l
    grads.cut -= sA.sum()
    ubar = a_u
    g_prev = None
    if step:
        cos = (u_prev.to(f64) * us).sum(-1)
        zc = (cos - consts.cos_max) / consts.t_cos
        sc = torch.sigmoid(-zc) * a_l / consts.t_cos
        grads.cos -= sc.sum()
        ubar = ubar + h * a_p + sc[:, None] * u_prev.to(f64)
        g_prev = sc[:, None] * us
        grads.h += (a_p * us).sum()
    # u = u* - E x (value u*): x_bar = -E^T u_bar; y = H^-1 x_bar; q_bar by the chain rule
    xb0 = -(ubar * jet.e1).sum(-1)
    xb1 = -(ubar * jet.e2).sum(-1)
    y0 = (d * xb0 - b * xb1) / det
    y1 = (a * xb1 - b * xb0) / det
    ok = torch.isfinite(x0) & torch.isfinite(x1) & torch.isfinite(y0) & torch.isfinite(y1)
    bb = -(y0 * x1 + y1 * x0)
    qb = torch.stack(
        [y0, y1, y0 * x0 + y1 * x1, -y0 * x0 - 0.5 * bb, -y1 * x1 - 0.5 * bb, 0.5 * bb], -1
    )
    qb = torch.where(ok[:, None], qb, torch.zeros_like(qb))
    cbar = jet.transpose(qb, sA).to(dt)  # [m, K]
    # through the interpolation: corners get w_c * c_bar, the weights C_c . c_bar
    if grads.sh is not None:
        grads.sh.index_add_(
            0, index.reshape(-1), (w[:, :, None] * cbar[:, None, :]).reshape(-1, K)
        )
    wbar = (corners * cbar[:, None, :]).sum(-1).to(f64)  # [m, 8]
    fbar = (wbar[..., None] * dwdf).sum(1)  # [m, 3]
    fbar = torch.where(edge, torch.zeros_like(fbar), fbar)
    pbar = fbar @ consts.s2v[:, :3].to(f64)
    if step:
        pbar = pbar + a_p
    return pbar, g_prev


#: compiled helpers of the efficient path (the reverse sweep and the tape's points / weights):
#: "auto" (:mod:`~invtract.tracking.adjoint_cpu` for CPU tensors when numba is available, else
#: the vectorised torch code, also used on CUDA), "numba" or "torch"
ADJOINT_BACKEND = "auto"


def _use_numba(device) -> bool:
    if ADJOINT_BACKEND == "torch" or torch.device(device).type != "cpu":
        return False
    from . import adjoint_cpu

    if ADJOINT_BACKEND == "numba" and not adjoint_cpu.available():
        raise ConfigError("ADJOINT_BACKEND='numba' needs numba")
    return adjoint_cpu.available()


class _Adjoint(torch.autograd.Function):
    """Forward: the recorded points and weights (returned as they are, no copy, no graph).
    Backward: closed-form reverse sweep over the stored peak directions (compiled per streamline
    on CPU, or batched over all streamlines alive at each step in torch)."""

    @staticmethod
    def forward(ctx, sh_in, seeds, h, cutoff, cos_max, tp, consts, full=None, voxels=None):
        # sh_in: the FOD input, all coefficients [V, K] (full, voxels None) or the learned rows
        # [n, K] of the flat voxels ``voxels`` [n] within the coefficients ``full`` [V, K]
        # The outputs go through save_for_backward only (not copied: an in-place change of them
        # is caught by autograd). Kept on ctx as well, they would form a cycle (output ->
        # grad_fn -> ctx -> output) that only the cycle collector frees: the tape of every
        # backward would outlive it, and memory would pile up across a fitting loop.
        ctx.tp = dataclasses.replace(tp, points=None, weights=None)
        ctx.consts = consts
        ctx.scalar_dtypes = (h.dtype, cutoff.dtype, cos_max.dtype)
        ctx.sh_dtype = sh_in.dtype
        sh_flat = sh_in if full is None else full.detach()
        # the coefficients are saved (an in-place change of them before backward is caught)
        ctx.save_for_backward(sh_flat, h, tp.points, tp.weights, voxels)
        return tp.points, tp.weights

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_pts, g_w):
        sh_flat, h, points, weights, voxels = ctx.saved_tensors
        want = ctx.needs_input_grad
        if _use_numba(sh_flat.device):
            g_sh, g_seeds, (gh, gcut, gcos) = _backward_numba(
                ctx.tp, ctx.consts, sh_flat, h, points, weights, g_pts, g_w, want[0], voxels
            )
        else:  # the reference: every voxel's gradient, then the learned rows'
            g_sh, g_seeds, (gh, gcut, gcos) = _backward_torch(
                ctx.tp, ctx.consts, sh_flat, h, points, weights, g_pts, g_w, want[0]
            )
            if g_sh is not None and voxels is not None:
                g_sh = g_sh[voxels]
        dts = ctx.scalar_dtypes
        return (
            g_sh.to(ctx.sh_dtype) if g_sh is not None else None,
            g_seeds.to(ctx.tp.seeds.dtype) if want[1] else None,
            gh.to(dts[0]).reshape(h.shape) if want[2] else None,
            gcut.to(dts[1]) if want[3] else None,
            gcos.to(dts[2]) if want[4] else None,
            None,
            None,
            None,
            None,
        )


def _backward_numba(tp, consts, sh_flat, h, points, weights, g_pts, g_w, want_sh, voxels=None):
    """The reverse sweep compiled (:func:`~invtract.tracking.adjoint_cpu.reverse_sweep`); the
    FOD gradient ``[V, K]``, or ``[n, K]`` of the flat voxels ``voxels`` [n] alone."""
    from . import adjoint_cpu

    def arr(t):
        return None if t is None else t.detach().numpy()

    sh = sh_flat.detach()
    g_sh, g_seeds, scal = adjoint_cpu.reverse_sweep(
        sh.contiguous().numpy(),
        consts.s2v.detach().cpu().to(torch.float64).numpy(),
        consts.shape,
        consts.lmax,
        arr(points),
        arr(tp.u_pad),
        arr(tp.seeds),
        arr(tp.u0),
        arr(tp.n1),
        arr(tp.n2),
        arr(g_pts),
        arr(g_w),
        arr(weights),
        float(h.detach()),
        consts.t_amp,
        consts.t_cos,
        consts.eps,
        float(consts.cut),
        float(consts.cos_max),
        want_sh,
        threads=torch.get_num_threads(),
        voxels=arr(voxels),
    )
    f64 = torch.float64
    g_sh = torch.from_numpy(g_sh).to(sh.dtype) if g_sh is not None else None
    scal = tuple(torch.tensor(v, dtype=f64) for v in scal)
    return g_sh, torch.from_numpy(g_seeds), scal


def _backward_torch(tp, consts, sh_flat, h, points, weights, g_pts, g_w, want_sh):
    """The reverse sweep in torch: at step k (last to first) all rows alive at k at once."""
    f64 = torch.float64
    dev = sh_flat.device
    S, L = tp.n1.numel(), tp.L
    grads = _Grads(sh_flat.detach(), want_sh)
    sh = sh_flat.detach()
    hv = h.detach().to(f64)
    P = points.detach().reshape(-1, 3)
    U = tp.u_pad.reshape(-1, 3)
    gP = g_pts.reshape(-1, 3).to(f64) if g_pts is not None else None
    # adjoint of the log-weight: weights = exp(log-weight)
    gC = (g_w.to(f64) * weights.detach()).reshape(-1) if g_w is not None else None
    seed_flat = torch.arange(S, device=dev) * L + tp.n1
    a_p0 = gP[seed_flat] if gP is not None else torch.zeros((S, 3), dtype=f64, device=dev)
    a_l0 = gC[seed_flat] if gC is not None else torch.zeros(S, dtype=f64, device=dev)
    a_u0 = torch.zeros((S, 3), dtype=f64, device=dev)
    for hi in (1, 0):
        order, counts, base, sgn = tp.half(hi)
        if not counts:
            continue
        s_h = counts[0]
        a_p = torch.zeros((s_h, 3), dtype=f64, device=dev)
        a_u = torch.zeros((s_h, 3), dtype=f64, device=dev)
        a_l = torch.zeros(s_h, dtype=f64, device=dev)
        u0 = -tp.u0[order[:s_h]] if hi else tp.u0[order[:s_h]]
        for k in range(len(counts) - 1, -1, -1):
            m = counts[k]
            f_out = base[:m] + sgn * k
            f_in = f_out - sgn
            if gP is not None:
                a_p[:m] += gP[f_out]
            if gC is not None:
                a_l[:m] += gC[f_out]
            u_prev = U[f_in] if k > 0 else u0[:m]
            pbar, ubar = _local_adjoint(
                sh, consts, P[f_in], U[f_out], u_prev, a_p[:m], a_u[:m], a_l[:m], hv, grads
            )
            a_p[:m] = pbar
            a_u[:m] = ubar
        rows = order[:s_h]
        a_p0.index_add_(0, rows, a_p)
        a_u0.index_add_(0, rows, -a_u if hi else a_u)
        a_l0.index_add_(0, rows, a_l)
    pbar, _ = _local_adjoint(
        sh, consts, tp.seeds, tp.u0, None, None, a_u0, a_l0, hv, grads, step=False
    )
    return grads.sh, a_p0 + pbar, (grads.h, grads.cut, grads.cos)


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


def resolved_parameters(
    fod, params=None, step_mm=None, angle_deg=None, cutoff=None
) -> ResolvedParameters:
    """The parameters :func:`track_differentiable` tracks with on ``fod`` (an
    :class:`~invtract.fod.field.FODField` or an :class:`~invtract.io.image.Image`): defaults
    resolved with its header voxel sizes (as tckgen does); ``step_mm`` / ``angle_deg`` /
    ``cutoff`` (floats or 0-d tensors) override."""
    return _resolve(params, fod_voxel_sizes(fod), step_mm, angle_deg, cutoff)


def fod_voxel_sizes(fod) -> tuple:
    """``(3,)`` voxel sizes (mm) of an FOD that resolve tckgen's defaults: a field's
    :attr:`~invtract.fod.field.FODField.header_voxel_sizes`, an image's header ones."""
    if isinstance(fod, FODField):
        return fod.header_voxel_sizes
    if getattr(fod, "voxel_sizes", None) is not None:
        return tuple(float(v) for v in fod.voxel_sizes[:3])
    raise ConfigError(f"expected an FODField or an Image as the FOD, got {type(fod).__name__}")


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
    fod: FODField | Image,
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
) -> DiffTrackResult:
    """Track SD_Stream streamlines whose points are differentiable.

    The forward pass is the hard tracker (the points equal ``invtract track``'s for the same
    seeds and initial directions). Gradients of any function of ``points`` / ``weights`` reach
    the FOD's coefficients, ``seeds``, ``init_dirs``, ``step_mm``, ``angle_deg`` and ``cutoff``.

    Args:
        fod: the FOD: an :class:`~invtract.fod.field.FODField` (its geometry and header voxel
            sizes resolve the defaults, as tckgen's do) whose coefficients may require grad
            (``field.with_sh(sh)``, e.g. ``sh = torch.where(mask[..., None], learn, fixed)``),
            or an :class:`~invtract.io.image.Image` (tracked as a float32 field). A float32
            field gives tckgen parity, float64 gradient checks. A field of
            :meth:`~invtract.fod.field.FODField.with_rows` takes its learned rows ``[n, K]`` as
            the differentiable FOD input: their gradient only (on CPU with numba, accumulated
            for those voxels alone: no ``[X*Y*Z, K]`` gradient).
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

    Returns:
        A :class:`DiffTrackResult` (accepted streamlines only).

    Gradients:
        * the coefficients (``fod.sh_flat``, or the rows of ``fod.learned``): exact (trilinear
          interpolation is linear; peaks by the implicit function theorem; amplitudes by the
          envelope theorem).
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
        >>> fod = FODField.from_array(sh, affine, dtype=sh.dtype)  # doctest: +SKIP
        >>> res = track_differentiable(fod, seeds, dirs, step_mm=h)  # doctest: +SKIP
        >>> (res.points.sum(-1) * res.weights).sum().backward()  # doctest: +SKIP
    """
    if path not in ("efficient", "plain"):
        raise ConfigError(f"unknown path {path!r}; valid: efficient, plain")
    fod = as_fod_field(fod)
    if seeds.ndim != 2 or seeds.shape[-1] != 3 or init_dirs.shape != seeds.shape:
        raise ShapeError(
            f"seeds and init_dirs must be [N, 3], got {tuple(seeds.shape)}, "
            f"{tuple(init_dirs.shape)}"
        )
    dt = fod.dtype
    rp = resolved_parameters(fod, params, step_mm, angle_deg, cutoff)
    field = fod.detach()  # the hard pass's view of the same coefficients
    if torch.is_tensor(step_mm):  # move by the exact step (float64 runs); decisions unchanged
        rp = dataclasses.replace(rp, step_mm=float(step_mm.detach()))
    t_amp, t_cos = (temperature, temperature) if np.isscalar(temperature) else temperature
    h = _as_scalar(step_mm, rp.step_mm, dt).to(dt)
    if not torch.is_tensor(step_mm):
        h = torch.tensor(rp.step_mm, dtype=dt)
    cut = _as_scalar(cutoff, rp.cutoff, torch.float64)
    if torch.is_tensor(angle_deg):
        cos_max = torch.cos(angle_deg.reshape(()).to(torch.float64) * (math.pi / 180.0))
    else:
        cos_max = torch.tensor(rp.dot_threshold, dtype=torch.float64)
    dev = fod.device
    consts = _Consts(
        field.shape,
        field.scanner2voxel,
        field.lmax,
        float(t_amp),
        float(t_cos),
        eps,
        cut.detach().to(device=dev, dtype=torch.float64),
        cos_max.detach().to(device=dev, dtype=torch.float64),
    )
    tp = _hard_forward(field, seeds, init_dirs, rp, refine, consts)
    if path == "plain":  # the reference: all coefficients (differentiable in any rows)
        fod = fod.without_rows()
    sh_flat, voxels, rows = fod.sh_flat, None, None
    if fod.learned is not None:  # the differentiable FOD input: the learned rows
        voxels, rows = fod.learned
    sid = tp.seed_ids
    # seeds of accepted streamlines: hard values, gradient routed to the caller's tensor
    seeds_acc = tp.seeds + (seeds[sid].to(dt) - seeds[sid].to(dt).detach())
    h, cut, cos_max = h.to(dev), cut.to(dev), cos_max.to(dev)
    if path == "plain":
        points, cl = _plain(sh_flat, seeds_acc, h, cut, cos_max, tp, consts)
        weights = torch.exp(cl)
    else:
        sh_in, full = (sh_flat, None) if rows is None else (rows, sh_flat)
        points, weights = _Adjoint.apply(
            sh_in, seeds_acc, h, cut, cos_max, tp, consts, full, voxels
        )
    if init_dirs.requires_grad:  # documented zero gradient (basin of attraction)
        zero = torch.nan_to_num(init_dirs[sid]).sum(-1) * 0.0
        weights = weights + zero.to(weights.dtype)[:, None]
    return _assemble(tp, points, weights, rp.unidirectional)


def _assemble(tp: _Tape, points, weights, unidirectional: bool) -> DiffTrackResult:
    """The output layout. The tape keeps the half tracked along u0 reversed before the seed
    (index n1); a unidirectional track is that half alone, which tckgen writes seed first, so
    its rows are turned round here (a gather: gradients pass through)."""
    lengths = 1 + tp.n1 + tp.n2
    j = torch.arange(tp.L, device=points.device)[None, :]
    mask = j < lengths[:, None]
    seed_index = tp.n1.clone()
    if unidirectional and points.shape[0]:
        idx = _reversed_within(lengths, tp.L)
        points = points.gather(1, idx[..., None].expand(-1, -1, 3))
        weights = weights.gather(1, idx)
        seed_index = torch.zeros_like(seed_index)
    return DiffTrackResult(
        points=points,
        mask=mask,
        lengths=lengths,
        weights=weights,
        seed_index=seed_index,
        seed_ids=tp.seed_ids,
        status=tp.status,
        term=tp.term,
    )
