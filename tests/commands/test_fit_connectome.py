"""`invtract fit --target-connectome`: help, a tiny run, --resume, input checks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from invtract.cli import main
from invtract.data import example_path
from invtract.fit.connectome_fit import hard_connectome, whole_brain_seeds
from invtract.io.image import load_fod, load_image, load_mask
from invtract.losses.connectome import as_label_volume, format_connectome
from invtract.params import TrackingParameters

PARC = Path(__file__).resolve().parents[1] / "data" / "connectome" / "phantom_cross90_parc.nii.gz"


def test_help_lists_connectome_flags(capsys):
    with pytest.raises(SystemExit) as e:
        main(["fit", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--target-connectome", "--parcellation", "--seed-image"):
        assert flag in out


@pytest.fixture(scope="module")
def target_csv(tmp_path_factory):
    fod, mask = load_fod(example_path("fod")), load_mask(example_path("mask"))
    vol = as_label_volume(load_image(PARC))
    pos, dirs = whole_brain_seeds(mask.data, fod.affine, max_seeds=150, seed=0)
    m, _ = hard_connectome(fod, pos, dirs, TrackingParameters(cutoff=1.0), vol, 4)
    path = tmp_path_factory.mktemp("t") / "target.csv"
    path.write_text(format_connectome(m))
    return str(path)


def _args(target, run, extra=()):
    return [
        "fit", "--target-connectome", target, "--parcellation", str(PARC),
        "--fod", str(example_path("fod")), "--seed-image", str(example_path("mask")),
        "--run", str(run), "--iterations", "3", "--cutoff", "0.5", "--no-progress",
        "--set", "seeding.max_seeds=150", "--set", "fit.eval_every=2",
        "--set", "fit.image_every=2", *extra,
    ]  # fmt: skip


@pytest.mark.parametrize(
    "resume_with", [[], pytest.param(["--nproc", "2"], marks=pytest.mark.slow)], ids=["1", "2"]
)
def test_run_and_resume(tmp_path, target_csv, monkeypatch, capsys, resume_with):
    """A run, then one interrupted after 2 of 3 iterations and resumed (in 1 or 2
    processes): the same end point."""
    full = tmp_path / "full"
    assert main(_args(target_csv, full)) == 0
    printed = json.loads(capsys.readouterr().out)
    res = json.loads((full / "result.json").read_text())
    assert printed["cutoff"] == res["cutoff"] and res["cutoff"] > 0.5
    for name in ("config.toml", "command.txt", "metrics.jsonl", "checkpoint.pt",
                 "fitted_connectome.csv", "versions.json"):  # fmt: skip
        assert (full / name).is_file(), name
    assert list((full / "tb").glob("events*"))
    lines = (full / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3 and "connectome/correlation_soft" in json.loads(lines[0])

    # interrupted after 2 iterations, then resumed: same end point
    import invtract.fit.connectome_fit as cf

    part = tmp_path / "part"
    orig = cf.fit_connectome

    def interrupted(*a, **k):
        def stop(it, loss, rec):
            if it == 1:
                raise KeyboardInterrupt

        return orig(*a, on_step=stop, **k)

    monkeypatch.setattr(cf, "fit_connectome", interrupted)
    assert main(_args(target_csv, part)) != 0  # interrupted (main reports it)
    monkeypatch.setattr(cf, "fit_connectome", orig)
    assert main(_args(target_csv, part, ["--resume", *resume_with])) == 0
    r2 = json.loads((part / "result.json").read_text())
    assert r2["cutoff"] == pytest.approx(res["cutoff"], rel=1e-9)
    assert len((part / "metrics.jsonl").read_text().splitlines()) == 3


def test_input_checks(tmp_path, target_csv, capsys):
    args = ["fit", "--target-connectome", target_csv, "--fod", str(example_path("fod"))]
    assert main(args) != 0
    assert "--parcellation is required" in capsys.readouterr().err
    bad = tmp_path / "bad.csv"
    bad.write_text(format_connectome(np.ones((3, 3))))
    assert main(_args(str(bad), tmp_path / "r")) != 0
    assert "nodes" in capsys.readouterr().err


def _floats_match(a: dict, b: dict, rel: float = 1e-9) -> None:
    assert a.keys() == b.keys()
    for k, v in a.items():
        if isinstance(v, dict):
            _floats_match(v, b[k], rel)
        elif isinstance(v, float):
            assert b[k] == pytest.approx(v, rel=rel, abs=1e-12), k
        else:
            assert b[k] == v, k


@pytest.mark.slow
def test_two_process_fit_equals_one_process(tmp_path, target_csv):
    """--nproc 2: seeds sharded, expected connectomes and gradients summed over ranks; the
    same result.json, losses and fitted matrix as one process (1e-9 relative)."""
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(_args(target_csv, one)) == 0
    assert main(_args(target_csv, two, ["--nproc", "2"])) == 0
    a = json.loads((one / "result.json").read_text())
    b = json.loads((two / "result.json").read_text())
    _floats_match(a, b)
    assert a["cutoff"] > 0.5  # the fit moved (a trivially equal pair would prove nothing)
    la = [json.loads(x) for x in (one / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x) for x in (two / "metrics.jsonl").read_text().splitlines()]
    for key in ("loss/total", "loss/connectome", "param/cutoff", "tracking/n_streamlines"):
        assert [x[key] for x in lb] == pytest.approx([x[key] for x in la], rel=1e-9), key
    ma = np.loadtxt(one / "fitted_connectome.csv", delimiter=",")
    mb = np.loadtxt(two / "fitted_connectome.csv", delimiter=",")
    np.testing.assert_array_equal(ma, mb)


# ------------------------------------------------------------------------------------------
# honest outcomes (issue 14 item 2) for connectome fits
# ------------------------------------------------------------------------------------------
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
        ("seeding.per_voxel=0", "seeding.per_voxel"),
    ],
)
def test_bad_settings_fail_before_any_work(tmp_path, target_csv, capsys, setting, match):
    run = tmp_path / "run"
    assert main(_args(target_csv, run, ["--set", setting])) == 1
    _one_line_error(capsys, match)
    assert not run.exists()  # nothing written, no checkpoint


def _with_fod(args: list[str], fod) -> list[str]:
    args = list(args)
    args[args.index("--fod") + 1] = str(fod)
    return args


def test_parcellation_far_from_the_fod_stops_before_iterating(tmp_path, target_csv, capsys):
    from invtract.io.image import save_nifti

    parc = load_image(PARC)
    aff = np.asarray(parc.affine, np.float64).copy()
    aff[:3, 3] += 1e6
    far = tmp_path / "far_parc.nii.gz"
    save_nifti(far, np.asarray(parc.data), aff)
    args = _args(target_csv, tmp_path / "run")
    args[args.index("--parcellation") + 1] = str(far)
    assert main(args) == 1
    _one_line_error(capsys, "the parcellation and the FOD do not overlap")
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_all_nan_fod_stops_before_iterating(tmp_path, target_csv, capsys):
    from invtract.io.image import save_nifti

    img = load_fod(example_path("fod"))
    nan_fod = tmp_path / "nan.nii.gz"
    save_nifti(nan_fod, np.full_like(np.asarray(img.data), np.nan), img.affine)
    assert main(_with_fod(_args(target_csv, tmp_path / "run"), nan_fod)) == 1
    _one_line_error(capsys, "do not overlap")


def test_untrackable_seeds_stop_before_iterating(tmp_path, target_csv, capsys):
    # a cutoff above every amplitude of the phantom: no seed is accepted
    args = _args(target_csv, tmp_path / "run", ["--set", "bounds.cutoff=[0.01, 100.0]"])
    args[args.index("--cutoff") + 1] = "50"
    assert main(args) == 1
    _one_line_error(capsys, "no streamline can be tracked from the")
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def _strict(path):
    def refuse(name):
        raise ValueError(f"non-strict JSON constant {name}")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_result_is_strict_json_and_reports_the_selected_iterate(tmp_path, target_csv):
    run = tmp_path / "zero"
    assert main(_args(target_csv, run, ["--iterations", "0"])) == 0
    res = _strict(run / "result.json")
    assert res["iterations"] == 0 and res["final_loss"] == res["best_loss"]
    assert {k: res[k] for k in ("step_mm", "angle_deg", "cutoff")} == res["best_params"]
    assert res["cutoff"] == pytest.approx(0.5)  # nothing fitted: the start


def test_precedence_config_then_set_then_flags(tmp_path, target_csv):
    """defaults < --config < --set < the named flags (--iterations), read from config.toml."""
    from invtract.fit.config import toml_dumps

    cfg = tmp_path / "c.toml"
    cfg.write_text(
        toml_dumps({"fit": {"iterations": 5, "eval_every": 3}, "optimizer": {"lr": 0.2}})
    )
    run = tmp_path / "run"
    args = _args(target_csv, run, ["--config", str(cfg), "--set", "optimizer.lr=0.1"])
    args[args.index("--iterations") + 1] = "1"
    assert main(args) == 0
    import tomllib

    rec = tomllib.loads((run / "config.toml").read_text())
    assert rec["fit"]["iterations"] == 1  # flag over --config
    assert rec["optimizer"]["lr"] == 0.1  # --set over --config
    assert rec["fit"]["eval_every"] == 2  # --set (in _args) over --config
    assert rec["loss"]["radius_mm"] == 4.0  # the default where nothing sets it
