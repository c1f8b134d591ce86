"""The registered consa attention against the unmodified model and a dense per-head-mask reference."""

import random
import zlib

import pytest
import torch

import consa
from consa.allocation import Allocation
from consa.attention.hybrid import consa_attention
from consa.attention.plan import LayerPlan
from consa.attention.kernels import reference_attention
from consa.tiny import FAMILIES, tiny_model

import attn_reference  # noqa: F401  (registers consa_reference)
from attn_reference import per_head_allowed

T = 23  # odd length, several windows long


def _inputs(batch=3, t=T, pad=(0, 5, 2), vocab=101, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, t), generator=g)
    mask = torch.ones(batch, t, dtype=torch.long)
    for b, p in enumerate(pad[:batch]):
        mask[b, :p] = 0  # left padding
        ids[b, :p] = 0
    return ids, mask


def _random_alloc(model, window, sinks=0, seed=0, granularity="kv_head"):
    shape = consa.model_shape(model)
    rng = random.Random(seed)
    units = [rng.random() < 0.5 for _ in range(shape.num_units(granularity))]
    units[0], units[-1] = True, False  # at least one of each
    return Allocation.from_units(units, granularity, shape, window, sinks)


def _logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_gate_one_reproduces_unmodified_model(family):
    model = tiny_model(family)
    ids, mask = _inputs()
    ref = _logits(model, ids, mask)
    mix = consa.attach_gates(model, window=4)
    shape = consa.model_shape(model)
    mix.z = torch.ones(shape.num_layers, shape.num_kv_heads)
    out = _logits(model, ids, mask)
    valid = mask.bool()
    assert (out - ref)[valid].abs().max() <= 1e-5


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("sinks", [0, 2])
def test_fixed_allocation_equals_dense_per_head_reference(family, sinks):
    model = tiny_model(family, num_layers=3, num_heads=6, num_kv_heads=3, hidden_size=72)  # GQA groups of 2
    ids, mask = _inputs()
    # crc32, not hash(): a str's hash changes with every process (PYTHONHASHSEED), so a failure would not rerun
    alloc = _random_alloc(model, window=5, sinks=sinks, seed=zlib.crc32(family.encode()) % 100)
    consa.apply_allocation(model, alloc)
    out = _logits(model, ids, mask)
    model.set_attn_implementation("consa_reference")
    ref = _logits(model, ids, mask)
    valid = mask.bool()
    assert (out - ref)[valid].abs().max() <= 1e-4
    # the allocation matters: all-FA gives different logits
    consa.apply_allocation(model, Allocation.uniform(True, "kv_head", alloc.shape, 5))
    assert (_logits(model, ids, mask) - out)[valid].abs().max() > 1e-3


@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_gate_zero_equals_all_swa_reference(family):
    model = tiny_model(family, num_heads=4, num_kv_heads=1)  # MQA
    ids, mask = _inputs()
    shape = consa.model_shape(model)
    mix = consa.attach_gates(model, window=3)
    mix.z = torch.zeros(shape.num_layers, shape.num_kv_heads)
    out = _logits(model, ids, mask)
    consa.apply_allocation(model, Allocation.uniform(False, "kv_head", shape, 3))
    model.set_attn_implementation("consa_reference")
    ref = _logits(model, ids, mask)
    assert (out - ref)[mask.bool()].abs().max() <= 1e-4


def test_layer_granularity_mixed_allocation_mha():
    model = tiny_model("mistral", num_heads=4, num_kv_heads=4, num_layers=4)  # MHA
    ids, mask = _inputs(t=31)
    alloc = Allocation.from_units([False, True, False, True], "layer", consa.model_shape(model), 7)
    consa.apply_allocation(model, alloc)
    out = _logits(model, ids, mask)
    model.set_attn_implementation("consa_reference")
    assert (out - _logits(model, ids, mask))[mask.bool()].abs().max() <= 1e-4


class _Module(torch.nn.Module):
    def __init__(self, plan):
        super().__init__()
        self.consa_plan = plan


@pytest.mark.parametrize("tq,hq,hk", [(17, 6, 2), (9, 4, 4), (1, 8, 2)])
def test_gate_mix_is_per_kv_head_convex_combination(tq, hq, hk):
    from consa.attention.plan import GateMix

    b, d, window = 2, 8, 4
    tk = tq if tq > 1 else 13
    q, k, v = torch.randn(b, hq, tq, d), torch.randn(b, hk, tk, d), torch.randn(b, hk, tk, d)
    mix = GateMix()
    mix.z = torch.rand(1, hk)
    module = _Module(LayerPlan(0, hk, window, 0, "gate", gate_mix=mix))
    out, _ = consa_attention(module, q, k, v, None, scaling=d ** -0.5)
    g = hq // hk
    full = reference_attention(q, k, v, per_head_allowed([True] * hq, tq, tk, window, 0, None, "cpu"), d ** -0.5)
    swa = reference_attention(q, k, v, per_head_allowed([False] * hq, tq, tk, window, 0, None, "cpu"), d ** -0.5)
    zq = mix.z[0].repeat_interleave(g).view(1, -1, 1, 1)
    expected = (zq * full + (1 - zq) * swa).transpose(1, 2)
    assert torch.allclose(out, expected, atol=1e-5)


def test_gate_mix_gradient_reaches_gates():
    model = tiny_model("qwen3")
    shape = consa.model_shape(model)
    mix = consa.attach_gates(model, window=3)
    z = torch.full((shape.num_layers, shape.num_kv_heads), 0.5, requires_grad=True)
    mix.z = z
    ids, _ = _inputs(batch=2, pad=(0, 0))
    model(input_ids=ids).logits.float().pow(2).mean().backward()
    assert z.grad is not None and z.grad.abs().min() > 0


def test_reorder_heads_keeps_logits_and_makes_fa_contiguous():
    for family in ("qwen3", "qwen2"):  # qwen2 has q/k/v biases, qwen3 has q/k norms
        model = tiny_model(family, num_heads=6, num_kv_heads=3, hidden_size=72)
        ids, mask = _inputs()
        alloc = Allocation.from_units([False, True, False, True, False, True, True, False, True], "kv_head", consa.model_shape(model), 4)
        consa.apply_allocation(model, alloc)
        before = _logits(model, ids, mask)
        new = consa.reorder_heads(model, alloc)
        for i in range(3):
            assert new.fa_heads(i) == list(range(len(new.fa_heads(i))))
        consa.apply_allocation(model, new)
        after = _logits(model, ids, mask)
        assert (after - before)[mask.bool()].abs().max() <= 1e-5
        assert new.num_swa == alloc.num_swa and new.meta["head_order"][0] == [1, 0, 2]


def test_unsupported_model_gets_one_clear_error():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=50))
    with pytest.raises(consa.UnsupportedModelError, match="q_proj"):
        consa.attach_gates(model, window=4)


def test_model_with_native_sliding_layers_is_refused():
    from consa.tiny import tiny_config
    from transformers import AutoModelForCausalLM

    cfg = tiny_config("mistral")
    cfg.sliding_window = 8
    model = AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(consa.UnsupportedModelError, match="sliding-window"):
        consa.attach_gates(model, window=4)
