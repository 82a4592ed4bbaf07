"""Safe runs: before Ray starts, compare a run's existing checkpoint with the config asked for.

A run lives at ``<storage>/<name>/`` (local or s3://); Ray Train writes its checkpoints there as ``checkpoint_*``
folders, and each of ours holds ``config.json`` (the run's resolved config) and ``progress.json`` (the step reached).
Launching the same name again resumes the run -- which is only right when the run is the same training: the same
network, data, losses and schedule. :func:`check_run` tells a new run, a resumable one and a complete one apart, and
stops a mismatched one with the differing fields and the two ways forward (a new ``name=``, or ``resume=false``).
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass
from typing import Any, Literal

from datprl.models import variant_config
from datprl.models.spec import ModelSpec
from datprl.platform.config import ConfigError, config_to_dict
from datprl.platform.storage import filesystem, join_url
from datprl.platform.train.config import TrainConfig

CONFIG_FILE = "config.json"
PROGRESS_FILE = "progress.json"

# What makes two runs the same training (a resume must not change any of these). Cluster size, logging, validation
# cadence, storage and output places may change between attempts, and ``steps`` may grow: continuing a finished run
# for longer is a resume (the cosine schedule then decays over the new total, which the driver says).
IDENTITY_DATA_FIELDS = ("dataset", "tasks", "crop_size", "augment", "per_task_batch")
IDENTITY_FIELDS = ("loss", "optim", "seed", "zero_shot_tasks", "zero_shot_domains", "text_embeddings", "text_centering")


class RunMismatch(ConfigError):
    """The run's existing checkpoint was trained with another config; the message names the fields and the fix."""


@dataclass(frozen=True)
class RunStatus:
    """What launching a config would do: start a ``new`` run, ``resume`` one at ``step``, or nothing (``complete``)."""

    kind: Literal["new", "resume", "complete"]
    url: str
    step: int = 0
    steps: int = 0
    previous_steps: int | None = None  # the run's own total when ``steps`` was raised to continue it
    init: dict[str, Any] | None = None  # the weights the run started from (init section), as its checkpoint records


def run_url(config: TrainConfig) -> str:
    """Where Ray Train keeps the run's checkpoints: ``<storage>/<name>``."""
    return join_url(config.storage, config.name)


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """A nested config dict as ``{"dotted.field": value}`` (lists and other leaves kept whole)."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def _model_of(saved: dict[str, Any]) -> dict[str, Any]:
    """The resolved network of a saved config, current (``model`` section) or from before the typed section
    (``variant`` + ``model_overrides``, merged as they were then)."""
    if "model" in saved:
        return ModelSpec.model_validate(saved["model"]).resolve().model_dump(mode="json")
    network = variant_config(saved.get("variant", "paper_tiny"), **saved.get("model_overrides", {}))
    return network.model_dump(mode="json")


def identity(saved: dict[str, Any]) -> dict[str, Any]:
    """The fields of a saved (JSON) TrainConfig that define the training, flattened to dotted names; the network as
    it resolves (``model.task_pool.size`` etc.), whatever spelling the config used."""
    fields = flatten({"model": _model_of(saved)}, "")
    fields.update(flatten({"data": {k: saved.get("data", {}).get(k) for k in IDENTITY_DATA_FIELDS}}, ""))
    fields.update(flatten({k: saved.get(k) for k in IDENTITY_FIELDS}, ""))
    # init.weights only starts a new run (a resume takes the checkpoint), but what trains and at which lr defines the
    # training, and the resumed optimiser's groups must match; configs from before the section had neither.
    init = saved.get("init") or {}
    fields.update({"init.train_only": init.get("train_only") or [], "init.loaded_lr": init.get("loaded_lr")})
    return fields


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(field, value in the run, value asked for) for every identity field that differs."""
    a, b = identity(old), identity(new)
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def _latest_checkpoint(config: TrainConfig) -> tuple[dict[str, Any], int, str | None, dict | None] | None:
    """(saved config, step, dataset manifest SHA-256 or None, the init record or None) of the run's furthest
    checkpoint, or None when the run has none."""
    fs, root = filesystem(run_url(config), config.s3)
    import pyarrow.fs as pafs

    try:
        entries = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    except (FileNotFoundError, NotADirectoryError):
        return None
    steps: list[tuple[int, str | None, dict | None, str]] = []
    for entry in entries:
        if entry.type == pafs.FileType.Directory and posixpath.basename(entry.path).startswith("checkpoint_"):
            try:
                steps.append((*_checkpoint_progress(fs, entry.path), entry.path))
            except (FileNotFoundError, OSError, ValueError, KeyError):
                continue  # an incomplete checkpoint (interrupted upload): Ray does not resume from it either
    for step, manifest_sha256, init, folder in sorted(steps, key=lambda item: item[0], reverse=True):
        try:  # the furthest checkpoint whose config can be read
            with fs.open_input_stream(posixpath.join(folder, CONFIG_FILE)) as f:
                return json.loads(f.read()), step, manifest_sha256, init
        except (FileNotFoundError, OSError, ValueError):
            continue
    return None


