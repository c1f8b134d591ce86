"""Export: native layer-wise configs load without consa; head-wise round-trips; bad folders fail clearly."""

from __future__ import annotations

import json

import pytest
import torch

import consa
from consa import consa_free
from consa.compat import cache_kwargs
from consa.allocation import Allocation
from consa.attention.cache import HybridCache
from consa.models import plans_of
from consa.cli import main as cli_main
from consa.export import ExportError, export, load, read_export
from consa.tiny import tiny_model

NATIVE = ["qwen3", "qwen2", "llama", "mistral"]
W = 4


def _ids(vocab, batch=2, length=9, pad=3):
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, vocab, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, :pad] = 0
    ids[0, :pad] = 0
    return ids, mask


def _layer_alloc(model, window=W):
    return Allocation.from_units([True, False, False], "layer", consa.model_shape(model), window)


def _head_alloc(model, sinks=0):
    shape = consa.model_shape(model)
    return Allocation.from_units([False, True, True, False, False, False], "kv_head", shape, W, sinks)


def _consa_path(model, alloc, ids, mask):
    """Logits (no cache) and greedy generation with the hybrid cache."""
    consa.apply_allocation(model, alloc)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
        gen = model.generate(ids, attention_mask=mask, **cache_kwargs(HybridCache(plans_of(model)), model), max_new_tokens=8,
                             do_sample=False, pad_token_id=0, eos_token_id=None)
    return logits, gen


STOCK_SCRIPT = consa_free.script(
    """
    import json, sys, torch
    from transformers import AutoModelForCausalLM
    jobs = json.loads(sys.argv[1])
    results = {}
    for name, job in jobs.items():
        model = AutoModelForCausalLM.from_pretrained(job["dir"], local_files_only=True).eval()
        ids, mask = torch.tensor(job["ids"]), torch.tensor(job["mask"])
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits
            gen = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                                 pad_token_id=0, eos_token_id=None)
        results[name] = {"type": type(model).__name__, "logits": logits.tolist(), "gen": gen.tolist(),
                         "sliding": [getattr(l.self_attn, "sliding_window", None) for l in model.model.layers]}
    assert not any(m == "consa" or m.startswith("consa.") for m in sys.modules)
    print(json.dumps(results))
    """
)


def test_native_export_loads_without_consa(tmp_path):
    jobs, expected = {}, {}
    for fam in NATIVE:
        model = tiny_model(fam, num_layers=3)
        alloc = _layer_alloc(model)
        out = tmp_path / fam
        summary = export(model, alloc, out)
        assert summary["mode"] == "native"
        cfg = json.loads((out / "config.json").read_text())
        assert cfg["layer_types"] == ["full_attention", "sliding_attention", "sliding_attention"]
        assert cfg["sliding_window"] == W
        if fam in ("qwen3", "qwen2"):
            assert cfg["use_sliding_window"] is True
        if fam in ("llama", "mistral"):
            assert cfg["model_type"] == "ministral"
        assert list(out.glob("*.safetensors")) and not list(out.glob("*.bin"))
        ids, mask = _ids(model.config.vocab_size)
        expected[fam] = _consa_path(model, alloc, ids, mask)
        jobs[fam] = {"dir": str(out), "ids": ids.tolist(), "mask": mask.tolist()}
    proc = consa_free.run(STOCK_SCRIPT, json.dumps(jobs), modules_cache=tmp_path / "hf_modules", timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    for fam in NATIVE:
        r = results[fam]
        logits, gen = expected[fam]
        valid = torch.tensor(jobs[fam]["mask"]).bool()
        torch.testing.assert_close(torch.tensor(r["logits"])[valid], logits[valid], atol=2e-5, rtol=0)
        assert r["gen"] == gen.tolist(), fam
        assert r["sliding"][0] is None and r["sliding"][1] == W
        assert r["type"] == ("MinistralForCausalLM" if fam in ("llama", "mistral") else type(tiny_model(fam, num_layers=1)).__name__)


@pytest.mark.parametrize("family,sinks", [("qwen3", 0), ("gemma3_text", 0), ("llama", 2)])
def test_headwise_export_round_trips(tmp_path, family, sinks):
    model = tiny_model(family, num_layers=3)
    alloc = _head_alloc(model, sinks) if family != "gemma3_text" else _layer_alloc(model)  # Gemma3: never native
    ids, mask = _ids(model.config.vocab_size)
    before = {n: p.clone() for n, p in model.state_dict().items()}
    summary = export(model, alloc, tmp_path / "out")
    assert summary["mode"] == "heads"
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())  # the source model is untouched
    cfg, section, stored = read_export(tmp_path / "out")
    assert section["mode"] == "heads" and stored.num_swa == alloc.num_swa
    assert all(list(row) == sorted(row, reverse=True) for row in stored.fa)  # FA heads first after reordering
    logits, gen = _consa_path(model, alloc, ids, mask)
    loaded = load(tmp_path / "out")
    assert loaded.config._attn_implementation == "consa"
    with torch.no_grad():
        got = loaded(input_ids=ids, attention_mask=mask).logits
        gen2 = consa.generate(loaded, ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    valid = mask.bool()
    torch.testing.assert_close(got[valid], logits[valid], atol=2e-5, rtol=0)
    assert torch.equal(gen2, gen)
    # after `import consa`, plain from_pretrained with attn_implementation="consa" serves it too
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="consa").eval()
    with torch.no_grad():
        got3 = plain(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got3[valid], logits[valid], atol=2e-5, rtol=0)


