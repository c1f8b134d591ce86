"""The hybrid KV cache: FA heads keep every slot, SWA heads only what a future query can still see.

A :class:`HybridCache` is a plain transformers :class:`~transformers.Cache` whose layers are
:class:`HybridLayer` objects (one per decoder layer, built from the layer's
:class:`~consa.attention.plan.LayerPlan`). ``update`` returns :class:`~consa.attention.plan.SplitKV`
objects for keys and values; the registered ``consa`` attention function runs FA heads over ``.fa``
and SWA heads over ``.swa`` at the slots ``.swa_slots`` names. The cache knows plans and tensors only,
no model: ``HybridCache(plans_of(model))`` (``consa.models.plans_of``) builds it for a model.

What a layer holds after it has seen T slots (elements, keys and values together)::

    2 · B · d · (n_FA · T + n_SWA · min(T, W − 1 + S))

where W is the window and S the number of sink slots: the SWA heads keep the first S slots and the
last W − 1 slots once T > W − 1 + S (a query at slot T sees T−W+1 … T plus the sinks, and the key at
T arrives with the query). The mask transformers builds spans *all* slots (``get_mask_sizes`` reports
the full length, offset 0), and the attention kernels pick the columns of the keys actually held.

A layer whose SWA heads differ in span (per-unit spans) is a :class:`SpanGroupsLayer`: one inner layer
per span group, each trimming to its own W − 1 + S, so the formula becomes a sum over groups.

Use it with ``model.generate(..., past_key_values=HybridCache(plans_of(model)))`` or ``consa.generate``.
Assisted and prompt-lookup decoding work too: with past recording on (transformers turns it on), the
SWA heads keep their keys untrimmed until ``crop`` rolls rejected drafts back and trims them again.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .plan import GroupedKV, KeySlots, LayerPlan, SplitKV, kv_selector, take


class _SpansEverySlot:
    """The mask transformers builds spans every slot seen (offset 0): the FA heads need them all, and
    the kernels pick the columns of the keys a sliding head still holds."""

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.cumulative_length + query_length, 0

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_max_length(self) -> int:
        return -1


class HybridLayer(_SpansEverySlot, CacheLayerMixin):
    """One decoder layer's cache, split by head group (see the module docstring)."""

    is_sliding = False  # the mask must span every slot: FA heads need them all
    is_croppable = True  # with past recording on, crop rolls back whatever came since the last trim
    is_compileable = False

    def __init__(self, num_kv_heads: int, fa_kv: list[int], window: int, sinks: int = 0):
        super().__init__()
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.num_kv_heads = num_kv_heads
        self.fa_kv = list(fa_kv)
        self.swa_kv = [h for h in range(num_kv_heads) if h not in set(self.fa_kv)]
        self.window = window
        self.sinks = sinks
        self._fa_sel = kv_selector(self.fa_kv)
        self._swa_sel = kv_selector(self.swa_kv)
        self.cumulative_length = 0
        self.swa_slots = KeySlots()
        self.fa_keys = self.fa_values = self.swa_keys = self.swa_values = None
        self.record_past = False

    @classmethod
    def from_plan(cls, plan: LayerPlan) -> "CacheLayerMixin":
        if plan.mode != "fixed":
            raise ValueError(f"layer {plan.layer}: a hybrid cache needs a fixed allocation (plan mode is {plan.mode!r})")
        if plan.multi_span:
            return SpanGroupsLayer(plan)
        return cls(plan.num_kv_heads, plan.fa_kv, plan.window, plan.sinks)

    @property
    def keep(self) -> int:
        """Most slots an SWA head ever holds between steps."""
        return self.window - 1 + self.sinks

    # ---- CacheLayerMixin ------------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.dtype = key_states.dtype
        b, _, _, d = key_states.shape
        empty = lambda n: key_states.new_empty((b, n, 0, d))  # noqa: E731
        self.fa_keys, self.fa_values = empty(len(self.fa_kv)), empty(len(self.fa_kv))
        self.swa_keys, self.swa_values = empty(len(self.swa_kv)), empty(len(self.swa_kv))
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if key_states.shape[1] != self.num_kv_heads:
            raise ValueError(f"hybrid cache layer expects {self.num_kv_heads} KV heads, got {key_states.shape[1]}")
        new = key_states.shape[-2]
        self.cumulative_length += new
        if self.fa_kv:
            self.fa_keys = torch.cat([self.fa_keys, take(key_states, self._fa_sel)], dim=-2)
            self.fa_values = torch.cat([self.fa_values, take(value_states, self._fa_sel)], dim=-2)
        if not self.swa_kv:  # a pure FA layer behaves like a DynamicLayer
            return self.fa_keys, self.fa_values
        k_all = torch.cat([self.swa_keys, take(key_states, self._swa_sel)], dim=-2)
        v_all = torch.cat([self.swa_values, take(value_states, self._swa_sel)], dim=-2)
        slots = self.swa_slots  # the slots of k_all: [0, S) ∪ [offset, total) or all of [0, total)
        if self.record_past:  # keep everything until the next crop, which may roll these tokens back
            self.swa_keys, self.swa_values = k_all, v_all
        else:
            self.swa_keys, self.swa_values, self.swa_slots = self._trim(k_all), self._trim(v_all), self._next_slots()
        return (
            SplitKV(self.fa_keys, k_all, slots),
            SplitKV(self.fa_values, v_all, slots),
        )

    def _next_slots(self) -> KeySlots:
        total = self.cumulative_length
        if total <= self.keep:
            return KeySlots()
        return KeySlots(num_sinks=self.sinks, offset=total - (self.window - 1))

    def _trim(self, x: torch.Tensor) -> torch.Tensor:
        total = self.cumulative_length
        if total <= self.keep:
            return x
        tail = x[..., x.shape[-2] - (self.window - 1) :, :]
        if self.sinks:
            return torch.cat([x[..., : self.sinks, :], tail], dim=-2)
        return tail.clone()  # a copy, so the larger concatenation is freed

    # ---- rollback (assisted / prompt-lookup decoding) -------------------------------------------
    def activate_past_recording(self, **kwargs) -> None:
        """Hold the SWA heads' keys untrimmed after each update until :meth:`crop` (transformers calls
        this before assisted decoding), so that draft tokens can be rolled back."""
        self.record_past = True

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last ``-tokens_to_remove`` slots (transformers' convention: 0 or negative; a positive
        value is the legacy absolute length to keep), then trim the SWA heads back to what a future query
        sees. Slots the SWA heads no longer hold cannot come back: that is one clear error.

        transformers may pass a 0-dim tensor (assisted decoding's match count, on the model's device);
        it becomes an int here, or every later slot offset would be a tensor (a pointer to Triton)."""
        tokens_to_remove = int(tokens_to_remove)
        total = self.cumulative_length
        drop = -tokens_to_remove if tokens_to_remove <= 0 else max(0, total - tokens_to_remove)
        if drop > total:
            raise ValueError(f"cannot crop {drop} slots from a cache layer holding {total}")
        new_total = total - drop
        if self.swa_kv and self.is_initialized and not self.swa_slots.is_identity():
            first_needed = new_total - (self.window - 1)
            if first_needed < self.swa_slots.offset:
                raise RuntimeError(
                    f"cannot crop {drop} slots: the sliding-window heads no longer hold slot {first_needed} "
                    "(call activate_past_recording before the tokens to roll back are added)"
                )
        self.cumulative_length = new_total
        if not self.is_initialized:
            return
        self.fa_keys, self.fa_values = self.fa_keys[..., :new_total, :], self.fa_values[..., :new_total, :]
        if self.swa_kv:
            slots = self.swa_slots
            self.swa_keys = self._trim(self._upto(self.swa_keys, slots, new_total))
            self.swa_values = self._trim(self._upto(self.swa_values, slots, new_total))
            self.swa_slots = self._next_slots()

    @staticmethod
    def _upto(x: torch.Tensor, slots: KeySlots, total: int) -> torch.Tensor:
        """The keys of ``x`` (held at ``slots``) for slots below ``total``."""
        if slots.is_identity() or total <= slots.num_sinks:
            return x[..., :total, :]
        return x[..., : slots.num_sinks + (total - slots.offset), :]

    def reset(self) -> None:
        self.fa_keys = self.fa_values = self.swa_keys = self.swa_values = None
        self.swa_slots = KeySlots()
        self.cumulative_length = 0
        self.is_initialized = False
        self.record_past = False

    def _tensors(self):
        return ("fa_keys", "fa_values", "swa_keys", "swa_values")

    def _map(self, fn) -> None:
        if self.is_initialized:
            for name in self._tensors():
                setattr(self, name, fn(getattr(self, name)))

    def offload(self):
        self._map(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self):
        if self.is_initialized and self.fa_keys.device != self.device:
            self._map(lambda t: t.to(self.device, non_blocking=True))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map(lambda t: t[indices, ...])

    # ---- accounting -----------------------------------------------------------------------------
    def stored_elements(self) -> int:
        """Elements held by this layer (keys and values)."""
        if not self.is_initialized:
            return 0
        return sum(getattr(self, n).numel() for n in self._tensors())

    def stored_bytes(self) -> int:
        if not self.is_initialized:
            return 0
        return sum(getattr(self, n).numel() * getattr(self, n).element_size() for n in self._tensors())

    def expected_elements(self, batch: int, head_dim: int) -> int:
        """The theory: 2·B·d·(n_FA·T + n_SWA·min(T, W−1+S))."""
        t = self.cumulative_length
        return 2 * batch * head_dim * (len(self.fa_kv) * t + len(self.swa_kv) * min(t, self.keep))


class SpanGroupsLayer(_SpansEverySlot, CacheLayerMixin):
    """One decoder layer's cache when its SWA heads differ in span: an all-FA :class:`HybridLayer` for
    the FA heads and an all-SWA one per span group (``LayerPlan.span_groups``), each holding exactly its
    own W − 1 + S slots. ``update`` returns :class:`~consa.attention.plan.GroupedKV`."""

    is_sliding = False
    is_croppable = True
    is_compileable = False

    def __init__(self, plan: LayerPlan):
        super().__init__()
        self.num_kv_heads = plan.num_kv_heads
        self.fa_kv = list(plan.fa_kv)
        self.groups = [(kv_selector(heads), HybridLayer(len(heads), [], w, plan.sinks))
                       for w, heads in plan.span_groups]
        self.fa = HybridLayer(len(self.fa_kv), list(range(len(self.fa_kv))), plan.window) if self.fa_kv else None
        self._fa_sel = kv_selector(self.fa_kv)
        self.cumulative_length = 0

    def _layers(self):
        return ([self.fa] if self.fa is not None else []) + [layer for _, layer in self.groups]

    def lazy_initialization(self, key_states, value_states) -> None:
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if key_states.shape[1] != self.num_kv_heads:
            raise ValueError(f"hybrid cache layer expects {self.num_kv_heads} KV heads, got {key_states.shape[1]}")
        self.is_initialized = True
        self.cumulative_length += key_states.shape[-2]
        if self.fa is not None:
            fa_k, fa_v = self.fa.update(take(key_states, self._fa_sel), take(value_states, self._fa_sel))
        else:
            fa_k = fa_v = key_states[:, :0]
        kg, vg = [], []
        for sel, layer in self.groups:
            k, v = layer.update(take(key_states, sel), take(value_states, sel))
            kg.append((k.swa, k.swa_slots))
            vg.append((v.swa, v.swa_slots))
        return GroupedKV(fa_k, kg), GroupedKV(fa_v, vg)

    def activate_past_recording(self, **kwargs) -> None:
        for layer in self._layers():
            layer.activate_past_recording(**kwargs)

    def crop(self, tokens_to_remove: int) -> None:
        """Every group crops as a :class:`HybridLayer` does (same rules, same errors)."""
        for layer in self._layers():
            layer.crop(tokens_to_remove)
        self.cumulative_length = self._layers()[0].cumulative_length

    def reset(self) -> None:
        for layer in self._layers():
            layer.reset()
        self.cumulative_length = 0
        self.is_initialized = False

    def offload(self):
        for layer in self._layers():
            layer.offload()

    def prefetch(self):
        for layer in self._layers():
            layer.prefetch()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        for layer in self._layers():
            layer.reorder_cache(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        for layer in self._layers():
            layer.batch_repeat_interleave(repeats)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        for layer in self._layers():
            layer.batch_select_indices(indices)

    def stored_elements(self) -> int:
        return sum(layer.stored_elements() for layer in self._layers())

    def stored_bytes(self) -> int:
        return sum(layer.stored_bytes() for layer in self._layers())

    def expected_elements(self, batch: int, head_dim: int) -> int:
        """The theory, summed over groups: 2·B·d·(n_FA·T + Σ_g n_g·min(T, W_g − 1 + S))."""
        return sum(layer.expected_elements(batch, head_dim) for layer in self._layers())


class HybridCache(Cache):
    """A transformers Cache with one :class:`HybridLayer` per decoder layer, built from the layers' fixed
    plans: ``HybridCache(plans_of(model))`` for a model with an allocation applied
    (``consa.apply_allocation``), e.g. ``model.generate(ids, past_key_values=HybridCache(plans_of(model)))``.
    """

    def __init__(self, plans: list[LayerPlan], *, offloading: bool = False, others: dict | None = None):
        """``others``: the cache layers of a decoder's layers that are not attention (linear attention,
        convolutions), by decoder layer index (``consa.models.hybrid_cache`` takes them from
        transformers' own cache); the plans fill the other positions, in order."""
        plans = list(plans) if isinstance(plans, (list, tuple)) else []
        if not plans or not all(isinstance(p, LayerPlan) for p in plans):
            raise TypeError("HybridCache takes the layers' LayerPlans (consa.models.plans_of(model) gives a model's)")
        hybrid = iter([HybridLayer.from_plan(p) for p in plans])
        others = others or {}
        layers = [others[i] if i in others else next(hybrid) for i in range(len(plans) + len(others))]
        super().__init__(layers=layers, offloading=offloading)

    @classmethod
    def from_allocation(cls, allocation, **kwargs) -> "HybridCache":
        """One layer per plan of ``allocation`` (native sliding layers at their own window)."""
        return cls([LayerPlan.from_allocation(allocation, i) for i in range(allocation.shape.num_layers)], **kwargs)

    def stored_elements(self) -> int:  # keys and values; other layers' constant state not counted
        return sum(layer.stored_elements() for layer in self.layers if hasattr(layer, "stored_elements"))

    def stored_bytes(self) -> int:
        return sum(layer.stored_bytes() for layer in self.layers if hasattr(layer, "stored_bytes"))
