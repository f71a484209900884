"""An FOD image on a device, ready for sampling and peak finding: the one FOD type that
carries the coefficients with their geometry (affine, voxel sizes, scanner->voxel)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..errors import ConfigError, ShapeError
from ..io.geometry import scanner2voxel
from .interp import nonzero_rows, sample_fod
from .peaks import mrtrix_peak
from .sh import lmax_from_n

if TYPE_CHECKING:  # annotations only
    from ..io.image import Image

__all__ = ["FODField", "as_fod_field"]


@dataclass
class FODField:
    """SH coefficients on a voxel grid, flattened for gathers: the one FOD type of every API
    (hard tracking, differentiable tracking, the fits), carrying the coefficients with the
    geometry that resolves tckgen's defaults (the header's voxel sizes).

    The coefficients may require grad: :meth:`with_sh` puts learnable coefficients (a tensor,
    not copied) on the same grid, e.g. ``fod.with_sh(torch.where(mask[..., None], learn,
    fixed))``, and the differentiable tracker's gradients reach them through the field.

    Attributes:
        sh_flat: ``[X*Y*Z, K]`` coefficients (MRtrix3 basis, scanner frame); may require grad.
        shape: (X, Y, Z).
        scanner2voxel: ``[3, 4]`` float64 tensor (scanner mm -> voxel coordinates).
        nonzero_flat: ``[X*Y*Z]`` bool, the voxel has a non-zero (or NaN) coefficient.
        lmax: SH degree.
        affine: ``[4, 4]`` float64 numpy, voxel index -> scanner mm (RAS+), when built from
            one (:meth:`from_image`, :meth:`from_array`); None for a field made from a
            scanner->voxel transform alone.
        voxel_sizes: ``(3,)`` voxel sizes in mm that resolve tckgen's defaults (the image
            header's for :meth:`from_image`, the affine's column norms for :meth:`from_array`
            unless given); None for a field made from a scanner->voxel transform alone
            (:attr:`header_voxel_sizes` then derives them).
        learned: ``(voxels [n] int64, rows [n, K])`` of :meth:`with_rows` (``rows`` may
            require grad; ``sh_flat`` holds their values, detached), else None.
    """

    sh_flat: torch.Tensor
    shape: tuple
    scanner2voxel: torch.Tensor
    nonzero_flat: torch.Tensor
    lmax: int
    affine: np.ndarray | None = None
    voxel_sizes: tuple | None = None
    learned: tuple | None = None

    @classmethod
    def from_image(
        cls,
        image: Image,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> FODField:
        """Build from a loaded FOD :class:`~invtract.io.image.Image` (``data`` ``[X, Y, Z, K]``),
        carrying its affine and voxel sizes.

        The coefficients are copied at most once: not at all when ``image.data`` already is a
        C-ordered array of ``dtype`` in memory on the CPU (the field then shares it); once into
        C order otherwise (e.g. a memory-mapped ``.mif`` or an FOD stored as MRtrix stores it,
        ``+1,+2,+3,+0``, since the gathers index voxels in C order).
        """
        return cls.from_array(
            image.data, image.affine, device, dtype, voxel_sizes=image.voxel_sizes, copy=False
        )

    @classmethod
    def from_array(
        cls,
        sh: np.ndarray | torch.Tensor,
        affine: np.ndarray,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        voxel_sizes: tuple | None = None,
        copy: bool = True,
        nonzero: torch.Tensor | None = None,
    ) -> FODField:
        """Build from an ``[X, Y, Z, K]`` array and its ``[4, 4]`` voxel->scanner affine.

        A numpy ``sh`` is copied once into a C-ordered tensor of ``dtype`` (with ``copy=False``
        only if it is not one already: the field may then share it). A tensor ``sh`` is used
        as it is (no copy) unless ``device`` / ``dtype`` ask for another; if it requires grad,
        the field stays differentiable w.r.t. it. ``dtype`` defaults to float32 for numpy
        (tckgen parity) and to the tensor's own, ``device`` to the CPU / the tensor's own.
        ``voxel_sizes`` (mm) default to the affine's column norms. ``nonzero``: the ``[X*Y*Z]``
        bool mask of voxels with any non-zero coefficient, when the caller has it (computed
        otherwise).
        """
        if torch.is_tensor(sh):
            sh_t = sh.to(device=device or sh.device, dtype=dtype or sh.dtype)
        else:
            sh_t = _numpy_to_tensor(sh, dtype or torch.float32, copy).to(device=device or "cpu")
        shape = tuple(int(s) for s in sh_t.shape[:3])
        K = int(sh_t.shape[3])
        flat = sh_t.reshape(-1, K)
        affine = np.array(affine, np.float64)
        s2v = torch.as_tensor(scanner2voxel(affine), device=sh_t.device)
        nonzero = nonzero_rows(flat) if nonzero is None else nonzero.to(flat.device)
        if voxel_sizes is None:
            voxel_sizes = np.linalg.norm(affine[:3, :3], axis=0)
        sizes = tuple(float(v) for v in voxel_sizes[:3])
        return cls(flat, shape, s2v, nonzero, lmax_from_n(K), affine, sizes)

    def with_sh(self, sh: torch.Tensor, changed: torch.Tensor | None = None) -> FODField:
        """The field on the same grid (shape, affine, voxel sizes, scanner->voxel) with the
        coefficients ``sh`` (``[X, Y, Z, K]`` or ``[X*Y*Z, K]``, any dtype / device, may require
        grad): not copied when C-ordered (the field's ``sh_flat`` is a view of it, so gradients
        of anything tracked on the field reach ``sh``).

        The non-zero voxel mask is recomputed from the new values (no grad): over every voxel,
        or, with ``changed`` (``[V]`` flat voxel indices outside which ``sh`` equals this
        field's coefficients, e.g. a fit's learned voxels), over those only."""
        n = int(np.prod(self.shape))
        if tuple(sh.shape[:-1]) not in (tuple(self.shape), (n,)):
            raise ShapeError(
                f"coefficients {tuple(sh.shape)} do not fit the field's grid {tuple(self.shape)}"
            )
        flat = sh.reshape(n, sh.shape[-1])
        if changed is None:
            nonzero = nonzero_rows(flat)
        else:
            nonzero = self.nonzero_flat.to(flat.device, copy=True)
            idx = changed.to(flat.device)
            nonzero[idx] = (flat.detach()[idx] != 0).any(-1)
        s2v = self.scanner2voxel.to(flat.device)
        return dataclasses.replace(
            self, sh_flat=flat, scanner2voxel=s2v, nonzero_flat=nonzero,
            lmax=lmax_from_n(int(sh.shape[-1])), learned=None,
        )  # fmt: skip

    def with_rows(self, voxels: torch.Tensor, rows: torch.Tensor) -> FODField:
        """The field whose coefficients at the flat voxels ``voxels`` (``[n]`` int64,
        distinct) are ``rows`` (``[n, K]``, may require grad), written IN PLACE into this
        field's coefficient buffer (which the caller must own: every field sharing it sees the
        new rows); no copy of the grid.

        The result remembers ``(voxels, rows)`` (:attr:`learned`): the differentiable
        tracker's gradient of the coefficients reaches ``rows`` only (``[n, K]``, computed for
        those voxels alone on the compiled CPU path), not a ``[X*Y*Z, K]`` tensor. The
        non-zero voxel mask is recomputed at ``voxels``."""
        K = self.sh_flat.shape[1]
        if rows.ndim != 2 or rows.shape[1] != K or voxels.shape != rows.shape[:1]:
            raise ShapeError(
                f"rows {tuple(rows.shape)} / voxels {tuple(voxels.shape)} do not fit [n, {K}]"
            )
        flat = self.sh_flat.detach()
        idx = voxels.to(flat.device)
        vals = rows.detach().to(device=flat.device, dtype=flat.dtype)
        flat.index_copy_(0, idx, vals)
        nonzero = self.nonzero_flat.to(flat.device, copy=True)
        nonzero[idx] = (vals != 0).any(-1)
        return dataclasses.replace(self, sh_flat=flat, nonzero_flat=nonzero, learned=(idx, rows))

    def without_rows(self) -> FODField:
        """A field of :meth:`with_rows` as one whose ``sh_flat`` is a new ``[X*Y*Z, K]`` tensor
        differentiable in the rows (one copy of the coefficients); ``self`` for any other."""
        if self.learned is None:
            return self
        voxels, rows = self.learned
        flat = self.sh_flat.detach().index_put((voxels,), rows.to(self.dtype))
        return dataclasses.replace(self, sh_flat=flat, learned=None)

    def detach(self) -> FODField:
        """The field with its coefficients detached from any graph (same storage; ``self``
        when they do not require grad)."""
        if not self.requires_grad:
            return self
        return dataclasses.replace(self, sh_flat=self.sh_flat.detach(), learned=None)

    def to(self, device=None, dtype: torch.dtype | None = None) -> FODField:
        """The field on ``device`` with coefficients of ``dtype`` (``self`` when both already
        are; otherwise one copy of the coefficients, differentiable)."""
        # a concrete device ("cuda" -> "cuda:N", the current one), so that "cuda" and "cuda:0"
        # compare equal instead of costing a copy of the grid
        dev = self.device if device is None else torch.empty(0, device=device).device
        dt = self.dtype if dtype is None else dtype
        if dev == self.device and dt == self.dtype:
            return self
        sh_flat = self.without_rows().sh_flat  # the rows' gradient through a full tensor
        return dataclasses.replace(
            self, sh_flat=sh_flat.to(device=dev, dtype=dt),
            scanner2voxel=self.scanner2voxel.to(dev), nonzero_flat=self.nonzero_flat.to(dev),
            learned=None,
        )  # fmt: skip

    @property
    def requires_grad(self) -> bool:
        rows = self.learned[1] if self.learned is not None else None
        return bool(self.sh_flat.requires_grad or (rows is not None and rows.requires_grad))

    @property
    def voxel2scanner(self) -> np.ndarray:
        """``[4, 4]`` float64 voxel -> scanner mm: the affine, or the inverse of
        ``scanner2voxel`` for a field built without one."""
        if self.affine is not None:
            return np.asarray(self.affine, np.float64)
        s2v = np.asarray(self.scanner2voxel.detach().cpu().numpy(), np.float64)[:3, :4]
        return np.linalg.inv(np.vstack([s2v, [0.0, 0.0, 0.0, 1.0]]))

    @property
    def header_voxel_sizes(self) -> tuple:
        """``(3,)`` voxel sizes (mm) that resolve tckgen's defaults: :attr:`voxel_sizes` (the
        image header's), else the column norms of :attr:`voxel2scanner`."""
        if self.voxel_sizes is not None:
            return tuple(float(v) for v in self.voxel_sizes)
        return tuple(float(v) for v in np.linalg.norm(self.voxel2scanner[:3, :3], axis=0))

    @property
    def sh(self) -> torch.Tensor:
        """``[X, Y, Z, K]`` view of the coefficients."""
        return self.sh_flat.reshape(*self.shape, -1)

    @property
    def device(self) -> torch.device:
        return self.sh_flat.device

    @property
    def dtype(self) -> torch.dtype:
        return self.sh_flat.dtype

    def sample(self, pos_mm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(coeffs [N, K], valid [N])`` at scanner points ``[N, 3]`` (see ``sample_fod``)."""
        return sample_fod(
            self.sh_flat, self.shape, self.scanner2voxel, pos_mm, nonzero_flat=self.nonzero_flat
        )

    def peak(self, coeffs: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """MRtrix peak ascent (no grad): ``(amplitude [N], direction [N, 3])``."""
        return mrtrix_peak(coeffs.detach(), u.detach(), self.lmax)


def as_fod_field(
    fod, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> FODField:
    """The :class:`FODField` of ``fod``: a field (itself, moved to ``device`` / ``dtype`` when
    given), an :class:`~invtract.io.image.Image` (:meth:`FODField.from_image`, float32 unless
    ``dtype``: its voxel sizes are the header's) or ``(sh [X, Y, Z, K], affine [4, 4])``
    (:meth:`FODField.from_array`; voxel sizes the affine's column norms)."""
    if isinstance(fod, FODField):
        return fod.to(device, dtype)
    dev = "cpu" if device is None else device
    dt = torch.float32 if dtype is None else dtype
    if hasattr(fod, "data") and hasattr(fod, "affine") and hasattr(fod, "voxel_sizes"):
        return FODField.from_image(fod, dev, dt)
    if isinstance(fod, tuple) and len(fod) == 2:
        return FODField.from_array(fod[0], fod[1], dev, dt, copy=False)
    hint = ""
    if torch.is_tensor(fod) or isinstance(fod, np.ndarray):  # the pre-FODField calling form
        hint = (
            ": bare coefficients carry no geometry; pass FODField.from_array(sh, affine) "
            "(or the tuple (sh, affine)) instead of sh, affine"
        )
    raise ConfigError(
        f"expected an FODField, an Image or (sh, affine) as the FOD, got {type(fod).__name__}"
        + hint
    )


def _numpy_to_tensor(sh: np.ndarray, dtype: torch.dtype, copy: bool) -> torch.Tensor:
    """One C-ordered CPU tensor of ``dtype`` from a numpy array: one copy at most (none when
    ``copy`` is False and ``sh`` is already such an array in memory)."""
    np_dtype = torch.empty((), dtype=dtype).numpy().dtype
    arr = np.asarray(sh)
    mapped = isinstance(arr, np.memmap) or isinstance(arr.base, np.memmap)
    if not copy and not mapped and arr.dtype == np_dtype and arr.flags.c_contiguous:
        if arr.flags.writeable:
            return torch.from_numpy(arr)
    out = torch.empty(arr.shape, dtype=dtype)
    out.numpy()[...] = arr  # any strides / dtype, straight into the result
    return out
