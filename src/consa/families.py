"""Every causal-LM family of the installed transformers, tiny and random: which route attention
through ``AttentionInterface`` (the search -> export -> load matrix over them is
:mod:`consa.experiment.family_matrix`, a study above the model layer).

The list is read from transformers (``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``), never typed by hand, so
a new transformers release is covered the day it is installed. :func:`tiny_config` shrinks a
family's default config by attribute name (sizes, head counts, experts, per-layer lists), so the
same rules serve families nobody here has read. :func:`routes_attention` decides by running a
forward with a counting attention function registered, not from a list.

``python -m consa.experiment.family_matrix --markdown`` prints README's family table for the installed version.
"""

from __future__ import annotations

import warnings

import torch

VOCAB = 128
HIDDEN = 64
SLIDING = 6  # tiny native window: shorter than the test sequences, so sliding layers matter
MIN_LAYERS = 3
# attribute name -> tiny value (used where the family's default is larger). Names, not families.
_SIZES = {
    "vocab_size": VOCAB, "hidden_size": HIDDEN, "d_model": HIDDEN, "n_embd": HIDDEN, "num_attention_heads": 4,
    "num_key_value_heads": 2, "num_kv_heads": 2, "n_head": 4, "num_heads": 4, "head_dim": 16, "kv_channels": 16,
    "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "num_experts_per_tok": 2, "top_k_experts": 2,
    "n_shared_experts": 1, "n_group": 1, "topk_group": 1, "kv_lora_rank": 16, "q_lora_rank": 16, "o_lora_rank": 16,
    "qk_nope_head_dim": 16, "qk_rope_head_dim": 16, "v_head_dim": 16, "qk_head_dim": 32,
    "encoder_attention_heads": 4, "decoder_attention_heads": 4, "attention_heads": 4,
    "linear_key_head_dim": 16, "linear_value_head_dim": 16, "linear_num_key_heads": 2, "linear_num_value_heads": 4,
    "linear_head_dim": 16, "linear_num_heads": 4, "mamba_n_heads": 4, "mamba_d_state": 16, "mamba_headdim": 16,
    "mamba_d_ssm": 64, "mamba_chunk_size": 16, "mamba_dt_rank": 8, "ssm_state_size": 16, "mamba_num_heads": 4,
    "chunk_size": 16, "hidden_size_per_layer_input": 16, "vocab_size_per_layer_input": VOCAB,
    "index_head_dim": 16, "index_n_heads": 2, "index_topk": 8, "lru_width": HIDDEN, "depth": 1,
    "out_hidden_size": HIDDEN, "num_position_embeddings": 64, "max_position_embeddings": 512, "block_size": 16,
    "router_hidden_size": 16, "swa_head_dim": 16, "emb_dim": HIDDEN, "n_heads": 4, "n_layers": MIN_LAYERS,
}
_FFN_WORDS = ("intermediate", "ffn", "_ff", "dff", "d_inner", "expert_hidden")


