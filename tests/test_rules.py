import pytest
import torch

import consa
from consa.allocation import ModelShape, swa_count
from consa.rules import RULES, rule_allocation
from consa.tiny import tiny_model
from consa.train.baselines import attention_mass_allocation, duo_allocation

SHAPE = ModelShape(8, 2, 4)


@pytest.mark.parametrize("granularity", ["layer", "kv_head"])
@pytest.mark.parametrize("t", [0.5, 0.75, 0.875])
def test_every_rule_gives_the_exact_count(granularity, t):
    n = SHAPE.num_units(granularity)
    k = swa_count(t, n)
    for rule in RULES:
        a = rule_allocation(rule, SHAPE, granularity, k, 16, seed=3)
        assert a.num_swa == k, rule


def test_rules_put_fa_where_they_say():
    top = rule_allocation("fa_top", SHAPE, "layer", 6, 16)
    assert top.fa_share_per_layer() == [0] * 6 + [1, 1]
    bottom = rule_allocation("fa_bottom", SHAPE, "layer", 6, 16)
    assert bottom.fa_share_per_layer() == [1, 1] + [0] * 6
    mid = rule_allocation("fa_middle", SHAPE, "layer", 6, 16)
    assert mid.fa_share_per_layer() == [0, 0, 0, 1, 1, 0, 0, 0]
    inter = rule_allocation("interleaved", SHAPE, "layer", 6, 16)
    assert inter.fa_share_per_layer() == [0, 0, 1, 0, 0, 0, 1, 0]
    assert inter.contiguity() == 0.5
    r0 = rule_allocation("random", SHAPE, "kv_head", 12, 16, seed=0)
    r1 = rule_allocation("random", SHAPE, "kv_head", 12, 16, seed=1)
    assert r0.fa != r1.fa and r0 == rule_allocation("random", SHAPE, "kv_head", 12, 16, seed=0)


def test_unknown_rule():
    with pytest.raises(consa.errors.ConsaError, match="unknown rule"):
        rule_allocation("best", SHAPE, "layer", 4, 16)


def _batches(step):
    g = torch.Generator().manual_seed(step)
    return {"input_ids": torch.randint(3, 101, (2, 40), generator=g)}


def test_duo_and_attention_mass_baselines_give_exact_counts():
    model = tiny_model("qwen3", num_layers=3)
    shape = consa.model_shape(model)
    duo = duo_allocation(model, "kv_head", 4, 5, _batches, steps=5)
    assert duo.num_swa == 4 and len(duo.meta["alpha"]) == 6
    mass = attention_mass_allocation(model, "kv_head", 4, 5, [_batches(0), _batches(1)])
    assert mass.num_swa == 4
    # the score is the share of attention mass beyond W: a share in [0, 1], not constant
    scores = mass.meta["scores"]
    assert all(0 <= s <= 1 for s in scores) and max(scores) > min(scores)
    layer = attention_mass_allocation(model, "layer", 2, 5, [_batches(0)])
    assert layer.num_swa == 2 and layer.shape == shape
    # the model is left as it was: plain attention
    assert model.config._attn_implementation == "sdpa"


def test_attention_mass_prefers_the_head_that_looks_far():
    """One KV head attends uniformly (much mass beyond W); the others attend to their own token (q = k)."""
    model = tiny_model("llama", num_layers=2, num_heads=2, num_kv_heads=2, head_dim=16, hidden_size=32)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.k_proj.weight.copy_(layer.self_attn.q_proj.weight)
            layer.self_attn.q_proj.weight.mul_(8.0)
        model.model.layers[1].self_attn.q_proj.weight[16:].zero_()  # layer 1, head 1: uniform
    a = attention_mass_allocation(model, "kv_head", 3, 4, [_batches(0)])
    assert a.fa[1][1] and a.num_swa == 3
