"""Causal or sliding-window attention of one head group over keys held at explicit cache slots.

The one entry point every consa attention path goes through for a head group: it works out which
keys each query sees (the padding mask's columns for the held keys, the causal or sliding band over
the slots), and asks ``select.choose`` for a kernel where the call is of a kind one serves (a plain
sliding-window or causal prefill); everything else is SDPA, with no mask where none is needed (a
decode query over a cache that holds only visible keys). A layer with a soft cap or sink logits
(``softcap_sinks``) takes a kernel that computes them, else the dense math path: never SDPA.
"""

from __future__ import annotations

import torch

from . import select
from .kernels import band, decode_sees_all, sdpa, select_mask_columns
from .plan import KernelConfig, KeySlots
from .softcap_sinks import LogitMods, dense_attention

_DEFAULT = KernelConfig()


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    window: int | None = None,
    sinks: int = 0,
    mask: torch.Tensor | None = None,
    slots: KeySlots = KeySlots(),
    dropout: float = 0.0,
    config: KernelConfig = _DEFAULT,
    mods: LogitMods | None = None,
) -> torch.Tensor:
    """Causal (``window=None``) or sliding-window attention of q [B,Hq,Tq,D] over k, v [B,Hk,Tk,D].

    Queries are the last Tq slots of the sequence (``q_offset = total − Tq``, where total is the
    number of slots the padding mask spans, or the last key slot + 1). ``mask`` is transformers'
    boolean padding+causal mask over all slots [B,1,Tq,total] or None (no padding). ``config``: the
    plan's kernel choice (a forced kernel that cannot run the call raises). ``mods``: the layer's soft
    cap and sink logits (of these query heads), computed by the kernels that take them, else by the
    dense math path.
    """
    tq, tk = q.shape[-2], k.shape[-2]
    total = mask.shape[-1] if mask is not None else slots.offset + (tk - slots.num_sinks)
    q_off = total - tq
    if mask is not None:
        mask = select_mask_columns(mask, slots, tk)
    if mods is not None:
        return _with_mods(q, k, v, scale, window, sinks, mask, slots, total, dropout, config, mods)

    if window is None:
        if mask is None:
            if tq == 1:
                return sdpa(q, k, v, None, False, scale, dropout)
            if tq == tk and slots.is_identity():
                if not dropout and (kernel := select.choose(config, "causal_prefill", q, k, v)):
                    return kernel(q, k, v, scale)
                return sdpa(q, k, v, None, True, scale, dropout)
        # transformers' mask already holds causality; build the band only when there is no mask.
        visible = None if mask is not None else band(q_off, tq, tk, slots, None, 0, q.device)
    else:
        # Decode over a cache that holds only visible keys needs no mask at all.
        if tq == 1 and decode_sees_all(tk, slots, window, sinks, total):
            visible = None
            if mask is None:
                return sdpa(q, k, v, None, False, scale, dropout)
        elif mask is None and tq == tk and slots.is_identity() and (
                kernel := select.choose(config, "swa_prefill", q, k, v, window=window)):
            return kernel(q, k, v, window, sinks, scale)
        else:
            visible = band(q_off, tq, tk, slots, window, sinks, q.device)
    if visible is not None:
        mask = visible if mask is None else (mask & visible)
    return sdpa(q, k, v, mask, False, scale, dropout)


def _with_mods(q, k, v, scale, window, sinks, mask, slots, total, dropout, config, mods: LogitMods):
    """``attention`` for a layer with a soft cap or sink logits: SDPA takes neither, so a plain prefill
    goes to a kernel that computes them (``select.choose`` with ``mods``), anything else to the dense
    math path over the same visibility (band and padding mask) the SDPA path uses."""
    tq, tk = q.shape[-2], k.shape[-2]
    if mask is None and tq == tk > 1 and slots.is_identity() and not dropout:
        if window is None and (kernel := select.choose(config, "causal_prefill", q, k, v, mods=mods)):
            return kernel(q, k, v, scale, **mods.kwargs())
        if window is not None and (kernel := select.choose(config, "swa_prefill", q, k, v, window=window, mods=mods)):
            return kernel(q, k, v, window, sinks, scale, **mods.kwargs())
    if window is not None and tq == 1 and decode_sees_all(tk, slots, window, sinks, total):
        visible = None
    elif window is None and mask is not None:
        visible = None  # transformers' mask already holds causality
    else:
        visible = band(total - tq, tq, tk, slots, window, sinks if window is not None else 0, q.device)
    if visible is not None:
        mask = visible if mask is None else (mask & visible)
    return dense_attention(q, k, v, mask, scale, mods.softcap, mods.sink_logits, dropout)
