"""The annealing schedule of the soft-survival temperatures, shared by the bundle fit and the
connectome fit (the gradient step itself is :class:`~invtract.fit.trainer.Trainer`'s)."""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["annealed"]


def annealed(t: Mapping, it: int, iterations: int, start: str, end: str) -> float:
    """The value of ``t[start]`` -> ``t[end]`` at iteration ``it`` of ``iterations`` under
    ``t["schedule"]``: ``"constant"`` (start), ``"linear"`` or geometric (otherwise); the end
    value is reached at the last iteration."""
    f = min(it / max(iterations - 1, 1), 1.0)
    a, b = float(t[start]), float(t[end])
    if t["schedule"] == "constant":
        return a
    if t["schedule"] == "linear":
        return a + (b - a) * f
    return a * (b / a) ** f
