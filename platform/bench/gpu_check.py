"""Every GPU check in one run that fits a short GPU loan: ``bash infra/gpu-check.sh OUT_DIR [config.yaml] [key=value
...]`` (or ``python jobs/gpu_check.py out_dir=OUT_DIR ...``) writes ``OUT_DIR/gpu-check.json`` and a Markdown summary,
``OUT_DIR/gpu-check.md``.

The steps (:data:`STEPS`, in this order; each a section of the report, see :mod:`datprl.platform.bench.gpu_steps`):

* ``model``: images/s, peak memory and MFU of the ``paper`` and ``restormer`` networks, forward+backward and
  inference, fp32 and bf16, eager and ``torch.compile`` (compile time apart from the steady state);
* ``serving``: one restoration engine on the GPU: latency and throughput at 256 and 1024 px, the largest batch that
  fits;
* ``dataset``: the default corpus (``data/default``), built when it is missing;
* ``training``: the Ray Train step against a bare PyTorch loop on the GPU (:mod:`datprl.platform.bench.train`);
* ``starvation``: the fraction of a training step's wall time the GPU waits for the real input pipeline;
* ``multi_gpu``: ``jobs/train.py`` with 2 workers on 2 GPUs for a few steps (skipped with fewer GPUs).

Survival: without a CUDA device the run stops at once with a one-line message (before Ray is imported or data is
built). Each step runs in a process of its own with a time budget (``<step>.budget_s``) inside the run's
``total_budget_s``; a step that raises, runs out of memory or time is recorded (``failed``, with the last lines of its
error) and the next step runs. A step writes its results as it goes, so a step stopped at its budget keeps what it had
measured. ``device=cpu`` runs the same code on the CPU (the test mode; ``infra/gpu-check-cpu.yaml`` has tiny sizes).
"""

from __future__ import annotations

import json
import os
import platform as _platform  # the standard module (this package's folder is datprl.platform)
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from datprl.platform.bench.common import LocalDataset, known_variants
from datprl.platform.bench.train import TrainBenchmarkConfig
from datprl.platform.runtime import stop_on_signals
from datprl.platform.config import NoRepeats, StrictModel, config_to_dict, parse_cli, save_resolved_config
from datprl.platform.storage import atomic_write_bytes

__all__ = [
    "GpuCheckConfig",
    "STEPS",
    "Skip",
    "Recorder",
    "cuda_problem",
    "run_check",
    "format_markdown",
    "main",
    "step_main",
]

StepName = Literal["model", "serving", "dataset", "training", "starvation", "multi_gpu"]
#: Every step in the order they run: the network and the engine first (they need no data), then what needs the
#: dataset, multi-GPU last (it needs the most set-up and only runs with 2 GPUs).
STEPS: tuple[str, ...] = ("model", "serving", "dataset", "training", "starvation", "multi_gpu")
TITLES = {
    "model": "Model",
    "serving": "Serving",
    "dataset": "Dataset",
    "training": "Training: Ray Train vs a bare loop",
    "starvation": "Training: data-loader starvation",
    "multi_gpu": "Multi-GPU",
}
NEEDS_DATASET = ("training", "starvation", "multi_gpu")
REPORT_JSON, REPORT_MD = "gpu-check.json", "gpu-check.md"
ERROR_LINES = 20  # lines of a failed step's error (or log) kept in the report
NO_CUDA_EXIT = 3  # exit status without a CUDA device (2: a config error, 1: a step failed)

Dtype = Literal["fp32", "bf16", "fp16"]  # autocast precisions (datprl.platform.compute.autocast)


