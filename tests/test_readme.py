"""The README opens with the two commands users run; CI must run exactly the second one."""

from __future__ import annotations

import re


def _readme_commands(repo_root) -> list[str]:
    text = (repo_root / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text, re.S)
    assert block and text.index(block.group(0)) < 200, "README must open with its command block"
    return [line.strip() for line in block.group(1).splitlines() if line.strip()]


def test_readme_opens_with_exactly_two_commands(repo_root):
    commands = _readme_commands(repo_root)
    assert len(commands) == 2
    assert all(c.startswith("bash infra/setup.sh && ") for c in commands), "both commands must set everything up"


def test_ci_runs_the_readme_test_command(repo_root):
    ci = (repo_root / ".ci" / "run").read_text().splitlines()
    assert _readme_commands(repo_root)[1] in [line.strip() for line in ci]
