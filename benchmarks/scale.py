"""Whole-brain scale: ``invtract track`` against ``tckgen -nthreads 2`` on an HCP-sized FOD.

Builds a synthetic whole-brain FOD analytically (no input data): a brain-shaped ellipsoid on a
1.25 mm grid (``--size full``: 200 x 233 x 215 voxels, lmax 8 = 45 coefficients, 1.80 GB
float32), filled with three families of smooth curved fibre populations that cross -- left-right
arcs (commissural), anterior-posterior bundles (association), inferior-superior fans
(projection) -- each voxel's FOD the sum of band-limited SH lobes along the local directions,
plus a small isotropic part. It is written as ``fod.mif`` (MRtrix's own layout for FODs:
coefficients contiguous per voxel, ``+1,+2,+3,+0``) and ``fod.nii`` (NIfTI, x fastest), with a
seed mask of voxels on a lattice inside the fibre populations. Generation is vectorised over
z-slabs (bounded memory).

Then, on the same FOD and seed grid (``-seed_grid_per_voxel seeds.mif 1``), it times
``tckgen -nthreads 2`` and ``invtract track`` (``NUMBA_NUM_THREADS=2``, warm numba cache) as
whole processes, reads each process's peak RSS (``wait4``), counts the vertices each wrote,
and times loading the FOD (``invtract.io.image.load_fod``, fresh process) from ``.mif``, from
NIfTI and from gzip'd NIfTI (``fod.nii.gz``, level 1). Prints one JSON object. Everything
is written to a temporary folder that is removed at the end (``--keep`` keeps it).

Usage: ``python benchmarks/scale.py [--size full|half|small] [--seeds 75000] [--keep]``
(``full`` needs ~4 GB of free disk and memory for the FOD twice over in the page cache).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SIZES = {"full": (200, 233, 215), "half": (100, 116, 108), "small": (60, 70, 64)}
VOX = 1.25
LMAX = 8
RNG_SEED = 20240601
SLAB = 8  # z-slices generated at a time


# --------------------------------------------------------------------------------------------
# the phantom


def _lobe_gains(lmax: int) -> np.ndarray:
    """Per-degree gain r_l of a band-limited fibre lobe (a heat-kernel smoothed delta)."""
    return np.array([math.exp(-0.02 * l * (l + 1)) for l in range(0, lmax + 1, 2)])


def _bump(d):
    """Smooth band profile: 1 at d = 0, 0 for |d| >= 1 (raised cosine)."""
    return 0.5 * (1.0 + np.cos(np.pi * np.clip(d, -1.0, 1.0)))


def _populations(u: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """The fibre populations at normalised positions ``u`` ``[N, 3]`` (the ellipsoid is the
    unit ball): a list of ``(weight [N], unit direction [N, 3])``."""
    x, y, z = u[:, 0], u[:, 1], u[:, 2]
    out = []
    # commissural arcs: circles in the x-z plane around (0, ., -0.35), radius 0.45-0.8
    zc = z + 0.35
    rho = np.sqrt(x * x + zc * zc) + 1e-9
    w = _bump((rho - 0.62) / 0.2) * _bump(y / 0.75)
    out.append((w, np.stack([-zc / rho, 0.05 * np.sin(np.pi * y), x / rho], 1)))
    # association: anterior-posterior, gently undulating, in two lateral slabs
    w = _bump((np.abs(x) - 0.55) / 0.22) * _bump(z / 0.55)
    d = np.stack([0.25 * np.sin(np.pi * y), np.ones_like(y), 0.3 * np.cos(1.5 * np.pi * y)], 1)
    out.append((w, d))
    # projection: inferior-superior fans, spreading laterally with height
    w = _bump((np.abs(x) - 0.3) / 0.22) * _bump(y / 0.45) * _bump((z - 0.0) / 0.9)
    out.append((w, np.stack([0.45 * x * (z + 1.0), 0.1 * np.ones_like(y), np.ones_like(z)], 1)))
    for _, d in out:
        d /= np.linalg.norm(d, axis=1, keepdims=True)
    return out


def _slab_fod(z0: int, z1: int, shape, affine, semi, sh_basis) -> tuple[np.ndarray, np.ndarray]:
    """``[X, Y, z1 - z0, K]`` float32 FOD and ``[X, Y, z1 - z0]`` float32 fibre weight."""
    import torch

    X, Y, _ = shape
    K = (LMAX + 1) * (LMAX + 2) // 2
    ii, jj, kk = np.meshgrid(np.arange(X), np.arange(Y), np.arange(z0, z1), indexing="ij")
    vox = np.stack([ii, jj, kk], -1).reshape(-1, 3).astype(np.float64)
    u = (vox @ affine[:3, :3].T + affine[:3, 3]) / semi
    inside = (u * u).sum(1) < 1.0
    fod = np.zeros((vox.shape[0], K), np.float32)
    fibre = np.zeros(vox.shape[0], np.float32)
    ui = u[inside]
    if ui.shape[0]:
        taper = _bump(np.maximum(np.sqrt((ui * ui).sum(1)) - 0.85, 0.0) / 0.15)
        gains = np.concatenate([np.full(4 * j + 1, g) for j, g in enumerate(_lobe_gains(LMAX))])
        acc = np.zeros((ui.shape[0], K), np.float64)
        acc[:, 0] = 0.06  # isotropic part: amplitude 0.017, below the 0.1 cutoff
        wsum = np.zeros(ui.shape[0])
        for w, d in _populations(ui):
            w = w * taper
            keep = w > 1e-3
            if keep.any():
                Ylm = sh_basis(torch.from_numpy(d[keep]), LMAX).numpy()
                acc[keep] += (0.5 * w[keep])[:, None] * gains[None, :] * Ylm
            wsum += w
        fod[inside] = acc
        fibre[inside] = wsum
    return fod.reshape(X, Y, z1 - z0, K), fibre.reshape(X, Y, z1 - z0)


def _mif_header(shape4, affine, datatype: str, layout: str, extra=()) -> bytes:
    """A ``.mif`` header whose data follow at an offset it names (a multiple of 16); ``extra``:
    more ``key: value`` lines."""
    rot = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    vox = np.linalg.norm(affine[:3, :3], axis=0)
    lines = ["mrtrix image", "dim: " + ",".join(str(int(s)) for s in shape4)]
    lines.append("vox: " + ",".join(f"{v:.10g}" for v in vox) + ",1" * (len(shape4) - 3))
    lines += [f"layout: {layout}", f"datatype: {datatype}"]
    for r in range(3):
        row = list(rot[r]) + [affine[r, 3]]
        lines.append("transform: " + ",".join(f"{v:.17g}" for v in row))
    text = "\n".join(lines + list(extra)) + "\n"
    offset = len(text) + len("file: . 00000\nEND\n")
    offset += (-offset) % 16
    return (text + f"file: . {offset}\nEND\n").encode().ljust(offset, b"\0")


def phantom_affine(shape) -> np.ndarray:
    """``[4, 4]`` voxel -> scanner mm of the phantom: ``VOX`` mm voxels, centred on 0."""
    affine = np.diag([VOX, VOX, VOX, 1.0])
    affine[:3, 3] = -VOX * (np.array(shape[:3]) - 1) / 2.0
    return affine


def build_phantom(shape, work: str) -> dict:
    """Write ``fod.mif``, ``fod.nii`` and ``seeds.mif`` (lattice seed mask) under ``work``."""
    import nibabel as nib

    from invtract.fod.sh import sh_basis

    t0 = time.perf_counter()
    X, Y, Z = shape
    K = (LMAX + 1) * (LMAX + 2) // 2
    affine = phantom_affine(shape)
    semi = np.array([0.37 * X, 0.41 * Y, 0.38 * Z]) * VOX  # brain-shaped ellipsoid (mm)
    mif_path, nii_path = os.path.join(work, "fod.mif"), os.path.join(work, "fod.nii")
    hdr = nib.Nifti1Header()
    hdr.set_data_dtype(np.float32)
    hdr.set_data_shape((X, Y, Z, K))
    hdr.set_zooms((VOX, VOX, VOX, 1.0))
    hdr.set_sform(affine, code=1)
    hdr.set_qform(affine, code=1)
    hdr.set_data_offset(352)
    with open(nii_path, "wb") as f:
        hdr.write_to(f)
        f.write(b"\0" * (352 - f.tell()))
    nii = np.memmap(nii_path, np.float32, "r+", offset=352, shape=(X, Y, Z, K), order="F")
    fibre = np.zeros((X, Y, Z), np.float32)
    with open(mif_path, "wb") as f:
        f.write(_mif_header((X, Y, Z, K), affine, "Float32LE", "+1,+2,+3,+0"))
        for z0 in range(0, Z, SLAB):
            z1 = min(Z, z0 + SLAB)
            fod, fibre[:, :, z0:z1] = _slab_fod(z0, z1, shape, affine, semi, sh_basis)
            f.write(np.ascontiguousarray(fod.transpose(2, 1, 0, 3)).tobytes())  # [z, y, x, k]
            nii[:, :, z0:z1, :] = fod
    nii.flush()
    del nii
    return {
        "shape": [X, Y, Z, K],
        "voxel_mm": VOX,
        "fod_GB": X * Y * Z * K * 4 / 1e9,
        "fibre_voxels": int((fibre > 0.5).sum()),
        "t_generate_s": time.perf_counter() - t0,
        "_fibre": fibre,
        "_affine": affine,
    }


def gzip_copy(path: str) -> str:
    """``path + ".gz"`` (compression level 1, streamed in 16 MiB pieces); returns its name."""
    import gzip

    with open(path, "rb") as src, gzip.open(path + ".gz", "wb", compresslevel=1) as dst:
        shutil.copyfileobj(src, dst, 16 * 2**20)
    return path + ".gz"


def write_seed_mask(phantom: dict, work: str, target: int) -> int:
    """``seeds.mif``: fibre voxels on a lattice of step s (chosen to give ~``target`` seeds)."""
    from invtract.io.mif import write_mif

    fibre = phantom.pop("_fibre") > 0.5
    step = 1
    while int(fibre[:: step + 1, :: step + 1, :: step + 1].sum()) >= target:
        step += 1
    lattice = np.zeros(fibre.shape, bool)
    lattice[::step, ::step, ::step] = True
    idx = np.flatnonzero(fibre & lattice)
    if idx.size > target:  # thin out to the target, deterministically
        idx = np.sort(np.random.default_rng(RNG_SEED).choice(idx, target, replace=False))
    seeds = np.zeros(fibre.shape, np.uint8)
    seeds.flat[idx] = 1
    write_mif(os.path.join(work, "seeds.mif"), seeds, phantom.pop("_affine"))
    phantom["seed_lattice_step"] = step
    return int(seeds.sum())


# --------------------------------------------------------------------------------------------
# measuring


def run_measured(cmd: list, env: dict | None = None, cwd: str | None = None) -> dict:
    """Run ``cmd``; wall seconds and its peak RSS (MB) as ``/usr/bin/time`` reports it.

    Not ``wait4`` from this process: a forked child's peak RSS starts at its parent's (this
    benchmark has torch loaded), whatever it execs."""
    with tempfile.NamedTemporaryFile("w+", suffix=".rss") as rss:
        t0 = time.perf_counter()
        proc = subprocess.run(
            ["/usr/bin/time", "-f", "%M", "-o", rss.name, *cmd],
            env=env,
            cwd=cwd,
            capture_output=True,
            text=True,
        )
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise RuntimeError(
                f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}"
            )
        kb = float(rss.read().strip().splitlines()[-1])
    return {"wall_s": wall, "rss_peak_MB": kb / 1024.0, "stdout": proc.stdout}


def tck_counts(path: str) -> dict:
    """Streamlines and vertices of a ``.tck`` from its header and size (no points loaded)."""
    header = {}
    with open(path, "rb") as f:
        for raw in f:
            line = raw.decode("latin-1").strip()
            if line == "END":
                break
            if ":" in line:
                k, v = line.split(":", 1)
                header[k.strip()] = v.strip()
    count = int(header["count"])
    offset = int(header["file"].split()[1])
    floats = (os.path.getsize(path) - offset) // 4
    return {"streamlines": count, "vertices": floats // 3 - count - 1}


def time_load(path: str) -> dict:
    """Seconds to ``load_fod(path)`` in a fresh process (file already in the page cache), and
    to then lay it out as the tracker reads it (``prepare_fod``: coefficients contiguous per
    voxel; a mapped ``.mif`` as it is, a NIfTI copied; ``ready_s`` includes ``load_s``)."""
    code = (
        "import time, json; t0 = time.perf_counter();"
        "import numpy as np; from invtract.io.image import load_fod;"
        "from invtract.tracking.fused_cpu import prepare_fod; t1 = time.perf_counter();"
        f"im = load_fod({path!r}); t2 = time.perf_counter();"
        "fod = prepare_fod(im.data, np.linalg.inv(im.affine)[:3]); t3 = time.perf_counter();"
        "print(json.dumps({'import_s': t1 - t0, 'load_s': t2 - t1, 'ready_s': t3 - t1,"
        " 'copied_for_tracking': not np.shares_memory(fod.sh, im.data)}))"
    )
    r = run_measured([sys.executable, "-c", code], env=_env())
    return {**json.loads(r["stdout"].strip().splitlines()[-1]), "rss_peak_MB": r["rss_peak_MB"]}


def _env(**extra) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), **extra)
    return env


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="full")
    ap.add_argument(
        "--seeds",
        type=int,
        default=75000,
        help="number of grid seeds (about a third are accepted)",
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    ap.add_argument("--workdir", help="parent folder of the temporary folder")
    args = ap.parse_args(argv)
    if shutil.which("tckgen") is None:
        print(json.dumps({"error": "tckgen (MRtrix3) not found on PATH"}))
        return 1
    work = tempfile.mkdtemp(prefix="invtract_scale_", dir=args.workdir)
    try:
        result = _run(args, work)
    finally:
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result, indent=1, default=float))
    return 0


def _run(args, work: str) -> dict:
    print(f"building the {args.size} phantom in {work} ...", file=sys.stderr)
    phantom = build_phantom(SIZES[args.size], work)
    n_seeds = write_seed_mask(phantom, work, args.seeds)
    print(f"  {phantom['t_generate_s']:.1f} s, {n_seeds} seeds; loading ...", file=sys.stderr)
    load = {"mif": time_load(os.path.join(work, "fod.mif"))}
    load["nifti"] = time_load(os.path.join(work, "fod.nii"))
    load["nifti_gz"] = time_load(gzip_copy(os.path.join(work, "fod.nii")))
    # compile (or load from the cache) the kernels this input layout uses, before timing
    run_measured(
        [sys.executable, "-m", "invtract.cli", "-q", "track", "fod.mif", "warm.tck",
         "--seed-sphere", "0,0,0,40", "--select", "20", "--force"],
        _env(),
        cwd=work,
    )  # fmt: skip
    seed_opt = ["seeds.mif", "1"]
    print("tckgen ...", file=sys.stderr)
    tck = run_measured(
        ["tckgen", "fod.mif", "tckgen.tck", "-algorithm", "SD_Stream", "-seed_grid_per_voxel",
         *seed_opt, "-nthreads", str(args.threads), "-force", "-quiet"],
        dict(os.environ, MRTRIX_RNG_SEED=str(RNG_SEED)),
        cwd=work,
    )  # fmt: skip
    tck.update(tck_counts(os.path.join(work, "tckgen.tck")))
    print("invtract track ...", file=sys.stderr)
    ours = run_measured(
        [sys.executable, "-m", "invtract.cli", "-q", "track", "fod.mif", "invtract.tck",
         "--seed-grid-per-voxel", *seed_opt, "--rng-seed", str(RNG_SEED), "--force"],
        _env(NUMBA_NUM_THREADS=str(args.threads)),
        cwd=work,
    )  # fmt: skip
    ours.update(tck_counts(os.path.join(work, "invtract.tck")))
    for r in (tck, ours):
        r.pop("stdout", None)
        r["vertices_per_s"] = r["vertices"] / r["wall_s"]
    return {
        "case": f"synthetic whole-brain phantom ({args.size}), -seed_grid_per_voxel 1",
        "phantom": phantom,
        "seeds": n_seeds,
        "threads": args.threads,
        "fod_load": load,
        "tckgen": tck,
        "invtract": ours,
        "ratio_vertices_per_s_vs_tckgen": ours["vertices_per_s"] / tck["vertices_per_s"],
        "ratio_rss_peak_vs_tckgen": ours["rss_peak_MB"] / tck["rss_peak_MB"],
        "goals": {"vertices_per_s_ratio_min": 1.0, "rss_ratio_max": 1.25},
        "load_average": os.getloadavg(),
    }


if __name__ == "__main__":
    raise SystemExit(main())
