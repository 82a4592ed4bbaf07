"""The Ray Data pipeline: shards (local or s3://) -> decoded, cropped, augmented pairs -> task-balanced batches.

One Ray Data task per shard streams its tar through :func:`datprl.platform.data.shards.iter_samples`, so a truncated
shard, an undecodable image or a bad record costs only that sample: it becomes an ``error`` row that the consumer
counts and reports (shard and key) instead of failing the whole read, as Ray's own WebDataset reader does.
Images keep their stored bit depth until this stage, where they are normalised by their white level
(:mod:`datprl.platform.data.conventions`) and grayscale is replicated to 3 channels, as the paper does (arXiv
2603.01725). Ray Train workers receive a disjoint part of the stream through ``ray.train.get_dataset_shard`` and
assemble balanced batches with :func:`training_batches`.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import Field

from datprl.platform.data.sampler import BalancedBatcher, collate
from datprl.platform.data.transforms import (
    center_crop,
    paired_augment,
    paired_random_crop,
    process_rng,
    to_chw3,
    to_unit_float,
)
from datprl.platform.config import StrictModel, no_repeats
from datprl.platform.data.conventions import white_level
from datprl.platform.data.shards import CorruptionReport, CorruptSampleError, iter_samples
from datprl.platform.data.handle import DatasetHandle
from datprl.platform.storage import S3Settings

log = logging.getLogger(__name__)

Mode = Literal["train", "eval"]


_EACH_TASK_ONCE = no_repeats("data.per_task_batch sets how many samples of every task a batch holds")


class DataConfig(StrictModel):
    """Where the dataset lives and how training and evaluation read it."""

    dataset: str = Field("data/default", description="local folder or s3://bucket/prefix holding manifest.json")
    s3: S3Settings | None = Field(None, description="S3 endpoint and credentials (endpoint_url for MinIO/moto)")
    # Each task once: the balanced batcher takes per_task_batch samples for every entry, so a repeat would silently
    # weigh that task double.
    tasks: Annotated[list[str], _EACH_TASK_ONCE] | None = Field(
        None, description="training tasks; None = every task of the training split"
    )
    crop_size: int = Field(128, ge=8, description="paired random crop for training (pixels)")
    augment: bool = Field(True, description="random flips and 90-degree rotations in training")
    per_task_batch: int = Field(2, ge=1, description="samples of every task in each batch (batch = tasks x this)")
    shuffle_buffer: int = Field(64, ge=0, description="rows in the consumer's local shuffle buffer")
    eval_crop: int | None = Field(None, ge=8, description="central crop for evaluation; None = full images")
    on_corrupt: Literal["skip", "raise"] = Field("skip", description="skip and report damaged samples, or fail")
    progress_bars: bool = Field(False, description="Ray Data's per-pass progress bars (noisy in training logs)")
    decode_parts_per_shard: int | None = Field(
        1,
        ge=1,
        description="read tasks per shard, each decoding every "
        "n-th sample; None = auto (enough to use every CPU with few shards)",
    )
    cache_decoded: bool | None = Field(
        None,
        description="training: decode the split's images once into Ray's "
        "object store and only crop, augment and normalise them each pass; None = "
        "auto (when the estimated decoded size fits in a quarter of the object store)",
    )


def _row(record, lq: np.ndarray, gt: np.ndarray, error: str = "") -> dict[str, Any]:
    return {
        "key": record.key if record else "",
        "task": record.task if record else "",
        "domain": record.domain if record else "",
        "source_id": record.source_id if record else "",
        "lq": lq,
        "gt": gt,
        "error": error,
    }


_EMPTY = np.zeros((3, 0, 0), np.float32)


def _part(item: dict[str, Any]) -> tuple[int, int] | None:
    """The (index, count) of a read item that decodes every n-th sample of its shard; None for the whole shard."""
    return (int(item["part"]), int(item["parts"])) if item.get("parts", 1) > 1 else None


def _training_pair(
    lq: np.ndarray, gt: np.ndarray, white: float, crop_size: int, augment: bool, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Stored-depth images -> one training pair: paired random crop, optional flip/rotation, normalised float32
    3 x crop x crop (grey replicated to 3 channels)."""
    lq, gt = paired_random_crop(lq, gt, crop_size, rng)
    if augment:
        lq, gt = paired_augment(lq, gt, rng)
    return to_chw3(to_unit_float(lq, white)), to_chw3(to_unit_float(gt, white))


