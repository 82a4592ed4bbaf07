"""Image bytes in and out of the restoration endpoint, without Ray: format sniffing, content-type checks, pixel limits
read from the header *before* any pixel is decoded, decoding to stored values, normalisation to [0, 1] and back.

Formats in: PNG (8/16-bit, gray, gray+alpha, RGB, RGBA, palette), JPEG (8-bit gray/RGB/CMYK), TIFF (one page, 8/16-bit
unsigned, 1-4 samples) and single-frame DICOM (8/16-bit, gray or RGB, any transfer syntax pydicom decodes).
Formats out: PNG (default), JPEG (8-bit), TIFF, and DICOM for DICOM input.

Every problem with the input is a :class:`RequestError` carrying the HTTP status, a message naming the problem and a
hint how to fix it; the application turns it into a JSON 4xx response.

Normalisation (the model's input convention, as in training: stored value / white level, grayscale replicated to
3 channels by the caller):

* 8-bit images: / 255. 16-bit PNG/TIFF: / 65535, or / ``white_level`` when the request gives one (e.g. 4095 for
  12-bit content, the convention of the medical training data).
* DICOM CT with a rescale (HU): ``stored = clip(HU + 1024, 0, 4095)`` / 4095, exactly the training corpus' convention
  (both use :mod:`datprl.platform.data.conventions`).
  Other 16-bit DICOM: ``(raw - lo) / (hi - lo)`` with ``lo = min(0, raw.min())``, ``hi = raw.max()`` (the training
  corpus scales each file by its maximum too). 8-bit DICOM: / 255.

The way back (:func:`encode`) inverts that scaling, so values keep their meaning: a 16-bit PNG of a CT slice holds
HU + 1024; a DICOM out holds the original raw pixel representation with the original rescale, clipped to the range
``BitsStored``/``PixelRepresentation`` allow, and CT pixels outside the model's range (HU below -1024 such as padding
-2000/-3024, or above 3071 such as metal) keep their original raw values.

Colour and metadata: EXIF (orientation included) is passed through unchanged, never applied: the pixels keep their
stored orientation, and PNG/JPEG/TIFF output carries the input's EXIF (TIFF: its Orientation tag), so viewers show the
output as they showed the input. An ICC profile passes through when it matches the output's colour space (gray or
RGB). A PNG tRNS colour key on gray/RGB input becomes an alpha channel (0 where the key matched). TIFF: MINISBLACK and
RGB are read as stored (extra samples as alpha), MINISWHITE is inverted and returned as MINISBLACK (it displays the
same), palette and CMYK (SEPARATED) and YCbCr are converted to RGB through Pillow; other photometric modes are a 415.
"""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageFile

from datprl.platform.data import conventions

__all__ = [
    "RequestError",
    "DecodedImage",
    "FORMATS_IN",
    "FORMATS_OUT",
    "MEDIA_TYPES",
    "sniff",
    "check_content_type",
    "decode",
    "encode",
    "read_header",
    "ImageHeader",
    "OutputWriter",
    "output_format",
    "check_output",
    "to_gray_or_rgb",
]

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error (400), never silently padded
# Pillow warns about (and at 2x, refuses) images above Image.MAX_IMAGE_PIXELS when it opens them; our own header check
# (_too_many) decides, so the warning is noise. Installed once here: warnings.catch_warnings() around each decode is
# not thread-safe, and decodes run concurrently in worker threads.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

FORMATS_IN = ("png", "jpeg", "tiff", "dicom")
FORMATS_OUT = ("png", "jpeg", "tiff", "dicom")
MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "tiff": "image/tiff", "dicom": "application/dicom"}
_DECLARED = {
    "image/png": "png",
    "image/x-png": "png",
    "image/jpeg": "jpeg",
    "image/jpg": "jpeg",
    "image/pjpeg": "jpeg",
    "image/tiff": "tiff",
    "image/tif": "tiff",
    "application/dicom": "dicom",
    "application/dicom+binary": "dicom",
}
_SNIFF_ANY = {"", "application/octet-stream", "binary/octet-stream"}
_UNSUPPORTED_SIGNATURES = [
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"\x00\x00\x01\x00", "ICO"),
    (b"8BPS", "PSD"),
    (b"%PDF", "PDF"),
    (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"),
    (b"\xff\x4f\xff\x51", "JPEG 2000 codestream"),
    (b"II\x2b\x00", "BigTIFF"),
    (b"MM\x00\x2b", "BigTIFF"),
]
_SUPPORTED_TEXT = "PNG, JPEG, TIFF or single-frame DICOM"


class RequestError(Exception):
    """A problem with the request: HTTP ``status``, ``error`` naming it, ``fix`` saying what to send instead."""

    def __init__(self, status: int, error: str, fix: str) -> None:
        super().__init__(error)
        self.status = status
        self.error = error
        self.fix = fix

    def payload(self) -> dict[str, Any]:
        return {"error": self.error, "fix": self.fix, "status": self.status}


@dataclass
class DecodedImage:
    """Stored values of one image plus everything needed to write the restoration back the same way.

    pixels: (H, W, C) uint8 or uint16 colour channels (C = 1 or 3); alpha: (H, W) of the same dtype or None.
    white_level: the stored value meaning 1.0. dicom: the parsed dataset (DICOM input only) and how its raw values
    map to stored ones (``dicom_map``). icc_profile / exif: passed through to the output (exif as Pillow's
    ``Exif.tobytes()``, starting with ``Exif\\0\\0``).
    """

    format: str
    pixels: np.ndarray
    alpha: np.ndarray | None
    bit_depth: int
    white_level: int
    dicom: Any = None
    dicom_map: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    icc_profile: bytes | None = None
    exif: bytes | None = None

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])

    @property
    def colour_channels(self) -> int:
        return int(self.pixels.shape[2])

    @property
    def channels(self) -> int:
        return self.colour_channels + (self.alpha is not None)

    def to_unit(self) -> np.ndarray:
        """(3, H, W) float32 in [0, 1]: stored / white level, grayscale replicated to 3 channels (the paper's input)."""
        return self.unit_crop(0, 0, self.height, self.width)

    def unit_crop(self, top: int, left: int, height: int, width: int) -> np.ndarray:
        """:meth:`to_unit` of one window only: tiled restoration normalises each tile from the stored values, so no
        full-size float copy of the image exists (12 bytes per pixel against the stored 1-6)."""
        stored = self.pixels[top : top + height, left : left + width]
        channels = stored.shape[2]
        unit = np.empty((3, height, width), np.float32)  # written channel by channel: no full-size temporaries
        for c in range(3):
            np.divide(stored[..., c if channels == 3 else 0], float(self.white_level), out=unit[c], casting="unsafe")
        return np.clip(unit, 0.0, 1.0, out=unit)

    def release_pixels(self) -> None:
        """Drop the stored values once the restoration has read them (they are not needed to encode the result);
        shape and dtype stay, backed by one zero. The alpha channel stays: encoding writes it back."""
        self.pixels = np.broadcast_to(np.zeros(1, self.pixels.dtype), self.pixels.shape)


