"""Search checkpoints: everything a killed run needs to continue bit-for-bit, with no pickle.

Tensors (log α, optimiser moments, trainable weights, the gate-noise RNG state) go to one
safetensors file; scalars (step, λ, optimiser hyper-parameters, config) to JSON. The directory is
written beside the old one and swapped in with a rename, so a kill mid-write leaves the previous
checkpoint intact.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import ConsaError

_COMPAT_KEYS = ("sparsity", "window", "seq_len", "granularity", "sinks", "steps", "train_weights", "controller", "seed")


def _opt_split(opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"opt.{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _opt_join(opt: torch.optim.Optimizer, tensors: dict, meta: dict) -> None:
    state: dict = {}
    for key, v in tensors.items():
        if key.startswith("opt."):
            _, pid, k = key.split(".", 2)
            state.setdefault(int(pid), {})[k] = v
    for key, v in meta["scalars"].items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def _trainable(search) -> dict:
    return {f"w.{n}": p.detach().cpu().contiguous() for n, p in search.model.named_parameters() if p.requires_grad}


def save_checkpoint(ckpt_dir: Path, search) -> None:
    tensors = {"log_alpha": search.gates.log_alpha.detach().cpu().contiguous(), "rng": search.gen.get_state()}
    opt_t, opt_meta = _opt_split(search.opt)
    tensors.update(opt_t)
    tensors.update(_trainable(search))
    meta = {
        "step": search.step,
        "controller": search.controller.state_dict(),
        "optimizer": opt_meta,
        "config": asdict(search.cfg),
        "shape": [search.shape.num_layers, search.shape.num_kv_heads, search.shape.num_q_heads],
    }
    ckpt_dir = Path(ckpt_dir)
    tmp = ckpt_dir.with_name(ckpt_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / "state.safetensors"))
    (tmp / "state.json").write_text(json.dumps(meta, indent=1))
    old = ckpt_dir.with_name(ckpt_dir.name + ".old")
    if ckpt_dir.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(ckpt_dir, old)
    os.replace(tmp, ckpt_dir)
    if old.exists():
        shutil.rmtree(old)


def load_checkpoint(ckpt_dir: Path, search) -> None:
    ckpt_dir = Path(ckpt_dir)
    try:
        meta = json.loads((ckpt_dir / "state.json").read_text())
        tensors = load_file(str(ckpt_dir / "state.safetensors"))
    except (OSError, ValueError) as e:
        raise ConsaError(f"cannot read checkpoint {ckpt_dir}: {e}") from None
    shape = [search.shape.num_layers, search.shape.num_kv_heads, search.shape.num_q_heads]
    if meta.get("shape") != shape:
        raise ConsaError(f"checkpoint {ckpt_dir} is for a model of shape {meta.get('shape')}, this model is {shape}")
    cfg = asdict(search.cfg)
    diff = [k for k in _COMPAT_KEYS if meta["config"].get(k) != cfg.get(k)]
    if diff:
        raise ConsaError(f"checkpoint {ckpt_dir} was made with other settings ({', '.join(diff)}); rerun with the same ones")
    with torch.no_grad():
        search.gates.log_alpha.copy_(tensors["log_alpha"].to(search.gates.log_alpha.device))
        params = dict(search.model.named_parameters())
        for key, v in tensors.items():
            if key.startswith("w."):
                params[key[2:]].copy_(v.to(params[key[2:]].device))
    search.gen.set_state(tensors["rng"])
    _opt_join(search.opt, tensors, meta["optimizer"])
    search.controller.load_state_dict(meta["controller"])
    search.step = int(meta["step"])
    metrics = search.out_dir / "metrics.jsonl"
    if metrics.exists():  # drop steps logged after the checkpoint: they will be run again
        keep = [ln for ln in metrics.read_text().splitlines() if ln and json.loads(ln)["step"] < search.step]
        metrics.write_text("".join(ln + "\n" for ln in keep))
        search.history = [json.loads(ln) for ln in keep]
