"""The hybrid KV cache: cached = uncached = dense per-head reference, memory = theory, generate works."""

from __future__ import annotations

import pytest
import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

import consa
from consa.compat import cache_kwargs
from consa.allocation import Allocation
from consa.attention import kernels
from consa.attention.cache import HybridCache, HybridLayer
from consa.attention.plan import KeySlots, SplitKV
from consa.models import plans_of
from consa.serving.generate import generate
from consa.tiny import FAMILIES, tiny_model

torch.set_default_dtype(torch.float32)
ATOL = 2e-4


# ---- a dense per-head-mask reference attention (test-only, registered under its own name) -----------
def _reference_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """float64 softmax with an explicit [B, Hq, Tq, Tk] mask: causal ∧ padding ∧ (window band on SWA heads)."""
    plan = module.consa_plan
    b, hq, tq, _ = query.shape
    tk = key.shape[-2]
    q_pos = torch.arange(tk - tq, tk)
    k_pos = torch.arange(tk)
    causal = q_pos[:, None] >= k_pos[None, :]
    band = causal & ((q_pos[:, None] - k_pos[None, :] < plan.window) | (k_pos[None, :] < plan.sinks))
    group = hq // key.shape[1]
    fa_q = torch.tensor([h in plan.fa_kv for h in range(plan.num_kv_heads)]).repeat_interleave(group)
    allowed = torch.where(fa_q[:, None, None], causal, band)[None].expand(b, -1, -1, -1)
    if attention_mask is not None:
        allowed = allowed & attention_mask[..., -tk:]
    out = kernels.reference_attention(query, key, value, allowed, scaling)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register("consa_ref", _reference_attention)
