"""Attention of a fixed hybrid layer over what its cache holds, and the merge of head groups' outputs.

The caches hand the attention function containers instead of a key tensor (``plan.py``):
:class:`SplitKV` (the eager cache: FA heads at every slot, SWA heads at the slots they still hold),
:class:`GroupedKV` (the same, one part per span group), :class:`RingKV` (the static cache's buffers and
device length in a decode step) and :class:`HeadParts` (the static cache of a multi-span layer). Each
function here runs one of them: the FA and SWA head groups apart (or both in one Triton launch where
``select.choose`` finds it runs), merged into the [B, T, H, D] layout the model wants.
"""

from __future__ import annotations

import torch

from . import select
from .attend import attention
from .kernels import decode_sees_all, overlapped, window_held
from .plan import GroupedKV, HeadParts, KernelConfig, LayerPlan, RingKV, SplitKV, head_selectors, query_selector, take
from .softcap_sinks import LogitMods, attention_weights, mod_kwargs, mods_of_heads
from .triton_decode import MAX_QUERIES, head_tables


# ---- merging head groups -----------------------------------------------------------------------------
def merge_parts(q, parts):
    """Head groups' outputs [B, h, T, D] (with their query-head selectors) into one [B, T, H, D]."""
    b, _, t, d = parts[0][1].shape
    out = torch.empty(b, t, q.shape[1], d, dtype=parts[0][1].dtype, device=parts[0][1].device)
    for sel, part in parts:
        if isinstance(sel, slice):
            out[:, :, sel] = part.transpose(1, 2)
        else:
            out.index_copy_(2, sel.to(out.device), part.transpose(1, 2))
    return out


def merge_two(q, fa_q, out_fa, sw_q, out_sw):
    """Assemble both head groups directly in the [B, T, H, D] layout the model wants (one copy)."""
    if isinstance(fa_q, slice) and isinstance(sw_q, slice) and fa_q.stop == sw_q.start:
        return torch.cat([out_fa.transpose(1, 2), out_sw.transpose(1, 2)], dim=2)
    return merge_parts(q, [(fa_q, out_fa), (sw_q, out_sw)])


def overlapped_groups(plan: LayerPlan, q, run_fa, run_sw):
    """``(run_fa(), run_sw())`` with the SWA heads on a side stream; in a forward of several queries
    the group estimated to take longer gets a high-priority stream (``select.overlap_priority``)."""
    first = None if q.shape[-2] == 1 else select.overlap_priority(plan.kernels, len(plan.fa_kv), len(plan.swa_kv), q.shape[-2], plan.window)
    return overlapped(run_fa, run_sw, {"fa": "main", "swa": "side"}.get(first))


# ---- the eager cache ---------------------------------------------------------------------------------
def split_attention(plan: LayerPlan, q, k: SplitKV, v: SplitKV, mask, scale, mods: LogitMods | None = None):
    """A cached step (decode, drafts, a prompt chunk) over :class:`SplitKV`: both head groups in one
    Triton launch where it runs, else each group on its own kernel (on two streams on CUDA). ``mods``:
    the layer's soft cap / sink logits (``softcap_sinks``), which every path here computes."""
    group = q.shape[1] // (k.fa.shape[1] + k.swa.shape[1])
    fa_q, _ = head_selectors(plan.fa_kv, group) or (None, None)
    sw_q, _ = head_selectors(plan.swa_kv, group) or (None, None)
    if fa_q is not None and sw_q is not None and (kernel := _one_launch_decode(plan, q, k, v, mask, mods)):
        heads = head_tables(plan.num_kv_heads, tuple(plan.fa_kv), q.device)
        return kernel(q, k.fa, v.fa, k.swa, v.swa, heads, scale, mask=mask, swa_sinks=k.swa_slots.num_sinks,
                      swa_offset=k.swa_slots.offset, window=plan.window, sinks=plan.sinks, **mod_kwargs(mods))
    cfg = plan.kernels
    run_sw = lambda: attention(  # noqa: E731
        take(q, sw_q), k.swa, v.swa, scale=scale, mask=mask, window=plan.window, sinks=plan.sinks,
        slots=k.swa_slots, config=cfg, mods=mods_of_heads(mods, sw_q),
    )
    if fa_q is not None and sw_q is not None and (select.decode_overlap(cfg, q) or select.overlap_prefill(cfg, q)):
        # Decode: the SWA heads' small kernel runs on a side stream, beside the FA heads' long read
        # (prefill too, with prefill_overlap).
        run_fa = lambda: attention(take(q, fa_q), k.fa, v.fa, scale=scale, mask=mask, config=cfg,  # noqa: E731
                                   mods=mods_of_heads(mods, fa_q))
        out_fa, out_sw = overlapped_groups(plan, q, run_fa, run_sw)
    else:
        out_fa = attention(take(q, fa_q), k.fa, v.fa, scale=scale, mask=mask, config=cfg,
                           mods=mods_of_heads(mods, fa_q)) if fa_q is not None else None
        out_sw = run_sw() if sw_q is not None else None
    if out_fa is None:
        return out_sw.transpose(1, 2)
    if out_sw is None:
        return out_fa.transpose(1, 2)
    return merge_two(q, fa_q, out_fa, sw_q, out_sw)


