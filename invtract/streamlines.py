"""The streamline container: packed points plus per-streamline lengths.

Positions are scanner (world, RAS+) millimetres, as ``.tck`` stores them.
Modelled on nibabel's ``ArraySequence`` (``_data``, ``_offsets``, ``_lengths``) and
pytorch3d's packed/padded representation.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .errors import ShapeError

__all__ = ["Streamlines"]


@dataclass(frozen=True)
class Streamlines:
    """A set of streamlines stored packed.

    Attributes:
        points: ``[P, 3]`` float tensor of all vertices, scanner mm (RAS+), concatenated.
        lengths: ``[S]`` int64 tensor, number of vertices of each streamline.

    Shape:
        ``points``: ``(P, 3)`` with ``P == lengths.sum()``; ``lengths``: ``(S,)``.
    """

    points: torch.Tensor
    lengths: torch.Tensor

    def __post_init__(self) -> None:
        if self.points.ndim != 2 or self.points.shape[-1] != 3:
            raise ShapeError(f"points must be [P, 3], got {tuple(self.points.shape)}")
        if self.lengths.ndim != 1:
            raise ShapeError(f"lengths must be [S], got {tuple(self.lengths.shape)}")
        total = int(self.lengths.sum()) if self.lengths.numel() else 0
        if total != self.points.shape[0]:
            raise ShapeError(f"lengths sum to {total} but there are {self.points.shape[0]} points")

    # -- constructors -------------------------------------------------------------------------
    @classmethod
    def from_list(
        cls,
        lines: Sequence[np.ndarray | torch.Tensor],
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> Streamlines:
        """Build from a sequence of ``[L_i, 3]`` arrays (scanner mm)."""
        if len(lines) == 0:
            return cls.empty(dtype=dtype, device=device)
        arrs = [torch.as_tensor(np.asarray(line), dtype=dtype).reshape(-1, 3) for line in lines]
        lengths = torch.tensor([a.shape[0] for a in arrs], dtype=torch.int64)
        pts = torch.cat(arrs, dim=0)
        return cls(pts.to(device), lengths.to(device))

    @classmethod
    def empty(
        cls, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
    ) -> Streamlines:
        """An empty set (no streamlines)."""
        return cls(
            torch.zeros((0, 3), dtype=dtype, device=device),
            torch.zeros((0,), dtype=torch.int64, device=device),
        )

    @classmethod
    def from_padded(cls, padded: torch.Tensor, lengths: torch.Tensor) -> Streamlines:
        """Build from ``padded [S, L, 3]`` and ``lengths [S]`` (differentiable w.r.t. padded)."""
        if padded.ndim != 3 or padded.shape[-1] != 3:
            raise ShapeError(f"padded must be [S, L, 3], got {tuple(padded.shape)}")
        lengths = lengths.to(device=padded.device, dtype=torch.int64)
        steps = torch.arange(padded.shape[1], device=padded.device)
        mask = steps[None, :] < lengths[:, None]
        return cls(padded[mask], lengths)

    # -- views ---------------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.lengths.shape[0])

    @property
    def offsets(self) -> torch.Tensor:
        """``[S]`` index of the first vertex of each streamline in ``points``."""
        return torch.cumsum(self.lengths, 0) - self.lengths

    @property
    def device(self) -> torch.device:
        return self.points.device

    @property
    def dtype(self) -> torch.dtype:
        return self.points.dtype

    def __getitem__(self, i: int) -> torch.Tensor:
        """The ``[L_i, 3]`` vertices of streamline ``i``."""
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(i)
        start = int(self.offsets[i])
        return self.points[start : start + int(self.lengths[i])]

    def __iter__(self) -> Iterator[torch.Tensor]:
        start = 0
        for length in self.lengths.tolist():
            yield self.points[start : start + length]
            start += length

    def select(self, index: torch.Tensor | Sequence[int] | np.ndarray) -> Streamlines:
        """A subset (or reordering) of streamlines given integer indices or a bool mask."""
        index = torch.as_tensor(np.asarray(index) if not torch.is_tensor(index) else index)
        if index.dtype == torch.bool:
            index = torch.nonzero(index, as_tuple=False).flatten()
        index = index.to(device=self.lengths.device, dtype=torch.int64)
        if index.numel() == 0:
            return Streamlines.empty(dtype=self.dtype, device=self.device)
        lengths = self.lengths[index]
        starts = self.offsets[index]
        point_index = torch.repeat_interleave(
            starts - (torch.cumsum(lengths, 0) - lengths), lengths
        )
        point_index = point_index + torch.arange(int(lengths.sum()), device=lengths.device)
        return Streamlines(self.points[point_index], lengths)

    def to_padded(self, fill: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(padded [S, L, 3], mask [S, L])``; differentiable w.r.t. ``points``."""
        S = len(self)
        L = int(self.lengths.max()) if S else 0
        steps = torch.arange(L, device=self.device)
        mask = steps[None, :] < self.lengths[:, None]
        padded = self.points.new_full((S, L, 3), fill)
        padded = padded.masked_scatter(mask[..., None].expand(S, L, 3), self.points)
        return padded, mask

    def to_list(self) -> list[np.ndarray]:
        """A list of ``[L_i, 3]`` numpy arrays (detached, on CPU)."""
        pts = self.points.detach().cpu().numpy()
        out = []
        start = 0
        for length in self.lengths.tolist():
            out.append(pts[start : start + length])
            start += length
        return out

    def to(self, device=None, dtype=None) -> Streamlines:
        return Streamlines(self.points.to(device=device, dtype=dtype), self.lengths.to(device))

    def segment_lengths(self) -> torch.Tensor:
        """``[S]`` polyline length (mm) of each streamline (differentiable)."""
        if len(self) == 0:
            return self.points.new_zeros(0)
        seg = torch.linalg.norm(self.points[1:] - self.points[:-1], dim=-1)
        ids = torch.repeat_interleave(torch.arange(len(self), device=self.device), self.lengths)
        same = ids[1:] == ids[:-1]
        out = self.points.new_zeros(len(self))
        return out.index_add(0, ids[1:][same], seg[same])
