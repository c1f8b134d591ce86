"""Allocation heatmap: layers × KV heads, FA vs SWA, with the FA share per layer beside it.

An allocation with more than one SWA span (per-unit spans) gets a colour per span (FA its own), the
span written in each cell, and a legend; a single-window allocation draws exactly as before."""

from __future__ import annotations

from pathlib import Path

from .allocation import Allocation


def plot_allocation(alloc: Allocation, path, title: str | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    L, H = alloc.shape.num_layers, alloc.shape.num_kv_heads
    grid = [[1.0 if b else 0.0 for b in row] for row in alloc.fa]
    shares = alloc.fa_share_per_layer()
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(2.2 + 0.45 * H + 2.2, 1.2 + 0.28 * L),
                                 gridspec_kw={"width_ratios": [max(H, 2), 3]}, sharey=True)
    spans = alloc.spans()
    legend = None
    if len(spans) > 1:
        legend = _draw_spans(ax, alloc, spans)
        fig.legend(handles=legend, loc="lower center", ncol=min(len(legend), 5), fontsize=6, frameon=False)
    else:
        ax.imshow(grid, cmap=ListedColormap(["#f2c14e", "#2a6f97"]), vmin=0, vmax=1, aspect="auto", origin="lower")
    ax.set_xlabel("KV head")
    ax.set_ylabel("layer (0 = bottom)")
    ax.set_xticks(range(H))
    ax.set_yticks(range(L))
    for i in range(L):
        for h in range(H):
            label = "FA" if alloc.fa[i][h] else ("SWA" if len(spans) <= 1 else str(alloc.span[i][h]))
            ax.text(h, i, label, ha="center", va="center", fontsize=6, color="white" if alloc.fa[i][h] else "black")
    bx.barh(range(L), shares, color="#2a6f97")
    bx.set_xlim(0, 1)
    bx.set_xlabel("FA share")
    st = alloc.stats()
    window = f"W={alloc.window}" if len(spans) <= 1 else f"spans {','.join(map(str, spans))}"
    fig.suptitle(title or f"{alloc.granularity} allocation: {alloc.num_swa}/{alloc.num_units} SWA, {window}"
                 f" (contiguity {st['contiguity']:.2f})", fontsize=9)
    fig.tight_layout(rect=(0, 0.07 if legend else 0, 1, 1)) if legend else fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


FA_COLOUR = "#2a6f97"


def span_colours(spans: list[int]) -> dict[int, str]:
    """One colour per SWA span, light (short) to dark (long), all distinct from FA's blue."""
    import matplotlib

    cmap = matplotlib.colormaps["YlOrRd"]
    n = len(spans)
    return {s: matplotlib.colors.to_hex(cmap(0.15 + 0.7 * k / max(n - 1, 1))) for k, s in enumerate(spans)}


def _draw_spans(ax, alloc: Allocation, spans: list[int]) -> list:
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    colours = span_colours(spans)
    index = {s: k for k, s in enumerate(spans)}
    grid = [[len(spans) if s is None else index[s] for s in row] for row in alloc.span]
    ax.imshow(grid, cmap=ListedColormap([colours[s] for s in spans] + [FA_COLOUR]), vmin=-0.5, vmax=len(spans) + 0.5,
              aspect="auto", origin="lower")
    return [Patch(color=colours[s], label=f"span {s}") for s in spans] + [Patch(color=FA_COLOUR, label="FA")]