def test_native_mode_refused_for_headwise_allocation(tmp_path):
    model = tiny_model("qwen3", num_layers=3)
    with pytest.raises(ExportError, match="mix FA and SWA"):
        export(model, _head_alloc(model), tmp_path / "o", mode="native")
    assert not (tmp_path / "o").exists() and not list(tmp_path.iterdir())


def _good_export(tmp_path, family="qwen3"):
    model = tiny_model(family, num_layers=3)
    export(model, _head_alloc(model), tmp_path / "good")
    return tmp_path / "good"


def test_corrupted_exports_are_one_clear_error(tmp_path):
    good = _good_export(tmp_path)
    cases = {}

    def clone(name):
        d = tmp_path / name
        d.mkdir()
        for f in good.iterdir():
            (d / f.name).write_bytes(f.read_bytes())
        cases[name] = d
        return d

    d = clone("badjson")
    (d / "config.json").write_text("{not json")
    d = clone("noweights")
    (d / "model.safetensors").unlink()
    d = clone("truncated")
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    d = clone("wrongshape")
    cfg = json.loads((d / "config.json").read_text())
    cfg["consa"]["allocation"]["shape"]["num_layers"] = 4
    cfg["consa"]["allocation"]["fa"].append([1, 1])
    (d / "config.json").write_text(json.dumps(cfg))
    d = clone("badrecord")
    cfg = json.loads((d / "config.json").read_text())
    cfg["consa"]["allocation"]["num_swa_units"] = 1
    (d / "config.json").write_text(json.dumps(cfg))
    d = clone("otherweights")
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 128  # weights no longer match the config
    (d / "config.json").write_text(json.dumps(cfg))
    d = clone("pickle")
    (d / "pytorch_model.bin").write_bytes(b"x")
    for name, d in cases.items():
        with pytest.raises(ExportError) as e:
            load(d)
        msg = str(e.value)
        assert "\n" not in msg and len(msg) < 400, (name, msg)
    with pytest.raises(ExportError, match="not found"):
        load(tmp_path / "missing")


def test_cli_export(tmp_path, capsys):
    model = tiny_model("qwen2", num_layers=3)
    model.save_pretrained(tmp_path / "base")
    alloc_path = _layer_alloc(model).save(tmp_path / "alloc.json")
    assert cli_main(["export", "--model", str(tmp_path / "base"), "--allocation", str(alloc_path), "--out", str(tmp_path / "out")]) == 0
    assert "native" in capsys.readouterr().out
    assert read_export(tmp_path / "out")[1]["mode"] == "native"
    # user errors: one line, exit 2, nothing written
    assert cli_main(["export", "--model", str(tmp_path / "base"), "--allocation", str(alloc_path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("consa: error:") and err.count("\n") == 1 and "already exists" in err
    bad = Allocation.from_units([True] * 4, "layer", consa.ModelShape(4, 2, 4), 4).save(tmp_path / "bad.json")
    assert cli_main(["export", "--model", str(tmp_path / "base"), "--allocation", str(bad), "--out", str(tmp_path / "o2")]) == 2
    assert "4 layers" in capsys.readouterr().err
    assert not (tmp_path / "o2").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["alloc.json", "bad.json", "base", "out"]


def test_vision_language_checkpoint_exports_whole(tmp_path):
    """A Qwen3.5 vision-language checkpoint: the allocation is its text decoder's (attention layers only,
    beside the linear-attention ones), the vision tower is written back unchanged, and the export loads
    as the same class with consa's hybrid (consa.load) and with the shipped code (auto_map)."""
    from safetensors.torch import load_file

    from consa import families

    if "qwen3_5" not in families.causal_lm_families():
        pytest.skip("this transformers has no Qwen3.5")
    model = families.tiny_model("qwen3_5", vision=True)
    assert type(model).__name__ == "Qwen3_5ForConditionalGeneration"
    shape = consa.model_shape(model)
    alloc = Allocation.from_units([True, False] * shape.num_layers, "kv_head", shape, W)
    ids, mask = _ids(families.VOCAB)
    consa.apply_allocation(model, alloc)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    consa.detach(model)
    assert export(model, alloc, tmp_path / "out")["mode"] == "heads"
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["model_type"] == "consa_qwen3_5" and cfg["text_config"]["consa"] == cfg["consa"]
    assert cfg["consa"]["layers"] == consa.models.attention_layers(model)  # rows: the attention layers
    assert {"AutoConfig", "AutoModelForCausalLM", "AutoModelForImageTextToText"} <= set(cfg["auto_map"])
    saved = load_file(tmp_path / "out" / "model.safetensors")
    vision = {n: p for n, p in model.state_dict().items() if ".visual." in f".{n}"}
    assert vision and all(torch.equal(saved[n], p) for n, p in vision.items())
    loaded = load(tmp_path / "out")
    assert type(loaded).__name__ == "ConsaQwen3_5ForConditionalGeneration"
    assert loaded.config.vision_config._attn_implementation != "consa"
    with torch.no_grad():
        got = loaded(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got[mask.bool()], logits[mask.bool()], atol=2e-5, rtol=0)
