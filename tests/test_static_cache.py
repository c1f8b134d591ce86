"""The static hybrid cache: ring layout, the kernel's static mode and the torch fallback against the
float64 reference, model logits through the cache = uncached logits, element counts, crop."""

from __future__ import annotations

import pytest
import torch

import consa
from consa import compat
from consa.allocation import Allocation
from consa.attention import kernels, triton_decode
from consa.attention.cached import dense_ring, ring_slots
from consa.attention.plan import KernelConfig, LayerPlan, RingKV
from consa.attention.static_cache import StaticHybridCache, StaticHybridLayer
from consa.models import plans_of
from consa.tiny import tiny_model

DEV = "cuda" if torch.cuda.is_available() else "cpu"
KERNEL = pytest.mark.skipif(
    not triton_decode.available() or not (torch.cuda.is_available() or triton_decode.interpreted()),
    reason="needs triton: CUDA, or its interpreter (TRITON_INTERPRET=1 before import)",
)


def _filled_layer(fa_kv, n_kv, window, sinks, max_len, total, b=2, d=16, rollback=0, dtype=torch.float32, seed=0):
    """A layer that has seen ``total`` slots one decode step at a time, and the keys/values of every slot."""
    g = torch.Generator().manual_seed(seed)
    k_all = torch.randn(b, n_kv, total, d, generator=g).to(dtype).to(DEV)
    v_all = torch.randn(b, n_kv, total, d, generator=g).to(dtype).to(DEV)
    layer = StaticHybridLayer(n_kv, fa_kv, window, max_len, sinks, rollback)
    layer.allocate(b, d, dtype, DEV)
    for t in range(total):
        out = layer.update(k_all[:, :, t : t + 1], v_all[:, :, t : t + 1])
    return layer, k_all, v_all, out


