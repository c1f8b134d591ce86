"""The experiment config: one JSON object with a section per stage, read into small dataclasses.

Each section checks its own fields when it is made (``__post_init__``); :class:`ExperimentConfig`
checks what spans sections (heal sparsities among the search's, a refined method beside its search).
Unknown keys are refused by name, so a typo never runs silently with a default. ``comment`` keys are
allowed anywhere. ``to_dict`` gives back the JSON that ``from_dict`` reads (the workdir's
``experiment.json``, which ``consa compare`` reads).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from ..errors import ConsaError

RULE_METHODS = ("interleaved-kv_head", "interleaved-layer", "fa_top-layer", "fa_bottom-layer", "fa_middle-layer")
ALL_METHODS = ("consa-kv_head", "consa-layer", "duo-kv_head", "attn_mass-kv_head", *RULE_METHODS, "random-kv_head")
# opt-in: the cut of the same ConSA search refined by swaps on held-out KL (train/refine.py), beside the
# plain top-k cut of that search, so a table shows what refinement changes at no extra search step
OPTIONAL_METHODS = ("consa_refined-kv_head", "consa_refined-layer")
KNOWN_METHODS = ALL_METHODS + OPTIONAL_METHODS
# the methods a search seed changes (attention mass and the rules are deterministic)
LEARNED = ("consa", "consa_refined", "duo")
BUDGET_METHODS = ("consa_spans-kv_head", "consa_spans-layer", "consa-kv_head", "consa-layer", "duo-kv_head",
                  "attn_mass-kv_head", "moa-kv_head", "moa-layer", "uniform-kv_head")
COMMENT_KEYS = ("comment", "_comment")


def _share(name: str, value) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value <= 1:
        raise ConsaError(f"{name} must lie in [0, 1], got {value!r}")


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
    # dense recall rows (consa.data.batches.RetrievalSource): dense_pairs "key -> value" statements and
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

    def __post_init__(self):
        from ..presets import get_preset

        get_preset(self.preset)
        _share("retrieval_mix", self.retrieval_mix)
        _share("pretrain.bank_curriculum", self.bank_curriculum)
        _share("pretrain.dense_mix", self.dense_mix)
        _share("pretrain.dense_curriculum", self.dense_curriculum)
        if not 1 <= self.dense_queries <= self.dense_pairs:
            raise ConsaError(f"pretrain.dense_queries must lie in [1, dense_pairs], got {self.dense_queries!r}")


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
    # ConSA only: the gate options (train/search_config.GateConfig says what each does and why the defaults);
    # beta_final null + init_log_alpha 3.0 give the searches of the first reference runs
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

    def __post_init__(self):
        from ..train.refine import ORDERS

        for t in self.sparsities:
            if not (isinstance(t, (int, float)) and 0 < t < 1):
                raise ConsaError(f"sparsities must lie in (0, 1), got {t!r}")
        bad = [m for m in self.methods if m not in KNOWN_METHODS]
        if bad:
            raise ConsaError(f"unknown methods {bad}; choose from {', '.join(KNOWN_METHODS)}")
        for m in self.methods:
            if m.startswith("consa_refined-") and m.replace("consa_refined-", "consa-") not in self.methods:
                raise ConsaError(f"{m} refines the cut of the {m.replace('consa_refined-', 'consa-')} search: "
                                 "list that method too")
        if not 0 <= self.until_agreement <= 1 or (self.max_steps and self.max_steps < self.steps):
            raise ConsaError("search.until_agreement must be in [0, 1] and search.max_steps 0 or at least search.steps")
        if self.refine_order not in ORDERS:
            raise ConsaError(f"search.refine_order must be one of {', '.join(ORDERS)}, got {self.refine_order!r}")
        if not isinstance(self.refine_candidates, int) or self.refine_candidates < 1:
            raise ConsaError(f"search.refine_candidates must be an integer >= 1, got {self.refine_candidates!r}")
        self.gate_config()  # the gate options, checked as the search will take them
        ss = self.search_seeds
        if not isinstance(ss, list) or any(not isinstance(x, int) or isinstance(x, bool) or x < 0 for x in ss) \
                or len(set(ss)) != len(ss):
            raise ConsaError(f"search.search_seeds must be a list of distinct integers >= 0, got {ss!r}")
        if "random-kv_head" in self.methods and len(self.random_seeds) < 1:
            raise ConsaError("random needs at least one seed")
        _share("retrieval_share", self.retrieval_share)

    def gate_config(self):
        """The ConSA search's gate settings (``consa.train.search_config.GateConfig``)."""
        from ..train.search_config import GateConfig

        return GateConfig(lr=self.gate_lr, lr_final=self.gate_lr_final, init_log_alpha=self.init_log_alpha,
                          beta_final=self.beta_final, init=self.init, init_steps=self.init_steps,
                          init_spread=self.init_spread, decide_weight=self.decide_weight, decide_frac=self.decide_frac)


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

    def __post_init__(self):
        budgets = self.budgets()
        if not budgets or any(not isinstance(b, int) or isinstance(b, bool) or b < 1 for b in budgets):
            raise ConsaError(f"heal.tokens must be an integer >= 1 or a non-empty list of them, got {self.tokens!r}")
        if len(set(budgets)) != len(budgets):
            raise ConsaError(f"heal.tokens lists a budget twice: {self.tokens!r}")
        if not isinstance(self.best_rules, int) or isinstance(self.best_rules, bool) or self.best_rules < 0:
            raise ConsaError(f"heal.best_rules must be an integer >= 0, got {self.best_rules!r}")
        if self.batch_size < 1 or not self.lr > 0 or self.lora_rank < 0 or self.lm_weight < 0:
            raise ConsaError("heal.batch_size must be >= 1, heal.lr > 0, heal.lora_rank and heal.lm_weight >= 0")
        if not 0 <= self.retrieval_share <= 1 or not 0 <= self.warmup_frac <= 1:
            raise ConsaError("heal.retrieval_share and heal.warmup_frac must lie in [0, 1]")

    def budgets(self) -> list[int]:
        """``tokens`` as a list (one int or several)."""
        return list(self.tokens) if isinstance(self.tokens, (list, tuple)) else [self.tokens]


