"""Search scaling: tokens/s and peak memory per GPU on 1 vs N GPUs, and per-layer memory on the CPU.

Two modes, JSON out:

* ``throughput`` — run the real ConSA search (gates only, FSDP2, activation checkpointing, bf16) on a
  Qwen3-shaped model with random weights; rank 0 writes tokens/s (after warm-up steps) and every
  rank's peak CUDA memory. Run it under torchrun for N > 1::

      python benchmarks/search_scaling.py throughput --shape 0.6b --seq-len 32768 --batch-size 2 --out s1.json
      torchrun --standalone --nproc_per_node 2 benchmarks/search_scaling.py throughput --shape 0.6b \\
          --seq-len 32768 --batch-size 2 --out s2.json

  (same *global* batch on both; scaling = s2.tokens_per_s / s1.tokens_per_s, target >= 1.8).
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
}


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


# ---- GPU: search throughput -----------------------------------------------------------------------
def cmd_throughput(a) -> dict:
    from transformers import AutoModelForCausalLM

    from consa.train import distributed as D
    from consa.train.search import Search, SearchConfig

    dist = D.init_from_env("auto") if D.launched_by_torchrun() else None
    dev = dist.device if dist else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    cfg = qwen3_config(a.shape, **({"num_hidden_layers": a.layers} if a.layers else {}))
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").to(torch.bfloat16)
    if dist is None:
        model.to(dev)
    steps = a.warmup + a.steps

    def batches(step):
        g = torch.Generator().manual_seed(step)
        return {"input_ids": torch.randint(0, cfg.vocab_size, (a.batch_size, a.seq_len), generator=g)}

    scfg = SearchConfig(sparsity=0.75, window=a.seq_len // 16, seq_len=a.seq_len, steps=steps, checkpoint_every=0)
    s = Search(model, scfg, batches, a.workdir, progress=False, dist=dist)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    t0 = None
    for i in range(steps):
        if i == a.warmup:
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            t0 = time.time()
        s.train_step()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    secs = time.time() - t0
    peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None
    world = dist.world_size if dist else 1
    peaks = [peak]
    if dist:
        import torch.distributed as tdist

        peaks = [None] * world
        tdist.all_gather_object(peaks, peak)
    res = {"mode": "throughput", "shape": a.shape, "layers": cfg.num_hidden_layers, "world_size": world,
           "seq_len": a.seq_len, "global_batch": a.batch_size, "steps_timed": a.steps, "seconds": round(secs, 3),
           "tokens_per_s": a.steps * a.batch_size * a.seq_len / secs, "peak_bytes_per_rank": peaks,
           "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "torch": torch.__version__}
    D.shutdown(dist)
    return res if (dist is None or dist.is_main) else None


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
    t.add_argument("--out", required=True)
    m = sub.add_parser("layer-memory")
    m.add_argument("--shapes", nargs="+", default=["0.6b", "1.7b", "8b"])
    m.add_argument("--seq-lens", type=int, nargs="+", default=[512, 1024, 2048])
    m.add_argument("--loss-seq-lens", type=int, nargs="+", default=[256, 512])
    m.add_argument("--threads", type=int, default=2)
    m.add_argument("--out", required=True)
    a = p.parse_args(argv)
    res = cmd_throughput(a) if a.mode == "throughput" else cmd_layer_memory(a)
    if res is not None:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)
        print(json.dumps({k: v for k, v in res.items() if k not in ("layers", "loss")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
