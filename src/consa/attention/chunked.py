"""Sliding-window prefill on fused causal kernels, merged by log-sum-exp (``KernelConfig.swa_prefill``).

``chunked_sliding``: block-diagonal causal attention over W-sized chunks plus a reversed causal pass
over each previous chunk, exactly the window's W² pairs per chunk (cuDNN / FA2 on CUDA, the flash
kernel on CPU). ``flash_sliding``: FlashAttention-2's own local window (CUDA). Both are held to the
float64 reference in tests/test_chunked_swa.py; ``select.choose`` picks among them and flex.

Tuning (``KernelConfig.chunk_attn`` / ``chunk_compile``) comes in as arguments: ``cudnn`` (True: cuDNN's
fused attention on CUDA, FA2 where cuDNN refuses; False: FA2) and ``compile`` (the row reversals and
LSE merges as compiled Triton kernels on CUDA).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .softcap_sinks import fold_sink_logits


def _expand_kv(q, k, v):
    g = q.shape[1] // k.shape[1]
    return (k, v) if g == 1 else (k.repeat_interleave(g, 1), v.repeat_interleave(g, 1))


_cudnn_refused: set = set()
_compiled: dict = {}


def on(x, fn, compile: bool = True):
    """``fn`` compiled (once, static shapes) for CUDA tensors when ``compile``; eager otherwise.
    Eager flips and lerps over these strided views run at about a third of memory speed."""
    if not (compile and x.is_cuda):
        return fn
    if fn not in _compiled:
        _compiled[fn] = torch.compile(fn, dynamic=False)
    return _compiled[fn]


def attn_lse(q, k, v, causal: bool, scale: float, cudnn: bool = True):
    """``(out, lse)``: attention of q [B,H,Tq,D] over k, v [B,Hk,Tk,D] (GQA) and its natural-log
    log-sum-exp [B,H,Tq] (float32). Either no mask or a *square* causal one (Tq = Tk), the only
    cases where every backend aligns the causal mask alike. CUDA fp16/bf16: cuDNN's fused attention
    (about twice FA2's speed on Hopper) or FA2; CPU: its flash kernel; elsewhere plain math."""
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        key = (tuple(q.shape), tuple(k.shape), causal)
        if cudnn and key not in _cudnn_refused:
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


def merge(out, lse, out2, lse2, reverse: bool, want_lse: bool):
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


def _add_sinks(out, lse, q, k, v, window: int, sinks: int, scale: float, cudnn: bool, compile: bool,
               want_lse: bool = False) -> None:
    """Fold in the sink keys the window no longer covers: query p sees sink j < S through the window
    iff p − j ≤ W − 1, so the extra ones are j ≤ p − W. Rows p ≥ W + S − 1 see all S (no mask);
    rows W ≤ p < W + S − 1 see j ≤ p − W, a square causal mask over the first S − 1 sinks.
    ``want_lse``: ``lse`` is updated to the joint log-sum-exp too (sink logits are folded from it)."""
    t = q.shape[2]
    s = min(sinks, t)
    lo = window + s - 1
    if lo < t:
        o2, l2 = attn_lse(q[:, :, lo:], k[:, :, :s], v[:, :, :s], False, scale, cudnn)
        joint = on(out, merge, compile)(out[:, :, lo:], lse[:, :, lo:], o2, l2, False, want_lse)
        if want_lse:
            lse[:, :, lo:] = joint
    n = min(s - 1, t - window)
    if n > 0:
        sl = slice(window, window + n)
        o2, l2 = attn_lse(q[:, :, sl], k[:, :, :n], v[:, :, :n], True, scale, cudnn)
        joint = on(out, merge, compile)(out[:, :, sl], lse[:, :, sl], o2, l2, False, want_lse)
        if want_lse:
            lse[:, :, sl] = joint


def chunks(x, start: int, n: int, w: int):
    """[B,H,T,D] → [B·n, H, w, D]: n consecutive w-slot chunks from ``start`` (a view where strides allow,
    e.g. B = 1 or the [B,T,H,D] storage transformers produces when the chunks tile T)."""
    b, h, _, d = x.shape
    return x[:, :, start : start + n * w].unflatten(2, (n, w)).transpose(1, 2).reshape(b * n, h, w, d)


def _chunk_pass(q, k, v, start: int, n: int, w: int, scale: float, first: bool, want_lse: bool, cudnn: bool, compile: bool):
    """Sliding-window output [B, n, H, w, D] (and LSE [B, n, H, w]) of the n chunks from ``start``.

    Query i of a chunk sees key j of the same chunk iff j ≤ i (square causal flash, all chunks as one
    batch) and key j of the previous chunk iff j > i. Reversing both orders (i' = w−1−i, j' = w−1−j)
    turns the latter into j' < i'; without query i' = 0 and key j' = w−1, which see / are seen by
    nothing, it is square causal over w−1 queries and keys: flash again. Exactly w² pairs per chunk.
    ``first``: the first chunk starts the sequence and has no previous one."""
    b = q.shape[0]
    out, lse = attn_lse(chunks(q, start, n, w), chunks(k, start, n, w), chunks(v, start, n, w), True, scale, cudnn)
    out, lse = out.unflatten(0, (b, n)), lse.unflatten(0, (b, n))
    lo = int(first)
    if w > 1 and n > lo:
        s, m = start + lo * w, n - lo
        rev = on(q, _reversed_rows, compile)
        qb = rev(chunks(q, s, m, w)[:, :, : w - 1])
        kb, vb = (rev(chunks(x, s - w, m, w)[:, :, 1:]) for x in (k, v))
        ob, lb = attn_lse(qb, kb, vb, True, scale, cudnn)
        ob, lb = ob.unflatten(0, (b, m)), lb.unflatten(0, (b, m))
        merged = on(q, merge, compile)(out[:, lo:, :, : w - 1], lse[:, lo:, :, : w - 1], ob, lb, True, want_lse)
        if want_lse:
            lse[:, lo:, :, : w - 1] = merged
    return out, lse


def chunked_sliding(q, k, v, window: int, sinks: int, scale: float, *, cudnn: bool = True, compile: bool = True,
                    softcap: float | None = None, sink_logits: torch.Tensor | None = None) -> torch.Tensor:
    """Sliding-window prefill (queries = keys = all T slots) as block-diagonal flash attention over
    W-sized chunks, each merged with its previous chunk by log-sum-exp (see ``_chunk_pass``); sinks
    are a third partial (``_add_sinks``), learned sink logits [Hq] a last fold from the joint
    log-sum-exp. Flash kernels only: CUDA fp16/bf16, and CPU (the twin tests run); they take no soft
    cap (``why_not``). T need not be a multiple of W: the last chunk is the last W slots, overlapping
    the one before, and only its new rows are kept. No gradient (inference prefill)."""
    if softcap is not None:
        raise ValueError(why_not(q, k, v, softcap))
    b, h, t, d = q.shape
    w = window
    if w >= t:  # the window covers every causal pair
        out, lse = attn_lse(q, k, v, True, scale, cudnn)
        return out if sink_logits is None else out.copy_(fold_sink_logits(out, lse, sink_logits))
    pad = 2 * w - t if t < 2 * w and t % w else 0
    if pad:  # W < T < 2W and ragged: pad at the back (padded keys follow every real query)
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
    tp = t + pad
    nf, r = divmod(tp, w)
    want = bool(sinks) or sink_logits is not None
    out, lse = _chunk_pass(q, k, v, 0, nf, w, scale, True, want, cudnn, compile)
    out = out.permute(0, 2, 1, 3, 4).reshape(b, h, nf * w, d)  # a view for flash's [B,T,H,D] output
    lse = lse.permute(0, 2, 1, 3).reshape(b, h, nf * w) if want else None
    if r:
        o2, l2 = _chunk_pass(q, k, v, tp - w, 1, w, scale, False, want, cudnn, compile)
        out = torch.cat([out, o2[:, 0, :, w - r :]], 2)
        lse = torch.cat([lse, l2[:, 0, :, w - r :]], 2) if want else None
    if pad:
        out, lse = out[:, :, :t], (lse[:, :, :t] if want else None)
        q, k, v = q[:, :, :t], k[:, :, :t], v[:, :, :t]
    if sinks:
        _add_sinks(out, lse, q, k, v, w, sinks, scale, cudnn, compile, sink_logits is not None)
    return out if sink_logits is None else out.copy_(fold_sink_logits(out, lse, sink_logits))


_FLASH_WINDOW: list = []


def flash_window_op():
    """``aten._flash_attention_forward`` when it takes window sizes (FlashAttention-2's local attention)."""
    if not _FLASH_WINDOW:
        op = getattr(torch.ops.aten, "_flash_attention_forward", None)
        ok = op is not None and "window_size_left" in str(op.default._schema)
        _FLASH_WINDOW.append(op.default if ok else None)
    return _FLASH_WINDOW[0]


def flash_sliding(q, k, v, window: int, sinks: int, scale: float, *, cudnn: bool = True, compile: bool = True,
                  softcap: float | None = None, sink_logits: torch.Tensor | None = None) -> torch.Tensor:
    """Sliding-window prefill with FlashAttention-2's local attention (window_size_left = W − 1,
    right = 0): one call, no mask, GQA native, tiles outside the band skipped; sinks merged by LSE,
    learned sink logits folded from it. CUDA fp16/bf16 only, no soft cap. Output [B,H,T,D] in the
    [B,T,H,D] storage transformers wants."""
    if softcap is not None:
        raise ValueError(flash_why_not(q, k, v, softcap))
    t = q.shape[2]
    out, lse = flash_window_op()(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, None, t, t, 0.0, True, False,
        scale=scale, window_size_left=window - 1, window_size_right=0,
    )[:2]
    out = out.transpose(1, 2)
    if sinks and t > window:
        if sink_logits is not None:
            lse = lse.clone()
        _add_sinks(out, lse, q, k, v, window, sinks, scale, cudnn, compile, sink_logits is not None)
    return out if sink_logits is None else out.copy_(fold_sink_logits(out, lse, sink_logits))


def _no_grad(q, k, v) -> bool:
    return not (torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v)))


def why_not(q, k, v, softcap: float | None = None) -> str | None:
    """Why ``chunked_sliding`` cannot run this prefill, or None: it needs flash kernels (CUDA
    fp16/bf16, or CPU), which take no soft cap, and gives no gradient."""
    if softcap is not None:
        return "the flash kernels the chunked kernel runs on take no attention logit soft cap"
    if not ((q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)) or q.device.type == "cpu"):
        return "the chunked kernel needs CUDA fp16/bf16 or CPU tensors"
    if not _no_grad(q, k, v):
        return "the chunked kernel's log-sum-exp merges carry no gradient (inference only)"
    return None


def flash_why_not(q, k, v, softcap: float | None = None) -> str | None:
    """Why ``flash_sliding`` cannot run this prefill, or None: CUDA fp16/bf16, a torch build whose
    flash op takes window sizes, no soft cap, no gradient."""
    if softcap is not None:
        return "FlashAttention-2's local window op takes no attention logit soft cap here"
    if not (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)):
        return "FlashAttention-2's local window needs CUDA fp16/bf16 tensors"
    if flash_window_op() is None:
        return "this torch build's flash attention op takes no window sizes"
    if not _no_grad(q, k, v):
        return "the flash window kernel carries no gradient here (inference only)"
    return None
