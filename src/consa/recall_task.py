"""A synthetic recall task where retrieval past the window matters (the CPU demo's task).

Each sequence starts with ``pairs`` key–value facts, one position each, whose input embedding is
E[key] + E[value]; then random filler; then ``queries`` of the keys (a subset, so the last answer
cannot be guessed by elimination), each followed by its value. Loss and accuracy count only the
positions that must produce a value. With the facts more than (layers × W) tokens before the
queries, an all-SWA model cannot relay them, so accuracy tells whether the right units kept FA.

Token layout: 0 pad, 1..63 filler, 64..127 keys, 128..191 values (vocab 192).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

VOCAB = 192
FILLER = (1, 64)
KEYS = (64, 128)
VALUES = (128, 192)


@dataclass
class RecallTask:
    seq_len: int = 128
    pairs: int = 8
    queries: int = 4

    def __post_init__(self):
        if self.seq_len < self.pairs + 2 * self.queries:
            raise ValueError(f"seq_len {self.seq_len} is too short for {self.pairs} pairs and {self.queries} queries")

    def sample(self, batch_size: int, generator: torch.Generator) -> dict:
        """Token tensors: ``keys``/``values`` of the fact positions, ``input_ids`` of the rest."""
        b, t, p, q = batch_size, self.seq_len, self.pairs, self.queries
        nk = KEYS[1] - KEYS[0]
        keys = torch.stack([torch.randperm(nk, generator=generator)[:p] for _ in range(b)]) + KEYS[0]
        values = torch.randint(VALUES[0], VALUES[1], (b, p), generator=generator)
        ids = torch.randint(FILLER[0], FILLER[1], (b, t), generator=generator)
        pick = torch.stack([torch.randperm(p, generator=generator)[:q] for _ in range(b)])
        qk = torch.gather(keys, 1, pick)
        qv = torch.gather(values, 1, pick)
        start = t - 2 * q
        ids[:, start::2] = qk
        ids[:, start + 1 :: 2] = qv
        ids[:, :p] = keys
        loss_mask = torch.zeros(b, t, dtype=torch.bool)
        loss_mask[:, start::2] = True  # the query position predicts the value that follows
        return {"input_ids": ids, "fact_values": values, "loss_mask": loss_mask}

    @staticmethod
    def embed(model, batch: dict) -> torch.Tensor:
        """E[token] everywhere, plus E[value] on the fact positions."""
        emb = model.get_input_embeddings()
        x = emb(batch["input_ids"])
        p = batch["fact_values"].shape[1]
        return torch.cat([x[:, :p] + emb(batch["fact_values"]), x[:, p:]], dim=1)

    def batch_fn(self, model, batch_size: int, seed: int):
        """A pure function of the step (for resumable searches) yielding ``inputs_embeds`` batches."""

        def fn(step: int) -> dict:
            g = torch.Generator().manual_seed(seed * 1_000_003 + step)
            batch = self.sample(batch_size, g)
            with torch.no_grad():
                embeds = self.embed(model, batch)
            return {"inputs_embeds": embeds, "loss_mask": batch["loss_mask"], "input_ids": batch["input_ids"]}

        return fn


def recall_loss(logits: torch.Tensor, batch: dict) -> torch.Tensor:
    """Cross-entropy on the answer positions only (position i predicts token i+1)."""
    mask = batch["loss_mask"][:, :-1]
    target = batch["input_ids"][:, 1:][mask]
    return torch.nn.functional.cross_entropy(logits[:, :-1][mask].float(), target)


@torch.no_grad()
def recall_accuracy(model, task: RecallTask, n: int = 256, seed: int = 12345, batch_size: int = 64) -> float:
    """Exact-match accuracy of the greedy answer at every queried position."""
    g = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    hits = total = 0
    for start in range(0, n, batch_size):
        batch = task.sample(min(batch_size, n - start), g)
        logits = model(inputs_embeds=task.embed(model, batch).to(device)).logits
        mask = batch["loss_mask"][:, :-1].to(device)
        pred = logits[:, :-1].argmax(-1)[mask]
        gold = batch["input_ids"][:, 1:].to(device)[mask]
        hits += int((pred == gold).sum())
        total += int(mask.sum())
    return hits / max(1, total)

