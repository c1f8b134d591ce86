"""Synthetic long-context tasks and their scoring (issue 4, item 2)."""

from __future__ import annotations

import re

import pytest

from consa.data import TASKS, make_items, score, train_tokenizer
from consa.data.tasks import _default_code_files, _default_text_docs, _read_code, max_new_tokens
from consa.data.tokenizer import backend
from consa.errors import ConsaError

QUESTION = {  # where the final question starts, found independently of the generator
    "passkey": "\n\nWhat is the pass key?",
    "multikey": "\n\nWhat is the magic number for",
    "varrecall": "\n\nassert ",
    "mqar": "\nLookup:\n",
}


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    """A tiny byte-level BPE (512 tokens): many tokens per word, the hard case for exact lengths."""
    texts = list(_default_text_docs())[:15] + [t for t in (_read_code(p) for p in _default_code_files()[:20]) if t]
    return train_tokenizer(texts, 512, tmp_path_factory.mktemp("tok"))


def _ntok(tok, text: str) -> int:
    return len(backend(tok).encode(text, add_special_tokens=False).ids)


def _check_item(tok, it, length, depth):
    # the answer occurs exactly once, and the prompt ends where it must be generated
    assert it.prompt.count(it.answer) == 1
    assert it.answer.isdigit() and not it.prompt[-1].isspace()
    # token length within ±2% of the target, counted independently
    n = _ntok(tok, it.prompt)
    assert n == it.num_tokens and abs(n - length) <= 0.02 * length, (n, length)
    # the answer sits at the claimed depth of the context (±1% of the length)
    q = it.prompt.rindex(QUESTION[it.task])
    context_tokens = _ntok(tok, it.prompt[:q])
    assert abs(context_tokens - it.context_tokens) <= 1
    answer_at = _ntok(tok, it.prompt[: it.prompt.index(it.answer)].rstrip(" "))
    assert abs(answer_at - depth * context_tokens) <= 0.01 * length, (answer_at, depth, context_tokens)
    assert it.depth == depth and it.target_tokens == length


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("depth", [0.0, 0.37, 1.0])
def test_items_have_exact_length_depth_and_unique_answer(tok, task, depth):
    length = 3072  # 1% = 30 tokens: room for the needle's words before the answer at depth 0 (512-token BPE)
    items = make_items(task, tok, length, depth, 2, seed=0)
    assert len(items) == 2
    for it in items:
        _check_item(tok, it, length, depth)
    assert items[0].prompt != items[1].prompt and items[0].answer != items[1].answer


@pytest.mark.parametrize("task,length", [("passkey", 1024), ("mqar", 1024), ("varrecall", 6000)])
def test_other_lengths(tok, task, length):
    for it in make_items(task, tok, length, 0.5, 2, seed=3):
        _check_item(tok, it, length, 0.5)


def test_deterministic_by_seed(tok):
    for task in TASKS:
        a = make_items(task, tok, 1536, 0.5, 2, seed=7)
        b = make_items(task, tok, 1536, 0.5, 2, seed=7)
        c = make_items(task, tok, 1536, 0.5, 2, seed=8)
        assert [x.prompt for x in a] == [x.prompt for x in b] and [x.answer for x in a] == [x.answer for x in b]
        assert all(x.prompt != y.prompt for x, y in zip(a, c))
        # item i keeps its answer across depths: a length x depth grid varies only what it says
        d = make_items(task, tok, 1536, 0.9, 2, seed=7)
        assert [x.answer for x in a] == [x.answer for x in d]


def test_task_contents(tok):
    it = make_items("passkey", tok, 1024, 0.5, 1, seed=1)[0]
    assert f"The pass key is {it.answer}." in it.prompt and it.prompt.endswith("The pass key is")
    it = make_items("multikey", tok, 2048, 0.5, 1, seed=1)[0]
    assert len(it.meta["distractors"]) == 3 and it.prompt.endswith(f"The magic number for {it.meta['key']} is")
    for key, value in it.meta["distractors"].items():
        assert it.prompt.count(f"The magic number for {key} is {value}.") == 1
    it = make_items("varrecall", tok, 2048, 0.5, 1, seed=1)[0]
    name = it.meta["name"]
    assert re.search(rf"^[ \t]*{name} = {it.answer}$", it.prompt, re.M) and it.prompt.endswith(f"assert {name} ==")
    assert "def " in it.prompt  # a Python haystack
    it = make_items("mqar", tok, 1024, 0.5, 1, seed=1, queries=4)[0]
    lines = it.prompt.split("\n")
    assert all(re.fullmatch(r"[a-z]{4}: \d{5}", ln) for ln in lines if ln and ln not in ("Lookup:",) and ln != lines[-1])
    assert lines[-1] == f"{it.meta['key']}:" and len(it.meta["queries"]) == 4
    for k in it.meta["queries"][:-1]:  # answered queries repeat an earlier pair
        assert it.prompt.count(f"\n{k}: ") == 2


