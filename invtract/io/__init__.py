"""invtract.io: images (NIfTI, MRtrix .mif), tractograms (.tck/.trk/.trx) and seed files.

Everything returned is in scanner space (RAS+, mm); see each module for the conventions.
"""

from __future__ import annotations

import importlib

#: public name -> submodule holding it, imported on first use: ``invtract.io.geometry`` (and
#: with it this package) stays light for commands that never read a tractogram with nibabel
_LAZY = {
    **dict.fromkeys(
        ("Image", "check_same_grid", "load_fod", "load_image", "load_mask", "save_mif",
         "save_nifti"), "image",
    ),
    **dict.fromkeys(("SeedTable", "load_seeds", "seeds_from_reference", "write_seeds"), "seeds"),
    **dict.fromkeys(("SH_BASES", "from_mrtrix_basis", "to_mrtrix_basis"), "sh_basis"),
    **dict.fromkeys(
        ("load_tractogram", "load_tractogram_header", "save_tractogram"), "tractogram"
    ),
}  # fmt: skip


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
