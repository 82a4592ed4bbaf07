"""Large-image benchmark: the peak resident memory and the time of restoring one image per size, and the ratio of the
largest size's peak to the 1024x1024 one's against the target (1.5x: memory must be flat in the image's size beyond
a tile).

    python jobs/benchmark_large_images.py                        # 512, 1024, 2048, 4096 px; replica path
    python jobs/benchmark_large_images.py runs=3 sizes=[1024,4096]
    python jobs/benchmark_large_images.py path=both http_sizes=[512,1024]

``path=replica`` (default) runs the replica's request path after the body is read -- header, plan and memory
estimate, decode, tiles through ``Engine.restore_many``, rows blended and encoded as they finish
(:mod:`datprl.serve.pipeline`, the code the deployment runs with its batch queue as the forward) -- in a fresh
subprocess per size, with the replica's engine set-up (activation measurement included). The body (an 8-bit RGB
PNG of a real photo resized to the size) is built first; the peak is the process's ``VmHWM``, reset after the engine
is loaded and the heap trimmed, so it covers the request alone on top of the loaded process.

``path=http`` starts a local app with one replica and POSTs one image per size (``http_sizes``: through HTTP on
2 CPUs a 4096x4096 image takes minutes), reading the replica process's ``VmHWM`` (reset before each request) from
``/proc``. ``both`` runs the two.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import Field

from datprl.platform.config import StrictModel, parse_cli

__all__ = ["LargeImageBenchmarkConfig", "run_benchmark", "main", "photo_png", "measure_request"]

MB = 2**20


class LargeImageBenchmarkConfig(StrictModel):
    """Peak memory and time of one large-image request per size, and the largest size's peak against 1024x1024."""

    sizes: list[int] = Field([512, 1024, 2048, 4096], description="square image edges (pixels), one request each")
    runs: int = Field(1, ge=1, description="repeats of the whole sweep (numbers vary on a shared machine)")
    path: Literal["replica", "http", "both"] = Field(
        "replica",
        description="replica: the replica's request path in a fresh subprocess per size; http: a local "
        "app with one replica, one POST per size of http_sizes; both",
    )
    http_sizes: list[int] = Field([512, 1024], description="sizes sent through HTTP (path=http or both)")
    weights: str | None = Field(None, description="exported weights; None = a fresh variant (the identity network)")
    variant: str = Field("paper_tiny", description="fresh variant when weights is None")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="ServeConfig.precision")
    max_batch_pixels: int | None = Field(None, ge=1, description="ServeConfig.max_batch_pixels; None = its default")
    torch_threads: int = Field(0, ge=0, description="torch threads (ServeConfig.torch_threads; 0 = torch's default)")
    reference_size: int = Field(1024, description="the size the largest size's peak is compared with")
    target_ratio: float = Field(1.5, gt=0, description="largest size's peak / reference size's peak must stay below")
    timeout_s: float = Field(1800, gt=0, description="per request (subprocess or HTTP)")


