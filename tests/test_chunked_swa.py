"""Sliding-window prefill on flash kernels (``chunked.chunked_sliding`` and, on CUDA, ``flash_sliding``)
against the float64 dense reference, and its dispatch through ``attend.attention`` / the hybrid layer."""

from __future__ import annotations

import pytest
import torch

from consa.attention import chunked, masks, select
from consa.attention.attend import attention
from consa.attention.chunked import chunked_sliding
from consa.attention.hybrid import consa_attention
from consa.attention.kernels import reference_attention
from consa.attention.plan import KernelConfig, LayerPlan

from attn_reference import per_head_allowed


def _qkv(b, hq, hk, t, d=8, seed=0, device="cpu", dtype=torch.float32, layout="bhtd"):
    """Random (never zero) inputs; ``layout="bthd"`` gives transformers' [B,T,H,D] storage seen as [B,H,T,D]."""
    g = torch.Generator(device=device).manual_seed(seed)

    def mk(h):
        if layout == "bthd":
            return torch.randn(b, t, h, d, generator=g, device=device, dtype=dtype).transpose(1, 2)
        return torch.randn(b, h, t, d, generator=g, device=device, dtype=dtype)

    return mk(hq), mk(hk), mk(hk)


def _ref(q, k, v, window, sinks, scale):
    t = q.shape[2]
    allowed = masks.dense_mask(masks.sliding_window_mask_mod(window, sinks), t, t, q.device)
    return reference_attention(q, k, v, allowed[None, None], scale)


def _sizes(w):
    return sorted({1, max(1, w - 1), w, w + 1, 2 * w - 1, 2 * w, 5 * w + 3})


CASES = [(t, w) for w in (1, 3, 17) for t in _sizes(w)] + [(40, 64)]  # the last: W > T


@pytest.mark.parametrize("hq,hk", [(6, 2), (3, 3)])
@pytest.mark.parametrize("sinks", [0, 2])
@pytest.mark.parametrize("t,window", CASES)
def test_chunked_matches_reference(t, window, sinks, hq, hk):
    q, k, v = _qkv(2, hq, hk, t, seed=t * 31 + window)
    got = chunked_sliding(q, k, v, window, sinks, 0.35)
    assert got.shape == q.shape
    ref = _ref(q, k, v, window, sinks, 0.35)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    # the tolerance separates neighbouring masks: an off-by-one window or dropped sinks would fail
    mask = masks.dense_mask(masks.sliding_window_mask_mod(window, sinks), t, t)
    for w2, s2 in ((window + 1, sinks), (window - 1, sinks), (window, 0), (window, sinks + 1)):
        if w2 >= 1 and not torch.equal(mask, masks.dense_mask(masks.sliding_window_mask_mod(w2, s2), t, t)):
            assert (got - _ref(q, k, v, w2, s2, 0.35)).abs().max() > 1e-3, (w2, s2)


@pytest.mark.parametrize("t,window,sinks", [(37, 5, 9), (23, 4, 30), (64, 16, 1), (50, 7, 7)])
def test_chunked_many_sinks_and_views(t, window, sinks):
    """Sinks beyond the window (S ≥ W, S > T), inputs in transformers' layout and head-sliced like the
    hybrid path slices them (views whose chunking cannot always be a view)."""
    q, k, v = _qkv(2, 8, 4, t, seed=t, layout="bthd")
    qs, ks, vs = q[:, 2:], k[:, 1:], v[:, 1:]
    got = chunked_sliding(qs, ks, vs, window, sinks, 0.4)
    torch.testing.assert_close(got, _ref(qs, ks, vs, window, sinks, 0.4), atol=1e-5, rtol=0)


def test_chunked_merge_is_stable_with_large_scores():
    q, k, v = _qkv(1, 2, 2, 70, d=16, seed=3)
    got = chunked_sliding(q, k, v, 8, 3, 25.0)  # logits in the hundreds: a naive exp would overflow
    assert torch.isfinite(got).all()
    # fp32 logits of ~400 carry ~3e-5 absolute error, hence the looser tolerance
    torch.testing.assert_close(got, _ref(q, k, v, 8, 3, 25.0), atol=2e-4, rtol=0)


def test_chunked_bf16_cpu():
    q, k, v = _qkv(1, 4, 2, 133, d=16, seed=5, dtype=torch.bfloat16)
    got = chunked_sliding(q, k, v, 32, 2, 0.25)
    assert got.dtype == torch.bfloat16
    ref = _ref(q.double(), k.double(), v.double(), 32, 2, 0.25)
    assert ((got.double() - ref).norm() / ref.norm()) < 1e-2


