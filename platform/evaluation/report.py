"""Evaluation reports: the result tables (markdown, CSV, JSON), comparison grids and prompt-usage heatmaps."""

from __future__ import annotations

import csv
import io
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from datprl.platform.data.conventions import CT_EVAL_WINDOW
from datprl.platform.storage import atomic_write_bytes


__all__ = [
    "EvalResult",
    "PSNR_CAP",
    "prompt_usage_png",
    "selection_dependence_line",
    "side_by_side_markdown",
    "write_outputs",
]

PSNR_CAP = 100.0
"""PSNR (dB) assigned to an exactly restored image (MSE 0, i.e. +inf) before averaging."""

_METRICS = ("input_psnr", "input_ssim", "output_psnr", "output_ssim")
#: CT rows (units HU) also carry these: MAE in HU over the image and PSNR over CT_EVAL_WINDOW.
HU_METRICS = ("input_hu_mae", "output_hu_mae", "input_hu_psnr", "output_hu_psnr")


def ct_hu_line(rows: Sequence[dict], prefix: str = "") -> str | None:
    """One line with the CT rows' HU metrics (input -> output), or None when there are no CT rows."""
    parts = [
        f"{r['task']} ({r['domain']}) MAE {r['input_hu_mae']:.1f} -> {r['output_hu_mae']:.1f} HU, PSNR "
        f"{r['input_hu_psnr']:.2f} -> {r['output_hu_psnr']:.2f} dB"
        for r in rows
        if "output_hu_mae" in r
    ]
    if not parts:
        return None
    low, high = CT_EVAL_WINDOW
    return (
        f"{prefix}CT in Hounsfield units, input -> output: "
        + "; ".join(parts)
        + f" (MAE over the whole slice; PSNR over the window [{low}, {high}] HU, data range {high - low} HU)"
    )


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
            f"{self.mean['n_tasks']} tasks"
            + (f", {len(self.skipped)} damaged samples skipped" if self.skipped else ""),
            "",
            "| domain | task | n | input PSNR/SSIM | output PSNR/SSIM | delta PSNR |",
            "| --- | --- | ---: | ---: | ---: | ---: |",
        ]
        for r in self.rows:
            task = r["task"] + (" (zero-shot)" if r["zero_shot"] else "")
            lines.append(
                f"| {r['domain']} | {task} | {r['n']} | {pair(r['input_psnr'], r['input_ssim'])} | "
                f"{pair(r['output_psnr'], r['output_ssim'])} | {r['delta_psnr']:+.2f} |"
            )
        for label, m in (
            ("seen tasks", self.mean.get("seen")),
            ("zero-shot tasks", self.mean.get("zero_shot")),
            ("all tasks", self.mean),
        ):
            if m is None:
                continue
            lines.append(
                f"| **Mean** | {label} ({m['n_tasks']}) | {m['n_images']} | "
                f"{pair(m['input_psnr'], m['input_ssim'])} | {pair(m['output_psnr'], m['output_ssim'])} | "
                f"{m['delta_psnr']:+.2f} |"
            )
        lines += [
            "",
            "Mean = mean over tasks of the per-task means (the paper's headline). Input = the degraded image itself "
            f"(do-nothing baseline). Exact restorations (infinite PSNR) count as {PSNR_CAP:g} dB.",
            f"Metric protocol: {self.protocol}",
        ]
        hu = ct_hu_line(self.rows)
        if hu:
            lines += ["", hu]
        if self.prompt_usage:
            lines += ["", selection_dependence_line(self.prompt_usage)]
        return "\n".join(lines) + "\n"

    def to_json(self) -> dict:
        """Everything as a JSON-compatible dict (infinite per-image PSNRs become null)."""
        data = asdict(self)
        data["n_images"] = self.n_images
        data["images"] = [
            {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in im.items()}
            for im in self.images
        ]
        return data


