"""Typed configuration of the serving application (one :class:`ServeConfig` for ``jobs/serve.py``, ``serve run``,
``serve deploy`` and the tests)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import Field, model_validator

from datprl.platform.config import ConfigError, StrictModel, load_config

__all__ = [
    "AutoscalingSettings",
    "ServeConfig",
    "TRAINED_WEIGHTS",
    "LISTEN_FIELDS",
    "config_from_args",
    "replica_config",
    "resolve_num_gpus",
]

#: Where ``jobs/train.py`` exports its final weights by default (``output_dir=outputs/train``); ``weights: auto``
#: serves them when they exist and a freshly initialised ``variant`` otherwise.
TRAINED_WEIGHTS = "outputs/train/model.safetensors"

#: Fields only ``jobs/serve.py`` uses: where the HTTP proxy listens and where the application is mounted. The
#: application builder (``serve run``/``serve deploy``) cannot apply them and rejects them (see :func:`replica_config`).
LISTEN_FIELDS = ("host", "port", "route_prefix", "app_name")
_LISTEN_HELP = (
    "host/port belong to Serve's HTTP proxy: `serve run --host H --port P`, or `http_options` in a Serve config "
    "file; route_prefix/app_name belong to the application: `serve run --route-prefix /x --name NAME`, or "
    "`route_prefix`/`name` of the file's `applications` entry. `python jobs/serve.py` takes all four as fields."
)


class AutoscalingSettings(StrictModel):
    """Ray Serve ``autoscaling_config`` of the restoration deployment."""

    min_replicas: int = Field(1, ge=0, description="replicas kept running when idle")
    max_replicas: int = Field(2, ge=1, description="upper bound under load")
    target_ongoing_requests: float = Field(
        4.0, gt=0, description="ongoing requests per replica the autoscaler aims for (batches fill up to this)"
    )
    upscale_delay_s: float = Field(5.0, ge=0)
    downscale_delay_s: float = Field(60.0, ge=0)
    look_back_period_s: float = Field(
        30.0, gt=0, description="window (seconds) over which ongoing requests are averaged for a decision (Ray's 30)"
    )
    metrics_interval_s: float = Field(
        10.0,
        gt=0,
        description="how often handles and replicas report ongoing requests to the controller (Ray's 10; "
        "Ray marks the field deprecated and warns when it is changed, but still reads it)",
    )

    @model_validator(mode="after")
    def _bounds(self) -> "AutoscalingSettings":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas={self.min_replicas} exceeds max_replicas={self.max_replicas}")
        if self.look_back_period_s <= self.metrics_interval_s:  # Ray warns now and will refuse it
            raise ValueError(
                f"look_back_period_s={self.look_back_period_s} must exceed metrics_interval_s={self.metrics_interval_s}"
            )
        return self

    def to_ray(self) -> dict[str, Any]:
        return self.model_dump()


class ServeConfig(StrictModel):
    """Serve DATPRL-IR restoration over HTTP (Ray Serve + FastAPI)."""

    weights: str | None = Field(
        "auto",
        description="exported weights (<stem>.safetensors with <stem>.json beside it), local path or s3://; "
        f"'auto' = {TRAINED_WEIGHTS} when it exists, else a fresh `variant`; null = always a fresh `variant`",
    )
    variant: str = Field("paper_tiny", description="variant initialised freshly (untrained) when no weights are used")
    seed: int = Field(0, description="seed of the fresh initialisation")
    s3_endpoint_url: str | None = Field(
        None, description="S3-compatible endpoint for s3:// weights (credentials come from the environment)"
    )
    host: str = Field("127.0.0.1", description="HTTP bind address of the Serve proxy (0.0.0.0 exposes it)")
    port: int = Field(8000, ge=1, le=65535)
    route_prefix: str = Field("/", description="URL prefix the application is mounted at")
    app_name: str = Field("datprl", description="Serve application name")
    max_body_bytes: int = Field(64 * 2**20, ge=1, description="largest accepted request body (413 above)")
    max_pixels: int = Field(
        4096 * 4096, ge=1, description="largest accepted image, width x height, checked from the header before decoding"
    )
    tile_size: int = Field(512, ge=16, description="tile edge (pixels) for tiled inference; a multiple of 8")
    tile_overlap: int = Field(64, ge=0, description="overlap between neighbouring tiles (pixels), blended")
    tile_above_pixels: int = Field(
        768 * 768, ge=1, description="images with more pixels than this are restored tile by tile (tiling=auto)"
    )
    max_untiled_pixels: int = Field(
        2048 * 2048, ge=1, description="largest image restored in one piece when a request asks for tiling=never"
    )
    max_concurrent_tiled: int = Field(
        2,
        ge=1,
        description="large images (above tile_above_pixels, tiled or not) decoded and restored at once per "
        "replica; the slot is taken before decoding, so a replica's image memory is about this many large requests' "
        "buffers (docs/serving.md) plus the bodies of the requests waiting and one forward's activations",
    )
    max_batch_size: int = Field(8, ge=1, description="@serve.batch: most requests (or tiles) in one forward")
    max_batch_pixels: int = Field(
        512 * 512,
        ge=1,
        description="most pixels (padded, summed over the batch) in one forward: a batch above it is "
        "split into several forwards, and a tiled image sends this many pixels of tiles at a time; one image or tile "
        "always goes through. Bounds the network's activation memory (paper_tiny fp32 on CPU: ~2.2 KB per pixel, "
        "0.56 GB for one 512x512 tile); on CPU larger batches are not faster (docs/serving.md), on a GPU "
        "raise it",
    )
    request_memory_budget_bytes: int | None = Field(
        4 * 2**30,
        ge=1,
        description="a request whose estimated memory (image buffers from the header's size, "
        "channels and bit depth, plus the activations of its largest forward) exceeds this is refused up front with a "
        "413; tiling=auto restores an image in tiles instead when that fits; null = no budget",
    )
    activation_bytes_per_pixel: float | None = Field(
        None,
        gt=0,
        description="activation memory of a forward per input pixel, for the memory estimate; null = "
        "measured at replica start-up by one forward of a 256x256 input (tile_size when smaller, at least 128; "
        "peak RSS on CPU, peak allocated memory on CUDA)",
    )
    malloc_mmap_threshold_bytes: int | None = Field(
        2**20,
        ge=0,
        description="glibc: allocations of at least this many bytes get their own mapping, returned to "
        "the system when freed, so a replica's memory falls back after each forward (glibc's dynamic threshold "
        "otherwise rises to 32 MB and freed activations stay in per-thread heaps: +0.3 GB at the peak of a "
        "1024x1024 image, docs/serving.md, 'Large images'); null = glibc's default",
    )
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto",
        description="forward precision: bf16 runs the network under torch.autocast (bfloat16); auto = bf16 on "
        "CUDA (when the GPU supports it), fp32 on CPU",
    )
    channels_last: bool = Field(
        False, description="run the network in channels_last memory format (can be faster on GPUs; same results)"
    )
    batch_wait_timeout_s: float = Field(0.01, ge=0, description="@serve.batch: how long a batch waits to fill")
    max_ongoing_requests: int = Field(32, ge=1, description="concurrent requests one replica accepts")
    num_replicas: int | None = Field(None, ge=1, description="fixed replica count; None = autoscaling")
    autoscaling: AutoscalingSettings = AutoscalingSettings()
    num_cpus: float = Field(1.0, gt=0, description="CPUs reserved per replica")
    num_gpus: float | Literal["auto"] = Field(
        "auto", description="GPUs per replica; auto = 1 when the Ray cluster (or this machine) has a GPU, else 0"
    )
    torch_threads: int = Field(0, ge=0, description="torch intra-op threads per replica; 0 = leave the default")

    @model_validator(mode="after")
    def _check(self) -> "ServeConfig":
        if self.tile_size % 8:
            raise ValueError(f"tile_size={self.tile_size} must be a multiple of 8 (the network downsamples 3 times)")
        if self.tile_overlap * 2 >= self.tile_size:
            raise ValueError(f"tile_overlap={self.tile_overlap} must be below half of tile_size={self.tile_size}")
        if not self.route_prefix.startswith("/"):
            raise ValueError(f"route_prefix={self.route_prefix!r} must start with '/'")
        if isinstance(self.num_gpus, float) and self.num_gpus < 0:
            raise ValueError("num_gpus must be >= 0 or 'auto'")
        return self

    def resolved_weights(self) -> str | None:
        """The weights that will be served: a path/URL, or None for a fresh ``variant``."""
        if self.weights == "auto":
            return TRAINED_WEIGHTS if os.path.exists(TRAINED_WEIGHTS) else None
        return self.weights

    def absolute_weights(self) -> str | None:
        """:meth:`resolved_weights` with a local path made absolute against this process's working directory."""
        weights = self.resolved_weights()
        if weights is None or weights.startswith("s3://"):
            return weights
        return os.path.abspath(weights)


