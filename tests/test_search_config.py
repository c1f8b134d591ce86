"""SearchConfig in parts: each part checks its own fields, every `consa search` flag lands in one field, and
the flat layout of older runs (search.json, checkpoints) still reads and resumes."""

import json

import pytest
import torch

from consa.cli import build_parser, main
from consa.errors import ConsaError
from consa.tiny import tiny_model
from consa.train.search import Search
from consa.train.search_config import (FLAT_NAMES, PARTS, ConstraintConfig, GateConfig, LossConfig, RefineConfig,
                                       ScheduleConfig, SearchConfig, TargetConfig, WeightsConfig, flatten)

pytestmark = pytest.mark.usefixtures("one_thread")

# flags of `consa search` that are no search setting: the run's inputs, outputs and processes
NOT_SETTINGS = {"model", "corpus", "retrieval_mix", "retrieval_source", "batch_size", "resume", "device", "dtype", "nproc",
                "no_activation_checkpointing", "no_progress", "out", "func"}


def _batches(step):
    g = torch.Generator().manual_seed(step)
    return {"input_ids": torch.randint(3, 101, (2, 40), generator=g)}


def _search_flags() -> set[str]:
    sub = build_parser()._subparsers._group_actions[0].choices["search"]
    return {a.dest for a in sub._actions if a.dest != "help"}


def test_every_flag_is_one_field_and_every_field_has_a_flat_name():
    flags = _search_flags()
    assert flags - NOT_SETTINGS - set(FLAT_NAMES) == set()  # a new flag must name its field in FLAT_NAMES
    fields = {(part, f) for part, cls in PARTS.items() for f in cls.__dataclass_fields__}
    fields |= {(None, f) for f in SearchConfig.__dataclass_fields__ if f not in PARTS}
    assert set(FLAT_NAMES.values()) == fields and len(FLAT_NAMES) == len(fields) == 38
    # the flags that are settings are the flat names, less those only the library sets
    assert set(FLAT_NAMES) - (flags - NOT_SETTINGS) == {"kl_weight", "temperature", "lora_rank", "refine_batches",
                                                         "init_spread", "backend"}


def test_flat_and_nested_layouts_read_back_to_the_same_config():
    cfg = SearchConfig(TargetConfig(sparsity=0.625, window=7, granularity="layer", sinks=2), seq_len=48,
                       gates=GateConfig(lr=0.02, beta_final=None, decide_weight=0.5),
                       schedule=ScheduleConfig(steps=9, until_agreement=0.9, max_steps=20),
                       constraint=ConstraintConfig(controller="project", warmup_frac=0.25),
                       loss=LossConfig(lm_weight=0.1, answer_weight=2.0), refine=RefineConfig(evals=5, order="score"),
                       weights=WeightsConfig(train="lora", lr=3e-5, lora_rank=4), seed=7, micro_batch=2)
    nested = json.loads(json.dumps(cfg.to_dict()))
    assert nested["gates"]["lr"] == 0.02 and nested["refine"]["order"] == "score" and nested["seq_len"] == 48
    flat = cfg.flat()
    assert flat["gate_lr"] == 0.02 and flat["refine_order"] == "score" and flat["train_weights"] == "lora"
    assert SearchConfig.from_dict(nested) == SearchConfig.from_dict(flat) == SearchConfig.from_flat(flat) == cfg
    assert flatten(nested) == flatten(flat) == flat
    with pytest.raises(ConsaError, match="unknown search settings: gate_rate"):
        SearchConfig.from_flat({**flat, "gate_rate": 1.0})
    with pytest.raises(ConsaError, match="'gates': unknown keys"):
        SearchConfig.from_dict({**nested, "gates": {**nested["gates"], "rate": 1.0}})


@pytest.mark.parametrize("make, match", [
    (lambda: TargetConfig(sparsity=0.5, kv_budget=0.3, window=4), "exactly one"),
    (lambda: TargetConfig(sparsity=1.5, window=4), "sparsity"),
    (lambda: TargetConfig(sparsity=0.5), "a window is required"),
    (lambda: TargetConfig(sparsity=0.5, window=4, granularity="head"), "granularity"),
    (lambda: GateConfig(beta_final=50.0), "beta_final"),
    (lambda: GateConfig(init="bogus"), "init must be one of"),
    (lambda: GateConfig(lr=0.0), "gate lr"),
    (lambda: ScheduleConfig(steps=0), "steps must be >= 1"),
    (lambda: ScheduleConfig(steps=5, max_steps=2), "max_steps"),
    (lambda: ConstraintConfig(controller="pid"), "controller"),
    (lambda: LossConfig(answer_weight=-1.0), "answer_weight"),
    (lambda: RefineConfig(order="nearest"), "refine_order"),
    (lambda: WeightsConfig(train="half"), "train_weights"),
    (lambda: SearchConfig(TargetConfig(sparsity=0.5, window=40), seq_len=40), "smaller than the training sequence"),
    (lambda: SearchConfig(TargetConfig(kv_budget=0.3, spans="3,6,full"), seq_len=40, gates=GateConfig(init="duo")),
     "single window only"),
    (lambda: SearchConfig(TargetConfig(sparsity=0.5, window=4), seq_len=40, checkpoint_every=-1), "checkpoint_every"),
])
def test_each_part_checks_its_fields_when_made(make, match):
    with pytest.raises(ConsaError, match=match) as e:
        make()
    assert "\n" not in str(e.value)


