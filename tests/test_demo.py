"""`consa demo --quick`: the README's main command, end to end, in reduced mode."""

import json
import os

from consa.allocation import Allocation
from consa.cli import main


def test_demo_quick_runs_end_to_end_and_reports_honestly(tmp_path, capsys, monkeypatch):
    for key, value in (("ATEN_CPU_CAPABILITY", "avx2"), ("MKL_CBWR", "AVX2,STRICT")):
        # the demo pins these for its own process (demo.pin_cpu_numerics); undone after this test, so that
        # later tests and the subprocesses they start see the machine's own settings
        monkeypatch.setenv(key, os.environ.get(key, value))
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    alloc = Allocation.load(out / "allocation.json")
    assert alloc.granularity == "kv_head" and alloc.num_swa == 6 and alloc.num_units == 8
    assert (out / "heatmap.png").stat().st_size > 1000
    report = (out / "report.md").read_text()
    result = json.loads((out / "results.json").read_text())
    acc = result["accuracy"]
    # the task is real: full attention solves it, all-SWA is near chance (1/64)
    assert acc["full attention"] >= 0.8 and acc["all SWA"] <= 0.2
    # every method is compared at the same SWA count
    counts = {name: sum(not b for row in fa for b in row) for name, fa in result["allocations"].items()}
    assert counts.pop("all SWA") == 8
    assert set(counts.values()) == {6} and len(counts) >= 7
    for name in ("learned (ConSA, per KV head)", "rule: interleaved", "rule: fa_top", "DuoAttention-style (L1 + quantile)"):
        assert name in printed and name in report
    # the random rule is the exact mean over all C(8, 2) = 28 draws, so it cannot hinge on which head trained
    assert 0.0 <= acc["rule: random (mean of all 28 draws)"] <= 1.0
    # what a second machine compares to check it trained the same model
    assert len(result["base"]["weights_sha256"]) == 16 and result["base"]["weights_sha256"] in report
    assert result["cpu"]["aten_capability"] in report
    assert ("beats every baseline" in report) or ("ties the best baseline" in report) or ("does NOT win" in report)
