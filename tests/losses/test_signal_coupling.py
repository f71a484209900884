"""The signal term's coupling weight from the data (invtract.fit.signal_coupling)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from invtract.errors import ConfigError
from invtract.fit.objective import fibonacci_sphere
from invtract.fit.signal_coupling import choose_coupling, coupled_csd, sub_model
from invtract.fit.signal_term import SignalTerm, parse_spatial
from invtract.fod.csd import Response, csd_model, csd_objective, csd_solve, predict_signal
from invtract.fod.sh import sh_basis
from invtract.losses.signal import neighbour_pairs, noise_variance, spatial_coupling

RESPONSE = Response(np.array([[1211.2, -732.1, 255.3, -65.1, 12.1]]), (2000.0,))
SHAPE = (4, 4, 3)


def _grad(n_dirs: int) -> np.ndarray:
    g = np.zeros((2 + n_dirs, 4))
    g[2:, :3] = fibonacci_sphere(n_dirs).numpy()
    g[2:, 3] = 2000.0
    return g


def _field(same: bool, seed: int = 0) -> torch.Tensor:
    """``[48, 45]`` sharp single-fibre FODs: one direction for all voxels, or one each."""
    rng = np.random.default_rng(seed)
    n = int(np.prod(SHAPE))
    u = rng.normal(size=(1 if same else n, 3))
    u = torch.as_tensor(u / np.linalg.norm(u, axis=1, keepdims=True)).expand(n, 3)
    return 0.6 * sh_basis(u.contiguous(), 8).double()


def _signals(c: torch.Tensor, model, sigma: float, seed: int = 1) -> torch.Tensor:
    s = predict_signal(c, model.M)
    gen = torch.Generator().manual_seed(seed)
    return s + sigma * torch.randn(s.shape, generator=gen, dtype=torch.float64)


def test_coupled_csd_is_csd_at_zero_and_a_stationary_point():
    model = csd_model(_grad(20), RESPONSE)
    vox = torch.arange(int(np.prod(SHAPE)))
    pairs = neighbour_pairs(vox, SHAPE)
    b = _signals(_field(True), model, 30.0).clamp_min(0)
    var = noise_variance(b, model)
    torch.testing.assert_close(coupled_csd(b, model, pairs, 0.0, var), csd_solve(b, model))
    c = coupled_csd(b, model, pairs, 0.3, var).requires_grad_(True)
    scale = 1.0 / (model.M.shape[0] * var * len(b))
    f = csd_objective(c, b, model).sum() * scale + 0.3 * spatial_coupling(c, pairs)
    f.backward()
    assert float(c.grad.abs().max()) < 1e-6
    # the coupling pulled neighbours together: fewer high-degree differences than CSD's
    assert float(spatial_coupling(c.detach(), pairs)) < 0.9 * float(
        spatial_coupling(csd_solve(b, model), pairs)
    )


def test_sub_model_rows_and_norm_term():
    model = csd_model(_grad(30), RESPONSE)
    rows = np.arange(0, 30, 2)
    m = sub_model(model, rows)
    torch.testing.assert_close(m.M, model.M[torch.as_tensor(rows)])
    assert m.norm_lambda == pytest.approx(model.norm_lambda * 15 / 30, rel=0.2)
    assert m.init.shape == (model.init.shape[0], 15)


@pytest.mark.parametrize("same, want_coupling", [(True, True), (False, False)])
def test_cross_validation_couples_alike_neighbours_only(same, want_coupling):
    """Identical noisy FODs: held-out directions are predicted better with the coupling
    (W > 0 chosen); a different fibre direction in every voxel and little noise: no coupling."""
    model = csd_model(_grad(20), RESPONSE)
    vox = torch.arange(int(np.prod(SHAPE)))
    b = _signals(_field(same), model, 40.0 if same else 2.0)
    var = noise_variance(b, model)
    w, err = choose_coupling(b, model, vox, SHAPE, var, folds=3)
    assert set(err) >= {0.0, 0.3} and all(e > 0 for e in err.values())
    assert (w > 0) == want_coupling, err
    if want_coupling:  # the largest candidate was best: 3 x it tried, twice (3, 9)
        assert err[w] < 0.95 * err[0.0] and max(err) == 9.0


def test_parse_spatial():
    assert parse_spatial("auto") == "auto" and parse_spatial(" AUTO ") == "auto"
    assert parse_spatial(0.3) == 0.3 and parse_spatial("1") == 1.0 and parse_spatial(0) == 0.0
    assert parse_spatial(None) == "auto"  # unset
    for bad in (-0.1, "often", True, float("nan")):
        with pytest.raises(ConfigError, match="signal.spatial"):
            parse_spatial(bad)


def _term(spatial, unusable: int | None = None):
    """``(SignalTerm, CSD solution [V, K])`` of the noisy identical-FOD grid (20 directions,
    SNR 40), every voxel usable but ``unusable``."""
    model = csd_model(_grad(20), RESPONSE)
    b = _signals(_field(True), model, 40.0).float()
    c = csd_solve(b, model)
    ref = csd_objective(c, b.double().clamp_min(0), model)
    var = noise_variance(b, model, c)
    usable = torch.ones(int(np.prod(SHAPE)), dtype=torch.bool)
    if unusable is not None:
        usable[unusable] = False
    term = SignalTerm(
        model, b[usable], usable, ref, var, None, grid=(SHAPE, None), spatial=spatial
    )
    return term, c


def test_signal_term_auto_spatial_is_chosen_once_at_the_first_call(monkeypatch):
    import invtract.fit.signal_coupling as sc

    monkeypatch.setattr(sc, "EXTEND", 0)  # the candidates as given (faster)
    term, c = _term("auto")
    vox = torch.arange(int(np.prod(SHAPE)))
    v = term(c, vox)
    assert isinstance(term.spatial, float) and term.spatial > 0
    assert term.coupling_cv["weight"] == term.spatial
    pairs = neighbour_pairs(vox, SHAPE)
    assert float(v) == pytest.approx(term.spatial * float(spatial_coupling(c, pairs)), rel=1e-9)


def test_config_default_and_flag_accept_auto():
    from invtract.fit.config import find_config, read_toml
    from invtract.fit.optimise import resolve_config

    assert read_toml(find_config("fit_fod_dwi"))["signal"]["spatial"] == "auto"
    assert parse_spatial(resolve_config({}, learn=("sh",)).raw["signal"]["spatial"]) == "auto"
    for w in ("auto", 0.5, 0):
        assert (
            resolve_config({"signal": {"spatial": w}}, learn=("sh",)).raw["signal"]["spatial"] == w
        )


def test_start_change_moves_to_the_coupled_minimiser():
    """[signal] start = "coupled": the change takes the learned voxels to the minimiser of
    the term (signal + coupling), where its gradient is ~0; none without coupling."""
    term, c = _term(0.0, unusable=0)  # no signal in voxel 0: no change there
    vox = torch.arange(int(np.prod(SHAPE)))
    assert float(term.start_change(c.float(), vox).abs().max()) == 0.0
    term.spatial = 0.3
    d = term.start_change(c.float(), vox)
    assert d.dtype == torch.float32 and float(d[0].abs().max()) == 0.0
    assert float(d.abs().max()) > 1e-3

    def grad_norm(coeffs):
        x = coeffs.double().requires_grad_(True)
        term(x, vox).backward()
        return float(x.grad[1:].norm())

    assert grad_norm(c + d.double()) < 0.02 * grad_norm(c)  # ~ stationary (float32 change)


@pytest.mark.slow
def test_auto_coupling_on_the_multi_tissue_term(monkeypatch):
    """--response WM GM CSF: the choice runs on the WM term (unclamped residual signals over
    every volume); at W = 0 the coupled solve is the term's own minimiser (gradient ~0)."""
    from pathlib import Path

    import invtract.fit.signal_coupling as sc
    from invtract.fod.csd import load_response
    from invtract.io.gradients import read_mif_scheme
    from invtract.io.mif import read_mif

    monkeypatch.setattr(sc, "EXTEND", 0)
    csd = Path(__file__).resolve().parents[1] / "data" / "csd"
    dwi = read_mif(csd / "dwi.mif")[0]
    mask = read_mif(csd / "mask.mif")[0].astype(bool)
    resp = [load_response(csd / f"response_msmt_{t}.txt", anisotropic=t == "wm")
            for t in ("wm", "gm", "csf")]  # fmt: skip
    term = SignalTerm.build(dwi, read_mif_scheme(csd / "dwi.mif"), resp, mask)
    term.grid = (tuple(dwi.shape[:3]), None)
    vox = torch.nonzero(term.usable).flatten()
    pairs = neighbour_pairs(vox, term.grid[0])
    assert len(pairs) > 0 and not term.model.clamp_signal
    sig = term.signal(vox).double()
    c0 = coupled_csd(sig, term.model, pairs, 0.0, term.variance)

    def grad(c):  # of the signal term alone (spatial 0)
        x = c.clone().requires_grad_(True)
        return float(torch.autograd.grad(term(x, vox), x)[0].norm())

    assert grad(c0) < 1e-3 * grad(torch.zeros_like(c0))
    x = c0
    term.spatial = "auto"
    term(x.detach(), vox)
    assert term.spatial in sc.CANDIDATES and set(term.coupling_cv["cv_error"]) == {
        str(w) for w in sc.CANDIDATES
    }


