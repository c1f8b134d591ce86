"""Micro-batches (``train/accumulate.py``): a step run a few sequences at a time has the gradient and
loss of the whole batch at once, for the search (gates, and weights) and for heal; every loss term."""

from __future__ import annotations

import pytest
import torch

from consa.allocation import Allocation, ModelShape
from consa.errors import ConsaError
from consa.tiny import tiny_model
from consa.train.accumulate import split_rows, term_counts
from consa.train.heal import Heal, HealConfig
from consa.train.search import Search, task_terms
from consa.train.search_config import LossConfig, SearchConfig, TargetConfig

pytestmark = pytest.mark.usefixtures("one_thread")
B, T = 5, 23  # odd rows (micro-batches of 2, 2, 1) and an odd length


def _batches(step):
    g = torch.Generator().manual_seed(50 + step)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, :4] = 0  # a row with masked positions, so the counts are not B × T
    answer = torch.zeros(B, T, dtype=torch.long)
    answer[torch.arange(B), torch.randint(5, T, (B,), generator=g)] = 1
    return {"input_ids": torch.randint(3, 101, (B, T), generator=g), "loss_mask": mask, "answer_mask": answer}


def _search(tmp_path, micro, **kw):
    kw = {"lm_weight": 0.5, "answer_weight": 2.0, **kw}
    kw = {"sparsity": 0.5, "window": 5, **kw}
    cfg = SearchConfig.from_flat({"seq_len": T, "steps": 4, "checkpoint_every": 0, "gate_lr": 0.1, "micro_batch": micro, **kw})
    return Search(tiny_model("qwen3", num_layers=3, num_kv_heads=2), cfg, _batches, tmp_path, progress=False)


def test_term_counts_are_the_counts_task_terms_divide_by():
    batch = _batches(0)
    logits = torch.randn(B, T, 101)
    cfg = LossConfig(lm_weight=0.5, answer_weight=2.0)
    terms = task_terms(logits, logits + 0.1 * torch.randn_like(logits), batch, batch["loss_mask"], cfg)
    counts = term_counts(batch, batch["loss_mask"], cfg, has_teacher=True)
    assert len(terms) == len(counts) == 3
    assert [float(c) for _, _, c in terms] == [float(c) for c in counts]
    parts = split_rows(batch, 2)
    assert [p["input_ids"].shape[0] for p in parts] == [2, 2, 1]
    assert torch.equal(torch.cat([p["answer_mask"] for p in parts]), batch["answer_mask"])


SPANS = {"sparsity": None, "window": None, "kv_budget": 0.4, "spans": "4,8,16,full"}  # a span search under a KV budget


@pytest.mark.parametrize("weights, extra", [("none", {}), ("full", {}), ("none", SPANS)], ids=["gates", "weights", "spans"])
def test_search_step_in_micro_batches_has_the_whole_batch_gradient(tmp_path, weights, extra):
    whole = _search(tmp_path / "a", 0, train_weights=weights, **extra)
    micro = _search(tmp_path / "b", 2, train_weights=weights, **extra)
    # the same search with (almost) no task loss: the controller's share of the gate gradient, to take out,
    # so that what is compared is the part the micro-batches compute (here ~5% of the whole)
    penalty = _search(tmp_path / "p", 0, train_weights=weights, kl_weight=1e-12, lm_weight=0.0, answer_weight=0.0, **extra)
    for _ in range(3):  # the first step, and two more from (nearly) the same gates
        ra, rb = whole.train_step(), micro.train_step()
        penalty.train_step()
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-5)
        ta = whole.gates.log_alpha.grad - penalty.gates.log_alpha.grad
        tb = micro.gates.log_alpha.grad - penalty.gates.log_alpha.grad
        assert ta.abs().max() > 1e-4 and torch.allclose(tb, ta, rtol=1e-4, atol=1e-4 * float(ta.abs().max())), (ta, tb)
        with torch.no_grad():  # keep the gates equal: Adam would amplify rounding into different trajectories
            micro.gates.log_alpha.copy_(whole.gates.log_alpha)
            penalty.gates.log_alpha.copy_(whole.gates.log_alpha)
    if weights == "full":
        pa = dict(whole.model.named_parameters())
        grads = [(n, p.grad) for n, p in micro.model.named_parameters() if p.grad is not None]
        assert grads
        for n, g in grads:
            assert torch.allclose(g, pa[n].grad, rtol=1e-4, atol=1e-6), n
    assert whole.allocation().units == micro.allocation().units


def test_heal_step_in_micro_batches_has_the_whole_batch_gradient(tmp_path):
    shape = ModelShape(num_layers=3, num_kv_heads=2, num_q_heads=4)
    alloc = Allocation("kv_head", shape, 4, ((False, True), (True, False), (False, False)), 1)
    """Compared gradient by gradient at equal weights, not weights after the optimizer: Adam divides by √v, so a
    weight whose gradient is ~0 moves by ±lr on the sign of its rounding, which differs between CPUs (a weight
    check after two steps failed on one machine and passed on another)."""
    a, b = (Heal(tiny_model("qwen3", seed=3, num_layers=3, num_heads=4, num_kv_heads=2), alloc,
                 HealConfig(steps=3, seq_len=T, lr=3e-4, checkpoint_every=0, lm_weight=0.5, micro_batch=micro), _batches,
                 tmp_path / str(micro), progress=False) for micro in (0, 2))
    pa, pb = dict(a.model.named_parameters()), dict(b.model.named_parameters())
    for _ in range(2):
        x, y = a.train_step(), b.train_step()
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5) and y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-4)
        grads = [(n, p.grad) for n, p in pb.items() if p.grad is not None]
        assert grads and max(float(g.abs().max()) for _, g in grads) > 0
        for n, g in grads:
            want = pa[n].grad
            assert torch.allclose(g, want, rtol=1e-4, atol=1e-5 * float(want.abs().max())), n
        with torch.no_grad():  # the next step from equal weights (the optimizers' moments differ by rounding only)
            for n, p in pb.items():
                p.copy_(pa[n])


def test_bad_micro_batch_is_one_clear_error():
    with pytest.raises(ConsaError, match="micro_batch must be an integer >= 0"):
        SearchConfig(TargetConfig(sparsity=0.5, window=5), seq_len=T, micro_batch=-1)
    with pytest.raises(ConsaError, match="micro_batch must be an integer >= 0"):
        HealConfig(steps=1, seq_len=T, micro_batch=-2).validate()
