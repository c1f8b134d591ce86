"""The ``consa`` attention function, registered with transformers' ``AttentionInterface``.

Each attention module that consa attaches to carries a :class:`LayerPlan` (a plain attribute, not a
submodule, so state dicts stay the model's own). The function reads it and either

* **gate mode** (search): computes full-causal and sliding-window outputs for every head from the
  same q, k, v and mixes them per KV head with the current gate values z:
  ``out = z·FA + (1 − z)·SWA`` (z of a KV head is shared by its query group);
* **fixed mode** (eval/serving): runs FA heads with the causal kernel and SWA heads with the windowed
  kernel, each on its own head group (contiguous after ``models.reorder_heads``), over either a plain
  key tensor or the split keys a :class:`~consa.attention.cache.HybridCache` returns (a decode step
  over the split keys is one Triton launch for both groups, ``triton_decode``). With
  ``kernels.HYBRID_PREFILL`` "fused" (FlexAttention, per-head block mask) or "triton" (the banded
  kernel of ``triton_prefill``, per-head windows) a plain prefill runs both groups in one call
  instead (no split, no merge).

Per-unit spans (issue 16): a plan whose SWA heads differ in window carries ``windows`` (one entry per KV
head, None = FA). Its SWA heads run in span groups, one kernel call per distinct window (the same
split/merge as the two-group case); the "triton" prefill runs the whole layer in one launch with each
head's own window; the hybrid cache returns :class:`GroupedKV`, the static cache
:class:`~consa.attention.static_spans.HeadParts` (one ring per span group). A plan with one window keeps
``windows=None`` and takes exactly the single-window path.

A module without a plan attends fully, so ``attn_implementation="consa"`` alone changes nothing.
Padding survives because the mask interface registered under the same name is transformers' own
SDPA mask (boolean, or None when plain causal; a sliding one comes back causal, see ``consa_mask``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, causal_mask_function, sdpa_mask

from . import kernels, triton_decode, triton_prefill
from .kernels import KeySlots, attention

NAME = "consa"


@dataclass
class SplitKV:
    """Keys (or values) of one layer held apart by head group: FA heads keep every slot, SWA heads
    only what a future query can still see, at ``swa_slots``. Returned by the hybrid cache."""

    fa: torch.Tensor  # [B, n_fa, T, D]
    swa: torch.Tensor  # [B, n_swa, m, D]
    swa_slots: KeySlots


@dataclass
class RingKV:
    """Keys (or values) of one layer of a static hybrid cache (``static_cache``) in a decode step: the
    FA heads' preallocated buffer [B, n_fa, L_max, D], the SWA heads' ring [B, n_swa, S + M, D], and
    the slots written so far as a device tensor, so attention never reads a host length."""

    fa: torch.Tensor
    swa: torch.Tensor
    length: torch.Tensor  # int64 [1], on the device
    ring: int  # M: slot t >= S sits at S + (t - S) mod M


@dataclass
class GroupedKV:
    """Keys (or values) of a layer whose SWA heads differ in span, from the hybrid cache: the FA heads'
    keys [B, n_fa, T, D] and, per span group of the plan (``LayerPlan.span_groups`` order), the keys that
    group holds and their slots."""

    fa: torch.Tensor
    groups: list[tuple[torch.Tensor, KeySlots]]


class GateMix:
    """Gate values shared by all layers during search: ``z`` is [num_layers, num_kv_heads]."""

    def __init__(self) -> None:
        self.z: torch.Tensor | None = None


@dataclass
class LayerPlan:
    layer: int
    num_kv_heads: int
    window: int
    sinks: int = 0
    mode: str = "fixed"  # "fixed" | "gate" | "full"
    fa_kv: list[int] = field(default_factory=list)
    gate_mix: GateMix | None = None
    backend: str = "auto"

    windows: tuple[int | None, ...] | None = None  # per KV head when SWA heads differ in span, else None
    menu: tuple[int | None, ...] | None = None  # gate mode over a span menu (None = full): z is [H_kv, K] weights

    @classmethod
    def from_allocation(cls, alloc, layer: int, backend: str = "auto") -> "LayerPlan":
        """The fixed plan of ``layer`` (a native sliding layer keeps its own window, no sinks). SWA heads
        of one span give today's plan (``windows=None``); several spans fill ``windows``, ``window``
        being the largest."""
        heads = alloc.head_windows(layer)
        swa = [hw for hw in heads if hw is not None]
        spans, sinks = {w for w, _ in swa}, {s for _, s in swa}
        if len(sinks) > 1:
            from ..allocation import AllocationError

            raise AllocationError(f"layer {layer}: its SWA heads mix fixed (native) and searched units; one sink count per layer is served")
        if len(spans) <= 1:
            window, sinks = alloc.layer_window(layer)
            return cls(layer, alloc.shape.num_kv_heads, window, sinks, "fixed", fa_kv=alloc.fa_heads(layer), backend=backend)
        windows = tuple(None if hw is None else hw[0] for hw in heads)
        return cls(layer, alloc.shape.num_kv_heads, max(spans), sinks.pop(), "fixed", fa_kv=alloc.fa_heads(layer),
                   backend=backend, windows=windows)

    @property
    def swa_kv(self) -> list[int]:
        fa = set(self.fa_kv)
        return [h for h in range(self.num_kv_heads) if h not in fa]

    @property
    def multi_span(self) -> bool:
        return self.windows is not None and len({w for w in self.windows if w is not None}) > 1

    @property
    def span_groups(self) -> list[tuple[int, list[int]]]:
        """(window, SWA KV heads) per distinct window, ascending; one group (the plan's window) unless
        ``windows`` says otherwise."""
        if not self.multi_span:
            return [(self.window, self.swa_kv)] if self.swa_kv else []
        return [(w, [h for h, x in enumerate(self.windows) if x == w]) for w in sorted({w for w in self.windows if w is not None})]


def _heads(idx: list[int], group: int, n_total_kv: int):
    """Query-head selector for a list of KV heads: a slice when contiguous (a view), else an index."""
    if not idx:
        return None
    if idx == list(range(idx[0], idx[0] + len(idx))):
        return slice(idx[0] * group, (idx[-1] + 1) * group), slice(idx[0], idx[-1] + 1)
    q_idx = torch.tensor([h * group + j for h in idx for j in range(group)])
    return q_idx, torch.tensor(idx)


def _take(x: torch.Tensor, sel) -> torch.Tensor:
    return x[:, sel] if isinstance(sel, slice) else x.index_select(1, sel.to(x.device))


def consa_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key,
    value,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs,
):
    if softcap is not None:
        raise NotImplementedError("consa attention does not support attention logit soft-capping")
    if attention_mask is not None and attention_mask.dtype != torch.bool:
        raise TypeError("consa attention expects a boolean mask (its registered mask function provides one)")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    dropout = dropout if module.training else 0.0
    plan: LayerPlan | None = getattr(module, "consa_plan", None)
    if plan is None:
        plan = _plan_from_config(module)

    if plan is not None and plan.multi_span and plan.mode != "fixed":
        raise RuntimeError(f"layer {plan.layer}: per-head spans are served in fixed mode only (mode {plan.mode!r})")
    from .static_spans import HeadParts  # imports this module: imported here, not at the top

    if isinstance(key, HeadParts):
        if plan is None or plan.mode != "fixed":
            raise RuntimeError("a hybrid cache needs a fixed allocation on every layer")
        from .static_spans import head_parts_attention

        out = head_parts_attention(plan, query, key, value, attention_mask, scale)
    elif isinstance(key, GroupedKV):
        if plan is None or not plan.multi_span:
            raise RuntimeError("grouped keys from the hybrid cache need a plan with per-head spans")
        out = _spans_split(plan, query, key, value, attention_mask, scale)
    elif isinstance(key, RingKV):
        if plan is None or plan.mode != "fixed":
            raise RuntimeError("a hybrid cache needs a fixed allocation on every layer")
        from .static_cache import ring_decode  # imports this module: imported here, not at the top

        out = ring_decode(plan, query, key, value, attention_mask, scale)
    elif isinstance(key, SplitKV):
        if plan is None or plan.mode != "fixed":
            raise RuntimeError("a hybrid cache needs a fixed allocation on every layer")
        out = _fixed_split(plan, query, key, value, attention_mask, scale)
    elif plan is None and sliding_window is not None:  # a native sliding layer consa was not told about
        out = attention(query, key, value, scale=scale, mask=attention_mask, window=sliding_window, dropout=dropout).transpose(1, 2)
    elif plan is None or plan.mode == "full" or (plan.mode == "fixed" and not plan.swa_kv):
        out = attention(query, key, value, scale=scale, mask=attention_mask, dropout=dropout).transpose(1, 2)
    elif plan.mode == "gate":
        out = _gate_mix(plan, query, key, value, attention_mask, scale, dropout).transpose(1, 2)
    elif plan.multi_span:
        out = _fixed_spans(plan, query, key, value, attention_mask, scale, dropout)
    else:
        out = _fixed(plan, query, key, value, attention_mask, scale, dropout)
    # Paths return [B, T, H, D]; when the merge already wrote that layout, contiguous() is free.
    return out.contiguous(), None


def _plan_from_config(module) -> LayerPlan | None:
    """A head-wise export loaded by plain ``from_pretrained(..., attn_implementation="consa")``
    carries its allocation in the config: build this layer's plan from it once."""
    record = getattr(getattr(module, "config", None), "consa", None)
    if not isinstance(record, dict) or record.get("mode") != "heads" or not hasattr(module, "layer_idx"):
        return None
    from ..allocation import Allocation

    alloc = Allocation.from_dict(record["allocation"])
    plan = LayerPlan.from_allocation(alloc, module.layer_idx)
    module.consa_plan = plan
    return plan


def _gate_mix(plan, q, k, v, mask, scale, dropout):
    """z = None (a teacher pass) is full attention; a span menu mixes one output per option."""
    if plan.gate_mix.z is None:
        return attention(q, k, v, scale=scale, mask=mask, dropout=dropout)
    z = plan.gate_mix.z[plan.layer]  # [H_kv], or [H_kv, K] option weights over plan.menu
    group = q.shape[1] // k.shape[1]
    if plan.menu is not None:
        out = None
        for j, span in enumerate(plan.menu):
            wq = z[:, j].repeat_interleave(group).to(q.dtype).view(1, -1, 1, 1)
            o = attention(q, k, v, scale=scale, mask=mask, dropout=dropout) if span is None else attention(
                q, k, v, scale=scale, mask=mask, window=span, sinks=plan.sinks, dropout=dropout, backend=plan.backend)
            out = wq * o if out is None else out + wq * o
        return out
    zq = z.repeat_interleave(group).to(q.dtype).view(1, -1, 1, 1)
    full = attention(q, k, v, scale=scale, mask=mask, dropout=dropout)
    swa = attention(q, k, v, scale=scale, mask=mask, window=plan.window, sinks=plan.sinks, dropout=dropout, backend=plan.backend)
    return zq * full + (1 - zq) * swa


def _fixed(plan, q, k, v, mask, scale, dropout):
    group = q.shape[1] // k.shape[1]
    if not plan.fa_kv:
        return attention(q, k, v, scale=scale, mask=mask, window=plan.window, sinks=plan.sinks, dropout=dropout, backend=plan.backend).transpose(1, 2)
    fused = _fused_prefill(plan, q, k, v, mask, dropout)
    if fused == "triton":
        return triton_prefill.hybrid(q, k, v, tuple(plan.fa_kv), plan.window, plan.sinks, scale)
    if fused == "fused":
        fa = set(plan.fa_kv)
        heads = tuple(h // group in fa for h in range(q.shape[1]))
        return kernels.flex_hybrid(q, k, v, heads, plan.window, plan.sinks, scale).transpose(1, 2)
    fa_q, fa_k = _heads(plan.fa_kv, group, k.shape[1])
    sw_q, sw_k = _heads(plan.swa_kv, group, k.shape[1])
    run_fa = lambda: attention(_take(q, fa_q), _take(k, fa_k), _take(v, fa_k), scale=scale, mask=mask, dropout=dropout)  # noqa: E731
    run_sw = lambda: attention(  # noqa: E731
        _take(q, sw_q), _take(k, sw_k), _take(v, sw_k), scale=scale, mask=mask,
        window=plan.window, sinks=plan.sinks, dropout=dropout, backend=plan.backend,
    )
    if kernels.overlap_prefill(q):
        out_fa, out_sw = _overlapped_groups(plan, q, run_fa, run_sw)
    else:
        out_fa, out_sw = run_fa(), run_sw()
    return _merge(q, fa_q, out_fa, sw_q, out_sw)


def _fixed_spans(plan, q, k, v, mask, scale, dropout):
    """Fixed mode with SWA heads of several spans: the "triton" prefill in one launch (each KV head its
    own window), else the FA group and one call per span group, merged."""
    if _fused_prefill(plan, q, k, v, mask, dropout) == "triton":
        t = q.shape[-2]
        wins = tuple(t if w is None else w for w in plan.windows)
        return triton_prefill.banded_attention(q, k, v, wins, plan.sinks, scale).transpose(1, 2)
    group = q.shape[1] // k.shape[1]
    parts = []
    if plan.fa_kv:
        sel_q, sel_k = _heads(plan.fa_kv, group, k.shape[1])
        parts.append((sel_q, attention(_take(q, sel_q), _take(k, sel_k), _take(v, sel_k), scale=scale, mask=mask, dropout=dropout)))
    for window, heads in plan.span_groups:
        sel_q, sel_k = _heads(heads, group, k.shape[1])
        parts.append((sel_q, attention(_take(q, sel_q), _take(k, sel_k), _take(v, sel_k), scale=scale, mask=mask,
                                       window=window, sinks=plan.sinks, dropout=dropout, backend=plan.backend)))
    return _merge_parts(q, parts)


def _spans_split(plan, q, k: GroupedKV, v: GroupedKV, mask, scale):
    """A cached step of a plan with several spans: the FA heads over every slot, each span group over
    the keys it holds (its own slots), merged. Not the one-launch decode kernel (it takes one window)."""
    group = q.shape[1] // plan.num_kv_heads
    parts = []
    if plan.fa_kv:
        sel_q, _ = _heads(plan.fa_kv, group, plan.num_kv_heads)
        parts.append((sel_q, attention(_take(q, sel_q), k.fa, v.fa, scale=scale, mask=mask)))
    for (window, heads), (kg, slots), (vg, _) in zip(plan.span_groups, k.groups, v.groups):
        sel_q, _ = _heads(heads, group, plan.num_kv_heads)
        parts.append((sel_q, attention(_take(q, sel_q), kg, vg, scale=scale, mask=mask, window=window,
                                       sinks=plan.sinks, slots=slots, backend=plan.backend)))
    return _merge_parts(q, parts)


def _merge_parts(q, parts):
    """Head groups' outputs [B, h, T, D] (with their query-head selectors) into one [B, T, H, D]."""
    b, _, t, d = parts[0][1].shape
    out = torch.empty(b, t, q.shape[1], d, dtype=parts[0][1].dtype, device=parts[0][1].device)
    for sel, part in parts:
        if isinstance(sel, slice):
            out[:, :, sel] = part.transpose(1, 2)
        else:
            out.index_copy_(2, sel.to(out.device), part.transpose(1, 2))
    return out


def _overlapped_groups(plan, q, run_fa, run_sw):
    """``(run_fa(), run_sw())`` with the SWA heads on a side stream; in a forward of several queries
    the group estimated to take longer gets a high-priority stream (``kernels.overlap_priority``)."""
    first = None if q.shape[-2] == 1 else kernels.overlap_priority(len(plan.fa_kv), len(plan.swa_kv), q.shape[-2], plan.window)
    return kernels.overlapped(run_fa, run_sw, {"fa": "main", "swa": "side"}.get(first))


def _fused_prefill(plan, q, k, v, mask, dropout) -> str | None:
    """The one-call kernel (``kernels.HYBRID_PREFILL`` "fused": FlexAttention, "triton": the banded
    Triton kernel) for a plain prefill (no padding mask, Tq = Tk, inference, a plan on the auto
    backend or that kernel's own), else None: the head groups run apart."""
    kind = kernels.HYBRID_PREFILL
    if kind not in ("fused", "triton") or mask is not None or dropout != 0.0 or not q.shape[-2] == k.shape[-2] > 1:
        return None
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return None
    if kind == "triton":
        return kind if plan.backend in ("auto", "triton") and triton_prefill.usable(q, k, v) else None
    return kind if plan.backend in ("auto", "flex") else None


def _fixed_split(plan, q, k: SplitKV, v: SplitKV, mask, scale):
    group = q.shape[1] // (k.fa.shape[1] + k.swa.shape[1])
    fa_q, _ = _heads(plan.fa_kv, group, plan.num_kv_heads) or (None, None)
    sw_q, _ = _heads(plan.swa_kv, group, plan.num_kv_heads) or (None, None)
    if fa_q is not None and sw_q is not None and _one_launch_decode(plan, q, k, v, mask):
        heads = triton_decode.head_tables(plan.num_kv_heads, tuple(plan.fa_kv), q.device)
        return triton_decode.hybrid_decode(q, k.fa, v.fa, k.swa, v.swa, heads, scale, mask=mask,
                                           swa_sinks=k.swa_slots.num_sinks, swa_offset=k.swa_slots.offset,
                                           window=plan.window, sinks=plan.sinks)
    run_sw = lambda: attention(  # noqa: E731
        _take(q, sw_q), k.swa, v.swa, scale=scale, mask=mask, window=plan.window, sinks=plan.sinks,
        slots=k.swa_slots, backend=plan.backend,
    )
    decode_overlap = q.shape[-2] == 1 and q.is_cuda and kernels.DECODE_OVERLAP
    if fa_q is not None and sw_q is not None and (decode_overlap or kernels.overlap_prefill(q)):
        # Decode: the SWA heads' small kernel runs on a side stream, beside the FA heads' long read
        # (prefill too, with kernels.PREFILL_OVERLAP).
        out_fa, out_sw = _overlapped_groups(plan, q, lambda: attention(_take(q, fa_q), k.fa, v.fa, scale=scale, mask=mask), run_sw)
    else:
        out_fa = attention(_take(q, fa_q), k.fa, v.fa, scale=scale, mask=mask) if fa_q is not None else None
        out_sw = run_sw() if sw_q is not None else None
    if out_fa is None:
        return out_sw.transpose(1, 2)
    if out_sw is None:
        return out_fa.transpose(1, 2)
    return _merge(q, fa_q, out_fa, sw_q, out_sw)


def _one_launch_decode(plan, q, k: SplitKV, v: SplitKV, mask) -> bool:
    """Both head groups in one Triton launch (``kernels.DECODE_KERNEL``), reading the cache where it
    lies: a decode step (one query, every held key inside the window), or the verification of a few
    drafts (``triton_decode.MAX_QUERIES``; every key a query sees is held, the kernel masks the rest).
    A padding mask must be transformers' boolean [B, 1, Tq, T] (padding and causality)."""
    tq = q.shape[-2]
    if kernels.DECODE_KERNEL != "auto" or tq > triton_decode.MAX_QUERIES:
        return False
    if mask is not None and (mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[2] != tq
                             or mask.shape[-1] != k.fa.shape[-2]):
        return False
    total = k.fa.shape[-2]  # FA heads hold every slot
    if tq == 1:
        held = kernels.decode_sees_all(k.swa.shape[-2], k.swa_slots, plan.window, plan.sinks, total)
    else:
        held = kernels.window_held(k.swa.shape[-2], k.swa_slots, plan.window, plan.sinks, total, tq)
    return held and triton_decode.usable(q, k.fa, v.fa, k.swa, v.swa)


def _merge(q, fa_q, out_fa, sw_q, out_sw):
    """Assemble both head groups directly in the [B, T, H, D] layout the model wants (one copy)."""
    if isinstance(fa_q, slice) and isinstance(sw_q, slice) and fa_q.stop == sw_q.start:
        return torch.cat([out_fa.transpose(1, 2), out_sw.transpose(1, 2)], dim=2)
    return _merge_parts(q, [(fa_q, out_fa), (sw_q, out_sw)])


def consa_mask(*args, mask_function=None, local_size=None, **kwargs):
    """transformers' SDPA mask, but a sliding mask it asks for (a model's native sliding layers) comes
    back plain causal: windows are the plans' business, per layer and head, so a native layer that
    consa reopens really sees everything on its FA heads (a layer without a plan applies its module's
    ``sliding_window`` itself, see ``consa_attention``)."""
    if local_size is not None:
        mask_function = causal_mask_function
    return sdpa_mask(*args, mask_function=mask_function or causal_mask_function, **kwargs)


def register() -> None:
    """Register the attention and mask functions under the name ``consa`` (idempotent)."""
    AttentionInterface.register(NAME, consa_attention)
    AttentionMaskInterface.register(NAME, consa_mask)


register()
