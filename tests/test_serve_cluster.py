"""Serving on a live local cluster: `ray start --head` with token auth on, then `serve deploy` of a copy of
infra/serve.yaml (read from the shipped file; only the weights, the HTTP port, per-replica CPUs/threads and the
autoscaling timings are changed for the test).

Checks, in one run: `serve status` reaches RUNNING and the endpoint answers /healthz, /v1/model and a real restore
request with the deployed weights' SHA-256 (header X-Weights-SHA256); a redeploy with other weights while a client
loop runs drops no request and the responses switch to the new weights' hash; a bounded loopback load scales the
deployment from 1 to 2 replicas and, once it stops, back to 1 (replica states from the Serve REST API, token header);
the test stops only the head it started and no process of that head is left.

The head (tests/conftest.py's RayHead, as in tests/test_cluster_submit.py) runs in its own session (setsid) with its
own temp dir, token file (RAY_AUTH_TOKEN_PATH) and free loopback ports; it is stopped by signalling exactly that
session's processes (never `ray stop`, which would stop every Ray on the machine). The observed timeline is printed
(run with -s to see it).
"""

from __future__ import annotations

import io
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
import yaml
from PIL import Image

from conftest import RayHead, ray_cli, running_in_session
from datprl.models.factory import create_model, save_model, weights_digest
from datprl.platform.runtime import free_loopback_port
from datprl.serve.app import _TOLERANT_CONTROLLER_ENV
from serve_samples import encode_pil, photo

REPO_ROOT = Path(__file__).resolve().parents[1]
SERVE_YAML = REPO_ROOT / "infra" / "serve.yaml"
APP, DEPLOYMENT = "datprl", "Restorer"

# Autoscaling for the test copy: target 2 ongoing requests per replica, so the single client of the redeploy phase
# (at most 1 in flight) never asks for a second replica and the 6 clients of the load phase always do. Ray's defaults
# (30 s window, reports every 10 s) would add about a minute each way.
AUTOSCALING = dict(
    min_replicas=1,
    max_replicas=2,
    target_ongoing_requests=2,
    upscale_delay_s=1,
    downscale_delay_s=3,
    look_back_period_s=4,
    metrics_interval_s=1,
)
LOAD_CLIENTS = 6
PHASE_TIMEOUT_S = 180

pytestmark = [
    pytest.mark.slow,
    pytest.mark.ray,
    pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="stopping only our head reads /proc (Linux)"),
]


class ServeHead(RayHead):
    """A head of the test's own (:class:`conftest.RayHead`, no GPU) plus the `serve` CLI and the Serve REST API
    against its dashboard. Serve's controller gets the proxy timeouts that tolerate a busy machine (what
    datprl.serve.app.start_serve gives a controller it starts; `serve deploy` starts it from the dashboard)."""

    def __init__(self, num_cpus: int = 2, object_store_mib: int = 256):
        super().__init__(
            num_cpus, object_store_mib, num_gpus=0, prefix="drs-", start_env=_TOLERANT_CONTROLLER_ENV, term_grace=5
        )

    def serve(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*ray_cli("serve"), *args, "--address", self.dashboard],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=self.temp,
        )

    def deploy(self, config: Path) -> None:
        """`serve deploy CONFIG`; right after `ray start` the dashboard's Serve API may not answer yet: retried."""
        for _ in range(4):
            done = self.serve("deploy", str(config))
            if done.returncode == 0:
                return
            time.sleep(3)
        raise AssertionError(f"serve deploy failed:\n{(done.stdout + done.stderr)[-3000:]}")

    def status(self) -> dict:
        """`serve status`, parsed."""
        done = self.serve("status")
        assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
        return yaml.safe_load(done.stdout)

    def details(self) -> dict:
        """The Serve REST API's view of the instance (applications, deployments, replicas and their states)."""
        reply = requests.get(
            f"{self.dashboard}/api/serve/applications/", timeout=30, headers={"Authorization": f"Bearer {self.token}"}
        )
        reply.raise_for_status()
        return reply.json()

    def replica_states(self) -> tuple[str | None, Counter]:
        """(application status, Counter of the deployment's replica states) from :meth:`details`."""
        app = (self.details().get("applications") or {}).get(APP)
        if not app:
            return None, Counter()
        deployment = app.get("deployments", {}).get(DEPLOYMENT) or {}
        return app.get("status"), Counter(r["state"] for r in deployment.get("replicas", []))


def _weights(folder: Path, seed: int) -> Path:
    """Exported non-identity paper_tiny weights (a fresh network of ``seed``), as the other serving tests make."""
    torch.manual_seed(seed)
    return save_model(create_model("paper_tiny", zero_init_output=False), folder / f"seed{seed}" / "model")


