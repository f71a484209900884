"""`invtract fit`: help, a tiny run, --resume after an interruption; honest outcomes and input
faults are one-line errors (exit 1) before any work; result.json is strict JSON holding the
parameters fitted.tck was tracked with; a 2-process data-parallel fit gives the single-process
result."""

from __future__ import annotations

import json
import math
import tempfile

import numpy as np
import pytest
import torch

from invtract.cli import main
from invtract.data import example_path
from invtract.io.image import load_fod, save_nifti
from invtract.io.tractogram import load_tractogram, load_tractogram_header, save_tractogram
from invtract.streamlines import Streamlines


def test_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["fit", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--target", "--target-seeds", "--fit", "--config", "--run", "--iterations",
                 "--device", "--resume", "--optimizer.lr", "--dwi", "--fslgrad", "--response",
                 "--mask", "--fod-updates"):  # fmt: skip
        assert flag in out


@pytest.fixture
def small_target(tmp_path):
    sl = load_tractogram(example_path("target"))
    sub = sl.select(torch.as_tensor(np.arange(0, 96, 16)))  # 6 streamlines, midpoint seeds
    path = tmp_path / "t.tck"
    save_tractogram(path, sub, header={"min_dist": "10", "max_dist": "200"})
    return str(path)


def _args(target, run, extra=()):
    return [
        "fit", "--target", target, "--fod", str(example_path("fod")), "--run", str(run),
        "--iterations", "3", "--step", "0.8", "--no-progress",
        "--set", "fit.seeds_per_iteration=3", "--set", "fit.image_every=2",
        "--set", "fit.eval_every=2", *extra,
    ]  # fmt: skip


def _result(run):
    return json.loads((run / "result.json").read_text())


def test_signal_spatial_is_a_config_key_the_flag_overrides(
    tmp_path, small_target, dwi_inputs, capsys
):
    """[signal] spatial: --signal-spatial W and --set signal.spatial=W both set it (recorded in
    config.toml), it weighs the coupling inside loss/signal, and a negative weight is refused."""
    dwi, resp, mask = dwi_inputs
    base = ["--fit", "fod", "--dwi", dwi, "--response", resp, "--mask", mask]
    sig = {}
    for name, extra in (
        ("off", ["--signal-spatial", "0"]),
        ("big", ["--set", "signal.spatial=50"]),
    ):
        run = tmp_path / name
        assert main(_quick(small_target, run, base + extra)) == 0
        from invtract.fit.config import read_toml

        assert read_toml(run / "config.toml")["signal"]["spatial"] == (
            0.0 if name == "off" else 50.0
        )
        lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        sig[name] = lines[-1]["loss/signal"]
    assert sig["big"] != pytest.approx(sig["off"], rel=1e-6)
    assert main(_quick(small_target, tmp_path / "neg", base + ["--signal-spatial", "-1"])) != 0
    assert "signal.spatial" in capsys.readouterr().err


@pytest.mark.parametrize(
    "resume_with", [[], pytest.param(["--nproc", "2"], marks=pytest.mark.slow)], ids=["1", "2"]
)
def test_run_and_resume_matches_uninterrupted(tmp_path, small_target, monkeypatch, resume_with):
    """Interrupted after 2 of 3 iterations, resumed (in 1 or 2 processes): the same result."""
    full = tmp_path / "full"
    assert main(_args(small_target, full)) == 0
    res = _result(full)
    for key in ("step_mm", "angle_deg", "cutoff", "final_loss", "best_loss"):
        assert key in res
    for name in ("config.toml", "command.txt", "versions.json", "metrics.jsonl", "fitted.tck",
                 "checkpoint.pt"):  # fmt: skip
        assert (full / name).is_file()
    assert len((full / "metrics.jsonl").read_text().splitlines()) == 3
    assert list((full / "tb").glob("events.out.tfevents.*"))

    # interrupt after 2 iterations (Ctrl-C), then resume
    from invtract.fit import runlog

    real = runlog.RunLogger.metrics
    count = {"n": 0}

    def interrupting(self, record):
        real(self, record)
        count["n"] += 1
        if count["n"] == 2:
            raise KeyboardInterrupt

    part = tmp_path / "part"
    monkeypatch.setattr(runlog.RunLogger, "metrics", interrupting)
    assert main(_args(small_target, part)) == 130
    monkeypatch.setattr(runlog.RunLogger, "metrics", real)
    assert not (part / "result.json").exists()
    assert main(_args(small_target, part)) == 1  # refuses to overwrite without --resume
    assert main(_args(small_target, part, ["--resume", *resume_with])) == 0
    if resume_with:
        for k, v in _result(part).items():
            assert v == (pytest.approx(res[k], rel=1e-9) if isinstance(v, float) else res[k]), k
    else:
        assert _result(part) == res
    assert len((part / "metrics.jsonl").read_text().splitlines()) == 3


