"""The ConSA search: learn which units keep full attention under an exact SWA budget.

Student = the model with gated attention (``models.attach_gates``); teacher = the same model with
gates off (or a frozen copy when weights train too). Loss = KL(teacher ‖ student) on next-token
logits (+ optional LM loss) + the sparsity controller's penalty. At the end a global top-k over
log α gives exactly round(t·N) SWA units.

Data comes from ``batch_fn(step) -> dict(input_ids, [attention_mask], [loss_mask])``; it must be a
pure function of the step so that a resumed run sees the same batches as an unbroken one.

Multi-process (torchrun): pass a :class:`~consa.train.distributed.Dist`. The model is then sharded
with FSDP2, each rank takes its contiguous slice of the global batch, and the gates, their optimiser
and the multiplier stay replicated (see ``distributed.py`` and docs/DISTRIBUTED.md). The loss is the
same global mean as on one process: each rank divides its sum by the global count.
"""

from __future__ import annotations

import copy
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from ..allocation import Allocation, AllocationError, check_granularity, check_sparsity, swa_count
from .. import budget as B
from ..files import atomic_path, atomic_write_text
from ..constraint import ControllerConfig, SparsityController
from ..errors import ConsaError
from ..gates import HardConcreteGates, SpanGates, cut_agreement, cut_margin, topk_swa
from ..models import attach_gates, model_shape, native_plans, native_windows, searchable_native
from .accumulate import backward_micro_batches, batch_rows
# the losses live in losses.py; older callers import them from here
from .losses import answer_positions, forward_logits, global_task_loss, kl_loss, kl_sum, lm_sum, task_terms  # noqa: F401
from .checkpoint import check_resumable, load_checkpoint, model_fingerprint, save_checkpoint
from .distributed import Dist
from . import schedules
from .refine import ORDERS as REFINE_ORDERS
from .refine import RefineResult, refine_cut

BatchFn = Callable[[int], dict]


