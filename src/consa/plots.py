"""Figures. Import-light: matplotlib is imported inside each function, with the Agg backend."""

from __future__ import annotations

from pathlib import Path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path) -> Path:
    """Write atomically (temp file + rename) so a crash never leaves half a PNG."""
    from .files import atomic_path

    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png")
    finally:
        _plt().close(fig)
    return path


def plot_retrieval_heatmap(grid: dict, path, title: str | None = None) -> Path:
    """Accuracy over context length (rows) × needle depth (columns).

    ``grid``: one task's grid (``{"lengths", "depths", "accuracy", ...}`` as made by
    :func:`consa.eval.retrieval.run_grid`) or a ``{task: grid}`` dict (one panel per task). Lengths
    that failed calibration (``grid["calibrated"][i] is False``) are hatched and their raw accuracy is
    shown in brackets.
    """
    import numpy as np

    plt = _plt()
    panels = [(title, grid)] if "accuracy" in grid else [(t, g) for t, g in grid.items()]
    if not panels:
        raise ValueError("no retrieval grid to plot")
    fig, axes = plt.subplots(1, len(panels), figsize=(0.9 + 1.0 * max(len(g["depths"]) for _, g in panels) * len(panels) + 1.2 * len(panels), 1.2 + 0.45 * max(len(g["lengths"]) for _, g in panels)), squeeze=False)
    im = None
    for ax, (name, g) in zip(axes[0], panels):
        acc = np.array([[np.nan if v is None else v for v in row] for row in g["accuracy"]], dtype=float)
        im = ax.imshow(acc, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto", origin="lower")
        calibrated = g.get("calibrated") or [None] * len(g["lengths"])
        for i, ok in enumerate(calibrated):
            for j in range(len(g["depths"])):
                v = acc[i, j]
                text = "–" if np.isnan(v) else (f"({v:.2f})" if ok is False else f"{v:.2f}")
                ax.text(j, i, text, ha="center", va="center", fontsize=7, color="white" if (np.isnan(v) or v < 0.6) else "black")
            if ok is False:
                ax.add_patch(plt.Rectangle((-0.5, i - 0.5), len(g["depths"]), 1, fill=False, hatch="///", edgecolor="0.6", lw=0))
        ax.set_xticks(range(len(g["depths"])), [f"{d:g}" for d in g["depths"]])
        ax.set_yticks(range(len(g["lengths"])), [str(x) for x in g["lengths"]])
        ax.set_xlabel("needle depth")
        ax.set_ylabel("context length (tokens)")
        if name:
            ax.set_title(name, fontsize=9)
    fig.colorbar(im, ax=axes[0].tolist(), label="exact-match accuracy", shrink=0.9)
    return _save(fig, path)


def plot_comparison(results: list[dict], path, title: str | None = None) -> Path:
    """Several eval results side by side: long-range NLL per run (with full-attention and all-SWA
    reference lines) and calibrated retrieval accuracy per task.

    ``results``: eval.json dicts (``consa.eval`` v1); each needs ``label`` and ``summary``.
    """
    import numpy as np

    plt = _plt()
    if not results:
        raise ValueError("no results to compare")
    labels = [r.get("label") or f"run {i}" for i, r in enumerate(results)]
    sums = [r.get("summary") or {} for r in results]
    tasks = sorted({t for s in sums for t in (s.get("retrieval") or {})})
    has_nll = any(s.get("long_nll") is not None for s in sums)
    n_panels = int(has_nll) + int(bool(tasks))
    if n_panels == 0:
        raise ValueError("the results hold neither perplexity nor retrieval numbers")
    width = max(4.0, 0.7 * len(labels) + 1.5)
    fig, axes = plt.subplots(1, n_panels, figsize=(width * n_panels, 3.6), squeeze=False)
    axes = list(axes[0])
    x = np.arange(len(labels))
    if has_nll:
        ax = axes.pop(0)
        vals = [s.get("long_nll") for s in sums]
        ax.bar(x, [np.nan if v is None else v for v in vals], color="#2a6f97")
        refs = [(s.get("full_long_nll"), s.get("all_swa_long_nll")) for s in sums if s.get("full_long_nll") is not None]
        if refs:
            ax.axhline(refs[0][0], color="k", ls="--", lw=1, label="full attention")
            if refs[0][1] is not None:
                ax.axhline(refs[0][1], color="#c44e52", ls=":", lw=1.5, label="all-SWA")
            ax.legend(fontsize=7, loc="upper left")
        finite = [v for v in vals if v is not None] + [v for pair in refs[:1] for v in pair if v is not None]
        if finite:
            lo, hi = min(finite), max(finite)
            pad = max(0.05 * (hi - lo), 0.02)
            ax.set_ylim(lo - 4 * pad, hi + 2 * pad)
        for xi, v in zip(x, vals):
            if v is not None:
                ax.text(xi, v, f"{v:.3f}", ha="center", va="bottom", fontsize=6)
        ax.set_xticks(x, labels, rotation=30, ha="right", fontsize=7)
        ax.set_ylabel("long-range NLL (positions > 2W)")
        ax.set_title("long-range NLL (lower is better)", fontsize=9)
    if tasks:
        ax = axes.pop(0)
        w = 0.8 / len(tasks)
        for k, t in enumerate(tasks):
            vals = [(s.get("retrieval") or {}).get(t) for s in sums]
            ax.bar(x - 0.4 + w * (k + 0.5), [np.nan if v is None else v for v in vals], w, label=t)
        ax.set_ylim(0, 1.05)
        ax.set_xticks(x, labels, rotation=30, ha="right", fontsize=7)
        ax.set_ylabel("accuracy (calibrated lengths)")
        ax.set_title("retrieval", fontsize=9)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def draw_run(result: dict, out) -> list[str]:
    """The pictures of one eval run into the folder ``out``: a retrieval heatmap per task
    (retrieval_<task>.png) and allocation.png for a run with an allocation. Returns their file names,
    for ``consa.eval.runner.write_run`` to link. A failed allocation picture is reported and skipped:
    the numbers must never be lost for a picture."""
    import sys

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = []
    for task, grid in (result.get("retrieval") or {}).items():
        name = f"retrieval_{task}.png"
        plot_retrieval_heatmap(grid, out / name, title=f"{task} — {result['label']}")
        names.append(name)
    if result.get("allocation") is not None:
        from .allocation import Allocation
        from .heatmap import plot_allocation

        try:
            plot_allocation(Allocation.from_dict(result["allocation"]), out / "allocation.png", title=result["label"])
            names.append("allocation.png")
        except Exception as e:  # the picture is a nicety
            print(f"consa eval: allocation picture skipped ({type(e).__name__}: {e})", file=sys.stderr)
    return names
