"""Attention logit soft-capping (Gemma2) and learned sink logits (gpt-oss) in every attention path.

Every path is held to the float64 dense reference (``kernels.reference_attention``), itself held to the
families' own eager attention in transformers. Random inputs scaled so that a cap of 2 bends the scores
and the sink logits take a real share of the softmax; odd sizes (T = 37, W = 5), attention sinks
S = 0 / 2, GQA (6 query heads over 2 KV heads). Each kernel test also checks that dropping the cap or
the sink logits would be caught. The Triton kernels run in the interpreter on CPU (tests/conftest.py).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import consa
from consa.allocation import Allocation
from consa.attention import chunked, kernels, select, triton_decode, triton_prefill
from consa.attention.attend import attention
from consa.attention.kernels import reference_attention
from consa.attention.plan import KernelConfig, KeySlots
from consa.attention.softcap_sinks import LogitMods, dense_attention
from consa.compat import cache_kwargs

import attn_reference  # noqa: F401  (registers the "consa_reference" attention)
from test_triton_decode import _old_interpreter

CAP = 2.0
B, HQ, HK, T, D = 2, 6, 2, 37, 16
W = 5
SCALE = D**-0.5
MODS = [(None, False), (CAP, False), (None, True), (CAP, True)]
MOD_IDS = ["plain", "softcap", "sinklogits", "both"]
needs_triton = pytest.mark.skipif(
    not triton_prefill.available() or not (torch.cuda.is_available() or triton_decode.interpreted()) or _old_interpreter(),
    reason="needs triton: CUDA, or its interpreter (TRITON_INTERPRET=1 before import; pip install '.[triton-interpreter]')",
)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEV = "cuda" if torch.cuda.is_available() else "cpu"  # the Triton tests: CUDA, else the interpreter on CPU


def _qkv(b=B, hq=HQ, hk=HK, tq=T, tk=T, d=D, dtype=torch.float32, seed=0, device="cpu"):
    """q, k, v as [B, H, T, D] views of transformers' [B, T, H, D] storage; scaled so that q·k·scale
    spreads over a few units (a cap of 2 matters)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda h, t: (1.5 * torch.randn(b, t, h, d, generator=g)).to(dtype).to(device).transpose(1, 2)  # noqa: E731
    return r(hq, tq), r(hk, tk), r(hk, tk)


