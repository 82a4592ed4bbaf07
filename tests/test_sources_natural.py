"""Natural photographs from Debian data packages (datprl.platform.data.sources_natural) and the Qt resource reader.

The tests on the real photos need the packages fetched (``python -m datprl.platform.data.packages``) and are skipped
when they are not; the parser, preprocessing and missing-package tests run everywhere.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from datprl.platform.data import sources, sources_natural
from datprl.platform.data.packages import FETCH_COMMAND, PackageMissing, package_root
from datprl.platform.data.qt_resources import QtResourceError, QtResources
from datprl.platform.data.sources import MissingSource, SourceImage

PACKAGES = (
    "gcompris-qt-data",
    "kphotoalbum",
    "tuxpaint-data",
    "lomiri-wallpapers-16.04",
    "lxqt-themes",
    "scribus-template",
    "palapeli-data",
)


# ----------------------------------------------------------------------------------------- a tiny .rcc, by hand


def _rcc(files: dict[str, tuple[int, bytes]], version: int = 3) -> bytes:
    """A Qt resource archive holding ``{"dir/name": (flags, stored bytes)}`` (one level of folders), written from
    the format as qt_resources' docstring describes it (and Qt's rcc writes it)."""
    names = b""
    name_offsets: dict[str, int] = {}

    def name(text: str) -> int:
        nonlocal names
        if text not in name_offsets:
            name_offsets[text] = len(names)
            encoded = text.encode("utf-16-be")
            names += struct.pack(">HI", len(text), 0) + encoded  # the hash is not checked by readers of paths
        return name_offsets[text]

    data = b""
    folders: dict[str, list[tuple[str, int, int]]] = {}
    for path, (flags, stored) in files.items():
        folder, leaf = path.split("/")
        folders.setdefault(folder, []).append((leaf, flags, len(data)))
        data += struct.pack(">I", len(stored)) + stored
    lastmod = b"" if version == 1 else struct.pack(">Q", 0)
    # Node 0: root; nodes 1..F: the folders; then each folder's files, contiguous.
    nodes = [struct.pack(">IHII", 0, 0x02, len(folders), 1) + lastmod]
    first = 1 + len(folders)
    leaves: list[bytes] = []
    for folder, entries in folders.items():
        nodes.append(struct.pack(">IHII", name(folder), 0x02, len(entries), first + len(leaves)) + lastmod)
        for leaf, flags, offset in entries:
            leaves.append(struct.pack(">IHHHI", name(leaf), flags, 0, 0, offset) + lastmod)
    tree = b"".join(nodes + leaves)
    header_size = 24 if version >= 3 else 20
    tree_at = header_size
    data_at = tree_at + len(tree)
    names_at = data_at + len(data)
    header = b"qres" + struct.pack(">IIII", version, tree_at, data_at, names_at)
    if version >= 3:
        header += struct.pack(">I", 0)
    return header + tree + data + names


@pytest.mark.parametrize("version", [1, 2, 3])
def test_qt_resources_reads_a_handmade_archive(version):
    text = b"hello, resources " * 20
    archive = QtResources(
        _rcc(
            {
                "res/plain.txt": (0, b"plain bytes"),
                "res/packed.txt": (0x01, struct.pack(">I", len(text)) + zlib.compress(text)),
                "other/x.bin": (0, bytes(range(256))),
            },
            version,
        )
    )
    assert archive.version == version
    assert archive.names() == ["other/x.bin", "res/packed.txt", "res/plain.txt"]
    assert archive.read("res/plain.txt") == b"plain bytes"
    assert archive.read("res/packed.txt") == text
    assert archive.read("other/x.bin") == bytes(range(256))
    with pytest.raises(KeyError):
        archive.read("res/absent.txt")


def test_qt_resources_rejects_what_it_cannot_read():
    with pytest.raises(QtResourceError, match="magic"):
        QtResources(b"not a resource file at all")
    with pytest.raises(QtResourceError, match="version"):
        QtResources(b"qres" + struct.pack(">IIII", 9, 20, 20, 20))
    odd = QtResources(_rcc({"res/a": (0x10, b"x")}))
    with pytest.raises(QtResourceError, match="unknown resource flags"):
        odd.read("res/a")
    wrong_size = QtResources(_rcc({"res/a": (0x01, struct.pack(">I", 99) + zlib.compress(b"abc"))}))
    with pytest.raises(QtResourceError, match="inflated to 3 bytes"):
        wrong_size.read("res/a")
    truncated = _rcc({"res/a": (0, b"x")})
    with pytest.raises(QtResourceError):
        QtResources(truncated[:30])


def test_readme_licences_reads_both_layouts_of_files():
    readme = (
        "Copyright: A\nLicense: CC-BY-SA 4.0\nSource: https://a\nFiles:\nwonders/a.webp\nwonders/b.webp\n\n"
        "Copyright: B\nSource: https://b\nLicense: Public Domain\nComments: cropping\nFiles: c.webp\n"
    )
    table = sources_natural.readme_licences(readme)
    assert table == {
        "wonders/a.webp": ("CC-BY-SA-4.0", "A", "https://a"),
        "wonders/b.webp": ("CC-BY-SA-4.0", "A", "https://a"),
        "c.webp": ("public domain", "B", "https://b"),
    }


# ----------------------------------------------------------------------------------------------- preprocessing


def _jpeg(width: int, height: int, orientation: int = 1) -> bytes:
    # A left-to-right ramp in red, so that a rotation is visible in the output.
    ramp = np.tile(np.linspace(0, 255, width, dtype=np.uint8), (height, 1))
    image = Image.fromarray(np.stack([ramp, np.zeros_like(ramp), np.zeros_like(ramp)], -1))
    exif = Image.Exif()
    exif[0x0112] = orientation
    out = io.BytesIO()
    image.save(out, "JPEG", quality=95, exif=exif.tobytes())
    return out.getvalue()


def test_prepare_halves_caps_and_orients():
    plain = sources_natural.prepare(_jpeg(800, 600))
    assert plain.shape == (300, 400, 3) and plain.dtype == np.uint8 and plain.flags.writeable
    assert plain[150, 390, 0] > plain[150, 10, 0] + 200  # the ramp still runs left to right
    large = sources_natural.prepare(_jpeg(3000, 1200))
    assert large.shape == (410, 1024, 3)  # 1024 px on the long side, more than halved
    # EXIF orientation 6 (rotate 90 degrees clockwise to display): the ramp then runs top to bottom.
    turned = sources_natural.prepare(_jpeg(800, 600, orientation=6))
    assert turned.shape == (400, 300, 3)
    assert turned[390, 150, 0] > turned[10, 150, 0] + 200
    # An album rotation (KPhotoAlbum's index.xml) on top: 180 degrees, the ramp runs right to left.
    flipped = sources_natural.prepare(_jpeg(800, 600), rotate_clockwise=180)
    assert flipped[150, 10, 0] > flipped[150, 390, 0] + 200
    with pytest.raises(ValueError, match="under 256 px"):
        sources_natural.prepare(_jpeg(640, 480))


# ----------------------------------------------------------------------------------------- missing packages


def test_missing_packages_are_reported_not_raised(monkeypatch, tmp_path):
    monkeypatch.setenv("DATPRL_SOURCE_CACHE", str(tmp_path))
    entries = sources_natural.sources()
    assert entries and all(isinstance(e, MissingSource) for e in entries)
    assert sorted(e.package for e in entries) == sorted(PACKAGES)
    for entry in entries:
        assert entry.id == f"{entry.package}/*" and entry.domain == "natural" and entry.modality == "photo"
        assert FETCH_COMMAND in entry.reason
    # The catalogue keeps working: the built-in natural sources, these listed as missing.
    assert not any(s.package in PACKAGES for s in sources.catalogue(domains="natural"))
    assert {m.package for m in sources.missing_sources("natural")} >= set(PACKAGES)


# ------------------------------------------------------------------------------------------- the real photos


@pytest.fixture(scope="module")
def fetched() -> list[SourceImage]:
    try:
        for package in PACKAGES:
            package_root(package)
    except PackageMissing as error:
        pytest.skip(str(error))
    entries = sources_natural.sources()
    assert not [e for e in entries if isinstance(e, MissingSource)]
    return entries


@pytest.fixture(scope="module")
def loaded(fetched) -> dict[str, np.ndarray]:
    return {s.id: s.load() for s in fetched}


def test_at_least_150_photos_from_5_packages(fetched):
    counts: dict[str, int] = {}
    for source in fetched:
        counts[source.package] = counts.get(source.package, 0) + 1
    assert sum(counts.values()) >= 150 and len(counts) >= 5, counts
    assert len({s.id for s in fetched}) == len(fetched), "ids must be unique"
    assert all(s.id.startswith(f"{s.package}/") for s in fetched)
    # They are in the default natural catalogue.
    assert {s.id for s in fetched} <= {s.id for s in sources.catalogue(domains="natural")}


def test_every_photo_has_licence_group_and_metadata(fetched):
    for source in fetched:
        assert source.domain == "natural" and source.modality == "photo" and source.bit_depth == 8
        assert source.white_level == 255 and source.units is None and source.to_physical is None
        assert source.readers == ("pillow",) and source.package_version
        assert source.licence and source.group and source.note
        if source.package == "gcompris-qt-data":
            # Each GCompris photo's licence comes from its README, not the package's catch-all.
            assert source.group.count("/") == 1 and "per-file" not in source.licence, source.id
            assert "https://" in source.note, source.id


def test_every_photo_loads_as_rgb8_of_at_least_256_px(fetched, loaded):
    for source in fetched:
        image = loaded[source.id]
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3, source.id
        assert min(image.shape[:2]) >= sources_natural.MIN_SIDE, (source.id, image.shape)
        assert max(image.shape[:2]) <= sources_natural.MAX_SIDE, (source.id, image.shape)
        assert image.std() > 10, f"{source.id} is nearly flat"


def _dhash(image: np.ndarray, size: int = 16) -> np.ndarray:
    """256-bit difference hash: the sign of horizontal steps of a size x (size+1) grey thumbnail."""
    grey = np.asarray(Image.fromarray(image).convert("L").resize((size + 1, size), Image.Resampling.BOX), float)
    return (grey[:, 1:] > grey[:, :-1]).ravel()


def test_no_near_duplicate_photos(loaded):
    # Over all natural sources (the built-in ones too). Distinct photos here differ in >= 49 of 256 bits; a resized,
    # re-encoded copy of one photo in about 10.
    images = dict(loaded)
    images.update({s.id: s.load() for s in sources.catalogue(domains="natural") if s.id not in images})
    ids = list(images)
    hashes = np.array([_dhash(images[i]) for i in ids])
    distance = (hashes[:, None, :] != hashes[None, :, :]).sum(-1)
    np.fill_diagonal(distance, 256)
    close = [(ids[i], ids[j], int(distance[i, j])) for i, j in zip(*np.nonzero(distance <= 24)) if i < j]
    assert not close, close
    # The check can fail: a copy of a photo, halved and JPEG re-encoded, is caught.
    first = images[ids[0]]
    out = io.BytesIO()
    Image.fromarray(first).reduce(2).save(out, "JPEG", quality=80)
    copy = np.asarray(Image.open(out).convert("RGB"))
    assert (_dhash(copy) != hashes[0]).sum() <= 24


def test_excluded_table_names_real_files(fetched, monkeypatch):
    # With nothing excluded, every excluded id appears: the table is not stale for the pinned versions.
    excluded = dict(sources_natural.EXCLUDED)
    assert excluded
    monkeypatch.setattr(sources_natural, "EXCLUDED", {})
    everything = {s.id for s in sources_natural.sources()}
    assert set(excluded) <= everything
    assert not set(excluded) & {s.id for s in fetched}


def test_real_gcompris_archives_parse(fetched):
    root = package_root("gcompris-qt-data")
    for activity in sources_natural.GCOMPRIS_ACTIVITIES:
        archive = QtResources.open(root / "usr/share/gcompris-qt/rcc" / f"{activity}.rcc")
        photos = [n for n in archive.names() if n.endswith(".webp")]
        assert photos, activity
        head = archive.read(photos[0])
        assert head[:4] == b"RIFF" and head[8:12] == b"WEBP"
        flags = {e.flags for e in archive.entries.values()}
        assert flags <= {0x00, 0x01}, flags  # what this version uses: stored and zlib (its READMEs, QML)
        readme = next(n for n in archive.names() if n.endswith("README"))
        assert b"License" in archive.read(readme)
