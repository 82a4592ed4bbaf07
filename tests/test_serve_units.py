"""Serving logic without Ray: image codecs and limits, tiling, the engine (batching rule, S3 weights), configs."""

from __future__ import annotations

import io
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from datprl.models.factory import create_model, save_model, weights_digest
from datprl.serve.codec import DecodedImage, RequestError, check_content_type, decode, encode, sniff
from datprl.serve.config import ServeConfig, config_from_args
from datprl.serve.engine import load_engine
from datprl.serve.tiling import blend_window, tile_grid, tiled_apply

# Tolerance of tiled against untiled inference (README "Serving"): the network's channel attention and its prompt
# queries see the whole input, so tiles differ slightly from one pass. Measured on a real photo with a randomly
# initialised non-identity paper_tiny: PSNR 42.7-45.8 dB, mean |diff| 0.0036-0.0053, max |diff| 0.04-0.06.
TILE_MIN_PSNR = 40.0
TILE_MAX_MEAN_ABS = 0.008


def _photo(height: int, width: int, top: int = 100, left: int = 150) -> np.ndarray:
    import skimage.data

    return skimage.data.astronaut()[top : top + height, left : left + width]


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _noisy_model(seed: int = 0):
    """A fresh paper_tiny whose output conv is random (the default fresh network is the identity)."""
    torch.manual_seed(seed)
    return create_model("paper_tiny", zero_init_output=False).eval()


# --- codec -------------------------------------------------------------------------------------------------------


def test_sniff_and_content_type_rules():
    png = _png(_photo(8, 8))
    assert sniff(png) == "png"
    assert check_content_type(png, "image/png") == "png"
    assert check_content_type(png, "application/octet-stream") == "png"
    assert check_content_type(png, None) == "png"
    for content_type, status in [("text/plain", 415), ("application/x-www-form-urlencoded", 415),
                                 ("image/jpeg", 415), ("image/gif", 415)]:
        with pytest.raises(RequestError) as info:
            check_content_type(png, content_type)
        assert info.value.status == status and content_type.split("/")[1] in info.value.error
    with pytest.raises(RequestError) as info:
        check_content_type(b"", "image/png")
    assert info.value.status == 400 and "empty" in info.value.error
    with pytest.raises(RequestError) as info:
        check_content_type(b"GIF89a" + b"\0" * 40, None)
    assert info.value.status == 415 and "GIF" in info.value.error


def test_dicom_preamble_holding_a_tiff_header_is_dicom():
    from pydicom.data import get_testdata_file

    data = open(get_testdata_file("CT_small.dcm"), "rb").read()
    assert data.startswith(b"II*\x00")  # a dual-personality preamble
    assert sniff(data) == "dicom"


@pytest.mark.parametrize("shape,dtype,fmt", [
    ((20, 30, 3), np.uint8, "png"), ((20, 30), np.uint8, "png"), ((20, 30, 4), np.uint8, "png"),
    ((20, 30), np.uint16, "png"), ((20, 30, 3), np.uint16, "png"), ((20, 30, 4), np.uint16, "png"),
    ((20, 30, 3), np.uint8, "tiff"), ((20, 30), np.uint16, "tiff"), ((20, 30, 3), np.uint16, "tiff"),
])  # fmt: skip
def test_encode_decode_round_trip_is_exact(shape, dtype, fmt):
    rng = np.random.default_rng(0)
    values = (rng.random(shape) * np.iinfo(dtype).max).astype(dtype)
    bits = np.iinfo(dtype).bits
    colour, alpha = (values[..., None], None) if values.ndim == 2 else (
        (values[..., :-1], values[..., -1]) if values.shape[2] == 4 else (values, None))
    source = DecodedImage(fmt, colour, alpha, bits, 2**bits - 1)
    data, described = encode(source.to_unit(), source, fmt)
    back = decode(data, check_content_type(data, None), 10**6)
    assert (described["bit_depth"], described["channels"]) == (bits, source.channels)
    assert back.bit_depth == bits and back.channels == source.channels
    np.testing.assert_array_equal(back.pixels, source.pixels)  # gray: mean of 3 equal channels is exact
    if alpha is not None:
        np.testing.assert_array_equal(back.alpha, alpha)


