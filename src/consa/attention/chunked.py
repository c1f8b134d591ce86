"""Sliding-window prefill on fused causal kernels, merged by log-sum-exp (``kernels.SWA_PREFILL``).

``chunked_sliding``: block-diagonal causal attention over W-sized chunks plus a reversed causal pass
over each previous chunk, exactly the window's W² pairs per chunk (cuDNN / FA2 on CUDA, the flash
kernel on CPU). ``flash_sliding``: FlashAttention-2's own local window (CUDA). Both are held to the
float64 reference in tests/test_chunked_swa.py; ``kernels.attention`` picks among them and flex.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _expand_kv(q, k, v):
    g = q.shape[1] // k.shape[1]
    return (k, v) if g == 1 else (k.repeat_interleave(g, 1), v.repeat_interleave(g, 1))


CHUNK_ATTN = "cudnn"  # chunked kernel's flash calls on CUDA: "cudnn" (FA2 where cuDNN refuses) | "flash" (FA2)
CHUNK_COMPILE = True  # CUDA: the chunked kernel's row reversals and LSE merges as compiled (Triton) kernels
_cudnn_refused: set = set()
_compiled: dict = {}


def _on(x, fn):
    """``fn`` compiled (once, static shapes) for CUDA tensors with ``CHUNK_COMPILE``; eager otherwise.
    Eager flips and lerps over these strided views run at about a third of memory speed."""
    if not (CHUNK_COMPILE and x.is_cuda):
        return fn
    if fn not in _compiled:
        _compiled[fn] = torch.compile(fn, dynamic=False)
    return _compiled[fn]


def _attn_lse(q, k, v, causal: bool, scale: float):
    """``(out, lse)``: attention of q [B,H,Tq,D] over k, v [B,Hk,Tk,D] (GQA) and its natural-log
    log-sum-exp [B,H,Tq] (float32). Either no mask or a *square* causal one (Tq = Tk), the only
    cases where every backend aligns the causal mask alike. CUDA fp16/bf16: cuDNN's fused attention
    (about twice FA2's speed on Hopper) or FA2; CPU: its flash kernel; elsewhere plain math."""
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        key = (tuple(q.shape), tuple(k.shape), causal)
        if CHUNK_ATTN == "cudnn" and key not in _cudnn_refused:
            try:
                out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, causal, False, scale=scale)[:2]
                return out, lse.reshape(q.shape[:3])  # cuDNN's LSE is [B,H,Tq,1]
            except RuntimeError:  # unsupported shape / build: FA2 from now on for this shape
                _cudnn_refused.add(key)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)[:2]
        return out, lse
    k, v = _expand_kv(q, k, v)
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
        return out, lse
    s = torch.einsum("bhqd,bhkd->bhqk", q.float(), k.float()) * scale  # any other device: plain math
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    lse = torch.logsumexp(s, -1)
    return torch.einsum("bhqk,bhkd->bhqd", torch.exp(s - lse[..., None]), v.float()).to(q.dtype), lse


def _merge(out, lse, out2, lse2, reverse: bool, want_lse: bool):
    """Fold a second partial attention over disjoint keys into ``out`` (in place):
    out ← (e^lse·out + e^lse2·out2) / (e^lse + e^lse2) = lerp(out, out2, sigmoid(lse2 − lse)), in
    float32; ``reverse``: ``out2`` [..., L, D] / ``lse2`` [..., L] come in reversed row order.
    Returns the joint LSE when asked."""
    if reverse:
        out2, lse2 = out2.flip(-2), lse2.flip(-1)
    out.copy_(torch.lerp(out.float(), out2.float(), torch.sigmoid(lse2 - lse).unsqueeze(-1)))
    return torch.logaddexp(lse, lse2) if want_lse else None


def _reversed_rows(x):
    """x [N,H,L,D] with its rows (dim 2) reversed, copied in x's own storage order so that the copy
    streams whole rows: for transformers' [B,T,H,D] storage that is [N,L,H,D]."""
    if x.stride(1) < x.stride(2):
        return x.transpose(1, 2).flip(1).transpose(1, 2)
    return x.flip(2)


def _add_sinks(out, lse, q, k, v, window: int, sinks: int, scale: float) -> None:
    """Fold in the sink keys the window no longer covers: query p sees sink j < S through the window
    iff p − j ≤ W − 1, so the extra ones are j ≤ p − W. Rows p ≥ W + S − 1 see all S (no mask);
    rows W ≤ p < W + S − 1 see j ≤ p − W, a square causal mask over the first S − 1 sinks."""
    t = q.shape[2]
    s = min(sinks, t)
    lo = window + s - 1
    if lo < t:
        o2, l2 = _attn_lse(q[:, :, lo:], k[:, :, :s], v[:, :, :s], False, scale)
        _on(out, _merge)(out[:, :, lo:], lse[:, :, lo:], o2, l2, False, False)
    n = min(s - 1, t - window)
    if n > 0:
        sl = slice(window, window + n)
        o2, l2 = _attn_lse(q[:, :, sl], k[:, :, :n], v[:, :, :n], True, scale)
        _on(out, _merge)(out[:, :, sl], lse[:, :, sl], o2, l2, False, False)


