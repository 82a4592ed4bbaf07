"""The paper's ablation at equal budget: which parts of DATPRL-IR buy restoration quality.

``python jobs/ablate.py [--dry-run] [config.yaml] [key=value ...]`` trains every arm for every seed with the same
recipe (``train``: one :class:`~datprl.platform.train.config.TrainConfig`, the same steps, data and losses), evaluates
each run on ``split`` (the cross-source test split of the default corpus, images from packages and volumes never
trained on) and, when the recipe has one, on its ``evaluate_split`` too, and writes to ``output_dir``:

- ``runs/<arm>_s<seed>/``: each run's outputs as ``jobs/train.py`` writes them (weights, ``eval*/metrics.json``);
  its checkpoints live in ``train.storage`` under the run name ``<name>-<arm>-s<seed>``;
- ``ablation.md``: per arm and task, the delta PSNR (output - input) as mean +- std over seeds, the arms ordered by
  their mean, the budget and, when the evaluations carry them, the prompt-selection NMIs (task pool with the task,
  domain pool with the domain); ``ablation.csv``: every run's raw numbers and the aggregates; ``ablation.png``: grouped
  bars; ``prompt_usage_<split>.png``: the prompt-usage heatmaps of the first seed's runs side by side, one column per
  arm with pools;
- ``config.yaml``: the resolved ablation config.

The default arms (:data:`DEFAULT_ARMS`):

1. ``no_pools`` (``restormer_tiny``): the backbone alone. In the tiny family the paper's own backbone
   (``paper_backbone``) and the plain Restormer (``restormer``) differ only in their decoder block counts, which the
   tiny config sets to (1, 1, 1) for both, so this one arm stands for both rows of the paper's table.
2. ``task_pool_only`` (``task_only_tiny``): the degradation (task) prompt pool, no domain pool.
3. ``both_pools_no_priors`` (``paper_tiny``, ``text_embeddings=null``): both pools, no text: L_align and L_psel off,
   and the domain keys trained from their random start (the variant fixes them at the descriptions' domain means).
4. ``both_pools_with_priors`` (``paper_tiny``, the recipe's ``text_embeddings``, by default the MLLM descriptions'
   embeddings, described on the fly when missing): the full method.

A run whose metrics already exist is not trained again, so the same command resumes an interrupted ablation (a run
interrupted mid-training resumes from its last checkpoint); runs whose recorded config differs from the one asked for
stop the job rather than mix two budgets in one table.
"""

from __future__ import annotations

import csv
import io
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from pydantic import Field, field_validator

from datprl.models.factory import VARIANTS
from datprl.models.spec import ModelSpec, VariantName
from datprl.platform.config import (
    ConfigError,
    NoRepeats,
    StrictModel,
    config_to_dict,
    load_config,
    parse_cli,
    save_resolved_config,
)
from datprl.platform.storage import atomic_write_bytes
from datprl.platform.train.config import TrainConfig

__all__ = [
    "AblationArm",
    "AblationConfig",
    "ArmStats",
    "DEFAULT_ARMS",
    "Heatmaps",
    "Score",
    "Selection",
    "Stats",
    "aggregate",
    "compose_side_by_side",
    "main",
    "ordering_sentence",
    "run_config",
    "run_dir",
    "write_prompt_usage",
    "write_reports",
]

NO_POOLS_NOTE = (
    "no_pools (restormer_tiny) stands for both the paper's own backbone without pools (paper_backbone) and the plain "
    "Restormer: in the tiny family they differ only in decoder block counts, which the tiny config sets to (1, 1, 1) "
    "for both."
)


class AblationArm(StrictModel):
    """One arm: a registered variant trained with or without the description priors (text embeddings)."""

    name: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="label in the tables; names the run's folder"
    )
    variant: VariantName = Field(description="registered variant (datprl.models.VARIANTS)")
    priors: bool = Field(
        False,
        description="align the domain prompts with the descriptions' text embeddings "
        "(train.text_embeddings, L_align and L_psel); false = text_embeddings=null",
    )

    @field_validator("priors")
    @classmethod
    def _priors_need_a_domain_pool(cls, priors: bool, info) -> bool:
        # The text embeddings only reach the network through the domain pool (L_align, L_psel): without one, an arm
        # "with priors" would silently be the same training as without.
        variant = info.data.get("variant")
        if priors and variant is not None and VARIANTS[variant].domain_pool is None:
            raise ValueError(
                f"variant {variant!r} has no domain pool, so the priors (L_align, L_psel on the domain "
                "pool) would change nothing; set priors=false or pick a variant with a domain pool"
            )
        return priors