def test_dicom_ct_keeps_hu_and_raw_values():
    import pydicom
    from pydicom.data import get_testdata_file

    data = open(get_testdata_file("CT_small.dcm"), "rb").read()
    image = decode(data, check_content_type(data, "application/dicom"), 10**6)
    assert (image.bit_depth, image.white_level, image.channels) == (16, 4095, 1)
    raw = pydicom.dcmread(io.BytesIO(data)).pixel_array
    np.testing.assert_array_equal(image.pixels[..., 0], raw.astype(int) - 1024 + 1024)  # slope 1, intercept -1024
    png, described = encode(image.to_unit(), image, "png")
    assert described["bit_depth"] == 16 and "HU + 1024" in described["notes"][0]
    out, _ = encode(image.to_unit(), image, "dicom")
    back = pydicom.dcmread(io.BytesIO(out))
    assert back.pixel_array.dtype == raw.dtype
    np.testing.assert_array_equal(back.pixel_array, raw)


def _png_bomb(width: int, height: int) -> bytes:
    """A valid tiny PNG whose IHDR claims width x height (a decompression bomb's header)."""
    small = bytearray(_png(np.zeros((4, 4), np.uint8)))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    small[16:29] = ihdr
    small[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr) & 0xFFFFFFFF)
    return bytes(small)


