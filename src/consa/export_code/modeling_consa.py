"""Hybrid full / sliding-window attention for a consa head-wise export (shipped with the export).

A head-wise export keeps some KV heads of a layer on full attention (FA) and the others on a sliding
window (SWA); stock transformers cannot say that in a config. So the export names a model type of its
own (``consa_<family>``, e.g. ``consa_qwen3``) whose classes live in this file (``auto_map``):

* ``from_pretrained(DIR, trust_remote_code=True)`` loads them: the family's own model, with the
  attention implementation ``consa`` registered through transformers' ``AttentionInterface``;
* without ``trust_remote_code`` transformers refuses the unknown model type instead of silently
  running full attention on every head.

The classes are made on first use from whatever family the export holds (``ConsaQwen3ForCausalLM``
subclasses ``Qwen3ForCausalLM``; module ``__getattr__``), so one file serves every family, vision-
language checkpoints included (only their text decoder attends with ``consa``). A decoder that mixes
attention with linear-attention or convolution layers has allocation rows for its attention layers
only, named in the record's ``layers``; its other layers keep transformers' own cache layers.

When the ``consa`` package is importable, its kernels and per-head hybrid KV cache serve the model
(``consa.generate``); otherwise :func:`reference_attention` below does, in plain PyTorch, over
transformers' default cache (correct, but without consa's memory savings or speed). The allocation is
read from the config key ``consa`` (written by ``consa export``). Pure PyTorch + transformers; this file
must not import consa outside the ``try`` below.
"""

from __future__ import annotations

import importlib
import re
import warnings
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import transformers
from transformers import AttentionInterface, DynamicCache
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.masking_utils import AttentionMaskInterface, causal_mask_function, sdpa_mask
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

NAME = "consa"
PREFIX = "consa_"
# registered with the Auto classes when consa is imported; every other family loads through its
# auto_map (trust_remote_code) or consa.load, which registers it on demand
FAMILIES = ("qwen3", "qwen2", "llama", "mistral", "ministral", "gemma3_text")

try:  # consa's own kernels and cache when it is installed (importing them registers them under NAME)
    import consa.attention.hybrid  # noqa: F401

    HAVE_CONSA = True
except ImportError:
    HAVE_CONSA = False


def layer_plan(module) -> tuple[torch.Tensor, int, int, tuple]:
    """(FA flag per KV head, largest window, sinks, per-KV-head window or None for FA) of this attention
    module, from ``config.consa``; cached. KV heads may differ in window (per-unit spans)."""
    plan = getattr(module, "_consa_reference_plan", None)
    if plan is not None:
        return plan
    record = getattr(module.config, "consa", None)
    if not isinstance(record, dict) or "allocation" not in record:
        raise ValueError("this model has no consa allocation in its config (key 'consa')")
    alloc, i = record["allocation"], allocation_row(record, module.layer_idx)
    fa = [bool(b) for b in alloc["fa"][i]]
    spans = alloc.get("span") or [[None if b else alloc["window"] for b in row] for row in alloc["fa"]]
    fixed = alloc.get("fixed") or [[0] * len(row) for row in alloc["fa"]]
    swa = [h for h, b in enumerate(fa) if not b]
    wins = tuple(None if b else int(spans[i][h]) for h, b in enumerate(fa))
    window = max(w for w in wins if w is not None) if swa else alloc["window"]
    sinks = 0 if swa and fixed[i][swa[0]] else int(alloc.get("sinks", 0))  # native sliding layers: no sinks
    plan = (torch.tensor(fa), int(window), sinks, wins)
    if not isinstance(module, SimpleNamespace):
        module._consa_reference_plan = plan
    return plan


def allocation_row(record: dict, layer_idx: int) -> int:
    """The allocation row of decoder layer ``layer_idx``: rows cover the attention layers only, listed
    in ``record["layers"]`` when the decoder also has other layers (linear attention, convolutions)."""
    layers = record.get("layers")
    return layer_idx if layers is None else layers.index(layer_idx)


