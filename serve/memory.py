"""Memory of the serving path, without Ray: a process's resident memory (current, peak, and a reset of the peak, from
``/proc``) and the estimate of one request's memory from its image header, which the app checks against
``request_memory_budget_bytes`` before anything is decoded.

The estimate follows what the request path allocates (``datprl.serve.pipeline``), phase by phase, and takes the
largest phase:

* decode: the request body, Pillow's (or pypng's, tifffile's) own copy of the pixels (up to 4 bytes per pixel at
  8 bits, the stored size at 16) and the stored values kept for the restoration;
* restore: the stored values, the activations of the largest forward the request runs (``activation_bytes_per_pixel``
  x its padded pixels: one tile group when tiled, the whole image when not), for an untiled image its float32 input
  copies and output (12 bytes per pixel each), for a tiled one a strip of tile rows, and the output written so far;
* encode: the output (the compressed PNG stream, or the integer array JPEG/TIFF/DICOM need whole) and the encoded
  file twice (its parts and their join).

Compressed output is bounded by its raw size, so the estimate errs on the high side for PNG.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from dataclasses import dataclass

from datprl.models.network import PAD_MULTIPLE
from datprl.serve.codec import ImageHeader

__all__ = [
    "MemoryEstimate",
    "estimate_request_memory",
    "format_bytes",
    "padded_length",
    "padded_tile_pixels",
    "peak_rss_bytes",
    "reset_peak_rss",
    "rss_bytes",
    "set_mmap_threshold",
    "trim_heap",
]

# Untiled forwards hold the image as float32 three times at once (the decoded unit, the stacked batch, the padded
# batch) and the restored output once: 12 bytes per pixel each.
_UNIT_BYTES = 3 * 4
_UNTILED_FLOAT_COPIES = 4
# Pillow keeps 8-bit images at up to 4 bytes per pixel (RGB is stored as RGBX) while they are converted.
_PILLOW_BYTES_PER_PIXEL = 4
# Float32 copies of a tile in flight: the crop, the stacked (padded) batch, the output and its weighted copy.
_TILE_FLOAT_COPIES = 4


def _status_field(key: str, pid: int | str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def rss_bytes(pid: int | str = "self") -> int | None:
    """Resident memory of process ``pid`` now (``VmRSS``); None where ``/proc`` does not tell."""
    return _status_field("VmRSS", pid)


def peak_rss_bytes(pid: int | str = "self") -> int | None:
    """Peak resident memory of process ``pid`` since it started or since :func:`reset_peak_rss` (``VmHWM``)."""
    return _status_field("VmHWM", pid)


def reset_peak_rss(pid: int | str = "self") -> bool:
    """Reset the peak of :func:`peak_rss_bytes` to the current resident memory (Linux ``clear_refs``, value 5), so a
    later peak belongs to what ran in between; False where that is not possible."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as clear:
            clear.write("5")
        return True
    except OSError:
        return False


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """The C library, loaded once; None where it cannot be found or loaded."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return ctypes.CDLL(name)
    except OSError:
        return None


def trim_heap() -> None:
    """Return freed heap memory to the system (glibc ``malloc_trim``), so that a peak measured next is not hidden by
    memory the allocator kept from earlier work; nothing elsewhere."""
    libc = _libc()
    if libc is None:
        return
    try:
        libc.malloc_trim(0)
    except AttributeError:  # not glibc
        pass


_M_MMAP_THRESHOLD = -3  # mallopt parameter number (glibc malloc.h)


def set_mmap_threshold(threshold: int) -> bool:
    """Serve allocations of at least ``threshold`` bytes from their own memory mappings, returned to the system when
    freed (glibc ``mallopt(M_MMAP_THRESHOLD)``; fixing it turns off glibc's dynamic threshold, which after the first
    large free rises to 32 MB and then keeps every freed activation of up to that size in the heap of the thread that
    ran the forward). False where the C library is not glibc."""
    libc = _libc()
    if libc is None:
        return False
    try:
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, int(threshold)))
    except AttributeError:
        return False


def format_bytes(count: float) -> str:
    """``1.5 GB``-style text (powers of 1024) for messages."""
    for unit in ("bytes", "KB", "MB", "GB"):
        if abs(count) < 1024 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "bytes" else f"{count:.2f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


def padded_length(n: int) -> int:
    """``n`` rounded up to the network's ``PAD_MULTIPLE`` (8): the length a forward pads an image side to."""
    return n + (-n % PAD_MULTIPLE)


