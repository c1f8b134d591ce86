"""``consa report RUN_DIR...``: several eval runs side by side in one markdown table and one figure.

Each RUN_DIR holds an ``eval.json`` written by ``consa eval`` (schema ``consa.eval`` v1). Rows: the
full-attention run first (a run without allocation; else the full-attention baseline a run carries,
marked "ref"), then the runs in the order given, then the all-SWA baseline. Retrieval columns hold the
accuracy over lengths that passed calibration only ("–" when none did).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

from .files import atomic_write_text, read_json
from .errors import ConsaError

EVAL_FILE = "eval.json"
REQUIRED = ("format", "version", "label", "summary", "window")


def load_run(run_dir: str | os.PathLike) -> dict:
    """Read and check one run's eval.json; ConsaError (one line) when missing or malformed."""
    d = Path(run_dir)
    if not d.exists():
        raise ConsaError(f"run directory not found: {d}")
    if not d.is_dir():
        raise ConsaError(f"not a run directory: {d} (expected a directory holding {EVAL_FILE})")
    f = d / EVAL_FILE
    if not f.is_file():
        raise ConsaError(f"no {EVAL_FILE} in {d}: not a consa eval run (make one with `consa eval ... --out {d}`)")
    doc = read_json(f, "eval result")
    from .eval.runner import FORMAT, VERSION

    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ConsaError(f"{f} is not a consa eval result (expected format {FORMAT!r})")
    if doc.get("version") != VERSION:
        raise ConsaError(f"{f} has eval version {doc.get('version')!r}; this consa reads {VERSION}")
    missing = [k for k in REQUIRED if k not in doc]
    if missing or not isinstance(doc.get("summary"), dict):
        raise ConsaError(f"{f} is malformed: missing {', '.join(missing) or 'a summary object'}")
    if isinstance(doc.get("retrieval"), dict) and "quality" in doc:
        from .eval.runner import summarize

        try:  # recompute from the stored numbers, so every row follows today's definitions
            doc["summary"] = summarize(doc)
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            raise ConsaError(f"{f} is malformed: {type(e).__name__}: {e}") from None
    doc["_run_dir"] = str(d)
    return doc


def _ref(result: dict, key: str, label: str) -> dict | None:
    """A pseudo-result for a baseline a run carries (full or all-SWA)."""
    b = (result.get("baselines") or {}).get(key)
    if not b:
        return None
    from .eval import calibration as calib
    from .eval.runner import summarize

    ref = {
        "label": label,
        "window": result["window"],
        "quality": b.get("quality"),
        "retrieval": calib.reported_grid(b.get("retrieval") or {}, result.get("calibration")),
        "baselines": result.get("baselines"),
        "allocation_stats": {"sparsity": 0.0 if key == "full" else 1.0, "granularity": "–"},
        "_run_dir": result["_run_dir"] + f" ({key} baseline)",
    }
    ref["summary"] = summarize(ref)
    return ref


def arrange(results: Sequence[dict]) -> list[dict]:
    """Rows in report order: full attention, the runs as given, all-SWA reference."""
    full = [r for r in results if r.get("allocation") is None]
    rest = [r for r in results if r.get("allocation") is not None]
    rows = list(full)
    carrier = next((r for r in results if r.get("baselines")), None)
    if not full and carrier is not None:
        ref = _ref(carrier, "full", "full attention (ref)")
        if ref:
            rows.append(ref)
    rows += rest
    if carrier is not None:
        ref = _ref(carrier, "all_swa", "all-SWA (ref)")
        if ref:
            rows.append(ref)
    return rows


def _f(v, digits=3) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def _spans_cell(r: dict) -> str:
    """The window, or the SWA spans of an allocation with several (per-unit spans)."""
    spans = (r.get("allocation_stats") or {}).get("spans") or []
    return ",".join(map(str, spans)) if len(spans) > 1 else str(r.get("window", "–"))


