"""datprl.platform.evaluation.metrics against scikit-image on real (degraded) images shipped in scikit-image's wheel."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter
from skimage import data
from skimage.metrics import peak_signal_noise_ratio as sk_psnr
from skimage.metrics import structural_similarity as sk_ssim_raw

from datprl.platform.data.conventions import CT_EVAL_WINDOW
from datprl.platform.evaluation.metrics import PAPER, MetricProtocol, ct_hu_metrics, psnr, ssim

H, W = 128, 160  # crop keeps the tests fast
PSNR_TOL, SSIM_TOL = 1e-4, 1e-5


def sk_ssim(a: np.ndarray, b: np.ndarray) -> float:
    """skimage SSIM with the flags that reproduce Wang et al. / basicsr (see ssim's docstring)."""
    return sk_ssim_raw(
        a,
        b,
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
        data_range=255,
        channel_axis=-1 if a.ndim == 3 else None,
    )


def to_uint8(x: np.ndarray) -> np.ndarray:
    """The paper's quantisation, written independently of the module: round(clip(x, 0, 1) * 255)."""
    return np.round(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)


def to_y(u8: np.ndarray) -> np.ndarray:
    """BT.601 luma as basicsr's rgb2ycbcr(y_only=True), on the 0-255 scale, not re-rounded."""
    rgb = u8.astype(np.float64) / 255.0
    return 16.0 + rgb @ np.array([65.481, 128.553, 24.966])


def tensor(x: np.ndarray) -> torch.Tensor:
    """(H, W, C) or (H, W) float array -> (1, C, H, W) float64 tensor."""
    x = x[..., None] if x.ndim == 2 else x
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))[None]


def _pairs():
    """(name, clean, degraded) float64 images in [0, 1] (degraded ones go a little out of range: clamp is tested)."""
    rng = np.random.default_rng(0)
    out = []
    for name, img in (("astronaut", data.astronaut()), ("coffee", data.coffee()), ("chelsea", data.chelsea())):
        clean = img[:H, :W].astype(np.float64) / 255.0
        noisy = clean + rng.normal(0.0, 0.05, clean.shape)
        blurred = gaussian_filter(clean, sigma=(1.2, 1.2, 0))
        out += [(f"{name}-noise", clean, noisy), (f"{name}-blur", clean, blurred)]
    return out


PAIRS = _pairs()
IDS = [p[0] for p in PAIRS]


@pytest.mark.parametrize("name,clean,deg", PAIRS, ids=IDS)
def test_paper_protocol_matches_skimage(name, clean, deg):
    a, b = to_uint8(deg), to_uint8(clean)
    p, s = psnr(tensor(deg), tensor(clean)), ssim(tensor(deg), tensor(clean))
    assert p.shape == s.shape == (1,) and p.dtype == s.dtype == torch.float64
    assert abs(p.item() - sk_psnr(b, a, data_range=255)) < PSNR_TOL
    assert abs(s.item() - sk_ssim(a, b)) < SSIM_TOL


@pytest.mark.parametrize("name,clean,deg", PAIRS[:2], ids=IDS[:2])
def test_y_channel_matches_skimage_on_independent_y(name, clean, deg):
    ya, yb = to_y(to_uint8(deg)), to_y(to_uint8(clean))
    assert 16.0 <= ya.min() and ya.max() <= 235.0
    proto = MetricProtocol(y_channel=True)
    assert abs(psnr(tensor(deg), tensor(clean), proto).item() - sk_psnr(yb, ya, data_range=255)) < PSNR_TOL
    assert abs(ssim(tensor(deg), tensor(clean), proto).item() - sk_ssim(ya, yb)) < SSIM_TOL


@pytest.mark.parametrize("crop", [4, 16])
def test_crop_border_matches_skimage_on_cropped_arrays(crop):
    _, clean, deg = PAIRS[2]
    a, b = to_uint8(deg)[crop:-crop, crop:-crop], to_uint8(clean)[crop:-crop, crop:-crop]
    proto = MetricProtocol(crop_border=crop)
    assert abs(psnr(tensor(deg), tensor(clean), proto).item() - sk_psnr(b, a, data_range=255)) < PSNR_TOL
    assert abs(ssim(tensor(deg), tensor(clean), proto).item() - sk_ssim(a, b)) < SSIM_TOL


def test_y_channel_and_crop_combined():
    _, clean, deg = PAIRS[4]
    ya, yb = to_y(to_uint8(deg))[8:-8, 8:-8], to_y(to_uint8(clean))[8:-8, 8:-8]
    proto = MetricProtocol(y_channel=True, crop_border=8)
    assert abs(psnr(tensor(deg), tensor(clean), proto).item() - sk_psnr(yb, ya, data_range=255)) < PSNR_TOL
    assert abs(ssim(tensor(deg), tensor(clean), proto).item() - sk_ssim(ya, yb)) < SSIM_TOL


def test_unquantised_matches_skimage_on_float_arrays():
    _, clean, deg = PAIRS[1]
    a, b = np.clip(deg, 0, 1) * 255.0, clean * 255.0
    proto = MetricProtocol(quantize=False)
    assert abs(psnr(tensor(deg), tensor(clean), proto).item() - sk_psnr(b, a, data_range=255)) < PSNR_TOL
    assert abs(ssim(tensor(deg), tensor(clean), proto).item() - sk_ssim(a, b)) < SSIM_TOL


