"""Multi-process search (torchrun + FSDP2, gloo on CPU, 2 processes) against the single-process one.

Tolerance: the ranks reduce the loss and gradients in another order than one process does, so
they agree up to float rounding only. What is compared at that level is what both compute from
the same start: the first step's loss and gate gradient (a few float32 ulps of its magnitude);
trained gates are not, because Adam divides by sqrt(v) and turns a near-zero gradient whose sign
flips with the order into a whole learning-rate step. The runs must also end in the same
allocation. Resume of a SIGKILLed 2-process job must be exact.
"""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from consa.allocation import Allocation
from consa.cli import main
from consa.errors import ConsaError
from consa.tiny import tiny_model
from consa.train.distributed import Dist
from consa.train.search import Search
from consa.train.search_config import ScheduleConfig, SearchConfig, TargetConfig

ARGS = ["--sparsity", "0.5", "--window", "5", "--seq-len", "32", "--batch-size", "4", "--steps", "16",
        "--checkpoint-every", "4", "--gate-lr", "0.1", "--seed", "3", "--no-progress"]
FIRST_STEP_ULPS = 64  # rounding of a 2-rank all-reduce vs one process's sum, with room for other CPUs
HELPERS = os.path.join(os.path.dirname(__file__), "helpers")


def _env(first_step: str | None = None):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.path.join(os.path.dirname(__file__), "..", "src") + os.pathsep + env.get("PYTHONPATH", "")
    if first_step:  # every rank saves its first gate gradient (helpers/first_step/sitecustomize.py)
        env["PYTHONPATH"] = os.path.join(HELPERS, "first_step") + os.pathsep + env["PYTHONPATH"]
        env["CONSA_TEST_FIRST_STEP"] = first_step
    env["OMP_NUM_THREADS"] = "1"
    return env


def _gates(out):
    return load_file(str(out / "gates.safetensors"))["log_alpha"]


