"""Attach consa to any Hugging Face decoder whose attention goes through ``AttentionInterface``.

Nothing here replaces a forward: consa sets ``attn_implementation="consa"`` and hangs a
:class:`~consa.attention.plan.LayerPlan` on each attention module (:func:`plans_of` reads them back, to
build a cache). What a family must offer is
checked up front, and a model that lacks it gets one error naming what is missing.

Models that already slide in some layers (Gemma3's 5:1 pattern, Gemma2, Qwen with
``use_sliding_window``, Mistral's one window for all layers) keep those layers as the model has them
by default: :func:`native_windows` names them, and they get a fixed plan at their own window. The
search then runs over the units that are still full attention; ``reopen_native=True`` searches all.

The allocation's rows are the text decoder's attention layers (:func:`attention_layers` maps a row to
its decoder layer): a decoder that mixes in linear-attention or convolution layers (Qwen3.5, LFM2)
leaves those out and keeps transformers' own cache layers for them (:func:`hybrid_cache`); a
vision-language model's tower is never touched. Head counts and sizes are read from each attention
module's weights, so per-layer configs (Gemma 4) and fused ``qkv_proj`` weights (Phi-3) need no
special case.
"""

from __future__ import annotations

import functools
import inspect
import os
import re
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from .allocation import Allocation, AllocationError, ModelShape
from .attention.hybrid import NAME
from .attention.plan import GateMix, KernelConfig, LayerPlan
from .errors import ConsaError


class UnsupportedModelError(ConsaError, ValueError):
    """The model cannot run consa attention; the message says what is missing."""


def text_config(model_or_config):
    """The text decoder's config (a vision-language model's ``text_config``; a decoder's own)."""
    cfg = getattr(model_or_config, "config", model_or_config)
    return cfg.get_text_config(decoder=True) if hasattr(cfg, "get_text_config") else cfg


def layer_kinds(model_or_config) -> list[str]:
    """Per decoder layer: its kind in the text config (``layer_types``), else ``full_attention``."""
    cfg = text_config(model_or_config)
    kinds = getattr(cfg, "layer_types", None)
    return list(kinds) if kinds else ["full_attention"] * cfg.num_hidden_layers


def is_attention_kind(kind: str) -> bool:
    """Softmax attention over keys and values (full, sliding, chunked), not linear attention,
    convolutions or state-space layers."""
    return "attention" in kind and "linear" not in kind


def _cfg_int(cfg, name: str):
    try:  # a per-layer attribute (e.g. Gemma 4's head_dim) raises when read globally
        return getattr(cfg, name, None)
    except Exception:
        return None


def model_shape(model) -> ModelShape:
    """Rows = the decoder's attention layers (not its linear-attention or convolution layers); heads
    read from the attention modules themselves when given a model, so per-layer configs are honoured."""
    if isinstance(model, nn.Module):
        shapes = {_module_heads(m) for m in attention_modules(model)}
        (q, kv), = shapes
        return ModelShape(num_layers=len(attention_modules(model)), num_kv_heads=kv, num_q_heads=q)
    cfg = text_config(model)
    heads = cfg.num_attention_heads
    kv = _cfg_int(cfg, "num_key_value_heads") or heads
    return ModelShape(num_layers=sum(map(is_attention_kind, layer_kinds(cfg))), num_kv_heads=kv, num_q_heads=heads)


def _decoder(model: nn.Module) -> nn.Module:
    """The text decoder inside ``model`` (itself for a plain decoder): the module that holds the layers
    and whose config is the text config, so a vision tower's attention is never touched."""
    cfg = text_config(model)
    for mod in model.modules():
        if getattr(mod, "config", None) is cfg and isinstance(getattr(mod, "layers", None), nn.ModuleList):
            return mod
    return model


OUT_PROJ = ("o_proj", "out_proj", "dense", "Wo")  # o_proj; LFM2: out_proj; Phi: dense; ModernBERT: Wo


def out_proj(mod) -> nn.Linear:
    """An attention module's output projection."""
    return next(getattr(mod, a) for a in OUT_PROJ if isinstance(getattr(mod, a, None), nn.Linear))


