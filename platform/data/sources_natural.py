"""Clean natural sources from data-only packages (Debian / PyPI, fetched by :mod:`datprl.platform.data.packages`).

Real photographs from seven Debian packages (about 185 images; see :data:`EXCLUDED` for what is left out and why):

======================== ===== =========================================================================================
package                  kept  where, and what
======================== ===== =========================================================================================
gcompris-qt-data         110   WebP photos inside the Qt resource archives (``.rcc``) of five activities: ``erase``
                                 (animals), ``explore_monuments``, ``explore_world_animals``, ``explore_farm_animals``,
                                 ``explore_world_music``; each file's licence comes from the activity's README
kphotoalbum              23    ``usr/share/kphotoalbum/demo/*.jpg``: the demo album (people, pets, places)
tuxpaint-data            15    ``usr/share/tuxpaint/templates/*.jpg``: nature and texture photos
lomiri-wallpapers-16.04  14    ``usr/share/backgrounds/*_by_*.jpg``: photo wallpapers (licence per file)
lxqt-themes              11    the photographs among ``usr/share/lxqt/wallpapers/`` (the other 13 are renders)
scribus-template         7     photos of Riku Leino's public-domain templates (br2, cal2, menu2)
palapeli-data            5     ``usr/share/palapeli/collection/*.jpg``: the jigsaw photos (licence per file)
======================== ===== =========================================================================================

Left out entirely (not fetched): GCompris' ``details.rcc`` (its backgrounds are at most 500 px high, so under 256 px
after the downscale below, and five of them are Van Gogh paintings), the renders among the LXQt wallpapers, Tux
Paint's starters (drawings), the other Scribus template images (page previews, screenshots, clip art), Palapeli's
puzzle-table textures and KPhotoAlbum's 128 px category thumbnails (``demo/CategoryImages/``).

Preprocessing (all of them, in ``load()``): EXIF orientation applied (``ImageOps.exif_transpose``; KPhotoAlbum's
demo files carry no EXIF rotation, their rotation is in the album's ``index.xml``, copied into
:data:`KPHOTOALBUM_ANGLES`), converted to RGB, then downscaled: every photo is stored lossy (JPEG / WebP), and
halving it averages the compression artefacts away so that it can serve as a clean target. Photos up to 2048 px on
the long side are halved exactly (``Image.reduce(2)``: each output pixel is the mean of a 2x2 block); larger ones
(the wallpapers) are resized to 1024 px on the long side with Lanczos, which keeps the corpus build fast. Those large
JPEGs are decoded with libjpeg's DCT scaling (``Image.draft``) to no less than the target size first (several times
faster); the Lanczos resize does the rest.
Stored as ``uint8 (H, W, 3)``; both sides are >= 256 (images that would be smaller are in :data:`EXCLUDED`).

Ids: ``gcompris-qt-data/<activity>/<file stem>``, ``scribus-template/<template>/<file stem>`` and
``<package>/<file stem>`` for the others. ``group`` is the GCompris activity (``gcompris-qt-data/<activity>``) or the
package, so that related shots (KPhotoAlbum's ``grand_canyon_1..3``, Scribus' eclipse photos) share a split.
"""

from __future__ import annotations

import functools
import io
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np

from datprl.platform.data.packages import GCOMPRIS_ACTIVITIES, GCOMPRIS_RCC, PACKAGES, PackageMissing, package_root
from datprl.platform.data.qt_resources import QtResources, QtResourceError
from datprl.platform.data.sources import MissingSource, SourceImage

MAX_SIDE = 1024  # longest side after downscaling
MIN_SIDE = 256  # shortest side a stored photo may have
PREPROCESSING = "EXIF orientation applied, RGB, halved (2x2 means), or Lanczos-resized to 1024 px on the long side"

