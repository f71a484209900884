"""Cold start: the first `invtract track --example` / `fit --example` of a fresh install.

Builds invtract's wheel (``pip wheel --no-deps``), installs it into a fresh virtualenv that sees
the system site-packages (torch, numba, ... are not downloaded again), checks that the venv
imports invtract from its own site-packages and not from this checkout, then runs each command
twice from an empty folder outside the checkout: ``cold`` with no numba cache at all (the
cache files of the install are deleted first, so ``fit`` does not profit from ``track``'s
kernels), ``warm`` right after it (numba loads what ``cold`` compiled and cached).

Each run is a whole process (``python -c`` calling ``invtract.cli.main``, as the console
script does) timed from the outside (``wall_s``); inside it a probe records where the time
went: ``import_s`` (``import numba`` and ``import invtract.cli``), ``compile_s`` (the numba
compilations of top-level dispatchers, summed; nested compilations are part of their
caller's), ``compiled`` (those dispatchers: wall and CPU seconds each), ``rest_s`` (what
remains: loading, seeding, tracking, fitting, writing, interpreter start-up), and the CPU time
of the compilations (``compile_cpu_s``) and of the whole process after start-up, all threads
(``cpu_s``): on a shared machine these move less than wall time does. ``numba_cache`` says where
numba wrote its cache (the installed package's ``__pycache__`` when writable, else numba's
per-user cache directory) and how many index files it holds after the runs.

Goals (issue 13): first ``track --example`` <= 10 s, first ``fit --example`` <= 40 s.
Timings on a shared machine are noisy: ``load_avg`` is printed beside them.

Usage: ``python benchmarks/cold_start.py [--commands track,fit] [--source TREE] [--keep]``;
prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GOALS_S = {"track": 10.0, "fit": 40.0}

#: run inside the venv: time the imports, record numba's compilations, run the command, and
#: write the breakdown as JSON to the path in INVTRACT_PROBE_OUT
PROBE = r"""
import json, os, sys, time
t0 = time.perf_counter()
import numba
from numba.core import event
compiled, stack = [], []
class Rec(event.Listener):
    def on_start(self, ev):
        stack.append((time.perf_counter(), time.process_time()))
    def on_end(self, ev):
        start, cpu = stack.pop()
        if not stack:
            d = ev.data["dispatcher"].py_func
            compiled.append((f"{d.__module__}.{d.__qualname__}", time.perf_counter() - start,
                             time.process_time() - cpu))
event.register("numba:compile", Rec())
import invtract, invtract.cli
t1 = time.perf_counter()
code = invtract.cli.main(sys.argv[1:])
t2 = time.perf_counter()
with open(os.environ["INVTRACT_PROBE_OUT"], "w") as f:
    json.dump({"invtract_file": invtract.__file__, "code": code, "import_s": t1 - t0,
               "main_s": t2 - t1, "compile_s": sum(c[1] for c in compiled),
               "compile_cpu_s": sum(c[2] for c in compiled), "cpu_s": time.process_time(),
               "compiled": [[n, round(s, 3), round(c, 3)] for n, s, c in compiled]}, f)
