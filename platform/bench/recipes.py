"""Training samples/s of today's main-job recipe against the first release's, and what each part of the recipe costs.

Every arm is the main job's :class:`~datprl.platform.train.config.TrainConfig` (``python jobs/train.py`` with no
arguments) with ``key=value`` overrides (``arms``): ``today`` has none; ``first_release`` is the recipe of the first
training job (issue 4; ``git show c2237ec``, the config until ``1a37089``) expressed on today's code; the others
switch one part of today's recipe off, so that ``today`` against each of them says what that part costs per step:

* ``first_release``: ``paper_tiny`` as it was then (domain pool of 6 prompts with trained keys, neither query
  centred, the domain query from the shallow features), plain L1 + 0.1 FFT (``loss.input_relative=none``), no
  priors (``text_embeddings=null``: no L_align, no L_psel, random keys), periodic validation on full images (there
  was no ``validation_crop``) and Ray's thread default (``torch_threads=null``: ``cpus_per_worker`` = 1 thread).
  Crops (48 px), batch (one crop per task), steps, lr, EMA, validation every 250 steps are the same as today's.
  What cannot be expressed as overrides: the code of then (the network, loss and data pipeline as they were, e.g.
  the training split decoded every pass before the decoded cache, Ray and torch of then).
* ``first_release_2_threads``: the same with today's 2 torch threads, so that the thread setting is not mistaken for
  the recipe.
* ``no_task_division``: ``loss.input_relative=none`` (the per-task division by each task's input error).
* ``no_priors``: ``text_embeddings=null`` (no text embeddings: no L_align, no L_psel; the fixed keys stay random).
* ``no_validation``: ``validate_every=null`` (no periodic validation; the final evaluation is not in any arm).
* ``trained_keys``: the domain keys trained from k-means centroids of the descriptions with a centred domain query
  (the recipe before the fixed keys, ``b8d7288``).

How (one process, no Ray: the Ray Train loop's own overhead is what ``jobs/benchmark_train.py`` measures):
each arm gets the worker's training state (:func:`~datprl.platform.train.loop.build_training_state`, seeded) and
priors (:func:`~datprl.platform.train.loop.setup_priors`), and every arm trains on the same batches, read once
before any timing in this process as a Ray Train worker assembles them (``bare_batches`` of the train benchmark).
Steps run as :func:`~datprl.platform.train.loop.train_step` plus the EMA update, with the arm's torch threads
(``torch_threads``, or ``cpus_per_worker`` for null as Ray sets it). Arms take turns of ``window`` steps (the order
rotates every turn), so machine load hits every arm alike; each turn is a timing window (wall and this process's
CPU time). Periodic validation is timed the same way, ``validations`` calls per arm that validates (interleaved),
each the worker's own (:func:`~datprl.platform.train.loop._validate`: rank 0, EMA weights, read in this process), and
its cost is spread over the steps between two validations: ``ms/step = median window ms/step + median validation
ms / validate_every``. Then ``samples/s = batch / ms/step`` and ``ratio = arm samples/s / baseline samples/s``.

Launch with ``python jobs/benchmark_recipes.py [key=value ...]``.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from datprl.platform.bench.common import LocalDataset, ensure_dataset, save_report, set_omp_wait_policy, warn_if_busy
from datprl.platform.config import ConfigError, StrictModel, config_to_dict, load_config, parse_cli

__all__ = ["ARMS", "RecipeBenchmarkConfig", "arm_config", "format_report", "main", "run_benchmark"]

FIRST_RELEASE = [
    "model.domain_pool.size=6",
    "model.domain_pool.fixed_keys=false",
    "model.domain_pool.query_centering=false",
    "model.query_centering=false",
    "model.domain_query_features=shallow",
    "loss.input_relative=none",
    "loss.prior_selection=0",
    "text_embeddings=null",
    "domain_key_init=random",
    "validation_crop=null",
    "torch_threads=null",
]

#: The default arms: name -> TrainConfig overrides on the main job's defaults.
ARMS: dict[str, list[str]] = {
    "today": [],
    "first_release": FIRST_RELEASE,
    "first_release_2_threads": [*FIRST_RELEASE[:-1], "torch_threads=2"],
    "no_task_division": ["loss.input_relative=none"],
    "no_priors": ["text_embeddings=null"],
    "no_validation": ["validate_every=null"],
    "trained_keys": [
        "model.domain_pool.fixed_keys=false",
        "model.domain_pool.query_centering=true",
        "domain_key_init=descriptions",
    ],
}


class RecipeBenchmarkConfig(StrictModel):
    """Samples/s of training recipes (TrainConfig overrides) against a baseline recipe, interleaved in one process."""

    dataset: LocalDataset = Field(
        "data/default",
        description="local dataset folder with manifest.json; if the manifest is missing, the default corpus is "
        "built there first",
    )
    arms: dict[str, list[str]] = Field(
        default_factory=lambda: {k: list(v) for k, v in ARMS.items()},
        description="arm name -> TrainConfig key=value overrides on the main job's defaults (see the module doc)",
    )
    baseline: str = Field("first_release", description="the arm every ratio divides by")
    reference: str = Field("today", description="the arm whose per-step cost the one-part-off arms are compared with")
    steps: int = Field(40, ge=1, description="timed steps per arm (a multiple of window)")
    warmup_steps: int = Field(3, ge=0, description="untimed steps per arm before the timed ones")
    window: int = Field(5, ge=1, description="steps an arm takes per turn (one timing window)")
    validations: int = Field(2, ge=0, description="timed periodic validations per arm that validates; 0 = none")
    omp_wait_policy: Literal["PASSIVE", "ACTIVE"] | None = Field(
        "PASSIVE",
        description="OMP_WAIT_POLICY set before torch is first imported (see jobs/benchmark_train.py); null = "
        "libgomp's default",
    )
    seed: int = 0
    json_out: Path | None = Field(None, description="also write the results as JSON here")

    @model_validator(mode="after")
    def _consistent(self) -> RecipeBenchmarkConfig:
        if self.steps % self.window:
            raise ValueError(f"steps ({self.steps}) must be a multiple of window ({self.window})")
        for name in (self.baseline, self.reference):
            if name not in self.arms:
                raise ValueError(f"arm {name!r} is not among the arms {sorted(self.arms)}")
        # The arms' overrides are checked by run_benchmark (arm_config): TrainConfig imports torch, which must not
        # happen before omp_wait_policy is in the environment.
        return self


def arm_config(config: RecipeBenchmarkConfig, name: str, overrides: Sequence[str]):
    """The :class:`TrainConfig` of one arm: the main job's defaults on ``config.dataset`` with ``overrides``."""
    from datprl.platform.train.config import TrainConfig

    base = [f"data.dataset={config.dataset}", f"seed={config.seed}", f"name={name}"]
    try:
        return load_config(TrainConfig, overrides=[*base, *overrides])
    except ConfigError as err:
        raise ConfigError(f"arm {name!r}: {err}") from None


