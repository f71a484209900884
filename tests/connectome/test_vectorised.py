"""The vectorised assignment searches: against per-endpoint references and tck2connectome.

The block / lock-step forward search is checked endpoint by endpoint against the one-voxel-
at-a-time search it replaces (:func:`best_first_node`, MRtrix's loop), the reverse search and
the all-voxels edge list against plain loops over the rules, on random label volumes (sparse
and dense, anisotropic and sheared grids, vertices on half-voxel grids for ties). The live
tests run tck2connectome 3.0.3 on a 12,000-streamline tractogram whose endpoints are pushed
off the parcellation (so every search walks), comparing assignments and matrices.
"""

from __future__ import annotations

import shutil
import subprocess

import nibabel as nib
import numpy as np
import pytest
from connectome_data import FIXTURES, SHARED

from invtract.cli import main
from invtract.evaluation.connectome import as_label_volume, assign_nodes, point_labels
from invtract.evaluation.connectome_forward import (
    best_first_node,
    endpoint_tangents,
    forward_search_nodes,
)
from invtract.evaluation.connectome_modes import (
    all_voxel_nodes,
    node_list_pairs,
    reverse_search_nodes,
    segment_norms,
)
from invtract.evaluation.tracks import Packed, load_packed

HAVE_MRTRIX = shutil.which("tck2connectome") is not None


def _random_case(seed: int, density: float, grid: str):
    """A random label volume and 300 random walks (some with repeated vertices)."""
    rng = np.random.default_rng(seed)
    shape = (14, 12, 10)
    labels = rng.integers(1, 6, shape) * (rng.random(shape) < density)
    affine = np.diag([1.0, 1.0, 1.0, 1.0]) if grid != "anisotropic" else np.diag([1.5, 2, 1, 1])
    affine[:3, 3] = rng.normal(0, 1, 3)
    if grid == "sheared":
        affine[:3, :3] += rng.normal(0, 0.15, (3, 3))
    lengths = rng.integers(0, 12, 300)
    lines = []
    for n in lengths:
        start, heading = rng.uniform(-3, 20, 3), rng.normal(0, 1, 3)
        lines.append(start + np.cumsum(rng.normal(0, 0.3, (n, 3)) + heading, axis=0))
    points = np.concatenate(lines).astype(np.float32)
    if grid == "half":  # vertices on a half-voxel grid: equal costs, repeated vertices
        points = np.round(points * 2) / 2
    return as_label_volume((labels, affine)), Packed(points, lengths.astype(np.int64))


CASES = [(1, 0.01, "half"), (2, 0.03, "iso"), (3, 0.08, "anisotropic"), (4, 0.03, "sheared")]


@pytest.mark.parametrize("seed, density, grid", CASES)
def test_forward_search_matches_best_first(seed, density, grid):
    vol, tracks = _random_case(seed, density, grid)
    p, t = endpoint_tangents(tracks)
    own = point_labels(vol, np.nan_to_num(p.reshape(-1, 3), nan=-1e9)).reshape(-1, 2)
    with np.errstate(all="ignore"):
        for dist in (2.0, 6.0, 10.0):
            nodes = forward_search_nodes(vol, tracks, dist)
            want = [[best_first_node(vol, p[s, e], t[s, e], dist) if np.isfinite(p[s, e, 0])
                     else 0 for e in range(2)] for s in range(len(tracks))]  # fmt: skip
            assert nodes.tolist() == want, dist
    assert ((nodes != 0) & (own == 0)).sum() > 20  # the searches found nodes beyond the end