def _cmd(model_dir, out, *extra):
    return [sys.executable, "-m", "consa", "search", "--model", str(model_dir), *ARGS, "--out", str(out), *extra]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, one_thread):  # one thread, like each rank (OMP_NUM_THREADS=1): faster here
    """One single-process search and one unbroken 2-process search with the same global batch and seed."""
    root = tmp_path_factory.mktemp("dist")
    model_dir = root / "model"
    tiny_model("qwen3", num_layers=4).save_pretrained(model_dir)
    for name in ("one", "two"):
        (root / "first_step" / name).mkdir(parents=True)
    spec = importlib.util.spec_from_file_location("_first_step", os.path.join(HELPERS, "first_step", "sitecustomize.py"))
    helper = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(helper)
    handle = helper.record_first_step(str(root / "first_step" / "one" / "rank0.safetensors"))
    try:
        assert main(["search", "--model", str(model_dir), *ARGS, "--out", str(root / "one")]) == 0
    finally:
        handle.remove()
    r = subprocess.run(_cmd(model_dir, root / "two", "--nproc", "2"), env=_env(str(root / "first_step" / "two")),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return model_dir, root


def test_two_processes_match_one_process(runs):
    _, root = runs
    one, two = root / "one", root / "two"
    assert Allocation.load(one / "allocation.json") == Allocation.load(two / "allocation.json")
    eps = torch.finfo(torch.float32).eps
    # the first step's gate gradient: one process's, and each rank's after the all-reduce (the same)
    want = load_file(str(root / "first_step" / "one" / "rank0.safetensors"))["grad0"]
    assert want.shape == _gates(one).shape and float(want.abs().max()) > 0
    for rank in (0, 1):
        got = load_file(str(root / "first_step" / "two" / f"rank{rank}.safetensors"))["grad0"]
        torch.testing.assert_close(got, want, atol=FIRST_STEP_ULPS * eps * float(want.abs().max()), rtol=0)
    m1 = [json.loads(x) for x in (one / "metrics.jsonl").read_text().splitlines()]
    m2 = [json.loads(x) for x in (two / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in m2] == list(range(16))  # rank 0 alone logged, once per step
    assert abs(m1[0]["loss"] - m2[0]["loss"]) <= FIRST_STEP_ULPS * eps * abs(m1[0]["loss"])  # the same global-mean loss
    assert json.loads((two / "search.json").read_text())["world_size"] == 2
    assert json.loads((two / "checkpoint" / "state.json").read_text())["world_size"] == 2
    # the default cut refinement (gradient order) runs sharded too: the same estimates, KLs and swaps
    r1, r2 = (json.loads((d / "search.json").read_text())["refine"] for d in (one, two))
    assert r1["estimates"] >= 1 and r1["evals"] >= 2 and r2["evals"] == r1["evals"]
    assert [s[:2] for s in r2["swaps"]] == [s[:2] for s in r1["swaps"]]
    assert abs(r2["kl_before"] - r1["kl_before"]) <= 1e-4 * r1["kl_before"] and r1["kl_before"] > 0


def test_two_processes_in_micro_batches_match_one_process(runs):
    """--micro-batch 1 on each of 2 ranks (2 rows each): the loss of the whole global batch at every
    step (summation order apart) and the same allocation as one process on the whole batch."""
    model_dir, root = runs
    out = root / "two_micro"
    r = subprocess.run(_cmd(model_dir, out, "--nproc", "2", "--micro-batch", "1"), env=_env(), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert Allocation.load(out / "allocation.json") == Allocation.load(root / "one" / "allocation.json")
    m1 = [json.loads(x) for x in (root / "one" / "metrics.jsonl").read_text().splitlines()]
    m2 = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(m2) == 16 and m2[0]["loss"] == pytest.approx(m1[0]["loss"], rel=1e-5)
    assert json.loads((out / "search.json").read_text())["config"]["micro_batch"] == 1


def test_sigkilled_two_process_search_resumes_to_the_unbroken_allocation(runs, capsys):
    model_dir, root = runs
    out = root / "killed"
    # every rank SIGKILLs itself before step 10 (consa.interrupts): after the checkpoint of step 8, with 2 steps
    # done past it, whatever the machine's speed
    kill = {"CONSA_INTERRUPT_AT": "step 10", "CONSA_INTERRUPT_SIGNAL": "KILL"}
    r = subprocess.run(_cmd(model_dir, out, "--nproc", "2"), env={**_env(), **kill}, capture_output=True, text=True,
                       timeout=300)
    state = out / "checkpoint" / "state.json"
    assert r.returncode != 0 and not (out / "allocation.json").exists(), r.stderr[-3000:]
    assert json.loads(state.read_text())["step"] == 8

    # without --resume, or with another world size: refused before any process starts, one line
    for extra, match in ((["--nproc", "2"], "--resume"), (["--nproc", "4", "--resume"], "2 process(es), this one runs on 4")):
        capsys.readouterr()
        assert main(_cmd(model_dir, out, *extra)[3:]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("consa: error:") and match in err
    # a single process meets the same check inside Search
    with pytest.raises(ConsaError, match="2 process\\(es\\), this one runs on 1; resume with --nproc 2"):
        Search(tiny_model("qwen3", num_layers=4), SearchConfig(TargetConfig(sparsity=0.5, window=5), seq_len=32,
                                                               schedule=ScheduleConfig(steps=16), seed=3),
               lambda s: {}, out, progress=False).run(resume=True)

    r = subprocess.run(_cmd(model_dir, out, "--nproc", "2", "--resume"), env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert Allocation.load(out / "allocation.json") == Allocation.load(root / "two" / "allocation.json")
    assert torch.equal(_gates(out), _gates(root / "two"))
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(16))


def test_batch_not_divisible_by_world_size_is_one_clear_error(runs, tmp_path, capsys):
    model_dir, _ = runs
    out = tmp_path / "run"
    argv = _cmd(model_dir, out, "--nproc", "2")[3:]
    argv[argv.index("--batch-size") + 1] = "3"
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "batch of 3 sequences cannot be split evenly over 2 processes" in err
    assert not out.exists()
    # the same check inside a rank (a batch_fn whose batches do not split)
    fake = Dist(rank=1, world_size=2, mesh=object())
    with pytest.raises(ConsaError, match="divisible by 2"):
        fake.local_batch({"input_ids": torch.zeros(3, 8, dtype=torch.long)})
    got = fake.local_batch({"input_ids": torch.arange(4).view(4, 1), "loss_mask": torch.ones(4, 1), "note": "x"})
    assert got["input_ids"].flatten().tolist() == [2, 3] and got["loss_mask"].shape == (2, 1) and got["note"] == "x"


def test_checkpoint_from_another_model_is_refused(tmp_path):
    def batches(step):
        g = torch.Generator().manual_seed(step)
        return {"input_ids": torch.randint(3, 101, (2, 24), generator=g)}

    cfg = dict(sparsity=0.5, window=5, seq_len=24, steps=6, checkpoint_every=3)
    Search(tiny_model("qwen3", num_layers=2, seed=0), SearchConfig.from_flat(cfg), batches, tmp_path, progress=False).run()
    other = tiny_model("qwen3", num_layers=2, seed=1)  # same shape, other weights
    with pytest.raises(ConsaError, match="another model"):
        Search(other, SearchConfig.from_flat(cfg), batches, tmp_path, progress=False).run(resume=True)


def test_teacher_pass_keeps_layers_gathered_for_the_student_pass(tmp_path):
    """FSDP2 all-gathers each layer for the teacher pass; the student pass right after reuses them
    instead of gathering again (one all-gather per layer per step saved: 15 → 10 with 4 layers + root)."""
    script = os.path.join(os.path.dirname(__file__), "helpers", "count_all_gathers.py")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", script,
                        str(tmp_path / "run")], env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    counts = json.loads([ln for ln in r.stdout.splitlines() if ln.startswith("{")][-1])
    assert counts["consa"] < counts["plain"]
    assert counts["plain"] - counts["consa"] == 5  # one per FSDP group (4 decoder layers + the root)


@pytest.mark.parametrize("torchrun", [True, False])
def test_exit_process_flushes_and_keeps_the_code(torchrun, tmp_path):
    """A rank under torchrun leaves through os._exit (no interpreter teardown, where gloo's threads may
    abort it) with its exit code, its printed and logged output flushed; elsewhere a plain sys.exit."""
    code = ("import logging, sys\n"
            "from consa.train.distributed import exit_process\n"
            f"logging.basicConfig(filename={str(tmp_path / 'log.txt')!r}, level=logging.INFO)\n"
            "logging.getLogger('consa').info('logged line')\n"
            "print('printed line', end='')\n"
            "import atexit; atexit.register(lambda: print(' atexit ran', end=''))\n"
            "exit_process(3)\n")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    if torchrun:
        env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 3, r.stderr[-2000:]
    assert r.stdout == ("printed line" if torchrun else "printed line atexit ran")  # os._exit skips atexit
    assert "logged line" in (tmp_path / "log.txt").read_text()
