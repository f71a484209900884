"""Build the conformance phantom and its tckgen references (for `test_conformance.py`).

Run from the repository root (needs MRtrix3 3.0.3's ``tckgen`` on the PATH)::

    python tests/data/conformance/make_fixtures.py

It writes ``fod.mif`` (the phantom below) and, for every case of :data:`CASES` and every seed of
:data:`SEEDS_VOX`, runs one ``tckgen -algorithm SD_Stream`` from exactly that seed
(``-seed_sphere x,y,z,0``: a sphere of radius 0 is its centre, bit for bit; ``-select 1
-seeds 1``) and stores, per case, ``<case>.npz``: ``points [P, 3]`` float32 (the streamlines
in seed order), ``lengths [S]`` (0 where tckgen wrote none), ``seed_index [S]`` (from
``-output_seeds``; -1 where none) and tckgen's ``returncode [S]``. ``commands.txt`` lists every
tckgen command run (from this folder).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
sys.path.insert(0, str(ROOT))

#: the phantom's grid: 1 mm voxels, voxel (i, j, k) at scanner (i, j, k) + OFFSET mm
SHAPE = (14, 10, 5)
LMAX = 6
OFFSET = (-7.0, -5.0, -2.0)
#: voxel whose coefficients are all NaN (no data within one voxel of it)
NAN_VOXEL = (6, 8, 2)
#: voxels with all-zero coefficients (the implicit mask ends tracking there)
ZERO_X = 13
#: low-amplitude columns (peak below the default cutoff 0.1)
WEAK_X = 11

#: seeds in voxel coordinates (scanner = voxel + OFFSET): centres, voxel faces and edges, the
#: field-of-view edges (-0.5 and n - 0.5 are outside, both bounds exclusive), next to the NaN
#: voxel, in the weak region, on the zero-voxel boundary, in a corner of the field of view
SEEDS_VOX = [
    (3.0, 5.0, 2.0),
    (3.5, 5.0, 2.0),
    (3.0, 4.5, 2.5),
    (2.5, 3.5, 1.5),
    (-0.4999, 5.0, 2.0),
    (-0.5, 5.0, 2.0),
    (1.0, -0.5, 2.0),
    (1.0, 9.4999, 2.0),
    (4.0, 5.0, 4.5),
    (6.0, 7.5, 2.0),
    (6.0, 6.0, 2.0),
    (4.0, 8.0, 2.0),
    (11.0, 5.0, 2.0),
    (12.5, 5.0, 2.0),
    (8.0, 2.0, 1.0),
    (-0.45, -0.45, 2.0),
]

#: tckgen options of each case (``-step 0.5`` unless given); ROI spheres in voxel coordinates
#: are written as scanner ``x,y,z,r``
CASES = {
    "default": dict(),
    "minlength0": dict(minlength=0.0, mask=[(3.0, 5.0, 2.0, 0.3), (8.0, 2.0, 1.0, 2.2)]),
    "regions": dict(
        include=[(5.0, 5.5, 2.0, 1.5)], exclude=[(3.0, 4.0, 2.0, 0.8)], mask=[(4, 5, 2, 5.5)]
    ),
    "stop": dict(include=[(5.0, 5.5, 2.0, 1.2)], stop=True),
    "ordered": dict(
        include_ordered=[(4.5, 4.7, 2.3, 0.6), (8.3, 4.3, 3.1, 0.6)], unidirectional=True
    ),
    "ordered_reversed": dict(
        include_ordered=[(8.3, 4.3, 3.1, 0.6), (4.5, 4.7, 2.3, 0.6)], unidirectional=True
    ),
    "rk4": dict(rk4=True),
    "rk4_minlength0": dict(rk4=True, minlength=0.0),
    "downsample": dict(downsample=3, maxlength=4.0, minlength=1.0),
    "unidirectional": dict(unidirectional=True),
    "maxlength": dict(maxlength=3.0),
    "angle": dict(angle=3.0, direction=(1.0, 0.3, 0.1)),
}

BASE = dict(step=0.5, minlength=2.0, maxlength=30.0, direction=(1.0, 0.0, 0.0))


def phantom() -> tuple[np.ndarray, np.ndarray]:
    """``(sh [14, 10, 5, 28] float32, affine [4, 4])``: one fibre per voxel whose direction
    turns with x and y (so streamlines curve and leave through the y faces), weak at
    ``WEAK_X``, zero at ``ZERO_X``, NaN at ``NAN_VOXEL``."""
    import torch

    from invtract.fod.sh import sh_basis

    i, j, k = np.meshgrid(*[np.arange(s, dtype=np.float64) for s in SHAPE], indexing="ij")
    a = 0.12 * (j - 5.0) + 0.05 * (i - 7.0)
    d = np.stack([np.cos(a), np.sin(a), 0.15 + 0.02 * k], -1)
    d /= np.linalg.norm(d, axis=-1, keepdims=True)
    Y = sh_basis(torch.as_tensor(d.reshape(-1, 3)), LMAX).numpy().reshape(*SHAPE, -1)
    iso = np.zeros(Y.shape[-1])
    iso[0] = 0.3
    scale = np.where(i == WEAK_X, 0.02, 0.45)[..., None]
    sh = scale * (Y + iso)
    sh[ZERO_X] = 0.0
    sh[NAN_VOXEL] = np.nan
    affine = np.eye(4)
    affine[:3, 3] = OFFSET
    return sh.astype(np.float32), affine


def options(case: str) -> dict:
    """The case's options over :data:`BASE`."""
    return {**BASE, **CASES[case]}


