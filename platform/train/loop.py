"""The worker side of training: what every Ray Train worker runs (model, optimiser, EMA, checkpoints)."""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from datprl.models import create_model, save_model
from datprl.models.losses import DATPRLLoss
from datprl.platform.compute import (
    adam_options,
    autocast,
    grad_scaler,
    prepare_module,
    resolve_adam_impl,
    resolve_precision,
    to_memory_format,
)
from datprl.platform.config import config_to_dict
from datprl.platform.data.sampler import BalancedBatcher, batches_per_pass
from datprl.platform.data.pipeline import StreamReport, training_batches
from datprl.platform.train.config import OptimConfig, TrainConfig
from datprl.platform.train.init_weights import apply_init, freeze_parts
from datprl.platform.train.priors import (
    description_prototypes,
    domain_prototypes,
    load_description_domains,
    load_text_embeddings,
    resolve_text_embeddings,
)
from datprl.platform.train.runs import CONFIG_FILE, PROGRESS_FILE


def _text_batch(table: dict[str, torch.Tensor], source_ids: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch's text embeddings (B, D) and a mask of the samples that have one (sources not described)."""
    mask = [s in table for s in source_ids]
    zero = torch.zeros_like(next(iter(table.values())))
    rows = torch.stack([table[s] if has else zero for s, has in zip(source_ids, mask)])
    return rows.to(device), torch.tensor(mask, device=device)


def _schedule(optim: OptimConfig, steps: int, lr: float | None = None):
    """The cosine schedule's factor per step of a group whose base lr is ``optim.lr`` (``lr`` None) or ``lr`` (the
    loaded parameters' ``init.loaded_lr``: it decays to ``min_lr`` too, or stays put when it is lower already)."""
    floor = optim.min_lr / optim.lr if lr is None else min(1.0, optim.min_lr / lr)

    def factor(step: int) -> float:
        if step < optim.warmup_steps:
            return (step + 1) / optim.warmup_steps
        progress = min(1.0, (step - optim.warmup_steps) / max(1, steps - optim.warmup_steps))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def scaled_lr(optim: OptimConfig, world: int) -> float:
    """The learning rate for ``world`` data-parallel workers under ``optim.lr_scaling`` (``optim.lr`` is the
    1-worker value for linear/sqrt scaling, the value for any global batch for none)."""
    factor = {"none": 1.0, "linear": float(world), "sqrt": math.sqrt(world)}[optim.lr_scaling]
    return optim.lr * factor


def build_optimizer(params, config: TrainConfig, world: int, device: torch.device, loaded=None):
    """(Adam, its cosine schedule, the fp16 GradScaler or None) of a run: the paper's Adam with the learning rate
    for ``world`` workers (:func:`scaled_lr`) and ``config.compute``'s Adam implementation.

    With ``init.loaded_lr`` set, two parameter groups: the ``params`` not in ``loaded`` (those loaded from
    ``init.weights``) at the scaled ``optim.lr``, then the ``loaded`` ones at ``loaded_lr`` scaled alike, each on its
    own cosine schedule (:func:`_schedule`). Both groups always exist, one possibly empty, so a resumed run's
    optimiser state fits whatever was loaded."""
    lr = scaled_lr(config.optim, world)
    groups, lambdas = params, _schedule(config.optim, config.steps)
    loaded_lr = config.init.loaded_lr
    if loaded_lr is not None:
        loaded_ids = {id(p) for p in loaded or ()}
        groups = [
            {"params": [p for p in params if id(p) not in loaded_ids]},
            {"params": [p for p in params if id(p) in loaded_ids], "lr": loaded_lr * lr / config.optim.lr},
        ]
        lambdas = [lambdas, _schedule(config.optim, config.steps, lr=loaded_lr)]
    optimizer = torch.optim.Adam(
        groups, lr=lr, betas=config.optim.betas, **adam_options(config.compute.adam_impl, device)
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)
    return optimizer, scheduler, grad_scaler(config.compute.precision, device)


def build_training_state(
    config: TrainConfig,
    device: torch.device,
    world: int = 1,
    wrap=None,
    resumed: dict | None = None,
    tasks: Sequence[str] | None = None,
) -> dict:
    """What a worker builds before its first step (the caller seeds torch first): the network ``model`` on
    ``device`` and ``net``, what runs it (:func:`~datprl.platform.compute.prepare_module`: memory format, ``wrap``
    such as Ray Train's ``prepare_model`` for DDP, ``torch.compile``), its trainable ``params``, the ``optimizer``,
    ``scheduler`` and fp16 ``scaler`` (:func:`build_optimizer`), the loss (``criterion``) and the ``ema`` copy when
    ``optim.ema_decay`` is set (else None). The benchmarks build the same state in their own process.

    ``init`` (a new run, ``resumed`` None): ``init.weights`` are loaded first, so the EMA copy starts from them;
    ``init_loaded`` names the loaded entries (None without ``init.weights``). ``resumed``, the training state of the
    run's checkpoint (loaded by the caller afterwards), replaces ``init``: the weights are not loaded again, and its
    ``init_loaded`` sets the optimiser's groups as the run began. ``init.train_only`` freezes the other parts."""
    model = create_model(config.model.resolve())
    if resumed is None:
        result = apply_init(model, config)
        init_loaded = result.loaded if result is not None else None
    else:
        init_loaded = resumed.get("init_loaded")
    freeze_parts(model, config.init.train_only)
    model = model.to(device)
    net = prepare_module(model, config.compute, wrap=wrap)
    params = [p for p in net.parameters() if p.requires_grad]
    names = set(init_loaded or ())
    loaded = [p for name, p in model.named_parameters() if p.requires_grad and name in names]
    optimizer, scheduler, scaler = build_optimizer(params, config, world, device, loaded=loaded)
    ema = None
    if config.optim.ema_decay:
        ema_fn = torch.optim.swa_utils.get_ema_multi_avg_fn(config.optim.ema_decay)
        # use_buffers: the pools' running query centres are averaged with the weights (without it the EMA copy would
        # keep the centres it was created with).
        ema = torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=ema_fn, use_buffers=True)
    return dict(
        model=model,
        net=net,
        params=params,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=scaler,
        criterion=DATPRLLoss(config.loss, tasks=tasks).to(device),
        ema=ema,
        init_loaded=init_loaded,
    )


