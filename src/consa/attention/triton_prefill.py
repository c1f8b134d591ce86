"""Banded flash-attention prefill in Triton: sliding-window heads, and optionally the FA heads beside them.

FlexAttention runs the sliding window at about 2.7× its pair-ideal time on the H200 (one program per
query head, the band's edge blocks evaluated through ``mask_mod``), and the chunked path pays for row
reversals and merges. Here one program takes BLOCK_M query positions of *every query head of one KV
head's group* (stacked as G·BLOCK_M rows), so each K/V tile is loaded once for the group, and walks only
the key blocks its band touches:

* the window's edge blocks and the diagonal blocks with the mask evaluated in registers,
* the blocks wholly inside the band with no mask at all,
* with sinks, the first S keys' blocks below the band (masked to k < S).

Each KV head carries its own window (``WINS``), so the same kernel runs a whole hybrid layer in one
launch: FA heads get a window of T (plain causal). Programs are ordered longest first by a small tile
table (``TILES``), which lets a few long causal heads share the GPU with many short banded ones instead
of leaving it idle at the tail. The output is written straight into the [B, T, H, D] layout the model
wants, at the heads' own positions.

A logit soft cap (``SOFTCAP``: scores cap·tanh(s / cap)) and learned sink logits (``HAS_SINK_LOGITS``:
each row's online softmax starts from its head's sink logit, running sum 1) are constexpr switches, so
layers without them run the same code as before.

Without CUDA the kernel runs in Triton's interpreter (``TRITON_INTERPRET=1``, set by tests/conftest.py),
which is how the CPU tests hold it to the float64 reference.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from .triton_decode import dtype_ok, interpreted, score_scales, softcap_tanh, tl, triton

# Launch settings: the minimax choice of two H200 sweeps (bf16, d=128, GQA 2, W=512; 36 settings over 6
# points, then 24 over 4 with graph replays), never more than 1% behind a point's best in the second
# (benchmarks/attention_speed.py section "prefill_sweep"; docs/bench/prefill_triton_sweep{,2}_h200.json).
BLOCK_ROWS = 128  # query rows per program: G query heads × BLOCK_M positions
BLOCK_N = 32  # keys per inner step
NUM_WARPS = 8
NUM_STAGES = 3
SPLIT_LOOPS = True  # band edges / interior / diagonal in three loops (the interior unmasked), or one masked loop

_jit = triton.jit if triton is not None else (lambda f: f)


@_jit
def _steps(acc, l_i, m_i, q, k_base, v_base, s_kt, s_vt, pos, lo, hi, win, T, SINKS, qk_scale, CAP2,
           offs_n, offs_d, dmask, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, EVEN_D: tl.constexpr,
           PRECISION: tl.constexpr, SOFTCAP: tl.constexpr):
    """Online-softmax steps over key blocks [lo, hi): masked (band edges, diagonal, sinks) or not.
    Scores are in the log2 domain; with ``SOFTCAP`` they are CAP2 · tanh(q·k · qk_scale) (the host
    folds scale / cap into ``qk_scale`` and cap · log2 e into ``CAP2``)."""
    for start in range(lo, hi, BLOCK_N):
        n = start + offs_n
        k_ptr = k_base + n[:, None].to(tl.int64) * s_kt + offs_d[None, :]
        v_ptr = v_base + n[:, None].to(tl.int64) * s_vt + offs_d[None, :]
        if MASKED:
            ld = (n < T)[:, None] & dmask[None, :]
            k = tl.load(k_ptr, mask=ld, other=0.0)
        elif EVEN_D:  # interior blocks: whole, in bounds
            k = tl.load(k_ptr)
        else:
            k = tl.load(k_ptr, mask=dmask[None, :], other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        if SOFTCAP:
            qk = CAP2 * softcap_tanh(qk)
        if MASKED:
            d = pos[:, None] - n[None, :]
            vis = (d >= 0) & (n < T)[None, :] & ((d < win) | (n < SINKS)[None, :])
            qk = tl.where(vis, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))  # m_i starts finite: a row with no visible key in a block stays NaN-free
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if MASKED:
            v = tl.load(v_ptr, mask=ld, other=0.0)
        elif EVEN_D:
            v = tl.load(v_ptr)
        else:
            v = tl.load(v_ptr, mask=dmask[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@_jit
def _band(Q, K, V, O, TILES, WINS, SINK_LOGITS,
          s_qb, s_qh, s_qt, s_kb, s_kh, s_kt, s_vb, s_vh, s_vt, s_ob, s_oh, s_ot,
          T, HK, SINKS, qk_scale, CAP2,
          G: tl.constexpr, G_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
          D: tl.constexpr, D_PAD: tl.constexpr, EVEN_D: tl.constexpr, PRECISION: tl.constexpr, SPLIT: tl.constexpr,
          SOFTCAP: tl.constexpr, HAS_SINK_LOGITS: tl.constexpr):
    """Program p: tile ``TILES[p]`` = (b·HK + KV head, query block). Rows r of the tile are query head
    ``kv·G + r // BLOCK_M`` at position ``start + r % BLOCK_M``; key k is visible to position i when
    0 ≤ i − k < WINS[kv], or k < SINKS and k ≤ i. With ``HAS_SINK_LOGITS`` a row's softmax starts
    from its head's sink logit (``SINK_LOGITS``, float32 [Hq]): running max at it, running sum 1."""
    p = tl.program_id(0)
    bh = tl.load(TILES + 2 * p)
    start = tl.load(TILES + 2 * p + 1) * BLOCK_M
    b = (bh // HK).to(tl.int64)
    kv = bh % HK
    win = tl.load(WINS + kv)

    offs_r = tl.arange(0, G_PAD * BLOCK_M)
    gi = offs_r // BLOCK_M
    pos = start + offs_r % BLOCK_M
    heads = (kv * G + gi).to(tl.int64)
    rmask = (gi < G) & (pos < T)
    offs_d = tl.arange(0, D_PAD)
    dmask = offs_d < D
    offs_n = tl.arange(0, BLOCK_N)
    q = tl.load(Q + b * s_qb + heads[:, None] * s_qh + pos[:, None].to(tl.int64) * s_qt + offs_d[None, :],
                mask=rmask[:, None] & dmask[None, :], other=0.0)
    k_base = K + b * s_kb + kv.to(tl.int64) * s_kh
    v_base = V + b * s_vb + kv.to(tl.int64) * s_vh

    if HAS_SINK_LOGITS:  # the sink: one more logit in the softmax, with no value
        m_i = tl.load(SINK_LOGITS + heads, mask=gi < G, other=0.0) * 1.4426950408889634
        l_i = tl.full([G_PAD * BLOCK_M], 1.0, tl.float32)
    else:
        m_i = tl.full([G_PAD * BLOCK_M], -1.0e30, tl.float32)
        l_i = tl.zeros([G_PAD * BLOCK_M], tl.float32)
    acc = tl.zeros([G_PAD * BLOCK_M, D_PAD], tl.float32)

    last = start + BLOCK_M - 1  # the tile's last position
    lo = (tl.maximum(start - win + 1, 0) // BLOCK_N) * BLOCK_N
    hi = tl.minimum(last + 1, T)
    # blocks every row sees whole: k0 ≥ last − win + 1 and k0 + BLOCK_N − 1 ≤ start
    full_lo = tl.maximum((tl.maximum(last - win + 1, 0) + BLOCK_N - 1) // BLOCK_N * BLOCK_N, lo)
    full_hi = (start + 1) // BLOCK_N * BLOCK_N
    if full_hi <= full_lo:
        full_lo = lo
        full_hi = lo
    if SINKS > 0:
        sink_hi = tl.minimum((SINKS + BLOCK_N - 1) // BLOCK_N * BLOCK_N, lo)
        acc, l_i, m_i = _steps(acc, l_i, m_i, q, k_base, v_base, s_kt, s_vt, pos, 0, sink_hi, win, T, SINKS, qk_scale, CAP2,
                               offs_n, offs_d, dmask, BLOCK_N, True, EVEN_D, PRECISION, SOFTCAP)
    if SPLIT:  # the interior without a mask, in a loop of its own
        acc, l_i, m_i = _steps(acc, l_i, m_i, q, k_base, v_base, s_kt, s_vt, pos, lo, full_lo, win, T, SINKS, qk_scale, CAP2,
                               offs_n, offs_d, dmask, BLOCK_N, True, EVEN_D, PRECISION, SOFTCAP)
        acc, l_i, m_i = _steps(acc, l_i, m_i, q, k_base, v_base, s_kt, s_vt, pos, full_lo, full_hi, win, T, SINKS, qk_scale, CAP2,
                               offs_n, offs_d, dmask, BLOCK_N, False, EVEN_D, PRECISION, SOFTCAP)
        acc, l_i, m_i = _steps(acc, l_i, m_i, q, k_base, v_base, s_kt, s_vt, pos, full_hi, hi, win, T, SINKS, qk_scale, CAP2,
                               offs_n, offs_d, dmask, BLOCK_N, True, EVEN_D, PRECISION, SOFTCAP)
    else:  # one masked loop: one software pipeline instead of three short ones
        acc, l_i, m_i = _steps(acc, l_i, m_i, q, k_base, v_base, s_kt, s_vt, pos, lo, hi, win, T, SINKS, qk_scale, CAP2,
                               offs_n, offs_d, dmask, BLOCK_N, True, EVEN_D, PRECISION, SOFTCAP)
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(O + b * s_ob + heads[:, None] * s_oh + pos[:, None].to(tl.int64) * s_ot + offs_d[None, :],
             out.to(O.dtype.element_ty), mask=rmask[:, None] & dmask[None, :])


def available() -> bool:
    return triton is not None


def why_not(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, on_cpu: bool = False) -> str | None:
    """Why the kernel cannot take this prefill, or None: it needs Tq = Tk ≥ 2, CUDA (or CPU tensors
    under the interpreter when ``on_cpu``, ``KernelConfig.triton_on_cpu``), a dtype tl.dot takes there
    (``triton_decode.dtype_ok``), unit stride on the head dim, no gradient (forward only)."""
    if triton is None:
        return "triton is not installed"
    if not (q.is_cuda or (on_cpu and interpreted())):
        return "the Triton prefill kernel runs on CUDA (or on CPU under TRITON_INTERPRET=1 with triton_on_cpu)"
    if not dtype_ok(q):
        return f"dtype {q.dtype} is not one tl.dot takes on this device"
    if q.shape[-2] != k.shape[-2] or q.shape[-2] < 2:
        return "the Triton prefill kernel takes a prefill (as many queries as keys, at least 2)"
    if any(x.dtype != q.dtype or x.device != q.device or x.stride(-1) != 1 for x in (k, v)) or q.stride(-1) != 1:
        return "queries, keys and values must share dtype and device, with unit stride on the head dim"
    if torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v)):
        return "the Triton prefill kernel carries no gradient (forward only)"
    return None


def usable(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, on_cpu: bool = False) -> bool:
    """Whether the kernel can take this prefill (:func:`why_not` finds no reason)."""
    return why_not(q, k, v, on_cpu) is None


def block_m(group: int) -> int:
    """Query positions per program: BLOCK_ROWS rows over the (power-of-two padded) group, at least 16."""
    return max(16, BLOCK_ROWS // triton.next_power_of_2(group))


@lru_cache(maxsize=64)
def tile_table(batch: int, wins: tuple[int, ...], t: int, bm: int, sinks: int, device: torch.device) -> torch.Tensor:
    """int32 [tiles, 2]: (b·H_kv + KV head, query block) for every tile, the most key blocks first
    (longest-processing-time order, so long causal tiles do not start last and run alone)."""
    nq = -(-t // bm)
    blk = torch.arange(nq)
    last = torch.clamp((blk + 1) * bm, max=t)
    w = torch.tensor(wins)[:, None]
    keys = last[None, :] - torch.clamp(blk[None, :] * bm - w + 1, min=0) + min(sinks, t)  # [H_kv, nq]
    bh = torch.arange(batch * len(wins))
    work = keys.repeat(batch, 1)  # [B·H_kv, nq]
    order = torch.argsort(work.flatten(), descending=True, stable=True)
    table = torch.stack([bh[:, None].expand(-1, nq).flatten()[order], blk.repeat(batch * len(wins))[order]], 1)
    return table.to(torch.int32).contiguous().to(device)


def banded_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, wins: tuple[int, ...], sinks: int, scale: float,
                     out: torch.Tensor | None = None, *, softcap: float | None = None,
                     sink_logits: torch.Tensor | None = None) -> torch.Tensor:
    """Prefill attention of q [B, Hq, T, D] over k, v [B, Hk, T, D] (GQA; any strides with a unit
    head dim), KV head h seeing keys 0 ≤ i − k < ``wins[h]`` (a window ≥ T is plain causal) plus the
    first ``sinks`` keys. ``softcap``: scores capped to cap·tanh(s / cap); ``sink_logits`` [Hq]: one
    more logit per query head in the softmax, with no value. Returns [B, Hq, T, D] as a view of
    [B, T, Hq, D] storage, or writes into ``out`` (such a view, e.g. some heads of a larger output)."""
    b, hq, t, d = q.shape
    hk = k.shape[1]
    if len(wins) != hk or hq % hk:
        raise ValueError(f"{len(wins)} windows / {hq} query heads for {hk} KV heads")
    if sink_logits is not None and sink_logits.shape != (hq,):
        raise ValueError(f"sink logits of shape {tuple(sink_logits.shape)} for {hq} query heads")
    group = hq // hk
    if out is None:
        out = torch.empty(b, t, hq, d, dtype=q.dtype, device=q.device).transpose(1, 2)
    wins = tuple(min(int(w), t) for w in wins)
    bm = block_m(group)
    tiles = tile_table(b, wins, t, bm, sinks, q.device)
    win_t = _wins_tensor(wins, q.device)
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    d_pad = max(16, triton.next_power_of_2(d))
    qk_scale, cap2 = score_scales(scale, softcap)
    sink_arg = win_t if sink_logits is None else sink_logits.detach().to(device=q.device, dtype=torch.float32).contiguous()
    _band[(tiles.shape[0],)](
        q, k, v, out, tiles, win_t, sink_arg,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        t, hk, sinks, qk_scale, cap2,
        G=group, G_PAD=triton.next_power_of_2(group), BLOCK_M=bm, BLOCK_N=BLOCK_N,
        D=d, D_PAD=d_pad, EVEN_D=d == d_pad, PRECISION=precision, SPLIT=SPLIT_LOOPS,
        SOFTCAP=softcap is not None, HAS_SINK_LOGITS=sink_logits is not None,
        num_warps=NUM_WARPS, num_stages=NUM_STAGES,
    )
    return out


@lru_cache(maxsize=64)
def _wins_tensor(wins: tuple[int, ...], device: torch.device) -> torch.Tensor:
    return torch.tensor(wins, dtype=torch.int32, device=device)


def sliding(q, k, v, window: int, sinks: int, scale: float, *, softcap: float | None = None,
            sink_logits: torch.Tensor | None = None) -> torch.Tensor:
    """Sliding-window prefill (every KV head the same window): ``KernelConfig(swa_prefill="triton")``."""
    return banded_attention(q, k, v, (window,) * k.shape[1], sinks, scale, softcap=softcap, sink_logits=sink_logits)


def causal(q, k, v, scale: float, *, softcap: float | None = None, sink_logits: torch.Tensor | None = None) -> torch.Tensor:
    """Causal prefill (a window of T): where soft-capped or sink-logit heads cannot take SDPA."""
    return banded_attention(q, k, v, (q.shape[-2],) * k.shape[1], 0, scale, softcap=softcap, sink_logits=sink_logits)


def hybrid(q, k, v, fa_kv: tuple[int, ...], window: int, sinks: int, scale: float, *, softcap: float | None = None,
           sink_logits: torch.Tensor | None = None) -> torch.Tensor:
    """A whole hybrid layer's prefill in one launch (``KernelConfig(hybrid_prefill="triton")``): KV heads
    in ``fa_kv`` causal, the rest over the window. Returns [B, T, Hq, D] (contiguous)."""
    t = q.shape[-2]
    fa = set(fa_kv)
    wins = tuple(t if h in fa else window for h in range(k.shape[1]))
    return banded_attention(q, k, v, wins, sinks, scale, softcap=softcap, sink_logits=sink_logits).transpose(1, 2)
