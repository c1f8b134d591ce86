"""Cut refinement: swaps across the top-k cut judged on the binary allocation's held-out KL."""

import json

import pytest
import torch

from consa.allocation import Allocation
from consa.errors import ConsaError
from consa.gates import cut_margin, topk_swa
from consa.models import apply_allocation, detach
from consa.tiny import tiny_model
from consa.train.refine import refine_cut
from consa.train.search import Search, forward_logits, kl_loss
from consa.train.search_config import RefineConfig, ScheduleConfig, SearchConfig, TargetConfig


def _hamming_objective(best: list[bool]):
    calls = []

    def objective(fa):
        calls.append(list(fa))
        return 0.1 + sum(a != b for a, b in zip(fa, best))

    return objective, calls


def test_refine_finds_the_units_the_proxy_misranked_and_keeps_the_count():
    # scores put unit 3 (truly FA) just below the cut and unit 4 (truly SWA) just above it
    scores = torch.tensor([5.0, 4.0, -3.0, 0.9, 1.1, -4.0, -5.0, 3.0])
    fa = topk_swa(scores, 4)
    best = list(fa)
    best[3], best[4] = True, False
    objective, calls = _hamming_objective(best)
    res = refine_cut(scores, fa, objective, candidates=2, max_evals=20)
    assert res.fa == best and sum(not f for f in res.fa) == 4
    assert res.kl_before == pytest.approx(2.1) and res.kl_after == pytest.approx(0.1)
    assert res.swaps[0][:2] == (4, 3) and res.changed == 2
    # the nearest pair is tried first, so one evaluation past the cut's own finds it; then a pass with no gain
    assert calls[1] == best and res.evals == len(calls) <= 20


def test_refine_never_accepts_a_worse_swap_and_respects_its_budget():
    scores = torch.linspace(-2, 2, 10)
    fa = topk_swa(scores, 5)
    objective, calls = _hamming_objective(fa)  # the cut is already optimal: every swap costs 2
    res = refine_cut(scores, fa, objective, candidates=3, max_evals=4)
    assert res.fa == fa and res.swaps == [] and res.kl_after == res.kl_before
    assert res.evals == len(calls) == 4
    with pytest.raises(ValueError, match="scores"):
        refine_cut(scores[:3], fa, objective)


def test_measured_order_finds_a_redundant_fa_unit_far_above_the_cut():
    """Unit 0 has the highest score but the allocation does not need it; unit 3, just below the cut, is
    needed. Swaps near the cut cannot fix that; measuring each FA unit's single flip can."""
    scores = torch.tensor([5.0, 4.0, 3.0, -1.0, -2.0, -3.0, -4.0, 2.5])
    fa = topk_swa(scores, 4)
    assert [i for i, f in enumerate(fa) if f] == [0, 1, 2, 7]
    best = [False, True, True, True, False, False, False, True]
    objective, _ = _hamming_objective(best)
    near = refine_cut(scores, fa, objective, candidates=2, max_evals=30)
    assert near.fa == fa and near.swaps == []  # every swap near the cut leaves the distance at 2
    objective, calls = _hamming_objective(best)
    res = refine_cut(scores, fa, objective, candidates=2, max_evals=30, order="measured")
    assert res.fa == best and res.swaps[0][:2] == (0, 3) and res.kl_after == pytest.approx(0.1)
    assert sum(not f for f in res.fa) == 4 and res.evals == len(calls) <= 30
    # the measurements flip one unit each: FA units lowest score first, one SWA unit before them
    assert [sum(a != b for a, b in zip(c, fa)) for c in calls[1:7]] == [1] * 6
    assert calls[1][3] and not calls[2][7]
    # a budget too small to measure everything is still respected, and a bad order is refused
    objective, calls = _hamming_objective(best)
    small = refine_cut(scores, fa, objective, candidates=2, max_evals=3, order="measured")
    assert small.evals == len(calls) == 3
    with pytest.raises(ValueError, match="order"):
        refine_cut(scores, fa, objective, order="nearest")


def test_gradient_order_tries_the_estimated_best_swap_first_and_never_trusts_the_estimate():
    scores = torch.tensor([5.0, 4.0, 3.0, -1.0, -2.0, -3.0, -4.0, 2.5])
    fa = topk_swa(scores, 4)
    best = [False, True, True, True, False, False, False, True]
    objective, calls = _hamming_objective(best)

    def exact(cut):  # the true change of each single flip: -1 towards `best`, +1 away from it
        return [-1.0 if c != b else 1.0 for c, b in zip(cut, best)]

    res = refine_cut(scores, fa, objective, candidates=2, max_evals=30, order="gradient", flip_estimate=exact)
    assert res.fa == best and res.swaps[0][:2] == (0, 3) and calls[1] == best  # the first swap tried is the right one
    assert res.estimates >= 1 and res.summary()["estimates"] == res.estimates
    # an estimate that points the wrong way costs evaluations, never a worse allocation
    objective, calls = _hamming_objective(fa)  # the cut is optimal: every swap costs 2

    def wrong(cut):
        return [-5.0] * len(cut)

    res = refine_cut(scores, fa, objective, candidates=2, max_evals=6, order="gradient", flip_estimate=wrong)
    assert res.fa == fa and res.swaps == [] and res.evals == len(calls) == 6
    with pytest.raises(ValueError, match="flip_estimate"):
        refine_cut(scores, fa, objective, order="gradient")
    with pytest.raises(ValueError, match="3 values for 8 units"):
        refine_cut(scores, fa, objective, order="gradient", flip_estimate=lambda cut: [0.0] * 3)


