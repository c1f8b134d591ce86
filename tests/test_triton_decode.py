"""The one-launch hybrid decode kernel (``attention.triton_decode``) against the float64 reference.

On machines without CUDA, tests/conftest.py sets TRITON_INTERPRET=1, so the Triton kernels run in the
interpreter on CPU tensors (fp32 and fp16; the interpreter mishandles bf16, which the GPU test covers).
"""

from __future__ import annotations

import pytest
import torch

import consa
from consa.allocation import Allocation
from consa.attention import kernels, select, triton_decode
from consa.attention.cache import HybridCache
from consa.attention.plan import KeySlots
from consa.compat import cache_kwargs
from consa.models import plans_of
from consa.tiny import tiny_model

def _old_interpreter() -> bool:
    """Triton's interpreter before 3.9 breaks on numpy 2.4+ (int() of a 1-element array)."""
    import numpy

    version = lambda v: tuple(int(x) for x in v.split(".")[:2])  # noqa: E731
    return triton_decode.interpreted() and version(triton_decode.triton.__version__) < (3, 9) and version(numpy.__version__) >= (2, 4)


def triton_missing() -> str | None:
    """Why the Triton kernels cannot run here, or None."""
    if not triton_decode.available():
        return "needs triton (pip install '.[triton-interpreter]' on a machine without CUDA)"
    if not (torch.cuda.is_available() or triton_decode.interpreted()):
        return "needs CUDA, or Triton's interpreter (TRITON_INTERPRET=1 before triton is imported)"
    if _old_interpreter():
        return "Triton's interpreter before 3.9 breaks on numpy 2.4+"
    return None


# per test, so that the pure-Python helpers (head tables, split counts, which keys a query sees) run everywhere
requires_triton = pytest.mark.skipif(triton_missing() is not None, reason=triton_missing() or "")
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _reference(q, k_fa, v_fa, k_sw, v_sw, fa_kv, scale, mask=None, slots=KeySlots()):
    """float64 softmax over every held key of each query head's KV head; with a [B, T] padding mask,
    only over keys whose slot (FA key j: slot j; SWA keys: ``slots``) is True. No visible key: 0."""
    n_kv = k_fa.shape[1] + k_sw.shape[1]
    group = q.shape[1] // n_kv
    swa_kv = [h for h in range(n_kv) if h not in fa_kv]
    outs = []
    for h in range(n_kv):
        if h in fa_kv:
            k, v, pos = k_fa[:, fa_kv.index(h)], v_fa[:, fa_kv.index(h)], torch.arange(k_fa.shape[-2])
        else:
            k, v, pos = k_sw[:, swa_kv.index(h)], v_sw[:, swa_kv.index(h)], slots.positions(k_sw.shape[-2], "cpu")
        s = torch.einsum("bgd,btd->bgt", q[:, h * group : (h + 1) * group, 0].double(), k.double()) * scale
        if mask is not None:
            s = s.masked_fill(~mask[:, pos].to(s.device)[:, None, :], float("-inf"))
        outs.append(torch.einsum("bgt,btd->bgd", s.softmax(-1).nan_to_num(0.0), v.double()))
    return torch.cat(outs, 1)[:, None]  # [B, 1, Hq, D]


def _inputs(b, hq, fa_kv, n_kv, t, m, d, dtype, seed=0, strided=False):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g).to(dtype).to(DEV)  # noqa: E731
    q = r(b, hq, 1, d)
    if strided:  # views into longer buffers, as a preallocated cache would hand over
        k_fa, v_fa = r(b, len(fa_kv), t + 9, d)[:, :, 3 : t + 3], r(b, len(fa_kv), t + 9, d)[:, :, 5 : t + 5]
    else:
        k_fa, v_fa = r(b, len(fa_kv), t, d), r(b, len(fa_kv), t, d)
    k_sw, v_sw = r(b, n_kv - len(fa_kv), m, d), r(b, n_kv - len(fa_kv), m, d)
    return q, k_fa, v_fa, k_sw, v_sw


