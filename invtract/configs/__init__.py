"""Bundled configuration files: fit configs (``fit_params``, ``fit_fod``, ``fit_connectome``)
and Optuna search spaces (``search/sd_stream``, ``search/fit_hparams``).

They ship inside the package and are read through :mod:`importlib.resources`, so a wheel
install finds them from any working directory. ``configs/`` at the repository root is a
link to this folder, so paths such as ``configs/fit_fod.toml`` keep working from a checkout,
and :func:`find_config` also resolves them from anywhere else.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

from ..errors import ConfigError

__all__ = ["find_config", "bundled_configs"]


def _bundled(sub: str) -> Path:
    return Path(str(resources.files(__package__))) / sub


def bundled_configs(sub: str = "") -> list[str]:
    """Names (without ``.toml``) of the bundled configs in ``sub`` (``""`` or ``"search"``)."""
    return sorted(p.stem for p in _bundled(sub).glob("*.toml"))


def find_config(spec: str | os.PathLike, sub: str = "", what: str = "config") -> Path:
    """The file a config argument names.

    Tried in order: ``spec`` as a path (with and without ``.toml``); for a bare name,
    ``./configs/[sub/]NAME`` then the bundled config of that name; for a path that starts
    with ``configs/`` (the repository's spelling, e.g. ``configs/search/sd_stream.toml``),
    the bundled file at the rest of the path.

    Args:
        spec: a path, or a bare name such as ``fit_params`` / ``sd_stream``.
        sub: the bundled sub-folder bare names are looked up in (``""`` or ``"search"``).
        what: the noun used in the error message.

    Raises:
        ConfigError: nothing matched; the message lists what was tried and the bundled names.
    """
    s = str(spec)
    cands = [Path(s), Path(s + ".toml")]
    parts = Path(s).parts
    if len(parts) == 1:
        for d in (Path("configs") / sub, _bundled(sub)):
            cands += [d / s, d / f"{s}.toml"]
    elif parts[0] == "configs":
        rest = Path(*parts[1:])
        cands += [_bundled("") / rest, _bundled("") / f"{rest}.toml"]
    for c in cands:
        if c.is_file():
            return c
    names = ", ".join(bundled_configs(sub))
    raise ConfigError(
        f"{what} {s!r} not found (tried {', '.join(map(str, cands))}); bundled: {names}"
    )
