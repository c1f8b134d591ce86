"""Attention building blocks over explicit cache slots: SDPA, the dense band, FlexAttention, streams.

Every path computes softmax(q·kᵀ·scale + mask)·v where the mask is the composition of
``masks.causal_mask_mod`` / ``masks.sliding_window_mask_mod`` with the model's padding mask. Which
block runs a call is decided by ``select.choose`` from the plan's ``KernelConfig`` (``attend.attention``
puts them together); here are the pieces that need no kernel of their own:

* SDPA (flash / efficient / math, chosen by torch) and the dense boolean band it takes where the
  pattern is not plain causal;
* the slot arithmetic that says when a decode query needs no mask at all (``decode_sees_all``) and
  when held keys cover every key a query sees (``window_held``);
* FlexAttention with block masks built in closed form (``flex_sliding``, ``flex_hybrid``; CUDA, with an
  eager CPU twin for tests);
* two head groups on two CUDA streams (``overlapped``).

``reference_attention`` is the dense float64 reference that tests hold every path to.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F

from .masks import hybrid_mask_mod, offset_mask_mod, sliding_window_mask_mod
from .plan import KeySlots
from .softcap_sinks import flex_score_mod, fold_sink_logits


def select_mask_columns(mask: torch.Tensor, slots: KeySlots, length: int) -> torch.Tensor:
    """Pick the padding-mask columns that belong to the keys actually held."""
    if slots.is_identity() and mask.shape[-1] == length:
        return mask
    parts = []
    if slots.num_sinks:
        parts.append(mask[..., : slots.num_sinks])
    rest = length - slots.num_sinks
    parts.append(mask[..., slots.offset : slots.offset + rest])
    return torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]


def sdpa(q, k, v, mask, is_causal, scale, dropout):
    """SDPA with GQA. On CUDA a mask with ``enable_gqa`` leaves only SDPA's math backend (it materialises
    the [B, Hq, Tq, Tk] scores in float32: a later prompt chunk over 8K keys spends ~1 GiB a layer), so
    there the KV heads are repeated instead and the memory-efficient kernel takes the mask."""
    gqa = q.shape[1] != k.shape[1]
    if gqa and mask is not None and q.is_cuda:
        group = q.shape[1] // k.shape[1]
        k, v, gqa = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1), False
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale, dropout_p=dropout, enable_gqa=gqa
    )


def decode_sees_all(tk: int, slots: KeySlots, window: int, sinks: int, total: int | None = None) -> bool:
    """Whether a decode query (the last of ``total`` slots) sees every one of the ``tk`` keys held at
    ``slots`` under a window of ``window`` plus ``sinks`` sinks: then it needs no mask."""
    total = slots.offset + (tk - slots.num_sinks) if total is None else total
    regular_visible = tk == slots.num_sinks or slots.offset >= total - window
    return regular_visible and slots.num_sinks <= sinks


def window_held(tk: int, slots: KeySlots, window: int, sinks: int, total: int, tq: int) -> bool:
    """Whether ``tk`` SWA keys held at ``slots`` include every key that the queries at the last ``tq`` of
    ``total`` slots see (window ``window``, ``sinks`` sinks), so that a kernel masking by slot needs
    nothing else."""
    if slots.is_identity():
        return tk == total
    first_needed = max(total - tq - window + 1, slots.num_sinks)
    return slots.num_sinks >= sinks and slots.offset <= first_needed and slots.offset + tk - slots.num_sinks == total


@lru_cache(maxsize=32)
def band(q_off, tq, tk, slots, window, sinks, device):
    """Boolean [Tq, Tk] visibility; cached, since every layer of a forward asks for the same one."""
    q_pos = torch.arange(q_off, q_off + tq, device=device)
    k_pos = slots.positions(tk, device)
    if window is None:
        return q_pos[:, None] >= k_pos[None, :]
    return sliding_window_mask_mod(window, sinks)(None, None, q_pos[:, None], k_pos[None, :])


# ---- FlexAttention (CUDA) ------------------------------------------------------------------------
def flex_why_not(q: torch.Tensor) -> str | None:
    """Why FlexAttention should not run these queries, or None: it runs compiled on CUDA only (the
    eager CPU path is a test twin, far slower than the dense-mask SDPA)."""
    return None if q.is_cuda else "FlexAttention runs compiled on CUDA tensors only"


FLEX_MIN_QUERIES = 1024  # "auto" takes flex from here: below, the dense-mask SDPA is as fast and compiles nothing
BLOCK = 128


@lru_cache(maxsize=64)
def _sliding_block_mask(q_len: int, kv_len: int, window: int, sinks: int, device: str):
    return sliding_block_mask(q_len, kv_len, window, sinks, device)


def _block_sets(q_len: int, kv_len: int, window: int | None, sinks: int, device, block: int):
    """(partial, full) boolean [nq, nk] block sets of the causal (``window=None``) or sliding mask,
    in closed form from block corners (queries are the last ``q_len`` of ``kv_len`` slots)."""
    q_off = kv_len - q_len
    nq, nk = -(-q_len // block), -(-kv_len // block)
    qi = torch.arange(nq, device=device)[:, None]
    kj = torch.arange(nk, device=device)[None, :]
    q_lo, q_hi = qi * block + q_off, torch.clamp((qi + 1) * block, max=q_len) - 1 + q_off
    k_lo, k_hi = kj * block, torch.clamp((kj + 1) * block, max=kv_len) - 1
    d_min, d_max = q_lo - k_hi, q_hi - k_lo  # range of q − k over the block
    if window is None:
        return (d_max >= 0) & (d_min < 0), d_min >= 0
    band_any = (d_max >= 0) & (d_min <= window - 1)
    band_full = (d_min >= 0) & (d_max <= window - 1)
    if sinks:
        sink_any = (k_lo < sinks) & (d_max >= 0)
        sink_full = (k_hi < sinks) & (d_min >= 0)
        band_any, band_full = band_any | sink_any, band_full | sink_full
    return band_any & ~band_full, band_full


def _to_indices(m: torch.Tensor):
    """BlockMask (num, idx) of a boolean [H, nq, nk] block set: the True columns first, in order."""
    num = m.sum(-1).to(torch.int32)
    idx = torch.argsort((~m).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    return num[None].contiguous(), idx[None].contiguous()


def sliding_block_mask(q_len: int, kv_len: int, window: int, sinks: int = 0, device="cpu", block: int = BLOCK):
    """FlexAttention BlockMask of the sliding window (queries are the last ``q_len`` of ``kv_len`` slots).

    Built in closed form from block corners instead of evaluating the mask on every pair (which
    ``create_block_mask`` does, minutes at 128K without compilation). Blocks wholly inside the band
    (or wholly sinks) are marked *full*, so the kernel skips ``mask_mod`` there.
    """
    from torch.nn.attention.flex_attention import BlockMask

    q_off = kv_len - q_len
    partial, full = _block_sets(q_len, kv_len, window, sinks, device, block)
    kv_num, kv_idx = _to_indices(partial[None])
    full_num, full_idx = _to_indices(full[None])
    mask_mod = offset_mask_mod(sliding_window_mask_mod(window, sinks), q_off) if q_off else sliding_window_mask_mod(window, sinks)
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block, mask_mod=mask_mod, seq_lengths=(q_len, kv_len))


def hybrid_block_mask(seq_len: int, fa_heads: tuple[bool, ...], window: int, sinks: int = 0, device="cpu",
                      block: int = BLOCK):
    """One BlockMask over all query heads of a prefill: causal blocks for FA heads (``fa_heads[h]``),
    the sliding band for the others, so both head groups run in a single FlexAttention call."""
    from torch.nn.attention.flex_attention import BlockMask

    fa = torch.tensor(fa_heads, dtype=torch.bool, device=device)
    sets = [_block_sets(seq_len, seq_len, w, sinks, device, block) for w in (None, window)]
    pick = fa[:, None, None]
    partial = torch.where(pick, sets[0][0][None], sets[1][0][None])
    full = torch.where(pick, sets[0][1][None], sets[1][1][None])
    kv_num, kv_idx = _to_indices(partial)
    full_num, full_idx = _to_indices(full)
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block,
                                    mask_mod=hybrid_mask_mod(fa, window, sinks), seq_lengths=(seq_len, seq_len))


@lru_cache(maxsize=64)
def _hybrid_block_mask(seq_len: int, fa_heads: tuple[bool, ...], window: int, sinks: int, device: str):
    return hybrid_block_mask(seq_len, fa_heads, window, sinks, device)


_compiled_flex = None


def _lse_request() -> dict:
    """FlexAttention's keywords asking for the log-sum-exp (``return_aux`` from torch 2.9, else ``return_lse``)."""
    try:
        from torch.nn.attention.flex_attention import AuxRequest
    except ImportError:  # torch < 2.9
        return {"return_lse": True}
    return {"return_aux": AuxRequest(lse=True)}