def test_flip_estimate_is_the_gradient_of_the_held_out_kl_at_the_binary_allocation(tmp_path):
    """−∂KL/∂z for FA units and +∂KL/∂z for SWA units, checked against central differences of the held-out
    KL in z (the mixing is linear in z, so z slightly outside [0, 1] is well defined)."""
    model = tiny_model("qwen3", num_layers=3, num_kv_heads=2, attn_implementation="consa")
    cfg = SearchConfig(TargetConfig(sparsity=0.5, window=5), seq_len=40, schedule=ScheduleConfig(steps=1),
                       refine=RefineConfig(batches=2), checkpoint_every=0)
    s = Search(model, cfg, _batches, tmp_path, progress=False)
    s.model.eval()
    fa = [True, False, False, True, False, True]
    est = s.held_out_flip_estimate(fa)
    assert s.mix.z is None and all(p.grad is None for p in s.model.parameters())  # no graph or weight grads kept
    eps = 1e-2
    for u in range(len(fa)):
        up, down = [float(b) for b in fa], [float(b) for b in fa]
        up[u] += eps
        down[u] -= eps
        g = (s.held_out_kl(up) - s.held_out_kl(down)) / (2 * eps)
        assert est[u] == pytest.approx(-g if fa[u] else g, rel=0.05, abs=1e-6)
    assert max(abs(x) for x in est) > 1e-5  # the windows matter on this model, so the check above can fail


def _batches(step):
    g = torch.Generator().manual_seed(step)
    return {"input_ids": torch.randint(3, 101, (2, 40), generator=g)}


def test_held_out_kl_is_the_kl_of_the_fixed_hybrid_model(tmp_path):
    """z ∈ {0, 1} through the gated attention must be exactly the hybrid that apply_allocation serves."""
    model = tiny_model("qwen3", num_layers=3, num_kv_heads=2, attn_implementation="consa")
    cfg = SearchConfig(TargetConfig(sparsity=0.5, window=5), seq_len=40, schedule=ScheduleConfig(steps=1),
                       refine=RefineConfig(batches=2), checkpoint_every=0)
    s = Search(model, cfg, _batches, tmp_path, progress=False)
    fa = [True, False, False, True, False, True]
    got = s.held_out_kl(fa)
    detach(model, impl="consa")
    alloc = Allocation.from_units(fa, "kv_head", s.shape, 5)
    total = 0.0
    for i in range(2):
        batch = _batches(Search.HELD_OUT_STEP + i)
        with torch.no_grad():
            teacher = forward_logits(model, batch)
            apply_allocation(model, alloc)
            student = forward_logits(model, batch)
            detach(model, impl="consa")
        total += float(kl_loss(student, teacher))
    assert got > 1e-4  # the windows matter on this model, so the check below can fail
    assert got == pytest.approx(total / 2, rel=1e-4)


@pytest.mark.parametrize("order", ["score", "measured", "gradient"])
def test_search_with_refinement_writes_the_refined_allocation_and_its_evidence(tmp_path, order):
    model = tiny_model("qwen3", num_layers=4, num_kv_heads=2)
    cfg = SearchConfig(TargetConfig(sparsity=0.5, window=5), seq_len=40, schedule=ScheduleConfig(steps=4), checkpoint_every=0,
                       refine=RefineConfig(evals=6, candidates=2, order=order))
    s = Search(model, cfg, _batches, tmp_path, progress=False)
    alloc = s.run()
    summ = json.loads((tmp_path / "search.json").read_text())["refine"]
    assert 1 <= summ["evals"] <= 6 and summ["kl_after"] <= summ["kl_before"]
    assert alloc.num_swa == 4 and alloc.units == s.refined.fa
    assert summ["kl_after"] == pytest.approx(s.held_out_kl(alloc.units), rel=1e-6)
    cut = topk_swa(s.gates.log_alpha, 4)
    assert sum(a != b for a, b in zip(cut, alloc.units)) == summ["units_changed"]
    assert Allocation.load(tmp_path / "allocation.json").meta["refine"]["evals"] == summ["evals"]
    full = json.loads((tmp_path / "search.json").read_text())
    assert full["config"]["refine"]["order"] == order
    # the margin of the search's own top-k cut (before refinement) is recorded beside it
    margin = full["cut_margin"]
    assert margin["fa_clear"] + margin["fa_near_cut"] == 4 and 0 <= margin["swa_near_cut"] <= 4
    assert margin == cut_margin(s.gates.log_alpha, cut)


def test_refine_settings_are_checked():
    with pytest.raises(ConsaError, match="refine_evals"):
        RefineConfig(evals=-1)
    with pytest.raises(ConsaError, match="refine_order"):
        RefineConfig(evals=4, order="nearest")



def test_refinement_is_on_by_default_for_a_share_and_off_under_a_kv_budget():
    """A search at a share of units refines its cut unless told not to; a KV-budget search assigns spans, not
    a top-k cut, so its default is off (an explicit value is still checked: a span menu refuses it)."""
    from consa.train.search_config import AUTO_REFINE_EVALS

    share = SearchConfig(TargetConfig(sparsity=0.5, window=5), seq_len=40)
    assert share.refine.evals == AUTO_REFINE_EVALS > 0 and share.refine.order == "gradient"
    share.validate()  # idempotent once resolved
    assert share.refine.evals == AUTO_REFINE_EVALS
    off = SearchConfig(TargetConfig(sparsity=0.5, window=5), seq_len=40, refine=RefineConfig(evals=0))
    assert off.refine.evals == 0
    budget = SearchConfig(TargetConfig(kv_budget=0.3, window=5), seq_len=40)
    assert budget.refine.evals == 0
    with pytest.raises(ConsaError, match="single window only"):
        SearchConfig(TargetConfig(kv_budget=0.3, spans="3,6,full"), seq_len=40, refine=RefineConfig(evals=4))
