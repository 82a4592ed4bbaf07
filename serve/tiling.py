"""Tiled inference for large images: overlapping tiles of one fixed shape, restored a bounded number at a time and
blended with a linear cross-fade, with memory bounded by one row of tiles whatever the image's height.

All tiles of an image have the same shape (``min(tile, H) x min(tile, W)``; the last tile of a row/column is shifted
back to end at the image border), so they batch together, also with tiles of other requests of the same size.

Nothing full-size is allocated here. The input is read tile by tile through a ``crop`` callable (the app normalises
each tile from the decoded stored values). The blend weights are never stored as a canvas: the tiles form a grid and
the window is separable (``ramp(y) * ramp(x)``), so the summed weight at (y, x) is ``rows(y) * cols(x)``, two 1-D
vectors. Tile outputs are accumulated in a strip of one tile's height; rows are finalised and handed to an ``emit``
callable as soon as no later tile touches them (a tile row's top rows once the next tile row starts).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "Tile",
    "tile_grid",
    "blend_window",
    "axis_weights",
    "StripBlender",
    "TiledJob",
    "tiled_apply",
    "tiles_per_forward",
]


@dataclass(frozen=True)
class Tile:
    """One tile's place in the image: its top-left corner and its (equal for all tiles) height and width."""

    top: int
    left: int
    height: int
    width: int

    def crop(self, image: torch.Tensor) -> torch.Tensor:
        """This tile's view of a (..., H, W) tensor."""
        return image[..., self.top : self.top + self.height, self.left : self.left + self.width]


def _starts(length: int, tile: int, overlap: int) -> list[int]:
    if length <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, length - tile, stride))
    starts.append(length - tile)
    return starts


def tile_grid(height: int, width: int, tile: int, overlap: int) -> list[Tile]:
    """Tiles covering (height, width) with at least ``overlap`` pixels shared between neighbours, row by row (top to
    bottom, left to right within a row): the order :class:`StripBlender` needs."""
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
    the image is covered by at least one tile with positive weight, and the blend divides by the summed weights, so
    the taper at the image's own border cancels out."""
    return _ramp(height, overlap)[:, None] * _ramp(width, overlap)[None, :]


def axis_weights(length: int, tile: int, overlap: int) -> torch.Tensor:
    """(length,) sum over the tiles along one axis of their 1-D ramps: the blend weight of the tile grid at pixel
    (y, x) is ``axis_weights(H)[y] * axis_weights(W)[x]`` (the window is separable and the tiles form a grid)."""
    size = min(tile, length)
    ramp = _ramp(size, overlap)
    total = torch.zeros(length)
    for start in _starts(length, tile, overlap):
        total[start : start + size] += ramp
    return total


