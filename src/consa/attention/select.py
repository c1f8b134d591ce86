"""Which kernel runs an attention call: one selector over the plan's :class:`KernelConfig`.

:func:`choose` maps a config, the kind of call (``role``) and its tensors to the kernel that runs it,
or None for the plain path (SDPA, dense band where needed; for a layer with a logit soft cap or sink
logits, ``mods``, the dense math path of ``softcap_sinks``). Each kernel says why it cannot run a call
(its module's ``why_not``: device, dtype, gradients, shape, a soft cap it cannot take); "auto" takes
the first candidate with no reason, a kernel the config names is forced: where it cannot run,
:class:`KernelUnavailable` says why.
Whether a call is of a role at all (a plain prefill, a decode step over held keys, …) is the caller's
business: ``attend.attention`` and the hybrid attention function ask only for calls of that kind.

Roles and the config field that names their kernel:

* ``swa_prefill`` (``swa_prefill``): a sliding-window prefill over plain slots (no mask, Tq = Tk);
* ``hybrid_prefill`` (``hybrid_prefill``): a fixed hybrid layer's plain inference prefill in one call;
* ``causal_prefill`` (``split_depth``): a causal prefill, split into uniform flash calls where T
  divides (a tuning knob: where it does not apply the plain call runs, no error);
* ``decode`` (``decode``): both head groups of the eager hybrid cache in one Triton launch;
* ``static_decode`` / ``static_write``: the static cache's Triton decode and write, where they run
  (else dense torch ops; the static cache has no SDPA path to prefer).

Tests and benchmarks give plans a config (``LayerPlan(..., kernels=KernelConfig(...))``,
``apply_allocation(model, alloc, kernels=...)``) or switch a model's for a block with :func:`override`.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import replace
from functools import partial

import torch

from ..errors import ConsaError
from . import chunked, kernels, split_causal, triton_decode, triton_prefill
from .plan import KernelConfig, LayerPlan
from .softcap_sinks import LogitMods

__all__ = ["KernelConfig", "KernelUnavailable", "choose", "override", "overlap_prefill", "overlap_priority", "decode_overlap"]

ROLES = ("swa_prefill", "hybrid_prefill", "causal_prefill", "decode", "static_decode", "static_write")
_HALF = (torch.float16, torch.bfloat16)


class KernelUnavailable(ConsaError, ValueError):
    """A kernel the config forces cannot run the call; the message says why."""


def _grad(*xs) -> bool:
    return torch.is_grad_enabled() and any(x.requires_grad for x in xs)


def _swa_candidates(config: KernelConfig, q, k, v, window: int, mods: LogitMods | None = None) -> list[str]:
    """"auto" for a sliding-window prefill: on CUDA fp16/bf16 without gradients the chunked kernel from
    ``chunked_min_window`` up, else the banded Triton one (then flex); otherwise flex from
    ``kernels.FLEX_MIN_QUERIES`` queries on CUDA (flex alone carries gradients); else the dense SDPA.
    With logit mods (soft cap, sink logits; ``softcap_sinks``) the plain path is the dense math one,
    so the Triton kernel (which takes both) goes first wherever it runs, then the chunked one where it
    can (sink logits only), then flex."""
    if mods is not None:
        out = ["triton"] if (q.is_cuda or config.triton_on_cpu) and not _grad(q, k, v) else []
        if q.is_cuda and q.dtype in _HALF and window >= config.chunked_min_window and mods.softcap is None:
            out.insert(0, "chunked")
        return out + (["flex"] if q.is_cuda and q.shape[-2] >= kernels.FLEX_MIN_QUERIES else [])
    out = []
    if q.is_cuda and q.dtype in _HALF and not _grad(q, k, v):
        out = ["chunked"] if window >= config.chunked_min_window else ["triton"]
    if q.is_cuda and q.shape[-2] >= kernels.FLEX_MIN_QUERIES:
        out.append("flex")
    return out


def _why_not(config: KernelConfig, role: str, name: str, q, kv, mods: LogitMods | None = None) -> str | None:
    softcap = None if mods is None else mods.softcap
    if role == "swa_prefill":
        k, v = kv
        return {"flex": lambda: kernels.flex_why_not(q),
                "chunked": lambda: chunked.why_not(q, k, v, softcap),
                "flash": lambda: chunked.flash_why_not(q, k, v, softcap),
                "triton": lambda: triton_prefill.why_not(q, k, v, config.triton_on_cpu)}[name]()
    if role == "hybrid_prefill":  # "fused": FlexAttention, eager (a slow CPU twin) off CUDA
        return None if name == "fused" else triton_prefill.why_not(q, *kv, on_cpu=config.triton_on_cpu)
    if role == "causal_prefill":
        if name == "split":
            return "the split causal kernel takes no soft cap or sink logits" if mods is not None else \
                split_causal.why_not(q, kv[0], config.split_depth)
        return kernels.flex_why_not(q) if name == "flex" else triton_prefill.why_not(q, *kv, on_cpu=config.triton_on_cpu)
    return triton_decode.why_not(q, *kv, on_cpu=config.triton_on_cpu)  # decode, static_decode, static_write


def _entry(config: KernelConfig, role: str, name: str):
    """The kernel's entry point, its tuning from ``config`` bound in (looked up at call time, so that
    a test's spy on a module attribute sees the call)."""
    tuning = {"cudnn": config.chunk_attn == "cudnn", "compile": config.chunk_compile}
    if role == "swa_prefill":
        return {"flex": lambda: partial(kernels.flex_sliding, options=config.flex_options),
                "chunked": lambda: partial(chunked.chunked_sliding, **tuning),
                "flash": lambda: partial(chunked.flash_sliding, **tuning),
                "triton": lambda: triton_prefill.sliding}[name]()
    if role == "hybrid_prefill":
        return partial(kernels.flex_hybrid, options=config.flex_options) if name == "fused" else triton_prefill.hybrid
    if role == "causal_prefill":
        return {"flex": lambda: partial(kernels.flex_causal, options=config.flex_options),
                "triton": lambda: triton_prefill.causal,
                "split": lambda: partial(split_causal.split_causal, depth=config.split_depth, **tuning)}[name]()
    if role == "static_write":
        return triton_decode.write_static
    return triton_decode.hybrid_decode


