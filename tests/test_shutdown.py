"""Clean shutdown: a job stopped with SIGTERM (what a service manager or Kubernetes sends) or SIGINT (Ctrl-C), sent
to the driver alone or to the job's whole process group (what ``timeout``, a terminal and many supervisors send),
exits with ``128 + signal`` (143, 130) and leaves none of the processes of the local Ray it started -- GCS, raylet,
dashboard, monitors, agents, workers, Serve's controller, proxy and replicas; a training run stopped so resumes from
its last checkpoint. Linux only: the processes are found in /proc.

Every test starts a job in a subprocess (the e2e tier: ``pytest -m e2e``); each run is as small as the job allows."""

from __future__ import annotations

import json
import os
import re
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
    pytest.mark.e2e,
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


def _send(job: subprocess.Popen, signum: int, target: str) -> None:
    """``signum`` to the driver alone (``driver``) or to every process of the job's process group (``group``: the job
    leads a session, and so a group, of its own; ``os.killpg`` as ``timeout`` and a terminal's Ctrl-C do)."""
    if target == "group":
        os.killpg(job.pid, signum)
    else:
        os.kill(job.pid, signum)


def _stop_and_check(
    job: subprocess.Popen, signum: int, seen: dict[int, ProcessInfo], log: Path, target: str = "driver"
) -> float:
    """Send ``signum`` (see :func:`_send`) and check that within :data:`STOP_WITHIN_S` the job exited and nothing it
    started is left; returns the seconds that took."""
    sent = time.monotonic()
    _send(job, signum, target)
    try:
        job.wait(STOP_WITHIN_S)
    except subprocess.TimeoutExpired:
        pytest.fail(
            f"the job did not exit within {STOP_WITHIN_S:.0f} s of {signal.Signals(signum).name} to the {target}:\n"
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
    name = signal.Signals(signum).name
    print(f"{name} to the {target}: exited with {job.returncode}, nothing left after {stopped:.1f} s")
    return stopped


def _watch(job: subprocess.Popen, seen: dict[int, ProcessInfo], log: Path, ready, what: str, timeout_s: float) -> None:
    """Record the job's processes in ``seen`` (their names change: ray::IDLE becomes an actor) until ``ready()``;
    fails if the job exits first or ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    while True:
        table = process_table()
        seen.update({pid: table[pid] for pid in session_processes(job.pid, table)})
        if ready():
            return
        assert job.poll() is None, f"the job exited with {job.returncode} before {what}:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no {what} within {timeout_s:.0f} s:\n{log.read_text()[-3000:]}"
        time.sleep(0.3)


def _assert_ray_outside_the_driver_group(job: subprocess.Popen, seen: dict[int, ProcessInfo]) -> None:
    """The mechanism of a clean group stop: every process of the job's local Ray runs in a process group other than
    the driver's, so a signal to the driver's group reaches the driver alone, which shuts Ray down in order."""
    in_group = []
    for pid, info in seen.items():
        if pid == job.pid:
            continue
        try:
            if os.getpgid(pid) == job.pid:
                in_group.append((pid, info.name))
        except ProcessLookupError:
            continue
    assert not in_group, f"processes of the job's Ray in the driver's process group: {sorted(in_group)}"


@pytest.mark.timeout(420)
@pytest.mark.parametrize(
    ("signum", "target", "code"),
    [(signal.SIGTERM, "group", 143), (signal.SIGINT, "group", 130)],
    ids=["group-SIGTERM", "group-SIGINT"],
)
def test_serve_job_stops_the_serve_and_ray_it_started(signum, target, code, repo_root, tmp_path):
    """jobs/serve.py stopped by a signal to its process group (SIGTERM: the hang this guards against, the raylet and
    GCS used to get it too and die under the driver; SIGINT: a terminal's Ctrl-C). SIGTERM to the driver alone takes
    the same path: tests below send it to the tune job and to a job whose raylet is already dead."""
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
        _assert_ray_outside_the_driver_group(job, seen)
        _stop_and_check(job, signum, seen, log, target)
        assert job.returncode == code, log.read_text()[-3000:]  # 128 + the signal: stopped, not failed
        stopped = "[serve] stopped (SIGTERM or Ctrl-C); Serve and the local Ray of this process are shut down"
        assert f"{stopped}; exit status {code}" in log.read_text(), log.read_text()[-3000:]
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


def _train_args(dataset: Path, root: Path, name: str, steps: int, checkpoint_every: int) -> list[str]:
    """jobs/train.py's smallest CPU run on :func:`conftest.write_tiny_dataset`: paper_tiny on 32 px crops, one worker
    with half a CPU and one torch thread, no evaluation, storage and outputs under ``root``."""
    return [
        f"data.dataset={dataset}",
        "build_dataset_if_missing=false",
        f"storage={root / 'runs'}",
        f"output_dir={root / 'out'}",
        f"name={name}",
        f"steps={steps}",
        "data.crop_size=32",
        "model.variant=paper_tiny",
        "num_workers=1",
        "cpus_per_worker=0.5",
        "torch_threads=1",
        "use_gpu=false",
        "evaluate_split=null",
        "validate_every=null",
        "text_embeddings=null",  # no descriptions to write first: the run starts sooner
        f"checkpoint_every={checkpoint_every}",
        f"log_every={checkpoint_every}",
    ]


def _own_lines(log: Path) -> list[str]:
    """The job's own output: lines of Ray actors come prefixed with "(ActorName pid=...)" (Ray Train's placement-group
    cleaner prints one when another Ray runs on the machine, as the tests' own does)."""
    return [line for line in log.read_text().splitlines() if not line.lstrip("\x1b[0123456789m").startswith("(")]


def _metrics(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


#: The resumed run: checkpoints (and reports) every 4 steps; enough steps that the first run, stopped right after its
#: first checkpoint, cannot finish before the signal lands, few enough that the rerun takes seconds.
RESUME_STEPS, RESUME_EVERY = 60, 4


@pytest.mark.timeout(420)
def test_train_job_stopped_by_a_group_sigterm_resumes_from_its_checkpoint(repo_root, tmp_path):
    """SIGTERM to the whole process group of a training run after its first checkpoint: the job exits with 143 and
    nothing of it is left; the same command then resumes from the last checkpoint the first run wrote (not from step
    0) and finishes."""
    from conftest import write_tiny_dataset

    dataset = write_tiny_dataset(tmp_path / "data")
    args = [str(repo_root / "jobs/train.py"), *_train_args(dataset, tmp_path, "resumed", RESUME_STEPS, RESUME_EVERY)]
    out = tmp_path / "out"
    log = tmp_path / "first.log"
    started = time.monotonic()
    job = _start(args, tmp_path, log)
    seen: dict[int, ProcessInfo] = {}
    try:
        checkpointed = lambda: any(row["checkpoint"] for row in _metrics(out))  # noqa: E731
        _watch(job, seen, log, checkpointed, "first checkpoint", 300)
        print(f"first checkpoint after {time.monotonic() - started:.1f} s")
        _assert_ray_outside_the_driver_group(job, seen)
        _stop_and_check(job, signal.SIGTERM, seen, log, "group")
        assert job.returncode == 143, log.read_text()[-3000:]
        own = _own_lines(log)
        assert any("keeps its checkpoints" in line for line in own) and not any("Traceback" in line for line in own)
    finally:
        if job.poll() is None or _left_over(job, seen):
            _kill_all(job, seen)
    first = _metrics(out)
    reached = max(row["step"] for row in first)
    assert reached < RESUME_STEPS, f"the first run finished before the signal: {first}"
    last_reported = max(row["step"] for row in first if row["checkpoint"])

    log = tmp_path / "second.log"
    started = time.monotonic()
    job = _start(args, tmp_path, log)
    seen = {}
    try:
        job.wait(300)
        print(f"the resumed run took {time.monotonic() - started:.1f} s")
    except subprocess.TimeoutExpired:
        pytest.fail(f"the resumed run did not finish within 300 s:\n{log.read_text()[-3000:]}")
    finally:
        if job.poll() is None:
            _kill_all(job, seen)
    output = log.read_text()
    assert job.returncode == 0, output[-3000:]
    time.sleep(1)  # a finished job's Ray is shut down before it exits: nothing of its session may remain
    assert not _left_over(job, {}), sorted(info.name for info in _left_over(job, {}).values())
    match = re.search(rf"\[train\] resuming run 'resumed' from step (\d+)/{RESUME_STEPS}", output)
    assert match, output[-3000:]
    resumed = int(match.group(1))
    # The last checkpoint on disk: the last one the first run reported, or the next, written as it stopped.
    assert last_reported <= resumed <= reached + RESUME_EVERY, (last_reported, resumed, reached)
    assert resumed % RESUME_EVERY == 0, resumed
    second = [row for row in _metrics(out)[len(first) :] if row["resumed_from_step"] == resumed]
    assert second and second[0]["step"] == resumed + RESUME_EVERY and second[-1]["step"] == RESUME_STEPS, second
    assert (out / "model.safetensors").exists(), output[-3000:]
    print(f"resumed from step {resumed}; samples/s {[round(row['samples_per_s'], 1) for row in second]}")


@pytest.mark.timeout(240)
def test_stop_with_the_raylet_already_dead_kills_the_rest(tmp_path):
    """The fallback, for a Ray whose processes got the signal too (systemd's default KillMode signals every process
    of the service's cgroup) or died: the raylet is SIGKILLed, then the driver gets SIGTERM. Serve's and Ray's
    orderly shutdown would wait on the dead raylet; the driver instead kills what is left of its Ray -- the GCS, the
    dashboard and the worker the raylet left behind (re-parented, found by its RAY_RAYLET_PID) -- and exits with 143
    well within the bound."""
    log = tmp_path / "job.log"
    job = _start(["-c", _RAYLET_DIES], tmp_path, log)
    seen: dict[int, ProcessInfo] = {}
    try:
        _watch(job, seen, log, lambda: "raylet killed" in log.read_text(), "dead raylet", 180)
        assert any(info.name == "ray::Sleeper" for info in seen.values()), sorted(i.name for i in seen.values())
        took = _stop_and_check(job, signal.SIGTERM, seen, log, "driver")
        assert job.returncode == 143, log.read_text()[-3000:]
        assert took < 15, f"the stop took {took:.1f} s: the driver waited on the dead raylet"
        assert "GCS or raylet had already exited; killed the rest" in log.read_text(), log.read_text()[-3000:]
    finally:
        if job.poll() is None or _left_over(job, seen):
            _kill_all(job, seen)


# A job on ray_session with Serve, whose raylet is SIGKILLed under it; it then waits for the test's SIGTERM.
_RAYLET_DIES = r"""
import os, signal, sys, time
import ray
from datprl.platform import runtime

local = runtime.LocalRaySettings(num_cpus=1, object_store_bytes=100 * 2**20, dashboard=False, log_to_driver=False)
try:
    with runtime.ray_session(local=local, serve=True):
        @ray.remote(num_cpus=0)
        class Sleeper:
            def pid(self):
                return os.getpid()

        sleeper = Sleeper.remote()
        ray.get(sleeper.pid.remote())
        raylet = ray._private.worker._global_node.all_processes["raylet"][0].process
        raylet.kill()
        raylet.wait()
        print("raylet killed", flush=True)
        while True:
            time.sleep(3600)
except KeyboardInterrupt:
    sys.exit(runtime.stop_exit_code())
"""


@pytest.mark.timeout(420)
def test_tune_job_stops_on_sigterm(repo_root, tmp_path):
    """jobs/tune.py (a one-trial sweep on the smallest split dataset) stopped by SIGTERM to the driver alone once its
    trial's Ray Train worker runs: exit 143, nothing of its Ray (Tune's trial actor, Ray Train's controller and worker,
    Ray Data's actors) left. Its Ray runs outside the driver's process group (checked), so a SIGTERM to the group
    reaches the driver alone too, as the serve and train tests send it."""
    import yaml

    from test_tune import write_split_dataset

    data = write_split_dataset(tmp_path / "data")
    config = {
        "name": "stopped",
        "output_dir": str(tmp_path / "out"),
        "local_cpus": 2,
        "search": {"num_samples": 1, "max_concurrent_trials": 1, "startup_trials": 1, "grace_period": 1000},
        "train": {
            "storage": str(tmp_path / "runs"),
            "data": {"dataset": str(data), "crop_size": 32, "per_task_batch": 1, "shuffle_buffer": 4},
            "build_dataset_if_missing": False,
            "text_embeddings": None,
            "steps": 100000,
            "validate_every": 2,
            "checkpoint_every": 2,
            "log_every": 2,
            "validation_crop": None,
            "cpus_per_worker": 0.5,
            "torch_threads": 1,
            "use_gpu": False,
        },
    }
    config_path = tmp_path / "sweep.yaml"
    config_path.write_text(yaml.safe_dump(config))
    log = tmp_path / "tune.log"
    job = _start([str(repo_root / "jobs/tune.py"), str(config_path)], tmp_path, log)
    seen: dict[int, ProcessInfo] = {}
    try:
        # The trial's Ray Train worker runs (comm is 15 characters): stopping then is as early as a trial can be.
        training = lambda: any(info.name.startswith("ray::RayTrainWo") for info in seen.values())  # noqa: E731
        _watch(job, seen, log, training, "trial's Ray Train worker", 300)
        assert re.search(r"\[tune\] trial 1/1 \S+ started", log.read_text()), log.read_text()[-3000:]
        _assert_ray_outside_the_driver_group(job, seen)
        _stop_and_check(job, signal.SIGTERM, seen, log, "driver")
        assert job.returncode == 143, log.read_text()[-3000:]
        assert "the same command resumes sweep 'stopped'" in log.read_text(), log.read_text()[-3000:]
    finally:
        if job.poll() is None or _left_over(job, seen):
            _kill_all(job, seen)
