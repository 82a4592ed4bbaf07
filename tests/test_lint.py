"""The linter and the formatter: CI runs `ruff check .` and `ruff format --check .` over the whole tree after setting
up and before the tests, and the rules in pyproject.toml catch what they promise (undefined names, unused imports,
lines over 120) on a file written here."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


def _ruff() -> Path:
    ruff = Path(sys.executable).parent / "ruff"
    if not ruff.exists():
        pytest.fail(f"{ruff} is missing: ruff comes with the dev extra, run `bash infra/setup.sh`")
    return ruff


def test_ci_lints_after_setup_and_before_the_tests(repo_root):
    lines = [line.strip() for line in (repo_root / ".ci" / "run").read_text().splitlines()]
    setup, lint = lines.index("bash infra/setup.sh test"), lines.index(".venv/bin/ruff check .")
    fmt = lines.index(".venv/bin/ruff format --check .")  # the whole tree, no per-file list
    tests = lines.index("bash infra/setup.sh test && .venv/bin/python -m pytest")
    assert setup < lint < tests and setup < fmt < tests
    tomllib = pytest.importorskip("tomllib", reason="the standard library reads TOML from Python 3.11")
    project = tomllib.loads((repo_root / "pyproject.toml").read_text())
    assert any(dep.startswith("ruff") for dep in project["project"]["optional-dependencies"]["dev"])
    ruff = project["tool"]["ruff"]
    assert ruff["line-length"] == 120 and ruff["target-version"] == "py310" and "F" in ruff["lint"]["select"]


def test_rules_catch_undefined_names_unused_imports_and_long_lines(repo_root, tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import os\n"  # F401: unused import
        "\n"
        "\n"
        "def f():\n"
        "    return undefined_name\n"  # F821: undefined name
        "\n"
        "\n"
        f"X = '{'a' * 114}'\n"  # 120 characters: allowed
        f"Y = '{'a' * 115}'\n"  # 121 characters: E501
    )
    job = subprocess.run(
        [
            str(_ruff()),
            "check",
            "--no-cache",
            "--config",
            str(repo_root / "pyproject.toml"),
            "--output-format",
            "concise",
            str(sample),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    found = {
        (int(line.split(":")[1]), line.split(": ")[1].split()[0])
        for line in job.stdout.splitlines()
        if line.startswith(str(sample))
    }
    assert job.returncode == 1 and found == {(1, "F401"), (5, "F821"), (9, "E501")}, job.stdout + job.stderr
