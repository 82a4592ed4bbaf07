"""The dataset's on-disk format: WebDataset tar shards of (degraded, clean) image pairs plus a manifest.

Layout of one dataset (local directory or ``s3://bucket/prefix``)::

    manifest.json                 # Manifest: shards (relative paths, sha256, samples, bytes, split) and counts
    train/shard-00000.tar         # one split per shard, so a reader takes a split by listing the manifest
    train/shard-00001.tar
    val/shard-00000.tar
    test/shard-00000.tar

Each shard is a plain (uncompressed) tar whose members follow the WebDataset convention, all members of a sample
adjacent, in this order::

    {key}.json    # SampleRecord (UTF-8 JSON)
    {key}.lq.png  # degraded input
    {key}.gt.png  # clean target

Keys contain only ``[A-Za-z0-9_-]`` (no dots: WebDataset, Ray Data and this module split a member name at its first
dot into key and extension; no slashes). Tar headers are deterministic (mtime 0, uid/gid 0, mode 0644), so the same
samples give byte-identical shards and checksums.

Images: 8-bit grey or RGB -> 8-bit PNG (mode L / RGB); 16-bit grey -> 16-bit PNG (PIL mode ``I;16``). 16-bit RGB is
not representable through PIL's PNG writer and is rejected (remote sensing is stored as 8-bit RGB). Decoding gives
back exactly the array that was encoded, with its dtype (uint8/uint16); grey images come back 2-D ``(H, W)``.

Writing: :class:`DatasetWriter` (one :class:`ShardWriter` per split, then ``manifest.json``, written last, so a
manifest exists only for a complete build). Every shard is assembled in memory and written with
:func:`~datprl.platform.storage.atomic_write_bytes`, so an interrupted build never leaves a truncated shard under a
final name.

Reading (tests and tools; the training pipeline uses Ray Data, see below): :func:`iter_samples` streams shards
(tarfile over a sequential stream, local or S3) and yields ``(SampleRecord, lq, gt)``. A damaged sample -- truncated
shard, missing member, undecodable image, bad JSON, record failing the schema or not matching its images -- is
skipped and recorded in a :class:`CorruptionReport` (shard URL, key, reason), or with ``on_error="raise"`` raises
:class:`CorruptSampleError`. Nothing else is lost: in a truncated shard every complete sample before the truncation
point is yielded.

Ray Data: ``ray.data.read_webdataset(urls, filesystem=fs, decoder=None)`` keeps every member as raw ``bytes``
(columns ``__key__``, ``__url__``, ``json``, ``lq.png``, ``gt.png``); :func:`decode_sample` turns such a row into
``(SampleRecord, lq, gt)`` with the same checks as :func:`iter_samples`. With Ray's default decoder the PNGs arrive
as numpy arrays decoded by PIL and ``json`` as a dict (dtypes are pinned in ``tests/test_shards.py``).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
import sys
import tarfile
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from datetime import datetime, timezone
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from datprl.platform import storage
from datprl.platform.data.format import (
    MEMBERS,
    SPLITS,
    CountEntry,
    ImageDecodeError,
    Manifest,
    SampleRecord,
    ShardEntry,
    Split,
    _bit_depth,
    decode_image,
    default_package_versions,
    encode_image,
    write_manifest,
)
from datprl.platform.storage import S3Settings

__all__ = [
    "ShardInfo",
    "ShardWriter",
    "DatasetWriter",
    "CorruptSampleError",
    "CorruptionReport",
    "decode_sample",
    "iter_samples",
]

log = logging.getLogger(__name__)

# --- writing ------------------------------------------------------------------------------------------------------


def _check_images(record: SampleRecord, lq: np.ndarray, gt: np.ndarray) -> None:
    """Raise ValueError if the arrays do not match the record (used when writing and when reading)."""
    for name, array in (("gt", gt), ("lq", lq)):
        array = np.asarray(array)
        if _bit_depth(array.dtype) != record.bit_depth:
            raise ValueError(f"{name} has dtype {array.dtype} but the record says bit_depth={record.bit_depth}")
        channels = 1 if array.ndim == 2 or (array.ndim == 3 and array.shape[2] == 1) else array.shape[-1]
        if array.ndim not in (2, 3) or channels != record.channels:
            raise ValueError(f"{name} has shape {array.shape} but the record says channels={record.channels}")
    if tuple(np.asarray(gt).shape[:2]) != (record.height, record.width):
        raise ValueError(f"gt is {np.asarray(gt).shape[:2]} but the record says {(record.height, record.width)}")


class ShardInfo(BaseModel):
    """What a :class:`ShardWriter` wrote: one shard."""

    model_config = ConfigDict(extra="forbid")

    url: str
    sha256: str
    samples: int
    bytes: int
    split: Split | None
    counts: dict[str, int] = Field(default_factory=dict, description="samples per 'domain/task'")


def _member_size(name: str, size: int) -> int:
    """Bytes a member takes in the tar: header, data padded to a block, and a PAX header for a long name."""
    block = tarfile.BLOCKSIZE
    return block + -(-size // block) * block + (3 * block if len(name) >= 100 else 0)


def _closed_size(size: int) -> int:
    """Size of the closed archive: end-of-archive marker (two blocks), padded to tarfile's record size."""
    return -(-(size + 2 * tarfile.BLOCKSIZE) // tarfile.RECORDSIZE) * tarfile.RECORDSIZE


def _tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


class _CommitOnSuccess:
    """``with writer:`` closes (commits) on a clean exit and aborts on an exception, so nothing half-written lands."""

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class ShardWriter(_CommitOnSuccess):
    """Write samples into ``{url_prefix}-{index:05d}.tar`` shards, each written atomically when full or on close.

    A shard is closed when it holds ``max_samples_per_shard`` samples or when the next sample would take it past
    ``max_bytes_per_shard`` (it is assembled in memory, so this bounds memory too; a single sample larger than the
    limit gets a shard of its own). All samples of one writer share a
    split (given, or taken from the first sample). Keys must be unique within the writer (or within ``seen_keys``, a
    set shared by several writers). Use as a context manager: leaving it with an exception discards the shard being
    assembled instead of writing it.
    """

    def __init__(
        self,
        url_prefix: str,
        max_samples_per_shard: int = 1000,
        s3: S3Settings | None = None,
        *,
        max_bytes_per_shard: int = 512 * 2**20,
        split: Split | None = None,
        compress_level: int = 6,
        seen_keys: set[str] | None = None,
    ) -> None:
        if max_samples_per_shard < 1 or max_bytes_per_shard < 1:
            raise ValueError("max_samples_per_shard and max_bytes_per_shard must be positive")
        self.url_prefix = str(url_prefix)
        self.max_samples = max_samples_per_shard
        self.max_bytes = max_bytes_per_shard
        self.s3 = s3
        self.split = split
        self.compress_level = compress_level
        self.shards: list[ShardInfo] = []
        self.counts: Counter[tuple[str, str, str]] = Counter()  # (domain, task, split) -> samples written
        self._keys = seen_keys if seen_keys is not None else set()
        self._index = 0
        self._buffer: io.BytesIO | None = None
        self._tar: tarfile.TarFile | None = None
        self._samples = 0
        self._shard_counts: Counter[str] = Counter()
        self._closed = False

    # The shard currently being assembled
    def _open_shard(self) -> None:
        self._buffer = io.BytesIO()
        self._tar = tarfile.open(fileobj=self._buffer, mode="w", format=tarfile.PAX_FORMAT)
        self._samples = 0
        self._shard_counts = Counter()

    def _flush(self) -> None:
        if self._tar is None or self._samples == 0:
            self._tar = self._buffer = None
            return
        self._tar.close()
        data = self._buffer.getvalue()
        url = f"{self.url_prefix}-{self._index:05d}.tar"
        storage.atomic_write_bytes(url, data, self.s3)
        self.shards.append(
            ShardInfo(
                url=url,
                sha256=hashlib.sha256(data).hexdigest(),
                samples=self._samples,
                bytes=len(data),
                split=self.split,
                counts=dict(self._shard_counts),
            )
        )
        self._index += 1
        self._tar = self._buffer = None

    def write(self, record: SampleRecord, lq: np.ndarray, gt: np.ndarray) -> None:
        """Add one sample (validated against its record; images encoded losslessly)."""
        if self._closed:
            raise RuntimeError("ShardWriter is closed")
        if not isinstance(record, SampleRecord):
            record = SampleRecord.model_validate(record)
        if self.split is None:
            self.split = record.split
        elif record.split != self.split:
            raise ValueError(f"sample {record.key!r} is in split {record.split!r}; this writer holds {self.split!r}")
        if record.key in self._keys:
            raise ValueError(f"duplicate sample key {record.key!r}")
        _check_images(record, lq, gt)
        members = {
            "json": record.model_dump_json().encode("utf-8"),
            "lq.png": encode_image(lq, self.compress_level)[1],
            "gt.png": encode_image(gt, self.compress_level)[1],
        }
        size = sum(_member_size(f"{record.key}.{ext}", len(data)) for ext, data in members.items())
        if self._tar is not None and (
            self._samples >= self.max_samples or _closed_size(self._buffer.tell() + size) > self.max_bytes
        ):
            self._flush()
        if self._tar is None:
            self._open_shard()
        for ext in MEMBERS:
            _tar_member(self._tar, f"{record.key}.{ext}", members[ext])
        self._keys.add(record.key)
        self._samples += 1
        self._shard_counts[f"{record.domain}/{record.task}"] += 1
        self.counts[(record.domain, record.task, record.split)] += 1

    def close(self) -> list[ShardInfo]:
        """Write the last shard; returns every shard written."""
        if not self._closed:
            self._flush()
            self._closed = True
        return self.shards

    def abort(self) -> None:
        """Discard the shard being assembled (already written shards stay)."""
        self._tar = self._buffer = None
        self._closed = True


class DatasetWriter(_CommitOnSuccess):
    """Write a whole dataset under ``root_url``: shards per split (``{split}/shard-NNNNN.tar``) and, on
    :meth:`close`, ``manifest.json`` (written last). Keys are unique across splits."""

    def __init__(
        self,
        root_url: str,
        name: str,
        max_samples_per_shard: int = 1000,
        s3: S3Settings | None = None,
        *,
        max_bytes_per_shard: int = 512 * 2**20,
        compress_level: int = 6,
        command: list[str] | None = None,
        package_versions: dict[str, str] | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        self.root_url = str(root_url)
        self.name = name
        self.s3 = s3
        self.command = list(sys.argv if command is None else command)
        self.package_versions = default_package_versions() if package_versions is None else dict(package_versions)
        self.metadata = dict(metadata or {})
        self._options = dict(
            max_samples_per_shard=max_samples_per_shard,
            max_bytes_per_shard=max_bytes_per_shard,
            compress_level=compress_level,
        )
        self._keys: set[str] = set()
        self._writers: dict[str, ShardWriter] = {}
        self.manifest: Manifest | None = None

    def write(self, record: SampleRecord, lq: np.ndarray, gt: np.ndarray) -> None:
        if not isinstance(record, SampleRecord):
            record = SampleRecord.model_validate(record)
        writer = self._writers.get(record.split)
        if writer is None:
            writer = self._writers[record.split] = ShardWriter(
                storage.join_url(self.root_url, record.split, "shard"),
                s3=self.s3,
                split=record.split,
                seen_keys=self._keys,
                **self._options,
            )
        writer.write(record, lq, gt)

    def close(self) -> Manifest:
        """Write the remaining shards and the manifest; returns the manifest."""
        if self.manifest is not None:
            return self.manifest
        shards: list[ShardEntry] = []
        counts: Counter[tuple[str, str, str]] = Counter()
        for split in SPLITS:
            writer = self._writers.get(split)
            if writer is None:
                continue
            for info in writer.close():
                shards.append(
                    ShardEntry(
                        path=f"{split}/{info.url.rsplit('/', 1)[-1]}",
                        sha256=info.sha256,
                        samples=info.samples,
                        bytes=info.bytes,
                        split=split,
                    )
                )
            counts.update(writer.counts)
        self.manifest = Manifest(
            name=self.name,
            created_at=datetime.now(timezone.utc),
            command=self.command,
            package_versions=self.package_versions,
            shards=shards,
            counts=[CountEntry(domain=d, task=t, split=s, samples=n) for (d, t, s), n in sorted(counts.items())],
            metadata=self.metadata,
        )
        write_manifest(self.root_url, self.manifest, self.s3)
        return self.manifest

    def abort(self) -> None:
        for writer in self._writers.values():
            writer.abort()


# --- reading ------------------------------------------------------------------------------------------------------


class CorruptSampleError(Exception):
    """A sample (or a whole shard's remainder) that cannot be read; names the shard and the key."""

    def __init__(self, shard: str, key: str | None, reason: str) -> None:
        self.shard, self.key, self.reason = shard, key, reason
        where = f"sample {key!r}" if key is not None else "shard"
        super().__init__(f"corrupt {where} in {shard}: {reason}")


class CorruptionReport:
    """Samples skipped by :func:`iter_samples`: ``skipped`` holds ``(shard_url, key, reason)``; ``key`` is None for
    damage that cannot be attributed to one sample (for example a shard cut exactly between two samples)."""

    def __init__(self) -> None:
        self.skipped: list[tuple[str, str | None, str]] = []

    def add(self, shard: str, key: str | None, reason: str) -> None:
        self.skipped.append((shard, key, reason))

    def __len__(self) -> int:
        return len(self.skipped)

    @property
    def ok(self) -> bool:
        return not self.skipped

    def summary(self, limit: int = 20) -> str:
        if not self.skipped:
            return "no corrupt samples"
        shards = len({s for s, _, _ in self.skipped})
        lines = [f"{len(self.skipped)} corrupt sample(s) skipped in {shards} shard(s):"]
        for shard, key, reason in self.skipped[:limit]:
            lines.append(f"  {shard} [{key if key is not None else '-'}]: {reason}")
        if len(self.skipped) > limit:
            lines.append(f"  ... and {len(self.skipped) - limit} more")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"CorruptionReport(skipped={len(self.skipped)})"


class _SampleError(Exception):
    """Internal: why one sample is unusable (the reason string becomes part of a report / CorruptSampleError)."""


def _as_bytes(value: Any) -> bytes:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, np.ndarray) and value.dtype == np.uint8 and value.ndim == 1:  # Arrow binary -> numpy
        return value.tobytes()
    raise _SampleError(f"member is {type(value).__name__}, not raw bytes (read with decoder=None)")


def _decode_members(key: str, members: Mapping[str, Any]) -> tuple[SampleRecord, np.ndarray, np.ndarray]:
    missing = [m for m in MEMBERS if m not in members]
    if missing:
        raise _SampleError(f"missing member(s): {', '.join(missing)}")
    extra = sorted(set(members) - set(MEMBERS))
    if extra:
        raise _SampleError(f"unexpected member(s): {', '.join(extra)}")
    try:
        payload = json.loads(_as_bytes(members["json"]).decode("utf-8"))
    except _SampleError:
        raise
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _SampleError(f"bad JSON: {exc}") from exc
    try:
        record = SampleRecord.model_validate(payload)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or '<root>'}: {e['msg']}" for e in exc.errors())
        raise _SampleError(f"record fails the schema: {problems}") from exc
    if record.key != key:
        raise _SampleError(f"record key {record.key!r} does not match member key {key!r}")
    images = {}
    for name in ("lq.png", "gt.png"):
        try:
            images[name] = decode_image(_as_bytes(members[name]))
        except ImageDecodeError as exc:
            raise _SampleError(f"undecodable {name}: {exc}") from exc
    try:
        _check_images(record, images["lq.png"], images["gt.png"])
    except ValueError as exc:
        raise _SampleError(f"images do not match the record: {exc}") from exc
    return record, images["lq.png"], images["gt.png"]


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and value != value)


