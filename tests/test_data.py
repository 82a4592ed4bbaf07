"""The Ray Data pipeline: local and S3 reads, balanced batches, deterministic evaluation, damaged shards, and the
hand-off to Ray Train workers."""

from __future__ import annotations

import collections
import shutil

import numpy as np
import pytest

from datprl.platform.data.pipeline import (
    DataConfig,
    StreamReport,
    evaluation_rows,
    read_split,
    split_tasks,
    training_batches,
    use_decoded_cache,
)
from conftest import small_corpus
from datprl.platform.data.format import manifest_shard_urls, read_manifest
from datprl.platform.storage import S3Settings

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """The embedded default corpus at a small size (conftest.small_corpus), 16 samples per shard."""
    return small_corpus(tmp_path_factory.mktemp("corpus") / "default", max_samples_per_shard=16)


def _count(manifest, split):
    return sum(c.samples for c in manifest.counts if c.split == split)


@pytest.mark.parametrize("cache", [True, False], ids=["decoded_cache", "decode_every_pass"])
def test_training_pass_is_balanced_and_uses_every_sample(ray_local, dataset, cache):
    config = DataConfig(dataset=str(dataset), crop_size=32, cache_decoded=cache)
    tasks = split_tasks(config)
    assert len(tasks) == 9
    report = StreamReport()
    seen = collections.Counter()
    for batch in training_batches(read_split(config, "train"), tasks, per_task=2, report=report):
        assert collections.Counter(batch["task"]) == {t: 2 for t in tasks}
        assert tuple(batch["lq"].shape) == (18, 3, 32, 32) and batch["lq"].dtype.is_floating_point
        assert 0 <= float(batch["gt"].min()) and float(batch["gt"].max()) <= 1
        seen.update(batch["key"])
    assert report.rows == _count(read_manifest(str(dataset)), "train") and not report.corrupt
    assert len(seen) == report.rows  # every training sample was used in the pass


@pytest.mark.parametrize("parts", [2, None])
def test_several_decode_tasks_per_shard_read_every_sample_once(ray_local, dataset, parts):
    config = DataConfig(dataset=str(dataset), crop_size=16, decode_parts_per_shard=parts)
    keys = [r["key"] for r in read_split(config, "train").iter_rows()]
    assert len(keys) == len(set(keys)) == _count(read_manifest(str(dataset)), "train")


@pytest.mark.parametrize("cache", [True, False], ids=["decoded_cache", "decode_every_pass"])
def test_full_size_training_rows_hold_the_stored_pixels(ray_local, dataset, cache):
    """A crop as large as the image without augmentation is the image: the training rows (from the decoded cache or
    decoded in the pass) equal the evaluation rows, uint8 RGB and 16-bit grey alike."""
    config = DataConfig(dataset=str(dataset), crop_size=64, augment=False, cache_decoded=cache)
    reference = {r["key"]: r for r in evaluation_rows(config, "train") if r["lq"].shape == (3, 64, 64)}
    assert len(reference) > 0.9 * _count(read_manifest(str(dataset)), "train")
    assert {r["domain"] for r in reference.values()} == {"natural", "medical", "remote_sensing"}
    rows = list(read_split(config, "train").iter_rows())
    assert len(rows) == _count(read_manifest(str(dataset)), "train")
    for row in rows:
        if row["key"] in reference:
            assert row["lq"].dtype == np.float32
            assert np.array_equal(row["lq"], reference[row["key"]]["lq"])
            assert np.array_equal(row["gt"], reference[row["key"]]["gt"])


def test_decoded_cache_draws_new_crops_every_pass(ray_local, dataset):
    dataset_ = read_split(DataConfig(dataset=str(dataset), crop_size=16, cache_decoded=True), "train")
    first, second = ({r["key"]: r["gt"] for r in dataset_.iter_rows()} for _ in range(2))
    assert first.keys() == second.keys()
    varied = [k for k in first if first[k].std() > 0]  # black scan background looks the same wherever it is cut
    assert len(varied) > len(first) // 2
    same = sum(np.array_equal(first[k], second[k]) for k in varied)
    assert same < 0.2 * len(varied)  # a 16-pixel window of a 64-pixel tile, times 8 transforms: rarely the same


def test_decoded_cache_auto_follows_the_object_store(ray_local, dataset, monkeypatch):
    import ray

    from datprl.platform.data.pipeline import CACHE_OBJECT_STORE_FRACTION, DECODED_BYTES_PER_SHARD_BYTE

    config = DataConfig(dataset=str(dataset))
    shard_bytes = sum(s.bytes for s in read_manifest(str(dataset)).shards if s.split == "train")
    estimate = DECODED_BYTES_PER_SHARD_BYTE * shard_bytes
    for store, expected in (
        (1.1 * estimate / CACHE_OBJECT_STORE_FRACTION, True),
        (0.9 * estimate / CACHE_OBJECT_STORE_FRACTION, False),
    ):
        monkeypatch.setattr(ray, "cluster_resources", lambda store=store: {"CPU": 2.0, "object_store_memory": store})
        assert use_decoded_cache(config, "train") is expected
    assert use_decoded_cache(config.model_copy(update={"cache_decoded": True}), "train") is True
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    assert use_decoded_cache(config, "train") is False  # auto without Ray: nothing to cache into