class ModelCheck(StrictModel):
    """Images/s, peak memory and MFU of network variants; the eager runs first, then the compiled ones."""

    budget_s: float = Field(130, gt=0, description="seconds this step may take (its process is stopped after)")
    variants: Annotated[list[str], NoRepeats] = Field(["paper", "restormer"], min_length=1)
    batch: int = Field(
        18, ge=1, description="images per step: infra/train-gpu.yaml's per-GPU batch (9 tasks x per_task_batch 2)"
    )
    size: int = Field(128, ge=8, description="input height and width: the paper's 128x128 training patches")
    modes: Annotated[list[Literal["train", "inference"]], NoRepeats] = Field(
        ["train", "inference"],
        min_length=1,
        description="train: forward + L1 loss + backward in train mode; "
        "inference: forward under inference_mode in eval mode",
    )
    dtypes: Annotated[list[Dtype], NoRepeats] = Field(
        ["fp32", "bf16"], min_length=1, description="bf16, fp16: autocast"
    )
    channels_last: Annotated[list[bool], NoRepeats] = Field(
        [False], min_length=1, description="memory layouts of the eager runs: [false, true] adds channels_last"
    )
    compile: bool = Field(True, description="also time torch.compile'd models (after every eager run)")
    compile_dtypes: Annotated[list[Dtype], NoRepeats] = Field(
        ["bf16"], description="dtypes compiled (each compile takes tens of seconds: the production dtype only)"
    )
    compile_backend: Literal["inductor", "aot_eager", "eager"] = Field(
        "inductor", description="torch.compile backend; aot_eager/eager trace without generating code (CPU tests)"
    )
    warmup: int = Field(3, ge=1, description="untimed steps per run (after the compiling first call)")
    iters: int = Field(10, ge=1, description="timed steps per run; the median is reported")
    peak_tflops_bf16: float | None = Field(
        None,
        gt=0,
        description="peak TFLOP/s for bf16 and fp16 MFU; null = the table "
        "(datprl.platform.bench.model.PEAK_TFLOPS) by device name",
    )
    peak_tflops_fp32: float | None = Field(
        None,
        gt=0,
        description="peak TFLOP/s for fp32 MFU; null = the table "
        "(dense TF32: cuDNN runs fp32 convolutions on TF32 tensor cores)",
    )

    @field_validator("variants")
    @classmethod
    def _known(cls, value: list[str]) -> list[str]:
        return known_variants(value)

    @model_validator(mode="after")
    def _compiled_dtypes_are_timed(self) -> ModelCheck:
        missing = [d for d in self.compile_dtypes if d not in self.dtypes]
        if self.compile and missing:
            raise ValueError(f"compile_dtypes {missing} are not in dtypes {self.dtypes}")
        return self


class ServingCheck(StrictModel):
    """One restoration engine (``datprl.serve.engine``) on the device: latency at batch 1, throughput per batch."""

    budget_s: float = Field(50, gt=0, description="seconds this step may take (its process is stopped after)")
    variant: str = Field(
        "paper", description="the freshly initialised network served (timing does not depend on trained weights)"
    )
    sizes: Annotated[list[int], NoRepeats] = Field([256, 1024], min_length=1, description="square image edges (px)")
    requests: int = Field(20, ge=2, description="timed batch-1 calls per size (latency percentiles)")
    warmup: int = Field(2, ge=1, description="untimed calls before each timing")
    batches: Annotated[list[int], NoRepeats] = Field(
        [1, 4, 16, 64],
        min_length=1,
        description="batch sizes tried per size in increasing order, until one does not fit",
    )
    batch_iters: int = Field(3, ge=1, description="timed forwards per batch size")

    @field_validator("variant")
    @classmethod
    def _known(cls, value: str) -> str:
        return known_variants([value])[0]

    @field_validator("batches", "sizes")
    @classmethod
    def _increasing(cls, value: list[int]) -> list[int]:
        if value != sorted(value) or value[0] < 1:
            raise ValueError("must be positive and increasing")
        return value


class DatasetCheck(StrictModel):
    """The training data of the training steps: built when its manifest is missing."""

    budget_s: float = Field(
        60,
        gt=0,
        description="seconds building may take (about 1.5 min on 2 CPUs, less on 16); an existing dataset takes none",
    )
    path: LocalDataset = Field(
        "data/default",
        description="local dataset folder; the default corpus is built there when manifest.json is missing",
    )


def _gpu_benchmark() -> TrainBenchmarkConfig:
    # infra/train-gpu.yaml's recipe: `paper`, 128 px crops, 2 per task, 4 CPUs for the worker, the rest for Ray Data.
    return TrainBenchmarkConfig(
        variant="paper",
        crop_size=128,
        per_task_batch=2,
        shuffle_buffer=256,
        threads=4,
        steps=40,
        warmup_steps=10,
        report_every=10,
        rounds=1,
        cpus=16,
        cpus_per_worker=4,
    )


