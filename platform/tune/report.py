"""The sweep's outputs, from Ray Tune's results: one row per trial (its parameters, the metric, the steps it reached
and why it stopped), written to ``output_dir`` as

- ``tune.md`` (the table, the best config, the finding with its uncertainty) and ``tune.csv`` (every row's numbers);
- ``tune.png``: the metric against each searched pool's size, top-k written at every point;
- ``best.yaml``: the best trial's training config, which ``python jobs/train.py best.yaml`` runs as it is;
- ``study.db``: an Optuna study in SQLite (``optuna.load_study(study_name=<name>, storage="sqlite:///.../study.db")``,
  or ``optuna-dashboard sqlite:///.../study.db``): completed trials COMPLETE, trials stopped by ASHA PRUNED, failed ones
  FAIL, each with its validation curve as intermediate values.

Every file is written atomically (:func:`datprl.platform.storage.atomic_write_bytes`).
"""

from __future__ import annotations

import csv
import io
import itertools
import math
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml

from datprl.platform.config import config_to_dict
from datprl.platform.storage import atomic_write_bytes
from datprl.platform.train.config import TrainConfig
from datprl.platform.tune.config import POOLS, TuneConfig, parameter_names, trial_output_dir, trial_train_config

__all__ = [
    "TrialRow",
    "Written",
    "best_row",
    "best_train_config",
    "finding",
    "spearman",
    "trial_rows",
    "tune_csv",
    "tune_markdown",
    "write_outputs",
    "write_study",
]

Outcome = Literal["completed", "early_stop", "error", "unfinished"]


@dataclass(frozen=True)
class TrialRow:
    """One trial: ``history`` maps each validated step to the metric there; ``value`` is the metric at the last of
    them (the trial's result) and ``first_rung`` at ASHA's first rung, which every trial reaches (equal budget)."""

    trial_id: str
    params: dict[str, Any]
    outcome: Outcome
    step: int
    history: dict[int, float] = field(default_factory=dict)
    value: float | None = None
    first_rung: float | None = None
    error: str = ""
    seconds: float | None = None
    extra: dict[str, float] = field(default_factory=dict)  # the other split's gain at the last validation

    def why(self, steps: int) -> str:
        """Why the trial stopped, in words."""
        if self.outcome == "completed":
            return f"completed ({steps} steps)"
        if self.outcome == "early_stop":
            return f"early stop (ASHA at step {self.step})"
        if self.outcome == "error":
            return f"error: {self.error}"
        return "unfinished (sweep interrupted)"


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(number) else number


def trial_rows(config: TuneConfig, grid) -> list[TrialRow]:
    """The rows of a ``ray.tune.ResultGrid``: every trial Tune knows of, in its order."""
    analysis = getattr(grid, "_experiment_analysis", None)  # the trials' statuses (not exposed otherwise)
    trials = list(analysis.trials) if analysis is not None else [None] * len(grid)
    names, metric, grace = parameter_names(config), config.metric, config.grace_period
    other = "val_delta_psnr" if metric.startswith("cross_") else "cross_delta_psnr"
    rows = []
    for result, trial in zip(grid, trials):
        metrics = result.metrics or {}
        trial_id = str(metrics.get("trial_id") or (trial.trial_id if trial is not None else Path(result.path).name))
        params = {k: result.config[k] for k in names if k in (result.config or {})}
        frame = result.metrics_dataframe
        history: dict[int, float] = {}
        step = int(_number(metrics.get("step")) or 0)
        extra: dict[str, float] = {}
        if frame is not None and "step" in frame:
            steps = [int(s) for s in frame["step"] if _number(s) is not None]
            step = max(steps, default=step)
            if metric in frame:
                for s, v in zip(frame["step"], frame[metric]):
                    if _number(s) is not None and _number(v) is not None:
                        history[int(s)] = float(v)
            if other in frame:
                values = [float(v) for v in frame[other] if _number(v) is not None]
                if values:
                    extra[other] = values[-1]
        # A trial restarted after the driver died: Tune's record of it may have lost the reports before (they reach
        # its storage only at the end); the trial's own metrics log on this node keeps every attempt.
        logged = _logged_history(Path(trial_output_dir(config, trial_id)) / "metrics.jsonl", metric)
        history = {**logged, **history}
        step = max([step, *logged])
        status = getattr(trial, "status", None)
        if result.error is not None or status == "ERROR":
            text = str(result.error or getattr(trial, "error_msg", "") or "failed").strip().splitlines()
            outcome, error = "error", (text[-1] if text else "failed")[:200]
        elif step >= config.train.steps:
            outcome, error = "completed", ""
        elif status == "TERMINATED" or (status is None and step > 0):
            outcome, error = "early_stop", ""
        else:
            outcome, error = "unfinished", ""
        rung = [s for s in sorted(history) if s >= grace]
        rows.append(
            TrialRow(
                trial_id=trial_id,
                params=params,
                outcome=outcome,
                step=step,
                history=dict(sorted(history.items())),
                value=history[max(history)] if history else None,
                first_rung=history[rung[0]] if rung else None,
                error=error,
                seconds=_number(metrics.get("time_total_s")),
                extra=extra,
            )
        )
    return rows


