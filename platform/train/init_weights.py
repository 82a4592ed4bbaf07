"""Training from existing weights: the ``init`` section of :class:`~datprl.platform.train.config.TrainConfig`.

A *new* run can start from weights instead of a fresh network: our export (``save_model``: ``<stem>.safetensors``
with its ``.json`` sidecar) or a published checkpoint in the authors' layout (renamed by
:func:`~datprl.models.factory.convert_published_state_dict`). The driver checks them against the configured network
before Ray starts (:func:`check_init`, from ``prepare``); every worker then loads them into its network
(:func:`apply_init`, from ``build_training_state``) before the EMA copy and the optimiser are made. A run that already
has a checkpoint resumes from it and never loads ``init.weights`` again.

Nothing is ever unpickled: safetensors files are read with safetensors, ``.pth``/``.pt`` files with
``torch.load(weights_only=True)`` (tensors and plain containers only; anything else is refused).
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from safetensors.torch import load as load_safetensors

from datprl.models import create_model, in_parts, match_state, weights_digest
from datprl.models.config import ModelConfig
from datprl.models.factory import CONFIG_SUFFIX, WEIGHTS_SUFFIX, convert_published_state_dict, load_state_strict
from datprl.platform.storage import S3Settings, exists, read_bytes
from datprl.platform.train.config import InitConfig, TrainConfig
from datprl.platform.train.runs import flatten

__all__ = ["InitResult", "InitWeights", "apply_init", "check_init", "freeze_parts", "load_init", "read_init_weights"]

Kind = Literal["export", "published"]


@dataclass(frozen=True)
class InitWeights:
    """Weights read for ``init``: where from, their SHA-256, what they are (``export``: ours, with the sidecar's
    network config; ``published``: the authors' layout, already renamed to our keys) and the state dict."""

    path: str
    sha256: str
    kind: Kind
    state: dict[str, torch.Tensor]
    network: dict[str, Any] | None = None  # the export's ModelConfig (sidecar); None for published weights


def _sidecar_network(weights_url: str, s3: S3Settings | None) -> dict[str, Any] | None:
    """The ``model`` object of our export's sidecar beside ``weights_url``, or None when there is no sidecar of ours
    (then the file is taken for a published-layout state dict)."""
    sidecar = weights_url[: -len(WEIGHTS_SUFFIX)] + CONFIG_SUFFIX
    if not exists(sidecar, s3):
        return None
    try:
        content = json.loads(read_bytes(sidecar, s3))
    except (ValueError, UnicodeDecodeError):
        return None
    return content.get("model") if isinstance(content, dict) and isinstance(content.get("model"), dict) else None


def _torch_state(data: bytes, url: str) -> Mapping[str, Any]:
    """A ``.pth``/``.pt`` file's contents with ``torch.load(weights_only=True)``: only tensors and plain containers
    are rebuilt, so a file holding any other pickled object is refused rather than run."""
    try:
        loaded = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises UnpicklingError, RuntimeError or others for what it will not load
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(
            f"init.weights {url} is not a tensor state dict that torch.load(weights_only=True) can read (a pickled "
            f"object is never unpickled): {first}"
        ) from None
    if not isinstance(loaded, Mapping):
        raise ValueError(f"init.weights {url} holds a {type(loaded).__name__}, not a state dict (a dict of tensors)")
    return loaded


def read_init_weights(url: str, s3: S3Settings | None = None) -> InitWeights:
    """Read ``init.weights`` (local path or s3://) once: its SHA-256 (:func:`~datprl.models.weights_digest`), its
    kind, and its state dict in our key names. Raises FileNotFoundError when it is missing and ValueError when it is
    not a state dict of tensors."""
    if not exists(url, s3):
        raise FileNotFoundError(f"init.weights {url} not found")
    data = read_bytes(url, s3)
    network = None
    if url.endswith(WEIGHTS_SUFFIX):
        network = _sidecar_network(url, s3)
        try:
            raw: Mapping[str, Any] = load_safetensors(data)
        except Exception as error:  # safetensors raises its own SafetensorError for a damaged file
            raise ValueError(f"init.weights {url} is not a readable safetensors file: {error}") from None
    else:
        raw = _torch_state(data, url)
    kind: Kind = "export" if network is not None else "published"
    # Our exports already use our names; published ones (optionally nested under "params") are renamed.
    state = dict(raw) if kind == "export" else convert_published_state_dict(raw)
    odd = next(((k, v) for k, v in state.items() if not isinstance(v, torch.Tensor)), None)
    if odd is not None:
        hint = (
            " (a training checkpoint's state.pt: start from the model.safetensors beside it instead)"
            if "model" in state and "optimizer" in state
            else ""
        )
        raise ValueError(
            f"init.weights {url} is not a state dict of tensors: {odd[0]!r} holds a {type(odd[1]).__name__}{hint}"
        )
    return InitWeights(url, weights_digest(data), kind, state, network)


@dataclass(frozen=True)
class InitResult:
    """What :func:`load_init` loaded into a network: the names of the loaded entries and the provenance record."""

    loaded: list[str]
    record: dict[str, Any]


def _describe_kind(weights: InitWeights) -> str:
    return "our export" if weights.kind == "export" else "published checkpoint, renamed to our keys"


def load_init(model: torch.nn.Module, weights: InitWeights, init: InitConfig, network: str = "model.*") -> InitResult:
    """Load ``weights`` into ``model`` (``network`` names it in messages) as ``init`` says: strictly (every key,
    every shape, nothing else; a mismatch raises ValueError naming the keys and the way to a partial load), or, with
    ``init.strict=false``, the keys whose names and shapes match (at least one), the others left as they are."""
    source = f"init.weights {weights.path} ({_describe_kind(weights)})"
    if init.strict:
        match = load_state_strict(
            model,
            weights.state,
            source=source,
            network=f"the configured network ({network})",
            hint="Set model.* to the network these weights belong to, or init.strict=false to load only the keys "
            "whose names and shapes match (the others start fresh).",
        )
    else:
        match = match_state(model, weights.state)
        if not match.matched:
            raise ValueError(f"{source}: not one key fits the configured network ({match.describe()})")
        model.load_state_dict({k: weights.state[k] for k in match.matched}, strict=False)
    record = {
        "path": weights.path,
        "sha256": weights.sha256,
        "kind": weights.kind,
        "strict": init.strict,
        "loaded_keys": len(match.matched),
        "missing_keys": len(match.missing),
        "unexpected_keys": len(match.unexpected),
        "mismatched_keys": len(match.mismatched),
    }
    if not match.exact:  # partial: which keys start fresh and which were left out, for the record
        record["not_loaded"] = match.describe(limit=10)
    return InitResult(match.matched, record)


def freeze_parts(model: torch.nn.Module, parts: Iterable[str]) -> int:
    """Freeze every parameter of ``model`` outside ``parts`` (keys of :data:`datprl.models.network.PARTS`; none =
    train everything); parameters frozen by the network itself stay frozen. Returns how many parameter tensors are
    left to train."""
    parts = list(parts)
    for name, parameter in model.named_parameters():
        if parts and not in_parts(name, parts):
            parameter.requires_grad_(False)
    return sum(1 for p in model.parameters() if p.requires_grad)


def apply_init(model: torch.nn.Module, config: TrainConfig) -> InitResult | None:
    """A worker's side of ``init`` for a new run: read ``init.weights`` and load them into ``model`` (None when
    ``init.weights`` is null). The driver checked the same load before Ray started (:func:`check_init`)."""
    if config.init.weights is None:
        return None
    return load_init(model, read_init_weights(config.init.weights, config.data.s3), config.init)


def _network_differences(exported: dict[str, Any], configured: ModelConfig) -> list[str]:
    """The fields in which an export's network differs from the configured one (``task_pool.top_k`` ...)."""
    try:
        theirs = flatten(ModelConfig.model_validate(exported).model_dump(mode="json"))
    except ValueError:
        return ["(the sidecar's model config does not validate)"]
    ours = flatten(configured.model_dump(mode="json"))
    return [
        f"{k}: {theirs.get(k)!r} there, {ours.get(k)!r} here"
        for k in sorted(set(theirs) | set(ours))
        if theirs.get(k) != ours.get(k)
    ]


def check_init(config: TrainConfig) -> dict[str, Any] | None:
    """The driver's check of ``init`` for a new run, before Ray starts: read the weights, build the configured
    network and load them as the workers will (a mismatch raises ValueError naming the keys), check that
    ``init.train_only`` leaves something to train. Prints what will be loaded; returns the provenance record of the
    weights (path, sha256, kind, strict, key counts), or None when ``init.weights`` is null."""
    if config.init.weights is None:
        return None
    network = config.model.resolve()
    weights = read_init_weights(config.init.weights, config.data.s3)
    model = create_model(network)
    result = load_init(model, weights, config.init, network=f"model: {config.model.describe()}")
    if config.init.train_only and freeze_parts(model, config.init.train_only) == 0:
        raise ValueError(
            f"init.train_only={config.init.train_only} selects no trainable parameter of the network "
            f"{config.model.describe()} (e.g. a pool it does not have); choose other parts"
        )
    record = result.record
    how = "strict" if config.init.strict else f"partial: {record['loaded_keys']} keys loaded"
    print(
        f"[train] starting from init.weights {weights.path} ({_describe_kind(weights)}, sha256 "
        f"{weights.sha256[:12]}, {how})",
        flush=True,
    )
    if "not_loaded" in record:
        print(f"[train] init.strict=false: not loaded from the weights: {record['not_loaded']}", flush=True)
    if weights.network is not None and (diffs := _network_differences(weights.network, network)):
        shown = "; ".join(diffs[:6]) + (f"; ... {len(diffs) - 6} more" if len(diffs) > 6 else "")
        print(f"[train] note: the exported network differs from model.* in {shown}", flush=True)
    return record
