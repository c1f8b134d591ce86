"""benchmarks/search_scaling.py: the multi-GPU sweep (issue 19) runs on the CPU under gloo, so the
table that the 8-GPU machine will fill is checked here: every point present, efficiencies computed
from the measured tokens/s against the 1-process point of the same kind, failures reported in place."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from benchmark_module import load


def _bench():
    return load("search_scaling")


def test_sweep_runs_weak_and_strong_points_and_computes_efficiency(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).resolve().parents[1] / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    bench = _bench()
    out = tmp_path / "sweep.json"
    assert bench.main(["sweep", "--shape", "tiny", "--seq-len", "32", "--gpus", "1,2", "--per-gpu", "1",
                       "--strong-batch", "2", "--steps", "1", "--warmup", "1", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    pts = {(p["kind"], p["world_size"]): p for p in res["points"]}
    assert set(pts) == {("weak", 1), ("weak", 2), ("strong", 1), ("strong", 2)}, [p.get("error") for p in res["points"]]
    assert [pts[("weak", n)]["global_batch"] for n in (1, 2)] == [1, 2]
    assert {pts[("strong", n)]["global_batch"] for n in (1, 2)} == {2} and pts[("strong", 1)]["micro_batch"] == 1
    for (kind, n), p in pts.items():
        assert p["tokens_per_s"] > 0 and p["world_size"] == n and p["job"] == "search"
        assert p["speedup"] == pytest.approx(p["tokens_per_s"] / pts[(kind, 1)]["tokens_per_s"])
        assert p["efficiency"] == pytest.approx(p["speedup"] / n)
        assert p["default_search_s"] == pytest.approx(300 * 4 * 32 / p["tokens_per_s"])
    table = capsys.readouterr().out
    assert table.count("| search |") == 4 and "| strong | 2 | 2 |" in table


def test_sweep_point_retries_a_rank_abort_once_and_nothing_else(tmp_path, monkeypatch):
    """A rank killed by SIGABRT is run again once; any other failure is reported as it is, not retried."""
    import subprocess
    from types import SimpleNamespace

    bench = _bench()
    a = SimpleNamespace(shape="tiny", seq_len=32, steps=1, warmup=1, layers=0, profile=False, point_timeout=60)
    calls = []

    def fake(outcomes):
        def run(cmd, **kw):
            calls.append(cmd)
            rc, err = outcomes[len(calls) - 1]
            if rc == 0:
                Path(cmd[cmd.index("--out") + 1]).write_text(json.dumps({"tokens_per_s": 5.0}))
            return subprocess.CompletedProcess(cmd, rc, "", err)
        return run

    abort = "torch.distributed.elastic.multiprocessing.errors.ChildFailedError:\n  exitcode  : -6 (pid: 4242)\n" \
            "Signal 6 (SIGABRT) received by PID 4242"
    monkeypatch.setattr(subprocess, "run", fake([(1, abort), (0, "")]))
    p = bench._point(a, "search", 2, 2, 0, 0, str(tmp_path))
    assert p == {"tokens_per_s": 5.0, "attempts": 2} and len(calls) == 2
    calls.clear()
    monkeypatch.setattr(subprocess, "run", fake([(1, abort), (1, abort)]))
    p = bench._point(a, "search", 2, 2, 0, 0, str(tmp_path / "b"))
    assert p["attempts"] == 2 and "SIGABRT" in p["error"] and len(calls) == 2
    calls.clear()
    oom = "Traceback ...\ntorch.OutOfMemoryError: CUDA out of memory"
    monkeypatch.setattr(subprocess, "run", fake([(1, oom), (0, "")]))
    p = bench._point(a, "search", 2, 2, 0, 0, str(tmp_path / "c"))
    assert p["attempts"] == 1 and "OutOfMemoryError" in p["error"] and len(calls) == 1


def test_sweep_table_reports_a_failed_point_in_place():
    bench = _bench()
    res = {"points": [{"job": "heal", "lora_rank": 16, "kind": "weak", "world_size": 8, "global_batch": 8,
                       "error": "Traceback ...\ntorch.OutOfMemoryError: CUDA out of memory"}]}
    row = bench.sweep_table(res).splitlines()[-1]
    assert row.startswith("| heal (LoRA 16) | weak | 8 | 8 | failed: torch.OutOfMemoryError")
