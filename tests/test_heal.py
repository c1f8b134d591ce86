"""`consa heal`: the objective is the KL of the hybrid student to the full teacher, the allocation stays
fixed, resume is bit-exact, LoRA merges exactly, the output loads back, and bad input is one line."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import consa
from consa.allocation import Allocation, ModelShape
from consa.cli import main
from consa.errors import ConsaError
from consa.models import apply_allocation, attention_modules, load_model
from consa.tiny import tiny_model
from consa.train.heal import Heal, HealConfig

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE = ModelShape(num_layers=3, num_kv_heads=2, num_q_heads=4)
T = 19  # odd sequence length, window 4, one sink
# non-contiguous FA heads (layer 0 keeps head 1 only): the export has to reorder them
FA = ((False, True), (True, False), (False, False))


def _alloc(sinks: int = 1) -> Allocation:
    return Allocation("kv_head", SHAPE, 4, FA, sinks)


def _model():
    return tiny_model("qwen3", seed=3, num_layers=3, num_heads=4, num_kv_heads=2)


def _batches(step: int) -> dict:
    g = torch.Generator().manual_seed(100 + step)
    return {"input_ids": torch.randint(3, 101, (3, T), generator=g)}


def _cfg(**kw) -> HealConfig:
    return HealConfig(**{"steps": 3, "seq_len": T, "lr": 3e-4, "checkpoint_every": 0, **kw})


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.double()


def _kl(teacher: torch.Tensor, student: torch.Tensor) -> float:
    t, s = F.log_softmax(teacher, -1), F.log_softmax(student, -1)
    return float((t.exp() * (t - s)).sum(-1).mean())


def _hybrid(model, alloc):
    apply_allocation(model, alloc)
    return model


@pytest.mark.parametrize("lora", [0, 4])
def test_loss_is_the_kl_of_the_hybrid_student_to_the_full_teacher(tmp_path, lora):
    """Step 0's reported loss equals KL(full ‖ hybrid with sinks) computed here by hand; training with
    full attention (KL 0) or without the sinks would report another number."""
    ids = _batches(0)["input_ids"]
    full = _logits(_model(), ids)
    want = _kl(full, _logits(_hybrid(_model(), _alloc()), ids))
    no_sinks = _kl(full, _logits(_hybrid(_model(), _alloc(sinks=0)), ids))
    assert want > 1e-3 and abs(want - no_sinks) > 1e-4  # the test can tell the three apart
    h = Heal(_model(), _alloc(), _cfg(steps=1, lora_rank=lora), _batches, tmp_path / "out", progress=False)
    h.run()
    assert h.history[0]["loss"] == pytest.approx(want, rel=1e-5, abs=1e-7)


def test_healing_lowers_the_kl_and_leaves_the_allocation_untouched(tmp_path):
    fixed = _batches(0)
    model = _model()
    before = _kl(_logits(_model(), fixed["input_ids"]), _logits(_hybrid(_model(), _alloc()), fixed["input_ids"]))
    healed = Heal(model, _alloc(), _cfg(steps=8), lambda step: fixed, tmp_path / "out", progress=False).run()
    after = _kl(_logits(_model(), fixed["input_ids"]), _logits(healed, fixed["input_ids"]))
    assert after < 0.5 * before
    for mod in attention_modules(healed):  # the in-memory model still attends under the allocation
        p = mod.consa_plan
        assert (p.mode, p.fa_kv, p.window, p.sinks) == ("fixed", _alloc().fa_heads(mod.layer_idx), 4, 1)
    stored = Allocation.load(tmp_path / "out" / "allocation.json")
    order = stored.meta["head_order"]  # new -> original KV head: the same heads, moved FA-first
    original = [[stored.fa[i][order[i].index(h)] for h in range(2)] for i in range(3)]
    assert tuple(map(tuple, original)) == FA and (stored.window, stored.sinks, stored.num_swa) == (4, 1, 4)
    heal_json = json.loads((tmp_path / "out" / "heal.json").read_text())
    assert heal_json["steps_done"] == 8 and heal_json["final"]["loss"] < heal_json["first"]["loss"]
    assert not (tmp_path / "out" / "checkpoint").exists()


@pytest.mark.parametrize("lora", [0, 4])
def test_resume_continues_bit_exactly(tmp_path, lora):
    """5 steps straight == 3 steps, a crash (checkpoint at step 2), and --resume to 5."""
    cfg = _cfg(steps=5, checkpoint_every=2, lora_rank=lora, merge=False)
    straight = Heal(_model(), _alloc(), cfg, _batches, tmp_path / "a", progress=False).run()

    def crashing(step):
        if step == 3:
            raise KeyboardInterrupt  # killed after step 3 ran, one step past the checkpoint
        return _batches(step)

    with pytest.raises(KeyboardInterrupt):
        Heal(_model(), _alloc(), cfg, crashing, tmp_path / "b", progress=False).run()
    assert json.loads((tmp_path / "b" / "checkpoint" / "state.json").read_text())["step"] == 2
    resumed_run = Heal(_model(), _alloc(), cfg, _batches, tmp_path / "b", progress=False)
    resumed = resumed_run.run(resume=True)
    a, b = straight.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    metrics = lambda d: [json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert metrics("a") == metrics("b") and [r["step"] for r in metrics("b")] == [0, 1, 2, 3, 4]


def test_resume_refuses_other_settings_or_allocation(tmp_path):
    cfg = _cfg(steps=4, checkpoint_every=2)
    with pytest.raises(KeyboardInterrupt):
        Heal(_model(), _alloc(), cfg, lambda s: (_ for _ in ()).throw(KeyboardInterrupt) if s == 3 else _batches(s),
             tmp_path / "o", progress=False).run()
    with pytest.raises(ConsaError, match="other settings"):
        Heal(_model(), _alloc(), _cfg(steps=4, checkpoint_every=2, lr=1e-4), _batches, tmp_path / "o", progress=False).run(resume=True)
    with pytest.raises(ConsaError, match="another allocation"):
        Heal(_model(), _alloc(sinks=0), cfg, _batches, tmp_path / "o", progress=False).run(resume=True)
    with pytest.raises(ConsaError, match="not an empty folder"):
        Heal(_model(), _alloc(), cfg, _batches, tmp_path / "o", progress=False).run()


def test_lora_merge_gives_the_unmerged_models_logits(tmp_path):
    ids = _batches(7)["input_ids"]
    unmerged = Heal(_model(), _alloc(), _cfg(lora_rank=4, merge=False), _batches, tmp_path / "o", progress=False).run()
    before = _logits(unmerged, ids)
    assert (before - _logits(_hybrid(_model(), _alloc()), ids)).abs().max() > 1e-4  # the adapter changed the model
    assert (tmp_path / "o" / "adapter" / "adapter_model.safetensors").is_file()
    merged = unmerged.merge_and_unload()
    assert torch.allclose(_logits(merged, ids), before, atol=1e-5, rtol=0)


@pytest.mark.parametrize("lora", [0, 4])
def test_output_loads_back_with_the_same_logits(tmp_path, lora):
    """consa.load(OUT), load_model(OUT) + OUT/allocation.json (what consa eval does) and a re-export
    of OUT all give the in-memory healed model's logits."""
    from consa.export import export

    ids = _batches(9)["input_ids"]
    healed = Heal(_model(), _alloc(), _cfg(lora_rank=lora), _batches, tmp_path / "o", progress=False).run()
    want = _logits(healed, ids)
    assert torch.allclose(_logits(consa.load(tmp_path / "o"), ids), want, atol=1e-5, rtol=0)
    plain = load_model(tmp_path / "o")
    apply_allocation(plain, Allocation.load(tmp_path / "o" / "allocation.json"))
    assert torch.allclose(_logits(plain, ids), want, atol=1e-5, rtol=0)
    export(tmp_path / "o", Allocation.load(tmp_path / "o" / "allocation.json"), tmp_path / "re")
    assert torch.allclose(_logits(consa.load(tmp_path / "re"), ids), want, atol=1e-5, rtol=0)


