"""The family matrix: every causal-LM family of the installed transformers (:mod:`consa.families`), tiny
and random, searched, exported and reloaded in a process that cannot import consa, its logits and greedy
tokens compared with consa's hybrid. A study over the library (search, export, generate), so it lives
above them.

``python -m consa.experiment.family_matrix --markdown`` prints README's family table for the installed
version; ``--readme README.md`` rewrites it in place.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field

import torch

from .. import consa_free
from ..consa_free import HIDE_CONSA
from ..families import VOCAB, matrix_entries, routes_attention, tiny_model

@dataclass
class FamilyResult:
    """One row of the family matrix. ``stage`` is where it stopped (``ok`` when it went all the way);
    ``reason`` says why, in one line; ``exports`` maps each export made to its format."""

    name: str
    family: str
    vision: bool = False
    stage: str = "build"
    reason: str = ""
    exports: dict = field(default_factory=dict)
    details: dict = field(default_factory=dict)


# ---- search -> export -> load without consa, per family --------------------------------------------
WINDOW, SEQ, NEW_TOKENS, PAD = 3, 12, 4, 2
ATOL = 1e-4
LOADER = HIDE_CONSA + r'''
import json, sys
import torch, transformers
from transformers import AutoModelForCausalLM
torch.set_num_threads(1)
jobs, out = json.loads(open(sys.argv[1]).read()), {}
for name, job in jobs.items():
    try:
        cfg = json.loads(open(job["dir"] + "/config.json").read())
        arch = (cfg.get("architectures") or [""])[0]
        cls = getattr(transformers, arch, None) if "auto_map" not in cfg else None
        cls = cls if isinstance(cls, type) and hasattr(cls, "generate") else AutoModelForCausalLM
        model, info = cls.from_pretrained(job["dir"], local_files_only=True, trust_remote_code="auto_map" in cfg,
                                          output_loading_info=True)
        bad = {k: sorted(v)[:3] for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
        if bad:
            raise ValueError(f"weights do not load: {bad}")
        model.eval()
        ids, mask = torch.tensor(job["ids"]), torch.tensor(job["mask"])
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits
            gen = model.generate(ids, attention_mask=mask, max_new_tokens=job["new"], do_sample=False,
                                 pad_token_id=0, eos_token_id=None)
        out[name] = {"type": type(model).__name__, "logits": logits.tolist(), "gen": gen.tolist()}
    except Exception as e:
        msg = str(e).strip().splitlines()
        out[name] = {"error": f"{type(e).__name__}: {msg[0][:300] if msg else ''}"}
assert not any(m == "consa" or m.startswith("consa.") for m in sys.modules)
open(sys.argv[2], "w").write(json.dumps(out))
'''


def _stopped(r, stage: str, e: Exception) -> None:
    """Record why family ``r`` stopped at ``stage``: a ConsaError's one-line refusal as it is, anything
    else as a traceback (its first line the reason, the whole in the details)."""
    import traceback

    from ..errors import ConsaError

    if isinstance(e, ConsaError):
        r.reason = str(e)
        return
    r.reason = f"traceback in {stage}: {type(e).__name__}: {_first_line(e)}"
    r.details["traceback"] = traceback.format_exc()


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return (s.splitlines()[0] if s else type(e).__name__)[:300]


def _inputs(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two rows, the first left-padded: ids in [3, vocab - 8) (the tiny configs put special tokens on top)."""
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(3, max(4, min(vocab, VOCAB) - 8), (2, SEQ), generator=g)
    mask = torch.ones(2, SEQ, dtype=torch.long)
    mask[0, :PAD], ids[0, :PAD] = 0, 0
    return ids, mask


def _search(model, out_dir, steps: int):
    """A short gate search at t = 0.5 over every KV head consa may move (the model's own sliding layers
    kept; all of them reopened when every layer slides)."""
    from ..models import native_windows
    from ..train.search import Search, SearchConfig

    vocab = min(model.config.get_text_config().vocab_size, VOCAB)
    reopen = all(w is not None for w in native_windows(model))

    def batches(step: int) -> dict:
        g = torch.Generator().manual_seed(step)
        return {"input_ids": torch.randint(3, vocab - 8, (2, SEQ), generator=g)}

    cfg = SearchConfig.from_flat(dict(sparsity=0.5, window=WINDOW, seq_len=SEQ, steps=steps, checkpoint_every=0,
                                      refine_evals=0, reopen_native=reopen))
    return Search(model, cfg, batches, out_dir, progress=False).run()


