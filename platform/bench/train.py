"""Training steps/s of the Ray Train loop against a bare single-process PyTorch loop, same model, data and threads.

Both sides train the same network (``variant``, default ``paper_tiny``, initialised from ``torch.manual_seed(seed)``)
on task-balanced batches of ``per_task_batch`` samples of every training task (``tasks x per_task_batch``), cropped to
``crop_size`` and augmented by :func:`~datprl.platform.data.pipeline.decode_shard` (``mode="train"``), with
``threads`` torch threads, and both call :func:`datprl.platform.train.loop.train_step` with the optimiser, loss and
schedule of the same :class:`~datprl.platform.train.config.TrainConfig` with its defaults (Adam,
:class:`~datprl.models.losses.DATPRLLoss`, ``LambdaLR`` of the cosine schedule, gradient clipping), followed by the EMA
update of the weights when the config's ``optim.ema_decay`` is set (it is by default), as the Ray worker does. No text
embeddings, no validation.
* ``bare``: one process, no Ray. The train split is read once before any timing, in this process
  (``decode_shard`` per shard URL of the manifest, rows shuffled,
  :class:`~datprl.platform.data.sampler.BalancedBatcher` ``fixed_batches`` with the per-pass count that Ray Train
  workers use, :func:`~datprl.platform.data.sampler.collate`), and the ``warmup_steps + steps`` batches are held
  in memory. Each round builds a fresh model and optimiser in this process (``torch.set_num_threads(threads)``),
  takes ``warmup_steps`` untimed steps, then times ``steps`` calls of ``train_step``. It measures pure compute: no
  data loading, no reports, no wrapper.
* ``ray_train``: :func:`datprl.platform.train.fit.fit` as production runs it, on a local Ray: one worker
  (``num_workers=1``, ``cpus_per_worker`` CPUs, ``torch_threads=threads``), the train split streamed by Ray Data
  (:func:`~datprl.platform.data.pipeline.read_split`: by default decoded once into the object store before training and
  cropped and augmented every pass on the CPUs the worker leaves free, when it fits the object store; else decoded
  every pass) and assembled by ``training_batches``, ``prepare_model``, a ``ray.train.report`` every
  ``report_every`` steps, no evaluation, and a checkpoint at the last step only (``checkpoint_every`` is never
  reached; the last step always checkpoints). Each round is a new run (fresh storage and name),
  ``warmup_steps + steps`` steps long.

Ray's steps/s is computed from the reports the worker wrote (rank 0's ``metrics.jsonl``): each report's
``samples_per_s`` covers the window since the previous report, so a window of ``n`` steps lasted ``n * batch /
samples_per_s`` seconds. Windows start right after the previous report's metrics are taken, so each window includes
the previous ``ray.train.report`` call; the last window ends before the final checkpoint is written, so the final
checkpoint is in no window (it is measured only as part of the end-to-end time). The timed windows are those after the
first ``warmup_steps`` steps (which hold worker and Ray Data start-up); steady-state steps/s = their steps / their
seconds. Every cost that Ray adds in the steady state (Ray Data ingest: the crop and augmentation of every pass from
the decoded cache, or the read and decode of every pass without it, competing for the machine's CPUs, the per-pass
restart of the streaming split, shuffle and batch assembly; reports; ``prepare_model``, which does not wrap a single
worker in DDP) therefore counts as Ray overhead in the ratio ``ray_train/bare`` of the median steps/s. The end-to-end
time of each ``fit`` call (trainer and worker start-up, data set-up, every step, the final checkpoint, shutdown; not
``ray.init``) is reported separately and is not in the ratio.

Rounds are interleaved (bare then ray, then ray then bare, ...) so that load changes hit both sides alike, and medians
over the rounds are reported. When the benchmark starts Ray itself (``cpus`` CPUs, loopback addresses, the dashboard on
127.0.0.1 as ``fit`` starts it, see :func:`_start_ray`), Ray's workers get OS niceness ``ray_worker_niceness``
(default 0, the priority of the bare loop; Ray's own default is 15, which on a busy machine alone slows the Ray side).
A worker holding every CPU would starve Ray Data's read tasks (the run hangs), so ``cpus_per_worker`` must be below
``cpus``.

Both sides also run under the same OpenMP wait policy, ``omp_wait_policy`` (default ``PASSIVE``: set before torch is
first imported in this process, and in the environment of the Ray the benchmark starts, which its workers inherit).
With more runnable threads than cores, libgomp's default policy has each torch thread spin for milliseconds at every
parallel region, waiting for a partner thread that is not running: on a busy 2-core machine a 2-thread ``paper_tiny``
step (crop 64, batch 9) took 5-6 CPU seconds instead of about 1.2. How much of that a process pays is an accident of
its threads (libgomp spins only briefly once a process holds more OpenMP threads than CPUs, e.g. teams on two Python
threads; Ray Train runs the loop in a thread of its own), and under libgomp's default the Ray side came out 1.6-2x
*faster* than the bare loop. ``omp_wait_policy=null`` keeps libgomp's default.

With ``device=cuda`` both sides train on one GPU, with the training config's ``compute`` defaults (bf16 autocast,
fused Adam): the bare loop on this process's first GPU, each of its windows ending after a CUDA synchronise, and the
Ray worker with ``use_gpu``; the bare side's cached GPU memory is released before the Ray side runs.

Launch with ``python jobs/benchmark_train.py [key=value ...]``.
"""

