"""Speed of consa's hybrid attention against full attention (GPU; ``--smoke`` runs tiny sizes on CPU).

Three measurements, all in one run so they share the machine state:

1. **prefill**: one layer's attention at Qwen3-0.6B shape (16 q / 8 kv heads, d = 128, bf16) at
   contexts 8K/32K/128K, windows 512/4096, FA shares 0.25/0.5: full causal SDPA vs the consa path
   (``consa_attention`` with a fixed plan: SDPA on the FA heads + the SWA prefill kernel on the SWA
   heads) vs ideal = full × (FA share + SWA share × window pairs / causal pairs). ``--swa-kernel``
   times the hybrid once per SWA kernel (``KernelConfig.swa_prefill``: flex = FlexAttention with a cached
   closed-form block mask, chunked = block-diagonal flash merged by LSE, flash = FlashAttention-2's
   local window, triton = the banded Triton kernel; fused / tfused = all heads in one FlexAttention /
   banded Triton call, ``KernelConfig.hybrid_prefill``), and each kernel on the SWA heads alone;
   ``--prefill-overlap`` adds the hybrid with the SWA heads on a side stream (``prefill_overlap``)
   with no stream priority, the FA heads first and the SWA heads first (``overlap_priority``);
   section ``prefill_sweep`` times the banded Triton kernel under each launch setting;
2. **decode**: B = 8, one new token over caches of 32K/128K, full cache vs the split a HybridCache
   holds (FA heads T slots, SWA heads W); time per step and bandwidth on the bytes read (K, V, q, out);
3. **generate**: a randomly initialised Qwen3-0.6B-shaped model, 32K-token prompt, greedy decoding:
   KV bytes held, peak memory, prefill time and decode tokens/s, full (DynamicCache) vs hybrid.

Times are medians over CUDA-event-timed repeats after warm-up; prefill and decode are timed both
eagerly and as CUDA-graph replays (what a serving loop does), the graph number is the headline.

    PYTHONPATH=src python3 benchmarks/attention_speed.py --out $OUT/attention_speed.json
    PYTHONPATH=src python3 benchmarks/attention_speed.py --contexts 8192,32768,131072 --windows 512,2048,4096 \
        --fa-shares 0.25 --swa-kernel flex,chunked,flash --prefill-overlap --skip breakdown,decode,generate \
        --budget-s 180 --out $OUT/swa_prefill.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
from dataclasses import replace
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from consa.attention import select
from consa.attention.attend import attention
from consa.attention.hybrid import consa_attention
from consa.attention.plan import KernelConfig, KeySlots, LayerPlan, SplitKV

Q_HEADS, KV_HEADS, HEAD_DIM = 16, 8, 128


# ---- timing ---------------------------------------------------------------------------------------
def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_ms(fn, device, target_ms=300.0, max_reps=50, graph=False):
    """Median milliseconds of ``fn()``; with ``graph`` the call is captured once and replayed."""
    for _ in range(3):
        fn()
    _sync(device)
    run = fn
    if graph and device.type == "cuda":
        g = torch.cuda.CUDAGraph()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            fn()
            with torch.cuda.graph(g, stream=s):
                fn()
        torch.cuda.current_stream().wait_stream(s)
        torch.cuda.synchronize()
        run = g.replay
        run()
    times = []
    t_start = time.perf_counter()
    while len(times) < max_reps:
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            run()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            run()
            times.append((time.perf_counter() - t0) * 1e3)
        if len(times) >= 3 and (time.perf_counter() - t_start) * 1e3 > target_ms:
            break
    return statistics.median(times)


def both(fn, device, **kw):
    out = {"eager_ms": time_ms(fn, device, **kw)}
    if device.type == "cuda":
        try:
            out["graph_ms"] = time_ms(fn, device, graph=True, **kw)
        except Exception as e:  # capture can fail on some paths: keep the eager number
            out["graph_error"] = f"{type(e).__name__}: {e}"[:200]
    out["ms"] = out.get("graph_ms", out["eager_ms"])
    return out


def copy_bandwidth(device, nbytes):
    x = torch.randn(nbytes // 2, device=device, dtype=torch.bfloat16)
    y = torch.empty_like(x)
    ms = time_ms(lambda: y.copy_(x), device)
    return 2 * nbytes / (ms * 1e-3)


# ---- attention inputs -----------------------------------------------------------------------------
def module_with_plan(n_fa_kv, window, sinks=0):
    plan = LayerPlan(0, KV_HEADS, window, sinks, "fixed", fa_kv=list(range(n_fa_kv)))
    return SimpleNamespace(consa_plan=plan, training=False)


def qkv(batch, tq, tk, device, dtype, seed=0):
    """Random q, k, v in the layout transformers produces ([B,T,H,D] storage seen as [B,H,T,D])."""
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(batch, tq, Q_HEADS, HEAD_DIM, device=device, dtype=dtype, generator=g).transpose(1, 2)
    k = torch.randn(batch, tk, KV_HEADS, HEAD_DIM, device=device, dtype=dtype, generator=g).transpose(1, 2)
    v = torch.randn(batch, tk, KV_HEADS, HEAD_DIM, device=device, dtype=dtype, generator=g).transpose(1, 2)
    return q, k, v


def window_pairs(t, w, sinks=0):
    return sum(min(i + 1, w) for i in range(t)) if t < 10_000 else t * w - w * (w - 1) // 2


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def prefill_point(t, w, share, device, dtype, check, swa_kernels=("auto",), overlap=False):
    """Full vs hybrid at one (context, window, FA share); the hybrid once per SWA prefill kernel
    (``KernelConfig.swa_prefill``), with the SWA heads' kernel alone and, with ``overlap``, the hybrid
    with ``prefill_overlap``. ``hybrid`` / ``rel_err_vs_masked_sdpa`` are the first kernel's."""
    scale = HEAD_DIM**-0.5
    q, k, v = qkv(1, t, t, device, dtype, seed=t + w)
    n_fa = round(share * KV_HEADS)
    g = Q_HEADS // KV_HEADS
    full_mod = SimpleNamespace(training=False)
    hyb_mod = module_with_plan(n_fa, w)
    full = lambda: consa_attention(full_mod, q, k, v, None, scale)  # noqa: E731
    hyb = lambda: consa_attention(hyb_mod, q, k, v, None, scale)  # noqa: E731
    qf, kf, vf = q[:, : n_fa * g], k[:, :n_fa], v[:, :n_fa]
    qs, ks, vs = q[:, n_fa * g :], k[:, n_fa:], v[:, n_fa:]  # the views the hybrid path attends over
    row = {"context": t, "window": w, "fa_share": share, "swa_kernel": swa_kernels[0]}
    if check:  # the fast path against SDPA with an explicit per-head mask (a few queries)
        idx = torch.linspace(0, t - 1, 64, device=device).long()
        kpos = torch.arange(t, device=device)
        vis = idx[:, None] >= kpos[None, :]
        band = vis & (idx[:, None] - kpos[None, :] < w)
        allowed = torch.stack([vis if h < n_fa * g else band for h in range(Q_HEADS)])[None]
        ref = F.scaled_dot_product_attention(
            q[:, :, idx].float(), k.float().repeat_interleave(g, 1), v.float().repeat_interleave(g, 1),
            attn_mask=allowed, scale=scale,
        ).transpose(1, 2)
    f = both(full, device)
    ratio = share + (1 - share) * window_pairs(t, w) / (t * (t + 1) / 2)
    row.update(full=f, ideal_ms=f["ms"] * ratio, pair_ratio=ratio)
    row["fa_only"] = both(lambda: attention(qf, kf, vf, scale=scale), device) if n_fa else None
    if check and n_fa and device.type == "cuda":  # the FA heads alone on each causal kernel there is
        row["fa_only_by_kernel"] = fa_kernels(qf, kf, vf, scale, device)
    row["swa_ideal_ms"] = f["ms"] * (1 - share) * window_pairs(t, w) / (t * (t + 1) / 2)
    row["by_kernel"] = {}
    for kern in swa_kernels:
        # "fused": one FlexAttention call over all heads, its "swa_only" the auto kernel's; "tfused":
        # one launch of the banded Triton kernel over all heads, its "swa_only" that kernel's
        cfg = KernelConfig(swa_prefill={"fused": "auto", "tfused": "triton"}.get(kern, kern),
                           hybrid_prefill={"fused": "fused", "tfused": "triton"}.get(kern, "split"))
        with select.override(hyb_mod.consa_plan, cfg):
            r = {}
            if check:
                r["rel_err_vs_masked_sdpa"] = rel_err(hyb()[0][:, idx], ref)
            r["hybrid"] = both(hyb, device)
            r["swa_only"] = both(lambda: attention(qs, ks, vs, scale=scale, window=w, config=cfg), device)
        if overlap:  # the default ("hybrid") against the side stream forced on and off: no stream
            # priorities, then the FA heads' or the SWA heads' stream first
            for first, key in ((None, "hybrid_overlap"), ("fa", "hybrid_overlap_fa_first"), ("swa", "hybrid_overlap_swa_first")):
                with select.override(hyb_mod.consa_plan, replace(cfg, prefill_overlap=True, overlap_priority=first)):
                    r[key] = both(hyb, device)
            with select.override(hyb_mod.consa_plan, replace(cfg, prefill_overlap=False)):
                r["hybrid_no_overlap"] = both(hyb, device)
        r["hybrid_over_ideal"] = r["hybrid"]["ms"] / row["ideal_ms"]
        r["swa_only_over_ideal"] = r["swa_only"]["ms"] / row["swa_ideal_ms"]
        row["by_kernel"][kern] = r
    first = row["by_kernel"][swa_kernels[0]]
    row["hybrid"] = first["hybrid"]
    if check:
        row["rel_err_vs_masked_sdpa"] = first["rel_err_vs_masked_sdpa"]
    row["hybrid_over_ideal"] = row["hybrid"]["ms"] / row["ideal_ms"]
    row["speedup_vs_full"] = f["ms"] / row["hybrid"]["ms"]
    return row


