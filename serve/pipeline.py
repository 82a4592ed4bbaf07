"""One request's path through a replica once its body is read, without Ray or HTTP: :func:`plan_request` (tiling
and the memory budget, from the header, before decoding), :func:`restore_image` (one piece, or tile by tile with
rows finished and encoded on the way) and the :class:`~datprl.serve.codec.OutputWriter` that encodes them, plus the
replica process's set-up before its first request: :func:`configure_process_memory` (allocator settings) and
:func:`activation_bytes_per_pixel` (the figure of the memory estimate).

The deployment (``datprl.serve.app``) runs it with its ``@serve.batch`` queue as the forward; the large-image
benchmark (``datprl.platform.bench.large_images``) with direct engine calls, so both measure the same code.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import torch

from datprl.serve.codec import DecodedImage, ImageHeader, OutputWriter, RequestError
from datprl.serve.config import ServeConfig
from datprl.serve.engine import Engine, PromptTally, Restored
from datprl.serve.memory import (
    MemoryEstimate,
    estimate_request_memory,
    format_bytes,
    padded_tile_pixels,
    set_mmap_threshold,
)
from datprl.serve.tiling import Tile, TiledJob, tiles_per_forward

__all__ = [
    "ACTIVATION_PROBE_EDGE",
    "FALLBACK_ACTIVATION_BYTES_PER_PIXEL",
    "Plan",
    "Outcome",
    "activation_bytes_per_pixel",
    "configure_process_memory",
    "plan_request",
    "restore_image",
    "tile_group_size",
]

log = logging.getLogger("ray.serve")

Forward = Callable[[torch.Tensor], Awaitable[Restored]]


@dataclass(frozen=True)
class Plan:
    """How a request will be restored, decided from its header: ``tiled`` or not, and its memory ``estimate`` (None
    when the server has no budget). ``note`` says why ``tiling=auto`` chose tiles below ``tile_above_pixels``."""

    tiled: bool
    estimate: MemoryEstimate | None
    note: str | None = None


@dataclass(frozen=True)
class Outcome:
    """What :func:`restore_image` reports: the prompt summary, the number of tiles (1 untiled) and the largest batch
    the image's forwards ran in."""

    prompts: dict[str, Any]
    tiles: int
    batch: int


def tile_group_size(config: ServeConfig, height: int, width: int) -> int:
    """Tiles of one image sent to the network at a time: as many as fit ``max_batch_pixels`` (padded), at least one,
    at most ``max_batch_size``."""
    padded = padded_tile_pixels(config.tile_size, height, width)
    return tiles_per_forward(padded, config.max_batch_size, config.max_batch_pixels)


#: Activation bytes per pixel assumed when the replica cannot measure them (no /proc): above the ~2.2 KB measured for
#: paper_tiny in fp32 on CPU. Set activation_bytes_per_pixel for other variants on such systems.
FALLBACK_ACTIVATION_BYTES_PER_PIXEL = 4096.0


def configure_process_memory(config: ServeConfig) -> None:
    """The replica process's allocator settings (``malloc_mmap_threshold_bytes``); set before the engine loads."""
    if config.malloc_mmap_threshold_bytes is not None and not set_mmap_threshold(config.malloc_mmap_threshold_bytes):
        log.info("[serve] malloc_mmap_threshold_bytes is not applied here (the C library is not glibc)")


#: Edge of the input whose forward measures the activations at start-up (the tile's when smaller, at least 128): for
#: paper_tiny on CPU 256x256 gives 2,270-2,280 bytes/pixel, 5% above a 512x512 forward's, in under half its time
#: (a replica's start-up waits for it).
ACTIVATION_PROBE_EDGE = 256


def activation_bytes_per_pixel(config: ServeConfig, engine: Engine) -> float | None:
    """The activation memory per pixel the memory estimate uses: the configured value, else measured here by one
    forward of an ``ACTIVATION_PROBE_EDGE`` square (None without a budget: nothing needs it)."""
    if config.request_memory_budget_bytes is None:
        return None
    if config.activation_bytes_per_pixel is not None:
        return config.activation_bytes_per_pixel
    measured = engine.measure_activation_bytes_per_pixel(max(128, min(config.tile_size, ACTIVATION_PROBE_EDGE)))
    if measured is None:
        log.warning(
            "[serve] activation memory could not be measured here; the memory estimate assumes %.0f "
            "bytes/pixel (set activation_bytes_per_pixel)",
            FALLBACK_ACTIVATION_BYTES_PER_PIXEL,
        )
        return FALLBACK_ACTIVATION_BYTES_PER_PIXEL
    return measured


def _estimate(
    header: ImageHeader,
    body_bytes: int,
    tiled: bool,
    config: ServeConfig,
    activation_bytes_per_pixel: float,
    output_format: str,
    output_bits: int | None,
) -> MemoryEstimate:
    return estimate_request_memory(
        header,
        body_bytes,
        tiled,
        tile_size=config.tile_size,
        tiles_per_forward=tile_group_size(config, header.height, header.width),
        activation_bytes_per_pixel=activation_bytes_per_pixel,
        output_format=output_format,
        output_bits=output_bits,
    )


