"""Tractogram files (.tck, .trk, .trx) <-> Streamlines in scanner mm.

PLACEHOLDER: minimal .tck read via nibabel; the io helper replaces it.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np

from ..streamlines import Streamlines

__all__ = ["load_tractogram"]


def load_tractogram(path, reference=None) -> Streamlines:
    tck = nib.streamlines.load(str(path))
    return Streamlines.from_list([np.asarray(s, np.float32) for s in tck.streamlines])
