"""The Ray Serve application: one deployment with a FastAPI ingress that restores images.

Endpoints: ``POST /v1/restore`` (image in, restored image or JSON out), ``GET /healthz``, ``GET /v1/model``,
``GET /docs`` and ``GET /openapi.json``.

Launch it with ``python jobs/serve.py`` (local Ray or a running cluster), ``serve run datprl.serve.app:build_app``
or ``serve deploy infra/serve.yaml``; :func:`build_app` is the application builder all three use.

Throughput: requests (and the tiles of large images) go through one ``@serve.batch`` queue per replica; each batch is
split into groups of equal padded (H, W) and every group is one forward pass (``Engine.restore_many``), run in a
worker thread. Everything else that scales with the image (decoding and normalising, the tile canvas, encoding) runs
in worker threads too, so the event loop keeps answering health checks and other requests. Replicas autoscale on
ongoing requests and take a GPU when the cluster has one.
"""

# No `from __future__ import annotations` here: FastAPI must resolve the route signatures of the ingress class.
import asyncio
import base64
import contextlib
import logging
import time
from typing import Any

import torch
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from ray import serve
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException, MultiPartParser

from datprl.serve.codec import (
    FORMATS_OUT,
    MEDIA_TYPES,
    DecodedImage,
    OutputWriter,
    RequestError,
    check_content_type,
    check_output,
    decode,
    media_type_of,
    output_format,
    read_header,
)
from datprl.serve.config import ServeConfig, replica_config, resolve_num_gpus
from datprl.serve.engine import Engine, Restored, load_engine
from datprl.serve.pipeline import activation_bytes_per_pixel, configure_process_memory, plan_request, restore_image

__all__ = ["build_app", "deployment_options", "start_serve", "Restorer", "api"]

log = logging.getLogger("ray.serve")

api = FastAPI(
    title="DATPRL-IR restoration",
    version="1.0",
    description=(
        "Multi-domain all-in-one image restoration (natural photos, medical scans, remote sensing). "
        "POST an image to /v1/restore as the raw body or as a multipart field `file`: PNG (8/16-bit), JPEG, TIFF "
        "or single-frame DICOM. The restored image comes back with the input's size, channel count and bit depth, "
        "as PNG unless `format` says otherwise; `response=json` adds which prompts of each pool were selected. "
        "Errors are JSON objects {error, fix, status} with a 4xx status."
    ),
)

_RESTORE_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "properties": {"file": {"type": "string", "format": "binary"}},
                "required": ["file"],
            },
        },
        **{
            media: {"schema": {"type": "string", "format": "binary"}}
            for media in ("image/png", "image/jpeg", "image/tiff", "application/dicom", "application/octet-stream")
        },
    },
}
_ERROR_SCHEMA = {
    "application/json": {
        "schema": {
            "type": "object",
            "properties": {"error": {"type": "string"}, "fix": {"type": "string"}, "status": {"type": "integer"}},
        }
    }
}
_RESTORE_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "the restored image (format/bit depth as asked), or JSON with `response=json`",
        "content": {**{m: {} for m in MEDIA_TYPES.values()}, "application/json": {}},
    },
    400: {"description": "empty body, truncated or corrupt image, malformed upload", "content": _ERROR_SCHEMA},
    413: {
        "description": "body or image larger than the configured limits (decompression bombs too), or a "
        "request whose estimated memory exceeds request_memory_budget_bytes (checked from the header "
        "before decoding; the error names the estimate, the budget and the fix)",
        "content": _ERROR_SCHEMA,
    },
    415: {"description": "wrong Content-Type, unsupported or unrecognised format", "content": _ERROR_SCHEMA},
    422: {
        "description": "invalid parameters (format, bit_depth, tiling, white_level) or unusable image "
        "(multi-frame, no pixel data)",
        "content": _ERROR_SCHEMA,
    },
    503: {"description": "(GET /healthz only) the model's self-check forward failed", "content": _ERROR_SCHEMA},
}


@api.exception_handler(RequestError)
async def _request_error(_: Request, error: RequestError) -> JSONResponse:
    return JSONResponse(error.payload(), status_code=error.status)


