"""The export's consa-free attention and caches (src/consa/export_code/modeling_consa.py) keep consa's
savings: attention in query blocks over the keys in range only (exact against an independent dense
float64 reference), SWA heads holding sinks + window − 1 slots (bytes = theory), and a fixed-shape
per-head cache that transformers' ``cache_implementation="static"`` (and compiled decode) drives."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from consa import consa_free
from consa.export_code import modeling_consa as mc

W, S = 9, 2
SPAN = 5  # a second span group (per-unit spans): KV heads may differ in window


def _module(fa, spans=None, sinks=S, window=W, layers=1):
    alloc = {"fa": [list(fa)] * layers, "window": window, "sinks": sinks}
    if spans is not None:
        alloc["span"] = [list(spans)] * layers
    return SimpleNamespace(config=SimpleNamespace(consa={"allocation": alloc}), layer_idx=0, training=False)


def _dense(q, k, v, k_pos, q_pos, wins_q, sinks, scale, mask=None, softcap=None, s_aux=None):
    """Independent float64 reference: per query head, scores over every key, one softmax."""
    q, k, v = q.double(), k.double(), v.double()
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = q @ k.transpose(-1, -2) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    qp, kp = q_pos[:, None], k_pos[None, :]
    allowed = []
    for w in wins_q:
        a = (kp <= qp) & (kp >= 0)
        if w is not None:
            a = a & ((qp - kp < w) | (kp < sinks))
        allowed.append(a)
    allowed = torch.stack(allowed)[None]
    if mask is not None:
        allowed = allowed & mask.index_select(-1, k_pos.clamp(min=0))
    scores = scores.masked_fill(~allowed, float("-inf"))
    if s_aux is not None:
        sink = s_aux.double().view(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
        probs = torch.softmax(torch.cat([scores, sink], -1), -1)[..., :-1]
    else:
        probs = torch.softmax(scores, -1)
    return (probs.nan_to_num(0.0) @ v).transpose(1, 2)


FA = (True, False, False)  # 3 KV heads, GQA group 3 (9 query heads): one FA, two SWA heads


@pytest.mark.parametrize("blocked", [True, False])
@pytest.mark.parametrize("t,spans,softcap,sinkl,padded", [
    (37, None, None, False, True),
    (37, (None, W, SPAN), 30.0, True, True),
    (301, None, None, True, False),
    (301, (None, W, SPAN), 20.0, False, True),
])
def test_blocked_attention_matches_dense_float64(monkeypatch, blocked, t, spans, softcap, sinkl, padded):
    if blocked:  # small blocks: many of them, each over the keys in its range only
        monkeypatch.setattr(mc, "BLOCK_ELEMENTS", 700)
        monkeypatch.setattr(mc, "MAX_BLOCK_ROWS", 16)
    g = torch.Generator().manual_seed(t + int(softcap or 0) * 3)
    b, d = 2, 8
    q, k, v = (torch.randn(b, h, t, d, generator=g) * 2 for h in (9, 3, 3))
    s_aux = torch.randn(9, generator=g) if sinkl else None
    mask = None
    if padded:  # transformers' boolean mask: causal AND left padding of row 0
        mask = (torch.arange(t)[None, :] <= torch.arange(t)[:, None]).expand(b, 1, t, t).clone()
        mask[0, :, :, :3] = False
    module = _module(FA, spans)
    got, _ = mc.reference_attention(module, q, k, v, mask, scaling=0.3, softcap=softcap, s_aux=s_aux)
    wins = spans or (None, W, W)
    pos = torch.arange(t)
    want = _dense(q, k, v, pos, pos, [wins[h // 3] for h in range(9)], S, 0.3, mask, softcap, s_aux)
    assert got.shape == (b, t, 9, d)
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=0)


@pytest.mark.parametrize("t,spans,softcap,sinkl", [(37, None, None, True), (130, (None, W, SPAN), 30.0, True),
                                                    (130, None, 20.0, False)])
def test_flex_attention_path_matches_dense_float64(monkeypatch, t, spans, softcap, sinkl):
    """The FlexAttention path (CUDA's default for an unpadded prompt; forced here, uncompiled on CPU):
    BlockMask for causal + window + sinks, softcap as a score_mod, sink logits from the LSE."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    monkeypatch.setattr(mc, "USE_FLEX", True)
    used = []
    real = mc._flex_attend

    def spy(*args):
        out = real(*args)
        used.append(out is not None)
        return out

    monkeypatch.setattr(mc, "_flex_attend", spy)
    g = torch.Generator().manual_seed(t)
    q, k, v = (torch.randn(1, h, t, 16, generator=g) * 2 for h in (9, 3, 3))
    s_aux = torch.randn(9, generator=g) if sinkl else None
    got, _ = mc.reference_attention(_module(FA, spans), q, k, v, None, scaling=0.25, softcap=softcap, s_aux=s_aux)
    wins = spans or (None, W, W)
    pos = torch.arange(t)
    want = _dense(q, k, v, pos, pos, [wins[h // 3] for h in range(9)], S, 0.25, None, softcap, s_aux)
    assert used and all(used), used
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=0)


def test_blocks_see_only_the_keys_in_range(monkeypatch):
    """Peak extra memory: no block's scores span every (query, key) pair; an SWA block sees its rows'
    window range and the sinks only."""
    seen = []
    real = mc._attend_block

    def spy(q, k, *args):
        seen.append((args[4], q.shape[2], k.shape[2]))  # (window, rows, keys)
        return real(q, k, *args)

    monkeypatch.setattr(mc, "_attend_block", spy)
    monkeypatch.setattr(mc, "BLOCK_ELEMENTS", 4096)
    monkeypatch.setattr(mc, "MAX_BLOCK_ROWS", 32)
    t = 301
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, h, t, 8, generator=g) for h in (9, 3, 3))
    mc.reference_attention(_module(FA), q, k, v, None)
    swa = [(r, n) for w, r, n in seen if w is not None]
    fa = [(r, n) for w, r, n in seen if w is None]
    assert len(swa) > 1 and all(n <= r + W - 1 + S for r, n in swa)
    assert all(r * n * 3 <= 4096 for r, n in fa) and max(n for _, n in fa) == t


def test_prefill_keeps_sinks_and_window_only_bytes_equal_theory():
    """After a prefill of T >> W tokens the dynamic cache holds, per layer, T slots on each FA head and
    min(T, W − 1 + S) on each SWA head (its sinks and the window's last W − 1; a query's own slot comes
    with it), for K and V: bytes = 2 × head_dim × dtype bytes × that."""
    layers, t, d = 3, 301, 8
    config = SimpleNamespace(consa={"allocation": {"fa": [list(FA)] * layers, "window": W, "sinks": S,
                                                   "span": [[None, W, SPAN]] * layers}})
    cache = mc.ReferenceHybridCache(config)
    g = torch.Generator().manual_seed(2)
    for i in range(layers):
        k, v = (torch.randn(2, 3, t, d, generator=g, dtype=torch.bfloat16) for _ in range(2))
        cache.layers[i].update(k, v)
    per_layer = 1 * t + min(t, W - 1 + S) + min(t, SPAN - 1 + S)
    want = layers * 2 * 2 * d * per_layer * 2  # batch 2, K and V, bf16
    got = sum(x.numel() * x.element_size() for layer in cache.layers for x in layer.keys + layer.values)
    assert got == want and cache.get_seq_length() == t
    assert [sl.tolist() for sl in cache.layers[0].group_slots] == [[0, 1, 297, 298, 299, 300],
                                                                    [0, 1] + list(range(t - W + 1, t))]


@pytest.mark.parametrize("chunks", [(301,), (7, 1, 1, 150, 1, 1), (1,) * 12 + (40,)])
def test_static_cache_attends_like_every_slot(chunks):
    """Prefill (one chunk or several, longer than the ring or not) then decode through the fixed-shape
    cache = attention over every slot; it holds max_len slots per FA head, sinks + W − 1 per SWA head."""
    module = _module(FA, (None, W, SPAN))
    total, max_len, d = sum(chunks) + 3, sum(chunks) + 10, 8
    chunks = chunks + (1, 1, 1)
    layer = mc.ReferenceHybridStaticLayer(*mc.layer_plan(module), max_cache_len=max_len)
    g = torch.Generator().manual_seed(len(chunks))
    k_all, v_all = (torch.randn(2, 3, total, d, generator=g) for _ in range(2))
    q_all = torch.randn(2, 9, total, d, generator=g)
    s_aux = torch.randn(9, generator=g)
    start = 0
    for n in chunks:
        end = start + n
        held_k, held_v = layer.update(k_all[..., start:end, :], v_all[..., start:end, :])
        assert int(layer.get_seq_length()) == end
        mask = (torch.arange(max_len)[None, :] <= torch.arange(start, end)[:, None]).expand(2, 1, n, max_len).clone()
        mask[1, :, :, :2] = False  # padding
        got, _ = mc.reference_attention(module, q_all[..., start:end, :], held_k, held_v, mask, s_aux=s_aux)
        want, _ = mc.reference_attention(module, q_all[..., start:end, :], k_all[..., :end, :], v_all[..., :end, :],
                                         mask[..., :end], s_aux=s_aux)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        start = end
    assert [t.shape[-2] for t in layer.keys] == [max_len, SPAN - 1 + S, W - 1 + S]  # span groups ascending
    assert layer.stored_elements() == 2 * 2 * d * (max_len + (W - 1 + S) + (SPAN - 1 + S))
    assert sorted(layer.ring_slots[0].tolist()) == [0, 1] + list(range(total - SPAN + 1, total))
    assert sorted(layer.ring_slots[1].tolist()) == [0, 1] + list(range(total - W + 1, total))


def test_static_prompt_into_an_empty_cache_may_take_flex_attention(monkeypatch):
    """An unpadded prompt into the empty static cache attends the prompt alone (no max_len buffer, no
    empty ring slots), so FlexAttention serves it; the decode steps after it stay exact."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    monkeypatch.setattr(mc, "USE_FLEX", True)
    used = []
    real = mc._flex_attend
    monkeypatch.setattr(mc, "_flex_attend", lambda *a: used.append(1) or real(*a))
    module = _module(FA, (None, W, SPAN))
    layer = mc.ReferenceHybridStaticLayer(*mc.layer_plan(module), max_cache_len=80)
    g = torch.Generator().manual_seed(5)
    k_all, v_all = (torch.randn(1, 3, 70, 16, generator=g) for _ in range(2))
    q_all = torch.randn(1, 9, 70, 16, generator=g)
    for start, end in ((0, 67), (67, 68), (68, 69), (69, 70)):
        held_k, held_v = layer.update(k_all[..., start:end, :], v_all[..., start:end, :])
        got, _ = mc.reference_attention(module, q_all[..., start:end, :], held_k, held_v, None, softcap=25.0)
        pos = torch.arange(end)
        want = _dense(q_all[..., start:end, :], k_all[..., :end, :], v_all[..., :end, :], pos, pos[start:end],
                      [(None, W, SPAN)[h // 3] for h in range(9)], S, 0.25, None, 25.0)
        torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=0)
        if start == 0:
            assert len(used) == 3 and held_k.total == 67  # FA and both span groups
    assert len(used) == 3  # decode steps take the blocked (here: one-block) path


SCRIPT = consa_free.script(
    """
    import json, sys, torch
    from transformers import AutoModelForCausalLM
    results = {}
    for name, job in json.loads(sys.argv[1]).items():
        model = AutoModelForCausalLM.from_pretrained(job["dir"], local_files_only=True, trust_remote_code=True).eval()
        ids, mask = torch.tensor(job["ids"]), torch.tensor(job["mask"])
        code = sys.modules[type(model).__module__]
        code.BLOCK_ELEMENTS, code.MAX_BLOCK_ROWS = 300, 8  # many small query blocks
        with torch.no_grad():
            r = {"logits": model(input_ids=ids, attention_mask=mask).logits.tolist()}
        code.BLOCK_ELEMENTS, code.MAX_BLOCK_ROWS = 1 << 24, 512
        for impl in (None, "static"):
            with torch.no_grad():
                out = model.generate(ids, attention_mask=mask, max_new_tokens=job["new"], do_sample=False,
                                     pad_token_id=0, eos_token_id=None, return_dict_in_generate=True,
                                     cache_implementation=impl)
            cache = getattr(out, "past_key_values", None) or getattr(out, "cache", None)
            r[str(impl)] = {"gen": out.sequences.tolist(), "cache": type(cache).__name__,
                            "stored": sum(l.stored_elements() for l in cache.layers),
                            "max_len": cache.get_max_length(), "slots": int(cache.get_seq_length())}
        results[name] = r
    assert not any(m == "consa" or m.startswith("consa.") for m in sys.modules)
    with open(sys.argv[2], "w") as f:
        json.dump(results, f)
    """
)


def _consa_free(tmp_path, jobs):
    result_file = tmp_path / "results.json"
    proc = consa_free.run(SCRIPT, json.dumps(jobs), result_file, modules_cache=tmp_path / "hf_modules", timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(result_file.read_text())


def test_static_generate_without_consa_equals_dynamic_and_consa(tmp_path):
    """``generate(cache_implementation="static")`` on a consa-free load gets the per-head static cache
    (FA heads max_len slots, SWA heads sinks + W − 1) and the same greedy tokens as the dynamic cache
    and as consa's own hybrid model, with a prompt far longer than the window (and left padding); the
    logits through many small query blocks equal consa's."""
    import consa
    from consa.allocation import Allocation
    from consa.attention.cache import HybridCache
    from consa.compat import cache_kwargs
    from consa.export import export
    from consa.models import plans_of
    from consa.tiny import tiny_model

    from consa.models import native_windows
    from test_export_remote import _gemma3_native  # 5 native sliding layers (window 6) and a full one

    new, length, w = 5, 40, 4
    q3, q2, g3 = tiny_model("qwen3", num_layers=3), tiny_model("qwen2", num_layers=3), _gemma3_native()
    units = [False, True, True, False, False, True]
    cases = {"qwen3": (q3, Allocation.from_units(units, "kv_head", consa.model_shape(q3), w)),
             "qwen2_sinks": (q2, Allocation.from_units(units, "kv_head", consa.model_shape(q2), w, 2)),
             "gemma3_keep": (g3, Allocation.from_units([False, True], "kv_head", consa.model_shape(g3), w,
                                                       native=native_windows(g3)))}
    jobs, expected = {}, {}
    for name, (model, alloc) in cases.items():
        shape = consa.model_shape(model)
        out = tmp_path / name
        assert export(model, alloc, out)["mode"] == "heads"
        g = torch.Generator().manual_seed(3)
        ids = torch.randint(3, model.config.vocab_size, (2, length), generator=g)
        mask = torch.ones_like(ids)
        mask[0, :5], ids[0, :5] = 0, 0
        consa.apply_allocation(model, alloc)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits
            gen = model.generate(ids, attention_mask=mask, **cache_kwargs(HybridCache(plans_of(model)), model),
                                 max_new_tokens=new, do_sample=False, pad_token_id=0, eos_token_id=None)
        t, d = length + new - 1, model.config.head_dim  # transformers sizes the static cache max_length − 1
        dyn = static = 0
        for i in range(shape.num_layers):
            lw, ls = alloc.layer_window(i)
            dyn += len(alloc.fa_heads(i)) * t + len(alloc.swa_heads(i)) * min(t, lw - 1 + ls)
            static += len(alloc.fa_heads(i)) * t + len(alloc.swa_heads(i)) * (lw - 1 + ls)
        expected[name] = (gen.tolist(), 2 * 2 * d * dyn, 2 * 2 * d * static, logits, mask.bool())
        jobs[name] = {"dir": str(out), "ids": ids.tolist(), "mask": mask.tolist(), "new": new}
    results = _consa_free(tmp_path, jobs)
    for name, (gen, dyn_bytes, static_bytes, logits, valid) in expected.items():
        r = results[name]
        torch.testing.assert_close(torch.tensor(r["logits"])[valid], logits[valid], atol=2e-5, rtol=0)
        assert r["None"]["cache"] == "ReferenceHybridCache" and r["None"]["stored"] == dyn_bytes, (name, r["None"])
        assert r["static"]["cache"] == "ReferenceHybridStaticCache", (name, r["static"])
        assert r["static"]["max_len"] == length + new - 1 and r["static"]["stored"] == static_bytes, (name, r["static"])
        assert r["None"]["gen"] == gen and r["static"]["gen"] == gen, name


def _static_export(tmp_path):
    import consa
    from consa.allocation import Allocation
    from consa.export import export
    from consa.tiny import tiny_model

    model = tiny_model("qwen3", num_layers=2)
    shape = consa.model_shape(model)
    alloc = Allocation.from_units([False, True, True, False], "kv_head", shape, 4, 2)
    export(model, alloc, tmp_path / "out")
    return tmp_path / "out", model.config.vocab_size


COMPILED = consa_free.script(
    """
    import sys, torch
    from transformers import AutoModelForCausalLM, CompileConfig
    device, backend = sys.argv[2], sys.argv[3]
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], local_files_only=True, trust_remote_code=True).eval().to(device)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (1, 30), generator=g).to(device)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    want = model.generate(ids, **kw)
    graphs = []
    if backend == "count":  # dynamo's trace, no code generation: the graph runs as traced
        @torch._dynamo.register_backend(name="count")
        def count(gm, example_inputs, **kwargs):
            graphs.append(gm)
            return gm.forward
    cc = CompileConfig(backend=backend, fullgraph=True)  # a graph break would raise
    if device == "cpu":
        cc._compile_all_devices = True
    torch._dynamo.reset()
    with torch.no_grad():
        got = model.generate(ids, cache_implementation="static", compile_config=cc, **kw)
        again = model.generate(ids, cache_implementation="static", compile_config=cc, **kw)
    assert torch.equal(got, want) and torch.equal(again, want), (got, again, want)
    assert backend != "count" or len(graphs) >= 1, graphs
    print("OK", len(graphs))
    """
)


def _run_compiled(tmp_path, device, backend):
    out, _ = _static_export(tmp_path)
    proc = consa_free.run(COMPILED, out, device, backend, modules_cache=tmp_path / "hf_modules", timeout=900)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-4000:]


