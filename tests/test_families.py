"""The family matrix: every causal-LM family of the installed transformers, tiny and random, through
search -> export -> load in a consa-free process, logits and greedy tokens equal to consa's hybrid.

The families come from transformers (``consa.families.matrix_entries``), not from a list here: a new
release's families are covered the day it is installed. A family that stops carries a one-line reason;
only the families the project names are required to go all the way.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import transformers

from consa import families as F
from consa.experiment import family_matrix as M

# families consa promises by name, where the installed transformers has them; the value is the format a
# layer-wise export must take (None: either). Which format is derived by the export's probe, not listed.
NAMED = {
    "qwen3": "native", "qwen2": "native", "llama": "native", "mistral": "native",
    "gemma3_text": "heads",  # Gemma3 picks RoPE by layer type: relabelling a layer would move its positions
    "gemma3": "heads",  # the vision-language checkpoint, through its text decoder
    "phi3": None,  # fused qkv_proj
    "qwen3_5": None, "qwen3_5 (vision-language)": None, "qwen3_next": None, "lfm2": None,  # linear/conv layers beside attention
    "gemma2": None, "gpt_oss": None,  # soft-capping, sink logits
    "gemma4_text": None,  # per-layer head sizes
    "cohere2": None, "olmo3": None, "granite": None, "mixtral": None, "smollm3": None, "starcoder2": None,
}
README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(scope="module")
def matrix(tmp_path_factory, one_thread):
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    return {r.name: r for r in M.check_families(F.matrix_entries(), tmp_path_factory.mktemp("families"), steps=2)}


def test_every_family_is_tried(matrix):
    assert set(matrix) >= set(F.causal_lm_families())
    assert sum(r.stage == "ok" for r in matrix.values()) >= 20


def test_a_family_whose_search_succeeds_exports_and_loads(matrix):
    failed = {n: r.reason for n, r in matrix.items() if r.stage in ("export", "load")}
    assert not failed, failed


def test_every_refusal_is_one_line_and_no_traceback(matrix):
    for name, r in matrix.items():
        if r.stage != "ok":
            assert r.reason and "\n" not in r.reason and len(r.reason) < 600, (name, r.reason)
            assert not r.reason.startswith("traceback"), (name, r.reason, r.details.get("traceback", "")[-2000:])


@pytest.mark.parametrize("name", sorted(NAMED))
def test_named_families_go_all_the_way(matrix, name):
    if name not in matrix:
        pytest.skip(f"transformers {transformers.__version__} has no {name}")
    r = matrix[name]
    assert r.stage == "ok", r.reason
    assert r.exports["heads"] == "heads"
    if NAMED[name] is not None:
        assert r.exports["layers"] == NAMED[name], r.details["layers_why"]


def test_readme_family_table_is_generated_from_this_matrix(matrix):
    """README's table is this test's output on the transformers version it names (regenerate it with
    ``python -m consa.experiment.family_matrix --readme README.md``)."""
    m = M.README_BLOCK.search(README.read_text())
    assert m, "README has no generated family table"
    if m.group(1) != transformers.__version__:
        pytest.skip(f"README's table is for transformers {m.group(1)}, this is {transformers.__version__}")
    assert m.group(0) == M.markdown(list(matrix.values()), transformers.__version__)


# ---- the generality the matrix relies on, tested directly --------------------------------------------
import torch  # noqa: E402

import consa  # noqa: E402
from consa.allocation import Allocation  # noqa: E402
from consa.models import (attention_layers, attention_modules, head_dim, hybrid_cache, model_shape,  # noqa: E402
                          reorder_heads, text_config)


def _ids(vocab=F.VOCAB, length=14):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, vocab - 8, (2, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :3], ids[0, :3] = 0, 0
    return ids, mask


def _logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def _have(family):
    if family not in F.causal_lm_families():
        pytest.skip(f"transformers {transformers.__version__} has no {family}")


def _head_alloc(model, window=3):
    shape = model_shape(model)
    units = [(i + h) % 2 == 1 for i in range(shape.num_layers) for h in range(shape.num_kv_heads)]  # row 0: FA last
    return Allocation.from_units(units, "kv_head", shape, window)


@pytest.mark.parametrize("family", ["phi3", "qwen3_next", "laguna"])
def test_reordering_heads_keeps_the_hybrid_function(family):
    """FA heads first: fused qkv_proj rows (Phi-3), gated query rows (Qwen3-Next), a per-head gate
    projection (Laguna) move with their heads, so the hybrid computes the same logits."""
    _have(family)
    model = F.tiny_model(family)
    alloc = _head_alloc(model)
    ids, mask = _ids()
    consa.apply_allocation(model, alloc)
    before = _logits(model, ids, mask)
    consa.detach(model, "sdpa")
    moved = reorder_heads(model, alloc)
    assert moved.meta["head_order"] != [list(range(alloc.shape.num_kv_heads))] * alloc.shape.num_layers  # not the identity
    consa.apply_allocation(model, moved)
    torch.testing.assert_close(_logits(model, ids, mask)[mask.bool()], before[mask.bool()], atol=2e-5, rtol=0)


@pytest.mark.parametrize("family", ["qwen3_5", "lfm2", "minimax"])
def test_mixed_decoders_allocate_their_attention_layers_only(family):
    """Linear-attention / convolution layers are no allocation rows and keep transformers' own cache
    layers; the attention layers' SWA heads keep only their window, and greedy decoding through consa's
    cache equals decoding over every key."""
    _have(family)
    model = F.tiny_model(family)
    kinds = getattr(text_config(model), "layer_types")
    rows = attention_layers(model)
    assert rows == [i for i, k in enumerate(kinds) if k in ("full_attention", "sliding_attention")]
    assert len(rows) < len(kinds) and model_shape(model).num_layers == len(rows)
    alloc = _head_alloc(model)
    consa.apply_allocation(model, alloc)
    ids, mask = _ids()
    if not model._supports_default_dynamic_cache():  # MiniMax: its own cache only, one clear line
        with pytest.raises(consa.UnsupportedModelError, match="no cache but its own"):
            hybrid_cache(model)
        return
    cache = hybrid_cache(model)
    assert [type(cache.layers[i]).__name__ for i in rows] == ["HybridLayer"] * len(rows)
    assert all(type(cache.layers[i]).__name__ != "HybridLayer" for i in range(len(kinds)) if i not in rows)
    kw = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=None)
    from consa.compat import cache_kwargs

    with torch.no_grad():
        out = model.generate(ids, **cache_kwargs(cache, model), **kw)
        every_key = model.generate(ids, **kw)  # the model's own cache: every key held
    assert torch.equal(out, every_key)
    t = out.shape[1] - 1  # slots the cache holds after the last step
    mods = attention_modules(model)
    for row, i in enumerate(rows):  # keys and values, 2 rows: FA heads every slot, SWA heads W - 1 = 2
        fa, swa = len(alloc.fa_heads(row)), len(alloc.swa_heads(row))
        assert cache.layers[i].stored_elements() == 2 * 2 * head_dim(mods[row]) * (fa * t + swa * min(t, 2)), row


def test_vision_language_model_keeps_its_vision_tower_on_its_own_attention():
    """consa's attention goes on the text decoder only; the vision tower keeps sdpa/eager."""
    model = F.tiny_model("gemma3")
    consa.apply_allocation(model, _head_alloc(model))
    assert text_config(model)._attn_implementation == "consa"
    assert model.config.vision_config._attn_implementation != "consa"
    assert all(m.layer_idx is not None for m in attention_modules(model))
    assert not any("vision" in n for n, m in model.named_modules() if m in attention_modules(model))


