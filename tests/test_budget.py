"""KV budgets with per-unit spans (issue 16): costs, the exact assignment, the span-chain search, its
baselines and the command line."""

from __future__ import annotations

import itertools
import json
import random

import pytest
import torch

from consa import budget as B
from consa.allocation import Allocation, AllocationError, ModelShape
from consa.cli import main
from consa.errors import ConsaError
from consa.gates import SpanGates
from consa.models import apply_allocation, attach_gates, detach, model_shape
from consa.tiny import tiny_model
from consa.train.search import Search, units_to_heads
from consa.train.search_config import GateConfig, ScheduleConfig, SearchConfig, TargetConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def _batches(step):
    g = torch.Generator().manual_seed(step)
    return {"input_ids": torch.randint(3, 101, (4, 40), generator=g)}


# ---- menu, costs, problem ---------------------------------------------------------------------------
@pytest.mark.parametrize("text, menu", [("128,512,2048,full", (128, 512, 2048, None)), ("full, 64 ,16", (16, 64, None)),
                                        ("32,8", (8, 32)), ([16, None], (16, None))])
def test_menu_parses_ascending_with_full_last(text, menu):
    assert B.parse_menu(text) == menu


@pytest.mark.parametrize("text, match", [("128", "at least two"), ("full", "at least two"), ("0,full", ">= 1"),
                                         ("12x,full", "neither"), ("64,64,full", "repeats")])
def test_bad_menus_are_one_error(text, match):
    with pytest.raises(AllocationError, match=match):
        B.parse_menu(text)


def test_problem_costs_match_what_the_allocation_and_cache_count():
    shape = ModelShape(4, 2, 4)
    prob = B.problem(shape, "kv_head", (3, 6, None), 0.3, 40, sinks=2)
    assert prob.costs[0] == (4, 7, 40)  # min(C, w - 1 + S)
    assert prob.full == 4 * 2 * 40 and prob.budget == int(0.3 * 320)
    layer = B.problem(shape, "layer", (3, 6, None), 0.3, 40, sinks=2)
    assert layer.costs[0] == (8, 14, 80) and len(layer.costs) == 4
    # a fixed (native) layer's KV comes off the budget, and its units are not choices
    native = B.problem(shape, "kv_head", (3, 6, None), 0.3, 40, native=[None, 10, None, None])
    assert native.fixed == 2 * 9 and native.budget == int(0.3 * 320) - 18 and len(native.costs) == 6
    # the cost model is Allocation.kv_slots's: the assignment of every unit to option k holds exactly that
    for k, span in enumerate((3, 6)):
        a = Allocation.from_spans([span] * 8, "kv_head", shape, sinks=2)
        assert a.kv_slots(40) == sum(row[k] for row in prob.costs)


@pytest.mark.parametrize("budget, match", [(0.02, "below what the smallest"), (0.99, "nothing to choose"),
                                           (1.5, "strictly between")])
def test_impossible_budgets_are_one_error(budget, match):
    with pytest.raises(AllocationError, match=match):
        B.problem(ModelShape(4, 2, 4), "kv_head", (3, 6, 20), budget, 40)


def test_single_window_budget_gives_the_fewest_swa_units_that_fit():
    shape = ModelShape(4, 2, 4)
    for kb in (0.2, 0.3, 0.5, 0.7):
        prob = B.problem(shape, "kv_head", (5, None), kb, 40)
        k = B.swa_units_for_budget(prob)
        a = Allocation.from_units([False] * k + [True] * (8 - k), "kv_head", shape, 5)
        assert a.kv_share(40) <= kb
        if k > 0:  # one SWA unit fewer would not fit
            b = Allocation.from_units([False] * (k - 1) + [True] * (9 - k), "kv_head", shape, 5)
            assert b.kv_share(40) > kb


# ---- the exact assignment ---------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(12))
def test_assignment_is_the_brute_force_optimum(seed):
    rng = random.Random(seed)
    units, options = rng.randint(1, 5), rng.randint(2, 4)
    values = [[rng.uniform(-2, 2) for _ in range(options)] for _ in range(units)]
    costs = [sorted(rng.randint(0, 9) for _ in range(options)) for _ in range(units)]
    lo, hi = sum(min(c) for c in costs), sum(max(c) for c in costs)
    budget = rng.randint(lo, hi)
    picks = B.assign(values, costs, budget)
    assert sum(costs[u][k] for u, k in enumerate(picks)) <= budget
    best = max(sum(values[u][k] for u, k in enumerate(c)) for c in itertools.product(range(options), repeat=units)
               if sum(costs[u][k] for u, k in enumerate(c)) <= budget)
    assert sum(values[u][k] for u, k in enumerate(picks)) == pytest.approx(best, abs=1e-9)