def padded_tile_pixels(tile_size: int, height: int, width: int) -> int:
    """Padded pixels of one tile of a (height, width) image cut in ``tile_size`` tiles (the image when smaller)."""
    return padded_length(min(tile_size, height)) * padded_length(min(tile_size, width))


@dataclass(frozen=True)
class MemoryEstimate:
    """The estimated peak memory of one request (bytes): ``total`` = the largest of its phases; ``activations`` and
    ``buffers`` (image buffers) split the peak phase, ``phase`` names it."""

    tiled: bool
    total: int
    activations: int
    buffers: int
    phase: str
    activation_bytes_per_pixel: float

    def describe(self) -> str:
        """``2.31 GB (decode phase: activations 0 bytes, image buffers 2.31 GB)``-style text."""
        return (
            f"{format_bytes(self.total)} ({self.phase} phase: activations {format_bytes(self.activations)} at "
            f"{self.activation_bytes_per_pixel:.0f} bytes/pixel, image buffers {format_bytes(self.buffers)})"
        )

    def as_dict(self) -> dict[str, object]:
        return {
            "estimate_bytes": self.total,
            "activation_bytes": self.activations,
            "buffer_bytes": self.buffers,
            "phase": self.phase,
            "tiled": self.tiled,
            "activation_bytes_per_pixel": round(self.activation_bytes_per_pixel, 1),
        }


def estimate_request_memory(
    header: ImageHeader,
    body_bytes: int,
    tiled: bool,
    *,
    tile_size: int,
    tiles_per_forward: int,
    activation_bytes_per_pixel: float,
    output_format: str = "png",
    output_bits: int | None = None,
) -> MemoryEstimate:
    """The peak memory restoring the image ``header`` describes should take (see the module docstring for the terms),
    from the header alone: checked before decoding."""
    pixels = header.pixels
    sample = header.bytes_per_sample
    stored = pixels * header.channels * sample
    decoder = pixels * _PILLOW_BYTES_PER_PIXEL if sample == 1 else stored
    out_bits = output_bits or (8 if output_format == "jpeg" else header.bit_depth)
    out_sample = 1 if out_bits <= 8 else 2
    out_channels = header.channels - (output_format == "jpeg" and header.channels in (2, 4))
    output = pixels * out_channels * out_sample  # raw size: PNG compresses below it, the other formats hold it whole
    encoded = output + output // 100 + 65536  # stored deflate blocks can exceed the raw size a little
    alpha = pixels * sample if header.channels in (2, 4) else 0

    phases: dict[str, tuple[int, int]] = {"decode": (0, body_bytes + decoder + stored)}
    if tiled:
        tile_pixels = padded_tile_pixels(tile_size, header.height, header.width)
        forward = tiles_per_forward * tile_pixels
        tile_height = min(tile_size, header.height)
        strip = _UNIT_BYTES * tile_height * header.width * 2  # the accumulator and the rows being quantised
        in_flight = tiles_per_forward * tile_pixels * _UNIT_BYTES * _TILE_FLOAT_COPIES
        phases["restore"] = (int(activation_bytes_per_pixel * forward), stored + strip + in_flight + output)
    else:
        forward = padded_length(header.height) * padded_length(header.width)
        phases["restore"] = (
            int(activation_bytes_per_pixel * forward),
            stored + forward * _UNIT_BYTES * _UNTILED_FLOAT_COPIES,
        )
    jpeg_copy = pixels * _PILLOW_BYTES_PER_PIXEL if output_format == "jpeg" else 0
    phases["encode"] = (0, alpha + output + 2 * encoded + jpeg_copy)
    phase, (activations, buffers) = max(phases.items(), key=lambda item: sum(item[1]))
    return MemoryEstimate(tiled, activations + buffers, activations, buffers, phase, activation_bytes_per_pixel)
