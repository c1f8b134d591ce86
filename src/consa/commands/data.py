"""``consa data build``: build an offline corpus (tokenizer + packed token shards + stats.json)."""

from __future__ import annotations

import argparse
import json
import sys
import time

from .argtypes import fraction, nonneg_int, positive_float, positive_int


def register(subparsers) -> None:
    p = subparsers.add_parser("data", help="build offline corpora (tokenizer + packed token shards)", description=__doc__)
    sub = p.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    b = sub.add_parser(
        "build",
        help="build a corpus directory from the stdlib, site-packages, Debian docs or your own files",
        description=(
            "Build DIR with a tokenizer, train/ and validation/ token shards and stats.json. "
            "Sources: stdlib, site-packages, debian-docs, or paths (directories are walked for "
            ".txt .py .md .rst .jsonl, .gz too). See docs/DATA.md."
        ),
    )
    b.add_argument("--source", action="append", required=True, metavar="SRC", help="stdlib | site-packages | debian-docs | PATH (repeatable)")
    b.add_argument("--out", required=True, metavar="DIR", help="output corpus directory (must not exist or be empty, unless --overwrite)")
    b.add_argument("--tokenizer", metavar="PATH", help="use this tokenizer.json or HF tokenizer directory instead of training a BPE")
    b.add_argument("--vocab-size", type=positive_int, default=16384, metavar="N", help="BPE vocabulary size when training (default 16384)")
    b.add_argument("--val-fraction", type=fraction, default=0.05, metavar="F", help="share of documents for validation (default 0.05)")
    b.add_argument("--max-mb", type=positive_float, metavar="N", help="keep at most N MB of text (a seeded, content-hash-ordered subset)")
    b.add_argument("--workers", type=positive_int, metavar="N", help="processes for reading and encoding (default: all CPU cores)")
    b.add_argument("--seed", type=nonneg_int, default=0, help="seed of the document order and train/validation split (default 0)")
    b.add_argument("--overwrite", action="store_true", help="replace DIR if it exists")
    b.set_defaults(func=run_build)
    p.set_defaults(func=lambda args: (p.print_help(), 1)[1])


def run_build(args: argparse.Namespace) -> int:
    from ..data.corpus import build_corpus
    from ..files import output_dir

    t0 = time.time()
    with output_dir(args.out, exists="replace" if args.overwrite else "empty") as staged:
        stats = build_corpus(
            args.source,
            staged,
            tokenizer=args.tokenizer,
            vocab_size=args.vocab_size,
            val_fraction=args.val_fraction,
            max_bytes=int(args.max_mb * (1 << 20)) if args.max_mb is not None else None,
            workers=args.workers,
            seed=args.seed,
            overwrite=True,  # the staged directory is new; output_dir applies --overwrite
        )
    dt = time.time() - t0
    tr, va = stats["train"], stats["validation"]
    print(
        f"built {args.out} in {dt:.1f}s: {stats['documents']} documents, {stats['tokens']:,} tokens "
        f"(train {tr['documents']} docs / {tr['tokens']:,} tokens, validation {va['documents']} / {va['tokens']:,}); "
        f"docs >= 4K tokens: {stats['share_docs_ge_4k']:.1%}, >= 32K: {stats['share_docs_ge_32k']:.1%}; "
        f"vocab {stats['tokenizer']['vocab_size']}; dropped {json.dumps(stats['files_dropped'])}; "
        f"content hash {stats['content_hash'][:16]}"
    )
    sys.stdout.flush()
    return 0
