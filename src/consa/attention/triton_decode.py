"""One-launch decode over a hybrid cache: split-KV flash decoding of FA and SWA heads together.

The SDPA decode path runs the FA heads and the SWA heads as two kernels and merges them with a third.
At small caches this costs a fixed ~10 µs a step, and with only the FA heads' few KV heads in its grid
the FA kernel reads the cache well below the bandwidth a full-width decode reaches. Here one flat
Triton grid covers every (sequence, KV head, key chunk) that holds keys: each program reads one chunk
of its head's keys (FA heads from the FA tensor, SWA heads from the SWA tensor, so no copy or gather)
for all query heads of its group, and a second small kernel merges the splits by log-sum-exp straight into the [B, 1, H, D] layout the
model wants. Every held key is inside a decode query's window (the hybrid cache keeps only those;
callers check it with ``kernels.decode_sees_all``), so the only mask is the optional padding row of
a left-padded batch, read per key slot. Several queries (drafts to verify, short prompt chunks) share
the programs' rows with the query group and mask by slot: causal, and the window on the SWA heads.

A logit soft cap is a constexpr switch of the split kernel (``SOFTCAP``); learned sink logits join
the merge kernel's denominator once per query head (``HAS_SINK_LOGITS``), never a split's.

Without CUDA the kernels run in Triton's interpreter (``TRITON_INTERPRET=1`` before triton is
imported; tests/conftest.py sets it on machines without CUDA), which is how the CPU tests hold them
to the float64 reference.
"""

from __future__ import annotations

from functools import lru_cache

import torch

try:  # triton ships with CUDA builds of torch; CPU installs may lack it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = tl = None

# Launch settings: of 24 swept on the H200 (bf16, d=128, B=8; 32K caches with W=512/4096 and FA share
# 0.25/0.5, 128K with W=512), the one never more than 3.4% behind the best at any point
# (benchmarks/attention_speed.py, section "sweep"; docs/bench/decode_sweep_h200.json).
BLOCK_N = 128  # keys per inner step
NUM_WARPS = 8
NUM_STAGES = 2
FILL = 2  # programs on the long heads per SM
COMBINE_BLOCK = 16  # splits per step of the merge kernel
MAX_SPLITS = 256


def available() -> bool:
    return triton is not None


LOG2E = 1.4426950408889634


def score_scales(scale: float, softcap: float | None) -> tuple[float, float]:
    """(qk_scale, CAP2) for the kernels' log2-domain scores: q·k · qk_scale, or with a soft cap
    CAP2 · tanh(q·k · qk_scale) = log2 e · cap · tanh(q·k · scale / cap)."""
    if softcap is None:
        return scale * LOG2E, 1.0
    return scale / softcap, softcap * LOG2E


def _softcap_tanh(x):
    """tanh in float32 from one exp (Triton's core has none; the interpreter runs no libdevice):
    (1 − e^−2|x|) / (1 + e^−2|x|) with x's sign, within ~1e-7 of tanh."""
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


softcap_tanh = triton.jit(_softcap_tanh) if triton is not None else _softcap_tanh


