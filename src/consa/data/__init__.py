"""Offline data for consa: corpora → packed token shards, tokenizers, synthetic long-context tasks.

See docs/DATA.md. Nothing here downloads anything.
"""

from .corpus import KNOWN_SOURCES, build_corpus
from .shards import TokenShards
from .tasks import TASKS, TaskItem, make_items, score
from .tokenizer import load_tokenizer, train_tokenizer

__all__ = [
    "KNOWN_SOURCES",
    "TASKS",
    "TaskItem",
    "TokenShards",
    "build_corpus",
    "load_tokenizer",
    "make_items",
    "score",
    "train_tokenizer",
]
