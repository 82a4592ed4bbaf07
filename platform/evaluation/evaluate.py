"""Evaluation: PSNR/SSIM of a restoration network on a split of a dataset, per (domain, task), under a recorded protocol.

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
found it in); ``jobs/evaluate.py`` runs it from the command line on exported weights (:func:`main`).
"""

from __future__ import annotations

import csv
import inspect
import io
import json
import math
import os
import re
import sys
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import Field, model_validator

from datprl.platform.config import StrictModel, config_to_dict, parse_cli, save_resolved_config
from datprl.platform.data import DataConfig, StreamReport, evaluation_rows, local_evaluation_rows
from datprl.platform.storage import atomic_write_bytes
from datprl.platform.metrics import PAPER, MetricProtocol, psnr, ssim


__all__ = ["EvalConfig", "EvalResult", "PSNR_CAP", "evaluate", "main", "resolve_device"]

PSNR_CAP = 100.0
"""PSNR (dB) assigned to an exactly restored image (MSE 0, i.e. +inf) before averaging."""

_METRICS = ("input_psnr", "input_ssim", "output_psnr", "output_ssim")
_POOLS = ("task", "domain")


class EvalConfig(StrictModel):
    """Evaluate a restoration network (exported weights, or a fresh variant for smoke runs) on a dataset split."""

    weights: str | None = Field(None, description="a .safetensors file written by save_model (its .json beside it)")
    variant: str | None = Field(None, description="evaluate a freshly initialised variant instead (smoke runs)")
    data: DataConfig = Field(default_factory=DataConfig, description="the dataset (eval_crop applies)")
    split: str = Field("test", description="split of the dataset's manifest to evaluate")
    out_dir: Path = Field(Path("outputs/eval"), description="where metrics, grids and the prompt heatmap are written")
    y_channel: bool = Field(False, description="PSNR/SSIM on the BT.601 Y channel (the paper uses RGB)")
    crop_border: int = Field(0, ge=0, description="pixels removed from each side before the metrics (paper: 0)")
    tasks: list[str] | None = Field(None, description="evaluate only these tasks; None = every task of the split")
    zero_shot_tasks: list[str] = Field(default_factory=list, description="tasks held out of training (marked)")
    max_grids_per_task: int = Field(2, ge=0, description="input | output | target images saved per task")
    device: str = Field("auto", description="auto (cuda if available), cpu, cuda, cuda:1, ...")

    @model_validator(mode="after")
    def _one_model(self) -> "EvalConfig":
        if (self.weights is None) == (self.variant is None):
            raise ValueError("give exactly one of weights=path/to/model.safetensors (trained) or variant=NAME "
                             "(a freshly initialised network, for smoke runs)")
        return self

    @property
    def protocol(self) -> MetricProtocol:
        return MetricProtocol(y_channel=self.y_channel, crop_border=self.crop_border)


