"""What the network, data and training benchmarks share: their dataset field and its default corpus, the local Ray
they start, the probe of Ray's worker settings, option checks and the JSON report."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator

from datprl.platform.runtime import SMALL_OBJECT_STORE_BYTES, LocalRaySettings, init_ray
from datprl.platform.storage import atomic_write_bytes

__all__ = ["LocalDataset", "known_variants", "ensure_dataset", "start_ray", "ray_worker_settings", "save_report"]


def _local_folder(value: str) -> str:
    if "://" in value:
        raise ValueError("the benchmarks read a local dataset folder (their baselines open shards as local files)")
    return value


LocalDataset = Annotated[str, AfterValidator(_local_folder)]
"""A dataset field of the benchmarks' configs: a local folder, not a URL."""


def known_variants(value: list[str]) -> list[str]:
    """A benchmark config's variant names, checked against the model registry (the error lists the known ones)."""
    from datprl.models.factory import VARIANTS  # the registry only: no torch work at config time

    unknown = [v for v in value if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variants {unknown}; choose from: {', '.join(VARIANTS)}")
    return value


def ensure_dataset(path: str, job: str) -> bool:
    """Build the default corpus at ``path`` unless it holds a manifest; the manifest records ``job`` and the
    ``dataset=`` option as the command that built it. Returns True when it built one."""
    from datprl.platform.data.build import ensure_dataset as ensure  # the builder's imports are heavy: only when used

    return ensure(path, command=[job, f"dataset={path}"])


def start_ray(
    cpus: int, niceness: int | None, dashboard: bool = False, object_store_bytes: int = SMALL_OBJECT_STORE_BYTES
) -> tuple[bool, int, float]:
    """Start the local Ray a benchmark runs on (``cpus`` CPUs, Ray's workers at OS niceness ``niceness``, None =
    Ray's default) and return (started here, CPUs Ray has, seconds to start). An already running Ray (tests) is used
    as it is."""
    import ray

    start = time.perf_counter()
    session = init_ray(
        local=LocalRaySettings(
            num_cpus=cpus,
            object_store_bytes=object_store_bytes,
            dashboard=dashboard,
            log_to_driver=False,
            worker_niceness=niceness,
        )
    )
    return session.started_here, int(ray.cluster_resources().get("CPU", cpus)), time.perf_counter() - start


def ray_worker_settings() -> dict[str, Any]:
    """Niceness and OMP_WAIT_POLICY of a Ray worker, read inside one (every worker is started the same way)."""
    import ray

    probe = ray.remote(num_cpus=0)(lambda: (os.nice(0), os.environ.get("OMP_WAIT_POLICY", "default")))
    niceness, policy = ray.get(probe.remote())
    return {"niceness": niceness, "omp_wait_policy": policy}


def set_omp_wait_policy(policy: str | None) -> str:
    """Put ``policy`` in this process's environment, where libgomp reads it when torch is first imported (and the
    workers of a Ray started afterwards inherit it); returns the policy this process's torch runs with. When torch is
    already imported and the environment already holds ``policy`` (a parent process set it, as the GPU check does),
    torch read that value."""
    imported = "torch" in sys.modules
    if policy is not None and not imported:
        os.environ["OMP_WAIT_POLICY"] = policy
    current = os.environ.get("OMP_WAIT_POLICY", "default")
    late = imported and policy is not None and current != policy
    return f"{current} (torch was imported before the benchmark set it)" if late else current


def warn_if_busy(load: dict[str, Any], consequence: str) -> None:
    """Print a warning when the load average before or after a benchmark (``load["before"]``/``["after"]``, as
    :func:`os.getloadavg` gives them) exceeded the CPUs: other work then competed with the timed sides;
    ``consequence`` says what that makes unreliable."""
    busy = max(load["before"][0], load["after"][0])
    if busy > (os.cpu_count() or 1):
        print(f"warning: load average {busy:.1f} on {os.cpu_count()} CPUs: other work competes with {consequence}")


def save_report(report: dict[str, Any], path: Path | None) -> None:
    """Write a benchmark's JSON-ready results to ``path`` (atomically) and say so; nothing when ``path`` is None."""
    if path is None:
        return
    atomic_write_bytes(path, (json.dumps(report, indent=2) + "\n").encode("utf-8"))
    print(f"results written to {path}")
