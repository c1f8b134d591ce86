"""Search checkpoints: everything a killed run needs to continue bit-for-bit, with no pickle.

Replicated state (log α, the gate optimiser's moments, the gate-noise RNG state, step = data
position, λ, config, world size, model identity) goes to one safetensors file plus JSON, written by
rank 0 alone. Trainable weights (``train_weights`` full or LoRA) and their optimiser state go

* on one process: into the same safetensors file (``w.*``, ``wopt.*``);
* on several (FSDP2): into a distributed checkpoint (``torch.distributed.checkpoint``, DCP) under
  ``weights/``, every rank writing its own shards. Gathering full state dicts on rank 0 would put a
  whole 8B model and its Adam moments (~100 GB) in one process's memory every checkpoint; DCP never
  materialises more than a shard, and its ``state_dict`` helpers map the FSDP2 DTensors by name.

The directory is written beside the old one (``checkpoint.tmp``) and swapped in with a rename by
rank 0 after every rank is done, so a kill mid-write leaves the previous checkpoint intact.
A checkpoint made with another world size, another model or other settings is refused with one error.
"""

from __future__ import annotations

import hashlib
import json
from contextlib import contextmanager
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import ConsaError
from .search_config import flatten

# settings a resumed search must share with its checkpoint, by their flat names (``search_config.FLAT_NAMES``:
# the flags' names, and the layout of checkpoints written before the config had parts, which still resume)
_COMPAT_KEYS = ("sparsity", "window", "seq_len", "granularity", "sinks", "steps", "train_weights", "controller", "seed",
                "kv_budget", "budget_context", "spans", "answer_weight", "beta_final", "gate_lr_final", "decide_weight")
# what a checkpoint written before the setting existed meant (the schedules: off)
_COMPAT_DEFAULTS = {"answer_weight": 0.0, "beta_final": None, "gate_lr_final": None, "decide_weight": 0.0}
_CONFIG_KEYS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "head_dim", "rope_theta", "tie_word_embeddings")


def _config_value(cfg, key: str):
    """``cfg.key``, or its per-layer values where it differs by layer (Gemma 4's head_dim: reading it
    globally raises)."""
    try:
        return getattr(cfg, key, None)
    except Exception:
        per_layer = getattr(cfg, "per_layer_config", None) or {}
        return sorted({str(getattr(c, key, None)) for c in (per_layer.values() if isinstance(per_layer, dict) else per_layer)})