def _sink_logits(hq=HQ, seed=1, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return (1.5 * torch.randn(hq, generator=g) + 1.0).to(device)


def _band(tq, tk, window=None, sinks=0, device="cpu"):
    """[Tq, Tk] boolean: the queries are the last Tq of Tk slots; causal, or the sliding window + sinks."""
    i = torch.arange(tk - tq, tk, device=device)[:, None]
    j = torch.arange(tk, device=device)[None, :]
    allowed = j <= i
    return allowed if window is None else allowed & ((i - j < window) | (j < sinks))


def _check(out, q, k, v, allowed, softcap, sink_logits, tol, scale=SCALE):
    """``out`` equals the reference, and the reference without the cap / the sink logits is far off."""
    ref = reference_attention(q, k, v, allowed, scale, softcap, sink_logits)
    # bf16 outputs round to 8 bits of mantissa: an atol alone fails a correct value of magnitude ~4 (one ulp = 1/32)
    rtol = 2**-7 if out.dtype == torch.bfloat16 else 0
    torch.testing.assert_close(out.double(), ref.double(), atol=tol, rtol=rtol)
    for other in ([(None, sink_logits)] if softcap is not None else []) + ([(softcap, None)] if sink_logits is not None else []):
        wrong = reference_attention(q, k, v, allowed, scale, *other)
        assert (out.double() - wrong.double()).abs().max() > 10 * tol


# ---- the reference is the families' own eager attention ------------------------------------------------
@pytest.mark.parametrize("family", ["gemma2", "gpt_oss"])
def test_reference_equals_transformers_eager(family):
    from transformers.models.gemma2 import modeling_gemma2
    from transformers.models.gpt_oss import modeling_gpt_oss

    q, k, v = _qkv(dtype=torch.float64)
    allowed = _band(T, T)[None, None].expand(B, 1, T, T)
    additive = torch.zeros(B, 1, T, T, dtype=torch.float64).masked_fill(~allowed, torch.finfo(torch.float64).min)
    sinks = _sink_logits().double()
    module = SimpleNamespace(num_key_value_groups=HQ // HK, head_dim=D, training=False, sinks=sinks)
    if family == "gemma2":
        out, _ = modeling_gemma2.eager_attention_forward(module, q, k, v, additive, scaling=SCALE, softcap=CAP)
        ref = reference_attention(q, k, v, allowed, SCALE, softcap=CAP)
    else:
        out, _ = modeling_gpt_oss.eager_attention_forward(module, q, k, v, additive, scaling=SCALE)
        ref = reference_attention(q, k, v, allowed, SCALE, sink_logits=sinks)
    tol = 1e-6 if family == "gemma2" else 1e-12  # Gemma2's eager softmax runs in float32 whatever the input
    torch.testing.assert_close(out.transpose(1, 2), ref, atol=tol, rtol=0)


# ---- the dense math path (the fallback of every kernel that takes neither) ----------------------------
@pytest.mark.parametrize("softcap,sinks", MODS, ids=MOD_IDS)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5), (torch.bfloat16, 4e-2)])
@pytest.mark.parametrize("pattern", ["causal", "window", "window_sinks", "padded"])
def test_dense_attention_equals_reference(softcap, sinks, dtype, tol, pattern, monkeypatch):
    monkeypatch.setattr("consa.attention.softcap_sinks.MAX_SCORE_ELEMENTS", 2 * HQ * T * B)  # several query chunks
    q, k, v = _qkv(dtype=dtype)
    allowed = {"causal": _band(T, T), "window": _band(T, T, W), "window_sinks": _band(T, T, W, 2),
               "padded": _band(T, T, W, 2)[None, None] & (torch.arange(T) >= 4)[None, None, None, :].expand(B, 1, 1, T)}[pattern]
    if pattern == "padded":
        allowed = allowed.clone()
        allowed[1] = _band(T, T, W, 2)  # only the first sequence is padded
    sl = _sink_logits() if sinks else None
    out = dense_attention(q, k, v, allowed, SCALE, softcap, sl)
    assert out.dtype == dtype
    _check(out, q, k, v, allowed, softcap, sl, tol)


def test_dense_attention_gradients_equal_reference():
    """The search trains through this path (gates, LoRA, sink logits): its gradients are the reference's."""
    q, k, v = (x.detach().requires_grad_() for x in _qkv(dtype=torch.float64))
    sl = _sink_logits().double().requires_grad_()
    allowed = _band(T, T, W, 2)
    grads = []
    for fn in (dense_attention, reference_attention):
        out = fn(q, k, v, allowed, SCALE, CAP, sl)
        grads.append(torch.autograd.grad((out * torch.linspace(-1, 1, D, dtype=out.dtype)).sum(), (q, k, v, sl)))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)
    assert grads[0][3].abs().max() > 1e-3  # the sink logits do get a gradient


# ---- attend.attention: every call shape a layer makes, under each kernel choice -----------------------
def _cases():
    # (Tq, window, sinks, slots, padded)
    return [(T, None, 0, KeySlots(), False), (T, W, 0, KeySlots(), False), (T, W, 2, KeySlots(), False),
            (T, W, 2, KeySlots(), True), (5, W, 2, KeySlots(), False), (1, None, 0, KeySlots(), True)]


