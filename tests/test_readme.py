"""The README opens with the two commands users run; CI must run exactly the second one. The README stays short, and
every relative link and anchor in README.md and docs/ resolves."""

from __future__ import annotations

import re
from pathlib import Path

SETUP = "bash infra/setup.sh && "
SETUP_TEST = "bash infra/setup.sh test && "
MAX_README_LINES = 300


def _readme_commands(repo_root) -> list[str]:
    text = (repo_root / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text, re.S)
    assert block and text.index(block.group(0)) < 200, "README must open with its command block"
    return [line.strip() for line in block.group(1).splitlines() if line.strip()]


def test_readme_opens_with_exactly_two_commands(repo_root):
    commands = _readme_commands(repo_root)
    assert len(commands) == 2
    assert all(c.startswith((SETUP, SETUP_TEST)) for c in commands), "both commands must set everything up"
    main_job, tests = commands
    assert main_job.startswith(SETUP) and main_job.endswith("jobs/train.py"), "the first command runs the main job"
    assert tests.startswith(SETUP_TEST) and tests.endswith("-m pytest"), "the second command runs the tests"


def test_ci_runs_the_readme_test_command(repo_root):
    ci = (repo_root / ".ci" / "run").read_text().splitlines()
    assert _readme_commands(repo_root)[1] in [line.strip() for line in ci]


def test_readme_is_at_most_300_lines(repo_root):
    lines = (repo_root / "README.md").read_text().splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines; move details to docs/"


# --- links ---------------------------------------------------------------------------------------------------------

_FENCE = re.compile(r"^\s*(```|~~~)")
_HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_INLINE_CODE = re.compile(r"`[^`]*`")


def _prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks."""
    lines, fenced = [], False
    for line in text.splitlines():
        if _FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(line)
    return lines


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading's text: markup dropped, lowercase, punctuation other than hyphens and underscores
    removed, each space a hyphen."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML
    text = text.replace("`", "").replace("*", "")
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every heading's anchor; a repeated heading gets -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    result = set()
    for line in _prose_lines(text):
        match = _HEADING.match(line)
        if not match:
            continue
        slug = github_slug(match.group(2))
        if slug in seen:
            seen[slug] += 1
            slug = f"{slug}-{seen[slug]}"
        else:
            seen[slug] = 0
        result.add(slug)
    return result


def links(text: str) -> list[str]:
    """Every markdown link target outside code blocks and inline code."""
    found = []
    for line in _prose_lines(text):
        found += _LINK.findall(_INLINE_CODE.sub("", line))
    return found


def _markdown_files(repo_root: Path) -> list[Path]:
    return [repo_root / "README.md", *sorted((repo_root / "docs").rglob("*.md"))]


def test_github_slug_rules():
    assert github_slug("Large images (`jobs/benchmark_large_images.py`)") == "large-images-jobsbenchmark_large_imagespy"
    assert github_slug("The `datprl` namespace: why `platform/` has no `__init__.py`") == (
        "the-datprl-namespace-why-platform-has-no-__init__py"
    )
    assert anchors("# A\n## Notes\n```\n# not a heading\n```\n## Notes\n## Notes\n") == {
        "a",
        "notes",
        "notes-1",
        "notes-2",
    }
    assert links("[a](b.md#c) `[x](y)` ![i](img.png) [w](https://example.com)") == [
        "b.md#c",
        "img.png",
        "https://example.com",
    ]


def test_every_relative_link_and_anchor_resolves(repo_root):
    files = _markdown_files(repo_root)
    assert (repo_root / "docs" / "README.md") in files, "docs/README.md indexes the documentation"
    broken = []
    for path in files:
        own = path.read_text()
        for target in links(own):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # https:, mailto: ...
                continue
            file_part, _, anchor = target.partition("#")
            resolved = (path.parent / file_part).resolve() if file_part else path
            where = f"{path.relative_to(repo_root)}: {target}"
            if not resolved.exists():
                broken.append(f"{where} (no such file)")
                continue
            if anchor and resolved.suffix == ".md" and resolved.is_file():
                if anchor not in anchors(resolved.read_text()):
                    broken.append(f"{where} (no heading with anchor #{anchor})")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_docs_index_links_every_page(repo_root):
    docs = repo_root / "docs"
    linked = {(docs / link.partition("#")[0]).resolve() for link in links((docs / "README.md").read_text())}
    pages = {page.resolve() for page in docs.rglob("*.md") if page.name != "README.md" or page.parent != docs}
    missing = sorted(str(page.relative_to(docs.resolve())) for page in pages - linked)
    assert not missing, f"docs/README.md does not link: {missing}"