def span_groups(wins: tuple) -> list[tuple[int, list[int]]]:
    """(window, SWA KV heads) per distinct window, ascending."""
    return [(w, [h for h, x in enumerate(wins) if x == w]) for w in sorted({w for w in wins if w is not None})]


@dataclass
class HeldKV:
    """Keys (or values) of one layer of a :class:`ReferenceHybridCache`: the FA heads' at every slot,
    each span group's (``span_groups`` order) at its own slots only (sinks and its window's tail),
    ``total`` slots so far."""

    fa: torch.Tensor  # [B, n_fa, total, D]
    swa: list  # per span group: [B, n_g, m_g, D]
    swa_slots: list  # per span group: [m_g] int64
    total: int


def _attend(q, k, v, k_pos, q_pos, mask, window, sinks, scale, softcap=None, sink_logits=None):
    """Dense attention of q over k, v held at slots ``k_pos``; ``window`` None = causal. ``softcap``:
    scores become cap·tanh(score / cap) (Gemma2); ``sink_logits``: one more softmax logit per query
    head, with no value (gpt-oss)."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1).float(), v.repeat_interleave(group, dim=1).float()
    scores = torch.matmul(q.float(), k.transpose(-1, -2)) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    if mask is None:
        allowed = (k_pos[None, :] <= q_pos[:, None])[None, None]
    else:  # transformers' boolean mask (or an additive one: 0 where allowed), columns = slots
        allowed = mask.index_select(-1, k_pos)
        allowed = allowed if allowed.dtype == torch.bool else allowed == 0
    if window is not None:
        allowed = allowed & (((q_pos[:, None] - k_pos[None, :]) < window) | (k_pos[None, :] < sinks))
    scores = scores.masked_fill(~allowed, float("-inf"))
    if sink_logits is not None:  # the sink's column joins the softmax, then goes (it has no value)
        sink = sink_logits.float().view(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
        probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    else:
        probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs.nan_to_num(0.0), v)  # a row with nothing allowed (padding) gives zeros


def reference_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                        sliding_window=None, softcap=None, **kwargs):
    """Per-head hybrid attention, dense: FA heads see every earlier slot, SWA heads the last ``window``
    slots of their own (self included) plus the first ``sinks`` slots. Slots are cache positions, as in
    transformers' own sliding window; ``attention_mask`` is transformers' boolean (or additive) mask, or
    None when plain causal. GQA: a KV head's window holds for its whole query group. ``key``/``value``
    are tensors holding every slot, or :class:`HeldKV` from the reference cache. ``softcap`` (Gemma2)
    and ``s_aux`` (gpt-oss: a learned sink logit per query head) are computed as the family's own
    eager attention does."""
    sink_logits = kwargs.get("s_aux")
    if dropout and module.training:
        raise NotImplementedError("the shipped consa attention is for inference (no attention dropout)")
    fa_kv, _, sinks, wins = layer_plan(module)
    b, h, tq, d = query.shape
    scale = d**-0.5 if scaling is None else scaling
    group, dev = h // fa_kv.numel(), query.device
    spec = [(fa_kv.nonzero().flatten().to(dev), None)]
    spec += [(torch.tensor(heads, device=dev), w) for w, heads in span_groups(wins)]
    q_heads = lambda idx: (idx[:, None] * group + torch.arange(group, device=dev)).flatten()  # noqa: E731
    if not isinstance(key, torch.Tensor):  # HeldKV, maybe of another load of this file (each export loads its own)
        total, mask = key.total, attention_mask
        groups = [(spec[0][0], key.fa, value.fa, torch.arange(total, device=dev), None)]
        groups += [(idx, kg, vg, slots.to(dev), w) for (idx, w), kg, vg, slots in zip(spec[1:], key.swa, value.swa, key.swa_slots)]
    else:  # every slot held (or a transformers sliding layer's contiguous tail): local slots
        total = key.shape[-2]
        mask = None if attention_mask is None else attention_mask[..., -total:]
        k_pos = torch.arange(total, device=dev)
        groups = [(idx, key.index_select(1, idx), value.index_select(1, idx), k_pos, w) for idx, w in spec]
    q_pos = torch.arange(total - tq, total, device=dev)
    out = query.new_empty(b, h, tq, d, dtype=torch.float32)
    for idx, k, v, k_pos, w in groups:
        if idx.numel():
            qi = q_heads(idx)
            out[:, qi] = _attend(query.index_select(1, qi), k, v, k_pos, q_pos, mask, w, sinks, scale, softcap,
                                 None if sink_logits is None else sink_logits.index_select(0, qi))
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


class ReferenceHybridLayer(CacheLayerMixin):
    """One layer of :class:`ReferenceHybridCache`: FA heads keep every slot, each span group of SWA heads
    the first ``sinks`` slots and the last ``window − 1`` of its own window (all a later query can see).
    ``keys``/``values``: [FA heads, then one tensor per span group]. The mask spans all slots."""

    is_sliding = False
    is_compileable = False

    def __init__(self, fa_kv: torch.Tensor, window: int, sinks: int, wins: tuple | None = None):
        super().__init__()
        if wins is None:
            wins = tuple(None if b else window for b in fa_kv.tolist())
        self.fa_idx = fa_kv.nonzero().flatten()
        self.groups = [(w, torch.tensor(heads)) for w, heads in span_groups(wins)]
        self.window, self.sinks, self.total = window, sinks, 0

    @property
    def slots(self) -> torch.Tensor:
        """The slots the first (or only) span group holds."""
        return self.group_slots[0] if self.groups else torch.zeros(0, dtype=torch.long)

    def lazy_initialization(self, key_states, value_states) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.fa_idx = self.fa_idx.to(self.device)
        self.groups = [(w, idx.to(self.device)) for w, idx in self.groups]
        idxs = [self.fa_idx] + [idx for _, idx in self.groups]
        pick = lambda x, idx: x.index_select(1, idx)[..., :0, :]  # noqa: E731
        self.keys = [pick(key_states, idx) for idx in idxs]
        self.values = [pick(value_states, idx) for idx in idxs]
        self.group_slots = [torch.zeros(0, dtype=torch.long, device=self.device) for _ in self.groups]
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        new = torch.arange(self.total, self.total + key_states.shape[-2], device=self.device)
        self.total += key_states.shape[-2]
        slots = [torch.cat([held, new]) for held in self.group_slots]
        keeps = [(sl < self.sinks) | (sl > self.total - w) for sl, (w, _) in zip(slots, self.groups)]
        out = []
        for held, x in ((self.keys, key_states), (self.values, value_states)):
            held[0] = torch.cat([held[0], x.index_select(1, self.fa_idx)], dim=-2)
            swa = []
            for g, ((_, idx), keep) in enumerate(zip(self.groups, keeps)):
                full = torch.cat([held[g + 1], x.index_select(1, idx)], dim=-2)
                held[g + 1] = full[..., keep, :]
                swa.append(full)
            out.append(HeldKV(held[0], swa, slots, self.total))
        self.group_slots = [sl[keep] for sl, keep in zip(slots, keeps)]
        return out[0], out[1]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.total + query_length, 0

    def get_seq_length(self) -> int:
        return self.total

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.total, self.is_initialized = 0, False

    def stored_elements(self) -> int:
        return sum(t.numel() for t in self.keys + self.values) if self.is_initialized else 0


class ReferenceHybridCache(Cache):
    """The per-head hybrid KV cache without consa: SWA heads keep only their window (and sinks). Other
    layers (linear attention, convolutions) get what transformers' own cache gives them."""

    def __init__(self, config):
        record = config.consa
        rows = record.get("layers") or list(range(len(record["allocation"]["fa"])))
        layers = list(DynamicCache(config=config).layers) if record.get("layers") is not None else [None] * len(rows)
        for i in rows:
            layers[i] = ReferenceHybridLayer(*layer_plan(SimpleNamespace(config=config, layer_idx=i)))
        super().__init__(layers=layers)


