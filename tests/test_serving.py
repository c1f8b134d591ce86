"""Generation through the static engine (consa.serving): the same greedy tokens as the eager HybridCache
path and, for an all-FA allocation, as plain transformers; batches of unequal prompts; many prompts in
fixed batches; end tokens; the switch; CUDA graphs on the GPU."""

from __future__ import annotations

import pytest
import torch

import consa
from consa.allocation import Allocation
from consa.attention import select, triton_decode
from consa.serving.generate import generate
from consa.serving import DecodeEngine, generate_many, generate_static
from consa.tiny import tiny_model

CUDA = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
MIXED = lambda n: [[(i % 3 == 0 and k == 1) or (i % 3 == 1 and k == 0) for k in range(2)] for i in range(n)]  # noqa: E731


def _model(rows="mixed", window=4, sinks=1, layers=3, device="cpu", **kw):
    model = tiny_model("qwen3", num_kv_heads=2, num_layers=layers, **kw).to(device)
    shape = consa.model_shape(model)
    rows = {"mixed": MIXED(layers), "fa": [[True, True]] * layers, "swa": [[False, False]] * layers}[rows]
    consa.apply_allocation(model, Allocation("kv_head", shape, window, tuple(map(tuple, rows)), sinks))
    return model


def _batch(device="cpu", seed=2):
    """Three prompts of 11, 8 and 5 tokens, left-padded (padding longer than the window on row 2)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 101, (3, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[2, :6] = 0
    ids[mask == 0] = 0
    return ids.to(device), mask.to(device)


KW = dict(max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=None)


@pytest.mark.parametrize("rows,window,sinks", [("mixed", 4, 1), ("mixed", 3, 0), ("swa", 5, 2)])
def test_static_equals_eager_hybrid_cache(rows, window, sinks, one_thread):
    model = _model(rows, window, sinks)
    ids, mask = _batch()
    want = generate(model, ids, static=False, attention_mask=mask, **KW)
    got = generate(model, ids, static=True, attention_mask=mask, **KW)
    assert got.shape == want.shape == (3, 21)
    assert torch.equal(got, want)


def test_all_fa_allocation_equals_plain_transformers(one_thread):
    model = _model("fa")
    ids, mask = _batch()
    got = generate(model, ids, static=True, attention_mask=mask, **KW)
    consa.detach(model)
    want = model.generate(ids, attention_mask=mask, **KW)
    assert torch.equal(got, want)


@pytest.mark.skipif(not triton_decode.interpreted(), reason="runs the Triton kernel on CPU tensors (interpreter)")
def test_static_kernel_path_in_the_interpreter(monkeypatch, one_thread):
    """The same tokens when the decode steps take the Triton kernel's static mode (lengths on device)."""
    model = _model("mixed", 4, 1, layers=2)
    ids, mask = _batch()
    kw = dict(KW, max_new_tokens=4)
    want = generate(model, ids, static=False, attention_mask=mask, **kw)
    calls = []
    real = triton_decode.hybrid_decode
    monkeypatch.setattr(triton_decode, "hybrid_decode", lambda *a, **k: calls.append(k.get("length")) or real(*a, **k))
    with select.override(model, triton_on_cpu=True):
        got = generate(model, ids, static=True, attention_mask=mask, **kw)
    assert torch.equal(got, want)
    assert len(calls) == 2 * 3 and all(c is not None for c in calls)  # 2 layers × 3 decode steps, static mode


def test_end_tokens_stop_like_transformers(one_thread):
    model = _model()
    ids, mask = _batch()
    free = generate(model, ids, static=False, attention_mask=mask, **KW)
    eos = int(free[1, 13])  # a token row 1 emits third: that row ends early, the others go on
    kw = dict(KW, eos_token_id=eos, max_new_tokens=12)
    want = generate(model, ids, static=False, attention_mask=mask, **kw)
    got = generate(model, ids, static=True, attention_mask=mask, **kw)
    assert torch.equal(got, want)
    assert (got[1, 14:] == 0).all()  # padded after its end token


