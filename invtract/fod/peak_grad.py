"""Differentiable FOD peaks: implicit-function gradients at a converged peak.

The forward peak search (:func:`invtract.fod.peaks.mrtrix_peak`) is a hard, non-smooth
iteration. Its result u* is a local maximum of f(u) = sum_k c_k Y_k(u) on the unit sphere, so
the tangential gradient g_T(u*, c) = (I - u* u*^T) grad f(u*) vanishes. Differentiating that
condition (implicit function theorem, spec §9.1) gives

    du*/dc = -E H_T^{-1} E^T dg_T/dc,   H_T = E^T [hess f - (u* . grad f) I] E,

with E a 3x2 orthonormal tangent basis at u* and H_T the Riemannian Hessian. This module
builds a tensor whose *value* is u* and whose Jacobian is that one (one correction step
``u* + delta - delta.detach()``), and the amplitude A* = c . Y(u*) whose gradient is the
envelope-theorem one (dA*/dc = Y(u*)).

Derivatives of the basis are taken in Cartesian form (no arccos/atan2, no pole
singularities) by evaluating the polynomial basis on second-order Taylor jets along tangent
directions, in float64. :class:`PeakJet` is the closed-form, matrix-free equivalent used by the
reverse sweep of :mod:`invtract.tracking.differentiable`: it factors each basis function as
Q_lm(z) W_m(x + iy) (a polynomial in z times a power of x + iy), so the six directional
derivatives contracted with c (forward) and their transpose applied to an adjoint (backward)
cost a few ``[N, K]`` operations instead of building the ``[N, 6, K]`` operator.
"""

from __future__ import annotations

import math
from functools import cache

import numpy as np
import torch

from .sh import lmax_from_n, n_coeffs, sh_basis, sh_index

__all__ = [
    "tangent_basis",
    "basis_directional_derivatives",
    "peak_geometry",
    "implicit_peak",
    "peak_amplitude",
    "refine_peak",
    "PeakJet",
    "fast_sh_basis",
]