def decode_shard(
    item: dict[str, Any],
    mode: Mode,
    crop_size: int,
    augment: bool,
    eval_crop: int | None,
    s3: S3Settings | None,
    on_corrupt: str,
) -> Iterator[dict[str, Any]]:
    """Ray Data ``flat_map`` stage: one shard URL -> model-ready rows (float32, 3 x H x W, in [0, 1]).

    Damaged samples yield one row with an ``error`` message naming shard and key and empty images.
    """
    report = CorruptionReport()
    rng = np.random.default_rng()
    for record, lq, gt in iter_samples(item["url"], s3=s3, on_error=on_corrupt, report=report, part=_part(item)):
        white = white_level(record.white_level, bit_depth=record.bit_depth)
        if mode == "train":
            yield _row(record, *_training_pair(lq, gt, white, crop_size, augment, rng))
            continue
        if eval_crop is not None:
            lq, gt = center_crop(lq, eval_crop), center_crop(gt, eval_crop)
        # Evaluation rows also say how to read values back in physical units (CT in HU).
        yield {
            **_row(record, to_chw3(to_unit_float(lq, white)), to_chw3(to_unit_float(gt, white))),
            "white": float(white),
            "units": record.units or "",
        }
    for url, key, reason in report.skipped:
        row = _row(None, _EMPTY, _EMPTY, error=f"{url} [{key or 'shard'}]: {reason}")
        yield row if mode == "train" else {**row, "white": 0.0, "units": ""}


# --- the decoded cache: decode once, crop every pass ----------------------------------------------------------------
# Decoding two PNGs is about 5 of the 7 CPU-ms a training sample costs (data benchmark). When the decoded split fits
# in the object store, it is decoded once into it (Dataset.materialize) and each pass only crops, augments and
# normalises, with a fresh random crop and transform per sample and pass. Images are cached at their stored bit depth
# as raw bytes plus shape and dtype: an Arrow tensor column cannot mix uint8 photos with uint16 scans.

# Decoded bytes per stored (PNG) shard byte, to size a split before decoding it. Measured 2.0 on the default corpus
# (40 MB of shards -> 77 MiB of pixels); 3 leaves room for images that compress better.
DECODED_BYTES_PER_SHARD_BYTE = 3.0
# The cache may take at most this fraction of the object store (training batches and checkpoints need the rest).
CACHE_OBJECT_STORE_FRACTION = 0.25


def _shape3(image: np.ndarray) -> list[int]:
    return [image.shape[0], image.shape[1], image.shape[2] if image.ndim == 3 else 0]


def decode_shard_images(item: dict[str, Any], s3: S3Settings | None, on_corrupt: str) -> Iterator[dict[str, Any]]:
    """Ray Data ``flat_map`` stage of the decoded cache: one shard URL -> rows of stored-depth pixels (``lq``/``gt``
    raw bytes, ``lq_shape``/``gt_shape`` as [H, W, C] with C = 0 for 2-D grey, ``dtype``, ``white``) and metadata.
    Damaged samples become error rows, as in :func:`decode_shard`."""
    report = CorruptionReport()
    for record, lq, gt in iter_samples(item["url"], s3=s3, on_error=on_corrupt, report=report, part=_part(item)):
        yield {
            "key": record.key,
            "task": record.task,
            "domain": record.domain,
            "source_id": record.source_id,
            "white": float(white_level(record.white_level, bit_depth=record.bit_depth)),
            "dtype": lq.dtype.str,
            "lq": np.ascontiguousarray(lq).tobytes(),
            "lq_shape": _shape3(lq),
            "gt": np.ascontiguousarray(gt).tobytes(),
            "gt_shape": _shape3(gt),
            "error": "",
        }
    for url, key, reason in report.skipped:
        yield {
            "key": "",
            "task": "",
            "domain": "",
            "source_id": "",
            "white": 0.0,
            "dtype": "|u1",
            "lq": b"",
            "lq_shape": [0, 0, 0],
            "gt": b"",
            "gt_shape": [0, 0, 0],
            "error": f"{url} [{key or 'shard'}]: {reason}",
        }