def photo_png(size: int) -> bytes:
    """An 8-bit RGB PNG of ``size`` x ``size``: a real photo (scikit-image's astronaut) resized (bicubic)."""
    import skimage.data
    from PIL import Image

    image = Image.fromarray(skimage.data.astronaut()).resize((size, size), Image.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _serve_config(config: LargeImageBenchmarkConfig) -> Any:
    from datprl.serve.config import ServeConfig

    fields: dict[str, Any] = {
        "weights": config.weights,
        "variant": config.variant,
        "precision": config.precision,
        "torch_threads": config.torch_threads,
        "num_replicas": 1,
    }
    if config.max_batch_pixels is not None:
        fields["max_batch_pixels"] = config.max_batch_pixels
    return ServeConfig(**fields)


def measure_request(size: int, config: LargeImageBenchmarkConfig) -> dict[str, Any]:
    """One request of ``size`` through the replica's request path in this process (call it in a fresh one): peak
    resident memory (reset after set-up), time and the memory estimate the replica would check."""
    from datprl.serve import memory
    from datprl.serve.codec import OutputWriter, decode, read_header
    from datprl.serve.engine import load_engine
    from datprl.serve.pipeline import activation_bytes_per_pixel, configure_process_memory, plan_request, restore_image

    data = photo_png(size)
    serve_config = _serve_config(config)
    configure_process_memory(serve_config)  # as the replica does, before the engine loads
    engine = load_engine(serve_config)
    started = time.perf_counter()
    bytes_per_pixel = activation_bytes_per_pixel(serve_config, engine)
    calibration_s = time.perf_counter() - started

    async def forward(unit: Any) -> Any:
        result = (await asyncio.to_thread(engine.restore_many, [unit]))[0]
        if isinstance(result, BaseException):
            raise result
        return result

    async def request(body: bytes) -> tuple[Any, Any, bytes]:
        header = read_header(body, "png", serve_config.max_pixels)
        plan = plan_request(header, len(body), "auto", serve_config, bytes_per_pixel)
        image = await asyncio.to_thread(decode, body, "png", serve_config.max_pixels)
        del body
        writer = OutputWriter(image, "png")
        outcome = await restore_image(image, plan.tiled, writer, forward, engine.pools, serve_config)
        encoded, _ = await asyncio.to_thread(writer.finish)
        return plan, outcome, encoded

    memory.trim_heap()
    before = memory.rss_bytes() or 0
    reset = memory.reset_peak_rss()
    started = time.perf_counter()
    holder = [data]
    del data  # the request owns the body from here (released after decoding, as in the replica)
    plan, outcome, encoded = asyncio.run(request(holder.pop()))
    seconds = time.perf_counter() - started
    peak = memory.peak_rss_bytes() if reset else None
    return {
        "path": "replica",
        "size": size,
        "tiled": plan.tiled,
        "tiles": outcome.tiles,
        "seconds": round(seconds, 1),
        "peak_rss_mb": round(peak / MB) if peak else None,
        "rss_before_mb": round(before / MB),
        "request_peak_mb": round((peak - before) / MB) if peak else None,
        "process_peak_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MB),
        "estimate_mb": round(plan.estimate.total / MB) if plan.estimate else None,
        "activation_bytes_per_pixel": round(bytes_per_pixel) if bytes_per_pixel else None,
        "calibration_s": round(calibration_s, 1),
        "png_mb": round(len(encoded) / MB, 2),
        "precision": engine.precision,
        "torch_threads": engine.info.extra.get("torch_threads"),
    }


def _replica_path(size: int, config: LargeImageBenchmarkConfig) -> dict[str, Any]:
    command = [
        sys.executable,
        "-m",
        "datprl.platform.bench.large_images",
        "--worker",
        str(size),
        config.model_dump_json(),
    ]
    out = subprocess.run(command, capture_output=True, text=True, timeout=config.timeout_s)
    if out.returncode != 0:
        raise RuntimeError(f"the {size}x{size} worker failed ({out.returncode}): {out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _replica_pid(app_name: str, timeout_s: float = 60) -> int:
    """The process of the application's one replica on this machine: Ray titles an actor's process
    ``ray::ServeReplica:<app>:<deployment>`` (found in ``/proc``, so no dashboard is needed)."""
    title = f"ServeReplica:{app_name}:Restorer".encode()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                    if title in cmdline.read():
                        return int(entry)
            except OSError:
                continue
        time.sleep(0.5)
    raise RuntimeError(
        f"no process titled ray::{title.decode()} found in /proc: path=http needs the replica on this machine"
    )


def _http_path(sizes: Sequence[int], config: LargeImageBenchmarkConfig) -> list[dict[str, Any]]:
    """One POST per size to a local app with one replica; the replica's peak from /proc (same machine)."""
    import requests
    from ray import serve

    from datprl.platform.config import config_to_dict
    from datprl.platform.runtime import (
        SMALL_OBJECT_STORE_BYTES,
        LocalRaySettings,
        free_loopback_port,
        init_ray,
        shutdown_ray,
    )
    from datprl.serve import memory
    from datprl.serve.app import build_app, start_serve

    started_here = init_ray(
        local=LocalRaySettings(object_store_bytes=SMALL_OBJECT_STORE_BYTES, dashboard=False, log_to_driver=False)
    ).started_here
    rows = []
    try:
        port = free_loopback_port()
        start_serve("127.0.0.1", port)
        args = {
            k: v
            for k, v in config_to_dict(_serve_config(config)).items()
            if k not in ("host", "port", "route_prefix", "app_name")
        }
        serve.run(build_app(args), name="datprl-large", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        pid = _replica_pid("datprl-large")
        for size in sorted(sizes):
            data = photo_png(size)
            before = memory.rss_bytes(pid) or 0
            reset = memory.reset_peak_rss(pid)
            started = time.perf_counter()
            reply = requests.post(
                f"{url}/v1/restore?response=json",
                data=data,
                headers={"Content-Type": "image/png"},
                timeout=config.timeout_s,
            )
            seconds = time.perf_counter() - started
            reply.raise_for_status()
            body = reply.json()
            peak = memory.peak_rss_bytes(pid) if reset else None
            rows.append(
                {
                    "path": "http",
                    "size": size,
                    "tiled": body["tiled"],
                    "tiles": body["tiles"],
                    "seconds": round(seconds, 1),
                    "peak_rss_mb": round(peak / MB) if peak else None,
                    "rss_before_mb": round(before / MB),
                    "request_peak_mb": round((peak - before) / MB) if peak else None,
                    "estimate_mb": round(body["memory"]["estimate_bytes"] / MB) if body.get("memory") else None,
                    "activation_bytes_per_pixel": (
                        round(body["memory"]["activation_bytes_per_pixel"]) if body.get("memory") else None
                    ),
                }
            )
    finally:
        if started_here:
            shutdown_ray(serve=True)
        else:
            serve.shutdown()
    return rows


def _ratio(rows: list[dict[str, Any]], config: LargeImageBenchmarkConfig) -> float | None:
    peaks = {r["size"]: r["peak_rss_mb"] for r in rows}
    largest = max(peaks)
    if config.reference_size not in peaks or largest == config.reference_size or not peaks[config.reference_size]:
        return None
    return peaks[largest] / peaks[config.reference_size]


def run_benchmark(config: LargeImageBenchmarkConfig) -> dict[str, Any]:
    """``config.runs`` sweeps over the sizes; per path and run the rows and the ratio of the largest size's peak to
    ``reference_size``'s, and over runs the median ratio against ``target_ratio``."""
    runs = []
    for run in range(config.runs):
        result: dict[str, Any] = {"run": run + 1}
        if config.path in ("replica", "both"):
            rows = [_replica_path(size, config) for size in sorted(config.sizes)]
            result["replica"] = {"rows": rows, "ratio": _ratio(rows, config)}
        if config.path in ("http", "both"):
            rows = _http_path(config.http_sizes, config)
            result["http"] = {"rows": rows, "ratio": _ratio(rows, config)}
        runs.append(result)
        print(_table(result, config), flush=True)
    summary: dict[str, Any] = {"runs": runs, "target_ratio": config.target_ratio}
    for path in ("replica", "http"):
        ratios = [r[path]["ratio"] for r in runs if path in r and r[path]["ratio"] is not None]
        if ratios:
            median = statistics.median(ratios)
            summary[path] = {
                "ratios": [round(x, 3) for x in ratios],
                "median_ratio": round(median, 3),
                "meets_target": median <= config.target_ratio,
            }
    return summary


def _table(result: dict[str, Any], config: LargeImageBenchmarkConfig) -> str:
    lines = [
        f"run {result['run']}",
        "| path | size | tiles | peak RSS MB | RSS before MB | request peak MB | estimate MB | seconds |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for path in ("replica", "http"):
        if path not in result:
            continue
        for r in result[path]["rows"]:
            lines.append(
                f"| {path} | {r['size']} | {r['tiles']} | {r['peak_rss_mb']} | {r['rss_before_mb']} | "
                f"{r['request_peak_mb']} | {r['estimate_mb']} | {r['seconds']} |"
            )
        ratio = result[path]["ratio"]
        if ratio is not None:
            largest = max(r["size"] for r in result[path]["rows"])
            verdict = "meets" if ratio <= config.target_ratio else "MISSES"
            lines.append(
                f"{path}: peak {largest} / peak {config.reference_size} = {ratio:.2f} ({verdict} the "
                f"{config.target_ratio}x target)"
            )
    return "\n".join(lines)


def main(argv: Sequence[str]) -> int:
    """Entry point of ``jobs/benchmark_large_images.py``: prints a table per run and the JSON summary."""
    config = parse_cli(LargeImageBenchmarkConfig, argv, prog="benchmark_large_images.py")
    summary = run_benchmark(config)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":  # pragma: no cover
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        os.environ.setdefault("PYTHONUNBUFFERED", "1")
        worker_config = LargeImageBenchmarkConfig.model_validate_json(sys.argv[3])
        print(json.dumps(measure_request(int(sys.argv[2]), worker_config)), flush=True)
        sys.exit(0)
    sys.exit(main(sys.argv[1:]))
