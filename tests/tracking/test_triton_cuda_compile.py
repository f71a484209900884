"""The Triton kernel compiles for a CUDA GPU (sm_90) on a machine without one.

The interpreter runs the kernel's Python; this compiles it (``triton.compile`` down to PTX and
a cubin with Triton's bundled ``ptxas``), which catches what the interpreter lets through
(types of loop-carried values, scalar / lane mixing, constexpr branches). One fresh process per
variant (the module must be imported with ``TRITON_INTERPRET`` unset). ``slow``: 30-70 s a
variant on one core.

Run directly: ``python tests/tracking/test_triton_cuda_compile.py RK4 ROIS SEQ [ACT]`` (0 / 1
each).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

#: pointer arguments of ``_sd_stream_kernel`` and their element types (as the host passes them)
_POINTERS = {
    "seeds_ptr": "*fp32", "dirs_ptr": "*fp32", "sh_ptr": "*fp32", "nz_ptr": "*i8",
    "m_ptr": "*fp64", "lut_ptr": "*fp32", "tab_ptr": "*i32", "flt_ptr": "*fp32",
    "cs_ptr": "*fp32", "pts_ptr": "*fp32", "n_ptr": "*i32", "n1_ptr": "*i32",
    "status_ptr": "*i8", "term_ptr": "*i8", "u0_ptr": "*fp32", "steps_ptr": "*i32",
    "ri_ptr": "*i64", "rf_ptr": "*fp32", "rmask_ptr": "*u8",
    "tt_ptr": "*fp32", "tnz_ptr": "*i8", "mt_ptr": "*fp64",
}  # fmt: skip
_FLOATS = {"step", "cutoff", "dot_thr", "inc", "hstep", "cos_rk4"}


def _compile(rk4: bool, rois: bool, seq: bool, act: bool = False) -> dict:
    """Compile the kernel for sm_90 (lmax 8 tables); returns what was produced."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from invtract.tracking import fused_triton

    assert not fused_triton.INTERPRET
    fn = fused_triton._sd_stream_kernel
    const = {"BLOCK": 128, "KP": 64, "KC": 8, "SP": 32, "NS": 25, "SEQ": seq, "RK4": rk4,
             "ROIS": rois, "ACT": act}  # fmt: skip
    sig = {}
    for name in fn.arg_names:
        if name in const:
            sig[name] = "constexpr"
        else:
            sig[name] = _POINTERS.get(name, "fp32" if name in _FLOATS else "i32")
    names = list(fn.arg_names)
    src = ASTSource(fn, sig, constexprs={(names.index(k),): v for k, v in const.items()})
    opts = {"enable_fp_fusion": False, "num_warps": 4}
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)
    return {"ptx": "ptx" in kernel.asm, "cubin": "cubin" in kernel.asm}


@pytest.mark.slow
@pytest.mark.parametrize("rk4, rois, act", [(False, False, False), (True, True, False),
                                            (True, True, True)])  # fmt: skip
def test_kernel_compiles_for_cuda(rk4, rois, act):
    pytest.importorskip("triton", reason="triton is not installed")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("TRITON_INTERPRET", None)
    args = [str(int(rk4)), str(int(rois)), "1", str(int(act))]
    out = subprocess.run(
        [sys.executable, __file__, *args], env=env, capture_output=True, text=True, timeout=1800
    )
    assert out.returncode == 0, out.stderr[-4000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"ptx": True, "cubin": True}


if __name__ == "__main__":
    print(json.dumps(_compile(*(bool(int(a)) for a in sys.argv[1:5]))))
