"""Training-step throughput of model variants: what the prompt machinery of ``paper`` costs over the plain
``restormer`` backbone.

One timed step is forward + L1 loss + backward in train mode, on the same fixed input for every variant, with the
gradients dropped after each step (no optimizer). Warm-up steps are not timed. The variants' timed steps are
interleaved (A B A B ...) so that load changes on a busy machine hit all of them alike, and the median step time per
variant is reported. Launch with ``python jobs/benchmark_model.py [key=value ...]`` (``--help`` lists the fields).
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator

from datprl.models import count_parameters, create_model
from datprl.platform.bench.common import known_variants, save_report
from datprl.platform.compute import autocast
from datprl.platform.runtime import resolve_device
from datprl.platform.config import NoRepeats, StrictModel, config_to_dict, parse_cli

__all__ = [
    "ModelBenchmarkConfig",
    "Mode",
    "PEAK_TFLOPS",
    "run_step",
    "timed_step",
    "count_flops",
    "peak_tflops",
    "run_benchmark",
    "format_report",
    "main",
]

Mode = Literal["train", "inference"]


class ModelBenchmarkConfig(StrictModel):
    """Forward+backward throughput of model variants (images/s), interleaved rounds, median per variant."""

    variants: Annotated[list[str], NoRepeats] = Field(
        ["paper", "restormer"],
        min_length=1,
        description="variants to time; ratios are of the first against each other one",
    )
    batch: int = Field(2, ge=1, description="images per step")
    size: int = Field(64, ge=1, description="input height and width")
    warmup: int = Field(2, ge=0, description="untimed steps per variant and dtype")
    rounds: int = Field(5, ge=1, description="timed steps per variant and dtype, interleaved across variants")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda if available, else cpu")
    dtypes: Annotated[list[Literal["fp32", "bf16"]], NoRepeats] = Field(
        ["fp32"], min_length=1, description="bf16: torch.autocast around forward and loss"
    )
    threads: int | None = Field(None, ge=1, description="torch.set_num_threads; unset keeps torch's default")
    json_out: Path | None = Field(None, description="also write the results as JSON here")
    seed: int = Field(0, description="seed for the weights and the input")

    @field_validator("variants")
    @classmethod
    def _known_variants(cls, value: list[str]) -> list[str]:
        return known_variants(value)


def run_step(
    model: torch.nn.Module, image: torch.Tensor, target: torch.Tensor, dtype: str, mode: Mode = "train"
) -> None:
    """One untimed step: ``train``: forward + L1 loss + backward, gradients dropped afterwards (no optimizer);
    ``inference``: a forward under ``torch.inference_mode``. ``dtype``: the autocast precision of
    :func:`datprl.platform.compute.autocast` (fp32: none). The model's train/eval mode is the caller's."""
    if mode == "inference":
        with torch.inference_mode(), autocast(dtype, image.device):
            model(image)
        return
    with autocast(dtype, image.device):
        loss = F.l1_loss(model(image).float(), target)
    loss.backward()
    model.zero_grad(set_to_none=True)


def timed_step(
    model: torch.nn.Module, image: torch.Tensor, target: torch.Tensor, dtype: str, mode: Mode = "train"
) -> float:
    """:func:`run_step`, timed: the wall time in seconds, with the device synchronised before and after on CUDA
    (kernels are asynchronous: without it the time would be the launch time)."""
    cuda = image.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(image.device)
    start = time.perf_counter()
    run_step(model, image, target, dtype, mode)
    if cuda:
        torch.cuda.synchronize(image.device)
    return time.perf_counter() - start


def _conv_backward_flops(
    grad_out_shape,
    x_shape,
    w_shape,
    _bias,
    _stride,
    _padding,
    _dilation,
    transposed,
    _output_padding,
    _groups,
    output_mask,
    out_shape=None,
    **kwargs,
) -> int:
    # torch.utils.flop_counter (up to torch 2.13 at least) drops the group count from the backward of a grouped
    # convolution: it counts a depthwise 16-channel 3x3 conv's backward as 17x its forward instead of 2x, and this
    # network's depthwise convolutions then make its counted backward 18x its forward. Each gradient (input, weight)
    # of a convolution costs as many multiply-adds as its forward, whose count the weight's shape (out, in/groups,
    # k...) gives directly: batch x prod(weight shape) x the spatial size the kernel slides over (the output's for a
    # conv, the input's for a transposed conv).
    spatial = (x_shape if transposed else grad_out_shape)[2:]
    forward = 2 * grad_out_shape[0] * math.prod(w_shape) * math.prod(spatial)
    return forward * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


def count_flops(model: torch.nn.Module, image: torch.Tensor, target: torch.Tensor, mode: Mode = "train") -> int:
    """FLOPs of one :func:`run_step` in fp32, counted op by op on a real step by
    ``torch.utils.flop_counter.FlopCounterMode`` (matrix products and convolutions, the network's compute; a
    multiply-add is 2 FLOPs), with the backward of convolutions counted by :func:`_conv_backward_flops` (torch's own
    formula overcounts grouped convolutions). The count depends on the shapes only, not on the dtype."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False, custom_mapping={torch.ops.aten.convolution_backward: _conv_backward_flops})
    with counter:
        run_step(model, image, target, "fp32", mode)
    return int(counter.get_total_flops())