@dataclass
class EvalResult:
    """What :func:`evaluate` measured.

    rows: one dict per (domain, task): domain, task, zero_shot, n, input_psnr, input_ssim, output_psnr, output_ssim,
        delta_psnr (output - input), input_exact / output_exact (images with infinite PSNR, capped at PSNR_CAP).
    mean: the headline, means over tasks of the per-task means (n_tasks, n_images and the metric keys); with zero-shot
        tasks also ``mean["seen"]`` and ``mean["zero_shot"]`` over those tasks only.
    protocol: the metric protocol's description. prompt_usage: per pool (``task``/``domain``): its size and top_k,
        selected-index counts ``total`` / ``by_task`` / ``by_domain`` (lists of pool-size ints) and the image counts
        ``images`` / ``images_by_task`` / ``images_by_domain``; None for a network without pools.
    images: per-image scores (key, domain, task, source_id and the four metrics, PSNRs uncapped, inf allowed).
    skipped: damaged samples that were skipped (shard and key in each message).
    """

    rows: list[dict]
    mean: dict
    protocol: str
    prompt_usage: dict | None = None
    split: str = ""
    dataset: str = ""
    zero_shot_tasks: list[str] = field(default_factory=list)
    model_config: dict | None = None
    images: list[dict] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    @property
    def n_images(self) -> int:
        return len(self.images)

    def markdown(self) -> str:
        """The results table (one row per domain and task, then the mean over tasks) and the metric protocol."""
        def pair(p: float, s: float) -> str:
            return f"{p:.2f} / {s:.4f}"

        lines = [
            f"Evaluation of {self.dataset or 'the dataset'}, split `{self.split}`: {self.n_images} images, "
            f"{self.mean['n_tasks']} tasks" + (f", {len(self.skipped)} damaged samples skipped" if self.skipped else ""),
            "",
            "| domain | task | n | input PSNR/SSIM | output PSNR/SSIM | delta PSNR |",
            "| --- | --- | ---: | ---: | ---: | ---: |",
        ]
        for r in self.rows:
            task = r["task"] + (" (zero-shot)" if r["zero_shot"] else "")
            lines.append(f"| {r['domain']} | {task} | {r['n']} | {pair(r['input_psnr'], r['input_ssim'])} | "
                         f"{pair(r['output_psnr'], r['output_ssim'])} | {r['delta_psnr']:+.2f} |")
        for label, m in (("seen tasks", self.mean.get("seen")), ("zero-shot tasks", self.mean.get("zero_shot")),
                         ("all tasks", self.mean)):  # fmt: skip
            if m is None:
                continue
            lines.append(f"| **Mean** | {label} ({m['n_tasks']}) | {m['n_images']} | "
                         f"{pair(m['input_psnr'], m['input_ssim'])} | {pair(m['output_psnr'], m['output_ssim'])} | "
                         f"{m['delta_psnr']:+.2f} |")
        lines += [
            "",
            "Mean = mean over tasks of the per-task means (the paper's headline). Input = the degraded image itself "
            f"(do-nothing baseline). Exact restorations (infinite PSNR) count as {PSNR_CAP:g} dB.",
            f"Metric protocol: {self.protocol}",
        ]
        return "\n".join(lines) + "\n"

    def to_json(self) -> dict:
        """Everything as a JSON-compatible dict (infinite per-image PSNRs become null)."""
        data = asdict(self)
        data["n_images"] = self.n_images
        data["images"] = [{k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in im.items()}
                          for im in self.images]
        return data


# --- helpers ------------------------------------------------------------------------------------------------------
def resolve_device(name: str | torch.device) -> torch.device:
    """``auto`` -> cuda when available, else cpu; a CUDA device asked for without CUDA is an error."""
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device={name} was asked for, but torch sees no CUDA device; use device=cpu or auto")
    return device


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The network inside a DistributedDataParallel / DataParallel wrapper (evaluation runs on one process)."""
    while isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
        model = model.module
    return model


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


def _png_bytes(array: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "x"


def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically, readable by others (see :func:`datprl.platform.storage.atomic_write_bytes`)."""
    atomic_write_bytes(str(path), data)


def _write_text(path: Path, text: str) -> None:
    _atomic_write(path, text.encode("utf-8"))


class _UsageCounter:
    """Counts of selected prompt indices per pool, overall and per task / domain."""

    def __init__(self) -> None:
        self.pools: dict[str, dict[str, Any]] = {}

    def add(self, pool: str, selection: Any, task: str, domain: str) -> None:
        size = int(selection.similarities.shape[-1])
        indices = selection.indices.detach().reshape(-1).cpu().tolist()
        entry = self.pools.setdefault(pool, {
            "size": size, "top_k": int(selection.indices.shape[-1]), "total": [0] * size,
            "by_task": defaultdict(lambda: [0] * size), "by_domain": defaultdict(lambda: [0] * size),
            "images": 0, "images_by_task": Counter(), "images_by_domain": Counter(),
        })  # fmt: skip
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
        return {name: {k: (dict(sorted(v.items())) if isinstance(v, (dict, Counter)) else v) for k, v in e.items()}
                for name, e in self.pools.items()}


