"""A decode engine: one static hybrid cache, decode steps captured as CUDA graphs.

The eager path is host-bound at small batches (kernel launches, host syncs, cache copies: the GPU
idles most of each step). Here the batch size and the longest length are fixed up front, so every
tensor a decode step touches exists before the first step: the static cache's buffers, the token and
position inputs, a [B, 1, 1, L_max] padding mask (transformers hands a ready 4D mask through as is),
the sequences so far and the choice's outputs. A step (all layers, the Triton decode kernel reading the
length on the device) is captured once with ``torch.cuda.CUDAGraph`` and each token is one replay: no
launches from Python, no host sync until the caller looks at the tokens.

Two graphs, each captured on first use: the greedy step (forward, argmax, the next inputs), and the
forward alone, whose logits a caller's choice reads (logits processors and sampling: ``options.py``)
before :meth:`DecodeEngine.accept`. End tokens and the pad token live in device buffers that
:meth:`DecodeEngine.set_stops` refills, so one engine serves calls with other ones without a new
capture. With ``compile`` the forward runs through ``torch.compile`` (``compile.py``: fused norms,
RoPE and residuals) inside the same capture; by hand otherwise, the same code the eager path runs.

Without CUDA (or with ``cuda_graphs=False``) the same steps run eagerly: the CPU tests hold them to
the eager ``HybridCache`` path and to ``model.generate`` token for token. The prompt runs eagerly too
(the prefill kernels are already near their ideal), writing the same buffers the graphs read.
"""

from __future__ import annotations

import time
import weakref

import torch

from .. import compat
from ..attention.static_cache import StaticHybridCache
from ..models import attention_modules, plans_of
from ..models import head_dim as attention_head_dim
from .compile import CompiledForward, CompileOptions, decode_forward

EOS_SLOTS = 8  # end tokens a captured step compares against (more: a larger buffer and a new capture)


def static_cache(model, max_len: int, *, batch: int | None = None, rollback: int = 0) -> StaticHybridCache:
    """A :class:`StaticHybridCache` for ``model``'s fixed plans, allocated at once for ``batch`` sequences
    in the model's dtype and device (else at the first update)."""
    p = next(model.parameters())
    head_dim = attention_head_dim(attention_modules(model)[0])  # per module: a config may set it per layer
    return StaticHybridCache(plans_of(model), max_len, rollback=rollback, batch=batch, head_dim=head_dim, dtype=p.dtype,
                             device=p.device)