#: Photos of the fetched files that are *not* sources, by the id they would have, with the reason.
EXCLUDED: dict[str, str] = {
    # Too small: under 256 px on the short side after the 2x downscale (original size in brackets).
    "gcompris-qt-data/explore_monuments/victoriaMemorial": "too small (1024x451)",
    "gcompris-qt-data/explore_monuments/cabrillo": "too small (359x1024)",
    "gcompris-qt-data/explore_world_animals/crocodile": "too small (1024x506)",
    "gcompris-qt-data/explore_world_music/ireland": "too small (1024x416)",
    "kphotoalbum/anne_helene": "too small (400x600)",
    "tuxpaint-data/trees_above": "too small (604x453)",
    "tuxpaint-data/trees_at_dusk": "too small (604x453)",
    "tuxpaint-data/mossy_bark": "too small (640x480; also a black band at the bottom)",
    "tuxpaint-data/wool_mill_machine": "too small (720x480)",
    # Not a photograph.
    "lomiri-wallpapers-16.04/umang_by_Abhishek_Mudgal": "a render (abstract colour gradient), not a photograph",
}

#: KPhotoAlbum's demo ``index.xml`` rotates these (clockwise degrees); the JPEGs themselves have EXIF orientation 1.
KPHOTOALBUM_ANGLES = {"new_wave_1": 90, "grand_canyon_1": 180, "wayne": 90, "pool_2": 270}

#: Per-file licences of lomiri-wallpapers-16.04 (its debian/copyright, ``16.04/<file>``).
LOMIRI_LICENCES = {
    "aitzgorri_by_Aitzol_Berasategi": "CC-BY-4.0",
    "analogpattern_by_Peter_Nerlich": "CC-BY-SA-4.0",
    "Bridge_by_Sander_Klootwijk": "CC-BY-SA-4.0",
    "Dragonfly_by_Bolly": "CC-BY-SA-4.0",
    "free_by_Peter_Nerlich": "CC-BY-SA-4.0",
    "friends_by_Aitzol_Berasategi": "CC-BY-4.0",
    "greentock_by_Peter_Nerlich": "CC-BY-SA-4.0",
    "life_by_Aitzol_Berasategi": "CC-BY-4.0",
    "picosdeeuropa_by_Aitzol_Berasategi": "CC-BY-4.0",
    "Picture_0B_by_freespace": "CC-BY-4.0",
    "Picture_1A_by_freespace": "CC-BY-4.0",
    "seeding_by_Clements_Engelhardt": "CC0-1.0",
    "sunset_by_Aitzol_Berasategi": "CC-BY-4.0",
    "umang_by_Abhishek_Mudgal": "CC-BY-4.0",
    "Wine_by_Jakkub_Mede": "CC-BY-4.0",
}

#: Per-file licences and authors of palapeli-data's photos (the ``X-KDE-PluginInfo-*`` keys of their .desktop files).
PALAPELI_LICENCES = {
    "castle-maintenon": ("GFDL", "Eric Pouhier"),
    "cincinnati-bridge": ("public domain", "Derek Jensen"),
    "citrus-fruits": ("public domain", "US Department of Agriculture"),
    "european-honey-bee": ("public domain", "John Severns"),
    "panther-chameleon-female": ("GFDL", "B. Navez and others"),
}

#: Files a GCompris README names wrongly (the README of explore_monuments 3.1 says ``germany/audaPalatina.webp``).
GCOMPRIS_README_TYPOS = {"germany/aulaPalatina.webp": "germany/audaPalatina.webp"}

# (package, folder in the package, file pattern, what the photos are) of the packages read as plain files.
_FILE_SETS = (
    ("kphotoalbum", "usr/share/kphotoalbum/demo", "*.jpg", "KPhotoAlbum demo album photo"),
    ("tuxpaint-data", "usr/share/tuxpaint/templates", "*.jpg", "Tux Paint template photo"),
    ("lomiri-wallpapers-16.04", "usr/share/backgrounds", "*_by_*.jpg", "Lomiri wallpaper photo"),
    ("lxqt-themes", "usr/share/lxqt/wallpapers", "*.*", "LXQt wallpaper photo (wallpapers/License)"),
    ("scribus-template", "usr/share/scribus/templates", "*/*.jpg", "photo of a Scribus template by Riku Leino"),
    ("palapeli-data", "usr/share/palapeli/collection", "*.jpg", "Palapeli jigsaw photo"),
)


# ------------------------------------------------------------------------------------------------- decoding


