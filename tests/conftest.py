"""Shared fixtures: the repository root and one in-process local Ray instance per test session."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import NamedTuple

import pytest

from datprl.platform.runtime import loopback_only

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"
# The published network's layout and a tiny fixture (docs/testing.md).
OFFICIAL_CHECKPOINT = FIXTURES / "official-checkpoint"

# Ray must only ever talk to loopback in tests (single node): with this, a local Ray binds every port to 127.0.0.1.
loopback_only()
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")

# The whole run's budget: CI allows 90 minutes for set-up and tests, and the default suite takes about 25 on 2 cores.
# Past the budget the run stops with the failures so far (a machine that is starved of memory, disk or CPU otherwise
# runs into CI's own limit and prints nothing). DATPRL_TEST_BUDGET_S raises it for long local runs (-m slow).
TEST_BUDGET_S = float(os.environ.get("DATPRL_TEST_BUDGET_S", "3600"))
_SESSION_START = time.monotonic()


def machine_resources(path: str = "/tmp") -> str:
    """CPUs, available memory and free disk under ``path``: printed in the test header, so a CI log shows what the
    machine had when its tests fail for want of one of them."""
    import shutil

    memory = "?"
    try:
        with open("/proc/meminfo") as meminfo:
            fields = dict(line.split(":", 1) for line in meminfo)
        memory = f"{int(fields['MemAvailable'].split()[0]) / 2**20:.1f} GiB"
    except (OSError, KeyError, ValueError):
        pass
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    free = shutil.disk_usage(path).free / 2**30
    return f"machine: {cpus} CPUs, {memory} memory available, {free:.1f} GiB free disk under {path}"


def pytest_report_header(config):
    return [machine_resources(), f"run budget: {TEST_BUDGET_S:.0f} s (DATPRL_TEST_BUDGET_S)"]


def pytest_runtest_setup(item):
    elapsed = time.monotonic() - _SESSION_START
    if elapsed > TEST_BUDGET_S:
        pytest.exit(
            f"the test run passed its budget of {TEST_BUDGET_S:.0f} s after {elapsed:.0f} s, before {item.nodeid}; "
            f"{machine_resources()}. The default suite takes about 25 minutes on 2 cores: look for a starved machine "
            "or a slow test above, or set DATPRL_TEST_BUDGET_S for a longer run",
            returncode=1,
        )


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def ray_local():
    """A small local Ray (2 CPUs, 256 MiB object store, dashboard on a free loopback port), shut down after the
    session."""
    import ray

    if not ray.is_initialized():
        start_local_ray()
    yield ray
    ray.shutdown()


def start_local_ray(runtime_env: dict | None = None, num_cpus: int = 2):
    """The test session's Ray: 2 CPUs (``num_cpus`` logical ones for a test that needs more), 256 MiB object store,
    dashboard on a free loopback port, as :func:`datprl.platform.runtime.init_ray` starts every local Ray (tests
    that restart Ray use it too)."""
    from datprl.platform.runtime import SMALL_OBJECT_STORE_BYTES, LocalRaySettings, init_ray

    local = LocalRaySettings(num_cpus=num_cpus, object_store_bytes=SMALL_OBJECT_STORE_BYTES, log_to_driver=False)
    return init_ray(local=local, runtime_env=runtime_env)


@pytest.fixture(scope="session")
def s3_server():
    """An in-process S3 API (moto) on 127.0.0.1 with dummy credentials in the environment; yields its endpoint URL.

    Buckets must be created by the test (e.g. with boto3: s3fs's mkdir sends a LocationConstraint that moto rejects
    for us-east-1)."""
    from moto.server import ThreadedMotoServer

    with pytest.MonkeyPatch.context() as mp:
        for name, value in {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_SESSION_TOKEN": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }.items():
            mp.setenv(name, value)
        for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
            mp.delenv(name, raising=False)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        try:
            yield f"http://{host}:{port}"
        finally:
            server.stop()


TINY_TASKS = [("natural", "sr_x4"), ("remote_sensing", "haze"), ("medical", "ct_low_dose")]


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """:func:`write_tiny_dataset` once per session (the benchmarks' end-to-end tests only read it)."""
    return write_tiny_dataset(tmp_path_factory.mktemp("bench") / "tiny")


def write_tiny_dataset(root: Path) -> Path:
    """Three tasks x 4 train samples of 40x40 pixels in one shard (RGB 8-bit and 12-bit grey stored as 16-bit):
    the smallest dataset the benchmarks' end-to-end tests run on."""
    import numpy as np

    from datprl.platform.data.shards import DatasetWriter
    from datprl.platform.data.format import SampleRecord

    rng = np.random.default_rng(0)
    with DatasetWriter(str(root), "tiny", max_samples_per_shard=16, command=["test"], package_versions={}) as writer:
        for i in range(4):
            for domain, task in TINY_TASKS:
                grey = domain == "medical"
                shape, dtype, high = ((40, 40), np.uint16, 4096) if grey else ((40, 40, 3), np.uint8, 256)
                gt, lq = (rng.integers(0, high, shape).astype(dtype) for _ in range(2))
                record = SampleRecord(
                    key=f"{task}-{i}",
                    domain=domain,
                    task=task,
                    split="train",
                    source_id=f"src{i}",
                    source_package="test",
                    degradation={"seed": i},
                    seed=i,
                    bit_depth=16 if grey else 8,
                    channels=1 if grey else 3,
                    height=40,
                    width=40,
                    white_level=4095 if grey else None,
                )
                writer.write(record, lq, gt)
    return root


def damage_member(shard: Path, name: str) -> None:
    """Rewrite the tar ``shard`` with member ``name`` replaced by bytes that are not a PNG."""
    import io
    import tarfile

    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for info, data in members:
            data = b"\x89PNG garbage" if info.name == name else data
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    shard.write_bytes(buffer.getvalue())


class ProcessInfo(NamedTuple):
    """One process as /proc tells it."""

    ppid: int
    session: int
    state: str  # "Z": a zombie (exited, only its exit status is left)
    started: int  # clock ticks after boot: with the pid, tells a process from a later one that reuses its pid
    name: str


def process_table() -> dict[int, ProcessInfo]:
    """pid -> :class:`ProcessInfo` of every process, from /proc (Linux)."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) ": state ppid pgrp session ... starttime
        table[int(entry)] = ProcessInfo(int(fields[1]), int(fields[3]), fields[0], int(fields[19]), name)
    return table


def session_processes(session: int, table: dict[int, ProcessInfo] | None = None) -> set[int]:
    """Every process of ``session`` and every descendant of one (a job started with ``start_new_session`` has a
    session of its own), this test process excluded; ``table``: a :func:`process_table` already read."""
    table = process_table() if table is None else table
    found = {pid for pid, info in table.items() if info.session == session}
    grew = True
    while grew:
        children = {pid for pid, info in table.items() if info.ppid in found} - found
        found |= children
        grew = bool(children)
    found.discard(os.getpid())
    return found


def stop_session(session: int, term_grace: float, kill_grace: float = 10) -> list[str]:
    """Stop every process of ``session`` (see :func:`session_processes`): SIGTERM, SIGKILL to what is left after
    ``term_grace`` seconds, then assert that none is left after ``kill_grace`` more. Returns the names of the processes
    that outlived SIGTERM. Only that session is touched: other Ray instances on the machine keep running."""
    outlived: list[str] = []
    for sig, grace in ((signal.SIGTERM, term_grace), (signal.SIGKILL, kill_grace)):
        for pid in session_processes(session):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while session_processes(session) and time.monotonic() < deadline:
            time.sleep(0.2)
        if sig == signal.SIGTERM:
            table = process_table()
            outlived = sorted(table[p].name for p in session_processes(session, table))
    left = session_processes(session)
    assert not left, f"processes of session {session} survived SIGKILL: {sorted(left)}"
    return outlived
