"""``consa heal``: fine-tune a model under a fixed allocation towards its full-attention self.

Writes a head-wise export (``consa.load OUT``; ``consa eval --model OUT --allocation OUT/allocation.json``).
On several processes: ``consa heal --nproc N ...`` (launches torchrun; FSDP2, as ``consa search``).
See docs/HEAL.md.
"""

from __future__ import annotations

import argparse

from .argtypes import fraction, nonneg_float, nonneg_int, positive_float, positive_int

_PARSER = None


def register(sub) -> None:
    global _PARSER
    p = sub.add_parser("heal", help="fine-tune the hybrid model under its allocation (KL to full attention)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter, description=__doc__)
    p.add_argument("--model", required=True, help="local Hugging Face model directory (full attention)")
    p.add_argument("--allocation", required=True, help="allocation JSON (from consa search / rules)")
    p.add_argument("--corpus", help="corpus directory from `consa data build` (default: random tokens, for smoke tests)")
    p.add_argument("--out", required=True, help="output directory: the healed model (a new or empty folder)")
    p.add_argument("--steps", type=positive_int, help="training steps (or give --tokens)")
    p.add_argument("--tokens", type=positive_int, help="training tokens; steps = ceil(tokens / (batch size × seq len))")
    p.add_argument("--seq-len", type=positive_int, default=1024)
    p.add_argument("--batch-size", type=positive_int, default=4, help="global batch (split over --nproc processes)")
    p.add_argument("--micro-batch", type=nonneg_int, default=0, metavar="N",
                   help="sequences per forward pass on each process, the gradients summed over the step (the same "
                        "step as the whole batch at once, in less memory); 0: every local sequence at once")
    p.add_argument("--lr", type=positive_float, default=1e-5, help="peak learning rate (warm-up, then cosine to lr/10)")
    p.add_argument("--lora", type=nonneg_int, default=0, metavar="R",
                   help="train LoRA adapters of rank R (needs PEFT); 0: every weight")
    p.add_argument("--no-merge", action="store_true", help="LoRA: write the adapter (OUT/adapter) instead of a merged model")
    p.add_argument("--lm-weight", type=nonneg_float, default=0.0, help="weight of an added LM loss")
    p.add_argument("--retrieval-mix", type=fraction, default=0.0,
                   help="share of batch rows replaced by synthetic retrieval sequences (needs --corpus)")
    p.add_argument("--retrieval-source", default="builtin", help="builtin or tasks (the eval's own generators)")
    p.add_argument("--checkpoint-every", type=nonneg_int, default=50)
    p.add_argument("--resume", action="store_true", help="continue the killed heal in --out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="fp32", help="weights while training: fp32 (bf16 autocast on CUDA), bf16 or fp16")
    p.add_argument("--backend", default="auto", help="consa attention kernels: auto, sdpa or flex")
    p.add_argument("--nproc", type=positive_int, default=None,
                   help="processes (GPUs) to run on: launches torchrun with FSDP2 sharding; default: 1, or torchrun's world size")
    p.add_argument("--no-activation-checkpointing", action="store_true",
                   help="multi-process only: keep every activation instead of recomputing each decoder layer in backward")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)
    _PARSER = p


def _check_inputs(args):
    """Every check that needs no weights: bad input costs nothing and writes nothing."""
    from pathlib import Path

    from ..allocation import Allocation
    from ..errors import ConsaError
    from ..train.heal import HealConfig, steps_for_tokens
    from .common import check_model_dir

    if (args.steps is None) == (args.tokens is None):
        raise ConsaError("give --steps or --tokens (exactly one)")
    steps = args.steps if args.steps is not None else steps_for_tokens(args.tokens, args.batch_size, args.seq_len)
    if args.retrieval_mix and not args.corpus:
        raise ConsaError("--retrieval-mix needs --corpus")
    if args.no_merge and not args.lora:
        raise ConsaError("--no-merge applies to LoRA runs only (--lora R)")
    cfg = HealConfig(steps=steps, seq_len=args.seq_len, lr=args.lr, lora_rank=args.lora, merge=not args.no_merge,
                     lm_weight=args.lm_weight, checkpoint_every=args.checkpoint_every, seed=args.seed, backend=args.backend,
                     micro_batch=args.micro_batch)
    cfg.validate()
    if cfg.lora_rank:
        try:
            import peft  # noqa: F401
        except ImportError:
            raise ConsaError("--lora needs PEFT: pip install 'consa[peft]' (or heal every weight: leave out --lora)") from None
    if args.corpus and not Path(args.corpus).is_dir():
        raise ConsaError(f"corpus directory not found: {args.corpus}")
    model_dir = check_model_dir(args.model)
    alloc = Allocation.load(args.allocation)
    from transformers import AutoConfig

    from ..models import model_shape

    try:
        shape = model_shape(AutoConfig.from_pretrained(str(model_dir), local_files_only=True))
    except (OSError, ValueError) as e:
        raise ConsaError(f"cannot read the config of {model_dir}: {str(e).splitlines()[0]}") from None
    alloc.check_matches(shape)
    if alloc.window >= cfg.seq_len:
        raise ConsaError(f"the allocation's window {alloc.window} is not smaller than --seq-len {cfg.seq_len}: "
                         "SWA would equal full attention and there is nothing to heal")
    return cfg, alloc


def run(args) -> int:
    from pathlib import Path

    from ..train import distributed as D
    from ..train.heal import Heal, check_out
    from .common import load_for, run_on_ranks, search_batches

    cfg, alloc = _check_inputs(args)
    under_torchrun, world = D.world_from_args(args.nproc, args.batch_size)
    check_out(Path(args.out), args.resume, world)
    if not under_torchrun and world > 1:
        return D.launch(D.worker_argv(_PARSER, args, "heal"), world)

    def body(dist):
        model = load_for(args, dist)
        batch_fn = search_batches(args, model, model.config.get_text_config().vocab_size)
        heal = Heal(model, alloc, cfg, batch_fn, args.out, progress=not args.no_progress, dist=dist, source_dir=args.model)
        heal.run(resume=args.resume)
        return heal

    heal, dist = run_on_ranks(args, under_torchrun, body)
    if heal is None:
        return 2
    if dist is None or dist.is_main:
        h = heal.history
        first, last = (h[0]["loss"], h[-1]["loss"]) if h else (float("nan"), float("nan"))
        print(f"healed {heal.step} steps ({heal.step * args.batch_size * cfg.seq_len:,} tokens) under "
              f"{alloc.num_swa}/{alloc.num_units} SWA {alloc.granularity} units: loss {first:.4f} -> {last:.4f}")
        if cfg.lora_rank and not cfg.merge:
            print(f"wrote the LoRA adapter {args.out}/adapter (for {args.model}; allocation in {args.out}/allocation.json; "
                  f"consa.load('{args.out}') applies both to that model)")
        else:
            print(f"wrote {args.out} (consa.load('{args.out}'); consa eval --model {args.out} scores its stored allocation)")
    return 0
