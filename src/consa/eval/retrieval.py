"""Retrieval accuracy over context length × needle depth, by greedy generation and exact match.

Items come from :func:`consa.data.tasks.make_items` (deterministic per cell seed), so the full-
attention model, the all-SWA model and every allocation answer exactly the same prompts. Generation
is batched with **left padding**: real tokens of every row end at the same slot, positions are
``cumsum(attention_mask) − 1``, and consa's sliding window (defined over cache slots) covers the same
real tokens as without padding (with sinks on, rows of unequal length are never batched together,
since the sink slots would be padding).

A prediction is read from the greedy continuation: leading whitespace dropped, cut at the first
newline, the first ``k`` whitespace-separated words kept (``k`` = words in the answer), trailing
sentence punctuation removed unless the answer itself ends in punctuation. It must then equal the
answer exactly.
"""

from __future__ import annotations

import zlib
from typing import Callable, Sequence

import torch

from ..compat import cache_kwargs, output_cache
from ..errors import ConsaError
from .quality import autocast_context, model_device

PUNCT = ".,;:!?)]}'\"`"
GenerateFn = Callable[[list[str], int], list[str]]


# ---- reading an answer -----------------------------------------------------------------------------
def extract_prediction(continuation: str, answer: str) -> str:
    """The part of a greedy continuation that is compared with ``answer`` (see module docstring)."""
    text = continuation.lstrip().split("\n", 1)[0]
    ans = answer.strip()
    pred = " ".join(text.split()[: max(1, len(ans.split()))])
    if not (ans and ans[-1] in PUNCT):
        pred = pred.rstrip(PUNCT)
    return pred


def exact_match(prediction: str, answer: str) -> bool:
    return prediction.strip() == answer.strip()


def default_score(predictions: Sequence[str], items: Sequence) -> float:
    if len(predictions) != len(items):
        raise ValueError("predictions and items differ in length")
    if not items:
        return 0.0
    return sum(exact_match(p, it.answer) for p, it in zip(predictions, items)) / len(items)


# ---- greedy generation -------------------------------------------------------------------------------
def _pad_id(tokenizer) -> int:
    for name in ("pad_token_id", "eos_token_id", "unk_token_id"):
        v = getattr(tokenizer, name, None)
        if v is not None:
            return int(v)
    return 0


def encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text)["input_ids"])


@torch.no_grad()
def _hybrid_cache(model):
    """Under a fixed consa allocation, decode with the per-head hybrid cache (SWA heads keep W−1
    slots) so the eval uses the memory a deployment would; otherwise let the model make its own."""
    if getattr(getattr(model, "config", None), "_attn_implementation", None) != "consa":
        return None
    from ..attention.cache import HybridCache
    from ..models import plans_of

    try:
        return HybridCache(plans_of(model))
    except ValueError:  # some layer is not in fixed mode
        return None


def greedy_generate_ids(
    model, batch: list[list[int]], max_new_tokens: int, *, pad_id: int = 0, eos_id: int | None = None, autocast: str | None = None
) -> list[list[int]]:
    """Greedy continuation of each token list (left-padded into one batch); stops early when every row
    has produced ``eos_id``. Returns the new tokens per row (up to and excluding EOS)."""
    device = model_device(model)
    longest = max(len(x) for x in batch)
    ids = torch.full((len(batch), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), longest), dtype=torch.long)
    for r, toks in enumerate(batch):
        if toks:
            ids[r, longest - len(toks) :] = torch.tensor(toks, dtype=torch.long)
            mask[r, longest - len(toks) :] = 1
    ids, mask = ids.to(device), mask.to(device)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    out_tokens: list[list[int]] = [[] for _ in batch]
    done = [False] * len(batch)
    cache = _hybrid_cache(model)
    step_ids, step_pos = ids, pos
    for _ in range(max_new_tokens):
        with autocast_context(device, autocast):
            out = model(
                input_ids=step_ids, attention_mask=mask, position_ids=step_pos,
                **cache_kwargs(cache, model), use_cache=True, logits_to_keep=1,
            )
        cache = output_cache(out)
        nxt = out.logits[:, -1].float().argmax(-1)
        for r, t in enumerate(nxt.tolist()):
            if done[r]:
                continue
            if eos_id is not None and t == eos_id:
                done[r] = True
            else:
                out_tokens[r].append(t)
        if all(done):
            break
        step_ids = nxt[:, None]
        step_pos = step_pos[:, -1:] + 1
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return out_tokens


def model_generate_fn(model, tokenizer, *, batch_size: int = 4, autocast: str | None = None, sinks: int = 0) -> GenerateFn:
    """A ``generate(prompts, max_new_tokens) -> continuations`` over ``model`` (batched, left padded)."""
    pad_id, eos_id = _pad_id(tokenizer), getattr(tokenizer, "eos_token_id", None)

    def generate(prompts: list[str], max_new_tokens: int) -> list[str]:
        encoded = [encode(tokenizer, p) for p in prompts]
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        results: list[str | None] = [None] * len(encoded)
        groups: list[list[int]] = []
        for i in order:  # similar lengths together; with sinks only equal lengths (see module doc)
            g = groups[-1] if groups else None
            if g is None or len(g) >= batch_size or (sinks and len(encoded[g[0]]) != len(encoded[i])):
                groups.append([i])
            else:
                g.append(i)
        for g in groups:
            new = greedy_generate_ids(model, [encoded[i] for i in g], max_new_tokens, pad_id=pad_id, eos_id=eos_id, autocast=autocast)
            for i, toks in zip(g, new):
                results[i] = tokenizer.decode(toks, skip_special_tokens=True)
        return [r or "" for r in results]

    return generate


