"""Continuous batching (consa.serving.scheduler over a slot pool): every request's greedy tokens equal
``consa.generate`` on its prompt alone, whatever else runs (mixed prompt lengths, random arrival steps,
cancellations, chunked prompts, a pool smaller than the load); the pool's bytes against an independent
formula; cancelled and finished requests free their slot at once."""

from __future__ import annotations

import random

import pytest
import torch

import consa
from consa.allocation import Allocation
from consa.attention import triton_decode
from consa.serving.scheduler import QueueFull, Request, Sampling, Scheduler
from consa.serving.slots import SlotPool, slots_for_budget
from consa.tiny import tiny_model

LAYERS, KV, HEAD_DIM = 3, 2, 16


def _model(kind: str, window: int = 4, sinks: int = 1):
    """A tiny random Qwen3 (4 query heads over 2 KV heads) under an allocation of ``kind``."""
    model = tiny_model("qwen3", num_kv_heads=KV, num_layers=LAYERS, max_position_embeddings=256)
    shape = consa.model_shape(model)
    if kind == "spans":  # per-head spans: two windows (and FA) in a layer
        alloc = Allocation.from_spans([3, None, 6, 3, None, None], "kv_head", shape, sinks=sinks)
    else:
        rows = {"heads": [[True, False], [False, True], [False, False]],  # head-wise hybrid (mixed + an all-SWA layer)
                "layers": [[True, True], [False, False], [False, False]],  # layer-wise
                "full": [[True, True]] * LAYERS}[kind]
        alloc = Allocation("kv_head", shape, window, tuple(map(tuple, rows)), sinks)
    consa.apply_allocation(model, alloc)
    return model, alloc


def _prompts(n: int, seed: int, lengths=(1, 2, 3, 5, 8, 13, 21, 30)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 101, (lengths[i % len(lengths)],), generator=g).tolist() for i in range(n)]


