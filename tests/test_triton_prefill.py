"""The banded Triton prefill kernel (``attention.triton_prefill``) against the float64 dense reference.

On machines without CUDA, tests/conftest.py sets TRITON_INTERPRET=1, so the kernel runs in Triton's
interpreter on CPU tensors (fp32 and fp16; bf16 is covered by the GPU test).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from consa.attention import select, triton_decode, triton_prefill
from consa.attention.attend import attention
from consa.attention.hybrid import consa_attention
from consa.attention.kernels import reference_attention
from consa.attention.plan import KernelConfig, LayerPlan

from attn_reference import per_head_allowed
from test_triton_decode import requires_triton

DEV = "cuda" if torch.cuda.is_available() else "cpu"
SWA_TRITON = KernelConfig(swa_prefill="triton", triton_on_cpu=True)  # the kernel on CPU tensors: the interpreter
HYBRID_TRITON = KernelConfig(hybrid_prefill="triton", triton_on_cpu=True)


def _qkv(b, hq, hk, t, d, dtype=torch.float32, seed=0):
    """q, k, v [B, H, T, D] as views of transformers' [B, T, H, D] storage (strided heads)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda h: torch.randn(b, t, h, d, generator=g).to(dtype).to(DEV).transpose(1, 2)  # noqa: E731
    return r(hq), r(hk), r(hk)


