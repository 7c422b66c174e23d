"""Every relative link in README.md and docs/**/*.md points to an existing file, and its #anchor to a heading.

Anchors follow GitHub's heading slugs (the same ones mkdocs.yml asks of the site). A docs page may not link outside
docs/: mkdocs cannot serve it, so source files are named as code spans (`engine/x.py`) instead. This runs without
mkdocs; CI also builds the site with `mkdocs build --strict`.
"""

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]

_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,}).*?^ {0,3}\1[`~]*[ \t]*$", re.M | re.S)
_CODE_SPAN = re.compile(r"(`+)(?!`).+?(?<!`)\1(?!`)", re.S)
_INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+[\"'(][^)]*)?\)")
_REF_DEF = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s.*)?$", re.M)
_HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.*?)[ \t]*#*[ \t]*$", re.M)
_EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.I)  # http:, https:, mailto:, ...


def _prose(text: str) -> str:
    """The text without fenced code blocks (kept as blank lines, so line numbers stay) and code spans."""
    text = _FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    return _CODE_SPAN.sub(lambda m: " " * len(m.group(0)), text)


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading: the rendered text lowercased, punctuation dropped, each space a hyphen."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # [text](url) -> text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML tags
    text = text.replace("`", "").replace("*", "")
    text = re.sub(r"(?<!\w)_+|_+(?!\w)", "", text)  # _emphasis_ markers, not snake_case
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for m in _HEADING.finditer(_FENCE.sub("", page.read_text(encoding="utf-8"))):
        slug = github_slug(m.group(2))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def links(page: Path) -> list[tuple[int, str]]:
    text = _prose(page.read_text(encoding="utf-8"))
    found = [m for rx in (_INLINE_LINK, _REF_DEF) for m in rx.finditer(text)]
    return sorted((text.count("\n", 0, m.start()) + 1, m.group(1)) for m in found)


def broken_links(page: Path, root: Path = ROOT, docs: Path = DOCS) -> list[str]:
    problems = []
    where = page.relative_to(root)
    for line, target in links(page):
        if not target or _EXTERNAL.match(target) or target.startswith("//"):
            continue
        path, _, anchor = unquote(target).partition("#")
        dest = (page.parent / path).resolve() if path else page
        if path.startswith("/"):
            problems.append(f"{where}:{line}: {target}: absolute path; use a relative link")
        elif not dest.exists():
            problems.append(f"{where}:{line}: {target}: no such file")
        elif page.is_relative_to(docs) and not dest.is_relative_to(docs):
            problems.append(f"{where}:{line}: {target}: outside docs/, which the docs site cannot serve; "
                            "name the file as a code span instead")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            problems.append(f"{where}:{line}: {target}: no heading #{anchor} in {dest.relative_to(root)}")
    return problems


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    assert broken_links(page) == []


def test_readme_links_into_docs():
    assert any(t.startswith("docs/") for _, t in links(ROOT / "README.md"))


@pytest.mark.parametrize("heading, slug", [
    ("Throughput: the pipeline bench (`everyprompt-bench pipeline`)",
     "throughput-the-pipeline-bench-everyprompt-bench-pipeline"),
    ("To add X, touch these files", "to-add-x-touch-these-files"),
    ("A -- B", "a----b"),
    ("`train.max_staleness` and *why*", "trainmax_staleness-and-why"),
    ("[Links](x.md) & HTML <b>tags</b>", "links--html-tags"),
])
def test_github_slug(heading, slug):
    assert github_slug(heading) == slug


def test_checker_catches_breakage(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (tmp_path / "engine.py").write_text("")
    (docs / "a.md").write_text("# Top\n## Two words\n```\n[in code](nope.md)\n```\n")
    (docs / "b.md").write_text("[ok](a.md#two-words) `[span](nope.md)` [web](https://x.org)\n"
                               "[gone](c.md)\n[bad anchor](a.md#three)\n[out](../engine.py)\n[self](#nothing)\n")
    assert broken_links(docs / "a.md", tmp_path, docs) == []
    assert [p.split(": ")[1] for p in broken_links(docs / "b.md", tmp_path, docs)] == [
        "c.md", "a.md#three", "../engine.py", "#nothing"]
