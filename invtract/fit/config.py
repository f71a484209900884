"""One config schema for every fit: defaults, layering, type checks, validation, TOML I/O.

A fit config is a dict of TOML tables. Its *schema* is the defaults dict itself: every key a
user may set exists there, and a value must have its default's type (an integer where a float
is expected is accepted and converted; ``[loss.weights]`` is a free table of numbers). On top
of the types, :func:`validate` applies a table of rules (``"optimizer.lr": (">", 0)``,
``"fit.mode": ("in", ("joint", "alternate"))``). Every failure is one
:class:`~invtract.errors.ConfigError` line naming the key, raised before any data is read.

Precedence (lowest first): the defaults < ``--example``'s settings < the ``--config`` file <
``--set`` / ``--SECTION.KEY`` flags < the named flags (``--iterations``, ``--device``,
``--fit``); :func:`layered_config` applies them in that order.

:func:`find_config` is the one place that turns a config name (``fit_params``) into a file.
"""

from __future__ import annotations

import ast
import copy
import json
import math
from collections.abc import Mapping
from pathlib import Path

from ..errors import ConfigError

__all__ = [
    "merge_config",
    "read_toml",
    "toml_dumps",
    "layered_config",
    "validate",
    "find_config",
    "parse_value",
    "set_dotted",
    "flat_keys",
    "table_fields",
    "header_lengths",
]

#: folders searched for a config given by bare name (the working directory's first)
#: tables whose keys are free (names of loss terms) rather than fixed by the defaults
FREE_TABLES = ("weights",)
#: keys whose value may be a word or a number at any layer (checked by their reader):
#: ``signal.spatial`` is "auto" or a weight (invtract.fit.signal_term.parse_spatial)
MIXED_KEYS = ("signal.spatial",)


def find_config(spec: str) -> Path:
    """A config path, or a bare name looked up in ``./configs`` then the bundled configs
    (:func:`invtract.configs.find_config`: they ship inside the package)."""
    from ..configs import find_config as locate

    return locate(spec)


def _typed(key: str, default, value):
    """``value`` converted to the type of ``default``; ConfigError naming ``key`` otherwise."""
    if default is None or value is None:
        return value
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    if isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(float(value)):
                raise ConfigError(f"{key} must be a finite number, got {value!r}")
            return float(value)
        raise ConfigError(f"{key} must be a number, got {value!r}")
    if isinstance(default, str):
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key} must be a string, got {value!r}")
    if isinstance(default, (list, tuple)):
        if isinstance(value, (list, tuple)):
            return list(value)
        raise ConfigError(f"{key} must be a list, got {value!r}")
    return value


def _free_table(key: str, value) -> dict:
    if not isinstance(value, Mapping):
        raise ConfigError(f"[{key}] must be a table")
    out = {}
    for k, v in value.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ConfigError(f"{key}.{k} must be a finite number, got {v!r}")
        out[k] = float(v)
    return out


def merge_config(
    base: Mapping, override: Mapping, prefix: str = "", *, free_keys: bool = False
) -> dict:
    """Deep merge of ``override`` into ``base``: tables merge, values replace.

    Every key of ``override`` must exist in ``base`` and its value must have the type of
    ``base``'s (see the module docstring); tables named in :data:`FREE_TABLES` are replaced as
    a whole (a config file's ``[loss.weights]`` is the fit's set of terms), or with
    ``free_keys`` merged key by key (a ``--set loss.weights.X=V`` flag changes ``X`` only).
    Raises :class:`ConfigError` (one line, naming ``section.key``) otherwise.
    """
    out = copy.deepcopy(dict(base))
    for k, v in override.items():
        key = f"{prefix}{k}"
        if k not in out:
            where = f"[{prefix[:-1]}]" if prefix else "the config"
            raise ConfigError(f"unknown config key {key!r} in {where}; known: {sorted(out)}")
        if k in FREE_TABLES:
            out[k] = {**out[k], **_free_table(key, v)} if free_keys else _free_table(key, v)
        elif isinstance(out[k], dict):
            if not isinstance(v, Mapping):
                raise ConfigError(f"config [{key}] must be a table, got {v!r}")
            out[k] = merge_config(out[k], v, f"{key}.", free_keys=free_keys)
        else:
            out[k] = v if key in MIXED_KEYS else _typed(key, out[k], v)
    return out


