"""The ``eval`` stage: ``consa.eval.evaluate`` of the full model (with the full / all-SWA calibration
baselines) and of every allocation, in ``WORKDIR/eval/...`` (one run dir each, as ``consa eval`` writes)."""

from __future__ import annotations

import time

from ..config import method_list
from ..scoring import calibration_summary, eval_config, full_eval, save_run
from ..workdir import PartialStage, Workdir, free_device, method_key, require, resolve_device, resolve_dtype, say


def run(wd: Workdir, deadline: float | None = None) -> dict:
    from ...allocation import Allocation
    from ...data.tokenizer import load_tokenizer
    from ...eval.runner import evaluate, retrieval_items
    from ...models import load_model

    cfg = wd.cfg
    require(wd.done("search"), "eval", f"the allocations in {wd.alloc}", "search", wd)
    base = wd.base_model_dir()
    device = resolve_device(cfg.device)
    model = load_model(base, dtype=resolve_dtype(cfg.eval.dtype, device), device=str(device))
    tok = load_tokenizer(base)
    ecfg = eval_config(cfg, wd.corpus)
    items = retrieval_items(tok, ecfg)  # once for all runs: the items are the same for every allocation
    full = full_eval(wd, model, tok, ecfg, items)
    n_done, n_skipped = 0, 0
    for t in cfg.search.sparsities:
        for stem, *_ in method_list(cfg):
            out = wd.evals / method_key(t) / stem
            if (out / "eval.json").is_file():
                continue
            if deadline is not None and time.time() > deadline:
                n_skipped += 1
                continue
            alloc = Allocation.load(wd.alloc / method_key(t) / f"{stem}.json")
            r = evaluate(model, tok, alloc, ecfg, baselines=full["baselines"], label=stem, log=None, items=items)
            save_run(r, out)
            n_done += 1
            say(f"eval: t={t} {stem}: long Δnll {r['summary']['delta_long_nll']}, retrieval "
                f"{ {k: v for k, v in r['summary']['retrieval_raw'].items()} } ({r['seconds']} s)")
    del model
    free_device(device)
    if n_skipped:
        raise PartialStage(f"eval: {n_skipped} runs left for a later call (time budget reached)")
    return {"runs": n_done, "calibration": calibration_summary(full)}