DEFAULT_ARMS: tuple[AblationArm, ...] = (
    AblationArm(name="no_pools", variant="restormer_tiny"),
    AblationArm(name="task_pool_only", variant="task_only_tiny"),
    AblationArm(name="both_pools_no_priors", variant="paper_tiny", priors=False),
    AblationArm(name="both_pools_with_priors", variant="paper_tiny", priors=True),
)


class AblationConfig(StrictModel):
    """The ablation job: every arm x seed trained with the same recipe, evaluated on the cross-source test split."""

    name: str = Field(
        "ablation",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
        description="prefix of the runs' names (<name>-<arm>-s<seed>, in train.storage)",
    )
    train: TrainConfig = Field(
        TrainConfig(),
        description="the recipe every run shares (defaults: the training job's); name, model, seed, output_dir and "
        "cross_source_split are set per run",
    )
    # validate_default: the default arms include one with priors, which must be checked against train too.
    arms: list[AblationArm] = Field(
        default_factory=lambda: list(DEFAULT_ARMS),
        min_length=1,
        validate_default=True,
        description="the arms: name, variant, priors",
    )
    seeds: Annotated[list[int], NoRepeats] = Field([0, 1, 2], min_length=1, description="seeds every arm is run with")
    split: str = Field("test", min_length=1, description="split the table reports (the cross-source test split)")
    output_dir: str = Field(
        "outputs/ablation", description="local folder: tables, plot, resolved config and runs/<arm>_s<seed>"
    )

    @field_validator("train")
    @classmethod
    def _no_model_in_recipe(cls, train: TrainConfig) -> TrainConfig:
        if train.model != ModelSpec():
            raise ValueError(
                f"each arm names its network (arms[i].variant): leave train.model unset (got {train.model.describe()})"
            )
        return train

    @field_validator("arms")
    @classmethod
    def _arms_fit(cls, arms: list[AblationArm], info) -> list[AblationArm]:
        names = [arm.name for arm in arms]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"arm names must differ (they name the runs and the table rows); repeated: {repeated}")
        train = info.data.get("train")
        with_priors = [arm.name for arm in arms if arm.priors]
        if train is not None and train.text_embeddings is None and with_priors:
            raise ValueError(
                f"arms {with_priors} use priors but train.text_embeddings is null; set it (auto = the "
                "dataset's descriptions) or set priors=false"
            )
        return arms

    def dry_run_documents(self) -> dict[str, dict]:
        """Extra YAML document ``--dry-run`` prints: the runs this config trains."""
        runs = [
            {
                "run": run_config(self, arm, seed).name,
                "variant": arm.variant,
                "priors": arm.priors,
                "seed": seed,
                "output_dir": str(run_dir(self, arm, seed)),
            }
            for seed in self.seeds
            for arm in self.arms
        ]
        return {"runs": {"count": len(runs), "runs": runs}}


def run_dir(config: AblationConfig, arm: AblationArm, seed: int) -> Path:
    """The run's output folder: ``<output_dir>/runs/<arm>_s<seed>``."""
    return Path(config.output_dir) / "runs" / f"{arm.name}_s{seed}"


def _arm_model(arm: AblationArm) -> dict:
    """The arm's network: its variant, with the domain keys trained when the arm has no priors and the variant fixes
    them (``paper_tiny`` sets them from the descriptions; without any they would stay at their random start)."""
    pool = VARIANTS[arm.variant].domain_pool
    if not arm.priors and pool is not None and pool.fixed_keys:
        return {"variant": arm.variant, "domain_pool": {"fixed_keys": False}}
    return {"variant": arm.variant}


