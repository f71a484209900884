"""Expected-endpoint soft connectome: reduces to soft_connectome for hard weights; gradients."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from invtract.io.image import load_image
from invtract.losses.connectome import expected_endpoint_connectome, soft_connectome

PARC = Path(__file__).resolve().parents[1] / "data" / "connectome" / "phantom_cross90_parc.nii.gz"


def _labels():
    img = load_image(PARC)
    return np.asarray(img.data).astype(np.int64), img.affine


def _lines(n=6, length=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    start = torch.rand(n, 1, 3, generator=g, dtype=torch.float64) * 40 - 20
    start[..., 2] = 0.0
    d = torch.randn(n, 1, 3, generator=g, dtype=torch.float64)
    d[..., 2] = 0
    d = d / d.norm(dim=-1, keepdim=True)
    t = torch.arange(length, dtype=torch.float64)[None, :, None]
    return start + 0.7 * t * d


def test_hard_weights_equal_soft_connectome():
    labels = _labels()
    pts = _lines()
    mask = torch.ones(pts.shape[:2], dtype=torch.bool)
    mask[0, 30:] = False
    lengths = mask.sum(1)
    seed_index = lengths // 3
    a = expected_endpoint_connectome(pts, mask, mask.double(), seed_index, labels, 0.7)
    b = soft_connectome(pts, lengths, labels, 0.7)
    torch.testing.assert_close(a, b)


def test_end_mass_moves_with_weights_and_gradcheck():
    labels = _labels()
    pts = _lines(n=3, length=30).requires_grad_(True)
    mask = torch.ones(pts.shape[:2], dtype=torch.bool)
    w = torch.rand(pts.shape[:2], dtype=torch.float64).sort(1, descending=True).values
    w = w.requires_grad_(True)
    seed = torch.zeros(3, dtype=torch.int64)

    def f(p, ww):
        return expected_endpoint_connectome(p, mask, ww, seed, labels, 1.0, tail=8).sum()

    assert torch.autograd.gradcheck(f, (pts, w), atol=1e-6)
    total = expected_endpoint_connectome(pts, mask, w, seed, labels, 1.0).sum()
    # with keep_unassigned the total mass is sum of seed weights
    full = expected_endpoint_connectome(pts, mask, w, seed, labels, 1.0, keep_unassigned=True)
    torch.testing.assert_close(full.sum(), w[:, 0].sum())
    assert float(total.detach()) <= float(w[:, 0].detach().sum()) + 1e-9
