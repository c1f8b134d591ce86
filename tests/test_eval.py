"""consa eval: range perplexity against a hand computation, scoring on models of known behaviour,
calibration logic, and the CLI end to end on a tiny saved model."""

from __future__ import annotations

import dataclasses
import json
import random
import sys
import types
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import consa
from consa import Allocation, apply_allocation, model_shape
from consa.data.tasks import TaskItem
from consa.errors import ConsaError
from consa.eval import calibration as calib
from consa.eval.quality import chunk_documents, perplexity
from consa.eval.retrieval import build_items, default_score, extract_prediction, greedy_generate_ids, model_generate_fn, run_grid
from consa.eval.runner import EvalConfig, evaluate
from consa.tiny import tiny_model


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run fastest single-threaded, above all on a busy 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---- fakes ------------------------------------------------------------------------------------------
Item = TaskItem  # the real item type; fakes below only replace the model


FILLER = "the quick brown fox jumps over a lazy dog while "


def fake_make_items(task, tokenizer, length, depth, n, seed, haystack=None):
    """Needle ``K=<5 distinct digits>.`` at ``depth`` in letter filler; the prompt ends with ``K=``.
    One character is one token for the char tokenizer below."""
    rng = random.Random(seed)
    items = []
    for _ in range(n):
        answer = "".join(rng.sample("0123456789", 5))
        needle = f" K={answer}. "
        body = (FILLER * (length // len(FILLER) + 2))[: max(0, length - len(needle) - 3)]
        pos = int(round(depth * len(body)))
        prompt = body[:pos] + needle + body[pos:] + " K="
        items.append(Item(task, prompt, answer, depth, length, len(prompt), seed))
    return items


class CharTokenizer:
    """pad 0, eos 1, one id per character."""

    pad_token_id, eos_token_id, unk_token_id = 0, 1, None
    chars = sorted(set(FILLER + " K=.0123456789\nxyz"))

    def __init__(self):
        self.ids = {c: i + 2 for i, c in enumerate(self.chars)}
        self.vocab_size = len(self.chars) + 2

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [self.ids[c] for c in text]}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.chars[i - 2] for i in ids if i >= 2)


class CopyModel(torch.nn.Module):
    """Induction copier: next token = the token that followed the first earlier occurrence of the
    current last token, looking back at most ``reach`` tokens (None: everything). Keeps its history
    in ``past_key_values`` and drops left padding through ``attention_mask``, like a real cache."""

    def __init__(self, vocab: int, eos: int, reach: int | None = None):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.vocab, self.eos, self.reach = vocab, eos, reach
        self.batch_shapes = []

    def forward(self, input_ids, attention_mask, position_ids=None, past_key_values=None, use_cache=True, logits_to_keep=0, **kw):
        hist = input_ids if past_key_values is None else torch.cat([past_key_values, input_ids], 1)
        assert hist.shape == attention_mask.shape
        if past_key_values is None:
            self.batch_shapes.append(tuple(input_ids.shape))
            # positions must count real tokens only (left padding)
            assert torch.equal(position_ids, (attention_mask.cumsum(-1) - 1).clamp(min=0))
        logits = torch.full((hist.shape[0], 1, self.vocab), -1e4)
        for r in range(hist.shape[0]):
            seq = hist[r][attention_mask[r].bool()].tolist()
            last, nxt = seq[-1], self.eos
            lo = 0 if self.reach is None else max(0, len(seq) - 1 - self.reach)
            for j in range(lo, len(seq) - 1):
                if seq[j] == last:
                    nxt = seq[j + 1]
                    break
            logits[r, 0, nxt] = 0.0
        return SimpleNamespace(logits=logits, past_key_values=hist)


