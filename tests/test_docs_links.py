"""Every relative link in README.md and docs/ resolves (file and #anchor): the docs were split into a one-screen
summary plus one page per run, and a moved page must not leave a dead link behind."""

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _checker():
    spec = importlib.util.spec_from_file_location("check_links", REPO / "tools" / "check_links.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_every_docs_link_resolves(capsys):
    assert _checker().main(REPO) == 0, capsys.readouterr().out


def test_a_dead_link_is_caught(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "A.md").write_text("# Title\n\nsee [b](B.md) and [here](#nowhere)\n", encoding="utf-8")
    (tmp_path / "README.md").write_text("[a](docs/A.md#title)\n", encoding="utf-8")
    assert _checker().main(tmp_path) == 1
