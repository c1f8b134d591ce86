"""The package layout is the architecture: every import in ``src/consa`` runs downward.

Each module belongs to one layer (``LAYERS``); a module may import its own layer and the layers ranked
below it (``RANK``), a few arrows are forbidden outright with the reason (``FORBIDDEN``), the data layer
knows only the maths (``ONLY``), and no group of modules imports itself round in a circle. Every import
counts, module-level or inside a function (hiding one there does not break a cycle, it defers it), as
does ``importlib.import_module("consa...")`` with a literal name. Imports are read with ``ast``, so
nothing is imported to check them.
"""

from __future__ import annotations

import ast
import fnmatch
import sys
import tempfile
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "consa"

# layer -> module patterns (dotted, below ``consa``; ``*`` any name, ``**`` any depth)
LAYERS = {
    "method": ["allocation", "budget", "constraint", "gates", "rules", "errors", "files", "compat", "presets", "interrupts",
               "consa_free"],
    "attention": ["attention", "attention.**"],
    "data": ["data", "data.**", "recall_task"],
    "models": ["models", "export", "export_native", "export_code", "export_code.**", "families", "lora_weights", "tiny"],
    "serving": ["serving", "serving.**"],
    "train": ["train", "train.**"],
    "eval": ["eval", "eval.**"],
    "experiment": ["experiment", "experiment.**", "experiment_*"],
    "figures": ["plots", "heatmap"],
    "face": ["__init__", "__main__", "cli", "commands", "commands.**", "report", "demo"],
}
# bottom first: a module imports its own rank and below
# (figures: the drawing modules, above measurement so that eval returns data and the study driver draws)
RANK = {"method": 0, "attention": 1, "data": 2, "models": 2, "serving": 3, "train": 3, "eval": 3, "figures": 4,
        "experiment": 5, "face": 6}
# arrows that must never exist (most also run upward; the reason is the message)
FORBIDDEN = {
    ("attention", "serving"): "caches and kernels know no engine",
    ("attention", "models"): "caches and kernels take plans, never a model",
    ("attention", "train"): "attention knows no trainer",
    ("attention", "eval"): "attention knows no measurement",
    ("models", "train"): "adapters never depend on training",
    ("data", "train"): "data knows no trainer",
    ("train", "face"): "the library never calls the CLI or draws",
    ("eval", "face"): "measurement calls no CLI",
    ("eval", "figures"): "measurement returns data and draws no figures",
    ("train", "figures"): "training draws no figures",
    ("train", "experiment"): "training knows no study driver",
    ("method", "attention"): "the maths knows no kernels",
}
# layers that may import only these layers (besides themselves)
ONLY = {"data": {"method"}}


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts)  # a package's own module is ``pkg.__init__``


def modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted((SRC / PACKAGE).rglob("*.py"))}


def _package_of(name: str) -> str:
    """The package a module's relative imports start from."""
    return name.rsplit(".", 1)[0]


def _resolve(target: str, known: set[str]) -> str | None:
    """The consa module a dotted import name means: the module itself, or the package's ``__init__``."""
    if target in known:
        return target
    if target + ".__init__" in known:
        return target + ".__init__"
    return None


