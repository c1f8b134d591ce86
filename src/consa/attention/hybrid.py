"""The ``consa`` attention function, registered with transformers' ``AttentionInterface``.

Each attention module that consa attaches to carries a :class:`~consa.attention.plan.LayerPlan` (a
plain attribute, not a submodule, so state dicts stay the model's own). The function reads it and either

* **gate mode** (search): computes full-causal and sliding-window outputs for every head from the
  same q, k, v and mixes them per KV head with the current gate values z:
  ``out = z·FA + (1 − z)·SWA`` (z of a KV head is shared by its query group);
* **fixed mode** (eval/serving): runs FA heads with the causal kernel and SWA heads with the windowed
  kernel, each on its own head group (contiguous after ``models.reorder_heads``), over either a plain
  key tensor or the containers a cache returns (``cached.py``; a decode step over the eager cache's
  split keys is one Triton launch for both groups). With ``KernelConfig.hybrid_prefill`` "fused"
  (FlexAttention, per-head block mask) or "triton" (the banded kernel of ``triton_prefill``, per-head
  windows) a plain prefill runs both groups in one call instead (no split, no merge).

Per-unit spans: a plan whose SWA heads differ in window carries ``windows`` (one entry per KV head,
None = FA). Its SWA heads run in span groups, one kernel call per distinct window (the same
split/merge as the two-group case); the "triton" prefill runs the whole layer in one launch with each
head's own window; the hybrid cache returns :class:`GroupedKV`, the static cache :class:`HeadParts`
(one ring per span group). A plan with one window keeps ``windows=None`` and takes exactly the
single-window path.

Which kernel runs each call is the plan's :class:`KernelConfig`, read through ``select.choose``.
A module without a plan attends fully, so ``attn_implementation="consa"`` alone changes nothing.
Padding survives because the mask interface registered under the same name is transformers' own
SDPA mask (boolean, or None when plain causal; a sliding one comes back causal, see ``consa_mask``).
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, causal_mask_function, sdpa_mask

from ..allocation import Allocation
from ..errors import ConsaError
from . import select, triton_prefill
from .attend import attention
from .cached import head_parts_attention, merge_parts, merge_two, overlapped_groups, ring_decode, spans_attention, split_attention
from .plan import GroupedKV, HeadParts, LayerPlan, RingKV, SplitKV, head_selectors, take
from .softcap_sinks import LogitMods, mod_kwargs, mods_of_heads

NAME = "consa"


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
    s_aux: torch.Tensor | None = None,
    **kwargs,
):
    # Gemma2's soft cap and gpt-oss's learned sink logits (``s_aux``, one per query head): every path
    # below computes them (``softcap_sinks``); None when the layer has neither.
    mods = LogitMods.of(softcap, s_aux)
    if attention_mask is not None and attention_mask.dtype != torch.bool:
        raise ConsaError(f"consa attention needs transformers' boolean mask; {type(module).__name__} passes a "
                         f"{attention_mask.dtype} mask of its own (an additive bias consa's kernels do not apply)")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    dropout = dropout if module.training else 0.0
    plan: LayerPlan | None = getattr(module, "consa_plan", None)
    if plan is None:
        plan = _plan_from_config(module)

    if plan is not None and plan.multi_span and plan.mode != "fixed":
        raise RuntimeError(f"layer {plan.layer}: per-head spans are served in fixed mode only (mode {plan.mode!r})")

    if isinstance(key, HeadParts):
        if plan is None or plan.mode != "fixed":
            raise RuntimeError("a hybrid cache needs a fixed allocation on every layer")
        out = head_parts_attention(plan, query, key, value, attention_mask, scale, mods)
    elif isinstance(key, GroupedKV):
        if plan is None or not plan.multi_span:
            raise RuntimeError("grouped keys from the hybrid cache need a plan with per-head spans")
        out = spans_attention(plan, query, key, value, attention_mask, scale, mods)
    elif isinstance(key, RingKV):
        if plan is None or plan.mode != "fixed":
            raise RuntimeError("a hybrid cache needs a fixed allocation on every layer")
        out = ring_decode(plan, query, key, value, attention_mask, scale, mods)
    elif isinstance(key, SplitKV):
        if plan is None or plan.mode != "fixed":
            raise RuntimeError("a hybrid cache needs a fixed allocation on every layer")
        out = split_attention(plan, query, key, value, attention_mask, scale, mods)
    elif plan is None and sliding_window is not None:  # a native sliding layer consa was not told about
        out = attention(query, key, value, scale=scale, mask=attention_mask, window=sliding_window, dropout=dropout,
                        mods=mods).transpose(1, 2)
    elif plan is None:
        out = attention(query, key, value, scale=scale, mask=attention_mask, dropout=dropout, mods=mods).transpose(1, 2)
    elif plan.mode == "full" or (plan.mode == "fixed" and not plan.swa_kv):
        out = attention(query, key, value, scale=scale, mask=attention_mask, dropout=dropout, config=plan.kernels,
                        mods=mods).transpose(1, 2)
    elif plan.mode == "gate":
        out = _gate_mix(plan, query, key, value, attention_mask, scale, dropout, mods).transpose(1, 2)
    elif plan.multi_span:
        out = _fixed_spans(plan, query, key, value, attention_mask, scale, dropout, mods)
    else:
        out = _fixed(plan, query, key, value, attention_mask, scale, dropout, mods)
    # Paths return [B, T, H, D]; when the merge already wrote that layout, contiguous() is free.
    return out.contiguous(), None


def _plan_from_config(module) -> LayerPlan | None:
    """A head-wise export loaded by plain ``from_pretrained(..., attn_implementation="consa")``
    carries its allocation in the config: build this layer's plan from it once."""
    record = getattr(getattr(module, "config", None), "consa", None)
    if not isinstance(record, dict) or record.get("mode") != "heads" or not hasattr(module, "layer_idx"):
        return None
    alloc = Allocation.from_dict(record["allocation"])
    layers = record.get("layers")  # rows cover the attention layers only when the decoder has others
    plan = LayerPlan.from_allocation(alloc, module.layer_idx if layers is None else layers.index(module.layer_idx))
    module.consa_plan = plan
    return plan