@dataclass(frozen=True)
class ImageHeader:
    """What the header says about an image before any pixel is decoded: size, samples per pixel and bits per
    sample (as stored; palette images count as RGBA, the most they decode to)."""

    width: int
    height: int
    channels: int
    bit_depth: int

    @property
    def pixels(self) -> int:
        return self.width * self.height

    @property
    def bytes_per_sample(self) -> int:
        return 1 if self.bit_depth <= 8 else 2


# --- format detection -----------------------------------------------------------------------------------------------


def sniff(data: bytes) -> str | None:
    """The supported format of ``data`` from its signature, or None. DICOM is tested first: its 128-byte preamble
    may itself hold a TIFF header (dual-personality files, e.g. pydicom's CT_small.dcm)."""
    if len(data) >= 132 and data[128:132] == b"DICM":
        return "dicom"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if data.startswith((b"II*\x00", b"MM\x00*")):
        return "tiff"
    return None


def _unsupported_name(data: bytes) -> str | None:
    for signature, name in _UNSUPPORTED_SIGNATURES:
        if data.startswith(signature):
            return name
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    if data[4:12] in (b"ftypheic", b"ftypheix", b"ftypavif", b"ftypmif1"):
        return "HEIF/AVIF"
    return None


def media_type_of(content_type: str | None) -> str:
    """``'Image/PNG; charset=x'`` -> ``'image/png'``."""
    return (content_type or "").split(";", 1)[0].strip().lower()


def check_content_type(data: bytes, content_type: str | None) -> str:
    """The format to decode ``data`` as, after checking it against the declared content type.

    A missing or ``application/octet-stream`` type is sniffed; a declared image type must match the bytes; anything
    else (text, JSON, a form-encoded body, an unsupported image type) is a 415.
    """
    declared = media_type_of(content_type)
    if not data:
        raise RequestError(
            400,
            "empty request body: no image was sent",
            f"send the image bytes ({_SUPPORTED_TEXT}) as the body or as a multipart field 'file'",
        )
    actual = sniff(data)
    if declared in _SNIFF_ANY:
        pass
    elif declared in _DECLARED:
        if actual is not None and actual != _DECLARED[declared]:
            raise RequestError(
                415,
                f"Content-Type {declared} does not match the body, which is {actual.upper()}",
                f"send Content-Type {MEDIA_TYPES[actual]} (or application/octet-stream to let the "
                "server detect the format)",
            )
    elif declared.startswith("image/"):
        raise RequestError(
            415, f"unsupported image type {declared}", f"send {_SUPPORTED_TEXT}; convert other formats to PNG first"
        )
    else:
        hint = (
            " (curl --data-binary sends application/x-www-form-urlencoded unless told otherwise)"
            if declared == "application/x-www-form-urlencoded"
            else ""
        )
        raise RequestError(
            415,
            f"wrong Content-Type {declared}: expected an image{hint}",
            "send -H 'Content-Type: image/png' (or image/jpeg, image/tiff, application/dicom, "
            "application/octet-stream) with the raw bytes, or a multipart upload with "
            "-F file=@image.png",
        )
    if actual is None:
        other = _unsupported_name(data)
        if other:
            raise RequestError(
                415, f"unsupported image format {other}", f"send {_SUPPORTED_TEXT}; convert {other} to PNG first"
            )
        raise RequestError(
            415,
            "the body is not an image in a supported format (no PNG, JPEG, TIFF or DICOM signature)",
            f"send the file's bytes unchanged ({_SUPPORTED_TEXT}); do not base64- or form-encode them",
        )
    return actual


# --- decoding -------------------------------------------------------------------------------------------------------


def _too_many(width: int, height: int, max_pixels: int) -> None:
    if width <= 0 or height <= 0:
        raise RequestError(400, f"the image header gives an empty size {width}x{height}", "send a valid image")
    if width * height > max_pixels:
        raise RequestError(
            413,
            f"image of {width}x{height} = {width * height} pixels exceeds the limit of {max_pixels} pixels",
            "downscale or crop the image, or raise the server's max_pixels",
        )


def _corrupt(fmt: str, error: BaseException) -> RequestError:
    detail = str(error).strip() or type(error).__name__
    return RequestError(
        400,
        f"could not decode the {fmt.upper()} image (truncated or corrupt): {detail[:200]}",
        "send the complete, unmodified file",
    )


def decode(data: bytes, fmt: str, max_pixels: int, white_level: int | None = None) -> DecodedImage:
    """Decode ``data`` (format ``fmt`` from :func:`check_content_type`), checking the pixel count from the header
    first. ``white_level`` overrides the full-scale value of 16-bit PNG/TIFF input."""
    if fmt == "png":
        image = _decode_png(data, max_pixels)
    elif fmt == "jpeg":
        image = _decode_pillow(data, "jpeg", max_pixels)
    elif fmt == "tiff":
        image = _decode_tiff(data, max_pixels)
    elif fmt == "dicom":
        image = _decode_dicom(data, max_pixels)
    else:  # pragma: no cover - check_content_type only returns the formats above
        raise RequestError(415, f"unsupported format {fmt}", f"send {_SUPPORTED_TEXT}")
    if white_level is not None:
        if image.format == "dicom":
            raise RequestError(
                422,
                "white_level does not apply to DICOM input (its own rescale is used)",
                "leave out white_level for DICOM",
            )
        full_range = conventions.white_level(bit_depth=image.bit_depth)
        if not 1 <= white_level <= full_range:
            raise RequestError(
                422,
                f"white_level={white_level} is outside 1..{full_range} for a {image.bit_depth}-bit image",
                "give the stored value that means full scale",
            )
        image.white_level = white_level
    return image


