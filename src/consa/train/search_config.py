"""The settings of one ConSA search, in the parts a reader thinks in.

``SearchConfig`` holds what the search must reach (``target``), how the gates start and move
(``gates``), how long it runs (``schedule``), how the sparsity constraint is enforced (``constraint``),
what it is trained on (``loss``), how the final cut is checked (``refine``) and whether model weights
train beside the gates (``weights``), plus a few run settings. Each part checks its own fields when it
is made; ``SearchConfig`` checks the settings that span parts (a window shorter than the sequence, a
span menu that forbids refinement) and resolves the defaults that depend on another part.

``consa search``'s flags and the ``config`` of runs saved before the parts existed use flat names
(``gate_lr``, ``refine_order``, ...): :data:`FLAT_NAMES` maps them, :meth:`SearchConfig.from_flat`
reads them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

from .. import budget as B
from ..allocation import AllocationError, check_granularity, check_sparsity
from ..errors import ConsaError

from .refine import ORDERS as REFINE_ORDERS
from .schedules import INITS

AUTO_REFINE_EVALS = 96  # held-out KL evaluations of the default refinement (refine.evals None)
CONTROLLERS = ("lagrangian", "project")
TRAIN_WEIGHTS = ("none", "full", "lora")


def _int_at_least(name: str, value, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ConsaError(f"{name} must be an integer >= {low}, got {value!r}")


@dataclass
class TargetConfig:
    """What the allocation must meet: a share of SWA units (``sparsity``), or KV bytes under a budget.

    ``kv_budget``: the KV held at ``budget_context`` tokens (default: the search's seq_len) must fit in
    this share of full attention's, sinks included; each unit then picks one option of ``spans`` (e.g.
    ``"128,512,2048,full"``), or, without spans, the one ``window`` or full attention."""

    sparsity: float | None = None  # share of SWA units; or None with a kv_budget
    window: int | None = None  # the SWA window (tokens, self included); None with a span menu (its longest span)
    granularity: str = "kv_head"  # kv_head | layer: the unit that is FA or SWA
    sinks: int = 0  # attention-sink tokens every SWA unit also sees
    # search the model's native sliding layers too (default: they keep their window, unsearched and uncounted)
    reopen_native: bool = False
    kv_budget: float | None = None
    budget_context: int | None = None
    spans: str | None = None

    def __post_init__(self):
        if (self.sparsity is None) == (self.kv_budget is None):
            raise ConsaError("a sparsity (--sparsity, share of SWA units) or a KV budget (--kv-budget) is required: give exactly one")
        if self.sparsity is not None:
            check_sparsity(self.sparsity)
        if self.kv_budget is not None and not 0.0 < self.kv_budget < 1.0:
            raise ConsaError(f"the KV budget must be strictly between 0 and 1 of full attention, got {self.kv_budget}")
        if self.budget_context is not None and (not isinstance(self.budget_context, int) or self.budget_context < 1):
            raise ConsaError(f"the budget context must be an integer >= 1, got {self.budget_context!r}")
        if self.spans is not None:
            try:
                menu = B.parse_menu(self.spans)
            except AllocationError as e:
                raise ConsaError(str(e)) from None
            if self.kv_budget is None:
                raise ConsaError("a span menu needs a KV budget (--kv-budget): the sparsity counts units, not spans")
            if self.menu() is None:  # (W, full): the single-window search under a budget
                if self.window is not None and self.window != menu[0]:
                    raise ConsaError(f"--window {self.window} and the span menu {self.spans} disagree")
                self.window = menu[0]
            else:
                if self.window is not None and self.window not in menu:
                    raise ConsaError(f"--window {self.window} is not in the span menu {self.spans}")
                self.window = max(s for s in menu if s is not None)
        check_granularity(self.granularity)
        if self.window is None:
            raise ConsaError("a window is required (--window), unless a span menu (--spans) gives the options")
        if not isinstance(self.window, int) or self.window < 1:
            raise ConsaError(f"window must be an integer >= 1, got {self.window!r}")
        _int_at_least("sinks", self.sinks, 0)

    def menu(self) -> tuple | None:
        """The span menu of a multi-option search, None for a single window (spans left out or (W, full))."""
        if self.spans is None:
            return None
        menu = B.parse_menu(self.spans)
        return None if len(menu) == 2 and menu[1] is None else menu


@dataclass
class GateConfig:
    """The hard-concrete gates (one per searched unit): where they start and how they move.

    ``init_log_alpha`` 0.5, not 3: at 3 about 80 % of the gate samples sit clamped at z = 1, where the KL
    gives log α no gradient. Annealing β (``beta_final``) makes the samples nearly binary by the end, so
    the student trains on the hybrids it will be cut to; with both, a search reached Duo-style's held-out
    KL in half the steps of the old settings (3.0, no anneal). The other options are off by default
    (``schedules.py`` says what each does)."""

    lr: float = 0.05  # Adam learning rate of log α
    lr_final: float | None = None  # cosine-decay the lr to this over schedule.steps; None: constant
    init_log_alpha: float = 0.5  # log α of every gate at step 0
    beta_final: float | None = 0.2  # anneal β geometrically from 2/3 to this over schedule.steps; None: constant 2/3
    init: str = "constant"  # constant | attention_mass | duo: log α ranked by that score, init_log_alpha ± init_spread/2
    init_steps: int = 0  # Duo-style warm-start steps / attention-mass batches for init (0: 30 / 4)
    init_spread: float = 2.0
    decide_weight: float = 0.0  # weight of mean P(1 − P), pushing undecided gates apart, in the last decide_frac
    decide_frac: float = 0.25

    def __post_init__(self):
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConsaError(f"gate lr must be a positive number, got {self.lr!r}")
        if self.beta_final is not None and not 0.0 < self.beta_final <= 10.0:
            raise ConsaError(f"beta_final must be in (0, 10], got {self.beta_final}")
        if self.lr_final is not None and not 0.0 <= self.lr_final:
            raise ConsaError(f"gate_lr_final must be >= 0, got {self.lr_final}")
        if self.init not in INITS:
            raise ConsaError(f"init must be one of {', '.join(INITS)}, got {self.init!r}")
        if self.init_steps < 0:
            raise ConsaError(f"init_steps must be >= 0, got {self.init_steps}")
        if not self.init_spread >= 0.0:
            raise ConsaError(f"init_spread must be >= 0, got {self.init_spread}")
        if not self.decide_weight >= 0.0:
            raise ConsaError(f"decide_weight must be >= 0, got {self.decide_weight}")
        if not 0.0 < self.decide_frac <= 1.0:
            raise ConsaError(f"decide_frac must be in (0, 1], got {self.decide_frac}")


@dataclass
class ScheduleConfig:
    """How long the search trains. After ``steps``, with ``until_agreement`` > 0, it keeps training at the
    target until that share of the gates agrees with the top-k cut (``gates.cut_agreement``), for at
    most ``max_steps`` steps in all (0: 4 × steps)."""

    steps: int = 300
    until_agreement: float = 0.0
    max_steps: int = 0

    def __post_init__(self):
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ConsaError(f"steps must be >= 1, got {self.steps}")
        if not 0.0 <= self.until_agreement <= 1.0:
            raise ConsaError(f"until_agreement must be in [0, 1], got {self.until_agreement}")
        if self.max_steps and self.max_steps < self.steps:
            raise ConsaError(f"max_steps ({self.max_steps}) must be at least steps ({self.steps})")


@dataclass
class ConstraintConfig:
    """How the sparsity target is enforced (``constraint.py``): a Lagrangian multiplier or a projection
    of log α, with the target ramped up from 0 over the first ``warmup_frac`` of the steps."""

    controller: str = "lagrangian"
    warmup_frac: float = 0.4

    def __post_init__(self):
        if self.controller not in CONTROLLERS:
            raise ConsaError(f"controller must be lagrangian or project, got {self.controller!r}")
        if not 0.0 <= self.warmup_frac <= 1.0:
            raise ConsaError(f"warmup_frac must be in [0, 1], got {self.warmup_frac}")


@dataclass
class LossConfig:
    """The task loss (``losses.py``): KL(teacher ‖ student) on next-token logits, plus an LM loss and a KL
    over only the positions that predict retrieval answers (a few answer tokens otherwise count like any
    text position). The same fields as ``HealConfig``'s, so both hand themselves to the same loss code."""

    kl_weight: float = 1.0
    lm_weight: float = 0.0
    answer_weight: float = 0.0
    temperature: float = 1.0

    def __post_init__(self):
        if self.kl_weight < 0 or self.lm_weight < 0:
            raise ConsaError("kl_weight and lm_weight must be >= 0")
        if self.answer_weight < 0:
            raise ConsaError(f"answer_weight must be >= 0, got {self.answer_weight}")
        if not self.temperature > 0:
            raise ConsaError(f"temperature must be > 0, got {self.temperature}")


