"""Serving logic without Ray: image codecs and limits, tiling, the engine (batching rule, S3 weights), configs, and
the replica's request path in-process (the deployment class called directly, with Serve's real batch queue)."""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from datprl.models.factory import create_model, save_model, weights_digest
from datprl.serve.codec import DecodedImage, RequestError, check_content_type, decode, encode, sniff
from datprl.serve.config import ServeConfig, config_from_args, replica_config
from datprl.serve.engine import Restored, load_engine
from datprl.serve.tiling import blend_window, tile_grid, tiled_apply
from serve_samples import encode_pil, photo, png_bomb

# Tolerance of tiled against untiled inference (docs/serving.md): the network's channel attention and its prompt
# queries see the whole input, so tiles differ slightly from one pass. Measured on a real photo with a randomly
# initialised non-identity paper_tiny: PSNR 42.7-45.8 dB, mean |diff| 0.0036-0.0053, max |diff| 0.04-0.06.
TILE_MIN_PSNR = 40.0
TILE_MAX_MEAN_ABS = 0.008


_photo = photo
_png = encode_pil


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
    for content_type, status in [
        ("text/plain", 415),
        ("application/x-www-form-urlencoded", 415),
        ("image/jpeg", 415),
        ("image/gif", 415),
    ]:
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


@pytest.mark.parametrize(
    "shape,dtype,fmt",
    [
        ((20, 30, 3), np.uint8, "png"),
        ((20, 30), np.uint8, "png"),
        ((20, 30, 4), np.uint8, "png"),
        ((20, 30), np.uint16, "png"),
        ((20, 30, 3), np.uint16, "png"),
        ((20, 30, 4), np.uint16, "png"),
        ((20, 30, 3), np.uint8, "tiff"),
        ((20, 30), np.uint16, "tiff"),
        ((20, 30, 3), np.uint16, "tiff"),
    ],
)
def test_encode_decode_round_trip_is_exact(shape, dtype, fmt):
    rng = np.random.default_rng(0)
    values = (rng.random(shape) * np.iinfo(dtype).max).astype(dtype)
    bits = np.iinfo(dtype).bits
    colour, alpha = (
        (values[..., None], None)
        if values.ndim == 2
        else ((values[..., :-1], values[..., -1]) if values.shape[2] == 4 else (values, None))
    )
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


def test_pixel_limit_is_checked_from_the_header():
    with pytest.raises(RequestError) as info:
        decode(png_bomb(100_000, 100_000), "png", max_pixels=10**6)
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


# --- codec: bombs, colour modes, metadata, DICOM ranges -------------------------------------------------------


def _tiff(array: np.ndarray, **kwargs) -> bytes:
    import tifffile

    buffer = io.BytesIO()
    tifffile.imwrite(buffer, array, **kwargs)
    return buffer.getvalue()


def test_tiff_samples_and_depth_are_checked_before_decoding(monkeypatch):
    import tifffile

    def never(*_, **__):
        raise AssertionError("asarray must not run for a rejected TIFF")

    # 64x64 pixels pass max_pixels, but 1000 samples per pixel would decode to ~470x the file's size.
    bomb = _tiff(
        np.zeros((64, 64, 1000), np.uint8), photometric="minisblack", planarconfig="contig", compression="zlib"
    )
    volume = _tiff(np.zeros((4, 16, 16), np.uint8), photometric="minisblack", volumetric=True)
    monkeypatch.setattr(tifffile.TiffPage, "asarray", never)
    for data, word in ((bomb, "1000 samples"), (volume, "image depth 4")):
        with pytest.raises(RequestError) as info:
            decode(data, "tiff", max_pixels=10**6)
        assert info.value.status == 415 and word in info.value.error