def _chunks(x, start: int, n: int, w: int):
    """[B,H,T,D] → [B·n, H, w, D]: n consecutive w-slot chunks from ``start`` (a view where strides allow,
    e.g. B = 1 or the [B,T,H,D] storage transformers produces when the chunks tile T)."""
    b, h, _, d = x.shape
    return x[:, :, start : start + n * w].unflatten(2, (n, w)).transpose(1, 2).reshape(b * n, h, w, d)


def _chunk_pass(q, k, v, start: int, n: int, w: int, scale: float, first: bool, want_lse: bool):
    """Sliding-window output [B, n, H, w, D] (and LSE [B, n, H, w]) of the n chunks from ``start``.

    Query i of a chunk sees key j of the same chunk iff j ≤ i (square causal flash, all chunks as one
    batch) and key j of the previous chunk iff j > i. Reversing both orders (i' = w−1−i, j' = w−1−j)
    turns the latter into j' < i'; without query i' = 0 and key j' = w−1, which see / are seen by
    nothing, it is square causal over w−1 queries and keys: flash again. Exactly w² pairs per chunk.
    ``first``: the first chunk starts the sequence and has no previous one."""
    b = q.shape[0]
    out, lse = _attn_lse(_chunks(q, start, n, w), _chunks(k, start, n, w), _chunks(v, start, n, w), True, scale)
    out, lse = out.unflatten(0, (b, n)), lse.unflatten(0, (b, n))
    lo = int(first)
    if w > 1 and n > lo:
        s, m = start + lo * w, n - lo
        rev = _on(q, _reversed_rows)
        qb = rev(_chunks(q, s, m, w)[:, :, : w - 1])
        kb, vb = (rev(_chunks(x, s - w, m, w)[:, :, 1:]) for x in (k, v))
        ob, lb = _attn_lse(qb, kb, vb, True, scale)
        ob, lb = ob.unflatten(0, (b, m)), lb.unflatten(0, (b, m))
        merged = _on(q, _merge)(out[:, lo:, :, : w - 1], lse[:, lo:, :, : w - 1], ob, lb, True, want_lse)
        if want_lse:
            lse[:, lo:, :, : w - 1] = merged
    return out, lse


def chunked_sliding(q, k, v, window: int, sinks: int, scale: float) -> torch.Tensor:
    """Sliding-window prefill (queries = keys = all T slots) as block-diagonal flash attention over
    W-sized chunks, each merged with its previous chunk by log-sum-exp (see ``_chunk_pass``); sinks
    are a third partial (``_add_sinks``). Flash kernels only: CUDA fp16/bf16, and CPU (the twin tests
    run). T need not be a multiple of W: the last chunk is the last W slots, overlapping the one
    before, and only its new rows are kept. No gradient (inference prefill)."""
    b, h, t, d = q.shape
    w = window
    if w >= t:  # the window covers every causal pair
        return _attn_lse(q, k, v, True, scale)[0]
    pad = 2 * w - t if t < 2 * w and t % w else 0
    if pad:  # W < T < 2W and ragged: pad at the back (padded keys follow every real query)
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
    tp = t + pad
    nf, r = divmod(tp, w)
    out, lse = _chunk_pass(q, k, v, 0, nf, w, scale, True, bool(sinks))
    out = out.permute(0, 2, 1, 3, 4).reshape(b, h, nf * w, d)  # a view for flash's [B,T,H,D] output
    lse = lse.permute(0, 2, 1, 3).reshape(b, h, nf * w) if sinks else None
    if r:
        o2, l2 = _chunk_pass(q, k, v, tp - w, 1, w, scale, False, bool(sinks))
        out = torch.cat([out, o2[:, 0, :, w - r :]], 2)
        lse = torch.cat([lse, l2[:, 0, :, w - r :]], 2) if sinks else None
    if pad:
        out, lse = out[:, :, :t], (lse[:, :, :t] if sinks else None)
        q, k, v = q[:, :, :t], k[:, :, :t], v[:, :, :t]
    if sinks:
        _add_sinks(out, lse, q, k, v, w, sinks, scale)
    return out


_FLASH_WINDOW: list = []


def _flash_window_op():
    """``aten._flash_attention_forward`` when it takes window sizes (FlashAttention-2's local attention)."""
    if not _FLASH_WINDOW:
        op = getattr(torch.ops.aten, "_flash_attention_forward", None)
        ok = op is not None and "window_size_left" in str(op.default._schema)
        _FLASH_WINDOW.append(op.default if ok else None)
    return _FLASH_WINDOW[0]


def flash_sliding(q, k, v, window: int, sinks: int, scale: float) -> torch.Tensor:
    """Sliding-window prefill with FlashAttention-2's local attention (window_size_left = W − 1,
    right = 0): one call, no mask, GQA native, tiles outside the band skipped; sinks merged by LSE.
    CUDA fp16/bf16 only. Output [B,H,T,D] in the [B,T,H,D] storage transformers wants."""
    t = q.shape[2]
    out, lse = _flash_window_op()(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, None, t, t, 0.0, True, False,
        scale=scale, window_size_left=window - 1, window_size_right=0,
    )[:2]
    out = out.transpose(1, 2)
    if sinks and t > window:
        _add_sinks(out, lse, q, k, v, window, sinks, scale)
    return out