@api.exception_handler(RequestValidationError)
async def _validation_error(_: Request, error: RequestValidationError) -> JSONResponse:
    problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in error.errors())
    return JSONResponse(
        {"error": f"invalid request parameters: {problems}", "fix": "see the parameter list in /docs", "status": 422},
        status_code=422,
    )


@api.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, error: StarletteHTTPException) -> JSONResponse:
    return JSONResponse(
        {
            "error": str(error.detail),
            "fix": "see /docs for the endpoints and their methods",
            "status": error.status_code,
        },
        status_code=error.status_code,
        headers=error.headers,
    )


@api.exception_handler(Exception)
async def _internal_error(_: Request, error: Exception) -> JSONResponse:  # a bug, never a bad input
    log.exception("internal error")
    return JSONResponse(
        {"error": f"internal error: {type(error).__name__}", "fix": "report it with the input", "status": 500},
        status_code=500,
    )


async def _single(data: bytes):
    yield data


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(
            413,
            f"request body of {declared} bytes exceeds the limit of {limit} bytes",
            "send a smaller image or raise the server's max_body_bytes",
        )
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(
                413,
                f"request body exceeds the limit of {limit} bytes",
                "send a smaller image or raise the server's max_body_bytes",
            )
        chunks.append(chunk)
    return b"".join(chunks)


async def _image_bytes(request: Request, limit: int) -> tuple[bytes, str | None]:
    """(image bytes, declared content type) from a raw body or a multipart upload (field ``file``)."""
    body = await _read_body(request, limit)
    content_type = request.headers.get("content-type")
    if media_type_of(content_type) != "multipart/form-data":
        return body, content_type
    if not body:
        raise RequestError(400, "empty multipart body: no image was sent", "send the image as -F file=@image.png")
    try:
        form = await MultiPartParser(request.headers, _single(body), max_files=4, max_fields=16).parse()
    except MultiPartException as error:
        raise RequestError(
            400,
            f"malformed multipart upload: {error.message}",
            "send the image as a multipart field 'file' (curl -F file=@image.png)",
        ) from None
    try:
        files = [(name, value) for name, value in form.multi_items() if isinstance(value, UploadFile)]
        if not files:
            raise RequestError(
                400,
                "multipart upload without a file field",
                "send the image as a multipart field 'file' (curl -F file=@image.png)",
            )
        chosen = (
            next((f for n, f in files if n == "file"), None)
            or next((f for n, f in files if n == "image"), None)
            or files[0][1]
        )
        data = await chosen.read()
        return data, chosen.content_type
    finally:
        await form.close()


def _decode(data: bytes, fmt: str, max_pixels: int, white_level: int | None) -> DecodedImage:
    """:func:`~datprl.serve.codec.decode`, looked up in this module when called: ``@serve.ingress`` copies the class
    by value, and its methods keep copies of the module-level names they use, so a patched ``decode`` (tests) is
    seen only through a module-level function."""
    return decode(data, fmt, max_pixels, white_level)


