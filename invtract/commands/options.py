"""Options every command shares, and MRtrix3-style command lines.

* :func:`add_common_options`: ``--force``, ``--quiet``, ``--info``, ``--nthreads``,
  ``--debug`` and ``--version`` on a sub-command's parser (each only where the command does
  not define it itself).
* :func:`translate_argv`: accepts options as MRtrix3 3.0.3 spells them (single dash,
  underscores: ``-seed_image``, ``-seed_grid_per_voxel``, ``-nthreads``, ``-force``, ...)
  alongside ours, and values that start with a minus sign (``--seed-sphere -10,0,0,6``).
* :func:`apply_common_options`: the logging level and thread counts they ask for.
* :func:`add_options` / :func:`add_target_options`: string-valued options from a table
  (``(flag, metavar, help)``); the bundle inputs ``--target``, ``--target-seeds``, ``--fod``
  that fit and calibrate share.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys

__all__ = [
    "MRTRIX_ALIASES",
    "TARGET_OPTIONS",
    "add_common_options",
    "add_options",
    "add_target_options",
    "apply_common_options",
    "translate_argv",
    "version_text",
]

#: MRtrix3 spellings whose meaning is a differently named option of ours (every other
#: ``-name_with_underscores`` maps to ``--name-with-underscores`` when the command has it).
#: tckgen's ``-seeds N`` is the number of seeds to draw; our ``--seeds`` is a seed file.
MRTRIX_ALIASES: dict[str, dict[str, str]] = {
    "track": {"-seeds": "--max-seeds"},
}

#: a value, not an option: a number or a comma-separated list of numbers with a leading minus
_NEGATIVE = re.compile(r"^-\.?\d")
_MRTRIX_OPTION = re.compile(r"^-[A-Za-z][A-Za-z0-9_]+$")


def version_text() -> str:
    """``invtract X.Y.Z`` and what it reproduces."""
    from .. import __version__

    return (
        f"invtract {__version__} (SD_Stream as MRtrix3 3.0.3 tckgen computes it; "
        f"Python {sys.version.split()[0]})"
    )


def _has(p: argparse.ArgumentParser, option: str) -> bool:
    return any(option in a.option_strings for a in p._actions)


def add_common_options(p: argparse.ArgumentParser) -> None:
    """Add the options every command shares to sub-command parser ``p``.

    Each is added only where ``p`` does not already define it (a command may keep its own
    ``--force`` with its own help). MRtrix3 spellings (``-force``, ``-quiet``, ``-info``,
    ``-nthreads N``, ``-debug``, ``-version``) are accepted through :func:`translate_argv`.
    """
    g = p.add_argument_group("common options (MRtrix3 spellings -force, -quiet, ... also work)")
    if not _has(p, "--force"):
        g.add_argument("--force", action="store_true", help="overwrite existing outputs")
    if not _has(p, "--quiet"):
        g.add_argument(
            "-q",
            "--quiet",
            action="store_true",
            default=argparse.SUPPRESS,
            help="no progress and no summary: warnings and errors only",
        )
    if not _has(p, "--info"):
        g.add_argument(
            "--info",
            action="store_true",
            help="also print MRtrix-style statistics (tckgen -info)",
        )
    if not _has(p, "--nthreads"):
        g.add_argument(
            "--nthreads",
            type=int,
            metavar="N",
            help="worker threads (0: single-threaded, as MRtrix3; default: all cores)",
        )
    if not _has(p, "--debug"):
        g.add_argument(
            "--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks"
        )
    if not _has(p, "--version"):
        g.add_argument("--version", action="version", version=version_text())


#: the bundle inputs of a fit or a search: ``(flag, metavar, help)``
TARGET_OPTIONS: tuple[tuple[str, str, str], ...] = (
    ("--target", "TCK", "target bundle (.tck, .trk, .trx), scanner mm"),
    ("--target-seeds", "FILE", "tckgen -output_seeds file of the target (exact seeds)"),
    ("--fod", "IMAGE", "FOD image (.nii, .nii.gz, .mif), SH coefficients"),
)


def add_options(group, table: tuple[tuple[str, str, str], ...]) -> None:
    """Add a string-valued option (default None) per ``(flag, metavar, help)`` of ``table`` to
    ``group`` (a parser or an argument group)."""
    for flag, metavar, text in table:
        group.add_argument(flag, metavar=metavar, help=text)


def add_target_options(p: argparse.ArgumentParser, title: str = "inputs"):
    """A new argument group ``title`` of ``p`` holding ``--target TCK``, ``--target-seeds FILE``
    and ``--fod IMAGE`` (:data:`TARGET_OPTIONS`); returns the group (for more inputs)."""
    group = p.add_argument_group(title)
    add_options(group, TARGET_OPTIONS)
    return group


def _takes_value(action: argparse.Action | None) -> bool:
    return (
        action is not None
        and action.nargs != 0
        and not isinstance(
            action, (argparse._StoreConstAction, argparse._VersionAction, argparse._HelpAction)
        )
    )


def translate_argv(
    argv: list[str], parser: argparse.ArgumentParser, command: str | None = None
) -> list[str]:
    """``argv`` with MRtrix3 option spellings and negative values made argparse-readable.

    * ``-name_with_underscores`` becomes ``--name-with-underscores`` when ``parser`` has that
      option (or :data:`MRTRIX_ALIASES` names another one for ``command``);
    * a value that starts with a minus sign and a digit (``-10,0,0,6``, ``-1,0,0``, ``-0.5``)
      right after an option that takes one is joined to it (``--seed-sphere=-10,0,0,6``),
      so that argparse does not read it as an option.

    Tokens after ``--`` are left alone. ``parser`` is the command's own parser.
    """
    actions = {s: a for a in parser._actions for s in a.option_strings}
    aliases = MRTRIX_ALIASES.get(command or "", {})
    out: list[str] = []
    prev: argparse.Action | None = None
    for i, tok in enumerate(argv):
        if tok == "--":
            return out + argv[i:]
        if prev is not None and _NEGATIVE.match(tok) and "=" not in out[-1]:
            out[-1] = f"{out[-1]}={tok}"
            prev = None
            continue
        if tok not in actions and _MRTRIX_OPTION.match(tok):
            long = aliases.get(tok, "--" + tok[1:].replace("_", "-"))
            tok = long if long in actions else tok
        out.append(tok)
        action = actions.get(tok)
        prev = action if _takes_value(action) and action.nargs in (None, "?") else None
    return out


def apply_common_options(args: argparse.Namespace) -> None:
    """Set the logging level (``--quiet``, ``--info``) and thread counts (``--nthreads``).

    ``--nthreads N`` caps numba's pool (``NUMBA_NUM_THREADS``, read when numba is first
    imported), OpenMP's and PyTorch's; MRtrix3's ``-nthreads 0`` (no worker threads) means one.
    """
    quiet = bool(getattr(args, "quiet", False))
    logging.getLogger("invtract").setLevel(
        logging.WARNING if quiet else (logging.DEBUG if getattr(args, "info", False) else 0)
    )
    n = getattr(args, "nthreads", None)
    if n is None:
        return
    n = max(1, int(n))
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(n)
    if "numba" in sys.modules:
        # numba re-reads NUMBA_NUM_THREADS whenever it compiles and refuses a value other than
        # the one its pool started with: once imported, only set_num_threads may change it
        import numba

        numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    else:
        os.environ["NUMBA_NUM_THREADS"] = str(n)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(n)
