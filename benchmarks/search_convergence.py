"""Search convergence (issue 17, item 1): which ConSA options reach a decided, good cut in fewest steps.

For each seed, each step budget and each variant (SearchConfig options, ``VARIANTS``), one ConSA
search; beside them the Duo-style baseline at the same budgets and the training-free attention-mass
cut once. Per run: cut agreement (``gates.cut_agreement``; for Duo-style the share of α on the cut's
side of 0.5), the binary allocation's KL to the full model on held-out batches (``Search.held_out_kl``,
the same batches for every run), expected sparsity at the end, wall seconds and search tokens (a
warm start's tokens included). The ``refine`` variants (item 2) swap units across the cut on the search's
own held-out batches; every cut is scored on batches after those (``SCORE_OFFSET``), and a refined run
also reports its cut before the swaps, scored alike, and how many units the swaps changed. JSON is rewritten after every run, a table is printed last, and
``--budget-s`` skips the runs that would not finish in time (they are listed as skipped).

    # on the run-4 recipe's base model (experiment workdir + its config), on one GPU:
    python benchmarks/search_convergence.py --config experiments/gpu-curriculum.json --workdir W \\
        --sparsity 0.75 --steps 75,150,300 --out conv.json --budget-s 560
    # any model and built corpus:
    python benchmarks/search_convergence.py --model DIR --corpus DIR --window 256 --seq-len 4096 --out conv.json
    # search short, deploy long (issue 17, item 3): T/4 and T/2 with the same tokens per step, scored at T
    python benchmarks/search_convergence.py --config experiments/gpu-run5.json --workdir W --sparsity 0.875 \
        --steps 150 --variants default --search-lengths 1024,2048 --out len.json
    # CPU, a tiny random model, seconds (tests/test_search_options.py runs this):
    python benchmarks/search_convergence.py --smoke --out smoke.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

# variant -> SearchConfig options over today's defaults (log α 0.5 at step 0, β annealed to 0.2); "v0" is
# the default before issue 17 (log α 3, β constant 2/3) and the single options were measured on top of it.
# "{steps}" budgets the warm start as a share of the search's steps
V0 = {"init_log_alpha": 3.0, "beta_final": None}
VARIANTS = {
    "default": {},
    "v0": V0,
    "anneal": {**V0, "beta_final": 0.2},
    # log α = 3 starts ~80% of the gate samples clamped at z = 1, where the KL gives no gradient to log α:
    # a lower start puts every gate in the differentiable range from step 1
    "low_init": {**V0, "init_log_alpha": 0.5},
    "lr": {**V0, "gate_lr_final": 0.005},
    "init_mass": {**V0, "init": "attention_mass"},
    "init_duo": {**V0, "init": "duo", "init_steps": "steps/5"},
    "decide": {**V0, "decide_weight": 1.0, "decide_frac": 0.25},
    "all": {"beta_final": 0.2, "gate_lr_final": 0.005, "init": "attention_mass", "decide_weight": 1.0, "decide_frac": 0.25,
            "init_log_alpha": 3.0},
    # cut refinement (item 2): swaps across the cut on the search's held-out batches; scored on other batches
    "refine": {"refine_evals": 16, "refine_order": "score"},
    "anneal_refine": {**V0, "beta_final": 0.2, "refine_evals": 16, "refine_order": "score"},
    # pairs ordered by measured single-unit flips: one evaluation per FA unit, then the swaps
    "refine_measured": {"refine_evals": 64, "refine_order": "measured", "refine_candidates": 16},
    # `consa search`'s default refinement (since run 10)
    "refine_default": {"refine_evals": 96, "refine_order": "gradient"},
    # the same order from one backward pass (a first-order estimate of every flip), every swap still evaluated
    "refine_gradient": {"refine_evals": 64, "refine_order": "gradient", "refine_candidates": 16},
}
SCORE_OFFSET = 1000  # the scoring batches sit this many steps after the refinement's: a refined cut is not scored on its own data


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--workdir", help="a `consa experiment` workdir whose base model and corpus to use (with --config)")
    p.add_argument("--config", help="that experiment's config (its search stage gives batch, length, window)")
    p.add_argument("--model", help="HF model directory (instead of --workdir)")
    p.add_argument("--corpus", help="corpus directory from `consa data build` (with --model)")
    p.add_argument("--smoke", action="store_true", help="tiny random model and random tokens on the CPU")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--steps", default="75,150,300", help="step budgets, comma-separated")
    p.add_argument("--seeds", default="0", help="search seeds, comma-separated")
    p.add_argument("--search-lengths", default="",
                   help="search at these sequence lengths too (e.g. 1024,2048), each with the same tokens per step; "
                        "every allocation is still scored at --seq-len (issue 17: search short, deploy long)")
    p.add_argument("--sparsity", type=float, default=0.75)
    p.add_argument("--granularity", default="kv_head")
    p.add_argument("--window", type=int, help="default: the experiment's W")
    p.add_argument("--seq-len", type=int, help="default: the experiment's search length")
    p.add_argument("--batch-size", type=int, help="default: the experiment's search batch (4 otherwise)")
    p.add_argument("--eval-batches", type=int, default=4, help="held-out batches for the binary allocation's KL")
    p.add_argument("--no-baselines", action="store_true", help="skip Duo-style and attention mass")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--budget-s", type=float, default=0.0, help="wall-clock budget; runs that would overrun are skipped (0: none)")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    bad = [v for v in a.variants.split(",") if v not in VARIANTS]
    if bad:
        p.error(f"unknown variants {bad}; choose from {', '.join(VARIANTS)}")
    if sum(bool(x) for x in (a.workdir, a.model, a.smoke)) != 1:
        p.error("give exactly one of --workdir (with --config), --model or --smoke")
    if a.workdir and not a.config:
        p.error("--workdir needs --config (the experiment's config file)")
    return a


def setup(a):
    """(model, batch_fn, window, seq_len, tokens per step, description) for the chosen source."""
    from consa.commands.common import pick_device, pick_dtype

    if a.smoke:
        from consa.tiny import tiny_model

        model = tiny_model("qwen3", num_layers=4, num_kv_heads=2)
        b, t = a.batch_size or 2, a.seq_len or 40

        def fn(step):
            g = torch.Generator().manual_seed(step)
            return {"input_ids": torch.randint(3, 101, (b, t), generator=g)}

        def fn_for(length):
            bb = max(1, b * t // length)
            return lambda step: {"input_ids": torch.randint(3, 101, (bb, length), generator=torch.Generator().manual_seed(step))}

        return model, fn, a.window or 5, t, b * t, {"source": "smoke"}, fn_for
    from consa.data.shards import TokenShards
    from consa.experiment import ExperimentConfig, Workdir
    from consa.experiment.batches import search_batch_fn, training_data
    from consa.models import load_model

    device = pick_device(a.device)
    dtype = pick_dtype(a.dtype, device)
    if a.workdir:
        cfg = ExperimentConfig.load(a.config)
        wd = Workdir(a.workdir, cfg)
        base = wd.base_model_dir()
        if base is None:
            raise SystemExit(f"{a.workdir} has no finished base model")
        s = cfg.search
        b, t, w = a.batch_size or s.batch_size, a.seq_len or int(s.seq_len or cfg.context), a.window or cfg.W
        shards, bank = training_data(wd, s.retrieval_share)
        fn = search_batch_fn(shards, bank, b, t, s.retrieval_share, cfg.seed)  # the experiment's own batches
        desc = {"source": "workdir", "workdir": str(a.workdir), "config": str(a.config), "model": str(base)}

        def fn_for(length):  # the same tokens per step at another length
            return search_batch_fn(shards, bank, max(1, b * t // length), length, s.retrieval_share, cfg.seed)
    else:
        if not (a.window and a.seq_len):
            raise SystemExit("--model needs --window and --seq-len")
        base, b, t, w = a.model, a.batch_size or 4, a.seq_len, a.window
        if a.corpus:
            shards = TokenShards.open(a.corpus, "train")

            def fn_for(length):
                return search_batch_fn(shards, None, max(1, b * t // length), length, 0.0, 0)
        else:
            vocab = json.loads((Path(base) / "config.json").read_text()).get("vocab_size", 1000)

            def fn_for(length):
                bb = max(1, b * t // length)
                return lambda step: {"input_ids": torch.randint(0, vocab, (bb, length), generator=torch.Generator().manual_seed(step))}
        fn = fn_for(t)
        desc = {"source": "model", "model": str(base), "corpus": a.corpus}
    return load_model(base, dtype=dtype, device=str(device)), fn, w, t, b * t, desc, fn_for


def main(argv=None) -> int:
    a = parse(argv)
    if a.smoke:
        torch.set_num_threads(1)
    from consa.allocation import swa_count
    from consa.allocation import Allocation
    from consa.models import detach, model_shape, searchable_native
    from consa.train.baselines import attention_mass_allocation, duo_allocation
    from consa.train.search import Search
    from consa.train.search_config import GateConfig, SearchConfig
    from consa.gates import cut_margin, topk_swa

    model, batch_fn, window, seq_len, step_tokens, desc, fn_for = setup(a)
    variants, budgets, seeds = a.variants.split(","), _ints(a.steps), _ints(a.seeds)
    lengths = sorted(set(_ints(a.search_lengths)) | {seq_len})
    if any(n <= window for n in lengths):
        raise SystemExit(f"every search length must exceed the window {window}: {lengths}")
    # the flat option names of `consa search` (SearchConfig.from_flat), as the variants are written.
    # Refinement off unless a variant turns it on: every variant's unrefined cut is comparable, and "default"
    # stays the search itself (since run 10 `consa search` refines by default: that is the "refine_default" row)
    base = dict(sparsity=a.sparsity, window=window, seq_len=seq_len, granularity=a.granularity,
                checkpoint_every=0, refine_batches=a.eval_batches, refine_evals=0)
    if a.workdir:
        from consa.experiment import ExperimentConfig

        s = ExperimentConfig.load(a.config).search
        base.update(gate_lr=s.gate_lr, controller=s.controller, warmup_frac=s.warmup_frac, backend=s.backend)
    shape = model_shape(model)
    free = Allocation.free_units(searchable_native(model, False), a.granularity, shape.num_kv_heads)
    num_swa = swa_count(a.sparsity, len(free))  # native sliding layers stay unsearched, as in `consa search`
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    res = {"setup": {**desc, "window": window, "seq_len": seq_len, "tokens_per_step": step_tokens, "sparsity": a.sparsity,
                     "granularity": a.granularity, "num_swa": num_swa, "eval_batches": a.eval_batches,
                     "variants": {v: VARIANTS[v] for v in variants}, "device": str(next(model.parameters()).device),
                     "search_lengths": lengths,
                     # the defaults the variants are relative to ("default" = {} meant log α 3, no anneal before issue 17)
                     "search_defaults": {k: getattr(GateConfig(), k) for k in ("init_log_alpha", "beta_final")}},
           "runs": [], "skipped": []}
    t_start = time.time()
    rate = None  # seconds per search step, measured on the last run

    def save():
        out.write_text(json.dumps(res, indent=1) + "\n")

    def fits(steps: int) -> bool:
        if not a.budget_s:
            return True
        left = a.budget_s - (time.time() - t_start)
        return left > 0 and (rate is None or rate * steps * 1.2 < left)

    def score_fn(step):
        return batch_fn(step + SCORE_OFFSET)

    def held_kl(seed: int, fa: list[bool]) -> float:
        """The binary allocation ``fa``'s held-out KL, through a never-run Search (the same batches for every
        run, apart from the ones a refinement chose its swaps on)."""
        probe = Search(model, SearchConfig.from_flat({**base, "steps": 1, "seed": seed}), score_fn, out.parent / "_probe",
                       progress=False)
        try:
            return probe.held_out_kl(fa)
        finally:
            detach(model)

    for seed in seeds:
        if not a.no_baselines and fits(1):
            t0 = time.time()
            batches = [batch_fn(10_000 + i) for i in range(2)]
            alloc = attention_mass_allocation(model, a.granularity, num_swa, window, batches)
            detach(model)
            res["runs"].append({"method": "attention_mass", "seed": seed, "steps": 0, "held_out_kl": held_kl(seed, alloc.units),
                                "seconds": time.time() - t0, "tokens": 2 * step_tokens})
            save()
        for length, steps in [(n, st) for n in sorted(lengths, reverse=True) for st in budgets]:
            run_fn = batch_fn if length == seq_len else fn_for(length)
            jobs = [(v, VARIANTS[v]) for v in variants] + ([] if a.no_baselines else [("duo", None)])
            for name, opts in jobs:
                if not fits(steps):
                    res["skipped"].append({"method": name, "seed": seed, "steps": steps, "search_len": length})
                    save()
                    continue
                t0 = time.time()
                if opts is None:
                    alloc = duo_allocation(model, a.granularity, num_swa, window, run_fn, steps=steps, seed=seed,
                                           backend=base.get("backend", "auto"))
                    detach(model)
                    alpha = alloc.meta["alpha"]
                    rec = {"method": "duo", "cut_agreement": sum((x >= 0.5) == f for x, f in zip(alpha, alloc.units)) / len(alpha),
                           "mean_alpha": sum(alpha) / len(alpha), "fa": alloc.units, "tokens": steps * step_tokens}
                else:
                    kw = {k: (max(1, steps // 5) if v == "steps/5" else v) for k, v in opts.items()}
                    cfg = SearchConfig.from_flat({**base, "seq_len": length, **kw, "steps": steps, "seed": seed})
                    run_dir = out.parent / f"{out.stem}-runs" / (f"{name}-s{steps}-seed{seed}" + ("" if length == seq_len else f"-T{length}"))
                    search = Search(model, cfg, run_fn, run_dir, progress=False)
                    fa = search.run().units
                    detach(model)
                    last = search.history[-1]
                    last_change, late_flips = search.cut_stability()
                    rec = {"method": f"consa:{name}", "options": kw, "cut_agreement": search.cut_agreement(),
                           "cut_last_changed_step": last_change, "cut_flips_last_fifth": late_flips,
                           "expected_sparsity": last["expected_sparsity"], "hard_sparsity": last["hard_sparsity"],
                           "final_loss": last["loss"], "steps_done": search.step, "fa": fa,
                           "tokens": search.step * step_tokens + search.init_tokens,
                           "cut_margin": cut_margin(search.gates.log_alpha, topk_swa(search.gates.log_alpha, search.num_swa))}
                    if search.refined is not None:  # the cut before the swaps, scored like every other cut
                        top = topk_swa(search.gates.log_alpha, search.num_swa)
                        rec.update(refine=search.refined.summary(), fa_unrefined=top,
                                   units_changed_by_refine=sum(x != y for x, y in zip(top, fa)),
                                   held_out_kl_unrefined=held_kl(seed, top))
                seconds = time.time() - t0
                rate = seconds / steps  # the last run's pace (the first includes warm-up: an overestimate, skips early)
                rec.update(seed=seed, steps=steps, search_len=length, seconds=seconds, held_out_kl=held_kl(seed, rec["fa"]))
                res["runs"].append(rec)
                save()
    for r in res["runs"]:  # how far a shorter search's cut agrees with the same run at --seq-len
        ref = next((x for x in res["runs"] if x.get("fa") is not None and x["method"] == r["method"] and x["seed"] == r["seed"]
                    and x["steps"] == r["steps"] and x.get("search_len") == seq_len), None)
        if ref is not None and r.get("fa") is not None:
            both = sum(x and y for x, y in zip(r["fa"], ref["fa"]))
            either = sum(x or y for x, y in zip(r["fa"], ref["fa"]))
            r["fa_overlap_with_full_length"] = both / either if either else 1.0
    res["seconds"] = time.time() - t_start
    save()
    print(f"{'method':22s} {'seed':>4s} {'T':>6s} {'steps':>5s} {'agree':>6s} {'KL@T':>9s} {'overlap':>7s} {'s_exp':>6s} {'sec':>7s} {'tokens':>10s}")
    for r in res["runs"]:
        agree = f"{r['cut_agreement']:.3f}" if "cut_agreement" in r else "-"
        s_exp = f"{r['expected_sparsity']:.3f}" if "expected_sparsity" in r else "-"
        ov = f"{r['fa_overlap_with_full_length']:.2f}" if "fa_overlap_with_full_length" in r else "-"
        ref = (f"  refine: {r['units_changed_by_refine']} units changed, KL@T {r['held_out_kl_unrefined']:.5f} unrefined"
               if "held_out_kl_unrefined" in r else "")
        print(f"{r['method']:22s} {r['seed']:4d} {r.get('search_len', seq_len):6d} {r['steps']:5d} {agree:>6s} "
              f"{r['held_out_kl']:9.5f} {ov:>7s} {s_exp:>6s} {r['seconds']:7.1f} {r['tokens']:10d}{ref}")
    if res["skipped"]:
        print(f"skipped {len(res['skipped'])} runs (--budget-s {a.budget_s:g}); see {out}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
