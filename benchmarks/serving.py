"""Serving speed side by side, one run: consa's engine, transformers' own paths, the export without consa.

Rows, per shape (random-weight Qwen3-0.6B / 8B, bf16) and context (the KV filled to it):

* ``consa``: the serving engine (static hybrid cache, captured decode steps) at each allocation and batch
  (``25:512``: 25 % of every layer's KV heads FA, W = 512; ``full``: every head FA through the same
  engine), without and with the compiled forward (``--compile``: default, max-autotune, freeze, …);
* ``hf-dynamic`` / ``hf-static``: transformers' ``generate`` on the full model with its dynamic cache and
  with ``cache_implementation="static"`` (its compiled path; the compile is timed apart);
* ``export``: the head-wise export loaded by ``from_pretrained(dir, trust_remote_code=True)`` in a
  subprocess that cannot import consa, with ``generate``'s default cache and with the static one;
* ``generate``: ``consa.generate`` itself, B = 1: the first call (engine, capture, prompt), the second
  call's time to first token, and decode with everyday options (``min_new_tokens``,
  ``repetition_penalty``, sampling), which the static path serves.

Per decode row: tok/s, step ms, the bytes a step must read (the weights, less an untied input
embedding, + per sequence the KV the attention sees: FA heads every slot, SWA heads their W + S
ring) and those bytes over the step time as a % of the **read ceiling**: the best of several
reductions over a 4 GiB buffer (a read, like decode, measured in the same run; a copy's rate is
reported beside it). Prefill s: one real B = 1 prompt of the context (``consa``: the second of two).
transformers' and the export's rows time ``generate`` with 1 and with 1 + N new tokens: prefill =
the first, a step = the difference / N. Rows run in order of importance and stop at ``--budget-s``
(the rest are listed as skipped); a row that fails is recorded and the run goes on. ``--phases``
picks parts: 1 and 2 the first and second shape at the first context (consa's rows uncompiled and with
the first compile mode, transformers at B = 1, ``consa.generate``; the profile with the first), 3 the
export, 4 the other compile modes and full attention compiled, 5 the other contexts, 6 the batched
compiled rows and transformers batched.

    PYTHONPATH=src python benchmarks/serving.py --out $OUT/serving.json            # the GPU run
    PYTHONPATH=src python benchmarks/serving.py --smoke --out /tmp/serving.json   # CPU, tiny, seconds

``--profile``: torch.profiler over eager B = 1 steps (first shape and context, first hybrid
allocation; compiled too when ``--compile`` has a mode): the top kernels by time and the kernels per
step. JSON goes to ``--out``; a short table is printed last.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import traceback

import torch

import consa
from consa import consa_free
from consa.allocation import Allocation
from consa.serving import DecodeEngine
from consa.serving import generate as serving
from consa.serving.compile import CompileOptions

SHAPES = {  # Qwen3 configs (hub config.json values), random weights
    "0.6b": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                 num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True),
    "8b": dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
               num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=False),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, vocab_size=256, tie_word_embeddings=False),
}
COMPILE = {"off": None, "default": CompileOptions("default"), "max-autotune": CompileOptions("max-autotune-no-cudagraphs"),
           "freeze": CompileOptions("default", freeze=True), "max-autotune+freeze": CompileOptions("max-autotune-no-cudagraphs", freeze=True)}
GIB = 1 << 30
GEN = dict(do_sample=False, pad_token_id=0, eos_token_id=None)


# ---- models, allocations, bytes ------------------------------------------------------------------
def build(shape: str, device: str):
    from transformers import AutoModelForCausalLM, Qwen3Config

    cfg = Qwen3Config(**SHAPES[shape], max_position_embeddings=262144, use_sliding_window=False)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="consa", dtype=dtype)
    return model.eval()


def allocation(model, spec: str, context: int | None = None) -> Allocation:
    """``full``, ``SHARE:W`` (SHARE% of every layer's KV heads FA, W for the rest) or ``budget:B:MENU``
    (KV at ``context`` <= B of full attention's, each head on an option of MENU, '/'-separated, e.g.
    ``budget:0.25:512/2048/8192/full``; the knapsack of ``consa.budget`` with seeded random increasing
    values stands in for a learned allocation: same bytes, a spread of spans)."""
    shape = consa.model_shape(model)
    h = shape.num_kv_heads
    if spec.startswith("budget:"):
        import random

        from consa import budget as B

        _, share, menu = spec.split(":")
        prob = B.problem(shape, "kv_head", B.parse_menu(menu.replace("/", ",")), float(share), int(context))
        rng = random.Random(0)
        values = [[sum(rng.random() for _ in range(k)) for k in range(len(prob.menu))] for _ in prob.costs]
        return B.budget_allocation(prob, values, "kv_head", shape)
    if spec == "full":
        n_fa, window = h, 512
    else:
        share, window = spec.split(":")
        n_fa, window = round(float(share) / 100 * h), int(window)
    rows = tuple(tuple(k < n_fa for k in range(h)) for _ in range(shape.num_layers))
    return Allocation("kv_head", shape, window, rows, 0)


def rand_ids(model, batch: int, length: int) -> torch.Tensor:
    return torch.randint(3, min(1000, model.config.vocab_size), (batch, length), device=next(model.parameters()).device)


def weight_bytes(model) -> int:
    """Bytes a decode step reads of the weights: all, less an untied input embedding (B rows only)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    emb = model.get_input_embeddings().weight
    if emb is not model.get_output_embeddings().weight:
        total -= emb.numel() * emb.element_size()
    return total


def kv_per_seq(model, alloc: Allocation, length: int) -> int:
    """KV bytes of one sequence at ``length`` slots: what a buffer of that length holds, and what a step
    at that length reads (FA heads every slot, SWA heads their W + S ring: held = read)."""
    d = model.config.head_dim
    size = next(model.parameters()).element_size()
    total = 0
    for i in range(alloc.shape.num_layers):
        total += sum(length if hw is None else min(length, hw[0] + hw[1]) for hw in alloc.head_windows(i))
    return 2 * size * d * total


# ---- timing ---------------------------------------------------------------------------------------
class Clock:
    """Wall time with the device drained before and after."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def time(self, fn):
        self.sync()
        t = time.perf_counter()
        out = fn()
        self.sync()
        return out, time.perf_counter() - t

    def reset_peak(self):
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def peak_gib(self):
        return torch.cuda.max_memory_allocated() / GIB if self.cuda else None


def read_ceiling(device: str, nbytes: int) -> dict:
    """The best rate of several reductions over ``nbytes`` (a read: decode reads), best of 10 each, and a
    copy's rate for comparison (what earlier runs divided by)."""
    clock = Clock(device)
    x = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).uniform_(-1, 1)
    reads = {"sum_bf16_fp32acc": lambda: x.sum(dtype=torch.float32), "amax_bf16": lambda: x.amax(),
             "sum_as_int32": lambda: x.view(torch.int32).sum(dtype=torch.int64)}
    out = {}
    for name, fn in reads.items():
        fn()
        best = min(clock.time(fn)[1] for _ in range(10))
        out[name] = nbytes / best / 1e12
    y = torch.empty_like(x)
    y.copy_(x)
    best = min(clock.time(lambda: y.copy_(x))[1] for _ in range(10))
    del x, y
    if device == "cuda":
        torch.cuda.empty_cache()
    return {"read_TBps": max(out.values()), "reads_TBps": out, "copy_TBps": 2 * nbytes / best / 1e12, "buffer_bytes": nbytes}