def _reference(q, k, v, wins, sinks, scale):
    """float64 attention, query head h seeing keys 0 ≤ i − k < wins[h // G] or k < sinks (and k ≤ i)."""
    t = q.shape[-2]
    g = q.shape[1] // k.shape[1]
    i = torch.arange(t, device=q.device)[:, None]
    j = torch.arange(t, device=q.device)[None, :]
    allowed = torch.stack([(j <= i) & ((i - j < wins[h // g]) | (j < sinks)) for h in range(q.shape[1])])[None]
    return reference_attention(q, k, v, allowed, scale)


CASES = [
    # batch, q heads, kv heads, T, head dim, per-KV-head windows, sinks
    (2, 4, 2, 37, 24, (5, 37), 0),  # GQA 2, odd T, head dim not a power of two, one causal head
    (1, 6, 2, 70, 32, (16, 3), 2),  # sinks, a window shorter than a key block
    (1, 3, 3, 130, 16, (200, 17, 1), 1),  # MHA; window > T (causal), window 1 (the diagonal only)
    (1, 9, 3, 101, 16, (40, 64, 101), 0),  # group 3 (padded to 4 rows per position)
    (1, 16, 2, 100, 16, (33, 100), 3),  # group 8
    (2, 4, 2, 2, 16, (1, 2), 0),  # two tokens
]


@requires_triton
@pytest.mark.parametrize("dtype,rows,block", [(torch.float32, 32, 16), (torch.float32, 128, 64), (torch.float16, 64, 32)])
@pytest.mark.parametrize("b,hq,hk,t,d,wins,sinks", CASES)
def test_kernel_equals_reference(monkeypatch, dtype, rows, block, b, hq, hk, t, d, wins, sinks):
    # small blocks: many band-edge, interior and diagonal blocks per tile; large: one block holds it all
    monkeypatch.setattr(triton_prefill, "BLOCK_ROWS", rows)
    monkeypatch.setattr(triton_prefill, "BLOCK_N", block)
    q, k, v = _qkv(b, hq, hk, t, d, dtype, seed=t + d)
    out = triton_prefill.banded_attention(q, k, v, wins, sinks, d**-0.5)
    assert out.shape == q.shape and out.dtype == dtype and out.transpose(1, 2).is_contiguous()
    ref = _reference(q, k, v, wins, sinks, d**-0.5)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(out.double(), ref.double(), atol=tol, rtol=0)
    # the check can fail: every window one key longer is caught (where some window is short of T)
    if min(wins) < t:
        wider = _reference(q, k, v, tuple(w + 1 for w in wins), sinks, d**-0.5)
        assert (out.double() - wider.double()).abs().max() > 10 * tol


@requires_triton
@pytest.mark.parametrize("b,hq,hk,t,d,wins,sinks", CASES)
def test_one_masked_loop_equals_reference(monkeypatch, b, hq, hk, t, d, wins, sinks):
    """``SPLIT_LOOPS = False``: every key block through the masked loop gives the same attention."""
    monkeypatch.setattr(triton_prefill, "SPLIT_LOOPS", False)
    monkeypatch.setattr(triton_prefill, "BLOCK_ROWS", 32)
    monkeypatch.setattr(triton_prefill, "BLOCK_N", 16)
    q, k, v = _qkv(b, hq, hk, t, d, seed=t)
    out = triton_prefill.banded_attention(q, k, v, wins, sinks, d**-0.5)
    torch.testing.assert_close(out.double(), _reference(q, k, v, wins, sinks, d**-0.5).double(), atol=1e-5, rtol=0)


@requires_triton
def test_writes_into_a_view_and_nothing_else():
    """``out=`` some heads of a larger [B, T, H, D] buffer: those heads are written, the others kept."""
    q, k, v = _qkv(1, 4, 2, 45, 16, seed=5)
    buf = torch.full((1, 45, 10, 16), 7.0, device=DEV)
    view = buf[:, :, 3:7].transpose(1, 2)
    triton_prefill.banded_attention(q, k, v, (9, 9), 0, 0.25, out=view)
    torch.testing.assert_close(view.double(), _reference(q, k, v, (9, 9), 0, 0.25).double(), atol=1e-5, rtol=0)
    assert (buf[:, :, :3] == 7).all() and (buf[:, :, 7:] == 7).all()


def test_tile_table_is_longest_first_and_complete():
    wins = (1000, 8, 8)
    table = triton_prefill.tile_table(2, wins, 300, 32, 0, torch.device("cpu"))
    nq = -(-300 // 32)
    assert sorted(map(tuple, table.tolist())) == [(bh, j) for bh in range(6) for j in range(nq)]  # every tile once
    keys = [min((j + 1) * 32, 300) - max(j * 32 - wins[bh % 3] + 1, 0) for bh, j in table.tolist()]
    assert keys == sorted(keys, reverse=True)
    assert table[0].tolist() in ([0, nq - 1], [3, nq - 1])  # a causal head's last block leads


def test_bad_windows_are_one_clear_error():
    q, k, v = _qkv(1, 4, 2, 8, 16)
    with pytest.raises(ValueError, match="3 windows"):
        triton_prefill.banded_attention(q, k, v, (4, 4, 4), 0, 0.25)


@requires_triton
@pytest.mark.parametrize("t,window,sinks", [(29, 6, 0), (29, 6, 2), (5, 8, 0)])
def test_attention_dispatches_to_triton(monkeypatch, t, window, sinks):
    calls = []
    real = triton_prefill.sliding
    monkeypatch.setattr(triton_prefill, "sliding", lambda *a: calls.append(a[3:5]) or real(*a))
    q, k, v = _qkv(2, 6, 2, t, 16, seed=11)
    got = attention(q, k, v, scale=0.3, window=window, sinks=sinks, config=SWA_TRITON)
    assert calls == [(window, sinks)]
    torch.testing.assert_close(got.double(), _reference(q, k, v, (window,) * 2, sinks, 0.3).double(), atol=1e-5, rtol=0)
    # never for a padding mask or fewer queries than keys (not a plain prefill: the dense path runs)
    pad = torch.ones(2, 1, t, t, dtype=torch.bool, device=DEV).tril()
    attention(q, k, v, scale=0.3, window=window, sinks=sinks, mask=pad, config=SWA_TRITON)
    attention(q[:, :, -3:], k, v, scale=0.3, window=window, sinks=sinks, config=SWA_TRITON)
    assert len(calls) == 1
    # forced, it cannot take gradients (the kernel has no backward): one clear error, not another kernel
    qg = q.detach().clone().requires_grad_()
    with pytest.raises(select.KernelUnavailable, match="no gradient"):
        attention(qg, k, v, scale=0.3, window=window, sinks=sinks, config=SWA_TRITON)
    # without the interpreter switch on CPU tensors it is unavailable, and says so
    if DEV == "cpu":
        with pytest.raises(select.KernelUnavailable, match="triton_on_cpu"):
            attention(q, k, v, scale=0.3, window=window, sinks=sinks, config=KernelConfig(swa_prefill="triton"))


@requires_triton
@pytest.mark.parametrize("hq,hk,fa_kv,t,window,sinks", [
    (6, 3, [0, 2], 257, 40, 0),  # GQA, FA heads not contiguous, odd length
    (6, 3, [1], 131, 200, 2),  # window longer than the sequence, sinks
    (4, 4, [3], 100, 17, 3),  # MHA
])
def test_one_launch_hybrid_layer_equals_reference_and_split_path(monkeypatch, hq, hk, fa_kv, t, window, sinks):
    q, k, v = _qkv(2, hq, hk, t, 16, seed=t)
    plan = LayerPlan(0, hk, window, sinks, "fixed", fa_kv=fa_kv, kernels=HYBRID_TRITON)
    mod = SimpleNamespace(training=False, consa_plan=plan)
    calls = []
    real = triton_prefill.hybrid
    monkeypatch.setattr(triton_prefill, "hybrid", lambda *a: calls.append(1) or real(*a))
    out = consa_attention(mod, q, k, v, None, 0.3)[0]
    assert calls and out.shape == (2, t, hq, 16)
    g = hq // hk
    allowed = per_head_allowed([(h // g) in fa_kv for h in range(hq)], t, t, window, sinks, None, DEV)
    torch.testing.assert_close(out.double(), reference_attention(q, k, v, allowed, 0.3).transpose(1, 2).double(), atol=1e-5, rtol=0)
    with select.override(plan, hybrid_prefill="split"):
        torch.testing.assert_close(out, consa_attention(mod, q, k, v, None, 0.3)[0], atol=1e-5, rtol=0)
    assert len(calls) == 1  # the split path took no one-launch call
    # the FA heads really are causal: making a different head FA changes the output
    other = [h for h in range(hk) if h not in fa_kv][:1]
    if window < t:
        alt_plan = LayerPlan(0, hk, window, sinks, "fixed", fa_kv=other, kernels=HYBRID_TRITON)
        alt = consa_attention(SimpleNamespace(training=False, consa_plan=alt_plan), q, k, v, None, 0.3)[0]
        assert (alt - out).abs().max() > 1e-3


def test_one_launch_hybrid_is_skipped_for_padding_decode_gradients_and_other_backends(monkeypatch):
    monkeypatch.setattr(triton_prefill, "hybrid", lambda *a, **kw: pytest.fail("one-launch path taken"))
    q, k, v = _qkv(2, 4, 2, 33, 16)
    mod = SimpleNamespace(training=False, consa_plan=LayerPlan(0, 2, 8, 0, "fixed", fa_kv=[0], kernels=HYBRID_TRITON))
    consa_attention(mod, q, k, v, torch.ones(2, 1, 33, 33, dtype=torch.bool, device=DEV).tril(), 0.3)
    consa_attention(mod, q[:, :, -1:], k, v, None, 0.3)
    consa_attention(mod, q.detach().clone().requires_grad_(), k, v, None, 0.3)
    with pytest.raises(ValueError, match="swa_prefill"):  # the one launch runs the SWA heads on triton: no other kernel
        KernelConfig(hybrid_prefill="triton", swa_prefill="sdpa")


@requires_triton
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("t,wins,sinks", [(4096, (512,) * 6, 0), (3001, (3001, 128, 128, 3001, 128, 128), 4), (8192, (4096,) * 6, 0)])
def test_bf16_on_gpu(t, wins, sinks):
    q, k, v = _qkv(1, 12, 6, t, 128, torch.bfloat16, seed=t)
    out = triton_prefill.banded_attention(q, k, v, wins, sinks, 128**-0.5)
    idx = torch.linspace(0, t - 1, 97, device=DEV).long()  # a sample of query rows, dense float64 reference
    i, j = idx[:, None], torch.arange(t, device=DEV)[None, :]
    allowed = torch.stack([(j <= i) & ((i - j < wins[h // 2]) | (j < sinks)) for h in range(12)])[None]
    ref = reference_attention(q[:, :, idx].float(), k.float(), v.float(), allowed, 128**-0.5)
    err = (out[:, :, idx].float() - ref.float()).norm() / ref.float().norm()
    assert err < 1e-2


def test_dtypes_the_kernel_takes(monkeypatch):
    """fp16/fp32 anywhere; bf16 only from compute capability 8.0 on (no bf16 tl.dot before Ampere)."""
    q = torch.zeros(1, 2, 4, 16)
    assert triton_decode.dtype_ok(q) and triton_decode.dtype_ok(q.half()) and not triton_decode.dtype_ok(q.double())
    fake = torch.zeros(1, device="meta").new_zeros(1, 2, 4, 16, dtype=torch.bfloat16)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    for cap, ok in (((7, 5), False), ((8, 0), True), ((9, 0), True)):
        monkeypatch.setattr(triton_decode, "_capability", lambda device, cap=cap: cap)
        assert triton_decode.dtype_ok(fake) is ok