def tangent_basis(u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two orthonormal tangent vectors ``(e1, e2)`` ``[N, 3]`` at unit directions ``u [N, 3]``.

    Gradients: none (built from ``u.detach()``; only E E^T = I - u u^T matters downstream).
    """
    u = u.detach()
    a = torch.zeros_like(u)
    k = u.abs().argmin(-1)
    a[torch.arange(u.shape[0], device=u.device), k] = 1.0
    e1 = torch.linalg.cross(u, a, dim=-1)
    e1 = e1 / e1.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    e2 = torch.linalg.cross(u, e1, dim=-1)
    return e1, e2


def _jmul(a, b):
    """Product of Taylor jets ``(v, d1)`` or ``(v, d1, d2/2)`` (tuples of tensors)."""
    if len(a) == 2:
        return (a[0] * b[0], a[0] * b[1] + a[1] * b[0])
    return (a[0] * b[0], a[0] * b[1] + a[1] * b[0], a[0] * b[2] + a[1] * b[1] + a[2] * b[0])


def _jlin(alpha, a, beta=None, b=None):
    if b is None:
        return tuple(alpha * x for x in a)
    return tuple(alpha * x + beta * y for x, y in zip(a, b))


@torch.no_grad()
def basis_directional_derivatives(
    u: torch.Tensor, dirs: torch.Tensor, lmax: int, order: int = 2
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Basis value and first/second directional derivatives along given directions.

    Evaluates the (polynomial, Cartesian) MRtrix3 basis of :func:`~invtract.fod.sh.sh_basis`
    on the lines ``u + t d`` with exact Taylor arithmetic of order ``order`` (1 or 2).

    Args:
        u: ``[N, 3]`` points (unit directions).
        dirs: ``[D, N, 3]`` directions d.
        lmax: even SH degree.
        order: 2, or 1 to skip the second derivatives (then ``d2Y`` is None).

    Returns:
        ``(Y [N, K], dY [D, N, K], d2Y [D, N, K])`` with dY = d/dt Y(u + t d) and
        d2Y = d^2/dt^2 Y(u + t d) at t = 0.

    Gradients:
        None (constants of the implicit step; computed under ``no_grad``).
    """
    D = dirs.shape[0]
    ub = u.unsqueeze(0).expand(D, -1, -1)
    zero = torch.zeros_like(ub[..., 0])
    one = torch.ones_like(zero)
    pad = (zero,) * (int(order) - 1)  # the jets' higher terms, zero for the coordinates
    x, y, z = ((ub[..., i], dirs[..., i], *pad) for i in range(3))
    # P-bar_l^m(z) / s^m as polynomials in z (same recursion as sh._legendre_normalised, s = 1)
    P = {}
    pmm = (torch.full_like(zero, 1.0 / math.sqrt(4.0 * math.pi)), zero, *pad)
    for m in range(lmax + 1):
        if m > 0:
            pmm = _jlin(-math.sqrt((2.0 * m + 1.0) / (2.0 * m)), pmm)
        P[(m, m)] = pmm
        if m + 1 <= lmax:
            P[(m + 1, m)] = _jlin(math.sqrt(2.0 * m + 3.0), _jmul(z, pmm))
        for n in range(m + 2, lmax + 1):
            a = math.sqrt((4.0 * n * n - 1.0) / (n * n - m * m))
            b = math.sqrt(((n - 1.0) ** 2 - m * m) / (4.0 * (n - 1.0) ** 2 - 1.0))
            P[(n, m)] = _jlin(a, _jmul(z, P[(n - 1, m)]), -a * b, P[(n - 2, m)])
    K = n_coeffs(lmax)
    out = [None] * K
    re = (one, zero, *pad)
    im = (zero, zero, *pad)
    sqrt2 = math.sqrt(2.0)
    for m in range(lmax + 1):
        if m > 0:
            re, im = (
                _jlin(1.0, _jmul(re, x), -1.0, _jmul(im, y)),
                _jlin(1.0, _jmul(re, y), 1.0, _jmul(im, x)),
            )
        for l in range(m + (m & 1), lmax + 1, 2):
            if m == 0:
                out[sh_index(l, 0)] = P[(l, 0)]
            else:
                out[sh_index(l, m)] = _jlin(sqrt2, _jmul(P[(l, m)], re))
                out[sh_index(l, -m)] = _jlin(sqrt2, _jmul(P[(l, m)], im))
    Y = torch.stack([o[0] for o in out], -1)[0]
    dY = torch.stack([o[1] for o in out], -1)
    d2Y = 2.0 * torch.stack([o[2] for o in out], -1) if order == 2 else None
    return Y, dY, d2Y


@torch.no_grad()
def _peak_operator(u_star: torch.Tensor, lmax: int):
    """``(Y [N, K], M [N, 6, K], e1, e2)``: rows of M map c to (g1, g2, gu, h11, h22, h++)."""
    e1, e2 = tangent_basis(u_star)
    dirs = torch.stack([e1, e2, e1 + e2, u_star], 0)
    Y, dY, d2Y = basis_directional_derivatives(u_star, dirs, lmax)
    M = torch.stack([dY[0], dY[1], dY[3], d2Y[0], d2Y[1], d2Y[2]], 1)
    return Y, M, e1, e2


def peak_geometry(c: torch.Tensor, u_star: torch.Tensor, lmax: int | None = None):
    """Tangential gradient and Riemannian Hessian of f(u) = c . Y(u) at ``u_star``.

    Args:
        c: ``[N, K]`` SH coefficients (any float dtype; computed in float64).
        u_star: ``[N, 3]`` unit directions (detached).
        lmax: SH degree (inferred from K when None).

    Returns:
        ``(g_T [N, 2], H_T [N, 2, 2], e1 [N, 3], e2 [N, 3])`` in float64, in the tangent basis
        (e1, e2) of :func:`tangent_basis`.

    Gradients:
        ``g_T`` and ``H_T`` are linear in ``c`` (exact); none w.r.t. ``u_star``.
    """
    lmax = lmax_from_n(c.shape[-1]) if lmax is None else lmax
    u = u_star.detach().to(torch.float64)
    _, M, e1, e2 = _peak_operator(u, lmax)
    return _geometry_from_operator(c.to(torch.float64), M) + (e1, e2)


def _geometry_from_operator(c64, M):
    return geometry_from_derivatives(torch.bmm(M, c64.unsqueeze(-1)).squeeze(-1))


def geometry_from_derivatives(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(g_T [N, 2], H_T [N, 2, 2])`` from ``q [N, 6]``, the amplitude's derivatives
    ``(g1, g2, gu, h11, h22, h++)`` that the rows of :func:`_peak_operator`'s ``M`` give: the
    Riemannian Hessian is the Euclidean one in the tangent plane minus ``gu`` (the radial
    derivative) times the identity; ``h12`` from the second derivative along ``e1 + e2``."""
    g1, g2, gu, h11, h22, hpp = q.unbind(-1)
    h12 = 0.5 * (hpp - h11 - h22)
    gT = torch.stack([g1, g2], -1)
    HT = torch.stack([torch.stack([h11 - gu, h12], -1), torch.stack([h12, h22 - gu], -1)], -2)
    return gT, HT


def _regularised_solve(gT, HT, eps: float):
    """``H^{-1} g`` with H shifted so that its largest eigenvalue is <= -eps (detached shift)."""
    with torch.no_grad():
        a, b, d = HT[:, 0, 0], HT[:, 0, 1], HT[:, 1, 1]
        lam_max = 0.5 * (a + d) + torch.sqrt((0.5 * (a - d)) ** 2 + b * b)
        shift = torch.clamp(lam_max + eps, min=0.0)
        shift = torch.nan_to_num(shift, nan=0.0, posinf=0.0)
    a = HT[:, 0, 0] - shift
    d = HT[:, 1, 1] - shift
    b = HT[:, 0, 1]
    det = a * d - b * b
    x0 = (d * gT[:, 0] - b * gT[:, 1]) / det
    x1 = (a * gT[:, 1] - b * gT[:, 0]) / det
    return torch.stack([x0, x1], -1)


def implicit_peak(
    c: torch.Tensor, u_star: torch.Tensor, lmax: int | None = None, eps: float = 1e-6
) -> torch.Tensor:
    """The peak direction ``u_star`` with implicit-function-theorem gradients w.r.t. ``c``.

    Args:
        c: ``[N, K]`` SH coefficients at the sample points (may require grad).
        u_star: ``[N, 3]`` converged peak directions from a hard search (treated as constant).
        lmax: SH degree (inferred from K when None).
        eps: eigenvalues of the Riemannian Hessian are shifted to be <= -eps (guard near lobe
            mergers where H_T becomes singular; inactive at well-defined peaks).

    Returns:
        ``[N, 3]`` in the dtype of ``u_star``, with value exactly ``u_star``.

    Gradients:
        d u / d c = -E H_T^{-1} E^T d g_T / d c (the implicit Jacobian of the peak; computed in
        float64). Exact when ``u_star`` is an exact critical point; with MRtrix's 1e-4 rad stop
        test it is the Jacobian of the one-Newton-step correction at u*. No gradient flows to
        ``u_star`` (which lobe is chosen is piecewise constant in the start direction). Rows
        with non-finite ``u_star`` give zero gradient.

    Shape:
        c: ``(N, K)``, u_star: ``(N, 3)`` -> ``(N, 3)``.
    """
    lmax = lmax_from_n(c.shape[-1]) if lmax is None else lmax
    us = u_star.detach()
    finite = torch.isfinite(us).all(-1)
    u64 = torch.where(finite[:, None], us, torch.tensor([0.0, 0.0, 1.0], dtype=us.dtype)).to(
        torch.float64
    )
    _, M, e1, e2 = _peak_operator(u64, lmax)
    c64 = torch.where(finite[:, None], c, torch.zeros_like(c)).to(torch.float64)
    gT, HT = _geometry_from_operator(c64, M)
    x = _regularised_solve(gT, HT, eps)
    delta = -(x[:, 0:1] * e1 + x[:, 1:2] * e2)
    delta = torch.where(torch.isfinite(delta), delta, torch.zeros_like(delta))
    return us + (delta - delta.detach()).to(us.dtype)


def peak_amplitude(c: torch.Tensor, u_star: torch.Tensor, lmax: int | None = None) -> torch.Tensor:
    """Peak amplitude ``A* = c . Y(u*)`` ``[N]`` with envelope-theorem gradients.

    Gradients:
        dA*/dc = Y(u*) (exact at a critical point: the dependence through u* drops out); none
        w.r.t. ``u_star``.
    """
    lmax = lmax_from_n(c.shape[-1]) if lmax is None else lmax
    Y = sh_basis(u_star.detach().to(torch.float64), lmax)
    return (c.to(torch.float64) * Y).sum(-1).to(c.dtype)


@torch.no_grad()
def refine_peak(
    c: torch.Tensor, u: torch.Tensor, lmax: int | None = None, iterations: int = 3, eps=1e-6
) -> torch.Tensor:
    """Polish peak directions with Riemannian Newton steps in float64 (no grad).

    Used to make the peak an exact critical point (|g_T| ~ 1e-15), so that finite differences
    of the tracker are smooth. Each step is capped at 0.2 rad; rows that are not finite are
    returned unchanged.

    Returns:
        ``[N, 3]`` unit directions in the dtype of ``u``.
    """
    lmax = lmax_from_n(c.shape[-1]) if lmax is None else lmax
    finite = torch.isfinite(u).all(-1) & torch.isfinite(c).all(-1)
    w = torch.where(finite[:, None], u, u.new_tensor([0.0, 0.0, 1.0]))
    w = w.to(torch.float64)
    c64 = torch.where(finite[:, None], c, torch.zeros_like(c)).to(torch.float64)
    for _ in range(iterations):
        _, M, e1, e2 = _peak_operator(w, lmax)
        gT, HT = _geometry_from_operator(c64, M)
        x = _regularised_solve(gT, HT, eps)
        n = x.norm(dim=-1, keepdim=True)
        x = torch.where(n > 0.2, x * (0.2 / n.clamp_min(1e-300)), x)
        x = torch.nan_to_num(x, nan=0.0)
        w = w - (x[:, 0:1] * e1 + x[:, 1:2] * e2)
        w = w / w.norm(dim=-1, keepdim=True)
    return torch.where(finite[:, None], w.to(u.dtype), u)


# ----------------------------------------------------------------------------------------------
# closed-form, matrix-free peak geometry (reverse sweep of the differentiable tracker)
# ----------------------------------------------------------------------------------------------


@cache
def _jet_tables(lmax: int):
    """Host tables: polynomial coefficients of Q_lm(z) = P-bar_l^m(z) / s^m and the K mapping.

    Returns ``(A0, A1, A2, e_of_k, j_of_k, scale)``: ``A0 [lmax+1, E]`` coefficients of z^i of
    Q_e (entries e = (l even, 0 <= m <= l)), ``A1``/``A2`` those of Q_e' and Q_e''; coefficient k
    of the basis is ``scale_k * Q_{e(k)}(z) * RI_{j(k)}`` where RI = [Re W_0..Re W_lmax,
    Im W_1..Im W_lmax] and W_m = (x + iy)^m (same recursion as :func:`~invtract.fod.sh.sh_basis`).
    """
    n = lmax + 1
    P = {}
    pmm = np.zeros(n)
    pmm[0] = 1.0 / math.sqrt(4.0 * math.pi)
    for m in range(lmax + 1):
        if m > 0:
            pmm = -math.sqrt((2.0 * m + 1.0) / (2.0 * m)) * pmm
        P[(m, m)] = pmm
        if m + 1 <= lmax:
            P[(m + 1, m)] = math.sqrt(2.0 * m + 3.0) * np.roll(pmm, 1)
        for k in range(m + 2, lmax + 1):
            a = math.sqrt((4.0 * k * k - 1.0) / (k * k - m * m))
            b = math.sqrt(((k - 1.0) ** 2 - m * m) / (4.0 * (k - 1.0) ** 2 - 1.0))
            P[(k, m)] = a * np.roll(P[(k - 1, m)], 1) - a * b * P[(k - 2, m)]
    entries = [(l, m) for l in range(0, lmax + 1, 2) for m in range(l + 1)]
    A0 = np.stack([P[e] for e in entries], 1)  # [n, E]
    i = np.arange(n, dtype=np.float64)[:, None]
    A1 = np.zeros_like(A0)
    A1[:-1] = i[1:] * A0[1:]
    A2 = np.zeros_like(A0)
    A2[:-1] = i[1:] * A1[1:]
    K = n_coeffs(lmax)
    e_of_k = np.zeros(K, np.int64)
    j_of_k = np.zeros(K, np.int64)
    scale = np.zeros(K)
    for e, (l, m) in enumerate(entries):
        e_of_k[sh_index(l, m)] = e
        j_of_k[sh_index(l, m)] = m
        scale[sh_index(l, m)] = 1.0 if m == 0 else math.sqrt(2.0)
        if m > 0:
            e_of_k[sh_index(l, -m)] = e
            j_of_k[sh_index(l, -m)] = lmax + m
            scale[sh_index(l, -m)] = math.sqrt(2.0)
    return A0, A1, A2, e_of_k, j_of_k, scale


_DEVICE_TABLES: dict = {}


def _tables_on(lmax: int, device, dtype=torch.float64):
    key = (lmax, str(device), dtype)
    if key not in _DEVICE_TABLES:
        A0, A1, A2, e_of_k, j_of_k, scale = _jet_tables(lmax)
        Ak = np.stack([A0[:, e_of_k], A1[:, e_of_k], A2[:, e_of_k]], 0)  # [3, n, K]
        sel = np.zeros((len(e_of_k), 2 * lmax + 1))
        sel[np.arange(len(e_of_k)), j_of_k] = 1.0

        def t(a):
            return torch.tensor(a, dtype=dtype, device=device)

        _DEVICE_TABLES[key] = (
            t(Ak),
            t(sel),  # [K, 2 lmax + 1]
            t(sel.T.copy()),
            t(scale),
            torch.arange(lmax + 1, dtype=dtype, device=device),
        )
    return _DEVICE_TABLES[key]


class PeakJet:
    """Closed-form Riemannian geometry of f(u) = c . Y(u) at fixed unit directions ``u`` (float64).

    Equivalent to the ``[N, 6, K]`` operator of :func:`peak_geometry` (same tangent basis, same
    rows g1, g2, gu, h11, h22, h++), but applied matrix-free:

    * :meth:`apply` contracts the coefficients: ``c [N, K] -> (q [N, 6], A [N])``;
    * :meth:`transpose` applies the transpose: ``(q_bar [N, 6], a_bar [N]) -> c_bar [N, K]``.

    Each basis function is Q_lm(z) W_m with W_m = (x + iy)^m; directional derivatives along a
    direction d = (d_xy, d_z) are d_z Q' W + Q m W_{m-1} (d_x + i d_y) (and the second-order
    analogue), so only ``[N, lmax + 1]`` tables depend on the direction.

    Gradients: none (a constant linear map; run under ``no_grad``).
    """

    @torch.no_grad()
    def __init__(self, u: torch.Tensor, lmax: int, dtype: torch.dtype = torch.float64) -> None:
        u = u.detach().to(dtype)
        Ak, self._sel, self._selT, self._scale, mvec = _tables_on(lmax, u.device, dtype)
        self.lmax = lmax
        self.e1, self.e2 = tangent_basis(u)
        z = u[:, 2]
        ones = torch.ones_like(z)[:, None]
        zp = torch.cumprod(torch.cat([ones, z[:, None].expand(-1, lmax)], 1), 1)  # [N, n]
        self._Q = torch.matmul(zp, Ak)  # [3, N, K]: Q, Q', Q'' of each coefficient
        w = torch.complex(u[:, 0], u[:, 1])
        W = torch.cumprod(
            torch.cat([torch.ones_like(w)[:, None], w[:, None].expand(-1, lmax)], 1), 1
        )  # [N, n]: (x + iy)^m
        zero = torch.zeros_like(W[:, :1])
        W1 = torch.cat([zero, W[:, :-1]], 1) * mvec  # m W_{m-1}
        W2 = torch.cat([zero, zero, W[:, :-2]], 1) * (mvec * (mvec - 1.0))  # m(m-1) W_{m-2}
        d = torch.stack([self.e1, self.e2, self.e1 + self.e2, u], 1)  # [N, 4, 3]
        zeta = torch.complex(d[..., 0], d[..., 1])[..., None]  # [N, 4, 1]
        self._dz = d[..., 2]  # [N, 4]
        self._W = W
        self._DW = W1[:, None, :] * zeta  # [N, 4, n]: first directional derivatives of W
        self._D2W = W2[:, None, :] * (zeta[:, :3] ** 2)  # [N, 3, n]: second ones

    def _contract(self, c64: torch.Tensor) -> torch.Tensor:
        U = torch.matmul(self._Q * (c64 * self._scale), self._sel)  # [3, N, 2 lmax + 1]
        lm = self.lmax
        Ur = U[..., : lm + 1]
        Ui = torch.cat([torch.zeros_like(Ur[..., :1]), U[..., lm + 1 :]], -1)
        return torch.complex(Ur, -Ui)  # conj(U~): Re(conj(U~) W) = Ur Re W + Ui Im W

    @torch.no_grad()
    def apply(self, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(q [N, 6], A [N])`` float64: q = (g1, g2, gu, h11, h22, h++) as in
        :func:`peak_geometry`'s operator, A = c . Y(u)."""
        U = self._contract(c.to(self._scale.dtype))  # [3, N, n] conj
        W, DW, D2W, dz = self._W, self._DW, self._D2W, self._dz
        A = (U[0] * W).real.sum(-1)
        U0W = (U[1] * W).real.sum(-1)  # sum conj(U1) W
        U2W = (U[2] * W).real.sum(-1)
        p0 = (U[0][:, None, :] * DW).real.sum(-1)  # [N, 4]
        p1 = (U[1][:, None, :] * DW[:, :3]).real.sum(-1)  # [N, 3]
        s0 = (U[0][:, None, :] * D2W).real.sum(-1)  # [N, 3]
        first = dz * U0W[:, None] + p0  # [N, 4]: e1, e2, e1+e2, u
        dz3 = dz[:, :3]
        second = dz3 * dz3 * U2W[:, None] + 2.0 * dz3 * p1 + s0  # [N, 3]: e1, e2, e1+e2
        q = torch.stack(
            [first[:, 0], first[:, 1], first[:, 3], second[:, 0], second[:, 1], second[:, 2]], -1
        )
        return q.to(torch.float64), A.to(torch.float64)

    @torch.no_grad()
    def transpose(self, q_bar: torch.Tensor, a_bar: torch.Tensor) -> torch.Tensor:
        """``c_bar [N, K]`` float64 = M^T q_bar + a_bar Y(u) (M: the operator of :meth:`apply`)."""
        W, DW, D2W, dz = self._W, self._DW, self._D2W, self._dz
        q_bar, a_bar = q_bar.to(dz.dtype), a_bar.to(dz.dtype)
        qf = torch.stack([q_bar[:, 0], q_bar[:, 1], torch.zeros_like(a_bar), q_bar[:, 2]], -1)
        qs = q_bar[:, 3:6]  # [N, 3]
        T0 = a_bar[:, None] * W + (qf[:, :, None] * DW).sum(1) + (qs[:, :, None] * D2W).sum(1)
        dz3 = dz[:, :3]
        T1 = ((qf * dz)[:, :, None].sum(1) * W) + ((2.0 * qs * dz3)[:, :, None] * DW[:, :3]).sum(1)
        T2 = (qs * dz3 * dz3).sum(-1)[:, None] * W
        T = torch.stack([T0, T1, T2], 0)  # [3, N, n]
        Tc = torch.cat([T.real, T.imag[..., 1:]], -1)  # [3, N, 2 lmax + 1]
        return (self._Q * torch.matmul(Tc, self._selT)).sum(0) * self._scale


@torch.no_grad()
def fast_sh_basis(u: torch.Tensor, lmax: int) -> torch.Tensor:
    """:func:`~invtract.fod.sh.sh_basis` in float64 from the factored tables (no grad).

    Same values to rounding (each Y_lm = scale Q_lm(z) W_m with Q from a polynomial table), in
    about a dozen tensor operations instead of one per (l, m): used for the soft weights of the
    differentiable tracker's forward pass.

    Shape:
        u: ``(N, 3)`` unit directions -> ``(N, K)`` float64.
    """
    Ak, _, selT, scale, _ = _tables_on(lmax, u.device, torch.float64)
    u = u.to(torch.float64)
    z = u[:, 2]
    zp = torch.cumprod(torch.cat([torch.ones_like(z)[:, None], z[:, None].expand(-1, lmax)], 1), 1)
    w = torch.complex(u[:, 0], u[:, 1])
    W = torch.cumprod(torch.cat([torch.ones_like(w)[:, None], w[:, None].expand(-1, lmax)], 1), 1)
    RI = torch.cat([W.real, W.imag[:, 1:]], 1)
    return torch.matmul(zp, Ak[0]) * torch.matmul(RI, selT) * scale
