"""Clean shutdown: a job stopped with SIGTERM (what a service manager or Kubernetes sends) or SIGINT (Ctrl-C) exits
and leaves none of the processes of the local Ray it started -- GCS, raylet, dashboard, monitors, agents, workers,
Serve's controller, proxy and replicas. Linux only: the processes are found in /proc."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import ProcessInfo, process_table, session_processes
from datprl.platform.runtime import free_loopback_port

pytestmark = [
    pytest.mark.ray,
    pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the job's processes in /proc (Linux)"),
]

#: From the signal to the job's exit with nothing of it left (the requirement; it takes about 5 s here).
STOP_WITHIN_S = 30.0


def _start(args: list[str], cwd: Path, log: Path) -> subprocess.Popen:
    """A job in a session of its own (every process it starts stays in that session unless it leaves it), on a
    local Ray of its own (no RAY_ADDRESS)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    with log.open("w") as out:
        return subprocess.Popen(
            [sys.executable, *args], cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def _alive(processes: dict[int, ProcessInfo]) -> dict[int, ProcessInfo]:
    """Those of ``processes`` still running (same pid and start time; zombies are exited processes)."""
    table = process_table()
    return {
        pid: table[pid]
        for pid, info in processes.items()
        if pid in table and table[pid].started == info.started and table[pid].state != "Z"
    }


def _left_over(job: subprocess.Popen, seen: dict[int, ProcessInfo]) -> dict[int, ProcessInfo]:
    """Processes of the job still running: any seen while it ran (also those that left its session or were
    re-parented), and any process now in its session or descended from one."""
    table = process_table()
    now = {pid: table[pid] for pid in session_processes(job.pid, table) if table[pid].state != "Z"}
    return {**_alive(seen), **now}


def _kill_all(job: subprocess.Popen, seen: dict[int, ProcessInfo]) -> None:
    """Test clean-up: SIGKILL whatever of the job is left (a failed test must not leave a Ray behind)."""
    for pid in [job.pid, *_left_over(job, seen)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    job.wait(30)


def _stop_and_check(job: subprocess.Popen, signum: int, seen: dict[int, ProcessInfo], log: Path) -> None:
    """Send ``signum`` and check that within :data:`STOP_WITHIN_S` the job exited and nothing it started is left."""
    sent = time.monotonic()
    os.kill(job.pid, signum)
    try:
        job.wait(STOP_WITHIN_S)
    except subprocess.TimeoutExpired:
        pytest.fail(
            f"the job did not exit within {STOP_WITHIN_S:.0f} s of {signal.Signals(signum).name}:\n"
            f"{log.read_text()[-3000:]}"
        )
    left = _left_over(job, seen)
    while left and time.monotonic() - sent < STOP_WITHIN_S:
        time.sleep(0.5)
        left = _left_over(job, seen)
    stopped = time.monotonic() - sent
    assert not left, (
        f"{len(left)} processes left {stopped:.1f} s after {signal.Signals(signum).name}: "
        f"{sorted((pid, info.name) for pid, info in left.items())}\n{log.read_text()[-3000:]}"
    )
    print(f"{signal.Signals(signum).name}: exited with {job.returncode}, nothing left after {stopped:.1f} s")


@pytest.mark.timeout(420)
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_serve_job_stops_the_serve_and_ray_it_started(signum, repo_root, tmp_path):
    port = free_loopback_port()
    log = tmp_path / "serve.log"
    # Run from an empty folder: no outputs/train/model.safetensors to pick up, a fresh paper_tiny is served.
    job = _start([str(repo_root / "jobs/serve.py"), f"port={port}", "local_num_cpus=2"], tmp_path, log)
    seen: dict[int, ProcessInfo] = {}
    try:
        deadline = time.monotonic() + 300
        while True:
            assert job.poll() is None, f"jobs/serve.py exited with {job.returncode}:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"/healthz not ready within 300 s:\n{log.read_text()[-3000:]}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        # Ready: the signal may come while serve.run still waits for the application (where Ray's own handler used
        # to take SIGTERM and abort the clean-up) or after it returned.
        table = process_table()
        seen = {pid: table[pid] for pid in session_processes(job.pid, table)}
        names = {info.name for info in seen.values()}
        assert {"gcs_server", "raylet"} <= names, f"the local Ray's processes were not found: {sorted(names)}"
        assert any(name.startswith("ray::Serve") for name in names), f"no Serve actor process: {sorted(names)}"
        _stop_and_check(job, signum, seen, log)
        assert job.returncode == 0, log.read_text()[-3000:]  # a stop that was asked for
        assert "[serve] stopped (SIGTERM or Ctrl-C)" in log.read_text(), log.read_text()[-3000:]
    finally:
        if job.poll() is None or _left_over(job, seen):
            _kill_all(job, seen)


# ray_session, with a SIGTERM that arrives while the handlers ray.init installed are still in place: Ray's C++
# failure-signal handler takes it, calls Ray's Python handler (SystemExit) and arms a 3-second abort timer. A shutdown
# that takes longer than that (stopping Serve does) must still finish.
_SIGTERM_WHILE_RAY_STARTS = r"""
import os, signal, time
import ray
from datprl.platform import runtime

real_init, real_shutdown = runtime.init_ray, ray.shutdown

def init_then_sigterm(*args, **kwargs):
    session = real_init(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGTERM)  # before ray_session installs its own handler again
    time.sleep(60)  # ended by the SystemExit that Ray's handler raises
    raise AssertionError("SIGTERM was not delivered")

def slow_shutdown(*args, **kwargs):
    print("shutting down", flush=True)
    time.sleep(5)  # longer than the abort timer
    real_shutdown(*args, **kwargs)
    print("shut down", flush=True)

runtime.init_ray = init_then_sigterm
ray.shutdown = slow_shutdown
local = runtime.LocalRaySettings(num_cpus=1, object_store_bytes=100 * 2**20, dashboard=False, log_to_driver=False)
with runtime.ray_session(local=local):
    raise AssertionError("the block must not run")
"""


@pytest.mark.timeout(240)
def test_sigterm_while_ray_starts_still_shuts_it_down(tmp_path):
    log = tmp_path / "job.log"
    job = _start(["-c", _SIGTERM_WHILE_RAY_STARTS], tmp_path, log)
    seen: dict[int, ProcessInfo] = {}
    try:
        deadline = time.monotonic() + 180
        while job.poll() is None and time.monotonic() < deadline:
            table = process_table()
            seen.update({pid: table[pid] for pid in session_processes(job.pid, table)})  # names change (ray::IDLE)
            time.sleep(0.2)
        assert job.poll() is not None, f"the job did not exit within 180 s:\n{log.read_text()[-3000:]}"
        output = log.read_text()
        # 15: Ray's handler exits with the signal's number; an abort (-6) means the 3 s timer cut the shutdown short.
        assert job.returncode == 15, f"exit status {job.returncode}:\n{output[-3000:]}"
        assert "shut down" in output.splitlines(), output[-3000:]
        assert "raylet" in {info.name for info in seen.values()}, "the local Ray's processes were not found"
        time.sleep(1)
        left = _left_over(job, seen)
        assert not left, f"processes left: {sorted((pid, info.name) for pid, info in left.items())}"
    finally:
        if job.poll() is None or _left_over(job, seen):
            _kill_all(job, seen)


@pytest.mark.timeout(300)
def test_train_job_stops_the_ray_it_started(repo_root, tmp_path):
    """SIGTERM once Ray Train's worker runs (its first steps are under way or about to be): the job exits and its
    Ray -- with the Train controller, worker and Ray Data actors -- is gone. The exit status is the job's business
    (not checked) as long as it is not an abort."""
    from conftest import write_tiny_dataset

    dataset = write_tiny_dataset(tmp_path / "data")
    log = tmp_path / "train.log"
    args = [
        f"data.dataset={dataset}",
        "build_dataset_if_missing=false",
        f"storage={tmp_path / 'runs'}",
        f"output_dir={tmp_path / 'out'}",
        "name=stopped",
        "steps=100000",
        "data.crop_size=32",
        "num_workers=1",
        "cpus_per_worker=0.5",
        "use_gpu=false",
        "evaluate_split=null",
        "checkpoint_every=100000",
    ]
    job = _start([str(repo_root / "jobs/train.py"), *args], tmp_path, log)
    seen: dict[int, ProcessInfo] = {}
    try:
        deadline = time.monotonic() + 240
        while not any(info.name.startswith("ray::RayTrainWo") for info in seen.values()):  # comm: 15 characters
            assert job.poll() is None, f"jobs/train.py exited with {job.returncode}:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no Ray Train worker within 240 s:\n{log.read_text()[-3000:]}"
            time.sleep(0.5)
            table = process_table()
            seen.update({pid: table[pid] for pid in session_processes(job.pid, table)})  # names change (ray::IDLE)
        assert {"gcs_server", "raylet"} <= {info.name for info in seen.values()}
        _stop_and_check(job, signal.SIGTERM, seen, log)
        assert job.returncode == 130, log.read_text()[-3000:]  # stopped, not aborted: no evaluation, no export
        # The job's own output has no traceback. (Lines of Ray actors come prefixed with "(ActorName pid=...)": Ray
        # Train's placement-group cleaner prints one when another Ray runs on the machine, as the tests' own does.)
        own = [line for line in log.read_text().splitlines() if not line.lstrip("\x1b[0123456789m").startswith("(")]
        assert any("keeps its checkpoints" in line for line in own) and not any("Traceback" in line for line in own)
    finally:
        if job.poll() is None or _left_over(job, seen):
            _kill_all(job, seen)