def decode_sample(row: Mapping[str, Any]) -> tuple[SampleRecord, np.ndarray, np.ndarray]:
    """Decode one raw WebDataset row -- ``{"__key__", "json", "lq.png", "gt.png"}`` with bytes values, as
    ``ray.data.read_webdataset(..., decoder=None)`` yields -- with the checks of :func:`iter_samples` (other
    columns are ignored). Raises :class:`CorruptSampleError` (shard from ``__url__`` when present)."""
    key = str(row.get("__key__"))
    # Only the three members count: Ray adds columns (e.g. ``path``), and a column missing from this sample but
    # present in others of its block comes back as None or NaN.
    members = {k: row[k] for k in MEMBERS if k in row and not _is_missing(row[k])}
    try:
        return _decode_members(key, members)
    except _SampleError as exc:
        raise CorruptSampleError(str(row.get("__url__", "?")), key, str(exc)) from None


def _split_name(name: str) -> tuple[str | None, str | None]:
    """Member name -> (key, extension) at the first dot of the base name (the WebDataset / Ray Data rule)."""
    match = re.match(r"^((?:.*/|)[^.]+)[.]([^/]*)$", name)
    return (match.group(1), match.group(2)) if match else (None, None)


class _TailReader(io.RawIOBase):
    """Wraps a sequential stream, counting bytes and keeping the last ``keep`` of them (to check the tar's end)."""

    def __init__(self, stream, keep: int = 64 * 1024) -> None:
        self._stream, self._keep = stream, keep
        self.total = 0
        self.tail = bytearray()

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        data = self._stream.read() if size is None or size < 0 else self._stream.read(size)
        data = bytes(data)
        self.total += len(data)
        self.tail += data
        if len(self.tail) > self._keep:
            del self.tail[: len(self.tail) - self._keep]
        return data

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def drain(self, limit: int) -> bool:
        """Read on to the end, at most ``limit`` bytes; True if the end was reached."""
        while limit > 0:
            data = self.read(min(limit, 64 * 1024))
            if not data:
                return True
            limit -= len(data)
        return not self.read(1)