CASES = [
    # batch, q heads, FA kv heads, kv heads, FA length, SWA length, head dim, splits
    (2, 6, [1], 3, 37, 5, 24, None),  # GQA group 2, odd lengths, head dim not a power of two
    (3, 8, [0, 5], 8, 130, 64, 32, 3),  # MHA, non-contiguous FA heads, several splits
    (1, 9, [2], 3, 200, 17, 16, 7),  # group 3; SWA heads leave most splits empty
    (2, 4, [1], 2, 1, 1, 16, None),  # one key each
    (1, 4, [0], 2, 70, 90, 16, 4),  # SWA heads hold more keys than FA heads (a long sink prefix)
    (2, 4, [1], 2, 20, 300, 16, None),  # the same, splits sized on the SWA heads
]


@requires_triton
@pytest.mark.parametrize("dtype,block", [(torch.float32, 16), (torch.float32, 128), (torch.float16, 64)])
@pytest.mark.parametrize("b,hq,fa_kv,n_kv,t,m,d,splits", CASES)
def test_kernel_equals_reference(monkeypatch, dtype, block, b, hq, fa_kv, n_kv, t, m, d, splits):
    monkeypatch.setattr(triton_decode, "BLOCK_N", block)  # 16: many key blocks per split
    q, k_fa, v_fa, k_sw, v_sw = _inputs(b, hq, fa_kv, n_kv, t, m, d, dtype, strided=t > 100)
    heads = triton_decode.head_tables(n_kv, tuple(fa_kv), q.device)
    out = triton_decode.hybrid_decode(q, k_fa, v_fa, k_sw, v_sw, heads, d**-0.5, splits=splits)
    assert out.shape == (b, 1, hq, d) and out.dtype == dtype
    ref = _reference(q, k_fa, v_fa, k_sw, v_sw, fa_kv, d**-0.5)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=0)
    # the check can fail: a wrong head map (FA and SWA heads swapped round) is far off
    if m == t:
        return
    wrong = triton_decode.head_tables(n_kv, tuple(h for h in range(n_kv) if h not in fa_kv)[: len(fa_kv)], q.device)
    bad = triton_decode.hybrid_decode(q, k_fa, v_fa, k_sw, v_sw, wrong, d**-0.5, splits=splits)
    assert (bad.double() - ref).abs().max() > 10 * tol


@requires_triton
@pytest.mark.parametrize("block", [16, 128])
def test_kernel_with_padding_mask_and_sinks(monkeypatch, block):
    """A left-padded batch (row 0 padded past several whole splits, row 2 with holes, row 3 with no
    visible key at all) over FA keys at every slot and SWA keys holding 3 sinks plus a tail."""
    monkeypatch.setattr(triton_decode, "BLOCK_N", block)
    b, hq, n_kv, fa_kv, t, sinks, tail, d = 4, 6, 3, [2], 150, 3, 20, 16
    q, k_fa, v_fa, k_sw, v_sw = _inputs(b, hq, fa_kv, n_kv, t, sinks + tail, d, torch.float32, seed=4)
    slots = KeySlots(sinks, t - tail)
    g = torch.Generator().manual_seed(9)
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[0, :140] = False  # only the last 10 slots visible: sinks masked, most splits empty
    mask[1, :2] = False  # two of the three sinks masked
    mask[2] = torch.rand(t, generator=g) > 0.5
    mask[3] = False
    heads = triton_decode.head_tables(n_kv, tuple(fa_kv), q.device)
    ref = _reference(q, k_fa, v_fa, k_sw, v_sw, fa_kv, d**-0.5, mask, slots)
    for m in (mask.to(DEV), mask[:, None, None, :].to(DEV)):  # [B, T] and transformers' [B, 1, 1, T]
        out = triton_decode.hybrid_decode(q, k_fa, v_fa, k_sw, v_sw, heads, d**-0.5, mask=m,
                                          swa_sinks=sinks, swa_offset=t - tail, splits=5)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=0)
    assert out[3].abs().max() == 0
    # the check can fail: dropping the mask, or misplacing the SWA tail by one slot, is caught
    no_mask = triton_decode.hybrid_decode(q, k_fa, v_fa, k_sw, v_sw, heads, d**-0.5, splits=5)
    shifted = triton_decode.hybrid_decode(q, k_fa, v_fa, k_sw, v_sw, heads, d**-0.5, mask=mask.to(DEV),
                                          swa_sinks=sinks, swa_offset=t - tail - 1, splits=5)
    assert (no_mask.double() - ref)[:3].abs().max() > 1e-3
    assert (shifted.double() - ref).abs().max() > 1e-3


