"""A static hybrid KV cache: preallocated buffers a captured CUDA graph can replay over.

:class:`~consa.attention.cache.HybridCache` grows its FA heads and trims its SWA heads with
``torch.cat`` and keeps lengths as Python ints: right for the eager path, but every decode step then
allocates, copies and branches on the host. Here every buffer is allocated once:

* FA heads: ``[B, n_FA, L_max, D]``, slot t at index t;
* SWA heads: a ring ``[B, n_SWA, min(L_max, S + M), D]`` (S sinks, ring modulus M = W + rollback),
  slot t < S at index t, slot t ≥ S at S + (t − S) mod M;
* the number of slots written, as a device int64 tensor that a decode step bumps in place.

A decode step (one new token) writes its key with ``index_copy_`` at the device position and hands
:class:`~consa.attention.hybrid.RingKV` to the attention function, whose Triton kernel reads the
length on the device (``triton_decode.hybrid_decode(length=...)``): no ``torch.cat``, no Python branch
on a tensor value, no host sync, and the same kernel launch at every length.

**Why W + S ring slots, one more than the eager cache's W − 1 + S.** The eager cache concatenates the new
key to the held ones for one step and trims afterwards, so between steps it holds W − 1 (+ S). A
static buffer has no room to concatenate into: the new key is written in place *before* the kernel
reads, and the query at slot t sees t − W + 1 … t, i.e. W non-sink keys including its own. So the
honest static size is W + S (``rollback`` more for assisted decoding, see :meth:`StaticHybridLayer.crop`).

A layer whose SWA heads differ in span gets one such layer per span group (``static_spans.py``).

A prompt (several tokens at once) runs eagerly: from an empty cache the layer returns the prompt's own
keys (the hybrid prefill kernels run on them) and fills the buffers; a chunk after earlier tokens
(chunked prefill, verifying drafts) gathers the held window in slot order and returns
:class:`~consa.attention.hybrid.SplitKV`, like the eager cache. A host mirror of the length serves
those eager paths (``get_seq_length``, mask sizes, crop); a graph driver that replays decode steps sets
it afterwards with :meth:`StaticHybridCache.set_length`.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .hybrid import LayerPlan, RingKV, SplitKV, _take
from .cache import _selector
from .kernels import KeySlots


class StaticHybridLayer(CacheLayerMixin):
    """One decoder layer's static cache (see the module docstring)."""

    is_sliding = False  # the mask spans every slot: the FA heads need them all
    is_croppable = True
    is_compileable = True  # a decode update touches only preallocated device tensors

    def __init__(self, num_kv_heads: int, fa_kv: list[int], window: int, max_len: int, sinks: int = 0, rollback: int = 0):
        super().__init__()
        if window < 1 or max_len < 1 or rollback < 0 or sinks < 0:
            raise ValueError(f"static cache: need window, max_len >= 1 and rollback, sinks >= 0 (got {window}, {max_len}, {rollback}, {sinks})")
        self.num_kv_heads = num_kv_heads
        self.fa_kv = list(fa_kv)
        self.swa_kv = [h for h in range(num_kv_heads) if h not in set(self.fa_kv)]
        self.window, self.sinks, self.max_len, self.rollback = window, sinks, max_len, rollback
        self.ring = window + rollback  # M: non-sink slots the ring keeps
        self.swa_size = min(max_len, sinks + self.ring)
        self._fa_sel = _selector(self.fa_kv, num_kv_heads)
        self._swa_sel = _selector(self.swa_kv, num_kv_heads)
        self.seen = 0  # host mirror of the length (eager paths only)
        self.length = torch.zeros(1, dtype=torch.long)
        self.fa_keys = self.fa_values = self.swa_keys = self.swa_values = None

    @classmethod
    def from_plan(cls, plan: LayerPlan, max_len: int, rollback: int = 0) -> "StaticHybridLayer":
        if plan.mode != "fixed":
            raise ValueError(f"layer {plan.layer}: a hybrid cache needs a fixed allocation (plan mode is {plan.mode!r})")
        if plan.multi_span:  # one ring per span group, each with the single-window kernels (static_spans.py)
            from .static_spans import StaticSpanGroupsLayer

            return StaticSpanGroupsLayer(plan, max_len, rollback)
        return cls(plan.num_kv_heads, plan.fa_kv, plan.window, max_len, plan.sinks, rollback)

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
        from . import triton_decode

        if k.stride(-1) == 1 and v.stride(-1) == 1 and triton_decode.usable(k, v, self.fa_keys, self.swa_keys):
            heads = triton_decode.head_tables(self.num_kv_heads, tuple(self.fa_kv), k.device)
            triton_decode.write_static(k, v, self.fa_keys, self.fa_values, self.swa_keys, self.swa_values, heads,
                                       pos, self.sinks, self.ring)
        else:
            self._write_torch(k, v)
        self.length.add_(1)
        self.seen += 1
        return (RingKV(self.fa_keys, self.swa_keys, self.length, self.ring),
                RingKV(self.fa_values, self.swa_values, self.length, self.ring))

    def _write_torch(self, k: torch.Tensor, v: torch.Tensor) -> None:
        pos = self.length
        if self.fa_kv:
            self.fa_keys.index_copy_(2, pos, _take(k, self._fa_sel))
            self.fa_values.index_copy_(2, pos, _take(v, self._fa_sel))
        if self.swa_kv:
            idx = self._ring_index(pos)
            self.swa_keys.index_copy_(2, idx, _take(k, self._swa_sel))
            self.swa_values.index_copy_(2, idx, _take(v, self._swa_sel))

    def _prefill(self, k: torch.Tensor, v: torch.Tensor):
        """Several slots (eager): write them, return what the attention of these queries needs."""
        start, t = self.seen, k.shape[-2]
        end = start + t
        if end > self.max_len:
            raise ValueError(f"static cache is full: {end} slots asked, {self.max_len} allocated (raise max_len)")
        held = None
        if start and self.swa_kv:  # the window the first new query still sees, gathered before it is overwritten
            first = max(self.sinks, start - (self.window - 1))
            slots = torch.cat([torch.arange(min(self.sinks, start)), torch.arange(first, start)])
            idx = self._ring_index(slots).to(self.device)
            held = (self.swa_keys.index_select(2, idx), self.swa_values.index_select(2, idx),
                    KeySlots() if first <= self.sinks else KeySlots(self.sinks, first))
        if self.fa_kv:
            self.fa_keys[:, :, start:end] = _take(k, self._fa_sel)
            self.fa_values[:, :, start:end] = _take(v, self._fa_sel)
        new_k, new_v = _take(k, self._swa_sel), _take(v, self._swa_sel)
        if self.swa_kv:  # of the new slots the ring keeps the sinks and the last M (two ranges, no Python loop)
            keep = torch.cat([torch.arange(start, max(start, min(end, self.sinks))),
                              torch.arange(min(end, max(start, self.sinks, end - self.ring)), end)])
            src = (keep - start).to(self.device)
            idx = self._ring_index(keep).to(self.device)
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


