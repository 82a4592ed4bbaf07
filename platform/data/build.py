"""Build a multi-domain (degraded, clean) WebDataset: the embedded default corpus, users' paired folders, or users'
clean folders plus a list of tasks.

Splits are made **by source image** (no source in two splits), every sample records its degradation parameters and
seed, and the manifest records the command and the package versions of the image sources.
"""

from __future__ import annotations

import functools
import hashlib
import os
import sys
from collections import Counter, deque
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image
from pydantic import Field, model_validator
from tqdm import tqdm

from datprl.platform.config import StrictModel, parse_cli
from datprl.platform.data.conventions import white_level
from datprl.platform.data.degradations import GRAYSCALE_ONLY_TASKS, TASKS, degrade
from datprl.platform.data.shards import DatasetWriter
from datprl.platform.data.format import (
    MANIFEST_NAME,
    SampleRecord,
    decode_image,
    default_package_versions,
    manifest_url,
)
from datprl.platform.storage import S3Settings, atomic_write_bytes, exists, join_url

Split = Literal["train", "val", "test"]

# Which paper task applies to which kind of clean image (the paper's tasks per domain, arXiv 2603.01725).
# PET has no real data on any registry: counts are simulated from the nuclear-medicine scan and from MR slices
# used as activity-like images (labelled simulated). The CT perfusion map is not an attenuation image: no task.
NATURAL_TASKS = ("sr_x4", "derain", "motion_deblur")

#: Packages and source groups held out whole as the cross-source test split of the default corpus: the model never
#: trains on any image they ship, so the test split measures restoration of unseen sources (one set per domain).
CROSS_SOURCE_TEST: tuple[str, ...] = (
    "tuxpaint-data",
    "palapeli-data",
    "scribus-template",
    "glymur",  # natural: 28 photos from 4 packages
    "localtileserver",
    "r-cran-rgdal",
    "PyWavelets",  # remote sensing: Landsat 7, greyscale satellite, aerial
    "totalsegmentator",  # CT: a chest CT angiography (another scanner, site and protocol than the training CTs)
    "mricron-data",  # MR (and PET simulated from it): the Colin27 single-subject T1
)
DEFAULT_TASKS_BY_MODALITY: dict[str, tuple[str, ...]] = {
    "photo": NATURAL_TASKS,
    "astronomy": NATURAL_TASKS,
    "fundus": NATURAL_TASKS,
    "microscopy": NATURAL_TASKS,
    "mr": ("mri_sr_x4", "pet_low_count"),
    "ct": ("ct_low_dose",),
    "ct_perfusion": (),
    "nm": ("pet_low_count",),
    "sentinel2_rgb": ("rs_sr_x4", "cloud", "haze"),
    "landsat_rgb": ("rs_sr_x4", "cloud", "haze"),
    "satellite_grey": ("rs_sr_x4", "cloud", "haze"),
    "satellite_mosaic": ("rs_sr_x4", "cloud", "haze"),
    "aerial": ("rs_sr_x4", "cloud", "haze"),
}


class PairedFolders(StrictModel):
    """Users' paired data: LQ and GT folders with matching file names (the layout of the paper's benchmarks)."""

    lq_dir: Path
    gt_dir: Path
    domain: Literal["natural", "medical", "remote_sensing"]
    task: str = Field(description="task label recorded with every pair, e.g. derain")
    split: Split = "train"


class CleanFolder(StrictModel):
    """Users' clean images, degraded here with the listed tasks."""

    dir: Path
    domain: Literal["natural", "medical", "remote_sensing"]
    tasks: list[str]