def _reference_multi(q, k_fa, v_fa, k_sw, v_sw, fa_kv, scale, window, sinks, slots=KeySlots(), mask=None):
    """float64 attention of the last Tq of T slots' queries: FA keys (slot j) up to the query's slot,
    SWA keys (at ``slots``) also inside the window or among the first ``sinks`` slots; a [B, T]
    padding mask on top. [B, Tq, Hq, D]."""
    n_kv = k_fa.shape[1] + k_sw.shape[1]
    group, tq, t = q.shape[1] // n_kv, q.shape[2], k_fa.shape[-2]
    swa_kv = [h for h in range(n_kv) if h not in fa_kv]
    pos = torch.arange(t - tq, t)[:, None]
    outs = []
    for h in range(n_kv):
        if h in fa_kv:
            k, v, kp = k_fa[:, fa_kv.index(h)], v_fa[:, fa_kv.index(h)], torch.arange(t)
            seen = kp[None] <= pos
        else:
            k, v, kp = k_sw[:, swa_kv.index(h)], v_sw[:, swa_kv.index(h)], slots.positions(k_sw.shape[-2], "cpu")
            seen = (kp[None] <= pos) & ((pos - kp[None] < window) | (kp[None] < sinks))
        s = torch.einsum("bgqd,btd->bgqt", q[:, h * group : (h + 1) * group].double(), k.double()) * scale
        seen = seen[None, None].to(s.device).expand(s.shape).clone()
        if mask is not None:
            seen &= mask[:, kp].to(s.device)[:, None, None, :]
        s = s.masked_fill(~seen, float("-inf"))
        outs.append(torch.einsum("bgqt,btd->bgqd", s.softmax(-1).nan_to_num(0.0), v.double()))
    return torch.cat(outs, 1).transpose(1, 2)


MULTI_CASES = [
    # batch, q heads, FA kv heads, kv heads, slots T, queries, window, sinks, SWA keys held (None: all T), splits
    (2, 6, [1], 3, 37, 3, 5, 0, 12, None),  # the SWA tail holds keys the first queries' window has left
    (1, 9, [0, 2], 3, 150, 5, 7, 2, 2 + 20, 4),  # group 3, sinks, several splits
    (2, 8, [3], 8, 40, 2, 4, 0, None, 3),  # MHA; the cache not trimmed yet: every slot held
    (1, 4, [1], 2, 64, 16, 9, 1, 1 + 30, None),  # 16 queries: 32 rows
    (3, 4, [0], 2, 21, 4, 30, 0, None, None),  # window wider than T
]


@requires_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("b,hq,fa_kv,n_kv,t,tq,window,sinks,held,splits", MULTI_CASES)
def test_several_queries_equal_reference(monkeypatch, dtype, b, hq, fa_kv, n_kv, t, tq, window, sinks, held, splits):
    """Verifying drafts: Tq queries at the last slots, causal among themselves, windowed on the SWA
    heads, over keys that include some no query sees any more."""
    monkeypatch.setattr(triton_decode, "BLOCK_N", 16)
    m = t if held is None else held
    q, k_fa, v_fa, k_sw, v_sw = _inputs(b, hq, fa_kv, n_kv, t, m, 24, dtype, seed=t + tq)
    q = torch.randn(b, tq, hq, 24, generator=torch.Generator().manual_seed(tq)).to(dtype).to(DEV).transpose(1, 2)  # [B,T,H,D] storage
    slots = KeySlots() if held is None else KeySlots(sinks, t - (m - sinks))
    heads = triton_decode.head_tables(n_kv, tuple(fa_kv), q.device)
    run = lambda **kw: triton_decode.hybrid_decode(q, k_fa, v_fa, k_sw, v_sw, heads, 24**-0.5, splits=splits,  # noqa: E731
                                                   swa_sinks=slots.num_sinks, swa_offset=slots.offset, **{"window": window, "sinks": sinks, **kw})
    out = run()
    assert out.shape == (b, tq, hq, 24)
    ref = _reference_multi(q, k_fa, v_fa, k_sw, v_sw, fa_kv, 24**-0.5, window, sinks, slots)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=0)
    # the check can fail: a window one slot narrower, or no causal mask (the one-query rule), is caught
    if window < t:
        assert (run(window=window - 1).double() - ref).abs().max() > 10 * tol
    every_key = torch.cat([_reference(q[:, :, i : i + 1], k_fa, v_fa, k_sw, v_sw, fa_kv, 24**-0.5) for i in range(tq)], 1)
    assert (out.double() - every_key).abs().max() > 10 * tol  # the one-query rule: every held key seen