def _projections(mod) -> str | None:
    """How an attention module projects q/k/v: ``split`` (q_proj, k_proj, v_proj), ``fused`` (one
    qkv_proj: Phi-3), ``shared`` (k_proj only, values = keys: Gemma 4's full layers); None otherwise."""
    if not hasattr(mod, "layer_idx") or not any(isinstance(getattr(mod, a, None), nn.Linear) for a in OUT_PROJ):
        return None
    if all(isinstance(getattr(mod, a, None), nn.Linear) for a in ("q_proj", "k_proj", "v_proj")):
        return "split"
    if isinstance(getattr(mod, "qkv_proj", None), nn.Linear):
        return "fused"
    if isinstance(getattr(mod, "q_proj", None), nn.Linear) and isinstance(getattr(mod, "k_proj", None), nn.Linear) \
            and hasattr(mod, "v_proj") and mod.v_proj is None:
        return "shared"
    return None


def head_dim(mod) -> int:
    """This attention module's head size (per layer: Gemma 4's full and sliding layers differ)."""
    d = getattr(mod, "head_dim", None)
    if isinstance(d, int) and d > 0:
        return d
    return out_proj(mod).weight.shape[1] // text_config(mod.config).num_attention_heads


def _module_heads(mod) -> tuple[int, int]:
    """(query heads, KV heads) of one attention module, from its weights."""
    d = head_dim(mod)
    q = out_proj(mod).weight.shape[1] // d
    if _projections(mod) == "fused":
        return q, (mod.qkv_proj.weight.shape[0] - q * d) // (2 * d)
    return q, mod.k_proj.weight.shape[0] // d


