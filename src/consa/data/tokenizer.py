"""Tokenizers for consa corpora: train a byte-level BPE with ``tokenizers`` or load a local one.

A trained tokenizer has exactly one special token, ``<|endoftext|>``: it ends every document
(eos) and doubles as padding. Everything works offline; nothing is fetched from a hub.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable

from ..errors import ConsaError

EOS_TOKEN = "<|endoftext|>"

__all__ = ["EOS_TOKEN", "train_tokenizer", "load_tokenizer", "tokenizer_hash", "backend"]


def _wrap(backend_tok, eos: str | None):
    from transformers import PreTrainedTokenizerFast

    kwargs = {}
    if eos is not None:
        kwargs = {"eos_token": eos, "pad_token": eos}
    tok = PreTrainedTokenizerFast(tokenizer_object=backend_tok, **kwargs)
    tok.model_max_length = 1 << 30  # consa handles lengths itself; silence "longer than max" warnings
    return tok


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir):
    """Train a byte-level BPE of ``vocab_size`` tokens on ``texts`` and save it in ``out_dir``.

    Writes ``tokenizer.json`` plus the Hugging Face files, so both :func:`load_tokenizer` and
    ``AutoTokenizer.from_pretrained(out_dir)`` load it. Deterministic for the same texts in the
    same order. Returns a ``transformers.PreTrainedTokenizerFast``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if int(vocab_size) < 257 + 1:
        raise ConsaError(f"vocab size {vocab_size} is too small: a byte-level BPE needs at least 258 tokens")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=int(vocab_size),
        min_frequency=2,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf = _wrap(tok, EOS_TOKEN)
    hf.save_pretrained(str(out))
    # save_pretrained writes tokenizer.json too; rewrite it from the backend so the file is canonical
    tok.save(str(out / "tokenizer.json"))
    return hf


def load_tokenizer(path):
    """Load a tokenizer offline from a ``tokenizer.json`` file or a Hugging Face tokenizer directory
    (e.g. a consa corpus directory or a model directory). eos falls back to ``<|endoftext|>`` when the
    vocabulary has it; pad falls back to eos. Raises :class:`ConsaError` if missing or unreadable."""
    p = Path(path)
    if not p.exists():
        raise ConsaError(f"tokenizer not found: {p}")
    try:
        if p.is_file():
            from tokenizers import Tokenizer

            backend_tok = Tokenizer.from_file(str(p))
            eos = EOS_TOKEN if backend_tok.token_to_id(EOS_TOKEN) is not None else None
            tok = _wrap(backend_tok, eos)
        else:
            if not any((p / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")):
                raise ConsaError(f"no tokenizer in {p} (expected tokenizer.json or Hugging Face tokenizer files)")
            from transformers import AutoTokenizer

            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            tok = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
            if not getattr(tok, "is_fast", False):
                raise ConsaError(f"tokenizer in {p} has no fast (tokenizers) backend; consa needs one")
    except ConsaError:
        raise
    except Exception as e:  # json errors, tokenizers exceptions, OSError …
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConsaError(f"cannot load tokenizer from {p}: {msg}") from None
    if tok.eos_token is None and tok.convert_tokens_to_ids(EOS_TOKEN) not in (None, tok.unk_token_id):
        tok.eos_token = EOS_TOKEN
    if tok.eos_token is None:
        raise ConsaError(f"tokenizer {p} has no end-of-text token (eos); consa needs one to separate documents")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if (tok.model_max_length or 0) < 1 << 30:
        tok.model_max_length = 1 << 30  # lengths are consa's business; silence the long-input warning
    return tok


def backend(tokenizer):
    """The ``tokenizers.Tokenizer`` behind a fast HF tokenizer (or the object itself)."""
    b = getattr(tokenizer, "backend_tokenizer", None)
    if b is not None:
        return b
    if hasattr(tokenizer, "encode_batch") and hasattr(tokenizer, "to_str"):
        return tokenizer
    raise ConsaError(f"unsupported tokenizer type {type(tokenizer).__name__}: consa needs a fast (tokenizers) tokenizer")


def tokenizer_hash(tokenizer) -> str:
    """sha256 of the tokenizer's canonical JSON: the cache key for encoded documents."""
    s = backend(tokenizer).to_str()
    # normalise key order so the same tokenizer always hashes the same
    try:
        s = json.dumps(json.loads(s), sort_keys=True, separators=(",", ":"))
    except ValueError:
        pass
    return hashlib.sha256(s.encode("utf-8")).hexdigest()