# ---- perplexity -------------------------------------------------------------------------------------
def test_range_perplexity_equals_hand_computation():
    model = tiny_model("qwen3", num_layers=2)
    shape = model_shape(model)
    alloc = Allocation.from_units([True, False, False, True], "kv_head", shape, window=4)
    apply_allocation(model, alloc)
    W, T = 4, 23
    gen = torch.Generator().manual_seed(0)
    seqs = [torch.randint(3, 101, (T,), generator=gen).numpy() for _ in range(3)]
    got = perplexity(model, seqs, W, batch_size=2)  # batches of 2 and 1

    per = {"overall": [], "short": [], "long": []}
    with torch.no_grad():
        for s in seqs:
            ids = torch.as_tensor(s)[None]
            logp = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
            for p in range(1, T):  # token at position p predicted from positions < p
                nll = -float(logp[p - 1, int(s[p])])
                per["overall"].append(nll)
                if p <= W:
                    per["short"].append(nll)
                if p > 2 * W:
                    per["long"].append(nll)
    assert len(per["short"]) == 3 * W and len(per["long"]) == 3 * (T - 1 - 2 * W)
    for r, vals in per.items():
        assert got[r]["tokens"] == len(vals)
        assert got[r]["nll"] == pytest.approx(sum(vals) / len(vals), abs=1e-5)
        assert got[r]["ppl"] == pytest.approx(np.exp(sum(vals) / len(vals)), rel=1e-5)
    assert (got["seq_len"], got["sequences"], got["window"]) == (T, 3, W)


def test_short_range_is_blind_to_the_window_long_range_is_not():
    """Positions <= W see their whole prefix through a window: all-SWA and full agree exactly there."""
    model = tiny_model("llama", num_layers=3)
    shape = model_shape(model)
    seqs = [np.random.default_rng(i).integers(3, 101, 40) for i in range(2)]
    res = {}
    for fa in (True, False):
        apply_allocation(model, Allocation.uniform(fa, "layer", shape, window=5))
        res[fa] = perplexity(model, seqs, 5)
    assert res[True]["short"]["nll"] == pytest.approx(res[False]["short"]["nll"], abs=1e-5)
    assert abs(res[True]["long"]["nll"] - res[False]["long"]["nll"]) > 1e-3


def test_chunk_documents_skips_short_and_caps():
    docs = [np.arange(5), np.arange(25), np.arange(100, 112)]
    out = chunk_documents(docs, 10, max_sequences=10, max_chunks_per_doc=2)
    assert [list(x[:2]) for x in out] == [[0, 1], [10, 11], [100, 101]]
    assert len(chunk_documents(docs, 10, max_sequences=1)) == 1
    with pytest.raises(ConsaError):
        perplexity(tiny_model(), [np.arange(1)], 4)


# ---- scoring ----------------------------------------------------------------------------------------
def test_extract_prediction():
    assert extract_prediction(" 73915. And then", "73915") == "73915"
    assert extract_prediction("73915\nmore", "73915") == "73915"
    assert extract_prediction("\n\n 73915)", "73915") == "73915"
    assert extract_prediction("739150", "73915") == "739150"
    assert extract_prediction(" 'abc'.", "'abc'") == "'abc'."
    assert extract_prediction(" red apple pie", "red apple") == "red apple"


def _cells(lengths=(60, 200), depths=(0.1, 0.9), n=3):
    tok = CharTokenizer()
    return tok, build_items(tok, ["passkey"], lengths, depths, n, seed=0, make_items=fake_make_items)


def test_scoring_with_fake_generators():
    tok, cells = _cells()
    answers = {it.prompt: it.answer for items in cells.values() for it in items}
    right = lambda prompts, k: [" " + answers[p] + ". trailing" for p in prompts]  # noqa: E731
    wrong = lambda prompts, k: [" " + answers[p][::-1] for p in prompts]  # noqa: E731
    half = {}

    def alternate(prompts, k):
        out = []
        for i, p in enumerate(prompts):
            out.append(answers[p] if i % 2 == 0 else "nope")
        return out

    assert run_grid(right, cells, tok, score=default_score)["passkey"]["accuracy"] == [[1.0, 1.0], [1.0, 1.0]]
    assert run_grid(wrong, cells, tok, score=default_score)["passkey"]["accuracy"] == [[0.0, 0.0], [0.0, 0.0]]
    g = run_grid(alternate, cells, tok, score=default_score)["passkey"]
    assert g["accuracy"] == [[pytest.approx(2 / 3)] * 2] * 2
    assert g["lengths"] == [60, 200] and g["depths"] == [0.1, 0.9] and g["items"] == 3
    assert half == {}


