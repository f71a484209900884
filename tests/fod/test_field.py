"""FODField: one FOD type carrying coefficients, affine and voxel sizes; built from an Image
with at most one copy."""

from __future__ import annotations

import numpy as np
import torch

from invtract.fod.field import FODField
from invtract.io.geometry import scanner2voxel
from invtract.io.image import Image, load_fod


def _image(data: np.ndarray) -> Image:
    affine = np.array(
        [[1.8, -0.87, 0.1, -5.0], [0.87, 1.8, 0.2, 2.0], [-0.1, -0.2, -2.0, 7.0], [0, 0, 0, 1]]
    )
    return Image(data, affine, (2.0, 2.1, 2.2), None)


def test_from_image_carries_geometry_and_shares_c_ordered_data():
    data = np.random.default_rng(0).standard_normal((4, 5, 6, 15)).astype(np.float32)
    img = _image(data)
    f = FODField.from_image(img)
    assert np.shares_memory(f.sh_flat.numpy(), data)  # no copy
    assert f.voxel_sizes == (2.0, 2.1, 2.2) and f.lmax == 4 and f.shape == (4, 5, 6)
    np.testing.assert_array_equal(f.affine, img.affine)
    np.testing.assert_array_equal(f.scanner2voxel.numpy(), scanner2voxel(img.affine))
    np.testing.assert_array_equal(f.sh.numpy(), data)


def test_from_image_mrtrix_layout_is_copied_once_into_c_order():
    data = np.random.default_rng(1).standard_normal((4, 5, 6, 6)).astype(np.float32)
    stored = np.ascontiguousarray(data.transpose(2, 1, 0, 3)).transpose(2, 1, 0, 3)  # +1,+2,+3,+0
    f = FODField.from_image(_image(stored))
    assert not np.shares_memory(f.sh_flat.numpy(), stored) and f.sh_flat.is_contiguous()
    np.testing.assert_array_equal(f.sh.numpy(), data)
    f64 = FODField.from_image(_image(data), dtype=torch.float64)
    assert f64.dtype == torch.float64
    np.testing.assert_array_equal(f64.sh.numpy(), data.astype(np.float64))


def test_from_array_copies_numpy_and_defaults_voxel_sizes():
    data = np.ones((3, 3, 3, 1), np.float32)
    affine = np.diag([2.0, 3.0, 4.0, 1.0])
    f = FODField.from_array(data, affine)
    data[...] = 5.0  # the field holds its own copy
    assert float(f.sh_flat.max()) == 1.0
    assert f.voxel_sizes == (2.0, 3.0, 4.0)
    sh = torch.ones((3, 3, 3, 1), dtype=torch.float64, requires_grad=True)
    g = FODField.from_array(sh, affine, dtype=torch.float64)
    assert g.sh_flat.requires_grad and g.sh_flat.data_ptr() == sh.data_ptr()


def test_from_image_of_loaded_nifti_samples_as_from_array(shared_data):
    img = load_fod(shared_data / "real_msmt15" / "fod.nii.gz")
    a = FODField.from_image(img)
    b = FODField.from_array(np.ascontiguousarray(img.data), img.affine)
    assert a.voxel_sizes == tuple(img.voxel_sizes) and a.affine is not None
    vox = np.array([[5.2, 7.3, 3.1, 1.0], [9.5, 4.4, 6.9, 1.0]])  # voxel coordinates
    pts = torch.as_tensor((vox @ img.affine.T)[:, :3])
    ca, va = a.sample(pts.float())
    cb, vb = b.sample(pts.float())
    assert va.all() and torch.equal(ca, cb) and torch.equal(va, vb)


def test_nonzero_rows_in_chunks_equals_the_one_shot_mask(monkeypatch):
    """The non-zero voxel mask is computed in chunks (a whole brain's one-shot ``[N, K]`` bool
    temporary would be 432 MB), calling ``after_chunk`` after each."""
    from invtract.fod import interp

    g = torch.Generator().manual_seed(0)
    flat = torch.randn(1000, 15, generator=g)
    flat[torch.rand(1000, generator=g) < 0.3] = 0
    flat[5, :14] = 0  # one non-zero coefficient is enough
    monkeypatch.setattr(interp, "NONZERO_CHUNK", 64)
    calls = []
    got = interp.nonzero_rows(flat, after_chunk=lambda: calls.append(1))
    assert torch.equal(got, (flat != 0).any(-1)) and bool(got[5])
    assert 250 < int((~got).sum()) < 350 and len(calls) == 16
