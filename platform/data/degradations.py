"""Seeded, documented degradation synthesis for the paper's 9 tasks plus classic natural-image tasks.

Every task is a function ``fn(clean, rng, **overrides) -> (degraded, params)``:

* ``clean`` is a float numpy array in [0, 1], ``(H, W)`` (grayscale) or ``(H, W, 3)`` (RGB). Any size with both
  sides >= 8 px works, including sizes that are not multiples of 4.
* ``degraded`` has the same shape, dtype float32, clipped to [0, 1].
* ``params`` holds every parameter actually used (JSON-serialisable: str/int/float/bool and lists of them), so a
  dataset can store the provenance of each pair.
* Random parameters are drawn from ``rng`` inside the ranges documented in each function. A keyword override fixes a
  parameter; the value is still drawn (and discarded), so fixing one parameter leaves the random stream, and hence
  every other parameter and noise field, unchanged.

Use :func:`degrade` (``np.random.default_rng(seed)``, input validation, ``task``/``seed`` in ``params``): the same
``seed`` gives a bit-identical output on the same platform (numpy/scipy/Pillow versions).

Tasks (:data:`TASKS`): the paper's nine (:data:`PAPER_TASKS_9`, in the order of its task table; :data:`PAPER_TASKS_6`
is its 6-task setting) and the switchable extras :data:`EXTRA_TASKS`. ``mri_sr_x4``, ``ct_low_dose`` and
``pet_low_count`` are defined on single-channel scans and reject RGB input (:data:`GRAYSCALE_ONLY_TASKS`); the
paper replicates grayscale medical images to 3 channels, which is the dataset's job, after degradation.
``sr_x4``, ``rs_sr_x4`` and ``mri_sr_x4`` use no randomness (:data:`DETERMINISTIC_TASKS`).

All degradations are *simulations* (see each :class:`TaskSpec`'s ``simulated_note``): results measured on them are
not results on the paper's benchmarks.
"""

from __future__ import annotations

import hashlib
import inspect
import io
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage
from scipy.signal import fftconvolve
from scipy.signal.windows import tukey
from skimage.transform import iradon, radon, resize

__all__ = [
    "TaskSpec",
    "TASKS",
    "PAPER_TASKS_9",
    "PAPER_TASKS_6",
    "EXTRA_TASKS",
    "GRAYSCALE_ONLY_TASKS",
    "DETERMINISTIC_TASKS",
    "SYNTHESIS_VERSION",
    "degrade",
    "sr_x4",
    "derain",
    "motion_deblur",
    "motion_kernel",
    "mri_sr_x4",
    "ct_low_dose",
    "pet_low_count",
    "cloud",
    "haze",
    "gaussian_noise",
    "low_light",
    "jpeg",
]

SYNTHESIS_VERSION = 1  # bump when any task's output for a given seed changes; recorded in degrade()'s params

_MIN_SIDE = 8
_RANGE_TOL = 1e-5  # values this far outside [0, 1] (float round-off) are clipped instead of rejected


# --- helpers ------------------------------------------------------------------------------------------------------


def _validate(clean: Any, task: str, *, grayscale_only: bool = False) -> np.ndarray:
    """Check the input image and return it as a float64 copy clipped to [0, 1]."""
    if not isinstance(clean, np.ndarray):
        raise ValueError(
            f"{task}: expected a numpy array, got {type(clean).__name__}; convert with np.asarray(img, np.float32)"
        )
    if not np.issubdtype(clean.dtype, np.floating):
        hint = " / 255" if clean.dtype == np.uint8 else (" / 65535" if clean.dtype == np.uint16 else "")
        raise ValueError(
            f"{task}: image dtype is {clean.dtype}, expected float in [0, 1]; convert with img.astype(np.float32){hint}"
        )
    if clean.ndim == 3 and clean.shape[-1] == 1:
        raise ValueError(f"{task}: got shape {clean.shape}; pass a grayscale image as 2-D (H, W), e.g. img[..., 0]")
    if not (clean.ndim == 2 or (clean.ndim == 3 and clean.shape[-1] == 3)):
        raise ValueError(
            f"{task}: got shape {clean.shape}; expected (H, W) grayscale or (H, W, 3) RGB, channels last "
            "(for (3, H, W) use img.transpose(1, 2, 0); drop an alpha channel with img[..., :3])"
        )
    if grayscale_only and clean.ndim == 3:
        raise ValueError(
            f"{task} is defined on single-channel scans, got an RGB image {clean.shape}; pass a 2-D (H, W) array "
            "(img[..., 0] if the channels are replicated copies, or skimage.color.rgb2gray(img))"
        )
    h, w = clean.shape[:2]
    if h < _MIN_SIDE or w < _MIN_SIDE:
        raise ValueError(f"{task}: image is {h}x{w}; each side needs at least {_MIN_SIDE} px")
    if not np.all(np.isfinite(clean)):
        raise ValueError(f"{task}: image contains NaN or infinite values; fix them first (e.g. np.nan_to_num)")
    lo, hi = float(clean.min()), float(clean.max())
    if lo < -_RANGE_TOL or hi > 1 + _RANGE_TOL:
        raise ValueError(
            f"{task}: image values must lie in [0, 1], got min {lo:.4g}, max {hi:.4g}; rescale "
            "(img / 255 for 8-bit data, img / 65535 for 16-bit, or a window/min-max normalisation for scans)"
        )
    return np.clip(clean.astype(np.float64), 0.0, 1.0)


def _finish(x: np.ndarray) -> np.ndarray:
    return np.clip(x, 0.0, 1.0).astype(np.float32)


def _pick(drawn: Any, override: Any) -> Any:
    """The drawn value unless an override was given (the draw has already consumed the stream either way)."""
    return drawn if override is None else override


def _check_range(task: str, name: str, value: Any, lo: float, hi: float, *, integer: bool = False) -> None:
    numeric = (int, np.integer) if integer else (int, float, np.integer, np.floating)
    ok_type = isinstance(value, numeric)
    if isinstance(value, bool) or not ok_type or not (lo <= value <= hi):
        kind = "an int" if integer else "a number"
        raise ValueError(f"{task}: {name} must be {kind} in [{lo:g}, {hi:g}], got {value!r}")


def _loguniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value)
    if value is None or isinstance(value, str):
        return value
    raise TypeError(f"parameter value {value!r} of type {type(value).__name__} is not JSON-serialisable")


