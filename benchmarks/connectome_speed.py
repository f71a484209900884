"""``invtract connectome`` vs MRtrix3 ``tck2connectome``, every assignment mode, same run.

For each assignment mode (radial search, end voxels, reverse search unlimited and limited,
forward search, all voxels) and each tractogram (default: the shared ``real_msmt15/whole.tck``,
7132 streamlines, with the committed block parcellation; then a large one), it times:

* ``tck2connectome`` as a whole process (``-quiet -force``, MRtrix's default threads), wall
  and CPU time (user + system, all threads: steadier than wall time on a loaded machine);
* ``invtract connectome`` as a whole process: a fresh interpreter, ``python -m invtract.cli``
  (the console script without its shell shim), so start-up, imports, reading, assignment and
  writing all count;
* ``invtract connectome`` in process: :func:`invtract.cli.main` with the same arguments in
  this (warm) interpreter: everything but interpreter start-up and imports;

interleaved, ``--repeats`` times each, and checks that the output files are byte-identical
(``identical``). Ratios are ours / tck2connectome's medians. It also records the start-up
floor: a fresh interpreter importing numpy (which any numpy command pays), and one importing
what ``invtract connectome`` imports.

With ``--large N`` (default 100000; 0 skips it) the tractogram is N streamlines built from the
input (its streamlines repeated, each copy shifted by a random offset of about 1 mm, seed 15),
where start-up no longer dominates.

Prints JSON. Timings on a shared machine are noisy: compare the numbers of one run.

    python benchmarks/connectome_speed.py [--repeats 5] [--large 100000] [--modes radial,...]
        [--tracks T.tck --parcellation P] [-- extra tck2connectome options for every mode,
        e.g. -- -scale_length -stat_edge mean]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRACKS = ROOT.parent / "shared" / "data" / "real_msmt15" / "whole.tck"
PARC = ROOT / "tests" / "data" / "connectome" / "real_msmt15_parc.nii.gz"

#: mode name -> tck2connectome options selecting it
MODES: dict[str, list[str]] = {
    "radial": [],
    "end_voxels": ["-assignment_end_voxels"],
    "reverse": ["-assignment_reverse_search", "0"],
    "reverse_3mm": ["-assignment_reverse_search", "3"],
    "forward_3mm": ["-assignment_forward_search", "3"],
    "all_voxels": ["-assignment_all_voxels"],
}


def _timed(cmd: list[str]) -> tuple[float, float]:
    """``(wall, cpu)`` seconds of a child process (cpu: user + system, all its threads; less
    disturbed than wall time on a loaded machine)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def _wall(cmd: list[str]) -> float:
    return _timed(cmd)[0]


def _in_process(argv: list[str]) -> float:
    """Seconds of :func:`invtract.cli.main` on ``argv`` in this interpreter."""
    from invtract.cli import main

    t = time.perf_counter()
    code = main(argv)
    elapsed = time.perf_counter() - t
    if code != 0:
        raise RuntimeError(f"invtract {' '.join(argv)} failed with exit code {code}")
    return elapsed


def _median(values: list[float]) -> float:
    return round(statistics.median(values), 4)


def _case(tracks: Path, parc: Path, opts: list[str], repeats: int, work: Path) -> dict:
    """Time the three runs of one (tractogram, options) case; its JSON record."""
    ref, out = work / "ref.csv", work / "out.csv"
    mrtrix = ["tck2connectome", str(tracks), str(parc), str(ref), "-quiet", "-force", *opts]
    argv = ["-q", "connectome", str(tracks), str(parc), str(out), "-force", *opts]
    ours = [sys.executable, "-m", "invtract.cli", *argv]
    _wall(mrtrix), _wall(ours), _in_process(argv)  # warm page cache, pyc and module caches
    t_mrtrix, t_ours, t_in, cpu_mrtrix, cpu_ours = [], [], [], [], []
    for _ in range(max(1, repeats)):
        for times, cpus, cmd in ((t_mrtrix, cpu_mrtrix, mrtrix), (t_ours, cpu_ours, ours)):
            wall, cpu = _timed(cmd)
            times.append(wall)
            cpus.append(cpu)
        t_in.append(_in_process(argv))
    identical = ref.read_bytes() == out.read_bytes()
    return {
        "options": opts,
        "repeats": len(t_ours),
        "tck2connectome_s": _median(t_mrtrix),
        "invtract_process_s": _median(t_ours),
        "tck2connectome_cpu_s": _median(cpu_mrtrix),
        "invtract_process_cpu_s": _median(cpu_ours),
        "invtract_in_process_s": _median(t_in),
        "ratio_process": round(statistics.median(t_ours) / statistics.median(t_mrtrix), 2),
        "ratio_in_process": round(statistics.median(t_in) / statistics.median(t_mrtrix), 2),
        "identical": identical,
    }


