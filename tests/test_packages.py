"""Data-package fetching: checksums, only the listed members kept, atomic and idempotent, unsafe archives refused."""

from __future__ import annotations

import hashlib
import io
import tarfile
import zipfile

import pytest

from datprl.platform.data import packages as P


def _wheel(path, members: dict[str, bytes]) -> str:
    with zipfile.ZipFile(path, "w") as wheel:
        for name, data in members.items():
            wheel.writestr(name, data)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _package(path, sha256: str, members=("pkg/data/*.png",)) -> P.DataPackage:
    return P.DataPackage("demo-data", "pypi", "1.0", "MIT", tuple(members), url=path.as_uri(), sha256=sha256)


def test_fetch_keeps_only_the_listed_files_and_is_idempotent(tmp_path):
    archive = tmp_path / "demo_data-1.0-py3-none-any.whl"
    sha = _wheel(archive, {"pkg/data/a.png": b"A", "pkg/data/b.png": b"B", "pkg/code.py": b"import os"})
    cache = tmp_path / "cache"
    root = P.fetch_package(_package(archive, sha), cache)
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()) == [
        ".datprl-package.json",
        "pkg/data/a.png",
        "pkg/data/b.png",
    ]
    stamp = (root / ".datprl-package.json").read_text()
    assert '"archive_sha256": "' + sha in stamp and "MIT" in stamp
    archive.unlink()  # a second fetch must not download again
    assert P.fetch_package(_package(archive, sha), cache) == root
    assert [p.name for p in cache.iterdir()] == [root.name]  # no temporary folders left behind


def test_a_checksum_mismatch_is_refused_and_leaves_nothing(tmp_path):
    archive = tmp_path / "demo.whl"
    _wheel(archive, {"pkg/data/a.png": b"A"})
    cache = tmp_path / "cache"
    with pytest.raises(RuntimeError, match="SHA-256 .* refusing"):
        P.fetch_package(_package(archive, "0" * 64), cache)
    assert list(cache.iterdir()) == []


def test_an_sdist_member_escaping_the_folder_is_refused(tmp_path):
    archive = tmp_path / "demo-1.0.tar.gz"
    with tarfile.open(archive, "w:gz") as sdist:
        for name in ("demo-1.0/data/ok.png", "../escape.png"):
            info = tarfile.TarInfo(name)
            info.size = 1
            sdist.addfile(info, io.BytesIO(b"x"))
    sha = hashlib.sha256(archive.read_bytes()).hexdigest()
    with pytest.raises(tarfile.OutsideDestinationError):
        P.fetch_package(_package(archive, sha, members=("*.png",)), tmp_path / "cache")
    assert not (tmp_path / "escape.png").exists()


def test_missing_package_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("DATPRL_SOURCE_CACHE", str(tmp_path))
    name = next(iter(P.PACKAGES))
    with pytest.raises(P.PackageMissing, match="python -m datprl.platform.data.packages"):
        P.package_root(name)
    with pytest.raises(P.PackageMissing, match="not a known data package"):
        P.package_root("no-such-package")
    assert P.main(["no-such-package"]) == 2


def test_a_pypi_entry_needs_its_link_and_checksum():
    with pytest.raises(ValueError, match="direct url and sha256"):
        P.DataPackage("x", "pypi", "1", "MIT", ("*",))