def test_scoring_with_copy_model_through_batched_left_padding():
    """A model that copies the value after ``K=`` scores 1; the same copier limited to a 20-token
    reach never sees the needle at length 200 and scores 0 there; items of unequal length share a
    left-padded batch."""
    tok = CharTokenizer()
    cells = build_items(tok, ["passkey"], (60, 200), (0.1, 0.5), 3, seed=1, make_items=fake_make_items)
    # unequal lengths inside one cell: trim some prompts' filler
    for items in cells.values():
        items[1].prompt = items[1].prompt[3:]
    full = CopyModel(tok.vocab_size, tok.eos_token_id)
    g = run_grid(model_generate_fn(full, tok, batch_size=2), cells, tok, score=default_score)["passkey"]
    assert g["accuracy"] == [[1.0, 1.0], [1.0, 1.0]]
    assert all(e["correct"] for e in g["examples"])
    assert any(b == 2 for b, _ in full.batch_shapes)
    near = CopyModel(tok.vocab_size, tok.eos_token_id, reach=20)
    g = run_grid(model_generate_fn(near, tok, batch_size=3), cells, tok, score=default_score)["passkey"]
    assert g["accuracy"] == [[0.0, 0.0], [0.0, 0.0]]


def test_greedy_left_padding_matches_unpadded_on_hybrid_model():
    model = tiny_model("qwen3")
    shape = model_shape(model)
    apply_allocation(model, Allocation.from_units([True, False] * 3, "kv_head", shape, window=4))
    a, b = list(range(3, 20)), list(range(40, 50))
    batched = greedy_generate_ids(model, [a, b], 5, pad_id=0, eos_id=None)
    alone = [greedy_generate_ids(model, [x], 5, pad_id=0, eos_id=None)[0] for x in (a, b)]
    assert batched == alone
    with torch.no_grad():  # and it is greedy: first token = argmax of the plain forward
        assert alone[0][0] == int(model(torch.tensor([a])).logits[0, -1].argmax())


def test_eval_decodes_with_the_hybrid_cache_and_matches_the_full_cache(monkeypatch):
    from consa.attention.cache import HybridCache
    from consa.eval import retrieval

    model = tiny_model("llama", num_layers=3)
    apply_allocation(model, Allocation.from_units([True, False] * 3, "kv_head", model_shape(model), window=4))
    prompts = [list(range(3, 20)), list(range(40, 47))]  # longer and shorter than W
    made = []
    real = retrieval._hybrid_cache
    monkeypatch.setattr(retrieval, "_hybrid_cache", lambda m: made.append(real(m)) or made[-1])
    hybrid = greedy_generate_ids(model, prompts, 6, pad_id=0, eos_id=None)
    assert isinstance(made[0], HybridCache) and made[0].get_seq_length() == 17 + 6 - 1
    monkeypatch.setattr(retrieval, "_hybrid_cache", lambda m: None)  # transformers' own DynamicCache
    assert greedy_generate_ids(model, prompts, 6, pad_id=0, eos_id=None) == hybrid


# ---- calibration ------------------------------------------------------------------------------------
def _grid(acc_by_length: dict[int, list[float]]):
    lengths = sorted(acc_by_length)
    return {"lengths": lengths, "depths": [0.1, 0.9], "accuracy": [acc_by_length[x] for x in lengths], "items": 5}


def test_calibration_pass_and_fail():
    full = {"passkey": _grid({512: [1.0, 0.8], 1024: [0.8, 0.8], 2048: [0.6, 0.8], 4096: [1.0, 1.0]})}
    swa = {"passkey": _grid({512: [0.0, 0.2], 1024: [0.2, 0.2], 2048: [0.0, 0.0], 4096: [0.4, 0.2]})}
    c = calib.calibrate(full, swa)
    rows = {r["length"]: r for r in c["passkey"]}
    assert rows[512]["pass"] and rows[1024]["pass"]  # boundaries 0.8 / 0.2 count
    assert not rows[2048]["pass"] and "full attention 0.70 < 0.8" in rows[2048]["reason"]
    assert not rows[4096]["pass"] and "all-SWA 0.30 > 0.2" in rows[4096]["reason"]
    assert calib.passing_lengths(c, "passkey") == [512, 1024]
    model = {"passkey": _grid({512: [0.5, 0.5], 1024: [1.0, 0.0], 2048: [1.0, 1.0], 4096: [1.0, 1.0]})}
    rep = calib.reported_grid(model, c)["passkey"]
    assert rep["calibrated"] == [True, True, False, False]
    assert rep["reported"] == [[0.5, 0.5], [1.0, 0.0], [None, None], [None, None]]
    assert rep["accuracy"][2] == [1.0, 1.0]  # raw numbers kept
    assert calib.reported_mean(rep) == pytest.approx(0.5)
    text = calib.format_check(c)
    assert "| passkey | 2048 | 0.70 | 0.00 | no (full attention 0.70 < 0.8) |" in text
    assert "| passkey | 512 | 0.90 | 0.10 | yes |" in text


