"""One experiment's folder: where each stage reads and writes, what finished (``stages.json``), and the
helpers every stage shares (devices, the one-line errors of a missing prerequisite, progress lines)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..errors import ConsaError
from ..files import atomic_write_text
from .config import ExperimentConfig

STAGES = ("data", "pretrain", "search", "eval", "heal", "budget", "report")  # in the order they run


class Workdir:
    """Paths of one experiment and its ``stages.json`` (what finished, when, how long it took)."""

    def __init__(self, root: str | Path, cfg: ExperimentConfig):
        self.root, self.cfg = Path(root), cfg
        self.corpus = Path(cfg.data.corpus) if cfg.data.corpus else self.root / "corpus"
        self.base = self.root / "base"
        self.alloc = self.root / "alloc"
        self.search_runs = self.root / "search"
        self.evals = self.root / "eval"
        self.report = self.root / "report"
        self.stages_file = self.root / "stages.json"

    @property
    def bank(self) -> Path:
        """The retrieval bank: this workdir's own, or the one of the workdir its base model came from."""
        adopted = self.stages().get("pretrain", {}).get("bank_file")
        return Path(adopted) if adopted else self.root / "bank.npz"

    def stages(self) -> dict:
        if self.stages_file.is_file():
            return json.loads(self.stages_file.read_text())
        return {}

    def record(self, stage: str, info: dict) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        st = self.stages()
        st[stage] = info
        atomic_write_text(self.stages_file, json.dumps(st, indent=1) + "\n")

    def done(self, stage: str) -> bool:
        return bool(self.stages().get(stage, {}).get("done"))

    def base_model_dir(self) -> Path | None:
        if (self.base / "config.json").is_file():
            return self.base
        info = self.stages().get("pretrain", {})
        if info.get("done") and info.get("model"):
            return Path(info["model"])
        return None


def method_key(t: float) -> str:
    """The folder of one sparsity under ``alloc/`` and ``eval/``."""
    return f"s{t:g}"


def budget_key(b: float) -> str:
    """The folder of one KV budget under ``alloc/`` and ``eval/``."""
    return f"b{b:g}"


class PartialStage(ConsaError):
    """A stage stopped at its time budget; what it finished is on disk and the next call continues."""


def require(cond: bool, stage: str, what: str, prev: str, wd: Workdir) -> None:
    """One clear error when a stage's prerequisite is missing, naming the command that makes it."""
    if not cond:
        src = wd.cfg.source or "CFG.json"
        raise ConsaError(f"stage '{stage}' needs {what}, which is missing: run "
                         f"`consa experiment {prev} --config {src} --workdir {wd.root}` first")


def say(msg: str) -> None:
    print(f"[experiment {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def resolve_device(name: str | None):
    """The torch device of a config's ``device`` (``auto``: CUDA when there is one)."""
    import torch

    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str | None, device):
    """The torch dtype of a config's ``dtype`` (``auto``: bf16 on CUDA, fp32 on the CPU)."""
    import torch

    if name in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def free_device(device) -> None:
    """Give a stage's cached GPU memory back before the next stage loads its model."""
    import torch

    if device.type == "cuda":
        torch.cuda.empty_cache()


def adopt_base(wd: Workdir, other: str | Path) -> dict:
    """Record the finished base model (and retrieval bank) of workdir ``other`` as ``wd``'s pretrain stage.

    Search and eval variants (more search steps, other sparsities or windows) then run on the very same
    base model without pretraining again; the report names where the base came from. Idempotent for the
    same source; a workdir that already has a different base model is refused."""
    from ..presets import get_preset

    src = Workdir(other, wd.cfg)
    if src.root.resolve() == wd.root.resolve():
        raise ConsaError(f"--base-from {other} names the workdir itself")
    if not src.stages_file.is_file():
        raise ConsaError(f"--base-from {other}: no stages.json there (not an experiment workdir)")
    base = src.base_model_dir()
    if base is None or not src.done("pretrain"):
        raise ConsaError(f"--base-from {other}: its pretrain stage has not finished")
    base = base.resolve()
    mine = wd.stages().get("pretrain")
    if mine:
        if mine.get("done") and Path(mine.get("model", "")).resolve() == base:
            return mine
        raise ConsaError(f"{wd.root} already has its own pretrain stage ({mine.get('model')}); use a fresh --workdir")
    mc = json.loads((base / "config.json").read_text())
    pre = get_preset(wd.cfg.pretrain.preset)
    want = {"num_hidden_layers": pre.num_layers, "hidden_size": pre.hidden_size,
            "num_attention_heads": pre.num_heads, "num_key_value_heads": pre.num_kv_heads}
    bad = {k: (mc.get(k), v) for k, v in want.items() if mc.get(k) != v}
    if bad:
        raise ConsaError(f"--base-from {other}: its base model does not have the shape of preset "
                         f"{pre.name!r} in this config (model vs preset: {bad})")
    rec = {**src.stages()["pretrain"], "model": str(base), "adopted_from": str(src.root.resolve()),
           "bank_file": str(src.bank.resolve()) if src.bank.is_file() else None}
    wd.record("pretrain", rec)
    say(f"pretrain: adopted the base model {base} (from {src.root})")
    return rec
