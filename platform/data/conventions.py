"""Storage conventions of the corpus: how stored integer pixels relate to the model's [0, 1] input and to physical
values. The dataset builder, the training pipeline, the benchmarks and the serving codec all follow them, so a scan
served over HTTP is normalised exactly as its training counterpart was.

* **White level**: the stored value that means full scale (1.0 at the model input: ``stored / white_level``). A
  record may declare it (``SampleRecord.white_level``); otherwise it is the full range of the container, 255 for
  8-bit and 65535 for 16-bit images (:func:`white_level`).
* **Medical scans** hold 12-bit content in a 16-bit container: white level :data:`MEDICAL_WHITE` = 4095.
* **CT** (HU): ``stored = clip(round(HU + CT_OFFSET), 0, MEDICAL_WHITE)`` (:func:`hu_to_stored`), so the window
  :data:`CT_HU_WINDOW` = -1024..3071 HU is stored exactly and ``stored - CT_OFFSET`` gives it back
  (:func:`stored_to_hu`). Values below the window (padding outside the scanner's field of view) read as -1024 HU,
  i.e. air; values above it (metal) as 3071 HU.
* **MR / nuclear medicine** (no absolute unit): a file is scaled so that its raw maximum becomes
  :func:`scaled_white_level` of that maximum (4095, or 65535 when the raw data has more levels than 12 bits hold).

Numpy only, so that the serving codec can use it without the data pipeline's dependencies.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "CT_OFFSET",
    "MEDICAL_WHITE",
    "CT_EVAL_WINDOW",
    "CT_HU_WINDOW",
    "white_level",
    "scaled_white_level",
    "hu_to_stored",
    "hu_to_stored_and_outside",
    "stored_to_hu",
    "outside_ct_window",
]

CT_OFFSET = 1024
"""Added to HU before storing, so that air (-1024 HU) is stored as 0."""

MEDICAL_WHITE = 4095
"""White level of medical scans: 12-bit content stored in 16-bit containers."""

CT_HU_WINDOW = (-CT_OFFSET, MEDICAL_WHITE - CT_OFFSET)
"""The HU values a CT slice stores exactly (inclusive): (-1024, 3071)."""

CT_EVAL_WINDOW = (-160, 240)
"""The HU window CT restoration PSNR is computed over (the abdominal soft-tissue display window, W400/L40, used in
low-dose CT evaluations): values are clipped to it and the data range is its width, 400 HU."""

_MAX_BIT_DEPTH = 16  # the widest container the corpus and the codec use (uint16)


def white_level(
    declared: int | None = None, *, bit_depth: int | None = None, dtype: np.dtype | type | None = None
) -> int:
    """The stored value that maps to 1.0: ``declared`` when given (non-zero), else the full range of the container.

    The container is named by exactly one of ``bit_depth`` (1..16: ``2**bit_depth - 1``, so 255 for 8-bit and 65535
    for 16-bit) or ``dtype`` (``uint8`` -> 255, ``uint16`` -> 65535). A 12-bit scan in a 16-bit container must
    declare its white level (4095, :data:`MEDICAL_WHITE`): the fallback would be 65535.
    """
    if (bit_depth is None) == (dtype is None):
        raise TypeError("white_level() needs exactly one of bit_depth= or dtype= to name the container's range")
    if declared:
        return int(declared)
    if dtype is not None:
        kind = np.dtype(dtype)
        if kind not in (np.dtype(np.uint8), np.dtype(np.uint16)):
            raise ValueError(
                f"no default white level for dtype {kind}: stored images are uint8 or uint16; "
                "convert the image or give its white level explicitly"
            )
        return int(np.iinfo(kind).max)
    if (
        isinstance(bit_depth, bool)
        or not isinstance(bit_depth, (int, np.integer))
        or not (1 <= bit_depth <= _MAX_BIT_DEPTH)
    ):
        raise ValueError(
            f"bit_depth={bit_depth!r} is not a whole number of bits in 1..{_MAX_BIT_DEPTH}; stored "
            "images are 8-bit or 16-bit"
        )
    return 2 ** int(bit_depth) - 1


def scaled_white_level(raw_max: float) -> int:
    """White level of a scan scaled by its own maximum (MR, nuclear medicine): 12 bits (4095) unless the raw data
    has more levels than 12 bits hold, then 16 bits (65535)."""
    return MEDICAL_WHITE if raw_max <= MEDICAL_WHITE else white_level(bit_depth=16)


def _rounded_stored(hu: np.ndarray) -> np.ndarray:
    shifted = np.asarray(hu, dtype=np.float64) + CT_OFFSET
    return np.rint(shifted, out=shifted)


def hu_to_stored(hu: np.ndarray) -> np.ndarray:
    """CT values (HU, after the DICOM rescale) -> stored ``uint16``: ``clip(round(HU + 1024), 0, 4095)``."""
    return np.clip(_rounded_stored(hu), 0, MEDICAL_WHITE).astype(np.uint16)


def hu_to_stored_and_outside(hu: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(:func:`hu_to_stored`, :func:`outside_ct_window`) of the same image, rounding it once."""
    rounded = _rounded_stored(hu)
    return np.clip(rounded, 0, MEDICAL_WHITE).astype(np.uint16), (rounded < 0) | (rounded > MEDICAL_WHITE)


def stored_to_hu(stored: np.ndarray) -> np.ndarray:
    """Stored CT values -> HU (float64): ``stored - 1024``, the inverse of :func:`hu_to_stored` inside the window."""
    return np.asarray(stored, dtype=np.float64) - CT_OFFSET


def outside_ct_window(hu: np.ndarray) -> np.ndarray:
    """Boolean mask of the pixels :func:`hu_to_stored` clips (their rounded value lies outside
    :data:`CT_HU_WINDOW`), e.g. padding at -2000/-3024 HU or metal."""
    rounded = _rounded_stored(hu)
    return (rounded < 0) | (rounded > MEDICAL_WHITE)
