"""Search scaling: tokens/s and peak memory per GPU on 1 vs N GPUs, and per-layer memory on the CPU.

Two modes, JSON out:

* ``throughput`` — run the real ConSA search (gates only, FSDP2, activation checkpointing, bf16) on a
  Qwen3-shaped model with random weights; rank 0 writes tokens/s (after warm-up steps) and every
  rank's peak CUDA memory. Run it under torchrun for N > 1::

      python benchmarks/search_scaling.py throughput --shape 0.6b --seq-len 32768 --batch-size 2 --out s1.json
      torchrun --standalone --nproc_per_node 2 benchmarks/search_scaling.py throughput --shape 0.6b \\
          --seq-len 32768 --batch-size 2 --out s2.json

  (same *global* batch on both; scaling = s2.tokens_per_s / s1.tokens_per_s, target >= 1.8).
  ``--job heal`` times ``consa heal``'s step instead (every weight, or LoRA with ``--lora-rank``);
  ``--micro-batch`` runs each rank's rows that many at a time (the same step, less memory);
  ``--profile`` adds rank 0's torch.profiler table of one step and the share of it in collectives.
* ``sweep`` — the multi-GPU issue's table in one command: ``throughput`` under torchrun on 1, 2, 4, 8
  processes (those that exist), weak scaling (``--per-gpu`` sequences per process) and strong scaling
  (a fixed ``--strong-batch``, micro-batches of ``--micro-batch``), for the search and, with
  ``--heal``, heal; efficiency against the 1-process point of the same kind, and the wall time of a
  whole default search (``consa search``: 300 steps of 4 sequences) at each point's tokens/s::

      python benchmarks/search_scaling.py sweep --shape 8b --seq-len 32768 --gpus 1,2,4,8 --heal \
          --out sweep.json
* ``layer-memory`` — on the CPU: forward + backward of ONE decoder layer of each Qwen3 shape in gate
  mode, counting the bytes autograd saves for backward (``saved_tensors_hooks``, storages counted
  once), at a few context lengths; plus the bytes of the KL loss on the real vocabulary. This is what
  docs/DISTRIBUTED.md's memory plan extrapolates from::

      python benchmarks/search_scaling.py layer-memory --out layer_memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

# Qwen3 shapes (config.json of the released models): hidden, layers, q heads, kv heads, head_dim, MLP, vocab, tied
SHAPES = {
    "0.6b": dict(hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                 intermediate_size=3072, vocab_size=151936, tie_word_embeddings=True),
    "1.7b": dict(hidden_size=2048, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                 intermediate_size=6144, vocab_size=151936, tie_word_embeddings=True),
    "8b": dict(hidden_size=4096, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
               intermediate_size=12288, vocab_size=151936, tie_word_embeddings=False),
    # CPU tests of the sweep
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                 intermediate_size=128, vocab_size=256, tie_word_embeddings=True),
}
DEFAULT_SEARCH = (300, 4)  # `consa search` defaults: steps, global batch


def qwen3_config(shape: str, **over):
    from transformers import Qwen3Config

    kw = dict(SHAPES[shape], max_position_embeddings=131072, use_sliding_window=False, sliding_window=None)
    kw.update(over)
    return Qwen3Config(**kw)


# ---- CPU: per-layer saved-tensor bytes ------------------------------------------------------------
class SavedBytes:
    """Bytes autograd saves while active (each storage once); T×T-sized tensors are counted apart."""

    def __init__(self, seq_len: int, exclude=()):
        self.t, self.seen, self.total, self.quadratic = seq_len, {t.untyped_storage().data_ptr() for t in exclude}, 0, 0
        self.ctx = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda x: x)

    def pack(self, x):
        st = x.untyped_storage()
        key = st.data_ptr()
        if key not in self.seen:
            self.seen.add(key)
            n = st.nbytes()
            self.total += n
            if x.dim() >= 2 and x.shape[-1] == self.t and x.shape[-2] == self.t:
                self.quadratic += n
        return x


def layer_memory(shape: str, seq_len: int, window: int, dtype=torch.bfloat16) -> dict:
    from transformers import AutoModelForCausalLM

    from consa.models import attach_gates

    torch.manual_seed(0)
    cfg = qwen3_config(shape, num_hidden_layers=1, vocab_size=128)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").to(dtype).eval().requires_grad_(False)
    layer = model.model.layers[0]
    params = sum(p.numel() * p.element_size() for p in layer.parameters())
    mix = attach_gates(model, window, backend="sdpa")
    log_alpha = torch.zeros(cfg.num_key_value_heads, requires_grad=True)
    mix.z = torch.sigmoid(log_alpha).view(1, -1)
    meter = SavedBytes(seq_len, exclude=list(layer.parameters()))  # weights are resident anyway: count activations only
    hooks = [layer.register_forward_pre_hook(lambda *a: meter.ctx.__enter__()),
             layer.register_forward_hook(lambda *a: meter.ctx.__exit__(None, None, None))]
    ids = torch.randint(0, 128, (1, seq_len))
    # an input that needs grad, as every layer past the first sees it (the first would save less)
    emb = model.model.embed_tokens(ids).detach().requires_grad_(True)
    t0 = time.time()
    out = model(inputs_embeds=emb, use_cache=False).logits
    out.float().pow(2).mean().backward()
    secs = time.time() - t0
    for h in hooks:
        h.remove()
    return {"shape": shape, "seq_len": seq_len, "window": window, "dtype": str(dtype), "layer_param_bytes": params,
            "saved_bytes": meter.total, "saved_bytes_txt": meter.quadratic, "saved_bytes_linear": meter.total - meter.quadratic,
            "checkpoint_input_bytes": seq_len * cfg.hidden_size * torch.finfo(dtype).bits // 8, "fwd_bwd_s": round(secs, 2)}


def loss_memory(seq_len: int, vocab: int = 151936) -> dict:
    """Saved + live bytes of the search's KL loss on the logits of one sequence (bf16 logits)."""
    from consa.train.search import kl_loss

    student = torch.randn(1, seq_len, vocab, dtype=torch.bfloat16, requires_grad=True)
    teacher = torch.randn(1, seq_len, vocab, dtype=torch.bfloat16)
    meter = SavedBytes(-1)
    with meter.ctx:
        loss = kl_loss(student, teacher)
    loss.backward()
    return {"seq_len": seq_len, "vocab": vocab, "kl_saved_bytes": meter.total,
            "logits_bf16_bytes": seq_len * vocab * 2}