def test_tiff_photometric_modes():
    values = np.arange(256, dtype=np.uint8).reshape(16, 16)
    white = decode(_tiff(values, photometric="miniswhite"), "tiff", 10**6)
    np.testing.assert_array_equal(white.pixels[..., 0], 255 - values)  # inverted: displays as the input did
    assert "MINISWHITE" in white.notes[0]
    out, _ = encode(white.to_unit(), white, "tiff")  # written back as MINISBLACK with the inverted values
    back = decode(out, "tiff", 10**6)
    np.testing.assert_array_equal(back.pixels, white.pixels)

    cmap = np.zeros((3, 256), np.uint16)
    cmap[0, 1], cmap[1, 2], cmap[2, 3] = 65535, 65535, 65535
    palette = decode(_tiff((values % 4).astype(np.uint8), photometric="palette", colormap=cmap), "tiff", 10**6)
    assert palette.pixels.shape == (16, 16, 3)  # colours, not palette indices
    np.testing.assert_array_equal(palette.pixels[0, :4], [[0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255]])

    cmyk = np.zeros((8, 8, 4), np.uint8)
    cmyk[..., 0] = 255  # pure cyan: K is not alpha
    converted = decode(_tiff(cmyk, photometric="separated"), "tiff", 10**6)
    assert converted.alpha is None and converted.pixels.shape == (8, 8, 3)
    np.testing.assert_array_equal(converted.pixels[0, 0], [0, 255, 255])

    gray_extra = decode(
        _tiff(
            np.zeros((8, 8, 2), np.uint8), photometric="minisblack", planarconfig="contig", extrasamples=["unassalpha"]
        ),
        "tiff",
        10**6,
    )
    assert (gray_extra.colour_channels, gray_extra.alpha is not None) == (1, True)
    with pytest.raises(RequestError) as info:
        decode(_tiff(np.zeros((8, 8, 3), np.uint8), photometric="cielab"), "tiff", 10**6)
    assert info.value.status == 415 and "CIELAB" in info.value.error


def test_exif_orientation_and_icc_pass_through_and_trns_becomes_alpha():
    from PIL import ImageCms

    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    exif = Image.Exif()
    exif[274] = 6  # rotate 90 degrees on display
    jpeg = encode_pil(_photo(24, 32), "JPEG", quality=95, exif=exif.tobytes(), icc_profile=icc)
    source = decode(jpeg, "jpeg", 10**6)
    assert source.width == 32  # orientation is not applied: stored pixels, same size out
    for fmt in ("png", "jpeg", "tiff"):
        data, described = encode(source.to_unit(), source, fmt)
        back = decode(data, fmt, 10**6)
        assert (back.width, back.height) == (32, 24) and back.icc_profile == icc, fmt
        with Image.open(io.BytesIO(data)) as out:
            assert out.getexif().get(274) == 6, fmt
    gray = _photo(8, 8).mean(axis=2).astype(np.uint8)
    gray[0, 0] = 7
    gray[gray == 7] = 8
    gray[0, 0] = 7
    keyed = encode_pil(gray, "PNG", transparency=7)
    image = decode(keyed, "png", 10**6)
    assert image.channels == 2 and image.alpha[0, 0] == 0 and (image.alpha[1:] == 255).all()
    rgb = _photo(8, 8).copy()
    rgb[2, 3] = (1, 2, 3)
    image = decode(encode_pil(rgb, "PNG", transparency=(1, 2, 3)), "png", 10**6)
    assert image.channels == 4 and image.alpha[2, 3] == 0 and int(image.alpha.sum()) == 255 * 63


def _ct(raw: np.ndarray, bits_stored: int):
    import pydicom
    from pydicom.data import get_testdata_file

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.RescaleIntercept, ds.RescaleSlope = 0, 1
    ds.set_pixel_data(raw.astype(np.int16), photometric_interpretation="MONOCHROME2", bits_stored=bits_stored)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_dicom_out_clips_to_bits_stored_and_keeps_values_outside_the_model_range():
    import pydicom

    raw = np.array([[-2000, -1000, 0], [500, 1500, 2047]] * 2)  # signed 12-bit, -2000: padding below -1024 HU
    image = decode(_ct(raw, 12), "dicom", 10**6)
    out, _ = encode(np.ones((3, 4, 3), np.float32), image, "dicom")  # all white: HU 3071, beyond 12-bit signed
    back = pydicom.dcmread(io.BytesIO(out)).pixel_array
    assert back[0, 0] == -2000 and back[2, 0] == -2000  # the padding value, not -1024
    assert (back[:, 1:] == 2047).all() and (back[1] == 2047).all()  # clipped to what 12 signed bits hold
    raw16 = np.array([[-3024, 0], [4000, 100]])  # padding and metal in a 16-bit CT
    image = decode(_ct(raw16, 16), "dicom", 10**6)
    out, _ = encode(image.to_unit(), image, "dicom")
    np.testing.assert_array_equal(pydicom.dcmread(io.BytesIO(out)).pixel_array, raw16)


