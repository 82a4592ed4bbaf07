"""Named variants, the one factory that builds them, published-checkpoint conversion, and our weights format."""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from safetensors.torch import load_file, save

from datprl.models.config import ModelConfig, PromptPoolConfig
from datprl.models.network import DATPRLIR
from datprl.platform.storage import atomic_write_bytes

_TINY = dict(
    width=16,
    encoder_blocks=(1, 1, 1),
    bottleneck_blocks=1,
    decoder_blocks=(1, 1, 1),
    refinement_blocks=1,
    prompt_dim=64,
    fusion_heads=4,
)

_SMALL = dict(
    width=32,
    encoder_blocks=(1, 2, 2),
    bottleneck_blocks=2,
    decoder_blocks=(2, 2, 1),
    refinement_blocks=1,
    prompt_dim=128,
    fusion_heads=4,
)

# paper_tiny's fields, shared with paper_tiny_routed (which differs in its task pool only).
_PAPER_TINY = dict(
    **_TINY,
    task_pool=PromptPoolConfig(size=6, top_k=3),
    domain_pool=PromptPoolConfig(size=9, top_k=3, query_centering=False, fixed_keys=True),
    query_centering=True,
    domain_query_features="encoder1",
)

#: Every registered variant.
#: ``paper``: the multi-domain network of the paper (53,133,552 parameters).
#: ``task_only``: its natural-image variant, task pool only (42,563,115).
#: ``restormer``: the plain Restormer the paper compares against (decoder levels 1/2/3 with 4/6/6 blocks,
#: 26,126,644 parameters). The published DATPRL-IR decoder has 6/6/4 instead.
#: ``paper_backbone``: the paper's own backbone with both pools removed (the "no pools" ablation row).
#: ``paper_centred``: ``paper`` with centred queries (``query_centering``), our fix of the prompt-selection collapse
#: of the published network; the variant to train from scratch. ``paper`` stays exactly the published layout.
#: ``paper_tiny``: the embedded default, a small network of the same design, task query centred; its domain pool has
#: 9 prompts and composes 3 (the paper's ratio, 5 of 15), so three domains can each own a distinct set of prompts, and
#: its domain query reads the first encoder level (``domain_query_features``). Its domain keys are fixed (training sets
#: them, ``domain_key_init=domains``: each domain's mean description, three keys per domain) and its domain query is
#: not centred, so top-k picks one domain's group (docs/priors.md).
#: ``paper_tiny_routed`` (ours, beyond the paper): ``paper_tiny`` with a task pool of 18 prompts, top-2, routed by the
#: recorded degradation task (``routing=task_labels``: training adds L_tsel, key j belongs to task j mod T), so each of
#: the default corpus's 9 tasks owns two keys. The paper-faithful unsupervised selection stays ``paper_tiny``.
#: ``paper_small``: ``paper_tiny``'s design at twice the width and about twice the depth (infra/train-quality.yaml,
#: the longer CPU recipe), with the domain pool ``paper_tiny`` had before the fixed keys (trained keys, centred query;
#: the fixed keys are not measured at this size).
VARIANTS: dict[str, ModelConfig] = {
    "paper": ModelConfig(),
    "paper_centred": ModelConfig(query_centering=True),
    "task_only": ModelConfig(domain_pool=None),
    "restormer": ModelConfig(task_pool=None, domain_pool=None, decoder_blocks=(4, 6, 6)),
    "paper_backbone": ModelConfig(task_pool=None, domain_pool=None),
    "paper_tiny": ModelConfig(**_PAPER_TINY),
    "paper_tiny_routed": ModelConfig(
        **{**_PAPER_TINY, "task_pool": PromptPoolConfig(size=18, top_k=2, routing="task_labels")}
    ),
    "paper_small": ModelConfig(
        **_SMALL,
        task_pool=PromptPoolConfig(size=6, top_k=3),
        domain_pool=PromptPoolConfig(size=9, top_k=3),
        query_centering=True,
        domain_query_features="encoder1",
    ),
    "task_only_tiny": ModelConfig(**_TINY, task_pool=PromptPoolConfig(size=6, top_k=3), domain_pool=None),
    "restormer_tiny": ModelConfig(**_TINY, task_pool=None, domain_pool=None),
}


