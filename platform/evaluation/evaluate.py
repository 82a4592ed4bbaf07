"""Evaluation: PSNR/SSIM of a restoration network on a dataset split, per (domain, task), under a recorded protocol.

Every sample of the split is restored one image at a time (full images, or ``DataConfig.eval_crop`` central crops) and
scored twice: the network's output against the target, and the degraded input against the target (the do-nothing
baseline, so that a number is never read without knowing what the input already scored). Per-image scores are
averaged per (domain, task); the headline is the paper's: the mean over tasks of the per-task means (each task's
images count once, whatever its size). PSNR of an image restored exactly (infinite under the uint8 protocol) is
capped at :data:`PSNR_CAP` dB before averaging so that one exact image cannot make a whole mean infinite; the number
of such images is recorded per row (``output_exact`` / ``input_exact``).

With ``return_aux`` support the network also tells which prompts each pool composed; :func:`evaluate` counts the
selected indices per pool, per task and per domain (``EvalResult.prompt_usage``) and draws them as heatmaps.

The training loop calls :func:`evaluate` directly (it leaves the network in the train/eval mode and on the device it
found it in); ``jobs/evaluate.py`` runs it from the command line (:func:`main`) on exported weights, by default those
``python jobs/train.py`` exports, on several splits (val and test) with a table comparing them side by side.
"""

from __future__ import annotations

import inspect
import math
import os
import sys
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
import yaml
from pydantic import Field, model_validator

from datprl.models import unwrap_model
from datprl.platform.config import NoRepeats, StrictModel, config_to_dict, parse_cli, save_resolved_config
from datprl.platform.data.handle import DatasetHandle
from datprl.platform.storage import is_s3
from datprl.platform.data.pipeline import (
    DataConfig,
    StreamReport,
    evaluation_rows,
    local_evaluation_rows,
    split_tasks,
)
from datprl.platform.evaluation.metrics import PAPER, MetricProtocol, ct_hu_metrics, psnr, selection_nmi, ssim
from datprl.platform.evaluation.report import (
    _METRICS,
    HU_METRICS,
    PSNR_CAP,
    EvalResult,
    side_by_side_markdown,
    write_outputs,
)
from datprl.platform.runtime import SMALL_OBJECT_STORE_BYTES, LocalRaySettings, ray_session, resolve_device
from datprl.platform.storage import atomic_write_bytes
from datprl.platform.train.config import TrainConfig

__all__ = ["EvalConfig", "EvalResult", "PSNR_CAP", "TRAINED_WEIGHTS", "evaluate", "main"]

TRAINED_WEIGHTS = f"{TrainConfig.model_fields['output_dir'].default}/model.safetensors"
"""Where ``python jobs/train.py`` exports its final weights with its defaults (``<output_dir>/model.safetensors``):
what ``weights=auto`` (the default) evaluates."""

_POOLS = ("task", "domain")


