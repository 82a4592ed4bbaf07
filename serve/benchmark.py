"""Serving benchmark: p50/p99 latency and throughput of ``POST /v1/restore`` against calling the same network
in-process on the same images, in one run, and their ratio (the serving overhead).

    python jobs/benchmark_serve.py                      # local Ray + Serve, paper_tiny, 64x64 PNG photo crops
    python jobs/benchmark_serve.py size=128 requests=400 clients=16
    python jobs/benchmark_serve.py url=http://127.0.0.1:8000 weights=outputs/train/model.safetensors  # a running app

In-process baseline: decoded (3, H, W) tensors, one ``Engine.forward`` per image, sequentially, with the replica's
torch thread count. Endpoint: ``clients`` threads, each with a keep-alive session, POST the PNG bytes; latency per
request is measured at the client, throughput is requests / wall time. Both sides restore the same images with the
same weights; the endpoint additionally decodes and encodes PNG, crosses HTTP and the Serve proxy, and batches
concurrent requests. ``overhead_ratio`` = in-process throughput / endpoint throughput (> 1: the endpoint is slower);
``latency_ratio`` = endpoint p50 / in-process p50.
"""

from __future__ import annotations

import io
import json
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from pydantic import Field

from datprl.platform.config import StrictModel, parse_cli
from datprl.platform.runtime import free_loopback_port as free_port

__all__ = ["ServeBenchmarkConfig", "run_benchmark", "main"]


class ServeBenchmarkConfig(StrictModel):
    """Latency and throughput of the restoration endpoint against in-process model calls (same images, one run)."""

    url: str | None = Field(None, description="a running app (e.g. http://127.0.0.1:8000); None = start one here")
    weights: str | None = Field(None, description="weights the app serves (the baseline loads the same); None = fresh")
    variant: str = Field("paper_tiny", description="fresh variant when weights is None")
    size: int = Field(64, ge=8, description="edge of the square photo crops (pixels)")
    images: int = Field(16, ge=1, description="distinct images, cycled through")
    requests: int = Field(200, ge=1, description="timed requests (and timed in-process calls)")
    clients: int = Field(8, ge=1, description="concurrent HTTP clients")
    warmup: int = Field(8, ge=0, description="untimed requests/calls before measuring")
    max_batch_size: int = Field(8, ge=1, description="@serve.batch size of the app started here")
    batch_wait_timeout_s: float = Field(0.005, ge=0)
    torch_threads: int = Field(1, ge=1, description="torch threads of the replica and of the in-process baseline")
    replica_cpus: float = Field(1.0, gt=0, description="CPUs reserved by the one replica of the app started here")


def _images(config: ServeBenchmarkConfig) -> list[np.ndarray]:
    """Real photo crops (scikit-image samples), config.size square, RGB uint8."""
    import skimage.data

    sources = [skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea(), skimage.data.rocket()]
    crops = []
    rng = np.random.default_rng(0)
    while len(crops) < config.images:
        source = sources[len(crops) % len(sources)]
        h, w = source.shape[:2]
        if h < config.size or w < config.size:
            source = np.pad(
                source, ((0, max(0, config.size - h)), (0, max(0, config.size - w)), (0, 0)), mode="reflect"
            )
            h, w = source.shape[:2]
        top, left = rng.integers(0, h - config.size + 1), rng.integers(0, w - config.size + 1)
        crops.append(np.ascontiguousarray(source[top : top + config.size, left : left + config.size, :3]))
    return crops


def _stats(latencies: list[float], wall: float, errors: int = 0) -> dict[str, Any]:
    ms = np.asarray(latencies) * 1000
    return {
        "requests": len(latencies),
        "errors": errors,
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "mean_ms": float(ms.mean()),
        "throughput_per_s": len(latencies) / wall,
        "wall_s": wall,
    }


def _in_process(config: ServeBenchmarkConfig, images: list[np.ndarray]) -> dict[str, Any]:
    import torch

    from datprl.serve.config import ServeConfig
    from datprl.serve.engine import load_engine

    previous = torch.get_num_threads()
    torch.set_num_threads(config.torch_threads)
    try:
        engine = load_engine(ServeConfig(weights=config.weights, variant=config.variant), device="cpu")
        tensors = [torch.from_numpy(im).permute(2, 0, 1).float().div(255)[None] for im in images]
        for i in range(config.warmup):
            engine.forward(tensors[i % len(tensors)])
        latencies = []
        started = time.perf_counter()
        for i in range(config.requests):
            t0 = time.perf_counter()
            engine.forward(tensors[i % len(tensors)])
            latencies.append(time.perf_counter() - t0)
        result = _stats(latencies, time.perf_counter() - started)
        result["weights_sha256"] = engine.info.weights_sha256
        return result
    finally:
        torch.set_num_threads(previous)


