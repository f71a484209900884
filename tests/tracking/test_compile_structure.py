"""Compile structure of the numba kernels: what each command compiles (cold-start cost).

Every distinct argument-type tuple of a dispatcher is a separate compilation of everything it
inlines; a literal constant at a call site (``f(..., 1, ...)``, ``False``) is its own type.
Tracking without regions (``track --example``, the peaks-recording hard pass of the
differentiable tracker, the seed test) compiles no region code (``rois`` is None and numba
prunes those branches) and shares one ``_track_seed``, one ``_track_half`` and one ``_step``;
regions add one ``_track_seed`` / ``_track_half`` / ``_track_block`` each, never a second
``_step`` or ``_get_peak`` (the only compiled peak search: the seed's goes through ``_step``
too).

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
KERNELS = (f._track_seed, f._track_half, f._step, f._get_peak, f._track_block, f._track_rows,
           f._in_set, f._visit, f._seed_usable)
def counts(tag):
    for d in KERNELS:
        print(tag, d.py_func.__name__, len(d.signatures))
r = f.track_fused_cpu(sh, M, seeds, dirs, p)
assert int(r.accepted.sum()) == 4, r.status
f.track_fused_cpu_peaks(sh, M, seeds, dirs, p)
f.seeds_have_data(sh, M, seeds)
counts("plain")
rois = RoiSet(mask=(SphereRoi((2.0, 2.0, 2.0), 1.5),), exclude=(SphereRoi((0.0, 0.0, 0.0), 0.5),))
f.track_fused_cpu(sh, M, seeds, dirs, p, rois=rois)
counts("rois")
"""


@pytest.mark.slow
def test_specialisations_per_tracking_kernel(tmp_path):
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path))
    proc = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    counts = {}
    for line in proc.stdout.strip().splitlines():
        tag, name, n = line.split()
        counts.setdefault(tag, {})[name] = int(n)
    # no regions: one of each tracking kernel, no region code at all
    assert counts["plain"] == {"_track_seed": 1, "_track_half": 1, "_step": 1, "_get_peak": 1,
                               "_track_block": 1, "_track_rows": 1, "_in_set": 0, "_visit": 0,
                               "_seed_usable": 1}  # fmt: skip
    # regions: one more of each kernel that takes them, the same _step
    assert counts["rois"] == {"_track_seed": 2, "_track_half": 2, "_step": 1, "_get_peak": 1,
                              "_track_block": 2, "_track_rows": 1, "_in_set": 1, "_visit": 1,
                              "_seed_usable": 2}  # fmt: skip