def _kv_share(r: dict) -> float | None:
    """KV the row's allocation holds at the run's longest context, as a share of full attention's."""
    if r.get("allocation") is None:
        return None if "(ref)" in str(r.get("label")) and "all-SWA" in str(r.get("label")) else 1.0
    cfg = r.get("config") or {}
    ctx = max([*(cfg.get("lengths") or []), cfg.get("ppl_length") or 0])
    if not ctx:
        return None
    from .allocation import Allocation

    try:
        return Allocation.from_dict(r["allocation"]).kv_share(int(ctx))
    except ConsaError:
        return None


def comparison_table(rows: Sequence[dict]) -> str:
    """One markdown table of the headline numbers of each row."""
    tasks = sorted({t for r in rows for t in (r["summary"].get("retrieval") or {})})
    head = ["run", "granularity", "sparsity", "W / spans", "KV share", "PPL", "short PPL", "long PPL", "long NLL", "Δ long NLL", "gap closed"]
    head += [f"{t} acc" for t in tasks]
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    for r in rows:
        s = r["summary"]
        gap = s.get("gap_closed_long")
        cells = [
            str(r.get("label")),
            str(s.get("granularity") or "–"),
            _f(s.get("sparsity")),
            _spans_cell(r),
            _f(_kv_share(r), 3),
            _f(s.get("overall_ppl"), 2),
            _f(s.get("short_ppl"), 2),
            _f(s.get("long_ppl"), 2),
            _f(s.get("long_nll")),
            _f(s.get("delta_long_nll")),
            "–" if gap is None else f"{gap:.0%}",
        ]
        unchecked = "*" if (r.get("retrieval") and r.get("calibration") is None and "(ref)" not in str(r.get("label"))) else ""
        cells += [_f((s.get("retrieval") or {}).get(t), 2) + (unchecked if (s.get("retrieval") or {}).get(t) is not None else "") for t in tasks]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def build_report(run_dirs: Sequence[str | os.PathLike]) -> tuple[str, list[dict]]:
    """Load and check every run first (nothing is written when one is bad); return (markdown, rows)."""
    if not run_dirs:
        raise ConsaError("give at least one run directory")
    results = [load_run(d) for d in run_dirs]
    rows = arrange(results)
    notes = []
    windows = sorted({r["window"] for r in results})
    if len(windows) > 1:
        notes.append(f"runs use different windows {windows}: rows are not directly comparable")
    models = sorted({str(r.get("model")) for r in results if r.get("model")})
    if len(models) > 1:
        notes.append(f"runs evaluate different models: {', '.join(models)}")
    fps = {json.dumps((r.get("baselines") or {}).get("fingerprint"), sort_keys=True) for r in results if r.get("baselines")}
    if len(fps) > 1:
        notes.append("runs were evaluated with different settings (tasks, lengths, corpus, …); the reference rows come from the first")
    md = ["# consa comparison", "", comparison_table(rows), ""]
    md += [
        "Long NLL: mean NLL of tokens at positions > 2W of held-out long documents; Δ vs full attention; "
        "gap closed = share of the all-SWA long-NLL gap the allocation recovers. Retrieval: exact-match accuracy "
        "over lengths where full attention ≥ 0.8 and all-SWA ≤ 0.2 (– when no length passed).",
        "",
    ]
    if any(r.get("retrieval") and r.get("calibration") is None for r in results):
        notes.append("* retrieval not calibrated (run with --no-calibrate): raw accuracy over all lengths")
    if notes:
        md += ["Notes:", ""] + [f"- {n}" for n in notes] + [""]
    md += ["Runs:", ""]
    for r in results:
        cmd = r.get("command")
        md.append(f"- {r['label']}: `{r['_run_dir']}`" + (f" — `{cmd}`" if cmd else ""))
    md.append("")
    return "\n".join(md), rows


def write_report(run_dirs: Sequence[str | os.PathLike], out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """Write ``report.md`` and ``comparison.png`` into ``out_dir``; returns their paths."""
    from .plots import plot_comparison

    md, rows = build_report(run_dirs)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConsaError(f"--out {out} exists and is not a directory")
    png = out / "comparison.png"
    md_path = out / "report.md"
    try:
        plot_comparison(rows, png)
    except ValueError as e:
        raise ConsaError(f"cannot draw the comparison: {e}") from None
    atomic_write_text(md_path, md + f"\n![comparison]({png.name})\n")
    return md_path, png
