"""The tune job's driver: ``python jobs/tune.py [--dry-run] [config.yaml] [key=value ...]``.

Every trial is a real Ray Train run of the training job. Under Ray Train V2 a ``TorchTrainer`` cannot be handed to a
``Tuner``; the supported pattern, used here, is a Tune *function* trainable (:func:`run_trial`) that builds the
trial's ``TorchTrainer`` (:func:`datprl.platform.train.fit.build_trainer`) and calls ``fit()``, with
``ray.tune.integration.ray_train.TuneReportCallback`` among the trainer's callbacks: it forwards rank 0's reports to
Tune, where Optuna's TPE (:class:`~ray.tune.search.optuna.OptunaSearch`, a define-by-run space: :class:`DefineByRun`)
and ASHA (:class:`~ray.tune.schedulers.ASHAScheduler`, ``time_attr="step"``) see them.

Resources: a trial's function holds ``search.trial_cpus`` and waits on its trainer, whose workers hold
``train.num_workers x train.cpus_per_worker``; the job refuses (before Ray starts, for a local Ray) a config whose
``max_concurrent_trials`` running trials would leave less than ``search.data_cpus`` free, because a Ray Data read task
needs a whole CPU and trials holding every CPU wait for their reads forever.

Resume: the sweep's state lives at ``<train.storage>/<name>`` (local or s3://) and each trial's Ray Train run at
``<train.storage>/<name>/train/<trial id>``. Launching the same name again restores the sweep (``Tuner.restore``):
finished trials are kept as they are, and a trial that was running when the driver died restarts under its own id,
so its TorchTrainer resumes from its last checkpoint: it loses at most the steps since then.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from datprl.platform.config import config_to_dict, parse_cli, save_resolved_config
from datprl.platform.train.runs import flatten
from datprl.platform.storage import atomic_write_bytes, exists, filesystem, is_s3, join_url, read_bytes
from datprl.platform.tune.config import POOLS, TuneConfig, metric_task, trial_output_dir, trial_train_config

__all__ = ["DefineByRun", "SweepError", "check_resources", "main", "prepare_sweep", "run_sweep", "run_trial"]

#: The sweep's own record of its config, next to Ray Tune's state: a relaunch with another search is refused.
SWEEP_CONFIG_FILE = "datprl-tune-config.json"
#: Fields that may change between launches of one sweep (where outputs go, how loud, which machine).
_FREE_FIELDS = ({"output_dir", "resume", "local_cpus"}, {"ray_address", "verbose"})


class DefineByRun:
    """The search space as Optuna's define-by-run function: each pool's size first, then its top-k from
    ``top_k.low`` to ``min(top_k.high, size)``, so top-k never exceeds the size drawn; then the prompt dimension and the
    learning rate when searched. A class, not a closure: Tune pickles the searcher (with this) into its state."""

    def __init__(self, config: TuneConfig):
        self.space = config.space

    def __call__(self, trial) -> None:
        for pool in POOLS:
            ranges = getattr(self.space, pool)
            if ranges is None:
                continue
            size = trial.suggest_int(f"{pool}.size", ranges.size.low, ranges.size.high, log=ranges.size.log)
            high = min(ranges.top_k.high, size)
            trial.suggest_int(f"{pool}.top_k", ranges.top_k.low, high, log=ranges.top_k.log and high > ranges.top_k.low)
        if self.space.prompt_dim is not None:
            trial.suggest_categorical("prompt_dim", list(self.space.prompt_dim))
        if self.space.lr is not None:
            trial.suggest_float("lr", self.space.lr.low, self.space.lr.high, log=self.space.lr.log)


def run_trial(params: dict[str, Any], config: TuneConfig) -> None:
    """One trial (Ray Tune's function trainable): train the recipe with ``params`` on Ray Train, its reports forwarded
    to Tune by ``TuneReportCallback``. A trial restarted after the driver died finds its run's checkpoints under its
    own id and resumes from the last one; a run that had already finished reports its last validation again (the
    driver died before Tune recorded it) instead of training."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from datprl.platform.train.fit import build_trainer, prepare

    if not config.train.verbose:
        from datprl.platform.runtime import quiet_ray_logging

        quiet_ray_logging()
    trial_id = tune.get_context().get_trial_id()
    train = trial_train_config(config, params, trial_id, trial_output_dir(config, trial_id))
    run = prepare(train)
    if run.status.kind == "complete":
        last = _last_validation(Path(train.output_dir) / "metrics.jsonl", config.metric)
        if last is None:
            raise RuntimeError(
                f"trial {trial_id}: its run is complete at {run.status.url} but "
                f"{train.output_dir}/metrics.jsonl holds no {config.metric}"
            )
        tune.report(last)
        return
    result = build_trainer(run, callbacks=[TuneReportCallback()]).fit()
    if result.error is not None:
        raise result.error


def _last_validation(path: Path, metric: str) -> dict | None:
    """The last report of a run's metrics log that carries ``metric``."""
    from datprl.platform.train.fit import read_metrics_log

    return next((report for report in reversed(read_metrics_log(path)) if metric in report), None)


# --- checks before Ray starts -------------------------------------------------------------------------------------
class SweepError(ValueError):
    """A sweep that cannot start as asked; the message says why and what to do."""


def _absolute(config: TuneConfig) -> TuneConfig:
    """Local paths made absolute against this directory (trials run in folders of their own)."""
    from datprl.platform.train.fit import _absolute_local_paths

    return config.model_copy(
        update={"train": _absolute_local_paths(config.train), "output_dir": str(Path(config.output_dir).resolve())}
    )


def _dataset(config: TuneConfig):
    """The recipe's dataset, built first when missing (``build``, else the training job's rule)."""
    from datprl.platform.data.build import ensure_dataset
    from datprl.platform.data.handle import DatasetHandle
    from datprl.platform.train.fit import open_dataset

    train = config.train
    if config.build is None:
        return open_dataset(train)
    command = ["jobs/tune.py", f"train.data.dataset={train.data.dataset}"]  # recorded in the built manifest
    ensure_dataset(train.data.dataset, train.data.s3, command=command, recipe=config.build)
    return DatasetHandle.open(train.data.dataset, train.data.s3)


def check_resources(config: TuneConfig, cpus: float) -> None:
    """Refuse a concurrency at which running trials would leave less than ``search.data_cpus`` of ``cpus`` free."""
    train, search = config.train, config.search
    workers = max(train.num_workers) if isinstance(train.num_workers, tuple) else train.num_workers
    per_trial = search.trial_cpus + workers * train.cpus_per_worker
    held = search.max_concurrent_trials * per_trial
    if cpus - held < search.data_cpus - 1e-9:
        fit = max(0, math.floor((cpus - search.data_cpus) / per_trial + 1e-9))
        fix = (
            f"use search.max_concurrent_trials={fit} or fewer"
            if fit
            else "not even one trial fits: use smaller "
            "train.cpus_per_worker / search.trial_cpus, or more CPUs (local_cpus, or a larger cluster)"
        )
        raise SweepError(
            f"{search.max_concurrent_trials} concurrent trials x {per_trial:g} CPUs (search.trial_cpus "
            f"{search.trial_cpus:g} + {workers} worker(s) x train.cpus_per_worker {train.cpus_per_worker:g}) hold "
            f"{held:g} of {cpus:g} CPUs, leaving less than search.data_cpus={search.data_cpus:g} for the Ray Data "
            f"reads (trials would wait for them forever); {fix}"
        )


def _sweep_identity(data: dict) -> dict:
    top, train = _FREE_FIELDS
    data = {k: v for k, v in data.items() if k not in top}
    data["train"] = {k: v for k, v in data.get("train", {}).items() if k not in train}
    return data


def _experiment(config: TuneConfig) -> tuple[Any, str]:
    """(pyarrow filesystem or None, path) of the sweep's state for Ray Tune."""
    if is_s3(config.train.storage):
        fs, root = filesystem(config.train.storage, config.train.s3)
        return fs, f"{root}/{config.name}"
    return None, config.experiment_url()


def _restorable(config: TuneConfig) -> bool:
    from ray.tune import Tuner

    fs, path = _experiment(config)
    return Tuner.can_restore(path, storage_filesystem=fs) if fs is not None else Tuner.can_restore(path)


def _delete_sweep(config: TuneConfig) -> bool:
    import pyarrow.fs as pafs

    fs, root = filesystem(config.experiment_url(), config.train.s3)
    if fs.get_file_info(root).type == pafs.FileType.NotFound:
        return False
    fs.delete_dir(root)
    return True


def prepare_sweep(config: TuneConfig) -> tuple[TuneConfig, bool]:
    """Everything checked before Ray starts: paths made absolute, the dataset (built when missing) against the metric,
    the CPUs of a local Ray against the trials' resources, and an existing sweep of this name against this config
    (``resume=false`` deletes it). Returns the config and whether the sweep is restored. Raises :class:`SweepError`."""
    config = _absolute(config)
    train = config.train
    if not train.ray_address and not os.environ.get("RAY_ADDRESS"):
        check_resources(config, config.local_cpus or max(2, os.cpu_count() or 2))
    try:
        dataset = _dataset(config)
    except (FileNotFoundError, ValueError) as err:
        raise SweepError(str(err)) from None
    split = train.cross_source_split if config.metric.startswith("cross_") else train.evaluate_split
    if config.metric != "loss" and split not in dataset.splits():
        raise SweepError(
            f"metric={config.metric} is measured on split {split!r}, which {train.data.dataset} does not "
            f"have (splits: {dataset.splits()})"
        )
    task = metric_task(config.metric)
    if task is not None and task not in dataset.tasks(split):
        raise SweepError(
            f"metric={config.metric}: task {task!r} is not in split {split!r} of {train.data.dataset} "
            f"(tasks: {sorted(dataset.tasks(split))})"
        )
    if not config.resume and _delete_sweep(config):
        print(f"[tune] resume=false: deleted sweep {config.name!r} at {config.experiment_url()}", flush=True)
    restore = _restorable(config)
    record = join_url(config.experiment_url(), SWEEP_CONFIG_FILE)
    if restore and exists(record, train.s3):
        saved = _sweep_identity(json.loads(read_bytes(record, train.s3)))
        asked = _sweep_identity(json.loads(json.dumps(config_to_dict(config))))
        old, new = flatten(saved), flatten(asked)
        diffs = [(k, old.get(k), new.get(k)) for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
        if diffs:
            shown = "\n".join(f"  {key}: {old!r} in the sweep, {new!r} asked for" for key, old, new in diffs[:12])
            raise SweepError(
                f"sweep {config.name!r} at {config.experiment_url()} was started with another config:\n"
                f"{shown}\nStart a new sweep with name=<another name>, or this one over with "
                "resume=false (deletes its trials)"
            )
    return config, restore


# --- the sweep ----------------------------------------------------------------------------------------------------
def _tuner(config: TuneConfig, restore: bool, callback):
    """A new ``Tuner`` (OptunaSearch + ASHA), or the sweep's restored one."""
    import optuna
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no line per study or trial: the job prints its own
    trainable = tune.with_resources(tune.with_parameters(run_trial, config=config), {"cpu": config.search.trial_cpus})
    fs, path = _experiment(config)
    if restore:
        return tune.Tuner.restore(
            path,
            trainable=trainable,
            resume_unfinished=True,
            resume_errored=False,
            restart_errored=False,
            storage_filesystem=fs,
        )
    search = config.search
    sampler = optuna.samplers.TPESampler(seed=search.seed, n_startup_trials=search.startup_trials)
    searcher = OptunaSearch(space=DefineByRun(config), metric=config.metric, mode=config.mode, sampler=sampler)
    scheduler = ASHAScheduler(
        time_attr="step",
        max_t=config.train.steps,
        grace_period=config.grace_period,
        reduction_factor=search.reduction_factor,
    )
    storage_path = path.rsplit("/", 1)[0] if fs is not None else config.train.storage
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            metric=config.metric,
            mode=config.mode,
            search_alg=searcher,
            scheduler=scheduler,
            num_samples=search.num_samples,
            max_concurrent_trials=search.max_concurrent_trials,
        ),
        run_config=tune.RunConfig(
            name=config.name,
            storage_path=storage_path,
            storage_filesystem=fs,
            verbose=1 if config.train.verbose else 0,
            callbacks=[callback],
        ),
    )


