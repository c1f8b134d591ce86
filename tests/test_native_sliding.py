"""Models that already slide (Gemma3's 5:1 pattern, Qwen's max_window_layers, Mistral's one window):
native layers stay as trained and uncounted by default, or are all searched with reopen_native."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import consa
from consa.compat import cache_kwargs
from consa.allocation import Allocation, AllocationError, swa_count
from consa.attention.cache import HybridCache
from consa.models import plans_of
from consa.cli import main as cli_main
from consa.export import export, load, read_export
from consa.models import native_windows
from consa.train.search import Search
from consa.train.search_config import ScheduleConfig, SearchConfig, TargetConfig

NATIVE_W, W, VOCAB = 6, 3, 101
GEMMA_5_1 = ["sliding_attention"] * 5 + ["full_attention"]


def _model(family, seed=0, **over):
    common = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=64, num_hidden_layers=6, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=12, max_position_embeddings=256, tie_word_embeddings=False,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if family == "gemma3_text":
        common.update(query_pre_attn_scalar=12, layer_types=GEMMA_5_1, sliding_window=NATIVE_W)
    elif family == "qwen3":  # layers 3..5 slide natively
        common.update(use_sliding_window=True, sliding_window=NATIVE_W, max_window_layers=3)
    elif family == "mistral":
        common.update(sliding_window=NATIVE_W)
    common.update(over)
    torch.manual_seed(seed)
    attn = "eager" if family == "gemma2" else "sdpa"  # Gemma2 has no SDPA path
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **common), attn_implementation=attn)
    with torch.no_grad():  # sharpen attention so that windows matter
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(4.0)
    return model.eval()


def _ids(batch=2, length=17, pad=3):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, VOCAB, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, :pad], ids[0, :pad] = 0, 0
    return ids, mask


def _batches(step):
    g = torch.Generator().manual_seed(step)
    return {"input_ids": torch.randint(3, VOCAB, (2, 20), generator=g)}


def _logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def _search(model, tmp_path, **cfg):
    cfg = SearchConfig.from_flat({"sparsity": 0.5, "window": W, "seq_len": 20, "steps": 3, "checkpoint_every": 0, **cfg})
    search = Search(model, cfg, _batches, tmp_path, progress=False)
    return search, search.run()


def test_native_windows_per_family():
    assert native_windows(_model("gemma3_text")) == [NATIVE_W] * 5 + [None]
    assert native_windows(_model("qwen3")) == [None] * 3 + [NATIVE_W] * 3
    assert native_windows(_model("mistral")) == [NATIVE_W] * 6
    assert native_windows(_model("gemma3_text", layer_types=["full_attention"] * 6, sliding_window=None)) == [None] * 6


def test_gemma3_all_full_with_null_window_searches(tmp_path, capsys):
    """transformers builds Gemma3's sliding mask even when no layer slides and raises on a null window."""
    _model("gemma3_text", layer_types=["full_attention"] * 6, sliding_window=None).save_pretrained(tmp_path / "m")
    assert json.loads((tmp_path / "m" / "config.json").read_text())["sliding_window"] is None
    args = ["search", "--model", str(tmp_path / "m"), "--sparsity", "0.75", "--window", str(W), "--seq-len", "16",
            "--steps", "2", "--batch-size", "2", "--no-progress", "--out", str(tmp_path / "s")]
    assert cli_main(args) == 0, capsys.readouterr().err
    alloc = Allocation.load(tmp_path / "s" / "allocation.json")
    assert alloc.num_units == 12 and alloc.num_swa == swa_count(0.75, 12) == 9 and alloc.num_fixed == 0


@pytest.mark.parametrize("family,granularity,t,searchable", [
    ("gemma3_text", "kv_head", 0.5, 2), ("gemma3_text", "layer", 0.5, 1), ("qwen3", "kv_head", 0.75, 6),
])
def test_search_keeps_native_layers_and_counts_the_rest(tmp_path, family, granularity, t, searchable):
    model = _model(family)
    native = native_windows(model)
    search, alloc = _search(model, tmp_path, sparsity=t, granularity=granularity)
    assert search.gates.num_units == searchable == alloc.num_units
    assert alloc.num_swa == swa_count(t, searchable)  # round(t · N_searchable), native units not counted
    assert alloc.native == native and alloc.num_fixed == alloc.shape.num_units(granularity) - searchable
    for i, w in enumerate(native):
        if w is not None:
            assert alloc.fa[i] == (False, False) and alloc.span[i] == (w, w) and alloc.layer_window(i) == (w, 0)
    summary = json.loads((tmp_path / "search.json").read_text())
    assert summary["num_units"] == searchable and summary["native_windows"] == native
    assert Allocation.load(tmp_path / "allocation.json") == alloc


