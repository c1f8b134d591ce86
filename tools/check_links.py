"""Check that every markdown link in docs/**/*.md and README.md resolves.

A link resolves when its path (relative to the linking file) exists and, when it carries a #fragment into a
markdown file, that file has a heading whose GitHub slug is the fragment. External links (http, https, mailto)
are not fetched. Links inside fenced code blocks and inline code are ignored. Figure links in the tools' own
reports stored under docs/results/data/ (eval.md, results.md, ...: not READMEs) may point at figures that were
not kept (docs/results/data/README.md says so): those are counted, not failures. Also reports backticked
repository paths (`docs/...`, `experiments/...`, `benchmarks/...`) that do not exist, as warnings.

    python check_links.py [REPO]        # exit 1 when a link is broken
"""
import re
import sys
import unicodedata
from pathlib import Path

LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
CODE_PATH = re.compile(r"`((?:docs|experiments|benchmarks|tests)/[^`\s]*)`")


def slug(text: str) -> str:
    """GitHub's heading anchor: lower case, drop everything but letters, digits, marks, '_', ' ' and '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)  # link text only
    out = []
    for ch in text.lower():
        cat = unicodedata.category(ch)
        if ch in " -_" or cat[0] in "LMN":
            out.append(ch)
    return "".join(out).replace(" ", "-")


def strip_code(lines, inline=True):
    """The lines with fenced blocks blanked and (with inline) inline code removed: links in code are not links."""
    fenced = False
    for line in lines:
        if line.lstrip().startswith(("```", "~~~")):
            fenced = not fenced
            yield ""
            continue
        yield "" if fenced else (re.sub(r"`[^`]*`", "", line) if inline else line)


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in strip_code(path.read_text(encoding="utf-8").splitlines(), inline=False):
        m = HEADING.match(line)
        if not m:
            continue
        s = slug(m.group(2))
        n = seen.get(s, 0)
        out.add(s if n == 0 else f"{s}-{n}")
        seen[s] = n + 1
    return out


def main(repo: Path) -> int:
    files = sorted(repo.glob("docs/**/*.md")) + [repo / "README.md"]
    broken, warnings, count, not_kept = [], [], 0, 0
    cache: dict[Path, set[str]] = {}
    for md in files:
        raw = md.read_text(encoding="utf-8").splitlines()
        for no, line in enumerate(strip_code(raw), 1):
            for m in LINK.finditer(line):
                target = m.group(1)
                if re.match(r"^[a-z]+:", target):
                    continue
                count += 1
                path_part, _, frag = target.partition("#")
                dest = (md.parent / path_part).resolve() if path_part else md
                where = f"{md.relative_to(repo)}:{no}: ({target})"
                stored_report = "docs/results/data/" in md.relative_to(repo).as_posix() and md.name != "README.md"
                if not dest.exists() and stored_report and dest.suffix == ".png":
                    not_kept += 1
                    continue
                if not dest.exists():
                    broken.append(f"{where} missing file")
                    continue
                if frag and dest.suffix == ".md":
                    if dest not in cache:
                        cache[dest] = anchors(dest)
                    if frag not in cache[dest]:
                        broken.append(f"{where} no heading '#{frag}' in {dest.relative_to(repo)}")
        for no, line in enumerate(raw, 1):
            for m in CODE_PATH.finditer(line):
                p = m.group(1).rstrip(".,;:")
                if any(c in p for c in "*{<$") or "WORK" in p:
                    continue
                p, _, name = p.partition("::")  # pytest's file::test (or file::NAME) form
                if not (repo / p).exists():
                    warnings.append(f"{md.relative_to(repo)}:{no}: `{p}` not in the tree")
                elif name and not re.search(rf"^(def |class )?{re.escape(name.split('::')[0].split('[')[0])}\b",
                                             (repo / p).read_text(), re.M):
                    broken.append(f"{md.relative_to(repo)}:{no}: `{p}` has no `{name}`")
    for w in warnings:
        print("warning:", w)
    for b in broken:
        print("BROKEN:", b)
    print(f"{count} relative links in {len(files)} files: {len(broken)} broken; {len(warnings)} code-path warnings; "
          f"{not_kept} figure links in stored tool reports point at figures not kept")
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1] if len(sys.argv) > 1 else ".").resolve()))
