"""Regenerate the connectome fixtures in this folder (needs MRtrix3 ``tck2connectome``).

Run from the repository root: ``python tests/data/connectome/make_fixtures.py`` (add
``--options-only`` for the scaling / statistic / weight fixtures alone, ``--modes-only`` for
the assignment-mode and ``-vector`` fixtures alone). It rebuilds the
two parcellations with ``tests/connectome/connectome_data.py`` and runs tck2connectome for
every entry of ``TRACTS`` x ``VARIANTS``; the exact commands are printed and listed in README.md.
"""

from __future__ import annotations

import importlib.util
import shlex
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
SHARED = REPO.parent / "shared" / "data"

#: fixture prefix -> (case, tractogram file name)
TRACTS = {
    "phantom_whole": ("phantom_cross90", "whole.tck"),
    "phantom_bundleB": ("phantom_cross90", "bundleB_default.tck"),
    "real_whole": ("real_msmt15", "whole.tck"),
    "real_bundleA": ("real_msmt15", "bundleA_default.tck"),
}

#: variant -> tck2connectome options (the invtract CLI spells them with -- and dashes)
VARIANTS = {
    "r4": [],
    "r2": ["-assignment_radial_search", "2"],
    "r4_symmetric": ["-symmetric"],
    "r4_zerodiag": ["-zero_diagonal"],
    "r4_keep": ["-keep_unassigned"],
    "r2_symmetric_zerodiag_keep": [
        "-assignment_radial_search",
        "2",
        "-symmetric",
        "-zero_diagonal",
        "-keep_unassigned",
    ],
}

#: library-only variants (no invtract CLI flag), whole tractograms only
EXTRA = {
    "endvoxels": ["-assignment_end_voxels"],
    "invnodevol": ["-scale_invnodevol"],
}

#: tck2connectome's metric, statistic and weight options (issue 15): tract prefix -> variants.
#: ``{w}`` / ``{v}`` are the tract's weights / scale-value files written by write_vectors.
OPTION_TRACTS = {
    "real_whole": ("real_msmt15", "whole.tck", "tests/data/connectome/real_msmt15_parc.nii.gz"),
    "sift_gmwmi": ("sift_phantom", "act_gmwmi.tck", "../shared/data/sift_phantom/parc.mif"),
}
OPTION_VARIANTS = {
    "length": ["-scale_length"],
    "invlength_mean": ["-scale_invlength", "-stat_edge", "mean"],
    "length_max_symmetric": ["-scale_length", "-stat_edge", "max", "-symmetric"],
    "length_min_keep": ["-scale_length", "-stat_edge", "min", "-keep_unassigned"],
    "weights": ["-tck_weights_in", "{w}"],
    "weights_invnodevol_mean": [
        "-tck_weights_in", "{w}", "-scale_invnodevol", "-stat_edge", "mean",
    ],
    "scalefile_invlength_zerodiag": ["-scale_file", "{v}", "-scale_invlength", "-zero_diagonal"],
    "endvoxels_length_mean_symmetric": [
        "-assignment_end_voxels", "-scale_length", "-stat_edge", "mean", "-symmetric",
    ],
    "r2_weights_scalefile_max_keep": [
        "-assignment_radial_search", "2", "-tck_weights_in", "{w}", "-scale_file", "{v}",
        "-stat_edge", "max", "-keep_unassigned",
    ],
}  # fmt: skip


#: tck2connectome's other assignment modes and -vector (issue 15), on the OPTION_TRACTS;
#: variants named in MODE_ASSIGNMENTS also keep their -out_assignments (sift_gmwmi only)
MODE_VARIANTS = {
    "reverse0": ["-assignment_reverse_search", "0"],
    "reverse3_symmetric": ["-assignment_reverse_search", "3", "-symmetric"],
    "forward2": ["-assignment_forward_search", "2"],
    "forward6_invnodevol_keep": [
        "-assignment_forward_search", "6", "-scale_invnodevol", "-keep_unassigned",
    ],
    "allvoxels": ["-assignment_all_voxels"],
    "allvoxels_invnodevol_weights_mean": [
        "-assignment_all_voxels", "-scale_invnodevol", "-tck_weights_in", "{w}",
        "-stat_edge", "mean",
    ],
    "allvoxels_length_max_keep": [
        "-assignment_all_voxels", "-scale_length", "-stat_edge", "max", "-keep_unassigned",
    ],
    "vector": ["-vector"],
    "vector_length_max_keep": [
        "-vector", "-scale_length", "-stat_edge", "max", "-keep_unassigned",
    ],
    "vector_weights_mean": ["-vector", "-tck_weights_in", "{w}", "-stat_edge", "mean"],
    "vector_allvoxels_invnodevol": ["-vector", "-assignment_all_voxels", "-scale_invnodevol"],
    "vector_forward3": ["-vector", "-assignment_forward_search", "3"],
}  # fmt: skip
MODE_ASSIGNMENTS = ("reverse0", "forward2", "allvoxels", "vector", "vector_allvoxels_invnodevol")


def mode_jobs() -> list[list[str]]:
    """tck2connectome commands for :data:`MODE_VARIANTS` (vector files from write_vectors)."""
    jobs = []
    for prefix, (case, tck, parc) in OPTION_TRACTS.items():
        wp = f"tests/data/connectome/{prefix}_weights.txt"
        for name, opts in MODE_VARIANTS.items():
            opts = [o.format(w=wp) for o in opts]
            out = f"tests/data/connectome/{prefix}_{name}.csv"
            cmd = ["tck2connectome", f"../shared/data/{case}/{tck}", parc, out, *opts]
            if prefix == "sift_gmwmi" and name in MODE_ASSIGNMENTS:
                cmd += ["-out_assignments", f"tests/data/connectome/{prefix}_{name}_assign.txt"]
            jobs.append(cmd + ["-nthreads", "0", "-quiet", "-force"])
    return jobs