def _quick(target, run, extra=(), fod=None):
    """A 2-iteration fit without TensorBoard or images, held-out losses every iteration."""
    args = _args(target, run, ["--iterations", "2", "--no-tensorboard", *extra])
    if fod is not None:
        args[args.index("--fod") + 1] = str(fod)
    return args


def _one_line_error(capsys, match: str) -> None:
    err = [x for x in capsys.readouterr().err.splitlines() if "error:" in x]
    assert len(err) == 1 and match in err[0], err
    assert "Traceback" not in err[0]


@pytest.mark.parametrize(
    "setting, match",
    [
        ("optimizer.lr=abc", "optimizer.lr must be a number, got 'abc'"),
        ("optimizer.lr=-1", "optimizer.lr must be > 0, got -1"),
        ("optimizer.speed=2", "unknown config key 'optimizer.speed'"),
    ],
)
def test_bad_settings_fail_before_any_work(tmp_path, small_target, capsys, setting, match):
    run = tmp_path / "run"
    assert main(_quick(small_target, run, ["--set", setting])) == 1
    _one_line_error(capsys, match)
    assert not run.exists()  # nothing written, no checkpoint


def test_unwritable_run_folder_is_one_line(tmp_path, small_target, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(_quick(small_target, blocker / "run")) == 1
    _one_line_error(capsys, "cannot write there")


def test_target_far_from_the_fod_stops_before_iterating(tmp_path, small_target, capsys):
    sl = load_tractogram(small_target)
    far = tmp_path / "far.tck"
    save_tractogram(far, Streamlines(sl.points + 1e6, sl.lengths), header={"min_dist": "10"})
    assert main(_quick(str(far), tmp_path / "run")) == 1
    _one_line_error(capsys, "the target bundle and the FOD do not overlap")
    assert not (tmp_path / "run" / "result.json").exists()
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_all_nan_fod_stops_before_iterating(tmp_path, small_target, capsys):
    img = load_fod(example_path("fod"))
    nan_fod = tmp_path / "nan.nii.gz"
    save_nifti(nan_fod, np.full_like(np.asarray(img.data), np.nan), img.affine)
    assert main(_quick(small_target, tmp_path / "run", fod=nan_fod)) == 1
    _one_line_error(capsys, "do not overlap")


def test_untrackable_target_stops_before_iterating(tmp_path, small_target, capsys):
    # a cutoff above every amplitude of the phantom: no seed is accepted
    assert main(_quick(small_target, tmp_path / "run", ["--cutoff", "50"])) == 1
    _one_line_error(capsys, "no target streamline can be tracked")


def _strict(path):
    def refuse(name):
        raise ValueError(f"non-strict JSON constant {name}")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_result_is_strict_json_and_matches_fitted_tck(tmp_path, small_target):
    run = tmp_path / "zero"
    assert main(_quick(small_target, run, ["--iterations", "0"])) == 0
    res = _strict(run / "result.json")
    assert res["iterations"] == 0 and math.isfinite(res["final_loss"])
    run = tmp_path / "two"
    assert main(_quick(small_target, run)) == 0
    res = _strict(run / "result.json")
    top = {k: res[k] for k in ("step_mm", "angle_deg", "cutoff")}
    assert top == res["best_params"]
    assert res["best_loss"] <= res["final_loss"]
    hdr = load_tractogram_header(run / "fitted.tck")
    for key in ("step_size", "max_angle", "threshold", "min_dist", "max_dist"):
        assert key in hdr
    assert float(hdr["step_size"]) == pytest.approx(top["step_mm"], rel=1e-5)
    assert float(hdr["threshold"]) == pytest.approx(top["cutoff"], rel=1e-5)


def test_two_process_fit_equals_one_process(tmp_path, small_target):
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(_quick(small_target, one)) == 0
    assert main(_quick(small_target, two, ["--nproc", "2"])) == 0
    a, b = _strict(one / "result.json"), _strict(two / "result.json")
    assert a.keys() == b.keys()
    for k, v in a.items():
        if isinstance(v, float):
            assert b[k] == pytest.approx(v, rel=1e-9, abs=1e-12), k
        elif k != "heldout_terms":
            assert b[k] == v, k
    la = [json.loads(x) for x in (one / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x) for x in (two / "metrics.jsonl").read_text().splitlines()]
    assert [x["loss/total"] for x in lb] == pytest.approx([x["loss/total"] for x in la], rel=1e-9)


# ------------------------------------------------------------------------------------------
# --dwi: the diffusion-signal term (issue 17) on the bundle fit
# ------------------------------------------------------------------------------------------
#: the phantom's response (b = 2000, lmax 8), as MRtrix writes response_wm.txt
_RESPONSE = "# Shells: 2000\n1211.2 -732.1 255.3 -65.1 12.1\n"


@pytest.fixture
def dwi_inputs(tmp_path):
    """``(dwi.mif, response, mask.mif)``: noiseless signals of the example FOD under the
    response (3 b=0 and 30 b=2000 directions, dw_scheme in the header); mask: the target's
    slice (z = 2) where the FOD's l=0 coefficient is above 0.1 (a small CSD solve)."""
    from invtract.fit.objective import fibonacci_sphere
    from invtract.fod.csd import csd_model, load_response, predict_signal
    from invtract.io.mif import write_mif

    img = load_fod(example_path("fod"))
    grad = np.zeros((33, 4))
    grad[3:, :3] = fibonacci_sphere(30).numpy()
    grad[3:, 3] = 2000.0
    resp = tmp_path / "response_wm.txt"
    resp.write_text(_RESPONSE)
    model = csd_model(grad, load_response(resp))
    c = torch.as_tensor(np.asarray(img.data).reshape(-1, 45), dtype=torch.float64)
    sig = np.zeros((c.shape[0], 33), np.float32)
    sig[:, 3:] = predict_signal(c, model.M).numpy()
    sig[:, :3] = 1211.2 * math.sqrt(4 * math.pi) * c[:, :1].numpy()
    scheme = "\n".join(",".join(f"{v:.6f}" for v in row) for row in grad)
    dwi = tmp_path / "dwi.mif"
    write_mif(dwi, sig.reshape(img.data.shape[:3] + (33,)), img.affine, {"dw_scheme": scheme})
    mask = tmp_path / "mask.mif"
    keep = np.abs(np.asarray(img.data)[..., 0]) > 0.1
    keep[..., [0, 1, 3, 4, 5]] = False
    write_mif(mask, keep, img.affine)
    return str(dwi), str(resp), str(mask)


def test_dwi_adds_the_signal_term_to_the_fod_fit(tmp_path, small_target, dwi_inputs):
    """--fit fod --dwi: fit_fod_dwi is the default config, loss/signal (>= 0: 0 at the CSD
    solution of the signals) is logged every iteration and the run record names the DWI."""
    dwi, resp, mask = dwi_inputs
    run = tmp_path / "run"
    extra = ["--fit", "fod", "--dwi", dwi, "--response", resp, "--mask", mask]
    assert main(_quick(small_target, run, extra)) == 0
    from invtract.fit.config import read_toml

    rec = read_toml(run / "config.toml")
    assert rec["loss"]["weights"]["signal"] == 5.0 and rec["loss"]["weights"]["prior"] == 0.0
    assert rec["signal"]["spatial"] == "auto"  # the config key's default
    assert rec["signal"]["start"] == "coupled"
    assert rec["inputs"]["dwi"].endswith("dwi.mif") and rec["inputs"]["config"].endswith(
        "fit_fod_dwi.toml"
    )
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    sig = [x["loss/signal"] for x in lines]
    assert len(sig) == 2 and all(math.isfinite(s) and s >= 0 for s in sig)
    assert sig[1] > 0  # the first step moved the FOD off the CSD optimum
    terms = {k for k in lines[0] if k.startswith("loss/")}
    assert "loss/prior" not in terms  # weight 0 in fit_fod_dwi: not computed
    assert "loss/reach" in terms and "loss/extent" not in terms  # reach replaces extent
    assert "loss/tangent" in terms  # the targets' directions as FOD peaks
    assert all(x["loss/reach"] >= 0 and x["loss/tangent"] >= 0 for x in lines)
    assert (run / "fitted_fod.nii.gz").is_file()
    res = _strict(run / "result.json")["signal"]
    assert res["bvalue"] == 2000.0 and res["n_directions"] == 30 and res["noise_sigma"] >= 0
    assert 0 <= res["start_rms_residual"] and 0 <= res["final_rms_residual"]
    # "auto": the weight chosen by cross-validation, with each candidate's held-out error
    assert res["spatial"] == res["spatial_cv"]["weight"] >= 0
    assert len(res["spatial_cv"]["cv_error"]) >= 2


@pytest.mark.slow
def test_two_process_dwi_fit_equals_one_process(tmp_path, small_target, dwi_inputs):
    """--nproc 2 --dwi (coupling weight "auto", coupled start: rank 0 prepares them, the other
    rank adopts them): the result is one process's."""
    dwi, resp, mask = dwi_inputs
    extra = ["--fit", "fod", "--dwi", dwi, "--response", resp, "--mask", mask]
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(_quick(small_target, one, extra)) == 0
    assert main(_quick(small_target, two, extra + ["--nproc", "2"])) == 0
    a, b = _strict(one / "result.json"), _strict(two / "result.json")
    assert b["signal"]["spatial"] == a["signal"]["spatial"]
    assert b["signal"]["spatial_cv"] == a["signal"]["spatial_cv"]
    for k in ("best_loss", "final_loss", "final_train_mdf_mm"):  # float32 rows, summed
        assert b[k] == pytest.approx(a[k], rel=1e-6), k  # across ranks in another order


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--fit", "fod", "--config", "fit_fod_dwi"], "[loss.weights] signal = 5 needs"),
        (["--fit", "fod", "--dwi", "{dwi}"], "--dwi needs --response"),
        (["--fit", "params", "--dwi", "{dwi}", "--response", "{resp}"], "use --fit fod"),
        (["--fit", "fod", "--response", "{resp}"], "--response / --fslgrad need --dwi"),
        (
            ["--fit", "fod", "--dwi", "{dwi}", "--response", "{resp}", "--mask", "nope.mif"],
            "--mask: file not found",
        ),  # fmt: skip
    ],
)
def test_signal_faults_fail_before_any_work(tmp_path, small_target, capsys, extra, match):
    files = {"dwi": str(tmp_path / "dwi.mif"), "resp": str(tmp_path / "r.txt")}
    for f in files.values():
        open(f, "w").close()  # never read: every check comes first
    run = tmp_path / "run"
    assert main(_quick(small_target, run, [e.format(**files) for e in extra])) == 1
    _one_line_error(capsys, match)
    assert not run.exists()


