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


@pytest.mark.parametrize("name", ["act_grid_crop", "act_grid_pv", "act_grid2_sgm_crop"])
def test_cuda_act_follows_numba(name):
    """ACT on CUDA against the numba ACT kernel (tckgen-exact) on the ACT references' seeds
    and random WM / SGM seeds: the same decisions, points within the GPU tolerance."""
    fused_triton, fused_cpu = _kernel()
    from invtract.io.image import load_fod
    from invtract.io.seeds import seeds_from_reference
    from invtract.io.tractogram import load_tractogram_header
    from invtract.tracking.act import act_from_header, act_parameters
    from invtract.tracking.act_cpu import track_fused_cpu_act
    from invtract.tracking.reference import parameters_from_header

    from .reference_data import need_data

    shared = need_data("sift_phantom")
    local = Path(__file__).resolve().parents[1] / "data" / "act"
    tck = (shared if (shared / f"{name}.tck").exists() else local) / f"{name}.tck"
    header = load_tractogram_header(tck)
    act = act_from_header(header, tck.parent)
    fod = load_fod(shared / "fods.mif")
    vox = fod.voxel_sizes
    params = act_parameters(parameters_from_header(header), vox).resolve(vox)
    pos, dirs, _ = seeds_from_reference(tck, tck.with_name(tck.stem + "_seeds.txt"))
    rng = np.random.default_rng(0)
    tissue = np.argwhere(
        (np.asarray(act.data[..., 1]) > 0.3) | (np.asarray(act.data[..., 2]) > 0.3)
    )
    v = tissue[rng.choice(len(tissue), 200)] + rng.uniform(-0.5, 0.5, (200, 3))
    A = np.linalg.inv(np.vstack([act.scanner2voxel, [0, 0, 0, 1]]))
    seeds = np.concatenate([pos[:200], v @ A[:3, :3].T + A[:3, 3]]).astype(np.float32)
    init = np.concatenate([dirs[:200], rng.normal(size=(200, 3))]).astype(np.float32)
    sh = np.asarray(fod.data, np.float32)
    ref = track_fused_cpu_act(sh, fod.scanner2voxel, seeds, init, params, act)
    res = fused_triton.track_fused_triton(
        torch.as_tensor(sh, device="cuda"), fod.scanner2voxel, seeds, init, params, act=act
    )
    np.testing.assert_array_equal(res.status, ref.status)
    np.testing.assert_array_equal(res.term, ref.term)
    np.testing.assert_array_equal(res.lengths, ref.lengths)
    np.testing.assert_array_equal(res.seed_index, ref.seed_index)
    if ref.points.size:
        assert float(np.abs(res.points - ref.points).max()) <= TOL_GPU_MM


def test_speed_gpu_act_benchmark_runs():
    """``benchmarks/speed_gpu.py --act`` on a small seed count prints its JSON."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "speed_gpu.py"), "--act", "--crop",
         "--seeds", "2000", "--repeats", "1", "--numba-seeds", "500"],
        capture_output=True, text=True, timeout=900, cwd=ROOT,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-4000:]
    res = json.loads(out.stdout)
    assert res["cuda"] is True and res["crop_at_gmwmi"] is True
    run = res["runs"][0]
    assert run["steps_per_s"] > 0 and run["same_decisions_frac"] > 0.95
