"""What one attention layer runs, as plain data: its plan, its kernel choice, and the key containers.

A :class:`LayerPlan` hangs on each attention module consa attaches to (a plain attribute, so state
dicts stay the model's own); caches are built from plans, and the registered attention function reads
them. Each plan carries its :class:`KernelConfig`: which kernel runs each kind of call is decided from
it (``select.py``), never from module globals. The containers (:class:`SplitKV`, :class:`GroupedKV`,
:class:`RingKV`, :class:`HeadParts`) are what the caches hand to the attention function in place of a
key tensor. This module imports no other part of consa's attention, so every other part can import it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch

from ..allocation import AllocationError
from ..errors import ConsaError


@dataclass(frozen=True)
class KeySlots:
    """Cache slots of a key tensor: the first ``num_sinks`` keys sit at slots 0…S−1, the rest at
    ``offset``, ``offset``+1, … . Plain keys are ``KeySlots()`` (slot j for key j). Plain ints, so
    kernel choice never needs a device sync."""

    num_sinks: int = 0
    offset: int = 0

    def positions(self, length: int, device) -> torch.Tensor:
        idx = torch.arange(length, device=device)
        return torch.where(idx < self.num_sinks, idx, idx - self.num_sinks + self.offset)

    def is_identity(self) -> bool:
        return self.num_sinks == 0 and self.offset == 0


class KernelConfigError(ConsaError, ValueError):
    """A kernel setting names no kernel, or two settings contradict each other."""


SWA_PREFILL_NAMES = ("auto", "sdpa", "flex", "chunked", "flash", "triton")
HYBRID_PREFILL_NAMES = ("split", "fused", "triton")


@dataclass(frozen=True)
class KernelConfig:
    """Which kernel runs each kind of attention call, and the kernels' tuning. Defaults are the
    measured best on the H200 (docs/SERVING.md); ``select.py`` turns a config and a call into a kernel.

    A kernel named here (not "auto") is forced: where the call is of its kind but the kernel cannot
    run it (device, dtype, gradients), selection raises with the reason instead of quietly running
    another. "sdpa" / "split" / 0 name the plain path, which runs everything.
    """

    # sliding-window prefill over plain slots (no padding mask, Tq = Tk): "auto" (CUDA fp16/bf16 without
    # gradients: "chunked" from chunked_min_window up, else "triton"; otherwise flex from 1024 queries on
    # CUDA), "sdpa" (dense-mask SDPA), "flex", "chunked", "flash" or "triton". H200, torch 2.11, 12 SWA q
    # heads, ms: W=512 (flex / triton): 8K 0.115 / 0.098, 32K 0.437 / 0.382, 128K 1.703 / 1.372;
    # W=4096 (chunked / triton): 32K 1.567 / 1.902 (flex 1.94, flash 2.74)
    swa_prefill: str = "auto"
    chunked_min_window: int = 2048
    # a fixed hybrid layer's plain inference prefill: "split" (FA heads on SDPA + SWA heads on their own
    # kernel, merged), "fused" (one FlexAttention call, per-head block mask) or "triton" (one launch of the
    # banded kernel, per-head windows). Both one-call kernels lose on the H200: fused 1.31-1.57x ideal,
    # triton 1.32-1.75x (its causal part runs at ~0.7x cuDNN's speed)
    hybrid_prefill: str = "split"
    # causal prefill on CUDA fp16/bf16: 0 = one SDPA call; d > 0: split_causal(depth=d) where T splits
    # evenly. H200, 8K, 4 heads: depth 1 0.167 against 0.186 ms, but slower with more heads, from 16K up,
    # and inside the hybrid layer (benchmarks/causal_split.py)
    split_depth: int = 0
    # hybrid prefill: SWA heads on a side stream beside the FA heads (CUDA): True, False, or "auto" = up
    # to overlap_max_tokens queries. With overlap_priority it never lost on the H200: 8K-32K 3-25%
    # faster, 128K within 2% (W=4096 / 50% FA: 72.1 -> 69.0 ms)
    prefill_overlap: bool | str = True
    overlap_max_tokens: int = 32768
    # overlapped prefill: which head group's stream gets a high priority, so the GPU dispatches its
    # blocks first and the other group's fill the SMs it leaves idle: "fa", "swa", None, or "auto" = the
    # group with the larger estimated time. H200, 8K / W=512 / 25% FA: 0.284 ms without priorities,
    # 0.226 with the FA heads first
    overlap_priority: str | None = "auto"
    # time per visible pair of the SWA kernel relative to the FA heads' causal SDPA (H200: triton
    # 1.9-2.3 at W=512; chunked at W=4096 1.3-1.4 at 8K, 1.2-1.25 at 32K), for overlap_priority "auto"
    triton_pair_cost: float = 2.2
    chunked_pair_cost: float = 1.4
    # decode over the hybrid cache: "auto" = both head groups in one Triton split-KV launch where it
    # applies (CUDA, at most triton_decode.MAX_QUERIES queries, every held key inside the window), else
    # SDPA per group; "sdpa" = always SDPA per group
    decode: str = "auto"
    decode_overlap: bool = True  # SDPA decode: the SWA heads' kernel on a side stream beside the FA heads'
    # the chunked kernel's flash calls on CUDA: "cudnn" (FA2 where cuDNN refuses) or "flash" (FA2); its row
    # reversals and LSE merges as compiled (Triton) kernels
    chunk_attn: str = "cudnn"
    chunk_compile: bool = True
    flex_options: tuple[tuple[str, int], ...] = ()  # FlexAttention kernel_options, e.g. (("BLOCK_M", 128),)
    # let the Triton kernels take CPU tensors under Triton's interpreter (tests only: slow)
    triton_on_cpu: bool = False

    def __post_init__(self):
        def one_of(name, allowed):
            if getattr(self, name) not in allowed:
                raise KernelConfigError(f"KernelConfig.{name} must be one of {', '.join(map(repr, allowed))}, "
                                 f"got {getattr(self, name)!r}")

        one_of("swa_prefill", SWA_PREFILL_NAMES)
        one_of("hybrid_prefill", HYBRID_PREFILL_NAMES)
        one_of("decode", ("auto", "sdpa"))
        one_of("prefill_overlap", (True, False, "auto"))
        one_of("overlap_priority", ("auto", "fa", "swa", None))
        one_of("chunk_attn", ("cudnn", "flash"))
        if not isinstance(self.split_depth, int) or self.split_depth < 0:
            raise KernelConfigError(f"KernelConfig.split_depth must be an int >= 0, got {self.split_depth!r}")
        # a one-call hybrid prefill runs the SWA heads on its own kernel: a plan whose SWA kernel is
        # forced to another one cannot have it
        need = {"fused": ("auto", "flex"), "triton": ("auto", "triton")}.get(self.hybrid_prefill)
        if need and self.swa_prefill not in need:
            raise KernelConfigError(f"KernelConfig: hybrid_prefill={self.hybrid_prefill!r} runs the SWA heads on its own "
                             f"kernel; swa_prefill must be {' or '.join(map(repr, need))}, got {self.swa_prefill!r}")

    @classmethod
    def from_backend(cls, backend: str = "auto") -> "KernelConfig":
        """The config a ``backend`` name asks for (the CLI's ``--backend``): the SWA prefill kernel."""
        return cls(swa_prefill=backend)

    def changed(self) -> dict:
        """The fields that differ from the defaults (for records and messages)."""
        default = KernelConfig()
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) != getattr(default, f.name)}