def variant_config(name: str, **overrides: Any) -> ModelConfig:
    """The config of a registered variant, with field overrides (e.g. ``task_pool={"size": 20, "top_k": 3}``)."""
    if name not in VARIANTS:
        raise ValueError(f"unknown model variant {name!r}; choose one of: {', '.join(VARIANTS)}")
    base = VARIANTS[name].model_dump()
    base.update(overrides)
    return ModelConfig.model_validate(base)


def create_model(name: str | ModelConfig = "paper", **overrides: Any) -> DATPRLIR:
    """Build a freshly initialised network from a variant name (plus config overrides) or a full
    :class:`ModelConfig`."""
    config = name if isinstance(name, ModelConfig) else variant_config(name, **overrides)
    return DATPRLIR(config)


def count_parameters(model: torch.nn.Module) -> int:
    """All parameters, trainable or not (the count the paper reports)."""
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------------------------------------------------
# Published checkpoints (the authors' DualPromptRestormerv3 layout)

_PUBLISHED_KEYS = {
    "img_channel",
    "dim",
    "enc_blk_nums",
    "middle_blk_num",
    "dec_blk_nums",
    "refine_blk_num",
    "heads",
    "ffn_expansion_factor",
    "LayerNorm_type",
    "use_prompt",
    "domain_pool_size",
    "degradation_pool_size",
    "domain_prompt_dim",
    "degradation_prompt_dim",
    "domain_top_k",
    "degradation_top_k",
    "value_num_tokens",
    "prompt_fusion_method",
    "fusion_method",
}

# (published prefix regex, our prefix); applied once per key, first match wins.
_RENAMES = [
    (r"^patch_embed\.proj\.", "patch_embed."),
    (r"^latent_blocks\.", "latent."),
    (r"^degradation_prompt_pool\.", "task_pool."),
    (r"^domain_prompt_pool\.", "domain_pool."),
    (r"^degradation_mapper\.", "task_query."),
    (r"^domain_mapper\.", "domain_query."),
    (r"^prompt_cross_attention\.", "fusion.cross_attention."),
    (r"^prompt_fusion_norm\.", "fusion.norm."),
    (r"^prompt_fusion_ffn\.", "fusion.ffn."),
]


def config_from_published(published: Mapping[str, Any]) -> ModelConfig:
    """Translate the published constructor arguments (keys of ``tiny.config.json``) into our :class:`ModelConfig`."""
    unknown = set(published) - _PUBLISHED_KEYS
    if unknown:
        raise ValueError(
            f"unknown published config keys {sorted(unknown)}; expected a subset of {sorted(_PUBLISHED_KEYS)}"
        )
    p = dict(published)
    for key, expected in (
        ("LayerNorm_type", "WithBias"),
        ("prompt_fusion_method", "cross_attention"),
        ("fusion_method", "cross_attention"),
    ):
        if p.get(key, expected) != expected:
            raise ValueError(f"published config {key}={p[key]!r} is not supported; only {expected!r} is implemented")
    domain_dim = p.get("domain_prompt_dim", 1024)
    task_dim = p.get("degradation_prompt_dim", 1024)
    if domain_dim != task_dim:
        raise ValueError(f"domain_prompt_dim={domain_dim} and degradation_prompt_dim={task_dim} must be equal")
    use_prompt = p.get("use_prompt", True)
    fields: dict[str, Any] = dict(
        in_channels=p.get("img_channel", 3),
        width=p.get("dim", 48),
        encoder_blocks=tuple(p.get("enc_blk_nums", (4, 6, 6))),
        bottleneck_blocks=p.get("middle_blk_num", 8),
        decoder_blocks=tuple(p.get("dec_blk_nums", (6, 6, 4))),
        refinement_blocks=p.get("refine_blk_num", 4),
        heads=tuple(p.get("heads", (1, 2, 4, 8))),
        ffn_expansion=p.get("ffn_expansion_factor", 2.66),
        prompt_dim=task_dim,
        value_tokens=p.get("value_num_tokens", 2),
        task_pool=(
            {"size": p.get("degradation_pool_size", 15), "top_k": p.get("degradation_top_k", 3)} if use_prompt else None
        ),
        domain_pool={"size": p.get("domain_pool_size", 15), "top_k": p.get("domain_top_k", 5)} if use_prompt else None,
    )
    fields["fusion_heads"] = next(h for h in (8, 4, 2, 1) if task_dim % h == 0)
    try:
        return ModelConfig.model_validate(fields)
    except ValidationError as error:
        raise ValueError(f"published config is invalid for this network: {error}") from None


