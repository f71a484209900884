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
    m, _ = hard_connectome(
        fod.data, fod.affine, fod.voxel_sizes, pos, dirs, TrackingParameters(cutoff=1.0), vol, 4
    )
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


def test_run_and_resume(tmp_path, target_csv, monkeypatch, capsys):
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
    assert main(_args(target_csv, part, ["--resume"])) == 0
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
