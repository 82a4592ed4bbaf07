"""Throughput of the Ray Data training pipeline against a plain WebDataset + DataLoader baseline.

Every side reads the same train shards and hands its consumer the same samples: both PNGs decoded at their stored bit
depth, the same kind of paired random crop, one of the 8 flips/rotations, normalised by the sample's white level to
float32 ``(3, crop, crop)`` (grey replicated to 3 channels; every side calls the functions of
:mod:`datprl.platform.data.transforms`), as batches or rows. Where the sides differ is *when* they decode:

* ``baseline``: ``wds.WebDataset(urls).shuffle(n).decode(png).map(crop/augment/normalise)`` in a
  ``torch.utils.data.DataLoader(num_workers=N, batch_size=B, persistent_workers=True)``, N = the CPUs given to Ray:
  decodes every pass, as a plain webdataset user does. WebDataset hands whole shards to DataLoader workers, so with
  fewer shards than workers some workers stay idle (``empty_check=False`` lets them; the default would raise).
* ``baseline[decoded once]`` (``compare_cached_baseline``): the equal-work counterpart of the decoded cache. The
  shards are decoded once in this process through the same webdataset pipeline (timed, like the cache build), and a
  map-style dataset over the decoded arrays crops, augments and normalises them in a ``DataLoader`` with N workers
  (forked: they share the decoded arrays), ``shuffle=True``.
* Ray: :func:`~datprl.platform.data.pipeline.read_split` on a local Ray with N CPUs, consumed as training consumes
  it: :func:`~datprl.platform.data.pipeline.training_batches` (task-balanced batches of ``tasks x batch_size //
  tasks``) and/or plain :func:`~datprl.platform.data.pipeline.iterate_rows`. With ``cache_decoded`` auto (the
  default) a split that fits the object store is decoded once, when ``read_split`` is called, and every pass only
  crops, augments and normalises the cached pixels; ``compare_uncached`` adds ``training_batches[decode every pass]``,
  the path the pipeline takes for splits too large to cache (always with the ``training_batches`` consumer).

One-time decodes are timed (``cache_build_s``, ``baseline_cache_build_s``) and the ratios ``incl. cache build``
charge them to the timed passes: total samples over (build + timed passes) against the plain baseline's total
samples over its timed passes. The CPU time of the builds is not in the ``CPU ms/sample`` column.

Every pass is a whole epoch over the train split, timed from creating its iterator to exhausting it, so each side's
per-epoch start-up is included. The first ``warmup`` passes of every side are not counted (process start, imports,
page cache); the timed passes are interleaved (B R1 R2, R1 R2 B, ...) so that load changes hit every side alike, and
the median per side is reported. The warm-up passes of the plain baseline and of the uncached Ray side run before the
Ray cache is built, so that the build does not pay for starting Ray's workers (with ``warmup=0`` or without the
uncached side, it does). Samples/s counts the samples of the split in a pass (balanced batches also re-draw samples
of rare tasks; those repeats are not counted). Every pass of every side must yield the train split's sample count,
or the run fails.

On Linux, when the benchmark starts Ray itself, it also reports the CPU time each side spent per sample (this process
plus the DataLoader workers for the baselines; this process plus every Ray process for Ray, Ray's own daemons
included), which unlike wall time hardly depends on what else runs on the machine. Ray starts its workers with OS
niceness 15 by default while the DataLoader workers keep the caller's; on a busy machine that alone moves the wall-time
ratio, so ``ray_worker_niceness`` (default 0) gives both sides the same priority.

Launch with ``python jobs/benchmark_data.py [key=value ...]``.
"""

from __future__ import annotations

import functools
import io
import logging
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import Field

from datprl.platform.bench.common import (
    LocalDataset,
    ensure_dataset,
    ray_worker_settings,
    save_report,
    start_ray,
)
from datprl.platform.config import NoRepeats, StrictModel, config_to_dict, parse_cli
from datprl.platform.data.conventions import white_level
from datprl.platform.data.transforms import paired_augment, paired_random_crop, process_rng, to_chw3, to_unit_float

__all__ = ["DataBenchmarkConfig", "baseline_loader", "run_benchmark", "format_report", "main"]

