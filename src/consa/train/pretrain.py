"""Pretrain a small full-attention Qwen3 base model from scratch on a consa corpus.

One function, :func:`pretrain`, does it: AdamW, linear warm-up then cosine decay, gradient
clipping, bf16 autocast and optional ``torch.compile`` of the decoder blocks (falls back to eager when
the compiler fails), a tqdm bar with loss and tokens/s,
periodic validation loss, atomic resumable checkpoints and a JSON log of wall time and throughput.

Output directory layout::

    OUT/                       the final model: config.json, model.safetensors, generation_config.json,
                               tokenizer files (copied from the corpus dir), pretrain_log.json
    OUT/checkpoint/            the latest resumable checkpoint: the same HF model files, plus
                               optimizer.safetensors, rng.safetensors and state.json (no pickle)

Determinism: the batch of step ``s`` is drawn from ``numpy.random.default_rng([seed, 0, s])``,
whatever happened before, so a run resumed from a checkpoint replays exactly the steps an
unbroken run would have taken (bit-identical on CPU; up to kernel non-determinism on GPU).

Batches come from a *batch source* (``consa.data.batches``): any callable ``(batch_size, seq_len, rng) -> LongTensor[B, T]``,
or a dict ``{"input_ids": LongTensor[B, T], "answer_mask": BoolTensor[B, T]}`` whose mask marks the
tokens that answer a retrieval question. The default draws windows of the corpus shards and, with
``retrieval_mix > 0``, replaces that share of rows by synthetic retrieval sequences (retrieval
never worked in a small base model whose pretraining had seen none).

``answer_weight`` adds ``answer_weight × mean cross-entropy over the answer tokens`` to the LM loss.
Why: in a 4K-token retrieval row only the 1–5 answer tokens need the long-range look-up, so under
the plain LM loss they carry ~0.1% of the gradient, and a 31M-parameter model learned the answers'
format but not the copy. The logged ``loss`` stays the plain LM loss.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..errors import ConsaError
from ..files import atomic_write_text, ordinary_modes, temp_dir
from ..presets import get_preset, preset_config
from .compile import compile_blocks, uncompile
from ..data.batches import BatchSource, MixedSource, corpus_source, open_shards, retrieval_source, split_batch

CHECKPOINT = "checkpoint"
LOG_FILE = "pretrain_log.json"
STATE_FILE = "state.json"
OPTIM_FILE = "optimizer.safetensors"
RNG_FILE = "rng.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "added_tokens.json", "chat_template.jinja", "tokenizer.model")
# fields that must not change when a run is resumed (they change the result)
_RESUME_FIXED = ("preset", "steps", "batch_size", "seq_len", "lr", "warmup", "min_lr_ratio", "weight_decay", "beta1",
                 "beta2", "grad_clip", "seed", "retrieval_mix", "grad_accum", "answer_weight", "retrieval_pairs",
                 "retrieval_queries", "retrieval_digits")
_RESUME_DEFAULTS = {"answer_weight": 0.0, "retrieval_pairs": 4, "retrieval_queries": 2, "retrieval_digits": 5}  # what checkpoints written before a field existed meant


# --------------------------------------------------------------------------------------- config

@dataclass
class PretrainConfig:
    """Everything that defines a pretraining run. ``None`` means "the preset's default".

    Give at most one of ``tokens`` / ``steps``; with neither, the preset's token budget is used.
    """

    corpus: str | Path
    out: str | Path
    preset: str = "tiny"
    tokens: int | None = None
    steps: int | None = None
    batch_size: int | None = None
    seq_len: int | None = None
    lr: float | None = None
    warmup: int | None = None  # steps; default 5% of the run (at most 1000)
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    grad_accum: int = 1  # micro-batches per step (the batch is split; same result, less memory)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: int | None = None  # CPU threads for torch (None: torch's default)
    compile: bool = False  # regional torch.compile of the decoder blocks (see train/compile.py)
    bf16: bool | None = None  # None: on for CUDA, off for CPU
    resume: bool = False
    seed: int = 0
    save_every: int | None = None  # steps; default ~10 checkpoints per run
    eval_every: int | None = None  # steps; default ~10 evaluations per run
    eval_batches: int = 4
    log_every: int = 10
    retrieval_mix: float = 0.0  # share of sequences that are synthetic retrieval
    retrieval_source: str = "builtin"  # builtin | tasks | auto (see retrieval_source())
    answer_weight: float = 0.0  # extra loss: weight × mean CE on retrieval answer tokens (module doc)
    retrieval_pairs: int = 4  # builtin source: "key -> value" statements per row ...
    retrieval_queries: int = 2  # ... and how many of them are asked back at the end
    retrieval_digits: int = 5  # digits of the values (builtin) / pass keys and values (tasks)
    time_limit: float | None = None  # seconds: checkpoint and stop cleanly (rerun with resume)
    stop_at: int | None = None  # step: stop there as at the time limit, the schedule still spans `steps`
    #                             (replicates a time-limited run exactly, e.g. on another seed or GPU)
    keep_checkpoint: bool = True
    progress: bool = True

    @classmethod
    def from_dict(cls, d: dict) -> "PretrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConsaError(f"unknown pretrain option(s): {', '.join(unknown)}")
        return cls(**d)


@dataclass
class _Resolved:
    """A config with every default filled in (what the run actually uses)."""

    preset: str
    steps: int
    batch_size: int
    seq_len: int
    lr: float
    warmup: int
    min_lr_ratio: float
    weight_decay: float
    beta1: float
    beta2: float
    grad_clip: float
    grad_accum: int
    seed: int
    retrieval_mix: float
    save_every: int
    eval_every: int
    eval_batches: int
    log_every: int
    device: str
    bf16: bool
    compile: bool
    answer_weight: float = 0.0
    retrieval_pairs: int = 4
    retrieval_queries: int = 2
    retrieval_digits: int = 5
    extra: dict = field(default_factory=dict)

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len


def _positive_int(name: str, v: Any, allow_none: bool = True) -> None:
    if v is None and allow_none:
        return
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ConsaError(f"{name} must be a positive integer, got {v!r}")


def resolve(cfg: PretrainConfig) -> _Resolved:
    """Validate ``cfg`` (raising ConsaError, touching no file) and fill in the defaults."""
    p = get_preset(cfg.preset)
    for name in ("tokens", "steps", "batch_size", "seq_len", "warmup", "save_every", "eval_every", "grad_accum",
                 "eval_batches", "log_every", "threads"):
        v = getattr(cfg, name)
        if name == "warmup" and v == 0:
            continue
        _positive_int(f"--{name.replace('_', '-')}", v)
    if cfg.tokens is not None and cfg.steps is not None:
        raise ConsaError("give --tokens or --steps, not both")
    if cfg.lr is not None and not (isinstance(cfg.lr, (int, float)) and cfg.lr > 0 and math.isfinite(cfg.lr)):
        raise ConsaError(f"--lr must be a positive number, got {cfg.lr!r}")
    if not 0.0 <= float(cfg.retrieval_mix) <= 1.0:
        raise ConsaError(f"--retrieval-mix must be in [0, 1], got {cfg.retrieval_mix!r}")
    aw = cfg.answer_weight
    if isinstance(aw, bool) or not isinstance(aw, (int, float)) or not (math.isfinite(aw) and aw >= 0):
        raise ConsaError(f"--answer-weight must be a number >= 0, got {aw!r}")
    _positive_int("--retrieval-pairs", cfg.retrieval_pairs, allow_none=False)
    _positive_int("--retrieval-queries", cfg.retrieval_queries, allow_none=False)
    if cfg.retrieval_queries > cfg.retrieval_pairs:
        raise ConsaError(f"--retrieval-queries {cfg.retrieval_queries} is more than --retrieval-pairs {cfg.retrieval_pairs}")
    if isinstance(cfg.retrieval_digits, bool) or cfg.retrieval_digits not in range(1, 10):
        raise ConsaError(f"--retrieval-digits must be an integer in 1..9, got {cfg.retrieval_digits!r}")
    if cfg.retrieval_source not in ("auto", "builtin", "tasks"):
        raise ConsaError(f"retrieval_source must be auto, builtin or tasks, got {cfg.retrieval_source!r}")
    if cfg.time_limit is not None and not cfg.time_limit > 0:
        raise ConsaError(f"--time-limit must be positive, got {cfg.time_limit!r}")
    _positive_int("--stop-at", cfg.stop_at, allow_none=True)
    batch = cfg.batch_size or p.batch_size
    seq = cfg.seq_len or p.context
    if batch % cfg.grad_accum:
        raise ConsaError(f"--batch-size {batch} is not divisible by --grad-accum {cfg.grad_accum}")
    if cfg.steps is not None:
        steps = cfg.steps
    else:
        steps = max(1, math.ceil((cfg.tokens or p.tokens) / (batch * seq)))
    warmup = cfg.warmup if cfg.warmup is not None else max(1, min(1000, round(0.05 * steps)))
    device = _resolve_device(cfg.device)
    bf16 = device.startswith("cuda") if cfg.bf16 is None else bool(cfg.bf16)
    return _Resolved(
        preset=p.name, steps=steps, batch_size=batch, seq_len=seq, lr=float(cfg.lr or p.lr), warmup=warmup,
        min_lr_ratio=float(cfg.min_lr_ratio), weight_decay=float(cfg.weight_decay), beta1=float(cfg.beta1),
        beta2=float(cfg.beta2), grad_clip=float(cfg.grad_clip), grad_accum=cfg.grad_accum, seed=int(cfg.seed),
        retrieval_mix=float(cfg.retrieval_mix), save_every=cfg.save_every or max(1, math.ceil(steps / 10)),
        eval_every=cfg.eval_every or max(1, math.ceil(steps / 10)), eval_batches=cfg.eval_batches,
        log_every=cfg.log_every, device=device, bf16=bf16, compile=bool(cfg.compile), answer_weight=float(aw),
        retrieval_pairs=cfg.retrieval_pairs, retrieval_queries=cfg.retrieval_queries, retrieval_digits=cfg.retrieval_digits,
    )


def _resolve_device(device: str) -> str:
    if device in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConsaError(f"--device {device}: CUDA is not available on this machine")
        return device
    if device != "cpu":
        raise ConsaError(f"--device must be auto, cpu or cuda[:N], got {device!r}")
    return device


def lr_at(step: int, r: _Resolved) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warm-up, then cosine to min_lr_ratio."""
    if step < r.warmup:
        return r.lr * (step + 1) / r.warmup
    span = max(1, r.steps - r.warmup)
    progress = min(1.0, (step - r.warmup) / span)
    return r.lr * (r.min_lr_ratio + (1 - r.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


# ---------------------------------------------------------------------------------------- data

def _batch_rng(seed: int, step: int) -> np.random.Generator:
    return np.random.default_rng([seed, 0, step])


# ----------------------------------------------------------------------------------- checkpoint

def _copy_tokenizer(corpus: Path, dest: Path) -> None:
    for name in TOKENIZER_FILES:
        if (corpus / name).is_file():
            shutil.copy2(corpus / name, dest / name)


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors = {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            t = v if torch.is_tensor(v) else torch.tensor(v)
            tensors[f"state.{idx}.{k}"] = t.detach().to("cpu").contiguous()
    return tensors, {"param_groups": sd["param_groups"]}


def _load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = t
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def _rng_tensors() -> dict[str, torch.Tensor]:
    out = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"torch_cuda_{i}"] = s
    return out


def _restore_rng(tensors: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    if torch.cuda.is_available():
        states = [tensors[f"torch_cuda_{i}"] for i in range(torch.cuda.device_count()) if f"torch_cuda_{i}" in tensors]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)


class _quiet_hf:
    """Silence transformers' own progress bars (shard writing/loading) inside our bar."""

    def __enter__(self):
        from transformers.utils import logging as hf_logging

        self._was = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()

    def __exit__(self, *exc):
        from transformers.utils import logging as hf_logging

        if self._was:
            hf_logging.enable_progress_bar()


def _save_model_dir(model, corpus: Path, dest: Path) -> None:
    with _quiet_hf():
        model.save_pretrained(dest)
    _copy_tokenizer(corpus, dest)


def _replace_dir(tmp: Path, final: Path) -> None:
    """Swap the finished ``tmp`` dir into ``final`` (old kept as ``final.old`` until the swap is done)."""
    old = final.with_name(final.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old)


def _save_checkpoint(out: Path, corpus: Path, model, opt, state: dict, log: dict) -> None:
    from safetensors.torch import save_file

    tmp = temp_dir(out, f".{CHECKPOINT}.")  # mkdir-like mode, not mkdtemp's 0700
    try:
        _save_model_dir(model, corpus, tmp)
        tensors, meta = _optimizer_tensors(opt)
        save_file(tensors, str(tmp / OPTIM_FILE))
        save_file(_rng_tensors(), str(tmp / RNG_FILE))
        (tmp / STATE_FILE).write_text(json.dumps({**state, "optimizer": meta}, indent=1))
        (tmp / LOG_FILE).write_text(json.dumps(log, indent=1))
        ordinary_modes(tmp)  # safetensors writes 0600
        _replace_dir(tmp, out / CHECKPOINT)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _find_checkpoint(out: Path) -> Path | None:
    for name in (CHECKPOINT, CHECKPOINT + ".old"):  # .old survives a crash in the middle of a swap
        if (out / name / STATE_FILE).is_file():
            return out / name
    return None


def _export_final(out: Path, corpus: Path, model, log: dict) -> None:
    """Write the final model files into ``out`` (each file by an atomic rename)."""
    tmp = temp_dir(out, ".final.")
    try:
        _save_model_dir(model, corpus, tmp)
        (tmp / LOG_FILE).write_text(json.dumps(log, indent=1))
        ordinary_modes(tmp)  # safetensors writes 0600
        names = sorted(p.name for p in tmp.iterdir())
        # config.json last: a directory with a config.json is a complete model
        for name in sorted(names, key=lambda n: n == "config.json"):
            os.replace(tmp / name, out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# -------------------------------------------------------------------------------------- training

def _build_model(config, seed: int):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)


def _make_optimizer(model, r: _Resolved) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    seen = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.ndim >= 2 and "embed" not in name else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": r.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kw = {"fused": True} if r.device.startswith("cuda") else {}
    return torch.optim.AdamW(groups, lr=r.lr, betas=(r.beta1, r.beta2), eps=1e-8, **kw)


def _loss(model, batch: torch.Tensor, device: str, bf16: bool) -> torch.Tensor:
    return _losses(model, batch, None, device, bf16)[0]


def _losses(model, batch: torch.Tensor, answer_mask: torch.Tensor | None, device: str, bf16: bool):
    """``(mean LM cross-entropy, summed cross-entropy over answer targets)`` of one micro-batch;
    the answer term is ``None`` without a mask. A target counts as an answer where the mask marks it."""
    dev_type = "cuda" if device.startswith("cuda") else "cpu"
    with torch.autocast(dev_type, dtype=torch.bfloat16, enabled=bf16):
        logits = model(input_ids=batch, use_cache=False).logits  # a cache per step: waste, and a recompile per layer
    ce = torch.nn.functional.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="none")
    ans = None if answer_mask is None else (ce * answer_mask[:, 1:].reshape(-1)).sum()
    return ce.mean(), ans


@torch.no_grad()
def evaluate(model, batches: list[torch.Tensor], device: str, bf16: bool = False) -> float:
    """Mean next-token cross-entropy (nats) of ``model`` over ``batches``."""
    was_training = model.training
    model.eval()
    total = 0.0
    for b in batches:
        total += float(_loss(model, b.to(device), device, bf16))
    model.train(was_training)
    return total / max(1, len(batches))


def _load_tokenizer(corpus: Path):
    from ..data.tokenizer import load_tokenizer

    return load_tokenizer(corpus)


def _check_out(out: Path, resume: bool) -> Path | None:
    """The checkpoint to resume from, or None for a fresh run; ConsaError when ``out`` is in the way."""
    if out.exists() and not out.is_dir():
        raise ConsaError(f"--out {out} exists and is not a directory")
    ckpt = _find_checkpoint(out) if out.is_dir() else None
    if resume:
        return ckpt
    if out.is_dir() and any(p for p in out.iterdir() if not p.name.startswith(".")):
        raise ConsaError(f"--out {out} is not empty; pass --resume to continue the run in it, or choose another dir")
    return None


def pretrain(cfg: PretrainConfig | dict, *, batch_source: BatchSource | None = None,
             on_step: Callable[[int, float], None] | None = None) -> Path:
    """Train (or resume) a base model as ``cfg`` says and return the model directory ``cfg.out``.

    ``batch_source`` replaces the default corpus/retrieval mix (see :class:`BatchSource`); it must be
    deterministic in its ``rng`` argument for resume to replay the same batches. ``on_step(step,
    loss)`` is called after every optimizer step (``step`` counted from 1), e.g. for a custom log or
    to stop a run. Input errors raise :class:`ConsaError` before anything is written. With
    ``time_limit`` the run may stop early after a checkpoint: ``pretrain_log.json`` then says
    ``"finished": false`` and no final model is exported; call again with ``resume=True``.
    """
    if isinstance(cfg, dict):
        cfg = PretrainConfig.from_dict(cfg)
    t_start = time.time()
    r = resolve(cfg)
    corpus, out = Path(cfg.corpus), Path(cfg.out)
    if not corpus.is_dir():
        raise ConsaError(f"--corpus {corpus}: no such directory")
    if not (corpus / "tokenizer.json").is_file() and not (corpus / "tokenizer_config.json").is_file():
        raise ConsaError(f"--corpus {corpus}: no tokenizer files (tokenizer.json) in it")
    ckpt = _check_out(out, cfg.resume)
    try:
        train_shards = open_shards(corpus, "train")
    except ConsaError:
        raise
    except Exception as e:  # noqa: BLE001
        raise ConsaError(f"--corpus {corpus}: cannot open train shards ({type(e).__name__}: {e})") from None
    try:
        val_shards = open_shards(corpus, "validation")
    except Exception as e:  # noqa: BLE001
        warnings.warn(f"no validation split in {corpus} ({e}); validation loss is taken on train windows")
        val_shards = train_shards
    for name, sh in (("train", train_shards), ("validation", val_shards)):
        if int(sh.num_tokens) < r.seq_len + 1:
            raise ConsaError(f"--corpus {corpus}: {name} split has {sh.num_tokens} tokens, fewer than --seq-len {r.seq_len}")
    try:
        tokenizer = _load_tokenizer(corpus)
    except Exception as e:  # noqa: BLE001
        raise ConsaError(f"--corpus {corpus}: cannot load the tokenizer ({type(e).__name__}: {e})") from None
    vocab = max(len(tokenizer), int(np.max(train_shards.tokens[: min(train_shards.num_tokens, 1 << 20)])) + 1)
    vocab = -(-vocab // 64) * 64  # a multiple of 64: faster matmuls, unused rows are harmless

    state0: dict | None = None
    if ckpt is not None:
        state0 = json.loads((ckpt / STATE_FILE).read_text())
        prev = state0["resolved"]
        changed = [k for k in _RESUME_FIXED if prev.get(k, _RESUME_DEFAULTS.get(k)) != asdict(r).get(k)]
        if changed:
            raise ConsaError(f"--resume: {', '.join(changed)} differ from the checkpoint's run "
                             f"({', '.join(f'{k}={prev.get(k)!r}' for k in changed)})")

    # ---- everything validated: from here on we write
    out.mkdir(parents=True, exist_ok=True)
    device = r.device
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if ckpt is not None:
        from transformers import AutoModelForCausalLM

        with _quiet_hf():
            model = AutoModelForCausalLM.from_pretrained(str(ckpt), attn_implementation="sdpa", dtype=torch.float32)
    else:
        eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else getattr(train_shards, "eos_id", None)
        config = preset_config(r.preset, vocab, bos_token_id=tokenizer.bos_token_id, eos_token_id=eos,
                               pad_token_id=tokenizer.pad_token_id, max_position_embeddings=max(r.seq_len, get_preset(r.preset).context))
        model = _build_model(config, r.seed)
    model.to(device).train()
    opt = _make_optimizer(model, r)
    n_params = sum(p.numel() for p in model.parameters())

    # batch source
    src_name = "custom"
    if batch_source is None:
        batch_source = corpus_source(train_shards)
        src_name = "corpus"
        if r.retrieval_mix > 0:
            kind = state0["retrieval_source"] if state0 and state0.get("retrieval_source") in ("builtin", "tasks") \
                else cfg.retrieval_source
            extra, kind = retrieval_source(train_shards, tokenizer, kind, pairs=r.retrieval_pairs,
                                           queries=r.retrieval_queries, digits=r.retrieval_digits)
            batch_source = MixedSource(batch_source, extra, r.retrieval_mix)
            src_name = f"corpus+{kind}"
    val_rng = np.random.default_rng([r.seed, 1])
    val_batches = [corpus_source(val_shards)(r.batch_size, r.seq_len, val_rng) for _ in range(r.eval_batches)]

    log: dict = {
        "preset": r.preset, "resolved": asdict(r), "parameters": n_params, "vocab_size": vocab, "batch_source": src_name,
        "corpus": str(corpus), "history": [], "validation": [], "segments": [], "finished": False,
    }
    step = 0
    if ckpt is not None:
        from safetensors.torch import load_file

        _load_optimizer(opt, load_file(str(ckpt / OPTIM_FILE)), state0["optimizer"])
        _restore_rng(load_file(str(ckpt / RNG_FILE)))
        step = int(state0["step"])
        log = json.loads((ckpt / LOG_FILE).read_text())
        log["resolved"].update(device=r.device, bf16=r.bf16, compile=r.compile)
    if not log["validation"]:
        log["validation"].append({"step": 0, "tokens": 0, "val_loss": evaluate(model, val_batches, device, r.bf16)})

    blocks = compile_blocks(model) if r.compile else None  # regional: seconds to compile whatever the depth
    compiled_ok = False  # set after the first compiled step ran (forward and backward)
    segment = {"start_step": step, "device": device, "bf16": r.bf16, "compile": r.compile,
               "torch": torch.__version__, "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    log["segments"].append(segment)
    train_time = 0.0  # seconds spent in training steps (no eval / checkpoint) in this segment
    seg_tokens = 0

    def state_dict() -> dict:
        return {"step": step, "tokens": step * r.tokens_per_step, "resolved": asdict(r),
                "retrieval_source": src_name.split("+")[1] if "+" in src_name else None}

    def finish_segment() -> None:
        segment.update(end_step=step, wall_s=round(time.time() - t_start, 3), train_s=round(train_time, 3),
                       tokens_per_s=round(seg_tokens / train_time, 1) if train_time > 0 else None)
        log["wall_s"] = round(sum(s.get("wall_s", 0) for s in log["segments"]), 3)
        tt = sum(s.get("train_s", 0) for s in log["segments"])
        log["train_tokens_per_s"] = round(step * r.tokens_per_step / tt, 1) if tt > 0 else None
        log["steps_done"], log["tokens_done"] = step, step * r.tokens_per_step

    from tqdm.auto import tqdm

    bar = tqdm(total=r.steps, initial=step, disable=not cfg.progress, unit="step", dynamic_ncols=True,
               desc=f"pretrain {r.preset}", file=sys.stderr)
    micro = r.batch_size // r.grad_accum
    stopped_early = False
    try:
        last = r.steps if cfg.stop_at is None else min(r.steps, cfg.stop_at)
        while step < last:
            t0 = time.perf_counter()
            if hasattr(batch_source, "set_step"):  # e.g. a length curriculum; still a pure function of the step
                batch_source.set_step(step)
            batch, answer_mask = split_batch(batch_source(r.batch_size, r.seq_len, _batch_rng(r.seed, step)))
            if tuple(batch.shape) != (r.batch_size, r.seq_len):
                raise ConsaError(f"batch source gave shape {tuple(batch.shape)}, expected {(r.batch_size, r.seq_len)}")
            # answer CE is averaged over the whole batch's answer targets, so grad_accum changes nothing
            n_answers = int(answer_mask[:, 1:].sum())
            lr = lr_at(step, r)
            for g in opt.param_groups:
                g["lr"] = lr

            def accumulate(fwd):  # one optimizer step's gradients, over grad_accum micro-batches
                loss_sum, answer_sum = 0.0, 0.0
                for i in range(r.grad_accum):
                    mb = batch[i * micro:(i + 1) * micro].to(device, non_blocking=True)
                    am = answer_mask[i * micro:(i + 1) * micro].to(device, non_blocking=True) if n_answers else None
                    loss, ans = _losses(fwd, mb, am, device, r.bf16)
                    total = loss / r.grad_accum
                    if ans is not None:
                        total = total + r.answer_weight * ans / n_answers
                        answer_sum += ans.detach()
                    total.backward()
                    loss_sum += loss.detach()
                return loss_sum, answer_sum

            if blocks is None or compiled_ok:
                loss_sum, answer_sum = accumulate(model)
            else:  # the first compiled step: a compiler failure costs the speed-up, not the run
                try:
                    loss_sum, answer_sum = accumulate(model)
                    if not math.isfinite(float(loss_sum)):  # e.g. a stale inductor cache entry: NaN, not an error
                        raise FloatingPointError(f"the compiled step's loss is {float(loss_sum)}")
                except Exception as e:  # noqa: BLE001 (dynamo / inductor raise many types)
                    why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
                    warnings.warn(f"torch.compile failed on the first step ({why}); training continues eagerly")
                    segment["compile"] = f"failed: {why}"
                    opt.zero_grad(set_to_none=True)
                    uncompile(blocks)
                    loss_sum, answer_sum = accumulate(model)
                compiled_ok = True
            gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), r.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            loss_val = float(loss_sum) / r.grad_accum
            answer_val = float(answer_sum) / n_answers if n_answers else None
            step += 1
            dt = time.perf_counter() - t0
            segment.setdefault("first_step_s", round(dt, 3))  # with compile: the compile time
            train_time += dt
            seg_tokens += r.tokens_per_step
            if not math.isfinite(loss_val):
                raise ConsaError(f"loss is {loss_val} at step {step}; lower --lr")
            bar.update(1)
            post = {"loss": f"{loss_val:.3f}"}
            if answer_val is not None:
                post["ans"] = f"{answer_val:.3f}"
            bar.set_postfix(**post, tok_s=f"{seg_tokens / train_time:,.0f}", lr=f"{lr:.2e}")
            if step % r.log_every == 0 or step == r.steps:
                log["history"].append({"step": step, "tokens": step * r.tokens_per_step, "loss": round(loss_val, 5),
                                       "answer_loss": None if answer_val is None else round(answer_val, 5),
                                       "lr": lr, "grad_norm": round(float(gnorm), 4), "step_s": round(dt, 4)})
            if step % r.eval_every == 0 or step == r.steps:
                v = evaluate(model, val_batches, device, r.bf16)
                log["validation"].append({"step": step, "tokens": step * r.tokens_per_step, "val_loss": v})
                if cfg.progress:
                    bar.write(f"step {step}/{r.steps}  loss {loss_val:.4f}  val_loss {v:.4f}", file=sys.stderr)
            at_stop = cfg.stop_at is not None and step >= cfg.stop_at
            over_time = at_stop or (cfg.time_limit is not None and time.time() - t_start > cfg.time_limit)
            if step % r.save_every == 0 or step == r.steps or over_time:
                finish_segment()
                _save_checkpoint(out, corpus, model, opt, state_dict(), log)
            if on_step is not None:
                on_step(step, loss_val)
            if over_time and step < r.steps:
                stopped_early = True
                bar.write(f"{'--stop-at' if at_stop else 'time limit'} reached: stopped at step {step}/{r.steps}; "
                          "rerun with --resume to continue",
                          file=sys.stderr)
                break
    finally:
        bar.close()

    finish_segment()
    stopped_early = stopped_early or step < r.steps  # (a resume already at --stop-at trains nothing)
    if not stopped_early:
        log["finished"] = True
        log["final_val_loss"] = log["validation"][-1]["val_loss"]
        _export_final(out, corpus, model, log)
        if not cfg.keep_checkpoint:
            shutil.rmtree(out / CHECKPOINT, ignore_errors=True)
    else:
        atomic_write_text(out / LOG_FILE, json.dumps(log, indent=1))
    return out
