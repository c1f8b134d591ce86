"""Calibration: a retrieval task counts only where the base model can do it and all-SWA cannot.

At each context length of a task (accuracy = mean over depths), the check passes when the
full-attention model scores ≥ ``full_min`` (0.8) **and** the all-SWA model scores ≤ ``swa_max`` (0.2).
Elsewhere a score says nothing about an allocation: either the base model fails the task anyway
(a small base model can score 0% even with full attention) or a window alone solves it. Raw numbers
are always kept; only the *reported* grid blanks the lengths that fail.
"""

from __future__ import annotations

import copy

from .retrieval import length_accuracy

FULL_MIN = 0.8
SWA_MAX = 0.2


def calibrate(full: dict, all_swa: dict, *, full_min: float = FULL_MIN, swa_max: float = SWA_MAX) -> dict:
    """Per task, per length: ``{"length", "full", "all_swa", "pass", "reason"}``.

    ``full`` and ``all_swa`` are :func:`~consa.eval.retrieval.run_grid` results on the same items.
    A length that either grid lacks fails with a reason.
    """
    out: dict[str, list[dict]] = {}
    for task in sorted(set(full) | set(all_swa)):
        rows = []
        f_grid, s_grid = full.get(task), all_swa.get(task)
        lengths = sorted(set((f_grid or {}).get("lengths", [])) | set((s_grid or {}).get("lengths", [])))
        f_acc = dict(zip(f_grid["lengths"], length_accuracy(f_grid))) if f_grid else {}
        s_acc = dict(zip(s_grid["lengths"], length_accuracy(s_grid))) if s_grid else {}
        for length in lengths:
            f, s = f_acc.get(length), s_acc.get(length)
            reasons = []
            if f is None:
                reasons.append("no full-attention score")
            elif f < full_min:
                reasons.append(f"full attention {f:.2f} < {full_min:g}")
            if s is None:
                reasons.append("no all-SWA score")
            elif s > swa_max:
                reasons.append(f"all-SWA {s:.2f} > {swa_max:g}")
            rows.append({"length": length, "full": f, "all_swa": s, "pass": not reasons, "reason": "; ".join(reasons) or "ok"})
        out[task] = rows
    return out


def passing_lengths(calibration: dict, task: str) -> list[int]:
    return [r["length"] for r in calibration.get(task, []) if r["pass"]]


def reported_grid(grid: dict, calibration: dict | None) -> dict:
    """A copy of ``grid`` with ``"reported"`` (accuracy, or None at failing lengths) and ``"calibrated"``
    (bool per length) added to every task. With ``calibration=None`` (check skipped) everything is
    reported and ``calibrated`` is None per length."""
    out = copy.deepcopy(grid)
    for task, g in out.items():
        if calibration is None:
            g["calibrated"] = [None] * len(g["lengths"])
            g["reported"] = copy.deepcopy(g["accuracy"])
            continue
        ok = set(passing_lengths(calibration, task))
        g["calibrated"] = [length in ok for length in g["lengths"]]
        g["reported"] = [list(row) if length in ok else [None] * len(row) for length, row in zip(g["lengths"], g["accuracy"])]
    return out


def reported_mean(grid: dict) -> float | None:
    """Mean of the reported cells of one task (None when no length passed calibration)."""
    vals = [v for row in grid.get("reported", grid["accuracy"]) for v in row if v is not None]
    return sum(vals) / len(vals) if vals else None


def format_check(calibration: dict, *, full_min: float = FULL_MIN, swa_max: float = SWA_MAX) -> str:
    """The check as a markdown table (printed by ``consa eval`` and written to eval.md)."""
    lines = [
        f"Calibration: a length counts when full attention ≥ {full_min:g} and all-SWA ≤ {swa_max:g} (mean over depths).",
        "",
        "| task | length | full | all-SWA | counts |",
        "|---|---:|---:|---:|---|",
    ]
    for task, rows in calibration.items():
        for r in rows:
            mark = "yes" if r["pass"] else f"no ({r['reason']})"
            lines.append(f"| {task} | {r['length']} | {_fmt(r['full'])} | {_fmt(r['all_swa'])} | {mark} |")
    if not calibration:
        lines.append("| – | – | – | – | no tasks |")
    return "\n".join(lines)


def _fmt(v) -> str:
    return "–" if v is None else f"{v:.2f}"
