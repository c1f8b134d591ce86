"""Kernels against the float64 dense reference: causal, sliding window, sinks, KeySlots, GQA/MHA, odd lengths."""

from __future__ import annotations

import warnings

import pytest
import torch

from consa.attention import kernels, masks, select
from consa.attention.attend import attention
from consa.attention.kernels import reference_attention, sliding_block_mask
from consa.attention.plan import KernelConfig, KeySlots


def _qkv(b, hq, hk, tq, tk, d=16, seed=0, device="cpu", dtype=torch.float32):
    g = torch.Generator(device=device).manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, device=device, dtype=dtype)  # noqa: E731
    return mk(b, hq, tq, d), mk(b, hk, tk, d), mk(b, hk, tk, d)


def _allowed(q_pos, k_pos, window, sinks):
    causal = q_pos[:, None] >= k_pos[None, :]
    if window is None:
        return causal
    return causal & ((q_pos[:, None] - k_pos[None, :] < window) | (k_pos[None, :] < sinks))


@pytest.mark.parametrize("hq,hk", [(4, 2), (3, 3)])
@pytest.mark.parametrize("window,sinks", [(None, 0), (5, 0), (4, 2), (1, 0), (64, 1)])
@pytest.mark.parametrize("tq,total", [(13, 13), (1, 17), (5, 23)])
def test_attention_matches_reference_over_slots(hq, hk, window, sinks, tq, total):
    """Queries are the last tq of total slots; keys held are either all slots or sinks + a tail."""
    q_pos = torch.arange(total - tq, total)
    layouts = [KeySlots()]
    if window is not None and total - tq - window + 1 > sinks:  # a cache that dropped invisible slots
        layouts.append(KeySlots(num_sinks=sinks, offset=total - tq - window + 1))
    q, k_all, v_all = _qkv(2, hq, hk, tq, total, seed=tq + total)
    pad = torch.ones(2, total, dtype=torch.bool)
    pad[0, :3] = False  # left padding on row 0
    for slots in layouts:
        held = slots.positions(total - slots.offset + slots.num_sinks if not slots.is_identity() else total, "cpu")
        k, v = k_all[:, :, held], v_all[:, :, held]
        allowed = _allowed(q_pos, held, window, sinks)[None, None]
        ref = reference_attention(q, k, v, allowed.expand(2, hq, -1, -1), 0.3)
        got = attention(q, k, v, scale=0.3, window=window, sinks=sinks, slots=slots)
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
        # with transformers' padding+causal mask over all slots
        mask = (pad[:, None, None, :] & (q_pos[:, None] >= torch.arange(total)[None, :])[None, None])
        allowed_p = allowed & pad[:, None, None, held]
        ref_p = reference_attention(q, k, v, allowed_p.expand(2, hq, -1, -1), 0.3)
        got_p = attention(q, k, v, scale=0.3, window=window, sinks=sinks, slots=slots, mask=mask)
        rows = allowed_p.expand(2, hq, -1, -1).any(-1)  # rows with a visible key (fully padded rows are undefined)
        torch.testing.assert_close(got_p[rows], ref_p[rows], atol=1e-5, rtol=0)


@pytest.mark.parametrize("tq,tk,window,sinks", [(300, 300, 50, 0), (300, 300, 128, 3), (77, 300, 40, 2), (256, 256, 1, 0), (130, 130, 500, 0), (1000, 1000, 200, 0)])
def test_closed_form_block_mask(tq, tk, window, sinks):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    bm = sliding_block_mask(tq, tk, window, sinks)
    mod = masks.offset_mask_mod(masks.sliding_window_mask_mod(window, sinks), tk - tq)
    ref_bm = create_block_mask(mod, None, None, tq, tk, device="cpu")
    assert torch.equal(bm.to_dense(), ref_bm.to_dense())
    # full blocks really are fully visible: flex (eager, CPU) with this mask equals the reference
    q, k, v = _qkv(1, 4, 2, tq, tk, seed=tq)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager flex warns that it is unfused
        out = flex_attention(q, k, v, block_mask=bm, scale=0.25, enable_gqa=True)
    allowed = masks.dense_mask(mod, tq, tk)[None, None]
    torch.testing.assert_close(out, reference_attention(q, k, v, allowed, 0.25), atol=1e-5, rtol=0)


def test_select_mask_columns():
    m = torch.arange(10)[None, None, None, :].expand(1, 1, 2, 10)
    cols = kernels.select_mask_columns(m, KeySlots(num_sinks=2, offset=6), 6)
    assert cols[0, 0, 0].tolist() == [0, 1, 6, 7, 8, 9]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("t,window,sinks", [(2048, 512, 0), (3001, 128, 4)])
def test_flex_sliding_on_gpu(t, window, sinks):
    q, k, v = _qkv(1, 16, 8, t, t, d=128, device="cuda", dtype=torch.bfloat16)
    out = attention(q, k, v, scale=128**-0.5, window=window, sinks=sinks, config=KernelConfig(swa_prefill="flex"))
    pos = torch.arange(t, device="cuda")
    ref = reference_attention(q.float(), k.float(), v.float(), _allowed(pos, pos, window, sinks)[None, None], 128**-0.5)
    err = (out.float() - ref.float()).norm() / ref.float().norm()
    assert err < 1e-2


