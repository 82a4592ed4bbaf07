"""Medical sources from data packages: whole CT and MR volumes cut into axial slices, stored as the corpus stores
medical scans, enough of them from enough subjects. Needs the packages fetched (`python -m
datprl.platform.data.packages`, which infra/setup.sh runs)."""

from __future__ import annotations

import socket
from collections import Counter

import numpy as np
import pytest

from datprl.platform.data import packages as P
from datprl.platform.data import sources as S
from datprl.platform.data import sources_medical as M


@pytest.fixture(scope="module")
def loaded() -> dict[str, tuple[S.SourceImage, np.ndarray]]:
    """Every medical data-package source loaded once, with network connections refused (nothing may download)."""

    def refuse(*args, **kwargs):
        raise AssertionError("a source tried to open a network connection")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", refuse)
        mp.setattr(socket.socket, "connect_ex", refuse)
        return {s.id: (s, s.load()) for s in M.sources() if isinstance(s, S.SourceImage)}


def _physical(source: S.SourceImage, image: np.ndarray) -> np.ndarray:
    return image.astype(np.float64) * source.to_physical["slope"] + source.to_physical["intercept"]


def _raw_lps(volume: M.Volume) -> np.ndarray:
    """The volume's raw voxels read independently of the module (no reorientation)."""
    path = P.package_root(volume.package) / volume.path
    if volume.reader == "pynrrd":
        import nrrd

        return nrrd.read(str(path))[0]
    import nibabel

    return np.asanyarray(nibabel.load(path).dataobj)


def test_every_volume_is_fetched_and_readable():
    # infra/setup.sh fetches every data package, so on a set-up machine nothing may be missing.
    missing = [m for m in M.sources() if isinstance(m, S.MissingSource)]
    assert missing == []


def test_every_source_loads_in_the_medical_stored_form(loaded):
    assert len(loaded) == sum(len(v.slices) for v in M.VOLUMES)
    for sid, (source, image) in loaded.items():
        assert source.domain == "medical" and source.modality in ("ct", "mr"), sid
        assert image.dtype == np.uint16 and image.ndim == 2, sid
        assert source.bit_depth == 16 and source.white_level == S.MEDICAL_WHITE, sid
        assert 0 <= image.min() and image.max() <= source.white_level, sid
        assert min(image.shape) >= 128, sid
        assert image.flags.writeable and not np.shares_memory(image, source.load()), sid
        package = P.PACKAGES[source.package]
        assert source.package_version == package.version and source.licence == package.licence != "", sid
        assert source.group and sid.startswith(source.group + "/z"), sid
        assert "nibabel" in source.readers and source.note, sid


def test_slices_of_one_volume_share_its_group_and_differ(loaded):
    for volume in M.VOLUMES:
        slices = [(s, img) for s, img in loaded.values() if s.group == volume.group]
        assert len(slices) == len(volume.slices) <= M.MAX_SLICES_PER_VOLUME, volume.group
        assert {img.shape for _, img in slices} == {(volume.shape[1], volume.shape[0])}, volume.group
        stack = np.stack([img for _, img in slices])
        assert len(np.unique(stack.reshape(len(stack), -1), axis=0)) == len(stack), volume.group


def test_chosen_slices_follow_the_documented_rule():
    for volume in M.VOLUMES:
        path = P.package_root(volume.package) / volume.path
        assert M.rule_slices(volume, path) == volume.slices, volume.group
        fractions = M.tissue_fractions(volume, path)
        assert (fractions[list(volume.slices)] >= M.MIN_TISSUE_FRACTION).all(), volume.group
        gaps = np.diff(volume.slices) * volume.spacing_mm
        assert gaps.min() >= M.MIN_GAP_MM, volume.group


def test_ct_maps_back_to_plausible_hounsfield_units(loaded):
    cts = [(s, img) for s, img in loaded.values() if s.modality == "ct"]
    assert cts
    for source, image in cts:
        assert source.units == "HU" and source.to_physical == {"slope": 1.0, "intercept": -1024.0}, source.id
        hu = _physical(source, image)
        body = hu[hu > M.CT_BODY_HU]
        assert -200 <= np.median(body) <= 200, source.id  # soft tissue, fat and bone around water
        assert ((hu >= 0) & (hu <= 100)).mean() > 0.01, source.id  # soft tissue is there
        assert -1024 <= np.percentile(hu, 1) <= -950, source.id  # air around the body near -1000 HU


