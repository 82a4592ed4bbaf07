"""Clean medical sources from data-only packages (Debian / PyPI, fetched by :mod:`datprl.platform.data.packages`).

Whole CT and MR volumes, cut into axial slices. Each volume is one ``group`` (one subject), so a split that keeps
groups together never puts neighbouring slices of one scan on both sides.

Volumes (``VOLUMES``):

* ``pyradiomics`` 3.1.0 sdist (BSD-3-Clause), NRRD, read with pynrrd: ``lung1`` and ``lung2``, chest CTs of two
  patients (512x512, 5 mm slices, int16 HU, already clipped by the file to -1024..3071 HU); ``brain1`` and
  ``brain2``, contrast-enhanced T1 brain MRs of two patients (256x256, 6.5 mm slices, int16, maxima 3057 and 1523).
* ``totalsegmentator`` 2.18.0 sdist (Apache-2.0), NIfTI: ``chest_cta``, the CT angiography of its aorta-report test
  (233x167 axial, 1.5 mm isotropic, int16 HU, -1094..3343 HU, so the padding clips to -1024 and metal to 3071).
* ``mricron-data`` (Debian, BSD-3-Clause), NIfTI: ``colin27_t1``, MRIcron's ``ch2.nii.gz``, the Colin27
  single-subject T1 (average of 27 scans of one man, 181x217x181 at 1 mm, uint8: only ~250 grey levels).

Orientation: every volume is reoriented (from its NRRD space directions / NIfTI affine, with nibabel) to LPS voxel
axes and slice ``z`` is ``volume[:, :, z].T``: rows run anterior (top) to posterior, columns patient's right to
patient's left, i.e. the radiological convention DICOM viewers use (nilearn's MNI slices in :mod:`.sources` are
shown the other way round left-right). ``z`` counts from the inferior end.

Stored values (the conventions of :mod:`datprl.platform.data.sources`):

* CT: the file's values are HU (no rescale in these files: NRRD has none, the NIfTI's scl_slope is unset; a set
  one would be applied), ``stored = clip(round(HU + 1024), 0, 4095)``, ``to_physical = {"slope": 1,
  "intercept": -1024}``.
* MR: one scale per volume, by the volume's **maximum** (not a percentile: nothing clips, and ``to_physical`` is
  exact to half a stored step): ``stored = round(max(raw, 0) * 4095 / raw_max)``, ``to_physical`` maps back to the
  file's values (arbitrary MR units; none of these files has a rescale of its own). The maxima are constants
  here, so listing the sources reads no volume; a load checks them (and the shapes, and the absent rescale)
  against the file.

Slice choice (:func:`rule_slices` applies the rule; the chosen indices are constants so that ids are known without
reading a volume, and a test checks the two agree): a slice has tissue when at least ``MIN_TISSUE_FRACTION`` (10 %)
of its pixels are body (CT: above ``CT_BODY_HU`` = -500 HU) or tissue (MR: above 10 % of the volume's 99th
percentile); of those, every ``k``-th from the first, with ``k`` the smallest step that puts at least
``MIN_GAP_MM`` (6 mm) between chosen slices and keeps at most ``MAX_SLICES_PER_VOLUME`` (25) from one volume, so no
subject dominates and neighbours are not near-duplicates.
"""

from __future__ import annotations

import functools
import importlib.util
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from datprl.platform.data.conventions import CT_OFFSET, MEDICAL_WHITE, hu_to_stored, scaled_white_level
from datprl.platform.data.packages import PACKAGES, PackageMissing, package_root
from datprl.platform.data.sources import MissingSource, SourceImage

CT_BODY_HU = -500.0  # above this a CT pixel is body (soft tissue, bone), below it air or lung
MR_TISSUE_OF_P99 = 0.10  # an MR pixel is tissue above this fraction of its volume's 99th percentile
MIN_TISSUE_FRACTION = 0.10  # a slice with less body/tissue than this is left out
MIN_GAP_MM = 6.0  # chosen slices of one volume are at least this far apart
MAX_SLICES_PER_VOLUME = 25


@dataclass(frozen=True)
class Volume:
    """One scan in a data package and the axial slices taken from it."""

    package: str  # a name in datprl.platform.data.packages.PACKAGES
    name: str  # ids are "{package}/{name}/z{z:03d}"; "{package}/{name}" is the group
    path: str  # the file, relative to the package's root
    modality: Literal["ct", "mr"]
    shape: tuple[int, int, int]  # voxels along (L, P, S) after reorientation; checked on load
    spacing_mm: float  # between neighbouring axial slices
    slices: tuple[int, ...]  # axial indices (from the inferior end), as rule_slices chooses them
    what: str  # for the note
    raw_max: float = 0.0  # MR: the volume's maximum raw value, which is scaled to the white level; checked on load

    @property
    def group(self) -> str:
        return f"{self.package}/{self.name}"

    @property
    def reader(self) -> str:
        """The distribution that decodes the file."""
        return "pynrrd" if self.path.endswith(".nrrd") else "nibabel"

    @property
    def white_level(self) -> int:
        return MEDICAL_WHITE if self.modality == "ct" else scaled_white_level(self.raw_max)


