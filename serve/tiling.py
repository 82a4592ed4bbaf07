"""Tiled inference for large images: overlapping tiles of one fixed shape, restored in small batches and blended with
a linear cross-fade, so memory is bounded by the tile batch plus one output canvas whatever the image size.

All tiles of an image have the same shape (``min(tile, H) x min(tile, W)``; the last tile of a row/column is shifted
back to end at the image border), so they batch together, also with tiles of other requests of the same size.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

__all__ = ["Tile", "tile_grid", "blend_window", "TileCanvas", "TiledJob", "tiled_apply"]


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
        """The blended image; divides the accumulator in place (no second canvas) and frees the weights."""
        out = self.sum.div_(self.weight.clamp_min_(1e-12))
        self.weight = torch.empty(0)
        return out


class TiledJob:
    """Tile-by-tile restoration of one (C, H, W) image, whoever runs the network: :func:`tiled_apply` (synchronous,
    ``Engine.restore``) and the Serve app (tiles through its batch queue, canvas work in a worker thread) drive the
    same steps: :meth:`groups` of at most ``batch_size`` tiles, :meth:`crops` of a group, :meth:`add` of its outputs
    (the canvas is allocated on the first add), :meth:`result`."""

    def __init__(self, image: torch.Tensor, tile: int, overlap: int, batch_size: int) -> None:
        self.image = image
        self.overlap = overlap
        self.batch_size = batch_size
        self.tiles = tile_grid(int(image.shape[-2]), int(image.shape[-1]), tile, overlap)
        self.canvas: TileCanvas | None = None

    def groups(self) -> Iterator[list[Tile]]:
        for start in range(0, len(self.tiles), self.batch_size):
            yield self.tiles[start : start + self.batch_size]

    def crops(self, group: Sequence[Tile]) -> list[torch.Tensor]:
        return [t.crop(self.image) for t in group]

    def add(self, group: Sequence[Tile], outputs: Sequence[torch.Tensor] | torch.Tensor) -> None:
        for t, out in zip(group, outputs):
            if self.canvas is None:
                _, height, width = self.image.shape
                self.canvas = TileCanvas(out.shape[0], height, width, self.tiles[0], self.overlap, device=out.device)
            self.canvas.add(t, out)

    def result(self) -> torch.Tensor:
        assert self.canvas is not None, "no tile was added"
        out = self.canvas.result()
        self.canvas = None
        return out


def tiled_apply(
    fn: Callable[[torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    tile: int,
    overlap: int,
    batch_size: int = 4,
) -> torch.Tensor:
    """Apply ``fn`` ((B, C, h, w) -> (B, C', h, w)) to a (C, H, W) image tile by tile; returns (C', H, W)."""
    job = TiledJob(image, tile, overlap, batch_size)
    for group in job.groups():
        job.add(group, fn(torch.stack(job.crops(group))))
    return job.result()
