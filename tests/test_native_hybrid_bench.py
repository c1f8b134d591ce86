"""benchmarks/native_hybrid.py --smoke (issue #35, item 4) on CPU, in a subprocess: for a gpt-oss-shaped and a
Gemma-3-shaped model (transformers' own classes, native sliding layers), the search at t = 0.5 covers the full
layers' KV heads only and keeps half of them FA, the export reloads without consa with consa's greedy tokens,
and the caches hold the KV bytes the allocation promises, recomputed here from the configs (not from consa)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "native_hybrid.py"


def _run(tmp_path, *args, timeout=150):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src")] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    out = tmp_path / "res" / "native_hybrid.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(out), *args], capture_output=True,
                          text=True, env=env, stdin=subprocess.DEVNULL, timeout=timeout, cwd=str(tmp_path))
    return proc, out


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("native_hybrid")
    proc, out = _run(tmp)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(p.name for p in out.parent.iterdir()) == ["native_hybrid.json"]  # the work folder is gone
    return json.loads(out.read_text()), proc.stdout


def test_both_shapes_go_all_the_way(smoke):
    doc, stdout = smoke
    assert set(doc["shapes"]) == {"gpt-oss", "gemma-3"}
    for name, r in doc["shapes"].items():
        assert "error" not in r, (name, r.get("traceback", "")[-3000:])
    table = stdout.strip().splitlines()
    assert table[-4].startswith("| shape |") and table[-1].startswith("| gemma-3 |") and "| yes (1.0000) |" in table[-1]


@pytest.mark.parametrize("name, kinds", [("gpt-oss", {"sliding_attention", "full_attention"}),
                                         ("gemma-3", {"sliding_attention", "full_attention"})])
def test_search_covers_the_full_layers_heads_and_keeps_half(smoke, name, kinds):
    r = smoke[0]["shapes"][name]
    types, heads = r["layer_types"], r["config"]["num_key_value_heads"]
    assert set(types) == kinds
    full = [i for i, t in enumerate(types) if t == "full_attention"]
    sliding = [i for i, t in enumerate(types) if t == "sliding_attention"]
    if name == "gpt-oss":
        assert types[::2] == ["sliding_attention"] * len(types[::2]) and types[1::2] == ["full_attention"] * len(types[1::2])
    else:  # 5 sliding : 1 full
        assert full == [i for i in range(len(types)) if i % 6 == 5]
    assert r["native_windows"] == [r["config"]["sliding_window"] if t == "sliding_attention" else None for t in types]
    assert r["units_searched"] == len(full) * heads and r["fixed_units"] == len(sliding) * heads
    assert 2 * r["fa_kept"] == r["units_searched"] == 2 * len(r["fa_heads"])
    assert all(layer in full for layer, _ in r["fa_heads"])  # FA kept only where the model had full attention


@pytest.mark.parametrize("name", ["gpt-oss", "gemma-3"])
def test_consa_free_reload_matches_consa(smoke, name):
    r = smoke[0]["shapes"][name]
    assert r["export_mode"] == "heads" and r["reload_class"].startswith("Consa")
    assert r["greedy_equal"] is True and r["greedy_consa"] == r["greedy_reloaded"] and len(r["greedy_consa"]) == r["run"]["check_new"]
    assert r["logits_max_diff"] < 1e-4 * max(1.0, r["logits_max_abs"]) and r["argmax_agreement"] == 1.0


@pytest.mark.parametrize("name", ["gpt-oss", "gemma-3"])
def test_caches_hold_the_promised_kv_bytes(smoke, name):
    r = smoke[0]["shapes"][name]
    cfg, ctx = r["config"], r["context"]
    layers, heads, w = cfg["num_hidden_layers"], cfg["num_key_value_heads"], cfg["sliding_window"]
    per_slot = 2 * r["batch"] * cfg["head_dim"] * 4  # keys + values, fp32 on CPU
    fa, swa = r["fa_kept"], layers * heads - r["fa_kept"]  # no sinks: every SWA head (native or searched) at w
    assert ctx > w + 1 and r["swa_heads"] == swa
    # the allocation's promise, from the configs: FA heads hold ctx, SWA heads w - 1
    assert r["promised_kv_bytes"] == per_slot * (fa * ctx + swa * (w - 1))
    assert r["eager_seen"] == ctx and r["eager_kv_bytes"] == r["eager_promised_kv_bytes"] == r["promised_kv_bytes"]
    # the static engine's ring: w slots per SWA head (its new key is written before the kernel reads)
    assert r["stored_kv_bytes"] == r["static_expected_kv_bytes"] == r["promised_kv_bytes"] + per_slot * swa
    n_sliding = sum(t == "sliding_attention" for t in r["layer_types"])
    assert r["native_kv_bytes"] == per_slot * (n_sliding * heads * (w - 1) + (layers - n_sliding) * heads * ctx)
    assert r["native_stored_kv_bytes"] == r["native_kv_bytes"] + per_slot * n_sliding * heads  # the same engine, own layout
    assert r["full_kv_bytes"] == per_slot * layers * heads * ctx
    assert r["promised_kv_bytes"] < r["stored_kv_bytes"] < r["native_kv_bytes"] < r["full_kv_bytes"]
    assert r["kv_ratio_full"] == pytest.approx(r["stored_kv_bytes"] / r["full_kv_bytes"])
    assert r["engine_cuda_graphs"] is False and r["engine_equals_eager"] is True


def test_a_failing_shape_is_its_row(tmp_path):
    """Every stage after its budget is refused: each row carries the error, the JSON and table still come."""
    proc, out = _run(tmp_path, "--budget-s", "0", timeout=60)
    assert proc.returncode == 1, proc.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert {n: r["error"] for n, r in doc["shapes"].items()} == {
        n: "TimeoutError: time budget spent before search" for n in ("gpt-oss", "gemma-3")}
    assert all(r["layer_types"] and "units_searched" not in r for r in doc["shapes"].values())  # what came before stays
    assert proc.stdout.strip().splitlines()[-1].startswith("| gemma-3 | error: TimeoutError")