AttentionMaskInterface.register("consa_ref", ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


def _allocation(model, window, sinks, pattern="mixed"):
    shape = consa.model_shape(model)
    h = shape.num_kv_heads
    rows = []
    for layer in range(shape.num_layers):
        if pattern == "layer":
            rows.append([layer % 2 == 0] * h)
        else:  # layer 0: FA on the last head only; 1: FA on head 0; 2: all SWA; ...
            rows.append([(layer % 3 == 0 and k == h - 1) or (layer % 3 == 1 and k == 0) for k in range(h)])
    gran = "layer" if pattern == "layer" else "kv_head"
    return Allocation(gran, shape, window, tuple(map(tuple, rows)), sinks)


def _inputs(model, batch, length, pad, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, model.config.vocab_size, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    if pad:
        mask[0, :pad] = 0  # left padding on row 0
        ids[0, :pad] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, pos


def _logits(model, ids, mask, pos, **kw):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=pos, **kw).logits


def _cached_logits(model, ids, mask, pos, chunks, cache):
    """Feed ``ids`` through the cache in the given chunk sizes (then one token at a time)."""
    out, start = [], 0
    sizes = list(chunks) + [1] * (ids.shape[1] - sum(chunks))
    mem = []
    for n in sizes:
        end = start + n
        with torch.no_grad():
            o = model(
                input_ids=ids[:, start:end], attention_mask=mask[:, :end], position_ids=pos[:, start:end],
                **cache_kwargs(cache, model), use_cache=True,
            )
        out.append(o.logits)
        mem.append((end, [layer.stored_elements() for layer in cache.layers]))
        start = end
    return torch.cat(out, dim=1), mem


def _theory(alloc, layer, batch, head_dim, t):
    n_fa = len(alloc.fa_heads(layer))
    n_swa = alloc.shape.num_kv_heads - n_fa
    return 2 * batch * head_dim * (n_fa * t + n_swa * min(t, alloc.window - 1 + alloc.sinks))


CASES = [
    # family, kv heads (2 = GQA, 4 = MHA), window, sinks, prompt length (chunks), pad
    (fam, kv, w, s, prompt, pad)
    for fam in FAMILIES
    for (kv, w, s, prompt, pad) in [(2, 5, 0, 11, 3), (4, 6, 2, 3, 1)]
]


@pytest.mark.parametrize("family,kv,window,sinks,prompt,pad", CASES)
def test_cached_equals_uncached_equals_reference(family, kv, window, sinks, prompt, pad):
    model = tiny_model(family, num_kv_heads=kv, num_layers=3)
    alloc = _allocation(model, window, sinks)
    total = prompt + 6
    ids, mask, pos = _inputs(model, 2, total, pad)
    valid = mask.bool()

    consa.apply_allocation(model, alloc)
    model.set_attn_implementation("consa_ref")
    ref = _logits(model, ids, mask, pos)
    model.set_attn_implementation("consa")
    plain = _logits(model, ids, mask, pos)
    torch.testing.assert_close(plain[valid], ref[valid], atol=ATOL, rtol=0)

    cache = HybridCache(plans_of(model))
    chunks = [prompt] if prompt < 6 else [4, prompt - 4]  # chunked prefill when the prompt is long
    cached, mem = _cached_logits(model, ids, mask, pos, chunks, cache)
    torch.testing.assert_close(cached[valid], ref[valid], atol=ATOL, rtol=0)
    head_dim = model.config.head_dim
    for t, per_layer in mem:  # after the prefill chunks and after every decode step
        assert per_layer == [_theory(alloc, i, 2, head_dim, t) for i in range(len(per_layer))], t


def test_prompt_longer_than_window_keeps_only_window():
    model = tiny_model("qwen3", num_layers=2)
    alloc = _allocation(model, window=4, sinks=1)
    consa.apply_allocation(model, alloc)
    ids, mask, pos = _inputs(model, 3, 17, pad=5)
    cache = HybridCache(plans_of(model))
    ref = _logits(model, ids, mask, pos)
    got, mem = _cached_logits(model, ids, mask, pos, [17], cache)
    torch.testing.assert_close(got[mask.bool()], ref[mask.bool()], atol=ATOL, rtol=0)
    layer = cache.layers[1]  # layer 1: FA head 0, SWA head 1
    assert layer.fa_keys.shape[-2] == 17 and layer.swa_keys.shape[-2] == 4 - 1 + 1
    assert layer.stored_elements() == _theory(alloc, 1, 3, model.config.head_dim, 17)


@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_reordered_heads_same_logits_and_contiguous_split(family):
    model = tiny_model(family, num_kv_heads=4, num_layers=3, attention_bias=True if family == "llama" else None)
    with torch.no_grad():  # biases non-zero so that their permutation matters
        for n, p in model.named_parameters():
            if n.endswith("bias"):
                p.normal_()
    alloc = _allocation(model, window=5, sinks=0)
    ids, mask, pos = _inputs(model, 2, 14, pad=2)
    base = _logits(model, ids, mask, pos)
    consa.apply_allocation(model, alloc)
    hybrid = _logits(model, ids, mask, pos)
    new = consa.reorder_heads(model, alloc)
    consa.detach(model)
    torch.testing.assert_close(_logits(model, ids, mask, pos), base, atol=ATOL, rtol=0)  # same full model
    consa.apply_allocation(model, new)
    torch.testing.assert_close(_logits(model, ids, mask, pos), hybrid, atol=ATOL, rtol=0)  # same hybrid model
    cache = HybridCache(plans_of(model))
    got, _ = _cached_logits(model, ids, mask, pos, [9], cache)
    torch.testing.assert_close(got[mask.bool()], hybrid[mask.bool()], atol=ATOL, rtol=0)
    assert all(isinstance(layer._fa_sel, slice) for layer in cache.layers)


def test_generate_greedy_matches_no_cache_and_sampling_runs():
    model = tiny_model("qwen2", num_layers=3)
    alloc = _allocation(model, window=4, sinks=1)
    consa.apply_allocation(model, alloc)
    ids, mask, _ = _inputs(model, 2, 7, pad=2)
    kw = dict(attention_mask=mask, max_new_tokens=8, pad_token_id=0, eos_token_id=None)
    cache = HybridCache(plans_of(model))
    out = model.generate(ids, **cache_kwargs(cache, model), do_sample=False, **kw)
    assert cache.get_seq_length() == 7 + 8 - 1
    assert cache.layers[2].swa_keys.shape[-2] == 4 - 1 + 1  # all-SWA layer stays at W−1+S
    # the same greedy continuation, recomputed without any cache
    full = out.clone()
    fmask = torch.cat([mask, torch.ones(2, 8, dtype=mask.dtype)], dim=1)
    fpos = (fmask.cumsum(-1) - 1).clamp(min=0)
    logits = _logits(model, full, fmask, fpos)
    assert torch.equal(logits[:, 6:-1].argmax(-1), full[:, 7:])
    # the helper builds the cache itself; sampling with a fixed seed is reproducible
    torch.manual_seed(3)
    s1 = generate(model, ids, do_sample=True, top_k=20, **kw)
    torch.manual_seed(3)
    s2 = model.generate(ids, **cache_kwargs(HybridCache(plans_of(model)), model), do_sample=True, top_k=20, **kw)
    assert torch.equal(s1, s2) and s1.shape == (2, 15)
    assert torch.equal(generate(model, ids, do_sample=False, **kw), out)


def test_layer_kinds_and_split_output():
    layer = HybridLayer(num_kv_heads=3, fa_kv=[1], window=3, sinks=1)
    k = torch.randn(2, 3, 6, 4)
    v = torch.randn(2, 3, 6, 4)
    ks, vs = layer.update(k, v)
    assert isinstance(ks, SplitKV) and ks.swa_slots == KeySlots()
    torch.testing.assert_close(ks.fa, k[:, 1:2])
    torch.testing.assert_close(ks.swa, k[:, [0, 2]])
    assert layer.swa_slots == KeySlots(num_sinks=1, offset=4)
    torch.testing.assert_close(layer.swa_keys, k[:, [0, 2]][:, :, [0, 4, 5]])
    ks, _ = layer.update(k[:, :, :1], v[:, :, :1])
    assert ks.swa.shape[-2] == 4 and ks.swa_slots == KeySlots(1, 4)
    assert layer.get_mask_sizes(1) == (8, 0) and layer.get_seq_length() == 7
    fa_only = HybridLayer(num_kv_heads=2, fa_kv=[0, 1], window=3)
    kk, vv = fa_only.update(k[:, :2], v[:, :2])
    assert isinstance(kk, torch.Tensor) and kk.shape == (2, 2, 6, 4)


def test_cache_needs_fixed_allocation():
    model = tiny_model("qwen3", num_layers=2)
    with pytest.raises(ValueError, match="apply_allocation"):
        HybridCache(plans_of(model))