def _gate_mix(plan, q, k, v, mask, scale, dropout, mods=None):
    """z = None (a teacher pass) is full attention; a span menu mixes one output per option."""
    cfg = plan.kernels
    if plan.gate_mix.z is None:
        return attention(q, k, v, scale=scale, mask=mask, dropout=dropout, config=cfg, mods=mods)
    z = plan.gate_mix.z[plan.layer]  # [H_kv], or [H_kv, K] option weights over plan.menu
    group = q.shape[1] // k.shape[1]
    if plan.menu is not None:
        out = None
        for j, span in enumerate(plan.menu):
            wq = z[:, j].repeat_interleave(group).to(q.dtype).view(1, -1, 1, 1)
            o = attention(q, k, v, scale=scale, mask=mask, dropout=dropout, config=cfg, mods=mods) if span is None else attention(
                q, k, v, scale=scale, mask=mask, window=span, sinks=plan.sinks, dropout=dropout, config=cfg, mods=mods)
            out = wq * o if out is None else out + wq * o
        return out
    zq = z.repeat_interleave(group).to(q.dtype).view(1, -1, 1, 1)
    full = attention(q, k, v, scale=scale, mask=mask, dropout=dropout, config=cfg, mods=mods)
    swa = attention(q, k, v, scale=scale, mask=mask, window=plan.window, sinks=plan.sinks, dropout=dropout, config=cfg, mods=mods)
    return zq * full + (1 - zq) * swa


def _fixed(plan, q, k, v, mask, scale, dropout, mods=None):
    group = q.shape[1] // k.shape[1]
    cfg = plan.kernels
    if not plan.fa_kv:
        return attention(q, k, v, scale=scale, mask=mask, window=plan.window, sinks=plan.sinks, dropout=dropout, config=cfg,
                         mods=mods).transpose(1, 2)
    if kernel := _one_call_prefill(plan, q, k, v, mask, dropout, mods):
        if cfg.hybrid_prefill == "triton":
            return kernel(q, k, v, tuple(plan.fa_kv), plan.window, plan.sinks, scale, **mod_kwargs(mods))
        fa = set(plan.fa_kv)
        heads = tuple(h // group in fa for h in range(q.shape[1]))
        return kernel(q, k, v, heads, plan.window, plan.sinks, scale, **mod_kwargs(mods)).transpose(1, 2)
    fa_q, fa_k = head_selectors(plan.fa_kv, group)
    sw_q, sw_k = head_selectors(plan.swa_kv, group)
    run_fa = lambda: attention(take(q, fa_q), take(k, fa_k), take(v, fa_k), scale=scale, mask=mask, dropout=dropout, config=cfg,  # noqa: E731
                               mods=mods_of_heads(mods, fa_q))
    run_sw = lambda: attention(  # noqa: E731
        take(q, sw_q), take(k, sw_k), take(v, sw_k), scale=scale, mask=mask,
        window=plan.window, sinks=plan.sinks, dropout=dropout, config=cfg, mods=mods_of_heads(mods, sw_q),
    )
    if select.overlap_prefill(cfg, q):
        out_fa, out_sw = overlapped_groups(plan, q, run_fa, run_sw)
    else:
        out_fa, out_sw = run_fa(), run_sw()
    return merge_two(q, fa_q, out_fa, sw_q, out_sw)


def _fixed_spans(plan, q, k, v, mask, scale, dropout, mods=None):
    """Fixed mode with SWA heads of several spans: the "triton" prefill in one launch (each KV head its
    own window), else the FA group and one call per span group, merged."""
    cfg = plan.kernels
    if cfg.hybrid_prefill == "triton" and _one_call_prefill(plan, q, k, v, mask, dropout, mods):
        t = q.shape[-2]
        wins = tuple(t if w is None else w for w in plan.windows)
        return triton_prefill.banded_attention(q, k, v, wins, plan.sinks, scale, **mod_kwargs(mods)).transpose(1, 2)
    group = q.shape[1] // k.shape[1]
    parts = []
    if plan.fa_kv:
        sel_q, sel_k = head_selectors(plan.fa_kv, group)
        parts.append((sel_q, attention(take(q, sel_q), take(k, sel_k), take(v, sel_k), scale=scale, mask=mask, dropout=dropout, config=cfg,
                                       mods=mods_of_heads(mods, sel_q))))
    for window, heads in plan.span_groups:
        sel_q, sel_k = head_selectors(heads, group)
        parts.append((sel_q, attention(take(q, sel_q), take(k, sel_k), take(v, sel_k), scale=scale, mask=mask,
                                       window=window, sinks=plan.sinks, dropout=dropout, config=cfg, mods=mods_of_heads(mods, sel_q))))
    return merge_parts(q, parts)


def _one_call_prefill(plan, q, k, v, mask, dropout, mods=None):
    """The one-call kernel of ``KernelConfig.hybrid_prefill`` ("fused": FlexAttention, "triton": the
    banded Triton kernel) for a plain inference prefill (no padding mask, Tq = Tk, no dropout, no
    gradient), else None: the head groups run apart."""
    if plan.kernels.hybrid_prefill == "split" or mask is not None or dropout != 0.0 or not q.shape[-2] == k.shape[-2] > 1:
        return None
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return None
    return select.choose(plan.kernels, "hybrid_prefill", q, k, v, mods=mods)


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
