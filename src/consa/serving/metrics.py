"""Prometheus metrics of a running server, in a registry of its own (two servers in one process, as in
the tests, do not collide): queue depth, running sequences, KV slots used, tokens/s, TTFT and TPOT."""

from __future__ import annotations

import collections
import threading
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)


class ServerMetrics:
    """Gauges read the engine when scraped; counters and histograms are fed by the engine and the API."""

    def __init__(self, engine, window_s: float = 10.0):
        self.registry = r = CollectorRegistry()
        sched = engine.sched
        Gauge("consa_queue_depth", "Requests waiting for a slot", registry=r).set_function(engine.queue_depth)
        Gauge("consa_running_sequences", "Sequences holding a KV slot (in prefill or decode)",
              registry=r).set_function(sched.slots_used)
        Gauge("consa_kv_slots_used", "KV slots in use", registry=r).set_function(sched.slots_used)
        Gauge("consa_kv_slots_total", "KV slots in the pool", registry=r).set(sched.pool.num_slots)
        Gauge("consa_kv_slot_bytes", "Bytes of KV one slot holds", registry=r).set(sched.pool.slot_bytes())
        Gauge("consa_generation_tokens_per_second", f"New tokens per second over the last {window_s:g} s",
              registry=r).set_function(self.tokens_per_second)
        self.generated = Counter("consa_generation_tokens", "New tokens emitted", registry=r)
        self.prompt = Counter("consa_prompt_tokens", "Prompt tokens admitted", registry=r)
        self.requests = Counter("consa_requests", "Finished requests by outcome", ["outcome"], registry=r)
        self.rejected = Counter("consa_rejected_requests", "Requests refused before queueing", ["reason"], registry=r)
        self.ttft = Histogram("consa_time_to_first_token_seconds", "Arrival to first new token", buckets=LATENCY_BUCKETS,
                              registry=r)
        self.tpot = Histogram("consa_time_per_output_token_seconds", "Mean time between new tokens of a request",
                              buckets=TOKEN_BUCKETS, registry=r)
        self.step = Histogram("consa_step_seconds", "One scheduler step (admission, prompt chunks, a decode step)",
                              buckets=TOKEN_BUCKETS, registry=r)
        self._window = window_s
        self._recent: collections.deque[tuple[float, int]] = collections.deque()
        self._last_total = 0
        self._lock = threading.Lock()

    def on_step(self, sched, seconds: float) -> None:
        """Called by the engine thread after each step."""
        self.step.observe(seconds)
        new = sched.generated - self._last_total
        self._last_total = sched.generated
        if new:
            self.generated.inc(new)
            with self._lock:
                self._recent.append((time.monotonic(), new))

    def tokens_per_second(self) -> float:
        now = time.monotonic()
        with self._lock:
            while self._recent and self._recent[0][0] < now - self._window:
                self._recent.popleft()
            return sum(n for _, n in self._recent) / self._window

    def finished(self, req, outcome: str) -> None:
        self.requests.labels(outcome=outcome).inc()
        if req.first_token_at is not None:
            self.ttft.observe(req.first_token_at - req.arrived)
            if len(req.output) > 1 and req.finished_at is not None:
                self.tpot.observe((req.finished_at - req.first_token_at) / (len(req.output) - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)
