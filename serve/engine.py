"""The restoration engine behind the endpoint, without Ray: loads exported weights (safetensors + json config, local
or s3://; never pickle) or builds a fresh variant, runs padded batched forwards, summarises prompt selections and
restores large images tile by tile. The benchmark's in-process baseline calls the same object.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from datprl.models.factory import (
    CONFIG_SUFFIX,
    VARIANTS,
    WEIGHTS_SUFFIX,
    count_parameters,
    create_model,
    load_export,
    weights_digest,
)
from datprl.models.network import PAD_MULTIPLE, DATPRLIR
from datprl.platform import storage
from datprl.platform.compute import autocast, resolve_precision, to_memory_format
from datprl.platform.runtime import resolve_device
from datprl.serve import memory
from datprl.serve.config import ServeConfig
from datprl.serve.tiling import tiled_apply, tiles_per_forward

__all__ = [
    "ModelInfo",
    "BatchOutput",
    "PromptTally",
    "Engine",
    "Restored",
    "load_engine",
    "pad_to_multiple",
    "padded_shape",
    "served_provenance",
    "trained_state",
]

log = logging.getLogger(__name__)

UNTRAINED_NOTE = (
    "UNTRAINED: freshly initialised {variant} weights (seed {seed}); the network starts as the identity, so it "
    "returns its input nearly unchanged. Serve trained weights with weights=<path or s3://...>.safetensors."
)


@dataclass
class ModelInfo:
    """What ``GET /v1/model`` reports."""

    variant: str
    source: str  # "fresh" or "weights"
    trained: bool | None  # False for a fresh network, True when the weights' provenance says so, None when it does not
    weights: str | None
    weights_sha256: str
    parameters: int
    config: dict[str, Any]
    device: str
    pools: dict[str, dict[str, int]]
    note: str = ""
    provenance: dict[str, Any] | None = None  # how the weights were made (see :func:`served_provenance`)
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(data.pop("extra"))
        return data


def _variant_name(model: DATPRLIR) -> str:
    for name, config in VARIANTS.items():
        if config.model_dump() == model.config.model_dump():
            return name
    return "custom"


def _state_digest(model: torch.nn.Module) -> str:
    from safetensors.torch import save

    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    return hashlib.sha256(save(state)).hexdigest()


def _stem(path: str) -> str:
    return path[: -len(WEIGHTS_SUFFIX)] if path.endswith(WEIGHTS_SUFFIX) else path


def _load_weights(path: str, config: ServeConfig) -> tuple[DATPRLIR, dict[str, Any] | None, str]:
    """(network, provenance of its sidecar or None, sha256 of the .safetensors file) from a local path or s3://
    URL; the sidecar is read once."""
    stem = _stem(path)
    if storage.is_s3(stem):
        s3 = storage.S3Settings(endpoint_url=config.s3_endpoint_url) if config.s3_endpoint_url else storage.S3Settings()
        with tempfile.TemporaryDirectory(prefix="datprl-serve-") as tmp:
            for suffix in (WEIGHTS_SUFFIX, CONFIG_SUFFIX):
                url = stem + suffix
                try:
                    data = storage.read_bytes(url, s3)
                except (FileNotFoundError, OSError) as error:
                    raise FileNotFoundError(
                        f"{url} could not be read ({error}); exported weights are a .safetensors "
                        "file with a .json config beside it"
                    ) from None
                Path(tmp, "model" + suffix).write_bytes(data)
            local = os.path.join(tmp, "model" + WEIGHTS_SUFFIX)
            return (*load_export(local), weights_digest(local))
    local = stem + WEIGHTS_SUFFIX
    return (*load_export(local), weights_digest(local))


#: Provenance fields ``GET /v1/model`` reports. The training config stays in the sidecar: it names internal storage
#: locations (dataset and run folders, S3 endpoints) that an HTTP client has no need to see.
SERVED_PROVENANCE_FIELDS = (
    "model",
    "steps",
    "dataset_manifest_sha256",
    "evaluation",
    "git_commit",
    "git_dirty",
    "created",
    "datprl_version",
)


def served_provenance(provenance: dict[str, Any] | None) -> dict[str, Any] | None:
    """The part of a sidecar's provenance that is served (:data:`SERVED_PROVENANCE_FIELDS`), None without one."""
    if provenance is None:
        return None
    return {key: provenance.get(key) for key in SERVED_PROVENANCE_FIELDS}