def _split_alpha(array: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    if array.ndim == 2:
        return array[..., None], None
    if array.shape[2] in (2, 4):
        return array[..., :-1], array[..., -1]
    return array, None


def _key_alpha(pixels: np.ndarray, key: Any, maximum: int) -> np.ndarray | None:
    """Alpha from a PNG tRNS colour key: 0 where a pixel equals the key, ``maximum`` elsewhere."""
    key = np.asarray(key if isinstance(key, (tuple, list)) else (key,), dtype=np.int64).reshape(-1)
    if key.size != pixels.shape[2]:
        return None
    match = np.all(pixels == key.astype(pixels.dtype), axis=2)
    return np.where(match, 0, maximum).astype(pixels.dtype)


def _exif_bytes(exif: Any) -> bytes | None:
    """Pillow's ``info['exif']`` / an ``Image.Exif`` -> bytes starting with ``Exif\\0\\0`` (None when empty)."""
    if exif is None:
        return None
    if isinstance(exif, Image.Exif):
        return exif.tobytes() if len(exif) else None
    data = bytes(exif)
    if not data:
        return None
    return data if data.startswith(b"Exif\x00\x00") else b"Exif\x00\x00" + data


def _png_header(data: bytes) -> tuple[int, int, int, int]:
    """(width, height, bit depth, colour type) from the IHDR chunk, without decoding."""
    if len(data) < 33 or data[12:16] != b"IHDR":
        raise RequestError(
            400,
            "could not decode the PNG image (truncated or corrupt): no IHDR header",
            "send the complete, unmodified file",
        )
    width, height, depth, colour = struct.unpack(">IIBB", data[16:26])
    return width, height, depth, colour


_PNG_CHANNELS = {0: 1, 2: 3, 3: 4, 4: 2, 6: 4}  # by colour type; palette counts as RGBA, the most it decodes to


def read_header(data: bytes, fmt: str, max_pixels: int) -> ImageHeader:
    """Size, samples per pixel and bit depth from the header alone (no pixel is decoded), after the ``max_pixels``
    check: what the app needs to choose tiling, estimate the request's memory and take a large-image slot before it
    decodes."""
    if fmt == "png":
        width, height, depth, colour = _png_header(data)
        channels, bits = _PNG_CHANNELS.get(colour, 4), 16 if depth == 16 else 8
    elif fmt == "jpeg":
        try:
            with Image.open(io.BytesIO(data), formats=["JPEG"]) as image:
                width, height = image.size
                channels, bits = len(image.getbands()), 8
        except Image.DecompressionBombError as error:
            raise RequestError(
                413,
                f"image rejected as a decompression bomb: {error}",
                "downscale or crop the image, or raise the server's max_pixels",
            ) from None
        except Exception as error:  # noqa: BLE001
            raise _corrupt("jpeg", error) from None
    elif fmt == "tiff":
        import tifffile

        try:
            with tifffile.TiffFile(io.BytesIO(data)) as tif:
                page = tif.pages.first
                width, height = int(page.imagewidth), int(page.imagelength)
                # More than 4 samples are refused when decoding (415); the estimate counts what may be decoded.
                channels = min(max(int(page.samplesperpixel), 1), 4)
                bits = 16 if int(page.bitspersample) > 8 else 8
        except Exception as error:  # noqa: BLE001
            raise _corrupt("tiff", error) from None
    elif fmt == "dicom":
        ds = _read_dicom(data, stop_before_pixels=True)
        if "Rows" not in ds or "Columns" not in ds:
            return ImageHeader(0, 0, 1, 8)  # no image object: decode says what is missing (422)
        try:
            width, height = int(ds.Columns), int(ds.Rows)
            channels = 3 if int(ds.get("SamplesPerPixel", 1) or 1) == 3 else 1
            bits = 16 if int(ds.get("BitsAllocated", 16) or 16) > 8 else 8
        except Exception as error:  # noqa: BLE001
            raise _corrupt("dicom", error) from None
    else:  # pragma: no cover
        raise RequestError(415, f"unsupported format {fmt}", f"send {_SUPPORTED_TEXT}")
    _too_many(width, height, max_pixels)
    return ImageHeader(width, height, channels, bits)


def _decode_png(data: bytes, max_pixels: int) -> DecodedImage:
    width, height, depth, colour = _png_header(data)
    _too_many(width, height, max_pixels)
    if depth == 16 and colour in (2, 4, 6):
        # 16-bit RGB / gray+alpha / RGBA: Pillow would reduce them to 8 bits; pypng keeps all 16.
        import png

        try:
            w, h, flat, info = png.Reader(bytes=data).read_flat()
            array = np.frombuffer(flat, dtype=np.uint16).reshape(h, -1)
        except Exception as error:  # noqa: BLE001 - any decoder failure is a bad file
            raise _corrupt("png", error) from None
        planes = int(info["planes"])
        if array.shape != (h, w * planes):
            raise _corrupt("png", ValueError(f"decoded {array.shape}, expected {(h, w * planes)}"))
        pixels, alpha = _split_alpha(array.reshape(h, w, planes))
        notes = []
        if alpha is None and info.get("transparent") is not None:
            alpha = _key_alpha(pixels, info["transparent"], 65535)
            if alpha is not None:
                notes.append("the PNG tRNS colour key is returned as an alpha channel")
        try:  # metadata only: Pillow reads the chunks before IDAT (and eXIf after it) without decoding pixels
            with Image.open(io.BytesIO(data), formats=["PNG"]) as meta:
                icc, exif = meta.info.get("icc_profile"), meta.info.get("exif")
        except Exception:  # noqa: BLE001 - pypng decoded it; metadata is optional
            icc, exif = None, None
        return DecodedImage(
            "png",
            pixels,
            alpha,
            16,
            conventions.white_level(bit_depth=16),
            notes=notes,
            icc_profile=icc or None,
            exif=_exif_bytes(exif),
        )
    return _decode_pillow(data, "png", max_pixels)


def _decode_pillow(data: bytes, fmt: str, max_pixels: int) -> DecodedImage:
    try:
        image = Image.open(io.BytesIO(data), formats=[fmt.upper()])
        _too_many(image.width, image.height, max_pixels)
        image.load()
    except RequestError:
        raise
    except Image.DecompressionBombError as error:
        raise RequestError(
            413,
            f"image rejected as a decompression bomb: {error}",
            "downscale or crop the image, or raise the server's max_pixels",
        ) from None
    except Exception as error:  # noqa: BLE001 - truncated, corrupt, unsupported variant
        raise _corrupt(fmt, error) from None
    return _from_pillow(image, fmt)


_STRIP_ROWS = 256  # rows of a decoded image copied at a time


def _pillow_array(image: Image.Image) -> np.ndarray:
    """``np.asarray(image)`` without its full-size temporaries: Pillow's array interface goes through ``tobytes()``,
    which holds the packed pixels twice (a list of chunks and their join) next to Pillow's own copy. Strips of rows
    are copied into one preallocated array instead, so decoding peaks at Pillow's image plus the result."""
    width, height = image.size
    out: np.ndarray | None = None
    for top in range(0, height, _STRIP_ROWS):
        bottom = min(top + _STRIP_ROWS, height)
        strip = np.asarray(image.crop((0, top, width, bottom)))
        if out is None:
            out = np.empty((height, *strip.shape[1:]), strip.dtype)
        out[top:bottom] = strip
    return out if out is not None else np.asarray(image)


def _from_pillow(image: Image.Image, fmt: str) -> DecodedImage:
    notes: list[str] = []
    mode = image.mode
    icc = image.info.get("icc_profile") or None
    exif = _exif_bytes(image.info.get("exif"))
    if exif is None and fmt == "tiff":
        orientation = image.getexif().get(274)
        exif = _orientation_exif(orientation)
    key = image.info.get("transparency") if mode in ("L", "RGB", "I", "I;16", "I;16B") else None
    if mode == "1":
        image, mode = image.convert("L"), "L"
        notes.append("1-bit input is returned as 8-bit grayscale")
    elif mode in ("P", "PA"):
        has_alpha = mode == "PA" or "transparency" in image.info
        image = image.convert("RGBA" if has_alpha else "RGB")
        mode = image.mode
        notes.append(f"palette input is returned as {mode}")
    elif mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        notes.append(f"{mode} input is returned as RGB")
        image, mode = image.convert("RGB"), "RGB"
    if mode in ("L", "LA", "RGB", "RGBA"):
        pixels, alpha = _split_alpha(_pillow_array(image))
        if alpha is None and key is not None:
            alpha = _key_alpha(pixels, key, 255)
            if alpha is not None:
                notes.append("the PNG tRNS colour key is returned as an alpha channel")
        return DecodedImage(
            fmt, pixels, alpha, 8, conventions.white_level(bit_depth=8), notes=notes, icc_profile=icc, exif=exif
        )
    if mode.startswith("I;16") or mode == "I":
        array = _pillow_array(image)
        if array.size and (array.min() < 0 or array.max() > 65535):
            raise RequestError(
                415, f"{fmt.upper()} with 32-bit integer samples is not supported", "send 8- or 16-bit unsigned samples"
            )
        pixels = array.astype(np.uint16)[..., None]
        alpha = None if key is None else _key_alpha(pixels, key, 65535)
        if alpha is not None:
            notes.append("the PNG tRNS colour key is returned as an alpha channel")
        return DecodedImage(
            fmt, pixels, alpha, 16, conventions.white_level(bit_depth=16), notes=notes, icc_profile=icc, exif=exif
        )
    raise RequestError(
        415, f"{fmt.upper()} images of mode {mode} are not supported", "send 8- or 16-bit grayscale, RGB or RGBA"
    )


def _orientation_exif(orientation: Any) -> bytes | None:
    if orientation in (None, 1):
        return None
    exif = Image.Exif()
    exif[274] = int(orientation)
    return exif.tobytes()


# TIFF photometric interpretations (tifffile.PHOTOMETRIC): read as stored, or converted to RGB through Pillow.
_TIFF_DIRECT = {0: "MINISWHITE", 1: "MINISBLACK", 2: "RGB"}
_TIFF_VIA_PILLOW = {3: "PALETTE", 5: "SEPARATED (CMYK)", 6: "YCBCR"}
_TIFF_MAX_BYTES_PER_PIXEL = 4 * 2  # at most 4 samples of 16 bits


def _decode_tiff(data: bytes, max_pixels: int) -> DecodedImage:
    import tifffile

    try:
        tif = tifffile.TiffFile(io.BytesIO(data))
    except Exception as error:  # noqa: BLE001
        raise _corrupt("tiff", error) from None
    try:
        return _decode_tiff_page(tif, data, max_pixels)
    finally:
        tif.close()


def _decode_tiff_page(tif: Any, data: bytes, max_pixels: int) -> DecodedImage:
    try:
        pages = tif.pages
        page = pages.first
        many = len(pages) > 1
        height, width = int(page.imagelength), int(page.imagewidth)
        samples, depth = int(page.samplesperpixel), int(page.imagedepth)
        photometric = int(page.photometric)
    except Exception as error:  # noqa: BLE001
        raise _corrupt("tiff", error) from None
    _too_many(width, height, max_pixels)
    if many:
        raise RequestError(
            422, f"multi-page TIFF ({len(pages)} pages): one image per request", "send each page as its own request"
        )
    # Checked before anything is decoded: samples and depth multiply the pixel count (a 64x64 deflate TIFF with 1000
    # samples per pixel would decode to 470x its size).
    if not 1 <= samples <= 4 or depth != 1:
        raise RequestError(
            415,
            f"TIFF with {samples} samples per pixel and image depth {depth} is not supported",
            "send a 2-D gray, gray+alpha, RGB or RGBA image (1-4 samples per pixel, image depth 1)",
        )
    if photometric in _TIFF_VIA_PILLOW:
        name = _TIFF_VIA_PILLOW[photometric]
        try:
            image = _decode_pillow(data, "tiff", max_pixels)
        except RequestError as error:
            if error.status == 413:
                raise
            raise RequestError(
                415,
                f"TIFF with photometric interpretation {name} could not be converted to RGB ({error.error})",
                "send a gray or RGB TIFF, or a PNG",
            ) from None
        return image  # Pillow's conversion note says what it became
    if photometric not in _TIFF_DIRECT:
        try:
            name = tifffile_name(photometric)
        except Exception:  # noqa: BLE001
            name = str(photometric)
        raise RequestError(
            415,
            f"TIFF with photometric interpretation {name} is not supported",
            "send a MINISBLACK (gray), RGB, palette or CMYK TIFF, or a PNG",
        )
    colour = 3 if photometric == 2 else 1
    if samples not in (colour, colour + 1):
        raise RequestError(
            415,
            f"TIFF {_TIFF_DIRECT[photometric]} with {samples} samples per pixel is not supported",
            "send gray (1 sample), gray+alpha (2), RGB (3) or RGBA (4)",
        )
    try:
        dtype = np.dtype(page.dtype)
        nbytes = int(page.nbytes)
    except Exception as error:  # noqa: BLE001
        raise _corrupt("tiff", error) from None
    if dtype not in (np.uint8, np.uint16):
        raise RequestError(415, f"TIFF with {dtype} samples is not supported", "send 8- or 16-bit unsigned samples")
    if nbytes > max_pixels * _TIFF_MAX_BYTES_PER_PIXEL:
        raise RequestError(
            413,
            f"TIFF would decode to {nbytes} bytes, above the limit of {max_pixels * _TIFF_MAX_BYTES_PER_PIXEL} bytes",
            "send a smaller image",
        )
    try:
        array = page.asarray()
    except KeyError as error:  # a compression tifffile cannot decode without imagecodecs: try Pillow
        try:
            image = _decode_pillow(data, "tiff", max_pixels)
        except RequestError:
            raise RequestError(
                415,
                f"TIFF compression not supported: {error}",
                "send an uncompressed, deflate- or LZW-compressed TIFF, or a PNG",
            ) from None
        if photometric == 0:  # Pillow reads MINISWHITE as stored as well
            image.pixels = np.iinfo(image.pixels.dtype).max - image.pixels
            image.notes.append("MINISWHITE input is returned as MINISBLACK (inverted: it displays the same)")
        return image
    except Exception as error:  # noqa: BLE001
        raise _corrupt("tiff", error) from None
    if array.ndim == 3 and page.planarconfig == 2 and array.shape[0] == samples:  # planar (separate) samples
        array = np.moveaxis(array, 0, -1)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if array.shape[:2] != (height, width) or array.ndim not in (2, 3):
        raise RequestError(
            415,
            f"TIFF of shape {page.shape} ({page.axes}) is not supported",
            "send a gray, gray+alpha, RGB or RGBA image",
        )
    pixels, alpha = _split_alpha(np.ascontiguousarray(array))
    bits = 8 if dtype == np.uint8 else 16
    notes = []
    if photometric == 0:
        pixels = (2**bits - 1) - pixels
        notes.append("MINISWHITE input is returned as MINISBLACK (inverted: it displays the same)")
    icc = page.tags.get(34675)
    orientation = page.tags.get(274)
    return DecodedImage(
        "tiff",
        pixels,
        alpha,
        bits,
        conventions.white_level(bit_depth=bits),
        notes=notes,
        icc_profile=bytes(icc.value) if icc is not None else None,
        exif=_orientation_exif(orientation.value if orientation is not None else None),
    )


def tifffile_name(photometric: int) -> str:
    import tifffile

    return tifffile.PHOTOMETRIC(photometric).name


def _read_dicom(data: bytes, stop_before_pixels: bool = False) -> Any:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(io.BytesIO(data), stop_before_pixels=stop_before_pixels)
    except InvalidDicomError as error:
        raise RequestError(415, f"not a DICOM file: {error}", "send a DICOM Part 10 file") from None
    except Exception as error:  # noqa: BLE001
        raise _corrupt("dicom", error) from None


def _decode_dicom(data: bytes, max_pixels: int) -> DecodedImage:
    ds = _read_dicom(data)
    if "PixelData" not in ds:
        raise RequestError(
            422,
            "the DICOM file has no pixel data (not an image object)",
            "send an image object (CT, MR, CR, DX, NM, US, SC, ...)",
        )
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        samples = int(ds.get("SamplesPerPixel", 1))
        bits = int(ds.BitsAllocated)
    except Exception as error:  # noqa: BLE001
        raise _corrupt("dicom", error) from None
    _too_many(cols, rows, max_pixels)
    if frames > 1:
        raise RequestError(
            422,
            f"multi-frame DICOM ({frames} frames): one frame per request",
            "send a single-frame object (split the series into frames)",
        )
    if samples not in (1, 3) or bits not in (8, 16):
        raise RequestError(
            415, f"DICOM with {samples} samples of {bits} bits is not supported", "send 8- or 16-bit grayscale or RGB"
        )
    try:
        raw = ds.pixel_array
    except Exception as error:  # noqa: BLE001 - truncated pixel data, missing codec
        text = str(error)
        if "plugin" in text.lower() or "decoder" in text.lower() or "handler" in text.lower():
            raise RequestError(
                415,
                f"cannot decode this DICOM transfer syntax "
                f"({ds.file_meta.get('TransferSyntaxUID', '?')}): {text[:200]}",
                "send an uncompressed DICOM (Explicit VR Little Endian)",
            ) from None
        raise _corrupt("dicom", error) from None
    if raw.shape[:2] != (rows, cols):
        raise _corrupt("dicom", ValueError(f"pixel array {raw.shape} does not match Rows x Columns {rows}x{cols}"))
    mapping: dict[str, Any] = {"dtype": str(raw.dtype), "samples": samples}
    if bits == 8:
        stored = raw.astype(np.uint8)
        white = conventions.white_level(bit_depth=8)
        mapping["kind"] = "identity8"
    elif str(ds.get("Modality", "")).upper() == "CT" and "RescaleIntercept" in ds:
        slope = float(ds.get("RescaleSlope", 1) or 1)
        intercept = float(ds.RescaleIntercept)
        stored = np.empty(raw.shape, np.uint16)
        outside = np.empty(raw.shape, bool)
        for top in range(0, rows, _STRIP_ROWS):  # HU in float64 a strip at a time, not a full-size float64 copy
            hu = raw[top : top + _STRIP_ROWS].astype(np.float64) * slope + intercept
            stored[top : top + _STRIP_ROWS], outside[top : top + _STRIP_ROWS] = conventions.hu_to_stored_and_outside(hu)
        if outside.any():  # padding (-2000/-3024 HU) or metal: the DICOM out gives these pixels back unchanged
            mapping["outside"] = (outside, raw[outside])
        white = conventions.MEDICAL_WHITE
        mapping.update(kind="ct", slope=slope, intercept=intercept)
    else:
        lo = min(0, int(raw.min()))
        hi = max(int(raw.max()), lo + 1)
        stored = (raw.astype(np.int64) - lo).astype(np.uint16)
        white = hi - lo
        mapping.update(kind="range", lo=lo)
    pixels = stored[..., None] if stored.ndim == 2 else stored
    notes = (
        [f"CT values are returned as HU + {conventions.CT_OFFSET} in [0, {conventions.MEDICAL_WHITE}]"]
        if mapping["kind"] == "ct"
        else []
    )
    return DecodedImage("dicom", pixels, None, bits, white, dicom=ds, dicom_map=mapping, notes=notes)


# --- encoding -------------------------------------------------------------------------------------------------------

#: Pixels quantised (and PNG-filtered) at a time: the encoder's float and filter temporaries stay a few MB whatever
#: the image's size.
_CHUNK_PIXELS = 1 << 14


def to_gray_or_rgb(restored: np.ndarray, channels: int) -> np.ndarray:
    """(3, H, W) network output -> a new (H, W, channels) float32 array: grayscale input (replicated to 3 channels
    on the way in) gets the mean of the three restored channels (computed in float32). ``restored`` is not modified."""
    hwc = restored.transpose(1, 2, 0)
    if channels == 1:
        return hwc.mean(axis=2, keepdims=True, dtype=np.float32)
    return np.array(hwc, dtype=np.float32)


def _quantise_into(values: np.ndarray, scale: int, bits: int, out: np.ndarray) -> None:
    """[0, 1] floats -> integers of ``bits`` written to ``out``, all in float32 (exact enough: scale <= 65535 leaves
    8 bits below the rounding point). ``values`` is overwritten."""
    np.clip(values, 0.0, 1.0, out=values)
    values *= np.float32(scale)
    np.rint(values, out=values)
    np.clip(values, 0, 2**bits - 1, out=values)
    out[...] = values


def _convert_alpha(alpha: np.ndarray, bits: int) -> np.ndarray:
    """Alpha at another bit depth: 8 -> 16 bits is x 257 (exact), 16 -> 8 bits rounds to the nearest (257 is odd,
    so no value falls halfway), in integers."""
    if bits == 16 and alpha.dtype == np.uint8:
        return alpha.astype(np.uint16) * 257
    if bits == 8 and alpha.dtype == np.uint16:
        return ((alpha.astype(np.uint32) + 128) // 257).astype(np.uint8)
    return alpha


_ALIASES = {"jpg": "jpeg", "tif": "tiff"}


def output_format(fmt: str, bit_depth: int | None) -> str:
    """The output format ``fmt`` names (``jpg``/``tif`` accepted), after the checks that need no input: known format,
    bit depth 8 or 16, JPEG only at 8 bits. 422 otherwise."""
    name = _ALIASES.get(fmt.lower(), fmt.lower())
    if name not in FORMATS_OUT:
        raise RequestError(422, f"unknown output format {fmt!r}", f"choose one of {', '.join(FORMATS_OUT)}")
    if bit_depth is not None and bit_depth not in (8, 16):
        raise RequestError(422, f"bit_depth={bit_depth} is not supported", "choose bit_depth 8 or 16")
    if name == "jpeg" and bit_depth == 16:
        raise RequestError(
            422,
            "JPEG holds 8 bits per sample, bit_depth=16 was asked",
            "ask format=png or format=tiff for 16 bits, or bit_depth=8",
        )
    return name


def check_output(fmt: str, bit_depth: int | None, source_format: str, source_bit_depth: int | None = None) -> str:
    """:func:`output_format` plus the checks that need the input's format (known once the body is sniffed) and bit
    depth (known after decoding): DICOM output only for DICOM input, at the input's bit depth."""
    name = output_format(fmt, bit_depth)
    if name == "dicom" and source_format != "dicom":
        raise RequestError(
            422, "format=dicom needs DICOM input (the header is taken from it)", "ask format=png or format=tiff"
        )
    if name == "dicom" and None not in (bit_depth, source_bit_depth) and bit_depth != source_bit_depth:
        raise RequestError(422, "format=dicom keeps the input's bit depth", "leave out bit_depth for DICOM output")
    return name


def _icc_for(icc: bytes | None, colour_channels: int) -> bytes | None:
    """The ICC profile when its colour space (header bytes 16-20) fits the output: GRAY for 1, RGB for 3 channels."""
    if not icc or len(icc) < 20:
        return None
    return icc if icc[16:20] == (b"GRAY" if colour_channels == 1 else b"RGB ") else None


class OutputWriter:
    """The restoration of ``source`` written like ``source`` (same size, channel count with alpha passed through,
    bit depth and value scale unless ``bit_depth`` says otherwise; EXIF and a matching ICC profile) as ``fmt``, from
    rows of the network's (3, n, W) output in [0, 1] that arrive top to bottom as they become final (tiled
    restoration finishes a strip of rows at a time).

    Rows are quantised a chunk at a time in float32 (no full-size float or float64 copy). PNG, the default, is
    filtered and compressed as rows arrive, so no full-size output array exists at all; JPEG, TIFF and DICOM fill one
    integer array of the output's size, which their encoders need whole. :meth:`finish` returns the file."""

    def __init__(self, source: DecodedImage, fmt: str = "png", bit_depth: int | None = None) -> None:
        self.source = source
        self.format = check_output(fmt, bit_depth, source.format, source.bit_depth)
        self.notes = [n for n in source.notes if not (self.format == "dicom" and n.startswith("CT values"))]
        if bit_depth is None:
            self.bits = 8 if self.format == "jpeg" else source.bit_depth
            if self.format == "jpeg" and source.bit_depth == 16:
                self.notes.append("JPEG holds 8 bits: the 16-bit input is returned at 8 bits")
        else:
            self.bits = bit_depth
        # the source's own white level at its own depth; at another depth the full range of that depth
        self.scale = (
            source.white_level if self.bits == source.bit_depth else conventions.white_level(bit_depth=self.bits)
        )
        self.alpha = source.alpha
        if self.format == "jpeg" and self.alpha is not None:
            self.notes.append("JPEG has no alpha channel: the input's alpha is dropped")
            self.alpha = None
        self.colour = source.colour_channels
        self.channels = self.colour + (self.alpha is not None)
        self.dtype = np.dtype(np.uint8 if self.bits == 8 else np.uint16)
        self.icc = _icc_for(source.icc_profile, self.colour)
        self.height, self.width = source.height, source.width
        self.row = 0  # rows written so far
        self._png: _PngWriter | None = None
        self.values: np.ndarray | None = None
        if self.format == "png":
            self._png = _PngWriter(self.width, self.height, self.channels, self.bits, self.icc, source.exif)
        else:
            self.values = np.empty((self.height, self.width, self.channels), self.dtype)

    def write(self, top: int, rows: Any) -> None:
        """Rows ``top .. top + n`` of the restoration, (3, n, W) floats in [0, 1] (a NumPy array or a CPU tensor);
        rows must arrive in order, without gaps. ``rows`` is not modified."""
        array = np.asarray(rows)
        if top != self.row:
            raise ValueError(f"rows from {top} written after {self.row} rows: write them top to bottom, without gaps")
        if array.ndim != 3 or array.shape[0] != 3 or array.shape[2] != self.width:
            raise ValueError(f"rows of shape {array.shape}, expected (3, n, {self.width})")
        n = int(array.shape[1])
        if top + n > self.height:
            raise ValueError(f"rows {top}..{top + n} exceed the image's {self.height} rows")
        step = max(1, _CHUNK_PIXELS // self.width)
        for start in range(0, n, step):
            quantised = self._quantised(array[:, start : start + step], top + start)
            if self._png is not None:
                self._png.write(quantised)
            else:
                assert self.values is not None
                self.values[top + start : top + start + quantised.shape[0]] = quantised
        self.row += n

    def _quantised(self, chunk: np.ndarray, top: int) -> np.ndarray:
        m = int(chunk.shape[1])
        out = np.empty((m, self.width, self.channels), self.dtype)
        work = to_gray_or_rgb(chunk, self.colour)  # a chunk-sized copy: ``rows`` stays untouched
        _quantise_into(work, self.scale, self.bits, out[..., : self.colour])
        if self.alpha is not None:
            out[..., self.colour] = _convert_alpha(self.alpha[top : top + m], self.bits)
        return out

    def finish(self) -> tuple[bytes, dict[str, Any]]:
        """(file bytes, description with media_type, format, width, height, channels, bit_depth, notes), once every
        row has been written."""
        if self.row != self.height:
            raise RuntimeError(f"{self.row} of {self.height} rows were written")
        if self._png is not None:
            data = self._png.finish()
        else:
            values, self.values = self.values, None
            assert values is not None
            if self.format == "jpeg":
                buffer = io.BytesIO()
                extra = {k: v for k, v in (("icc_profile", self.icc), ("exif", self.source.exif)) if v}
                Image.fromarray(values[..., 0] if self.channels == 1 else values).save(
                    buffer, format="JPEG", quality=95, **extra
                )
                data = buffer.getvalue()
            elif self.format == "tiff":
                data = _encode_tiff(values, self.icc, self.source.exif)
            else:
                data = _encode_dicom(values, self.source)
        described = {
            "media_type": MEDIA_TYPES[self.format],
            "format": self.format,
            "width": self.width,
            "height": self.height,
            "channels": self.channels,
            "bit_depth": self.bits,
            "notes": self.notes,
        }
        return data, described


def encode(
    restored: np.ndarray, source: DecodedImage, fmt: str = "png", bit_depth: int | None = None
) -> tuple[bytes, dict[str, Any]]:
    """Write the restoration ``restored`` ((3, H, W) float in [0, 1]) like ``source`` in one piece (see
    :class:`OutputWriter`, which also takes it a strip of rows at a time). ``restored`` is not modified.

    Returns (bytes, description with media_type, format, width, height, channels, bit_depth, notes)."""
    writer = OutputWriter(source, fmt, bit_depth)
    writer.write(0, restored)
    return writer.finish()


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)


def _png_filter(raw: np.ndarray, previous: np.ndarray, bpp: int) -> np.ndarray:
    """PNG scanlines (n, 1 + L) of raw rows (n, L) whose row above the first is ``previous`` (zeros at the top):
    each row gets the filter (None, Sub, Up, Average, Paeth) whose output has the smallest sum of absolute values as
    signed bytes, the adaptive heuristic the PNG specification recommends (section 12.8)."""
    n, length = raw.shape
    x = raw.astype(np.int16)
    b = np.empty_like(x)  # the byte above
    b[0] = previous
    b[1:] = x[:-1]
    a = np.zeros_like(x)  # the byte bpp to the left
    a[:, bpp:] = x[:, :-bpp]
    c = np.zeros_like(x)  # the byte above that one
    c[:, bpp:] = b[:, :-bpp]
    pa, pb, pc = np.abs(b - c), np.abs(a - c), np.abs(a + b - 2 * c)
    paeth = np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))
    filtered = np.stack([x, x - a, x - b, x - ((a + b) >> 1), x - paeth])
    filtered &= 0xFF
    cost = np.minimum(filtered, 256 - filtered).sum(axis=2, dtype=np.int64)  # |byte| read as a signed byte
    choice = cost.argmin(axis=0)
    out = np.empty((n, length + 1), np.uint8)
    out[:, 0] = choice
    out[:, 1:] = filtered[choice, np.arange(n)]
    return out