@serve.deployment(name="Restorer", max_ongoing_requests=32, health_check_period_s=10)
@serve.ingress(api)
class Restorer:
    """One replica: the engine (network on CPU or GPU) plus the HTTP routes."""

    def __init__(self, config: dict[str, Any]) -> None:
        from PIL import Image

        self.config = ServeConfig.model_validate(config)
        Image.MAX_IMAGE_PIXELS = self.config.max_pixels  # Pillow's own bomb check agrees with ours
        configure_process_memory(self.config)
        self.engine: Engine = load_engine(self.config)
        self.activation_bytes_per_pixel = activation_bytes_per_pixel(self.config, self.engine)
        self._infer.set_max_batch_size(self.config.max_batch_size)
        self._infer.set_batch_wait_timeout_s(self.config.batch_wait_timeout_s)
        self._large_slots = asyncio.Semaphore(self.config.max_concurrent_tiled)
        info = self.engine.info
        log.info(
            "[serve] replica ready: %s (%s, sha256 %s) on %s, %s; activations %s bytes/pixel",
            info.variant,
            info.source,
            info.weights_sha256[:12],
            info.device,
            self.engine.precision,
            "unused" if self.activation_bytes_per_pixel is None else f"{self.activation_bytes_per_pixel:.0f}",
        )
        if info.trained is False:
            log.warning("[serve] %s", info.note)

    async def check_health(self) -> None:  # called by the Serve controller; raising marks the replica unhealthy
        await asyncio.to_thread(self.engine.self_check)

    # -- batching ----------------------------------------------------------------------------------------------------
    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _infer(self, items: list[torch.Tensor]) -> list[Restored | Exception]:
        """(3, H, W) inputs of concurrent requests/tiles -> a :class:`Restored` each, or the exception of its group's
        forward (returned, not raised: Serve would fail every request of the batch)."""
        return await asyncio.to_thread(self.engine.restore_many, items)

    async def _forward(self, unit: torch.Tensor) -> Restored:
        result = await self._infer(unit)
        if isinstance(result, BaseException):
            raise result
        return result

    # -- routes ------------------------------------------------------------------------------------------------------
    @api.get(
        "/healthz",
        summary="Readiness: 200 once the model is loaded and a tiny forward works, else 503",
        responses={503: _RESTORE_RESPONSES[503]},
    )
    async def healthz(self) -> Response:
        try:
            await asyncio.to_thread(self.engine.self_check)
        except Exception as error:  # noqa: BLE001 - reported, not raised
            return JSONResponse(
                {
                    "error": f"model self-check failed: {type(error).__name__}: {error}",
                    "fix": "see the replica log; Serve restarts an unhealthy replica",
                    "status": 503,
                },
                status_code=503,
            )
        return JSONResponse(
            {
                "status": "ready",
                "model_loaded": True,
                "variant": self.engine.info.variant,
                "trained": self.engine.info.trained,
                "batch_errors": self.engine.stats["errors"],
            }
        )

    @api.get(
        "/v1/model",
        summary="The served network: variant, config, weights hash, trained or not and, for "
        "weights exported by training, their provenance (steps, dataset hash, evaluation, git commit, created)",
    )
    async def model(self) -> dict[str, Any]:
        cfg = self.config
        return {
            **self.engine.info.as_dict(),
            "limits": {
                "max_pixels": cfg.max_pixels,
                "max_body_bytes": cfg.max_body_bytes,
                "tile_size": cfg.tile_size,
                "tile_overlap": cfg.tile_overlap,
                "tile_above_pixels": cfg.tile_above_pixels,
                "max_untiled_pixels": cfg.max_untiled_pixels,
                "max_concurrent_tiled": cfg.max_concurrent_tiled,
                "max_batch_size": cfg.max_batch_size,
                "max_batch_pixels": cfg.max_batch_pixels,
                "request_memory_budget_bytes": cfg.request_memory_budget_bytes,
                "activation_bytes_per_pixel": self.activation_bytes_per_pixel,
            },
            "batching": dict(self.engine.stats),
        }

    @api.post(
        "/v1/restore",
        summary="Restore one image",
        openapi_extra={"requestBody": _RESTORE_BODY},
        responses=_RESTORE_RESPONSES,
        response_class=Response,
    )
    async def restore(
        self,
        request: Request,
        format: str = Query("png", description=f"output format: {', '.join(FORMATS_OUT)} (dicom for DICOM input)"),
        bit_depth: int | None = Query(None, description="8 or 16; default: the input's (8 for JPEG output)"),
        response: str = Query("image", description="image (the file) or json (base64 image + prompt selection)"),
        tiling: str = Query("auto", description="auto (tiles above tile_above_pixels), always, or never"),
        white_level: int | None = Query(
            None,
            ge=1,
            le=65535,
            description="16-bit PNG/TIFF input: stored value meaning full scale "
            "(default 65535; 4095 for 12-bit medical content)",
        ),
    ) -> Response:
        started = time.perf_counter()
        cfg = self.config
        # Everything that can be checked without the body is checked before reading it.
        if response not in ("image", "json"):
            raise RequestError(422, f"response={response!r} is not one of image, json", "ask response=image or json")
        if tiling not in ("auto", "always", "never"):
            raise RequestError(422, f"tiling={tiling!r} is not one of auto, always, never", "ask tiling=auto")
        out_format = output_format(format, bit_depth)
        data, content_type = await _image_bytes(request, cfg.max_body_bytes)
        fmt = check_content_type(data, content_type)
        check_output(out_format, bit_depth, fmt)
        # The header gives the size before any pixel is decoded: limits, tiling, the memory estimate and the
        # large-image slot come first.
        header = await asyncio.to_thread(read_header, data, fmt, cfg.max_pixels)
        plan = plan_request(header, len(data), tiling, cfg, self.activation_bytes_per_pixel, out_format, bit_depth)
        # Large images (tiled or not) are decoded and restored at most max_concurrent_tiled at a time per replica.
        slot = self._large_slots if header.pixels > cfg.tile_above_pixels else contextlib.nullcontext()
        async with slot:
            image = await asyncio.to_thread(_decode, data, fmt, cfg.max_pixels, white_level)
            del data  # the request body is not needed any more
            # OutputWriter checks the output against the decoded image (its bit depth) before the forward, not after
            writer = await asyncio.to_thread(OutputWriter, image, out_format, bit_depth)
            outcome = await restore_image(image, plan.tiled, writer, self._forward, self.engine.pools, cfg)
            encoded, described = await asyncio.to_thread(writer.finish)
            del writer
        if plan.note:
            described["notes"].append(plan.note)
        info = self.engine.info
        headers = {
            "X-Tiles": str(outcome.tiles),
            "X-Batch-Size": str(outcome.batch),
            "X-Weights-SHA256": info.weights_sha256,
            "X-Model-Trained": {True: "true", False: "false", None: "unknown"}[info.trained],
        }
        wants_json = response == "json" or media_type_of(request.headers.get("accept")) == "application/json"
        if not wants_json:
            return Response(encoded, media_type=described["media_type"], headers=headers)
        body = {
            **described,
            "image": base64.b64encode(encoded).decode("ascii"),
            "input": {
                "format": image.format,
                "width": image.width,
                "height": image.height,
                "channels": image.channels,
                "bit_depth": image.bit_depth,
                "white_level": image.white_level,
            },
            "prompts": outcome.prompts,
            "tiled": plan.tiled,
            "tiles": outcome.tiles,
            "batch_size": outcome.batch,
            "memory": plan.estimate.as_dict() if plan.estimate is not None else None,
            "model": {"variant": info.variant, "trained": info.trained, "weights_sha256": info.weights_sha256},
            "seconds": round(time.perf_counter() - started, 4),
        }
        return JSONResponse(body, headers=headers)