@pytest.mark.parametrize("family", ["gemma3_text", "qwen3"])
def test_kept_native_layers_attend_as_trained(family):
    """All searched units FA: the hybrid model is the stock model (native windows and RoPE intact)."""
    model = _model(family)
    ids, mask = _ids()
    stock = _logits(model, ids, mask)
    n = sum(w is None for w in native_windows(model)) * 2
    alloc = Allocation.from_units([True] * n, "kv_head", consa.model_shape(model), W, native=native_windows(model))
    consa.apply_allocation(model, alloc)
    torch.testing.assert_close(_logits(model, ids, mask)[mask.bool()], stock[mask.bool()], atol=2e-5, rtol=0)
    # and the native layers do slide: opening them to full attention changes the output
    consa.apply_allocation(model, Allocation.uniform(True, "kv_head", consa.model_shape(model), W))
    assert (_logits(model, ids, mask) - stock)[mask.bool()].abs().max() > 1e-3


def test_gemma3_search_export_load_round_trip(tmp_path):
    model = _model("gemma3_text")
    _, alloc = _search(model, tmp_path / "s")
    consa.detach(model)
    ids, mask = _ids()
    summary = export(model, alloc, tmp_path / "out")
    assert summary["mode"] == "heads" and "differs from consa's" in summary["why"]  # native window 6, consa's 3
    cfg, section, stored = read_export(tmp_path / "out")
    assert cfg["layer_types"] == GEMMA_5_1 and cfg["sliding_window"] == NATIVE_W  # RoPE per layer as trained
    assert cfg["model_type"] == "consa_gemma3_text" and stored.native == alloc.native and stored.num_swa == alloc.num_swa
    consa.apply_allocation(model, alloc)
    want = _logits(model, ids, mask)
    want_gen = model.generate(ids, attention_mask=mask, **cache_kwargs(HybridCache(plans_of(model)), model), max_new_tokens=6,
                              do_sample=False, pad_token_id=0, eos_token_id=None)
    loaded = load(tmp_path / "out")
    torch.testing.assert_close(_logits(loaded, ids, mask)[mask.bool()], want[mask.bool()], atol=2e-5, rtol=0)
    gen = consa.generate(loaded, ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(gen, want_gen)


def test_reopen_native_searches_every_unit_against_the_trained_model(tmp_path):
    model = _model("gemma3_text")
    ids, mask = _ids(length=20)
    stock = _logits(model, ids, mask)
    cfg = SearchConfig(TargetConfig(sparsity=0.75, window=W, reopen_native=True), seq_len=20, schedule=ScheduleConfig(steps=2),
                       checkpoint_every=0)
    search = Search(model, cfg, _batches, tmp_path, progress=False)
    # the teacher is the model as trained: its native layers at their own window
    teacher = search._teacher_logits({"input_ids": ids, "attention_mask": mask})
    torch.testing.assert_close(teacher[mask.bool()], stock[mask.bool()], atol=2e-5, rtol=0)
    assert all(m.consa_plan.mode == "gate" for m in consa.models.attention_modules(model))  # gate plans are back
    alloc = search.run()
    assert alloc.num_units == 12 and alloc.num_swa == swa_count(0.75, 12) and alloc.num_fixed == 0
    assert all(s in (None, W) for row in alloc.span for s in row)


def test_all_sliding_model_needs_reopen(tmp_path, capsys):
    model = _model("mistral")
    with pytest.raises(consa.UnsupportedModelError, match="nothing is left to search"):
        Search(model, SearchConfig(TargetConfig(sparsity=0.5, window=W), seq_len=20, schedule=ScheduleConfig(steps=1)), _batches,
               tmp_path, progress=False)
    model.save_pretrained(tmp_path / "m")
    capsys.readouterr()  # drop save_pretrained's progress bar
    base = ["search", "--model", str(tmp_path / "m"), "--sparsity", "0.5", "--window", str(W), "--seq-len", "16",
            "--steps", "2", "--batch-size", "2", "--no-progress", "--granularity", "layer"]
    assert cli_main(base + ["--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("consa: error:") and err.count("\n") == 1 and "--reopen-native" in err
    assert cli_main(base + ["--reopen-native", "--out", str(tmp_path / "b")]) == 0
    alloc = Allocation.load(tmp_path / "b" / "allocation.json")
    assert alloc.num_units == 6 and alloc.num_swa == 3 and alloc.num_fixed == 0
    # a reopened layer-wise Mistral allocation becomes native Ministral layer_types at consa's window
    summary = export(model, alloc, tmp_path / "out")
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert summary["mode"] == "native" and cfg["sliding_window"] == W and cfg["model_type"] == "ministral"


def test_cli_says_what_the_sparsity_counts(tmp_path, capsys):
    _model("qwen3").save_pretrained(tmp_path / "m")
    args = ["search", "--model", str(tmp_path / "m"), "--sparsity", "0.5", "--window", str(W), "--seq-len", "16",
            "--steps", "1", "--batch-size", "2", "--no-progress", "--out", str(tmp_path / "s")]
    assert cli_main(args) == 0
    out = capsys.readouterr().out
    assert f"native sliding window [{NATIVE_W}] on layers [3, 4, 5]" in out and "3/6 kv_head units on SWA" in out


def test_qwen_native_export_only_when_windows_agree(tmp_path):
    model = _model("qwen3")
    shape = consa.model_shape(model)
    same = Allocation.from_units([True, False, True], "layer", shape, NATIVE_W, native=native_windows(model))
    assert export(model, same, tmp_path / "same")["mode"] == "native"
    cfg = json.loads((tmp_path / "same" / "config.json").read_text())
    assert cfg["layer_types"] == ["full_attention", "sliding_attention", "full_attention"] + ["sliding_attention"] * 3
    other = Allocation.from_units([True, False, True], "layer", shape, W, native=native_windows(model))
    summary = export(model, other, tmp_path / "other")
    assert summary["mode"] == "heads" and "differs" in summary["why"]
    ids, mask = _ids()
    consa.apply_allocation(model, other)
    torch.testing.assert_close(_logits(load(tmp_path / "other"), ids, mask)[mask.bool()],
                               _logits(model, ids, mask)[mask.bool()], atol=2e-5, rtol=0)


def test_allocation_keeping_a_window_the_model_lacks_is_refused():
    model = _model("gemma3_text", layer_types=["full_attention"] * 6)
    alloc = Allocation.from_units([True, True], "kv_head", consa.model_shape(model), W, native=[NATIVE_W] * 5 + [None])
    with pytest.raises(AllocationError, match="native window 6"):
        consa.apply_allocation(model, alloc)


def test_soft_capped_attention_is_computed():
    """Gemma2's logit soft cap is computed, not refused (every path: tests/test_softcap_sinks.py)."""
    model = _model("gemma2", query_pre_attn_scalar=12, layer_types=["full_attention"] * 6, sliding_window=NATIVE_W,
                   attn_logit_softcapping=2.0)
    ids, mask = _ids()
    want = _logits(model, ids, mask)
    consa.attach_gates(model, window=W)  # z = None: the teacher pass, full attention
    torch.testing.assert_close(_logits(model, ids, mask)[mask.bool()], want[mask.bool()], atol=2e-5, rtol=0)


@pytest.mark.parametrize("granularity", ["kv_head", "layer"])
def test_rules_and_data_driven_baselines_keep_native_layers_and_count_the_others(tmp_path, granularity):
    """Every method compared must place the same units: on the 5:1 pattern only layer 5 is free."""
    from consa.models import apply_allocation, model_shape
    from consa.rules import RULES, rule_allocation
    from consa.train.baselines import attention_mass_allocation, duo_allocation

    model = _model("gemma3_text")
    shape, native = model_shape(model), native_windows(model)
    free = Allocation.free_units(native, granularity, shape.num_kv_heads)
    assert free == ([5] if granularity == "layer" else [10, 11])
    k = swa_count(0.5, len(free)) if granularity == "kv_head" else 0
    allocs = [rule_allocation(r, shape, granularity, k, W, native=native) for r in RULES]
    allocs.append(duo_allocation(model, granularity, k, W, _batches, steps=2))
    allocs.append(attention_mass_allocation(model, granularity, k, W, [_batches(0)]))
    want = _logits(model, *_ids())
    for a in allocs:
        assert a.native == native and a.num_units == len(free) and a.num_swa == k, a.meta["method"]
        apply_allocation(model, a)  # refuses an allocation that would reopen a native layer
    if k == 0:  # nothing moved: the stock model, native windows included
        assert torch.allclose(_logits(model, *_ids()), want, atol=1e-5)


def test_cli_rules_on_a_natively_sliding_model(tmp_path, capsys):
    _model("gemma3_text").save_pretrained(tmp_path / "m")
    assert cli_main(["rules", "--model", str(tmp_path / "m"), "--sparsity", "0.5", "--window", str(W),
                     "--rule", "fa_top", "--out", str(tmp_path / "r")]) == 0
    a = Allocation.load(tmp_path / "r" / "fa_top.json")
    assert a.native == [NATIVE_W] * 5 + [None] and a.num_units == 2 and a.num_swa == 1
    assert cli_main(["rules", "--model", str(tmp_path / "m"), "--sparsity", "0.5", "--window", str(W), "--reopen-native",
                     "--rule", "fa_top", "--out", str(tmp_path / "all")]) == 0
    b = Allocation.load(tmp_path / "all" / "fa_top.json")
    assert b.native == [None] * 6 and b.num_units == 12 and b.num_swa == 6