# ---- consa's engine -------------------------------------------------------------------------------
def static_layers(cache):
    """Every single-window static layer (a multi-span layer's span groups included)."""
    for layer in cache.layers:
        yield from ([g[2] for g in layer.groups] if hasattr(layer, "groups") else [layer])


def fill_random(engine, context: int) -> None:
    """Random keys in every buffer, the cache at ``context`` slots, random next tokens."""
    for layer in static_layers(engine.cache):
        for buf in (layer.fa_keys, layer.fa_values, layer.swa_keys, layer.swa_values):
            if buf.numel():
                buf.normal_()
    engine.cache.set_length(context)
    engine.pad_mask.fill_(True)
    engine.ids.random_(3, min(1000, engine.model.config.vocab_size))
    engine.pos.fill_(context)
    engine.prompt_len = 0
    engine.col.zero_()


def prefill_time(model, spec, context, clock) -> float:
    """A real B = 1 prefill of the context, the second of two (the first compiles kernels)."""
    consa.apply_allocation(model, allocation(model, spec, context))
    ids = rand_ids(model, 1, context)
    times = []
    for _ in range(2):
        engine = DecodeEngine(model, 1, context + 2, cuda_graphs=False)
        times.append(clock.time(lambda: engine.prefill(ids))[1])
        del engine
        clock.reset_peak()
    return times[-1]