def _endpoint(config: ServeBenchmarkConfig, url: str, images: list[np.ndarray]) -> dict[str, Any]:
    import requests
    from PIL import Image

    bodies = []
    for im in images:
        buffer = io.BytesIO()
        Image.fromarray(im).save(buffer, format="PNG")
        bodies.append(buffer.getvalue())
    endpoint = url.rstrip("/") + "/v1/restore"
    headers = {"Content-Type": "image/png"}
    with requests.Session() as session:
        for i in range(config.warmup):
            session.post(endpoint, data=bodies[i % len(bodies)], headers=headers, timeout=300).raise_for_status()

    counts = [config.requests // config.clients + (k < config.requests % config.clients) for k in range(config.clients)]

    def client(k: int) -> tuple[list[float], int, int]:
        latencies, errors, largest = [], 0, 0
        with requests.Session() as session:
            for j in range(counts[k]):
                body = bodies[(k + j * config.clients) % len(bodies)]
                t0 = time.perf_counter()
                reply = session.post(endpoint, data=body, headers=headers, timeout=300)
                latencies.append(time.perf_counter() - t0)
                errors += reply.status_code != 200
                largest = max(largest, int(reply.headers.get("x-batch-size", 0) or 0))
        return latencies, errors, largest

    started = time.perf_counter()
    with ThreadPoolExecutor(config.clients) as pool:
        parts = list(pool.map(client, range(config.clients)))
    wall = time.perf_counter() - started
    result = _stats([x for p in parts for x in p[0]], wall, sum(p[1] for p in parts))
    result["largest_batch"] = max(p[2] for p in parts)
    result["clients"] = config.clients
    model = requests.get(url.rstrip("/") + "/v1/model", timeout=30).json()
    result["weights_sha256"] = model["weights_sha256"]
    result["replica_torch_threads"] = model.get("torch_threads")
    return result


def run_benchmark(config: ServeBenchmarkConfig) -> dict[str, Any]:
    """Both measurements on the same images; starts (and stops) a local Ray + app when ``config.url`` is None."""
    images = _images(config)
    started_here = False
    url = config.url
    if url is None:
        from ray import serve

        from datprl.platform.runtime import SMALL_OBJECT_STORE_BYTES, LocalRaySettings, init_ray, shutdown_ray
        from datprl.serve.app import build_app, start_serve

        started_here = init_ray(
            local=LocalRaySettings(object_store_bytes=SMALL_OBJECT_STORE_BYTES, dashboard=False, log_to_driver=False)
        ).started_here
        port = free_port()
        start_serve("127.0.0.1", port)
        serve.run(
            build_app(
                {
                    "weights": config.weights,
                    "variant": config.variant,
                    "num_replicas": 1,
                    "num_cpus": config.replica_cpus,
                    "torch_threads": config.torch_threads,
                    "max_batch_size": config.max_batch_size,
                    "batch_wait_timeout_s": config.batch_wait_timeout_s,
                }
            ),
            name="datprl-benchmark",
            route_prefix="/",
        )
        url = f"http://127.0.0.1:{port}"
    try:
        in_process = _in_process(config, images)
        endpoint = _endpoint(config, url, images)
    finally:
        if started_here:
            shutdown_ray(serve=True)  # Serve and the local Ray, signals held off while they stop
        elif config.url is None:
            from ray import serve

            serve.shutdown()
    if in_process["weights_sha256"] != endpoint["weights_sha256"]:
        raise RuntimeError(
            "the endpoint serves other weights than the in-process baseline loaded; pass the same "
            "weights= the app was started with"
        )
    return {
        "image": f"{config.size}x{config.size} RGB PNG (real photo crops)",
        "in_process": in_process,
        "endpoint": endpoint,
        "overhead_ratio": in_process["throughput_per_s"] / endpoint["throughput_per_s"],
        "latency_ratio": endpoint["p50_ms"] / in_process["p50_ms"],
    }


def _table(result: dict[str, Any]) -> str:
    rows = [
        ("in-process model call", result["in_process"]),
        (f"HTTP endpoint ({result['endpoint']['clients']} clients)", result["endpoint"]),
    ]
    lines = [
        f"image: {result['image']}",
        "| path | requests | p50 ms | p99 ms | throughput /s | errors |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, r in rows:
        lines.append(
            f"| {name} | {r['requests']} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
            f"{r['throughput_per_s']:.1f} | {r['errors']} |"
        )
    lines.append(f"overhead ratio (in-process throughput / endpoint throughput): {result['overhead_ratio']:.2f}")
    lines.append(
        f"latency ratio (endpoint p50 / in-process p50): {result['latency_ratio']:.2f}; "
        f"largest batch seen: {result['endpoint']['largest_batch']}"
    )
    return "\n".join(lines)


def main(argv: Sequence[str]) -> int:
    config = parse_cli(ServeBenchmarkConfig, argv, prog="benchmark_serve.py")
    result = run_benchmark(config)
    print(_table(result))
    print(json.dumps(result, default=float))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))
