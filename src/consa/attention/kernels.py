"""Attention kernels over explicit cache slots: full causal and sliding window, with GQA.

Every path computes softmax(q·kᵀ·scale + mask)·v where the mask is the composition of
``masks.causal_mask_mod`` / ``masks.sliding_window_mask_mod`` with the model's padding mask. The
choice of kernel is a speed decision only:

* SDPA (flash / efficient / math, chosen by torch) whenever the pattern is plain causal or needs no
  mask at all (decode over a cache that holds only visible keys);
* for sliding-window prefill (no padding mask, Tq = Tk) the kernel ``SWA_PREFILL`` names:
  the banded Triton kernel of ``triton_prefill`` (``"triton"``, CUDA), FlexAttention with a cached
  block mask (``"flex"``, CUDA), block-diagonal causal attention over W-sized chunks merged by
  log-sum-exp (``"chunked"``: cuDNN / FA2 on CUDA fp16/bf16, flash on CPU) or FlashAttention-2's own
  local window (``"flash"``, CUDA fp16/bf16);
* SDPA with a dense boolean mask otherwise (CPU, padding, chunked prefill).

``reference_attention`` is the dense float64 reference that tests hold every path to.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F

from . import split_causal, triton_prefill
from .chunked import _flash_window_op, chunked_sliding, flash_sliding
from .masks import hybrid_mask_mod, offset_mask_mod, sliding_window_mask_mod


@dataclass(frozen=True)
class KeySlots:
    """Cache slots of a key tensor: the first ``num_sinks`` keys sit at slots 0…S−1, the rest at
    ``offset``, ``offset``+1, … . Plain keys are ``KeySlots()`` (slot j for key j). Plain ints, so
    kernel choice never needs a device sync."""

    num_sinks: int = 0
    offset: int = 0

    def positions(self, length: int, device) -> torch.Tensor:
        idx = torch.arange(length, device=device)
        return torch.where(idx < self.num_sinks, idx, idx - self.num_sinks + self.offset)

    def is_identity(self) -> bool:
        return self.num_sinks == 0 and self.offset == 0


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


def _split_ok(q, k) -> bool:
    """Causal prefill as uniform split calls (``split_causal.SPLIT_DEPTH``): CUDA fp16/bf16 inference."""
    d = split_causal.SPLIT_DEPTH
    return (d > 0 and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and split_causal.splits(q.shape[2], d)
            and not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)))


def _sdpa(q, k, v, mask, is_causal, scale, dropout):
    gqa = q.shape[1] != k.shape[1]
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale, dropout_p=dropout, enable_gqa=gqa
    )


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
    backend: str = "auto",
) -> torch.Tensor:
    """Causal (``window=None``) or sliding-window attention of q [B,Hq,Tq,D] over k, v [B,Hk,Tk,D].

    Queries are the last Tq slots of the sequence (``q_offset = total − Tq``, where total is the
    number of slots the padding mask spans, or the last key slot + 1). ``mask`` is transformers'
    boolean padding+causal mask over all slots [B,1,Tq,total] or None (no padding).
    """
    tq, tk = q.shape[-2], k.shape[-2]
    total = mask.shape[-1] if mask is not None else slots.offset + (tk - slots.num_sinks)
    q_off = total - tq
    if mask is not None:
        mask = select_mask_columns(mask, slots, tk)

    if window is None:
        if mask is None:
            if tq == 1:
                return _sdpa(q, k, v, None, False, scale, dropout)
            if tq == tk and slots.is_identity():
                if not dropout and _split_ok(q, k):
                    return split_causal.split_causal(q, k, v, scale, split_causal.SPLIT_DEPTH)
                return _sdpa(q, k, v, None, True, scale, dropout)
        # transformers' mask already holds causality; build the band only when there is no mask.
        band = None if mask is not None else _band(q_off, tq, tk, slots, None, 0, q.device)
    else:
        # Decode over a cache that holds only visible keys needs no mask at all.
        if tq == 1 and decode_sees_all(tk, slots, window, sinks, total):
            band = None
            if mask is None:
                return _sdpa(q, k, v, None, False, scale, dropout)
        elif mask is None and tq == tk and slots.is_identity() and (kernel := _swa_prefill_kernel(q, k, v, window, backend)):
            return kernel(q, k, v, window, sinks, scale)
        else:
            band = _band(q_off, tq, tk, slots, window, sinks, q.device)
    if band is not None:
        mask = band if mask is None else (mask & band)
    return _sdpa(q, k, v, mask, False, scale, dropout)


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
def _band(q_off, tq, tk, slots, window, sinks, device):
    """Boolean [Tq, Tk] visibility; cached, since every layer of a forward asks for the same one."""
    q_pos = torch.arange(q_off, q_off + tq, device=device)
    k_pos = slots.positions(tk, device)
    if window is None:
        return q_pos[:, None] >= k_pos[None, :]
    return sliding_window_mask_mod(window, sinks)(None, None, q_pos[:, None], k_pos[None, :])


# ---- FlexAttention (CUDA) ------------------------------------------------------------------------
def _flex_ok(q: torch.Tensor, backend: str) -> bool:
    if not q.is_cuda:
        return False
    if backend == "flex":
        return True
    return q.shape[-2] >= 1024  # below that the dense-mask SDPA is as fast and compiles nothing


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
FLEX_KERNEL_OPTIONS: dict | None = None  # e.g. {"BLOCK_M": 128, "BLOCK_N": 64}; None = FlexAttention's defaults


def _run_flex(q, k, v, block_mask, scale: float) -> torch.Tensor:
    """FlexAttention under ``block_mask``: compiled once on CUDA, eager (slow, for the CPU twins) elsewhere."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    gqa = q.shape[1] != k.shape[1]
    if not q.is_cuda:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # eager flex warns that it is unfused
            return flex_attention(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=gqa)
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    extra = {"kernel_options": dict(FLEX_KERNEL_OPTIONS)} if FLEX_KERNEL_OPTIONS else {}
    return _compiled_flex(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=gqa, **extra)


