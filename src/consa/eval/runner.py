"""One evaluation of one model under one allocation: quality, retrieval grid, calibration, FA shares.

:func:`evaluate` is what ``consa eval`` and the experiment driver both call. It returns one plain,
JSON-serialisable dict (schema ``consa.eval`` v1, documented in docs/EVAL.md) and leaves the model as
it found it (attention implementation and consa plans restored).

Order of work: task items are built once (same prompts for every variant), then each variant —
``full`` (all units FA), ``all_swa`` (all units SWA, same window and sinks) and the allocation under
test — is applied through :func:`consa.apply_allocation` and measured on the same sequences and items.
Without an allocation the model under test *is* the full-attention variant. The baselines can be
handed in (``baselines=``, from an earlier result) so a sweep evaluates them once.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from ..allocation import Allocation
from ..errors import ConsaError
from ..models import apply_allocation, attention_modules, model_shape
from . import calibration as calib
from .quality import chunk_documents, perplexity, sequences_from_shards
from .retrieval import build_items, model_generate_fn, run_grid

FORMAT = "consa.eval"
VERSION = 1
DEFAULT_TASKS = ("passkey", "multikey", "varrecall")


@dataclass
class EvalConfig:
    """Everything that decides the numbers (stored in eval.json as ``config``)."""

    tasks: tuple[str, ...] = DEFAULT_TASKS
    lengths: tuple[int, ...] = (512, 1024)
    depths: tuple[float, ...] = (0.1, 0.5, 0.9)
    items: int = 8  # per (task, length, depth) cell
    digits: int = 5  # digits of passkeys / values: fewer make retrieval easier for small base models
    haystack: str | None = None  # the user's text (file or directory) for passkey/multikey; None: stdlib text
    window: int | None = None  # default: the allocation's window (required without an allocation)
    # keep the allocation's spans and use ``window`` only for the short/long split and all-SWA (budget
    # comparisons: rows of other spans on one split); allocations with several spans always keep theirs
    keep_spans: bool = False
    sinks: int | None = None  # default: the allocation's sinks, else 0
    corpus: str | None = None  # token-shard corpus for perplexity (None: no perplexity)
    split: str = "validation"
    ppl_length: int | None = None  # tokens per perplexity sequence; default max(lengths) (or 16·W)
    ppl_sequences: int = 16
    batch_size: int = 4
    autocast: str | None = None  # "bf16" | "fp16" | None
    backend: str = "auto"  # consa attention kernel choice
    calibrate: bool = True  # also evaluate full attention and all-SWA
    full_min: float = calib.FULL_MIN
    swa_max: float = calib.SWA_MAX
    seed: int = 0
    progress: bool = True
    extra: dict = field(default_factory=dict)  # free-form, recorded only

    def validate(self) -> "EvalConfig":
        self.tasks = tuple(self.tasks)
        self.lengths = tuple(int(x) for x in self.lengths)
        self.depths = tuple(float(x) for x in self.depths)
        if not 1 <= int(self.digits) <= 12:
            raise ConsaError(f"digits must be between 1 and 12, got {self.digits}")
        if any(x < 1 for x in self.lengths):
            raise ConsaError(f"lengths must be positive, got {list(self.lengths)}")
        if any(not (0.0 <= d <= 1.0) for d in self.depths):
            raise ConsaError(f"depths must lie in [0, 1], got {list(self.depths)}")
        if self.tasks and (not self.lengths or not self.depths):
            raise ConsaError("retrieval needs at least one length and one depth")
        for name in ("items", "batch_size", "ppl_sequences"):
            if getattr(self, name) < 1:
                raise ConsaError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.window is not None and self.window < 1:
            raise ConsaError(f"window must be >= 1, got {self.window}")
        if self.sinks is not None and self.sinks < 0:
            raise ConsaError(f"sinks must be >= 0, got {self.sinks}")
        return self


def fingerprint(cfg: EvalConfig, window: int, sinks: int, haystack_sha256: str | None = None) -> dict:
    """What baselines must share with a result to be reused. A user haystack enters by its content
    hash (not its path: edited text must not reuse old results); the default one adds no key, so
    fingerprints stored before haystacks existed still match."""
    keys = ("tasks", "lengths", "depths", "items", "digits", "corpus", "split", "ppl_length", "ppl_sequences", "seed")
    d = {k: getattr(cfg, k) for k in keys}
    d.update(window=window, sinks=sinks)
    if haystack_sha256 is not None:
        d["haystack"] = haystack_sha256
    return json.loads(json.dumps(d))


def resolve_haystack(haystack=None, cfg: EvalConfig | None = None):
    """The :class:`~consa.data.haystack.Haystack` in use: ``haystack`` (strings or a Haystack), else
    the file/directory ``cfg.haystack``, else None (the stdlib text)."""
    from ..data.haystack import Haystack, load_haystack

    if haystack is not None:
        return haystack if isinstance(haystack, Haystack) else Haystack.from_texts(haystack)
    if cfg is not None and cfg.haystack is not None:
        return load_haystack(cfg.haystack)
    return None


def evaluate(
    model,
    tokenizer,
    allocation: Allocation | None = None,
    cfg: EvalConfig | None = None,
    *,
    documents: Iterable[Sequence[int]] | None = None,
    baselines: dict | None = None,
    haystack=None,
    label: str | None = None,
    log: Callable[[str], None] | None = print,
    items: tuple[dict, dict] | None = None,
) -> dict:
    """Evaluate ``model`` under ``allocation`` (None: full attention). See the module docstring.

    ``documents``: token sequences for perplexity (overrides ``cfg.corpus``); ``baselines``: the
    ``"baselines"`` entry of an earlier result with the same fingerprint, reused instead of recomputed;
    ``haystack``: the text tasks' filler (strings or a ``Haystack``; default: ``cfg.haystack``, else
    the stdlib text), its hash part of the baselines' fingerprint; ``log``: where the calibration
    check and progress lines go (None: silent); ``items``: the ``(cells, errors)`` of
    :func:`retrieval_items` for this ``cfg`` and haystack, to share between evaluations (building
    them costs ~0.1 s of CPU per item).
    """
    cfg = (cfg or EvalConfig()).validate()
    t0 = time.time()
    say = log or (lambda s: None)
    shape = model_shape(model)
    if allocation is not None:
        allocation.check_matches(shape)
        keep = cfg.keep_spans or allocation.multi_span
        if cfg.window is not None and cfg.window != allocation.window and not keep:
            allocation = allocation.with_window(cfg.window)
        if cfg.sinks is not None and cfg.sinks != allocation.sinks:
            allocation = allocation.with_window(allocation.window, cfg.sinks)
        window, sinks = (cfg.window if keep and cfg.window is not None else allocation.window), allocation.sinks
    else:
        if cfg.window is None:
            raise ConsaError("a window is needed (short/long-range split and the all-SWA check): pass --window W")
        window, sinks = cfg.window, cfg.sinks or 0
    full_alloc = Allocation.uniform(True, "layer", shape, window, sinks)
    swa_alloc = Allocation.uniform(False, "layer", shape, window, sinks)

    # ---- shared inputs -----------------------------------------------------------------------
    hay = resolve_haystack(haystack, cfg) if cfg.tasks else None
    seqs = _ppl_sequences(cfg, window, documents)
    cells, cell_errors = items if items is not None else retrieval_items(tokenizer, cfg, hay)
    for (task, length, depth), reason in cell_errors.items():
        say(f"consa eval: skipped {task} at length {length}, depth {depth:g}: {reason}")
    if cells and all(not items for items in cells.values()):
        first = next(iter(cell_errors.items()))
        raise ConsaError(f"no retrieval item could be made (e.g. {first[0][0]} at length {first[0][1]}: {first[1]})")

    fp = fingerprint(cfg, window, sinks, hay.sha256 if hay is not None else None)
    if baselines is not None and baselines.get("fingerprint") != fp:
        say("consa eval: the baselines handed in were made with other settings; recomputing them")
        baselines = None

    saved = _save_attention_state(model)
    try:
        def run(name: str, alloc: Allocation) -> dict:
            apply_allocation(model, alloc, backend=cfg.backend)
            out = {"quality": None, "retrieval": {}}
            if seqs is not None:
                out["quality"] = perplexity(
                    model, seqs, window, batch_size=cfg.batch_size, autocast=cfg.autocast, progress=cfg.progress, desc=f"ppl {name}"
                )
            if cells:
                gen = model_generate_fn(model, tokenizer, batch_size=cfg.batch_size, autocast=cfg.autocast, sinks=alloc.sinks)
                out["retrieval"] = run_grid(gen, cells, tokenizer, progress=cfg.progress, desc=f"retrieval {name}", errors=cell_errors)
            return out

        if cfg.calibrate and baselines is None:
            baselines = {"fingerprint": fp, "full": run("full", full_alloc), "all_swa": run("all-SWA", swa_alloc)}
        if allocation is None:
            main = baselines["full"] if (cfg.calibrate and baselines) else run("full", full_alloc)
        else:
            main = run(label or "allocation", allocation)
    finally:
        _restore_attention_state(model, saved)

    calibration = None
    if cfg.calibrate and cells:
        calibration = calib.calibrate(
            baselines["full"]["retrieval"], baselines["all_swa"]["retrieval"], full_min=cfg.full_min, swa_max=cfg.swa_max
        )
        say(calib.format_check(calibration, full_min=cfg.full_min, swa_max=cfg.swa_max))
    retrieval = calib.reported_grid(main["retrieval"], calibration)
    used = allocation or full_alloc
    result = {
        "format": FORMAT,
        "version": VERSION,
        "label": label or _default_label(allocation),
        "model": None,
        "shape": asdict(shape),
        "window": window,
        "sinks": sinks,
        "allocation": allocation.to_dict() if allocation is not None else None,
        "allocation_stats": used.stats(),
        "config": json.loads(json.dumps(asdict(cfg), default=str)),
        "haystack": hay.info() if hay is not None else None,
        "quality": main["quality"],
        "retrieval": retrieval,
        "calibration": calibration,
        "baselines": baselines if cfg.calibrate else None,
        "summary": {},
        "seconds": None,
    }
    result["summary"] = summarize(result)
    result["seconds"] = round(time.time() - t0, 3)
    return result


def retrieval_items(tokenizer, cfg: EvalConfig, haystack=None) -> tuple[dict, dict]:
    """``(cells, errors)``: the retrieval grid's items of ``cfg`` (see ``build_items``); ``haystack``
    as in :func:`evaluate`."""
    haystack = resolve_haystack(haystack, cfg) if cfg.tasks else None
    errors: dict = {}
    cells = build_items(tokenizer, cfg.tasks, cfg.lengths, cfg.depths, cfg.items, cfg.seed, haystack=haystack,
                        errors=errors, digits=cfg.digits) if cfg.tasks else {}
    return cells, errors


def _default_label(allocation: Allocation | None) -> str:
    if allocation is None:
        return "full"
    meta = allocation.meta or {}
    for key in ("label", "method", "rule", "name"):
        if isinstance(meta.get(key), str) and meta[key]:
            return meta[key]
    return f"{allocation.granularity} s={allocation.sparsity:.3g}"


def _ppl_sequences(cfg: EvalConfig, window: int, documents) -> list[np.ndarray] | None:
    if documents is None and cfg.corpus is None:
        return None
    seq_len = cfg.ppl_length or (max(cfg.lengths) if cfg.lengths else 16 * window)
    if seq_len <= 2 * window + 1:
        raise ConsaError(f"perplexity length {seq_len} leaves no long-range position (> 2W = {2 * window}); use a longer --ppl-length")
    if documents is not None:
        seqs = chunk_documents(documents, seq_len, cfg.ppl_sequences)
        if not seqs:
            raise ConsaError(f"no document of at least {seq_len} tokens for perplexity")
        return seqs
    from ..data.shards import TokenShards

    try:
        shards = TokenShards.open(cfg.corpus, split=cfg.split)
    except ConsaError:
        raise
    except (FileNotFoundError, OSError, ValueError, KeyError) as e:
        raise ConsaError(f"cannot open corpus {cfg.corpus} (split {cfg.split!r}): {e}") from None
    return sequences_from_shards(shards, seq_len, cfg.ppl_sequences)


def _save_attention_state(model):
    cfg = getattr(model, "config", None)
    impl = getattr(cfg, "_attn_implementation", None)
    plans = [(m, getattr(m, "consa_plan", None)) for m in attention_modules(model)]
    return impl, plans


def _restore_attention_state(model, saved) -> None:
    impl, plans = saved
    for mod, plan in plans:
        if plan is None:
            if hasattr(mod, "consa_plan"):
                del mod.consa_plan
        else:
            mod.consa_plan = plan
    if impl is not None:
        if hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation(impl)
        else:  # pragma: no cover
            model.config._attn_implementation = impl


# ---- summary -----------------------------------------------------------------------------------
def summarize(result: dict) -> dict:
    """Headline numbers of a result (what ``consa report`` tabulates)."""
    from .calibration import reported_mean

    q = result.get("quality") or {}
    s: dict = {
        "label": result.get("label"),
        "sparsity": (result.get("allocation_stats") or {}).get("sparsity"),
        "granularity": (result.get("allocation_stats") or {}).get("granularity"),
        "window": result.get("window"),
    }
    for r in ("overall", "short", "long"):
        s[f"{r}_nll"] = (q.get(r) or {}).get("nll")
        s[f"{r}_ppl"] = (q.get(r) or {}).get("ppl")
    base = result.get("baselines") or {}
    fq = ((base.get("full") or {}).get("quality") or {}).get("long") or {}
    sq = ((base.get("all_swa") or {}).get("quality") or {}).get("long") or {}
    f_nll, s_nll, m_nll = fq.get("nll"), sq.get("nll"), s["long_nll"]
    s["full_long_nll"], s["all_swa_long_nll"] = f_nll, s_nll
    s["delta_long_nll"] = m_nll - f_nll if (m_nll is not None and f_nll is not None) else None
    gap = (s_nll - f_nll) if (s_nll is not None and f_nll is not None) else None
    s["gap_closed_long"] = (s_nll - m_nll) / gap if (gap is not None and m_nll is not None and gap > 1e-9) else None
    s["retrieval"] = {t: reported_mean(g) for t, g in (result.get("retrieval") or {}).items()}
    s["retrieval_raw"] = {t: calib.reported_mean({"accuracy": g["accuracy"]}) for t, g in (result.get("retrieval") or {}).items()}
    return s


# ---- markdown ----------------------------------------------------------------------------------
def _f(v, digits: int = 3) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def format_markdown(result: dict) -> str:
    """eval.md: quality, calibration check, retrieval grids (reported; raw in brackets where the
    length failed calibration) and FA share per layer."""
    s = result["summary"]
    lines = [f"# consa eval: {result['label']}", ""]
    if result.get("model"):
        lines.append(f"Model: `{result['model']}`  ")
    st = result["allocation_stats"]
    alloc_desc = "none (full attention)" if result["allocation"] is None else (
        f"{st['granularity']}, {st['swa_units']}/{st['units']} units SWA (sparsity {st['sparsity']:.3f})"
    )
    lines += [f"Allocation: {alloc_desc}  ", f"Window W = {result['window']}, sinks = {result['sinks']}", ""]
    hay = result.get("haystack")
    if hay:
        lines[-1:-1] = ["", f"Haystack (passkey, multikey): `{hay['source']}`, {hay['documents']} documents, "
                        f"sha256 {hay['sha256'][:16]}…"]

    q = result.get("quality")
    lines.append("## Perplexity (held-out long documents)")
    lines.append("")
    if q is None:
        lines += ["Not measured (no corpus given).", ""]
    else:
        lines += [
            f"{q['sequences']} sequences × {q['seq_len']} tokens; short-range = positions ≤ W, long-range = positions > 2W.",
            "",
            "| variant | PPL | short-range PPL | long-range PPL | long-range NLL | Δ long NLL vs full | gap closed |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        rows = [(result["label"], q, s["delta_long_nll"], s["gap_closed_long"])]
        base = result.get("baselines") or {}
        for name, key in (("full attention", "full"), ("all-SWA", "all_swa")):
            bq = (base.get(key) or {}).get("quality")
            if bq and not (key == "full" and result["allocation"] is None):
                d = bq["long"]["nll"] - s["full_long_nll"] if s["full_long_nll"] is not None and bq["long"]["nll"] is not None else None
                rows.append((name, bq, d, None))
        for name, qq, d, gap in rows:
            lines.append(
                f"| {name} | {_f(qq['overall']['ppl'], 2)} | {_f(qq['short']['ppl'], 2)} | {_f(qq['long']['ppl'], 2)} | "
                f"{_f(qq['long']['nll'])} | {_f(d)} | {'–' if gap is None else f'{gap:.0%}'} |"
            )
        lines.append("")

    retrieval = result.get("retrieval") or {}
    if retrieval:
        lines += ["## Retrieval (exact match, greedy)", ""]
        if result.get("calibration") is not None:
            lines += [calib.format_check(result["calibration"], full_min=result["config"]["full_min"], swa_max=result["config"]["swa_max"]), ""]
            lines += ["Lengths that fail calibration are not reported; their raw accuracy is shown in brackets.", ""]
        else:
            lines += ["Calibration skipped (--no-calibrate): raw numbers, not checked against full attention / all-SWA.", ""]
        for task, g in retrieval.items():
            lines += [f"### {task} ({g['items']} items per cell)", "", "| length \\ depth | " + " | ".join(f"{d:g}" for d in g["depths"]) + " |"]
            lines.append("|---:|" + "---:|" * len(g["depths"]))
            for length, raw, rep in zip(g["lengths"], g["accuracy"], g["reported"]):
                cells = [_f(r, 2) if r is not None else (f"({_f(a, 2)})" if a is not None else "–") for a, r in zip(raw, rep)]
                lines.append(f"| {length} | " + " | ".join(cells) + " |")
            lines.append("")
            for sk in g.get("skipped") or []:
                lines.append(f"- skipped length {sk['length']}, depth {sk['depth']:g}: {sk['reason']}")
            if g.get("skipped"):
                lines.append("")

    shares = st["fa_share_per_layer"]
    lines += ["## FA share per layer", "", "| layer | " + " | ".join(str(i) for i in range(len(shares))) + " |"]
    lines += ["|---|" + "---:|" * len(shares), "| FA share | " + " | ".join(f"{x:.2f}" for x in shares) + " |", ""]
    lines.append(f"Contiguity {st['contiguity']:.2f}; FA blocks {st['fa_blocks']}.")
    lines.append("")
    return "\n".join(lines)


# ---- run directory -------------------------------------------------------------------------------
def write_run(result: dict, out: str | os.PathLike, figures: Sequence[str] = ()) -> Path:
    """Write a run directory that ``consa report`` reads: eval.md (linking ``figures``, pictures already
    in ``out``) and eval.json, each atomically, eval.json last. Measurement draws nothing: the caller
    draws the figures first (``consa.plots.draw_run``). Returns the directory."""
    from ..files import atomic_write_text

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    result["figures"] = list(figures)
    md = format_markdown(result) + "".join(f"\n![{p}]({p})\n" for p in figures)
    atomic_write_text(out / "eval.md", md)
    atomic_write_text(out / "eval.json", json.dumps(result, indent=1, default=_jsonable) + "\n")
    return out


def _jsonable(o):
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, (set, tuple)):
        return list(o)
    return str(o)
