"""The ``metadata`` describer: one text description per clean source image, composed without a multimodal LLM.

The paper (arXiv 2603.01725, Sec. 3) has a frozen multimodal LLM describe every clean training image from several
angles -- content, colour, objects, brightness, viewpoint -- for example "a bird's-eye view of many buildings in a
city with relatively low brightness" or "a black and white photo with a close up view of the brain". No model hub is
reachable here, so the embedded default composes descriptions in that style from what is known without one:

* the sample record: domain, modality/sensor (CT, MRI, PET, satellite, aerial, photo, ...; from ``modality``, else
  from the task name, else from the domain), bit depth and grey/RGB storage, source package (name, no version);
* measured statistics of the clean image (:func:`image_stats`): brightness, contrast, colourfulness, edge density and
  dominant colour names, turned into words by the fixed thresholds below.

The result is deterministic: the same record and image always give the same text (:data:`TEMPLATE_VERSION` names the
template; change it whenever the words or thresholds change, so that stored descriptions are not mixed).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from datprl.platform.data.conventions import white_level

__all__ = [
    "DESCRIBER",
    "TEMPLATE_VERSION",
    "ImageStats",
    "brightness_words",
    "colour_words",
    "contrast_words",
    "describe",
    "detail_words",
    "dominant_colours",
    "image_stats",
    "modality_words",
]

DESCRIBER = "metadata"
TEMPLATE_VERSION = "metadata-v1"

# --- word thresholds (all statistics on the image normalised to [0, 1] by its white level) ------------------------

#: Mean luma (Rec. 601 weights) -> brightness words: below each bound, the word next to it.
BRIGHTNESS_WORDS: tuple[tuple[float, str], ...] = (
    (0.20, "very low brightness"),
    (0.40, "relatively low brightness"),
    (0.60, "moderate brightness"),
    (0.80, "relatively high brightness"),
    (float("inf"), "very high brightness"),
)
#: Standard deviation of luma -> contrast words.
CONTRAST_WORDS: tuple[tuple[float, str], ...] = (
    (0.08, "low contrast"),
    (0.20, "moderate contrast"),
    (float("inf"), "high contrast"),
)
#: Hasler-Suesstrunk colourfulness M (on the 0-255 scale of their paper, whose perceptual anchors are 15 "slightly",
#: 33 "moderately", 59 "quite", 82 "highly" colourful) -> colour words. Grey images (one channel, or M below
#: :data:`GREY_COLOURFULNESS`) are "black and white".
COLOUR_WORDS: tuple[tuple[float, str], ...] = (
    (15.0, "muted colour"),
    (33.0, "slightly colourful"),
    (59.0, "moderately colourful"),
    (82.0, "quite colourful"),
    (float("inf"), "highly colourful"),
)
GREY_COLOURFULNESS = 2.0
#: Fraction of pixels whose Sobel gradient magnitude of luma exceeds :data:`EDGE_THRESHOLD` -> detail words.
EDGE_THRESHOLD = 0.25
DETAIL_WORDS: tuple[tuple[float, str], ...] = (
    (0.03, "smooth regions with little fine detail"),
    (0.12, "some edges and fine structure"),
    (float("inf"), "dense edges and fine texture"),
)
#: A colour name is dominant when it covers at least this share of the pixels; at most :data:`MAX_COLOURS` are named.
DOMINANT_SHARE = 0.15
MAX_COLOURS = 2
# Colour naming per pixel (HSV): value below DARK is black; saturation below ACHROMATIC is grey or white (value
# above LIGHT); otherwise the hue bin, where dark oranges and reds (value below BROWN_VALUE) are brown.
DARK, ACHROMATIC, LIGHT, BROWN_VALUE = 0.15, 0.20, 0.85, 0.60
#: Hue bins (upper bound in degrees, name), in order; the last bin wraps round to red.
HUE_NAMES: tuple[tuple[float, str], ...] = (
    (15.0, "red"),
    (45.0, "orange"),
    (70.0, "yellow"),
    (160.0, "green"),
    (200.0, "cyan"),
    (260.0, "blue"),
    (290.0, "purple"),
    (335.0, "pink"),
    (360.0, "red"),
)

# modality (SampleRecord.modality) -> (noun, view). The view gives the paper's "viewpoint" angle.
MODALITIES: dict[str, tuple[str, str | None]] = {
    "photo": ("photo", None),
    "astronomy": ("astronomical photo", "a telescope view of the sky"),
    "fundus": ("fundus photo", "a close up view of the retina"),
    "microscopy": ("microscopy image", "a magnified view of stained tissue"),
    "ct": ("CT scan", "a cross-sectional view of the body"),
    "ct_perfusion": ("CT perfusion map", "a cross-sectional view of blood flow"),
    "mr": ("MRI scan", "a cross-sectional view of the anatomy"),
    "pet": ("PET scan", "a cross-sectional view of tracer uptake"),
    "nm": ("nuclear medicine scan", "a view of tracer uptake"),
    "sentinel2_rgb": ("Sentinel-2 satellite image", "a bird's-eye view of the land"),
    "satellite": ("satellite image", "a bird's-eye view of the land"),
    "aerial": ("aerial photo", "a bird's-eye view from above"),
}
# Task-name prefixes that name a modality (for records without ``modality``).
TASK_MODALITIES: tuple[tuple[str, str], ...] = (("ct_", "ct"), ("mri_", "mr"), ("pet_", "pet"))
DOMAIN_FALLBACK: dict[str, tuple[str, str | None]] = {
    "natural": ("photo", None),
    "medical": ("medical scan", "a cross-sectional view"),
    "remote_sensing": ("remote sensing image", "a bird's-eye view of the land"),
}


@dataclass(frozen=True)
class ImageStats:
    """Measured statistics of one clean image, normalised to [0, 1]: ``brightness`` (mean luma), ``contrast`` (luma
    standard deviation), ``colourfulness`` (Hasler-Suesstrunk M, 0-255 scale; 0 for one channel), ``edge_density``
    (share of pixels with Sobel magnitude above :data:`EDGE_THRESHOLD`), ``colours`` (dominant colour names, most
    frequent first) and ``grey`` (one channel or no measurable colour)."""

    brightness: float
    contrast: float
    colourfulness: float
    edge_density: float
    colours: tuple[str, ...]
    grey: bool


def _pick(value: float, table: tuple[tuple[float, str], ...]) -> str:
    for bound, word in table:
        if value < bound:
            return word
    return table[-1][1]


def _unit(image: np.ndarray, white: float) -> np.ndarray:
    """Stored-depth image (H, W) or (H, W, C) -> float32 in [0, 1], (H, W) or (H, W, 3)."""
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] != 3) or min(array.shape[:2]) < 1:
        raise ValueError(f"expected a grey (H, W) or RGB (H, W, 3) image, got shape {array.shape}")
    if white <= 0:
        raise ValueError(f"white level must be positive, got {white}")
    return np.clip(array.astype(np.float32) / np.float32(white), 0.0, 1.0)


def _sobel_magnitude(luma: np.ndarray) -> np.ndarray:
    padded = np.pad(luma, 1, mode="edge")
    gx = (padded[:-2, 2:] + 2 * padded[1:-1, 2:] + padded[2:, 2:]) - (
        padded[:-2, :-2] + 2 * padded[1:-1, :-2] + padded[2:, :-2]
    )
    gy = (padded[2:, :-2] + 2 * padded[2:, 1:-1] + padded[2:, 2:]) - (
        padded[:-2, :-2] + 2 * padded[:-2, 1:-1] + padded[:-2, 2:]
    )
    return np.hypot(gx, gy) / 4.0  # a unit step gives magnitude 1


def _colour_names(rgb: np.ndarray) -> np.ndarray:
    """Per-pixel colour names of an RGB image in [0, 1] (object array of the same H x W)."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    value = rgb.max(axis=-1)
    chroma = value - rgb.min(axis=-1)
    saturation = np.where(value > 0, chroma / np.maximum(value, 1e-6), 0.0)
    safe = np.maximum(chroma, 1e-6)
    hue = np.where(value == r, ((g - b) / safe) % 6.0, np.where(value == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0))
    hue = hue * 60.0
    bounds = np.array([bound for bound, _ in HUE_NAMES])
    names = np.array([name for _, name in HUE_NAMES], dtype=object)[
        np.minimum(np.searchsorted(bounds, hue, "right"), len(HUE_NAMES) - 1)
    ]
    names = np.where(np.isin(names, ["orange", "red"]) & (value < BROWN_VALUE), "brown", names)
    names = np.where(saturation < ACHROMATIC, np.where(value > LIGHT, "white", "grey"), names)
    return np.where(value < DARK, "black", names)