class EvalConfig(StrictModel):
    """Evaluate a restoration network (exported weights, or a fresh variant for smoke runs) on dataset splits."""

    weights: str | None = Field(
        "auto",
        description=f"a .safetensors file written by save_model (its .json beside it); 'auto' = "
        f"{TRAINED_WEIGHTS} (what `python jobs/train.py` exports) unless `variant` is given",
    )
    variant: str | None = Field(None, description="evaluate a freshly initialised variant instead (smoke runs)")
    data: DataConfig = Field(default_factory=DataConfig, description="the dataset (eval_crop applies)")
    splits: Annotated[list[str], NoRepeats] = Field(
        ["val", "test"], min_length=1, description="splits of the dataset's manifest to evaluate, compared side by side"
    )
    split: str | None = Field(None, description="old spelling of splits=[NAME] (one split); kept as an alias")
    out_dir: Path = Field(
        Path("outputs/eval"),
        description="summary.md and config.yaml here; each split's metrics, "
        "grids and prompt heatmap in <out_dir>/<split>/",
    )
    y_channel: bool = Field(False, description="PSNR/SSIM on the BT.601 Y channel (the paper uses RGB)")
    crop_border: int = Field(0, ge=0, description="pixels removed from each side before the metrics (paper: 0)")
    tasks: list[str] | None = Field(None, description="evaluate only these tasks; None = every task of the split")
    zero_shot_tasks: list[str] = Field(default_factory=list, description="tasks held out of training (marked)")
    max_grids_per_task: int = Field(2, ge=0, description="input | output | target images saved per task")
    device: str = Field("auto", description="auto (cuda if available), cpu, cuda, cuda:1, ...")

    @model_validator(mode="before")
    @classmethod
    def _split_alias(cls, data: Any) -> Any:
        # `split=test` (one split, the spelling before `splits` existed) keeps working as `splits=[test]`.
        if not isinstance(data, dict) or data.get("split") is None:
            return data
        if data.get("splits") is not None:
            raise ValueError(
                f"give splits=[...] only: split={data['split']} is the old spelling of splits=[{data['split']}]"
            )
        return {**data, "splits": [data["split"]], "split": None}

    @model_validator(mode="after")
    def _one_model(self) -> "EvalConfig":
        if self.weights is None and self.variant is None:
            raise ValueError(
                "nothing to evaluate: give weights=path/to/model.safetensors (trained), weights=auto "
                f"({TRAINED_WEIGHTS}) or variant=NAME (a freshly initialised network, for smoke runs)"
            )
        if self.weights not in (None, "auto") and self.variant is not None:
            raise ValueError(
                "give exactly one of weights=path/to/model.safetensors (trained) or variant=NAME "
                "(a freshly initialised network, for smoke runs)"
            )
        return self

    def resolved_weights(self) -> str | None:
        """The weights to evaluate: a path (``auto`` resolved to :data:`TRAINED_WEIGHTS`), or None when a fresh
        ``variant`` is evaluated."""
        if self.variant is not None:
            return None
        return TRAINED_WEIGHTS if self.weights == "auto" else self.weights

    @property
    def protocol(self) -> MetricProtocol:
        return MetricProtocol(y_channel=self.y_channel, crop_border=self.crop_border)


# --- helpers ------------------------------------------------------------------------------------------------------
def _accepts_return_aux(model: torch.nn.Module) -> bool:
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    return "return_aux" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _model_config(model: torch.nn.Module) -> dict | None:
    config = getattr(model, "config", None)
    if config is None:
        return None
    if hasattr(config, "model_dump"):
        return config.model_dump(mode="json")
    return dict(config) if isinstance(config, dict) else {"repr": repr(config)}


def _finite(value: float) -> float:
    return PSNR_CAP if math.isinf(value) and value > 0 else value


def _means(images: list[dict]) -> dict[str, float]:
    out = {}
    for key in _METRICS:
        values = [_finite(im[key]) if key.endswith("psnr") else im[key] for im in images]
        out[key] = float(np.mean(values))
    out["delta_psnr"] = out["output_psnr"] - out["input_psnr"]
    if images and all("output_hu_mae" in im for im in images):
        for key in HU_METRICS:
            values = [_finite(im[key]) if key.endswith("psnr") else im[key] for im in images]
            out[key] = float(np.mean(values))
    return out


def _headline(images: list[dict], tasks: Sequence[str]) -> dict:
    """Mean over ``tasks`` of the per-task means (each task pooled over its domains)."""
    per_task = [_means([im for im in images if im["task"] == t]) for t in tasks]
    mean: dict[str, Any] = {"n_tasks": len(tasks), "n_images": sum(1 for im in images if im["task"] in set(tasks))}
    for key in (*_METRICS, "delta_psnr"):
        mean[key] = float(np.mean([m[key] for m in per_task])) if per_task else float("nan")
    return mean


def _to_uint8(image: np.ndarray) -> np.ndarray:
    """(3, H, W) float in [0, 1] -> (H, W, 3) uint8 (the same rounding as the metrics' quantisation)."""
    return np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8).transpose(1, 2, 0)


