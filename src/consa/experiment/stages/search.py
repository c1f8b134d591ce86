"""The ``search`` stage: every allocation of every sparsity, on one base model, in
``WORKDIR/alloc/s<t>/<method>.json``.

Learned methods (ConSA per unit kind, Duo-style) train gates on the same batch function; with
``search.search_seeds`` each seed searches once with its own seed and batches (``<method>-seed<s>``),
seed 0 being the unseeded search. Attention mass and the rules need no training. Each allocation is
written with a ``.meta.json`` record (seconds, search tokens, cut agreement, refinement), and a
finished one is skipped on the next call, so a time budget (``deadline``) only delays the searches
it did not start.
"""

from __future__ import annotations

import json
import time

from ...errors import ConsaError
from ...files import atomic_write_text
from ..batches import search_batch_fn, training_data
from ..config import LEARNED, method_list
from ..workdir import PartialStage, free_device, method_key, require, resolve_device, resolve_dtype, say


def _duo(model, gran, k, W, batch_fn, s, cfg, seed: int):
    from ...train.baselines import duo_allocation

    return duo_allocation(model, gran, k, W, batch_fn, steps=s.steps, lr=s.duo_lr, l1=s.duo_l1,
                          seed=seed, progress=cfg.progress, backend=s.backend)


def _refined(model, scfg, batch_fn, out_dir, searched, evals: int):
    """consa_refined: the finished ConSA search's gates (``out_dir/gates.safetensors``) with its cut refined by
    up to ``evals`` held-out KL evaluations, on the held-out batches a refinement inside that search would use.
    Returns the allocation and the row's record (the search's tokens and seconds, the refinement's evidence)."""
    import dataclasses

    import torch
    from safetensors.torch import load_file

    from ...train.search import Search

    gates = out_dir / "gates.safetensors"
    if not gates.is_file() or not searched.is_file():
        raise ConsaError(f"consa_refined needs the finished ConSA search in {out_dir} (gates.safetensors) and its "
                         f"record {searched}: run that search first")
    rec = json.loads(searched.read_text())
    scfg = dataclasses.replace(scfg, refine=dataclasses.replace(scfg.refine, evals=evals),
                               gates=dataclasses.replace(scfg.gates, init="constant"))
    search = Search(model, scfg, batch_fn, out_dir, progress=False)
    log_alpha = load_file(str(gates))["log_alpha"]
    if log_alpha.shape != search.gates.log_alpha.shape:
        raise ConsaError(f"{gates} holds {tuple(log_alpha.shape)} gates, the search here has {tuple(search.gates.log_alpha.shape)}")
    with torch.no_grad():
        search.gates.log_alpha.copy_(log_alpha.to(search.gates.log_alpha))
    search.step = int(rec.get("search_steps") or 0)  # the allocation's meta: the steps its gates trained
    ref = search.refine()
    extra = {k: rec.get(k) for k in ("final_expected_sparsity", "final_hard_sparsity", "cut_agreement", "search_steps",
                                     "cut_last_changed_step", "cut_margin")}
    extra.update(refine=ref.summary(), tokens=int(rec.get("tokens_after_base") or 0),
                 search_seconds=float(rec.get("seconds") or 0.0))
    return search.allocation(), extra


def search_seed(cfg, seed: int | None) -> int:
    """The seed of one learned search: the experiment's, shifted by the search seed (seed 0 = no seed)."""
    return cfg.seed + 1000 * int(seed or 0)


def search_config(cfg, s, t: float, gran: str, seq_len: int, seed: int, refine_evals: int):
    """The ``consa.train.search.SearchConfig`` of one ConSA search of the stage at sparsity ``t``."""
    from ...train.search_config import ConstraintConfig, LossConfig, RefineConfig, ScheduleConfig, SearchConfig, TargetConfig

    return SearchConfig(TargetConfig(sparsity=t, window=cfg.W, granularity=gran), seq_len=seq_len, gates=s.gate_config(),
                        schedule=ScheduleConfig(steps=s.steps, until_agreement=s.until_agreement, max_steps=s.max_steps),
                        constraint=ConstraintConfig(controller=s.controller, warmup_frac=s.warmup_frac),
                        loss=LossConfig(answer_weight=s.answer_weight),
                        refine=RefineConfig(evals=refine_evals, candidates=s.refine_candidates, order=s.refine_order),
                        seed=seed, checkpoint_every=0, backend=s.backend)


