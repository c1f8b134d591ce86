"""``consa eval``: perplexity by range, the retrieval grid with its calibration check, FA shares."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from ..errors import ConsaError
from .argtypes import nonneg_int, positive_int


def _comma_list(cast, kind: str):
    """argparse type: a comma-separated list of ``cast`` values, at least one."""

    def parse(text: str) -> tuple:
        try:
            vals = tuple(cast(x) for x in text.split(",") if x.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind}, got {text!r}") from None
        if not vals:
            raise argparse.ArgumentTypeError("expected at least one value")
        return vals

    return parse


_ints = _comma_list(int, "integers")
_floats = _comma_list(float, "numbers")


def _tasks(text: str) -> tuple[str, ...]:
    if text.strip().lower() in ("", "none"):
        return ()
    return tuple(t.strip() for t in text.split(",") if t.strip())


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "eval",
        help="evaluate a model (optionally under an allocation): perplexity, retrieval grid, calibration",
        description="Perplexity overall / short-range (positions <= W) / long-range (> 2W) of held-out long "
        "documents, a retrieval grid over lengths x depths per task with the calibration check "
        "(full attention >= 0.8 and all-SWA <= 0.2), and the allocation's FA share per layer.",
    )
    p.add_argument("--model", required=True, help="Hugging Face model directory")
    p.add_argument("--allocation", help="allocation JSON (default: full attention)")
    p.add_argument("--tokenizer", help="tokenizer file or directory (default: the model directory)")
    p.add_argument("--corpus", help="consa corpus directory for perplexity (default: no perplexity)")
    p.add_argument("--split", default="validation", help="corpus split for perplexity (default validation)")
    p.add_argument("--ppl-length", type=positive_int, help="tokens per perplexity sequence (default: the largest --lengths)")
    p.add_argument("--ppl-sequences", type=positive_int, default=16, help="perplexity sequences (default 16)")
    p.add_argument("--tasks", type=_tasks, default=None, help="comma-separated tasks, or 'none' (default passkey,multikey,varrecall)")
    p.add_argument("--lengths", type=_ints, default=(512, 1024), help="context lengths in tokens (default 512,1024)")
    p.add_argument("--depths", type=_floats, default=(0.1, 0.5, 0.9), help="needle depths in [0,1] (default 0.1,0.5,0.9)")
    p.add_argument("--items", type=positive_int, default=8, help="items per (task, length, depth) cell (default 8)")
    p.add_argument("--window", type=positive_int, help="sliding window W (default: the allocation's; required without one)")
    p.add_argument("--sinks", type=nonneg_int, help="attention sinks (default: the allocation's, else 0)")
    p.add_argument("--batch-size", type=positive_int, default=4)
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default cpu)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU)")
    p.add_argument("--no-calibrate", action="store_true", help="skip the full-attention / all-SWA runs (raw numbers only)")
    p.add_argument("--seed", type=nonneg_int, default=0)
    p.add_argument("--digits", type=positive_int, default=5, help="digits of passkeys / values (fewer: easier retrieval)")
    p.add_argument("--haystack", metavar="PATH", help="your own text as the passkey/multikey filler: a .txt/.md/.jsonl "
                   "file ('text' field per line) or a directory of them (default: the Python stdlib's text)")
    p.add_argument("--label", help="name of this run in reports (default: allocation meta or file name, or 'full')")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", required=True, help="run directory to write eval.json, eval.md and PNGs into")
    p.set_defaults(func=run)


def _load_tokenizer(path: Path):
    try:
        from ..data.tokenizer import load_tokenizer
    except ModuleNotFoundError as e:  # pragma: no cover - data package missing
        if e.name not in ("consa.data", "consa.data.tokenizer"):
            raise
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except Exception as e2:
            raise ConsaError(f"cannot load a tokenizer from {path}: {str(e2).splitlines()[0] if str(e2) else type(e2).__name__}") from None
    return load_tokenizer(path)


def _device(name: str) -> str:
    import torch

    if name == "cpu":
        return name
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConsaError(f"--device {name}: CUDA is not available on this machine")
        return name
    raise ConsaError(f"unknown device {name!r}; use cpu, cuda or cuda:N")


def run(args) -> int:
    from ..allocation import Allocation
    from ..data.batches import check_corpus_vocab
    from ..eval.runner import DEFAULT_TASKS, EvalConfig, evaluate, write_run
    from ..files import output_dir
    from ..models import load_model
    from ..plots import draw_run
    from .common import check_model_dir

    tasks = DEFAULT_TASKS if args.tasks is None else args.tasks
    if tasks:
        try:
            from ..data.tasks import TASKS
        except ModuleNotFoundError:  # pragma: no cover - tasks not built yet
            TASKS = None
        if TASKS is not None:
            unknown = [t for t in tasks if t not in TASKS]
            if unknown:
                raise ConsaError(f"unknown task(s) {', '.join(unknown)}; choose from {', '.join(TASKS)}")
    cfg = EvalConfig(
        tasks=tasks, lengths=args.lengths, depths=args.depths, items=args.items, window=args.window, sinks=args.sinks,
        corpus=args.corpus, split=args.split, ppl_length=args.ppl_length, ppl_sequences=args.ppl_sequences,
        batch_size=args.batch_size, autocast="bf16" if args.bf16 else None, calibrate=not args.no_calibrate,
        seed=args.seed, progress=not args.no_progress, digits=args.digits, haystack=args.haystack,
    ).validate()
    haystack = _load_haystack(args.haystack, tasks)  # before minutes of loading weights
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ConsaError(f"--out {out} exists and is not a directory")
    if cfg.corpus is not None and not Path(cfg.corpus).is_dir():
        raise ConsaError(f"corpus directory not found: {cfg.corpus}")
    allocation = Allocation.load(args.allocation) if args.allocation else None
    device = _device(args.device)
    model_dir = check_model_dir(args.model)  # before the output dir or any weights
    if allocation is None:
        allocation = _stored_allocation(model_dir)
    if allocation is not None and (model_dir / "config.json").is_file():
        _check_shape_early(model_dir, allocation)  # before minutes of loading weights
    if args.no_progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    model = load_model(model_dir, device=device)
    if cfg.corpus is not None:
        check_corpus_vocab(cfg.corpus, cfg.split, model.config.get_text_config().vocab_size)
    tokenizer = _load_tokenizer(Path(args.tokenizer) if args.tokenizer else model_dir)
    label = args.label or (None if allocation is None or _meta_label(allocation)
                           else Path(args.allocation).stem if args.allocation else model_dir.name)

    result = evaluate(model, tokenizer, allocation, cfg, haystack=haystack, label=label, log=print)
    result["model"] = str(model_dir)
    result["command"] = "consa " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:2] == ["eval"] else None
    with output_dir(out) as staged:
        write_run(result, staged, draw_run(result, staged))
    s = result["summary"]
    line = f"consa eval: {result['label']}"
    if s.get("long_nll") is not None:
        line += f"  ppl {s['overall_ppl']:.2f}  short {s['short_ppl']:.2f}  long {s['long_ppl']:.2f}"
    for t, v in (s.get("retrieval") or {}).items():
        line += f"  {t} {'–' if v is None else f'{v:.2f}'}"
    print(line)
    print(f"wrote {out / 'eval.json'}, {out / 'eval.md'}")
    return 0


def _stored_allocation(model_dir: Path):
    """The allocation a consa export (or a ``consa heal`` output) carries, in its own head order: such a
    model is the hybrid, so evaluating it as full attention by default would report the wrong model."""
    from ..export import read_export

    _, section, stored = read_export(model_dir)
    if stored is None or section.get("mode") != "heads":  # a native export is hybrid in its own config
        return None
    if stored is not None:
        print(f"consa eval: {model_dir} is a consa export: evaluating its stored allocation "
              f"({stored.num_swa}/{stored.num_units} SWA units; --allocation overrides)")
    return stored


def _load_haystack(path: str | None, tasks):
    if path is None:
        return None
    from ..data.haystack import TEXT_TASKS, load_haystack

    if not any(t in TEXT_TASKS for t in tasks):
        raise ConsaError(f"--haystack fills the {' and '.join(TEXT_TASKS)} tasks, and --tasks has neither")
    return load_haystack(path)


def _check_shape_early(model_dir: Path, allocation) -> None:
    from transformers import AutoConfig

    from ..models import model_shape

    try:
        config = AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
        shape = model_shape(config)
    except Exception:  # load_model reports a broken model directory properly
        return
    allocation.check_matches(shape)


def _meta_label(allocation) -> bool:
    meta = allocation.meta or {}
    return any(isinstance(meta.get(k), str) and meta[k] for k in ("label", "method", "rule", "name"))
