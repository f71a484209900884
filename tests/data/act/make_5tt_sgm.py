"""Make ``5tt_sgm.mif`` from the sift phantom's ``5tt.mif`` (see ``commands.txt``).

Two sub-cortical grey matter blocks replace part of the white matter: in the long bundle
(x 15-18, y 2-7, z 10-15) 70 % of each WM voxel becomes SGM, and in the lower block
(x 11-13, y 2-7, z 2-6) all of it; then every volume is blurred along x with weights
(0.25, 0.5, 0.25) (edge voxels repeated), voxels without tissue staying empty. Streamlines then
cross SGM (EXIT_SGM, truncated at the FOD minimum), end in it (TERM_IN_SGM), and seeds lie in
it. Voxel axes are MRtrix's (28 x 10 x 18).

    python make_5tt_sgm.py SHARED/data/sift_phantom/5tt.mif 5tt_sgm.mif
"""

from __future__ import annotations

import sys

import numpy as np

from invtract.io.image import Image, save_mif
from invtract.tracking.act import load_act


def main(src: str, dst: str) -> None:
    a = load_act(src)
    d = a.data.copy()
    for box, share in (((slice(15, 19), slice(2, 8), slice(10, 16)), 0.7),
                       ((slice(11, 14), slice(2, 8), slice(2, 7)), 1.0)):  # fmt: skip
        wm = d[box + (2,)].copy()
        d[box + (1,)] += share * wm
        d[box + (2,)] = (1.0 - share) * wm
    pad = np.pad(d, ((1, 1), (0, 0), (0, 0), (0, 0)), mode="edge")
    sm = 0.25 * pad[:-2] + 0.5 * pad[1:-1] + 0.25 * pad[2:]
    sm[d.sum(-1) == 0] = 0
    affine = np.linalg.inv(np.vstack([a.scanner2voxel, [0, 0, 0, 1]]))
    save_mif(dst, Image(sm.astype(np.float32), affine, a.voxel_sizes))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