def test_assignment_with_coarse_costs_still_keeps_the_budget():
    """Costs far beyond the table's resolution are rounded up: the budget holds, little is left unused."""
    rng = random.Random(0)
    costs = [[127, 511, 2047, 131072] for _ in range(224)]
    values = [[0.0] + sorted(rng.uniform(0, 1) for _ in range(3)) for _ in range(224)]
    values = [[sum(v[: k + 1]) for k in range(4)] for v in values]  # increasing: every step up is worth something
    budget = int(0.25 * 224 * 131072)
    picks = B.assign(values, costs, budget)
    held = sum(costs[u][k] for u, k in enumerate(picks))
    assert budget - 131072 < held <= budget


def test_assignment_refuses_what_cannot_fit():
    with pytest.raises(AllocationError, match="no assignment fits"):
        B.assign([[0, 1]], [[5, 9]], 4)


# ---- span gates --------------------------------------------------------------------------------------
def test_chain_weights_are_a_convex_mix_and_reduce_to_the_single_gate():
    z = torch.rand(5, 3)
    w = SpanGates.weights(z)
    assert torch.allclose(w.sum(1), torch.ones(5)) and (w >= 0).all()
    assert torch.equal(SpanGates.weights(torch.tensor([[0.0, 1.0, 1.0]])), torch.tensor([[1.0, 0, 0, 0]]))
    assert torch.equal(SpanGates.weights(torch.tensor([[1.0, 1.0, 0.0]])), torch.tensor([[0, 0, 1.0, 0]]))
    z1 = torch.rand(4, 1)
    assert torch.allclose(SpanGates.weights(z1), torch.cat([1 - z1, z1], 1))