def test_decompression_bomb_warning_filter_is_installed_once_at_import():
    from datprl.serve import codec

    assert "with warnings.catch_warnings()" not in Path(codec.__file__).read_text()
    check = (
        "import warnings; from PIL import Image; import datprl.serve.codec; "
        "assert any(f[0] == 'ignore' and f[2] is Image.DecompressionBombWarning for f in warnings.filters)"
    )
    out = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]


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
    model = _noisy_model()
    pools = {name: getattr(model.config, f"{name}_pool").model_dump() for name in ("task", "domain")}
    info = ModelInfo("paper_tiny", "fresh", False, None, "", 0, {}, "cpu", pools)
    engine = Engine(model, info, torch.device("cpu"))
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
    together = engine.restore_many(units)  # the function the endpoint's @serve.batch runs
    assert [r.batch for r in together] == [2, 2, 1] and engine.stats["forwards"] == 2
    for unit, batched in zip(units, together):
        alone, prompts = engine.restore(unit)
        assert isinstance(batched, Restored) and batched.image.shape == unit.shape
        torch.testing.assert_close(batched.image, alone, atol=2e-5, rtol=0)
        assert batched.selection["task"][0].shape[0] == 1  # this image's row of the selection


def test_one_failing_group_fails_only_its_own_items():
    engine = load_engine(ServeConfig(weights=None))
    forward = engine.forward

    def flaky(batch):
        if batch.shape[-1] == 24:
            raise RuntimeError("CUDA out of memory (simulated)")
        return forward(batch)

    engine.forward = flaky
    results = engine.restore_many([torch.rand(3, 16, 16), torch.rand(3, 16, 24), torch.rand(3, 16, 16)])
    assert isinstance(results[1], RuntimeError) and "simulated" in str(results[1])
    assert all(isinstance(results[i], Restored) and results[i].image.shape == (3, 16, 16) for i in (0, 2))
    assert engine.stats["errors"] == 1 and engine.stats["forwards"] == 1


def test_fresh_engine_says_untrained_and_weights_engine_reports_hash(tmp_path):
    fresh = load_engine(ServeConfig(weights=None))
    assert fresh.info.source == "fresh" and fresh.info.trained is False and "UNTRAINED" in fresh.info.note
    assert load_engine(ServeConfig(weights=None)).info.weights_sha256 == fresh.info.weights_sha256  # seeded
    path = save_model(_noisy_model(), tmp_path / "exported")
    loaded = load_engine(ServeConfig(weights=str(path)))
    assert loaded.info.weights_sha256 == weights_digest(path) and loaded.info.variant == "custom"
    with pytest.raises(FileNotFoundError):
        load_engine(ServeConfig(weights=str(tmp_path / "missing.safetensors")))


def _provenance(steps: int = 7) -> dict:
    from datprl.platform.train.provenance import build_provenance

    return build_provenance(
        {"steps": steps, "data": {"dataset": "s3://private/corpus"}},
        model_spec="paper_tiny",
        steps=steps,
        manifest_sha256="ab" * 32,
        evaluation=None,
    )


def test_trained_is_what_the_weights_provenance_says(tmp_path):
    assert load_engine(ServeConfig(weights=None)).info.trained is False  # fresh
    # Provenance from training: trained, with the record served (the training config stays in the sidecar).
    record = _provenance()
    path = save_model(_noisy_model(), tmp_path / "trained", provenance=record)
    info = load_engine(ServeConfig(weights=str(path))).info
    assert info.trained is True and "7 steps" in info.note
    served = info.as_dict()["provenance"]
    assert served["steps"] == 7 and served["dataset_manifest_sha256"] == "ab" * 32 and served["model"] == "paper_tiny"
    assert served["created"] == record["created"] and served["git_commit"] == record["git_commit"]
    assert "evaluation" in served and "config" not in served and "s3://private" not in str(info.as_dict())
    # An export without provenance (older sidecars, weights saved outside training): unknown.
    info = load_engine(ServeConfig(weights=str(save_model(_noisy_model(), tmp_path / "plain")))).info
    assert info.trained is None and info.provenance is None and "no provenance" in info.note
    # A provenance that says untrained, and the all-zero identity initialisation whatever its sidecar says: untrained.
    untrained = save_model(_noisy_model(), tmp_path / "untrained", provenance={**record, "trained": False})
    assert load_engine(ServeConfig(weights=str(untrained))).info.trained is False
    identity = save_model(create_model("paper_tiny"), tmp_path / "identity", provenance=record)
    info = load_engine(ServeConfig(weights=str(identity))).info
    assert info.trained is False and "identity" in info.note