def trained_state(provenance: dict[str, Any] | None, identity: bool) -> tuple[bool | None, str]:
    """(``trained``, note) of exported weights: False for the all-zero identity initialisation (whatever the sidecar
    says: such a network returns its input), else what the provenance records, else None (unknown)."""
    if identity:
        return False, "the weights file holds the untrained identity initialisation (final conv all zero)"
    if provenance is None or not isinstance(provenance.get("trained"), bool):
        return None, (
            "weights loaded from an exported file whose sidecar records no provenance: trained or not is "
            "unknown (jobs/train.py records it)"
        )
    if not provenance["trained"]:
        return False, "the weights' provenance records them as untrained"
    steps = provenance.get("steps")
    commit = provenance.get("git_commit")
    return True, (
        f"trained weights ({provenance.get('model') or 'model'}, {steps} steps"
        + (f", commit {commit[:12]}" if isinstance(commit, str) else "")
        + f", exported {provenance.get('created')})"
    )


def pad_to_multiple(batch: torch.Tensor, multiple: int = PAD_MULTIPLE) -> torch.Tensor:
    """Zero-pad (B, C, H, W) at bottom/right to multiples of ``multiple``: exactly what the network does itself, so
    restoring the padded batch and cropping equals restoring each image alone."""
    height, width = batch.shape[-2:]
    return F.pad(batch, (0, -width % multiple, 0, -height % multiple))


@dataclass
class BatchOutput:
    """Restored (B, 3, H, W) on the CPU plus each pool's selection: {pool: (indices (B, k), weights (B, k))}."""

    images: torch.Tensor
    selections: dict[str, tuple[torch.Tensor, torch.Tensor]]


class PromptTally:
    """Which prompts of each pool were selected for one image, over one or more tiles: the mean weight of every
    prompt over the tiles (0 where a tile did not select it), reported for the top-k prompts."""

    def __init__(self, pools: dict[str, dict[str, int]]) -> None:
        self.pools = pools
        self.sums = {name: torch.zeros(p["size"], dtype=torch.float64) for name, p in pools.items()}
        self.counts = {name: torch.zeros(p["size"], dtype=torch.int64) for name, p in pools.items()}
        self.tiles = 0

    def add(self, selections: dict[str, tuple[torch.Tensor, torch.Tensor]], row: int) -> None:
        self.tiles += 1
        for name, (indices, weights) in selections.items():
            self.sums[name].index_add_(0, indices[row].long(), weights[row].double())
            self.counts[name].index_add_(0, indices[row].long(), torch.ones_like(indices[row], dtype=torch.int64))

    def summary(self) -> dict[str, list[dict[str, Any]]]:
        out: dict[str, list[dict[str, Any]]] = {}
        for name, pool in self.pools.items():
            mean = self.sums[name] / max(self.tiles, 1)
            order = torch.argsort(mean, descending=True)[: pool["top_k"]]
            entries = []
            for index in order.tolist():
                entry = {"index": int(index), "weight": round(float(mean[index]), 6)}
                if self.tiles > 1:
                    entry["selected_in_tiles"] = int(self.counts[name][index])
                entries.append(entry)
            out[name] = entries
        return out


