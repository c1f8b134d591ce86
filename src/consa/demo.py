"""``consa demo``: the whole method on a 2-core CPU in a few minutes, with nothing downloaded.

1. Train a tiny Qwen3-architecture model from scratch on the recall task (``recall_task``), where the
   facts sit further back than any stack of sliding windows can reach.
2. Run the ConSA search at t = 0.75 per KV head (gates only, KL to the full-attention model).
3. Apply the learned allocation and every rule with the same SWA count; measure task accuracy.
4. Write allocation.json, heatmap.png, report.md and print the table — whatever the numbers are.

Reproducible for a seed on any x86-64 CPU, Intel or AMD: every random draw is seeded (data from explicit
``torch.Generator``s, the model's init without touching the global RNG) and the float kernels are
pinned to code paths that do not depend on the CPU's vendor, instruction sets or thread count
(``pin_cpu_numerics``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

import torch

from .allocation import Allocation, swa_count
from .files import atomic_write_text
from .models import apply_allocation, detach, model_shape
from .recall_task import VOCAB, RecallTask, recall_accuracy, recall_loss
from .rules import rule_allocation


@dataclass
class DemoConfig:
    out: str = "consa-demo"
    base_steps: int = 400  # ~100 s on 2 idle cores; the first quarter on short sequences
    search_steps: int = 150
    duo_steps: int = 100
    sparsity: float = 0.75
    window: int = 16
    seq_len: int = 128
    layers: int = 4
    eval_items: int = 256
    # 1, not 0: seed 0's 400 steps stayed on the recall task's chance plateau (loss ln 64) under an earlier pin
    # (MKL's AVX2 branch); seed 1 learns under this one and under that
    seed: int = 1
    threads: int | None = None


def pin_cpu_numerics() -> str:
    """Make training give the same model on every x86-64 CPU; returns the ATen capability in effect.

    Two libraries choose their code per CPU, and 400 training steps amplify last-bit differences into another
    model (another layer-0 head becomes the retrieval head, which once moved the random rule from 0.03 to 0.31):

    * ATen picks its vector kernels by instruction set (AVX-512 sums in another order than AVX2). Pinned to
      AVX2, which every x86-64 CPU since 2013 has, the same kernels run everywhere.
    * MKL, which does every matrix product here (attention's too), picks its path by vendor as well, and its
      reproducible branches are Intel-only except COMPATIBLE: ``MKL_CBWR=AVX2`` falls back to MKL's own
      choice on AMD (``MKL_VERBOSE=1`` prints ``CNR:AUTO``), and an AMD EPYC trained other weights than an
      Intel Xeon. COMPATIBLE (SSE2, no approximate reciprocals) is the branch MKL runs alike on both vendors;
      STRICT makes its products independent of the thread count (on 1 or 2 threads: the same weights).
      Its products are slower than AVX2's, which the demo's tiny matrices barely feel.

    Both settings are read at the first kernel call, so this must run before the process's first tensor
    op; a value the user set in the environment is kept.
    """
    os.environ.setdefault("ATEN_CPU_CAPABILITY", "avx2")
    os.environ.setdefault("MKL_CBWR", "COMPATIBLE,STRICT")
    return torch.backends.cpu.get_cpu_capability()


def weights_digest(model) -> str:
    """Short sha256 of the weights: two machines that trained the same model print the same digest."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def tiny_recall_model(layers: int, seed: int):
    """Initialised from ``seed`` without touching the caller's global RNG state."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=192, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=512,
        tie_word_embeddings=False, use_sliding_window=False, sliding_window=None, pad_token_id=0,
        bos_token_id=None, eos_token_id=None,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Qwen3ForCausalLM._from_config(cfg, attn_implementation="sdpa")


def train_base(model, task: RecallTask, cfg: DemoConfig, log=print) -> dict:
    """Curriculum: the first quarter of the budget on short sequences (facts in reach), then full length."""
    short = RecallTask(seq_len=task.pairs + 2 * task.queries + 8, pairs=task.pairs, queries=task.queries)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(cfg.seed)
    model.train()
    t0, c0, step, loss = time.time(), time.process_time(), 0, float("nan")
    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.base_steps, desc="pretrain (recall task)", dynamic_ncols=True)
    while step < cfg.base_steps:
        current = short if step < cfg.base_steps // 4 else task
        batch = current.sample(32, g)
        logits = model(inputs_embeds=current.embed(model, batch)).logits
        loss_t = recall_loss(logits, batch)
        opt.zero_grad(set_to_none=True)
        loss_t.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        loss = float(loss_t.detach())
        bar.set_postfix(loss=f"{loss:.3f}", T=current.seq_len)
        bar.update(1)
    bar.close()
    model.eval()
    return {"steps": step, "seconds": round(time.time() - t0, 1), "cpu_seconds": round(time.process_time() - c0, 1),
            "final_loss": loss, "weights_sha256": weights_digest(model)}


def random_allocations(shape, k: int, window: int, exact_up_to: int = 64) -> list[Allocation]:
    """The random rule's draws: every one of the C(N, N-k) allocations when there are few (28 in the
    demo), so the mean is the exact expectation; otherwise 3 seeded draws (a random rule is judged by its mean over >= 3 seeds).

    Exact matters here: one unit decides the task, so 3 draws score 0.03 or 0.34 depending only on
    which head of a layer training happened to pick.
    """
    n = shape.num_units("kv_head")
    if math.comb(n, n - k) > exact_up_to:
        return [rule_allocation("random", shape, "kv_head", k, window, seed=s) for s in range(3)]
    return [Allocation.from_units([u in fa for u in range(n)], "kv_head", shape, window, 0, {"method": "random-all"})
            for fa in combinations(range(n), n - k)]


def run_demo(cfg: DemoConfig, log=print) -> dict:
    from .heatmap import plot_allocation
    from .train.baselines import attention_mass_allocation, duo_allocation
    from .train.search import run_search
    from .train.search_config import GateConfig, RefineConfig, ScheduleConfig, SearchConfig, TargetConfig

    capability = pin_cpu_numerics()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t0, c0 = time.time(), time.process_time()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    task = RecallTask(seq_len=cfg.seq_len)
    model = tiny_recall_model(cfg.layers, cfg.seed)
    log(f"[1/4] training a {sum(p.numel() for p in model.parameters()) / 1e3:.0f}K-parameter Qwen3 on the recall task "
        f"(T={cfg.seq_len}, W={cfg.window}, {task.pairs} facts, {task.queries} queries)")
    base = train_base(model, task, cfg, log)
    shape = model_shape(model)
    n_units = shape.num_units("kv_head")
    k = swa_count(cfg.sparsity, n_units)

    def acc(alloc: Allocation | None) -> float:
        if alloc is None:
            detach(model)
        else:
            apply_allocation(model, alloc)
        a = recall_accuracy(model, task, n=cfg.eval_items)
        detach(model)
        return a

    full_acc = acc(None)
    all_swa = Allocation.uniform(False, "kv_head", shape, cfg.window)
    log(f"      base model: {base['steps']} steps in {base['seconds']} s (weights {base['weights_sha256']}, "
        f"CPU kernels {capability}); accuracy full attention {full_acc:.3f}, "
        f"all-SWA {acc(all_swa):.3f}")

    log(f"[2/4] ConSA search: t={cfg.sparsity} over {n_units} KV-head units -> exactly {k} SWA")
    scfg = SearchConfig(TargetConfig(sparsity=cfg.sparsity, window=cfg.window, granularity="kv_head"), seq_len=cfg.seq_len,
                        gates=GateConfig(lr=0.1), schedule=ScheduleConfig(steps=cfg.search_steps), checkpoint_every=0,
                        seed=cfg.seed, refine=RefineConfig(evals=0))  # the plain top-k cut: it already keeps the task's two heads FA
    batch_fn = task.batch_fn(model, 8, cfg.seed + 1)
    learned = run_search(model, scfg, batch_fn, out / "search")
    detach(model)
    learned.save(out / "allocation.json")

    log("[3/4] baselines at the same SWA count")
    methods: dict[str, Allocation] = {"learned (ConSA, per KV head)": learned}
    for rule in ("interleaved", "fa_top", "fa_bottom", "fa_middle"):
        methods[f"rule: {rule}"] = rule_allocation(rule, shape, "kv_head", k, cfg.window)
    randoms = random_allocations(shape, k, cfg.window)
    methods["DuoAttention-style (L1 + quantile)"] = duo_allocation(model, "kv_head", k, cfg.window, batch_fn, steps=cfg.duo_steps)
    calib = [batch_fn(10_000 + i) for i in range(2)]
    methods["attention-mass score"] = attention_mass_allocation(model, "kv_head", k, cfg.window, calib)

    log("[4/4] task accuracy")
    rows = [("full attention", full_acc, None), ("all SWA", acc(all_swa), all_swa)]
    for name, alloc in methods.items():
        rows.append((name, acc(alloc), alloc))
    rand_accs = [acc(a) for a in randoms]
    what = f"all {len(randoms)} draws" if randoms[0].meta.get("method") == "random-all" else f"{len(randoms)} seeds"
    rows.append((f"rule: random (mean of {what})", sum(rand_accs) / len(rand_accs), None))

    plot_allocation(learned, out / "heatmap.png", title=f"ConSA allocation, t={cfg.sparsity}, W={cfg.window}")
    result = {"config": cfg.__dict__, "base": base, "num_units": n_units, "num_swa": k,
              "cpu": {"aten_capability": capability, "mkl_cbwr": os.environ.get("MKL_CBWR"),
                      "threads": torch.get_num_threads()},
              "seconds": round(time.time() - t0, 1), "cpu_seconds": round(time.process_time() - c0, 1),
              "accuracy": {name: a for name, a, _ in rows},
              "allocations": {name: al.to_dict()["fa"] for name, _, al in rows if al is not None}}
    atomic_write_text(out / "results.json", json.dumps(result, indent=1) + "\n")
    report = render_report(rows, result, learned)
    atomic_write_text(out / "report.md", report)
    log("")
    log(_table(rows))
    log("")
    log(verdict(result))
    log(f"\n{result['seconds']} s ({result['cpu_seconds']} CPU s); wrote {out / 'allocation.json'}, {out / 'heatmap.png'}, {out / 'report.md'}")
    return result


def _table(rows) -> str:
    lines = ["| method | FA units (layer:head) | accuracy |", "|---|---|---|"]
    for name, a, alloc in rows:
        fa = "—" if alloc is None else ", ".join(f"{i}:{h}" for i in range(alloc.shape.num_layers) for h in alloc.fa_heads(i)) or "none"
        lines.append(f"| {name} | {fa} | {a:.3f} |")
    return "\n".join(lines)


def verdict(result: dict) -> str:
    accs = result["accuracy"]
    learned = accs["learned (ConSA, per KV head)"]
    rules = {k: v for k, v in accs.items() if k.startswith("rule:")}
    best_rule = max(rules, key=rules.get)
    others = {k: v for k, v in accs.items() if k not in ("full attention", "all SWA", "learned (ConSA, per KV head)")}
    best_other = max(others, key=others.get)
    gap = learned - others[best_other]
    if gap > 0.01:
        head = f"Learned allocation beats every baseline: {learned:.3f} vs best other ({best_other}) {others[best_other]:.3f}."
    elif gap >= -0.01:
        head = (f"Learned allocation ties the best baseline within 1 point: {learned:.3f} vs {best_other} "
                f"{others[best_other]:.3f}.")
    else:
        head = (f"Learned allocation does NOT win here: {learned:.3f} vs {best_other} {others[best_other]:.3f}; "
                "see report.md.")
    return head + f" Best fixed rule: {best_rule} ({rules[best_rule]:.3f})."


_LAYER0_NOTE = ("Why fa_bottom keeps up: this one-hop task lets layer 0 do the retrieval, so \"FA on the bottom "
                "layers\" is right by construction here, not by insight. Tasks that force retrieval higher (two-token "
                "keys, two hops) did not train within the demo's CPU budget.")


def _bottom_rule_ties(accs: dict) -> bool:
    return accs.get("rule: fa_bottom", 0.0) >= accs["learned (ConSA, per KV head)"] - 0.01


def render_report(rows, result: dict, learned: Allocation) -> str:
    cfg = result["config"]
    st = learned.stats()
    return "\n".join([
        "# consa demo report", "",
        f"Tiny Qwen3 ({cfg['layers']} layers, 2 KV heads per layer) trained from scratch on the recall task; "
        f"T = {cfg['seq_len']}, W = {cfg['window']}, sparsity t = {cfg['sparsity']} → exactly {result['num_swa']} of "
        f"{result['num_units']} KV-head units on SWA for every method. Accuracy: exact match of the greedy answer at every "
        f"queried key ({cfg['eval_items']} sequences; chance = 1/64).", "",
        _table(rows), "",
        verdict(result), "",
        *([_LAYER0_NOTE, ""] if _bottom_rule_ties(result["accuracy"]) else []),
        f"Learned FA share per layer: {', '.join(f'{s:.2f}' for s in st['fa_share_per_layer'])}; "
        f"contiguity {st['contiguity']:.2f}.", "",
        "![allocation](heatmap.png)", "",
        f"Base model: {result['base']['steps']} steps, {result['base']['seconds']} s, final loss {result['base']['final_loss']:.3f}, "
        f"weights sha256 {result['base']['weights_sha256']} (CPU kernels {result['cpu']['aten_capability']}, "
        f"threads: {result['cpu']['threads']}). Whole demo {result['seconds']} s, {result['cpu_seconds']} CPU s. "
        f"Reproduce: `consa demo --seed {cfg['seed']}`; another x86-64 machine should print the same weights digest.", "",
    ])