def test_calibration_fails_when_a_side_is_missing_and_without_check_reports_all():
    full = {"passkey": _grid({512: [1.0, 1.0]})}
    swa = {"passkey": _grid({1024: [0.0, 0.0]})}
    c = calib.calibrate(full, swa)
    assert [r["pass"] for r in c["passkey"]] == [False, False]
    rep = calib.reported_grid(full, None)["passkey"]
    assert rep["reported"] == rep["accuracy"] and rep["calibrated"] == [None]
    assert calib.reported_mean({"accuracy": [[None]], "reported": [[None]]}) is None


# ---- evaluate() ---------------------------------------------------------------------------------------
def _fake_tasks_module():
    mod = types.ModuleType("consa.data.tasks")
    mod.TASKS = ("passkey", "multikey", "varrecall", "mqar")
    mod.TaskItem = Item
    mod.make_items = fake_make_items
    mod.score = lambda preds, items: sum(p == it.answer for p, it in zip(preds, items)) / len(items)
    return mod


def _install(monkeypatch, mod):
    import consa.data  # the real package first (its __init__ imports the real tasks)

    monkeypatch.setitem(sys.modules, "consa.data.tasks", mod)
    monkeypatch.setattr(consa.data, "tasks", mod, raising=False)


@pytest.fixture
def fake_tasks(monkeypatch):
    """The fake items/scoring in place of consa.data.tasks (used whether or not the real one exists)."""
    mod = _fake_tasks_module()
    _install(monkeypatch, mod)
    return mod


def test_evaluate_schema_calibration_and_restores_model(fake_tasks):
    tok = CharTokenizer()
    model = tiny_model("qwen3", vocab_size=tok.vocab_size)
    impl = model.config._attn_implementation
    shape = model_shape(model)
    alloc = Allocation.from_units([True, False, False], "layer", shape, window=8, meta={"method": "rule-top"})
    docs = [np.random.default_rng(i).integers(2, tok.vocab_size, 80) for i in range(3)]
    cfg = EvalConfig(tasks=("passkey",), lengths=(40,), depths=(0.5,), items=2, ppl_length=40, progress=False)
    logs = []
    r = evaluate(model, tok, alloc, cfg, documents=docs, log=logs.append)
    assert r["format"] == "consa.eval" and r["label"] == "rule-top"
    assert r["window"] == 8 and r["allocation"]["fa"] == [[1, 1], [0, 0], [0, 0]]
    assert r["allocation_stats"]["fa_share_per_layer"] == [1.0, 0.0, 0.0]
    assert r["quality"]["sequences"] == 6 and r["quality"]["long"]["tokens"] == 6 * (39 - 16)
    assert set(r["baselines"]) == {"fingerprint", "full", "all_swa"}
    assert r["calibration"]["passkey"][0]["length"] == 40
    assert "Calibration" in logs[0]
    g = r["retrieval"]["passkey"]
    assert g["calibrated"] == [r["calibration"]["passkey"][0]["pass"]]
    s = r["summary"]
    assert s["full_long_nll"] == r["baselines"]["full"]["quality"]["long"]["nll"]
    assert s["delta_long_nll"] == pytest.approx(s["long_nll"] - s["full_long_nll"])
    json.dumps(r)  # serialisable
    assert model.config._attn_implementation == impl
    assert not any(hasattr(m, "consa_plan") for m in model.modules())
    # baselines are reused when handed back, recomputed when the settings differ
    cfg2 = EvalConfig(**{**cfg.__dict__, "window": 8})
    r2 = evaluate(model, tok, None, cfg2, documents=docs, baselines=r["baselines"], log=None)
    assert r2["quality"] == r["baselines"]["full"]["quality"] and r2["label"] == "full"
    gap = r["summary"]["all_swa_long_nll"] - r["summary"]["full_long_nll"]
    assert r2["summary"]["gap_closed_long"] == (pytest.approx(1.0) if gap > 1e-9 else None)
    assert r2["summary"]["delta_long_nll"] == 0.0
    logs.clear()
    cfg3 = EvalConfig(**{**cfg2.__dict__, "items": 1})
    r3 = evaluate(model, tok, None, cfg3, documents=docs, baselines=r["baselines"], log=logs.append)
    assert "recomputing" in logs[0] and r3["retrieval"]["passkey"]["items"] == 1
    with pytest.raises(ConsaError, match="window"):
        evaluate(model, tok, None, EvalConfig(tasks=(), progress=False), log=None)
    # items built once and handed in give the same result, and really are the items used
    from consa.eval.runner import retrieval_items

    cells, errors = retrieval_items(tok, cfg)
    r4 = evaluate(model, tok, alloc, cfg, documents=docs, log=None, items=(cells, errors))
    assert r4["retrieval"] == r["retrieval"] and r4["quality"] == r["quality"]
    other = {k: [dataclasses.replace(it, answer="zz") for it in v] for k, v in cells.items()}
    r5 = evaluate(model, tok, alloc, cfg, documents=docs, log=None, items=(other, errors), baselines=r["baselines"])
    assert [e["answer"] for e in r5["retrieval"]["passkey"]["examples"]] == ["zz"]