def test_dwi_with_a_connectome_target_is_an_error(tmp_path, capsys):
    dwi = tmp_path / "dwi.mif"
    dwi.write_text("")
    argv = ["fit", "--target-connectome", "m.csv", "--parcellation", "p.nii", "--fod", "f.nii",
            "--dwi", str(dwi), "--run", str(tmp_path / "run")]  # fmt: skip
    assert main(argv) == 1
    _one_line_error(capsys, "--dwi applies to bundle fits")


def test_precedence_on_the_command_line(tmp_path):
    """defaults < --example < --config < --set < the named flags, as the command resolves
    them (no fit is run)."""
    from invtract.cli import build_parser
    from invtract.commands.fit import EXAMPLE_OVERRIDES, _bundle_checks
    from invtract.fit.config import toml_dumps
    from invtract.fit.optimise import DEFAULT_CONFIG

    cfg = tmp_path / "c.toml"
    cfg.write_text(toml_dumps({"fit": {"iterations": 5, "eval_every": 3}}))
    parser = build_parser()

    def resolved(*extra):
        return _bundle_checks(parser.parse_args(["fit", "--example", *extra]))[0]["fit"]

    ex = EXAMPLE_OVERRIDES["fit"]
    assert ex["iterations"] != DEFAULT_CONFIG["fit"]["iterations"]  # the layer shows
    assert resolved()["iterations"] == ex["iterations"]  # --example over the defaults
    fit = resolved("--config", str(cfg))
    assert fit["iterations"] == 5 and fit["eval_every"] == 3  # --config over --example
    assert fit["seeds_per_iteration"] == ex["seeds_per_iteration"]  # --example kept
    fit = resolved("--config", str(cfg), "--set", "fit.iterations=6")
    assert fit["iterations"] == 6  # --set over --config
    fit = resolved("--config", str(cfg), "--set", "fit.iterations=6", "--iterations", "7")
    assert fit["iterations"] == 7  # the named flag over --set