def engine_row(model, shape, context, spec, batch, compile_name, args, ctx) -> dict:
    clock = ctx["clock"]
    alloc = allocation(model, spec, context)
    consa.apply_allocation(model, alloc)
    clock.reset_peak()
    cuda = ctx["device"] == "cuda"
    engine = DecodeEngine(model, batch, context + args.steps + 8, cuda_graphs=cuda, compile=COMPILE[compile_name])
    _, setup_s = clock.time(lambda: engine.capture("greedy") if cuda else None)
    fill_random(engine, context)
    engine.decode(3)  # warm-up (compiles on CPU, where nothing was captured)
    fill_random(engine, context)
    _, sec = clock.time(lambda: engine.decode(args.steps))
    step = sec / args.steps
    read = weight_bytes(model) + batch * kv_per_seq(model, alloc, context)
    row = dict(kind="consa", shape=shape, context=context, alloc=spec, batch=batch, compile=compile_name,
               decode_tok_s=batch / step, step_ms=step * 1e3, bytes_per_step=read, kv_share=alloc.kv_share(context),
               kv_bytes=engine.cache.stored_bytes(), setup_s=setup_s,
               compile_s=engine.compiled.compile_s if engine.compiled else None, peak_gib=clock.peak_gib())
    del engine
    if COMPILE[compile_name] is not None and COMPILE[compile_name].freeze:
        torch._dynamo.reset()  # frozen weights (the concatenated copies) live as long as the compiled code
    clock.reset_peak()
    return row