def config_from_args(args: Mapping[str, Any] | None) -> ServeConfig:
    """A :class:`ServeConfig` from Serve application-builder args: the ``args:`` mapping of a Serve config file
    (nested sections allowed) or the ``key=value`` strings of ``serve run module:build_app key=value``
    (dotted keys such as ``autoscaling.max_replicas=3`` allowed). Errors name the dotted field."""
    overrides: list[str] = []
    for key, value in (args or {}).items():
        if isinstance(value, str):
            overrides.append(f"{key}={value}")
        else:  # JSON is YAML: nested mappings, numbers, null and lists keep their type
            overrides.append(f"{key}={json.dumps(value)}")
    try:
        return load_config(ServeConfig, None, overrides)
    except ConfigError as error:
        raise ConfigError(f"invalid serve application args: {error}") from None


def replica_config(args: Mapping[str, Any] | None) -> ServeConfig:
    """The config a replica gets from application-builder ``args``: validated, listen fields rejected (the builder
    cannot apply them; the error says where they go), and ``weights`` resolved here, in the process that builds
    the app (``auto`` and relative paths against its working directory), to an absolute path or None, so a replica
    with another working directory loads the same file."""
    given = sorted(k for k in (args or {}) if str(k).split(".", 1)[0] in LISTEN_FIELDS)
    if given:
        raise ConfigError(
            f"invalid serve application args: {', '.join(given)} cannot be set through the application "
            f"builder. {_LISTEN_HELP}"
        )
    config = config_from_args(args)
    return config.model_copy(update={"weights": config.absolute_weights()})


def resolve_num_gpus(config: ServeConfig) -> float:
    """``num_gpus: auto`` -> 1 when the connected Ray cluster has a GPU (or, without Ray, when torch sees one)."""
    if config.num_gpus != "auto":
        return float(config.num_gpus)
    try:
        import ray

        if ray.is_initialized():
            return 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
    except Exception:  # noqa: BLE001 - no Ray: fall back to the local view
        pass
    import torch

    return 1.0 if torch.cuda.is_available() else 0.0
