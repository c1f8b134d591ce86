"""Export a model with an allocation, and load it back (``consa.load``).

Two formats, chosen per allocation and family (``mode="auto"``):

* **native**: every layer is all-FA or all-SWA at one window, no sinks, and stock transformers serves
  the family's per-layer windows from its config: ``layer_types`` + ``sliding_window`` (+ the flags
  that switch them on, e.g. Qwen's ``use_sliding_window``), so plain ``from_pretrained`` serves it
  without consa. Which families qualify is asked of transformers (``export_native``), never listed:
  Gemma3, for one, also picks RoPE by layer type, so relabelling a layer would change its positions.
  Llama and Mistral weights load as ``ministral``.
* **heads**: anything else (head-wise allocations, sinks, a consa window other than the model's
  native one, families without per-layer windows). Heads are reordered so FA heads come first, and
  the (reordered) allocation is stored in config.json under the key ``consa``; ``layer_types`` stay
  as trained. The model type becomes ``consa_<family>`` and the export ships ``modeling_consa.py``
  (``auto_map``), which wraps the family's own classes, whatever the family: stock transformers loads
  it with ``trust_remote_code=True`` and refuses it without, instead of quietly running full
  attention; after ``import consa`` (or with :func:`load`) consa's own kernels serve it.

Decoders that mix attention with other layers (linear attention, convolutions) carry an allocation
over their attention layers only; the record's ``layers`` names the decoder layer of each row. A
vision-language checkpoint is exported whole: the allocation is its text decoder's, every other
weight is written back unchanged.

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
from .lora_weights import is_unmerged, load_unmerged
from .models import model_class

KEY = "consa"
FORMAT = "consa.export"
VERSION = 2  # 2: head-wise exports carry their own model type and modeling code
READABLE_VERSIONS = (1, 2)
CODE_FILE = "modeling_consa.py"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja")
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json", "generation_config.json")


class ExportError(ConsaError, ValueError):
    """A model/allocation that cannot be exported, or an export folder that cannot be loaded."""


# ---- export ---------------------------------------------------------------------------------------
def layer_kinds(model_or_config) -> list[str]:
    """Per decoder layer: its kind in the text config (``layer_types``), or ``full_attention``."""
    from .models import text_config

    cfg = text_config(model_or_config)
    kinds = getattr(cfg, "layer_types", None)
    return list(kinds) if kinds else ["full_attention"] * cfg.num_hidden_layers


def native_blocker(model, allocation: Allocation, rows: list[int] | None = None) -> str | None:
    """Why this allocation cannot become native layer_types for this model (None when it can).
    ``rows``: the decoder layer of each allocation row (default: the model's attention layers)."""
    from .export_native import native_problem
    from .models import attention_layers, text_config

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
    rows = attention_layers(model) if rows is None else rows
    kinds = layer_kinds(model)
    if any(kinds[i] not in ("full_attention", "sliding_attention") for i in rows):
        return f"its attention layers are of kinds {sorted({kinds[i] for i in rows})}, not full/sliding attention"
    problem = native_problem(text_config(model), kinds)
    return None if problem is None else f"family {text_config(model).model_type!r}: {problem}"


def _native_config(cfg_dict: dict, allocation: Allocation, rows: list[int], text_key: str | None) -> dict:
    from .export_native import relabelled

    d = dict(cfg_dict)
    text = dict(d[text_key]) if text_key else d
    kinds = list(text.get("layer_types") or ["full_attention"] * text["num_hidden_layers"])
    for row, layer in enumerate(rows):
        kinds[layer] = "full_attention" if allocation.fa[row][0] else "sliding_attention"
    text = relabelled(text, kinds, allocation.window)
    if text_key:
        d[text_key] = text
        return d
    return text


def _text_key(model) -> str | None:
    """The config.json key of the text decoder's config (None: the model is a text decoder)."""
    from .models import text_config

    cfg, text = model.config, text_config(model)
    if text is cfg:
        return None
    for key in getattr(cfg, "sub_configs", {}) or {}:
        if getattr(cfg, key, None) is text:
            return key
    raise ExportError(f"cannot find the text decoder's config in {type(cfg).__name__}")


def export(model, allocation: Allocation, out: str | os.PathLike, *, mode: str = "auto", source_dir: str | os.PathLike | None = None) -> dict:
    """Write ``model`` with ``allocation`` applied to the new folder ``out``; returns a summary dict.

    ``model`` is a loaded HF causal LM (full attention) or the path of one. The model passed in is
    left unchanged (head reordering happens on a copy).
    """
    from .models import attention_layers, load_model, model_shape, reorder_heads

    if isinstance(model, (str, os.PathLike)):
        source_dir = model
        model = load_model(model)
    allocation.check_matches(model_shape(model))
    if mode not in ("auto", "native", "heads"):
        raise ExportError(f"unknown export mode {mode!r}; choose auto, native or heads")
    rows = attention_layers(model)
    blocker = native_blocker(model, allocation, rows)
    if mode == "native" and blocker:
        raise ExportError(f"cannot export natively: {blocker}")
    chosen = "heads" if (mode == "heads" or (mode == "auto" and blocker)) else "native"
    text_key = _text_key(model)

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"output {out} already exists and is not an empty folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        target, stored = model, allocation
        if chosen == "heads":
            target = _copy_without_plans(model)
            stored = reorder_heads(target, allocation)
        target.save_pretrained(tmp, safe_serialization=True)
        _check_weights(tmp)
        cfg_path = tmp / "config.json"
        cfg = json.loads(cfg_path.read_text())
        for d in (cfg, cfg.get(text_key) if text_key else None):
            if isinstance(d, dict):
                d.pop("_attn_implementation", None)
                d.pop("attn_implementation", None)
        if chosen == "native":
            cfg = _native_config(cfg, allocation, rows, text_key)
        else:
            _ship_code(cfg, tmp, type(model).__name__, type(model.config).__name__)
        record = {"format": FORMAT, "version": VERSION, "mode": chosen, "allocation": stored.to_dict()}
        if rows != list(range(len(rows))) or len(rows) != len(layer_kinds(model)):
            record["layers"] = rows  # the decoder layer of each allocation row
        record["reason"] = "layer-wise allocation: stock transformers serves it" if chosen == "native" else (
            blocker or "head-wise export requested")
        cfg[KEY] = record
        if text_key and chosen == "heads":
            cfg[text_key][KEY] = record  # the text decoder's attention reads it from its own config
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        if source_dir is not None:
            for name in TOKENIZER_FILES + PROCESSOR_FILES:
                src = Path(source_dir) / name
                if src.is_file() and not (tmp / name).exists():
                    shutil.copy2(src, tmp / name)
        ordinary_modes(tmp)  # mkdtemp's 0700 and safetensors' 0600 would lock other users out
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"out": str(out), "mode": chosen, "why": record["reason"], "swa_units": allocation.num_swa, "units": allocation.num_units}