def side_by_side_markdown(results: Mapping[str, EvalResult], model: str = "") -> str:
    """One table comparing several splits of a dataset: per (domain, task) the image count, input PSNR, output PSNR
    and delta (output - input) of every split next to each other, then the means over tasks (the paper's headline) of
    every split. A task that a split lacks shows ``-`` there. ``results`` maps split name to its :class:`EvalResult`
    (in column order); ``model`` names what was evaluated in the heading."""
    if not results:
        raise ValueError("side_by_side_markdown needs the result of at least one split")
    splits = list(results)
    first = results[splits[0]]
    by_split = {split: {(r["domain"], r["task"]): r for r in result.rows} for split, result in results.items()}
    keys = sorted({key for rows in by_split.values() for key in rows})
    zero_shot = {task for result in results.values() for task in result.zero_shot_tasks}
    missing = "| - | - | - | - "

    def cells(n: int, m: dict) -> str:
        return f"| {n} | {m['input_psnr']:.2f} | {m['output_psnr']:.2f} | {m['delta_psnr']:+.2f} "

    images = ", ".join(f"`{split}` {result.n_images} images" for split, result in results.items())
    lines = [
        f"Evaluation{' of ' + model if model else ''} on {first.dataset or 'the dataset'}: {images}",
        "",
        "| domain | task " + "".join(f"| {s} n | {s} input PSNR | {s} output PSNR | {s} delta " for s in splits) + "|",
        "| --- | --- " + "| ---: | ---: | ---: | ---: " * len(splits) + "|",
    ]
    for domain, task in keys:
        label = task + (" (zero-shot)" if task in zero_shot else "")
        row = f"| {domain} | {label} "
        for split in splits:
            r = by_split[split].get((domain, task))
            row += missing if r is None else cells(r["n"], r)
        lines.append(row + "|")
    for label, part in (("seen tasks", "seen"), ("zero-shot tasks", "zero_shot"), ("all tasks", None)):
        means = {split: (result.mean if part is None else result.mean.get(part)) for split, result in results.items()}
        if all(m is None for m in means.values()):
            continue
        row = f"| **Mean** | {label} "
        for split in splits:
            m = means[split]
            row += missing if m is None else cells(m["n_images"], m)
        lines.append(row + "|")
    task_counts = {split: result.mean["n_tasks"] for split, result in results.items()}
    lines += [
        "",
        "PSNR in dB. Input = the degraded image itself (do-nothing baseline); delta = output - input. Mean = mean over "
        "tasks of the per-task means (the paper's headline); its n counts images.",
    ]
    if len(set(task_counts.values())) > 1 or len({frozenset(rows) for rows in by_split.values()}) > 1:
        counts = ", ".join(f"{split} {n}" for split, n in task_counts.items())
        lines.append(f"The splits hold different tasks ({counts}), so their means are over different tasks.")
    lines.append(f"Metric protocol: {first.protocol}")
    for split, result in results.items():
        hu = ct_hu_line(result.rows, prefix=f"{split}: ")
        if hu:
            lines.append(hu)
    for split, result in results.items():
        if result.prompt_usage:
            lines.append(f"{split}: {selection_dependence_line(result.prompt_usage)}")
    return "\n".join(lines) + "\n"


# --- helpers ------------------------------------------------------------------------------------------------------
def _png_bytes(array: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "x"


def selection_dependence_line(usage: dict) -> str:
    """One line: per pool, the normalised mutual information of its selected prompts with the task and the domain
    labels (:func:`~datprl.platform.evaluation.metrics.selection_nmi`; "-" where there is a single label)."""

    def shown(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    pools = "; ".join(
        f"{name} pool: task {shown(entry.get('nmi_task'))}, domain {shown(entry.get('nmi_domain'))}"
        for name, entry in usage.items()
    )
    return (
        "Prompt selection vs labels, NMI = I(label; prompt) / H(label) (0: the same prompts for every label, "
        f"1: the prompts determine the label): {pools}"
    )


def prompt_usage_png(usage: dict) -> bytes:
    """Heatmaps of selection frequency (fraction of images selecting each prompt): one row of panels per pool, rows =
    tasks on the left and domains on the right, columns = prompt index."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # no pyplot: no global state, no backend switch in the caller's process

    pools = list(usage)
    n_rows = max(max(len(usage[p]["by_task"]), len(usage[p]["by_domain"])) for p in pools)
    max_size = max(usage[p]["size"] for p in pools)
    fig = Figure(
        figsize=(2.5 + 2 * max(4.0, 0.45 * max_size), 1.2 + len(pools) * (0.9 + 0.4 * n_rows)), layout="constrained"
    )
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(pools), 2, squeeze=False)
    image = None
    for row, pool in enumerate(pools):
        entry = usage[pool]
        for col, (by, counts_key, label) in enumerate(
            (("task", "by_task", "images_by_task"), ("domain", "by_domain", "images_by_domain"))
        ):
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
                    ax.text(
                        j, i, f"{v:.2f}", ha="center", va="center", fontsize=6, color="black" if v > 0.6 else "white"
                    )
    fig.colorbar(image, ax=axes, shrink=0.8, label="fraction of images selecting the prompt")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


def write_outputs(
    result: EvalResult,
    out_dir: Path,
    grids: Sequence[tuple[str, str, str, np.ndarray]] = (),
    metadata: dict | None = None,
) -> None:
    """Write metrics.md/.csv/.json, the comparison grids and (with pools) prompt_usage.png, each atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out_dir / "metrics.md", result.markdown().encode("utf-8"))

    columns = ["domain", "task", "zero_shot", "n", *_METRICS, "delta_psnr", *HU_METRICS, "input_exact", "output_exact"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(result.rows)
    m = result.mean
    writer.writerow(
        {
            "domain": "mean",
            "task": f"all ({m['n_tasks']} tasks)",
            "zero_shot": "",
            "n": m["n_images"],
            **{k: m[k] for k in (*_METRICS, "delta_psnr")},
        }
    )
    atomic_write_bytes(out_dir / "metrics.csv", buffer.getvalue().encode("utf-8"))

    data = result.to_json()
    data["metadata"] = metadata or {}
    atomic_write_bytes(
        out_dir / "metrics.json", (json.dumps(data, indent=1, allow_nan=False, default=str) + "\n").encode("utf-8")
    )

    for domain, task, key, grid in grids:
        name = "__".join(_safe_name(p) for p in (domain, task, key)) + ".png"
        atomic_write_bytes(out_dir / "grids" / name, _png_bytes(grid))
    if result.prompt_usage:
        atomic_write_bytes(out_dir / "prompt_usage.png", prompt_usage_png(result.prompt_usage))