def cmd_layer_memory(a) -> dict:
    torch.set_num_threads(a.threads)
    rows = []
    for shape in a.shapes:
        for t in a.seq_lens:
            r = layer_memory(shape, t, window=t // 16)
            print(json.dumps(r), flush=True)
            rows.append(r)
    losses = [loss_memory(t) for t in a.loss_seq_lens]
    for r in losses:
        print(json.dumps(r), flush=True)
    return {"mode": "layer-memory", "torch": torch.__version__, "layers": rows, "loss": losses}


# ---- GPU: search / heal throughput -----------------------------------------------------------------
def _collective_share(prof, cuda: bool) -> float:
    """Share of the profiled step's device (CPU: host) time in collectives (NCCL kernels, gloo ops)."""
    total = coll = 0.0
    for e in prof.key_averages():
        t = (e.self_device_time_total if cuda else e.self_cpu_time_total) or 0.0
        total += t
        name = e.key.lower()
        if any(k in name for k in ("nccl", "all_gather", "allgather", "reduce_scatter", "all_reduce", "allreduce", "gloo")):
            coll += t
    return coll / total if total else 0.0


def _trainer(a, model, cfg, dist):
    """A search (gates only) or heal (full weights / LoRA) on ``model``; ``.train_step()`` does one step."""
    from consa.allocation import Allocation
    from consa.models import model_shape

    def batches(step):
        g = torch.Generator().manual_seed(step)
        return {"input_ids": torch.randint(0, cfg.vocab_size, (a.batch_size, a.seq_len), generator=g)}

    steps = a.warmup + a.steps + (1 if a.profile else 0)
    if a.job == "search":
        from consa.train.search import Search
        from consa.train.search_config import RefineConfig, ScheduleConfig, SearchConfig, TargetConfig

        scfg = SearchConfig(TargetConfig(sparsity=0.75, window=a.seq_len // 16), seq_len=a.seq_len,
                            schedule=ScheduleConfig(steps=steps), checkpoint_every=0, micro_batch=a.micro_batch,
                            refine=RefineConfig(evals=0))  # the search steps' rate only
        return Search(model, scfg, batches, a.workdir, progress=False, dist=dist)
    from consa.train.heal import Heal, HealConfig

    shape = model_shape(model)
    n_fa = max(1, shape.num_kv_heads // 4)  # 25% of each layer's KV heads FA, the rest SWA
    rows = tuple(tuple(k < n_fa for k in range(shape.num_kv_heads)) for _ in range(shape.num_layers))
    alloc = Allocation("kv_head", shape, a.seq_len // 16, rows, 0)
    hcfg = HealConfig(steps=steps, seq_len=a.seq_len, lora_rank=a.lora_rank, checkpoint_every=0, micro_batch=a.micro_batch)
    return Heal(model, alloc, hcfg, batches, a.workdir, progress=False, dist=dist)


def cmd_throughput(a) -> dict:
    from transformers import AutoModelForCausalLM

    from consa.train import distributed as D

    dist = D.init_from_env("auto") if D.launched_by_torchrun() else None
    dev = dist.device if dist else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    cfg = qwen3_config(a.shape, **({"num_hidden_layers": a.layers} if a.layers else {}))
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").to(torch.bfloat16)
    if dist is None:
        model.to(dev)
    s = _trainer(a, model, cfg, dist)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    t0 = None
    for i in range(a.warmup + a.steps):
        if i == a.warmup:
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            t0 = time.time()
        s.train_step()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    secs = time.time() - t0
    peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None
    profile = None
    if a.profile:  # one more step under the profiler (every rank runs it: the collectives need all)
        from torch.profiler import ProfilerActivity, profile as torch_profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
        with torch_profile(activities=acts) as prof:
            s.train_step()
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
        sort = "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
        profile = {"collective_share": _collective_share(prof, dev.type == "cuda"),
                   "table": prof.key_averages().table(sort_by=sort, row_limit=15)}
    world = dist.world_size if dist else 1
    peaks = [peak]
    if dist:
        import torch.distributed as tdist

        peaks = [None] * world
        tdist.all_gather_object(peaks, peak)
    tps = a.steps * a.batch_size * a.seq_len / secs
    res = {"mode": "throughput", "job": a.job, "lora_rank": a.lora_rank if a.job == "heal" else None, "shape": a.shape,
           "layers": cfg.num_hidden_layers, "world_size": world, "seq_len": a.seq_len, "global_batch": a.batch_size,
           "micro_batch": a.micro_batch, "steps_timed": a.steps, "seconds": round(secs, 3), "tokens_per_s": tps,
           "default_search_s": DEFAULT_SEARCH[0] * DEFAULT_SEARCH[1] * a.seq_len / tps,
           "peak_bytes_per_rank": peaks, "profile": profile,
           "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "torch": torch.__version__}
    D.shutdown(dist)
    return res if (dist is None or dist.is_main) else None


# ---- sweep over process counts ---------------------------------------------------------------------
def _point(a, job: str, n: int, batch: int, micro: int, lora: int, tmp: str) -> dict:
    """One ``throughput`` run under torchrun on ``n`` processes; its JSON, or the error's last lines."""
    import subprocess

    out = os.path.join(tmp, f"{job}{lora or ''}-n{n}-b{batch}.json")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", __file__, "throughput",
           "--shape", a.shape, "--seq-len", str(a.seq_len), "--batch-size", str(batch), "--micro-batch", str(micro),
           "--steps", str(a.steps), "--warmup", str(a.warmup), "--job", job, "--lora-rank", str(lora),
           "--workdir", os.path.join(tmp, f"w-{job}-{n}-{batch}"), "--out", out]
    if a.layers:
        cmd += ["--layers", str(a.layers)]
    if a.profile:
        cmd += ["--profile"]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    for attempt in (1, 2):
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=a.point_timeout)
        if r.returncode == 0 and os.path.exists(out):
            with open(out) as f:
                return {**json.load(f), "attempts": attempt}
        error = (r.stderr or r.stdout)[-1500:]
        if not ABORTED.search(r.stderr or r.stdout or ""):
            break  # a real failure (out of memory, a bug) fails the same way again: report it
    return {"job": job, "world_size": n, "global_batch": batch, "error": error, "attempts": attempt}


# a rank killed by SIGABRT (gloo on a small CPU host aborted one rank of a CI run once in ~10): retried once
ABORTED = re.compile(r"SIGABRT|Signal 6\b|exitcode\s*:\s*-6\b")


def cmd_sweep(a) -> dict:
    import tempfile

    gpus = [int(x) for x in a.gpus.split(",") if x.strip()]
    avail = torch.cuda.device_count() if torch.cuda.is_available() else max(gpus)  # CPU (gloo): any count
    skipped = [n for n in gpus if n > avail]
    gpus = [n for n in gpus if n <= avail]
    jobs = [("search", 0)] + ([("heal", 0), ("heal", a.lora)] if a.heal else [])
    points = []
    with tempfile.TemporaryDirectory() as tmp:
        for job, lora in jobs:
            for kind in ("weak", "strong"):
                for n in gpus:
                    batch = a.per_gpu * n if kind == "weak" else a.strong_batch
                    if batch % n:
                        continue
                    micro = a.per_gpu if kind == "strong" else 0
                    t0 = time.time()
                    r = _point(a, job, n, batch, micro, lora, tmp)
                    r.update(kind=kind, wall_s=round(time.time() - t0, 1))
                    points.append(r)
                    print(json.dumps({k: r.get(k) for k in ("job", "lora_rank", "kind", "world_size", "global_batch",
                                                            "tokens_per_s", "error")}), flush=True)
    for r in points:  # efficiency against the 1-process point of the same job and kind
        base = next((b for b in points if b.get("tokens_per_s") and b["job"] == r["job"] and b.get("lora_rank") == r.get("lora_rank")
                     and b["kind"] == r["kind"] and b["world_size"] == 1), None)
        if base and r.get("tokens_per_s"):
            r["speedup"] = r["tokens_per_s"] / base["tokens_per_s"]
            r["efficiency"] = r["speedup"] / r["world_size"]
    return {"mode": "sweep", "shape": a.shape, "seq_len": a.seq_len, "per_gpu": a.per_gpu, "strong_batch": a.strong_batch,
            "gpus": gpus, "skipped_gpu_counts": skipped, "points": points, "torch": torch.__version__}


def sweep_table(res: dict) -> str:
    rows = ["| job | scaling | GPUs | global batch | tokens/s | speedup | efficiency | peak GiB / GPU | default search (h) |",
            "|---|---|---|---|---|---|---|---|---|"]
    for r in res["points"]:
        job = r["job"] + (f" (LoRA {r['lora_rank']})" if r.get("lora_rank") else (" (full)" if r["job"] == "heal" else ""))
        if "error" in r:
            rows.append(f"| {job} | {r['kind']} | {r['world_size']} | {r['global_batch']} | failed: {r['error'].strip().splitlines()[-1][:80]} | | | | |")
            continue
        peaks = [p for p in r["peak_bytes_per_rank"] if p is not None]
        peak = f"{max(peaks) / 2**30:.1f}" if peaks else "–"
        rows.append(f"| {job} | {r['kind']} | {r['world_size']} | {r['global_batch']} | {r['tokens_per_s']:,.0f} | "
                    f"{r.get('speedup', 0):.2f} | {r.get('efficiency', 0):.2f} | {peak} | {r['default_search_s'] / 3600:.2f} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="mode", required=True)
    t = sub.add_parser("throughput")
    t.add_argument("--shape", default="0.6b", choices=sorted(SHAPES))
    t.add_argument("--layers", type=int, default=None, help="override the layer count (quick runs)")
    t.add_argument("--seq-len", type=int, default=32768)
    t.add_argument("--batch-size", type=int, default=2, help="global batch")
    t.add_argument("--steps", type=int, default=5)
    t.add_argument("--warmup", type=int, default=2)
    t.add_argument("--workdir", default="/tmp/consa_scaling")
    t.add_argument("--job", choices=["search", "heal"], default="search")
    t.add_argument("--lora-rank", type=int, default=0, help="heal: LoRA rank (0: every weight trains)")
    t.add_argument("--micro-batch", type=int, default=0, help="sequences per forward on each rank (0: all at once)")
    t.add_argument("--profile", action="store_true", help="one more step under torch.profiler (rank 0's table)")
    t.add_argument("--out", required=True)
    w = sub.add_parser("sweep")
    w.add_argument("--shape", default="8b", choices=sorted(SHAPES))
    w.add_argument("--layers", type=int, default=None, help="override the layer count (quick runs)")
    w.add_argument("--seq-len", type=int, default=32768)
    w.add_argument("--gpus", default="1,2,4,8", help="process counts (those above the GPUs present are skipped)")
    w.add_argument("--per-gpu", type=int, default=1, help="weak scaling: sequences per process; strong: micro-batch")
    w.add_argument("--strong-batch", type=int, default=8, help="strong scaling: the fixed global batch")
    w.add_argument("--heal", action="store_true", help="also heal: every weight, and LoRA of rank --lora")
    w.add_argument("--lora", type=int, default=16)
    w.add_argument("--steps", type=int, default=3)
    w.add_argument("--warmup", type=int, default=1)
    w.add_argument("--profile", action="store_true")
    w.add_argument("--point-timeout", type=float, default=1800, help="seconds before one point is given up")
    w.add_argument("--out", required=True)
    m = sub.add_parser("layer-memory")
    m.add_argument("--shapes", nargs="+", default=["0.6b", "1.7b", "8b"])
    m.add_argument("--seq-lens", type=int, nargs="+", default=[512, 1024, 2048])
    m.add_argument("--loss-seq-lens", type=int, nargs="+", default=[256, 512])
    m.add_argument("--threads", type=int, default=2)
    m.add_argument("--out", required=True)
    a = p.parse_args(argv)
    res = {"throughput": cmd_throughput, "sweep": cmd_sweep, "layer-memory": cmd_layer_memory}[a.mode](a)
    if res is not None:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)
        if a.mode == "sweep":
            print(sweep_table(res))
        else:
            print(json.dumps({k: v for k, v in res.items() if k not in ("layers", "loss", "profile")}))
            if res.get("profile"):
                print(res["profile"]["table"])
                print(f"collectives: {res['profile']['collective_share']:.0%} of the profiled step")
    return 0


if __name__ == "__main__":
    from consa.train.distributed import exit_process

    exit_process(main())
