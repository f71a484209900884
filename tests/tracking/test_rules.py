"""The rulebook (:mod:`invtract.tracking.rules`) is the only home of SD_Stream's constants.

* Its values are MRtrix3 3.0.3's (``core/math/SH.h``, ``core/interp/linear.h``, tckgen defaults).
* No kernel restates them: the Python source of every numba kernel, every Triton kernel and the
  torch engine's functions holds none of the rulebook's numbers as a literal, and the names
  they read resolve to the rulebook's values (numba freezes those globals as constants).
* The Triton launch passes the rulebook's float64 constants (recorded from a real launch).
* The tracking and FOD modules import each other without a cycle, and the torch engine tracks
  (with its own seed test) in a process where numba cannot be imported.
"""

from __future__ import annotations

import ast
import json
import math
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from invtract.tracking import rules  # noqa: E402

PACKAGE = Path(rules.__file__).resolve().parents[1]

#: the numbers no kernel may carry as a literal (each has one home in the rulebook)
FORBIDDEN = {
    rules.PEAK_MAX_ITERATIONS,
    rules.PEAK_MAX_STEP_RAD,
    rules.PEAK_TOLERANCE_RAD,
    rules.WEIGHT_THRESHOLD,
    rules.LUT_ROWS,
    rules.LUT_LAST_ROW,
    rules.SQRT2,
    rules.DEFAULT_SELECT,
    rules.SEEDS_PER_SELECT,
}
#: ACT's numbers, which the ACT kernels (act_cpu, the Triton kernel) may not carry as literals
#: (GMWMI_MAX_ITERS = 10 and TISSUE_SUM_THRESHOLD = 0.5 are too common to forbid: the kernels
#: read them by name, which the tests below check)
FORBIDDEN_ACT = {
    rules.GMWMI_ACCURACY,
    rules.GMWMI_NORMAL_PERTURBATION,
    rules.GMWMI_HERMITE_TENSION,
}
#: rulebook name -> value, for the names kernels read
RULE_VALUES = {k: getattr(rules, k) for k in rules.__all__ if k.isupper()}


def test_rulebook_values_are_mrtrix_3_0_3():
    assert rules.PEAK_MAX_ITERATIONS == 50  # SH.h get_peak: for (int i = 0; i < 50; i++)
    assert rules.PEAK_MAX_STEP_RAD == 0.2  # MAX_DIR_CHANGE
    assert rules.PEAK_TOLERANCE_RAD == 1e-4  # ANGLE_TOLERANCE
    assert rules.POLE_SIN_THRESHOLD == 1e-4
    assert rules.LUT_ROWS == 512 and rules.LUT_LAST_ROW == 511  # PrecomputedAL(num_s = 512)
    assert rules.SQRT2 == math.sqrt(2.0)
    assert np.float32(rules.WEIGHT_THRESHOLD) == np.float32(1e-6)  # linear.h
    assert rules.FOV_HALF_VOXEL == 0.5
    assert rules.DEFAULT_SELECT == 5000 and rules.SEEDS_PER_SELECT == 1000
    assert rules.seed_limits(None, None) == (5000, 5_000_000)
    assert rules.seed_limits(0, None) == (0, 0)
    assert rules.seed_limits(10, 7) == (10, 7)


def test_field_of_view_rule_is_exclusive():
    v = np.array([-0.5, -0.4999, 0.0, 9.4999, 9.5, np.nan])
    assert rules.inside_fov(v, 10).tolist() == [False, True, True, True, False, False]


def test_rejection_rule_and_its_order():
    R = rules.Reject
    assert rules.REJECTION_ORDER[0] == R.ENTER_EXCLUDE_REGION
    assert rules.track_rejection(1, True, True, 51) == R.ENTER_EXCLUDE_REGION
    assert rules.track_rejection(1, False, True, 51) == R.NO_PROPAGATION_FROM_SEED
    assert rules.track_rejection(1, False, False, 1) == R.ACCEPTED  # -minlength 0
    assert rules.track_rejection(1, False, True, 1) == R.MISSED_INCLUDE_REGION
    assert rules.track_rejection(50, False, True, 51) == R.TRACK_TOO_SHORT
    assert rules.track_rejection(51, False, True, 51) == R.MISSED_INCLUDE_REGION
    assert rules.track_rejection(51, False, False, 51) == R.ACCEPTED
    n = np.array([1, 1, 2])
    assert rules.no_propagation(n, 2).tolist() == [True, True, False]
    assert not rules.no_propagation(n, 1).any()


# --------------------------------------------------------------------------------------------
# no kernel restates a rule
# --------------------------------------------------------------------------------------------


def _code_objects(code: types.CodeType):
    yield code
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            yield from _code_objects(c)


def _literals(fn) -> set:
    out = set()
    for code in _code_objects(fn.__code__):
        for c in code.co_consts:
            if isinstance(c, (int, float)) and not isinstance(c, bool):
                out.add(c)
    return out


