"""Helpers shared by subcommands: device/dtype parsing, model loading, data sources for search."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import ConsaError
from ..files import read_json


def pick_device(name: str | None) -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConsaError("--device cuda asked for, but no CUDA device is available")
    return torch.device(name)


def pick_dtype(name: str | None, device: torch.device) -> torch.dtype:
    table = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
             "fp16": torch.float16, "float16": torch.float16}
    if name in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in table:
        raise ConsaError(f"unknown dtype {name!r}; choose fp32, bf16 or fp16")
    return table[name]


def check_model_dir(model_dir) -> Path:
    """A model directory with a readable JSON config, checked before anything loads or is written
    (transformers reports a malformed config.json as a traceback)."""
    d = Path(model_dir)
    if not d.is_dir():
        raise ConsaError(f"model directory not found: {d}")
    if not isinstance(read_json(d / "config.json", what="model config"), dict):
        raise ConsaError(f"model config {d / 'config.json'} is not a JSON object")
    return d


def load(model_dir: str, device: torch.device, dtype: torch.dtype):
    from ..models import load_model

    check_model_dir(model_dir)
    return load_model(model_dir, dtype=dtype, device=str(device))


def load_for(args, dist=None):
    """The model of ``args.model`` for one process (on ``--device``) or for a torchrun rank (on the CPU:
    ``fully_shard`` moves each rank's shard to its device), in ``--dtype``."""
    if dist is None:
        device = pick_device(args.device)
        return load(args.model, device, pick_dtype(args.dtype, device))
    return load(args.model, torch.device("cpu"), pick_dtype(args.dtype, dist.device))


def run_on_ranks(args, under_torchrun: bool, body):
    """``body(dist)`` as this process's part of the job (``dist`` None on one process), inside the staged,
    resumable ``--out`` on rank 0 (a Ctrl-C keeps a checkpoint for ``--resume``; another failure removes a
    fresh ``--out``). Returns ``(result, dist)``; a rank other than 0 that meets a ConsaError returns
    ``(None, dist)`` (every rank meets it, rank 0 alone reports it). The process group is shut down after."""
    from contextlib import nullcontext

    from ..files import has_checkpoint, output_dir
    from ..train import distributed as D

    dist = D.init_from_env(args.device, activation_checkpointing=not args.no_activation_checkpointing) if under_torchrun else None
    try:
        torch.manual_seed(args.seed)
        main = dist is None or dist.is_main
        with output_dir(args.out, resumable=True, keep=has_checkpoint) if main else nullcontext():
            return body(dist), dist
    except ConsaError:
        if dist is not None and not dist.is_main:
            return None, dist
        raise
    finally:
        D.shutdown(dist)


def check_corpus_vocab(corpus, split: str, vocab_size: int) -> None:
    """A corpus tokenized with a larger vocabulary than the model's would index past its embedding
    (an IndexError deep in the forward); refuse it as one line before any work."""
    meta_path = Path(corpus) / split / "meta.json"
    if not meta_path.is_file():
        return  # TokenShards.open reports a missing or broken corpus
    n = (read_json(meta_path, what="corpus metadata") or {}).get("vocab_size")
    if isinstance(n, int) and n > vocab_size:
        raise ConsaError(f"corpus {corpus} was tokenized with a vocabulary of {n} tokens, the model has {vocab_size}; "
                         "build the corpus with the model's tokenizer (consa data build --tokenizer MODEL_DIR)")


def search_batches(args, model, vocab_size: int):
    """A pure function step -> batch for the search, from a built corpus or random tokens."""
    import numpy as np

    b, t, seed = args.batch_size, args.seq_len, args.seed
    if args.corpus:
        from ..data.shards import TokenShards
        from ..data.tokenizer import load_tokenizer
        from ..train.batches import MixedSource, corpus_source, retrieval_source, split_batch

        check_corpus_vocab(args.corpus, "train", vocab_size)
        shards = TokenShards.open(args.corpus, "train")
        if shards.num_tokens < t + 1:
            raise ConsaError(f"corpus {args.corpus} holds {shards.num_tokens} tokens, fewer than --seq-len {t}")
        source = corpus_source(shards)
        mix = getattr(args, "retrieval_mix", 0.0)
        if not 0.0 <= mix <= 1.0:
            raise ConsaError(f"--retrieval-mix must be in [0, 1], got {mix}")
        if mix > 0:  # long documents mixed with synthetic retrieval rows (GUIDE §1: make long range matter)
            extra, _ = retrieval_source(shards, load_tokenizer(args.corpus), getattr(args, "retrieval_source", "builtin"))
            source = MixedSource(source, extra, mix)

        def from_corpus(step: int) -> dict:
            ids, answers = split_batch(source(b, t, np.random.default_rng([seed, step])))
            return {"input_ids": ids, "answer_mask": answers}  # answers marked in retrieval rows (--answer-weight)

        return from_corpus

    def random_tokens(step: int) -> dict:  # for smoke tests and tiny random models
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        return {"input_ids": torch.randint(0, vocab_size, (b, t), generator=g)}

    return random_tokens
