"""The demo's reproducibility pieces: same seed → same weights (whatever the thread count), a random
rule whose score does not depend on which head of a layer training picked, no global RNG consumed."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from consa.allocation import ModelShape
from consa.demo import pin_cpu_numerics, random_allocations, tiny_recall_model, weights_digest


def test_random_rule_is_the_exact_mean_so_head_identity_does_not_matter():
    shape = ModelShape(num_layers=4, num_kv_heads=2, num_q_heads=4)
    draws = random_allocations(shape, k=6, window=16)
    fa_sets = {tuple(u for u in range(8) if a.fa[u // 2][u % 2]) for a in draws}
    assert len(draws) == len(fa_sets) == 28 and all(len(s) == 2 for s in fa_sets)

    # a model whose task hinges on one unit: the mean must not care whether training put it at 0:0 or 0:1
    def mean_if_needed(layer, head):
        return sum(a.fa[layer][head] for a in draws) / len(draws)

    assert mean_if_needed(0, 0) == mean_if_needed(0, 1) == 7 / 28


def test_random_rule_falls_back_to_seeded_draws_when_there_are_too_many():
    shape = ModelShape(num_layers=16, num_kv_heads=4, num_q_heads=8)
    assert len(random_allocations(shape, k=48, window=16)) == 3


def test_pin_cpu_numerics_keeps_a_user_setting(monkeypatch):
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "default")
    monkeypatch.delenv("MKL_CBWR", raising=False)
    pin_cpu_numerics()
    assert os.environ["ATEN_CPU_CAPABILITY"] == "default" and os.environ["MKL_CBWR"] == "COMPATIBLE,STRICT"


@pytest.mark.skipif(not torch.backends.mkl.is_available(), reason="this torch is built without MKL")
def test_mkl_runs_its_vendor_independent_branch():
    """MKL keeps its reproducible branches other than COMPATIBLE for Intel CPUs: the earlier pin, AVX2, ran as
    MKL's own choice on AMD EPYC (its log: CNR:AUTO), which trained other weights than an Intel Xeon. What MKL
    reports it runs, in a fresh process as the demo pins it, must be the branch both vendors run alike."""
    env = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "MKL_CBWR")}
    code = "import consa.demo as d; d.pin_cpu_numerics(); import torch; torch.ones(64, 64) @ torch.ones(64, 64)"
    out = subprocess.run([sys.executable, "-c", code], env={**env, "MKL_VERBOSE": "1"}, capture_output=True, text=True,
                         check=True).stdout
    branches = {w for line in out.splitlines() if "GEMM" in line for w in line.split() if w.startswith("CNR:")}
    assert branches == {"CNR:COMPATIBLE,STRICT"}, out[-2000:]


@pytest.mark.skipif("avx2" not in (Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""),
                    reason="needs an x86-64 CPU with AVX2")
def test_pin_takes_effect_after_torch_is_imported():
    """`consa demo` imports torch before it pins: the capability must still be AVX2 in a fresh process."""
    env = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "MKL_CBWR")}
    code = "import consa.cli, consa.demo as d; print(d.pin_cpu_numerics())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "AVX2"


def test_model_init_is_seeded_and_leaves_the_global_rng_alone():
    state = torch.get_rng_state()
    a, b, c = tiny_recall_model(2, seed=0), tiny_recall_model(2, seed=0), tiny_recall_model(2, seed=1)
    assert torch.equal(state, torch.get_rng_state())
    assert weights_digest(a) == weights_digest(b) != weights_digest(c)


_TRAIN = """
import sys
import consa.demo as d
d.pin_cpu_numerics()
import torch
from consa.recall_task import RecallTask
torch.set_num_threads(int(sys.argv[1]))
cfg = d.DemoConfig(base_steps=40, layers=2)
print(d.train_base(d.tiny_recall_model(cfg.layers, cfg.seed), RecallTask(seq_len=48), cfg, lambda *a: None)["weights_sha256"])
"""


@pytest.mark.skipif("avx2" not in (Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""),
                    reason="the pin is for x86-64 CPUs with AVX2")
def test_training_is_bitwise_reproducible_across_thread_counts():
    """The demo's process pins its kernels first (`pin_cpu_numerics`, read by MKL at its first call), so this
    runs where the demo does: a fresh process. Unpinned, or with MKL's non-strict mode, 40 steps on 1 and on 2
    threads gave different weights on an Intel Xeon (MKL splits GEMMs by thread count)."""
    env = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "MKL_CBWR")}
    digests = [subprocess.run([sys.executable, "-c", _TRAIN, str(n)], env=env, capture_output=True, text=True,
                              check=True).stdout.strip().splitlines()[-1] for n in (1, 2)]
    assert len(digests[0]) == 16 and digests[0] == digests[1]