def test_pixel_limit_is_checked_from_the_header():
    with pytest.raises(RequestError) as info:
        decode(_png_bomb(100_000, 100_000), "png", max_pixels=10**6)
    assert info.value.status == 413 and "100000x100000" in info.value.error
    big = _png(np.zeros((40, 40), np.uint8))
    with pytest.raises(RequestError) as info:
        decode(big, "png", max_pixels=1000)
    assert info.value.status == 413
    with pytest.raises(RequestError) as info:
        decode(big[: len(big) // 2], "png", max_pixels=10**6)
    assert info.value.status == 400 and "truncated" in info.value.error


def test_jpeg_output_is_8_bit_and_drops_alpha():
    rgba = np.dstack([_photo(16, 16), np.full((16, 16), 200, np.uint8)])
    source = decode(_png(rgba), "png", 10**6)
    data, described = encode(source.to_unit(), source, "jpeg")
    assert described["channels"] == 3 and described["bit_depth"] == 8 and "alpha" in described["notes"][0]
    with pytest.raises(RequestError) as info:
        encode(source.to_unit(), source, "jpeg", bit_depth=16)
    assert info.value.status == 422


# --- tiling ------------------------------------------------------------------------------------------------------


def test_tile_grid_covers_with_equal_shapes():
    tiles = tile_grid(200, 130, 64, 16)
    assert len({(t.height, t.width) for t in tiles}) == 1
    covered = torch.zeros(200, 130)
    for t in tiles:
        covered[t.top : t.top + t.height, t.left : t.left + t.width] += 1
    assert covered.min() >= 1
    assert tile_grid(40, 50, 64, 16) == [tile_grid(40, 50, 64, 16)[0]]  # smaller than a tile: one piece
    assert blend_window(64, 64, 16).min() > 0


def test_tiled_apply_of_a_local_function_is_exact():
    image = torch.rand(3, 150, 111)
    out = tiled_apply(lambda x: x * 2 + 1, image, tile=64, overlap=16, batch_size=3)
    torch.testing.assert_close(out, image * 2 + 1, atol=1e-6, rtol=0)


def test_tiled_inference_is_within_the_stated_tolerance():
    from datprl.serve.engine import Engine, ModelInfo

    image = torch.from_numpy(_photo(96, 96)).permute(2, 0, 1).float() / 255
    info = ModelInfo("paper_tiny", "fresh", False, None, "", 0, {}, "cpu",
                     {"task": {"size": 6, "top_k": 3}, "domain": {"size": 6, "top_k": 3}})
    engine = Engine(_noisy_model(), info, torch.device("cpu"))
    full, _ = engine.restore(image)
    tiled, prompts = engine.restore(image, tiling=True, tile_size=64, tile_overlap=16, batch_size=4)
    diff = (tiled - full).abs()
    psnr = 10 * np.log10(1 / ((tiled - full) ** 2).mean().item())
    print(f"tiled vs untiled: max {diff.max():.4f} mean {diff.mean():.5f} PSNR {psnr:.1f} dB")
    assert psnr >= TILE_MIN_PSNR and diff.mean() <= TILE_MAX_MEAN_ABS
    assert (full - image).abs().mean() > 10 * diff.mean()  # the network changes the image far more than tiling does
    assert all(e["selected_in_tiles"] >= 1 for e in prompts["task"])
    # The fresh (identity-initialised) network is local, so tiling is exact there.
    identity = Engine(create_model("paper_tiny").eval(), info, torch.device("cpu"))
    a, _ = identity.restore(image)
    b, _ = identity.restore(image, tiling=True, tile_size=64, tile_overlap=16)
    assert (a - b).abs().max() <= 1e-5


# --- engine ------------------------------------------------------------------------------------------------------


def test_batched_groups_equal_single_images(tmp_path):
    save_model(_noisy_model(), tmp_path / "m")
    engine = load_engine(ServeConfig(weights=str(tmp_path / "m.safetensors")))
    units = [torch.rand(3, 30, 41), torch.rand(3, 32, 48), torch.rand(3, 20, 20)]  # first two pad to 32x48
    together = engine.restore_many(units)
    for unit, batched in zip(units, together):
        alone, _ = engine.restore(unit)
        assert batched.shape == unit.shape
        torch.testing.assert_close(batched, alone, atol=2e-5, rtol=0)


def test_fresh_engine_says_untrained_and_weights_engine_reports_hash(tmp_path):
    fresh = load_engine(ServeConfig(weights=None))
    assert fresh.info.source == "fresh" and fresh.info.trained is False and "UNTRAINED" in fresh.info.note
    assert load_engine(ServeConfig(weights=None)).info.weights_sha256 == fresh.info.weights_sha256  # seeded
    path = save_model(_noisy_model(), tmp_path / "exported")
    loaded = load_engine(ServeConfig(weights=str(path)))
    assert loaded.info.weights_sha256 == weights_digest(path) and loaded.info.variant == "custom"
    with pytest.raises(FileNotFoundError):
        load_engine(ServeConfig(weights=str(tmp_path / "missing.safetensors")))


def test_weights_auto_uses_training_export(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert ServeConfig().resolved_weights() is None
    save_model(create_model("paper_tiny"), tmp_path / "outputs/train/model")
    assert ServeConfig().resolved_weights() == "outputs/train/model.safetensors"
    assert load_engine(ServeConfig()).info.source == "weights"


def test_weights_from_s3(s3_server, tmp_path):
    import boto3

    path = save_model(_noisy_model(1), tmp_path / "model")
    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    client.create_bucket(Bucket="weights")
    for suffix in (".safetensors", ".json"):
        client.upload_file(str(tmp_path / f"model{suffix}"), "weights", f"run/model{suffix}")
    engine = load_engine(ServeConfig(weights="s3://weights/run/model.safetensors", s3_endpoint_url=s3_server))
    assert engine.info.weights_sha256 == weights_digest(path)
    with pytest.raises(FileNotFoundError):
        load_engine(ServeConfig(weights="s3://weights/none/model.safetensors", s3_endpoint_url=s3_server))


# --- configuration -----------------------------------------------------------------------------------------------


def test_config_defaults_and_errors():
    from datprl.platform.config import ConfigError
    from datprl.serve.app import deployment_options

    config = ServeConfig()
    assert config.host == "127.0.0.1" and config.variant == "paper_tiny"
    options = deployment_options(config)
    assert options["autoscaling_config"]["max_replicas"] >= options["autoscaling_config"]["min_replicas"]
    assert options["ray_actor_options"]["num_gpus"] == (1.0 if torch.cuda.is_available() else 0.0)
    assert deployment_options(ServeConfig(num_replicas=2))["num_replicas"] == 2
    assert config_from_args({"autoscaling.max_replicas": "3", "tile_size": "256"}).autoscaling.max_replicas == 3
    with pytest.raises(ConfigError, match="tile_sise"):
        config_from_args({"tile_sise": 3})
    with pytest.raises(ConfigError, match="tile_size"):
        config_from_args({"tile_size": 100})
    with pytest.raises(ConfigError, match="min_replicas"):
        config_from_args({"autoscaling": {"min_replicas": 3, "max_replicas": 2}})


def test_serve_deploy_config_is_valid(repo_root):
    from ray.serve.schema import ServeDeploySchema

    raw = yaml.safe_load((repo_root / "infra/serve.yaml").read_text())
    schema = ServeDeploySchema.model_validate(raw) if hasattr(ServeDeploySchema, "model_validate") else (
        ServeDeploySchema.parse_obj(raw))
    assert schema.http_options.host == "127.0.0.1"
    app = schema.applications[0]
    assert app.import_path == "datprl.serve.app:build_app"
    config = config_from_args(app.args)
    assert config.autoscaling.max_replicas >= 1 and config.num_gpus == "auto"
    assert "serve deploy infra/serve.yaml" in (repo_root / "infra/serve.yaml").read_text()


def test_job_help_lists_the_fields(repo_root):
    out = subprocess.run([sys.executable, "jobs/serve.py", "--help"], cwd=repo_root, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    for field in ("weights", "max_pixels", "tile_size", "autoscaling.max_replicas", "host", "ray_address"):
        assert field in out.stdout
    bad = subprocess.run([sys.executable, "jobs/serve.py", "tile_size=100"], cwd=repo_root, capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and "tile_size" in bad.stderr
