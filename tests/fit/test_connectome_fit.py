"""invtract.fit.connectome_fit: the survival connectome, its gradient, config, a tiny fit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from invtract.data import example_path
from invtract.errors import ConfigError, ShapeError
from invtract.fit.connectome_fit import (
    fast_tracking,
    fit_connectome,
    hard_connectome,
    load_connectome_config,
    read_connectome,
    survival_connectome,
    whole_brain_seeds,
)
from invtract.fod.field import FODField
from invtract.io.image import load_fod, load_image, load_mask
from invtract.losses.connectome import (
    as_label_volume,
    connectome_loss,
    format_connectome,
)
from invtract.params import TrackingParameters

PARC = Path(__file__).resolve().parents[1] / "data" / "connectome" / "phantom_cross90_parc.nii.gz"


@pytest.fixture(scope="module")
def phantom():
    fod = load_fod(example_path("fod"))
    mask = load_mask(example_path("mask"))
    vol = as_label_volume(load_image(PARC))
    pos, dirs = whole_brain_seeds(mask.data, fod.affine, max_seeds=300, seed=3)
    return fod, mask, vol, FODField.from_image(fod), pos, dirs


def test_whole_brain_seeds_grid_and_random():
    m = np.zeros((3, 3, 3), bool)
    m[1, 1, 1] = True
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    p, d = whole_brain_seeds(m, aff, per_voxel=2)
    assert p.shape == (8, 3) and np.allclose(np.linalg.norm(d, axis=1), 1, atol=1e-6)
    assert np.allclose(p.mean(0), [2.0, 2.0, 2.0]) and np.abs(p - 2.0).max() == pytest.approx(0.5)
    p, _ = whole_brain_seeds(m, aff, per_voxel=5, placement="random", seed=1)
    assert p.shape == (5, 3) and np.all(np.abs(p - 2.0) <= 1.0)
    with pytest.raises(ConfigError):
        whole_brain_seeds(np.zeros((2, 2, 2)), aff)


def test_survival_connectome_hard_limit_equals_tck2connectome(phantom):
    fod, _, vol, field, pos, dirs = phantom
    rp = TrackingParameters().resolve(fod.voxel_sizes)
    res = fast_tracking(field, pos, dirs, TrackingParameters())
    pred = survival_connectome(
        res, field, vol, cutoff=rp.cutoff, angle_deg=rp.angle_deg,
        temperature=(1e-5, 1e-5), min_points=rp.min_points, step_mm=rp.step_mm,
        temperature_mm=0.01,
    )  # fmt: skip
    hard, n = hard_connectome(field, pos, dirs, rp, vol, 4.0)
    assert n > 20 and hard.sum() == n
    np.testing.assert_allclose(pred.detach().numpy(), hard, atol=1e-6)


def test_cutoff_gradient_points_towards_the_target(phantom):
    fod, _, vol, field, pos, dirs = phantom
    target, _ = hard_connectome(field, pos, dirs, TrackingParameters(cutoff=1.0), vol, 4.0)
    rp = TrackingParameters().resolve(fod.voxel_sizes)
    cut = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    res = fast_tracking(field, pos, dirs, TrackingParameters(cutoff=0.5))
    pred = survival_connectome(
        res, field, vol, cutoff=cut, angle_deg=rp.angle_deg, temperature=(0.3, 0.05),
        min_points=rp.min_points, step_mm=rp.step_mm,
    )  # fmt: skip
    loss = connectome_loss(pred, target, normalise="density")
    loss.backward()
    assert float(loss.detach()) > 0.1
    assert float(cut.grad) < 0  # raise the cutoff


def test_read_connectome_and_config(tmp_path):
    m = np.array([[1.0, 2, 0], [0, 0, 3], [0, 0, 4]])
    (tmp_path / "m.csv").write_text(format_connectome(m))
    np.testing.assert_array_equal(read_connectome(tmp_path / "m.csv"), m)
    (tmp_path / "bad.csv").write_text("1,2\n3\n")
    with pytest.raises(ConfigError):
        read_connectome(tmp_path / "bad.csv")
    cfg = load_connectome_config(None, {"loss": {"normalise": "row"}})
    assert cfg["loss"]["normalise"] == "row"
    for over in ({"loss": {"normalise": "x"}}, {"fit": {"tracker": "x"}}, {"nope": {}}):
        with pytest.raises(ConfigError):
            load_connectome_config(None, over)
    repo = Path(__file__).resolve().parents[2]
    cfg = load_connectome_config(repo / "configs" / "fit_connectome.toml")
    assert cfg["loss"]["weights"] == {"connectome": 1.0}


def test_tiny_fit_raises_cutoff(phantom, tmp_path):
    fod, mask, vol, field, pos, dirs = phantom
    target, _ = hard_connectome(field, pos, dirs, TrackingParameters(cutoff=1.0), vol, 4.0)
    with pytest.raises(ShapeError):
        fit_connectome(fod, vol, target[:3, :3], seeds=(pos, dirs))
    cfg = {"fit": {"iterations": 3, "learn": ["cutoff"]}, "optimizer": {"lr": 0.3}}
    res = fit_connectome(
        fod, vol, target, TrackingParameters(cutoff=0.5), seeds=(pos, dirs), config=cfg,
        checkpoint=tmp_path / "c.pt",
    )  # fmt: skip
    assert res.iterations == 3 and (tmp_path / "c.pt").is_file()
    assert res.params.cutoff > 0.5
    assert np.isfinite(res.start_correlation) and np.isfinite(res.final_correlation)
    assert "connectome/correlation_hard" in res.history[-1]


@pytest.mark.parametrize("learn", [["sh"], ["sh", "cutoff"]])
def test_tiny_fod_and_joint_fit(phantom, tmp_path, learn):
    """--fit fod / both: SH coefficients in the seed mask are learned; the loss does not rise."""
    fod, mask, vol, field, pos, dirs = phantom
    target, _ = hard_connectome(field, pos, dirs, TrackingParameters(cutoff=1.0), vol, 4.0)
    cfg = {"fit": {"iterations": 2, "learn": learn}, "optimizer": {"lr": 0.3}}
    res = fit_connectome(
        fod, vol, target, TrackingParameters(cutoff=0.5), seeds=(pos, dirs), config=cfg,
        seed_mask=mask.data,
    )  # fmt: skip
    assert res.iterations == 2 and res.sh is not None
    fitted = np.asarray(res.sh.detach().cpu() if hasattr(res.sh, "detach") else res.sh)
    assert fitted.shape == tuple(fod.data.shape)
    assert np.isfinite(fitted).all() and not np.array_equal(fitted, fod.data)
    losses = [h["loss/total"] for h in res.history if "loss/total" in h]
    assert len(losses) == 2 and all(np.isfinite(losses))


def test_nan_loss_mid_way_raises_fit_diverged_and_keeps_checkpoint(phantom, tmp_path, monkeypatch):
    from invtract.errors import FitDiverged
    from invtract.fit import connectome_fit as cf

    fod, mask, vol, field, pos, dirs = phantom
    target, _ = hard_connectome(field, pos, dirs, TrackingParameters(cutoff=1.0), vol, 4.0)
    calls = {"n": 0}

    def poisoned(pred, *a, **k):
        out = connectome_loss(pred, *a, **k)
        calls["n"] += torch.is_grad_enabled()  # training passes only
        return out * float("nan") if calls["n"] >= 2 else out

    monkeypatch.setattr(cf, "connectome_loss", poisoned)
    ck = tmp_path / "c.pt"
    cfg = {"fit": {"iterations": 3, "learn": ["cutoff"]}, "optimizer": {"lr": 0.3}}
    with pytest.raises(FitDiverged, match="nan"):
        fit_connectome(
            fod, vol, target, TrackingParameters(cutoff=0.5), seeds=(pos, dirs), config=cfg,
            checkpoint=ck, evaluate=False,
        )  # fmt: skip
    assert torch.load(ck, weights_only=True)["iteration"] == 1


class _FakeRank:
    """Rank ``rank`` of a 2-process world whose all-reduce returns ``whole`` (one process
    plays both ranks)."""

    def __init__(self, rank: int, whole: torch.Tensor) -> None:
        self.rank, self.size, self.is_main, self.whole = rank, 2, rank == 0, whole

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        return self.whole.detach().clone()


def test_shared_loss_sums_to_the_whole_loss_and_its_gradient():
    """Data-parallel connectome loss: summed over ranks, the values are L(P0 + P1) and the
    gradients dL/dtheta (finite differences, float64)."""
    from invtract.fit.connectome_fit import _shared_loss

    g = torch.Generator().manual_seed(0)
    A = torch.rand(2, 4, 4, 3, generator=g, dtype=torch.float64)
    target = torch.rand(4, 4, generator=g, dtype=torch.float64)

    def loss_fn(p):
        return connectome_loss(p, target, kind="correlation", normalise="density")

    def summed(theta):
        parts = [torch.exp(A[r] @ theta) for r in range(2)]  # [4, 4] per rank
        whole = parts[0] + parts[1]
        return sum(_shared_loss(parts[r], loss_fn, _FakeRank(r, whole), True)[1] for r in range(2))

    theta = torch.rand(3, generator=g, dtype=torch.float64, requires_grad=True)
    direct = loss_fn(torch.exp(A[0] @ theta) + torch.exp(A[1] @ theta))
    assert float(summed(theta)) == pytest.approx(float(direct), rel=1e-12)
    (g_direct,) = torch.autograd.grad(direct, theta)
    (g_shared,) = torch.autograd.grad(summed(theta), theta)
    torch.testing.assert_close(g_shared, g_direct, rtol=1e-12, atol=1e-14)
    assert torch.autograd.gradcheck(summed, (theta,))
    # without gradients every rank holds the whole loss
    whole = torch.exp(A[0] @ theta) + torch.exp(A[1] @ theta)
    for r in range(2):
        _, v = _shared_loss(torch.exp(A[r] @ theta), loss_fn, _FakeRank(r, whole), False)
        assert float(v) == pytest.approx(float(direct), rel=1e-12)