def _one_launch_decode(plan: LayerPlan, q, k: SplitKV, v: SplitKV, mask, mods: LogitMods | None = None):
    """The one-launch kernel for both head groups (``KernelConfig.decode``), reading the cache where it
    lies, or None: a decode step (one query, every held key inside the window), or the verification
    of a few drafts (``triton_decode.MAX_QUERIES``; every key a query sees is held, the kernel masks
    the rest). A padding mask must be transformers' boolean [B, 1, Tq, T] (padding and causality)."""
    tq = q.shape[-2]
    if tq > MAX_QUERIES:
        return None
    if mask is not None and (mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[2] != tq
                             or mask.shape[-1] != k.fa.shape[-2]):
        return None
    total = k.fa.shape[-2]  # FA heads hold every slot
    if tq == 1:
        held = decode_sees_all(k.swa.shape[-2], k.swa_slots, plan.window, plan.sinks, total)
    else:
        held = window_held(k.swa.shape[-2], k.swa_slots, plan.window, plan.sinks, total, tq)
    return select.choose(plan.kernels, "decode", q, k.fa, v.fa, k.swa, v.swa, mods=mods) if held else None


def spans_attention(plan: LayerPlan, q, k: GroupedKV, v: GroupedKV, mask, scale, mods: LogitMods | None = None):
    """A cached step of a plan with several spans: the FA heads over every slot, each span group over
    the keys it holds (its own slots), merged. Not the one-launch decode kernel (it takes one window)."""
    group = q.shape[1] // plan.num_kv_heads
    parts = []
    if plan.fa_kv:
        sel_q, _ = head_selectors(plan.fa_kv, group)
        parts.append((sel_q, attention(take(q, sel_q), k.fa, v.fa, scale=scale, mask=mask, config=plan.kernels,
                                       mods=mods_of_heads(mods, sel_q))))
    for (window, heads), (kg, slots), (vg, _) in zip(plan.span_groups, k.groups, v.groups):
        sel_q, _ = head_selectors(heads, group)
        parts.append((sel_q, attention(take(q, sel_q), kg, vg, scale=scale, mask=mask, window=window,
                                       sinks=plan.sinks, slots=slots, config=plan.kernels, mods=mods_of_heads(mods, sel_q))))
    return merge_parts(q, parts)


# ---- the static cache --------------------------------------------------------------------------------
def ring_decode(plan: LayerPlan, q: torch.Tensor, k: RingKV, v: RingKV, mask, scale: float,
                mods: LogitMods | None = None) -> torch.Tensor:
    """One decode query per sequence over a static layer: the Triton kernel where it runs (CUDA, or
    the interpreter with ``KernelConfig.triton_on_cpu``), else dense torch ops masked by the device
    length. ``mask``: None or a boolean padding mask whose last dimension spans at least the slots
    written. Returns [B, 1, Hq, D]."""
    if torch.compiler.is_compiling():  # one opaque op in a compiled step (static_decode below)
        return static_decode(q, k.fa, v.fa, k.swa, v.swa, k.length, mask, plan.num_kv_heads, list(plan.fa_kv),
                             scale, plan.window, plan.sinks, k.ring, plan.kernels.triton_on_cpu,
                             mods and mods.softcap, mods and mods.sink_logits)
    if mask is not None:
        mask = (mask[:, :, -1] if mask.dim() == 4 else mask).reshape(mask.shape[0], mask.shape[-1])
    n_fa, n_sw = k.fa.shape[1], k.swa.shape[1]
    live = [t for t, n in ((k.fa, n_fa), (k.swa, n_sw)) if n]
    if kernel := select.choose(plan.kernels, "static_decode", q, *live, mods=mods):
        heads = head_tables(plan.num_kv_heads, tuple(plan.fa_kv), q.device)
        return kernel(q, k.fa, v.fa, k.swa, v.swa, heads, scale, mask=mask, swa_sinks=plan.sinks, window=plan.window,
                      sinks=plan.sinks, length=k.length, ring=k.ring, **mod_kwargs(mods))
    return dense_ring(plan, q, k, v, mask, scale, mods)


