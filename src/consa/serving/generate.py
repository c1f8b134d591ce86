"""``consa.generate``, and generation over the static engine: one left-padded batch, or many prompts in
fixed-size batches.

:func:`generate` takes the static path by default on CUDA (captured decode steps) and the eager
``HybridCache`` path elsewhere. The static path serves what ``model.generate`` does with greedy
decoding and sampling: transformers' own logits processors and stopping criteria (``min_new_tokens``,
``repetition_penalty``, ``stop_strings`` with a ``tokenizer``, end-token lists, warpers, a caller's
own lists, a streamer; ``options.py``) run eagerly on the logits of each captured step. What still
needs transformers' loop (beams, assistants, returned scores or attentions, …) takes the eager path
with one log line naming the option. A model's engine is kept between calls (:func:`engine_for`), so
a second call pays no capture or compile again; :func:`release` frees it.
"""

from __future__ import annotations

import logging
import weakref

import torch

from .. import compat
from ..models import (UnsupportedModelError, attention_layers, attention_modules, head_dim, hybrid_cache, plans_of,
                      text_config)
from . import options
from .engine import DecodeEngine

log = logging.getLogger("consa")

CHUNK = 16  # decode steps between host checks for finished rows
_engines: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> its last DecodeEngine


def _plans(model):
    """The model's fixed consa plans, or None when some layer has none."""
    try:
        return plans_of(model)
    except ValueError:
        return None


def model_blocker(model) -> str | None:
    """Why the static engine cannot hold this model's cache, or None."""
    if _plans(model) is None:
        return "the model has no fixed consa allocation on every layer"
    if len(attention_layers(model)) != text_config(model).num_hidden_layers:
        return "the decoder mixes attention with other layers (linear attention, convolutions)"
    if len({head_dim(m) for m in attention_modules(model)}) > 1:
        return "its attention layers differ in head size (one static buffer shape per cache)"
    return None


def static_supported(model, kwargs: dict) -> str | None:
    """None if the static path serves this call, else why not (one phrase)."""
    why = model_blocker(model)
    if why:
        return why
    option = options.eager_reason(model, kwargs)
    return f"{option} needs the eager path" if option else None


def static_by_default(model, kwargs: dict, *, on_cuda: bool) -> bool:
    """The path ``consa.generate`` takes when not told: static on CUDA (captured steps) for a model the
    engine can hold, unless an option needs transformers' loop. On CUDA the eager path is never silent:
    one log line names what sent the call there (a model the engine cannot hold, or an option)."""
    if not on_cuda:
        return False
    blocker = model_blocker(model)
    if blocker is not None:
        options.log_eager(f"this model ({blocker})", verb="takes")
        return False
    option = options.eager_reason(model, kwargs)
    if option:
        options.log_eager(option)
        return False
    return True