def _end_problem(tar: tarfile.TarFile, reader: _TailReader) -> str | None:
    """After tarfile stopped iterating: None if the archive ended with a proper end-of-archive marker (zero blocks
    up to the end of the file), else what is wrong. tarfile stops *silently* on a file cut at a header boundary, on
    a partial header and on a damaged header after the first member, so this is checked here."""
    damaged = f"unreadable tar header at byte {tar.offset} (archive damaged; the rest of the shard is lost)"
    if not reader.drain(len(reader.tail) + 1):
        return damaged
    remaining = reader.total - tar.offset
    if remaining <= 0:
        return f"shard truncated at byte {reader.total} (ends after a member, no end-of-archive marker)"
    if remaining > len(reader.tail):
        return damaged
    trailing = reader.tail[len(reader.tail) - remaining :]
    if any(trailing[: tarfile.BLOCKSIZE]):
        if remaining < tarfile.BLOCKSIZE:
            return f"shard truncated at byte {reader.total} (inside a tar header)"
        return damaged
    if any(trailing):
        return f"unexpected data after the end-of-archive marker at byte {tar.offset}"
    if remaining < 2 * tarfile.BLOCKSIZE:
        return f"shard truncated at byte {reader.total} (incomplete end-of-archive marker)"
    return None


def _iter_shard(
    url: str, s3: S3Settings | None, report_problem, part: tuple[int, int] | None = None
) -> Iterator[tuple[SampleRecord, np.ndarray, np.ndarray]]:
    """One shard (the samples of ``part`` only, see :func:`iter_samples`). ``report_problem(key, reason)`` records
    (or raises) a problem. I/O errors of the storage itself (network, permissions) propagate: they say nothing about
    the data."""
    order: dict[str, int] = {}  # key -> position of the sample in the shard

    def owned(key: str | None) -> bool:
        if part is None:
            return True
        if key is None:
            return part[0] == 0
        return order.get(key, len(order)) % part[1] == part[0]

    def fail(key: str | None, reason: str) -> None:
        if owned(key):
            report_problem(key, reason)

    try:
        raw = storage.open_input_stream(url, s3)
    except FileNotFoundError as exc:
        fail(None, f"shard not found: {exc}")
        return
    with raw:
        reader = _TailReader(raw)
        current: str | None = None
        members: dict[str, bytes] = {}
        seen: set[str] = set()
        bad_current = False  # the current sample was already reported (duplicate member / repeated key)

        def finish() -> Iterator[tuple[SampleRecord, np.ndarray, np.ndarray]]:
            if current is None or bad_current or not owned(current):
                return
            try:
                yield _decode_members(current, members)
            except _SampleError as exc:
                fail(current, str(exc))

        def salvage(problem: str) -> Iterator[tuple[SampleRecord, np.ndarray, np.ndarray]]:
            """The archive breaks off after the members read so far: the sample in progress is still yielded if it
            is complete (the damage lies after it); otherwise the damage is attributed to it."""
            if current is not None and not bad_current and set(members) == set(MEMBERS):
                yield from finish()
                fail(None, problem)
            elif current is not None and not bad_current:
                fail(current, f"{problem}; sample incomplete (has {', '.join(sorted(members)) or 'no members'})")
            else:
                fail(None, problem)

        try:
            tar = tarfile.open(fileobj=reader, mode="r|")
        except tarfile.TarError as exc:
            fail(None, f"not a readable tar archive: {exc}")
            return
        try:
            for info in tar:
                if not info.isreg():
                    continue
                key, ext = _split_name(info.name)
                try:
                    data = tar.extractfile(info).read()
                except (tarfile.TarError, EOFError) as exc:
                    fail(key or current, f"shard truncated or damaged inside member {info.name!r}: {exc}")
                    return  # nothing after this point can be read from a stream
                if key is None:
                    fail(None, f"member {info.name!r} has no key.extension name")
                    continue
                if key != current:
                    yield from finish()
                    repeated = key in seen
                    current, members, bad_current = key, {}, repeated
                    seen.add(key)
                    order.setdefault(key, len(order))
                    if repeated:
                        fail(key, "key appears again after other samples (members not contiguous, or duplicate key)")
                if bad_current:
                    continue
                if ext in members:
                    fail(key, f"duplicate member {info.name!r}")
                    bad_current = True
                    continue
                members[ext] = data
        except (tarfile.TarError, EOFError) as exc:
            yield from salvage(f"shard damaged: {exc}")
            return
        problem = _end_problem(tar, reader)
        if problem is None:
            yield from finish()
        else:
            yield from salvage(problem)


