"""ACT in the survival connectome (:mod:`invtract.fit.connectome_act`) and in connectome fits:
exact in the hard limit (against ``invtract connectome`` on the hard ACT tractogram and against
tckgen + tck2connectome), gradcheck-verified, and ``fit --target-connectome --act`` end to end.

The data: ``../shared/data/sift_phantom`` (FOD, binary 5TT, parcellation; skipped when
absent) and the partial-volume / sub-cortical 5TT variants in ``tests/data/act``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from invtract.cli import main
from invtract.fit.connectome_fit import (
    _Tracked,
    check_act_inputs,
    fast_tracking,
    hard_connectome,
    survival_connectome,
    whole_brain_seeds,
)
from invtract.fod.field import FODField
from invtract.io.image import load_fod, load_image, load_mask
from invtract.losses.connectome import as_label_volume, connectome_loss, format_connectome
from invtract.params import TrackingParameters
from invtract.tracking.act import act_parameters, load_act
from invtract.tracking.act_soft import TissueImage

from ..tracking.reference_data import need_data

LOCAL = Path(__file__).resolve().parents[1] / "data" / "act"
TINY = 1e-7  # every temperature of the hard limit


@pytest.fixture(scope="module")
def sift():
    """``(fod, mask, parcellation, FODField)`` of the sift phantom."""
    fod = load_fod(need_data("sift_phantom", "fods.mif"))
    mask = load_mask(need_data("sift_phantom", "mask.mif"))
    vol = as_label_volume(load_image(need_data("sift_phantom", "parc.mif")))
    return fod, mask, vol, FODField.from_image(fod)


def _act(name: str):
    path = LOCAL / name if (LOCAL / name).exists() else need_data("sift_phantom", name)
    return load_act(path)


def _soft(res, field, fod, vol, params, act, temps=(TINY, TINY, TINY), **kw):
    rp = params.resolve(fod.voxel_sizes)
    return survival_connectome(
        res, field, vol, cutoff=kw.pop("cutoff", rp.cutoff),
        angle_deg=kw.pop("angle_deg", rp.angle_deg), temperature=temps[:2],
        min_points=rp.min_points, step_mm=rp.step_mm, temperature_mm=kw.pop("t_mm", 0.01),
        act=act, tissue_temperature=temps[2], **kw,
    )  # fmt: skip


@pytest.mark.parametrize("five_tt", ["5tt.mif", "5tt_pv.mif", "5tt_sgm.mif"])
def test_hard_limit_equals_invtract_connectome_of_the_hard_act_tractogram(sift, tmp_path, five_tt):
    """Every temperature -> 0: the soft ACT connectome is the count matrix that
    ``invtract connectome`` gives for the hard ACT tractogram of the same seeds (binary 5TT,
    partial volumes with CSF and pathology, sub-cortical GM)."""
    from invtract.io.tractogram import save_tractogram
    from invtract.tracking.api import Seeding, track

    fod, mask, vol, field = sift
    act = _act(five_tt)
    params = act_parameters(TrackingParameters(), fod.voxel_sizes)
    pos, dirs = whole_brain_seeds(mask.data, mask.affine, per_voxel=2, seed=4)
    hard = track(FODField.from_image(fod),
                 Seeding("list", positions=pos, directions=dirs), params,
                 rng_seed=0, act=act)  # fmt: skip
    assert len(hard.streamlines) > 50
    save_tractogram(tmp_path / "hard.tck", hard.streamlines)
    csv = tmp_path / "hard.csv"
    parc = str(need_data("sift_phantom", "parc.mif"))
    assert main(["connectome", str(tmp_path / "hard.tck"), parc, str(csv), "--quiet"]) == 0
    expected = np.loadtxt(csv, delimiter=",")
    res = fast_tracking(field, pos, dirs, params, act=act)
    pred = _soft(res, field, fod, vol, params, act).detach().numpy()
    assert expected.sum() > 20
    np.testing.assert_allclose(pred, expected, atol=1e-6)


def test_hard_limit_equals_tckgen_and_tck2connectome(sift):
    """tckgen -act (-seed_grid_per_voxel mask 2 -cutoff 0.2) replayed from its own seeds: the
    soft connectome at tiny temperatures is tck2connectome's matrix of tckgen's tractogram."""
    from invtract.io.seeds import seeds_from_reference

    fod, _, vol, field = sift
    tck = need_data("sift_phantom", "act_grid_cutoff0.2.tck")
    pos, dirs, _ = seeds_from_reference(
        tck, need_data("sift_phantom", "act_grid_cutoff0.2_seeds.txt")
    )
    act = _act("5tt.mif")
    params = act_parameters(TrackingParameters(cutoff=0.2), fod.voxel_sizes)
    res = fast_tracking(field, pos, dirs, params, act=act)
    assert res.points.shape[0] == len(pos)  # every tckgen streamline is tracked again
    expected = np.loadtxt(need_data("sift_phantom", "act_grid_cutoff0.2_connectome.csv"),
                          delimiter=",")  # fmt: skip
    pred = _soft(res, field, fod, vol, params, act).detach().numpy()
    np.testing.assert_allclose(pred, expected, atol=1e-6)


def test_gradcheck_cutoff_angle_step_and_fod(sift):
    """float64 gradcheck of the ACT survival connectome (partial-volume 5TT, a few
    streamlines, moderate temperatures) w.r.t. cutoff, angle, step and three SH coefficients
    of a voxel the streamlines pass through."""
    fod, mask, vol, field = sift
    act = TissueImage.from_act(_act("5tt_pv.mif"))
    params = act_parameters(TrackingParameters(), fod.voxel_sizes)
    pos, dirs = whole_brain_seeds(mask.data, mask.affine, per_voxel=1, seed=2)
    res = fast_tracking(field, pos, dirs, params, act=_act("5tt_pv.mif"))
    keep = torch.arange(0, res.points.shape[0], max(1, res.points.shape[0] // 6))[:6]
    pts0, si, ln = res.points[keep], res.seed_index[keep], res.lengths[keep]
    rp = params.resolve(fod.voxel_sizes)
    sh64 = field.sh.to(torch.float64)
    mid = pts0[0, int(si[0])].numpy()
    inv = np.linalg.inv(np.asarray(fod.affine, np.float64))
    vox = tuple(np.rint(inv[:3, :3] @ mid + inv[:3, 3]).astype(int))
    h0 = float(rp.step_mm)

    def f(cut, ang, step, coef):
        s = sh64.clone()
        s[vox][[0, 3, 5]] = coef
        seed_pt = pts0[torch.arange(len(keep)), si][:, None]
        pts = seed_pt + (step / h0) * (pts0 - seed_pt)
        m = survival_connectome(
            _Tracked(pts, si, ln), field.with_sh(s), vol, cutoff=cut, angle_deg=ang,
            temperature=(0.05, 0.05), min_points=rp.min_points, step_mm=h0, act=act,
            tissue_temperature=0.1,
        )  # fmt: skip
        return m[0, 1:].sum() * 0.7 + m[2, 3] * 1.3 + m.sum() * 0.1

    args = (
        torch.tensor(rp.cutoff * 4, dtype=torch.float64, requires_grad=True),
        torch.tensor(rp.angle_deg / 3, dtype=torch.float64, requires_grad=True),
        torch.tensor(h0, dtype=torch.float64, requires_grad=True),
        sh64[vox][[0, 3, 5]].clone().requires_grad_(True),
    )
    assert torch.autograd.gradcheck(f, args, eps=1e-6, atol=1e-6, rtol=1e-4)
    g = torch.autograd.grad(f(*args), args)
    assert all(float(x.abs().sum()) > 0 for x in g)  # every input moves the matrix


def test_higher_cutoff_rejects_instead_of_ending(sift):
    """Under ACT a streamline whose amplitude falls below the cutoff in WM is rejected, so a
    target tracked at a higher cutoff has fewer streamlines and the counts loss asks for a
    higher cutoff (without ACT the same streamlines would only end earlier)."""
    fod, mask, vol, field = sift
    act = _act("5tt.mif")
    pos, dirs = whole_brain_seeds(mask.data, mask.affine, per_voxel=2, seed=1)
    start = act_parameters(TrackingParameters(), fod.voxel_sizes)
    target, n_t = hard_connectome(field, pos, dirs,
                                  TrackingParameters(cutoff=0.45), vol, 4.0, act=act)  # fmt: skip
    res = fast_tracking(field, pos, dirs, start, act=act)
    assert 0 < n_t < res.points.shape[0]
    cut = torch.tensor(start.cutoff, dtype=torch.float64, requires_grad=True)
    pred = _soft(res, field, fod, vol, start, act, temps=(0.3, 0.05, 0.05), cutoff=cut, t_mm=1.0)
    loss = connectome_loss(pred, target, kind="frobenius", normalise="counts")
    loss.backward()
    assert float(cut.grad) < 0


def test_act_inputs_are_checked():
    act = _act("5tt_pv.mif")
    from invtract.errors import ConfigError

    with pytest.raises(ConfigError, match="tracker"):
        check_act_inputs(act, (14, 5, 9), np.eye(4), tracker="differentiable")
    far = np.eye(4)
    far[:3, 3] = 1000.0
    with pytest.raises(ConfigError, match="does not overlap the FOD"):
        check_act_inputs(act, (14, 5, 9), far)
    check_act_inputs(act, (14, 5, 9), np.diag([2.0, 2.0, 2.0, 1.0]))


# ----------------------------------------------------------------------------------------------
# the command
# ----------------------------------------------------------------------------------------------
def _cli_args(tmp_path, target, extra=()):
    d = need_data("sift_phantom")
    return [
        "fit", "--target-connectome", str(target), "--parcellation", str(d / "parc.mif"),
        "--fod", str(d / "fods.mif"), "--seed-image", str(d / "mask.mif"),
        "--run", str(tmp_path / "run"), "--no-progress", "--no-tensorboard", *extra,
    ]  # fmt: skip


def _one_line_error(capsys, match: str) -> None:
    err = [x for x in capsys.readouterr().err.splitlines() if "error:" in x]
    assert len(err) == 1 and match in err[0], err


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--act", "missing_5tt.mif"], "missing_5tt.mif"),
        (["--crop-at-gmwmi"], "--crop-at-gmwmi needs --act"),
        (["--act", "{fod}"], "a 5TT image must be 4-D with 5 volumes"),
        (["--act", "{five}", "--set", "fit.tracker=differentiable"], "tracker"),
        (["--act", "{five}", "--seed-gmwmi", "{five}"], "--seed-image or --seed-gmwmi"),
    ],
    ids=["missing", "crop-without-act", "not-5tt", "differentiable", "two-seedings"],
)
def test_act_option_errors_before_any_work(tmp_path, capsys, extra, match):
    d = need_data("sift_phantom")
    target = tmp_path / "t.csv"
    target.write_text(format_connectome(np.eye(4)))
    extra = [x.format(fod=d / "fods.mif", five=d / "5tt.mif") for x in extra]
    assert main(_cli_args(tmp_path, target, extra)) == 1
    _one_line_error(capsys, match)
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_act_on_a_bundle_fit_is_refused(tmp_path, capsys):
    d = need_data("sift_phantom")
    args = ["fit", "--target", str(d / "act_gmwmi.tck"), "--fod", str(d / "fods.mif"),
            "--act", str(d / "5tt.mif"), "--run", str(tmp_path / "run")]  # fmt: skip
    assert main(args) == 1
    _one_line_error(capsys, "--act applies to --target-connectome fits only")


@pytest.mark.slow
def test_fit_target_connectome_with_act_end_to_end(tmp_path, capsys):
    """``invtract fit --target-connectome --act`` on the sift phantom: a target tracked by tckgen
    -act at cutoff 0.45 (fewer streamlines than at ACT's default 0.05); a few iterations of a
    counts fit raise the cutoff and lower the selection loss below the start's. (Constant, low
    temperatures: every soft test loses some mass, so at the default starting temperatures
    the soft counts sit below the hard ones and a counts loss would first ask for more.)"""
    import os
    import shutil
    import subprocess

    if shutil.which("tckgen") is None or shutil.which("tck2connectome") is None:
        pytest.skip("MRtrix3 not installed")
    d = need_data("sift_phantom")
    env = dict(os.environ, MRTRIX_RNG_SEED="1")
    tck, target = tmp_path / "t.tck", tmp_path / "t.csv"
    subprocess.run(["tckgen", str(d / "fods.mif"), str(tck), "-algorithm", "SD_Stream",
                    "-act", str(d / "5tt.mif"), "-seed_grid_per_voxel", str(d / "mask.mif"),
                    "2", "-cutoff", "0.45", "-nthreads", "0", "-quiet"],
                   check=True, env=env)  # fmt: skip
    subprocess.run(["tck2connectome", str(tck), str(d / "parc.mif"), str(target), "-quiet",
                    "-nthreads", "0"], check=True)  # fmt: skip
    extra = ["--act", str(d / "5tt.mif"), "--iterations", "4", "--fit", "params",
             "--set", "seeding.per_voxel=2", "--set", "loss.kind=frobenius",
             "--set", "loss.normalise=counts", "--set", "fit.eval_every=2",
             "--set", "optimizer.lr=0.5", "--set", "temperature.schedule=constant",
             "--set", "temperature.amplitude_start=0.1", "--set", "temperature.angle_start_deg=1",
             "--set", "temperature.tissue_start=0.02"]  # fmt: skip
    assert main(_cli_args(tmp_path, target, extra)) == 0
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["start"]["cutoff"] == pytest.approx(0.05)  # ACT's default
    assert result["cutoff"] > 0.2
    assert result["best_iteration"] >= 1  # a later iterate beat the start's selection loss
    history = [
        json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    assert history[-1]["param/cutoff"] > history[0]["param/cutoff"]


def test_seed_gmwmi_draws_fixed_interface_seeds():
    """``fit --seed-gmwmi``: ``[seeding] max_seeds`` seeds drawn as tckgen -seed_gmwmi draws
    them (on the GM-WM interface), the same for the same ``[fit] seed``, unit directions."""
    from types import SimpleNamespace

    from invtract.commands.fit import _gmwmi_seeds
    from invtract.tracking.act_torch import ActField, tissues_at

    act = _act("5tt.mif")
    args = SimpleNamespace(seed_gmwmi=str(need_data("sift_phantom", "gmwmi.mif")))
    cfg = {"seeding": {"max_seeds": 25}, "fit": {"seed": 3}}
    pos, dirs = _gmwmi_seeds(args, act, cfg)
    assert pos.shape == dirs.shape == (25, 3)
    np.testing.assert_allclose(np.linalg.norm(dirs, axis=1), 1.0, atol=1e-6)
    tis, valid = tissues_at(ActField.from_act(act), torch.as_tensor(pos), masked=False)
    assert bool(valid.all())
    gm_minus_wm = (tis[:, 0] + tis[:, 1] - tis[:, 2]).abs()
    assert float(gm_minus_wm.max()) < 0.05
    again, _ = _gmwmi_seeds(args, act, cfg)
    np.testing.assert_array_equal(pos, again)
