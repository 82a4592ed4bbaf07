"""The GPU check on a lent GPU machine (infra/gpu-check-device.md): that machine's python has no Ray, webdataset or s3fs
unless they are carried, so the model and serving steps must run without them (they run even when Ray's wheel is left
behind); the folder links that make the project importable there follow pyproject.toml's package-dir; the scripts of
the recipe parse, and what they carry stays out of git."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CPU_YAML = REPO / "infra" / "gpu-check-cpu.yaml"
ABSENT = ("ray", "webdataset", "s3fs")

# Installed first on sys.meta_path of every process of the run (the check's steps inherit PYTHONPATH): an import of one
# of ABSENT fails as on a machine without it, and is written to BLOCKED_LOG with where it came from.
BLOCKER = f"""
import os
import sys
import traceback

ABSENT = {ABSENT!r}


class _Absent:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] not in ABSENT:
            return None
        with open(os.environ["BLOCKED_LOG"], "a") as log:
            log.write(f"{{os.getpid()}} imported {{name}}:\\n" + "".join(traceback.format_stack(limit=12)) + "\\n")
        raise ModuleNotFoundError(f"No module named {{name!r}} (blocked by the test)", name=name)


sys.meta_path.insert(0, _Absent())
"""

PROBE = """
import importlib
import sys

for name in sys.argv[1:]:
    try:
        importlib.import_module(name)
    except ModuleNotFoundError:
        print(name, "absent")
"""

TINY = [
    "model.variants=[paper_tiny]",
    "model.size=16",
    "model.batch=1",
    "model.dtypes=[fp32]",
    "model.compile=false",
    "model.channels_last=[false]",
    "serving.sizes=[16]",
    "serving.batches=[1]",
    "serving.requests=2",
    "serving.batch_iters=1",
]


def _blocked_env(tmp_path: Path) -> tuple[dict[str, str], Path]:
    site = tmp_path / "blocker"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCKER)
    log = tmp_path / "blocked.log"
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, "BLOCKED_LOG": str(log), "CUDA_VISIBLE_DEVICES": ""}, log


def test_model_and_serving_steps_run_without_ray_webdataset_and_s3fs(tmp_path):
    env, log = _blocked_env(tmp_path)
    # the blocker works: these are installed here, and a blocked process cannot import them
    done = subprocess.run([sys.executable, "-c", PROBE, *ABSENT], env=env, capture_output=True, text=True, timeout=60)
    assert done.stdout.split() == [word for name in ABSENT for word in (name, "absent")], done.stdout + done.stderr
    log.unlink()

    out = tmp_path / "out"
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "jobs" / "gpu_check.py"),
            str(CPU_YAML),
            f"out_dir={out}",
            "steps=[model,serving]",
            *TINY,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    steps = json.loads((out / "gpu-check.json").read_text())["steps"]
    assert done.returncode == 0, {name: s["error"] for name, s in steps.items()}
    assert {name: s["status"] for name, s in steps.items()} == {"model": "ok", "serving": "ok"}
    assert [r["status"] for r in steps["model"]["data"]["rows"]] == ["ok", "ok"]  # train and inference
    assert steps["serving"]["data"]["sizes"][0]["latency"]["p50_ms"] > 0
    # not even tried, by the check's parent process or by a step's
    assert not log.exists(), log.read_text()


def test_device_links_follow_the_package_dirs_of_pyproject():
    tomllib = pytest.importorskip("tomllib", reason="the standard library reads TOML from Python 3.11")
    mapping = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    script = (REPO / "infra" / "gpu-device-env.sh").read_text()
    linked = re.search(r"for gpu_dir in ([\w ]+); do", script).group(1).split()
    assert sorted(f"datprl.{folder}" for folder in linked) == sorted(mapping)
    assert all(mapping[f"datprl.{folder}"] == folder for folder in linked)


@pytest.mark.parametrize("script", ["gpu-wheels.sh", "gpu-device-env.sh", "gpu-check-device.sh"])
def test_recipe_scripts_parse(script):
    done = subprocess.run(["bash", "-n", str(REPO / "infra" / script)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr


def test_device_wrapper_usage_and_the_carried_folder_is_ignored():
    done = subprocess.run(
        ["bash", str(REPO / "infra" / "gpu-check-device.sh")], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 2 and done.stderr.startswith("usage: bash infra/gpu-check-device.sh OUT")
    if (REPO / ".git").exists():
        ignored = subprocess.run(["git", "check-ignore", "-q", ".gpu/whl/ray.whl"], cwd=REPO, timeout=30)
        assert ignored.returncode == 0, ".gpu/ must be ignored: it travels only when a device call carries it"
