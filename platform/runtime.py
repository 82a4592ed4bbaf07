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

Stopping. The processes of a local Ray (GCS, raylet, dashboard, monitors; the raylet's agents and workers inherit
theirs) are started in process groups of their own, so a signal sent to the job's process group -- what ``timeout``,
a terminal's Ctrl-C and many supervisors send -- reaches only the driver, which then shuts Serve and Ray down in order
(a raylet that got the same SIGTERM used to die first and leave the driver hanging on a dead Ray). Whatever the Ray
processes got, :func:`shutdown_ray` is bounded: past :data:`SHUTDOWN_DEADLINE_S` it kills what is left of the Ray
this process started, and a job stopped by a signal exits with ``128 + signal`` (:func:`stop_exit_code`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

log = logging.getLogger(__name__)

#: Object store of the local Ray that jobs start in-process (the embedded default): room for a decoded training cache
#: of up to 768 MiB (a quarter of the store), above the default corpus's estimate (3 x 192 MB of train shards). Ray
#: takes it from /dev/shm only as objects are stored, so a smaller job does not pay for it.
LOCAL_OBJECT_STORE_BYTES = 3 * 2**30
#: Object store of a local Ray whose tasks pass little data (serving, evaluation, description jobs, the tests).
SMALL_OBJECT_STORE_BYTES = 256 * 2**20


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


def init_ray(
    address: str | None = None,
    local: LocalRaySettings = LocalRaySettings(),
    *,
    quiet: bool = True,
    runtime_env: dict | None = None,
) -> RaySession:
    """Join ``address`` (or ``RAY_ADDRESS``), or start a local Ray with ``local``'s settings; a Ray that is already
    initialised in this process (the test session's, a job's caller's) is used as it is.

    ``quiet`` keeps Ray's own INFO chatter (start-up banners, Ray Data execution plans, Train report dumps) out of
    the console; see :func:`quiet_ray_logging`. ``runtime_env`` is the job's runtime environment (env_vars,
    working_dir, ...).
    """
    loopback_only()
    import ray

    joined = cluster_address(address)
    if quiet:
        quiet_ray_logging(local=joined is None)
    if ray.is_initialized():
        return RaySession(started_here=False, address=None)
    if joined:
        ray.init(
            address=joined,
            log_to_driver=local.log_to_driver,
            runtime_env=runtime_env,
            logging_level=logging.WARNING if quiet else logging.INFO,
        )
        return RaySession(started_here=False, address=joined)
    cpus = local.num_cpus or max(2, os.cpu_count() or 2)
    previous = os.environ.get("RAY_worker_niceness")
    if local.worker_niceness is not None:
        os.environ["RAY_worker_niceness"] = str(local.worker_niceness)  # read by the raylet that ray.init starts
    try:
        with _ray_processes_in_own_process_groups():
            ray.init(
                num_cpus=cpus,
                object_store_memory=local.object_store_bytes,
                include_dashboard=local.dashboard,
                dashboard_host="127.0.0.1",
                dashboard_port=free_loopback_port() if local.dashboard else None,
                log_to_driver=local.log_to_driver,
                configure_logging=not quiet,
                runtime_env=runtime_env,
                logging_level=logging.WARNING if quiet else logging.INFO,
            )
    finally:
        if previous is None:
            os.environ.pop("RAY_worker_niceness", None)
        else:
            os.environ["RAY_worker_niceness"] = previous
    return RaySession(started_here=True, address=None)


@contextlib.contextmanager
def _ray_processes_in_own_process_groups() -> Iterator[None]:
    """For the block (the ``ray.init`` that starts a local Ray): every process Ray's node start-up spawns (GCS, raylet,
    dashboard, monitors; what the raylet spawns inherits the raylet's group) starts in a process group of its own.

    Why: those processes are otherwise in the driver's process group, so a SIGTERM sent to the group reaches the
    raylet and GCS together with the driver; they die (or start dying) before the driver has stopped Serve and Ray,
    and the driver then waits on a dead Ray (measured: Serve's controller "failed to shut down within 30 s", the
    driver still alive 40 s after the signal). ``ray.init`` offers no option for this; Ray 2.60 spawns them all
    through ``ray._private.services.ConsolePopen`` (a ``subprocess.Popen``), which this swaps for a subclass that
    adds ``process_group=0`` (``setpgid(0, 0)`` in the child) for the block. They stay in the driver's session, and
    Ray's kernel fate-sharing (``PR_SET_PDEATHSIG``) still kills them if the driver is killed. A Ray whose layout
    differs is started as it is, with a warning (tests/test_shutdown.py checks the groups)."""
    try:
        from ray._private import services
    except ImportError:
        services = None
    original = getattr(services, "ConsolePopen", None)
    if sys.platform == "win32" or not isinstance(original, type) or sys.version_info < (3, 11):
        log.warning("Ray's processes start in the driver's process group (no known hook in this Ray or Python)")
        yield
        return

    class OwnProcessGroupPopen(original):  # type: ignore[misc, valid-type]
        def __init__(self, *args, **kwargs):
            kwargs.setdefault("process_group", 0)
            super().__init__(*args, **kwargs)

    services.ConsolePopen = OwnProcessGroupPopen
    try:
        yield
    finally:
        services.ConsolePopen = original


#: Ray Data reads its logging configuration from the file this variable names, in every process that imports it
#: (the driver, Ray Train's data coordinator actors, Ray Data's tasks).
RAY_DATA_LOGGING_CONFIG_VAR = "RAY_DATA_LOGGING_CONFIG"
#: Ray Train's preemption watcher (an actor per worker group, on by default): it polls for nodes being drained, which
#: cannot happen to a single-node Ray started by this process; creating it logs a core-worker error line each run.
RAY_TRAIN_PREEMPTION_WATCHER_VAR = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"
#: Ray Data's logger of its "Progress bars disabled" notice.
PROGRESS_NOTICE_LOGGER = "ray.data._internal.progress"
#: Logger of Ray's notice that a new local Ray has token authentication on (its default; see the module docstring).
RAY_TOKEN_NOTICE_LOGGER = "ray._private.authentication.authentication_token_setup"


class _DropTokenAuthEnabledNotice(logging.Filter):
    # Only the notice that auth is *on* (the default); the warning that a cluster runs without it stays visible.
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Token authentication is enabled for this Ray cluster")


def quiet_ray_logging(local: bool | None = None) -> None:
    """Keep Ray's own chatter out of the console of this process and of the workers Ray starts from here; Ray's
    warnings and errors still show, and Ray's log files in the session folder keep every level. ``verbose=true`` in
    a job's config skips this. ``local``: this process starts (or runs in) a single-node Ray of its own; None infers
    it from ``RAY_ADDRESS`` being unset (a caller that joins an explicit address should pass ``local=False``).

    - Ray Data ("Starting execution", "Execution plan of Dataset ...", "execution finished", "Progress bars
      disabled"): Ray Data configures its ``ray.data`` logger itself on import, from the file named by
      ``RAY_DATA_LOGGING_CONFIG``. This writes Ray's default configuration with the console handler at WARNING
      (the progress-bar notice's logger at ERROR) and points the variable at it; the local Ray's workers inherit it,
      this process applies it at once. A ``RAY_DATA_LOGGING_CONFIG`` already set is respected.
    - Deprecation warnings Ray raises about its own calls (Ray Train's data ingest passes Ray Data the deprecated
      ``exclude_resources``): ignored here, and through ``PYTHONWARNINGS`` in the workers (unless already set).
    - With ``local``: Ray Train's preemption watcher off (see :data:`RAY_TRAIN_PREEMPTION_WATCHER_VAR`; Ray Train
      hands this variable from the driver to its controller). A joined cluster keeps it.
    - Driver-side loggers ``ray``, ``ray.train``, ``ray.tune``, ``ray.serve`` at WARNING; Ray's notice that token
      authentication is on dropped.

    Not covered, because no variable reaches it: Ray Train configures the loggers of its controller and worker
    actors itself (worker-group start-up, "Setting up process group", "Checkpoint successfully created"), at the
    level of the trainer's ``RunConfig(logging_config=ray.train.LoggingConfig(log_level=...))``, which a quiet
    trainer sets to ``"WARNING"``; its per-report "Reporting training result N: TrainingReport(...)" line escapes
    that level and is quietened in the worker by :func:`quiet_ray_train_worker`.
    """
    import warnings

    from ray.util.annotations import RayDeprecationWarning

    for name in ("ray", "ray.train", "ray.tune", "ray.serve"):
        logging.getLogger(name).setLevel(logging.WARNING)
    token_logger = logging.getLogger(RAY_TOKEN_NOTICE_LOGGER)
    if not any(isinstance(f, _DropTokenAuthEnabledNotice) for f in token_logger.filters):
        token_logger.addFilter(_DropTokenAuthEnabledNotice())

    warnings.filterwarnings("ignore", category=RayDeprecationWarning)
    # A RayDeprecationWarning is a DeprecationWarning; with PYTHONWARNINGS set, Ray also skips re-enabling its own.
    os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning")

    if local is None:
        local = cluster_address() is None
    if local:
        os.environ.setdefault(RAY_TRAIN_PREEMPTION_WATCHER_VAR, "0")

    if RAY_DATA_LOGGING_CONFIG_VAR not in os.environ:
        # A console setting must never stop a job: if this Ray's layout differs, say so and leave Ray Data as it is.
        try:
            from ray.data._internal import logging as ray_data_logging  # imports ray.data (the jobs import it anyway)

            path = _quiet_ray_data_logging_file(ray_data_logging.DEFAULT_CONFIG)
        except (ImportError, AttributeError, KeyError, TypeError, OSError) as err:
            log.warning("Ray Data's console stays at INFO (its logging configuration could not be written: %s)", err)
        else:
            os.environ[RAY_DATA_LOGGING_CONFIG_VAR] = path
            ray_data_logging.configure_logging()  # this process imported ray.data already: apply the file now


def quiet_ray_train_worker() -> None:
    """The part of :func:`quiet_ray_logging` that only a Ray Train worker can do; the training function calls it
    first thing unless ``verbose=true``. Ray Train 2.60 logs "Reporting training result N: TrainingReport(...)" for
    every report through a logger named by its file path (``logging.getLogger(__file__)`` in its execution context),
    outside the ``ray.train`` loggers that ``RunConfig.logging_config`` filters, so the line reaches the worker's
    console at INFO; this raises that logger to WARNING. A Ray whose logger is a ``ray.train`` one is left alone."""
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray layout: nothing known to quieten
        return
    logger = getattr(context, "logger", None)
    if isinstance(logger, logging.Logger) and not logger.name.startswith("ray.train"):
        logger.setLevel(logging.WARNING)


def _quiet_ray_data_logging_file(default: dict) -> str:
    """Ray Data's ``default`` logging configuration with its console at WARNING, written once (JSON is YAML) under
    the temporary folder, named by its content so that concurrent jobs never write different files to one path;
    returns the file's path."""
    import copy
    import hashlib
    import json
    import tempfile
    from pathlib import Path

    from datprl.platform.storage import atomic_write_bytes

    config = copy.deepcopy(default)
    console = config["handlers"]["console"]  # KeyError: a Ray whose default configuration is laid out differently
    console["level"] = "WARNING"
    # "Progress bars disabled. To enable, set ...": the jobs turn Ray Data's bars off on purpose. Its logger gets
    # ray.data's handlers and no propagation (a handler Ray Data adds per dataset would otherwise see records twice).
    # Only Ray's own classes are named here: every process that imports ray.data loads this file.
    config["loggers"][PROGRESS_NOTICE_LOGGER] = {**config["loggers"]["ray.data"], "level": "ERROR", "propagate": False}
    data = json.dumps(config, indent=1, sort_keys=True).encode()
    uid = os.getuid() if hasattr(os, "getuid") else "user"
    name = f"ray-data-logging-{hashlib.sha256(data).hexdigest()[:12]}.json"
    path = Path(tempfile.gettempdir()) / f"datprl-{uid}" / name
    if not path.exists():
        atomic_write_bytes(path, data)
    return str(path)


class Stopped(KeyboardInterrupt):
    """Raised in the main thread when SIGTERM arrives, so ``finally`` blocks shut down what the job started.

    A signal that interrupts a blocking Ray call (``ray.get``, so also ``trainer.fit()``) surfaces as a plain
    KeyboardInterrupt: Ray turns an interrupted wait into one. Catch KeyboardInterrupt, not Stopped, to handle both;
    :func:`stop_exit_code` tells which signal it was."""


#: The last stop signal :func:`stop_on_signals` handled in this process (None: none since :func:`ray_session` began).
_stop_signal: int | None = None


def stop_exit_code() -> int:
    """The exit status of a job stopped by a signal: ``128 + signal number``, as a shell reports a process the signal
    ended -- 143 for SIGTERM, 130 for SIGINT (Ctrl-C, and any KeyboardInterrupt no handler recorded)."""
    return 128 + (_stop_signal if _stop_signal is not None else signal.SIGINT)


def _main_thread() -> bool:
    # Python runs signal handlers in the main thread only, and only the main thread may install them.
    return threading.current_thread() is threading.main_thread()


def _restore_handler(signum: int, handler) -> None:
    # getsignal() answers None for a handler that was not installed from Python: the default is the safe stand-in.
    signal.signal(signum, signal.SIG_DFL if handler is None else handler)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Turn SIGTERM (what a service manager or Kubernetes sends) into :class:`Stopped` and SIGINT into
    KeyboardInterrupt for the duration of the block -- SIGINT too because a process started in the background by a
    shell inherits it ignored -- recording which one came (:func:`stop_exit_code`), and put the previous handlers back
    afterwards. Outside the main thread, where no handler can be installed, the block runs as it is."""
    if not _main_thread():
        yield
        return
    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}

    def on_signal(signum, frame):  # noqa: ARG001 - signal handler signature
        global _stop_signal
        _stop_signal = signum
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise Stopped(f"signal {signal.Signals(signum).name}")

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            _restore_handler(signum, handler)


@contextlib.contextmanager
def ray_session(
    address: str | None = None, local: LocalRaySettings = LocalRaySettings(), *, quiet: bool = True, serve: bool = False
) -> Iterator[RaySession]:
    """:func:`init_ray`, and on leaving the block -- normally, on an error, on Ctrl-C or on SIGTERM, also one that
    arrives while Ray is starting -- shut down what this process started: Ray Serve (with ``serve``) and a local Ray,
    within :data:`SHUTDOWN_DEADLINE_S` (:func:`shutdown_ray`). A joined cluster is left alone (a Serve application
    deployed to it keeps running). A job that catches the KeyboardInterrupt of a stop returns :func:`stop_exit_code`."""
    global _stop_signal
    _stop_signal = None
    ray_module = sys.modules.get("ray")  # not imported yet: init_ray imports it (after loopback_only)
    starts_local = cluster_address(address) is None and not (ray_module is not None and ray_module.is_initialized())
    session: RaySession | None = None
    with stop_on_signals():
        try:
            session = init_ray(address, local, quiet=quiet)
            # ray.init replaces the SIGTERM handler with its own (Python, then C++: see _cancel_abort_watchdog): until
            # these lines install ours again, SIGTERM surfaces as SystemExit -- also handled by the finally below.
            with stop_on_signals():
                yield session
        finally:
            if session.started_here if session is not None else starts_local:
                shutdown_ray(serve=serve)


def _cancel_abort_watchdog() -> None:
    """Disarm the abort timer of Ray's C++ failure-signal handler. ray.init installs that handler for SIGTERM in this
    process; when it handles a SIGTERM (one that arrives before :func:`ray_session` installs its own handler again)
    it prints a stack trace, hands the signal to the Python handler and arms a 3-second ``alarm``, whose SIGALRM
    handler aborts the process -- in the middle of shutting Serve and Ray down, which takes longer, leaving Ray's
    agents and workers running. No job here uses SIGALRM."""
    if hasattr(signal, "alarm"):
        signal.alarm(0)


@contextlib.contextmanager
def _signals_ignored() -> Iterator[None]:
    """SIGTERM and SIGINT ignored for the block (main thread only), the previous handlers back afterwards."""
    if not _main_thread():
        yield
        return
    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}
    for signum in previous:
        signal.signal(signum, signal.SIG_IGN)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            _restore_handler(signum, handler)


#: The longest :func:`shutdown_ray` waits for Serve and a local Ray to stop in order (about 5 s when Ray is sound)
#: before it kills what is left of that Ray; with the kill and the exit it keeps a stop within 30 s.
SHUTDOWN_DEADLINE_S = 20.0
#: After that kill, how long the main thread gets to come back from the Ray call it was stuck in before the process
#: exits without it (:func:`os._exit`, status :func:`stop_exit_code`) -- when a stop signal came. A job that ends on
#: its own still has work to do after Ray (a training run exports its weights): it gets longer, then exits with 1.
SHUTDOWN_EXIT_GRACE_S = 5.0
SHUTDOWN_EXIT_GRACE_UNSIGNALLED_S = 60.0
#: How long the processes of a local Ray get to exit after ``ray.shutdown`` returned before they are killed.
SHUTDOWN_REAP_S = 5.0


class _LocalRayProcesses:
    """The processes of the local Ray this process started: those Ray's node start-up spawned (GCS, raylet,
    dashboard, monitors), all their descendants (the raylet's agents and workers) and, with ``orphans``, the workers
    of a raylet that died (re-parented, so no longer its descendants; found by the ``RAY_RAYLET_PID`` Ray gives every
    worker). Remembered as they are seen; a pid reused by another process is not taken for one of them (psutil
    checks the start time)."""

    def __init__(self, node) -> None:
        self._node = node
        self._known: dict[int, object] = {}  # pid -> psutil.Process
        self._raylet_pids: set[str] = set()  # kept: ray.shutdown empties the node's table
        self._lock = threading.Lock()

    def refresh(self, orphans: bool = False) -> None:
        """Add the processes of the node running now (with ``orphans``: also its dead raylets' workers)."""
        from ray._private import ray_constants

        roots = {info.process.pid for infos in list(self._node.all_processes.values()) for info in infos}
        found = _descendants(roots)
        raylets = self._node.all_processes.get(ray_constants.PROCESS_TYPE_RAYLET, [])
        self._raylet_pids |= {str(info.process.pid) for info in raylets}
        if orphans:
            found += _workers_of(self._raylet_pids)
        with self._lock:
            for process in found:
                known = self._known.get(process.pid)
                if known is None or not known.is_running():  # new, or a pid reused after a known process exited
                    self._known[process.pid] = process

    def core_alive(self) -> bool:
        """Whether the node's GCS and raylet both still run (a Ray that can still be shut down in order)."""
        from ray._private import ray_constants

        for kind in (ray_constants.PROCESS_TYPE_GCS_SERVER, ray_constants.PROCESS_TYPE_RAYLET):
            for info in self._node.all_processes.get(kind, []):
                if info.process.poll() is not None:
                    return False
        return True

    def alive(self) -> list:
        """Those of the known processes still running (zombies count as exited)."""
        import psutil

        with self._lock:
            known = list(self._known.values())
        running = []
        for process in known:
            try:
                if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                    running.append(process)
            except psutil.Error:
                continue
        return running

    def kill(self) -> list[str]:
        """SIGKILL every known process still running; returns their names."""
        import psutil

        killed = []
        for process in self.alive():
            try:
                name = process.name()
                process.kill()  # psutil: refuses a pid now used by another process
                killed.append(f"{name} ({process.pid})")
            except psutil.Error:
                continue
        return killed


def _descendants(roots: set[int]) -> list:
    """``roots`` and all their descendants that run now, as psutil processes (one pass over the process table)."""
    import psutil

    processes = {}
    for process in psutil.process_iter(["ppid"]):
        processes[process.pid] = process
    children: dict[int, list[int]] = {}
    for pid, process in processes.items():
        children.setdefault(process.info["ppid"], []).append(pid)
    found, todo = [], [pid for pid in roots if pid in processes]
    while todo:
        pid = todo.pop()
        found.append(processes[pid])
        todo += children.get(pid, [])
    return found


def _workers_of(raylet_pids: set[str]) -> list:
    """This user's processes that Ray started for one of the raylets ``raylet_pids`` (their ``RAY_RAYLET_PID``) and
    that were created after this process (as the raylet was: a later process reusing a dead raylet's pid is not
    ours)."""
    import psutil

    me = psutil.Process()
    since, uid = me.create_time(), os.getuid()
    found = []
    for process in psutil.process_iter(["uids", "create_time"]):
        try:
            if process.pid == me.pid or process.info["uids"].real != uid or process.info["create_time"] < since:
                continue
            if process.environ().get("RAY_RAYLET_PID") in raylet_pids:
                found.append(process)
        except (psutil.Error, AttributeError):  # exited, not ours to read, or no uids (not Linux)
            continue
    return found


def _local_node():
    """The Ray node this process started (its processes are this process's to stop), or None."""
    try:
        from ray._private import worker
    except ImportError:
        return None
    node = getattr(worker, "_global_node", None)
    return node if node is not None and getattr(node, "head", False) and hasattr(node, "all_processes") else None


@contextlib.contextmanager
def _bounded_by(processes: _LocalRayProcesses | None, deadline_s: float) -> Iterator[None]:
    """Run the block (the orderly shutdown) with a watchdog thread: it keeps ``processes`` up to date, and if the
    block is still running after ``deadline_s`` -- Serve's and Ray's shutdown calls wait (30 s and more) on a GCS or
    raylet that died -- it kills them, gives the block :data:`SHUTDOWN_EXIT_GRACE_S` to come back, and otherwise
    ends this process with :func:`os._exit` (a stop must not hang; see :data:`SHUTDOWN_EXIT_GRACE_UNSIGNALLED_S`)."""
    done = threading.Event()

    def watch() -> None:
        deadline = time.monotonic() + deadline_s
        while not done.wait(1.0):
            if processes is not None:
                processes.refresh()
            if time.monotonic() < deadline:
                continue
            if processes is not None:
                processes.refresh(orphans=True)
            killed = processes.kill() if processes is not None else []
            log.error(
                "Serve and Ray did not shut down within %.0f s; killed what was left of the local Ray: %s",
                deadline_s,
                ", ".join(killed) or "nothing",
            )
            signalled = _stop_signal is not None
            if not done.wait(SHUTDOWN_EXIT_GRACE_S if signalled else SHUTDOWN_EXIT_GRACE_UNSIGNALLED_S):
                code = stop_exit_code() if signalled else 1
                log.error("the shutdown is still stuck in a Ray call; exiting now with status %d", code)
                for stream in (sys.stdout, sys.stderr):
                    with contextlib.suppress(Exception):
                        stream.flush()
                os._exit(code)
            return

    watchdog = threading.Thread(target=watch, name="datprl-shutdown-watchdog", daemon=True)
    watchdog.start()
    try:
        yield
    finally:
        done.set()
        watchdog.join(1.0)


def shutdown_ray(serve: bool = False, deadline_s: float = SHUTDOWN_DEADLINE_S) -> None:
    """Stop Serve (when asked) and the Ray this process started; every step is attempted even if one fails.

    SIGTERM and SIGINT are ignored meanwhile: a second Ctrl-C (or a SIGTERM after the first) must not interrupt the
    shutdown half-way and leave the local cluster's processes running. The previous handlers come back afterwards.

    Bounded: a local Ray whose GCS or raylet has already exited (they got the signal too, e.g. every process of a
    cgroup does under systemd's default KillMode) cannot stop Serve, so Serve is not asked and the rest of that Ray is
    killed at once; one whose shutdown passes ``deadline_s`` is killed then (see :func:`_bounded_by`). Any process of
    the local Ray still running :data:`SHUTDOWN_REAP_S` after ``ray.shutdown`` is killed too."""
    import ray

    with _signals_ignored():
        _cancel_abort_watchdog()
        node = _local_node()
        processes = _LocalRayProcesses(node) if node is not None else None
        if processes is not None:
            processes.refresh()
        with _bounded_by(processes, deadline_s):
            core_alive = processes is None or processes.core_alive()
            if not core_alive:
                processes.refresh(orphans=True)
                killed = processes.kill()
                log.warning("the local Ray's GCS or raylet had already exited; killed the rest: %s", ", ".join(killed))
            # Without Ray, serve.shutdown() would start a local Ray to look for Serve; without its GCS and raylet it
            # waits 30 s for a controller it cannot reach.
            if serve and ray.is_initialized() and core_alive:
                try:
                    from ray import serve as ray_serve

                    ray_serve.shutdown()
                except Exception as err:  # noqa: BLE001 - still shut Ray down below
                    log.warning("serve.shutdown failed: %s", err)
            ray.shutdown()
        if processes is not None:
            _reap(processes)


def _reap(processes: _LocalRayProcesses) -> None:
    """Wait up to :data:`SHUTDOWN_REAP_S` for the local Ray's processes to exit after ``ray.shutdown`` (the raylet
    stops its workers as it exits), then kill those left: none may outlive the job."""
    processes.refresh(orphans=True)  # Ray's node is down: no raylet can be starting workers any more
    deadline = time.monotonic() + SHUTDOWN_REAP_S
    while processes.alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    killed = processes.kill()
    if killed:
        log.warning("killed processes of the local Ray that outlived its shutdown: %s", ", ".join(killed))


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
        raise RuntimeError(
            f"device={name} was asked for, but torch {torch.__version__} sees no CUDA device; "
            "use device=cpu or device=auto"
        )
    return device
