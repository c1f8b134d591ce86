"""The gate options of the search (GateConfig, train/schedules.py): each does what it says, all off is the
plain search, bad values are one line, and the convergence benchmark's smoke run covers every variant."""

import json
import math

import pytest
import torch
from benchmark_module import load

from consa.cli import main
from consa.errors import ConsaError
from consa.gates import BETA, HardConcreteGates
from consa.tiny import tiny_model
from consa.train import schedules
from consa.train.search import Search
from consa.train.search_config import LossConfig, SearchConfig

pytestmark = pytest.mark.usefixtures("one_thread")

OLD_KEYS = {"step", "loss", "expected_sparsity", "hard_sparsity", "target", "lambda1", "shift", "cut_flips"}


def _batches(step):
    g = torch.Generator().manual_seed(step)
    return {"input_ids": torch.randint(3, 101, (2, 40), generator=g)}


def _search(tmp_path, **kw):
    kw = {"sparsity": 0.75, "window": 5, "seq_len": 40, "steps": 10, "checkpoint_every": 0, "gate_lr": 0.1, **kw}
    return Search(tiny_model("qwen3", num_layers=4, num_kv_heads=2), SearchConfig.from_flat(kw), _batches, tmp_path, progress=False)


def _p_formula(log_alpha, beta):
    return torch.sigmoid(log_alpha - beta * math.log(0.1 / 1.1))


def test_beta_anneals_geometrically_and_every_probability_uses_the_current_beta(tmp_path):
    s = _search(tmp_path, beta_final=0.1)
    s.run()
    betas = [r["beta"] for r in s.history]
    assert betas[0] == pytest.approx(BETA) and betas[-1] == pytest.approx(0.1)
    assert all(a > b for a, b in zip(betas, betas[1:]))
    ratios = [b / a for a, b in zip(betas, betas[1:])]
    assert max(ratios) - min(ratios) < 1e-9  # geometric: the same factor every step
    assert s.gates.beta == pytest.approx(0.1)
    la = s.gates.log_alpha.detach()
    assert torch.allclose(s.gates.prob_nonzero(), _p_formula(la, 0.1))
    assert not torch.allclose(s.gates.prob_nonzero(), _p_formula(la, BETA), atol=1e-3)


def test_a_lower_beta_gives_samples_nearer_zero_or_one():
    g = HardConcreteGates(4000, init_log_alpha=0.0)
    soft = lambda z: float(((z > 0) & (z < 1)).float().mean())  # noqa: E731
    warm = soft(g.sample(torch.Generator().manual_seed(0)))
    g.beta = 0.05
    cold = soft(g.sample(torch.Generator().manual_seed(0)))
    assert cold < 0.2 * warm


def test_gate_lr_follows_the_cosine_schedule_in_the_optimiser(tmp_path):
    s = _search(tmp_path, gate_lr=0.1, gate_lr_final=0.01)
    seen, step = [], s.opt.step

    def spy(*a, **k):
        seen.append(s.opt.param_groups[0]["lr"])
        return step(*a, **k)

    s.opt.step = spy
    s.run()
    want = [0.01 + 0.09 * 0.5 * (1 + math.cos(math.pi * k / 9)) for k in range(10)]
    assert seen == pytest.approx(want)
    assert seen[0] == pytest.approx(0.1) and seen[-1] == pytest.approx(0.01)


def _order(x):
    x = torch.as_tensor(x, dtype=torch.float64).tolist()
    return sorted(range(len(x)), key=lambda i: (x[i], i))


