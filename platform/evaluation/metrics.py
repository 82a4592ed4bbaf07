"""PSNR and SSIM for image restoration, under an explicit, recordable evaluation protocol.

The paper's protocol (:data:`PAPER`): RGB in [0, 1], clamped and quantised to uint8 (``round(x * 255)``), data
range 255, no border crop, all three RGB channels (no Y channel), one value per image; averaging over a task's
images happens elsewhere. Other published numbers often use the BT.601 Y channel and/or a border crop, so both are
options, and :meth:`MetricProtocol.describe` gives a string to store next to results so numbers are never compared
across protocols by accident.

Both metrics are vectorised over a batch of ``(B, C, H, W)`` float tensors in [0, 1] and return a ``(B,)`` float64
tensor. They are evaluation metrics, not losses: inputs are detached and (by default) rounded, so no gradient flows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from datprl.platform.data.conventions import CT_EVAL_WINDOW, CT_OFFSET

__all__ = ["MetricProtocol", "PAPER", "psnr", "selection_nmi", "ssim"]

_L = 255.0  # data range: metrics are computed on the 0-255 scale, as for uint8 images
_WIN, _SIGMA = 11, 1.5  # Wang et al. / basicsr SSIM window; skimage's sigma=1.5 with truncate=3.5 gives 11 taps too
_C1, _C2 = (0.01 * _L) ** 2, (0.03 * _L) ** 2
# ITU-R BT.601 luma on [0, 1] RGB, giving Y in [16, 235] (basicsr rgb2ycbcr(y_only=True), to_y_channel).
_Y_WEIGHTS = (65.481, 128.553, 24.966)


@dataclass(frozen=True)
class MetricProtocol:
    """How images are prepared before PSNR/SSIM.

    Attributes:
        quantize: round to uint8 levels (``round(clamp(x, 0, 1) * 255)``), as when restored images are saved as
            8-bit files. With ``False`` the clamped values are only scaled by 255 (no rounding).
        y_channel: compare the BT.601 luma ``Y = 16 + 65.481 R + 128.553 G + 24.966 B`` (RGB in [0, 1], Y on the
            0-255 scale, not re-rounded, as basicsr) instead of the RGB channels. A 1-channel image is already
            grey, so its channel is used as is.
        crop_border: pixels removed from each of the four sides before computing the metric.
    """

    quantize: bool = True
    y_channel: bool = False
    crop_border: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.crop_border, int) or self.crop_border < 0:
            raise ValueError(f"crop_border must be a non-negative int (pixels per side); got {self.crop_border!r}")

    def describe(self) -> str:
        """One-line, human-readable statement of the protocol, meant to be stored with the results."""
        return (
            "PSNR/SSIM per image, inputs clamped to [0,1], "
            + ("quantised to uint8 (round(x*255))" if self.quantize else "scaled by 255 without rounding")
            + ", data range 255, "
            + ("BT.601 Y channel (16-235)" if self.y_channel else "RGB channels (no Y)")
            + f", crop_border={self.crop_border}; SSIM: {_WIN}x{_WIN} Gaussian window sigma={_SIGMA}, valid filtering, "
            "C1=(0.01*255)^2, C2=(0.03*255)^2, mean over map and channels"
        )


PAPER = MetricProtocol()
"""The paper's protocol: uint8-quantised RGB, no Y channel, no border crop."""


def _prepare(pred: torch.Tensor, target: torch.Tensor, protocol: MetricProtocol, min_size: int = 1):
    """Validate inputs and return both images as float64 on the 0-255 scale, cropped / converted to Y."""
    for name, x in (("pred", pred), ("target", target)):
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{name} must be a 4-D (B, C, H, W) tensor; got {shape}. Add a batch dim with x[None].")
        if not x.is_floating_point():
            raise ValueError(f"{name} must be a float tensor in [0, 1]; got dtype {x.dtype}. Use x.float() / 255.")
    if pred.shape != target.shape:
        raise ValueError(
            f"pred and target shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}; "
            "resize or crop them to the same (B, C, H, W)."
        )
    c, h, w = pred.shape[1:]
    b = protocol.crop_border
    if h - 2 * b < min_size or w - 2 * b < min_size:
        raise ValueError(
            f"image {h}x{w} with crop_border={b} leaves {h - 2 * b}x{w - 2 * b} pixels, fewer than the "
            f"{min_size}x{min_size} needed; use larger images or a smaller crop_border."
        )
    if protocol.y_channel and c not in (1, 3):
        raise ValueError(f"y_channel=True needs RGB (C=3) or grey (C=1) images; got C={c}. Use y_channel=False.")

    out = []
    for x in (pred, target):
        # float64 throughout: exact integer levels after rounding and no float32 drift in the SSIM statistics.
        x = x.detach().to(torch.float64).clamp(0.0, 1.0) * _L
        if protocol.quantize:
            x = x.round()  # half-to-even, like torch/numpy rounding used when saving images
        if b:
            x = x[..., b : h - b, b : w - b]
        if protocol.y_channel and c == 3:
            wy = x.new_tensor(_Y_WEIGHTS).view(1, 3, 1, 1)
            x = (x * wy).sum(1, keepdim=True) / _L + 16.0  # weights are for [0,1] RGB, hence the / 255
        out.append(x)
    return out


