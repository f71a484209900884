"""Per-pair view of a ``benchmarks/fod_fit.py`` case's held-out MDF: where streamlines stop; JSON.

For the start FOD (the subsample's CSD) and the ``fod+signal`` fit's ``fitted_fod.nii.gz``, the
held-out seeds of the fit (``heldout_fraction`` 0.2, seed 0, as ``invtract fit``) are tracked
hard with the default parameters and compared pair by pair with their targets: the paired MDF
(20 points, as ``result.json``'s ``*_heldout_mdf_mm``) and, per half, the tracked length minus
the target's (mm; + runs past the target, - stops short).

``--oracle`` adds the FOD a perfect fit of the learned voxels would give: the start with every
voxel the fit changed set to the full-data FOD (the targets' truth).

Per FOD, ``teacher_forced`` replays each target step alone: the peak ascent (spec 3.3) from the
target's previous direction at the step's start, as tckgen's next step would be on that FOD.
A step *leaves the path* when the peak is more than 10 degrees from the target's step or below
the cutoff; steps are split by how much the target turns there (< 2 degrees, >= 2 degrees).

    python benchmarks/fod_fit_pairs.py --work runs/fod_fit --case B20 [--train] [--worst 10]
        [--oracle] [--fod NAME=PATH ...]

Needs a finished ``fod_fit.py --methods fod+signal --cases CASE --work WORK`` run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from invtract.fit.bundle import split_indices  # noqa: E402
from invtract.fit.objective import PairedTarget  # noqa: E402
from invtract.fit.optimise import c_order_fod, fod_field  # noqa: E402
from invtract.fit.path_terms import replayed_peaks, target_turns  # noqa: E402
from invtract.fit.scoring import ScoreConfig, score_tracking  # noqa: E402
from invtract.io.image import load_fod  # noqa: E402
from invtract.io.seeds import seeds_from_reference  # noqa: E402
from invtract.io.tractogram import load_tractogram  # noqa: E402
from invtract.params import DEFAULTS, TrackingParameters  # noqa: E402
from invtract.tracking.api import Seeding, track  # noqa: E402


def half_lengths(points: np.ndarray, seed_index: int) -> np.ndarray:
    """``[2]`` arc lengths (mm) before and after the seed vertex of a streamline."""
    seg = np.linalg.norm(np.diff(points, axis=0), axis=1)
    return np.array([seg[:seed_index].sum(), seg[seed_index:].sum()])


def per_pair(field, target, pos, dirs) -> dict:
    """Per-pair MDF and half-length differences of hard tracking on the FOD ``field``."""
    res = track(field, Seeding("list", positions=pos, directions=dirs), TrackingParameters())
    cfg = ScoreConfig()
    mdf = np.full(len(target), np.nan)
    diff = np.full((len(target), 2), np.nan)
    for j, sid in enumerate(res.seed_ids):
        sid = int(sid)
        one = score_tracking(
            res.streamlines.select([j]), np.array([0]), target.select([sid]), pos[[sid]], cfg
        )
        mdf[sid] = one.loss
        t = target[sid].numpy()
        t_seed = int(np.linalg.norm(t - pos[sid], axis=1).argmin())
        diff[sid] = half_lengths(res.streamlines[j].numpy(), int(res.seed_index[j])) - (
            half_lengths(t, t_seed)
        )
    return {"mdf": mdf, "diff": diff, "missing": int(len(target) - len(res.seed_ids))}


#: a replayed step leaves the path beyond this angle (degrees) to the target's step
LEAVE_DEG = 10.0
#: target steps that turn by at least this much (degrees) are counted apart
TURN_DEG = 2.0


def _field(fod_path: Path):
    img = load_fod(fod_path)
    return fod_field(dataclasses.replace(img, data=c_order_fod(img.data)))


def teacher_forced(field, paired: PairedTarget) -> dict:
    """Each step of the ``paired`` targets' halves replayed alone on the FOD ``field`` (module
    docstring): fractions of steps that leave the path, over all steps and by the target's turn
    there."""
    p, u0, u1, _ = target_turns(paired.halves, paired.counts)  # steps j >= 1 of every half
    amp, peak = replayed_peaks(field, p, u0)  # as the replay term does
    off = torch.rad2deg(torch.arccos((peak.double() * u1).sum(-1).clamp(-1, 1)))
    leaves = (~(off <= LEAVE_DEG) | ~(amp >= DEFAULTS["cutoff"])).numpy()  # tckgen's cutoff
    turning = (torch.rad2deg(torch.arccos((u0 * u1).sum(-1).clamp(-1, 1))) >= TURN_DEG).numpy()
    return {
        "steps": int(leaves.size),
        "leaves_path": float(leaves.mean()),
        "turning_steps": int(turning.sum()),
        "leaves_path_turning": float(leaves[turning].mean()) if turning.any() else None,
        "leaves_path_straight": float(leaves[~turning].mean()) if (~turning).any() else None,
    }


def oracle_fod(work: Path, case: str, start: Path, final: Path) -> Path:
    """The start FOD with the voxels the fit changed set to the full-data FOD (written to
    ``work/oracle_CASE.nii.gz``)."""
    img = nib.load(start)
    s = img.get_fdata(dtype=np.float32)
    changed = (nib.load(final).get_fdata(dtype=np.float32) != s).any(-1)
    full = nib.load(ROOT.parent / "shared" / "data" / "real_msmt15" / "fod.nii.gz")
    s[changed] = full.get_fdata(dtype=np.float32)[changed]
    out = work / f"oracle_{case}.nii.gz"
    nib.save(nib.Nifti1Image(s, img.affine, img.header), out)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", required=True, help="fod_fit.py's --work folder")
    p.add_argument("--case", required=True, help="e.g. B20 (real_msmt15 cases only)")
    p.add_argument("--train", action="store_true", help="the training seeds instead")
    p.add_argument("--worst", type=int, default=10, help="pairs listed (largest MDF)")
    p.add_argument(
        "--fod", action="append", default=[], metavar="NAME=PATH", help="another FOD to compare"
    )
    p.add_argument(
        "--oracle", action="store_true", help="add the start with the learned voxels' truth"
    )
    args = p.parse_args()
    work, region, n = Path(args.work), args.case.rstrip("0123456789"), args.case[1:]
    tck, seeds = work / f"target_{region}.tck", work / f"target_{region}_seeds.txt"
    if region == "A":  # fod_fit.py's region A is the shared bundleA
        shared = ROOT.parent / "shared" / "data" / "real_msmt15"
        tck, seeds = shared / "bundleA_default.tck", shared / "bundleA_default_seeds.txt"
    target = load_tractogram(tck)
    pos, dirs, ti = seeds_from_reference(tck, seeds)
    target = target.select(torch.as_tensor(ti))
    train, held = split_indices(len(target), 0.2, 0)
    idx = train if args.train else held
    sub, pos, dirs = target.select(torch.as_tensor(idx)), pos[idx], dirs[idx]
    fods = {
        "start": work / f"real_fod{n}.nii.gz",
        "final": work / f"run_{args.case}_fod+signal" / "fitted_fod.nii.gz",
    }
    if args.oracle:
        fods["oracle"] = oracle_fod(work, args.case, fods["start"], fods["final"])
    fods.update(dict(kv.split("=", 1) for kv in args.fod))
    out: dict = {"case": args.case, "split": "train" if args.train else "heldout"}
    paired = PairedTarget.build(sub, torch.as_tensor(pos), torch.as_tensor(dirs))
    rows = {}
    for name, path in fods.items():
        field = _field(Path(path))  # loaded once for both views
        r = rows[name] = per_pair(field, sub, pos, dirs)
        d = np.abs(r["diff"])
        out[name] = {
            "mean_mdf_mm": float(np.nanmean(r["mdf"])),
            "median_mdf_mm": float(np.nanmedian(r["mdf"])),
            "mean_length_difference_mm": float(np.nanmean(r["diff"])),
            "median_abs_length_difference_mm": float(np.nanmedian(d)),
            "halves_off_by_more_than_2mm": float(np.nanmean(d > 2)),
            "missing": r["missing"],
            "teacher_forced": teacher_forced(field, paired),
        }
    worst = np.argsort(-np.nan_to_num(sum(r["mdf"] for r in rows.values())))
    out["worst_pairs"] = [
        {
            "pair": int(idx[k]),
            "mdf_mm": [round(float(rows[s]["mdf"][k]), 3) for s in fods],
            "length_difference_mm": {s: np.round(rows[s]["diff"][k], 2).tolist() for s in fods},
        }
        for k in worst[: args.worst]
    ]
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