def largest_batch(model, spec, context, mem_gib, steps) -> int:
    alloc = allocation(model, spec, context)
    free = mem_gib * GIB - sum(p.numel() * p.element_size() for p in model.parameters()) - 4 * GIB  # workspace
    return max(1, int(free // kv_per_seq(model, alloc, context + steps + 8)))


# ---- transformers on the full model ---------------------------------------------------------------
def hf_row(model, shape, context, batch, kind, args, ctx) -> dict:
    """transformers' generate on the full model: its dynamic cache, or its static one (compiled)."""
    clock = ctx["clock"]
    consa.detach(model)
    dev = ctx["device"]
    ids = rand_ids(model, batch, context)
    kw = dict(GEN, cache_implementation="static") if kind == "hf-static" else dict(GEN)
    n = args.steps

    def run(new):
        with torch.no_grad():
            return model.generate(ids, max_new_tokens=new, min_new_tokens=new, **kw)

    clock.reset_peak()
    if kind == "hf-static":  # warm-up at the timed shapes: the static path compiles here
        _, warm_s = clock.time(lambda: run(n + 1))
    else:
        _, warm_s = clock.time(lambda: model.generate(ids[:, :128], max_new_tokens=4, min_new_tokens=4, **kw))
    t1 = min(clock.time(lambda: run(1))[1] for _ in range(2))  # the least of two: see generate_rows
    tn = min(clock.time(lambda: run(n + 1))[1] for _ in range(2))
    step = (tn - t1) / n
    read = weight_bytes(model) + batch * kv_per_seq(model, allocation(model, "full"), context)
    row = dict(kind=kind, shape=shape, context=context, alloc="full", batch=batch, compile="hf" if kind == "hf-static" else "off",
               prefill_s=t1, decode_tok_s=batch / step, step_ms=step * 1e3, bytes_per_step=read, warmup_s=warm_s,
               compile_s=max(0.0, warm_s - tn) if kind == "hf-static" else None, peak_gib=clock.peak_gib())
    for name in ("_cache", "_static_cache"):  # a static cache transformers keeps for the next call
        if hasattr(model, name):
            delattr(model, name)
    clock.reset_peak()
    return row


# ---- consa.generate: the second call, everyday options ---------------------------------------------
def generate_rows(model, shape, context, spec, args, ctx) -> list[dict]:
    clock = ctx["clock"]
    alloc = allocation(model, spec, context)
    consa.apply_allocation(model, alloc)
    serving.release(model)
    ids = rand_ids(model, 1, context)
    n = args.steps
    compile_opts = COMPILE[args.generate_compile]
    warned = []
    handler = logging.Handler()
    handler.emit = lambda record: warned.append(record.getMessage())
    logging.getLogger("consa").addHandler(handler)

    def gen(new, **kw):
        if "min_new_tokens" in kw:
            kw["min_new_tokens"] = min(kw["min_new_tokens"], new)
        with torch.no_grad():
            return consa.generate(model, ids, compile=compile_opts, max_new_tokens=new, **dict(GEN, **kw))

    rows = []
    try:
        first = clock.time(lambda: gen(1))[1]
        second = clock.time(lambda: gen(1))[1]
        read = weight_bytes(model) + kv_per_seq(model, alloc, context)
        base = dict(kind="generate", shape=shape, context=context, alloc=spec, batch=1, compile=args.generate_compile,
                    bytes_per_step=read)
        rows.append(dict(base, options="first call (engine, capture, prompt)", prefill_s=first))
        rows.append(dict(base, options="second call: time to first token", prefill_s=second))
        cases = {"greedy": {}, "min_new_tokens + eos list + repetition_penalty":
                 dict(min_new_tokens=n + 1, eos_token_id=[1, 2], repetition_penalty=1.1),
                 "sampling (temperature, top_k, top_p)": dict(do_sample=True, temperature=0.7, top_k=50, top_p=0.9)}
        for name, kw in cases.items():
            del warned[:]
            clock.reset_peak()
            # the least of two calls each: one prefill varies by ~0.1 s, as much as 64 steps take at B = 1
            t1 = min(clock.time(lambda: gen(1, **kw))[1] for _ in range(2))
            tn = min(clock.time(lambda: gen(n + 1, **kw))[1] for _ in range(2))
            step = (tn - t1) / n
            rows.append(dict(base, options=name, prefill_s=t1, decode_tok_s=1 / step, step_ms=step * 1e3,
                             path="eager (logged)" if warned else "static", peak_gib=clock.peak_gib()))
    finally:
        logging.getLogger("consa").removeHandler(handler)
        serving.release(model)
        clock.reset_peak()
    return rows


# ---- the head-wise export without consa -----------------------------------------------------------
EXPORT_SCRIPT = consa_free.script(
    """
    import json, sys, time, torch
    from transformers import AutoModelForCausalLM
    job = json.loads(sys.argv[1])
    dev, n = job["device"], job["steps"]
    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(job["dir"], local_files_only=True, trust_remote_code=True,
                                                 dtype=getattr(torch, job["dtype"])).to(dev).eval()
    load_s = time.perf_counter() - t
    def sync():
        if dev == "cuda":
            torch.cuda.synchronize()
    rows = []
    for mode in job["modes"]:
        kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
        if mode == "static":
            kw["cache_implementation"] = "static"
        for ctx in job["contexts"]:
            for b in job["batches"]:
                row = dict(mode=mode, context=ctx, batch=b)
                try:
                    ids = torch.randint(3, min(1000, job["vocab"]), (b, ctx), device=dev)
                    def run(new):
                        sync()
                        t = time.perf_counter()
                        with torch.no_grad():
                            model.generate(ids, max_new_tokens=new, min_new_tokens=new, **kw)
                        sync()
                        return time.perf_counter() - t
                    if dev == "cuda":
                        torch.cuda.empty_cache()
                        torch.cuda.reset_peak_memory_stats()
                    row["warmup_s"] = run(n + 1 if mode == "static" else 1)  # at the timed shapes: whatever compiles, here
                    t1, tn = run(1), run(n + 1)
                    row.update(prefill_s=t1, step_ms=(tn - t1) / n * 1e3, decode_tok_s=b * n / (tn - t1))
                    row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda" else None
                except Exception as e:
                    row["error"] = f"{type(e).__name__}: {e}"[:400]
                rows.append(row)
    code = sys.modules[type(model).__module__]
    assert not any(m == "consa" or m.startswith("consa.") for m in sys.modules)
    with open(sys.argv[2], "w") as f:
        json.dump({"rows": rows, "load_s": load_s, "type": type(model).__name__,
                   "have_consa": getattr(code, "HAVE_CONSA", None)}, f)
    """
)


def export_rows(model, shape, spec, args, ctx) -> list[dict]:
    """Export ``spec`` head-wise, then time it in a subprocess where consa cannot be imported."""
    from consa.export import export

    contexts = [c for c in ctx["contexts"] if c <= args.export_max_context]
    alloc = allocation(model, spec, contexts[0])
    consa.apply_allocation(model, alloc)
    tmp = tempfile.mkdtemp(prefix="consa-export-bench-")
    try:
        out = os.path.join(tmp, "export")
        t = time.perf_counter()
        info = export(model, alloc, out, mode="heads")
        export_s = time.perf_counter() - t
        job = dict(dir=out, device=ctx["device"], vocab=model.config.vocab_size, dtype=str(next(model.parameters()).dtype).split(".")[-1], steps=args.export_steps,
                   contexts=contexts, batches=[int(b) for b in args.export_batches.split(",")], modes=args.export_modes.split(","))
        result = os.path.join(tmp, "result.json")
        left = max(30, ctx["deadline"] - time.perf_counter())
        proc = consa_free.run(EXPORT_SCRIPT, json.dumps(job), result, modules_cache=os.path.join(tmp, "hf_modules"), timeout=left)
        if proc.returncode != 0:
            raise RuntimeError(f"export subprocess failed: {proc.stderr[-1500:]}")
        res = json.load(open(result))
        rows = []
        for r in res["rows"]:
            ra = allocation(model, spec, r["context"])
            read = weight_bytes(model) + r["batch"] * kv_per_seq(model, ra, r["context"])
            rows.append(dict(kind=f"export-{r['mode']}", shape=shape, context=r["context"], alloc=spec, batch=r["batch"],
                             compile="hf" if r["mode"] == "static" else "off", bytes_per_step=read, export_s=export_s,
                             load_s=res["load_s"], model_type=res["type"], have_consa=res["have_consa"], export_mode=info["mode"],
                             **{k: v for k, v in r.items() if k not in ("mode", "context", "batch")}))
        return rows
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---- the profile of one B = 1 step ----------------------------------------------------------------
def profile_step(model, context, spec, compile_name, args, ctx, steps=3) -> dict:
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    alloc = allocation(model, spec, context)
    consa.apply_allocation(model, alloc)
    cuda = ctx["device"] == "cuda"
    engine = DecodeEngine(model, 1, context + args.steps + 8, cuda_graphs=False, compile=COMPILE[compile_name])  # the
    # compiled B = 1 row's shapes: dynamo reuses its compile
    fill_random(engine, context)
    engine.decode(3)  # warm-up (and the compile)
    fill_random(engine, context)
    ctx["clock"].sync()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        engine.decode(steps)
        ctx["clock"].sync()
    del engine
    kernels = {}
    for avg in prof.key_averages():
        if cuda and avg.device_type != DeviceType.CUDA:
            continue
        if not cuda and avg.key.startswith("ProfilerStep"):
            continue
        t = getattr(avg, "self_device_time_total", None) if cuda else None
        t = t if t is not None else getattr(avg, "self_cuda_time_total", 0) if cuda else avg.self_cpu_time_total
        k = kernels.setdefault(avg.key, [0.0, 0])
        k[0] += t
        k[1] += avg.count
    top = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:15]
    busy_ms = sum(v[0] for v in kernels.values()) / steps / 1e3
    return {"point": f"{ctx['shape']} {context} {spec} B=1 compile={compile_name}", "unit": "CUDA kernels" if cuda else "CPU ops",
            "per_step": sum(v[1] for v in kernels.values()) / steps, "busy_ms_per_step": busy_ms,
            "top": [{"name": name[:90], "ms_per_step": v[0] / steps / 1e3, "calls_per_step": v[1] / steps} for name, v in top]}


# ---- driver ---------------------------------------------------------------------------------------
def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="0.6b,8b")
    ap.add_argument("--contexts", default="32768,131072")
    ap.add_argument("--batches", default="1,8,max", help="consa rows (uncompiled)")
    ap.add_argument("--allocs", default="25:512,full")
    ap.add_argument("--compile", default="off,default,freeze", help=f"consa rows, of {', '.join(COMPILE)} (the first mode "
                    "runs on every shape and context, the others on the first context)")
    ap.add_argument("--compile-batches", default="1", help="batches of the compiled consa rows")
    ap.add_argument("--compiled-batches-late", default="8", help="batches of compiled rows run last (at the first context)")
    ap.add_argument("--hf", default="hf-dynamic,hf-static", help="transformers' rows on the full model ('' for none)")
    ap.add_argument("--hf-batches", default="1,8", help="the first in phases 1-2 and 5, the others (dynamic only) in phase 6")
    ap.add_argument("--hf-static-contexts", default="32768", help="hf-static compiles per context: the contexts it runs")
    ap.add_argument("--generate-compile", default="off", help="the compile option of the consa.generate rows")
    ap.add_argument("--export-shapes", default="0.6b", help="shapes whose head-wise export is timed without consa ('' for none)")
    ap.add_argument("--export-max-context", type=int, default=32768)
    ap.add_argument("--export-batches", default="1")
    ap.add_argument("--export-modes", default="dynamic,static")
    ap.add_argument("--export-steps", type=int, default=16)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--mem-gib", type=float, default=None, help="memory for the largest batch (default: the GPU's less 6 GiB)")
    ap.add_argument("--budget-s", type=float, default=450.0)
    ap.add_argument("--no-prefill", action="store_true")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="CPU, the tiny shape, a few steps: the code path in seconds")
    ap.add_argument("--phases", default="1,2,3,4,5,6", help="1: the first shape at the first context (consa, transformers, "
                    "the first compile mode, generate, profile); 2: the second shape alike; 3: the export; 4: other compile "
                    "modes and full attention compiled; 5: the other contexts; 6: batched compiled rows, batched transformers")
    ap.add_argument("--out", default="serving.json")
    if "--smoke" in (sys.argv[1:] if argv is None else argv):  # defaults of the CPU smoke run; given values win
        ap.set_defaults(shapes="tiny", contexts="48", batches="1,2", allocs="50:8,full", compile="off", compiled_batches_late="",
                        hf_batches="1", hf_static_contexts="48", export_shapes="tiny", export_max_context=48, steps=4, export_steps=2, mem_gib=8.0)
    args = ap.parse_args(argv)
    return args