@requires_triton
def test_several_queries_with_padding_mask():
    """A left-padded batch verifying 3 drafts: transformers' [B, 1, Tq, T] mask, whose last row is the
    padding; one row sees nothing at all."""
    b, hq, n_kv, fa_kv, t, tq, window, sinks = 3, 4, 2, [0], 50, 3, 6, 1
    q, k_fa, v_fa, k_sw, v_sw = _inputs(b, hq, fa_kv, n_kv, t, 1 + 10, 16, torch.float32, seed=8)
    q = torch.randn(b, hq, tq, 16, generator=torch.Generator().manual_seed(3)).to(DEV)
    slots = KeySlots(1, t - 10)
    pad = torch.ones(b, t, dtype=torch.bool)
    pad[0, :45] = False  # padding past the sink and into the window
    pad[2] = False
    causal = torch.arange(t)[None] <= torch.arange(t - tq, t)[:, None]
    mask4 = (pad[:, None, None, :] & causal[None, None]).to(DEV)
    heads = triton_decode.head_tables(n_kv, tuple(fa_kv), q.device)
    out = triton_decode.hybrid_decode(q, k_fa, v_fa, k_sw, v_sw, heads, 0.25, mask=mask4, swa_sinks=1,
                                      swa_offset=t - 10, window=window, sinks=sinks, splits=3)
    ref = _reference_multi(q, k_fa, v_fa, k_sw, v_sw, fa_kv, 0.25, window, sinks, slots, pad)
    assert torch.isfinite(out).all() and out[2].abs().max() == 0
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=0)
    unpadded = _reference_multi(q, k_fa, v_fa, k_sw, v_sw, fa_kv, 0.25, window, sinks, slots)
    assert (unpadded - ref)[0].abs().max() > 1e-3


@requires_triton
def test_several_queries_need_the_window():
    q, k_fa, v_fa, k_sw, v_sw = _inputs(1, 4, [0], 2, 10, 3, 16, torch.float32)
    heads = triton_decode.head_tables(2, (0,), q.device)
    with pytest.raises(ValueError, match="window"):
        triton_decode.hybrid_decode(q.expand(-1, -1, 2, -1), k_fa, v_fa, k_sw, v_sw, heads, 0.25)


def test_head_tables():
    # kernel order (FA heads, then SWA heads), then each head's code
    assert triton_decode.head_tables(5, (1, 3), torch.device("cpu")).tolist() == [1, 3, 0, 2, 4, -1, 0, -2, 1, -3]


def test_num_splits_fills_the_device_and_stays_in_bounds(monkeypatch):
    monkeypatch.setattr(triton_decode, "FILL", 4)
    monkeypatch.setattr(triton_decode, "BLOCK_N", 64)
    dev = torch.device("cpu")  # counts as 4 SMs
    assert triton_decode.num_splits(1, 2, 10_000, dev) == 8  # 16 programs / 2 heads
    assert triton_decode.num_splits(1, 2, 70, dev) == 2  # no more splits than key blocks
    assert triton_decode.num_splits(64, 8, 10_000, dev) == 1


def _tiny(window, sinks):
    model = tiny_model("qwen3", num_layers=2, num_heads=6, num_kv_heads=3, hidden_size=72)
    shape = consa.model_shape(model)
    alloc = Allocation.from_units([False, True, False, True, False, False], "kv_head", shape, window, sinks)
    consa.apply_allocation(model, alloc, kernels=consa.KernelConfig(triton_on_cpu=True))  # the interpreter on CPU
    return model