def reference_mask(*args, mask_function=None, local_size=None, **kwargs):
    """transformers' SDPA mask, except that the sliding mask a model asks for comes back causal: the
    windows (per layer and head) are the allocation's to apply, and a layer consa reopened to full
    attention must see every earlier slot on its FA heads."""
    if local_size is not None:
        mask_function = causal_mask_function
    return sdpa_mask(*args, mask_function=mask_function or causal_mask_function, **kwargs)


if not HAVE_CONSA:
    AttentionInterface.register(NAME, reference_attention)
    AttentionMaskInterface.register(NAME, reference_mask)


CACHE_KEYS = ("cache", "past_key_values")  # generate's name for it: transformers 5.24 / 5.17


def hybrid_cache(config):
    """The cache ``generate`` gets when the caller brings none: a per-head hybrid cache whose SWA heads
    keep only their window, consa's (fast kernels) when it is installed, else the reference one. Not
    ``DynamicCache(config)``: that trims only the layers the config calls sliding, whole, even where
    consa reopened one with FA heads."""
    if HAVE_CONSA:  # import_module: an import statement here would make transformers require consa
        alloc = importlib.import_module("consa.allocation").Allocation.from_dict(config.consa["allocation"])
        rows = config.consa.get("layers")
        others = None if rows is None else {i: layer for i, layer in enumerate(DynamicCache(config=config).layers) if i not in rows}
        return importlib.import_module("consa.attention.cache").HybridCache.from_allocation(alloc, others=others)
    return ReferenceHybridCache(config)


