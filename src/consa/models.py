"""Attach consa to any Hugging Face decoder whose attention goes through ``AttentionInterface``.

Nothing here replaces a forward: consa sets ``attn_implementation="consa"`` and hangs a
:class:`~consa.attention.hybrid.LayerPlan` on each attention module. What a family must offer is
checked up front, and a model that lacks it gets one error naming what is missing.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from .allocation import Allocation, ModelShape
from .attention.hybrid import NAME, GateMix, LayerPlan
from .errors import ConsaError

TESTED_FAMILIES = ("qwen3", "qwen2", "llama", "mistral", "ministral", "gemma3_text")


class UnsupportedModelError(ConsaError, ValueError):
    """The model cannot run consa attention; the message says what is missing."""


def text_config(model_or_config):
    cfg = getattr(model_or_config, "config", model_or_config)
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def model_shape(model) -> ModelShape:
    cfg = text_config(model)
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    return ModelShape(num_layers=cfg.num_hidden_layers, num_kv_heads=kv, num_q_heads=heads)


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The per-layer self-attention modules, in layer order; raises if the family does not fit."""
    cfg = text_config(model)
    name = f"{type(model).__name__} (model_type={getattr(cfg, 'model_type', '?')!r})"
    missing = []
    if not getattr(model, "_supports_attention_backend", False):
        missing.append("routing of attention through transformers' AttentionInterface (_supports_attention_backend)")
    found = {}
    for mod in model.modules():
        if all(hasattr(mod, a) for a in ("layer_idx", "q_proj", "k_proj", "v_proj", "o_proj")):
            found.setdefault(mod.layer_idx, mod)
    if len(found) != cfg.num_hidden_layers:
        missing.append(
            f"one attention module per layer with layer_idx and q_proj/k_proj/v_proj/o_proj "
            f"(found {len(found)} of {cfg.num_hidden_layers})"
        )
    if missing:
        raise UnsupportedModelError(f"unsupported model {name}: missing " + "; ".join(missing))
    native = _native_sliding_layers(cfg, found)
    if native:
        raise UnsupportedModelError(
            f"{name} already uses sliding-window attention in layers {native}; consa starts from a "
            "full-attention base (set layer_types to all 'full_attention' / sliding_window=None)"
        )
    return [found[i] for i in range(cfg.num_hidden_layers)]


def _native_sliding_layers(cfg, modules: dict) -> list[int]:
    types = getattr(cfg, "layer_types", None)
    if types:
        return [i for i, t in enumerate(types) if t != "full_attention"]
    if getattr(cfg, "sliding_window", None) is not None and getattr(cfg, "use_sliding_window", True):
        return list(range(cfg.num_hidden_layers))
    return [i for i, m in modules.items() if getattr(m, "sliding_window", None) is not None]


def _set_impl(model, impl: str) -> None:
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(impl)
    else:  # pragma: no cover - very old transformers
        model.config._attn_implementation = impl


def attach_gates(model, window: int, sinks: int = 0, backend: str = "auto") -> GateMix:
    """Put every layer in gate mode; the returned GateMix's ``z`` ([layers, kv_heads]) drives the mix."""
    mix = GateMix()
    shape = model_shape(model)
    for mod in attention_modules(model):
        mod.consa_plan = LayerPlan(mod.layer_idx, shape.num_kv_heads, window, sinks, "gate", gate_mix=mix, backend=backend)
    _set_impl(model, NAME)
    return mix


def apply_allocation(model, allocation: Allocation, backend: str = "auto") -> None:
    """Fix the FA/SWA split of every layer (eval/serving)."""
    allocation.check_matches(model_shape(model))
    for mod in attention_modules(model):
        i = mod.layer_idx
        mod.consa_plan = LayerPlan(
            i, allocation.shape.num_kv_heads, allocation.window, allocation.sinks, "fixed",
            fa_kv=allocation.fa_heads(i), backend=backend,
        )
    _set_impl(model, NAME)


def detach(model, impl: str = "sdpa") -> None:
    """Back to plain full attention with a stock implementation."""
    for mod in attention_modules(model):
        if hasattr(mod, "consa_plan"):
            del mod.consa_plan
    _set_impl(model, impl)


# ---- head reordering ------------------------------------------------------------------------------
@torch.no_grad()
def reorder_heads(model, allocation: Allocation) -> Allocation:
    """Permute each layer's KV heads (and their query groups) so FA heads come first.

    Rows of q/k/v projections (and biases), the matching o_proj columns and per-head norms move
    together, so the model computes the same function. Returns the allocation in the new order, with
    the permutation recorded in ``meta["head_order"]`` (new → original KV head).
    """
    allocation.check_matches(model_shape(model))
    shape = allocation.shape
    group = shape.num_q_heads // shape.num_kv_heads
    orders = []
    for mod in attention_modules(model):
        i = mod.layer_idx
        order = allocation.fa_heads(i) + allocation.swa_heads(i)
        orders.append(order)
        if order == list(range(shape.num_kv_heads)):
            continue
        head_dim = mod.k_proj.weight.shape[0] // shape.num_kv_heads
        kv_rows = _rows(order, head_dim)
        q_rows = _rows([h * group + j for h in order for j in range(group)], head_dim)
        _permute_out(mod.q_proj, q_rows)
        _permute_out(mod.k_proj, kv_rows)
        _permute_out(mod.v_proj, kv_rows)
        mod.o_proj.weight.copy_(mod.o_proj.weight[:, q_rows.to(mod.o_proj.weight.device)])
        for norm_name, rows in (("q_norm", q_rows), ("k_norm", kv_rows)):
            norm = getattr(mod, norm_name, None)
            w = getattr(norm, "weight", None)
            if w is not None and w.numel() == rows.numel():  # per-head norms (not shared over head_dim)
                w.copy_(w[rows.to(w.device)])
    fa = [sorted(row, reverse=True) for row in allocation.fa]
    prior = allocation.meta.get("head_order")
    if prior is not None:
        orders = [[p[o] for o in order] for p, order in zip(prior, orders)]
    meta = dict(allocation.meta, head_order=orders)
    return Allocation(allocation.granularity, shape, allocation.window, tuple(map(tuple, fa)), allocation.sinks, meta)


def _rows(heads: list[int], head_dim: int) -> torch.Tensor:
    return torch.tensor([h * head_dim + d for h in heads for d in range(head_dim)])


def _permute_out(linear: nn.Linear, rows: torch.Tensor) -> None:
    rows = rows.to(linear.weight.device)
    linear.weight.copy_(linear.weight[rows])
    if linear.bias is not None:
        linear.bias.copy_(linear.bias[rows])


# ---- loading --------------------------------------------------------------------------------------
def load_model(path: str | os.PathLike, dtype: torch.dtype | str | None = None, device: str | None = None):
    """Load a local HF model directory offline (no hub access ever)."""
    from transformers import AutoModelForCausalLM

    p = Path(path)
    if not p.is_dir():
        raise ConsaError(f"model directory not found: {p}")
    if not (p / "config.json").is_file():
        raise ConsaError(f"{p} is not a Hugging Face model directory (no config.json)")
    kwargs = {"local_files_only": True}
    if dtype is not None:
        kwargs["dtype"] = dtype
    model = AutoModelForCausalLM.from_pretrained(str(p), **kwargs)
    attention_modules(model)  # fail early and clearly on unsupported families
    if device:
        model.to(device)
    return model