class TrainingCheck(StrictModel):
    """The Ray Train step against a bare PyTorch loop on the device."""

    budget_s: float = Field(100, gt=0, description="seconds this step may take (its process is stopped after)")
    benchmark: TrainBenchmarkConfig = Field(
        default_factory=_gpu_benchmark,
        description="the training benchmark's settings (jobs/benchmark_train.py); "
        "its dataset and device are the check's dataset.path and device",
    )


class StarvationCheck(StrictModel):
    """How long the training loop waits for its next batch: the model, data and CPU settings are
    ``training.benchmark``'s."""

    budget_s: float = Field(50, gt=0, description="seconds this step may take (its process is stopped after)")
    warmup_steps: int = Field(10, ge=1, description="untimed steps (first pass, warm-up of the device)")
    steps: int = Field(
        150,
        ge=1,
        description="timed steps: on the default corpus a pass is about 68 steps of the GPU "
        "recipe's batch, so 150 hold two pass starts (each a new Ray Data execution)",
    )


class MultiGpuCheck(StrictModel):
    """``jobs/train.py`` data-parallel on several GPUs for a few steps (only with that many GPUs)."""

    budget_s: float = Field(70, gt=0, description="seconds this step may take (its process is stopped after)")
    workers: int = Field(2, ge=2, description="Ray Train workers, one GPU each")
    steps: int = Field(20, ge=2, description="training steps (a report every steps/2)")
    recipe: str = Field("infra/train-gpu.yaml", description="the training config file jobs/train.py starts from")
    overrides: list[str] = Field(default_factory=list, description="further key=value overrides for jobs/train.py")


class GpuCheckConfig(StrictModel):
    """Every GPU check in one run: model, serving, training, data-loader starvation, multi-GPU; JSON + Markdown."""

    out_dir: Path = Field(description="where gpu-check.json, gpu-check.md, the resolved config and each step's log go")
    device: Literal["cuda", "cpu"] = Field(
        "cuda", description="cpu: the test mode, the same code on the CPU (infra/gpu-check-cpu.yaml sets tiny sizes)"
    )
    steps: Annotated[list[StepName], NoRepeats] = Field(
        list(STEPS), min_length=1, description="steps to run; they run in the order of gpu_check.STEPS"
    )
    threads: int | None = Field(
        None,
        ge=1,
        description="torch CPU threads of the model and serving steps; null = "
        "torch's default (the training steps use training.benchmark.threads)",
    )
    total_budget_s: float = Field(
        460,
        gt=0,
        description="the whole run's time limit (a 15-minute GPU loan leaves "
        "about 8 minutes after start-up); a step gets its budget or what is left",
    )
    dataset: DatasetCheck = DatasetCheck()
    model: ModelCheck = ModelCheck()
    serving: ServingCheck = ServingCheck()
    training: TrainingCheck = Field(default_factory=TrainingCheck)
    starvation: StarvationCheck = StarvationCheck()
    multi_gpu: MultiGpuCheck = MultiGpuCheck()

    @model_validator(mode="before")
    @classmethod
    def _pass_on_dataset_and_device(cls, data: Any) -> Any:
        # The training benchmark reads the check's dataset and trains on its device: written into its section here,
        # so that the resolved config (config.yaml) says what ran and loads again as it is.
        if not isinstance(data, dict):
            return data
        section = data.get("dataset")
        path = (section.get("path") if isinstance(section, dict) else getattr(section, "path", None)) or (
            DatasetCheck.model_fields["path"].default
        )
        device = data.get("device", cls.model_fields["device"].default)
        training = data.get("training")
        training = training.model_dump(exclude_unset=True) if isinstance(training, BaseModel) else dict(training or {})
        bench = training.get("benchmark")
        if bench is None:
            bench = _gpu_benchmark()
        bench = bench.model_dump(exclude_unset=True) if isinstance(bench, BaseModel) else dict(bench)
        for key, value, owner in (("dataset", path, "dataset.path"), ("device", device, "device")):
            # the benchmark's own default counts as not given: a CLI override into the section starts from it
            if bench.get(key, value) not in (value, TrainBenchmarkConfig.model_fields[key].default):
                raise ValueError(
                    f"training.benchmark.{key}={bench[key]!r} differs from {owner}={value!r}: set "
                    f"{owner}, the check passes it on"
                )
        if bench.get("json_out") is not None:
            raise ValueError("training.benchmark.json_out: the check writes the benchmark's results into its report")
        return {**data, "training": {**training, "benchmark": {**bench, "dataset": path, "device": device}}}

    @model_validator(mode="after")
    def _budgets_fit(self) -> GpuCheckConfig:
        for name in self.steps:
            if self.budget(name) > self.total_budget_s:
                raise ValueError(f"{name}.budget_s={self.budget(name)} exceeds total_budget_s={self.total_budget_s}")
        return self

    def budget(self, step: str) -> float:
        """The time budget (seconds) of ``step``."""
        return getattr(self, step).budget_s