def read_toml(path: str | Path) -> dict:
    """A TOML file as a dict; ConfigError when it cannot be read or parsed."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    try:
        return tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise ConfigError(f"{path}: cannot read config ({err})") from err


def layered_config(
    defaults: Mapping,
    path: str | Path | None = None,
    overrides: Mapping | None = None,
    *,
    example: Mapping | None = None,
    base: str | Path | None = None,
    ignore=("tracking", "inputs"),
) -> dict:
    """``defaults`` < TOML file ``base`` (the default config file of the fit, part of the
    defaults) < ``example`` < TOML file ``path`` (the user's ``--config``) < ``overrides``
    (the command-line flags: a weight flag changes that weight only); ``ignore`` sections of
    the files are dropped; each layer is type-checked."""
    cfg = copy.deepcopy(dict(defaults))
    if base is not None:
        cfg = _merge_file(cfg, base, ignore)
    if example:
        cfg = merge_config(cfg, example)
    if path is not None:
        cfg = _merge_file(cfg, path, ignore)
    if overrides:
        cfg = merge_config(cfg, overrides, free_keys=True)
    return cfg


def _merge_file(cfg: dict, path: str | Path, ignore) -> dict:
    doc = read_toml(path)
    for section in ignore:
        doc.pop(section, None)
    try:
        return merge_config(cfg, doc)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def _get(cfg: Mapping, dotted: str):
    d = cfg
    for part in dotted.split("."):
        d = d[part]
    return d


def _check(key: str, value, op: str, arg) -> None:
    if op == "in":
        if value not in arg:
            raise ConfigError(f"{key} must be one of {', '.join(map(str, arg))}, got {value!r}")
        return
    if op == "subset":
        bad = sorted(set(value) - set(arg))
        if bad or not value:
            raise ConfigError(f"{key} must name some of {', '.join(arg)}, got {value!r}")
        return
    if op == "bounds":
        lo, hi = (float(x) for x in value) if len(value) == 2 else (0.0, 0.0)
        if len(value) != 2 or not (0 < lo < hi and math.isfinite(hi)):
            raise ConfigError(f"{key} needs [low, high] with 0 < low < high, got {value!r}")
        return
    tests = {
        ">": lambda: value > arg,
        ">=": lambda: value >= arg,
        "<": lambda: value < arg,
        "[0,1)": lambda: 0 <= value < 1,
    }
    if not tests[op]():
        rule = "in [0, 1)" if op == "[0,1)" else f"{op} {arg}"
        raise ConfigError(f"{key} must be {rule}, got {value!r}")


def validate(cfg: Mapping, rules: Mapping) -> None:
    """Apply ``rules`` (``dotted key -> (op, arg)``; ops ``>``, ``>=``, ``<``, ``[0,1)``,
    ``in``, ``subset``, ``bounds``) to ``cfg``; :class:`ConfigError` on the first violation."""
    for key, (op, arg) in rules.items():
        _check(key, _get(cfg, key), op, arg)


def table_fields(cls, d: Mapping | None, table: str) -> dict:
    """``d`` as keyword arguments of dataclass ``cls``; ConfigError naming ``[table]`` for a key
    ``cls`` does not have."""
    d = dict(d or {})
    known = set(cls.__dataclass_fields__)
    unknown = sorted(set(d) - known)
    if unknown:
        raise ConfigError(f"[{table}]: unknown keys {unknown}; known: {sorted(known)}")
    return d


def header_lengths(header: Mapping, params):
    """``params`` with unset ``min_length_mm`` / ``max_length_mm`` taken from a tckgen
    header's ``min_dist`` / ``max_dist`` (mm)."""
    changes = {}
    for key, name in (("min_dist", "min_length_mm"), ("max_dist", "max_length_mm")):
        if getattr(params, name) is None and key in header:
            try:
                changes[name] = float(header[key])
            except ValueError:
                pass
    return params.replace(**changes) if changes else params


def parse_value(text: str):
    """A ``--set`` value: TOML-ish literals (numbers, true/false, lists, quoted strings), else
    the text itself (a bare word)."""
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    try:
        return ast.literal_eval(text.strip())
    except (ValueError, SyntaxError):
        return text.strip()


def set_dotted(over: dict, dotted: str, value) -> None:
    """``over[a][b] = value`` for ``dotted = "a.b"``."""
    parts = dotted.split(".")
    if len(parts) < 2 or not all(parts):
        raise ConfigError(f"config key must be SECTION.KEY, got {dotted!r}")
    d = over
    for p in parts[:-1]:
        d = d.setdefault(p, {})
        if not isinstance(d, dict):
            raise ConfigError(f"config key {dotted!r}: {p} is not a table")
    d[parts[-1]] = value


def flat_keys(cfg: Mapping, prefix: str = "", free: Mapping | None = None) -> list[str]:
    """Dotted names of every settable key (``free``: names listed for a free table)."""
    out = []
    for k, v in cfg.items():
        if k in FREE_TABLES:
            out += [f"{prefix}{k}.{t}" for t in (free or {}).get(k, ())]
        elif isinstance(v, dict):
            out += flat_keys(v, f"{prefix}{k}.", free)
        else:
            out.append(prefix + k)
    return out


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v) if math.isfinite(v) else ('"nan"' if v != v else f'"{v}"')
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, Mapping):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(x)}" for k, x in v.items()) + "}"
    return json.dumps(str(v))


def _toml_key(k: str) -> str:
    return k if str(k).replace("_", "").replace("-", "").isalnum() else json.dumps(str(k))


def toml_dumps(doc: Mapping, prefix: str = "") -> str:
    """TOML text of nested tables of numbers, strings, bools and lists (None is skipped)."""
    lines = [f"[{prefix}]"] if prefix else []
    tables = []
    for k, v in doc.items():
        if isinstance(v, Mapping):
            tables.append((k, v))
        elif v is not None:
            lines.append(f"{_toml_key(k)} = {_toml_value(v)}")
    text = "\n".join(lines)
    for k, v in tables:
        name = f"{prefix}.{_toml_key(k)}" if prefix else _toml_key(k)
        text += "\n\n" + toml_dumps(v, name)
    return text.strip("\n") + "\n"
