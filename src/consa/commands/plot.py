"""``consa plot``: heatmap PNG of an allocation (layers × KV heads, FA share per layer beside it)."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("plot", help="draw an allocation as a heatmap PNG")
    p.add_argument("allocation", help="allocation.json")
    p.add_argument("--out", help="PNG path (default: beside the allocation, .png)")
    p.add_argument("--title")
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from ..allocation import Allocation
    from ..errors import ConsaError
    from ..files import atomic_path
    from ..heatmap import plot_allocation

    alloc = Allocation.load(args.allocation)
    out = Path(args.out) if args.out else Path(args.allocation).with_suffix(".png")
    if out.is_dir():
        raise ConsaError(f"--out {out} is a directory; name the PNG file to write")
    kinds = _image_kinds()
    if out.suffix.lower().lstrip(".") not in kinds:
        raise ConsaError(f"--out {out}: name an image file ({', '.join('.' + k for k in sorted(kinds))})")
    with atomic_path(out) as tmp:  # no half-drawn PNG on failure; readable by others
        plot_allocation(alloc, tmp, args.title)
    st = alloc.stats()
    print(f"{st['swa_units']}/{st['units']} SWA; FA blocks {st['fa_blocks']}; contiguity {st['contiguity']:.2f}")
    print(f"wrote {out}")
    return 0


def _image_kinds() -> set[str]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    return set(FigureCanvasAgg.get_supported_filetypes())