from __future__ import annotations

import json
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from datprl.platform.bench.common import (
    LocalDataset,
    ensure_dataset,
    ray_worker_settings,
    save_report,
    set_omp_wait_policy,
    start_ray,
    warn_if_busy,
)
from datprl.platform.runtime import LOCAL_OBJECT_STORE_BYTES, loopback_only, resolve_device
from datprl.platform.config import StrictModel, config_to_dict, parse_cli

__all__ = ["TrainBenchmarkConfig", "bare_batches", "training_state", "run_benchmark", "format_report", "main"]

BARE, RAY = "bare", "ray_train"


class TrainBenchmarkConfig(StrictModel):
    """Steps/s of the Ray Train loop (1 worker) vs a bare PyTorch loop on the same model, batches and threads."""

    dataset: LocalDataset = Field(
        "data/default",
        description="local dataset folder with manifest.json; if the "
        "manifest is missing, the default corpus is built there first",
    )
    variant: str = Field("paper_tiny", description="model variant (datprl.models.VARIANTS)")
    crop_size: int = Field(64, ge=8, description="paired random training crop (pixels)")
    per_task_batch: int = Field(1, ge=1, description="samples of every task per batch (batch = tasks x this)")
    shuffle_buffer: int = Field(64, ge=0, description="the Ray side's local shuffle buffer (DataConfig)")
    threads: int = Field(
        2, ge=1, description="torch threads of both sides (bare: torch.set_num_threads; Ray: TrainConfig.torch_threads)"
    )
    steps: int = Field(40, ge=1, description="timed steps per side and round (a multiple of report_every)")
    warmup_steps: int = Field(
        10,
        ge=1,
        description="untimed steps per side and round before the timed ones "
        "(a multiple of report_every; on the Ray side they hold the start-up)",
    )
    report_every: int = Field(10, ge=1, description="Ray side: a report (one timing window) every this many steps")
    rounds: int = Field(2, ge=1, description="interleaved rounds; each runs both sides once")
    cpus: int = Field(2, ge=1, description="CPUs of the local Ray the benchmark starts (ray.init(num_cpus=...))")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs of the Ray Train worker; the rest run Ray Data's reads")
    ray_worker_niceness: int | None = Field(
        0,
        ge=0,
        le=19,
        description="OS niceness of Ray's workers "
        "(RAY_worker_niceness) when the benchmark starts Ray; 0 = the bare "
        "loop's priority; null = Ray's default (15)",
    )
    omp_wait_policy: Literal["PASSIVE", "ACTIVE"] | None = Field(
        "PASSIVE",
        description="OMP_WAIT_POLICY of both sides (set before torch is first imported here, and in the "
        "environment of the Ray the benchmark starts); null = libgomp's default (see the module docstring)",
    )
    device: Literal["cpu", "cuda"] = Field(
        "cpu",
        description="where both sides train: cuda = the bare loop on this "
        "process's first GPU, the Ray worker with use_gpu (one GPU)",
    )
    seed: int = 0
    json_out: Path | None = Field(None, description="also write the results as JSON here")

    @model_validator(mode="after")
    def _consistent(self) -> TrainBenchmarkConfig:
        if self.steps % self.report_every or self.warmup_steps % self.report_every:
            raise ValueError(
                f"steps ({self.steps}) and warmup_steps ({self.warmup_steps}) must be multiples of "
                f"report_every ({self.report_every}), so that the timing windows start after warm-up"
            )
        if self.cpus_per_worker >= self.cpus:
            raise ValueError(
                f"cpus_per_worker ({self.cpus_per_worker}) must leave Ray Data some of the {self.cpus} "
                "CPUs: a worker holding every CPU starves the read tasks and the run hangs"
            )
        return self


