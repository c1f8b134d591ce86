"""End-to-end decode through consa's serving engine (static hybrid cache + CUDA-graph decode step).

Randomly initialised Qwen3-0.6B / Qwen3-8B-shaped models (built on the GPU in bf16), contexts 32K/128K,
batches 1, 8, 32 and the largest that fits in ``--mem-gib``, allocations ``25:512`` (25% of the KV heads
of every layer FA, W = 512), ``50:4096`` and ``full`` (every head FA, through the same cache and graph).
Per point: decode tok/s (CUDA-event time of ``--steps`` graph replays after warm-up), prefill s (a real
B = 1 prefill of the context, once per shape/context/allocation, the second of two: the first compiles;
``--no-prefill`` skips it), KV bytes held, peak memory, and the bytes limit: a step must read the weights and the KV the attention sees
(FA: every slot; SWA: W + S ring slots), so tok/s ≤ B · copy bandwidth / (weight bytes + KV read), the
copy bandwidth measured in the same run. For B > 1 the cache is filled with random keys (decode speed
does not depend on their values) instead of B real prefills.

    PYTHONPATH=src python benchmarks/serving.py --out $OUT/serving.json
    # equal KV bytes: one window vs per-head spans vs full (issue 16), 0.6B shape at 32K
    PYTHONPATH=src python benchmarks/serving.py --shapes 0.6b --contexts 32768 --batches 1,8,max \
        --allocs budget:0.25:512/full,budget:0.25:512/2048/8192/full,full --out $OUT/budget-serving.json

``--profile`` adds a torch.profiler table of a few eager steps at the first point (what a step's time
is made of). JSON goes to ``--out``; a table is printed last.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback

import torch

import consa
from consa.allocation import Allocation
from consa.serving import DecodeEngine

SHAPES = {  # Qwen3 configs (hub config.json values), random weights
    "0.6b": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                 num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True),
    "8b": dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
               num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=False),
}
GIB = 1 << 30


def build(shape: str):
    from transformers import AutoModelForCausalLM, Qwen3Config

    cfg = Qwen3Config(**SHAPES[shape], max_position_embeddings=262144)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="consa", dtype=torch.bfloat16)
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
    total = 0
    for i in range(alloc.shape.num_layers):  # per head: FA every slot, SWA its own W + S ring
        total += sum(length if hw is None else min(length, hw[0] + hw[1]) for hw in alloc.head_windows(i))
    return 2 * 2 * d * total  # keys and values, bf16


def copy_bandwidth(nbytes=1 << 32) -> float:
    x = torch.empty(nbytes // 2, device="cuda", dtype=torch.bfloat16).normal_()
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(10):
        s.record()
        y.copy_(x)
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e))
    del x, y
    return 2 * nbytes / (sorted(times)[len(times) // 2] * 1e-3)


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
    engine.ids.random_(3, 1000)
    engine.pos.fill_(context)


def time_decode(engine, steps: int) -> float:
    engine.decode(4)  # warm-up replays
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    engine.decode(steps)
    e.record()
    e.synchronize()
    return s.elapsed_time(e) / 1e3


def profile_steps(engine, steps=3) -> str:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        engine.decode(steps)
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60)


def run_point(model, shape, context, spec, batch, args, bw, prefill_s, report):
    alloc = allocation(model, spec, context)
    consa.apply_allocation(model, alloc)
    wb = weight_bytes(model)
    max_len = context + args.steps + 8
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    engine = DecodeEngine(model, batch, max_len, cuda_graphs=True)
    engine._capture()
    fill_random(engine, context)
    sec = time_decode(engine, args.steps)
    tok_s = batch * args.steps / sec
    read = wb + batch * kv_per_seq(model, alloc, context)
    limit = batch * bw / read
    point = dict(shape=shape, context=context, alloc=spec, batch=batch, kv_share=alloc.kv_share(context), spans=alloc.spans(), decode_tok_s=tok_s, step_ms=sec / args.steps * 1e3,
                 prefill_s_b1=prefill_s, kv_bytes=engine.cache.stored_bytes(), weight_bytes=wb, bytes_read_per_step=read,
                 limit_tok_s=limit, pct_of_limit=100 * tok_s / limit, peak_mem_gib=torch.cuda.max_memory_allocated() / GIB)
    if args.profile and not report.get("profile"):
        engine._graph = None  # eager steps: the profiler sees each kernel
        fill_random(engine, context)
        report["profile"] = {"point": f"{shape} {context} {spec} B={batch}", "graph_step_ms": point["step_ms"],
                             "table": profile_steps(engine)}
        print(report["profile"]["table"], flush=True)
    del engine
    torch.cuda.empty_cache()
    return point


def prefill_time(model, spec, context) -> float:
    consa.apply_allocation(model, allocation(model, spec, context))
    ids = torch.randint(3, 1000, (1, context), device="cuda")
    times = []
    for _ in range(2):  # the first, whole-length prefill compiles every kernel configuration it meets; time the second
        engine = DecodeEngine(model, 1, context + 2, cuda_graphs=False)
        torch.cuda.synchronize()
        t = time.perf_counter()
        engine.prefill(ids)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
        del engine
        torch.cuda.empty_cache()
    return times[-1]


def largest_batch(model, spec, context, mem_gib, steps) -> int:
    alloc = allocation(model, spec, context)
    free = mem_gib * GIB - sum(p.numel() * p.element_size() for p in model.parameters()) - 4 * GIB  # workspace
    return max(1, int(free // kv_per_seq(model, alloc, context + steps + 8)))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="0.6b,8b")
    ap.add_argument("--contexts", default="32768,131072")
    ap.add_argument("--batches", default="1,8,32,max")
    ap.add_argument("--allocs", default="25:512,50:4096,full")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--mem-gib", type=float, default=120.0)
    ap.add_argument("--budget-s", type=float, default=480.0)
    ap.add_argument("--no-prefill", action="store_true")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--out", default="serving.json")
    args = ap.parse_args(argv)
    bad = [a for a in args.allocs.split(",") if a != "full" and not a.startswith("budget:")
           and not (a.count(":") == 1 and all(x.isdigit() for x in a.split(":")))]
    bad += [s for s in args.shapes.split(",") if s not in SHAPES]
    bad += [b for b in args.batches.split(",") if b != "max" and not b.isdigit()]
    bad += [c for c in args.contexts.split(",") if not c.isdigit()]
    if bad:
        print(f"consa: error: unknown --allocs/--shapes/--batches/--contexts value(s): {', '.join(bad)}", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("consa: error: benchmarks/serving.py needs a CUDA GPU", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    import transformers

    bw = copy_bandwidth()
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "transformers": transformers.__version__,
              "copy_bandwidth_TBps": bw / 1e12, "args": vars(args), "points": [], "skipped": []}
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)

    def save():
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)

    for shape in args.shapes.split(","):
        model = build(shape)
        for context in map(int, args.contexts.split(",")):
            for spec in args.allocs.split(","):
                prefill_s = None
                batches = []
                for b in args.batches.split(","):
                    b = largest_batch(model, spec, context, args.mem_gib, args.steps) if b == "max" else int(b)
                    if b not in batches:
                        batches.append(b)
                for batch in batches:
                    where = f"{shape} ctx={context} {spec} B={batch}"
                    if time.perf_counter() - t0 > args.budget_s:
                        report["skipped"].append(f"{where}: budget")
                        continue
                    if batch > largest_batch(model, spec, context, args.mem_gib, args.steps):
                        report["skipped"].append(f"{where}: does not fit in {args.mem_gib} GiB")
                        continue
                    try:
                        if prefill_s is None and not args.no_prefill:
                            prefill_s = prefill_time(model, spec, context)
                        p = run_point(model, shape, context, spec, batch, args, bw, prefill_s, report)
                    except Exception as e:  # noqa: BLE001 - record and go on: one point must not lose the run
                        traceback.print_exc()
                        report["skipped"].append(f"{where}: {type(e).__name__}: {str(e)[:200]}")
                        torch.cuda.empty_cache()
                        continue
                    report["points"].append(p)
                    print(f"{where}: {p['decode_tok_s']:.0f} tok/s, {p['pct_of_limit']:.0f}% of limit, "
                          f"step {p['step_ms']:.3f} ms, peak {p['peak_mem_gib']:.1f} GiB", flush=True)
                    save()
        del model
        torch.cuda.empty_cache()
    report["wall_s"] = time.perf_counter() - t0
    save()
    print_table(report)
    return 0


def print_table(report):
    pts = report["points"]
    full = {(p["shape"], p["context"], p["batch"]): p["decode_tok_s"] for p in pts if p["alloc"] == "full"}
    full_max = {}
    for p in pts:
        if p["alloc"] == "full":
            k = (p["shape"], p["context"])
            full_max[k] = max(full_max.get(k, 0), p["decode_tok_s"])
    print(f"\n{report['device']}  torch {report['torch']}  transformers {report['transformers']}  "
          f"copy {report['copy_bandwidth_TBps']:.2f} TB/s")
    print("| shape | context | alloc | B | decode tok/s | % of bytes limit | × full (same B) | step ms | prefill s (B=1) | KV GiB | peak GiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for p in pts:
        f = full.get((p["shape"], p["context"], p["batch"]))
        ratio = f"{p['decode_tok_s'] / f:.2f}" if f and p["alloc"] != "full" else "–"
        pre = f"{p['prefill_s_b1']:.2f}" if p["prefill_s_b1"] is not None else "–"
        print(f"| {p['shape']} | {p['context'] // 1024}K | {p['alloc']} | {p['batch']} | {p['decode_tok_s']:.0f} | "
              f"{p['pct_of_limit']:.0f}% | {ratio} | {p['step_ms']:.3f} | {pre} | {p['kv_bytes'] / GIB:.2f} | {p['peak_mem_gib']:.1f} |")
    for k, v in full_max.items():
        best = max((p["decode_tok_s"] for p in pts if (p["shape"], p["context"]) == k and p["alloc"] == "25:512"), default=None)
        if best:
            print(f"largest-batch throughput {k[0]} {k[1] // 1024}K: 25:512 {best:.0f} tok/s vs full {v:.0f} → {best / v:.2f}×")
    for s in report["skipped"]:
        print("skipped:", s)


if __name__ == "__main__":
    sys.exit(main())
