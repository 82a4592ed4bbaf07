"""The decoded cache's two stages without Ray: ``decode_shard_images`` (shard -> stored-depth pixels as bytes) and
``crop_cached_row`` (cached row -> training row) give what decoding in the pass gives, for non-square RGB and 16-bit
grey images, through an Arrow table as Ray stores the cache; damaged samples pass through as error rows."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from datprl.platform.data import pipeline as data
from datprl.platform.data.pipeline import _training_pair, crop_cached_row, decode_shard_images
from datprl.platform.data.shards import DatasetWriter, iter_samples
from datprl.platform.data.format import SampleRecord, manifest_shard_urls

SHAPES = {"photo": ((23, 37, 3), np.uint8, 256, 8, None), "scan": ((41, 19), np.uint16, 4096, 16, 4095)}


@pytest.fixture(scope="module")
def shard(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("cache") / "ds"
    rng = np.random.default_rng(0)
    with DatasetWriter(str(root), "cache", max_samples_per_shard=16, command=["test"], package_versions={}) as writer:
        for name, (shape, dtype, high, depth, white) in SHAPES.items():
            gt, lq = (rng.integers(0, high, shape).astype(dtype) for _ in range(2))
            writer.write(
                SampleRecord(
                    key=name,
                    domain="medical" if name == "scan" else "natural",
                    task="t",
                    split="train",
                    source_id=name,
                    source_package="test",
                    degradation={},
                    seed=0,
                    bit_depth=depth,
                    channels=1 if len(shape) == 2 else 3,
                    height=shape[0],
                    width=shape[1],
                    white_level=white,
                ),
                lq,
                gt,
            )
    return manifest_shard_urls(str(root), "train")[0]


def _through_arrow(rows: list[dict]) -> list[dict]:
    return pa.Table.from_pylist(rows).to_pylist()


@pytest.mark.parametrize("crop", [8, 16])
def test_cached_rows_crop_like_decoding_in_the_pass(shard, monkeypatch, crop):
    cached = _through_arrow(list(decode_shard_images({"url": shard}, s3=None, on_corrupt="skip")))
    assert [r["key"] for r in cached] == list(SHAPES) and not any(r["error"] for r in cached)
    decoded = {record.key: (record, lq, gt) for record, lq, gt in iter_samples(shard)}
    for row in cached:
        record, lq, gt = decoded[row["key"]]
        assert row["lq_shape"] == [lq.shape[0], lq.shape[1], lq.shape[2] if lq.ndim == 3 else 0]
        monkeypatch.setattr(data, "process_rng", lambda: np.random.default_rng(7))
        out = crop_cached_row(row, crop_size=crop, augment=True)
        white = record.white_level or (2**record.bit_depth - 1)
        expected = _training_pair(lq, gt, white, crop, True, np.random.default_rng(7))
        assert out["lq"].shape == out["gt"].shape == (3, crop, crop) and out["lq"].dtype == np.float32
        assert np.array_equal(out["lq"], expected[0]) and np.array_equal(out["gt"], expected[1])
        assert (out["key"], out["task"], out["domain"], out["error"]) == (record.key, "t", record.domain, "")


def test_damaged_samples_pass_through_the_cache_as_error_rows(shard, tmp_path):
    import tarfile

    with tarfile.open(shard) as tar:
        last = tar.getmembers()[-1]  # a member of the second sample
    assert last.name.startswith("scan.")
    cut = tmp_path / "cut.tar"
    cut.write_bytes(open(shard, "rb").read()[: last.offset_data + last.size // 2])
    cached = _through_arrow(list(decode_shard_images({"url": str(cut)}, s3=None, on_corrupt="skip")))
    good = [r for r in cached if not r["error"]]
    errors = [r for r in cached if r["error"]]
    assert [r["key"] for r in good] == ["photo"] and len(errors) == 1 and "cut.tar" in errors[0]["error"]
    out = crop_cached_row(errors[0], crop_size=8, augment=True)
    assert out["error"] == errors[0]["error"] and out["lq"].shape == (3, 0, 0)