def dominant_colours(rgb: np.ndarray) -> tuple[str, ...]:
    """Colour names covering at least :data:`DOMINANT_SHARE` of an RGB image in [0, 1], most frequent first (ties by
    name), at most :data:`MAX_COLOURS`."""
    names, counts = np.unique(_colour_names(rgb).ravel().astype(str), return_counts=True)
    shares = counts / counts.sum()
    ranked = sorted(zip(names.tolist(), shares.tolist()), key=lambda item: (-item[1], item[0]))
    return tuple(name for name, share in ranked if share >= DOMINANT_SHARE)[:MAX_COLOURS]


def image_stats(image: np.ndarray, white: float) -> ImageStats:
    """Statistics of a clean image at its stored depth (``white``: the stored value of full brightness)."""
    unit = _unit(image, white)
    if unit.ndim == 2:
        luma, colourfulness, colours = unit, 0.0, ()
    else:
        r, g, b = unit[..., 0] * 255.0, unit[..., 1] * 255.0, unit[..., 2] * 255.0
        rg, yb = r - g, 0.5 * (r + g) - b
        colourfulness = float(np.hypot(rg.std(), yb.std()) + 0.3 * np.hypot(rg.mean(), yb.mean()))
        luma = 0.299 * unit[..., 0] + 0.587 * unit[..., 1] + 0.114 * unit[..., 2]
        colours = dominant_colours(unit)
    grey = unit.ndim == 2 or colourfulness < GREY_COLOURFULNESS
    edges = float((_sobel_magnitude(luma) > EDGE_THRESHOLD).mean())
    return ImageStats(
        brightness=float(luma.mean()),
        contrast=float(luma.std()),
        colourfulness=colourfulness,
        edge_density=edges,
        colours=() if grey else colours,
        grey=grey,
    )


