"""The user's own text as the filler of the text retrieval tasks (passkey, multikey).

    hay = load_haystack("my-docs/")          # a .txt/.md/.jsonl file, or a directory of them
    hay.check_length(tokenizer, 8192)        # ConsaError when the text cannot fill 8192 tokens
    make_items("passkey", tokenizer, 8192, 0.5, 20, seed=0, haystack=hay)

A user haystack is never repeated inside a prompt (the default one cycles: it is far longer than any
context), so a text too short for the context is an error rather than a silently looped document.
``sha256`` hashes the documents' content in order (not their paths or times): it goes into the eval
fingerprint, so results made over one haystack are never reused for another.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from ..errors import ConsaError

__all__ = ["SUFFIXES", "TEXT_TASKS", "Haystack", "load_haystack", "haystack_tokens_needed"]

TEXT_TASKS = ("passkey", "multikey")  # the tasks whose filler is natural text, which a haystack replaces
SUFFIXES = (".txt", ".md", ".jsonl")
NEED_FACTOR = 1.1  # the filler starts ~5% in and the length search needs slack: see haystack_tokens_needed


def haystack_tokens_needed(length: int) -> int:
    """Tokens of haystack a ``length``-token prompt may draw on: the filler starts at 5% of the length
    (room to move the needle to its depth) and the search may shift it a few % more."""
    return math.ceil(NEED_FACTOR * int(length))


@dataclass(frozen=True)
class Haystack:
    """Documents (non-blank strings, in a fixed order), where they came from, and their content hash."""

    docs: tuple[str, ...]
    source: str
    sha256: str

    @classmethod
    def from_texts(cls, texts: Iterable[str] | str, source: str = "python") -> "Haystack":
        docs = (texts,) if isinstance(texts, str) else tuple(texts)
        if not all(isinstance(d, str) for d in docs):
            raise ConsaError("a haystack is a list of strings")
        docs = tuple(d for d in docs if d.strip())
        if not docs:
            raise ConsaError(f"haystack {source} is empty")
        return cls(docs, source, _sha256(docs))

    def info(self) -> dict:
        """What eval.json records about the haystack."""
        return {"source": self.source, "sha256": self.sha256, "documents": len(self.docs), "chars": sum(map(len, self.docs))}

    def count_tokens(self, tokenizer, stop_at: int | None = None) -> int:
        """Tokens of the documents (each encoded in 64K-char chunks), counting stops at ``stop_at``."""
        from .tokenizer import backend

        b, n = backend(tokenizer), 0
        for d in self.docs:
            for i in range(0, len(d), 65536):
                n += len(b.encode(d[i : i + 65536], add_special_tokens=False).ids)
                if stop_at is not None and n >= stop_at:
                    return n
        return n

    def check_length(self, tokenizer, length: int) -> None:
        """ConsaError naming the shortfall when the haystack cannot fill a ``length``-token prompt."""
        need = haystack_tokens_needed(length)
        have = self.count_tokens(tokenizer, stop_at=need)
        if have < need:
            raise ConsaError(
                f"haystack {self.source} is too short: {have} tokens, a context of {length} tokens needs at least {need} "
                f"({NEED_FACTOR:g}x; the text is never repeated); give more text or shorter lengths"
            )


def _sha256(docs: tuple[str, ...]) -> str:
    h = hashlib.sha256()
    for d in docs:  # length-prefixed, so ("ab", "c") and ("a", "bc") differ
        b = d.encode("utf-8")
        h.update(len(b).to_bytes(8, "big"))
        h.update(b)
    return h.hexdigest()


def load_haystack(path: str | os.PathLike) -> Haystack:
    """A haystack from a .txt/.md file (one document), a .jsonl file (one document per line, its
    ``text`` field) or a directory (every such file below it, in sorted path order)."""
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in SUFFIXES)
        if not files:
            raise ConsaError(f"haystack directory {p} has no {', '.join(SUFFIXES)} files")
    elif p.is_file():
        if p.suffix.lower() not in SUFFIXES:
            raise ConsaError(f"haystack {p}: expected a {', '.join(SUFFIXES)} file or a directory of them")
        files = [p]
    else:
        raise ConsaError(f"haystack not found: {p}")
    docs: list[str] = []
    for f in files:
        docs += _read(f)
    if not any(d.strip() for d in docs):
        raise ConsaError(f"haystack {p} has no text")
    return Haystack.from_texts(docs, source=str(p))


def _read(f: Path) -> list[str]:
    try:
        text = f.read_text("utf-8")
    except UnicodeDecodeError as e:
        raise ConsaError(f"haystack file {f} is not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise ConsaError(f"cannot read haystack file {f}: {e.strerror or e}") from None
    if f.suffix.lower() != ".jsonl":
        return [text]
    docs = []
    for no, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConsaError(f"haystack file {f}, line {no}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise ConsaError(f"haystack file {f}, line {no}: no string 'text' field")
        docs.append(row["text"])
    return docs
