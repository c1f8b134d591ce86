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
(``consa.generate``); otherwise :func:`reference_attention` below does, in plain PyTorch, and keeps the
savings: SWA heads hold their sinks and the window's last W − 1 slots only (:class:`ReferenceHybridCache`
for plain ``generate``, :class:`ReferenceHybridStaticCache` for ``cache_implementation="static"``, whose
fixed shapes let transformers compile the decode step); attention goes in blocks of query rows over the
keys in range (never a score matrix over every query and key), or through FlexAttention for a whole
unpadded prompt on CUDA. The allocation is read from the config key ``consa`` (written by ``consa
export``). Pure PyTorch + transformers; this file must not import consa outside the ``try`` below.
"""

from __future__ import annotations

import importlib
import os
import re
import warnings
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import transformers
from transformers import AttentionInterface, DynamicCache, StaticCache
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
    """Keys (or values) of one layer of a :class:`ReferenceHybridCache` (or of its static twin): the FA
    heads' at every slot, each span group's (``span_groups`` order) at its own slots only (sinks and its
    window's tail), ``total`` slots so far. ``swa_slots`` may hold -1 for an empty slot (static ring);
    ``q_pos``: the new queries' slots when they are not the last ones of ``total`` (static cache)."""

    fa: torch.Tensor  # [B, n_fa, total, D]
    swa: list  # per span group: [B, n_g, m_g, D]
    swa_slots: list  # per span group: [m_g] int64
    total: int
    q_pos: torch.Tensor | None = None


# Attention is computed in blocks of query rows so that no score matrix spans every (query, key) pair:
# a block holds at most about BLOCK_ELEMENTS fp32 scores (and at most MAX_BLOCK_ROWS rows), over the keys
# its rows can see only (an SWA group: the sinks and the block's window range). Small problems (decode,
# a short prompt) take one block without any host sync, so a compiled decode step traces cleanly.
BLOCK_ELEMENTS = 1 << 24
MAX_BLOCK_ROWS = 512


def _attend_block(q, k, v, k_pos, q_pos, mask, window, sinks, scale, softcap, sink_logits):
    """Dense attention of the query rows ``q`` [B, Hq, tq, D] over ``k``/``v`` [B, Hk, n, D] held at slots
    ``k_pos`` [n] (-1: empty slot); ``mask``: transformers' mask with its rows for these queries and its
    columns indexed by slot, or None (causal). GQA by broadcasting (no repeated keys), fp32."""
    b, hq, tq, d = q.shape
    hk, n = k.shape[1], k.shape[-2]
    group = hq // hk
    qf = q.float().reshape(b, hk, group * tq, d)  # query head j·group + i belongs to KV head j
    scores = torch.matmul(qf, k.float().transpose(-1, -2)).view(b, hq, tq, n) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    if mask is None:
        allowed = (k_pos[None, :] <= q_pos[:, None])[None, None]
    else:  # transformers' boolean mask (or an additive one: 0 where allowed), columns = slots
        allowed = mask.index_select(-1, k_pos.clamp(min=0))
        allowed = allowed if allowed.dtype == torch.bool else allowed == 0
    allowed = allowed & (k_pos >= 0)
    if window is not None:
        allowed = allowed & (((q_pos[:, None] - k_pos[None, :]) < window) | (k_pos[None, :] < sinks))
    scores = scores.masked_fill(~allowed, float("-inf"))
    if sink_logits is not None:  # the sink's column joins the softmax, then goes (it has no value)
        sink = sink_logits.float().view(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
        probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    else:
        probs = torch.softmax(scores, dim=-1)
    probs = probs.nan_to_num(0.0).view(b, hk, group * tq, n)  # a row with nothing allowed (padding): zeros
    return torch.matmul(probs, v.float()).view(b, hq, tq, -1)


def _attend(q, k, v, k_pos, q_pos, mask, window, sinks, scale, softcap=None, sink_logits=None):
    """Attention of q [B, Hq, tq, D] over k, v [B, Hk, n, D] held at slots ``k_pos``; ``window`` None =
    causal. ``softcap``: scores become cap·tanh(score / cap) (Gemma2); ``sink_logits``: one more softmax
    logit per query head, with no value (gpt-oss). ``mask``: [B|1, 1, tq|1, slots] or None.

    Exact, in blocks of query rows: each block sees only the keys its rows may attend (slots up to its
    last query, or up to the last column its mask allows; an SWA group: its sinks and the block's window
    range), so the peak extra memory is O(rows × keys in range), never O(tq × n)."""
    b, hq, tq, _ = q.shape
    n = k.shape[-2]
    if tq == 1 or b * hq * tq * n <= BLOCK_ELEMENTS:
        return _attend_block(q, k, v, k_pos, q_pos, mask, window, sinks, scale, softcap, sink_logits)
    pos = k_pos.cpu()
    if bool((pos[1:] < pos[:-1]).any()):  # a static ring: order its slots once
        order = torch.argsort(k_pos)
        k, v, k_pos, pos = k.index_select(2, order), v.index_select(2, order), k_pos[order], pos[order.cpu()]
    qp = q_pos.cpu()
    in_range = n if window is None else min(n, MAX_BLOCK_ROWS + window + sinks)
    rows = max(1, min(MAX_BLOCK_ROWS, BLOCK_ELEMENTS // (b * hq * max(1, in_range))))
    out = q.new_empty(*q.shape[:-1], v.shape[-1], dtype=torch.float32)
    mask_rows = mask is not None and mask.shape[-2] > 1
    for r0 in range(0, tq, rows):
        r1 = min(tq, r0 + rows)
        m = None if mask is None else (mask[..., r0:r1, :] if mask_rows else mask)
        last = int(qp[r0:r1].max())
        if m is not None:  # a mask may open later slots (bidirectional spans): keep every column it allows
            cols = (m if m.dtype == torch.bool else m == 0).flatten(0, -2).any(0).nonzero()
            if cols.numel():
                last = max(last, int(cols.max()))
        hi = int(torch.searchsorted(pos, torch.tensor(last), right=True))
        if window is None:
            keep = slice(0, hi)
        else:
            lo = int(torch.searchsorted(pos, torch.tensor(int(qp[r0:r1].min()) - window + 1)))
            sink_hi = min(lo, int(torch.searchsorted(pos, torch.tensor(sinks))))
            keep = slice(lo, hi) if sink_hi == 0 else None
            if keep is None:
                idx = torch.cat([torch.arange(sink_hi), torch.arange(lo, max(lo, hi))]).to(k.device)
        if keep is not None:
            kb, vb, kp = k[..., keep, :], v[..., keep, :], k_pos[keep]
        else:
            kb, vb, kp = k.index_select(2, idx), v.index_select(2, idx), k_pos.index_select(0, idx)
        out[:, :, r0:r1] = _attend_block(q[:, :, r0:r1], kb, vb, kp, q_pos[r0:r1], m, window, sinks, scale,
                                         softcap, sink_logits)
    return out


# FlexAttention (torch's block-sparse attention) serves a whole unpadded prompt on CUDA: the causal,
# window and sink pattern as a BlockMask (blocks nobody sees are skipped), softcap as a score_mod, sink
# logits from the log-sum-exp. None: on CUDA when torch has it; False: never; True: also elsewhere
# (uncompiled there, for tests); the environment variable CONSA_EXPORT_FLEX=0 / 1 sets it. Any failure
# falls back to the blocked path, once and for all.
USE_FLEX = {"0": False, "1": True}.get(os.environ.get("CONSA_EXPORT_FLEX", ""))
_FLEX: dict = {}


def _flex_functions():
    if "fns" not in _FLEX:
        try:
            from torch.nn.attention import flex_attention as fx

            compiled = torch.compile(fx.flex_attention, dynamic=False) if torch.cuda.is_available() else None
            _FLEX["fns"] = (fx.create_block_mask, fx.flex_attention, compiled, getattr(fx, "AuxRequest", None))
        except Exception:  # noqa: BLE001 - a torch without FlexAttention: the blocked path serves
            _FLEX["fns"] = None
    return _FLEX["fns"]


def _flex_attend(q, k, v, window, sinks, scale, softcap, sink_logits):
    """Causal (or windowed with ``sinks``) attention of a whole prompt: q [B, Hq, T, D] over k, v
    [B, Hk, T, D] at slots 0 … T − 1, no padding. fp32 out, or None where FlexAttention cannot serve."""
    fns = _flex_functions()
    if fns is None or k.shape[-2] != q.shape[-2] or q.dtype != k.dtype:
        return None
    create_block_mask, flex, compiled, aux_request = fns
    t = q.shape[-2]
    if window is None:
        def mask_mod(b, h, qi, ki):
            return ki <= qi
    else:
        def mask_mod(b, h, qi, ki):
            return (ki <= qi) & ((qi - ki < window) | (ki < sinks))
    score_mod = None
    if softcap is not None:
        def score_mod(score, b, h, qi, ki):
            return softcap * torch.tanh(score / softcap)
    try:
        cuda = q.is_cuda and compiled is not None
        block_mask = create_block_mask(mask_mod, None, None, t, t, device=q.device, _compile=cuda)
        kw = dict(score_mod=score_mod, block_mask=block_mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
        fn = compiled if cuda else flex
        if aux_request is not None:
            out, aux = fn(q, k, v, return_aux=aux_request(lse=True), **kw)
            lse = aux.lse
        else:
            out, lse = fn(q, k, v, return_lse=True, **kw)
    except Exception as e:  # noqa: BLE001 - an unsupported shape or build: the blocked path serves
        _FLEX["fns"] = None
        warnings.warn(f"FlexAttention failed ({type(e).__name__}: {e}); using the blocked attention", stacklevel=2)
        return None
    out = out.float()
    if sink_logits is not None:  # the sink's share of the softmax: out · e^lse / (e^lse + e^sink)
        out = out * torch.sigmoid(lse.float() - sink_logits.float().view(1, -1, 1))[..., None]
    return out


def _head_spec(module, fa_kv, wins, device):
    """[(KV heads, window)] of the FA heads then each span group, as index tensors on ``device``; cached."""
    cache = getattr(module, "_consa_reference_spec", None)
    if cache is None:
        cache = {}
        if not isinstance(module, SimpleNamespace):
            module._consa_reference_spec = cache
    if device not in cache:
        spec = [([h for h, b in enumerate(fa_kv.tolist()) if b], None)] + [(heads, w) for w, heads in span_groups(wins)]
        cache[device] = [(torch.tensor(heads, dtype=torch.long, device=device), w) for heads, w in spec]
    return cache[device]


def reference_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                        sliding_window=None, softcap=None, **kwargs):
    """Per-head hybrid attention: FA heads see every earlier slot, SWA heads the last ``window`` slots of
    their own (self included) plus the first ``sinks`` slots. Slots are cache positions, as in
    transformers' own sliding window; ``attention_mask`` is transformers' boolean (or additive) mask, or
    None when plain causal. GQA: a KV head's window holds for its whole query group. ``key``/``value``
    are tensors holding every slot, or :class:`HeldKV` from the reference caches. ``softcap`` (Gemma2)
    and ``s_aux`` (gpt-oss: a learned sink logit per query head) are computed as the family's own
    eager attention does. Exact and memory-bounded: query rows go in blocks, each over the keys it may
    see only (:func:`_attend`)."""
    sink_logits = kwargs.get("s_aux")
    if dropout and module.training:
        raise NotImplementedError("the shipped consa attention is for inference (no attention dropout)")
    fa_kv, _, sinks, wins = layer_plan(module)
    b, h, tq, d = query.shape
    scale = d**-0.5 if scaling is None else scaling
    group, dev = h // fa_kv.numel(), query.device
    spec = _head_spec(module, fa_kv, wins, dev)
    offsets = torch.arange(group, device=dev)
    if not isinstance(key, torch.Tensor):  # HeldKV, maybe of another load of this file (each export loads its own)
        total, mask = key.total, attention_mask
        q_pos = getattr(key, "q_pos", None)
        groups = [(spec[0][0], key.fa, value.fa, torch.arange(key.fa.shape[-2], device=dev), None)]
        groups += [(idx, kg, vg, slots.to(dev), w) for (idx, w), kg, vg, slots in zip(spec[1:], key.swa, value.swa, key.swa_slots)]
    else:  # every slot held (or a transformers sliding layer's contiguous tail): local slots
        total, q_pos = key.shape[-2], None
        mask = None if attention_mask is None else attention_mask[..., -total:]
        k_pos = torch.arange(total, device=dev)
        groups = [(idx, key.index_select(1, idx), value.index_select(1, idx), k_pos, w) for idx, w in spec]
    if q_pos is None:
        q_pos = torch.arange(total - tq, total, device=dev)
    # a whole unpadded prompt (every key at slots 0 … tq − 1) may go through FlexAttention
    flex = (query.is_cuda if USE_FLEX is None else USE_FLEX) and tq > 1 and mask is None and total == tq
    out = query.new_empty(b, h, tq, d, dtype=torch.float32)
    for idx, k, v, k_pos, w in groups:
        if idx.numel():
            qi = (idx[:, None] * group + offsets).flatten()
            q, sl = query.index_select(1, qi), None if sink_logits is None else sink_logits.index_select(0, qi)
            o = _flex_attend(q, k, v, w, sinks, scale, softcap, sl) if flex and k.shape[-2] == tq else None
            out[:, qi] = o if o is not None else _attend(q, k, v, k_pos, q_pos, mask, w, sinks, scale, softcap, sl)
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


class ReferenceHybridStaticLayer(CacheLayerMixin):
    """One layer of :class:`ReferenceHybridStaticCache`, fixed shapes for transformers' static / compiled
    decode: FA heads ``max_cache_len`` slots written by ``index_copy_`` at the cache position, each span
    group of SWA heads a ring of ``sinks + window − 1`` slots (the sinks, then the window's tail: all a
    later query can see, as :class:`ReferenceHybridLayer` keeps), written in place without host sync.
    ``update`` returns the ring as it was plus the new keys, so a prefill longer than the ring attends
    exactly; ``cumulative_length`` is a tensor, as in transformers' ``StaticLayer``."""

    is_compileable = True
    is_sliding = False

    def __init__(self, fa_kv: torch.Tensor, window: int, sinks: int, wins: tuple | None = None, max_cache_len: int = 0):
        super().__init__()
        if wins is None:
            wins = tuple(None if b else window for b in fa_kv.tolist())
        self.fa_idx = fa_kv.nonzero().flatten()
        self.groups = [(w, torch.tensor(heads)) for w, heads in span_groups(wins)]
        self.window, self.sinks, self.max_cache_len = window, sinks, max_cache_len
        self.cumulative_length = torch.tensor(0, dtype=torch.long)

    def ring(self, w: int) -> int:
        """Slots of a span group of window ``w``: the sinks and the window's last w − 1 (at least one)."""
        return self.sinks + max(w - 1, 1)

    def lazy_initialization(self, key_states, value_states) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        b, d, dv = key_states.shape[0], key_states.shape[-1], value_states.shape[-1]
        self.fa_idx = self.fa_idx.to(self.device)
        self.groups = [(w, idx.to(self.device)) for w, idx in self.groups]
        sizes = [(self.fa_idx.numel(), self.max_cache_len)] + [(idx.numel(), self.ring(w)) for w, idx in self.groups]
        self.keys = [torch.zeros(b, nh, m, d, dtype=self.dtype, device=self.device) for nh, m in sizes]
        self.values = [torch.zeros(b, nh, m, dv, dtype=value_states.dtype, device=self.device) for nh, m in sizes]
        self.ring_slots = [torch.full((self.ring(w),), -1, dtype=torch.long, device=self.device) for w, _ in self.groups]
        self.cumulative_length = self.cumulative_length.to(self.device)
        if not _compiling():  # fixed addresses: no recompilation or cudagraph skip for in-place writes
            for t in self.keys + self.values + self.ring_slots + [self.cumulative_length]:
                torch._dynamo.mark_static_address(t)
        self.is_initialized = True

    def _ring_sources(self, first, n: int, w: int):
        """(new token feeding each ring slot, whether one does) when tokens ``first`` … ``first + n − 1``
        arrive (``first`` a 0-d tensor): slot j < sinks holds position j, slot sinks + r the latest position
        p ≥ sinks with (p − sinks) mod (w − 1) = r. No host sync, no duplicate writes."""
        s, m = self.sinks, max(w - 1, 1)
        j = torch.arange(self.ring(w), device=self.device)
        last = first + (n - 1)
        p = torch.where(j < s, j, last - torch.remainder(last - j, m))
        ok = (p >= first) & (p <= last) & ((j < s) | (p >= s))
        return (p - first).clamp(0, n - 1), ok

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[-2]
        first = self.cumulative_length.clone()
        pos = torch.arange(n, device=self.device) + first
        self.cumulative_length.add_(n)
        out = []
        sources = [self._ring_sources(first, n, w) for w, _ in self.groups]
        # an eager prefill into an empty cache (one sync, never in the compiled decode step) attends the
        # prompt alone: slots 0 … n − 1, no empty ring slots (FlexAttention may serve it on CUDA)
        prompt = n > 1 and not _compiling() and int(first) == 0
        new_slots = [pos if prompt else torch.cat([held, pos]) for held in self.ring_slots]
        for held, x in ((self.keys, key_states), (self.values, value_states)):
            held[0].index_copy_(2, pos, x.index_select(1, self.fa_idx))
            swa = []
            for g, ((_, idx), (src, ok)) in enumerate(zip(self.groups, sources)):
                new = x.index_select(1, idx)
                swa.append(new if prompt else torch.cat([held[g + 1], new], dim=-2))  # a copy: the ring is written below
                held[g + 1].copy_(torch.where(ok[:, None], new.index_select(2, src), held[g + 1]))
            if prompt:
                out.append(HeldKV(held[0][..., :n, :], swa, new_slots, n))
            else:
                out.append(HeldKV(held[0], swa, new_slots, self.max_cache_len, pos))
        for slots, (src, ok) in zip(self.ring_slots, sources):
            slots.copy_(torch.where(ok, pos.index_select(0, src), slots))
        return out[0], out[1]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.max_cache_len, 0

    def get_seq_length(self) -> int:
        return self.cumulative_length if self.is_initialized else 0

    def get_max_length(self) -> int:
        return self.max_cache_len

    def reset(self) -> None:
        if self.is_initialized:
            for t in self.keys + self.values:
                t.zero_()
            for t in self.ring_slots:
                t.fill_(-1)
        self.cumulative_length.zero_()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.is_initialized:
            beam_idx = beam_idx.to(self.device)
            for held in (self.keys, self.values):
                for t in held:
                    t.copy_(t.index_select(0, beam_idx))

    def stored_elements(self) -> int:
        return sum(t.numel() for t in self.keys + self.values) if self.is_initialized else 0


def _compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and compiler.is_compiling())


class ReferenceHybridStaticCache(Cache):
    """The per-head hybrid KV cache with fixed shapes (``cache_implementation="static"`` without consa):
    FA heads ``max_cache_len`` slots, SWA heads a ring of sinks + window − 1; compileable. Other layers
    (linear attention, convolutions) get what transformers' own static cache gives them."""

    def __init__(self, config, max_cache_len: int):
        record = config.consa
        rows = record.get("layers") or list(range(len(record["allocation"]["fa"])))
        layers = [None] * len(rows)
        if record.get("layers") is not None:
            layers = list(StaticCache(config=config, max_cache_len=max_cache_len).layers)
        for i in rows:
            plan = layer_plan(SimpleNamespace(config=config, layer_idx=i))
            layers[i] = ReferenceHybridStaticLayer(*plan, max_cache_len=max_cache_len)
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
        text = self.config.get_text_config(decoder=True)
        for k in CACHE_KEYS:
            if not brought and type(model_kwargs.get(k)) is DynamicCache:
                model_kwargs[k] = hybrid_cache(text)
            elif not brought and not HAVE_CONSA and type(model_kwargs.get(k)) is StaticCache:
                # cache_implementation="static": the per-head static cache, as large as transformers' one
                model_kwargs[k] = ReferenceHybridStaticCache(text, model_kwargs[k].get_max_length())
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