def check(args) -> list[str]:
    bad = [a for a in args.allocs.split(",") if a != "full" and not a.startswith("budget:")
           and not (a.count(":") == 1 and all(x.isdigit() for x in a.split(":")))]
    bad += [s for s in args.shapes.split(",") + [s for s in args.export_shapes.split(",") if s] if s not in SHAPES]
    bad += [b for b in args.batches.split(",") + args.compile_batches.split(",") + args.hf_batches.split(",")
            + args.export_batches.split(",") + args.compiled_batches_late.split(",") if b and b != "max" and not b.isdigit()]
    bad += [c for c in args.contexts.split(",") + args.hf_static_contexts.split(",") if not c.isdigit()]
    bad += [c for c in args.compile.split(",") + [args.generate_compile] if c not in COMPILE]
    bad += [h for h in args.hf.split(",") if h and h not in ("hf-dynamic", "hf-static")]
    bad += [m for m in args.export_modes.split(",") if m not in ("dynamic", "static")]
    bad += [p for p in args.phases.split(",") if p not in ("1", "2", "3", "4", "5", "6")]
    return bad


def main(argv=None):
    args = parse(argv)
    bad = check(args)
    if bad:
        print(f"consa: error: unknown benchmark option value(s): {', '.join(bad)}", file=sys.stderr)
        return 2
    device = "cpu" if args.smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("consa: error: benchmarks/serving.py needs a CUDA GPU (or --smoke)", file=sys.stderr)
        return 2
    import transformers

    t0 = time.perf_counter()
    deadline = t0 + args.budget_s
    clock = Clock(device)
    if args.mem_gib is None:
        args.mem_gib = torch.cuda.get_device_properties(0).total_memory / GIB - 6
    report = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
              "transformers": transformers.__version__, "args": vars(args), "rows": [], "skipped": [], "errors": []}
    report["ceiling"] = read_ceiling(device, 4 * GIB if device == "cuda" else 64 << 20)
    bw = report["ceiling"]["read_TBps"] * 1e12
    print(f"read ceiling {report['ceiling']['read_TBps']:.3g} TB/s (copy {report['ceiling']['copy_TBps']:.3g})", flush=True)

    def save():
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)

    def attempt(where, fn, need_s=0.0):
        """Run one row (or a list of rows) unless the budget is spent; failures are recorded."""
        if time.perf_counter() + need_s > deadline:
            report["skipped"].append(f"{where}: budget")
            return None
        try:
            out = fn()
        except Exception as e:  # noqa: BLE001 - one row must not lose the run
            traceback.print_exc()
            report["errors"].append(f"{where}: {type(e).__name__}: {str(e)[:300]}")
            if device == "cuda":
                torch.cuda.empty_cache()
            return None
        for r in out if isinstance(out, list) else [out]:
            if r.get("decode_tok_s") and r.get("bytes_per_step") and r.get("step_ms"):
                r["pct_read_ceiling"] = 100 * r["bytes_per_step"] / (r["step_ms"] / 1e3) / bw
            report["rows"].append(r)
            print(f"{where}: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()
                                           if k in ("options", "prefill_s", "decode_tok_s", "step_ms", "pct_read_ceiling",
                                                    "peak_gib", "compile_s", "error")), flush=True)
        save()
        return out

    shapes = args.shapes.split(",")
    contexts = [int(c) for c in args.contexts.split(",")]
    allocs = args.allocs.split(",")
    hybrid = next((a for a in allocs if a != "full"), allocs[0])
    modes = [c for c in args.compile.split(",") if c != "off"]
    models = {}
    prefill = {}

    def model_of(shape):
        if shape not in models:
            models[shape] = build(shape, device)
        return models[shape]

    def ctx_of(shape):
        return {"clock": clock, "device": device, "contexts": contexts, "deadline": deadline, "shape": shape}

    def consa_rows(shape, context, batches, compile_name, specs):
        model = model_of(shape)
        for spec in specs:
            for b in [x for x in batches if x]:
                b = largest_batch(model, spec, context, args.mem_gib, args.steps) if b == "max" else int(b)
                where = f"consa {shape} {context} {spec} B={b} compile={compile_name}"
                if b > largest_batch(model, spec, context, args.mem_gib, args.steps):
                    report["skipped"].append(f"{where}: does not fit in {args.mem_gib:.0f} GiB")
                    continue
                key = (shape, context, spec)
                if key not in prefill and not args.no_prefill and compile_name == "off":
                    prefill[key] = attempt(f"prefill {shape} {context} {spec}",
                                           lambda: {"kind": "prefill", "shape": shape, "context": context, "alloc": spec,
                                                    "batch": 1, "prefill_s": prefill_time(model, spec, context, clock)})
                row = attempt(where, lambda: engine_row(model, shape, context, spec, b, compile_name, args, ctx_of(shape)),
                              need_s=60 if compile_name != "off" else 5)
                if row is not None and prefill.get(key):
                    row["prefill_s"] = prefill[key]["prefill_s"]

    def hf_rows(shape, context, batches):
        for kind in [h for h in args.hf.split(",") if h]:
            if kind == "hf-static" and str(context) not in args.hf_static_contexts.split(","):
                continue
            for b in batches if kind == "hf-dynamic" else [b for b in batches if b == 1]:
                attempt(f"{kind} {shape} {context} B={b}", lambda: hf_row(model_of(shape), shape, context, b, kind, args, ctx_of(shape)),
                        need_s=60 if kind == "hf-static" and device == "cuda" else 5)

    c0, first_mode, other_allocs = contexts[0], modes[:1], [a for a in allocs if a != hybrid]
    phases = {int(p) for p in args.phases.split(",")}
    for shape in shapes:  # 1, 2: each shape at the first context, B = 1 against transformers, the batches, generate
        if shapes.index(shape) + 1 not in phases:
            continue
        consa_rows(shape, c0, args.batches.split(","), "off", allocs)
        hf_rows(shape, c0, [int(args.hf_batches.split(",")[0])])
        for mode in first_mode:
            consa_rows(shape, c0, args.compile_batches.split(","), mode, [hybrid])
        attempt(f"generate {shape} {c0} {hybrid}", lambda: generate_rows(model_of(shape), shape, c0, hybrid, args, ctx_of(shape)))
        if args.profile and shape == shapes[0]:
            for mode in ["off"] + first_mode:
                prof = attempt(f"profile {shape} {c0} {hybrid} compile={mode}",
                               lambda: dict(kind="profile", **profile_step(model_of(shape), c0, hybrid, mode, args, ctx_of(shape))))
                for k in (prof or {}).get("top", []):
                    print(f"   {k['ms_per_step']:8.3f} ms  {k['calls_per_step']:6.1f}x  {k['name']}")
    if 3 in phases:  # the head-wise export without consa
        for shape in [s for s in shapes if s in args.export_shapes.split(",")]:
            attempt(f"export {shape} {hybrid}", lambda: export_rows(model_of(shape), shape, hybrid, args, ctx_of(shape)), need_s=30)
    for shape in shapes if 4 in phases else []:  # the other compile variants; full attention compiled
        for mode in modes[1:]:
            consa_rows(shape, c0, args.compile_batches.split(","), mode, [hybrid])
        for mode in first_mode:
            consa_rows(shape, c0, args.compile_batches.split(","), mode, other_allocs)
    for shape in shapes if 5 in phases else []:  # the other contexts
        for context in contexts[1:]:
            consa_rows(shape, context, args.batches.split(","), "off", allocs)
            hf_rows(shape, context, [int(args.hf_batches.split(",")[0])])
            for mode in first_mode:
                consa_rows(shape, context, args.compile_batches.split(","), mode, [hybrid])
    for shape in shapes if 6 in phases else []:  # batched: compiled rows (no regression where the KV dominates), transformers
        for mode in first_mode:
            consa_rows(shape, c0, args.compiled_batches_late.split(","), mode, [hybrid])
        hf_rows(shape, c0, [int(b) for b in args.hf_batches.split(",")[1:]])
    for shape in list(models):
        del models[shape]
    report["wall_s"] = time.perf_counter() - t0
    save()
    print_table(report)
    return 0