def test_attention_mass_init_orders_log_alpha_like_the_scores_and_starts_near_full_attention(tmp_path):
    from consa.train.baselines import attention_mass_allocation

    s = _search(tmp_path, init="attention_mass", init_steps=2, init_log_alpha=3.0)  # centred where P(z≠0) ≥ 0.9
    la = s.gates.log_alpha.detach()
    ref = attention_mass_allocation(tiny_model("qwen3", num_layers=4, num_kv_heads=2), "kv_head", s.num_swa, 5,
                                    [_batches(2_000_000_011 + i) for i in range(2)])
    scores = ref.meta["scores"]
    assert len(set(scores)) > 1 and _order(la) == _order(scores)
    assert float(la.max() - la.min()) == pytest.approx(2.0)  # init_log_alpha ± init_spread / 2
    assert float(s.gates.prob_nonzero().detach().min()) >= 0.9
    assert s.init_tokens == 2 * 80


def test_duo_warm_start_seeds_the_order_of_a_duo_run(tmp_path):
    from consa.train.baselines import duo_allocation

    s = _search(tmp_path, init="duo", init_steps=3, init_log_alpha=3.0)
    ref = duo_allocation(tiny_model("qwen3", num_layers=4, num_kv_heads=2), "kv_head", s.num_swa, 5, _batches, steps=3)
    assert _order(s.gates.log_alpha.detach()) == _order(ref.meta["alpha"])
    assert float(s.gates.prob_nonzero().detach().min()) >= 0.9 and s.init_tokens == 3 * 80


def test_decide_penalty_is_zero_when_decided_and_pushes_undecided_gates_apart():
    assert float(schedules.decide_penalty(torch.tensor([0.0, 1.0, 1.0]))) == 0.0
    g = HardConcreteGates(2)
    with torch.no_grad():
        g.log_alpha.copy_(torch.tensor([-2.0, -1.0]))  # P ≈ 0.40 and 0.65: both undecided
    p = g.prob_nonzero()
    assert p[0] < 0.5 < p[1]
    pen = schedules.decide_penalty(p)
    assert float(pen.detach()) > 0
    pen.backward()
    grad = g.log_alpha.grad
    assert grad[0] > 0 and grad[1] < 0  # descent lowers the gate below 0.5 and raises the one above


def test_decide_penalty_applies_only_in_the_last_share_of_the_steps(tmp_path):
    s = _search(tmp_path, decide_weight=1.0, decide_frac=0.3)
    s.run()
    on = [r["step"] for r in s.history if "decide" in r]
    assert on == [7, 8, 9]
    # it changes the search (a loss term that did nothing would leave log α as the default run's)
    d = _search(tmp_path / "d")
    d.run()
    assert not torch.equal(s.gates.log_alpha, d.gates.log_alpha)


def test_all_options_off_is_the_plain_search_bit_for_bit(tmp_path):
    """β annealing is on by default; with it off, the other options' off values change nothing."""
    a = _search(tmp_path / "a", beta_final=None)
    a.run()
    b = _search(tmp_path / "b", beta_final=None, gate_lr_final=None, init="constant", init_steps=0, init_spread=2.0,
                decide_weight=0.0, decide_frac=0.25)
    b.run()
    assert torch.equal(a.gates.log_alpha, b.gates.log_alpha)
    assert a.history == b.history and a.allocation().to_dict() == b.allocation().to_dict()
    # and nothing leaked into the default path: no new log keys, β and lr untouched, no init pass
    assert set(a.history[-1]) == OLD_KEYS
    assert a.gates.beta == BETA and a.opt.param_groups[0]["lr"] == 0.1 and a.init_scores is None
    assert "init_tokens" not in json.loads((tmp_path / "a" / "search.json").read_text())


def test_schedules_hold_their_final_value_past_the_planned_steps():
    assert schedules.beta_at(50, 10, 0.2) == pytest.approx(0.2)
    assert schedules.cosine_lr(50, 10, 0.1, 0.0) == pytest.approx(0.0)
    assert schedules.decide_active(50, 10, 0.1) and not schedules.decide_active(8, 10, 0.1)
    assert schedules.rank_init([5.0, 1.0, 3.0], 3.0, 2.0).tolist() == [4.0, 2.0, 3.0]
    assert schedules.rank_init([1.0, 1.0, 0.0, 1.0], 3.0, 3.0).tolist() == [3.5, 3.5, 1.5, 3.5]  # ties share their mean rank


