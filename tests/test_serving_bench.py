"""benchmarks/serving.py --smoke: every kind of row (consa's engine, transformers' dynamic and static
paths, consa.generate's second call and options, the export loaded in a subprocess without consa,
the profile) runs on CPU with the tiny shape and lands in the JSON; bad option values are one line."""

from __future__ import annotations

import json

from benchmark_module import load


def test_smoke_run_has_every_row_kind(tmp_path, one_thread):
    bench = load("serving")
    out = tmp_path / "serving.json"
    assert bench.main(["--smoke", "--profile", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["errors"] == [] and report["skipped"] == []
    kinds = {r["kind"] for r in report["rows"]}
    assert kinds == {"prefill", "consa", "hf-dynamic", "hf-static", "generate", "export-dynamic", "export-static", "profile"}
    assert report["ceiling"]["read_TBps"] > 0 and report["ceiling"]["copy_TBps"] > 0
    consa_rows = [r for r in report["rows"] if r["kind"] == "consa"]
    assert {(r["alloc"], r["batch"]) for r in consa_rows} == {("50:8", 1), ("50:8", 2), ("full", 1), ("full", 2)}
    for r in consa_rows:  # bytes a step reads: the weights + B x the KV the attention sees
        assert r["bytes_per_step"] > r["kv_bytes"] > 0 and "pct_read_ceiling" in r
    exported = [r for r in report["rows"] if r["kind"].startswith("export")]
    assert all(r["have_consa"] is False and r["export_mode"] == "heads" and r["decode_tok_s"] for r in exported)
    options = {r["options"]: r for r in report["rows"] if r["kind"] == "generate"}
    assert options["second call: time to first token"]["prefill_s"] > 0
    assert all(r["path"] == "static" for r in options.values() if "path" in r) and len(options) == 5
    prof = next(r for r in report["rows"] if r["kind"] == "profile")
    assert prof["per_step"] > 10 and prof["top"]


def test_bad_values_are_one_line(capsys):
    bench = load("serving")
    assert bench.main(["--smoke", "--allocs", "half", "--compile", "fast"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("consa: error:") and "half" in err[0] and "fast" in err[0]