def _check_function(module, fn, label: str, forbidden=frozenset()) -> None:
    bad = {c for c in _literals(fn) if c in FORBIDDEN or c in forbidden}
    assert not bad, f"{label} restates rulebook constants {bad}: import them from rules"
    names = set()
    for code in _code_objects(fn.__code__):
        names |= set(code.co_names)
    for name in names & set(RULE_VALUES):
        assert getattr(module, name) == RULE_VALUES[name], f"{label}: {name}"


def _module_functions(module):
    """Plain functions, numba dispatchers (``py_func``) and Triton kernels (``fn``)."""
    for name, obj in vars(module).items():
        fn = getattr(obj, "py_func", None) or getattr(obj, "fn", None) or obj
        if isinstance(fn, types.FunctionType) and fn.__module__ == module.__name__:
            yield name, fn


@pytest.mark.parametrize(
    "modname",
    [
        "invtract.tracking.fused_cpu",
        "invtract.tracking.adjoint_cpu",
        "invtract.tracking.tracker",
        "invtract.tracking.propagator",
        "invtract.tracking.runner",
        "invtract.fod.peaks",
        "invtract.fod.interp",
        "invtract.fod.legendre",
    ],
)
def test_no_kernel_restates_a_rule(modname):
    import importlib

    module = importlib.import_module(modname)
    checked = 0
    for name, fn in _module_functions(module):
        _check_function(module, fn, f"{modname}.{name}")
        checked += 1
    assert checked > 0


def test_numba_kernels_read_the_rulebook():
    """The peak search and interpolation kernels read the rulebook's names (frozen by numba)."""
    from invtract.tracking import fused_cpu

    def names(fn):
        return set().union(*(c.co_names for c in _code_objects(fn.py_func.__code__)))

    peak = names(fused_cpu._get_peak)
    assert {"PEAK_MAX_ITERATIONS", "PEAK_MAX_STEP_RAD", "PEAK_TOLERANCE_RAD"} <= peak
    assert {"POLE_SIN_THRESHOLD", "LUT_LAST_ROW", "_SQRT2"} <= peak
    assert {"WEIGHT_THRESHOLD", "FOV_HALF_VOXEL"} <= names(fused_cpu._interp)
    assert "_interp" in names(fused_cpu._sample)
    assert "_track_rejection" in names(fused_cpu._track_seed)
    assert fused_cpu._SQRT2 == rules.SQRT2
    assert fused_cpu._track_rejection.py_func is rules.track_rejection


def test_torch_engine_reads_the_rulebook():
    from invtract.fod import legendre, peaks

    assert peaks.MAX_ITERATIONS == rules.PEAK_MAX_ITERATIONS
    assert peaks.MAX_DIR_CHANGE == rules.PEAK_MAX_STEP_RAD
    assert peaks.ANGLE_TOLERANCE == rules.PEAK_TOLERANCE_RAD
    assert legendre.LUT_SIZE == rules.LUT_ROWS
    assert legendre.legendre_table(4).shape[0] == rules.LUT_ROWS


def test_triton_kernel_constants_and_launch():
    """The Triton kernels hold no rule literal, their constexpr globals are the rulebook's, and
    a real launch passes its float64 constants (sqrt 2, the 1e-4 tolerance)."""
    pytest.importorskip("triton", reason="triton is not installed")
    from invtract.params import TrackingParameters
    from invtract.tracking import fused_triton
    from invtract.tracking.act import ActImage

    if not fused_triton.available():
        pytest.skip(str(fused_triton.unavailable_reason()))
    for name, fn in _module_functions(fused_triton):
        _check_function(fused_triton, fn, f"fused_triton.{name}", FORBIDDEN_ACT)
    consts = {
        "_K_FOV_HALF": rules.FOV_HALF_VOXEL,
        "_K_WEIGHT_EPS": rules.WEIGHT_THRESHOLD,
        "_K_MAX_STEP": rules.PEAK_MAX_STEP_RAD,
        "_K_MAX_ITERATIONS": rules.PEAK_MAX_ITERATIONS,
        "_K_LUT_LAST_ROW": rules.LUT_LAST_ROW,
        "_K_NORMAL_PERTURBATION": rules.GMWMI_NORMAL_PERTURBATION,
        "_K_HERMITE_TENSION": rules.GMWMI_HERMITE_TENSION,
        "_K_GMWMI_MAX_ITERS": rules.GMWMI_MAX_ITERS,
    }
    for name, value in consts.items():
        assert getattr(fused_triton, name).value == value, name
    kernel = fused_triton._sd_stream_kernel
    seen = {}

    class Recorder:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                seen["m"] = args[4].detach().cpu().numpy().copy()
                seen["inc"], seen["lut"], seen["nal"] = args[25], args[5].numel(), args[21]
                seen["mt"] = args[kernel.arg_names.index("mt_ptr")].detach().cpu().numpy().copy()
                seen["act"] = kwargs["ACT"]
                return kernel[grid](*args, **kwargs)

            return launch

    sh = np.zeros((3, 3, 3, 6), np.float32)
    sh[..., 0], sh[..., 3] = 1.0, 0.5
    s2v = np.hstack([np.eye(3), np.zeros((3, 1))])
    params = TrackingParameters(step_mm=0.5).resolve((1.0, 1.0, 1.0))
    fused_triton._sd_stream_kernel = Recorder()
    try:
        fused_triton.track_fused_triton(sh, s2v, np.ones((1, 3)), np.ones((1, 3)), params)
        assert seen["act"] is False
        act = ActImage(np.ones((3, 3, 3, 5), np.float32), 2.0 * s2v, (0.5, 0.5, 0.5))
        fused_triton.track_fused_triton(sh, s2v, np.ones((1, 3)), np.ones((1, 3)), params, act=act)
    finally:
        fused_triton._sd_stream_kernel = kernel
    assert seen["m"][12:].tolist() == [rules.SQRT2, rules.PEAK_TOLERANCE_RAD]
    assert seen["m"].dtype == np.float64
    assert np.float32(seen["inc"]) == np.float32(math.pi / rules.LUT_LAST_ROW)
    assert seen["lut"] == rules.LUT_ROWS * seen["nal"]
    # ACT: the 5TT's own transform, then the float64 tissue-sum threshold and interface accuracy
    assert seen["act"] is True and seen["mt"].dtype == np.float64
    assert seen["mt"][:12].tolist() == (2.0 * s2v).reshape(-1).tolist()
    assert seen["mt"][12:].tolist() == [rules.TISSUE_SUM_THRESHOLD, rules.GMWMI_ACCURACY]


