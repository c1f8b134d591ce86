"""The retrieval item bank of the reference experiment: items made once by the eval's own generators
(several processes), saved as one ``.npz``, then drawn as training/search rows padded in front with
corpus text, the answer tokens marked (``BankSource``), so a training loop never waits on item generation."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from ..errors import ConsaError
from .batches import pad_front, stack_rows

_WORKER: dict = {}


def _bank_init(tok_dir: str, digits: int = 5) -> None:
    from .tokenizer import load_tokenizer

    _WORKER["tok"] = load_tokenizer(tok_dir)
    _WORKER["digits"] = digits


def _bank_item(args) -> tuple[np.ndarray, int]:
    """One retrieval item from the eval's own generator: (prompt + answer tokens, answer tokens)."""
    from .tasks import make_items

    task, length, depth, seed = args
    tok = _WORKER["tok"]
    try:
        item = make_items(task, tok, length, depth, 1, seed, strict=False, digits=_WORKER.get("digits", 5))[0]
    except ConsaError:
        return np.zeros(0, dtype=np.int32), 0
    answer = tok.encode(f" {item.answer}", add_special_tokens=False)
    return np.asarray(tok.encode(item.prompt, add_special_tokens=False) + answer, dtype=np.int32), len(answer)


def build_bank(corpus: Path, out: Path, n: int, tasks, min_len: int, max_len: int, seed: int, workers: int = 1,
               digits: int = 5) -> dict:
    """``n`` retrieval items at random task, length in [min_len, max_len] and depth, saved to ``out``."""
    rng = np.random.default_rng([seed, 42])
    jobs = [(tasks[int(rng.integers(len(tasks)))], int(rng.integers(min_len, max_len + 1)),
             float(rng.uniform(0.05, 0.95)), 10_000_000 + seed * 100_000 + i) for i in range(n)]
    t0 = time.time()
    if workers and workers > 1:
        import multiprocessing as mp

        with mp.get_context("fork").Pool(workers, initializer=_bank_init, initargs=(str(corpus), digits)) as pool:
            rows = pool.map(_bank_item, jobs, chunksize=max(1, n // (4 * workers)))
    else:
        _bank_init(str(corpus), digits)
        rows = [_bank_item(j) for j in jobs]
    kept = [(j, r) for j, r in zip(jobs, rows) if len(r[0])]
    rows = [r for _, r in kept]
    if not rows:
        raise ConsaError("no retrieval item could be built for the pretraining bank (lengths too short for the tasks?)")
    offsets = np.cumsum([0] + [len(r[0]) for r in rows]).astype(np.int64)
    tmp = out.with_name(out.name + ".tmp.npz")
    toks = np.concatenate([r[0] for r in rows])
    toks = toks.astype(np.uint16) if toks.max() < 65536 else toks
    np.savez(tmp, tokens=toks, offsets=offsets, answer_lens=np.array([r[1] for r in rows], dtype=np.int32),
             tasks=np.array([j[0] for j, _ in kept]))
    os.replace(tmp, out)
    return {"items": len(rows), "dropped": n - len(rows), "seconds": round(time.time() - t0, 2)}


class BankSource:
    """A pretraining / search batch source: a random bank item per row, its front padded with
    corpus text up to ``seq_len`` (the item's tail kept if it is longer), with the answer's tokens
    marked in ``answer_mask`` (see ``consa.train.pretrain``). Pure function of ``rng`` (and the step).

    ``curriculum_steps > 0``: a length curriculum. At step s only items up to
    ``shortest + (longest − shortest) · s / curriculum_steps`` tokens are drawn, so the needle starts
    close to its question and moves away as training goes on (small models learned the one-hop task
    only with a curriculum). ``set_step`` is called by ``pretrain`` before each batch."""

    def __init__(self, bank_path: Path, shards, curriculum_steps: int = 0):
        z = np.load(bank_path)
        self.tokens, self.offsets, self.shards = z["tokens"], z["offsets"], shards
        self.n = len(self.offsets) - 1
        if "answer_lens" not in z.files:
            raise ConsaError(f"{bank_path} was built by an older consa (no answer lengths); delete it to rebuild it")
        self.answer_lens = z["answer_lens"]
        lengths = np.diff(self.offsets)
        self.by_length = np.argsort(lengths, kind="stable")  # item ids, shortest first
        self.sorted_lengths = lengths[self.by_length]
        self.curriculum_steps = int(curriculum_steps)
        self.step: int | None = None

    def set_step(self, step: int) -> None:
        self.step = int(step)

    def available(self) -> int:
        """How many of the shortest items may be drawn now (all of them without a curriculum)."""
        if self.curriculum_steps <= 0 or self.step is None or self.step >= self.curriculum_steps:
            return self.n
        lo, hi = int(self.sorted_lengths[0]), int(self.sorted_lengths[-1])
        cap = lo + (hi - lo) * self.step / self.curriculum_steps
        return max(1, int(np.searchsorted(self.sorted_lengths, cap, side="right")))

    def row(self, seq_len: int, rng: np.random.Generator):
        i = int(self.by_length[int(rng.integers(self.available()))])
        return pad_front(self.tokens[self.offsets[i]: self.offsets[i + 1]], int(self.answer_lens[i]), seq_len,
                         self.shards, rng)

    def __call__(self, batch_size: int, seq_len: int, rng: np.random.Generator) -> dict:
        return stack_rows([self.row(seq_len, rng) for _ in range(batch_size)])
