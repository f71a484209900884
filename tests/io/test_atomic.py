"""The one atomic writer: complete files or none, and no leftovers from killed runs."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from invtract.io.atomic import atomic_output, atomic_write_text, remove_stale_temporaries


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temporaries_of_killed_runs_are_removed_live_ones_kept(tmp_path):
    out = tmp_path / "a.tck"
    dead = tmp_path / f".a.tck.{_dead_pid()}-0123456789ab.tmp.tck"
    alive = tmp_path / f".a.tck.{os.getppid()}-0123456789ab.tmp.tck"
    other = tmp_path / f".b.tck.{_dead_pid()}-0123456789ab.tmp.tck"  # another output's
    for p in (dead, alive, other):
        p.write_bytes(b"half")
    atomic_write_text(out, "done")
    assert out.read_text() == "done"
    assert not dead.exists() and alive.exists() and other.exists()
    assert remove_stale_temporaries(tmp_path / "b.tck") == [other]


def test_interrupted_write_leaves_nothing(tmp_path):
    out = tmp_path / "a.csv"
    out.write_text("old")
    with pytest.raises(KeyboardInterrupt), atomic_output(out, suffix=".csv") as tmp:
        with open(tmp, "w") as f:
            f.write("half")
        raise KeyboardInterrupt
    assert out.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.csv"]
