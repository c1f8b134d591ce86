"""Per-unit spans (issue 16, item 5): each SWA unit its own window, served everywhere consa attends.

Every path is checked against a float64 dense reference whose per-head mask is built from the
allocation itself (``Allocation.span``), not from the plans the runtime derives from it.
"""

from __future__ import annotations

import json

import os

import pytest
import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

import consa
from consa.allocation import Allocation, AllocationError, ModelShape
from consa.attention import kernels, triton_prefill
from consa.attention.cache import HybridCache, SpanGroupsLayer
from consa.attention.plan import GroupedKV, KernelConfig, LayerPlan
from consa.compat import cache_kwargs
from consa.models import plans_of
from consa.tiny import tiny_model

ATOL = 2e-4
_ALLOC: dict = {}  # the allocation the reference reads (by test)


def _reference(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """float64 softmax under causal ∧ padding ∧ (per KV head: its own span band + sinks)."""
    alloc = _ALLOC["alloc"]
    tq, tk = query.shape[2], key.shape[2]
    g = query.shape[1] // key.shape[1]
    q = torch.arange(tk - tq, tk)[:, None]
    k = torch.arange(tk)[None, :]
    rows = []
    for h in range(query.shape[1]):
        span, fixed = alloc.span[module.layer_idx][h // g], alloc.fixed[module.layer_idx][h // g]
        sinks = 0 if fixed else alloc.sinks
        rows.append((k <= q) if span is None else (k <= q) & ((q - k < span) | (k < sinks)))
    allowed = torch.stack(rows)[None]
    if attention_mask is not None:
        allowed = allowed & attention_mask[..., -tk:]
    out = kernels.reference_attention(query, key, value, allowed, scaling)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register("consa_spans_ref", _reference)
AttentionMaskInterface.register("consa_spans_ref", ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


def _inputs(vocab, batch, length, pad, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    if pad:
        mask[0, :pad] = 0
        ids[0, :pad] = 0
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def _logits(model, ids, mask, pos, **kw):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=pos, **kw).logits


# layer 0: {3, 5, 8, FA} across the heads of one layer; layer 1: {5, 5, 3, 8}; layer 2: all FA but one
SPANS_KV3 = [3, 8, None, 5, 5, 3, None, None, 8]
SPANS_KV4 = [3, 5, 8, None, 5, 5, 3, 8, None, None, 7, None]


def _spans_model(family, kv, q_per_kv, sinks, spans):
    model = tiny_model(family, num_kv_heads=kv, num_heads=kv * q_per_kv, hidden_size=72 if kv * q_per_kv == 9 else 64, num_layers=3)
    alloc = Allocation.from_spans(spans, "kv_head", consa.model_shape(model), sinks=sinks)
    return model, alloc


# ---- the format ----------------------------------------------------------------------------------
def test_from_spans_window_stats_and_round_trip(tmp_path):
    shape = ModelShape(3, 4, 8)
    alloc = Allocation.from_spans(SPANS_KV4, "kv_head", shape, sinks=2)
    assert alloc.window == 8 and alloc.spans() == [3, 5, 7, 8] and alloc.multi_span
    assert alloc.span[0] == (3, 5, 8, None) and alloc.fa[0] == (False, False, False, True)
    assert alloc.num_swa == 8 and alloc.stats()["spans"] == [3, 5, 7, 8]
    assert alloc.head_windows(1) == [(5, 2), (5, 2), (3, 2), (8, 2)]
    # KV held at T: FA heads T, SWA heads min(T, span − 1 + sinks)
    t = 9
    assert alloc.kv_slots(t) == sum(t if s is None else min(t, s - 1 + 2) for s in SPANS_KV4)
    assert alloc.kv_slots(3) == 12 * 3 and alloc.kv_share(t) == alloc.kv_slots(t) / (12 * t)
    back = Allocation.load(alloc.save(tmp_path / "a.json"))
    assert back == alloc and back.span == alloc.span
    # sinks alone may change without collapsing the spans; another window collapses them
    assert alloc.with_window(8, 0).span == alloc.span and alloc.with_window(8, 0).sinks == 0
    assert alloc.with_window(4).spans() == [4]
    # layer granularity: one span per layer
    lay = Allocation.from_spans([4, None, 9], "layer", shape)
    assert lay.span == ((4,) * 4, (None,) * 4, (9,) * 4) and lay.window == 9


def test_single_window_files_load_unchanged():
    shape = ModelShape(2, 2, 4)
    old = Allocation.from_units([False, True, False, False], "kv_head", shape, 6, sinks=1)
    assert old == Allocation.from_spans([6, None, 6, 6], "kv_head", shape, sinks=1)
    assert not old.multi_span and old.spans() == [6]
    v1 = {k: v for k, v in old.to_dict().items() if k not in ("span", "fixed")} | {"version": 1}
    assert Allocation.from_dict(v1) == old


@pytest.mark.parametrize("doc_edit,match", [
    (lambda d: d["span"][0].__setitem__(0, 0), "span must be an integer >= 1"),
    (lambda d: d["span"][0].__setitem__(0, 2.5), "'span' entries must be null or an integer"),
    (lambda d: d.__setitem__("window", 7), "window 7 must be the largest span"),
    (lambda d: d["span"][1].__setitem__(0, None), "span must be null exactly for full-attention units"),
])
def test_malformed_spans_are_one_error_line(doc_edit, match):
    doc = Allocation.from_spans([3, 5, 5, None], "kv_head", ModelShape(2, 2, 4)).to_dict()
    doc_edit(doc)
    with pytest.raises(AllocationError, match=match) as e:
        Allocation.from_dict(json.loads(json.dumps(doc)))
    assert "\n" not in str(e.value)


def test_malformed_spans_from_the_constructor():
    shape = ModelShape(2, 2, 4)
    with pytest.raises(AllocationError, match="several spans"):
        Allocation("layer", shape, 5, ((False, False), (True, True)), span=((3, 5), (None, None)))
    with pytest.raises(AllocationError, match="unit 1: span must be"):
        Allocation.from_spans([3, 0, 5, None], "kv_head", shape)
    with pytest.raises(AllocationError, match="needs an explicit window"):
        Allocation.from_spans([None] * 4, "kv_head", shape)


# ---- model logits and the eager cache -------------------------------------------------------------
@pytest.mark.parametrize("family,kv,g,sinks,spans,prompt,pad", [
    ("qwen3", 4, 2, 0, SPANS_KV4, 11, 3),  # GQA 2, prefill longer than every span
    ("llama", 3, 3, 2, SPANS_KV3, 4, 1),  # GQA 3, sinks, prompt shorter than a span
    ("gemma3_text", 4, 1, 1, SPANS_KV4, 7, 0),  # MHA
])
def test_logits_and_cached_generation_equal_the_per_head_reference(family, kv, g, sinks, spans, prompt, pad):
    model, alloc = _spans_model(family, kv, g, sinks, spans)
    total = prompt + 6
    ids, mask, pos = _inputs(model.config.vocab_size, 2, total, pad)
    valid = mask.bool()
    consa.apply_allocation(model, alloc)
    _ALLOC["alloc"] = alloc
    model.set_attn_implementation("consa_spans_ref")
    ref = _logits(model, ids, mask, pos)
    model.set_attn_implementation("consa")
    plain = _logits(model, ids, mask, pos)
    torch.testing.assert_close(plain[valid], ref[valid], atol=ATOL, rtol=0)
    # the spans matter: one window for every SWA head gives other logits
    consa.apply_allocation(model, alloc.with_window(alloc.window - 1) if alloc.window > 3 else alloc.with_window(9))
    assert (_logits(model, ids, mask, pos)[valid] - ref[valid]).abs().max() > 1e-3
    consa.apply_allocation(model, alloc)

    cache = HybridCache(plans_of(model))
    assert isinstance(cache.layers[0], SpanGroupsLayer)
    out, start, d = [], 0, model.config.head_dim
    for n in [prompt] + [1] * 6:
        end = start + n
        with torch.no_grad():
            o = model(input_ids=ids[:, start:end], attention_mask=mask[:, :end], position_ids=pos[:, start:end],
                      **cache_kwargs(cache, model), use_cache=True)
        out.append(o.logits)
        assert cache.stored_elements() == 2 * 2 * d * alloc.kv_slots(end), end  # held = the cost model
        start = end
    torch.testing.assert_close(torch.cat(out, 1)[valid], ref[valid], atol=ATOL, rtol=0)


def test_greedy_generate_matches_uncached_on_the_eager_and_the_static_path():
    model, alloc = _spans_model("qwen2", 4, 2, 1, SPANS_KV4)
    consa.apply_allocation(model, alloc)
    ids, mask, _ = _inputs(model.config.vocab_size, 2, 7, pad=2)
    kw = dict(attention_mask=mask, max_new_tokens=8, pad_token_id=0, eos_token_id=None, do_sample=False)
    cache = HybridCache(plans_of(model))
    out = model.generate(ids, **cache_kwargs(cache, model), **kw)
    fmask = torch.cat([mask, torch.ones(2, 8, dtype=mask.dtype)], 1)
    logits = _logits(model, out, fmask, (fmask.cumsum(-1) - 1).clamp(min=0))
    assert torch.equal(logits[:, 6:-1].argmax(-1), out[:, 7:])
    assert cache.stored_elements() == 2 * 2 * model.config.head_dim * alloc.kv_slots(7 + 8 - 1)
    # the static cache serves several spans per layer too (one ring per span group): same tokens
    from consa.serving import generate as serving

    assert serving.static_supported(model, {}) is None
    assert torch.equal(serving.generate_static(model, ids, cuda_graphs=False, **kw)[:, 7:], out[:, 7:])
    assert torch.equal(consa.generate(model, ids, static=True, cuda_graphs=False, **kw)[:, 7:], out[:, 7:])
    many = consa.generate(model, [ids[1].tolist(), ids[1, :4].tolist()], max_new_tokens=3, do_sample=False,
                          pad_token_id=0, eos_token_id=None, cuda_graphs=False)
    assert many[0] == out[1, 7:10].tolist() and len(many[1]) == 3


@pytest.mark.parametrize("chunks", [[6], [5, 3], [1]])
@pytest.mark.parametrize("family, kv, g, sinks, spans", [("qwen2", 4, 2, 1, SPANS_KV4), ("qwen3", 3, 3, 0, SPANS_KV3)])
def test_static_cache_with_several_spans_equals_the_reference(chunks, family, kv, g, sinks, spans, one_thread):
    """One ring per span group: prefill (one chunk, two, or token by token), then decode past every ring's
    wrap; the logits of every real position equal the float64 per-head reference, and each group holds
    exactly S + W (+ rollback) slots per SWA head."""
    from consa.attention.static_cache import StaticHybridCache, StaticSpanGroupsLayer

    model, alloc = _spans_model(family, kv, g, sinks, spans)
    ids, mask, pos = _inputs(model.config.vocab_size, 2, 19, pad=3)
    _ALLOC["alloc"] = alloc
    model.set_attn_implementation("consa_spans_ref")
    want = _logits(model, ids, mask, pos)
    consa.apply_allocation(model, alloc)
    cache = StaticHybridCache(plans_of(model), 24, rollback=1)
    got, start = [], 0
    for n in chunks + [1] * (ids.shape[1] - sum(chunks)):
        end = start + n
        got.append(_logits(model, ids[:, start:end], mask[:, :end], pos[:, start:end], use_cache=True,
                           **cache_kwargs(cache, model)))
        start = end
    valid = mask.bool()
    torch.testing.assert_close(torch.cat(got, 1)[valid], want[valid], atol=ATOL, rtol=0)
    d = model.config.head_dim
    for i, layer in enumerate(cache.layers):
        heads = alloc.head_windows(i)
        if len({hw[0] for hw in heads if hw is not None}) > 1:
            assert isinstance(layer, StaticSpanGroupsLayer)
        n_fa = sum(hw is None for hw in heads)
        want_elems = 2 * 2 * d * (n_fa * 24 + sum(min(24, hw[1] + hw[0] + 1) for hw in heads if hw is not None))
        assert layer.stored_elements() == want_elems
    # crop rolls every group back alike; beyond the ring's rollback it is refused and nothing changes
    cache.crop(-2)
    assert cache.get_seq_length() == 17 and all(int(x.length) == 17 for layer in cache.layers
                                                 for x in ([layer] if not hasattr(layer, "groups") else [g_[2] for g_ in layer.groups]))
    with pytest.raises(RuntimeError, match="roll back"):
        cache.crop(-5)
    assert cache.get_seq_length() == 17


def test_grouped_cache_rolls_back_drafts():
    """crop (assisted decoding) rolls every span group back; a slot a group dropped is one clear error."""
    plan = LayerPlan(0, 3, 6, 1, "fixed", fa_kv=[1], windows=(3, None, 6))
    layer = SpanGroupsLayer(plan)
    k = torch.randn(1, 3, 10, 4)
    keys, _ = layer.update(k, k)
    assert isinstance(keys, GroupedKV) and [g[0].shape[-2] for g in keys.groups] == [10, 10]
    assert layer.stored_elements() == 2 * 4 * (10 + min(10, 3 - 1 + 1) + min(10, 6 - 1 + 1))
    layer.activate_past_recording()
    layer.update(k[..., :3, :], k[..., :3, :])
    layer.crop(-2)
    assert layer.get_seq_length() == 11 and layer.fa.fa_keys.shape[-2] == 11
    with pytest.raises(RuntimeError, match="no longer hold"):
        layer.crop(-3)


# ---- one span = today's path, bit for bit ----------------------------------------------------------
def test_single_span_plan_is_todays_plan_and_bit_identical():
    model = tiny_model("qwen3", num_kv_heads=4, num_heads=8, num_layers=2)
    shape = consa.model_shape(model)
    one = Allocation.from_spans([5, None, 5, 5, 5, 5, None, 5], "kv_head", shape, sinks=1)
    old = Allocation.from_units([False, True, False, False, False, False, True, False], "kv_head", shape, 5, sinks=1)
    plans = [LayerPlan.from_allocation(one, i) for i in range(2)]
    assert plans == [LayerPlan(i, 4, 5, 1, "fixed", fa_kv=old.fa_heads(i)) for i in range(2)]
    assert all(p.windows is None and not p.multi_span for p in plans)
    ids, mask, pos = _inputs(model.config.vocab_size, 2, 13, pad=2)
    consa.apply_allocation(model, old)
    a = _logits(model, ids, mask, pos)
    consa.apply_allocation(model, one)
    assert torch.equal(_logits(model, ids, mask, pos), a)
    assert not any(isinstance(layer, SpanGroupsLayer) for layer in HybridCache(plans_of(model)).layers)


# ---- the one-launch Triton prefill with per-head windows ------------------------------------------
@pytest.mark.skipif(not triton_prefill.available(), reason="needs triton")
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="runs the kernel on CPU tensors (triton's interpreter)")
def test_triton_prefill_runs_mixed_spans_in_one_launch(monkeypatch):
    from types import SimpleNamespace

    from consa.attention.hybrid import consa_attention

    calls = []
    real = triton_prefill.banded_attention
    monkeypatch.setattr(triton_prefill, "banded_attention", lambda q, k, v, wins, *a, **kw: calls.append(wins) or real(q, k, v, wins, *a, **kw))
    b, hk, g, t, d, sinks = 2, 3, 2, 37, 16, 2
    windows = (4, None, 9)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, t, h, d, generator=gen).transpose(1, 2) for h in (hk * g, hk, hk))
    plan = LayerPlan(0, hk, 9, sinks, "fixed", fa_kv=[1], windows=windows,
                     kernels=KernelConfig(hybrid_prefill="triton", triton_on_cpu=True))
    out = consa_attention(SimpleNamespace(training=False, consa_plan=plan), q, k, v, None, 0.3)[0]
    assert calls == [(4, t, 9)]
    i, j = torch.arange(t)[:, None], torch.arange(t)[None, :]
    allowed = torch.stack([(j <= i) & (True if windows[h // g] is None else ((i - j < windows[h // g]) | (j < sinks)))
                           for h in range(hk * g)])[None]
    want = kernels.reference_attention(q, k, v, allowed, 0.3).transpose(1, 2)
    torch.testing.assert_close(out.double(), want.double(), atol=1e-5, rtol=0)
    plan.kernels = KernelConfig()  # the grouped path ("split") agrees
    torch.testing.assert_close(consa_attention(SimpleNamespace(training=False, consa_plan=plan), q, k, v, None, 0.3)[0],
                               out, atol=1e-5, rtol=0)


# ---- export ----------------------------------------------------------------------------------------
def test_head_wise_export_with_spans_loads_with_the_same_logits(tmp_path):
    from consa.export import export, load, native_blocker

    model, alloc = _spans_model("qwen3", 4, 2, 1, SPANS_KV4)
    lay = Allocation.from_spans([4, None, 6], "layer", consa.model_shape(model))
    assert "several spans [4, 6]" in native_blocker(model, lay)
    ids, mask, pos = _inputs(model.config.vocab_size, 2, 12, pad=2)
    valid = mask.bool()
    export(model, alloc, tmp_path / "out")
    stored = Allocation.from_dict(json.loads((tmp_path / "out" / "config.json").read_text())["consa"]["allocation"])
    assert sorted(map(sorted, (map(str, r) for r in stored.span))) == sorted(map(sorted, (map(str, r) for r in alloc.span)))
    consa.apply_allocation(model, alloc)
    want = _logits(model, ids, mask, pos)
    loaded = load(tmp_path / "out")
    torch.testing.assert_close(_logits(loaded, ids, mask, pos)[valid], want[valid], atol=ATOL, rtol=0)
    # the shipped pure-PyTorch path (no consa kernels) and its per-span-group cache agree too
    from consa.export_code import modeling_consa as mc

    loaded.set_attn_implementation("consa_ref_shipped")
    cache = mc.ReferenceHybridCache(loaded.config)
    out, start = [], 0
    for n in [8, 1, 1, 1, 1]:
        with torch.no_grad():
            o = loaded(input_ids=ids[:, start:start + n], attention_mask=mask[:, :start + n],
                       position_ids=pos[:, start:start + n], **cache_kwargs(cache, loaded), use_cache=True)
        out.append(o.logits)
        start += n
        assert sum(layer.stored_elements() for layer in cache.layers) == 2 * 2 * loaded.config.head_dim * stored.kv_slots(start)
    torch.testing.assert_close(torch.cat(out, 1)[valid], want[valid], atol=ATOL, rtol=0)


def _shipped(module, *a, **kw):
    from consa.export_code import modeling_consa as mc

    return mc.reference_attention(module, *a, **kw)


AttentionInterface.register("consa_ref_shipped", _shipped)
AttentionMaskInterface.register("consa_ref_shipped", ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


# ---- the heatmap -----------------------------------------------------------------------------------
def test_heatmap_draws_a_colour_per_span_and_a_legend(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import to_rgb

    from consa import heatmap

    figs = []
    real_close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: figs.append(fig) or real_close(fig))
    alloc = Allocation.from_spans(SPANS_KV4, "kv_head", ModelShape(3, 4, 8))
    path = heatmap.plot_allocation(alloc, tmp_path / "h.png")
    labels = [t.get_text() for leg in figs[0].legends for t in leg.get_texts()]
    assert labels == ["span 3", "span 5", "span 7", "span 8", "FA"]
    img = plt.imread(path)[..., :3]
    colours = list(heatmap.span_colours(alloc.spans()).values()) + [heatmap.FA_COLOUR]
    for c in colours:  # every span's colour (and FA's) is on the picture, in a cell-sized area
        near = (np.abs(img - np.array(to_rgb(c))) < 0.02).all(-1).sum()
        assert near > 200, c
    # one window: the two-colour picture of before, no legend
    figs.clear()
    heatmap.plot_allocation(Allocation.from_units([False, True] * 6, "kv_head", ModelShape(3, 4, 8), 5), tmp_path / "o.png")
    assert not figs[0].legends
    yellow = (np.abs(plt.imread(tmp_path / "o.png")[..., :3] - np.array(to_rgb("#f2c14e"))) < 0.02).all(-1).sum()
    assert yellow > 200


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_static_spans_decode_captures_one_graph_with_the_eager_tokens():
    """On CUDA the multi-span static step (a write and a decode launch per span group) is captured as one
    graph (a host sync inside would fail the capture) and gives the eager cache's greedy tokens."""
    from consa.serving import generate as serving

    model, alloc = _spans_model("qwen2", 4, 2, 1, SPANS_KV4)
    model = model.cuda().to(torch.bfloat16)
    consa.apply_allocation(model, alloc)
    ids, mask, _ = _inputs(model.config.vocab_size, 2, 21, pad=2)
    ids, mask = ids.cuda(), mask.cuda()
    kw = dict(attention_mask=mask, max_new_tokens=12, pad_token_id=0, eos_token_id=None, do_sample=False)
    eager = model.generate(ids, **cache_kwargs(HybridCache(plans_of(model)), model), **kw)
    graphed = serving.generate_static(model, ids, cuda_graphs=True, **kw)
    assert torch.equal(graphed[:, 21:], eager[:, 21:])