def test_per_layer_head_sizes_read_per_layer():
    """Gemma 4's full layers have another head size than its sliding ones: read from each module, and
    the search's fingerprint does not read the global attribute (it raises)."""
    _have("gemma4_text")
    from consa.train.checkpoint import model_fingerprint

    model = F.tiny_model("gemma4_text")
    dims = {head_dim(m) for m in attention_modules(model)}
    assert len(dims) == 2
    assert len(model_fingerprint(model)) == 16


def test_native_export_is_derived_from_the_family_code():
    from consa.export_native import native_problem

    assert native_problem(text_config(F.tiny_model("qwen3")), ["full_attention"] * 3) is None
    assert native_problem(text_config(F.tiny_model("llama")), ["full_attention"] * 3) is None  # as Ministral
    why = native_problem(text_config(F.tiny_model("gemma3_text")), ["sliding_attention"] * 5 + ["full_attention"])
    assert why is not None and "more than its window" in why


def test_unservable_families_are_refused_in_one_line():
    for family, words in (("diffllama", "cached keys/values"), ("mllama", "cross-attention")):
        if family not in F.causal_lm_families():
            continue
        with pytest.raises(consa.UnsupportedModelError, match=words) as e:
            attention_modules(F.tiny_model(family))
        assert "\n" not in str(e.value)