def _threads(train_config) -> int:
    # torch_threads=null: what Ray gives a worker (OMP_NUM_THREADS = its CPUs, at least 1)
    return train_config.torch_threads or max(1, int(train_config.cpus_per_worker))


class _Arm:
    """One arm's config, training state, priors and timings."""

    def __init__(self, name: str, train_config, batches: list[dict]) -> None:
        import torch

        from datprl.platform.bench.train import training_state
        from datprl.platform.train.loop import setup_priors

        self.name, self.config, self.batches = name, train_config, batches
        self.device = torch.device("cpu")
        self.threads = _threads(train_config)
        self.state = training_state(train_config, self.device)
        self.texts = setup_priors(self.state["model"], train_config)
        self.done = 0
        self.windows: list[tuple[int, float, float]] = []  # (steps, wall s, CPU s)
        self.validation_s: list[float] = []
        self.last_loss = float("nan")

    @property
    def validates(self) -> bool:
        return bool(self.config.validate_every and self.config.evaluate_split)

    def steps(self, count: int, timed: bool = True) -> None:
        import torch

        from datprl.platform.train.loop import train_step

        torch.set_num_threads(self.threads)
        state = self.state
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(count):
            batch = self.batches[self.done % len(self.batches)]
            terms = train_step(
                state["net"],
                state["model"],
                batch,
                state["criterion"],
                state["optimizer"],
                state["scheduler"],
                state["params"],
                self.config,
                self.device,
                self.texts,
                state["scaler"],
            )
            if state["ema"] is not None:
                state["ema"].update_parameters(state["model"])
            self.done += 1
            self.last_loss = terms["total"]
        if timed:
            self.windows.append((count, time.perf_counter() - wall, time.process_time() - cpu))

    def validate(self) -> dict[str, float]:
        import torch

        from datprl.platform.train.loop import _validate

        torch.set_num_threads(self.threads)
        start = time.perf_counter()
        metrics = _validate(self.state["model"], self.state["ema"], self.config, [], self.device, 0)
        self.validation_s.append(time.perf_counter() - start)
        return metrics

    def result(self) -> dict[str, Any]:
        per_step = [w / n for n, w, _ in self.windows]
        cpu_per_step = [c / n for n, _, c in self.windows]
        step_ms = 1000 * statistics.median(per_step)
        validation_ms = 1000 * statistics.median(self.validation_s) if self.validation_s else 0.0
        spread = validation_ms / self.config.validate_every if self.validates else 0.0
        batch = self.batches[0]["lq"].shape[0]
        total_ms = step_ms + spread
        return dict(
            arm=self.name,
            threads=self.threads,
            batch_size=batch,
            timed_steps=sum(n for n, _, _ in self.windows),
            step_ms=step_ms,
            step_ms_windows=[1000 * s for s in per_step],
            cpu_ms_per_step=1000 * statistics.median(cpu_per_step),
            validation_ms=validation_ms,
            validation_ms_runs=[1000 * s for s in self.validation_s],
            validate_every=self.config.validate_every if self.validates else None,
            validation_ms_per_step=spread,
            ms_per_step=total_ms,
            samples_per_s=1000 * batch / total_ms,
            last_loss=self.last_loss,
        )


