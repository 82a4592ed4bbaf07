"""Training on Ray Train: data-parallel DATPRL-IR with the paper's recipe, checkpoints to the run's storage, resume.

The driver (:func:`fit`) builds a ``TorchTrainer``; each worker runs :func:`train_loop_per_worker`: DDP model (every
trainable parameter takes part in every step, so no ``find_unused_parameters``), Adam (0.9, 0.99), cosine decay to
``min_lr``, gradient clipping, optional EMA, bf16 autocast on GPU, all losses of ``datprl.models.losses``.
Checkpoints carry model, optimiser, scheduler, EMA, step and data position; Ray Train persists them to the run's
storage (local path or s3://) and hands the latest back after a restart (worker failure, or the same run name
launched again), so a run resumes from its last checkpoint rather than from step 0.

Each report carries the step, ``resumed_from_step`` (where this attempt began), the learning rate, throughput and
every loss term averaged over the steps since the previous report (``loss`` = ``loss_total``); :func:`fit` appends
rank 0's reports to ``<output_dir>/metrics.jsonl``. One optimisation step is :func:`train_step`, usable on its own.
``DATPRL_TEST_CRASH_AT_STEP`` / ``DATPRL_TEST_CRASH_MARKER`` in the workers' environment is a fault-injection hook
for tests (see :func:`_crash_hook`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field

from datprl.models import create_model, save_model
from datprl.models.losses import DATPRLLoss, LossWeights
from datprl.platform.config import StrictModel, config_to_dict, parse_cli, save_resolved_config
from datprl.platform.batching import BalancedBatcher, batches_per_pass
from datprl.platform.data import (
    LOCAL_OBJECT_STORE_BYTES,
    DataConfig,
    StreamReport,
    read_split,
    split_tasks,
    training_batches,
    use_decoded_cache,
)
from datprl.platform.storage import S3Settings

log = logging.getLogger(__name__)


class OptimConfig(StrictModel):
    """The paper's recipe (method.md "Training recipe")."""

    lr: float = Field(4e-4, gt=0)
    betas: tuple[float, float] = (0.9, 0.99)
    min_lr: float = Field(1e-6, ge=0, description="end of the cosine decay")
    warmup_steps: int = Field(0, ge=0)
    grad_clip: float | None = Field(1.0, gt=0, description="max gradient norm; None = no clipping")
    ema_decay: float | None = Field(None, gt=0, lt=1, description="EMA of the weights (e.g. 0.999); None = off")


class TrainConfig(StrictModel):
    """A training run. ``python jobs/train.py [config.yaml] [key=value ...]``; with no arguments: the embedded default."""

    name: str = Field("default", description="run name; launching the same name again resumes it")
    storage: str = Field("runs", description="run storage: local folder or s3://bucket/prefix (shared on clusters)")
    s3: S3Settings | None = None
    ray_address: str | None = Field(None, description="Ray cluster address; None = RAY_ADDRESS or a local Ray")
    # The embedded default (a 2-core machine, about 15 minutes): small crops and one sample per task per step buy more
    # optimiser steps, which the tiny network needs more than larger batches (tuning runs in the issue notes).
    data: DataConfig = DataConfig(crop_size=48, per_task_batch=1)
    build_dataset_if_missing: bool = Field(True, description="build the embedded default corpus when data.dataset has no manifest")
    variant: str = Field("paper_tiny", description="model variant (datprl.models.VARIANTS)")
    model_overrides: dict[str, Any] = Field(default_factory=dict, description="ModelConfig fields, e.g. {prompt_dim: 128}")
    loss: LossWeights = LossWeights()
    optim: OptimConfig = OptimConfig(lr=2e-3, ema_decay=0.995)
    steps: int = Field(1000, ge=1)
    num_workers: int | tuple[int, int] = Field(1, description="workers, or (min, max) for elastic training")
    cpus_per_worker: float = Field(1.0, gt=0)
    use_gpu: bool | Literal["auto"] = "auto"
    max_failures: int = Field(2, ge=0, description="worker failures survived (restart from the last checkpoint)")
    checkpoint_every: int = Field(250, ge=1)
    log_every: int = Field(50, ge=1)
    torch_threads: int | None = Field(None, ge=1, description="torch CPU threads per worker; None = Ray's default "
                                      "(cpus_per_worker)")
    text_embeddings: str | None = Field(None, description="Parquet of description embeddings keyed by source_id")
    zero_shot_tasks: list[str] = Field(default_factory=list, description="tasks held out of training, evaluated "
                                       "zero-shot (marked in the tables)")
    zero_shot_domains: list[str] = Field(default_factory=list, description="domains held out of training: all their "
                                         "tasks are evaluated zero-shot")
    evaluate_split: str | None = Field("val", description="split evaluated after training (and by validate_every); "
                                       "None = skip")
    validate_every: int | None = Field(250, ge=1, description="validate on evaluate_split every this many steps "
                                       "(rank 0; PSNR per task in the reports and the log); None = only at the end")
    output_dir: str = Field("outputs/train", description="exported weights, evaluation tables and pictures")
    seed: int = 0


