"""Training-step throughput of model variants: what the prompt machinery of ``paper`` costs over the plain
``restormer`` backbone.

One timed step is forward + L1 loss + backward in train mode, on the same fixed input for every variant, with the
gradients dropped after each step (no optimizer). Warm-up steps are not timed. The variants' timed steps are
interleaved (A B A B ...) so that load changes on a busy machine hit all of them alike, and the median step time per
variant is reported. Launch with ``python jobs/benchmark_model.py [key=value ...]`` (``--help`` lists the fields).
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator

from datprl.models import VARIANTS, count_parameters, create_model
from datprl.platform.bench.common import save_report
from datprl.platform.runtime import resolve_device
from datprl.platform.config import NoRepeats, StrictModel, config_to_dict, parse_cli

__all__ = ["BenchmarkConfig", "run_benchmark", "format_report", "main"]

_DTYPES = {"fp32": None, "bf16": torch.bfloat16}  # None: no autocast


class BenchmarkConfig(StrictModel):
    """Forward+backward throughput of model variants (images/s), interleaved rounds, median per variant."""

    variants: Annotated[list[str], NoRepeats] = Field(
        ["paper", "restormer"], min_length=1, description="variants to time; ratios are of the first against each "
        "other one")
    batch: int = Field(2, ge=1, description="images per step")
    size: int = Field(64, ge=1, description="input height and width")
    warmup: int = Field(2, ge=0, description="untimed steps per variant and dtype")
    rounds: int = Field(5, ge=1, description="timed steps per variant and dtype, interleaved across variants")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda if available, else cpu")
    dtypes: Annotated[list[Literal["fp32", "bf16"]], NoRepeats] = Field(
        ["fp32"], min_length=1, description="bf16: torch.autocast around forward and loss")
    threads: int | None = Field(None, ge=1, description="torch.set_num_threads; unset keeps torch's default")
    json_out: Path | None = Field(None, description="also write the results as JSON here")
    seed: int = Field(0, description="seed for the weights and the input")

    @field_validator("variants")
    @classmethod
    def _known_variants(cls, value: list[str]) -> list[str]:
        unknown = [v for v in value if v not in VARIANTS]
        if unknown:
            raise ValueError(f"unknown variants {unknown}; choose from: {', '.join(VARIANTS)}")
        return value


def _step(model: torch.nn.Module, image: torch.Tensor, target: torch.Tensor, dtype: str) -> float:
    """One forward + L1 loss + backward; gradients are dropped afterwards. Returns the wall time in seconds."""
    device = image.device
    cuda = device.type == "cuda"
    autocast = (torch.autocast(device.type, dtype=_DTYPES[dtype]) if _DTYPES[dtype] is not None else nullcontext())
    if cuda:
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    with autocast:
        loss = F.l1_loss(model(image).float(), target)
    loss.backward()
    if cuda:
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    return elapsed


def run_benchmark(config: BenchmarkConfig) -> dict[str, Any]:
    """Time every variant x dtype of ``config`` and return a JSON-ready dict.

    ``results`` has one row per (dtype, variant): ``variant, params, batch, size, device, dtype, img_per_s`` (median
    over rounds), ``ms_per_iter`` (median step time), ``step_ms`` (every timed step) and, on CUDA, ``peak_mem_mib``:
    the variant's own parameters plus the largest allocation above what was resident when one of its steps began
    (activations, gradients, workspaces), so the other variants held in memory are not counted. ``ratios`` maps
    dtype -> ``"first/other"`` -> throughput ratio of the first variant to each other one.
    """
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    device = resolve_device(config.device)
    cuda = device.type == "cuda"

    models = {}
    for name in config.variants:
        torch.manual_seed(config.seed)
        models[name] = create_model(name).to(device).train()
    generator = torch.Generator().manual_seed(config.seed)
    shape = (config.batch, 3, config.size, config.size)
    image = torch.rand(shape, generator=generator).to(device)
    target = torch.rand(shape, generator=generator).to(device)

    results, ratios = [], {}
    for dtype in config.dtypes:
        for model in models.values():
            for _ in range(config.warmup):
                _step(model, image, target, dtype)
        times: dict[str, list[float]] = {name: [] for name in models}
        peaks: dict[str, int] = dict.fromkeys(models, 0)
        for _ in range(config.rounds):
            for name, model in models.items():
                if cuda:
                    torch.cuda.reset_peak_memory_stats(device)
                    resident = torch.cuda.memory_allocated(device)
                times[name].append(_step(model, image, target, dtype))
                if cuda:
                    peaks[name] = max(peaks[name], torch.cuda.max_memory_allocated(device) - resident)
        rows = {}
        for name, model in models.items():
            median = statistics.median(times[name])
            rows[name] = row = dict(
                variant=name, params=count_parameters(model), batch=config.batch, size=config.size,
                device=device.type, dtype=dtype, img_per_s=config.batch / median, ms_per_iter=median * 1e3,
                step_ms=[t * 1e3 for t in times[name]])
            if cuda:
                own = sum(p.numel() * p.element_size() for p in model.parameters())
                row["peak_mem_mib"] = (own + peaks[name]) / 2**20
            results.append(row)
        first, *others = config.variants
        if others:
            ratios[dtype] = {f"{first}/{o}": rows[first]["img_per_s"] / rows[o]["img_per_s"] for o in others}

    return dict(config=config_to_dict(config), torch=torch.__version__, threads=torch.get_num_threads(),
                device_name=torch.cuda.get_device_name(device) if cuda else "cpu", results=results, ratios=ratios)


def format_report(report: dict[str, Any]) -> str:
    """The Markdown table of :func:`run_benchmark`'s results followed by one ratio line per variant pair and dtype
    (``paper/restormer throughput ratio: X.XX``; with several dtypes the dtype is appended in parentheses)."""
    cuda = any("peak_mem_mib" in r for r in report["results"])
    head = ["model", "params", "batch", "size", "device", "dtype", "img/s median", "ms/iter"] + (
        ["peak MiB"] if cuda else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in report["results"]:
        cells = [r["variant"], f"{r['params']:,}", r["batch"], r["size"], r["device"], r["dtype"],
                 f"{r['img_per_s']:.2f}", f"{r['ms_per_iter']:.1f}"] + ([f"{r['peak_mem_mib']:.0f}"] if cuda else [])
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    lines.append("")
    several = len(report["ratios"]) > 1
    for dtype, pairs in report["ratios"].items():
        for pair, ratio in pairs.items():
            lines.append(f"{pair} throughput ratio: {ratio:.2f}" + (f" ({dtype})" if several else ""))
    return "\n".join(lines)


def main(argv: Sequence[str]) -> int:
    """Entry point of ``jobs/benchmark_model.py``: parse ``key=value`` options, run, print, optionally save JSON."""
    config = parse_cli(BenchmarkConfig, argv, prog="benchmark_model.py")
    try:
        resolve_device(config.device)  # fail with a message, not a traceback, when CUDA is asked for but absent
    except RuntimeError as err:
        print(f"benchmark_model.py: error: {err}", file=sys.stderr)
        return 2
    report = run_benchmark(config)
    print(f"torch {report['torch']}, {report['threads']} threads, device {report['device_name']}, "
          f"warmup {config.warmup}, {config.rounds} interleaved rounds, train mode, L1 forward+backward")
    print(format_report(report))
    save_report(report, config.json_out)
    return 0
