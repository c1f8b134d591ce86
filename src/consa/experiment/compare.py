"""``consa compare``: one experiment repeated on several base models (and search seeds), pooled.

Each workdir is one base-model seed, read as the experiment report reads it (``report.collect``);
with ``search.search_seeds`` each learned method has one row per search seed. Every (sparsity, method) gets
the mean ± sd of its long-range PPL ratio and retrieval over all its runs (bases × search seeds), the mean of
each base, its search tokens and seconds, and its mean FA share per layer. A claim ("A beats B") counts only
where the two means differ by more than the sum of their sds: the spread of either method alone could not
produce the gap. With one run per method the sd is unknown and no claim is made.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import ConsaError
from .config import ExperimentConfig
from .report import collect, paper_pattern
from .workdir import Workdir

LEARNED_PREFIXES = ("consa-", "consa_refined-", "duo-", "attn_mass-")


def load_runs(roots: list[str | Path], config: str | Path | None = None) -> list[dict]:
    """``collect`` of every workdir, with its config (``WORKDIR/experiment.json`` unless ``config``)."""
    if len(roots) < 1:
        raise ConsaError("compare needs at least one experiment workdir")
    out = []
    for root in map(Path, roots):
        cpath = Path(config) if config else root / "experiment.json"
        if not cpath.is_file():
            raise ConsaError(f"{cpath} not found: pass --config (the experiment config the workdir {root} was run with)")
        if not (root / "eval" / "full" / "eval.json").is_file():
            raise ConsaError(f"{root} has no eval runs (eval/full/eval.json): run its eval stage first")
        cfg = ExperimentConfig.load(cpath)
        out.append({"root": str(root), "seed": cfg.seed, "name": cfg.name, "res": collect(Workdir(root, cfg))})
    return out


def _retrieval(r: dict, tasks: list[str]) -> float | None:
    vals = [r.get(t) if r.get(t) is not None else (r.get("raw") or {}).get(t) for t in tasks]
    vals = [v for v in vals if v is not None]
    return float(np.mean(vals)) if vals else None


def _stats(vals: list) -> tuple[float | None, float | None]:
    vals = [v for v in vals if v is not None]
    if not vals:
        return None, None
    return float(np.mean(vals)), (float(np.std(vals, ddof=1)) if len(vals) > 1 else None)


def pool(runs: list[dict]) -> dict:
    """{sparsity: {method: pooled record}} over every run of every workdir."""
    from ..rules import RULES

    out: dict[float, dict] = {}
    for i, run in enumerate(runs):
        tasks = run["res"]["tasks"]
        for tab in run["res"]["tables"].values():
            t = tab["sparsity"]
            for key, row in tab["rows"].items():
                method = key.split(" (mean of")[0]
                for r in row.get("per_seed") or [row]:
                    rec = out.setdefault(t, {}).setdefault(method, {"runs": []})
                    rec["runs"].append({
                        "base": i, "base_seed": run["seed"], "seed": r.get("seed"), "long": r["long_ppl_ratio"],
                        "retrieval": _retrieval(r, tasks), "fa_share_per_layer": r["fa_share_per_layer"],
                        "fa_bottom": r["fa_bottom"], "fa_middle": r["fa_middle"], "fa_top": r["fa_top"],
                        "contiguity": r["contiguity"], "fa_blocks": r["fa_blocks"], "seconds": r.get("search_seconds"),
                        "tokens": r.get("tokens_after_base") or 0, "agreement": r.get("cut_agreement")})
    for t, methods in out.items():
        for method, rec in methods.items():
            rs = rec["runs"]
            rec["rule"] = method.rsplit("-", 1)[0] in RULES
            rec["n"] = len(rs)
            rec["bases"] = sorted({r["base"] for r in rs})
            for k in ("long", "retrieval", "seconds", "tokens", "agreement", "fa_bottom", "fa_middle", "fa_top", "contiguity"):
                rec[k], rec[f"{k}_sd"] = _stats([r[k] for r in rs])
            rec["long_per_base"] = [_stats([r["long"] for r in rs if r["base"] == b])[0] for b in rec["bases"]]
            rec["fa_share_per_layer"] = np.mean([r["fa_share_per_layer"] for r in rs], axis=0).tolist()
            rec["fa_share_per_layer_sd"] = np.std([r["fa_share_per_layer"] for r in rs], axis=0, ddof=1 if len(rs) > 1 else 0).tolist()
            rec["paper_pattern_runs"] = sum(paper_pattern(r) for r in rs)
    return out


def claims(pooled: dict) -> list[dict]:
    """The comparisons the paper makes, per sparsity: learned vs the best rule, per head vs per layer,
    ConSA vs Duo-style. ``holds``: |mean difference| > sd_a + sd_b (None when either sd is unknown)."""
    out = []
    for t, m in sorted(pooled.items()):
        rules = {k: v for k, v in m.items() if v["rule"] and not k.startswith("random") and v["long"] is not None}
        best_rule = min(rules, key=lambda k: rules[k]["long"]) if rules else None
        layer_rules = {k: v for k, v in rules.items() if k.endswith("-layer")}
        best_layer_rule = min(layer_rules, key=lambda k: layer_rules[k]["long"]) if layer_rules else None
        pairs = [("consa-kv_head", best_rule), ("consa-layer", best_layer_rule), ("duo-kv_head", best_rule),
                 ("consa-kv_head", "consa-layer"), ("consa-kv_head", "duo-kv_head"),
                 ("consa-kv_head", "attn_mass-kv_head"),
                 # the refined cut (an opt-in method) against the plain cut of the same searches and Duo-style
                 ("consa_refined-kv_head", "consa-kv_head"), ("consa_refined-kv_head", "duo-kv_head"),
                 ("consa_refined-layer", "consa-layer")]
        for a, b in pairs:
            if a not in m or b not in m or a == b:
                continue
            ra, rb = m[a], m[b]
            diff = rb["long"] - ra["long"]  # > 0: a has the lower (better) long-range PPL ratio
            spread = (ra["long_sd"] + rb["long_sd"]) if (ra["long_sd"] is not None and rb["long_sd"] is not None) else None
            out.append({"sparsity": t, "a": a, "b": b, "b_is_best_rule": b in (best_rule, best_layer_rule),
                        "a_long": ra["long"], "b_long": rb["long"], "difference": diff, "spread": spread,
                        "holds": None if spread is None else bool(abs(diff) > spread),
                        "winner": a if diff > 0 else b, **_paired(ra["runs"], rb["runs"])})
    return out


def _paired(a: list[dict], b: list[dict]) -> dict:
    """A against B run by run where both ran on the same base with the same search seed (the same search
    batches): how many such pairs A has the lower long-range PPL ratio in. Information beside the pooled claim,
    which it does not change; None where no pair exists (rules, attention mass: no search seed)."""
    bb = {(r["base"], r["seed"]): r["long"] for r in b if r["seed"] is not None and r["long"] is not None}
    pairs = [(r["long"], bb[(r["base"], r["seed"])]) for r in a if (r["base"], r["seed"]) in bb and r["long"] is not None]
    if not pairs:
        return {"paired_runs": 0, "paired_a_lower": None}
    return {"paired_runs": len(pairs), "paired_a_lower": sum(x < y for x, y in pairs)}


def _same_seed(c: dict) -> str:
    return "–" if not c.get("paired_runs") else f"{c['paired_a_lower']}/{c['paired_runs']}"


def _f(v, d=3, sd=None) -> str:
    if v is None:
        return "–"
    return f"{v:.{d}f}" + (f" ± {sd:.{d}f}" if sd is not None else "")


def format_compare(runs: list[dict], pooled: dict, cl: list[dict]) -> str:
    lines = ["# Experiment repeated over base models", "",
             "Workdirs (base-model seed): " + ", ".join(f"`{r['root']}` ({r['seed']})" for r in runs), "",
             "Long PPL ratio and retrieval: mean ± sd over every run of the method (base models × search seeds); "
             "per base: the mean of each base model's runs, in the order above. Retrieval: mean over tasks of the "
             "calibrated accuracy. Search tokens / seconds: per run (the GPU-seconds of one search on this machine).", ""]
    for t, m in sorted(pooled.items()):
        lines += [f"## Sparsity {t}", "",
                  "| method | runs | long PPL ratio | per base | retrieval | search tokens | search s | gates agreeing |",
                  "|---|---|---|---|---|---|---|---|"]
        for k, r in sorted(m.items(), key=lambda kv: (kv[1]["long"] is None, kv[1]["long"] or 0)):
            per = " / ".join(_f(v) for v in r["long_per_base"])
            lines.append(f"| {k} | {r['n']} | {_f(r['long'], 3, r['long_sd'])} | {per} | "
                         f"{_f(r['retrieval'], 2, r['retrieval_sd'])} | {int(r['tokens'] or 0):,} | "
                         f"{_f(r['seconds'], 1)} | {_f(r['agreement'], 2)} |")
        lines.append("")
    lines += ["## Claims (long-range PPL ratio)", "",
              "A claim holds only where |difference| > sd(A) + sd(B); with one run per method the spread is unknown. "
              "Difference and spread to 4 decimals: a claim can hold at a difference the 3-decimal means hide.", "",
              "Same seed, A lower: of the runs where A and B searched on the same base with the same search seed (the "
              "same batches), how many A ends lower in; information beside the claim, which it does not change.", "",
              "| sparsity | A | B | A | B | B − A | spread | lower | holds | same seed, A lower |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for c in cl:
        b = c["b"] + (" (best rule)" if c["b_is_best_rule"] else "")
        holds = "–" if c["holds"] is None else ("**yes**" if c["holds"] else "no")
        lines.append(f"| {c['sparsity']} | {c['a']} | {b} | {_f(c['a_long'])} | {_f(c['b_long'])} | {c['difference']:+.4f} | "
                     f"{_f(c['spread'], 4)} | {c['winner']} | {holds} | {_same_seed(c)} |")
    lines += ["", "## Structure of the data-driven allocations", "",
              "| sparsity | method | FA share bottom / middle / top third | contiguity | runs with the paper's pattern |",
              "|---|---|---|---|---|"]
    for t, m in sorted(pooled.items()):
        for k, r in m.items():
            if k.startswith(LEARNED_PREFIXES):
                lines.append(f"| {t} | {k} | {_f(r['fa_bottom'], 2)} / {_f(r['fa_middle'], 2)} / {_f(r['fa_top'], 2)} | "
                             f"{_f(r['contiguity'], 2)} | {r['paper_pattern_runs']}/{r['n']} |")
    lines += ["", "Paper's pattern: less FA in the bottom third than in the middle third, and the FA layers one "
              "contiguous block. `structure.png`: mean FA share per layer (band: ± sd over runs).", ""]
    return "\n".join(lines)


def plot_structure(pooled: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ts = sorted(pooled)
    fig, axes = plt.subplots(1, len(ts), figsize=(4 * len(ts), 5), sharey=True, squeeze=False)
    for ax, t in zip(axes[0], ts):
        for k, r in pooled[t].items():
            if not k.startswith(LEARNED_PREFIXES):
                continue
            mean, sd = np.array(r["fa_share_per_layer"]), np.array(r["fa_share_per_layer_sd"])
            y = np.arange(len(mean))
            ax.plot(mean, y, marker="o", ms=3, label=f"{k} (n={r['n']})")
            ax.fill_betweenx(y, np.clip(mean - sd, 0, 1), np.clip(mean + sd, 0, 1), alpha=0.15)
        ax.set_title(f"t = {t}")
        ax.set_xlabel("FA share of the layer's KV heads")
        ax.set_xlim(-0.05, 1.05)
    axes[0][0].set_ylabel("layer (0 = bottom)")
    if axes[0][-1].get_legend_handles_labels()[0]:
        axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_compare(roots: list[str | Path], out: Path, config: str | Path | None = None) -> dict:
    """compare.md, compare.json and structure.png of the workdirs into ``out`` (a directory that exists)."""
    runs = load_runs(roots, config)
    pooled = pool(runs)
    cl = claims(pooled)
    md = format_compare(runs, pooled, cl)
    (out / "compare.md").write_text(md)
    plot_structure(pooled, out / "structure.png")
    data = {"workdirs": [{"root": r["root"], "seed": r["seed"], "name": r["name"]} for r in runs],
            "pooled": {str(t): m for t, m in pooled.items()}, "claims": cl}
    (out / "compare.json").write_text(json.dumps(data, indent=1) + "\n")
    return {"markdown": md, **data}
