"""datprl.models: the DATPRL-IR network, its variants, published layout, weights format and input checks.

Forward/backward runs only on the ``*_tiny`` variants (CPU, seconds); the full-size variants are built for parameter
counts and state-dict layout only, never run.
"""

from __future__ import annotations

import ast
import json
import math
import re
import struct
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from safetensors import safe_open

from datprl.models import (
    VARIANTS,
    ModelConfig,
    PoolSelection,
    PromptPoolConfig,
    RestorationOutput,
    convert_published_state_dict,
    count_parameters,
    create_model,
    load_model,
    save_model,
    variant_config,
)
from datprl.models.backbone import GatedFusionBlock

# The CPU-sized ones: a "tiny" or "small" part anywhere in the name (paper_tiny_routed is one too).
TINY_VARIANTS = sorted(name for name in VARIANTS if {"tiny", "small"} & set(name.split("_")))
OFFICIAL_CHECKPOINT = Path(__file__).resolve().parent / "fixtures" / "official-checkpoint"
KEYS_TSV = OFFICIAL_CHECKPOINT / "paper-6task-keys.tsv"
INERT = re.compile(r"\.cross_attn_[qk]\.(weight|bias)$")

# (batch, height, width): sizes that are not multiples of 8, the smallest legal size, and a single tall image.
SIZES = [(2, 37, 45), (2, 8, 8), (1, 64, 33)]


pytestmark = pytest.mark.usefixtures("single_torch_thread")


def test_tiny_variants_registered():
    # The parametrisations below derive from VARIANTS; make sure they cover prompted and plain networks.
    assert TINY_VARIANTS, "no *_tiny variant registered"
    assert any(VARIANTS[n].domain_pool is not None for n in TINY_VARIANTS)
    assert any(VARIANTS[n].task_pool is None for n in TINY_VARIANTS)


def _model(name: str, seed: int = 0, **overrides) -> torch.nn.Module:
    # A random (not zero) final conv, so outputs depend on every part of the network in these tests.
    torch.manual_seed(seed)
    return create_model(name, **{"zero_init_output": False, **overrides})


@pytest.mark.parametrize("name", TINY_VARIANTS)
def test_fresh_network_is_the_identity(name):
    x = _images(1, 21, 19)
    with torch.no_grad():
        assert torch.equal(create_model(name).eval()(x), x)