def _prepare_cache(base):
    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        brought = any(model_kwargs.get(k) is not None for k in CACHE_KEYS)
        out = base._prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs)
        for k in CACHE_KEYS:
            if not brought and type(model_kwargs.get(k)) is DynamicCache:
                model_kwargs[k] = hybrid_cache(self.config.get_text_config(decoder=True))
        return out

    return _prepare_cache_for_generation


def _model_init(base):
    def __init__(self, config, *args, **kwargs):
        """The family's model, its text decoder always on the hybrid attention (another implementation
        would run full attention on the SWA heads, so it is refused with a warning); a vision or audio
        tower keeps its own."""
        text = config.get_text_config(decoder=True)
        requested = getattr(text, "_attn_implementation_internal", None)
        if requested not in (None, NAME):
            warnings.warn(f"this consa export mixes full and sliding-window heads; it attends with {NAME!r}, "
                          f"not {requested!r}", stacklevel=3)
        text._attn_implementation_internal = NAME
        if not hasattr(text, "consa") and hasattr(config, "consa"):
            text.consa = config.consa
        base.__init__(self, config, *args, **kwargs)

    return __init__


def _base(name: str):
    """The transformers class ``name`` (a config or model class of any family), or None."""
    cls = getattr(transformers, name, None)
    return cls if isinstance(cls, type) else None


def _config_class(base_config):
    name = f"Consa{base_config.__name__}"
    if name not in globals():
        globals()[name] = type(name, (base_config,), {"model_type": PREFIX + base_config.model_type, "__module__": __name__})
    return globals()[name]


def _model_name(base_model, base_config) -> str:
    """``ConsaQwen3ForCausalLM``; ``ConsaExaoneConfig__LlamaForCausalLM`` when the family's config is
    not the model class's own (families that reuse another family's modeling code)."""
    own = base_model.config_class is base_config
    return f"Consa{base_model.__name__}" if own else f"Consa{base_config.__name__}__{base_model.__name__}"


def _model_class(base_model, base_config):
    name = _model_name(base_model, base_config)
    if name not in globals():
        globals()[name] = type(name, (base_model,), {
            "config_class": _config_class(base_config), "__init__": _model_init(base_model),
            "__module__": __name__, "_prepare_cache_for_generation": _prepare_cache(base_model)})
        _share_weight_conversions(base_model, base_config, name)
    return globals()[name]


