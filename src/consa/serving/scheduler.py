"""Continuous batching over a :class:`~consa.serving.slots.SlotPool`.

Requests wait in a bounded FIFO queue; at each step boundary the scheduler

1. drops cancelled requests (queued or running: the slot is free for this very step),
2. admits queued requests into free slots,
3. runs prompt chunks of admitted requests, oldest first, up to ``prefill_tokens`` tokens in all
   (one forward per chunk through a view of the request's row; a chunk that ends the prompt
   chooses the first new token); while no request is decoding there is no stream to keep flowing,
   so the budget is ``idle_prefill_tokens`` instead (a prompt that fits goes in whole, through the
   hybrid prefill kernels of an empty row, the path of a bare prefill),
4. runs one decode step over every request that has its first token (one forward, each row at its
   own length), and retires the requests that end (end token, ``max_tokens``, or the slot is full).

So a long prompt enters in pieces between decode steps, and running streams keep flowing. Every
request is computed as if alone (its own positions, its own keys, a row of its own): greedy tokens
equal ``consa.generate`` on that prompt, whatever else runs (tests/test_scheduler.py).

:class:`Scheduler` is single-threaded (tests drive :meth:`Scheduler.step`); :class:`EngineThread` runs
it in a background thread and takes submissions and cancellations from any thread.
"""

from __future__ import annotations

import collections
import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .. import compat
from .pool_step import PoolStep
from .slots import NAME, SlotPool, register


class QueueFull(Exception):
    """The waiting queue is at capacity: try again later."""


class EngineStopped(QueueFull):
    """The engine thread has stopped (shutdown, or it died): nothing will be served."""