def _ship_code(cfg: dict, folder: Path, model_class_name: str, config_class_name: str) -> None:
    """Head-wise: a model type of its own + the modeling file that serves it (see the module docstring)."""
    from .export_code import modeling_consa

    model_class_name = modeling_consa.stock_class_name(model_class_name)
    config_class_name = modeling_consa.stock_class_name(config_class_name)
    config_cls, model_cls = modeling_consa.classes(model_class_name, config_class_name)
    cfg["model_type"] = config_cls.model_type
    cfg["architectures"] = [model_cls.__name__]
    cfg["auto_map"] = modeling_consa.auto_map(model_class_name, config_class_name)
    shutil.copyfile(Path(modeling_consa.__file__), folder / CODE_FILE)


def _copy_without_plans(model):
    """A deep copy of ``model`` without consa's plans (a search's gate plans hold tensors of its graph,
    which cannot be copied); the model keeps its plans."""
    import copy

    from .models import attention_modules

    saved = [(m, m.__dict__.pop("consa_plan")) for m in attention_modules(model) if "consa_plan" in m.__dict__]
    try:
        return copy.deepcopy(model)
    finally:
        for m, plan in saved:
            m.consa_plan = plan


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
    rows = section.get("layers", list(range(alloc.shape.num_layers)))
    if not isinstance(rows, list) or len(rows) != alloc.shape.num_layers or not all(isinstance(r, int) for r in rows):
        raise ExportError(f"{cfg_path}: the record's 'layers' does not name one decoder layer per allocation row")
    if section["mode"] == "native":
        text = cfg["text_config"] if isinstance(cfg.get("text_config"), dict) else cfg  # a vision-language checkpoint's decoder
        types = text.get("layer_types") or []
        got = [types[r] if 0 <= r < len(types) else None for r in rows]
        want = ["full_attention" if row[0] else "sliding_attention" for row in alloc.fa]
        if got != want or text.get("sliding_window") != alloc.window:
            raise ExportError(f"{cfg_path}: layer_types/sliding_window do not match the stored allocation")
    return cfg, section, alloc


def load(path: str | os.PathLike, *, dtype: torch.dtype | str | None = None, device: str | None = None, backend: str = "auto"):
    """Load an export (either format) or a plain model folder, ready to serve.

    A head-wise export gets its allocation applied (``attn_implementation="consa"``); serve it with
    ``consa.generate`` or ``model.generate(..., past_key_values=HybridCache(plans_of(model)))``.
    A native export loads as stock transformers would load it. The output of a LoRA heal without merge
    (``consa heal --lora R --no-merge``) loads as its base model + allocation + adapter (PEFT).
    """
    from .models import apply_allocation, model_shape

    p = Path(path)
    if is_unmerged(p):
        return load_unmerged(p, load, dtype=dtype, device=device, backend=backend)
    cfg, section, alloc = read_export(path)
    kwargs = {"local_files_only": True, "output_loading_info": True, "dtype": dtype}
    try:
        model, info = model_class(cfg).from_pretrained(str(path), **kwargs)
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