def tiles_per_forward(tile_pixels: int, max_batch_size: int, max_batch_pixels: int | None) -> int:
    """How many tiles of ``tile_pixels`` (padded) pixels go into one forward: ``max_batch_size`` at most, and no more
    than ``max_batch_pixels`` pixels together, but always at least one."""
    if max_batch_pixels is None:
        return max_batch_size
    return max(1, min(max_batch_size, max_batch_pixels // max(tile_pixels, 1)))


class StripBlender:
    """Blends tile outputs of one (C, H, W) image into rows that are handed to ``emit(top, rows)`` ((C, n, W) float32,
    valid only during the call) as soon as no later tile can touch them. Tiles must arrive in :func:`tile_grid`
    order. Memory: one (C, tile height, W) float32 accumulator plus the two 1-D weight vectors."""

    def __init__(
        self, height: int, width: int, tile: int, overlap: int, emit: Callable[[int, torch.Tensor], None]
    ) -> None:
        self.height, self.width = height, width
        self.tile_height, self.tile_width = min(tile, height), min(tile, width)
        self.rows = axis_weights(height, tile, overlap)
        self.cols = axis_weights(width, tile, overlap)
        self.window = blend_window(self.tile_height, self.tile_width, overlap)[None]
        self.emit = emit
        self.top = 0  # image row of the accumulator's first row (= rows emitted so far)
        self.acc: torch.Tensor | None = None  # (C, tile height, W), allocated by the first tile (its channel count)

    def add(self, tile: Tile, output: torch.Tensor) -> None:
        """Accumulate one tile's (C, h, w) output; a tile further down first finalises the rows above it."""
        if tile.top < self.top:
            raise ValueError(f"tile at row {tile.top} arrived after row {self.top}: add tiles in tile_grid order")
        if self.acc is None:
            self.acc = torch.zeros(output.shape[0], self.tile_height, self.width, dtype=torch.float32)
        if tile.top > self.top:
            self._finalise(tile.top)
        region = self.acc[:, :, tile.left : tile.left + tile.width]
        region.add_(output.to("cpu", torch.float32) * self.window)

    def _finalise(self, until: int) -> None:
        """Emit rows [self.top, until) and move the accumulator down to start at ``until``."""
        assert self.acc is not None
        n = until - self.top
        rows = self.acc[:, :n]
        rows.div_(self.rows[self.top : until, None]).div_(self.cols[None, None, :])
        self.emit(self.top, rows)
        kept = self.tile_height - n
        if kept > 0:  # rows [until, top + tile height) already hold parts of the next tile row
            self.acc[:, :kept] = self.acc[:, n:].clone()
        self.acc[:, max(kept, 0) :] = 0
        self.top = until

    def finish(self) -> None:
        """Emit the rows still held (the last tile row ends at the image's bottom) and free the accumulator."""
        if self.acc is None:
            raise RuntimeError("no tile was added")
        self._finalise(self.top + self.tile_height)
        if self.top != self.height:
            raise RuntimeError(f"emitted {self.top} of {self.height} rows: tiles missing")
        self.acc = None


class TiledJob:
    """Tile-by-tile restoration of one image of (height, width), whoever runs the network: :func:`tiled_apply`
    (synchronous, ``Engine.restore``) and the Serve app (tiles through its batch queue, tile work in worker threads)
    drive the same steps: :meth:`groups` of at most ``group_size`` tiles, :meth:`crops` of a group (``crop(tile)``
    reads one tile's (3, h, w) input), :meth:`add` of its outputs (rows finished on the way go to ``emit``),
    :meth:`finish`."""

    def __init__(
        self,
        height: int,
        width: int,
        tile: int,
        overlap: int,
        group_size: int,
        crop: Callable[[Tile], torch.Tensor],
        emit: Callable[[int, torch.Tensor], None],
    ) -> None:
        self.tiles = tile_grid(height, width, tile, overlap)
        self.group_size = max(1, group_size)
        self.crop = crop
        self.blender = StripBlender(height, width, tile, overlap, emit)

    def groups(self) -> Iterator[list[Tile]]:
        for start in range(0, len(self.tiles), self.group_size):
            yield self.tiles[start : start + self.group_size]

    def crops(self, group: Sequence[Tile]) -> list[torch.Tensor]:
        return [self.crop(t) for t in group]

    def add(self, group: Sequence[Tile], outputs: Sequence[torch.Tensor] | torch.Tensor) -> None:
        for t, out in zip(group, outputs, strict=True):
            self.blender.add(t, out)

    def finish(self) -> None:
        self.blender.finish()


def tiled_apply(
    fn: Callable[[torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    tile: int,
    overlap: int,
    batch_size: int = 4,
) -> torch.Tensor:
    """Apply ``fn`` ((B, C, h, w) -> (B, C', h, w)) to a (C, H, W) image tile by tile; returns (C', H, W) float32."""
    height, width = int(image.shape[-2]), int(image.shape[-1])
    result: list[torch.Tensor] = []

    def emit(top: int, rows: torch.Tensor) -> None:
        if not result:
            result.append(torch.empty(rows.shape[0], height, width, dtype=torch.float32))
        result[0][:, top : top + rows.shape[1]] = rows

    job = TiledJob(height, width, tile, overlap, batch_size, lambda t: t.crop(image), emit)
    for group in job.groups():
        job.add(group, fn(torch.stack(job.crops(group))))
    job.finish()
    return result[0]
