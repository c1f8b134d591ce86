"""The ``heal`` stage (only with a ``heal`` section): heal every allocation of a sparsity with the same
tokens (``consa.train.heal``), then evaluate it next to the unhealed one.

Every allocation starts from the same base weights and sees the same batches (one batch function,
seeded apart from the search's), so before/after compares methods at an equal budget after the cut.
``heal.tokens`` may list several budgets: each heal starts from the base weights again, and a smaller
budget's batches are the first steps of a larger one's. Healed runs are written as
``WORKDIR/eval/s<t>/<method>-healed`` (one budget) or ``<method>-healed-<label>`` (several; label e.g.
``2M``), ``consa eval`` run directories with a ``heal`` record; the heal runs themselves (heal.json,
metrics.jsonl; the weights only with ``keep_models``) go to ``WORKDIR/heal/s<t>/<method>[-<label>]``.
"Gap closed by healing" is (PPL_before − PPL_after) / (PPL_before − PPL_full) on long-range PPL: the
share of what the allocation still lost to full attention that healing recovered.
"""

from __future__ import annotations

import copy
import json
import shutil
import time

from ..batches import search_batch_fn, training_data
from ..config import method_list
from ..scoring import eval_config, long_ppl, mean_retrieval, save_run, short_ppl
from ..workdir import PartialStage, free_device, method_key, require, resolve_device, resolve_dtype, say

SUFFIX = "-healed"


def token_label(n: int) -> str:
    """2_000_000 -> "2M", 500_000 -> "500K"; other counts as they are."""
    for div, unit in ((10**9, "B"), (10**6, "M"), (10**3, "K")):
        if n % div == 0:
            return f"{n // div}{unit}"
    return str(n)


def budget_suffix(h, tokens: int) -> str:
    """"" with one budget (the layout of single-budget workdirs), else "-<label>"."""
    return "" if len(h.budgets()) == 1 else f"-{token_label(tokens)}"


def heal_targets(cfg, evals=None) -> list[tuple[float, str]]:
    """(sparsity, allocation file stem) of every allocation the stage heals: ``heal.methods`` (default:
    every search method), plus, with ``heal.best_rules`` = N and the eval stage's runs in ``evals``, the N
    rule allocations (``rules.RULES`` but random) with the lowest long-range PPL at each sparsity."""
    h = cfg.heal
    sparsities = h.sparsities or cfg.search.sparsities
    methods = set(h.methods or cfg.search.methods)
    stems = [stem for stem, name, gran, _ in method_list(cfg) if f"{name}-{gran}" in methods]
    out = []
    for t in sparsities:
        best = best_rules(cfg, evals, t, h.best_rules) if (h.best_rules and evals is not None) else []
        out += [(t, stem) for stem in stems + [b for b in best if b not in stems]]
    return out


def best_rules(cfg, evals, t: float, n: int) -> list[str]:
    """The ``n`` rule allocations of sparsity ``t`` with the lowest long-range PPL in the eval stage's
    runs (ties: higher retrieval first); fewer where fewer rules were evaluated."""
    from ...rules import RULES

    scored = []
    for stem, name, _gran, _seed in method_list(cfg):
        p = evals / method_key(t) / stem / "eval.json"
        if name in RULES and name != "random" and p.is_file():
            res = json.loads(p.read_text())
            if long_ppl(res) is not None:
                scored.append((long_ppl(res), -(mean_retrieval(res) or 0.0), stem))
    return [stem for *_k, stem in sorted(scored)[:n]]