def psnr(pred: torch.Tensor, target: torch.Tensor, protocol: MetricProtocol = PAPER) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB, per image: ``10 log10(255^2 / MSE)`` with the MSE over all pixels/channels.

    Args:
        pred, target: ``(B, C, H, W)`` float tensors in [0, 1].
        protocol: preparation of the images; the paper's by default.

    Returns:
        ``(B,)`` float64 tensor. Identical (prepared) images have MSE 0 and give ``+inf``, never NaN; under the
        paper protocol this includes any difference smaller than half a uint8 level. Averaging over a task must
        therefore handle ``inf`` (e.g. report how many images are exact).
    """
    x, y = _prepare(pred, target, protocol)
    mse = (x - y).pow(2).flatten(1).mean(1)
    return 10.0 * torch.log10(_L**2 / mse)  # float64 division by 0 gives +inf, log10(inf) = inf


def _gaussian_1d(device: torch.device) -> torch.Tensor:
    # Same normalised taps as cv2.getGaussianKernel(11, 1.5) and scipy's gaussian_filter(sigma=1.5, truncate=3.5).
    t = torch.arange(_WIN, dtype=torch.float64, device=device) - (_WIN - 1) / 2
    g = torch.exp(-(t**2) / (2 * _SIGMA**2))
    return g / g.sum()


def ssim(pred: torch.Tensor, target: torch.Tensor, protocol: MetricProtocol = PAPER) -> torch.Tensor:
    """Structural similarity (Wang et al., 2004) per image, as basicsr's ``calculate_ssim``.

    11x11 Gaussian window (sigma 1.5), valid filtering (no padding: the map is ``(H-10) x (W-10)``), population
    (co)variances, ``C1 = (0.01 L)^2``, ``C2 = (0.03 L)^2`` with ``L = 255``; the mean of the SSIM map per channel,
    then the mean over channels. On the prepared (e.g. uint8) images this equals
    ``skimage.metrics.structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
    data_range=255, channel_axis=-1)`` (skimage filters with reflect padding but then discards the 5-pixel border
    of the map, which is exactly the valid region); ``tests/test_metrics.py`` checks this on real images.

    Args:
        pred, target: ``(B, C, H, W)`` float tensors in [0, 1], at least 11x11 after ``protocol.crop_border``.
        protocol: preparation of the images; the paper's by default.

    Returns:
        ``(B,)`` float64 tensor; 1 for identical prepared images.
    """
    x, y = _prepare(pred, target, protocol, min_size=_WIN)
    c = x.shape[1]
    # All five local statistics in one grouped, separable convolution: channels [x, y, x^2, y^2, xy] x C.
    stats = torch.cat([x, y, x * x, y * y, x * y], dim=1)
    g = _gaussian_1d(x.device)
    n = 5 * c
    stats = F.conv2d(stats, g.view(1, 1, _WIN, 1).expand(n, 1, _WIN, 1), groups=n)
    stats = F.conv2d(stats, g.view(1, 1, 1, _WIN).expand(n, 1, 1, _WIN), groups=n)
    mu_x, mu_y, e_xx, e_yy, e_xy = stats.split(c, dim=1)
    var_x, var_y, cov = e_xx - mu_x**2, e_yy - mu_y**2, e_xy - mu_x * mu_y
    smap = ((2 * mu_x * mu_y + _C1) * (2 * cov + _C2)) / ((mu_x**2 + mu_y**2 + _C1) * (var_x + var_y + _C2))
    return smap.flatten(1).mean(1)  # equal-size maps, so the mean over all = mean of per-channel means


def selection_nmi(counts_by_label: dict[str, list[int]]) -> float | None:
    """How much the selected prompts say about a label: I(label; prompt) / H(label), from the number of times each
    prompt was selected for each label (one row per label, one column per prompt; every image adds its top-k).

    0 when the pool selects the same prompts whatever the label (the collapse the domain-aware prompts of the paper,
    arXiv 2603.01725 Sec. 3, are meant to avoid), 1 when the selection determines the label. None when it is
    undefined: fewer than two labels with selections (H(label) = 0).
    """
    import numpy as np

    table = np.asarray([row for row in counts_by_label.values() if sum(row) > 0], dtype=np.float64)
    if table.ndim != 2 or table.shape[0] < 2:
        return None
    joint = table / table.sum()
    p_label, p_prompt = joint.sum(axis=1, keepdims=True), joint.sum(axis=0, keepdims=True)
    nonzero = joint > 0
    mutual = float((joint[nonzero] * np.log(joint[nonzero] / (p_label @ p_prompt)[nonzero])).sum())
    entropy = float(-(p_label[p_label > 0] * np.log(p_label[p_label > 0])).sum())
    return max(0.0, min(1.0, mutual / entropy))


def ct_hu_metrics(
    pred: torch.Tensor, target: torch.Tensor, white: float, window: tuple[float, float] = CT_EVAL_WINDOW
) -> tuple[float, float]:
    """(MAE in HU over the whole image, PSNR in dB over ``window``) of one CT image pair in model units.

    ``pred`` and ``target`` are in [0, 1] (stored value / ``white``; ``pred`` is clamped there first), so
    ``HU = x * white - CT_OFFSET`` (the corpus' CT storage convention). The PSNR clips both to the HU window and uses
    its width as the data range; it is infinite when they agree exactly inside the window."""
    to_hu = lambda x: x.double().clamp(0, 1) * white - CT_OFFSET  # noqa: E731
    pred_hu, target_hu = to_hu(pred), to_hu(target)
    mae = float((pred_hu - target_hu).abs().mean())
    low, high = window
    mse = float((pred_hu.clamp(low, high) - target_hu.clamp(low, high)).pow(2).mean())
    return mae, (math.inf if mse == 0 else 10 * math.log10((high - low) ** 2 / mse))
