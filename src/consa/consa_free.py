"""A child Python process in which consa cannot be imported: how the tests, the benchmarks and the family
matrix prove that an export loads and runs with torch and transformers alone (its shipped code through
``trust_remote_code``), not through an installed consa that would register its own kernels and caches."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

HIDE_CONSA = '''import sys
class _NoConsa:  # a meta-path finder ahead of every other: "consa" and its modules cannot be found
    def find_spec(self, name, path=None, target=None):
        if name == "consa" or name.startswith("consa."):
            raise ImportError("No module named 'consa' (hidden from this process)")
sys.meta_path.insert(0, _NoConsa())
'''


def script(body: str) -> str:
    """``body`` (indented or not) run after :data:`HIDE_CONSA`: the source of a consa-free child process."""
    return HIDE_CONSA + textwrap.dedent(body).lstrip("\n")


def env(modules_cache) -> dict:
    """This process's environment for such a child: ``PYTHONPATH`` without the folders that hold consa
    (others, e.g. another transformers, stay), and transformers' remote-code cache in ``modules_cache``."""
    out = dict(os.environ, HF_MODULES_CACHE=str(modules_cache), TOKENIZERS_PARALLELISM="false")
    out["PYTHONPATH"] = os.pathsep.join(p for p in out.get("PYTHONPATH", "").split(os.pathsep)
                                        if p and not os.path.exists(os.path.join(p, "consa")))
    return out


def run(source: str, *args, modules_cache, timeout: float, cwd=None) -> subprocess.CompletedProcess:
    """Run ``source`` (a :func:`script` or a string that starts with :data:`HIDE_CONSA`) with ``args`` in a
    consa-free child Python (:func:`env`); text output captured, no stdin."""
    return subprocess.run([sys.executable, "-c", source, *map(str, args)], capture_output=True, text=True,
                          env=env(modules_cache), stdin=subprocess.DEVNULL, timeout=timeout, cwd=cwd)
