"""Load on ``consa serve``: Poisson arrivals through the real HTTP server, against the fixed-batch engine
and transformers' own continuous batching, on the same requests.

Requests: ``--requests`` random prompts of ``--prompt-len`` tokens (``A:B``: uniform in [A, B]), each
asking ``--new-tokens`` greedy tokens with end tokens ignored (so every row generates the same
tokens). Rows, one run:

* ``serve`` per allocation (``--allocs``, e.g. ``25:512,full``) and per rate (``--rates`` requests/s,
  ``inf`` = all at once): the server (scheduler + slot pool + Starlette/uvicorn) in this process, the
  load client (httpx, streaming) in a child process so that it does not share the server's GIL.
  Per request: TTFT (send → first token received) and TPOT ((last − first token) / (n − 1)).
* ``fixed`` per allocation: ``consa.serving.generate_many`` on all the prompts at once
  (``--fixed-batch`` per batch; default all): output tok/s over its wall time.
* ``hf``: transformers' ``generate_batch`` (its continuous batching, SDPA) on the full model over the
  first ``--hf-requests`` requests, offline (all at once); TTFT/TPOT from its token timestamps.

Columns: request throughput and output tok/s over the makespan (first send → last token), TTFT and
TPOT p50/p99, peak memory (CUDA), the largest running batch, and the decode steps at that batch
against the read-bandwidth ceiling: bytes a step touches (weights + the KV its rows read) / step time
/ the bandwidth of a reduction over a buffer far larger than L2, measured in the same run (CUDA).
TTFT p50 under light load (``--light`` requests sent one at a time, before the rates; without them the lowest
rate) is also given against one bare prefill of a prompt (``ttft_vs_prefill``).

    PYTHONPATH=src python benchmarks/serve_load.py --smoke --out serve_load.json     # CPU, tiny, ~1 min
    PYTHONPATH=src python benchmarks/serve_load.py --shape 0.6b --prompt-len 8192 --new-tokens 256 \\
        --requests 32 --rates 2,8,inf --allocs 25:512,full --hf-requests 8 --out $OUT/serve_load.json

JSON goes to ``--out``; a table is printed last.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib.util
import json
import math
import multiprocessing as mp
import random
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

GIB = 1 << 30


# ---- the load client (runs in a child process) -------------------------------------------------------------
async def _one(client, prompt, new, at, t0):
    await asyncio.sleep(max(0.0, t0 + at - time.perf_counter()))
    sent = time.perf_counter()
    times, status = [], None
    body = {"prompt": prompt, "max_tokens": new, "temperature": 0, "ignore_eos": True, "stream": True}
    async with client.stream("POST", "/v1/completions", json=body) as r:
        status = r.status_code
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                n = len(json.loads(line[6:])["choices"][0].get("token_ids", []))
                times.extend([time.perf_counter()] * n)
    return {"status": status, "sent": sent, "token_times": times}


async def _drive(url, prompts, new, arrivals):
    """``arrivals`` (seconds from the start) of every request, or None: one at a time, each sent when the
    previous one has finished (light load: nothing else runs beside a request)."""
    import httpx

    t0 = time.perf_counter() + 0.05
    limits = httpx.Limits(max_connections=len(prompts) + 8, max_keepalive_connections=len(prompts) + 8)
    async with httpx.AsyncClient(base_url=url, timeout=None, limits=limits) as client:
        if arrivals is None:
            return [await _one(client, p, new, 0.0, time.perf_counter()) for p in prompts]
        return await asyncio.gather(*(_one(client, p, new, a, t0) for p, a in zip(prompts, arrivals)))


def _client(url, prompts, new, arrivals, conn):
    try:
        conn.send(asyncio.run(_drive(url, prompts, new, arrivals)))
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        conn.send({"error": f"{type(e).__name__}: {e}"})


# ---- helpers ------------------------------------------------------------------------------------------------
def _serving_bench():
    """benchmarks/serving.py (shapes, allocations, weight bytes), imported by path."""
    spec = importlib.util.spec_from_file_location("consa_bench_serving", Path(__file__).with_name("serving.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def read_bandwidth(nbytes: int = 1 << 32) -> float | None:
    """Bytes/s of a sum over ``nbytes`` of bf16 (far larger than L2): a read, not a copy. None on CPU."""
    if not torch.cuda.is_available():
        return None
    x = torch.empty(nbytes // 2, device="cuda", dtype=torch.bfloat16).normal_()
    for _ in range(3):
        x.sum()
    times = []
    for _ in range(10):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        x.sum()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) * 1e-3)
    del x
    torch.cuda.empty_cache()
    return nbytes / statistics.median(times)


def pct(xs, q):
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, math.ceil(q / 100 * len(xs)) - 1))]


def summarize(per_request, new) -> dict:
    """Throughput over the makespan and latency percentiles of per-request (sent, [token times])."""
    done = [r for r in per_request if r["token_times"]]
    start = min(r["sent"] for r in per_request)
    end = max(r["token_times"][-1] for r in done) if done else start
    span = max(end - start, 1e-9)
    ttft = [r["token_times"][0] - r["sent"] for r in done]
    tpot = [(r["token_times"][-1] - r["token_times"][0]) / (len(r["token_times"]) - 1) for r in done if len(r["token_times"]) > 1]
    tokens = sum(len(r["token_times"]) for r in done)
    return {"completed": len(done), "failed": len(per_request) - len(done), "makespan_s": span, "req_per_s": len(done) / span,
            "out_tok_per_s": tokens / span, "ttft_p50_s": pct(ttft, 50), "ttft_p99_s": pct(ttft, 99),
            "tpot_p50_s": pct(tpot, 50), "tpot_p99_s": pct(tpot, 99)}


def _peak_reset():
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak() -> float | None:
    return torch.cuda.max_memory_allocated() / GIB if torch.cuda.is_available() else None


def kv_read_bytes(pool, rows: int, fa_slots: int) -> int:
    """Bytes of KV a decode step over ``rows`` rows touches, ``fa_slots`` the FA slots its rows read
    together (each row its own length, the Triton path; the torch path reads every row up to the
    longest and logs that) and each SWA ring whole: what this implementation reads."""
    total = 0
    for parts in pool.parts:
        for p in parts:
            lay = p.layer
            slots = lay.fa_keys.shape[1] * fa_slots + rows * lay.swa_keys.shape[1] * lay.swa_keys.shape[2]
            total += 2 * slots * lay.fa_keys.shape[-1] * lay.fa_keys.element_size()
    return total


# ---- the rows ---------------------------------------------------------------------------------------------
def serve_row(model, alloc_name, rate, prompts, new, args, bw, weight_bytes, sched):
    from consa.serving.scheduler import EngineThread
    from consa.serving.server import App, BackgroundServer

    sched.trace = []
    engine = EngineThread(sched).start()
    app = App(engine, model_name="bench", tokenizer=None, eos=(), max_len=sched.max_len)
    rng = random.Random(args.seed)
    arrivals, t = [], 0.0
    for _ in prompts:
        arrivals.append(t)
        t += 0.0 if math.isinf(rate) or rate == 0 else rng.expovariate(rate)
    arrivals = None if rate == 0 else arrivals  # 0: one request at a time
    _peak_reset()
    with BackgroundServer(app.starlette()) as srv:
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_client, args=(srv.url, prompts, new, arrivals, child), daemon=True)
        proc.start()
        got = parent.recv()
        proc.join()
    if isinstance(got, dict):
        raise RuntimeError(f"load client: {got['error']}")
    row = {"row": "serve", "alloc": alloc_name, "rate": "one at a time" if rate == 0 else rate, "requests": len(prompts),
           "slots": sched.pool.num_slots,
           **summarize(got, new), "peak_gib": _peak(), "http_errors": sum(r["status"] != 200 for r in got)}
    trace, sched.trace = sched.trace, None
    if trace:
        top = max(t[1] for t in trace)
        at_top = [t for t in trace if t[1] == top]
        step = statistics.median(t[3] for t in at_top)
        rows = max(t[0] for t in at_top)
        read = max(t[2] for t in at_top if t[0] == rows)
        touched = weight_bytes + kv_read_bytes(sched.pool, rows, read)
        row.update(max_running=top, decode_step_ms_at_max=step * 1e3, decode_bytes_at_max=touched,
                   pct_read_bw_at_max=None if bw is None else 100 * touched / step / bw)
    return row


def fixed_row(model, alloc_name, prompts, new, args):
    from consa.serving.generate import generate_many

    _peak_reset()
    b = args.fixed_batch or len(prompts)
    t = time.perf_counter()
    outs = generate_many(model, prompts, batch_size=b, max_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    wall = time.perf_counter() - t
    tokens = sum(len(o) for o in outs)
    return {"row": "fixed", "alloc": alloc_name, "rate": "all at once", "requests": len(prompts), "batch": b, "makespan_s": wall,
            "req_per_s": len(prompts) / wall, "out_tok_per_s": tokens / wall, "peak_gib": _peak(), "completed": len(outs)}


def hf_row(model, prompts, new, args):
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    import consa

    consa.detach(model)  # transformers' own attention
    gc = GenerationConfig(max_new_tokens=new, do_sample=False, eos_token_id=-1, pad_token_id=0)
    cfg = ContinuousBatchingConfig() if torch.cuda.is_available() else ContinuousBatchingConfig(
        num_blocks=64, max_batch_tokens=512, page_size=32)
    _peak_reset()
    t = time.perf_counter()
    out = model.generate_batch(prompts, generation_config=gc, continuous_batching_config=cfg, record_timestamps=True)
    wall = time.perf_counter() - t
    per = [{"sent": o.created_time, "token_times": list(o.timestamps or [])} for o in out.values()]
    row = {"row": "hf generate_batch", "alloc": "full", "rate": "all at once", "requests": len(prompts), "wall_s": wall,
           **summarize(per, new), "peak_gib": _peak()}
    return row


def bare_prefill_s(model, prompt) -> float:
    """One B=1 prefill of ``prompt`` on a fresh static cache (the second of two: the first compiles)."""
    from consa.serving import DecodeEngine

    ids = torch.tensor([prompt], device=next(model.parameters()).device)
    times = []
    for _ in range(2):
        engine = DecodeEngine(model, 1, len(prompt) + 2, cuda_graphs=False)
        _peak_reset()
        t = time.perf_counter()
        engine.prefill(ids)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
        del engine
    return times[-1]


# ---- main ------------------------------------------------------------------------------------------------
def _lengths(spec: str, n: int, rng: random.Random) -> list[int]:
    lo, _, hi = spec.partition(":")
    lo, hi = int(lo), int(hi or lo)
    return [rng.randint(lo, hi) for _ in range(n)]


def build(args, S):
    import consa

    if args.smoke:
        from consa.tiny import tiny_model

        model = tiny_model("qwen3", vocab_size=1000, num_layers=2, num_heads=8, num_kv_heads=4, hidden_size=64,
                           max_position_embeddings=4096)
        return model, lambda spec: S.allocation(model, spec), consa
    model = S.build(args.shape, "cuda")
    return model, lambda spec: S.allocation(model, spec), consa


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="CPU, a tiny model, tiny sizes")
    ap.add_argument("--shape", default="0.6b")
    ap.add_argument("--prompt-len", default="8192", help="tokens per prompt, or A:B for uniform in [A, B]")
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--rates", default="2,8,inf", help="requests/s, comma-separated (inf: all at once)")
    ap.add_argument("--light", type=int, default=4, help="requests sent one at a time first (light load: TTFT against a "
                    "bare prefill); 0: none")
    ap.add_argument("--allocs", default="25:512,full")
    ap.add_argument("--rows", default="serve,fixed,hf")
    ap.add_argument("--hf-requests", type=int, default=8, help="requests for transformers' generate_batch (0: skip)")
    ap.add_argument("--fixed-batch", type=int, default=0, help="batch of the fixed-batch engine (0: all at once)")
    ap.add_argument("--kv-budget-gib", type=float, default=0.0, help="the server's KV pool (0: 85%% of free memory; CPU 1)")
    ap.add_argument("--max-batch", type=int, default=256, help="most sequences the server holds")
    ap.add_argument("--prefill-chunk", type=int, default=2048)
    ap.add_argument("--idle-prefill", type=int, default=0, help="prompt tokens per step while nothing decodes (0: 4 × chunk)")
    ap.add_argument("--kernel", default="auto", choices=("auto", "torch"), help="the server's FA decode attention")
    ap.add_argument("--no-graphs", action="store_true", help="the server's decode steps eager (default: CUDA graphs on CUDA)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--budget-s", type=float, default=420.0, help="skip rows once this much time has passed")
    ap.add_argument("--out", default="serve_load.json")
    args = ap.parse_args(argv)
    if args.smoke:
        args.prompt_len = args.prompt_len if args.prompt_len != "8192" else "24:40"
        args.new_tokens = args.new_tokens if args.new_tokens != 256 else 8
        args.requests = args.requests if args.requests != 32 else 6
        args.rates = args.rates if args.rates != "2,8,inf" else "20,inf"
        args.hf_requests = min(args.hf_requests, 2)
        args.allocs = args.allocs if args.allocs != "25:512,full" else "25:8,full"
        args.prefill_chunk = min(args.prefill_chunk, 16)
    elif not torch.cuda.is_available():
        print("consa: error: benchmarks/serve_load.py needs a CUDA GPU (or --smoke for the CPU smoke run)", file=sys.stderr)
        return 2
    try:
        rates = [float(r) for r in args.rates.split(",")]
        rows = set(args.rows.split(","))
        if not rows <= {"serve", "fixed", "hf"} or any(r <= 0 for r in rates) or args.requests < 1 or args.new_tokens < 1:
            raise ValueError
    except ValueError:
        print("consa: error: --rates must be numbers > 0 (or inf), --rows a subset of serve,fixed,hf, "
              "--requests and --new-tokens >= 1", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    if args.smoke:
        torch.set_num_threads(1)
    S = _serving_bench()
    import transformers

    from consa.models import plans_of, text_config
    from consa.serving.scheduler import Scheduler
    from consa.serving.slots import slots_for_budget

    model, alloc_of, consa = build(args, S)
    rng = random.Random(args.seed)
    vocab = text_config(model).vocab_size
    lengths = _lengths(args.prompt_len, args.requests, rng)
    prompts = [[rng.randrange(3, vocab) for _ in range(n)] for n in lengths]
    max_len = max(lengths) + args.new_tokens + 1
    bw = read_bandwidth()
    weight_bytes = S.weight_bytes(model)
    dev = next(model.parameters()).device
    report = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", "torch": torch.__version__,
              "transformers": transformers.__version__, "read_bandwidth_TBps": None if bw is None else bw / 1e12,
              "args": vars(args), "prompt_lengths": lengths, "rows": [], "skipped": []}
    if bw is not None:
        print(f"read bandwidth (sum over 4 GiB) {bw / 1e12:.2f} TB/s", flush=True)

    def save():
        Path(args.out).write_text(json.dumps(report, indent=1))

    def attempt(where, fn):
        if time.perf_counter() - t0 > args.budget_s:
            report["skipped"].append(f"{where}: time budget")
            return
        try:
            row = fn()
        except Exception as e:  # noqa: BLE001 - one row must not lose the run
            traceback.print_exc()
            report["skipped"].append(f"{where}: {type(e).__name__}: {str(e)[:300]}")
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            return
        report["rows"].append(row)
        print(json.dumps(row), flush=True)
        save()

    for spec in args.allocs.split(","):
        alloc = alloc_of(spec)
        consa.apply_allocation(model, alloc)
        plans = plans_of(model)
        cfg = text_config(model)
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        if "serve" in rows:
            _peak_reset()
            if args.kv_budget_gib:
                budget = int(args.kv_budget_gib * GIB)
            elif dev.type == "cuda":
                budget = int(torch.cuda.mem_get_info(dev)[0] * 0.85) - 2 * GIB  # room for prefill activations
            else:
                budget = GIB
            slots = min(args.max_batch, slots_for_budget(plans, max_len, head_dim, next(model.parameters()).dtype, budget))
            if slots < 1:
                report["skipped"].append(f"serve {spec}: no sequence of {max_len} tokens fits the KV budget")
            else:
                sched = Scheduler(model, num_slots=slots, max_len=max_len, prefill_tokens=args.prefill_chunk,
                                  idle_prefill_tokens=max(args.idle_prefill or 4 * args.prefill_chunk, args.prefill_chunk),
                                  max_queue=len(prompts) + 1, plans=plans, kernel=args.kernel,
                                  graphs=False if args.no_graphs else None)
                report.setdefault("bare_prefill_s", {})[spec] = None
                if args.light:
                    attempt(f"serve {spec} one at a time",
                            lambda: serve_row(model, spec, 0, prompts[: args.light], args.new_tokens, args, bw, weight_bytes, sched))
                for rate in rates:
                    attempt(f"serve {spec} rate {rate}",
                            lambda: serve_row(model, spec, rate, prompts, args.new_tokens, args, bw, weight_bytes, sched))
                del sched
                gc.collect()  # the engine, app and captured graphs hold the pool in reference cycles
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                consa.apply_allocation(model, alloc)
                try:
                    report["bare_prefill_s"][spec] = bare_prefill_s(model, prompts[0])
                except Exception as e:  # noqa: BLE001
                    report["skipped"].append(f"bare prefill {spec}: {type(e).__name__}: {e}")
        if "fixed" in rows:
            consa.apply_allocation(model, alloc)
            attempt(f"fixed {spec}", lambda: fixed_row(model, spec, prompts, args.new_tokens, args))
    if "hf" in rows and args.hf_requests > 0:
        attempt("hf generate_batch", lambda: hf_row(model, prompts[: args.hf_requests], args.new_tokens, args))
    for row in report["rows"]:
        pre = (report.get("bare_prefill_s") or {}).get(row["alloc"])
        lowest = "one at a time" if args.light else min(rates)
        if row["row"] == "serve" and row["rate"] == lowest and pre and row.get("ttft_p50_s"):
            row["ttft_vs_prefill"] = row["ttft_p50_s"] / pre
    report["wall_s"] = time.perf_counter() - t0
    save()
    print_table(report)
    return 0


def _f(x, fmt="{:.3g}"):
    return "–" if x is None else fmt.format(x)


def print_table(report):
    print(f"\n{report['device']}  torch {report['torch']}  transformers {report['transformers']}  read bw "
          f"{_f(report['read_bandwidth_TBps'], '{:.2f}')} TB/s  prompts {min(report['prompt_lengths'])}-"
          f"{max(report['prompt_lengths'])} tokens, {report['args']['new_tokens']} new")
    print("| row | alloc | rate (req/s) | requests | req/s | out tok/s | TTFT p50 s | TTFT p99 s | TPOT p50 ms | TPOT p99 ms "
          "| peak GiB | max running | % read bw (decode, max running) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in report["rows"]:
        ms = lambda x: None if x is None else 1e3 * x  # noqa: E731
        print(f"| {r['row']} | {r['alloc']} | {r['rate']} | {r['requests']} | {_f(r['req_per_s'])} | {_f(r['out_tok_per_s'], '{:.0f}')} | "
              f"{_f(r.get('ttft_p50_s'))} | {_f(r.get('ttft_p99_s'))} | {_f(ms(r.get('tpot_p50_s')))} | {_f(ms(r.get('tpot_p99_s')))} | "
              f"{_f(r.get('peak_gib'), '{:.1f}')} | {r.get('max_running', r.get('batch', '–'))} | "
              f"{_f(r.get('pct_read_bw_at_max'), '{:.0f}%')} |")
    for spec, s in (report.get("bare_prefill_s") or {}).items():
        ttft = [r.get("ttft_vs_prefill") for r in report["rows"] if r["alloc"] == spec and r.get("ttft_vs_prefill")]
        print(f"bare prefill ({spec}, B=1, first prompt): {_f(s)} s" + (f"; TTFT p50 under the lightest load = {ttft[0]:.2f}× it" if ttft else ""))
    for s in report["skipped"]:
        print("skipped:", s)


if __name__ == "__main__":
    sys.exit(main())
