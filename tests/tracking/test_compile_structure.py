"""Compile structure of the numba kernels: one specialisation per kernel (cold-start cost).

Every distinct argument-type tuple of a dispatcher is a separate compilation of everything it
inlines; a literal constant at a call site (``f(..., 1, ...)``, ``False``) is its own type. The
tracking paths (plain, with regions, the peaks-recording hard pass of the differentiable
tracker) must share one ``_track_seed``, one ``_track_half`` and one ``_step``.

Kernels loaded from numba's on-disk cache never compile their callees (whose ``signatures``
then stay empty), so the check compiles from scratch in a subprocess with an empty cache
directory: about a minute, hence ``slow``.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from invtract.tracking import fused_cpu

pytestmark = pytest.mark.skipif(not fused_cpu.available(), reason="numba is not installed")

CODE = """
import numpy as np
from invtract.params import TrackingParameters
from invtract.tracking import fused_cpu as f
from invtract.tracking.types import RoiSet, SphereRoi
sh = np.zeros((5, 5, 5, 6), np.float32); sh[..., 0] = 1.0; sh[..., 3] = 0.5
M = np.hstack([np.eye(3), np.zeros((3, 1))])
p = TrackingParameters().resolve((1.0, 1.0, 1.0))
seeds = np.full((4, 3), 2.0, np.float32); dirs = np.tile(np.float32([0, 0, 1]), (4, 1))
r = f.track_fused_cpu(sh, M, seeds, dirs, p)
assert int(r.accepted.sum()) == 4, r.status
rois = RoiSet(mask=(SphereRoi((2.0, 2.0, 2.0), 1.5),), exclude=(SphereRoi((0.0, 0.0, 0.0), 0.5),))
f.track_fused_cpu(sh, M, seeds, dirs, p, rois=rois)
f.track_fused_cpu_peaks(sh, M, seeds, dirs, p)
f.seeds_have_data(sh, M, seeds)
for d in (f._track_seed, f._track_half, f._step, f._track_block, f._track_rows):
    print(d.py_func.__name__, len(d.signatures))
"""


@pytest.mark.slow
def test_one_specialisation_per_tracking_kernel(tmp_path):
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path))
    proc = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    counts = dict(line.split() for line in proc.stdout.strip().splitlines())
    assert counts == {"_track_seed": "1", "_track_half": "1", "_step": "1", "_track_block": "1",
                      "_track_rows": "1"}  # fmt: skip
