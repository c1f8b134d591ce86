"""``consa export --model DIR --allocation A --out OUT``: write a servable hybrid model (see consa.export)."""

from __future__ import annotations


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "export",
        help="export a model + allocation (native layer_types when possible, else head-wise)",
        description="Write MODEL with ALLOCATION applied to the new folder OUT (safetensors). A layer-wise "
        "allocation on Qwen3/Qwen2/Llama/Mistral becomes native layer_types + sliding_window (no consa "
        "needed to load it); anything else is stored head-wise and loads with consa.load(OUT).",
    )
    p.add_argument("--model", required=True, help="Hugging Face model folder (full attention)")
    p.add_argument("--allocation", required=True, help="allocation JSON (consa.allocation format)")
    p.add_argument("--out", required=True, help="new output folder (must not exist, or be empty)")
    p.add_argument("--mode", choices=("auto", "native", "heads"), default="auto", help="force a format (default: auto)")
    p.add_argument("--dtype", default=None, help="load/save dtype, e.g. bfloat16 (default: as stored)")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from ..allocation import Allocation
    from ..errors import ConsaError
    from ..export import export
    from ..files import output_dir
    from ..models import load_model
    from .common import check_model_dir

    from pathlib import Path

    from transformers.utils import logging as hf_logging

    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConsaError(f"output {out} already exists and is not an empty folder")
    alloc = Allocation.load(args.allocation)
    hf_logging.disable_progress_bar()  # keep stderr to the one error line
    dtype = None
    if args.dtype:
        dtype = getattr(torch, args.dtype, None)
        if not isinstance(dtype, torch.dtype):
            raise ConsaError(f"unknown dtype {args.dtype!r}")
    model = load_model(check_model_dir(args.model), dtype=dtype)
    with output_dir(out, exists="empty") as staged:
        summary = export(model, alloc, staged, mode=args.mode, source_dir=args.model)
    print(f"exported {summary['units'] - summary['swa_units']}/{summary['units']} FA units to {out} "
          f"({summary['mode']}: {summary['why']})")
    return 0
