"""A decode engine: one static hybrid cache, one captured CUDA graph of the whole decode step.

The eager path is host-bound at small batches (kernel launches, host syncs, cache copies: the GPU
idles most of each step). Here the batch size and the longest length are fixed up front, so every
tensor a decode step touches exists before the first step: the static cache's buffers, the token and
position inputs, a [B, 1, 1, L_max] padding mask (transformers hands a ready 4D mask through as is),
and the greedy choice's outputs. The step (all layers, the Triton decode kernel reading the length on
the device, argmax, the next inputs) is captured once with ``torch.cuda.CUDAGraph`` and each token is
one replay: no launches from Python, no host sync until the caller looks at the tokens. Capturing by
hand (not ``torch.compile``) keeps the step the same code the eager path runs, with no recompiles.

Without CUDA (or with ``cuda_graphs=False``) the same step runs eagerly: the CPU tests hold it to
the eager ``HybridCache`` path token for token. The prompt runs eagerly too (the prefill kernels are
already near their ideal), writing the same buffers the graph reads.
"""

from __future__ import annotations

import torch

from .. import compat
from ..attention.static_cache import StaticHybridCache


def _cfg(model):
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


class DecodeEngine:
    """Static cache + graph-captured decode for ``batch`` sequences of at most ``max_len`` slots.

    ``eos``: token ids that end a sequence (it then emits ``pad``); ``cuda_graphs``: None = on CUDA.
    Greedy steps are captured whole; with a ``sampler`` (logits [B, V] → tokens [B]) the forward is
    captured and the choice runs eagerly after it.
    """

    def __init__(self, model, batch: int, max_len: int, *, eos: list[int] | None = None, pad: int = 0,
                 cuda_graphs: bool | None = None, sampler=None):
        p = next(model.parameters())
        self.model, self.batch, self.max_len, self.device = model, batch, max_len, p.device
        self.cache = StaticHybridCache(model, max_len, batch=batch, dtype=p.dtype, device=p.device)
        self.graphs = (p.device.type == "cuda") if cuda_graphs is None else cuda_graphs
        if self.graphs and p.device.type != "cuda":
            raise ValueError("cuda_graphs=True needs the model on a CUDA device")
        self.sampler = sampler
        dev = p.device
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=dev)
        self.pos = torch.zeros(batch, 1, dtype=torch.long, device=dev)
        self.pad_mask = torch.ones(batch, max_len, dtype=torch.bool, device=dev)
        self.mask4 = self.pad_mask[:, None, None, :]
        self.eos = torch.tensor(sorted(set(eos or [])) or [-1], dtype=torch.long, device=dev)
        self.pad = pad
        self.done = torch.zeros(batch, dtype=torch.bool, device=dev)
        self.tokens = torch.zeros(batch, max_len, dtype=torch.long, device=dev)  # generated tokens, by step
        self.step_i = torch.zeros(1, dtype=torch.long, device=dev)
        self.logits = None
        self._graph = None
        self._cache_kw = compat.cache_kwarg(model)

    # ---- one step -----------------------------------------------------------------------------------
    def _forward(self) -> torch.Tensor:
        out = self.model(input_ids=self.ids, attention_mask=self.mask4, position_ids=self.pos, use_cache=True,
                         logits_to_keep=1, **{self._cache_kw: self.cache})
        return out.logits[:, -1]

    def _accept(self, nxt: torch.Tensor) -> None:
        """Record the chosen tokens and make them the next inputs (device ops only)."""
        nxt = torch.where(self.done, self.pad, nxt)
        self.done |= torch.isin(nxt, self.eos)
        self.tokens.index_copy_(1, self.step_i, nxt[:, None])
        self.step_i.add_(1)
        self.ids.copy_(nxt[:, None])
        self.pos.add_(1)

    def _step(self) -> None:
        self.logits = self._forward()
        if self.sampler is None:
            self._accept(self.logits.argmax(-1))

    @torch.no_grad()
    def _capture(self) -> None:
        """Capture the step on an empty cache (its warm-up writes land on slots a prompt overwrites or
        that stay past the length), then put every state it touched back."""
        self.cache.set_length(0)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # warm-up: Triton compiles, cuBLAS picks its kernels
            for _ in range(2):
                self._step()
        torch.cuda.current_stream(self.device).wait_stream(side)
        self._reset_state()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._step()
        self._graph = graph
        self._reset_state()

    def _reset_state(self) -> None:
        self.cache.set_length(0)
        self.done.zero_()
        self.step_i.zero_()
        self.ids.zero_()
        self.pos.zero_()

    # ---- the public steps ------------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> None:
        """Run a left-padded prompt batch [batch, T] eagerly and choose the first new token."""
        b, t = input_ids.shape
        if b != self.batch:
            raise ValueError(f"engine built for batch {self.batch}, got {b} prompts")
        if t >= self.max_len:
            raise ValueError(f"prompt of {t} tokens leaves no room in a cache of {self.max_len}")
        if self.graphs and self._graph is None:
            self._capture()
        self._reset_state()
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(input_ids.device)
        self.pad_mask.fill_(True)
        self.pad_mask[:, :t] = mask.bool()
        pos = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=pos, use_cache=True,
                         logits_to_keep=1, **{self._cache_kw: self.cache})
        self.pos.copy_(mask.long().sum(-1, keepdim=True) - 1)
        self.logits = out.logits[:, -1]
        self._choose()

    def _choose(self) -> None:
        nxt = self.logits.argmax(-1) if self.sampler is None else self.sampler(self.logits)
        self._accept(nxt)

    @torch.no_grad()
    def decode(self, steps: int) -> None:
        """``steps`` decode steps (each: a forward over the last chosen tokens, then the next choice)."""
        start = self.cache.layers[0].seen
        if start + steps > self.max_len:
            raise ValueError(f"{steps} steps after {start} slots overflow the cache of {self.max_len}")
        for _ in range(steps):
            if self._graph is not None:
                self._graph.replay()
            else:
                self._step()
            if self.sampler is not None:
                self._accept(self.sampler(self.logits))
        if self._graph is not None:  # the replays moved the device lengths; the host mirrors follow
            for layer in self.cache.layers:
                layer.seen = start + steps

    def all_done(self) -> bool:
        """Whether every sequence has emitted an end token (one host sync)."""
        return bool(self.done.all())

    def generated(self, n: int) -> torch.Tensor:
        return self.tokens[:, :n]
