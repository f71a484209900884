"""``invtract track`` streams its ``.tck`` to disk: memory does not grow with the count, and an
interrupted run leaves nothing at the output path."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from invtract.data import example_path
from invtract.io import load_tractogram, load_tractogram_header
from invtract.tracking import fused_cpu

pytestmark = pytest.mark.skipif(not fused_cpu.available(), reason="numba is not available")

RUN = """
import json, resource, sys
from invtract.cli import main
code = main(sys.argv[1:])
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"code": code, "rss_MB": rss}))
"""


def _track(out, *extra) -> dict:
    cmd = [sys.executable, "-c", RUN, "-q", "track", "--example", str(out), "--force"]
    cmd += ["--seed-image", str(example_path("mask")), "--rng-seed", "3", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_select(tmp_path):
    small = _track(tmp_path / "small.tck", "--select", "2000", "--batch-size", "1024")
    large = _track(tmp_path / "large.tck", "--select", "40000", "--batch-size", "1024")
    hdr = load_tractogram_header(tmp_path / "large.tck")
    assert int(hdr["count"]) == 40000 and int(hdr["max_num_seeds"]) >= 40000
    kept = load_tractogram(tmp_path / "large.tck")
    data_mb = kept.points.numel() * 4 / 2**20
    assert data_mb > 60  # held in memory, the streamlines alone would show
    assert large["rss_MB"] - small["rss_MB"] < 0.25 * data_mb, (small, large, data_mb)


def test_streamed_output_matches_the_collected_one(tmp_path):
    """.tck (streamed) and .trk (collected, then written) hold the same streamlines."""
    _track(tmp_path / "a.tck", "--select", "300", "--batch-size", "64")
    _track(tmp_path / "a.trk", "--select", "300", "--batch-size", "64")
    a, b = load_tractogram(tmp_path / "a.tck"), load_tractogram(tmp_path / "a.trk")
    np.testing.assert_array_equal(a.lengths.numpy(), b.lengths.numpy())
    np.testing.assert_allclose(a.points.numpy(), b.points.numpy(), atol=1e-3)
    hdr = load_tractogram_header(tmp_path / "a.tck")
    assert hdr["count"] == "0000000300" and int(hdr["total_count"]) >= 300
    assert json.dumps(hdr)  # all strings
