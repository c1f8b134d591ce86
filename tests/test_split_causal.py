"""``split_causal``: causal prefill as uniform batched flash calls merged by log-sum-exp, against the
float64 dense reference (CPU flash kernel here; cuDNN / FA2 on the GPU test)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from consa.attention import select, split_causal
from consa.attention.attend import attention
from consa.attention.kernels import reference_attention
from consa.attention.plan import KernelConfig


def _qkv(b, hq, hk, t, d, seed, layout, device="cpu", dtype=torch.float32):
    g = torch.Generator(device=device).manual_seed(seed)
    if layout == "bthd":  # transformers' storage
        return [torch.randn(b, t, h, d, generator=g, device=device, dtype=dtype).transpose(1, 2) for h in (hq, hk, hk)]
    return [torch.randn(b, h, t, d, generator=g, device=device, dtype=dtype) for h in (hq, hk, hk)]


@pytest.mark.parametrize("hq,hk", [(4, 2), (6, 2), (3, 3), (8, 1)])
@pytest.mark.parametrize("t,depth", [(24, 3), (40, 1), (52, 2), (8, 3), (112, 4)])
@pytest.mark.parametrize("layout", ["bhtd", "bthd"])
def test_split_causal_matches_the_dense_reference(hq, hk, t, depth, layout):
    q, k, v = _qkv(2, hq, hk, t, 24, seed=t + depth, layout=layout)
    scale = 24**-0.5
    allowed = torch.ones(t, t, dtype=torch.bool).tril()
    want = reference_attention(q.double(), k.double(), v.double(), allowed, scale)
    got = split_causal.split_causal(q, k, v, scale, depth)
    assert got.shape == want.shape
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=2e-5)
    # the same inputs with one key dropped from the visible set differ: the comparison can fail
    near = allowed.clone()
    near[t - 1, t // 2] = False
    assert (reference_attention(q.double(), k.double(), v.double(), near, scale) - got.double()).abs().max() > 1e-4


def test_split_causal_needs_an_even_split():
    q, k, v = _qkv(1, 2, 2, 20, 8, 0, "bhtd")
    with pytest.raises(ValueError, match="does not split"):
        split_causal.split_causal(q, k, v, 1.0, 3)
    assert not split_causal.splits(20, 3) and split_causal.splits(24, 3) and not split_causal.splits(24, 0)


def test_attention_takes_the_split_only_on_cuda_half_precision(monkeypatch):
    split = KernelConfig(split_depth=2)
    q, k, v = _qkv(1, 4, 2, 16, 8, 1, "bthd")
    assert select.choose(split, "causal_prefill", q, k, v) is None  # CPU: one causal SDPA call as before
    assert "CUDA" in split_causal.why_not(q, k, 2)
    calls = []
    monkeypatch.setattr(split_causal, "split_causal", lambda *a, **kw: calls.append(a) or None)
    attention(q, k, v, scale=0.3, config=split)
    assert not calls


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_split_causal_on_gpu_through_kernels_attention():
    split = KernelConfig(split_depth=2)
    q, k, v = _qkv(1, 4, 2, 8192 + 4 * 37, 128, 3, "bthd", device="cuda", dtype=torch.bfloat16)
    assert select.choose(split, "causal_prefill", q, k, v) is not None
    got = attention(q, k, v, scale=128**-0.5, config=split)
    want = F.scaled_dot_product_attention(q.float(), k.float().repeat_interleave(2, 1), v.float().repeat_interleave(2, 1),
                                          is_causal=True, scale=128**-0.5)
    err = (got.float() - want).norm() / want.norm()
    assert err < 1e-2, err
