"""The dataset format: lossless images, WebDataset shards, manifest, atomic writes, corruption handling, S3, Ray."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest

from datprl.platform.data import format as fmt
from datprl.platform.data import shards as sh
from datprl.platform import storage
from datprl.platform.data.shards import CorruptionReport, CorruptSampleError, DatasetWriter, ShardWriter, iter_samples
from datprl.platform.data.format import SampleRecord, decode_image, encode_image

BUCKET = "datprl-test"


# --- helpers ------------------------------------------------------------------------------------------------------


def _record(key: str, lq: np.ndarray, gt: np.ndarray | None = None, **overrides) -> SampleRecord:
    gt = lq if gt is None else gt
    bit_depth = 16 if gt.dtype == np.uint16 else 8
    fields = dict(
        key=key,
        domain="medical" if bit_depth == 16 else "natural",
        task="denoise",
        split="train",
        source_id=f"src-{key}",
        source_package="synthetic",
        degradation={"kind": "gaussian", "sigma": 0.1, "seed": 7},
        seed=7,
        bit_depth=bit_depth,
        channels=3 if gt.ndim == 3 else 1,
        height=gt.shape[0],
        width=gt.shape[1],
    )
    fields.update(overrides)
    return SampleRecord(**fields)


def _samples() -> list[tuple[SampleRecord, np.ndarray, np.ndarray]]:
    """Synthetic images of every supported kind plus one real photo (astronaut crop), across splits and domains."""
    from skimage import data

    rng = np.random.default_rng(0)
    out = []
    astro = np.ascontiguousarray(data.astronaut()[100:164, 180:228])  # 64x48 RGB uint8
    noisy = np.clip(astro.astype(np.int16) + rng.integers(-20, 21, astro.shape), 0, 255).astype(np.uint8)
    out.append(
        (_record("astronaut_crop", noisy, astro, source_id="astronaut", source_package="scikit-image"), noisy, astro)
    )
    for i in range(3):
        gt = rng.integers(0, 256, (16, 20, 3), dtype=np.uint8)
        lq = rng.integers(0, 256, (16, 20, 3), dtype=np.uint8)
        out.append((_record(f"rgb8_{i}", lq, gt, split=("train", "val", "test")[i]), lq, gt))
    grey = rng.integers(0, 256, (12, 9), dtype=np.uint8)
    out.append((_record("grey8", grey, task="deblur"), grey, grey.copy()))
    for i in range(3):  # 12-bit CT-like values stored as 16-bit grey, values up to 4095
        gt = rng.integers(0, 4096, (10, 14), dtype=np.uint16)
        gt[0, 0], gt[0, 1] = 4095, 256
        lq = np.clip(gt.astype(np.int32) + rng.integers(-50, 51, gt.shape), 0, 4095).astype(np.uint16)
        rec = _record(
            f"ct16_{i}",
            lq,
            gt,
            task="ldct",
            split=("train", "train", "val")[i],
            units="HU",
            to_physical={"slope": 1.0, "intercept": -1024.0},
            simulated=i == 2,
        )
        out.append((rec, lq, gt))
    rs = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)
    out.append((_record("sat_0", rs, domain="remote_sensing", task="dehaze", split="test"), rs, rs.copy()))
    return out


def _assert_same(got, expected) -> None:
    assert [r.key for r, _, _ in got] == [r.key for r, _, _ in expected]
    for (r1, lq1, gt1), (r2, lq2, gt2) in zip(got, expected):
        assert r1 == r2
        for a, b in ((lq1, lq2), (gt1, gt2)):
            assert a.dtype == b.dtype and a.shape == b.shape
            np.testing.assert_array_equal(a, b)


def _write_shard(path: Path, samples) -> Path:
    with ShardWriter(str(path.parent / path.name.removesuffix("-00000.tar")), max_samples_per_shard=100) as w:
        for rec, lq, gt in samples:
            w.write(rec, lq, gt)
    assert [Path(s.url).name for s in w.shards] == [path.name]
    return path


def _members(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]


def _rewrite(path: Path, members: list[tuple[str, bytes]]) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    path.write_bytes(buffer.getvalue())


@pytest.fixture
def five_shard(tmp_path) -> tuple[Path, list]:
    """One shard with five 8-bit RGB samples s0..s4."""
    rng = np.random.default_rng(1)
    samples = []
    for i in range(5):
        gt = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
        lq = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
        samples.append((_record(f"s{i}", lq, gt), lq, gt))
    return _write_shard(tmp_path / "shard-00000.tar", samples), samples


# --- images -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "array",
    [
        np.arange(7 * 5, dtype=np.uint8).reshape(7, 5),
        np.random.default_rng(0).integers(0, 256, (6, 9, 3), dtype=np.uint8),
        np.random.default_rng(1).integers(0, 4096, (11, 4), dtype=np.uint16),
        np.array([[0, 255, 256, 4095], [4096, 32768, 65534, 65535]], dtype=np.uint16),
        np.array([[1, 2], [300, 4095]], dtype=">u2"),  # big-endian input is stored by value
    ],
    ids=["u8-grey", "u8-rgb", "u16-12bit", "u16-full-range", "u16-big-endian"],
)
def test_image_round_trip_is_exact(array):
    ext, data = encode_image(array)
    assert ext == "png" and data[:8] == b"\x89PNG\r\n\x1a\n"
    back = decode_image(data)
    assert back.dtype == (np.uint16 if array.dtype.kind == "u" and array.dtype.itemsize == 2 else np.uint8)
    assert back.shape == array.shape
    np.testing.assert_array_equal(back, array)


def test_image_single_channel_axis_decodes_2d():
    array = np.random.default_rng(2).integers(0, 4096, (5, 6, 1), dtype=np.uint16)
    np.testing.assert_array_equal(decode_image(encode_image(array)[1]), array[:, :, 0])


def test_sixteen_bit_png_really_is_sixteen_bit():
    from PIL import Image

    image = Image.open(io.BytesIO(encode_image(np.array([[4095, 0]], dtype=np.uint16))[1]))
    assert image.mode.startswith("I;16")


@pytest.mark.parametrize(
    ("array", "match"),
    [
        (np.zeros((4, 4, 3), np.uint16), "16-bit 3-channel"),
        (np.zeros((4, 4), np.float32), "dtype"),
        (np.zeros((4, 4), np.int16), "dtype"),
        (np.zeros((4, 4, 4), np.uint8), "shape"),
        (np.zeros((4,), np.uint8), "shape"),
    ],
)
def test_unsupported_images_are_rejected(array, match):
    with pytest.raises(fmt.UnsupportedImageError, match=match):
        encode_image(array)


def test_decode_rejects_garbage_and_truncation():
    data = encode_image(np.random.default_rng(3).integers(0, 256, (32, 32, 3), dtype=np.uint8))[1]
    for bad in (b"not a png", data[: len(data) // 2], b""):
        with pytest.raises(fmt.ImageDecodeError):
            decode_image(bad)


# --- keys and records ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["a.b", "a/b", "", "with space", "x" * 201])
def test_invalid_keys_are_rejected(key):
    with pytest.raises(ValueError, match="invalid sample key"):
        fmt.validate_key(key)
    assert "." not in fmt.sanitize_key(key or "x") and "/" not in fmt.sanitize_key(key or "x")


def test_record_schema_is_strict():
    rec = _record("k", np.zeros((2, 2), np.uint8))
    payload = json.loads(rec.model_dump_json())
    for bad in ({"extra": 1}, {"domain": "astro"}, {"bit_depth": 12}, {"split": "dev"}, {"key": "a.b"}):
        with pytest.raises(ValueError):
            SampleRecord.model_validate({**payload, **bad})


def test_writer_validates_samples(tmp_path):
    lq = np.zeros((4, 5), np.uint8)
    with ShardWriter(str(tmp_path / "shard")) as writer:
        writer.write(_record("k0", lq), lq, lq)
        with pytest.raises(ValueError, match="duplicate"):
            writer.write(_record("k0", lq), lq, lq)
        with pytest.raises(ValueError, match="bit_depth"):
            writer.write(_record("k1", lq, bit_depth=16), lq, lq)
        with pytest.raises(ValueError, match="record says"):
            writer.write(_record("k2", lq, height=5), lq, lq)
        with pytest.raises(ValueError, match="split"):
            writer.write(_record("k3", lq, split="val"), lq, lq)
        rgb16 = np.zeros((4, 5, 3), np.uint16)
        with pytest.raises(fmt.UnsupportedImageError):
            writer.write(_record("k4", rgb16), rgb16, rgb16)
    assert writer.shards[0].samples == 1


# --- dataset round trip, manifest ---------------------------------------------------------------------------------


def _build(root: str, s3=None):
    samples = _samples()
    with DatasetWriter(
        root,
        "unit",
        max_samples_per_shard=2,
        s3=s3,
        command=["build", "--x"],
        package_versions={"numpy": np.__version__},
    ) as writer:
        for rec, lq, gt in samples:
            writer.write(rec, lq, gt)
    return writer.manifest, samples


def _by_split(samples, split):
    return [s for s in samples if s[0].split == split]


def test_dataset_round_trip_local(tmp_path):
    manifest, samples = _build(str(tmp_path / "ds"))
    root = tmp_path / "ds"
    assert (root / "manifest.json").is_file()
    read = fmt.read_manifest(str(root))
    assert read == manifest and read.name == "unit" and read.command == ["build", "--x"]
    assert read.format_version == fmt.FORMAT_VERSION and read.created_at.tzinfo is not None
    # shards per split, paths relative to the manifest, checksums and sizes true
    assert {s.split for s in read.shards} == {"train", "val", "test"}
    for entry in read.shards:
        assert entry.path.startswith(f"{entry.split}/shard-") and entry.path.endswith(".tar")
        data = (root / entry.path).read_bytes()
        assert entry.bytes == len(data) and entry.sha256 == hashlib.sha256(data).hexdigest()
        assert 1 <= entry.samples <= 2
    assert read.samples() == len(samples)
    expected_counts = {}
    for rec, _, _ in samples:
        group = (rec.domain, rec.task, rec.split)
        expected_counts[group] = expected_counts.get(group, 0) + 1
    assert {(c.domain, c.task, c.split): c.samples for c in read.counts} == expected_counts
    assert fmt.verify_manifest(str(root)) == []
    # reading a split back gives exactly what was written, in order, metadata included
    for split in ("train", "val", "test"):
        report = CorruptionReport()
        got = list(iter_samples(fmt.manifest_shard_urls(str(root), split), report=report))
        assert report.ok, report.summary()
        _assert_same(got, _by_split(samples, split))
    medical = [r for r, _, _ in iter_samples(fmt.manifest_shard_urls(str(root), "train")) if r.domain == "medical"]
    assert medical[0].units == "HU" and medical[0].to_physical == {"slope": 1.0, "intercept": -1024.0}
    # members follow the WebDataset convention, adjacent per sample
    names = [n for n, _ in _members(root / read.shards[0].path)]
    assert names == [
        "astronaut_crop.json",
        "astronaut_crop.lq.png",
        "astronaut_crop.gt.png",
        "rgb8_0.json",
        "rgb8_0.lq.png",
        "rgb8_0.gt.png",
    ]


def test_shards_are_deterministic(tmp_path):
    first, _ = _build(str(tmp_path / "a"))
    second, _ = _build(str(tmp_path / "b"))
    assert [(s.path, s.sha256) for s in first.shards] == [(s.path, s.sha256) for s in second.shards]


def test_keys_unique_across_splits(tmp_path):
    lq = np.zeros((2, 2), np.uint8)
    with pytest.raises(ValueError, match="duplicate"):
        with DatasetWriter(str(tmp_path / "ds"), "dup") as writer:
            writer.write(_record("same", lq, split="train"), lq, lq)
            writer.write(_record("same", lq, split="val"), lq, lq)
    assert not (tmp_path / "ds" / "manifest.json").exists()  # a failed build leaves no manifest


def test_shard_rolls_over_on_bytes(tmp_path):
    rng = np.random.default_rng(4)
    with ShardWriter(str(tmp_path / "shard"), max_samples_per_shard=1000, max_bytes_per_shard=40_000) as writer:
        for i in range(6):
            img = rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)  # ~7 kB per PNG, incompressible
            writer.write(_record(f"k{i}", img), img, img)
    assert len(writer.shards) > 1 and all(s.bytes <= 40_000 for s in writer.shards)
    assert sum(s.samples for s in writer.shards) == 6
    assert [Path(s.url).name for s in writer.shards][:2] == ["shard-00000.tar", "shard-00001.tar"]


def test_verify_manifest_detects_modified_and_missing_shards(tmp_path):
    manifest, _ = _build(str(tmp_path / "ds"))
    root = tmp_path / "ds"
    first, second = root / manifest.shards[0].path, root / manifest.shards[1].path
    data = bytearray(first.read_bytes())
    data[700] ^= 0xFF  # same size, different content
    first.write_bytes(bytes(data))
    second.unlink()
    problems = fmt.verify_manifest(str(root))
    assert any("checksum mismatch" in p and manifest.shards[0].path in p for p in problems)
    assert any("missing shard" in p and manifest.shards[1].path in p for p in problems)
    assert len(problems) == 2


def test_manifest_rejects_escaping_paths():
    with pytest.raises(ValueError):
        fmt.ShardEntry(path="../x.tar", sha256="0" * 64, samples=1, bytes=1, split="train")


# --- atomic writes ------------------------------------------------------------------------------------------------


def test_atomic_write_leaves_nothing_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "out" / "shard-00000.tar"
    real_fdopen = os.fdopen

    class HalfWriter:
        def __init__(self, handle):
            self.handle = handle

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

        def write(self, data):
            self.handle.write(data[: len(data) // 2])
            self.handle.flush()
            raise OSError("disk full (simulated)")

    monkeypatch.setattr(storage.os, "fdopen", lambda fd, mode: HalfWriter(real_fdopen(fd, mode)))
    with pytest.raises(OSError, match="simulated"):
        storage.atomic_write_bytes(str(target), b"x" * 10_000)
    assert not target.exists()
    assert list(target.parent.iterdir()) == []  # the temporary file is gone too

    # an existing file is never replaced by a partial one
    monkeypatch.undo()
    storage.atomic_write_bytes(str(target), b"old")
    monkeypatch.setattr(storage.os, "fdopen", lambda fd, mode: HalfWriter(real_fdopen(fd, mode)))
    with pytest.raises(OSError):
        storage.atomic_write_bytes(str(target), b"new" * 1000)
    assert target.read_bytes() == b"old" and [p.name for p in target.parent.iterdir()] == [target.name]


def test_interrupted_shard_build_leaves_no_partial_shard(tmp_path, monkeypatch):
    lq = np.zeros((4, 4), np.uint8)
    calls = {"n": 0}
    real = storage.atomic_write_bytes

    def failing(url, data, s3=None):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("killed mid-write (simulated)")
        real(url, data, s3)

    monkeypatch.setattr(storage, "atomic_write_bytes", failing)
    with pytest.raises(OSError):
        with ShardWriter(str(tmp_path / "shard"), max_samples_per_shard=2) as writer:
            for i in range(5):
                writer.write(_record(f"k{i}", lq), lq, lq)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard-00000.tar"]  # complete shard only
    assert len(list(iter_samples(str(tmp_path / "shard-00000.tar")))) == 2


# --- corrupt shards -----------------------------------------------------------------------------------------------


def _keys(got):
    return [r.key for r, _, _ in got]


def test_truncated_shard_keeps_complete_samples(five_shard):
    path, samples = five_shard
    with tarfile.open(path) as tar:
        member = tar.getmember("s2.lq.png")
    cut = member.offset_data + member.size // 2  # in the middle of the 3rd sample
    path.write_bytes(path.read_bytes()[:cut])
    report = CorruptionReport()
    got = list(iter_samples([str(path)], report=report))
    _assert_same(got, samples[:2])
    assert len(report.skipped) == 1
    shard, key, reason = report.skipped[0]
    assert shard == str(path) and key == "s2" and "truncated" in reason
    assert "s2" in report.summary() and str(path) in report.summary()
    with pytest.raises(CorruptSampleError) as info:
        list(iter_samples([str(path)], on_error="raise"))
    assert info.value.shard == str(path) and info.value.key == "s2"
    assert "s2" in str(info.value) and str(path) in str(info.value)


@pytest.mark.parametrize("where", ["member boundary", "inside header", "end marker"])
def test_truncation_between_members_is_detected(five_shard, where):
    path, samples = five_shard
    with tarfile.open(path) as tar:
        s3 = tar.getmember("s3.json")
        end_of_s4 = tar.getmember("s4.gt.png").offset_data + 512 * ((tar.getmember("s4.gt.png").size + 511) // 512)
    cut = {"member boundary": s3.offset, "inside header": s3.offset + 100, "end marker": end_of_s4 + 512}[where]
    path.write_bytes(path.read_bytes()[:cut])
    report = CorruptionReport()
    got = list(iter_samples([str(path)], report=report))
    expected = samples if where == "end marker" else samples[:3]
    _assert_same(got, expected)  # every complete sample before the cut
    assert len(report.skipped) == 1 and report.skipped[0][1] is None and "truncated" in report.skipped[0][2]


def test_cut_inside_last_member_of_a_sample(five_shard):
    path, samples = five_shard
    with tarfile.open(path) as tar:
        member = tar.getmember("s1.gt.png")
    path.write_bytes(path.read_bytes()[: member.offset_data + 10])
    report = CorruptionReport()
    _assert_same(list(iter_samples(str(path), report=report)), samples[:1])
    assert [(k, "truncated" in r) for _, k, r in report.skipped] == [("s1", True)]


def _corrupt(five_shard, mutate):
    path, samples = five_shard
    members = _members(path)
    _rewrite(path, mutate(members))
    report = CorruptionReport()
    got = list(iter_samples([str(path)], report=report))
    return path, samples, got, report


@pytest.mark.parametrize(
    ("case", "mutate", "reason"),
    [
        (
            "undecodable image",
            lambda m: [(n, b"\x89PNG garbage" if n == "s2.gt.png" else d) for n, d in m],
            "undecodable gt.png",
        ),
        (
            "truncated image",
            lambda m: [(n, d[: len(d) // 2] if n == "s2.lq.png" else d) for n, d in m],
            "undecodable lq.png",
        ),
        ("bad json", lambda m: [(n, b'{"key": "s2", ' if n == "s2.json" else d) for n, d in m], "bad JSON"),
        (
            "schema",
            lambda m: [(n, d.replace(b'"natural"', b'"astro"') if n == "s2.json" else d) for n, d in m],
            "schema",
        ),
        (
            "extra field",
            lambda m: [(n, d.replace(b"{", b'{"colour": 1, ', 1) if n == "s2.json" else d) for n, d in m],
            "schema",
        ),
        (
            "record mismatch",
            lambda m: [(n, d.replace(b'"height":16', b'"height":17') if n == "s2.json" else d) for n, d in m],
            "do not match the record",
        ),
        ("missing member", lambda m: [(n, d) for n, d in m if n != "s2.lq.png"], "missing member(s): lq.png"),
        (
            "key mismatch",
            lambda m: [(n, d.replace(b'"key":"s2"', b'"key":"s9"') if n == "s2.json" else d) for n, d in m],
            "does not match member key",
        ),
    ],
)
def test_corrupt_sample_is_skipped_and_reported(five_shard, case, mutate, reason):
    path, samples, got, report = _corrupt(five_shard, mutate)
    _assert_same(got, samples[:2] + samples[3:])  # every other sample intact
    assert len(report.skipped) == 1, report.summary()
    shard, key, why = report.skipped[0]
    assert (shard, key) == (str(path), "s2") and reason in why, why
    with pytest.raises(CorruptSampleError, match="s2"):
        list(iter_samples([str(path)], on_error="raise"))


@pytest.mark.parametrize("parts", [2, 3])
def test_parts_of_a_shard_yield_every_sample_once(five_shard, parts):
    path, samples = five_shard
    got = [list(iter_samples(str(path), part=(i, parts))) for i in range(parts)]
    assert [_keys(g) for g in got][0] == [f"s{i}" for i in range(0, 5, parts)]
    merged = sorted((x for g in got for x in g), key=lambda x: x[0].key)
    _assert_same(merged, samples)
    with pytest.raises(ValueError, match="part"):
        list(iter_samples(str(path), part=(2, 2)))


@pytest.mark.parametrize("cut_shard", [False, True])
def test_parts_report_each_problem_once(five_shard, cut_shard):
    path, samples = five_shard
    members = _members(path)
    _rewrite(path, [(n, b"x" if n == "s3.gt.png" else d) for n, d in members])
    if cut_shard:  # and damage the shard itself after s4 (reported by part 0 only)
        with tarfile.open(path) as tar:
            last = tar.getmember("s4.gt.png")
        path.write_bytes(path.read_bytes()[: last.offset_data + 512 * ((last.size + 511) // 512) + 512])
    reports = [CorruptionReport() for _ in range(2)]
    got = [list(iter_samples(str(path), report=reports[i], part=(i, 2))) for i in range(2)]
    assert sorted(k for g in got for k in _keys(g)) == ["s0", "s1", "s2", "s4"]
    sample_problems = [(i, k) for i, r in enumerate(reports) for _, k, _ in r.skipped if k is not None]
    shard_problems = [i for i, r in enumerate(reports) for _, k, _ in r.skipped if k is None]
    assert sample_problems == [(1, "s3")]  # s3 is the 4th sample: part 1 of 2 owns it
    assert shard_problems == ([0] if cut_shard else [])


def test_several_problems_in_several_shards(tmp_path, five_shard):
    path, samples = five_shard
    members = _members(path)
    other = tmp_path / "other-00000.tar"
    _rewrite(other, [(n, b"{" if n == "s0.json" else d) for n, d in members])
    _rewrite(path, [(n, b"x" if n == "s4.gt.png" else d) for n, d in members])
    missing = str(tmp_path / "nope-00000.tar")
    report = CorruptionReport()
    got = list(iter_samples([str(path), missing, str(other)], report=report))
    assert _keys(got) == ["s0", "s1", "s2", "s3", "s1", "s2", "s3", "s4"]
    assert [(s, k) for s, k, _ in report.skipped] == [(str(path), "s4"), (missing, None), (str(other), "s0")]
    assert report.summary().startswith("3 corrupt sample(s) skipped in 3 shard(s)")


def test_not_a_tar_and_damaged_header(tmp_path, five_shard):
    path, samples = five_shard
    junk = tmp_path / "junk-00000.tar"
    junk.write_bytes(b"hello" * 300)
    report = CorruptionReport()
    assert list(iter_samples(str(junk), report=report)) == []
    assert report.skipped[0][:2] == (str(junk), None)
    # a damaged header in the middle: samples before it survive, the damage is reported
    with tarfile.open(path) as tar:
        offset = tar.getmember("s3.json").offset
    data = bytearray(path.read_bytes())
    data[offset + 148 : offset + 156] = b"garbage!"  # header checksum field
    path.write_bytes(bytes(data))
    report = CorruptionReport()
    _assert_same(list(iter_samples(str(path), report=report)), samples[:3])
    assert len(report.skipped) == 1 and "damaged" in report.skipped[0][2]


# --- S3 (moto) ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def s3_bucket(s3_server):
    import boto3

    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=BUCKET)
    return storage.S3Settings(endpoint_url=s3_server)


def test_s3_settings_from_environment(s3_server):
    settings = storage.S3Settings(endpoint_url=s3_server)
    assert settings.access_key == "testing" and settings.secret_key.get_secret_value() == "testing"
    assert "secret_key=SecretStr('**********')" in repr(settings)  # secrets never printed
    assert storage.S3Settings(access_key="k", secret_key="s").access_key == "k"  # explicit values win


def test_s3_round_trip_matches_local(tmp_path, s3_bucket):
    url = f"s3://{BUCKET}/datasets/unit"
    manifest, samples = _build(url, s3=s3_bucket)
    local, _ = _build(str(tmp_path / "ds"))
    assert [(s.path, s.sha256, s.bytes) for s in manifest.shards] == [(s.path, s.sha256, s.bytes) for s in local.shards]
    assert fmt.read_manifest(url, s3_bucket) == manifest
    assert fmt.verify_manifest(url, s3_bucket) == []
    listed = storage.list_files(url, ".tar", s3_bucket)
    assert sorted(listed) == sorted(storage.join_url(url, s.path) for s in manifest.shards)
    assert all(u.startswith(f"s3://{BUCKET}/datasets/unit/") for u in listed)
    for split in ("train", "val", "test"):
        report = CorruptionReport()
        got = list(iter_samples(fmt.manifest_shard_urls(url, split, s3_bucket), s3=s3_bucket, report=report))
        assert report.ok, report.summary()
        _assert_same(got, _by_split(samples, split))
    # the fsspec view sees the same objects
    fs, path = storage.fsspec_filesystem(url, s3_bucket)
    assert fs.cat_file(f"{path}/manifest.json") == storage.read_bytes(storage.join_url(url, "manifest.json"), s3_bucket)


def test_s3_corruption_and_verify(s3_bucket, five_shard):
    path, samples = five_shard
    with tarfile.open(path) as tar:
        member = tar.getmember("s2.lq.png")
    url = f"s3://{BUCKET}/corrupt/shard-00000.tar"
    storage.atomic_write_bytes(url, path.read_bytes()[: member.offset_data + 5], s3_bucket)
    report = CorruptionReport()
    got = list(iter_samples([url], s3=s3_bucket, report=report))
    _assert_same(got, samples[:2])
    assert [(s, k) for s, k, _ in report.skipped] == [(url, "s2")]
    # a shard modified on S3 is caught by verify_manifest
    ds = f"s3://{BUCKET}/datasets/verify"
    manifest, _ = _build(ds, s3=s3_bucket)
    storage.atomic_write_bytes(storage.join_url(ds, manifest.shards[0].path), b"tampered", s3_bucket)
    problems = fmt.verify_manifest(ds, s3_bucket)
    assert len(problems) == 2 and all(manifest.shards[0].path in p for p in problems)


# --- Ray Data -----------------------------------------------------------------------------------------------------


@pytest.mark.ray
def test_ray_reads_shards(tmp_path, ray_local):
    ray = ray_local
    manifest, samples = _build(str(tmp_path / "ds"))
    urls = fmt.manifest_shard_urls(str(tmp_path / "ds"), "train")
    fs, _ = storage.filesystem(str(tmp_path / "ds"))
    expected = {r.key: (r, lq, gt) for r, lq, gt in _by_split(samples, "train")}

    # default decoder: PNG -> numpy via PIL (8-bit: uint8; 16-bit grey: uint16, exact), json -> dict
    rows = ray.data.read_webdataset(urls, filesystem=fs).take_all()
    assert {r["__key__"] for r in rows} == set(expected)
    for row in rows:
        assert {"__key__", "__url__", "json", "lq.png", "gt.png"} <= set(row)
        rec, lq, gt = expected[row["__key__"]]
        assert SampleRecord.model_validate(row["json"]) == rec
        for name, ref in (("lq.png", lq), ("gt.png", gt)):
            value = np.asarray(row[name])
            assert value.dtype == ref.dtype and value.shape == ref.shape, (row["__key__"], name, value.dtype)
            np.testing.assert_array_equal(value, ref)

    # decoder=None keeps raw bytes; decode_sample applies the same checks as iter_samples
    raw = ray.data.read_webdataset(urls, filesystem=fs, decoder=None).take_all()
    assert all(isinstance(r["lq.png"], bytes) and isinstance(r["json"], bytes) for r in raw)
    _assert_same(
        sorted((sh.decode_sample(r) for r in raw), key=lambda s: s[0].key),
        sorted(expected.values(), key=lambda s: s[0].key),
    )
    bad = dict(raw[0], **{"gt.png": b"junk"})
    with pytest.raises(CorruptSampleError, match=raw[0]["__key__"]):
        sh.decode_sample(bad)
    with pytest.raises(CorruptSampleError, match="missing member"):
        sh.decode_sample(dict(raw[0], **{"lq.png": float("nan")}))  # how a block reports an absent member


@pytest.mark.ray
def test_ray_reads_shards_from_s3(ray_local, s3_bucket):
    ray = ray_local
    url = f"s3://{BUCKET}/datasets/ray"
    _, samples = _build(url, s3=s3_bucket)
    fs, _ = storage.filesystem(url, s3_bucket)
    paths = [u.removeprefix("s3://") for u in fmt.manifest_shard_urls(url, "val", s3_bucket)]
    rows = ray.data.read_webdataset(paths, filesystem=fs, decoder=None).take_all()
    _assert_same(
        sorted((sh.decode_sample(r) for r in rows), key=lambda s: s[0].key),
        sorted(_by_split(samples, "val"), key=lambda s: s[0].key),
    )
