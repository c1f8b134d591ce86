"""Batches for every trainer: corpus windows, synthetic retrieval rows, task rows, their mixes, and the
step -> batch function that the search, heal and the experiment share.

A batch source is any callable ``(batch_size, seq_len, rng) -> LongTensor[B, T]``, or a dict
``{"input_ids": LongTensor[B, T], "answer_mask": BoolTensor[B, T]}`` whose mask marks the tokens that
answer a retrieval question (``consa.train.pretrain`` weights them with ``answer_weight``). They draw
only from the ``rng`` they are given, so the batch of a step is a pure function of (seed, step), and a
resumed run replays exactly what an unbroken run would have drawn. :func:`step_batches` turns a source
into the ``step -> batch`` function of the search and heal (:func:`corpus_batches` builds the one of a
corpus directory); pretraining draws from a source directly. The retrieval bank (``bank.py``) is a
source too, built on the same row helpers.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Protocol, Sequence

import numpy as np
import torch

from ..errors import ConsaError

class BatchSource(Protocol):
    """Anything that turns (batch_size, seq_len, rng) into a LongTensor [batch_size, seq_len], or a
    dict with ``input_ids`` and a boolean ``answer_mask`` of the same shape (module doc)."""

    def __call__(self, batch_size: int, seq_len: int, rng: np.random.Generator) -> torch.Tensor | dict: ...


def split_batch(batch: torch.Tensor | dict) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, answer_mask)`` of what a batch source returned (an all-False mask for a tensor)."""
    if isinstance(batch, dict):
        ids, mask = batch["input_ids"], batch.get("answer_mask")
    else:
        ids, mask = batch, None
    if mask is None:
        mask = torch.zeros(ids.shape, dtype=torch.bool)
    if tuple(mask.shape) != tuple(ids.shape):
        raise ConsaError(f"batch source gave answer_mask of shape {tuple(mask.shape)} for input_ids {tuple(ids.shape)}")
    return ids, mask.bool()


def open_shards(corpus_dir: str | Path, split: str = "train"):
    """One split of a corpus built by ``consa data build``."""
    from .shards import TokenShards

    return TokenShards.open(corpus_dir, split)


def corpus_source(shards) -> BatchSource:
    """Batches of random windows of the corpus shards."""

    def source(batch_size: int, seq_len: int, rng: np.random.Generator) -> torch.Tensor:
        return torch.as_tensor(shards.sample_batch(batch_size, seq_len, rng), dtype=torch.long)

    return source


_SYLLABLES = ("ka", "lo", "mi", "ne", "ru", "ta", "vo", "zi", "be", "do", "fu", "gi", "ha", "ju", "pe", "so")


