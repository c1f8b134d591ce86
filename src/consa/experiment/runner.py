"""The stage order and the driver: run one stage (skipped when done), or every stage in turn."""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..errors import ConsaError
from ..files import atomic_write_text
from . import report
from .config import ExperimentConfig
from .stages import budget, data, heal, pretrain, search
from .stages import eval as evaluation
from .workdir import STAGES, PartialStage, Workdir, say

# stage -> module with run(wd, deadline) -> the stage's record
STAGE_MODULES = {"data": data, "pretrain": pretrain, "search": search, "eval": evaluation, "heal": heal, "budget": budget,
                 "report": report}
assert tuple(STAGE_MODULES) == STAGES


def run_stage(stage: str, cfg: ExperimentConfig, workdir: str | Path, *, force: bool = False,
              deadline: float | None = None) -> dict:
    """Run one stage (skipped when already done, unless ``force``); returns its record in stages.json.
    ``deadline`` (a ``time.time()``): the stages that take long stop starting new pieces after it."""
    if stage not in STAGE_MODULES:
        raise ConsaError(f"unknown stage {stage!r}; choose one of {', '.join(STAGES)} or all")
    wd = Workdir(workdir, cfg)
    if wd.done(stage) and not force:
        say(f"{stage}: already done ({wd.stages()[stage].get('wall_s')} s); skipped")
        return wd.stages()[stage]
    prev = wd.stages().get(stage, {})
    before = float(prev.get("wall_s", 0.0)) if not prev.get("done") else 0.0
    wd.root.mkdir(parents=True, exist_ok=True)  # every stage writes there (e.g. the bank), whichever runs first
    # the config this workdir last ran with: `consa compare` reads it back
    atomic_write_text(wd.root / "experiment.json", json.dumps(cfg.to_dict(), indent=1) + "\n")
    t0 = time.time()
    say(f"{stage}: start")
    try:
        info = STAGE_MODULES[stage].run(wd, deadline)
        done = True
    except PartialStage as e:
        info, done = {"note": str(e)}, False
        say(str(e))
    wall = time.time() - t0
    # wall_s adds up the calls a stage took (a partial eval continued by a later call)
    rec = {**info, "done": done, "wall_s": round(before + wall, 2), "wall_s_this_call": round(wall, 2),
           "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    wd.record(stage, rec)
    say(f"{stage}: {'done' if done else 'partial'} in {wall:.1f} s")
    return wd.stages()[stage]


def run_all(cfg: ExperimentConfig, workdir: str | Path, *, until: str = "report", deadline: float | None = None) -> dict:
    """Every stage in order until ``until``, stopping at the first that does not finish."""
    out = {}
    for stage in STAGES:
        out[stage] = run_stage(stage, cfg, workdir, deadline=deadline)
        if not out[stage].get("done"):
            break
        if stage == until:
            break
    return out