def _config(weights: Path, port: int, path: Path) -> Path:
    """infra/serve.yaml as shipped, with this test's weights, port, CPUs/threads per replica and autoscaling timing."""
    raw = yaml.safe_load(SERVE_YAML.read_text())
    assert raw["http_options"]["host"] == "127.0.0.1"
    raw["http_options"]["port"] = port
    (app,) = raw["applications"]
    assert (app["name"], app["import_path"]) == (APP, "datprl.serve.app:build_app")
    app["args"].update(weights=str(weights), num_cpus=0.5, torch_threads=1)  # 2 replicas fit a 2-CPU head
    app["args"]["autoscaling"].update(AUTOSCALING)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


class Clients:
    """``n`` threads that POST one image to /v1/restore back to back until stopped, recording every outcome:
    (started, ended, HTTP status or None, X-Weights-SHA256, error text)."""

    def __init__(self, url: str, body: bytes, n: int):
        self.url, self.body = f"{url}/v1/restore", body
        self.records: list[tuple[float, float, int | None, str | None, str]] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._loop, daemon=True) for _ in range(n)]

    def _loop(self) -> None:
        with requests.Session() as session:
            while not self._stop.is_set():
                started = time.monotonic()
                try:
                    reply = session.post(self.url, data=self.body, headers={"Content-Type": "image/png"}, timeout=150)
                    record = (
                        started,
                        time.monotonic(),
                        reply.status_code,
                        reply.headers.get("x-weights-sha256"),
                        "" if reply.status_code == 200 else reply.text[:300],
                    )
                except requests.RequestException as error:
                    record = (started, time.monotonic(), None, None, repr(error)[:300])
                with self._lock:
                    self.records.append(record)

    def snapshot(self) -> list[tuple[float, float, int | None, str | None, str]]:
        with self._lock:
            return sorted(self.records)

    def errors(self) -> list:
        return [r for r in self.snapshot() if r[2] != 200]

    def __enter__(self) -> Clients:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=200)