def flex_sliding(q, k, v, window: int, sinks: int, scale: float) -> torch.Tensor:
    """Sliding-window prefill with FlexAttention; the block mask is built once per shape and cached."""
    return _run_flex(q, k, v, _sliding_block_mask(q.shape[-2], k.shape[-2], window, sinks, str(q.device)), scale)


HYBRID_PREFILL = "split"  # "split": FA heads on SDPA + SWA heads on their own kernel, merged; "fused": one
# FlexAttention call over all heads with a per-head block mask; "triton": one launch of triton_prefill's banded
# kernel over all heads (per-head windows, longest tiles first, written in place: no split, no merge). Both
# lose on the H200: fused 1.31-1.57x ideal, triton 1.32-1.75x (its causal part runs at ~0.7x cuDNN's speed)


def flex_hybrid(q, k, v, fa_heads: tuple[bool, ...], window: int, sinks: int, scale: float) -> torch.Tensor:
    """Hybrid prefill (Tq = Tk, no padding) in one FlexAttention call: query head h attends causally
    where ``fa_heads[h]``, else over the sliding window. The block mask is built once and cached."""
    return _run_flex(q, k, v, _hybrid_block_mask(q.shape[-2], tuple(fa_heads), window, sinks, str(q.device)), scale)


# ---- sliding-window prefill on flash kernels (CUDA; the chunked one also on CPU) -------------------
SWA_PREFILL = "auto"  # "flex" | "chunked" | "flash" | "triton" | "auto" (CUDA fp16/bf16: chunked from
# AUTO_CHUNKED_MIN_WINDOW up, else triton; flex otherwise). H200, torch 2.11, 12 SWA q heads, ms:
# W=512 (flex / triton): 8K 0.115 / 0.098, 32K 0.437 / 0.382, 128K 1.703 / 1.372;
# W=4096 (chunked / triton): 32K 1.567 / 1.902 (flex 1.94, flash 2.74)
AUTO_CHUNKED_MIN_WINDOW = 2048
PREFILL_OVERLAP = True  # hybrid prefill: SWA heads on a side stream beside the FA heads (CUDA): True, False,
# or "auto" = up to AUTO_OVERLAP_MAX_TOKENS queries. With OVERLAP_PRIORITY it never lost on the H200:
# 8K-32K 3-25% faster, 128K within 2% (W=4096 / 50% FA: 72.1 -> 69.0 ms).
AUTO_OVERLAP_MAX_TOKENS = 32768
OVERLAP_PRIORITY = "auto"  # overlapped prefill: which head group's stream gets a high priority, so the GPU
# dispatches its blocks first and the other group's blocks fill the SMs it leaves idle: "fa", "swa", None,
# or "auto" = the group with the larger estimated time (overlap_priority). H200, 8K / W=512 / 25% FA:
# 0.284 ms without priorities, 0.226 with the FA heads first.
SWA_PAIR_COST = {"triton": 2.2, "chunked": 1.4}  # time per visible pair of the SWA kernel, relative to the FA
# heads' causal SDPA (H200: triton 1.9-2.3 at W=512; chunked at W=4096 1.3-1.4 at 8K, 1.2-1.25 at 32K)


