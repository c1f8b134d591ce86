"""Head-wise exports ship their own modeling code: without consa they load only with trust_remote_code
(and then attend exactly like consa's hybrid model); without it, transformers refuses them."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import consa
from consa import consa_free
from consa.compat import cache_kwargs
from consa.allocation import Allocation
from consa.attention.cache import HybridCache
from consa.models import plans_of
from consa.export import export
from consa.export_code import modeling_consa
from consa.models import native_windows
from consa.tiny import tiny_model

from attn_reference import per_head_allowed
from consa.attention.kernels import reference_attention as dense_reference

W, NEW = 3, 6


def _ids(vocab, batch=2, length=11, pad=3):
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(3, vocab, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, :pad], ids[0, :pad] = 0, 0
    return ids, mask


def _gemma3_native():
    cfg = AutoConfig.for_model("gemma3_text", vocab_size=101, hidden_size=48, intermediate_size=64, num_hidden_layers=6,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=12, query_pre_attn_scalar=12,
                               layer_types=["sliding_attention"] * 5 + ["full_attention"], sliding_window=6,
                               max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(4.0)
    return model


def _cases():
    """name -> (model, allocation): GQA, sinks, Gemma3 keeping and reopening its native sliding layers."""
    q3 = tiny_model("qwen3", num_layers=3)
    q2 = tiny_model("qwen2", num_layers=3)
    g_keep, g_open = _gemma3_native(), _gemma3_native()
    shape = consa.model_shape(g_keep)
    return {
        "qwen3": (q3, Allocation.from_units([False, True, True, False, False, False], "kv_head", consa.model_shape(q3), W)),
        "qwen2_sinks": (q2, Allocation.from_units([True, False, False, False, False, True], "kv_head", consa.model_shape(q2), W, 2)),
        "gemma3_keep": (g_keep, Allocation.from_units([False, True], "kv_head", shape, W, native=native_windows(g_keep))),
        "gemma3_reopen": (g_open, Allocation.from_units([False, True] + [False] * 8 + [True, False], "kv_head", shape, W)),
    }


SCRIPT = consa_free.script(
    """
    import importlib, json, sys, torch
    try:
        import consa
        sys.exit("consa is importable")
    except ImportError:
        pass
    from transformers import AutoModelForCausalLM
    results = {}
    for name, job in json.loads(sys.argv[1]).items():
        try:
            AutoModelForCausalLM.from_pretrained(job["dir"], local_files_only=True)
            refused = None
        except Exception as e:
            refused = f"{type(e).__name__}: {e}"
        model = AutoModelForCausalLM.from_pretrained(job["dir"], local_files_only=True, trust_remote_code=True).eval()
        ids, mask = torch.tensor(job["ids"]), torch.tensor(job["mask"])
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits
            out = model.generate(ids, attention_mask=mask, max_new_tokens=job["new"], do_sample=False,
                                 pad_token_id=0, eos_token_id=None, return_dict_in_generate=True)
        cache = getattr(out, "past_key_values", None) or getattr(out, "cache", None)
        code = sys.modules[type(model).__module__]
        results[name] = {"refused": refused, "type": type(model).__name__, "impl": model.config._attn_implementation,
                         "have_consa": code.HAVE_CONSA, "logits": logits.tolist(), "gen": out.sequences.tolist(),
                         "cache": type(cache).__name__, "slots": cache.get_seq_length(),
                         "stored": sum(layer.stored_elements() for layer in cache.layers)}
    assert not any(m == "consa" or m.startswith("consa.") for m in sys.modules)
    with open(sys.argv[2], "w") as f:  # not stdout: transformers' trust prompt writes there
        json.dump(results, f)
    """
)


def test_headwise_exports_serve_without_consa(tmp_path):
    jobs, expected = {}, {}
    for name, (model, alloc) in _cases().items():
        out = tmp_path / name
        assert export(model, alloc, out)["mode"] == "heads"
        cfg = json.loads((out / "config.json").read_text())
        assert cfg["model_type"].startswith("consa_") and set(cfg["auto_map"]) == {"AutoConfig", "AutoModelForCausalLM"}
        assert (out / "modeling_consa.py").is_file()
        ids, mask = _ids(model.config.vocab_size)
        consa.apply_allocation(model, alloc)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits
            gen = model.generate(ids, attention_mask=mask, **cache_kwargs(HybridCache(plans_of(model)), model), max_new_tokens=NEW,
                                 do_sample=False, pad_token_id=0, eos_token_id=None)
        expected[name] = (logits, gen, mask.bool(), alloc, model.config.head_dim)
        jobs[name] = {"dir": str(out), "ids": ids.tolist(), "mask": mask.tolist(), "new": NEW}
    result_file = tmp_path / "results.json"
    proc = consa_free.run(SCRIPT, json.dumps(jobs), result_file, modules_cache=tmp_path / "hf_modules", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(result_file.read_text())
    for name, (logits, gen, valid, alloc, head_dim) in expected.items():
        r = results[name]
        assert r["refused"] is not None and "trust_remote_code" in r["refused"], (name, r["refused"])
        assert r["type"].startswith("Consa") and r["impl"] == "consa" and r["have_consa"] is False
        torch.testing.assert_close(torch.tensor(r["logits"])[valid], logits[valid], atol=2e-5, rtol=0)
        assert r["gen"] == gen.tolist(), name
        # generate got the shipped per-head cache: SWA heads hold only their window (+ sinks)
        t = r["slots"]
        want = 0
        for i in range(alloc.shape.num_layers):
            w, s = alloc.layer_window(i)
            want += 2 * 2 * head_dim * (len(alloc.fa_heads(i)) * t + len(alloc.swa_heads(i)) * min(t, w - 1 + s))
        assert r["cache"] == "ReferenceHybridCache" and t == gen.shape[1] - 1 and r["stored"] == want, (name, r["stored"], want)


def _module(alloc, layer):
    return SimpleNamespace(config=SimpleNamespace(consa={"allocation": alloc.to_dict()}), layer_idx=layer, training=False)


@pytest.mark.parametrize("tq,tk,sinks,padded", [(13, 13, 0, True), (5, 17, 2, True), (1, 9, 0, False), (7, 7, 3, False)])
def test_reference_attention_matches_dense_float64(tq, tk, sinks, padded):
    """The shipped pure-PyTorch path against an independent float64 per-head mask (GQA 6/2, odd sizes)."""
    shape = consa.ModelShape(2, 2, 6)
    alloc = Allocation.from_units([True, True, False, True], "kv_head", shape, W + 1, sinks)
    g = torch.Generator().manual_seed(tq * 100 + tk)
    q, k, v = (torch.randn(2, h, t, 8, generator=g) for h, t in ((6, tq), (2, tk), (2, tk)))
    mask = None
    if padded:  # transformers' boolean mask: causal AND padding (two slots of row 0 padded)
        pos_q = torch.arange(tk - tq, tk)[:, None]
        mask = (torch.arange(tk)[None, :] <= pos_q).expand(2, 1, tq, tk).clone()
        mask[0, :, :, :2] = False
    got, _ = modeling_consa.reference_attention(_module(alloc, 1), q, k, v, mask, scaling=0.3)
    fa_q = [h // 3 in alloc.fa_heads(1) for h in range(6)]
    allowed = per_head_allowed(fa_q, tq, tk, W + 1, sinks, mask, "cpu")
    want = dense_reference(q.double(), k.double(), v.double(), allowed, 0.3).transpose(1, 2)
    rows = allowed.any(-1).transpose(1, 2)[..., None]  # padded query rows: no key, output unused
    torch.testing.assert_close(got.double() * rows, want.nan_to_num(0.0) * rows, atol=1e-5, rtol=0)


def test_sliding_mask_comes_back_causal():
    kw = dict(batch_size=1, cache_position=None, q_length=5, kv_length=9, q_offset=4, kv_offset=0,
              attention_mask=torch.tensor([[0, 1, 1, 1, 1, 1, 1, 1, 1]]).bool(), allow_is_causal_skip=False)
    from transformers.masking_utils import causal_mask_function, sdpa_mask, sliding_window_causal_mask_function

    kw.pop("cache_position")
    causal = sdpa_mask(mask_function=causal_mask_function, **kw)
    widened = modeling_consa.reference_mask(mask_function=sliding_window_causal_mask_function(2), local_size=2, **kw)
    assert torch.equal(widened, causal) and not torch.equal(causal, sdpa_mask(mask_function=sliding_window_causal_mask_function(2), local_size=2, **kw))


def test_consa_loads_the_shipped_model_type_and_keeps_its_attention(tmp_path):
    model, alloc = _cases()["qwen3"]
    export(model, alloc, tmp_path / "out")
    ids, mask = _ids(model.config.vocab_size)
    consa.apply_allocation(model, alloc)
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
        want_gen = model.generate(ids, attention_mask=mask, **cache_kwargs(HybridCache(plans_of(model)), model), max_new_tokens=NEW,
                                  do_sample=False, pad_token_id=0, eos_token_id=None)
    with pytest.warns(UserWarning, match="mixes full and sliding-window heads"):
        other = AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="sdpa").eval()
    assert type(other).__name__ == "ConsaQwen3ForCausalLM" and other.config._attn_implementation == "consa"
    with torch.no_grad():
        torch.testing.assert_close(other(input_ids=ids, attention_mask=mask).logits[mask.bool()], want[mask.bool()], atol=2e-5, rtol=0)
        out = other.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0,
                             eos_token_id=None, return_dict_in_generate=True)
    assert torch.equal(out.sequences, want_gen)
    cache = getattr(out, "past_key_values", None) or getattr(out, "cache", None)
    assert isinstance(cache, HybridCache)  # plain generate gets the per-head cache (SWA heads keep W)


def test_reference_cache_keeps_the_window_and_attends_the_same():
    """Prefill then decode through the shipped cache (SWA heads trimmed) = attention over every slot."""
    shape = consa.ModelShape(1, 3, 6)
    alloc = Allocation.from_units([False, True, False], "kv_head", shape, 4, sinks=2)
    config = SimpleNamespace(consa={"allocation": alloc.to_dict()})
    layer = modeling_consa.ReferenceHybridCache(config).layers[0]
    module = _module(alloc, 0)
    g = torch.Generator().manual_seed(0)
    k_all, v_all = torch.randn(1, 3, 12, 8, generator=g), torch.randn(1, 3, 12, 8, generator=g)
    q_all = torch.randn(1, 6, 12, 8, generator=g)
    for start, end in ((0, 7), *((t, t + 1) for t in range(7, 12))):
        held_k, held_v = layer.update(k_all[..., start:end, :], v_all[..., start:end, :])
        got, _ = modeling_consa.reference_attention(module, q_all[..., start:end, :], held_k, held_v, None)
        want, _ = modeling_consa.reference_attention(module, q_all[..., start:end, :], k_all[..., :end, :], v_all[..., :end, :], None)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
        kept = min(end, 4 - 1 + 2)
        assert layer.keys[1].shape[-2] == kept and layer.keys[0].shape[-2] == end
        assert layer.stored_elements() == 2 * 8 * (end + 2 * kept)
    assert layer.slots.tolist() == [0, 1, 9, 10, 11]  # the sinks and the last W - 1 slots