def write_vectors(prefix: str, count: int) -> tuple[str, str]:
    """Deterministic per-streamline weights (one row, some zeros) and scale values (one column).

    Returns the two paths relative to the repository root.
    """
    import numpy as np

    rng = np.random.default_rng(15)
    w = rng.uniform(0.0, 2.0, count)
    w[::7] = 0.0
    v = rng.uniform(0.1, 3.0, count)
    wp = f"tests/data/connectome/{prefix}_weights.txt"
    vp = f"tests/data/connectome/{prefix}_scale.txt"
    (REPO / wp).write_text("# weights\n" + " ".join(f"{x:.9g}" for x in w) + "\n")
    (REPO / vp).write_text("".join(f"{x:.9g}\n" for x in v))
    return wp, vp


def option_jobs() -> list[list[str]]:
    """tck2connectome commands for :data:`OPTION_VARIANTS` (writes the vector files)."""
    import nibabel as nib

    jobs = []
    for prefix, (case, tck, parc) in OPTION_TRACTS.items():
        count = len(nib.streamlines.load(str(SHARED / case / tck)).streamlines)
        wp, vp = write_vectors(prefix, count)
        for name, opts in OPTION_VARIANTS.items():
            opts = [o.format(w=wp, v=vp) for o in opts]
            out = f"tests/data/connectome/{prefix}_{name}.csv"
            cmd = ["tck2connectome", f"../shared/data/{case}/{tck}", parc, out, *opts]
            if name == "weights":
                cmd += ["-out_assignments", f"tests/data/connectome/{prefix}_assign.txt"]
            jobs.append(cmd + ["-nthreads", "0", "-quiet", "-force"])
    return jobs


#: per-streamline assignments (-out_assignments) kept for these (prefix, variant) pairs
ASSIGNMENTS = [("phantom_whole", "r4"), ("phantom_whole", "r2"), ("real_bundleA", "r2")]


#: hand-made streamlines (scanner mm) probing ties, rounding of halves, one-vertex streamlines
#: and points outside the image; used with the phantom parcellation (2 mm voxels, origin -39)
EDGE_CASES = [
    [[-20.0, -1.0, -1.0], [-20.0, 0.0, -1.0]],  # equidistant from 2, then 4 labels: ties
    [[-30.0, -20.0, 0.0]],  # one vertex, voxel coordinate (4.5, 9.5, 2.5): halves
    [[100.0, 100.0, 100.0], [30.0, -20.0, 0.0]],  # far outside; background
    [[-40.5, -1.0, -1.0], [39.9, -1.0, 5.5]],  # just outside the field of view
    [[-19.0, 3.0, 0.0], [-21.0, 3.0, 0.0], [-20.0, 3.0, 0.0]],  # on a voxel centre; tie
]


def write_edge_cases(path: Path) -> None:
    """Write :data:`EDGE_CASES` as a .tck file (float32, identity affine)."""
    import nibabel as nib
    import numpy as np

    lines = [np.asarray(s, dtype=np.float32) for s in EDGE_CASES]
    tractogram = nib.streamlines.Tractogram(lines, affine_to_rasmm=np.eye(4))
    nib.streamlines.save(tractogram, str(path))


def _data_module():
    spec = importlib.util.spec_from_file_location(
        "connectome_data", REPO / "tests" / "connectome" / "connectome_data.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main(argv: list[str]) -> int:
    """All fixtures; ``--options-only``: only those of :data:`OPTION_VARIANTS`."""
    if "--options-only" in argv:
        return _run(option_jobs())
    if "--modes-only" in argv:
        return _run(mode_jobs())
    conf = _data_module()
    for case in conf.PARCELLATION_SPECS:
        conf.make_parcellation_nifti(case, HERE / f"{case}_parc.nii.gz", SHARED)
    write_edge_cases(HERE / "edge_cases.tck")
    jobs = [
        [
            "tck2connectome",
            "tests/data/connectome/edge_cases.tck",
            "tests/data/connectome/phantom_cross90_parc.nii.gz",
            "tests/data/connectome/edge_cases_r4_keep.csv",
            "-keep_unassigned",
            "-out_assignments",
            "tests/data/connectome/edge_cases_r4_assign.txt",
            "-nthreads",
            "0",
            "-quiet",
            "-force",
        ]
    ]
    for prefix, (case, tck) in TRACTS.items():
        variants = dict(VARIANTS)
        if prefix.endswith("whole"):
            variants.update(EXTRA)
        for name, opts in variants.items():
            cmd = [
                "tck2connectome",
                f"../shared/data/{case}/{tck}",
                f"tests/data/connectome/{case}_parc.nii.gz",
                f"tests/data/connectome/{prefix}_{name}.csv",
                *opts,
            ]
            if (prefix, name) in ASSIGNMENTS:
                cmd += ["-out_assignments", f"tests/data/connectome/{prefix}_{name}_assign.txt"]
            jobs.append(cmd + ["-nthreads", "0", "-quiet", "-force"])
    return _run(jobs + option_jobs() + mode_jobs())


def _run(jobs: list[list[str]]) -> int:
    for cmd in jobs:
        print(shlex.join(cmd))
        subprocess.run(cmd, cwd=REPO, check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