def test_act_cpu_reads_the_rulebook():
    """The numba ACT kernels hold none of ACT's numbers as a literal (they read rules' names)."""
    from invtract.tracking import act_cpu

    checked = 0
    for name, fn in _module_functions(act_cpu):
        _check_function(act_cpu, fn, f"act_cpu.{name}", FORBIDDEN_ACT)
        checked += 1
    assert checked > 0


# --------------------------------------------------------------------------------------------
# structure: no import cycles, the torch engine without numba
# --------------------------------------------------------------------------------------------


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path, known: set) -> set:
    """invtract modules imported anywhere in ``path`` (function bodies included)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            for a in node.names:
                full = f"{mod}.{a.name}"
                out.add(full if full in known else mod)
    return {m for m in out if m in known and m != name}


def test_no_import_cycles_in_tracking_and_fod():
    files = sorted((PACKAGE / "tracking").rglob("*.py")) + sorted((PACKAGE / "fod").glob("*.py"))
    known = {_module_name(f) for f in files}
    graph = {_module_name(f): _imports(f, known) for f in files}
    # the package __init__ files only hold docstrings (a package import runs them first)
    assert not graph["invtract.tracking"] and not graph["invtract.fod"]
    state: dict[str, int] = {}

    def visit(m, stack):
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                raise AssertionError(" -> ".join(stack + [m, n]))
            if n not in state:
                visit(n, stack + [m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])
    assert "invtract.tracking.tracker" not in graph["invtract.tracking.fused_triton"]
    assert "invtract.tracking.fused_triton" not in graph["invtract.tracking.tracker"]


_NO_NUMBA = r"""
import importlib.abc, json, sys

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "numba" or name.startswith("numba."):
            raise ImportError("numba blocked for this test")
        return None

sys.meta_path.insert(0, Block())
import numpy as np
from invtract.fod.field import FODField
from invtract.params import TrackingParameters
from invtract.tracking.api import Seeding, track
from invtract.tracking.engines import default_engine, numba_available

sh = np.zeros((8, 5, 5, 15), np.float32)
sh[..., 0], sh[..., 3] = 0.8, 1.0   # a lobe along z (l = 2, m = 0)
mask = np.zeros((8, 5, 5), bool)
mask[2:6, 1:4, 1:4] = True
affine = np.eye(4)
field = FODField.from_array(sh, affine)
res = track(field, Seeding("grid", mask=mask, affine=affine, count=2),
            TrackingParameters(step_mm=0.5, min_length_mm=1.0),
            engine="auto", rng_seed=3)
print(json.dumps({"numba_loaded": "numba" in sys.modules, "available": numba_available(),
                  "engine": res.engine, "auto": default_engine("cpu"),
                  "n": len(res.streamlines), "seeds": res.summary["seeds"],
                  "generated": res.summary["generated"]}))
"""


def test_torch_engine_runs_without_numba():
    """In a process where ``import numba`` fails, ``track`` (auto engine, random directions,
    grid seeding: the seed test decides which seeds draw a direction) runs on torch."""
    env = {**os.environ, "PYTHONPATH": str(PACKAGE.parent)}
    run = subprocess.run([sys.executable, "-c", _NO_NUMBA], capture_output=True, text=True,
                         env=env, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["numba_loaded"] is False and out["available"] is False
    assert out["engine"] == "torch" and out["auto"] == "torch"
    assert out["seeds"] == 4 * 3 * 3 * 8 and out["n"] > 0