def _layer_allocation(searched):
    """Every other searchable layer on SWA, at the model's own window when it has one (so a family
    whose native sliding layers consa keeps can still go native)."""
    from ..allocation import Allocation

    native = searched.native
    own = sorted({w for w in native if w is not None})
    free = [i for i, w in enumerate(native) if w is None]
    units = [k % 2 == 1 for k in range(len(free))]
    return Allocation.from_units(units, "layer", searched.shape, own[0] if own else WINDOW, native=native)


def _consa_outputs(model, alloc, ids, mask):
    """consa's hybrid: logits without a cache and greedy tokens through its hybrid cache."""
    from ..models import apply_allocation, detach, text_config
    from ..serving.generate import generate

    impl = text_config(model)._attn_implementation
    apply_allocation(model, alloc)
    try:
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits
            gen = generate(model, ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0,
                           eos_token_id=None, static=False)
    finally:
        detach(model, impl)
    return logits, gen


def _carried_unchanged(model, folder) -> str | None:
    """Every weight outside the text decoder's attention modules is written as the model has it (a
    vision tower, say); the attention projections were permuted by head. None, or what differs."""
    from safetensors.torch import load_file

    from ..models import attention_modules

    attn = {id(p) for m in attention_modules(model) for p in m.parameters()}
    own = {n: p for n, p in model.named_parameters() if id(p) not in attn}
    saved = {}
    for f in sorted(folder.glob("*.safetensors")):
        saved.update(load_file(f))
    for name, p in own.items():
        if name in saved and not torch.equal(saved[name], p.detach().cpu()):
            return f"{name} changed"
    if not any(n in saved for n in own):
        return "no weight outside attention is stored under its own name"
    return None


def check_families(entries, workdir, *, steps: int = 2, log=None) -> list[FamilyResult]:
    """Per entry of :func:`matrix_entries` (or family names): tiny model → does attention reach
    AttentionInterface → ``consa`` search (kv_head, ``steps`` steps) → a head-wise export of its
    allocation and a layer-wise one (native where transformers serves it) → one consa-free process
    loads every export and compares logits and greedy tokens with consa's hybrid. A row that stops
    early says why in ``reason``."""
    from pathlib import Path

    from ..export import export, native_blocker

    workdir = Path(workdir)
    results, jobs, expected = [], {}, {}
    for entry in entries:
        name, family, vision = (entry, entry, False) if isinstance(entry, str) else entry
        r = FamilyResult(name, family, vision)
        results.append(r)
        slug = name.replace(" ", "_").replace("(", "").replace(")", "")
        try:
            model = tiny_model(family, vision=vision)
        except Exception as e:
            r.reason = f"transformers cannot build a tiny {family}: {type(e).__name__}: {_first_line(e)}"
            continue
        r.stage = "route"
        try:
            routed = routes_attention(model)
        except Exception as e:
            r.reason = f"its tiny model does not run: {type(e).__name__}: {_first_line(e)}"
            continue
        if not routed:
            r.reason = "its attention does not go through AttentionInterface"
            continue
        r.stage = "search"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                searched = _search(model, workdir / slug / "search", steps)
        except Exception as e:
            _stopped(r, "search", e)
            continue
        r.stage = "export"
        ids, mask = _inputs(model.config.get_text_config().vocab_size)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for kind, alloc in (("heads", searched), ("layers", _layer_allocation(searched))):
                    if kind == "layers":  # head-wise, it would run the same shipped code as the first export
                        why = native_blocker(model, alloc)
                        if why is not None:
                            r.exports[kind], r.details[f"{kind}_why"] = "heads", why
                            continue
                    out = workdir / slug / kind
                    summary = export(model, alloc, out)
                    r.exports[kind], r.details[f"{kind}_why"] = summary["mode"], summary["why"]
                    if vision and kind == "heads":
                        changed = _carried_unchanged(model, out)
                        if changed:
                            raise ValueError(f"the export changed weights outside attention: {changed}")
                    expected[(name, kind)] = _consa_outputs(model, alloc, ids, mask)
                    jobs[f"{slug}/{kind}"] = {"dir": str(out), "ids": ids.tolist(), "mask": mask.tolist(), "new": NEW_TOKENS}
        except Exception as e:
            _stopped(r, "export", e)
            continue
        r.stage = "load"
        if log:
            log(f"{name}: exported ({', '.join(f'{k}: {v}' for k, v in r.exports.items())})")
    got = _load_without_consa(jobs, workdir) if jobs else {}
    for r in results:
        if r.stage == "load":
            _compare(r, got, jobs, expected)
    return results


