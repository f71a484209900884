"""invtract.io: images (NIfTI, MRtrix .mif), tractograms (.tck/.trk/.trx) and seed files.

Everything returned is in scanner space (RAS+, mm); see each module for the conventions.
"""

from __future__ import annotations

from .image import (
    Image,
    check_same_grid,
    load_fod,
    load_image,
    load_mask,
    save_mif,
    save_nifti,
)
from .seeds import SeedTable, load_seeds, seeds_from_reference, write_seeds
from .sh_basis import SH_BASES, from_mrtrix_basis, to_mrtrix_basis
from .tractogram import load_tractogram, load_tractogram_header, save_tractogram

__all__ = [
    "Image",
    "load_image",
    "load_fod",
    "load_mask",
    "save_nifti",
    "save_mif",
    "check_same_grid",
    "SH_BASES",
    "to_mrtrix_basis",
    "from_mrtrix_basis",
    "load_tractogram",
    "load_tractogram_header",
    "save_tractogram",
    "SeedTable",
    "load_seeds",
    "write_seeds",
    "seeds_from_reference",
]