@pytest.mark.parametrize("flag,value,fragment", [
    ("--beta-final", "0", "--beta-final"),
    ("--beta-final", "bogus", "a number > 0 or 'off'"),
    ("--beta-final", "50", "beta_final"),
    ("--gate-lr-final", "-1", "--gate-lr-final"),
    ("--init", "bogus", "--init"),
    ("--init-steps", "-2", "--init-steps"),
    ("--decide-weight", "-1", "--decide-weight"),
    ("--decide-frac", "0", "decide_frac"),
    ("--refine-order", "nearest", "--refine-order"),
])
def test_cli_bad_option_values_are_one_line_exit_2(tmp_path, capsys, flag, value, fragment):
    capsys.readouterr()
    rc = main(["search", "--model", str(tmp_path / "m"), "--sparsity", "0.75", "--window", "5", "--seq-len", "32",
               "--out", str(tmp_path / "out"), flag, value])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("consa: error:") and fragment in lines[0], err
    assert not (tmp_path / "out").exists()


def test_experiment_search_stage_passes_and_checks_the_options():
    from consa.experiment import ExperimentConfig

    cfg = ExperimentConfig.from_dict({"search": {"beta_final": 0.2, "init": "duo", "decide_weight": 0.5}})
    cfg.validate()
    assert (cfg.search.beta_final, cfg.search.init, cfg.search.decide_weight) == (0.2, "duo", 0.5)
    with pytest.raises(ConsaError, match="init must be one of"):
        ExperimentConfig.from_dict({"search": {"init": "bogus"}}).validate()
    with pytest.raises(ConsaError, match="refine_order"):
        ExperimentConfig.from_dict({"search": {"refine_order": "nearest"}}).validate()


def _bench():
    return load("search_convergence")


