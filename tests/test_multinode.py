"""Multi-node training on loopback: the project's real training (``datprl.platform.train.fit``) on a 2-node Ray cluster
on this machine, checkpoints on s3:// (moto) as the nodes' shared storage, and the worker node lost mid-run.

The cluster is Ray's ``ray.cluster_utils.Cluster``: a head node (2 CPUs) and a worker node (1 CPU), each a raylet of its
own, token authentication on. Training runs with elastic ``num_workers=[1, 2]``, ``placement_strategy=SPREAD`` and
``cpus_per_worker=0.5`` (Ray Data's reads need a whole free CPU besides the workers: the head keeps 1.5, later 1).
Once a checkpoint at step >= ``LOSE_AFTER`` is on S3, the worker node is removed (every process of it SIGKILLed, as a
lost machine). Checks, in one run:

- before the loss, the two Ray Train workers run on two different nodes (Ray's state API: each worker actor's node);
- training restarts on what remains from the last checkpoint written before the loss (``resumed_from_step`` of the
  new attempt's reports equals it, not 0): no step before that checkpoint is lost;
- the run reaches its final step and its final checkpoint is on S3 (the driver's run check finds it complete there).

The timeline (node lost, restarted, finished; seconds from the start of training) is printed; run with ``-s``.

Isolation: the driver (the cluster, ``fit`` and the watcher that removes the node) runs in a subprocess of its own
session, with an environment of its own: a fresh token (``RAY_AUTH_TOKEN_PATH``, never ~/.ray/auth_token), its own
``RAY_TMPDIR`` (session folders and Ray's current-cluster file), free loopback ports, and ``RAY_ADDRESS`` /
``RAY_API_SERVER_ADDRESS`` naming this cluster. Every process of the cluster inherits the latter, so Ray Train V2's
placement-group cleaner (which asks the state API without an address) reaches this cluster even when another Ray runs
on the machine (the test session's in-process Ray, say) instead of failing with "Found multiple active Ray instances".
The driver shuts its cluster down; the test then SIGKILLs any process it saw in the driver's session or below it that
is still alive (never `ray stop`, which would stop every Ray on the machine). The cluster's temp folder (its logs) is
removed when the test passes and named in the failure message otherwise.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
MiB = 1024**2
HEAD_CPUS, WORKER_NODE_CPUS = 2, 1
STEPS, CHECKPOINT_EVERY, LOG_EVERY = 40, 8, 4
LOSE_AFTER = 16  # the worker node is removed once a checkpoint at this step or later is on S3
DRIVER_TIMEOUT_S = 480
BUCKET, RUN = "multinode", "multinode"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.ray,
    pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="cleaning up reads /proc (Linux)"),
]


def _train_config(dataset: str, output_dir: str) -> dict:
    """The run: the tiny network on the tiny dataset, no validation, no L_align, checkpoints every 8 steps on S3."""
    return {
        "name": RUN,
        "storage": f"s3://{BUCKET}/runs",
        # cache_decoded off: blocks decoded into a lost node's object store would be lost with it.
        "data": {"dataset": dataset, "crop_size": 32, "per_task_batch": 1, "shuffle_buffer": 4, "cache_decoded": False},
        "build_dataset_if_missing": False,
        "model": {"variant": "paper_tiny"},
        "text_embeddings": None,
        "steps": STEPS,
        "checkpoint_every": CHECKPOINT_EVERY,
        "log_every": LOG_EVERY,
        "validate_every": None,
        "evaluate_split": None,
        "num_workers": [1, 2],
        "placement_strategy": "SPREAD",
        "cpus_per_worker": 0.5,
        "torch_threads": 1,
        "use_gpu": False,
        "max_failures": 2,
        "output_dir": output_dir,
    }


# --- the driver (runs in a subprocess: python tests/test_multinode.py SPEC.json) --------------------------------------


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


def _train_worker_nodes() -> list[str]:
    """Node ids of the live Ray Train worker actors (Ray's state API), sorted."""
    from ray.util.state import list_actors

    actors = list_actors(filters=[("state", "=", "ALIVE")], limit=10_000, raise_on_missing_output=False)
    return sorted(a.node_id for a in actors if "RayTrainWorker" in (a.class_name or ""))


def _drive(spec_path: Path) -> int:
    from datprl.platform.runtime import init_ray, loopback_only

    loopback_only()
    import ray
    from ray.cluster_utils import Cluster

    from datprl.platform.train.config import TrainConfig
    from datprl.platform.train.fit import fit, prepare, read_metrics_log

    spec = json.loads(spec_path.read_text())
    events_path = Path(spec["events"])
    events: dict = {}

    def record(**items) -> None:
        events.update(items)
        _write_json(events_path, events)

    began = time.time()
    cluster = Cluster(
        initialize_head=True,
        head_node_args=dict(
            num_cpus=HEAD_CPUS,
            num_gpus=0,
            node_ip_address="127.0.0.1",
            gcs_server_port=spec["gcs_port"],
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            dashboard_port=spec["dashboard_port"],
            dashboard_agent_listen_port=spec["agent_port"],
            object_store_memory=256 * MiB,
            # A SIGKILLed raylet is declared dead after 5 failed health checks: 5 s instead of 15 s.
            _system_config={"health_check_period_ms": 1000},
        ),
    )
    try:
        worker = cluster.add_node(
            num_cpus=WORKER_NODE_CPUS, num_gpus=0, node_ip_address="127.0.0.1", object_store_memory=150 * MiB
        )
        cluster.wait_for_nodes()
        init_ray(cluster.address)
        head_id, worker_id = cluster.head_node.node_id, worker.node_id
        driver_node = ray.get_runtime_context().get_node_id()
        record(head=head_id, worker=worker_id, driver_node=driver_node, cluster_up_s=time.time() - began)
        if driver_node != head_id:
            raise RuntimeError(f"the driver joined node {driver_node}, not the head {head_id}")

        config = TrainConfig.model_validate({**spec["config"], "ray_address": cluster.address})
        run = prepare(config)
        metrics_path = Path(config.output_dir) / "metrics.jsonl"
        stop = threading.Event()

        def watch() -> None:
            try:
                while not stop.is_set():
                    reports = read_metrics_log(metrics_path)
                    saved = [r["step"] for r in reports if r.get("checkpoint")]
                    if saved and max(saved) >= LOSE_AFTER:
                        break
                    time.sleep(0.1)
                else:
                    return
                record(
                    before_loss={
                        "checkpoint_step": max(saved),
                        "reports": len(reports),
                        "worker_nodes": _train_worker_nodes(),
                    }
                )
                cluster.remove_node(worker, allow_graceful=False)  # SIGKILL: a lost machine, no goodbye
                record(lost=time.time())
                dead = restarted = None
                while not stop.is_set():
                    if dead is None and not any(n["NodeID"] == worker_id and n["Alive"] for n in ray.nodes()):
                        dead = time.time()
                        record(declared_dead=dead)
                    if restarted is None and any(
                        r.get("resumed_from_step", 0) > 0 for r in read_metrics_log(metrics_path)
                    ):
                        restarted = time.time()
                        record(restarted=restarted)
                    if dead is not None and restarted is not None:
                        # Only now: until Ray declares the node dead, its actors may still be listed as alive.
                        record(after_restart={"worker_nodes": _train_worker_nodes()})
                        return
                    time.sleep(0.1)
            except Exception as err:  # noqa: BLE001 - reported to the test through the events file
                record(watch_error=repr(err))

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        record(start=time.time())
        result = fit(run)
        record(
            finished=time.time(),
            error=None if result.error is None else repr(result.error),
            checkpoint=None if result.checkpoint is None else result.checkpoint.path,
        )
        stop.set()
        watcher.join(timeout=30)
    finally:
        ray.shutdown()
        cluster.shutdown()
    return 0


# --- the test ---------------------------------------------------------------------------------------------------------


def _tracked(session: int, seen: dict[int, int]) -> None:
    """Add every live process of the driver's session, and every descendant of one, to ``seen`` (pid -> start time):
    a worker process whose raylet was killed is re-parented, so it is recorded while it still has its parent."""
    from conftest import process_table, session_processes

    table = process_table()
    for pid in session_processes(session, table) | {session}:
        if pid in table and table[pid].state != "Z":
            seen.setdefault(pid, table[pid].started)


def _kill_left(seen: dict[int, int]) -> list[str]:
    """SIGKILL the processes of ``seen`` still alive (the same pid with the same start time); returns their names."""
    from conftest import process_table

    table, left = process_table(), []
    for pid, started in seen.items():
        info = table.get(pid)
        if info is not None and info.started == started and info.state != "Z" and pid != os.getpid():
            left.append(info.name)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    return left


@pytest.mark.timeout(DRIVER_TIMEOUT_S + 120)
def test_training_survives_losing_a_node(tmp_path, s3_server, tiny_dataset):
    import subprocess

    import boto3

    from datprl.platform.runtime import free_loopback_port
    from datprl.platform.train.config import TrainConfig
    from datprl.platform.train.fit import read_metrics_log
    from datprl.platform.train.runs import check_run

    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=BUCKET)
    out = tmp_path / "out"
    # A short folder of its own: Ray's Unix socket paths under it must stay below 108 bytes.
    temp = Path(tempfile.mkdtemp(prefix="dmn-", dir="/tmp"))
    token_file = temp / "auth_token"
    token_file.write_text(secrets.token_hex(32))
    token_file.chmod(0o600)
    gcs_port, dashboard_port = free_loopback_port(), free_loopback_port()
    spec = {
        "gcs_port": gcs_port,
        "dashboard_port": dashboard_port,
        "agent_port": free_loopback_port(),
        "events": str(tmp_path / "events.json"),
        "config": _train_config(str(tiny_dataset), str(out)),
    }
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(spec))

    drop = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN", "RAY_DATA_LOGGING_CONFIG", "PYTHONWARNINGS")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(
        RAY_ADDRESS=f"127.0.0.1:{gcs_port}",
        RAY_API_SERVER_ADDRESS=f"http://127.0.0.1:{dashboard_port}",
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN_PATH=str(token_file),
        RAY_TMPDIR=str(temp),
        RAY_USAGE_STATS_ENABLED="0",
        RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.2",
        AWS_ENDPOINT_URL_S3=s3_server,
    )
    log_path = tmp_path / "driver.log"
    seen: dict[int, int] = {}
    began = time.monotonic()
    with log_path.open("w") as log:
        driver = subprocess.Popen(
            [sys.executable, __file__, str(spec_path)],
            cwd=REPO_ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        while driver.poll() is None and time.monotonic() - began < DRIVER_TIMEOUT_S:
            _tracked(driver.pid, seen)
            time.sleep(0.5)
        if driver.poll() is None:
            os.kill(driver.pid, signal.SIGKILL)
            driver.wait(timeout=30)
            pytest.fail(f"the driver ran past {DRIVER_TIMEOUT_S} s:\n{_tail(log_path)}")
    finally:
        deadline = time.monotonic() + 15  # the cluster's processes exit on their own once the driver shut it down
        while time.monotonic() < deadline and _alive(seen):
            time.sleep(0.5)
        left = _kill_left(seen)
        if left:
            print(f"[multinode] SIGKILLed {len(left)} processes left by the driver: {sorted(set(left))}")
    wall = time.monotonic() - began
    printed = f"{_tail(log_path)}\n(Ray's session logs: {temp})"
    assert driver.returncode == 0, printed
    events = json.loads((tmp_path / "events.json").read_text())
    assert "watch_error" not in events, (events, printed)
    assert events.get("error") is None, (events["error"], printed)
    head, worker = events["head"], events["worker"]

    # Before the loss: the two workers on two different nodes.
    before = events["before_loss"]
    assert sorted(before["worker_nodes"]) == sorted([head, worker]), (before, head, worker)

    # After it: the new attempt starts from the last checkpoint of the first, which was written before the loss; so
    # does any later attempt (an elastic resize) from the last checkpoint before it.
    reports = read_metrics_log(out / "metrics.jsonl")
    attempts: list[list[dict]] = []
    for report in reports:
        if not attempts or report["resumed_from_step"] != attempts[-1][0]["resumed_from_step"]:
            attempts.append([])
        attempts[-1].append(report)
    assert len(attempts) >= 2 and attempts[0][0]["resumed_from_step"] == 0, reports
    last_saved = max(r["step"] for r in attempts[0] if r["checkpoint"])
    assert last_saved >= LOSE_AFTER and last_saved >= before["checkpoint_step"], (last_saved, before)
    for i, attempt in enumerate(attempts[1:], start=1):
        saved = max(r["step"] for a in attempts[:i] for r in a if r["checkpoint"])
        assert attempt[0]["resumed_from_step"] == saved < attempt[0]["step"], (i, attempt[0], saved)
    later = attempts[1]
    assert head in events["after_restart"]["worker_nodes"] and worker not in events["after_restart"]["worker_nodes"]

    # The end: the final step, its checkpoint on S3.
    assert reports[-1]["step"] == STEPS and reports[-1]["checkpoint"], reports[-1]
    assert f"{BUCKET}/runs/{RUN}/checkpoint_" in events["checkpoint"], events["checkpoint"]
    config = TrainConfig.model_validate({**spec["config"], "s3": {"endpoint_url": s3_server}})
    status = check_run(config)  # the run's furthest checkpoint on S3, read back through the run's filesystem
    assert (status.kind, status.step) == ("complete", STEPS), status

    start = events["start"]
    timeline = {
        "cluster up (from driver start)": events["cluster_up_s"],
        "node lost at": events["lost"] - start,
        "node declared dead by Ray at": events["declared_dead"] - start,
        "restarted at (first report of the new attempt)": events["restarted"] - start,
        "finished at": events["finished"] - start,
    }
    resumed_from, after = later[0]["resumed_from_step"], len(events["after_restart"]["worker_nodes"])
    print(f"\n[multinode] last checkpoint before the loss: step {last_saved}; resumed from step {resumed_from}")
    print(f"[multinode] workers after the restart: {after}, on the head; attempts: {len(attempts)}")
    for what, seconds in timeline.items():
        print(f"[multinode] {what}: {seconds:.1f} s")
    print(f"[multinode] test wall time {wall:.1f} s")
    shutil.rmtree(temp, ignore_errors=True)  # Ray's session logs: kept only when the test fails


def _alive(seen: dict[int, int]) -> bool:
    """Whether a process of ``seen`` (pid -> start time) is still running."""
    from conftest import process_table

    table = process_table()
    return any(
        (info := table.get(pid)) is not None and info.started == started and info.state != "Z"
        for pid, started in seen.items()
        if pid != os.getpid()
    )


def _tail(path: Path, chars: int = 6000) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    return text[-chars:]


if __name__ == "__main__":
    sys.exit(_drive(Path(sys.argv[1])))