def test_ct_storage_is_exact_against_the_file(loaded):
    volume = next(v for v in M.VOLUMES if v.group == "pyradiomics/lung1")  # voxel axes already L, P, S
    raw = _raw_lps(volume)
    for z in volume.slices[::6]:
        source, image = loaded[f"{volume.group}/z{z:03d}"]
        np.testing.assert_array_equal(_physical(source, image), np.clip(raw[:, :, z].T, -1024, 3071))


def test_reorientation_puts_anterior_up():
    # brain1's NRRD runs its second axis towards anterior (space direction -y in LPS), so its rows are flipped;
    # Colin27's NIfTI is RAS, so both in-plane axes are flipped; TotalSegmentator's NIfTI is already LPS.
    flips = {
        "pyradiomics/brain1": (False, True),
        "mricron-data/colin27_t1": (True, True),
        "totalsegmentator/chest_cta": (False, False),
    }
    for volume in M.VOLUMES:
        if volume.group not in flips:
            continue
        flip_x, flip_y = flips[volume.group]
        raw = _raw_lps(volume)
        raw = raw[::-1] if flip_x else raw
        raw = raw[:, ::-1] if flip_y else raw
        z = volume.slices[len(volume.slices) // 2]
        np.testing.assert_array_equal(
            M._axial(volume, str(P.package_root(volume.package) / volume.path), z)[0], raw[:, :, z].T
        )


def test_mr_maps_back_to_the_file_values(loaded):
    for volume in (v for v in M.VOLUMES if v.modality == "mr"):
        raw = _raw_lps(volume)
        assert float(raw.max()) == volume.raw_max, volume.group
        z = volume.slices[len(volume.slices) // 2]
        source, image = loaded[f"{volume.group}/z{z:03d}"]
        assert source.units is None
        step = source.to_physical["slope"]
        assert step == pytest.approx(volume.raw_max / S.MEDICAL_WHITE)
        expected = np.clip(M._axial(volume, str(P.package_root(volume.package) / volume.path), z)[0], 0, None)
        assert np.abs(_physical(source, image) - expected).max() <= step / 2 + 1e-9, volume.group


def test_medical_catalogue_has_enough_ct_and_mr_from_enough_subjects():
    medical = S.catalogue(["medical"])
    ids = [s.id for s in medical]
    assert len(ids) == len(set(ids))
    for modality in ("ct", "mr"):
        chosen = [s for s in medical if s.modality == modality]
        groups = Counter(s.group for s in chosen)
        assert len(chosen) >= 50 and len(groups) >= 3, (modality, groups)
        assert max(groups.values()) <= M.MAX_SLICES_PER_VOLUME, groups
    assert all(s.licence and s.group for s in medical if s.package in P.PACKAGES)


def test_listing_reads_no_volume():
    M._volume.cache_clear()
    listed = M.sources()
    assert listed and M._volume.cache_info().currsize == 0


def test_an_empty_cache_gives_missing_sources(monkeypatch, tmp_path):
    monkeypatch.setenv("DATPRL_SOURCE_CACHE", str(tmp_path))
    listed = M.sources()
    assert listed and all(isinstance(m, S.MissingSource) for m in listed)
    assert [m.id for m in listed] == [f"{v.group}/z{z:03d}" for v in M.VOLUMES for z in v.slices]
    assert all(P.FETCH_COMMAND in m.reason and m.domain == "medical" for m in listed)
    assert all(s.package not in P.PACKAGES for s in S.catalogue(["medical"]))


def test_a_missing_reader_leaves_only_its_volumes_out(monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "nrrd" else find_spec(name, *a))
    listed = M.sources()
    missing = {m.package for m in listed if isinstance(m, S.MissingSource)}
    assert missing == {"pyradiomics"}
    assert all("pynrrd" in m.reason for m in listed if isinstance(m, S.MissingSource))
