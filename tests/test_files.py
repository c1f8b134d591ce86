"""consa.files: output directories publish whole or not at all, and files get the modes open() gives."""

from __future__ import annotations

import os
import stat
import time

import pytest

from consa.errors import ConsaError
from consa.files import atomic_path, atomic_write_text, has_checkpoint, ordinary_modes, output_dir, temp_dir


@pytest.fixture(params=[0o022, 0o027, 0o077])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def _mode(p) -> int:
    return stat.S_IMODE(os.lstat(p).st_mode)


def _leftovers(parent) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_atomic_writers_give_umask_modes_not_mkstemps_0600(tmp_path, umask):
    atomic_write_text(tmp_path / "a.json", "{}")
    with atomic_path(tmp_path / "b.bin") as tmp:
        tmp.write_bytes(b"x")
    d = temp_dir(tmp_path, ".d.")
    assert _mode(tmp_path / "a.json") == _mode(tmp_path / "b.bin") == 0o666 & ~umask
    assert _mode(d) == 0o777 & ~umask
    (d / "f").write_text("x")
    os.chmod(d / "f", 0o600)
    ordinary_modes(d)
    assert _mode(d / "f") == 0o666 & ~umask


def test_atomic_path_failure_leaves_the_old_file_and_no_temp(tmp_path):
    (tmp_path / "a.json").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "a.json") as tmp:
            tmp.write_text("half")
            raise RuntimeError("disk full")
    assert (tmp_path / "a.json").read_text() == "old" and _leftovers(tmp_path) == []


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_a_failed_staged_output_leaves_nothing_not_even_parents(tmp_path, exc):
    out = tmp_path / "x" / "y" / "run"
    with pytest.raises(exc):
        with output_dir(out) as d:
            (d / "metrics.jsonl").write_text("half")
            raise exc()
    assert list(tmp_path.iterdir()) == []


def test_staged_output_is_renamed_into_place_with_umask_modes(tmp_path, umask):
    out = tmp_path / "run"
    with output_dir(out) as d:
        assert d != out and not out.exists()  # nothing visible under --out before success
        (d / "sub").mkdir(mode=0o700)
        (d / "sub" / "w.safetensors").write_bytes(b"w")
        os.chmod(d / "sub" / "w.safetensors", 0o600)
    assert _mode(out) == _mode(out / "sub") == 0o777 & ~umask
    assert _mode(out / "sub" / "w.safetensors") == 0o666 & ~umask
    assert _leftovers(tmp_path) == []


def test_merge_replace_and_empty_policies_on_an_existing_directory(tmp_path):
    out = tmp_path / "run"
    (out / "plots").mkdir(parents=True)
    (out / "plots" / "old.png").write_text("old")
    (out / "keep.txt").write_text("mine")
    (out / "eval.json").write_text("old")
    with output_dir(out) as d:  # merge: same names replaced, others kept
        (d / "eval.json").write_text("new")
        (d / "plots").mkdir()
        (d / "plots" / "new.png").write_text("new")
    assert (out / "eval.json").read_text() == "new" and (out / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in (out / "plots").iterdir()) == ["new.png"]
    with pytest.raises(ConsaError, match="not empty"):
        with output_dir(out, exists="empty"):
            pytest.fail("the block must not run")
    with output_dir(out, exists="replace") as d:
        (d / "stats.json").write_text("{}")
    assert sorted(p.name for p in out.iterdir()) == ["stats.json"]
    assert _leftovers(tmp_path) == []


def test_a_file_where_the_directory_should_be_is_one_error(tmp_path):
    (tmp_path / "f").write_text("x")
    for kw in ({}, {"resumable": True}):
        with pytest.raises(ConsaError, match="exists and is not a directory"):
            with output_dir(tmp_path / "f", **kw):
                pytest.fail("the block must not run")
    assert (tmp_path / "f").read_text() == "x"


def _checkpoint(d):
    (d / "checkpoint").mkdir()
    (d / "checkpoint" / "state.json").write_text("{}")


