"""Generation over the static engine: one left-padded batch, or many prompts in fixed-size batches.

``consa.generate`` takes this path by default on CUDA (a captured graph per decode step) and the eager
``HybridCache`` path elsewhere. It serves greedy decoding and plain sampling (temperature, top-k,
top-p), the settings a serving loop needs; anything else ``model.generate`` knows (beams, assistants,
penalties, streamers, …) goes to the eager path, where transformers implements it.
"""

from __future__ import annotations

import torch

from .engine import DecodeEngine

SUPPORTED = {"attention_mask", "max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "eos_token_id", "pad_token_id"}
# generation_config fields whose non-default values need transformers' own loop
_NEEDS_HF = {"num_beams": 1, "repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "min_new_tokens": None,
             "min_length": 0, "bad_words_ids": None, "suppress_tokens": None, "begin_suppress_tokens": None,
             "forced_bos_token_id": None, "forced_eos_token_id": None}


def _plans(model):
    """The model's fixed consa plans, or None when some layer has none."""
    from ..attention.cache import plans_of

    try:
        return plans_of(model)
    except ValueError:
        return None


def static_supported(model, kwargs: dict) -> str | None:
    """None if the static path serves this call, else why not (one phrase)."""
    extra = set(kwargs) - SUPPORTED
    if extra:
        return f"generate options {sorted(extra)} need the eager path"
    gc = getattr(model, "generation_config", None)
    for name, default in _NEEDS_HF.items():
        value = getattr(gc, name, default)
        if value is not None and value != default:
            return f"generation_config.{name} needs the eager path"
    if _plans(model) is None:
        return "the model has no fixed consa allocation on every layer"
    return None


def _setting(model, kwargs, name, default=None):
    if kwargs.get(name) is not None:
        return kwargs[name]
    return getattr(getattr(model, "generation_config", None), name, default)


def _eos(model, kwargs) -> list[int]:
    eos = _setting(model, kwargs, "eos_token_id")
    if eos is None:
        return []
    return [int(e) for e in (eos.tolist() if isinstance(eos, torch.Tensor) else eos if isinstance(eos, (list, tuple)) else [eos])]


def _pad(model, kwargs, eos: list[int]) -> int:
    """The token a finished row emits: ``pad_token_id``, else the first EOS, else 0."""
    pad = _setting(model, kwargs, "pad_token_id")
    return int(pad) if pad is not None else (eos[0] if eos else 0)


def sampler_for(model, kwargs):
    """None (greedy) or logits [B, V] → tokens [B] with transformers' own warpers (temperature, top-k,
    top-p, in the order ``generate`` applies them)."""
    if not _setting(model, kwargs, "do_sample", False):
        return None
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    warpers = []
    t = _setting(model, kwargs, "temperature", 1.0)
    if t is not None and t != 1.0:
        warpers.append(TemperatureLogitsWarper(t))
    k = _setting(model, kwargs, "top_k", 50)
    if k:
        warpers.append(TopKLogitsWarper(k))
    p = _setting(model, kwargs, "top_p", 1.0)
    if p is not None and p < 1.0:
        warpers.append(TopPLogitsWarper(p))

    def sample(logits: torch.Tensor) -> torch.Tensor:
        scores = logits.float()
        for w in warpers:
            scores = w(None, scores)
        return torch.multinomial(scores.softmax(-1), 1)[:, 0]

    return sample


def _new_tokens(model, kwargs, prompt_len: int) -> int:
    n = kwargs.get("max_new_tokens")
    if n is None:
        n = max(0, _setting(model, kwargs, "max_length", 20) - prompt_len)
    return int(n)


@torch.no_grad()
def generate_static(model, input_ids: torch.Tensor, *, cuda_graphs: bool | None = None, engine: DecodeEngine | None = None,
                    **kwargs) -> torch.Tensor:
    """Like ``model.generate(input_ids, ...)`` (prompt + new tokens, [B, T + n]; finished rows padded),
    through a :class:`DecodeEngine`. Pass ``engine`` to reuse its cache and captured graph."""
    why = static_supported(model, kwargs)
    if why:
        raise ValueError(f"the static generation path does not apply: {why}")
    b, t = input_ids.shape
    new = _new_tokens(model, kwargs, t)
    if new == 0:
        return input_ids
    eos = _eos(model, kwargs)
    pad = _pad(model, kwargs, eos)
    if engine is None:
        engine = DecodeEngine(model, b, t + new, eos=eos, pad=pad, cuda_graphs=cuda_graphs, sampler=sampler_for(model, kwargs))
    engine.prefill(input_ids, kwargs.get("attention_mask"))
    done = 1
    while done < new and not engine.all_done():  # one host sync per chunk of steps, not per token
        chunk = min(new - done, 16)
        engine.decode(chunk)
        done += chunk
    out = engine.generated(done)
    if eos:  # transformers stops at the step where the last row finished
        ended = torch.isin(out, engine.eos)
        last = torch.where(ended.any(1), ended.int().argmax(1) + 1, done).max()
        out = out[:, : int(last)]
    return torch.cat([input_ids, out.to(input_ids.device)], dim=1)


@torch.no_grad()
def generate_many(model, prompts, *, batch_size: int = 8, cuda_graphs: bool | None = None, **kwargs) -> list[list[int]]:
    """New tokens for each prompt (lists or 1-D tensors of ids), in order, cut after the first end
    token. Prompts are sorted by length and run ``batch_size`` at a time, left-padded, through one
    engine (one cache, one captured graph) sized for the longest; a short last batch is filled up with
    copies of its first prompt so the batch size, and so the graph, never changes."""
    if not prompts:
        return []
    if kwargs.get("attention_mask") is not None:
        raise ValueError("generate_many builds the padding mask itself: pass prompts without attention_mask")
    seqs = [p.tolist() if isinstance(p, torch.Tensor) else list(p) for p in prompts]
    if any(not s for s in seqs):
        raise ValueError("every prompt needs at least one token")
    longest = max(map(len, seqs))
    new = _new_tokens(model, kwargs, longest)
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    b = min(batch_size, len(seqs))
    eos = _eos(model, kwargs)
    pad = _pad(model, kwargs, eos)
    dev = next(model.parameters()).device
    engine = DecodeEngine(model, b, longest + max(new, 1), eos=eos, pad=pad, cuda_graphs=cuda_graphs,
                          sampler=sampler_for(model, kwargs))
    results: list[list[int]] = [[] for _ in seqs]
    for start in range(0, len(order), b):
        idx = order[start : start + b]
        rows = [seqs[i] for i in idx] + [seqs[idx[0]]] * (b - len(idx))
        t = max(map(len, rows))
        ids = torch.tensor([[pad] * (t - len(r)) + r for r in rows], device=dev)
        mask = torch.tensor([[0] * (t - len(r)) + [1] * len(r) for r in rows], device=dev)
        out = generate_static(model, ids, engine=engine, attention_mask=mask,
                              **{k: v for k, v in kwargs.items() if k != "max_new_tokens"}, max_new_tokens=new)
        for row, i in enumerate(idx):
            toks = out[row, t:].tolist()
            cut = next((j + 1 for j, x in enumerate(toks) if x in eos), len(toks))
            results[i] = toks[:cut]
    return results