# --- the device check, before anything else --------------------------------------------------------------------------


def cuda_problem() -> str | None:
    """Why this machine cannot run the GPU checks (one line, saying what to do), or None when torch sees a CUDA
    device. Imports torch only: no Ray, no data."""
    try:
        import torch
    except ImportError as err:
        return f"torch cannot be imported ({err}): run `bash infra/setup.sh` first"
    if torch.cuda.is_available():
        return None
    if torch.version.cuda is None:
        why = f"torch {torch.__version__} is a CPU-only build"
    else:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        why = f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU" + (
            f", CUDA_VISIBLE_DEVICES={visible!r}" if visible is not None else "; is the driver loaded (nvidia-smi)?"
        )
    return (
        f"no CUDA device found ({why}): run it on a machine with an NVIDIA GPU after `bash infra/setup.sh` "
        "(it installs torch's CUDA build there), or pass device=cpu for the CPU test mode"
    )


def _gpus() -> list[dict[str, Any]]:
    """The GPUs as ``nvidia-smi`` lists them (name, memory, driver), so that this process never initialises CUDA
    (its context would hold GPU memory for the whole run); torch's view without ``nvidia-smi``."""
    try:
        listed = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout
        rows = [[part.strip() for part in line.split(",")] for line in listed.strip().splitlines()]
        return [
            {"name": name, "memory_gib": round(float(mib) / 1024, 1), "driver": driver} for name, mib, driver in rows
        ]
    except (OSError, subprocess.SubprocessError, ValueError):
        import torch

        return [{"name": torch.cuda.get_device_name(i)} for i in range(torch.cuda.device_count())]


def _environment(device: str) -> dict[str, Any]:
    """What ran the check: versions, the devices, the CPUs, the code's git commit."""
    import torch

    from datprl.platform.train.provenance import git_state

    def version(package: str) -> str | None:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return None

    commit, dirty = git_state()
    return dict(
        device=device,
        gpus=_gpus() if device == "cuda" else [],
        torch=torch.__version__,
        cuda=torch.version.cuda,
        cudnn=torch.backends.cudnn.version() if device == "cuda" else None,
        ray=version("ray"),
        python=_platform.python_version(),
        cpus=os.cpu_count(),
        git_commit=commit,
        git_dirty=dirty,
    )


# --- one step in a process of its own --------------------------------------------------------------------------------


class Skip(Exception):
    """Raised by a step that does not apply here (e.g. multi-GPU with one GPU); the message says why."""


class Recorder:
    """A step's results, written to its result file after every update (so a step stopped at its budget keeps what
    it had measured) with the step's ``deadline`` (``time.monotonic()``) for steps that plan their work."""

    def __init__(self, path: Path, deadline: float) -> None:
        self.path, self.deadline = path, deadline
        self.data: dict[str, Any] = {}
        self.status, self.reason, self.error = "running", None, None

    def left(self) -> float:
        """Seconds left before the step's budget runs out."""
        return self.deadline - time.monotonic()

    def update(self, **data: Any) -> None:
        """Merge ``data`` into the results and write them."""
        self.data.update(data)
        self.save()

    def save(self) -> None:
        body = {"status": self.status, "reason": self.reason, "error": self.error, "data": self.data}
        atomic_write_bytes(self.path, (json.dumps(body, indent=1, default=str) + "\n").encode())


#: How the parent starts a step: imports this module under its own name (``-m`` would load it twice).
_CHILD = "import sys; from datprl.platform.bench.gpu_check import step_main; sys.exit(step_main(sys.argv[1:]))"
_MARGIN_S = 3.0  # a step plans to end this long before its process is stopped


