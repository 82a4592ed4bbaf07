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
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from datprl.models import save_model
from datprl.platform.config import config_to_dict, parse_cli, save_resolved_config
from datprl.platform.data.handle import DatasetHandle
from datprl.platform.data.pipeline import read_split, split_tasks, use_decoded_cache
from datprl.platform.storage import atomic_write_bytes, filesystem, is_s3
from datprl.platform.runtime import init_ray, ray_session, stop_exit_code
from datprl.platform.train.config import TrainConfig
from datprl.platform.train.init_weights import check_init
from datprl.platform.train.loop import train_loop_per_worker, worker_env_vars
from datprl.platform.train.priors import AUTO, ensure_text_embeddings, resolve_text_embeddings
from datprl.platform.train.runs import RunMismatch, RunStatus, check_run, delete_run, run_url

log = logging.getLogger(__name__)


def open_dataset(config: TrainConfig) -> DatasetHandle:
    """The run's dataset, its manifest read once; the embedded default corpus is built first when it is missing and
    ``build_dataset_if_missing`` is on (building needs no Ray)."""
    try:
        return DatasetHandle.open(config.data.dataset, config.data.s3)
    except FileNotFoundError:
        if not config.build_dataset_if_missing:
            raise
    from datprl.platform.data.build import ensure_dataset

    command = ["jobs/train.py", f"data.dataset={config.data.dataset}"]  # recorded in the built manifest
    ensure_dataset(config.data.dataset, config.data.s3, command=command)
    return DatasetHandle.open(config.data.dataset, config.data.s3)


def read_metrics_log(path: Path) -> list[dict]:
    """The reports of a run's ``metrics.jsonl`` (written by :func:`_metrics_log`), in order; a line cut short by a
    crash is skipped; empty when the file does not exist (e.g. it was written on another node)."""
    if not path.exists():
        return []
    reports = []
    for line in path.read_text().splitlines():
        try:
            reports.append(json.loads(line))
        except ValueError:
            continue
    return reports


def _metrics_log(path: Path):
    """A Ray Train callback that appends rank 0's metrics of every report as one JSON line to ``path``.

    Ray Train V2 keeps only the metrics of the retained checkpoints (``Result.metrics_dataframe``); this file keeps the
    whole curve. The callback runs in the Train controller, which Ray places on the driver's node, so ``path`` is a
    local path there. A resumed run (same name, or a restart after a worker failure) appends, so steps between the
    last checkpoint and a failure can appear twice; ``resumed_from_step`` tells the attempts apart. A new run's log
    starts empty (:func:`set_aside_metrics_log`).
    """
    import ray.train

    class MetricsLog(ray.train.UserCallback):
        def after_report(self, run_context, metrics, checkpoint) -> None:
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a") as f:
                f.write(json.dumps({**metrics[0], "checkpoint": checkpoint is not None}) + "\n")

    return MetricsLog()


