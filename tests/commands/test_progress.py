"""Progress as MRtrix3 prints it: rewritten in place on a terminal, a few lines off one."""

from __future__ import annotations

import io

from invtract.progress import Progress, iteration_bar


def _run(terminal: bool, enabled: bool = True, n: int = 1000) -> str:
    out = io.StringIO()
    p = Progress("invtract track", n, stream=out, terminal=terminal, interval=0.0,
                 enabled=enabled)  # fmt: skip
    for i in range(1, n + 1):
        p.update(i, f"{i:8d} seeds")
    p.done()
    return out.getvalue()


def test_off_terminal_prints_mrtrix_doubling_lines():
    lines = _run(terminal=False).splitlines()
    counts = [int(line.split("]")[1].split()[0]) for line in lines]
    assert counts == [1, 2, 3, 5, 9, 17, 33, 65, 129, 257, 513, 1000]
    assert lines[0] == "invtract track: [  0%]        1 seeds"
    assert lines[-1] == "invtract track: [100%]     1000 seeds"


def test_terminal_rewrites_one_line_and_ends_it():
    text = _run(terminal=True, n=50)
    assert text.count("\n") == 1 and text.endswith("\x1b[0K\n")
    assert text.count("\r") == 51 and "[100%]       50 seeds" in text.rsplit("\r", 1)[1]


def test_quiet_prints_nothing():
    assert _run(terminal=False, enabled=False) == ""
    assert _run(terminal=True, enabled=False) == ""


def test_fit_bar_off_terminal_does_not_flood(capsys):
    bar = iteration_bar(200, 0, "fit")  # stderr is captured: not a terminal
    for _ in range(200):
        bar.set_postfix(loss="0.5")
        bar.update(1)
    bar.close()
    lines = capsys.readouterr().err.splitlines()
    assert (
        5 <= len(lines) <= 10 and lines[-1] == "invtract fit: [100%] iteration 200/200, loss=0.5"
    )
