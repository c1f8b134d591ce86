"""One decode step over the first rows of a slot pool: run eagerly, or replayed from a CUDA graph.

An eager step of a small model is bound by the host: some forty kernel launches a layer from Python.
With ``graphs`` the step over rows 0…R−1 is captured once for each R in 1, 2, 4, … (the batch grows
and shrinks, so a width takes the smallest captured R that covers it; the extra rows ride along at
their own lengths, as any row in range does) and each step is one replay. Everything a captured step
reads lives in static buffers (token ids, lengths) or is recomputed from them on the device
(:meth:`~consa.serving.slots.RowsCache.begin_step`), and the FA heads read whole buffers up to the
longest row through the Triton kernel, so one graph serves any lengths. Without CUDA (or with
``graphs=False``) the same step runs eagerly and reads up to the longest row only.
"""

from __future__ import annotations

import torch

from .. import compat
from .slots import SlotPool


class PoolStep:
    """``step(lengths, ids, width)`` → logits [width, V] of rows 0…width−1 (``lengths``/``ids``: the
    tokens held and the next token of every slot, used up to the captured width)."""

    def __init__(self, model, pool: SlotPool, graphs: bool | None = None):
        self.model, self.pool = model, pool
        self.device = pool.device
        self.graphs = (self.device.type == "cuda") if graphs is None else graphs
        if self.graphs and self.device.type != "cuda":
            raise ValueError("graphs=True needs the model on a CUDA device")
        n = pool.num_slots
        self.ids = torch.zeros(n, 1, dtype=torch.long, device=self.device)
        self.pos = torch.zeros(n, 1, dtype=torch.long, device=self.device)
        self.mask4 = torch.ones(n, 1, 1, 1, dtype=torch.bool, device=self.device)  # handed through as is
        self._cache_kw = compat.cache_kwarg(model)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._mempool = None

    def _forward(self, r: int, cache) -> torch.Tensor:
        out = self.model(input_ids=self.ids[:r], position_ids=self.pos[:r], attention_mask=self.mask4[:r], use_cache=True,
                         logits_to_keep=1, **{self._cache_kw: cache})
        return out.logits[:, -1]

    def width_for(self, width: int) -> int:
        """Rows a step of ``width`` computes: ``width`` eagerly, else the smallest captured size ≥ it."""
        if not self.graphs:
            return width
        r = 1
        while r < width:
            r *= 2
        return min(r, self.pool.num_slots)

    @torch.no_grad()
    def __call__(self, lengths: list[int], ids: list[int], width: int) -> torch.Tensor:
        r = self.width_for(width)
        self.pool.check_lengths(lengths[:r])
        self.pos[:r, 0].copy_(torch.tensor(lengths[:r]), non_blocking=True)
        self.ids[:r, 0].copy_(torch.tensor(ids[:r]), non_blocking=True)
        if not self.graphs:
            return self._forward(r, self.pool.decode_cache(lengths[:r], self.pos[:r, 0]))[:width]
        if r not in self._graphs:
            self._capture(r)
        graph, logits = self._graphs[r]
        graph.replay()
        return logits[:width]

    def _capture(self, r: int) -> None:
        """Warm up on a side stream (Triton compiles, cuBLAS picks its kernels), then capture. The
        warm-up steps write each row's key where this step's replay writes it again, so nothing held
        changes."""
        cache = self.pool.static_cache(self.pos[:r, 0])
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self._forward(r, cache)
        torch.cuda.current_stream(self.device).wait_stream(side)
        if self._mempool is None:
            self._mempool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._mempool):
            logits = self._forward(r, cache)
        self._graphs[r] = (graph, logits)
