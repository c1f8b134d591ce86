"""Causal prefill of a few heads: one flash call against ``split_causal`` at each depth (GPU).

With few heads (a hybrid layer's FA group) one causal call leaves SMs idle; the split runs uniform
tiles. Part 1 times the causal heads alone (SDPA's default, cuDNN on Hopper, against depths 1..4);
part 2 times the whole hybrid layer (8K and 32K) with its FA heads split, and full attention in the same run.

    PYTHONPATH=src python3 benchmarks/causal_split.py --out $OUT/causal_split.json
"""

from __future__ import annotations

import argparse
import json
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from attention_speed import HEAD_DIM, KV_HEADS, both, consa_attention, module_with_plan, qkv, rel_err, window_pairs
from consa.attention import select, split_causal


def heads_alone(t, hq, hk, depths, device, dtype):
    g = torch.Generator(device=device).manual_seed(t + hq)
    q, k, v = (torch.randn(1, t, h, HEAD_DIM, device=device, dtype=dtype, generator=g).transpose(1, 2) for h in (hq, hk, hk))
    scale = HEAD_DIM**-0.5
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=hq != hk)
    row = {"context": t, "q_heads": hq, "kv_heads": hk, "sdpa_ms": both(lambda: F.scaled_dot_product_attention(
        q, k, v, is_causal=True, scale=scale, enable_gqa=hq != hk), device)["ms"]}
    for d in depths:
        row[f"split{d}_ms"] = both(lambda d=d: split_causal.split_causal(q, k, v, scale, d), device)["ms"]
        row[f"split{d}_err"] = rel_err(split_causal.split_causal(q, k, v, scale, d), ref)
    return row


def hybrid_layer(t, w, share, depths, device, dtype):
    scale = HEAD_DIM**-0.5
    q, k, v = qkv(1, t, t, device, dtype, seed=t + w)
    n_fa = round(share * KV_HEADS)
    full = both(lambda: consa_attention(SimpleNamespace(training=False), q, k, v, None, scale), device)["ms"]
    mod = module_with_plan(n_fa, w)
    ideal = full * (share + (1 - share) * window_pairs(t, w) / (t * (t + 1) / 2))
    row = {"context": t, "window": w, "fa_share": share, "full_ms": full, "ideal_ms": ideal}
    for d in (0, *depths):
        with select.override(mod.consa_plan, split_depth=d):
            ms = both(lambda: consa_attention(mod, q, k, v, None, scale), device)["ms"]
        row[f"depth{d}_ms"], row[f"depth{d}_over_ideal"] = ms, ms / ideal
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="causal_split.json")
    p.add_argument("--depths", default="1,2,3,4")
    a = p.parse_args()
    device, dtype = torch.device("cuda"), torch.bfloat16
    depths = [int(x) for x in a.depths.split(",")]
    res = {"alone": [], "hybrid": []}
    for t in (8192, 16384, 32768):
        for hq, hk in ((4, 2), (8, 4), (16, 8)):
            res["alone"].append(heads_alone(t, hq, hk, depths, device, dtype))
            print(json.dumps(res["alone"][-1]), flush=True)
    for t in (8192, 32768):
        for w in (512, 4096):
            for share in (0.25, 0.5):
                res["hybrid"].append(hybrid_layer(t, w, share, depths, device, dtype))
                print(json.dumps(res["hybrid"][-1]), flush=True)
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)
    print("\nT  hq  sdpa  " + "  ".join(f"d{d}" for d in depths))
    for r in res["alone"]:
        print(r["context"], r["q_heads"], f"{r['sdpa_ms']:.3f}", "  ".join(f"{r[f'split{d}_ms']:.3f}" for d in depths))
    print("\nT  W  FA  full ideal  " + "  ".join(f"d{d}/ideal" for d in (0, *depths)))
    for r in res["hybrid"]:
        print(r["context"], r["window"], r["fa_share"], f"{r['full_ms']:.3f} {r['ideal_ms']:.3f}",
              "  ".join(f"{r[f'depth{d}_over_ideal']:.2f}" for d in (0, *depths)))


if __name__ == "__main__":
    main()
