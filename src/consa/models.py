"""Attach consa to any Hugging Face decoder whose attention goes through ``AttentionInterface``.

Nothing here replaces a forward: consa sets ``attn_implementation="consa"`` and hangs a
:class:`~consa.attention.hybrid.LayerPlan` on each attention module. What a family must offer is
checked up front, and a model that lacks it gets one error naming what is missing.

Models that already slide in some layers (Gemma3's 5:1 pattern, Gemma2, Qwen with
``use_sliding_window``, Mistral's one window for all layers) keep those layers as the model has them
by default: :func:`native_windows` names them, and they get a fixed plan at their own window. The
search then runs over the units that are still full attention; ``reopen_native=True`` searches all.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from .allocation import Allocation, AllocationError, ModelShape
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
    unsupported = _unsupported_features(cfg, found)
    if unsupported:
        raise UnsupportedModelError(f"unsupported model {name}: consa attention does not compute " + "; ".join(unsupported))
    _fill_unused_window(cfg, found)
    return [found[i] for i in range(cfg.num_hidden_layers)]


def _unsupported_features(cfg, found: dict) -> list[str]:
    """Attention features consa's kernels do not compute: refuse rather than silently drop them."""
    out = []
    if getattr(cfg, "attn_logit_softcapping", None):
        out.append("attention logit soft-capping (set attn_logit_softcapping=None)")
    if any(isinstance(getattr(m, "sinks", None), torch.Tensor) for m in found.values()):
        out.append("learned attention-sink logits (gpt-oss)")
    return out


def _fill_unused_window(cfg, found: dict) -> None:
    """Gemma3 builds its sliding mask whatever ``layer_types`` say, and transformers raises when
    ``sliding_window`` is null even if no layer slides. No layer reads that mask then, so any window
    will do: use the longest context, which also keeps a later export loadable by stock transformers."""
    types = getattr(cfg, "layer_types", None)
    if base_family(cfg) in ("gemma3_text", "gemma2") and getattr(cfg, "sliding_window", 0) is None:
        if types and all(t == "full_attention" for t in types):
            cfg.sliding_window = int(getattr(cfg, "max_position_embeddings", None) or 1 << 20)


def native_windows(model) -> list[int | None]:
    """Per layer: the sliding window the model itself uses there, or None for full attention."""
    cfg = text_config(model)
    mods = attention_modules(model)
    types = getattr(cfg, "layer_types", None)
    cfg_window = getattr(cfg, "sliding_window", None)
    if getattr(cfg, "use_sliding_window", True) is False:
        cfg_window = None
    out = []
    for i, mod in enumerate(mods):
        if types is not None:
            w = (getattr(mod, "sliding_window", None) or cfg_window) if types[i] == "sliding_attention" else None
        else:  # Mistral: one config window for every layer, no layer_types
            w = getattr(mod, "sliding_window", None) or cfg_window
        if w is not None and (not isinstance(w, int) or w < 1):
            raise UnsupportedModelError(f"layer {i} has an unusable native sliding window {w!r}")
        out.append(w)
    return out


def searchable_native(model, reopen_native: bool = False) -> list[int | None]:
    """The native windows consa keeps (all None when ``reopen_native``); one clear error when no
    full-attention layer is left to search."""
    native = [None] * model_shape(model).num_layers if reopen_native else native_windows(model)
    if all(w is not None for w in native):
        raise UnsupportedModelError(
            f"every layer of this model already uses sliding-window attention (windows {sorted(set(native))}): "
            "nothing is left to search (reopen_native / --reopen-native searches every unit)"
        )
    return native


def register_export_classes() -> None:
    """Make the ``consa_<family>`` model types of head-wise exports known to the Auto classes, so that
    after ``import consa`` they load without ``trust_remote_code`` (the classes are the shipped ones)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from .export_code.modeling_consa import CLASSES

    for config_cls, model_cls in CLASSES.values():
        AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
        AutoModelForCausalLM.register(config_cls, model_cls, exist_ok=True)


def base_family(cfg) -> str:
    """The stock model type behind a config (``consa_qwen3`` → ``qwen3``)."""
    family = getattr(text_config(cfg), "model_type", "?")
    return family[len("consa_"):] if family.startswith("consa_") else family


def _set_impl(model, impl: str) -> None:
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(impl)
    else:  # pragma: no cover - very old transformers
        model.config._attn_implementation = impl


def attach_gates(model, window: int, sinks: int = 0, backend: str = "auto", reopen_native: bool = False,
                 menu: tuple | None = None) -> GateMix:
    """Put every searched layer in gate mode; the returned GateMix's ``z`` ([layers, kv_heads]) drives
    the mix (None: full attention). With a span ``menu`` z is [layers, kv_heads, options] weights.
    Native sliding layers keep their own window (a fixed plan) unless ``reopen_native``."""
    mix = GateMix()
    shape = model_shape(model)
    native = searchable_native(model, reopen_native)
    for mod in attention_modules(model):
        w = native[mod.layer_idx]
        if w is None:
            mod.consa_plan = LayerPlan(mod.layer_idx, shape.num_kv_heads, window, sinks, "gate", gate_mix=mix, backend=backend,
                                       menu=tuple(menu) if menu is not None else None)
        else:
            mod.consa_plan = LayerPlan(mod.layer_idx, shape.num_kv_heads, w, 0, "fixed", backend=backend)
    _set_impl(model, NAME)
    return mix


@contextmanager
def native_plans(model, native: list[int | None]):
    """Within the block, layers with a native window attend as the model was trained (the teacher
    of a search that reopens them); their gate plans come back afterwards."""
    saved = []
    shape = model_shape(model)
    for mod in attention_modules(model):
        w = native[mod.layer_idx]
        if w is not None:
            saved.append((mod, getattr(mod, "consa_plan", None)))
            mod.consa_plan = LayerPlan(mod.layer_idx, shape.num_kv_heads, w, 0, "fixed")
    try:
        yield
    finally:
        for mod, plan in saved:
            mod.consa_plan = plan


def apply_allocation(model, allocation: Allocation, backend: str = "auto") -> None:
    """Fix the FA/SWA split of every layer (eval/serving)."""
    allocation.check_matches(model_shape(model))
    mods = attention_modules(model)
    have = native_windows(model)
    for i, w in enumerate(allocation.native):
        if w is not None and have[i] != w:
            raise AllocationError(f"allocation keeps layer {i} at the model's native window {w}, but the model's "
                                  f"layer {i} has {'no sliding window' if have[i] is None else f'window {have[i]}'}")
    for mod in mods:
        mod.consa_plan = LayerPlan.from_allocation(allocation, mod.layer_idx, backend=backend)
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
    prior = allocation.meta.get("head_order")
    total = [[p[o] for o in order] for p, order in zip(prior, orders)] if prior is not None else orders
    return allocation.permuted(orders, dict(allocation.meta, head_order=total))


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
    model = AutoModelForCausalLM.from_pretrained(str(p), local_files_only=True, dtype=dtype)
    attention_modules(model)  # fail early and clearly on unsupported families
    if device:
        model.to(device)
    return model


register_export_classes()
