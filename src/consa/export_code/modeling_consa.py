"""Hybrid full / sliding-window attention for a consa head-wise export (shipped with the export).

A head-wise export keeps some KV heads of a layer on full attention (FA) and the others on a sliding
window (SWA); stock transformers cannot say that in a config. So the export names a model type of its
own (``consa_<family>``, e.g. ``consa_qwen3``) whose classes live in this file (``auto_map``):

* ``from_pretrained(DIR, trust_remote_code=True)`` loads them: the family's own model, with the
  attention implementation ``consa`` registered through transformers' ``AttentionInterface``;
* without ``trust_remote_code`` transformers refuses the unknown model type instead of silently
  running full attention on every head.

When the ``consa`` package is importable, its kernels and per-head hybrid KV cache serve the model
(``consa.generate``); otherwise :func:`reference_attention` below does, in plain PyTorch, over
transformers' default cache (correct, but without consa's memory savings or speed). The allocation is
read from the config key ``consa`` (written by ``consa export``). Pure PyTorch + transformers; this file
must not import consa outside the ``try`` below.
"""

from __future__ import annotations

import importlib
import warnings
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import transformers
from transformers import AttentionInterface, DynamicCache
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.masking_utils import AttentionMaskInterface, causal_mask_function, sdpa_mask
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

NAME = "consa"
PREFIX = "consa_"
FAMILIES = ("qwen3", "qwen2", "llama", "mistral", "ministral", "gemma3_text")

try:  # consa's own kernels and cache when it is installed (importing it registers them under NAME)
    import consa  # noqa: F401

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
    alloc, i = record["allocation"], module.layer_idx
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


def _attend(q, k, v, k_pos, q_pos, mask, window, sinks, scale):
    """Dense attention of q over k, v held at slots ``k_pos``; ``window`` None = causal."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1).float(), v.repeat_interleave(group, dim=1).float()
    scores = torch.matmul(q.float(), k.transpose(-1, -2)) * scale
    if mask is None:
        allowed = (k_pos[None, :] <= q_pos[:, None])[None, None]
    else:  # transformers' boolean mask (or an additive one: 0 where allowed), columns = slots
        allowed = mask.index_select(-1, k_pos)
        allowed = allowed if allowed.dtype == torch.bool else allowed == 0
    if window is not None:
        allowed = allowed & (((q_pos[:, None] - k_pos[None, :]) < window) | (k_pos[None, :] < sinks))
    probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    return torch.matmul(probs.nan_to_num(0.0), v)  # a row with nothing allowed (padding) gives zeros


def reference_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                        sliding_window=None, softcap=None, **kwargs):
    """Per-head hybrid attention, dense: FA heads see every earlier slot, SWA heads the last ``window``
    slots of their own (self included) plus the first ``sinks`` slots. Slots are cache positions, as in
    transformers' own sliding window; ``attention_mask`` is transformers' boolean (or additive) mask, or
    None when plain causal. GQA: a KV head's window holds for its whole query group. ``key``/``value``
    are tensors holding every slot, or :class:`HeldKV` from the reference cache."""
    if softcap is not None or kwargs.get("s_aux") is not None:
        raise NotImplementedError("consa attention does not compute logit soft-capping or learned sinks")
    if dropout and module.training:
        raise NotImplementedError("the shipped consa attention is for inference (no attention dropout)")
    fa_kv, _, sinks, wins = layer_plan(module)
    b, h, tq, d = query.shape
    scale = d**-0.5 if scaling is None else scaling
    group, dev = h // fa_kv.numel(), query.device
    spec = [(fa_kv.nonzero().flatten().to(dev), None)]
    spec += [(torch.tensor(heads, device=dev), w) for w, heads in span_groups(wins)]
    q_heads = lambda idx: (idx[:, None] * group + torch.arange(group, device=dev)).flatten()  # noqa: E731
    if isinstance(key, HeldKV):
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
            out[:, qi] = _attend(query.index_select(1, qi), k, v, k_pos, q_pos, mask, w, sinks, scale)
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
    """The per-head hybrid KV cache without consa: SWA heads keep only their window (and sinks)."""

    def __init__(self, config):
        alloc = config.consa["allocation"]
        plans = [layer_plan(SimpleNamespace(config=config, layer_idx=i)) for i in range(len(alloc["fa"]))]
        super().__init__(layers=[ReferenceHybridLayer(*plan) for plan in plans])


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
        plan = importlib.import_module("consa.attention.hybrid").LayerPlan.from_allocation
        cache = importlib.import_module("consa.attention.cache").HybridCache
        return cache(plans=[plan(alloc, i) for i in range(alloc.shape.num_layers)])
    return ReferenceHybridCache(config)


def _prepare_cache(base):
    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        brought = any(model_kwargs.get(k) is not None for k in CACHE_KEYS)
        out = base._prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs)
        for k in CACHE_KEYS:
            if not brought and type(model_kwargs.get(k)) is DynamicCache:
                model_kwargs[k] = hybrid_cache(self.config.get_text_config())
        return out

    return _prepare_cache_for_generation


def _model_init(base):
    def __init__(self, config, *args, **kwargs):
        """The family's model, always on the hybrid attention (another implementation would run full
        attention on the SWA heads, so it is refused with a warning)."""
        requested = getattr(config, "_attn_implementation_internal", None)
        if requested not in (None, NAME):
            warnings.warn(f"this consa export mixes full and sliding-window heads; it attends with {NAME!r}, "
                          f"not {requested!r}", stacklevel=3)
        config._attn_implementation_internal = NAME
        base.__init__(self, config, *args, **kwargs)

    return __init__


def _classes(family: str):
    base_config = CONFIG_MAPPING[family]
    base_model = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[family])
    config_cls = type(f"Consa{base_config.__name__}", (base_config,), {"model_type": PREFIX + family, "__module__": __name__})
    model_cls = type(f"Consa{base_model.__name__}", (base_model,),
                     {"config_class": config_cls, "__init__": _model_init(base_model), "__module__": __name__,
                      "_prepare_cache_for_generation": _prepare_cache(base_model)})
    return config_cls, model_cls


CLASSES = {family: _classes(family) for family in FAMILIES}
globals().update({cls.__name__: cls for pair in CLASSES.values() for cls in pair})


def auto_map(family: str) -> dict:
    """The ``auto_map`` entry of an export of ``family`` (this file shipped as ``modeling_consa.py``)."""
    config_cls, model_cls = CLASSES[family]
    return {"AutoConfig": f"modeling_consa.{config_cls.__name__}", "AutoModelForCausalLM": f"modeling_consa.{model_cls.__name__}"}
