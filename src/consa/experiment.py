"""The reference experiment (GUIDE §6, issue 5): does a learned allocation beat the rules?

One JSON config drives seven stages, each resuming from the previous stage's output on disk:

``data``      corpus (tokenizer + token shards) in ``WORKDIR/corpus`` (or an existing corpus dir)
``pretrain``  a full-attention Qwen3 base model in ``WORKDIR/base``, trained on the corpus mixed with
              retrieval items made by the eval's own generators (a pre-built "bank", so the training
              loop never waits on item generation)
``search``    for every sparsity, one allocation per method in ``WORKDIR/alloc/s<t>/<method>.json``:
              ConSA per KV head and per layer, DuoAttention-style gates, the attention-mass score and
              every rule of ``consa.rules`` (random: several seeds) — all with exactly round(t·N) SWA
              units of their granularity (``experiment_search.py``; ``search.search_seeds``: several
              searches per learned method)
``eval``      ``consa.eval.evaluate`` of the full model (with the full / all-SWA calibration baselines)
              and of every allocation, in ``WORKDIR/eval/...`` (one run dir each, as ``consa eval``)
``heal``      (only with a ``heal`` section) every allocation of ``heal.sparsities`` fine-tuned under its
              allocation (``consa.train.heal``) and evaluated into ``WORKDIR/eval/s<t>/<method>-healed``
              (``experiment_heal.py``)
``budget``    (only with a ``budget`` section) methods at equal KV bytes, per-unit spans included
              (``experiment_budget.py``), into ``WORKDIR/alloc/b<b>`` and ``WORKDIR/eval/b<b>``
``report``    ``WORKDIR/report/results.md`` + ``results.json`` + heatmaps: one table per sparsity
              (``experiment_report.py``; the retrieval bank lives in ``data/bank.py``)

Several workdirs of one config (base-model seeds) are pooled by ``consa compare`` (``experiment_compare.py``).

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

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable

import numpy as np

from .data.bank import BankSource, build_bank  # the retrieval item bank (importable from here too)
from .errors import ConsaError
from .experiment_budget import BudgetStage

STAGES = ("data", "pretrain", "search", "eval", "heal", "budget", "report")
RULE_METHODS = ("interleaved-kv_head", "interleaved-layer", "fa_top-layer", "fa_bottom-layer", "fa_middle-layer")
ALL_METHODS = ("consa-kv_head", "consa-layer", "duo-kv_head", "attn_mass-kv_head", *RULE_METHODS, "random-kv_head")
# opt-in: the cut of the same ConSA search refined by swaps on held-out KL (train/refine.py), beside the
# plain top-k cut of that search, so a table shows what refinement changes at no extra search step
OPTIONAL_METHODS = ("consa_refined-kv_head", "consa_refined-layer")
KNOWN_METHODS = ALL_METHODS + OPTIONAL_METHODS


# ------------------------------------------------------------------------------------------ config
@dataclass
class DataConfig:
    corpus: str | None = None  # an existing corpus dir (skips building); relative to the config file
    sources: list = field(default_factory=lambda: ["stdlib"])
    vocab_size: int = 8192
    max_mb: float | None = None
    workers: int | None = None
    seed: int = 0


@dataclass
class PretrainStage:
    preset: str = "tiny"
    steps: int | None = None
    tokens: int | None = None
    batch_size: int | None = None
    seq_len: int | None = None
    lr: float | None = None
    retrieval_mix: float = 0.25  # share of training rows that are retrieval items from the bank
    bank_items: int = 256  # retrieval items generated once (reused with random corpus padding)
    bank_tasks: list = field(default_factory=lambda: ["passkey", "multikey", "varrecall"])
    bank_min_len: int = 128  # item lengths are drawn uniformly in [bank_min_len, seq_len - 16]
    bank_workers: int = 1
    bank_digits: int = 5  # digits of passkeys / values in the bank (match the eval's `digits`)
    answer_weight: float = 0.0  # extra loss on the bank items' answer tokens (consa.train.pretrain)
    bank_curriculum: float = 0.0  # share of the steps over which the longest item drawn grows to the longest
    # dense recall rows (consa.train.batches.RetrievalSource): dense_pairs "key -> value" statements and
    # dense_queries of them asked back per row, in the multikey / varrecall phrasings with keys of their
    # own; dense_mix of all rows (the bank then gets retrieval_mix of the rest)
    dense_mix: float = 0.0
    dense_pairs: int = 16
    dense_queries: int = 8
    dense_curriculum: float = 0.0  # share of the steps over which the statements' span grows to the whole row
    compile: bool = False
    bf16: bool | None = None
    time_limit: float | None = None  # stop early; the last checkpoint then serves as the base model
    stop_at: int | None = None  # stop at this step (schedule unchanged), e.g. where another seed's time limit hit;
    #                             the stage is done only there (a time limit before it leaves the stage partial)
    eval_every: int | None = None
    threads: int | None = None


@dataclass
class SearchStage:
    sparsities: list = field(default_factory=lambda: [0.5, 0.75, 0.875])
    methods: list = field(default_factory=lambda: list(ALL_METHODS))
    steps: int = 100
    until_agreement: float = 0.0  # ConSA only: extend past `steps` until this share of gates agrees with the cut
    max_steps: int = 0  # cap of that extension (0: 4 × steps)
    refine_evals: int = 0  # ConSA only: held-out KL evaluations for swaps across the cut (train/refine.py); 0 = off.
    #                        With consa_refined-<gran> listed, consa-<gran> keeps the plain top-k cut and the refined one
    #                        is its own row (refine_evals, or `consa search`'s AUTO_REFINE_EVALS when 0)
    refine_order: str = "gradient"  # score | measured | gradient (train/refine.py; gradient: `consa search`'s default)
    refine_candidates: int = 4  # SWA units (and, for score, FA units) nearest the cut that refinement considers
    # ConSA only, issue 17 options (train/schedules.py; SearchConfig says what each does and why the
    # defaults); beta_final null + init_log_alpha 3.0 give the searches of runs 1-6
    beta_final: float | None = 0.2
    init_log_alpha: float = 0.5
    gate_lr_final: float | None = None
    init: str = "constant"
    init_steps: int = 0
    init_spread: float = 2.0
    decide_weight: float = 0.0
    decide_frac: float = 0.25
    answer_weight: float = 0.0  # ConSA and span searches: extra KL on the positions predicting retrieval answers
    batch_size: int = 8
    seq_len: int | None = None  # default: the pretraining sequence length
    retrieval_share: float = 0.5  # share of each search batch that is retrieval items
    gate_lr: float = 0.05
    controller: str = "lagrangian"
    warmup_frac: float = 0.4
    duo_lr: float = 0.05
    duo_l1: float = 0.05
    mass_batches: int = 4
    random_seeds: list = field(default_factory=lambda: [0, 1, 2])
    # search seeds of the learned methods (ConSA, Duo-style): each seed searches once, with its own gate
    # initialisation, sampling and batches (stems <method>-seed<s>); empty: one search at the experiment's seed
    search_seeds: list = field(default_factory=list)
    dtype: str = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    backend: str = "auto"  # consa attention kernels: auto | sdpa | flex (sdpa avoids FlexAttention compiles)


@dataclass
class EvalStage:
    tasks: list = field(default_factory=lambda: ["passkey", "multikey", "varrecall"])
    lengths: list = field(default_factory=lambda: [2048, 4096])
    depths: list = field(default_factory=lambda: [0.1, 0.5, 0.9])
    items: int = 8
    digits: int = 5  # digits of passkeys / values (fewer: easier for small base models)
    ppl_length: int | None = None
    ppl_sequences: int = 16
    batch_size: int = 8
    autocast: str | None = None  # "bf16" on GPU
    dtype: str = "auto"
    backend: str = "auto"


@dataclass
class HealStage:
    """Heal every allocation of the listed sparsities with the same batches (``consa.train.heal``)."""

    sparsities: list | None = None  # default: every search sparsity
    methods: list | None = None  # default: every search method
    tokens: int | list = 2_000_000  # one budget, or a list: each heal starts from the same base weights
    batch_size: int = 8
    seq_len: int | None = None  # default: the search's
    lr: float = 1e-5
    lora_rank: int = 0  # 0: every weight (no PEFT needed)
    lm_weight: float = 0.0
    warmup_frac: float = 0.1
    retrieval_share: float = 0.5
    backend: str = "auto"
    keep_models: bool = False  # keep each healed model (a consa export) in WORKDIR/heal/s<t>/<method>
    best_rules: int = 0  # also heal the N rule allocations with the lowest long-range PPL at each sparsity


@dataclass
class ExperimentConfig:
    name: str = "experiment"
    seed: int = 0
    device: str = "auto"
    window: int | None = None  # default: context / 16 of the preset (GUIDE §6)
    progress: bool = False
    data: DataConfig = field(default_factory=DataConfig)
    pretrain: PretrainStage = field(default_factory=PretrainStage)
    search: SearchStage = field(default_factory=SearchStage)
    eval: EvalStage = field(default_factory=EvalStage)
    heal: HealStage | None = None  # no section: the heal stage does nothing
    budget: BudgetStage | None = None  # no section: the budget stage (equal KV bytes, experiment_budget.py) does nothing
    source: str | None = None  # the config file it came from (recorded only)

    @classmethod
    def from_dict(cls, d: dict, base_dir: str | Path | None = None) -> "ExperimentConfig":
        if not isinstance(d, dict):
            raise ConsaError("an experiment config must be a JSON object")
        subs = {"data": DataConfig, "pretrain": PretrainStage, "search": SearchStage, "eval": EvalStage, "heal": HealStage,
                "budget": BudgetStage}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known - {"comment", "_comment"})
        if unknown:
            raise ConsaError(f"unknown experiment config keys: {', '.join(unknown)}")
        kw = {}
        for k, v in d.items():
            if k in ("comment", "_comment"):
                continue
            if k in subs:
                if not isinstance(v, dict):
                    raise ConsaError(f"config section {k!r} must be an object")
                sk = {f.name for f in fields(subs[k])}
                bad = sorted(set(v) - sk - {"comment", "_comment"})
                if bad:
                    raise ConsaError(f"unknown keys in config section {k!r}: {', '.join(bad)}")
                kw[k] = subs[k](**{a: b for a, b in v.items() if a in sk})
            else:
                kw[k] = v
        cfg = cls(**kw)
        if cfg.data.corpus and base_dir is not None and not os.path.isabs(cfg.data.corpus):
            cfg.data.corpus = str(Path(base_dir) / cfg.data.corpus)
        cfg.validate()
        return cfg

    @classmethod
    def load(cls, path: str | Path) -> "ExperimentConfig":
        from .files import read_json

        p = Path(path)
        cfg = cls.from_dict(read_json(p, "experiment config"), base_dir=Path.cwd())
        cfg.source = str(p)
        return cfg

    def validate(self) -> None:
        from .presets import get_preset

        get_preset(self.pretrain.preset)
        for t in self.search.sparsities:
            if not (isinstance(t, (int, float)) and 0 < t < 1):
                raise ConsaError(f"sparsities must lie in (0, 1), got {t!r}")
        bad = [m for m in self.search.methods if m not in KNOWN_METHODS]
        if bad:
            raise ConsaError(f"unknown methods {bad}; choose from {', '.join(KNOWN_METHODS)}")
        for m in self.search.methods:
            if m.startswith("consa_refined-") and m.replace("consa_refined-", "consa-") not in self.search.methods:
                raise ConsaError(f"{m} refines the cut of the {m.replace('consa_refined-', 'consa-')} search: "
                                 "list that method too")
        if not 0 <= self.search.until_agreement <= 1 or (self.search.max_steps and self.search.max_steps < self.search.steps):
            raise ConsaError("search.until_agreement must be in [0, 1] and search.max_steps 0 or at least search.steps")
        from .train.refine import ORDERS

        if self.search.refine_order not in ORDERS:
            raise ConsaError(f"search.refine_order must be one of {', '.join(ORDERS)}, got {self.search.refine_order!r}")
        if not isinstance(self.search.refine_candidates, int) or self.search.refine_candidates < 1:
            raise ConsaError(f"search.refine_candidates must be an integer >= 1, got {self.search.refine_candidates!r}")
        from .train.schedules import validate as validate_search_options

        validate_search_options(self.search)
        ss = self.search.search_seeds
        if not isinstance(ss, list) or any(not isinstance(x, int) or isinstance(x, bool) or x < 0 for x in ss) \
                or len(set(ss)) != len(ss):
            raise ConsaError(f"search.search_seeds must be a list of distinct integers >= 0, got {ss!r}")
        if "random-kv_head" in self.search.methods and len(self.search.random_seeds) < 1:
            raise ConsaError("random needs at least one seed")
        if not 0 <= self.pretrain.retrieval_mix <= 1 or not 0 <= self.search.retrieval_share <= 1:
            raise ConsaError("retrieval_mix and retrieval_share must lie in [0, 1]")
        if not 0 <= self.pretrain.bank_curriculum <= 1:
            raise ConsaError(f"pretrain.bank_curriculum must lie in [0, 1], got {self.pretrain.bank_curriculum!r}")
        p = self.pretrain
        if not 0 <= p.dense_mix <= 1 or not 0 <= p.dense_curriculum <= 1:
            raise ConsaError(f"pretrain.dense_mix and dense_curriculum must lie in [0, 1], got {p.dense_mix!r}, "
                             f"{p.dense_curriculum!r}")
        if not 1 <= p.dense_queries <= p.dense_pairs:
            raise ConsaError(f"pretrain.dense_queries must lie in [1, dense_pairs], got {p.dense_queries!r}")
        if self.heal is not None:
            from .experiment_heal import validate_heal

            validate_heal(self)
        if self.budget is not None:
            from .experiment_budget import validate_budget

            validate_budget(self)

    def to_dict(self) -> dict:
        """The config as JSON (unset optional sections left out, so ``from_dict`` reads it back)."""
        return {k: v for k, v in json.loads(json.dumps(asdict(self))).items() if v is not None}

    # derived
    @property
    def context(self) -> int:
        from .presets import get_preset

        return int(self.pretrain.seq_len or get_preset(self.pretrain.preset).context)

    @property
    def W(self) -> int:
        return int(self.window or max(1, self.context // 16))


# ------------------------------------------------------------------------------------ bookkeeping
class Workdir:
    """Paths of one experiment and its ``stages.json`` (what finished, when, how long it took)."""

    def __init__(self, root: str | Path, cfg: ExperimentConfig):
        self.root, self.cfg = Path(root), cfg
        self.corpus = Path(cfg.data.corpus) if cfg.data.corpus else self.root / "corpus"
        self.base = self.root / "base"
        self.alloc = self.root / "alloc"
        self.search_runs = self.root / "search"
        self.evals = self.root / "eval"
        self.report = self.root / "report"
        self.stages_file = self.root / "stages.json"

    @property
    def bank(self) -> Path:
        """The retrieval bank: this workdir's own, or the one of the workdir its base model came from."""
        adopted = self.stages().get("pretrain", {}).get("bank_file")
        return Path(adopted) if adopted else self.root / "bank.npz"

    def stages(self) -> dict:
        if self.stages_file.is_file():
            return json.loads(self.stages_file.read_text())
        return {}

    def record(self, stage: str, info: dict) -> None:
        from .files import atomic_write_text

        self.root.mkdir(parents=True, exist_ok=True)
        st = self.stages()
        st[stage] = info
        atomic_write_text(self.stages_file, json.dumps(st, indent=1) + "\n")

    def done(self, stage: str) -> bool:
        return bool(self.stages().get(stage, {}).get("done"))

    def base_model_dir(self) -> Path | None:
        if (self.base / "config.json").is_file():
            return self.base
        info = self.stages().get("pretrain", {})
        if info.get("done") and info.get("model"):
            return Path(info["model"])
        return None