@dataclass
class SearchConfig:
    sparsity: float | None  # share of SWA units; or None with a kv_budget
    window: int | None  # the SWA window; None with a span menu (each unit picks from ``spans``)
    seq_len: int
    granularity: str = "kv_head"
    sinks: int = 0
    steps: int = 300
    # after ``steps``, keep training at the target until this share of the gates agrees with the top-k
    # cut (``gates.cut_agreement``), for at most ``max_steps`` steps in all (0: 4 × steps); 0 = off
    until_agreement: float = 0.0
    max_steps: int = 0
    gate_lr: float = 0.05
    # log α at step 0. 0.5, not 3: at 3 about 80% of the gate samples sit clamped at z = 1, where the KL
    # gives log α no gradient; measured with beta_final below (docs/RESULTS.md, "GPU run 7")
    init_log_alpha: float = 0.5
    warmup_frac: float = 0.4
    controller: str = "lagrangian"
    train_weights: str = "none"  # none | full | lora
    weight_lr: float = 1e-5
    lora_rank: int = 8
    kl_weight: float = 1.0
    lm_weight: float = 0.0
    answer_weight: float = 0.0  # weight of an added KL over the positions predicting retrieval answers (0: off)
    temperature: float = 1.0
    checkpoint_every: int = 50
    seed: int = 0
    backend: str = "auto"
    # search the model's native sliding layers too (default: they keep their window, unsearched)
    reopen_native: bool = False
    # sequences per forward pass on each process; the step's gradient is still the whole batch's
    # (``accumulate.py``); 0: every local row at once
    micro_batch: int = 0
    # after the cut: try swaps across it on held-out batches (``refine.refine_cut``); 0 = off. None (the
    # default): AUTO_REFINE_EVALS for a search at a share of units, 0 under a KV budget (whose assignment
    # is not a top-k cut). On by default since run 10 (docs/RESULTS.md): it lowered the held-out KL of all 9
    # cuts by 2-14%, by 5% on batches it never saw (t = 0.875), for ~6 s more a 150-step search on 64 units
    refine_evals: int | None = None
    refine_candidates: int = 4
    refine_batches: int = 2
    refine_order: str = "gradient"  # score: pairs nearest the cut first; measured / gradient: by single-unit
    #                                  flips, measured or estimated to first order by one backward (refine.py)
    # issue 17 options (``schedules.py``). Annealing β is on by default: with init_log_alpha 0.5 it
    # reached Duo-style's held-out KL in 150 steps where the old defaults (3.0, no anneal) needed 300
    beta_final: float | None = 0.2  # anneal the hard-concrete β geometrically from 2/3 to this over `steps`; None: off
    gate_lr_final: float | None = None  # cosine decay of the gate lr from gate_lr to this over `steps`
    init: str = "constant"  # constant | attention_mass | duo: log α ranked by that score, init_log_alpha ± init_spread/2
    init_steps: int = 0  # duo warm-start steps / attention-mass batches (0: 30 / 4)
    init_spread: float = 2.0
    decide_weight: float = 0.0  # weight of mean P(1−P) in the last decide_frac of `steps`
    decide_frac: float = 0.25
    # issue 16, a budget in KV bytes instead of a share of units (``budget.py``): KV held at
    # budget_context (default: seq_len) <= kv_budget of full attention's. Each unit picks one option of
    # ``spans`` (e.g. "128,512,2048,full"); without spans, the one window W and full.
    kv_budget: float | None = None
    budget_context: int | None = None
    spans: str | None = None

    def menu(self) -> tuple | None:
        """The span menu of a multi-option search, None for a single window (spans left out or (W, full))."""
        if self.spans is None:
            return None
        menu = B.parse_menu(self.spans)
        return None if len(menu) == 2 and menu[1] is None else menu

    def validate(self) -> None:
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
            if self.menu() is not None:
                too_long = [s for s in menu if s is not None and s >= self.seq_len]
                if too_long:
                    raise ConsaError(f"spans {too_long} are not shorter than the training sequence length {self.seq_len}: "
                                     "the search cannot tell them from full attention")
                if self.window is not None and self.window not in menu:
                    raise ConsaError(f"--window {self.window} is not in the span menu {self.spans}")
                self.window = max(s for s in menu if s is not None)
                for name, bad in (("refine_evals", self.refine_evals), ("init", self.init != "constant")):
                    if bad:
                        raise ConsaError(f"{name} works with a single window only, not with a span menu")
        check_granularity(self.granularity)
        if self.window is None:
            raise ConsaError("a window is required (--window), unless a span menu (--spans) gives the options")
        if not isinstance(self.window, int) or self.window < 1:
            raise ConsaError(f"window must be an integer >= 1, got {self.window!r}")
        if self.window >= self.seq_len:
            raise ConsaError(
                f"window {self.window} must be smaller than the training sequence length {self.seq_len} "
                "(otherwise SWA equals full attention and there is nothing to learn)"
            )
        if self.steps < 1:
            raise ConsaError(f"steps must be >= 1, got {self.steps}")
        if not 0.0 <= self.until_agreement <= 1.0:
            raise ConsaError(f"until_agreement must be in [0, 1], got {self.until_agreement}")
        if self.max_steps and self.max_steps < self.steps:
            raise ConsaError(f"max_steps ({self.max_steps}) must be at least steps ({self.steps})")
        if self.train_weights not in ("none", "full", "lora"):
            raise ConsaError(f"train_weights must be none, full or lora, got {self.train_weights!r}")
        if self.controller not in ("lagrangian", "project"):
            raise ConsaError(f"controller must be lagrangian or project, got {self.controller!r}")
        if self.answer_weight < 0:
            raise ConsaError(f"answer_weight must be >= 0, got {self.answer_weight}")
        if self.refine_evals is None:  # resolved here, so search.json records what ran
            self.refine_evals = 0 if self.kv_budget is not None else AUTO_REFINE_EVALS
        if self.refine_evals < 0 or self.refine_candidates < 1 or self.refine_batches < 1:
            raise ConsaError("refine_evals must be >= 0, and refine_candidates and refine_batches >= 1")
        if self.refine_order not in REFINE_ORDERS:
            raise ConsaError(f"refine_order must be one of {', '.join(REFINE_ORDERS)}, got {self.refine_order!r}")
        if not isinstance(self.micro_batch, int) or self.micro_batch < 0:
            raise ConsaError(f"micro_batch must be an integer >= 0 (0: the whole local batch at once), got {self.micro_batch!r}")
        schedules.validate(self)


