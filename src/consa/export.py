"""Export a model with an allocation, and load it back (``consa.load``).

Two formats, chosen per allocation and family (``mode="auto"``):

* **native**: every layer is all-FA or all-SWA, no sinks, and the family has per-layer sliding
  windows in stock transformers (Qwen3, Qwen2, Ministral; Llama and Mistral weights load as
  ``ministral``). config.json gets ``layer_types`` + ``sliding_window`` (+ ``use_sliding_window`` for
  Qwen), so plain ``AutoModelForCausalLM.from_pretrained`` serves it without consa.
* **heads**: anything else (head-wise allocations, sinks, a consa window other than the model's
  native one, Gemma3). Heads are reordered so FA heads come first, and the (reordered) allocation is
  stored in config.json under the key ``consa``; ``layer_types`` stay as trained. Gemma3 picks each
  layer's RoPE base by its layer type, so a full layer relabelled ``sliding_attention`` would silently
  change its positions: the allocation, not ``layer_types``, says which layers slide. The model type
  becomes ``consa_<family>`` and the export ships ``modeling_consa.py`` (``auto_map``): stock
  transformers loads it with ``trust_remote_code=True`` and refuses it without, instead of quietly
  running full attention; after ``import consa`` (or with :func:`load`) consa's own kernels serve it.

Weights are safetensors only. The export is written to a temporary folder beside ``out`` and moved
into place at the end, so a failure never leaves a half-written export.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .allocation import Allocation, AllocationError
from .errors import ConsaError
from .files import ordinary_modes, read_json

KEY = "consa"
FORMAT = "consa.export"
VERSION = 2  # 2: head-wise exports carry their own model type and modeling code
READABLE_VERSIONS = (1, 2)
CODE_FILE = "modeling_consa.py"
NATIVE_FAMILIES = ("qwen3", "qwen2", "ministral", "llama", "mistral")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja")


class ExportError(ConsaError, ValueError):
    """A model/allocation that cannot be exported, or an export folder that cannot be loaded."""


# ---- export ---------------------------------------------------------------------------------------
def native_blocker(model_or_config, allocation: Allocation) -> str | None:
    """Why this allocation cannot become native layer_types for this family (None when it can)."""
    from .models import base_family, text_config

    cfg = text_config(model_or_config)
    family = base_family(cfg)
    if family == "gemma3_text":
        return "Gemma3 picks a layer's RoPE by its layer type, so layer_types must stay as trained"
    if family not in NATIVE_FAMILIES:
        return f"family {family!r} has no native per-layer sliding window consa can target"
    other = sorted({w for w in allocation.native if w is not None and w != allocation.window})
    if other:
        return f"the model's native sliding window {other} differs from consa's {allocation.window} (one sliding_window per config)"
    searched = sorted({s for rs, rf in zip(allocation.span, allocation.fixed) for s, x in zip(rs, rf) if s is not None and not x})
    if len(searched) > 1:
        return f"SWA units have several spans {searched} (a transformers config has one sliding_window)"
    if allocation.sinks:
        return "attention sinks have no native transformers equivalent"
    mixed = [i for i, row in enumerate(allocation.fa) if len(set(row)) > 1]
    if mixed:
        return f"layers {mixed[:5]} mix FA and SWA heads"
    if family in ("llama", "mistral") and (getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False)):
        return "Ministral (the native target for Llama/Mistral) has no attention/MLP biases"
    return None


def _native_config(cfg_dict: dict, allocation: Allocation) -> dict:
    d = dict(cfg_dict)
    d["layer_types"] = ["full_attention" if row[0] else "sliding_attention" for row in allocation.fa]
    d["sliding_window"] = allocation.window
    family = d.get("model_type")
    if family in ("qwen3", "qwen2"):
        d["use_sliding_window"] = True
        d["max_window_layers"] = allocation.shape.num_layers  # unused once layer_types is explicit
    elif family in ("llama", "mistral"):
        d["model_type"] = "ministral"
        d["architectures"] = ["MinistralForCausalLM"]
        for k in ("attention_bias", "mlp_bias", "pretraining_tp"):
            d.pop(k, None)
    return d


def export(model, allocation: Allocation, out: str | os.PathLike, *, mode: str = "auto", source_dir: str | os.PathLike | None = None) -> dict:
    """Write ``model`` with ``allocation`` applied to the new folder ``out``; returns a summary dict.

    ``model`` is a loaded HF causal LM (full attention) or the path of one. The model passed in is
    left unchanged (head reordering happens on a copy).
    """
    import copy

    from .models import load_model, model_shape, reorder_heads

    if isinstance(model, (str, os.PathLike)):
        source_dir = model
        model = load_model(model)
    allocation.check_matches(model_shape(model))
    if mode not in ("auto", "native", "heads"):
        raise ExportError(f"unknown export mode {mode!r}; choose auto, native or heads")
    blocker = native_blocker(model, allocation)
    if mode == "native" and blocker:
        raise ExportError(f"cannot export natively: {blocker}")
    chosen = "heads" if (mode == "heads" or (mode == "auto" and blocker)) else "native"

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"output {out} already exists and is not an empty folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        target, stored = model, allocation
        if chosen == "heads":
            target = copy.deepcopy(model)
            _strip_consa(target)
            stored = reorder_heads(target, allocation)
        target.save_pretrained(tmp, safe_serialization=True)
        _check_weights(tmp)
        cfg_path = tmp / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg.pop("_attn_implementation", None)
        cfg.pop("attn_implementation", None)
        if chosen == "native":
            cfg = _native_config(cfg, allocation)
        else:
            _ship_code(cfg, tmp)
        cfg[KEY] = {"format": FORMAT, "version": VERSION, "mode": chosen, "allocation": stored.to_dict()}
        if chosen == "native":
            cfg[KEY]["reason"] = "layer-wise allocation: stock transformers serves it"
        else:
            cfg[KEY]["reason"] = blocker or "head-wise export requested"
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        if source_dir is not None:
            for name in TOKENIZER_FILES:
                src = Path(source_dir) / name
                if src.is_file():
                    shutil.copy2(src, tmp / name)
        ordinary_modes(tmp)  # mkdtemp's 0700 and safetensors' 0600 would lock other users out
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"out": str(out), "mode": chosen, "why": cfg[KEY]["reason"], "swa_units": allocation.num_swa, "units": allocation.num_units}


def _ship_code(cfg: dict, folder: Path) -> None:
    """Head-wise: a model type of its own + the modeling file that serves it (see the module docstring)."""
    from .export_code import modeling_consa

    family = cfg.get("model_type", "?")
    family = family[len(modeling_consa.PREFIX):] if family.startswith(modeling_consa.PREFIX) else family
    if family not in modeling_consa.CLASSES:
        raise ExportError(f"family {family!r} has no head-wise export code (supported: {', '.join(modeling_consa.FAMILIES)})")
    config_cls, model_cls = modeling_consa.CLASSES[family]
    cfg["model_type"] = config_cls.model_type
    cfg["architectures"] = [model_cls.__name__]
    cfg["auto_map"] = modeling_consa.auto_map(family)
    shutil.copyfile(Path(modeling_consa.__file__), folder / CODE_FILE)


def _strip_consa(model) -> None:
    from .models import attention_modules

    for mod in attention_modules(model):
        if hasattr(mod, "consa_plan"):
            del mod.consa_plan


def _check_weights(folder: Path) -> None:
    if any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
        raise ExportError(f"{folder} holds pickle weights; consa exports and loads safetensors only")
    if not (folder / "model.safetensors").is_file() and not (folder / "model.safetensors.index.json").is_file():
        raise ExportError(f"{folder} has no safetensors weights (model.safetensors or its index)")


# ---- load -----------------------------------------------------------------------------------------
def read_export(path: str | os.PathLike) -> tuple[dict, dict | None, Allocation | None]:
    """(config dict, consa section or None, allocation or None) of an export folder, checked."""
    p = Path(path)
    if not p.is_dir():
        raise ExportError(f"export folder not found: {p}")
    cfg_path = p / "config.json"
    if not cfg_path.is_file():
        raise ExportError(f"{p} is not a model folder (no config.json)")
    cfg = read_json(cfg_path, "model config", ExportError)
    if not isinstance(cfg, dict):
        raise ExportError(f"{cfg_path} does not hold a JSON object")
    _check_weights(p)
    section = cfg.get(KEY)
    if section is None:
        return cfg, None, None
    if not isinstance(section, dict) or section.get("format") != FORMAT:
        raise ExportError(f"{cfg_path}: the '{KEY}' key is not a consa export record")
    if section.get("version") not in READABLE_VERSIONS:
        raise ExportError(f"{cfg_path}: unsupported consa export version {section.get('version')!r}")
    if section.get("mode") not in ("native", "heads"):
        raise ExportError(f"{cfg_path}: unknown consa export mode {section.get('mode')!r}")
    try:
        alloc = Allocation.from_dict(section.get("allocation"))
    except AllocationError as e:
        raise ExportError(f"{cfg_path}: stored allocation is invalid: {e}") from None
    if section["mode"] == "native":
        want = ["full_attention" if row[0] else "sliding_attention" for row in alloc.fa]
        if cfg.get("layer_types") != want or cfg.get("sliding_window") != alloc.window:
            raise ExportError(f"{cfg_path}: layer_types/sliding_window do not match the stored allocation")
    return cfg, section, alloc


def load(path: str | os.PathLike, *, dtype: torch.dtype | str | None = None, device: str | None = None, backend: str = "auto"):
    """Load an export (either format) or a plain model folder, ready to serve.

    A head-wise export gets its allocation applied (``attn_implementation="consa"``); serve it with
    ``consa.attention.cache.generate`` or ``model.generate(..., past_key_values=HybridCache(model))``.
    A native export loads as stock transformers would load it. The output of a LoRA heal without merge
    (``consa heal --lora R --no-merge``) loads as its base model + allocation + adapter (PEFT).
    """
    from transformers import AutoModelForCausalLM

    from .models import apply_allocation, model_shape

    p = Path(path)
    if not (p / "config.json").is_file() and any((d / "adapter_config.json").is_file() for d in (p / "adapter", p)):
        from .train.heal import load_unmerged

        return load_unmerged(p, dtype=dtype, device=device, backend=backend)
    cfg, section, alloc = read_export(path)
    kwargs = {"local_files_only": True, "output_loading_info": True, "dtype": dtype}
    try:
        model, info = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExportError(f"cannot load {path}: {first}") from None
    except Exception as e:  # safetensors raises its own error types for damaged files
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExportError(f"cannot load {path}: {type(e).__name__}: {first}") from None
    problems = [f"{k}: {info[k][:3]}" for k in ("missing_keys", "unexpected_keys", "mismatched_keys") if info.get(k)]
    if problems:
        raise ExportError(f"weights in {path} do not match its config ({'; '.join(problems)})")
    if section is not None:
        try:
            alloc.check_matches(model_shape(model))
        except AllocationError as e:
            raise ExportError(f"{path}: stored allocation does not fit the model: {e}") from None
        if section["mode"] == "heads":
            apply_allocation(model, alloc, backend=backend)
    if device:
        model.to(device)
    return model.eval()
