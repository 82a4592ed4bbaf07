"""The restoration endpoint over real HTTP on 127.0.0.1, against a running Ray Serve application: a round trip per
input format, tiled against untiled, the bad-input matrix (never a 5xx, the replica stays healthy), health and model
endpoints, a bounded concurrent load, the benchmark, and ``jobs/serve.py`` with its defaults."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import numpy as np
import pytest
import requests
import torch
from PIL import Image

from datprl.models.factory import create_model, save_model, weights_digest
from datprl.serve.config import ServeConfig
from datprl.serve.engine import load_engine
from datprl.platform.runtime import free_loopback_port as _free_port
from serve_samples import encode_pil as _encode_pil
from serve_samples import photo as _photo
from serve_samples import png_bomb

pytestmark = pytest.mark.ray

# Small limits so that every branch is reachable with small images on 2 CPUs.
SETTINGS = dict(
    max_pixels=300 * 300,
    max_body_bytes=2 * 2**20,
    tile_size=64,
    tile_overlap=16,
    tile_above_pixels=128 * 128,
    max_untiled_pixels=200 * 200,
    max_batch_size=8,
    max_batch_pixels=8 * 64 * 64,  # a group of 8 tiles per forward
    batch_wait_timeout_s=0.02,
    # The memory budget (docs/serving.md), with a fixed activation figure so that which request fits does not
    # depend on a measurement: 150x140 untiled (~44 MB) and 8 tiles of 64x64 (~66 MB) fit, 200x200 untiled (~82 MB)
    # does not.
    request_memory_budget_bytes=72 * 2**20,
    activation_bytes_per_pixel=2000.0,
    num_cpus=0.5,
    torch_threads=1,
    autoscaling={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 8},
)
# Tiled vs untiled with 64-pixel tiles (docs/serving.md): measured 39.7 dB PSNR, mean |diff| 0.0056
# on a 150x140 photo; the network's channel attention and prompt queries see the whole input, so tiles differ a little.
TILE_MIN_PSNR = 36.0
TILE_MAX_MEAN_ABS = 0.012


def _png16(array: np.ndarray) -> bytes:
    from datprl.serve.codec import _encode_png

    return _encode_png(array if array.ndim == 3 else array[..., None], 16)


def _tiff(array: np.ndarray) -> bytes:
    import tifffile

    buffer = io.BytesIO()
    tifffile.imwrite(buffer, array, photometric="rgb" if array.ndim == 3 else "minisblack")
    return buffer.getvalue()


def _dicom(name: str) -> bytes:
    from pydicom.data import get_testdata_file

    return open(get_testdata_file(name), "rb").read()


def _decode(data: bytes):
    from datprl.serve.codec import check_content_type, decode

    return decode(data, check_content_type(data, None), 10**8)


@pytest.fixture(scope="module")
def served(ray_local, tmp_path_factory):
    """The app on a free loopback port, serving exported non-identity paper_tiny weights (so restoration, tiling and
    batching change pixels measurably)."""
    from ray import serve

    from datprl.serve.app import build_app, start_serve

    torch.manual_seed(0)
    weights = save_model(create_model("paper_tiny", zero_init_output=False), tmp_path_factory.mktemp("w") / "model")
    port = _free_port()
    start_serve("127.0.0.1", port)
    args = dict(SETTINGS, weights=str(weights))
    serve.run(build_app(args), name="datprl-test", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    try:
        yield SimpleNamespace(url=url, weights=weights, config=ServeConfig.model_validate(args))
    finally:
        serve.shutdown()


def _post(
    url: str,
    data: bytes,
    content_type: str | None = "application/octet-stream",
    params=None,
    multipart=False,
    timeout: float = 120,
) -> requests.Response:
    if multipart:
        return requests.post(
            f"{url}/v1/restore",
            params=params,
            timeout=timeout,
            files={"file": ("upload", data, content_type or "application/octet-stream")},
        )
    headers = {"Content-Type": content_type} if content_type else {}
    return requests.post(f"{url}/v1/restore", params=params, data=data, headers=headers, timeout=timeout)


# --- health, model, docs -------------------------------------------------------------------------------------------


def test_health_model_and_docs(served):
    health = requests.get(f"{served.url}/healthz", timeout=30)
    assert health.status_code == 200 and health.json()["status"] == "ready"
    model = requests.get(f"{served.url}/v1/model", timeout=30).json()
    assert model["source"] == "weights" and model["weights"] == str(served.weights)
    assert model["weights_sha256"] == weights_digest(served.weights)
    assert model["config"]["width"] == 16 and model["pools"]["task"] == {"size": 6, "top_k": 3}
    assert model["limits"]["max_pixels"] == SETTINGS["max_pixels"]
    spec = requests.get(f"{served.url}/openapi.json", timeout=30).json()
    body = spec["paths"]["/v1/restore"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "image/png", "application/dicom"} <= set(body)
    assert {"/healthz", "/v1/model"} <= set(spec["paths"])
    assert requests.get(f"{served.url}/docs", timeout=30).status_code == 200


# --- a round trip per input format ---------------------------------------------------------------------------------


def _cases():
    rgb = _photo(45, 61)
    gray = rgb.mean(axis=2).astype(np.uint8)
    rgba = np.dstack([rgb, np.linspace(0, 255, 45 * 61).reshape(45, 61).astype(np.uint8)])
    gray16 = (gray.astype(np.uint16) * 257 + 3).astype(np.uint16)
    rgb16 = (rgb.astype(np.uint16) * 257).astype(np.uint16)
    return [  # id, bytes, content type, multipart, (height, width, channels, bit depth), format out
        ("png-rgb8", _encode_pil(rgb, "PNG"), "image/png", False, (45, 61, 3, 8), "png"),
        ("png-gray8-multipart", _encode_pil(gray, "PNG"), "image/png", True, (45, 61, 1, 8), "png"),
        ("png-rgba8", _encode_pil(rgba, "PNG"), "image/png", True, (45, 61, 4, 8), "png"),
        ("png-gray16", _png16(gray16), "image/png", False, (45, 61, 1, 16), "png"),
        ("png-rgb16", _png16(rgb16), "application/octet-stream", True, (45, 61, 3, 16), "png"),
        ("jpeg-rgb", _encode_pil(rgb, "JPEG", quality=92), "image/jpeg", False, (45, 61, 3, 8), "png"),
        ("jpeg-gray", _encode_pil(gray, "JPEG", quality=92), "image/jpeg", True, (45, 61, 1, 8), "png"),
        ("tiff-rgb8", _tiff(rgb), "image/tiff", False, (45, 61, 3, 8), "png"),
        ("tiff-gray16", _tiff(gray16), "image/tiff", True, (45, 61, 1, 16), "png"),
        ("dicom-ct", _dicom("CT_small.dcm"), "application/dicom", False, (128, 128, 1, 16), "png"),
        ("dicom-mr-multipart", _dicom("MR_small.dcm"), "application/dicom", True, (64, 64, 1, 16), "png"),
    ]


CASES = _cases()


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_round_trip_keeps_size_channels_and_bit_depth(served, case):
    _, data, content_type, multipart, (height, width, channels, bits), fmt = case
    reply = _post(served.url, data, content_type, multipart=multipart)
    assert reply.status_code == 200, reply.text
    assert reply.headers["content-type"] == "image/png"
    out = _decode(reply.content)
    assert (out.height, out.width, out.channels, out.bit_depth) == (height, width, channels, bits)
    source = _decode(data)
    if source.alpha is not None:  # alpha passes through untouched
        np.testing.assert_array_equal(out.alpha, source.alpha)
    change = np.abs(out.pixels.astype(float) - source.pixels.astype(float)).mean() / out.white_level
    assert 0 < change < 0.3  # the (random, non-identity) network did something, and the scale was kept


def test_dicom_out_and_selectable_format_and_bit_depth(served):
    import pydicom

    ct = _dicom("CT_small.dcm")
    reply = _post(served.url, ct, "application/dicom", params={"format": "dicom"})
    assert reply.status_code == 200 and reply.headers["content-type"] == "application/dicom"
    back = pydicom.dcmread(io.BytesIO(reply.content))
    source = pydicom.dcmread(io.BytesIO(ct))
    assert back.pixel_array.shape == source.pixel_array.shape and back.pixel_array.dtype == source.pixel_array.dtype
    assert back.PatientName == source.PatientName and back.RescaleIntercept == source.RescaleIntercept

    gray16 = _png16((_photo(40, 40).mean(axis=2) * 257).astype(np.uint16))
    out = _decode(_post(served.url, gray16, "image/png", params={"bit_depth": 8}).content)
    assert (out.bit_depth, out.channels) == (8, 1)
    out = _decode(
        _post(
            served.url, _encode_pil(_photo(40, 40), "PNG"), "image/png", params={"format": "tiff", "bit_depth": 16}
        ).content
    )
    assert (out.format, out.bit_depth, out.channels) == ("tiff", 16, 3)
    reply = _post(served.url, _encode_pil(_photo(40, 40), "PNG"), "image/png", params={"format": "jpeg"})
    assert reply.headers["content-type"] == "image/jpeg" and _decode(reply.content).width == 40
    reply = requests.post(
        f"{served.url}/v1/restore",
        data=gray16,
        timeout=120,
        headers={"Content-Type": "image/png", "Accept": "application/json"},
    )
    body = reply.json()  # JSON by Accept header; white_level default 65535 for 16-bit input
    assert (body["bit_depth"], body["channels"], body["input"]["white_level"]) == (16, 1, 65535)
    assert _decode(base64.b64decode(body["image"])).bit_depth == 16


def test_endpoint_equals_in_process_model_and_reports_prompts(served):
    rgb = _photo(40, 56)
    reply = _post(served.url, _encode_pil(rgb, "PNG"), "image/png", params={"response": "json"})
    assert reply.status_code == 200
    body = reply.json()
    assert (body["width"], body["height"], body["channels"], body["bit_depth"]) == (56, 40, 3, 8)
    assert body["input"]["format"] == "png" and body["tiled"] is False and body["tiles"] == 1
    served_pixels = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["image"]))))
    engine = load_engine(served.config, device="cpu")
    restored, prompts = engine.restore(torch.from_numpy(rgb).permute(2, 0, 1).float() / 255)
    expected = np.rint(restored.permute(1, 2, 0).numpy() * 255).astype(int)
    assert np.abs(served_pixels.astype(int) - expected).max() <= 1
    for pool in ("task", "domain"):
        assert [e["index"] for e in body["prompts"][pool]] == [e["index"] for e in prompts[pool]]
        np.testing.assert_allclose(
            [e["weight"] for e in body["prompts"][pool]], [e["weight"] for e in prompts[pool]], atol=1e-4
        )
        assert abs(sum(e["weight"] for e in body["prompts"][pool]) - 1) < 1e-3


# --- large images --------------------------------------------------------------------------------------------------


def test_tiled_equals_untiled_within_tolerance(served):
    rgb = _photo(150, 140)  # 21,000 px: above tile_above_pixels, below max_untiled_pixels
    data = _encode_pil(rgb, "PNG")
    untiled = _post(served.url, data, "image/png", params={"tiling": "never"})
    tiled = _post(served.url, data, "image/png")  # auto: tiled above 128x128
    assert untiled.headers["x-tiles"] == "1" and int(tiled.headers["x-tiles"]) == 9
    a = _decode(untiled.content).pixels.astype(float) / 255
    b = _decode(tiled.content).pixels.astype(float) / 255
    assert a.shape == b.shape == (150, 140, 3)
    diff = np.abs(a - b)
    psnr = 10 * np.log10(1 / (diff**2).mean())
    print(f"HTTP tiled vs untiled (8-bit PNG out): max {diff.max():.4f} mean {diff.mean():.5f} PSNR {psnr:.1f} dB")
    assert psnr >= TILE_MIN_PSNR and diff.mean() <= TILE_MAX_MEAN_ABS
    # Concurrent large images queue for the replica's max_concurrent_tiled slots and come out the same.
    with ThreadPoolExecutor(3) as pool:
        replies = list(pool.map(lambda _: _post(served.url, data, "image/png"), range(3)))
    assert all(r.status_code == 200 for r in replies)
    for reply in replies:
        np.testing.assert_allclose(_decode(reply.content).pixels.astype(float) / 255, b, atol=1.5 / 255)


def test_memory_budget_refuses_an_untiled_image_before_decoding(served):
    data = _encode_pil(_photo(200, 200), "PNG")  # within max_untiled_pixels, but not within the memory budget
    refused = _post(served.url, data, "image/png", params={"tiling": "never"})
    assert refused.status_code == 413, refused.text[:300]
    payload = refused.json()
    assert f"request_memory_budget_bytes={SETTINGS['request_memory_budget_bytes']}" in payload["error"]
    assert "estimated" in payload["error"] and "activations" in payload["error"] and "200x200" in payload["error"]
    assert "tiling=auto" in payload["fix"] and "request_memory_budget_bytes" in payload["fix"]
    tiled = _post(served.url, data, "image/png", params={"response": "json"})  # the fix works
    assert tiled.status_code == 200 and tiled.json()["tiled"] is True
    estimate = tiled.json()["memory"]
    assert estimate["tiled"] is True and estimate["estimate_bytes"] <= SETTINGS["request_memory_budget_bytes"]
    assert estimate["activation_bytes_per_pixel"] == SETTINGS["activation_bytes_per_pixel"]
    limits = requests.get(f"{served.url}/v1/model", timeout=30).json()["limits"]
    assert limits["request_memory_budget_bytes"] == SETTINGS["request_memory_budget_bytes"]
    assert limits["max_batch_pixels"] == SETTINGS["max_batch_pixels"]


# --- bad input -----------------------------------------------------------------------------------------------------


def _tiff_samples(samples: int) -> bytes:
    """64x64 pixels, within max_pixels, with ``samples`` samples per pixel (deflate: a few KB)."""
    import tifffile

    buffer = io.BytesIO()
    tifffile.imwrite(
        buffer,
        np.zeros((64, 64, samples), np.uint8),
        photometric="minisblack",
        planarconfig="contig",
        compression="zlib",
    )
    return buffer.getvalue()


def _dicom_claiming(rows: int, cols: int) -> bytes:
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(_dicom("MR_small.dcm")))
    ds.Rows, ds.Columns = rows, cols
    buffer = io.BytesIO()
    ds.save_as(buffer)
    return buffer.getvalue()


def _bad_cases():
    png = _encode_pil(_photo(32, 32), "PNG")
    jpeg = _encode_pil(_photo(32, 32), "JPEG")
    tiff = _tiff(_photo(32, 32))
    ct = _dicom("CT_small.dcm")
    return [  # id, body, content type, multipart, params, expected status, word in the error
        ("empty-body", b"", "image/png", False, None, 400, "empty"),
        ("empty-multipart-file", b"", "image/png", True, None, 400, "empty"),
        ("text-bytes", b"hello, not an image" * 10, "application/octet-stream", False, None, 415, "not an image"),
        ("random-bytes-multipart", bytes(range(256)) * 4, None, True, None, 415, "not an image"),
        ("truncated-png", png[: len(png) // 2], "image/png", False, None, 400, "truncated"),
        ("truncated-jpeg", jpeg[: len(jpeg) // 2], "image/jpeg", False, None, 400, "truncated"),
        ("truncated-tiff", tiff[: len(tiff) // 3], "image/tiff", False, None, 400, "truncated"),
        ("truncated-dicom", ct[: len(ct) // 2], "application/dicom", False, None, 400, "truncated"),
        ("png-header-only", png[:40], "image/png", False, None, 400, "PNG"),
        ("gif", _encode_pil(_photo(16, 16), "GIF"), "application/octet-stream", False, None, 415, "GIF"),
        ("bmp", _encode_pil(_photo(16, 16), "BMP"), "image/bmp", False, None, 415, "image/bmp"),
        (
            "too-many-pixels",
            _encode_pil(np.zeros((320, 320), np.uint8), "PNG"),
            "image/png",
            False,
            None,
            413,
            "exceeds",
        ),
        ("png-bomb", png_bomb(60000, 60000), "image/png", False, None, 413, "60000x60000"),
        ("tiff-samples-bomb", _tiff_samples(1000), "image/tiff", False, None, 415, "samples per pixel"),
        ("dicom-bomb", _dicom_claiming(40000, 40000), "application/dicom", False, None, 413, "exceeds"),
        ("body-too-large", b"\x89PNG\r\n\x1a\n" + b"\0" * (2 * 2**20 + 10), "image/png", False, None, 413, "body"),
        ("multi-frame-dicom", _dicom("emri_small.dcm"), "application/dicom", False, None, 422, "multi-frame"),
        ("dicom-no-pixels", _dicom("rtplan.dcm"), "application/dicom", False, None, 422, "pixel data"),
        ("text-plain", png, "text/plain", False, None, 415, "text/plain"),
        ("form-urlencoded", png, "application/x-www-form-urlencoded", False, None, 415, "Content-Type"),
        ("json-type", png, "application/json", False, None, 415, "application/json"),
        ("declared-jpeg-is-png", png, "image/jpeg", False, None, 415, "does not match"),
        ("multipart-part-mismatch", png, "image/tiff", True, None, 415, "does not match"),
        ("bad-format", png, "image/png", False, {"format": "bmp"}, 422, "format"),
        ("bad-bit-depth", png, "image/png", False, {"bit_depth": 12}, 422, "bit_depth"),
        ("bit-depth-not-int", png, "image/png", False, {"bit_depth": "many"}, 422, "bit_depth"),
        ("bad-tiling", png, "image/png", False, {"tiling": "maybe"}, 422, "tiling"),
        ("bad-response", png, "image/png", False, {"response": "xml"}, 422, "response"),
        ("white-level-zero", png, "image/png", False, {"white_level": 0}, 422, "white_level"),
        ("white-level-too-high-for-8-bit", png, "image/png", False, {"white_level": 4095}, 422, "white_level"),
        ("jpeg-16-bit", png, "image/png", False, {"format": "jpeg", "bit_depth": 16}, 422, "JPEG"),
        ("dicom-out-of-png", png, "image/png", False, {"format": "dicom"}, 422, "DICOM"),
        (
            "never-tile-too-big",
            _encode_pil(np.zeros((210, 210), np.uint8), "PNG"),
            "image/png",
            False,
            {"tiling": "never"},
            413,
            "max_untiled_pixels",
        ),
        (
            "never-tile-over-memory-budget",
            _encode_pil(np.zeros((200, 200), np.uint8), "PNG"),
            "image/png",
            False,
            {"tiling": "never"},
            413,
            "request_memory_budget_bytes",
        ),
    ]


BAD = _bad_cases()


def test_bad_input_matrix_gets_json_4xx_and_the_replica_stays_healthy(served):
    failures = []
    for name, body, content_type, multipart, params, status, word in BAD:
        reply = _post(served.url, body, content_type, params=params, multipart=multipart)
        try:
            payload = reply.json()
        except ValueError:
            payload = {}
        ok = (
            reply.status_code == status
            and set(payload) >= {"error", "fix"}
            and word.lower() in payload.get("error", "").lower()
        )
        if not ok:
            failures.append(f"{name}: {reply.status_code} {reply.text[:200]}")
        assert reply.status_code < 500, f"{name}: {reply.status_code} {reply.text[:300]}"
    for method, path, status in (("GET", "/v1/restore", 405), ("GET", "/v2/nothing", 404)):
        reply = requests.request(method, served.url + path, timeout=30)
        if reply.status_code != status or "error" not in reply.json():
            failures.append(f"{method} {path}: {reply.status_code} {reply.text[:200]}")
    assert not failures, "\n".join(failures)
    assert requests.get(f"{served.url}/healthz", timeout=30).status_code == 200
    good = _post(served.url, _encode_pil(_photo(24, 24), "PNG"), "image/png")
    assert good.status_code == 200 and _decode(good.content).width == 24


# --- load ----------------------------------------------------------------------------------------------------------


@pytest.mark.e2e
def test_concurrent_load_has_no_errors_and_batches(served):
    """200 requests from 8 clients, two image sizes (batches group equal shapes); every reply equals the in-process
    restoration of its image (within one 8-bit step: batching changes results only by float rounding)."""
    arrays = [_photo(48, 48, top=8 * i, left=4 * i) for i in range(8)]
    arrays += [_photo(40, 56, top=8 * i, left=6 * i) for i in range(4)]
    images = [_encode_pil(a, "PNG") for a in arrays]
    engine = load_engine(served.config, device="cpu")
    expected = [
        np.rint(
            engine.restore(torch.from_numpy(a).permute(2, 0, 1).float() / 255)[0].permute(1, 2, 0).numpy() * 255
        ).astype(int)
        for a in arrays
    ]

    def client(k: int):
        out = []
        with requests.Session() as session:
            for j in range(25):
                data = images[(k * 25 + j) % len(images)]
                started = time.perf_counter()
                reply = session.post(
                    f"{served.url}/v1/restore", data=data, headers={"Content-Type": "image/png"}, timeout=300
                )
                index = (k * 25 + j) % len(images)
                if reply.status_code == 200:
                    pixels = _decode(reply.content).pixels.astype(int)
                    detail = (
                        int(np.abs(pixels - expected[index]).max())
                        if pixels.shape == expected[index].shape
                        else f"shape {pixels.shape}"
                    )
                else:
                    detail = reply.text[:200]
                out.append(
                    (
                        reply.status_code,
                        int(reply.headers.get("x-batch-size", 0)),
                        detail,
                        time.perf_counter() - started,
                    )
                )
        return out

    started = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        results = [r for chunk in pool.map(client, range(8)) for r in chunk]
    wall = time.perf_counter() - started
    errors = [r for r in results if r[0] != 200]
    print(
        f"load: {len(results)} requests from 8 clients in {wall:.1f} s ({len(results) / wall:.1f} req/s), "
        f"{len(errors)} errors, largest batch {max(r[1] for r in results)}, "
        f"p50 {np.percentile([r[3] for r in results], 50) * 1000:.0f} ms"
    )
    assert len(results) == 200 and not errors, errors[:3]
    mismatched = [r for r in results if not (isinstance(r[2], int) and r[2] <= 1)]
    assert not mismatched, mismatched[:3]  # each reply is its own image's restoration
    assert max(r[1] for r in results) > 1  # concurrent requests were batched


# --- benchmark and entry point -------------------------------------------------------------------------------------


@pytest.mark.e2e
def test_benchmark_against_the_running_app(served):
    from datprl.serve.benchmark import ServeBenchmarkConfig, run_benchmark

    result = run_benchmark(
        ServeBenchmarkConfig(
            url=served.url, requests=16, clients=4, size=48, warmup=2, weights=str(served.weights), torch_threads=1
        )
    )
    for side in ("endpoint", "in_process"):
        assert result[side]["p50_ms"] > 0 and result[side]["p99_ms"] >= result[side]["p50_ms"]
        assert result[side]["throughput_per_s"] > 0
    assert result["endpoint"]["errors"] == 0 and result["overhead_ratio"] > 0


@pytest.mark.e2e
def test_job_with_defaults_serves_a_fresh_tiny_model(repo_root, tmp_path):
    """``python jobs/serve.py`` with its defaults (only the port moved and a one-shot check added): a local Ray, a
    fresh paper_tiny, announced as untrained."""
    port = _free_port()
    out = subprocess.run(
        [sys.executable, str(repo_root / "jobs/serve.py"), "smoke=true", f"port={port}", "local_num_cpus=2"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=420,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert "FRESH, UNTRAINED paper_tiny" in out.stdout
    assert "smoke: healthz=ready variant=paper_tiny source=fresh trained=False" in out.stdout
    assert "restored 128x128 3ch 8-bit png" in out.stdout
    assert json.dumps(f"http://127.0.0.1:{port}")[1:-1] in out.stdout