class Engine:
    """A network on its device plus the serving logic around a forward pass.

    ``precision`` (``fp32`` or ``bf16``: the forward under ``torch.autocast`` in bfloat16), ``channels_last`` (the
    input in channels_last memory format; the model must have been converted too, as :func:`load_engine` does) and
    ``max_batch_pixels`` (a batch above it is split into several forwards; None = no bound) come from the config."""

    def __init__(
        self,
        model: DATPRLIR,
        info: ModelInfo,
        device: torch.device,
        precision: str = "fp32",
        channels_last: bool = False,
        max_batch_pixels: int | None = None,
    ) -> None:
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"precision={precision!r}: the engine runs fp32 or bf16 (resolve 'auto' first)")
        self.model = model.eval()
        self.info = info
        self.device = device
        self.precision = precision
        self.channels_last = channels_last
        self.max_batch_pixels = max_batch_pixels
        self.pools = info.pools
        self.stats = {"batches": 0, "forwards": 0, "items": 0, "largest": 0, "errors": 0}
        self._probe: torch.Tensor | None = None

    # -- one forward ---------------------------------------------------------------------------------------------
    def forward(self, batch: torch.Tensor) -> BatchOutput:
        """Restore (B, 3, H, W) in [0, 1] (any H, W; padded to a multiple of 8 and cropped back), in the engine's
        precision; the images come back as float32 whatever it is."""
        height, width = batch.shape[-2:]
        with torch.inference_mode(), autocast(self.precision, self.device):
            padded = to_memory_format(pad_to_multiple(batch.to(self.device, torch.float32)), self.channels_last)
            out = self.model(padded, return_aux=True)
            images = out.image[..., :height, :width].float().clamp_(0, 1).cpu()
            selections = {}
            for name in ("task", "domain"):
                selection = getattr(out, name)
                if selection is not None:
                    selections[name] = (selection.indices.cpu(), selection.weights.float().cpu())
        return BatchOutput(images, selections)

    # -- whole images, in-process (tests, benchmark baseline, and the reference the endpoint must equal) -----------
    def restore(
        self,
        unit: torch.Tensor | np.ndarray,
        tiling: bool = False,
        tile_size: int = 512,
        tile_overlap: int = 64,
        batch_size: int = 4,
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """(3, H, W) in [0, 1] -> (restored (3, H, W), prompts summary); ``tiling`` restores it tile by tile."""
        image = torch.as_tensor(unit, dtype=torch.float32)
        tally = PromptTally(self.pools)
        if not tiling:
            out = self.forward(image[None])
            tally.add(out.selections, 0)
            return out.images[0], tally.summary()

        def run(tiles: torch.Tensor) -> torch.Tensor:
            out = self.forward(tiles)
            for row in range(tiles.shape[0]):
                tally.add(out.selections, row)
            return out.images

        restored = tiled_apply(run, image, tile_size, tile_overlap, batch_size)
        return restored, tally.summary()

    def restore_many(self, units: list[torch.Tensor]) -> list[Restored | Exception]:
        """Restore several (3, H, W) images (any sizes): one forward per group of equal padded shape. This is the
        batching rule of the endpoint (its ``@serve.batch`` function is this method). A group whose forward fails
        gets the exception in each of its slots; the other groups are unaffected."""
        results: list[Restored | Exception | None] = [None] * len(units)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, unit in enumerate(units):
            groups.setdefault(padded_shape(unit), []).append(i)
        self.stats["batches"] += 1
        for shape, group in groups.items():
            # At most max_batch_pixels per forward: activation memory grows with the pixels of a forward, and on
            # CPU a larger batch is no faster (docs/serving.md, "Large images").
            per_forward = tiles_per_forward(shape[0] * shape[1], len(group), self.max_batch_pixels)
            for start in range(0, len(group), per_forward):
                self._forward_members(units, group[start : start + per_forward], results)
        return results  # type: ignore[return-value]

    def _forward_members(
        self, units: list[torch.Tensor], members: list[int], results: list[Restored | Exception | None]
    ) -> None:
        try:
            out = self.forward(torch.stack([pad_to_multiple(units[i][None])[0] for i in members]))
        except Exception as error:  # noqa: BLE001 - reported to this group's requests only
            log.exception("[serve] forward of a group of %d failed", len(members))
            self.stats["errors"] += 1
            for i in members:
                results[i] = error
            return
        self.stats["forwards"] += 1
        self.stats["items"] += len(members)
        self.stats["largest"] = max(self.stats["largest"], len(members))
        for row, i in enumerate(members):
            h, w = units[i].shape[-2:]
            selection = {name: (idx[row : row + 1], wt[row : row + 1]) for name, (idx, wt) in out.selections.items()}
            results[i] = Restored(out.images[row, :, :h, :w], selection, len(members))

    def measure_activation_bytes_per_pixel(self, size: int) -> float | None:
        """The memory one forward of a (1, 3, size, size) input adds at its peak, per pixel (size padded to a
        multiple of 8): on CUDA from the allocator's peak, on CPU from the process's peak resident memory (freed
        heap returned first, the peak reset before the forward), after a small forward that allocates what every
        forward reuses. None where the peak cannot be read (no ``/proc``)."""
        size = max(PAD_MULTIPLE, memory.padded_length(size))
        # A first forward allocates what every later one reuses (thread pools, kernel caches: ~20 MB for paper_tiny
        # on CPU, +13% at 256x256); the replica's first health check does that before any request.
        self.self_check()
        probe = torch.full((1, 3, size, size), 0.5)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            before = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.forward(probe)
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            memory.trim_heap()
            before = memory.rss_bytes()
            if before is None or not memory.reset_peak_rss():
                return None
            self.forward(probe)
            peak = memory.peak_rss_bytes()
            if peak is None:
                return None
        return max(peak - before, 0) / (size * size)

    def self_check(self) -> None:
        """A forward of a cached 8x8 input: raises when the network (or its device) no longer works."""
        if self._probe is None:
            self._probe = torch.full((1, 3, 8, 8), 0.5)
        out = self.forward(self._probe)
        if out.images.shape != (1, 3, 8, 8) or not bool(torch.isfinite(out.images).all()):
            raise RuntimeError(f"self-check forward gave {tuple(out.images.shape)} with non-finite values")


@dataclass
class Restored:
    """One restored (3, H, W) image of a batched call, its prompt selection (rows of 1) and its group's size."""

    image: torch.Tensor
    selection: dict[str, tuple[torch.Tensor, torch.Tensor]]
    batch: int


def padded_shape(unit: torch.Tensor) -> tuple[int, int]:
    height, width = unit.shape[-2:]
    return memory.padded_length(height), memory.padded_length(width)


def load_engine(config: ServeConfig, device: str | torch.device | None = None) -> Engine:
    """The network the config asks for (trained weights when given or found, else a fresh ``variant``) on
    ``device`` (default: CUDA when visible, else CPU)."""
    device = resolve_device(device or "auto")
    precision = resolve_precision(config.precision, device)
    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)
    weights = config.resolved_weights()
    if weights is not None:
        model, provenance, digest = _load_weights(weights, config)
        variant = _variant_name(model)
        trained, note = trained_state(provenance, identity=not bool(model.output.weight.detach().any()))
        info_args = dict(
            variant=variant,
            source="weights",
            trained=trained,
            weights=weights,
            weights_sha256=digest,
            note=note,
            provenance=served_provenance(provenance),
        )
    else:
        torch.manual_seed(config.seed)
        model = create_model(config.variant)
        info_args = dict(
            variant=config.variant,
            source="fresh",
            trained=False,
            weights=None,
            weights_sha256=_state_digest(model),
            note=UNTRAINED_NOTE.format(variant=config.variant, seed=config.seed),
        )
        log.warning("[serve] %s", info_args["note"])
    model = model.to(device).eval()
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    pools = {}
    if model.config.task_pool is not None:
        pools["task"] = {"size": model.config.task_pool.size, "top_k": model.config.task_pool.top_k}
    if model.config.domain_pool is not None:
        pools["domain"] = {"size": model.config.domain_pool.size, "top_k": model.config.domain_pool.top_k}
    info = ModelInfo(
        parameters=count_parameters(model),
        config=model.config.model_dump(mode="json"),
        device=str(device),
        pools=pools,
        extra={"torch_threads": torch.get_num_threads(), "precision": precision, "channels_last": config.channels_last},
        **info_args,
    )
    return Engine(
        model,
        info,
        device,
        precision=precision,
        channels_last=config.channels_last,
        max_batch_pixels=config.max_batch_pixels,
    )
