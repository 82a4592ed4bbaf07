"""Per-sample training transforms: unit-range conversion, paired random crops, flips and rotations (task-balanced
batches are assembled by :mod:`datprl.platform.data.sampler`).

Pure numpy/torch: used inside Ray Data map stages and inside Ray Train workers, and testable without Ray.
"""

from __future__ import annotations

import os

import numpy as np

from datprl.platform.data import conventions


_PROCESS_RNG: tuple[int, np.random.Generator] | None = None


def process_rng() -> np.random.Generator:
    """One generator per process, seeded from OS entropy on first use in that process. Keyed by process id, so a
    forked worker (a DataLoader worker) never inherits its parent's stream: every worker and every pass draws its
    own crops and transforms."""
    global _PROCESS_RNG
    pid = os.getpid()
    if _PROCESS_RNG is None or _PROCESS_RNG[0] != pid:
        _PROCESS_RNG = (pid, np.random.default_rng())
    return _PROCESS_RNG[1]


def to_unit_float(image: np.ndarray, white_level: int | None = None) -> np.ndarray:
    """uint8/uint16 (H, W[, C]) -> float32 in [0, 1]; ``white_level`` is the stored value that maps to 1.0
    (default: the dtype's maximum). Bit depth is kept until here, the model's input normalisation."""
    if np.issubdtype(image.dtype, np.floating):
        return np.clip(image.astype(np.float32), 0.0, 1.0)
    if image.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"unsupported image dtype {image.dtype}; expected uint8, uint16 or float in [0, 1]")
    scale = conventions.white_level(white_level, dtype=image.dtype)
    return np.clip(image.astype(np.float32) / float(scale), 0.0, 1.0)


def to_chw3(image: np.ndarray) -> np.ndarray:
    """(H, W) or (H, W, 1|3) float -> (3, H, W); grayscale is replicated to 3 channels as the paper does."""
    if image.ndim == 2:
        image = image[..., None]
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    if image.shape[-1] != 3:
        raise ValueError(f"expected 1 or 3 channels, got shape {image.shape}")
    return np.ascontiguousarray(image.transpose(2, 0, 1))


def paired_random_crop(
    lq: np.ndarray, gt: np.ndarray, size: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """The same random ``size`` x ``size`` window from both images (reflect-padded first if an image is smaller)."""
    if lq.shape[:2] != gt.shape[:2]:
        raise ValueError(f"input and target sizes differ: {lq.shape[:2]} vs {gt.shape[:2]}")
    h, w = lq.shape[:2]
    if h < size or w < size:
        pad = [(0, max(0, size - h)), (0, max(0, size - w))] + [(0, 0)] * (lq.ndim - 2)
        lq, gt = np.pad(lq, pad, mode="reflect"), np.pad(gt, pad, mode="reflect")
        h, w = lq.shape[:2]
    top, left = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
    return lq[top : top + size, left : left + size], gt[top : top + size, left : left + size]


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """Deterministic central window (evaluation on fixed crops); images smaller than ``size`` are returned whole."""
    h, w = image.shape[:2]
    top, left = max(0, (h - size) // 2), max(0, (w - size) // 2)
    return image[top : top + size, left : left + size]


def paired_augment(lq: np.ndarray, gt: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One of the 8 dihedral transforms (flips and 90-degree rotations), the same for both images."""
    k, flip = int(rng.integers(0, 4)), bool(rng.integers(0, 2))
    out = []
    for image in (lq, gt):
        image = np.rot90(image, k, axes=(0, 1))
        out.append(np.ascontiguousarray(image[:, ::-1] if flip else image))
    return out[0], out[1]