# ---------------------------------------------------------------------------------------------------------------------
# Worker side


def _load_text_embeddings(path: str | None, s3: S3Settings | None) -> dict[str, torch.Tensor] | None:
    if path is None:
        return None
    import pyarrow.parquet as pq

    from datprl.platform.storage import filesystem

    fs, local = filesystem(path, s3)
    table = pq.read_table(local, filesystem=fs, columns=["source_id", "embedding"])
    return {sid: torch.tensor(emb, dtype=torch.float32) for sid, emb in zip(table["source_id"].to_pylist(), table["embedding"].to_pylist())}


def _text_batch(table: dict[str, torch.Tensor] | None, source_ids: list[str], device) -> tuple[Any, Any]:
    if table is None:
        return None, None
    dim = next(iter(table.values())).numel()
    mask = torch.tensor([s in table for s in source_ids], device=device)
    rows = [table.get(s, torch.zeros(dim)) for s in source_ids]
    return torch.stack(rows).to(device), mask


def _schedule(optim: OptimConfig, steps: int):
    def factor(step: int) -> float:
        if step < optim.warmup_steps:
            return (step + 1) / optim.warmup_steps
        progress = min(1.0, (step - optim.warmup_steps) / max(1, steps - optim.warmup_steps))
        floor = optim.min_lr / optim.lr
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def _worker_print(*parts: object, flush: bool = True) -> None:
    # Ray Train V2 patches print() in workers to go both to the console and to its logger, which the driver shows
    # twice; the process's real stdout is forwarded to the driver once.
    print(*parts, file=sys.__stdout__, flush=flush)