def _images(batch: int, height: int, width: int, seed: int = 1, channels: int = 3) -> torch.Tensor:
    return torch.rand(batch, channels, height, width, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------------------------------
# Forward / backward on every tiny variant


@pytest.mark.parametrize("size", SIZES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", TINY_VARIANTS)
def test_forward_shape_dtype_finite(name, size):
    model = _model(name).eval()
    x = _images(*size)
    with torch.no_grad():
        y = model(x)
    assert isinstance(y, torch.Tensor)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("name", TINY_VARIANTS)
def test_forward_float64(name):
    model = _model(name).double().eval()
    x = _images(1, 19, 23).double()
    with torch.no_grad():
        out = model(x, return_aux=True)
    assert out.image.dtype == torch.float64 and out.image.shape == x.shape
    assert torch.isfinite(out.image).all()


@pytest.mark.parametrize("name", TINY_VARIANTS)
def test_backward_reaches_every_trainable_parameter(name):
    model = _model(name).train()
    out = model(_images(2, 37, 45), return_aux=True)
    (out.image**2).mean().backward()

    params = dict(model.named_parameters())
    frozen = {n for n, p in params.items() if not p.requires_grad}
    # Frozen parameters are exactly the inert AGF query/key projections, and every AGF block has them.
    assert frozen == {n for n in params if INERT.search(n)}
    fusion_blocks = sum(isinstance(m, GatedFusionBlock) for m in model.modules())
    assert len(frozen) == 4 * fusion_blocks
    assert (fusion_blocks > 0) == (model.config.task_pool is not None)
    for n in frozen:
        assert params[n].grad is None, n

    missing = [n for n, p in params.items() if p.requires_grad and p.grad is None]
    assert not missing, f"no gradient reached {missing}"
    nonfinite = [n for n, p in params.items() if p.grad is not None and not torch.isfinite(p.grad).all()]
    assert not nonfinite, nonfinite

    # Everything except the parts documented below gets a non-zero gradient.
    partial = re.compile(r"(prompt_values|fusion\.cross_attention\.in_proj_(weight|bias))$")
    zero = [n for n, p in params.items() if p.grad is not None and not partial.search(n) and not p.grad.any()]
    assert not zero, f"identically zero gradient: {zero}"

    for pool_name, selection in (("task_pool", out.task), ("domain_pool", out.domain)):
        pool = getattr(model, pool_name)
        if pool is None:
            continue
        for attr in ("temperature",) if pool.fixed_keys else ("prompt_keys", "temperature"):
            assert getattr(pool, attr).grad.abs().sum() > 0, f"{pool_name}.{attr}"
        if pool.fixed_keys:  # set from outside (training starts them at the descriptions), never trained
            assert pool.prompt_keys.grad is None
        for n, p in pool.value_aggregation.named_parameters():
            assert p.grad is not None and p.grad.any(), f"{pool_name}.value_aggregation.{n}"
        # Only the selected prompts' values receive gradient.
        row_has_grad = pool.prompt_values.grad.flatten(1).abs().sum(1) > 0
        selected = torch.zeros(pool.size, dtype=torch.bool)
        selected[selection.indices.unique()] = True
        assert torch.equal(row_has_grad, selected)

    if model.fusion is not None:
        # Single-token cross-attention: the query/key rows of in_proj are inert (as in the published network).
        d = model.config.prompt_dim
        attn = model.fusion.cross_attention
        assert not attn.in_proj_weight.grad[: 2 * d].any() and not attn.in_proj_bias.grad[: 2 * d].any()
        assert attn.in_proj_weight.grad[2 * d :].any() and attn.in_proj_bias.grad[2 * d :].any()


def test_inert_agf_projections_do_not_affect_output():
    model = _model("paper_tiny").eval()
    x = _images(2, 16, 24)
    with torch.no_grad():
        before = model(x)
        for n, p in model.named_parameters():
            if INERT.search(n):
                p.normal_(0, 3.0)
        after = model(x)
    assert torch.equal(before, after)


# ----------------------------------------------------------------------------------------------------------------------
# Parameter counts and the published layout (full-size variants: built, never run)


@pytest.fixture(scope="module")
def paper():
    return create_model("paper")


def _published_keys() -> dict[str, tuple[int, ...]]:
    shapes = {}
    for line in KEYS_TSV.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        key, shape = line.split("\t")
        shapes[key] = tuple(ast.literal_eval(shape))
    return shapes


def test_paper_parameter_count(paper):
    assert count_parameters(paper) == 53_133_552
    assert count_parameters(paper) == sum(math.prod(s) for s in _published_keys().values())


def test_task_only_parameter_count():
    # paper minus domain pool (2,146,305), domain query (26,308) and fusion (4,198,400 + 2,048 + 4,197,376).
    assert count_parameters(create_model("task_only")) == 42_563_115


def test_paper_backbone_is_paper_without_prompts(paper):
    # `paper_backbone` keeps the paper's decoder (levels 1/2/3 with 6/6/4 blocks) and drops every prompt part.
    restormer = create_model("paper_backbone")
    prompt_parts = (paper.task_query, paper.task_pool, paper.domain_query, paper.domain_pool, paper.fusion)
    agf = sum(
        p.numel()
        for m in paper.modules()
        if isinstance(m, GatedFusionBlock)
        for n, p in m.named_parameters()
        if not n.startswith(("norm1", "norm2", "attn.", "ffn."))
    )
    expected = count_parameters(paper) - sum(count_parameters(m) for m in prompt_parts) - agf
    assert count_parameters(restormer) == expected == 25_449_682


def test_restormer_variant_matches_paper_restormer_count():
    assert count_parameters(create_model("restormer")) == 26_126_644


def test_published_layout_matches_paper_state_dict(paper):
    published = _published_keys()
    assert len(published) == 866
    converted = convert_published_state_dict({k: torch.empty(s, device="meta") for k, s in published.items()})
    ours = {k: tuple(v.shape) for k, v in paper.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in converted.items()}
    assert sorted(set(ours) - set(theirs)) == [] and sorted(set(theirs) - set(ours)) == []
    assert {k: s for k, s in theirs.items() if ours[k] != s} == {}
    # Nested under "params" and with a DDP "module." prefix, as released checkpoints may be.
    nested = {"params": {f"module.{k}": torch.empty(s, device="meta") for k, s in published.items()}}
    assert {k: tuple(v.shape) for k, v in convert_published_state_dict(nested).items()} == ours


# ----------------------------------------------------------------------------------------------------------------------
# Determinism and selection noise


def test_eval_is_deterministic():
    model = _model("paper_tiny").eval()
    x = _images(4, 24, 20)
    with torch.no_grad():
        a = model(x, return_aux=True)
        b = model(x, return_aux=True)
    assert torch.equal(a.image, b.image)
    assert torch.equal(a.prompt, b.prompt)
    for sa, sb in ((a.task, b.task), (a.domain, b.domain)):
        for field in ("query", "similarities", "indices", "weights", "representation"):
            assert torch.equal(getattr(sa, field), getattr(sb, field)), field
        # Without noise the selection is the clean top-k.
        clean = sa.similarities.topk(sa.indices.shape[1], dim=-1).indices
        assert torch.equal(clean.sort(-1).values, sa.indices.sort(-1).values)


def test_train_noise_changes_selection_but_weights_use_clean_similarities():
    model = _model("paper_tiny", selection_noise_std=5.0).train()
    assert model.task_pool.noise_std == 5.0 and model.domain_pool.noise_std == 5.0
    x = _images(16, 16, 16)
    torch.manual_seed(123)
    with torch.no_grad():
        a = model(x, return_aux=True)
        b = model(x, return_aux=True)
    for pool, sa, sb in ((model.task_pool, a.task, b.task), (model.domain_pool, a.domain, b.domain)):
        # Same input, same clean scores ...
        assert torch.equal(sa.similarities, sb.similarities)
        assert torch.allclose(sa.similarities, pool.similarities(sa.query))
        # ... but noisy selection differs for some samples, and is not always the clean top-k.
        changed = (sa.indices.sort(-1).values != sb.indices.sort(-1).values).any(-1)
        assert changed.any()
        clean = sa.similarities.topk(pool.top_k, dim=-1).indices.sort(-1).values
        assert (clean != sa.indices.sort(-1).values).any()
        for sel in (sa, sb):
            expected = sel.similarities.gather(1, sel.indices).softmax(-1)
            torch.testing.assert_close(sel.weights, expected, rtol=0, atol=1e-6)


def _three_kinds(n: int) -> torch.Tensor:
    """Images of three clearly different kinds, in turn: dark grey with faint noise, uniform noise, flat orange."""
    g = torch.Generator().manual_seed(0)
    kinds = [
        lambda: torch.full((3, 32, 32), 0.1) + 0.05 * torch.rand(1, 32, 32, generator=g),
        lambda: torch.rand(3, 32, 32, generator=g),
        lambda: torch.tensor([0.9, 0.6, 0.2]).view(3, 1, 1).expand(3, 32, 32).clone(),
    ]
    return torch.stack([kinds[i % 3]() for i in range(n)])


@pytest.mark.parametrize("centring", [False, True], ids=["published", "centred"])
def test_query_centring_makes_selection_depend_on_the_image(centring):
    """The published query projector gives nearly the same query to every image (a shared component dominates), so
    top-k selects the same prompts for all; centring the query (``query_centering``) removes that component."""
    torch.manual_seed(0)
    # both pools follow the model-wide switch (paper_tiny's own domain pool is never centred)
    model = create_model("paper_tiny", query_centering=centring, domain_pool={"size": 9, "top_k": 3}).train()
    x = _three_kinds(12)
    with torch.no_grad():
        for _ in range(3):  # training batches set the running centre used in evaluation
            model(x)
        out = model.eval()(x, return_aux=True)
    for sel in (out.task, out.domain):
        unit = torch.nn.functional.normalize(sel.query, dim=-1)
        cosines = unit @ unit.t()
        selections = {tuple(sorted(row)) for row in sel.indices.tolist()}
        if centring:
            assert cosines.min() < 0.5 and len(selections) >= 2
        else:
            assert cosines.min() > 0.99 and len(selections) == 1


def test_query_centre_is_a_running_mean_of_training_batches_and_fixed_in_evaluation():
    torch.manual_seed(0)
    # the embedded default's design with a centred domain pool; its domain query read from the patch embedding, as
    # published, so the expected queries below are computed from model.patch_embed
    model = create_model("paper_tiny", domain_query_features="shallow", domain_pool={"size": 9, "top_k": 3})
    pool = model.domain_pool
    assert model.config.query_centering and pool.query_center is not None
    assert "domain_pool.query_center" in model.state_dict()  # saved and loaded with the weights
    assert "domain_pool.query_center" not in create_model("paper_tiny", query_centering=False).state_dict()
    x = _three_kinds(6)
    with torch.no_grad():
        first = model.domain_query(model.patch_embed(x)).mean(0)
        model.train()(x)
        torch.testing.assert_close(pool.query_center, first)  # the first batch sets the centre
        model(x)
        torch.testing.assert_close(pool.query_center, first)  # the same batch again: the mean it already holds
        model(x[:3])
        expected = first.lerp(model.domain_query(model.patch_embed(x[:3])).mean(0), model.config.query_center_momentum)
        torch.testing.assert_close(pool.query_center, expected)
        centre = pool.query_center.clone()
        out = model.eval()(x[:1], return_aux=True)  # a single image in evaluation: centred by the running mean
        torch.testing.assert_close(pool.query_center, centre)
        torch.testing.assert_close(out.domain.query, model.domain_query(model.patch_embed(x[:1])) - centre)


# ----------------------------------------------------------------------------------------------------------------------
# Auxiliary outputs


@pytest.mark.parametrize("name", TINY_VARIANTS)
def test_return_aux_shapes(name):
    model = _model(name).eval()
    b, d = 3, model.config.prompt_dim
    x = _images(b, 21, 30)
    with torch.no_grad():
        out = model(x, return_aux=True)
        plain = model(x)
    assert isinstance(out, RestorationOutput)
    assert torch.equal(out.image, plain)
    cfg = model.config
    if cfg.task_pool is None:
        assert out.task is None and out.domain is None and out.prompt is None
        return
    for selection, pool_cfg in ((out.task, cfg.task_pool), (out.domain, cfg.domain_pool)):
        if pool_cfg is None:
            assert selection is None
            continue
        n, k = pool_cfg.size, pool_cfg.top_k
        assert isinstance(selection, PoolSelection)
        assert selection.query.shape == (b, d)
        assert selection.similarities.shape == (b, n)
        assert selection.indices.shape == (b, k) and selection.indices.dtype == torch.int64
        assert ((selection.indices >= 0) & (selection.indices < n)).all()
        assert (selection.indices.sort(-1).values.diff(dim=-1) > 0).all(), "a prompt selected twice"
        assert selection.weights.shape == (b, k) and (selection.weights > 0).all()
        torch.testing.assert_close(selection.weights.sum(-1), torch.ones(b))
        assert selection.representation.shape == (b, d)
    assert out.prompt.shape == (b, d)
    if cfg.domain_pool is None:
        assert torch.equal(out.prompt, out.task.representation)
    else:
        assert not torch.equal(out.prompt, out.task.representation)


def test_temperature_is_clamped():
    model = _model("paper_tiny").eval()
    pool = model.task_pool
    q = torch.randn(5, model.config.prompt_dim)
    with torch.no_grad():
        pool.temperature.fill_(2.0)
        at_max = pool.similarities(q)
        pool.temperature.fill_(10.0)
        above = pool.similarities(q)
        pool.temperature.fill_(0.1)
        at_min = pool.similarities(q)
        pool.temperature.fill_(0.001)
        below = pool.similarities(q)
    assert torch.equal(at_max, above)
    assert torch.equal(at_min, below)
    assert at_max.abs().max() <= 1 / 2.0 + 1e-6 and at_min.abs().max() <= 1 / 0.1 + 1e-4
    torch.testing.assert_close(at_min, at_max * 20)


# ----------------------------------------------------------------------------------------------------------------------
# Padding


@pytest.mark.parametrize("name", TINY_VARIANTS)
def test_padding_matches_explicit_zero_padding(name):
    model = _model(name).eval()
    x = _images(2, 37, 45)
    padded = torch.nn.functional.pad(x, (0, 3, 0, 3))
    assert padded.shape[-2:] == (40, 48)
    with torch.no_grad():
        y = model(x)
        y_padded = model(padded)
    assert torch.equal(y, y_padded[..., :37, :45])


# ----------------------------------------------------------------------------------------------------------------------
# Our weights format


def test_save_load_round_trip(tmp_path):
    model = _model("paper_tiny").eval()
    with torch.no_grad():
        for n, p in model.named_parameters():  # move gates and temperatures off their initial values
            if n.endswith(("feature_weight", "prompt_weight", "temperature")):
                p.add_(torch.rand_like(p))
    weights = save_model(model, tmp_path / "net")
    assert weights == tmp_path / "net.safetensors"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net.json", "net.safetensors"]

    # safetensors, not pickle: 8-byte little-endian header length, then a JSON header.
    raw = weights.read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + header_len])
    assert header["__metadata__"]["network"] == "DATPRL-IR"
    assert raw[:2] != b"PK" and raw[:1] != b"\x80"
    with safe_open(str(weights), framework="pt") as f:
        assert set(f.keys()) == set(model.state_dict())
    assert json.loads((tmp_path / "net.json").read_text())["model"] == model.config.model_dump(mode="json")

    x = _images(2, 37, 45)
    for path in (tmp_path / "net", tmp_path / "net.safetensors", str(tmp_path / "net")):
        loaded = load_model(path).eval()
        assert loaded.config == model.config
        for n, p in loaded.named_parameters():
            assert p.requires_grad == (not INERT.search(n)), n
        with torch.no_grad():
            assert torch.equal(loaded(x), model(x))