def run_config(config: AblationConfig, arm: AblationArm, seed: int) -> TrainConfig:
    """The TrainConfig of one (arm, seed): the shared recipe with the arm's network and priors, the seed, its own run
    name and output folder, and ``split`` as the cross-source split (validated like a config file)."""
    fields = config.train.model_dump()  # python mode: S3 secrets stay readable for the workers
    fields.update(
        name=f"{config.name}-{arm.name}-s{seed}",
        output_dir=str(run_dir(config, arm, seed)),
        seed=seed,
        model=_arm_model(arm),
        text_embeddings=config.train.text_embeddings if arm.priors else None,
        cross_source_split=config.split,
    )
    return TrainConfig.model_validate(fields)


def metrics_file(train: TrainConfig, split: str) -> Path:
    """Where ``jobs/train.py`` writes the evaluation of ``split``: ``eval/`` for ``evaluate_split``, else
    ``eval-<split>/``."""
    folder = "eval" if split == train.evaluate_split else f"eval-{split}"
    return Path(train.output_dir) / folder / "metrics.json"


# --- scores and their aggregation ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Score:
    """One run's result on one (domain, task) of a split (PSNR in dB; delta = output - input)."""

    split: str
    arm: str
    seed: int
    domain: str
    task: str
    n: int
    input_psnr: float
    output_psnr: float

    @property
    def delta_psnr(self) -> float:
        return self.output_psnr - self.input_psnr


@dataclass(frozen=True)
class Selection:
    """How much one run's prompt selection on a split depends on the labels (``prompt_usage`` of its
    ``metrics.json``): the task pool's NMI with the task and the domain pool's NMI with the domain; None where the
    network has no such pool or the NMI is undefined (a single label)."""

    split: str
    arm: str
    seed: int
    task_nmi: float | None
    domain_nmi: float | None


def read_selection(metrics: dict, split: str, arm: str, seed: int) -> Selection:
    """The selection NMIs of a parsed ``metrics.json`` (``nmi_task`` of its ``task`` pool entry, ``nmi_domain`` of its
    ``domain`` one, as the evaluation stores them in ``EvalResult.prompt_usage``)."""
    usage = metrics.get("prompt_usage") or {}

    def nmi(pool: str, key: str) -> float | None:
        value = (usage.get(pool) or {}).get(key)
        return None if value is None else float(value)

    return Selection(split, arm, seed, nmi("task", "nmi_task"), nmi("domain", "nmi_domain"))


def read_scores(metrics: dict, split: str, arm: str, seed: int) -> list[Score]:
    """The per-task rows of a parsed ``metrics.json`` written by the evaluation (:meth:`EvalResult.to_json`)."""
    return [
        Score(split, arm, seed, r["domain"], r["task"], int(r["n"]), float(r["input_psnr"]), float(r["output_psnr"]))
        for r in metrics["rows"]
    ]


@dataclass(frozen=True)
class Stats:
    """Mean, sample standard deviation (n - 1; 0 for one value), min and max of values over seeds."""

    mean: float
    std: float
    min: float
    max: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Stats:
        """The statistics of ``values`` (at least one)."""
        array = np.asarray(values, dtype=float)
        std = float(array.std(ddof=1)) if array.size > 1 else 0.0
        return cls(float(array.mean()), std, float(array.min()), float(array.max()), int(array.size))


@dataclass(frozen=True)
class ArmStats:
    """One arm on one split: per (domain, task) and for the mean over tasks, the statistics over seeds of the delta
    PSNR and of the output PSNR. The mean over tasks is taken per seed first (so its std is the spread of the
    headline number between seeds, not between tasks)."""

    arm: str
    seeds: list[int]
    delta: dict[tuple[str, str], Stats]
    output: dict[tuple[str, str], Stats]
    mean_delta: Stats
    mean_output: Stats
    seed_means: dict[int, tuple[float, float]]  # seed -> (mean delta, mean output) over tasks