def _cached_image(data: bytes, shape, dtype: str) -> np.ndarray:
    h, w, c = (int(v) for v in shape)
    return np.frombuffer(data, dtype=np.dtype(dtype)).reshape((h, w, c) if c else (h, w))


def crop_cached_row(row: dict[str, Any], crop_size: int, augment: bool) -> dict[str, Any]:
    """Ray Data ``map`` stage over the decoded cache: one cached sample -> the row :func:`decode_shard` yields in
    training (a fresh random crop and transform each pass); error rows pass through."""
    if row["error"]:
        return {"key": "", "task": "", "domain": "", "source_id": "", "lq": _EMPTY, "gt": _EMPTY, "error": row["error"]}
    lq = _cached_image(row["lq"], row["lq_shape"], row["dtype"])
    gt = _cached_image(row["gt"], row["gt_shape"], row["dtype"])
    lq, gt = _training_pair(lq, gt, row["white"], crop_size, augment, process_rng())
    return {
        "key": row["key"],
        "task": row["task"],
        "domain": row["domain"],
        "source_id": row["source_id"],
        "lq": lq,
        "gt": gt,
        "error": "",
    }


def _cache_budget() -> float:
    """Bytes the decoded cache may take: :data:`CACHE_OBJECT_STORE_FRACTION` of the Ray cluster's object store."""
    import ray

    return CACHE_OBJECT_STORE_FRACTION * ray.cluster_resources().get("object_store_memory", 0.0)


def _open(config: DataConfig, dataset: DatasetHandle | None) -> DatasetHandle:
    """The handle the caller opened, or the dataset of ``config`` opened now."""
    return dataset if dataset is not None else DatasetHandle.open(config.dataset, config.s3)


def use_decoded_cache(config: DataConfig, split: str, dataset: DatasetHandle | None = None) -> bool:
    """``config.cache_decoded``, or (auto, with Ray running) whether the split's estimated decoded size
    (:data:`DECODED_BYTES_PER_SHARD_BYTE` x its shard bytes) fits in :data:`CACHE_OBJECT_STORE_FRACTION` of the
    Ray cluster's object store. ``dataset``: the dataset's handle when the caller has opened it."""
    if config.cache_decoded is not None:
        return config.cache_decoded
    import ray

    if not ray.is_initialized():
        return False
    shard_bytes = _open(config, dataset).shard_bytes(split)
    return DECODED_BYTES_PER_SHARD_BYTE * shard_bytes <= _cache_budget()


# Rows leave a read task in blocks of at most this many bytes (about 40 rows of two 3x128x128 float32 crops). With
# Ray's default (128 MiB) a shard of a few hundred training crops became one block: the consumer got its first row
# only when the whole shard was decoded (no overlap of decoding and consuming), and every shard in flight held about
# 100 MB of the object store.
MAX_BLOCK_BYTES = 16 * 2**20


