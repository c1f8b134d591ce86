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
from pathlib import Path
from typing import Callable

import torch

from ..allocation import Allocation, AllocationError, swa_count
from .. import budget as B
from ..files import atomic_path, atomic_write_text
from ..constraint import ControllerConfig, SparsityController
from ..errors import ConsaError
from ..interrupts import interrupt_point
from ..gates import HardConcreteGates, SpanGates, cut_agreement, cut_margin, topk_swa
from ..models import attach_gates, model_shape, native_plans, native_windows, searchable_native
from .accumulate import backward_micro_batches, batch_rows
# the losses live in losses.py; older callers import them from here
from .losses import answer_positions, forward_logits, global_task_loss, kl_loss, kl_sum, lm_sum, task_terms  # noqa: F401
from .checkpoint import check_resumable, load_checkpoint, model_fingerprint, save_checkpoint
from .distributed import Dist
from . import schedules
from .refine import RefineResult, refine_cut
from .search_config import AUTO_REFINE_EVALS, SearchConfig  # noqa: F401  (the search's settings; importable from here)

BatchFn = Callable[[int], dict]


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
        self.native = searchable_native(model, cfg.target.reopen_native)
        trained = native_windows(model)
        self.reopened = trained if cfg.target.reopen_native and any(w is not None for w in trained) else None
        self.free_layers = [i for i, w in enumerate(self.native) if w is None]
        self.n_units = len(Allocation.free_units(self.native, cfg.target.granularity, self.shape.num_kv_heads))
        self.budget, target = self._budget()
        self.num_swa = swa_count(target, self.n_units) if self.budget is None else None
        self.init_scores, self.init_tokens = None, 0
        if cfg.gates.init != "constant":  # on the bare model, before anything is attached
            if self.dist.enabled:
                raise ConsaError(f"init {cfg.gates.init} runs on one process only; use init constant under torchrun")
            self.init_scores, self.init_tokens = schedules.init_scores(model, cfg, batch_fn, self.num_swa)
        torch.manual_seed(cfg.seed)
        self.teacher = None
        if cfg.weights.train != "none":
            self.teacher = copy.deepcopy(model).eval().requires_grad_(False)
        self.model = self._prepare_student(model)
        self.mix = attach_gates(self.model, cfg.target.window, cfg.target.sinks, backend=cfg.backend, reopen_native=cfg.target.reopen_native,
                                menu=self.budget.menu if self.budget is not None else None)
        if self.dist.enabled:
            from .distributed import shard_pair

            # fp32 weights that train on GPU: keep fp32 masters, compute in bf16
            mp = self.dist.device.type == "cuda" and cfg.weights.train != "none" and next(model.parameters()).dtype == torch.float32
            self.model, self.teacher = shard_pair(self.model, self.teacher, self.dist, mp)
            self.device = self.dist.device
        else:
            self.device = next(model.parameters()).device
        if self.budget is None:
            self.gates = HardConcreteGates(self.n_units, cfg.gates.init_log_alpha).to(self.device)
        else:
            self.gates = SpanGates(torch.tensor(self.budget.unit_cost_shares()), cfg.gates.init_log_alpha).to(self.device)
        if self.init_scores is not None:
            with torch.no_grad():
                self.gates.log_alpha.copy_(schedules.rank_init(self.init_scores, cfg.gates.init_log_alpha, cfg.gates.init_spread))
        # Gates and weights get separate optimisers: the gates' is replicated, the weights' sharded.
        self.opt = torch.optim.Adam([{"params": [self.gates.log_alpha], "lr": cfg.gates.lr}])
        weights = [p for p in self.model.parameters() if p.requires_grad]
        self.wopt = torch.optim.Adam([{"params": weights, "lr": cfg.weights.lr}]) if weights else None
        warmup = int(round(cfg.constraint.warmup_frac * cfg.schedule.steps))
        self.controller = SparsityController(ControllerConfig(target, warmup, cfg.constraint.controller))
        self.gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
        self.step = 0
        self.history: list[dict] = []
        self._cut = None  # the top-k cut after the last step (single-window searches)

    def _prepare_student(self, model):
        return prepare_student(model, self.cfg.weights.train, self.cfg.weights.lora_rank)

    def _budget(self):
        """(the span problem of a multi-option search or None, the controller's target): a share of SWA
        units, or under a KV budget the saving 1 − budget (spans) or the unit share that meets it."""
        cfg = self.cfg
        if cfg.target.kv_budget is None:
            return None, cfg.target.sparsity
        menu = cfg.target.menu() or (cfg.target.window, None)
        try:
            prob = B.problem(self.shape, cfg.target.granularity, menu, cfg.target.kv_budget, cfg.target.budget_context or cfg.seq_len,
                             cfg.target.sinks, self.native)
        except AllocationError as e:
            raise ConsaError(str(e)) from None
        if cfg.target.menu() is not None:
            return prob, prob.saving_target()
        k = B.swa_units_for_budget(prob)
        if k >= self.n_units:
            raise ConsaError(f"a KV budget of {cfg.target.kv_budget:g} leaves no unit on full attention at window {cfg.target.window}: "
                             "use a smaller window, a span menu (--spans), or a larger budget")
        return None, k / self.n_units

    # ---- one step -----------------------------------------------------------------------------
    def _unit_to_heads(self, z: torch.Tensor) -> torch.Tensor:
        if getattr(self, "_free_idx", None) is None or self._free_idx.device != z.device:  # once, not every step
            self._free_idx = torch.tensor(self.free_layers, device=z.device)
        return units_to_heads(z, self.cfg.target.granularity, self.shape, self._free_idx)

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
            teacher = self._teacher_logits(chunk) if self.cfg.loss.kl_weight > 0 else None  # sets mix.z = None
            self.mix.z = leaf
            return forward_logits(self.model, chunk), teacher

        self.opt.zero_grad(set_to_none=True)
        if self.wopt is not None:
            self.wopt.zero_grad(set_to_none=True)
        task = backward_micro_batches(batch, self.cfg.micro_batch, forward, self.cfg.loss, self.dist)
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
            teacher = self._teacher_logits(batch) if cfg.loss.kl_weight > 0 else None
            opts = self._apply_schedules(step)
            z = self.gates.sample(self.gen)
            self.mix.z = self._unit_to_heads(z if self.budget is None else SpanGates.weights(z))
            logits = forward_logits(self.model, batch)
            loss, task = self._global_task_loss(logits, teacher, batch, loss_mask)  # one process: world size 1
        if not math.isfinite(task):
            raise ConsaError(f"loss became {task} at step {step}; no allocation was written (lower --gate-lr or check the data)")
        s_hat = self.gates.expected_sparsity()
        total = loss + self.controller.penalty(s_hat, step)
        if cfg.gates.decide_weight and schedules.decide_active(step, cfg.schedule.steps, cfg.gates.decide_frac):
            decide = schedules.decide_penalty(self.gates.prob_nonzero())
            total = total + cfg.gates.decide_weight * decide
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
        if cfg.gates.beta_final is not None:
            self.gates.beta = out["beta"] = schedules.beta_at(step, cfg.schedule.steps, cfg.gates.beta_final)
        if cfg.gates.lr_final is not None:
            self.opt.param_groups[0]["lr"] = out["gate_lr"] = schedules.cosine_lr(step, cfg.schedule.steps, cfg.gates.lr, cfg.gates.lr_final)
        return out

    def _global_task_loss(self, logits, teacher, batch, loss_mask):
        """This rank's share of the global-mean task loss, scaled so that *averaged* gradients are exact.

        Each term is Σ_local / count_global; the count is all-reduced first. Multiplying by the world
        size makes the mean over ranks of the gradients (what FSDP and the gate all-reduce compute)
        the gradient of the global mean, the very loss a single process would use on the whole batch.
        """
        return global_task_loss(logits, teacher, batch, loss_mask, self.cfg.loss, self.dist)

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

            bar = tqdm(total=self.cfg.schedule.steps, initial=self.step, desc="consa search", dynamic_ncols=True)
        t0 = time.time()
        metrics_path = self.out_dir / "metrics.jsonl"
        mode = "a" if resume else "w"
        with (open(metrics_path, mode) if main else open(os.devnull, "w")) as mf:
            while self.step < self.cfg.schedule.steps or self._extend(bar):
                interrupt_point(f"step {self.step}")  # tests: a kill at a fixed step, not a race
                rec = self.train_step()
                mf.write(json.dumps(rec) + "\n")
                if bar is not None:
                    bar.set_postfix(loss=f"{rec['loss']:.4f}", s_exp=f"{rec['expected_sparsity']:.3f}",
                                    lam=f"{rec['lambda1']:.2f}", **self._outcome())
                    bar.update(1)
                if self.cfg.checkpoint_every and self.step % self.cfg.checkpoint_every == 0 and self.step < self.cfg.schedule.steps:
                    mf.flush()
                    save_checkpoint(ckpt_dir, self)
        if bar is not None:
            bar.close()
        if self.cfg.refine.evals:
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
        summary = {"config": self.cfg.to_dict(), "seconds": time.time() - t0, "final": self.history[-1] if self.history else None,
                   "cut_agreement": agree, "cut_last_changed_step": last_change, "cut_flips_last_fifth": late_flips,
                   "steps_done": self.step, "extra_steps": max(0, self.step - self.cfg.schedule.steps),
                   "num_units": self.n_units, "num_swa": self.num_swa, "world_size": self.dist.world_size,
                   "native_windows": self.native,
                   "refine": self.refined.summary() if self.refined is not None else None}
        if self.budget is None:
            summary["cut_margin"] = cut_margin(self.gates.log_alpha, topk_swa(self.gates.log_alpha, self.num_swa))
        if self.cfg.gates.init != "constant":
            summary["init_tokens"] = self.init_tokens
        if self.budget is not None or self.cfg.target.kv_budget is not None:
            summary["kv_share"] = alloc.kv_share(self.cfg.target.budget_context or self.cfg.seq_len)
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
        return self.cfg.schedule.max_steps or 4 * self.cfg.schedule.steps

    def _extend(self, bar) -> bool:
        """Past the planned steps: one more step while the gates disagree with the cut (``until_agreement``)."""
        if not self.cfg.schedule.until_agreement or self.step >= self.max_steps:
            return False
        agree = self.cut_agreement()
        if agree >= self.cfg.schedule.until_agreement:
            return False
        if bar is not None and bar.total != self.max_steps:
            bar.total = self.max_steps
            bar.set_description(f"consa search (gates {agree:.0%} decided)")
            bar.refresh()
        return True

    def _outcome(self) -> dict:
        """What the bar shows of what the user will get: the cut the allocation is made from (its SWA units of
        all, exact by construction; for a span search the KV share of the budgeted assignment, refreshed every
        10 steps as it costs a knapsack) and the share of gates that already agree with it. Not the gates' own
        hard decisions (``hard_sparsity`` in metrics.jsonl): once the constraint has pushed every gate's
        P(z > 0) below 1/2 they read 1.000 next to a 6/8 cut."""
        if self.budget is None:
            return {"swa": f"{self.num_swa}/{self.n_units}", "agree": f"{self.cut_agreement():.2f}"}
        if self.step % 10 == 1 or self.step >= self.cfg.schedule.steps or not hasattr(self, "_shown"):
            with torch.no_grad():
                picks = B.assign(self.gates.option_scores().double().cpu().tolist(), self.budget.costs, self.budget.budget)
            held = self.budget.fixed + sum(self.budget.costs[u][o] for u, o in enumerate(picks))
            self._shown = {"kv": f"{held / self.budget.full:.3f}", "agree": f"{self.cut_agreement():.2f}"}
        return self._shown

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
            for i in range(self.cfg.refine.batches):
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
            s, n = kl_sum(forward_logits(self.model, batch), teacher, self._mask(batch), self.cfg.loss.temperature)
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
                s, n = kl_sum(forward_logits(self.model, batch), teacher, self._mask(batch), self.cfg.loss.temperature)
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
        objective, bar = self.held_out_kl, None
        if self.progress:  # refinement can take as long as a short search: show its evaluations too
            from tqdm.auto import tqdm

            bar = tqdm(total=self.cfg.refine.evals, desc="consa refine (held-out KL)", unit="eval", dynamic_ncols=True)
            best = [math.inf]

            def objective(fa_bits):
                kl = self.held_out_kl(fa_bits)
                best[0] = min(best[0], kl)
                bar.set_postfix(kl=f"{best[0]:.4g}", refresh=False)
                bar.update(1)
                return kl
        try:
            self.refined = refine_cut(self.gates.log_alpha, topk_swa(self.gates.log_alpha, self.num_swa), objective,
                                      candidates=self.cfg.refine.candidates, max_evals=self.cfg.refine.evals,
                                      order=self.cfg.refine.order, flip_estimate=self.held_out_flip_estimate)
        finally:
            self.model.train(was_training)
            if bar is not None:
                if self.refined is not None:  # it stops early once no swap helps: the bar ends full
                    bar.total = bar.n
                    bar.set_postfix(kl=f"{self.refined.kl_after:.4g}", swaps=len(self.refined.swaps))
                bar.close()
        return self.refined

    def allocation(self) -> Allocation:
        if self.budget is not None:
            meta = {"method": f"consa-{self.cfg.target.granularity}", "kv_budget_target": self.cfg.target.kv_budget,
                    "log_alpha": [[round(float(x), 4) for x in row] for row in self.gates.log_alpha.detach().cpu()],
                    "steps": self.step, "seed": self.cfg.seed}
            return B.budget_allocation(self.budget, self.gates.option_scores().double().cpu().tolist(), self.cfg.target.granularity,
                                       self.shape, self.cfg.target.sinks, meta, native=self.native)
        fa = self.refined.fa if self.refined is not None else topk_swa(self.gates.log_alpha, self.num_swa)
        meta = {"method": f"consa-{self.cfg.target.granularity}", "sparsity_target": self.cfg.target.sparsity if self.cfg.target.sparsity is not None else self.num_swa / self.n_units,
                "log_alpha": [round(float(x), 4) for x in self.gates.log_alpha.detach().cpu()], "steps": self.step,
                "seed": self.cfg.seed}
        if self.refined is not None:
            meta["refine"] = self.refined.summary()
        return Allocation.from_units(fa, self.cfg.target.granularity, self.shape, self.cfg.target.window, self.cfg.target.sinks, meta, native=self.native)


def run_search(model, cfg: SearchConfig, batch_fn: BatchFn, out_dir, resume: bool = False, progress: bool = True) -> Allocation:
    return Search(model, cfg, batch_fn, out_dir, progress).run(resume=resume)
