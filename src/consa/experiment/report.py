"""The ``report`` stage: ``WORKDIR/report/results.md`` + ``results.json`` + figures: one table per sparsity,
the structure of the data-driven allocations, heatmaps, and the heal / budget sections when the config
has them. ``collect`` gathers every eval run on disk into one dict (``compare.py`` pools it over workdirs).
It reads the other stages' outputs only; their tables come from the stage modules."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from .config import method_list
from .scoring import calibration_summary
from .workdir import STAGES, Workdir, budget_key, method_key, require


def _fmt(v, d=3):
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{d}f}"


def _ratio(a, b):
    return None if (a is None or b is None or b == 0) else a / b


def _pm(r: dict, k: str, d: int = 3) -> str:
    """``mean ± sd`` for a row averaged over seeds, the value alone otherwise."""
    sd = r.get(f"{k}_sd")
    return _fmt(r.get(k), d) + (f" ± {sd:.{d}f}" if sd is not None else "")


def collect(wd: Workdir) -> dict:
    """Every eval result of the experiment, summarised per sparsity and method (random: mean of seeds)."""
    cfg = wd.cfg
    full = json.loads((wd.evals / "full" / "eval.json").read_text())
    fq = full["quality"] or {}
    sq = (full["baselines"] or {}).get("all_swa", {}).get("quality") or {}
    tasks = list(cfg.eval.tasks)

    def row_from(res: dict | None, quality: dict, retrieval: dict) -> dict:
        r = {"long_ppl_ratio": _ratio((quality.get("long") or {}).get("ppl"), (fq.get("long") or {}).get("ppl")),
             "short_ppl_ratio": _ratio((quality.get("short") or {}).get("ppl"), (fq.get("short") or {}).get("ppl")),
             "overall_ppl_ratio": _ratio((quality.get("overall") or {}).get("ppl"), (fq.get("overall") or {}).get("ppl")),
             "long_nll": (quality.get("long") or {}).get("nll")}
        for tname in tasks:
            r[tname] = retrieval.get(tname)
        return r

    from ..eval.calibration import reported_mean

    def raw_means(ret: dict) -> dict:
        return {k: reported_mean({"accuracy": g["accuracy"]}) for k, g in (ret or {}).items()}

    cal = calibration_summary(full)
    passed = {tname: any(r["pass"] for r in cal.get(tname, [])) for tname in tasks}
    from ..eval.calibration import reported_grid

    full_row = row_from(full, fq, full["summary"]["retrieval"])
    full_row["raw"] = full["summary"]["retrieval_raw"]
    swa_grid = (full["baselines"] or {}).get("all_swa", {}).get("retrieval") or {}
    swa_rep = reported_grid(swa_grid, full.get("calibration")) if swa_grid else {}
    swa_row = row_from(None, sq, {k: reported_mean(g) for k, g in swa_rep.items()})
    swa_row["raw"] = raw_means(swa_grid)
    f_nll, s_nll = (fq.get("long") or {}).get("nll"), (sq.get("long") or {}).get("nll")
    tables = {}
    for t in cfg.search.sparsities:
        rows = {}
        groups: dict[str, list] = {}
        for stem, name, gran, seed in method_list(cfg):
            p = wd.evals / method_key(t) / stem / "eval.json"
            mp = wd.alloc / method_key(t) / f"{stem}.meta.json"
            if not p.is_file():
                continue
            res = json.loads(p.read_text())
            meta = json.loads(mp.read_text()) if mp.is_file() else {}
            row = row_from(res, res["quality"] or {}, res["summary"]["retrieval"])
            row["raw"] = res["summary"]["retrieval_raw"]
            st = res["allocation_stats"]
            row.update(granularity=gran, swa_units=st["swa_units"], units=st["units"],
                       swa_heads=meta.get("swa_heads"), contiguity=st["contiguity"],
                       fa_share_per_layer=st["fa_share_per_layer"], fa_blocks=st["fa_blocks"],
                       fa_bottom=st["fa_share_bottom_third"], fa_middle=st["fa_share_middle_third"],
                       fa_top=st["fa_share_top_third"], tokens_after_base=meta.get("tokens_after_base", 0),
                       search_seconds=meta.get("seconds"), seed=seed, cut_agreement=meta.get("cut_agreement"),
                       cut_last_changed_step=meta.get("cut_last_changed_step"), search_steps=meta.get("search_steps"),
                       refine=meta.get("refine"), cut_margin=meta.get("cut_margin"),
                       gap_closed=((s_nll - row["long_nll"]) / (s_nll - f_nll)) if (
                           row["long_nll"] is not None and f_nll is not None and s_nll is not None and s_nll - f_nll > 1e-9) else None)
            key = f"{name}-{gran}"
            groups.setdefault(key, []).append(row)
        for key, rs in groups.items():
            if len(rs) == 1:
                rows[key] = rs[0]
                continue
            agg = dict(rs[0])
            for k in ("long_ppl_ratio", "short_ppl_ratio", "overall_ppl_ratio", "long_nll", "gap_closed", "contiguity",
                      "fa_bottom", "fa_middle", "fa_top", "search_seconds", "cut_agreement", *tasks):
                vals = [r[k] for r in rs if r.get(k) is not None]
                agg[k] = float(np.mean(vals)) if vals else None
                agg[f"{k}_sd"] = float(np.std(vals, ddof=1)) if len(vals) > 1 else None
            agg["tokens_after_base"] = int(np.mean([r["tokens_after_base"] or 0 for r in rs]))
            agg["fa_share_per_layer"] = np.mean([r["fa_share_per_layer"] for r in rs], axis=0).tolist()
            agg["per_seed"] = rs
            agg["raw"] = {tn: (float(np.mean([r["raw"][tn] for r in rs if r["raw"].get(tn) is not None]))
                               if any(r["raw"].get(tn) is not None for r in rs) else None) for tn in tasks}
            agg["seeds"] = [r["seed"] for r in rs]
            agg["long_ppl_ratio_per_seed"] = [r["long_ppl_ratio"] for r in rs]
            rows[f"{key} (mean of {len(rs)} seeds)"] = agg
        tables[method_key(t)] = {"sparsity": t, "rows": rows}
    return {"full": full_row, "all_swa": swa_row, "calibration": cal, "calibrated_tasks": passed, "tasks": tasks,
            "full_long_nll": f_nll, "all_swa_long_nll": s_nll, "window": full["window"], "tables": tables,
            "shape": full["shape"]}


def format_tables(res: dict) -> str:
    tasks = res["tasks"]
    lines = []
    cal = res["calibration"]
    lines += ["### Calibration of the base model (accuracy averaged over depths)", "",
              "| task | length | full | all-SWA | counts |", "|---|---|---|---|---|"]
    for tname in tasks:
        for r in cal.get(tname, []):
            lines.append(f"| {tname} | {r['length']} | {_fmt(r['full'], 2)} | {_fmt(r['all_swa'], 2)} | "
                         f"{'yes' if r['pass'] else 'no'} |")
    lines.append("")
    tcols = "".join(f"{tn} | " for tn in tasks)
    head = ("| method | gran. | SWA units | SWA heads | tokens after base | " + tcols
            + "long PPL ratio | short PPL ratio | gap closed | contiguity |")
    sep = "|" + "---|" * (9 + len(tasks))
    for key, tab in res["tables"].items():
        lines += [f"### Sparsity {tab['sparsity']}", "", head, sep]

        def ret(v, raw):
            if v is not None:
                return _fmt(v, 2)
            return f"({_fmt(raw, 2)})" if raw is not None else "–"

        def cells(r: dict) -> str:
            return "".join(ret(r.get(tn), r["raw"].get(tn)) + " | " for tn in tasks)

        f, s = res["full"], res["all_swa"]
        lines.append("| full attention (ref) | – | 0 | 0 | 0 | " + cells(f) + "1.000 | 1.000 | – | – |")
        order = sorted(tab["rows"].items(), key=lambda kv: (kv[1]["long_ppl_ratio"] is None, kv[1]["long_ppl_ratio"] or 0))
        for name, r in order:
            lines.append(f"| {name} | {r['granularity']} | {r['swa_units']}/{r['units']} | {r.get('swa_heads', '–')} | "
                         f"{r['tokens_after_base']:,} | " + cells(r)
                         + f"{_pm(r, 'long_ppl_ratio')} | {_fmt(r['short_ppl_ratio'])} | {_fmt(r['gap_closed'], 2)} | "
                         f"{_fmt(r['contiguity'], 2)} |")
        lines.append("| all-SWA (ref) | – | all | all | 0 | " + cells(s)
                     + f"{_fmt(s['long_ppl_ratio'])} | {_fmt(s['short_ppl_ratio'])} | 0.00 | – |")
        lines.append("")
    lines += ["Retrieval: calibrated accuracy (mean over the lengths that pass calibration, all depths); a value in "
              "(brackets) is raw accuracy over all lengths where the task passed calibration at no length. PPL ratio = PPL / PPL of "
              "full attention; long = positions > 2W, short = positions ≤ W (equal for every allocation by "
              "construction: a sanity check). Gap closed = share of the all-SWA long-range NLL gap recovered. "
              "Rows sorted by long PPL ratio.", ""]
    return "\n".join(lines)


def format_structure(res: dict) -> str:
    lines = ["| sparsity | method | FA share bottom / middle / top third | FA layer blocks | contiguity | paper pattern (SWA bottom, FA contiguous middle)? | gates agreeing with the cut | cut last moved at step | cut margin: FA clear / FA in band / SWA in band | cut refinement: held-out KL, swaps |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for key, tab in res["tables"].items():
        for name, r in tab["rows"].items():
            if not any(name.startswith(m) for m in ("consa", "duo", "attn_mass")):
                continue
            runs = r.get("per_seed") or [r]  # seeds: blocks per seed, the pattern as a count of seeds
            hits = sum(paper_pattern(x) for x in runs)
            pattern = ("yes" if hits else "no") if len(runs) == 1 else f"{hits}/{len(runs)} seeds"
            blocks = " · ".join(", ".join(f"{a}–{b - 1}" for a, b in x["fa_blocks"]) for x in runs)
            refine = "; ".join(c for c in (_refine_cell(x.get("refine")) for x in runs) if c != "–") or "–"
            margin = ", ".join(f"{m['fa_clear']}/{m['fa_near_cut']}/{m['swa_near_cut']}"
                               for m in (x.get("cut_margin") for x in runs) if m) or "–"
            moved = ", ".join(f"{x['cut_last_changed_step']} of {x.get('search_steps')}" for x in runs
                              if x.get("cut_last_changed_step") is not None) or "–"
            lines.append(f"| {tab['sparsity']} | {name} | {r['fa_bottom']:.2f} / {r['fa_middle']:.2f} / {r['fa_top']:.2f} | "
                         f"{blocks} | {r['contiguity']:.2f} | {pattern} | {_fmt(r.get('cut_agreement'), 2)} | {moved} | {margin} | {refine} |")
    return "\n".join(lines) + "\n" + (
        "\nGates agreeing with the cut: share of a ConSA search's units whose own gate (P(z ≠ 0) ≥ 0.5 = FA) matches the "
        "final top-k; well below 1 the gates had not separated. Cut last moved: the last search step whose update "
        "moved a unit across the top-k cut (per search seed); well before the last step the ranking had settled, "
        "whatever the agreement. Cut margin (per search seed): FA units whose log α is clear of the band of ±1 around "
        "the cut, and FA and SWA units inside it, which the gates have not told apart (gates.cut_margin). "
        "Cut refinement (search.refine_evals): the binary allocation's KL to the full model on held-out batches before → "
        "after swaps across the cut, the swaps kept and the evaluations spent (train/refine.py).\n")


def paper_pattern(r: dict) -> bool:
    """The paper's layout: less FA in the bottom third than in the middle, and the FA layers one block."""
    return bool(r["fa_bottom"] < r["fa_middle"] and r["contiguity"] == 1.0)


