"""Can stock transformers serve a layer-wise allocation of this family? Asked of transformers itself.

A layer-wise allocation leaves consa as plain ``layer_types`` + ``sliding_window`` only where the
family's own code reads a sliding window per layer from its config, and where relabelling a layer
changes nothing but its window (Gemma3 also picks its RoPE base by layer type, Gemma 4 its head
size). Rather than a list of families that ages with every release, :func:`native_problem` builds
a tiny model from the model's own config, relabels one attention layer ``sliding_attention``, and
compares stock transformers with consa's hybrid on the same weights: equal logits, or a reason.
"""

from __future__ import annotations

import functools
import json
import warnings

import torch

# weight-compatible families with per-layer windows, for families that have none (Llama's and
# Mistral's weights load unchanged as Ministral); the probe still checks the target serves them
NATIVE_TARGETS = {"llama": "ministral", "mistral": "ministral"}
ATTENTION_TYPES = ("full_attention", "sliding_attention")
_DROP_FOR_TARGET = ("attention_bias", "mlp_bias", "pretraining_tp")
PROBE_WINDOW, PROBE_LEN = 3, 13


def relabelled(cfg: dict, layer_kinds: list[str], window: int) -> dict:
    """``cfg`` (a text config dict) with ``layer_types`` = ``layer_kinds`` and ``sliding_window`` =
    ``window``; flags that switch per-layer windows on (``use_sliding_window``, ``max_window_layers``)
    set where the config has them; Llama/Mistral moved to their native target."""
    d = dict(cfg)
    d["layer_types"] = list(layer_kinds)
    d["sliding_window"] = window
    if "use_sliding_window" in d:
        d["use_sliding_window"] = True
    if "max_window_layers" in d:
        d["max_window_layers"] = len(layer_kinds)  # unused once layer_types is explicit
    target = NATIVE_TARGETS.get(d.get("model_type"))
    if target is not None:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        d["model_type"] = target
        d["architectures"] = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[target]]
        for k in _DROP_FOR_TARGET:
            d.pop(k, None)
    return d


def native_problem(text_cfg, kinds: list[str]) -> str | None:
    """Why a layer-wise export of a model with this text config cannot be plain transformers (None:
    it can). ``kinds`` are the model's layer kinds (``layer_types``, or all full attention)."""
    d = text_cfg.to_dict() if hasattr(text_cfg, "to_dict") else dict(text_cfg)
    for k in ("architectures", "transformers_version", "_name_or_path", "dtype", "consa", "auto_map"):
        d.pop(k, None)
    return _probe(json.dumps(d, sort_keys=True, default=str), tuple(kinds))


@functools.lru_cache(maxsize=64)
def _probe(cfg_json: str, kinds: tuple) -> str | None:
    from transformers import AutoConfig

    cfg = json.loads(cfg_json)
    target = NATIVE_TARGETS.get(cfg.get("model_type"), cfg.get("model_type"))
    try:
        takes_types = "layer_types" in AutoConfig.for_model(target).to_dict()
    except Exception:
        takes_types = False
    if not takes_types:
        return "its config has no layer_types"
    try:
        d = _probe_config(cfg, list(kinds))
        base, hybrid, plain, ids = _hybrid_probe(d)
    except Exception as e:  # an exotic family: no tiny model to ask, so no native export
        return f"no tiny probe model builds from its config ({type(e).__name__}: {_first_line(e)})"
    if (hybrid - plain).abs().max() < 1e-4:
        return "the probe could not tell sliding from full attention"
    from transformers import AutoModelForCausalLM

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            target = relabelled({k: v for k, v in d.items() if k != "_slide"}, d["_slide"], PROBE_WINDOW)
            stock = AutoModelForCausalLM.from_config(AutoConfig.for_model(target.pop("model_type"), **target)).eval()
            missing, unexpected = stock.load_state_dict(base.state_dict(), strict=False)
            if missing or unexpected:
                return f"its native target has other weights ({(missing or unexpected)[0]})"
            with torch.no_grad():
                native = stock(input_ids=ids).logits
    except Exception as e:  # the family's code does not take a sliding layer there
        return f"its code does not run a layer_types 'sliding_attention' layer ({type(e).__name__}: {_first_line(e)})"
    if (native - plain).abs().max() < 1e-4:
        return "its code does not read per-layer sliding windows from its config"
    if (native - hybrid).abs().max() > 1e-4:
        return "relabelling a layer 'sliding_attention' changes more than its window (its RoPE or head size, say)"
    return None


def _probe_config(cfg: dict, kinds: list[str]) -> dict:
    """A tiny config of the model's family, its layer kinds kept (repeated until two layers are
    attention), every attention layer full; ``_slide`` = the same kinds with the second attention
    layer relabelled ``sliding_attention``."""
    from .families import shrunk_config_dict

    d = shrunk_config_dict(cfg)
    n = d.get("num_hidden_layers")
    if not isinstance(n, int):
        return d
    small = (kinds[:n] + ["full_attention"] * n)[:n]
    if sum(k in ATTENTION_TYPES for k in small) < 2:  # e.g. Qwen3.5's 3 linear : 1 full: twice the pattern
        d = {k: (v + v if isinstance(v, list) and len(v) == n else v) for k, v in d.items()}
        n, small = 2 * n, small + small
        d["num_hidden_layers"] = n
    rows = [i for i, k in enumerate(small) if k in ATTENTION_TYPES]
    full = ["full_attention" if i in rows else k for i, k in enumerate(small)]
    slide = list(full)
    if len(rows) > 1:
        slide[rows[1]] = "sliding_attention"
    d["layer_types"], d["_slide"] = full, slide
    if d.get("sliding_window") is None and "sliding_window" in d:
        d["sliding_window"] = 1 << 16  # some families build a sliding mask whatever layer_types say
    return d


def _hybrid_probe(d: dict):
    """(tiny model, consa's hybrid logits with the second attention layer sliding, its plain logits, ids)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from .allocation import Allocation
    from .models import apply_allocation, model_shape

    cfg = {k: v for k, v in d.items() if k not in ("model_type", "_slide")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_config(AutoConfig.for_model(d["model_type"], **cfg)).eval()
        with torch.no_grad():
            for name, p in base.named_parameters():
                if name.endswith(("q_proj.weight", "k_proj.weight", "qkv_proj.weight")):
                    p.mul_(4.0)  # peaky attention: the window must change the output
        ids = torch.randint(3, min(100, base.config.get_text_config().vocab_size), (1, PROBE_LEN),
                            generator=torch.Generator().manual_seed(0))
        shape = model_shape(base)
        alloc = Allocation.from_units([row != 1 for row in range(shape.num_layers)], "layer", shape, PROBE_WINDOW)
        with torch.no_grad():
            plain = base(input_ids=ids).logits
            apply_allocation(base, alloc)
            hybrid = base(input_ids=ids).logits
    return base, hybrid, plain, ids


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return (s.splitlines()[0] if s else type(e).__name__)[:160]