def _train_config(config: TrainBenchmarkConfig, root: Path | None = None, name: str = "bench"):
    """The :class:`TrainConfig` of both sides (the bare side reads its optimiser, loss and schedule from it)."""
    from datprl.platform.data.pipeline import DataConfig
    from datprl.platform.train.config import TrainConfig

    root = root or Path(tempfile.gettempdir())
    return TrainConfig(
        name=name,
        storage=str(root / "storage"),
        output_dir=str(root / "out"),
        data=DataConfig(
            dataset=config.dataset,
            crop_size=config.crop_size,
            per_task_batch=config.per_task_batch,
            shuffle_buffer=config.shuffle_buffer,
        ),
        build_dataset_if_missing=False,
        model={"variant": config.variant},
        steps=config.warmup_steps + config.steps,
        num_workers=1,
        cpus_per_worker=config.cpus_per_worker,
        use_gpu=config.device == "cuda",
        max_failures=0,
        checkpoint_every=10**9,
        log_every=config.report_every,
        torch_threads=config.threads,
        evaluate_split=None,
        seed=config.seed,
    )


# --- the bare side --------------------------------------------------------------------------------------------------


def bare_batches(train_config, count: int) -> tuple[list[dict], dict[str, Any]]:
    """``count`` task-balanced training batches read in this process, as a Ray Train worker would assemble them:
    passes over the train split (``decode_shard`` per shard, rows shuffled), each giving the worker's per-pass number
    of batches (``batches_per_pass`` for 1 worker, ``BalancedBatcher.fixed_batches``). Returns (batches, info)."""
    from datprl.platform.data.handle import DatasetHandle
    from datprl.platform.data.pipeline import StreamReport, decode_shard
    from datprl.platform.data.sampler import BalancedBatcher, batches_per_pass, collate
    from datprl.platform.train.fit import training_tasks

    data = train_config.data
    dataset = DatasetHandle.open(data.dataset, data.s3)
    tasks, _ = training_tasks(train_config, dataset)
    # the per-task counts fit() hands its workers, so the bare loop takes the batches per pass a worker takes
    per_pass = batches_per_pass(dataset.samples_per_task("train"), tasks, data.per_task_batch, 1)
    urls = dataset.shard_urls("train")
    batcher = BalancedBatcher(tasks, per_task=data.per_task_batch, seed=train_config.seed)
    shuffle = random.Random(train_config.seed)
    report, batches, passes = StreamReport(), [], 0
    while len(batches) < count:
        rows = [
            row
            for url in urls
            for row in decode_shard(
                {"url": url},
                mode="train",
                crop_size=data.crop_size,
                augment=data.augment,
                eval_crop=None,
                s3=data.s3,
                on_corrupt=data.on_corrupt,
            )
            if report.note(row)
        ]
        shuffle.shuffle(rows)
        batches += [collate(b) for b in batcher.fixed_batches(rows, per_pass)]
        passes += 1
    info = dict(
        tasks=tasks,
        steps_per_pass=per_pass,
        passes=passes,
        rows_per_pass=report.rows // passes,
        corrupt=len(report.corrupt),
        shards=len(urls),
    )
    return batches[:count], info


def training_state(train_config, device) -> dict[str, Any]:
    """What a Ray Train worker builds before its first step (:func:`~datprl.platform.train.loop.build_training_state`:
    network, optimiser, scheduler, fp16 scaler, loss, EMA; without DDP), built the same way in this process on
    ``device`` and seeded with ``train_config.seed``, the worker's seed at rank 0."""
    import torch

    from datprl.platform.train.loop import build_training_state

    torch.manual_seed(train_config.seed)  # the Ray worker seeds with seed + rank (rank 0)
    return build_training_state(train_config, device)


def state_step(state: dict[str, Any], batch: dict, train_config, device) -> dict[str, float]:
    """One :func:`~datprl.platform.train.loop.train_step` of a :func:`training_state`, then its EMA update, as the
    worker's loop does; returns the loss terms."""
    from datprl.platform.train.loop import train_step

    terms = train_step(
        state["net"],
        state["model"],
        batch,
        state["criterion"],
        state["optimizer"],
        state["scheduler"],
        state["params"],
        train_config,
        device,
        None,
        state["scaler"],
    )
    if state["ema"] is not None:
        state["ema"].update_parameters(state["model"])
    return terms