def adopt_base(wd: Workdir, other: str | Path) -> dict:
    """Record the finished base model (and retrieval bank) of workdir ``other`` as ``wd``'s pretrain stage.

    Search and eval variants (more search steps, other sparsities or windows) then run on the very same
    base model without pretraining again; the report names where the base came from. Idempotent for the
    same source; a workdir that already has a different base model is refused."""
    from .presets import get_preset

    src = Workdir(other, wd.cfg)
    if src.root.resolve() == wd.root.resolve():
        raise ConsaError(f"--base-from {other} names the workdir itself")
    if not src.stages_file.is_file():
        raise ConsaError(f"--base-from {other}: no stages.json there (not an experiment workdir)")
    base = src.base_model_dir()
    if base is None or not src.done("pretrain"):
        raise ConsaError(f"--base-from {other}: its pretrain stage has not finished")
    base = base.resolve()
    mine = wd.stages().get("pretrain")
    if mine:
        if mine.get("done") and Path(mine.get("model", "")).resolve() == base:
            return mine
        raise ConsaError(f"{wd.root} already has its own pretrain stage ({mine.get('model')}); use a fresh --workdir")
    mc = json.loads((base / "config.json").read_text())
    pre = get_preset(wd.cfg.pretrain.preset)
    want = {"num_hidden_layers": pre.num_layers, "hidden_size": pre.hidden_size,
            "num_attention_heads": pre.num_heads, "num_key_value_heads": pre.num_kv_heads}
    bad = {k: (mc.get(k), v) for k, v in want.items() if mc.get(k) != v}
    if bad:
        raise ConsaError(f"--base-from {other}: its base model does not have the shape of preset "
                         f"{pre.name!r} in this config (model vs preset: {bad})")
    rec = {**src.stages()["pretrain"], "model": str(base), "adopted_from": str(src.root.resolve()),
           "bank_file": str(src.bank.resolve()) if src.bank.is_file() else None}
    wd.record("pretrain", rec)
    _say(f"pretrain: adopted the base model {base} (from {src.root})")
    return rec


