"""Synthetic long-context retrieval tasks at a requested token length and needle depth.

    items = make_items("passkey", tokenizer, length=4096, depth=0.5, n=20, seed=0)
    preds = [generate_greedy(model, it.prompt, max_new_tokens(tokenizer, items)) for it in items]
    acc = score(preds, items)

Tasks (``TASKS``):

- ``passkey``:   a 5-digit pass key sentence hidden in natural text; "… The pass key is" → `` 48213``.
- ``multikey``:  k "magic number for <key>" sentences (k-1 distractors), one key asked.
- ``varrecall``: ``name = 48213`` put into long Python source (plus distractor assignments);
                 the prompt ends with ``assert name ==``.
- ``mqar``:      multi-query associative recall: a long list of ``key: value`` lines, then a few
                 queries answered in the prompt and a last one to answer.

Guarantees (checked while building every item, so a bad item is never returned):

- the prompt has ``length`` tokens ±2% (``num_tokens``, counted without special tokens);
- the answer string occurs in the prompt exactly once; the answer token starts at
  ``depth × context_tokens`` ±1% of ``length``, where ``context_tokens`` is the number of prompt
  tokens before the final question (``answer_token`` records where it really is);
- the prompt ends exactly where the answer's first token is to be generated (no trailing space:
  byte-level BPEs attach the space to the answer, `` 48213``);
- items are a pure function of (task, tokenizer, length, depth, n, seed, haystack); item ``i``
  uses the same values and haystack at every length and depth, so a length × depth grid varies
  only what it says.

Scoring: :func:`score` takes the first whitespace-separated word of the stripped prediction,
drops surrounding punctuation, and compares it with the answer exactly.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import os
import sysconfig
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import ConsaError
from .haystack import TEXT_TASKS
from .tokenizer import backend

__all__ = ["TASKS", "TEXT_TASKS", "TaskItem", "make_items", "score", "is_correct", "normalize_prediction", "max_new_tokens", "default_haystack"]

TASKS = ("passkey", "multikey", "varrecall", "mqar")

LENGTH_TOL = 0.02  # guaranteed: |num_tokens - length| <= LENGTH_TOL * length
DEPTH_TOL = 0.01  # guaranteed: |answer_token - depth * context_tokens| <= DEPTH_TOL * length

_ADJECTIVES = (
    "amber", "brave", "calm", "dark", "eager", "faint", "gentle", "hollow", "icy", "jolly", "keen", "lucky",
    "mellow", "noble", "olive", "proud", "quiet", "rapid", "silent", "tidy", "urban", "vivid", "wild", "young",
)
_NOUNS = (
    "anchor", "badger", "canyon", "dragon", "engine", "falcon", "garden", "harbor", "island", "jungle", "kettle",
    "lantern", "meadow", "needle", "orchard", "pepper", "quarry", "river", "saddle", "tower", "valley", "walrus",
)
_CODE_WORDS = (
    "cache", "retry", "buffer", "offset", "window", "limit", "token", "batch", "depth", "scale", "margin", "budget",
    "timeout", "stride", "index", "shard", "quota", "phase", "epoch", "delay",
)


@dataclass
class TaskItem:
    """One prompt with its answer. ``depth`` is the requested depth; ``answer_token`` the index of the
    prompt token where the answer's only occurrence starts; ``context_tokens`` the tokens before
    the final question."""

    task: str
    prompt: str
    answer: str
    depth: float
    target_tokens: int
    num_tokens: int
    seed: int
    answer_token: int = -1
    context_tokens: int = 0
    meta: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------------------------------------ scoring

_PUNCT = ".,;:!?'\"`()[]{}<>"


def normalize_prediction(prediction: str) -> str:
    """First whitespace-separated word of the stripped prediction, surrounding punctuation removed."""
    words = str(prediction).strip().split()
    return words[0].strip(_PUNCT) if words else ""


def is_correct(prediction: str, item: TaskItem) -> bool:
    return normalize_prediction(prediction) == item.answer


def score(predictions: Sequence[str], items: Sequence[TaskItem]) -> float:
    """Exact-match accuracy of greedy continuations against the items' answers."""
    if len(predictions) != len(items):
        raise ConsaError(f"score: {len(predictions)} predictions for {len(items)} items")
    if not items:
        raise ConsaError("score: no items")
    return sum(is_correct(p, it) for p, it in zip(predictions, items)) / len(items)


