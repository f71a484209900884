"""Implicit peak gradients: gradcheck in float64 against finite differences of exact peaks."""

from __future__ import annotations

import torch

from invtract.fod.peak_grad import (
    PeakJet,
    _peak_operator,
    basis_directional_derivatives,
    fast_sh_basis,
    implicit_peak,
    peak_amplitude,
    peak_geometry,
    refine_peak,
    tangent_basis,
)
from invtract.fod.peaks import mrtrix_peak
from invtract.fod.sh import sh_basis

LMAX = 4


def _fods(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    v = torch.nn.functional.normalize(torch.randn(n, 3, generator=g, dtype=torch.float64), dim=-1)
    c = sh_basis(v, LMAX) + 0.05 * torch.randn(n, 15, generator=g, dtype=torch.float64)
    _, u = mrtrix_peak(c, v, LMAX)
    return c, refine_peak(c, u, LMAX, 6)


def test_sh_basis_gradcheck():
    u = torch.nn.functional.normalize(torch.randn(3, 3, dtype=torch.float64), dim=-1)
    assert torch.autograd.gradcheck(lambda x: sh_basis(x, LMAX), (u.requires_grad_(True),))


def test_directional_derivatives_match_autograd():
    u = torch.nn.functional.normalize(torch.randn(5, 3, dtype=torch.float64), dim=-1)
    d = torch.randn(1, 5, 3, dtype=torch.float64)
    _, dY, d2Y = basis_directional_derivatives(u, d, LMAX)
    J = torch.autograd.functional.jacobian(lambda x: sh_basis(x, LMAX).sum(0), u)  # [K, 5, 3]
    ref = torch.einsum("knd,nd->nk", J, d[0])
    torch.testing.assert_close(dY[0], ref, rtol=1e-10, atol=1e-12)
    t = torch.tensor(1e-4, dtype=torch.float64)
    fd2 = sh_basis(u + t * d[0], LMAX) - 2 * sh_basis(u, LMAX) + sh_basis(u - t * d[0], LMAX)
    torch.testing.assert_close(d2Y[0], fd2 / t**2, rtol=1e-5, atol=1e-5)


def test_refined_peak_is_critical_point_and_close_to_mrtrix():
    c, u = _fods()
    g, H, _, _ = peak_geometry(c, u, LMAX)
    assert g.abs().max() < 1e-12
    assert (torch.linalg.eigvalsh(H) < 0).all()
    _, um = mrtrix_peak(c, u, LMAX)
    assert (um - u).norm(dim=-1).max() < 1e-4


def test_implicit_peak_value_is_u_star():
    c, u = _fods()
    out = implicit_peak(c.requires_grad_(True), u, LMAX)
    assert torch.equal(out.detach(), u)


def test_implicit_peak_gradcheck_vs_exact_peak():
    c, u = _fods()

    def f(x):  # the exact peak as a function of c: Newton-polished from the current peak
        return implicit_peak(x, refine_peak(x.detach(), u, LMAX, 6), LMAX)

    assert torch.autograd.gradcheck(f, (c.clone().requires_grad_(True),), eps=1e-6, atol=1e-7)


def test_peak_amplitude_gradcheck():
    c, u = _fods()

    def f(x):
        return peak_amplitude(x, refine_peak(x.detach(), u, LMAX, 6), LMAX)

    assert torch.autograd.gradcheck(f, (c.clone().requires_grad_(True),), eps=1e-6, atol=1e-7)


def test_degenerate_hessian_stays_finite():
    # isotropic FOD (only l=0): H_T = 0 everywhere, the guard must keep gradients finite
    c = torch.zeros(2, 15, dtype=torch.float64)
    c[:, 0] = 1.0
    u = torch.tensor([[0.0, 0.0, 1.0], [0.6, 0.8, 0.0]], dtype=torch.float64)
    c.requires_grad_(True)
    out = implicit_peak(c, u, LMAX)
    out.sum().backward()
    assert torch.isfinite(c.grad).all()
    nan_u = torch.full((1, 3), float("nan"), dtype=torch.float64)
    c2 = torch.ones(1, 15, dtype=torch.float64, requires_grad=True)
    implicit_peak(c2, nan_u, LMAX).nan_to_num().sum().backward()
    assert torch.isfinite(c2.grad).all()


def test_peak_jet_matches_operator():
    # the matrix-free closed form (reverse sweep) equals the jet operator and its transpose,
    # including at the poles (x + iy = 0)
    for lmax in (2, 4, 8):
        K = (lmax + 1) * (lmax + 2) // 2
        g = torch.Generator().manual_seed(lmax)
        u = torch.nn.functional.normalize(
            torch.randn(20, 3, generator=g, dtype=torch.float64), dim=-1
        )
        u[0] = torch.tensor([0.0, 0.0, 1.0])
        u[1] = torch.tensor([0.0, 0.0, -1.0])
        c = torch.randn(20, K, generator=g, dtype=torch.float64)
        Y, M, _, _ = _peak_operator(u, lmax)
        jet = PeakJet(u, lmax)
        q, A = jet.apply(c)
        torch.testing.assert_close(q, torch.bmm(M, c[:, :, None])[..., 0], rtol=1e-12, atol=1e-11)
        torch.testing.assert_close(A, (Y * c).sum(-1), rtol=1e-12, atol=1e-12)
        qb = torch.randn(20, 6, generator=g, dtype=torch.float64)
        ab = torch.randn(20, generator=g, dtype=torch.float64)
        ref = torch.bmm(M.transpose(1, 2), qb[:, :, None])[..., 0] + ab[:, None] * Y
        torch.testing.assert_close(jet.transpose(qb, ab), ref, rtol=1e-12, atol=1e-11)
        torch.testing.assert_close(fast_sh_basis(u, lmax), sh_basis(u, lmax), rtol=0, atol=1e-13)


def test_first_order_basis_derivatives_equal_the_second_order_ones():
    """``order=1`` (what the fit's ``tangent`` term needs) gives the same value and first
    derivatives, bit for bit, and no second ones."""
    g = torch.Generator().manual_seed(3)
    u = torch.nn.functional.normalize(
        torch.randn(200, 3, generator=g, dtype=torch.float64), dim=-1
    )
    dirs = torch.stack(tangent_basis(u))
    Y2, dY2, d2Y = basis_directional_derivatives(u, dirs, 8)
    Y1, dY1, none = basis_directional_derivatives(u, dirs, 8, order=1)
    assert torch.equal(Y1, Y2) and torch.equal(dY1, dY2)
    assert none is None and d2Y.shape == dY2.shape
