"""Rolling the hybrid cache back (``activate_past_recording`` + ``crop``): what assisted and prompt-lookup
decoding need. A rolled-back layer must equal a layer that never saw the rejected draft tokens."""

from __future__ import annotations

import pytest
import torch

import consa
from consa.compat import cache_kwargs
from consa.allocation import Allocation
from consa.attention.cache import HybridCache, HybridLayer
from consa.models import plans_of
from consa.tiny import tiny_model



def _kv(t, heads=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, heads, t, 4, generator=g), torch.randn(2, heads, t, 4, generator=g)


def _state(layer):
    return (layer.cumulative_length, layer.swa_slots,
            *[getattr(layer, n).clone() for n in ("fa_keys", "fa_values", "swa_keys", "swa_values")])


def _same(a, b):
    assert a[:2] == b[:2]
    for x, y in zip(a[2:], b[2:]):
        assert torch.equal(x, y)


@pytest.mark.parametrize("fa_kv,window,sinks", [([1], 4, 0), ([1], 4, 2), ([0, 1, 2], 4, 0), ([], 3, 1), ([2], 1, 0)])
@pytest.mark.parametrize("prompt,drafts,accepted", [(2, 3, 1), (9, 4, 0), (9, 4, 4), (12, 1, 0)])
def test_crop_equals_a_layer_that_never_saw_the_rejected_drafts(fa_kv, window, sinks, prompt, drafts, accepted):
    k, v = _kv(prompt + drafts)
    rolled = HybridLayer(3, fa_kv, window, sinks)
    rolled.activate_past_recording()
    rolled.update(k[:, :, :prompt], v[:, :, :prompt])
    rolled.crop(0)  # back to the minimal state after the forward that is kept
    rolled.update(k[:, :, prompt:], v[:, :, prompt:])  # a verification forward over the drafts
    if rolled.swa_kv and prompt > window - 1 + sinks:
        assert rolled.swa_keys.shape[-2] > window - 1 + sinks  # held back untrimmed for the rollback
    rolled.crop(-(drafts - accepted))
    plain = HybridLayer(3, fa_kv, window, sinks)
    plain.update(k[:, :, :prompt], v[:, :, :prompt])
    if accepted:
        plain.update(k[:, :, prompt : prompt + accepted], v[:, :, prompt : prompt + accepted])
    _same(_state(rolled), _state(plain))
    # what the cache semantics say, from this test's own numbers (not the layer's accounting): FA heads keep
    # every slot, SWA heads the first S and the last W - 1 (a query sees W - 1 keys back plus the sinks)
    seen, n_fa = prompt + accepted, len(fa_kv)
    assert rolled.stored_elements() == 2 * 2 * 4 * (n_fa * seen + (3 - n_fa) * min(seen, window - 1 + sinks))
    # and the next step returns the same keys at the same slots
    nk, nv = _kv(1, seed=5)
    a, b = rolled.update(nk, nv)[0], plain.update(nk, nv)[0]
    if isinstance(a, torch.Tensor):  # a pure FA layer returns plain keys
        assert torch.equal(a, b)
    else:
        assert a.swa_slots == b.swa_slots and torch.equal(a.swa, b.swa) and torch.equal(a.fa, b.fa)


def test_crop_past_what_the_window_holds_is_one_clear_error():
    k, v = _kv(12)
    layer = HybridLayer(3, [1], 4)
    layer.activate_past_recording()
    layer.update(k[:, :, :10], v[:, :, :10])
    layer.crop(0)
    layer.update(k[:, :, 10:], v[:, :, 10:])
    with pytest.raises(RuntimeError, match="no longer hold slot"):
        layer.crop(-3)  # 2 tokens came since the trim; the third is out of the window's reach
    assert layer.get_seq_length() == 12  # nothing changed
    plain = HybridLayer(3, [1], 4)
    plain.update(k[:, :, :10], v[:, :, :10])
    with pytest.raises(RuntimeError, match="activate_past_recording"):
        plain.crop(-1)  # trimmed on update: nothing to roll back to