def test_a_part_changed_after_construction_is_checked_again_by_the_search(tmp_path):
    cfg = SearchConfig(TargetConfig(sparsity=0.5, window=5), seq_len=40)
    cfg.schedule.steps = 0
    with pytest.raises(ConsaError, match="steps must be >= 1"):
        Search(tiny_model("qwen3", num_layers=2), cfg, _batches, tmp_path, progress=False)


def test_cli_flags_land_in_their_parts(tmp_path):
    model = tmp_path / "model"
    tiny_model("qwen3", num_layers=2).save_pretrained(model)
    out = tmp_path / "run"
    assert main(["search", "--model", str(model), "--sparsity", "0.5", "--window", "5", "--seq-len", "24", "--batch-size",
                 "2", "--steps", "2", "--gate-lr", "0.07", "--warmup-frac", "0.3", "--controller", "project",
                 "--refine-order", "score", "--refine-evals", "3", "--lm-weight", "0.25", "--decide-weight", "0.5",
                 "--checkpoint-every", "7", "--seed", "4", "--no-progress", "--out", str(out)]) == 0
    cfg = json.loads((out / "search.json").read_text())["config"]
    assert (cfg["gates"]["lr"], cfg["gates"]["decide_weight"], cfg["constraint"]) == (
        0.07, 0.5, {"controller": "project", "warmup_frac": 0.3})
    assert (cfg["refine"]["order"], cfg["refine"]["evals"], cfg["loss"]["lm_weight"]) == ("score", 3, 0.25)
    assert (cfg["target"]["sparsity"], cfg["target"]["window"], cfg["schedule"]["steps"]) == (0.5, 5, 2)
    assert (cfg["seq_len"], cfg["seed"], cfg["checkpoint_every"]) == (24, 4, 7)


class _Crash(Exception):
    pass


def _crash_at(step):
    def fn(s):
        if s == step:
            raise _Crash
        return _batches(s)
    return fn


def test_a_checkpoint_in_the_old_flat_layout_resumes_bit_exactly(tmp_path):
    """Runs saved before SearchConfig had parts recorded the flat config in checkpoint/state.json; such a run
    resumes to the allocation and gates of an unbroken one, and a flat setting that differs is refused by name."""
    cfg = SearchConfig(TargetConfig(sparsity=0.75, window=5), seq_len=40, schedule=ScheduleConfig(steps=8),
                       gates=GateConfig(lr=0.1), checkpoint_every=4, seed=2)
    unbroken = Search(tiny_model("qwen3", num_layers=4), cfg, _batches, tmp_path / "a", progress=False)
    want = unbroken.run()
    with pytest.raises(_Crash):
        Search(tiny_model("qwen3", num_layers=4), cfg, _crash_at(6), tmp_path / "b", progress=False).run()
    state = tmp_path / "b" / "checkpoint" / "state.json"
    meta = json.loads(state.read_text())
    assert meta["step"] == 4 and "target" in meta["config"]
    meta["config"] = cfg.flat()  # as the old code wrote it
    state.write_text(json.dumps(meta))
    resumed = Search(tiny_model("qwen3", num_layers=4), cfg, _batches, tmp_path / "b", progress=False)
    assert resumed.run(resume=True) == want
    assert torch.equal(resumed.gates.log_alpha, unbroken.gates.log_alpha)

    with pytest.raises(_Crash):
        Search(tiny_model("qwen3", num_layers=4), cfg, _crash_at(6), tmp_path / "c", progress=False).run()
    state = tmp_path / "c" / "checkpoint" / "state.json"
    meta = json.loads(state.read_text())
    meta["config"] = {**cfg.flat(), "gate_lr_final": 0.01, "controller": "project"}
    state.write_text(json.dumps(meta))
    with pytest.raises(ConsaError, match=r"other settings \(controller, gate_lr_final\)"):
        Search(tiny_model("qwen3", num_layers=4), cfg, _batches, tmp_path / "c", progress=False).run(resume=True)
