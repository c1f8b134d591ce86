"""Assisted (prompt-lookup) decoding over the HybridCache: same tokens as plain greedy, and how fast.

For each kernel setting (``KernelConfig.decode`` auto/sdpa × side-stream overlap on/off) and dtype,
a tiny hybrid Qwen3 (tests/test_cache_rollback.py's) decodes greedily with and without prompt-lookup
drafts. Each row records whether the tokens agree, the first step where they diverge, and the smallest
top-1/top-2 logit margin of plain greedy decoding: a divergence at a step with a tiny margin is
numerics (verification forwards and one-token steps take different kernels), one at a wide margin is
a bug. With ``--context`` it also times a Qwen3-0.6B-shaped model (random weights) at that prompt
length: tokens/s with and without drafts.

    PYTHONPATH=src python3 benchmarks/assisted_decoding.py --out $OUT/assisted.json
    PYTHONPATH=src python3 benchmarks/assisted_decoding.py --smoke      # CPU: fp32 agreement, tiny model speed
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from consa.attention import select  # noqa: E402
from consa.attention.cache import HybridCache  # noqa: E402
from consa.compat import cache_kwargs  # noqa: E402
from consa.models import plans_of  # noqa: E402


def _prompt(vocab: int, device) -> torch.Tensor:
    g = torch.Generator().manual_seed(2)
    pattern = torch.randint(3, vocab, (1, 5), generator=g)
    return torch.cat([pattern, pattern, pattern[:, :3]], dim=1).to(device)  # repeats: lookup finds drafts


def agreement(device, dtype, new_tokens: int) -> list[dict]:
    from test_cache_rollback import _hybrid

    rows = []
    for decode in ("auto", "sdpa"):
        for overlap in (True, False):
            model = _hybrid(0).to(device, dtype)
            with select.override(model, decode=decode, prefill_overlap=overlap, decode_overlap=overlap):
                ids = _prompt(model.config.vocab_size, device)
                kw = dict(max_new_tokens=new_tokens, do_sample=False, pad_token_id=0, eos_token_id=None)
                plain = model.generate(ids, **cache_kwargs(HybridCache(plans_of(model)), model), output_scores=True,
                                       return_dict_in_generate=True, **kw)
                top2 = [s.float().topk(2).values[0] for s in plain.scores]
                margins = [float(v[0] - v[1]) for v in top2]
                drafted = model.generate(ids, **cache_kwargs(HybridCache(plans_of(model)), model), prompt_lookup_num_tokens=3, **kw)
            diff = (drafted[0] != plain.sequences[0]).nonzero()
            first = int(diff[0]) - ids.shape[1] if len(diff) else None
            rows.append({"dtype": str(dtype), "decode_kernel": decode, "overlap": overlap, "same": first is None,
                         "first_divergence": first, "margin_there": None if first is None else margins[first],
                         "min_margin": min(margins)})
    return rows


def speed(device, dtype, context: int, new_tokens: int, profile: bool = False) -> dict:
    from attention_speed import qwen3_config  # the benchmark's Qwen3-0.6B-shaped config

    import consa
    from consa.allocation import Allocation
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(qwen3_config(device.type != "cuda"), dtype=dtype).to(device).eval()
    shape = consa.model_shape(model)
    units = [(i % 4 == 0) for i in range(shape.num_layers * shape.num_kv_heads)]  # 25% FA heads
    consa.apply_allocation(model, Allocation.from_units(units, "kv_head", shape, 512, 0))
    g = torch.Generator().manual_seed(0)
    block = torch.randint(3, model.config.vocab_size, (1, 64), generator=g)
    ids = block.repeat(1, context // 64).to(device)  # a repetitive prompt: lookup drafts often match
    out = {}
    forwards = []  # query count of every forward: 1 per plain step, 1 + drafts per verification
    model.register_forward_pre_hook(lambda m, a, kw: forwards.append(kw.get("input_ids", a[0] if a else None).shape[-1]),
                                    with_kwargs=True)
    runs = [("plain", {}, "auto"), ("prompt_lookup", {"prompt_lookup_num_tokens": 4}, "auto"),
            ("prompt_lookup_sdpa_verify", {"prompt_lookup_num_tokens": 4}, "sdpa")]  # drafts verified by the SDPA pair
    for name, extra, decode in runs:
        kw = dict(max_new_tokens=new_tokens, do_sample=False, pad_token_id=0, eos_token_id=None, **extra)
        with select.override(model, decode=decode):
            model.generate(ids, **cache_kwargs(HybridCache(plans_of(model)), model), **{**kw, "max_new_tokens": 8})  # warm-up: JIT at this length
            if device.type == "cuda":
                torch.cuda.synchronize()
            forwards.clear()
            t0 = time.perf_counter()
            prof = torch.profiler.profile() if profile else contextlib.nullcontext()
            with prof:
                seq = model.generate(ids, **cache_kwargs(HybridCache(plans_of(model)), model), **kw)
                if device.type == "cuda":
                    torch.cuda.synchronize()
        if profile:
            print(f"--- {name}: the ops with the most CPU time ---")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=60))
        steps = forwards[1:]  # after the prefill
        out[name] = {"seconds": time.perf_counter() - t0, "tokens": seq[0, context:].tolist(), "forwards_after_prefill": len(steps),
                     "mean_queries_per_forward": sum(steps) / max(1, len(steps))}
    out["same_tokens"] = out["plain"]["tokens"] == out["prompt_lookup"]["tokens"] == out["prompt_lookup_sdpa_verify"]["tokens"]
    out["speedup"] = out["plain"]["seconds"] / out["prompt_lookup"]["seconds"]
    out["speedup_sdpa_verify"] = out["plain"]["seconds"] / out["prompt_lookup_sdpa_verify"]["seconds"]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="assisted_decoding.json")
    p.add_argument("--smoke", action="store_true", help="CPU, fp32 only; the speed section on a tiny Qwen3 at 512 tokens")
    p.add_argument("--new-tokens", type=int, default=12)
    p.add_argument("--speed-only", action="store_true", help="skip the agreement section")
    p.add_argument("--profile", action="store_true", help="print the top ops of each timed generate (torch.profiler)")
    p.add_argument("--context", type=int, default=8192, help="prompt length of the speed section (0: skip it)")
    a = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not a.smoke else "cpu")
    dtypes = [torch.float32] if a.smoke else [torch.float32, torch.float64, torch.bfloat16]
    res = {"device": str(device), "agreement": [], "speed": None}
    for dtype in [] if a.speed_only else dtypes:
        res["agreement"] += agreement(device, dtype, a.new_tokens)
    if a.smoke:
        a.context = min(a.context, 512) if a.context else 0
    if a.context:
        res["speed"] = speed(device, torch.float32 if a.smoke else torch.bfloat16, a.context, 16 if a.smoke else 64, a.profile)
    Path(a.out).write_text(json.dumps(res, indent=1))
    print(f"{'dtype':>15} {'decode':>6} {'overlap':>7} {'same':>5} {'diverges at':>11} {'margin there':>12} {'min margin':>10}")
    for r in res["agreement"]:
        at = "" if r["first_divergence"] is None else str(r["first_divergence"])
        m = "" if r["margin_there"] is None else f"{r['margin_there']:.2e}"
        print(f"{r['dtype']:>15} {r['decode_kernel']:>6} {str(r['overlap']):>7} {str(r['same']):>5} {at:>11} {m:>12} {r['min_margin']:>10.2e}")
    if res["speed"]:
        s = res["speed"]
        print(f"context {a.context}: plain {s['plain']['seconds']:.2f} s, prompt lookup {s['prompt_lookup']['seconds']:.2f} s "
              f"({s['speedup']:.2f}x), same tokens: {s['same_tokens']}")
        print(f"  drafts verified by the SDPA pair instead of the one-launch kernel: {s['speedup_sdpa_verify']:.2f}x")
        for name in ("plain", "prompt_lookup", "prompt_lookup_sdpa_verify"):
            r = s[name]
            print(f"  {name}: {r['forwards_after_prefill']} forwards after the prefill, {r['mean_queries_per_forward']:.2f} queries each, "
                  f"{1e3 * r['seconds'] / max(1, r['forwards_after_prefill'] + 1):.1f} ms per forward")
    return 0


if __name__ == "__main__":
    sys.exit(main())