def aggregate(scores: Sequence[Score], arms: Sequence[str] | None = None) -> list[ArmStats]:
    """Per arm (in ``arms`` order, else first appearance) the statistics over seeds of ``scores`` (one split).

    Every run of an arm must report the same tasks: a mean over different tasks would not compare."""
    order = list(arms) if arms is not None else list(dict.fromkeys(s.arm for s in scores))
    result = []
    for arm in order:
        mine = [s for s in scores if s.arm == arm]
        if not mine:
            raise ValueError(f"no scores for arm {arm!r}")
        seeds = sorted({s.seed for s in mine})
        keys = sorted({(s.domain, s.task) for s in mine})
        by_seed = {seed: {(s.domain, s.task): s for s in mine if s.seed == seed} for seed in seeds}
        for seed, rows in by_seed.items():
            if set(rows) != set(keys):
                raise ValueError(f"arm {arm!r} seed {seed} reports tasks {sorted(rows)}, other seeds {keys}")
        seed_means = {
            seed: (
                float(np.mean([rows[k].delta_psnr for k in keys])),
                float(np.mean([rows[k].output_psnr for k in keys])),
            )
            for seed, rows in by_seed.items()
        }
        result.append(
            ArmStats(
                arm=arm,
                seeds=seeds,
                delta={k: Stats.of([by_seed[seed][k].delta_psnr for seed in seeds]) for k in keys},
                output={k: Stats.of([by_seed[seed][k].output_psnr for seed in seeds]) for k in keys},
                mean_delta=Stats.of([seed_means[seed][0] for seed in seeds]),
                mean_output=Stats.of([seed_means[seed][1] for seed in seeds]),
                seed_means=seed_means,
            )
        )
    return result


def ordering_sentence(stats: Sequence[ArmStats]) -> str:
    """The arms ordered by mean delta PSNR over tasks, best first, in one sentence; neighbours closer than the larger
    of their seed standard deviations are joined by ``≈`` instead of ``>`` (the seeds cannot tell them apart)."""
    ranked = sorted(stats, key=lambda s: s.mean_delta.mean, reverse=True)
    text = ""
    for i, s in enumerate(ranked):
        if i:
            previous = ranked[i - 1].mean_delta
            close = previous.mean - s.mean_delta.mean < max(previous.std, s.mean_delta.std)
            text += " ≈ " if close else " > "
        text += f"{s.arm} ({s.mean_delta.mean:+.2f} dB)"
    n_seeds = max(len(s.seeds) for s in ranked)
    return (
        f"Ordered by mean delta PSNR over tasks (best first): {text}; '≈' where the gap is smaller than the "
        f"larger of the two standard deviations over {n_seeds} seed{'s' if n_seeds != 1 else ''}."
    )


# --- reports ------------------------------------------------------------------------------------------------------
def _labels(keys: Sequence[tuple[str, str]]) -> dict[tuple[str, str], str]:
    """Column labels: the task, with its domain only where a task name occurs in several domains."""
    tasks = [task for _, task in keys]
    return {(d, t): t if tasks.count(t) == 1 else f"{d}/{t}" for d, t in keys}


def _cell(stats: Stats, signed: bool = True) -> str:
    return f"{stats.mean:+.2f} ± {stats.std:.2f}" if signed else f"{stats.mean:.2f} ± {stats.std:.2f}"


def _delta_table(stats: Sequence[ArmStats]) -> list[str]:
    keys = sorted({k for s in stats for k in s.delta})
    labels = _labels(keys)
    lines = [
        "| arm | " + " | ".join(labels[k] for k in keys) + " | **mean** |",
        "| --- |" + " ---: |" * (len(keys) + 1),
    ]
    for s in stats:
        cells = [_cell(s.delta[k]) if k in s.delta else "-" for k in keys]
        lines.append(f"| {s.arm} | " + " | ".join(cells) + f" | **{_cell(s.mean_delta)}** |")
    return lines


@dataclass(frozen=True)
class Heatmaps:
    """The composed prompt-usage figure of one split: ``file`` (its name in ``output_dir``; None when no arm's run
    has a heatmap), the ``seed`` whose runs it shows, the ``arms`` in its columns and the ``missing`` ones (their run
    wrote no ``prompt_usage.png``: a network without prompt pools)."""

    file: str | None
    seed: int
    arms: list[str]
    missing: list[str]


