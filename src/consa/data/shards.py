"""Packed token shards: the on-disk form of a built corpus, read through memory maps.

Layout of a corpus directory (made by :func:`consa.data.corpus.build_corpus`)::

    tokenizer.json, tokenizer_config.json   the tokenizer (load with consa.data.load_tokenizer)
    train/tokens.bin                        all train documents' tokens, each followed by eos
    train/doc_offsets.npy                   int64 [num_docs + 1]
    train/meta.json                         dtype, counts, eos id, sha256 of the two files above
    validation/…                            the same for the validation split
    stats.json                              corpus statistics (see docs/DATA.md)
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterator

import numpy as np

from ..errors import ConsaError

SPLITS = ("train", "validation")
TOKENS_FILE = "tokens.bin"
OFFSETS_FILE = "doc_offsets.npy"
META_FILE = "meta.json"

__all__ = ["TokenShards", "ShardWriter", "SPLITS", "token_dtype", "write_split"]


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else uint32."""
    return np.dtype(np.uint16) if int(vocab_size) <= 65536 else np.dtype(np.uint32)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class ShardWriter:
    """Append documents (1-D int arrays, eos NOT included) to one split; :meth:`close` writes the
    offsets and meta.json and returns the meta dict."""

    def __init__(self, split_dir, *, vocab_size: int, eos_id: int):
        self.dir = Path(split_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dtype = token_dtype(vocab_size)
        self.vocab_size = int(vocab_size)
        self.eos_id = int(eos_id)
        self._eos = np.array([eos_id], dtype=self.dtype).tobytes()
        self._limit = 1 << (8 * self.dtype.itemsize)
        self.offsets = [0]
        self._f = open(self.dir / TOKENS_FILE, "wb")

    def add(self, arr) -> int:
        a = np.asarray(arr)
        if a.size and (int(a.max()) >= self._limit or int(a.min()) < 0):
            raise ConsaError(f"token id out of range for {self.dtype} (vocab size {self.vocab_size})")
        self._f.write(a.astype(self.dtype, copy=False).tobytes())
        self._f.write(self._eos)
        self.offsets.append(self.offsets[-1] + int(a.size) + 1)
        return int(a.size) + 1

    def close(self) -> dict:
        self._f.close()
        np.save(self.dir / OFFSETS_FILE, np.asarray(self.offsets, dtype=np.int64))
        meta = {
            "format": "consa-token-shards/1",
            "dtype": self.dtype.name,
            "num_tokens": self.offsets[-1],
            "num_docs": len(self.offsets) - 1,
            "eos_id": self.eos_id,
            "vocab_size": self.vocab_size,
            "tokens_sha256": _sha256_file(self.dir / TOKENS_FILE),
            "offsets_sha256": _sha256_file(self.dir / OFFSETS_FILE),
        }
        (self.dir / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        return meta


def write_split(split_dir, docs, *, vocab_size: int, eos_id: int) -> dict:
    """Write documents (iterable of 1-D int arrays, eos NOT included) as one split; returns its meta."""
    w = ShardWriter(split_dir, vocab_size=vocab_size, eos_id=eos_id)
    for a in docs:
        w.add(a)
    return w.close()


def _check_tokens(tokens: np.ndarray, offsets: np.ndarray, eos_id: int, vocab_size, where: Path) -> None:
    """Refuse a tokens.bin whose bytes were overwritten: an id past the vocabulary would index past the
    model's embedding deep in a forward pass (the corpus vocabulary is checked against the model's
    separately), and every document must end with eos. One pass over the ids (a memory map): a second
    or so per GB, cheaper than hashing them against meta.json's sha256."""
    if not tokens.size:
        return
    if isinstance(vocab_size, int) and not isinstance(vocab_size, bool):
        top = int(tokens.max())
        if top >= vocab_size:
            raise ConsaError(f"corrupt corpus split {where}: {TOKENS_FILE} holds token id {top}, "
                             f"past the corpus vocabulary of {vocab_size}")
    ends = np.asarray(tokens[offsets[1:] - 1])
    if ends.size and not np.all(ends == eos_id):
        bad = int(np.flatnonzero(ends != eos_id)[0])
        raise ConsaError(f"corrupt corpus split {where}: document {bad} of {TOKENS_FILE} does not end with eos ({eos_id})")


class TokenShards:
    """One split of a built corpus. ``tokens`` is a read-only memmap (documents concatenated, each
    ended by ``eos_id``); ``doc_offsets[i]:doc_offsets[i+1]`` is document i, its eos included."""

    def __init__(self, tokens: np.ndarray, doc_offsets: np.ndarray, eos_id: int, *, corpus_dir=None, split: str = "train", meta: dict | None = None):
        self.tokens = tokens
        self.doc_offsets = doc_offsets
        self.eos_id = int(eos_id)
        self.num_tokens = int(tokens.shape[0])
        self.num_docs = int(doc_offsets.shape[0]) - 1
        self.corpus_dir = Path(corpus_dir) if corpus_dir is not None else None
        self.split = split
        self.meta = meta or {}

    @classmethod
    def open(cls, corpus_dir, split: str = "train") -> "TokenShards":
        """Open ``corpus_dir/split``; :class:`ConsaError` (one line) if it is missing or corrupt."""
        if split not in SPLITS:
            raise ConsaError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
        root = Path(corpus_dir)
        if not root.is_dir():
            raise ConsaError(f"corpus directory not found: {root} (build one with `consa data build`)")
        d = root / split
        meta_p, tok_p, off_p = d / META_FILE, d / TOKENS_FILE, d / OFFSETS_FILE
        for p in (meta_p, tok_p, off_p):
            if not p.is_file():
                raise ConsaError(f"{root} is not a consa corpus: {p.relative_to(root)} is missing")
        try:  # (a binary meta.json is a UnicodeDecodeError, a ValueError)
            meta = json.loads(meta_p.read_text(encoding="utf-8"))
            dtype = np.dtype(meta["dtype"])
            eos_id = int(meta["eos_id"])
        except (ValueError, KeyError, TypeError, OSError) as e:
            raise ConsaError(f"corrupt corpus split {d}: {META_FILE}: {type(e).__name__}: {e}".splitlines()[0]) from None
        try:
            offsets = np.load(off_p, allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            why = "it holds pickled objects, which consa never loads" if "pickle" in str(e) else f"{type(e).__name__}: {e}"
            raise ConsaError(f"corrupt corpus split {d}: {OFFSETS_FILE} is not a plain numpy array ({why})".splitlines()[0]) from None
        if dtype not in (np.dtype(np.uint16), np.dtype(np.uint32)):
            raise ConsaError(f"corrupt corpus split {d}: unsupported token dtype {dtype}")
        size = tok_p.stat().st_size
        if size % dtype.itemsize:
            raise ConsaError(f"corrupt corpus split {d}: {TOKENS_FILE} size {size} is not a multiple of {dtype.itemsize}")
        n = size // dtype.itemsize
        if (
            offsets.ndim != 1
            or offsets.dtype != np.int64
            or offsets.size < 1
            or offsets[0] != 0
            or offsets[-1] != n
            or n != meta.get("num_tokens", n)
            or (offsets.size > 1 and np.any(np.diff(offsets) <= 0))
        ):
            raise ConsaError(f"corrupt corpus split {d}: document offsets do not match {TOKENS_FILE} ({n} tokens)")
        tokens = np.memmap(tok_p, dtype=dtype, mode="r", shape=(n,)) if n else np.zeros(0, dtype=dtype)
        _check_tokens(tokens, offsets, eos_id, meta.get("vocab_size"), d)
        return cls(tokens, offsets, eos_id, corpus_dir=root, split=split, meta=meta)

    def __len__(self) -> int:
        return self.num_docs

    def __repr__(self) -> str:
        return f"TokenShards({str(self.corpus_dir)!r}, split={self.split!r}, docs={self.num_docs}, tokens={self.num_tokens})"

    def doc_lengths(self) -> np.ndarray:
        """Tokens per document, eos included."""
        return np.diff(self.doc_offsets)

    def sample_batch(self, batch_size: int, seq_len: int, rng: np.random.Generator):
        """``batch_size`` random windows of ``seq_len`` tokens (they may cross document boundaries,
        which are marked by eos) as a ``torch.LongTensor`` [B, seq_len]."""
        import torch

        if seq_len < 1 or batch_size < 1:
            raise ConsaError(f"batch_size and seq_len must be positive (got {batch_size}, {seq_len})")
        if self.num_tokens < seq_len:
            raise ConsaError(f"{self.split} split has {self.num_tokens} tokens, fewer than seq_len={seq_len}")
        starts = rng.integers(0, self.num_tokens - seq_len + 1, size=batch_size)
        out = np.stack([np.asarray(self.tokens[s : s + seq_len], dtype=np.int64) for s in starts])
        return torch.from_numpy(out)

    def documents(self, min_tokens: int = 0) -> Iterator[np.ndarray]:
        """Whole documents (int64 arrays, eos included) with at least ``min_tokens`` tokens, in corpus order."""
        lengths = self.doc_lengths()
        for i in np.flatnonzero(lengths >= min_tokens):
            a, b = self.doc_offsets[i], self.doc_offsets[i + 1]
            yield np.asarray(self.tokens[a:b], dtype=np.int64)

    def tokenizer(self):
        """The corpus's tokenizer (loaded from the corpus directory)."""
        from .tokenizer import load_tokenizer

        if self.corpus_dir is None:
            raise ConsaError("these shards were not opened from a corpus directory")
        return load_tokenizer(self.corpus_dir)