@pytest.mark.parametrize("reverse", [False, True])
def test_merge_of_partials(reverse):
    g = torch.Generator().manual_seed(4)
    out = torch.randn(2, 3, 4, 9, 8, generator=g)
    lse, lb = torch.randn(2, 3, 4, 9, generator=g) * 30, torch.randn(2, 3, 4, 9, generator=g) * 30
    ob = torch.randn(2, 3, 4, 9, 8, generator=g)
    o2, l2 = (ob.flip(-2), lb.flip(-1)) if reverse else (ob, lb)
    m = torch.maximum(lse, l2)
    wa, wb = (lse - m).double().exp(), (l2 - m).double().exp()
    want = (out * wa[..., None] + o2 * wb[..., None]) / (wa + wb)[..., None]
    got = out.clone()
    joint = chunked.merge(got, lse, ob, lb, reverse, True)
    torch.testing.assert_close(got, want.float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(joint, torch.logaddexp(lse, l2))
    assert chunked.merge(out.clone(), lse, ob, lb, reverse, False) is None


@pytest.fixture
def spy(monkeypatch):
    calls = []
    real = chunked.chunked_sliding

    def wrapped(*a, **kw):
        calls.append(a[3:5])
        return real(*a, **kw)

    monkeypatch.setattr(chunked, "chunked_sliding", wrapped)
    return calls


CHUNKED = KernelConfig(swa_prefill="chunked")


@pytest.mark.parametrize("t,window,sinks", [(29, 6, 0), (29, 6, 2), (5, 8, 0)])
def test_attention_dispatches_to_chunked(spy, t, window, sinks):
    q, k, v = _qkv(2, 6, 2, t, seed=11)
    got = attention(q, k, v, scale=0.3, window=window, sinks=sinks, config=CHUNKED)
    assert spy == [(window, sinks)]
    torch.testing.assert_close(got, _ref(q, k, v, window, sinks, 0.3), atol=1e-5, rtol=0)


def test_dispatch_keeps_other_paths(spy):
    q, k, v = _qkv(1, 4, 2, 21, seed=2)
    ref = _ref(q, k, v, 5, 1, 0.3)
    for cfg in (KernelConfig(), KernelConfig(swa_prefill="sdpa")):  # default: on CPU the dense-mask SDPA, as before
        torch.testing.assert_close(attention(q, k, v, scale=0.3, window=5, sinks=1, config=cfg), ref, atol=1e-5, rtol=0)
    assert spy == []
    pad = torch.ones(1, 1, 21, 21, dtype=torch.bool).tril()
    attention(q, k, v, scale=0.3, window=5, sinks=1, mask=pad, config=CHUNKED)  # a padding mask: dense SDPA
    attention(q[:, :, -3:], k, v, scale=0.3, window=5, sinks=1, config=CHUNKED)  # Tq < Tk: dense SDPA
    qg = q.clone().requires_grad_()
    out = attention(qg, k, v, scale=0.3, window=5, sinks=1)  # gradients ("auto"): never the LSE merges
    out.sum().backward()
    assert qg.grad is not None and spy == []
    attention(q, k, v, scale=0.3, window=5, sinks=1, config=CHUNKED)
    assert spy == [(5, 1)]


@pytest.mark.parametrize("name,why", [("chunked", "no gradient"), ("flash", "CUDA fp16/bf16"), ("flex", "CUDA")])
def test_a_forced_kernel_that_cannot_run_says_why(spy, name, why):
    """A named kernel is forced: where it cannot run the call (here: gradients, or CPU tensors), one
    clear error naming the setting and the reason, never another kernel in its place."""
    q, k, v = _qkv(1, 4, 2, 21, seed=2)
    qg = q.clone().requires_grad_()
    with pytest.raises(select.KernelUnavailable, match=f"swa_prefill='{name}'.*{why}"):
        attention(qg, k, v, scale=0.3, window=5, sinks=1, config=KernelConfig(swa_prefill=name))
    assert spy == []


def test_hybrid_layer_with_chunked(spy):
    """The fixed-plan hybrid layer (FA heads causal, SWA heads on the chunked kernel) equals the
    per-head dense reference."""
    t, window, sinks = 45, 7, 2
    q, k, v = _qkv(2, 8, 4, t, seed=9, layout="bthd")
    plan = LayerPlan(0, 4, window, sinks, "fixed", fa_kv=[0, 2], kernels=CHUNKED)
    mod = torch.nn.Module()
    mod.consa_plan = plan
    mod.eval()
    out, _ = consa_attention(mod, q, k, v, None, 0.3)
    fa_q = [(h // 2) in {0, 2} for h in range(8)]
    allowed = per_head_allowed(fa_q, t, t, window, sinks, None, "cpu")
    ref = reference_attention(q, k, v, allowed, 0.3).transpose(1, 2)
    assert spy == [(window, sinks)]
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("t,window,sinks", [(2048, 512, 0), (3001, 128, 4), (1000, 512, 3), (700, 1024, 0)])
def test_swa_kernels_on_gpu(t, window, sinks):
    q, k, v = _qkv(1, 16, 8, t, d=128, device="cuda", dtype=torch.bfloat16, layout="bthd")
    scale = 128**-0.5
    ref = _ref(q.double(), k.double(), v.double(), window, sinks, scale)
    outs = {
        "chunked": chunked_sliding(q, k, v, window, sinks, scale),
        "flex": attention(q, k, v, scale=scale, window=window, sinks=sinks, config=KernelConfig(swa_prefill="flex")),
    }
    if chunked.flash_window_op() is not None:
        outs["flash"] = chunked.flash_sliding(q, k, v, window, sinks, scale)
    errs = {}
    for name, out in outs.items():
        assert out.dtype == torch.bfloat16 and out.shape == q.shape, name
        errs[name] = ((out.double() - ref).norm() / ref.norm()).item()
        assert errs[name] < 1e-2, (name, errs[name])
    torch.testing.assert_close(outs["chunked"].float(), outs["flex"].float(), atol=2e-2, rtol=0)
    if t > window:  # an off-by-one window is far outside the kernels' bf16 error
        off = _ref(q.double(), k.double(), v.double(), window + 1, sinks, scale)
        assert ((outs["chunked"].double() - off).norm() / off.norm()).item() > 3 * max(errs.values())
