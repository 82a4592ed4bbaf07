"""The steps of the GPU check (:mod:`datprl.platform.bench.gpu_check`), each run in a process of its own by
``<name>_step(config, record)``: it measures, puts its results in ``record`` as it goes, raises
:class:`~datprl.platform.bench.gpu_check.Skip` when it does not apply here and any other exception when it fails.

Nothing here imports torch or Ray at import time: the training steps set the OpenMP wait policy before torch is first
imported (see :mod:`datprl.platform.bench.train`).
"""

from __future__ import annotations

import json
import math
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from datprl.platform.bench.gpu_check import GpuCheckConfig, Recorder, Skip, tail_lines

__all__ = [
    "model_step",
    "serving_step",
    "dataset_step",
    "training_step",
    "starvation_step",
    "multi_gpu_step",
    "train_command",
]

REPO = Path(__file__).resolve().parents[2]


def _max_rss_mib() -> float:
    """The largest resident set this process has had (MiB; Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _error_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]


def _free(device) -> None:
    """Hand the allocator's cached blocks back and restart the peak count (CUDA; nothing on the CPU)."""
    import torch

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_mib(device) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


# --- model ----------------------------------------------------------------------------------------------------------


def model_step(config: GpuCheckConfig, record: Recorder) -> None:
    """Images/s, peak memory and MFU per variant x mode x dtype x layout (eager), then per variant x mode x
    ``compile_dtypes`` (compiled, contiguous). FLOPs are counted once per variant and mode on a real fp32 step
    (:func:`~datprl.platform.bench.model.count_flops`); MFU = FLOPs / median step time / the dtype's peak. One
    network is held at a time, so a run's peak memory is its own. A run that fails (out of memory included) is
    recorded as failed and the next one runs; a run that would not finish within the budget is skipped."""
    import torch

    from datprl.models import count_parameters, create_model
    from datprl.platform.bench.model import count_flops, peak_tflops
    from datprl.platform.runtime import resolve_device

    m = config.model
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    device = resolve_device(config.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    generator = torch.Generator().manual_seed(0)
    shape = (m.batch, 3, m.size, m.size)
    image, target = (torch.rand(shape, generator=generator).to(device) for _ in range(2))
    overrides = {"bf16": m.peak_tflops_bf16, "fp16": m.peak_tflops_bf16, "fp32": m.peak_tflops_fp32}
    peaks = {dtype: peak_tflops(name, dtype, overrides[dtype]) for dtype in m.dtypes}
    rows: list[dict[str, Any]] = []
    flops: dict[tuple[str, str], int | None] = {}
    step_s: dict[tuple[str, str], float] = {}  # the latest median per variant and mode: what a run costs
    compile_s: dict[str, float] = {}  # the longest compile per mode so far: what the next one may cost
    record.update(
        device_name=name,
        batch=m.batch,
        size=m.size,
        warmup=m.warmup,
        iters=m.iters,
        rows=rows,
        threads=torch.get_num_threads(),
        peaks={d: basis for d, (_, basis) in peaks.items()},
        gflop_per_image={},
        params={},
    )

    plan = [
        (v, mode, dtype, cl, False)
        for v in m.variants
        for mode in m.modes
        for dtype in m.dtypes
        for cl in m.channels_last
    ]
    if m.compile:
        plan += [(v, mode, dtype, False, True) for v in m.variants for mode in m.modes for dtype in m.compile_dtypes]
    model, model_name = None, None
    for variant, mode, dtype, channels_last, compiled in plan:
        row = dict(
            variant=variant,
            mode=mode,
            dtype=dtype,
            channels_last=channels_last,
            compiled=compiled,
            batch=m.batch,
            size=m.size,
            status="running",
        )
        rows.append(row)
        expected = (m.warmup + m.iters) * step_s.get((variant, mode), 0.0) + (
            compile_s.get(mode, 0.0) if compiled else 0.0
        )
        if record.left() < expected:
            row.update(
                status="skipped", reason=f"about {expected:.0f} s needed, {record.left():.0f} s of the budget left"
            )
            record.update(rows=rows)
            continue
        record.update(rows=rows)  # a run stopped at the budget shows as "running"
        try:
            if model_name != variant:
                model = None
                _free(device)
                torch.manual_seed(0)
                model, model_name = create_model(variant).to(device), variant
                record.data["params"][variant] = count_parameters(model)
            model.train(mode == "train")
            if (variant, mode) not in flops:
                try:
                    flops[(variant, mode)] = count_flops(model, image, target, mode)
                    record.data["gflop_per_image"].setdefault(variant, {})[mode] = (
                        flops[(variant, mode)] / m.batch / 1e9
                    )
                except Exception as error:  # noqa: BLE001 - the timing is still worth having without MFU
                    flops[(variant, mode)] = None
                    row["flops_error"] = _error_line(error)
            row.update(_time_run(model, image, target, dtype, mode, channels_last, compiled, m, device))
            step_s[(variant, mode)] = row["ms_per_step"] / 1e3
            if compiled:
                compile_s[mode] = max(compile_s.get(mode, 0.0), row["compile_s"])
            peak = peaks[dtype][0]
            count = flops[(variant, mode)]
            if count is not None:
                row["tflops"] = count / (row["ms_per_step"] / 1e3) / 1e12
                row["mfu"] = row["tflops"] / peak if peak else None
            row["status"] = "ok"
        except Exception as error:  # noqa: BLE001 - out of memory, a compile failure: recorded, the next run goes on
            row.update(status="failed", error=_error_line(error))
            model, model_name = None, None  # the failure may have left it in any state: a fresh one next
            _free(device)
        record.update(rows=rows, max_rss_mib=_max_rss_mib())


def _time_run(model, image, target, dtype: str, mode: str, channels_last: bool, compiled: bool, m, device) -> dict:
    """One run: (compile,) warm up, time ``m.iters`` steps; ms per step (median), images/s, peak memory."""
    import torch

    from datprl.platform.bench.model import run_step, timed_step

    layout = torch.channels_last if channels_last else torch.contiguous_format
    model.to(memory_format=layout)
    image, target = image.contiguous(memory_format=layout), target.contiguous(memory_format=layout)
    out: dict[str, Any] = {}
    net = model
    _free(device)
    if compiled:
        torch._dynamo.reset()  # every compiled run compiles from scratch: its compile time is its own
        net = torch.compile(model, backend=m.compile_backend)
        out["compile_s"] = timed_step(net, image, target, dtype, mode)  # the first call traces and compiles
    for _ in range(m.warmup):
        run_step(net, image, target, dtype, mode)
    _free(device)  # the peak of the timed steps: the steady state
    times = [timed_step(net, image, target, dtype, mode) for _ in range(m.iters)]
    median = statistics.median(times)
    out.update(
        ms_per_step=median * 1e3,
        img_per_s=m.batch / median,
        step_ms=[t * 1e3 for t in times],
        peak_mem_mib=_peak_mib(device),
    )
    if compiled:
        torch._dynamo.reset()
    model.to(memory_format=torch.contiguous_format)
    return out


# --- serving --------------------------------------------------------------------------------------------------------


def serving_step(config: GpuCheckConfig, record: Recorder) -> None:
    """One engine (:func:`datprl.serve.engine.load_engine`, a fresh ``serving.variant``) on the device; per size:
    batch-1 latency (p50/p99 over ``requests`` calls of :meth:`Engine.forward`: the host-to-device copy, padding,
    forward, crop and copy back) and throughput per batch size, tried in increasing order until one does not fit."""
    import numpy as np
    import torch

    from datprl.serve.config import ServeConfig
    from datprl.serve.engine import load_engine

    s = config.serving
    engine = load_engine(ServeConfig(weights=None, variant=s.variant, torch_threads=config.threads or 0), config.device)
    device = engine.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    sizes: list[dict[str, Any]] = []
    record.update(
        variant=s.variant, dtype=engine.precision, device_name=name, sizes=sizes, threads=torch.get_num_threads()
    )
    generator = torch.Generator().manual_seed(0)

    def timed(batch: torch.Tensor) -> float:
        start = time.perf_counter()
        engine.forward(batch)  # returns the images on the host: the device has finished
        return time.perf_counter() - start

    for size in s.sizes:
        entry: dict[str, Any] = {
            "size": size,
            "latency": None,
            "batches": [],
            "largest_batch": None,
            "first_failed_batch": None,
            "best_img_per_s": None,
        }
        sizes.append(entry)
        one = torch.rand((1, 3, size, size), generator=generator)
        try:
            for _ in range(s.warmup):
                timed(one)
            ms = np.array([timed(one) for _ in range(s.requests)]) * 1e3
            entry["latency"] = {
                "p50_ms": float(np.percentile(ms, 50)),
                "p99_ms": float(np.percentile(ms, 99)),
                "mean_ms": float(ms.mean()),
                "img_per_s": float(1e3 / ms.mean()),
            }
        except Exception as error:  # noqa: BLE001 - recorded; the next size may still fit
            entry["error"] = _error_line(error)
            _free(device)
            record.update(sizes=sizes)
            continue
        record.update(sizes=sizes)
        per_image = entry["latency"]["mean_ms"] / 1e3
        for batch_size in s.batches:
            expected = (1 + s.batch_iters) * batch_size * per_image
            if record.left() < expected:
                entry["batches"].append(
                    {
                        "batch": batch_size,
                        "status": "skipped",
                        "error": f"about {expected:.0f} s needed, {record.left():.0f} s left",
                    }
                )
                break
            row: dict[str, Any] = {"batch": batch_size, "status": "running"}
            entry["batches"].append(row)
            record.update(sizes=sizes)
            try:
                batch = torch.rand((batch_size, 3, size, size), generator=generator)
                timed(batch)
                _free(device)
                times = [timed(batch) for _ in range(s.batch_iters)]
                median = statistics.median(times)
                row.update(
                    status="ok",
                    ms_per_batch=median * 1e3,
                    img_per_s=batch_size / median,
                    peak_mem_mib=_peak_mib(device),
                )
                per_image = median / batch_size
                entry["largest_batch"] = batch_size
                entry["best_img_per_s"] = max(entry["best_img_per_s"] or 0.0, row["img_per_s"])
            except Exception as error:  # noqa: BLE001 - out of memory ends this size's batch sizes
                oom = isinstance(error, torch.OutOfMemoryError)
                row.update(status="out of memory" if oom else "failed", error=None if oom else _error_line(error))
                entry["first_failed_batch"] = batch_size
                _free(device)
                record.update(sizes=sizes)
                break
            record.update(sizes=sizes)
    record.update(max_rss_mib=_max_rss_mib())


# --- dataset --------------------------------------------------------------------------------------------------------


def dataset_step(config: GpuCheckConfig, record: Recorder) -> None:
    """Build the default corpus at ``dataset.path`` when its manifest is missing; record the samples per split."""
    from datprl.platform.bench.common import ensure_dataset
    from datprl.platform.data.handle import DatasetHandle

    path = config.dataset.path
    start = time.perf_counter()
    built = ensure_dataset(path, "jobs/gpu_check.py")
    handle = DatasetHandle.open(path)
    record.update(
        path=path,
        built=built,
        seconds=time.perf_counter() - start,
        samples={split: sum(handle.samples_per_task(split).values()) for split in handle.splits()},
    )


def _require_dataset(path: str) -> None:
    """Fail at once, before Ray starts, when the training data is missing."""
    from datprl.platform.data.format import MANIFEST_NAME

    if not (Path(path) / MANIFEST_NAME).exists():
        raise FileNotFoundError(
            f"no dataset at {path} ({MANIFEST_NAME} missing): the dataset step builds it "
            "(steps=[dataset, ...]), or run `python jobs/build_dataset.py`"
        )


# --- training -------------------------------------------------------------------------------------------------------


def training_step(config: GpuCheckConfig, record: Recorder) -> None:
    """The training benchmark (:func:`datprl.platform.bench.train.run_benchmark`: Ray Train against a bare loop)
    with ``training.benchmark``'s settings on the check's device and dataset; its report is this step's data."""
    from datprl.platform.bench.train import run_benchmark

    bench = config.training.benchmark
    _require_dataset(bench.dataset)
    report = run_benchmark(bench)
    record.update(device=config.device, variant=bench.variant, crop_size=bench.crop_size, **report)


def starvation_step(config: GpuCheckConfig, record: Recorder) -> None:
    """The fraction of the training loop's wall time spent waiting for data, with the input pipeline of a real run
    (:func:`~datprl.platform.data.pipeline.read_split`, the decoded cache when it fits the object store as
    ``jobs/train.py`` decides it, :func:`~datprl.platform.data.pipeline.training_batches` with the worker's fixed
    batches per pass) and its training step (:func:`~datprl.platform.train.loop.train_step` with the state
    :func:`~datprl.platform.bench.train.training_state` builds), in this process on the check's device.

    A local Ray gets ``cpus - cpus_per_worker`` CPUs of ``training.benchmark`` (what a worker leaves Ray Data). Each
    step's wait is the time from the end of the previous step until the next batch is in hand (it includes the end
    of a pass and the start of the next); its step time runs until the device is synchronised after
    ``train_step``. The real loop does not synchronise, so it may fetch the next batch while the device finishes the
    optimiser's kernels: the measured fraction is an upper bound."""
    from datprl.platform.bench import train as bench_train
    from datprl.platform.bench.common import set_omp_wait_policy

    bench = config.training.benchmark
    _require_dataset(bench.dataset)
    omp = set_omp_wait_policy(bench.omp_wait_policy)  # before torch's first import, as the benchmark
    import torch

    from datprl.platform.bench.common import start_ray
    from datprl.platform.data.handle import DatasetHandle
    from datprl.platform.data.pipeline import StreamReport, read_split, training_batches, use_decoded_cache
    from datprl.platform.data.sampler import BalancedBatcher, batches_per_pass
    from datprl.platform.runtime import LOCAL_OBJECT_STORE_BYTES, loopback_only, resolve_device
    from datprl.platform.train.fit import training_tasks

    s = config.starvation
    device = resolve_device(config.device)
    train_config = bench_train._train_config(bench)
    data = train_config.data
    data_cpus = max(1, bench.cpus - math.ceil(bench.cpus_per_worker))
    loopback_only()
    owned, cpus, ray_start_s = start_ray(
        data_cpus, bench.ray_worker_niceness, dashboard=False, object_store_bytes=LOCAL_OBJECT_STORE_BYTES
    )
    try:
        dataset = DatasetHandle.open(data.dataset, data.s3)
        tasks, _ = training_tasks(train_config, dataset)
        cached = use_decoded_cache(data, "train", dataset)
        start = time.perf_counter()
        split = read_split(data.model_copy(update={"cache_decoded": cached}), "train", dataset=dataset)
        read_split_s = time.perf_counter() - start  # with the cache: decoding the whole split once
        per_pass = batches_per_pass(dataset.samples_per_task("train"), tasks, data.per_task_batch, 1)
        batcher = BalancedBatcher(tasks, per_task=data.per_task_batch, seed=train_config.seed)
        report = StreamReport()

        def stream():
            while True:  # pass after pass, each a new execution of the dataset, as the worker iterates its shard
                yield from training_batches(
                    split,
                    tasks,
                    data.per_task_batch,
                    data.shuffle_buffer,
                    report,
                    num_batches=per_pass,
                    batcher=batcher,
                )

        torch.set_num_threads(bench.threads)
        state = bench_train.training_state(train_config, device)
        batches = stream()
        waits, steps = [], []
        record.update(
            variant=bench.variant,
            crop_size=data.crop_size,
            device=config.device,
            cached=cached,
            data_cpus=cpus,
            ray_start_s=ray_start_s,
            read_split_s=read_split_s,
            steps_per_pass=per_pass,
            omp_wait_policy=omp,
        )
        for i in range(s.warmup_steps + s.steps):
            start = time.perf_counter()
            batch = next(batches)
            got = time.perf_counter()
            bench_train.state_step(state, batch, train_config, device)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            waits.append(got - start)
            steps.append(time.perf_counter() - got)
    finally:
        if owned:
            import ray

            ray.shutdown()
    timed = range(s.warmup_steps, s.warmup_steps + s.steps)
    wait_s, step_s = sum(waits[i] for i in timed), sum(steps[i] for i in timed)
    record.update(
        steps=s.steps,
        warmup_steps=s.warmup_steps,
        batch=batch["lq"].shape[0],
        wait_s=wait_s,
        step_s=step_s,
        wait_fraction=wait_s / (wait_s + step_s),
        pass_starts=sum(1 for i in timed if i % per_pass == 0),
        pass_start_wait_s=sum((waits[i] for i in timed if i % per_pass == 0), 0.0),
        median_wait_ms=statistics.median(waits[i] for i in timed) * 1e3,
        median_step_ms=statistics.median(steps[i] for i in timed) * 1e3,
        corrupt=len(report.corrupt),
        wait_ms=[w * 1e3 for w in waits],
        step_ms=[t * 1e3 for t in steps],
    )


# --- multi-GPU ------------------------------------------------------------------------------------------------------


def train_command(config: GpuCheckConfig, out: Path) -> list[str]:
    """The ``jobs/train.py`` command of the multi-GPU step: ``multi_gpu.recipe`` with ``multi_gpu.workers`` GPU
    workers for ``multi_gpu.steps`` steps on the check's dataset, a report every half, one checkpoint at the end, no
    validation, evaluation or text embeddings (the describer is not what this checks), a fresh run under ``out``,
    then ``multi_gpu.overrides``."""
    m = config.multi_gpu
    return [
        sys.executable,
        str(REPO / "jobs" / "train.py"),
        m.recipe,
        f"num_workers={m.workers}",
        "use_gpu=true",
        f"steps={m.steps}",
        f"log_every={max(1, m.steps // 2)}",
        f"checkpoint_every={m.steps}",
        "validate_every=null",
        "evaluate_split=null",
        "cross_source_split=null",
        "text_embeddings=null",
        f"data.dataset={config.dataset.path}",
        f"storage={out / 'runs'}",
        f"output_dir={out}",
        "name=gpu-check-multi",
        "resume=false",
        *m.overrides,
    ]


def _run_logged(command: list[str], log: Path, record: Recorder, cwd: Path | None = None) -> int | None:
    """Run ``command`` with its output in ``log`` (a file, not a pipe: what it printed survives a timeout) within the
    step's remaining budget; its exit status, or None when it ran out of time (its Ray is stopped with the rest of
    this step's session)."""
    with log.open("w") as stream:
        try:
            return subprocess.run(
                command, stdout=stream, stderr=subprocess.STDOUT, cwd=cwd, timeout=max(1.0, record.left()), check=False
            ).returncode
        except subprocess.TimeoutExpired:
            return None


def multi_gpu_step(config: GpuCheckConfig, record: Recorder) -> None:
    """``jobs/train.py`` data-parallel on ``multi_gpu.workers`` GPUs (:func:`train_command`), skipped with fewer;
    records the command, its exit status and the reports of its ``metrics.jsonl``."""
    import torch

    m = config.multi_gpu
    count = torch.cuda.device_count() if config.device == "cuda" else 0
    if count < m.workers:
        names = sorted({torch.cuda.get_device_name(i) for i in range(count)})
        raise Skip(
            f"torch sees {count} CUDA device(s){' (' + ', '.join(names) + ')' if names else ''}; the "
            f"multi-GPU check needs {m.workers}"
        )
    _require_dataset(config.dataset.path)
    out = (config.out_dir / "multi_gpu").resolve()
    command = train_command(config, out)
    record.update(command=command, workers=m.workers, gpus=count)
    log = out / "train.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    code = _run_logged(command, log, record)
    metrics = out / "metrics.jsonl"
    reports = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    record.update(returncode=code, reports=reports, log=str(log))
    if code != 0:
        tail = "\n".join(tail_lines(log, 15))
        what = "ran out of the step's budget" if code is None else f"exited with status {code}"
        raise RuntimeError(f"jobs/train.py {what}; the end of {log}:\n{tail}")
    if not reports or reports[-1]["step"] != m.steps:
        raise RuntimeError(f"jobs/train.py ended without a report of step {m.steps} in {metrics}")
    # Rank 0's start-up line states the global batch, the lr and its scaling, the numerics and DDP's settings.
    stated = [line for line in log.read_text(errors="replace").splitlines() if "[train] global batch" in line]
    record.update(setup_line=stated[-1].strip() if stated else None)
    if not stated:
        raise RuntimeError(
            f"jobs/train.py did not state its global batch and learning rate (no '[train] global batch' line in {log})"
        )
    # Gradients are synchronised: the GPU flavour of the test that two DDP workers on halves of a batch take the
    # steps one process takes on the whole batch.
    test_log = out / "ddp_equivalence.log"
    test = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        str(REPO / "tests" / "test_train.py"),
        "-k",
        "two_ddp_workers_match_one_process and cuda",
    ]
    test_code = _run_logged(test, test_log, record, cwd=REPO)
    record.update(ddp_equivalence_returncode=test_code, ddp_equivalence_log=str(test_log))
    if test_code != 0:
        tail = "\n".join(tail_lines(test_log, 15))
        raise RuntimeError(f"the GPU 1-vs-2-worker DDP equivalence test did not pass ({test_code}):\n{tail}")