def test_cv_region_is_a_connected_blob_of_the_voxels():
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    from invtract.fit.signal_coupling import cv_region

    shape = (30, 30, 30)
    block = np.stack(np.meshgrid(*(np.arange(5, 25),) * 2, np.arange(10, 15), indexing="ij"), -1)
    far = np.array([[0, 0, 0], [0, 0, 1]])  # a second, distant component
    ijk = np.concatenate([far, block.reshape(-1, 3)])
    vox = torch.as_tensor(np.ravel_multi_index(ijk.T, shape))
    assert torch.equal(cv_region(vox, shape, 5000), torch.arange(len(vox)))
    pick = cv_region(vox, shape, 300)
    assert pick.numel() == 300 and pick.unique().numel() == 300
    assert torch.equal(pick, cv_region(vox, shape, 300))  # deterministic
    sub = vox[pick]
    pairs = neighbour_pairs(sub, shape).numpy()
    g = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(300, 300))
    assert connected_components(g, directed=False)[0] == 1
    assert len(pairs) > 2.2 * 300  # compact: most voxels keep several neighbours
    assert not bool(torch.isin(vox[:2], sub).any())  # from the centre, not the far corner
    # the distant component is taken when the main one is too small
    assert bool(torch.isin(vox[:2], vox[cv_region(vox, shape, len(vox) - 1)]).any())


def test_choose_coupling_solves_over_the_cv_region(monkeypatch):
    import invtract.fit.signal_coupling as sc

    model = csd_model(_grad(20), RESPONSE)
    vox = torch.arange(int(np.prod(SHAPE)))
    b = _signals(_field(True), model, 40.0)
    var = noise_variance(b, model)
    monkeypatch.setattr(sc, "CV_VOXELS", 20)
    region = sc.cv_region(vox, SHAPE)
    assert region.numel() == 20
    got = choose_coupling(b, model, vox, SHAPE, var, folds=3)
    monkeypatch.setattr(sc, "CV_VOXELS", 10_000)
    assert got == choose_coupling(b[region], model, vox[region], SHAPE, var, folds=3)
    assert got != choose_coupling(b, model, vox, SHAPE, var, folds=3)
