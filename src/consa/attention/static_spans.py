"""The static cache for a layer whose SWA heads differ in span (per-unit spans, issue 16).

One :class:`~consa.attention.static_cache.StaticHybridLayer` per span group of the plan
(``LayerPlan.span_groups``, narrowest first), each over its own KV heads: the first also holds the
layer's FA heads. Every group keeps a ring of exactly its own W + S slots, so the cache holds what
the allocation says, group by group. A decode step writes and attends group by group (one write and
one decode launch per group, the single-window kernels unchanged); the head selections are device
tensors made when the buffers are allocated, so the step captures into a CUDA graph like a
single-window layer. A prompt from an empty cache returns its own keys (the span-grouped prefill
runs on them); a later chunk returns :class:`HeadParts`, which ``hybrid.consa_attention`` runs part
by part.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import CacheLayerMixin

from .hybrid import LayerPlan, _take


@dataclass
class HeadParts:
    """Keys (or values) of a layer cached in head groups: per part, its single-window plan, the
    selector of its KV heads in the layer (a slice or a device index tensor) and what its inner
    static layer returned (``RingKV`` in a decode step, ``SplitKV`` for a later chunk)."""

    parts: list[tuple[LayerPlan, object, object]]


def _device_selector(heads: list[int], device):
    if heads == list(range(heads[0], heads[0] + len(heads))):
        return slice(heads[0], heads[-1] + 1)
    return torch.tensor(heads, device=device)


def query_selector(kv_sel, group: int, device):
    """The query heads of a KV-head selector (GQA group ``group``), computed on the device."""
    if isinstance(kv_sel, slice):
        return slice(kv_sel.start * group, kv_sel.stop * group)
    return (kv_sel[:, None] * group + torch.arange(group, device=device)).flatten()


class StaticSpanGroupsLayer(CacheLayerMixin):
    """Static cache of one multi-span layer (see the module docstring)."""

    is_sliding = False
    is_croppable = True
    is_compileable = True

    def __init__(self, plan: LayerPlan, max_len: int, rollback: int = 0):
        super().__init__()
        from .static_cache import StaticHybridLayer

        self.plan, self.max_len = plan, max_len
        self.groups = []  # (KV heads in the layer, sub-plan, inner layer)
        for i, (window, heads) in enumerate(plan.span_groups):
            kv = sorted((list(plan.fa_kv) if i == 0 else []) + list(heads))
            fa = [kv.index(h) for h in plan.fa_kv] if i == 0 else []
            sub = LayerPlan(plan.layer, len(kv), window, plan.sinks, "fixed", fa_kv=fa, backend=plan.backend)
            self.groups.append((kv, sub, StaticHybridLayer(len(kv), fa, window, max_len, plan.sinks, rollback)))
        self._sel = None

    # ---- state shared by the groups ---------------------------------------------------------------
    @property
    def seen(self) -> int:
        return self.groups[0][2].seen

    @seen.setter
    def seen(self, n: int) -> None:
        for _, _, layer in self.groups:
            layer.seen = n

    @property
    def length(self) -> torch.Tensor:
        return self.groups[0][2].length

    def allocate(self, batch: int, head_dim: int, dtype: torch.dtype, device) -> None:
        for _, _, layer in self.groups:
            layer.allocate(batch, head_dim, dtype, device)
        self._sel = [_device_selector(kv, device) for kv, _, _ in self.groups]
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.allocate(key_states.shape[0], key_states.shape[-1], key_states.dtype, key_states.device)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if key_states.shape[1] != self.plan.num_kv_heads:
            raise ValueError(f"static cache layer holds {self.plan.num_kv_heads} KV heads, got {key_states.shape[1]}")
        start = self.seen
        kparts, vparts = [], []
        for sel, (_, sub, layer) in zip(self._sel, self.groups):
            k, v = layer.update(_take(key_states, sel), _take(value_states, sel))
            kparts.append((sub, sel, k))
            vparts.append((sub, sel, v))
        if start == 0 and key_states.shape[-2] > 1:
            return key_states, value_states  # a prompt from empty: the span-grouped prefill runs on its own keys
        return HeadParts(kparts), HeadParts(vparts)

    # ---- lengths --------------------------------------------------------------------------------
    def set_length(self, n: int) -> None:
        for _, _, layer in self.groups:
            layer.set_length(n)

    def get_mask_sizes(self, query_length) -> tuple[int, int]:
        return self.groups[0][2].get_mask_sizes(query_length)

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return self.max_len

    def crop(self, tokens_to_remove) -> None:
        """As :meth:`StaticHybridLayer.crop`, every group alike. The narrowest ring refuses first, and it
        comes first, so a refused crop changes nothing."""
        for _, _, layer in self.groups:
            layer.crop(tokens_to_remove)

    def reset(self) -> None:
        self.set_length(0)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        for _, _, layer in self.groups:
            layer.reorder_cache(beam_idx)

    # ---- accounting -----------------------------------------------------------------------------
    def stored_elements(self) -> int:
        return sum(layer.stored_elements() for _, _, layer in self.groups)

    def stored_bytes(self) -> int:
        return sum(layer.stored_bytes() for _, _, layer in self.groups)

    def expected_elements(self, batch: int, head_dim: int) -> int:
        return sum(layer.expected_elements(batch, head_dim) for _, _, layer in self.groups)


def head_parts_attention(plan: LayerPlan, q: torch.Tensor, k: HeadParts, v: HeadParts, mask, scale: float) -> torch.Tensor:
    """Each part with the single-window path its inner layer's output calls for, merged in [B, T, Hq, D]."""
    from .hybrid import RingKV, SplitKV, _fixed_split
    from .kernels import attention
    from .static_cache import ring_decode

    group = q.shape[1] // plan.num_kv_heads
    b, _, t, d = q.shape
    out = torch.empty(b, t, q.shape[1], d, dtype=q.dtype, device=q.device)
    for (sub, sel, kp), (_, _, vp) in zip(k.parts, v.parts):
        qsel = query_selector(sel, group, q.device)
        qi = _take(q, qsel)
        if isinstance(kp, RingKV):
            o = ring_decode(sub, qi, kp, vp, mask, scale)
        elif isinstance(kp, SplitKV):
            o = _fixed_split(sub, qi, kp, vp, mask, scale)
        else:  # a part without SWA heads: plain keys
            o = attention(qi, kp, vp, scale=scale, mask=mask).transpose(1, 2)
        if isinstance(qsel, slice):
            out[:, :, qsel] = o
        else:
            out.index_copy_(2, qsel, o)
    return out