def _share_weight_conversions(base_model, base_config, name: str) -> None:
    """transformers converts some checkpoints' weights on load (fused MoE experts, renamed modules),
    found by class name, then model type; the twin has neither, so it is registered under the base
    family's conversions (else a reloaded model would silently keep freshly initialised weights)."""
    try:
        from transformers import conversion_mapping as cm
    except ImportError:  # a transformers without weight conversions
        return
    found = cm.get_checkpoint_conversion_mapping(base_model.__name__)
    if found is None:
        found = cm.get_checkpoint_conversion_mapping(base_config.model_type)
    if found is not None:
        cm.register_checkpoint_conversion_mapping(name, found, overwrite=True)


def stock_class_name(name: str) -> str:
    """``ConsaQwen3ForCausalLM`` → ``Qwen3ForCausalLM`` (an export re-exported); other names as given."""
    rest = name[len("Consa"):] if name.startswith("Consa") else None
    if rest is not None and "__" in rest:
        rest = rest.split("__", 1)[1]
    return rest if rest is not None and _base(rest) is not None else name


def classes(model_class_name: str, config_class_name: str | None = None):
    """(config class, model class) of the ``consa_<family>`` twin of the transformers model class
    ``model_class_name`` (e.g. ``Qwen3ForCausalLM``, ``Gemma3ForConditionalGeneration``) with the
    config class ``config_class_name`` (default: the model class's own): the family's own classes,
    subclassed once per process. Any family: nothing here lists them."""
    base_model = _base(model_class_name)
    if base_model is None or not hasattr(base_model, "config_class"):
        raise ValueError(f"transformers {transformers.__version__} has no model class {model_class_name!r}")
    base_config = _base(config_class_name) if config_class_name else base_model.config_class
    if base_config is None or not hasattr(base_config, "model_type"):
        raise ValueError(f"transformers {transformers.__version__} has no config class {config_class_name!r}")
    return _config_class(base_config), _model_class(base_model, base_config)


def __getattr__(name: str):
    """``ConsaQwen3Config``, ``ConsaGemma3ForConditionalGeneration``, ...: made on first use (what
    ``auto_map`` names), so that this one file serves every family."""
    rest = name[len("Consa"):] if name.startswith("Consa") else ""
    config_name, _, model_name = rest.rpartition("__")
    base = _base(model_name) if model_name else None
    if base is not None and hasattr(base, "config_class"):
        return classes(model_name, config_name or None)[1]
    if base is not None and hasattr(base, "model_type"):
        return _config_class(base)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def auto_map(model_class_name: str, config_class_name: str | None = None) -> dict:
    """The ``auto_map`` of an export whose model class is ``model_class_name`` (this file shipped as
    ``modeling_consa.py``): AutoConfig, AutoModelForCausalLM, and every other Auto class that maps
    the family to that class (e.g. AutoModelForImageTextToText for a vision-language checkpoint)."""
    from transformers.models.auto import modeling_auto

    config_cls, model_cls = classes(model_class_name, config_class_name)
    family = config_cls.model_type[len(PREFIX):]
    out = {"AutoConfig": f"modeling_consa.{config_cls.__name__}", "AutoModelForCausalLM": f"modeling_consa.{model_cls.__name__}"}
    for auto_name in dir(modeling_auto):
        if auto_name.startswith("AutoModelFor") and auto_name != "AutoModelForCausalLM":
            words = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", auto_name[len("AutoModelFor"):]).upper()
            mapping = getattr(modeling_auto, f"MODEL_FOR_{words}_MAPPING_NAMES", None)
            if isinstance(mapping, dict) and mapping.get(family) == model_class_name:
                out[auto_name] = f"modeling_consa.{model_cls.__name__}"
    return out


CLASSES = {family: classes(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[family]) for family in FAMILIES}