def train_loop_per_worker(loop_config: dict) -> None:
    """Runs on every Ray Train worker."""
    import ray.train
    import ray.train.torch

    config = TrainConfig.model_validate(loop_config["config"])
    tasks: list[str] = loop_config["tasks"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.manual_seed(config.seed + rank)
    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)
    device = ray.train.torch.get_device()

    model = create_model(config.variant, **config.model_overrides)
    net = ray.train.torch.prepare_model(model)  # DDP when world > 1, on the worker's device
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=config.optim.lr, betas=config.optim.betas)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(config.optim, config.steps))
    ema = None
    if config.optim.ema_decay:
        ema = torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(config.optim.ema_decay))
    criterion = DATPRLLoss(config.loss)
    texts = _load_text_embeddings(config.text_embeddings, config.s3)
    if texts is None and rank == 0 and config.loss.align and model.domain_pool is not None:
        _worker_print("[train] no text embeddings (text_embeddings=None): the alignment loss L_align is off")

    step, passes = 0, 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state = torch.load(Path(folder) / "state.pt", map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if ema is not None and state.get("ema") is not None:
            ema.load_state_dict(state["ema"])
        step, passes = state["step"], state["passes"]
        if rank == 0:
            _worker_print(f"[train] resumed from step {step} (pass {passes})")

    start_step = step  # reported with every metric: where this attempt began (0, or the checkpoint it resumed)
    crash_at = _crash_hook()
    shard = ray.train.get_dataset_shard("train")
    report = StreamReport()
    # Every worker takes the same number of steps per pass, or DDP and the streaming split would wait on each other.
    steps_per_pass = batches_per_pass(loop_config["counts"], tasks, config.data.per_task_batch, world)
    batcher = BalancedBatcher(tasks, per_task=config.data.per_task_batch, seed=config.seed + 1000 * passes + rank)
    window: list[dict[str, float]] = []  # loss terms of the steps since the last report
    started = time.perf_counter()
    while step < config.steps:
        for batch in training_batches(shard, tasks, config.data.per_task_batch, config.data.shuffle_buffer, report,
                                      num_batches=steps_per_pass, batcher=batcher):  # fmt: skip
            terms = train_step(net, model, batch, criterion, optimizer, scheduler, params, config, device, texts)
            if ema is not None:
                ema.update_parameters(model)
            step += 1
            if crash_at is not None and rank == 0:
                crash_at(step)
            window.append(terms)
            last = step >= config.steps
            validate = bool(config.validate_every and config.evaluate_split and step % config.validate_every == 0)
            if step % config.log_every == 0 or step % config.checkpoint_every == 0 or validate or last:
                batch_size = batch["lq"].shape[0]
                means = {k: sum(t[k] for t in window) / len(window) for k in window[-1]}
                metrics = {"step": step, "resumed_from_step": start_step, "loss": means["total"],
                           "lr": scheduler.get_last_lr()[0], "passes": passes,
                           "samples_per_s": len(window) * batch_size * world / (time.perf_counter() - started),
                           "corrupt_samples": len(report.corrupt), **{f"loss_{k}": v for k, v in means.items()}}  # fmt: skip
                if config.validate_every and config.evaluate_split and (step % config.validate_every == 0 or last):
                    metrics.update(_validate(model, ema, config, loop_config["held_out"], device, rank, step))
                window, started = [], time.perf_counter()
                if step % config.checkpoint_every == 0 or last:
                    _report_with_checkpoint(metrics, model, optimizer, scheduler, ema, step, passes, config, rank)
                else:
                    ray.train.report(metrics)
                if rank == 0:
                    _worker_print(f"[train] step {step}/{config.steps} loss {metrics['loss']:.4f} "
                                  f"lr {metrics['lr']:.2e} {metrics['samples_per_s']:.1f} samples/s")  # fmt: skip
            if last:
                break
        passes += 1


def train_step(
    net, model, batch, criterion, optimizer, scheduler, params, config: TrainConfig, device, texts
) -> dict[str, float]:
    """One optimisation step on one worker's part of the batch; returns the loss terms (detached floats).

    ``net`` is the (possibly DDP-wrapped) module that runs forward/backward, ``model`` the bare network (pools,
    temperatures); ``batch`` holds ``lq``/``gt`` tensors (B, 3, H, W) and, when ``texts`` is given, ``source_id``.
    Forward under bf16 autocast on GPU, all losses, backward (DDP averages the gradients across workers here),
    optional gradient clipping, optimiser and scheduler step, temperature projection.
    """
    lq, gt = batch["lq"].to(device, non_blocking=True), batch["gt"].to(device, non_blocking=True)
    text, mask = _text_batch(texts, batch["source_id"], device) if texts is not None else (None, None)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        output = net(lq, return_aux=True)
    loss, terms = criterion(output, gt, model=net, text_embedding=text, text_mask=mask)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if config.optim.grad_clip:
        torch.nn.utils.clip_grad_norm_(params, config.optim.grad_clip)
    optimizer.step()
    scheduler.step()
    _clamp_temperatures(model, config)
    return terms


def _validate(model, ema, config: TrainConfig, held_out: list[str], device, rank: int, step: int) -> dict[str, float]:
    """Periodic validation on rank 0 (the weights are the same on every worker): PSNR per task of the EMA weights when
    EMA is on, read in this process (a Ray Data read would compete with the training read for the worker's CPUs)."""
    if rank != 0:
        return {}
    from datprl.platform.evaluate import evaluate

    net = ema.module if ema is not None else model
    result = evaluate(net, config.data, split=config.evaluate_split, max_grids_per_task=0, device=device,
                      zero_shot_tasks=held_out, read_in_process=True)  # fmt: skip
    metrics = {"val_psnr": result.mean["output_psnr"], "val_input_psnr": result.mean["input_psnr"]}
    for row in result.rows:
        metrics[f"val_delta_psnr/{row['task']}"] = row["delta_psnr"]
    deltas = " ".join(f"{row['task']} {row['delta_psnr']:+.2f}" for row in result.rows)
    _worker_print(f"[train] step {step} validation ({config.evaluate_split}): PSNR {metrics['val_psnr']:.2f} dB "
          f"(input {metrics['val_input_psnr']:.2f}); per task dB vs input: {deltas}", flush=True)  # fmt: skip
    return metrics


def _crash_hook():
    """Fault injection for tests (never set in production): with ``DATPRL_TEST_CRASH_AT_STEP=N`` in the workers'
    environment, rank 0 kills its own process (``os._exit(1)``, no cleanup, as a lost node would) right after
    optimiser step N, once: it first creates the file ``DATPRL_TEST_CRASH_MARKER`` and never crashes while that file
    exists (without a marker path it crashes every time it reaches step N). Returns None when the hook is off."""
    at = os.environ.get("DATPRL_TEST_CRASH_AT_STEP")
    if not at:
        return None
    marker = os.environ.get("DATPRL_TEST_CRASH_MARKER")

    def crash(step: int) -> None:
        if step != int(at) or (marker and Path(marker).exists()):
            return
        if marker:
            Path(marker).write_text(f"crashed at step {step}\n")
        _worker_print(f"[train] DATPRL_TEST_CRASH_AT_STEP: worker exits at step {step}")
        os._exit(1)

    return crash


def _clamp_temperatures(model: torch.nn.Module, config: TrainConfig) -> None:
    # The forward pass clamps tau to [min, max] (method.md step 3), which gives the raw parameter zero gradient once it
    # leaves the range: project it back after each step so it can always move again.
    with torch.no_grad():
        for pool in (model.task_pool, model.domain_pool):
            if pool is not None:
                pool.temperature.clamp_(*pool.temperature_range)


def _report_with_checkpoint(metrics, model, optimizer, scheduler, ema, step, passes, config, rank) -> None:
    import ray.train

    with tempfile.TemporaryDirectory() as folder:
        checkpoint = None
        if rank == 0:  # one copy of the replicated state; every worker still reports
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                     "ema": ema.state_dict() if ema is not None else None, "step": step, "passes": passes}  # fmt: skip
            torch.save(state, Path(folder) / "state.pt")
            (Path(folder) / "config.json").write_text(json.dumps(config_to_dict(config), indent=1))
            weights = ema.module if ema is not None else model
            save_model(weights, Path(folder) / "model")
            checkpoint = ray.train.Checkpoint.from_directory(folder)
        ray.train.report(metrics, checkpoint=checkpoint)