@dataclass
class RefineConfig:
    """After the cut: try swaps across it on held-out batches, keeping those that lower the binary
    allocation's KL to the full model (``refine.refine_cut``). ``evals`` None (the default) means
    :data:`AUTO_REFINE_EVALS` for a search at a share of units and 0 under a KV budget (whose
    assignment is not a top-k cut): on the reference runs it lowered the held-out KL of every cut by
    2-14 % (5 % on batches it never saw) for seconds more per search."""

    evals: int | None = None  # objective evaluations at most; 0: off, the plain top-k cut
    candidates: int = 4  # SWA units nearest the cut considered (and FA units, for order score)
    batches: int = 2  # held-out batches the objective is measured on
    order: str = "gradient"  # score | measured | gradient (refine.py)

    def __post_init__(self):
        if self.evals is not None and (not isinstance(self.evals, int) or self.evals < 0):
            raise ConsaError(f"refine_evals must be >= 0, got {self.evals!r}")
        if self.candidates < 1 or self.batches < 1:
            raise ConsaError("refine_candidates and refine_batches must be >= 1")
        if self.order not in REFINE_ORDERS:
            raise ConsaError(f"refine_order must be one of {', '.join(REFINE_ORDERS)}, got {self.order!r}")


@dataclass
class WeightsConfig:
    """Whether model weights train beside the gates: ``none`` (gates only; the teacher is the same model
    with the gates off), ``full`` or ``lora`` (the teacher is then a frozen copy)."""

    train: str = "none"
    lr: float = 1e-5
    lora_rank: int = 8

    def __post_init__(self):
        if self.train not in TRAIN_WEIGHTS:
            raise ConsaError(f"train_weights must be none, full or lora, got {self.train!r}")
        if not self.lr > 0:
            raise ConsaError(f"weight lr must be > 0, got {self.lr}")
        _int_at_least("lora_rank", self.lora_rank, 1)


