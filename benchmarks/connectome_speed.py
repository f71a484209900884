"""``invtract connectome`` vs MRtrix3 ``tck2connectome``: whole-process wall time, same run.

Runs both commands ``--repeats`` times, interleaved, on the same inputs (default: the shared
``real_msmt15/whole.tck``, 7132 streamlines, with the committed block parcellation), and checks
that the two output files are byte-identical. Our command is started as a fresh interpreter
(``python -m invtract.cli``, the console script without its shell shim), so interpreter start,
imports, reading, assignment and writing are all counted. It also times our phases in one
process (imports excluded) to show where the time goes, and the start-up floor (a fresh
interpreter importing numpy and nibabel, which our command cannot avoid).

With ``--large N`` (default 100000; 0 skips it) the same is repeated on a tractogram of N
streamlines built from the input one (its streamlines repeated, each shifted by a random
offset of about 1 mm, seed 15), where start-up no longer dominates.

Prints JSON: per case, median / min seconds of each, the ratio (ours / tck2connectome), the
phases, and ``identical``. Timings on a shared machine are noisy; compare the numbers of one run.

    python benchmarks/connectome_speed.py [--repeats 7] [--large 100000]
        [--tracks T.tck --parcellation P] [-- extra tck2connectome options, e.g.
        -- -scale_length -stat_edge mean]
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

    from invtract.commands.connectome import Connectome
    from invtract.evaluation import connectome as ev
    from invtract.evaluation.tracks import load_packed
    from invtract.io.image import load_image

    parser = argparse.ArgumentParser()
    Connectome.add_arguments(parser)
    args = parser.parse_args([str(tracks), str(parc), "out.csv", *_ours(opts)])
    mode = ev.PAIR_ASSIGNMENTS[0]
    times = {}
    t = time.perf_counter()
    labels = ev.as_label_volume(load_image(parc))
    tracks_ = load_packed(tracks)
    times["read_s"] = time.perf_counter() - t
    t = time.perf_counter()
    from invtract.commands.connectome import _assignment

    mode, distance = _assignment(args)
    nodes = ev.assign_nodes(tracks_, labels, distance, assignment=mode)
    times["assign_s"] = time.perf_counter() - t
    t = time.perf_counter()
    scale = "length" if args.scale_length else "invlength" if args.scale_invlength else "none"
    factors = ev.edge_factors(tracks_, nodes, scale=scale)
    ones = np.ones(len(tracks_), np.float32)
    full = ev.accumulate_connectome(nodes, factors, ones, labels.n_nodes, args.stat_edge)
    ev.format_connectome(ev.layout_matrix(full, False, False, False))
    times["matrix_and_format_s"] = time.perf_counter() - t
    times["total_s"] = sum(times.values())
    return times


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


def _case(tracks: Path, parc: Path, extra: list[str], repeats: int, work: Path) -> dict:
    """Time both commands on one tractogram; the JSON record of the case."""
    ref, out = work / "ref.csv", work / "out.csv"
    mrtrix = ["tck2connectome", str(tracks), str(parc), str(ref), "-quiet", "-force", *extra]
    ours = [sys.executable, "-m", "invtract.cli", "-q", "connectome", str(tracks), str(parc),
            str(out), "--force", *_ours(extra)]  # fmt: skip
    _wall(mrtrix), _wall(ours)  # warm the page cache and pyc caches
    t_mrtrix, t_ours = [], []
    for _ in range(max(1, repeats)):
        t_mrtrix.append(_wall(mrtrix))
        t_ours.append(_wall(ours))
    return {
        "tracks": str(tracks),
        "options": extra,
        "repeats": len(t_ours),
        "tck2connectome_median_s": statistics.median(t_mrtrix),
        "tck2connectome_min_s": min(t_mrtrix),
        "invtract_median_s": statistics.median(t_ours),
        "invtract_min_s": min(t_ours),
        "ratio_median": statistics.median(t_ours) / statistics.median(t_mrtrix),
        "identical": ref.read_bytes() == out.read_bytes(),
        "invtract_phases_in_process": _phases(tracks, parc, extra),
    }


def _startup_floor(repeats: int) -> float:
    """Median seconds of a fresh interpreter importing numpy and nibabel."""
    cmd = [sys.executable, "-c", "import numpy, nibabel"]
    return statistics.median(_wall(cmd) for _ in range(max(1, repeats)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--large", type=int, default=100_000, help="streamlines (0: skip)")
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
    res = {"parcellation": str(args.parcellation)}
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        res["whole"] = _case(args.tracks, args.parcellation, args.extra, args.repeats, work)
        if args.large > 0:
            print(f"writing {args.large} streamlines ...", file=sys.stderr)
            big = work / "large.tck"
            _make_large(args.tracks, args.large, big)
            reps = max(1, args.repeats // 2)
            res["large"] = _case(big, args.parcellation, args.extra, reps, work)
            res["large"]["streamlines"] = args.large
    res["python_numpy_nibabel_start_s"] = _startup_floor(args.repeats)
    print(json.dumps(res, indent=2))
    ok = res["whole"]["identical"] and res.get("large", {"identical": True})["identical"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
