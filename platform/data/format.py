"""The dataset format: sample keys, the per-sample record, image encoding (PNG at stored bit depth) and the
manifest (``manifest.json``) that lists a dataset's shards and counts.

See :mod:`datprl.platform.data.shards` for the layout of a dataset and the shard writers and readers.
"""

from __future__ import annotations

import hashlib
import io
import re
import sys
from datetime import datetime
from typing import Any, Literal

import numpy as np
import pyarrow.fs as pafs
from PIL import Image, ImageFile
from pydantic import BaseModel, ConfigDict, Field, field_validator

from datprl.platform import storage
from datprl.platform.storage import S3Settings

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "Domain",
    "Split",
    "SampleRecord",
    "UnsupportedImageError",
    "ImageDecodeError",
    "encode_image",
    "decode_image",
    "validate_key",
    "sanitize_key",
    "ShardEntry",
    "CountEntry",
    "Manifest",
    "default_package_versions",
    "write_manifest",
    "read_manifest",
    "verify_manifest",
    "manifest_shard_urls",
    "manifest_dir",
    "manifest_url",
    "shard_urls",
]

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
MEMBERS = ("json", "lq.png", "gt.png")  # member extensions of one sample, in the order they are written

Domain = Literal["natural", "medical", "remote_sensing"]
Split = Literal["train", "val", "test"]
SPLITS: tuple[str, ...] = ("train", "val", "test")

_KEY = re.compile(r"^[A-Za-z0-9_-]{1,200}$")


# --- keys ---------------------------------------------------------------------------------------------------------


def validate_key(key: str) -> str:
    """Return ``key`` if it is a valid sample key (1-200 chars of ``[A-Za-z0-9_-]``), else raise ValueError."""
    if not isinstance(key, str) or not _KEY.match(key):
        raise ValueError(
            f"invalid sample key {key!r}: use 1-200 characters of [A-Za-z0-9_-] (no dots: WebDataset splits member "
            "names at the first dot; no slashes)"
        )
    return key


def sanitize_key(text: str) -> str:
    """Map arbitrary text (a source file name, say) to a valid key by replacing disallowed characters with '_'."""
    key = re.sub(r"[^A-Za-z0-9_-]", "_", text)[:200]
    return validate_key(key or "_")


# --- the per-sample record ----------------------------------------------------------------------------------------


class SampleRecord(BaseModel):
    """Metadata stored as ``{key}.json`` next to each image pair. ``height``/``width``/``channels``/``bit_depth``
    describe the clean image (``gt``); the degraded one (``lq``) has the same channels and bit depth."""

    model_config = ConfigDict(extra="forbid")

    key: str
    domain: Domain
    task: str = Field(min_length=1, description="degradation task, e.g. 'denoise_sigma25'")
    split: Split
    source_id: str = Field(description="identifier of the clean image within its source package")
    source_package: str = Field(description="where the clean image came from, e.g. 'scikit-image==0.24.0'")
    source_group: str | None = Field(
        None, description="the scene, volume or photo set the clean image was cut from (splits keep a group together)"
    )
    degradation: dict[str, Any] = Field(description="degradation parameters, including its seed")
    seed: int
    bit_depth: Literal[8, 16]
    channels: Literal[1, 3]
    units: str | None = Field(None, description="physical unit of pixel values, e.g. 'HU'")
    to_physical: dict[str, Any] | None = Field(None, description="how to map stored values to `units`")
    simulated: bool = Field(False, description="clean image itself simulated (e.g. a phantom), not measured")
    height: int = Field(gt=0)
    width: int = Field(gt=0)
    white_level: int | None = Field(
        None,
        gt=0,
        description="stored value that maps to 1.0 at the model input "
        "(default: 2**bit_depth - 1; 4095 for 12-bit scans stored as 16-bit)",
    )
    modality: str | None = Field(None, description="acquisition kind of the clean image, e.g. 'ct', 'mr', 'photo'")
    tile: tuple[int, int] | None = Field(None, description="top-left (row, col) of the tile within the source image")

    @field_validator("key")
    @classmethod
    def _check_key(cls, value: str) -> str:
        return validate_key(value)


# --- images -------------------------------------------------------------------------------------------------------


def _bit_depth(dtype: np.dtype) -> int | None:
    """8 for uint8, 16 for uint16 of either byte order, else None."""
    dtype = np.dtype(dtype)
    return {1: 8, 2: 16}.get(dtype.itemsize) if dtype.kind == "u" else None


