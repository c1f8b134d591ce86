"""``consa search``: learn an allocation for a local HF model directory.

On several processes: ``torchrun --nproc_per_node N -m consa search ...`` or, the same thing,
``consa search --nproc N ...`` (which launches ``torch.distributed.run`` itself). See docs/DISTRIBUTED.md.
"""

from __future__ import annotations

import argparse

from .argtypes import fraction, nonneg_float, nonneg_int, open_fraction, positive_float, positive_float_or_off, positive_int

_PARSER = None


def register(sub) -> None:
    global _PARSER
    p = sub.add_parser("search", help="learn which units keep full attention (ConSA)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="local Hugging Face model directory")
    p.add_argument("--sparsity", type=open_fraction, default=None,
                   help="share t of units that become SWA, in (0, 1) (or give --kv-budget)")
    p.add_argument("--kv-budget", type=open_fraction, default=None, metavar="B",
                   help="instead of --sparsity: the KV cache held at --budget-context tokens must fit in this share of full "
                        "attention's (sinks included); the search drives its expected KV to the budget and the final "
                        "assignment is exact")
    p.add_argument("--budget-context", type=positive_int, default=None,
                   help="context (tokens) at which --kv-budget is measured (default: --seq-len)")
    p.add_argument("--spans", default=None, metavar="MENU",
                   help="with --kv-budget: each unit picks its span from this menu, e.g. 128,512,2048,full "
                        "(default: --window or full)")
    p.add_argument("--window", type=positive_int, default=None,
                   help="sliding window W (tokens, self included); required unless --spans gives a menu")
    p.add_argument("--granularity", default="kv_head", help="kv_head or layer")
    p.add_argument("--sinks", type=nonneg_int, default=0, help="attention-sink tokens always visible to SWA units")
    p.add_argument("--reopen-native", action="store_true",
                   help="also search the layers the model already slides (Gemma3, Mistral, ...); by default they keep "
                   "their native window and --sparsity counts the full-attention units only")
    p.add_argument("--corpus", help="corpus directory from `consa data build` (default: random tokens, for smoke tests)")
    p.add_argument("--retrieval-mix", type=fraction, default=0.0,
                   help="share of batch rows replaced by synthetic retrieval sequences (needs --corpus)")
    p.add_argument("--retrieval-source", default="builtin", help="builtin or tasks (the eval's own generators)")
    p.add_argument("--seq-len", type=positive_int, default=1024,
                   help="search sequence length. Search at the length you deploy at when it fits: searched at half "
                        "of it, the cut scored 4%% worse there, at a quarter 8%% (within the seed spread), for 20-28%% "
                        "less search time on a small model")
    p.add_argument("--batch-size", type=positive_int, default=4, help="global batch (split over --nproc processes)")
    p.add_argument("--micro-batch", type=nonneg_int, default=0, metavar="N",
                   help="sequences per forward pass on each process, the gradients summed over the step (the same "
                        "step as the whole batch at once, in less memory); 0: every local sequence at once")
    p.add_argument("--steps", type=positive_int, default=300)
    p.add_argument("--until-agreement", type=fraction, default=0.0, metavar="A",
                   help="after --steps, keep training at the target until this share of the gates agrees with the "
                   "top-k cut (1.0: every gate decided; 0: off). search.json reports the final share")
    p.add_argument("--max-steps", type=nonneg_int, default=0, help="cap for --until-agreement (0: 4 × --steps)")
    p.add_argument("--refine-evals", type=nonneg_int, default=None, metavar="N",
                   help="after the cut, try swaps across it on held-out batches, keeping those that lower the binary "
                        "allocation's KL to the full model; N objective evaluations at most (default: 96 for "
                        "--sparsity, off under --kv-budget; 0: off, the plain top-k cut)")
    p.add_argument("--refine-candidates", type=positive_int, default=4, metavar="K",
                   help="refinement considers the K SWA units nearest the cut (and, with --refine-order score, the K "
                        "FA units nearest it)")
    p.add_argument("--refine-order", choices=("score", "measured", "gradient"), default="gradient",
                   help="which swaps refinement tries first: score, the units nearest the cut by log α; measured, "
                        "by the KL change of flipping each FA unit and the best SWA units alone (one evaluation per "
                        "unit more; it also finds FA units far above the cut that the allocation does not need); "
                        "gradient, the same order estimated to first order by one backward pass")
    p.add_argument("--gate-lr", type=positive_float, default=0.05)
    p.add_argument("--gate-lr-final", type=nonneg_float, default=None,
                   help="cosine-decay the gate lr from --gate-lr to this over --steps (default: constant)")
    p.add_argument("--beta-final", type=positive_float_or_off, default=0.2,
                   help="anneal the hard-concrete temperature geometrically from 2/3 to this over --steps ('off': "
                        "constant 2/3)")
    p.add_argument("--init-log-alpha", type=float, default=0.5,
                   help="log α of every gate at step 0 (at 3.0 most gate samples start clamped at z = 1, where they "
                        "get no gradient)")
    p.add_argument("--init", choices=["constant", "attention_mass", "duo"], default="constant",
                   help="log α at step 0: all equal, or ranked by the attention-mass score or a short Duo-style run")
    p.add_argument("--init-steps", type=nonneg_int, default=0,
                   help="Duo-style warm-start steps / attention-mass batches for --init (0: 30 / 4)")
    p.add_argument("--decide-weight", type=nonneg_float, default=0.0,
                   help="weight of a penalty mean P(1-P) that pushes undecided gates apart late in the search (0: off)")
    p.add_argument("--decide-frac", type=fraction, default=0.25,
                   help="share of the last --steps in which --decide-weight applies")
    p.add_argument("--controller", default="lagrangian", help="lagrangian or project")
    p.add_argument("--warmup-frac", type=fraction, default=0.4, help="share of steps over which the target ramps up")
    p.add_argument("--train-weights", default="none", help="none, full or lora")
    p.add_argument("--weight-lr", type=positive_float, default=1e-5)
    p.add_argument("--lm-weight", type=nonneg_float, default=0.0, help="weight of an added LM loss")
    p.add_argument("--answer-weight", type=nonneg_float, default=0.0,
                   help="weight of an added KL over the positions that predict the answers of --retrieval-mix rows "
                        "(a few answer tokens otherwise count like any text position)")
    p.add_argument("--checkpoint-every", type=nonneg_int, default=50)
    p.add_argument("--resume", action="store_true", help="continue the killed search in --out")
    p.add_argument("--seed", type=nonneg_int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", help="fp32, bf16 or fp16 (auto: bf16 on CUDA)")
    p.add_argument("--nproc", type=positive_int, default=None,
                   help="processes (GPUs) to run on: launches torchrun with FSDP2 sharding; default: 1, or torchrun's world size")
    p.add_argument("--no-activation-checkpointing", action="store_true",
                   help="multi-process only: keep every activation instead of recomputing each decoder layer in backward")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", required=True, help="output directory (allocation.json, gates, metrics, checkpoint)")
    p.set_defaults(func=run)
    _PARSER = p


def run(args) -> int:

    from ..errors import ConsaError
    from ..train import distributed as D
    from ..train.search import Search
    from ..train.search_config import (ConstraintConfig, GateConfig, LossConfig, RefineConfig, ScheduleConfig,
                                       SearchConfig, TargetConfig, WeightsConfig)
    from .common import check_model_dir, load_for, run_on_ranks, search_batches

    cfg = SearchConfig(  # checked as it is made: bad settings cost nothing and write nothing
        target=TargetConfig(sparsity=args.sparsity, kv_budget=args.kv_budget, budget_context=args.budget_context,
                            spans=args.spans, window=args.window, granularity=args.granularity, sinks=args.sinks,
                            reopen_native=args.reopen_native),
        seq_len=args.seq_len,
        gates=GateConfig(lr=args.gate_lr, lr_final=args.gate_lr_final, init_log_alpha=args.init_log_alpha,
                         beta_final=args.beta_final, init=args.init, init_steps=args.init_steps,
                         decide_weight=args.decide_weight, decide_frac=args.decide_frac),
        schedule=ScheduleConfig(steps=args.steps, until_agreement=args.until_agreement, max_steps=args.max_steps),
        constraint=ConstraintConfig(controller=args.controller, warmup_frac=args.warmup_frac),
        loss=LossConfig(lm_weight=args.lm_weight, answer_weight=args.answer_weight),
        refine=RefineConfig(evals=args.refine_evals, candidates=args.refine_candidates, order=args.refine_order),
        weights=WeightsConfig(train=args.train_weights, lr=args.weight_lr),
        seed=args.seed, checkpoint_every=args.checkpoint_every, micro_batch=args.micro_batch,
    )
    under_torchrun, world = D.world_from_args(args.nproc, args.batch_size)
    if not under_torchrun and world > 1:
        from pathlib import Path

        from ..train.checkpoint import check_resumable

        check_model_dir(args.model)
        if Path(args.out).exists() and not Path(args.out).is_dir():
            raise ConsaError(f"--out {args.out} exists and is not a directory")
        check_resumable(Path(args.out), args.resume, world)  # fail here, once, before any process starts
        return D.launch(D.worker_argv(_PARSER, args, "search"), world)

    def body(dist):
        check_model_dir(args.model)
        model = load_for(args, dist)
        batch_fn = search_batches(args, model, model.config.get_text_config().vocab_size)
        return Search(model, cfg, batch_fn, args.out, progress=not args.no_progress, dist=dist).run(resume=args.resume)

    alloc, dist = run_on_ranks(args, under_torchrun, body)
    if alloc is None:
        return 2
    if dist is None or dist.is_main:
        st = alloc.stats()
        native = sorted({w for w in st["native_windows"] if w is not None})
        if native:
            print(f"kept the model's native sliding window {native} on layers "
                  f"{[i for i, w in enumerate(st['native_windows']) if w is not None]} ({st['fixed_units']} units, not "
                  f"searched); the sparsity counts the {st['units']} other units (--reopen-native searches all)")
        if len(st["spans"]) > 1 or cfg.target.kv_budget is not None:
            ctx = cfg.target.budget_context or cfg.seq_len
            print(f"allocation: {st['swa_units']}/{st['units']} {cfg.target.granularity} units on SWA, spans {st['spans']}; KV at "
                  f"{ctx} tokens = {alloc.kv_share(ctx):.4f} of full attention (budget {cfg.target.kv_budget})")
        else:
            print(f"allocation: {st['swa_units']}/{st['units']} {cfg.target.granularity} units on SWA (W={cfg.target.window}); "
                  f"FA share per layer {[round(s, 2) for s in st['fa_share_per_layer']]}")
        print(f"wrote {args.out}/allocation.json")
    return 0
