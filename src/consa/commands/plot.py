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
    from ..heatmap import plot_allocation

    alloc = Allocation.load(args.allocation)
    out = Path(args.out) if args.out else Path(args.allocation).with_suffix(".png")
    plot_allocation(alloc, out, args.title)
    st = alloc.stats()
    print(f"{st['swa_units']}/{st['units']} SWA; FA blocks {st['fa_blocks']}; contiguity {st['contiguity']:.2f}")
    print(f"wrote {out}")
    return 0