def _channels(x: np.ndarray) -> list[np.ndarray]:
    return [x] if x.ndim == 2 else [x[..., c] for c in range(x.shape[-1])]


def _stack(chans: list[np.ndarray], like: np.ndarray) -> np.ndarray:
    return chans[0] if like.ndim == 2 else np.stack(chans, axis=-1)


def _conv_reflect(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """2-D convolution of each channel with ``kernel`` (odd-sized), 'reflect' boundary in scipy.ndimage's sense
    (half-sample symmetric, d c b a | a b c d), same output size. Computed with FFTs."""
    kh, kw = kernel.shape
    ph, pw = kh // 2, kw // 2
    out = []
    for ch in _channels(x):
        padded = np.pad(ch, ((ph, ph), (pw, pw)), mode="symmetric")
        out.append(fftconvolve(padded, kernel, mode="valid"))
    return _stack(out, x)


def _splat(points: np.ndarray, size: tuple[int, int], weights: np.ndarray | None = None) -> np.ndarray:
    """Bilinear splatting of (row, col) points onto a zero grid of ``size`` (anti-aliased rasterisation)."""
    h, w = size
    r, c = points[:, 0], points[:, 1]
    wts = np.ones(len(points)) if weights is None else weights
    r0, c0 = np.floor(r).astype(np.int64), np.floor(c).astype(np.int64)
    fr, fc = r - r0, c - c0
    grid = np.zeros((h, w))
    for dr, dc, wgt in ((0, 0, (1 - fr) * (1 - fc)), (0, 1, (1 - fr) * fc), (1, 0, fr * (1 - fc)), (1, 1, fr * fc)):
        rr, cc = r0 + dr, c0 + dc
        ok = (rr >= 0) & (rr < h) & (cc >= 0) & (cc < w)
        np.add.at(grid, (rr[ok], cc[ok]), (wts * wgt)[ok])
    return grid


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cells: int) -> np.ndarray:
    """Low-frequency noise: a ``cells``-across grid of standard-normal values (along the longer side), upsampled to
    ``shape`` with cubic-spline interpolation (skimage ``resize``, order 3)."""
    h, w = shape
    longer = max(h, w)
    gh = max(2, int(round(cells * h / longer)) + 1)
    gw = max(2, int(round(cells * w / longer)) + 1)
    grid = rng.standard_normal((gh, gw))
    return resize(grid, (h, w), order=3, mode="reflect", anti_aliasing=False)


def _fractal_noise(rng: np.random.Generator, shape: tuple[int, int], base_cells: int, persistence: float) -> np.ndarray:
    """Sum of octaves of :func:`_smooth_noise` (cells doubling, amplitude times ``persistence`` per octave, up to
    a grid of an eighth of the image size, i.e. features of >= ~8 px), normalised to zero mean and unit standard
    deviation."""
    longer = max(shape)
    field = np.zeros(shape)
    cells, amp = base_cells, 1.0
    while True:
        field += amp * _smooth_noise(rng, shape, cells)
        cells, amp = cells * 2, amp * persistence
        if cells > max(base_cells, longer // 8):
            break
    std = field.std()
    return (field - field.mean()) / (std if std > 0 else 1.0)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((np.clip(a, 0, 1) - np.clip(b, 0, 1)) ** 2))
    return 100.0 if mse <= 1e-10 else float(10 * math.log10(1.0 / mse))


# --- natural / remote sensing: super-resolution -----------------------------------------------------------------


def sr_x4(clean: np.ndarray, rng: np.random.Generator, *, scale: int | None = None) -> tuple[np.ndarray, dict]:
    """Bicubic x``scale`` (default 4) downsampling, then bicubic upsampling back to the input size, as the paper
    feeds SR networks (input and target of equal size). No randomness.

    Resampling: Pillow ``Image.resize(..., BICUBIC)`` on each channel as a 32-bit float ('F' mode) image. Pillow's
    bicubic is the Keys cubic (a = -0.5) with its support widened by the scale factor when shrinking, i.e.
    antialiased like MATLAB ``imresize`` (which made the DIV2K/UCMerced LR sets), though not bit-identical to it.
    The low-resolution size is ``ceil(H / scale) x ceil(W / scale)`` (MATLAB's convention), so sizes that are not
    multiples of ``scale`` work; the effective factors are recorded.
    """
    x = _validate(clean, "sr_x4")
    s = _pick(4, scale)
    _check_range("sr_x4", "scale", s, 2, 16, integer=True)
    h, w = x.shape[:2]
    lh, lw = max(1, math.ceil(h / s)), max(1, math.ceil(w / s))
    out = []
    for ch in _channels(x):
        im = Image.fromarray(ch.astype(np.float32))
        lr = im.resize((lw, lh), Image.Resampling.BICUBIC)
        out.append(np.asarray(lr.resize((w, h), Image.Resampling.BICUBIC), dtype=np.float64))
    params = {
        "scale": s,
        "lr_shape": [lh, lw],
        "effective_scale": [h / lh, w / lw],
        "resampler": "PIL BICUBIC (Keys a=-0.5, antialiased) on float32 'F' images, down then up",
    }
    return _finish(_stack(out, x)), params


# --- natural: deraining -----------------------------------------------------------------------------------------


