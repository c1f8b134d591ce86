"""Scoring shared by the stages and the report: the eval config of the experiment, the full-attention run
every allocation is compared with, writing one eval run, and the numbers the tables read from a run
(long-range PPL, retrieval averaged over tasks, the calibration summary)."""

from __future__ import annotations

import json
from pathlib import Path

from .config import ExperimentConfig
from .workdir import Workdir, say


def eval_config(cfg: ExperimentConfig, corpus: Path | None):
    """The ``consa.eval`` settings of the experiment's eval section (window W, the experiment's seed)."""
    from ..eval.runner import EvalConfig

    e = cfg.eval
    return EvalConfig(tasks=tuple(e.tasks), lengths=tuple(e.lengths), depths=tuple(e.depths), items=e.items, digits=e.digits,
                      window=cfg.W, corpus=str(corpus) if corpus else None,
                      ppl_length=e.ppl_length, ppl_sequences=e.ppl_sequences, batch_size=e.batch_size,
                      autocast=e.autocast, backend=e.backend, seed=cfg.seed, progress=cfg.progress)


def save_run(result: dict, out: Path) -> Path:
    """One eval run directory as ``consa eval`` writes it: its pictures, eval.md and eval.json."""
    from ..eval.runner import write_run
    from ..plots import draw_run

    return write_run(result, out, draw_run(result, out))


def full_eval(wd: Workdir, model, tok, ecfg, items) -> dict:
    """The full-attention run with the full / all-SWA baselines: read from ``WORKDIR/eval/full``, or made
    there once (every later stage compares against it)."""
    from ..eval.runner import evaluate

    full_dir = wd.evals / "full"
    if (full_dir / "eval.json").is_file():
        return json.loads((full_dir / "eval.json").read_text())
    full = evaluate(model, tok, None, ecfg, label="full", items=items)
    save_run(full, full_dir)
    say(f"eval: full + baselines in {full['seconds']} s")
    return full


def calibration_summary(full: dict) -> dict:
    """Per task and length: the full and all-SWA accuracy and whether the length counts (passed calibration)."""
    cal = full.get("calibration") or {}
    return {task: [{k: r.get(k) for k in ("length", "full", "all_swa", "pass")} for r in rows] for task, rows in cal.items()}


def long_ppl(res: dict):
    """Long-range PPL (positions > 2W) of one eval run, None when it has none."""
    return ((res.get("quality") or {}).get("long") or {}).get("ppl")


def short_ppl(res: dict):
    return ((res.get("quality") or {}).get("short") or {}).get("ppl")


def mean_retrieval(res: dict):
    """Mean over tasks of the calibrated retrieval (raw where no length passed calibration)."""
    s = res["summary"]
    vals = [v if v is not None else s["retrieval_raw"].get(k) for k, v in (s.get("retrieval") or {}).items()]
    vals = [v for v in vals if v is not None]
    return sum(vals) / len(vals) if vals else None
