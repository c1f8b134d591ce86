"""A slot pool: the static hybrid cache of many independent sequences, each at its own length.

Continuous batching needs what :class:`~consa.attention.static_cache.StaticHybridCache` cannot give:
sequences that start and stop at any step, so every row of the batch sits at its own length. The pool
keeps the static cache's buffers (one row per *slot*: FA heads ``max_len`` slots, SWA heads a ring of
W + S) and adds two ways to run the model over them:

* **one sequence's prompt chunk** (:meth:`SlotPool.prefill_view`): a batch-1 ``StaticHybridCache`` whose
  buffers are views of one pool row, so a chunk takes the static cache's own prefill path (hybrid
  prefill kernels from an empty row, the held window and FA prefix for a later chunk) and writes the
  pool in place;
* **one decode step over the first R rows** (:class:`RowsCache`): each row writes its new key at its
  own length and attends over its own keys (FA: its first ``length`` slots; SWA: the ring slots inside
  its window), all rows at once with a boolean mask per row. The buffers are read as views (rows
  0…R−1, slots up to the longest), never gathered. Rows in that range that do not decode (a free slot,
  or a sequence between prompt chunks) ride along at their own length: the key they write there is
  overwritten before anything reads it (their next prompt chunk, or their first decode step, writes
  that very slot, and a ring slot at the same index), and their outputs are dropped.

The decode attention runs through the attention function registered as ``consa_serve``
(:func:`register`), which takes this cache's :class:`RowsKV` and hands everything else to consa's own
``consa`` function: the model and its plans are unchanged, only the name on the config differs.

Kernels: where consa's Triton decode kernels run (CUDA; CPU tests under the interpreter with
``kernel="triton"``), a step is two launches a layer, as in the fixed-batch engine: the write of every
row's new key at its own slot, and the attention of both head kinds, each row reading its own length
(FA heads their first ``length`` slots, SWA heads their ring). Elsewhere (``kernel="torch"``) the FA
heads run SDPA with a padding mask per row up to the longest row, and the SWA heads SDPA over their
ring with a mask per row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.masking_utils import AttentionMaskInterface

from ..attention import triton_decode
from ..attention.cached import ring_slots
from ..attention.hybrid import consa_attention, consa_mask
from ..attention.plan import LayerPlan
from ..attention.softcap_sinks import LogitMods, attention_weights, mod_kwargs, mods_of_heads
from ..attention.static_cache import StaticHybridCache

NAME = "consa_serve"


# ---- what a slot costs ------------------------------------------------------------------------------
def slot_elements(plans: list[LayerPlan], max_len: int, head_dim: int) -> int:
    """Elements one slot holds (keys and values): per KV head, FA ``max_len`` slots, SWA a ring of its
    own W + S (``min(max_len, W + S)``), summed over layers: the static cache's buffers at batch 1."""
    total = 0
    for p in plans:
        for h in range(p.num_kv_heads):
            w = p.windows[h] if p.windows is not None else (None if h in p.fa_kv else p.window)
            total += max_len if w is None else min(max_len, w + p.sinks)
    return 2 * head_dim * total


