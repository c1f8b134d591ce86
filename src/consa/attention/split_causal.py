"""Causal prefill of a few heads as uniform flash calls, merged by log-sum-exp.

With few heads (the FA group of a hybrid layer) at moderate T, one causal flash call leaves the GPU
half idle: a handful of query tiles of very unequal length. ``split_causal`` halves the square
recursively: at depth d the 2^d diagonal squares (T/2^d, causal) run as one batched call, and level
i < d adds the 2^i rectangles below the diagonal of size T/2^(i+1) (no mask) as one batched call.
Every call is made of equal tiles; all inputs are strided views (no copies). Each level's output is
folded into the rows it covers (``chunked.merge``). Pairs: exactly T(T+1)/2. ``KernelConfig.split_depth``
turns it on (0, the default, is one SDPA call).
"""

from __future__ import annotations

import torch

from .chunked import attn_lse, chunks, merge, on


def _blocks(x, m: int, s: int, half: int):
    """[B,H,T,D] → [B·m, H, s, D]: of the m pairs of s-slot halves tiling T, the ``half`` (0/1) ones."""
    b, h, _, d = x.shape
    return x.unflatten(2, (m, 2, s))[:, :, :, half].transpose(1, 2).reshape(b * m, h, s, d)


def splits(t: int, depth: int) -> bool:
    return depth > 0 and t % (1 << depth) == 0 and (t >> depth) >= 1


def why_not(q, k, depth: int) -> str | None:
    """Why ``split_causal`` at ``depth`` cannot run this causal prefill, or None: CUDA fp16/bf16,
    T divisible by 2^depth, no gradient."""
    if not (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)):
        return "the split causal kernel needs CUDA fp16/bf16 tensors"
    if not splits(q.shape[2], depth):
        return f"T={q.shape[2]} does not split into 2^{depth} equal parts"
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
        return "the split causal kernel carries no gradient (inference only)"
    return None


def split_causal(q, k, v, scale: float, depth: int, *, cudnn: bool = True, compile: bool = True) -> torch.Tensor:
    """Causal attention of q [B,H,T,D] over k, v [B,Hk,T,D] (GQA) as 1 + depth uniform flash calls;
    T must divide by 2^depth. Output [B,H,T,D]; inference only (flash kernels, no gradient)."""
    b, h, t, d = q.shape
    if not splits(t, depth):
        raise ValueError(f"split_causal: T={t} does not split into 2^{depth} equal parts")
    n, L = 1 << depth, t >> depth
    out, lse = attn_lse(*(chunks(x, 0, n, L) for x in (q, k, v)), True, scale, cudnn)
    out = out.unflatten(0, (b, n)).permute(0, 2, 1, 3, 4).reshape(b, h, t, d)  # a view for [B,T,H,D] storage
    lse = lse.unflatten(0, (b, n)).permute(0, 2, 1, 3).reshape(b, h, t).contiguous()
    fold = on(q, merge, compile)
    for i in range(depth):
        m, s = 1 << i, t >> (i + 1)
        ob, lb = attn_lse(_blocks(q, m, s, 1), _blocks(k, m, s, 0), _blocks(v, m, s, 0), False, scale, cudnn)
        rows = out.unflatten(2, (m, 2, s))[:, :, :, 1]  # [B,H,m,s,D]: the queries of the lower halves
        rl = lse.unflatten(2, (m, 2, s))[:, :, :, 1]
        ob = ob.unflatten(0, (b, m)).transpose(1, 2)
        lb = lb.unflatten(0, (b, m)).transpose(1, 2)
        joint = fold(rows, rl, ob, lb, False, i + 1 < depth)
        if joint is not None:
            rl.copy_(joint)
    return out
