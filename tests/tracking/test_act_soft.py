"""Soft survival factors for ACT's tissue tests (:mod:`invtract.tracking.act_soft`): exact in
the hard limit (against the rulebook), tending to it as tau -> 0, gradcheck-verified."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from invtract.tracking import act_soft, rules


def _tissues(n: int, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.as_tensor(rng.dirichlet(np.ones(5), size=n))


def test_hard_limit_is_the_rulebook():
    tis = _tissues(500)
    k = act_soft.soft_classes(tis, 0.0)
    seed = act_soft.soft_seed_ok(tis, 0.0)
    for i, t in enumerate(tis.numpy()):
        t = tuple(float(v) for v in t)
        assert k["is_csf"][i] == rules.is_csf(*t)
        assert k["is_sgm"][i] == rules.is_sgm(*t)
        assert k["is_gm"][i] == rules.is_gm(*t)
        assert k["is_path"][i] == rules.is_path(*t)
        assert seed[i] == rules.act_seed_ok(*t)


def test_soft_tends_to_hard_away_from_ties():
    tis = _tissues(500, 1)
    hard = act_soft.step_outcomes(tis[None], torch.ones(1, 500, dtype=torch.bool), 0.0)
    soft = act_soft.step_outcomes(tis[None], torch.ones(1, 500, dtype=torch.bool), 1e-9)
    for name in hard:
        assert torch.allclose(hard[name], soft[name], atol=1e-6), name
    assert torch.allclose(sum(soft.values()), torch.ones(1, 500, dtype=torch.float64))


def test_hard_outcomes_follow_check_structural():
    """One point of each kind: WM continues, CSF, cortical GM, sub-cortical GM continues, no
    data and a tissue sum below 0.5 exit the image."""
    tis = torch.tensor([[[0.1, 0.0, 0.9, 0.0, 0.0], [0.1, 0.0, 0.2, 0.7, 0.0],
                         [0.6, 0.0, 0.4, 0.0, 0.0], [0.1, 0.6, 0.3, 0.0, 0.0],
                         [0.1, 0.0, 0.9, 0.0, 0.0], [0.1, 0.1, 0.1, 0.1, 0.0]]],
                       dtype=torch.float64)  # fmt: skip
    data = torch.tensor([[True, True, True, True, False, True]])
    o = act_soft.step_outcomes(tis, data, 0.0)
    assert o["cont"].tolist() == [[1, 0, 0, 1, 0, 0]]
    assert o["enter_csf"].tolist() == [[0, 1, 0, 0, 0, 0]]
    assert o["enter_cgm"].tolist() == [[0, 0, 1, 0, 0, 0]]
    assert o["exit_image"].tolist() == [[0, 0, 0, 0, 1, 1]]
    w = act_soft.end_weights(o)
    assert w["enter_csf"].tolist() == [[0, 1, 0, 0, 0, 0]]  # the streamline ends at point 1
    assert float(w["beyond"].sum()) == 0.0


@pytest.mark.parametrize("tau", [0.05, 0.3])
def test_gradcheck(tau):
    tis = _tissues(6, 2).reshape(1, 6, 5).clone().requires_grad_(True)
    data = torch.ones(1, 6, dtype=torch.bool)

    def f(t):
        w = act_soft.end_weights(act_soft.step_outcomes(t, data, tau))
        return w["enter_cgm"], w["enter_csf"], w["exit_image"], w["beyond"]

    assert torch.autograd.gradcheck(f, (tis,), eps=1e-6, atol=1e-6)
    seed = torch.autograd.gradcheck(lambda t: act_soft.soft_seed_ok(t, tau), (tis,))
    assert seed
