"""Where datasets live: local paths and ``s3://bucket/prefix`` URLs behind one small API.

* :func:`filesystem` gives a ``(pyarrow.fs.FileSystem, path)`` pair. For S3 it is pyarrow's native
  :class:`pyarrow.fs.S3FileSystem` (``endpoint_override`` + ``scheme`` for S3-compatible servers such as moto or
  MinIO). That object is picklable and is what Ray Data's ``filesystem=`` argument wants, e.g.
  ``fs, path = filesystem(url, s3); ray.data.read_webdataset(path, filesystem=fs)``.
* :func:`fsspec_filesystem` gives an fsspec filesystem (``s3fs`` for S3) for code written against fsspec
  (webdataset, a plain torch baseline).
* :func:`atomic_write_bytes`, :func:`read_bytes`, :func:`list_files`, :func:`exists`, :func:`join_url`.

Atomicity of :func:`atomic_write_bytes`: a local write goes to a temporary file in the destination directory, is
fsynced and then renamed over the final name with :func:`os.replace` (atomic on POSIX within one filesystem), so a
reader sees either the old file, the complete new one, or nothing -- never a truncated file, even if the process is
killed mid-write. An S3 object is never visible partially written: it appears only when its PUT completes. We upload
the bytes with a single ``PutObject`` (up to S3's 5 GiB limit for one PUT; beyond that s3fs switches to a multipart
upload, which S3 also exposes only on ``CompleteMultipartUpload`` and which is aborted if a part fails).

Credentials: :class:`S3Settings` takes the key, secret and session token from ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY`` and ``AWS_SESSION_TOKEN`` when the settings object is created (explicit values win); the
endpoint defaults to ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` when set, otherwise real AWS. The secret is a
:class:`pydantic.SecretStr`, so it never appears in a repr or a log line.
"""

from __future__ import annotations

import functools
import os
import posixpath
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pyarrow.fs as pafs
from pydantic import BaseModel, ConfigDict, Field, SecretStr

__all__ = [
    "S3Settings",
    "is_s3",
    "join_url",
    "filesystem",
    "fsspec_filesystem",
    "atomic_write_bytes",
    "read_bytes",
    "open_input_stream",
    "list_files",
    "exists",
]

# One PUT is allowed up to 5 GiB; with this chunk size s3fs issues a single PutObject below 5 GiB (it switches to
# multipart only at min(5 GiB, 2 * chunksize)).
_S3_SINGLE_PUT_CHUNKSIZE = 3 * 2**30


def _env(*names: str) -> str | None:
    for name in names:
        value = os.environ.get(name)
        if value:
            return value
    return None


class S3Settings(BaseModel):
    """How to reach an S3 (or S3-compatible) store. Frozen, so it can key a cache of filesystem objects."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    endpoint_url: str | None = Field(
        default_factory=lambda: _env("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"),
        description="e.g. http://127.0.0.1:9000 for a local server; None means AWS itself",
    )
    region: str = "us-east-1"
    anon: bool = Field(False, description="unsigned requests (public buckets); ignores credentials")
    access_key: str | None = Field(default_factory=lambda: _env("AWS_ACCESS_KEY_ID"))
    secret_key: SecretStr | None = Field(
        default_factory=lambda: SecretStr(v) if (v := _env("AWS_SECRET_ACCESS_KEY")) else None
    )
    session_token: SecretStr | None = Field(
        default_factory=lambda: SecretStr(v) if (v := _env("AWS_SESSION_TOKEN")) else None
    )

    def _secret(self, value: SecretStr | None) -> str | None:
        return None if value is None else value.get_secret_value()


# --- URLs ---------------------------------------------------------------------------------------------------------


def is_s3(url: str | os.PathLike) -> bool:
    return isinstance(url, str) and url.startswith("s3://")


def _local_path(url: str | os.PathLike) -> str:
    text = os.fspath(url)
    if text.startswith("file://"):
        text = urlparse(text).path
    elif "://" in text:
        raise ValueError(f"unsupported URL scheme in {text!r}: use a local path or s3://bucket/prefix")
    return os.path.abspath(os.path.expanduser(text))


def _s3_path(url: str) -> str:
    """``s3://bucket/a/b/`` -> ``bucket/a/b`` (pyarrow's and s3fs's path form)."""
    path = url[len("s3://") :].strip("/")
    if not path:
        raise ValueError(f"S3 URL without a bucket: {url!r}")
    return path


