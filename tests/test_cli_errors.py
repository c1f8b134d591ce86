"""Bad input to any subcommand: one ``consa: error:`` line, exit 2, no traceback, nothing under --out.

One row per bad input in ``ROWS``: the next one found is one more row. Also: a failure mid-run leaves
no partial run, Ctrl-C keeps a resumable one, and what commands write is readable by others.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import stat
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

from consa.cli import main
from consa.tiny import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 320  # >= the corpus tokenizer's 300, so the corpus fits the tiny models


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, Path]:
    """Tiny models (good, malformed config, NaN weights, small vocabulary), a corpus, an allocation,
    an eval run, an experiment config and a regular file: everything the rows point at."""
    root = tmp_path_factory.mktemp("cli_errors")
    src = root / "src"
    src.mkdir()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in ("textwrap.py", "string.py", "heapq.py", "bisect.py", "shlex.py"):
        shutil.copy(stdlib / name, src / name)
    e = {"src": src, "corpus": root / "corpus", "m": root / "m", "bad": root / "bad", "nan": root / "nan",
         "small": root / "small", "file": root / "a-file", "cfg": root / "exp.json"}
    assert main(["data", "build", "--source", str(src), "--out", str(e["corpus"]), "--vocab-size", "300",
                 "--workers", "1", "--val-fraction", "0.2"]) == 0
    tiny_model("qwen3", num_layers=2, vocab_size=VOCAB).save_pretrained(e["m"])
    e["bad"].mkdir()
    (e["bad"] / "config.json").write_text('{"model_type": "qwen3", oops')
    nan = tiny_model("qwen3", num_layers=2, vocab_size=VOCAB)
    with torch.no_grad():
        nan.lm_head.weight[0, 0] = float("nan")
    nan.save_pretrained(e["nan"])
    tiny_model("qwen3", num_layers=2, vocab_size=101).save_pretrained(e["small"])
    e["file"].write_text("not a directory\n")
    assert main(["rules", "--model", str(e["m"]), "--sparsity", "0.5", "--window", "4", "--rule", "fa_top",
                 "--out", str(root / "rules")]) == 0
    e["alloc"] = root / "rules" / "fa_top.json"
    # damaged copies: a corpus whose meta.json files are binary, one whose token ids were overwritten (0xffff:
    # past any small vocabulary), one whose offsets file is not an array, and a model whose weights were cut short
    for name, damage in (("binmeta", {"meta.json": bytes(range(128, 256))}),
                         ("garbled", {"tokens.bin": None}), ("badoffsets", {"doc_offsets.npy": b"\x93NUMPY garbage"})):
        shutil.copytree(e["corpus"], root / name)
        for split in ("train", "validation"):
            for fname, data in damage.items():
                f = root / name / split / fname
                f.write_bytes(b"\xff" * f.stat().st_size if data is None else data)
        e[name] = root / name
    e["trunc"] = root / "trunc"
    shutil.copytree(e["m"], e["trunc"])
    weights = e["trunc"] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    e["evalrun"] = root / "evalrun"
    assert main(["eval", "--model", str(e["m"]), *_EVAL_DATA.format(**e).split(), "--out", str(e["evalrun"])]) == 0
    e["cfg"].write_text(json.dumps({
        "name": "ci", "seed": 0, "device": "cpu", "progress": False, "data": {"corpus": str(e["corpus"])},
        "pretrain": {"preset": "tiny", "steps": 1, "batch_size": 2, "seq_len": 128, "retrieval_mix": 0.5,
                     "bank_items": 3, "bank_tasks": ["passkey"], "bank_min_len": 80, "eval_every": 100,
                     "bank_digits": 3}}))
    return e


_EVAL_DATA = ("--tokenizer {corpus} --corpus {corpus} --ppl-length 32 --ppl-sequences 1 --tasks none --window 4 "
              "--no-progress")
_SEARCH = "search --model {m} --sparsity 0.5 --window 4 --seq-len 16 --batch-size 2 --steps 3 --no-progress"
_RULES = "rules --model {m} --sparsity 0.5 --window 4"
_EVAL = "eval --model {m} --tasks none --window 4 --no-progress"
_PRETRAIN = "pretrain --corpus {corpus} --steps 1 --no-progress"
_DATA = "data build --source {src} --vocab-size 300 --workers 1"

# (id, argv with {placeholders} and {out}, fragment of the error line, what {out} is before the call:
#  "new" = does not exist, "file" = a regular file, "empty" = an empty directory)
ROWS = [
    # a model directory whose config.json is not JSON (transformers: an OSError traceback)
    ("search: malformed config.json", "search --model {bad} --sparsity 0.5 --window 4 --out {out}", "not valid JSON", "new"),
    ("rules: malformed config.json", "rules --model {bad} --sparsity 0.5 --window 4 --out {out}", "not valid JSON", "new"),
    ("eval: malformed config.json", "eval --model {bad} --window 4 --out {out}", "not valid JSON", "new"),
    ("export: malformed config.json", "export --model {bad} --allocation {alloc} --out {out}", "not valid JSON", "new"),
    ("rules: no config.json", "rules --model {src} --sparsity 0.5 --window 4 --out {out}", "model config not found", "new"),
    # --out / --workdir naming a regular file (was: FileExistsError traceback)
    ("search: --out is a file", _SEARCH + " --out {out}", "exists and is not a directory", "file"),
    ("rules: --out is a file", _RULES + " --out {out}", "exists and is not a directory", "file"),
    ("eval: --out is a file", _EVAL + " --out {out}", "exists and is not a directory", "file"),
    ("export: --out is a file", "export --model {m} --allocation {alloc} --out {out}", "already exists", "file"),
    ("report: --out is a file", "report {evalrun} --out {out}", "exists and is not a directory", "file"),
    ("data build: --out is a file", _DATA + " --out {out}", "exists and is not a directory", "file"),
    ("pretrain: --out is a file", _PRETRAIN + " --out {out}", "exists and is not a directory", "file"),
    ("experiment: --workdir is a file", "experiment pretrain --config {cfg} --workdir {out}",
     "--workdir", "file"),
    ("plot: --out is a directory", "plot {alloc} --out {out}", "is a directory", "empty"),
    ("plot: --out is no image name", "plot {alloc} --out {out}", "name an image file", "new"),
    # numbers refused while parsing (was, for --batch-size 0: a reshape traceback and half a metrics.jsonl)
    *[(f"search {o} {v}", f"{_SEARCH} {o} {v} --out {{out}}", f"argument {o}", "new") for o, v in [
        ("--batch-size", "0"), ("--seq-len", "0"), ("--steps", "-1"), ("--gate-lr", "0"), ("--gate-lr", "nan"),
        ("--warmup-frac", "1.5"), ("--checkpoint-every", "-1"), ("--sinks", "-1"), ("--nproc", "0"),
        ("--weight-lr", "-1e-5"), ("--lm-weight", "-1"), ("--max-steps", "-1"), ("--until-agreement", "2"),
        ("--retrieval-mix", "-0.1"), ("--sparsity", "1"), ("--window", "0"), ("--batch-size", "two"),
        ("--seed", "-1")]],
    *[(f"rules {o} {v}", f"{_RULES} {o} {v} --out {{out}}", f"argument {o}", "new") for o, v in [
        ("--window", "0"), ("--seeds", "0"), ("--sinks", "-2"), ("--sparsity", "0")]],
    *[(f"eval {o} {v}", f"{_EVAL} {o} {v} --out {{out}}", f"argument {o}", "new") for o, v in [
        ("--batch-size", "0"), ("--items", "0"), ("--ppl-sequences", "0"), ("--ppl-length", "0"), ("--window", "0"),
        ("--digits", "0"), ("--sinks", "-1")]],
    *[(f"pretrain {o} {v}", f"{_PRETRAIN} {o} {v} --out {{out}}", f"argument {o}", "new") for o, v in [
        ("--batch-size", "0"), ("--seq-len", "0"), ("--lr", "0"), ("--lr", "inf"), ("--grad-accum", "0"),
        ("--eval-batches", "0"), ("--eval-every", "0"), ("--save-every", "0"), ("--time-limit", "-5"),
        ("--warmup", "-1"), ("--tokens", "0"), ("--threads", "0"), ("--retrieval-mix", "1.5"),
        ("--answer-weight", "-1")]],
    *[(f"data build {o} {v}", f"{_DATA} {o} {v} --out {{out}}", f"argument {o}", "new") for o, v in [
        ("--vocab-size", "0"), ("--workers", "0"), ("--val-fraction", "1.5"), ("--max-mb", "0"), ("--seed", "-3")]],
    ("experiment --time-budget 0", "experiment pretrain --config {cfg} --time-budget 0 --workdir {out}",
     "argument --time-budget", "new"),
    ("search: missing options", "search --model {m} --out {out}", "required", "new"),
    ("rules: unknown option", _RULES + " --bogus 1 --out {out}", "unrecognized arguments", "new"),
    # a corpus tokenized with more ids than the model has (was: IndexError in the embedding)
    ("eval: corpus vocabulary larger than the model's", "eval --model {small} " + _EVAL_DATA + " --out {out}",
     "vocabulary of 300 tokens", "new"),
    ("search: corpus vocabulary larger than the model's",
     "search --model {small} --corpus {corpus} --sparsity 0.5 --window 4 --seq-len 16 --out {out}",
     "vocabulary of 300 tokens", "new"),
    # damaged corpus files (was: a UnicodeDecodeError traceback for a binary meta.json, an IndexError deep in the
    # embedding for overwritten token ids)
    ("search: corpus meta.json not UTF-8", "search --model {m} --corpus {binmeta} --sparsity 0.5 --window 4 --seq-len 16 "
     "--out {out}", "not valid JSON (not UTF-8", "new"),
    ("eval: corpus meta.json not UTF-8", "eval --model {m} " + _EVAL_DATA.replace("--corpus {corpus}", "--corpus {binmeta}")
     + " --out {out}", "not valid JSON (not UTF-8", "new"),
    ("search: corpus token ids overwritten", "search --model {m} --corpus {garbled} --sparsity 0.5 --window 4 "
     "--seq-len 16 --out {out}", "past the corpus vocabulary", "new"),
    ("eval: corpus token ids overwritten", "eval --model {m} " + _EVAL_DATA.replace("--corpus {corpus}", "--corpus {garbled}")
     + " --out {out}", "past the corpus vocabulary", "new"),
    ("search: corpus offsets not an array", "search --model {m} --corpus {badoffsets} --sparsity 0.5 --window 4 "
     "--seq-len 16 --out {out}", "doc_offsets.npy is not a plain numpy array", "new"),
    # a weights file cut short (was: a SafetensorError traceback)
    ("search: truncated weights", "search --model {trunc} --sparsity 0.5 --window 4 --seq-len 16 --out {out}",
     "truncated or corrupt .safetensors", "new"),
    ("export: truncated weights", "export --model {trunc} --allocation {alloc} --out {out}",
     "truncated or corrupt .safetensors", "new"),
    ("eval: truncated weights", _EVAL.replace("{m}", "{trunc}") + " --out {out}", "truncated or corrupt .safetensors", "new"),
    # a NaN loss after the run directory was made: no half-written run left
    ("search: NaN loss mid-run", "search --model {nan} --sparsity 0.5 --window 4 --seq-len 16 --batch-size 2 "
     "--steps 3 --checkpoint-every 0 --no-progress --out {out}", "loss became nan", "new"),
    ("search: NaN loss into an empty dir", "search --model {nan} --sparsity 0.5 --window 4 --seq-len 16 "
     "--batch-size 2 --steps 3 --checkpoint-every 0 --no-progress --out {out}", "loss became nan", "empty"),
]


def _prepare(out: Path, kind: str) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    if kind == "file":
        out.write_text("precious\n")
    elif kind == "empty":
        out.mkdir()


def _check_untouched(out: Path, kind: str) -> None:
    if kind == "new":
        assert not out.exists(), sorted(p.name for p in out.rglob("*"))
    elif kind == "file":
        assert out.read_text() == "precious\n"
    else:
        assert out.is_dir() and list(out.iterdir()) == []
    assert [p.name for p in out.parent.iterdir() if p.name != out.name] == []  # no temp siblings left


@pytest.mark.parametrize("argv,fragment,kind", [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(env, tmp_path, capsys, argv, fragment, kind):
    out = tmp_path / "parent" / ("pic" if "no image" in argv else "run")
    _prepare(out, kind)
    capsys.readouterr()
    rc = main(shlex.split(argv.format(out=out, **env)))
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("consa: error:") and fragment in lines[0], err
    _check_untouched(out, kind)


def test_the_real_entry_point_prints_one_line_for_a_malformed_config(env, tmp_path):
    out = tmp_path / "run"
    src = str(Path(__file__).resolve().parents[1] / "src")
    r = subprocess.run([sys.executable, "-m", "consa", *shlex.split(ROWS[0][1].format(out=out, **env))],
                       env={**os.environ, "PYTHONPATH": src}, capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "not valid JSON" in r.stderr, r.stderr
    assert not out.exists()


# Ctrl-C at a fixed moment (consa.interrupts sends the process a real SIGINT there): in the seconds of imports
# before consa's main runs (was: a KeyboardInterrupt traceback through torch's import; nothing may be written
# then), and during the work (a search keeps its run for --resume, never an allocation)
CTRL_C_ROWS = [
    ("search: during the imports", "startup", _SEARCH + " --out {out}"),
    ("eval: during the imports", "startup", _EVAL + " --out {out}"),
    ("export: during the imports", "startup", "export --model {m} --allocation {alloc} --out {out}"),
    ("search: at step 1", "step 1", _SEARCH + " --checkpoint-every 0 --out {out}"),
]


@pytest.mark.parametrize("point,argv", [r[1:] for r in CTRL_C_ROWS], ids=[r[0] for r in CTRL_C_ROWS])
def test_ctrl_c_at_any_moment_is_one_line_exit_130(env, tmp_path, point, argv):
    out = tmp_path / "run"
    src = str(Path(__file__).resolve().parents[1] / "src")
    r = subprocess.run([sys.executable, "-m", "consa", *shlex.split(argv.format(out=out, **env))], capture_output=True,
                       env={**os.environ, "PYTHONPATH": src, "CONSA_INTERRUPT_AT": point}, text=True, timeout=600)
    assert r.returncode == 130 and r.stderr == "consa: interrupted\n", r.stderr
    if point == "startup":
        assert not out.exists()
    assert not (out / "allocation.json").exists()


def test_ctrl_c_keeps_a_resumable_search_and_resume_finishes_it(env, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    argv = shlex.split(_SEARCH.format(**env)) + ["--steps", "8", "--checkpoint-every", "2", "--out", str(out)]
    state = out / "checkpoint" / "state.json"
    # a real SIGINT to this process before step 5 (consa.interrupts), after the checkpoint of step 4
    monkeypatch.setenv("CONSA_INTERRUPT_AT", "step 5")
    assert main(argv) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == "consa: interrupted"
    assert json.loads(state.read_text())["step"] == 4 and not (out / "allocation.json").exists()
    monkeypatch.delenv("CONSA_INTERRUPT_AT")
    assert main(argv) == 2 and "--resume" in capsys.readouterr().err  # refuses to clobber it
    assert main(argv + ["--resume"]) == 0
    assert json.loads((out / "search.json").read_text())["steps_done"] == 8


def _assert_ordinary_modes(root: Path, umask: int) -> list[str]:
    """Every file and directory under ``root`` has the mode open()/mkdir() give under ``umask``."""
    seen = []
    for p in [root, *root.rglob("*")]:
        want = (0o777 if p.is_dir() else 0o666) & ~umask
        assert stat.S_IMODE(p.stat().st_mode) == want, f"{p}: {oct(stat.S_IMODE(p.stat().st_mode))} != {oct(want)}"
        seen.append(p.name)
    return seen


@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["umask022", "umask027"])
def test_what_commands_write_is_readable_as_the_umask_allows(env, tmp_path, umask):
    old = os.umask(umask)
    try:
        o = {k: tmp_path / k for k in ("search", "rules", "export", "eval", "report", "data")}
        assert main(shlex.split(_SEARCH.format(**env)) + ["--checkpoint-every", "2", "--out", str(o["search"])]) == 0
        assert main(shlex.split(_RULES.format(**env)) + ["--out", str(o["rules"])]) == 0
        assert main(["export", "--model", str(env["m"]), "--allocation", str(env["alloc"]), "--out", str(o["export"])]) == 0
        assert main(["eval", "--model", str(env["m"]), *_EVAL_DATA.format(**env).split(), "--out", str(o["eval"])]) == 0
        assert main(["report", str(o["eval"]), str(env["evalrun"]), "--out", str(o["report"])]) == 0
        assert main(["plot", str(o["search"] / "allocation.json"), "--out", str(tmp_path / "plot.png")]) == 0
        assert main(shlex.split(_DATA.format(**env)) + ["--out", str(o["data"])]) == 0
    finally:
        os.umask(old)
    names = {k: _assert_ordinary_modes(d, umask) for k, d in o.items()}
    _assert_ordinary_modes(tmp_path / "plot.png", umask)
    # the artefacts that used to be 0600 are among those checked
    assert {"allocation.json", "search.json", "gates.safetensors", "state.safetensors"} <= set(names["search"])
    assert "model.safetensors" in names["export"] and "report.md" in names["report"] and "eval.json" in names["eval"]


def test_an_experiment_stage_creates_its_fresh_workdir(env, tmp_path, capsys):
    """As the configs document it: ``consa experiment pretrain --config C --workdir W`` on a new W
    (was: No such file or directory: 'W/bank.npz.tmp.npz')."""
    work = tmp_path / "runs" / "w"
    old = os.umask(0o027)
    try:
        rc = main(["experiment", "pretrain", "--config", str(env["cfg"]), "--workdir", str(work)])
    finally:
        os.umask(old)
    assert rc == 0, capsys.readouterr().err
    assert (work / "bank.npz").is_file() and (work / "base" / "config.json").is_file()
    assert json.loads((work / "stages.json").read_text())["pretrain"]["done"]
    names = _assert_ordinary_modes(work, 0o027)  # the pretraining checkpoint included
    assert "model.safetensors" in names and "checkpoint" in names
