"""`invtract calibrate` end to end on a tiny phantom (in-process ``main([...])``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tomllib
import torch

from invtract.cli import main

TRUE_CUTOFF = 0.5


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> dict:
    """10 x 10 x 6 voxels, lmax 4, one fibre along x fading along x; target tracked at
    cutoff 0.5 with its seeds file (same phantom as tests/fit/test_search.py)."""
    from invtract.fod.field import FODField
    from invtract.fod.sh import sh_basis
    from invtract.io.image import save_nifti
    from invtract.io.seeds import write_seeds
    from invtract.io.tractogram import save_tractogram
    from invtract.params import TrackingParameters
    from invtract.tracking.api import Seeding, track

    folder = tmp_path_factory.mktemp("phantom")
    g = torch.Generator().manual_seed(0)
    u = torch.randn(400, 3, generator=g, dtype=torch.float64)
    u = u / u.norm(dim=-1, keepdim=True)
    f = torch.exp(-8.0 * (1.0 - u[:, 0] ** 2))
    coef = torch.linalg.lstsq(sh_basis(u, 4), f[:, None]).solution[:, 0].numpy()
    amp = 1.0 - 0.09 * np.arange(10)
    sh = (amp[:, None, None, None] * np.ones((10, 10, 6, 1)) * coef).astype(np.float32)
    save_nifti(folder / "fod.nii.gz", sh, np.eye(4))
    pos = np.array([[1.3, y, z] for y in (3.0, 4.5, 6.0) for z in (2.0, 3.0)], np.float32)
    dirs = np.tile(np.array([[1.0, 0.0, 0.0]], np.float32), (len(pos), 1))
    params = TrackingParameters(step_mm=0.2, cutoff=TRUE_CUTOFF, min_length_mm=1.0)
    res = track(
        FODField.from_array(sh, np.eye(4)),
        Seeding("list", positions=pos, directions=dirs),
        params,
        rng_seed=0,
    )
    save_tractogram(folder / "target.tck", res.streamlines, header=dict(res.params.header()))
    write_seeds(folder / "seeds.txt", np.arange(len(pos)), res.seed_index, res.seed_points, "test")
    space = folder / "space.toml"
    space.write_text(
        '[study]\nsampler = "random"\npruner = "none"\n'
        "[params.cutoff]\nlow = 0.1\nhigh = 0.9\n"
        "[params.step_mm]\nlow = 0.1\nhigh = 0.4\nlog = true\n"
    )
    return {
        "fod": str(folder / "fod.nii.gz"),
        "target": str(folder / "target.tck"),
        "seeds": str(folder / "seeds.txt"),
        "space": str(space),
    }


def base_args(ph: dict, run: Path) -> list[str]:
    return ["-q", "calibrate", "--target", ph["target"], "--fod", ph["fod"],
            "--target-seeds", ph["seeds"], "--space", ph["space"], "--run", str(run),
            "--seed", "0"]  # fmt: skip


def test_help(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["calibrate", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--target", "--space", "--mode", "--trials", "--workers", "--storage",
                 "--study", "--run", "--seed", "--timeout", "--show"):  # fmt: skip
        assert flag in out


def test_calibrate_resume_and_show(phantom, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(base_args(phantom, run) + ["--trials", "3"]) == 0
    for name in ("best.json", "trials.csv", "param_importance.png", "loss_vs_trial.png",
                 "config.toml", "commands.txt", "study.db"):  # fmt: skip
        assert (run / name).is_file(), name
    best = json.loads((run / "best.json").read_text())
    assert set(best["params"]) == {"cutoff", "step_mm"} and best["loss"] >= 0
    assert best["study"] == "target_space"
    cfg = tomllib.loads((run / "config.toml").read_text())
    assert cfg["job"]["study"] == "target_space" and "calibrate" in cfg["command"]
    assert cfg["space"]["params"]["cutoff"]["high"] == 0.9
    assert len(list((run / "tb").glob("trial_*"))) == 3
    # the same command again adds 2 trials to the same study
    assert main(base_args(phantom, run) + ["--trials", "2"]) == 0
    rows = (run / "trials.csv").read_text().splitlines()
    assert len(rows) == 1 + 5
    assert len((run / "commands.txt").read_text().splitlines()) == 2
    capsys.readouterr()
    url = f"sqlite:///{run / 'study.db'}"
    assert main(["calibrate", "--show", "--storage", url, "--study", "target_space"]) == 0
    out = capsys.readouterr().out
    assert "5 trials" in out and "best: trial" in out and "cutoff" in out


def test_flag_clash_and_bad_inputs(phantom, tmp_path, capsys):
    args = base_args(phantom, tmp_path / "r")
    assert main(args + ["--cutoff", "0.3"]) == 1
    assert "searched" in capsys.readouterr().err
    assert main(args + ["--workers", "0"]) == 1
    bad = list(args)
    bad[bad.index("--fod") + 1] = str(tmp_path / "missing.nii.gz")
    assert main(bad) == 1
    assert "not found" in capsys.readouterr().err
