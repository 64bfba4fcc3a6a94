"""The README is a quick start and docs/ holds the depth: every relative link and every repository path that the
Markdown names exists, the README stays short, and every docs file is reachable from it.

Checked in README.md and docs/*.md:
- relative Markdown links and images, `[text](target)` (resolved against the file's own folder); a `#anchor` must
  name a heading of the target file (GitHub's anchors: lower case, punctuation dropped, spaces to hyphens,
  -1, -2, ... for repeats);
- repository paths in inline code and in fenced code blocks: a word that contains a `/` and either ends with one
  or whose last part has an extension, and that starts in one of the repository's top-level folders
  (`actors/`, `eopd_ray/`, `docs/`, ...; paths of run outputs, data or hub models, such as `runs/...`, start
  elsewhere and are not checked). Read against the repository root; `*` is a glob, and `file.py::name` also
  needs `name` in the file.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README_MAX_LINES = 220
# the repository's top-level folders: a path starting with one of them names a file of this repository
REPO_DIRS = ("actors", "cluster", "docs", "eopd_ray", "examples", "tests", ".ci")

FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
INLINE_CODE = re.compile(r"(`+)(.+?)\1")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
EXTENSION = re.compile(r"\.[A-Za-z0-9]+$")


def markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def split_code(text: str) -> tuple[list[str], list[str]]:
    """(prose lines, lines inside fenced code blocks)."""
    prose, code, fence = [], [], None
    for line in text.splitlines():
        m = FENCE.match(line)
        if fence is None and m:
            fence = m.group(1)
        elif fence is not None and m and m.group(1)[0] == fence[0] and len(m.group(1)) >= len(fence) \
                and not line.strip()[len(m.group(1)):].strip():
            fence = None
        elif fence is not None:
            code.append(line)
        else:
            prose.append(line)
    return prose, code


def slug(heading: str) -> str:
    """GitHub's anchor for a heading's text."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text only
    text = re.sub(r"<[^>]+>", "", text).replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    prose, _ = split_code(path.read_text(encoding="utf-8"))
    seen: dict[str, int] = {}
    out = set()
    for line in prose:
        m = HEADING.match(line)
        if not m:
            continue
        base = slug(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def broken_links(path: Path, root: Path = ROOT) -> list[str]:
    prose, _ = split_code(path.read_text(encoding="utf-8"))
    bad = []
    for line in prose:
        for target in LINK.findall(INLINE_CODE.sub("", line)):
            if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target):  # https:, mailto:, ...
                continue
            file_part, _, anchor = target.partition("#")
            dest = (path.parent / file_part).resolve() if file_part else path
            if not dest.exists():
                bad.append(f"{path.relative_to(root)}: link to {target}: no such file")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                bad.append(f"{path.relative_to(root)}: link to {target}: no heading '#{anchor}' there")
    return bad


def path_words(text: str) -> list[str]:
    """Words of inline code and code blocks that look like repository paths."""
    prose, code = split_code(text)
    spans = [span for line in prose for _, span in INLINE_CODE.findall(line)] + code
    words = []
    for span in spans:
        for word in span.split():
            word = word.split("=")[-1].strip("\"'(),;:[]{}")  # key=path, quoted, in parentheses, listed
            if "/" not in word or "://" in word:
                continue
            name = word.split("::")[0]
            if not (name.endswith("/") or EXTENSION.search(name)):
                continue
            if name.split("/")[0] in REPO_DIRS:
                words.append(word)
    return words


def missing_paths(path: Path, root: Path = ROOT) -> list[str]:
    bad = []
    for word in path_words(path.read_text(encoding="utf-8")):
        name, *members = word.split("::")
        found = sorted(root.glob(name.rstrip("/"))) if "*" in name else [root / name]
        found = [p for p in found if p.exists() and (p.is_dir() or not name.endswith("/"))]
        if not found:
            bad.append(f"{path.relative_to(root)}: `{word}`: no such file or folder")
        elif members and not all(re.search(rf"\b{re.escape(m)}\b", found[0].read_text(encoding="utf-8"))
                                 for m in members):
            bad.append(f"{path.relative_to(root)}: `{word}`: {'::'.join(members)} not in {name}")
    return bad


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path):
    assert not broken_links(path), "\n".join(broken_links(path))


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_repository_paths_exist(path):
    assert not missing_paths(path), "\n".join(missing_paths(path))


def test_readme_is_a_quick_start():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move depth to docs/"


def test_every_docs_file_is_linked_from_the_readme():
    readme = ROOT / "README.md"
    prose, _ = split_code(readme.read_text(encoding="utf-8"))
    linked = {(readme.parent / t.partition("#")[0]).resolve()
              for line in prose for t in LINK.findall(INLINE_CODE.sub("", line)) if t.partition("#")[0]}
    unlinked = [p.name for p in sorted((ROOT / "docs").glob("*.md")) if p.resolve() not in linked]
    assert not unlinked, f"docs files the README does not link: {unlinked}"


def test_the_checks_catch_what_they_are_for(tmp_path):
    """The checkers themselves: a broken link, a wrong anchor, a missing path, a missing member are reported;
    links into code, URLs, run outputs and good anchors are not."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "eopd_ray").mkdir()
    (tmp_path / "eopd_ray" / "config.py").write_text("def resolve():\n    pass\n")
    (tmp_path / "docs" / "a.md").write_text("# A title\n\n## The `b` part: done\n\n## The `b` part: done\n")
    md = tmp_path / "README.md"
    md.write_text("\n".join([
        "# Top",
        "[ok](docs/a.md) [ok](docs/a.md#the-b-part-done-1) [ok](#top) [web](https://example.org/x.md)",
        "[gone](docs/missing.md) [bad anchor](docs/a.md#nowhere) ![img](docs/none.png)",
        "`eopd_ray/config.py` `eopd_ray/config.py::resolve` `eopd_ray/*.py` `runs/out/x.json` `eopd_ray/`",
        "`eopd_ray/nothing.py` `eopd_ray/config.py::absent` `docs/gone/` `python examples/x.py --out runs/y`",
        "```bash",
        "[not a link](docs/inside-code.md) cat --config=eopd_ray/missing.yaml",
        "```",
    ]) + "\n")
    assert sorted(broken_links(md, tmp_path)) == sorted([
        "README.md: link to docs/missing.md: no such file",
        "README.md: link to docs/a.md#nowhere: no heading '#nowhere' there",
        "README.md: link to docs/none.png: no such file",
    ])
    assert sorted(missing_paths(md, tmp_path)) == sorted([
        "README.md: `eopd_ray/nothing.py`: no such file or folder",
        "README.md: `eopd_ray/config.py::absent`: absent not in eopd_ray/config.py",
        "README.md: `docs/gone/`: no such file or folder",
        "README.md: `examples/x.py`: no such file or folder",
        "README.md: `eopd_ray/missing.yaml`: no such file or folder",
    ])