def _selection_lines(
    split: str, arms: Sequence[str], selections: Sequence[Selection], heatmaps: Heatmaps | None
) -> list[str]:
    """The NMI table of ``split`` (only when some run reports an NMI) and the line linking its heatmaps."""
    lines = []
    mine = [s for s in selections if s.split == split]
    if any(s.task_nmi is not None or s.domain_nmi is not None for s in mine):

        def cell(arm: str, field: str) -> str:
            values = [getattr(s, field) for s in mine if s.arm == arm and getattr(s, field) is not None]
            return _cell(Stats.of(values), signed=False) if values else "-"

        lines += [
            "",
            "| arm | task pool NMI with the task | domain pool NMI with the domain |",
            "| --- | ---: | ---: |",
            *(f"| {arm} | {cell(arm, 'task_nmi')} | {cell(arm, 'domain_nmi')} |" for arm in arms),
            "",
            "NMI = I(label; selected prompt) / H(label) (`prompt_usage` in each run's metrics.json; 0: the same "
            "prompts whatever the label, 1: the prompts determine it), mean ± std over seeds; -: no such pool (or "
            "a single label).",
        ]
    if heatmaps is not None:
        if heatmaps.file is None:
            lines += ["", f"No prompt-usage heatmaps: no run of seed {heatmaps.seed} wrote one (no prompt pools)."]
        else:
            lines += ["", f"Prompt usage, seed {heatmaps.seed}, one column per arm: [{heatmaps.file}]({heatmaps.file})"]
            if heatmaps.missing:
                lines[-1] += (
                    f"; without a heatmap (their runs wrote none: no prompt pools): {', '.join(heatmaps.missing)}"
                )
            lines[-1] += "."
    return lines


def ablation_markdown(
    config: AblationConfig,
    stats: dict[str, list[ArmStats]],
    selections: Sequence[Selection] = (),
    heatmaps: dict[str, Heatmaps] | None = None,
) -> str:
    """The report: per split (``split`` first) the delta-PSNR table (rows = arms, columns = tasks + mean), the
    ordering sentence and a summary per arm (spread min..max, output PSNR), the prompt-selection NMIs per arm when the
    runs report them (``selections``) and the link to the split's heatmaps (``heatmaps``, by split), then the budget
    and the footnotes."""
    train = config.train
    arms = {arm.name: arm for arm in config.arms}
    seeds = ", ".join(str(s) for s in config.seeds)
    lines = [
        f"# Ablation at equal budget: {len(config.arms)} arms x {len(config.seeds)} seeds",
        "",
        f"Every run: {train.steps} steps of the same recipe (data `{train.data.dataset}`, crop {train.data.crop_size} "
        f"px, {train.data.per_task_batch} sample(s) per task per step, lr {train.optim.lr:g}), seeds {seeds}. "
        "Cells: delta PSNR (output - input, dB) as mean ± standard deviation over seeds.",
    ]
    for split, split_stats in stats.items():
        role = "cross-source test split" if split == config.split else "validation split"
        lines += ["", f"## `{split}` ({role})", "", *_delta_table(split_stats), "", ordering_sentence(split_stats)]
        if split == config.split:
            lines += [
                "",
                "| arm | variant | priors | mean delta PSNR | min..max over seeds | mean output PSNR |",
                "| --- | --- | --- | ---: | ---: | ---: |",
            ]
            for s in split_stats:
                arm = arms.get(s.arm)
                variant, priors = (arm.variant, "yes" if arm.priors else "no") if arm is not None else ("?", "?")
                lines.append(
                    f"| {s.arm} | {variant} | {priors} | {_cell(s.mean_delta)} | "
                    f"{s.mean_delta.min:+.2f}..{s.mean_delta.max:+.2f} | {_cell(s.mean_output, signed=False)} |"
                )
        arm_names = [s.arm for s in split_stats]
        lines += _selection_lines(split, arm_names, selections, (heatmaps or {}).get(split))
    lines += [
        "",
        "Mean = mean over the table's tasks of the per-task means, taken per seed; ± = sample standard deviation "
        "over the seeds. Input = the degraded image itself (do-nothing baseline). Raw numbers: ablation.csv.",
    ]
    if any(arm.variant == "restormer_tiny" for arm in config.arms):
        lines.append("")
        lines.append(f"Note: {NO_POOLS_NOTE}")
    return "\n".join(lines) + "\n"


CSV_COLUMNS = [
    "kind",
    "split",
    "arm",
    "variant",
    "priors",
    "seed",
    "domain",
    "task",
    "n",
    "input_psnr",
    "output_psnr",
    "delta_psnr",
    "n_seeds",
    "delta_psnr_std",
    "delta_psnr_min",
    "delta_psnr_max",
    "output_psnr_std",
    "output_psnr_min",
    "output_psnr_max",
]


