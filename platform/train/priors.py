"""The training side of the domain priors: which text embeddings a run aligns its domain prompts with, describing the
training images when they have none yet, and bringing the embeddings to the prompt dimension.

The paper (arXiv 2603.01725, Sec. 3) aligns the domain representation PR_d of every training image with the text
embedding of a description of its clean image, ``L_align = 1 - cos(PR_d, e_text)``. ``text_embeddings=auto`` (the
default) takes them from ``<data.dataset>/priors/descriptions.parquet``; when that table does not exist yet and
``describe_if_missing`` is on, :func:`ensure_text_embeddings` runs the describe job on the training split first
(:mod:`datprl.priors.job`; with the embedded default, the metadata describer and all-MiniLM-L6-v2: seconds). Only
training reads them: the exported network never needs a describer or a text encoder.
"""

from __future__ import annotations

import json
import posixpath

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from datprl.platform import storage
from datprl.platform.storage import S3Settings
from datprl.priors.job import MANIFEST_NAME, TABLE_NAME

AUTO = "auto"
PRIORS_FOLDER = "priors"  # next to the dataset's manifest.json

__all__ = [
    "AUTO",
    "description_prototypes",
    "domain_prototypes",
    "ensure_text_embeddings",
    "load_description_domains",
    "load_text_embeddings",
    "resolve_text_embeddings",
]


def resolve_text_embeddings(text_embeddings: str | None, dataset: str) -> str | None:
    """The table a run reads: ``auto`` -> ``<dataset>/priors/descriptions.parquet``; a path as given; None = none
    (L_align off)."""
    if text_embeddings == AUTO:
        return storage.join_url(dataset, PRIORS_FOLDER, TABLE_NAME)
    return text_embeddings


def ensure_text_embeddings(url: str | None, dataset: str, s3: S3Settings | None, describe: bool) -> bool:
    """Make sure the table at ``url`` exists; Ray must be running. When it is missing and ``describe`` (training's
    ``text_embeddings=auto`` with ``describe_if_missing``), run the describe job (default describer and encoder) on
    ``dataset``'s training split into the table's folder. Returns True when the describe job ran. Raises
    FileNotFoundError, with the ways forward, when the table is missing and may not be made."""
    if url is None or storage.exists(url, s3):
        return False
    if not describe:
        raise FileNotFoundError(
            f"text_embeddings={url} does not exist: make it with `python jobs/describe.py dataset={dataset} "
            f"output={posixpath.dirname(url)}`, or set text_embeddings=null to train without the alignment loss"
        )
    from datprl.priors.job import DescribeConfig, run

    output = posixpath.dirname(url)
    print(
        f"[train] no domain priors at {url}: describing the training images first (metadata describer, "
        "all-MiniLM-L6-v2 text encoder; python jobs/describe.py makes them on its own)",
        flush=True,
    )
    result = run(DescribeConfig(dataset=dataset, output=output, s3=s3))  # the train split
    print(f"[train] described {result.rows} source images -> {result.table_url}", flush=True)
    return True