AUTO_REFINE_EVALS = 96  # held-out KL evaluations of the default refinement (refine_evals None)
AGREEMENT_WARN = 0.9  # below this share of gates agreeing with the cut, `run` warns that the search is unfinished


def prepare_student(model, mode: str, lora_rank: int = 8):
    """The model ready to train: frozen (``none``), every weight (``full``) or LoRA adapters on the
    attention projections (``lora``, via PEFT); dropout off, so a run is deterministic given its seed."""
    if mode == "none":
        return model.eval().requires_grad_(False)
    if mode == "lora":
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError:
            raise ConsaError("LoRA training needs PEFT: pip install 'consa[peft]'") from None
        lcfg = LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
        model = get_peft_model(model, lcfg)
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    if mode == "full":
        model.requires_grad_(True)
    return model


def units_to_heads(z: torch.Tensor, granularity: str, shape, free_layers) -> torch.Tensor:
    """Gate values of the searched units ([U] or [U, options]) → [layers, kv_heads(, options)] (layers
    not in ``free_layers``, the fixed ones, read none: 0 there). ``free_layers``: a list, or an index
    tensor already on z's device (a search step then copies nothing from the host)."""
    h = shape.num_kv_heads
    tail = tuple(z.shape[1:])
    rows = z.view(-1, 1, *tail).expand(-1, h, *tail) if granularity == "layer" else z.view(-1, h, *tail)
    if len(free_layers) == shape.num_layers:
        return rows
    idx = free_layers if torch.is_tensor(free_layers) else torch.tensor(free_layers, device=rows.device)
    return rows.new_zeros(shape.num_layers, h, *tail).index_copy(0, idx, rows)