def _compare(r: FamilyResult, got: dict, jobs: dict, expected: dict) -> None:
    slug = r.name.replace(" ", "_").replace("(", "").replace(")", "")
    problems = []
    for kind in ("heads", "layers"):
        key = f"{slug}/{kind}"
        if key not in jobs:
            continue
        res = got.get(key, {"error": "no result"})
        if "error" in res:
            problems.append(f"{kind} export: {res['error']}")
            continue
        logits, gen = expected[(r.name, kind)]
        valid = torch.tensor(jobs[key]["mask"]).bool()
        diff = (torch.tensor(res["logits"])[valid] - logits[valid]).abs().max().item()
        r.details[f"{kind}_max_diff"] = diff
        if diff > ATOL:
            problems.append(f"{kind} export: logits differ from consa's by {diff:.2e}")
        elif res["gen"] != gen.tolist():
            problems.append(f"{kind} export: greedy tokens differ from consa's")
    r.reason = "; ".join(problems)
    r.stage = "load" if problems else "ok"


def _load_without_consa(jobs: dict, workdir) -> dict:
    """Load every export in one process that cannot import consa (a meta-path finder hides it; the
    script asserts it stayed out) and return its logits and greedy tokens per job."""
    import json
    from pathlib import Path

    workdir = Path(workdir)
    (workdir / "jobs.json").write_text(json.dumps(jobs))
    proc = consa_free.run(LOADER, workdir / "jobs.json", workdir / "loaded.json", modules_cache=workdir / "hf_modules",
                          timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"the consa-free loader failed: {proc.stderr[-2000:]}")
    return json.loads((workdir / "loaded.json").read_text())


# ---- README's table ----------------------------------------------------------------------------------
README_BLOCK = re.compile(r"<!-- generated by `python -m consa.experiment.family_matrix --markdown` on transformers ([\w.]+) -->.*?"
                          r"<!-- end of generated table -->\n", re.S)


def markdown(results: list[FamilyResult], version: str) -> str:
    """README's family list: the families consa serves end to end (layer-wise native ones marked), then
    the others with the reason, between markers that tests/test_families.py checks."""
    ok = [r for r in results if r.stage == "ok"]
    native = [r for r in ok if r.exports.get("layers") == "native"]
    others = [r for r in results if r.stage != "ok"]
    names = ", ".join(f"{r.name}{'*' if r in native else ''}" for r in ok)
    lines = [f"<!-- generated by `python -m consa.experiment.family_matrix --markdown` on transformers {version} -->",
             f"On transformers {version}, {len(ok)} of the {len(results)} causal-LM classes it ships search, export and "
             "reload without consa, with logits and greedy tokens equal to consa's hybrid (tiny random models, "
             f"`tests/test_families.py`): {names}.", "",
             f"\\* a layer-wise allocation becomes native `layer_types` + `sliding_window` ({len(native)} families, found "
             "by probing each family's own code); every other export ships `modeling_consa.py`.", "",
             f"<details><summary>The other {len(others)}, and why</summary>", "",
             "| family | stops at | why |", "|---|---|---|"]
    for r in others:
        lines.append(f"| {r.name} | {r.stage} | {r.reason.replace('|', '/')} |")
    lines += ["", "</details>", "<!-- end of generated table -->"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    import argparse
    import tempfile

    import transformers
    from transformers.utils import logging as hf_logging

    ap = argparse.ArgumentParser(prog="python -m consa.experiment.family_matrix", description=__doc__.split("\n\n")[0])
    ap.add_argument("--markdown", action="store_true", help="print README's family table")
    ap.add_argument("--readme", default=None, help="rewrite the generated table in this README in place")
    ap.add_argument("--families", default=None, help="comma-separated model types (default: every one)")
    ap.add_argument("--steps", type=int, default=2)
    args = ap.parse_args(argv)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.set_num_threads(1)  # tiny matmuls: one thread is faster
    entries = matrix_entries()
    if args.families:
        wanted = set(args.families.split(","))
        entries = [e for e in entries if e[1] in wanted]
    with tempfile.TemporaryDirectory() as tmp:
        results = check_families(entries, tmp, steps=args.steps)
    if args.readme:
        from pathlib import Path

        text = Path(args.readme).read_text()
        new, n = README_BLOCK.subn(lambda _: markdown(results, transformers.__version__), text)
        if n != 1:
            raise SystemExit(f"consa: error: {args.readme} has no generated family table to replace")
        Path(args.readme).write_text(new)
    if args.markdown:
        print(markdown(results, transformers.__version__), end="")
    elif not args.readme:
        for r in results:
            print(f"{r.name:34s} {r.stage:6s} {r.exports} {r.reason}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