class StaticHybridCache(Cache):
    """A transformers Cache of :class:`StaticHybridLayer` objects, one per decoder layer.

    ``StaticHybridCache(model, max_len)`` for a model with a fixed consa allocation applied; pass
    ``batch``/``dtype``/``device`` to allocate at once (else at the first update). ``rollback``: extra
    ring slots so that ``crop`` can undo that many more tokens (assisted / prompt-lookup decoding).
    With ``model.generate`` on CUDA pass ``disable_compile=True``: transformers auto-compiles the forward
    for a compileable cache, and that path (a host length mirror under dynamo) is not tested; consa's
    own engine captures the step by hand (``consa.serving``).
    """

    def __init__(self, model=None, max_len: int = 0, *, plans: list[LayerPlan] | None = None, rollback: int = 0,
                 batch: int | None = None, dtype: torch.dtype | None = None, device=None):
        from .cache import plans_of

        if (model is None) == (plans is None):
            raise ValueError("give StaticHybridCache exactly one of a model (with consa applied) or a list of plans")
        if plans is None:
            plans = plans_of(model)
        super().__init__(layers=[StaticHybridLayer.from_plan(p, max_len, rollback) for p in plans])
        if batch is not None:
            if model is None:
                raise ValueError("allocating at once needs the model (for the head dim)")
            cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
            head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
            p = next(model.parameters())
            for layer in self.layers:
                layer.allocate(batch, head_dim, dtype or p.dtype, device or p.device)

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


