"""What an allocation really costs when served: KV bytes held by the cache, prefill and decode time.

Issue 16 compares methods at *equal KV bytes*, so the bytes are measured from the cache after a
prefill of ``context`` tokens (not computed from the allocation): the hybrid cache for an allocation,
transformers' own dynamic cache for full attention. The timings run the eager cached path for every
row (the static CUDA-graph path serves one window per layer only), one sequence, synchronised, after a
warm-up pass of the same shapes (a first call compiles kernels: seconds, not the prefill's time).
"""

from __future__ import annotations

import time

import torch

from .. import compat
from ..models import apply_allocation, detach


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def dynamic_cache_bytes(cache) -> int:
    """Bytes of every key/value tensor a stock transformers cache holds."""
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if torch.is_tensor(t):
                total += t.numel() * t.element_size()
    return total


@torch.no_grad()
def measure(model, allocation, context: int, decode_tokens: int = 16, vocab_low: int = 3, seed: int = 0,
            warmup: int = 1) -> dict:
    """Prefill ``context`` random tokens under ``allocation`` (None: full attention), then decode
    ``decode_tokens`` greedily, after ``warmup`` untimed passes of the same shapes. Returns the KV bytes
    held after the prefill, the prefill seconds and the mean seconds per decoded token. Leaves the model
    detached (plain attention)."""
    from ..attention.cache import HybridCache
    from ..models import plans_of
    from transformers import DynamicCache

    device = next(model.parameters()).device
    vocab = model.config.get_text_config().vocab_size
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(vocab_low, vocab, (1, context), generator=g).to(device)
    if allocation is not None:
        apply_allocation(model, allocation)
    else:
        detach(model)
    new_cache = (lambda: HybridCache(plans_of(model))) if allocation is not None else DynamicCache
    try:
        model.eval()
        for _ in range(warmup):  # the same shapes once, untimed: kernel compilation and autotuning
            c = new_cache()
            out = model(input_ids=ids, use_cache=True, **compat.cache_kwargs(c, model))
            model(input_ids=out.logits[:, -1:].argmax(-1), use_cache=True, **compat.cache_kwargs(c, model))
        cache = new_cache()
        _sync(device)
        t0 = time.perf_counter()
        out = model(input_ids=ids, use_cache=True, **compat.cache_kwargs(cache, model))
        _sync(device)
        prefill = time.perf_counter() - t0
        held = cache.stored_bytes() if allocation is not None else dynamic_cache_bytes(cache)
        tok = out.logits[:, -1:].argmax(-1)
        t0 = time.perf_counter()
        for _ in range(decode_tokens):
            out = model(input_ids=tok, use_cache=True, **compat.cache_kwargs(cache, model))
            tok = out.logits[:, -1:].argmax(-1)
        _sync(device)
        decode = (time.perf_counter() - t0) / max(1, decode_tokens)
    finally:
        detach(model)
    return {"context": context, "kv_bytes": int(held), "prefill_s": round(prefill, 6), "decode_s_per_token": round(decode, 6),
            "decode_tokens": decode_tokens, "warmup": warmup}
