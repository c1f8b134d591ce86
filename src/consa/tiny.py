"""Tiny random configs of the tested families: for tests, the CPU demo and quick experiments."""

from __future__ import annotations

import torch

FAMILIES = ("qwen3", "qwen2", "llama", "mistral", "gemma3_text")


def tiny_config(
    family: str = "qwen3",
    *,
    vocab_size: int = 101,
    hidden_size: int = 64,
    num_layers: int = 3,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int = 16,
    intermediate_size: int = 96,
    max_position_embeddings: int = 1024,
    attention_bias: bool | None = None,
):
    """A full-attention config of ``family`` (no native sliding layers)."""
    from transformers import AutoConfig

    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    if family in ("qwen3", "qwen2"):
        common.update(use_sliding_window=False, sliding_window=None)
    if family == "mistral":
        common.update(sliding_window=None)
    if family == "gemma3_text":
        # Gemma3 always builds a sliding mask, so it needs a window even when no layer uses it.
        common.update(layer_types=["full_attention"] * num_layers, sliding_window=max_position_embeddings, query_pre_attn_scalar=head_dim)
    if attention_bias is not None:
        common["attention_bias"] = attention_bias
    if family not in FAMILIES:
        raise ValueError(f"unknown tiny family {family!r}; choose one of {', '.join(FAMILIES)}")
    return AutoConfig.for_model(family, **common)


def tiny_model(family: str = "qwen3", seed: int = 0, attn_implementation: str = "sdpa", **kwargs):
    """A randomly initialised tiny causal LM in eval mode (weights scaled up so attention is peaky)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **kwargs), attn_implementation=attn_implementation)
    with torch.no_grad():  # random init is nearly uniform attention; sharpen it so masks matter
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(4.0)
    return model.eval()