def _run_flex(q, k, v, block_mask, scale: float, options: tuple = (), softcap: float | None = None,
              sink_logits: torch.Tensor | None = None) -> torch.Tensor:
    """FlexAttention under ``block_mask``: compiled once on CUDA, eager (slow, for the CPU twins) elsewhere.
    ``options``: FlexAttention ``kernel_options`` as (name, value) pairs; () = its defaults. A soft cap
    is a ``score_mod``; sink logits are folded in from the log-sum-exp (``softcap_sinks``)."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    gqa = q.shape[1] != k.shape[1]
    extra = {"score_mod": flex_score_mod(softcap)} if softcap is not None else {}
    if sink_logits is not None:
        extra.update(_lse_request())
    if not q.is_cuda:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # eager flex warns that it is unfused
            out = flex_attention(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=gqa, **extra)
    else:
        if _compiled_flex is None:
            _compiled_flex = torch.compile(flex_attention, dynamic=False)
        if options:
            extra["kernel_options"] = dict(options)
        out = _compiled_flex(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=gqa, **extra)
    if sink_logits is None:
        return out
    out, aux = out
    return fold_sink_logits(out, getattr(aux, "lse", aux), sink_logits)


def flex_sliding(q, k, v, window: int, sinks: int, scale: float, options: tuple = (), *, softcap: float | None = None,
                 sink_logits: torch.Tensor | None = None) -> torch.Tensor:
    """Sliding-window prefill with FlexAttention; the block mask is built once per shape and cached.
    A window of at least T is plain causal."""
    mask = _sliding_block_mask(q.shape[-2], k.shape[-2], min(window, k.shape[-2]), sinks, str(q.device))
    return _run_flex(q, k, v, mask, scale, options, softcap, sink_logits)


def flex_causal(q, k, v, scale: float, options: tuple = (), *, softcap: float | None = None,
                sink_logits: torch.Tensor | None = None) -> torch.Tensor:
    """Causal prefill with FlexAttention: what soft-capped or sink-logit heads take where SDPA would run."""
    return flex_sliding(q, k, v, k.shape[-2], 0, scale, options, softcap=softcap, sink_logits=sink_logits)


def flex_hybrid(q, k, v, fa_heads: tuple[bool, ...], window: int, sinks: int, scale: float, options: tuple = (), *,
                softcap: float | None = None, sink_logits: torch.Tensor | None = None) -> torch.Tensor:
    """Hybrid prefill (Tq = Tk, no padding) in one FlexAttention call: query head h attends causally
    where ``fa_heads[h]``, else over the sliding window. The block mask is built once and cached."""
    mask = _hybrid_block_mask(q.shape[-2], tuple(fa_heads), window, sinks, str(q.device))
    return _run_flex(q, k, v, mask, scale, options, softcap, sink_logits)


# ---- two head groups on two CUDA streams -------------------------------------------------------------
_side_streams: dict = {}


def _stream(device, high: bool):
    key = (device, high)
    if key not in _side_streams:
        _side_streams[key] = torch.cuda.Stream(device=device, priority=-100 if high else 0)
    return _side_streams[key]


def overlapped(main_fn, side_fn, priority: str | None = None):
    """``(main_fn(), side_fn())`` with ``side_fn`` on a side CUDA stream (captured as a parallel
    branch under CUDA graphs). ``priority`` "main" / "side": that function's stream is a
    high-priority one. Both read tensors made on the current stream."""
    cur = torch.cuda.current_stream()
    side = _stream(cur.device, priority == "side")
    side.wait_stream(cur)
    if priority == "main":
        hi = _stream(cur.device, True)
        hi.wait_stream(cur)
        with torch.cuda.stream(hi):
            a = main_fn()
        with torch.cuda.stream(side):
            b = side_fn()
        cur.wait_stream(hi)
        a.record_stream(cur)
    else:
        with torch.cuda.stream(side):
            b = side_fn()
        a = main_fn()
    cur.wait_stream(side)
    b.record_stream(cur)
    return a, b


# ---- dense reference -----------------------------------------------------------------------------
def reference_attention(q, k, v, allowed: torch.Tensor, scale: float, softcap: float | None = None,
                        sink_logits: torch.Tensor | None = None) -> torch.Tensor:
    """Float64 softmax attention under an explicit boolean mask broadcastable to [B,Hq,Tq,Tk].

    Rows with no visible key return zeros. GQA by repeating KV heads. ``softcap``: scores become
    cap·tanh(score / cap) before the mask; ``sink_logits`` [Hq]: one more logit per query head in the
    softmax, with no value (transformers' Gemma2 and gpt-oss eager attention).
    """
    g = q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(g, dim=1)
    v = v.double().repeat_interleave(g, dim=1)
    scores = torch.einsum("bhqd,bhkd->bhqk", q.double(), k) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    scores = scores.masked_fill(~allowed, float("-inf"))
    if sink_logits is not None:
        sink = sink_logits.double().view(1, -1, 1, 1).expand(*scores.shape[:3], 1)
        probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    else:
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return torch.einsum("bhqk,bhkd->bhqd", probs, v).to(q.dtype)