class RetrievalSource:
    """Built-in synthetic retrieval sequences over the corpus's own text and tokenizer.

    Each sequence is a corpus window (the haystack) with ``num_pairs`` "key → value" statements
    inserted at random depths, ending with ``num_queries`` of the keys (a subset, so the last answer
    cannot be guessed by elimination) asked back with their values. Half the sequences
    use prose (``The magic number for kalomi is 48213.`` … ``What is the magic number for
    kalomi? The magic number for kalomi is 48213.``), half code (``kalomi = 48213`` …
    ``assert kalomi == 48213``): the phrasing of the eval tasks, with keys of its own.
    Rows come with an ``answer_mask`` over the values in the questions. ``curriculum_steps > 0``:
    the statements sit in the last :meth:`span` haystack tokens, so the look-up starts short and
    grows to the whole row (``set_step`` is called by ``pretrain``).
    """

    def __init__(self, shards, tokenizer, num_pairs: int = 4, num_queries: int = 2, value_digits: int = 5,
                 curriculum_steps: int = 0, min_span: int = 64):
        self.shards, self.tok = shards, tokenizer
        self.num_pairs, self.num_queries, self.value_digits = num_pairs, num_queries, value_digits
        self.curriculum_steps, self.min_span, self.step = int(curriculum_steps), int(min_span), None

    def set_step(self, step: int) -> None:
        self.step = int(step)

    def span(self, budget: int) -> int:
        """How many haystack tokens before the questions the statements may sit in: ``min_span`` at step
        0, growing linearly to the whole row over ``curriculum_steps`` (all of it without a curriculum)."""
        if self.curriculum_steps <= 0 or self.step is None or self.step >= self.curriculum_steps:
            return budget
        return min(budget, round(self.min_span + (budget - self.min_span) * self.step / self.curriculum_steps))

    def _encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=False))

    def _row(self, seq_len: int, rng: np.random.Generator) -> torch.Tensor:
        k = self.num_pairs
        keys: list[str] = []
        while len(keys) < k:
            key = "".join(_SYLLABLES[i] for i in rng.integers(0, len(_SYLLABLES), size=3))
            if key not in keys:
                keys.append(key)
        values = ["".join(str(d) for d in rng.integers(0, 10, size=self.value_digits)) for _ in range(k)]
        code = bool(rng.integers(0, 2))
        if code:
            needles = [self._encode(f"\n{key} = {val}\n") for key, val in zip(keys, values)]
            ask = [(f"\nassert {keys[i]} ==", f" {values[i]}", "") for i in rng.permutation(k)[: self.num_queries]]
        else:
            needles = [self._encode(f"\nThe magic number for {key} is {val}.\n") for key, val in zip(keys, values)]
            ask = [(f"\nWhat is the magic number for {keys[i]}? The magic number for {keys[i]} is", f" {values[i]}", ".")
                   for i in rng.permutation(k)[: self.num_queries]]
        # encoded piece by piece so the answer tokens are known (byte-level pre-tokenization splits
        # at the space before a number and at the period after it, so this equals encoding the whole)
        query: list[int] = []
        answer: list[bool] = []
        for pieces in ask:
            for j, piece in enumerate(pieces):
                ids = self._encode(piece) if piece else []
                query += ids
                answer += [j == 1] * len(ids)
        budget = seq_len - sum(map(len, needles)) - len(query)
        if budget < 1:  # too short for the task: fall back to plain text
            ids = torch.as_tensor(self.shards.sample_batch(1, seq_len, rng)[0], dtype=torch.long)
            return ids, torch.zeros(seq_len, dtype=torch.bool)
        hay = np.asarray(self.shards.sample_batch(1, budget, rng)[0], dtype=np.int64).tolist()
        cuts = sorted(rng.integers(budget - self.span(budget), budget + 1, size=k).tolist())
        out: list[int] = []
        prev = 0
        for c, needle in zip(cuts, needles):
            out += hay[prev:c] + needle
            prev = c
        out += hay[prev:] + query
        mask = [False] * (len(out) - len(query)) + answer
        return torch.tensor(out[:seq_len], dtype=torch.long), torch.tensor(mask[:seq_len], dtype=torch.bool)

    def __call__(self, batch_size: int, seq_len: int, rng: np.random.Generator) -> dict:
        return stack_rows([self._row(seq_len, rng) for _ in range(batch_size)])


def stack_rows(rows: list[tuple[torch.Tensor, torch.Tensor]]) -> dict:
    """A batch dict from ``(ids, answer_mask)`` rows."""
    return {"input_ids": torch.stack([r[0] for r in rows]), "answer_mask": torch.stack([r[1] for r in rows])}