class UnsupportedImageError(ValueError):
    """An array this format cannot store losslessly (dtype or channel layout)."""


class ImageDecodeError(ValueError):
    """Bytes that are not a PNG written by :func:`encode_image`."""


def encode_image(array: np.ndarray, compress_level: int = 6) -> tuple[str, bytes]:
    """Encode an image array losslessly as PNG; returns ``("png", data)``.

    Accepts uint8 ``(H, W)``, ``(H, W, 1)`` or ``(H, W, 3)`` and uint16 ``(H, W)`` or ``(H, W, 1)``.
    """
    array = np.asarray(array)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] != 3):
        raise UnsupportedImageError(f"expected an (H, W), (H, W, 1) or (H, W, 3) image, got shape {array.shape}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise UnsupportedImageError(f"empty image of shape {array.shape}")
    depth = _bit_depth(array.dtype)
    if depth == 8:
        mode = "L" if array.ndim == 2 else "RGB"
    elif depth == 16:
        if array.ndim == 3:
            raise UnsupportedImageError(
                "16-bit 3-channel images are not supported: PIL cannot write 16-bit RGB PNG. Store 16-bit data as "
                "single-channel images, or convert to 8-bit RGB (as the remote-sensing source does)."
            )
        mode = "I;16"
    else:
        raise UnsupportedImageError(f"unsupported dtype {array.dtype}: images must be uint8 or uint16")
    # Native little-endian layout, which PIL maps to mode L / RGB / I;16 (it writes PNG's big-endian samples itself).
    array = np.ascontiguousarray(array, dtype="<u2" if mode == "I;16" else np.uint8)
    image = Image.fromarray(array)
    if image.mode != mode:  # pragma: no cover - guards against a change in PIL's dtype -> mode mapping
        raise UnsupportedImageError(f"PIL chose mode {image.mode!r} for {array.dtype} {array.shape}, expected {mode}")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=compress_level)
    return "png", buffer.getvalue()


_MODES = {"L": np.uint8, "RGB": np.uint8, "I;16": np.uint16, "I;16B": np.uint16, "I;16L": np.uint16}


def decode_image(data: bytes) -> np.ndarray:
    """Decode bytes from :func:`encode_image` to a uint8/uint16 array, ``(H, W)`` or ``(H, W, 3)``.

    Raises :class:`ImageDecodeError` for anything else (not a PNG, truncated or damaged data, another pixel mode).
    """
    try:
        with Image.open(io.BytesIO(data), formats=["PNG"]) as image:
            if ImageFile.LOAD_TRUNCATED_IMAGES:
                # Someone switched PIL's truncation tolerance on globally; check chunk integrity ourselves.
                image.verify()
                image = Image.open(io.BytesIO(data), formats=["PNG"])
            image.load()
            mode = image.mode
            if mode == "I":  # 16-bit grey PNG opened as 32-bit by older Pillow versions
                array = np.asarray(image)
                if array.size and (array.min() < 0 or array.max() > 65535):
                    raise ImageDecodeError("16-bit image with values outside 0..65535")
                return array.astype(np.uint16)
            if mode not in _MODES:
                raise ImageDecodeError(f"unexpected PNG pixel mode {mode!r} (expected one of {sorted(_MODES)})")
            array = np.array(image)
    except ImageDecodeError:
        raise
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, zlib.error, ... for damaged data
        raise ImageDecodeError(f"{type(exc).__name__}: {exc}") from exc
    return array.astype(_MODES[mode], copy=False) if array.dtype != _MODES[mode] else array


# --- manifest -----------------------------------------------------------------------------------------------------


class ShardEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str = Field(description="relative to the manifest's directory, '/'-separated")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    samples: int = Field(ge=0)
    bytes: int = Field(ge=0)
    split: Split

    @field_validator("path")
    @classmethod
    def _relative(cls, value: str) -> str:
        if not value or value.startswith("/") or "\\" in value or "://" in value or ".." in value.split("/"):
            raise ValueError(f"shard path {value!r} must be relative to the manifest, '/'-separated, without '..'")
        return value


class CountEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    domain: Domain
    task: str
    split: Split
    samples: int = Field(ge=0)