Consumer = Literal["training_batches", "iterate_rows"]
BASELINE = "baseline"
BASELINE_CACHED = "baseline[decoded once]"
UNCACHED = "training_batches[decode every pass]"


class DataBenchmarkConfig(StrictModel):
    """Samples/s of 128x128 paired training crops: Ray Data pipeline vs WebDataset + DataLoader, same CPUs."""

    dataset: LocalDataset = Field(
        "data/bench",
        description="local dataset folder with manifest.json; if the "
        "manifest is missing, the default corpus is built there first (about 30 s)",
    )
    passes: int = Field(5, ge=1, description="timed passes (epochs over the train split) per side, interleaved")
    warmup: int = Field(1, ge=0, description="untimed passes per side before the timed ones")
    cpus: int = Field(2, ge=1, description="CPUs given to Ray (ray.init(num_cpus=...)) = DataLoader num_workers")
    crop_size: int = Field(128, ge=8, description="paired random crop (pixels)")
    batch_size: int = Field(
        18,
        ge=1,
        description="DataLoader batch; Ray's balanced batches take batch_size // tasks "
        "samples per task (18 = 9 tasks x 2)",
    )
    shuffle_buffer: int = Field(
        64,
        ge=0,
        description="local shuffle buffer of both training_batches and the "
        "baseline's wds .shuffle() (iterate_rows never shuffles)",
    )
    consumers: Annotated[list[Consumer], NoRepeats] = Field(
        ["training_batches", "iterate_rows"],
        min_length=1,
        description="Ray consumer paths to time; the first gives the headline ratio",
    )
    cache_decoded: bool | None = Field(
        None,
        description="the pipeline's DataConfig.cache_decoded: decode once into "
        "the object store (true), every pass (false), or auto (null)",
    )
    compare_uncached: bool = Field(
        True, description="when the cache is on, also time training_batches decoding every pass"
    )
    compare_cached_baseline: bool = Field(
        True,
        description="when the cache is on, also time a DataLoader over samples decoded once (the equal-work baseline)",
    )
    object_store_mib: int = Field(1024, ge=64, description="object store of the Ray the benchmark starts")
    ray_worker_niceness: int | None = Field(
        0,
        ge=0,
        le=19,
        description="OS niceness of Ray's workers "
        "(RAY_worker_niceness) when the benchmark starts Ray; 0 = the priority "
        "of the DataLoader workers; null = Ray's default (15)",
    )
    json_out: Path | None = Field(None, description="also write the results as JSON here")


# --- the baseline: plain webdataset + DataLoader --------------------------------------------------------------------


def _decode_png(data: bytes) -> np.ndarray:
    """PNG -> array at its stored bit depth (uint8 RGB/grey, uint16 grey), as the pipeline decodes it."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return np.array(image)


def _baseline_sample(sample: dict[str, Any], crop_size: int) -> dict[str, Any]:
    """The pipeline's training transform on a webdataset sample: crop, flip/rotate, normalise, 3 x H x W float32."""
    meta = sample["json"]
    white = white_level(meta.get("white_level"), bit_depth=meta["bit_depth"])
    rng = process_rng()
    lq, gt = paired_random_crop(sample["lq.png"], sample["gt.png"], crop_size, rng)
    lq, gt = paired_augment(lq, gt, rng)
    return {
        "lq": to_chw3(to_unit_float(lq, white)),
        "gt": to_chw3(to_unit_float(gt, white)),
        "task": meta["task"],
        "key": sample["__key__"],
    }


def baseline_loader(urls: Sequence[str], crop_size: int, batch_size: int, workers: int, shuffle_buffer: int):
    """What a plain webdataset user writes: shards -> shuffle -> decode -> map -> DataLoader batches."""
    import torch.utils.data
    import webdataset as wds

    # empty_check=False: with fewer shards than workers the idle workers would otherwise raise "No samples found".
    dataset = wds.WebDataset(list(urls), shardshuffle=False, empty_check=False)
    if shuffle_buffer:
        dataset = dataset.shuffle(shuffle_buffer)
    dataset = dataset.decode(wds.handle_extension("png", _decode_png)).map(
        functools.partial(_baseline_sample, crop_size=crop_size)
    )
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, num_workers=workers, persistent_workers=workers > 0, pin_memory=False
    )