def test_prefill_overlap_setting():
    """``prefill_overlap``: "auto" overlaps prefills up to ``overlap_max_tokens`` queries, never decode."""
    auto = KernelConfig(prefill_overlap="auto")
    limit = auto.overlap_max_tokens
    assert [select.overlap_wanted(auto, n) for n in (1, 2, limit, limit + 1)] == [False, True, True, False]
    assert select.overlap_wanted(KernelConfig(prefill_overlap=True), limit + 1) and not select.overlap_wanted(KernelConfig(), 1)
    assert not select.overlap_wanted(KernelConfig(prefill_overlap=False), 2)
    assert not select.overlap_prefill(KernelConfig(), torch.randn(1, 2, 8, 4))  # CPU tensors never take a side stream


def test_overlap_priority_goes_to_the_longer_group():
    """"auto" puts the group with more (cost-weighted) visible pairs first; a fixed setting is kept."""
    auto = KernelConfig()
    assert select.overlap_priority(auto, 4, 12, 8192, 512) == "fa"  # 4 causal heads outweigh 12 narrow bands
    assert select.overlap_priority(auto, 4, 12, 8192, 4096) == "swa"  # wide bands on 3x the heads
    assert select.overlap_priority(auto, 8, 8, 32768, 4096) == "fa"
    assert select.overlap_priority(auto, 1, 15, 2048, 4096) == "swa"  # window past the sequence: causal pairs
    costly = KernelConfig(triton_pair_cost=100.0, chunked_pair_cost=1.25)
    assert select.overlap_priority(costly, 4, 12, 8192, 512) == "swa"  # the estimate, not a constant, decides
    for fixed in ("fa", "swa", None):
        assert select.overlap_priority(KernelConfig(overlap_priority=fixed), 4, 12, 8192, 512) == fixed


def test_kernel_config_refuses_unknown_names():
    for bad in (dict(swa_prefill="flesh"), dict(hybrid_prefill="auto"), dict(decode="triton"), dict(split_depth=-1),
                dict(overlap_priority="both"), dict(prefill_overlap="sometimes")):
        with pytest.raises(ValueError, match=next(iter(bad))):
            KernelConfig(**bad)
    assert KernelConfig.from_backend("sdpa") == KernelConfig(swa_prefill="sdpa")
    assert KernelConfig(split_depth=2).changed() == {"split_depth": 2}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("priority", [None, "fa", "swa"])
def test_overlapped_prefill_equals_serial_on_gpu(priority):
    """The hybrid prefill with its SWA heads on a side stream (and either group's stream at a high
    priority) gives the serial path's output, eagerly and replayed from a CUDA graph."""
    from types import SimpleNamespace

    from consa.attention.hybrid import consa_attention
    from consa.attention.plan import LayerPlan

    q, k, v = _qkv(1, 16, 8, 4096, 4096, d=128, seed=3, device="cuda", dtype=torch.bfloat16)
    plan = LayerPlan(0, 8, 512, 0, "fixed", fa_kv=[0, 1], kernels=KernelConfig(prefill_overlap=False))
    mod = SimpleNamespace(training=False, consa_plan=plan)
    serial = consa_attention(mod, q, k, v, None, 128**-0.5)[0]
    plan.kernels = KernelConfig(prefill_overlap=True, overlap_priority=priority)
    torch.testing.assert_close(consa_attention(mod, q, k, v, None, 128**-0.5)[0], serial, atol=0, rtol=0)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    g = torch.cuda.CUDAGraph()
    with torch.cuda.stream(s):
        consa_attention(mod, q, k, v, None, 128**-0.5)
        with torch.cuda.graph(g, stream=s):
            out = consa_attention(mod, q, k, v, None, 128**-0.5)[0]
    torch.cuda.current_stream().wait_stream(s)
    g.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, serial, atol=0, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_masked_gqa_sdpa_takes_a_fused_kernel():
    """A prompt chunk over cached keys (GQA and a boolean mask, bf16): consa's SDPA call must run on the
    memory-efficient kernel, not SDPA's math fallback (with ``enable_gqa`` and a mask only math remains,
    and it holds [B, Hq, Tq, Tk] float32 scores): forcing the efficient backend must not raise, and the
    result equals the dense reference."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from consa.attention.kernels import reference_attention, sdpa

    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, 12, 37, 64, device="cuda", generator=g, dtype=torch.bfloat16)
    k, v = (torch.randn(1, 4, 101, 64, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(2))
    allowed = torch.arange(101, device="cuda")[None, :] <= torch.arange(64, 101, device="cuda")[:, None]
    allowed[:, :5] = False  # padding
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
        out = sdpa(q, k, v, allowed[None, None], False, 0.125, 0.0)
    want = reference_attention(q.double(), k.double(), v.double(), allowed, 0.125)
    torch.testing.assert_close(out.double(), want, atol=2e-2, rtol=2**-7)
