"""Heal: a short fine-tune of the hybrid model under its fixed allocation.

After the cut the model is served with the allocation's kernels (SWA heads see the last W keys plus
the sinks). Healing trains it *under that same attention* (``apply_allocation``: the eval and serving
semantics, sinks included) to match the frozen full-attention model: loss = KL(teacher ‖ student) on
next-token logits (+ ``lm_weight`` × LM loss), the same objective and code as the search
(``losses.global_task_loss``). The allocation itself never changes.

Teacher: with LoRA, the same weights with the adapter disabled and every layer switched back to the
attention the model was trained with (full; a native sliding layer keeps its window) for the teacher
pass, so no second copy sits in memory; with full-weight training the student's weights move, so the
teacher is a frozen copy.

Resume is bit-exact: batches and the learning rate are pure functions of the step, dropout is off,
and the checkpoint holds the trainable weights and the optimiser state (safetensors on one process,
DCP shards on several, like the search's). Multi-process runs shard student and teacher with FSDP2
(``distributed.shard``); the final weights are gathered on rank 0, which writes the output.

Output: ``out`` becomes a head-wise consa export (``export.export``, mode ``heads``: the allocation in
config.json, heads reordered FA-first) that ``consa.load``, ``consa eval`` (which scores the stored
allocation) and ``consa export`` take, plus ``allocation.json`` (in the export's head order), ``heal.json`` and
``metrics.jsonl``. A LoRA run with ``merge=False`` writes the PEFT adapter (``out/adapter``) instead of
a model, for the original model and head order; ``heal.json`` names the base model directory, so
``consa.load(out)`` (``consa.lora_weights.load_unmerged``) rebuilds the healed model from the two.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import torch

from ..allocation import Allocation
from ..errors import ConsaError
from ..files import atomic_write_text
from ..attention.plan import LayerPlan
from ..models import apply_allocation, attention_modules, detach, model_shape, native_windows
from .accumulate import backward_micro_batches, batch_rows
from .checkpoint import dcp_state, model_fingerprint, opt_join, opt_split, read_meta, staged_checkpoint, trainable_tensors
from .distributed import Dist
from .losses import forward_logits, global_task_loss
from .search import prepare_student

BatchFn = Callable[[int], dict]
# settings a resumed heal must share with the checkpoint (the rest, e.g. checkpoint_every, may change)
_COMPAT_KEYS = ("steps", "seq_len", "lr", "lora_rank", "kl_weight", "lm_weight", "temperature", "warmup_frac", "clip", "seed")


@dataclass
class HealConfig:
    steps: int
    seq_len: int
    lr: float = 1e-5
    lora_rank: int = 0  # 0: every weight trains (teacher = frozen copy); r > 0: LoRA of rank r (PEFT)
    merge: bool = True  # LoRA: merge the adapter into the weights of the written model
    kl_weight: float = 1.0
    lm_weight: float = 0.0
    temperature: float = 1.0
    warmup_frac: float = 0.1  # linear warm-up over this share of the steps, then cosine down to lr / 10
    clip: float = 1.0  # gradient-norm clipping (0: off)
    checkpoint_every: int = 50
    seed: int = 0
    backend: str = "auto"  # consa attention kernels (as in eval)
    autocast: str = "auto"  # auto: bf16 autocast over fp32 weights on CUDA; bf16; none
    micro_batch: int = 0  # sequences per forward pass on each process (exact accumulation, accumulate.py); 0: all

    @property
    def train_weights(self) -> str:
        return "lora" if self.lora_rank else "full"

    def validate(self) -> None:
        for name in ("steps", "seq_len"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConsaError(f"{name} must be an integer >= 1, got {v!r}")
        if not isinstance(self.lora_rank, int) or self.lora_rank < 0:
            raise ConsaError(f"lora rank must be an integer >= 0 (0: train every weight), got {self.lora_rank!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConsaError(f"lr must be a positive number, got {self.lr!r}")
        if self.kl_weight < 0 or self.lm_weight < 0 or self.kl_weight + self.lm_weight <= 0:
            raise ConsaError("kl_weight and lm_weight must be >= 0, and not both 0 (nothing to train on)")
        if not 0 <= self.warmup_frac <= 1:
            raise ConsaError(f"warmup_frac must be in [0, 1], got {self.warmup_frac!r}")
        if self.clip < 0 or self.temperature <= 0 or self.checkpoint_every < 0:
            raise ConsaError("clip and checkpoint_every must be >= 0 and temperature > 0")
        if self.autocast not in ("auto", "bf16", "none"):
            raise ConsaError(f"autocast must be auto, bf16 or none, got {self.autocast!r}")
        if not isinstance(self.micro_batch, int) or self.micro_batch < 0:
            raise ConsaError(f"micro_batch must be an integer >= 0 (0: the whole local batch at once), got {self.micro_batch!r}")

    def lr_at(self, step: int) -> float:
        """Linear warm-up, then cosine to lr / 10: a pure function of the step (nothing to checkpoint)."""
        warm = max(1, round(self.warmup_frac * self.steps))
        if step < warm:
            return self.lr * (step + 1) / warm
        frac = (step - warm) / max(1, self.steps - warm)
        return self.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


def steps_for_tokens(tokens: int, batch_size: int, seq_len: int) -> int:
    """Steps of ``batch_size`` × ``seq_len`` tokens that cover ``tokens`` (at least one)."""
    if tokens < 1:
        raise ConsaError(f"tokens must be >= 1, got {tokens}")
    return max(1, math.ceil(tokens / (batch_size * seq_len)))


def check_out(out_dir: Path, resume: bool, world_size: int = 1) -> None:
    """What needs no model: an unfinished heal to resume (of this world size), or an empty ``out``."""
    out_dir, ckpt = Path(out_dir), Path(out_dir) / "checkpoint"
    if resume:
        if (out_dir / "heal.json").is_file():
            raise ConsaError(f"--resume: the heal in {out_dir} has already finished")
        if not (ckpt / "state.json").is_file():
            raise ConsaError(f"--resume: no checkpoint in {ckpt}")
        saved = int(read_meta(ckpt).get("world_size", 1))
        if saved != world_size:
            raise ConsaError(f"checkpoint {ckpt} was written by a heal on {saved} process(es), this one runs on "
                             f"{world_size}; resume with --nproc {saved}")
    elif out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ConsaError(f"output {out_dir} already exists and is not an empty folder "
                         "(--resume continues an unfinished heal there)")


class Heal:
    """One heal run; :meth:`run` trains, writes ``out_dir`` and returns the healed model (on rank 0).

    The returned model has the allocation applied in the original head order (LoRA merged when
    ``cfg.merge``); ``dist`` makes this one rank of a torchrun job, as in :class:`~.search.Search`.
    """

    def __init__(self, model, allocation: Allocation, cfg: HealConfig, batch_fn: BatchFn, out_dir: str | Path,
                 progress: bool = True, dist: Dist | None = None, source_dir: str | Path | None = None):
        cfg.validate()
        allocation.check_matches(model_shape(model))
        if allocation.window >= cfg.seq_len:
            raise ConsaError(f"the allocation's window {allocation.window} is not smaller than the training sequence "
                             f"length {cfg.seq_len}: SWA would equal full attention and there is nothing to heal")
        self.dist = dist if dist is not None else Dist(device=next(model.parameters()).device)
        self.cfg, self.allocation, self.batch_fn = cfg, allocation, batch_fn
        self.out_dir, self.source_dir = Path(out_dir), source_dir
        self.progress = progress and self.dist.is_main
        self.shape = model_shape(model)
        self.fingerprint = model_fingerprint(model)
        dtype = next(model.parameters()).dtype
        torch.manual_seed(cfg.seed)
        self.teacher = None
        if not cfg.lora_rank:  # the student's weights move: the teacher must be a frozen copy
            self.teacher = copy.deepcopy(model).eval().requires_grad_(False)
            detach(self.teacher)
        # the LoRA teacher pass attends as the model was trained: full, or a layer's native window
        native = native_windows(model)
        apply_allocation(model, allocation, backend=cfg.backend)
        self.attn = attention_modules(model)  # before PEFT wraps the model: the modules stay the same objects
        self.teacher_plans = [LayerPlan(row, self.shape.num_kv_heads, w, 0, "fixed") if w is not None
                              else replace(m.consa_plan, mode="full") for row, (m, w) in enumerate(zip(self.attn, native))]
        self.model = prepare_student(model, cfg.train_weights, cfg.lora_rank)
        self.shell = None
        mp = False
        if self.dist.enabled:
            from .distributed import shard_pair

            # rank 0 keeps an unsharded CPU copy to gather the final weights into
            self.shell = copy.deepcopy(self.model) if self.dist.is_main else None
            mp = self.dist.device.type == "cuda" and dtype == torch.float32  # fp32 masters, bf16 compute
            self.model, self.teacher = shard_pair(self.model, self.teacher, self.dist, mp)
            self.device = self.dist.device
        else:
            self.device = next(model.parameters()).device
        on = cfg.autocast == "bf16" or (cfg.autocast == "auto" and self.device.type == "cuda" and dtype == torch.float32 and not mp)
        self.autocast = (lambda: torch.autocast(self.device.type, dtype=torch.bfloat16)) if on else nullcontext
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.wopt = torch.optim.Adam(self.params, lr=cfg.lr)
        self.step = 0
        self.history: list[dict] = []

    # ---- one step -----------------------------------------------------------------------------
    @contextmanager
    def _as_teacher(self):
        """LoRA only: adapter off and every layer attending as the model was trained, for the teacher pass."""
        plans = [m.consa_plan for m in self.attn]
        for m, p in zip(self.attn, self.teacher_plans):
            m.consa_plan = p
        try:
            with self.model.disable_adapter():
                yield
        finally:
            for m, p in zip(self.attn, plans):
                m.consa_plan = p

    def _teacher_logits(self, batch):
        with torch.no_grad():
            if self.teacher is not None:
                return forward_logits(self.teacher, batch)
            with self._as_teacher():
                return forward_logits(self.model, batch)

    def train_step(self) -> dict:
        cfg, step = self.cfg, self.step
        batch = self.dist.local_batch(self.batch_fn(step))
        batch = {k: (v.to(self.device) if torch.is_tensor(v) else v) for k, v in batch.items()}
        loss_mask = batch.get("loss_mask")
        if loss_mask is None:
            loss_mask = batch.get("attention_mask")
        lr = cfg.lr_at(step)
        for g in self.wopt.param_groups:
            g["lr"] = lr
        if 0 < cfg.micro_batch < batch_rows(batch):
            def forward(chunk):
                with self.autocast():
                    teacher = self._teacher_logits(chunk) if cfg.kl_weight > 0 else None
                    return forward_logits(self.model, chunk), teacher

            self.wopt.zero_grad(set_to_none=True)
            task = backward_micro_batches(batch, cfg.micro_batch, forward, cfg, self.dist)
        else:
            with self.autocast():
                teacher = self._teacher_logits(batch) if cfg.kl_weight > 0 else None
                logits = forward_logits(self.model, batch)
            loss, task = global_task_loss(logits, teacher, batch, loss_mask, cfg, self.dist)
            self.wopt.zero_grad(set_to_none=True)
            if math.isfinite(task):
                loss.backward()
        if not math.isfinite(task):
            raise ConsaError(f"heal loss became {task} at step {step}; no model was written (lower --lr or check the data)")
        rec = {"step": step, "loss": task, "lr": lr}
        norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.clip) if cfg.clip else None
        self.wopt.step()
        if norm is not None:  # read on the host only once the optimiser step is queued
            rec["grad_norm"] = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        self.history.append(rec)
        self.step += 1
        return rec

    # ---- whole run ----------------------------------------------------------------------------
    def run(self, resume: bool = False):
        d, ckpt = self.dist, self.out_dir / "checkpoint"
        check_out(self.out_dir, resume, d.world_size)
        made_out = not self.out_dir.exists()
        if resume:
            self._load(ckpt)
        d.barrier()
        if d.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        d.barrier()
        try:
            return self._train_and_write(ckpt, resume)
        except BaseException:
            # nothing half-written: a run that never checkpointed leaves no trace of itself
            if d.is_main and made_out and not (ckpt / "state.json").is_file():
                shutil.rmtree(self.out_dir, ignore_errors=True)
            raise

    def _train_and_write(self, ckpt: Path, resume: bool):
        d, t0 = self.dist, time.time()
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.cfg.steps, initial=self.step, desc="consa heal", dynamic_ncols=True)
        with (open(self.out_dir / "metrics.jsonl", "a" if resume else "w") if d.is_main else open(os.devnull, "w")) as mf:
            while self.step < self.cfg.steps:
                rec = self.train_step()
                mf.write(json.dumps(rec) + "\n")
                if bar is not None:
                    bar.set_postfix(kl=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.1e}")
                    bar.update(1)
                if self.cfg.checkpoint_every and self.step % self.cfg.checkpoint_every == 0 and self.step < self.cfg.steps:
                    mf.flush()
                    self._save(ckpt)
        if bar is not None:
            bar.close()
        model = self.final_model()
        if d.is_main:
            self._write(model, time.time() - t0)
        d.barrier()
        return model

    def final_model(self):
        """The healed model, unsharded, LoRA merged when ``cfg.merge`` (None on ranks other than 0)."""
        model = self.model
        if self.dist.enabled:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            if not self.dist.is_main:
                return None
            self.shell.load_state_dict(full)
            model = self.shell
        if self.cfg.lora_rank and self.cfg.merge:
            model = model.merge_and_unload()
        return model.eval()

    def _write(self, model, seconds: float) -> None:
        out, st = self.out_dir, self.allocation.stats()
        summary = {"config": asdict(self.cfg), "seconds": round(seconds, 2), "steps_done": self.step,
                   "first": self.history[0] if self.history else None, "final": self.history[-1] if self.history else None,
                   "allocation": {k: st[k] for k in ("granularity", "units", "swa_units", "window", "sinks")},
                   # absolute: load_unmerged finds the base from any working directory
                   "source_model": str(Path(self.source_dir).resolve()) if self.source_dir else None,
                   "model_fingerprint": self.fingerprint, "world_size": self.dist.world_size}
        if self.cfg.lora_rank and not self.cfg.merge:
            adapter = out / "adapter"
            shutil.rmtree(adapter, ignore_errors=True)
            model.save_pretrained(str(adapter), safe_serialization=True)
            self.allocation.save(out / "allocation.json")
        else:
            from ..export import export, read_export

            tmp = out / ".model.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            export(model, self.allocation, tmp, mode="heads", source_dir=self.source_dir)
            stored = read_export(tmp)[2]
            stored = Allocation.from_dict({**stored.to_dict(), "meta": {**stored.meta, "healed": True}})
            for f in sorted(tmp.iterdir(), key=lambda f: f.name == "config.json"):  # config.json last
                os.replace(f, out / f.name)
            tmp.rmdir()
            stored.save(out / "allocation.json")
        atomic_write_text(out / "heal.json", json.dumps(summary, indent=1) + "\n")  # marks the heal finished
        shutil.rmtree(out / "checkpoint", ignore_errors=True)

    # ---- checkpoints --------------------------------------------------------------------------
    def _save(self, ckpt_dir: Path) -> None:
        """Weights + optimiser + step, written beside the old checkpoint and swapped in by rename."""
        with staged_checkpoint(ckpt_dir, self.dist) as tmp:
            self._write_state(tmp)

    def _write_state(self, tmp: Path) -> None:
        from safetensors.torch import save_file

        d = self.dist
        if d.enabled:  # collective: every rank writes its shards
            import torch.distributed.checkpoint as dcp

            dcp.save(dcp_state(self), checkpoint_id=str(tmp / "weights"))
        if d.is_main:
            meta = {"kind": "heal", "step": self.step, "config": asdict(self.cfg), "allocation": self.allocation.to_dict(),
                    "shape": [self.shape.num_layers, self.shape.num_kv_heads, self.shape.num_q_heads],
                    "model": self.fingerprint, "world_size": d.world_size, "weights": "dcp" if d.enabled else "inline"}
            tensors = {}
            if not d.enabled:
                tensors.update(trainable_tensors(self))
                opt_t, meta["weight_optimizer"] = opt_split(self.wopt, "wopt")
                tensors.update(opt_t)
            save_file(tensors, str(tmp / "state.safetensors"))
            (tmp / "state.json").write_text(json.dumps(meta, indent=1))

    def _load(self, ckpt_dir: Path) -> None:
        from safetensors.torch import load_file

        meta = read_meta(ckpt_dir)
        if meta.get("kind") != "heal":
            raise ConsaError(f"{ckpt_dir} is not a heal checkpoint")
        if meta.get("model") != self.fingerprint:
            raise ConsaError(f"checkpoint {ckpt_dir} was made from another model; resume with the same --model")
        if Allocation.from_dict(meta["allocation"]) != self.allocation:
            raise ConsaError(f"checkpoint {ckpt_dir} was made under another allocation; resume with the same --allocation")
        cfg = asdict(self.cfg)
        diff = [k for k in _COMPAT_KEYS if meta["config"].get(k) != cfg.get(k)]
        if diff:
            raise ConsaError(f"checkpoint {ckpt_dir} was made with other settings ({', '.join(diff)}); rerun with the same ones")
        try:
            tensors = load_file(str(ckpt_dir / "state.safetensors"))
        except (OSError, ValueError) as e:
            raise ConsaError(f"cannot read checkpoint {ckpt_dir}: {e}") from None
        if meta["weights"] == "inline":
            params = dict(self.model.named_parameters())
            with torch.no_grad():
                for key, v in tensors.items():
                    if key.startswith("w."):
                        params[key[2:]].copy_(v.to(params[key[2:]].device))
            opt_join(self.wopt, tensors, meta["weight_optimizer"], "wopt")
        else:
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

            state = dcp_state(self)
            dcp.load(state, checkpoint_id=str(ckpt_dir / "weights"))
            opts = StateDictOptions(ignore_frozen_params=True, strict=False)
            set_model_state_dict(self.model, state["model"], options=opts)
            set_optimizer_state_dict(self.model, self.wopt, state["optim"], options=opts)
        self.step = int(meta["step"])
        metrics = self.out_dir / "metrics.jsonl"
        if metrics.exists():  # drop steps logged after the checkpoint: they run again
            keep = [ln for ln in metrics.read_text().splitlines() if ln and json.loads(ln)["step"] < self.step]
            self.history = [json.loads(ln) for ln in keep]
            if self.dist.is_main:
                atomic_write_text(metrics, "".join(ln + "\n" for ln in keep))


def heal(model, allocation, batches, out, *, steps: int | None = None, tokens: int | None = None, seq_len: int | None = None,
         batch_size: int = 4, retrieval_mix: float = 0.0, resume: bool = False, progress: bool = True, **settings):
    """Fine-tune ``model`` under the fixed ``allocation`` towards its own full-attention outputs; write ``out``.

    ``model``: a loaded HF causal LM (trained in place) or a model directory; ``allocation``: an
    :class:`Allocation` or its JSON file; ``batches``: a function step -> ``{"input_ids": …}`` (pure in the
    step) or a corpus directory from ``consa data build`` (``batch_size`` × ``seq_len`` windows, with
    ``retrieval_mix`` of the rows synthetic retrieval sequences). Give ``steps`` or ``tokens``.
    ``settings``: the other :class:`HealConfig` fields (``lr``, ``lora_rank``, ``merge``, ``lm_weight``, …).
    Returns the healed model (allocation applied; consa.load(out) gives the same model back).
    """
    if (steps is None) == (tokens is None):
        raise ConsaError("give steps or tokens (exactly one)")
    source_dir = None
    if isinstance(model, (str, os.PathLike)):
        from ..models import load_model

        source_dir = model
        model = load_model(model, dtype=torch.float32, device="cuda" if torch.cuda.is_available() else "cpu")
    if not isinstance(allocation, Allocation):
        allocation = Allocation.load(allocation)
    if callable(batches):
        first = batches(0)["input_ids"]
        seq_len = seq_len or first.shape[1]
        per_step = first.numel()
    else:
        from ..data.batches import corpus_batches

        if seq_len is None:
            raise ConsaError("seq_len is needed to cut corpus windows")
        batches = corpus_batches(batches, batch_size, seq_len, settings.get("seed", 0), retrieval_mix=retrieval_mix,
                                 vocab_size=model.config.get_text_config().vocab_size)
        per_step = batch_size * seq_len
    if tokens is not None:
        steps = steps_for_tokens(tokens, per_step, 1)
    cfg = HealConfig(steps=steps, seq_len=seq_len, **settings)
    return Heal(model, allocation, cfg, batches, out, progress=progress, source_dir=source_dir).run(resume=resume)