#: Dense peak tensor-core throughput (TFLOP/s) by GPU, from NVIDIA's data sheets (their "with sparsity" figures
#: halved); the first entry whose key is in ``torch.cuda.get_device_name()`` applies (more specific names first).
#: ``tf32`` is what fp32 convolutions reach with ``torch.backends.cudnn.allow_tf32`` (PyTorch's default), ``fp32``
#: the plain CUDA cores' rate.
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H200 NVL": {"bf16": 835.5, "tf32": 417.5, "fp32": 60.0},
    "H200": {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "H100 NVL": {"bf16": 835.5, "tf32": 417.5, "fp32": 60.0},
    "H100 PCIe": {"bf16": 756.5, "tf32": 378.0, "fp32": 51.2},
    "H100": {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9},  # SXM ("NVIDIA H100 80GB HBM3")
    "A100": {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5},
}


def peak_tflops(device_name: str, dtype: str, override: float | None = None) -> tuple[float | None, str]:
    """(peak TFLOP/s, what it is) that MFU divides by for ``dtype`` on ``device_name``: ``override`` when given, else
    :data:`PEAK_TFLOPS` (bf16 and fp16: dense bf16; fp32: dense tf32 when cuDNN may use TF32 for fp32 convolutions, the
    network's bulk, else plain fp32); (None, why) for a device not in the table."""
    if override is not None:
        return override, f"{override} TFLOP/s set in the config"
    for key, peaks in PEAK_TFLOPS.items():
        if key in device_name:
            if dtype in ("bf16", "fp16"):  # the same dense tensor-core rate on these GPUs
                basis = "bf16"
            else:
                basis = "tf32" if torch.backends.cudnn.allow_tf32 else "fp32"
            return peaks[basis], f"{key} dense {basis} {peaks[basis]} TFLOP/s"
    return None, f"no peak known for {device_name!r}: set it in the config"


def run_benchmark(config: ModelBenchmarkConfig) -> dict[str, Any]:
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
                run_step(model, image, target, dtype)
        times: dict[str, list[float]] = {name: [] for name in models}
        peaks: dict[str, int] = dict.fromkeys(models, 0)
        for _ in range(config.rounds):
            for name, model in models.items():
                if cuda:
                    torch.cuda.reset_peak_memory_stats(device)
                    resident = torch.cuda.memory_allocated(device)
                times[name].append(timed_step(model, image, target, dtype))
                if cuda:
                    peaks[name] = max(peaks[name], torch.cuda.max_memory_allocated(device) - resident)
        rows = {}
        for name, model in models.items():
            median = statistics.median(times[name])
            rows[name] = row = dict(
                variant=name,
                params=count_parameters(model),
                batch=config.batch,
                size=config.size,
                device=device.type,
                dtype=dtype,
                img_per_s=config.batch / median,
                ms_per_iter=median * 1e3,
                step_ms=[t * 1e3 for t in times[name]],
            )
            if cuda:
                own = sum(p.numel() * p.element_size() for p in model.parameters())
                row["peak_mem_mib"] = (own + peaks[name]) / 2**20
            results.append(row)
        first, *others = config.variants
        if others:
            ratios[dtype] = {f"{first}/{o}": rows[first]["img_per_s"] / rows[o]["img_per_s"] for o in others}

    return dict(
        config=config_to_dict(config),
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        device_name=torch.cuda.get_device_name(device) if cuda else "cpu",
        results=results,
        ratios=ratios,
    )


def format_report(report: dict[str, Any]) -> str:
    """The Markdown table of :func:`run_benchmark`'s results followed by one ratio line per variant pair and dtype
    (``paper/restormer throughput ratio: X.XX``; with several dtypes the dtype is appended in parentheses)."""
    cuda = any("peak_mem_mib" in r for r in report["results"])
    head = ["model", "params", "batch", "size", "device", "dtype", "img/s median", "ms/iter"] + (
        ["peak MiB"] if cuda else []
    )
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in report["results"]:
        cells = [
            r["variant"],
            f"{r['params']:,}",
            r["batch"],
            r["size"],
            r["device"],
            r["dtype"],
            f"{r['img_per_s']:.2f}",
            f"{r['ms_per_iter']:.1f}",
        ] + ([f"{r['peak_mem_mib']:.0f}"] if cuda else [])
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    lines.append("")
    several = len(report["ratios"]) > 1
    for dtype, pairs in report["ratios"].items():
        for pair, ratio in pairs.items():
            lines.append(f"{pair} throughput ratio: {ratio:.2f}" + (f" ({dtype})" if several else ""))
    return "\n".join(lines)


def main(argv: Sequence[str]) -> int:
    """Entry point of ``jobs/benchmark_model.py``: parse ``key=value`` options, run, print, optionally save JSON."""
    config = parse_cli(ModelBenchmarkConfig, argv, prog="benchmark_model.py")
    try:
        resolve_device(config.device)  # fail with a message, not a traceback, when CUDA is asked for but absent
    except RuntimeError as err:
        print(f"benchmark_model.py: error: {err}", file=sys.stderr)
        return 2
    report = run_benchmark(config)
    print(
        f"torch {report['torch']}, {report['threads']} threads, device {report['device_name']}, "
        f"warmup {config.warmup}, {config.rounds} interleaved rounds, train mode, L1 forward+backward"
    )
    print(format_report(report))
    save_report(report, config.json_out)
    return 0