class Search:
    """One ConSA search; ``run`` returns the Allocation and writes it under ``out_dir``.

    ``dist`` (from :func:`~consa.train.distributed.init_from_env`) makes it one rank of a torchrun
    job; left out, the search runs on one process exactly as before.
    """

    def __init__(self, model, cfg: SearchConfig, batch_fn: BatchFn, out_dir: str | Path, progress: bool = True,
                 dist: Dist | None = None):
        cfg.validate()
        self.dist = dist if dist is not None else Dist(device=next(model.parameters()).device)
        self.cfg, self.batch_fn, self.out_dir = cfg, batch_fn, Path(out_dir)
        self.progress = progress and self.dist.is_main
        self.shape = model_shape(model)
        self.fingerprint = model_fingerprint(model)
        # Native sliding layers stay as they are (fixed, uncounted) unless reopened; when reopened, the
        # teacher still runs them at their native window: it is the model as trained.
        self.native = searchable_native(model, cfg.reopen_native)
        trained = native_windows(model)
        self.reopened = trained if cfg.reopen_native and any(w is not None for w in trained) else None
        self.free_layers = [i for i, w in enumerate(self.native) if w is None]
        self.n_units = len(Allocation.free_units(self.native, cfg.granularity, self.shape.num_kv_heads))
        self.budget, target = self._budget()
        self.num_swa = swa_count(target, self.n_units) if self.budget is None else None
        self.init_scores, self.init_tokens = None, 0
        if cfg.init != "constant":  # on the bare model, before anything is attached
            if self.dist.enabled:
                raise ConsaError(f"init {cfg.init} runs on one process only; use init constant under torchrun")
            self.init_scores, self.init_tokens = schedules.init_scores(model, cfg, batch_fn, self.num_swa)
        torch.manual_seed(cfg.seed)
        self.teacher = None
        if cfg.train_weights != "none":
            self.teacher = copy.deepcopy(model).eval().requires_grad_(False)
        self.model = self._prepare_student(model)
        self.mix = attach_gates(self.model, cfg.window, cfg.sinks, backend=cfg.backend, reopen_native=cfg.reopen_native,
                                menu=self.budget.menu if self.budget is not None else None)
        if self.dist.enabled:
            from .distributed import shard_pair

            # fp32 weights that train on GPU: keep fp32 masters, compute in bf16
            mp = self.dist.device.type == "cuda" and cfg.train_weights != "none" and next(model.parameters()).dtype == torch.float32
            self.model, self.teacher = shard_pair(self.model, self.teacher, self.dist, mp)
            self.device = self.dist.device
        else:
            self.device = next(model.parameters()).device
        if self.budget is None:
            self.gates = HardConcreteGates(self.n_units, cfg.init_log_alpha).to(self.device)
        else:
            self.gates = SpanGates(torch.tensor(self.budget.unit_cost_shares()), cfg.init_log_alpha).to(self.device)
        if self.init_scores is not None:
            with torch.no_grad():
                self.gates.log_alpha.copy_(schedules.rank_init(self.init_scores, cfg.init_log_alpha, cfg.init_spread))
        # Gates and weights get separate optimisers: the gates' is replicated, the weights' sharded.
        self.opt = torch.optim.Adam([{"params": [self.gates.log_alpha], "lr": cfg.gate_lr}])
        weights = [p for p in self.model.parameters() if p.requires_grad]
        self.wopt = torch.optim.Adam([{"params": weights, "lr": cfg.weight_lr}]) if weights else None
        warmup = int(round(cfg.warmup_frac * cfg.steps))
        self.controller = SparsityController(ControllerConfig(target, warmup, cfg.controller))
        self.gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
        self.step = 0
        self.history: list[dict] = []
        self._cut = None  # the top-k cut after the last step (single-window searches)

    def _prepare_student(self, model):
        return prepare_student(model, self.cfg.train_weights, self.cfg.lora_rank)

    def _budget(self):
        """(the span problem of a multi-option search or None, the controller's target): a share of SWA
        units, or under a KV budget the saving 1 − budget (spans) or the unit share that meets it."""
        cfg = self.cfg
        if cfg.kv_budget is None:
            return None, cfg.sparsity
        menu = cfg.menu() or (cfg.window, None)
        try:
            prob = B.problem(self.shape, cfg.granularity, menu, cfg.kv_budget, cfg.budget_context or cfg.seq_len,
                             cfg.sinks, self.native)
        except AllocationError as e:
            raise ConsaError(str(e)) from None
        if cfg.menu() is not None:
            return prob, prob.saving_target()
        k = B.swa_units_for_budget(prob)
        if k >= self.n_units:
            raise ConsaError(f"a KV budget of {cfg.kv_budget:g} leaves no unit on full attention at window {cfg.window}: "
                             "use a smaller window, a span menu (--spans), or a larger budget")
        return None, k / self.n_units

    # ---- one step -----------------------------------------------------------------------------
    def _unit_to_heads(self, z: torch.Tensor) -> torch.Tensor:
        if getattr(self, "_free_idx", None) is None or self._free_idx.device != z.device:  # once, not every step
            self._free_idx = torch.tensor(self.free_layers, device=z.device)
        return units_to_heads(z, self.cfg.granularity, self.shape, self._free_idx)

    def _teacher_logits(self, batch):
        if self.reopened is None:
            return self._teacher_pass(batch)
        with native_plans(self.model, self.reopened):
            return self._teacher_pass(batch)

    def _teacher_pass(self, batch):
        with torch.no_grad():
            if self.teacher is not None:
                return forward_logits(self.teacher, batch)
            self.mix.z = None  # full attention, without computing the SWA outputs
            if not (self.dist.enabled and hasattr(self.model, "set_reshard_after_forward")):
                return forward_logits(self.model, batch)
            # Sharded: keep each layer gathered after the teacher pass, so the student pass that
            # follows skips its all-gathers (FSDP2's unshard is a no-op on unsharded parameters);
            # the student pass reshards them again. Costs one unsharded copy of the weights.
            self.model.set_reshard_after_forward(False)
            try:
                return forward_logits(self.model, batch)
            finally:
                self.model.set_reshard_after_forward(True)

    def _micro_step(self, batch) -> tuple[torch.Tensor, float]:
        """The task loss backpropagated ``cfg.micro_batch`` rows at a time (``accumulate.py``): one gate
        sample for the whole step; its head mixing weights are a leaf that collects every micro-batch's
        gradient and pass it on to log α once. Returns (the gate-side term still to backpropagate, task)."""
        z = self.gates.sample(self.gen)
        zh = self._unit_to_heads(z if self.budget is None else SpanGates.weights(z))
        leaf = zh.detach().requires_grad_(True)

        def forward(chunk):
            teacher = self._teacher_logits(chunk) if self.cfg.kl_weight > 0 else None  # sets mix.z = None
            self.mix.z = leaf
            return forward_logits(self.model, chunk), teacher

        self.opt.zero_grad(set_to_none=True)
        if self.wopt is not None:
            self.wopt.zero_grad(set_to_none=True)
        task = backward_micro_batches(batch, self.cfg.micro_batch, forward, self.cfg, self.dist)
        through = (zh * leaf.grad).sum() if leaf.grad is not None else zh.sum() * 0.0
        return through, task

    def train_step(self) -> dict:
        cfg, step = self.cfg, self.step
        batch = self.dist.local_batch(self.batch_fn(step))
        batch = {k: (v.to(self.device) if torch.is_tensor(v) else v) for k, v in batch.items()}
        micro = 0 < cfg.micro_batch < batch_rows(batch)
        if micro:
            opts = self._apply_schedules(step)
            loss, task = self._micro_step(batch)
        else:
            loss_mask = batch.get("loss_mask")
            if loss_mask is None and batch.get("attention_mask") is not None:
                loss_mask = batch["attention_mask"]
            teacher = self._teacher_logits(batch) if cfg.kl_weight > 0 else None
            opts = self._apply_schedules(step)
            z = self.gates.sample(self.gen)
            self.mix.z = self._unit_to_heads(z if self.budget is None else SpanGates.weights(z))
            logits = forward_logits(self.model, batch)
            loss, task = self._global_task_loss(logits, teacher, batch, loss_mask)  # one process: world size 1
        if not math.isfinite(task):
            raise ConsaError(f"loss became {task} at step {step}; no allocation was written (lower --gate-lr or check the data)")
        s_hat = self.gates.expected_sparsity()
        total = loss + self.controller.penalty(s_hat, step)
        if cfg.decide_weight and schedules.decide_active(step, cfg.steps, cfg.decide_frac):
            decide = schedules.decide_penalty(self.gates.prob_nonzero())
            total = total + cfg.decide_weight * decide
            opts["decide"] = float(decide.detach())
        if self.budget is None and self._cut is None:  # the cut before this step's update (fresh or resumed)
            self._cut = topk_swa(self.gates.log_alpha, self.num_swa)
        if not micro:  # (the micro-batches have zeroed them and left their gradients)
            self.opt.zero_grad(set_to_none=True)
            if self.wopt is not None:
                self.wopt.zero_grad(set_to_none=True)
        total.backward()
        if self.dist.enabled and self.gates.log_alpha.grad is not None:
            # FSDP averages the weight gradients; average the replicated gate gradient the same way.
            self.dist.all_reduce_sum_(self.gates.log_alpha.grad).div_(self.dist.world_size)
        self.opt.step()
        if self.wopt is not None:
            self.wopt.step()
        self.controller.after_step(self.gates, step)
        if self.dist.enabled:
            self._sync_replicated()
        with torch.no_grad():
            s_after = float(self.gates.expected_sparsity())
            if self.budget is None:
                hard = float((self.gates.prob_nonzero() < 0.5).float().mean())
            else:  # the saving of every unit's most likely option
                probs = self.gates.level_probs()
                hard = 1.0 - float(self.gates.costs.gather(1, probs.argmax(1, keepdim=True)).sum())
        rec = {
            "step": step, "loss": task, "expected_sparsity": s_after, "hard_sparsity": hard,
            "target": self.controller.target_at(step), "lambda1": self.controller.lambda1,
            "shift": self.controller.last_shift, **opts,
        }
        if self.budget is None:  # units this update moved across the top-k cut: is the allocation settled?
            cut = topk_swa(self.gates.log_alpha, self.num_swa)
            rec["cut_flips"] = sum(a != b for a, b in zip(cut, self._cut))
            self._cut = cut
        self.history.append(rec)
        self.step += 1
        return rec

    def _apply_schedules(self, step: int) -> dict:
        """Set this step's β and gate lr (options off: nothing changes); returns what to log."""
        cfg, out = self.cfg, {}
        if cfg.beta_final is not None:
            self.gates.beta = out["beta"] = schedules.beta_at(step, cfg.steps, cfg.beta_final)
        if cfg.gate_lr_final is not None:
            self.opt.param_groups[0]["lr"] = out["gate_lr"] = schedules.cosine_lr(step, cfg.steps, cfg.gate_lr, cfg.gate_lr_final)
        return out

    def _global_task_loss(self, logits, teacher, batch, loss_mask):
        """This rank's share of the global-mean task loss, scaled so that *averaged* gradients are exact.

        Each term is Σ_local / count_global; the count is all-reduced first. Multiplying by the world
        size makes the mean over ranks of the gradients (what FSDP and the gate all-reduce compute)
        the gradient of the global mean, the very loss a single process would use on the whole batch.
        """
        return global_task_loss(logits, teacher, batch, loss_mask, self.cfg, self.dist)

    @torch.no_grad()
    def _sync_replicated(self) -> None:
        """Broadcast rank 0's gates and multiplier (N + 2 floats): replicas cannot drift by rounding."""
        la = self.gates.log_alpha
        buf = torch.cat([la.detach().double().flatten(),
                         la.new_tensor([self.controller.lambda1, self.controller.last_shift], dtype=torch.float64)])
        self.dist.broadcast_(buf)
        la.copy_(buf[:-2].view_as(la).to(la.dtype))
        self.controller.lambda1, self.controller.last_shift = float(buf[-2]), float(buf[-1])

    # ---- whole run ----------------------------------------------------------------------------
    def run(self, resume: bool = False) -> Allocation:
        ckpt_dir = self.out_dir / "checkpoint"
        check_resumable(self.out_dir, resume, self.dist.world_size)
        if resume:
            load_checkpoint(ckpt_dir, self)
            self._apply_schedules(max(0, self.step - 1))  # β of the last step done, for the agreement checks
        self.dist.barrier()  # every rank has read the old state before rank 0 writes anything
        if self.dist.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        self.dist.barrier()
        main = self.dist.is_main
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.cfg.steps, initial=self.step, desc="consa search", dynamic_ncols=True)
        t0 = time.time()
        metrics_path = self.out_dir / "metrics.jsonl"
        mode = "a" if resume else "w"
        with (open(metrics_path, mode) if main else open(os.devnull, "w")) as mf:
            while self.step < self.cfg.steps or self._extend(bar):
                rec = self.train_step()
                mf.write(json.dumps(rec) + "\n")
                if bar is not None:
                    bar.set_postfix(loss=f"{rec['loss']:.4f}", s_exp=f"{rec['expected_sparsity']:.3f}",
                                    s_hard=f"{rec['hard_sparsity']:.3f}", lam=f"{rec['lambda1']:.2f}")
                    bar.update(1)
                if self.cfg.checkpoint_every and self.step % self.cfg.checkpoint_every == 0 and self.step < self.cfg.steps:
                    mf.flush()
                    save_checkpoint(ckpt_dir, self)
        if bar is not None:
            bar.close()
        if self.cfg.refine_evals:
            self.refine()
        alloc = self.allocation()
        if not main:
            self.dist.barrier()  # rank 0 writes the outputs
            return alloc
        alloc.save(self.out_dir / "allocation.json")
        from safetensors.torch import save_file

        with atomic_path(self.out_dir / "gates.safetensors") as tmp:
            save_file({"log_alpha": self.gates.log_alpha.detach().cpu().contiguous()}, str(tmp))
        agree = self.cut_agreement()
        last_change, late_flips = self.cut_stability()
        if agree < AGREEMENT_WARN and self.step > 0:
            cut = "top-k cut" if self.budget is None else "budgeted assignment (units whose most likely span is the one assigned)"
            if last_change is not None and not late_flips:
                print(f"consa search: only {agree:.0%} of the gates agree with the {cut}, but the cut has not changed "
                      f"since step {last_change} of {self.step}: the ranking has settled, the gates have not separated",
                      file=sys.stderr, flush=True)
            else:
                moved = f" (the cut still moved {late_flips} units in the last fifth of the steps)" if late_flips else ""
                print(f"consa search: only {agree:.0%} of the gates agree with the {cut}: they have not separated "
                      f"yet, and more steps would likely change the allocation{moved} (--steps, or --until-agreement 1)",
                      file=sys.stderr, flush=True)
        summary = {"config": asdict(self.cfg), "seconds": time.time() - t0, "final": self.history[-1] if self.history else None,
                   "cut_agreement": agree, "cut_last_changed_step": last_change, "cut_flips_last_fifth": late_flips,
                   "steps_done": self.step, "extra_steps": max(0, self.step - self.cfg.steps),
                   "num_units": self.n_units, "num_swa": self.num_swa, "world_size": self.dist.world_size,
                   "native_windows": self.native,
                   "refine": self.refined.summary() if self.refined is not None else None}
        if self.budget is None:
            summary["cut_margin"] = cut_margin(self.gates.log_alpha, topk_swa(self.gates.log_alpha, self.num_swa))
        if self.cfg.init != "constant":
            summary["init_tokens"] = self.init_tokens
        if self.budget is not None or self.cfg.kv_budget is not None:
            summary["kv_share"] = alloc.kv_share(self.cfg.budget_context or self.cfg.seq_len)
        atomic_write_text(self.out_dir / "search.json", json.dumps(summary, indent=1) + "\n")
        self.dist.barrier()
        return alloc

    def cut_stability(self) -> tuple[int | None, int | None]:
        """(the last step whose update moved a unit across the top-k cut, units moved in the last fifth of
        the steps); (None, None) for a span search, which has no per-step cut."""
        flips = [(r["step"], r.get("cut_flips", 0)) for r in self.history if "cut_flips" in r]
        if not flips:
            return None, None
        changed = [st for st, n in flips if n]
        tail = flips[len(flips) - max(1, len(flips) // 5):]
        return (changed[-1] if changed else 0), sum(n for _, n in tail)

    @property
    def max_steps(self) -> int:
        return self.cfg.max_steps or 4 * self.cfg.steps

    def _extend(self, bar) -> bool:
        """Past the planned steps: one more step while the gates disagree with the cut (``until_agreement``)."""
        if not self.cfg.until_agreement or self.step >= self.max_steps:
            return False
        agree = self.cut_agreement()
        if agree >= self.cfg.until_agreement:
            return False
        if bar is not None and bar.total != self.max_steps:
            bar.total = self.max_steps
            bar.set_description(f"consa search (gates {agree:.0%} decided)")
            bar.refresh()
        return True

    def cut_agreement(self) -> float:
        """How far the top-k cut of the current gates only confirms their own decisions (``gates.cut_agreement``);
        with a span menu, the share of units whose most likely option is the one the budgeted assignment gives."""
        with torch.no_grad():
            if self.budget is not None:
                picks = B.assign(self.gates.option_scores().double().cpu().tolist(), self.budget.costs, self.budget.budget)
                return float((self.gates.most_likely().cpu() == torch.tensor(picks)).float().mean())
            return cut_agreement(self.gates.prob_nonzero(), topk_swa(self.gates.log_alpha, self.num_swa))

    # held-out batches for refinement: steps the search never reaches (batch_fn is pure in the step)
    HELD_OUT_STEP = 1_000_000_007

    @torch.no_grad()
    def _held_out_batches(self) -> list:
        """The held-out (batch, teacher logits) pairs, built once."""
        if not hasattr(self, "_held_out"):
            self._held_out = []
            for i in range(self.cfg.refine_batches):
                batch = self.dist.local_batch(self.batch_fn(self.HELD_OUT_STEP + i))
                batch = {k: (v.to(self.device) if torch.is_tensor(v) else v) for k, v in batch.items()}
                self._held_out.append((batch, self._teacher_logits(batch)))
        return self._held_out

    @staticmethod
    def _mask(batch):
        mask = batch.get("loss_mask")
        return batch.get("attention_mask") if mask is None else mask

    @torch.no_grad()
    def held_out_kl(self, fa_bits: list[bool]) -> float:
        """Mean KL(full ‖ binary allocation ``fa_bits``) over the held-out batches, through the gated
        attention with z ∈ {0, 1} (exactly the hybrid). Teacher logits are computed once and kept."""
        held_out = self._held_out_batches()  # first: the teacher pass resets the mixing weights
        total = torch.zeros(2, dtype=torch.float64, device=self.device)
        self.mix.z = self._unit_to_heads(torch.tensor(fa_bits, dtype=torch.float32, device=self.device))
        for batch, teacher in held_out:
            s, n = kl_sum(forward_logits(self.model, batch), teacher, self._mask(batch), self.cfg.temperature)
            total += torch.stack([s.double(), n.double()])
        self.dist.all_reduce_sum_(total)
        return float(total[0] / total[1].clamp_min(1.0))

    def held_out_flip_estimate(self, fa_bits: list[bool]) -> list[float]:
        """First-order change of :meth:`held_out_kl` when each unit alone flips side: with g = ∂KL/∂z at the
        binary allocation, −g for an FA unit (z 1 → 0) and +g for an SWA unit (0 → 1). One backward pass
        over the held-out batches for every unit at once, where measuring the flips costs a forward each."""
        held_out = self._held_out_batches()  # first: the teacher pass resets the mixing weights
        z = torch.tensor(fa_bits, dtype=torch.float32, device=self.device, requires_grad=True)
        count = torch.zeros(1, dtype=torch.float64, device=self.device)
        with torch.enable_grad():
            for batch, teacher in held_out:
                # per batch: each backward frees the graph of the unit → head map (an index op with native layers)
                self.mix.z = self._unit_to_heads(z)
                s, n = kl_sum(forward_logits(self.model, batch), teacher, self._mask(batch), self.cfg.temperature)
                s.backward()
                count += n.double()
        self.mix.z = None
        grad = z.grad.detach().double() if z.grad is not None else torch.zeros(len(fa_bits), dtype=torch.float64, device=self.device)
        self.dist.all_reduce_sum_(grad)
        self.dist.all_reduce_sum_(count)
        g = (grad / count.clamp_min(1.0)).cpu().tolist()
        return [-x if f else x for x, f in zip(g, fa_bits)]

    refined: RefineResult | None = None

    def refine(self) -> RefineResult:
        """Swaps across the top-k cut that lower the held-out KL of the binary allocation (``refine.py``)."""
        was_training = self.model.training
        self.model.eval()
        try:
            self.refined = refine_cut(self.gates.log_alpha, topk_swa(self.gates.log_alpha, self.num_swa), self.held_out_kl,
                                      candidates=self.cfg.refine_candidates, max_evals=self.cfg.refine_evals,
                                      order=self.cfg.refine_order, flip_estimate=self.held_out_flip_estimate)
        finally:
            self.model.train(was_training)
        return self.refined

    def allocation(self) -> Allocation:
        if self.budget is not None:
            meta = {"method": f"consa-{self.cfg.granularity}", "kv_budget_target": self.cfg.kv_budget,
                    "log_alpha": [[round(float(x), 4) for x in row] for row in self.gates.log_alpha.detach().cpu()],
                    "steps": self.step, "seed": self.cfg.seed}
            return B.budget_allocation(self.budget, self.gates.option_scores().double().cpu().tolist(), self.cfg.granularity,
                                       self.shape, self.cfg.sinks, meta, native=self.native)
        fa = self.refined.fa if self.refined is not None else topk_swa(self.gates.log_alpha, self.num_swa)
        meta = {"method": f"consa-{self.cfg.granularity}", "sparsity_target": self.cfg.sparsity if self.cfg.sparsity is not None else self.num_swa / self.n_units,
                "log_alpha": [round(float(x), 4) for x in self.gates.log_alpha.detach().cpu()], "steps": self.step,
                "seed": self.cfg.seed}
        if self.refined is not None:
            meta["refine"] = self.refined.summary()
        return Allocation.from_units(fa, self.cfg.granularity, self.shape, self.cfg.window, self.cfg.sinks, meta, native=self.native)


def run_search(model, cfg: SearchConfig, batch_fn: BatchFn, out_dir, resume: bool = False, progress: bool = True) -> Allocation:
    return Search(model, cfg, batch_fn, out_dir, progress).run(resume=resume)