def imports_of(name: str, path: Path, known: set[str]) -> list[tuple[str, int]]:
    """(imported consa module, line) for every import in the file, at any depth."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    out = []
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = _package_of(name).split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            # ``from pkg import sub`` names a module when ``sub`` is one, else a name inside ``pkg``
            targets = [f"{mod}.{a.name}" if _resolve(f"{mod}.{a.name}", known) else mod for a in node.names]
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            targets = [node.args[0].value]
        for t in targets:
            if t == PACKAGE or t.startswith(PACKAGE + "."):
                resolved = _resolve(t, known)
                if resolved is not None and resolved != name and (resolved, node.lineno) not in out:
                    out.append((resolved, node.lineno))
    return out


def layer_of(name: str) -> str | None:
    short = name[len(PACKAGE) + 1:]
    if short.endswith(".__init__"):
        short = short[: -len(".__init__")]
    for layer, patterns in LAYERS.items():
        for pat in patterns:
            if pat.endswith(".**"):
                if short == pat[:-3] or short.startswith(pat[:-2]):
                    return layer
            elif fnmatch.fnmatchcase(short, pat):
                return layer
    return None


def graph() -> dict[str, list[tuple[str, int]]]:
    mods = modules()
    known = set(mods)
    return {name: imports_of(name, path, known) for name, path in mods.items()}


def violations(edges: dict[str, list[tuple[str, int]]]) -> list[str]:
    """One line per import against the rules."""
    out = []
    for src, targets in sorted(edges.items()):
        a = layer_of(src)
        for dst, line in targets:
            b = layer_of(dst)
            if a is None or b is None or a == b:
                continue
            where = f"{src} (line {line}) -> {dst}"
            if (a, b) in FORBIDDEN:
                out.append(f"{where}: {a} -> {b} is forbidden ({FORBIDDEN[a, b]})")
            elif a in ONLY and b not in ONLY[a]:
                out.append(f"{where}: {a} imports only {', '.join(sorted(ONLY[a]))}")
            elif RANK[b] > RANK[a]:
                out.append(f"{where}: {a} (rank {RANK[a]}) imports the higher layer {b} (rank {RANK[b]})")
    return out


def cycles(edges: dict[str, list[tuple[str, int]]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on, found = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w, _ in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10_000))
    try:
        for v in sorted(edges):
            if v not in index:
                visit(v)
    finally:
        sys.setrecursionlimit(limit)
    return sorted(found)


# ---- the rules ------------------------------------------------------------------------------------
def test_every_module_has_a_layer():
    missing = [m for m in modules() if layer_of(m) is None]
    assert not missing, "modules in no layer (add them to LAYERS): " + ", ".join(missing)


def test_imports_run_downward():
    bad = violations(graph())
    assert not bad, f"{len(bad)} imports against the layer rules:\n" + "\n".join(bad)


def test_no_import_cycles():
    found = cycles(graph())
    assert not found, f"{len(found)} import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_attention_never_imports_serving_or_models():
    edges = graph()
    bad = [f"{src} -> {dst} (line {line})" for src, targets in edges.items() if layer_of(src) == "attention"
           for dst, line in targets if layer_of(dst) in ("serving", "models", "train", "eval", "experiment", "face")]
    assert not bad, "attention imports above itself:\n" + "\n".join(bad)


# ---- the checker can fail ---------------------------------------------------------------------------
@pytest.mark.parametrize("where,code,expect", [
    ("attention/cache.py", "from ..serving.engine import DecodeEngine\n", "attention -> serving is forbidden"),
    ("attention/plan.py", "def f():\n    from ..models import plans_of\n", "attention -> models is forbidden"),
    ("data/shards.py", "from ..train import batches\n", "data -> train is forbidden"),
    ("gates.py", "import importlib\nM = importlib.import_module('consa.attention.hybrid')\n", "method -> attention is forbidden"),
    ("data/shards.py", "from consa.models import text_config\n", "data imports only method"),
    ("eval/quality.py", "from .. import plots\n", "eval -> figures is forbidden"),
    ("eval/quality.py", "from ..commands import common\n", "eval -> face is forbidden"),
])
def test_a_planted_bad_import_is_caught(where, code, expect):
    """The rules on an import graph with one bad import added to a real module (the file is not touched)."""
    known = set(modules())
    name = _module_name(SRC / PACKAGE / where)
    edges = graph()
    edges[name] = edges[name] + _imports_of_text(name, code, known)
    assert any(expect in v and v.startswith(name) for v in violations(edges)), expect


def test_a_planted_cycle_is_caught():
    edges = graph()
    known = set(modules())
    name = "consa.attention.plan"
    edges[name] = edges[name] + _imports_of_text(name, "def f():\n    from . import hybrid\n", known)
    assert any(name in c and "consa.attention.hybrid" in c for c in cycles(edges))


def _imports_of_text(name: str, text: str, known: set[str]) -> list[tuple[str, int]]:
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(text)
    try:
        return imports_of(name, Path(f.name), known)
    finally:
        Path(f.name).unlink()
