"""Data-driven baselines: DuoAttention-style gates and a training-free attention-mass score.

Both end in the same global cut as ConSA (lowest scores → SWA, exact count), so every method is
compared at the same budget.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface

from ..allocation import Allocation
from ..attention.attend import attention
from ..attention.softcap_sinks import LogitMods, attention_weights
from ..gates import topk_swa
from ..models import attach_gates, attention_modules, detach, model_shape, searchable_native
from .losses import forward_logits, kl_loss


def duo_allocation(
    model, granularity: str, num_swa: int, window: int, batch_fn, steps: int = 200, lr: float = 0.05,
    l1: float = 0.05, sinks: int = 0, seed: int = 0, progress: bool = False, backend: str = "auto",
    reopen_native: bool = False,
) -> Allocation:
    """DuoAttention-style: a clamped scalar gate α ∈ [0, 1] per unit mixes FA and SWA, trained with
    KL to the full model plus an L1 push towards SWA; the lowest α become SWA (quantile cut). A model's
    native sliding layers stay as they are (their gates drive nothing) unless ``reopen_native``."""
    torch.manual_seed(seed)
    shape = model_shape(model)
    n = shape.num_units(granularity)
    device = next(model.parameters()).device
    model.eval().requires_grad_(False)
    native = searchable_native(model, reopen_native)
    mix = attach_gates(model, window, sinks, backend=backend, reopen_native=reopen_native)
    alpha = torch.nn.Parameter(torch.ones(n, device=device))
    opt = torch.optim.Adam([alpha], lr=lr)
    it = range(steps)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="duo baseline", dynamic_ncols=True)
    for step in it:
        batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch_fn(step).items()}
        mask = batch.get("loss_mask", batch.get("attention_mask"))
        with torch.no_grad():
            mix.z = None  # full attention (no SWA outputs computed for a teacher)
            teacher = forward_logits(model, batch)
        z = alpha.clamp(0, 1)
        mix.z = z.view(-1, 1).expand(-1, shape.num_kv_heads) if granularity == "layer" else z.view(shape.num_layers, -1)
        loss = kl_loss(forward_logits(model, batch), teacher, mask) + l1 * z.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            alpha.clamp_(0, 1)
    detach(model)
    return _cut(alpha.detach(), native, granularity, shape, num_swa, window, sinks, "duo", "alpha", 4)


def _cut(scores, native, granularity, shape, num_swa, window, sinks, method, key, digits) -> Allocation:
    """Top-k over the units a method may choose (native sliding layers excluded), scores kept in meta."""
    free = Allocation.free_units(native, granularity, shape.num_kv_heads)
    fa = topk_swa(scores[free], num_swa)
    return Allocation.from_units(fa, granularity, shape, window, sinks,
                                 {"method": method, key: [round(float(s), digits) for s in scores[free]]}, native=native)


_MASS_NAME = "consa_mass"


def _mass_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, softcap=None, s_aux=None, **kwargs):
    """Plain causal attention that also adds, per KV head, the attention mass beyond the window (the
    model's own weights: soft-capped, sink logits in the softmax, where the family has them)."""
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    acc = module.consa_mass
    b, hq, t, _ = query.shape
    hk = key.shape[1]
    g = hq // hk
    w = acc["window"]
    pos = torch.arange(t, device=query.device)
    kk = key.repeat_interleave(g, dim=1)
    for s in range(w, t, 256):  # chunk queries: memory stays O(256·T)
        e = min(t, s + 256)
        scores = torch.einsum("bhqd,bhkd->bhqk", query[:, :, s:e].float(), kk.float()) * scale
        causal = pos[s:e, None] >= pos[None, :]
        visible = causal if attention_mask is None else (attention_mask[:, :, s:e] & causal)
        probs = attention_weights(scores, visible, softcap, s_aux)
        far = (pos[s:e, None] - pos[None, :]) >= w
        mass = (probs * far).sum(-1)  # [B, Hq, q]
        acc["sum"] += mass.view(b, hk, g, -1).sum(dim=(0, 2, 3)).double().cpu()
        acc["count"] += b * g * (e - s)
    out = attention(query, key, value, scale=scale, mask=attention_mask, mods=LogitMods.of(softcap, s_aux))
    return out.transpose(1, 2).contiguous(), None


@torch.no_grad()
def attention_mass_allocation(
    model, granularity: str, num_swa: int, window: int, batches, sinks: int = 0, reopen_native: bool = False
) -> Allocation:
    """Training-free: keep FA where the share of attention mass beyond W (on calibration data) is largest.
    Native sliding layers are not candidates unless ``reopen_native`` (the scores come from a pass with
    full attention in every layer, native ones included: an approximation for such models)."""
    AttentionInterface.register(_MASS_NAME, _mass_attention)
    shape = model_shape(model)
    native = searchable_native(model, reopen_native)
    mods = attention_modules(model)
    for m in mods:
        m.consa_mass = {"window": window, "sum": torch.zeros(shape.num_kv_heads, dtype=torch.float64), "count": 0}
    previous = model.config._attn_implementation
    model.set_attn_implementation(_MASS_NAME)
    try:
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

        AttentionMaskInterface.register(_MASS_NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
        device = next(model.parameters()).device
        for batch in batches:
            forward_logits(model, {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()})
        per_head = torch.stack([m.consa_mass["sum"] / max(1, m.consa_mass["count"]) for m in mods])  # [L, Hkv]
    finally:
        for m in mods:
            del m.consa_mass
        model.set_attn_implementation(previous)
    scores = per_head.mean(1) if granularity == "layer" else per_head.flatten()
    return _cut(scores, native, granularity, shape, num_swa, window, sinks, "attention_mass", "scores", 5)
