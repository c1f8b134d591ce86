"""``consa report RUN_DIR...``: eval runs side by side in one markdown table and one figure."""

from __future__ import annotations

from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "report",
        help="compare eval runs (full, learned, each rule) in one markdown table and one figure",
        description="Reads RUN_DIR/eval.json of each run (written by `consa eval`) and writes report.md and "
        "comparison.png into --out (default: <common parent of the runs>/report).",
    )
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="directories written by `consa eval --out`")
    p.add_argument("--out", help="directory for report.md and comparison.png")
    p.set_defaults(func=run)


def _default_out(runs: list[str]) -> Path:
    import os

    parents = [str(Path(r).resolve().parent) for r in runs]
    return Path(os.path.commonpath(parents)) / "report"


def run(args) -> int:
    from ..report import build_report, write_report

    build_report(args.runs)  # check every run before anything is written
    from ..files import output_dir

    out = Path(args.out) if args.out else _default_out(args.runs)
    with output_dir(out) as staged:
        md_path, png = write_report(args.runs, staged)
        text = md_path.read_text()
    print(text)
    print(f"wrote {out / md_path.name} and {out / png.name}")
    return 0
