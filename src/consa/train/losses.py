"""The losses of a search or heal step: KL to the teacher, LM, answer positions, as a global mean.

Each term is a (sum, count) pair so that several processes, and several micro-batches of one process
(``accumulate.py``), add up to exactly the mean a single pass over the whole batch would take.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .distributed import Dist


def kl_loss(student_logits, teacher_logits, mask=None, temperature: float = 1.0) -> torch.Tensor:
    """Mean over (unmasked) positions of KL(teacher ‖ student) on next-token distributions."""
    total, count = kl_sum(student_logits, teacher_logits, mask, temperature)
    return total / count.clamp_min(1.0)


def forward_logits(model, batch: dict) -> torch.Tensor:
    """Run ``model`` on a batch given as token ids or as ``inputs_embeds`` (synthetic tasks).

    No KV cache: nothing reads it, and a cache filled again by activation-checkpoint recomputation
    would change the recomputed shapes."""
    inputs = {"attention_mask": batch.get("attention_mask"), "use_cache": False}
    if batch.get("inputs_embeds") is not None:
        inputs["inputs_embeds"] = batch["inputs_embeds"]
    else:
        inputs["input_ids"] = batch["input_ids"]
    return model(**inputs).logits


def _masked_sum(values: torch.Tensor, mask) -> tuple[torch.Tensor, torch.Tensor]:
    if mask is None:
        return values.sum(), values.new_tensor(float(values.numel()))
    mask = mask.to(values.dtype)
    return (values * mask).sum(), mask.sum()


KL_CHUNK = 2048  # positions per KL chunk: bounds the fp32 softmax copies to chunk × vocab


def _kl_positions(student_logits, teacher_logits, temperature: float) -> torch.Tensor:
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return (t.exp() * (t - s)).sum(-1)


def kl_sum(student_logits, teacher_logits, mask=None, temperature: float = 1.0, chunk: int = KL_CHUNK):
    """(Σ KL over unmasked positions, their count): the parts of :func:`kl_loss`, for a global mean.

    Long sequences go in chunks of positions, each under activation checkpointing, so the fp32
    log-softmax copies (4 × positions × vocab floats, 80 GB for 32K × 152K) never exist at once:
    memory is one chunk's worth; the value and gradient are those of the unchunked sum."""
    n = student_logits.shape[1]
    if n <= chunk or not torch.is_grad_enabled():
        return _masked_sum(_kl_positions(student_logits, teacher_logits, temperature), mask)
    from torch.utils.checkpoint import checkpoint

    parts = [checkpoint(_kl_positions, student_logits[:, i : i + chunk], teacher_logits[:, i : i + chunk], temperature,
                        use_reentrant=False) for i in range(0, n, chunk)]
    return _masked_sum(torch.cat(parts, dim=1), mask)


def lm_sum(logits, input_ids, mask=None):
    logits, target = logits[:, :-1].float(), input_ids[:, 1:]
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none").view_as(target)
    return _masked_sum(nll, None if mask is None else mask[:, 1:])


def global_task_loss(logits, teacher, batch, loss_mask, cfg, dist: Dist):
    """This rank's share of the global-mean task loss, scaled so that *averaged* gradients are exact.

    ``cfg`` gives ``kl_weight``, ``lm_weight``, ``temperature`` and optionally ``answer_weight``: a KL term
    over only the positions that predict retrieval answers (a batch's ``answer_mask``, answer tokens
    marked as in pretraining), so that a few answer tokens are not drowned by thousands of positions
    of plain text. Each term is Σ_local / count_global;
    the count is all-reduced first. Multiplying by the world size makes the mean over ranks of the
    gradients (what FSDP computes) the gradient of the global mean, the very loss a single process
    would use on the whole batch. Returns (loss to backpropagate, the global task loss as a float).
    """
    d = dist
    terms = task_terms(logits, teacher, batch, loss_mask, cfg)
    loss = logits.new_zeros((), dtype=torch.float32)
    if not terms:
        return loss, 0.0
    stats = torch.stack([x for _, s, c in terms for x in (s.detach().float(), c.float())])
    d.all_reduce_sum_(stats)  # [Σ_1, n_1, Σ_2, n_2, ...] over the global batch
    task = 0.0
    for i, (w, s, _) in enumerate(terms):
        n = stats[2 * i + 1].clamp_min(1.0)
        loss = loss + w * d.world_size * s / n
        task += w * float(stats[2 * i] / n)
    return loss, task


def task_terms(logits, teacher, batch, loss_mask, cfg) -> list[tuple]:
    """[(weight, Σ over this rank's positions, their count)] of every active loss term (in the order
    ``accumulate.term_counts`` counts them)."""
    terms = []
    if teacher is not None:
        terms.append((cfg.kl_weight, *kl_sum(logits, teacher, loss_mask, cfg.temperature)))
    if cfg.lm_weight > 0 and "input_ids" in batch:
        terms.append((cfg.lm_weight, *lm_sum(logits, batch["input_ids"], loss_mask)))
    aw = getattr(cfg, "answer_weight", 0.0)
    if aw > 0 and teacher is not None and batch.get("answer_mask") is not None:
        terms.append((aw, *kl_sum(logits, teacher, answer_positions(batch["answer_mask"], loss_mask), cfg.temperature)))
    return terms


def answer_positions(answer_mask: torch.Tensor, loss_mask=None) -> torch.Tensor:
    """The positions whose next token is an answer token (logits at p predict token p + 1), within
    ``loss_mask`` when one is given."""
    pos = torch.zeros_like(answer_mask, dtype=torch.bool)
    pos[:, :-1] = answer_mask[:, 1:].bool()
    return pos if loss_mask is None else pos & loss_mask.bool()
