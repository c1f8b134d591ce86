"""A static hybrid KV cache: preallocated buffers a captured CUDA graph can replay over.

:class:`~consa.attention.cache.HybridCache` grows its FA heads and trims its SWA heads with
``torch.cat`` and keeps lengths as Python ints: right for the eager path, but every decode step then
allocates, copies and branches on the host. Here every buffer is allocated once:

* FA heads: ``[B, n_FA, L_max, D]``, slot t at index t;
* SWA heads: a ring ``[B, n_SWA, min(L_max, S + M), D]`` (S sinks, ring modulus M = W + rollback),
  slot t < S at index t, slot t ≥ S at S + (t − S) mod M;
* the number of slots written, as a device int64 tensor that a decode step bumps in place.

A decode step (one new token) writes its key with ``index_copy_`` at the device position and hands
:class:`~consa.attention.plan.RingKV` to the attention function, whose Triton kernel reads the
length on the device (``triton_decode.hybrid_decode(length=...)``): no ``torch.cat``, no Python branch
on a tensor value, no host sync, and the same kernel launch at every length.

**Why W + S ring slots, one more than the eager cache's W − 1 + S.** The eager cache concatenates the new
key to the held ones for one step and trims afterwards, so between steps it holds W − 1 (+ S). A
static buffer has no room to concatenate into: the new key is written in place *before* the kernel
reads, and the query at slot t sees t − W + 1 … t, i.e. W non-sink keys including its own. So the
honest static size is W + S (``rollback`` more for assisted decoding, see :meth:`StaticHybridLayer.crop`).

A layer whose SWA heads differ in span gets one such layer per span group (:class:`StaticSpanGroupsLayer`,
below): each group keeps a ring of exactly its own W + S slots, so the cache holds what the allocation
says, group by group; a decode step writes and attends group by group (the single-window kernels
unchanged), and the head selections are device tensors made when the buffers are allocated, so the
step captures into a CUDA graph like a single-window layer. It returns :class:`~consa.attention.plan.HeadParts`.

A prompt (several tokens at once) runs eagerly: from an empty cache the layer returns the prompt's own
keys (the hybrid prefill kernels run on them) and fills the buffers; a chunk after earlier tokens
(chunked prefill, verifying drafts) gathers the held window in slot order and returns
:class:`~consa.attention.plan.SplitKV`, like the eager cache. A host mirror of the length serves
those eager paths (``get_seq_length``, mask sizes, crop); a graph driver that replays decode steps sets
it afterwards with :meth:`StaticHybridCache.set_length`.

The cache takes plans and plain sizes, no model: ``StaticHybridCache(plans_of(model), max_len)``.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from . import decode_ops, select
from .plan import HeadParts, KernelConfig, KeySlots, LayerPlan, RingKV, SplitKV, device_selector, kv_selector, take
from .triton_decode import head_tables


class StaticHybridLayer(CacheLayerMixin):
    """One decoder layer's static cache (see the module docstring)."""

    is_sliding = False  # the mask spans every slot: the FA heads need them all
    is_croppable = True
    is_compileable = True  # a decode update touches only preallocated device tensors

    def __init__(self, num_kv_heads: int, fa_kv: list[int], window: int, max_len: int, sinks: int = 0, rollback: int = 0,
                 kernels: KernelConfig | None = None):
        super().__init__()
        if window < 1 or max_len < 1 or rollback < 0 or sinks < 0:
            raise ValueError(f"static cache: need window, max_len >= 1 and rollback, sinks >= 0 (got {window}, {max_len}, {rollback}, {sinks})")
        self.num_kv_heads = num_kv_heads
        self.fa_kv = list(fa_kv)
        self.swa_kv = [h for h in range(num_kv_heads) if h not in set(self.fa_kv)]
        self.window, self.sinks, self.max_len, self.rollback = window, sinks, max_len, rollback
        self.kernels = kernels or KernelConfig()  # the decode write's kernel choice
        self.ring = window + rollback  # M: non-sink slots the ring keeps
        self.swa_size = min(max_len, sinks + self.ring)
        self._fa_sel = kv_selector(self.fa_kv)
        self._swa_sel = kv_selector(self.swa_kv)
        self.seen = 0  # host mirror of the length (eager paths only)
        self.length = torch.zeros(1, dtype=torch.long)
        self.fa_keys = self.fa_values = self.swa_keys = self.swa_values = None

    @classmethod
    def from_plan(cls, plan: LayerPlan, max_len: int, rollback: int = 0) -> "StaticHybridLayer":
        return cls(plan.num_kv_heads, plan.fa_kv, plan.window, max_len, plan.sinks, rollback, plan.kernels)

    # ---- allocation -----------------------------------------------------------------------------
    def allocate(self, batch: int, head_dim: int, dtype: torch.dtype, device) -> None:
        """Allocate every buffer now (a graph must see them before it is captured)."""
        self.device, self.dtype, self.batch = torch.device(device), dtype, batch
        buf = lambda n, t: torch.zeros(batch, n, t, head_dim, dtype=dtype, device=device)  # noqa: E731
        self.fa_keys, self.fa_values = buf(len(self.fa_kv), self.max_len), buf(len(self.fa_kv), self.max_len)
        self.swa_keys, self.swa_values = buf(len(self.swa_kv), self.swa_size), buf(len(self.swa_kv), self.swa_size)
        self.length = torch.full((1,), self.seen, dtype=torch.long, device=device)
        # index selectors live on the device, so a captured step never copies from the host
        self._fa_sel = self._fa_sel.to(device) if isinstance(self._fa_sel, torch.Tensor) else self._fa_sel
        self._swa_sel = self._swa_sel.to(device) if isinstance(self._swa_sel, torch.Tensor) else self._swa_sel
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.allocate(key_states.shape[0], key_states.shape[-1], key_states.dtype, key_states.device)

    # ---- update -----------------------------------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if key_states.shape[1] != self.num_kv_heads or key_states.shape[0] != self.batch:
            raise ValueError(f"static cache layer holds batch {self.batch} × {self.num_kv_heads} KV heads, "
                             f"got {tuple(key_states.shape[:2])}")
        if key_states.shape[-2] == 1:
            return self._decode(key_states, value_states)
        return self._prefill(key_states, value_states)

    def _ring_index(self, slot: torch.Tensor) -> torch.Tensor:
        s = self.sinks
        return slot - self.ring * ((slot - s).clamp(min=0) // self.ring)

    def _decode(self, k: torch.Tensor, v: torch.Tensor):
        """Write one slot at the device position and bump it: no host value is read. One Triton
        launch where the kernel runs (a decode step is ~40 tiny kernels a layer: each one counts)."""
        pos = self.length
        compiling = torch.compiler.is_compiling()
        write = None if compiling else select.choose(self.kernels, "static_write", k, v, self.fa_keys, self.swa_keys)
        if compiling:  # one opaque op in a compiled step (decode_ops.py): the same write at run time
            decode_ops.static_write(k, v, self.fa_keys, self.fa_values, self.swa_keys, self.swa_values, pos, self.num_kv_heads,
                                    list(self.fa_kv), self.sinks, self.ring, self.kernels.triton_on_cpu)
        elif k.stride(-1) == 1 and v.stride(-1) == 1 and write:
            heads = head_tables(self.num_kv_heads, tuple(self.fa_kv), k.device)
            write(k, v, self.fa_keys, self.fa_values, self.swa_keys, self.swa_values, heads, pos, self.sinks, self.ring)
        else:
            self._write_torch(k, v)
        self.length.add_(1)
        if not compiling:  # a host int read under dynamo is a guard (a recompile per step): the engine sets it
            self.seen += 1
        return (RingKV(self.fa_keys, self.swa_keys, self.length, self.ring),
                RingKV(self.fa_values, self.swa_values, self.length, self.ring))

    def _write_torch(self, k: torch.Tensor, v: torch.Tensor) -> None:
        pos = self.length
        if self.fa_kv:
            self.fa_keys.index_copy_(2, pos, take(k, self._fa_sel))
            self.fa_values.index_copy_(2, pos, take(v, self._fa_sel))
        if self.swa_kv:
            idx = self._ring_index(pos)
            self.swa_keys.index_copy_(2, idx, take(k, self._swa_sel))
            self.swa_values.index_copy_(2, idx, take(v, self._swa_sel))

    def _prefill(self, k: torch.Tensor, v: torch.Tensor):
        """Several slots (eager): write them, return what the attention of these queries needs."""
        start, t = self.seen, k.shape[-2]
        end = start + t
        if end > self.max_len:
            raise ValueError(f"static cache is full: {end} slots asked, {self.max_len} allocated (raise max_len)")
        held = None
        if start and self.swa_kv:  # the window the first new query still sees, gathered before it is overwritten
            first = min(start, max(self.sinks, start - (self.window - 1)))  # a chunk may start among the sinks
            dev = self.device  # index tensors made on the device: a host copy would wait for the GPU every layer
            slots = torch.cat([torch.arange(min(self.sinks, start), device=dev), torch.arange(first, start, device=dev)])
            idx = self._ring_index(slots)
            held = (self.swa_keys.index_select(2, idx), self.swa_values.index_select(2, idx),
                    KeySlots() if first <= self.sinks else KeySlots(self.sinks, first))
        if self.fa_kv:
            self.fa_keys[:, :, start:end] = take(k, self._fa_sel)
            self.fa_values[:, :, start:end] = take(v, self._fa_sel)
        new_k, new_v = take(k, self._swa_sel), take(v, self._swa_sel)
        if self.swa_kv:  # of the new slots the ring keeps the sinks and the last M (two ranges, no Python loop)
            dev = self.device
            keep = torch.cat([torch.arange(start, max(start, min(end, self.sinks)), device=dev),
                              torch.arange(min(end, max(start, self.sinks, end - self.ring)), end, device=dev)])
            src = keep - start
            idx = self._ring_index(keep)
            self.swa_keys.index_copy_(2, idx, new_k.index_select(2, src))
            self.swa_values.index_copy_(2, idx, new_v.index_select(2, src))
        self.seen = end
        self.length.fill_(end)
        if start == 0:
            return k, v
        if not self.swa_kv:
            return self.fa_keys[:, :, :end], self.fa_values[:, :, :end]
        hk, hv, slots = held
        return (SplitKV(self.fa_keys[:, :, :end], torch.cat([hk, new_k], dim=-2), slots),
                SplitKV(self.fa_values[:, :, :end], torch.cat([hv, new_v], dim=-2), slots))

    # ---- lengths ----------------------------------------------------------------------------------
    def set_length(self, n: int) -> None:
        """Set the host mirror and the device length (a graph driver, after replayed steps)."""
        self.seen = n
        self.length.fill_(n)

    def get_mask_sizes(self, query_length) -> tuple[int, int]:
        q = query_length.shape[0] if isinstance(query_length, torch.Tensor) else query_length
        return self.seen + q, 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return self.max_len

    def crop(self, tokens_to_remove) -> None:
        """Drop the last ``-tokens_to_remove`` slots (transformers' convention; a positive value is the
        legacy absolute length to keep). The FA buffers simply forget them; the ring can roll back at
        most ``rollback + 1`` slots once it has wrapped (older window keys were overwritten by the
        dropped ones): more is one clear error, before anything changes."""
        n = int(tokens_to_remove)
        total = self.seen
        drop = -n if n <= 0 else max(0, total - n)
        if drop > total:
            raise ValueError(f"cannot crop {drop} slots from a cache layer holding {total}")
        if self.swa_kv and total > self.sinks + self.ring and drop > self.rollback + 1:
            raise RuntimeError(f"cannot crop {drop} slots: the sliding-window ring keeps room to roll back "
                               f"{self.rollback + 1} (build the cache with rollback >= {drop - 1})")
        self.set_length(total - drop)

    def reset(self) -> None:
        self.set_length(0)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        for buf in (self.fa_keys, self.fa_values, self.swa_keys, self.swa_values):
            buf.copy_(buf.index_select(0, beam_idx.to(buf.device)))

    # ---- accounting -----------------------------------------------------------------------------
    def stored_elements(self) -> int:
        if not self.is_initialized:
            return 0
        return sum(t.numel() for t in (self.fa_keys, self.fa_values, self.swa_keys, self.swa_values))

    def stored_bytes(self) -> int:
        return self.stored_elements() * (self.fa_keys.element_size() if self.is_initialized else 0)

    def expected_elements(self, batch: int, head_dim: int) -> int:
        """The theory: 2·B·d·(n_FA·L_max + n_SWA·min(L_max, S + W + rollback))."""
        return 2 * batch * head_dim * (len(self.fa_kv) * self.max_len + len(self.swa_kv) * self.swa_size)


class StaticSpanGroupsLayer(CacheLayerMixin):
    """Static cache of one layer whose SWA heads differ in span: one :class:`StaticHybridLayer` per span
    group of the plan (``LayerPlan.span_groups``, narrowest first), each over its own KV heads, the first
    also holding the layer's FA heads. A prompt from an empty cache returns its own keys (the
    span-grouped prefill runs on them); a later chunk or a decode step returns :class:`HeadParts`."""

    is_sliding = False
    is_croppable = True
    is_compileable = True

    def __init__(self, plan: LayerPlan, max_len: int, rollback: int = 0):
        super().__init__()
        self.plan, self.max_len = plan, max_len
        self.groups = []  # (KV heads in the layer, sub-plan, inner layer)
        for i, (window, heads) in enumerate(plan.span_groups):
            kv = sorted((list(plan.fa_kv) if i == 0 else []) + list(heads))
            fa = [kv.index(h) for h in plan.fa_kv] if i == 0 else []
            sub = LayerPlan(plan.layer, len(kv), window, plan.sinks, "fixed", fa_kv=fa, kernels=plan.kernels)
            self.groups.append((kv, sub, StaticHybridLayer.from_plan(sub, max_len, rollback)))
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
        self._sel = [device_selector(kv, device) for kv, _, _ in self.groups]
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
            k, v = layer.update(take(key_states, sel), take(value_states, sel))
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


def layer_for(plan: LayerPlan, max_len: int, rollback: int = 0):
    """The static cache layer of a fixed plan: one ring, or one per span group."""
    if plan.mode != "fixed":
        raise ValueError(f"layer {plan.layer}: a hybrid cache needs a fixed allocation (plan mode is {plan.mode!r})")
    if plan.multi_span:
        return StaticSpanGroupsLayer(plan, max_len, rollback)
    return StaticHybridLayer.from_plan(plan, max_len, rollback)


class StaticHybridCache(Cache):
    """A transformers Cache of :class:`StaticHybridLayer` objects, one per decoder layer.

    ``StaticHybridCache(plans, max_len)`` from the layers' fixed plans (``consa.models.plans_of(model)``);
    pass ``batch``, ``head_dim``, ``dtype`` and ``device`` to allocate at once (else at the first
    update). ``rollback``: extra ring slots so that ``crop`` can undo that many more tokens (assisted /
    prompt-lookup decoding).
    With ``model.generate`` on CUDA pass ``disable_compile=True``: transformers auto-compiles the forward
    for a compileable cache, and that path (a host length mirror under dynamo) is not tested; consa's
    own engine captures the step by hand (``consa.serving``).
    """

    def __init__(self, plans: list[LayerPlan], max_len: int, *, rollback: int = 0, batch: int | None = None,
                 head_dim: int | None = None, dtype: torch.dtype | None = None, device=None):
        plans = list(plans) if isinstance(plans, (list, tuple)) else []
        if not plans or not all(isinstance(p, LayerPlan) for p in plans):
            raise TypeError("StaticHybridCache takes the layers' LayerPlans (consa.models.plans_of(model) gives a model's)")
        super().__init__(layers=[layer_for(p, max_len, rollback) for p in plans])
        if batch is not None:
            if head_dim is None or dtype is None or device is None:
                raise ValueError("allocating at once needs batch, head_dim, dtype and device")
            for layer in self.layers:
                layer.allocate(batch, head_dim, dtype, device)

    @property
    def max_len(self) -> int:
        return self.layers[0].max_len

    def set_length(self, n: int) -> None:
        for layer in self.layers:
            layer.set_length(n)

    def stored_elements(self) -> int:
        return sum(layer.stored_elements() for layer in self.layers)

    def stored_bytes(self) -> int:
        return sum(layer.stored_bytes() for layer in self.layers)