class GateMix:
    """Gate values shared by all layers during search: ``z`` is [num_layers, num_kv_heads]."""

    def __init__(self) -> None:
        self.z: torch.Tensor | None = None


@dataclass
class LayerPlan:
    layer: int
    num_kv_heads: int
    window: int
    sinks: int = 0
    mode: str = "fixed"  # "fixed" | "gate" | "full"
    fa_kv: list[int] = field(default_factory=list)
    gate_mix: GateMix | None = None
    kernels: KernelConfig = field(default_factory=KernelConfig)

    windows: tuple[int | None, ...] | None = None  # per KV head when SWA heads differ in span, else None
    menu: tuple[int | None, ...] | None = None  # gate mode over a span menu (None = full): z is [H_kv, K] weights

    @classmethod
    def from_allocation(cls, alloc, layer: int, kernels: KernelConfig | None = None) -> "LayerPlan":
        """The fixed plan of ``layer`` (a native sliding layer keeps its own window, no sinks). SWA heads
        of one span give today's plan (``windows=None``); several spans fill ``windows``, ``window``
        being the largest."""
        kernels = kernels or KernelConfig()
        heads = alloc.head_windows(layer)
        swa = [hw for hw in heads if hw is not None]
        spans, sinks = {w for w, _ in swa}, {s for _, s in swa}
        if len(sinks) > 1:
            raise AllocationError(f"layer {layer}: its SWA heads mix fixed (native) and searched units; one sink count per layer is served")
        if len(spans) <= 1:
            window, sinks = alloc.layer_window(layer)
            return cls(layer, alloc.shape.num_kv_heads, window, sinks, "fixed", fa_kv=alloc.fa_heads(layer), kernels=kernels)
        windows = tuple(None if hw is None else hw[0] for hw in heads)
        return cls(layer, alloc.shape.num_kv_heads, max(spans), sinks.pop(), "fixed", fa_kv=alloc.fa_heads(layer),
                   kernels=kernels, windows=windows)

    @property
    def swa_kv(self) -> list[int]:
        fa = set(self.fa_kv)
        return [h for h in range(self.num_kv_heads) if h not in fa]

    @property
    def multi_span(self) -> bool:
        return self.windows is not None and len({w for w in self.windows if w is not None}) > 1

    @property
    def span_groups(self) -> list[tuple[int, list[int]]]:
        """(window, SWA KV heads) per distinct window, ascending; one group (the plan's window) unless
        ``windows`` says otherwise."""
        if not self.multi_span:
            return [(self.window, self.swa_kv)] if self.swa_kv else []
        return [(w, [h for h, x in enumerate(self.windows) if x == w]) for w in sorted({w for w in self.windows if w is not None})]