def slots_for_budget(plans: list[LayerPlan], max_len: int, head_dim: int, dtype: torch.dtype, budget_bytes: int) -> int:
    """How many slots of ``max_len`` fit in ``budget_bytes`` of KV memory."""
    per = slot_elements(plans, max_len, head_dim) * torch.empty((), dtype=dtype).element_size()
    return int(budget_bytes // per)


def _static_layers(cache: StaticHybridCache):
    """Every single-window static layer of a cache (each span group of a multi-span layer)."""
    for layer in cache.layers:
        yield from ([g[2] for g in layer.groups] if hasattr(layer, "groups") else [layer])


# ---- the per-row decode attention --------------------------------------------------------------------
@dataclass
class _Part:
    """One single-window group of a layer's KV heads and its pool buffers. ``fa_kv``/``swa_kv``: the
    layer's KV heads of each kind (device index tensors), ``fa_q``/``swa_q`` their query heads."""

    window: int
    sinks: int
    ring: int
    layer: object  # the StaticHybridLayer holding this group's buffers
    fa_kv: torch.Tensor
    swa_kv: torch.Tensor
    fa_q: torch.Tensor
    swa_q: torch.Tensor
    kv: torch.Tensor | None  # the group's KV heads, None when it is the whole layer (no selection needed)
    q: torch.Tensor | None  # their query heads (same)
    heads: torch.Tensor  # the Triton decode kernel's head table over the group's own KV heads


def _parts(plan: LayerPlan, pool_layer, group: int, device) -> list[_Part]:
    """The single-window groups of a pool layer (one for a single-window plan, one per span group else)."""
    if hasattr(pool_layer, "groups"):
        members = [(kv, sub, inner) for kv, sub, inner in pool_layer.groups]
    else:
        members = [(list(range(plan.num_kv_heads)), plan, pool_layer)]
    out = []
    for kv, sub, inner in members:
        fa = [kv[i] for i in sub.fa_kv]
        swa = [kv[i] for i in sub.swa_kv]
        idx = lambda heads: torch.tensor(heads, dtype=torch.long, device=device)  # noqa: E731
        qs = lambda heads: idx([h * group + j for h in heads for j in range(group)])  # noqa: E731
        whole = kv == list(range(plan.num_kv_heads))
        heads = triton_decode.head_tables(len(kv), tuple(sub.fa_kv), torch.device(device))
        out.append(_Part(sub.window, sub.sinks, inner.ring, inner, idx(fa), idx(swa), qs(fa), qs(swa),
                         None if whole else idx(kv), None if whole else qs(kv), heads))
    return out


class RowsLayer(CacheLayerMixin):
    """One decoder layer of the pool seen by a decode step over ``rows`` (see :class:`RowsCache`)."""

    is_sliding = False
    is_compileable = False

    def __init__(self, cache: "RowsCache", parts: list[_Part]):
        super().__init__()
        self.cache, self.parts = cache, parts
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states) -> None:  # the pool is allocated up front
        pass

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if key_states.shape[-2] != 1 or key_states.shape[0] != self.cache.rows.numel():
            raise ValueError("the slot pool's decode cache takes one token for each of its rows (prompts go through prefill_view)")
        if self is self.cache.layers[0]:
            self.cache.begin_step(key_states)
        rows, pos = self.cache.rows, self.cache.pos
        if self.cache.use_kernel(key_states):  # one launch per group: each row at its own slot
            r = rows.numel()
            for p in self.parts:
                lay = p.layer
                k, v = (key_states, value_states) if p.kv is None else (key_states.index_select(1, p.kv), value_states.index_select(1, p.kv))
                triton_decode.write_static(k, v, lay.fa_keys[:r], lay.fa_values[:r], lay.swa_keys[:r], lay.swa_values[:r],
                                           p.heads, pos, p.sinks, p.ring)
            kv = RowsKV(self)
            return kv, kv
        for p in self.parts:
            lay = p.layer
            if p.fa_kv.numel():
                lay.fa_keys[rows, :, pos] = key_states.index_select(1, p.fa_kv)[:, :, 0]
                lay.fa_values[rows, :, pos] = value_states.index_select(1, p.fa_kv)[:, :, 0]
            if p.swa_kv.numel():
                idx = pos - p.ring * ((pos - p.sinks).clamp(min=0) // p.ring)
                lay.swa_keys[rows, :, idx] = key_states.index_select(1, p.swa_kv)[:, :, 0]
                lay.swa_values[rows, :, idx] = value_states.index_select(1, p.swa_kv)[:, :, 0]
        kv = RowsKV(self)
        return kv, kv

    def get_mask_sizes(self, query_length) -> tuple[int, int]:
        return self.cache.read, 0

    def get_seq_length(self) -> int:
        return self.cache.read - 1

    def get_max_length(self) -> int:
        return self.cache.max_len

    def attend(self, q: torch.Tensor, scale: float, mods: LogitMods | None = None) -> torch.Tensor:
        """q [B, Hq, 1, D] → [B, 1, Hq, D]: each row over its own keys (lengths after this step's write).
        ``mods``: the layer's logit soft cap / sink logits (``attention.softcap_sinks``)."""
        b, hq, _, d = q.shape
        c = self.cache
        length, read = c.length, c.read
        if c.use_kernel(q):
            return self._attend_kernel(q, scale, mods)
        out = torch.empty(b, hq, d, dtype=q.dtype, device=q.device)
        for p in self.parts:
            lay = p.layer
            if p.fa_kv.numel():
                k, v = lay.fa_keys[:b, :, :read], lay.fa_values[:b, :, :read]
                qf = q.index_select(1, p.fa_q)
                if c.kernel != "torch" and triton_decode.usable(qf, k, v, on_cpu=c.kernel == "triton"):
                    o = _fa_kernel(qf, k, v, c.fa_seen, c.read_len, scale, mods_of_heads(mods, p.fa_q))
                else:
                    o = _grouped(qf, k, v, c.fa_seen, scale, mods_of_heads(mods, p.fa_q))
                out.index_copy_(1, p.fa_q, o)
            if p.swa_kv.numel():
                slot = ring_slots(lay.swa_keys.shape[-2], length[:, None], p.sinks, p.ring)  # [B, S + M]
                seen = (slot >= 0) & ((length[:, None] - 1 - slot < p.window) | (slot < p.sinks))
                k, v = lay.swa_keys[:b], lay.swa_values[:b]
                out.index_copy_(1, p.swa_q, _grouped(q.index_select(1, p.swa_q), k, v, seen, scale, mods_of_heads(mods, p.swa_q)))
        return out[:, None]

    def _attend_kernel(self, q: torch.Tensor, scale: float, mods: LogitMods | None) -> torch.Tensor:
        """Both head kinds of each group in one launch of the Triton decode kernel's static mode, each
        row reading its own length: FA heads their first ``length`` slots, SWA heads their ring."""
        b = q.shape[0]
        length, read = self.cache.length, self.cache.read  # read: the longest row + 1 (eager), whole buffers (captured)
        if len(self.parts) == 1 and self.parts[0].q is None:
            p = self.parts[0]
            lay = p.layer
            return triton_decode.hybrid_decode(q, lay.fa_keys[:b, :, :read], lay.fa_values[:b, :, :read], lay.swa_keys[:b],
                                               lay.swa_values[:b],
                                               p.heads, scale, swa_sinks=p.sinks, window=p.window, sinks=p.sinks,
                                               length=length, ring=p.ring, **mod_kwargs(mods))
        out = torch.empty(b, 1, q.shape[1], q.shape[-1], dtype=q.dtype, device=q.device)
        for p in self.parts:
            lay = p.layer
            o = triton_decode.hybrid_decode(q.index_select(1, p.q), lay.fa_keys[:b, :, :read], lay.fa_values[:b, :, :read], lay.swa_keys[:b],
                                            lay.swa_values[:b], p.heads, scale, swa_sinks=p.sinks, window=p.window,
                                            sinks=p.sinks, length=length, ring=p.ring, **mod_kwargs(mods_of_heads(mods, p.q)))
            out.index_copy_(2, p.q, o)
        return out


def _grouped(q, k, v, seen, scale, mods: LogitMods | None = None) -> torch.Tensor:
    """Decode attention of q [B, n·G, 1, D] over k, v [B, n, T, D] where ``seen`` [B, T]: each KV head's
    query group becomes G queries of that head, so GQA needs no copy of the keys. Returns [B, n·G, D].
    With ``mods`` (which SDPA cannot take) the weights are explicit (``softcap_sinks.attention_weights``)."""
    b, n, _, d = k.shape
    if mods is not None:
        s = torch.einsum("bngd,bntd->bngt", q.reshape(b, n, -1, d).float(), k.float()) * scale
        w = attention_weights(s.reshape(b, q.shape[1], 1, -1), seen[:, None, None, :], mods.softcap, mods.sink_logits)
        o = torch.einsum("bngt,bntd->bngd", w.reshape(b, n, -1, s.shape[-1]), v.float())
        return o.reshape(b, -1, d).to(q.dtype)
    o = F.scaled_dot_product_attention(q.reshape(b, n, -1, d), k, v, attn_mask=seen[:, None, None, :], scale=scale)
    return o.reshape(b, -1, d)


def _fa_kernel(q, k, v, seen, read_len, scale, mods: LogitMods | None = None) -> torch.Tensor:
    """The FA heads through the Triton decode kernel's static mode: every row reads ``read_len`` (the
    longest row's length, a device tensor) slots, its padding mask ``seen`` drops the ones past its own."""
    n = k.shape[1]
    heads = triton_decode.head_tables(n, tuple(range(n)), q.device)
    o = triton_decode.hybrid_decode(q, k, v, k[:, :0], v[:, :0], heads, scale, mask=seen, window=k.shape[-2],
                                    length=read_len, **mod_kwargs(mods))
    return o[:, 0]


@dataclass
class RowsKV:
    """What a :class:`RowsLayer` hands the attention function (keys and values alike): the layer itself,
    whose :meth:`RowsLayer.attend` runs the step."""

    layer: RowsLayer


class RowsCache(Cache):
    """A transformers Cache over the pool for one decode step of its first rows (:meth:`SlotPool.decode_cache`)."""

    def __init__(self, pool: "SlotPool"):
        self.max_len, self.num_slots, self.kernel = pool.max_len, pool.num_slots, pool.kernel
        self._all_rows = torch.arange(pool.num_slots, device=pool.device)
        self.rows = self.pos = self.length = self.fa_seen = self.read_len = None
        self.read = 1
        self._kernel: bool | None = None  # decided at the first step (the model's dtype and device)
        super().__init__(layers=[RowsLayer(self, parts) for parts in pool.parts])

    def prepare(self, pos: torch.Tensor, read: int | None = None) -> "RowsCache":
        """``pos`` [R] (device): the lengths of rows 0…R−1 before the step (where each new key goes).
        ``read``: FA slots every row reads, max(pos) + 1 known on the host; None reads whole buffers
        (a step captured once and replayed at any lengths: ``pos`` is then a static buffer)."""
        self.rows, self.pos, self.read = self._all_rows[: pos.numel()], pos, read or self.max_len
        return self

    def use_kernel(self, x: torch.Tensor) -> bool:
        """Whether this step's writes and attention go through the Triton decode kernels (per-row lengths)."""
        if self._kernel is None:
            self._kernel = self.kernel != "torch" and triton_decode.usable(x, on_cpu=self.kernel == "triton")
        return self._kernel

    def begin_step(self, x: torch.Tensor) -> None:
        """What every layer of the step shares, computed on the device from ``pos`` (so a captured step
        recomputes it at each replay): lengths after the write; for the torch path also the FA slots
        each row sees and the longest row. ``x``: this step's keys (which path runs: :meth:`use_kernel`)."""
        self.length = self.pos + 1
        if self.use_kernel(x):
            return
        self.fa_seen = torch.arange(self.read, device=self.pos.device)[None, :] < self.length[:, None]
        self.read_len = self.length.max().reshape(1)


def serve_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """``consa_serve``: a pool decode step attends per row; anything else is consa's own attention."""
    if isinstance(key, RowsKV):
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        return key.layer.attend(query, scale, LogitMods.of(kwargs.get("softcap"), kwargs.get("s_aux"))), None
    return consa_attention(module, query, key, value, attention_mask, scaling=scaling, **kwargs)


def register() -> None:
    """Register ``consa_serve`` (attention: :func:`serve_attention`; masks: consa's). Idempotent."""
    AttentionInterface.register(NAME, serve_attention)
    AttentionMaskInterface.register(NAME, consa_mask)


# ---- the pool --------------------------------------------------------------------------------------
class SlotPool:
    """``num_slots`` rows of static hybrid cache, ``max_len`` slots each, for the model's fixed plans.
    ``kernel``: the FA heads' decode attention, ``auto`` (the Triton kernel where it runs, else SDPA),
    ``torch`` (SDPA), or ``triton`` (the kernel, on CPU under Triton's interpreter: tests)."""

    def __init__(self, plans: list[LayerPlan], num_slots: int, max_len: int, *, num_q_heads: int, head_dim: int,
                 dtype: torch.dtype, device, kernel: str = "auto"):
        if num_slots < 1 or max_len < 2:
            raise ValueError(f"a slot pool needs at least one slot of at least 2 tokens (got {num_slots} × {max_len})")
        if kernel not in ("auto", "torch", "triton"):
            raise ValueError(f"kernel must be auto, torch or triton, got {kernel!r}")
        self.kernel = kernel
        self.plans, self.num_slots, self.max_len, self.head_dim = list(plans), num_slots, max_len, head_dim
        self.dtype, self.device = dtype, torch.device(device)
        self.cache = StaticHybridCache(plans=self.plans, max_len=max_len)
        for layer in self.cache.layers:
            layer.allocate(num_slots, head_dim, dtype, device)
        group = num_q_heads // plans[0].num_kv_heads
        self.parts = [_parts(p, layer, group, self.device) for p, layer in zip(self.plans, self.cache.layers)]
        # a batch-1 cache whose buffers become views of one row (0-row buffers until bound: no memory)
        self._view = StaticHybridCache(plans=self.plans, max_len=max_len)
        for layer in self._view.layers:
            layer.allocate(0, head_dim, dtype, device)
        self._pairs = list(zip(_static_layers(self._view), _static_layers(self.cache)))
        self._rows = RowsCache(self)

    @classmethod
    def for_model(cls, model, num_slots: int, max_len: int, plans: list[LayerPlan], kernel: str = "auto") -> "SlotPool":
        from ..models import text_config

        cfg = text_config(model)
        p = next(model.parameters())
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return cls(plans, num_slots, max_len, num_q_heads=cfg.num_attention_heads, head_dim=head_dim, dtype=p.dtype,
                   device=p.device, kernel=kernel)

    def prefill_view(self, slot: int, length: int) -> StaticHybridCache:
        """A batch-1 static cache over row ``slot`` holding ``length`` tokens: a forward through it writes
        the row in place."""
        for view, pool in self._pairs:
            view.fa_keys, view.fa_values = pool.fa_keys[slot : slot + 1], pool.fa_values[slot : slot + 1]
            view.swa_keys, view.swa_values = pool.swa_keys[slot : slot + 1], pool.swa_values[slot : slot + 1]
            view.batch = 1
        self._view.set_length(length)
        return self._view

    def decode_cache(self, lengths: list[int], pos: torch.Tensor | None = None) -> RowsCache:
        """The cache for one decode step of rows 0…len(lengths)−1 at ``lengths`` (tokens each holds before it);
        ``pos``: the same lengths already on the device (a caller's step buffer), so they are not copied again."""
        self.check_lengths(lengths)
        if pos is None:
            pos = torch.tensor(lengths, dtype=torch.long, device=self.device)
        return self._rows.prepare(pos, max(lengths) + 1)

    def static_cache(self, pos: torch.Tensor) -> RowsCache:
        """The cache for a decode step to capture: rows 0…len(pos)−1 at the lengths the device buffer
        ``pos`` will hold at each replay; whole FA buffers are handed to the kernel, which reads up to
        the longest row."""
        return self._rows.prepare(pos, None)

    def reads_own_length(self) -> bool:
        """Whether decode steps read each row's FA keys up to its own length (the Triton path), known
        after the first step; else up to the longest row's."""
        return bool(self._rows._kernel)

    def check_lengths(self, lengths: list[int]) -> None:
        if not 1 <= len(lengths) <= self.num_slots:
            raise ValueError(f"a decode step covers 1 to {self.num_slots} rows, got {len(lengths)}")
        if max(lengths) >= self.max_len:
            raise ValueError(f"a row at {max(lengths)} tokens has no slot left in a pool of {self.max_len}")

    def stored_bytes(self) -> int:
        return self.cache.stored_bytes()

    def slot_bytes(self) -> int:
        return self.stored_bytes() // self.num_slots
