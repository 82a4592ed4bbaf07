"""How the network computes on its device: numeric precision (autocast, fp16 loss scaling), ``torch.compile``, the
channels-last memory format and the Adam implementation. One :class:`ComputeConfig` section serves training
(``TrainConfig.compute``), the benchmarks and the GPU check, so each option means the same everywhere.

Defaults: bf16 autocast on a CUDA device that supports it (``precision: auto``), fp32 on CPU; compile and
channels-last off and Adam fused on CUDA, foreach on CPU. The CPU ones were checked with ``jobs/benchmark_compute.py``
(docs/benchmarks.md); the CUDA ones are the framework's recommendations until ``infra/gpu-check.sh`` has measured
them on a GPU.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, Literal

import torch
from pydantic import Field

from datprl.platform.config import StrictModel

__all__ = [
    "ComputeConfig",
    "Precision",
    "resolve_precision",
    "autocast",
    "grad_scaler",
    "adam_options",
    "resolve_adam_impl",
    "prepare_module",
    "to_memory_format",
    "AUTOCAST_DTYPES",
]

Precision = Literal["fp32", "bf16", "fp16"]

#: The autocast dtype of each reduced precision (fp32: no autocast).
AUTOCAST_DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16}


class ComputeConfig(StrictModel):
    """Numerics and kernels of the forward/backward pass (``compute.precision=bf16 compute.compile=true`` ...)."""

    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto",
        description="autocast precision of the forward pass (the loss, the weights and the optimiser stay fp32): "
        "auto = bf16 on a CUDA device that supports it, else fp32; fp16 adds a GradScaler (dynamic loss scaling), "
        "saved with checkpoints",
    )
    compile: bool = Field(
        False, description="torch.compile the network (after DDP wrapping); the first steps pay the compile time"
    )
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = Field(
        "default", description="torch.compile mode when compile=true"
    )
    channels_last: bool = Field(
        False,
        description="NHWC memory format for the network's weights and inputs (convolutions on tensor cores prefer it)",
    )
    adam_impl: Literal["auto", "fused", "foreach", "for_loop"] = Field(
        "auto",
        description="Adam's implementation: fused (one kernel for all parameters), foreach (batched ops) or for_loop; "
        "auto = fused on CUDA, foreach on CPU",
    )


def resolve_precision(precision: str, device: torch.device | str) -> Precision:
    """``auto`` -> bf16 on a CUDA device that supports it, fp32 elsewhere (on a CPU, bf16 is opt-in: it is faster only
    with bf16 instructions such as AVX512-BF16 or AMX, and it changes results); any other value is returned as
    given."""
    if precision != "auto":
        return precision  # type: ignore[return-value]
    return "bf16" if torch.device(device).type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"


def autocast(precision: str, device: torch.device | str) -> contextlib.AbstractContextManager:
    """The autocast context of ``precision`` on ``device`` (a no-op context for fp32)."""
    device = torch.device(device)
    resolved = resolve_precision(precision, device)
    if resolved == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AUTOCAST_DTYPES[resolved])


def grad_scaler(precision: str, device: torch.device | str) -> torch.amp.GradScaler | None:
    """A GradScaler for fp16 (whose small range underflows gradients without loss scaling); None otherwise."""
    device = torch.device(device)
    if resolve_precision(precision, device) != "fp16":
        return None
    return torch.amp.GradScaler(device.type)


def resolve_adam_impl(impl: str, device: torch.device | str) -> str:
    """``auto`` -> fused on CUDA, foreach elsewhere; any other value is returned as given."""
    if impl != "auto":
        return impl
    return "fused" if torch.device(device).type == "cuda" else "foreach"


def adam_options(impl: str, device: torch.device | str) -> dict[str, Any]:
    """Keyword arguments of ``torch.optim.Adam`` for ``impl`` on ``device``."""
    resolved = resolve_adam_impl(impl, device)
    return {"fused": {"fused": True}, "foreach": {"foreach": True}, "for_loop": {"foreach": False}}[resolved]


def to_memory_format(tensor: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """``tensor`` in NHWC memory format when ``channels_last`` and it is 4-D; unchanged otherwise."""
    if channels_last and tensor.dim() == 4:
        return tensor.contiguous(memory_format=torch.channels_last)
    return tensor


def prepare_module(
    module: torch.nn.Module, config: ComputeConfig, wrap: Callable[[torch.nn.Module], torch.nn.Module] | None = None
) -> torch.nn.Module:
    """``module`` in the config's memory format, then ``wrap``-ped (e.g. Ray Train's ``prepare_model``: device and
    DDP; the memory format comes first so that DDP's gradient buckets match the parameters' layout), then, when
    ``compile``, wrapped by ``torch.compile``. The wrappers share the parameters;
    ``datprl.models.network.unwrap_model`` reaches the bare network through them."""
    if config.channels_last:
        module = module.to(memory_format=torch.channels_last)
    if wrap is not None:
        module = wrap(module)
    if config.compile:
        module = torch.compile(module, mode=config.compile_mode)
    return module
