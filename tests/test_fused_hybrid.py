"""Fused hybrid prefill (``KernelConfig(hybrid_prefill="fused")``): FA and SWA heads in one FlexAttention call
with a per-head block mask, checked against the float64 dense per-head reference and the split path."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import consa
from consa.attention import kernels, masks, select
from consa.attention.hybrid import consa_attention
from consa.attention.kernels import hybrid_block_mask, reference_attention
from consa.attention.plan import KernelConfig, LayerPlan
from consa.tiny import tiny_model

from attn_reference import per_head_allowed


def _qkv(hq, hk, t, d=16, b=2, seed=0, device="cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    make = lambda h: torch.randn(b, h, t, d, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    return make(hq), make(hk), make(hk)


FUSED = KernelConfig(hybrid_prefill="fused")


@pytest.mark.parametrize("t,window,sinks,fa", [(300, 50, 0, (True, False, False, True)), (257, 128, 3, (False, True, False, False)),
                                               (130, 500, 0, (True, False)), (1000, 200, 2, (False, False, True, True, False, True))])
def test_hybrid_block_mask_equals_the_dense_per_head_mask(t, window, sinks, fa):
    from torch.nn.attention.flex_attention import create_block_mask

    bm = hybrid_block_mask(t, fa, window, sinks)
    mod = masks.hybrid_mask_mod(torch.tensor(fa), window, sinks)
    ref = create_block_mask(mod, None, len(fa), t, t, device="cpu")
    assert torch.equal(bm.to_dense(), ref.to_dense())
    # and the pairs it allows are exactly the reference's (full blocks included)
    allowed = per_head_allowed(list(fa), t, t, window, sinks, None, "cpu")
    pos = torch.arange(t)
    for h in range(len(fa)):
        assert torch.equal(mod(None, torch.tensor(h), pos[:, None], pos[None, :]), allowed[0, h])


@pytest.mark.parametrize("hq,hk,fa_kv,t,window,sinks", [
    (6, 3, [0, 2], 257, 40, 0),     # GQA, FA heads not contiguous, odd length
    (6, 3, [1], 131, 200, 2),       # window longer than the sequence, sinks
    (4, 4, [3], 300, 17, 3),        # MHA
    (8, 2, [0], 129, 64, 0),        # groups of 4
])
def test_fused_prefill_equals_reference_and_split_path(monkeypatch, hq, hk, fa_kv, t, window, sinks):
    q, k, v = _qkv(hq, hk, t, seed=t + window)
    plan = LayerPlan(0, hk, window, sinks, "fixed", fa_kv=fa_kv, kernels=FUSED)
    mod = SimpleNamespace(training=False, consa_plan=plan)
    calls = []
    real = kernels.flex_hybrid
    monkeypatch.setattr(kernels, "flex_hybrid", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    out = consa_attention(mod, q, k, v, None, 0.3)[0]
    assert calls, "the fused path was not taken"
    g = hq // hk
    allowed = per_head_allowed([(h // g) in fa_kv for h in range(hq)], t, t, window, sinks, None, "cpu")
    ref = reference_attention(q, k, v, allowed, 0.3).transpose(1, 2)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    with select.override(plan, hybrid_prefill="split"):
        torch.testing.assert_close(out, consa_attention(mod, q, k, v, None, 0.3)[0], atol=1e-5, rtol=0)
    assert len(calls) == 1  # the split path took no fused call
    # one head's kind flipped changes the output: the per-head mask is really per head
    other = LayerPlan(0, hk, window, sinks, "fixed", fa_kv=[h for h in range(hk) if h not in fa_kv][:1] or [0], kernels=FUSED)
    if window < t and set(other.fa_kv) != set(fa_kv):
        assert (consa_attention(SimpleNamespace(training=False, consa_plan=other), q, k, v, None, 0.3)[0] - out).abs().max() > 1e-3


def test_fused_is_skipped_for_padding_decode_and_gradients(monkeypatch):
    monkeypatch.setattr(kernels, "flex_hybrid", lambda *a, **kw: pytest.fail("fused path taken"))
    q, k, v = _qkv(4, 2, 33)
    mod = SimpleNamespace(training=False, consa_plan=LayerPlan(0, 2, 8, 0, "fixed", fa_kv=[0], kernels=FUSED))
    pad = torch.ones(2, 1, 33, 33, dtype=torch.bool).tril()
    consa_attention(mod, q, k, v, pad, 0.3)  # a padding mask: split path
    consa_attention(mod, q[:, :, -1:], k, v, None, 0.3)  # one query: split path
    q.requires_grad_(True)
    consa_attention(mod, q, k, v, None, 0.3)  # training: split path (flex's LSE-free backward is not ours)
    with pytest.raises(ValueError, match="swa_prefill"):  # the fused call runs the SWA heads on flex: no other kernel
        KernelConfig(hybrid_prefill="fused", swa_prefill="sdpa")


@pytest.mark.parametrize("kind", ["fused", "triton"])
def test_fused_model_logits_equal_split(monkeypatch, kind):
    """A whole tiny Qwen3 with a mixed allocation and sinks: the one-call prefill (FlexAttention, or
    the banded Triton kernel in its interpreter on CPU) gives the split path's logits."""
    from consa.allocation import Allocation
    from consa.attention import triton_decode, triton_prefill

    if kind == "triton":
        if not (triton_prefill.available() and (torch.cuda.is_available() or triton_decode.interpreted())):
            pytest.skip("needs triton: CUDA, or its interpreter")
        calls = []
        real = triton_prefill.hybrid
        monkeypatch.setattr(triton_prefill, "hybrid", lambda *a: calls.append(1) or real(*a))
    dev = "cuda" if kind == "triton" and torch.cuda.is_available() else "cpu"  # Triton compiles on CUDA
    model = tiny_model("qwen3", num_layers=3, num_heads=6, num_kv_heads=3, hidden_size=72).to(dev)
    shape = consa.model_shape(model)
    alloc = Allocation.from_units([True, False, False, False, True, False, False, False, True], "kv_head", shape, 7, 1)
    consa.apply_allocation(model, alloc, kernels=KernelConfig(hybrid_prefill=kind, triton_on_cpu=True))
    ids = torch.randint(3, 101, (2, 45), generator=torch.Generator().manual_seed(3)).to(dev)
    with torch.no_grad():
        fused_logits = model(input_ids=ids).logits
        with select.override(model, hybrid_prefill="split"):
            split_logits = model(input_ids=ids).logits
    torch.testing.assert_close(fused_logits, split_logits, atol=1e-4, rtol=0)
    assert kind != "triton" or calls, "the one-launch Triton prefill was not taken"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("t,window,sinks", [(2048, 512, 0), (3001, 128, 4)])
def test_fused_prefill_on_gpu(t, window, sinks):
    q, k, v = _qkv(16, 8, t, d=128, b=1, device="cuda", dtype=torch.bfloat16)
    fa_kv = [1, 2]
    mod = SimpleNamespace(training=False, consa_plan=LayerPlan(0, 8, window, sinks, "fixed", fa_kv=fa_kv, kernels=FUSED))
    out = consa_attention(mod, q, k, v, None, 128**-0.5)[0].transpose(1, 2)
    allowed = per_head_allowed([(h // 2) in fa_kv for h in range(16)], t, t, window, sinks, None, "cuda")
    ref = reference_attention(q.float(), k.float(), v.float(), allowed, 128**-0.5)
    assert ((out.float() - ref.float()).norm() / ref.float().norm()) < 1e-2