def _bare_round(
    train_config, batches: list[dict], warmup: int, report_every: int, threads: int, device: str = "cpu"
) -> dict[str, Any]:
    """A fresh model, optimiser (and EMA) on ``device``; ``warmup`` untimed steps, then every remaining batch timed
    (window per ``report_every`` steps, like the Ray side's reports). On CUDA each window ends after the device is
    synchronised, so it holds the steps' GPU work."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    device = torch.device(device)
    try:
        windows, losses = _bare_steps(train_config, batches, report_every, device)
    finally:
        torch.set_num_threads(previous)
        if device.type == "cuda":  # hand the cached blocks back: the Ray worker trains on the same GPU next
            torch.cuda.empty_cache()
    return _rates(windows, warmup, batches[0]["lq"].shape[0], losses[-1])


def _bare_steps(train_config, batches: list[dict], report_every: int, device) -> tuple[list, list[float]]:
    """Train on every batch; returns the windows (step at the end, seconds) and the losses. The training state lives
    in this frame only, so its GPU memory is free once it returns."""
    import torch

    state = training_state(train_config, device)
    windows: list[tuple[int, float]] = []
    losses: list[float] = []
    start = time.perf_counter()
    for i, batch in enumerate(batches):
        terms = state_step(state, batch, train_config, device)
        losses.append(terms["total"])
        if (i + 1) % report_every == 0 or i + 1 == len(batches):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            now = time.perf_counter()
            windows.append((i + 1, now - start))
            start = now
    return windows, losses


# --- the Ray side ---------------------------------------------------------------------------------------------------


def _ray_round(train_config, warmup: int) -> dict[str, Any]:
    """One ``fit`` run; steps/s from the windows of its reports (see the module docstring)."""
    import torch

    from datprl.platform.train.fit import fit, training_tasks

    start = time.perf_counter()
    result = fit(train_config)
    e2e = time.perf_counter() - start
    if result.error is not None:
        raise RuntimeError(f"the Ray Train run failed: {result.error}")
    path = Path(train_config.output_dir) / "metrics.jsonl"
    reports = [json.loads(line) for line in path.read_text().splitlines()]
    total = train_config.steps
    expected = list(range(train_config.log_every, total, train_config.log_every)) + [total]
    if [r["step"] for r in reports] != expected or any(r["resumed_from_step"] for r in reports):
        raise RuntimeError(
            f"unexpected reports in {path}: steps {[r['step'] for r in reports]} "
            f"(resumed from {[r['resumed_from_step'] for r in reports]}); expected {expected}"
        )
    if [r["checkpoint"] for r in reports] != [False] * (len(reports) - 1) + [True]:
        raise RuntimeError(f"checkpoints at unexpected steps in {path}: {[r['checkpoint'] for r in reports]}")
    with result.checkpoint.as_directory() as folder:
        state = torch.load(Path(folder) / "state.pt", map_location="cpu", weights_only=True)
    if state["step"] != total:
        raise RuntimeError(f"the final checkpoint is at step {state['step']}, not {total}")
    tasks, _ = training_tasks(train_config)
    batch = len(tasks) * train_config.data.per_task_batch  # fixed_batches: every batch has per_task of every task
    windows, previous = [], 0
    for r in reports:  # a window of n steps lasted n * batch / samples_per_s seconds
        windows.append((r["step"], (r["step"] - previous) * batch / r["samples_per_s"]))
        previous = r["step"]
    out = _rates(windows, warmup, batch, reports[-1]["loss"])
    out.update(e2e_s=e2e, outside_windows_s=e2e - sum(s for _, s in windows), corrupt=reports[-1]["corrupt_samples"])
    return out


def _rates(windows: list[tuple[int, float]], warmup: int, batch: int, last_loss: float) -> dict[str, Any]:
    """Windows (step at its end, seconds) -> steady-state steps/s over the windows after ``warmup`` steps."""
    timed, untimed, previous = [], [], 0
    for step, seconds in windows:
        (timed if previous >= warmup else untimed).append((step - previous, seconds))
        previous = step
    steps, seconds = sum(n for n, _ in timed), sum(s for _, s in timed)
    return dict(
        timed_steps=steps,
        timed_s=seconds,
        steps_per_s=steps / seconds,
        batch_size=batch,
        warmup_steps=sum(n for n, _ in untimed),
        warmup_s=sum(s for _, s in untimed),
        window_steps_per_s=[n / s for n, s in timed],
        last_loss=last_loss,
    )


# --- the benchmark --------------------------------------------------------------------------------------------------


def _start_ray(cpus: int, niceness: int | None) -> tuple[bool, int, float]:
    """(started here, CPUs Ray has, seconds to start): the local Ray as ``fit()`` starts it (dashboard on, the same
    object store, so the decoded cache is on or off as there). An already running Ray (tests) is used as it is."""
    return start_ray(cpus, niceness, dashboard=True, object_store_bytes=LOCAL_OBJECT_STORE_BYTES)


def run_benchmark(config: TrainBenchmarkConfig) -> dict[str, Any]:
    """Run ``config.rounds`` interleaved rounds of both sides and return a JSON-ready dict.

    ``results`` has one row per side (``bare`` first, then ``ray_train``): ``side, batch_size, timed_steps`` (per
    round), ``steps_per_s`` (median over the rounds), ``samples_per_s`` (= steps/s x batch), ``round_steps_per_s``
    (every round), ``window_steps_per_s`` (every timed window of every round), ``warmup_s`` (every round's warm-up),
    ``last_loss`` (every round); the Ray row also has ``e2e_s`` (every ``fit`` call, start-up to shutdown) and
    ``outside_windows_s`` (each ``fit``'s time outside every report window: start-up, final checkpoint, shutdown).
    ``ratio`` is the Ray side's median steps/s over the bare side's.
    """
    previous_policy = os.environ.get("OMP_WAIT_POLICY")
    bare_policy = set_omp_wait_policy(config.omp_wait_policy)
    try:
        loopback_only()
        import ray
        import torch

        resolve_device(config.device)  # device=cuda without CUDA: the error says so before Ray starts
        owned, cpus, ray_start_s = _start_ray(config.cpus, config.ray_worker_niceness)
    finally:  # torch has read it, and so has the raylet whose environment Ray's workers inherit
        if previous_policy is None:
            os.environ.pop("OMP_WAIT_POLICY", None)
        else:
            os.environ["OMP_WAIT_POLICY"] = previous_policy
    rounds: dict[str, list[dict]] = {BARE: [], RAY: []}
    try:
        if config.cpus_per_worker >= cpus:
            raise RuntimeError(
                f"the running Ray has {cpus} CPUs: cpus_per_worker={config.cpus_per_worker} would "
                "leave none to Ray Data's read tasks (the run would hang)"
            )
        ensure_dataset(config.dataset, "jobs/benchmark_train.py")
        load_before = os.getloadavg()
        start = time.perf_counter()
        batches, data_info = bare_batches(_train_config(config), config.warmup_steps + config.steps)
        bare_read_s = time.perf_counter() - start
        workers = ray_worker_settings()
        niceness = {"ray_workers": workers["niceness"], "bare": os.nice(0)}
        omp_wait_policy = {"ray_workers": workers["omp_wait_policy"], "bare": bare_policy}
        with tempfile.TemporaryDirectory(prefix="train-benchmark-") as tmp:
            for round_ in range(config.rounds):
                for side in (BARE, RAY) if round_ % 2 == 0 else (RAY, BARE):
                    if side == BARE:
                        out = _bare_round(
                            _train_config(config),
                            batches,
                            config.warmup_steps,
                            config.report_every,
                            config.threads,
                            config.device,
                        )
                    else:
                        root = Path(tmp) / f"round{round_}"
                        out = _ray_round(_train_config(config, root, name=f"round{round_}"), config.warmup_steps)
                    if out["timed_steps"] != config.steps:
                        raise RuntimeError(
                            f"{side} round {round_}: {out['timed_steps']} steps timed, not {config.steps}"
                        )
                    rounds[side].append(out)
                    print(f"round {round_ + 1}/{config.rounds} {side}: {out['steps_per_s']:.3f} steps/s", flush=True)
    finally:
        if owned:
            ray.shutdown()

    results = []
    for side in (BARE, RAY):
        runs = rounds[side]
        steps_per_s = statistics.median(r["steps_per_s"] for r in runs)
        row = dict(
            side=side,
            batch_size=runs[0]["batch_size"],
            timed_steps=runs[0]["timed_steps"],
            steps_per_s=steps_per_s,
            samples_per_s=steps_per_s * runs[0]["batch_size"],
            round_steps_per_s=[r["steps_per_s"] for r in runs],
            window_steps_per_s=[w for r in runs for w in r["window_steps_per_s"]],
            warmup_s=[r["warmup_s"] for r in runs],
            last_loss=[r["last_loss"] for r in runs],
        )
        if side == RAY:
            row.update(
                e2e_s=[r["e2e_s"] for r in runs],
                outside_windows_s=[r["outside_windows_s"] for r in runs],
                corrupt=[r["corrupt"] for r in runs],
            )
        results.append(row)
    return dict(
        config=config_to_dict(config),
        ema_decay=_train_config(config).optim.ema_decay,
        cpus=cpus,
        ray_started_here=owned,
        ray_start_s=ray_start_s,
        bare_read_s=bare_read_s,
        data=data_info,
        niceness=niceness,
        omp_wait_policy=omp_wait_policy,
        loadavg={"before": list(load_before), "after": list(os.getloadavg())},
        versions={"ray": ray.__version__, "torch": torch.__version__},
        results=results,
        ratio=results[1]["steps_per_s"] / results[0]["steps_per_s"],
    )


def format_report(report: dict[str, Any]) -> str:
    """The Markdown table of :func:`run_benchmark` and its ratio line ``ray_train/bare steps/s ratio: X.XX``."""
    head = [
        "loop",
        "batch",
        "timed steps/round",
        "steps/s median",
        "samples/s median",
        "steps/s per round",
        "window steps/s min-max",
        "warm-up s",
        "fit() end-to-end s",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in report["results"]:
        windows = r["window_steps_per_s"]
        cells = [
            r["side"],
            r["batch_size"],
            r["timed_steps"],
            f"{r['steps_per_s']:.3f}",
            f"{r['samples_per_s']:.2f}",
            ", ".join(f"{x:.3f}" for x in r["round_steps_per_s"]),
            f"{min(windows):.3f}-{max(windows):.3f}",
            ", ".join(f"{x:.1f}" for x in r["warmup_s"]),
            ", ".join(f"{x:.1f}" for x in r.get("e2e_s", [])) or "-",
        ]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    lines += ["", f"ray_train/bare steps/s ratio: {report['ratio']:.2f}"]
    return "\n".join(lines)


def main(argv: Sequence[str]) -> int:
    """Entry point of ``jobs/benchmark_train.py``: parse ``key=value`` options, run, print, optionally save JSON."""
    config = parse_cli(TrainBenchmarkConfig, argv, prog="benchmark_train.py")
    start = time.perf_counter()
    report = run_benchmark(config)
    v, nice, load, data = report["versions"], report["niceness"], report["loadavg"], report["data"]
    omp = report["omp_wait_policy"]
    ray_row = report["results"][1]
    print(
        f"ray {v['ray']}, torch {v['torch']}; {config.variant}, crop {config.crop_size}, batch "
        f"{len(data['tasks'])} tasks x {config.per_task_batch}, EMA {report['ema_decay'] or 'off'}, "
        f"{config.threads} torch threads per side; Ray: {report['cpus']} CPUs, 1 worker with "
        f"{config.cpus_per_worker} CPU(s), a report every {config.report_every} steps; {config.warmup_steps} "
        f"warm-up + {config.steps} timed steps per side, "
        f"{config.rounds} interleaved round(s); {config.dataset}: {data['rows_per_pass']} train samples in "
        f"{data['shards']} shard(s), {data['steps_per_pass']} steps per pass; niceness: Ray workers "
        f"{nice['ray_workers']}, bare {nice['bare']}; OMP_WAIT_POLICY: Ray workers {omp['ray_workers']}, bare "
        f"{omp['bare']}; load average {load['before'][0]:.1f} -> {load['after'][0]:.1f}"
    )
    warn_if_busy(load, "both sides and the timings (and the ratio) are unreliable")
    print(format_report(report))
    print(
        f"Ray fit() outside the report windows (start-up, final checkpoint, shutdown): "
        f"{', '.join(f'{x:.1f}' for x in ray_row['outside_windows_s'])} s; not in the ratio"
    )
    print(
        f"total {time.perf_counter() - start:.1f} s (bare read {report['bare_read_s']:.1f} s, Ray start "
        f"{report['ray_start_s']:.1f} s)"
    )
    save_report(report, config.json_out)
    sys.stdout.flush()
    return 0