PARTS = {"target": TargetConfig, "gates": GateConfig, "schedule": ScheduleConfig, "constraint": ConstraintConfig,
         "loss": LossConfig, "refine": RefineConfig, "weights": WeightsConfig}


@dataclass
class SearchConfig:
    """Everything one search needs besides the model and its batches (module docstring)."""

    target: TargetConfig
    seq_len: int  # tokens per training sequence (the batches' length)
    gates: GateConfig = field(default_factory=GateConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    constraint: ConstraintConfig = field(default_factory=ConstraintConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    refine: RefineConfig = field(default_factory=RefineConfig)
    weights: WeightsConfig = field(default_factory=WeightsConfig)
    seed: int = 0
    checkpoint_every: int = 50  # steps between checkpoints (0: none)
    # sequences per forward pass on each process; the step's gradient is still the whole batch's
    # (``accumulate.py``); 0: every local row at once
    micro_batch: int = 0
    backend: str = "auto"  # consa attention kernels: auto | sdpa | flex

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """The checks that span parts (each part checked its own fields when it was made); resolves
        ``refine.evals`` None, so search.json records what ran. Run again after changing a field."""
        for name, cls in PARTS.items():
            if not isinstance(getattr(self, name), cls):
                raise ConsaError(f"SearchConfig.{name} must be a {cls.__name__}, got {type(getattr(self, name)).__name__}")
            getattr(self, name).__post_init__()
        t = self.target
        _int_at_least("seq_len", self.seq_len, 1)
        if t.menu() is not None:
            too_long = [s for s in t.menu() if s is not None and s >= self.seq_len]
            if too_long:
                raise ConsaError(f"spans {too_long} are not shorter than the training sequence length {self.seq_len}: "
                                 "the search cannot tell them from full attention")
            for name, bad in (("refine_evals", self.refine.evals), ("init", self.gates.init != "constant")):
                if bad:
                    raise ConsaError(f"{name} works with a single window only, not with a span menu")
        if t.window >= self.seq_len:
            raise ConsaError(
                f"window {t.window} must be smaller than the training sequence length {self.seq_len} "
                "(otherwise SWA equals full attention and there is nothing to learn)"
            )
        if self.refine.evals is None:
            self.refine.evals = 0 if t.kv_budget is not None else AUTO_REFINE_EVALS
        if not isinstance(self.micro_batch, int) or self.micro_batch < 0:
            raise ConsaError(f"micro_batch must be an integer >= 0 (0: the whole local batch at once), got {self.micro_batch!r}")
        _int_at_least("checkpoint_every", self.checkpoint_every, 0)

    def to_dict(self) -> dict:
        """The nested dict that search.json and checkpoints record (``from_dict`` reads it back)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "SearchConfig":
        """A config as recorded: nested (``to_dict``), or the flat layout of runs saved before the parts."""
        if not isinstance(d, dict):
            raise ConsaError("a search config must be a JSON object")
        if "target" not in d:
            return cls.from_flat(d)
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ConsaError(f"unknown search config keys: {', '.join(unknown)}")
        kw = dict(d)
        for name, part in PARTS.items():
            if name in kw:
                sub = kw[name]
                bad = sorted(set(sub) - {f.name for f in fields(part)}) if isinstance(sub, dict) else None
                if bad is None or bad:
                    raise ConsaError(f"search config part {name!r}: unknown keys {bad}" if bad else
                                     f"search config part {name!r} must be an object")
                kw[name] = part(**sub)
        return cls(**kw)

    @classmethod
    def from_flat(cls, d: dict) -> "SearchConfig":
        """A config from the flat names of ``consa search``'s flags and of older runs (:data:`FLAT_NAMES`)."""
        return cls.from_dict(nest(d, strict=True))

    def flat(self) -> dict:
        """The config under its flat names (the inverse of :meth:`from_flat`)."""
        return flatten(self.to_dict())


# flat name -> (part or None for a top-level field, field)
FLAT_NAMES = {
    "sparsity": ("target", "sparsity"), "window": ("target", "window"), "granularity": ("target", "granularity"),
    "sinks": ("target", "sinks"), "reopen_native": ("target", "reopen_native"), "kv_budget": ("target", "kv_budget"),
    "budget_context": ("target", "budget_context"), "spans": ("target", "spans"),
    "gate_lr": ("gates", "lr"), "gate_lr_final": ("gates", "lr_final"), "init_log_alpha": ("gates", "init_log_alpha"),
    "beta_final": ("gates", "beta_final"), "init": ("gates", "init"), "init_steps": ("gates", "init_steps"),
    "init_spread": ("gates", "init_spread"), "decide_weight": ("gates", "decide_weight"),
    "decide_frac": ("gates", "decide_frac"),
    "steps": ("schedule", "steps"), "until_agreement": ("schedule", "until_agreement"),
    "max_steps": ("schedule", "max_steps"),
    "controller": ("constraint", "controller"), "warmup_frac": ("constraint", "warmup_frac"),
    "kl_weight": ("loss", "kl_weight"), "lm_weight": ("loss", "lm_weight"), "answer_weight": ("loss", "answer_weight"),
    "temperature": ("loss", "temperature"),
    "refine_evals": ("refine", "evals"), "refine_candidates": ("refine", "candidates"),
    "refine_batches": ("refine", "batches"), "refine_order": ("refine", "order"),
    "train_weights": ("weights", "train"), "weight_lr": ("weights", "lr"), "lora_rank": ("weights", "lora_rank"),
    "seq_len": (None, "seq_len"), "seed": (None, "seed"), "checkpoint_every": (None, "checkpoint_every"),
    "micro_batch": (None, "micro_batch"), "backend": (None, "backend"),
}


def nest(flat: dict, strict: bool = False) -> dict:
    """Flat names -> the nested layout (a plain dict; nothing checked but, with ``strict``, the names)."""
    if strict:
        unknown = sorted(set(flat) - set(FLAT_NAMES))
        if unknown:
            raise ConsaError(f"unknown search settings: {', '.join(unknown)}")
    out: dict = {}
    for k, v in flat.items():
        if k not in FLAT_NAMES:
            continue
        part, name = FLAT_NAMES[k]
        (out.setdefault(part, {}) if part else out)[name] = v
    return out


def flatten(config: dict) -> dict:
    """A recorded config (nested, or already flat from an older run) under its flat names."""
    if "target" not in config:
        return dict(config)
    out = {}
    for k, (part, name) in FLAT_NAMES.items():
        src = config.get(part) or {} if part else config
        if name in src:
            out[k] = src[name]
    return out