def _fail(message: str, code: int = 2) -> int:
    print(f"tune.py: error: {message}", file=sys.stderr)
    return code


def run_sweep(config: TuneConfig) -> int:
    """Check, run (or resume) the sweep, write its outputs to ``output_dir``; returns the exit code."""
    from datprl.platform.runtime import LocalRaySettings, ray_session, stop_exit_code
    from datprl.platform.train.fit import ensure_priors
    from datprl.platform.tune import report
    from datprl.platform.tune.console import TrialLines

    started = time.monotonic()
    try:
        config, restore = prepare_sweep(config)
    except SweepError as err:
        return _fail(str(err))
    train, out = config.train, Path(config.output_dir)
    save_resolved_config(config, out / "config.yaml")
    local = LocalRaySettings(num_cpus=config.local_cpus, log_to_driver=train.verbose)
    interrupted = False
    try:
        with ray_session(train.ray_address, local=local, quiet=not train.verbose) as session:
            if not session.started_here:
                import ray

                check_resources(config, float(ray.cluster_resources().get("CPU", 0)))
            ensure_priors(train)  # once, before any trial (trials never describe on their own)
            atomic_write_bytes(
                join_url(config.experiment_url(), SWEEP_CONFIG_FILE),
                json.dumps(config_to_dict(config), indent=1).encode(),
                train.s3,
            )
            verb = "resuming" if restore else "starting"
            print(
                f"[tune] {verb} sweep {config.name!r}: {config.search.num_samples} trials of {train.steps} steps, "
                f"{config.search.max_concurrent_trials} at a time, metric {config.metric} ({config.mode}), "
                f"state at {config.experiment_url()}",
                flush=True,
            )
            if not train.verbose:
                # Ray Tune's console (the experiment header, status tables) off: TrialLines prints one line per event.
                # Read when the Tuner runs; "0" selects the classic reporter, which verbose=0 silences entirely.
                os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
            os.environ["TUNE_GLOBAL_CHECKPOINT_S"] = f"{config.search.state_every_s:g}"  # read when the Tuner runs
            callback = TrialLines(config.metric, train.steps, config.search.num_samples)
            tuner = _tuner(config, restore, callback)
            try:
                grid = tuner.fit()
            except KeyboardInterrupt:
                # SIGTERM (or a Ctrl-C that Tune's own handler did not take) cut fit() off: Tune may have no results
                # to give then, and the sweep's state on disk is what the same command resumes.
                interrupted = True
                try:
                    grid = tuner.get_results()
                except RuntimeError:
                    raise KeyboardInterrupt from None  # handled below, after ray_session has stopped Ray
            rows = report.trial_rows(config, grid)
    except SweepError as err:
        return _fail(str(err))
    except KeyboardInterrupt:
        print(f"\n[tune] stopped; the same command resumes sweep {config.name!r}", file=sys.stderr, flush=True)
        return stop_exit_code()  # 143 after SIGTERM, 130 after Ctrl-C
    written = report.write_outputs(config, rows, elapsed_s=time.monotonic() - started)
    print(written.markdown)
    print(f"[tune] wrote {', '.join(str(p) for p in written.paths)}", flush=True)
    if interrupted:
        print(f"[tune] interrupted; the same command resumes sweep {config.name!r}", file=sys.stderr, flush=True)
        return stop_exit_code()  # 143 after SIGTERM, 130 after Ctrl-C
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point: ``python jobs/tune.py [--dry-run] [config.yaml] [key=value ...]``."""
    config = parse_cli(TuneConfig, sys.argv[1:] if argv is None else argv, prog="tune.py")
    return run_sweep(config)
