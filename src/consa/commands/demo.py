"""``consa demo``: train a tiny model, search, compare with rules — on a CPU, in minutes."""

from __future__ import annotations

from .argtypes import nonneg_int


def register(sub) -> None:
    p = sub.add_parser("demo", help="end-to-end demo on a tiny model trained from scratch (CPU, < 5 min)")
    p.add_argument("--out", default="consa-demo", help="output directory")
    p.add_argument("--quick", action="store_true", help="reduced mode for CI (about a minute; numbers are rougher)")
    p.add_argument("--seed", type=nonneg_int, default=1)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..demo import DemoConfig, run_demo

    cfg = DemoConfig(out=args.out, seed=args.seed)
    if args.quick:
        cfg.base_steps, cfg.search_steps, cfg.duo_steps, cfg.eval_items = 340, 40, 30, 64
    run_demo(cfg)
    return 0
