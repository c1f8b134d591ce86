"""The engine's compiled decode forward: torch.compile around the model's own forward, the CUDA graph
still captured by the engine.

At one sequence a decode step is a long chain of tiny kernels (GEMMs at M = 1, the model's RMSNorm
casts and means, RoPE, residual adds, SiLU·mul): launch gaps and the read of each intermediate cost
more than the weights' bytes. Inductor fuses the elementwise work into a few kernels per layer; with
``freeze`` it also treats the weights as constants, which lets it concatenate the q/k/v and the
gate/up projections into one GEMM each (its concat-linear pattern) at the price of a copy of those
weights. The static cache's write and the Triton decode kernel stay opaque custom ops
(``attention.decode_ops.static_write``, ``attention.cached.static_decode``). The model's forward is
not replaced: the compiled function calls it, and the engine captures the compiled step like the
eager one. Modes with inductor's own CUDA graphs ("reduce-overhead", "max-autotune") are refused:
the engine captures the graph itself.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .. import compat

MODES = ("default", "max-autotune-no-cudagraphs")
RECOMPILE_LIMIT = 64  # engines of other shapes or allocations compile again; dynamo's default (8) would silently stop


@dataclass(frozen=True)
class CompileOptions:
    """``mode``: a torch.compile mode without CUDA graphs; ``freeze``: inductor freezing (weights as
    constants: QKV and gate/up GEMMs concatenated, plus a copy of those weights in memory)."""

    mode: str = "default"
    freeze: bool = False

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"compile mode {self.mode!r}: the engine captures its own CUDA graph, so one of {', '.join(MODES)}")

    @classmethod
    def of(cls, value) -> "CompileOptions | None":
        """None/False: off; True: the defaults; a mode name; or options as they are."""
        if value is None or value is False:
            return None
        if value is True:
            return cls()
        if isinstance(value, str):
            return cls(value)
        if isinstance(value, cls):
            return value
        raise TypeError(f"compile= takes None, a bool, a mode name or CompileOptions, not {type(value).__name__}")

    def inductor_options(self) -> dict:
        opts = dict(torch._inductor.list_mode_options(self.mode))
        opts["freezing"] = self.freeze
        return opts


def decode_forward(model, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, cache, cache_kw: str) -> torch.Tensor:
    """One decode step's forward: the logits [B, V] of the last position."""
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1, **{cache_kw: cache})
    return out.logits[:, -1]


class CompiledForward:
    """``decode_forward`` through torch.compile (static shapes: one compile per engine shape)."""

    def __init__(self, options: CompileOptions):
        from ..attention import cached, decode_ops  # noqa: F401  (the custom ops must exist before dynamo traces)

        self.options = options
        self.fn = torch.compile(decode_forward, dynamic=False, options=options.inductor_options())
        self.compile_s: float | None = None  # wall time of the first call (the compile)

    def __call__(self, model, ids, mask, pos, cache) -> torch.Tensor:
        patch = {"recompile_limit": RECOMPILE_LIMIT} if hasattr(torch._dynamo.config, "recompile_limit") else {"cache_size_limit": RECOMPILE_LIMIT}
        # freezing set while dynamo traces too: then it guards on the weights' identity (no stale constants)
        with torch._dynamo.config.patch(**patch), torch._inductor.config.patch(freezing=self.options.freeze):
            if self.compile_s is None:
                t = time.perf_counter()
                out = self.fn(model, ids, mask, pos, cache, compat.cache_kwarg(model))
                if out.is_cuda:
                    torch.cuda.synchronize(out.device)
                self.compile_s = time.perf_counter() - t
                return out
            return self.fn(model, ids, mask, pos, cache, compat.cache_kwarg(model))