def _make_large(source: Path, n: int, out: Path) -> int:
    """Write ``n`` streamlines built from ``source`` (shifted copies) to ``out``; the count."""
    import nibabel as nib
    import numpy as np

    from invtract.evaluation.tracks import load_packed

    packed = load_packed(source)
    lines = np.split(packed.points, np.cumsum(packed.lengths)[:-1])
    rng = np.random.default_rng(15)
    pick = np.arange(n) % len(lines)
    shifts = rng.normal(0.0, 1.0, (n, 3)).astype(np.float32)
    big = [lines[i] + shifts[k] for k, i in enumerate(pick)]
    tractogram = nib.streamlines.Tractogram(big, affine_to_rasmm=np.eye(4))
    nib.streamlines.save(tractogram, str(out))
    return n


def _startup(repeats: int) -> dict[str, float]:
    """Median seconds of fresh interpreters: bare, importing numpy, importing our command's
    modules (what ``invtract connectome`` loads before reading anything)."""
    runs = {
        "python_s": [sys.executable, "-c", "pass"],
        "python_numpy_s": [sys.executable, "-c", "import numpy"],
        "python_connectome_imports_s": [
            sys.executable,
            "-c",
            "import invtract.cli, invtract.commands.connectome, invtract.evaluation.connectome,"
            " invtract.evaluation.tracks, invtract.io.image",
        ],
    }
    return {k: _median([_wall(cmd) for _ in range(max(1, repeats))]) for k, cmd in runs.items()}


def _run_cases(tracks: Path, args, work: Path, repeats: int) -> dict:
    """Every selected mode on one tractogram (progress on stderr)."""
    cases = {}
    for name in args.modes:
        print(f"  {tracks.name}: {name}", file=sys.stderr)
        cases[name] = _case(tracks, args.parcellation, MODES[name] + args.extra, repeats, work)
    return cases


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--large", type=int, default=100_000, help="streamlines (0: skip)")
    ap.add_argument(
        "--modes", default=",".join(MODES), help="comma-separated, of " + ", ".join(MODES)
    )
    ap.add_argument("--tracks", type=Path, default=TRACKS)
    ap.add_argument("--parcellation", type=Path, default=PARC)
    ap.add_argument("extra", nargs="*", help="tck2connectome options for every mode (after --)")
    args = ap.parse_args()
    args.modes = [m for m in args.modes.split(",") if m]
    unknown = [m for m in args.modes if m not in MODES]
    if unknown:
        print(json.dumps({"error": f"unknown modes {unknown}; known: {list(MODES)}"}))
        return 1
    if shutil.which("tck2connectome") is None:
        print(json.dumps({"error": "tck2connectome (MRtrix3) not on PATH"}))
        return 1
    if not args.tracks.is_file() or not args.parcellation.is_file():
        print(json.dumps({"error": f"missing input {args.tracks} or {args.parcellation}"}))
        return 1
    res: dict = {"parcellation": str(args.parcellation), "tracks": str(args.tracks)}
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        res["whole"] = _run_cases(args.tracks, args, work, args.repeats)
        if args.large > 0:
            print(f"writing {args.large} streamlines ...", file=sys.stderr)
            big = work / "large.tck"
            _make_large(args.tracks, args.large, big)
            res["large_streamlines"] = args.large
            res["large"] = _run_cases(big, args, work, max(1, args.repeats // 2))
    res["startup"] = _startup(args.repeats)
    print(json.dumps(res, indent=2))
    cases = [*res["whole"].values(), *res.get("large", {}).values()]
    return 0 if all(c["identical"] for c in cases) else 1


if __name__ == "__main__":
    sys.exit(main())
