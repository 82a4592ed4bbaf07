"""A dataset handle: a dataset's manifest, read once, with where the dataset lives.

The training driver opens the dataset once (:meth:`DatasetHandle.open`) and passes the handle to everything that needs
the manifest before the trainer starts: which tasks a split holds, samples per task, shard URLs and sizes. The
manifest's SHA-256 identifies the exact dataset a model was trained on (recorded with exported weights).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from datprl.platform import storage
from datprl.platform.data.format import Manifest, manifest_url, shard_urls
from datprl.platform.storage import S3Settings


@dataclass(frozen=True)
class DatasetHandle:
    """One dataset (local folder or ``s3://`` prefix) and its parsed manifest."""

    url: str
    s3: S3Settings | None
    manifest: Manifest
    manifest_sha256: str

    @classmethod
    def open(cls, url: str, s3: S3Settings | None = None) -> "DatasetHandle":
        """Read and validate ``manifest.json`` once. Raises FileNotFoundError (naming the path and how to build a
        dataset) when there is none."""
        where = manifest_url(url)
        try:
            data = storage.read_bytes(where, s3)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"no dataset at {url}: {where} does not exist; build one with "
                f"`python jobs/build_dataset.py output={url}`"
            ) from None
        return cls(
            url=str(url),
            s3=s3,
            manifest=Manifest.model_validate_json(data),
            manifest_sha256=hashlib.sha256(data).hexdigest(),
        )

    def shard_urls(self, split: str | None = None) -> list[str]:
        """Full URLs of the shards of ``split`` (or of every split), in manifest order."""
        return shard_urls(self.url, self.manifest, split)

    def samples_per_task(self, split: str) -> dict[str, int]:
        """Samples of every task present in ``split`` (tasks with no samples are left out)."""
        counts: dict[str, int] = {}
        for entry in self.manifest.counts:
            if entry.split == split and entry.samples > 0:
                counts[entry.task] = counts.get(entry.task, 0) + entry.samples
        return counts

    def splits(self) -> list[str]:
        """The splits that hold samples, sorted."""
        return sorted({entry.split for entry in self.manifest.counts if entry.samples > 0})

    def tasks(self, split: str) -> list[str]:
        """The tasks present in ``split``, sorted."""
        return sorted(self.samples_per_task(split))

    def all_tasks(self) -> set[str]:
        """Every task of the dataset, in any split."""
        return {entry.task for entry in self.manifest.counts}

    def domains(self) -> set[str]:
        """Every domain of the dataset."""
        return {entry.domain for entry in self.manifest.counts}

    def domain_tasks(self, domains: set[str] | list[str]) -> set[str]:
        """The tasks of the given domains."""
        return {entry.task for entry in self.manifest.counts if entry.domain in set(domains)}

    def shard_bytes(self, split: str) -> int:
        """Stored bytes of the shards of ``split``."""
        return sum(shard.bytes for shard in self.manifest.shards if shard.split == split)
