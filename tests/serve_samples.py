"""Small sample inputs shared by the serving tests (no Ray): real photo crops, image bytes in any Pillow format, a PNG
decompression-bomb header. A plain module of the tests (``from serve_samples import photo``), as ``tiny_models``."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np

__all__ = ["photo", "encode_pil", "png_bomb"]


def photo(height: int, width: int, top: int = 100, left: int = 150) -> np.ndarray:
    """A (height, width, 3) uint8 crop of a real photo (scikit-image's astronaut, 512x512)."""
    import skimage.data

    return skimage.data.astronaut()[top : top + height, left : left + width]


def encode_pil(array: np.ndarray, fmt: str = "PNG", **kwargs) -> bytes:
    """``array`` saved by Pillow as ``fmt`` (PNG, JPEG, TIFF, GIF, BMP, ...)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def png_bomb(width: int, height: int) -> bytes:
    """A valid tiny PNG whose IHDR claims width x height (a decompression bomb's header)."""
    small = bytearray(encode_pil(np.zeros((4, 4), np.uint8)))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    small[16:29] = ihdr
    small[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr) & 0xFFFFFFFF)
    return bytes(small)