# ---- CLI end to end ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    from consa.data.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("m")
    texts = [FILLER * 20, "K=12345. K=67890. " * 30, "def f(x):\n    return x + 1\n" * 20] * 3
    tok = train_tokenizer(texts, 300, root / "model")
    model = tiny_model("qwen3", vocab_size=len(tok), max_position_embeddings=512)
    model.save_pretrained(root / "model")
    docs = [np.random.default_rng(i).integers(0, len(tok) - 1, 150) for i in range(2)]
    from consa.data.shards import write_split

    write_split(root / "corpus" / "validation", docs, vocab_size=len(tok), eos_id=tok.eos_token_id)
    return root, model_shape(model)


def _use_tasks(monkeypatch):
    """The real consa.data.tasks once it is built, else the fake."""
    try:
        import consa.data.tasks as real
    except ImportError:
        real = None
    if real is None or "passkey" not in getattr(real, "TASKS", ()):
        _install(monkeypatch, _fake_tasks_module())


def test_cli_eval_and_report_end_to_end(saved_model, tmp_path, monkeypatch, capsys):
    from consa.cli import main

    root, shape = saved_model
    _use_tasks(monkeypatch)
    alloc_path = tmp_path / "top.json"
    Allocation.from_units([False, False, True], "layer", shape, window=16).save(alloc_path)
    common = ["--model", str(root / "model"), "--corpus", str(root / "corpus"), "--tasks", "passkey",
              "--lengths", "256,384", "--depths", "0.5", "--items", "2", "--ppl-length", "64",
              "--ppl-sequences", "3", "--batch-size", "2", "--no-progress"]
    assert main(["eval", *common, "--window", "16", "--out", str(tmp_path / "full")]) == 0
    assert main(["eval", *common, "--allocation", str(alloc_path), "--out", str(tmp_path / "top")]) == 0
    out = capsys.readouterr().out
    assert "Calibration" in out and "| passkey | 256 |" in out
    for run, label in (("full", "full"), ("top", "top")):
        d = tmp_path / run
        r = json.loads((d / "eval.json").read_text())
        assert r["label"] == label and r["quality"]["seq_len"] == 64 and r["quality"]["long"]["tokens"] == 3 * (63 - 32)
        assert r["retrieval"]["passkey"]["lengths"] == [256, 384]
        assert (d / "retrieval_passkey.png").read_bytes()[:4] == b"\x89PNG"
        md = (d / "eval.md").read_text()
        assert "## Perplexity" in md and "## FA share per layer" in md and "### passkey" in md
    assert json.loads((tmp_path / "top" / "eval.json").read_text())["allocation_stats"]["fa_share_per_layer"] == [0.0, 0.0, 1.0]

    assert main(["report", str(tmp_path / "full"), str(tmp_path / "top"), "--out", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    assert md.count("| full |") == 1 and "| top |" in md and "| all-SWA (ref) |" in md
    assert (tmp_path / "rep" / "comparison.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_eval_errors_are_one_line_and_write_nothing(saved_model, tmp_path, monkeypatch, capsys):
    from consa.cli import main

    root, shape = saved_model
    bad = tmp_path / "bad.json"
    Allocation.uniform(True, "layer", consa.ModelShape(5, 2, 4), window=8).save(bad)
    cases = [
        (["--allocation", str(bad)], "allocation is for 5 layers"),
        (["--tasks", "none"], "--window"),
        (["--window", "8", "--corpus", str(tmp_path / "nope")], "corpus directory not found"),
        (["--window", "8", "--depths", "1.5"], "depths must lie in [0, 1]"),
    ]
    for extra, msg in cases:
        out = tmp_path / "run"
        code = main(["eval", "--model", str(root / "model"), "--no-progress", "--tasks", "none", *extra, "--out", str(out)][:])
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert code == 2, extra
        assert err.startswith("consa: error:") and msg in err, err
        assert not out.exists()
    assert main(["eval", "--model", str(tmp_path / "missing"), "--window", "8", "--out", str(tmp_path / "r")]) == 2
    assert "model directory not found" in capsys.readouterr().err


def test_digits_reach_the_generated_items():
    """--digits makes the task easier for small base models: the answers really get shorter."""
    seen = {}

    def fake_make_items(task, tokenizer, length, depth, n, seed, haystack=None, **kw):
        seen[task] = kw
        answer = "7" * kw.get("digits", 5)
        return [Item(task, "x " * length, answer, depth, length, length, seed)]

    cells = build_items(None, ["passkey"], [64], [0.5], 1, make_items=fake_make_items, digits=3)
    assert seen["passkey"] == {"digits": 3} and cells[("passkey", 64, 0.5)][0].answer == "777"
    build_items(None, ["passkey"], [64], [0.5], 1, make_items=fake_make_items)
    assert seen["passkey"] == {}
    with pytest.raises(ConsaError, match="digits"):
        EvalConfig(digits=0, window=4).validate()


def test_cli_eval_of_a_head_wise_export_defaults_to_its_stored_allocation(saved_model, tmp_path, capsys):
    """A consa export (or a heal output) is the hybrid model: with no --allocation, eval must score it as
    stored (in the export's own head order), not as full attention."""
    from consa.cli import main
    from consa.export import export, read_export
    from consa.models import load_model

    root, shape = saved_model
    alloc = Allocation.from_units([False, True, False, False, True, False], "kv_head", shape, window=16)
    export(load_model(root / "model"), alloc, tmp_path / "exp", mode="heads", source_dir=root / "model")
    stored = read_export(tmp_path / "exp")[2]
    stored.save(tmp_path / "stored.json")
    common = ["--corpus", str(root / "corpus"), "--tasks", "none", "--ppl-length", "64", "--ppl-sequences", "3",
              "--batch-size", "2", "--no-progress"]
    assert main(["eval", "--model", str(tmp_path / "exp"), *common, "--out", str(tmp_path / "default")]) == 0
    assert "evaluating its stored allocation (4/6 SWA units" in capsys.readouterr().out
    assert main(["eval", "--model", str(tmp_path / "exp"), *common, "--allocation", str(tmp_path / "stored.json"),
                 "--out", str(tmp_path / "explicit")]) == 0
    assert main(["eval", "--model", str(root / "model"), *common, "--window", "16", "--out", str(tmp_path / "full")]) == 0
    long = {r: json.loads((tmp_path / r / "eval.json").read_text())["quality"]["long"]["nll"] for r in ("default", "explicit", "full")}
    assert long["default"] == long["explicit"] != long["full"]
