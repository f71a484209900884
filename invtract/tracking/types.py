"""Termination and rejection codes (MRtrix3 ``term_t`` / ``reject_t``) and engine results.

Convention: ``src/dwi/tractography/tracking/types.h`` (enum order and the ``term_add_to_tck``
table: whether the point at which a half stopped is appended).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

__all__ = [
    "Term",
    "Reject",
    "TERM_ADD_TO_TCK",
    "EngineResult",
    "PeakRecord",
    "RoiSet",
    "ImageRoi",
    "SphereRoi",
]


class Term(IntEnum):
    """Why one half of a streamline stopped (MRtrix ``term_t``)."""

    CONTINUE = 0
    ENTER_CGM = 1
    CALIBRATOR = 2
    EXIT_IMAGE = 3
    ENTER_CSF = 4
    MODEL = 5
    HIGH_CURVATURE = 6
    LENGTH_EXCEED = 7
    TERM_IN_SGM = 8
    EXIT_SGM = 9
    EXIT_MASK = 10
    ENTER_EXCLUDE = 11
    TRAVERSE_ALL_INCLUDE = 12


class Reject(IntEnum):
    """Why a seed or streamline was not written (MRtrix ``reject_t``); ACCEPTED = written."""

    ACCEPTED = -1
    INVALID_SEED = 0
    NO_PROPAGATION_FROM_SEED = 1
    TRACK_TOO_SHORT = 2
    TRACK_TOO_LONG = 3
    ENTER_EXCLUDE_REGION = 4
    MISSED_INCLUDE_REGION = 5
    ACT_POOR_TERMINATION = 6
    ACT_FAILED_WM_REQUIREMENT = 7


#: Whether the position that caused the termination is appended to the streamline.
TERM_ADD_TO_TCK = {
    Term.CONTINUE: True,
    Term.ENTER_CGM: True,
    Term.CALIBRATOR: False,
    Term.EXIT_IMAGE: False,
    Term.ENTER_CSF: True,
    Term.MODEL: False,
    Term.HIGH_CURVATURE: False,
    Term.LENGTH_EXCEED: True,
    Term.TERM_IN_SGM: False,
    Term.EXIT_SGM: False,
    Term.EXIT_MASK: False,
    Term.ENTER_EXCLUDE: True,
    Term.TRAVERSE_ALL_INCLUDE: True,
}

TERM_NAMES = {
    Term.ENTER_CGM: "Entered cortical grey matter",
    Term.CALIBRATOR: "Calibrator sub-threshold",
    Term.ENTER_CSF: "Entered CSF",
    Term.TERM_IN_SGM: "Terminated in subcortex",
    Term.EXIT_SGM: "Exiting sub-cortical GM",
    Term.EXIT_IMAGE: "Exited image",
    Term.MODEL: "Diffusion model sub-threshold",
    Term.HIGH_CURVATURE: "Excessive curvature",
    Term.LENGTH_EXCEED: "Max length exceeded",
    Term.EXIT_MASK: "Exited mask",
    Term.ENTER_EXCLUDE: "Entered exclusion region",
    Term.TRAVERSE_ALL_INCLUDE: "Traversed all include regions",
}

REJECT_NAMES = {
    Reject.INVALID_SEED: "Invalid seed point",
    Reject.NO_PROPAGATION_FROM_SEED: "No propagation from seed",
    Reject.TRACK_TOO_SHORT: "Shorter than minimum length",
    Reject.ENTER_EXCLUDE_REGION: "Entered exclusion region",
    Reject.MISSED_INCLUDE_REGION: "Missed inclusion region",
    Reject.TRACK_TOO_LONG: "Longer than maximum length",
    Reject.ACT_POOR_TERMINATION: "Poor structural termination",
    Reject.ACT_FAILED_WM_REQUIREMENT: "Failed to traverse white matter",
}


@dataclass(frozen=True)
class ImageRoi:
    """An image region: voxel (i,j,k) is in the region iff ``mask[i,j,k]``.

    Containment of a scanner-mm point p: v = scanner2voxel @ [p, 1] (float64), nearest voxel by
    rounding half away from zero; outside the image = not contained (``roi.h``).

    Attributes:
        mask: ``[X, Y, Z]`` bool array.
        scanner2voxel: ``[3, 4]`` float64 matrix mapping scanner mm to voxel coordinates.
        name: text for the ``.tck`` header.
    """

    mask: np.ndarray
    scanner2voxel: np.ndarray
    name: str = ""


@dataclass(frozen=True)
class SphereRoi:
    """A sphere: p is inside iff ``|p - centre|^2 <= radius^2`` (mm)."""

    centre: tuple[float, float, float]
    radius: float
    name: str = ""


@dataclass(frozen=True)
class RoiSet:
    """The ``-include``, ``-exclude`` and ``-mask`` regions of a tracking run.

    ``include_ordered`` are visited in order (requires unidirectional tracking).
    """

    include: tuple = ()
    exclude: tuple = ()
    mask: tuple = ()
    include_ordered: tuple = ()

    def __bool__(self) -> bool:
        return bool(self.include or self.exclude or self.mask or self.include_ordered)


@dataclass
class EngineResult:
    """What a tracking engine returns for N seeds (all numpy, CPU).

    Attributes:
        points: ``[P, 3]`` float32 vertices of the *accepted* streamlines, packed, in seed order,
            scanner mm.
        lengths: ``[N]`` int64 vertex count per seed (0 when rejected).
        seed_index: ``[N]`` int64 index of the seed vertex within its streamline (-1 if rejected).
        status: ``[N]`` int8 ``Reject`` code (``Reject.ACCEPTED`` = -1 for written streamlines).
        term: ``[N, 2]`` int8 ``Term`` code that ended each half (-1 if the half was not tracked).
        init_dir: ``[N, 3]`` float32 direction u0 found at the seed by the peak search (NaN when
            the seed was rejected before it).
        counts: free-form extra counters (e.g. ``steps``: total propagation steps).
    """

    points: np.ndarray
    lengths: np.ndarray
    seed_index: np.ndarray
    status: np.ndarray
    term: np.ndarray
    init_dir: np.ndarray
    counts: dict = field(default_factory=dict)

    @property
    def accepted(self) -> np.ndarray:
        return self.status == int(Reject.ACCEPTED)

    @classmethod
    def empty(cls) -> EngineResult:
        """The result for zero seeds."""
        return cls(
            np.zeros((0, 3), np.float32), np.zeros(0, np.int64), np.zeros(0, np.int64),
            np.zeros(0, np.int8), np.zeros((0, 2), np.int8), np.zeros((0, 3), np.float32),
        )  # fmt: skip


@dataclass
class PeakRecord:
    """What an engine's "record peaks" mode returns for N seeds (torch tensors, one device).

    Every row is laid out as the streamline is written (tckgen's order): the first half
    reversed, the seed at column ``seed_index``, then the second half; unidirectional: the seed
    at column 0, then the one half. The differentiable tracker builds its tape from these
    (:mod:`invtract.tracking.differentiable`).

    Attributes:
        points: ``[N, L, 3]`` vertices, scanner mm, in the FOD's dtype (row i: ``lengths[i]``
            vertices, the rest undefined; ``L`` at least the longest row); None when the
            engine was asked not to keep them (``with_points=False``).
        peaks: ``[N, L, 3]`` at each vertex but the seed, the converged peak u the step that
            wrote it moved along (p = p_prev + h u); undefined at the seed and beyond the length.
        lengths: ``[N]`` int64 vertex count (0 when rejected).
        seed_index: ``[N]`` int64 column of the seed (-1 when rejected).
        status: ``[N]`` int64 ``Reject`` code.
        term: ``[N, 2]`` int64 ``Term`` code of each half (-1: not tracked).
        init_dir: ``[N, 3]`` the seed peak u0 (undefined for seeds rejected before it).
        steps: propagation steps taken.
    """

    points: torch.Tensor | None
    peaks: torch.Tensor
    lengths: torch.Tensor
    seed_index: torch.Tensor
    status: torch.Tensor
    term: torch.Tensor
    init_dir: torch.Tensor
    steps: int = 0


def concat_results(parts: list[EngineResult], seconds: float | None = None) -> EngineResult:
    """Concatenate engine results of consecutive seed chunks (``counts`` summed per key).

    With ``seconds`` (an engine's wall time over all chunks), ``counts`` becomes the engines'
    summary: ``steps`` (summed), ``seconds`` and ``chunks``.
    """
    res = _concat(parts)
    if seconds is not None:
        steps = int(res.counts.get("steps", 0))
        res.counts = {"steps": steps, "seconds": seconds, "chunks": len(parts)}
    return res


def _concat(parts: list[EngineResult]) -> EngineResult:
    if not parts:
        return EngineResult.empty()
    if len(parts) == 1:
        return parts[0]
    counts: dict = {}
    for p in parts:
        for k, v in p.counts.items():
            counts[k] = counts.get(k, 0) + v
    return EngineResult(
        points=np.concatenate([p.points for p in parts], 0),
        lengths=np.concatenate([p.lengths for p in parts]),
        seed_index=np.concatenate([p.seed_index for p in parts]),
        status=np.concatenate([p.status for p in parts]),
        term=np.concatenate([p.term for p in parts], 0),
        init_dir=np.concatenate([p.init_dir for p in parts], 0),
        counts=counts,
    )