def _wait(what: str, condition, timeout: float = PHASE_TIMEOUT_S, period: float = 0.5):
    """Poll ``condition()`` until it returns something other than None or False (returned); fail naming ``what``
    after ``timeout``."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = condition()
        if last is not None and last is not False:  # not `if last`: a requests.Response with a 4xx is falsy
            return last
        time.sleep(period)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last: {last})")


def _get(url: str, *statuses: int) -> requests.Response | None:
    """The reply to GET ``url`` if its status is one of ``statuses`` (default 200), else None (also when refused)."""
    try:
        reply = requests.get(url, timeout=60)
    except requests.ConnectionError:
        return None
    return reply if reply.status_code in (statuses or (200,)) else None


def _running_only(head: ServeHead, replicas: int):
    """The app RUNNING with exactly ``replicas`` replicas, all RUNNING (none starting or stopping)."""
    status, states = head.replica_states()
    return status == "RUNNING" and states == Counter({"RUNNING": replicas})


@pytest.mark.timeout(900)
def test_serve_deploy_redeploy_and_autoscale_on_a_local_head(tmp_path):
    t0 = time.monotonic()

    def mark(event: str, at: float | None = None) -> float:
        """Print and return when ``event`` happened (``at``, a time.monotonic(), or now), in seconds since t0."""
        when = (time.monotonic() if at is None else at) - t0
        print(f"[serve-cluster] {when:7.1f} s  {event}", flush=True)
        return when

    old, new = _weights(tmp_path, 1), _weights(tmp_path, 2)
    old_hash, new_hash = weights_digest(old), weights_digest(new)
    assert old_hash != new_hash
    port = free_loopback_port()
    url = f"http://127.0.0.1:{port}"
    first = _config(old, port, tmp_path / "serve-old.yaml")
    second = _config(new, port, tmp_path / "serve-new.yaml")
    image = photo(48, 48)
    body = encode_pil(image, "PNG")

    head = ServeHead(num_cpus=2)
    with head:
        mark("head started (token auth on)")
        # Token auth is on: the Serve REST API refuses a request without the token.
        _wait(
            "the dashboard to refuse a request without the token",
            lambda: _get(f"{head.dashboard}/api/serve/applications/", 401, 403),
            timeout=60,
        )

        # -- deploy: serve status reaches RUNNING, the endpoint answers ---------------------------------------------
        deploy_started = mark("serve deploy (weights seed 1)")
        head.deploy(first)
        _wait("the application RUNNING with 1 replica", lambda: _running_only(head, 1), timeout=300)
        deployed = mark("deployed: RUNNING, 1 replica")
        status = head.status()
        app = status["applications"][APP]
        assert app["status"] == "RUNNING", status
        assert app["deployments"][DEPLOYMENT]["status"] == "HEALTHY", status
        assert app["deployments"][DEPLOYMENT]["replica_states"] == {"RUNNING": 1}, status
        # The proxy learns the new route by long poll: the first requests right after RUNNING may still get a 404.
        health = _wait("/healthz to answer 200", lambda: _get(f"{url}/healthz"), timeout=60)
        assert health.json()["status"] == "ready", health.text
        model = requests.get(f"{url}/v1/model", timeout=60).json()
        assert model["source"] == "weights" and model["weights"] == str(old) and model["weights_sha256"] == old_hash
        reply = requests.post(f"{url}/v1/restore", data=body, headers={"Content-Type": "image/png"}, timeout=120)
        assert reply.status_code == 200, reply.text[:500]
        assert reply.headers["x-weights-sha256"] == old_hash
        restored = np.asarray(Image.open(io.BytesIO(reply.content)))
        assert restored.shape == image.shape and restored.dtype == np.uint8
        assert not np.array_equal(restored, image)  # non-identity weights changed the pixels

        # -- redeploy with new weights under a client loop: no request dropped, responses switch ---------------------
        with Clients(url, body, 1) as loop:
            _wait("two replies before the redeploy", lambda: len(loop.snapshot()) >= 2, timeout=60)
            redeploy_started = mark("serve deploy (weights seed 2) while a client loop runs")
            head.deploy(second)

            def switched() -> bool:
                tail = loop.snapshot()[-3:]
                return len(tail) == 3 and all(r[3] == new_hash for r in tail) and _running_only(head, 1)

            _wait("the responses to switch to the new weights", switched)
        records, errors = loop.snapshot(), loop.errors()
        first_new = min(r[1] for r in records if r[3] == new_hash)  # when the first new-weights reply arrived
        switched_at = mark(
            f"redeploy: first reply with the new hash ({first_new - t0 - redeploy_started:.1f} s after serve deploy)",
            at=first_new,
        )
        hashes = [r[3] for r in records]
        old_after_new = sum(1 for r in records if r[3] == old_hash and r[1] > first_new)
        print(
            f"[serve-cluster] redeploy loop: {len(records)} requests, {len(errors)} errors, "
            f"{hashes.count(old_hash)} old / {hashes.count(new_hash)} new, {old_after_new} old after the first new, "
            f"longest {max(r[1] - r[0] for r in records):.1f} s",
            flush=True,
        )
        assert not errors, errors[:3]
        assert Counter(hashes).keys() == {old_hash, new_hash}, Counter(hashes)
        # The loop spanned the redeploy: requests before it, and requests sent while it was under way.
        assert any(r[0] < t0 + redeploy_started for r in records)
        assert any(t0 + redeploy_started <= r[0] < first_new for r in records)
        assert hashes[-3:] == [new_hash] * 3
        status = head.status()["applications"][APP]
        assert status["status"] == "RUNNING" and status["deployments"][DEPLOYMENT]["replica_states"] == {"RUNNING": 1}
        model = requests.get(f"{url}/v1/model", timeout=60).json()
        assert model["weights"] == str(new) and model["weights_sha256"] == new_hash

        # -- autoscaling: 1 -> 2 under a bounded load, back to 1 after it ---------------------------------------------
        most = 0  # the most replicas (any state) seen at once

        def count(states: Counter) -> Counter:
            nonlocal most
            most = max(most, sum(states.values()))
            return states

        load_started = mark(f"load: {LOAD_CLIENTS} loopback clients")
        with Clients(url, body, LOAD_CLIENTS) as load:

            def two_running() -> bool:
                return count(head.replica_states()[1]).get("RUNNING", 0) >= 2

            _wait("2 RUNNING replicas under load", two_running)
            up = mark(f"scaled to 2 replicas (+{time.monotonic() - t0 - load_started:.1f} s after the load began)")
        load_stopped = mark("load stopped")
        load_records = load.snapshot()
        print(f"[serve-cluster] load: {len(load_records)} requests, {len(load.errors())} errors", flush=True)
        assert not load.errors(), load.errors()[:3]
        assert all(r[3] == new_hash for r in load_records)

        def back_to_one() -> bool:
            status, states = head.replica_states()
            return status == "RUNNING" and count(states) == Counter({"RUNNING": 1})

        _wait("1 replica after the load", back_to_one)
        down = mark(f"back to 1 replica (+{time.monotonic() - t0 - load_stopped:.1f} s after the load stopped)")
        assert most <= AUTOSCALING["max_replicas"] + 1, most  # + 1: a replica may be STOPPING meanwhile
        status = head.status()["applications"][APP]
        assert status["deployments"][DEPLOYMENT]["replica_states"] == {"RUNNING": 1}, status
        assert requests.get(f"{url}/healthz", timeout=60).status_code == 200
        session = head.session
        mark("stopping the head (SIGTERM, then SIGKILL, to its session's processes)")
    # ServeHead.stop() asserted that no process of the head's session is left; check once more from here.
    assert session is not None and not running_in_session(session)
    total = mark(f"head stopped, none of its processes left (SIGKILLed: {head.outlived_sigterm or 'none'})")
    print(
        "[serve-cluster] timeline: deployed at {:.1f} s ({:.1f} s after serve deploy), redeploy switched at {:.1f} s "
        "({:.1f} s after serve deploy), scaled to 2 at {:.1f} s ({:.1f} s after the load began), back to 1 at {:.1f} s "
        "({:.1f} s after the load stopped), total {:.1f} s".format(
            deployed,
            deployed - deploy_started,
            switched_at,
            switched_at - redeploy_started,
            up,
            up - load_started,
            down,
            down - load_stopped,
            total,
        ),
        flush=True,
    )