def _reference(q, k_all, v_all, fa_kv, window, sinks, scale, pad=None):
    """float64: the query at the last slot sees every slot (FA heads) or its window plus the sinks."""
    total = k_all.shape[-2]
    group = q.shape[1] // k_all.shape[1]
    slot = torch.arange(total, device=q.device)
    band = (total - 1 - slot < window) | (slot < sinks)
    fa_q = torch.tensor([h // group in fa_kv for h in range(q.shape[1])], device=q.device)
    allowed = torch.where(fa_q[:, None], torch.ones_like(band), band)[None, :, None, :]
    if pad is not None:
        allowed = allowed & pad[:, None, None, :total]
    return kernels.reference_attention(q, k_all, v_all, allowed, scale).double()


# batch-independent cases: FA kv heads, kv heads, q heads, window, sinks, rollback, max_len, total
CASES = [
    ([1], 3, 6, 5, 0, 0, 40, 23),  # GQA 2, ring wrapped several times
    ([0, 2], 3, 9, 4, 2, 0, 30, 30),  # group 3, sinks, full buffer
    ([], 2, 4, 6, 1, 2, 20, 17),  # all-SWA layer, rollback room (window masking inside the ring)
    ([0, 1], 2, 4, 6, 0, 0, 19, 7),  # all-FA layer, buffer longer than the length
    ([1], 2, 4, 7, 2, 0, 25, 5),  # ring not yet full
]


@pytest.mark.parametrize("fa_kv,n_kv,hq,window,sinks,rollback,max_len,total", CASES)
@pytest.mark.parametrize("path", ["kernel", "torch"])
def test_ring_decode_equals_reference(fa_kv, n_kv, hq, window, sinks, rollback, max_len, total, path, monkeypatch):
    if path == "kernel" and (not triton_decode.available() or not (torch.cuda.is_available() or triton_decode.interpreted())):
        pytest.skip("needs triton")
    monkeypatch.setattr(triton_decode, "BLOCK_N", 16)  # several key blocks and splits at these sizes
    layer, k_all, v_all, (k, v) = _filled_layer(fa_kv, n_kv, window, sinks, max_len, total, rollback=rollback, d=24)
    assert isinstance(k, RingKV) and int(k.length) == total
    q = torch.randn(2, hq, 1, 24, generator=torch.Generator().manual_seed(3)).to(DEV)
    pad = torch.ones(2, max_len, dtype=torch.bool, device=DEV)
    pad[1, : min(3, total - 1)] = False  # left padding on row 1
    plan = LayerPlan(0, n_kv, window, sinks, "fixed", fa_kv=fa_kv)
    want = _reference(q, k_all, v_all, fa_kv, window, sinks, 0.3, pad)
    if path == "kernel":
        heads = triton_decode.head_tables(n_kv, tuple(fa_kv), q.device)
        got = triton_decode.hybrid_decode(q, k.fa, v.fa, k.swa, v.swa, heads, 0.3, mask=pad[:, None, None, :],
                                          swa_sinks=sinks, window=window, sinks=sinks, length=k.length, ring=k.ring, splits=3)
    else:
        got = dense_ring(plan, q, k, v, pad[:, None, None, :], 0.3)
    torch.testing.assert_close(got.transpose(1, 2).double(), want, atol=1e-5, rtol=0)


def test_ring_slots_track_the_newest_slot():
    length = torch.tensor([13])
    # sinks 2, ring 4: indices 2..5 hold slots ≡ 2..5 (mod 4, shifted by 2), the newest ≤ 12
    assert ring_slots(6, length, 2, 4).tolist() == [0, 1, 10, 11, 12, 9]
    assert ring_slots(6, torch.tensor([3]), 2, 4).tolist() == [0, 1, 2, -1, -1, -1]


def test_element_counts_match_formula():
    layer, *_ = _filled_layer([0], 3, window=5, sinks=1, max_len=33, total=9, b=2, d=8)
    assert layer.stored_elements() == 2 * 2 * 8 * (1 * 33 + 2 * (5 + 1)) == layer.expected_elements(2, 8)
    small, *_ = _filled_layer([0], 3, window=50, sinks=1, max_len=12, total=3, b=1, d=8)
    assert small.stored_elements() == 2 * 1 * 8 * (12 + 2 * 12)  # the ring never exceeds the buffer


def _model(window=4, sinks=1, num_layers=3, fa_rows=None):
    model = tiny_model("qwen3", num_kv_heads=2, num_layers=num_layers)
    shape = consa.model_shape(model)
    rows = fa_rows or [[(i % 3 == 0 and k == 1) or (i % 3 == 1 and k == 0) for k in range(2)] for i in range(num_layers)]
    consa.apply_allocation(model, Allocation("kv_head", shape, window, tuple(map(tuple, rows)), sinks))
    return model


def _batch(b=2, t=14, pad=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 101, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.long)
    mask[0, :pad] = 0
    ids[0, :pad] = 0
    return ids, mask, (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)


@pytest.mark.parametrize("chunks", [[6], [5, 3]])
def test_cached_logits_equal_uncached(chunks, one_thread):
    """Prefill (one chunk or two), then one token at a time past the ring's wrap: the logits of every
    real position equal the uncached forward's."""
    model = _model()
    ids, mask, pos = _batch()
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        cache = StaticHybridCache(plans_of(model), 16)
        got, start = [], 0
        for n in chunks + [1] * (ids.shape[1] - sum(chunks)):
            end = start + n
            got.append(model(input_ids=ids[:, start:end], attention_mask=mask[:, :end], position_ids=pos[:, start:end],
                             use_cache=True, **compat.cache_kwargs(cache, model)).logits)
            start = end
    got = torch.cat(got, 1)
    valid = mask.bool()
    torch.testing.assert_close(got[valid], want[valid], atol=2e-4, rtol=0)
    assert cache.get_seq_length() == ids.shape[1] and int(cache.layers[0].length) == ids.shape[1]


def test_crop_rolls_back_within_the_ring_and_refuses_beyond():
    layer, k_all, v_all, _ = _filled_layer([0], 2, window=4, sinks=0, max_len=30, total=20, rollback=2)
    ref = StaticHybridLayer(2, [0], 4, 30, 0, 2)
    ref.allocate(2, 16, torch.float32, DEV)
    for t in range(17):
        ref.update(k_all[:, :, t : t + 1], v_all[:, :, t : t + 1])
    layer.crop(-3)  # three drafts rejected: the ring kept room for them
    k, v = layer.update(k_all[:, :, 17:18], v_all[:, :, 17:18])
    k_ref, v_ref = ref.update(k_all[:, :, 17:18], v_all[:, :, 17:18])
    q = torch.randn(2, 4, 1, 16, device=DEV)
    plan = LayerPlan(0, 2, 4, 0, "fixed", fa_kv=[0])
    torch.testing.assert_close(dense_ring(plan, q, k, v, None, 0.5), dense_ring(plan, q, k_ref, v_ref, None, 0.5))
    tight, *_ = _filled_layer([0], 2, window=4, sinks=0, max_len=30, total=20, rollback=0)
    with pytest.raises(RuntimeError, match="roll back 1"):
        tight.crop(-2)
    assert tight.get_seq_length() == 20 and int(tight.length) == 20  # nothing changed


def test_full_cache_is_one_clear_error():
    layer = StaticHybridLayer(2, [0], 4, max_len=5)
    layer.allocate(1, 8, torch.float32, DEV)
    with pytest.raises(ValueError, match="static cache is full"):
        layer.update(torch.zeros(1, 2, 6, 8, device=DEV), torch.zeros(1, 2, 6, 8, device=DEV))
    assert layer.get_seq_length() == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_decode_update_and_kernel_never_sync_the_host():
    layer, k_all, v_all, _ = _filled_layer([0], 3, window=64, sinks=2, max_len=700, total=600, b=2, d=128,
                                           dtype=torch.bfloat16)
    q = torch.randn(2, 6, 1, 128, device="cuda", dtype=torch.bfloat16)
    heads = triton_decode.head_tables(3, (0,), q.device)
    new = torch.randn(2, 3, 1, 128, device="cuda", dtype=torch.bfloat16)
    k, v = layer.update(new, new)  # compile once outside the check
    triton_decode.hybrid_decode(q, k.fa, v.fa, k.swa, v.swa, heads, 0.1, swa_sinks=2, window=64, sinks=2, length=k.length, ring=k.ring)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        k, v = layer.update(new, new)
        out = triton_decode.hybrid_decode(q, k.fa, v.fa, k.swa, v.swa, heads, 0.1, swa_sinks=2, window=64, sinks=2,
                                          length=k.length, ring=k.ring)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    k_all, v_all = torch.cat([k_all, new, new], dim=2), torch.cat([v_all, new, new], dim=2)
    want = _reference(q, k_all, v_all, [0], 64, 2, 0.1)
    torch.testing.assert_close(out.transpose(1, 2).double(), want, atol=2e-2, rtol=0)


@KERNEL
@pytest.mark.parametrize("fa_kv,n_kv,sinks,window,steps", [([1], 3, 2, 3, 12), ([0, 2], 3, 0, 4, 9), ([], 2, 1, 2, 7), ([0, 1], 2, 0, 3, 5)])
def test_write_kernel_equals_torch_write(fa_kv, n_kv, sinks, window, steps, monkeypatch):
    """The one-launch decode write fills the same buffers as the torch ops (ring wrap-around, sinks,
    non-contiguous FA heads, empty groups), from views of a [B, T, H, D] projection as the model gives."""
    calls = []
    real = triton_decode.write_static
    monkeypatch.setattr(triton_decode, "write_static", lambda *a: calls.append(1) or real(*a))
    g = torch.Generator().manual_seed(5)
    kv = torch.randn(2, steps, 2 * n_kv, 20, generator=g).to(DEV)
    ks, vs = kv[..., :n_kv, :].transpose(1, 2), kv[..., n_kv:, :].transpose(1, 2)  # strided, like the model's
    layers = []
    for use_kernel in (True, False):
        layer = StaticHybridLayer(n_kv, fa_kv, window, 16, sinks, kernels=KernelConfig(triton_on_cpu=True))
        layer.allocate(2, 20, torch.float32, DEV)
        if not use_kernel:
            monkeypatch.setattr(triton_decode, "why_not", lambda *a, **kw: "switched off by the test")
        for t in range(steps):
            layer.update(ks[:, :, t : t + 1], vs[:, :, t : t + 1])
        layers.append(layer)
    for name in ("fa_keys", "fa_values", "swa_keys", "swa_values"):
        assert torch.equal(getattr(layers[0], name), getattr(layers[1], name)), name
    assert int(layers[0].length) == int(layers[1].length) == steps
    assert len(calls) == steps  # the first layer took the kernel, the second the torch ops


@KERNEL
@pytest.mark.parametrize("fa_kv,n_kv,hq,window,sinks,totals", [([1], 3, 9, 5, 2, (23, 4, 11)), ([], 2, 4, 6, 1, (17, 2, 30)),
                                                                 ([0, 1], 2, 6, 3, 0, (1, 29, 8))])
def test_per_row_lengths_equal_reference(fa_kv, n_kv, hq, window, sinks, totals, monkeypatch):
    """The static mode with one length per row (the server's slot pool: sequences at their own lengths):
    rows filled to different lengths (ring wrapped or not) and stacked into one batch; each row's
    output equals its own reference, and the write kernel puts each row's key at its own slot."""
    monkeypatch.setattr(triton_decode, "BLOCK_N", 16)
    max_len, d = 32, 24
    layers = [_filled_layer(fa_kv, n_kv, window, sinks, max_len, t, b=1, d=d, seed=i) for i, t in enumerate(totals)]
    stack = lambda name: torch.cat([getattr(lay, name) for lay, *_ in layers])  # noqa: E731
    kf, vf, ksw, vsw = (stack(n) for n in ("fa_keys", "fa_values", "swa_keys", "swa_values"))
    q = torch.randn(len(totals), hq, 1, d, generator=torch.Generator().manual_seed(7)).to(DEV)
    heads = triton_decode.head_tables(n_kv, tuple(fa_kv), q.device)
    length = torch.tensor(totals, device=DEV)
    ring = layers[0][0].ring
    got = triton_decode.hybrid_decode(q, kf, vf, ksw, vsw, heads, 0.3, swa_sinks=sinks, window=window, sinks=sinks,
                                      length=length, ring=ring, splits=3)
    for r, (_, k_all, v_all, _) in enumerate(layers):
        want = _reference(q[r : r + 1], k_all, v_all, fa_kv, window, sinks, 0.3)
        torch.testing.assert_close(got[r : r + 1].transpose(1, 2).double(), want, atol=1e-5, rtol=0)
    # one more key per row, each at its own slot: the rows' buffers as if each took a decode step alone
    g = torch.Generator().manual_seed(9)
    k_new, v_new = (torch.randn(len(totals), n_kv, 1, d, generator=g).to(DEV) for _ in range(2))
    triton_decode.write_static(k_new, v_new, kf, vf, ksw, vsw, heads, length, sinks, ring)
    for r, (lay, *_) in enumerate(layers):
        lay.update(k_new[r : r + 1], v_new[r : r + 1])
        for name, buf in (("fa_keys", kf), ("fa_values", vf), ("swa_keys", ksw), ("swa_values", vsw)):
            assert torch.equal(buf[r : r + 1], getattr(lay, name)), (r, name)
    with pytest.raises(ValueError, match="lengths of shape"):
        triton_decode.hybrid_decode(q, kf, vf, ksw, vsw, heads, 0.3, window=window, length=length[:2], ring=ring)