# ---- what a cache hands the attention function instead of a key tensor ------------------------------
@dataclass
class SplitKV:
    """Keys (or values) of one layer held apart by head group: FA heads keep every slot, SWA heads
    only what a future query can still see, at ``swa_slots``. Returned by the hybrid cache."""

    fa: torch.Tensor  # [B, n_fa, T, D]
    swa: torch.Tensor  # [B, n_swa, m, D]
    swa_slots: KeySlots


@dataclass
class RingKV:
    """Keys (or values) of one layer of a static hybrid cache in a decode step: the FA heads'
    preallocated buffer [B, n_fa, L_max, D], the SWA heads' ring [B, n_swa, S + M, D], and the slots
    written so far as a device tensor, so attention never reads a host length."""

    fa: torch.Tensor
    swa: torch.Tensor
    length: torch.Tensor  # int64 [1], on the device
    ring: int  # M: slot t >= S sits at S + (t - S) mod M


@dataclass
class GroupedKV:
    """Keys (or values) of a layer whose SWA heads differ in span, from the hybrid cache: the FA heads'
    keys [B, n_fa, T, D] and, per span group of the plan (``LayerPlan.span_groups`` order), the keys that
    group holds and their slots."""

    fa: torch.Tensor
    groups: list[tuple[torch.Tensor, KeySlots]]


@dataclass
class HeadParts:
    """Keys (or values) of a layer cached in head groups (the static cache of a layer whose SWA heads
    differ in span): per part, its single-window plan, the selector of its KV heads in the layer (a
    slice or a device index tensor) and what its inner static layer returned (:class:`RingKV` in a
    decode step, :class:`SplitKV` for a later chunk, plain keys for a part without SWA heads)."""

    parts: list[tuple[LayerPlan, object, object]]


# ---- head selectors ----------------------------------------------------------------------------------
def take(x: torch.Tensor, sel) -> torch.Tensor:
    """The heads (dim 1) of ``x`` that ``sel`` names: a slice (a view) or an index tensor."""
    return x[:, sel] if isinstance(sel, slice) else x.index_select(1, sel.to(x.device))


def kv_selector(idx: list[int]):
    """A slice for contiguous head lists (a view, no copy), else an index tensor; empty: an empty slice."""
    if not idx:
        return slice(0, 0)
    if idx == list(range(idx[0], idx[0] + len(idx))):
        return slice(idx[0], idx[0] + len(idx))
    return torch.tensor(idx)


def head_selectors(idx: list[int], group: int):
    """(query-head selector, KV-head selector) of a list of KV heads with GQA group ``group``: slices
    when contiguous (views), else index tensors; None for an empty list."""
    if not idx:
        return None
    if idx == list(range(idx[0], idx[0] + len(idx))):
        return slice(idx[0] * group, (idx[-1] + 1) * group), slice(idx[0], idx[-1] + 1)
    q_idx = torch.tensor([h * group + j for h in idx for j in range(group)])
    return q_idx, torch.tensor(idx)


def device_selector(heads: list[int], device):
    """A slice for contiguous heads, else an index tensor made on ``device`` (a captured step never
    copies from the host)."""
    if heads == list(range(heads[0], heads[0] + len(heads))):
        return slice(heads[0], heads[-1] + 1)
    return torch.tensor(heads, device=device)


def query_selector(kv_sel, group: int, device):
    """The query heads of a KV-head selector (GQA group ``group``), computed on the device."""
    if isinstance(kv_sel, slice):
        return slice(kv_sel.start * group, kv_sel.stop * group)
    return (kv_sel[:, None] * group + torch.arange(group, device=device)).flatten()