def test_fit_pairs_a_trx_target_through_its_seed_index(tmp_path):
    """A ``.trx`` target written by ``invtract track`` carries each streamline's seed vertex:
    the fit starts from those seeds (as from a tckgen seeds file), not from midpoints."""
    from invtract.cli import build_parser
    from invtract.commands.fit import _bundle_data
    from invtract.io.seeds import midpoint_seeds

    trx = tmp_path / "t.trx"
    fod = str(example_path("fod"))
    argv = ["track", fod, str(trx), "-seed_image", str(example_path("roi")), "-select", "6"]
    assert main(argv) == 0
    args = build_parser().parse_args(["fit", "--fod", fod, "--target", str(trx)])
    data = _bundle_data(args)
    mid, _ = midpoint_seeds(data["target"])
    assert len(data["target"]) == 6
    assert not np.allclose(np.asarray(data["pos"]), np.asarray(mid), atol=1e-3)
    # the seed is a vertex of its streamline
    for s, p in zip(data["target"], np.asarray(data["pos"])):
        assert np.min(np.linalg.norm(np.asarray(s) - p, axis=1)) < 1e-4


def test_split_scores_from_one_tracking_equal_tracking_each_split():
    """finish_run tracks every seed once and scores the train / held-out splits from it: the
    same paired MDF as tracking each split's seeds alone (a seed's streamline does not depend
    on the other seeds), including seeds that track nothing."""
    from invtract.commands.fit import _split_mdf
    from invtract.fit.outputs import track_fitted
    from invtract.fit.scoring import ScoreConfig, score_tracking
    from invtract.io.seeds import midpoint_seeds
    from invtract.params import TrackingParameters

    target = load_tractogram(example_path("target"))
    pos, dirs = midpoint_seeds(target)
    fod = load_fod(example_path("fod"))
    params = TrackingParameters(step_mm=0.5, cutoff=0.9)  # most seeds fail: missing pairs
    every = track_fitted(fod, params, pos, dirs)
    assert 0 < len(every.streamlines) < len(target)  # the missing-seed penalty is exercised
    for index in (np.arange(0, len(target), 3), np.array([1, 2, 40, 95])):
        alone = track_fitted(fod, params, pos[index], dirs[index])
        sub = target.select(torch.as_tensor(index))
        want = score_tracking(alone.streamlines, alone.seed_ids, sub, pos[index], ScoreConfig())
        assert _split_mdf(every, target, pos, index) == float(want.loss)
    assert math.isnan(_split_mdf(every, target, pos, np.array([], np.int64)))


