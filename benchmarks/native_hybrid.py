"""A real run on natively hybrid models (issue #35, item 4): gpt-oss- and Gemma-3-shaped, random weights.

For each shape (transformers' own ``GptOssForCausalLM`` / ``Gemma3ForCausalLM``, whose ``layer_types``
already mix sliding and full layers):

1. a ConSA search at t = 0.5 per KV head over the *full* layers' heads only (the native sliding layers
   stay sliding at their own window: fixed, uncounted units), on random-token batches;
2. a head-wise export of the allocation;
3. the export reloaded in a child process that cannot import consa
   (``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)``): its logits and greedy tokens on a
   fixed prompt against consa's hybrid in this process (both in fp32, from the same stored weights);
4. decoding through consa's static engine (``consa.serving.engine.DecodeEngine``, CUDA graphs on CUDA) at a
   context of ``--context`` tokens: the KV bytes its cache holds (``stored_bytes()``) against what the
   allocation promises (``Allocation.kv_slots``), against the native model's layout and against full
   attention on every head; the eager ``HybridCache`` on the same prompt too; decode tokens/s on CUDA.

The last thing printed is a markdown table; ``--out FILE.json`` gets every number. Each shape runs in its
own try/except: a failure is that row's error, the other shape still reports. ``--smoke`` runs tiny CPU
sizes (``tests/test_native_hybrid_bench.py``). Everything is written under the directory of ``--out``
(a work folder removed at the end unless ``--keep``).

GPU (one H100, well under 5 minutes)::

    PYTHONPATH=src python benchmarks/native_hybrid.py --out $OUT/native_hybrid.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import traceback
from pathlib import Path

from consa import consa_free
from consa.consa_free import HIDE_CONSA

SEED = 0

# ---- the two shapes -------------------------------------------------------------------------------------
# GPU: modest sizes with the real models' attention layout (gpt-oss: 64-dim heads, 8 KV heads, window 128,
# sink logits, alternating sliding/full; Gemma 3: 5 sliding : 1 full, window 512). Smoke: tiny, CPU.
SIZES = {
    "gpt-oss": {
        "gpu": dict(vocab_size=32000, hidden_size=1024, intermediate_size=1024, num_hidden_layers=12,
                    num_attention_heads=16, num_key_value_heads=8, head_dim=64, num_local_experts=4,
                    num_experts_per_tok=2, sliding_window=128),
        "smoke": dict(vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
                      num_experts_per_tok=2, sliding_window=8),
    },
    "gemma-3": {
        "gpu": dict(vocab_size=32000, hidden_size=1024, intermediate_size=2048, num_hidden_layers=18,
                    num_attention_heads=8, num_key_value_heads=4, head_dim=128, query_pre_attn_scalar=128,
                    sliding_window=512),
        "smoke": dict(vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=12,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
                      sliding_window=8),
    },
}
# run settings: search sequence length / batch / steps, reload-check prompt and new tokens, decode context
RUN = {
    "gpu": dict(seq_len=2048, batch=2, steps=30, check_len=1024, check_new=16, context=8192, new_tokens=128),
    "smoke": dict(seq_len=32, batch=2, steps=3, check_len=24, check_new=6, context=64, new_tokens=8),
}
SPECIAL = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)


def build_model(name: str, size: dict):
    import torch
    import transformers

    torch.manual_seed(SEED)
    if name == "gpt-oss":
        cfg = transformers.GptOssConfig(**size, **SPECIAL)
        model = transformers.GptOssForCausalLM(cfg)
    else:
        cfg = transformers.Gemma3TextConfig(**size, **SPECIAL)
        model = transformers.Gemma3ForCausalLM(cfg)
    return model.eval()


# ---- the consa-free reload ------------------------------------------------------------------------------
LOADER = HIDE_CONSA + r'''
import json, sys
import torch
from transformers import AutoModelForCausalLM
job = json.loads(open(sys.argv[1]).read())
model, info = AutoModelForCausalLM.from_pretrained(job["dir"], local_files_only=True, trust_remote_code=True,
                                                   output_loading_info=True)
bad = {k: sorted(v)[:3] for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
if bad:
    raise SystemExit(f"weights do not load: {bad}")
model = model.float().to(job["device"]).eval()
ids = torch.tensor(job["ids"], device=job["device"])
with torch.no_grad():
    logits = model(input_ids=ids).logits.float().cpu()
    gen = model.generate(ids, max_new_tokens=job["new"], do_sample=False, pad_token_id=0, eos_token_id=None)
assert not any(m == "consa" or m.startswith("consa.") for m in sys.modules)
torch.save({"type": type(model).__name__, "logits": logits, "gen": gen.cpu()}, sys.argv[2])
'''


def reload_without_consa(folder: Path, ids, new: int, device: str, work: Path, timeout: float) -> dict:
    """Load ``folder`` in a child process that cannot import consa: its logits and greedy tokens."""
    import torch

    job = work / "reload_job.json"
    job.write_text(json.dumps({"dir": str(folder), "ids": ids.tolist(), "new": new, "device": device}))
    out = work / "reload_out.pt"
    proc = consa_free.run(LOADER, job, out, modules_cache=work / "hf_modules", timeout=max(30.0, timeout), cwd=str(work))
    if proc.returncode != 0:
        raise RuntimeError(f"the consa-free reload failed: {proc.stderr.strip()[-1500:]}")
    return torch.load(out, weights_only=True)  # a dict of tensors and a class name: nothing to unpickle


# ---- one shape --------------------------------------------------------------------------------------------
def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_shape(name: str, mode: str, work: Path, device, deadline: float, log, rec: dict) -> dict:
    """Fill ``rec`` stage by stage (a failure leaves what was measured before it)."""
    import torch

    import consa
    from consa import compat
    from consa.allocation import Allocation
    from consa.export import export
    from consa.models import attention_modules, head_dim, hybrid_cache, native_windows
    from consa.serving.engine import DecodeEngine
    from consa.serving.generate import generate_static
    from consa.train.search import Search, SearchConfig

    def left(stage: str) -> None:
        if time.monotonic() > deadline:
            raise TimeoutError(f"time budget spent before {stage}")

    size, run = SIZES[name][mode], RUN[mode]
    rec.update({"shape": name, "device": device.type, "config": size, "run": run})
    t_start = time.monotonic()
    model = build_model(name, size)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model.to(device=device, dtype=dtype)
    impl = model.config._attn_implementation
    native = native_windows(model)
    rec["layer_types"] = list(model.config.layer_types)
    rec["native_windows"] = native
    rec["experts_implementation"] = getattr(model.config, "_experts_implementation", None)
    vocab = size["vocab_size"]
    window = size["sliding_window"]  # the searched SWA heads get the model's own window

    # 1. search at t = 0.5 over the full layers' KV heads
    left("search")
    b, seq = run["batch"], run["seq_len"]

    def batches(step: int) -> dict:
        g = torch.Generator().manual_seed(1000 + step)
        return {"input_ids": torch.randint(3, vocab, (b, seq), generator=g)}

    cfg = SearchConfig.from_flat(dict(sparsity=0.5, window=window, seq_len=seq, steps=run["steps"], checkpoint_every=0,
                                      refine_evals=0, granularity="kv_head", seed=SEED))
    t0 = time.monotonic()
    alloc = Search(model, cfg, batches, work / "search", progress=False).run()
    _sync(device)
    rec["search_s"] = round(time.monotonic() - t0, 2)
    consa.detach(model, impl)
    rec["units_searched"] = alloc.num_units
    rec["fa_kept"] = alloc.num_units - alloc.num_swa
    rec["fixed_units"] = alloc.num_fixed
    rec["fa_heads"] = [[i, h] for i in range(alloc.shape.num_layers) for h in alloc.fa_heads(i) if not alloc.fixed[i][h]]
    rec["allocation_native"] = alloc.native
    log(f"{name}: searched {alloc.num_units} units ({alloc.num_fixed} fixed), {rec['fa_kept']} keep FA, {rec['search_s']} s")

    # 2. head-wise export
    left("export")
    t0 = time.monotonic()
    summary = export(model, alloc, work / "export", mode="heads")
    rec["export_mode"] = summary["mode"]
    rec["export_s"] = round(time.monotonic() - t0, 2)

    # 3. reload without consa; compare with consa's hybrid, both fp32 from the stored (possibly bf16) weights
    left("reload")
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(3, vocab, (1, run["check_len"]), generator=g)
    model.float()
    consa.apply_allocation(model, alloc)
    try:
        with torch.no_grad():
            ref_logits = model(input_ids=ids.to(device)).logits.float().cpu()
            ref_gen = consa.generate(model, ids.to(device), static=False, max_new_tokens=run["check_new"], do_sample=False,
                                     pad_token_id=0, eos_token_id=None).cpu()
    finally:
        consa.detach(model, impl)
    t0 = time.monotonic()
    got = reload_without_consa(work / "export", ids, run["check_new"], str(device), work, deadline - time.monotonic())
    rec["reload_s"] = round(time.monotonic() - t0, 2)
    rec["reload_class"] = got["type"]
    rec["logits_max_diff"] = float((got["logits"] - ref_logits).abs().max())
    rec["logits_max_abs"] = float(ref_logits.abs().max())
    # random weights often decode one token over and over: the argmax at every prompt position says more
    rec["argmax_agreement"] = float((got["logits"].argmax(-1) == ref_logits.argmax(-1)).float().mean())
    rec["greedy_equal"] = bool(torch.equal(got["gen"], ref_gen))
    rec["greedy_consa"] = ref_gen[0, ids.shape[1]:].tolist()
    rec["greedy_reloaded"] = got["gen"][0, ids.shape[1]:].tolist()
    log(f"{name}: reloaded without consa as {got['type']}: logits max diff {rec['logits_max_diff']:.2e}, "
        f"argmax agreement {rec['argmax_agreement']:.4f} over {ids.shape[1]} positions, greedy equal {rec['greedy_equal']}")

    # 4. decode through consa's static engine at the context; KV bytes stored vs promised
    left("decode")
    model.to(dtype)
    consa.apply_allocation(model, alloc)
    ctx, new = run["context"], run["new_tokens"]
    prompt = torch.randint(3, vocab, (1, ctx - new), generator=g).to(device)
    d = head_dim(attention_modules(model)[0])
    per_slot = 2 * 1 * d * torch.empty((), dtype=dtype).element_size()  # keys + values, one row, one head
    shape = alloc.shape
    everything_fa = Allocation.from_units([True] * alloc.num_units, "kv_head", shape, window, native=native)
    rec.update({
        "context": ctx, "batch": 1, "head_dim": d, "dtype": str(dtype).replace("torch.", ""),
        "promised_kv_bytes": per_slot * alloc.kv_slots(ctx),
        # the static ring keeps W + S slots per SWA head, one more than the eager cache's W - 1 + S (the new key
        # is written before the kernel reads: attention/static_cache.py)
        "static_expected_kv_bytes": per_slot * sum(ctx if hw is None else min(ctx, hw[0] + hw[1])
                                                   for i in range(shape.num_layers) for hw in alloc.head_windows(i)),
        "swa_heads": sum(len(alloc.swa_heads(i)) for i in range(shape.num_layers)),
        "native_kv_bytes": per_slot * everything_fa.kv_slots(ctx),
        "full_kv_bytes": per_slot * ctx * shape.num_layers * shape.num_kv_heads,
    })
    try:
        engine = DecodeEngine(model, 1, ctx)  # the cache holds exactly ctx slots per FA head
        rec["engine_cuda_graphs"] = engine.graphs
        t0 = time.monotonic()
        out = generate_static(model, prompt, engine=engine, max_new_tokens=new, do_sample=False, pad_token_id=0,
                              eos_token_id=None)
        _sync(device)
        rec["engine_first_call_s"] = round(time.monotonic() - t0, 2)
        rec["stored_kv_bytes"] = engine.cache.stored_bytes()
        engine_tokens = out[0, prompt.shape[1]:].tolist()
        # timed (CPU too, so the smoke runs this code; the table shows tok/s only for CUDA): the graph is
        # captured and the prompt's kernels warm by now
        rec["decode_tok_s"] = _timed_decode(engine, prompt, new - 1, device)
        del engine
        if time.monotonic() < deadline:  # the baseline only: past the budget, the row keeps its own numbers
            rec["decode_tok_s_native"], rec["native_stored_kv_bytes"] = _native_layout(model, everything_fa, impl,
                                                                                       prompt, new, ctx, device)
        else:
            rec["decode_tok_s_native"] = rec["native_stored_kv_bytes"] = None
            log(f"{name}: time budget spent, native-layout baseline skipped")
        # the eager HybridCache on the same prompt, one token further (it then holds ctx slots): what
        # kv_slots(ctx) says, slot for slot
        consa.apply_allocation(model, alloc)
        cache = hybrid_cache(model)
        eager = consa.generate(model, prompt, static=False, max_new_tokens=new + 1, do_sample=False, pad_token_id=0,
                               eos_token_id=None, **compat.cache_kwargs(cache, model))
        seen = cache.get_seq_length()
        rec["eager_seen"] = int(seen)
        rec["eager_kv_bytes"] = cache.stored_bytes()
        rec["eager_promised_kv_bytes"] = per_slot * alloc.kv_slots(int(seen))
        rec["engine_equals_eager"] = engine_tokens == eager[0, prompt.shape[1]:][:new].tolist()
        del cache
    finally:
        consa.detach(model, impl)
        from consa.serving.generate import release

        release()
    rec["kv_ratio_full"] = rec["stored_kv_bytes"] / rec["full_kv_bytes"]
    rec["kv_ratio_native"] = rec["stored_kv_bytes"] / rec["native_kv_bytes"]
    rec["seconds"] = round(time.monotonic() - t_start, 2)
    log(f"{name}: KV stored {rec['stored_kv_bytes']} B (promised {rec['promised_kv_bytes']}, static ring "
        f"{rec['static_expected_kv_bytes']}), native {rec['native_kv_bytes']}, full {rec['full_kv_bytes']}; "
        f"{rec.get('decode_tok_s', '-')} tok/s; {rec['seconds']} s")
    return rec


def _timed_decode(engine, prompt, steps: int, device) -> float:
    """tok/s of ``steps`` greedy decode steps after a fresh prefill of ``prompt`` (graphs captured before)."""
    engine.prefill(prompt)
    _sync(device)
    t0 = time.perf_counter()
    engine.decode(steps)
    _sync(device)
    return round(steps / (time.perf_counter() - t0), 1)


def _native_layout(model, everything_fa, impl, prompt, new: int, ctx: int, device) -> tuple[float, int]:
    """The model's own layout (every full layer's head FA) through the same engine: decode tok/s (after a
    warm call that captures the graph) and the bytes its cache holds."""
    import consa
    from consa.serving.engine import DecodeEngine

    consa.detach(model, impl)
    consa.apply_allocation(model, everything_fa)
    engine = DecodeEngine(model, 1, ctx)
    engine.prefill(prompt)
    engine.decode(new - 1)  # captures on the first use
    tok_s = _timed_decode(engine, prompt, new - 1, device)
    held = engine.cache.stored_bytes()
    del engine
    consa.detach(model, impl)
    return tok_s, held


# ---- the table --------------------------------------------------------------------------------------------
def _mib(x) -> str:
    return "-" if x is None else f"{x / 2**20:.2f} MiB" if x >= 2**20 else f"{x:,} B"


def table(rows: list[dict]) -> str:
    """The markdown table. "promised": ``Allocation.kv_slots(context)`` (keys + values, batch 1); the eager
    ``HybridCache`` holds exactly that at ``context`` tokens, the static engine's ring one slot more per SWA
    head (the new key is written before the kernel reads); "native layout": the model as shipped (its
    sliding layers at their window, every full layer's head FA)."""
    head = ("| shape | units searched (+ native SWA, fixed) | FA kept | promised KV | stored KV: eager cache | "
            "stored KV: static engine | native-layout KV | full-attention KV | engine / native | engine / full | "
            "logits max diff, reload w/o consa | greedy equal (argmax agreement, prompt) | decode tok/s (native layout) |")
    ncols = head.count("|") - 1
    lines = [head, "|" + "---|" * ncols]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['shape']} | error: {r['error'].replace('|', '/')} |" + " |" * (ncols - 2))
            continue
        tok = "-" if r.get("device") != "cuda" else f"{r['decode_tok_s']} ({r.get('decode_tok_s_native', '-')})"
        lines.append(
            f"| {r['shape']} | {r['units_searched']} (+ {r['fixed_units']}) | {r['fa_kept']} | "
            f"{_mib(r['promised_kv_bytes'])} | {_mib(r['eager_kv_bytes'])} | {_mib(r['stored_kv_bytes'])} | "
            f"{_mib(r['native_kv_bytes'])} | {_mib(r['full_kv_bytes'])} | {r['kv_ratio_native']:.3f} | "
            f"{r['kv_ratio_full']:.3f} | {r['logits_max_diff']:.2e} | {'yes' if r['greedy_equal'] else 'NO'} "
            f"({r['argmax_agreement']:.4f}) | {tok} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (the test's mode)")
    ap.add_argument("--out", required=True, help="JSON results; everything else is written beside it and removed")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="wall-clock budget: a stage that would start after it is skipped (its row's error says so); "
                         "default 280 on the GPU, 120 for --smoke")
    ap.add_argument("--shapes", default="gpt-oss,gemma-3", help="comma-separated: gpt-oss, gemma-3")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (search outputs, exports)")
    args = ap.parse_args(argv)
    start = time.monotonic()
    out = Path(args.out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    work = out.parent / f".native_hybrid_work_{os.getpid()}"
    work.mkdir()
    os.environ.setdefault("TRITON_CACHE_DIR", str(work / "triton"))  # written only under --out's folder
    os.environ.setdefault("HF_MODULES_CACHE", str(work / "hf_modules"))
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(work / "inductor"))  # flex attention compiles in the search

    import torch
    import transformers
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if args.smoke:
        device, mode = torch.device("cpu"), "smoke"
        torch.set_num_threads(1)
    else:
        if not torch.cuda.is_available():
            raise SystemExit("native_hybrid: needs CUDA (use --smoke for the CPU sizes)")
        device, mode = torch.device("cuda"), "gpu"
    budget = args.budget_s if args.budget_s is not None else (120.0 if args.smoke else 280.0)
    deadline = start + budget

    def log(msg: str) -> None:
        print(f"[{time.monotonic() - start:6.1f}s] {msg}", flush=True)

    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    unknown = [s for s in shapes if s not in SIZES]
    if unknown:
        raise SystemExit(f"native_hybrid: unknown shape(s) {unknown}; choose from {sorted(SIZES)}")
    rows = []
    try:
        for name in shapes:
            shape_dir = work / name
            shape_dir.mkdir()
            rec = {"shape": name}
            rows.append(rec)
            try:
                run_shape(name, mode, shape_dir, device, deadline, log, rec)
            except Exception as e:  # one shape's failure is its row (with what it measured before); the other still runs
                msg = (str(e).strip().splitlines() or [""])[0][:300]
                rec.update(error=f"{type(e).__name__}: {msg}", traceback=traceback.format_exc())
                log(f"{name}: FAILED {type(e).__name__}: {msg}")
            if device.type == "cuda":
                torch.cuda.empty_cache()
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    doc = {
        "command": "PYTHONPATH=src python benchmarks/native_hybrid.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "mode": mode, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "transformers": transformers.__version__, "sparsity": 0.5,
        "budget_s": budget, "seconds": round(time.monotonic() - start, 2), "shapes": {r["shape"]: r for r in rows},
    }
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print()
    print(table(rows))
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
