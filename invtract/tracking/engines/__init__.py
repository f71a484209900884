"""The tracking engines behind one interface, and the registry that picks one by name.

Every engine is a function with the signature of :func:`invtract.tracking.tracker.track_torch`::

    engine(field, seeds [N, 3], init_dirs [N, 3], params, rois=None, batch_size=..., progress=None)
        -> EngineResult

(an :class:`~invtract.fod.field.FODField`, scanner-mm seeds, raw start directions, resolved
parameters; the result of :mod:`invtract.tracking.types`). All follow the rules of
:mod:`invtract.tracking.rules`; ``tests/tracking/test_conformance.py`` checks them case by case.

* ``torch`` (:mod:`.torch`): the reference, any torch device, needs no numba.
* ``numba`` (:mod:`.numba_cpu`): the compiled CPU kernel, bit-exact with tckgen.
* ``triton`` (:mod:`.triton_gpu`): the GPU kernel (CPU under ``TRITON_INTERPRET=1``); falls
  back to numba / torch for what it does not cover.

The ``numba`` and ``torch`` engines also have a "record peaks" mode (``track_peaks``, picked
by :func:`get_peak_engine`): the same streamlines (no ROIs), unpacked, with the converged peak
behind every point (a :class:`~invtract.tracking.types.PeakRecord`). It is the hard pass of
the differentiable tracker (:mod:`invtract.tracking.differentiable`), which tracks nothing
itself. (Triton has none: on CUDA the torch engine records.)

Each engine module is imported on first use, so importing this package loads neither numba nor
triton. Nothing here imports :mod:`invtract.tracking.tracker` or the kernels at module level,
and the kernels import no engine: the import graph has no cycle (``test_rules.py`` checks it).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from ...errors import ConfigError
from ..runner import default_engine, numba_available
from ..types import EngineResult, PeakRecord

__all__ = [
    "ENGINES",
    "ENGINE_NAMES",
    "get_engine",
    "get_peak_engine",
    "PEAK_ENGINE_NAMES",
    "run_engine",
    "default_engine",
    "numba_available",
]

#: engine name -> module (in this package) whose ``track`` is the engine
_MODULES = {"torch": "torch", "numba": "numba_cpu", "triton": "triton_gpu"}
ENGINE_NAMES = tuple(_MODULES)


def get_engine(name: str) -> Callable[..., EngineResult]:
    """The engine function called ``name`` (``torch``, ``numba`` or ``triton``).

    Raises:
        ConfigError: for an unknown name (the message lists the valid ones).
    """
    if name not in _MODULES:
        raise ConfigError(f"unknown engine {name!r}; valid: auto, {', '.join(_MODULES)}")
    return importlib.import_module(f".{_MODULES[name]}", __name__).track


def _lazy(name: str) -> Callable[..., EngineResult]:
    def engine(*args, **kwargs) -> EngineResult:
        return get_engine(name)(*args, **kwargs)

    engine.__name__ = f"{name}_engine"
    engine.__doc__ = f"The {name!r} engine (imported on first call); see :func:`get_engine`."
    return engine


#: name -> engine function (each imports its module on first call)
ENGINES: dict[str, Callable[..., EngineResult]] = {name: _lazy(name) for name in _MODULES}


def run_engine(name: str, *args, **kwargs) -> EngineResult:
    """Run engine ``name`` (``"auto"``: the fastest for the field's device) on ``args``."""
    if name == "auto":
        name = default_engine(args[0].device)
    return get_engine(name)(*args, **kwargs)


#: engines with a "record peaks" mode
PEAK_ENGINE_NAMES = ("numba", "torch")


def get_peak_engine(name: str, field, refine: int = 0) -> tuple[str, Callable[..., PeakRecord]]:
    """``(name, track_peaks)``: the "record peaks" mode of engine ``name`` for ``field``.

    ``track_peaks(field, seeds [N, 3], init_dirs [N, 3], params, refine=0, with_points=True)
    -> PeakRecord``.
    ``"auto"``: the numba kernel where it can run (numba installed, float32 CPU FOD,
    ``refine == 0``), else the torch engine (float64, CUDA, ``refine > 0``).

    Raises:
        ConfigError: for an unknown name, or ``"numba"`` where the kernel cannot run.
    """
    if name not in ("auto", *PEAK_ENGINE_NAMES):
        raise ConfigError(
            f"unknown peak-recording engine {name!r}; valid: auto, {', '.join(PEAK_ENGINE_NAMES)}"
        )
    from . import numba_cpu

    reason = numba_cpu.peaks_unavailable_reason(field, refine)
    if name == "auto":
        name = "numba" if reason is None else "torch"
    if name == "numba":
        if reason is not None:
            raise ConfigError(f"numba engine, record peaks: {reason}")
        return name, numba_cpu.track_peaks
    return name, importlib.import_module(".torch", __name__).track_peaks