def bucket(length: int) -> int:
    """The cache length an engine gets for ``length`` slots: rounded up to 1/16 of its power of two
    (at most ~12% more), so calls of nearby lengths share one engine."""
    step = max(64, 1 << max(0, (length - 1).bit_length() - 4))
    return -(-length // step) * step


def engine_for(model, batch: int, length: int, *, cuda_graphs: bool | None = None, compile=None) -> DecodeEngine:
    """The engine kept for ``model`` if it serves ``batch`` rows of up to ``length`` slots with these
    options (same plans, same weights), else a new one that replaces it (one engine per model: its
    cache is the memory a call of that size needs anyway)."""
    engine = _engines.get(model)
    if engine is not None and engine.fits(model, batch, length, cuda_graphs, compile):
        return engine
    if engine is not None:  # free the old cache before allocating the new one
        del _engines[model], engine
        if next(model.parameters()).is_cuda:
            torch.cuda.empty_cache()
    engine = DecodeEngine(model, batch, bucket(length), cuda_graphs=cuda_graphs, compile=compile)
    _engines[model] = engine
    return engine


def release(model=None) -> None:
    """Drop the engine kept for ``model`` (every model's when None), freeing its cache and graphs."""
    if model is None:
        _engines.clear()
    else:
        _engines.pop(model, None)


def _run(engine: DecodeEngine, input_ids: torch.Tensor, plan: options.GenerationPlan) -> torch.Tensor:
    """One batch through ``engine`` as ``model.generate`` runs it: [B, T + n], n ≤ max_new_tokens."""
    b, t = input_ids.shape
    new = plan.max_new_tokens
    engine.set_stops(plan.eos, plan.pad)
    if plan.streamer is not None:
        plan.streamer.put(input_ids.cpu())
    if plan.greedy:  # the whole step, argmax included, is one replay
        engine.prefill(input_ids, plan.attention_mask)
        done = 1
        while done < new and not engine.all_done():  # one host sync per chunk of steps, not per token
            chunk = min(new - done, CHUNK)
            engine.decode(chunk)
            done += chunk
        out = engine.generated(done)
        if plan.eos:  # transformers stops at the step where the last row finished
            ended = torch.isin(out, engine.eos)
            last = torch.where(ended.any(1), ended.int().argmax(1) + 1, done).max()
            out = out[:, : int(last)]
    else:  # the captured forward, then transformers' processors, choice and stopping criteria
        engine.prefill(input_ids, plan.attention_mask, choose=False)
        finished_at = torch.full((b,), -1, dtype=torch.long, device=engine.device)
        n = 0
        while True:
            nxt = options.next_tokens(plan.processors, engine.sequences(n), engine.logits, plan.do_sample)
            nxt = engine.accept(nxt, pad_finished=plan.pad_finished)
            n += 1
            for stop in plan.stops:
                engine.done |= stop(engine.sequences(n), None).to(engine.device)
            finished_at = torch.where(engine.done & (finished_at < 0), n, finished_at)
            if plan.streamer is not None:
                plan.streamer.put(nxt.cpu())
            if n == new or ((plan.streamer is not None or n % CHUNK == 0) and engine.all_done()):
                break
            engine.forward()
        last = int(torch.where(finished_at < 0, n, finished_at).max())  # one sync: the step the last row ended
        out = engine.generated(last)
    if plan.streamer is not None:
        plan.streamer.end()
    return torch.cat([input_ids, out.to(input_ids.device)], dim=1)


@torch.no_grad()
def generate_static(model, input_ids: torch.Tensor, *, cuda_graphs: bool | None = None, engine: DecodeEngine | None = None,
                    compile=None, **kwargs) -> torch.Tensor:
    """Like ``model.generate(input_ids, ...)`` (prompt + new tokens, [B, T + n]; finished rows padded),
    through a :class:`DecodeEngine`: the model's kept one (:func:`engine_for`) unless ``engine`` is
    given. Raises ``ValueError`` naming an option that needs the eager path."""
    why = model_blocker(model)
    if why:
        raise ValueError(f"the static generation path does not apply: {why}")
    plan = options.plan(model, input_ids, kwargs)
    b, t = input_ids.shape
    if plan.max_new_tokens == 0:
        return input_ids
    if engine is None:
        engine = engine_for(model, b, t + plan.max_new_tokens, cuda_graphs=cuda_graphs, compile=compile)
    return _run(engine, input_ids, plan)


@torch.no_grad()
def generate_many(model, prompts, *, batch_size: int = 8, cuda_graphs: bool | None = None, compile=None,
                  **kwargs) -> list[list[int]]:
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
    why = model_blocker(model)
    if why:
        raise ValueError(f"the static generation path does not apply: {why}")
    dev = next(model.parameters()).device
    longest = max(map(len, seqs))
    first = options.plan(model, torch.tensor([seqs[max(range(len(seqs)), key=lambda i: len(seqs[i]))]], device=dev), kwargs)
    new, pad = first.max_new_tokens, first.pad
    if new == 0:
        return [[] for _ in seqs]
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    b = min(batch_size, len(seqs))
    engine = engine_for(model, b, longest + new, cuda_graphs=cuda_graphs, compile=compile)
    call = {k: v for k, v in kwargs.items() if k not in ("max_new_tokens", "max_length")}
    results: list[list[int]] = [[] for _ in seqs]
    for start in range(0, len(order), b):
        idx = order[start : start + b]
        rows = [seqs[i] for i in idx] + [seqs[idx[0]]] * (b - len(idx))
        t = max(map(len, rows))
        ids = torch.tensor([[pad] * (t - len(r)) + r for r in rows], device=dev)
        mask = torch.tensor([[0] * (t - len(r)) + [1] * len(r) for r in rows], device=dev)
        plan = options.plan(model, ids, dict(call, attention_mask=mask, max_new_tokens=new))
        out = _run(engine, ids, plan)
        for row, i in enumerate(idx):
            toks = out[row, t:].tolist()
            cut = next((j + 1 for j, x in enumerate(toks) if x in plan.eos), len(toks))
            results[i] = toks[:cut]
    return results


@torch.no_grad()
def generate(model, input_ids, *, static: bool | None = None, cuda_graphs: bool | None = None, compile=None, **kwargs):
    """Generate with the hybrid model's KV savings (``consa.generate``).

    ``input_ids`` a [B, T] tensor (left-padded, with ``attention_mask``): returns what
    ``model.generate`` returns. A list of prompts: returns a list of new-token lists
    (:func:`generate_many`, ``batch_size`` per batch).

    ``static``: None picks the static cache + captured-graph path on CUDA when the model allows it
    and logs one line for an option that needs the eager path (``model.generate`` with a fresh
    ``HybridCache``); False forces the eager path, True the static one (graphs on CUDA unless
    ``cuda_graphs=False``; ``compile``: the engine's compiled forward, ``consa.serving.compile``). A
    model without a consa allocation falls back to transformers' default cache.
    """
    if isinstance(input_ids, (list, tuple)):
        return generate_many(model, input_ids, cuda_graphs=cuda_graphs if static is not False else False, compile=compile,
                             **kwargs)
    if static is None:
        static = static_by_default(model, kwargs, on_cuda=next(model.parameters()).is_cuda)
    if static:
        return generate_static(model, input_ids, cuda_graphs=cuda_graphs, compile=compile, **kwargs)
    if "past_key_values" not in kwargs and "cache" not in kwargs:
        if _plans(model) is not None:
            try:
                kwargs.update(compat.cache_kwargs(hybrid_cache(model), model))
            except UnsupportedModelError as e:  # the same tokens, without the KV savings
                log.warning("consa.generate: %s", e)
    return model.generate(input_ids, **kwargs)