def _reverse_reference(vol, tracks, max_dist):
    """The reverse-search rule, one vertex at a time."""
    labels = point_labels(vol, tracks.points)
    segs = segment_norms(tracks.points)
    out = np.zeros((len(tracks), 2), np.int64)
    for s, (a, n) in enumerate(zip(tracks.first.tolist(), tracks.lengths.tolist())):
        for end, (index, step, count) in enumerate(((a, 1, (n + 1) // 2),
                                                    (a + n - 1, -1, n - 1 - n // 2))):  # fmt: skip
            walked = 0.0
            for i in range(count):
                if labels[index + step * i]:
                    out[s, end] = labels[index + step * i]
                    break
                seg = index + step * i if step > 0 else index + step * i - 1
                walked += float(segs[seg])
                if max_dist and walked > max_dist:
                    break
    return out


@pytest.mark.parametrize(
    "seed, grid", [(1, "half"), (2, "iso"), (3, "anisotropic"), (4, "sheared")]
)
def test_reverse_search_matches_vertex_walk(seed, grid):
    vol, tracks = _random_case(seed, 0.3, grid)
    found = []
    for dist in (0.0, 0.7, 2.5, 9.0):
        nodes = reverse_search_nodes(vol, tracks, float(np.float32(dist)))
        assert nodes.tolist() == _reverse_reference(vol, tracks, dist).tolist()
        found.append(np.count_nonzero(nodes))
    assert found[0] >= 20 and found[1] < found[0]  # nodes found; the limit matters


def test_all_voxel_pairs_match_loops():
    rng = np.random.default_rng(5)
    lists = [np.unique(rng.integers(1, 9, rng.integers(0, 7))) for _ in range(200)]
    pairs, owner = node_list_pairs(lists)
    want, want_owner = [], []
    for s, nodes in enumerate(lists):
        block = ([[0, 0]] if nodes.size == 0 else [[0, int(nodes[0])]] if nodes.size == 1
                 else [[int(nodes[i]), int(nodes[j])] for i in range(nodes.size)
                       for j in range(i, nodes.size)])  # fmt: skip
        want += block
        want_owner += [s] * len(block)
    assert pairs.tolist() == want and owner.tolist() == want_owner


@pytest.fixture(scope="module")
def shifted_whole(tmp_path_factory):
    """12,000 streamlines: whole.tck's, each copy shifted by about 3 mm (seed 15)."""
    source = SHARED / "real_msmt15" / "whole.tck"
    if not source.is_file():
        pytest.skip(f"shared data not found at {SHARED}")
    packed = load_packed(source)
    lines = np.split(packed.points, np.cumsum(packed.lengths)[:-1])
    rng = np.random.default_rng(15)
    pick = np.arange(12_000) % len(lines)
    shifts = rng.normal(0.0, 3.0, (pick.size, 3)).astype(np.float32)
    out = tmp_path_factory.mktemp("shifted") / "shifted.tck"
    moved = [lines[i] + shifts[k] for k, i in enumerate(pick)]
    nib.streamlines.save(nib.streamlines.Tractogram(moved, affine_to_rasmm=np.eye(4)), str(out))
    return out


@pytest.mark.skipif(not HAVE_MRTRIX, reason="MRtrix3 tck2connectome not on PATH")
@pytest.mark.parametrize("opts", [
    [], ["-assignment_end_voxels"], ["-assignment_reverse_search", "0"],
    ["-assignment_reverse_search", "4.5", "-scale_length", "-stat_edge", "mean"],
    ["-assignment_forward_search", "3"], ["-assignment_forward_search", "9", "-vector"],
    ["-assignment_all_voxels"],
    ["-assignment_all_voxels", "-scale_invnodevol", "-stat_edge", "max", "-keep_unassigned"],
])  # fmt: skip
def test_live_modes_on_a_larger_tractogram(opts, shifted_whole, tmp_path):
    parc = FIXTURES / "real_msmt15_parc.nii.gz"
    ref, ref_assign = tmp_path / "ref.csv", tmp_path / "ref.txt"
    out, assign = tmp_path / "out.csv", tmp_path / "out.txt"
    cmd = ["tck2connectome", str(shifted_whole), str(parc), str(ref), "-quiet",
           "-out_assignments", str(ref_assign), *opts]  # fmt: skip
    subprocess.run(cmd, check=True)
    argv = ["-q", "connectome", str(shifted_whole), str(parc), str(out), *opts]
    assert main([*argv, "-out_assignments", str(assign)]) == 0
    skip = 1 if "-vector" in opts else 0  # the vector's first line is the command history
    assert out.read_text().splitlines()[skip:] == ref.read_text().splitlines()[skip:]
    assert assign.read_text().splitlines()[1:] == ref_assign.read_text().splitlines()[1:]
    # the tractogram discriminates: many endpoints lie outside every node
    if opts[:1] == ["-assignment_forward_search"]:
        nodes = assign_nodes(load_packed(shifted_whole), _parc(), 0.0, assignment="end_voxels")
        assert (nodes == 0).mean() > 0.1


def _parc():
    img = nib.load(str(FIXTURES / "real_msmt15_parc.nii.gz"))
    return as_label_volume((np.asanyarray(img.dataobj), img.affine))


@pytest.mark.parametrize("big_label", [False, True])
def test_all_voxel_lists_match_sets(big_label):
    """Both ways of finding each streamline's distinct labels (a dense table of marks for few
    nodes, sorting for many) give the sorted set of its vertices' labels."""
    vol, tracks = _random_case(6, 0.3, "iso")
    if big_label:  # one voxel labelled 2,000,000: far too many nodes for a dense table
        labels = vol.labels.copy()
        labels[0, 0, 0] = 2_000_000
        vol = as_label_volume((labels, vol.affine))
    lists = all_voxel_nodes(vol, tracks)
    per_vertex = point_labels(vol, tracks.points)
    ends = np.cumsum(tracks.lengths)
    want = [sorted(set(per_vertex[e - n : e].tolist()) - {0})
            for e, n in zip(ends.tolist(), tracks.lengths.tolist())]  # fmt: skip
    assert [x.tolist() for x in lists] == want
    assert sum(len(w) > 1 for w in want) >= 10  # lists of several nodes