def run_benchmark(config: RecipeBenchmarkConfig) -> dict[str, Any]:
    """Run every arm interleaved and return a JSON-ready dict: ``results`` (one row per arm, in ``arms`` order: see
    :meth:`_Arm.result`, plus ``ratio`` = its samples/s over the baseline's, and ``cost_ms_per_step`` = the reference
    arm's ms/step minus this arm's, what the part this arm switches off costs), ``batches`` (how the shared batches
    were read), the machine's load before and after."""
    policy = set_omp_wait_policy(config.omp_wait_policy)
    import torch

    from datprl.platform.bench.train import bare_batches
    from datprl.platform.train.priors import resolve_text_embeddings

    ensure_dataset(config.dataset, "jobs/benchmark_recipes.py")
    configs = {name: arm_config(config, name, overrides) for name, overrides in config.arms.items()}
    for name, train_config in configs.items():
        url = resolve_text_embeddings(train_config.text_embeddings, train_config.data.dataset)
        if train_config.loss.align and url is not None and not Path(url).exists():
            raise FileNotFoundError(
                f"arm {name!r}: no text embeddings at {url}; make them with python jobs/describe.py "
                f"dataset={config.dataset} (jobs/train.py does it on its first run), or give the arm "
                "text_embeddings=null"
            )
    load_before = os.getloadavg()
    start = time.perf_counter()
    data_keys = {name: c.data.model_dump_json() for name, c in configs.items()}
    batches: dict[str, list[dict]] = {}
    batch_info: dict[str, Any] = {}
    count = config.warmup_steps + config.steps
    for name, train_config in configs.items():
        key = data_keys[name]
        if key not in batches:
            batches[key], batch_info[key] = bare_batches(train_config.model_copy(update={"seed": config.seed}), count)
    read_s = time.perf_counter() - start
    arms = [_Arm(name, c, batches[data_keys[name]]) for name, c in configs.items()]
    for arm in arms:
        if config.warmup_steps:
            arm.steps(config.warmup_steps, timed=False)
    turns = config.steps // config.window
    for turn in range(turns):
        shift = turn % len(arms)
        for arm in arms[shift:] + arms[:shift]:
            arm.steps(config.window)
        print(f"turn {turn + 1}/{turns}", flush=True)
    validating = [a for a in arms if a.validates]
    for round_ in range(config.validations):
        shift = round_ % max(1, len(validating))
        for arm in validating[shift:] + validating[:shift]:
            arm.validate()
        print(f"validation round {round_ + 1}/{config.validations}", flush=True)

    rows = [arm.result() for arm in arms]
    by_name = {r["arm"]: r for r in rows}
    for row in rows:
        row["ratio"] = row["samples_per_s"] / by_name[config.baseline]["samples_per_s"]
        row["cost_ms_per_step"] = by_name[config.reference]["ms_per_step"] - row["ms_per_step"]
    return dict(
        config=config_to_dict(config),
        baseline=config.baseline,
        reference=config.reference,
        omp_wait_policy=policy,
        read_s=read_s,
        batches=list(batch_info.values()),
        cpu_count=os.cpu_count(),
        loadavg={"before": list(load_before), "after": list(os.getloadavg())},
        versions={"torch": torch.__version__},
        results=rows,
    )