def downscaled_size(width: int, height: int) -> tuple[int, int]:
    """The stored size of a ``width`` x ``height`` photo: halved (rounding up, as ``Image.reduce(2)`` does), or
    scaled by ``MAX_SIDE / longest side`` when that is smaller."""
    if max(width, height) <= 2 * MAX_SIDE:
        return -(-width // 2), -(-height // 2)
    scale = MAX_SIDE / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def prepare(data: bytes, rotate_clockwise: int = 0) -> np.ndarray:
    """Decode an encoded photo and apply the module's preprocessing; a fresh ``uint8 (H, W, 3)`` array.

    ``rotate_clockwise`` (a multiple of 90) is applied after the EXIF orientation. Raises ``ValueError`` when the
    result would be under :data:`MIN_SIDE` on a side (such files belong in :data:`EXCLUDED`).
    """
    from PIL import Image, ImageOps

    with Image.open(io.BytesIO(data)) as image:
        oriented = image.getexif().get(0x0112, 1) in (5, 6, 7, 8)  # EXIF orientations that swap width and height
        width, height = image.size[::-1] if oriented else image.size
        if rotate_clockwise % 180:
            width, height = height, width
        target = downscaled_size(width, height)
        halve = max(width, height) <= 2 * MAX_SIDE
        if image.format == "JPEG" and not halve:
            # DCT-domain scaling by 1/2, 1/4 or 1/8 while decoding, never below the target: 5-10x faster for the
            # multi-megapixel wallpapers; the Lanczos resize below does the rest.
            draft = target if not (oriented ^ bool(rotate_clockwise % 180)) else target[::-1]
            image.draft("RGB", draft)
        image = ImageOps.exif_transpose(image)
        if rotate_clockwise % 360:
            turns = {90: Image.Transpose.ROTATE_270, 180: Image.Transpose.ROTATE_180, 270: Image.Transpose.ROTATE_90}
            image = image.transpose(turns[rotate_clockwise % 360])
        image = image.convert("RGB")
        if halve:
            image = image.reduce(2)  # the mean of each 2x2 block: exact, and 10x faster than a Lanczos resize
        elif image.size != target:
            image = image.resize(target, Image.Resampling.LANCZOS, reducing_gap=2.0)
        array = np.array(image, dtype=np.uint8)  # a copy: writable, independent of Pillow's buffer
    if min(array.shape[:2]) < MIN_SIDE:
        raise ValueError(f"photo is {array.shape[1]}x{array.shape[0]} after downscaling, under {MIN_SIDE} px")
    return array


@functools.lru_cache(maxsize=len(GCOMPRIS_ACTIVITIES))
def _archive(path: str) -> QtResources:
    """One parsed ``.rcc`` per path (a few MB each), shared by all the loads from that archive."""
    return QtResources.open(path)


def _load_rcc(path: str, name: str) -> np.ndarray:
    return prepare(_archive(path).read(name))


def _load_file(path: str, rotate_clockwise: int = 0) -> np.ndarray:
    return prepare(Path(path).read_bytes(), rotate_clockwise)


# ------------------------------------------------------------------------------------------------- catalogue


def _missing(package: str, reason: str, pattern: str = "*") -> MissingSource:
    return MissingSource(f"{package}/{pattern}", "natural", "photo", package, reason)


def _photo(sid: str, package: str, load: Callable[[], np.ndarray], note: str, group: str, licence: str) -> SourceImage:
    return SourceImage(
        sid,
        "natural",
        "photo",
        package,
        PACKAGES[package].version,
        load,
        8,
        None,
        None,
        f"{note}; {PREPROCESSING}",
        group=group,
        readers=("pillow",),
        licence=licence,
    )


def readme_licences(readme: str) -> dict[str, tuple[str, str, str]]:
    """``{file: (licence, copyright, source)}`` from a GCompris resource README.

    The README is blank-line separated blocks of ``Key: value`` lines; ``Files:`` is followed by the file names, on
    its line or on the next lines (relative to the README's folder, e.g. ``wonders/petra.webp``).
    """
    out: dict[str, tuple[str, str, str]] = {}
    for block in re.split(r"\n\s*\n", readme):
        fields: dict[str, str] = {}
        files: list[str] = []
        in_files = False
        for line in block.splitlines():
            key, sep, value = line.partition(":")
            if sep and key.strip() in ("Copyright", "License", "Source", "Comments", "Files"):
                in_files = key.strip() == "Files"
                if in_files:
                    files.extend(value.split())
                else:
                    fields[key.strip()] = value.strip()
            elif in_files and line.strip():
                files.extend(line.split())
        # One spelling for the same licence: "CC-BY-SA 4.0" -> "CC-BY-SA-4.0", "Public Domain" -> "public domain".
        licence = re.sub(r"^(CC[-A-Za-z]*) (\d)", r"\1-\2", fields.get("License", ""))
        licence = "public domain" if licence.lower() == "public domain" else licence
        for name in files:
            out[name] = (licence, fields.get("Copyright", ""), fields.get("Source", ""))
    return out


def _gcompris() -> list[SourceImage | MissingSource]:
    package = "gcompris-qt-data"
    try:
        root = package_root(package)
    except PackageMissing as error:
        return [_missing(package, str(error))]
    out: list[SourceImage | MissingSource] = []
    for activity in GCOMPRIS_ACTIVITIES:
        path = root / GCOMPRIS_RCC / f"{activity}.rcc"
        try:
            archive = _archive(str(path))
            entries = archive.names()
            readmes = {
                n.rsplit("/", 1)[0]: readme_licences(archive.read(n).decode("utf-8"))
                for n in entries
                if n.endswith("/README")
            }
        except (OSError, QtResourceError, UnicodeDecodeError) as error:
            out.append(_missing(package, f"cannot read {path}: {error}", f"{activity}/*"))
            continue
        for name in entries:
            if not name.endswith(".webp"):
                continue
            stem = name.rsplit("/", 1)[-1].removesuffix(".webp")
            sid = f"{package}/{activity}/{stem}"
            if sid in EXCLUDED:
                continue
            # The README next to the photos (or a folder above) names each file relative to its own folder.
            licence, author, source = "", "", ""
            for folder, table in readmes.items():
                relative = name.removeprefix(folder + "/")
                relative = GCOMPRIS_README_TYPOS.get(relative, relative)
                if name.startswith(folder + "/") and relative in table:
                    licence, author, source = table[relative]
            note = (
                f"GCompris '{activity}' photo by {author or 'unknown'} ({source or 'no source given'}); "
                f"{GCOMPRIS_RCC}/{activity}.rcc:/{name} (WebP)"
            )
            out.append(
                _photo(
                    sid,
                    package,
                    functools.partial(_load_rcc, str(path), name),
                    note,
                    f"{package}/{activity}",
                    licence or PACKAGES[package].licence,
                )
            )
    return out


def _files(package: str, folder: str, pattern: str, what: str) -> list[SourceImage | MissingSource]:
    try:
        root = package_root(package)
    except PackageMissing as error:
        return [_missing(package, str(error))]
    paths = sorted((root / folder).glob(pattern))
    if not paths:
        return [_missing(package, f"no {folder}/{pattern} in {root} (a partial fetch? delete it and fetch again)")]
    out: list[SourceImage | MissingSource] = []
    for path in paths:
        stem = path.stem
        sid = f"{package}/{path.parent.name}/{stem}" if package == "scribus-template" else f"{package}/{stem}"
        if sid in EXCLUDED:
            continue
        licence = PACKAGES[package].licence
        note = what
        if package == "lomiri-wallpapers-16.04":
            licence = LOMIRI_LICENCES.get(stem, licence)
            note += f" by {stem.split('_by_', 1)[1].replace('_', ' ')}"
        elif package == "palapeli-data" and stem in PALAPELI_LICENCES:
            licence, author = PALAPELI_LICENCES[stem]
            note += f" by {author}"
        elif package == "lxqt-themes":
            licence = "CC-BY-SA-3.0"
        elif package == "scribus-template":
            licence = "public domain"
        angle = KPHOTOALBUM_ANGLES.get(stem, 0) if package == "kphotoalbum" else 0
        relative = path.relative_to(root).as_posix()
        note += f"; {relative}" + (
            f", rotated {angle} degrees clockwise as the album's index.xml says" if angle else ""
        )
        out.append(_photo(sid, package, functools.partial(_load_file, str(path), angle), note, package, licence))
    return out


def sources() -> list[SourceImage | MissingSource]:
    """This domain's data-package sources, available or missing (with the reason)."""
    out = _gcompris()
    for package, folder, pattern, what in _FILE_SETS:
        out.extend(_files(package, folder, pattern, what))
    return out