class _DecodedSamples:
    """Map-style dataset over samples decoded once: each item is cropped, augmented and normalised when drawn."""

    def __init__(self, samples: list[dict[str, Any]], crop_size: int):
        self.samples, self.crop_size = samples, crop_size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return _baseline_sample(self.samples[index], self.crop_size)


def decoded_once_loader(urls: Sequence[str], crop_size: int, batch_size: int, workers: int):
    """The baseline's webdataset pipeline decoded once into memory, then a shuffling DataLoader that only crops,
    augments and normalises (what a DataLoader user does when the data fits in RAM)."""
    import torch.utils.data
    import webdataset as wds

    dataset = wds.WebDataset(list(urls), shardshuffle=False, empty_check=False).decode(
        wds.handle_extension("png", _decode_png)
    )
    samples = [{k: sample[k] for k in ("lq.png", "gt.png", "json", "__key__")} for sample in dataset]
    return torch.utils.data.DataLoader(
        _DecodedSamples(samples, crop_size),
        batch_size=batch_size,
        shuffle=True,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=False,
    )


# --- CPU time of this process tree (Linux) --------------------------------------------------------------------------


def _cpu_snapshot() -> dict[int, tuple[str, float]] | None:
    """CPU seconds (user + system) of this process and of each descendant, by pid, with its kind: ``driver`` (this
    process), ``dataloader`` (forks of it: same command line) or ``ray`` (everything else: Ray's daemons and workers,
    which ``ray.init`` started below this process). None where /proc is not available."""
    proc = Path("/proc")
    if not (proc / "self" / "stat").exists():
        return None
    tick = os.sysconf("SC_CLK_TCK")
    me = os.getpid()
    parent: dict[int, int] = {}
    seconds: dict[int, float] = {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) ": state ppid ... utime stime at 11, 12
        parent[int(entry.name)] = int(fields[1])
        seconds[int(entry.name)] = (int(fields[11]) + int(fields[12])) / tick
    children: dict[int, list[int]] = {}
    for pid, ppid in parent.items():
        children.setdefault(ppid, []).append(pid)
    own_command = (proc / str(me) / "cmdline").read_bytes()
    out, todo = {me: ("driver", seconds.get(me, 0.0))}, list(children.get(me, []))
    while todo:
        pid = todo.pop()
        todo.extend(children.get(pid, []))
        try:
            kind = "dataloader" if (proc / str(pid) / "cmdline").read_bytes() == own_command else "ray"
        except OSError:
            continue
        out[pid] = (kind, seconds[pid])
    return out


def _cpu_spent(before, after, kinds: tuple[str, ...]) -> float | None:
    """CPU seconds spent between two snapshots by processes of ``kinds`` (processes that ended meanwhile are lost)."""
    if before is None or after is None:
        return None
    return sum(s - (before[pid][1] if pid in before else 0.0) for pid, (kind, s) in after.items() if kind in kinds)


# --- one pass per side ----------------------------------------------------------------------------------------------
# A pass returns: samples (decoded and used), batches, emitted (samples handed out, re-draws included), corrupt
# (damaged samples skipped), and lq_shape / lq_dtype of one sample as the consumer received it.


def _new_pass() -> dict[str, Any]:
    return dict(samples=0, batches=0, emitted=0, corrupt=0, lq_shape=None, lq_dtype=None)


def _note_lq(out: dict[str, Any], lq, batched: bool) -> None:
    if out["lq_shape"] is None:
        out["lq_shape"] = list(lq.shape[1:] if batched else lq.shape)
        out["lq_dtype"] = str(lq.dtype).replace("torch.", "")


def _baseline_pass(loader) -> dict[str, Any]:
    out = _new_pass()
    for batch in loader:
        n = len(batch["lq"])
        out["samples"] += n
        out["emitted"] += n
        out["batches"] += 1
        _note_lq(out, batch["lq"], batched=True)
    return out


def _training_batches_pass(dataset, tasks: list[str], per_task: int, shuffle_buffer: int, seed: int) -> dict:
    from datprl.platform.data.pipeline import StreamReport, training_batches

    report, out = StreamReport(), _new_pass()
    for batch in training_batches(dataset, tasks, per_task, shuffle_buffer=shuffle_buffer, report=report, seed=seed):
        out["batches"] += 1
        out["emitted"] += len(batch["key"])
        _note_lq(out, batch["lq"], batched=True)
    out["samples"], out["corrupt"] = report.rows, len(report.corrupt)
    return out