_OTHER_KINDS = ("linear", "conv", "mamba", "ssm", "recurrent", "moe", "mlp")  # layers without softmax attention


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The text decoder's self-attention modules, one per attention layer, in layer order (a decoder
    that mixes in linear-attention or convolution layers has fewer than ``num_hidden_layers``);
    raises one line naming what the family lacks."""
    cfg = text_config(model)
    name = f"{type(model).__name__} (model_type={getattr(cfg, 'model_type', '?')!r})"
    decoder = _decoder(model)
    can_set = getattr(type(decoder), "_can_set_attn_implementation", None)
    routes = can_set() if callable(can_set) else getattr(decoder, "_supports_attention_backend", False)
    if not routes:
        raise UnsupportedModelError(f"unsupported model {name}: its attention does not go through transformers' "
                                    "AttentionInterface (transformers cannot set its attn_implementation)")
    kinds = layer_kinds(cfg)
    found = {}
    for path, mod in decoder.named_modules():
        if _projections(mod) is not None and isinstance(mod.layer_idx, int) and 0 <= mod.layer_idx < len(kinds) \
                and not _is_cross_attention(path, mod):
            found.setdefault(mod.layer_idx, mod)
    if any(_projections(m) is not None and _is_cross_attention(p, m) for p, m in decoder.named_modules()):
        raise UnsupportedModelError(f"unsupported model {name}: it has cross-attention layers (attending to an encoder's "
                                    "or an image's states), whose cache consa's hybrid cache does not hold")
    want = [i for i, k in enumerate(kinds) if is_attention_kind(k)]
    mixed = sorted({kinds[i] for i in found if i not in want and not any(w in kinds[i] for w in _OTHER_KINDS)})
    if mixed:
        raise UnsupportedModelError(f"unsupported model {name}: its layers of kind {mixed} hold attention beside other "
                                    "state in one layer (consa allocates layers that are attention only)")
    if not want:
        raise UnsupportedModelError(f"unsupported model {name}: none of its layer kinds {sorted(set(kinds))} is attention")
    lacking = [i for i in want if i not in found]
    if lacking:
        shared = [i for i in lacking if _shares_kv(decoder, i)]
        if shared:
            raise UnsupportedModelError(f"unsupported model {name}: layers {shared[:5]} reuse another layer's keys and "
                                        "values (KV sharing)")
        raise UnsupportedModelError(
            f"unsupported model {name}: missing one attention module per attention layer with layer_idx, "
            f"q_proj/k_proj/v_proj or qkv_proj, and o_proj (found {len(want) - len(lacking)} of {len(want)})")
    mods = [found[i] for i in want]
    if _transforms_cached_kv(type(mods[0])):
        raise UnsupportedModelError(f"unsupported model {name}: its attention computes on the cached keys/values before "
                                    "the attention call (DiffLlama splits values across heads, Doge builds its mask from "
                                    "them), which consa's per-head split of the cache cannot follow")
    heads = sorted({_module_heads(m) for m in mods})
    if len(heads) > 1:
        raise UnsupportedModelError(f"unsupported model {name}: its attention layers differ in (query, KV) head counts "
                                    f"{heads}; an allocation has one shape")
    unsupported = _unsupported_features(cfg, mods, kinds, want)
    if unsupported:
        raise UnsupportedModelError(f"unsupported model {name}: consa attention does not compute " + "; ".join(unsupported))
    _fill_unused_window(cfg)
    return mods


@functools.lru_cache(maxsize=None)
def _transforms_cached_kv(cls) -> bool:
    """Does ``cls.forward`` compute on the keys or values the cache returned before handing them to the
    attention function? (DiffLlama splits the values across heads.) Read from the source, as
    transformers itself decides whether a class routes attention through the interface."""
    try:
        src = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return False
    after = src.split(".update(", 1)[1] if ".update(" in src else ""
    before_call = after.split("attention_interface(", 1)[0].split("\n", 1)[-1]
    return re.search(r"\w\([^()]*\b(key|value)_states\b|\b(key|value)_states\s*\.", before_call) is not None


def _is_cross_attention(path: str, mod) -> bool:
    """Attention over another sequence (an encoder's states, image features), not the decoder's own."""
    leaf = path.rsplit(".", 1)[-1].lower()
    return bool(getattr(mod, "is_cross_attention", False)) or "cross" in leaf or leaf.startswith("encoder_attn")


def attention_layers(model) -> list[int]:
    """The decoder layer index of each allocation row (each attention module)."""
    return [m.layer_idx for m in attention_modules(model)]


def _shares_kv(decoder, layer: int) -> bool:
    for mod in decoder.modules():
        if getattr(mod, "layer_idx", None) == layer and getattr(mod, "is_kv_shared_layer", False):
            return True
    return False


def _unsupported_features(cfg, mods: list, kinds: list[str], rows: list[int]) -> list[str]:
    """Attention features consa's kernels do not compute: refuse rather than silently drop them.
    (Logit soft-capping and learned sink logits are computed: the attention function reads them
    from the call, ``attention.softcap_sinks``.)"""
    out = []
    other = sorted({kinds[i] for i in rows} - {"full_attention", "sliding_attention"})
    if other:
        out.append(f"attention layers of kind {other} (only full and sliding-window attention)")
    return out


def _fill_unused_window(cfg) -> None:
    """Some families (Gemma2/3) build their sliding mask whatever ``layer_types`` say, and transformers
    raises when ``sliding_window`` is null even if no layer slides. No layer reads that mask then, so
    any window will do: use the longest context, which also keeps a later export loadable by stock
    transformers."""
    types = getattr(cfg, "layer_types", None)
    if types and "sliding_attention" not in types and hasattr(cfg, "sliding_window") and cfg.sliding_window is None:
        cfg.sliding_window = int(getattr(cfg, "max_position_embeddings", None) or 1 << 20)


def native_windows(model) -> list[int | None]:
    """Per attention layer (allocation row): the sliding window the model itself uses there, or None
    for full attention."""
    cfg = text_config(model)
    mods = attention_modules(model)
    types = getattr(cfg, "layer_types", None)
    cfg_window = getattr(cfg, "sliding_window", None)
    if getattr(cfg, "use_sliding_window", True) is False:
        cfg_window = None
    out = []
    for i, mod in enumerate(mods):
        if types is not None:
            kind = types[mod.layer_idx]
            w = (getattr(mod, "sliding_window", None) or cfg_window) if kind == "sliding_attention" else None
        else:  # Mistral: one config window for every layer, no layer_types
            w = getattr(mod, "sliding_window", None) or cfg_window
        if w is not None and (not isinstance(w, int) or w < 1):
            raise UnsupportedModelError(f"layer {mod.layer_idx} has an unusable native sliding window {w!r}")
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


def register_export_classes(model_class_names=None) -> None:
    """Make the ``consa_<family>`` model types of head-wise exports known to the Auto classes, so that
    they load without ``trust_remote_code`` (the classes are the shipped ones): the common families
    when consa is imported, any other one when :func:`load_model` or ``consa.load`` meets it."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from .export_code import modeling_consa

    pairs = modeling_consa.CLASSES.values() if model_class_names is None else [modeling_consa.classes(n) for n in model_class_names]
    for config_cls, model_cls in pairs:
        AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
        AutoModelForCausalLM.register(config_cls, model_cls, exist_ok=True)


def base_family(cfg) -> str:
    """The stock model type behind a config (``consa_qwen3`` → ``qwen3``)."""
    family = getattr(text_config(cfg), "model_type", "?")
    return family[len("consa_"):] if family.startswith("consa_") else family


def _set_impl(model, impl: str) -> None:
    """``impl`` on the text decoder only: a vision or audio tower keeps its own attention."""
    cfg, text = model.config, text_config(model)
    key = next((k for k in (getattr(cfg, "sub_configs", {}) or {}) if getattr(cfg, k, None) is text), None)
    model.set_attn_implementation(impl if text is cfg or key is None else {key: impl})
    if text._attn_implementation != impl:
        raise UnsupportedModelError(f"transformers did not set attn_implementation={impl!r} on {type(model).__name__}")


def _kernels(kernels: KernelConfig | None, backend: str | None) -> KernelConfig:
    """The plans' kernel config: ``kernels``, or the one a ``backend`` name (the SWA prefill kernel,
    the CLI's ``--backend``) asks for; the defaults when neither is given."""
    if kernels is not None and backend not in (None, "auto"):
        raise ValueError("give kernels=KernelConfig(...) or backend=..., not both")
    return kernels if kernels is not None else KernelConfig.from_backend(backend or "auto")


def attach_gates(model, window: int, sinks: int = 0, backend: str | None = None, reopen_native: bool = False,
                 menu: tuple | None = None, kernels: KernelConfig | None = None) -> GateMix:
    """Put every searched layer in gate mode; the returned GateMix's ``z`` ([layers, kv_heads]) drives
    the mix (None: full attention). With a span ``menu`` z is [layers, kv_heads, options] weights.
    Native sliding layers keep their own window (a fixed plan) unless ``reopen_native``. ``kernels``
    (or its shorthand ``backend``, the SWA prefill kernel's name) is every plan's kernel choice."""
    kernels = _kernels(kernels, backend)
    mix = GateMix()
    shape = model_shape(model)
    native = searchable_native(model, reopen_native)
    for row, mod in enumerate(attention_modules(model)):
        w = native[row]
        if w is None:
            mod.consa_plan = LayerPlan(row, shape.num_kv_heads, window, sinks, "gate", gate_mix=mix, kernels=kernels,
                                       menu=tuple(menu) if menu is not None else None)
        else:
            mod.consa_plan = LayerPlan(row, shape.num_kv_heads, w, 0, "fixed", kernels=kernels)
    _set_impl(model, NAME)
    return mix


@contextmanager
def native_plans(model, native: list[int | None]):
    """Within the block, layers with a native window attend as the model was trained (the teacher
    of a search that reopens them); their gate plans come back afterwards."""
    saved = []
    shape = model_shape(model)
    for row, mod in enumerate(attention_modules(model)):
        w = native[row]
        if w is not None:
            saved.append((mod, getattr(mod, "consa_plan", None)))
            mod.consa_plan = LayerPlan(row, shape.num_kv_heads, w, 0, "fixed")
    try:
        yield
    finally:
        for mod, plan in saved:
            mod.consa_plan = plan


def apply_allocation(model, allocation: Allocation, backend: str | None = None, *, kernels: KernelConfig | None = None) -> None:
    """Fix the FA/SWA split of every layer (eval/serving). ``kernels`` (or its shorthand ``backend``,
    the SWA prefill kernel's name) is every plan's kernel choice, set here once."""
    kernels = _kernels(kernels, backend)
    allocation.check_matches(model_shape(model))
    mods = attention_modules(model)
    have = native_windows(model)
    for i, w in enumerate(allocation.native):
        if w is not None and have[i] != w:
            raise AllocationError(f"allocation keeps layer {i} at the model's native window {w}, but the model's "
                                  f"layer {i} has {'no sliding window' if have[i] is None else f'window {have[i]}'}")
    for row, mod in enumerate(mods):
        mod.consa_plan = LayerPlan.from_allocation(allocation, row, kernels=kernels)
    _set_impl(model, NAME)


def plans_of(model) -> list[LayerPlan]:
    """The fixed LayerPlans consa put on a model's attention modules, in layer order (what the caches
    are built from: ``HybridCache(plans_of(model))``)."""
    plans = []
    for mod in attention_modules(model):
        plan = getattr(mod, "consa_plan", None)
        if plan is None or plan.mode != "fixed":
            raise ValueError(
                "a hybrid cache needs a model with a fixed consa allocation on every layer "
                "(call consa.apply_allocation(model, allocation) first)"
            )
        plans.append(plan)
    return plans


def hybrid_cache(model, **kwargs):
    """consa's hybrid KV cache for ``model`` (an allocation applied): a HybridLayer per attention layer;
    a decoder's other layers (linear attention, convolutions) keep transformers' own cache layers."""
    from transformers import DynamicCache

    from .attention.cache import HybridCache

    plans, rows = plans_of(model), attention_layers(model)
    cfg = text_config(model)
    own_cache = getattr(model, "_supports_default_dynamic_cache", None)
    if callable(own_cache) and not own_cache():  # transformers' own test: MiniMax insists on its MiniMaxCache
        raise UnsupportedModelError(f"{type(model).__name__} accepts no cache but its own, so consa's hybrid cache "
                                    "cannot stand in (decode over the model's own cache: every key held)")
    if rows == list(range(cfg.num_hidden_layers)):
        return HybridCache(plans, **kwargs)
    own = DynamicCache(config=cfg).layers
    return HybridCache(plans, others={i: layer for i, layer in enumerate(own) if i not in rows}, **kwargs)


def detach(model, impl: str | None = None) -> None:
    """Back to plain full attention with a stock implementation (default :func:`stock_attention`)."""
    mods = attention_modules(model)
    for mod in mods:
        if hasattr(mod, "consa_plan"):
            del mod.consa_plan
    _set_impl(model, impl or stock_attention(model, mods))


def stock_attention(model, mods: list | None = None) -> str:
    """SDPA, or eager where SDPA does not compute the model's attention: a family without an SDPA path,
    or layers with a logit soft cap or learned sink logits (transformers' SDPA takes neither; some
    versions drop a soft cap silently)."""
    mods = attention_modules(model) if mods is None else mods
    if not getattr(model, "_supports_sdpa", True) or getattr(text_config(model), "attn_logit_softcapping", None):
        return "eager"
    return "eager" if any(isinstance(getattr(m, "sinks", None), torch.Tensor) for m in mods) else "sdpa"


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
    for i, mod in enumerate(attention_modules(model)):
        order = allocation.fa_heads(i) + allocation.swa_heads(i)
        orders.append(order)
        if order == list(range(shape.num_kv_heads)):
            continue
        d = head_dim(mod)
        kv_rows = _rows(order, d)
        q_rows = _rows([h * group + j for h in order for j in range(group)], d)
        if _projections(mod) == "fused":  # one weight: [q rows | k rows | v rows]
            q_size, kv_size = shape.num_q_heads * d, shape.num_kv_heads * d
            _permute_out(mod.qkv_proj, torch.cat([q_rows, q_size + kv_rows, q_size + kv_size + kv_rows]))
        else:
            q_out = mod.q_proj.weight.shape[0]
            # a gated query projection (Qwen3-Next/3.5) emits [query | gate] per head: 2·d rows a head
            _permute_out(mod.q_proj, q_rows if q_out == q_rows.numel() else _rows(
                [h * group + j for h in order for j in range(group)], q_out // shape.num_q_heads))
            _permute_out(mod.k_proj, kv_rows)
            if mod.v_proj is not None:  # None: values are the keys (Gemma 4's full layers)
                _permute_out(mod.v_proj, kv_rows)
        o = out_proj(mod)
        o.weight.copy_(o.weight[:, q_rows.to(o.weight.device)])
        q_heads = torch.tensor([h * group + j for h in order for j in range(group)])
        _permute_per_head(mod, {shape.num_q_heads * d: q_rows, shape.num_kv_heads * d: kv_rows,
                                shape.num_q_heads: q_heads, shape.num_kv_heads: torch.tensor(order)})
    prior = allocation.meta.get("head_order")
    total = [[p[o] for o in order] for p, order in zip(prior, orders)] if prior is not None else orders
    return allocation.permuted(orders, dict(allocation.meta, head_order=total))


def _permute_per_head(mod, by_size: dict) -> None:
    """Every other per-head weight of an attention module moves with its head: a projection emitting
    one value (or one head_dim vector) per query or KV head (Laguna's gate g_proj), per-head norms,
    per-head parameters (gpt-oss's sink logits). Sized by what they hold; weights shared by all heads
    (a norm over head_dim) stay."""
    own = {id(getattr(mod, a, None)) for a in ("q_proj", "k_proj", "v_proj", "qkv_proj") + OUT_PROJ}
    for child in mod.children():
        if id(child) in own:
            continue
        if isinstance(child, nn.Linear):
            if child.out_features in by_size:
                _permute_out(child, by_size[child.out_features])
            continue
        for p in child.parameters(recurse=False):
            if p.dim() == 1 and p.numel() in by_size:
                p.copy_(p[by_size[p.numel()].to(p.device)])
    for p in mod.parameters(recurse=False):
        if p.dim() == 1 and p.numel() in by_size:
            p.copy_(p[by_size[p.numel()].to(p.device)])


def _rows(heads: list[int], head_dim: int) -> torch.Tensor:
    return torch.tensor([h * head_dim + d for h in heads for d in range(head_dim)])


def _permute_out(linear: nn.Linear, rows: torch.Tensor) -> None:
    rows = rows.to(linear.weight.device)
    linear.weight.copy_(linear.weight[rows])
    if linear.bias is not None:
        linear.bias.copy_(linear.bias[rows])


# ---- loading --------------------------------------------------------------------------------------
def model_class(cfg: dict):
    """The class a checkpoint names first in ``architectures`` when transformers (or, for a
    ``consa_<family>`` export, the shipped code) has it and it generates; else AutoModelForCausalLM.
    A vision-language checkpoint so loads whole, not as its text decoder alone."""
    import transformers
    from transformers import AutoModelForCausalLM

    from .export_code import modeling_consa

    arch = (cfg.get("architectures") or [None])[0]
    if not isinstance(arch, str):
        return AutoModelForCausalLM
    if str(cfg.get("model_type", "")).startswith(modeling_consa.PREFIX) and arch.startswith("Consa"):
        try:
            return getattr(modeling_consa, arch)
        except (AttributeError, ValueError):
            return AutoModelForCausalLM
    cls = getattr(transformers, arch, None)
    can_generate = getattr(cls, "can_generate", None)
    return cls if isinstance(cls, type) and callable(can_generate) and can_generate() else AutoModelForCausalLM


def load_model(path: str | os.PathLike, dtype: torch.dtype | str | None = None, device: str | None = None):
    """Load a local HF model directory offline (no hub access ever), as the class its config names
    (a vision-language checkpoint whole, not its text decoder alone)."""
    p = Path(path)
    if not p.is_dir():
        raise ConsaError(f"model directory not found: {p}")
    if not (p / "config.json").is_file():
        raise ConsaError(f"{p} is not a Hugging Face model directory (no config.json)")
    from .files import read_json

    from safetensors import SafetensorError

    cls = model_class(read_json(p / "config.json", "model config", ConsaError))
    try:
        model = cls.from_pretrained(str(p), local_files_only=True, dtype=dtype)
    except SafetensorError as e:  # a truncated or overwritten weights file: its header or size is off
        raise ConsaError(f"cannot read the weights in {p}: {str(e).strip().splitlines()[0]} "
                         "(a truncated or corrupt .safetensors file)") from None
    attention_modules(model)  # fail early and clearly on unsupported families
    if device:
        model.to(device)
    return model


register_export_classes()