def test_grayscale_and_y_channel_on_grey_uses_the_channel():
    _, clean, deg = PAIRS[0]
    g_clean, g_deg = clean[..., 1], deg[..., 1]  # a real one-channel image
    a, b = to_uint8(g_deg), to_uint8(g_clean)
    for proto in (PAPER, MetricProtocol(y_channel=True)):
        assert abs(psnr(tensor(g_deg), tensor(g_clean), proto).item() - sk_psnr(b, a, data_range=255)) < PSNR_TOL
        assert abs(ssim(tensor(g_deg), tensor(g_clean), proto).item() - sk_ssim(a, b)) < SSIM_TOL


def test_batch_equals_per_image_and_float32_input():
    picks = [PAIRS[0], PAIRS[3]]
    pred = torch.cat([tensor(d) for _, _, d in picks])
    target = torch.cat([tensor(c) for _, c, _ in picks])
    for fn in (psnr, ssim):
        batch = fn(pred, target)
        assert batch.shape == (2,)
        single = torch.cat([fn(pred[i : i + 1], target[i : i + 1]) for i in range(2)])
        torch.testing.assert_close(batch, single, rtol=0, atol=1e-12)
        # float32 inputs (the model's dtype) are upcast internally; only the .5-level rounding ties could differ.
        torch.testing.assert_close(fn(pred.float(), target.float()), batch, rtol=0, atol=1e-3)


def test_identical_images_give_inf_psnr_and_ssim_one():
    _, clean, _ = PAIRS[0]
    x = tensor(clean)
    p, s = psnr(x, x.clone()), ssim(x, x.clone())
    assert math.isinf(p.item()) and p.item() > 0 and not torch.isnan(p).any()
    assert abs(s.item() - 1.0) < 1e-12


def test_quantisation_matters():
    _, clean, _ = PAIRS[0]
    exact = tensor(to_uint8(clean).astype(np.float64) / 255.0)  # on the uint8 grid
    nudged = exact + 0.3 / 255.0  # less than half a level: rounds back to the same uint8 image
    assert math.isinf(psnr(nudged, exact).item())
    assert abs(ssim(nudged, exact).item() - 1.0) < 1e-12
    unq = psnr(nudged, exact, MetricProtocol(quantize=False)).item()
    assert math.isfinite(unq) and unq > 50


def test_describe_records_the_protocol():
    d = PAPER.describe()
    assert "quantised to uint8" in d and "no Y" in d and "crop_border=0" in d
    d2 = MetricProtocol(quantize=False, y_channel=True, crop_border=4).describe()
    assert "without rounding" in d2 and "Y channel" in d2 and "crop_border=4" in d2


@pytest.mark.parametrize(
    "pred,target,proto,fn,match",
    [
        (torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 31), PAPER, psnr, "shapes differ"),
        (torch.rand(3, 32, 32), torch.rand(3, 32, 32), PAPER, ssim, "4-D"),
        (torch.rand(1, 3, 10, 32), torch.rand(1, 3, 10, 32), PAPER, ssim, "11x11"),
        (torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32), MetricProtocol(crop_border=11), ssim, "crop_border=11"),
        (torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8), MetricProtocol(crop_border=4), psnr, "smaller crop_border"),
        (torch.randint(0, 255, (1, 3, 16, 16), dtype=torch.uint8),) * 2 + (PAPER, psnr, "float tensor"),
        (torch.rand(1, 4, 16, 16), torch.rand(1, 4, 16, 16), MetricProtocol(y_channel=True), psnr, "C=4"),
    ],
)
def test_bad_input_raises_clear_value_error(pred, target, proto, fn, match):
    with pytest.raises(ValueError, match=match):
        fn(pred, target, proto)


def test_negative_crop_border_rejected():
    with pytest.raises(ValueError, match="non-negative"):
        MetricProtocol(crop_border=-1)


def test_selection_nmi_bounds_and_known_values():
    from datprl.platform.evaluation.metrics import selection_nmi

    # every label selects the same prompts: the selection says nothing about the label
    assert selection_nmi({"ct": [4, 4, 0], "haze": [2, 2, 0], "sr": [6, 6, 0]}) == pytest.approx(0.0, abs=1e-12)
    # disjoint prompts per label: the selection determines the label
    assert selection_nmi({"ct": [3, 3, 0, 0], "haze": [0, 0, 5, 5]}) == pytest.approx(1.0)
    # two equally likely labels sharing one of their two prompts: I = 0.5 log 2, H(label) = log 2
    value = selection_nmi({"a": [1, 1, 0], "b": [0, 1, 1]})
    assert value == pytest.approx(0.5)
    assert selection_nmi({"only": [3, 1]}) is None and selection_nmi({"a": [2, 0], "b": [0, 0]}) is None


def test_ct_hu_metrics_read_hounsfield_units_back_and_use_the_window():
    white = 4095.0
    hu = torch.tensor([[-1000.0, 0.0], [40.0, 1000.0]])
    target = (hu + 1024) / white
    assert ct_hu_metrics(target, target, white) == (0.0, math.inf)
    shifted = (hu + 10 + 1024) / white  # +10 HU everywhere
    mae, window_psnr = ct_hu_metrics(shifted, target, white)
    assert mae == pytest.approx(10.0, abs=1e-6)
    # inside [-160, 240] only the 0 and 40 HU pixels differ (by 10); -1000 and 1000 clip to the window's ends
    low, high = CT_EVAL_WINDOW
    assert window_psnr == pytest.approx(10 * math.log10((high - low) ** 2 / (2 * 100 / 4)), abs=1e-6)
    # the prediction is clamped to the stored range first: below 0 reads as -1024 HU (air)
    mae_clamped, _ = ct_hu_metrics(torch.full((2, 2), -0.5), torch.zeros(2, 2), white)
    assert mae_clamped == 0.0
