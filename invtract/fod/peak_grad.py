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
directions, in float64.
"""

from __future__ import annotations

import math

import torch

from .sh import lmax_from_n, n_coeffs, sh_basis, sh_index

__all__ = [
    "tangent_basis",
    "basis_directional_derivatives",
    "peak_geometry",
    "implicit_peak",
    "peak_amplitude",
    "refine_peak",
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
    """Product of second-order jets (v, d1, d2/2) given as 3-tuples of tensors."""
    return (a[0] * b[0], a[0] * b[1] + a[1] * b[0], a[0] * b[2] + a[1] * b[1] + a[2] * b[0])


def _jlin(alpha, a, beta=None, b=None):
    if b is None:
        return (alpha * a[0], alpha * a[1], alpha * a[2])
    return (alpha * a[0] + beta * b[0], alpha * a[1] + beta * b[1], alpha * a[2] + beta * b[2])


@torch.no_grad()
def basis_directional_derivatives(
    u: torch.Tensor, dirs: torch.Tensor, lmax: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Basis value and first/second directional derivatives along given directions.

    Evaluates the (polynomial, Cartesian) MRtrix3 basis of :func:`~invtract.fod.sh.sh_basis`
    on the lines ``u + t d`` with exact second-order Taylor arithmetic.

    Args:
        u: ``[N, 3]`` points (unit directions).
        dirs: ``[D, N, 3]`` directions d.
        lmax: even SH degree.

    Returns:
        ``(Y [N, K], dY [D, N, K], d2Y [D, N, K])`` with dY = d/dt Y(u + t d) and
        d2Y = d^2/dt^2 Y(u + t d) at t = 0.

    Gradients:
        None (constants of the implicit step; computed under ``no_grad``).
    """
    D = dirs.shape[0]
    ub = u.unsqueeze(0).expand(D, -1, -1)
    x = (ub[..., 0], dirs[..., 0], torch.zeros_like(dirs[..., 0]))
    y = (ub[..., 1], dirs[..., 1], torch.zeros_like(dirs[..., 1]))
    z = (ub[..., 2], dirs[..., 2], torch.zeros_like(dirs[..., 2]))
    zero = torch.zeros_like(x[0])
    one = torch.ones_like(x[0])
    # P-bar_l^m(z) / s^m as polynomials in z (same recursion as sh._legendre_normalised, s = 1)
    P = {}
    pmm = (torch.full_like(zero, 1.0 / math.sqrt(4.0 * math.pi)), zero, zero)
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
    re = (one, zero, zero)
    im = (zero, zero, zero)
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
    d2Y = 2.0 * torch.stack([o[2] for o in out], -1)
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
    q = torch.bmm(M, c64.unsqueeze(-1)).squeeze(-1)  # [N, 6]
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
    w = torch.where(finite[:, None], u, torch.tensor([0.0, 0.0, 1.0], dtype=u.dtype))
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
