"""`invtract fit`: help, a tiny run, and --resume after an interruption."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from invtract.cli import main
from invtract.data import example_path
from invtract.io.tractogram import load_tractogram, save_tractogram


def test_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["fit", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--target", "--target-seeds", "--fit", "--config", "--run", "--iterations",
                 "--device", "--resume", "--optimizer.lr"):  # fmt: skip
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


def test_run_and_resume_matches_uninterrupted(tmp_path, small_target, monkeypatch):
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
    assert main(_args(small_target, part, ["--resume"])) == 0
    assert _result(part) == res
    assert len((part / "metrics.jsonl").read_text().splitlines()) == 3
