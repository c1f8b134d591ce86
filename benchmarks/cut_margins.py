"""How decided a ConSA search's gates end: ``gates.cut_margin`` of every search in experiment workdirs.

For every ``search/<key>/gates.safetensors`` (with its ``search.json``): the FA units clear of the band of ±1
in log α around the top-k cut, the FA and SWA units inside it, and, at the median log α of the band and the
search's final β, the share of gate samples through which the task loss reaches log α
(``gates.prob_in_ramp``). Beside it, for Duo-style at the same sparsity, the units whose α ended at 1 and at 0
(from ``alloc/<t>/duo-*.json``). The table docs/RESULTS.md quotes for runs 8-9:

    python benchmarks/cut_margins.py docs/results/data/paper-layout-s1
"""

from __future__ import annotations

import argparse
import json
import statistics as st
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def margins(root: Path) -> list[dict]:
    from safetensors.torch import load_file

    from consa.gates import BETA, cut_margin, prob_in_ramp, topk_swa
    from consa.train.search_config import flatten

    rows = []
    for gates in sorted(root.glob("search/*/gates.safetensors")):
        summ = json.loads((gates.parent / "search.json").read_text())
        if summ.get("num_swa") is None:  # a KV-budget search: no single top-k cut
            continue
        la = load_file(str(gates))["log_alpha"].flatten()
        m = cut_margin(la, topk_swa(la, summ["num_swa"]))
        band = [x for x in la.tolist() if abs(x - m["cut_log_alpha"]) <= m["band"]] if m["cut_log_alpha"] is not None else []
        cfg = flatten(summ["config"])  # the flat names: search.json of older runs has no config parts
        beta = cfg.get("beta_final") or BETA
        duo = root / "alloc" / f"s{cfg['sparsity']:g}" / f"duo-{cfg['granularity']}-seed{cfg['seed'] // 1000}.json"
        alpha = json.loads(duo.read_text())["meta"].get("alpha") if duo.is_file() else None
        flat = [x for row in alpha for x in (row if isinstance(row, list) else [row])] if alpha else []
        rows.append({"search": gates.parent.name, "sparsity": cfg["sparsity"], "granularity": cfg["granularity"],
                     "fa": summ["num_units"] - summ["num_swa"], "swa": summ["num_swa"], **m, "beta_final": beta,
                     "ramp_share_at_band_median": prob_in_ramp(st.median(band), beta) if band else None,
                     "duo_alpha_one": sum(x >= 0.999 for x in flat) if flat else None,
                     "duo_alpha_zero": sum(x <= 0.001 for x in flat) if flat else None})
    return rows


def table(rows: list[dict]) -> str:
    out = ["| search | t | FA clear / FA in band (of FA) | SWA in band (of SWA) | cut log α | P(0 < z < 1) at the band's median, final β | Duo-style α = 1 / α = 0 |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        ramp = "–" if r["ramp_share_at_band_median"] is None else f"{r['ramp_share_at_band_median']:.3f} (β {r['beta_final']:.2f})"
        duo = "–" if r["duo_alpha_one"] is None else f"{r['duo_alpha_one']} / {r['duo_alpha_zero']}"
        out.append(f"| {r['search']} | {r['sparsity']:g} | {r['fa_clear']} / {r['fa_near_cut']} (of {r['fa']}) | "
                   f"{r['swa_near_cut']} (of {r['swa']}) | {r['cut_log_alpha']} | {ramp} | {duo} |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("workdirs", nargs="+", help="experiment workdirs whose search/ keeps gates.safetensors")
    a = p.parse_args(argv)
    rows = []
    for w in map(Path, a.workdirs):
        if not w.is_dir():
            print(f"cut_margins: no such directory: {w}", file=sys.stderr)
            return 2
        rows += margins(w)
    if not rows:
        print("cut_margins: no search/*/gates.safetensors with a search.json under " + ", ".join(a.workdirs), file=sys.stderr)
        return 2
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
