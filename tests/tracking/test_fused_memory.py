"""The fused CPU engine at scale: the FOD is used in place (any voxel-major layout, e.g. a
memory-mapped ``.mif``), never copied per thread or chunk, and buffers follow what is tracked."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
from reference_data import load_reference, need_data

from invtract.io.mif import read_mif
from invtract.params import TrackingParameters
from invtract.tracking import fused_cpu

pytestmark = pytest.mark.skipif(not fused_cpu.available(), reason="numba is not available")


def _same(a, b) -> None:
    np.testing.assert_array_equal(a.points, b.points)
    np.testing.assert_array_equal(a.lengths, b.lengths)
    np.testing.assert_array_equal(a.seed_index, b.seed_index)
    np.testing.assert_array_equal(a.status, b.status)
    np.testing.assert_array_equal(a.term, b.term)


def test_prepare_fod_copies_only_what_is_not_voxel_major():
    rng = np.random.default_rng(0)
    c = rng.standard_normal((4, 5, 6, 15)).astype(np.float32)
    s2v = np.eye(4)[:3]
    assert np.shares_memory(fused_cpu.prepare_fod(c, s2v).sh, c)
    zyx = np.ascontiguousarray(c.transpose(2, 1, 0, 3)).transpose(2, 1, 0, 3)  # [z, y, x, k]
    kept = fused_cpu.prepare_fod(zyx, s2v).sh
    assert np.shares_memory(kept, zyx) and not kept.flags.writeable
    volume_major = np.asfortranarray(c)  # NIfTI order: a coefficient's volume is contiguous
    copied = fused_cpu.prepare_fod(volume_major, s2v).sh
    assert not np.shares_memory(copied, volume_major) and copied.flags.c_contiguous
    np.testing.assert_array_equal(copied, c)
    prepared = fused_cpu.prepare_fod(c, s2v)
    assert fused_cpu.prepare_fod(prepared, None) is prepared


def test_mapped_mif_tracks_like_a_contiguous_copy():
    """real_msmt15/fod.mif is stored coefficients-fastest ([z, y, x, k] in memory): tracked in
    place through the memory map, it gives the streamlines of a C-ordered copy, bit for bit."""
    sh, affine, vox, _ = read_mif(need_data("real_msmt15", "fod.mif"))
    assert not sh.flags.c_contiguous and sh.strides[3] == 4
    s2v = np.linalg.inv(affine)[:3]
    _, streamlines, table = load_reference("real_msmt15", "bundleA_default")
    seeds = np.array([streamlines[t][s] for t, s in table], np.float32)
    dirs = np.tile(np.float32([0.55, 0.8, 0.23]), (len(seeds), 1))
    params = TrackingParameters().resolve(vox)
    fod = fused_cpu.prepare_fod(sh, s2v)
    assert np.shares_memory(fod.sh, sh)
    a = fused_cpu.track_fused_cpu(fod, None, seeds, dirs, params, nthreads=2, chunk_size=50)
    b = fused_cpu.track_fused_cpu(np.ascontiguousarray(sh), s2v, seeds, dirs, params, nthreads=1)
    assert a.accepted.sum() > 0.8 * len(seeds)
    _same(a, b)


SCRIPT = """
import resource, numpy as np
from invtract.data import example_path
from invtract.io.image import load_fod
from invtract.params import TrackingParameters
from invtract.tracking import fused_cpu
fod = load_fod(example_path("fod"))
s2v = np.linalg.inv(fod.affine)[:3]
params = TrackingParameters(max_length_mm=100000.0).resolve(fod.voxel_sizes)
assert params.max_points > 300_000, params.max_points
rng = np.random.default_rng(0)
vox = np.argwhere(np.abs(fod.data[..., 0]) > 0)
idx = vox[rng.integers(0, len(vox), 4096)]
seeds = (idx @ fod.affine[:3, :3].T + fod.affine[:3, 3]).astype(np.float32)
dirs = rng.standard_normal(seeds.shape).astype(np.float32)
fused_cpu.track_fused_cpu(fod.data, s2v, seeds[:2], dirs[:2], params)  # compile / load first
soft, hard = resource.getrlimit(resource.RLIMIT_AS)
vm = int(open("/proc/self/status").read().split("VmSize:")[1].split()[0]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + (3 << 30), hard))
# a [4096, max_points, 3] float32 buffer would be > 3.6 GB more than allowed here
res = fused_cpu.track_fused_cpu(fod.data, s2v, seeds, dirs, params, nthreads=2, chunk_size=4096)
print("ok", int(res.accepted.sum()), int(res.lengths.sum()))
"""


@pytest.mark.slow
def test_buffers_follow_what_is_tracked_not_max_length():
    """``--maxlength 100000`` with a 4096-seed chunk runs under a 3 GB address-space margin."""
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(SCRIPT)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ok, accepted, vertices = proc.stdout.split()[-3:]
    assert ok == "ok" and int(accepted) > 0 and int(vertices) > int(accepted)