class _PngWriter:
    """A PNG (8 or 16 bits, 1-4 channels) written from rows that arrive top to bottom: each batch of rows is
    filtered and compressed at once (zlib level 1, as Pillow's ``compress_level=1`` before), so only the compressed
    stream grows. iCCP and eXIf go right after IHDR (before IDAT, as the PNG specification wants)."""

    _COLOUR_TYPES = {1: 0, 2: 4, 3: 2, 4: 6}  # channels -> gray, gray+alpha, RGB, RGBA

    def __init__(
        self, width: int, height: int, channels: int, bits: int, icc: bytes | None = None, exif: bytes | None = None
    ) -> None:
        self.width, self.height, self.channels, self.bits = width, height, channels, bits
        self.bpp = channels * (bits // 8)
        ihdr = struct.pack(">IIBBBBB", width, height, bits, self._COLOUR_TYPES[channels], 0, 0, 0)
        self.parts = [b"\x89PNG\r\n\x1a\n", _png_chunk(b"IHDR", ihdr)]
        if icc:
            self.parts.append(_png_chunk(b"iCCP", b"ICC profile\x00\x00" + zlib.compress(icc)))
        if exif:
            self.parts.append(_png_chunk(b"eXIf", exif[6:] if exif.startswith(b"Exif\x00\x00") else exif))
        self.compressor = zlib.compressobj(1)
        self.previous = np.zeros(width * self.bpp, np.uint8)
        self.rows = 0

    def write(self, values: np.ndarray) -> None:
        """Rows (n, W, channels) of uint8 (8 bits) or uint16 (16 bits), filtered and compressed in one piece: callers
        pass at most ``_CHUNK_PIXELS // width`` rows at a time, which bounds the filter's temporaries."""
        big_endian = values.astype(">u2" if self.bits == 16 else np.uint8, copy=False)
        raw = np.ascontiguousarray(big_endian).view(np.uint8).reshape(values.shape[0], self.width * self.bpp)
        compressed = self.compressor.compress(_png_filter(raw, self.previous, self.bpp))
        if compressed:
            self.parts.append(_png_chunk(b"IDAT", compressed))
        self.previous = raw[-1].copy()
        self.rows += values.shape[0]

    def finish(self) -> bytes:
        if self.rows != self.height:
            raise RuntimeError(f"{self.rows} of {self.height} PNG rows were written")
        self.parts.append(_png_chunk(b"IDAT", self.compressor.flush()))
        self.parts.append(_png_chunk(b"IEND", b""))
        data = b"".join(self.parts)
        self.parts = []
        return data


def _encode_png(values: np.ndarray, bits: int, icc: bytes | None = None, exif: bytes | None = None) -> bytes:
    """(H, W, C) integers as a PNG of ``bits`` bits."""
    writer = _PngWriter(values.shape[1], values.shape[0], values.shape[2], bits, icc, exif)
    step = max(1, _CHUNK_PIXELS // writer.width)
    for start in range(0, values.shape[0], step):
        writer.write(values[start : start + step])
    return writer.finish()


def _encode_tiff(values: np.ndarray, icc: bytes | None = None, exif: bytes | None = None) -> bytes:
    import tifffile

    channels = values.shape[2]
    extra: dict[str, Any] = {}
    if icc:
        extra["iccprofile"] = icc
    if exif:
        parsed = Image.Exif()
        parsed.load(exif)
        orientation = parsed.get(274)
        if orientation not in (None, 1):
            extra["extratags"] = [(274, "H", 1, int(orientation), True)]
    buffer = io.BytesIO()
    if channels == 1:
        tifffile.imwrite(buffer, values[..., 0], photometric="minisblack", **extra)
    elif channels == 2:
        tifffile.imwrite(
            buffer, values, photometric="minisblack", planarconfig="contig", extrasamples=["unassalpha"], **extra
        )
    elif channels == 3:
        tifffile.imwrite(buffer, values, photometric="rgb", **extra)
    else:
        tifffile.imwrite(buffer, values, photometric="rgb", extrasamples=["unassalpha"], **extra)
    return buffer.getvalue()


def _stored_range(ds: Any, dtype: np.dtype) -> tuple[int, int]:
    """The values ``BitsStored`` and ``PixelRepresentation`` allow (within ``dtype``'s range)."""
    info = np.iinfo(dtype)
    bits = int(ds.get("BitsStored", info.bits) or info.bits)
    if int(ds.get("PixelRepresentation", 1 if info.min < 0 else 0) or 0) == 1:
        lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    else:
        lo, hi = 0, 2**bits - 1
    return max(lo, int(info.min)), min(hi, int(info.max))


def _encode_dicom(values: np.ndarray, source: DecodedImage) -> bytes:
    from pydicom.uid import ExplicitVRLittleEndian

    ds = source.dicom.copy()
    mapping = source.dicom_map
    dtype = np.dtype(mapping["dtype"])
    lo, hi = _stored_range(ds, dtype)
    gray = values.shape[2] == 1
    raw = np.empty(values.shape[:2] if gray else values.shape, dtype)
    outside, original = mapping.get("outside", (None, None))
    taken = 0  # how many of the original outside values (row-major, like the mask) earlier strips used
    for top in range(0, values.shape[0], _STRIP_ROWS):  # float64 a strip at a time, not a full-size copy
        stored = values[top : top + _STRIP_ROWS].astype(np.float64)
        if mapping["kind"] == "ct":
            part = (conventions.stored_to_hu(stored) - mapping["intercept"]) / mapping["slope"]
        elif mapping["kind"] == "range":
            part = stored + mapping["lo"]
        else:
            part = stored
        if gray:
            part = part[..., 0]
        if outside is not None:  # outside the model's HU range: the original raw value, not the clipped restoration
            mask = outside[top : top + _STRIP_ROWS]
            count = int(mask.sum())
            part[mask] = original[taken : taken + count]
            taken += count
        raw[top : top + _STRIP_ROWS] = np.clip(np.rint(part), lo, hi)
    photometric = "RGB" if raw.ndim == 3 else str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    if photometric not in ("MONOCHROME1", "MONOCHROME2", "RGB"):
        photometric = "MONOCHROME2"
    ds.set_pixel_data(
        raw, photometric_interpretation=photometric, bits_stored=int(ds.get("BitsStored", raw.itemsize * 8))
    )
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