def run(wd, deadline: float | None = None) -> dict:
    import torch

    from ...allocation import Allocation
    from ...data.tokenizer import load_tokenizer
    from ...eval.runner import evaluate, retrieval_items
    from ...models import load_model
    from ...rules import RULES
    from ...train.heal import Heal, HealConfig, steps_for_tokens

    cfg, h = wd.cfg, wd.cfg.heal
    if h is None:
        return {"skipped": "no heal section in the config"}
    full_path = wd.evals / "full" / "eval.json"
    require(wd.done("eval") and full_path.is_file(), "heal", f"the eval runs in {wd.evals}", "eval", wd)
    base = wd.base_model_dir()
    device = resolve_device(cfg.device)
    base_model = load_model(base, dtype=torch.float32, device=str(device))  # fp32 masters (bf16 autocast on CUDA)
    tok = load_tokenizer(base)
    ecfg = eval_config(cfg, wd.corpus)
    items = retrieval_items(tok, ecfg)
    full = json.loads(full_path.read_text())
    shards, bank = training_data(wd, h.retrieval_share)
    seq_len = int(h.seq_len or cfg.search.seq_len or cfg.context)
    # one batch function for every allocation: the same tokens, other than the search's (seed offset)
    batch_fn = search_batch_fn(shards, bank, h.batch_size, seq_len, h.retrieval_share, cfg.seed + 1009)
    eval_dtype = resolve_dtype(cfg.eval.dtype, device)  # evaluate healed weights as the unhealed ones were
    n_done, n_skipped = 0, 0
    # smaller budgets first: under a time budget every allocation gets the small heal before any large one
    targets = heal_targets(cfg, wd.evals)
    if h.best_rules:
        say(f"heal: the {h.best_rules} best rules by long-range PPL: " + "; ".join(
            f"t={t} {stem}" for t, stem in targets if stem.rsplit('-', 1)[0] in RULES))
    pieces = [(b, t, stem) for b in sorted(h.budgets()) for t, stem in targets]
    for budget, t, stem in pieces:
        sfx = budget_suffix(h, budget)
        out = wd.evals / method_key(t) / f"{stem}{SUFFIX}{sfx}"
        if (out / "eval.json").is_file():
            continue
        if deadline is not None and time.time() > deadline:
            n_skipped += 1
            continue
        steps = steps_for_tokens(budget, h.batch_size, seq_len)
        alloc = Allocation.load(wd.alloc / method_key(t) / f"{stem}.json")
        run_dir = wd.root / "heal" / method_key(t) / f"{stem}{sfx}"
        shutil.rmtree(run_dir, ignore_errors=True)  # an unfinished heal starts again (the runs are short)
        hc = HealConfig(steps=steps, seq_len=seq_len, lr=h.lr, lora_rank=h.lora_rank, lm_weight=h.lm_weight,
                        warmup_frac=h.warmup_frac, checkpoint_every=0, seed=cfg.seed, backend=h.backend)
        t0 = time.time()
        heal = Heal(copy.deepcopy(base_model), alloc, hc, batch_fn, run_dir, progress=cfg.progress, source_dir=base)
        model = heal.run().to(eval_dtype)
        seconds = time.time() - t0
        r = evaluate(model, tok, alloc, ecfg, baselines=full["baselines"], label=f"{stem}{SUFFIX}{sfx}", log=None, items=items)
        r["heal"] = {"tokens": steps * h.batch_size * seq_len, "steps": steps, "seconds": round(seconds, 2),
                     "first_loss": heal.history[0]["loss"], "final_loss": heal.history[-1]["loss"], "lr": h.lr,
                     "lora_rank": h.lora_rank, "lm_weight": h.lm_weight}
        save_run(r, out)
        if not h.keep_models:
            for f in list(run_dir.glob("*.safetensors")) + list(run_dir.glob("*.safetensors.index.json")):
                f.unlink()
        n_done += 1
        say(f"heal: t={t} {stem} ({token_label(budget)} tokens): KL {r['heal']['first_loss']:.4f} -> "
             f"{r['heal']['final_loss']:.4f} in {seconds:.1f} s; long Δnll {r['summary']['delta_long_nll']}")
        del model, heal
    del base_model
    free_device(device)
    if n_skipped:
        raise PartialStage(f"heal: {n_skipped} heals left for a later call (time budget reached)")
    per = [steps_for_tokens(b, h.batch_size, seq_len) for b in h.budgets()]
    tokens = [n * h.batch_size * seq_len for n in per]
    one = len(per) == 1
    return {"healed": n_done, "tokens_per_allocation": tokens[0] if one else tokens, "steps": per[0] if one else per,
            "rows": heal_rows(wd)}


def heal_rows(wd) -> list[dict]:
    """Before/after numbers of every healed allocation and budget on disk."""
    full_path = wd.evals / "full" / "eval.json"
    if not full_path.is_file():
        return []
    full = json.loads(full_path.read_text())
    f_long, f_short = long_ppl(full), short_ppl(full)
    rows = []
    h = wd.cfg.heal
    for (t, stem), budget in ((ts, b) for ts in heal_targets(wd.cfg, wd.evals) for b in h.budgets()):
        pb = wd.evals / method_key(t) / stem / "eval.json"
        pa = wd.evals / method_key(t) / f"{stem}{SUFFIX}{budget_suffix(h, budget)}" / "eval.json"
        if not (pb.is_file() and pa.is_file()):
            continue
        before, after = json.loads(pb.read_text()), json.loads(pa.read_text())
        lb, la = long_ppl(before), long_ppl(after)
        sa = short_ppl(after)
        gap = (lb - f_long) if (lb is not None and f_long is not None) else None
        rows.append({"sparsity": t, "method": stem, "tokens": after["heal"]["tokens"],
                     "long_ratio_before": lb / f_long if lb and f_long else None,
                     "long_ratio_after": la / f_long if la and f_long else None,
                     "short_ratio_after": sa / f_short if sa and f_short else None,
                     "retrieval_before": mean_retrieval(before), "retrieval_after": mean_retrieval(after),
                     "gap_closed_by_heal": (lb - la) / gap if (gap is not None and la is not None and gap > 1e-9) else None,
                     "kl_first": after["heal"]["first_loss"], "kl_final": after["heal"]["final_loss"]})
    return sorted(rows, key=lambda r: (r["sparsity"], r["tokens"], r["long_ratio_after"] or 0))


def format_heal(wd) -> str:
    def f(v, d=3):
        return "–" if v is None else f"{v:.{d}f}"

    rows = heal_rows(wd)
    lines = ["### Healing (same tokens for every allocation)", "",
             "| sparsity | method | heal tokens | long PPL ratio before → after | short PPL ratio after | "
             "retrieval before → after | gap closed by healing | heal KL first → last |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['sparsity']} | {r['method']} | {r['tokens']:,} | {f(r['long_ratio_before'])} → "
                     f"{f(r['long_ratio_after'])} | {f(r['short_ratio_after'])} | {f(r['retrieval_before'], 2)} → "
                     f"{f(r['retrieval_after'], 2)} | {f(r['gap_closed_by_heal'], 2)} | {f(r['kl_first'], 4)} → "
                     f"{f(r['kl_final'], 4)} |")
    if not rows:
        lines.append("| – | no healed run yet | | | | | | |")
    lines += ["", "PPL ratios are to the unhealed base model with full attention. Gap closed by healing = "
              "(PPL before − PPL after) / (PPL before − PPL full), long-range PPL. Retrieval: mean over tasks "
              "(calibrated; raw where no length passed calibration).", ""]
    return "\n".join(lines)
