"""The experiment's batches, built from ``consa.data.batches`` over the workdir's corpus and retrieval bank:
the pretraining source, and the one step -> batch function that search, heal and budget all use."""

from __future__ import annotations

from ..data.bank import BankSource
from ..data.batches import BatchFn, MixedSource, RetrievalSource, ShareSource, corpus_source, step_batches
from .workdir import Workdir


def pretrain_source(wd: Workdir, steps: int):
    """The pretraining batch source of the config: corpus windows, ``retrieval_mix`` of them replaced by
    bank items (with the length curriculum), then ``dense_mix`` of all rows by dense recall rows."""
    from ..data.shards import TokenShards
    from ..data.tokenizer import load_tokenizer

    p = wd.cfg.pretrain
    shards = TokenShards.open(wd.corpus, "train")
    source = corpus_source(shards)
    if p.retrieval_mix > 0:
        bank = BankSource(wd.bank, shards, curriculum_steps=round(p.bank_curriculum * steps))
        source = MixedSource(source, bank, p.retrieval_mix)
    if p.dense_mix > 0:
        dense = RetrievalSource(shards, load_tokenizer(wd.corpus), num_pairs=p.dense_pairs,
                                num_queries=p.dense_queries, value_digits=p.bank_digits,
                                curriculum_steps=round(p.dense_curriculum * steps))
        source = MixedSource(source, dense, p.dense_mix)
    return source


def training_data(wd: Workdir, share: float):
    """(the corpus's train shards, the retrieval bank or None): None without a bank or at ``share`` 0."""
    from ..data.shards import TokenShards

    shards = TokenShards.open(wd.corpus, "train")
    return shards, (BankSource(wd.bank, shards) if (wd.bank.is_file() and share > 0) else None)


def search_batch_fn(shards, bank: BankSource | None, batch: int, seq_len: int, share: float, seed: int) -> BatchFn:
    """step -> {"input_ids", "answer_mask"}: ``share`` of the rows retrieval items from ``bank`` (their answer
    tokens marked), the rest corpus windows; the same share in every batch."""
    source = corpus_source(shards) if bank is None else ShareSource(corpus_source(shards), bank, share)
    return step_batches(source, batch, seq_len, (seed, 7))