def test_weights_auto_uses_training_export(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert ServeConfig().resolved_weights() is None
    save_model(create_model("paper_tiny"), tmp_path / "outputs/train/model")
    assert ServeConfig().resolved_weights() == "outputs/train/model.safetensors"
    assert load_engine(ServeConfig()).info.source == "weights"


def test_weights_from_s3(s3_server, tmp_path):
    import boto3

    path = save_model(_noisy_model(1), tmp_path / "model", provenance=_provenance(steps=3))
    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    client.create_bucket(Bucket="weights")
    for suffix in (".safetensors", ".json"):
        client.upload_file(str(tmp_path / f"model{suffix}"), "weights", f"run/model{suffix}")
    engine = load_engine(ServeConfig(weights="s3://weights/run/model.safetensors", s3_endpoint_url=s3_server))
    assert engine.info.weights_sha256 == weights_digest(path)
    assert engine.info.trained is True and engine.info.provenance["steps"] == 3  # the sidecar came along
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


def test_autoscaling_timing_fields_match_ray():
    """look_back_period_s and metrics_interval_s default to Ray's values; what to_ray() gives is a valid Ray
    AutoscalingConfig (no warning at the defaults), short settings pass through, and a window not longer than the
    report interval is refused (Ray only warns about it for now)."""
    import warnings

    from ray.serve.config import AutoscalingConfig

    from datprl.platform.config import ConfigError

    ray_defaults = AutoscalingConfig()
    ours = ServeConfig().autoscaling
    assert ours.look_back_period_s == ray_defaults.look_back_period_s
    assert ours.metrics_interval_s == ray_defaults.metrics_interval_s
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        AutoscalingConfig(**ours.to_ray())
    short = config_from_args(
        {
            "autoscaling.look_back_period_s": "4",
            "autoscaling.metrics_interval_s": "1",
            "autoscaling.upscale_delay_s": "1",
            "autoscaling.downscale_delay_s": "3",
        }
    ).autoscaling
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # Ray's note on a changed metrics_interval_s
        ray_short = AutoscalingConfig(**short.to_ray())
    assert (ray_short.look_back_period_s, ray_short.metrics_interval_s) == (4.0, 1.0)
    assert (ray_short.upscale_delay_s, ray_short.downscale_delay_s) == (1.0, 3.0)
    with pytest.raises(ConfigError, match="look_back_period_s"):
        config_from_args({"autoscaling": {"look_back_period_s": 5, "metrics_interval_s": 5}})


def test_serve_deploy_config_is_valid(repo_root):
    from ray.serve.schema import ServeDeploySchema

    raw = yaml.safe_load((repo_root / "infra/serve.yaml").read_text())
    schema = (
        ServeDeploySchema.model_validate(raw)
        if hasattr(ServeDeploySchema, "model_validate")
        else (ServeDeploySchema.parse_obj(raw))
    )
    assert schema.http_options.host == "127.0.0.1"
    app = schema.applications[0]
    assert app.import_path == "datprl.serve.app:build_app"
    config = config_from_args(app.args)
    assert config.autoscaling.max_replicas >= 1 and config.num_gpus == "auto"
    assert "serve deploy infra/serve.yaml" in (repo_root / "infra/serve.yaml").read_text()


def test_job_help_lists_the_fields(repo_root):
    out = subprocess.run(
        [sys.executable, "jobs/serve.py", "--help"], cwd=repo_root, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    for field in ("weights", "max_pixels", "tile_size", "autoscaling.max_replicas", "host", "ray_address"):
        assert field in out.stdout
    bad = subprocess.run(
        [sys.executable, "jobs/serve.py", "tile_size=100"], cwd=repo_root, capture_output=True, text=True, timeout=120
    )
    assert bad.returncode == 2 and "tile_size" in bad.stderr


def test_build_app_resolves_weights_and_rejects_listen_fields(tmp_path, monkeypatch):
    from datprl.platform.config import ConfigError

    monkeypatch.chdir(tmp_path)
    save_model(create_model("paper_tiny"), tmp_path / "outputs/train/model")
    expected = str(tmp_path / "outputs/train/model.safetensors")
    assert replica_config({}).weights == expected  # auto, resolved here: absolute
    assert replica_config({"weights": "outputs/train/model.safetensors"}).weights == expected
    assert replica_config({"weights": None}).weights is None
    assert replica_config({"weights": "s3://b/m.safetensors"}).weights == "s3://b/m.safetensors"
    monkeypatch.chdir(tmp_path / "outputs")  # a replica elsewhere loads the same file
    assert load_engine(ServeConfig.model_validate(replica_config(None).model_dump(mode="json"))).info.source == "fresh"
    assert load_engine(ServeConfig(weights=expected)).info.source == "weights"
    for key in ("host", "port", "route_prefix", "app_name"):
        with pytest.raises(ConfigError, match=key) as info:
            replica_config({key: "x"})
        assert "serve run" in str(info.value) and "jobs/serve.py" in str(info.value)


# --- the replica's request path, in-process ------------------------------------------------------------------------


@pytest.fixture
def replica(monkeypatch):
    """A factory of the deployment's class itself (no Ray, no HTTP), with Serve's real @serve.batch queue."""
    import ray.serve.batching

    from datprl.serve.app import Restorer

    # The only part of the batch queue that needs a running replica is a warning about max_ongoing_requests.
    monkeypatch.setattr(
        ray.serve.batching._BatchQueue, "_warn_if_max_batch_size_exceeds_max_ongoing_requests", lambda self: None
    )
    cls = Restorer.func_or_class.__wrapped__
    # Serve keeps one batch queue per decorated method (a replica is one process), bound to the event loop of its
    # first call: each test (one asyncio.run) starts with a fresh one.
    monkeypatch.setattr(cls._infer.set_max_batch_size.__self__, "_queue", None)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # the replica sets it: undone afterwards

    def make(**settings):
        base = dict(
            weights=None,
            tile_size=16,
            tile_overlap=4,
            tile_above_pixels=24 * 24,
            max_untiled_pixels=40 * 40,
            max_batch_size=4,
            batch_wait_timeout_s=0.05,
            max_concurrent_tiled=1,
            max_pixels=400 * 400,
        )
        return cls(ServeConfig(**{**base, **settings}).model_dump(mode="json"))

    return make


def _request(body: bytes, content_type: str = "image/png", reads: list | None = None):
    from starlette.requests import Request

    sent = False

    async def receive():
        nonlocal sent
        if reads is not None:
            reads.append(len(body))
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/restore",
        "query_string": b"",
        "headers": [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode())],
    }
    return Request(scope, receive)