def test_user_haystack_and_options(tok):
    story = " ".join(f"Sentence number {i} tells of a quiet harbor town." for i in range(400))
    it = make_items("passkey", tok, 1024, 0.25, 1, seed=0, haystack=[story])[0]
    assert "quiet harbor town" in it.prompt
    _check_item(tok, it, 1024, 0.25)
    code = "\n".join(f"def helper_{i}(x):\n    return x * {i} + offset\n" for i in range(300))
    it = make_items("varrecall", tok, 1024, 0.5, 1, seed=0, haystack=[code], distractors=0, digits=3)[0]
    assert "def helper_" in it.prompt and len(it.answer) == 3
    with pytest.raises(ConsaError, match="empty"):
        make_items("passkey", tok, 1024, 0.5, 1, seed=0, haystack=["  "])
    with pytest.raises(ConsaError, match="unknown task"):
        make_items("needle", tok, 1024, 0.5, 1, seed=0)
    with pytest.raises(ConsaError, match="depth"):
        make_items("passkey", tok, 1024, 1.5, 1, seed=0)
    # too short to put the answer at depth 0 within ±1%: a clear error, or the nearest position
    with pytest.raises(ConsaError, match="not reachable"):
        make_items("multikey", tok, 512, 0.0, 1, seed=0)
    it = make_items("multikey", tok, 512, 0.0, 1, seed=0, strict=False)[0]
    assert it.prompt.count(it.answer) == 1 and it.meta["depth_actual"] < 0.1


def _oracle(item):
    """A 'model' that really reads the prompt: finds the asked key's value, answers greedily."""
    p = item.prompt
    if item.task == "passkey":
        v = re.search(r"The pass key is (\d+)\.", p).group(1)
    elif item.task == "multikey":
        v = re.search(rf"The magic number for {item.meta['key']} is (\d+)\.", p).group(1)
    elif item.task == "varrecall":
        v = re.search(rf"^\s*{item.meta['name']} = (\d+)$", p, re.M).group(1)
    else:
        v = re.search(rf"^{item.meta['key']}: (\d+)$", p, re.M).group(1)
    return f" {v}.\n\nThe next line"  # a greedy continuation runs on past the answer


def _distracted(item):
    """A 'model' that always answers with another value from the context."""
    if item.meta.get("distractors"):
        return " " + next(iter(item.meta["distractors"].values()))
    values = [v for v in re.findall(r"\b\d{5}\b", item.prompt) if v != item.answer]
    return " " + (values[0] if values else str(int(item.answer) // 10 * 10 + (int(item.answer) + 1) % 10))


def test_scoring_with_models_of_known_behaviour(tok):
    items = [it for task in TASKS for it in make_items(task, tok, 1536, 0.5, 3, seed=11)]
    assert score([_oracle(it) for it in items], items) == 1.0
    assert score([_distracted(it) for it in items], items) == 0.0
    assert score(["" for _ in items], items) == 0.0
    half = [_oracle(it) if i % 2 == 0 else _distracted(it) for i, it in enumerate(items)]
    assert score(half, items) == pytest.approx(sum(1 for i in range(len(items)) if i % 2 == 0) / len(items))
    # whitespace and punctuation robust, but exact: a longer or shorter number is wrong
    it = items[0]
    assert score([f"\n  {it.answer}\n"], [it]) == 1.0 and score([f"{it.answer}0"], [it]) == 0.0
    assert score([it.answer[:-1]], [it]) == 0.0
    with pytest.raises(ConsaError):
        score([it.answer], items[:2])
    # the answer fits in the suggested generation budget
    assert max_new_tokens(tok, items) >= max(_ntok(tok, " " + x.answer) for x in items)