def ring_slots(n: int, length: torch.Tensor, sinks: int, ring: int) -> torch.Tensor:
    """The slot each of the first ``n`` ring indices holds when ``length`` slots are written: index j < S
    holds slot j, else the newest slot ≤ length − 1 congruent to it (on device; −1 where nothing yet)."""
    j = torch.arange(n, device=length.device)
    slot = torch.where(j < sinks, j, j + ring * torch.div(length - 1 - j, ring, rounding_mode="floor"))
    return torch.where(j < length, slot, -1)


def dense_ring(plan: LayerPlan, q, k: RingKV, v: RingKV, mask, scale, mods: LogitMods | None = None):
    """The torch path (CPU without the kernel): softmax over each group's buffer with the slots not
    written, outside the window or padded masked out; device tensors only, like the kernel. ``mods``:
    scores soft-capped, the heads' sink logits one more softmax column (no value)."""
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
        s = (torch.einsum("bhgd,bhtd->bhgt", qq, kk.float()) * scale).view(b, len(heads) * group, 1, -1)
        hm = mods_of_heads(mods, qi)
        p = attention_weights(s, allowed[:, None, None, :], hm and hm.softcap, hm and hm.sink_logits).view(b, len(heads), group, -1)
        o = torch.einsum("bhgt,bhtd->bhgd", p, vv.float()).reshape(b, len(heads) * group, d)
        out.index_copy_(2, qi, o.to(q.dtype)[:, None])
    return out


@torch.library.custom_op("consa::static_decode", mutates_args=())
def static_decode(q: torch.Tensor, k_fa: torch.Tensor, v_fa: torch.Tensor, k_swa: torch.Tensor, v_swa: torch.Tensor,
                  length: torch.Tensor, mask: torch.Tensor | None, num_kv_heads: int, fa_kv: list[int], scale: float,
                  window: int, sinks: int, ring: int, triton_on_cpu: bool, softcap: float | None = None,
                  sink_logits: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`ring_decode` as one opaque op of a compiled decode step (the static cache's write is its
    twin, ``decode_ops.static_write``): one query per sequence [B, Hq, 1, D] over a static layer's
    buffers with ``length`` slots written (a device tensor). Returns [B, 1, Hq, D]."""
    plan = LayerPlan(0, num_kv_heads, window, sinks, "fixed", fa_kv=list(fa_kv), kernels=KernelConfig(triton_on_cpu=triton_on_cpu))
    return ring_decode(plan, q, RingKV(k_fa, k_swa, length, ring), RingKV(v_fa, v_swa, length, ring), mask, scale,
                       LogitMods.of(softcap, sink_logits))


@static_decode.register_fake
def _static_decode_shape(q, k_fa, v_fa, k_swa, v_swa, length, mask, num_kv_heads, fa_kv, scale, window, sinks, ring, triton_on_cpu,
                         softcap=None, sink_logits=None):
    b, hq, tq, d = q.shape
    return q.new_empty(b, tq, hq, d)


def head_parts_attention(plan: LayerPlan, q: torch.Tensor, k: HeadParts, v: HeadParts, mask, scale: float,
                         mods: LogitMods | None = None) -> torch.Tensor:
    """Each part with the single-window path its inner layer's output calls for, merged in [B, T, Hq, D]."""
    group = q.shape[1] // plan.num_kv_heads
    b, _, t, d = q.shape
    out = torch.empty(b, t, q.shape[1], d, dtype=q.dtype, device=q.device)
    for (sub, sel, kp), (_, _, vp) in zip(k.parts, v.parts):
        qsel = query_selector(sel, group, q.device)
        qi, part_mods = take(q, qsel), mods_of_heads(mods, qsel)
        if isinstance(kp, RingKV):
            o = ring_decode(sub, qi, kp, vp, mask, scale, part_mods)
        elif isinstance(kp, SplitKV):
            o = split_attention(sub, qi, kp, vp, mask, scale, part_mods)
        else:  # a part without SWA heads: plain keys
            o = attention(qi, kp, vp, scale=scale, mask=mask, config=sub.kernels, mods=part_mods).transpose(1, 2)
        if isinstance(qsel, slice):
            out[:, :, qsel] = o
        else:
            out.index_copy_(2, qsel, o)
    return out
