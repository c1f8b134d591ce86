"""A dense per-head-mask reference attention, registered as ``consa_reference`` for model-level tests.

It reads the same LayerPlan as consa's attention but builds the full [B, Hq, Tq, Tk] boolean mask
by hand (causal for FA heads, window/sinks for SWA heads, AND the padding mask) and runs float64
softmax: an independent path to compare every consa kernel choice against.
"""

import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

from consa.attention.kernels import reference_attention

NAME = "consa_reference"


def per_head_allowed(fa_q: list[bool], tq: int, tk: int, window: int, sinks: int, pad_mask, device):
    q = torch.arange(tk - tq, tk, device=device)[:, None]
    k = torch.arange(tk, device=device)[None, :]
    causal = k <= q
    swa = causal & ((q - k < window) | (k < sinks))
    allowed = torch.stack([causal if f else swa for f in fa_q])[None]  # [1, Hq, Tq, Tk]
    if pad_mask is not None:
        allowed = allowed & pad_mask
    return allowed


def reference_forward(module, query, key, value, attention_mask, scaling=None, softcap=None, s_aux=None, **kwargs):
    """``softcap`` (Gemma2) and ``s_aux`` (gpt-oss sink logits) as the families' eager attention has them."""
    plan = module.consa_plan
    g = query.shape[1] // key.shape[1]
    fa_kv = set(plan.fa_kv)
    fa_q = [(h // g) in fa_kv for h in range(query.shape[1])]
    allowed = per_head_allowed(fa_q, query.shape[2], key.shape[2], plan.window, plan.sinks, attention_mask, query.device)
    out = reference_attention(query, key, value, allowed, scaling, softcap, s_aux)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(NAME, reference_forward)
AttentionMaskInterface.register(NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