@torch.no_grad()
def model_fingerprint(model) -> str:
    """A short hash of a model's architecture and a sample of every weight (cheap even at 8B).

    Call it before sharding. Two models of one shape but other weights get other fingerprints, so a
    resume against the wrong model directory is refused instead of silently mixing runs.
    """
    from ..models import text_config

    cfg = text_config(model)
    h = hashlib.sha256(json.dumps({k: _config_value(cfg, k) for k in _CONFIG_KEYS}, sort_keys=True, default=str).encode())
    for name, p in model.named_parameters():
        flat = p.detach().reshape(-1)
        # through bf16: the same checkpoint loaded in fp32 or bf16 gives the same fingerprint
        sample = flat[:: max(1, flat.numel() // 256)][:256].to(torch.bfloat16).double().cpu()
        h.update(name.encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


def opt_split(opt: torch.optim.Optimizer, prefix: str = "opt") -> tuple[dict, dict]:
    """An optimiser's state as (tensors for safetensors under ``prefix.``, the JSON rest): no pickle."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{prefix}.{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def opt_join(opt: torch.optim.Optimizer, tensors: dict, meta: dict, prefix: str = "opt") -> None:
    """Load what :func:`opt_split` wrote back into ``opt``."""
    state: dict = {}
    for key, v in tensors.items():
        if key.startswith(prefix + "."):
            _, pid, k = key.split(".", 2)
            state.setdefault(int(pid), {})[k] = v
    for key, v in meta["scalars"].items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def trainable_tensors(search) -> dict:
    """The trainable weights of a run (search or heal) on one process, as ``w.<name>`` tensors."""
    return {f"w.{n}": p.detach().cpu().contiguous() for n, p in search.model.named_parameters() if p.requires_grad}


def dcp_state(search) -> dict:
    """The sharded weights and their optimiser state of a run, as a DCP state dict."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    opts = StateDictOptions(ignore_frozen_params=True)
    return {"model": get_model_state_dict(search.model, options=opts),
            "optim": get_optimizer_state_dict(search.model, search.wopt, options=opts)}


def _shape(search) -> list[int]:
    return [search.shape.num_layers, search.shape.num_kv_heads, search.shape.num_q_heads]


@contextmanager
def staged_checkpoint(ckpt_dir: Path, d):
    """Yield a sibling directory to write a checkpoint into (every rank may write shards there); when
    the block ends, rank 0 swaps it in for ``ckpt_dir`` by rename, so a crash at any point leaves either
    the old checkpoint or the new one whole. Files get ordinary modes (safetensors writes 0600)."""
    ckpt_dir = Path(ckpt_dir)
    tmp = ckpt_dir.with_name(ckpt_dir.name + ".tmp")
    if d.is_main:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    d.barrier()
    yield tmp
    d.barrier()  # every shard is on disk before the swap
    if d.is_main:
        from ..files import ordinary_modes

        ordinary_modes(tmp)
        old = ckpt_dir.with_name(ckpt_dir.name + ".old")
        if ckpt_dir.exists():
            if old.exists():
                shutil.rmtree(old)
            os.replace(ckpt_dir, old)
        os.replace(tmp, ckpt_dir)
        if old.exists():
            shutil.rmtree(old)
    d.barrier()


def save_checkpoint(ckpt_dir: Path, search) -> None:
    with staged_checkpoint(ckpt_dir, search.dist) as tmp:
        _write_search_state(tmp, search)


def _write_search_state(tmp: Path, search) -> None:
    d = search.dist
    sharded = d.enabled and search.wopt is not None
    if sharded:  # collective: every rank writes its shards
        import torch.distributed.checkpoint as dcp

        dcp.save(dcp_state(search), checkpoint_id=str(tmp / "weights"))
    if d.is_main:
        tensors = {"log_alpha": search.gates.log_alpha.detach().cpu().contiguous(), "rng": search.gen.get_state()}
        opt_t, opt_meta = opt_split(search.opt)
        tensors.update(opt_t)
        meta = {
            "step": search.step,
            "controller": search.controller.state_dict(),
            "optimizer": opt_meta,
            "config": search.cfg.to_dict(),
            "shape": _shape(search),
            "model": search.fingerprint,
            "world_size": d.world_size,
            "weights": "dcp" if sharded else ("inline" if search.wopt is not None else "none"),
        }
        if search.wopt is not None and not sharded:
            tensors.update(trainable_tensors(search))
            wopt_t, meta["weight_optimizer"] = opt_split(search.wopt, "wopt")
            tensors.update(wopt_t)
        save_file(tensors, str(tmp / "state.safetensors"))
        (tmp / "state.json").write_text(json.dumps(meta, indent=1))


def read_meta(ckpt_dir: Path) -> dict:
    """A checkpoint's state.json, or one clear error."""
    try:
        return json.loads((Path(ckpt_dir) / "state.json").read_text())
    except (OSError, ValueError) as e:
        raise ConsaError(f"cannot read checkpoint {ckpt_dir}: {e}") from None


def check_world_size(ckpt_dir: Path, meta: dict, world_size: int) -> None:
    saved = int(meta.get("world_size", 1))
    if saved != world_size:
        raise ConsaError(
            f"checkpoint {ckpt_dir} was written by a search on {saved} process(es), this one runs on {world_size}; "
            f"resume with --nproc {saved} (the data split and the gradient reductions depend on the world size)"
        )


def check_resumable(out_dir: Path, resume: bool, world_size: int) -> None:
    """The checks that need no model: a checkpoint to resume from, of this world size; or none to clobber.

    Cheap enough for ``consa search --nproc`` to run before it launches any process.
    """
    out_dir = Path(out_dir)
    ckpt_dir = out_dir / "checkpoint"
    if resume:
        if not (ckpt_dir / "state.json").is_file():
            raise ConsaError(f"--resume: no checkpoint in {ckpt_dir}")
        check_world_size(ckpt_dir, read_meta(ckpt_dir), world_size)
    elif ckpt_dir.exists() and not (out_dir / "allocation.json").exists() and any(ckpt_dir.iterdir()):
        raise ConsaError(f"{out_dir} holds a checkpoint of an unfinished search; pass --resume or choose another --out")


def load_checkpoint(ckpt_dir: Path, search) -> None:
    ckpt_dir = Path(ckpt_dir)
    meta = read_meta(ckpt_dir)
    try:
        tensors = load_file(str(ckpt_dir / "state.safetensors"))
    except (OSError, ValueError) as e:
        raise ConsaError(f"cannot read checkpoint {ckpt_dir}: {e}") from None
    shape = _shape(search)
    if meta.get("shape") != shape:
        raise ConsaError(f"checkpoint {ckpt_dir} is for a model of shape {meta.get('shape')}, this model is {shape}")
    check_world_size(ckpt_dir, meta, search.dist.world_size)
    if meta.get("model") not in (None, search.fingerprint):
        raise ConsaError(f"checkpoint {ckpt_dir} was made from another model (same shape, other config or weights); "
                         "resume with the same --model")
    saved, cfg = flatten(meta["config"]), search.cfg.flat()
    diff = [k for k in _COMPAT_KEYS if saved.get(k, _COMPAT_DEFAULTS.get(k)) != cfg.get(k)]
    if diff:
        raise ConsaError(f"checkpoint {ckpt_dir} was made with other settings ({', '.join(diff)}); rerun with the same ones")
    with torch.no_grad():
        search.gates.log_alpha.copy_(tensors["log_alpha"].to(search.gates.log_alpha.device))
        params = dict(search.model.named_parameters())
        for key, v in tensors.items():
            if key.startswith("w."):
                params[key[2:]].copy_(v.to(params[key[2:]].device))
    search.gen.set_state(tensors["rng"])
    opt_join(search.opt, tensors, meta["optimizer"])
    if "weight_optimizer" in meta:
        opt_join(search.wopt, tensors, meta["weight_optimizer"], "wopt")
    if meta.get("weights") == "dcp":
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

        state = dcp_state(search)
        dcp.load(state, checkpoint_id=str(ckpt_dir / "weights"))
        opts = StateDictOptions(ignore_frozen_params=True, strict=False)
        set_model_state_dict(search.model, state["model"], options=opts)
        set_optimizer_state_dict(search.model, search.wopt, state["optim"], options=opts)
    search.controller.load_state_dict(meta["controller"])
    search.step = int(meta["step"])
    metrics = search.out_dir / "metrics.jsonl"
    if metrics.exists():  # drop steps logged after the checkpoint: they will be run again
        keep = [ln for ln in metrics.read_text().splitlines() if ln and json.loads(ln)["step"] < search.step]
        search.history = [json.loads(ln) for ln in keep]
        if search.dist.is_main:
            metrics.write_text("".join(ln + "\n" for ln in keep))
