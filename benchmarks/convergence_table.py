"""Mean ± sd over search seeds of ``search_convergence.py`` JSON files: the table docs/RESULTS.md quotes.

One row per (method, steps, search length), over its seeds (a run that appears in two files, same method,
seed, steps and length, counts once: the searches are deterministic). Columns: seeds, held-out KL of the
binary allocation at the scoring length (mean ± sd), cut agreement, the last step that moved a unit across the
top-k cut (per seed; runs since that was recorded), share of FA units the seeds' cuts have
in common (mean over pairs), share of FA units in common with Duo-style's cut of the same seed and steps
(or, for a search shorter than the longest, with that seed's search at the longest length), for refined runs the KL before the swaps and the units they changed, and the cut margin
(``gates.cut_margin``: FA units clear of the band around the cut, FA and SWA units in it; per seed).

    python benchmarks/convergence_table.py docs/results/data/gpu-run7/conv-*.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics as st
import sys
from pathlib import Path


def _fa(run) -> frozenset:
    return frozenset(i for i, f in enumerate(run["fa"]) if f)


def _shared(a: frozenset, b: frozenset) -> float:
    return len(a & b) / len(a) if a else 1.0


def _ms(xs, fmt="{:.4f}") -> str:
    if not xs:
        return "–"
    return fmt.format(st.mean(xs)) + (" ± " + fmt.format(st.stdev(xs)) if len(xs) > 1 else "")


def load_runs(paths) -> list[dict]:
    """Every run of ``paths``, deduplicated on (method, seed, steps, search length)."""
    seen, runs = set(), []
    for p in paths:
        data = json.loads(Path(p).read_text())
        length = data["setup"]["seq_len"]
        for r in data["runs"]:
            key = (r["method"], r["seed"], r["steps"], r.get("search_len", length))
            if key not in seen:
                seen.add(key)
                runs.append({**r, "search_len": key[3]})
    return runs


def table(runs: list[dict]) -> str:
    groups: dict[tuple, list] = {}
    for r in runs:
        groups.setdefault((r["method"], r["steps"], r["search_len"]), []).append(r)
    duo = {(r["seed"], r["steps"], r["search_len"]): _fa(r) for r in runs if r["method"] == "duo"}
    longest = max(r["search_len"] for r in runs)
    at_longest = {(r["method"], r["seed"], r["steps"]): _fa(r) for r in runs if r["search_len"] == longest and "fa" in r}
    rows = ["| search | steps | T | seeds | held-out KL | agreement | cut last moved at step | FA shared across seeds | FA shared with Duo-style (T < longest: with T = longest) | seconds | refine: KL before, units changed | cut margin: FA clear / FA in band / SWA in band |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (method, steps, length), rs in sorted(groups.items(), key=lambda kv: (kv[0][1], -kv[0][2], kv[0][0])):
        rs = sorted(rs, key=lambda r: r["seed"])
        has_fa = all("fa" in r for r in rs)
        pairs = [_shared(_fa(a), _fa(b)) for a, b in itertools.combinations(rs, 2)] if has_fa else []
        if length < longest:
            vs_duo = [_shared(_fa(r), at_longest[(method, r["seed"], steps)]) for r in rs
                      if has_fa and (method, r["seed"], steps) in at_longest]
        else:
            vs_duo = [_shared(_fa(r), duo[(r["seed"], steps, length)]) for r in rs
                      if has_fa and method != "duo" and (r["seed"], steps, length) in duo]
        refine = "–"
        if all("held_out_kl_unrefined" in r for r in rs):
            refine = f"{_ms([r['held_out_kl_unrefined'] for r in rs])}; " + ", ".join(str(r["units_changed_by_refine"]) for r in rs)
        rows.append(f"| {method} | {steps} | {length} | {','.join(str(r['seed']) for r in rs)} | "
                    f"{_ms([r['held_out_kl'] for r in rs])} | {_ms([r['cut_agreement'] for r in rs if 'cut_agreement' in r], '{:.3f}')} | "
                    f"{', '.join(str(r['cut_last_changed_step']) for r in rs if r.get('cut_last_changed_step') is not None) or '–'} | "
                    f"{_ms(pairs, '{:.2f}')} | {_ms(vs_duo, '{:.2f}')} | {_ms([r['seconds'] for r in rs], '{:.1f}')} | {refine} | "
                    f"{_margins(rs)} |")
    return "\n".join(rows)


def _margins(rs: list[dict]) -> str:
    """Per seed, the units the gates decided and the ones they left within the band around the cut
    (``gates.cut_margin``; runs from before it was recorded, and Duo-style, have none)."""
    ms = [r["cut_margin"] for r in rs if r.get("cut_margin")]
    return ", ".join(f"{m['fa_clear']}/{m['fa_near_cut']}/{m['swa_near_cut']}" for m in ms) or "–"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("files", nargs="+", help="search_convergence.py JSON outputs")
    a = p.parse_args(argv)
    missing = [f for f in a.files if not Path(f).is_file()]
    if missing:
        print(f"convergence_table: no such file: {missing[0]}", file=sys.stderr)
        return 2
    print(table(load_runs(a.files)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