class TasksSource:
    """Retrieval sequences from the eval harness's own generator, ``consa.data.tasks.make_items``
    (passkey, multikey, varrecall, mqar at a random depth; its default haystacks). Each item's
    prompt + answer is fitted to ``seq_len`` by prepending corpus text. About 0.1 s per item on a
    CPU core, so it slows GPU pretraining; the built-in :class:`RetrievalSource` is the default.
    Rows come with an ``answer_mask`` over the answer's tokens. Raises ``ImportError`` when the
    module is not there."""

    def __init__(self, shards, tokenizer, tasks: tuple[str, ...] | None = None, digits: int = 5):
        from .tasks import TASKS, make_items

        self.make_items, self.shards, self.tok, self.digits = make_items, shards, tokenizer, digits
        self.tasks = tuple(tasks or TASKS)
        self.fallbacks = 0  # rows that could not be built and were replaced by corpus text

    def _row(self, seq_len: int, rng: np.random.Generator) -> torch.Tensor:
        task = self.tasks[int(rng.integers(0, len(self.tasks)))]
        length = max(64, int((seq_len - 8) / 1.03))
        try:
            item = self.make_items(task, self.tok, length, float(rng.uniform(0.05, 0.95)), 1,
                                   int(rng.integers(0, 2**31 - 1)), strict=False, digits=self.digits)[0]
        except ConsaError:  # e.g. seq_len too short for the task with this tokenizer: plain text
            self.fallbacks += 1
            ids = torch.as_tensor(self.shards.sample_batch(1, seq_len, rng)[0], dtype=torch.long)
            return ids, torch.zeros(seq_len, dtype=torch.bool)
        ids = list(self.tok.encode(item.prompt, add_special_tokens=False))
        ans = list(self.tok.encode(f" {item.answer}", add_special_tokens=False))
        return pad_front(ids + ans, len(ans), seq_len, self.shards, rng)

    def __call__(self, batch_size: int, seq_len: int, rng: np.random.Generator) -> dict:
        return stack_rows([self._row(seq_len, rng) for _ in range(batch_size)])