@dataclass
class Sampling:
    """Greedy unless ``temperature`` > 0: then temperature, top-k, top-p (transformers' order), drawn
    from a generator seeded with ``seed`` (None: a random seed)."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


@dataclass
class Request:
    """One generation. ``on_event(tokens, finish_reason)`` is called from the engine's thread with each
    batch of new tokens (finish_reason None) and once at the end (its reason: ``stop`` an end token,
    ``length`` max_tokens or the context, ``cancelled``, ``error: ...``)."""

    prompt: list[int]
    max_tokens: int
    eos: tuple[int, ...] = ()
    sampling: Sampling = field(default_factory=Sampling)
    on_event: Callable[[list[int], str | None], None] | None = None
    id: int = field(default_factory=itertools.count().__next__)
    # engine state
    output: list[int] = field(default_factory=list)
    slot: int | None = None
    done_prompt: int = 0
    finish_reason: str | None = None
    arrived: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    finished_at: float | None = None
    _gen: torch.Generator | None = None

    @property
    def length(self) -> int:
        """Tokens in the row: the prompt part written and every new token but the last (its key is
        written by the next decode step)."""
        return self.done_prompt + max(0, len(self.output) - 1)


class Scheduler:
    """Continuous batching of ``model`` (a fixed consa allocation on every layer) over a slot pool.

    ``num_slots``: sequences held at once; ``max_len``: tokens per sequence (prompt + new);
    ``prefill_tokens``: prompt tokens per step (the chunk size) while some request decodes;
    ``idle_prefill_tokens``: the same while none does (default: 4 × ``prefill_tokens``, which also
    bounds the prefill activations); ``max_queue``: waiting requests
    before :meth:`submit` raises :class:`QueueFull`; ``kernel``: the FA heads' decode attention
    (:class:`~consa.serving.slots.SlotPool`); ``graphs``: replay decode steps from CUDA graphs
    (:class:`~consa.serving.pool_step.PoolStep`; None = on CUDA)."""

    def __init__(self, model, *, num_slots: int, max_len: int, prefill_tokens: int = 512, max_queue: int = 64,
                 plans=None, kernel: str = "auto", graphs: bool | None = None, idle_prefill_tokens: int | None = None):
        from ..models import is_attention_kind, layer_kinds, plans_of

        idle_prefill_tokens = 4 * prefill_tokens if idle_prefill_tokens is None else idle_prefill_tokens
        if prefill_tokens < 1 or max_queue < 0 or idle_prefill_tokens < prefill_tokens:
            raise ValueError(f"prefill_tokens must be >= 1, idle_prefill_tokens >= prefill_tokens and max_queue >= 0 "
                             f"(got {prefill_tokens}, {idle_prefill_tokens}, {max_queue})")
        others = sorted({k for k in layer_kinds(model) if not is_attention_kind(k)})
        if others:  # their recurrent / convolution states would need slots of their own
            raise ValueError(f"continuous batching holds attention layers only, and this decoder also has "
                             f"{', '.join(others)} layers; generate with consa.generate instead")
        register()
        self.model = model
        self.plans = plans if plans is not None else plans_of(model)
        self._use_serve_attention()
        self.pool = SlotPool.for_model(model, num_slots, max_len, self.plans, kernel=kernel)
        self.decode_step = PoolStep(model, self.pool, graphs)
        self.max_len, self.prefill_tokens, self.max_queue = max_len, prefill_tokens, max_queue
        self.idle_prefill_tokens = idle_prefill_tokens
        self.device = next(model.parameters()).device
        self.vocab = model.get_output_embeddings().weight.shape[0]
        self.queue: collections.deque[Request] = collections.deque()
        self.running: dict[int, Request] = {}  # slot -> request (prefilling or decoding)
        self.free = list(range(num_slots - 1, -1, -1))  # a stack: the lowest slot first
        self._cache_kw = compat.cache_kwarg(model)
        self.steps = 0
        self.generated = 0  # tokens emitted since start
        self.trace: list[tuple[int, int, int, float]] | None = None  # set to [] to log decode steps (benchmarks)

    def _use_serve_attention(self) -> None:
        """The model attends through ``consa_serve`` (consa's attention plus the pool's decode step);
        checked every step, since ``apply_allocation`` sets the name back to ``consa``."""
        if self.model.config._attn_implementation != NAME:
            self.model.set_attn_implementation(NAME)

    # ---- intake ----------------------------------------------------------------------------------
    def check(self, prompt_len: int, max_tokens: int) -> None:
        """Raise ValueError (one sentence) when a request cannot be served at all."""
        if prompt_len < 1:
            raise ValueError("the prompt is empty")
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
        if prompt_len + max_tokens > self.max_len:
            raise ValueError(f"the prompt ({prompt_len} tokens) plus max_tokens ({max_tokens}) exceeds the model's "
                             f"context of {self.max_len} tokens")

    def submit(self, req: Request) -> Request:
        self.check(len(req.prompt), req.max_tokens)
        if len(self.queue) >= self.max_queue:
            raise QueueFull(f"{len(self.queue)} requests are waiting (the queue holds {self.max_queue})")
        if not req.sampling.greedy:
            req._gen = torch.Generator(device=self.device)
            req._gen.manual_seed(req.sampling.seed if req.sampling.seed is not None else torch.seed())
        self.queue.append(req)
        return req

    def cancel(self, req: Request) -> None:
        """Drop a queued or running request now (its slot is free for the next step)."""
        if req.finish_reason is not None:
            return
        if req.slot is None:
            if req in self.queue:
                self.queue.remove(req)
        self._finish(req, "cancelled")

    # ---- state -----------------------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        return bool(self.queue or self.running)

    def slots_used(self) -> int:
        return len(self.running)

    def _finish(self, req: Request, reason: str) -> None:
        req.finish_reason, req.finished_at = reason, time.perf_counter()
        if req.slot is not None:
            del self.running[req.slot]
            self.free.append(req.slot)
            self.free.sort(reverse=True)
            req.slot = None
        if req.on_event:
            req.on_event([], reason)

    def _emit(self, req: Request, token: int) -> None:
        if req.first_token_at is None:
            req.first_token_at = time.perf_counter()
        req.output.append(token)
        self.generated += 1
        if req.on_event:
            req.on_event([token], None)
        if token in req.eos:
            self._finish(req, "stop")
        elif len(req.output) >= req.max_tokens or len(req.prompt) + len(req.output) >= self.max_len:
            self._finish(req, "length")

    # ---- the step ----------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> None:
        """One step: admit, prompt chunks, one decode step (see the module docstring)."""
        self._use_serve_attention()
        while self.queue and self.free:
            req = self.queue.popleft()
            req.slot = self.free.pop()
            self.running[req.slot] = req
        decoding = [r for r in self.running.values() if r.done_prompt == len(r.prompt)]
        budget = self.prefill_tokens if decoding else self.idle_prefill_tokens
        for req in sorted((r for r in self.running.values() if r.done_prompt < len(r.prompt)), key=lambda r: r.id):
            if budget <= 0:
                break
            n = min(budget, len(req.prompt) - req.done_prompt)
            budget -= n
            self._prefill(req, n)
        if decoding:
            self._decode([r for r in decoding if r.finish_reason is None])
        self.steps += 1

    def _prefill(self, req: Request, n: int) -> None:
        start = req.done_prompt
        ids = torch.tensor([req.prompt[start : start + n]], device=self.device)
        pos = torch.arange(start, start + n, device=self.device)[None]
        out = self.model(input_ids=ids, position_ids=pos, use_cache=True, logits_to_keep=1,
                         **{self._cache_kw: self.pool.prefill_view(req.slot, start)})
        logits = out.logits[:, -1]
        req.done_prompt += n
        if req.done_prompt == len(req.prompt):
            self._emit(req, self._choose([req], logits)[0])

    def _decode(self, reqs: list[Request]) -> None:
        """One token for each of ``reqs``: a forward over pool rows 0…R−1 (R = the highest of their slots
        + 1; the other rows in range ride along at their own length, see ``slots``)."""
        if not reqs:
            return
        width = max(r.slot for r in reqs) + 1
        n = self.pool.num_slots
        lengths, ids = [0] * n, [0] * n
        for slot, r in self.running.items():
            lengths[slot] = r.length
        for r in reqs:
            ids[r.slot] = r.output[-1]
        t0 = time.perf_counter()
        logits = self.decode_step(lengths, ids, width)
        rows = torch.tensor([r.slot for r in reqs], device=self.device)
        tokens = self._choose(reqs, logits.index_select(0, rows))  # on the host: the step has finished
        if self.trace is not None:  # (rows computed, rows decoding, FA slots its rows read together, seconds)
            r = self.decode_step.width_for(width)
            if self.pool.reads_own_length():
                fa = sum(lengths[:r]) + r
            else:  # the torch path: every row up to the longest (eager) or whole buffers (captured)
                fa = r * (self.pool.max_len if self.decode_step.graphs else max(lengths[:r]) + 1)
            self.trace.append((r, len(reqs), fa, time.perf_counter() - t0))
        for req, tok in zip(reqs, tokens):
            self._emit(req, tok)

    def _choose(self, reqs: list[Request], logits: torch.Tensor) -> list[int]:
        """Greedy rows by argmax (one sync for the batch), sampled rows each with its own generator."""
        out = logits.argmax(-1).tolist()
        for i, req in enumerate(reqs):
            if not req.sampling.greedy:
                out[i] = _sample(logits[i : i + 1], req.sampling, req._gen)
        return out


def _sample(logits: torch.Tensor, s: Sampling, gen: torch.Generator) -> int:
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    scores = logits.float()
    if s.temperature != 1.0:
        scores = TemperatureLogitsWarper(s.temperature)(None, scores)
    if s.top_k:
        scores = TopKLogitsWarper(s.top_k)(None, scores)
    if s.top_p < 1.0:
        scores = TopPLogitsWarper(s.top_p)(None, scores)
    return int(torch.multinomial(scores.softmax(-1), 1, generator=gen)[0, 0])


class EngineThread:
    """A :class:`Scheduler` stepping in a background thread. :meth:`submit` and :meth:`cancel` are safe
    from any thread; they take effect at the next step boundary. ``on_step(scheduler, seconds)`` runs
    in the engine thread after each step (metrics)."""

    def __init__(self, scheduler: Scheduler, on_step: Callable[[Scheduler, float], None] | None = None):
        self.sched, self.on_step = scheduler, on_step
        self._lock = threading.Condition()
        self._inbox: list[tuple[str, Request]] = []
        self._stop = False
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="consa-engine", daemon=True)

    def start(self) -> "EngineThread":
        self._thread.start()
        return self

    def submit(self, req: Request) -> Request:
        """Queue a request; raises ValueError (cannot be served) or QueueFull now, in the caller's thread."""
        with self._lock:
            if self._stop or not self._thread.is_alive():
                raise EngineStopped("the engine has stopped (the server is shutting down)")
            self.sched.check(len(req.prompt), req.max_tokens)
            waiting = len(self.sched.queue) + sum(kind == "submit" for kind, _ in self._inbox)
            if waiting >= self.sched.max_queue:
                raise QueueFull(f"{waiting} requests are waiting (the queue holds {self.sched.max_queue})")
            self._inbox.append(("submit", req))
            self._lock.notify()
        return req

    def cancel(self, req: Request) -> None:
        with self._lock:
            self._inbox.append(("cancel", req))
            self._lock.notify()

    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stop

    def queue_depth(self) -> int:
        with self._lock:
            return len(self.sched.queue) + sum(kind == "submit" for kind, _ in self._inbox)

    def _take_inbox(self) -> None:
        with self._lock:
            while not self._inbox and not self.sched.busy and not self._stop:
                self._lock.wait(0.5)
            inbox, self._inbox = self._inbox, []
        for kind, req in inbox:
            if kind == "submit":
                try:
                    self.sched.submit(req)
                except (ValueError, QueueFull) as e:  # checked in submit already; kept for safety
                    req.finish_reason = f"error: {e}"
                    if req.on_event:
                        req.on_event([], req.finish_reason)
            else:
                self.sched.cancel(req)

    def _run(self) -> None:
        while True:
            self._take_inbox()
            if self._stop:
                break
            if not self.sched.busy:
                continue
            t0 = time.perf_counter()
            try:
                self.sched.step()
            except Exception as e:  # a failed step fails the requests in it, not the server
                self.error = e
                for req in list(self.sched.running.values()):
                    self.sched._finish(req, f"error: {type(e).__name__}: {e}")
            if self.on_step:
                self.on_step(self.sched, time.perf_counter() - t0)
        for req in list(self.sched.queue) + list(self.sched.running.values()):
            self.sched.cancel(req)

    def stop(self) -> None:
        with self._lock:
            self._stop = True
            self._lock.notify()
        if self._thread.is_alive():
            self._thread.join()