class _UsageCounter:
    """Counts of selected prompt indices per pool, overall and per task / domain."""

    def __init__(self) -> None:
        self.pools: dict[str, dict[str, Any]] = {}

    def add(self, pool: str, selection: Any, task: str, domain: str) -> None:
        size = int(selection.similarities.shape[-1])
        indices = selection.indices.detach().reshape(-1).cpu().tolist()
        entry = self.pools.setdefault(
            pool,
            {
                "size": size,
                "top_k": int(selection.indices.shape[-1]),
                "total": [0] * size,
                "by_task": defaultdict(lambda: [0] * size),
                "by_domain": defaultdict(lambda: [0] * size),
                "images": 0,
                "images_by_task": Counter(),
                "images_by_domain": Counter(),
            },
        )
        for i in indices:
            entry["total"][i] += 1
            entry["by_task"][task][i] += 1
            entry["by_domain"][domain][i] += 1
        entry["images"] += 1
        entry["images_by_task"][task] += 1
        entry["images_by_domain"][domain] += 1

    def result(self) -> dict | None:
        if not self.pools:
            return None
        result = {
            name: {k: (dict(sorted(v.items())) if isinstance(v, (dict, Counter)) else v) for k, v in e.items()}
            for name, e in self.pools.items()
        }
        for entry in result.values():  # how much the selection depends on the task and on the domain
            entry["nmi_task"] = selection_nmi(entry["by_task"])
            entry["nmi_domain"] = selection_nmi(entry["by_domain"])
        return result


# --- evaluation ---------------------------------------------------------------------------------------------------
def evaluate(
    model: torch.nn.Module,
    data: DataConfig,
    split: str = "val",
    out_dir: str | os.PathLike | None = None,
    protocol: MetricProtocol = PAPER,
    tasks: list[str] | None = None,
    max_grids_per_task: int = 2,
    device: str | torch.device | None = "cpu",
    zero_shot_tasks: Sequence[str] = (),
    metadata: dict | None = None,
    read_in_process: bool = False,
    dataset: DatasetHandle | None = None,
) -> EvalResult:
    """Score ``model`` on every sample of ``split`` (those of ``tasks`` only, when given); see the module docstring.

    The rows come from :func:`datprl.platform.data.pipeline.evaluation_rows` (Ray Data), or with ``read_in_process``
    from :func:`~datprl.platform.data.pipeline.local_evaluation_rows` (same rows and order, no Ray: periodic
    validation inside a training worker). The network runs in eval mode under ``torch.inference_mode`` on ``device``
    (``"auto"`` = cuda when available; ``None`` = wherever its parameters already are); its train/eval mode and device
    are restored afterwards, so the training loop can call this between steps. ``model`` may be any module mapping a
    (1, 3, H, W) batch to its restoration; networks whose ``forward`` takes ``return_aux`` also report prompt usage.
    With ``out_dir``: ``metrics.md``, ``metrics.csv``, ``metrics.json`` (``metadata`` is stored there too, e.g.
    weights or training step), ``grids/`` and ``prompt_usage.png``, every file written atomically. ``dataset``: the
    dataset's handle when the caller has opened it (its manifest is then not read again).
    """
    net = unwrap_model(model)
    first = next(iter(net.parameters()), None)
    home = first.device if first is not None else torch.device("cpu")
    target_device = home if device is None else resolve_device(device)
    dtype = first.dtype if first is not None and first.is_floating_point() else torch.float32
    zero_shot = set(zero_shot_tasks)
    wanted = set(tasks) if tasks is not None else None
    dataset = dataset if dataset is not None else DatasetHandle.open(data.dataset, data.s3)
    if tasks is not None:
        split_tasks(data.model_copy(update={"tasks": list(tasks)}), split, dataset)  # every task asked for has samples

    with_aux = _accepts_return_aux(net)
    usage = _UsageCounter()
    images: list[dict] = []
    grids: list[tuple[str, str, str, np.ndarray]] = []
    grids_per_task: Counter = Counter()
    report = StreamReport()
    was_training = net.training
    net.eval()
    if target_device != home:
        net.to(target_device)
    try:
        with torch.inference_mode():
            rows = local_evaluation_rows if read_in_process else evaluation_rows
            for row in rows(data, split, report=report, dataset=dataset):
                task, domain = str(row["task"]), str(row["domain"])
                if wanted is not None and task not in wanted:
                    continue
                lq = torch.from_numpy(np.array(row["lq"], dtype=np.float32))[None]
                gt = torch.from_numpy(np.array(row["gt"], dtype=np.float32))[None]
                if lq.shape != gt.shape:
                    raise ValueError(
                        f"sample {row['key']} ({domain}/{task}): input {tuple(lq.shape[1:])} and target "
                        f"{tuple(gt.shape[1:])} differ in size; evaluation needs aligned pairs"
                    )
                x = lq.to(target_device, dtype)
                out = net(x, return_aux=True) if with_aux else net(x)
                restored = out if isinstance(out, torch.Tensor) else out.image
                restored = restored.detach().float().cpu()
                if restored.shape != gt.shape:
                    raise ValueError(f"the model returned {tuple(restored.shape)} for a {tuple(lq.shape)} input")
                if not isinstance(out, torch.Tensor):
                    for pool in _POOLS:
                        selection = getattr(out, pool, None)
                        if selection is not None:
                            usage.add(pool, selection, task, domain)
                images.append(
                    {
                        "key": str(row["key"]),
                        "domain": domain,
                        "task": task,
                        "source_id": str(row["source_id"]),
                        "input_psnr": float(psnr(lq, gt, protocol)[0]),
                        "input_ssim": float(ssim(lq, gt, protocol)[0]),
                        "output_psnr": float(psnr(restored, gt, protocol)[0]),
                        "output_ssim": float(ssim(restored, gt, protocol)[0]),
                    }
                )
                if row.get("units") == "HU":  # CT also in physical units: the display metrics above hide HU errors
                    for name, image in (("input", lq), ("output", restored)):
                        mae, window_psnr = ct_hu_metrics(image, gt, float(row["white"]))
                        images[-1][f"{name}_hu_mae"], images[-1][f"{name}_hu_psnr"] = mae, window_psnr
                if out_dir is not None and grids_per_task[task] < max_grids_per_task:
                    grids_per_task[task] += 1
                    grid = np.concatenate(
                        [_to_uint8(row["lq"]), _to_uint8(restored[0].numpy()), _to_uint8(row["gt"])], axis=1
                    )
                    grids.append((domain, task, str(row["key"]), grid))
    finally:
        if target_device != home:
            net.to(home)
        net.train(was_training)

    if not images:
        what = f"tasks {sorted(wanted)}" if wanted is not None else "any task"
        raise ValueError(
            f"the {split!r} split of {data.dataset} gave no images of {what}"
            + (f" ({len(report.corrupt)} damaged samples skipped)" if report.corrupt else "")
        )

    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for im in images:
        groups[(im["domain"], im["task"])].append(im)
    rows = []
    for (domain, task), group in sorted(groups.items()):
        rows.append(
            {
                "domain": domain,
                "task": task,
                "zero_shot": task in zero_shot,
                "n": len(group),
                **_means(group),
                "input_exact": sum(math.isinf(im["input_psnr"]) for im in group),
                "output_exact": sum(math.isinf(im["output_psnr"]) for im in group),
            }
        )
    all_tasks = sorted({im["task"] for im in images})
    mean = _headline(images, all_tasks)
    seen = [t for t in all_tasks if t not in zero_shot]
    unseen = [t for t in all_tasks if t in zero_shot]
    if unseen:
        mean["zero_shot"] = _headline(images, unseen)
        if seen:
            mean["seen"] = _headline(images, seen)

    result = EvalResult(
        rows=rows,
        mean=mean,
        protocol=protocol.describe(),
        prompt_usage=usage.result(),
        split=split,
        dataset=str(data.dataset),
        zero_shot_tasks=unseen,
        model_config=_model_config(net),
        images=images,
        skipped=list(report.corrupt),
    )
    if out_dir is not None:
        write_outputs(result, Path(out_dir), grids, metadata)
    return result