def ablation_csv(config: AblationConfig, scores: Sequence[Score], stats: dict[str, list[ArmStats]]) -> str:
    """``kind=raw``: one row per split x arm x seed x task (the evaluation's numbers); ``seed_mean``: each run's mean
    over tasks; ``aggregate``: per split x arm x task (task ``mean`` for the mean over tasks) the statistics over
    seeds (``delta_psnr``/``output_psnr`` hold the means)."""
    arms = {arm.name: arm for arm in config.arms}
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()

    def arm_fields(name: str) -> dict[str, Any]:
        arm = arms.get(name)
        return {"arm": name, "variant": arm.variant if arm else "", "priors": arm.priors if arm else ""}

    for s in scores:
        writer.writerow(
            {
                "kind": "raw",
                "split": s.split,
                **arm_fields(s.arm),
                "seed": s.seed,
                "domain": s.domain,
                "task": s.task,
                "n": s.n,
                "input_psnr": f"{s.input_psnr:.6f}",
                "output_psnr": f"{s.output_psnr:.6f}",
                "delta_psnr": f"{s.delta_psnr:.6f}",
            }
        )
    for split, split_stats in stats.items():
        for a in split_stats:
            for seed, (delta, output) in a.seed_means.items():
                writer.writerow(
                    {
                        "kind": "seed_mean",
                        "split": split,
                        **arm_fields(a.arm),
                        "seed": seed,
                        "task": "mean",
                        "output_psnr": f"{output:.6f}",
                        "delta_psnr": f"{delta:.6f}",
                    }
                )
            entries = [(k, a.delta[k], a.output[k]) for k in a.delta] + [(("", "mean"), a.mean_delta, a.mean_output)]
            for (domain, task), delta, output in entries:
                writer.writerow(
                    {
                        "kind": "aggregate",
                        "split": split,
                        **arm_fields(a.arm),
                        "domain": domain,
                        "task": task,
                        "n_seeds": delta.n,
                        "output_psnr": f"{output.mean:.6f}",
                        "delta_psnr": f"{delta.mean:.6f}",
                        "delta_psnr_std": f"{delta.std:.6f}",
                        "delta_psnr_min": f"{delta.min:.6f}",
                        "delta_psnr_max": f"{delta.max:.6f}",
                        "output_psnr_std": f"{output.std:.6f}",
                        "output_psnr_min": f"{output.min:.6f}",
                        "output_psnr_max": f"{output.max:.6f}",
                    }
                )
    return buffer.getvalue()


def ablation_png(stats: Sequence[ArmStats], title: str) -> bytes:
    """Grouped bars: per task (and the mean over tasks) one bar per arm, its mean delta PSNR, error bars = std."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # no pyplot: no global state, no backend switch in the caller's process

    keys = sorted({k for s in stats for k in s.delta})
    labels = _labels(keys)
    groups = [labels[k] for k in keys] + ["mean"]
    fig = Figure(figsize=(max(6.0, 1.1 * len(groups) * max(1, len(stats)) / 2.5), 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    width = 0.8 / max(1, len(stats))
    x = np.arange(len(groups))
    for i, s in enumerate(stats):
        cells = [s.delta.get(k) for k in keys] + [s.mean_delta]
        means = [c.mean if c is not None else math.nan for c in cells]
        errors = [c.std if c is not None else 0.0 for c in cells]
        ax.bar(x + (i - (len(stats) - 1) / 2) * width, means, width, yerr=errors, capsize=2, label=s.arm)
    ax.axhline(0.0, color="black", linewidth=0.6)
    ax.set_xticks(x, labels=groups, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("delta PSNR (output - input), dB")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


#: Pixels of the label band above each heatmap and of the white gap between two columns of the composed figure.
LABEL_HEIGHT = 28
PANEL_GAP = 16


def compose_side_by_side(panels: Sequence[tuple[str, bytes]]) -> bytes:
    """One PNG of ``panels`` (label, PNG bytes) side by side, left to right, top-aligned on white, each labelled above:
    ``LABEL_HEIGHT`` + the tallest panel high, the panels' widths plus ``PANEL_GAP`` between neighbours wide. The
    panels are pasted at their own resolution (no rescaling: their text stays readable)."""
    from PIL import Image, ImageDraw, ImageFont

    if not panels:
        raise ValueError("compose_side_by_side needs at least one panel")
    images = [Image.open(io.BytesIO(data)).convert("RGB") for _, data in panels]
    width = sum(image.width for image in images) + PANEL_GAP * (len(images) - 1)
    canvas = Image.new("RGB", (width, LABEL_HEIGHT + max(image.height for image in images)), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=16)
    x = 0
    for (label, _), image in zip(panels, images):
        canvas.paste(image, (x, LABEL_HEIGHT))
        draw.text((x + 8, 5), label, fill="black", font=font)
        x += image.width + PANEL_GAP
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    return buffer.getvalue()


def write_prompt_usage(config: AblationConfig, splits: Sequence[str]) -> dict[str, Heatmaps]:
    """Per split, ``prompt_usage_<split>.png`` in ``output_dir``: the ``prompt_usage.png`` the evaluation wrote for
    each arm's run of ``seeds[0]``, side by side in the arms' order (:func:`compose_side_by_side`); arms whose run
    has none (no prompt pools) are left out. Returns what each split's figure shows."""
    out = Path(config.output_dir)
    seed = config.seeds[0]
    result = {}
    for split in splits:
        panels, missing = [], []
        for arm in config.arms:
            heatmap = metrics_file(run_config(config, arm, seed), split).with_name("prompt_usage.png")
            if heatmap.exists():
                panels.append((arm.name, heatmap.read_bytes()))
            else:
                missing.append(arm.name)
        name = f"prompt_usage_{split}.png"
        if panels:
            atomic_write_bytes(out / name, compose_side_by_side(panels))
        else:
            (out / name).unlink(missing_ok=True)  # an earlier figure in this folder would show other runs
        result[split] = Heatmaps(name if panels else None, seed, [label for label, _ in panels], missing)
    return result


