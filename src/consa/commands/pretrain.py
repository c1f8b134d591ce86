"""``consa pretrain``: train a small full-attention Qwen3 base model from scratch on a consa corpus."""

from __future__ import annotations

import argparse
import json

from .argtypes import fraction, nonneg_float, nonneg_int, positive_float, positive_int


def register(subparsers) -> None:
    from ..presets import PRESETS

    p = subparsers.add_parser(
        "pretrain",
        help="train a Qwen3-architecture base model from scratch on a built corpus",
        description="Train a full-attention Qwen3 base model from scratch (AdamW, warm-up + cosine, bf16 + "
                    "optional torch.compile on GPU). OUT becomes a Hugging Face model directory; OUT/checkpoint "
                    "holds the resumable state. Presets: " + "; ".join(
                        f"{n} ({q.num_layers} layers, hidden {q.hidden_size}, context {q.context}, W {q.window})"
                        for n, q in PRESETS.items()),
    )
    # numbers are parsed as plain types and validated by consa (one-line errors, exit 2)
    p.add_argument("--corpus", required=True, help="corpus dir from `consa data build` (tokenizer + shards)")
    p.add_argument("--preset", default="tiny", help=f"model size: {', '.join(PRESETS)} (default tiny)")
    p.add_argument("--out", required=True, help="output model directory")
    p.add_argument("--tokens", type=positive_int, help="training tokens (default: the preset's budget)")
    p.add_argument("--steps", type=positive_int, help="optimizer steps (instead of --tokens)")
    p.add_argument("--batch-size", type=positive_int, help="sequences per step (default: preset)")
    p.add_argument("--seq-len", type=positive_int, help="sequence length (default: the preset's context)")
    p.add_argument("--lr", type=positive_float, help="peak learning rate (default: preset)")
    p.add_argument("--warmup", type=nonneg_int, help="warm-up steps (default: 5%% of the run, at most 1000)")
    p.add_argument("--grad-accum", type=positive_int, default=1, help="micro-batches per step (same result, less memory)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--threads", type=positive_int, help="CPU threads for torch (1 is often fastest for the tiny preset)")
    p.add_argument("--compile", action="store_true", help="torch.compile the decoder blocks (regional: seconds to compile; eager again if the compiler fails)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast (default: on for CUDA, off for CPU)")
    p.add_argument("--resume", action="store_true", help="continue the run in OUT from its last checkpoint")
    p.add_argument("--seed", type=nonneg_int, default=0)
    p.add_argument("--save-every", type=positive_int, help="checkpoint every N steps (default: 10 per run)")
    p.add_argument("--eval-every", type=positive_int, help="validation loss every N steps (default: 10 per run)")
    p.add_argument("--eval-batches", type=positive_int, default=4, help="validation batches per evaluation")
    p.add_argument("--retrieval-mix", type=fraction, default=0.0,
                   help="share of training sequences that are synthetic retrieval (key → value recall)")
    p.add_argument("--retrieval-source", default="builtin",
                   help="builtin (fast, corpus haystack) | tasks (consa.data.tasks.make_items, ~0.1 s/item) | auto")
    p.add_argument("--retrieval-pairs", type=positive_int, default=4,
                   help="builtin retrieval rows: key -> value statements per row")
    p.add_argument("--retrieval-queries", type=positive_int, default=2,
                   help="builtin retrieval rows: how many of the statements are asked back at the end")
    p.add_argument("--retrieval-digits", type=positive_int, default=5, help="digits of the values / pass keys (1..9)")
    p.add_argument("--answer-weight", type=nonneg_float, default=0.0,
                   help="add this weight × mean cross-entropy on the retrieval rows' answer tokens to the loss "
                        "(teaches the long-range copy; the logged loss stays the plain LM loss)")
    p.add_argument("--time-limit", type=positive_float,
                   help="seconds: checkpoint and stop cleanly when exceeded (rerun with --resume)")
    p.add_argument("--stop-at", type=positive_int, metavar="STEP",
                   help="stop after this step as at the time limit (resumable), the schedule still spanning --steps: "
                        "replicates a run that a time limit stopped there")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..files import has_checkpoint, output_dir
    from ..train.pretrain import LOG_FILE, PretrainConfig, pretrain

    cfg = PretrainConfig(
        corpus=args.corpus, out=args.out, preset=args.preset, tokens=args.tokens, steps=args.steps,
        batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr, warmup=args.warmup, grad_accum=args.grad_accum,
        device=args.device, threads=args.threads, compile=args.compile, bf16=args.bf16, resume=args.resume, seed=args.seed,
        save_every=args.save_every, eval_every=args.eval_every, eval_batches=args.eval_batches,
        retrieval_mix=args.retrieval_mix, retrieval_source=args.retrieval_source, time_limit=args.time_limit,
        stop_at=args.stop_at, answer_weight=args.answer_weight, retrieval_pairs=args.retrieval_pairs,
        retrieval_queries=args.retrieval_queries, retrieval_digits=args.retrieval_digits,
        progress=not args.no_progress,
    )
    # resumable: a failure keeps a fresh --out only when it holds a checkpoint for --resume (or on Ctrl-C)
    with output_dir(args.out, resumable=True, keep=has_checkpoint):
        out = pretrain(cfg)
    log = json.loads((out / LOG_FILE).read_text())
    state = "done" if log["finished"] else "stopped (time limit; rerun with --resume)"
    val = log["validation"][-1]["val_loss"]
    print(f"{state}: {out}  steps {log['steps_done']}  tokens {log['tokens_done']:,}  val_loss {val:.4f}  "
          f"{log['train_tokens_per_s'] or 0:,.0f} tokens/s  wall {log['wall_s']:.1f} s")
    return 0