# ---- attention over a static layer (called by hybrid.consa_attention) -------------------------------
def ring_decode(plan: LayerPlan, q: torch.Tensor, k: RingKV, v: RingKV, mask, scale: float) -> torch.Tensor:
    """One decode query per sequence over a static layer: the Triton kernel where it runs (CUDA, or
    the interpreter with ``triton_decode.ON_CPU``), else dense torch ops masked by the device length.
    ``mask``: None or a boolean padding mask whose last dimension spans at least the slots written.
    Returns [B, 1, Hq, D]."""
    from . import triton_decode

    if mask is not None:
        mask = (mask[:, :, -1] if mask.dim() == 4 else mask).reshape(mask.shape[0], mask.shape[-1])
    n_fa, n_sw = k.fa.shape[1], k.swa.shape[1]
    live = [t for t, n in ((k.fa, n_fa), (k.swa, n_sw)) if n]
    if triton_decode.usable(q, *live):
        heads = triton_decode.head_tables(plan.num_kv_heads, tuple(plan.fa_kv), q.device)
        return triton_decode.hybrid_decode(q, k.fa, v.fa, k.swa, v.swa, heads, scale, mask=mask,
                                           swa_sinks=plan.sinks, window=plan.window, sinks=plan.sinks,
                                           length=k.length, ring=k.ring)
    return _dense_ring(plan, q, k, v, mask, scale)


def ring_slots(n: int, length: torch.Tensor, sinks: int, ring: int) -> torch.Tensor:
    """The slot each of the first ``n`` ring indices holds when ``length`` slots are written: index j < S
    holds slot j, else the newest slot ≤ length − 1 congruent to it (on device; −1 where nothing yet)."""
    j = torch.arange(n, device=length.device)
    slot = torch.where(j < sinks, j, j + ring * torch.div(length - 1 - j, ring, rounding_mode="floor"))
    return torch.where(j < length, slot, -1)


def _dense_ring(plan, q, k: RingKV, v: RingKV, mask, scale):
    """The torch path (CPU without the kernel): softmax over each group's buffer with the slots not
    written, outside the window or padded masked out; device tensors only, like the kernel."""
    b, hq, _, d = q.shape
    group = hq // plan.num_kv_heads
    length = k.length
    if mask is not None and mask.dim() == 4:  # called directly (tests) with transformers' [B, 1, 1, L] mask
        mask = mask[:, 0, -1]
    out = torch.empty(b, 1, hq, d, dtype=q.dtype, device=q.device)
    parts = []
    if plan.fa_kv:
        slot = torch.arange(k.fa.shape[-2], device=q.device)
        parts.append((plan.fa_kv, k.fa, v.fa, slot, slot < length))
    if plan.swa_kv:
        slot = ring_slots(k.swa.shape[-2], length, plan.sinks, k.ring)
        seen = (slot >= 0) & ((length - 1 - slot < plan.window) | (slot < plan.sinks))
        parts.append((plan.swa_kv, k.swa, v.swa, slot.clamp(min=0), seen))
    for heads, kk, vv, slot, seen in parts:
        allowed = seen[None, :].expand(b, -1)
        if mask is not None:
            allowed = allowed & mask[:, slot.clamp(max=mask.shape[-1] - 1)].to(torch.bool) & (slot < mask.shape[-1])
        qi = torch.tensor([h * group + j for h in heads for j in range(group)], device=q.device)
        qq = q.index_select(1, qi).float().view(b, len(heads), group, d)
        s = torch.einsum("bhgd,bhtd->bhgt", qq, kk.float()) * scale
        s = s.masked_fill(~allowed[:, None, None, :], float("-inf"))
        p = torch.softmax(s, dim=-1).nan_to_num(0.0)
        o = torch.einsum("bhgt,bhtd->bhgd", p, vv.float()).reshape(b, len(heads) * group, d)
        out.index_copy_(2, qi, o.to(q.dtype)[:, None])
    return out