def prompt_usage_png(usage: dict) -> bytes:
    """Heatmaps of selection frequency (fraction of images selecting each prompt): one row of panels per pool, rows =
    tasks on the left and domains on the right, columns = prompt index."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # no pyplot: no global state, no backend switch in the caller's process

    pools = list(usage)
    n_rows = max(max(len(usage[p]["by_task"]), len(usage[p]["by_domain"])) for p in pools)
    max_size = max(usage[p]["size"] for p in pools)
    fig = Figure(figsize=(2.5 + 2 * max(4.0, 0.45 * max_size), 1.2 + len(pools) * (0.9 + 0.4 * n_rows)),
                 layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(pools), 2, squeeze=False)
    image = None
    for row, pool in enumerate(pools):
        entry = usage[pool]
        for col, (by, counts_key, label) in enumerate((("task", "by_task", "images_by_task"),
                                                         ("domain", "by_domain", "images_by_domain"))):
            ax = axes[row][col]
            names = list(entry[counts_key])
            freq = np.array([[c / max(entry[label][n], 1) for c in entry[counts_key][n]] for n in names])
            image = ax.imshow(freq, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto", interpolation="nearest")
            ax.set_xticks(range(entry["size"]))
            ax.set_yticks(range(len(names)), labels=[f"{n} ({entry[label][n]})" for n in names], fontsize=8)
            ax.set_xlabel(f"{pool} prompt index (top-{entry['top_k']} of {entry['size']})", fontsize=8)
            ax.set_title(f"{pool} pool by {by}", fontsize=9)
            ax.tick_params(axis="x", labelsize=7)
            if entry["size"] <= 24 and len(names) <= 24:
                for (i, j), v in np.ndenumerate(freq):
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6,
                            color="black" if v > 0.6 else "white")
    fig.colorbar(image, ax=axes, shrink=0.8, label="fraction of images selecting the prompt")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


# --- evaluation ---------------------------------------------------------------------------------------------------
def _check_tasks(data: DataConfig, split: str, tasks: Sequence[str] | None) -> None:
    if tasks is None:
        return
    from datprl.platform.shards import read_manifest

    manifest = read_manifest(data.dataset, data.s3)
    present = sorted({c.task for c in manifest.counts if c.split == split and c.samples > 0})
    missing = sorted(set(tasks) - set(present))
    if missing:
        raise ValueError(f"tasks {missing} have no {split!r} samples in {data.dataset}; present: {present}")


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
) -> EvalResult:
    """Score ``model`` on every sample of ``split`` (those of ``tasks`` only, when given); see the module docstring.

    The rows come from :func:`datprl.platform.data.evaluation_rows` (Ray Data), or with ``read_in_process`` from
    :func:`~datprl.platform.data.local_evaluation_rows` (same rows and order, no Ray: periodic validation inside a
    training worker). The network runs in eval mode under
    ``torch.inference_mode`` on ``device`` (``"auto"`` = cuda when available; ``None`` = wherever its parameters
    already are); its train/eval mode and device are restored afterwards, so the training loop can call this between
    steps. ``model`` may be any module mapping a (1, 3, H, W) batch to its restoration; networks whose ``forward``
    takes ``return_aux`` also report prompt usage. With ``out_dir``: ``metrics.md``, ``metrics.csv``,
    ``metrics.json`` (``metadata`` is stored there too, e.g. weights or training step), ``grids/`` and
    ``prompt_usage.png``, every file written atomically.
    """
    net = _unwrap(model)
    first = next(iter(net.parameters()), None)
    home = first.device if first is not None else torch.device("cpu")
    target_device = home if device is None else resolve_device(device)
    dtype = first.dtype if first is not None and first.is_floating_point() else torch.float32
    zero_shot = set(zero_shot_tasks)
    wanted = set(tasks) if tasks is not None else None
    _check_tasks(data, split, tasks)

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
            for row in rows(data, split, report=report):
                task, domain = str(row["task"]), str(row["domain"])
                if wanted is not None and task not in wanted:
                    continue
                lq = torch.from_numpy(np.array(row["lq"], dtype=np.float32))[None]
                gt = torch.from_numpy(np.array(row["gt"], dtype=np.float32))[None]
                if lq.shape != gt.shape:
                    raise ValueError(f"sample {row['key']} ({domain}/{task}): input {tuple(lq.shape[1:])} and target "
                                     f"{tuple(gt.shape[1:])} differ in size; evaluation needs aligned pairs")
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
                images.append({
                    "key": str(row["key"]), "domain": domain, "task": task, "source_id": str(row["source_id"]),
                    "input_psnr": float(psnr(lq, gt, protocol)[0]), "input_ssim": float(ssim(lq, gt, protocol)[0]),
                    "output_psnr": float(psnr(restored, gt, protocol)[0]),
                    "output_ssim": float(ssim(restored, gt, protocol)[0]),
                })  # fmt: skip
                if out_dir is not None and grids_per_task[task] < max_grids_per_task:
                    grids_per_task[task] += 1
                    grid = np.concatenate([_to_uint8(row["lq"]), _to_uint8(restored[0].numpy()),
                                           _to_uint8(row["gt"])], axis=1)  # fmt: skip
                    grids.append((domain, task, str(row["key"]), grid))
    finally:
        if target_device != home:
            net.to(home)
        net.train(was_training)

    if not images:
        what = f"tasks {sorted(wanted)}" if wanted is not None else "any task"
        raise ValueError(f"the {split!r} split of {data.dataset} gave no images of {what}"
                         + (f" ({len(report.corrupt)} damaged samples skipped)" if report.corrupt else ""))

    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for im in images:
        groups[(im["domain"], im["task"])].append(im)
    rows = []
    for (domain, task), group in sorted(groups.items()):
        rows.append({"domain": domain, "task": task, "zero_shot": task in zero_shot, "n": len(group),
                     **_means(group),
                     "input_exact": sum(math.isinf(im["input_psnr"]) for im in group),
                     "output_exact": sum(math.isinf(im["output_psnr"]) for im in group)})  # fmt: skip
    all_tasks = sorted({im["task"] for im in images})
    mean = _headline(images, all_tasks)
    seen = [t for t in all_tasks if t not in zero_shot]
    unseen = [t for t in all_tasks if t in zero_shot]
    if unseen:
        mean["zero_shot"] = _headline(images, unseen)
        if seen:
            mean["seen"] = _headline(images, seen)

    result = EvalResult(
        rows=rows, mean=mean, protocol=protocol.describe(), prompt_usage=usage.result(), split=split,
        dataset=str(data.dataset), zero_shot_tasks=unseen, model_config=_model_config(net), images=images,
        skipped=list(report.corrupt),
    )  # fmt: skip
    if out_dir is not None:
        write_outputs(result, Path(out_dir), grids, metadata)
    return result


def write_outputs(result: EvalResult, out_dir: Path, grids: Sequence[tuple[str, str, str, np.ndarray]] = (),
                  metadata: dict | None = None) -> None:
    """Write metrics.md/.csv/.json, the comparison grids and (with pools) prompt_usage.png, each atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_text(out_dir / "metrics.md", result.markdown())

    columns = ["domain", "task", "zero_shot", "n", *_METRICS, "delta_psnr", "input_exact", "output_exact"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(result.rows)
    m = result.mean
    writer.writerow({"domain": "mean", "task": f"all ({m['n_tasks']} tasks)", "zero_shot": "", "n": m["n_images"],
                     **{k: m[k] for k in (*_METRICS, "delta_psnr")}})
    _write_text(out_dir / "metrics.csv", buffer.getvalue())

    data = result.to_json()
    data["metadata"] = metadata or {}
    _write_text(out_dir / "metrics.json", json.dumps(data, indent=1, allow_nan=False, default=str) + "\n")

    for domain, task, key, grid in grids:
        name = "__".join(_safe_name(p) for p in (domain, task, key)) + ".png"
        _atomic_write(out_dir / "grids" / name, _png_bytes(grid))
    if result.prompt_usage:
        _atomic_write(out_dir / "prompt_usage.png", prompt_usage_png(result.prompt_usage))


# --- command line -------------------------------------------------------------------------------------------------
def _start_ray() -> bool:
    """Connect to RAY_ADDRESS or start a small local Ray unless one is running; True if this call started it."""
    import ray

    if ray.is_initialized():
        return False
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=256 * 1024**2)
    return True


