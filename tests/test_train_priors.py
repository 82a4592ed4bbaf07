"""The training side of the domain priors (datprl.platform.train.priors): where a run's text embeddings come from,
when they may be described on the fly, and their projection to the prompt dimension D."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from datprl.platform.train.priors import (
    description_prototypes,
    domain_prototypes,
    load_description_domains,
    ensure_text_embeddings,
    load_text_embeddings,
    resolve_text_embeddings,
)
from datprl.priors.encoders import project


def _table(folder, vectors: np.ndarray, seed: int | None) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    ids = [f"src{i}" for i in range(len(vectors))]
    pq.write_table(
        pa.table({"source_id": ids, "embedding": list(vectors.astype(np.float32))}), folder / "descriptions.parquet"
    )
    if seed is not None:
        (folder / "manifest.json").write_text(json.dumps({"projection": {"seed": seed}}))
    return str(folder / "descriptions.parquet")


def test_auto_resolves_next_to_the_dataset():
    assert resolve_text_embeddings("auto", "/d/corpus") == "/d/corpus/priors/descriptions.parquet"
    assert resolve_text_embeddings("auto", "s3://b/corpus") == "s3://b/corpus/priors/descriptions.parquet"
    assert resolve_text_embeddings("s3://b/e.parquet", "/d") == "s3://b/e.parquet"
    assert resolve_text_embeddings(None, "/d") is None


def test_embeddings_are_projected_with_the_recorded_seed(tmp_path):
    raw = np.random.default_rng(0).standard_normal((5, 384))
    url = _table(tmp_path / "a", raw, seed=3)
    loaded = load_text_embeddings(url, None, dim=64, centre=False)
    expected = project(raw.astype(np.float32), 64, seed=3)
    assert list(loaded) == [f"src{i}" for i in range(5)]
    np.testing.assert_allclose(np.stack(list(loaded.values())), expected, atol=1e-6)
    assert not np.allclose(expected, project(raw.astype(np.float32), 64, seed=0))  # the seed matters
    # Already of the prompt dimension (CLIP's 1024-d text tower and D = 1024): used as they are, unit length.
    same = load_text_embeddings(url, None, dim=384, centre=False)
    np.testing.assert_allclose(same["src1"], raw[1] / np.linalg.norm(raw[1]), atol=1e-6)
    # No manifest: seed 0.
    plain = load_text_embeddings(_table(tmp_path / "b", raw, seed=None), None, dim=64, centre=False)
    np.testing.assert_allclose(plain["src0"], project(raw.astype(np.float32), 64, seed=0)[0], atol=1e-6)


def test_centring_removes_the_shared_template_component(tmp_path):
    """Embeddings with a large shared component (as descriptions from one template have): centred, two groups point
    apart, and the table's mean direction no longer matches every row."""
    rng = np.random.default_rng(1)
    shared, a, b = rng.standard_normal((3, 384))
    raw = np.stack(
        [3 * shared + a + 0.1 * rng.standard_normal(384) for _ in range(4)]
        + [3 * shared + b + 0.1 * rng.standard_normal(384) for _ in range(4)]
    )
    url = _table(tmp_path, raw, seed=0)
    plain = np.stack(list(load_text_embeddings(url, None, dim=384, centre=False).values()))
    centred = np.stack(list(load_text_embeddings(url, None, dim=384).values()))
    assert (plain[:4] @ plain[4:].T).min() > 0.7  # the groups look alike before
    assert (centred[:4] @ centred[4:].T).max() < -0.5  # and point apart after
    np.testing.assert_allclose(np.linalg.norm(centred, axis=1), 1.0, atol=1e-5)


def test_a_table_of_another_shape_is_rejected(tmp_path):
    path = tmp_path / "other.parquet"
    pq.write_table(pa.table({"id": ["a"], "vector": [[1.0, 2.0]]}), path)
    with pytest.raises(ValueError, match="columns source_id and embedding"):
        load_text_embeddings(str(path), None, dim=64)


def test_missing_embeddings_are_described_only_when_allowed(tmp_path):
    existing = _table(tmp_path / "p", np.ones((1, 4)), seed=None)
    assert ensure_text_embeddings(None, "/d", None, describe=True) is False  # L_align off
    assert ensure_text_embeddings(existing, "/d", None, describe=True) is False  # nothing to do
    missing = str(tmp_path / "none" / "descriptions.parquet")
    with pytest.raises(FileNotFoundError, match="jobs/describe.py.*text_embeddings=null"):
        ensure_text_embeddings(missing, "/d", None, describe=False)