def join_url(base: str | os.PathLike, *parts: str) -> str:
    """Join path parts ('/'-separated) onto a local path or an S3 URL, keeping its form."""
    for part in parts:
        if part.startswith("/") or ".." in part.split("/"):
            raise ValueError(f"refusing to join an absolute or parent-relative part {part!r} onto {base!r}")
    if is_s3(base):
        return "s3://" + posixpath.join(_s3_path(str(base)), *parts)
    return os.path.join(_local_path(base), *parts)


# --- filesystems --------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def _pyarrow_s3(s3: S3Settings) -> pafs.S3FileSystem:
    kwargs: dict[str, Any] = {"region": s3.region}
    if s3.endpoint_url:
        parsed = urlparse(s3.endpoint_url if "://" in s3.endpoint_url else "https://" + s3.endpoint_url)
        kwargs["endpoint_override"] = parsed.netloc + parsed.path.rstrip("/")
        kwargs["scheme"] = parsed.scheme
    if s3.anon:
        kwargs["anonymous"] = True
    elif s3.access_key:
        kwargs.update(
            access_key=s3.access_key,
            secret_key=s3._secret(s3.secret_key),
            session_token=s3._secret(s3.session_token),
        )
    return pafs.S3FileSystem(**kwargs)


@functools.lru_cache(maxsize=16)
def _s3fs(s3: S3Settings):
    import s3fs

    kwargs: dict[str, Any] = {"anon": s3.anon, "client_kwargs": {"region_name": s3.region}}
    if s3.endpoint_url:
        kwargs["endpoint_url"] = s3.endpoint_url
    if not s3.anon and s3.access_key:
        kwargs.update(key=s3.access_key, secret=s3._secret(s3.secret_key), token=s3._secret(s3.session_token))
    return s3fs.S3FileSystem(**kwargs)


def filesystem(url: str | os.PathLike, s3: S3Settings | None = None) -> tuple[pafs.FileSystem, str]:
    """Resolve ``url`` to a pyarrow filesystem and the path on it (absolute local path, or ``bucket/key``)."""
    if is_s3(url):
        return _pyarrow_s3(s3 or S3Settings()), _s3_path(str(url))
    return pafs.LocalFileSystem(), _local_path(url)


def fsspec_filesystem(url: str | os.PathLike, s3: S3Settings | None = None):
    """Resolve ``url`` to an fsspec filesystem (``s3fs.S3FileSystem`` or fsspec's local one) and the path on it."""
    if is_s3(url):
        return _s3fs(s3 or S3Settings()), _s3_path(str(url))
    from fsspec.implementations.local import LocalFileSystem

    return LocalFileSystem(), _local_path(url)


# --- operations ---------------------------------------------------------------------------------------------------


def atomic_write_bytes(url: str | os.PathLike, data: bytes, s3: S3Settings | None = None) -> None:
    """Write ``data`` so that ``url`` is never observed partially written (see the module docstring)."""
    data = bytes(data) if not isinstance(data, bytes) else data
    if is_s3(url):
        fs, path = fsspec_filesystem(url, s3)
        fs.pipe_file(path, data, chunksize=_S3_SINGLE_PUT_CHUNKSIZE)
        return
    final = Path(_local_path(url))
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    try:
        os.fchmod(fd, 0o644)  # mkstemp creates 0600; datasets and results are meant to be read by other users
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, final)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:  # make the rename itself durable; not possible on every platform/filesystem
        dir_fd = os.open(final.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def open_input_stream(url: str | os.PathLike, s3: S3Settings | None = None):
    """A sequential (streaming) binary reader for ``url``; use as a context manager."""
    fs, path = filesystem(url, s3)
    return fs.open_input_stream(path)


def read_bytes(url: str | os.PathLike, s3: S3Settings | None = None) -> bytes:
    with open_input_stream(url, s3) as stream:
        return stream.read()


def exists(url: str | os.PathLike, s3: S3Settings | None = None) -> bool:
    fs, path = filesystem(url, s3)
    return fs.get_file_info(path).type == pafs.FileType.File


def list_files(url: str | os.PathLike, suffix: str = "", s3: S3Settings | None = None) -> list[str]:
    """All files under ``url`` (recursively) whose name ends with ``suffix``, as sorted URLs of the same form as
    ``url`` (``s3://...`` stays ``s3://...``). A missing directory lists as empty."""
    fs, path = filesystem(url, s3)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    found = sorted(info.path for info in infos if info.type == pafs.FileType.File and info.path.endswith(suffix))
    if is_s3(url):
        return ["s3://" + p for p in found]
    return found