def write_reports(config: AblationConfig, splits: Sequence[str]) -> str:
    """Read every run's evaluation of ``splits`` (``split`` first) and write ablation.md, ablation.csv, ablation.png
    and the prompt-usage figures to ``output_dir``; returns the markdown."""
    out = Path(config.output_dir)
    scores: list[Score] = []
    selections: list[Selection] = []
    for seed in config.seeds:
        for arm in config.arms:
            run = run_config(config, arm, seed)
            for split in splits:
                # one parse per file: with per-image scores a metrics.json is the largest thing read here
                metrics = json.loads(metrics_file(run, split).read_text())
                scores += read_scores(metrics, split, arm.name, seed)
                selections.append(read_selection(metrics, split, arm.name, seed))
    names = [arm.name for arm in config.arms]
    stats = {split: aggregate([s for s in scores if s.split == split], names) for split in splits}
    heatmaps = write_prompt_usage(config, splits)
    markdown = ablation_markdown(config, stats, selections, heatmaps)
    atomic_write_bytes(out / "ablation.md", markdown.encode("utf-8"))
    atomic_write_bytes(out / "ablation.csv", ablation_csv(config, scores, stats).encode("utf-8"))
    title = (
        f"Ablation on `{config.split}`: delta PSNR, mean ± std over {len(config.seeds)} seeds, "
        f"{config.train.steps} steps each"
    )
    atomic_write_bytes(out / "ablation.png", ablation_png(stats[config.split], title))
    return markdown


# --- the job ------------------------------------------------------------------------------------------------------
def _fail(message: str, code: int = 2) -> int:
    print(f"ablate.py: error: {message}", file=sys.stderr)
    return code


def _stale(run: TrainConfig, folder: Path) -> list[str]:
    """What differs between the config recorded in a finished run's folder and ``run`` (empty: the same training).
    Compares what defines the training (network, data, losses, schedule: :func:`runs.differences`) and the steps."""
    from datprl.platform.train.runs import differences

    recorded_path = folder / "config.yaml"
    if not recorded_path.exists():
        return [f"no recorded config at {recorded_path}"]
    try:
        recorded = config_to_dict(load_config(TrainConfig, recorded_path))
    except ConfigError as err:
        return [f"its recorded config does not load ({err})"]
    asked = config_to_dict(run)
    diffs = [f"{field}: {old!r} there, {new!r} asked for" for field, old, new in differences(recorded, asked)]
    if recorded["steps"] != asked["steps"]:
        diffs.append(f"steps: {recorded['steps']} there, {asked['steps']} asked for")
    return diffs