def brightness_words(stats: ImageStats) -> str:
    """Brightness phrase from :data:`BRIGHTNESS_WORDS`."""
    return _pick(stats.brightness, BRIGHTNESS_WORDS)


def contrast_words(stats: ImageStats) -> str:
    """Contrast phrase from :data:`CONTRAST_WORDS`."""
    return _pick(stats.contrast, CONTRAST_WORDS)


def colour_words(stats: ImageStats) -> str:
    """ "black and white" for grey images, else the phrase of :data:`COLOUR_WORDS`."""
    return "black and white" if stats.grey else _pick(stats.colourfulness, COLOUR_WORDS)


def detail_words(stats: ImageStats) -> str:
    """Edge-density phrase from :data:`DETAIL_WORDS`."""
    return _pick(stats.edge_density, DETAIL_WORDS)


def _field(record: Any, name: str) -> Any:
    return record.get(name) if isinstance(record, Mapping) else getattr(record, name, None)


def modality_words(record: Any) -> tuple[str, str | None]:
    """(noun, view) for a sample record (a SampleRecord or a mapping with its fields): from ``modality`` when it is
    known, else from the task name (``ct_*``, ``mri_*``, ``pet_*``), else from the domain."""
    modality = _field(record, "modality")
    if modality in MODALITIES:
        return MODALITIES[modality]
    task = str(_field(record, "task") or "")
    for prefix, name in TASK_MODALITIES:
        if task.startswith(prefix):
            return MODALITIES[name]
    domain = _field(record, "domain")
    if domain not in DOMAIN_FALLBACK:
        raise ValueError(f"unknown domain {domain!r}: expected one of {sorted(DOMAIN_FALLBACK)}")
    return DOMAIN_FALLBACK[domain]


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def describe(record: Any, gt: np.ndarray) -> str:
    """One description of a clean image in the paper's style, e.g. "a black and white MRI scan with a cross-sectional
    view of the anatomy, with very low brightness, high contrast and smooth regions with little fine detail (16-bit
    grayscale, from nilearn)". ``record``: its SampleRecord (or a mapping with ``domain``, ``task``, ``modality``,
    ``bit_depth``, ``white_level``, ``source_package``); ``gt``: the clean image at its stored depth."""
    bit_depth = int(_field(record, "bit_depth") or 8)
    stats = image_stats(gt, white_level(_field(record, "white_level"), bit_depth=bit_depth))
    noun, view = modality_words(record)
    colour = colour_words(stats)
    text = f"{_article(colour)} {colour} {noun}"
    if view:
        text += f" with {view}"
    if stats.colours:
        text += ", mostly " + " and ".join(stats.colours)
    text += f", with {brightness_words(stats)}, {contrast_words(stats)} and {detail_words(stats)}"
    storage = "grayscale" if np.asarray(gt).ndim == 2 or np.asarray(gt).shape[-1] == 1 else "RGB"
    package = str(_field(record, "source_package") or "").split("==")[0].strip()
    text += f" ({bit_depth}-bit {storage}" + (f", from {package})" if package else ")")
    return text