def _checkpoint_progress(fs, folder: str) -> tuple[int, str | None, dict | None]:
    """(step, SHA-256 of the dataset manifest it trained on, the record of the init weights the run started from),
    the last two None when not recorded (older checkpoints; runs started from scratch)."""
    try:
        with fs.open_input_stream(posixpath.join(folder, PROGRESS_FILE)) as f:
            progress = json.loads(f.read())
        return int(progress["step"]), progress.get("dataset_manifest_sha256"), progress.get("init")
    except FileNotFoundError:
        # Checkpoints written before progress.json existed: the step is in the training state.
        import io

        import torch

        with fs.open_input_stream(posixpath.join(folder, "state.pt")) as f:
            state = torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=True)
        return int(state["step"]), None, None


def check_run(config: TrainConfig, manifest_sha256: str | None = None) -> RunStatus:
    """Compare the run ``config.name`` already in ``config.storage`` (if any) with ``config``.

    Returns a ``new``, ``resume`` or ``complete`` :class:`RunStatus`; raises :class:`RunMismatch` when the run was
    trained with other identity fields (network, data, losses, schedule) or, given ``manifest_sha256``, on another
    build of the dataset (rebuilt at the same path), naming them and the fix. ``config`` should
    have its local paths made absolute, as the workers see them.
    """
    url = run_url(config)
    latest = _latest_checkpoint(config)
    if latest is None:
        return RunStatus("new", url, steps=config.steps)
    saved, step, trained_on, init = latest
    diffs = differences(saved, config_to_dict(config))
    if manifest_sha256 and trained_on and trained_on != manifest_sha256:  # same path, other content: rebuilt since
        diffs.append(
            (f"dataset content (sha256 of {config.data.dataset}/manifest.json)", trained_on[:12], manifest_sha256[:12])
        )
    if diffs:
        shown = "\n".join(f"  {field}: {old!r} in the run, {new!r} asked for" for field, old, new in diffs[:12])
        more = f"\n  ... and {len(diffs) - 12} more" if len(diffs) > 12 else ""
        raise RunMismatch(
            f"run {config.name!r} at {url} was trained (to step {step}) with a different config:\n{shown}{more}\n"
            f"Start a new run with name=<another name>, or start this one over with resume=false "
            f"(deletes its checkpoints)."
        )
    previous = saved.get("steps")
    return RunStatus(
        "complete" if step >= config.steps else "resume",
        url,
        step=step,
        steps=config.steps,
        previous_steps=previous if previous != config.steps else None,
        init=init,
    )


def delete_run(config: TrainConfig) -> bool:
    """Remove the run's checkpoints (``resume=false``); True if there was anything to remove."""
    fs, root = filesystem(run_url(config), config.s3)
    import pyarrow.fs as pafs

    if fs.get_file_info(root).type == pafs.FileType.NotFound:
        return False
    fs.delete_dir(root)
    return True
