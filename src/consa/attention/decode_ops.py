"""The static cache's decode write as a torch custom op, for a compiled decode step.

The serving engine can run its decode step through ``torch.compile`` (``consa.serving.compile``) so
that inductor fuses the model's norms, RoPE, residual adds and activations. Dynamo would otherwise
trace into the kernel choice (``select.choose``: device capabilities, Triton's settings) and the
Triton launch, and break the graph there. As a custom op with a shape-only fake, the write is one
opaque call in the compiled graph; at run time it takes the eager path unchanged (the Triton kernel
where it runs, else torch ops). The cache calls it only while dynamo traces
(``torch.compiler.is_compiling()``); the attention over the written buffers is its twin,
``cached.static_decode``.
"""

from __future__ import annotations

import torch

from . import select
from .plan import KernelConfig
from .triton_decode import head_tables


@torch.library.custom_op("consa::static_write", mutates_args=("k_fa", "v_fa", "k_swa", "v_swa"))
def static_write(k: torch.Tensor, v: torch.Tensor, k_fa: torch.Tensor, v_fa: torch.Tensor, k_swa: torch.Tensor,
                 v_swa: torch.Tensor, length: torch.Tensor, num_kv_heads: int, fa_kv: list[int], sinks: int, ring: int,
                 triton_on_cpu: bool) -> None:
    """A decode step's key and value [B, H_kv, 1, D] into slot ``length``: FA heads at that index, SWA
    heads at their ring index (``StaticHybridLayer``'s layout); one Triton launch where it runs."""
    write = select.choose(KernelConfig(triton_on_cpu=triton_on_cpu), "static_write", k, v, k_fa, k_swa)
    if k.stride(-1) == 1 and v.stride(-1) == 1 and write:
        write(k, v, k_fa, v_fa, k_swa, v_swa, head_tables(num_kv_heads, tuple(fa_kv), k.device), length, sinks, ring)
        return
    fa = set(fa_kv)
    swa = [h for h in range(num_kv_heads) if h not in fa]
    if fa_kv:
        sel = torch.tensor(list(fa_kv), device=k.device)
        k_fa.index_copy_(2, length, k.index_select(1, sel))
        v_fa.index_copy_(2, length, v.index_select(1, sel))
    if swa:
        sel = torch.tensor(swa, device=k.device)
        idx = length - ring * ((length - sinks).clamp(min=0) // ring)
        k_swa.index_copy_(2, idx, k.index_select(1, sel))
        v_swa.index_copy_(2, idx, v.index_select(1, sel))


@static_write.register_fake
def _static_write_shape(k, v, k_fa, v_fa, k_swa, v_swa, length, num_kv_heads, fa_kv, sinks, ring, triton_on_cpu):
    return None
