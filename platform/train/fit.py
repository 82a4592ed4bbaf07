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
import sys
from pathlib import Path

import torch

from datprl.models import save_model
from datprl.platform.config import parse_cli, save_resolved_config
from datprl.platform.data.pipeline import read_split, split_tasks, use_decoded_cache
from datprl.platform.runtime import init_ray
from datprl.platform.train.config import TrainConfig
from datprl.platform.train.loop import train_loop_per_worker

log = logging.getLogger(__name__)


def _ensure_dataset(config: TrainConfig) -> None:
    from datprl.platform.data.format import read_manifest

    try:
        read_manifest(config.data.dataset, config.data.s3)
    except FileNotFoundError:
        if not config.build_dataset_if_missing:
            raise FileNotFoundError(f"no dataset at {config.data.dataset}; build it with jobs/build_dataset.py") from None
        from datprl.platform.data.build import BuildConfig, build

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
    from datprl.platform.data.format import read_manifest

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
    from datprl.platform.data.format import read_manifest

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
    init_ray(config.ray_address)
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
        from datprl.platform.evaluation.evaluate import evaluate

        _, held_out = training_tasks(config)
        evaluation = evaluate(load_model(weights), config.data, split=config.evaluate_split, out_dir=output_dir / "eval",
                              zero_shot_tasks=held_out, metadata={"weights": str(weights), "run": config.name})  # fmt: skip
        print(evaluation.markdown())
    return 0
