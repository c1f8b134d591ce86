"""Allocation heatmap: layers × KV heads, FA vs SWA, with the FA share per layer beside it."""

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
    ax.imshow(grid, cmap=ListedColormap(["#f2c14e", "#2a6f97"]), vmin=0, vmax=1, aspect="auto", origin="lower")
    ax.set_xlabel("KV head")
    ax.set_ylabel("layer (0 = bottom)")
    ax.set_xticks(range(H))
    ax.set_yticks(range(L))
    for i in range(L):
        for h in range(H):
            ax.text(h, i, "FA" if alloc.fa[i][h] else "SWA", ha="center", va="center", fontsize=6,
                    color="white" if alloc.fa[i][h] else "black")
    bx.barh(range(L), shares, color="#2a6f97")
    bx.set_xlim(0, 1)
    bx.set_xlabel("FA share")
    st = alloc.stats()
    fig.suptitle(title or f"{alloc.granularity} allocation: {alloc.num_swa}/{alloc.num_units} SWA, W={alloc.window}"
                 f" (contiguity {st['contiguity']:.2f})", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path