def describe_setup(config: TrainConfig, tasks: int, world: int, device: torch.device) -> str:
    """The line rank 0 logs at start: global batch, learning rate and its scaling, numerics, DDP."""
    per_worker = config.data.per_task_batch * tasks
    compute = config.compute
    parts = [
        f"global batch {per_worker * world} ({config.data.per_task_batch}/task x {tasks} tasks per worker x "
        f"{world} worker{'s' if world > 1 else ''})",
        f"lr {scaled_lr(config.optim, world):g} (optim.lr {config.optim.lr:g}, lr_scaling={config.optim.lr_scaling})",
        f"{device.type} {resolve_precision(compute.precision, device)}",
        f"compile {'on (' + compute.compile_mode + ')' if compute.compile else 'off'}",
        f"channels_last {'on' if compute.channels_last else 'off'}",
        f"Adam {resolve_adam_impl(compute.adam_impl, device)}",
    ]
    if world > 1:
        parts.append("DDP gradient averaging, find_unused_parameters off")
    return "[train] " + "; ".join(parts)


#: libgomp's spin before a waiting torch thread sleeps (iterations; its default is 300,000).
WORKER_GOMP_SPINCOUNT = "10000"


def worker_env_vars() -> dict[str, str]:
    """Environment variables of the Ray Train workers (``RunConfig.worker_runtime_env``; they must be set before the
    worker imports torch): ``GOMP_SPINCOUNT=10000``, a short spin, unless the driver's environment sets
    ``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT`` (those are passed on instead).

    Why: at the end of each parallel region a torch thread waits for its partner. With libgomp's default it spins
    300,000 times first; on a busy 2-core machine (Ray Data's crop tasks, Ray's own processes, anything else) the
    partner is often not running and the spin burns the time it needs: a step of the main job took 2.1 s on 2 threads
    against 0.76 s on 1 thread with two CPU hogs running. ``OMP_WAIT_POLICY=PASSIVE`` (no spin) fixes that but makes
    every wake-up slow: on an idle machine 0.48 s a step against 0.30 s with the default. A 10,000-iteration spin keeps
    both: 0.30 s idle, 0.93 s beside the hogs (PASSIVE 0.89 s) (docs/experiments/2026-12-07-main-job-time.md). It
    changes scheduling only, never the numbers computed."""
    passed = {name: os.environ[name] for name in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT") if name in os.environ}
    return passed or {"GOMP_SPINCOUNT": WORKER_GOMP_SPINCOUNT}


def _worker_print(*parts: object) -> None:
    # Only notes the reports cannot carry (a missing input, a resume, the test hook): steps and validation results
    # reach the console through the driver's progress display, from the reports themselves.
    # Ray Train V2 patches print() in workers to go both to the console and to its logger, which the driver shows
    # twice; the process's real stdout is forwarded to the driver once.
    print(*parts, file=sys.__stdout__, flush=True)


def _start_domain_keys(pool, embeddings: dict, config: TrainConfig, url: str, rank: int) -> None:
    """``domain_key_init=descriptions``: the domain pool's keys start at the descriptions' k-means centroids;
    ``domains``: at each domain's mean description, shared by the domain's keys. Every rank computes the same
    (seeded) prototypes, so the replicas stay identical without a broadcast; a checkpoint loaded afterwards replaces
    them, and the EMA copy takes them at its first update."""
    if config.domain_key_init == "domains":
        prototypes = domain_prototypes(embeddings, load_description_domains(url, config.data.s3), pool.size)
        what = f"the mean description embedding of each domain ({len(prototypes)} keys in equal groups)"
    else:
        prototypes = description_prototypes(embeddings, pool.size, config.seed)
        what = f"{len(prototypes)} k-means centroids of the description embeddings"
    pool.start_keys_at(torch.from_numpy(prototypes))
    if rank == 0:
        rest = pool.size - len(prototypes)
        kept = f"; {rest} keep their random start" if rest else ""
        _worker_print(f"[train] domain prompt keys start at {what} (domain_key_init={config.domain_key_init}){kept}")


def setup_priors(
    model, config: TrainConfig, rank: int = 0, keep_domain_keys: bool = False
) -> dict[str, torch.Tensor] | None:
    """The domain priors of a worker before its first step: the text embeddings L_align and L_psel read (source_id ->
    (D,) tensor; None when L_align is off, the network has no domain pool or ``text_embeddings`` is null), with the
    domain pool's keys started from them as ``domain_key_init`` says, unless ``keep_domain_keys`` (keys loaded from
    ``init.weights``). The benchmarks set up their in-process networks the same way."""
    texts = None
    if config.loss.align and model.domain_pool is not None:
        if config.text_embeddings is None:
            if rank == 0:
                _worker_print("[train] text_embeddings=null: the alignment loss L_align is off")
        else:
            url = resolve_text_embeddings(config.text_embeddings, config.data.dataset)
            loaded = load_text_embeddings(url, config.data.s3, model.config.prompt_dim, centre=config.text_centering)
            texts = {source: torch.from_numpy(vector) for source, vector in loaded.items()}
            if rank == 0:
                _worker_print(f"[train] L_align on: text embeddings of {len(texts)} source images from {url}")
            if keep_domain_keys:
                if rank == 0:
                    _worker_print(
                        "[train] domain prompt keys kept as loaded from init.weights (domain_key_init unused)"
                    )
            elif config.domain_key_init != "random":
                _start_domain_keys(model.domain_pool, loaded, config, url, rank)
    pool = model.domain_pool
    random_keys = not keep_domain_keys and (texts is None or config.domain_key_init == "random")
    if rank == 0 and pool is not None and pool.fixed_keys and random_keys:
        _worker_print(
            "[train] warning: the domain pool's keys are fixed (model.domain_pool.fixed_keys) and stay at "
            "their random start: set them from the descriptions (text embeddings with domain_key_init="
            "domains), or train them (model.domain_pool.fixed_keys=false)"
        )
    return texts


def train_loop_per_worker(loop_config: dict) -> None:
    """Runs on every Ray Train worker."""
    import ray.train
    import ray.train.torch

    config = TrainConfig.model_validate(loop_config["config"])
    if not config.verbose:
        from datprl.platform.runtime import quiet_ray_train_worker

        quiet_ray_train_worker()  # no "Reporting training result N: TrainingReport(...)" line per report
    tasks: list[str] = loop_config["tasks"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.manual_seed(config.seed + rank)
    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)
    device = ray.train.torch.get_device()

    # The checkpoint first: a resumed run takes its weights from it, never from init.weights again, and its
    # optimiser groups from what init loaded when the run began.
    checkpoint, resumed = ray.train.get_checkpoint(), None
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            resumed = torch.load(Path(folder) / "state.pt", map_location=device, weights_only=True)
    # On the worker's device, DDP when world > 1 (no find_unused_parameters: every trainable parameter takes part in
    # every step), compiled when compute.compile.
    built = build_training_state(
        config, device, world, wrap=ray.train.torch.prepare_model, resumed=resumed, tasks=tasks
    )
    model, net, params, criterion = built["model"], built["net"], built["params"], built["criterion"]
    optimizer, scheduler, scaler, ema = built["optimizer"], built["scheduler"], built["scaler"], built["ema"]
    init_loaded = built["init_loaded"]
    if rank == 0:
        _worker_print(describe_setup(config, len(tasks), world, device))
        if resumed is None and init_loaded is not None:
            _worker_print(f"[train] loaded {len(init_loaded)} entries of init.weights {config.init.weights}")
    # Domain keys loaded from init.weights are trained ones: domain_key_init must not overwrite them.
    keep_keys = init_loaded is not None and "domain_pool.prompt_keys" in init_loaded
    texts = setup_priors(model, config, rank, keep_domain_keys=keep_keys)

    step, passes = 0, 0
    if resumed is not None:
        state = resumed
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if ema is not None and state.get("ema") is not None:
            ema.load_state_dict(state["ema"])
        if scaler is not None and state.get("scaler") is not None:
            scaler.load_state_dict(state["scaler"])
        if criterion.input_error is not None and state.get("input_error") is not None:
            criterion.input_error.load_state_dict(state["input_error"])
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
        for batch in training_batches(
            shard,
            tasks,
            config.data.per_task_batch,
            config.data.shuffle_buffer,
            report,
            num_batches=steps_per_pass,
            batcher=batcher,
        ):
            terms = train_step(
                net, model, batch, criterion, optimizer, scheduler, params, config, device, texts, scaler
            )
            if ema is not None:
                ema.update_parameters(model)
            step += 1
            if crash_at is not None and rank == 0:
                crash_at(step)
            window.append(terms)
            last = step >= config.steps
            validate = bool(
                config.validate_every and config.evaluate_split and (step % config.validate_every == 0 or last)
            )
            if step % config.log_every == 0 or step % config.checkpoint_every == 0 or validate or last:
                batch_size = batch["lq"].shape[0]
                means = {k: sum(t[k] for t in window) / len(window) for k in window[-1]}
                metrics = {
                    "step": step,
                    "resumed_from_step": start_step,
                    "loss": means["total"],
                    "lr": scheduler.get_last_lr()[0],
                    **({"lr_loaded": scheduler.get_last_lr()[1]} if config.init.loaded_lr is not None else {}),
                    "passes": passes,
                    "samples_per_s": len(window) * batch_size * world / (time.perf_counter() - started),
                    "corrupt_samples": len(report.corrupt),
                    **{f"loss_{k}": v for k, v in means.items()},
                }
                if validate:
                    metrics.update(_validate(model, ema, config, loop_config["held_out"], device, rank))
                window, started = [], time.perf_counter()
                if step % config.checkpoint_every == 0 or last:
                    _report_with_checkpoint(
                        metrics,
                        model,
                        optimizer,
                        scheduler,
                        ema,
                        scaler,
                        step,
                        passes,
                        config,
                        rank,
                        loop_config.get("manifest_sha256"),
                        criterion,
                        init_loaded,
                        loop_config.get("init"),
                    )
                else:
                    ray.train.report(metrics)
                # No step line here: the driver shows every report (progress bar, or step lines with verbose=true).
            if last:
                break
        passes += 1


def train_step(
    net, model, batch, criterion, optimizer, scheduler, params, config: TrainConfig, device, texts, scaler=None
) -> dict[str, float]:
    """One optimisation step on one worker's part of the batch; returns the loss terms (detached floats).

    ``net`` is the (possibly DDP-wrapped) module that runs forward/backward, ``model`` the bare network (pools,
    temperatures); ``batch`` holds ``lq``/``gt`` tensors (B, 3, H, W), ``task`` (B names; the per-task divisors of
    ``loss.input_relative="task"`` need it) and, when ``texts`` is given, ``source_id``.
    The forward runs under ``config.compute``'s autocast (bf16 on GPU by default), the losses in fp32; backward (DDP
    averages the gradients across workers here), optional gradient clipping, optimiser and scheduler step,
    temperature projection. ``scaler`` (fp16 only, :func:`~datprl.platform.compute.grad_scaler`) scales the loss
    and unscales the gradients before clipping; a step it skips for inf/NaN gradients still advances the schedule.
    """
    channels_last = config.compute.channels_last
    lq = to_memory_format(batch["lq"].to(device, non_blocking=True), channels_last)
    gt = batch["gt"].to(device, non_blocking=True)
    text, mask = _text_batch(texts, batch["source_id"], device) if texts is not None else (None, None)
    with autocast(config.compute.precision, device):
        output = net(lq, return_aux=True)
    loss, terms = criterion(
        output, gt, model=net, text_embedding=text, text_mask=mask, degraded=lq, tasks=batch.get("task")
    )
    optimizer.zero_grad(set_to_none=True)
    (loss if scaler is None else scaler.scale(loss)).backward()
    if config.optim.grad_clip:
        if scaler is not None:
            scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
        torch.nn.utils.clip_grad_norm_(params, config.optim.grad_clip)
    if scaler is None:
        optimizer.step()
    else:
        scaler.step(optimizer)  # skipped when the gradients hold inf/NaN
        scaler.update()
    scheduler.step()
    _clamp_temperatures(model)
    return terms


def _validate(model, ema, config: TrainConfig, held_out: list[str], device, rank: int) -> dict[str, float]:
    """Periodic validation on rank 0 (the weights are the same on every worker): PSNR per task of the EMA weights when
    EMA is on, read in this process (a Ray Data read would compete with the training read for the worker's CPUs).
    ``evaluate_split`` gives the ``val_*`` keys; with ``validate_cross_source`` the ``cross_source_split`` gives the
    same keys prefixed ``cross_`` (see :func:`_validation_metrics`)."""
    if rank != 0:
        return {}
    from datprl.platform.evaluation.evaluate import evaluate

    net = ema.module if ema is not None else model
    data = config.data.model_copy(update={"eval_crop": config.validation_crop})
    splits = {config.evaluate_split: "val"}
    cross = config.cross_source_split
    if config.validate_cross_source and cross and cross != config.evaluate_split:
        splits[cross] = "cross"
    metrics: dict[str, float] = {}
    for split, prefix in splits.items():
        result = evaluate(
            net, data, split=split, max_grids_per_task=0, device=device, zero_shot_tasks=held_out, read_in_process=True
        )
        metrics.update(_validation_metrics(result, prefix))
    return metrics  # printed by the driver, which shows every report (datprl.platform.train.progress)


def _validation_metrics(result, prefix: str) -> dict[str, float]:
    """One split's validation numbers as report keys: ``<prefix>_psnr`` (output) and ``<prefix>_input_psnr`` (the
    degraded input), each the mean over tasks of the per-task means; ``<prefix>_delta_psnr``, their difference (the mean
    PSNR gain over tasks); ``<prefix>_delta_psnr/<task>`` per task."""
    metrics = {
        f"{prefix}_psnr": result.mean["output_psnr"],
        f"{prefix}_input_psnr": result.mean["input_psnr"],
        f"{prefix}_delta_psnr": result.mean["delta_psnr"],
    }
    for row in result.rows:
        metrics[f"{prefix}_delta_psnr/{row['task']}"] = row["delta_psnr"]
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


def _clamp_temperatures(model: torch.nn.Module) -> None:
    # The forward pass clamps the learnable temperature tau to [min, max] ([0.1, 2] in the paper, arXiv 2603.01725,
    # Sec. 3), which gives the raw parameter zero gradient once it leaves the range: project it back after each step
    # so it can always move again.
    with torch.no_grad():
        for pool in (model.task_pool, model.domain_pool):
            if pool is not None:
                pool.temperature.clamp_(*pool.temperature_range)


def _report_with_checkpoint(
    metrics,
    model,
    optimizer,
    scheduler,
    ema,
    scaler,
    step,
    passes,
    config,
    rank,
    manifest_sha256: str | None = None,
    criterion=None,
    init_loaded: list[str] | None = None,
    init_record: dict | None = None,
) -> None:
    import ray.train

    with tempfile.TemporaryDirectory() as folder:
        checkpoint = None
        if rank == 0:  # one copy of the replicated state; every worker still reports
            state = {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "ema": ema.state_dict() if ema is not None else None,
                "scaler": scaler.state_dict() if scaler is not None else None,
                "input_error": criterion.input_error.state_dict()
                if criterion is not None and criterion.input_error is not None
                else None,
                "step": step,
                "passes": passes,
                "init_loaded": init_loaded,  # the optimiser groups of init.loaded_lr, rebuilt on resume
            }
            torch.save(state, Path(folder) / "state.pt")
            # config.json and progress.json let the driver check a run before resuming it (datprl.platform.train.runs)
            (Path(folder) / CONFIG_FILE).write_text(json.dumps(config_to_dict(config), indent=1))
            progress = {"step": step, "steps": config.steps, "dataset_manifest_sha256": manifest_sha256}
            if init_record is not None:  # the weights the run started from, for the export's provenance after a resume
                progress["init"] = init_record
            (Path(folder) / PROGRESS_FILE).write_text(json.dumps(progress))
            weights = ema.module if ema is not None else model
            save_model(weights, Path(folder) / "model")
            checkpoint = ray.train.Checkpoint.from_directory(folder)
        ray.train.report(metrics, checkpoint=checkpoint)
