"""The corpus' storage conventions: CT HU <-> stored values, the white-level fallback, and that the builder, the
training transforms and the serving codec all follow the one definition."""

from __future__ import annotations

import numpy as np
import pytest

from datprl.platform.data import conventions as C


def test_ct_round_trip_is_exact_inside_the_window():
    hu = np.arange(C.CT_HU_WINDOW[0], C.CT_HU_WINDOW[1] + 1, dtype=np.float64)
    assert (hu[0], hu[-1]) == (-1024, 3071)
    stored = C.hu_to_stored(hu)
    assert stored.dtype == np.uint16 and (stored[0], stored[-1]) == (0, C.MEDICAL_WHITE)
    np.testing.assert_array_equal(C.stored_to_hu(stored), hu)
    assert not C.outside_ct_window(hu).any()


def test_ct_values_outside_the_window_are_clipped_and_flagged():
    hu = np.array([-3024.0, -2000.0, -1024.6, -1024.5, 3071.4, 3071.5, 3500.0, 10.4, 10.6])
    stored = C.hu_to_stored(hu)
    # round half to even: -1024.5 + 1024 = -0.5 -> -0 (inside); 3071.5 + 1024 = 4095.5 -> 4096 (outside)
    np.testing.assert_array_equal(stored, [0, 0, 0, 0, 4095, 4095, 4095, 1034, 1035])
    np.testing.assert_array_equal(C.outside_ct_window(hu), [True, True, True, False, False, True, True, False, False])
    back = C.stored_to_hu(stored)
    inside = ~C.outside_ct_window(hu)
    np.testing.assert_array_equal(back[inside], np.rint(hu[inside]) + 0.0)  # inside: HU to the nearest unit
    assert back.dtype == np.float64 and back.min() == -1024 and back.max() == 3071


@pytest.mark.parametrize("dtype,expected", [(np.uint8, 255), (np.uint16, 65535), ("uint8", 255)])
def test_white_level_falls_back_to_the_dtype_range(dtype, expected):
    assert C.white_level(None, dtype=dtype) == expected
    assert C.white_level(0, dtype=dtype) == expected  # 0 is "not declared", as a record's missing value
    assert C.white_level(C.MEDICAL_WHITE, dtype=dtype) == C.MEDICAL_WHITE  # a declared level wins


@pytest.mark.parametrize("bits,expected", [(8, 255), (16, 65535), (12, 4095), (1, 1)])
def test_white_level_falls_back_to_the_bit_depth_range(bits, expected):
    assert C.white_level(bit_depth=bits) == expected
    assert C.white_level(1000, bit_depth=bits) == 1000


def test_white_level_rejects_what_has_no_default():
    with pytest.raises(TypeError, match="exactly one of bit_depth= or dtype="):
        C.white_level(255)
    with pytest.raises(TypeError, match="exactly one"):
        C.white_level(None, bit_depth=8, dtype=np.uint8)
    for dtype in (np.float32, np.int16, np.uint32):
        with pytest.raises(ValueError, match="uint8 or uint16"):
            C.white_level(None, dtype=dtype)
    for bits in (0, 17, 8.0, True):
        with pytest.raises(ValueError, match="1..16"):
            C.white_level(None, bit_depth=bits)


def test_scaled_white_level_keeps_12_bits_when_they_suffice():
    assert C.scaled_white_level(1.0) == C.scaled_white_level(4095) == 4095
    assert C.scaled_white_level(4096) == 65535


def test_transforms_normalise_with_the_same_white_level():
    from datprl.platform.data.transforms import to_unit_float

    scan = np.array([[0, 2048, 4095, 65535]], np.uint16)
    np.testing.assert_allclose(to_unit_float(scan), scan / 65535.0, rtol=1e-6)
    np.testing.assert_allclose(to_unit_float(scan, C.MEDICAL_WHITE), np.clip(scan / 4095.0, 0, 1), rtol=1e-6)
    assert to_unit_float(np.array([[128]], np.uint8))[0, 0] == np.float32(128 / 255)


def test_training_sources_and_serving_store_a_ct_slice_identically():
    """The corpus' CT_small source and the serving codec's decode of the same DICOM give the same stored values and
    white level, so a served CT slice reaches the model exactly as its training counterpart did."""
    from pydicom.data import get_testdata_file

    from datprl.platform.data import sources
    from datprl.serve.codec import check_content_type, decode

    source = next(s for s in sources.catalogue(["medical"]) if s.id == "pydicom/CT/CT_small")
    data = open(get_testdata_file("CT_small.dcm", download=False), "rb").read()
    served = decode(data, check_content_type(data, "application/dicom"), 10**6)
    np.testing.assert_array_equal(served.pixels[..., 0], source.load())
    assert served.white_level == source.white_level == C.MEDICAL_WHITE
    assert source.to_physical == {"slope": 1.0, "intercept": float(-C.CT_OFFSET)}
    assert sources.CT_OFFSET is C.CT_OFFSET and sources.MEDICAL_WHITE is C.MEDICAL_WHITE  # one definition
