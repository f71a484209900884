"""Make ``5tt_pv.mif`` from the sift phantom's ``5tt.mif`` (see ``commands.txt``).

A CSF block (x 13-14, y 2-7, z 2-6) and a pathology block (x 5-6, y 2-7, z 10-15) replace
tissue inside WM, then every volume is blurred along y with weights (0.25, 0.5, 0.25) (edge
voxels repeated), and voxels without tissue stay empty. Voxel axes are MRtrix's (28 x 10 x 18).

    python make_5tt_pv.py SHARED/data/sift_phantom/5tt.mif 5tt_pv.mif
"""

from __future__ import annotations

import sys

import numpy as np

from invtract.io.image import Image, save_mif
from invtract.tracking.act import load_act


def main(src: str, dst: str) -> None:
    a = load_act(src)
    d = a.data.copy()
    d[13:15, 2:8, 2:7] = 0
    d[13:15, 2:8, 2:7, 3] = 1
    d[5:7, 2:8, 10:16] = 0
    d[5:7, 2:8, 10:16, 4] = 1
    pad = np.pad(d, ((0, 0), (1, 1), (0, 0), (0, 0)), mode="edge")
    sm = 0.25 * pad[:, :-2] + 0.5 * pad[:, 1:-1] + 0.25 * pad[:, 2:]
    sm[d.sum(-1) == 0] = 0
    affine = np.linalg.inv(np.vstack([a.scanner2voxel, [0, 0, 0, 1]]))
    save_mif(dst, Image(sm.astype(np.float32), affine, a.voxel_sizes))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