class BuildConfig(StrictModel):
    """Build a dataset of WebDataset shards plus manifest.json. With no arguments: the embedded default corpus."""

    output: str = Field("data/default", description="local folder or s3://bucket/prefix")
    s3: S3Settings | None = None
    paired: PairedFolders | None = None
    clean: CleanFolder | None = None
    extra_tasks: list[str] = Field(
        default_factory=list, description="classic natural tasks to add, e.g. [denoise_25, jpeg]"
    )
    tile: int = Field(256, ge=32, description="clean images are cut into tiles of this size (pixels)")
    max_tiles_per_source: int = Field(2, ge=1, description="tiles per natural or remote-sensing source image")
    max_tiles_per_eval_source: int = Field(
        1,
        ge=1,
        description="tiles per source in val and test: every model "
        "evaluation pays for each one, and another tile of the same image adds "
        "little",
    )
    max_tiles_per_scan: int = Field(
        1,
        ge=1,
        description="tiles per medical slice: a volume's many slices already vary "
        "its anatomy, and low-dose CT costs about a second per tile to simulate",
    )
    samples_per_tile: int = Field(1, ge=1, description="degraded versions per (tile, task), each with its own seed")
    val_sources: int = Field(
        8,
        ge=0,
        description="sources per modality held out for validation, taken as whole "
        "groups (scene, volume, photo set) of the training packages",
    )
    test_sources: int = Field(
        1,
        ge=0,
        description="sources per modality held out for testing when no package is held "
        "out (users' clean folders); the default corpus uses cross_source_test instead",
    )
    cross_source_test: list[str] = Field(
        default_factory=lambda: list(CROSS_SOURCE_TEST),
        description="packages (or source groups) held out whole as the test split: it measures restoration of "
        "sources the model never saw in training",
    )
    max_samples_per_shard: int = Field(256, ge=1)
    png_compress_level: int = Field(
        1,
        ge=0,
        le=9,
        description="zlib level of the shards' PNGs (lossless at every level): 1 writes the default corpus's 3,054 "
        "images in about a third of the CPU time of PIL's default 6, for files about 9 % larger",
    )
    max_sources_per_group: int | None = Field(
        None,
        ge=1,
        description="a smaller corpus for quick runs and tests: at most this many sources of each group "
        "(scene, volume, photo set), evenly spaced; every group, package and modality stays in",
    )
    workers: int | None = Field(
        None,
        ge=1,
        description="processes synthesising the degradations (None = one per "
        "CPU); the dataset's bytes do not depend on it",
    )
    seed: int = 0
    contact_sheet: bool = True

    @model_validator(mode="after")
    def _check(self) -> "BuildConfig":
        if self.paired is not None and self.clean is not None:
            raise ValueError("give either paired or clean folders, not both")
        for task in [*self.extra_tasks, *(self.clean.tasks if self.clean else [])]:
            if task not in TASKS:
                raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
        rgb_only = [t for t in self.extra_tasks if t in GRAYSCALE_ONLY_TASKS]
        if rgb_only:  # extra tasks run on the RGB natural images, which these tasks reject
            raise ValueError(
                f"extra_tasks {rgb_only} need single-channel scans; extra_tasks apply to the natural (RGB) images only"
            )
        return self


@dataclass
class PendingSample:
    key: str
    record: dict
    lq: np.ndarray
    gt: np.ndarray


def _stable_int(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:4], "little")


@dataclass(frozen=True)
class SplitUnit:
    """What the split of one source depends on: its modality (splits are balanced per modality), the group it was cut
    from (scene, volume, photo set: never split across train/val/test) and its package."""

    source_id: str
    modality: str
    group: str
    package: str


def assign_splits(
    units: Iterable[SplitUnit], val: int, test: int, seed: int, held_out: Collection[str] = ()
) -> dict[str, Split]:
    """Split sources by group, never by tile or slice. Returns ``{source_id: split}``.

    * ``test``: every source whose package or group is in ``held_out`` (the cross-source test: whole packages or
      volumes the model never sees). With nothing held out, ``test`` sources per modality, taken as whole groups as
      ``val`` is.
    * ``val``: per modality, whole groups of what is left, in a seeded order, until at least ``val`` sources are in
      val. A group that would take val past twice that is passed over, unless val is still empty and no smaller group
      remains; beyond val's first group, training keeps at least half of the modality's sources, and always one group.
    """
    units = list(units)
    splits: dict[str, Split] = {u.source_id: "test" for u in units if u.package in held_out or u.group in held_out}
    by_modality: dict[str, dict[str, list[str]]] = {}
    for unit in units:
        if unit.source_id not in splits:
            by_modality.setdefault(unit.modality, {}).setdefault(unit.group, []).append(unit.source_id)

    def take(groups: dict[str, list[str]], wanted: int, split: Split) -> None:
        order = sorted(groups, key=lambda g: _stable_int(seed, g))
        limit = sum(map(len, groups.values())) // 2  # training keeps at least half of each modality's sources
        taken = 0
        for group in order:
            left = [g for g in order if g in groups and g != group]
            if taken >= wanted or not left:
                break
            size = len(groups[group])
            if taken > 0 and (taken + size > limit or taken + size > 2 * wanted):
                continue
            if taken + size > 2 * wanted and any(taken + len(groups[g]) <= 2 * wanted for g in left):
                continue
            splits.update((source_id, split) for source_id in groups.pop(group))
            taken += size

    for groups in by_modality.values():
        if not held_out:
            take(groups, test, "test")
        take(groups, val, "val")
        splits.update((source_id, "train") for members in groups.values() for source_id in members)
    return splits


