"""Progress reports as MRtrix3 prints them.

On a terminal: one line rewritten in place, ``invtract track: [ 45%]     8000 seeds, ...``,
left on screen when done. Off a terminal (a log file, a pipe): nothing in between but a line
each time the count reaches 1, 2, 3, 5, 9, 17, 33, ... (2^k + 1, MRtrix3's rule for
redirected output: a handful of lines, however long the run) and the final line.
:func:`iteration_bar` gives fits the same behaviour with tqdm's bar on a terminal.
"""

from __future__ import annotations

import sys
import time
from typing import IO

__all__ = ["Progress", "iteration_bar", "is_terminal"]

_CLEAR = "\033[0K"


def is_terminal(stream: IO | None = None) -> bool:
    """True when ``stream`` (default stderr) is an interactive terminal."""
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class Progress:
    """A progress line ``PREFIX: [PCT%] TEXT`` (or ``PREFIX: TEXT`` without a total).

    Args:
        prefix: the program name shown first (``"invtract track"``).
        total: the value that means 100%, or None (no percentage).
        stream: where to write (default stderr).
        enabled: False prints nothing (``--quiet``).
        terminal: override the terminal check (tests).
        interval: shortest time (s) between two rewrites on a terminal.
    """

    def __init__(
        self,
        prefix: str,
        total: int | None = None,
        *,
        stream: IO | None = None,
        enabled: bool = True,
        terminal: bool | None = None,
        interval: float = 0.1,
    ) -> None:
        self.prefix = prefix
        self.total = total if total and total > 0 else None
        self.stream = sys.stderr if stream is None else stream
        self.enabled = enabled
        self.terminal = is_terminal(self.stream) if terminal is None else terminal
        self.interval = interval
        self._next_line = 1  # off-terminal: the next count that prints a line
        self._last_time = 0.0
        self._last = None
        self._printed = None  # the last line written off-terminal

    def _line(self, value: int, text: str) -> str:
        if self.total is None:
            return f"{self.prefix}: {text}"
        pct = min(100, int(100 * value / self.total))
        return f"{self.prefix}: [{pct:3d}%] {text}"

    def update(self, value: int, text: str) -> None:
        """Report ``value`` (out of ``total``) with its description ``text``."""
        self._last = (value, text)
        if not self.enabled:
            return
        if self.terminal:
            now = time.monotonic()
            if now - self._last_time >= self.interval:
                self._last_time = now
                self.stream.write("\r" + self._line(value, text) + _CLEAR)
                self.stream.flush()
            return
        if value >= self._next_line:
            while self._next_line <= value:
                self._next_line = (
                    2 * self._next_line - 1 if self._next_line > 2 else (self._next_line + 1)
                )
            self._printed = self._line(value, text)
            self.stream.write(self._printed + "\n")
            self.stream.flush()

    def done(self, value: int | None = None, text: str | None = None) -> None:
        """Print the final line (the last update unless given) and end it."""
        if value is None and self._last is None:
            return
        value, text = (value, text) if value is not None else self._last
        if not self.enabled:
            return
        line = self._line(value, text)
        if self.terminal:
            self.stream.write("\r" + line + _CLEAR + "\n")
        elif line != self._printed:
            self.stream.write(line + "\n")
        self._printed = line
        self.stream.flush()


class _LineBar:
    """tqdm's interface (``update``, ``set_postfix``, ``close``) over :class:`Progress`."""

    def __init__(self, total: int, initial: int, desc: str, enabled: bool) -> None:
        self.n = initial
        self.postfix = ""
        self.progress = Progress(f"invtract {desc}", total, enabled=enabled, terminal=False)

    def _text(self) -> str:
        return f"iteration {self.n}/{self.progress.total}" + (
            f", {self.postfix}" if self.postfix else ""
        )

    def update(self, n: int = 1) -> None:
        self.n += n
        self.progress.update(self.n, self._text())

    def set_postfix(self, ordered_dict=None, refresh: bool = True, **kwargs) -> None:
        items = dict(ordered_dict or {}, **kwargs)
        self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfix = s

    def write(self, s: str) -> None:
        print(s, file=sys.stderr)

    def close(self) -> None:
        if self.progress._last is not None:
            self.progress.done(self.n, self._text())


def iteration_bar(total: int, initial: int = 0, desc: str = "fit", enabled: bool = True):
    """A progress bar over iterations: tqdm's on a terminal, MRtrix3-style lines
    (1, 2, 3, 5, 9, ... and the last) off one, nothing when not ``enabled``."""
    if is_terminal():
        from tqdm.auto import tqdm

        return tqdm(
            total=total,
            initial=initial,
            desc=desc,
            unit="it",
            dynamic_ncols=True,
            disable=not enabled,
        )
    return _LineBar(total, initial, desc, enabled)
