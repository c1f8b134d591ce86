"""The reference experiment: does a learned allocation beat the rules?

One JSON config (``config.py``) drives seven stages, each resuming from the previous stage's output on
disk (``workdir.py``), one module each under ``stages/`` (``report.py`` writes the last):

``data``      corpus (tokenizer + token shards) in ``WORKDIR/corpus`` (or an existing corpus dir)
``pretrain``  a full-attention Qwen3 base model in ``WORKDIR/base``, trained on the corpus mixed with
              retrieval items made by the eval's own generators (a pre-built "bank", so the training
              loop never waits on item generation)
``search``    for every sparsity, one allocation per method in ``WORKDIR/alloc/s<t>/<method>.json``:
              ConSA per KV head and per layer, DuoAttention-style gates, the attention-mass score and
              every rule of ``consa.rules`` (random: several seeds) — all with exactly round(t·N) SWA
              units of their granularity (``search.search_seeds``: several searches per learned method)
``eval``      ``consa.eval.evaluate`` of the full model (with the full / all-SWA calibration baselines)
              and of every allocation, in ``WORKDIR/eval/...`` (one run dir each, as ``consa eval``)
``heal``      (only with a ``heal`` section) every allocation of ``heal.sparsities`` fine-tuned under its
              allocation (``consa.train.heal``) and evaluated into ``WORKDIR/eval/s<t>/<method>-healed``
``budget``    (only with a ``budget`` section) methods at equal KV bytes, per-unit spans included, into
              ``WORKDIR/alloc/b<b>`` and ``WORKDIR/eval/b<b>``
``report``    ``WORKDIR/report/results.md`` + ``results.json`` + heatmaps: one table per sparsity

Several workdirs of one config (base-model seeds) are pooled by ``consa compare`` (``compare.py``).

A finished stage (recorded in ``WORKDIR/stages.json`` with its wall time) is skipped; inside a stage
every finished piece (an allocation, an eval run) is skipped too, so a stage killed by a time limit
continues where it stopped. A stage whose prerequisite is missing stops with one clear error.
``adopt_base`` (``consa experiment ... --base-from OTHER``) lets a variant (more search steps, other
sparsities) use another workdir's finished base model and bank instead of pretraining again.

Token budget after the base model: ConSA and Duo-style use ``search.steps × batch × seq_len`` tokens
of gate training each; the attention-mass score reads ``mass_batches × batch × seq_len`` tokens without
training; rules use none. The optional ``heal`` stage then spends the same ``heal.tokens`` on every
allocation it heals (same batches), so before/after compares methods at an equal budget after the cut.
"""

from .config import ALL_METHODS, ExperimentConfig, method_list
from .runner import run_all, run_stage
from .workdir import STAGES, Workdir, adopt_base

__all__ = ["ALL_METHODS", "STAGES", "ExperimentConfig", "Workdir", "adopt_base", "method_list", "run_all", "run_stage"]
