"""``consa compare WORKDIR...``: one experiment over several base-model seeds, pooled with mean ± sd."""

from __future__ import annotations

from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "compare",
        help="pool experiment workdirs (one per base-model seed) into mean ± sd tables, claims and a structure figure",
        description="Reads each WORKDIR as `consa experiment report` does (its eval runs, with every search seed) "
        "and writes compare.md, compare.json and structure.png into --out. A claim holds only where two methods' "
        "mean long-range PPL ratios differ by more than the sum of their sds.",
    )
    p.add_argument("workdirs", nargs="+", metavar="WORKDIR", help="experiment workdirs (their eval stage finished)")
    p.add_argument("--config", help="the experiment config of every workdir (default: WORKDIR/experiment.json)")
    p.add_argument("--out", required=True, help="directory for compare.md, compare.json and structure.png")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..experiment.compare import load_runs, write_compare
    from ..files import output_dir

    load_runs(args.workdirs, args.config)  # every workdir checked before anything is written
    with output_dir(Path(args.out)) as staged:
        res = write_compare(args.workdirs, staged, args.config)
    print(res["markdown"])
    print(f"wrote {Path(args.out) / 'compare.md'}, compare.json and structure.png")
    return 0
