"""Images: FODs and masks from NIfTI (nibabel) and MRtrix ``.mif`` / ``.mih`` / ``.mif.gz``.

Every image comes back as an :class:`Image` in the geometry MRtrix3 3.0.3 gives it when it
opens the file, to the last bit, so that tracking on it reproduces tckgen exactly: a numpy
array in MRtrix's voxel order ``(i, j, k, vol)`` -- the file's axes permuted and flipped
towards RAS as ``Header::realign_transform`` does -- plus the ``[4, 4]`` affine that maps
those voxel indices (voxel centres at integers) to scanner mm (RAS+), built as
``transform * diag(voxel_sizes)`` from MRtrix's unit-column header transform. For NIfTI the
transform is read as MRtrix reads it (normalised float32 sform columns and ``pixdim``, or the
qform; :mod:`invtract.io.nifti_transform`), which differs from nibabel's raw ``img.affine`` in
the last float32 bits; for ``.mif`` it is the header's ``transform``/``vox`` with any
``layout`` (strides). See :mod:`invtract.io.geometry`.

Convention: spec sections 1.1 (FOD input, SH count check), 1.4 (transform, voxel sizes) and
4.1 (mask voxel truth value); MRtrix3 ``core/math/SH.h`` (``Math::SH::check``),
``core/image_io/fetch_store.cpp`` (float -> bool).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..arrays import to_numpy
from ..errors import FormatError, ShapeError
from .geometry import MRtrixGeometry, realign, sanitise_transform, scanner2voxel
from .mif import MIF_SUFFIXES, atomic_output, read_mif, write_mif
from .nifti_transform import nifti_transform
from .sh_basis import _check_basis, lmax_for_n, to_mrtrix_basis, valid_sh_counts
from .voxel_major import (
    copy_voxel_major,
    is_voxel_major,
    masked_voxel_values,
    read_masked_volumes,
    read_voxel_major,
    scaled_float32,
)

if TYPE_CHECKING:  # annotations only
    import nibabel as nib
    import torch

__all__ = [
    "Image",
    "load_image",
    "ImageFile",
    "open_image",
    "load_fod",
    "load_mask",
    "save_nifti",
    "save_mif",
    "check_same_grid",
    "NIFTI_SUFFIXES",
    "IMAGE_SUFFIXES",
]

NIFTI_SUFFIXES = (".nii", ".nii.gz")
IMAGE_SUFFIXES = NIFTI_SUFFIXES + MIF_SUFFIXES

#: Affine tolerance (mm) for "same grid" checks.
GRID_ATOL_MM = 1e-4


@dataclass
class Image:
    """A 3-D or 4-D image on a voxel grid.

    Attributes:
        data: ``[X, Y, Z]`` or ``[X, Y, Z, K]`` array (float32 for FODs, bool for masks).
        affine: ``[4, 4]`` float64, voxel indices (centres at integers) -> scanner mm (RAS+).
        voxel_sizes: ``(3,)`` voxel sizes in mm (NIfTI pixdim / MRtrix ``vox``).
        path: source file, if any.
        transform: ``[3, 4]`` float64 image->scanner transform with unit-norm columns as
            MRtrix3 holds it (``affine`` is ``transform * diag(voxel_sizes)``), for images read
            from a file; None otherwise.
    """

    data: np.ndarray
    affine: np.ndarray
    voxel_sizes: tuple
    path: str | None = None
    transform: np.ndarray | None = None

    @property
    def shape(self) -> tuple:
        """Shape of ``data``."""
        return self.data.shape

    @property
    def scanner2voxel(self) -> np.ndarray:
        """``[3, 4]`` float64 inverse of the affine (scanner mm -> voxel index), computed as
        MRtrix3 does (Eigen's cofactor inverse, :func:`invtract.io.geometry.scanner2voxel`)."""
        return scanner2voxel(self.affine)


def _suffix(path: str) -> str:
    low = path.lower()
    for suf in (".nii.gz", ".mif.gz"):
        if low.endswith(suf):
            return suf
    return os.path.splitext(low)[1]


def _mif_logical(data: np.ndarray, header) -> np.ndarray:
    """Undo :func:`invtract.io.mif.read_mif`'s storage order: spatial axes back in the
    header's logical order and direction (a view)."""
    n_sp = min(3, data.ndim)
    ranks = [abs(v) - 1 for v in header.layout[:n_sp]]
    spatial = sorted(range(n_sp), key=lambda a: ranks[a])  # storage position p <- axis
    for p, a in enumerate(spatial):
        if header.layout[a] < 0:
            data = np.flip(data, axis=p)
    order = [spatial.index(a) for a in range(n_sp)] + list(range(n_sp, data.ndim))
    return np.transpose(data, order)


def _pad3(values, fill) -> list:
    values = list(values)[:3]
    return values + [fill] * (3 - len(values))


def _read_raw(
    path: str | os.PathLike,
    voxel_major: bool = False,
    header_only: bool = False,
    scratch=False,
) -> tuple[np.ndarray, MRtrixGeometry, tuple, str]:
    """``(data, geometry, (inter, slope), path)``: data in the axis order MRtrix3 uses after
    opening the image (:func:`invtract.io.geometry.realign`), no scaling applied -- except
    that with ``voxel_major`` a 4-D NIfTI is read block by block into a voxel-major float32
    array (:func:`invtract.io.voxel_major.read_voxel_major`),
    already scaled (scaling ``(0.0, 1.0)`` is returned). With ``header_only`` the realigned
    shape comes in place of the data (a NIfTI's data unread; a ``.mif``'s mapped, unread).
    ``scratch``: passed to :func:`~invtract.io.voxel_major.read_voxel_major`."""
    path = str(path)
    if os.path.isdir(path):
        raise FormatError(f"{path}: is a directory, not an image file")
    suffix = _suffix(path)
    if suffix not in IMAGE_SUFFIXES:
        raise FormatError(
            f"{path}: unsupported image format {suffix or '(no extension)'!r}; "
            f"supported: {', '.join(IMAGE_SUFFIXES)}"
        )
    if not os.path.isfile(path):
        raise FormatError(f"{path}: no such file")
    img = None
    if suffix in MIF_SUFFIXES:
        data, _, _, header = read_mif(path)
        data = _mif_logical(data, header)
        transform, spacing = header.transform, _pad3(header.vox, 1.0)
        scaling = header.scaling
        shape = _pad3(data.shape, 1)
    else:
        img, transform, spacing, scaling = _open_nifti(path)
        shape = _pad3(img.shape, 1)
    if not (np.all(np.isfinite(transform)) and np.all(np.isfinite(spacing))):
        raise FormatError(f"{path}: image transform is not finite:\n{transform}")
    transform, spacing = sanitise_transform(transform, spacing)
    geometry = realign(transform, spacing, shape)
    if header_only:  # the shape in place of the data
        full = img.shape if img is not None else data.shape
        return tuple(geometry.shape[: len(full)]) + tuple(full[3:]), geometry, scaling, path
    if img is not None:
        if voxel_major and len(img.shape) == 4:
            data = _nifti_call(path, read_voxel_major, img, geometry, scaling, path, scratch)
            return data, geometry, (0.0, 1.0), path
        data = _nifti_call(path, lambda: np.asanyarray(img.dataobj.get_unscaled()))
    if data.ndim < 3:  # not an image we can track on; callers raise their shape errors
        return data, geometry, scaling, path
    return geometry.reorient(data), geometry, scaling, path


def _nifti_call(path: str, fn, *args):
    """``fn(*args)``, nibabel's many error types (ImageFileError, EOFError, ...) raised as
    :class:`FormatError` naming the file."""
    try:
        return fn(*args)
    except FormatError:
        raise
    except Exception as err:
        raise FormatError(
            f"{path}: cannot read NIfTI image ({type(err).__name__}: {err})"
        ) from err


def _open_nifti(path: str) -> tuple[nib.Nifti1Image, np.ndarray, tuple, tuple]:
    """``(image with its data unread, header transform [3, 4], spacing, (inter, slope))``."""

    import nibabel as nib  # here: commands that read no NIfTI never import it

    def open_() -> tuple:
        img = nib.load(path)
        if not isinstance(img.header, nib.Nifti1Header):  # Nifti2Header subclasses it
            raise FormatError(f"{path}: not a NIfTI-1/2 header ({type(img.header).__name__})")
        return img, img.dataobj.slope, img.dataobj.inter, nifti_transform(img.header)

    img, slope, inter, (transform, spacing) = _nifti_call(path, open_)
    slope = 1.0 if slope is None or not np.isfinite(slope) or slope == 0 else float(slope)
    inter = 0.0 if inter is None or not np.isfinite(inter) else float(inter)
    return img, transform, spacing, (inter, slope)


def load_image(path: str | os.PathLike, scratch: bool | str | os.PathLike = False) -> Image:
    """Load a NIfTI or MRtrix image as float32.

    Args:
        path: ``.nii``, ``.nii.gz``, ``.mif``, ``.mih`` (data file next to it) or ``.mif.gz``.
        scratch: True (the temporary folder, ``TMPDIR``) or a folder: a large 4-D NIfTI is
            read into a scratch array there (:mod:`invtract.io.scratch`: resident only where
            touched), not into memory.

    Returns:
        :class:`Image` with float32 ``data`` (intensity scaling -- NIfTI ``scl_slope`` /
        ``scl_inter``, MRtrix ``scaling`` -- applied), ``affine`` voxel index -> scanner mm
        (RAS+) and voxel sizes in mm.

    Raises:
        FormatError: unknown extension, missing or unreadable/malformed file (names the path).
    """
    raw, geo, scaling, path = _read_raw(path, voxel_major=True, scratch=scratch)
    identity = scaling == (0.0, 1.0) and raw.dtype == np.float32
    if raw.ndim == 4 and not (identity and is_voxel_major(raw)):
        # the tracker's layout, made once in slabs (a 4-D NIfTI already is: read in blocks)
        data = copy_voxel_major(raw, scaling)
    else:
        # kept as it is: a memory-mapped float32 .mif in voxel order is not copied (nothing
        # is read until tracking touches it); 3-D images are small
        data = scaled_float32(raw, scaling)
        if any(s < 0 for s in data.strides):  # torch takes no negative strides
            data = np.ascontiguousarray(data)
    return Image(data, geo.voxel2scanner, geo.spacing, path, geo.transform)


@dataclass(frozen=True)
class ImageFile:
    """A 4-D image file opened for reading parts of it (e.g. one shell of a whole-brain DWI):
    ``shape`` and ``affine`` as :func:`load_image` would give them, no data read yet.

    Attributes:
        path: the file.
        shape: ``(X, Y, Z, N)`` realigned shape.
        affine: ``[4, 4]`` voxel index -> scanner mm (RAS+).
    """

    path: str
    shape: tuple
    affine: np.ndarray

    def voxel_values(
        self, volumes: np.ndarray, mask: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(values [U, n] float32, index [U] int64)`` of ``volumes`` at the voxels inside
        ``mask [X, Y, Z]`` whose values are all finite, in C order of the grid (``index``:
        flat indices; :func:`~invtract.io.voxel_major.masked_voxel_values`).

        Read slab by slab: a ``.mif`` or an uncompressed NIfTI stays memory-mapped, its pages
        released after each slab; a ``.nii.gz`` is read front to back once, keeping only
        ``volumes`` at the mask's voxels (:func:`~invtract.io.voxel_major.read_masked_volumes`).
        The whole image is never held.
        """
        volumes = np.asarray(volumes, dtype=np.int64)
        if volumes.size and (volumes.min() < 0 or volumes.max() >= self.shape[3]):
            raise ShapeError(f"{self.path}: has {self.shape[3]} volumes, not {volumes.tolist()}")
        if self.path.lower().endswith(".nii.gz"):  # no mapping: one pass through the stream
            _, geo, scaling, _ = _read_raw(self.path, header_only=True)
            img = _open_nifti(self.path)[0]
            args = (img, geo, scaling, self.path, volumes, mask)
            return _nifti_call(self.path, read_masked_volumes, *args)
        raw, _, scaling, _ = _read_raw(self.path)
        return masked_voxel_values(raw, volumes, mask, scaling)


def open_image(path: str | os.PathLike) -> ImageFile:
    """:class:`ImageFile` of a 4-D image (its header read, not its data; a ``.mif.gz`` is
    decompressed).

    Raises:
        FormatError: as :func:`load_image`.
        ShapeError: not 4-D.
    """
    shape, geo, _, path = _read_raw(path, header_only=True)
    if len(shape) != 4:
        raise ShapeError(f"{path}: a 4-D image is needed, got shape {shape}")
    return ImageFile(path, shape, geo.voxel2scanner)


def _check_affine(affine: np.ndarray, path: str | None) -> None:
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise FormatError(f"{path}: image affine is not finite:\n{affine}")
    det = float(np.linalg.det(affine[:3, :3]))
    scale = float(np.prod(np.linalg.norm(affine[:3, :3], axis=0)))
    if scale == 0.0 or abs(det) <= 1e-8 * scale:
        raise FormatError(f"{path}: image affine is singular (det {det:g}):\n{affine}")


def load_fod(
    path: str | os.PathLike, sh_basis: str = "mrtrix", scratch: bool | str | os.PathLike = False
) -> Image:
    """Load and validate a spherical-harmonic FOD image.

    NaN voxels are kept (the tracker treats them as "no data", as MRtrix does).

    Args:
        path: 4-D image file (see :func:`load_image`), 4th axis = SH coefficients.
        sh_basis: coefficient convention of the file, one of
            :data:`invtract.io.sh_basis.SH_BASES`; converted to MRtrix3's basis. Directions
            stay in the image's own frame (MRtrix FODs are in scanner space).
        scratch: see :func:`load_image`.

    Returns:
        :class:`Image` with float32 ``data`` ``[X, Y, Z, K]`` in the MRtrix3 SH basis.

    Shape:
        ``data``: ``(X, Y, Z, K)`` with K = (lmax+1)(lmax+2)/2, lmax even.

    Raises:
        FormatError: missing/unreadable file, singular or non-finite affine.
        ShapeError: not 4-D, or K is not a valid SH coefficient count.
        ConfigError: unknown ``sh_basis``.

    Convention:
        ``Math::SH::check`` (core/math/SH.h): 4-D and N == (lmax+1)(lmax+2)/2, lmax even.
    """
    _check_basis(sh_basis)
    image = load_image(path, scratch)
    if image.data.ndim != 4:
        raise ShapeError(
            f"{image.path}: FOD image must be 4-D [X, Y, Z, K] (SH coefficients on the 4th "
            f"axis), got shape {image.data.shape}"
        )
    K = image.data.shape[3]
    if lmax_for_n(K) is None:
        raise ShapeError(
            f"{image.path}: {K} volumes is not a spherical-harmonic coefficient count; "
            f"valid counts (lmax 0, 2, 4, ...) are "
            f"{', '.join(str(n) for n in valid_sh_counts())}"
        )
    _check_affine(image.affine, image.path)
    if sh_basis not in ("mrtrix", "tournier07"):
        image.data = _to_mrtrix_basis_in_place(image.data, sh_basis)
    return image


def _to_mrtrix_basis_in_place(data: np.ndarray, sh_basis: str) -> np.ndarray:
    """``data`` ``[X, Y, Z, K]`` float32 re-expressed in MRtrix3's SH basis slab by slab in
    place (a private copy first if it is read-only): no full-size temporary, layout kept."""
    if not data.flags.writeable:
        data = copy_voxel_major(data)
    from .scratch import release

    step = max(1, 2**22 // max(1, data.shape[0] * data.shape[1] * data.shape[3]))
    for z0 in range(0, data.shape[2], step):
        slab = data[:, :, z0 : z0 + step]
        slab[...] = to_mrtrix_basis(slab, sh_basis)
        release(data)  # a scratch array's pages (nothing for an array in memory)
    return data


def load_mask(path: str | os.PathLike) -> Image:
    """Load a mask / ROI as a boolean image.

    A floating-point (or intensity-scaled) voxel is true iff it is finite and
    ``|v| >= 0.5`` (i.e. ``round(v) != 0``); an integer or bit voxel is true iff non-zero.

    Args:
        path: 3-D image, or 4-D with a single volume (see :func:`load_image`).

    Returns:
        :class:`Image` with bool ``data`` ``[X, Y, Z]``.

    Raises:
        FormatError: missing/unreadable file, singular or non-finite affine.
        ShapeError: not 3-D (or 4-D with one volume).

    Convention:
        ``core/image_io/fetch_store.cpp`` (float to bool conversion), spec section 4.1.
    """
    raw, geo, scaling, path = _read_raw(path)
    affine = geo.voxel2scanner
    if raw.ndim == 4 and raw.shape[3] == 1:
        raw = raw[..., 0]
    if raw.ndim != 3:
        raise ShapeError(
            f"{path}: mask must be 3-D (or 4-D with one volume), got shape {raw.shape}"
        )
    _check_affine(affine, path)
    identity = scaling == (0.0, 1.0)
    if identity and (raw.dtype == bool or raw.dtype.kind in "iu"):
        data = raw != 0
    else:
        values = scaled_float32(raw, scaling)
        with np.errstate(invalid="ignore"):
            data = np.isfinite(values) & (np.abs(values) >= 0.5)
    return Image(np.ascontiguousarray(data, dtype=bool), affine, geo.spacing, path, geo.transform)


def check_same_grid(a: Image, b: Image, what: str) -> None:
    """Raise if two images are not on the same voxel grid.

    Args:
        a: first image.
        b: second image.
        what: description used in the message, e.g. ``"mask vs FOD"``.

    Raises:
        ShapeError: spatial shapes differ, or affines differ by more than 1e-4 mm
            ("affine mismatch").
    """
    sa, sb = tuple(a.shape[:3]), tuple(b.shape[:3])
    if sa != sb:
        raise ShapeError(
            f"{what}: grid mismatch, spatial shapes {sa} ({a.path}) and {sb} ({b.path}) differ"
        )
    if not np.allclose(a.affine, b.affine, rtol=0.0, atol=GRID_ATOL_MM):
        diff = float(np.max(np.abs(np.asarray(a.affine) - np.asarray(b.affine))))
        raise ShapeError(
            f"{what}: affine mismatch (max difference {diff:.3g} mm > {GRID_ATOL_MM} mm) "
            f"between {a.path} and {b.path}:\n{np.asarray(a.affine)}\nvs\n{np.asarray(b.affine)}"
        )


def _like_header(like: Image | str | os.PathLike | None) -> nib.Nifti1Header | None:
    if like is None:
        return None
    src = like.path if isinstance(like, Image) else str(like)
    if src is None or _suffix(src) not in NIFTI_SUFFIXES or not os.path.isfile(src):
        return None
    import nibabel as nib

    try:
        hdr = nib.load(src).header
    except Exception:  # a header we cannot read is simply not reused
        return None
    return hdr.copy() if isinstance(hdr, nib.Nifti1Header) else None


def save_nifti(
    path: str | os.PathLike,
    data: np.ndarray | torch.Tensor,
    affine: np.ndarray,
    like: Image | str | os.PathLike | None = None,
    *,
    overwrite: bool = True,
) -> None:
    """Write a NIfTI image atomically (temporary file in the same folder, then ``os.replace``).

    Args:
        path: ``.nii`` or ``.nii.gz`` output.
        data: ``[X, Y, Z]`` or ``[X, Y, Z, K]`` array or tensor (detached, moved to CPU).
            Floats are written as float32, bools as uint8.
        affine: ``[4, 4]`` voxel index -> scanner mm (RAS+); stored as sform and qform.
        like: image (or NIfTI file) whose header is reused (description, units, codes,
            xyzt); must be on the same grid as ``affine``.
        overwrite: if False, refuse to replace an existing file.

    Raises:
        FormatError: ``path`` is not a NIfTI name; ``path`` exists and ``overwrite`` is False.
        ShapeError: ``like`` is on a different grid.
    """
    path = str(path)
    suffix = _suffix(path)
    if suffix not in NIFTI_SUFFIXES:
        raise FormatError(f"{path}: save_nifti needs a .nii or .nii.gz file name")
    if not overwrite and os.path.lexists(path):
        raise FormatError(f"{path}: output exists (pass overwrite=True to replace it)")
    arr = to_numpy(data)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    elif arr.dtype.kind == "f":
        arr = arr.astype(np.float32, copy=False)
    affine = np.asarray(affine, dtype=np.float64)
    _check_affine(affine, path)
    if isinstance(like, Image):
        check_same_grid(Image(arr, affine, (), path), like, f"save_nifti({path})")
    import nibabel as nib

    header = _like_header(like)
    if header is not None:
        header.set_data_dtype(arr.dtype)
    img = nib.Nifti1Image(arr, affine, header=header)
    s_code = int(header["sform_code"]) if header is not None else 0
    q_code = int(header["qform_code"]) if header is not None else 0
    img.set_sform(affine, code=s_code if s_code > 0 else 1)
    img.set_qform(affine, code=q_code if q_code > 0 else 1)
    img.header.set_slope_inter(1.0, 0.0)
    with atomic_output(path, suffix=suffix) as tmp:
        if _is_scratch_volumes(arr):
            _save_released(img, arr, tmp)
        else:
            nib.save(img, tmp)


#: volumes of a scratch array gathered per pass of :func:`_save_released`
SAVE_VOLUME_GROUP = 5


def _is_scratch_volumes(arr: np.ndarray) -> bool:
    from .scratch import is_scratch

    return arr.ndim == 4 and arr.flags.c_contiguous and is_scratch(arr)


def _save_released(img, arr: np.ndarray, tmp: str) -> None:
    """``nib.save(img, tmp)`` for a C-ordered ``[X, Y, Z, K]`` scratch array (the same bytes)
    without faulting the whole array into memory: NIfTI stores volume after volume (x fastest),
    so each pass gathers :data:`SAVE_VOLUME_GROUP` volumes from x-slabs, releasing the
    array's pages after each slab, and writes them; memory: the group, not the array."""
    from nibabel.openers import Opener
    from nibabel.volumeutils import seek_tell

    from .voxel_major import released_slabs

    img.update_header()
    hdr = img.header
    X, Y, Z, K = arr.shape
    with Opener(tmp, "wb") as f:
        hdr.write_to(f)
        seek_tell(f, hdr.get_data_offset(), write0=True)
        for k0 in range(0, K, SAVE_VOLUME_GROUP):
            k1 = min(K, k0 + SAVE_VOLUME_GROUP)
            group = np.empty((k1 - k0, Z, Y, X), np.float32)  # the file's order, C-ordered
            for sl, _ in released_slabs(arr):
                group[..., sl[0]] = arr[sl][..., k0:k1].transpose(3, 2, 1, 0)
            f.write(memoryview(group).cast("B"))


def save_mif(path: str | os.PathLike, image: Image, *, overwrite: bool = True) -> None:
    """Write an :class:`Image` as MRtrix ``.mif`` / ``.mif.gz`` (atomically).

    Args:
        path: output file name.
        image: image to write; bool data become ``Bit``, floats ``Float32LE``.
        overwrite: if False, refuse to replace an existing file.

    Raises:
        FormatError: bad suffix, singular affine, or existing file with ``overwrite=False``.
    """
    path = str(path)
    if not overwrite and os.path.lexists(path):
        raise FormatError(f"{path}: output exists (pass overwrite=True to replace it)")
    write_mif(Path(path), to_numpy(image.data), np.asarray(image.affine, dtype=np.float64))
