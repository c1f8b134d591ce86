"""`consa experiment`: the driver runs end to end at CI size and its stages resume from disk."""

from __future__ import annotations

import json
import shutil
import sysconfig
from pathlib import Path

import pytest
import torch

from consa.cli import main
from consa.errors import ConsaError
from consa.experiment import ALL_METHODS, ExperimentConfig, Workdir, run_all, run_stage


pytestmark = pytest.mark.usefixtures("one_thread")


def _ci_config(src: Path) -> dict:
    return {
        "name": "ci", "seed": 0, "device": "cpu", "progress": False,
        "data": {"sources": [str(src)], "vocab_size": 512, "workers": 1},
        "pretrain": {"preset": "tiny", "steps": 3, "batch_size": 4, "seq_len": 128, "retrieval_mix": 0.5,
                     "bank_items": 6, "bank_tasks": ["passkey"], "bank_min_len": 80, "eval_every": 100, "bank_digits": 3,
                     "answer_weight": 1.0},
        "search": {"sparsities": [0.5, 0.75], "steps": 3, "batch_size": 2, "mass_batches": 1, "random_seeds": [0, 1, 2],
                   "refine_evals": 3},
        "eval": {"tasks": ["passkey"], "lengths": [112], "depths": [0.5], "items": 1, "digits": 3, "ppl_length": 128,
                 "ppl_sequences": 2, "batch_size": 4},
    }


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One CI-size experiment run through every stage by the command line."""
    root = tmp_path_factory.mktemp("exp")
    src = root / "src"
    src.mkdir()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in ("textwrap.py", "string.py", "heapq.py", "bisect.py", "fractions.py", "calendar.py", "shlex.py"):
        shutil.copy(stdlib / name, src / name)
    cfg_path = root / "ci.json"
    cfg_path.write_text(json.dumps(_ci_config(src)))
    work = root / "work"
    rc = main(["experiment", "all", "--config", str(cfg_path), "--workdir", str(work)])
    return cfg_path, work, rc


def test_end_to_end_table_has_every_method_with_equal_swa_counts(finished):
    cfg_path, work, rc = finished
    assert rc == 0
    stages = json.loads((work / "stages.json").read_text())
    for s in ("data", "pretrain", "search", "eval", "report"):
        assert stages[s]["done"] and stages[s]["wall_s"] >= 0, s
    res = json.loads((work / "report" / "results.json").read_text())
    md = (work / "report" / "results.md").read_text()
    assert set(res["tables"]) == {"s0.5", "s0.75"}
    for key, tab in res["tables"].items():
        rows = tab["rows"]
        names = {n.split(" ")[0] for n in rows}
        assert names == set(ALL_METHODS), names
        assert "random-kv_head (mean of 3 seeds)" in rows
        # the same share of KV heads is SWA in every row (4 layers x 2 KV heads: no rounding differences)
        assert len({r["swa_heads"] for r in rows.values()}) == 1, {n: r["swa_heads"] for n, r in rows.items()}
        assert {r["swa_heads"] for r in rows.values()} == {int(tab["sparsity"] * 8)}
        for r in rows.values():
            assert r["long_ppl_ratio"] is not None and r["long_ppl_ratio"] > 0
            assert r["short_ppl_ratio"] == pytest.approx(1.0, abs=1e-3)  # positions <= W see the same keys
        assert f"### Sparsity {tab['sparsity']}" in md
        for n in rows:
            assert f"| {n} |" in md
    # learned methods report the tokens they used after the base model, rules none
    rows = res["tables"]["s0.5"]["rows"]
    assert rows["consa-kv_head"]["tokens_after_base"] == 3 * 2 * 128
    assert rows["fa_top-layer"]["tokens_after_base"] == 0
    # ConSA rows carry the cut refinement's evidence into the report; other methods have none
    ref = rows["consa-kv_head"]["refine"]
    assert 1 <= ref["evals"] <= 3 and ref["kl_after"] <= ref["kl_before"] and rows["duo-kv_head"].get("refine") is None
    assert f"{ref['kl_before']:.4f} → {ref['kl_after']:.4f}" in md
    # and when their top-k cut last moved (search.json), in the structure table
    moved = json.loads((work / "search" / "s0.5-kv_head" / "search.json").read_text())["cut_last_changed_step"]
    assert rows["consa-kv_head"]["cut_last_changed_step"] == moved and 0 <= moved < 3
    assert f"| {moved} of 3 |" in md
    # and the cut's margin: every FA unit is either clear of the band or in it
    margin = json.loads((work / "search" / "s0.5-kv_head" / "search.json").read_text())["cut_margin"]
    assert rows["consa-kv_head"]["cut_margin"] == margin and margin["fa_clear"] + margin["fa_near_cut"] == 4
    assert f"| {moved} of 3 | {margin['fa_clear']}/{margin['fa_near_cut']}/{margin['swa_near_cut']} |" in md
    assert (work / "report" / "fa_share_per_layer.png").is_file()
    assert (work / "report" / "heatmap-s0.75-consa-kv_head.png").is_file()


def test_digits_reach_the_bank_and_the_eval(finished):
    """bank_digits / digits in the config: the pretraining bank and the eval both use 3-digit keys."""
    import re

    import numpy as np

    from consa.data.tokenizer import load_tokenizer

    cfg_path, work, rc = finished
    assert rc == 0
    tok = load_tokenizer(next(p.parent for p in work.rglob("tokenizer.json")))
    bank = np.load(next(work.rglob("bank.npz")))
    offsets, toks = bank["offsets"], bank["tokens"]
    keys = [re.findall(r"pass key is (\d+)", tok.decode(toks[offsets[i]:offsets[i + 1]].tolist())) for i in range(len(offsets) - 1)]
    keys = [k for ks in keys for k in ks]
    assert keys and all(len(k) == 3 for k in keys)
    # every item's answer tokens are recorded, and the batch source marks exactly them
    from consa.data.shards import TokenShards
    from consa.data.bank import BankSource

    corpus = next(p.parent for p in work.rglob("tokenizer.json"))
    rows = BankSource(next(work.rglob("bank.npz")), TokenShards.open(corpus, "train"))(4, 128, np.random.default_rng(0))
    for ids, mask in zip(rows["input_ids"], rows["answer_mask"]):
        answer = tok.decode(ids[mask].tolist())
        assert answer.startswith(" ") and answer.strip().isdigit() and len(answer.strip()) == 3, answer
        assert tok.decode(ids.tolist()).endswith(f"The pass key is{answer}")
    log = json.loads(next(work.rglob("pretrain_log.json")).read_text())
    assert log["resolved"]["answer_weight"] == 1.0 and log["history"][-1]["answer_loss"] > 0


def test_bank_length_curriculum(finished):
    """With a curriculum the longest item drawn grows with the step, from the shortest to all of them."""
    import numpy as np

    from consa.data.shards import TokenShards
    from consa.data.bank import BankSource
    from consa.data.batches import MixedSource, corpus_source

    _, work, _ = finished
    corpus = next(p.parent for p in work.rglob("tokenizer.json"))
    shards = TokenShards.open(corpus, "train")
    bank = BankSource(next(work.rglob("bank.npz")), shards, curriculum_steps=10)
    lengths = np.diff(bank.offsets)
    assert len(set(lengths.tolist())) > 2  # the CI bank has items of several lengths

    items = [bank.tokens[bank.offsets[i]: bank.offsets[i + 1]].astype(np.int64) for i in range(bank.n)]

    def drawn(step):  # lengths of the items in real rows of this step (each item ends its row)
        bank.set_step(step)
        rows = bank(60, 128, np.random.default_rng(step))["input_ids"].numpy()
        return {len(it) for row in rows for it in items if np.array_equal(row[-len(it):], it)}

    assert drawn(0) == {int(lengths.min())}
    assert max(drawn(5)) < lengths.max() and len(drawn(5)) >= 1
    assert drawn(10) == set(lengths.tolist()) == drawn(50)
    # MixedSource passes the step on, and a bank without a curriculum ignores it
    mix = MixedSource(corpus_source(shards), bank, 0.5)
    mix.set_step(0)
    assert bank.step == 0 and bank.available() == int((lengths == lengths.min()).sum())
    plain = BankSource(next(work.rglob("bank.npz")), shards)
    plain.set_step(0)
    assert plain.available() == plain.n
    evals = list(work.rglob("eval.json"))
    assert evals and all(json.loads(p.read_text())["config"]["digits"] == 3 for p in evals)


def test_finished_stages_are_skipped(finished, capsys):
    cfg_path, work, _ = finished
    before = json.loads((work / "stages.json").read_text())
    mtime = (work / "alloc" / "s0.5" / "consa-kv_head.json").stat().st_mtime
    assert main(["experiment", "search", "--config", str(cfg_path), "--workdir", str(work)]) == 0
    assert "already done" in capsys.readouterr().out
    assert (work / "alloc" / "s0.5" / "consa-kv_head.json").stat().st_mtime == mtime
    assert json.loads((work / "stages.json").read_text())["search"] == before["search"]


def test_report_rebuilds_from_disk_and_a_missing_allocation_is_redone(finished):
    cfg_path, work, _ = finished
    cfg = ExperimentConfig.load(cfg_path)
    (work / "alloc" / "s0.75" / "fa_top-layer.json").unlink()
    rec = run_stage("search", cfg, work, force=True)
    assert rec["done"] and (work / "alloc" / "s0.75" / "fa_top-layer.json").is_file()
    assert run_stage("report", cfg, work, force=True)["done"]


def test_missing_prerequisite_is_one_clear_error(finished, tmp_path, capsys):
    cfg_path, _, _ = finished
    empty = tmp_path / "empty"
    with pytest.raises(ConsaError, match=r"stage 'search' needs the base model .* run `consa experiment pretrain"):
        run_stage("search", ExperimentConfig.load(cfg_path), empty)
    assert main(["experiment", "eval", "--config", str(cfg_path), "--workdir", str(empty)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("consa: error: stage 'eval' needs the allocations")
    assert not (empty / "eval").exists()


def test_bad_config_is_rejected(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text(json.dumps({"name": "x", "search": {"sparsities": [1.5]}}))
    with pytest.raises(ConsaError, match="sparsities"):
        ExperimentConfig.load(p)
    p.write_text(json.dumps({"name": "x", "search": {"until_agreement": 2}}))
    with pytest.raises(ConsaError, match="until_agreement"):
        ExperimentConfig.load(p)
    p.write_text(json.dumps({"name": "x", "searchh": {}}))
    with pytest.raises(ConsaError, match="unknown experiment config keys: searchh"):
        ExperimentConfig.load(p)
    with pytest.raises(ConsaError, match="not found"):
        ExperimentConfig.load(tmp_path / "nope.json")


def test_experiment_configs_in_the_repo_load():
    root = Path(__file__).resolve().parents[1] / "experiments"
    for p in sorted(root.glob("*.json")):
        cfg = ExperimentConfig.load(p)
        assert cfg.W == cfg.context // 16
    assert run_all  # imported API
    assert Workdir


def test_pretrain_source_mixes_corpus_bank_and_dense_rows(finished):
    """dense_mix of the rows are dense recall rows, retrieval_mix of the rest bank items, each with its answers marked."""
    import numpy as np

    from consa.data.tokenizer import load_tokenizer
    from consa.experiment.batches import pretrain_source

    cfg_path, work, _ = finished
    d = json.loads(cfg_path.read_text())
    d["pretrain"].update(dense_mix=0.5, dense_pairs=2, dense_queries=1)
    cfg = ExperimentConfig.from_dict(d)
    cfg.data.corpus = str(next(p.parent for p in work.rglob("tokenizer.json")))
    wd = Workdir(work, cfg)
    tok = load_tokenizer(cfg.data.corpus)
    kinds = {"dense": 0, "bank": 0, "corpus": 0}
    for step in range(6):
        batch = pretrain_source(wd, 3)(8, 128, np.random.default_rng(step))
        for ids, mask in zip(batch["input_ids"], batch["answer_mask"]):
            text, answer = tok.decode(ids.tolist()), tok.decode(ids[mask].tolist())
            if "pass key" in text and mask.any():
                kinds["bank"] += 1
                assert text.endswith(f"The pass key is{answer}")
            elif mask.any():
                kinds["dense"] += 1
                assert answer.strip().isdigit() and len(answer.strip()) == 3  # bank_digits
            else:
                kinds["corpus"] += 1
    assert kinds["dense"] >= 12 and kinds["bank"] >= 3 and kinds["corpus"] >= 3, kinds
    with pytest.raises(ConsaError, match="dense_queries"):
        ExperimentConfig.from_dict({**d, "pretrain": {**d["pretrain"], "dense_queries": 3}})


def test_pretrain_stage_is_done_only_at_stop_at(finished, tmp_path):
    """pretrain.stop_at pins the base model's step (another seed's time-limited run): a time limit that comes
    first leaves the stage partial (exit 3), and the next call continues from the checkpoint until stop_at."""
    cfg_path, work, rc = finished
    d = json.loads(cfg_path.read_text())
    d["data"] = {"corpus": str(work / "corpus")}
    d["pretrain"] = {**d["pretrain"], "steps": 4, "stop_at": 3, "time_limit": 1e-9}  # one step per call
    cfg = tmp_path / "stop.json"
    cfg.write_text(json.dumps(d))
    w = tmp_path / "w"
    argv = ["experiment", "pretrain", "--config", str(cfg), "--workdir", str(w)]
    steps = []
    for _ in range(3):
        rc = main(argv)
        steps.append((rc, json.loads((w / "base" / "checkpoint" / "state.json").read_text())["step"]))
    assert steps == [(3, 1), (3, 2), (0, 3)]
    rec = json.loads((w / "stages.json").read_text())["pretrain"]
    assert rec["done"] and rec["steps"] == 3 and rec["finished"] is False
    assert main(argv) == 0 and json.loads((w / "base" / "checkpoint" / "state.json").read_text())["step"] == 3  # done: skipped


def test_base_from_runs_a_variant_on_the_same_base_model(finished, tmp_path, capsys):
    """--base-from: a search/eval variant adopts another workdir's base model and bank instead of pretraining."""
    from consa.allocation import Allocation

    cfg_path, work, _ = finished
    d = json.loads(cfg_path.read_text())
    d["name"] = "ci-variant"
    d["search"].update(sparsities=[0.5], methods=["attn_mass-kv_head", "fa_top-layer"])
    var = tmp_path / "variant.json"
    var.write_text(json.dumps(d))
    w2 = tmp_path / "w2"
    argv = ["experiment", "all", "--config", str(var), "--workdir", str(w2), "--base-from", str(work)]
    assert main(argv) == 0
    pre = json.loads((w2 / "stages.json").read_text())["pretrain"]
    assert pre["adopted_from"] == str(work.resolve())
    assert Path(pre["model"]) == Path(json.loads((work / "stages.json").read_text())["pretrain"]["model"]).resolve()
    assert Path(pre["bank_file"]) == (work / "bank.npz").resolve()
    assert not (w2 / "base").exists() and not (w2 / "bank.npz").exists()
    # the attention-mass score reads the model and bank rows: same base + same bank -> same allocation
    a1 = Allocation.load(work / "alloc" / "s0.5" / "attn_mass-kv_head.json")
    a2 = Allocation.load(w2 / "alloc" / "s0.5" / "attn_mass-kv_head.json")
    assert a1.fa == a2.fa
    assert "`--base-from`" in (w2 / "report" / "results.md").read_text()
    assert main(argv) == 0  # a rerun with the same source is a no-op, not an error
    capsys.readouterr()
    # bad sources: one clear line each, and nothing written
    empty = tmp_path / "empty"
    empty.mkdir()
    fresh = tmp_path / "fresh"
    own = tmp_path / "own"  # a workdir with a base model of its own
    own.mkdir()
    (own / "stages.json").write_text(json.dumps({"pretrain": {"done": True, "model": str(tmp_path / "elsewhere")}}))
    cases = [(["--workdir", str(fresh), "--base-from", str(empty)], "no stages.json there"),
             (["--workdir", str(w2), "--base-from", str(w2)], "names the workdir itself"),
             (["--workdir", str(own), "--base-from", str(w2)], "already has its own pretrain stage")]
    for extra, msg in cases:
        assert main(["experiment", "search", "--config", str(var), *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and msg in err[0], err
    assert not fresh.exists()
    d["pretrain"]["preset"] = "small-gpu"
    var.write_text(json.dumps(d))
    assert main(["experiment", "search", "--config", str(var), "--workdir", str(fresh), "--base-from", str(work)]) == 2
    assert "does not have the shape of preset 'small-gpu'" in capsys.readouterr().err
    assert not fresh.exists()
    # an adopted workdir never pretrains into itself
    with pytest.raises(ConsaError, match="uses the base model of"):
        run_stage("pretrain", ExperimentConfig.load(cfg_path), w2, force=True)


def test_search_batches_mark_the_answers_of_retrieval_rows(finished):
    """search_batch_fn's answer_mask (for search.answer_weight): the bank rows' answers, nothing in corpus rows."""
    from consa.data.shards import TokenShards
    from consa.data.bank import BankSource
    from consa.experiment.batches import search_batch_fn

    cfg_path, work, _ = finished
    shards = TokenShards.open(work / "corpus", "train")
    bank = BankSource(work / "bank.npz", shards)
    batch = search_batch_fn(shards, bank, 4, 128, 0.5, 0)(3)
    answers = batch["answer_mask"]
    assert answers.shape == batch["input_ids"].shape and answers.dtype == torch.bool
    assert not answers[:2].any()  # corpus windows first
    for row in answers[2:]:  # each retrieval row: its answer, the row's last tokens
        n = int(row.sum())
        assert n >= 1 and row[-n:].all()


def test_budget_stage_compares_methods_at_equal_measured_kv_bytes(finished, tmp_path):
    """The budget stage (issue 16): every method's allocation holds at most the budget, the bytes the
    cache really holds equal what the allocation says, and the report has the equal-bytes table."""
    from consa.allocation import Allocation
    from consa.experiment.config import BUDGET_METHODS
    from consa.experiment.stages.budget import budget_rows

    cfg_path, work, _ = finished
    d = json.loads(cfg_path.read_text())
    d["name"] = "ci-budget"
    d["search"].update(sparsities=[0.5], methods=["fa_top-layer"])
    d["budget"] = {"kv_budgets": [0.5, 0.3], "spans": "4,8,16,full", "methods": list(BUDGET_METHODS), "steps": 3,
                   "profile_batches": 1, "decode_tokens": 2}
    var = tmp_path / "budget.json"
    var.write_text(json.dumps(d))
    w2 = tmp_path / "w2"
    assert main(["experiment", "all", "--config", str(var), "--workdir", str(w2), "--base-from", str(work)]) == 0
    cfg = ExperimentConfig.load(var)
    rows = budget_rows(Workdir(w2, cfg))
    assert len(rows) == 2 * len(BUDGET_METHODS)
    for r in rows:
        assert r["kv_share_measured"] <= r["kv_budget"] + 1e-9, r
        assert r["kv_share_measured"] == pytest.approx(r["kv_share_computed"], abs=1e-12), r
        assert r["long_ratio"] is not None and r["prefill_s"] > 0
    spans = Allocation.load(w2 / "alloc" / "b0.3" / "consa_spans-kv_head.json")
    assert set(spans.spans()) <= {4, 8, 16}
    single = Allocation.load(w2 / "alloc" / "b0.3" / "consa-kv_head.json")
    assert single.spans() == [cfg.W]
    md = (w2 / "report" / "results.md").read_text()
    assert "Equal KV bytes" in md and "consa_spans-kv_head" in md and "heatmap-b0.3-consa_spans-kv_head.png" in md
    # the eval split is W for every row, whatever the spans: the long-range PPL of uniform spans is not on its own split
    ev = json.loads((w2 / "eval" / "b0.3" / "uniform-kv_head" / "eval.json").read_text())
    assert ev["config"]["window"] == cfg.W
    # `consa report` over budget runs: spans and the KV share each row holds at the run's longest context
    out = tmp_path / "cmp"
    runs = [str(w2 / "eval" / "b0.3" / m) for m in ("consa_spans-kv_head", "uniform-kv_head")]
    assert main(["report", *runs, "--out", str(out)]) == 0
    table = next(p for p in out.iterdir() if p.suffix == ".md").read_text()
    assert "KV share" in table and f"| {spans.kv_share(128):.3f} |" in table
    if len(spans.spans()) > 1:
        assert ",".join(map(str, spans.spans())) in table
    bad = dict(d, budget={**d["budget"], "methods": ["nope-kv_head"]})
    var.write_text(json.dumps(bad))
    with pytest.raises(ConsaError, match="unknown budget methods"):
        ExperimentConfig.load(var)


def test_consa_refined_is_the_same_search_refined_beside_its_plain_cut(finished, tmp_path):
    """consa_refined-kv_head reads the gates of the consa-kv_head search (no second search), refines that cut
    on held-out KL, and is its own row; consa-kv_head then keeps the plain top-k cut. Rebuilt from the gates
    file alone it is the same allocation; compare pairs it with the plain cut seed by seed."""
    from safetensors.torch import load_file

    from consa.allocation import Allocation
    from consa.gates import topk_swa

    cfg_path, work, _ = finished
    d = json.loads(cfg_path.read_text())
    d.update(name="ci-refined", data={"corpus": str(work / "corpus")})
    d["search"].update(sparsities=[0.5], methods=["consa_refined-kv_head", "consa-kv_head", "fa_top-layer"],
                       search_seeds=[0, 1], refine_evals=8, refine_order="measured")
    var = tmp_path / "refined.json"
    var.write_text(json.dumps(d))
    w = tmp_path / "w"
    assert main(["experiment", "pretrain", "--config", str(var), "--workdir", str(w), "--base-from", str(work)]) == 0
    assert main(["experiment", "all", "--config", str(var), "--workdir", str(w)]) == 0
    a = w / "alloc" / "s0.5"
    for s in (0, 1):
        plain, refined = (json.loads((a / f"{m}-kv_head-seed{s}.meta.json").read_text()) for m in ("consa", "consa_refined"))
        assert plain["refine"] is None and refined["method"] == "consa_refined"
        ref = refined["refine"]
        assert 1 <= ref["evals"] <= 8 and ref["kl_after"] <= ref["kl_before"]
        assert refined["tokens_after_base"] == plain["tokens_after_base"] > 0 and refined["seconds"] >= plain["seconds"]
        log_alpha = load_file(str(w / "search" / f"s0.5-kv_head-seed{s}" / "gates.safetensors"))["log_alpha"]
        bits = topk_swa(log_alpha, plain["swa_units"])
        flat = lambda al: [bool(b) for row in al.fa for b in row]  # noqa: E731
        assert flat(Allocation.load(a / f"consa-kv_head-seed{s}.json")) == bits
        for up, down, _kl in ref["swaps"]:
            bits[up], bits[down] = False, True
        assert flat(Allocation.load(a / f"consa_refined-kv_head-seed{s}.json")) == bits
    # from the gates file alone (a later call, or the method added after the search): the same allocation
    first = Allocation.load(a / "consa_refined-kv_head-seed1.json").fa
    for f in (a / "consa_refined-kv_head-seed1.json", a / "consa_refined-kv_head-seed1.meta.json"):
        f.unlink()
    assert run_stage("search", ExperimentConfig.load(var), w, force=True)["done"]
    assert Allocation.load(a / "consa_refined-kv_head-seed1.json").fa == first
    rows = json.loads((w / "report" / "results.json").read_text())["tables"]["s0.5"]["rows"]
    assert "consa_refined-kv_head (mean of 2 seeds)" in rows
    md = (w / "report" / "results.md").read_text()
    for s in (0, 1):  # each seed's refinement evidence, in the structure table of the report
        ref = json.loads((a / f"consa_refined-kv_head-seed{s}.meta.json").read_text())["refine"]
        assert f"{ref['kl_before']:.4f} → {ref['kl_after']:.4f}, {len(ref['swaps'])} swaps in {ref['evals']} evals" in md
    out = tmp_path / "cmp"
    assert main(["compare", str(w), "--out", str(out)]) == 0
    pair = [c for c in json.loads((out / "compare.json").read_text())["claims"]
            if (c["a"], c["b"]) == ("consa_refined-kv_head", "consa-kv_head")]
    assert pair and pair[0]["paired_runs"] == 2 and 0 <= pair[0]["paired_a_lower"] <= 2
    # it refines a search of the same config: listed alone it is refused
    d["search"]["methods"] = ["consa_refined-kv_head", "fa_top-layer"]
    var.write_text(json.dumps(d))
    with pytest.raises(ConsaError, match="list that method too"):
        ExperimentConfig.load(var)


def test_search_seeds_repeat_the_learned_searches_and_compare_pools_workdirs(finished, tmp_path, capsys):
    """search.search_seeds [0, 1]: ConSA and Duo-style search once per seed (stems <method>-seed<s>; seed 0
    is the unseeded search, the same allocation), rules once; the report gives mean ± sd over the seeds;
    a time budget leaves the searches (not the rules) for the next call; ``consa compare`` pools workdirs
    into mean ± sd over every run and judges claims against the spread."""
    import time

    import numpy as np

    from consa.allocation import Allocation

    cfg_path, work, _ = finished
    d = json.loads(cfg_path.read_text())
    d.update(name="ci-seeds", data={"corpus": str(work / "corpus")})
    d["search"].update(sparsities=[0.5], methods=["consa-kv_head", "duo-kv_head", "fa_top-layer"], search_seeds=[0, 1])
    var = tmp_path / "seeds.json"
    var.write_text(json.dumps(d))
    cfg = ExperimentConfig.load(var)
    w2 = tmp_path / "w2"
    assert main(["experiment", "pretrain", "--config", str(var), "--workdir", str(w2), "--base-from", str(work)]) == 0
    late = run_stage("search", cfg, w2, deadline=time.time() - 1)
    assert not late["done"] and "4 searches left" in late["note"]
    assert sorted(p.name for p in (w2 / "alloc" / "s0.5").glob("*.json") if not p.name.endswith(".meta.json")) == \
        ["fa_top-layer.json"]
    assert main(["experiment", "all", "--config", str(var), "--workdir", str(w2)]) == 0
    stems = sorted(p.name[:-5] for p in (w2 / "alloc" / "s0.5").glob("*.json") if not p.name.endswith(".meta.json"))
    assert stems == ["consa-kv_head-seed0", "consa-kv_head-seed1", "duo-kv_head-seed0", "duo-kv_head-seed1", "fa_top-layer"]
    # seed 0 is the unseeded search of the same base and settings; seed 1 has its own seed and run directory
    assert Allocation.load(w2 / "alloc" / "s0.5" / "consa-kv_head-seed0.json").fa == \
        Allocation.load(work / "alloc" / "s0.5" / "consa-kv_head.json").fa
    assert json.loads((w2 / "search" / "s0.5-kv_head-seed1" / "search.json").read_text())["config"]["seed"] == 1000
    res = json.loads((w2 / "report" / "results.json").read_text())
    rows = res["tables"]["s0.5"]["rows"]
    agg = rows["consa-kv_head (mean of 2 seeds)"]
    per = [json.loads((w2 / "eval" / "s0.5" / f"consa-kv_head-seed{s}" / "eval.json").read_text()) for s in (0, 1)]
    full = json.loads((w2 / "eval" / "full" / "eval.json").read_text())["quality"]["long"]["ppl"]
    ratios = [p["quality"]["long"]["ppl"] / full for p in per]
    assert agg["long_ppl_ratio"] == pytest.approx(np.mean(ratios)) and agg["long_ppl_ratio_sd"] == pytest.approx(np.std(ratios, ddof=1))
    assert "consa-kv_head (mean of 2 seeds)" in (w2 / "report" / "results.md").read_text()
    assert json.loads((w2 / "experiment.json").read_text())["search"]["search_seeds"] == [0, 1]

    # compare: the unseeded workdir and the seeded one, pooled (consa-kv_head: 1 + 2 runs at t = 0.5)
    out = tmp_path / "cmp"
    assert main(["compare", str(work), str(w2), "--out", str(out)]) == 0
    data = json.loads((out / "compare.json").read_text())
    rec = data["pooled"]["0.5"]["consa-kv_head"]
    base0 = json.loads((work / "eval" / "full" / "eval.json").read_text())["quality"]["long"]["ppl"]
    r0 = json.loads((work / "eval" / "s0.5" / "consa-kv_head" / "eval.json").read_text())["quality"]["long"]["ppl"] / base0
    allv = [r0, *ratios]
    assert rec["n"] == 3 and rec["long"] == pytest.approx(np.mean(allv)) and rec["long_sd"] == pytest.approx(np.std(allv, ddof=1))
    assert rec["long_per_base"] == pytest.approx([r0, np.mean(ratios)])
    assert data["pooled"]["0.5"]["interleaved-kv_head"]["n"] == 1  # only in the first workdir
    for c in data["claims"]:
        if c["spread"] is not None:
            assert c["holds"] == (abs(c["b_long"] - c["a_long"]) > c["spread"])
    duo = [c for c in data["claims"] if (c["a"], c["b"]) == ("consa-kv_head", "duo-kv_head")]
    assert duo and duo[0]["spread"] == pytest.approx(rec["long_sd"] + data["pooled"]["0.5"]["duo-kv_head"]["long_sd"])
    assert (out / "structure.png").stat().st_size > 0 and "## Claims" in (out / "compare.md").read_text()
    capsys.readouterr()
    # bad input: one line, nothing written
    bad = tmp_path / "cmp-bad"
    assert main(["compare", str(tmp_path / "nowhere"), "--out", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "experiment.json not found" in err[0] and not bad.exists()
    with pytest.raises(ConsaError, match="search_seeds"):
        ExperimentConfig.from_dict({**d, "search": {**d["search"], "search_seeds": [1, 1]}})


def test_device_session_script_packs_the_workdir_without_weights(finished, tmp_path):
    """experiments/device-session.sh (the chained GPU calls of a session): on a finished workdir `all` only
    reports, then packs what the device must bring back into one .tgz, less weights, bank and corpus."""
    import os
    import subprocess
    import sys
    import tarfile

    cfg_path, work, rc = finished
    assert rc == 0
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "WORK": str(work), "OUT": str(tmp_path / "out"),
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    r = subprocess.run(["bash", "experiments/device-session.sh", "all", str(cfg_path)], cwd=root, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    packs = list((tmp_path / "out").glob("ci-all-*.tgz"))
    assert len(packs) == 1
    names = tarfile.open(packs[0]).getnames()
    assert {"./report/results.md", "./experiment.json", "./stages.json"} <= set(names)
    assert any(n.startswith("./search/") and n.endswith("search.json") for n in names)
    assert not any(n.endswith(("model.safetensors", "optimizer.safetensors")) or n.startswith(("./corpus/", "./.consa-cache/"))
                   for n in names)
    # `conv`: the convergence benchmark on the same base, packed alike
    conv_env = {**env, "OUT": str(tmp_path / "out2"), "CONV_ARGS": "--sparsity 0.5 --seeds 0 --steps 2 --variants default,v0 --no-baselines"}
    r = subprocess.run(["bash", "experiments/device-session.sh", "conv", str(cfg_path)], cwd=root, env=conv_env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    (pack,) = list((tmp_path / "out2").glob("ci-conv-*.tgz"))
    with tarfile.open(pack) as tf:
        (conv,) = [n for n in tf.getnames() if n.startswith("./conv/conv-") and n.count("/") == 2 and n.endswith(".json")]
        runs = json.load(tf.extractfile(conv))["runs"]
    assert sorted(r["method"] for r in runs) == ["consa:default", "consa:v0"] and all(r["steps"] == 2 for r in runs)
    bad = subprocess.run(["bash", "experiments/device-session.sh", "bogus", str(cfg_path)], cwd=root, env=env,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unknown stage" in bad.stderr


def test_compare_shows_claim_differences_the_rounded_means_hide():
    """A claim can hold at a difference below 0.0005 (run 10: refined vs Duo-style at t = 0.75, +0.0003 over a
    spread of 0.0003); at 3 decimals the table said '+0.000 | 0.000 | yes', which reads as a bug."""
    from consa.experiment.compare import format_compare
    c = {"sparsity": 0.75, "a": "consa_refined-kv_head", "b": "duo-kv_head", "b_is_best_rule": False,
         "a_long": 1.02190, "b_long": 1.02221, "difference": 0.00031, "spread": 0.00027, "holds": True,
         "winner": "consa_refined-kv_head", "paired_runs": 3, "paired_a_lower": 2}
    md = format_compare([{"root": "w", "seed": 0}], {}, [c])
    row = next(line for line in md.splitlines() if line.startswith("| 0.75 | consa_refined"))
    assert "| +0.0003 | 0.0003 |" in row and "**yes**" in row and "2/3" in row


def _experiment_imports(text: str, module: str) -> list[tuple[str, str]]:
    """(imported consa.experiment module, imported name) of every ``from ... import`` in a file's text."""
    import ast

    out = []
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.ImportFrom):
            base = module.split(".")[: len(module.split(".")) - node.level] if node.level else []
            mod = ".".join(base + ([node.module] if node.module else []))
            if mod.startswith("consa.experiment"):
                out += [(mod, a.name) for a in node.names]
    return out


def _experiment_rule_breaks(files: dict[str, str]) -> list[str]:
    """A stage importing another stage, or a private name imported from another file of the package."""
    bad = []
    for module, text in files.items():
        for mod, name in _experiment_imports(text, module):
            target = f"{mod}.{name}" if f"{mod}.{name}" in files else mod
            if name.startswith("_"):
                bad.append(f"{module} imports the private {mod}.{name}")
            if ".stages." in module and target.startswith("consa.experiment.stages.") and target != module:
                bad.append(f"{module} imports the stage {target}")
    return bad


def test_the_driver_package_has_no_stage_to_stage_and_no_private_imports():
    src = Path(__file__).resolve().parents[1] / "src"
    files = {".".join(p.relative_to(src).with_suffix("").parts): p.read_text()
             for p in sorted((src / "consa" / "experiment").rglob("*.py"))}
    assert "consa.experiment.stages.search" in files and len(files) >= 12
    assert _experiment_rule_breaks(files) == []
    # the check can fail: a planted stage-to-stage import and a planted private import
    planted = {**files, "consa.experiment.stages.heal": files["consa.experiment.stages.heal"]
               + "\nfrom .search import run as search_run\nfrom ..workdir import _hidden\n"}
    assert _experiment_rule_breaks(planted) == [
        "consa.experiment.stages.heal imports the stage consa.experiment.stages.search",
        "consa.experiment.stages.heal imports the private consa.experiment.workdir._hidden"]
