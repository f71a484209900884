"""``invtract`` command line: a thin argparse front over the library.

Each sub-command lives in ``invtract/commands/<name>.py`` as a class with ``name``, ``help``,
``add_arguments(parser)`` and ``run(args) -> int``; its module docstring is its long help.
An :class:`~invtract.errors.InvtractError`, an ``OSError`` (permission denied, disk full) or
a ``MemoryError`` becomes one line ``invtract COMMAND: error: ...`` on stderr and exit code 1
(``--debug`` shows the traceback). SIGTERM raises :class:`~invtract.errors.Terminated` while a
command runs, so that its cleanup runs (temporary files removed) as on Ctrl-C; exit code 143.
Options may be spelled as MRtrix3 spells them
(``-seed_image``, ``-force``, ``-nthreads 0``; :mod:`invtract.commands.options`), and a pasted
``tckgen ...`` / ``tck2connectome ...`` command line runs as ``track`` / ``connectome``.
Warnings are one line each (``invtract track: warning: ...``).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
import threading
import warnings

from .commands.options import (
    add_common_options,
    apply_common_options,
    translate_argv,
    version_text,
)
from .errors import InvtractError, Terminated

__all__ = ["main", "entry"]

#: name -> "module:Class" (imported lazily so ``invtract --help`` stays fast)
_COMMANDS: dict[str, str] = {
    "track": "invtract.commands.track:Track",
    "compare": "invtract.commands.compare:Compare",
    "connectome": "invtract.commands.connectome:Connectome",
    "fit": "invtract.commands.fit:Fit",
    "calibrate": "invtract.commands.calibrate:Calibrate",
}
#: MRtrix3 command names accepted in place of ours (a pasted command line runs as is)
_MRTRIX_COMMANDS = {"tckgen": "track", "tck2connectome": "connectome"}


def _load(spec: str):
    module, _, cls = spec.partition(":")
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name == module:
            return None
        raise
    return getattr(mod, cls)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The ``invtract`` parser with every sub-command, or with ``only`` that one (its module
    alone is imported: ``invtract track`` then never imports the fitting stack)."""
    parser = argparse.ArgumentParser(
        prog="invtract",
        description="Differentiable SD_Stream tractography and inverse tractography.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    parser.add_argument("--version", action="version", version=version_text())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    parser.commands = {}
    for name, spec in _COMMANDS.items():
        if only is not None and name != only:
            continue
        cls = _load(spec)
        if cls is None:
            continue
        doc = (sys.modules[cls.__module__].__doc__ or "").strip()
        p = sub.add_parser(
            name,
            help=cls.help,
            description=doc or cls.help,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        cls.add_arguments(p)
        add_common_options(p)
        p.set_defaults(_command=cls)
        parser.commands[name] = p
    return parser


def _command_argv(argv: list[str]) -> tuple[str | None, list[str]]:
    """``(command, argv)``: the command named first (MRtrix3's ``tckgen`` and
    ``tck2connectome`` read as ``track`` and ``connectome``; ``invtract track tckgen ...``
    drops the pasted program name)."""
    argv = list(argv)
    i = next((k for k, a in enumerate(argv) if not a.startswith("-")), None)
    if i is None:
        return None, argv
    argv[i] = _MRTRIX_COMMANDS.get(argv[i], argv[i])
    command = argv[i]
    if i + 1 < len(argv) and _MRTRIX_COMMANDS.get(argv[i + 1]) == command:
        del argv[i + 1]
    return command, argv


class _OneLine(logging.Formatter):
    """``invtract CMD: message``; warnings and errors as ``invtract CMD: warning: message``."""

    def __init__(self, prog: str) -> None:
        super().__init__()
        self.prog = prog

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        prefix = f"{record.levelname.lower()}: "
        if record.levelno >= logging.WARNING and not msg.startswith(prefix):
            msg = prefix + msg  # checks.warn's records already carry "warning: "
        return f"{self.prog}: {msg}"


def _setup_logging(prog: str, quiet: bool) -> None:
    """One line per log record and per Python warning (no source line, no category)."""
    root = logging.getLogger()
    root.handlers[:] = [h for h in root.handlers if not isinstance(h.formatter, _OneLine)]
    if not root.handlers:  # as logging.basicConfig: an embedding program's handlers win
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_OneLine(prog))
        root.addHandler(handler)
        root.setLevel(logging.WARNING if quiet else logging.INFO)

    def show(message, category, filename, lineno, file=None, line=None):
        text = str(message).strip().replace("\n", " ")
        print(f"{prog}: warning: {text}", file=file or sys.stderr)

    warnings.showwarning = show


def main(argv: list[str] | None = None) -> int:
    typed = list(sys.argv[1:] if argv is None else argv)
    first, argv = _command_argv(typed)
    parser = build_parser(only=first if first in _COMMANDS else None)
    if first in parser.commands:
        i = argv.index(first)
        argv = argv[: i + 1] + translate_argv(argv[i + 1 :], parser.commands[first], first)
    args = parser.parse_args(argv)
    args._argv = typed  # the command line as typed (headers' command_history)
    if getattr(args, "_command", None) is None:
        parser.print_help()
        return 1
    _setup_logging(f"invtract {args.command}", args.quiet)
    apply_common_options(args)
    restore = _raise_on_sigterm()
    try:
        return int(args._command.run(args) or 0)
    except (InvtractError, OSError, MemoryError) as exc:
        if args.debug:
            raise
        print(f"invtract {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"invtract {args.command}: interrupted", file=sys.stderr)
        return 130
    except Terminated as exc:
        _terminate_children()
        print(f"invtract {args.command}: {exc}", file=sys.stderr)
        return 128 + exc.signum
    finally:
        restore()


def _one_line(exc: BaseException) -> str:
    """The user-facing text of an error: its message (an ``OSError`` with its file name, a
    ``MemoryError`` prefixed "out of memory")."""
    if isinstance(exc, InvtractError):
        return str(exc)
    if isinstance(exc, MemoryError):
        return f"out of memory: {exc}" if str(exc) else "out of memory"
    if isinstance(exc, OSError) and exc.strerror:
        name = f": {exc.filename}" if exc.filename else ""
        return f"{exc.strerror}{name}"
    return f"{type(exc).__name__}: {exc}"


def _terminate_children() -> None:
    """Pass the termination on to worker processes (``calibrate --workers``): without it the
    interpreter's exit would wait for them to finish their trials."""
    mp = sys.modules.get("multiprocessing")
    if mp is None:
        return
    for child in mp.active_children():
        child.terminate()


def _on_sigterm(signum, frame) -> None:
    # Ignore repeats while the cleanup that this exception triggers runs.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Terminated(signum)


def _raise_on_sigterm():
    """Make SIGTERM raise :class:`Terminated` (main thread only); returns the function that
    puts the previous handler back."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    if previous is None:  # installed outside Python: the default is the closest we can restore
        previous = signal.SIG_DFL
    return lambda: signal.signal(signal.SIGTERM, previous)


def entry() -> None:
    """Console-script entry (``invtract``, ``python -m invtract.cli``): :func:`main`, then exit.

    A command whose class sets ``fast_exit = True`` (``track``: everything it writes is closed
    and renamed into place before it returns) leaves with ``os._exit`` once the standard
    streams and logging are flushed, skipping the interpreter's teardown of the numba / LLVM
    modules it loaded (0.1-0.2 s, over a tenth of a typical run). Every other command exits
    normally, so its atexit handlers (TensorBoard writers, databases) run.
    """
    argv = sys.argv[1:]
    code = main(argv)
    first, _ = _command_argv(argv)
    module, _, name = _COMMANDS.get(first or "", "").partition(":")
    command = getattr(sys.modules.get(module), name, None) if module else None
    if getattr(command, "fast_exit", False):
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":  # pragma: no cover
    entry()