def _restore(r, body: bytes, reads: list | None = None, **params):
    args = {**dict(format="png", bit_depth=None, response="image", tiling="auto", white_level=None), **params}
    return type(r).restore(r, _request(body, reads=reads), **args)


@pytest.mark.timeout(300)
def test_replica_keeps_image_work_off_the_event_loop(replica, monkeypatch):
    from datprl.serve import app, tiling
    from datprl.serve.codec import OutputWriter

    on_loop = []

    def spy(owner, name):
        original = getattr(owner, name)

        def wrapped(*args, **kwargs):
            on_loop.append((name, threading.current_thread() is threading.main_thread()))
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, wrapped)

    spy(app, "decode")
    spy(DecodedImage, "to_unit")
    spy(DecodedImage, "unit_crop")
    spy(tiling.StripBlender, "add")
    spy(tiling.StripBlender, "finish")
    spy(OutputWriter, "__init__")
    spy(OutputWriter, "write")
    spy(OutputWriter, "finish")
    r = replica()

    async def both():  # one event loop: the replica's batch queue lives on the loop of its first call
        tiled = await _restore(r, _png(_photo(40, 36)), tiling="always")
        assert tiled.status_code == 200 and tiled.headers["x-tiles"] == "9"
        untiled = await _restore(r, _png(_photo(20, 20)), tiling="never")
        assert untiled.status_code == 200 and untiled.headers["x-tiles"] == "1"

    asyncio.run(both())
    expected = {"decode", "to_unit", "unit_crop", "add", "finish", "__init__", "write"}
    assert {name for name, _ in on_loop} == expected, on_loop
    assert not [name for name, loop in on_loop if loop], on_loop  # asyncio.run's loop is the main thread


@pytest.mark.timeout(300)
def test_replica_takes_the_large_image_slot_before_decoding(replica, monkeypatch):
    from datprl.serve import app

    r = replica()
    held = []
    decode_ = app.decode

    def spy(*args, **kwargs):
        held.append(r._large_slots.locked())
        return decode_(*args, **kwargs)

    monkeypatch.setattr(app, "decode", spy)

    async def three():  # one event loop: the replica's batch queue lives on the loop of its first call
        for size, tiling in ((30, "auto"), (30, "never"), (20, "auto")):  # 900 px > tile_above_pixels=576 > 400 px
            assert (await _restore(r, _png(_photo(size, size)), tiling=tiling)).status_code == 200

    asyncio.run(three())
    assert held == [True, True, False]  # tiled and untiled large images both wait for the slot; small ones do not


