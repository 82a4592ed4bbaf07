"""Tiled inference for large images: overlapping tiles of one fixed shape, restored in small batches and blended with
a linear cross-fade, so memory is bounded by the tile batch plus one output canvas whatever the image size.

All tiles of an image have the same shape (``min(tile, H) x min(tile, W)``; the last tile of a row/column is shifted
back to end at the image border), so they batch together, also with tiles of other requests of the same size.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

__all__ = ["Tile", "tile_grid", "blend_window", "TileCanvas", "tiled_apply"]


@dataclass(frozen=True)
class Tile:
    top: int
    left: int
    height: int
    width: int

    def crop(self, image: torch.Tensor) -> torch.Tensor:
        return image[..., self.top : self.top + self.height, self.left : self.left + self.width]


def _starts(length: int, tile: int, overlap: int) -> list[int]:
    if length <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, length - tile, stride))
    starts.append(length - tile)
    return starts


def tile_grid(height: int, width: int, tile: int, overlap: int) -> list[Tile]:
    """Tiles covering (height, width) with at least ``overlap`` pixels shared between neighbours."""
    if not 0 <= 2 * overlap < tile:
        raise ValueError(f"overlap={overlap} must be in [0, tile/2) for tile={tile}")
    th, tw = min(tile, height), min(tile, width)
    return [Tile(y, x, th, tw) for y in _starts(height, tile, overlap) for x in _starts(width, tile, overlap)]


def _ramp(length: int, overlap: int) -> torch.Tensor:
    if overlap <= 0:
        return torch.ones(length)
    position = torch.arange(length, dtype=torch.float32) + 0.5
    return torch.minimum(torch.ones(length), torch.minimum(position, length - position) / overlap)


def blend_window(height: int, width: int, overlap: int) -> torch.Tensor:
    """(height, width) weights: 1 inside, falling linearly to ~0 over ``overlap`` pixels at each edge. Every pixel of
    the image is covered by at least one tile with positive weight, and the canvas divides by the summed weights, so
    the taper at the image's own border cancels out."""
    return _ramp(height, overlap)[:, None] * _ramp(width, overlap)[None, :]


class TileCanvas:
    """Accumulates weighted tile outputs for one (C, H, W) image; :meth:`result` divides by the summed weights."""

    def __init__(self, channels: int, height: int, width: int, tile: Tile, overlap: int,
                 device: torch.device | str = "cpu") -> None:
        self.sum = torch.zeros(channels, height, width, device=device)
        self.weight = torch.zeros(1, height, width, device=device)
        self.window = blend_window(tile.height, tile.width, overlap).to(device)[None]

    def add(self, tile: Tile, output: torch.Tensor) -> None:
        region = (slice(None), slice(tile.top, tile.top + tile.height), slice(tile.left, tile.left + tile.width))
        self.sum[region] += output.to(self.sum.device, torch.float32) * self.window
        self.weight[region] += self.window

    def result(self) -> torch.Tensor:
        return self.sum / self.weight.clamp_min(1e-12)


def _chunks(items: list[Tile], size: int) -> Iterator[list[Tile]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def tiled_apply(
    fn: Callable[[torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    tile: int,
    overlap: int,
    batch_size: int = 4,
) -> torch.Tensor:
    """Apply ``fn`` ((B, C, h, w) -> (B, C', h, w)) to a (C, H, W) image tile by tile; returns (C', H, W)."""
    _, height, width = image.shape
    tiles = tile_grid(height, width, tile, overlap)
    canvas: TileCanvas | None = None
    for group in _chunks(tiles, batch_size):
        outputs = fn(torch.stack([t.crop(image) for t in group]))
        if canvas is None:
            canvas = TileCanvas(outputs.shape[1], height, width, tiles[0], overlap, device=outputs.device)
        for t, out in zip(group, outputs):
            canvas.add(t, out)
    assert canvas is not None
    return canvas.result()
