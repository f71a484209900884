"""The Triton kernel on a CUDA GPU (``pytest -m gpu``; skipped without one).

On CUDA the kernel's ``sinf`` / ``cosf`` / ``acosf`` / ``atan2f`` are libdevice's float64
functions rounded to float32, which differ from glibc's (what numba and tckgen call) by one ulp
in a few percent of calls: points are compared within a tolerance, decisions exactly (see
``fused_triton``'s module notes). The interpreter's bit-for-bit checks are in
``test_conformance.py`` and ``test_fused_triton.py``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
]

ROOT = Path(__file__).resolve().parents[2]
#: GPU points against numba's (mm): one-ulp differences of the float32 transcendentals
TOL_GPU_MM = 1e-3


def _kernel():
    pytest.importorskip("triton", reason="triton is not installed")
    from invtract.tracking import fused_cpu, fused_triton

    if fused_triton.INTERPRET:
        pytest.skip("fused_triton was imported for the interpreter in this process")
    if not fused_cpu.available():
        pytest.skip("numba (the reference) is missing")
    return fused_triton, fused_cpu


def _conformance():
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import test_conformance

    return test_conformance


@pytest.mark.parametrize("case", ["default", "rk4", "regions", "ordered", "downsample", "stop"])
def test_cuda_kernel_follows_numba(case):
    fused_triton, fused_cpu = _kernel()
    tc = _conformance()
    sh, s2v, seeds, dirs, params, rois = tc._inputs(case)
    ref = fused_cpu.track_fused_cpu(sh, s2v, seeds, dirs, params, rois)
    res = fused_triton.track_fused_triton(
        torch.as_tensor(sh, device="cuda"), s2v, seeds, dirs, params, rois
    )
    np.testing.assert_array_equal(res.status, ref.status)
    np.testing.assert_array_equal(res.lengths, ref.lengths)
    np.testing.assert_array_equal(res.seed_index, ref.seed_index)
    if ref.points.size:
        assert float(np.abs(res.points - ref.points).max()) <= TOL_GPU_MM


def test_speed_gpu_benchmark_runs():
    """``benchmarks/speed_gpu.py`` on a small seed count prints its JSON."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "speed_gpu.py"), "--seeds", "2000",
         "--repeats", "1"],
        capture_output=True, text=True, timeout=900, cwd=ROOT,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-4000:]
    res = json.loads(out.stdout)
    assert res["cuda"] is True
    assert res["runs"][0]["steps_per_s"] > 0