# ---- the grid ----------------------------------------------------------------------------------------
def cell_seed(seed: int, task: str, length: int, depth: float) -> int:
    """Deterministic, distinct seed per (task, length, depth) cell."""
    return (seed * 1_000_003 + zlib.crc32(f"{task}:{length}:{depth:.6f}".encode())) % (2**31 - 1)


def build_items(
    tokenizer,
    tasks: Sequence[str],
    lengths: Sequence[int],
    depths: Sequence[float],
    n: int,
    seed: int = 0,
    *,
    haystack=None,
    make_items: Callable | None = None,
    errors: dict | None = None,
    digits: int = 5,
) -> dict[tuple[str, int, float], list]:
    """All task items of a grid, keyed by (task, length, depth).

    A cell the task cannot build (length too short for its needles, depth unreachable with this
    tokenizer) raises ConsaError, or — when an ``errors`` dict is given — is recorded there
    (key → reason) and left empty, so the rest of the grid still runs.

    ``haystack`` (strings or a :class:`~consa.data.haystack.Haystack`) replaces the filler of the text
    tasks (passkey, multikey) only; varrecall keeps its Python source and mqar its key lines. A
    haystack too short for the longest text-task length is a ConsaError up front, never a skipped cell."""
    extra = {} if digits == 5 else {"digits": int(digits)}  # 5 is make_items' own default
    if make_items is None:
        from ..data.tasks import make_items
    from ..data.haystack import TEXT_TASKS, Haystack

    if haystack is not None:

        haystack = haystack if isinstance(haystack, Haystack) else Haystack.from_texts(haystack)
        text_lengths = [int(x) for t in tasks if t in TEXT_TASKS for x in lengths]
        if text_lengths:
            haystack.check_length(tokenizer, max(text_lengths))
    cells = {}
    for task in tasks:
        for length in lengths:
            for depth in depths:
                try:
                    hay = haystack if task in TEXT_TASKS else None
                    items = make_items(task, tokenizer, int(length), float(depth), int(n), cell_seed(seed, task, length, depth), haystack=hay, **extra)
                except (ConsaError, ValueError, KeyError) as e:
                    msg = f"cannot make {task} items at length {length}, depth {depth}: {e}"
                    if errors is None:
                        raise ConsaError(msg) from None
                    errors[(task, int(length), float(depth))] = str(e)
                    items = []
                cells[(task, int(length), float(depth))] = list(items)
    return cells


def run_grid(
    generate: GenerateFn,
    cells: dict[tuple[str, int, float], list],
    tokenizer=None,
    *,
    score: Callable | None = None,
    max_new_tokens: int | None = None,
    progress: bool = False,
    desc: str = "retrieval",
    examples_per_cell: int = 1,
    errors: dict | None = None,
) -> dict:
    """Accuracy of ``generate`` on every cell. Returns ``{task: grid}`` with
    ``grid = {"lengths", "depths", "items", "accuracy": [[acc per depth] per length], "prompt_tokens",
    "examples": [...], "skipped": [{"length", "depth", "reason"}]}``; a skipped (empty) cell's accuracy
    is None. ``errors``: the reasons :func:`build_items` recorded."""
    if score is None:
        try:
            from ..data.tasks import score
        except ModuleNotFoundError:
            score = default_score
    tasks: dict[str, dict] = {}
    for task, length, depth in cells:
        g = tasks.setdefault(task, {"lengths": [], "depths": []})
        if length not in g["lengths"]:
            g["lengths"].append(length)
        if depth not in g["depths"]:
            g["depths"].append(depth)
    for g in tasks.values():
        g["lengths"].sort()
        g["depths"].sort()
        g["accuracy"] = [[None] * len(g["depths"]) for _ in g["lengths"]]
        g["prompt_tokens"] = [[None] * len(g["depths"]) for _ in g["lengths"]]
        g["items"] = 0
        g["examples"] = []
        g["skipped"] = []
    for (task, length, depth), reason in (errors or {}).items():
        if task in tasks:
            tasks[task]["skipped"].append({"length": length, "depth": depth, "reason": reason})
    keys = list(cells)
    if progress:
        from tqdm.auto import tqdm

        keys = tqdm(keys, desc=desc, unit="cell", leave=False)
    for key in keys:
        task, length, depth = key
        items = cells[key]
        g = tasks[task]
        if not items:
            continue
        if max_new_tokens is not None:
            budget = max_new_tokens
        elif tokenizer is not None:
            budget = max(len(tokenizer(it.answer, add_special_tokens=False)["input_ids"]) for it in items) + 4
        else:
            budget = 16
        conts = generate([it.prompt for it in items], budget)
        preds = [extract_prediction(c, it.answer) for c, it in zip(conts, items)]
        li, di = g["lengths"].index(length), g["depths"].index(depth)
        g["accuracy"][li][di] = float(score(preds, items))
        g["prompt_tokens"][li][di] = sum(getattr(it, "num_tokens", 0) for it in items) / len(items)
        g["items"] = max(g["items"], len(items))
        for it, c, p in list(zip(items, conts, preds))[:examples_per_cell]:
            g["examples"].append(
                {"length": length, "depth": depth, "answer": it.answer, "prediction": p, "continuation": c,
                 "correct": exact_match(p, it.answer)}
            )
    return tasks


def length_accuracy(grid: dict) -> list[float | None]:
    """Mean accuracy over depths at each length of one task's grid."""
    out = []
    for row in grid["accuracy"]:
        vals = [v for v in row if v is not None]
        out.append(sum(vals) / len(vals) if vals else None)
    return out