def _logged_history(path: Path, metric: str) -> dict[int, float]:
    """step -> ``metric`` from a trial's ``metrics.jsonl`` (the last attempt's value where steps repeat); empty when
    the file is not on this node."""
    from datprl.platform.train.fit import read_metrics_log

    history: dict[int, float] = {}
    for report in read_metrics_log(path):
        value, step = _number(report.get(metric)), _number(report.get("step"))
        if value is not None and step is not None:
            history[int(step)] = value
    return history


def best_row(rows: list[TrialRow], mode: str) -> TrialRow | None:
    """The best trial that completed every step (an early-stopped trial's value is from fewer steps, so it does not
    compare); without any, the best of all trials with a value; None when no trial reported the metric."""
    for pool in (
        [r for r in rows if r.outcome == "completed" and r.value is not None],
        [r for r in rows if r.value is not None],
    ):
        if pool:
            return (max if mode == "max" else min)(pool, key=lambda r: r.value)
    return None


def best_train_config(config: TuneConfig, row: TrialRow) -> TrainConfig:
    """The best trial's recipe as a training run of its own: name ``<name>-best`` in ``train.storage``, outputs in
    ``<output_dir>/best``, the recipe's own validation settings."""
    train = trial_train_config(config, row.params, f"{config.name}-best", str(Path(config.output_dir) / "best"))
    return train.model_copy(
        update={"storage": config.train.storage, "validate_cross_source": config.train.validate_cross_source}
    )


def _without_credentials(data: Any) -> Any:
    """The dict with the credentials of every ``s3`` section removed (the job reads them from the environment; the
    JSON dump would hold masked placeholders, not the secrets)."""
    if isinstance(data, dict):
        return {
            k: (None if k == "s3" and v is None else _without_credentials(v))
            for k, v in data.items()
            if k not in ("access_key", "secret_key", "session_token")
        }
    if isinstance(data, list):
        return [_without_credentials(v) for v in data]
    return data


def best_yaml(config: TuneConfig, row: TrialRow) -> str:
    """``best.yaml``: the best trial's TrainConfig with a header saying where it comes from and how to run it."""
    train = best_train_config(config, row)
    header = (
        f"# The best trial of tune sweep {config.name!r}: trial {row.trial_id}, {config.metric} = {row.value:+.4f} "
        f"at step {row.step}\n# ({_params_text(row.params)}). Train it on its own (schema: TrainConfig):\n"
        f"#\n#   python jobs/train.py {Path(config.output_dir) / 'best.yaml'}\n#\n"
    )
    body = yaml.safe_dump(_without_credentials(config_to_dict(train)), sort_keys=False, allow_unicode=True)
    return header + body