def test_benchmark_smoke_run_writes_every_variant(tmp_path, capsys):
    bench = _bench()
    out = tmp_path / "conv.json"
    assert bench.main(["--smoke", "--steps", "3,6", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    methods = {(r["method"], r["steps"]) for r in res["runs"]}
    want = {(f"consa:{v}", n) for v in bench.VARIANTS for n in (3, 6)} | {("duo", 3), ("duo", 6), ("attention_mass", 0)}
    assert methods == want and not res["skipped"]
    for r in res["runs"]:
        assert r["held_out_kl"] >= 0 and r["seconds"] > 0 and r["tokens"] > 0
        if r["method"] != "attention_mass":
            assert 0 <= r["cut_agreement"] <= 1 and sum(not f for f in r["fa"]) == res["setup"]["num_swa"]
        if r["method"].startswith("consa:"):  # every FA unit of the plain top-k cut is either clear or near it
            m = r["cut_margin"]
            assert m["fa_clear"] + m["fa_near_cut"] == len(r["fa"]) - res["setup"]["num_swa"]
    for r in res["runs"]:
        if r["method"] in ("consa:refine", "consa:anneal_refine", "consa:refine_measured", "consa:refine_gradient",
                           "consa:refine_default"):  # the cut before the swaps, scored alike
            ref = r["refine"]
            changed = sum(x != y for x, y in zip(r["fa_unrefined"], r["fa"]))  # a unit may move twice in a chain of swaps
            assert r["units_changed_by_refine"] == changed <= 2 * len(ref["swaps"]) and changed % 2 == 0
            assert ref["evals"] <= {"consa:refine_measured": 64, "consa:refine_gradient": 64, "consa:refine_default": 96}.get(r["method"], 16)
            assert sum(not f for f in r["fa_unrefined"]) == res["setup"]["num_swa"]
            assert (r["fa_unrefined"] == r["fa"]) == (not ref["swaps"])
            assert ref["kl_after"] <= ref["kl_before"] and r["held_out_kl_unrefined"] >= 0
        else:
            assert "refine" not in r
    table = capsys.readouterr().out
    assert "consa:all" in table and "duo" in table and table.rstrip().endswith(f"wrote {out}")
    # a budget already spent skips every run and still writes the file
    assert bench.main(["--smoke", "--steps", "3", "--variants", "default", "--budget-s", "1e-9", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["runs"] == [] and {r["method"] for r in res["skipped"]} == {"default", "duo"}


def test_benchmark_searches_short_and_scores_at_the_full_length(tmp_path):
    """--search-lengths: a search at T/2 uses the same tokens per step, its cut is scored
    at T like the full-length one, and its FA overlap with the full-length cut is reported."""
    bench = _bench()
    out = tmp_path / "len.json"
    assert bench.main(["--smoke", "--steps", "8", "--variants", "default", "--no-baselines", "--search-lengths", "20",
                       "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["setup"]["search_lengths"] == [20, 40]
    by_len = {r["search_len"]: r for r in res["runs"]}
    assert set(by_len) == {20, 40} and by_len[20]["tokens"] == by_len[40]["tokens"]
    assert by_len[40]["fa_overlap_with_full_length"] == 1.0
    assert 0.0 <= by_len[20]["fa_overlap_with_full_length"] <= 1.0
    # the short search really ran at 20 tokens: its run dir says so, and its config too
    cfg = json.loads((tmp_path / "len-runs" / "default-s8-seed0-T20" / "search.json").read_text())["config"]
    assert cfg["seq_len"] == 20
    with pytest.raises(SystemExit, match="exceed the window"):
        bench.main(["--smoke", "--steps", "2", "--search-lengths", "4", "--out", str(out)])


def test_convergence_table_pools_seeds_once_each_and_compares_cuts(tmp_path, capsys):
    bench, tab = _bench(), load("convergence_table")
    out = tmp_path / "c.json"
    assert bench.main(["--smoke", "--steps", "4", "--seeds", "0,1", "--variants", "default,v0", "--out", str(out)]) == 0
    runs = tab.load_runs([out, out])  # the same runs twice count once
    assert len(runs) == len(json.loads(out.read_text())["runs"]) == 2 * 4
    capsys.readouterr()
    assert tab.main([str(out)]) == 0
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ") for line in capsys.readouterr().out.splitlines()[2:]}
    assert set(rows) == {"consa:default", "consa:v0", "duo", "attention_mass"}
    kls = [r["held_out_kl"] for r in runs if r["method"] == "consa:v0"]
    mean, sd = rows["consa:v0"][4].split(" ± ")
    assert float(mean) == pytest.approx(sum(kls) / 2, abs=1e-4) and float(sd) == pytest.approx(abs(kls[0] - kls[1]) / 2 ** 0.5, abs=1e-4)
    fa = {r["seed"]: {i for i, f in enumerate(r["fa"]) if f} for r in runs if r["method"] == "consa:default"}
    duo = {r["seed"]: {i for i, f in enumerate(r["fa"]) if f} for r in runs if r["method"] == "duo"}
    shared = [len(fa[s] & duo[s]) / len(fa[s]) for s in (0, 1)]
    assert rows["consa:default"][8].startswith(f"{sum(shared) / 2:.2f}")
    moved = [r["cut_last_changed_step"] for r in sorted(runs, key=lambda r: r["seed"]) if r["method"] == "consa:default"]
    assert rows["consa:default"][6] == ", ".join(map(str, moved)) and all(0 <= m < 4 for m in moved)
    margins = [r["cut_margin"] for r in sorted(runs, key=lambda r: r["seed"]) if r["method"] == "consa:default"]
    assert rows["consa:default"][11].rstrip(" |") == ", ".join(f"{m['fa_clear']}/{m['fa_near_cut']}/{m['swa_near_cut']}" for m in margins)
    assert rows["duo"][11].rstrip(" |") == "–"
    assert tab.main([str(tmp_path / "missing.json")]) == 2


def test_answer_weight_adds_the_kl_over_positions_predicting_answers():
    """answer_weight w: loss = mean KL over all positions + w × mean KL over the positions whose next token
    is an answer token (computed here by hand), and the value reported is the same sum."""
    from types import SimpleNamespace

    from consa.train.distributed import Dist
    from consa.train.losses import _kl_positions, global_task_loss

    g = torch.Generator().manual_seed(0)
    logits, teacher = torch.randn(2, 9, 13, generator=g), torch.randn(2, 9, 13, generator=g)
    answers = torch.zeros(2, 9, dtype=torch.bool)
    answers[1, 6:8] = True  # tokens 6 and 7 answer: positions 5 and 6 predict them
    cfg = SimpleNamespace(kl_weight=1.0, lm_weight=0.0, temperature=1.0, answer_weight=3.0)
    loss, task = global_task_loss(logits, teacher, {"input_ids": torch.zeros(2, 9, dtype=torch.long), "answer_mask": answers},
                                  None, cfg, Dist(device=torch.device("cpu")))
    kl = _kl_positions(logits, teacher, 1.0)
    want = kl.mean() + 3.0 * kl[1, 5:7].mean()
    assert float(loss) == pytest.approx(float(want), rel=1e-6) and task == pytest.approx(float(want), rel=1e-6)
    cfg.answer_weight = 0.0
    loss0, _ = global_task_loss(logits, teacher, {"input_ids": torch.zeros(2, 9, dtype=torch.long), "answer_mask": answers},
                                None, cfg, Dist(device=torch.device("cpu")))
    assert float(loss0) == pytest.approx(float(kl.mean()), rel=1e-6)
    with pytest.raises(ConsaError, match="answer_weight"):
        LossConfig(answer_weight=-1.0)


def test_cut_margins_table_reads_the_gates_files_of_a_workdir(tmp_path, capsys):
    """benchmarks/cut_margins.py: per search, the units clear of / inside the band around the top-k cut, the
    share of samples in the clamp's ramp at the band's median log α, and Duo-style's α at 1 and 0."""
    from safetensors.torch import save_file

    from consa.gates import prob_in_ramp

    cm = load("cut_margins")
    run = tmp_path / "search" / "s0.5-kv_head-seed1"
    run.mkdir(parents=True)
    # 6 units, 3 SWA: one clear FA unit (4.0), two FA (-2.3, -2.4) and three SWA (-2.6, -2.7, -4.0) around -2.5
    save_file({"log_alpha": torch.tensor([-2.6, 4.0, -2.3, -4.0, -2.4, -2.7])}, str(run / "gates.safetensors"))
    (run / "search.json").write_text(json.dumps({"num_swa": 3, "num_units": 6, "config": {
        "sparsity": 0.5, "granularity": "kv_head", "seed": 1000, "beta_final": 0.2}}))
    duo = tmp_path / "alloc" / "s0.5"
    duo.mkdir(parents=True)
    (duo / "duo-kv_head-seed1.json").write_text(json.dumps({"meta": {"alpha": [[1.0, 0.0, 0.5], [1.0, 1.0, 0.0]]}}))
    (row,) = cm.margins(tmp_path)
    assert (row["fa_clear"], row["fa_near_cut"], row["swa_near_cut"]) == (1, 2, 2)
    assert row["ramp_share_at_band_median"] == pytest.approx(prob_in_ramp(-2.5, 0.2), rel=1e-5)  # median of the 4 in the band
    assert (row["duo_alpha_one"], row["duo_alpha_zero"]) == (3, 2)
    assert cm.main([str(tmp_path)]) == 0
    assert "| s0.5-kv_head-seed1 | 0.5 | 1 / 2 (of 3) | 2 (of 3) | -2.5 |" in capsys.readouterr().out
    assert cm.main([str(tmp_path / "nowhere")]) == 2
