"""Whole-brain fits hold the FOD once: one C-ordered float32 copy (a mapped file's pages
released while copying), then views only -- the problem's state, its field, every tracking
call (issue 14 item 3)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from invtract.fit.optimise import build_problem, c_order_fod, fod_field, resolve_config
from invtract.io.image import load_fod
from invtract.tracking.differentiable import track_differentiable


def _mapped_rss_kb(path: str) -> int:
    """Resident kB of this process's mappings of ``path`` (``/proc/self/smaps``)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if head and "-" in head[0] and len(head) >= 5 and ":" in head[3]:
                inside = len(head) >= 6 and head[-1] == path
            elif inside and line.startswith("Rss:"):
                total += int(head[1])
    return total


def _write_voxel_major_mif(path: str, data: np.ndarray, vox: float) -> None:
    """``data`` ``[X, Y, Z, K]`` as a ``.mif`` in MRtrix's own FOD layout ``+1,+2,+3,+0``
    (coefficients contiguous per voxel, then x, y, z): ``load_fod`` maps it, no copy."""
    x, y, z, k = data.shape
    lines = ["mrtrix image", f"dim: {x},{y},{z},{k}", f"vox: {vox},{vox},{vox},1",
             "layout: +1,+2,+3,+0", "datatype: Float32LE", f"transform: {vox},0,0,0",
             f"transform: 0,{vox},0,0", f"transform: 0,0,{vox},0"]  # fmt: skip
    head = "\n".join(lines) + "\nfile: . "
    offset = -(-(len(head) + 16) // 16) * 16  # room for the number and END, 16-byte aligned
    text = (head + f"{offset}\nEND\n").encode()
    with open(path, "wb") as f:
        f.write(text + b"\0" * (offset - len(text)))
        f.write(np.ascontiguousarray(data.transpose(2, 1, 0, 3), "<f4").tobytes())


@pytest.fixture
def mapped_fod(tmp_path):
    """A ``.mif`` FOD in MRtrix's FOD layout (x fastest after the coefficients: not C-ordered)
    that ``load_fod`` returns as a memory map."""
    rng = np.random.default_rng(0)
    data = rng.standard_normal((24, 20, 18, 15)).astype(np.float32)
    path = str(tmp_path / "fod.mif")
    _write_voxel_major_mif(path, data, 1.5)
    return path, data


def test_c_order_fod_copies_once_and_releases_the_mapped_pages(mapped_fod):
    path, data = mapped_fod
    img = load_fod(path)
    np.testing.assert_array_equal(np.asarray(img.data), data)
    assert not img.data.flags.c_contiguous
    float(np.asarray(img.data).sum())  # every page of the mapping resident
    before = _mapped_rss_kb(path)
    assert before >= data.nbytes // 1024 // 2
    out = c_order_fod(img.data)
    assert out.flags.c_contiguous and out.dtype == np.float32
    np.testing.assert_array_equal(out, data)
    assert _mapped_rss_kb(path) < before // 4  # released slab by slab
    np.testing.assert_array_equal(np.asarray(img.data), data)  # the map still reads back
    assert c_order_fod(out) is out  # already C-ordered float32: no copy


def test_fod_field_of_a_mapped_mif_is_one_c_ordered_copy_with_the_header(mapped_fod):
    """A ``.mif`` stored as MRtrix stores FODs (``+1,+2,+3,+0``) becomes the fit's field by
    one copy into C order (the map's pages released), carrying the header's voxel sizes;
    the field then passes through ``fod_field`` (and so ``fit``) without another."""
    path, data = mapped_fod
    img = load_fod(path)
    field = fod_field(img)
    assert field.sh_flat.is_contiguous() and field.dtype == torch.float32
    assert not np.shares_memory(field.sh_flat.numpy(), np.asarray(img.data))
    np.testing.assert_array_equal(field.sh.numpy(), data)
    assert field.voxel_sizes == tuple(img.voxel_sizes) == field.header_voxel_sizes
    assert fod_field(field) is field


def test_params_problem_shares_one_fod_copy():
    """The problem's state, its field and the field fod_field returns are one buffer."""
    from invtract.data import example_path
    from invtract.io.seeds import seeds_from_reference
    from invtract.io.tractogram import load_tractogram
    from invtract.params import TrackingParameters
    from invtract.tracking.api import Seeding

    img = load_fod(example_path("fod"))
    field = fod_field(img)
    sh = field.sh
    assert field.sh_flat.is_contiguous() and field.voxel_sizes == tuple(img.voxel_sizes)
    assert fod_field((sh.numpy(), img.affine)).sh_flat.data_ptr() == sh.data_ptr()
    assert fod_field(field) is field
    pos, dirs, ti = seeds_from_reference(example_path("target"), example_path("target_seeds"))
    sl = load_tractogram(example_path("target")).select(torch.as_tensor(ti[:8]))
    cfg = resolve_config({"fit": {"heldout_fraction": 0.25}})
    prob = build_problem(
        cfg, field, sl, TrackingParameters(),
        Seeding("list", positions=pos[:8], directions=dirs[:8]),
    )  # fmt: skip
    ptr = sh.data_ptr()
    assert prob.state.sh0_flat.data_ptr() == ptr
    assert prob.fixed_field.sh_flat.data_ptr() == ptr
    assert prob.state.sh().data_ptr() == ptr
    assert prob.resolved == TrackingParameters().resolve(img.voxel_sizes)


def test_track_differentiable_shares_the_fields_coefficients():
    """A field whose coefficients require grad (``with_sh``) tracks as the fixed field does
    (same points, weights and parameter gradients) and its gradient reaches the tensor."""
    from invtract.data import example_path
    from invtract.io.seeds import seeds_from_reference

    img = load_fod(example_path("fod"))
    field = fod_field(img)
    pos, dirs, _ = seeds_from_reference(example_path("target"), example_path("target_seeds"))
    seeds, d = torch.as_tensor(pos[:6]), torch.as_tensor(dirs[:6])
    step = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    cut = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    learn = field.sh.clone().requires_grad_(True)
    outs = []
    for fod in (field, field.with_sh(learn)):
        r = track_differentiable(fod, seeds, d, step_mm=step, cutoff=cut)
        (r.points.sum() + r.weights.sum()).backward()
        outs.append((r.points.detach(), r.weights.detach(), step.grad.clone(), cut.grad.clone()))
        step.grad, cut.grad = None, None
    for a, b in zip(*outs):
        assert torch.equal(a, b)
    assert learn.grad is not None and float(learn.grad.abs().sum()) > 0
    assert field.with_sh(learn).sh_flat.data_ptr() == learn.data_ptr()  # a view, no copy


def test_compiled_step_amplitudes_match_the_torch_sampler(monkeypatch):
    """objective.step_amplitudes (numba) equals FODField.sample + peak_amplitude to float32
    rounding, with the no-data rules: outside the grid, all-zero voxels, NaN voxels."""
    from invtract.data import example_path
    from invtract.fit import objective
    from invtract.fod.field import FODField
    from invtract.tracking import adjoint_cpu

    if not adjoint_cpu.available():
        pytest.skip("numba not installed")
    img = load_fod(example_path("fod"))
    sh = torch.from_numpy(c_order_fod(img.data)).clone()
    sh[3, 4, 2] = float("nan")
    sh[5, 5, 1] = 0.0
    field = FODField.from_array(sh, img.affine)
    g = torch.Generator().manual_seed(0)
    X = torch.tensor(sh.shape[:3], dtype=torch.float64)
    vox = torch.rand(4000, 3, generator=g, dtype=torch.float64) * (X + 4) - 2.5  # some outside
    vox[:20] = torch.tensor([3.0, 4.0, 2.0]) + 0.3 * torch.rand(20, 3, generator=g)
    vox[20:40] = torch.tensor([5.0, 5.0, 1.0]) + 0.3 * torch.rand(20, 3, generator=g)
    pts = (
        vox @ torch.as_tensor(img.affine[:3, :3]).T + torch.as_tensor(img.affine[:3, 3])
    ).float()
    u = torch.nn.functional.normalize(torch.randn(4000, 3, generator=g), dim=-1)
    fast = objective.step_amplitudes(field, pts, u)
    monkeypatch.setattr(adjoint_cpu, "available", lambda: False)
    ref = objective.step_amplitudes(field, pts, u)
    assert (ref == 0).sum() > 100 and (ref != 0).sum() > 300  # both cases exercised
    assert torch.equal(fast == 0, ref == 0)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-6)