def causal_lm_families() -> list[str]:
    """Every model type the installed transformers maps to an ``AutoModelForCausalLM`` class."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


_FILL_NONE = ("head_dim", "num_key_value_heads")  # None in some defaults that their own code cannot take


def _tiny_value(name: str, value):
    if value is None and name in _FILL_NONE:
        return _SIZES[name]
    if isinstance(value, list) and value and all(isinstance(v, int) and not isinstance(v, bool) for v in value) \
            and any(w in name for w in _FFN_WORDS):  # a per-layer FFN width (Gemma 3n)
        return [min(v, 64) for v in value]
    if not isinstance(value, int) or isinstance(value, bool):
        return value
    if name in _SIZES:
        return min(value, _SIZES[name])
    if (any(w in name for w in _FFN_WORDS) and value > 64) or ("vocab" in name and value > VOCAB):
        return 64 if "vocab" not in name else VOCAB
    return value


def _layer_pattern(types: list) -> int:
    """How many leading layers show every layer type once (at least MIN_LAYERS)."""
    first = {}
    for i, t in enumerate(types):
        first.setdefault(t, i)
    return max(MIN_LAYERS, max(first.values()) + 1)


def _shrink(cfg_dict: dict, is_text: bool) -> dict:
    """Tiny values by attribute name; per-layer lists cut to the tiny depth (every layer type kept)."""
    d = {k: _tiny_value(k, v) for k, v in cfg_dict.items()}
    old = cfg_dict.get("num_hidden_layers") or cfg_dict.get("num_layers") or cfg_dict.get("n_layer")
    n = MIN_LAYERS
    if isinstance(old, int) and old > 0:  # every per-layer kind list (layer_types, layers_block_type, ...)
        for k, v in cfg_dict.items():
            if isinstance(v, list) and len(v) == old and all(isinstance(x, str) for x in v):
                n = max(n, _layer_pattern(v))
            elif "layer" in k and k.endswith("_offset") and isinstance(v, int) and 0 <= v < old:
                n = max(n, v + 1)  # e.g. attention every `period` layers from `offset`
    if not is_text:
        n = 1
    if isinstance(old, int) and old > 0:
        for key in ("num_hidden_layers", "num_layers", "n_layer"):
            if key in d:
                d[key] = min(old, n)
        n = min(old, n)
        for k, v in cfg_dict.items():
            if isinstance(v, list) and len(v) == old:  # per-layer lists (layer_types, mlp_layer_types, ...)
                d[k] = v[:n]
            elif isinstance(v, list) and v and all(isinstance(x, int) and not isinstance(x, bool) for x in v) and (
                    "layer" in k or k.endswith("_idxs") or k.endswith("_ids")) and max(v) < old:
                kept = [x for x in v if x < n]  # lists of layer indices
                d[k] = kept if kept or not v else [0]
        for k, v in cfg_dict.items():  # "attention on every layer" as an index list: every other layer instead,
            if "attn" in k and isinstance(v, list) and sorted(v) == list(range(old)) and old > 1:  # the rest re-derived
                d[k] = [i for i in range(n) if i % 2 == 0]
                for k2, v2 in cfg_dict.items():
                    if isinstance(v2, list) and len(v2) == old and all(isinstance(x, str) for x in v2):
                        d[k2] = None
    per_layer = d.get("per_layer_config")
    if isinstance(per_layer, dict) and isinstance(old, int):  # overrides keyed by layer index
        d["per_layer_config"] = {k: v for k, v in per_layer.items() if int(k) < min(old, n)}
    if "num_kv_shared_layers" in d:
        d["num_kv_shared_layers"] = 0
    if d.get("sliding_window"):
        d["sliding_window"] = SLIDING
    vocab = d.get("vocab_size")
    if isinstance(vocab, int):
        specials = iter(range(vocab - 1, 2, -1))
        for k, v in list(d.items()):
            if (k.endswith("token_id") or k.endswith("token_index")) and isinstance(v, int) and not isinstance(v, bool):
                d[k] = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}.get(k, next(specials)) if v >= vocab else v
            elif k == "eos_token_id" and isinstance(v, list):
                d[k] = [x if x < vocab else 2 for x in v]
    return d


def _changed(cfg_dict: dict, is_text: bool) -> dict:
    """Only what shrinking changed: everything else the family derives from its own defaults."""
    small = _shrink(cfg_dict, is_text)
    return {k: v for k, v in small.items() if v != cfg_dict.get(k)}


def shrunk_config_dict(cfg_dict: dict) -> dict:
    """A (text) config dict with tiny sizes, everything else as it was."""
    return dict(cfg_dict, **_changed(cfg_dict, is_text=True))


def tiny_config(family: str):
    """A tiny random-init config of ``family``: its defaults, shrunk by attribute name (sub-configs
    too: a vision tower gets one layer)."""
    from transformers import AutoConfig

    base = AutoConfig.for_model(family)
    text = base.get_text_config()
    d = _changed(base.to_dict(), is_text=text is base)
    for key in getattr(base, "sub_configs", {}) or {}:
        sub = getattr(base, key, None)
        if sub is not None and hasattr(sub, "to_dict"):
            d[key] = dict(sub.to_dict(), **_changed(sub.to_dict(), is_text=sub is text))
            d[key].pop("transformers_version", None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoConfig.for_model(family, **d)


def tiny_model(family: str, seed: int = 0, attn_implementation: str | None = None, vision: bool = False):
    """A tiny random model of ``family`` in eval mode (``vision``: its vision-language class, e.g.
    Qwen3_5ForConditionalGeneration, instead of its causal-LM one); q/k weights scaled up so attention
    is peaky (masks and windows then change the outputs measurably)."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    torch.manual_seed(seed)
    auto = AutoModelForImageTextToText if vision else AutoModelForCausalLM
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = auto.from_config(tiny_config(family), attn_implementation=attn_implementation)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight", "qkv_proj.weight")):
                p.mul_(4.0)
    return model.eval()


def matrix_entries() -> list[tuple[str, str, bool]]:
    """(row name, family, vision) for every causal-LM family, plus a ``<family> (vision-language)`` row
    where the family's image-text-to-text class is another class (Qwen3.5's checkpoints)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as causal
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES as vlm

    out = []
    for family in causal_lm_families():
        out.append((family, family, False))
        if vlm.get(family) not in (None, causal[family]):
            out.append((f"{family} (vision-language)", family, True))
    return out


# ---- does the family's attention go through AttentionInterface? -----------------------------------
PROBE = "consa_probe"


def _probe_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    module._consa_probe_calls = getattr(module, "_consa_probe_calls", 0) + 1
    b, h, t, _ = query.shape
    return torch.zeros(b, t, h, value.shape[-1], dtype=query.dtype, device=query.device), None


def routes_attention(model, ids: torch.Tensor | None = None) -> list[str]:
    """Names of the modules whose attention reached ``AttentionInterface`` in one forward (the model's
    attention implementation is put back afterwards)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(PROBE, _probe_attention)
    AttentionMaskInterface.register(PROBE, sdpa_mask)
    cfg = model.config
    before = {id(c): c._attn_implementation for c in _configs(cfg)}
    try:
        for c in _configs(cfg):
            c._attn_implementation_internal = PROBE
        if ids is None:
            ids = torch.randint(3, VOCAB - 8, (1, 8), generator=torch.Generator().manual_seed(0))
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model(input_ids=ids)
        return [n for n, m in model.named_modules() if getattr(m, "_consa_probe_calls", 0)]
    finally:
        for c in _configs(cfg):
            c._attn_implementation_internal = before[id(c)]
        for m in model.modules():
            if hasattr(m, "_consa_probe_calls"):
                del m._consa_probe_calls


def _configs(cfg) -> list:
    out, todo = [], [cfg]
    while todo:
        c = todo.pop()
        if any(c is o for o in out):
            continue
        out.append(c)
        todo += [getattr(c, k) for k in (getattr(c, "sub_configs", {}) or {}) if getattr(c, k, None) is not None]
    return out
