"""Assisted (prompt-lookup) decoding over the HybridCache: same tokens as plain greedy, and how fast.

For each kernel setting (``kernels.DECODE_KERNEL`` auto/sdpa × side-stream overlap on/off) and dtype,
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
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from consa.attention import kernels  # noqa: E402
from consa.attention.cache import HybridCache  # noqa: E402


def _prompt(vocab: int, device) -> torch.Tensor:
    g = torch.Generator().manual_seed(2)
    pattern = torch.randint(3, vocab, (1, 5), generator=g)
    return torch.cat([pattern, pattern, pattern[:, :3]], dim=1).to(device)  # repeats: lookup finds drafts


def agreement(device, dtype, new_tokens: int) -> list[dict]:
    from test_cache_rollback import _hybrid

    rows = []
    saved = kernels.DECODE_KERNEL, kernels.PREFILL_OVERLAP, kernels.DECODE_OVERLAP
    try:
        for decode in ("auto", "sdpa"):
            for overlap in (True, False):
                kernels.DECODE_KERNEL, kernels.PREFILL_OVERLAP, kernels.DECODE_OVERLAP = decode, overlap, overlap
                model = _hybrid(0).to(device, dtype)
                ids = _prompt(model.config.vocab_size, device)
                kw = dict(max_new_tokens=new_tokens, do_sample=False, pad_token_id=0, eos_token_id=None)
                plain = model.generate(ids, past_key_values=HybridCache(model), output_scores=True, return_dict_in_generate=True, **kw)
                top2 = [s.float().topk(2).values[0] for s in plain.scores]
                margins = [float(v[0] - v[1]) for v in top2]
                drafted = model.generate(ids, past_key_values=HybridCache(model), prompt_lookup_num_tokens=3, **kw)
                diff = (drafted[0] != plain.sequences[0]).nonzero()
                first = int(diff[0]) - ids.shape[1] if len(diff) else None
                rows.append({"dtype": str(dtype), "decode_kernel": decode, "overlap": overlap, "same": first is None,
                             "first_divergence": first, "margin_there": None if first is None else margins[first],
                             "min_margin": min(margins)})
    finally:
        kernels.DECODE_KERNEL, kernels.PREFILL_OVERLAP, kernels.DECODE_OVERLAP = saved
    return rows


def speed(device, dtype, context: int, new_tokens: int) -> dict:
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
    for name, extra in (("plain", {}), ("prompt_lookup", {"prompt_lookup_num_tokens": 4})):
        kw = dict(max_new_tokens=new_tokens, do_sample=False, pad_token_id=0, eos_token_id=None, **extra)
        model.generate(ids[:, :256], past_key_values=HybridCache(model), **{**kw, "max_new_tokens": 4})  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        seq = model.generate(ids, past_key_values=HybridCache(model), **kw)
        if device.type == "cuda":
            torch.cuda.synchronize()
        out[name] = {"seconds": time.perf_counter() - t0, "tokens": seq[0, context:].tolist()}
    out["same_tokens"] = out["plain"]["tokens"] == out["prompt_lookup"]["tokens"]
    out["speedup"] = out["plain"]["seconds"] / out["prompt_lookup"]["seconds"]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="assisted_decoding.json")
    p.add_argument("--smoke", action="store_true", help="CPU, fp32 only; the speed section on a tiny Qwen3 at 512 tokens")
    p.add_argument("--new-tokens", type=int, default=12)
    p.add_argument("--context", type=int, default=8192, help="prompt length of the speed section (0: skip it)")
    a = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not a.smoke else "cpu")
    dtypes = [torch.float32] if a.smoke else [torch.float32, torch.float64, torch.bfloat16]
    res = {"device": str(device), "agreement": [], "speed": None}
    for dtype in dtypes:
        res["agreement"] += agreement(device, dtype, a.new_tokens)
    if a.smoke:
        a.context = min(a.context, 512) if a.context else 0
    if a.context:
        res["speed"] = speed(device, torch.float32 if a.smoke else torch.bfloat16, a.context, 16 if a.smoke else 64)
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
