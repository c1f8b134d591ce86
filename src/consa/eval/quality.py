"""Perplexity of held-out long documents, overall and split by how far back a token can look.

Positions are 0-based inside an evaluation sequence; the token at position ``p`` is predicted from
positions ``0 … p−1`` (so position 0 is never scored). With sliding window ``W`` (query slot ``i``
sees ``i−W+1 … i``) the query at ``p−1`` sees ``p−W … p−1``:

* **short-range** positions ``1 ≤ p ≤ W``: the whole prefix is inside the window, so an SWA layer
  sees exactly what a full-attention layer sees;
* **long-range** positions ``p > 2W``: at least ``W+1`` earlier tokens lie outside the window.

Every sequence has the same length (``seq_len`` tokens cut from documents of at least that many
tokens, consecutive non-overlapping chunks), so batches need no padding and every number is a plain
token-weighted mean of per-token NLL (``ppl = exp(nll)``).
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConsaError

RANGES = ("overall", "short", "long")


def position_masks(seq_len: int, window: int) -> dict[str, torch.Tensor]:
    """Boolean masks over predicted positions 1 … seq_len−1 (index j ↔ position j+1)."""
    pos = torch.arange(1, seq_len)
    return {"overall": torch.ones_like(pos, dtype=torch.bool), "short": pos <= window, "long": pos > 2 * window}


def token_nll(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """NLL (fp32) of each next token: [B, T, V] logits, [B, T] ids → [B, T−1] (entry j ↔ position j+1)."""
    return F.cross_entropy(
        logits[:, :-1].float().transpose(1, 2), input_ids[:, 1:].to(logits.device), reduction="none"
    )


def chunk_documents(
    documents: Iterable[Sequence[int] | np.ndarray], seq_len: int, max_sequences: int, max_chunks_per_doc: int = 4
) -> list[np.ndarray]:
    """Cut up to ``max_sequences`` sequences of exactly ``seq_len`` tokens from documents, in order
    (at most ``max_chunks_per_doc`` consecutive chunks per document, so one book cannot be the whole
    sample). Shorter documents are skipped."""
    out: list[np.ndarray] = []
    for doc in documents:
        doc = np.asarray(doc)
        for c in range(min(max_chunks_per_doc, len(doc) // seq_len)):
            out.append(doc[c * seq_len : (c + 1) * seq_len].astype(np.int64))
            if len(out) >= max_sequences:
                return out
    return out


def autocast_context(device: str | torch.device, dtype: str | None):
    """bf16/fp16 autocast on ``device`` or a no-op."""
    if not dtype:
        return contextlib.nullcontext()
    table = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
    if dtype not in table:
        raise ConsaError(f"unknown autocast dtype {dtype!r}; choose bf16 or fp16")
    return torch.autocast(device_type=torch.device(device).type, dtype=table[dtype])


def model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover - parameterless stubs
        return torch.device("cpu")


@torch.no_grad()
def perplexity(
    model,
    sequences: Sequence[np.ndarray] | torch.Tensor,
    window: int,
    *,
    batch_size: int = 4,
    autocast: str | None = None,
    progress: bool = False,
    desc: str = "ppl",
) -> dict:
    """Token-weighted NLL and perplexity overall / short-range (p ≤ W) / long-range (p > 2W).

    ``sequences``: equal-length token sequences (see :func:`chunk_documents`). Returns
    ``{"overall"|"short"|"long": {"nll", "ppl", "tokens"}, "seq_len", "sequences", "window"}``; a range
    with no tokens (sequence too short for p > 2W) has ``nll``/``ppl`` None.
    """
    if window < 1:
        raise ConsaError(f"window must be >= 1, got {window}")
    seqs = torch.as_tensor(np.stack([np.asarray(s, dtype=np.int64) for s in sequences])) if not torch.is_tensor(sequences) else sequences
    if seqs.ndim != 2 or seqs.shape[0] == 0 or seqs.shape[1] < 2:
        raise ConsaError("perplexity needs at least one sequence of at least 2 tokens")
    n, seq_len = seqs.shape
    masks = position_masks(seq_len, window)
    device = model_device(model)
    totals = {r: 0.0 for r in RANGES}
    counts = {r: 0 for r in RANGES}
    starts = range(0, n, batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=desc, unit="batch", leave=False)
    was_training = model.training
    model.eval()
    try:
        for s in starts:
            ids = seqs[s : s + batch_size].to(device)
            with autocast_context(device, autocast):
                logits = model(input_ids=ids, use_cache=False).logits
            nll = token_nll(logits, ids).double().cpu()  # [b, T-1]
            del logits
            for r in RANGES:
                sel = nll[:, masks[r]]
                totals[r] += float(sel.sum())
                counts[r] += sel.numel()
    finally:
        model.train(was_training)
    out: dict = {}
    for r in RANGES:
        mean = totals[r] / counts[r] if counts[r] else None
        out[r] = {"nll": mean, "ppl": math.exp(mean) if mean is not None else None, "tokens": counts[r]}
    out.update(seq_len=int(seq_len), sequences=int(n), window=int(window))
    return out


def sequences_from_shards(shards, seq_len: int, max_sequences: int, max_chunks_per_doc: int = 4) -> list[np.ndarray]:
    """Evaluation sequences from a :class:`consa.data.shards.TokenShards` split (long documents only)."""
    seqs = chunk_documents(shards.documents(min_tokens=seq_len), seq_len, max_sequences, max_chunks_per_doc)
    if not seqs:
        raise ConsaError(
            f"the corpus holds no document of at least {seq_len} tokens for perplexity "
            f"({getattr(shards, 'num_docs', '?')} documents); lower --ppl-length or use a corpus of longer documents"
        )
    return seqs


def iter_batches(items: Sequence, size: int) -> Iterator[Sequence]:
    for i in range(0, len(items), size):
        yield items[i : i + size]
