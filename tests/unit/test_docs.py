"""The documentation a newcomer reads: a short README, links that lead somewhere, a changelog."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
MAX_README_BYTES = 20 * 1024

# [text](target) and ![alt](target), with an optional "title"; reference-style definitions.
_INLINE = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_DEFINITION = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s.*)?$", re.MULTILINE)
_FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
_CODE_SPAN = re.compile(r"`[^`\n]*`")
_EXTERNAL = re.compile(r"^(?:[a-z][a-z0-9+.-]*:|//)", re.IGNORECASE)  # http:, https:, mailto:


def relative_links(markdown: str) -> list[str]:
    """Relative link targets of `markdown`, without #anchors; code is not markdown."""
    text = _CODE_SPAN.sub("", _FENCE.sub("", markdown))
    targets = _INLINE.findall(text) + _DEFINITION.findall(text)
    paths = (target.split("#", 1)[0] for target in targets if not _EXTERNAL.match(target))
    return [path for path in paths if path]


def doc_files() -> list[Path]:
    return [README, *sorted((ROOT / "docs").glob("*.md"))]


def test_readme_is_at_most_20_kib() -> None:
    size = README.stat().st_size
    assert size <= MAX_README_BYTES, f"README.md is {size} bytes; move reference to docs/"


def test_docs_dir_has_pages() -> None:
    assert len(doc_files()) > 1


@pytest.mark.parametrize("page", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page: Path) -> None:
    missing = [
        link
        for link in relative_links(page.read_text(encoding="utf-8"))
        if not (page.parent / link).exists()
    ]
    assert not missing, f"{page.relative_to(ROOT)} links to missing paths: {missing}"


def test_changelog_has_the_pyproject_version() -> None:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"][
        "version"
    ]
    changelog = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    assert re.search(rf"^## \[{re.escape(version)}\]", changelog, re.MULTILINE), (
        f"CHANGELOG.md has no section for version {version} of pyproject.toml"
    )


@pytest.mark.parametrize(
    ("markdown", "expected"),
    [
        ("see [a](docs/a.md) and ![chart](bench/x.png)", ["docs/a.md", "bench/x.png"]),
        ('[a](a.md#part) [b](#local) [c](b.md "title")', ["a.md", "b.md"]),
        ("[w](https://x.org/a.md) [m](mailto:a@b.c) [h](http://x)", []),
        ("`[not](a link)`\n```\n[nor](this.md)\n```\n[ref]: docs/ref.md", ["docs/ref.md"]),
    ],
)
def test_link_extraction(markdown: str, expected: list[str]) -> None:
    assert relative_links(markdown) == expected