def _alone(model, prompt, n, eos=None):
    ids = torch.tensor([prompt], device=next(model.parameters()).device)
    out = consa.generate(model, ids, max_new_tokens=n, do_sample=False, eos_token_id=eos, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def _drive(sched: Scheduler, arrivals: dict[int, list[Request]], cancels: dict[int, list[Request]], limit: int = 2000):
    """Step the scheduler; requests arrive and are cancelled at the given step numbers."""
    step = 0
    while step <= max([*arrivals, *cancels, 0]) or sched.busy:
        for r in arrivals.get(step, []):
            sched.submit(r)
        for r in cancels.get(step, []):
            sched.cancel(r)
        sched.step()
        step += 1
        assert step < limit, "the scheduler did not finish"
        assert len(sched.running) + len(sched.free) == sched.pool.num_slots  # no slot lost or doubled


@pytest.mark.parametrize("kind", ["heads", "layers", "full", "spans"])
def test_every_request_equals_generate_alone(kind, one_thread):
    """Random arrival steps, mixed lengths, prompt chunks of 7 tokens (a 30-token prompt takes 5 steps,
    interleaved with the others' decode steps), 3 slots for 10 requests (the queue holds the rest)."""
    model, _ = _model(kind)
    rng = random.Random(kind)
    prompts = _prompts(10, seed=len(kind))
    news = [rng.randint(1, 12) for _ in prompts]
    want = [_alone(model, p, n) for p, n in zip(prompts, news)]
    sched = Scheduler(model, num_slots=3, max_len=48, prefill_tokens=7, max_queue=16)
    reqs = [Request(p, n) for p, n in zip(prompts, news)]
    arrivals: dict[int, list[Request]] = {}
    for r in reqs:
        arrivals.setdefault(rng.randint(0, 25), []).append(r)
    _drive(sched, arrivals, {})
    for r, w in zip(reqs, want):
        assert r.finish_reason == "length"
        assert r.output == w, f"prompt of {len(r.prompt)} tokens"
    assert max(sched.steps for _ in [0]) > 0 and not sched.running and len(sched.free) == 3


@pytest.mark.skipif(not triton_decode.interpreted(), reason="runs the Triton decode kernel on CPU tensors (interpreter)")
@pytest.mark.parametrize("kind", ["heads", "spans", "full"])
def test_decode_through_the_triton_kernels(kind, monkeypatch, one_thread):
    """A decode step through consa's Triton kernels (the CUDA path; here its interpreter): rows at
    different lengths share one write and one attention launch per head group, each row at its own
    length (no padding mask); the same tokens as generate alone."""
    model, _ = _model(kind)
    calls, writes = [], []
    real, real_write = triton_decode.hybrid_decode, triton_decode.write_static
    monkeypatch.setattr(triton_decode, "hybrid_decode", lambda *a, **k: calls.append((k["length"].tolist(), k.get("mask"))) or real(*a, **k))
    monkeypatch.setattr(triton_decode, "write_static", lambda *a: writes.append(a[7].tolist()) or real_write(*a))
    prompts = _prompts(3, seed=4, lengths=(2, 9, 5))
    want = [_alone(model, p, 4) for p in prompts]
    sched = Scheduler(model, num_slots=3, max_len=24, prefill_tokens=32, kernel="triton")
    reqs = [sched.submit(Request(p, 4)) for p in prompts]
    _drive(sched, {}, {})
    assert [r.output for r in reqs] == want
    assert ([3, 10, 6], None) in calls  # the first decode step: each row at its own length
    assert [2, 9, 5] in writes  # ... writing its new key at its own slot


def test_prompts_go_in_whole_while_nothing_decodes(one_thread, monkeypatch):
    """Chunks of ``prefill_tokens`` only while some request decodes (to keep its stream flowing); with
    none decoding a prompt takes up to ``idle_prefill_tokens`` a step (a first chunk of a whole prompt
    is the hybrid prefill of an empty row). Tokens equal generate alone either way."""
    model, _ = _model("heads")
    prompts = _prompts(3, seed=6, lengths=(30, 21, 9))
    want = [_alone(model, p, 6) for p in prompts]
    sched = Scheduler(model, num_slots=3, max_len=48, prefill_tokens=7, idle_prefill_tokens=24, max_queue=4)
    chunks = []
    real = sched._prefill
    monkeypatch.setattr(sched, "_prefill", lambda req, n: chunks.append((req.id, req.done_prompt, n)) or real(req, n))
    reqs = [Request(p, 6) for p in prompts]
    _drive(sched, {0: reqs[:1], 4: reqs[1:]}, {})
    assert [r.output for r in reqs] == want
    ids = [r.id for r in reqs]
    # nothing decodes at steps 0-1: 24 then 6 tokens; later arrivals meet a decoding stream: chunks of 7
    assert [c for c in chunks if c[0] == ids[0]] == [(ids[0], 0, 24), (ids[0], 24, 6)]
    assert [c[2] for c in chunks if c[0] == ids[1]] == [7, 7, 7]
    with pytest.raises(ValueError, match="idle_prefill_tokens"):
        Scheduler(model, num_slots=1, max_len=48, prefill_tokens=8, idle_prefill_tokens=4)


def test_cancellation_leaves_the_others_unchanged(one_thread):
    """Requests cancelled while queued, mid-prompt and mid-decode end at once with their tokens so
    far; the slot goes to the next request, and every other request still equals generate."""
    model, _ = _model("heads")
    prompts = _prompts(8, seed=5, lengths=(30, 4, 9, 2, 17, 6, 25, 3))
    want = [_alone(model, p, 10) for p in prompts]
    sched = Scheduler(model, num_slots=2, max_len=48, prefill_tokens=8, idle_prefill_tokens=8, max_queue=16)
    reqs = [Request(p, 10) for p in prompts]
    # r0 (30 tokens) is mid-prompt at step 1; r1 decodes by step 3; r7 never leaves the queue
    cancels = {1: [reqs[0]], 3: [reqs[1]], 2: [reqs[7]]}
    _drive(sched, {0: reqs[:2], 1: reqs[2:]}, cancels)
    for i, (r, w) in enumerate(zip(reqs, want)):
        if i in (0, 1, 7):
            assert r.finish_reason == "cancelled"
            assert r.output == w[: len(r.output)]
            assert len(r.output) < 10
        else:
            assert (r.finish_reason, r.output) == ("length", w), f"request {i}"
    assert reqs[0].output == [] and reqs[7].output == [] and len(reqs[1].output) >= 1


def test_end_tokens_and_context_end(one_thread):
    model, _ = _model("heads")
    prompt = _prompts(1, seed=9, lengths=(6,))[0]
    free = _alone(model, prompt, 12)
    eos = free[4]
    want = _alone(model, prompt, 12, eos=eos)
    sched = Scheduler(model, num_slots=2, max_len=18, prefill_tokens=4)
    stop = sched.submit(Request(prompt, 12, eos=(eos,)))
    full = sched.submit(Request(prompt, 12))  # 6 + 12 = the whole context: the last slot is used
    _drive(sched, {}, {})
    assert (stop.output, stop.finish_reason) == (want, "stop") and stop.output[-1] == eos
    assert (full.output, full.finish_reason) == (free, "length")
    with pytest.raises(ValueError, match="exceeds the model's context of 18"):
        sched.submit(Request(prompt, 13))
    with pytest.raises(ValueError, match="max_tokens must be at least 1"):
        sched.submit(Request(prompt, 0))


def test_queue_bound_and_sampling(one_thread):
    model, _ = _model("heads")
    sched = Scheduler(model, num_slots=1, max_len=32, max_queue=2)
    p = _prompts(1, seed=3, lengths=(5,))[0]
    a, b = sched.submit(Request(p, 3)), sched.submit(Request(p, 3))
    with pytest.raises(QueueFull):
        sched.submit(Request(p, 3))
    _drive(sched, {}, {})
    assert a.output == b.output == _alone(model, p, 3)
    # seeded sampling repeats itself; top_k=1 is greedy
    s1 = sched.submit(Request(p, 6, sampling=Sampling(temperature=1.3, seed=7)))
    s2 = sched.submit(Request(p, 6, sampling=Sampling(temperature=1.3, seed=7)))
    k1 = Request(p, 6, sampling=Sampling(temperature=0.8, top_k=1, seed=1))
    _drive(sched, {1: [k1]}, {})  # after s1 took the slot: the queue has room
    assert s1.output == s2.output and k1.output == _alone(model, p, 6)


def _independent_slot_bytes(alloc: Allocation, max_len: int, head_dim: int, elem: int) -> int:
    """Per sequence: keys and values of every KV head, FA max_len slots, SWA span + sinks (its ring)."""
    return 2 * head_dim * elem * sum(max_len if hw is None else min(max_len, hw[0] + hw[1])
                                     for i in range(alloc.shape.num_layers) for hw in alloc.head_windows(i))


@pytest.mark.parametrize("kind", ["heads", "layers", "full", "spans"])
def test_slot_accounting(kind):
    model, alloc = _model(kind)
    max_len = 40
    per = _independent_slot_bytes(alloc, max_len, HEAD_DIM, 4)
    plans = consa.models.plans_of(model)
    budget = 5 * per + per // 2
    assert slots_for_budget(plans, max_len, HEAD_DIM, torch.float32, budget) == 5
    pool = SlotPool.for_model(model, 5, max_len, plans)
    assert pool.stored_bytes() == 5 * per and pool.slot_bytes() == per


def test_a_quarter_fa_hybrid_holds_four_times_the_sequences():
    """Qwen3-0.6B's attention shape (28 layers, 8 KV heads, d=128) at 32K: 2 FA heads of 8 with W=512
    admit ~4x the sequences of full attention under the same budget."""
    from consa.allocation import ModelShape
    from consa.attention.plan import LayerPlan

    shape = ModelShape(num_layers=28, num_kv_heads=8, num_q_heads=16)
    hybrid = Allocation("kv_head", shape, 512, tuple(tuple(h < 2 for h in range(8)) for _ in range(28)), 0)
    full = Allocation("kv_head", shape, 512, tuple(tuple(True for _ in range(8)) for _ in range(28)), 0)
    budget = 100 << 30
    n = [slots_for_budget([LayerPlan.from_allocation(a, i) for i in range(28)], 32768, 128, torch.bfloat16, budget)
         for a in (hybrid, full)]
    assert n == [budget // _independent_slot_bytes(a, 32768, 128, 2) for a in (hybrid, full)]
    assert 3.5 < n[0] / n[1] <= 4.0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind,graphs,kernel", [("heads", True, "auto"), ("spans", True, "auto"), ("full", True, "auto"),
                                                ("heads", False, "auto"), ("heads", False, "torch")])
