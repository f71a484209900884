"""``tckgen -info``'s rejection and termination tables for infinite seeders.

tckgen's tracker makes one more streamline than its writer takes: once ``-select`` (or
``-seeds``) is reached, the writer returns false only on the next item, whose rejection and
terminations are counted in ``-info``'s tables but not in the seed, generated or selected counts
(MRtrix3 3.0.3 ``tracking/write_kernel.cpp``, ``tracking/exec.h``). The expected numbers are
tckgen 3.0.3's (``MRTRIX_RNG_SEED=20240601 tckgen S/fods.mif out.tck -algorithm SD_Stream
-seed_sphere -4,0,0,6 -minlength 8 -nthreads 0 -info`` with ``-select 30`` or ``-select 0
-seeds 57``; ``S = ../shared/data/sift_phantom``).
"""

from __future__ import annotations

import pytest

from invtract.tracking import fused_cpu

from .reference_data import need_data

pytestmark = pytest.mark.skipif(not fused_cpu.available(), reason="numba is not available")


def _run(select: int, max_seeds: int | None, batch_size: int = 4096):
    from invtract.fod.field import FODField
    from invtract.io.image import load_fod
    from invtract.params import TrackingParameters
    from invtract.tracking.api import Seeding, track

    fod = load_fod(need_data("sift_phantom", "fods.mif"))
    return track(
        FODField.from_image(fod),
        Seeding("sphere", sphere=(-4.0, 0.0, 0.0, 6.0)),
        TrackingParameters(min_length_mm=8.0),
        engine="numba",
        select=select,
        max_seeds=max_seeds,
        rng_seed=20240601,
        batch_size=batch_size,
    ).summary


@pytest.mark.parametrize("batch_size", [4096, 1, 7, 31])
def test_select_counts_the_seed_after_the_last(batch_size):
    """-select 30: 287 seeds, 30 generated; -info: 257 invalid seeds, 62 terminations (the
    31st streamline's two halves included), whether or not the chunk holds that seed."""
    s = _run(30, None, batch_size)
    assert (s["seeds"], s["generated"], s["selected"]) == (287, 30, 30)
    assert s["rejected"] == {"Invalid seed point": 257}
    assert s["terminations"] == {"Exited image": 62}


@pytest.mark.parametrize("batch_size", [4096, 1, 19])
def test_seed_limit_counts_the_seed_after_the_last(batch_size):
    """-seeds 57: 57 seeds, 5 generated; -info: 53 invalid seeds (the 58th seed's included)."""
    s = _run(0, 57, batch_size)
    assert (s["seeds"], s["generated"], s["selected"]) == (57, 5, 5)
    assert s["rejected"] == {"Invalid seed point": 53}
    assert s["terminations"] == {"Exited image": 10}