def deployment_options(config: ServeConfig) -> dict[str, Any]:
    """Ray Serve options of the deployment: replicas (fixed or autoscaled), per-replica CPUs/GPUs, concurrency."""
    options: dict[str, Any] = {
        "max_ongoing_requests": config.max_ongoing_requests,
        "ray_actor_options": {"num_cpus": config.num_cpus, "num_gpus": resolve_num_gpus(config)},
    }
    if config.num_replicas is not None:
        options["num_replicas"] = config.num_replicas
    else:
        options["autoscaling_config"] = config.autoscaling.to_ray()
    return options


def build_app(args: dict[str, Any] | None = None) -> serve.Application:
    """Application builder for ``serve run datprl.serve.app:build_app key=value ...``, the ``import_path`` of
    ``infra/serve.yaml`` and ``jobs/serve.py``. ``args`` are :class:`ServeConfig` fields (nested or dotted), except
    ``host``, ``port``, ``route_prefix`` and ``app_name``, which a builder cannot apply: they are rejected with where
    they go instead. ``weights`` is resolved to an absolute path here (:func:`~datprl.serve.config.replica_config`)."""
    config = replica_config(args)
    return Restorer.options(**deployment_options(config)).bind(config.model_dump(mode="json"))


# Serve's controller kills a proxy that is not ready within 5 s and fails its health check after 10 s; on a small,
# busy machine (2 CPUs shared with training) both happen while nothing is wrong. These apply only when this process
# starts Serve (an existing controller keeps its settings).
_TOLERANT_CONTROLLER_ENV = {
    "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60",
    "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "30",
}


def start_serve(host: str = "127.0.0.1", port: int = 8000) -> None:
    """``serve.start`` with the HTTP proxy on ``host:port`` (loopback unless told otherwise) and proxy timeouts that
    tolerate a busy machine."""
    serve.start(
        http_options={"host": host, "port": port},
        controller_options={"runtime_env": {"env_vars": dict(_TOLERANT_CONTROLLER_ENV)}},
    )