def _refine_cell(ref: dict | None) -> str:
    if not ref:
        return "–"
    return f"{ref['kl_before']:.4f} → {ref['kl_after']:.4f}, {len(ref['swaps'])} swaps in {ref['evals']} evals"


def plot_fa_shares(res: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tabs = list(res["tables"].values())
    fig, axes = plt.subplots(1, len(tabs), figsize=(4 * len(tabs), 4), sharey=True, squeeze=False)
    for ax, tab in zip(axes[0], tabs):
        for name, r in tab["rows"].items():
            if any(name.startswith(m) for m in ("consa", "duo", "attn_mass")):
                sh = r["fa_share_per_layer"]
                ax.plot(sh, range(len(sh)), marker="o", ms=3, label=name)
        ax.set_title(f"t = {tab['sparsity']}")
        ax.set_xlabel("FA share of the layer's KV heads")
        ax.set_xlim(-0.05, 1.05)
    axes[0][0].set_ylabel("layer (0 = bottom)")
    if axes[0][-1].get_legend_handles_labels()[0]:  # no data-driven rows (e.g. rules only): no legend
        axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run(wd: Workdir, deadline: float | None = None) -> dict:
    from ..allocation import Allocation
    from ..files import atomic_write_text
    from ..heatmap import plot_allocation
    from .stages.budget import format_budget
    from .stages.heal import format_heal

    cfg = wd.cfg
    require(wd.done("eval") and (wd.evals / "full" / "eval.json").is_file(), "report", f"the eval runs in {wd.evals}", "eval", wd)
    res = collect(wd)
    wd.report.mkdir(parents=True, exist_ok=True)
    figs = [plot_fa_shares(res, wd.report / "fa_share_per_layer.png").name]
    groups = [(method_key(t), ("consa-kv_head", "consa-layer", "duo-kv_head", "attn_mass-kv_head"), f"t={t}")
              for t in cfg.search.sparsities]
    if cfg.budget is not None:
        groups += [(budget_key(kb), ("consa_spans-kv_head", "consa_spans-layer", "moa-kv_head", "moa-layer"),
                    f"KV budget {kb:g}") for kb in cfg.budget.kv_budgets]
    for key, stems, what in groups:
        for stem in stems:
            p = wd.alloc / key / f"{stem}.json"
            if not p.is_file() and cfg.search.search_seeds:  # several search seeds: the first one's
                stem = f"{stem}-seed{cfg.search.search_seeds[0]}"
                p = wd.alloc / key / f"{stem}.json"
            if p.is_file():
                name = f"heatmap-{key}-{stem}.png"
                plot_allocation(Allocation.load(p), wd.report / name, title=f"{stem}, {what}")
                figs.append(name)
    stages = wd.stages()
    pre = stages.get("pretrain", {})
    md = [f"# Experiment `{cfg.name}`", "",
          f"Config: `{cfg.source}` · seed {cfg.seed} · preset `{cfg.pretrain.preset}` · context {cfg.context} · W = {cfg.W}", "",
          "Stage wall times: " + ", ".join(f"{k} {v.get('wall_s')} s" for k, v in stages.items() if k in STAGES), "",
          "Base model: {} steps, {} tokens, {} parameters, validation loss {} → {}, {} train tokens/s{}.".format(
              pre.get("steps"), pre.get("tokens"), pre.get("parameters"), _fmt(pre.get("val_loss_first")),
              _fmt(pre.get("val_loss_last")), pre.get("tokens_per_s"),
              "" if pre.get("finished", True) else " (stopped at its time limit: last checkpoint used)"),
          *([f"The base model and bank come from the workdir `{pre['adopted_from']}` (`--base-from`); "
             "the pretrain wall time is that workdir's.", ""] if pre.get("adopted_from") else []),
          f"Long-range NLL (positions > 2W): full attention {_fmt(res['full_long_nll'], 4)}, all-SWA "
          f"{_fmt(res['all_swa_long_nll'], 4)}.", "",
          format_tables(res), "### Structure of the data-driven allocations", "", format_structure(res)]
    if cfg.heal is not None:
        md += ["", format_heal(wd)]
    if cfg.budget is not None:
        md += ["", format_budget(wd)]
    md += [f"![{f}]({f})" for f in figs]
    atomic_write_text(wd.report / "results.md", "\n".join(md) + "\n")
    res["stages"] = stages
    res["config"] = cfg.to_dict()
    atomic_write_text(wd.report / "results.json", json.dumps(res, indent=1, default=str) + "\n")
    return {"results": str(wd.report / "results.md"), "figures": figs}