class DecodeEngine:
    """Static cache + graph-captured decode for ``batch`` sequences of at most ``max_len`` slots.

    ``eos``: token ids that end a sequence (it then emits ``pad``); ``cuda_graphs``: None = on CUDA;
    ``compile``: None/False, True, a mode name or :class:`~consa.serving.compile.CompileOptions`.
    ``sampler`` (logits [B, V] → tokens [B]): :meth:`decode` chooses with it after each captured
    forward instead of taking the argmax. The engine holds its model weakly (a cached engine must not
    keep a model alive) and the plans its cache was built for.
    """

    def __init__(self, model, batch: int, max_len: int, *, eos: list[int] | None = None, pad: int = 0,
                 cuda_graphs: bool | None = None, sampler=None, compile=None):
        p = next(model.parameters())
        self._model = weakref.ref(model)
        self.plans = plans_of(model)
        self.batch, self.max_len, self.device, self.dtype = batch, max_len, p.device, p.dtype
        self.weights_at = p.data_ptr()  # captured graphs read the weights where they were
        self.cache = static_cache(model, max_len, batch=batch)
        self.graphs = (p.device.type == "cuda") if cuda_graphs is None else cuda_graphs
        if self.graphs and p.device.type != "cuda":
            raise ValueError("cuda_graphs=True needs the model on a CUDA device")
        options = CompileOptions.of(compile)
        self.compiled = CompiledForward(options) if options else None
        self.sampler = sampler
        dev = p.device
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=dev)
        self.pos = torch.zeros(batch, 1, dtype=torch.long, device=dev)
        self.pad_mask = torch.ones(batch, max_len, dtype=torch.bool, device=dev)
        self.mask4 = self.pad_mask[:, None, None, :]
        self.seq = torch.zeros(batch, max_len, dtype=torch.long, device=dev)  # each row: its prompt, then new tokens
        self.col = torch.zeros(1, dtype=torch.long, device=dev)  # the next column of seq
        self.prompt_len = 0
        self.eos = torch.full((EOS_SLOTS,), -1, dtype=torch.long, device=dev)
        self.pad = torch.zeros((), dtype=torch.long, device=dev)
        self.done = torch.zeros(batch, dtype=torch.bool, device=dev)
        self.logits = None
        self._graphs: dict[str, torch.cuda.CUDAGraph] = {}
        self._graph_logits: dict[str, torch.Tensor] = {}
        self.capture_s = 0.0  # wall time spent capturing (compiling included), all graphs
        self._cache_kw = compat.cache_kwarg(model)
        self.set_stops(eos or [], pad)

    @property
    def model(self):
        model = self._model()
        if model is None:
            raise RuntimeError("the model of this DecodeEngine was freed")
        return model

    def set_stops(self, eos: list[int], pad: int) -> None:
        """The end tokens and the pad token of the next calls (in place: captured graphs see them)."""
        eos = sorted({int(e) for e in eos})
        if len(eos) > self.eos.numel():  # a larger buffer: graphs read the old one
            self.eos = torch.full((len(eos),), -1, dtype=torch.long, device=self.device)
            self._graphs.clear()
            self._graph_logits.clear()
        self.eos.fill_(-1)
        if eos:
            self.eos[: len(eos)] = torch.tensor(eos, dtype=torch.long, device=self.device)
        self.pad.fill_(int(pad))

    def fits(self, model, batch: int, length: int, cuda_graphs: bool | None, compile) -> bool:
        """Whether this engine serves a call of ``batch`` rows up to ``length`` slots on ``model`` as it
        is now (same weights where they were, same plans) with these options."""
        p = next(model.parameters())
        graphs = (p.device.type == "cuda") if cuda_graphs is None else cuda_graphs
        try:
            plans = plans_of(model)
        except ValueError:
            return False
        same_plans = len(plans) == len(self.plans) and all(a is b for a, b in zip(plans, self.plans))
        options = CompileOptions.of(compile)
        return (self._model() is model and batch == self.batch and length <= self.max_len and same_plans
                and p.device == self.device and p.dtype == self.dtype and p.data_ptr() == self.weights_at
                and graphs == self.graphs and options == (self.compiled.options if self.compiled else None))

    # ---- one step -----------------------------------------------------------------------------------
    def _forward(self) -> torch.Tensor:
        if self.compiled is not None:
            return self.compiled(self.model, self.ids, self.mask4, self.pos, self.cache)
        return decode_forward(self.model, self.ids, self.mask4, self.pos, self.cache, self._cache_kw)

    def _accept(self, nxt: torch.Tensor, pad_finished: bool = True) -> torch.Tensor:
        """Record the chosen tokens and make them the next inputs (device ops only)."""
        if pad_finished:
            nxt = torch.where(self.done, self.pad, nxt)
        self.done |= torch.isin(nxt, self.eos)
        self.seq.index_copy_(1, self.col, nxt[:, None])
        self.col.add_(1)
        self.ids.copy_(nxt[:, None])
        self.pos.add_(1)
        return nxt

    def _greedy_step(self) -> torch.Tensor:
        logits = self._forward()
        self._accept(logits.argmax(-1))
        return logits

    def _set_seen(self, n: int) -> None:
        """The host mirrors of the length (replayed or compiled steps move only the device ones)."""
        for layer in self.cache.layers:
            layer.seen = n

    @torch.no_grad()
    def capture(self, kind: str = "greedy") -> None:
        """Capture the ``kind`` step ("greedy" or "logits") unless done. It runs on an empty cache (the
        warm-up writes land on slots a prompt overwrites or that stay past the length), so it belongs
        before a prompt; every state it touched is put back."""
        if kind in self._graphs:
            return
        if kind not in ("greedy", "logits"):
            raise ValueError(f"unknown step kind {kind!r}: greedy or logits")
        step = self._greedy_step if kind == "greedy" else self._forward
        start = time.perf_counter()
        self._reset_state()
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # warm-up: Triton and inductor compile, cuBLAS picks its kernels
            for _ in range(2):
                step()
        torch.cuda.current_stream(self.device).wait_stream(side)
        self._reset_state()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = step()
        self._graphs[kind], self._graph_logits[kind] = graph, logits
        self._reset_state()
        torch.cuda.synchronize(self.device)
        self.capture_s += time.perf_counter() - start

    def _reset_state(self) -> None:
        self.cache.set_length(0)
        self.done.zero_()
        self.col.zero_()
        self.ids.zero_()
        self.pos.zero_()

    def _replay(self, kind: str) -> bool:
        graph = self._graphs.get(kind)
        if graph is None:
            return False
        graph.replay()
        self.logits = self._graph_logits[kind]
        return True

    # ---- the public steps ------------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *, choose: bool = True) -> None:
        """Run a left-padded prompt batch [batch, T] eagerly; ``choose``: also pick the first new token
        (argmax, or the sampler), else leave the prompt's last logits to the caller (:meth:`accept`)."""
        b, t = input_ids.shape
        if b != self.batch:
            raise ValueError(f"engine built for batch {self.batch}, got {b} prompts")
        if t >= self.max_len:
            raise ValueError(f"prompt of {t} tokens leaves no room in a cache of {self.max_len}")
        if self.graphs:
            self.capture("greedy" if choose and self.sampler is None else "logits")
        self._reset_state()
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(input_ids.device)
        self.pad_mask.fill_(True)
        self.pad_mask[:, :t] = mask.bool()
        self.seq[:, :t] = input_ids
        self.col.fill_(t)
        self.prompt_len = t
        pos = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=pos, use_cache=True,
                         logits_to_keep=1, **{self._cache_kw: self.cache})
        self.pos.copy_(mask.long().sum(-1, keepdim=True) - 1)
        self.logits = out.logits[:, -1]
        if choose:
            self._accept(self.logits.argmax(-1) if self.sampler is None else self.sampler(self.logits))

    def _check_room(self, steps: int) -> int:
        start = self.cache.layers[0].seen
        if start + steps > self.max_len:
            raise ValueError(f"{steps} steps after {start} slots overflow the cache of {self.max_len}")
        return start

    @torch.no_grad()
    def decode(self, steps: int) -> None:
        """``steps`` decode steps (each: a forward over the last chosen tokens, then the next choice:
        argmax inside the captured step, or the sampler after the captured forward)."""
        start = self._check_room(steps)
        for _ in range(steps):
            if self.sampler is None:
                if not self._replay("greedy"):
                    self.logits = self._greedy_step()
            else:
                if not self._replay("logits"):
                    self.logits = self._forward()
                self._accept(self.sampler(self.logits))
        self._set_seen(start + steps)

    @torch.no_grad()
    def forward(self) -> torch.Tensor:
        """One decode step's forward over the last accepted tokens; returns its logits [B, V] (a
        captured graph's output buffer when captured) for the caller to choose from."""
        start = self._check_room(1)
        if not self._replay("logits"):
            self.logits = self._forward()
        self._set_seen(start + 1)
        return self.logits

    @torch.no_grad()
    def accept(self, tokens: torch.Tensor, *, pad_finished: bool = True) -> torch.Tensor:
        """Take the caller's choice [B] as the next tokens; ``pad_finished``: rows already done emit the
        pad token instead. Returns the tokens taken."""
        return self._accept(tokens.to(self.device), pad_finished)

    def all_done(self) -> bool:
        """Whether every sequence has ended (one host sync)."""
        return bool(self.done.all())

    def sequences(self, n: int) -> torch.Tensor:
        """Prompts and the first ``n`` new tokens [B, T + n] (a view)."""
        return self.seq[:, : self.prompt_len + n]

    def generated(self, n: int) -> torch.Tensor:
        """The first ``n`` new tokens [B, n] (a view)."""
        return self.seq[:, self.prompt_len : self.prompt_len + n]