@pytest.fixture
def on_cpu(monkeypatch):
    """Count the kernel's calls (the models of these tests let it take CPU tensors: ``_tiny``)."""
    calls = []
    real = triton_decode.hybrid_decode
    monkeypatch.setattr(triton_decode, "hybrid_decode", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


interpreter_only = pytest.mark.skipif(triton_missing() is not None or not triton_decode.interpreted(),
                                      reason=triton_missing() or "the model tests run the kernel on CPU tensors (interpreter)")


@interpreter_only
@pytest.mark.parametrize("window,sinks", [(4, 0), (5, 2)])
def test_model_decode_equals_sdpa_path(on_cpu, monkeypatch, window, sinks):
    """Greedy decode of a tiny hybrid Qwen3 through the HybridCache: the one-launch kernel gives the
    SDPA pair's logits at every step (prompt shorter and longer than the window)."""
    model = _tiny(window, sinks)
    ids = torch.randint(3, 101, (2, 9), generator=torch.Generator().manual_seed(5))

    def run():
        cache, out, x = HybridCache(plans_of(model)), [], ids
        with torch.no_grad():
            for _ in range(4):
                logits = model(input_ids=x, **cache_kwargs(cache, model), use_cache=True).logits[:, -1]
                out.append(logits)
                x = logits.argmax(-1, keepdim=True)
        return torch.stack(out)

    got = run()
    assert len(on_cpu) == 2 * 4  # 2 layers x (the 9-token prompt + 3 decode steps)
    with select.override(model, decode="sdpa"):
        want = run()
    assert len(on_cpu) == 8
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


@interpreter_only
@pytest.mark.parametrize("window,sinks", [(4, 0), (5, 2)])
def test_left_padded_generate_equals_sdpa_path(on_cpu, monkeypatch, window, sinks):
    """model.generate on a left-padded batch: the kernel reads the padding mask and gives the SDPA
    pair's tokens and scores."""
    model = _tiny(window, sinks)
    ids = torch.randint(3, 101, (3, 8), generator=torch.Generator().manual_seed(6))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    mask[2, :6] = 0  # padding longer than the window
    ids[mask == 0] = 0
    kw = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=None,
              output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        got = model.generate(ids, **cache_kwargs(HybridCache(plans_of(model)), model), **kw)
        assert len(on_cpu) == 2 * 4  # 2 layers x (the 8-token prompt + 3 decode steps)
        with select.override(model, decode="sdpa"):
            want = model.generate(ids, **cache_kwargs(HybridCache(plans_of(model)), model), **kw)
    assert torch.equal(got.sequences, want.sequences)
    torch.testing.assert_close(torch.stack(got.scores), torch.stack(want.scores), atol=1e-4, rtol=0)


@interpreter_only
@pytest.mark.parametrize("window,sinks", [(4, 0), (5, 2)])
def test_verification_forwards_take_the_kernel(on_cpu, monkeypatch, window, sinks):
    """Forwards of a few tokens over the cache (drafts to verify, or a prompt fed in small chunks):
    the kernel gives the SDPA pair's logits, with past recording on (old keys held) and off."""
    model = _tiny(window, sinks)
    ids = torch.randint(3, 101, (2, 17), generator=torch.Generator().manual_seed(7))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding

    def run(record):
        cache = HybridCache(plans_of(model))
        if record:
            for layer in cache.layers:
                layer.activate_past_recording()
        outs = []
        with torch.no_grad():
            for lo, hi in ((0, 6), (6, 9), (9, 13), (13, 17)):
                outs.append(model(input_ids=ids[:, lo:hi], attention_mask=mask[:, :hi], **cache_kwargs(cache, model), use_cache=True).logits)
        return torch.cat(outs, 1)

    for record in (True, False):
        on_cpu.clear()
        got = run(record)
        assert len(on_cpu) == 2 * 4  # 2 layers x 4 forwards (the first, 6 tokens, is short enough too)
        with select.override(model, decode="sdpa"):
            want = run(record)
        assert len(on_cpu) == 2 * 4  # the SDPA pair: no more kernel calls
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


@interpreter_only
def test_prompt_lookup_with_the_kernel_equals_greedy(on_cpu):
    model = _tiny(4, 1)
    pattern = torch.randint(3, 101, (1, 5), generator=torch.Generator().manual_seed(2))
    ids = torch.cat([pattern, pattern, pattern[:, :3]], 1)
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        want = model.generate(ids, **cache_kwargs(HybridCache(plans_of(model)), model), **kw)
        on_cpu.clear()
        got = model.generate(ids, **cache_kwargs(HybridCache(plans_of(model)), model), prompt_lookup_num_tokens=3, **kw)
    assert torch.equal(got, want)
    assert len(on_cpu) > 0


def test_keys_outside_the_window_need_a_mask():
    """Only caches whose held keys are all inside the query's window take the kernel."""
    assert kernels.decode_sees_all(3, KeySlots(0, 5), window=4, sinks=0)  # slots 5..7, query at 7
    assert kernels.decode_sees_all(4, KeySlots(0, 4), window=4, sinks=0)  # slots 4..7: all within 4 of 7
    assert not kernels.decode_sees_all(5, KeySlots(0, 3), window=4, sinks=0)  # slot 3 is 4 behind the query
    assert not kernels.decode_sees_all(5, KeySlots(2, 6), window=4, sinks=1)  # 2 sink slots held, 1 allowed


def test_several_queries_need_every_key_they_see_held():
    # queries at slots 7..9 (total 10), window 4: the first sees slots 4..7
    assert kernels.window_held(6, KeySlots(0, 4), window=4, sinks=0, total=10, tq=3)
    assert kernels.window_held(8, KeySlots(0, 2), window=4, sinks=0, total=10, tq=3)  # extra old keys: masked
    assert not kernels.window_held(5, KeySlots(0, 5), window=4, sinks=0, total=10, tq=3)  # slot 4 is gone
    assert kernels.window_held(10, KeySlots(), window=4, sinks=0, total=10, tq=3)
    assert not kernels.window_held(9, KeySlots(), window=4, sinks=0, total=10, tq=3)
    assert kernels.window_held(8, KeySlots(2, 4), window=4, sinks=2, total=10, tq=3)
    assert not kernels.window_held(7, KeySlots(1, 4), window=4, sinks=2, total=10, tq=3)  # a sink is missing


@requires_triton
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("t,m,b", [(32768, 511, 8), (4099, 4095, 1), (129, 3, 3)])
def test_kernel_on_gpu_bf16(t, m, b):
    fa_kv = [0, 1]
    q, k_fa, v_fa, k_sw, v_sw = _inputs(b, 16, fa_kv, 8, t, m, 128, torch.bfloat16)
    run = lambda: triton_decode.hybrid_decode(q, k_fa, v_fa, k_sw, v_sw, triton_decode.head_tables(8, (0, 1), q.device), 128**-0.5)  # noqa: E731
    out = run()
    ref = _reference(q, k_fa, v_fa, k_sw, v_sw, fa_kv, 128**-0.5)
    assert ((out.double() - ref).norm() / ref.norm()) < 1e-2
    # deterministic, eager and replayed from a CUDA graph (the merge order is fixed)
    outs = [run() for _ in range(100)]
    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run()
        with torch.cuda.graph(graph, stream=side):
            captured = run()
    torch.cuda.current_stream().wait_stream(side)
    for _ in range(100):
        graph.replay()
        outs.append(captured.clone())
    assert all(torch.equal(o, out) for o in outs)


@requires_triton
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_several_queries_on_gpu_bf16():
    """Verifying 5 drafts over a 32K cache whose SWA heads still hold 64 keys no query sees any more."""
    fa_kv, t, window, tq = [0, 1], 32768, 512, 5
    m = window - 1 + tq - 1 + 64
    q, k_fa, v_fa, k_sw, v_sw = _inputs(2, 16, fa_kv, 8, t, m, 128, torch.bfloat16)
    q = torch.randn(2, 16, tq, 128, device="cuda", dtype=torch.bfloat16)
    slots = KeySlots(0, t - m)
    out = triton_decode.hybrid_decode(q, k_fa, v_fa, k_sw, v_sw, triton_decode.head_tables(8, (0, 1), q.device), 128**-0.5,
                                      swa_offset=slots.offset, window=window)
    ref = _reference_multi(q.cpu(), k_fa.cpu(), v_fa.cpu(), k_sw.cpu(), v_sw.cpu(), fa_kv, 128**-0.5, window, 0, slots)
    assert ((out.double().cpu() - ref).norm() / ref.norm()) < 1e-2
