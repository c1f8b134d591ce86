"""Gradient accumulation over micro-batches, exact: the step's gradient is that of the whole batch.

One 32K sequence of the 8B shape peaks at 62.5 GiB of an H200 in a search step, so a batch of 4 fits one
or two GPUs only if each process runs its rows a few at a time, and a strong-scaling series from 1 to 8
GPUs can keep its global batch only that way. The global-mean loss of ``losses.global_task_loss`` divides every term's sum by that term's count over the
*whole* global batch; here the counts come first (they depend on the masks only, ``term_counts``), so
each micro-batch's backward can already use the final normaliser and the summed gradients equal the
one-pass gradient (up to float summation order).
"""

from __future__ import annotations

from typing import Callable

import torch

from .distributed import Dist
from .losses import answer_positions, task_terms


def term_counts(batch: dict, loss_mask, cfg, has_teacher: bool) -> list[torch.Tensor]:
    """The counts ``losses.task_terms`` divides by, from the masks alone, in its order of terms."""
    lead = batch["input_ids"] if batch.get("input_ids") is not None else batch["inputs_embeds"]
    b, t = lead.shape[0], lead.shape[1]

    def count(mask, n):  # on the batch's device: no host sync in the step
        return torch.tensor(float(n), device=lead.device) if mask is None else mask.float().sum()

    out = []
    if has_teacher:
        out.append(count(loss_mask, b * t))
    if cfg.lm_weight > 0 and "input_ids" in batch:
        out.append(count(None if loss_mask is None else loss_mask[:, 1:], b * (t - 1)))
    if getattr(cfg, "answer_weight", 0.0) > 0 and has_teacher and batch.get("answer_mask") is not None:
        out.append(answer_positions(batch["answer_mask"], loss_mask).float().sum())
    return out


def batch_rows(batch: dict) -> int:
    """Sequences in ``batch`` (token ids or embeddings)."""
    lead = batch["input_ids"] if batch.get("input_ids") is not None else batch["inputs_embeds"]
    return lead.shape[0]


def split_rows(batch: dict, rows: int) -> list[dict]:
    """``batch`` in slices of ``rows`` rows (the last may be shorter); non-batch entries are shared."""
    b = batch_rows(batch)
    return [{k: (v[i : i + rows] if torch.is_tensor(v) and v.dim() >= 1 and v.shape[0] == b else v) for k, v in batch.items()}
            for i in range(0, b, rows)]


def loss_mask_of(batch: dict):
    """The positions a loss counts: ``loss_mask``, else the padding mask, else all."""
    mask = batch.get("loss_mask")
    return batch.get("attention_mask") if mask is None else mask


def backward_micro_batches(batch: dict, rows: int, forward: Callable, cfg, dist: Dist) -> float:
    """Backpropagate this rank's share of the global-mean task loss ``rows`` sequences at a time.

    ``forward(chunk) -> (student logits, teacher logits or None)``. Each micro-batch's terms are divided
    by the global counts and scaled by the world size (as ``global_task_loss`` does), then backpropagated
    at once, so only one micro-batch's activations and logits live at a time. Returns the global task
    loss (a float, the same value ``global_task_loss`` reports)."""
    loss_mask = loss_mask_of(batch)
    first = True
    sums = None
    for chunk in split_rows(batch, rows):
        student, teacher = forward(chunk)
        if first:
            counts = torch.stack(term_counts(batch, loss_mask, cfg, teacher is not None)).to(student.device, torch.float32)
            dist.all_reduce_sum_(counts)
            counts = counts.clamp_min(1.0)
            sums = torch.zeros_like(counts)
            first = False
        terms = task_terms(student, teacher, chunk, loss_mask_of(chunk), cfg)
        if not terms:
            continue
        loss = sum(w * dist.world_size * s / n for (w, s, _), n in zip(terms, counts))
        sums += torch.stack([w * s.detach().float() for w, s, _ in terms])
        loss.backward()
    if sums is None or not len(sums):
        return 0.0
    dist.all_reduce_sum_(sums)
    return float((sums / counts).sum())