def test_crop_by_a_tensor_count_keeps_integer_slots():
    """transformers 5.17 passes assisted decoding's match count as a 0-dim tensor; a tensor slot offset
    reached the Triton decode kernel as a pointer and broke its compile on CUDA."""
    k, v = _kv(12)
    layer = HybridLayer(3, [1], 4)
    layer.activate_past_recording()
    layer.update(k, v)
    layer.crop(torch.tensor(-2))
    assert type(layer.get_seq_length()) is int and layer.get_seq_length() == 10
    assert type(layer.swa_slots.offset) is int and layer.swa_slots.offset == 10 - 3


def test_crop_to_an_absolute_length_and_reset():
    k, v = _kv(6)
    layer = HybridLayer(3, [0], 10)
    layer.update(k, v)
    layer.crop(4)  # the legacy positive form: keep 4 slots
    assert layer.get_seq_length() == 4 and layer.fa_keys.shape[-2] == 4 and layer.swa_keys.shape[-2] == 4
    layer.activate_past_recording()
    layer.reset()
    assert not layer.record_past and layer.get_seq_length() == 0


def _hybrid(seed):
    model = tiny_model("qwen3", seed=seed, num_layers=3, num_heads=4, num_kv_heads=2, hidden_size=64)
    shape = consa.model_shape(model)
    alloc = Allocation.from_units([True, False, False, True, False, False], "kv_head", shape, 4, 1)
    consa.apply_allocation(model, alloc)
    return model


_CUDA = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
DEVICES = [
    pytest.param("cpu", torch.float32, id="cpu"),
    # Session 5 saw this fail on the H200 in fp32: crop got transformers' 0-dim tensor match count, so the
    # SWA slot offset became a tensor, which the one-launch Triton decode (fp32 and bf16, not fp64) cannot
    # take. crop now casts it (test_crop_by_a_tensor_count_keeps_integer_slots).
    pytest.param("cuda", torch.float32, id="cuda-fp32", marks=_CUDA),
    pytest.param("cuda", torch.float64, id="cuda-fp64", marks=_CUDA),
]


@pytest.mark.parametrize("device,dtype", DEVICES)
@pytest.mark.parametrize("how", ["prompt_lookup", "assistant"])
def test_assisted_generation_equals_greedy(monkeypatch, how, device, dtype):
    """Greedy decoding with drafts (prompt lookup, or a second hybrid model as the assistant) verified
    over the hybrid cache gives plain greedy decoding's tokens, and really rolled drafts back. On CUDA
    the overlapped multi-query verification runs too (and in fp32 the one-launch decode)."""
    model = _hybrid(0).to(device, dtype)
    g = torch.Generator().manual_seed(2)
    pattern = torch.randint(3, model.config.vocab_size, (1, 5), generator=g)
    ids = torch.cat([pattern, pattern, pattern[:, :3]], dim=1).to(device)  # repeats: prompt lookup proposes drafts
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None)
    want = model.generate(ids, **cache_kwargs(HybridCache(plans_of(model)), model), **kw)
    crops = []
    real = HybridLayer.crop
    monkeypatch.setattr(HybridLayer, "crop", lambda self, n: crops.append(n) or real(self, n))
    extra = {"prompt_lookup_num_tokens": 3} if how == "prompt_lookup" else {"assistant_model": _hybrid(1).to(device, dtype)}
    cache = HybridCache(plans_of(model))
    got = model.generate(ids, **cache_kwargs(cache, model), **extra, **kw)
    assert torch.equal(got, want)
    assert any(n < 0 for n in crops), "no draft token was ever rolled back"
    assert cache.get_seq_length() == got.shape[1] - 1
    # trimmed again: per layer 2 (K, V) x B 1 x d 16 x (n_FA T + n_SWA min(T, W - 1 + S)), with _hybrid's layers
    # holding 1, 1 and 0 FA heads of 2 (units 0 and 3 FA, layer-major), W = 4, S = 1
    seen = got.shape[1] - 1
    assert [layer.stored_elements() for layer in cache.layers] == [
        2 * 16 * (n_fa * seen + (2 - n_fa) * min(seen, 4 - 1 + 1)) for n_fa in (1, 1, 0)]