def test_load_model_mismatched_config_names_keys(tmp_path):
    save_model(_model("paper_tiny"), tmp_path / "net")
    config_file = tmp_path / "net.json"
    other = variant_config("paper_tiny", task_pool={"size": 7, "top_k": 3}).model_dump(mode="json")
    config_file.write_text(json.dumps({"model": other}))
    with pytest.raises(ValueError, match=r"task_pool\.prompt_(keys|values)"):
        load_model(tmp_path / "net")

    config_file.write_text(json.dumps({"model": VARIANTS["task_only_tiny"].model_dump(mode="json")}))
    with pytest.raises(ValueError, match=r"unexpected .*domain"):
        load_model(tmp_path / "net")


def test_load_model_missing_or_broken_files(tmp_path):
    save_model(_model("restormer_tiny"), tmp_path / "net")
    (tmp_path / "net.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a valid model config"):
        load_model(tmp_path / "net")
    (tmp_path / "net.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"net\.json"):
        load_model(tmp_path / "net")
    with pytest.raises(FileNotFoundError, match=r"absent\.safetensors"):
        load_model(tmp_path / "absent")


# ----------------------------------------------------------------------------------------------------------------------
# Factory and config validation


def test_unknown_variant_lists_valid_names():
    with pytest.raises(ValueError) as info:
        create_model("resnet")
    message = str(info.value)
    assert "resnet" in message
    for name in VARIANTS:
        assert name in message


def test_top_k_larger_than_pool_is_rejected():
    with pytest.raises(ValidationError, match="top_k"):
        PromptPoolConfig(size=2, top_k=3)
    with pytest.raises(ValidationError, match="top_k"):
        ModelConfig(task_pool={"size": 4, "top_k": 5})
    with pytest.raises(ValidationError, match="top_k"):
        create_model("paper_tiny", domain_pool={"size": 2, "top_k": 3})


def test_variant_overrides():
    cfg = variant_config("paper", task_pool={"size": 20, "top_k": 3})
    assert cfg.task_pool == PromptPoolConfig(size=20, top_k=3)
    assert cfg.domain_pool == VARIANTS["paper"].domain_pool
    assert VARIANTS["paper"].task_pool == PromptPoolConfig(size=15, top_k=3), "override leaked into the registry"

    model = _model("paper_tiny", task_pool={"size": 20, "top_k": 4}).eval()
    assert model.task_pool.size == 20 and model.task_pool.top_k == 4
    with torch.no_grad():
        out = model(_images(2, 16, 16), return_aux=True)
    assert out.task.similarities.shape == (2, 20) and out.task.indices.shape == (2, 4)

    assert create_model("paper_tiny", domain_pool=None).domain_pool is None
    with pytest.raises(ValidationError):
        variant_config("paper_tiny", no_such_field=1)
    with pytest.raises(ValidationError, match="domain pool needs a task pool"):
        variant_config("paper_tiny", task_pool=None)


def test_create_model_from_config():
    cfg = variant_config("restormer_tiny", in_channels=1)
    model = create_model(cfg)
    assert model.config is cfg
    x = _images(1, 9, 10, channels=1)
    with torch.no_grad():
        assert model.eval()(x).shape == x.shape


# ----------------------------------------------------------------------------------------------------------------------
# Input checks


@pytest.mark.parametrize("name", TINY_VARIANTS)
@pytest.mark.parametrize(
    "shape", [(3, 16, 16), (1, 1, 16, 16), (1, 4, 16, 16), (1, 1, 3, 16, 16)], ids=lambda s: "x".join(map(str, s))
)
def test_wrong_input_shape(name, shape):
    model = _model(name)
    with pytest.raises(ValueError, match=r"expected a \(batch, 3, height, width\) tensor, got shape"):
        model(torch.rand(shape))


def test_domain_query_from_the_first_encoder_level_keeps_the_layout():
    """``domain_query_features=encoder1`` feeds the domain query projector the first encoder level's output instead of
    the patch embedding: the same parameters (so the same state dict loads), a different query, and the encoder
    level then also learns from the domain pool's losses."""
    torch.manual_seed(0)
    shallow = create_model("paper_tiny", domain_query_features="shallow").eval()
    encoder1 = create_model("paper_tiny", domain_query_features="encoder1").eval()
    encoder1.load_state_dict(shallow.state_dict())  # strict: identical keys and shapes
    x = torch.rand(2, 3, 24, 24)
    a, b = shallow(x, return_aux=True), encoder1(x, return_aux=True)
    assert not torch.allclose(a.domain.query, b.domain.query)
    torch.testing.assert_close(a.task.query, b.task.query)  # the task query is untouched
    encoder1.train()
    encoder1(x, return_aux=True).domain.representation.sum().backward()
    assert all(p.grad is not None for p in encoder1.encoder_level1.parameters())


def test_a_pool_with_fixed_keys_stores_them_as_a_buffer_and_loads_either_way():
    """``PromptPoolConfig.fixed_keys``: the keys are set from outside and never trained, under the same state-dict
    name, so weights move between the trained and the fixed layout."""
    fixed = create_model("paper_tiny")  # the embedded default's domain pool: fixed keys, query not centred
    trained = create_model("paper_tiny", domain_pool={"size": 9, "top_k": 3, "query_centering": False})
    pool = fixed.domain_pool
    assert not isinstance(pool.prompt_keys, torch.nn.Parameter) and "prompt_keys" in dict(pool.named_buffers())
    assert all(p is not pool.prompt_keys for p in fixed.parameters())
    assert fixed.state_dict().keys() == trained.state_dict().keys()
    fixed.load_state_dict(trained.state_dict())
    torch.testing.assert_close(pool.prompt_keys, trained.domain_pool.prompt_keys)
    pool.start_keys_at(torch.eye(9, pool.prompt_keys.shape[1]))  # training sets them before the first step
    out = fixed.train()(torch.rand(2, 3, 24, 24), return_aux=True)
    out.image.mean().backward()
    assert pool.prompt_keys.grad is None and fixed.task_pool.prompt_keys.grad is not None


def test_a_pool_may_override_the_model_wide_query_centring():
    model = create_model("paper_tiny", domain_pool={"size": 9, "top_k": 3, "query_centering": False})
    assert model.config.query_centering  # paper_tiny centres ...
    assert model.task_pool.query_center is not None and model.domain_pool.query_center is None  # ... but not here