# --- command line -------------------------------------------------------------------------------------------------
def _open_dataset(config: EvalConfig) -> tuple[DatasetHandle | None, str | None]:
    """(the dataset's handle, None), or (None, what stops ``config`` from being evaluated on it: no manifest, a split
    or task without samples, as a message naming the fix). Read from the manifest once, before Ray starts."""
    dataset = config.data.dataset
    try:
        handle = DatasetHandle.open(dataset, config.data.s3)
    except FileNotFoundError:
        return None, (
            f"no dataset at {dataset} (no manifest.json there): build one with `python jobs/build_dataset.py "
            f"output={dataset}` (`python jobs/train.py` builds the default corpus when it is missing), or "
            "set data.dataset=path/or/s3/prefix"
        )
    for split in config.splits:
        present = handle.tasks(split)
        if not present:
            splits = ", ".join(handle.splits()) or "none"
            return None, (
                f"split {split!r} has no samples in {dataset} (its splits: {splits}); "
                "set splits=[...] to those you want"
            )
        missing = sorted(set(config.tasks or ()) - set(present))
        if missing:
            return None, (
                f"tasks {missing} have no {split!r} samples in {dataset}; present: {present}; "
                "drop them from tasks=[...] or the split from splits=[...]"
            )
    return handle, None


