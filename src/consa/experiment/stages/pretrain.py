"""The ``pretrain`` stage: a full-attention base model in ``WORKDIR/base``, trained on the corpus mixed with
retrieval items made by the eval's own generators (a pre-built bank, so the training loop never waits on
item generation) and, optionally, dense recall rows."""

from __future__ import annotations

import json

from ...data.bank import build_bank
from ...errors import ConsaError
from ..batches import pretrain_source
from ..workdir import PartialStage, Workdir, require, say


def run(wd: Workdir, deadline: float | None = None) -> dict:
    from ...train.pretrain import PretrainConfig, pretrain, resolve

    cfg, p = wd.cfg, wd.cfg.pretrain
    adopted = wd.stages().get("pretrain", {}).get("adopted_from")
    if adopted:
        raise ConsaError(f"{wd.root} uses the base model of {adopted} (--base-from); pretrain in a fresh --workdir")
    require((wd.corpus / "train" / "meta.json").is_file(), "pretrain", f"the corpus {wd.corpus}", "data", wd)
    seq_len = cfg.context
    bank_info = None
    if p.retrieval_mix > 0 and not wd.bank.is_file():
        say(f"pretrain: building the retrieval bank ({p.bank_items} items, {p.bank_workers} workers)")
        bank_info = build_bank(wd.corpus, wd.bank, p.bank_items, list(p.bank_tasks), p.bank_min_len,
                               max(p.bank_min_len, seq_len - 16), cfg.seed, p.bank_workers, p.bank_digits)
        say(f"pretrain: bank {bank_info}")
    pc = PretrainConfig(corpus=str(wd.corpus), out=str(wd.base), preset=p.preset, tokens=p.tokens, steps=p.steps,
                        batch_size=p.batch_size, seq_len=p.seq_len, lr=p.lr, device=cfg.device, compile=p.compile,
                        bf16=p.bf16, resume=True, seed=cfg.seed, eval_every=p.eval_every, threads=p.threads,
                        time_limit=p.time_limit, stop_at=p.stop_at, progress=cfg.progress,
                        answer_weight=p.answer_weight)
    pretrain(pc, batch_source=pretrain_source(wd, resolve(pc).steps))
    log_path = wd.base / "pretrain_log.json"
    if not log_path.is_file():
        log_path = wd.base / "checkpoint" / "pretrain_log.json"
    log = json.loads(log_path.read_text())
    model_dir = wd.base if (wd.base / "config.json").is_file() else wd.base / "checkpoint"
    if not (model_dir / "config.json").is_file():
        raise ConsaError(f"pretraining left no model in {wd.base}")
    val = log.get("validation") or [{}]
    info = {"model": str(model_dir), "finished": log.get("finished"), "steps": log.get("steps_done"),
            "tokens": log.get("tokens_done"), "parameters": log.get("parameters"),
            "tokens_per_s": log.get("train_tokens_per_s"), "val_loss_first": val[0].get("val_loss"),
            "val_loss_last": val[-1].get("val_loss"), "retrieval_mix": p.retrieval_mix, "bank": bank_info,
            "answer_weight": p.answer_weight, "answer_loss_last": (log.get("history") or [{}])[-1].get("answer_loss")}
    if not log.get("finished"):
        if p.stop_at is not None and info["steps"] < p.stop_at:  # the time limit came first: not the base asked for
            raise PartialStage(f"pretrain: the time limit stopped it at step {info['steps']} before stop_at {p.stop_at}; "
                               "the next call continues from its checkpoint")
        say(f"pretrain: stopped (time limit or stop_at) after {info['steps']} steps; the last checkpoint is the base model")
    return info