def test_resumable_output_keeps_what_resume_needs_and_nothing_else(tmp_path, umask):
    # Ctrl-C: the run directory stays for --resume, readable by others
    out = tmp_path / "a"
    with pytest.raises(KeyboardInterrupt):
        with output_dir(out, resumable=True, keep=has_checkpoint) as d:
            assert d == out
            (d / "metrics.jsonl").write_text("1\n")
            raise KeyboardInterrupt
    assert (out / "metrics.jsonl").is_file() and _mode(out / "metrics.jsonl") == 0o666 & ~umask
    # an error in a fresh run with no checkpoint: nothing left
    out = tmp_path / "b" / "c"
    with pytest.raises(RuntimeError):
        with output_dir(out, resumable=True, keep=has_checkpoint) as d:
            (d / "metrics.jsonl").write_text("nan\n")
            raise RuntimeError("loss became nan")
    assert not (tmp_path / "b").exists()
    # ... with a checkpoint: kept (an OOM after hours must not throw the checkpoint away)
    out = tmp_path / "d"
    with pytest.raises(RuntimeError):
        with output_dir(out, resumable=True, keep=has_checkpoint) as d:
            _checkpoint(d)
            raise RuntimeError("CUDA out of memory")
    assert has_checkpoint(out)
    # a failed --resume leaves the run it continued as it was
    with pytest.raises(RuntimeError):
        with output_dir(out, resumable=True, keep=has_checkpoint):
            raise RuntimeError("boom")
    assert has_checkpoint(out)
    # an empty directory the user made stays, emptied
    out = tmp_path / "e"
    out.mkdir()
    with pytest.raises(RuntimeError):
        with output_dir(out, resumable=True) as d:
            (d / "metrics.jsonl").write_text("x")
            raise RuntimeError("boom")
    assert out.is_dir() and list(out.iterdir()) == []


def test_has_checkpoint_looks_at_any_depth(tmp_path):
    assert not has_checkpoint(tmp_path)
    (tmp_path / "search" / "run").mkdir(parents=True)
    (tmp_path / "search" / "run" / "state.json").write_text("{}")  # not under checkpoint/
    assert not has_checkpoint(tmp_path)
    _checkpoint(tmp_path / "search" / "run")
    assert has_checkpoint(tmp_path)


def test_a_resumable_run_leaves_the_modes_of_a_users_own_files_alone(tmp_path, umask):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("private")
    os.chmod(out / "notes.txt", 0o600)
    time.sleep(0.2)  # older than the run
    with output_dir(out, resumable=True) as d:
        (d / "checkpoint").mkdir(mode=0o700)
        (d / "checkpoint" / "state.safetensors").write_bytes(b"x")
        os.chmod(d / "checkpoint" / "state.safetensors", 0o600)
    assert _mode(out / "notes.txt") == 0o600
    assert _mode(out / "checkpoint") == 0o777 & ~umask
    assert _mode(out / "checkpoint" / "state.safetensors") == 0o666 & ~umask


def test_library_export_and_search_outputs_are_readable_by_others(tmp_path, umask):
    """The Python API (no CLI staging around it) must not leave mkdtemp's 0700 or safetensors' 0600."""
    import torch

    from consa.allocation import Allocation
    from consa.export import export
    from consa.models import model_shape
    from consa.tiny import tiny_model
    from consa.train.search import Search
    from consa.train.search_config import ScheduleConfig, SearchConfig, TargetConfig

    model = tiny_model("qwen3", num_layers=2, num_kv_heads=2)
    alloc = Allocation.from_units([True, False, False, True], "kv_head", model_shape(model), 4)
    export(model, alloc, tmp_path / "exp", mode="heads")
    assert _mode(tmp_path / "exp") == 0o777 & ~umask
    assert {_mode(p) for p in (tmp_path / "exp").iterdir()} == {0o666 & ~umask}

    cfg = SearchConfig(TargetConfig(sparsity=0.5, window=4), seq_len=12, schedule=ScheduleConfig(steps=1), checkpoint_every=0)
    Search(model, cfg, lambda s: {"input_ids": torch.randint(3, 50, (1, 12))}, tmp_path / "s", progress=False).run()
    assert _mode(tmp_path / "s" / "gates.safetensors") == 0o666 & ~umask