def test_a_fod_fit_through_a_scratch_copy_of_the_fod_is_the_same_fit(
    tmp_path, small_target, monkeypatch
):
    """An FOD over ``scratch.SCRATCH_BYTES`` is copied into an unlinked scratch file in the
    temporary folder (invtract.io.scratch): same losses, same fitted FOD file, nothing left on
    disk."""
    from invtract.io import scratch

    made = []
    real = scratch.scratch_array
    monkeypatch.setattr(scratch, "scratch_array", lambda *a: made.append(a) or real(*a))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # as TMPDIR would
    out = {}
    for name, limit in (("ram", scratch.SCRATCH_BYTES), ("scratch", 0)):
        monkeypatch.setattr(scratch, "SCRATCH_BYTES", limit)
        run = tmp_path / "runs" / name
        assert main(_quick(small_target, run, ["--fit", "fod"])) == 0
        out[name] = (
            json.loads((run / "result.json").read_text()),
            (run / "fitted_fod.nii.gz").read_bytes(),
        )
    # the example FOD (.nii.gz, unpacked to a temporary file) read into one scratch array in
    # its voxel order, then the C-ordered copy into another; both in the temporary folder
    assert [m[0] for m in made] == [(6, 40, 40, 45), (40, 40, 6, 45)]
    assert all(m[2] is None for m in made)
    assert out["ram"][0]["final_loss"] == out["scratch"][0]["final_loss"]
    assert out["ram"][0]["final_heldout_mdf_mm"] == out["scratch"][0]["final_heldout_mdf_mm"]
    assert out["ram"][1] == out["scratch"][1]
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["ram", "scratch"]
    assert [p for p in (tmp_path / "tmp").iterdir() if p.is_file()] == []  # (torch caches: dirs)
