import math

import pytest
import torch

from consa.gates import BETA, GAMMA, ZETA, HardConcreteGates, topk_swa


def test_prob_nonzero_matches_monte_carlo():
    gates = HardConcreteGates(5)
    with torch.no_grad():
        gates.log_alpha.copy_(torch.tensor([-4.0, -1.5, 0.0, 0.7, 3.0]))
    g = torch.Generator().manual_seed(0)
    samples = torch.stack([gates.sample(g) for _ in range(40000)])
    mc = (samples > 0).float().mean(0)
    assert torch.allclose(mc, gates.prob_nonzero().detach(), atol=0.01), (mc, gates.prob_nonzero())
    # and the closed form is the documented one
    la = gates.log_alpha.detach()
    expected = torch.sigmoid(la - BETA * math.log(-GAMMA / ZETA))
    assert torch.allclose(gates.prob_nonzero().detach(), expected)
    assert float(gates.expected_sparsity().detach()) == pytest.approx(1 - float(expected.mean()), abs=1e-6)


def test_samples_are_in_unit_interval_with_exact_zeros_and_ones():
    gates = HardConcreteGates(2)
    with torch.no_grad():
        gates.log_alpha.copy_(torch.tensor([-3.0, 3.0]))
    z = torch.stack([gates.sample(torch.Generator().manual_seed(i)) for i in range(500)])
    assert z.min() >= 0 and z.max() <= 1
    assert (z[:, 0] == 0).any() and (z[:, 1] == 1).any()


def test_eval_gates_are_deterministic_and_train_gates_are_not():
    gates = HardConcreteGates(6, init_log_alpha=0.3)
    gates.eval()
    assert torch.equal(gates(), gates())
    gates.train()
    assert not torch.equal(gates(), gates())


@pytest.mark.parametrize("n,k", [(8, 6), (8, 7), (64, 48), (10, 5), (7, 0), (7, 7)])
def test_topk_exact_count_including_ties(n, k):
    for scores in (torch.zeros(n), torch.randn(n), torch.tensor([float(i % 3) for i in range(n)])):
        fa = topk_swa(scores, k)
        assert len(fa) == n and sum(not b for b in fa) == k
        # every SWA unit scores no higher than every FA unit
        swa_s = [float(s) for s, b in zip(scores, fa) if not b]
        fa_s = [float(s) for s, b in zip(scores, fa) if b]
        if swa_s and fa_s:
            assert max(swa_s) <= min(fa_s)


def test_topk_rejects_impossible_counts():
    with pytest.raises(ValueError):
        topk_swa(torch.zeros(4), 5)


def test_cut_agreement_counts_units_whose_own_gate_matches_the_cut():
    from consa.gates import cut_agreement

    gates = HardConcreteGates(4)
    with torch.no_grad():  # two clearly open gates, two clearly closed: a 2-of-4 SWA cut agrees everywhere
        gates.log_alpha.copy_(torch.tensor([4.0, -4.0, 3.0, -5.0]))
    p = gates.prob_nonzero()
    fa = topk_swa(gates.log_alpha, 2)
    assert fa == [True, False, True, False]
    assert cut_agreement(p, fa) == 1.0
    # a 3-of-4 cut must close the open gate 2 (lower than gate 0): that one unit disagrees
    assert cut_agreement(p, topk_swa(gates.log_alpha, 3)) == 0.75
    # undecided gates, all near closed: the cut's FA units are the ones that disagree
    with torch.no_grad():
        gates.log_alpha.copy_(torch.tensor([-2.0, -2.1, -1.9, -2.2]))
    assert cut_agreement(gates.prob_nonzero(), topk_swa(gates.log_alpha, 2)) == 0.5
    with pytest.raises(ValueError, match="4 gates but 3 units"):
        cut_agreement(p, [True, False, True])


def test_cut_margin_counts_the_units_the_gates_have_not_told_apart():
    from consa.gates import cut_margin

    # one clear FA unit (5.0), two FA units (-2.3, -2.4) and three SWA units (-2.6, -2.7, -4.0) around a cut at -2.5
    la = torch.tensor([-2.6, 5.0, -2.3, -4.0, -2.4, -2.7])
    fa = topk_swa(la, 3)
    assert fa == [False, True, True, False, True, False]
    m = cut_margin(la, fa)
    assert m["cut_log_alpha"] == pytest.approx(-2.5)
    assert (m["fa_clear"], m["fa_near_cut"], m["swa_near_cut"]) == (1, 2, 2)  # -4.0 lies outside the band
    wide = cut_margin(la, fa, band=2.0)
    assert (wide["fa_clear"], wide["fa_near_cut"], wide["swa_near_cut"]) == (1, 2, 3)
    assert cut_margin(la, [True] * 6)["cut_log_alpha"] is None
    with pytest.raises(ValueError, match="6 gates but 2 units"):
        cut_margin(la, [True, False])


@pytest.mark.parametrize("log_alpha,beta,gamma,zeta", [(-2.5, 0.2, -0.1, 1.1), (-2.5, 2.0 / 3.0, -0.1, 1.1),
                                                       (0.5, 0.2, -0.1, 1.1), (1.0, 0.5, -0.3, 1.05)])
def test_prob_in_ramp_is_the_share_of_samples_strictly_inside_the_clamp(log_alpha, beta, gamma, zeta):
    """Against the gates' own sampler: the share of z strictly between 0 and 1 (where the task loss has a
    gradient to log α). 400K samples: the binomial sd is under 0.001, the tolerance 0.005."""
    from consa.gates import prob_in_ramp

    gates = HardConcreteGates(400_000, init_log_alpha=log_alpha, beta=beta, gamma=gamma, zeta=zeta)
    z = gates.sample(torch.Generator().manual_seed(0))
    share = float(((z > 0) & (z < 1)).double().mean())
    assert prob_in_ramp(log_alpha, beta, gamma, zeta) == pytest.approx(share, abs=0.005)
    assert 0.0 < share < 1.0