# ---- command line ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("heal")
    _model().save_pretrained(d / "model")
    _alloc().save(d / "alloc.json")
    Allocation.uniform(False, "layer", ModelShape(4, 2, 4), 4).save(d / "wrong_shape.json")
    return d


def test_cli_heals_end_to_end(files, tmp_path, capsys):
    rc = main(["heal", "--model", str(files / "model"), "--allocation", str(files / "alloc.json"), "--out",
               str(tmp_path / "o"), "--tokens", "100", "--seq-len", str(T), "--batch-size", "3", "--lr", "1e-3",
               "--no-progress"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "healed 2 steps (114 tokens)" in out and "wrote" in out  # ceil(100 / (3 × 19)) = 2 steps
    assert consa.load(tmp_path / "o") is not None
    assert json.loads((tmp_path / "o" / "heal.json").read_text())["steps_done"] == 2


@pytest.mark.parametrize("extra, match", [
    (["--allocation", "{d}/wrong_shape.json", "--steps", "2"], "allocation is for 4 layers"),
    (["--steps", "0"], "argument --steps"),
    (["--steps", "2", "--tokens", "10"], "--steps or --tokens"),
    ([], "--steps or --tokens"),
    (["--steps", "2", "--seq-len", "4"], "not smaller than --seq-len"),
    (["--steps", "2", "--lr", "0"], "argument --lr"),
    (["--steps", "2", "--no-merge"], "LoRA runs only"),
    (["--steps", "2", "--model", "{d}/missing"], "model directory not found"),
    (["--steps", "2", "--allocation", "{d}/missing.json"], "allocation file not found"),
    (["--steps", "2", "--resume"], "no checkpoint"),
    (["--steps", "2", "--retrieval-mix", "0.5"], "needs --corpus"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(files, tmp_path, capsys, extra, match):
    argv = ["heal", "--model", str(files / "model"), "--allocation", str(files / "alloc.json"), "--out",
            str(tmp_path / "o"), "--seq-len", str(T), "--no-progress"]
    rc = main(argv + [x.format(d=files) for x in extra])  # later options override the ones above
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and match in err[0] and err[0].startswith("consa: error:"), err
    assert not (tmp_path / "o").exists()


def test_lora_without_peft_is_one_line(files, tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` now raises ImportError
    rc = main(["heal", "--model", str(files / "model"), "--allocation", str(files / "alloc.json"), "--out",
               str(tmp_path / "o"), "--steps", "2", "--seq-len", str(T), "--lora", "4"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "needs PEFT" in err[0]
    assert not (tmp_path / "o").exists()


def test_a_failing_run_leaves_nothing_behind(tmp_path):
    def nan_batches(step):
        raise ConsaError("bad batch")

    with pytest.raises(ConsaError):
        Heal(_model(), _alloc(), _cfg(), nan_batches, tmp_path / "o", progress=False).run()
    assert not (tmp_path / "o").exists()


# ---- experiment stage -----------------------------------------------------------------------------
def test_experiment_heal_stage_heals_every_allocation_with_the_same_tokens(tmp_path):
    """A CI-size experiment with a heal section: every allocation of the sparsity asked for gets a healed
    eval run next to its unhealed one, with the same token count, and the report shows them."""
    import shutil
    import sysconfig
    from pathlib import Path

    from consa.experiment import ExperimentConfig, run_all

    src = tmp_path / "src"
    src.mkdir()
    for name in ("textwrap.py", "string.py", "heapq.py", "bisect.py", "fractions.py", "calendar.py"):
        shutil.copy(Path(sysconfig.get_paths()["stdlib"]) / name, src / name)
    cfg = ExperimentConfig.from_dict({
        "name": "heal-ci", "device": "cpu", "data": {"sources": [str(src)], "vocab_size": 384, "workers": 1},
        "pretrain": {"preset": "tiny", "steps": 2, "batch_size": 2, "seq_len": 128, "retrieval_mix": 0.0, "eval_every": 100},
        "search": {"sparsities": [0.5, 0.75], "methods": ["fa_top-layer", "interleaved-kv_head"], "batch_size": 2},
        "eval": {"tasks": [], "ppl_length": 128, "ppl_sequences": 2, "batch_size": 2},
        "heal": {"sparsities": [0.75], "tokens": 500, "batch_size": 2, "lr": 1e-3},
    })
    work = tmp_path / "work"
    out = run_all(cfg, work)
    assert all(v.get("done") for v in out.values()) and "heal" in out
    rows = out["heal"]["rows"]
    assert sorted(r["method"] for r in rows) == ["fa_top-layer", "interleaved-kv_head"]
    full = json.loads((work / "eval" / "full" / "eval.json").read_text())["quality"]["long"]["ppl"]
    for r in rows:
        after = json.loads((work / "eval" / "s0.75" / f"{r['method']}-healed" / "eval.json").read_text())
        before = json.loads((work / "eval" / "s0.75" / r["method"] / "eval.json").read_text())
        assert after["heal"]["tokens"] == 512 and after["heal"]["steps"] == 2  # ceil(500 / 256) steps of 2 × 128
        assert after["quality"]["long"]["ppl"] != before["quality"]["long"]["ppl"]  # the weights were healed
        assert r["long_ratio_after"] == pytest.approx(after["quality"]["long"]["ppl"] / full)
        assert not list((work / "heal" / "s0.75" / r["method"]).glob("*.safetensors"))  # keep_models off
    assert not (work / "eval" / "s0.5" / "fa_top-layer-healed").exists()  # only the sparsities asked for
    md = (work / "report" / "results.md").read_text()
    assert "### Healing" in md and "fa_top-layer" in md.split("### Healing")[1]


def test_gap_closed_by_healing_is_the_share_of_the_remaining_long_range_gap(tmp_path):
    from consa.experiment import ExperimentConfig, Workdir
    from consa.experiment.stages.heal import format_heal, heal_rows

    cfg = ExperimentConfig.from_dict({"search": {"sparsities": [0.75], "methods": ["fa_top-layer", "fa_middle-layer"]},
                                      "heal": {}})
    wd = Workdir(tmp_path, cfg)

    def put(d, long_ppl, heal=None):
        (wd.evals / d).mkdir(parents=True)
        res = {"quality": {"long": {"ppl": long_ppl}, "short": {"ppl": 5.0}},
               "summary": {"retrieval": {"passkey": 0.5}, "retrieval_raw": {"passkey": 0.5}}, "heal": heal}
        (wd.evals / d / "eval.json").write_text(json.dumps(res))

    rec = {"tokens": 1000, "first_loss": 0.2, "final_loss": 0.1}
    put("full", 10.0)
    put("s0.75/fa_top-layer", 12.0)
    put("s0.75/fa_top-layer-healed", 11.0, rec)
    put("s0.75/fa_middle-layer", 9.0)  # already below full attention: no gap to close
    put("s0.75/fa_middle-layer-healed", 9.5, rec)
    rows = {r["method"]: r for r in heal_rows(wd)}
    assert rows["fa_top-layer"]["gap_closed_by_heal"] == pytest.approx(0.5)  # (12 − 11) / (12 − 10)
    top = rows["fa_top-layer"]
    assert top["long_ratio_before"] == pytest.approx(1.2) and top["long_ratio_after"] == pytest.approx(1.1)
    assert rows["fa_middle-layer"]["gap_closed_by_heal"] is None
    assert "| 0.75 | fa_top-layer | 1,000 | 1.200 → 1.100 | 1.000 | 0.50 → 0.50 | 0.50 |" in format_heal(wd)


def test_best_rules_adds_the_rules_with_the_lowest_long_range_ppl_per_sparsity(tmp_path):
    """heal.best_rules 2: the two rules (random excluded) with the lowest long-range PPL at each sparsity
    join heal.methods, ties broken by retrieval; a learned method is not a rule; without the eval runs
    only heal.methods are healed."""
    from consa.experiment import ExperimentConfig, Workdir
    from consa.experiment.stages.heal import heal_targets

    methods = ["consa-kv_head", "fa_top-layer", "fa_middle-layer", "interleaved-layer", "interleaved-kv_head", "random-kv_head"]
    cfg = ExperimentConfig.from_dict({"search": {"sparsities": [0.5, 0.75], "methods": methods, "random_seeds": [0]},
                                      "heal": {"methods": ["consa-kv_head"], "best_rules": 2}})
    wd = Workdir(tmp_path, cfg)

    def put(d, long_ppl, retrieval=0.5):
        (wd.evals / d).mkdir(parents=True)
        res = {"quality": {"long": {"ppl": long_ppl}}, "summary": {"retrieval": {"passkey": retrieval}, "retrieval_raw": {}}}
        (wd.evals / d / "eval.json").write_text(json.dumps(res))

    for stem, p5, p75 in (("consa-kv_head", 1.0, 1.0), ("fa_top-layer", 12, 20), ("fa_middle-layer", 11, 30),
                          ("interleaved-layer", 13, 25), ("interleaved-kv_head", 14, 20), ("random-kv_head-seed0", 5, 5)):
        put(f"s0.5/{stem}", p5)
        put(f"s0.75/{stem}", p75, retrieval=0.9 if stem == "interleaved-kv_head" else 0.5)
    assert heal_targets(cfg, wd.evals) == [(0.5, "consa-kv_head"), (0.5, "fa_middle-layer"), (0.5, "fa_top-layer"),
                                           (0.75, "consa-kv_head"), (0.75, "interleaved-kv_head"), (0.75, "fa_top-layer")]
    assert heal_targets(cfg) == [(0.5, "consa-kv_head"), (0.75, "consa-kv_head")]
    with pytest.raises(ConsaError, match="heal.best_rules"):
        ExperimentConfig.from_dict({"search": {"sparsities": [0.5], "methods": methods}, "heal": {"best_rules": -1}})


def _stdlib_sources(tmp_path):
    import shutil
    import sysconfig
    from pathlib import Path

    src = tmp_path / "src"
    src.mkdir()
    for name in ("textwrap.py", "string.py", "heapq.py", "bisect.py", "fractions.py", "calendar.py"):
        shutil.copy(Path(sysconfig.get_paths()["stdlib"]) / name, src / name)
    return src


def _heal_experiment(tmp_path, heal: dict):
    from consa.experiment import ExperimentConfig

    return ExperimentConfig.from_dict({
        "name": "heal-ci", "device": "cpu", "data": {"sources": [str(_stdlib_sources(tmp_path))], "vocab_size": 384, "workers": 1},
        "pretrain": {"preset": "tiny", "steps": 2, "batch_size": 2, "seq_len": 128, "retrieval_mix": 0.0, "eval_every": 100},
        "search": {"sparsities": [0.5, 0.75], "methods": ["fa_top-layer", "interleaved-kv_head"], "batch_size": 2},
        "eval": {"tasks": [], "ppl_length": 128, "ppl_sequences": 2, "batch_size": 2},
        "heal": {"sparsities": [0.75], "batch_size": 2, "lr": 1e-3, **heal},
    })


def test_experiment_heal_stage_heals_with_several_token_budgets(tmp_path):
    """heal.tokens [1000, 256]: every allocation is healed twice from the same base weights, into
    ``<method>-healed-1K`` and ``-256``; the smaller heal runs fewer steps on the same first batch, a
    time budget leaves the heals for a later call, and the report has a row per method and budget."""
    import time

    from consa.experiment import Workdir, run_all, run_stage
    from consa.experiment.stages.heal import format_heal

    cfg = _heal_experiment(tmp_path, {"tokens": [1000, 256]})
    work = tmp_path / "work"
    assert run_all(cfg, work, until="eval")["eval"]["done"]
    late = run_stage("heal", cfg, work, deadline=time.time() - 1)  # out of time: nothing healed, continued below
    assert not late["done"] and "4 heals left" in late["note"] and not list((work / "eval" / "s0.75").glob("*-healed*"))
    rec = run_stage("heal", cfg, work)
    assert rec["done"] and rec["tokens_per_allocation"] == [1024, 256] and rec["steps"] == [4, 1]
    for m in ("fa_top-layer", "interleaved-kv_head"):
        assert not (work / "eval" / "s0.75" / f"{m}-healed").exists()  # several budgets: every run has its label
        runs = {lab: json.loads((work / "eval" / "s0.75" / f"{m}-healed-{lab}" / "eval.json").read_text())["heal"]
                for lab in ("256", "1K")}
        assert (runs["256"]["tokens"], runs["256"]["steps"], runs["1K"]["tokens"], runs["1K"]["steps"]) == (256, 1, 1024, 4)
        assert runs["256"]["first_loss"] == pytest.approx(runs["1K"]["first_loss"], rel=1e-6)  # same base, same batch 0
        for lab, steps in (("256", 1), ("1K", 4)):
            d = work / "heal" / "s0.75" / f"{m}-{lab}"
            assert json.loads((d / "heal.json").read_text())["steps_done"] == steps
            assert len((d / "metrics.jsonl").read_text().splitlines()) == steps
    rows = rec["rows"]
    assert [(r["tokens"], r["sparsity"]) for r in rows] == [(256, 0.75)] * 2 + [(1024, 0.75)] * 2  # sorted by tokens
    assert sorted(r["method"] for r in rows[:2]) == ["fa_top-layer", "interleaved-kv_head"]
    table = format_heal(Workdir(work, cfg))
    for m in ("fa_top-layer", "interleaved-kv_head"):
        assert f"| 0.75 | {m} | 256 |" in table and f"| 0.75 | {m} | 1,024 |" in table


def test_token_labels():
    from consa.experiment.stages.heal import token_label

    assert [token_label(n) for n in (2_000_000, 10_000_000, 500_000, 1_000, 1_234_567, 3_000_000_000)] == \
        ["2M", "10M", "500K", "1K", "1234567", "3B"]


@pytest.mark.parametrize("tokens, match", [
    ([1000, 1000], "lists a budget twice"), ([1000, 0], ">= 1"), (-5, ">= 1"), ([], ">= 1"), ([1.5], ">= 1"),
])
def test_bad_heal_budgets_are_one_line(tokens, match):
    from consa.experiment import ExperimentConfig

    with pytest.raises(ConsaError, match=match) as e:
        ExperimentConfig.from_dict({"search": {"sparsities": [0.75], "methods": ["fa_top-layer"]}, "heal": {"tokens": tokens}})
    assert "\n" not in str(e.value) and "heal.tokens" in str(e.value)


# ---- an unmerged LoRA heal loads back -------------------------------------------------------------
def test_unmerged_lora_heal_loads_with_the_merged_logits(files, tmp_path, monkeypatch):
    """`consa heal --lora 4` with and without --no-merge on the same batches and seed: consa.load of the
    adapter folder (base model + allocation + PEFT adapter) gives the merged export's logits, from
    another working directory too (heal.json records the base model's absolute path)."""
    monkeypatch.chdir(files)
    argv = ["heal", "--model", "model", "--allocation", "alloc.json", "--steps", "3", "--seq-len", str(T),
            "--batch-size", "3", "--lr", "1e-3", "--lora", "4", "--no-progress"]
    assert main([*argv, "--out", str(tmp_path / "merged")]) == 0
    assert main([*argv, "--out", str(tmp_path / "unmerged"), "--no-merge"]) == 0
    assert not (tmp_path / "unmerged" / "config.json").exists()  # an adapter, not a model
    assert json.loads((tmp_path / "unmerged" / "heal.json").read_text())["source_model"] == str((files / "model").resolve())
    monkeypatch.chdir(tmp_path)
    ids = _batches(9)["input_ids"]
    want = _logits(consa.load(tmp_path / "merged"), ids)
    assert (want - _logits(_hybrid(_model(), _alloc()), ids)).abs().max() > 1e-4  # the heal changed the model
    for d in (tmp_path / "unmerged", tmp_path / "unmerged" / "adapter"):
        assert torch.allclose(_logits(consa.load(d), ids), want, atol=1e-5, rtol=0)


def test_unmerged_lora_heal_without_its_base_or_peft_is_one_line(tmp_path, monkeypatch):
    import shutil
    import sys

    _model().save_pretrained(tmp_path / "base")
    Heal(load_model(tmp_path / "base"), _alloc(), _cfg(steps=1, lora_rank=4, merge=False), _batches, tmp_path / "o",
         progress=False, source_dir=tmp_path / "base").run()
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "peft", None)  # `from peft import ...` now raises ImportError
        with pytest.raises(ConsaError, match=r"pip install 'consa\[peft\]'") as e:
            consa.load(tmp_path / "o")
        assert "\n" not in str(e.value)
    base = str((tmp_path / "base").resolve())
    shutil.rmtree(base)
    with pytest.raises(ConsaError, match="no longer exists") as e:
        consa.load(tmp_path / "o")
    assert base in str(e.value) and "\n" not in str(e.value)


@pytest.mark.slow
@pytest.mark.parametrize("micro", [[], ["--micro-batch", "1"]], ids=["whole", "micro"])
def test_two_process_heal_matches_one_process(files, tmp_path, micro):
    """`--nproc 2` (torchrun, FSDP2, gloo on CPU) heals to the one-process model up to reduction order;
    also with each rank's 2 rows one at a time (``--micro-batch 1``)."""
    import os
    import subprocess
    import sys

    args = ["heal", "--model", str(files / "model"), "--allocation", str(files / "alloc.json"), "--steps", "3",
            "--seq-len", str(T), "--batch-size", "4", "--lr", "3e-4", "--checkpoint-every", "2", "--device", "cpu",
            "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.path.join(os.path.dirname(__file__), "..", "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, "-m", "consa", *args, "--out", str(tmp_path / "two"), "--nproc", "2", *micro],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    ids = _batches(5)["input_ids"]
    one, two = _logits(consa.load(tmp_path / "one"), ids), _logits(consa.load(tmp_path / "two"), ids)
    assert (one - _logits(_hybrid(_model(), _alloc()), ids)).abs().max() > 1e-4  # healing changed the model
    assert torch.allclose(one, two, atol=1e-5, rtol=0)
    assert json.loads((tmp_path / "two" / "heal.json").read_text())["world_size"] == 2