_RADIOMICS = "pyradiomics-3.1.0/data"

VOLUMES: tuple[Volume, ...] = (
    Volume(
        package="pyradiomics",
        name="lung1",
        path=f"{_RADIOMICS}/lung1_image.nrrd",
        modality="ct",
        shape=(512, 512, 48),
        spacing_mm=5.0,
        slices=tuple(range(0, 48, 2)),
        what="chest CT (lung tumour case 1), 512x512, 0.57 mm pixels",
    ),
    Volume(
        package="pyradiomics",
        name="lung2",
        path=f"{_RADIOMICS}/lung2_image.nrrd",
        modality="ct",
        shape=(512, 512, 61),
        spacing_mm=5.0,
        slices=tuple(range(0, 61, 3)),
        what="chest/upper-abdomen CT (lung tumour case 2), 512x512, 0.63 mm pixels",
    ),
    Volume(
        package="totalsegmentator",
        name="chest_cta",
        path="totalsegmentator-2.18.0/tests/reference_files/aorta_report/example_ct.nii.gz",
        modality="ct",
        shape=(233, 167, 191),
        spacing_mm=1.5,
        slices=tuple(range(0, 191, 8)),
        what="chest-abdomen CT angiography (aorta-report test case), 167x233 axial at 1.5 mm",
    ),
    Volume(
        package="pyradiomics",
        name="brain1",
        path=f"{_RADIOMICS}/brain1_image.nrrd",
        modality="mr",
        shape=(256, 256, 25),
        spacing_mm=6.5,
        slices=tuple(range(25)),
        raw_max=3057.0,
        what="contrast-enhanced T1 brain MR (brain tumour case 1), 256x256, 0.78 mm pixels",
    ),
    Volume(
        package="pyradiomics",
        name="brain2",
        path=f"{_RADIOMICS}/brain2_image.nrrd",
        modality="mr",
        shape=(256, 256, 23),
        spacing_mm=6.5,
        slices=tuple(range(23)),
        raw_max=1523.0,
        what="contrast-enhanced T1 brain MR (case 2), 256x256, 0.78 mm pixels",
    ),
    Volume(
        package="mricron-data",
        name="colin27_t1",
        path="usr/share/mricron/templates/ch2.nii.gz",
        modality="mr",
        shape=(181, 217, 181),
        spacing_mm=1.0,
        slices=tuple(range(0, 168, 7)),
        raw_max=254.0,
        what="Colin27 single-subject T1 head (MRIcron ch2), 217x181 at 1 mm, 8-bit (~250 grey levels)",
    ),
)


# ------------------------------------------------------------------------------------------------------ reading


def _read_lps(path: Path) -> tuple[np.ndarray, float, float]:
    """(raw voxels reoriented to LPS axes, slope, intercept) of an NRRD or NIfTI file: value = raw * slope + inter."""
    from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform

    if path.suffix == ".nrrd":
        import nrrd

        data, header = nrrd.read(str(path))
        if header.get("space") != "left-posterior-superior" or data.ndim != 3:
            raise RuntimeError(f"{path.name}: expected a 3-D volume in LPS space, got {header.get('space')!r}")
        affine = np.eye(4)
        affine[:3, :3] = np.asarray(header["space directions"], dtype=np.float64).T  # columns: one per voxel axis
        affine[:3, 3] = header["space origin"]
        affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine  # LPS world -> RAS world, the frame nibabel works in
        slope, inter = 1.0, 0.0  # NRRD has no rescale: the stored numbers are the values
    else:
        import nibabel

        image = nibabel.load(path)
        data = np.asanyarray(image.dataobj.get_unscaled())
        slope, inter = float(image.dataobj.slope), float(image.dataobj.inter)  # 1 and 0 when scl_slope is unset
        affine = image.affine
    transform = ornt_transform(io_orientation(affine), axcodes2ornt(("L", "P", "S")))
    return apply_orientation(data, transform), slope, inter


@functools.lru_cache(maxsize=None)
def _volume(volume: Volume, path: str) -> tuple[np.ndarray, float, float]:
    """The decoded, reoriented volume (read-only, cached: all its slices come from one read), checked against the
    constants the sources were listed with."""
    data, slope, inter = _read_lps(Path(path))
    if data.shape != volume.shape:
        raise RuntimeError(
            f"{volume.group}: {path} has shape {data.shape} after reorientation to LPS, expected {volume.shape}"
        )
    if volume.modality == "mr" and (float(data.max()) != volume.raw_max or (slope, inter) != (1.0, 0.0)):
        # to_physical was listed from these constants: a different file would map back to wrong values
        raise RuntimeError(
            f"{volume.group}: {path} has maximum {data.max()} and rescale ({slope:g}, {inter:g}), "
            f"expected {volume.raw_max:g} and none"
        )
    data = np.ascontiguousarray(data)
    data.setflags(write=False)
    return data, slope, inter