def overlap_priority(n_fa: int, n_swa: int, t: int, window: int) -> str | None:
    """``OVERLAP_PRIORITY`` for a prefill of ``t`` tokens with ``n_fa`` / ``n_swa`` heads (KV or query
    heads alike: only the ratio counts): "fa", "swa" or None ("auto": the group whose kernel is
    estimated to take longer, from its visible pairs)."""
    if OVERLAP_PRIORITY != "auto":
        return OVERLAP_PRIORITY or None
    pairs = t * window - window * (window - 1) // 2 if window < t else t * (t + 1) // 2
    cost = SWA_PAIR_COST["chunked" if window >= AUTO_CHUNKED_MIN_WINDOW else "triton"]
    return "fa" if n_fa * t * (t + 1) / 2 >= n_swa * pairs * cost else "swa"


def overlap_wanted(num_queries: int) -> bool:
    """``PREFILL_OVERLAP`` for a prefill of this many queries ("auto": up to AUTO_OVERLAP_MAX_TOKENS)."""
    if PREFILL_OVERLAP == "auto":
        return 1 < num_queries <= AUTO_OVERLAP_MAX_TOKENS
    return bool(PREFILL_OVERLAP) and num_queries > 1


def overlap_prefill(q: torch.Tensor) -> bool:
    """Whether a hybrid prefill of these queries runs its SWA heads on a side stream (CUDA, inference)."""
    return q.is_cuda and overlap_wanted(q.shape[-2]) and not (torch.is_grad_enabled() and q.requires_grad)


def _swa_prefill_kernel(q, k, v, window: int, backend: str):
    """The kernel for sliding-window prefill over plain slots (no mask, Tq = Tk), or None for the
    dense-mask SDPA. ``backend`` "flex" / "chunked" / "flash" forces one, "auto" reads ``SWA_PREFILL``.
    Kernels a device or dtype cannot run fall back: flash → chunked → flex → dense SDPA, triton → flex.
    "triton" is ``triton_prefill``'s banded kernel (K/V tiles shared by the query group)."""
    if backend not in ("auto", "flex", "chunked", "flash", "triton"):
        return None
    kind = SWA_PREFILL if backend == "auto" else backend
    if kind != "flex" and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        kind = "flex"  # the LSE outputs of the aten attention ops (and the Triton kernel) carry no gradient
    half = q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
    if kind == "auto":
        kind = "chunked" if half and window >= AUTO_CHUNKED_MIN_WINDOW else ("triton" if half else "flex")
    if kind == "triton":
        if triton_prefill.usable(q, k, v):
            return triton_prefill.sliding
        kind = "flex"
    if kind == "flash" and half and _flash_window_op():
        return flash_sliding
    if kind in ("chunked", "flash") and (half or q.device.type == "cpu"):
        return chunked_sliding  # "flash" falls back to its CPU twin
    if _flex_ok(q, "flex" if backend == "flex" else "auto"):
        return flex_sliding
    return None


# ---- hybrid decode (CUDA) ------------------------------------------------------------------------
DECODE_KERNEL = "auto"  # "auto": both head groups in one Triton split-KV launch (triton_decode) where it
# applies (CUDA, one query, at most one padding row per sequence, every held key inside the window),
# else SDPA per group; "sdpa": always SDPA per group
DECODE_OVERLAP = True  # SDPA decode: run the SWA heads' kernel on a side stream beside the FA heads' one
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
def reference_attention(q, k, v, allowed: torch.Tensor, scale: float) -> torch.Tensor:
    """Float64 softmax attention under an explicit boolean mask broadcastable to [B,Hq,Tq,Tk].

    Rows with no visible key return zeros. GQA by repeating KV heads.
    """
    g = q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(g, dim=1)
    v = v.double().repeat_interleave(g, dim=1)
    scores = torch.einsum("bhqd,bhkd->bhqk", q.double(), k) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return torch.einsum("bhqk,bhkd->bhqd", probs, v).to(q.dtype)