def plan_request(
    header: ImageHeader,
    body_bytes: int,
    tiling: str,
    config: ServeConfig,
    activation_bytes_per_pixel: float | None,
    output_format: str = "png",
    output_bits: int | None = None,
) -> Plan:
    """Tiled or not, checked against the limits before any pixel is decoded: ``max_untiled_pixels`` for
    ``tiling=never`` and the request's estimated memory against ``request_memory_budget_bytes`` (413 naming the
    estimate, the budget and the fix). ``tiling=auto`` restores an image in tiles when in one piece it would exceed
    the budget and in tiles it fits."""
    pixels = header.pixels
    tiled = tiling == "always" or (tiling == "auto" and pixels > config.tile_above_pixels)
    if tiling == "never" and pixels > config.max_untiled_pixels:
        raise RequestError(
            413,
            f"tiling=never with {pixels} pixels exceeds max_untiled_pixels={config.max_untiled_pixels}",
            "use tiling=auto for large images",
        )
    budget = config.request_memory_budget_bytes
    if budget is None or activation_bytes_per_pixel is None:
        return Plan(tiled, None)
    estimate = _estimate(header, body_bytes, tiled, config, activation_bytes_per_pixel, output_format, output_bits)
    if estimate.total <= budget:
        return Plan(tiled, estimate)
    alternative = None
    if not tiled:
        alternative = _estimate(
            header, body_bytes, True, config, activation_bytes_per_pixel, output_format, output_bits
        )
        if tiling == "auto" and alternative.total <= budget:
            return Plan(
                True,
                alternative,
                note=(
                    f"restored in tiles: in one piece it would need an estimated {format_bytes(estimate.total)}, above "
                    f"request_memory_budget_bytes ({format_bytes(budget)})"
                ),
            )
    if tiling == "auto" and alternative is not None:  # not even in tiles: report the least it could need
        estimate, tiled, alternative = alternative, True, None
    how = "in tiles" if tiled else f"in one piece (tiling={tiling})"
    error = (
        f"restoring this {header.width}x{header.height} image {how} needs an estimated {estimate.describe()}, "
        f"above the server's memory budget per request, request_memory_budget_bytes={budget} "
        f"({format_bytes(budget)})"
    )
    if alternative is not None and alternative.total <= budget:
        fix = (
            f"send it with tiling=auto (in {config.tile_size}-pixel tiles it needs about "
            f"{format_bytes(alternative.total)}), send a smaller image, or raise the server's "
            "request_memory_budget_bytes"
        )
    else:
        fix = (
            "send a smaller image (fewer pixels or channels), or raise the server's request_memory_budget_bytes "
            "(or lower its max_batch_pixels or tile_size, which bound the activations of a tiled image)"
        )
    raise RequestError(413, error, fix)


def _unit(image: DecodedImage) -> torch.Tensor:
    """The whole image as the network's (3, H, W) input; the stored values are released once read."""
    unit = torch.from_numpy(image.to_unit())
    image.release_pixels()
    return unit


async def restore_image(
    image: DecodedImage,
    tiled: bool,
    writer: OutputWriter,
    forward: Forward,
    pools: dict[str, dict[str, int]],
    config: ServeConfig,
) -> Outcome:
    """Restore ``image`` through ``forward`` ((3, h, w) in, :class:`Restored` out: the batch queue in the replica)
    into ``writer``; :meth:`OutputWriter.finish` then gives the file. Untiled: one forward of the whole image.
    Tiled: ``tile_group_size`` tiles at a time, each normalised from the stored values when it is cut, rows blended
    and handed to ``writer`` as soon as no later tile touches them. Everything that scales with the image runs in
    worker threads, never on the event loop. The stored values are released once the last tile is cut."""
    tally = PromptTally(pools)
    if not tiled:
        unit = await asyncio.to_thread(_unit, image)
        out = await forward(unit)
        del unit
        tally.add(out.selection, 0)
        await asyncio.to_thread(writer.write, 0, out.image)
        return Outcome(tally.summary(), 1, out.batch)

    def crop(tile: Tile) -> torch.Tensor:
        return torch.from_numpy(image.unit_crop(tile.top, tile.left, tile.height, tile.width))

    job = TiledJob(
        image.height,
        image.width,
        config.tile_size,
        config.tile_overlap,
        tile_group_size(config, image.height, image.width),
        crop,
        writer.write,
    )
    largest = 0
    for group in job.groups():  # one group of this image's tiles in flight at a time
        crops = await asyncio.to_thread(job.crops, group)
        outs = await asyncio.gather(*(forward(c) for c in crops))
        del crops
        await asyncio.to_thread(job.add, group, [o.image for o in outs])
        for out in outs:
            tally.add(out.selection, 0)
            largest = max(largest, out.batch)
    image.release_pixels()
    await asyncio.to_thread(job.finish)
    return Outcome(tally.summary(), len(job.tiles), largest)
