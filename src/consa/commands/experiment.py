"""``consa experiment STAGE --config CFG.json [--workdir DIR]``: the reference experiment, stage by stage.

Stages: data, pretrain, search, eval, report, or all. Each resumes from the previous stage's output in
WORKDIR and records its wall time in WORKDIR/stages.json; a finished stage is skipped (``--force``
reruns it). ``--base-from OTHER`` takes the finished base model and bank of workdir OTHER instead of
pretraining. See ``consa.experiment`` and docs/RESULTS.md.
"""

from __future__ import annotations

import argparse

from .argtypes import positive_float


def register(sub) -> None:
    p = sub.add_parser("experiment", help="run the reference experiment (data → pretrain → search → eval → report)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter, description=__doc__)
    p.add_argument("stage", help="data, pretrain, search, eval, report or all")
    p.add_argument("--config", required=True, help="experiment config JSON (see experiments/)")
    p.add_argument("--workdir", help="where the stages write (default: runs/<config name>)")
    p.add_argument("--force", action="store_true", help="rerun the stage even when stages.json says it is done")
    p.add_argument("--time-budget", type=positive_float, help="seconds after which the search, eval, heal and budget "
                   "stages stop starting new pieces (what they finished stays; the next call continues, exit code 3)")
    p.add_argument("--base-from", metavar="WORKDIR", help="use the finished base model and bank of another "
                   "experiment workdir instead of pretraining (search/eval variants on the same base)")
    p.set_defaults(func=run)


def run(args) -> int:
    import time

    from ..errors import ConsaError
    from ..files import has_checkpoint, output_dir
    from ..experiment import STAGES, ExperimentConfig, Workdir, adopt_base, run_all, run_stage

    if args.stage not in (*STAGES, "all"):
        raise ConsaError(f"unknown stage {args.stage!r}; choose one of {', '.join(STAGES)} or all")
    cfg = ExperimentConfig.load(args.config)
    workdir = args.workdir or f"runs/{cfg.name}"
    # resumable, stage by stage: a failed call removes a fresh workdir unless a stage finished or checkpointed in it
    keep = lambda d: (d / "stages.json").is_file() or has_checkpoint(d)  # noqa: E731
    with output_dir(workdir, resumable=True, keep=keep, what="--workdir"):
        if args.base_from:
            adopt_base(Workdir(workdir, cfg), args.base_from)
        deadline = time.time() + args.time_budget if args.time_budget else None
        if args.stage == "all":
            out = run_all(cfg, workdir, deadline=deadline)
            ok = all(v.get("done") for v in out.values()) and len(out) == len(STAGES)
        else:
            ok = bool(run_stage(args.stage, cfg, workdir, force=args.force, deadline=deadline).get("done"))
    print(f"workdir: {workdir}")
    return 0 if ok else 3