def step_main(argv: Sequence[str]) -> int:
    """The process of one step: ``STEP CONFIG_JSON RESULT_JSON SECONDS``. Runs the step, records ok, skipped (a
    :class:`Skip`) or failed (any other exception, with its traceback's last lines) in the result file."""
    from datprl.platform.bench import gpu_steps

    name, config_path, result_path, seconds = argv
    config = GpuCheckConfig.model_validate_json(Path(config_path).read_text())
    record = Recorder(Path(result_path), time.monotonic() + float(seconds) - _MARGIN_S)
    record.save()
    try:
        getattr(gpu_steps, f"{name}_step")(config, record)
        record.status = "ok"
    except Skip as skip:
        record.status, record.reason = "skipped", str(skip)
    except BaseException as error:  # noqa: BLE001 - every failure is recorded; the parent runs the next step
        record.status = "failed"
        record.error = "".join(traceback.format_exception(error)).rstrip().splitlines()[-ERROR_LINES:]
        traceback.print_exc()
    record.save()
    return 0 if record.status != "failed" else 1


def _session_processes(session: int) -> set[int]:
    """Every live process of ``session`` and their descendants (Linux /proc), this process excluded; zombies (exited,
    waiting to be reaped) do not count."""
    table: dict[int, tuple[str, int, int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2 :].split()  # state ppid pgrp session ...
            table[int(entry)] = (fields[0], int(fields[1]), int(fields[3]))
    found = {pid for pid, (_, _, sid) in table.items() if sid == session}
    while True:
        children = {pid for pid, (_, ppid, _) in table.items() if ppid in found} - found
        if not children:
            break
        found |= children
    found.discard(os.getpid())
    return {pid for pid in found if table[pid][0] != "Z"}


def _stop_session(session: int, grace: float) -> None:
    """SIGTERM every process of a step's session (the step, its Ray, a jobs/train.py it started), SIGKILL what is
    left after ``grace`` seconds. Only that session is touched: another Ray on the machine keeps running."""
    if not Path("/proc").is_dir():  # not Linux: the step's process group is what can be reached
        try:
            os.killpg(session, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in _session_processes(session):
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and _session_processes(session):
            time.sleep(0.1)


def tail_lines(path: Path, lines: int = ERROR_LINES) -> list[str]:
    """The last ``lines`` lines of a log file (none when it cannot be read)."""
    try:
        return path.read_text(errors="replace").rstrip().splitlines()[-lines:]
    except OSError:
        return []


def _step_environment(name: str, config: GpuCheckConfig) -> dict[str, str]:
    """The environment of a step's process. The training steps get the benchmark's OpenMP wait policy here: libgomp
    reads it once, when torch is first imported, and validating the config in the step's process already imports
    torch (the model registry)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    policy = config.training.benchmark.omp_wait_policy
    if name in ("training", "starvation") and policy is not None:
        env["OMP_WAIT_POLICY"] = policy
    return env


def _run_step(name: str, config: GpuCheckConfig, seconds: float, config_path: Path) -> dict[str, Any]:
    """Run step ``name`` in a process of its own for at most ``seconds``; returns its report section."""
    logs = config.out_dir / "steps"
    result_path, log_path = logs / f"{name}.json", logs / f"{name}.log"
    result_path.unlink(missing_ok=True)
    start = time.monotonic()
    timed_out = False
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [sys.executable, "-c", _CHILD, name, str(config_path), str(result_path), str(seconds)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env=_step_environment(name, config),
        )
        try:
            process.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:  # also on Ctrl-C or SIGTERM: the step's session (its own, so the terminal's signals miss it) ends
            _stop_session(process.pid, grace=5.0 if process.poll() is None else 0.5)
            code = process.wait()
    section: dict[str, Any] = {"status": "failed", "reason": None, "error": None, "data": {}}
    try:
        section.update(json.loads(result_path.read_text()))
    except (OSError, ValueError):
        pass  # stopped or crashed before it wrote anything
    if timed_out or section["status"] == "running":
        _mark_stopped(section["data"])
    if timed_out:
        section["status"] = "failed"
        section["error"] = [
            f"timed out after {seconds:.0f} s (budget); results measured until then are kept",
            *tail_lines(log_path, ERROR_LINES - 1),
        ]
    elif section["status"] == "running":  # died without recording an outcome (a crash, the kernel's OOM killer)
        section["status"] = "failed"
        section["error"] = [f"the step's process exited with status {code}", *tail_lines(log_path, ERROR_LINES - 1)]
    section.update(
        title=TITLES[name], seconds=round(time.monotonic() - start, 1), budget_s=round(seconds, 1), log=str(log_path)
    )
    return section


def _mark_stopped(data: Any) -> None:
    """Entries of a stopped step still marked ``running`` (the run it was in when stopped) become ``stopped``."""
    if isinstance(data, dict):
        if data.get("status") == "running":
            data["status"] = "stopped"
        for value in data.values():
            _mark_stopped(value)
    elif isinstance(data, list):
        for value in data:
            _mark_stopped(value)


def _skipped(name: str, reason: str) -> dict[str, Any]:
    return {"status": "skipped", "reason": reason, "error": None, "data": {}, "title": TITLES[name], "seconds": 0.0}


def run_check(config: GpuCheckConfig, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the configured steps (each in its own process, within its budget and what is left of the total) and
    return the report: ``created``, ``config``, ``environment``, ``total_s`` and ``steps`` (name -> status ``ok`` /
    ``failed`` / ``skipped``, ``reason``, ``error`` (last lines), ``data``, ``seconds``, ``budget_s``, ``title``).
    Writes the JSON report and the Markdown summary to ``config.out_dir``."""
    start = time.monotonic()
    out = config.out_dir
    (out / "steps").mkdir(parents=True, exist_ok=True)
    config_path = out / "steps" / "config.json"
    atomic_write_bytes(config_path, config.model_dump_json().encode())
    save_resolved_config(config, out / "config.yaml")
    report = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": config_to_dict(config),
        "environment": _environment(config.device),
        "total_budget_s": config.total_budget_s,
        "steps": {},
    }
    for name in STEPS:
        if name not in config.steps:
            continue
        left = config.total_budget_s - (time.monotonic() - start)
        dataset = report["steps"].get("dataset")
        if name in NEEDS_DATASET and dataset is not None and dataset["status"] != "ok":
            section = _skipped(name, f"needs the dataset, and the dataset step {dataset['status']}")
        elif left < 5:
            section = _skipped(name, f"the run's total budget ({config.total_budget_s:.0f} s) is spent")
        else:
            echo(f"[gpu-check] {TITLES[name]}: running (budget {min(config.budget(name), left):.0f} s)")
            section = _run_step(name, config, min(config.budget(name), left), config_path)
        report["steps"][name] = section
        report["total_s"] = round(time.monotonic() - start, 1)
        note = section["reason"] or (section["error"] or [""])[-1]
        echo(
            f"[gpu-check] {TITLES[name]}: {section['status']} ({section['seconds']:.1f} s)"
            + (f": {note}" if section["status"] != "ok" else "")
        )
        _write(report, out)  # after every step: a run stopped from outside still leaves its report
    report["total_s"] = round(time.monotonic() - start, 1)
    _write(report, out)
    return report


def _write(report: dict[str, Any], out: Path) -> None:
    atomic_write_bytes(out / REPORT_JSON, (json.dumps(report, indent=1, default=str) + "\n").encode())
    atomic_write_bytes(out / REPORT_MD, format_markdown(report).encode())


# --- the Markdown summary --------------------------------------------------------------------------------------------


def _num(value: Any, digits: int = 1, suffix: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}{suffix}"
    return f"{value}{suffix}"


def _sig(value: float | None, suffix: str = "") -> str:
    """Three significant digits: TFLOP/s and MFU span orders of magnitude between a GPU and the CPU test mode."""
    return "-" if value is None else f"{value:.3g}{suffix}"


def _table(head: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def _model_md(data: dict[str, Any]) -> list[str]:
    rows = []
    for r in data.get("rows", []):
        note = r.get("error") or r.get("reason") or ""
        rows.append(
            [
                r["variant"],
                r["mode"],
                r["dtype"],
                "channels_last" if r["channels_last"] else "contiguous",
                "yes" if r["compiled"] else "no",
                _num(r.get("img_per_s")),
                _num(r.get("ms_per_step"), 2),
                _num(r.get("peak_mem_mib"), 0),
                _sig(r.get("tflops")),
                _sig(100 * r["mfu"], " %") if r.get("mfu") is not None else "-",
                _num(r.get("compile_s")),
                f"{r['status']}{': ' + note if note else ''}",
            ]
        )
    head = [
        "variant",
        "mode",
        "dtype",
        "layout",
        "compiled",
        "img/s",
        "ms/step",
        "peak MiB",
        "TFLOP/s",
        "MFU",
        "compile s",
        "status",
    ]
    lines = [
        f"Batch {data.get('batch')} x {data.get('size')} px on {data.get('device_name')}; median of "
        f"{data.get('iters')} timed steps after {data.get('warmup')} warm-up ones; peak memory: "
        "torch.cuda.max_memory_allocated of the run (the model, its gradients, activations).",
        "",
    ]
    flops = data.get("gflop_per_image", {})
    if flops:
        lines += [
            "FLOPs per image (FlopCounterMode on a real step; a multiply-add is 2): "
            + "; ".join(f"{v} {m} {g:.2f} GFLOP" for v, modes in flops.items() for m, g in modes.items())
            + ".",
            "",
        ]
    peaks = data.get("peaks", {})
    if peaks:
        lines += ["MFU = achieved FLOP/s / peak: " + "; ".join(f"{d}: {p}" for d, p in peaks.items()) + ".", ""]
    return lines + _table(head, rows)


def _serving_md(data: dict[str, Any]) -> list[str]:
    lines = [
        f"`{data.get('variant')}` (fresh weights, {data.get('dtype', 'fp32')}) on {data.get('device_name')}, "
        "Engine.forward: pad, forward, crop, copy to the host.",
        "",
    ]
    rows = []
    for s in data.get("sizes", []):
        lat = s.get("latency") or {}
        rows.append(
            [
                s["size"],
                _num(lat.get("p50_ms")),
                _num(lat.get("p99_ms")),
                _num(lat.get("img_per_s"), 2),
                _num(s.get("best_img_per_s"), 2),
                _num(s.get("largest_batch"), 0),
                s.get("first_failed_batch") or "-",
            ]
        )
    lines += _table(
        [
            "size px",
            "batch-1 p50 ms",
            "p99 ms",
            "batch-1 img/s",
            "best img/s",
            "largest batch run",
            "first batch that did not fit",
        ],
        rows,
    )
    batch_rows = [
        [
            s["size"],
            b["batch"],
            _num(b.get("ms_per_batch")),
            _num(b.get("img_per_s"), 2),
            _num(b.get("peak_mem_mib"), 0),
            b["status"] + (f": {b['error']}" if b.get("error") else ""),
        ]
        for s in data.get("sizes", [])
        for b in s.get("batches", [])
    ]
    if batch_rows:
        lines += ["", *_table(["size px", "batch", "ms/batch", "img/s", "peak MiB", "status"], batch_rows)]
    return lines


def _dataset_md(data: dict[str, Any]) -> list[str]:
    if "path" not in data:
        return []
    samples = ", ".join(f"{split} {count}" for split, count in data.get("samples", {}).items())
    how = f"built in {data['seconds']:.1f} s" if data.get("built") else "already there"
    return [f"`{data['path']}`: {how}; samples per split: {samples}."]


def _training_md(data: dict[str, Any]) -> list[str]:
    if not data.get("results"):
        return []
    from datprl.platform.bench.train import format_report

    return [
        f"Device {data.get('device')}, {data.get('variant')}, crop {data.get('crop_size')}, "
        f"{data.get('cpus')} CPUs for Ray.",
        "",
        format_report(data),
    ]


def _starvation_md(data: dict[str, Any]) -> list[str]:
    if "wait_fraction" not in data:
        return []
    head = [
        "steps",
        "batch",
        "wait s",
        "step s",
        "GPU waits for data",
        "median wait ms",
        "median step ms",
        "pass starts",
        "waits at pass starts s",
        "data CPUs",
        "decoded cache",
    ]
    row = [
        data["steps"],
        data["batch"],
        _num(data["wait_s"], 2),
        _num(data["step_s"], 2),
        _num(100 * data["wait_fraction"], 1, " %"),
        _num(data["median_wait_ms"], 2),
        _num(data["median_step_ms"], 1),
        data["pass_starts"],
        _num(data["pass_start_wait_s"], 2),
        data["data_cpus"],
        "yes" if data["cached"] else "no",
    ]
    return [
        f"{data.get('variant')}, crop {data.get('crop_size')}: the time blocked in the batch iterator over the "
        "time of each step (iterator + train_step, the device synchronised after it).",
        "",
        *_table(head, [row]),
    ]


def _multi_gpu_md(data: dict[str, Any]) -> list[str]:
    if "command" not in data:
        return []
    lines = [f"`{' '.join(data['command'])}`: exit status {data.get('returncode')}."]
    if data.get("reports"):
        last = data["reports"][-1]
        lines.append(
            f"Last report: step {last.get('step')}, {_num(last.get('samples_per_s'), 1)} samples/s over "
            f"{data.get('workers')} workers, loss {_num(last.get('loss'), 4)}."
        )
    if data.get("setup_line"):
        lines.append(f"Stated at start: `{data['setup_line']}`.")
    if "ddp_equivalence_returncode" in data:
        passed = data["ddp_equivalence_returncode"] == 0
        lines.append(f"1-vs-2-worker DDP equivalence test on the GPUs: {'passed' if passed else 'FAILED'}.")
    return lines


_SECTION_MD = {
    "model": _model_md,
    "serving": _serving_md,
    "dataset": _dataset_md,
    "training": _training_md,
    "starvation": _starvation_md,
    "multi_gpu": _multi_gpu_md,
}


def format_markdown(report: dict[str, Any]) -> str:
    """The Markdown summary of a :func:`run_check` report (also of one read back from ``gpu-check.json``): the
    environment, a status table of the steps, a section per step with its numbers, the errors' last lines."""
    env = report.get("environment", {})
    gpus = env.get("gpus") or []
    device = ", ".join(g["name"] for g in gpus) if gpus else env.get("device", "?")
    commit = env.get("git_commit")
    lines = [
        "# GPU check",
        "",
        f"{device}; torch {env.get('torch')} (CUDA {env.get('cuda')}), Ray {env.get('ray')}, {env.get('cpus')} "
        f"CPUs; commit {commit[:12] if commit else 'unknown'}{' (modified)' if env.get('git_dirty') else ''}; "
        f"{report.get('created')}; {_num(report.get('total_s'))} s of {_num(report.get('total_budget_s'))} s.",
        "",
    ]
    steps = report.get("steps", {})
    rows = []
    for name, s in steps.items():
        note = s.get("reason") or (s.get("error") or [""])[0]
        rows.append(
            [
                s.get("title", name),
                s["status"],
                _num(s.get("seconds"), 1, " s"),
                _num(s.get("budget_s"), 0, " s"),
                note.replace("|", "/"),
            ]
        )
    lines += _table(["step", "status", "time", "budget", "note"], rows)
    for name, s in steps.items():
        lines += ["", f"## {s.get('title', name)}", ""]
        if s["status"] == "skipped":
            lines.append(f"Skipped: {s.get('reason')}")
            continue
        body = _SECTION_MD.get(name, lambda d: [f"`{json.dumps(d)}`"])(s.get("data") or {})
        lines += body or ["No results."]
        if s.get("error"):
            lines += ["", f"{s['status']}; the error's last lines:", "", "```", *s["error"], "```"]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str]) -> int:
    """Entry point of ``jobs/gpu_check.py``: 0 when every step ran (ok or skipped), 1 when one failed,
    :data:`NO_CUDA_EXIT` without a CUDA device (``device=cuda``), 2 for a bad config."""
    config = parse_cli(GpuCheckConfig, argv, prog="gpu-check")
    if config.device == "cuda":
        problem = cuda_problem()
        if problem is not None:
            print(f"gpu-check: error: {problem}", file=sys.stderr)
            return NO_CUDA_EXIT
    try:
        with stop_on_signals():
            report = run_check(config)
    except KeyboardInterrupt:  # the running step's processes are stopped; the report holds the steps before it
        print(
            f"gpu-check: stopped; the report of the steps that finished: {config.out_dir / REPORT_JSON}",
            file=sys.stderr,
        )
        return 130
    print(format_markdown(report))
    print(f"[gpu-check] report: {config.out_dir / REPORT_JSON}, summary: {config.out_dir / REPORT_MD}")
    return 1 if any(s["status"] == "failed" for s in report["steps"].values()) else 0
