"""Bounded memory for large images, without Ray: strip-wise tile blending against the full-canvas blend, pixel-bounded
forwards, the row-by-row encoder against the one-piece one, the request path's peak memory in a fresh process, the
memory estimate and budget (413 before decoding), and the bf16 / channels_last forward."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from datprl.models.factory import create_model
from datprl.serve import memory
from datprl.serve.codec import DecodedImage, ImageHeader, OutputWriter, RequestError, _encode_png, decode, encode
from datprl.serve.codec import _convert_alpha, read_header
from datprl.platform.compute import resolve_precision
from datprl.serve.config import ServeConfig
from datprl.serve.engine import Engine, ModelInfo, load_engine
from datprl.serve.pipeline import plan_request, tile_group_size
from datprl.serve.tiling import StripBlender, axis_weights, blend_window, tile_grid, tiled_apply, tiles_per_forward
from serve_samples import encode_pil, photo

# bf16 against fp32 (docs/serving.md): a randomly initialised non-identity paper_tiny on a 96x96 photo differs by
# at most 0.006 (mean 0.0006-0.0011, PSNR 57-62 dB) over three seeds; the stated tolerance leaves 3x of margin.
BF16_MAX_ABS = 0.02
BF16_MEAN_ABS = 0.004


def _engine(model: torch.nn.Module, **kwargs) -> Engine:
    pools = {name: getattr(model.config, f"{name}_pool").model_dump() for name in ("task", "domain")}
    info = ModelInfo("paper_tiny", "fresh", False, None, "", 0, {}, "cpu", pools)
    return Engine(model, info, torch.device("cpu"), **kwargs)


def _noisy_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model("paper_tiny", zero_init_output=False).eval()


# --- tiling ------------------------------------------------------------------------------------------------------


def _canvas_blend(outputs: dict, height: int, width: int, tile: int, overlap: int) -> torch.Tensor:
    """The blend as it was computed before: full-size sum and weight canvases."""
    tiles = tile_grid(height, width, tile, overlap)
    window = blend_window(tiles[0].height, tiles[0].width, overlap)
    total = torch.zeros(3, height, width, dtype=torch.float64)
    weight = torch.zeros(height, width, dtype=torch.float64)
    for t in tiles:
        total[:, t.top : t.top + t.height, t.left : t.left + t.width] += outputs[t] * window
        weight[t.top : t.top + t.height, t.left : t.left + t.width] += window
    return (total / weight).float()


@pytest.mark.parametrize(
    "height,width,tile,overlap",
    [(200, 130, 64, 16), (40, 50, 64, 16), (100, 300, 32, 0), (129, 257, 64, 31), (64, 64, 64, 16)],
)
def test_strip_blender_equals_the_full_canvas_blend(height, width, tile, overlap):
    tiles = tile_grid(height, width, tile, overlap)
    generator = torch.Generator().manual_seed(height * width)
    outputs = {t: torch.rand(3, t.height, t.width, generator=generator) for t in tiles}  # tiles disagree: blend matters
    reference = _canvas_blend(outputs, height, width, tile, overlap)
    emitted = []

    def emit(top: int, rows: torch.Tensor) -> None:  # rows must be final when they are handed over
        torch.testing.assert_close(rows, reference[:, top : top + rows.shape[1]], atol=2e-6, rtol=0)
        emitted.append((top, rows.shape[1]))

    blender = StripBlender(height, width, tile, overlap, emit)
    for t in tiles:
        blender.add(t, outputs[t])
        assert blender.acc is not None and blender.acc.shape == (3, min(tile, height), width)  # one strip, not a canvas
    blender.finish()
    assert [top for top, _ in emitted] == list(np.cumsum([0] + [n for _, n in emitted])[:-1])  # in order, no gaps
    assert sum(n for _, n in emitted) == height and max(n for _, n in emitted) <= min(tile, height)
    weights = axis_weights(height, tile, overlap)[:, None] * axis_weights(width, tile, overlap)[None, :]
    assert weights.min() > 0


def test_strip_blender_refuses_tiles_out_of_order():
    tiles = tile_grid(100, 100, 64, 16)
    blender = StripBlender(100, 100, 64, 16, lambda top, rows: None)
    blender.add(tiles[-1], torch.zeros(3, 64, 64))
    with pytest.raises(ValueError, match="tile_grid order"):
        blender.add(tiles[0], torch.zeros(3, 64, 64))


def test_tiled_apply_keeps_exactness_of_a_local_function():
    image = torch.rand(3, 150, 111)
    out = tiled_apply(lambda x: x * 2 + 1, image, tile=64, overlap=16, batch_size=3)
    torch.testing.assert_close(out, image * 2 + 1, atol=1e-6, rtol=0)


def test_tiles_per_forward_bounds_the_pixels_of_a_forward():
    assert tiles_per_forward(512 * 512, 8, 512 * 512) == 1
    assert tiles_per_forward(64 * 64, 8, 8 * 64 * 64) == 8
    assert tiles_per_forward(64 * 64, 8, 4 * 64 * 64 + 1) == 4
    assert tiles_per_forward(10**6, 8, 1000) == 1  # one tile always goes through
    assert tiles_per_forward(64 * 64, 8, None) == 8
    assert tile_group_size(ServeConfig(tile_size=64, tile_overlap=16, max_batch_pixels=3 * 64 * 64), 1000, 1000) == 3


def test_restore_many_splits_a_batch_above_max_batch_pixels():
    engine = _engine(_noisy_model(), max_batch_pixels=2 * 32 * 32)
    units = [torch.rand(3, 32, 32) for _ in range(5)] + [torch.rand(3, 16, 16)]
    results = engine.restore_many(units)
    assert [r.batch for r in results] == [2, 2, 2, 2, 1, 1] and engine.stats["forwards"] == 4
    for unit, result in zip(units, results):
        alone, _ = engine.restore(unit)
        torch.testing.assert_close(result.image, alone, atol=2e-5, rtol=0)


# --- codec -------------------------------------------------------------------------------------------------------


def _source(channels: int, bits: int, fmt: str = "png", height: int = 37, width: int = 53) -> DecodedImage:
    rng = np.random.default_rng(channels * bits)
    dtype = np.uint8 if bits == 8 else np.uint16
    values = (rng.random((height, width, channels)) * np.iinfo(dtype).max).astype(dtype)
    colour, alpha = (values[..., :-1], values[..., -1]) if channels in (2, 4) else (values, None)
    return DecodedImage(fmt, colour, alpha, bits, 2**bits - 1)


@pytest.mark.parametrize(
    "channels,bits,fmt,out_bits",
    [
        (1, 8, "png", None),
        (2, 8, "png", None),
        (3, 8, "png", None),
        (4, 8, "png", None),
        (1, 16, "png", None),
        (3, 16, "png", None),
        (4, 16, "png", 8),
        (3, 8, "png", 16),
        (3, 8, "tiff", None),
        (4, 16, "tiff", None),
        (3, 8, "jpeg", None),
        (4, 8, "jpeg", None),
    ],
)
def test_output_writer_in_strips_equals_one_piece(channels, bits, fmt, out_bits):
    source = _source(channels, bits)
    restored = np.random.default_rng(1).random((3, 37, 53)).astype(np.float32) * 1.2 - 0.1  # some out of [0, 1]
    kept = restored.copy()
    whole, described = encode(restored, source, fmt, out_bits)
    np.testing.assert_array_equal(restored, kept)  # the network's output is not overwritten
    writer = OutputWriter(source, fmt, out_bits)
    for top, bottom in ((0, 5), (5, 6), (6, 30), (30, 37)):
        writer.write(top, torch.from_numpy(restored[:, top:bottom]))
    strips, described_strips = writer.finish()
    assert strips == whole and described_strips == described
    if fmt != "jpeg":
        back = decode(whole, fmt, 10**6)
        scale = 2 ** (out_bits or bits) - 1
        hwc = restored.transpose(1, 2, 0)
        colour = hwc.mean(axis=2, keepdims=True) if channels in (1, 2) else hwc  # gray out: mean of the 3 channels
        expected = np.rint(np.clip(colour, 0, 1) * scale)
        np.testing.assert_allclose(back.pixels, expected, atol=1)


def test_encoding_allocates_no_full_size_float_copy():
    """tracemalloc sees NumPy's allocations: encoding a (3, 1024, 1024) float32 restoration never holds a full-size
    float copy (12 MB in float32, 25 MB in float64). PNG holds a few MB of chunk temporaries whatever the size (the
    file here compresses to almost nothing); 16-bit TIFF holds its integer array, the file and its copy (6 MB each)."""
    import tracemalloc

    gradient = np.linspace(0, 1, 1024, dtype=np.float32)
    restored = np.stack([np.add.outer(gradient, gradient) / 2] * 3)
    source = DecodedImage("png", np.zeros((1024, 1024, 3), np.uint8), None, 8, 255)
    for fmt, bits, limit in (("png", None, 4 * 2**20), ("tiff", 16, 3 * 6 * 2**20 + 4 * 2**20)):
        tracemalloc.start()
        data, _ = encode(restored, source, fmt, bits)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        print(f"{fmt}: traced peak {peak / 2**20:.1f} MB, file {len(data) / 2**20:.1f} MB")
        assert peak < limit


def test_output_writer_refuses_rows_out_of_order():
    writer = OutputWriter(_source(3, 8), "png")
    writer.write(0, np.zeros((3, 10, 53), np.float32))
    with pytest.raises(ValueError, match="top to bottom"):
        writer.write(20, np.zeros((3, 5, 53), np.float32))
    with pytest.raises(RuntimeError, match="10 of 37 rows"):
        writer.finish()


def test_png_writer_reads_back_in_pillow_and_pypng_and_compresses_like_pillow():
    import png

    rng = np.random.default_rng(0)
    for shape, bits in [((37, 53, 3), 16), ((37, 53, 4), 16), ((37, 53, 2), 8), ((37, 53, 1), 16), ((1, 1, 3), 8)]:
        values = (rng.random(shape) * (2**bits - 1)).astype(np.uint8 if bits == 8 else np.uint16)
        data = _encode_png(values, bits)
        width, height, rows, info = png.Reader(bytes=data).read_flat()
        np.testing.assert_array_equal(np.array(rows).reshape(height, width, info["planes"]), values)
        if bits == 8 or shape[2] == 1:  # Pillow reduces 16-bit colour to 8 bits
            np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(data))).reshape(shape), values)
    picture = photo(256, 256, top=0, left=0)
    ours = _encode_png(picture, 8)
    pillow = encode_pil(picture, "PNG", compress_level=1)
    assert len(ours) <= 1.05 * len(pillow), (len(ours), len(pillow))


def test_alpha_to_8_bits_rounds_like_float_division():
    alpha = np.arange(65536, dtype=np.uint16)
    np.testing.assert_array_equal(_convert_alpha(alpha, 8), np.rint(alpha / 257.0).astype(np.uint8))
    np.testing.assert_array_equal(_convert_alpha(np.arange(256, dtype=np.uint8), 16), np.arange(256) * 257)


def test_unit_crop_is_a_window_of_to_unit_and_header_matches_decode():
    for channels, bits in ((1, 8), (3, 16), (4, 8)):
        source = _source(channels, bits)
        np.testing.assert_array_equal(source.unit_crop(5, 7, 20, 30), source.to_unit()[:, 5:25, 7:37])
    for array, fmt, expected in (
        (photo(20, 30), "PNG", (30, 20, 3, 8)),
        (photo(20, 30)[..., 0], "PNG", (30, 20, 1, 8)),
        (np.dstack([photo(20, 30), photo(20, 30)[..., :1]]), "PNG", (30, 20, 4, 8)),
        (photo(20, 30), "JPEG", (30, 20, 3, 8)),
        (photo(20, 30), "TIFF", (30, 20, 3, 8)),
    ):
        header = read_header(encode_pil(array, fmt), fmt.lower(), 10**6)
        assert (header.width, header.height, header.channels, header.bit_depth) == expected
    assert read_header(_encode_png(np.zeros((4, 5, 3), np.uint16), 16), "png", 10**6).bit_depth == 16


# --- the request path's memory, measured ------------------------------------------------------------------------

_PEAK_SCRIPT = textwrap.dedent("""
    import asyncio, io, json, sys
    import numpy as np
    from PIL import Image
    from datprl.serve import memory
    from datprl.serve.codec import OutputWriter, decode
    from datprl.serve.config import ServeConfig
    from datprl.serve.engine import Restored
    from datprl.serve.pipeline import restore_image

    size, tile = int(sys.argv[1]), int(sys.argv[2])
    memory.set_mmap_threshold(2**20)
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (size // 16, size // 16, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(small).resize((size, size), Image.BICUBIC).save(buffer, format="PNG", compress_level=1)
    body = [buffer.getvalue()]
    del buffer, small
    config = ServeConfig(tile_size=tile, tile_overlap=tile // 8, max_batch_size=4)

    async def identity(unit):  # the network's place: memory of the image path alone
        return Restored(unit.clone(), {}, 1)

    async def request(data):
        image = await asyncio.to_thread(decode, data, "png", 10**9)
        del data
        writer = OutputWriter(image, "png")
        outcome = await restore_image(image, True, writer, identity, {}, config)
        encoded, _ = writer.finish()
        return outcome.tiles, len(encoded)

    memory.trim_heap()
    before = memory.rss_bytes()
    assert memory.reset_peak_rss()
    tiles, encoded = asyncio.run(request(body.pop()))
    print(json.dumps({"tiles": tiles, "peak": memory.peak_rss_bytes() - before, "encoded": encoded}))
""")


def _request_path_peak(size: int, tile: int) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", _PEAK_SCRIPT, str(size), str(tile)], capture_output=True, text=True, timeout=280
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(memory.reset_peak_rss() is False, reason="needs Linux /proc/self/clear_refs")
@pytest.mark.timeout(600)
@pytest.mark.e2e
def test_tiled_request_path_memory_grows_by_a_few_bytes_per_pixel():
    """Decode, tiles, blend and PNG encode (identity in place of the network) of a 1024x1024 and a 3072x3072 RGB image,
    each in a fresh process: the peak on top of the process grows by under 12 bytes per added pixel (the decoder's
    copy, the stored values, the body and the compressed output; before, a float32 input of 12, sum and weight
    canvases of 16 and a float32 output copy made it over 40)."""
    small, large = _request_path_peak(1024, 256), _request_path_peak(3072, 256)
    growth = (large["peak"] - small["peak"]) / (3072**2 - 1024**2)
    print(
        f"request path peak: 1024 px {small['peak'] / 2**20:.0f} MB, 3072 px {large['peak'] / 2**20:.0f} MB "
        f"({large['tiles']} tiles, PNG {large['encoded'] / 2**20:.1f} MB): {growth:.1f} bytes per added pixel"
    )
    assert small["tiles"] == 25 and large["tiles"] == 196
    assert growth < 12


def test_activation_measurement_is_plausible_for_paper_tiny():
    memory.set_mmap_threshold(2**20)  # as the replica runs it
    engine = load_engine(ServeConfig(weights=None), device="cpu")
    measured = engine.measure_activation_bytes_per_pixel(192)
    if measured is None:
        pytest.skip("no /proc here")
    print(f"paper_tiny fp32 activations at 192x192: {measured:.0f} bytes/pixel")
    assert 1000 < measured < 8000  # ~2.2-2.6 KB/pixel measured at 256-512 px (docs/serving.md, "Memory budget")


# --- the memory estimate and the budget --------------------------------------------------------------------------


def test_estimate_grows_with_pixels_untiled_and_only_with_buffers_tiled():
    config = ServeConfig()

    def estimate(size: int, tiled: bool):
        header = ImageHeader(size, size, 3, 8)
        return memory.estimate_request_memory(
            header,
            size * size,
            tiled,
            tile_size=512,
            tiles_per_forward=tile_group_size(config, size, size),
            activation_bytes_per_pixel=2000.0,
        )

    small, large = estimate(1024, False), estimate(2048, False)
    assert small.activations == 2000 * 1024**2 and large.activations == 4 * small.activations
    tiled_small, tiled_large = estimate(1024, True), estimate(4096, True)
    assert tiled_small.activations == tiled_large.activations == 2000 * 512**2
    assert tiled_large.total - tiled_small.total < 40 * (4096**2 - 1024**2)  # buffers only, tens of bytes a pixel
    assert tiled_large.total < 1.5 * tiled_small.total


def test_untiled_request_over_budget_is_refused_with_the_estimate_budget_and_fix():
    config = ServeConfig(request_memory_budget_bytes=2 * 2**30, tile_above_pixels=4096 * 4096)
    header = ImageHeader(2048, 2048, 3, 8)
    with pytest.raises(RequestError) as info:
        plan_request(header, 10 * 2**20, "never", config, 2400.0)
    error = info.value
    assert error.status == 413
    assert "request_memory_budget_bytes=2147483648" in error.error and "estimated" in error.error
    assert "activations" in error.error and "2048x2048" in error.error
    assert "tiling=auto" in error.fix and "smaller image" in error.fix and "raise" in error.fix
    # tiling=auto restores the same image in tiles (below tile_above_pixels, but in one piece it would not fit)
    plan = plan_request(header, 10 * 2**20, "auto", config, 2400.0)
    assert plan.tiled and plan.estimate is not None and plan.estimate.total <= 2 * 2**30 and "tiles" in plan.note
    # a budget no tile group fits: refused even tiled, and the fix does not suggest tiling
    with pytest.raises(RequestError) as info:
        plan_request(
            header, 10 * 2**20, "auto", config.model_copy(update={"request_memory_budget_bytes": 2**28}), 2400.0
        )
    assert info.value.status == 413 and "in tiles" in info.value.error and "tiling=auto" not in info.value.fix
    unbounded_config = config.model_copy(update={"request_memory_budget_bytes": None})
    unbounded = plan_request(header, 10 * 2**20, "never", unbounded_config, 2400.0)
    assert not unbounded.tiled and unbounded.estimate is None


# --- precision and memory format ---------------------------------------------------------------------------------


def test_bf16_forward_runs_in_bf16_and_stays_close_to_fp32():
    model = _noisy_model()
    seen = []
    model.patch_embed.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    image = torch.from_numpy(photo(96, 96)).permute(2, 0, 1).float()[None] / 255
    fp32 = _engine(model).forward(image)
    bf16 = _engine(model, precision="bf16").forward(image)
    assert seen == [torch.float32, torch.bfloat16]  # autocast ran the convolutions in bf16
    assert bf16.images.dtype == torch.float32 and bf16.images.shape == fp32.images.shape
    diff = (bf16.images - fp32.images).abs()
    print(f"bf16 vs fp32: max {diff.max():.4f} mean {diff.mean():.5f}")
    assert 0 < diff.max() <= BF16_MAX_ABS and diff.mean() <= BF16_MEAN_ABS
    assert (fp32.images - image).abs().mean() > 10 * diff.mean()  # the network changes far more than bf16 does


def test_channels_last_gives_the_same_result():
    model = _noisy_model()
    image = torch.rand(2, 3, 40, 56)
    expected = _engine(model).forward(image).images
    formats = []
    model.patch_embed.register_forward_pre_hook(
        lambda module, inputs: formats.append(inputs[0].is_contiguous(memory_format=torch.channels_last))
    )
    result = _engine(model.to(memory_format=torch.channels_last), channels_last=True).forward(image).images
    assert formats == [True]
    torch.testing.assert_close(result, expected, atol=1e-5, rtol=0)


def test_precision_resolution_and_config(monkeypatch):
    assert resolve_precision("auto", "cpu") == "fp32"  # never bf16 on CPU unless asked
    assert resolve_precision("bf16", "cpu") == "bf16" and resolve_precision("fp32", "cuda") == "fp32"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_precision("auto", "cuda") == "bf16"
    engine = load_engine(ServeConfig(weights=None, precision="bf16", channels_last=True), device="cpu")
    assert engine.precision == "bf16" and engine.channels_last
    assert engine.info.extra["precision"] == "bf16" and engine.info.extra["channels_last"] is True
    assert load_engine(ServeConfig(weights=None), device="cpu").precision == "fp32"
    with pytest.raises(ValueError, match="precision"):
        ServeConfig(precision="fp16")
