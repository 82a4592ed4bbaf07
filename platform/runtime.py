"""The process runtime every job shares: the one way to start (or join) Ray, to stop what was started on SIGTERM and
SIGINT, and to pick a torch device.

:func:`ray_session` is what jobs use::

    with ray_session(address=config.ray_address) as session:   # joins RAY_ADDRESS / address, or starts a local Ray
        ...                                                     # session.started_here: True for a local Ray

A local Ray is started with explicit settings (:class:`LocalRaySettings`): its CPUs, a bounded object store
(Ray's default would claim about 30 % of the machine's memory), the dashboard on 127.0.0.1 at a free port (Ray Train's
placement-group cleaner asks its state API whether the Train controller is alive; at the default port 8265 another
Ray's dashboard on the same machine would answer for it), and Ray's token authentication left on (Ray 2.60's default:
the local cluster writes ``~/.ray/auth_token`` and clients present it). A Ray this process only joined is never
shut down by it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import sys
from collections.abc import Iterator
from dataclasses import dataclass

log = logging.getLogger(__name__)

#: Object store of the local Ray that jobs start in-process (the embedded default): room for a decoded training cache
#: of up to 256 MiB (a quarter of the store), about twice the default corpus's estimate (3 x 40 MB of train shards).
LOCAL_OBJECT_STORE_BYTES = 1024 * 2**20


@dataclass(frozen=True)
class LocalRaySettings:
    """How a local Ray is started when no cluster address is given."""

    num_cpus: int | None = None  # None: every CPU of this machine, at least 2 (Ray Data reads need a CPU of their own)
    object_store_bytes: int = LOCAL_OBJECT_STORE_BYTES
    dashboard: bool = True  # on 127.0.0.1 at a free port; Ray Train needs it (see the module docstring)
    log_to_driver: bool = True  # worker output shown in this process
    worker_niceness: int | None = None  # RAY_worker_niceness for the raylet this call starts (benchmarks)


@dataclass(frozen=True)
class RaySession:
    """The Ray this process uses: ``started_here`` is True when this process started it (and must stop it)."""

    started_here: bool
    address: str | None


def free_loopback_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cluster_address(address: str | None = None) -> str | None:
    """The cluster to join: ``address`` if given, else ``RAY_ADDRESS``; None means start a local Ray."""
    return address or os.environ.get("RAY_ADDRESS") or None


def loopback_only() -> None:
    """Make a local Ray bind every port to 127.0.0.1 (single node). Read by Ray when it is first imported, so this
    is a no-op once ``ray`` is imported."""
    if "ray" not in sys.modules:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def init_ray(address: str | None = None, local: LocalRaySettings = LocalRaySettings(), *,
             quiet: bool = True, runtime_env: dict | None = None) -> RaySession:
    """Join ``address`` (or ``RAY_ADDRESS``), or start a local Ray with ``local``'s settings; a Ray that is already
    initialised in this process (the test session's, a job's caller's) is used as it is.

    ``quiet`` keeps Ray's own INFO chatter (start-up banners, Ray Data execution plans, Train report dumps) out of
    the console; see :func:`quiet_ray_logging`. ``runtime_env`` is the job's runtime environment (env_vars,
    working_dir, ...).
    """
    loopback_only()
    import ray

    if quiet:
        quiet_ray_logging()
    if ray.is_initialized():
        return RaySession(started_here=False, address=None)
    joined = cluster_address(address)
    if joined:
        ray.init(address=joined, log_to_driver=local.log_to_driver, runtime_env=runtime_env,
                 logging_level=logging.WARNING if quiet else logging.INFO)  # fmt: skip
        return RaySession(started_here=False, address=joined)
    cpus = local.num_cpus or max(2, os.cpu_count() or 2)
    previous = os.environ.get("RAY_worker_niceness")
    if local.worker_niceness is not None:
        os.environ["RAY_worker_niceness"] = str(local.worker_niceness)  # read by the raylet that ray.init starts
    try:
        ray.init(num_cpus=cpus, object_store_memory=local.object_store_bytes, include_dashboard=local.dashboard,
                 dashboard_host="127.0.0.1", dashboard_port=free_loopback_port() if local.dashboard else None,
                 log_to_driver=local.log_to_driver, configure_logging=not quiet, runtime_env=runtime_env,
                 logging_level=logging.WARNING if quiet else logging.INFO)  # fmt: skip
    finally:
        if previous is None:
            os.environ.pop("RAY_worker_niceness", None)
        else:
            os.environ["RAY_worker_niceness"] = previous
    return RaySession(started_here=True, address=None)


def quiet_ray_logging() -> None:
    """Ray's own loggers at WARNING in this process, and in the workers Ray starts from here: no Ray Data
    "Starting execution / Execution plan" lines, no Ray Train ``TrainingReport(...)`` dumps, no deprecation notes.
    ``verbose=true`` in a job's config skips this."""
    for name in ("ray", "ray.data", "ray.train", "ray.tune", "ray.serve"):
        logging.getLogger(name).setLevel(logging.WARNING)


class Stopped(KeyboardInterrupt):
    """Raised in the main thread when SIGTERM arrives, so ``finally`` blocks shut down what the job started."""


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Turn SIGTERM (what a service manager or Kubernetes sends) into :class:`Stopped`, as SIGINT is turned into
    KeyboardInterrupt, for the duration of the block; the previous handlers come back afterwards. Main thread only."""
    previous = signal.getsignal(signal.SIGTERM)

    def on_term(signum, frame):  # noqa: ARG001 - signal handler signature
        raise Stopped(f"signal {signal.Signals(signum).name}")

    signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def ray_session(address: str | None = None, local: LocalRaySettings = LocalRaySettings(), *,
                quiet: bool = True, serve: bool = False) -> Iterator[RaySession]:
    """:func:`init_ray`, and on leaving the block -- normally, on an error, on Ctrl-C or on SIGTERM -- shut down what
    this process started: Ray Serve (with ``serve``) and a local Ray. A joined cluster is left alone (a Serve
    application deployed to it keeps running)."""
    session = init_ray(address, local, quiet=quiet)
    try:
        with stop_on_signals():
            yield session
    finally:
        if session.started_here:
            shutdown_ray(serve=serve)


def shutdown_ray(serve: bool = False) -> None:
    """Stop Serve (when asked) and the Ray this process started; every step is attempted even if one fails."""
    import ray

    if serve:
        try:
            from ray import serve as ray_serve

            ray_serve.shutdown()
        except Exception as err:  # noqa: BLE001 - still shut Ray down below
            log.warning("serve.shutdown failed: %s", err)
    # Ignore a second SIGTERM/SIGINT while the local cluster's processes are being stopped.
    with contextlib.suppress(ValueError):  # not the main thread: no handlers to change
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        ray.shutdown()
    finally:
        with contextlib.suppress(ValueError):
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.default_int_handler)


def resolve_device(name: str = "auto"):
    """``auto`` -> ``cuda`` when torch sees a GPU, else ``cpu``; a CUDA device asked for without CUDA is an error
    that names the fix."""
    import torch

    if isinstance(name, torch.device):
        return name
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device={name} was asked for, but torch {torch.__version__} sees no CUDA device; "
                           "use device=cpu or device=auto")  # fmt: skip
    return device
