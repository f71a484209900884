"""numpy / torch interchange that does not import torch.

Modules on the torch-free path (``invtract track`` with the compiled CPU engine, the readers and
writers) accept tensors where they accept arrays; a value can only be a tensor if torch is
already imported, so they test for one without importing it (about a second at start-up).
"""

from __future__ import annotations

import sys

import numpy as np

__all__ = ["is_tensor", "to_numpy"]


def is_tensor(x) -> bool:
    """True when ``x`` is a torch tensor (False without importing torch when it is not loaded)."""
    torch = sys.modules.get("torch")
    return torch is not None and torch.is_tensor(x)


def to_numpy(x) -> np.ndarray:
    """``x`` as a numpy array (tensors are detached and moved to the CPU)."""
    if is_tensor(x):
        return x.detach().cpu().numpy()
    return np.asarray(x)
