"""The compiled sweep's SH jet (Legendre recurrence, P(z, w) contraction and its transpose)
against :class:`~invtract.fod.peak_grad.PeakJet`, at several lmax (the sweep tests run lmax 4)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from invtract.fod.peak_grad import PeakJet
from invtract.fod.sh_layout import n_coeffs
from invtract.tracking import adjoint_cpu

pytestmark = pytest.mark.skipif(not adjoint_cpu.available(), reason="numba not available")


def _directions(n: int, seed: int) -> np.ndarray:
    """Random unit vectors plus the axes and near-polar ones (tangent-basis branches)."""
    rng = np.random.default_rng(seed)
    u = rng.normal(size=(n, 3))
    special = np.array(
        [[0, 0, 1], [0, 0, -1], [1, 0, 0], [0, 1, 0], [1e-9, 2e-9, 1], [0.6, 0.8, 1e-12]], float
    )
    u = np.concatenate([u, special])
    return u / np.linalg.norm(u, axis=1, keepdims=True)


@pytest.mark.parametrize("lmax", [2, 4, 8, 10])
def test_jet_and_transpose_equal_peak_jet(lmax):
    K = n_coeffs(lmax)
    u = _directions(20, lmax)
    rng = np.random.default_rng(100 + lmax)
    c = rng.normal(size=(u.shape[0], K))
    qb = rng.normal(size=(u.shape[0], 6))
    ab = rng.normal(size=u.shape[0])
    jet_ref = PeakJet(torch.tensor(u), lmax)
    rows_ref, A_ref = (t.numpy() for t in jet_ref.apply(torch.tensor(c)))
    cbar_ref = jet_ref.transpose(torch.tensor(qb), torch.tensor(ab)).numpy()
    tabs = adjoint_cpu._sh_tables(lmax)
    n = lmax + 1
    Wr, Wi = np.empty(n), np.empty(n)
    Qe = np.empty((3, tabs[4].shape[0]))
    cbar = np.empty(K)
    for i, (ux, uy, uz) in enumerate(u):
        e = adjoint_cpu._tangent_basis(ux, uy, uz)
        adjoint_cpu._powers(ux, uy, Wr, Wi)
        cj = c[i][None].copy()
        jet = adjoint_cpu._contract(cj, uz, Wr, Wi, tabs, Qe)
        rows = np.array(adjoint_cpu._rows(jet, ux, uy, uz, e))
        scale = np.abs(c[i]).sum() * (1 + lmax) ** 4
        assert np.abs(rows - rows_ref[i]).max() <= 1e-13 * scale
        assert abs(jet[0] - A_ref[i]) <= 1e-13 * scale
        assert abs(adjoint_cpu._amplitude(cj, uz, Wr, Wi, tabs) - A_ref[i]) <= 1e-13 * scale
        lin = adjoint_cpu._rows_adjoint(tuple(qb[i]), ab[i], ux, uy, uz, e)
        adjoint_cpu._transpose(lin, Wr, Wi, Qe, tabs, cbar)
        scale = (np.abs(qb[i]).sum() + abs(ab[i])) * (1 + lmax) ** 4
        assert np.abs(cbar - cbar_ref[i]).max() <= 1e-13 * scale