def test_in_process_evaluation_rows_equal_the_ray_rows(ray_local, dataset):
    from datprl.platform.data.pipeline import local_evaluation_rows

    config = DataConfig(dataset=str(dataset), eval_crop=24)
    ray_rows, local_rows = list(evaluation_rows(config, "val")), list(local_evaluation_rows(config, "val"))
    assert [r["key"] for r in ray_rows] == [r["key"] for r in local_rows]
    assert all(
        np.array_equal(a["lq"], b["lq"]) and np.array_equal(a["gt"], b["gt"]) for a, b in zip(ray_rows, local_rows)
    )


def test_grayscale_scans_are_replicated_and_keep_their_bit_depth(ray_local, dataset):
    rows = [r for r in evaluation_rows(DataConfig(dataset=str(dataset)), "train") if r["domain"] == "medical"]
    assert rows
    for row in rows:
        assert np.array_equal(row["gt"][0], row["gt"][2])
    # 12-bit scans normalised by their white level keep more than 256 distinct levels
    assert max(len(np.unique(r["gt"][0])) for r in rows) > 256


def test_evaluation_is_deterministic_and_cropped(ray_local, dataset):
    config = DataConfig(dataset=str(dataset), eval_crop=32)
    first = list(evaluation_rows(config, "val"))
    second = list(evaluation_rows(config, "val"))
    assert [r["key"] for r in first] == [r["key"] for r in second]
    assert all(np.array_equal(a["lq"], b["lq"]) for a, b in zip(first, second))
    assert all(r["lq"].shape[1:] == (32, 32) for r in first)
    assert len(first) == _count(read_manifest(str(dataset)), "val")


@pytest.mark.parametrize("cache", [True, False], ids=["decoded_cache", "decode_every_pass"])
def test_damaged_shard_costs_only_its_samples(ray_local, dataset, tmp_path, cache):
    damaged = tmp_path / "damaged"
    shutil.copytree(dataset, damaged)
    shard = manifest_shard_urls(str(damaged), "train")[0]
    data = open(shard, "rb").read()
    open(shard, "wb").write(data[: len(data) // 2])
    config = DataConfig(dataset=str(damaged), crop_size=32, cache_decoded=cache)
    report = StreamReport()
    rows = [
        r
        for r in (
            r
            for batch in read_split(config, "train").iter_batches(batch_format="numpy")
            for r in [dict(zip(batch, v)) for v in zip(*batch.values())]
        )
        if report.note(r)
    ]
    total = _count(read_manifest(str(damaged)), "train")
    assert len(report.corrupt) >= 1 and "shard-00000.tar" in report.corrupt[0]
    assert total - 16 < len(rows) < total  # the first half of the cut shard survives; other shards are intact
    with pytest.raises(Exception, match="shard-00000.tar"):
        read_split(DataConfig(dataset=str(damaged), on_corrupt="raise", cache_decoded=cache), "train").materialize()


def test_reads_the_same_shards_through_s3(ray_local, dataset, s3_server):
    import boto3
    import s3fs

    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket="corpus-bucket")
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server})
    fs.put(str(dataset), "corpus-bucket/default", recursive=True)
    config = DataConfig(dataset="s3://corpus-bucket/default", s3=S3Settings(endpoint_url=s3_server), crop_size=32)
    keys = sorted(r["key"] for r in evaluation_rows(config, "test"))
    local = sorted(r["key"] for r in evaluation_rows(DataConfig(dataset=str(dataset)), "test"))
    assert keys == local and keys


@pytest.mark.parametrize("cache", [True, False], ids=["decoded_cache", "decode_every_pass"])
def test_ray_train_workers_get_disjoint_parts(ray_local, dataset, tmp_path, cache):
    import ray.train
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    out = tmp_path / "keys"
    out.mkdir()

    def loop(_config):
        part = ray.train.get_dataset_shard("train")
        keys = [str(k) for batch in part.iter_batches(batch_format="numpy") for k in batch["key"]]
        (out / f"rank{ray.train.get_context().get_world_rank()}.txt").write_text("\n".join(keys))
        ray.train.report({"rows": len(keys)})

    config = DataConfig(dataset=str(dataset), crop_size=32, cache_decoded=cache)
    trainer = TorchTrainer(
        loop,
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
        datasets={"train": read_split(config, "train")},
        run_config=RunConfig(storage_path=str(tmp_path / "runs"), name=f"handoff-{cache}"),
    )
    assert trainer.fit().error is None
    parts = [set(filter(None, (out / f"rank{r}.txt").read_text().splitlines())) for r in (0, 1)]
    assert parts[0] and parts[1] and not parts[0] & parts[1]
    # Ray Train hands each worker an equal share (streaming_split(equal=True)): with an odd count one row is left over
    total = _count(read_manifest(str(dataset)), "train")
    assert total - 1 <= len(parts[0] | parts[1]) <= total