def test_inference_needs_no_describer_or_text_encoder(tmp_path):
    """The paper's point: the priors shape training only. Loading exported weights and restoring an image through
    the serving engine imports neither the priors package nor transformers / vLLM."""
    import subprocess
    import sys

    code = """
import sys, torch
from datprl.models import create_model, save_model
from datprl.serve.config import ServeConfig
from datprl.serve.engine import load_engine
path = save_model(create_model("paper_tiny"), sys.argv[1])
engine = load_engine(ServeConfig(weights=str(path)), device="cpu")
restored, prompts = engine.restore(torch.rand(3, 24, 24))
assert restored.shape == (3, 24, 24) and prompts["domain"]
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("transformers", "vllm") or m.startswith("datprl.priors"))
print("loaded:", loaded)
assert not loaded, loaded
"""
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "net")], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_prototypes_are_unit_centroids_of_the_description_groups():
    rng = np.random.default_rng(0)
    centres = np.eye(8, dtype=np.float32)[:3] * 5
    table = {f"s{i}": (centres[i % 3] + rng.normal(0, 0.1, 8)).astype(np.float32) for i in range(30)}
    prototypes = description_prototypes(table, count=3, seed=0)
    assert prototypes.shape == (3, 8) and prototypes.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(prototypes, axis=1), 1, atol=1e-5)
    # each group's centre is matched by one prototype (cosine > 0.99), and no two prototypes share a group
    best = (prototypes @ (centres / 5).T).argmax(0)
    assert sorted(best.tolist()) == [0, 1, 2] and (prototypes @ (centres / 5).T).max(0).min() > 0.99
    np.testing.assert_array_equal(prototypes, description_prototypes(table, count=3, seed=0))  # seeded


def test_fewer_descriptions_than_keys_give_one_prototype_each():
    table = {
        "a": np.array([1, 0, 0], np.float32),
        "b": np.array([0, 1, 0], np.float32),
        "c": np.array([0, 1, 0], np.float32),
    }
    prototypes = description_prototypes(table, count=9, seed=0)
    assert sorted(map(tuple, prototypes.round(5).tolist())) == [(0, 1, 0), (1, 0, 0)]


def test_domain_keys_start_at_the_given_directions():
    import torch

    from datprl.models import create_model

    pool = create_model("paper_tiny", domain_pool={"size": 9, "top_k": 3}).domain_pool  # trained keys
    directions = torch.randn(pool.size, pool.prompt_keys.shape[1])
    pool.start_keys_at(directions)
    cosine = torch.nn.functional.cosine_similarity(pool.prompt_keys, directions, dim=-1)
    assert torch.allclose(cosine, torch.ones(pool.size), atol=1e-5)
    assert pool.prompt_keys.requires_grad  # still a trained parameter
    before = pool.prompt_keys.detach().clone()
    pool.start_keys_at(directions[:2] * 7)  # fewer directions: only the first keys move, to the same norm
    assert torch.equal(pool.prompt_keys[2:], before[2:])
    assert torch.allclose(pool.prompt_keys[:2].norm(dim=-1), before[:2].norm(dim=-1))
    with pytest.raises(ValueError, match="at most"):
        pool.start_keys_at(torch.randn(pool.size + 1, pool.prompt_keys.shape[1]))


def test_domain_prototypes_give_each_domain_an_equal_group_at_its_mean():
    rng = np.random.default_rng(0)
    axes = {"medical": 0, "natural": 1, "remote_sensing": 2}
    table, domains = {}, {}
    for i in range(30):
        domain = sorted(axes)[i % 3]
        table[f"s{i}"] = (np.eye(6, dtype=np.float32)[axes[domain]] + rng.normal(0, 0.1, 6)).astype(np.float32)
        domains[f"s{i}"] = domain
    table["unlabelled"] = np.ones(6, np.float32)  # a description without a domain is left out
    prototypes = domain_prototypes(table, domains, count=10)  # 3 domains x 3 keys; the 10th key keeps its start
    assert prototypes.shape == (9, 6) and prototypes.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(prototypes, axis=1), 1, atol=1e-5)
    for group, domain in enumerate(sorted(axes)):  # sorted domain order, three identical keys each
        keys = prototypes[3 * group : 3 * group + 3]
        assert (keys == keys[0]).all() and keys[0].argmax() == axes[domain] and keys[0].max() > 0.99
    with pytest.raises(ValueError, match="at least as many prompts"):
        domain_prototypes(table, domains, count=2)
    with pytest.raises(ValueError, match="no description embedding has a domain"):
        domain_prototypes(table, {}, count=9)


def test_description_domains_are_read_from_the_table_or_named_missing(tmp_path):
    url = tmp_path / "descriptions.parquet"
    pq.write_table(pa.table({"source_id": ["a", "b"], "domain": ["natural", "medical"]}), url)
    assert load_description_domains(str(url), None) == {"a": "natural", "b": "medical"}
    pq.write_table(pa.table({"source_id": ["a"], "embedding": [[0.0, 1.0]]}), url)
    with pytest.raises(ValueError, match="no domain column; domain_key_init=domains needs it"):
        load_description_domains(str(url), None)