def test_static_decode_traces_in_one_graph_on_cpu(tmp_path):
    """The compiled decode step of the consa-free static path traces with fullgraph=True (backend
    'eager' on CPU: dynamo's trace without code generation) and gives the dynamic path's tokens."""
    _run_compiled(tmp_path, "cpu", "count")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled decode (inductor) on a GPU")
def test_static_decode_compiles_on_gpu(tmp_path):
    _run_compiled(tmp_path, "cuda", "inductor")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled FlexAttention on a GPU")
@pytest.mark.parametrize("softcap,sinkl", [(None, False), (30.0, True)])
def test_flex_attention_on_gpu_equals_the_blocked_path(monkeypatch, softcap, sinkl):
    used = []
    real = mc._flex_attend
    monkeypatch.setattr(mc, "_flex_attend", lambda *a: (lambda o: used.append(o is not None) or o)(real(*a)))
    g = torch.Generator().manual_seed(11)
    t = 1000
    q, k, v = (torch.randn(1, h, t, 64, generator=g).cuda().bfloat16() for h in (9, 3, 3))
    s_aux = torch.randn(9, generator=g).cuda() if sinkl else None
    module = _module(FA, (None, W, SPAN))
    got, _ = mc.reference_attention(module, q, k, v, None, softcap=softcap, s_aux=s_aux)
    assert used and all(used), used
    monkeypatch.setattr(mc, "USE_FLEX", False)
    want, _ = mc.reference_attention(module, q, k, v, None, softcap=softcap, s_aux=s_aux)
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=0)