"""


def _sh(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)


def install(tmp: Path, source: Path) -> tuple[Path, Path]:
    """Wheel of ``source`` + fresh venv under ``tmp``; returns (venv python, package folder)."""
    dist = tmp / "dist"
    _sh([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", str(dist), str(source)])  # fmt: skip
    wheel = next(dist.glob("invtract-*.whl"))
    _sh([sys.executable, "-m", "venv", "--system-site-packages", str(tmp / "venv")])
    py = tmp / "venv" / "bin" / "python"
    _sh([str(py), "-m", "pip", "install", "-q", "--no-deps", str(wheel)])
    where = _sh([str(py), "-c", "import invtract; print(invtract.__file__)"], env=_env(),
                cwd=tmp).stdout.strip()  # fmt: skip
    if not where.startswith(str(tmp / "venv")):
        raise SystemExit(f"error: the venv imports invtract from {where}, not from the wheel")
    return py, Path(where).parent


def _env() -> dict:
    """The environment of a user's shell: no PYTHONPATH to the checkout, numba's default cache."""
    env = dict(os.environ)
    for k in ("PYTHONPATH", "NUMBA_CACHE_DIR", "NUMBA_DISABLE_JIT", "PYTHONDONTWRITEBYTECODE"):
        env.pop(k, None)
    return env


def _cache_files(pkg: Path, user_dir: Path) -> list[Path]:
    """numba cache files (index and data) of the installed package, wherever numba put them."""
    found = [p for p in pkg.rglob("*.nb[ic]")]
    if user_dir.is_dir():
        found += [p for p in user_dir.rglob("*.nb[ic]") if "invtract" in str(p)]
    return found


def run_once(py: Path, argv: list[str], work: Path, probe_out: Path) -> dict:
    """One whole process of ``invtract ARGV`` in ``work``: wall time and the probe's breakdown."""
    env = dict(_env(), INVTRACT_PROBE_OUT=str(probe_out))
    t0 = time.perf_counter()
    proc = subprocess.run([str(py), "-c", PROBE, *argv], cwd=work, env=env,
                          capture_output=True, text=True)  # fmt: skip
    wall = time.perf_counter() - t0
    if proc.returncode != 0 or not probe_out.exists():
        raise SystemExit(f"error: invtract {' '.join(argv)} failed:\n{proc.stderr[-3000:]}")
    probe = json.loads(probe_out.read_text())
    probe_out.unlink()
    probe["wall_s"] = wall
    probe["rest_s"] = wall - probe["import_s"] - probe["compile_s"]
    probe["load_avg"] = list(os.getloadavg())
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in probe.items()}


def _argv(command: str, work: Path, tag: str) -> list[str]:
    if command == "track":
        return ["track", "--example", str(work / f"example_{tag}.tck"), "-q"]
    return ["fit", "--example", "--run", str(work / f"runs_{tag}"), "--no-tensorboard", "-q"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--commands", default="track,fit", help="comma-separated: track, fit")
    ap.add_argument("--keep", action="store_true", help="keep the temporary venv (path printed)")
    ap.add_argument("--source", type=Path, default=REPO,
                    help="project tree to build (default: this checkout; e.g. a `git archive` "
                    "of another commit, for before/after)")  # fmt: skip
    args = ap.parse_args()
    commands = [c for c in args.commands.split(",") if c]
    if not set(commands) <= set(GOALS_S):
        raise SystemExit(f"error: --commands takes track and/or fit, got {args.commands!r}")
    tmp = Path(tempfile.mkdtemp(prefix="invtract_cold_"))
    try:
        t0 = time.perf_counter()
        py, pkg = install(tmp, args.source.resolve())
        out = {"source": str(args.source), "install_s": round(time.perf_counter() - t0, 2),
               "installed_at": str(pkg)}  # fmt: skip
        user_cache = Path(os.path.expanduser("~/.cache/numba"))
        work = tmp / "work"
        work.mkdir()
        for command in commands:
            for p in _cache_files(pkg, user_cache):
                p.unlink()
            print(f"cold_start: {command} (cold, then warm)", file=sys.stderr, flush=True)
            res = {tag: run_once(py, _argv(command, work, tag), work, tmp / "probe.json")
                   for tag in ("cold", "warm")}  # fmt: skip
            res["goal_cold_s"] = GOALS_S[command]
            res["meets_goal"] = res["cold"]["wall_s"] <= GOALS_S[command]
            out[command] = res
        files = _cache_files(pkg, user_cache)
        in_pkg = [p for p in files if pkg in p.parents]
        out["numba_cache"] = {
            "in_package_pycache": len(in_pkg),
            "elsewhere": sorted({str(p.parent) for p in files if p not in in_pkg}),
            "index_files": sum(p.suffix == ".nbi" for p in files),
        }
        import numba

        out["versions"] = {"python": sys.version.split()[0], "numba": numba.__version__}
        out["cpus"] = os.cpu_count()
        if args.keep:
            out["kept"] = str(tmp)
        print(json.dumps(out, indent=1))
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