def _require(cond: bool, stage: str, what: str, prev: str, wd: Workdir) -> None:
    if not cond:
        src = wd.cfg.source or "CFG.json"
        raise ConsaError(f"stage '{stage}' needs {what}, which is missing: run "
                         f"`consa experiment {prev} --config {src} --workdir {wd.root}` first")


def _say(msg: str) -> None:
    print(f"[experiment {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _device(name: str):
    import torch

    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _dtype(name: str, device):
    import torch

    if name in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def method_key(t: float) -> str:
    return f"s{t:g}"


# ------------------------------------------------------------------------------------------- data
def stage_data(wd: Workdir) -> dict:
    cfg = wd.cfg
    if cfg.data.corpus:
        if not (wd.corpus / "train" / "meta.json").is_file():
            raise ConsaError(f"data.corpus {wd.corpus} is not a built corpus (no train/meta.json)")
        _say(f"data: using the existing corpus {wd.corpus}")
    elif (wd.corpus / "stats.json").is_file():
        _say(f"data: corpus already built in {wd.corpus}")
    else:
        from .data.corpus import build_corpus

        max_bytes = int(cfg.data.max_mb * 1e6) if cfg.data.max_mb else None
        wd.root.mkdir(parents=True, exist_ok=True)
        build_corpus(cfg.data.sources, wd.corpus, vocab_size=cfg.data.vocab_size, max_bytes=max_bytes,
                     workers=cfg.data.workers, seed=cfg.data.seed)
    stats = json.loads((wd.corpus / "stats.json").read_text()) if (wd.corpus / "stats.json").is_file() else {}
    return {"corpus": str(wd.corpus), "tokens": stats.get("tokens"), "documents": stats.get("documents")}



# --------------------------------------------------------------------------------------- pretrain
def stage_pretrain(wd: Workdir) -> dict:
    from .train.pretrain import PretrainConfig, pretrain, resolve

    cfg, p = wd.cfg, wd.cfg.pretrain
    adopted = wd.stages().get("pretrain", {}).get("adopted_from")
    if adopted:
        raise ConsaError(f"{wd.root} uses the base model of {adopted} (--base-from); pretrain in a fresh --workdir")
    _require((wd.corpus / "train" / "meta.json").is_file(), "pretrain", f"the corpus {wd.corpus}", "data", wd)
    seq_len = cfg.context
    bank_info = None
    if p.retrieval_mix > 0 and not wd.bank.is_file():
        _say(f"pretrain: building the retrieval bank ({p.bank_items} items, {p.bank_workers} workers)")
        bank_info = build_bank(wd.corpus, wd.bank, p.bank_items, list(p.bank_tasks), p.bank_min_len,
                               max(p.bank_min_len, seq_len - 16), cfg.seed, p.bank_workers, p.bank_digits)
        _say(f"pretrain: bank {bank_info}")
    pc = PretrainConfig(corpus=str(wd.corpus), out=str(wd.base), preset=p.preset, tokens=p.tokens, steps=p.steps,
                        batch_size=p.batch_size, seq_len=p.seq_len, lr=p.lr, device=cfg.device, compile=p.compile,
                        bf16=p.bf16, resume=True, seed=cfg.seed, eval_every=p.eval_every, threads=p.threads,
                        time_limit=p.time_limit, stop_at=p.stop_at, progress=cfg.progress,
                        answer_weight=p.answer_weight)
    pretrain(pc, batch_source=pretrain_source(wd, resolve(pc).steps))
    log_path = wd.base / "pretrain_log.json"
    if not log_path.is_file():
        log_path = wd.base / "checkpoint" / "pretrain_log.json"
    log = json.loads(log_path.read_text())
    model_dir = wd.base if (wd.base / "config.json").is_file() else wd.base / "checkpoint"
    if not (model_dir / "config.json").is_file():
        raise ConsaError(f"pretraining left no model in {wd.base}")
    val = log.get("validation") or [{}]
    info = {"model": str(model_dir), "finished": log.get("finished"), "steps": log.get("steps_done"),
            "tokens": log.get("tokens_done"), "parameters": log.get("parameters"),
            "tokens_per_s": log.get("train_tokens_per_s"), "val_loss_first": val[0].get("val_loss"),
            "val_loss_last": val[-1].get("val_loss"), "retrieval_mix": p.retrieval_mix, "bank": bank_info,
            "answer_weight": p.answer_weight, "answer_loss_last": (log.get("history") or [{}])[-1].get("answer_loss")}
    if not log.get("finished"):
        if p.stop_at is not None and info["steps"] < p.stop_at:  # the time limit came first: not the base asked for
            raise _Partial(f"pretrain: the time limit stopped it at step {info['steps']} before stop_at {p.stop_at}; "
                           "the next call continues from its checkpoint")
        _say(f"pretrain: stopped (time limit or stop_at) after {info['steps']} steps; the last checkpoint is the base model")
    return info


def pretrain_source(wd: Workdir, steps: int):
    """The pretraining batch source of the config: corpus windows, ``retrieval_mix`` of them replaced by
    bank items (with the length curriculum), then ``dense_mix`` of all rows by dense recall rows."""
    from .data.shards import TokenShards
    from .data.tokenizer import load_tokenizer
    from .train.batches import MixedSource, RetrievalSource, corpus_source

    p = wd.cfg.pretrain
    shards = TokenShards.open(wd.corpus, "train")
    source = corpus_source(shards)
    if p.retrieval_mix > 0:
        bank = BankSource(wd.bank, shards, curriculum_steps=round(p.bank_curriculum * steps))
        source = MixedSource(source, bank, p.retrieval_mix)
    if p.dense_mix > 0:
        dense = RetrievalSource(shards, load_tokenizer(wd.corpus), num_pairs=p.dense_pairs,
                                num_queries=p.dense_queries, value_digits=p.bank_digits,
                                curriculum_steps=round(p.dense_curriculum * steps))
        source = MixedSource(source, dense, p.dense_mix)
    return source


# ----------------------------------------------------------------------------------------- search
def search_batch_fn(shards, bank: BankSource | None, batch: int, seq_len: int, share: float, seed: int):
    """step -> {"input_ids", "answer_mask"}: ``share`` of the rows retrieval items (their answer tokens
    marked), the rest corpus windows."""
    import torch

    n_ret = int(round(share * batch)) if bank is not None else 0

    def fn(step: int) -> dict:
        rng = np.random.default_rng([seed, 7, step])
        rows, masks = [], []
        if batch - n_ret:
            rows.append(torch.as_tensor(shards.sample_batch(batch - n_ret, seq_len, rng), dtype=torch.long))
            masks.append(torch.zeros(batch - n_ret, seq_len, dtype=torch.bool))
        if n_ret:
            items = bank(n_ret, seq_len, rng)
            rows.append(items["input_ids"])
            masks.append(items["answer_mask"].bool())
        return {"input_ids": torch.cat(rows), "answer_mask": torch.cat(masks)}

    return fn


LEARNED = ("consa", "consa_refined", "duo")  # the methods a search seed changes (attention mass and the rules
#                                             are deterministic)


def _method_list(cfg: ExperimentConfig) -> list[tuple[str, str, str, int | None]]:
    """(file stem, method, granularity, seed) for every allocation of one sparsity; a consa_refined method
    right after the ConSA search whose gates it reads."""
    methods = [m for m in cfg.search.methods if not m.startswith("consa_refined-")]
    for m in [m for m in cfg.search.methods if m.startswith("consa_refined-")]:
        methods.insert(methods.index(m.replace("consa_refined-", "consa-")) + 1, m)
    out = []
    for m in methods:
        name, gran = m.rsplit("-", 1)
        if name == "random":
            out += [(f"{m}-seed{s}", name, gran, int(s)) for s in cfg.search.random_seeds]
        elif name in LEARNED and cfg.search.search_seeds:
            out += [(f"{m}-seed{s}", name, gran, int(s)) for s in cfg.search.search_seeds]
        else:
            out.append((m, name, gran, None))
    return out


def stage_search(wd: Workdir, deadline: float | None = None) -> dict:
    """Every allocation of every sparsity on the base model (experiment_search.py)."""
    from .experiment_search import run_search_stage

    return run_search_stage(wd, deadline)


# ------------------------------------------------------------------------------------------- eval
def eval_config(cfg: ExperimentConfig, corpus: Path | None):
    from .eval.runner import EvalConfig

    e = cfg.eval
    return EvalConfig(tasks=tuple(e.tasks), lengths=tuple(e.lengths), depths=tuple(e.depths), items=e.items, digits=e.digits,
                      window=cfg.W, corpus=str(corpus) if corpus else None,
                      ppl_length=e.ppl_length, ppl_sequences=e.ppl_sequences, batch_size=e.batch_size,
                      autocast=e.autocast, backend=e.backend, seed=cfg.seed, progress=cfg.progress)


def stage_eval(wd: Workdir, deadline: float | None = None) -> dict:
    import torch

    from .allocation import Allocation
    from .data.tokenizer import load_tokenizer
    from .eval.runner import evaluate, retrieval_items, write_run
    from .models import load_model

    cfg = wd.cfg
    _require(wd.done("search"), "eval", f"the allocations in {wd.alloc}", "search", wd)
    base = wd.base_model_dir()
    device = _device(cfg.device)
    model = load_model(base, dtype=_dtype(cfg.eval.dtype, device), device=str(device))
    tok = load_tokenizer(base)
    ecfg = eval_config(cfg, wd.corpus)
    items = retrieval_items(tok, ecfg)  # once for all runs: the items are the same for every allocation
    full = full_eval(wd, model, tok, ecfg, items)
    n_done, n_skipped = 0, 0
    for t in cfg.search.sparsities:
        for stem, *_ in _method_list(cfg):
            out = wd.evals / method_key(t) / stem
            if (out / "eval.json").is_file():
                continue
            if deadline is not None and time.time() > deadline:
                n_skipped += 1
                continue
            alloc = Allocation.load(wd.alloc / method_key(t) / f"{stem}.json")
            r = evaluate(model, tok, alloc, ecfg, baselines=full["baselines"], label=stem, log=None, items=items)
            write_run(r, out)
            n_done += 1
            _say(f"eval: t={t} {stem}: long Δnll {r['summary']['delta_long_nll']}, retrieval "
                 f"{ {k: v for k, v in r['summary']['retrieval_raw'].items()} } ({r['seconds']} s)")
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if n_skipped:
        raise _Partial(f"eval: {n_skipped} runs left for a later call (time budget reached)")
    return {"runs": n_done, "calibration": _calibration_summary(full)}


def full_eval(wd: Workdir, model, tok, ecfg, items) -> dict:
    """The full-attention run with the full / all-SWA baselines: read from ``WORKDIR/eval/full``, or made
    there once (every later stage compares against it)."""
    from .eval.runner import evaluate, write_run

    full_dir = wd.evals / "full"
    if (full_dir / "eval.json").is_file():
        return json.loads((full_dir / "eval.json").read_text())
    full = evaluate(model, tok, None, ecfg, label="full", items=items)
    write_run(full, full_dir)
    _say(f"eval: full + baselines in {full['seconds']} s")
    return full


class _Partial(ConsaError):
    """A stage stopped at its time budget; what it finished is on disk and the next call continues."""


def _calibration_summary(full: dict) -> dict:
    cal = full.get("calibration") or {}
    return {task: [{k: r.get(k) for k in ("length", "full", "all_swa", "pass")} for r in rows] for task, rows in cal.items()}


# ----------------------------------------------------------------------------------------- report
def stage_report(wd: Workdir) -> dict:
    """Tables, structure, heatmaps and the optional sections (``experiment_report.py``)."""
    from .experiment_report import stage_report as report

    return report(wd)


def collect(wd: Workdir) -> dict:
    from .experiment_report import collect as gather

    return gather(wd)


def stage_budget(wd: Workdir, deadline: float | None = None) -> dict:
    """Every method at equal KV bytes (experiment_budget.py)."""
    from .experiment_budget import run_budget_stage

    return run_budget_stage(wd, deadline)


def stage_heal(wd: Workdir, deadline: float | None = None) -> dict:
    """Heal every allocation of ``cfg.heal`` and evaluate it next to the unhealed one (experiment_heal.py)."""
    from .experiment_heal import run_heal_stage

    return run_heal_stage(wd, deadline)


# ------------------------------------------------------------------------------------------ driver
STAGE_FNS: dict[str, Callable] = {"data": stage_data, "pretrain": stage_pretrain, "search": stage_search,
                                   "eval": stage_eval, "heal": stage_heal, "budget": stage_budget,
                                   "report": stage_report}


def run_stage(stage: str, cfg: ExperimentConfig, workdir: str | Path, *, force: bool = False,
              deadline: float | None = None) -> dict:
    """Run one stage (skipped when already done, unless ``force``); returns its record in stages.json."""
    if stage not in STAGE_FNS:
        raise ConsaError(f"unknown stage {stage!r}; choose one of {', '.join(STAGES)} or all")
    wd = Workdir(workdir, cfg)
    if wd.done(stage) and not force:
        _say(f"{stage}: already done ({wd.stages()[stage].get('wall_s')} s); skipped")
        return wd.stages()[stage]
    prev = wd.stages().get(stage, {})
    before = float(prev.get("wall_s", 0.0)) if not prev.get("done") else 0.0
    wd.root.mkdir(parents=True, exist_ok=True)  # every stage writes there (e.g. the bank), whichever runs first
    from .files import atomic_write_text

    # the config this workdir last ran with: `consa compare` reads it back
    atomic_write_text(wd.root / "experiment.json", json.dumps(cfg.to_dict(), indent=1) + "\n")
    t0 = time.time()
    _say(f"{stage}: start")
    try:
        info = STAGE_FNS[stage](wd, deadline) if stage in ("search", "eval", "heal", "budget") else STAGE_FNS[stage](wd)
        done = True
    except _Partial as e:
        info, done = {"note": str(e)}, False
        _say(str(e))
    wall = time.time() - t0
    # wall_s adds up the calls a stage took (a partial eval continued by a later call)
    rec = {**info, "done": done, "wall_s": round(before + wall, 2), "wall_s_this_call": round(wall, 2),
           "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    wd.record(stage, rec)
    _say(f"{stage}: {'done' if done else 'partial'} in {wall:.1f} s")
    return wd.stages()[stage]


def run_all(cfg: ExperimentConfig, workdir: str | Path, *, until: str = "report", deadline: float | None = None) -> dict:
    out = {}
    for stage in STAGES:
        out[stage] = run_stage(stage, cfg, workdir, deadline=deadline)
        if not out[stage].get("done"):
            break
        if stage == until:
            break
    return out