def _same_dataset(a: str, b: str) -> bool:
    """Whether two dataset locations name the same place (a relative local path against its absolute form)."""
    if is_s3(a) or is_s3(b):
        return a.rstrip("/") == b.rstrip("/")
    return Path(a).resolve() == Path(b).resolve()


def _training_dataset(weights: str) -> str | None:
    """The ``data.dataset`` of the training run that exported ``weights`` (its ``config.yaml`` beside them, as
    ``jobs/train.py`` saves it), or None when there is no such readable file."""
    path = Path(weights).parent / "config.yaml"
    try:
        saved = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None
    dataset = saved.get("data", {}).get("dataset") if isinstance(saved, dict) else None
    return dataset if isinstance(dataset, str) else None


def main(argv: Sequence[str]) -> int:
    """``jobs/evaluate.py [config.yaml] [key=value ...]``: load the network (by default the weights ``jobs/train.py``
    exported), evaluate every split of ``splits`` (each written to ``<out_dir>/<split>/``), print and save the table
    comparing them side by side (``<out_dir>/summary.md``). Returns 2, after a message naming the fix, when the
    weights or the dataset are missing."""
    config = parse_cli(EvalConfig, argv, prog="evaluate.py")
    from datprl.models import create_model, load_model, weights_digest

    weights = config.resolved_weights()
    metadata: dict[str, Any] = {}
    if weights is not None:
        if not Path(weights).exists():
            if config.weights == "auto":
                message = (
                    f"no trained weights at {weights}. Run `python jobs/train.py` first (it trains the "
                    "network and exports its weights there), or give weights=path/to/model.safetensors, or "
                    "variant=paper_tiny for a smoke run of an untrained network"
                )
            else:
                message = f"weights file {weights} not found; give weights=path/to/model.safetensors"
            print(f"evaluate.py: error: {message}", file=sys.stderr)
            return 2
        trained_on = _training_dataset(weights)
        if trained_on is not None and not _same_dataset(trained_on, config.data.dataset):
            print(
                f"[evaluate] note: {weights} was trained on {trained_on}; evaluating on {config.data.dataset} "
                f"(set data.dataset={trained_on} for the training dataset)",
                flush=True,
            )
    dataset, problem = _open_dataset(config)
    if problem is not None:
        print(f"evaluate.py: error: {problem}", file=sys.stderr)
        return 2

    if weights is not None:
        model = load_model(weights)
        label = weights
        metadata.update(weights=str(weights), weights_sha256=weights_digest(weights))
    else:
        torch.manual_seed(0)
        model = create_model(config.variant)
        label = f"a freshly initialised {config.variant} (untrained)"
        metadata.update(variant=config.variant, note="freshly initialised network (smoke run), not trained")
    metadata["config"] = config_to_dict(config)
    device = resolve_device(config.device)
    model.to(device)  # once for every split (evaluate would move it there and back per split)

    results: dict[str, EvalResult] = {}
    with ray_session(local=LocalRaySettings(num_cpus=2, object_store_bytes=SMALL_OBJECT_STORE_BYTES, dashboard=False)):
        for split in config.splits:
            print(f"[evaluate] {label}: split {split} of {config.data.dataset}", flush=True)
            results[split] = evaluate(
                model,
                config.data,
                split=split,
                out_dir=config.out_dir / split,
                protocol=config.protocol,
                tasks=config.tasks,
                max_grids_per_task=config.max_grids_per_task,
                device=device,
                zero_shot_tasks=config.zero_shot_tasks,
                metadata=metadata,
                dataset=dataset,
            )
    summary = side_by_side_markdown(results, model=label)
    atomic_write_bytes(str(config.out_dir / "summary.md"), summary.encode("utf-8"))
    save_resolved_config(config, config.out_dir / "config.yaml")
    print(summary)
    for split, result in results.items():
        print(
            f"wrote {config.out_dir / split}/: metrics.md, metrics.csv, metrics.json, grids/"
            + (", prompt_usage.png" if result.prompt_usage else "")
        )
    print(f"wrote {config.out_dir}/summary.md, config.yaml")
    return 0