def set_aside_metrics_log(path: Path) -> Path | None:
    """Start a *new* run's ``metrics.jsonl`` empty: an earlier run's log at ``path`` (the same ``output_dir`` under
    another ``name``, or after ``resume=false``) is renamed to ``metrics.<its last write, UTC>.jsonl`` beside it.

    Appending would mix two runs' curves in one file, and what reads it (the tune job's report and sweep, the
    benchmarks) takes the last report of a step or metric; deleting would lose the earlier run's record. Returns the
    new name, or None when there was no log.
    """
    if not path.exists():
        return None
    stamp = datetime.fromtimestamp(path.stat().st_mtime, timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    target, n = path.with_name(f"metrics.{stamp}.jsonl"), 1
    while target.exists():
        n += 1
        target = path.with_name(f"metrics.{stamp}-{n}.jsonl")
    path.rename(target)
    return target


def training_tasks(config: TrainConfig, dataset: DatasetHandle | None = None) -> tuple[list[str], list[str]]:
    """(tasks trained on, tasks held out for zero-shot evaluation): the training split's tasks (or ``data.tasks``)
    minus ``zero_shot_tasks`` and every task of ``zero_shot_domains``."""
    dataset = dataset if dataset is not None else DatasetHandle.open(config.data.dataset, config.data.s3)
    tasks = split_tasks(config.data, "train", dataset)
    domains = dataset.domains()
    unknown = sorted(set(config.zero_shot_domains) - domains)
    if unknown:
        raise ValueError(f"zero_shot_domains: {unknown} not in {config.data.dataset} (domains: {sorted(domains)})")
    all_tasks = dataset.all_tasks()
    unknown = sorted(set(config.zero_shot_tasks) - all_tasks)
    if unknown:
        raise ValueError(f"zero_shot_tasks: {unknown} not in {config.data.dataset} (tasks: {sorted(all_tasks)})")
    held = set(config.zero_shot_tasks) | dataset.domain_tasks(config.zero_shot_domains)
    trained = [t for t in tasks if t not in held]
    if not trained:
        raise ValueError("zero_shot_tasks / zero_shot_domains hold out every training task; keep at least one")
    return trained, sorted(held)


def _absolute_local_paths(config: TrainConfig) -> TrainConfig:
    """Relative local paths made absolute against the driver's working directory: Ray Train workers run in a
    directory of their own, so ``data/default`` would not exist there."""

    def absolute(path: str | None) -> str | None:
        if path is None or is_s3(path) or Path(path).is_absolute():
            return path
        return str(Path(path).resolve())

    data = config.data.model_copy(update={"dataset": absolute(config.data.dataset)})
    text_embeddings = config.text_embeddings if config.text_embeddings == AUTO else absolute(config.text_embeddings)
    return config.model_copy(
        update={
            "data": data,
            "init": config.init.model_copy(update={"weights": absolute(config.init.weights)}),
            "text_embeddings": text_embeddings,
            "storage": absolute(config.storage),
            "output_dir": absolute(config.output_dir),
        }
    )


@dataclass(frozen=True)
class PreparedRun:
    """A training run checked on the driver before Ray starts: its config with absolute local paths, its dataset
    (manifest read once), the tasks it trains and holds out, what launching it does (new, resume, complete), and the
    record of the weights it starts from (``init``: checked now for a new run, read from the checkpoint of a resumed
    one; None when it started from scratch)."""

    config: TrainConfig
    dataset: DatasetHandle
    tasks: list[str]
    held_out: list[str]
    status: RunStatus
    init: dict | None = None


def prepare(config: TrainConfig) -> PreparedRun:
    """Everything that can be checked without Ray: paths, the run's existing checkpoint against ``config`` (raises
    :class:`~datprl.platform.train.runs.RunMismatch`; ``resume=false`` deletes the old run first), the dataset (built
    if missing) and its tasks, and for a new run the ``init`` weights against the configured network
    (:func:`~datprl.platform.train.init_weights.check_init`: ValueError naming the keys that do not fit,
    FileNotFoundError)."""
    config = _absolute_local_paths(config)
    if not config.resume and delete_run(config):
        print(f"[train] resume=false: deleted the checkpoints of run {config.name!r} at {run_url(config)}", flush=True)
    dataset = open_dataset(config)
    status = check_run(config, dataset.manifest_sha256)
    tasks, held_out = training_tasks(config, dataset)
    init = status.init
    if status.kind == "new":
        init = check_init(config)
    elif config.init.weights is not None and status.kind == "resume":
        print(
            f"[train] init.weights not applied: run {config.name!r} resumes from its checkpoint at step {status.step} "
            "(init starts a new run only)",
            flush=True,
        )
    return PreparedRun(config, dataset, tasks, held_out, status, init)


def ensure_priors(config: TrainConfig) -> None:
    """Make sure the text embeddings L_align needs exist (describing the training images first when
    ``text_embeddings=auto`` and ``describe_if_missing``); Ray must be running. A no-op without L_align or without a
    domain pool."""
    if config.loss.align and config.model.resolve().domain_pool is not None:
        url = resolve_text_embeddings(config.text_embeddings, config.data.dataset)
        describe = config.text_embeddings == AUTO and config.describe_if_missing
        ensure_text_embeddings(url, config.data.dataset, config.data.s3, describe=describe)


def build_trainer(run: PreparedRun, callbacks: Sequence = ()):
    """The ``TorchTrainer`` of a prepared run (Ray must be running): the train split read (decoded once into the object
    store when it fits), the workers' scaling, the run's storage (local or s3://) and name, and the callbacks: the
    metrics log of ``<output_dir>/metrics.jsonl`` (:func:`_metrics_log`) and ``callbacks`` (e.g. the tune job's
    ``TuneReportCallback``)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    config, dataset = run.config, run.dataset
    use_gpu = torch.cuda.is_available() if config.use_gpu == "auto" else config.use_gpu
    storage_fs = None
    storage_path = config.storage
    if is_s3(config.storage):
        storage_fs, storage_path = filesystem(config.storage, config.s3)
    cached = use_decoded_cache(config.data, "train", dataset)  # decided once, here, and handed to read_split
    if cached:
        print("[train] train split: decoding it once into the object store, then cropping every pass", flush=True)
    else:
        print(
            "[train] train split: decoding every pass (data.cache_decoded=false, or too large for the object store)",
            flush=True,
        )
    train_split = read_split(config.data.model_copy(update={"cache_decoded": cached}), "train", dataset=dataset)
    metrics_path = Path(config.output_dir) / "metrics.jsonl"
    if run.status.kind == "new" and (moved := set_aside_metrics_log(metrics_path)) is not None:
        print(
            f"[train] {metrics_path} held an earlier run's reports: kept as {moved.name}, and this run's start a new "
            "file",
            flush=True,
        )
    return TorchTrainer(
        train_loop_per_worker,
        # model_dump, not config_to_dict: the JSON dump masks S3 secrets ("**********"), which workers need.
        train_loop_config={
            "config": config.model_dump(),
            "tasks": run.tasks,
            "counts": dataset.samples_per_task("train"),
            "held_out": run.held_out,
            "manifest_sha256": dataset.manifest_sha256,
            "init": run.init,  # recorded in every checkpoint's progress.json (provenance after a resume)
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=config.num_workers,
            use_gpu=use_gpu,
            resources_per_worker={"CPU": config.cpus_per_worker},
            placement_strategy=config.placement_strategy,
        ),
        datasets={"train": train_split},
        run_config=ray.train.RunConfig(
            name=config.name,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            failure_config=ray.train.FailureConfig(max_failures=config.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=[_metrics_log(metrics_path), *callbacks],
            worker_runtime_env={"env_vars": worker_env_vars()},  # libgomp's spin, before torch's import
            # Ray Train sets up its controller's and workers' loggers from this level itself (no variable reaches
            # them): WARNING keeps worker-group start-up and checkpoint notes out of the console unless verbose.
            logging_config=ray.train.LoggingConfig(log_level="INFO" if config.verbose else "WARNING"),
        ),
    )


def fit(config: TrainConfig | PreparedRun):
    """Run (or resume) training on Ray Train (a local Ray is started unless one is running or ``ray_address`` /
    ``RAY_ADDRESS`` names a cluster); returns the ``ray.train.Result``. Every report's metrics (rank 0) are appended to
    ``<output_dir>/metrics.jsonl`` (see :func:`_metrics_log`) and drawn as a progress bar."""
    from datprl.platform.train.progress import TrainingProgress

    run = config if isinstance(config, PreparedRun) else prepare(config)
    config = run.config
    init_ray(config.ray_address, quiet=not config.verbose)
    ensure_priors(config)
    if run.held_out:
        print(f"[train] held out of training (zero-shot): {run.held_out}", flush=True)
    trainer = build_trainer(run)
    with TrainingProgress(
        Path(config.output_dir) / "metrics.jsonl",
        total_steps=config.steps,
        start_step=run.status.step,
        enabled=not config.verbose,
    ):
        return trainer.fit()


def final_weights(result):
    """The network of the run's final checkpoint (the EMA weights when EMA is on)."""
    from datprl.models import load_model

    with result.checkpoint.as_directory() as folder:
        return load_model(Path(folder) / "model.safetensors")


def _fail(message: str, code: int = 2) -> int:
    print(f"train.py: error: {message}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: check the run before Ray starts, train, evaluate, export the weights with their provenance,
    print the table. SIGTERM and Ctrl-C stop the Ray this process started (a joined cluster is left running)."""
    config = parse_cli(TrainConfig, sys.argv[1:] if argv is None else argv, prog="train.py")
    return train_and_evaluate(config)


def train_and_evaluate(config: TrainConfig) -> int:
    """What :func:`main` does with a parsed config (other jobs, e.g. the ablation, call it per run): returns the exit
    code; joins a Ray this process already runs rather than starting one."""
    try:
        run = prepare(config)
    except (RunMismatch, FileNotFoundError, ValueError) as err:
        return _fail(str(err))
    config, output_dir = run.config, Path(run.config.output_dir)
    weights_path = output_dir / "model.safetensors"
    if run.status.kind == "complete":
        exported = f"its weights: {weights_path}" if weights_path.exists() else f"no exported weights at {weights_path}"
        print(
            f"[train] run {config.name!r} is already complete ({run.status.step}/{config.steps} steps) at "
            f"{run.status.url}; {exported}. Nothing to do: train another run with name=<new name>, or this one "
            "again with resume=false.",
            flush=True,
        )
        return 0
    if run.status.kind == "resume":
        print(f"[train] resuming run {config.name!r} from step {run.status.step}/{config.steps}", flush=True)
        if run.status.previous_steps is not None:
            print(
                f"[train] steps changed from {run.status.previous_steps} to {config.steps}: the learning-rate "
                f"schedule now decays over {config.steps} steps",
                flush=True,
            )
    from datprl.platform.evaluation.evaluate import evaluate
    from datprl.platform.evaluation.report import side_by_side_markdown
    from datprl.platform.train.provenance import build_provenance

    save_resolved_config(config, output_dir / "config.yaml")
    try:
        with ray_session(config.ray_address, quiet=not config.verbose):
            result = fit(run)
            if result.error is not None:
                return _fail(f"training failed: {result.error}", code=1)
            model, evaluations = final_weights(result), {}
            cross = config.cross_source_split
            splits = {config.evaluate_split: "eval"} if config.evaluate_split else {}
            if cross and cross != config.evaluate_split and cross in run.dataset.splits():
                splits[cross] = f"eval-{cross}"
            for split, folder in splits.items():
                evaluations[split] = evaluate(
                    model,
                    config.data,
                    split=split,
                    out_dir=output_dir / folder,
                    zero_shot_tasks=run.held_out,
                    dataset=run.dataset,
                    metadata={"weights": str(weights_path), "run": config.name},
                )
            evaluation = evaluations.get(config.evaluate_split) if config.evaluate_split else None
    except KeyboardInterrupt:  # SIGINT, or SIGTERM (runtime.Stopped; Ray turns one that interrupts fit() into this)
        # ray_session has stopped the local Ray by now; nothing is evaluated or exported from an unfinished run.
        print(
            f"\n[train] stopped before the end; run {config.name!r} keeps its checkpoints at {run.status.url}: the "
            "same command resumes it from the last one",
            file=sys.stderr,
            flush=True,
        )
        return stop_exit_code()  # 143 after SIGTERM, 130 after Ctrl-C
    provenance = build_provenance(
        config_to_dict(config),
        model_spec=config.model.describe(),
        steps=config.steps,
        manifest_sha256=run.dataset.manifest_sha256,
        evaluation=evaluation.to_json() if evaluation is not None else None,
        init=run.init,
    )
    weights = save_model(model, output_dir / "model", provenance=provenance)
    print(f"[train] exported {weights}", flush=True)
    if len(evaluations) > 1:
        table = side_by_side_markdown(evaluations, model=str(weights))
        atomic_write_bytes(output_dir / "evaluation.md", table.encode())
        print(table)
    elif evaluation is not None:
        print(evaluation.markdown())
    return 0