def test_expected_saving_matches_sampled_costs_and_the_shift_solver_hits_it():
    from consa.constraint import solve_shift

    torch.manual_seed(0)
    costs = torch.tensor([[0.02, 0.05, 0.2]] * 3 + [[0.01, 0.03, 0.1]] * 2)
    g = SpanGates(costs)
    with torch.no_grad():
        g.log_alpha.normal_(0, 2)
    gen = torch.Generator().manual_seed(1)
    n = 20000
    hits = torch.zeros_like(costs)
    for _ in range(n // 1000):
        for _ in range(1000):
            w = SpanGates.weights((g.sample(gen) > 0).float())  # the option each unit's binary chain lands on
            hits += w
    mc = 1 - float((hits / n * costs).sum())
    assert abs(mc - float(g.expected_sparsity().detach())) < 0.01
    d = solve_shift(g, 0.8)
    assert float(g.expected_sparsity(d).detach()) == pytest.approx(0.8, abs=1e-6)


# ---- attention with a span menu ---------------------------------------------------------------------
@pytest.mark.parametrize("kv, sinks", [(2, 0), (1, 2)])
def test_one_hot_menu_weights_equal_the_fixed_allocation(kv, sinks):
    """Gate mode over a menu with binary weights is exactly the hybrid those spans serve (GQA, sinks)."""
    torch.manual_seed(0)
    model = tiny_model("qwen3", num_layers=3, num_kv_heads=kv).double().eval()
    shape = model_shape(model)
    menu = (3, 7, None)
    ids = torch.randint(3, 101, (2, 29))
    rng = random.Random(kv)
    picks = [rng.randrange(3) for _ in range(shape.num_layers * kv)]
    picks[0] = 0  # at least one SWA unit
    w = torch.zeros(len(picks), 3, dtype=torch.float64)
    w[range(len(picks)), picks] = 1.0
    mix = attach_gates(model, 7, sinks, menu=menu)
    mix.z = units_to_heads(w, "kv_head", shape, list(range(shape.num_layers)))
    with torch.no_grad():
        gated = model(input_ids=ids).logits
    detach(model)
    apply_allocation(model, Allocation.from_spans([menu[k] for k in picks], "kv_head", shape, sinks=sinks))
    with torch.no_grad():
        fixed = model(input_ids=ids).logits
    detach(model)
    assert torch.allclose(gated, fixed, atol=1e-10)
    # a teacher pass (z = None) is full attention
    mix = attach_gates(model, 7, sinks, menu=menu)
    mix.z = None
    with torch.no_grad():
        teacher = model(input_ids=ids).logits
    detach(model)
    with torch.no_grad():
        assert torch.allclose(teacher, model(input_ids=ids).logits, atol=1e-10)


# ---- the search -------------------------------------------------------------------------------------
@pytest.mark.parametrize("granularity, kv_budget", [("kv_head", 0.3), ("kv_head", 0.15), ("layer", 0.4)])
def test_span_search_settles_on_the_budget_and_the_assignment_keeps_it(tmp_path, granularity, kv_budget):
    model = tiny_model("qwen3", num_layers=4, num_kv_heads=2)
    cfg = SearchConfig(TargetConfig(granularity=granularity, kv_budget=kv_budget, spans="3,6,12,full"), seq_len=40,
                       schedule=ScheduleConfig(steps=50), gates=GateConfig(lr=0.1), checkpoint_every=0)
    s = Search(model, cfg, _batches, tmp_path, progress=False)
    alloc = s.run()
    target = s.controller.cfg.target
    assert target == pytest.approx(1 - s.budget.budget / (8 * 40))
    tail = s.history[int(0.8 * len(s.history)):]
    assert max(abs(r["expected_sparsity"] - target) for r in tail) <= 0.01
    assert max(r["expected_sparsity"] for r in s.history) <= target + 0.01
    # the exact assignment holds the budget and leaves less than one step of the menu unused
    held = alloc.kv_slots(40)
    assert held <= s.budget.budget and held == alloc.meta["budget"]["slots"]
    steps_up = [b - a for row in s.budget.costs for a, b in zip(row, row[1:])]
    assert s.budget.budget - held < max(steps_up)
    assert set(alloc.spans()) <= {3, 6, 12}
    summary = json.loads((tmp_path / "search.json").read_text())
    assert summary["kv_share"] == pytest.approx(alloc.kv_share(40))
    assert 0.0 <= summary["cut_agreement"] <= 1.0
    # the file round-trips and serves
    again = Allocation.load(tmp_path / "allocation.json")
    assert again.span == alloc.span
    apply_allocation(model, again)
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=_batches(0)["input_ids"]).logits).all()


def test_single_window_budget_search_cuts_the_count_the_budget_allows(tmp_path):
    model = tiny_model("qwen3", num_layers=4, num_kv_heads=2)
    cfg = SearchConfig(TargetConfig(window=5, kv_budget=0.3), seq_len=40, schedule=ScheduleConfig(steps=6), checkpoint_every=0)
    s = Search(model, cfg, _batches, tmp_path, progress=False)
    alloc = s.run()
    k = B.swa_units_for_budget(B.problem(s.shape, "kv_head", (5, None), 0.3, 40))
    assert alloc.num_swa == k and alloc.kv_share(40) <= 0.3 and alloc.spans() == [5]


def test_span_search_resumes_bit_exactly(tmp_path):
    def run(out, steps_first=None):
        model = tiny_model("qwen3", num_layers=4, num_kv_heads=2)
        cfg = SearchConfig(TargetConfig(kv_budget=0.3, spans="3,6,full"), seq_len=40, schedule=ScheduleConfig(steps=12),
                           checkpoint_every=4)
        s = Search(model, cfg, _batches, out, progress=False)
        if steps_first:
            for _ in range(steps_first):
                s.train_step()
            from consa.train.checkpoint import save_checkpoint

            save_checkpoint(out / "checkpoint", s)
            model = tiny_model("qwen3", num_layers=4, num_kv_heads=2)
            s = Search(model, cfg, _batches, out, progress=False)
            return s.run(resume=True), s
        return s.run(), s

    a, s1 = run(tmp_path / "a")
    b, s2 = run(tmp_path / "b", steps_first=4)
    assert torch.equal(s1.gates.log_alpha, s2.gates.log_alpha) and a.span == b.span


