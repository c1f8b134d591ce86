"""The ``budget`` stage (only with a ``budget`` section): methods compared at equal KV bytes instead of equal
unit counts.

For every KV budget b (share of full attention's KV at ``context`` tokens, sinks included) each method
makes one allocation that holds at most b, on the same base model and batches:

``consa_spans-<g>``  the learned search over the span menu (``gates.SpanGates``, exact budgeted assignment)
``consa-<g>``        single-window ConSA: the menu (W, full), i.e. as many FA units as b allows at W
``duo-<g>``          Duo-style gates at W with the same unit count
``attn_mass-<g>``    the training-free attention-mass score at W, same count
``moa-<g>``          the MoA-style first-order profile over the span menu (``train/span_baselines.py``)
``uniform-kv_head``  every unit on the one span that spends b

Allocations go to ``WORKDIR/alloc/b<b>/<method>.json``; evaluations (the experiment's eval config, the
split at W for every row) to ``WORKDIR/eval/b<b>/<method>`` with a ``kv`` record: the KV bytes the cache
really holds after a ``context``-token prefill (``eval/kv_cost.py``), prefill and decode time.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace

from ...errors import ConsaError
from ...files import atomic_write_text
from ..batches import search_batch_fn, training_data
from ..scoring import eval_config, full_eval, long_ppl, mean_retrieval, save_run
from ..workdir import PartialStage, budget_key, free_device, require, resolve_device, resolve_dtype, say


def _context(cfg) -> int:
    return int(cfg.budget.context or cfg.context)


def make_allocation(model, name: str, gran: str, kv_budget: float, cfg, batch_fn, out_dir):
    """(allocation, tokens spent after the base model, extra record) of one method at one budget."""
    from ...budget import parse_menu, problem, swa_units_for_budget
    from ...models import model_shape, searchable_native
    from ...train.baselines import attention_mass_allocation, duo_allocation
    from ...train.search import Search
    from ...train.search_config import ConstraintConfig, GateConfig, LossConfig, ScheduleConfig, SearchConfig, TargetConfig
    from ...train.span_baselines import profile_allocation, uniform_span_allocation

    s, b = cfg.search, cfg.budget
    shape, native = model_shape(model), searchable_native(model)
    seq_len = int(s.seq_len or cfg.context)
    ctx, steps = _context(cfg), int(b.steps or s.steps)
    menu = parse_menu(b.spans)
    tokens_per_step = s.batch_size * seq_len
    if name in ("consa_spans", "consa"):
        target = TargetConfig(window=None if name == "consa_spans" else cfg.W, granularity=gran, kv_budget=kv_budget,
                              budget_context=ctx, spans=b.spans if name == "consa_spans" else f"{cfg.W},full")
        scfg = SearchConfig(target, seq_len=seq_len, schedule=ScheduleConfig(steps=steps),
                            gates=GateConfig(lr=s.gate_lr, beta_final=s.beta_final, init_log_alpha=s.init_log_alpha),
                            constraint=ConstraintConfig(controller=s.controller, warmup_frac=s.warmup_frac),
                            loss=LossConfig(answer_weight=s.answer_weight), seed=cfg.seed, checkpoint_every=0,
                            backend=s.backend)
        resume = (out_dir / "checkpoint" / "state.json").is_file()
        alloc = Search(model, scfg, batch_fn, out_dir, progress=cfg.progress).run(resume=resume)
        summ = json.loads((out_dir / "search.json").read_text())
        return alloc, int(summ["steps_done"]) * tokens_per_step, {"cut_agreement": summ.get("cut_agreement"),
                                                                    "final": summ.get("final")}
    if name in ("duo", "attn_mass"):
        k = swa_units_for_budget(problem(shape, gran, (cfg.W, None), kv_budget, ctx, 0, native))
        if name == "duo":
            alloc = duo_allocation(model, gran, k, cfg.W, batch_fn, steps=steps, lr=s.duo_lr, l1=s.duo_l1, seed=cfg.seed,
                                   progress=cfg.progress, backend=s.backend)
            return alloc, steps * tokens_per_step, {}
        batches = [batch_fn(10_000 + i) for i in range(s.mass_batches)]
        return attention_mass_allocation(model, gran, k, cfg.W, batches), s.mass_batches * tokens_per_step, {}
    prob = problem(shape, gran, menu, kv_budget, ctx, 0, native)
    if name == "moa":
        alloc = profile_allocation(model, gran, prob, lambda i: batch_fn(20_000 + i), b.profile_batches,
                                   backend=s.backend, progress=cfg.progress)
        return alloc, b.profile_batches * tokens_per_step, {}
    if name == "uniform":
        return uniform_span_allocation(prob, gran, shape, 0, native), 0, {}
    raise ConsaError(f"unknown budget method {name!r}")


def run(wd, deadline: float | None = None) -> dict:
    from ...allocation import Allocation
    from ...data.tokenizer import load_tokenizer
    from ...eval import kv_cost
    from ...eval.runner import evaluate, retrieval_items
    from ...models import detach, load_model

    cfg = wd.cfg
    if cfg.budget is None:
        return {"skipped": "no budget section in the config"}
    base = wd.base_model_dir()
    require(base is not None and wd.done("pretrain"), "budget", f"the base model in {wd.base}", "pretrain", wd)
    device = resolve_device(cfg.device)
    s = cfg.search
    shards, bank = training_data(wd, s.retrieval_share)
    seq_len = int(s.seq_len or cfg.context)
    batch_fn = search_batch_fn(shards, bank, s.batch_size, seq_len, s.retrieval_share, cfg.seed)
    model = load_model(base, dtype=resolve_dtype(s.dtype, device), device=str(device))
    # 1) allocations (the search's dtype)
    n_made = 0
    for kb in cfg.budget.kv_budgets:
        d = wd.alloc / budget_key(kb)
        d.mkdir(parents=True, exist_ok=True)
        for m in cfg.budget.methods:
            path, rec_path = d / f"{m}.json", d / f"{m}.meta.json"
            if path.is_file() and rec_path.is_file():
                continue
            if deadline is not None and time.time() > deadline:
                raise PartialStage("budget: allocations left for a later call (time budget reached)")
            name, gran = m.rsplit("-", 1)
            t0 = time.time()
            alloc, tokens, extra = make_allocation(model, name, gran, kb, cfg, batch_fn, wd.search_runs / f"{budget_key(kb)}-{m}")
            detach(model)
            ctx = _context(cfg)
            if alloc.kv_share(ctx) > kb + 1e-9:
                raise ConsaError(f"{m} at budget {kb}: holds {alloc.kv_share(ctx):.4f} of full attention's KV")
            alloc = Allocation.from_dict({**alloc.to_dict(), "meta": {**alloc.meta, "label": m, "kv_budget_target": kb}})
            alloc.save(path)
            rec = {"method": m, "kv_budget": kb, "context": ctx, "kv_share_computed": alloc.kv_share(ctx),
                   "spans": alloc.spans(), "fa_units": alloc.num_units - alloc.num_swa, "units": alloc.num_units,
                   "seconds": round(time.time() - t0, 2), "tokens_after_base": tokens, **extra}
            atomic_write_text(rec_path, json.dumps(rec, indent=1, default=str) + "\n")
            n_made += 1
            say(f"budget: b={kb} {m}: KV {rec['kv_share_computed']:.4f} of full, spans {rec['spans']}, "
                 f"{rec['fa_units']}/{rec['units']} FA units, {rec['seconds']} s")
    del model
    # 2) evaluations + measured KV bytes (the eval's dtype)
    model = load_model(base, dtype=resolve_dtype(cfg.eval.dtype, device), device=str(device))
    tok = load_tokenizer(base)
    ecfg = replace(eval_config(cfg, wd.corpus), keep_spans=True)
    items = retrieval_items(tok, ecfg)
    full = full_eval(wd, model, tok, ecfg, items)
    ctx, dec = _context(cfg), cfg.budget.decode_tokens
    full_kv_path = wd.evals / budget_key(0) / "full-kv.json"
    if not full_kv_path.is_file():
        full_kv_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(full_kv_path, json.dumps(kv_cost.measure(model, None, ctx, dec)) + "\n")
    n_eval = 0
    for kb in cfg.budget.kv_budgets:
        for m in cfg.budget.methods:
            out = wd.evals / budget_key(kb) / m
            if (out / "eval.json").is_file():
                continue
            if deadline is not None and time.time() > deadline:
                raise PartialStage("budget: evaluations left for a later call (time budget reached)")
            alloc = Allocation.load(wd.alloc / budget_key(kb) / f"{m}.json")
            r = evaluate(model, tok, alloc, ecfg, baselines=full["baselines"], label=m, log=None, items=items)
            r["kv"] = kv_cost.measure(model, alloc, ctx, dec)
            save_run(r, out)
            n_eval += 1
            say(f"budget: eval b={kb} {m}: long Δnll {r['summary']['delta_long_nll']}, KV bytes {r['kv']['kv_bytes']}")
    del model
    free_device(device)
    return {"allocations": n_made, "evaluations": n_eval, "rows": budget_rows(wd)}


def budget_rows(wd) -> list[dict]:
    """The numbers of every budget run on disk, one row per (budget, method)."""
    cfg = wd.cfg
    full_path, full_kv_path = wd.evals / "full" / "eval.json", wd.evals / budget_key(0) / "full-kv.json"
    if cfg.budget is None or not full_path.is_file():
        return []
    full = json.loads(full_path.read_text())
    f_long = long_ppl(full)
    f_kv = json.loads(full_kv_path.read_text()) if full_kv_path.is_file() else None
    rows = []
    for kb in cfg.budget.kv_budgets:
        for m in cfg.budget.methods:
            p, mp = wd.evals / budget_key(kb) / m / "eval.json", wd.alloc / budget_key(kb) / f"{m}.meta.json"
            if not (p.is_file() and mp.is_file()):
                continue
            r, meta = json.loads(p.read_text()), json.loads(mp.read_text())
            kv = r.get("kv") or {}
            lp = long_ppl(r)
            rows.append({"kv_budget": kb, "method": m, "spans": meta.get("spans"), "fa_units": meta.get("fa_units"),
                         "units": meta.get("units"), "kv_share_computed": meta.get("kv_share_computed"),
                         "kv_bytes": kv.get("kv_bytes"),
                         "kv_share_measured": kv["kv_bytes"] / f_kv["kv_bytes"] if (f_kv and kv.get("kv_bytes")) else None,
                         "long_ratio": lp / f_long if (lp and f_long) else None, "retrieval": mean_retrieval(r),
                         "retrieval_raw": r["summary"].get("retrieval_raw"),
                         "prefill_ratio": kv["prefill_s"] / f_kv["prefill_s"] if (f_kv and kv.get("prefill_s")) else None,
                         "decode_ratio": (kv["decode_s_per_token"] / f_kv["decode_s_per_token"]
                                          if (f_kv and kv.get("decode_s_per_token") and f_kv.get("decode_s_per_token")) else None),
                         "prefill_s": kv.get("prefill_s"), "decode_s_per_token": kv.get("decode_s_per_token"),
                         "tokens_after_base": meta.get("tokens_after_base"), "seconds": meta.get("seconds"),
                         "cut_agreement": meta.get("cut_agreement")})
    return rows


def format_budget(wd) -> str:
    def f(v, d=3):
        return "–" if v is None else f"{v:.{d}f}"

    cfg = wd.cfg
    rows = budget_rows(wd)
    lines = [f"### Equal KV bytes (budget stage: KV at {_context(cfg)} tokens, span menu {cfg.budget.spans}, W = {cfg.W})", "",
             "| KV budget | method | spans used | FA units | KV share (measured) | long PPL ratio | retrieval | "
             "prefill / full | decode / full | tokens after base |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (-r["kv_budget"], r["long_ratio"] or 9e9)):
        lines.append(f"| {r['kv_budget']:g} | {r['method']} | {','.join(map(str, r['spans'] or []))} | "
                     f"{r['fa_units']}/{r['units']} | {f(r['kv_share_measured'], 4)} | {f(r['long_ratio'])} | "
                     f"{f(r['retrieval'], 2)} | {f(r['prefill_ratio'], 2)} | {f(r['decode_ratio'], 2)} | "
                     f"{(r['tokens_after_base'] or 0):,} |")
    if not rows:
        lines.append("| – | no budget run yet | | | | | | | | |")
    lines += ["", "KV share: bytes the cache holds after the prefill / full attention's (both measured). Long PPL "
              "ratio: positions > 2W, to full attention. Retrieval: mean over tasks (calibrated; raw where no length "
              "passed). Prefill / decode: eager cached path, one sequence, to full attention in the same run.", ""]
    return "\n".join(lines)