def tiles(image: np.ndarray, size: int, limit: int, min_std: float = 0.02) -> list[tuple[int, int, np.ndarray]]:
    """Up to ``limit`` non-overlapping ``size`` tiles (row-major, evenly spread); smaller images are one tile.

    Near-empty tiles (std below ``min_std`` of the image's maximum, e.g. the air around a scan) are skipped
    unless nothing else is left."""
    h, w = image.shape[:2]
    if h < size or w < size:
        return [(0, 0, image)]
    positions = [(r, c) for r in range(0, h - size + 1, size) for c in range(0, w - size + 1, size)]
    peak = float(image.max()) or 1.0
    busy = [(r, c) for r, c in positions if image[r : r + size, c : c + size].std() >= min_std * peak] or positions
    step = max(1, len(busy) // limit)
    return [(r, c, image[r : r + size, c : c + size]) for r, c in busy[::step][:limit]]


def _float(image: np.ndarray, white: int) -> np.ndarray:
    return image.astype(np.float32) / float(white)


def _stored(degraded: np.ndarray, dtype: np.dtype, white: int) -> np.ndarray:
    return np.clip(np.round(degraded * white), 0, white).astype(dtype)


def synthesize(
    source_id: str, image: np.ndarray, tasks: tuple[str, ...], config: BuildConfig, meta: dict
) -> Iterator[PendingSample]:
    """Degraded/clean pairs of one clean source image for each task, seeded by (config seed, source, tile, task, i)."""
    white = white_level(meta.get("white_level"), dtype=image.dtype)
    if meta.get("split") in ("val", "test"):  # more sources, not more tiles of one source, make a better estimate
        limit = config.max_tiles_per_eval_source
    else:
        limit = config.max_tiles_per_scan if meta.get("domain") == "medical" else config.max_tiles_per_source
    for r, c, tile in tiles(image, config.tile, limit):
        clean = _float(tile, white)
        for task in tasks:
            for i in range(config.samples_per_tile):
                seed = _stable_int(config.seed, source_id, r, c, task, i)
                degraded, params = degrade(task, clean, seed)
                key = hashlib.sha1(f"{source_id}/{r}/{c}/{task}/{i}".encode()).hexdigest()[:20]
                record = {
                    **meta,
                    "key": key,
                    "task": task,
                    "source_id": source_id,
                    "degradation": params,
                    "seed": seed,
                    "tile": (r, c),
                    "white_level": white,
                    "bit_depth": 8 if tile.dtype == np.uint8 else 16,
                    "channels": 1 if tile.ndim == 2 else 3,
                    "height": int(tile.shape[0]),
                    "width": int(tile.shape[1]),
                    "simulated": bool(TASKS[task].simulated_note) or meta.get("simulated", False),
                }
                yield PendingSample(key, record, _stored(degraded, tile.dtype, white), tile)


def _white(sample: PendingSample) -> int:
    """The sample's full-scale stored value (paired-folder records carry none: the container's maximum)."""
    return white_level(sample.record.get("white_level"), dtype=sample.gt.dtype)


def contact_sheet(samples: dict[tuple[str, str], PendingSample], path: Path, size: int = 160) -> Path:
    """One (degraded | clean) pair per (domain, task), labelled, so a person can look at every degradation."""
    from PIL import ImageDraw

    rows = []
    for (domain, task), sample in sorted(samples.items()):
        pair = []
        for image in (sample.lq, sample.gt):
            white = _white(sample)
            view = np.clip(image.astype(np.float32) / white * 255, 0, 255).astype(np.uint8)
            if view.ndim == 2:
                view = np.repeat(view[..., None], 3, axis=-1)
            pair.append(np.asarray(Image.fromarray(view).resize((size, size), Image.BICUBIC)))
        label = np.full((size, 150, 3), 255, np.uint8)
        canvas = Image.fromarray(label)
        ImageDraw.Draw(canvas).text((5, size // 2 - 10), f"{domain}\n{task}", fill=(0, 0, 0))
        rows.append(np.concatenate([np.asarray(canvas), *pair], axis=1))
    sheet = np.concatenate(rows, axis=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(sheet).save(path)
    return path


def count_table(counts: Counter) -> str:
    """Markdown table of samples per (domain, task, split)."""
    lines = ["| domain | task | train | val | test |", "| --- | --- | --- | --- | --- |"]
    pairs = sorted({(d, t) for d, t, _ in counts})
    for d, t in pairs:
        lines.append(f"| {d} | {t} | {counts[(d, t, 'train')]} | {counts[(d, t, 'val')]} | {counts[(d, t, 'test')]} |")
    return "\n".join(lines)


@dataclass
class Job:
    """One clean image and the tasks to synthesise from it (picklable: worker processes run it)."""

    source_id: str
    load: Callable[[], np.ndarray]  # () -> ndarray as stored (uint8 / uint16); a module-level function or partial
    tasks: tuple[str, ...]
    meta: dict  # SampleRecord fields shared by every sample of this source (domain, split, package, units...)


@functools.lru_cache(maxsize=1)
def _catalogue_by_id() -> dict:
    from datprl.platform.data import sources

    return {source.id: source for source in sources.catalogue()}


def _load_catalogued(source_id: str) -> np.ndarray:
    """A catalogued source's stored image, looked up by id (picklable, unlike the catalogue's own closures)."""
    return _catalogue_by_id()[source_id].load()


def _run_job(job: Job, config: BuildConfig) -> list[PendingSample]:
    return list(synthesize(job.source_id, job.load(), job.tasks, config, job.meta))


def synthesize_jobs(jobs: Sequence[Job], config: BuildConfig) -> Iterator[PendingSample]:
    """Every job's samples, in job order, synthesised by ``config.workers`` processes.

    The degradations cost 10 ms (SR) to 1 s (low-dose CT: a radon transform and two filtered back-projections) per
    256 px tile, so the default corpus is synthesised in parallel; the seeds depend only on (source, tile, task), and
    results are consumed in job order, so the dataset's bytes do not depend on the number of workers. At most a few
    jobs per worker are in flight, which bounds the memory held by finished but unwritten samples."""
    workers = min(config.workers or os.cpu_count() or 1, len(jobs))
    if workers <= 1:
        for job in jobs:
            yield from _run_job(job, config)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # spawn, not fork: the caller may hold threads (Ray, tqdm) that a forked child would inherit half-way.
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        pending: deque = deque()
        for job in jobs:
            pending.append(pool.submit(_run_job, job, config))
            if len(pending) >= 4 * workers:
                yield from pending.popleft().result()
        while pending:
            yield from pending.popleft().result()


def _thin_groups(sources: list, per_group: int) -> list:
    """At most ``per_group`` sources of each group, evenly spaced in catalogue order (catalogue order kept)."""
    members: dict[str, list] = {}
    for source in sources:
        members.setdefault(source.group, []).append(source.id)
    keep = set()
    for ids in members.values():
        picks = np.linspace(0, len(ids) - 1, min(per_group, len(ids))).round().astype(int)
        keep.update(ids[i] for i in picks)
    return [source for source in sources if source.id in keep]


def _default_jobs(config: BuildConfig) -> tuple[list[Job], dict[str, str], dict[str, str]]:
    from datprl.platform.data import sources

    catalogue = sources.catalogue()
    if not catalogue:
        raise RuntimeError("no clean source images are installed; run infra/setup.sh (it installs the image packages)")
    usable = [s for s in catalogue if DEFAULT_TASKS_BY_MODALITY.get(s.modality, ()) or s.domain == "natural"]
    if config.max_sources_per_group is not None:
        usable = _thin_groups(usable, config.max_sources_per_group)
    splits = assign_splits(
        [SplitUnit(s.id, s.modality, s.group, s.package) for s in usable],
        config.val_sources,
        config.test_sources,
        config.seed,
        held_out=config.cross_source_test,
    )
    jobs = []
    for src in usable:
        tasks = DEFAULT_TASKS_BY_MODALITY.get(src.modality, NATURAL_TASKS if src.domain == "natural" else ())
        if src.domain == "natural":
            tasks = tuple(dict.fromkeys((*tasks, *config.extra_tasks)))  # a repeated task would repeat keys
        meta = dict(
            domain=src.domain,
            split=splits[src.id],
            source_package=f"{src.package}=={src.package_version}",
            source_group=src.group,
            units=src.units,
            to_physical=src.to_physical,
            modality=src.modality,
            white_level=src.white_level,
        )
        jobs.append(Job(src.id, functools.partial(_load_catalogued, src.id), tasks, meta))
    # Interleave domains and tasks in the shards (a seeded order, not the catalogue's domain-by-domain one): a stream
    # read shard by shard then meets every task early, instead of only natural images for its first minutes.
    jobs.sort(key=lambda job: _stable_int(config.seed, "order", job.source_id))
    return jobs, sources.package_versions(usable), sources.package_licences(usable)


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


def _read_file(path: Path) -> np.ndarray:
    """A user image as stored: 8-bit RGB/gray or 16-bit gray (other modes are converted to 8-bit RGB)."""
    try:
        image = decode_image(path.read_bytes())
    except Exception as error:  # noqa: BLE001 - report which file failed and why
        raise ValueError(f"cannot read image {path}: {error}") from None
    if image.ndim == 3 and image.shape[-1] == 4:
        image = image[..., :3]
    return image


def _folder_images(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        raise FileNotFoundError(f"folder {folder} not found")
    files = {p.stem: p for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES}
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    return files


def _clean_folder_jobs(clean: CleanFolder, config: BuildConfig) -> list[Job]:
    files = _folder_images(clean.dir)
    units = [SplitUnit(name, "user", name, "user-folder") for name in files]
    splits = assign_splits(units, config.val_sources, config.test_sources, config.seed)
    return [
        Job(
            f"{clean.dir.name}/{name}",
            functools.partial(_read_file, path),
            tuple(dict.fromkeys(clean.tasks)),
            dict(domain=clean.domain, split=splits[name], source_package="user-folder"),
        )
        for name, path in files.items()
    ]


def _paired_samples(paired: PairedFolders) -> Iterator[PendingSample]:
    lq_files, gt_files = _folder_images(paired.lq_dir), _folder_images(paired.gt_dir)
    unmatched = sorted(set(lq_files) ^ set(gt_files))
    if unmatched:
        raise ValueError(
            f"{len(unmatched)} file name(s) appear in only one of {paired.lq_dir} and {paired.gt_dir} "
            f"(e.g. {unmatched[:3]}); paired folders need matching file names"
        )
    for name in sorted(gt_files):
        lq, gt = _read_file(lq_files[name]), _read_file(gt_files[name])
        if lq.ndim != gt.ndim or lq.dtype != gt.dtype:
            raise ValueError(
                f"{name}: input and target differ in channels or bit depth "
                f"({lq.shape}/{lq.dtype} vs {gt.shape}/{gt.dtype})"
            )
        key = hashlib.sha1(f"{paired.gt_dir}/{name}".encode()).hexdigest()[:20]
        record = dict(
            key=key,
            domain=paired.domain,
            task=paired.task,
            split=paired.split,
            source_id=f"{paired.gt_dir.name}/{name}",
            source_package="user-folder",
            degradation={"given": "paired folders", "lq_file": lq_files[name].name},
            seed=0,
            bit_depth=8 if gt.dtype == np.uint8 else 16,
            channels=1 if gt.ndim == 2 else 3,
            height=int(gt.shape[0]),
            width=int(gt.shape[1]),
        )
        yield PendingSample(key, record, lq, gt)


def build(config: BuildConfig, command: list[str] | None = None) -> dict:
    """Write the dataset described by ``config``; returns a summary (counts, manifest path, contact sheet)."""
    versions: dict[str, str] = {}
    licences: dict[str, str] = {}
    if config.paired is not None:
        samples: Iterator[PendingSample] = _paired_samples(config.paired)
        total = None
    else:
        if config.clean is not None:
            jobs = _clean_folder_jobs(config.clean, config)
        else:
            jobs, versions, licences = _default_jobs(config)
        samples = synthesize_jobs(jobs, config)
        total = None
    counts: Counter = Counter()
    examples: dict[tuple[str, str], PendingSample] = {}
    name = Path(config.output.rstrip("/")).name or "dataset"
    with DatasetWriter(
        config.output,
        name,
        config.max_samples_per_shard,
        config.s3,
        compress_level=config.png_compress_level,
        command=command,
        package_versions={**default_package_versions(), **versions},
        metadata={"config": config.model_dump(mode="json"), "source_licences": licences},
    ) as writer:
        for sample in tqdm(samples, total=total, desc="samples", unit="pair", disable=None):
            record = SampleRecord.model_validate(sample.record)
            writer.write(record, sample.lq, sample.gt)
            counts[(record.domain, record.task, record.split)] += 1
            best = examples.get((record.domain, record.task))
            if best is None or sample.gt.std() / _white(sample) > best.gt.std() / _white(best):
                examples[(record.domain, record.task)] = sample  # the most textured example shows the degradation best
    summary = {
        "manifest": join_url(config.output, "manifest.json"),
        "samples": sum(counts.values()),
        "table": count_table(counts),
    }
    if config.contact_sheet and examples:
        if "://" not in config.output:
            summary["contact_sheet"] = str(contact_sheet(examples, Path(config.output) / "contact_sheet.png"))
        else:  # next to the manifest in the bucket, not in the caller's working directory
            import tempfile

            with tempfile.TemporaryDirectory() as tmp:
                data = contact_sheet(examples, Path(tmp) / "contact_sheet.png").read_bytes()
            summary["contact_sheet"] = join_url(config.output, "contact_sheet.png")
            atomic_write_bytes(summary["contact_sheet"], data, config.s3)
    print(summary["table"])
    sheet = f"; contact sheet {summary.get('contact_sheet')}" if "contact_sheet" in summary else ""
    print(f"{summary['samples']} samples -> {summary['manifest']}" + sheet)
    return summary


def ensure_dataset(
    url: str,
    s3: S3Settings | None = None,
    command: Sequence[str] | None = None,
    build_if_missing: bool = True,
    recipe: BuildConfig | None = None,
) -> bool:
    """Make sure a dataset exists at ``url`` (local folder or ``s3://bucket/prefix``): when its ``manifest.json`` is
    missing, build the embedded default corpus there (``recipe``, else :class:`BuildConfig` defaults; its ``output``
    and ``s3`` are replaced by ``url`` and ``s3``), recording ``command`` (the command line of the job that asked for
    it) in the manifest. Returns True when it built one.

    With ``build_if_missing=False`` a missing manifest is a FileNotFoundError that says how to build one. An existing
    manifest is not validated here: the readers (:func:`~datprl.platform.data.format.read_manifest`) do that."""
    if exists(manifest_url(url), s3):
        return False
    if not build_if_missing:
        raise FileNotFoundError(
            f"no dataset at {url} ({MANIFEST_NAME} not found); build it with jobs/build_dataset.py output={url}"
        )
    what = "the embedded default corpus" if recipe is None else "the configured corpus"
    print(f"no dataset at {url} ({MANIFEST_NAME} not found): building {what} there", flush=True)
    recipe = (recipe or BuildConfig()).model_copy(update={"output": url, "s3": s3})
    build(recipe, command=None if command is None else list(command))
    return True


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: ``python jobs/build_dataset.py [config.yaml] [key=value ...]``."""
    argv = sys.argv[1:] if argv is None else argv
    build(parse_cli(BuildConfig, argv), command=["jobs/build_dataset.py", *argv])
    return 0