def _params_text(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


# --- statistics ---------------------------------------------------------------------------------------------------
def _ranks(values: list[float]) -> np.ndarray:
    """Ranks 1..n, ties given their mean rank."""
    array = np.asarray(values, dtype=float)
    order = array.argsort(kind="mergesort")
    ranks = np.empty(len(array))
    ranks[order] = np.arange(1, len(array) + 1)
    for value in np.unique(array):
        tied = array == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def spearman(x: list[float], y: list[float], permutations: int = 20000, seed: int = 0) -> tuple[float, float]:
    """Spearman's rank correlation of ``x`` and ``y`` and its two-sided permutation p-value (exact up to 8 points,
    else ``permutations`` random ones). (nan, nan) when either side is constant or there are fewer than 3 points."""
    if len(x) < 3 or len(set(x)) < 2 or len(set(y)) < 2:
        return math.nan, math.nan
    rx, ry = _ranks(x), _ranks(y)

    def rho(a: np.ndarray) -> float:
        return float(np.corrcoef(rx, a)[0, 1])

    observed = rho(ry)
    if len(y) <= 8:
        others = [rho(np.asarray(p)) for p in itertools.permutations(ry)]
    else:
        rng = np.random.default_rng(seed)
        others = [rho(rng.permutation(ry)) for _ in range(permutations)]
    p = float(np.mean([abs(o) >= abs(observed) - 1e-12 for o in others]))
    return observed, p


def finding(config: TuneConfig, rows: list[TrialRow]) -> list[str]:
    """What the sweep says about pool size and top-k, with its uncertainty: per searched parameter, the rank correlation
    with the metric at ASHA's first rung (every trial trained the same steps there) and its permutation p-value; the
    spread of the metric between trials there; and how far apart the completed trials ended."""
    at_rung = [r for r in rows if r.first_rung is not None]
    lines = []
    if len(at_rung) < 3:
        return [f"Too few trials reached the first rung (step {config.grace_period}) to say anything: {len(at_rung)}."]
    values = [r.first_rung for r in at_rung]
    spread = float(np.std(values, ddof=1))
    parts, resolved = [], []
    for name in parameter_names(config):
        xs = [float(r.params[name]) for r in at_rung if name in r.params]
        if len(xs) != len(at_rung):
            continue
        rho, p = spearman(xs, values)
        if math.isnan(rho):
            parts.append(f"`{name}` did not vary")
            continue
        parts.append(f"`{name}` ρ = {rho:+.2f} (p = {p:.2f})")
        if p < 0.05:
            resolved.append(f"`{name}` ({'higher' if rho > 0 else 'lower'} is better)")
    lines.append(
        f"At the first rung (step {config.grace_period}, all {len(at_rung)} trials at equal budget), Spearman rank "
        f"correlation of {config.metric} with each parameter (two-sided permutation p): " + "; ".join(parts) + "."
    )
    lines.append(
        f"The metric there spans {min(values):+.3f} .. {max(values):+.3f} (standard deviation {spread:.3f} between "
        "trials; one seed per trial, so no trial's own noise is measured)."
    )
    if resolved:
        lines.append("Resolved at p < 0.05: " + ", ".join(resolved) + ".")
    else:
        lines.append(
            f"No effect of pool size or top-k is resolved at this budget (every p >= 0.05 with {len(at_rung)} trials)."
        )
    done = sorted(
        (r for r in rows if r.outcome == "completed" and r.value is not None),
        key=lambda r: r.value,
        reverse=config.mode == "max",
    )
    if len(done) >= 2:
        gap = abs(done[0].value - done[1].value)
        lines.append(
            f"Of the {len(done)} trials that completed {config.train.steps} steps, the best ({done[0].trial_id}: "
            f"{_params_text(done[0].params)}) leads the next by {gap:.3f}; "
            + ("less than" if gap < spread else "more than")
            + " the between-trial spread at the first rung, so the ranking of the two "
            + ("is within noise." if gap < spread else "may hold, but is from one seed each.")
        )
    elif len(done) == 1:
        lines.append(
            f"Only one trial completed {config.train.steps} steps ({done[0].trial_id}); the best config is "
            "the survivor of ASHA, not a comparison of finished runs."
        )
    return lines


# --- files --------------------------------------------------------------------------------------------------------
def _cell(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:+.{digits}f}"


def _param_cell(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def tune_markdown(config: TuneConfig, rows: list[TrialRow], elapsed_s: float | None = None) -> str:
    """``tune.md``: the sweep, the per-trial table (best first), the best config, the finding."""
    train, search = config.train, config.search
    names = parameter_names(config)
    counts = {k: sum(r.outcome == k for r in rows) for k in ("completed", "early_stop", "error", "unfinished")}
    best = best_row(rows, config.mode)
    took = f" in {elapsed_s:.0f} s (this launch)" if elapsed_s is not None else ""
    lines = [
        f"# Tune sweep `{config.name}`: {len(rows)} trials, metric `{config.metric}` ({config.mode})",
        "",
        f"Recipe: `{train.model.describe()}`, {train.steps} steps, data `{train.data.dataset}` (crop "
        f"{train.data.crop_size} px, {train.data.per_task_batch} sample(s) per task per step), validation every "
        f"{train.validate_every} steps. Search: Optuna TPE (seed {search.seed}, {search.startup_trials} random "
        f"trials first) with ASHA on `step` (grace {config.grace_period}, eta {search.reduction_factor:g}, max "
        f"{train.steps}), {search.max_concurrent_trials} trial(s) at a time{took}.",
        "",
        f"Trials: {counts['completed']} completed, {counts['early_stop']} stopped early, {counts['error']} failed"
        + (f", {counts['unfinished']} unfinished" if counts["unfinished"] else "")
        + ".",
        "",
        "| trial | " + " | ".join(names) + f" | {config.metric} | at step | first rung | steps reached | why it "
        "stopped |",
        "| --- |" + " ---: |" * (len(names) + 4) + " --- |",
    ]
    ordered = sorted(
        rows,
        key=lambda r: (
            r.outcome != "completed",
            -(r.value if r.value is not None else -1e9) * (1 if config.mode == "max" else -1),
        ),
    )
    for r in ordered:
        mark = "**" if best is not None and r.trial_id == best.trial_id else ""
        at = max(r.history) if r.history else "-"
        cells = [
            f"{mark}{r.trial_id}{mark}",
            *(_param_cell(r.params.get(n)) for n in names),
            f"{mark}{_cell(r.value)}{mark}",
            str(at),
            _cell(r.first_rung),
            f"{r.step}/{train.steps}",
            r.why(train.steps).replace("|", "/"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        f"First rung = `{config.metric}` at step {config.grace_period}, where every trial is compared at "
        "equal budget; the last value of a trial stopped early is from fewer steps than a completed one's.",
    ]
    lines += ["", "## Best config", ""]
    if best is None:
        lines.append(f"No trial reported `{config.metric}`: no best config.")
    else:
        lines.append(
            f"Trial {best.trial_id}: {_params_text(best.params)}; `{config.metric}` = {best.value:+.4f} at "
            f"step {best.step} ({best.why(train.steps)}). Written to `best.yaml`: "
            f"`python jobs/train.py {Path(config.output_dir) / 'best.yaml'}` trains it."
        )
    lines += ["", "## Finding", "", *finding(config, rows)]
    return "\n".join(lines) + "\n"


def tune_csv(config: TuneConfig, rows: list[TrialRow]) -> str:
    """``tune.csv``: one row per trial (parameters, metric, steps, outcome; ``history`` as step:value pairs)."""
    names = parameter_names(config)
    other = "val_delta_psnr" if config.metric.startswith("cross_") else "cross_delta_psnr"
    columns = [
        "trial_id",
        *names,
        "metric",
        "value",
        "value_step",
        "first_rung_step",
        "first_rung_value",
        "steps_reached",
        "steps",
        "outcome",
        "why_stopped",
        "seconds",
        other,
        "history",
    ]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow(
            {
                "trial_id": r.trial_id,
                **{n: r.params.get(n, "") for n in names},
                "metric": config.metric,
                "value": "" if r.value is None else f"{r.value:.6f}",
                "value_step": max(r.history) if r.history else "",
                "first_rung_step": config.grace_period,
                "first_rung_value": "" if r.first_rung is None else f"{r.first_rung:.6f}",
                "steps_reached": r.step,
                "steps": config.train.steps,
                "outcome": r.outcome,
                "why_stopped": r.why(config.train.steps),
                "seconds": "" if r.seconds is None else f"{r.seconds:.1f}",
                other: f"{r.extra[other]:.6f}" if other in r.extra else "",
                "history": " ".join(f"{s}:{v:.6f}" for s, v in r.history.items()),
            }
        )
    return buffer.getvalue()


def tune_png(config: TuneConfig, rows: list[TrialRow]) -> bytes:
    """The metric against each searched pool's size (top-k written next to each point; filled = completed, hollow =
    stopped early); without a searched pool, against the trial's order."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    pools = [p for p in POOLS if getattr(config.space, p) is not None] or [None]
    fig = Figure(figsize=(4.6 * len(pools), 3.8), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(pools), squeeze=False)[0]
    shown = [r for r in rows if r.value is not None]
    for ax, pool in zip(axes, pools):
        for i, r in enumerate(shown):
            x = r.params.get(f"{pool}.size") if pool else i + 1
            done = r.outcome == "completed"
            ax.scatter([x], [r.value], s=46, facecolors="tab:blue" if done else "none", edgecolors="tab:blue", zorder=3)
            if pool:
                ax.annotate(
                    f"k={r.params.get(f'{pool}.top_k')}",
                    (x, r.value),
                    textcoords="offset points",
                    xytext=(5, 3),
                    fontsize=7,
                )
        ax.set_xlabel(f"{pool}.size (k = top_k)" if pool else "trial")
        ax.set_ylabel(config.metric)
        ax.grid(alpha=0.3)
    axes[0].scatter([], [], facecolors="tab:blue", edgecolors="tab:blue", label="completed")
    axes[0].scatter([], [], facecolors="none", edgecolors="tab:blue", label="stopped early (value at its last step)")
    axes[0].legend(fontsize=7)
    fig.suptitle(
        f"Sweep {config.name}: {config.metric} vs pool size and top-k ({len(shown)} trials, "
        f"{config.train.steps} steps max)",
        fontsize=9,
    )
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


def _distributions(config: TuneConfig, params: dict[str, Any]) -> dict[str, Any]:
    """Each parameter's Optuna distribution as the define-by-run space drew it (top-k's upper end is its size)."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    out: dict[str, Any] = {}
    for pool in POOLS:
        ranges = getattr(config.space, pool)
        if ranges is None or f"{pool}.size" not in params:
            continue
        out[f"{pool}.size"] = IntDistribution(ranges.size.low, ranges.size.high, log=ranges.size.log)
        high = min(ranges.top_k.high, int(params[f"{pool}.size"]))
        out[f"{pool}.top_k"] = IntDistribution(ranges.top_k.low, high, log=ranges.top_k.log and high > ranges.top_k.low)
    if config.space.prompt_dim is not None and "prompt_dim" in params:
        out["prompt_dim"] = CategoricalDistribution(list(config.space.prompt_dim))
    if config.space.lr is not None and "lr" in params:
        out["lr"] = FloatDistribution(config.space.lr.low, config.space.lr.high, log=config.space.lr.log)
    return out


def write_study(path: Path, config: TuneConfig, rows: list[TrialRow]) -> Path:
    """The sweep as an Optuna study named ``config.name`` in a SQLite file at ``path`` (built in a temporary folder,
    then written atomically). Unfinished trials are left out."""
    import optuna
    from optuna.trial import TrialState, create_trial

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "A new study created" line
    states = {"completed": TrialState.COMPLETE, "early_stop": TrialState.PRUNED, "error": TrialState.FAIL}
    with tempfile.TemporaryDirectory() as folder:
        db = Path(folder) / "study.db"
        storage = optuna.storages.RDBStorage(f"sqlite:///{db}")
        study = optuna.create_study(
            storage=storage, study_name=config.name, direction="maximize" if config.mode == "max" else "minimize"
        )
        with warnings.catch_warnings():  # set_metric_names is marked experimental; it names the value in the dashboard
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names([config.metric])
        study.set_user_attr("metric", config.metric)
        study.set_user_attr("steps", config.train.steps)
        study.set_user_attr("first_rung_step", config.grace_period)
        for r in rows:
            if r.outcome not in states or (r.outcome == "completed" and r.value is None):
                continue
            study.add_trial(
                create_trial(
                    params=r.params,
                    distributions=_distributions(config, r.params),
                    state=states[r.outcome],
                    value=r.value if r.outcome == "completed" else None,
                    intermediate_values=r.history,
                    user_attrs={
                        "ray_trial_id": r.trial_id,
                        "steps_reached": r.step,
                        "why_stopped": r.why(config.train.steps),
                    },
                )
            )
        storage.engine.dispose()
        atomic_write_bytes(path, db.read_bytes())
    return path


@dataclass(frozen=True)
class Written:
    """What :func:`write_outputs` wrote: the markdown (also printed) and the files."""

    markdown: str
    paths: list[Path]


def write_outputs(config: TuneConfig, rows: list[TrialRow], elapsed_s: float | None = None) -> Written:
    """Write tune.md, tune.csv, tune.png, study.db and (when a trial reported the metric) best.yaml to
    ``output_dir``."""
    out = Path(config.output_dir)
    markdown = tune_markdown(config, rows, elapsed_s)
    files = {
        "tune.md": markdown.encode(),
        "tune.csv": tune_csv(config, rows).encode(),
        "tune.png": tune_png(config, rows),
    }
    best = best_row(rows, config.mode)
    if best is not None:
        files["best.yaml"] = best_yaml(config, best).encode()
    paths = []
    for name, data in files.items():
        atomic_write_bytes(out / name, data)
        paths.append(out / name)
    paths.append(write_study(out / "study.db", config, rows))
    return Written(markdown, paths)