def test_cuda_equals_generate(kind, graphs, kernel):
    """On the GPU (fp32): decode steps replayed from CUDA graphs captured per width (or eager), the FA
    heads through the Triton kernel (or SDPA), against ``consa.generate``'s static engine, under mixed
    arrivals; widths 1-5 of 5 slots, so several graphs are captured and reused."""
    model, _ = _model(kind)
    model.cuda()
    prompts = _prompts(8, seed=11)
    want = [_alone(model, p, 10) for p in prompts]
    sched = Scheduler(model, num_slots=5, max_len=48, prefill_tokens=9, graphs=graphs, kernel=kernel)
    reqs = [Request(p, 10) for p in prompts]
    _drive(sched, {i % 5: [r] for i, r in enumerate(reqs[:5])} | {7: reqs[5:]}, {})
    assert [r.output for r in reqs] == want
    assert sched.decode_step.graphs == graphs and (len(sched.decode_step._graphs) > 1) == graphs


def test_graphs_need_cuda():
    if torch.cuda.is_available():
        pytest.skip("checks the CPU refusal")
    model, _ = _model("heads")
    with pytest.raises(ValueError, match="CUDA"):
        Scheduler(model, num_slots=2, max_len=16, graphs=True)


@pytest.mark.parametrize("family", ["qwen3_5_text", "lfm2"])
def test_mixed_decoders_are_refused_in_one_line(family):
    """A decoder with linear-attention or convolution layers beside its attention layers: the slot pool
    has no room for their states, so the scheduler refuses it at once, naming those layers."""
    from consa.families import tiny_model as family_model

    model = family_model(family)
    shape = consa.model_shape(model)
    consa.apply_allocation(model, Allocation("kv_head", shape, 4, tuple((True,) * shape.num_kv_heads for _ in range(shape.num_layers)), 0))
    with pytest.raises(ValueError, match=r"attention layers only.*(linear_attention|conv)") as e:
        Scheduler(model, num_slots=2, max_len=32)
    assert "\n" not in str(e.value)