def fa_kernels(q, k, v, scale, device):
    """Causal attention of a few heads (the FA group) on each SDPA backend and on the banded Triton
    kernel (window = T, tiles longest first): which one fills the GPU best when the heads are few."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from consa.attention import triton_prefill as tp

    out = {}
    for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION),
                          ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
        def run(backend=backend):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
        try:
            out[name] = both(run, device)["ms"]
        except Exception as e:
            out[name] = f"{type(e).__name__}: {e}"[:120]
    t = q.shape[-2]
    out["triton"] = both(lambda: tp.banded_attention(q, k, v, (t,) * k.shape[1], 0, scale), device)["ms"]
    return out


def decode_inputs(t, w, share, batch, device, dtype):
    """One decode step after t tokens: the query, the full cache and what a hybrid cache holds of it
    (FA heads first: every slot; SWA heads: the last w slots)."""
    n_fa = round(share * KV_HEADS)
    q, k, v = qkv(batch, 1, t + 1, device, dtype, seed=7)
    k, v = k.contiguous(), v.contiguous()  # a cache's storage
    kf, vf = k[:, :n_fa].contiguous(), v[:, :n_fa].contiguous()
    ks, vs = k[:, n_fa:, t + 1 - w :].contiguous(), v[:, n_fa:, t + 1 - w :].contiguous()
    return n_fa, q, k, v, kf, vf, ks, vs, KeySlots(0, t + 1 - w)


def decode_point(t, w, share, batch, device, dtype, bw):
    scale = HEAD_DIM**-0.5
    n_fa, q, k, v, kf, vf, ks, vs, slots = decode_inputs(t, w, share, batch, device, dtype)
    split_k, split_v = SplitKV(kf, ks, slots), SplitKV(vf, vs, slots)
    mod = module_with_plan(n_fa, w)
    full_mod = SimpleNamespace(training=False)
    full = lambda: consa_attention(full_mod, q, k, v, None, scale)  # noqa: E731
    hyb = lambda: consa_attention(mod, q, split_k, split_v, None, scale)  # noqa: E731
    # correctness: the split equals full attention restricted per head
    out = hyb()[0]
    g = Q_HEADS // KV_HEADS
    ref_fa = F.scaled_dot_product_attention(q[:, : n_fa * g].float(), kf.float().repeat_interleave(g, 1), vf.float().repeat_interleave(g, 1), scale=scale)
    ref_sw = F.scaled_dot_product_attention(q[:, n_fa * g :].float(), ks.float().repeat_interleave(g, 1), vs.float().repeat_interleave(g, 1), scale=scale)
    ref = torch.cat([ref_fa, ref_sw], 1).transpose(1, 2)
    esz = torch.finfo(dtype).bits // 8
    io = 2 * q.numel() * esz  # q read + out written
    bytes_full = 2 * k.numel() * esz + io
    bytes_hyb = 2 * (kf.numel() + ks.numel()) * esz + io
    f = both(full, device)
    h = both(hyb, device)
    # a left-padded batch: row 0 starts 1024 slots late (the kernel reads the padding mask per key)
    pad = torch.ones(batch, 1, 1, t + 1, dtype=torch.bool, device=device)
    pad[0, ..., :1024] = False
    h_masked = both(lambda: consa_attention(mod, q, split_k, split_v, pad, scale), device)
    # the SDPA pair (side stream, then serial) against the default one-launch Triton decode
    with select.override(mod.consa_plan, decode="sdpa"):
        h_sdpa = both(hyb, device)
        err_sdpa = rel_err(hyb()[0], ref)
    with select.override(mod.consa_plan, decode="sdpa", decode_overlap=False):
        h_serial = both(hyb, device)
    # the parts alone: where a gap to the bytes-ideal time comes from
    fa_only = both(lambda: attention(q[:, : n_fa * g], kf, vf, scale=scale), device)
    swa_only = both(lambda: attention(q[:, n_fa * g :], ks, vs, scale=scale, window=w, slots=slots), device)
    return {
        "decode_kernel": mod.consa_plan.kernels.decode, "hybrid_sdpa": h_sdpa, "rel_err_sdpa": err_sdpa, "hybrid_padded": h_masked,
        "hybrid_sdpa_no_overlap": h_serial, "fa_only": fa_only, "swa_only": swa_only,
        "fa_only_TBps": (2 * kf.numel() * esz) / (fa_only["ms"] * 1e-3) / 1e12,
        "cache": t, "batch": batch, "window": w, "fa_share": share,
        "rel_err": rel_err(out, ref),
        "full": f, "hybrid": h,
        "bytes_full": bytes_full, "bytes_hybrid": bytes_hyb,
        "full_TBps": bytes_full / (f["ms"] * 1e-3) / 1e12,
        "hybrid_TBps": bytes_hyb / (h["ms"] * 1e-3) / 1e12,
        "hybrid_bw_fraction": bytes_hyb / (h["ms"] * 1e-3) / bw,
        "bytes_ideal_ms": bytes_hyb / bw * 1e3,
        "speedup_vs_full": f["ms"] / h["ms"],
    }


def decode_sweep_point(t, w, share, batch, device, dtype, bw):
    """The one-launch Triton decode alone under each launch setting (``triton_decode`` knobs):
    key block, programs per SM on the long heads, warps, pipeline stages."""
    from consa.attention import triton_decode as td

    scale = HEAD_DIM**-0.5
    n_fa, q, _, _, kf, vf, ks, vs, _ = decode_inputs(t, w, share, batch, device, dtype)
    heads = td.head_tables(KV_HEADS, tuple(range(n_fa)), device)
    esz = torch.finfo(dtype).bits // 8
    nbytes = 2 * (kf.numel() + ks.numel()) * esz + 2 * q.numel() * esz
    saved = td.BLOCK_N, td.FILL, td.NUM_WARPS, td.NUM_STAGES
    rows = []
    try:
        for block in (64, 128):
            for warps in (4, 8):
                for stages in (2, 3):
                    for fill in (2, 4, 8):
                        td.BLOCK_N, td.FILL, td.NUM_WARPS, td.NUM_STAGES = block, fill, warps, stages
                        cfg = {"block": block, "warps": warps, "stages": stages, "fill": fill}
                        try:
                            ms = time_ms(lambda: td.hybrid_decode(q, kf, vf, ks, vs, heads, scale), device, target_ms=60, graph=True)
                            rows.append({**cfg, "ms": ms, "bw_fraction": nbytes / (ms * 1e-3) / bw})
                        except Exception as e:
                            rows.append({**cfg, "error": str(e)[:200]})
    finally:
        td.BLOCK_N, td.FILL, td.NUM_WARPS, td.NUM_STAGES = saved
    ok = [r for r in rows if "ms" in r]
    best = min(ok, key=lambda r: r["ms"]) if ok else None
    return {"cache": t, "batch": batch, "window": w, "fa_share": share, "bytes_ideal_ms": nbytes / bw * 1e3,
            "best": best, "configs": rows}


PREFILL_SWEEP = [(128, block, warps, stages, split) for block in (32, 64) for warps in (4, 8)
                 for stages in (2, 3, 4) for split in (True, False)]
# a first, wider sweep (rows 64/128 × block 32/64/128 × warps 4/8 × stages 2/3/4, unsplit loops not yet an
# option) always chose 128 rows: docs/bench/prefill_triton_sweep_h200.json


def prefill_sweep_point(t, w, share, device, dtype, configs=PREFILL_SWEEP):
    """The banded Triton prefill (``triton_prefill``) under each launch setting: rows per program
    (query heads of a group × positions), keys per step, warps, pipeline stages. Times the SWA heads
    alone and the whole hybrid layer in one launch, against full SDPA measured here."""
    from consa.attention import triton_prefill as tp

    scale = HEAD_DIM**-0.5
    q, k, v = qkv(1, t, t, device, dtype, seed=t + w)
    n_fa = round(share * KV_HEADS)
    g = Q_HEADS // KV_HEADS
    qs, ks, vs = q[:, n_fa * g :], k[:, n_fa:], v[:, n_fa:]
    full = time_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True), device, graph=True)
    pairs = window_pairs(t, w) / (t * (t + 1) / 2)
    swa_ideal, ideal = full * (1 - share) * pairs, full * (share + (1 - share) * pairs)
    fa_kv = tuple(range(n_fa))
    saved = tp.BLOCK_ROWS, tp.BLOCK_N, tp.NUM_WARPS, tp.NUM_STAGES, tp.SPLIT_LOOPS
    rows = []
    try:
        for cfg in configs:
            tp.BLOCK_ROWS, tp.BLOCK_N, tp.NUM_WARPS, tp.NUM_STAGES, tp.SPLIT_LOOPS = cfg
            r = dict(zip(("rows", "block", "warps", "stages", "split"), cfg))
            try:  # graph replays: at 8K the eager launch overhead is a sizeable part of the kernel
                r["swa_ms"] = time_ms(lambda: tp.sliding(qs, ks, vs, w, 0, scale), device, target_ms=60, graph=True)
                r["hybrid_ms"] = time_ms(lambda: tp.hybrid(q, k, v, fa_kv, w, 0, scale), device, target_ms=60, graph=True)
                r["swa_over_ideal"], r["hybrid_over_ideal"] = r["swa_ms"] / swa_ideal, r["hybrid_ms"] / ideal
            except Exception as e:
                r["error"] = f"{type(e).__name__}: {e}"[:200]
            rows.append(r)
    finally:
        tp.BLOCK_ROWS, tp.BLOCK_N, tp.NUM_WARPS, tp.NUM_STAGES, tp.SPLIT_LOOPS = saved
    ok = [r for r in rows if "hybrid_ms" in r]
    return {"context": t, "window": w, "fa_share": share, "full_ms": full, "ideal_ms": ideal, "swa_ideal_ms": swa_ideal,
            "best_swa": min(ok, key=lambda r: r["swa_ms"]) if ok else None,
            "best_hybrid": min(ok, key=lambda r: r["hybrid_ms"]) if ok else None, "configs": rows}


def breakdown_point(t, w, share, device, dtype):
    """Where the hybrid prefill time goes: FA SDPA alone, SWA alone (the default kernel, and flex
    under FlexAttention launch settings), merge."""
    scale = HEAD_DIM**-0.5
    q, k, v = qkv(1, t, t, device, dtype, seed=11)
    n_fa = round(share * KV_HEADS)
    g = Q_HEADS // KV_HEADS
    qf, kf, vf = q[:, : n_fa * g], k[:, :n_fa], v[:, :n_fa]
    qs, ks, vs = q[:, n_fa * g :], k[:, n_fa:], v[:, n_fa:]
    row = {"context": t, "window": w, "fa_share": share}
    row["fa_sdpa"] = both(lambda: attention(qf, kf, vf, scale=scale), device)
    row["swa_flex_default"] = both(lambda: attention(qs, ks, vs, scale=scale, window=w), device)
    qc, kc, vc = qs.contiguous(), ks.contiguous(), vs.contiguous()
    row["swa_flex_contiguous_inputs"] = both(lambda: attention(qc, kc, vc, scale=scale, window=w), device)
    a, b = attention(qf, kf, vf, scale=scale), attention(qs, ks, vs, scale=scale, window=w)
    row["merge_cat_transpose"] = both(lambda: torch.cat([a, b], 1).transpose(1, 2).contiguous(), device)
    # what a merge straight into transformers' [B,T,H,D] output layout costs (one copy, no transpose)
    row["merge_bthd"] = both(lambda: torch.cat([a.transpose(1, 2), b.transpose(1, 2)], 2), device)
    for name, opts in (("bm128_bn64_w8_s3", {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3}),
                       ("bm128_bn128_w8_s2", {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 2})):
        cfg = KernelConfig(swa_prefill="flex", flex_options=tuple(opts.items()))
        try:
            row["swa_flex_" + name] = both(lambda: attention(qs, ks, vs, scale=scale, window=w, config=cfg), device)
        except Exception as e:
            row["swa_flex_" + name] = {"error": f"{type(e).__name__}: {e}"[:300]}
    return row


# ---- end-to-end generate --------------------------------------------------------------------------
def qwen3_config(smoke):
    from transformers import AutoConfig

    if smoke:
        return AutoConfig.for_model(
            "qwen3", vocab_size=503, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
            num_attention_heads=Q_HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM // 4,
            max_position_embeddings=4096, use_sliding_window=False, sliding_window=None,
        )
    return AutoConfig.for_model(  # Qwen3-0.6B
        "qwen3", vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
        num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
        rope_theta=1_000_000, tie_word_embeddings=True, use_sliding_window=False, sliding_window=None,
        rms_norm_eps=1e-6,
    )


def generate_point(context, new_tokens, window, share, device, dtype, smoke):
    import consa
    from consa.allocation import Allocation
    from consa.attention.cache import HybridCache
    from consa.compat import cache_kwargs
    from transformers import AutoModelForCausalLM, DynamicCache

    cfg = qwen3_config(smoke)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=dtype).eval()
    ids = torch.randint(3, cfg.vocab_size, (1, context), device=device)
    shape = consa.model_shape(model)
    n_fa = round(share * shape.num_kv_heads)
    alloc = Allocation.from_units(
        [h < n_fa for _ in range(shape.num_layers) for h in range(shape.num_kv_heads)], "kv_head", shape, window
    )
    kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0, attention_mask=torch.ones_like(ids))
    results = {"context": context, "new_tokens": new_tokens, "window": window, "fa_share": share}

    def run(make_cache, n):
        cache = make_cache()
        _sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() if device.type == "cuda" else 0
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, **cache_kwargs(cache, model), max_new_tokens=n, min_new_tokens=n, **kw)
        _sync(device)
        dt = time.perf_counter() - t0
        kv = sum(x.numel() * x.element_size() for layer in cache.layers for x in _layer_tensors(layer))
        peak = (torch.cuda.max_memory_allocated() - base) if device.type == "cuda" else None
        return out, dt, kv, peak

    for name, make in (
        ("full", lambda: DynamicCache(config=model.config)),
        ("hybrid", lambda: HybridCache(consa.plans_of(model))),
        ("hybrid_sdpa", lambda: HybridCache(consa.plans_of(model))),  # decode on the SDPA pair instead of one Triton launch
    ):
        if name == "hybrid":
            consa.apply_allocation(model, alloc)
        if name == "hybrid_sdpa":
            consa.apply_allocation(model, alloc, kernels=KernelConfig(decode="sdpa"))
        run(make, 2)  # warm-up (compiles the flex kernel for this shape)
        _, t_prefill, _, _ = run(make, 1)
        out, t_total, kv, peak = run(make, new_tokens)
        results[name] = {
            "prefill_s": t_prefill,
            "total_s": t_total,
            "decode_tokens_per_s": (new_tokens - 1) / max(t_total - t_prefill, 1e-9),
            "tokens_per_s_overall": new_tokens / t_total,
            "kv_bytes": kv,
            "peak_mem_over_weights_bytes": peak,
        }
        results[name + "_tokens"] = out[0, context:].tolist()[:16]
    results["kv_ratio"] = results["hybrid"]["kv_bytes"] / results["full"]["kv_bytes"]
    results["same_first_tokens"] = results["full_tokens"] == results["hybrid_tokens"]
    return results


def _layer_tensors(layer):
    names = ("fa_keys", "fa_values", "swa_keys", "swa_values") if hasattr(layer, "fa_keys") else ("keys", "values")
    return [getattr(layer, n) for n in names if getattr(layer, n, None) is not None]


# ---- main -----------------------------------------------------------------------------------------
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="attention_speed.json")
    p.add_argument("--smoke", action="store_true", help="tiny sizes (CPU ok): checks the script, not speed")
    p.add_argument("--contexts", default="8192,32768,131072")
    p.add_argument("--windows", default="512,4096")
    p.add_argument("--fa-shares", default="0.25,0.5")
    p.add_argument("--decode-caches", default="32768,131072")
    p.add_argument("--decode-batch", type=int, default=8)
    p.add_argument("--gen-context", type=int, default=32768)
    p.add_argument("--gen-tokens", type=int, default=64)
    p.add_argument("--gen-window", type=int, default=512)
    p.add_argument("--gen-fa-share", type=float, default=0.25)
    p.add_argument("--skip", default="", help="comma list of sections to skip: prefill,prefill_sweep,breakdown,decode,sweep,generate")
    p.add_argument("--budget-s", type=float, default=420, help="stop starting new points after this many seconds")
    p.add_argument("--swa-kernel", default="auto",
                   help="comma list of SWA prefill kernels (KernelConfig.swa_prefill) the prefill section measures: "
                   "flex,chunked,flash,triton,auto, and fused / tfused (all heads in one FlexAttention / banded Triton "
                   "call, KernelConfig.hybrid_prefill)")
    p.add_argument("--triton-prefill", default="", help="launch settings of the banded Triton prefill: rows,block,warps,stages,split (1: three loops)")
    p.add_argument("--prefill-overlap", action="store_true",
                   help="also time the hybrid prefill with KernelConfig.prefill_overlap forced on and off (SWA heads on a side stream)")
    a = p.parse_args(argv)
    swa_kernels = tuple(x.strip() for x in a.swa_kernel.split(",") if x.strip())
    bad = set(swa_kernels) - {"flex", "chunked", "flash", "triton", "auto", "fused", "tfused"}
    if bad or not swa_kernels:
        p.error(f"--swa-kernel: unknown {sorted(bad)}; choose from flex,chunked,flash,triton,auto,fused,tfused")
    if a.triton_prefill:
        from consa.attention import triton_prefill as tp

        try:
            *cfg, split = (int(x) for x in a.triton_prefill.split(","))
            tp.BLOCK_ROWS, tp.BLOCK_N, tp.NUM_WARPS, tp.NUM_STAGES = cfg
            tp.SPLIT_LOOPS = bool(split)
        except ValueError:
            p.error("--triton-prefill: five integers rows,block,warps,stages,split")

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if a.smoke:
        a.contexts, a.windows, a.decode_caches, a.gen_context, a.gen_tokens, a.gen_window = "512,1536", "64,256", "1024", 300, 6, 32
        a.decode_batch = 2
    torch._dynamo.config.cache_size_limit = max(64, torch._dynamo.config.cache_size_limit)  # one flex compile per shape
    t_start = time.perf_counter()
    info = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "dtype": str(dtype),
        "shape": {"q_heads": Q_HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM},
        "swa_kernels": list(swa_kernels),
        "prefill_overlap": a.prefill_overlap,
        "command": "PYTHONPATH=src python3 benchmarks/attention_speed.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except Exception:  # pragma: no cover
        pass
    res = {"info": info, "prefill": [], "prefill_sweep": [], "breakdown": [], "decode": [], "sweep": [], "generate": None, "errors": []}
    bw = copy_bandwidth(device, (1 << 31) if device.type == "cuda" else (1 << 24))
    info["copy_bandwidth_TBps"] = bw / 1e12

    def save():
        res["info"]["elapsed_s"] = time.perf_counter() - t_start
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)

    def guarded(section, fn, *args):
        if time.perf_counter() - t_start > a.budget_s:
            res["errors"].append(f"{section} {args[:3]}: skipped (time budget)")
            return None
        try:
            out = fn(*args)
            print(f"[{time.perf_counter() - t_start:6.1f}s] {section} {args[:3]} done", flush=True)
            return out
        except Exception as e:
            res["errors"].append(f"{section} {args[:3]}: {type(e).__name__}: {e}"[:500])
            traceback.print_exc()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            return None
        finally:
            save()

    contexts = [int(x) for x in a.contexts.split(",")]
    windows = [int(x) for x in a.windows.split(",")]
    shares = [float(x) for x in a.fa_shares.split(",")]
    skip = set(a.skip.split(",")) - {""}
    if "prefill" not in skip:
        for t in contexts:
            for share in shares:
                for w in windows:
                    row = guarded("prefill", prefill_point, t, w, share, device, dtype, t <= 32768, swa_kernels, a.prefill_overlap)
                    if row:
                        res["prefill"].append(row)
    if "prefill_sweep" not in skip:
        points = [(8192, 512, 0.25), (8192, 512, 0.5), (32768, 512, 0.25), (131072, 512, 0.25)]  # the windows it runs
        for t, w, share in ([(512, 64, 0.25)] if a.smoke else points):
            row = guarded("prefill_sweep", prefill_sweep_point, t, w, share, device, dtype, PREFILL_SWEEP[:2] if a.smoke else PREFILL_SWEEP)
            if row:
                res["prefill_sweep"].append(row)
    if "breakdown" not in skip:
        for t in contexts[:2]:
            row = guarded("breakdown", breakdown_point, t, windows[0], shares[0], device, dtype)
            if row:
                res["breakdown"].append(row)
    if "decode" not in skip:
        for t in [int(x) for x in a.decode_caches.split(",")]:
            for share in shares:
                for w in windows:
                    row = guarded("decode", decode_point, t, w, share, a.decode_batch, device, dtype, bw)
                    if row:
                        res["decode"].append(row)
    if "sweep" not in skip:
        for t, w, share in ((32768, 512, 0.25), (32768, 4096, 0.25), (131072, 512, 0.25), (32768, 4096, 0.5)):
            if a.smoke:
                t, w = 1024, 64
            row = guarded("sweep", decode_sweep_point, t, w, share, a.decode_batch, device, dtype, bw)
            if row:
                res["sweep"].append(row)
            if a.smoke:
                break
    if "generate" not in skip:
        res["generate"] = guarded("generate", generate_point, a.gen_context, a.gen_tokens, a.gen_window, a.gen_fa_share, device, dtype, a.smoke)
    save()
    print_tables(res)
    return 0


def minimax_prefill_config(sweep_rows):
    """The swept Triton prefill setting whose worst ratio to the best setting of each point (SWA heads
    alone) is smallest, and that ratio; None without a setting that ran at every point."""
    rows = [r for r in sweep_rows if r.get("best_swa")]
    ratios = {}
    for r in rows:
        for c in r["configs"]:
            if "swa_ms" in c:
                key = (c["rows"], c["block"], c["warps"], c["stages"], int(c.get("split", True)))
                ratios.setdefault(key, []).append(c["swa_ms"] / r["best_swa"]["swa_ms"])
    full = {k: max(v) for k, v in ratios.items() if len(v) == len(rows)}
    return min(full.items(), key=lambda kv: kv[1]) if full else None


def print_tables(res):
    i = res["info"]
    print(f"\n{i['device']}  torch {i['torch']}  transformers {i.get('transformers')}  copy {i['copy_bandwidth_TBps']:.2f} TB/s")
    print("\nprefill (ms; graph replay where it captured)")
    print(f"{'ctx':>7} {'W':>5} {'FA':>5} {'full':>9} {'hybrid':>9} {'ideal':>9} {'hyb/ideal':>9} {'speedup':>8} {'eager hyb':>9}")
    for r in res["prefill"]:
        print(
            f"{r['context']:>7} {r['window']:>5} {r['fa_share']:>5.2f} {r['full']['ms']:>9.3f} {r['hybrid']['ms']:>9.3f} "
            f"{r['ideal_ms']:>9.3f} {r['hybrid_over_ideal']:>9.2f} {r['speedup_vs_full']:>7.2f}x {r['hybrid']['eager_ms']:>9.3f}"
        )
    rows = [r for r in res["prefill"] if r.get("by_kernel")]
    if rows:
        print("\nSWA prefill kernels (ms): SWA heads alone vs their ideal (full x SWA share x window/causal pairs), hybrid layer")
        print(f"{'ctx':>7} {'W':>5} {'FA':>5} {'kernel':>8} {'swa':>8} {'swa ideal':>9} {'swa/ideal':>9} {'hybrid':>8} {'overlap/fa/swa first':>21} {'hyb/ideal':>9} {'rel err':>8}")
        for r in rows:
            for kern, x in r["by_kernel"].items():
                ov = f"{x['hybrid_overlap']['ms']:.3f}" if "hybrid_overlap" in x else ""
                ov += "".join(f"/{x[n]['ms']:.3f}" for n in ("hybrid_overlap_fa_first", "hybrid_overlap_swa_first") if n in x)
                err = f"{x['rel_err_vs_masked_sdpa']:.1e}" if "rel_err_vs_masked_sdpa" in x else ""
                print(
                    f"{r['context']:>7} {r['window']:>5} {r['fa_share']:>5.2f} {kern:>8} {x['swa_only']['ms']:>8.3f} {r['swa_ideal_ms']:>9.3f} "
                    f"{x['swa_only_over_ideal']:>9.2f} {x['hybrid']['ms']:>8.3f} {ov:>21} {x['hybrid_over_ideal']:>9.2f} {err:>8}"
                )
    for r in res.get("prefill_sweep", []):
        for name, key in (("best_swa", "swa"), ("best_hybrid", "hybrid")):
            b = r[name]
            if b:
                print(f"triton prefill sweep ctx {r['context']} W {r['window']} FA {r['fa_share']}: {key} best rows {b['rows']} block {b['block']} "
                      f"warps {b['warps']} stages {b['stages']} split {b['split']}: {b[key + '_ms']:.3f} ms = {b[key + '_over_ideal']:.2f}x ideal")
    pick = minimax_prefill_config(res.get("prefill_sweep", []))
    if pick:
        print(f"triton prefill setting never further behind the best (SWA heads alone, all swept points): "
              f"--triton-prefill {','.join(map(str, pick[0]))} (worst {pick[1]:.3f}x the best)")
    fa_rows = [r for r in res["prefill"] if r.get("fa_only_by_kernel")]
    if fa_rows:
        print("\nFA heads alone, causal (ms): " + ", ".join(fa_rows[0]["fa_only_by_kernel"]))
        for r in fa_rows:
            cells = " ".join(f"{x:.3f}" if isinstance(x, float) else "err" for x in r["fa_only_by_kernel"].values())
            print(f"  ctx {r['context']} W {r['window']} FA {r['fa_share']}: {cells}  (default {r['fa_only']['ms']:.3f})")
    if res.get("breakdown"):
        print("\nbreakdown of the hybrid prefill (ms)")
        for r in res["breakdown"]:
            parts = "  ".join(f"{k}={v['ms']:.3f}" for k, v in r.items() if isinstance(v, dict) and "ms" in v)
            print(f"  ctx {r['context']} W {r['window']} FA {r['fa_share']}: {parts}")
    print("\ndecode, one step (ms; graph replay); bandwidth on the bytes each path reads")
    print(f"{'cache':>7} {'B':>3} {'W':>5} {'FA':>5} {'full':>8} {'TB/s':>6} {'hybrid':>8} {'TB/s':>6} {'%copyBW':>7} {'bytes-ideal':>11} {'sdpa pair':>9} {'rel err':>8} {'padded':>8}")
    for r in res["decode"]:
        sdpa = f"{r['hybrid_sdpa']['ms']:.4f}" if "hybrid_sdpa" in r else ""
        padded = f"{r['hybrid_padded']['ms']:.4f}" if "hybrid_padded" in r else ""
        print(
            f"{r['cache']:>7} {r['batch']:>3} {r['window']:>5} {r['fa_share']:>5.2f} {r['full']['ms']:>8.4f} {r['full_TBps']:>6.2f} "
            f"{r['hybrid']['ms']:>8.4f} {r['hybrid_TBps']:>6.2f} {100 * r['hybrid_bw_fraction']:>6.1f}% {r['bytes_ideal_ms']:>11.4f} "
            f"{sdpa:>9} {r['rel_err']:>8.1e} {padded:>8}"
        )
    for r in res.get("sweep", []):
        b = r["best"]
        if b:
            print(f"\ntriton decode sweep at cache {r['cache']} W {r['window']} FA {r['fa_share']}: best block {b['block']} "
                  f"warps {b['warps']} stages {b['stages']} fill {b['fill']}: {b['ms']:.4f} ms, {100 * b['bw_fraction']:.1f}% of copy BW "
                  f"(bytes-ideal {r['bytes_ideal_ms']:.4f})")
    g = res.get("generate")
    if g:
        print(f"\ngenerate: context {g['context']}, {g['new_tokens']} new tokens, W={g['window']}, FA share {g['fa_share']}")
        for n in ("full", "hybrid", "hybrid_sdpa"):
            if n not in g:
                continue
            r = g[n]
            peak = r["peak_mem_over_weights_bytes"]
            print(
                f"  {n:>6}: KV {r['kv_bytes'] / 2**20:9.1f} MiB  peak {'' if peak is None else f'{peak / 2**20:9.1f} MiB'}  "
                f"prefill {r['prefill_s']:.3f} s  decode {r['decode_tokens_per_s']:.1f} tok/s  overall {r['tokens_per_s_overall']:.1f} tok/s"
            )
        print(f"  KV ratio {g['kv_ratio']:.3f}; same first tokens: {g['same_first_tokens']}")
    for e in res["errors"]:
        print("error:", e)


if __name__ == "__main__":
    sys.exit(main())