def format_report(report: dict[str, Any]) -> str:
    """The Markdown table of :func:`run_benchmark` and one ratio line per arm, ``<arm>/<baseline> samples/s ratio:
    X.XX``."""
    head = [
        "arm",
        "threads",
        "step ms (median)",
        "step ms min-max",
        "CPU ms/step",
        "validation ms",
        "+ validation ms/step",
        "ms/step",
        "samples/s",
        f"ratio to {report['baseline']}",
        f"{report['reference']} minus arm, ms/step",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in report["results"]:
        windows = r["step_ms_windows"]
        runs = r["validation_ms_runs"]
        cells = [
            r["arm"],
            r["threads"],
            f"{r['step_ms']:.0f}",
            f"{min(windows):.0f}-{max(windows):.0f}",
            f"{r['cpu_ms_per_step']:.0f}",
            ", ".join(f"{x:.0f}" for x in runs) or "-",
            f"{r['validation_ms_per_step']:.1f}",
            f"{r['ms_per_step']:.0f}",
            f"{r['samples_per_s']:.2f}",
            f"{r['ratio']:.2f}",
            f"{r['cost_ms_per_step']:+.0f}",
        ]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    lines.append("")
    for r in report["results"]:
        if r["arm"] != report["baseline"]:
            lines.append(f"{r['arm']}/{report['baseline']} samples/s ratio: {r['ratio']:.2f}")
    return "\n".join(lines)


def main(argv: Sequence[str]) -> int:
    """Entry point of ``jobs/benchmark_recipes.py``: parse ``key=value`` options, run, print, optionally save JSON."""
    config = parse_cli(RecipeBenchmarkConfig, argv, prog="benchmark_recipes.py")
    start = time.perf_counter()
    report = run_benchmark(config)
    load = report["loadavg"]
    print(
        f"torch {report['versions']['torch']}; {len(config.arms)} arms, {config.warmup_steps} warm-up + "
        f"{config.steps} timed steps each in turns of {config.window}, {config.validations} timed validation(s) per "
        f"validating arm; OMP_WAIT_POLICY {report['omp_wait_policy']}; load average {load['before'][0]:.1f} -> "
        f"{load['after'][0]:.1f} on {report['cpu_count']} CPUs"
    )
    warn_if_busy(
        load,
        "every arm; the interleaving spreads it over them, but absolute times (and the thread arms) are unreliable",
    )
    print(format_report(report))
    print(f"total {time.perf_counter() - start:.1f} s (batches read in {report['read_s']:.1f} s)")
    save_report(report, config.json_out)
    sys.stdout.flush()
    return 0
