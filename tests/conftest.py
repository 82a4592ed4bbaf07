"""Shared fixtures: the repository root and one in-process local Ray instance per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"
OFFICIAL_CHECKPOINT = FIXTURES / "official-checkpoint"  # copied from the shared reference (see its README)

# Ray must only ever talk to loopback in tests (single node; see ray-stack-facts.md).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def ray_local():
    """A small local Ray (2 CPUs, 256 MiB object store, no dashboard), shut down after the session."""
    import ray

    if not ray.is_initialized():
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            object_store_memory=256 * 1024**2,
            log_to_driver=False,
            configure_logging=False,
        )
    yield ray
    ray.shutdown()
