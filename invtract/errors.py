"""Exception hierarchy of invtract.

Every error that a user can cause (bad file, bad option, bad shape) derives from
:class:`InvtractError`, so the CLI turns it into one line and a non-zero exit code.
"""

from __future__ import annotations

__all__ = [
    "InvtractError",
    "FormatError",
    "ConfigError",
    "ShapeError",
    "FitDiverged",
    "InvtractWarning",
    "Terminated",
]


class InvtractError(Exception):
    """Root of all invtract errors."""


class FormatError(InvtractError):
    """A file could not be read or is malformed (the message names the path)."""


class ConfigError(InvtractError, ValueError):
    """An option, parameter or configuration value is invalid."""


class ShapeError(InvtractError, ValueError):
    """A tensor or image has the wrong shape."""


class FitDiverged(InvtractError):
    """A fit produced a loss that is NaN or infinite."""


class InvtractWarning(UserWarning):
    """Warnings issued by invtract."""


class Terminated(BaseException):
    """Raised by the CLI's SIGTERM handler so that every ``finally`` / cleanup runs (temporary
    files are removed) as on Ctrl-C. A ``BaseException`` like ``KeyboardInterrupt``, but not
    one: code that saves state on Ctrl-C does not treat a termination as a pause."""

    def __init__(self, signum: int = 15) -> None:
        super().__init__(f"terminated by signal {signum}")
        self.signum = signum