class Manifest(BaseModel):
    """``manifest.json``: the complete list of a dataset's shards with checksums, and per-(domain, task, split)
    sample counts, plus how the dataset was built."""

    model_config = ConfigDict(extra="forbid")

    format_version: int = FORMAT_VERSION
    name: str
    created_at: datetime
    command: list[str] = Field(description="the argv that built the dataset")
    package_versions: dict[str, str]
    shards: list[ShardEntry]
    counts: list[CountEntry]
    metadata: dict[str, Any] = Field(default_factory=dict, description="free-form build details (sources, licences)")

    @field_validator("format_version")
    @classmethod
    def _supported(cls, value: int) -> int:
        if value != FORMAT_VERSION:
            raise ValueError(f"manifest format_version {value} is not supported (this code reads {FORMAT_VERSION})")
        return value

    def shard_paths(self, split: str | None = None) -> list[str]:
        return [s.path for s in self.shards if split is None or s.split == split]

    def samples(self, split: str | None = None) -> int:
        return sum(s.samples for s in self.shards if split is None or s.split == split)


#: The packages whose versions determine the bytes of a dataset build.
BUILD_PACKAGES = ("datprl-ir", "numpy", "pillow", "scikit-image", "pydantic", "pyarrow", "s3fs", "webdataset", "ray")


def default_package_versions(names: tuple[str, ...] = BUILD_PACKAGES) -> dict[str, str]:
    """Versions of the packages ``names`` (by default those that determine the bytes of a build) and Python's;
    packages that are not installed are left out."""
    from importlib import metadata

    versions = {"python": sys.version.split()[0]}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def manifest_url(url: str) -> str:
    """The manifest file of a dataset folder or prefix (or ``url`` itself when it names a .json file)."""
    return str(url) if str(url).endswith(".json") else storage.join_url(url, MANIFEST_NAME)


def manifest_dir(url: str) -> str:
    """The folder or prefix that a dataset's shard paths are relative to."""
    text = str(url)
    if not text.endswith(".json"):
        return text
    if storage.is_s3(text):
        return text.rsplit("/", 1)[0]
    import os

    return os.path.dirname(storage._local_path(text))


def write_manifest(url: str, manifest: Manifest, s3: S3Settings | None = None) -> str:
    """Write ``manifest`` atomically as ``{url}/manifest.json`` (or to ``url`` itself if it ends in .json)."""
    target = manifest_url(url)
    storage.atomic_write_bytes(target, manifest.model_dump_json(indent=2).encode("utf-8") + b"\n", s3)
    return target


def read_manifest(url: str, s3: S3Settings | None = None) -> Manifest:
    return Manifest.model_validate_json(storage.read_bytes(manifest_url(url), s3))


def shard_urls(url: str, manifest: Manifest, split: str | None = None) -> list[str]:
    """Full URLs of the shards (of one split, or all) that ``manifest``, read from ``url``, lists, in its order."""
    root = manifest_dir(url)
    return [storage.join_url(root, path) for path in manifest.shard_paths(split)]


def manifest_shard_urls(url: str, split: str | None = None, s3: S3Settings | None = None) -> list[str]:
    """Full URLs of the manifest's shards (of one split, or all), in manifest order."""
    return shard_urls(url, read_manifest(url, s3), split)


def verify_manifest(url: str, s3: S3Settings | None = None) -> list[str]:
    """Check every shard listed in the manifest exists with the recorded size and sha256 (read in a stream).
    Returns a list of problems, empty when the dataset is intact."""
    manifest = read_manifest(url, s3)
    root = manifest_dir(url)
    problems: list[str] = []
    for entry in manifest.shards:
        shard_url = storage.join_url(root, entry.path)
        fs, path = storage.filesystem(shard_url, s3)
        info = fs.get_file_info(path)
        if info.type != pafs.FileType.File:
            problems.append(f"missing shard {entry.path}")
            continue
        if info.size != entry.bytes:
            problems.append(f"size mismatch for {entry.path}: {info.size} bytes, manifest says {entry.bytes}")
        digest = hashlib.sha256()
        with fs.open_input_stream(path) as stream:
            while chunk := stream.read(8 * 2**20):
                digest.update(chunk)
        if digest.hexdigest() != entry.sha256:
            problems.append(
                f"checksum mismatch for {entry.path}: sha256 {digest.hexdigest()}, manifest says {entry.sha256}"
            )
    for split in SPLITS:
        listed = manifest.samples(split)
        counted = sum(c.samples for c in manifest.counts if c.split == split)
        if listed != counted:
            problems.append(f"split {split}: shards hold {listed} samples but counts sum to {counted}")
    return problems