def _partial(Q, KF, VF, KS, VS, OP, LP, HEADS, MASK,
             s_qb, s_qh, s_qt,
             s_kfb, s_kfh, s_kft, s_vfb, s_vfh, s_vft,
             s_ksb, s_ksh, s_kst, s_vsb, s_vsh, s_vst,
             s_ob, s_oh, s_os, s_lb, s_lh, s_mb, s_mt,
             N_FA, NS_FA, NS_SW, T_FA, T_SW, SW_SINKS, SW_DELTA, CHUNK, qk_scale, CAP2, TQ, WIN, SINKS, LENP, S_LEN, RING,
             G: tl.constexpr, R_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
             BLOCK: tl.constexpr, PRECISION: tl.constexpr, HAS_MASK: tl.constexpr, MULTI: tl.constexpr,
             STATIC: tl.constexpr, SOFTCAP: tl.constexpr):
    """Program (b, p): p < N_FA·NS_FA is split p % NS_FA of FA head p // NS_FA, the rest split the SWA
    heads alike (a flat grid, so short heads launch no empty programs). It writes the softmax-weighted
    values of its key chunk for the head's query group and the chunk's log2-sum-exp (scores in the log2
    domain: ``qk_scale`` = scale · log2 e). With ``HAS_MASK``, key j is also dropped where the padding
    mask row ``MASK[b]`` is False at its slot: j for FA keys; for SWA keys j below ``SW_SINKS`` (the
    sinks), else j + ``SW_DELTA``. With ``MULTI`` the program takes ``TQ`` queries (rows r = query
    r // G of head r % G of the group), at slots T_FA − TQ, …, T_FA − 1: a row sees a key at its slot or
    before, and on the SWA heads only inside the window ``WIN`` or among the first ``SINKS`` slots.

    With ``STATIC`` (a preallocated cache, static_cache.py) the slots written so far are read on the
    device from ``LENP`` (so a captured CUDA graph replays at any length and never reads past it; row b's
    at ``LENP + b·S_LEN``: one length for the batch with S_LEN = 0, one per row else): the
    FA keys are the first of them, the SWA keys a ring of ``SW_SINKS`` sinks + ``RING`` slots where
    slot t ≥ SW_SINKS sits at SW_SINKS + (t − SW_SINKS) mod RING; a key outside ``WIN`` is dropped."""
    b = tl.program_id(0).to(tl.int64)
    p = tl.program_id(1)
    if STATIC:
        T_FA = tl.load(LENP + b * S_LEN).to(tl.int32)
        T_SW = tl.minimum(T_FA, SW_SINKS + RING)
    # The two branches pick the tensor (and its strides) a program reads: in a Triton kernel that is
    # a branch on the program id, not a gather.
    if p < N_FA * NS_FA:
        i = p // NS_FA
        s = p % NS_FA
        k_base = KF + b * s_kfb + i.to(tl.int64) * s_kfh
        v_base = VF + b * s_vfb + i.to(tl.int64) * s_vfh
        s_kt = s_kft
        s_vt = s_vft
        length = T_FA
        slot = i
        lim = 0 * T_FA  # FA keys sit at their own slots
        delta = 0 * T_FA
        win = T_FA  # wider than any distance: no window
        ring = T_FA  # (static) no wrap: key j < T_FA sits at slot j
    else:
        r = p - N_FA * NS_FA
        i = r // NS_SW
        s = r % NS_SW
        k_base = KS + b * s_ksb + i.to(tl.int64) * s_ksh
        v_base = VS + b * s_vsb + i.to(tl.int64) * s_vsh
        s_kt = s_kst
        s_vt = s_vst
        length = T_SW
        slot = N_FA + i
        lim = SW_SINKS
        delta = SW_DELTA
        win = WIN
        ring = RING + 0 * T_FA
    h = tl.load(HEADS + slot)  # the model's KV head index
    lo = s * CHUNK
    hi = tl.minimum(lo + CHUNK, length)

    offs_g = tl.arange(0, R_PAD)
    offs_d = tl.arange(0, D_PAD)
    offs_n = tl.arange(0, BLOCK)
    if MULTI:
        gmask = offs_g < G * TQ
        qi = offs_g // G
        heads_q = h * G + offs_g % G
        rows = heads_q * TQ + qi  # row of the partial outputs: query head, then query
        pos = T_FA - TQ + qi  # each row's slot
        q_ptr = Q + b * s_qb + heads_q[:, None] * s_qh + qi[:, None] * s_qt + offs_d[None, :]
    else:
        gmask = offs_g < G
        rows = h * G + offs_g
        q_ptr = Q + b * s_qb + rows[:, None] * s_qh + offs_d[None, :]
    dmask = offs_d < D
    q = tl.load(q_ptr, mask=gmask[:, None] & dmask[None, :], other=0.0)
    m_i = tl.full([R_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([R_PAD], tl.float32)
    acc = tl.zeros([R_PAD, D_PAD], tl.float32)
    for start in range(lo, hi, BLOCK):
        n = start + offs_n
        valid = n < hi
        kv_mask = valid[:, None] & dmask[None, :]
        k = tl.load(k_base + n[:, None].to(tl.int64) * s_kt + offs_d[None, :], mask=kv_mask, other=0.0)
        if STATIC:  # the newest slot ≤ T_FA − 1 at this ring position
            key_slot = tl.where(n < lim, n, n + ring * ((T_FA - 1 - n) // ring))
            valid = valid & ((T_FA - 1 - key_slot < win) | (key_slot < SINKS))
        elif HAS_MASK or MULTI:
            key_slot = tl.where(n < lim, n, n + delta)
        if HAS_MASK:
            valid = valid & (tl.load(MASK + b * s_mb + key_slot.to(tl.int64) * s_mt, mask=valid, other=0) != 0)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        if SOFTCAP:  # see score_scales
            qk = CAP2 * softcap_tanh(qk)
        if MULTI:
            dist = pos[:, None] - key_slot[None, :]
            seen = valid[None, :] & (dist >= 0) & ((dist < win) | (key_slot[None, :] < SINKS))
            qk = tl.where(seen, qk, float("-inf"))
        else:
            qk = tl.where(valid[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        if HAS_MASK or MULTI or STATIC:  # a block with every key masked adds nothing (and must not make NaNs)
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:  # every block holds a visible key
            m_use = m_new
        alpha = tl.exp2(m_i - m_use)
        p_ = tl.exp2(qk - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p_, 1)
        v = tl.load(v_base + n[:, None].to(tl.int64) * s_vt + offs_d[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p_.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # a split whose keys are all masked: 0, weight 0
    tl.store(OP + b * s_ob + rows[:, None] * s_oh + s * s_os + offs_d[None, :], out, mask=gmask[:, None] & dmask[None, :])
    tl.store(LP + b * s_lb + rows * s_lh + s, m_i + tl.log2(l_i), mask=gmask)


def _combine(OP, LP, O, HEADS, SINK_LOGITS, s_ob, s_oh, s_os, s_lb, s_lh, s_Ob, s_Oh, s_Ot, N_KV, NS_FA, NS_SW, TQ,
             G: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, NS_PAD: tl.constexpr, SB: tl.constexpr,
             HAS_SINK_LOGITS: tl.constexpr):
    """Program (b, row): merge the splits of one query of one query head (row = head · TQ + query)
    by their log2-sum-exp. With ``HAS_SINK_LOGITS`` the head's sink logit (float32 [Hq]) joins the
    denominator as one more term with no value."""
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)  # the row
    head = h // TQ
    code = tl.load(HEADS + N_KV + head // G)
    ns = tl.where(code >= 0, NS_FA, NS_SW)
    offs_all = tl.arange(0, NS_PAD)
    lse = tl.load(LP + b * s_lb + h * s_lh + offs_all, mask=offs_all < ns, other=float("-inf"))
    m = tl.max(lse, 0)
    if HAS_SINK_LOGITS:
        sink = tl.load(SINK_LOGITS + head) * 1.4426950408889634  # log2 e
        m = tl.maximum(m, sink)
        total = tl.sum(tl.exp2(lse - m), 0) + tl.exp2(sink - m)
    else:
        m = tl.where(m == float("-inf"), 0.0, m)  # no visible key at all: the output is 0
        total = tl.sum(tl.exp2(lse - m), 0)
        total = tl.where(total > 0, total, 1.0)
    offs_d = tl.arange(0, D_PAD)
    dmask = offs_d < D
    acc = tl.zeros([D_PAD], tl.float32)
    offs_s = tl.arange(0, SB)
    for start in range(0, ns, SB):
        sp = start + offs_s
        smask = sp < ns
        w = tl.exp2(tl.load(LP + b * s_lb + h * s_lh + sp, mask=smask, other=float("-inf")) - m)
        o = tl.load(OP + b * s_ob + h * s_oh + sp[:, None] * s_os + offs_d[None, :], mask=smask[:, None] & dmask[None, :], other=0.0)
        acc += tl.sum(o * w[:, None], 0)
    tl.store(O + b * s_Ob + (h % TQ) * s_Ot + head * s_Oh + offs_d, (acc / total).to(O.dtype.element_ty), mask=dmask)


@lru_cache(maxsize=1)
def _kernels():
    # Lengths are not specialised (a length of 1 would turn one branch's value into a constant of
    # another type); strides are, so the compiler sees 16-aligned rows and vectorises the loads.
    counts = ("N_FA", "NS_FA", "NS_SW", "T_FA", "T_SW", "SW_SINKS", "SW_DELTA", "TQ", "WIN", "SINKS", "RING")
    return (triton.jit(_partial, do_not_specialize=counts),
            triton.jit(_combine, do_not_specialize=("N_KV", "NS_FA", "NS_SW", "TQ")))


def interpreted() -> bool:
    return triton is not None and bool(triton.knobs.runtime.interpret)


@lru_cache(maxsize=64)
def head_tables(num_kv_heads: int, fa_kv: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """int32 [2·H_kv]: the KV heads in kernel order (FA heads, then SWA heads), then for each KV head
    its index among the FA heads, or −(its index among the SWA heads) − 1."""
    fa = {h: i for i, h in enumerate(fa_kv)}
    swa = [h for h in range(num_kv_heads) if h not in fa]
    code = [fa[h] if h in fa else -swa.index(h) - 1 for h in range(num_kv_heads)]
    return torch.tensor(list(fa_kv) + swa + code, dtype=torch.int32, device=device)


@lru_cache(maxsize=8)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def num_splits(batch: int, long_heads: int, longest: int, device: torch.device) -> int:
    """Enough key chunks that the programs on the long heads fill the GPU ``FILL`` times over (the
    short heads' programs finish at once and do not count)."""
    want = -(-FILL * _sm_count(device) // max(1, batch * long_heads))
    return max(1, min(want, -(-longest // BLOCK_N), MAX_SPLITS))


@lru_cache(maxsize=8)
def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def dtype_ok(q: torch.Tensor) -> bool:
    """A dtype tl.dot takes on this device: fp16 / fp32 anywhere, bf16 from compute capability 8.0
    (Ampere) on; any of them in the interpreter."""
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return False
    return not (q.dtype == torch.bfloat16 and q.is_cuda and _capability(q.device) < (8, 0))


MAX_QUERIES = 16  # most queries per sequence in one call: a decode step (1) or the verification of drafts


def why_not(q: torch.Tensor, *kv: torch.Tensor, on_cpu: bool = False) -> str | None:
    """Why the kernel cannot take these tensors, or None: it needs 1 to ``MAX_QUERIES`` queries, unit
    stride on the head dim, a dtype tl.dot takes (``dtype_ok``), no gradient, and CUDA (or CPU tensors
    under the interpreter when ``on_cpu``, ``KernelConfig.triton_on_cpu``)."""
    if triton is None:
        return "triton is not installed"
    if not (q.is_cuda or (on_cpu and interpreted())):
        return "the Triton decode kernel runs on CUDA (or on CPU under TRITON_INTERPRET=1 with triton_on_cpu)"
    if not 1 <= q.shape[-2] <= MAX_QUERIES:
        return f"{q.shape[-2]} queries per sequence (the kernel takes 1 to {MAX_QUERIES})"
    if not dtype_ok(q):
        return f"dtype {q.dtype} is not one tl.dot takes on this device"
    if any(x.dtype != q.dtype or x.device != q.device or x.stride(-1) != 1 or x.shape[-2] == 0 for x in kv):
        return "keys and values must match the queries' dtype and device, with unit stride on the head dim and some keys"
    if q.stride(-1) != 1:
        return "the queries need unit stride on the head dim"
    if torch.is_grad_enabled() and q.requires_grad:
        return "the Triton decode kernel carries no gradient"
    return None


def usable(q: torch.Tensor, *kv: torch.Tensor, on_cpu: bool = False) -> bool:
    """Whether the kernel can take these tensors (:func:`why_not` finds no reason)."""
    return why_not(q, *kv, on_cpu=on_cpu) is None


def hybrid_decode(q, k_fa, v_fa, k_swa, v_swa, heads: torch.Tensor, scale: float, *, mask: torch.Tensor | None = None,
                  swa_sinks: int = 0, swa_offset: int = 0, splits: int | None = None,
                  window: int | None = None, sinks: int = 0, length: torch.Tensor | None = None,
                  ring: int = 0, softcap: float | None = None, sink_logits: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of the last Tq slots' queries over the held keys of their head's group.

    q [B, Hq, Tq, D]; k_fa/v_fa [B, n_fa, T, D] (every slot); k_swa/v_swa [B, n_swa, m, D]; ``heads``
    from :func:`head_tables`. ``mask``: an optional boolean padding mask over all T slots, [B, T] (or
    transformers' [B, 1, Tq, T], whose last row is the padding); the SWA keys sit at slots
    0…``swa_sinks``−1, then ``swa_offset``, … . One query (decode) sees every held key. Several
    (verifying drafts) see keys up to their own slot, on the SWA heads only inside ``window`` or among
    the first ``sinks`` slots. ``splits``: key chunks on the longer group (default :func:`num_splits`).
    Returns [B, Tq, Hq, D] in q's dtype; a query that sees no key gets 0.

    A static cache (one query): ``length`` is a device int64 tensor holding the slots written, the
    query's own included, one for the batch ([1]) or one per row ([B]: sequences at their own lengths,
    the slot pool of continuous batching); k_fa/v_fa are the preallocated buffers (read up to ``length`` only), the
    SWA keys a ring of ``swa_sinks`` + ``ring`` slots (static_cache.py), ``window`` required. Every
    size the launch depends on is then a buffer shape, so a captured CUDA graph stays valid.
    Either head group may be empty there (an all-FA or all-SWA layer).

    ``softcap``: scores capped to cap·tanh(s / cap); ``sink_logits`` [Hq]: one more logit per query
    head in the softmax, with no value (added once, in the merge of the splits).
    """
    b, hq, tq, d = q.shape
    static = length is not None
    if (tq > 1 or static) and window is None:
        raise ValueError("hybrid_decode: several queries, or a static cache, need the SWA heads' window")
    if static and tq != 1:
        raise ValueError("hybrid_decode: a static cache takes one query per sequence")
    n_fa, n_sw = k_fa.shape[1], k_swa.shape[1]
    if static and n_fa == 0:  # any tensor as the empty group's pointer: no program reads it
        k_fa, v_fa = k_swa, v_swa
    elif static and n_sw == 0:
        k_swa, v_swa = k_fa, v_fa
    group = hq // (n_fa + n_sw)
    t_fa, t_sw = k_fa.shape[-2] if n_fa else 0, k_swa.shape[-2] if n_sw else 0
    longest = max(t_fa, t_sw)
    ns = splits or num_splits(b, n_fa if t_fa >= t_sw else n_sw, longest, q.device)
    chunk = -(-longest // ns)
    chunk = -(-chunk // BLOCK_N) * BLOCK_N  # whole key blocks per split
    ns_fa, ns_sw = -(-t_fa // chunk), -(-t_sw // chunk)
    d_pad = max(16, triton.next_power_of_2(d))
    part = torch.empty(b, hq * tq, max(ns_fa, ns_sw), d_pad, dtype=torch.float32, device=q.device)
    lse = torch.empty(b, hq * tq, max(ns_fa, ns_sw), dtype=torch.float32, device=q.device)
    out = torch.empty(b, tq, hq, d, dtype=q.dtype, device=q.device)
    partial, combine = _kernels()
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    if mask is not None:
        mask = (mask[:, :, -1] if mask.dim() == 4 else mask).reshape(mask.shape[0], mask.shape[-1]).expand(b, -1).view(torch.uint8)
    mask_arg = mask if mask is not None else heads  # any pointer: not read without a mask
    len_arg = length if static else heads  # any pointer: not read unless static
    s_len = _length_stride(length, b) if static else 0
    if sink_logits is not None and sink_logits.shape != (hq,):
        raise ValueError(f"sink logits of shape {tuple(sink_logits.shape)} for {hq} query heads")
    sink_arg = heads if sink_logits is None else sink_logits.detach().to(device=q.device, dtype=torch.float32).contiguous()
    qk_scale, cap2 = score_scales(scale, softcap)
    partial[(b, n_fa * ns_fa + n_sw * ns_sw)](
        q, k_fa, v_fa, k_swa, v_swa, part, lse, heads, mask_arg,
        q.stride(0), q.stride(1), q.stride(2),
        k_fa.stride(0), k_fa.stride(1), k_fa.stride(2), v_fa.stride(0), v_fa.stride(1), v_fa.stride(2),
        k_swa.stride(0), k_swa.stride(1), k_swa.stride(2), v_swa.stride(0), v_swa.stride(1), v_swa.stride(2),
        part.stride(0), part.stride(1), part.stride(2), lse.stride(0), lse.stride(1),
        mask_arg.stride(0), mask_arg.stride(-1),
        n_fa, ns_fa, ns_sw, t_fa, t_sw, swa_sinks, swa_offset - swa_sinks, chunk, qk_scale, cap2,
        tq, window or 1, sinks, len_arg, s_len, max(1, ring),
        G=group, R_PAD=max(16, triton.next_power_of_2(group * tq)), D=d, D_PAD=d_pad, BLOCK=BLOCK_N, PRECISION=precision,
        HAS_MASK=mask is not None, MULTI=tq > 1, STATIC=static, SOFTCAP=softcap is not None,
        num_warps=NUM_WARPS, num_stages=NUM_STAGES,
    )
    combine[(b, hq * tq)](
        part, lse, out, heads, sink_arg, part.stride(0), part.stride(1), part.stride(2), lse.stride(0), lse.stride(1),
        out.stride(0), out.stride(2), out.stride(1), n_fa + n_sw, ns_fa, ns_sw, tq,
        G=group, D=d, D_PAD=d_pad, NS_PAD=max(2, triton.next_power_of_2(max(ns_fa, ns_sw))), SB=COMBINE_BLOCK,
        HAS_SINK_LOGITS=sink_logits is not None,
    )
    return out


# ---- the static cache's decode write ---------------------------------------------------------------
def _write(K, V, KF, VF, KS, VS, HEADS, LENP, S_LEN,
           s_kb, s_kh, s_vb, s_vh,
           s_kfb, s_kfh, s_kft, s_vfb, s_vfh, s_vft, s_ksb, s_ksh, s_kst, s_vsb, s_vsh, s_vst,
           N_FA, SINKS, RING, D: tl.constexpr, D_PAD: tl.constexpr):
    """Program (b, i): write the new key and value of the i-th KV head in kernel order (FA heads, then
    SWA heads) at the slot ``LENP`` holds (row b's at ``LENP + b·S_LEN``): FA heads at that index, SWA
    heads at their ring index."""
    b = tl.program_id(0).to(tl.int64)
    i = tl.program_id(1)
    pos = tl.load(LENP + b * S_LEN)
    h = tl.load(HEADS + i).to(tl.int64)
    offs = tl.arange(0, D_PAD)
    m = offs < D
    k = tl.load(K + b * s_kb + h * s_kh + offs, mask=m)
    v = tl.load(V + b * s_vb + h * s_vh + offs, mask=m)
    if i < N_FA:
        kp = KF + b * s_kfb + i.to(tl.int64) * s_kfh + pos * s_kft
        vp = VF + b * s_vfb + i.to(tl.int64) * s_vfh + pos * s_vft
    else:
        j = (i - N_FA).to(tl.int64)
        idx = tl.where(pos < SINKS, pos, SINKS + (pos - SINKS) % RING)
        kp = KS + b * s_ksb + j * s_ksh + idx * s_kst
        vp = VS + b * s_vsb + j * s_vsh + idx * s_vst
    tl.store(kp + offs, k, mask=m)
    tl.store(vp + offs, v, mask=m)


def _length_stride(length: torch.Tensor, batch: int) -> int:
    """The kernels' stride between rows' lengths: 0 for one length ([1]), else that of a [B] tensor."""
    if length.numel() == 1:
        return 0
    if length.dim() != 1 or length.numel() != batch:
        raise ValueError(f"lengths of shape {tuple(length.shape)} for a batch of {batch}: give [1] or [{batch}]")
    return length.stride(0)


@lru_cache(maxsize=1)
def _write_kernel():
    return triton.jit(_write, do_not_specialize=("N_FA", "SINKS", "RING"))


def write_static(k, v, k_fa, v_fa, k_swa, v_swa, heads: torch.Tensor, length: torch.Tensor, sinks: int, ring: int) -> None:
    """One launch for a static cache's decode write (``static_cache``): k/v [B, H_kv, 1, D] go to slot
    ``length`` (a device tensor, not read on the host; [1] for the batch or [B] per row) of the FA
    buffers and the SWA ring; ``heads``
    from :func:`head_tables`. The caller bumps ``length`` afterwards."""
    b, n_kv, _, d = k.shape
    n_fa, n_sw = k_fa.shape[1], k_swa.shape[1]
    if n_fa == 0:  # any tensor as the empty group's pointer: no program reads it
        k_fa, v_fa = k_swa, v_swa
    elif n_sw == 0:
        k_swa, v_swa = k_fa, v_fa
    _write_kernel()[(b, n_kv)](
        k, v, k_fa, v_fa, k_swa, v_swa, heads, length, _length_stride(length, b),
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_fa.stride(0), k_fa.stride(1), k_fa.stride(2), v_fa.stride(0), v_fa.stride(1), v_fa.stride(2),
        k_swa.stride(0), k_swa.stride(1), k_swa.stride(2), v_swa.stride(0), v_swa.stride(1), v_swa.stride(2),
        n_fa, sinks, max(1, ring), D=d, D_PAD=max(16, triton.next_power_of_2(d)),
    )