def _unit(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (a zero row stays zero)."""
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


def _read_columns(url: str, s3: S3Settings | None, columns: list[str], problem) -> pa.Table:
    """The describe job's table at ``url``, only ``columns``; a file that is not such a table raises ValueError with
    ``problem(error)`` as its message."""
    try:
        return pq.read_table(pa.BufferReader(storage.read_bytes(url, s3)), columns=columns)
    except (KeyError, pa.ArrowInvalid) as err:
        raise ValueError(problem(err)) from None


def _projection_seed(url: str, s3: S3Settings | None) -> int:
    """The projection seed recorded next to the table by the describe job (0 when there is no manifest)."""
    manifest_url = storage.join_url(posixpath.dirname(url), MANIFEST_NAME)
    if not storage.exists(manifest_url, s3):
        return 0
    return int(json.loads(storage.read_bytes(manifest_url, s3)).get("projection", {}).get("seed", 0))


def load_text_embeddings(url: str, s3: S3Settings | None, dim: int, centre: bool = True) -> dict[str, np.ndarray]:
    """source_id -> unit-length float32 embedding of length ``dim`` (the model's prompt dimension D).

    ``centre``: subtract the table's mean embedding first. Why: descriptions written from one template (or by one
    MLLM in one style) share a large common component -- on the default corpus the mean pairwise cosine of the
    all-MiniLM-L6-v2 embeddings is 0.61, 0.35-0.61 even across domains -- so a constant PR_d pointing at the mean
    already reaches cos ~0.78 (L_align ~0.22, where training plateaued) and L_align barely asks for domain-aware
    prompts. Centred, embeddings of different domains point apart (cross-domain cosines -0.63 to 0.19), and only a
    PR_d that follows the image's domain lowers L_align.

    Embeddings of another length are mapped to ``dim`` by the fixed, seeded projection of
    :func:`datprl.priors.encoders.project` (seed from the table's manifest), which keeps their cosine geometry; why a
    fixed projection rather than choosing D to match the encoder: D is a property of the network (1024 in the paper,
    64 in the tiny default) and of its published checkpoints, while the encoder is a choice of the priors job (CLIP's
    text tower gives 1024-d, all-MiniLM-L6-v2 384-d); the alignment compares directions only, so the projection loses
    nothing of what L_align uses when D >= 384 and little when D is smaller (Johnson-Lindenstrauss)."""
    table = _read_columns(
        url,
        s3,
        ["source_id", "embedding"],
        lambda err: (
            f"text_embeddings={url} is not a table with columns source_id and embedding ({err}); make it with python "
            "jobs/describe.py"
        ),
    )
    ids = table.column("source_id").to_pylist()
    vectors = np.asarray(table.column("embedding").to_pylist(), dtype=np.float32)
    if vectors.ndim != 2 or len(ids) == 0:
        raise ValueError(f"text_embeddings={url} holds no embeddings of one length; remake it with jobs/describe.py")
    if centre:
        vectors = vectors - vectors.mean(axis=0, keepdims=True)
    if vectors.shape[1] != dim:
        from datprl.priors.encoders import project

        vectors = project(vectors, dim, seed=_projection_seed(url, s3))
    else:
        vectors = _unit(vectors)
    return dict(zip(ids, vectors))


def description_prototypes(embeddings: dict[str, np.ndarray], count: int, seed: int) -> np.ndarray:
    """Up to ``count`` prototype directions of the descriptions: the k-means centroids (k-means++ start, 10 restarts,
    seeded) of the embeddings from :func:`load_text_embeddings`, as unit vectors, (k, D) float32 with k = ``count``,
    or the number of distinct embeddings when there are fewer.

    Used to start the domain pool's keys (``TrainConfig.domain_key_init=descriptions``; ours). Why: top-k selection
    has no gradient, so which prompts an image's description picks (L_psel's targets) is decided by where the random
    keys happen to start, and with random keys the descriptions of different domains shared prompts in a
    seed-dependent way (docs/experiments/prompt-selection.md). Centroids of the centred embeddings start each
    key on one group of similar descriptions."""
    from sklearn.cluster import KMeans

    vectors = np.unique(np.stack(list(embeddings.values())).astype(np.float32), axis=0)
    clusters = min(count, len(vectors))
    centroids = KMeans(n_clusters=clusters, n_init=10, random_state=seed).fit(vectors).cluster_centers_
    return _unit(centroids).astype(np.float32)


def load_description_domains(url: str, s3: S3Settings | None) -> dict[str, str]:
    """source_id -> the domain the describe job recorded for it (the table's ``domain`` column)."""
    table = _read_columns(
        url,
        s3,
        ["source_id", "domain"],
        lambda err: (
            f"text_embeddings={url} has no domain column; domain_key_init=domains needs it: remake the table with "
            "python jobs/describe.py, or use domain_key_init=descriptions"
        ),
    )
    return dict(zip(table.column("source_id").to_pylist(), table.column("domain").to_pylist()))


def domain_prototypes(embeddings: dict[str, np.ndarray], domains: dict[str, str], count: int) -> np.ndarray:
    """Key directions for ``domain_key_init=domains``: each domain's mean description embedding (unit length), repeated
    so that every domain owns ``count // len(domains)`` keys, in sorted domain order; (k, D) float32, k <= count.

    Why (ours): with keys at k-means centroids of the descriptions, an image whose domain the query is unsure of sits
    between the groups, and top-k then mixes keys of several domains the same way for every image (natural photos
    and remote sensing both picked two natural keys and one remote-sensing key). Keys that coincide within a domain make
    top-k choose a whole domain's group, so the selection follows the query's best guess of the domain
    (docs/experiments/prompt-selection.md, cause 5)."""
    groups: dict[str, list[np.ndarray]] = {}
    for source, vector in embeddings.items():
        if source in domains:
            groups.setdefault(domains[source], []).append(vector)
    if not groups:
        raise ValueError("no description embedding has a domain: remake the table with python jobs/describe.py")
    per_domain = count // len(groups)
    if per_domain < 1:
        raise ValueError(f"{len(groups)} domains need at least as many prompts in the domain pool, it has {count}")
    means = _unit(np.stack([np.mean(groups[name], axis=0) for name in sorted(groups)]).astype(np.float32))
    return np.repeat(means, per_domain, axis=0)