@pytest.mark.parametrize("softcap,sinks", MODS[1:], ids=MOD_IDS[1:])
@pytest.mark.parametrize("swa_prefill", ["auto", "sdpa", "chunked"])
@pytest.mark.parametrize("tq,window,s,slots,padded", _cases())
def test_attend_equals_reference(softcap, sinks, swa_prefill, tq, window, s, slots, padded):
    q, k, v = _qkv(tq=tq)
    sl = _sink_logits() if sinks else None
    mask = None
    allowed = _band(tq, T, window, s)
    if padded:
        pad = (torch.arange(T) >= 3)[None, None, None, :].expand(B, 1, tq, T).clone()
        pad[1] = True
        mask = _band(tq, T)[None, None] & pad  # transformers' boolean mask: causality and padding
        allowed = allowed & pad
    config = KernelConfig(swa_prefill=swa_prefill)
    call = lambda: attention(q, k, v, scale=SCALE, window=window, sinks=s, mask=mask, slots=slots, config=config,  # noqa: E731
                             mods=LogitMods.of(softcap, sl))
    if swa_prefill == "chunked" and softcap is not None and window is not None and tq == T and not padded:
        with pytest.raises(select.KernelUnavailable, match="soft cap"):  # forced, and it cannot: one clear error
            call()
        return
    _check(call(), q, k, v, allowed, softcap, sl, 2e-5)


@pytest.mark.parametrize("softcap,sinks", MODS[1:], ids=MOD_IDS[1:])
def test_attend_over_held_slots_equals_reference(softcap, sinks):
    """Decode and a short chunk over the keys a sliding head still holds (sinks, then the window's tail)."""
    total, s = 40, 2
    q, k_all, v_all = _qkv(tq=3, tk=total)
    sl = _sink_logits() if sinks else None
    slots = KeySlots(num_sinks=s, offset=total - 3 - (W - 1))
    held = torch.cat([torch.arange(s), torch.arange(slots.offset, total)])
    k, v = k_all[:, :, held], v_all[:, :, held]
    for tq in (1, 3):
        qq = q[:, :, 3 - tq:]
        out = attention(qq, k, v, scale=SCALE, window=W, sinks=s, slots=slots, mods=LogitMods.of(softcap, sl))
        _check(out, qq, k_all, v_all, _band(tq, total, W, s), softcap, sl, 2e-5)


def test_plain_calls_never_reach_sdpa_with_mods(monkeypatch):
    """SDPA takes neither feature: with mods not one call of a layer may go to it."""
    monkeypatch.setattr("consa.attention.attend.sdpa", lambda *a, **k: pytest.fail("SDPA took a soft-capped call"))
    q, k, v = _qkv()
    for window in (None, W):
        for tq in (1, T):
            attention(q[:, :, T - tq:], k, v, scale=SCALE, window=window, mods=LogitMods.of(CAP))


