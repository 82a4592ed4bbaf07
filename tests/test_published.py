"""Our `paper` network computes exactly what the published DATPRL-IR network computes (reference fixture)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from datprl.models import config_from_published, load_published

from conftest import OFFICIAL_CHECKPOINT

TOLERANCE = 1e-4  # max abs error on outputs in [0, 1]; measured: about 3e-7 in float32


@pytest.fixture(scope="module")
def published():
    config = json.loads((OFFICIAL_CHECKPOINT / "tiny.config.json").read_text())
    weights = load_file(str(OFFICIAL_CHECKPOINT / "tiny.weights.safetensors"))
    io = load_file(str(OFFICIAL_CHECKPOINT / "tiny.io.safetensors"))
    return config, weights, io


def _max_error(model, io) -> float:
    with torch.no_grad():
        return (model.eval()(io["input"]) - io["output"]).abs().max().item()


@pytest.mark.parametrize("nested", [False, True], ids=["flat", "params"])
def test_fixture_reproduced(published, nested):
    config, weights, io = published
    state = {"params": weights} if nested else weights
    model = load_published(config, state)
    assert _max_error(model, io) < TOLERANCE
    # the fixture is not trivial: the output is far from the input
    assert (io["input"] - io["output"]).abs().max() > 0.1


def test_fixture_is_sensitive_to_the_prompt_path(published):
    """The tolerance discriminates: a small change to the domain query projector alone breaks equivalence."""
    config, weights, io = published
    perturbed = dict(weights)
    perturbed["domain_mapper.mapper.8.bias"] = weights["domain_mapper.mapper.8.bias"] + 0.05
    assert _max_error(load_published(config, perturbed), io) > TOLERANCE


def test_fresh_model_from_published_config(published):
    config, _, io = published
    model = load_published(config, None)
    c = config_from_published(config)
    assert (c.width, c.prompt_dim, c.task_pool.size, c.task_pool.top_k, c.domain_pool.size, c.domain_pool.top_k) == (
        16,
        64,
        5,
        2,
        6,
        3,
    )
    assert _max_error(model, io) > TOLERANCE  # random weights do not reproduce the fixture


def test_missing_and_unexpected_keys_are_named(published):
    config, weights, _ = published
    broken = {k: v for k, v in weights.items() if k != "output.weight"}
    broken["extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"missing 1 \(e.g. \['output.weight'\]\).*unexpected 1"):
        load_published(config, broken)


def test_shape_mismatch_is_named(published):
    config, weights, _ = published
    with pytest.raises(ValueError, match="other shapes"):
        load_published({**config, "domain_pool_size": 7}, weights)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"fusion_method": "concat"}, "fusion_method"),
        ({"LayerNorm_type": "BiasFree"}, "LayerNorm_type"),
        ({"domain_prompt_dim": 32}, "must be equal"),
        ({"bogus": 1}, "unknown published config keys"),
        ({"degradation_top_k": 9}, "top_k"),
    ],
)
def test_bad_published_config(published, change, message):
    config, _, _ = published
    with pytest.raises(ValueError, match=message):
        load_published({**config, **change})
