"""What each compute option (``TrainConfig.compute``: precision, channels-last, Adam implementation, torch.compile)
does to the real training step, against the default, in one run: the measurement behind the defaults.

Every arm is the same fresh network, seed and batch (the main job's setting: ``paper_tiny``, one crop per task),
stepped through :func:`~datprl.platform.train.loop.train_step` with the optimiser :func:`build_optimizer` makes. Arms
are warmed up (a compiled arm's warm-up holds its compilation, reported apart), then timed in interleaved rounds
(A B C A B C ...) so that load changes on a busy machine hit every arm alike; the median step time per arm and its
ratio against the first arm (the default) are reported. Launch with ``python jobs/benchmark_compute.py``.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, field_validator

from datprl.platform.bench.common import known_variants, save_report
from datprl.platform.bench.train import state_step, training_state
from datprl.platform.compute import ComputeConfig, resolve_adam_impl, resolve_precision
from datprl.platform.config import StrictModel, config_to_dict, parse_cli
from datprl.platform.data.degradations import TASKS
from datprl.platform.runtime import resolve_device
from datprl.platform.train.config import TrainConfig

__all__ = ["ComputeBenchmarkConfig", "DEFAULT_ARMS", "run_benchmark", "format_report", "main"]

#: The arms of the default run: the default first (the baseline of every ratio), then one change each.
DEFAULT_ARMS: dict[str, ComputeConfig] = {
    "default": ComputeConfig(),
    "adam fused": ComputeConfig(adam_impl="fused"),
    "adam for_loop": ComputeConfig(adam_impl="for_loop"),
    "channels_last": ComputeConfig(channels_last=True),
    "bf16": ComputeConfig(precision="bf16"),
}


class ComputeBenchmarkConfig(StrictModel):
    """Training-step time under each compute option against the default (interleaved rounds, median per arm)."""

    arms: dict[str, ComputeConfig] = Field(
        DEFAULT_ARMS,
        min_length=1,
        description="name -> compute section; the first is the baseline of the ratios "
        "(e.g. arms.compile.compile=true adds torch.compile: minutes of compilation on a CPU)",
    )
    variant: str = Field("paper_tiny", description="network (datprl.models.VARIANTS)")
    batch: int = Field(9, ge=1, description="images per step (the main job: one crop of each of 9 tasks)")
    size: int = Field(48, ge=8, description="crop edge in pixels (the main job's 48)")
    warmup: int = Field(3, ge=1, description="untimed steps per arm (a compiled arm compiles here)")
    rounds: int = Field(8, ge=1, description="timed rounds; each times `steps` steps of every arm in turn")
    steps: int = Field(3, ge=1, description="steps per arm and round")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda if available, else cpu")
    threads: int | None = Field(2, ge=1, description="torch.set_num_threads (the main job's 2); None = torch's")
    json_out: Path | None = Field(None, description="also write the results as JSON here")
    seed: int = 0

    @field_validator("variant")
    @classmethod
    def _known_variant(cls, value: str) -> str:
        return known_variants([value])[0]


def run_benchmark(config: ComputeBenchmarkConfig) -> dict[str, Any]:
    """Time every arm of ``config`` and return a JSON-ready dict (``rows``: one per arm, baseline first)."""
    device = resolve_device(config.device)
    if config.threads:
        torch.set_num_threads(config.threads)
    generator = torch.Generator().manual_seed(config.seed)
    shape = (config.batch, 3, config.size, config.size)
    lq = torch.rand(shape, generator=generator)
    # one crop of each task in turn, named as the data pipeline names them: the default loss divides by each task's
    # mean input error (loss.input_relative=task), so the batch carries its task names as real batches do
    tasks = [list(TASKS)[i % len(TASKS)] for i in range(config.batch)]
    batch = {"lq": lq, "gt": (lq + 0.1 * torch.rand(shape, generator=generator)).clamp(0, 1), "task": tasks}
    cuda = device.type == "cuda"
    arms: dict[str, dict[str, Any]] = {}
    for name, compute in config.arms.items():
        # The main job's optimiser without its EMA copy, which would only add the same work to every arm.
        train = TrainConfig(
            compute=compute,
            text_embeddings=None,
            model={"variant": config.variant},
            optim=TrainConfig().optim.model_copy(update={"ema_decay": None}),
            seed=config.seed,
        )
        state = training_state(train, device)

        def step(state=state, train=train) -> float:
            return state_step(state, batch, train, device)["total"]

        start = time.perf_counter()
        for _ in range(config.warmup):
            step()
        if cuda:
            torch.cuda.synchronize(device)
        arms[name] = {"step": step, "warmup_s": time.perf_counter() - start, "times": [], "compute": compute}
    for _ in range(config.rounds):
        for arm in arms.values():
            start = time.perf_counter()
            for _ in range(config.steps):
                loss = arm["step"]()
            if cuda:
                torch.cuda.synchronize(device)
            arm["times"].append((time.perf_counter() - start) / config.steps)
            arm["loss"] = loss
    baseline = statistics.median(next(iter(arms.values()))["times"])
    rows = []
    for name, arm in arms.items():
        median = statistics.median(arm["times"])
        compute: ComputeConfig = arm["compute"]
        rows.append(
            {
                "arm": name,
                "precision": resolve_precision(compute.precision, device),
                "adam": resolve_adam_impl(compute.adam_impl, device),
                "channels_last": compute.channels_last,
                "compile": compute.compile,
                "median_ms": 1000 * median,
                "min_ms": 1000 * min(arm["times"]),
                "max_ms": 1000 * max(arm["times"]),
                "warmup_s": arm["warmup_s"],
                "speedup_vs_baseline": baseline / median,
                "last_loss": arm["loss"],
            }
        )
    return {"config": config_to_dict(config), "device": str(device), "threads": torch.get_num_threads(), "rows": rows}


def format_report(report: dict[str, Any]) -> str:
    """The results as a markdown table, baseline first."""
    lines = [
        f"{report['config']['variant']}, batch {report['config']['batch']} x {report['config']['size']} px, "
        f"{report['device']}, {report['threads']} threads; {report['config']['rounds']} interleaved rounds",
        "",
        "| arm | precision | Adam | channels_last | compile | median ms/step | min-max | warm-up s | "
        "speed-up vs first |",
        "| --- | --- | --- | --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for row in report["rows"]:
        lines.append(
            f"| {row['arm']} | {row['precision']} | {row['adam']} | {row['channels_last']} | "
            f"{row['compile']} | {row['median_ms']:.1f} | {row['min_ms']:.0f}-{row['max_ms']:.0f} | "
            f"{row['warmup_s']:.1f} | {row['speedup_vs_baseline']:.2f}x |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_cli(ComputeBenchmarkConfig, sys.argv[1:] if argv is None else argv, prog="benchmark_compute.py")
    report = run_benchmark(config)
    print(format_report(report))
    save_report(report, config.json_out)
    return 0