def _sphere(s) -> str:
    return ",".join(f"{v:.9g}" for v in (s[0] + OFFSET[0], s[1] + OFFSET[1], s[2] + OFFSET[2]))


def scanner_seed(v) -> np.ndarray:
    """The float32 scanner position tckgen parses from the seed's ``-seed_sphere`` text."""
    return np.array([float(x) for x in _sphere(v).split(",")], np.float32)


def sphere_mm(s) -> tuple[tuple[float, float, float], float]:
    """``(centre, radius)`` in scanner mm of an ROI sphere given in voxel coordinates."""
    c = _sphere(s).split(",")
    return (float(c[0]), float(c[1]), float(c[2])), float(s[3])


def command(case: str, seed, out: str, seeds_out: str) -> list[str]:
    o = options(case)
    cmd = ["tckgen", "fod.mif", out, "-algorithm", "SD_Stream", "-nthreads", "0", "-quiet"]
    cmd += ["-seed_sphere", _sphere(seed) + ",0", "-select", "1", "-seeds", "1", "-force"]
    cmd += ["-seed_direction", ",".join(f"{v:.9g}" for v in o["direction"])]
    cmd += ["-step", f"{o['step']:.9g}", "-minlength", f"{o['minlength']:.9g}"]
    cmd += ["-maxlength", f"{o['maxlength']:.9g}", "-output_seeds", seeds_out]
    if "angle" in o:
        cmd += ["-angle", f"{o['angle']:.9g}"]
    for key in ("include", "exclude", "mask", "include_ordered"):
        for s in o.get(key, ()):
            cmd += [f"-{key}", _sphere(s) + f",{s[3]:.9g}"]
    for flag, name in (
        ("rk4", "-rk4"),
        ("stop", "-stop"),
        ("unidirectional", "-seed_unidirectional"),
    ):
        if o.get(flag):
            cmd.append(name)
    if o.get("downsample", 1) > 1:
        cmd += ["-downsample", str(o["downsample"])]
    return cmd


def _read_tckgen(out: str, seeds_out: str) -> tuple[np.ndarray, int]:
    """The one streamline tckgen wrote (``[n, 3]`` float32, empty when none) and its seed
    vertex index (``-output_seeds``: ``Track_index,Seed_index,...`` after 2 comment lines)."""
    import nibabel as nib

    if not os.path.exists(out):
        return np.zeros((0, 3), np.float32), -1
    lines = list(nib.streamlines.load(out).streamlines)
    if not lines:
        return np.zeros((0, 3), np.float32), -1
    rows = [r for r in Path(seeds_out).read_text().splitlines() if r and not r.startswith("#")]
    return np.asarray(lines[0], np.float32), int(rows[-1].split(",")[1])


def main() -> None:
    from invtract.io.mif import write_mif

    sh, affine = phantom()
    write_mif(HERE / "fod.mif", sh, affine)
    log = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in CASES:
            points, lengths, seed_index, rcs = [], [], [], []
            for n, seed in enumerate(SEEDS_VOX):
                out, so = os.path.join(tmp, f"{n}.tck"), os.path.join(tmp, f"{n}.txt")
                for f in (out, so):
                    if os.path.exists(f):
                        os.remove(f)
                cmd = command(case, seed, out, so)
                log.append(" ".join(cmd).replace(out, "OUT.tck").replace(so, "SEEDS.txt"))
                rcs.append(subprocess.run(cmd, cwd=HERE, capture_output=True).returncode)
                pts, s = _read_tckgen(out, so)
                points.append(pts)
                lengths.append(len(pts))
                seed_index.append(s)
            np.savez_compressed(
                HERE / f"{case}.npz",
                points=np.concatenate(points, 0),
                lengths=np.asarray(lengths, np.int64),
                seed_index=np.asarray(seed_index, np.int64),
                returncode=np.asarray(rcs, np.int64),
            )
            print(case, lengths, rcs)
    (HERE / "commands.txt").write_text("\n".join(log) + "\n")


if __name__ == "__main__":
    main()