@pytest.mark.timeout(300)
def test_replica_rejects_output_parameters_before_the_body_and_the_forward(replica, monkeypatch):
    from datprl.serve import app

    r = replica()
    reads: list[int] = []
    with pytest.raises(RequestError) as info:
        asyncio.run(_restore(r, _png(_photo(16, 16)), reads=reads, format="jpeg", bit_depth=16))
    assert info.value.status == 422 and "JPEG" in info.value.error and reads == []  # body never read
    monkeypatch.setattr(app, "decode", lambda *a, **k: pytest.fail("decoded an image that cannot be answered"))
    with pytest.raises(RequestError) as info:
        asyncio.run(_restore(r, _png(_photo(16, 16)), reads=reads, format="dicom"))
    assert info.value.status == 422 and "DICOM" in info.value.error and reads


@pytest.mark.timeout(300)
def test_replica_batch_with_a_failing_group_fails_only_that_request(replica):
    r = replica()
    forward = r.engine.forward

    def flaky(batch):
        if batch.shape[-1] == 24:
            raise RuntimeError("simulated forward failure")
        return forward(batch)

    r.engine.forward = flaky

    async def both():
        return await asyncio.gather(
            r._forward(torch.rand(3, 16, 16)), r._forward(torch.rand(3, 16, 24)), return_exceptions=True
        )

    good, bad = asyncio.run(both())
    assert r.engine.stats["batches"] == 1  # both went through one @serve.batch call
    assert isinstance(good, Restored) and good.image.shape == (3, 16, 16)
    assert isinstance(bad, RuntimeError) and "simulated" in str(bad)


def test_replica_model_route_reports_provenance_and_trained_header(replica, tmp_path):
    fresh = replica()
    body = asyncio.run(type(fresh).model(fresh))
    assert body["trained"] is False and body["provenance"] is None and body["source"] == "fresh"
    r = replica(weights=str(save_model(_noisy_model(), tmp_path / "m", provenance=_provenance(steps=5))))
    body = asyncio.run(type(r).model(r))
    assert body["trained"] is True and body["provenance"]["steps"] == 5 and body["source"] == "weights"
    json.dumps(body)  # what the route returns is plain JSON
    reply = asyncio.run(_restore(r, _png(_photo(16, 16))))
    assert reply.status_code == 200 and reply.headers["X-Model-Trained"] == "true"


def test_replica_health_check_runs_the_model(replica):
    r = replica()
    asyncio.run(r.check_health())
    assert asyncio.run(type(r).healthz(r)).status_code == 200
    with torch.no_grad():
        r.engine.model.output.weight.fill_(float("nan"))  # a broken network (or device) is unhealthy
    with pytest.raises(RuntimeError, match="self-check"):
        asyncio.run(r.check_health())
    assert asyncio.run(type(r).healthz(r)).status_code == 503


@pytest.mark.timeout(300)
def test_replica_refuses_a_request_over_its_memory_budget_before_decoding(replica, monkeypatch):
    from datprl.serve import app

    measured = replica()  # no figure given: the replica measures one forward of a tile at start-up
    assert measured.activation_bytes_per_pixel is not None and measured.activation_bytes_per_pixel > 100
    r = replica(request_memory_budget_bytes=2 * 2**20, activation_bytes_per_pixel=3000.0, max_batch_pixels=256)
    decoded = []
    decode_ = app.decode

    def spy(*args, **kwargs):
        decoded.append(args[1])
        return decode_(*args, **kwargs)

    monkeypatch.setattr(app, "decode", spy)
    data = _png(_photo(30, 30))  # 32x32 padded x 3000 bytes = 3 MB of activations in one piece

    async def requests():
        with pytest.raises(RequestError) as info:
            await _restore(r, data, tiling="never")
        assert decoded == []  # refused from the header, before decoding
        tiled = await _restore(r, data, tiling="auto")  # one 16x16 tile per forward: 0.8 MB
        return info.value, tiled

    error, tiled = asyncio.run(requests())
    assert error.status == 413 and "request_memory_budget_bytes=2097152" in error.error
    assert "3000 bytes/pixel" in error.error
    assert "tiling=auto" in error.fix
    assert tiled.status_code == 200 and tiled.headers["x-tiles"] == "9" and decoded == ["png"]