def _absolute(config: AblationConfig) -> AblationConfig:
    """Local paths made absolute against this directory, as the training job does for its workers (the runs'
    output folders sit under ``output_dir``, so that one too)."""
    from datprl.platform.train.fit import _absolute_local_paths

    train = _absolute_local_paths(config.train)
    return config.model_copy(update={"train": train, "output_dir": str(Path(config.output_dir).resolve())})


def _train_one(run: TrainConfig, splits: Sequence[str]) -> int:
    """Train and evaluate one run with the training job's own code path; 0 when every split's metrics exist after."""
    from datprl.platform.train.fit import train_and_evaluate
    from datprl.platform.train.runs import RunMismatch, check_run

    try:
        status = check_run(run)
    except RunMismatch as err:
        return _fail(str(err))
    if status.kind == "complete":
        # Trained to the end but stopped before its evaluation was written: jobs/train.py would do nothing for a
        # complete run, so train it again rather than report a run without numbers.
        print(f"[ablation] {run.name}: trained but not evaluated; training it again (resume=false)", flush=True)
        run = run.model_copy(update={"resume": False})
    code = train_and_evaluate(run)
    if code:
        return code
    missing = [str(metrics_file(run, split)) for split in splits if not metrics_file(run, split).exists()]
    return _fail(f"run {run.name} finished without the evaluation {missing}") if missing else 0


def run_ablation(config: AblationConfig) -> int:
    """Train (or reuse) every run, aggregate, write ablation.md/.csv/.png to ``output_dir``; returns the exit code."""
    from datprl.platform.runtime import ray_session, stop_exit_code
    from datprl.platform.train.fit import open_dataset

    config = _absolute(config)
    out = Path(config.output_dir)
    train = config.train
    try:
        dataset = open_dataset(train)  # built first when missing, once, before any run
    except (FileNotFoundError, ValueError) as err:
        return _fail(str(err))
    if config.split not in dataset.splits():
        return _fail(f"split={config.split!r} is not a split of {train.data.dataset} (splits: {dataset.splits()})")
    splits = [config.split]
    if train.evaluate_split and train.evaluate_split != config.split and train.evaluate_split in dataset.splits():
        splits.append(train.evaluate_split)  # the validation numbers come with every run at no extra training
    save_resolved_config(config, out / "config.yaml")

    # Seed-major: an ablation stopped half-way has every arm at the same number of seeds, so its partial table is
    # still a comparison at equal budget.
    plan = [(arm, seed, run_config(config, arm, seed)) for seed in config.seeds for arm in config.arms]
    try:
        with ray_session(train.ray_address, quiet=not train.verbose):
            for i, (arm, seed, run) in enumerate(plan, 1):
                folder = Path(run.output_dir)
                done = all(metrics_file(run, split).exists() for split in splits)
                if done:
                    stale = _stale(run, folder)
                    if stale:
                        return _fail(
                            f"{folder} holds results of another config ({'; '.join(stale)}); use another "
                            "output_dir, or delete that folder to train the run again"
                        )
                    print(
                        f"[ablation] run {i}/{len(plan)} {run.name}: reused the results in {folder} (not retrained)",
                        flush=True,
                    )
                else:
                    print(
                        f"[ablation] run {i}/{len(plan)} {run.name}: {arm.variant}, priors "
                        f"{'on' if arm.priors else 'off'}, seed {seed}, {run.steps} steps",
                        flush=True,
                    )
                    code = _train_one(run, splits)
                    if code:
                        return code
    except KeyboardInterrupt:
        print("\n[ablation] stopped; the same command resumes it (finished runs are reused)", file=sys.stderr)
        return stop_exit_code()  # 143 after SIGTERM, 130 after Ctrl-C, as the training job

    markdown = write_reports(config, splits)
    print(markdown)
    figures = "".join(f", prompt_usage_{split}.png" for split in splits if (out / f"prompt_usage_{split}.png").exists())
    print(f"[ablation] wrote {out / 'ablation.md'}, ablation.csv, ablation.png{figures}", flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point: ``python jobs/ablate.py [--dry-run] [config.yaml] [key=value ...]``."""
    config = parse_cli(AblationConfig, sys.argv[1:] if argv is None else argv, prog="ablate.py")
    return run_ablation(config)
