"""The ``data`` stage: the corpus (tokenizer + token shards) in ``WORKDIR/corpus``, or an existing corpus."""

from __future__ import annotations

import json

from ...errors import ConsaError
from ..workdir import Workdir, say


def run(wd: Workdir, deadline: float | None = None) -> dict:
    cfg = wd.cfg
    if cfg.data.corpus:
        if not (wd.corpus / "train" / "meta.json").is_file():
            raise ConsaError(f"data.corpus {wd.corpus} is not a built corpus (no train/meta.json)")
        say(f"data: using the existing corpus {wd.corpus}")
    elif (wd.corpus / "stats.json").is_file():
        say(f"data: corpus already built in {wd.corpus}")
    else:
        from ...data.corpus import build_corpus

        max_bytes = int(cfg.data.max_mb * 1e6) if cfg.data.max_mb else None
        wd.root.mkdir(parents=True, exist_ok=True)
        build_corpus(cfg.data.sources, wd.corpus, vocab_size=cfg.data.vocab_size, max_bytes=max_bytes,
                     workers=cfg.data.workers, seed=cfg.data.seed)
    stats = json.loads((wd.corpus / "stats.json").read_text()) if (wd.corpus / "stats.json").is_file() else {}
    return {"corpus": str(wd.corpus), "tokens": stats.get("tokens"), "documents": stats.get("documents")}