def run(wd, deadline: float | None = None) -> dict:
    from ...allocation import Allocation, swa_count
    from ...models import detach, load_model, model_shape
    from ...rules import rule_allocation
    from ...train.baselines import attention_mass_allocation
    from ...train.search import Search
    from ...train.search_config import AUTO_REFINE_EVALS

    cfg, s = wd.cfg, wd.cfg.search
    base = wd.base_model_dir()
    require(base is not None and wd.done("pretrain"), "search", f"the base model in {wd.base}", "pretrain", wd)
    device = resolve_device(cfg.device)
    model = load_model(base, dtype=resolve_dtype(s.dtype, device), device=str(device))
    shape = model_shape(model)
    shards, bank = training_data(wd, s.retrieval_share)
    seq_len = int(s.seq_len or cfg.context)
    W = cfg.W
    batch_fn = search_batch_fn(shards, bank, s.batch_size, seq_len, s.retrieval_share, cfg.seed)
    train_tokens = s.steps * s.batch_size * seq_len
    records, n_skipped = {}, 0
    for t in s.sparsities:
        d = wd.alloc / method_key(t)
        d.mkdir(parents=True, exist_ok=True)
        for stem, name, gran, seed in method_list(cfg):
            path = d / f"{stem}.json"
            rec_path = d / f"{stem}.meta.json"
            if path.is_file() and rec_path.is_file():
                records[f"{method_key(t)}/{stem}"] = json.loads(rec_path.read_text())
                continue
            if deadline is not None and time.time() > deadline and name in LEARNED:
                n_skipped += 1  # a search left for the next call (rules take no time: they still run)
                continue
            seeded = name in LEARNED and bool(s.search_seeds)
            sseed = search_seed(cfg, seed if seeded else None)
            fn = search_batch_fn(shards, bank, s.batch_size, seq_len, s.retrieval_share, sseed) if seeded else batch_fn
            n_units = shape.num_units(gran)
            k = swa_count(t, n_units)
            t0 = time.time()
            tokens = 0
            if name in ("consa", "consa_refined"):
                side_by_side = f"consa_refined-{gran}" in s.methods  # then consa keeps the plain top-k cut
                scfg = search_config(cfg, s, t, gran, seq_len, sseed, 0 if side_by_side else s.refine_evals)
                out_dir = wd.search_runs / (f"{method_key(t)}-{gran}" + (f"-seed{seed}" if seeded else ""))
            if name == "consa_refined":
                searched = d / f"{stem.replace('consa_refined-', 'consa-', 1)}.meta.json"
                alloc, extra = _refined(model, scfg, fn, out_dir, searched, s.refine_evals or AUTO_REFINE_EVALS)
                tokens = extra.pop("tokens")
                t0 -= extra.pop("search_seconds")  # the row's seconds: the search's and the refinement's
            elif name == "consa":
                resume = (out_dir / "checkpoint" / "state.json").is_file()
                alloc = Search(model, scfg, fn, out_dir, progress=cfg.progress).run(resume=resume)
                detach(model)
                summ = json.loads((out_dir / "search.json").read_text())
                extra = {"final_expected_sparsity": (summ.get("final") or {}).get("expected_sparsity"),
                         "final_hard_sparsity": (summ.get("final") or {}).get("hard_sparsity"),
                         "cut_agreement": summ.get("cut_agreement"), "search_steps": summ.get("steps_done"),
                         "cut_last_changed_step": summ.get("cut_last_changed_step"),
                         "cut_margin": summ.get("cut_margin"), "refine": summ.get("refine")}
                tokens = int(summ.get("steps_done") or s.steps) * s.batch_size * seq_len + int(summ.get("init_tokens", 0))
            elif name == "duo":
                alloc = _duo(model, gran, k, W, fn, s, cfg, sseed)
                extra, tokens = {}, train_tokens
            elif name == "attn_mass":
                batches = [batch_fn(10_000 + i) for i in range(s.mass_batches)]
                alloc = attention_mass_allocation(model, gran, k, W, batches)
                extra, tokens = {}, s.mass_batches * s.batch_size * seq_len
            else:
                alloc = rule_allocation(name, shape, gran, k, W, seed=seed or 0)
                extra = {}
            detach(model)
            if alloc.num_swa != k:
                raise ConsaError(f"{stem} at t={t}: {alloc.num_swa} SWA units, expected {k}")
            meta = dict(alloc.meta or {})
            meta.update(label=stem, method=name, sparsity_target=t)
            alloc = Allocation.from_dict({**alloc.to_dict(), "meta": meta})
            alloc.save(path)
            rec = {"stem": stem, "method": name, "granularity": gran, "seed": seed, "sparsity": t, "units": n_units,
                   "swa_units": k, "swa_heads": sum(1 for row in alloc.fa for b in row if not b),
                   "seconds": round(time.time() - t0, 2), "tokens_after_base": tokens, **extra}
            atomic_write_text(rec_path, json.dumps(rec, indent=1) + "\n")
            records[f"{method_key(t)}/{stem}"] = rec
            say(f"search: t={t} {stem}: {k}/{n_units} SWA in {rec['seconds']} s")
    del model
    free_device(device)
    if n_skipped:
        raise PartialStage(f"search: {n_skipped} searches left for a later call (time budget reached)")
    return {"allocations": len(records), "window": W, "seq_len": seq_len, "train_tokens_per_learned_method": train_tokens}