# ---- FlexAttention (its eager CPU twin) ----------------------------------------------------------------
@pytest.mark.parametrize("softcap,sinks", MODS[1:], ids=MOD_IDS[1:])
@pytest.mark.parametrize("s", [0, 2])
def test_flex_equals_reference(softcap, sinks, s):
    q, k, v = _qkv()
    sl = _sink_logits() if sinks else None
    kw = {"softcap": softcap, "sink_logits": sl}
    _check(kernels.flex_sliding(q, k, v, W, s, SCALE, **kw), q, k, v, _band(T, T, W, s), softcap, sl, 2e-5)
    _check(kernels.flex_causal(q, k, v, SCALE, **kw), q, k, v, _band(T, T), softcap, sl, 2e-5)
    fa = tuple(h // (HQ // HK) == 1 for h in range(HQ))  # KV head 1's query heads attend fully
    allowed = torch.stack([_band(T, T) if f else _band(T, T, W, s) for f in fa])[None]
    _check(kernels.flex_hybrid(q, k, v, fa, W, s, SCALE, **kw), q, k, v, allowed, softcap, sl, 2e-5)


# ---- the chunked SWA kernel: sink logits from its log-sum-exp (no soft cap: flash kernels) ----------
@pytest.mark.parametrize("window,s", [(W, 0), (W, 2), (T + 3, 0), (1, 3)])
def test_chunked_with_sink_logits_equals_reference(window, s):
    q, k, v = _qkv()
    sl = _sink_logits()
    with torch.no_grad():
        out = chunked.chunked_sliding(q, k, v, window, s, SCALE, sink_logits=sl)
    _check(out, q, k, v, _band(T, T, window, s), None, sl, 2e-5)


def test_chunked_refuses_a_soft_cap():
    q, k, v = _qkv()
    assert "soft cap" in chunked.why_not(q, k, v, CAP)
    assert chunked.why_not(q, k, v, None) is None
    assert select.choose(KernelConfig(), "swa_prefill", q, k, v, window=W, mods=LogitMods.of(CAP)) is None  # CPU: dense path


# ---- Triton prefill ----------------------------------------------------------------------------------
@needs_triton
@pytest.mark.parametrize("softcap,sinks", MODS, ids=MOD_IDS)
@pytest.mark.parametrize("hq,hk,wins,s", [(6, 2, (5, 37), 2), (6, 2, (1, 5), 0), (9, 3, (37, 4, 11), 3)])
@pytest.mark.parametrize("dtype,rows,block,tol", [(torch.float32, 32, 16, 2e-5), (torch.float16, 64, 32, 3e-3)])
def test_triton_prefill_equals_reference(monkeypatch, softcap, sinks, hq, hk, wins, s, dtype, rows, block, tol):
    monkeypatch.setattr(triton_prefill, "BLOCK_ROWS", rows)
    monkeypatch.setattr(triton_prefill, "BLOCK_N", block)
    q, k, v = _qkv(hq=hq, hk=hk, dtype=dtype, seed=hq, device=DEV)
    sl = _sink_logits(hq, device=DEV) if sinks else None
    out = triton_prefill.banded_attention(q, k, v, wins, s, SCALE, softcap=softcap, sink_logits=sl)
    g = hq // hk
    allowed = torch.stack([_band(T, T, wins[h // g], s, DEV) for h in range(hq)])[None]
    _check(out, q, k, v, allowed, softcap, sl, tol)


@needs_triton
def test_triton_prefill_takes_calls_with_mods(monkeypatch):
    """With triton_on_cpu the selector gives soft-capped / sink-logit prefills to the Triton kernel,
    causal ones included (SDPA cannot take them)."""
    q, k, v = _qkv(device=DEV)
    mods = LogitMods.of(CAP, _sink_logits(device=DEV))
    cfg = KernelConfig(triton_on_cpu=True)
    assert select.choose(cfg, "swa_prefill", q, k, v, window=W, mods=mods) is triton_prefill.sliding
    assert select.choose(cfg, "causal_prefill", q, k, v, mods=mods) is triton_prefill.causal
    assert select.choose(KernelConfig(split_depth=1, triton_on_cpu=True), "causal_prefill", q, k, v, mods=mods) is triton_prefill.causal
    for window in (None, W):
        out = attention(q, k, v, scale=SCALE, window=window, sinks=2, config=cfg, mods=mods)
        _check(out, q, k, v, _band(T, T, window, 2, DEV), CAP, mods.sink_logits, 2e-5)


# ---- Triton decode (the eager hybrid cache's one-launch step) -----------------------------------------
@needs_triton
@pytest.mark.parametrize("softcap,sinks", MODS, ids=MOD_IDS)
@pytest.mark.parametrize("tq,splits,padded", [(1, 1, False), (1, 3, True), (3, 2, False)])
def test_triton_decode_equals_reference(monkeypatch, softcap, sinks, tq, splits, padded):
    monkeypatch.setattr(triton_decode, "BLOCK_N", 16)
    total, s = 70, 2
    q, k_all, v_all = _qkv(tq=tq, tk=total, seed=5, device=DEV)
    sl = _sink_logits(device=DEV) if sinks else None
    fa_kv = (1,)  # KV head 1 full, KV head 0 sliding: it holds the sinks and the last W - 1 + (tq - 1) slots
    offset = total - tq - (W - 1)
    held = torch.cat([torch.arange(s), torch.arange(offset, total)]).to(DEV)
    mask = None
    if padded:
        mask = torch.ones(B, total, dtype=torch.bool, device=DEV)
        mask[0, :4] = False
        mask[0, offset + 1] = False
    heads = triton_decode.head_tables(HK, fa_kv, q.device)
    out = triton_decode.hybrid_decode(q, k_all[:, 1:], v_all[:, 1:], k_all[:, :1, held], v_all[:, :1, held], heads, SCALE,
                                      mask=mask, swa_sinks=s, swa_offset=offset, splits=splits, window=W, sinks=s,
                                      softcap=softcap, sink_logits=sl)
    g = HQ // HK
    allowed = torch.stack([_band(tq, total, None, 0, DEV) if h // g == 1 else _band(tq, total, W, s, DEV) for h in range(HQ)])[None]
    if padded:
        allowed = allowed & mask[:, None, None, :]
    _check(out.transpose(1, 2), q, k_all, v_all, allowed, softcap, sl, 2e-5)


# ---- whole models: Gemma2 (soft cap) and gpt-oss (sink logits) ------------------------------------------
VOCAB = 101
LAYERS = ["sliding_attention", "full_attention", "full_attention", "sliding_attention"]


def _model(family, seed=0):
    common = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=64, num_hidden_layers=4, num_attention_heads=HQ,
                  num_key_value_heads=HK, head_dim=12, max_position_embeddings=256, tie_word_embeddings=False,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2, layer_types=LAYERS, sliding_window=W + 1)
    if family == "gemma2":
        common.update(query_pre_attn_scalar=12, attn_logit_softcapping=CAP)
    else:
        common.update(num_local_experts=4, num_experts_per_tok=2,
                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **common), attn_implementation="eager")
    with torch.no_grad():  # sharpen attention so that windows, caps and sinks all matter
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(4.0)
            if name.endswith("self_attn.sinks"):
                p.copy_(torch.randn_like(p) * 1.5 + 1.0)
    return model.eval()


def _ids(length=19):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, VOCAB, (2, length), generator=g)
    mask = torch.ones(2, length, dtype=torch.long)
    mask[0, :3], ids[0, :3] = 0, 0
    return ids, mask


def _logits(model, ids, mask, impl=None):
    prev = model.config._attn_implementation
    if impl:
        model.set_attn_implementation(impl)
    try:
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=mask).logits
    finally:
        model.set_attn_implementation(prev)


def _alloc(model, fa_units):
    shape, native = consa.model_shape(model), consa.models.native_windows(model)
    return Allocation.from_units(fa_units, "kv_head", shape, W, sinks=2, native=native)


FAMILIES = ["gemma2", "gpt_oss"]


@pytest.mark.parametrize("family", FAMILIES)
def test_all_fa_hybrid_equals_the_stock_model(family):
    """Every searched unit FA (the native sliding layers kept): consa's logits are the model's own."""
    model = _model(family)
    ids, mask = _ids()
    want = _logits(model, ids, mask)
    consa.apply_allocation(model, _alloc(model, [True] * 4))
    got = _logits(model, ids, mask)
    keep = mask.bool()
    torch.testing.assert_close(got[keep], want[keep], atol=2e-5, rtol=0)


KERNEL_CONFIGS = {
    "auto": KernelConfig(),
    "fused": KernelConfig(hybrid_prefill="fused"),
    "triton": KernelConfig(hybrid_prefill="triton", triton_on_cpu=True),
}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kernels_name", list(KERNEL_CONFIGS))
@pytest.mark.parametrize("units", [[True, False, False, True], [False] * 4], ids=["hybrid", "all_swa"])
def test_hybrid_equals_dense_reference(family, kernels_name, units):
    if kernels_name == "triton" and not (triton_prefill.available() and triton_decode.interpreted() and not _old_interpreter()):
        pytest.skip("needs triton's interpreter (TRITON_INTERPRET=1 before import)")
    model = _model(family)
    consa.apply_allocation(model, _alloc(model, units), kernels=KERNEL_CONFIGS[kernels_name])
    for ids, mask in (_ids(), (_ids()[0][1:], None)):  # padded (split path), and a plain prefill (one-call kernels)
        got = _logits(model, ids, mask)
        want = _logits(model, ids, mask, impl=attn_reference.NAME)
        keep = mask.bool() if mask is not None else torch.ones(ids.shape, dtype=torch.bool)
        torch.testing.assert_close(got[keep], want[keep], atol=3e-5, rtol=0)
    stock = _logits(model, ids, mask, impl="eager")  # the check can fail: the hybrid is not the full model
    assert (stock - got).abs().max() > 1e-3


def _steps_equal_uncached(model, cache, ids, prompt):
    """Prefill ``prompt`` tokens, then decode the rest one by one: each step's logits equal the uncached
    forward's at that position."""
    full = _logits(model, ids, None)
    with torch.no_grad():
        out = model(input_ids=ids[:, :prompt], **cache_kwargs(cache, model), use_cache=True)
        torch.testing.assert_close(out.logits, full[:, :prompt], atol=3e-5, rtol=0)
        for t in range(prompt, ids.shape[1]):
            out = model(input_ids=ids[:, t : t + 1], **cache_kwargs(cache, model), use_cache=True)
            torch.testing.assert_close(out.logits[:, 0], full[:, t], atol=3e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("cache_kind", ["hybrid", "static"])
@pytest.mark.parametrize("triton", [False, True], ids=["torch", "triton"])
def test_cached_decode_equals_uncached(family, cache_kind, triton):
    if triton and not (triton_decode.available() and triton_decode.interpreted() and not _old_interpreter()):
        pytest.skip("needs triton's interpreter (TRITON_INTERPRET=1 before import)")
    from consa.attention.cache import HybridCache
    from consa.attention.static_cache import StaticHybridCache

    model = _model(family)
    consa.apply_allocation(model, _alloc(model, [True, False, False, True]), kernels=KernelConfig(triton_on_cpu=triton))
    ids = _ids(17)[0][1:]
    plans = consa.plans_of(model)
    cache = HybridCache(plans) if cache_kind == "hybrid" else StaticHybridCache(plans, 24)
    _steps_equal_uncached(model, cache, ids, prompt=9)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kernel", ["torch", "triton"])
def test_continuous_batching_equals_generate_alone(family, kernel, one_thread):
    """The server's slot pool attends with its own decode step: the same greedy tokens as generate."""
    from consa.serving.scheduler import Request, Scheduler

    if kernel == "triton" and not (triton_decode.available() and triton_decode.interpreted() and not _old_interpreter()):
        pytest.skip("needs triton's interpreter (TRITON_INTERPRET=1 before import)")
    model = _model(family)
    consa.apply_allocation(model, _alloc(model, [True, False, False, True]))
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (2, 9, 5)]
    want = [consa.generate(model, torch.tensor([p]), max_new_tokens=5, do_sample=False, pad_token_id=0)[0, len(p):].tolist()
            for p in prompts]
    sched = Scheduler(model, num_slots=3, max_len=24, prefill_tokens=4, kernel=kernel)
    reqs = [sched.submit(Request(p, 5)) for p in prompts]
    for _ in range(200):
        if not sched.busy:
            break
        sched.step()
    assert [r.output for r in reqs] == want


def test_static_decode_op_carries_the_mods():
    """The compiled decode step's opaque op (``cached.static_decode``) computes the cap and sink logits."""
    from consa.attention.cached import ring_decode, static_decode
    from consa.attention.plan import LayerPlan
    from consa.attention.static_cache import StaticHybridLayer

    layer = StaticHybridLayer(HK, [1], W, 24, sinks=2)
    _, k, v = _qkv(tk=12)
    layer.update(k[:, :, :11], v[:, :, :11])
    kr, vr = layer.update(k[:, :, 11:], v[:, :, 11:])
    q = _qkv(tq=1, seed=7)[0]
    sl = _sink_logits()
    plan = LayerPlan(0, HK, W, 2, "fixed", fa_kv=[1])
    got = static_decode(q, kr.fa, vr.fa, kr.swa, vr.swa, kr.length, None, HK, [1], SCALE, W, 2, kr.ring, False, CAP, sl)
    g = HQ // HK
    allowed = torch.stack([_band(1, 12) if h // g == 1 else _band(1, 12, W, 2) for h in range(HQ)])[None]
    _check(got.transpose(1, 2), q, k, v, allowed, CAP, sl, 2e-5)
    torch.testing.assert_close(got, ring_decode(plan, q, kr, vr, None, SCALE, LogitMods.of(CAP, sl)), atol=1e-6, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_gate_mode_mixes_exact_branches_and_trains(family):
    """Search: z = 1 is the model itself, z = 0 the all-SWA hybrid; gradients reach the gates (and,
    for gpt-oss, the sink logits)."""
    model = _model(family)
    ids, mask = _ids()
    stock = _logits(model, ids, mask)
    consa.apply_allocation(model, _alloc(model, [False] * 4))
    all_swa = _logits(model, ids, mask)
    consa.detach(model)
    assert model.config._attn_implementation == "eager"  # no SDPA path for these families
    mix = consa.attach_gates(model, window=W, sinks=2)
    shape = consa.model_shape(model)
    keep = mask.bool()
    for z, want in ((1.0, stock), (0.0, all_swa)):
        mix.z = torch.full((shape.num_layers, shape.num_kv_heads), z)
        torch.testing.assert_close(_logits(model, ids, mask)[keep], want[keep], atol=3e-5, rtol=0)
    mix.z = torch.full((shape.num_layers, shape.num_kv_heads), 0.5, requires_grad=True)
    model.requires_grad_(True)
    model(input_ids=ids, attention_mask=mask).logits[keep].square().mean().backward()
    assert mix.z.grad is not None and mix.z.grad.abs().sum() > 0
    if family == "gpt_oss":
        assert all(m.self_attn.sinks.grad.abs().sum() > 0 for m in model.model.layers)


def test_reordered_heads_keep_the_logits():
    """Heads move so FA heads come first: gpt-oss's sink logits move with their query heads."""
    model = _model("gpt_oss")
    ids, mask = _ids()
    alloc = _alloc(model, [False, True, False, True])
    consa.apply_allocation(model, alloc)
    want = _logits(model, ids, mask)
    alloc = consa.models.reorder_heads(model, alloc)
    consa.apply_allocation(model, alloc)
    keep = mask.bool()
    torch.testing.assert_close(_logits(model, ids, mask)[keep], want[keep], atol=3e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_consa_search_runs(tmp_path, family, capsys):
    """``consa search`` takes both families (it refused them while the features were not computed)."""
    from consa.cli import main as cli_main

    _model(family).save_pretrained(tmp_path / "m")
    args = ["search", "--model", str(tmp_path / "m"), "--sparsity", "0.5", "--window", str(W), "--seq-len", "16",
            "--steps", "2", "--batch-size", "2", "--no-progress", "--out", str(tmp_path / "s")]
    assert cli_main(args) == 0, capsys.readouterr().err
    alloc = Allocation.load(tmp_path / "s" / "allocation.json")
    assert alloc.num_units == 4 and alloc.num_swa == 2  # the two full layers' KV heads; the sliding ones stay


@pytest.mark.parametrize("family", FAMILIES)
def test_attention_mass_baseline_attends_as_the_model(family, monkeypatch):
    """The training-free baseline runs the model through its own attention function: that function
    computes the family's attention (cap, sink logits) and its mass shares stay in [0, 1]."""
    from consa.train import baselines

    model = _model(family)
    ids, mask = _ids()
    real, calls = baselines._mass_attention, []

    def spy(module, query, key, value, attention_mask, scaling=None, **kw):
        out, _ = real(module, query, key, value, attention_mask, scaling=scaling, **kw)
        allowed = _band(query.shape[2], key.shape[2]) if attention_mask is None else attention_mask
        ref = reference_attention(query, key, value, allowed, scaling, kw.get("softcap"), kw.get("s_aux"))
        torch.testing.assert_close(out.transpose(1, 2), ref, atol=2e-5, rtol=0)
        calls.append(bool(kw.get("softcap")) or kw.get("s_aux") is not None)
        return out, None

    monkeypatch.setattr(baselines, "_mass_attention", spy)
    alloc = baselines.attention_mass_allocation(model, "kv_head", 2, W, [{"input_ids": ids, "attention_mask": mask}])
    assert calls == [True] * 4
    scores = alloc.meta["scores"]
    assert all(0 <= x <= 1 for x in scores) and max(scores) > 0


# ---- the export's own attention code (torch + transformers only) ---------------------------------------
@pytest.mark.parametrize("softcap,sinks", MODS[1:], ids=MOD_IDS[1:])
def test_export_reference_attention_equals_reference(softcap, sinks):
    from consa.export_code import modeling_consa

    shape = consa.models.ModelShape(num_layers=1, num_kv_heads=HK, num_q_heads=HQ)
    alloc = Allocation.from_units([False, True], "kv_head", shape, W, sinks=2)
    module = SimpleNamespace(config=SimpleNamespace(consa={"allocation": alloc.to_dict()}), layer_idx=0, training=False)
    q, k, v = _qkv()
    sl = _sink_logits() if sinks else None
    out, _ = modeling_consa.reference_attention(module, q, k, v, None, scaling=SCALE, softcap=softcap, s_aux=sl)
    g = HQ // HK
    allowed = torch.stack([_band(T, T) if h // g == 1 else _band(T, T, W, 2) for h in range(HQ)])[None]
    _check(out.transpose(1, 2), q, k, v, allowed, softcap, sl, 2e-5)


# ---- on the GPU ----------------------------------------------------------------------------------------
@needs_cuda
@pytest.mark.parametrize("softcap,sinks", MODS[1:], ids=MOD_IDS[1:])
@pytest.mark.parametrize("t", [37, 1100])
def test_gpu_kernels_bf16(softcap, sinks, t):
    """bf16 on CUDA: the Triton prefill and decode kernels, compiled FlexAttention and the chunked kernel."""
    q, k, v = _qkv(tq=t, tk=t, dtype=torch.bfloat16, device="cuda", d=64)
    sl = _sink_logits(device="cuda") if sinks else None
    kw = {"softcap": softcap, "sink_logits": sl}
    scale = 64**-0.5
    allowed = _band(t, t, W, 2, "cuda")
    with torch.no_grad():
        _check(triton_prefill.banded_attention(q, k, v, (W,) * HK, 2, scale, **kw), q, k, v, allowed, softcap, sl, 3e-2, scale)
        _check(kernels.flex_sliding(q, k, v, W, 2, scale, **kw), q, k, v, allowed, softcap, sl, 3e-2, scale)
        _check(kernels.flex_causal(q, k, v, scale, **kw), q, k, v, _band(t, t, device="cuda"), softcap, sl, 3e-2, scale)
        if softcap is None:
            _check(chunked.chunked_sliding(q, k, v, W, 2, scale, sink_logits=sl), q, k, v, allowed, None, sl, 3e-2, scale)
            if chunked.flash_why_not(q, k, v) is None:
                _check(chunked.flash_sliding(q, k, v, W, 2, scale, sink_logits=sl), q, k, v, allowed, None, sl, 3e-2, scale)
        heads = triton_decode.head_tables(HK, (1,), q.device)
        qd = q[:, :, -1:]
        out = triton_decode.hybrid_decode(qd, k[:, 1:], v[:, 1:], k[:, :1, -W:], v[:, :1, -W:], heads, scale, **kw)
        g = HQ // HK
        dec = torch.stack([_band(1, t, None if h // g == 1 else W, 0, "cuda") for h in range(HQ)])[None]
        _check(out.transpose(1, 2), qd, k, v, dec, softcap, sl, 3e-2, scale)


@needs_cuda
def test_gpu_flex_gradients_with_sink_logits():
    """The search on CUDA differentiates through compiled FlexAttention, its log-sum-exp included."""
    q, k, v = (x.detach().requires_grad_() for x in _qkv(tq=1100, tk=1100, device="cuda", d=64))
    sl = _sink_logits(device="cuda").requires_grad_()
    scale = 64**-0.5
    grads = []
    for fn in (lambda: kernels.flex_sliding(q, k, v, W, 2, scale, softcap=CAP, sink_logits=sl),
               lambda: dense_attention(q, k, v, _band(1100, 1100, W, 2, "cuda"), scale, CAP, sl)):
        grads.append(torch.autograd.grad(fn().square().sum(), (q, k, v, sl)))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=2e-3, rtol=2e-3)
