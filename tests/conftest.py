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

# Each tier's budget: CI allows 90 minutes for set-up and the three tiers, and each tier takes well under 20 minutes on
# 2 cores (docs/testing.md). Past the budget the run stops with the failures so far (a machine that is starved of
# memory, disk or CPU otherwise runs into CI's own limit and prints nothing). DATPRL_TEST_BUDGET_S raises it.
TEST_BUDGET_S = float(os.environ.get("DATPRL_TEST_BUDGET_S", "1800"))
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
            f"{machine_resources()}. A tier takes well under 20 minutes on 2 cores: look for a starved machine "
            "or a slow test above, or set DATPRL_TEST_BUDGET_S for a longer run",
            returncode=1,
        )


@pytest.fixture(scope="module")
def single_torch_thread():
    """One intra-op torch thread for a module's tests (``pytestmark = pytest.mark.usefixtures(...)``), restored after:
    the tiny networks' ops are far too small to gain from threads, and on a shared 2-core machine the thread pool's
    contention made them ~30x slower (3.7 s vs 0.1 s per forward)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def forbid_ray(monkeypatch, *modules, message: str = "Ray must not start") -> None:
    """Make ``ray_session`` and ``init_ray`` of each module fail the test: for checks that a job stops before Ray
    starts (a bad config, a mismatched checkpoint)."""

    def no_ray(*args, **kwargs):
        raise AssertionError(message)

    for module in modules:
        monkeypatch.setattr(module, "ray_session", no_ray)
        monkeypatch.setattr(module, "init_ray", no_ray)


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


# The embedded default corpus at a small size (64-pixel tiles, one per source, two sources per group): every group,
# domain and task of the default corpus, built in about 20 s.
SMALL_CORPUS = dict(tile=64, max_tiles_per_source=1, max_sources_per_group=2, contact_sheet=False)


def small_corpus(destination: Path, **overrides) -> Path:
    """A copy at ``destination`` of the default corpus built with :data:`SMALL_CORPUS` (and ``overrides``, fields of
    :class:`~datprl.platform.data.build.BuildConfig`). The build is cached by content: its key hashes the settings, the
    data code (``platform/data/*.py``) and the fetched data packages' folders, so every module and every test tier
    (each a pytest session) of a run shares one build, and a change to the data code builds it anew. The cache is
    ``$DATPRL_TEST_CACHE`` or ``~/.cache/datprl/test-corpus``; each caller gets its own copy, free to add to (priors,
    runs) without touching another's."""
    import contextlib
    import hashlib
    import importlib.metadata
    import json
    import shutil
    import tempfile

    from datprl.platform.data.build import BuildConfig, build
    from datprl.platform.data.packages import cache_dir

    settings = {**SMALL_CORPUS, **overrides}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for source in sorted((REPO_ROOT / "platform" / "data").glob("*.py")):
        digest.update(source.name.encode() + source.read_bytes())
    packages = cache_dir()  # data packages: their folders name package and version
    digest.update("\n".join(sorted(p.name for p in packages.iterdir()) if packages.is_dir() else []).encode())
    # Python packages whose images or code make up the corpus: an upgrade builds it anew.
    for name in ("numpy", "scikit-image", "pillow", "pydicom", "pydicom-data", "nilearn", "rasterio", "scipy"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            digest.update(f"{name}=={importlib.metadata.version(name)}".encode())
    cache = Path(os.environ.get("DATPRL_TEST_CACHE") or Path.home() / ".cache" / "datprl" / "test-corpus")
    built = cache / digest.hexdigest()[:16]
    if not (built / "manifest.json").is_file():
        cache.mkdir(parents=True, exist_ok=True)
        # Built aside and renamed into place: a run killed mid-build leaves no half corpus under the key.
        staging = Path(tempfile.mkdtemp(prefix=".build-", dir=cache))
        try:
            build(BuildConfig(output=str(staging / "default"), **settings), command=["tests", "small_corpus"])
            with contextlib.suppress(OSError):  # OSError: another session put the same build there first
                (staging / "default").rename(built)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(built, destination)
    return destination


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


def running_in_session(session: int, table: dict[int, ProcessInfo] | None = None) -> set[int]:
    """:func:`session_processes` that still run: zombies (exited, waiting to be reaped) left out."""
    table = process_table() if table is None else table
    return {pid for pid in session_processes(session, table) if table[pid].state != "Z"}


def stop_session(
    session: int, term_grace: float, kill_grace: float = 10, first: signal.Signals | None = signal.SIGTERM
) -> list[str]:
    """Stop every process of ``session`` (see :func:`session_processes`): ``first`` (SIGTERM; None: no signal, the
    processes end on their own), SIGKILL to what is left after ``term_grace`` seconds, then assert that none is left
    after ``kill_grace`` more. Returns the names of the processes that outlived the first ``term_grace`` seconds.
    Zombies count as ended (only their exit status is left). Only that session is touched: other Ray instances on the
    machine keep running."""

    def send(sig: signal.Signals, pids: set[int]) -> None:
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    if first is not None:
        send(first, running_in_session(session))
    deadline = time.monotonic() + term_grace
    while running_in_session(session) and time.monotonic() < deadline:
        time.sleep(0.2)
    table = process_table()  # one snapshot at a time: a process may exit between two reads of /proc
    outlived = sorted(table[pid].name for pid in running_in_session(session, table))
    deadline = time.monotonic() + kill_grace
    while (left := running_in_session(session, table)) and time.monotonic() < deadline:
        send(signal.SIGKILL, left)  # each round: a process forked just before its parent was killed is killed too
        time.sleep(0.2)
        table = process_table()
    left = running_in_session(session, table)
    described = ", ".join(f"{pid} {table[pid].name} ({table[pid].state})" for pid in sorted(left))
    assert not left, f"processes of session {session} survived SIGKILL: {described}"
    return outlived


def ray_cli(name: str) -> list[str]:
    """The command line of Ray's console script ``name`` (``ray``, ``serve``): next to this interpreter first, else on
    PATH. A Python script is run by this interpreter, not by its shebang's: every process of a head runs the Python
    that ran `ray start`, and this one's editable install is this checkout's datprl."""
    import shutil
    import sys

    beside = Path(sys.executable).parent / name
    path = str(beside) if beside.exists() else shutil.which(name)
    if path is None:
        pytest.skip(f"no `{name}` command next to {sys.executable} or on PATH")
    with open(path, "rb") as f:
        first = f.readline()
    return [sys.executable, path] if first.startswith(b"#!") and b"python" in first else [path]


class RayHead:
    """A Ray head node of a test's own: `ray start --head` on free loopback ports with token auth on (a fresh token of
    its own, never ~/.ray/auth_token), in a temp dir of its own, started in a session of its own (setsid) and stopped
    by :func:`stop_session` on exactly that session's processes (never `ray stop`, which stops every Ray on the
    machine). It never touches the test session's in-process Ray. A context manager: started on entry, stopped on
    exit (and when starting fails).

    ``env``: variables for every process (the head's and the CLI calls'); ``start_env``: for the head's processes
    only; ``term_grace``: seconds between SIGTERM and SIGKILL on stop. ``self.env`` is the CLI calls' environment
    (RAY_API_SERVER_ADDRESS set to :attr:`dashboard`), ``self.token`` the token."""

    def __init__(
        self,
        num_cpus: int = 2,
        object_store_mib: int = 256,
        *,
        num_gpus: int | None = None,
        prefix: str = "drh-",
        env: dict[str, str] | None = None,
        start_env: dict[str, str] | None = None,
        term_grace: float = 15,
    ):
        import secrets
        import tempfile

        from datprl.platform.runtime import free_loopback_port

        # A short temp dir: Ray's Unix socket paths under it must stay below 108 bytes.
        self.temp = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
        self.token = secrets.token_hex(32)
        token_file = self.temp / "auth_token"
        token_file.write_text(self.token)
        token_file.chmod(0o600)
        drop = ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_API_SERVER_ADDRESS", "RAY_DASHBOARD_ADDRESS")
        self.env = {k: v for k, v in os.environ.items() if k not in drop}
        self.env.update(
            RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",  # bind every port to 127.0.0.1
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN_PATH=str(token_file),
            **(env or {}),
        )
        # The head's processes get RAY_ADDRESS: they find their cluster by it, else by /tmp/ray/ray_current_cluster (not
        # the one in our --temp-dir), else by scanning for GCS processes, which fails while other Ray instances run on
        # the machine (Ray Train's PlacementGroupCleaner died of "Found multiple active Ray instances" without it).
        # The CLI calls must not see it: RAY_ADDRESS overrides `ray job submit --address` (RAY_API_SERVER_ADDRESS
        # overrides both, so it is set to the same dashboard URL).
        gcs_port, dashboard_port = free_loopback_port(), free_loopback_port()
        self.dashboard = f"http://127.0.0.1:{dashboard_port}"
        self.start_env = {**self.env, "RAY_ADDRESS": f"127.0.0.1:{gcs_port}", **(start_env or {})}
        self.env["RAY_API_SERVER_ADDRESS"] = self.dashboard
        self.args = [
            "--head",
            f"--num-cpus={num_cpus}",
            *([] if num_gpus is None else [f"--num-gpus={num_gpus}"]),
            "--node-ip-address=127.0.0.1",
            f"--port={gcs_port}",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard_port}",
            f"--dashboard-agent-listen-port={free_loopback_port()}",
            f"--ray-client-server-port={free_loopback_port()}",
            f"--object-store-memory={object_store_mib * 2**20}",
            f"--temp-dir={self.temp}",
            "--disable-usage-stats",
        ]
        self.term_grace = term_grace
        self.session: int | None = None
        self.outlived_sigterm: list[str] = []  # names of the processes that stop() had to SIGKILL

    def start(self) -> None:
        import subprocess

        # start_new_session: `ray start` becomes a session leader; the daemons it spawns (GCS, raylet, dashboard, ...)
        # and the workers the raylet forks keep that session id, which is how stop() finds exactly them.
        proc = subprocess.Popen(
            [*ray_cli("ray"), "start", *self.args],
            env=self.start_env,
            start_new_session=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.session = proc.pid
        assert self.session != os.getsid(0)
        try:
            out, _ = proc.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        assert proc.returncode == 0, f"ray start failed:\n{out[-4000:]}"

    def stop(self) -> None:
        """SIGTERM to every process of the head's session, SIGKILL to what is left after ``term_grace`` seconds (some
        Ray processes outlive SIGTERM; the head's state goes with its temp dir), then assert that none is left."""
        import shutil

        if self.session is not None:
            self.outlived_sigterm = stop_session(self.session, term_grace=self.term_grace)
        shutil.rmtree(self.temp, ignore_errors=True)

    def __enter__(self):
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