def choose(config: KernelConfig, role: str, q: torch.Tensor, *kv: torch.Tensor, window: int | None = None,
           mods: LogitMods | None = None):
    """The kernel for a call of kind ``role`` over ``q`` and ``kv`` (the call's key/value tensors), or
    None for the plain path. ``window``: the SWA window (``swa_prefill`` "auto" picks by it). ``mods``:
    the call's soft cap / sink logits; only kernels that compute them are taken (the entry points then
    take ``softcap=`` and ``sink_logits=`` keywords), and without one the plain path is the dense
    math one (``softcap_sinks.dense_attention``), not SDPA.

    Entry points: ``swa_prefill`` ``(q, k, v, window, sinks, scale)``; ``hybrid_prefill`` "fused"
    ``(q, k, v, fa_heads, window, sinks, scale)``, "triton" ``(q, k, v, fa_kv, window, sinks, scale)``;
    ``causal_prefill`` ``(q, k, v, scale)`` (with mods: the Triton or flex kernel over a window of T,
    never split); ``decode`` / ``static_decode``
    ``triton_decode.hybrid_decode``; ``static_write`` ``triton_decode.write_static``."""
    if role == "swa_prefill":
        field, named = "swa_prefill", config.swa_prefill
        names = _swa_candidates(config, q, *kv, window, mods) if named == "auto" else [] if named == "sdpa" else [named]
    elif role == "hybrid_prefill":
        field, named = "hybrid_prefill", config.hybrid_prefill
        names = [] if named == "split" else [named]
    elif role == "causal_prefill" and mods is not None:  # SDPA takes no mods: the kernels that do, never forced
        field, named = "split_depth", "auto"
        names = [n for n in _swa_candidates(config, q, *kv, q.shape[-2], mods) if n != "chunked"]
    elif role == "causal_prefill":  # a tuning knob, never forced
        field, named, names = "split_depth", "auto", (["split"] if config.split_depth else [])
    elif role == "decode":
        field, named, names = "decode", "auto", (["triton"] if config.decode == "auto" else [])
    elif role in ("static_decode", "static_write"):
        field, named, names = None, "auto", ["triton"]
    else:
        raise ValueError(f"unknown attention role {role!r} (one of {', '.join(ROLES)})")
    for name in names:
        reason = _why_not(config, role, name, q, kv, mods)
        if reason is None:
            return _entry(config, role, name)
        if named != "auto":
            raise KernelUnavailable(f"KernelConfig.{field}={named!r} cannot run this call: {reason}")
    return None


# ---- two head groups on two streams ---------------------------------------------------------------
def overlap_wanted(config: KernelConfig, num_queries: int) -> bool:
    """``prefill_overlap`` for a prefill of this many queries ("auto": up to ``overlap_max_tokens``)."""
    if config.prefill_overlap == "auto":
        return 1 < num_queries <= config.overlap_max_tokens
    return bool(config.prefill_overlap) and num_queries > 1


def overlap_prefill(config: KernelConfig, q: torch.Tensor) -> bool:
    """Whether a hybrid prefill of these queries runs its SWA heads on a side stream (CUDA, inference)."""
    return q.is_cuda and overlap_wanted(config, q.shape[-2]) and not _grad(q)


def decode_overlap(config: KernelConfig, q: torch.Tensor) -> bool:
    """Whether a decode step over the split cache runs the SWA heads' SDPA on a side stream (CUDA)."""
    return q.shape[-2] == 1 and q.is_cuda and config.decode_overlap


def overlap_priority(config: KernelConfig, n_fa: int, n_swa: int, t: int, window: int) -> str | None:
    """``overlap_priority`` for a prefill of ``t`` tokens with ``n_fa`` / ``n_swa`` heads (KV or query
    heads alike: only the ratio counts): "fa", "swa" or None ("auto": the group whose kernel is
    estimated to take longer, from its visible pairs)."""
    if config.overlap_priority != "auto":
        return config.overlap_priority or None
    pairs = t * window - window * (window - 1) // 2 if window < t else t * (t + 1) // 2
    cost = config.chunked_pair_cost if window >= config.chunked_min_window else config.triton_pair_cost
    return "fa" if n_fa * t * (t + 1) / 2 >= n_swa * pairs * cost else "swa"


# ---- switching a model's kernels for a block ----------------------------------------------------------
def _plans(target) -> list[LayerPlan]:
    if isinstance(target, LayerPlan):
        return [target]
    if isinstance(target, torch.nn.Module):
        return [p for m in target.modules() if isinstance(p := getattr(m, "consa_plan", None), LayerPlan)]
    return list(target)


@contextmanager
def override(target, config: KernelConfig | None = None, **changes):
    """Within the block, every plan of ``target`` (a model with consa attached, a plan, or plans) runs
    ``config``, or its own config with ``changes`` (field=value); afterwards each gets its own back.
    Caches built inside the block keep the kernels they were built with."""
    plans = _plans(target)
    if not plans:
        raise ValueError("override: no consa plans found (attach gates or apply an allocation first)")
    saved = [p.kernels for p in plans]
    try:
        for p in plans:
            p.kernels = config if config is not None else replace(p.kernels, **changes)
        yield
    finally:
        for p, k in zip(plans, saved):
            p.kernels = k
