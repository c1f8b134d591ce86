"""consa report: several run dirs merge into one table and one PNG; bad run dirs fail clearly."""

from __future__ import annotations

import json

import pytest

from consa import Allocation, ModelShape
from consa.cli import main
from consa.errors import ConsaError
from consa.eval.calibration import calibrate, reported_grid
from consa.eval.runner import FORMAT, VERSION, summarize
from consa.plots import plot_comparison, plot_retrieval_heatmap
from consa.report import build_report, load_run

SHAPE = ModelShape(4, 2, 4)


def _grid(accs):
    return {"passkey": {"lengths": [512, 1024], "depths": [0.1, 0.9], "accuracy": accs, "items": 4, "examples": [], "skipped": []}}


def _quality(long_nll, short_nll=2.0):
    q = {"overall": {"nll": (long_nll + short_nll) / 2}, "short": {"nll": short_nll}, "long": {"nll": long_nll}}
    for v in q.values():
        v["ppl"], v["tokens"] = 2.718281828 ** v["nll"], 100
    q.update(seq_len=1024, sequences=4, window=64)
    return q


BASELINES = {
    "fingerprint": {"window": 64},
    "full": {"quality": _quality(3.0), "retrieval": _grid([[1.0, 1.0], [0.5, 0.5]])},
    "all_swa": {"quality": _quality(3.4), "retrieval": _grid([[0.0, 0.0], [0.0, 0.0]])},
}


def make_result(label, units, long_nll, accs):
    alloc = None if units is None else Allocation.from_units(units, "layer", SHAPE, 64, meta={"method": label})
    cal = calibrate(BASELINES["full"]["retrieval"], BASELINES["all_swa"]["retrieval"])
    r = {
        "format": FORMAT, "version": VERSION, "label": label, "model": "m", "window": 64, "sinks": 0,
        "allocation": alloc.to_dict() if alloc else None,
        "allocation_stats": (alloc or Allocation.uniform(True, "layer", SHAPE, 64)).stats(),
        "quality": _quality(long_nll), "retrieval": reported_grid(_grid(accs), cal), "calibration": cal,
        "baselines": BASELINES, "command": f"consa eval --label {label}",
    }
    r["summary"] = summarize(r)
    return r


def write_run(tmp_path, name, result):
    d = tmp_path / name
    d.mkdir()
    (d / "eval.json").write_text(json.dumps(result))
    return d


@pytest.fixture
def runs(tmp_path):
    return [
        write_run(tmp_path, "learned", make_result("learned", [True, False, False, False], 3.1, [[1.0, 0.5], [1.0, 1.0]])),
        write_run(tmp_path, "full", make_result("full", None, 3.0, [[1.0, 1.0], [0.5, 0.5]])),
        write_run(tmp_path, "top", make_result("rule-top", [False, False, False, True], 3.3, [[0.0, 0.5], [1.0, 1.0]])),
    ]


def test_report_merges_runs_into_one_table_and_png(runs, tmp_path, capsys):
    out = tmp_path / "rep"
    assert main(["report", *map(str, runs), "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("| ") and not line.startswith("| run")]
    assert [row.split(" | ")[0] for row in table] == ["| full", "| learned", "| rule-top", "| all-SWA (ref)"]
    learned = table[1].split(" | ")
    # long NLL 3.1 vs full 3.0 / all-SWA 3.4 → Δ 0.100, gap closed 75%; passkey only at length 512 counts
    assert learned[8:11] == ["3.100", "0.100", "75%"] and learned[11].rstrip(" |") == "0.75"
    assert table[2].split(" | ")[10] == "25%" and table[0].split(" | ")[10] == "100%"
    assert table[3].split(" | ")[8] == "3.400"
    assert table[0].split(" | ")[4] == "1.000"  # full attention holds all of its KV
    assert "consa eval --label rule-top" in md and "![comparison](comparison.png)" in md
    assert (out / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| learned |" in capsys.readouterr().out


def test_report_adds_full_reference_when_no_full_run(runs, tmp_path):
    md, rows = build_report([runs[0], runs[2]])
    assert [r["label"] for r in rows] == ["full attention (ref)", "learned", "rule-top", "all-SWA (ref)"]
    assert rows[0]["summary"]["long_nll"] == 3.0 and rows[0]["summary"]["retrieval"]["passkey"] == 1.0


def test_report_errors_on_missing_or_malformed_run_dirs(runs, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    bad_json = write_run(tmp_path, "badjson", {})
    (bad_json / "eval.json").write_text("{not json")
    other = write_run(tmp_path, "other", {"format": "something-else"})
    old = write_run(tmp_path, "old", {"format": FORMAT, "version": 99})
    partial = write_run(tmp_path, "partial", {"format": FORMAT, "version": VERSION, "label": "x"})
    afile = tmp_path / "afile"
    afile.write_text("x")
    cases = [
        (tmp_path / "missing", "run directory not found"),
        (afile, "not a run directory"),
        (empty, "no eval.json in"),
        (bad_json, "is not valid JSON"),
        (other, "is not a consa eval result"),
        (old, "eval version 99"),
        (partial, "is malformed: missing summary, window"),
    ]
    for bad, msg in cases:
        with pytest.raises(ConsaError, match=msg):
            load_run(bad)
        out = tmp_path / "rep"
        assert main(["report", str(runs[0]), str(bad), "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("consa: error:") and msg in err and "\n" not in err
        assert not out.exists()  # nothing half-written


def test_plots_write_pngs(tmp_path):
    res = make_result("learned", [True, False, False, False], 3.1, [[1.0, None], [0.0, 1.0]])
    p = plot_retrieval_heatmap(res["retrieval"], tmp_path / "h.png")
    assert p.read_bytes()[:4] == b"\x89PNG"
    p = plot_retrieval_heatmap(res["retrieval"]["passkey"], tmp_path / "one.png", title="passkey")
    assert p.stat().st_size > 1000
    assert plot_comparison([res], tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError):
        plot_comparison([], tmp_path / "none.png")
    assert not list(tmp_path.glob(".*.png"))  # no temp files left behind


def test_report_marks_uncalibrated_retrieval_and_recomputes_summary(runs, tmp_path):
    r = make_result("raw", [True, True, False, False], 3.2, [[1.0, 0.0], [1.0, 1.0]])
    r["calibration"], r["baselines"] = None, None
    r["retrieval"] = reported_grid(_grid([[1.0, 0.0], [1.0, 1.0]]), None)
    r["summary"] = {"stale": True}  # report recomputes it from the stored numbers
    d = write_run(tmp_path, "raw", r)
    md, rows = build_report([runs[1], d])
    raw_row = next(line for line in md.splitlines() if line.startswith("| raw |"))
    assert raw_row.rstrip(" |").endswith("0.75*") and "* retrieval not calibrated" in md
    assert rows[1]["summary"]["long_nll"] == 3.2