def convert_published_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a published state dict (optionally nested under ``params``) to our module names."""
    if "params" in state_dict and isinstance(state_dict["params"], Mapping):
        state_dict = state_dict["params"]
    converted = {}
    for key, tensor in state_dict.items():
        key = key.removeprefix("module.")
        for pattern, replacement in _RENAMES:
            key, hits = re.subn(pattern, replacement, key)
            if hits:
                break
        converted[key] = tensor
    return converted


def load_published(config: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor] | None = None) -> DATPRLIR:
    """Our ``paper``-variant network from the published constructor arguments and (optionally) a published state dict.

    ``state_dict`` may be nested under ``params`` as in the released ``.pth`` files (load those with
    ``torch.load(path, map_location="cpu", weights_only=True)``). Every published tensor must be consumed and every one
    of ours provided, with equal shapes; otherwise a ValueError lists the offending keys.
    """
    model = DATPRLIR(config_from_published(config))
    if state_dict is None:
        return model
    load_state_strict(model, convert_published_state_dict(state_dict), source="published checkpoint")
    return model


@dataclass(frozen=True)
class StateMatch:
    """How a state dict fits a network: the keys that load (same name and shape), and the ``missing`` (the network's,
    absent from the state), ``unexpected`` (the state's, unknown to the network) and ``mismatched`` ones (both have
    them, with other shapes; ``shapes`` gives (state's, network's) for each)."""

    matched: list[str]
    missing: list[str]
    unexpected: list[str]
    mismatched: list[str]
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]]

    @property
    def exact(self) -> bool:
        """Every key of the network is provided, with its shape, and nothing else is."""
        return not (self.missing or self.unexpected or self.mismatched)

    def describe(self, limit: int = 3) -> str:
        """The misfits, ``limit`` keys of each kind named: ``missing 2 (e.g. [...]); 1 with other shapes (...)``."""
        details = []
        if self.missing:
            details.append(f"missing {len(self.missing)} (e.g. {self.missing[:limit]})")
        if self.unexpected:
            details.append(f"unexpected {len(self.unexpected)} (e.g. {self.unexpected[:limit]})")
        if self.mismatched:
            shown = ", ".join(f"{k}: {self.shapes[k][0]} vs {self.shapes[k][1]}" for k in self.mismatched[:limit])
            details.append(f"{len(self.mismatched)} with other shapes (e.g. {shown})")
        return "; ".join(details)


def match_state(model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> StateMatch:
    """Compare ``state`` with ``model.state_dict()`` key by key and shape by shape (nothing is loaded)."""
    own = model.state_dict()
    common = set(own) & set(state)
    shapes = {k: (tuple(state[k].shape), tuple(own[k].shape)) for k in common}
    mismatched = sorted(k for k in common if shapes[k][0] != shapes[k][1])
    return StateMatch(
        matched=sorted(common - set(mismatched)),
        missing=sorted(set(own) - set(state)),
        unexpected=sorted(set(state) - set(own)),
        mismatched=mismatched,
        shapes={k: shapes[k] for k in mismatched},
    )


def load_state_strict(
    model: torch.nn.Module,
    state: Mapping[str, torch.Tensor],
    source: str,
    hint: str = "Check that the config belongs to these weights.",
    network: str = "the network built from its config",
) -> StateMatch:
    """``load_state_dict(strict=True)`` with an error message that names missing, unexpected and mis-shaped keys
    (:func:`match_state`), says which ``network`` they were loaded into and ends with ``hint`` (what to do about it);
    returns the (exact) match."""
    match = match_state(model, state)
    if not match.exact:
        raise ValueError(f"{source} does not fit {network}: {match.describe()}. {hint}")
    model.load_state_dict(state, strict=True)
    return match


# ----------------------------------------------------------------------------------------------------------------------
# Our weights format: <stem>.safetensors + <stem>.json (ModelConfig), written atomically.

CONFIG_SUFFIX = ".json"
WEIGHTS_SUFFIX = ".safetensors"


def _export_paths(path: str | os.PathLike) -> tuple[Path, Path]:
    """(``<stem>.safetensors``, ``<stem>.json``) of an export named with or without the weights suffix."""
    stem = Path(path)
    if stem.suffix == WEIGHTS_SUFFIX:
        stem = stem.with_suffix("")
    return stem.with_name(stem.name + WEIGHTS_SUFFIX), stem.with_name(stem.name + CONFIG_SUFFIX)


def save_model(model: DATPRLIR, path: str | os.PathLike, provenance: Mapping[str, Any] | None = None) -> Path:
    """Write ``<path>.safetensors`` and its sidecar ``<path>.json`` (``path`` with or without the suffix): the
    sidecar holds ``{"model": config}`` plus, when given, ``"provenance"``: what the weights are and how they were
    made (:func:`datprl.platform.train.provenance.build_provenance`; JSON-compatible)."""
    weights, config_file = _export_paths(path)
    sidecar: dict[str, Any] = {"model": model.config.model_dump(mode="json")}
    if provenance is not None:
        if not isinstance(provenance, Mapping):
            raise TypeError(f"provenance must be a dict (build_provenance(...)), not {type(provenance).__name__}")
        sidecar["provenance"] = dict(provenance)
    try:  # before anything is written: a bad provenance must not leave new weights beside an old sidecar
        config_json = json.dumps(sidecar, indent=1, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise ValueError(f"provenance is not JSON-compatible ({error}); use build_provenance(...)") from None
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    atomic_write_bytes(weights, save(state, metadata={"format": "pt", "network": "DATPRL-IR"}))
    atomic_write_bytes(config_file, config_json.encode("utf-8"))
    return weights


def _read_sidecar(config_file: Path) -> dict[str, Any]:
    if not config_file.exists():
        raise FileNotFoundError(
            f"{config_file} not found; exported weights are a .safetensors file with a .json config beside it"
        )
    try:
        sidecar = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{config_file} is not a valid model config: {error}") from None
    if not isinstance(sidecar, dict):
        raise ValueError(f"{config_file} is not a valid model config: a JSON object with a 'model' key was expected")
    return sidecar


def _provenance(sidecar: dict[str, Any], config_file: Path) -> dict[str, Any] | None:
    provenance = sidecar.get("provenance")
    if provenance is not None and not isinstance(provenance, dict):
        raise ValueError(
            f"{config_file}: 'provenance' must be a JSON object, not {type(provenance).__name__}; "
            "re-export the weights with save_model(..., provenance=build_provenance(...))"
        )
    return provenance


def load_export(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> tuple[DATPRLIR, dict | None]:
    """(network, provenance or None) of an export written by :func:`save_model`, its sidecar read once (safetensors
    only, never pickle); sidecars with or without provenance load alike."""
    weights, config_file = _export_paths(path)
    if not weights.exists():
        raise FileNotFoundError(
            f"{weights} not found; exported weights are a .safetensors file with a .json config beside it"
        )
    sidecar = _read_sidecar(config_file)
    try:
        config = ModelConfig.model_validate(sidecar["model"])
    except (KeyError, ValidationError) as error:
        raise ValueError(f"{config_file} is not a valid model config: {error}") from None
    provenance = _provenance(sidecar, config_file)
    model = DATPRLIR(config)
    load_state_strict(model, load_file(str(weights)), source=str(weights))
    return model.to(map_location), provenance


def load_model(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> DATPRLIR:
    """Load a network written by :func:`save_model` (see :func:`load_export`)."""
    return load_export(path, map_location)[0]


def read_provenance(path: str | os.PathLike) -> dict[str, Any] | None:
    """The ``provenance`` recorded in the sidecar of an export (``<stem>.json``; ``path`` is the stem or the
    ``.safetensors`` file), or None for a sidecar written without it (exports from before provenance, or weights
    saved outside training)."""
    _, config_file = _export_paths(path)
    return _provenance(_read_sidecar(config_file), config_file)


def weights_digest(path: str | os.PathLike | bytes) -> str:
    """SHA-256 of a weights file (reported by serving and recorded in manifests and provenance), or of its contents
    already read (``bytes``, e.g. a file read from s3://)."""
    if isinstance(path, bytes):
        return hashlib.sha256(path).hexdigest()
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