def pad_front(ids, answer_len: int, seq_len: int, shards, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, answer_mask)`` of one retrieval item whose last ``answer_len`` tokens are the answer,
    fitted to ``seq_len`` by prepending corpus text (or keeping the item's tail if it is longer)."""
    ids = np.asarray(ids, dtype=np.int64)[-seq_len:]
    pad = seq_len - len(ids)
    if pad > 0:
        ids = np.concatenate([np.asarray(shards.sample_batch(1, pad, rng)[0], dtype=np.int64), ids])
    mask = np.zeros(seq_len, dtype=bool)
    if answer_len:
        mask[-min(answer_len, seq_len):] = True
    return torch.from_numpy(ids), torch.from_numpy(mask)


class MixedSource:
    """``base`` batches with a share ``fraction`` of rows from ``extra`` (stochastically rounded per
    batch, so the expected share is exact), placed at random rows."""

    def __init__(self, base: BatchSource, extra: BatchSource, fraction: float):
        self.base, self.extra, self.fraction = base, extra, float(fraction)

    def set_step(self, step: int) -> None:
        """Forwarded to the parts that have it (see ``pretrain``)."""
        for part in (self.base, self.extra):
            if hasattr(part, "set_step"):
                part.set_step(step)

    def __call__(self, batch_size: int, seq_len: int, rng: np.random.Generator) -> torch.Tensor | dict:
        n = min(batch_size, int(math.floor(self.fraction * batch_size + rng.random())))
        parts = []
        if batch_size - n:
            parts.append(self.base(batch_size - n, seq_len, rng))
        if n:
            parts.append(self.extra(n, seq_len, rng))
        perm = torch.from_numpy(rng.permutation(batch_size))
        if not any(isinstance(p, dict) for p in parts):
            return torch.cat(parts)[perm]
        ids, masks = zip(*(split_batch(p) for p in parts))
        return {"input_ids": torch.cat(ids)[perm], "answer_mask": torch.cat(masks)[perm]}


def retrieval_source(shards, tokenizer, kind: str = "builtin", *, pairs: int = 4, queries: int = 2,
                     digits: int = 5) -> tuple[BatchSource, str]:
    """The retrieval batch source of ``kind`` and the name of the one chosen: ``builtin``
    (:class:`RetrievalSource` with ``pairs`` statements and ``queries`` questions per row),
    ``tasks`` (:class:`TasksSource`), or ``auto`` (tasks when the module imports, else builtin).
    ``digits``: of the values / pass keys."""
    if kind in ("auto", "tasks"):
        try:
            return TasksSource(shards, tokenizer, digits=digits), "tasks"
        except ImportError as e:
            if kind == "tasks":
                raise ConsaError(f"retrieval source 'tasks' needs consa.data.tasks ({e})") from None
    return RetrievalSource(shards, tokenizer, num_pairs=pairs, num_queries=queries, value_digits=digits), "builtin"


class ShareSource:
    """``batch_size − n`` rows of ``base`` then ``n = round(share · batch_size)`` rows of ``extra``, in that
    order: the same share in every batch (:class:`MixedSource` draws the share per batch and shuffles)."""

    def __init__(self, base: BatchSource, extra: BatchSource, share: float):
        self.base, self.extra, self.share = base, extra, float(share)

    def __call__(self, batch_size: int, seq_len: int, rng: np.random.Generator) -> dict:
        n = int(round(self.share * batch_size))
        parts = []
        if batch_size - n:
            parts.append(split_batch(self.base(batch_size - n, seq_len, rng)))
        if n:
            parts.append(split_batch(self.extra(n, seq_len, rng)))
        return {"input_ids": torch.cat([p[0] for p in parts]), "answer_mask": torch.cat([p[1] for p in parts])}


BatchFn = Callable[[int], dict]


def step_batches(source: BatchSource, batch_size: int, seq_len: int, seed: int | Sequence[int]) -> BatchFn:
    """``step -> {"input_ids", "answer_mask"}``: one batch of ``source`` drawn with
    ``numpy.random.default_rng([*seed, step])``. A pure function of the step, as the search and heal need
    (a resumed run, the held-out batches of refinement and the other ranks all see the same batches)."""
    key = [int(x) for x in seed] if isinstance(seed, (list, tuple)) else [int(seed)]

    def batch(step: int) -> dict:
        ids, answers = split_batch(source(batch_size, seq_len, np.random.default_rng([*key, step])))
        return {"input_ids": ids, "answer_mask": answers}

    return batch


def random_batches(vocab_size: int, batch_size: int, seq_len: int, seed: int) -> BatchFn:
    """Uniform random tokens, a pure function of the step: for smoke tests and tiny random models."""

    def batch(step: int) -> dict:
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        return {"input_ids": torch.randint(0, vocab_size, (batch_size, seq_len), generator=g)}

    return batch


def check_corpus_vocab(corpus, split: str, vocab_size: int) -> None:
    """A corpus tokenized with a larger vocabulary than the model's would index past its embedding
    (an IndexError deep in the forward); refuse it as one line before any work."""
    from ..files import read_json

    meta_path = Path(corpus) / split / "meta.json"
    if not meta_path.is_file():
        return  # TokenShards.open reports a missing or broken corpus
    n = read_json(meta_path, what="corpus metadata", expect=dict).get("vocab_size")
    if isinstance(n, int) and n > vocab_size:
        raise ConsaError(f"corpus {corpus} was tokenized with a vocabulary of {n} tokens, the model has {vocab_size}; "
                         "build the corpus with the model's tokenizer (consa data build --tokenizer MODEL_DIR)")


def corpus_batches(corpus: str | Path, batch_size: int, seq_len: int, seed: int, *, vocab_size: int | None = None,
                   retrieval_mix: float = 0.0, retrieval_kind: str = "builtin") -> BatchFn:
    """The search / heal batch function of a corpus directory (``consa data build``): windows of its train
    split, with ``retrieval_mix`` of the rows synthetic retrieval sequences (:func:`retrieval_source`,
    their answers marked for ``answer_weight``). ``vocab_size``: the model's, checked against the corpus."""
    if vocab_size is not None:
        check_corpus_vocab(corpus, "train", vocab_size)
    if not 0.0 <= retrieval_mix <= 1.0:
        raise ConsaError(f"--retrieval-mix must be in [0, 1], got {retrieval_mix}")
    shards = open_shards(corpus, "train")
    if shards.num_tokens < seq_len + 1:
        raise ConsaError(f"corpus {corpus} holds {shards.num_tokens} tokens, fewer than --seq-len {seq_len}")
    source = corpus_source(shards)
    if retrieval_mix > 0:  # long documents mixed with synthetic retrieval rows: make long range matter
        from .tokenizer import load_tokenizer

        extra, _ = retrieval_source(shards, load_tokenizer(corpus), retrieval_kind)
        source = MixedSource(source, extra, retrieval_mix)
    return step_batches(source, batch_size, seq_len, seed)
