"""Building the ``--dwi`` signal term from a whole-brain DWI: time and peak memory per format.

On the folder of a kept ``benchmarks/fit_scale.py --size full --fit fod --dwi --keep`` run
(``dwi.mif``, ``mask.mif``, ``response.txt``), each case in its own process: open the DWI,
read the shell at the mask, solve CSD's noise sample (``signal_from_args`` on the command's
flags, as ``invtract fit --dwi`` does), from
``dwi.mif`` and from the same DWI as ``dwi.nii.gz`` with ``--fslgrad`` (made with ``mrconvert
-export_grad_fsl`` when absent). Prints one JSON object: per case wall seconds, peak RSS (MB),
noise sigma, usable voxels and the shell's MB.

Usage: ``python benchmarks/dwi_open.py FOLDER``
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

CASE = r"""
import argparse, json, resource, sys, time
from invtract.fit.signal_term import add_signal_arguments, signal_from_args

d, name = sys.argv[1], sys.argv[2]
p = argparse.ArgumentParser()
add_signal_arguments(p)  # the command's own flags and path (signal_from_args)
flags = ["--dwi", f"{d}/{name}", "--response", f"{d}/response.txt", "--mask", f"{d}/mask.mif"]
if name.endswith(".nii.gz"):
    flags += ["--fslgrad", f"{d}/dwi.bvec", f"{d}/dwi.bval"]
t0 = time.perf_counter()
term = signal_from_args(p.parse_args(flags))
print(json.dumps({"wall_s": time.perf_counter() - t0,
                  "rss_peak_MB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "noise_sigma": term.variance ** 0.5, "usable_voxels": int(term.usable.sum()),
                  "signals_MB": term.signals.numel() * 4 / 2**20}))
"""


def main(folder: str) -> dict:
    gz = os.path.join(folder, "dwi.nii.gz")
    if not os.path.exists(gz):
        subprocess.run(["mrconvert", "-quiet", os.path.join(folder, "dwi.mif"), gz,
                        "-export_grad_fsl", os.path.join(folder, "dwi.bvec"),
                        os.path.join(folder, "dwi.bval")], check=True)  # fmt: skip
    out = {"folder": folder}
    for name in ("dwi.mif", "dwi.nii.gz"):
        run = subprocess.run([sys.executable, "-c", CASE, folder, name], check=True,
                             capture_output=True, text=True)  # fmt: skip
        out[name] = json.loads(run.stdout.strip().splitlines()[-1])
    out["load_average"] = list(os.getloadavg())
    return out


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    print(json.dumps(main(sys.argv[1]), indent=1))