def main(argv: Sequence[str]) -> int:
    """``jobs/evaluate.py [config.yaml] [key=value ...]``: load the network, evaluate, print the table, save all."""
    config = parse_cli(EvalConfig, argv, prog="evaluate.py")
    from datprl.models import create_model, load_model, weights_digest

    metadata: dict[str, Any] = {}
    if config.weights is not None:
        if not Path(config.weights).exists():
            print(f"evaluate.py: error: weights file {config.weights} not found", file=sys.stderr)
            return 2
        model = load_model(config.weights)
        metadata.update(weights=str(config.weights), weights_sha256=weights_digest(config.weights))
    else:
        torch.manual_seed(0)
        model = create_model(config.variant)
        metadata.update(variant=config.variant, note="freshly initialised network (smoke run), not trained")
    metadata["config"] = config_to_dict(config)

    started = _start_ray()
    try:
        result = evaluate(model, config.data, split=config.split, out_dir=config.out_dir, protocol=config.protocol,
                          tasks=config.tasks, max_grids_per_task=config.max_grids_per_task, device=config.device,
                          zero_shot_tasks=config.zero_shot_tasks, metadata=metadata)  # fmt: skip
    finally:
        if started:
            import ray

            ray.shutdown()
    save_resolved_config(config, config.out_dir / "config.yaml")
    print(result.markdown())
    print(f"wrote {config.out_dir}/metrics.md, metrics.csv, metrics.json, grids/"
          + (", prompt_usage.png" if result.prompt_usage else "") + ", config.yaml")
    return 0