def decode_parts(config: DataConfig, shards: int) -> int:
    """Read tasks per shard: ``config.decode_parts_per_shard``, or (auto) enough to give every CPU of the Ray
    cluster a task when there are fewer shards than CPUs, else 1."""
    if config.decode_parts_per_shard is not None:
        return config.decode_parts_per_shard
    import ray

    cpus = int(ray.cluster_resources().get("CPU", 1)) if ray.is_initialized() else 1
    return max(1, -(-cpus // max(1, shards)))


def _limit_blocks(dataset, progress_bars: bool):
    context = dataset.context  # this dataset's own copy of the DataContext: the global one is left as it is
    if context.target_max_block_size is not None and context.target_max_block_size > MAX_BLOCK_BYTES:
        context.target_max_block_size = MAX_BLOCK_BYTES
    context.enable_progress_bars = progress_bars
    return dataset


def read_split(config: DataConfig, split: str, mode: Mode = "train", dataset: DatasetHandle | None = None):
    """A Ray Dataset of model-ready rows from one split of the dataset's manifest: one read task per shard, or
    several when there are fewer shards than CPUs (each decodes every n-th sample, :func:`decode_parts`), whose rows
    stream out in blocks of at most :data:`MAX_BLOCK_BYTES`.

    In training with the decoded cache (:func:`use_decoded_cache`), the split is decoded **here, when this function
    is called** (blocking; with enough read tasks per shard to use every CPU), into the object store; every pass of the
    returned dataset then reads the cache in a random block order and only crops, augments and normalises it
    (:func:`crop_cached_row`). Damaged samples stay error rows of every pass; with ``on_corrupt="raise"`` the first
    one fails this call. The cache lives as long as the returned dataset (it is owned by this process). ``dataset``:
    the dataset's handle when the caller has opened it (the manifest is then not read again)."""
    import ray

    dataset = _open(config, dataset)
    urls = dataset.shard_urls(split)
    if not urls:
        raise ValueError(f"the {split!r} split of {config.dataset} has no shards; build it with jobs/build_dataset.py")
    parts = decode_parts(config, len(urls)) if mode == "train" else 1  # evaluation keeps the manifest order
    # Decoding (two PNGs per sample) is the pipeline's cost. One task per shard leaves CPUs idle whenever a split has
    # fewer shards than CPUs: with n parts, n tasks read the same shard and each decodes its own n-th of the samples.
    # Off by default: on the one-shard default corpus (passes of ~2 s) 2 parts measured no faster than 1 (data
    # benchmark, 0.86 vs 0.88 of the baseline). Ray Data 2.60 runs each new execution (every pass) one task at a time
    # until its autoscaling coordinator's CPU reservation reaches the executor, about 1 s in (measured: the reservation
    # came 1.02 s into a pass; its global limits refresh once a second), so parts only pay off on long passes.
    cached = mode == "train" and use_decoded_cache(config, split, dataset)
    if cached:  # the build runs once, so the per-pass start-up that keeps parts off does not apply: use every CPU
        parts = max(parts, decode_parts(config.model_copy(update={"decode_parts_per_shard": None}), len(urls)))
    items = [{"url": u, "part": i, "parts": parts} for u in urls for i in range(parts)]
    items = ray.data.from_items(items, override_num_blocks=len(items))
    if cached:
        decoded = _limit_blocks(
            items.flat_map(decode_shard_images, fn_kwargs=dict(s3=config.s3, on_corrupt=config.on_corrupt)),
            config.progress_bars,
        )
        cache = decoded.materialize()
        size, budget = cache.size_bytes(), _cache_budget()
        log.info("decoded the %s split into the object store once: %.1f MiB", split, size / 2**20)
        if budget and size > budget:
            log.warning(
                "the decoded cache of the %s split takes %.0f MiB, more than %.0f%% of the object store "
                "(%.0f MiB): Ray may spill it to disk. Set data.cache_decoded=false to decode every pass, or "
                "give Ray a larger object store.",
                split,
                size / 2**20,
                100 * CACHE_OBJECT_STORE_FRACTION,
                budget / CACHE_OBJECT_STORE_FRACTION / 2**20,
            )
        # randomize_block_order without a seed draws a new order at every execution, i.e. every pass.
        return _limit_blocks(
            cache.randomize_block_order().map(
                crop_cached_row, fn_kwargs=dict(crop_size=config.crop_size, augment=config.augment)
            ),
            config.progress_bars,
        )
    rows = items.flat_map(
        decode_shard,
        fn_kwargs=dict(
            mode=mode,
            crop_size=config.crop_size,
            augment=config.augment,
            eval_crop=config.eval_crop,
            s3=config.s3,
            on_corrupt=config.on_corrupt,
        ),
    )
    return _limit_blocks(rows, config.progress_bars)


def split_tasks(config: DataConfig, split: str = "train", dataset: DatasetHandle | None = None) -> list[str]:
    """The tasks of ``split`` in the manifest, or ``config.tasks`` (checked against the manifest)."""
    present = _open(config, dataset).tasks(split)
    if config.tasks is None:
        return present
    missing = sorted(set(config.tasks) - set(present))
    if missing:
        raise ValueError(f"tasks {missing} have no {split!r} samples in {config.dataset}; present: {present}")
    return list(config.tasks)


@dataclass
class StreamReport:
    """What a consumer saw: rows used and damaged samples skipped (shard and key in each message)."""

    rows: int = 0
    corrupt: list[str] = field(default_factory=list)

    def note(self, row: dict) -> bool:
        """Count ``row``; False (and recorded) if it is an error row."""
        if row["error"]:
            self.corrupt.append(row["error"])
            log.warning("skipped damaged sample: %s", row["error"])
            return False
        self.rows += 1
        return True


def _rows(batches: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for batch in batches:
        n = len(batch["key"])
        for i in range(n):
            yield {k: v[i] for k, v in batch.items()}


def _local_shuffle(rows: Iterable[dict[str, Any]], size: int, rng: random.Random) -> Iterator[dict[str, Any]]:
    """``rows`` in random order through a buffer of ``size`` rows: once it is full, each arriving row takes the place
    of a random buffered row, which is yielded; at the end the buffer is yielded in random order."""
    buffer: list[dict[str, Any]] = []
    for row in rows:
        if len(buffer) < size:
            buffer.append(row)
            continue
        i = rng.randrange(size)
        yield buffer[i]
        buffer[i] = row
    rng.shuffle(buffer)
    yield from buffer


def iterate_rows(source, shuffle_buffer: int = 0) -> Iterator[dict[str, Any]]:
    """Rows from a Ray Dataset or a Ray Train dataset shard (DataIterator), optionally through a local shuffle buffer.

    The buffer holds row dicts (references to the arrays), so shuffling moves no image data; Ray's own
    ``local_shuffle_buffer_size`` copies every row's arrays into new blocks (about 0.5 ms per 128x128 training row,
    on the consumer's critical path)."""
    rows = _rows(source.iter_batches(batch_size=16, batch_format="numpy"))
    return _local_shuffle(rows, shuffle_buffer, random.Random()) if shuffle_buffer else rows


def training_batches(
    source,
    tasks: list[str],
    per_task: int,
    shuffle_buffer: int = 64,
    report: StreamReport | None = None,
    seed: int = 0,
    num_batches: int | None = None,
    batcher: BalancedBatcher | None = None,
) -> Iterator[dict[str, Any]]:
    """One pass over ``source`` as task-balanced batches (``per_task`` samples of every task): dicts with
    ``lq``/``gt`` tensors (B, 3, H, W) and per-sample ``task``/``domain``/``key``/``source_id`` lists.

    With ``num_batches``: exactly that many batches per pass (what data-parallel workers need to stay in step, see
    :meth:`BalancedBatcher.fixed_batches`); pass the same ``batcher`` to every pass so that samples left over from
    one pass start the next. Without: every sample once, as many batches as that takes."""
    report = report if report is not None else StreamReport()
    batcher = batcher if batcher is not None else BalancedBatcher(tasks, per_task=per_task, seed=seed)
    rows = (row for row in iterate_rows(source, shuffle_buffer) if report.note(row))
    batches = batcher.batches(rows) if num_batches is None else batcher.fixed_batches(rows, num_batches)
    for batch in batches:
        yield collate(batch)


def local_evaluation_rows(
    config: DataConfig, split: str = "val", report: StreamReport | None = None, dataset: DatasetHandle | None = None
) -> Iterator[dict]:
    """The rows of :func:`evaluation_rows`, in the same order, read in this process without Ray Data (for small
    splits read inside a Ray Train worker, where a Ray Data read would compete with the training read for CPUs)."""
    report = report if report is not None else StreamReport()
    for url in _open(config, dataset).shard_urls(split):
        for row in decode_shard(
            {"url": url},
            mode="eval",
            crop_size=config.crop_size,
            augment=False,
            eval_crop=config.eval_crop,
            s3=config.s3,
            on_corrupt=config.on_corrupt,
        ):
            if report.note(row):
                yield row


def evaluation_rows(
    config: DataConfig, split: str = "val", report: StreamReport | None = None, dataset: DatasetHandle | None = None
) -> Iterator[dict]:
    """Every sample of ``split`` once, in manifest order (deterministic: full images or fixed central crops)."""
    import ray

    report = report if report is not None else StreamReport()
    context = ray.data.DataContext.get_current()
    previous, context.execution_options.preserve_order = context.execution_options.preserve_order, True
    try:
        rows = read_split(config, split, mode="eval", dataset=dataset)
        for row in _rows(rows.iter_batches(batch_size=1, batch_format="numpy")):
            if report.note(row):
                yield row
    finally:
        context.execution_options.preserve_order = previous


__all__ = [
    "CorruptSampleError",
    "DataConfig",
    "StreamReport",
    "crop_cached_row",
    "decode_shard",
    "decode_shard_images",
    "evaluation_rows",
    "iterate_rows",
    "local_evaluation_rows",
    "read_split",
    "split_tasks",
    "training_batches",
    "use_decoded_cache",
]
