"""``invtract connectome`` vs MRtrix3 ``tck2connectome``: whole-process wall time, same run.

Runs both commands ``--repeats`` times, interleaved, on the same inputs (default: the shared
``real_msmt15/whole.tck``, 7132 streamlines, with the committed block parcellation), and checks
that the two output files are byte-identical. Our command is started as a fresh interpreter
(``python -m invtract.cli``, the console script without its shell shim), so interpreter start,
imports, reading, assignment and writing are all counted. It also times our phases in one
process (imports excluded) to show where the time goes.

Prints JSON: median / min seconds of each, the ratio (ours / tck2connectome), the phases, and
``identical``. Timings on a shared machine are noisy; compare the two numbers of one run.

    python benchmarks/connectome_speed.py [--repeats 7] [--tracks T.tck --parcellation P]
        [-- extra tck2connectome options, e.g. -- -scale_length -stat_edge mean]
"""

from __future__ import annotations

import argparse
import json
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


def _ours(opts: list[str]) -> list[str]:
    """tck2connectome options in invtract's spelling."""
    out = []
    for o in opts:
        flag = o.startswith("-") and not o[1:2].isdigit()
        out.append("--" + o[1:].replace("_", "-") if flag else o)
    return out


def _wall(cmd: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t


def _phases(tracks: Path, parc: Path, opts: list[str]) -> dict[str, float]:
    """Seconds of each phase of our command in this process (modules already imported)."""
    import numpy as np

    from invtract.evaluation import connectome as ev
    from invtract.evaluation.tracks import load_packed
    from invtract.io.image import load_image

    times = {}
    t = time.perf_counter()
    labels = ev.as_label_volume(load_image(parc))
    tracks_ = load_packed(tracks)
    times["read_s"] = time.perf_counter() - t
    t = time.perf_counter()
    radius = float(opts[opts.index("-assignment_radial_search") + 1]) if (
        "-assignment_radial_search" in opts) else 4.0  # fmt: skip
    nodes = ev.assign_endpoints(tracks_, labels, radius)
    times["assign_s"] = time.perf_counter() - t
    t = time.perf_counter()
    scale = "length" if "-scale_length" in opts else "invlength" if "-scale_invlength" in opts \
        else "none"  # fmt: skip
    factors = ev.edge_factors(tracks_, nodes, scale=scale)
    full = ev.accumulate_edges(nodes, factors, np.ones(len(tracks_), np.float32), labels.n_nodes)
    ev.format_connectome(ev.layout_matrix(full, False, False, False))
    times["matrix_and_format_s"] = time.perf_counter() - t
    return times


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--tracks", type=Path, default=TRACKS)
    ap.add_argument("--parcellation", type=Path, default=PARC)
    ap.add_argument("extra", nargs="*", help="tck2connectome options (after --)")
    args = ap.parse_args()
    if shutil.which("tck2connectome") is None:
        print(json.dumps({"error": "tck2connectome (MRtrix3) not on PATH"}))
        return 1
    if not args.tracks.is_file() or not args.parcellation.is_file():
        print(json.dumps({"error": f"missing input {args.tracks} or {args.parcellation}"}))
        return 1
    with tempfile.TemporaryDirectory() as d:
        ref, out = Path(d) / "ref.csv", Path(d) / "out.csv"
        mrtrix = ["tck2connectome", str(args.tracks), str(args.parcellation), str(ref), "-quiet",
                  "-force", *args.extra]  # fmt: skip
        ours = [sys.executable, "-m", "invtract.cli", "-q", "connectome", str(args.tracks),
                str(args.parcellation), str(out), "--force", *_ours(args.extra)]  # fmt: skip
        _wall(mrtrix), _wall(ours)  # warm the page cache and numba/pyc caches
        t_mrtrix, t_ours = [], []
        for _ in range(max(1, args.repeats)):
            t_mrtrix.append(_wall(mrtrix))
            t_ours.append(_wall(ours))
        identical = ref.read_bytes() == out.read_bytes()
    res = {
        "tracks": str(args.tracks),
        "parcellation": str(args.parcellation),
        "options": args.extra,
        "repeats": len(t_ours),
        "tck2connectome_median_s": statistics.median(t_mrtrix),
        "tck2connectome_min_s": min(t_mrtrix),
        "invtract_median_s": statistics.median(t_ours),
        "invtract_min_s": min(t_ours),
        "ratio_median": statistics.median(t_ours) / statistics.median(t_mrtrix),
        "identical": identical,
        "invtract_phases_in_process": _phases(args.tracks, args.parcellation, args.extra),
    }
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import numpy, nibabel"], check=True)
    res["python_numpy_nibabel_start_s"] = time.perf_counter() - t
    print(json.dumps(res, indent=2))
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
