"""Cut refinement: swaps across the top-k cut judged on the binary allocation's held-out KL."""

import json

import pytest
import torch

from consa.allocation import Allocation
from consa.gates import topk_swa
from consa.models import apply_allocation, detach
from consa.tiny import tiny_model
from consa.train.refine import refine_cut
from consa.train.search import Search, SearchConfig, forward_logits, kl_loss


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


def _batches(step):
    g = torch.Generator().manual_seed(step)
    return {"input_ids": torch.randint(3, 101, (2, 40), generator=g)}


def test_held_out_kl_is_the_kl_of_the_fixed_hybrid_model(tmp_path):
    """z ∈ {0, 1} through the gated attention must be exactly the hybrid that apply_allocation serves."""
    model = tiny_model("qwen3", num_layers=3, num_kv_heads=2, attn_implementation="consa")
    cfg = SearchConfig(sparsity=0.5, window=5, seq_len=40, steps=1, checkpoint_every=0, refine_batches=2)
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


def test_search_with_refinement_writes_the_refined_allocation_and_its_evidence(tmp_path):
    model = tiny_model("qwen3", num_layers=4, num_kv_heads=2)
    cfg = SearchConfig(sparsity=0.5, window=5, seq_len=40, steps=4, checkpoint_every=0, refine_evals=6, refine_candidates=2)
    s = Search(model, cfg, _batches, tmp_path, progress=False)
    alloc = s.run()
    summ = json.loads((tmp_path / "search.json").read_text())["refine"]
    assert 1 <= summ["evals"] <= 6 and summ["kl_after"] <= summ["kl_before"]
    assert alloc.num_swa == 4 and alloc.units == s.refined.fa
    assert summ["kl_after"] == pytest.approx(s.held_out_kl(alloc.units), rel=1e-6)
    cut = topk_swa(s.gates.log_alpha, 4)
    assert sum(a != b for a, b in zip(cut, alloc.units)) == summ["units_changed"]
    assert Allocation.load(tmp_path / "allocation.json").meta["refine"]["evals"] == summ["evals"]


def test_refine_settings_are_checked():
    with pytest.raises(Exception, match="refine"):
        SearchConfig(sparsity=0.5, window=5, seq_len=40, refine_evals=-1).validate()
