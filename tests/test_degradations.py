"""Degradation synthesis (datprl.platform.data.degradations): output contract, seeding, provenance and each task's
effect.

Images are small crops of photos that ship inside the scikit-image wheel (no downloads)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from scipy import ndimage
from skimage import color, data

from datprl.platform.data import degradations as D

ALL_TASKS = list(D.TASKS)
RANDOM_TASKS = [t for t in ALL_TASKS if t not in D.DETERMINISTIC_TASKS]


@pytest.fixture(scope="module")
def rgb() -> np.ndarray:
    return (data.astronaut()[110:206, 200:296] / 255.0).astype(np.float32)  # 96x96 face crop


@pytest.fixture(scope="module")
def gray() -> np.ndarray:
    return color.rgb2gray(data.astronaut())[110:206, 200:296].astype(np.float32)


@pytest.fixture(scope="module")
def rs_rgb() -> np.ndarray:
    return (data.coffee()[100:228, 200:328] / 255.0).astype(np.float32)  # 128x128, mid-tones and dark rim


def _image_for(task: str, rgb: np.ndarray, gray: np.ndarray) -> np.ndarray:
    return gray if task in D.GRAYSCALE_ONLY_TASKS else rgb


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(1.0 / np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)))


def _high_freq_energy(img: np.ndarray, cutoff: float = 0.2) -> float:
    """Spectral energy above ``cutoff`` cycles/px (radial), summed over channels. Each channel is mean-subtracted and
    Hann-windowed first: otherwise the jump across the periodic border, common to both images, dominates."""
    chans = [img] if img.ndim == 2 else [img[..., c] for c in range(img.shape[-1])]
    total = 0.0
    for ch in chans:
        window = np.outer(np.hanning(ch.shape[0]), np.hanning(ch.shape[1]))
        f = np.fft.fft2((ch - ch.mean()) * window)
        fy, fx = np.meshgrid(np.fft.fftfreq(ch.shape[0]), np.fft.fftfreq(ch.shape[1]), indexing="ij")
        total += float(np.sum(np.abs(f[np.hypot(fy, fx) > cutoff]) ** 2))
    return total


# --- registry -------------------------------------------------------------------------------------------------------


def test_registry_names_and_settings():
    assert D.PAPER_TASKS_9 == (
        "sr_x4",
        "derain",
        "motion_deblur",
        "mri_sr_x4",
        "ct_low_dose",
        "pet_low_count",
        "rs_sr_x4",
        "cloud",
        "haze",
    )
    assert D.PAPER_TASKS_6 == ("sr_x4", "derain", "mri_sr_x4", "ct_low_dose", "rs_sr_x4", "cloud")
    assert set(D.EXTRA_TASKS) == {"denoise_15", "denoise_25", "denoise_50", "low_light", "jpeg"}
    assert set(D.PAPER_TASKS_9) | set(D.EXTRA_TASKS) == set(D.TASKS)
    for name, spec in D.TASKS.items():
        assert spec.name == name
        assert spec.domain in ("natural", "medical", "remote_sensing")
        assert spec.description and callable(spec.fn)
    for name in D.PAPER_TASKS_9:
        assert D.TASKS[name].simulated_note, name
    assert [D.TASKS[t].domain for t in D.PAPER_TASKS_9] == ["natural"] * 3 + ["medical"] * 3 + ["remote_sensing"] * 3
    note = D.TASKS["pet_low_count"].simulated_note.lower()
    assert "simulated" in note and "not real pet" in note
    with pytest.raises(dataclasses.FrozenInstanceError):
        D.TASKS["sr_x4"].name = "x"  # type: ignore[misc]


# --- output contract --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", ALL_TASKS)
def test_output_contract(task, rgb, gray):
    images = [gray] if task in D.GRAYSCALE_ONLY_TASKS else [rgb, gray]
    for img in images:
        out, params = D.degrade(task, img, seed=3)
        assert out.shape == img.shape and out.dtype == np.float32
        assert np.all(np.isfinite(out)) and out.min() >= 0.0 and out.max() <= 1.0
        assert not np.array_equal(out, img)
        json.loads(json.dumps(params, allow_nan=False))
        assert params["task"] == task and params["seed"] == 3 and params["domain"] == D.TASKS[task].domain
        assert params["synthesis_version"] == D.SYNTHESIS_VERSION


@pytest.mark.parametrize("task", ALL_TASKS)
def test_seeded_determinism(task, rgb, gray):
    img = _image_for(task, rgb, gray)
    a, pa = D.degrade(task, img, 7)
    b, pb = D.degrade(task, img, 7)
    assert np.array_equal(a, b) and pa == pb  # bit-identical
    others = [D.degrade(task, img, s)[0] for s in (8, 9, 10)]
    if task in D.DETERMINISTIC_TASKS:
        assert all(np.array_equal(a, o) for o in others)
    else:
        assert any(not np.array_equal(a, o) for o in others)
        assert not np.array_equal(others[0], others[1]) or not np.array_equal(others[1], others[2])


# PSNR (dB, float, data range 1) of the degraded 96x96 crop against the clean one: a clear effect, not destruction.
PSNR_BOUNDS = {"low_light": (3.0, 15.0)}


@pytest.mark.parametrize("task", ALL_TASKS)
def test_measurable_effect(task, rgb, gray):
    img = _image_for(task, rgb, gray)
    lo, hi = PSNR_BOUNDS.get(task, (8.0, 40.0))
    for seed in (0, 1):
        p = _psnr(D.degrade(task, img, seed)[0], img)
        assert lo < p < hi, (task, seed, p)


@pytest.mark.parametrize("task", ALL_TASKS)
def test_sizes_not_divisible_by_4(task, rgb, gray):
    img = _image_for(task, rgb, gray)[:37, :45]
    out, params = D.degrade(task, np.ascontiguousarray(img), 1)
    assert out.shape == img.shape and out.dtype == np.float32
    assert 0.0 <= out.min() and out.max() <= 1.0
    json.dumps(params)


def test_float64_input_gives_float32(rgb):
    out, _ = D.degrade("haze", rgb.astype(np.float64), 0)
    assert out.dtype == np.float32


# One override per task (value inside its documented range): it must be used and recorded.
OVERRIDES = {
    "sr_x4": {"scale": 2},
    "rs_sr_x4": {"scale": 3},
    "derain": {"angle_deg": 12.5, "density": 0.003},
    "motion_deblur": {"kernel_size": 21},
    "mri_sr_x4": {"tukey_alpha": 0.5},
    "ct_low_dose": {"i0": 20000.0, "n_angles": 90},
    "pet_low_count": {"keep_fraction": 0.1},
    "cloud": {"coverage_target": 0.3, "shadow_factor": 0.5},
    "haze": {"beta": 1.25, "airlight": 0.8},
    "denoise_15": {"sigma_255": 10},
    "denoise_25": {"sigma_255": 30},
    "denoise_50": {"sigma_255": 45},
    "low_light": {"gamma": 2.0},
    "jpeg": {"quality": 25},
}


@pytest.mark.parametrize("task", ALL_TASKS)
def test_overrides_honoured(task, rgb, gray):
    assert set(OVERRIDES) == set(D.TASKS)
    img = _image_for(task, rgb, gray)
    out, params = D.degrade(task, img, 5, **OVERRIDES[task])
    for key, value in OVERRIDES[task].items():
        assert params[key] == value, (task, key)
    default_out, _ = D.degrade(task, img, 5)
    assert not np.array_equal(out, default_out)


def test_override_keeps_other_draws():
    """Every value is drawn even when overridden, so fixing one leaves the others (and the noise) as they were."""
    img = (data.coffee()[:64, :64] / 255.0).astype(np.float32)
    _, free = D.degrade("cloud", img, 11)
    _, fixed = D.degrade("cloud", img, 11, brightness=0.9)
    for key in ("coverage_target", "softness", "max_opacity", "shadow_angle_deg", "shadow_distance", "tint"):
        assert free[key] == fixed[key]
    assert fixed["brightness"] == 0.9


# --- task-specific behaviour ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", ["sr_x4", "rs_sr_x4", "mri_sr_x4"])
def test_super_resolution_removes_high_frequencies(task, rgb, gray):
    img = _image_for(task, rgb, gray)
    out, _ = D.degrade(task, img, 0)
    ratio = _high_freq_energy(out) / _high_freq_energy(img)
    assert ratio < 0.1, ratio
    assert abs(out.mean() - img.mean()) < 0.02  # brightness kept


def test_sr_low_resolution_size(rgb):
    _, params = D.degrade("sr_x4", np.ascontiguousarray(rgb[:37, :45]), 0)
    assert params["lr_shape"] == [10, 12]  # ceil(37 / 4), ceil(45 / 4)


def test_mri_keeps_central_quarter_of_k_space(gray):
    _, params = D.degrade("mri_sr_x4", gray, 0)
    assert params["kept_frequencies"] == [25, 25]  # |k| <= 96 // 8 = 12
    assert all(0.2 < f < 0.3 for f in params["kept_fraction"])


@pytest.mark.parametrize("sigma", [15, 25, 50])
def test_denoise_noise_level(sigma):
    flat = np.full((128, 128, 3), 0.5, dtype=np.float32)
    out, params = D.degrade(f"denoise_{sigma}", flat, 0)
    assert params["sigma_255"] == sigma
    measured = float(np.std(out.astype(np.float64) - 0.5)) * 255
    assert abs(measured - sigma) < 0.1 * sigma, measured


def test_motion_kernel_is_normalised_and_sized():
    for seed in range(6):
        kernel, params = D.motion_kernel(np.random.default_rng(seed))
        assert kernel.shape == (params["kernel_size"],) * 2 and 15 <= params["kernel_size"] <= 31
        assert params["kernel_size"] % 2 == 1
        assert kernel.min() >= 0 and abs(kernel.sum() - 1.0) < 1e-9
        assert params["trajectory_extent_px"] <= params["kernel_size"] - 3 + 1e-9


def test_motion_blur_lowers_sharpness(rgb):
    out, params = D.degrade("motion_deblur", rgb, 2)
    assert abs(params["kernel_sum"] - 1.0) < 1e-9 and len(params["kernel_sha256"]) == 16
    g_in, g_out = color.rgb2gray(rgb), color.rgb2gray(out)
    assert ndimage.laplace(g_out).var() < 0.5 * ndimage.laplace(g_in).var()
    # same seed, same kernel hash; an explicit delta kernel leaves the image unchanged
    assert D.degrade("motion_deblur", rgb, 2)[1]["kernel_sha256"] == params["kernel_sha256"]
    delta = np.zeros((5, 5))
    delta[2, 2] = 1.0
    same, p = D.degrade("motion_deblur", rgb, 2, kernel=delta)
    assert np.allclose(same, rgb, atol=1e-5) and p["kernel_source"] == "override"


def test_derain_adds_bright_streaks(rgb):
    out, params = D.degrade("derain", rgb, 0)
    assert np.all(out >= rgb - 1e-6)  # additive
    assert out.mean() > rgb.mean() and params["n_streaks"] > 0 and 0 < params["rain_coverage"] < 0.5


def test_haze_raises_mean_and_lowers_contrast(rs_rgb):
    for seed in range(3):
        out, params = D.degrade("haze", rs_rgb, seed)
        assert out.mean() > rs_rgb.mean()
        assert out.std() < rs_rgb.std()
        assert 0 < params["mean_transmission"] < 1 and len(params["A"]) == 3


def test_cloud_coverage_matches_changed_pixels(rs_rgb):
    # Sharp, opaque clouds without shadows: the changed pixels are exactly the covered ones.
    out, params = D.degrade("cloud", rs_rgb, 4, softness=0.02, max_opacity=1.0, shadow_factor=1.0)
    changed = float(np.mean(np.abs(out - rs_rgb).max(axis=-1) > 0.05))
    assert abs(changed - params["coverage"]) < 0.05, (changed, params["coverage"])
    assert abs(params["coverage"] - params["coverage_target"]) < 0.02
    # Default clouds: at least the covered area changes, and not everything beyond the cloud and its shadow.
    for seed in range(3):
        out, params = D.degrade("cloud", rs_rgb, seed)
        changed = float(np.mean(np.abs(out - rs_rgb).max(axis=-1) > 0.05))
        assert params["coverage"] * 0.9 <= changed
        assert len(params["shadow_offset_px"]) == 2


def test_ct_noise_grows_as_dose_falls(gray):
    img = np.ascontiguousarray(gray[16:80, 16:80])
    stds = []
    for i0 in (2e3, 1e4, 5e4):
        out, params = D.degrade("ct_low_dose", img, 0, i0=i0, reconstruction="noise_insertion")
        stds.append(float(np.std(out.astype(np.float64) - img)))
    assert stds[0] > stds[1] > stds[2] > 0, stds
    out, params = D.degrade("ct_low_dose", img, 0)
    assert params["fbp_psnr_noiseless"] > 25 and 1e4 <= params["i0"] <= 5e4
    # the FBP output is noisier than the noise-free reconstruction floor
    assert _psnr(out, img) < params["fbp_psnr_noiseless"]


def test_pet_noise_falls_as_counts_rise(gray):
    errs = []
    for f in (0.05, 0.25, 1.0):
        out, _ = D.degrade("pet_low_count", gray, 0, keep_fraction=f, post_filter_sigma=0.0)
        errs.append(float(np.std(out.astype(np.float64) - gray)))
    assert errs[0] > errs[1] > errs[2], errs
    _, params = D.degrade("pet_low_count", gray, 0)
    assert 1 / 20 <= params["keep_fraction"] <= 1 / 4
    assert params["low_counts_realised"] < params["full_counts_realised"]


def test_jpeg_quality_orders_psnr(rgb, gray):
    for img in (rgb, gray):
        low, _ = D.degrade("jpeg", img, 0, quality=10)
        high, _ = D.degrade("jpeg", img, 0, quality=40)
        assert _psnr(low, img) < _psnr(high, img)
        assert np.allclose(low * 255, np.round(low * 255), atol=1e-3)  # decoded 8-bit levels


def test_low_light_darkens(rgb):
    out, params = D.degrade("low_light", rgb, 0)
    assert out.mean() < 0.5 * rgb.mean() and 0.1 <= params["exposure"] <= 0.4


# --- bad input --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("image", "match"),
    [
        (np.zeros((32, 32, 3), np.uint8), r"uint8.*astype\(np.float32\) / 255"),
        (np.full((32, 32), 2.0, np.float32), r"\[0, 1\].*rescale"),
        (np.full((32, 32), -0.5, np.float32), r"\[0, 1\]"),
        (np.zeros((2, 32, 32, 3), np.float32), r"\(H, W\) grayscale or \(H, W, 3\) RGB"),
        (np.zeros((32, 32, 4), np.float32), r"alpha"),
        (np.zeros((3, 32, 32), np.float32), r"transpose"),
        (np.zeros((32, 32, 1), np.float32), r"2-D \(H, W\)"),
        (np.full((32, 32), np.nan, np.float32), r"NaN"),
        (np.zeros((4, 32), np.float32), r"at least 8"),
        ([[0.0] * 16] * 16, r"numpy array"),
    ],
)
def test_bad_images_raise_helpful_errors(image, match):
    with pytest.raises(ValueError, match=match):
        D.degrade("sr_x4", image, 0)


@pytest.mark.parametrize("task", sorted(D.GRAYSCALE_ONLY_TASKS))
def test_grayscale_only_tasks_reject_rgb(task, rgb):
    with pytest.raises(ValueError, match=r"single-channel.*rgb2gray"):
        D.degrade(task, rgb, 0)
    with pytest.raises(ValueError, match=r"single-channel"):
        D.TASKS[task].fn(rgb, np.random.default_rng(0))  # the task function checks too


def test_bad_task_seed_and_overrides(rgb):
    with pytest.raises(ValueError, match=r"unknown degradation task 'dehaze'.*valid tasks:.*haze.*jpeg"):
        D.degrade("dehaze", rgb, 0)
    with pytest.raises(ValueError, match=r"seed must be a non-negative int"):
        D.degrade("haze", rgb, -1)
    with pytest.raises(ValueError, match=r"seed must be a non-negative int"):
        D.degrade("haze", rgb, 1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"unknown override\(s\) \['qualty'\].*accepted: quality"):
        D.degrade("jpeg", rgb, 0, qualty=20)
    with pytest.raises(ValueError, match=r"quality must be an int in \[1, 100\]"):
        D.degrade("jpeg", rgb, 0, quality=0)
    with pytest.raises(ValueError, match=r"kernel_size must be odd"):
        D.degrade("motion_deblur", rgb, 0, kernel_size=20)
    with pytest.raises(ValueError, match=r"reconstruction must be 'fbp' or 'noise_insertion'"):
        D.degrade("ct_low_dose", rgb[..., 0].copy(), 0, reconstruction="sart")