def _iterate_rows_pass(dataset) -> dict[str, Any]:
    from datprl.platform.data.pipeline import StreamReport, iterate_rows

    report, out = StreamReport(), _new_pass()
    for row in iterate_rows(dataset):
        if report.note(row):
            _note_lq(out, row["lq"], batched=False)
    out["samples"] = out["emitted"] = report.rows
    out["corrupt"] = len(report.corrupt)
    return out


# --- the benchmark --------------------------------------------------------------------------------------------------


def run_benchmark(config: DataBenchmarkConfig) -> dict[str, Any]:
    """Time every side of ``config`` and return a JSON-ready dict.

    ``results`` has one row per side (``baseline`` first, then the Ray consumers): ``side, consumer,
    samples_per_pass, batches_per_pass, emitted_per_pass, corrupt_per_pass, samples_per_s`` (median over the timed
    passes), ``s_per_pass`` (median), ``pass_s`` (every timed pass), ``warmup_s`` (every warm-up pass),
    ``cpu_ms_per_sample`` (median; None when not measurable) and ``lq_shape``/``lq_dtype`` of what the consumer
    received. ``ratios`` maps ``"ray_pipeline/baseline"`` (first consumer) and ``"ray_pipeline[<consumer>]/baseline"``
    (each consumer) to ratios of median samples/s.
    """
    import ray
    import torch
    import webdataset

    from datprl.platform.data.handle import DatasetHandle
    from datprl.platform.data.pipeline import DataConfig, read_split, split_tasks, use_decoded_cache

    ensure_dataset(config.dataset, "jobs/benchmark_data.py")
    dataset = DatasetHandle.open(config.dataset)  # the manifest, read once for every side
    expected = sum(dataset.samples_per_task("train").values())
    urls = dataset.shard_urls("train")
    data_config = DataConfig(
        dataset=config.dataset,
        crop_size=config.crop_size,
        shuffle_buffer=config.shuffle_buffer,
        cache_decoded=config.cache_decoded,
    )
    tasks = split_tasks(data_config, "train", dataset)
    per_task = max(1, config.batch_size // len(tasks))

    owned, cpus, ray_start_s = start_ray(
        config.cpus, config.ray_worker_niceness, object_store_bytes=config.object_store_mib * 2**20
    )
    context = ray.data.DataContext.get_current()
    progress, context.enable_progress_bars = context.enable_progress_bars, False
    data_log = logging.getLogger("ray.data")  # otherwise an INFO block per pass ("Starting execution of ...")
    level = data_log.level
    data_log.setLevel(logging.ERROR)
    load_before = os.getloadavg()
    loader = decoded_loader = None
    try:
        niceness = {"ray_workers": ray_worker_settings()["niceness"], "dataloader_workers": os.nice(0)}
        cached = use_decoded_cache(data_config, "train", dataset)
        data_config = data_config.model_copy(update={"cache_decoded": cached})  # decided once, here
        loader = baseline_loader(urls, config.crop_size, config.batch_size, cpus, config.shuffle_buffer)
        seeds = iter(range(1_000_000))

        def consumer_pass(consumer: str, rows) -> Callable[[], dict]:
            if consumer == "training_batches":
                return lambda: _training_batches_pass(rows, tasks, per_task, config.shuffle_buffer, next(seeds))
            return lambda: _iterate_rows_pass(rows)

        runs: dict[str, Callable[[], dict]] = {BASELINE: lambda: _baseline_pass(loader)}
        baseline_cache_build_s = 0.0
        if cached and config.compare_cached_baseline:
            start = time.perf_counter()
            decoded_loader = decoded_once_loader(urls, config.crop_size, config.batch_size, cpus)
            baseline_cache_build_s = time.perf_counter() - start
            runs[BASELINE_CACHED] = lambda: _baseline_pass(decoded_loader)
        if cached and config.compare_uncached:
            uncached = read_split(data_config.model_copy(update={"cache_decoded": False}), "train", dataset=dataset)
            runs[UNCACHED] = consumer_pass("training_batches", uncached)
        timing: dict[str, dict[str, list]] = {}
        first: dict[str, dict] = {}

        def timed_pass(side: str, round_: int, warm: bool) -> None:
            cpu_before = _cpu_snapshot() if owned else None
            start = time.perf_counter()
            result = runs[side]()
            seconds = time.perf_counter() - start
            cpu = _cpu_spent(
                cpu_before,
                _cpu_snapshot() if owned else None,
                ("driver", "dataloader") if side.startswith(BASELINE) else ("driver", "ray"),
            )
            if result["samples"] + result["corrupt"] != expected or result["samples"] == 0:
                raise RuntimeError(
                    f"{side} pass {round_} yielded {result['samples']} samples "
                    f"(+{result['corrupt']} damaged); the train split has {expected}"
                )
            if side in first and (result["samples"], result["lq_shape"]) != (
                first[side]["samples"],
                first[side]["lq_shape"],
            ):
                raise RuntimeError(f"{side}: pass {round_} differs from its first: {result} vs {first[side]}")
            first.setdefault(side, result)
            record = timing.setdefault(side, {"warmup": [], "timed": [], "cpu": []})
            if warm:
                record["warmup"].append(seconds)
            else:
                record["timed"].append(seconds)
                record["cpu"].append(cpu)

        # Warm-up of the sides that exist before the cache: Ray's workers start here, not in the cache build.
        for round_ in range(config.warmup):
            for side in list(runs):
                timed_pass(side, round_, warm=True)
        start = time.perf_counter()
        split = read_split(data_config, "train", dataset=dataset)  # with the cache: decodes the split once, here
        cache_build_s = time.perf_counter() - start if cached else 0.0
        for consumer in config.consumers:
            runs[consumer] = consumer_pass(consumer, split)
        for round_ in range(config.warmup):
            for side in config.consumers:
                timed_pass(side, round_, warm=True)
        sides = [BASELINE, *config.consumers, *(s for s in (UNCACHED, BASELINE_CACHED) if s in runs)]
        for round_ in range(config.passes):
            shift = round_ % len(sides)
            for side in sides[shift:] + sides[:shift]:
                timed_pass(side, config.warmup + round_, warm=False)
    finally:
        context.enable_progress_bars = progress
        data_log.setLevel(level)
        loader = decoded_loader = None  # stops the persistent DataLoader workers
        if owned:
            ray.shutdown()

    shapes = {(tuple(p["lq_shape"]), p["lq_dtype"]) for p in first.values()}
    if shapes != {((3, config.crop_size, config.crop_size), "float32")}:
        raise RuntimeError(f"the sides produced different samples: {shapes}")
    results = []
    for side in sides:
        timed, samples, cpu = timing[side]["timed"], first[side]["samples"], timing[side]["cpu"]
        results.append(
            dict(
                side="webdataset+DataLoader" if side.startswith(BASELINE) else "ray_data",
                consumer=side,
                decoded_cache=side == BASELINE_CACHED or (cached and side not in (BASELINE, UNCACHED)),
                samples_per_pass=samples,
                batches_per_pass=first[side]["batches"],
                emitted_per_pass=first[side]["emitted"],
                corrupt_per_pass=first[side]["corrupt"],
                samples_per_s=statistics.median(samples / t for t in timed),
                s_per_pass=statistics.median(timed),
                pass_s=timed,
                warmup_s=timing[side]["warmup"],
                cpu_ms_per_sample=None if None in cpu else statistics.median(1e3 * c / samples for c in cpu),
                lq_shape=first[side]["lq_shape"],
                lq_dtype=first[side]["lq_dtype"],
            )
        )
    base = results[0]["samples_per_s"]
    ratios = {"ray_pipeline/baseline": results[1]["samples_per_s"] / base}
    ratios.update(
        {
            f"ray_pipeline[{r['consumer']}]/baseline": r["samples_per_s"] / base
            for r in results[1:]
            if r["side"] == "ray_data"
        }
    )
    if cached:  # the one-time decode charged to the timed passes (sums, not medians: every second counts)
        baseline_rate = config.passes * results[0]["samples_per_pass"] / sum(results[0]["pass_s"])
        ray_rate = config.passes * results[1]["samples_per_pass"] / (cache_build_s + sum(results[1]["pass_s"]))
        ratios["ray_pipeline/baseline incl. cache build"] = ray_rate / baseline_rate
    by_side = {r["consumer"]: r for r in results}
    if BASELINE_CACHED in by_side:  # equal work: both decode once
        equal = by_side[BASELINE_CACHED]["samples_per_s"]
        ratios[f"ray_pipeline/{BASELINE_CACHED}"] = results[1]["samples_per_s"] / equal
    return dict(
        config=config_to_dict(config),
        cpus=cpus,
        ray_started_here=owned,
        ray_start_s=ray_start_s,
        decoded_cache=cached,
        cache_build_s=cache_build_s,
        baseline_cache_build_s=baseline_cache_build_s,
        train_shards=len(urls),
        train_samples=expected,
        tasks=tasks,
        per_task=per_task,
        niceness=niceness,
        loadavg={"before": list(load_before), "after": list(os.getloadavg())},
        versions={
            "ray": ray.__version__,
            "webdataset": getattr(webdataset, "__version__", "?"),
            "torch": torch.__version__,
            "numpy": np.__version__,
        },
        results=results,
        ratios=ratios,
    )


def format_report(report: dict[str, Any]) -> str:
    """The Markdown table of :func:`run_benchmark` and its ratio lines; the first is
    ``ray_pipeline/baseline throughput ratio: X.XX`` (the first Ray consumer against the baseline)."""
    head = [
        "pipeline",
        "consumer",
        "decoded cache",
        "samples/pass",
        "batches/pass",
        "samples/s median",
        "s/pass median",
        "samples/s min-max",
        "CPU ms/sample",
        "warm-up pass s",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in report["results"]:
        rates = [r["samples_per_pass"] / t for t in r["pass_s"]]
        cpu = "-" if r["cpu_ms_per_sample"] is None else f"{r['cpu_ms_per_sample']:.1f}"
        cells = [
            r["side"],
            r["consumer"],
            "yes" if r["decoded_cache"] else "no",
            r["samples_per_pass"],
            r["batches_per_pass"] or "-",
            f"{r['samples_per_s']:.1f}",
            f"{r['s_per_pass']:.2f}",
            f"{min(rates):.1f}-{max(rates):.1f}",
            cpu,
            ", ".join(f"{t:.2f}" for t in r["warmup_s"]) or "-",
        ]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    lines.append("")
    lines += [f"{name} throughput ratio: {ratio:.2f}" for name, ratio in report["ratios"].items()]
    return "\n".join(lines)


def main(argv: Sequence[str]) -> int:
    """Entry point of ``jobs/benchmark_data.py``: parse ``key=value`` options, run, print, optionally save JSON."""
    config = parse_cli(DataBenchmarkConfig, argv, prog="benchmark_data.py")
    start = time.perf_counter()
    report = run_benchmark(config)
    v, nice, load = report["versions"], report["niceness"], report["loadavg"]
    print(
        f"ray {v['ray']}, webdataset {v['webdataset']}, torch {v['torch']}; {report['cpus']} CPUs (Ray num_cpus = "
        f"DataLoader num_workers); {config.dataset}: {report['train_samples']} train samples in "
        f"{report['train_shards']} shard(s), {len(report['tasks'])} tasks; crop {config.crop_size}, batch "
        f"{config.batch_size} (balanced: {report['per_task']} per task), shuffle buffer {config.shuffle_buffer}; "
        f"{config.warmup} warm-up + {config.passes} interleaved timed passes per side; niceness: Ray workers "
        f"{nice['ray_workers']}, DataLoader workers {nice['dataloader_workers']}; load average "
        f"{load['before'][0]:.1f} -> {load['after'][0]:.1f}"
    )
    print(format_report(report))
    build = f", decoded cache build {report['cache_build_s']:.1f} s" if report["decoded_cache"] else ""
    if report["baseline_cache_build_s"]:
        build += f", baseline decode-once {report['baseline_cache_build_s']:.1f} s"
    print(f"total {time.perf_counter() - start:.1f} s (Ray start {report['ray_start_s']:.1f} s{build})")
    save_report(report, config.json_out)
    sys.stdout.flush()
    return 0