def iter_samples(
    shard_urls: str | Iterable[str],
    s3: S3Settings | None = None,
    on_error: Literal["skip", "raise"] = "skip",
    report: CorruptionReport | None = None,
    part: tuple[int, int] | None = None,
) -> Iterator[tuple[SampleRecord, np.ndarray, np.ndarray]]:
    """Stream ``(record, lq, gt)`` from shards, in order. Damaged samples are skipped and added to ``report``
    (pass a :class:`CorruptionReport` to inspect them; each skip is also logged as a warning), or with
    ``on_error="raise"`` raise :class:`CorruptSampleError` naming the shard and the key.

    ``part=(i, n)`` decodes only every n-th sample of each shard, starting at the i-th (0-based), so that n readers
    of one shard decode it in parallel and together yield every sample once. Each reader still reads the whole
    archive (cheap next to decoding); a damaged sample is reported by the reader that owns it, damage to the shard
    itself by reader 0 only."""
    if on_error not in ("skip", "raise"):
        raise ValueError(f"on_error must be 'skip' or 'raise', not {on_error!r}")
    if part is not None and not (part[1] >= 1 and 0 <= part[0] < part[1]):
        raise ValueError(f"part must be (index, count) with 0 <= index < count, not {part!r}")
    if isinstance(shard_urls, str):
        shard_urls = [shard_urls]
    for url in shard_urls:
        url = str(url)

        def fail(key: str | None, reason: str, _url: str = url) -> None:
            if on_error == "raise":
                raise CorruptSampleError(_url, key, reason)
            log.warning("skipping corrupt sample %s in %s: %s", key if key is not None else "-", _url, reason)
            if report is not None:
                report.add(_url, key, reason)

        yield from _iter_shard(url, s3, fail, part)
