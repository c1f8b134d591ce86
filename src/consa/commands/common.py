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


def search_batches(args, model, vocab_size: int):
    """The step -> batch function of ``consa search`` / ``consa heal``: from ``--corpus`` (with
    ``--retrieval-mix``), or random tokens without one (smoke tests, tiny random models)."""
    from ..data.batches import corpus_batches, random_batches

    if not args.corpus:
        return random_batches(vocab_size, args.batch_size, args.seq_len, args.seed)
    return corpus_batches(args.corpus, args.batch_size, args.seq_len, args.seed, vocab_size=vocab_size,
                          retrieval_mix=getattr(args, "retrieval_mix", 0.0),
                          retrieval_kind=getattr(args, "retrieval_source", "builtin"))