@pytest.mark.parametrize("kw, match", [
    (dict(sparsity=0.5, kv_budget=0.3), "exactly one"),
    (dict(sparsity=None), "exactly one"),
    (dict(sparsity=0.5, spans="3,6,full"), "needs a KV budget"),
    (dict(sparsity=None, kv_budget=0.3, spans="3,60,full"), "not shorter than"),
    (dict(sparsity=None, kv_budget=0.3, spans="3,6,full", refine_evals=4), "single window only"),
    (dict(sparsity=None, kv_budget=0.3, spans="3,6,full", window=5), "not in the span menu"),
    (dict(sparsity=None, kv_budget=1.2), "strictly between"),
])
def test_bad_budget_settings_are_one_error(kw, match):
    cfg = dict(sparsity=None, window=None if "spans" in kw else 5, seq_len=40, steps=5)
    cfg.update(kw)
    with pytest.raises(ConsaError, match=match):
        SearchConfig.from_flat(cfg)


def test_a_budget_that_leaves_no_fa_unit_at_the_window_is_one_error(tmp_path):
    model = tiny_model("qwen3", num_layers=4, num_kv_heads=2)
    cfg = SearchConfig(TargetConfig(window=12, kv_budget=0.29), seq_len=40, schedule=ScheduleConfig(steps=3), checkpoint_every=0)
    with pytest.raises(ConsaError, match="no unit on full attention"):
        Search(model, cfg, _batches, tmp_path, progress=False)


# ---- baselines ----------------------------------------------------------------------------------------
def test_profile_is_the_first_order_loss_change_of_each_span():
    """−∂L/∂z at z = 1 equals the finite-difference slope of the LM loss towards each option (fp64)."""
    from consa.train.search import forward_logits
    from consa.train.span_baselines import profile_estimates

    torch.manual_seed(0)
    model = tiny_model("qwen3", num_layers=2, num_kv_heads=2).double()
    shape = model_shape(model)
    menu = (3, 7, None)
    batch = {"input_ids": torch.randint(3, 101, (1, 31))}
    est = profile_estimates(model, "kv_head", menu, lambda i: batch, batches=1)
    assert est.shape == (4, 3) and (est[:, -1] == 0).all()

    def loss(w):
        mix = attach_gates(model, 7, 0, menu=menu)
        mix.z = units_to_heads(w, "kv_head", shape, [0, 1])
        with torch.no_grad():  # the LM loss in fp64 (lm_sum rounds logits to fp32: too coarse for a slope)
            logits = forward_logits(model, batch)[0, :-1]
            value = torch.nn.functional.cross_entropy(logits, batch["input_ids"][0, 1:])
        detach(model)
        return float(value)

    full = torch.zeros(4, 3, dtype=torch.float64)
    full[:, 2] = 1.0
    eps = 1e-3  # parts of the forward round to fp32: a smaller step drowns the slope in rounding
    for u in (0, 3):
        for k in (0, 1):
            w = full.clone()
            w[u, 2], w[u, k] = 1 - eps, eps  # a step from full attention towards option k
            slope = (loss(w) - loss(full)) / eps
            assert est[u, k].item() == pytest.approx(abs(slope), rel=3e-3, abs=1e-6)


def test_profile_and_uniform_allocations_keep_the_budget():
    from consa.train.span_baselines import profile_allocation, uniform_span_allocation

    model = tiny_model("qwen3", num_layers=4, num_kv_heads=2)
    shape = model_shape(model)
    prob = B.problem(shape, "kv_head", B.parse_menu("3,6,12,full"), 0.3, 40)
    a = profile_allocation(model, "kv_head", prob, _batches, batches=1)
    assert a.kv_slots(40) <= prob.budget and a.meta["method"] == "moa_profile" and len(a.meta["estimates"]) == 8
    u = uniform_span_allocation(prob, "kv_head", shape)
    assert len(u.spans()) == 1 and u.kv_slots(40) <= prob.budget < u.kv_slots(40) + 8  # one span wider would not fit
    assert u.num_swa == 8


# ---- command line -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny") / "model"
    tiny_model("qwen3", num_layers=4).save_pretrained(d)
    return d


def test_cli_span_search_writes_an_allocation_within_the_budget(model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["search", "--model", str(model_dir), "--kv-budget", "0.3", "--spans", "4,8,16,full", "--seq-len", "48",
               "--batch-size", "2", "--steps", "4", "--no-progress", "--out", str(out)])
    assert rc == 0
    a = Allocation.load(out / "allocation.json")
    assert a.kv_share(48) <= 0.3 and "KV at 48 tokens" in capsys.readouterr().out