def max_new_tokens(tokenizer, items: Sequence[TaskItem], extra: int = 2) -> int:
    """Enough new tokens to generate any of the items' answers (with its leading space) plus ``extra``."""
    b = backend(tokenizer)
    return max(len(b.encode(" " + it.answer, add_special_tokens=False).ids) for it in items) + extra


# ------------------------------------------------------------------------------------------ haystacks


def _stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


@functools.lru_cache(maxsize=None)
def _default_text_docs() -> tuple:
    """Natural English found on any machine with Python: the stdlib's pydoc topics (the language
    reference as text), plus license and IDLE text files. Sorted, so the same on every call."""
    docs = []
    try:
        from pydoc_data.topics import topics

        docs += [topics[k] for k in sorted(topics) if len(topics[k]) > 2000]
    except ImportError:
        pass
    paths = sorted(Path("/usr/share/common-licenses").glob("*")) + [_stdlib_dir() / "LICENSE.txt"]
    paths += sorted((_stdlib_dir() / "idlelib").glob("*.txt"))
    seen = set()
    for p in paths:
        try:
            if not p.is_file() or p.resolve() in seen:
                continue
            seen.add(p.resolve())
            t = p.read_text("utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if len(t) > 2000:
            docs.append(t)
    return tuple(docs)


@functools.lru_cache(maxsize=None)
def _default_code_files() -> tuple:
    root = _stdlib_dir()
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"))
        for fn in sorted(filenames):
            if fn.endswith(".py"):
                p = Path(dirpath) / fn
                try:
                    if p.stat().st_size >= 8192:
                        out.append(p)
                except OSError:
                    pass
    return tuple(out)


@functools.lru_cache(maxsize=256)
def _read_code(p: Path) -> str | None:
    from .corpus import filter_reason

    try:
        t = p.read_text("utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    return None if filter_reason(t, p.name) else t


def default_haystack(kind: str) -> list[str]:
    """The default haystack documents for ``kind`` = "text" or "code" (code is read lazily in tasks)."""
    if kind == "text":
        return list(_default_text_docs())
    if kind == "code":
        return [t for t in (_read_code(p) for p in _default_code_files()) if t]
    raise ConsaError(f"unknown haystack kind {kind!r}")


# ------------------------------------------------------------------------------------------ encoding


class _Enc:
    def __init__(self, tokenizer):
        self.b = backend(tokenizer)

    def ntok(self, text: str) -> int:
        return len(self.b.encode(text, add_special_tokens=False).ids)

    def encode(self, text: str):
        e = self.b.encode(text, add_special_tokens=False)
        return e.ids, [o[0] for o in e.offsets], [o[1] for o in e.offsets]


class _Stream:
    """Filler text grown on demand, with token start offsets (normalised to sit before spaces)."""

    def __init__(self, enc: _Enc, pieces, sep: str):
        self.enc, self.pieces, self.sep = enc, pieces, sep
        self.text = ""
        self.starts: list[int] = []
        self._exhausted = False

    def ensure(self, n: int) -> None:
        while len(self.starts) < n + 1 and not self._exhausted:
            need_chars = max(4096, int((n + 1 - len(self.starts)) * 6))
            added = 0
            while added < need_chars:
                try:
                    p = next(self.pieces)
                except StopIteration:
                    self._exhausted = True
                    break
                chunk = (self.sep if self.text else "") + p
                self.text += chunk
                added += len(chunk)
            _, starts, _ = self.enc.encode(self.text)
            self.starts = starts
        if len(self.starts) < n + 1:
            raise ConsaError(f"haystack too short: {len(self.starts)} tokens, {n + 1} needed")

    def cut(self, j: int) -> int:
        """Char index of the boundary before token j, moved left over spaces."""
        c = len(self.text) if j >= len(self.starts) else self.starts[j]
        while c > 0 and self.text[c - 1] == " ":
            c -= 1
        return c

    def is_boundary(self, c: int, kind: str) -> bool:
        if c == 0:
            return True
        prev = self.text[c - 1]
        if kind == "line":
            return prev == "\n"
        if self.text.endswith("\n\n", 0, c):  # a paragraph start
            return True
        return prev in ".!?" and (c == len(self.text) or self.text[c] in " \n")  # a sentence end

    def snap(self, c: int, kind: str, max_dist: int, lo: int = 0, hi: int | None = None) -> int:
        """A char position near c inside [lo, hi]: a line start for "line"; for "text" a sentence end
        within max_dist chars, else the start of the word at c."""
        hi = len(self.text) if hi is None else hi
        c = min(max(c, lo), hi)
        if kind == "line":
            nl = self.text.rfind("\n", lo, c)
            back = nl + 1 if nl >= 0 else lo
            fwd = self.text.find("\n", c, hi)
            cands = [b for b in (back, fwd + 1 if fwd >= 0 else None) if b is not None and lo <= b <= hi and self.is_boundary(b, "line")]
            cands += [b for b in (lo, hi) if abs(b - c) <= max_dist]  # the filler's own ends
            return min(cands, key=lambda b: (abs(b - c), b)) if cands else c
        for d in range(max_dist + 1):
            for b in ((c - d, c + d) if d else (c,)):
                if lo <= b <= hi and self.is_boundary(b, "text"):
                    return b
        while c > lo and self.text[c - 1] not in " \n":
            c -= 1
        while c > lo and self.text[c - 1] == " ":
            c -= 1
        return c


def _text_pieces(docs: Sequence[str], rng: np.random.Generator, cycle: bool = True):
    """Documents in a seeded order; the first starts at a seeded paragraph. ``cycle``: repeat them
    forever; else go round once (the first document's skipped head comes last), so a user's text is
    never repeated and a too-short one runs out (``_Stream.ensure`` then says so)."""
    order = rng.permutation(len(docs))
    first, head = True, ""
    while True:
        for i in order:
            d = docs[int(i)]
            if first:
                first = False
                starts = [0] + [k + 2 for k in range(len(d)) if d.startswith("\n\n", k)][:2000]
                s = starts[int(rng.integers(len(starts)))]
                head, d = (d[:s], d[s:]) if d[s:] else ("", d)
            yield d
        if not cycle:
            if head.strip():
                yield head
            return


def _code_pieces(paths_or_docs, rng: np.random.Generator, lazy: bool):
    order = rng.permutation(len(paths_or_docs))
    while True:
        got = False
        for i in order:
            d = _read_code(paths_or_docs[int(i)]) if lazy else paths_or_docs[int(i)]
            if d:
                got = True
                yield d
        if not got:
            return


def _mqar_lines(rng: np.random.Generator, used_keys: set, used_vals: set, digits: int):
    lo, hi = 10 ** (digits - 1), 10**digits
    while True:
        k = _letters(int(rng.integers(26**4)), 4)
        v = str(int(rng.integers(lo, hi)))
        if k in used_keys or v in used_vals:
            if len(used_vals) > 0.8 * (hi - lo):
                raise ConsaError(f"mqar: ran out of distinct {digits}-digit values; use more digits or a shorter length")
            continue
        used_keys.add(k)
        used_vals.add(v)
        yield f"{k}: {v}"


def _letters(x: int, n: int) -> str:
    s = []
    for _ in range(n):
        x, r = divmod(x, 26)
        s.append(chr(97 + r))
    return "".join(s)


# ------------------------------------------------------------------------------------------ building


@dataclass
class _Insert:
    text: str  # the needle (a sentence, or a line without newline)
    frac: float  # position as a fraction of the filler (for the target: of the context)
    ans_off: int = -1  # char offset of the answer inside text (target only)


def _assemble(stream: _Stream, start: int, end: int, inserts: list[tuple[int, _Insert]], kind: str, tail: str, code_indent: bool):
    """Filler ``text[start:end]`` with inserts at (absolute) char positions; returns (prompt, answer
    char, context end char)."""
    filler = stream.text[start:end].lstrip(" ")
    start = end - len(filler)
    inserts = [(min(max(c, start), end) - start, ins) for c, ins in inserts]
    end = len(filler)
    if kind == "line" and filler and not filler.endswith("\n"):
        filler += "\n"
    parts, pos, ans_char = [], 0, -1
    out_len = 0
    for c, ins in sorted(inserts, key=lambda x: (min(x[0], end), x[1].ans_off < 0)):
        c = min(c, end)
        parts.append(filler[pos:c])
        out_len += c - pos
        pos = c
        if kind == "line":
            indent = ""
            if code_indent:
                nxt = filler[c : filler.find("\n", c) if filler.find("\n", c) >= 0 else len(filler)]
                indent = nxt[: len(nxt) - len(nxt.lstrip(" \t"))] if nxt.strip() else ""
            prefix = indent if (c == 0 or filler[c - 1] == "\n") else "\n" + indent
            piece = prefix + ins.text + "\n"
        else:
            if c == 0:
                prefix, suffix = "", " "
            elif filler[c - 1] == "\n":
                prefix, suffix = "", "\n"
            else:
                prefix, suffix = " ", ""
            piece = prefix + ins.text + suffix
        if ins.ans_off >= 0:
            ans_char = out_len + len(prefix) + ins.ans_off
        parts.append(piece)
        out_len += len(piece)
    parts.append(filler[pos:])
    context = "".join(parts)
    return context + tail, ans_char, len(context)


def _build(enc: _Enc, stream: _Stream, *, length: int, depth: float, target: _Insert, others: list[_Insert], tail: str, kind: str, code_indent: bool = False, whole_lines: bool = False):
    """Search filler size and insert position so that length and depth land within tolerance."""
    tail_n = enc.ntok(tail)
    ins_n = sum(enc.ntok(" " + i.text + "\n") for i in [target, *others])
    pre_n = enc.ntok(target.text[: target.ans_off].rstrip())
    F = length - tail_n - ins_n
    if F < 16:
        raise ConsaError(f"length {length} is too short for this task (question and needles take ~{tail_n + ins_n} tokens)")
    s0 = max(8, int(0.05 * length))  # filler starts at token s0: moving it fine-tunes the depth
    max_dist = end_dist = 0
    bt = None  # chosen insertion char for the target (absolute)
    best = None
    for _ in range(12):
        F = max(F, 1)
        stream.ensure(s0 + F + 1)
        if not max_dist:  # snapping to a sentence/line start may move the needle by up to 3% of the
            # length; the filler start s0 (headroom 5%) then moves to put the answer back at depth
            cpt = len(stream.text) / max(len(stream.starts), 1)
            max_dist, end_dist = max(1, int(0.03 * length * cpt)), int(0.004 * length * cpt)
        start, end = stream.cut(s0), stream.cut(s0 + F)
        if kind == "line":
            if whole_lines and start > 0 and stream.text[start - 1] != "\n":
                nl = stream.text.find("\n", start, end)
                start = nl + 1 if nl >= 0 else start
            e2 = stream.text.rfind("\n", start, end) + 1
            if start < e2 and (whole_lines or end - e2 <= end_dist):
                end = e2  # whole last line
        C_est = F + ins_n
        if bt is None or not start <= bt <= end:
            jt = s0 + min(max(int(round(depth * C_est - pre_n)), 0), F)
            bt = start if jt == s0 else stream.snap(stream.cut(jt), kind, max_dist, start, end)
        placed = [(bt, target)]
        for o in others:  # distractors keep their side of the target, so they never cross it
            if o.frac < depth:
                lo_, hi_, f = start, bt, o.frac / depth
            else:
                lo_, hi_, f = bt, end, (o.frac - depth) / max(1.0 - depth, 1e-9)
            c = lo_ + int(round(f * (hi_ - lo_)))
            placed.append((stream.snap(c, kind, max_dist, lo_, hi_), o))
        prompt, ans_char, ctx_end = _assemble(stream, start, end, placed, kind, tail, code_indent)
        ids, starts, ends = enc.encode(prompt)
        n = len(ids)
        ans_tok = bisect.bisect_right(ends, ans_char)  # first token whose end is past the answer's first char
        ctx_tok = bisect.bisect_left(starts, ctx_end)
        err_n = length - n
        err_d = depth * ctx_tok - ans_tok
        badness = max(abs(err_n) / (LENGTH_TOL * length), abs(err_d) / max(DEPTH_TOL * length, 1e-9))
        if best is None or badness < best[0]:
            best = (badness, prompt, n, ans_tok, ctx_tok)
        if abs(err_n) <= 0.25 * LENGTH_TOL * length and abs(err_d) <= 0.5 * DEPTH_TOL * length:
            break
        F += err_n
        if bt == start or depth == 0.0:
            continue  # answer as early as it can be
        new_s0 = s0 - int(round(err_d))  # answer too early (err_d > 0): start the filler earlier
        if new_s0 < 0:
            bt = None  # out of headroom: pick a new boundary
            new_s0 = max(8, int(0.05 * length))
        s0 = new_s0
    return best


def _item_seed(task: str, seed: int, i: int) -> int:
    return int.from_bytes(hashlib.sha256(f"consa-task:{task}:{seed}:{i}".encode()).digest()[:4], "big")


def _value(rng: np.random.Generator, digits: int, avoid: set) -> str:
    for _ in range(1000):
        v = str(int(rng.integers(10 ** (digits - 1), 10**digits)))
        if v not in avoid:
            return v
    raise ConsaError("could not draw a distinct value")


def make_items(
    task: str,
    tokenizer,
    length: int,
    depth: float,
    n: int,
    seed: int,
    haystack: Sequence[str] | None = None,
    *,
    digits: int = 5,
    distractors: int | None = None,
    queries: int = 4,
    strict: bool = True,
) -> list[TaskItem]:
    """``n`` items of ``task`` with prompts of ``length`` tokens and the answer at ``depth`` (0…1) of the
    context. ``haystack``: documents (or a :class:`~consa.data.haystack.Haystack`) to use as filler
    instead of the defaults (stdlib pydoc topics and license texts for text tasks, stdlib ``.py``
    files for ``varrecall``; ``mqar`` needs none); for the text tasks it is never repeated.
    ``digits``: answer length; ``distractors``: extra needles (default 3 for multikey and varrecall,
    0 for passkey); ``queries``: mqar queries, the last one unanswered. ``strict``: raise when the
    depth cannot be met within ±1% of ``length`` (only at depths near 0 or 1 and short lengths, where
    the needle's own tokens are in the way); ``strict=False`` accepts the nearest position
    (``meta["depth_actual"]`` says where)."""
    if task not in TASKS:
        raise ConsaError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    if not 0.0 <= float(depth) <= 1.0:
        raise ConsaError(f"depth must be in [0, 1], got {depth}")
    if int(length) < 64:
        raise ConsaError(f"length must be at least 64 tokens, got {length}")
    if int(n) < 0:
        raise ConsaError(f"n must be >= 0, got {n}")
    if not 2 <= int(digits) <= 12:
        raise ConsaError(f"digits must be in 2…12, got {digits}")
    length, depth, digits = int(length), float(depth), int(digits)
    if distractors is None:
        distractors = 3 if task in ("multikey", "varrecall") else 0
    if distractors < 0 or queries < 1:
        raise ConsaError("distractors must be >= 0 and queries >= 1")
    if haystack is not None:
        if isinstance(haystack, str):
            haystack = [haystack]
        haystack = list(getattr(haystack, "docs", haystack))  # a Haystack, or plain strings
        haystack = [h for h in haystack if isinstance(h, str) and h.strip()]
        if not haystack:
            raise ConsaError("haystack is empty")
    enc = _Enc(tokenizer)
    items = []
    for i in range(int(n)):
        iseed = _item_seed(task, seed, i)
        item = None
        for attempt in range(20):
            rng = np.random.default_rng([iseed, attempt])
            got = _make_one(task, enc, rng, length, depth, digits, distractors, queries, haystack)
            if got is None:
                continue
            prompt, answer, ntok, ans_tok, ctx_tok, meta = got
            if prompt.count(answer) != 1 or abs(ntok - length) > LENGTH_TOL * length:
                continue
            meta["depth_actual"] = round(ans_tok / max(ctx_tok, 1), 5)
            item = TaskItem(task, prompt, answer, depth, length, ntok, iseed, ans_tok, ctx_tok, meta)
            break
        if item is None:
            raise ConsaError(
                f"could not build a {task} item of {length} tokens within ±{LENGTH_TOL:.0%} with its answer exactly once "
                "(haystack too short or too repetitive, or length too small for this tokenizer)"
            )
        if abs(depth * item.context_tokens - item.answer_token) > DEPTH_TOL * length and strict:
            raise ConsaError(
                f"{task}: depth {depth} is not reachable within ±{DEPTH_TOL:.0%} at {length} tokens with this tokenizer "
                f"(the answer lands at token {item.answer_token} of {item.context_tokens}: the needle's own tokens are in the way); "
                "use a longer length, or strict=False to accept the nearest position"
            )
        items.append(item)
    return items


def _make_one(task, enc, rng, length, depth, digits, distractors, queries, haystack):
    used_vals: set = set()
    if task == "mqar":
        used_keys: set = set()
        pairs = []
        for _ in range(queries):
            while True:
                k = _letters(int(rng.integers(26**4)), 4)
                if k not in used_keys:
                    break
            v = _value(rng, digits, used_vals)
            used_keys.add(k)
            used_vals.add(v)
            pairs.append((k, v))
        (tk, tv), answered = pairs[-1], pairs[:-1]
        specials = {v for _, v in pairs}
        stream = _Stream(enc, _mqar_lines(rng, used_keys, used_vals, digits), "\n")
        target = _Insert(f"{tk}: {tv}", depth, len(tk) + 2)
        others = [_Insert(f"{k}: {v}", float(rng.uniform(0, 1))) for k, v in answered]
        tail = "\nLookup:\n" + "".join(f"{k}: {v}\n" for k, v in answered) + f"{tk}:"
        best = _build(enc, stream, length=length, depth=depth, target=target, others=others, tail=tail, kind="line", whole_lines=True)
        meta = {"key": tk, "queries": [k for k, _ in answered] + [tk]}
        answer = tv
    elif task == "varrecall":
        names = []
        while len(names) < 1 + distractors:
            nm = f"{_CODE_WORDS[int(rng.integers(len(_CODE_WORDS)))]}_{_CODE_WORDS[int(rng.integers(len(_CODE_WORDS)))]}_{int(rng.integers(10, 100))}"
            if nm not in names:
                names.append(nm)
        vals = []
        for _ in names:
            vals.append(_value(rng, digits, used_vals))
            used_vals.add(vals[-1])
        if haystack is None:
            stream = _Stream(enc, _code_pieces(_default_code_files(), rng, lazy=True), "\n\n")
        else:
            stream = _Stream(enc, _code_pieces(haystack, rng, lazy=False), "\n\n")
        target = _Insert(f"{names[0]} = {vals[0]}", depth, len(names[0]) + 3)
        others = [_Insert(f"{nm} = {v}", float(rng.uniform(0, 1))) for nm, v in zip(names[1:], vals[1:])]
        tail = f"\n\nassert {names[0]} =="
        best = _build(enc, stream, length=length, depth=depth, target=target, others=others, tail=tail, kind="line", code_indent=True)
        if best[1].count(names[0]) != 2:
            return None
        meta = {"name": names[0], "distractors": dict(zip(names[1:], vals[1:]))}
        answer = vals[0]
    else:
        docs = haystack if haystack is not None else list(_default_text_docs())
        if not docs:
            raise ConsaError("no natural text found on this machine for the haystack; pass haystack=[...]")
        stream = _Stream(enc, _text_pieces(docs, rng, cycle=haystack is None), "\n\n")
        answer = _value(rng, digits, used_vals)
        used_vals.add(answer)
        if task == "passkey":
            target = _Insert(f"The pass key is {answer}.", depth, len("The pass key is "))
            others = []
            for _ in range(distractors):
                v = _value(rng, digits, used_vals)
                used_vals.add(v)
                others.append(_Insert(f"The old pass key was {v}.", float(rng.uniform(0, 1))))
            tail = "\n\nWhat is the pass key? The pass key is"
            meta = {}
        else:
            keys = []
            while len(keys) < 1 + distractors:
                k = f"{_ADJECTIVES[int(rng.integers(len(_ADJECTIVES)))]}-{_NOUNS[int(rng.integers(len(_NOUNS)))]}"
                if k not in keys:
                    keys.append(k)
            vals = [answer]
            for _ in keys[1:]:
                vals.append(_value(rng, digits, used_vals))
                used_vals.add(vals[-1])
            sent = "The magic number for {} is {}."
            target = _Insert(sent.format(keys[0], answer), depth, len(sent.format(keys[0], "")) - 1)
            others = [_Insert(sent.format(k, v), float(rng.uniform(0, 1))) for k, v in zip(keys[1:], vals[1:])]
            tail = f"\n\nWhat is the magic number for {keys[0]}? The magic number for {keys[0]} is"
            meta = {"key": keys[0], "distractors": dict(zip(keys[1:], vals[1:]))}
        best = _build(enc, stream, length=length, depth=depth, target=target, others=others, tail=tail, kind="text")
    _, prompt, ntok, ans_tok, ctx_tok = best
    for v in specials if task == "mqar" else used_vals:
        if v != answer and prompt.count(v) > (2 if task == "mqar" else 1):
            return None  # a distractor value leaked into the filler: draw again
    return prompt, answer, ntok, ans_tok, ctx_tok, meta