def test_fod_fit_owns_its_coefficients_and_leaves_the_callers_unchanged(mapped_fod):
    """An FOD fit writes the learned rows into coefficients it owns: a copy of a caller's
    C-ordered array (made once), none of a mapped file's (``fod_field`` already copied it);
    the caller's array is unchanged, and the fitted FOD is the fit's own buffer."""
    import dataclasses

    from invtract.data import example_path
    from invtract.fit.optimise import _owned, fit
    from invtract.io.seeds import seeds_from_reference
    from invtract.io.tractogram import load_tractogram
    from invtract.params import TrackingParameters
    from invtract.tracking.api import Seeding

    mapped = load_fod(mapped_fod[0])
    field = fod_field(mapped)
    assert _owned(field, mapped) is field  # fod_field's own copy
    img = load_fod(example_path("fod"))
    img = dataclasses.replace(img, data=c_order_fod(img.data))
    shared = fod_field(img)
    assert np.shares_memory(shared.sh_flat.numpy(), img.data)
    owned = _owned(shared, img)
    assert not np.shares_memory(owned.sh_flat.numpy(), img.data)
    assert owned.nonzero_flat is shared.nonzero_flat  # same values: the mask is kept
    assert _owned(shared, shared).sh_flat.data_ptr() != shared.sh_flat.data_ptr()
    before = img.data.copy()
    pos, dirs, ti = seeds_from_reference(example_path("target"), example_path("target_seeds"))
    sl = load_tractogram(example_path("target")).select(torch.as_tensor(ti[:4]))
    res = fit(
        img, sl, TrackingParameters(min_length_mm=10.0, max_length_mm=200.0),
        seeding=Seeding("list", positions=pos[:4], directions=dirs[:4]), learn=("sh",),
        config={"fit": {"iterations": 2, "heldout_fraction": 0.0}},
    )  # fmt: skip
    assert np.array_equal(img.data, before)  # never written
    K = before.shape[-1]
    start = torch.as_tensor(before).reshape(-1, K)
    sh, final = res.sh.reshape(-1, K), res.final_sh.reshape(-1, K)
    learned = torch.zeros(start.shape[0], dtype=torch.bool)
    learned[res.learned_voxels] = True
    changed = (final != start).any(-1)
    assert bool(changed.any()) and not bool((changed & ~learned).any())
    assert torch.equal(sh[~learned], start[~learned])
    assert torch.equal(final[res.learned_voxels], res.final_rows)
    assert not np.shares_memory(res.sh.numpy(), img.data)