def print_table(report):
    rows = [r for r in report["rows"] if r.get("kind") not in ("prefill", "profile")]
    ref = {(r["shape"], r["context"], r["batch"]): r["decode_tok_s"] for r in rows if r["kind"] == "hf-static" and r.get("decode_tok_s")}
    c = report["ceiling"]
    print(f"\n{report['device']}  torch {report['torch']}  transformers {report['transformers']}  "
          f"read ceiling {c['read_TBps']:.3g} TB/s (copy {c['copy_TBps']:.3g})")
    print("| shape | ctx | path | alloc | B | compile | prefill s | decode tok/s | step ms | % read ceiling | × hf-static | peak GiB | notes |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        f = lambda k, fmt: format(r[k], fmt) if r.get(k) is not None else "–"  # noqa: E731
        x = ref.get((r["shape"], r["context"], r["batch"]))
        times = f"{r['decode_tok_s'] / x:.2f}" if x and r.get("decode_tok_s") and r["kind"] != "hf-static" else "–"
        notes = "; ".join(s for s in (r.get("options"), r.get("path"), r.get("error"),
                                      f"compile {r['compile_s']:.0f} s" if r.get("compile_s") else None) if s)
        print(f"| {r['shape']} | {r['context'] // 1024 or r['context']}{'K' if r['context'] >= 1024 else ''} | {r['kind']} | {r['alloc']} | {r['batch']} | {r.get('compile', '–')} | "
              f"{f('prefill_s', '.3f')} | {f('decode_tok_s', '.0f')} | {f('step_ms', '.3f')} | {f('pct_read_ceiling', '.0f')} | "
              f"{times} | {f('peak_gib', '.1f')} | {notes} |")
    for r in report["rows"]:
        if r.get("kind") == "profile":
            print(f"profile {r['point']}: {r['per_step']:.0f} {r['unit']} per step, busy {r['busy_ms_per_step']:.3f} ms")
    for s in report["skipped"]:
        print("skipped:", s)
    for e in report["errors"]:
        print("error:", e)


if __name__ == "__main__":
    sys.exit(main())