@dataclass
class BudgetStage:
    """Methods at equal KV bytes (``stages/budget.py``)."""

    kv_budgets: list = field(default_factory=lambda: [0.25, 0.125])
    context: int | None = None  # default: the base model's context
    spans: str = "64,128,256,512,1024,full"
    methods: list = field(default_factory=lambda: ["consa_spans-kv_head", "consa-kv_head", "duo-kv_head",
                                                   "moa-kv_head", "uniform-kv_head"])
    steps: int | None = None  # learned methods' steps; default: the search stage's
    profile_batches: int = 4  # MoA-style profile: batches of the search's batch function
    decode_tokens: int = 32  # decode steps timed per row (0: no timing, bytes only)

    def __post_init__(self):
        from ..budget import parse_menu

        bad = [m for m in self.methods if m not in BUDGET_METHODS]
        if bad:
            raise ConsaError(f"unknown budget methods {bad}; choose from {', '.join(BUDGET_METHODS)}")
        if not self.kv_budgets or any(not (isinstance(x, (int, float)) and 0 < x < 1) for x in self.kv_budgets):
            raise ConsaError(f"budget.kv_budgets must be shares in (0, 1), got {self.kv_budgets!r}")
        try:
            parse_menu(self.spans)
        except ConsaError as e:
            raise ConsaError(f"budget.spans: {e}") from None
        if self.steps is not None and self.steps < 1 or self.profile_batches < 1 or self.decode_tokens < 0:
            raise ConsaError("budget.steps and budget.profile_batches must be >= 1, budget.decode_tokens >= 0")


SECTIONS = {"data": DataConfig, "pretrain": PretrainStage, "search": SearchStage, "eval": EvalStage, "heal": HealStage,
            "budget": BudgetStage}


@dataclass
class ExperimentConfig:
    name: str = "experiment"
    seed: int = 0
    device: str = "auto"
    window: int | None = None  # default: context / 16 of the preset
    progress: bool = False
    data: DataConfig = field(default_factory=DataConfig)
    pretrain: PretrainStage = field(default_factory=PretrainStage)
    search: SearchStage = field(default_factory=SearchStage)
    eval: EvalStage = field(default_factory=EvalStage)
    heal: HealStage | None = None  # no section: the heal stage does nothing
    budget: BudgetStage | None = None  # no section: the budget stage (equal KV bytes) does nothing
    source: str | None = None  # the config file it came from (recorded only)

    def __post_init__(self):
        self.validate()

    @classmethod
    def from_dict(cls, d: dict, base_dir: str | Path | None = None) -> "ExperimentConfig":
        if not isinstance(d, dict):
            raise ConsaError("an experiment config must be a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known - set(COMMENT_KEYS))
        if unknown:
            raise ConsaError(f"unknown experiment config keys: {', '.join(unknown)}")
        kw = {}
        for k, v in d.items():
            if k in COMMENT_KEYS:
                continue
            if k in SECTIONS:
                if not isinstance(v, dict):
                    raise ConsaError(f"config section {k!r} must be an object")
                sk = {f.name for f in fields(SECTIONS[k])}
                bad = sorted(set(v) - sk - set(COMMENT_KEYS))
                if bad:
                    raise ConsaError(f"unknown keys in config section {k!r}: {', '.join(bad)}")
                kw[k] = SECTIONS[k](**{a: b for a, b in v.items() if a in sk})
            else:
                kw[k] = v
        cfg = cls(**kw)
        if cfg.data.corpus and base_dir is not None and not os.path.isabs(cfg.data.corpus):
            cfg.data.corpus = str(Path(base_dir) / cfg.data.corpus)
        return cfg

    @classmethod
    def load(cls, path: str | Path) -> "ExperimentConfig":
        from ..files import read_json

        p = Path(path)
        cfg = cls.from_dict(read_json(p, "experiment config"), base_dir=Path.cwd())
        cfg.source = str(p)
        return cfg

    def validate(self) -> None:
        """Every section's checks again (after a change to a field), then those that span sections."""
        for name, cls in SECTIONS.items():
            part = getattr(self, name)
            if part is None and name in ("heal", "budget"):
                continue
            if not isinstance(part, cls):
                raise ConsaError(f"config section {name!r} must be an object")
            if hasattr(part, "__post_init__"):  # the sections with checks of their own
                part.__post_init__()
        if self.heal is not None:
            h = self.heal
            bad_t = [t for t in (h.sparsities or []) if t not in self.search.sparsities]
            bad_m = [m for m in (h.methods or []) if m not in self.search.methods]
            if bad_t or bad_m:
                raise ConsaError(f"heal.sparsities / heal.methods must be among the search's (not: {bad_t + bad_m})")

    def to_dict(self) -> dict:
        """The config as JSON (unset optional sections left out, so ``from_dict`` reads it back)."""
        return {k: v for k, v in json.loads(json.dumps(asdict(self))).items() if v is not None}

    # derived
    @property
    def context(self) -> int:
        from ..presets import get_preset

        return int(self.pretrain.seq_len or get_preset(self.pretrain.preset).context)

    @property
    def W(self) -> int:
        return int(self.window or max(1, self.context // 16))


def method_list(cfg: ExperimentConfig) -> list[tuple[str, str, str, int | None]]:
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