def _axial(volume: Volume, path: str, z: int) -> tuple[np.ndarray, float, float]:
    data, slope, inter = _volume(volume, path)
    return data[:, :, z].T, slope, inter  # rows: anterior (top) -> posterior; columns: patient's right -> left


def _load_slice(volume: Volume, path: str, z: int) -> np.ndarray:
    """Slice ``z`` of ``volume`` as stored: uint16 (H, W) (see the module docstring)."""
    raw, slope, inter = _axial(volume, path, z)
    if volume.modality == "ct":
        return hu_to_stored(raw.astype(np.float64) * slope + inter)
    scaled = np.clip(raw.astype(np.float64), 0, None) * (volume.white_level / volume.raw_max)
    return np.rint(scaled).astype(np.uint16)


# ----------------------------------------------------------------------------------------------- slice choice


def tissue_fractions(volume: Volume, path: str | Path) -> np.ndarray:
    """Per axial slice (from the inferior end), the fraction of pixels that are body (CT) or tissue (MR)."""
    data, slope, inter = _volume(volume, str(path))
    if volume.modality == "ct":
        body = data.astype(np.float32) * slope + inter > CT_BODY_HU
    else:
        body = data > MR_TISSUE_OF_P99 * np.percentile(data, 99)
    return body.mean(axis=(0, 1))


def choose_slices(fractions: Sequence[float], spacing_mm: float) -> tuple[int, ...]:
    """The slice rule: slices with tissue, every k-th from the first, at least MIN_GAP_MM apart, at most
    MAX_SLICES_PER_VOLUME of them."""
    kept = [z for z, fraction in enumerate(fractions) if fraction >= MIN_TISSUE_FRACTION]
    step = max(math.ceil(MIN_GAP_MM / spacing_mm - 1e-9), math.ceil(len(kept) / MAX_SLICES_PER_VOLUME), 1)
    return tuple(kept[::step])


def rule_slices(volume: Volume, path: str | Path) -> tuple[int, ...]:
    """What :func:`choose_slices` picks from the file (``volume.slices`` must equal it)."""
    return choose_slices(tissue_fractions(volume, path).tolist(), volume.spacing_mm)


# ---------------------------------------------------------------------------------------------------- catalogue


def _file(volume: Volume) -> Path:
    """The volume's file in the fetched package; PackageMissing (naming the fix) when it or its reader is absent."""
    path = package_root(volume.package) / volume.path
    if not path.is_file():
        raise PackageMissing(f"{volume.path} is not in the fetched {PACKAGES[volume.package].label}")
    for module, dist in (("nibabel", "nibabel"), ("nrrd", "pynrrd")):
        if (dist == "nibabel" or volume.reader == dist) and importlib.util.find_spec(module) is None:
            raise PackageMissing(f"{dist} (which reads {volume.path}) is not installed")
    return path


def _note(volume: Volume, z: int) -> str:
    if volume.modality == "ct":
        how = f"stored = clip(round(HU + {CT_OFFSET}), 0, {MEDICAL_WHITE}); the file's values are HU"
    else:
        how = (
            f"stored = round(max(raw, 0) * {volume.white_level} / {volume.raw_max:g}) (the volume's maximum -> "
            f"{volume.white_level}, one scale for all its slices); to_physical gives the file's values"
        )
    h, w = volume.shape[1], volume.shape[0]
    return (
        f"{volume.what}; {PACKAGES[volume.package].label} file {volume.path}, axial slice z={z} of "
        f"{volume.shape[2]} (from the inferior end, {volume.spacing_mm:g} mm apart), {h}x{w}, reoriented to LPS: "
        f"anterior up, patient's left on the right (radiological); {how}"
    )


def sources() -> list[SourceImage | MissingSource]:
    """This domain's data-package sources, available or missing (with the reason)."""
    out: list[SourceImage | MissingSource] = []
    for volume in VOLUMES:
        ids = [(z, f"{volume.group}/z{z:03d}") for z in volume.slices]
        try:
            path = _file(volume)
        except PackageMissing as exc:
            out.extend(MissingSource(sid, "medical", volume.modality, volume.package, str(exc)) for _, sid in ids)
            continue
        package = PACKAGES[volume.package]
        if volume.modality == "ct":
            units, to_physical = "HU", {"slope": 1.0, "intercept": float(-CT_OFFSET)}
        else:
            units, to_physical = None, {"slope": volume.raw_max / volume.white_level, "intercept": 0.0}
        readers = ("pynrrd", "nibabel") if volume.reader == "pynrrd" else ("nibabel",)  # nibabel also reorients
        for z, sid in ids:
            out.append(
                SourceImage(
                    id=sid,
                    domain="medical",
                    modality=volume.modality,
                    package=package.name,
                    package_version=package.version,
                    load=functools.partial(_load_slice, volume, str(path), z),
                    bit_depth=16,
                    units=units,
                    to_physical=dict(to_physical),
                    note=_note(volume, z),
                    white_level=volume.white_level,
                    group=volume.group,
                    readers=readers,
                    licence=package.licence,
                )
            )
    return out
