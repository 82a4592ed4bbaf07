"""Python's own `platform` module must never be shadowed by our `platform/` folder, and our code imports as datprl.*."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

STDLIB = Path(sysconfig.get_paths()["stdlib"]).resolve()
PROBE = "import platform, json; print(json.dumps([platform.system(), platform.machine(), platform.__file__]))"


def _assert_stdlib(module_file: str) -> None:
    assert Path(module_file).resolve().parent == STDLIB, f"'platform' resolved to {module_file}, not the stdlib"


def test_no_package_marker_in_platform_folder(repo_root):
    # The trap: platform/__init__.py makes the folder a regular package that wins over the stdlib module.
    assert not (repo_root / "platform" / "__init__.py").exists()


@pytest.mark.parametrize("how", ["cwd", "pythonpath"])
def test_stdlib_platform_from_repo_root(repo_root, how):
    """(a) a Python process started in the repo root: the root is first on sys.path ('' for -c, or PYTHONPATH)."""
    import json
    import os

    env = dict(os.environ)
    if how == "pythonpath":
        env["PYTHONPATH"] = str(repo_root)
    out = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=repo_root, env=env, capture_output=True, text=True, timeout=60, check=True
    ).stdout
    system, machine, module_file = json.loads(out)
    assert system and machine
    _assert_stdlib(module_file)


def test_stdlib_platform_inside_pytest():
    """(b) inside this pytest process (rootdir and tests/ on sys.path)."""
    import platform

    assert platform.system()
    _assert_stdlib(platform.__file__)
    from datprl.platform import config

    assert Path(config.__file__).parent.name == "platform"


def test_datprl_namespace_imports(repo_root):
    import datprl.models
    import datprl.platform.evaluation.metrics

    assert Path(datprl.models.__file__).resolve().parent == repo_root / "models"
    assert Path(datprl.platform.evaluation.metrics.__file__).resolve().parent == repo_root / "platform" / "evaluation"


@pytest.mark.ray
@pytest.mark.e2e
def test_stdlib_platform_in_ray_task_with_repo_working_dir(repo_root):
    """(c) in a Ray worker whose runtime working_dir is the repository (the worker's cwd and sys.path hold it)."""
    import ray

    from conftest import start_local_ray

    # A working_dir upload is only possible for the whole job (ray.init), so restart Ray around this test and give
    # the session's Ray back afterwards.
    was_running = ray.is_initialized()
    ray.shutdown()
    start_local_ray(
        runtime_env={"working_dir": str(repo_root), "excludes": [".venv", ".git", "outputs", "runs", "data"]}
    )
    try:

        @ray.remote
        def probe():
            import os
            import sys

            import platform

            import datprl.models  # our code still imports under its namespace inside the worker

            return platform.system(), platform.__file__, os.getcwd(), sys.path[:3], datprl.models.__name__

        system, module_file, cwd, path_head, name = ray.get(probe.remote(), timeout=120)
    finally:
        ray.shutdown()
        if was_running:
            start_local_ray()
    assert system
    _assert_stdlib(module_file)
    # the worker really runs inside an uploaded copy of the repo
    assert (Path(cwd) / "platform").is_dir() and Path(cwd) != repo_root
    assert name == "datprl.models"