# ---------------------------------------------------------------------------------------------------------------------
# Driver side


def _init_ray(config: TrainConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    address = config.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        # The dashboard (127.0.0.1 only) serves the state API that Ray Train's placement-group cleaner polls; without
        # it the cleaner logs a warning every second for the whole run.
        ray.init(num_cpus=max(2, os.cpu_count() or 2), include_dashboard=True, dashboard_host="127.0.0.1",
                 object_store_memory=LOCAL_OBJECT_STORE_BYTES)


def _ensure_dataset(config: TrainConfig) -> None:
    from datprl.platform.shards import read_manifest

    try:
        read_manifest(config.data.dataset, config.data.s3)
    except FileNotFoundError:
        if not config.build_dataset_if_missing:
            raise FileNotFoundError(f"no dataset at {config.data.dataset}; build it with jobs/build_dataset.py") from None
        from datprl.platform.dataset_builder import BuildConfig, build

        print(f"[train] no dataset at {config.data.dataset}: building the embedded default corpus", flush=True)
        build(BuildConfig(output=config.data.dataset, s3=config.data.s3))


def _metrics_log(path: Path):
    """A Ray Train callback that appends rank 0's metrics of every report as one JSON line to ``path``.

    Ray Train V2 keeps only the metrics of the retained checkpoints (``Result.metrics_dataframe``); this file keeps the
    whole curve. The callback runs in the Train controller, which Ray places on the driver's node, so ``path`` is a
    local path there. A resumed run (same name, or a restart after a worker failure) appends, so steps between the
    last checkpoint and a failure can appear twice; ``resumed_from_step`` tells the attempts apart.
    """
    import ray.train

    class MetricsLog(ray.train.UserCallback):
        def after_report(self, run_context, metrics, checkpoint) -> None:
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a") as f:
                f.write(json.dumps({**metrics[0], "checkpoint": checkpoint is not None}) + "\n")

    return MetricsLog()


def training_tasks(config: TrainConfig) -> tuple[list[str], list[str]]:
    """(tasks trained on, tasks held out for zero-shot evaluation): the training split's tasks (or ``data.tasks``)
    minus ``zero_shot_tasks`` and every task of ``zero_shot_domains``."""
    from datprl.platform.shards import read_manifest

    tasks = split_tasks(config.data, "train")
    manifest = read_manifest(config.data.dataset, config.data.s3)
    domains = {c.domain for c in manifest.counts}
    unknown = sorted(set(config.zero_shot_domains) - domains)
    if unknown:
        raise ValueError(f"zero_shot_domains: {unknown} not in {config.data.dataset} (domains: {sorted(domains)})")
    all_tasks = {c.task for c in manifest.counts}
    unknown = sorted(set(config.zero_shot_tasks) - all_tasks)
    if unknown:
        raise ValueError(f"zero_shot_tasks: {unknown} not in {config.data.dataset} (tasks: {sorted(all_tasks)})")
    held = set(config.zero_shot_tasks) | {c.task for c in manifest.counts if c.domain in config.zero_shot_domains}
    trained = [t for t in tasks if t not in held]
    if not trained:
        raise ValueError("zero_shot_tasks / zero_shot_domains hold out every training task; keep at least one")
    return trained, sorted(held)


def _train_counts(config: TrainConfig) -> dict[str, int]:
    from datprl.platform.shards import read_manifest

    counts: dict[str, int] = {}
    for c in read_manifest(config.data.dataset, config.data.s3).counts:
        if c.split == "train":
            counts[c.task] = counts.get(c.task, 0) + c.samples
    return counts


def _absolute_local_paths(config: TrainConfig) -> TrainConfig:
    """Relative local paths made absolute against the driver's working directory: Ray Train workers run in a
    directory of their own, so ``data/default`` would not exist there."""

    def absolute(path: str | None) -> str | None:
        if path is None or path.startswith("s3://") or Path(path).is_absolute():
            return path
        return str(Path(path).resolve())

    data = config.data.model_copy(update={"dataset": absolute(config.data.dataset)})
    return config.model_copy(update={"data": data, "text_embeddings": absolute(config.text_embeddings),
                                     "storage": absolute(config.storage), "output_dir": absolute(config.output_dir)})


def fit(config: TrainConfig):
    """Run (or resume) training on Ray Train; returns the ``ray.train.Result``. Every report's metrics (rank 0) are
    appended to ``<output_dir>/metrics.jsonl`` (see :func:`_metrics_log`)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    config = _absolute_local_paths(config)
    _init_ray(config)
    _ensure_dataset(config)
    tasks, held_out = training_tasks(config)
    counts = _train_counts(config)
    if held_out:
        print(f"[train] held out of training (zero-shot): {held_out}", flush=True)
    use_gpu = torch.cuda.is_available() if config.use_gpu == "auto" else config.use_gpu
    storage_fs = None
    storage_path = config.storage
    if config.storage.startswith("s3://"):
        from datprl.platform.storage import filesystem

        storage_fs, storage_path = filesystem(config.storage, config.s3)
    else:
        storage_path = str(Path(config.storage).resolve())
    cached = use_decoded_cache(config.data, "train")  # decided once, here, and handed to read_split
    if cached:
        print("[train] train split: decoding it once into the object store, then cropping every pass", flush=True)
    else:
        print("[train] train split: decoding every pass (data.cache_decoded=false, or too large for the object "
              "store)", flush=True)  # fmt: skip
    train_split = read_split(config.data.model_copy(update={"cache_decoded": cached}), "train")
    trainer = TorchTrainer(
        train_loop_per_worker,
        # model_dump, not config_to_dict: the JSON dump masks S3 secrets ("**********"), which workers need.
        train_loop_config={"config": config.model_dump(), "tasks": tasks, "counts": counts, "held_out": held_out},
        scaling_config=ray.train.ScalingConfig(
            num_workers=config.num_workers, use_gpu=use_gpu, resources_per_worker={"CPU": config.cpus_per_worker}
        ),
        datasets={"train": train_split},
        run_config=ray.train.RunConfig(
            name=config.name,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            failure_config=ray.train.FailureConfig(max_failures=config.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=[_metrics_log(Path(config.output_dir).resolve() / "metrics.jsonl")],
        ),
    )
    return trainer.fit()


def export_final(result, output_dir: Path) -> Path:
    """Copy the final checkpoint's weights (safetensors + json) to ``output_dir/model.*``; returns the weights path."""
    from datprl.models import load_model

    output_dir.mkdir(parents=True, exist_ok=True)
    with result.checkpoint.as_directory() as folder:
        model = load_model(Path(folder) / "model.safetensors")
    return save_model(model, output_dir / "model")


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: train, export, evaluate, print the table."""
    config = parse_cli(TrainConfig, sys.argv[1:] if argv is None else argv)
    output_dir = Path(config.output_dir)
    save_resolved_config(config, output_dir / "config.yaml")
    result = fit(config)
    if result.error is not None:
        raise SystemExit(f"training failed: {result.error}")
    weights = export_final(result, output_dir)
    print(f"[train] exported {weights}", flush=True)
    if config.evaluate_split:
        from datprl.models import load_model
        from datprl.platform.evaluate import evaluate

        _, held_out = training_tasks(config)
        evaluation = evaluate(load_model(weights), config.data, split=config.evaluate_split, out_dir=output_dir / "eval",
                              zero_shot_tasks=held_out, metadata={"weights": str(weights), "run": config.name})  # fmt: skip
        print(evaluation.markdown())
    return 0