def test_generate_many_equals_batched_calls_in_order(one_thread):
    model = _model()
    ids, mask = _batch()
    prompts = [ids[i][mask[i].bool()] for i in range(3)]
    got = generate_many(model, prompts, batch_size=2, **KW)
    # sorted by length: (5, 8) in one batch, then (11 + a filler copy)
    order = [[2, 1], [0, 0]]
    for rows in order:
        t = max(len(prompts[i]) for i in rows)
        b_ids = torch.stack([torch.cat([torch.zeros(t - len(prompts[i]), dtype=torch.long), prompts[i]]) for i in rows])
        b_mask = torch.stack([torch.cat([torch.zeros(t - len(prompts[i]), dtype=torch.long), torch.ones(len(prompts[i]), dtype=torch.long)]) for i in rows])
        want = generate(model, b_ids, static=False, attention_mask=b_mask, **KW)
        for r, i in enumerate(rows):
            assert got[i] == want[r, t:].tolist()
    assert generate(model, [p.tolist() for p in prompts], batch_size=2, **KW) == got  # the list form of consa.generate


def test_top_k_one_sampling_is_greedy(one_thread):
    model = _model()
    ids, mask = _batch()
    greedy = generate(model, ids, static=True, attention_mask=mask, **KW)
    sampled = generate(model, ids, static=True, attention_mask=mask, **dict(KW, do_sample=True, top_k=1, temperature=0.7))
    assert torch.equal(sampled, greedy)


def test_switch_and_unsupported_options():
    model = _model()
    ids, mask = _batch()
    with pytest.raises(ValueError, match="num_beams"):
        generate(model, ids, static=True, attention_mask=mask, num_beams=2, **KW)
    engine = DecodeEngine(model, 2, 8, cuda_graphs=False)
    with pytest.raises(ValueError, match="batch 2"):
        engine.prefill(ids, mask)
    with pytest.raises(ValueError, match="no room"):
        DecodeEngine(model, 3, 8, cuda_graphs=False).prefill(ids, mask)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            DecodeEngine(model, 3, 30, cuda_graphs=True)


@pytest.mark.parametrize("rows", ["mixed", "fa"])
def test_cuda_graph_decode_equals_eager_paths(rows):
    """Graphs on: the same tokens as the static path run eagerly and as the eager HybridCache path;
    the engine's graph is captured once and reused by the next call."""
    model = _model(rows, 4, 1, device="cuda", layers=3, hidden_size=128, num_heads=4, head_dim=32)
    ids, mask = _batch("cuda")
    want = generate(model, ids, static=False, attention_mask=mask, **KW)
    eager = generate_static(model, ids, cuda_graphs=False, attention_mask=mask, **KW)
    engine = DecodeEngine(model, 3, 30, pad=0)
    assert engine.graphs
    got = generate_static(model, ids, engine=engine, attention_mask=mask, **KW)
    graph = engine._graphs["greedy"]
    again = generate_static(model, ids, engine=engine, attention_mask=mask, **KW)
    assert torch.equal(eager, want) and torch.equal(got, want) and torch.equal(again, want)
    assert engine._graphs["greedy"] is graph


@pytest.mark.parametrize("graphs", [False, True])
def test_decode_steps_make_no_host_sync(graphs):
    """Eager static steps (transformers' forward, the cache update, the kernel, the choice) never wait
    for the GPU: what lets the step be captured, and what keeps the eager path from stalling."""
    model = _model("mixed", 4, 1, device="cuda", layers=2, hidden_size=128, num_heads=4, head_dim=32)
    ids, mask = _batch("cuda")
    engine = DecodeEngine(model, 3, 40, pad=0, cuda_graphs=graphs)
    engine.prefill(ids, mask)
    engine.decode(1)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        engine.decode(8)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert engine.generated(10).shape == (3, 10)


for _name in ("test_cuda_graph_decode_equals_eager_paths", "test_decode_steps_make_no_host_sync"):
    for _mark in CUDA:
        globals()[_name] = _mark(globals()[_name])