@pytest.mark.parametrize("extra, match", [
    (["--kv-budget", "0.3", "--sparsity", "0.5", "--window", "8"], "exactly one"),
    (["--spans", "4,8,full", "--sparsity", "0.5"], "needs a KV budget"),
    (["--kv-budget", "0.3", "--spans", "4,80,full"], "not shorter than"),
    (["--kv-budget", "0.01", "--spans", "4,8,full"], "below what the smallest"),
    (["--kv-budget", "0.3", "--spans", "4,4,full"], "repeats"),
    (["--sparsity", "0.5"], "window is required"),
])
def test_cli_bad_budget_input_is_one_line_and_writes_nothing(model_dir, tmp_path, extra, match, capsys):
    out = tmp_path / "run"
    rc = main(["search", "--model", str(model_dir), "--seq-len", "48", "--steps", "2", "--no-progress", "--out", str(out), *extra])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and match in err and len(err.splitlines()) == 1 and not out.exists()


@pytest.mark.parametrize("kv, sinks", [(2, 0), (2, 3), (1, 1)])
def test_measured_kv_bytes_equal_the_cost_model(kv, sinks):
    """What the budget stage reports is read from the cache after a prefill, and equals kv_slots."""
    from consa.eval.kv_cost import measure

    model = tiny_model("qwen3", num_layers=4, num_kv_heads=kv)
    shape = model_shape(model)
    spans = [3, None, 6, 12, 12, 3, None, 6][: shape.num_layers * kv]
    alloc = Allocation.from_spans(spans, "kv_head", shape, sinks=sinks)
    head_dim = model.config.head_dim
    full = measure(model, None, 37, decode_tokens=2, warmup=0)
    got = measure(model, alloc, 37, decode_tokens=2)
    per_slot = 2 * head_dim * 4  # keys and values, fp32
    assert full["kv_bytes"] == 37 * shape.num_layers * kv * per_slot
    assert got["kv_bytes"] == alloc.kv_slots(37) * per_slot
    assert got["kv_bytes"] / full["kv_bytes"] == pytest.approx(alloc.kv_share(37))
    assert got["prefill_s"] > 0 and got["decode_s_per_token"] > 0 and got["warmup"] == 1


def test_serving_benchmark_budget_allocations_and_bytes_read():
    """benchmarks/serving.py's ``budget:B:MENU`` allocations keep the budget, and its bytes-read model (per
    head: FA every slot, SWA its W + S ring) is what the static cache allocates for them."""
    from benchmark_module import load

    from consa.serving.engine import static_cache

    bench = load("serving")
    model = tiny_model("qwen3", num_layers=4, num_kv_heads=2).to(torch.bfloat16)
    for menu in ("3/6/12/full", "5/full"):
        alloc = bench.allocation(model, f"budget:0.3:{menu}", 40)
        assert alloc.kv_share(40) <= 0.3
        apply_allocation(model, alloc)
        cache = static_cache(model, 40, batch=1)
        assert cache.stored_bytes() == bench.kv_per_seq(model, alloc, 40)
        detach(model)
    assert len(bench.allocation(model, "budget:0.3:3/6/12/full", 40).spans()) > 1


def test_rules_under_a_kv_budget_keep_it_with_the_count_the_search_uses(model_dir, tmp_path, capsys):
    out = tmp_path / "rules"
    assert main(["rules", "--model", str(model_dir), "--kv-budget", "0.3", "--budget-context", "48", "--window", "8",
                 "--rule", "fa_top", "--rule", "interleaved", "--out", str(out)]) == 0
    k = B.swa_units_for_budget(B.problem(ModelShape(4, 2, 4), "kv_head", (8, None), 0.3, 48))
    for f in out.glob("*.json"):
        a = Allocation.load(f)
        assert a.num_swa == k and a.kv_share(48) <= 0.3
    capsys.readouterr()
    assert main(["rules", "--model", str(model_dir), "--kv-budget", "0.3", "--window", "8", "--out", str(tmp_path / "x")]) == 2
    assert "needs --budget-context" in capsys.readouterr().err and not (tmp_path / "x").exists()
