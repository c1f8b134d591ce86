"""The user's own text as haystack (issue 20, item 2): loading and its errors, the task guarantees
over a user haystack, no repetition, a clear error when it is too short, and the fingerprint."""

from __future__ import annotations

import json
import re
import shutil
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from consa import Allocation, model_shape
from consa.data import make_items, train_tokenizer
from consa.data.haystack import Haystack, haystack_tokens_needed, load_haystack
from consa.errors import ConsaError
from consa.eval.retrieval import build_items
from consa.eval.runner import EvalConfig, evaluate, fingerprint, retrieval_items
from consa.tiny import tiny_model

sys.path.insert(0, str(Path(__file__).parent))
from test_data_tasks import QUESTION, _check_item  # noqa: E402  (the same checks as for the default haystack)

pytestmark = pytest.mark.usefixtures("one_thread")

WORDS = (
    "harbor lantern meadow orchard quarry saddle tower valley walrus river falcon garden island kettle the a of and "
    "to in is was for on with as by at from that this it which were their had been over under ship crew sailed "
    "morning evening wind rope deck captain coast storm calm light north south"
).split()
NEEDLE_WORDS = set("the pass key is what magic number for".split())


def prose(seed: int, paragraphs: int) -> str:
    """Random sentences over WORDS, in paragraphs: text no stdlib document contains, with no digits."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(paragraphs):
        sents = [" ".join(WORDS[int(i)] for i in rng.integers(len(WORDS), size=int(rng.integers(6, 14)))).capitalize() + "."
                 for _ in range(int(rng.integers(3, 7)))]
        out.append(" ".join(sents))
    return "\n\n".join(out)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    """A 400-token byte-level BPE that knows the prose and the needles (saved as a model directory)."""
    needles = "The pass key is. What is the pass key? The magic number for amber-badger is. " * 20
    return train_tokenizer([prose(0, 300), needles], 400, tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def hay_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("hay")
    (d / "a.txt").write_text(prose(1, 60))
    (d / "sub").mkdir()
    (d / "sub" / "b.md").write_text(prose(2, 60))
    rows = [{"text": prose(3, 30), "id": 1}, {"text": prose(4, 30)}]
    (d / "c.jsonl").write_text(json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1]) + "\n")
    (d / "skip.py").write_text("def not_prose():\n    return 1\n")
    return d


def _sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=\.)\s+", text) if s]


# ---- loading --------------------------------------------------------------------------------------
def test_load_reads_txt_md_jsonl_in_path_order_and_hashes_content(hay_dir, tmp_path):
    hay = load_haystack(hay_dir)
    assert hay.docs == (prose(1, 60), prose(3, 30), prose(4, 30), prose(2, 60))  # a.txt, c.jsonl, sub/b.md
    assert hay.info() == {"source": str(hay_dir), "sha256": hay.sha256, "documents": 4, "chars": sum(map(len, hay.docs))}
    assert load_haystack(hay_dir / "a.txt").docs == (prose(1, 60),)
    # the hash is of the content: a copy elsewhere has the same hash, one changed character another
    copy = tmp_path / "copy"
    shutil.copytree(hay_dir, copy)
    assert load_haystack(copy).sha256 == hay.sha256 == Haystack.from_texts(hay.docs).sha256
    (copy / "a.txt").write_text(prose(1, 60).replace("harbor", "harbour", 1))
    assert load_haystack(copy).sha256 != hay.sha256
    assert Haystack.from_texts(["ab", "c"]).sha256 != Haystack.from_texts(["a", "bc"]).sha256


@pytest.mark.parametrize(
    "name,content,message",
    [
        ("d.jsonl", '{"text": "fine"}\n{"body": "no text"}\n', r"d\.jsonl, line 2: no string 'text' field"),
        ("d.jsonl", '{"text": 3}\n', r"d\.jsonl, line 1: no string 'text' field"),
        ("d.jsonl", '{"text": "fine"}\n\n{"text": \n', r"d\.jsonl, line 3: not valid JSON"),
        ("d.txt", b"caf\xe9 au lait", r"d\.txt is not UTF-8"),
        ("d.txt", "  \n\n ", r"has no text"),
        ("d.pdf", "text", r"expected a \.txt, \.md, \.jsonl file"),
    ],
)
def test_load_errors_name_the_file_and_line(tmp_path, name, content, message):
    f = tmp_path / name
    f.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ConsaError, match=message):
        load_haystack(f)
    if f.suffix != ".pdf":  # the same file inside a directory gives the same error
        with pytest.raises(ConsaError, match=message):
            load_haystack(tmp_path)


def test_load_errors_for_missing_and_empty_paths(tmp_path):
    with pytest.raises(ConsaError, match="not found"):
        load_haystack(tmp_path / "nope")
    (tmp_path / "notes.rst").write_text("text")
    with pytest.raises(ConsaError, match="has no .txt, .md, .jsonl files"):
        load_haystack(tmp_path)


# ---- the task guarantees over a user haystack -----------------------------------------------------
@pytest.mark.parametrize("task", ["passkey", "multikey"])
@pytest.mark.parametrize("depth", [0.0, 0.37, 1.0])
def test_user_haystack_items_keep_the_guarantees(tok, hay_dir, task, depth):
    length = 3072  # 1% = 30 tokens: room for the needle's own tokens before the answer at depth 0
    items = make_items(task, tok, length, depth, 2, seed=0, haystack=load_haystack(hay_dir))
    assert len(items) == 2 and items[0].prompt != items[1].prompt
    allowed = set(WORDS) | NEEDLE_WORDS
    for it in items:
        _check_item(tok, it, length, depth)  # length ±2%, depth ±1%, the answer exactly once
        context = it.prompt[: it.prompt.rindex(QUESTION[task])]
        for key, value in {it.meta.get("key"): it.answer, **it.meta.get("distractors", {})}.items():
            context = context.replace(f"The magic number for {key} is {value}.", "").replace(f"The pass key is {value}.", "")
        words = set(re.findall(r"[a-z]+", context.lower())[1:-1])  # the filler's ends may cut a word
        assert words <= allowed, words - allowed  # the filler is the user's text, nothing of the stdlib's
        assert max(Counter(_sentences(context)).values()) == 1  # and none of it repeated


def test_a_just_long_enough_haystack_is_used_once_and_a_short_one_is_an_error(tok):
    length = 1024
    hay = Haystack.from_texts([prose(5, 9), prose(6, 9)])
    assert haystack_tokens_needed(length) <= hay.count_tokens(tok) < 1.5 * length  # barely enough
    hay.check_length(tok, length)
    for it in make_items("passkey", tok, length, 0.5, 3, seed=1, haystack=hay):
        _check_item(tok, it, length, 0.5)
        assert max(Counter(_sentences(it.prompt)).values()) == 1  # the default haystack would cycle instead
    short = Haystack.from_texts([prose(7, 6)], source="short.txt")
    have = short.count_tokens(tok)
    with pytest.raises(ConsaError, match=rf"haystack short.txt is too short: {have} tokens, a context of 1024 tokens needs at least 1127"):
        short.check_length(tok, length)
    with pytest.raises(ConsaError, match="too short"):  # make_items never loops the text to fill the context
        make_items("passkey", tok, length, 0.5, 1, seed=0, haystack=short)
    # the grid checks up front: an error, not a silently skipped cell
    with pytest.raises(ConsaError, match="too short.*1024 tokens"):
        build_items(tok, ["passkey"], [256, 1024], [0.5], 1, haystack=short, errors={})
    # it fills only the text tasks: mqar at the same length does not need it
    cells = build_items(tok, ["mqar"], [1024], [0.5], 1, haystack=short)
    assert "harbor" not in cells[("mqar", 1024, 0.5)][0].prompt


# ---- the eval fingerprint, the Python API and the CLI ----------------------------------------------
def test_haystack_hash_is_in_the_fingerprint_and_decides_reuse(tok, hay_dir, tmp_path):
    model = tiny_model("qwen3", vocab_size=len(tok), max_position_embeddings=512)
    cfg = EvalConfig(tasks=("passkey",), lengths=(256,), depths=(0.5,), items=1, window=16, progress=False)
    hay_a = load_haystack(hay_dir)
    hay_b = Haystack.from_texts([prose(8, 40)])
    r = evaluate(model, tok, None, cfg, haystack=hay_a, log=None)
    assert r["haystack"]["sha256"] == hay_a.sha256 and r["baselines"]["fingerprint"]["haystack"] == hay_a.sha256
    # the default haystack adds no key: fingerprints stored before --haystack existed still match
    assert "haystack" not in fingerprint(cfg, 16, 0) and fingerprint(cfg, 16, 0, hay_a.sha256)["haystack"] == hay_a.sha256
    alloc = Allocation.from_units([True, False, False], "layer", model_shape(model), window=16)
    logs = []
    evaluate(model, tok, alloc, cfg, baselines=r["baselines"], haystack=hay_b, log=logs.append)
    assert any("recomputing" in line for line in logs)  # another text: the baselines are not reused
    logs.clear()
    copy = tmp_path / "copy"
    shutil.copytree(hay_dir, copy)
    same = evaluate(model, tok, alloc, EvalConfig(**{**cfg.__dict__, "haystack": str(copy)}), baselines=r["baselines"], log=logs.append)
    assert not any("recomputing" in line for line in logs) and same["haystack"]["source"] == str(copy)
    assert same["config"]["haystack"] == str(copy)
    # cfg.haystack (a path) and haystack= (loaded) build the same prompts; another haystack other ones
    prompts = lambda cells: [it.prompt for its in cells.values() for it in its]  # noqa: E731
    by_path = retrieval_items(tok, EvalConfig(**{**cfg.__dict__, "haystack": str(hay_dir)}))[0]
    assert prompts(by_path) == prompts(retrieval_items(tok, cfg, hay_a)[0]) != prompts(retrieval_items(tok, cfg, hay_b)[0])
    assert prompts(retrieval_items(tok, cfg)[0]) != prompts(by_path)


@pytest.fixture(scope="module")
def model_dir(tok, tmp_path_factory):
    d = tmp_path_factory.mktemp("m")
    tok.save_pretrained(d)
    tiny_model("qwen3", vocab_size=len(tok), max_position_embeddings=512).save_pretrained(d)
    return d


def test_cli_eval_with_a_haystack_and_its_errors(model_dir, hay_dir, tmp_path, capsys):
    from consa.cli import main

    common = ["eval", "--model", str(model_dir), "--tasks", "passkey", "--lengths", "256", "--depths", "0.5",
              "--items", "1", "--window", "16", "--no-calibrate", "--no-progress"]
    assert main([*common, "--haystack", str(hay_dir), "--out", str(tmp_path / "run")]) == 0
    r = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert r["haystack"]["sha256"] == load_haystack(hay_dir).sha256 and r["config"]["haystack"] == str(hay_dir)
    assert f"`{hay_dir}`" in (tmp_path / "run" / "eval.md").read_text()
    capsys.readouterr()
    (tmp_path / "short.txt").write_text(prose(9, 3))
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"title": "x"}\n')
    cases = [
        (["--haystack", str(tmp_path / "short.txt"), "--lengths", "1024"], "is too short"),
        (["--haystack", str(tmp_path / "bad.jsonl")], f"{tmp_path / 'bad.jsonl'}, line 2: no string 'text' field"),
        (["--haystack", str(hay_dir), "--tasks", "mqar"], "--tasks has neither"),
        (["--haystack", str(tmp_path / "missing")], "haystack not found"),
    ]
    for extra, message in cases:
        out = tmp_path / "bad-run"
        assert main([*common, *extra, "--out", str(out)]) == 2, extra
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("consa: error:") and message in err[0], err
        assert not out.exists()