def derain(
    clean: np.ndarray,
    rng: np.random.Generator,
    *,
    density: float | None = None,
    length: float | None = None,
    angle_deg: float | None = None,
    intensity: float | None = None,
    width_sigma: float | None = None,
) -> tuple[np.ndarray, dict]:
    """Synthetic light rain (Rain100L-like), added on top of the clean image.

    Model: seed points are placed independently with probability ``density`` per pixel (uniform in [0.001, 0.004]),
    each with a random brightness in [0.5, 1]. They are smeared into streaks by convolving with a line kernel of
    ``length`` px (uniform in [10, 30]) at ``angle_deg`` from vertical (uniform in [-30, 30]; positive leans to the
    right going down), rasterised with bilinear splatting and scaled to peak 1, then softened across the streak with
    a Gaussian of ``width_sigma`` px (uniform in [0.4, 0.9]). The streak map is clipped to [0, 1] and added to every
    channel (achromatic rain) with weight ``intensity`` (uniform in [0.25, 0.6]); the sum is clipped to [0, 1].
    """
    task = "derain"
    x = _validate(clean, task)
    h, w = x.shape[:2]
    dens = _pick(float(rng.uniform(0.001, 0.004)), density)
    ln = _pick(float(rng.uniform(10.0, 30.0)), length)
    ang = _pick(float(rng.uniform(-30.0, 30.0)), angle_deg)
    inten = _pick(float(rng.uniform(0.25, 0.6)), intensity)
    wsig = _pick(float(rng.uniform(0.4, 0.9)), width_sigma)
    _check_range(task, "density", dens, 0.0, 0.2)
    _check_range(task, "length", ln, 1.0, 200.0)
    _check_range(task, "angle_deg", ang, -90.0, 90.0)
    _check_range(task, "intensity", inten, 0.0, 1.0)
    _check_range(task, "width_sigma", wsig, 0.0, 5.0)
    u = rng.random((h, w))
    brightness = rng.uniform(0.5, 1.0, (h, w))
    seeds = np.where(u < dens, brightness, 0.0)

    k = 2 * int(math.ceil(ln / 2)) + 3  # odd kernel holding the whole line
    t = np.linspace(-ln / 2, ln / 2, max(2, int(ln * 4)))
    theta = math.radians(ang)
    pts = np.stack([k // 2 + t * math.cos(theta), k // 2 + t * math.sin(theta)], axis=1)  # (row, col)
    kernel = _splat(pts, (k, k))
    kernel /= kernel.max()
    streaks = _conv_reflect(seeds, kernel)
    if wsig > 0:
        streaks = ndimage.gaussian_filter(streaks, wsig, mode="reflect")
    streaks = np.clip(streaks, 0.0, 1.0)
    rain = inten * (streaks if x.ndim == 2 else streaks[..., None])
    params = {
        "density": dens,
        "length": ln,
        "angle_deg": ang,
        "intensity": inten,
        "width_sigma": wsig,
        "n_streaks": int(np.count_nonzero(seeds)),
        "rain_coverage": float(np.mean(streaks > 0.05)),
        "model": "additive achromatic streaks: sparse seeds * line kernel, Gaussian-softened",
    }
    return _finish(x + rain), params


# --- natural: motion deblurring ---------------------------------------------------------------------------------


def motion_kernel(
    rng: np.random.Generator,
    *,
    kernel_size: int | None = None,
    extent_fraction: float | None = None,
    anxiety: float | None = None,
    centripetal: float | None = None,
    prob_big_shake: float | None = None,
    gaussian_shake: float | None = None,
    init_angle_deg: float | None = None,
    n_steps: int = 2000,
) -> tuple[np.ndarray, dict]:
    """A random camera-shake blur kernel (odd ``kernel_size`` x ``kernel_size``, non-negative, sums to 1).

    Trajectory model of Boracchi & Foi ("Modeling the performance of image restoration from motion blur", IEEE TIP
    2012, ``createTrajectory``; the same generator as DeblurGAN's): a 2-D particle moves ``n_steps`` equal steps
    (total length ``kernel_size``, as in the original where it equals the canvas size); each step its velocity gets a
    Gaussian perturbation (``gaussian_shake`` U[0, 10], scaled by ``anxiety``), a pull back towards the start
    (``centripetal`` U[0, 0.7]) and, with probability ``prob_big_shake * anxiety`` (``prob_big_shake`` U[0, 0.2]), an
    abrupt reversal; the initial direction is U[0, 360) degrees. ``anxiety`` is U[0.001, 0.01] (DeblurGAN's range;
    the original's U[0, 0.1] mostly gives tightly curled paths of a few pixels). ``kernel_size`` is odd, drawn from
    15..31. The path is then scaled so that its larger extent is ``extent_fraction`` (U[0.5, 1.0]) of
    ``kernel_size - 3`` px, centred and rasterised by bilinear splatting of its samples (uniform exposure along it).
    The recorded ``trajectory_length`` is the length after that scaling.
    """
    task = "motion_deblur"
    ks = _pick(int(rng.integers(7, 16)) * 2 + 1, kernel_size)  # 15, 17, ..., 31
    frac = _pick(float(rng.uniform(0.5, 1.0)), extent_fraction)
    anx = _pick(float(rng.uniform(0.001, 0.01)), anxiety)
    cen = _pick(float(rng.uniform(0.0, 0.7)), centripetal)
    pbs = _pick(float(rng.uniform(0.0, 0.2)), prob_big_shake)
    gsh = _pick(float(rng.uniform(0.0, 10.0)), gaussian_shake)
    ang = _pick(float(rng.uniform(0.0, 360.0)), init_angle_deg)
    _check_range(task, "kernel_size", ks, 5, 101, integer=True)
    if ks % 2 == 0:
        raise ValueError(f"{task}: kernel_size must be odd, got {ks}")
    _check_range(task, "extent_fraction", frac, 0.0, 1.0)
    _check_range(task, "anxiety", anx, 0.0, 1.0)
    _check_range(task, "centripetal", cen, 0.0, 10.0)
    _check_range(task, "prob_big_shake", pbs, 0.0, 1.0)
    _check_range(task, "gaussian_shake", gsh, 0.0, 100.0)
    _check_range(task, "init_angle_deg", ang, -360.0, 360.0)
    _check_range(task, "n_steps", n_steps, 10, 100000, integer=True)
    length = float(ks)

    n = n_steps
    u = rng.random(n - 1)
    jump_phase = rng.random(n - 1)
    g = rng.standard_normal((n - 1, 2))
    step = length / (n - 1)
    v0 = complex(math.cos(math.radians(ang)), math.sin(math.radians(ang)))
    v = v0 * anx if anx > 0 else v0 * step
    traj = np.zeros(n, dtype=np.complex128)
    pos = 0j
    n_big = 0
    for t in range(n - 1):
        nxt = 0j
        if u[t] < pbs * anx:
            nxt = 2 * v * complex(math.cos(math.pi + jump_phase[t] - 0.5), math.sin(math.pi + jump_phase[t] - 0.5))
            n_big += 1
        dv = nxt + anx * (gsh * complex(g[t, 0], g[t, 1]) - cen * pos) * step
        v = v + dv
        av = abs(v)
        v = (v / av) * step if av > 0 else v0 * step
        pos = pos + v
        traj[t + 1] = pos

    extent = max(np.ptp(traj.real), np.ptp(traj.imag))
    target = frac * (ks - 3)
    shrink = target / extent if extent > 0 else 1.0
    traj = traj * shrink
    centre = complex((traj.real.max() + traj.real.min()) / 2, (traj.imag.max() + traj.imag.min()) / 2)
    traj = traj - centre + complex((ks - 1) / 2, (ks - 1) / 2)
    kernel = _splat(np.stack([traj.imag, traj.real], axis=1), (ks, ks))  # row = imaginary part
    kernel /= kernel.sum()
    params = {
        "kernel_size": ks,
        "trajectory_length": float(length * shrink),
        "trajectory_extent_px": float(extent * shrink),
        "extent_fraction": frac,
        "anxiety": anx,
        "centripetal": cen,
        "prob_big_shake": pbs,
        "gaussian_shake": gsh,
        "init_angle_deg": ang,
        "n_steps": n,
        "n_abrupt_shakes": n_big,
        "kernel_sha256": hashlib.sha256(np.ascontiguousarray(kernel, dtype=np.float64).tobytes()).hexdigest()[:16],
    }
    return kernel, params


def motion_deblur(
    clean: np.ndarray,
    rng: np.random.Generator,
    *,
    kernel: np.ndarray | None = None,
    **kernel_overrides: Any,
) -> tuple[np.ndarray, dict]:
    """Uniform (spatially invariant) camera-shake blur: a :func:`motion_kernel` drawn from ``rng`` (its keyword
    arguments are accepted as overrides), convolved with each channel, 'reflect' boundary (half-sample symmetric).
    An explicit odd-sized ``kernel`` (normalised to sum 1 here) replaces the drawn one; the kernel is identified in
    ``params`` by a SHA-256 prefix of its float64 bytes, not stored.
    """
    x = _validate(clean, "motion_deblur")
    bad = set(kernel_overrides) - (set(inspect.signature(motion_kernel).parameters) - {"rng"})
    if bad:
        raise ValueError(f"motion_deblur: unknown override(s) {sorted(bad)}")
    k, params = motion_kernel(rng, **kernel_overrides)
    if kernel is not None:
        k = np.asarray(kernel, dtype=np.float64)
        if k.ndim != 2 or k.shape[0] % 2 == 0 or k.shape[1] % 2 == 0 or np.any(k < 0) or k.sum() <= 0:
            raise ValueError("motion_deblur: kernel must be a 2-D non-negative array with odd sides and positive sum")
        k = k / k.sum()
        params = {
            "kernel_size": int(k.shape[0]),
            "kernel_shape": list(k.shape),
            "kernel_source": "override",
            "kernel_sha256": hashlib.sha256(np.ascontiguousarray(k).tobytes()).hexdigest()[:16],
        }
    else:
        params["kernel_source"] = "boracchi_foi_trajectory"
    params["kernel_sum"] = float(k.sum())
    params["boundary"] = "reflect"
    return _finish(_conv_reflect(x, k)), params


# --- medical ------------------------------------------------------------------------------------------------------


def mri_sr_x4(
    clean: np.ndarray, rng: np.random.Generator, *, scale: int | None = None, tukey_alpha: float | None = None
) -> tuple[np.ndarray, dict]:
    """MRI super-resolution input by k-space truncation (single-channel magnitude image). No randomness.

    The centred 2-D FFT is kept only for spatial frequencies ``|k| <= floor(N / (2 * scale))`` along each axis
    (N = H or W; the central ~1/``scale`` of k-space per axis, default scale 4, a symmetric band so the result of a
    real image stays real), optionally tapered by a separable Tukey window of shape ``tukey_alpha`` over the kept
    band (default 0: hard truncation with its Gibbs ringing, as in k-space-truncation MRI SR benchmarks; 1 gives a
    Hann window with less ringing and more blur). The output is the magnitude of the inverse FFT, at the input size.
    """
    task = "mri_sr_x4"
    x = _validate(clean, task, grayscale_only=True)
    s = _pick(4, scale)
    alpha = _pick(0.0, tukey_alpha)
    _check_range(task, "scale", s, 2, 16, integer=True)
    _check_range(task, "tukey_alpha", alpha, 0.0, 1.0)
    h, w = x.shape
    kh, kw = max(1, h // (2 * s)), max(1, w // (2 * s))
    fy = np.rint(np.fft.fftfreq(h) * h).astype(int)
    fx = np.rint(np.fft.fftfreq(w) * w).astype(int)
    wy = np.zeros(h)
    wx = np.zeros(w)
    win_y = tukey(2 * kh + 1, alpha) if alpha > 0 else np.ones(2 * kh + 1)
    win_x = tukey(2 * kw + 1, alpha) if alpha > 0 else np.ones(2 * kw + 1)
    in_y, in_x = np.abs(fy) <= kh, np.abs(fx) <= kw
    wy[in_y] = win_y[fy[in_y] + kh]
    wx[in_x] = win_x[fx[in_x] + kw]
    spec = np.fft.fft2(x) * wy[:, None] * wx[None, :]
    out = np.abs(np.fft.ifft2(spec))
    params = {
        "scale": s,
        "kept_frequencies": [int(in_y.sum()), int(in_x.sum())],
        "kept_fraction": [float(in_y.mean()), float(in_x.mean())],
        "tukey_alpha": alpha,
        "output": "magnitude of inverse FFT",
    }
    return _finish(out), params


def ct_low_dose(
    clean: np.ndarray,
    rng: np.random.Generator,
    *,
    i0: float | None = None,
    n_angles: int | None = None,
    attenuation_full_width: float | None = None,
    electronic_noise: float | None = None,
    reconstruction: str | None = None,
) -> tuple[np.ndarray, dict]:
    """Low-dose CT by projection-domain noise (single-channel image read as a linear attenuation map).

    1. The image is zero-padded (air) to a square of side ``ceil(sqrt(2) * max(H, W)) + 2`` so the scanner's circular
       field of view (the inscribed circle, ``radon(circle=True)``) contains all of it; nothing is cut off.
    2. Parallel-beam sinogram ``p = radon(image)`` over ``n_angles`` (default 180) angles in [0, 180) degrees.
    3. Attenuation units: ``mu = p * attenuation_full_width / max(H, W)``, i.e. a path across the full image width
       through pixels of value 1 attenuates by ``exp(-attenuation_full_width)`` (default 4), whatever the size.
    4. Photon counts ``I ~ Poisson(I0 exp(-mu)) + N(0, electronic_noise^2)`` (default 5 counts), clamped to >= 1;
       ``I0`` is the low (e.g. quarter) dose in photons per ray, log-uniform in [1e4, 5e4].
    5. ``mu_noisy = -log(I / I0)``, back to the image's units, filtered back-projection (``iradon``, ramp filter,
       linear interpolation), cropped to H x W. Values are in the input's intensity scale.

    ``reconstruction='fbp'`` (default) returns that FBP image. FBP of even a noise-free sinogram differs slightly from
    the input (discretisation, streaks at sharp edges); that floor is reported as ``fbp_psnr_noiseless`` (PSNR in dB,
    data range 1, of the noise-free FBP against the input). ``reconstruction='noise_insertion'`` instead returns
    ``clean + FBP(noisy) - FBP(noise-free)``: only the dose noise, without the reconstruction floor.
    Cost: about 1 s for 256x256 (one radon, two iradon).
    """
    task = "ct_low_dose"
    x = _validate(clean, task, grayscale_only=True)
    dose = _pick(_loguniform(rng, 1e4, 5e4), i0)
    na = _pick(180, n_angles)
    att = _pick(4.0, attenuation_full_width)
    sig_e = _pick(5.0, electronic_noise)
    recon = _pick("fbp", reconstruction)
    _check_range(task, "i0", dose, 10.0, 1e9)
    _check_range(task, "n_angles", na, 8, 2000, integer=True)
    _check_range(task, "attenuation_full_width", att, 1e-3, 20.0)
    _check_range(task, "electronic_noise", sig_e, 0.0, 1e4)
    if recon not in ("fbp", "noise_insertion"):
        raise ValueError(f"{task}: reconstruction must be 'fbp' or 'noise_insertion', got {recon!r}")

    h, w = x.shape
    side = int(math.ceil(math.sqrt(2) * max(h, w))) + 2
    top, left = (side - h) // 2, (side - w) // 2
    padded = np.zeros((side, side))
    padded[top : top + h, left : left + w] = x
    theta = np.linspace(0.0, 180.0, na, endpoint=False)
    sino = radon(padded, theta=theta, circle=True)
    mu_per_unit = att / max(h, w)
    mu = sino * mu_per_unit
    expected = dose * np.exp(-mu)
    counts = rng.poisson(expected).astype(np.float64)
    counts = counts + sig_e * rng.standard_normal(counts.shape)
    counts = np.maximum(counts, 1.0)
    sino_noisy = -np.log(counts / dose) / mu_per_unit

    def fbp(s: np.ndarray) -> np.ndarray:
        r = iradon(s, theta=theta, output_size=side, circle=True, filter_name="ramp", interpolation="linear")
        return r[top : top + h, left : left + w]

    noisy = fbp(sino_noisy)
    noiseless = fbp(sino)
    out = noisy if recon == "fbp" else x + (noisy - noiseless)
    params = {
        "i0": dose,
        "n_angles": na,
        "attenuation_full_width": att,
        "electronic_noise": sig_e,
        "reconstruction": recon,
        "geometry": "parallel beam, skimage radon/iradon, circle=True on zero-padded square",
        "filter": "ramp",
        "padded_side": side,
        "max_line_attenuation": float(mu.max()),
        "min_expected_counts": float(expected.min()),
        "fbp_psnr_noiseless": _psnr(noiseless, x),
    }
    return _finish(out), params


def pet_low_count(
    clean: np.ndarray,
    rng: np.random.Generator,
    *,
    keep_fraction: float | None = None,
    counts_per_128x128: float | None = None,
    post_filter_sigma: float | None = None,
) -> tuple[np.ndarray, dict]:
    """Simulated low-count PET input (single-channel image read as an activity map); the target stays ``clean``.

    1. Full-count image: the activity is scaled to a total of ``counts_per_128x128 * H * W / 128^2`` expected counts
       (a count density log-uniform in [1e6, 5e6] per 128x128 px, so crops behave like crops of one slice) and a
       Poisson realisation is drawn.
    2. Low-count image: Binomial thinning of those counts with keep fraction ``keep_fraction`` (log-uniform in
       [1/20, 1/4], i.e. 5%-25% of the counts, like a shortened scan or reduced tracer dose), rescaled by
       ``1 / keep_fraction`` and back to the input's intensity scale. (Thinning a Poisson draw is a Poisson draw at
       the lower rate, so the noise is that of the low-count acquisition.)
    3. Gaussian post-filter of ``post_filter_sigma`` px (uniform in [0.5, 1.0]), as clinical reconstructions smooth;
       0 disables it. Finally clipped to [0, 1].

    Noise is added in image space; there is no sinogram, attenuation, scatter, randoms or iterative reconstruction.
    """
    task = "pet_low_count"
    x = _validate(clean, task, grayscale_only=True)
    f = _pick(_loguniform(rng, 1 / 20, 1 / 4), keep_fraction)
    density = _pick(_loguniform(rng, 1e6, 5e6), counts_per_128x128)
    sig = _pick(float(rng.uniform(0.5, 1.0)), post_filter_sigma)
    _check_range(task, "keep_fraction", f, 1e-4, 1.0)
    _check_range(task, "counts_per_128x128", density, 1.0, 1e12)
    _check_range(task, "post_filter_sigma", sig, 0.0, 10.0)
    h, w = x.shape
    total = density * h * w / 128**2
    activity = x.sum()
    scale = total / activity if activity > 0 else 0.0
    full = rng.poisson(x * scale)
    low = rng.binomial(full, f)
    out = low / f / scale if scale > 0 else np.zeros_like(x)
    if sig > 0:
        out = ndimage.gaussian_filter(out, sig, mode="reflect")
    params = {
        "keep_fraction": f,
        "counts_per_128x128": density,
        "full_counts_expected": float(total),
        "full_counts_realised": int(full.sum()),
        "low_counts_realised": int(low.sum()),
        "post_filter_sigma": sig,
        "model": "Poisson full-count draw, Binomial thinning, rescale by 1/keep_fraction, Gaussian post-filter",
    }
    return _finish(out), params


# --- remote sensing ------------------------------------------------------------------------------------------------


def cloud(
    clean: np.ndarray,
    rng: np.random.Generator,
    *,
    coverage_target: float | None = None,
    softness: float | None = None,
    max_opacity: float | None = None,
    base_cells: int | None = None,
    persistence: float | None = None,
    brightness: float | None = None,
    tint: float | None = None,
    shadow_factor: float | None = None,
    shadow_angle_deg: float | None = None,
    shadow_distance: float | None = None,
) -> tuple[np.ndarray, dict]:
    """Cloud cover with cast shadows over a (remote-sensing) image.

    * Opacity: a fractal noise field (octaves of upsampled seeded Gaussian noise, ``base_cells`` in 2..4 cells across,
      ``persistence`` U[0.4, 0.6]; zero mean, unit std) through a soft threshold
      ``a = max_opacity * sigmoid((field - q) / softness)``, with ``q`` the field's ``(1 - coverage_target)``
      quantile so that a fraction ``coverage_target`` (U[0.15, 0.6]) of the pixels is more than half covered;
      ``softness`` U[0.3, 1.0] (field std units), ``max_opacity`` U[0.6, 1.0] (thin to thick cloud; CUHK-CR1 is
      mostly thin cloud).
    * Cloud colour: ``brightness`` U[0.8, 1.0], slightly bluish white (R, G multiplied by ``1 - tint``,
      ``1 - tint / 2``, tint U[0, 0.06]; ignored for grayscale), with a +-8% texture from the same field.
    * Shadow: the opacity map shifted by ``shadow_distance`` (U[0.03, 0.12] x max(H, W) px) towards
      ``shadow_angle_deg`` (U[0, 360), 0 = +x/right, 90 = +y/down; edges extended), Gaussian-softened (1.5 px),
      darkening the ground by ``1 - (1 - shadow_factor) * a_shifted`` (``shadow_factor`` U[0.4, 0.7]).
    * Composite: ``out = ground * shadow * (1 - a) + cloud_colour * a``.

    ``params['coverage']`` is the measured fraction of pixels with opacity above half of ``max_opacity``;
    ``shadow_coverage`` likewise for the visible (not cloud-covered) shadow.
    """
    task = "cloud"
    x = _validate(clean, task)
    h, w = x.shape[:2]
    cov = _pick(float(rng.uniform(0.15, 0.6)), coverage_target)
    soft = _pick(float(rng.uniform(0.3, 1.0)), softness)
    amax = _pick(float(rng.uniform(0.6, 1.0)), max_opacity)
    cells = _pick(int(rng.integers(2, 5)), base_cells)
    pers = _pick(float(rng.uniform(0.4, 0.6)), persistence)
    bright = _pick(float(rng.uniform(0.8, 1.0)), brightness)
    tnt = _pick(float(rng.uniform(0.0, 0.06)), tint)
    sfac = _pick(float(rng.uniform(0.4, 0.7)), shadow_factor)
    sang = _pick(float(rng.uniform(0.0, 360.0)), shadow_angle_deg)
    sdist = _pick(float(rng.uniform(0.03, 0.12)) * max(h, w), shadow_distance)
    _check_range(task, "coverage_target", cov, 0.0, 1.0)
    _check_range(task, "softness", soft, 1e-3, 5.0)
    _check_range(task, "max_opacity", amax, 0.0, 1.0)
    _check_range(task, "base_cells", cells, 1, 64, integer=True)
    _check_range(task, "persistence", pers, 0.0, 1.0)
    _check_range(task, "brightness", bright, 0.0, 1.0)
    _check_range(task, "tint", tnt, 0.0, 0.5)
    _check_range(task, "shadow_factor", sfac, 0.0, 1.0)
    _check_range(task, "shadow_angle_deg", sang, -360.0, 360.0)
    _check_range(task, "shadow_distance", sdist, 0.0, 10.0 * max(h, w))

    field = _fractal_noise(rng, (h, w), cells, pers)
    q = float(np.quantile(field, 1.0 - cov)) if cov > 0 else float(field.max()) + 10 * soft
    core = 1.0 / (1.0 + np.exp(-(field - q) / soft))
    a = amax * core
    dy = int(round(sdist * math.sin(math.radians(sang))))
    dx = int(round(sdist * math.cos(math.radians(sang))))
    a_shift = ndimage.shift(a, (dy, dx), order=0, mode="nearest")
    a_shift = ndimage.gaussian_filter(a_shift, 1.5, mode="nearest")
    shadow = 1.0 - (1.0 - sfac) * a_shift
    texture = 1.0 + 0.08 * np.tanh(field - q)
    colour = bright * texture
    if x.ndim == 3:
        colour = colour[..., None] * np.array([1.0 - tnt, 1.0 - tnt / 2, 1.0])
        a3, s3 = a[..., None], shadow[..., None]
    else:
        a3, s3 = a, shadow
    out = x * s3 * (1.0 - a3) + colour * a3
    params = {
        "coverage_target": cov,
        "coverage": float(np.mean(core > 0.5)),
        "mean_opacity": float(a.mean()),
        "shadow_coverage": float(np.mean((a_shift > 0.5 * amax) & (core <= 0.5))),
        "softness": soft,
        "max_opacity": amax,
        "base_cells": cells,
        "persistence": pers,
        "brightness": bright,
        "tint": tnt,
        "shadow_factor": sfac,
        "shadow_angle_deg": sang,
        "shadow_distance": sdist,
        "shadow_offset_px": [dy, dx],
    }
    return _finish(out), params


def haze(
    clean: np.ndarray,
    rng: np.random.Generator,
    *,
    beta: float | None = None,
    airlight: float | None = None,
    tint: float | None = None,
    d_min: float | None = None,
    field_cells: int | None = None,
) -> tuple[np.ndarray, dict]:
    """Haze by the atmospheric scattering model ``I = J t + A (1 - t)``, ``t = exp(-beta d)``.

    ``d`` is a smooth random "depth": low-frequency noise (``field_cells`` in 2..4 cells across, cubic upsampling)
    min-max normalised to [0, 1] and mapped to ``[d_min, 1]`` (``d_min`` U[0.2, 0.5]), so the haze is never absent
    and varies smoothly. ``beta`` U[0.5, 2.0]. Airlight ``A``: ``airlight`` U[0.7, 1.0], slightly grey-blue
    (R, G multiplied by ``1 - tint``, ``1 - tint / 2``, ``tint`` U[0, 0.08]; a single value for grayscale).
    """
    task = "haze"
    x = _validate(clean, task)
    h, w = x.shape[:2]
    b = _pick(float(rng.uniform(0.5, 2.0)), beta)
    a_val = _pick(float(rng.uniform(0.7, 1.0)), airlight)
    tnt = _pick(float(rng.uniform(0.0, 0.08)), tint)
    dmin = _pick(float(rng.uniform(0.2, 0.5)), d_min)
    cells = _pick(int(rng.integers(2, 5)), field_cells)
    _check_range(task, "beta", b, 0.0, 10.0)
    _check_range(task, "airlight", a_val, 0.0, 1.0)
    _check_range(task, "tint", tnt, 0.0, 0.5)
    _check_range(task, "d_min", dmin, 0.0, 1.0)
    _check_range(task, "field_cells", cells, 1, 64, integer=True)
    field = _smooth_noise(rng, (h, w), cells)
    span = np.ptp(field)
    field = (field - field.min()) / span if span > 0 else np.zeros_like(field)
    d = dmin + (1.0 - dmin) * field
    t = np.exp(-b * d)
    if x.ndim == 3:
        a_vec = a_val * np.array([1.0 - tnt, 1.0 - tnt / 2, 1.0])
        out = x * t[..., None] + a_vec * (1.0 - t[..., None])
    else:
        a_vec = np.array([a_val])
        out = x * t + a_val * (1.0 - t)
    params = {
        "beta": b,
        "airlight": a_val,
        "tint": tnt,
        "A": a_vec,
        "d_min": dmin,
        "field_cells": cells,
        "mean_transmission": float(t.mean()),
        "min_transmission": float(t.min()),
        "model": "I = J t + A (1 - t), t = exp(-beta d), d smooth random field in [d_min, 1]",
    }
    return _finish(out), params


# --- extras (natural) ----------------------------------------------------------------------------------------------


def gaussian_noise(clean: np.ndarray, rng: np.random.Generator, *, sigma_255: float = 25.0) -> tuple[np.ndarray, dict]:
    """Additive white Gaussian noise of standard deviation ``sigma_255 / 255`` (independent per pixel and channel),
    clipped to [0, 1] (clipping lowers the measured std near black and white)."""
    x = _validate(clean, "gaussian_noise")
    _check_range("gaussian_noise", "sigma_255", sigma_255, 0.0, 255.0)
    noise = rng.standard_normal(x.shape)
    params = {"sigma_255": float(sigma_255), "sigma": float(sigma_255) / 255.0}
    return _finish(x + noise * (sigma_255 / 255.0)), params


def _denoise(sigma: int) -> Callable[..., tuple[np.ndarray, dict]]:
    def fn(clean: np.ndarray, rng: np.random.Generator, *, sigma_255: float | None = None) -> tuple[np.ndarray, dict]:
        return gaussian_noise(clean, rng, sigma_255=sigma if sigma_255 is None else sigma_255)

    fn.__name__ = f"denoise_{sigma}"
    fn.__qualname__ = fn.__name__
    fn.__doc__ = f"Additive Gaussian noise, sigma {sigma}/255 (see :func:`gaussian_noise`)."
    return fn


def low_light(
    clean: np.ndarray,
    rng: np.random.Generator,
    *,
    exposure: float | None = None,
    gamma: float | None = None,
    photons_full_scale: float | None = None,
    read_noise: float | None = None,
) -> tuple[np.ndarray, dict]:
    """Synthetic low-light capture.

    ``dark = exposure * clean ** gamma`` (``gamma`` U[1.2, 2.5] darkens the mid-tones more than the highlights;
    ``exposure`` U[0.1, 0.4] is the reduced exposure), then Poisson-Gaussian sensor noise:
    ``out = Poisson(dark * photons_full_scale) / photons_full_scale + N(0, read_noise^2)``, with
    ``photons_full_scale`` (photo-electrons at value 1) log-uniform in [200, 2000] and ``read_noise`` U[0.002, 0.01];
    the noise is independent per channel. Clipped to [0, 1]. The target is the normally exposed ``clean``.
    """
    task = "low_light"
    x = _validate(clean, task)
    e = _pick(float(rng.uniform(0.1, 0.4)), exposure)
    g = _pick(float(rng.uniform(1.2, 2.5)), gamma)
    k = _pick(_loguniform(rng, 200.0, 2000.0), photons_full_scale)
    rn = _pick(float(rng.uniform(0.002, 0.01)), read_noise)
    _check_range(task, "exposure", e, 1e-3, 1.0)
    _check_range(task, "gamma", g, 0.1, 10.0)
    _check_range(task, "photons_full_scale", k, 1.0, 1e9)
    _check_range(task, "read_noise", rn, 0.0, 1.0)
    dark = e * x**g
    shot = rng.poisson(dark * k) / k
    out = shot + rn * rng.standard_normal(x.shape)
    params = {
        "exposure": e,
        "gamma": g,
        "photons_full_scale": k,
        "read_noise": rn,
        "mean_dark_level": float(dark.mean()),
        "model": "exposure * x**gamma, Poisson(photons) / photons + N(0, read_noise^2)",
    }
    return _finish(out), params


def jpeg(clean: np.ndarray, rng: np.random.Generator, *, quality: int | None = None) -> tuple[np.ndarray, dict]:
    """JPEG compression round trip with Pillow (libjpeg): the image is quantised to 8 bits (``round(x * 255)``),
    encoded at ``quality`` (integer, uniform in 10..40), 4:2:0 chroma subsampling for RGB (mode 'L' for grayscale),
    no optimisation, and decoded back to [0, 1]."""
    task = "jpeg"
    x = _validate(clean, task)
    q = _pick(int(rng.integers(10, 41)), quality)
    _check_range(task, "quality", q, 1, 100, integer=True)
    u8 = np.rint(x * 255.0).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(u8).save(buf, format="JPEG", quality=int(q), subsampling=2, optimize=False)
    nbytes = buf.tell()
    buf.seek(0)
    with Image.open(buf) as im:
        dec = np.asarray(im.convert("L" if x.ndim == 2 else "RGB"), dtype=np.float64) / 255.0
    params = {"quality": int(q), "subsampling": "4:2:0" if x.ndim == 3 else "none (grayscale)", "jpeg_bytes": nbytes}
    return _finish(dec), params


# --- registry -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskSpec:
    """One degradation task: its registry ``name``, ``domain`` ("natural" | "medical" | "remote_sensing"), the
    synthesis function ``fn(clean, rng, **overrides) -> (degraded, params)``, a one-line ``description`` and a
    ``simulated_note`` saying how it differs from the paper's real benchmark data."""

    name: str
    domain: str
    fn: Callable[..., tuple[np.ndarray, dict]]
    description: str
    simulated_note: str = ""


_DOMAINS = ("natural", "medical", "remote_sensing")

TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec(
            "sr_x4",
            "natural",
            sr_x4,
            "4x super-resolution: bicubic x4 down and back up (Pillow bicubic)",
            "Synthetic like the paper's (DIV2K LR is MATLAB bicubic); Pillow's bicubic is close to, not bit-equal to, "
            "MATLAB imresize.",
        ),
        TaskSpec(
            "derain",
            "natural",
            derain,
            "deraining: additive light synthetic rain streaks (Rain100L-like)",
            "Simulated streaks, not the Rain100L images; numbers on it are not Rain100L numbers.",
        ),
        TaskSpec(
            "motion_deblur",
            "natural",
            motion_deblur,
            "motion deblurring: random camera-shake trajectory kernel (Boracchi-Foi), 15-31 px",
            "Simulated spatially invariant blur; GoPro pairs average real high-speed frames (spatially varying blur, "
            "object motion).",
        ),
        TaskSpec(
            "mri_sr_x4",
            "medical",
            mri_sr_x4,
            "MRI 4x super-resolution by k-space truncation (grayscale)",
            "Simulated from magnitude images, not raw multi-coil k-space (IXI pairs are made by truncation too).",
        ),
        TaskSpec(
            "ct_low_dose",
            "medical",
            ct_low_dose,
            "low-dose CT: Poisson projection noise (I0 1e4-5e4 photons/ray) and FBP reconstruction (grayscale)",
            "Simulated parallel-beam low dose on an image read as an attenuation map; not AAPM-Mayo scanner data "
            "(fan/helical geometry, real quarter-dose projections, calibrated HU).",
        ),
        TaskSpec(
            "pet_low_count",
            "medical",
            pet_low_count,
            "low-count PET: Poisson/Binomial count thinning to 5-25% in image space (grayscale)",
            "Simulated, not real PET: image-space Poisson thinning of an activity-like image, no sinogram, "
            "attenuation, scatter or iterative reconstruction (the paper uses PolarStar m660 scans).",
        ),
        TaskSpec(
            "rs_sr_x4",
            "remote_sensing",
            sr_x4,
            "remote-sensing 4x super-resolution (as sr_x4)",
            "Synthetic like the paper's (UCMerced LR is bicubic); Pillow bicubic, not MATLAB's.",
        ),
        TaskSpec(
            "cloud",
            "remote_sensing",
            cloud,
            "cloud removal: fractal cloud opacity with cast shadows",
            "Simulated procedural clouds; CUHK-CR1 pairs are real cloudy/clear acquisitions.",
        ),
        TaskSpec(
            "haze",
            "remote_sensing",
            haze,
            "dehazing: atmospheric scattering with a smooth random depth field",
            "Simulated scattering model; RICE1 pairs are real hazy/clear acquisitions.",
        ),
        TaskSpec(
            "denoise_15",
            "natural",
            _denoise(15),
            "Gaussian denoising, sigma 15/255",
            "Standard synthetic protocol (not one of the paper's 9 tasks).",
        ),
        TaskSpec(
            "denoise_25",
            "natural",
            _denoise(25),
            "Gaussian denoising, sigma 25/255",
            "Standard synthetic protocol (not one of the paper's 9 tasks).",
        ),
        TaskSpec(
            "denoise_50",
            "natural",
            _denoise(50),
            "Gaussian denoising, sigma 50/255",
            "Standard synthetic protocol (not one of the paper's 9 tasks).",
        ),
        TaskSpec(
            "low_light",
            "natural",
            low_light,
            "low-light enhancement: gamma darkening, reduced exposure, Poisson-Gaussian noise",
            "Simulated; LOL-style datasets have real low/normal-light pairs (not one of the paper's 9 tasks).",
        ),
        TaskSpec(
            "jpeg",
            "natural",
            jpeg,
            "JPEG artifact removal: Pillow JPEG round trip, quality 10-40",
            "Standard synthetic protocol (not one of the paper's 9 tasks).",
        ),
    )
}

PAPER_TASKS_9: tuple[str, ...] = (
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
PAPER_TASKS_6: tuple[str, ...] = tuple(
    name for domain in _DOMAINS for name in [t for t in PAPER_TASKS_9 if TASKS[t].domain == domain][:2]
)
EXTRA_TASKS: tuple[str, ...] = tuple(name for name in TASKS if name not in PAPER_TASKS_9)
GRAYSCALE_ONLY_TASKS: frozenset[str] = frozenset({"mri_sr_x4", "ct_low_dose", "pet_low_count"})
DETERMINISTIC_TASKS: frozenset[str] = frozenset({"sr_x4", "rs_sr_x4", "mri_sr_x4"})


def _accepted_overrides(fn: Callable[..., Any]) -> list[str]:
    names = [p.name for p in inspect.signature(fn).parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY]
    if fn is motion_deblur:
        names += [p for p in inspect.signature(motion_kernel).parameters if p != "rng"]
    return names


def degrade(task: str, clean: np.ndarray, seed: int, **overrides: Any) -> tuple[np.ndarray, dict]:
    """Degrade ``clean`` with the registered ``task`` using ``np.random.default_rng(seed)``.

    Returns ``(degraded, params)``: ``degraded`` float32, same shape, in [0, 1]; ``params`` JSON-serialisable, with
    ``task``, ``domain``, ``seed`` and ``synthesis_version`` besides the task's own parameters. Raises ``ValueError``
    for an unknown task, a bad seed, an unknown override or an unusable image (the message says how to fix it).
    """
    if task not in TASKS:
        raise ValueError(f"unknown degradation task {task!r}; valid tasks: {', '.join(TASKS)}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"{task}: seed must be a non-negative int, got {seed!r}")
    spec = TASKS[task]
    accepted = _accepted_overrides(spec.fn)
    unknown = sorted(set(overrides) - set(accepted))
    if unknown:
        raise ValueError(f"{task}: unknown override(s) {unknown}; accepted: {', '.join(accepted)}")
    _validate(clean, task, grayscale_only=task in GRAYSCALE_ONLY_TASKS)
    out, params = spec.fn(clean, np.random.default_rng(int(seed)), **overrides)
    record = {"task": task, "domain": spec.domain, "seed": int(seed), "synthesis_version": SYNTHESIS_VERSION}
    record.update(_jsonable(params))
    return out, record
