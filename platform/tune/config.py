"""The tune job's typed config (``python jobs/tune.py --help`` lists every field), checked before Ray starts.

A :class:`TuneConfig` is a training recipe (``train``: a :class:`~datprl.platform.train.config.TrainConfig`, the base
of every trial), the ranges searched (``space``), how they are searched (``search``: trials, concurrency, TPE, ASHA,
resources per trial) and the metric. Each trial's network is the recipe's with the drawn pool sizes and top-k (and
prompt dimension, learning rate) on top: :func:`trial_train_config`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from datprl.models.spec import ModelSpec
from datprl.platform.config import NoRepeats, StrictModel
from datprl.platform.data.build import BuildConfig
from datprl.platform.storage import join_url
from datprl.platform.train.config import TrainConfig

__all__ = [
    "FloatRange",
    "IntRange",
    "METRICS",
    "PoolSpace",
    "SearchSettings",
    "SearchSpace",
    "TuneConfig",
    "POOLS",
    "metric_mode",
    "parameter_names",
    "trial_train_config",
]

POOLS = ("task_pool", "domain_pool")

#: The metrics a trial reports (``datprl.platform.train.loop``: every periodic validation and the last step), with the
#: direction that is better. ``cross_*``: the cross-source split (``train.cross_source_split``, "test" in the default
#: corpus: whole packages and volumes never trained on); ``val_*``: ``train.evaluate_split``. ``*_delta_psnr``: output
#: minus input PSNR, the mean over tasks of the per-task means (the PSNR gain); ``*_psnr``: the output's PSNR alone.
#: ``<split>_delta_psnr/<task>`` (one task's gain) is accepted too.
METRICS: dict[str, Literal["max", "min"]] = {
    "cross_delta_psnr": "max",
    "cross_psnr": "max",
    "val_delta_psnr": "max",
    "val_psnr": "max",
    "loss": "min",
}
_PER_TASK = re.compile(r"^(val|cross)_delta_psnr/([A-Za-z0-9_]+)$")


def metric_mode(metric: str) -> Literal["max", "min"]:
    """``max`` or ``min``: which direction of ``metric`` is better."""
    return METRICS.get(metric, "max")


def metric_task(metric: str) -> str | None:
    """The task of a per-task metric (``cross_delta_psnr/haze`` -> ``haze``), else None."""
    match = _PER_TASK.match(metric)
    return match.group(2) if match else None


class _Range(StrictModel):
    """``low`` to ``high``; an empty or reversed range is refused at load time."""

    @model_validator(mode="after")
    def _ordered(self):
        if self.low > self.high:
            raise ValueError(f"empty or reversed range: low={self.low:g} > high={self.high:g}; write low <= high")
        return self


class IntRange(_Range):
    """Integers from ``low`` to ``high``, both included (``log``: drawn uniformly in log space)."""

    low: int = Field(ge=1)
    high: int = Field(ge=1)
    log: bool = False


class FloatRange(_Range):
    """Reals from ``low`` to ``high`` (``log``: drawn uniformly in log space, the default, as for learning rates)."""

    low: float = Field(gt=0)
    high: float = Field(gt=0)
    log: bool = True


class PoolSpace(StrictModel):
    """One prompt pool's search: its size and its top-k. Each trial draws the size first, then top-k from
    ``top_k.low`` to ``min(top_k.high, size)`` (define-by-run), so top-k never exceeds the size drawn."""

    size: IntRange
    top_k: IntRange

    @model_validator(mode="after")
    def _top_k_fits(self) -> PoolSpace:
        if self.top_k.low > self.size.low:
            raise ValueError(
                f"top_k.low={self.top_k.low} exceeds size.low={self.size.low}: a trial that draws size={self.size.low} "
                f"would have no top_k <= size; use top_k.low <= size.low"
            )
        if self.top_k.high > self.size.high:
            raise ValueError(
                f"top_k.high={self.top_k.high} exceeds size.high={self.size.high}: top_k above the largest pool could "
                f"exceed every size drawn; use top_k.high <= size.high"
            )
        return self


class SearchSpace(StrictModel):
    """What is searched; a dimension left null keeps the recipe's value (``train``). Defaults bracket the paper's
    hand-picked pools (15 prompts each; top-3 for the task pool, top-5 for the domain pool)."""

    task_pool: PoolSpace | None = PoolSpace(size=IntRange(low=3, high=15), top_k=IntRange(low=1, high=5))
    domain_pool: PoolSpace | None = PoolSpace(size=IntRange(low=3, high=15), top_k=IntRange(low=1, high=5))
    prompt_dim: Annotated[list[int], NoRepeats] | None = Field(
        None, min_length=1, description="prompt dimensions D to choose from (categorical); null = the recipe's"
    )
    lr: FloatRange | None = Field(None, description="learning rate range (log-uniform); null = the recipe's")

    @model_validator(mode="after")
    def _something(self) -> SearchSpace:
        if self.task_pool is None and self.domain_pool is None and self.prompt_dim is None and self.lr is None:
            raise ValueError(
                "the search space is empty: set space.task_pool, space.domain_pool, space.prompt_dim or space.lr"
            )
        return self


class SearchSettings(StrictModel):
    """How the space is searched: Optuna's TPE proposes, ASHA stops trials whose metric trails at a rung."""

    num_samples: int = Field(12, ge=1, description="trials in the sweep")
    max_concurrent_trials: int = Field(1, ge=1, description="trials running at once")
    seed: int = Field(0, description="seed of the TPE sampler (the trials' training seed is train.seed)")
    startup_trials: int = Field(5, ge=1, description="trials drawn at random before TPE models the results")
    grace_period: int | None = Field(
        None,
        ge=1,
        description="steps every trial gets before ASHA may stop it; "
        "None = train.validate_every (the first validation)",
    )
    reduction_factor: float = Field(
        2.0,
        gt=1,
        description="ASHA's eta: at each rung (grace_period x eta^k steps) "
        "only the best 1/eta of the trials there continue",
    )
    trial_cpus: float = Field(
        0.1,
        gt=0,
        description="CPUs held by each trial's driver function (it only waits on "
        "its TorchTrainer; the workers take train.num_workers x train.cpus_per_worker)",
    )
    state_every_s: float = Field(
        5.0,
        gt=0,
        description="how often the sweep's state is saved to its storage (Ray Tune's TUNE_GLOBAL_CHECKPOINT_S): a "
        "driver that dies loses at most the trial events of this long (a finished trial then reports again, untrained)",
    )
    data_cpus: float = Field(
        1.0,
        ge=1,
        description="CPUs that must stay free while max_concurrent_trials run, for "
        "the Ray Data reads (a read task takes 1 CPU; if trials hold every CPU they wait forever)",
    )


class TuneConfig(StrictModel):
    """A sweep: ``python jobs/tune.py [--dry-run] [config.yaml] [key=value ...]``."""

    name: str = Field(
        "tune",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
        description="sweep name: its state and trials live at <train.storage>/<name>; launching the "
        "same name again resumes it",
    )
    # The training job's defaults, its worker at 0.9 CPU: with the trial's function (search.trial_cpus 0.1) one trial
    # holds one CPU, so on a 2-CPU machine one runs with a CPU free for the Ray Data reads.
    train: TrainConfig = Field(
        TrainConfig(cpus_per_worker=0.9),
        description="the recipe of every trial (defaults: the training job's, with cpus_per_worker 0.9); name, "
        "storage, output_dir and the searched fields are set per trial",
    )
    space: SearchSpace = SearchSpace()
    search: SearchSettings = SearchSettings()
    metric: str = Field(
        "cross_delta_psnr",
        description="what the sweep optimises: "
        + ", ".join(METRICS)
        + " or <val|cross>_delta_psnr/<task> (see datprl.platform.tune.config.METRICS)",
    )
    build: BuildConfig | None = Field(
        None,
        description="when train.data.dataset has no manifest: build this corpus there (its output is "
        "train.data.dataset); None = the training job's rule (train.build_dataset_if_missing: the default corpus)",
    )
    local_cpus: int | None = Field(
        None,
        ge=2,
        description="CPUs of the local Ray the job starts when it joins no cluster; None = every CPU of this machine",
    )
    output_dir: str = Field(
        "outputs/tune",
        description="local folder: tune.md, tune.csv, tune.png, best.yaml, "
        "study.db (Optuna), config.yaml and each trial's outputs under trials/",
    )
    resume: bool = Field(
        True,
        description="continue the sweep of this name when its state exists; false = delete "
        "it (and its trials' checkpoints) and start over",
    )

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, metric: str) -> str:
        if metric not in METRICS and not _PER_TASK.match(metric):
            raise ValueError(
                f"unknown metric {metric!r}: the trials report {', '.join(METRICS)} and <val|cross>_delta_psnr/<task>"
            )
        return metric

    @model_validator(mode="after")
    def _consistent(self) -> TuneConfig:
        train = self.train
        if self.metric != "loss":
            if not (train.validate_every and train.evaluate_split):
                raise ValueError(
                    f"metric={self.metric} comes from the periodic validation: set train.validate_every "
                    "and train.evaluate_split"
                )
            cross = train.cross_source_split
            if self.metric.startswith("cross_") and (not cross or cross == train.evaluate_split):
                raise ValueError(
                    f"metric={self.metric} needs a cross-source split other than train.evaluate_split "
                    f"(train.cross_source_split={cross!r}); set it, or use a val_* metric"
                )
        if self.grace_period >= train.steps:
            raise ValueError(
                f"search.grace_period={self.grace_period} (steps before the first rung) must be below "
                f"train.steps={train.steps}, or ASHA can stop nothing"
            )
        base = train.model.resolve()
        for pool in POOLS:
            if getattr(self.space, pool) is not None and getattr(base, pool) is None:
                raise ValueError(
                    f"space.{pool} searches a pool that train.model ({train.model.describe()}) does not "
                    f"have; set space.{pool}=null or pick a variant with a {pool}"
                )
        # Every corner of the space must be a valid network (e.g. fusion_heads must divide every prompt_dim).
        for dim in self.space.prompt_dim or [None]:
            for corner in ("low", "high"):
                params = _corner(self.space, corner)
                if dim is not None:
                    params["prompt_dim"] = dim
                try:
                    _model_with(train.model, params)
                except ValueError as err:
                    where = "space.prompt_dim" if dim is not None else "space"
                    raise ValueError(f"{where}: {params} is not a valid network: {err}") from None
        return self

    @property
    def grace_period(self) -> int:
        """Steps before ASHA's first rung (``search.grace_period``, else the first validation)."""
        return self.search.grace_period or self.train.validate_every or self.train.log_every

    @property
    def mode(self) -> Literal["max", "min"]:
        """Whether the metric is maximised or minimised."""
        return metric_mode(self.metric)

    def experiment_url(self) -> str:
        """Where Ray Tune keeps the sweep (``<train.storage>/<name>``)."""
        return join_url(self.train.storage, self.name)

    def trials_storage(self) -> str:
        """Where the trials' Ray Train runs keep their checkpoints: ``<train.storage>/<name>/train``."""
        return join_url(self.train.storage, self.name, "train")

    def dry_run_documents(self) -> dict[str, dict]:
        """Extra YAML document ``--dry-run`` prints: the search in words."""
        return {
            "search": {
                "parameters": parameter_names(self),
                "metric": self.metric,
                "mode": self.mode,
                "asha": {
                    "time_attr": "step",
                    "grace_period": self.grace_period,
                    "max_t": self.train.steps,
                    "reduction_factor": self.search.reduction_factor,
                },
                "experiment": self.experiment_url(),
            }
        }


def _corner(space: SearchSpace, end: str) -> dict[str, Any]:
    """The parameters at one end of every range (top_k within its size)."""
    params: dict[str, Any] = {}
    for pool in POOLS:
        ranges = getattr(space, pool)
        if ranges is not None:
            size = getattr(ranges.size, end)
            params[f"{pool}.size"] = size
            params[f"{pool}.top_k"] = min(getattr(ranges.top_k, end), size)
    return params


def parameter_names(config: TuneConfig) -> list[str]:
    """The names of the searched parameters, in the order they are drawn (Optuna's names and the tables' columns)."""
    names = []
    for pool in POOLS:
        if getattr(config.space, pool) is not None:
            names += [f"{pool}.size", f"{pool}.top_k"]
    if config.space.prompt_dim is not None:
        names.append("prompt_dim")
    if config.space.lr is not None:
        names.append("lr")
    return names


def _model_with(model: ModelSpec, params: dict[str, Any]) -> ModelSpec:
    """``model`` with the drawn pool sizes, top-k and prompt dimension on top (validated: ValueError if invalid)."""
    fields = model.model_dump()
    for pool in POOLS:
        if f"{pool}.size" in params:
            fields[pool] = {"size": int(params[f"{pool}.size"]), "top_k": int(params[f"{pool}.top_k"])}
    if "prompt_dim" in params:
        fields["prompt_dim"] = int(params["prompt_dim"])
    return ModelSpec.model_validate(fields)


def trial_output_dir(config: TuneConfig, trial_id: str) -> str:
    """A trial's local folder (its ``metrics.jsonl``): ``<output_dir>/trials/<trial id>``."""
    return str(Path(config.output_dir) / "trials" / trial_id)


def trial_train_config(config: TuneConfig, params: dict[str, Any], trial_id: str, output_dir: str) -> TrainConfig:
    """The TrainConfig of one trial: the recipe with the drawn ``params`` on top, run name ``trial_id`` in
    :meth:`TuneConfig.trials_storage` (so a trial restarted after the driver died resumes its own checkpoints),
    ``output_dir`` for its metrics log, and the cross-source split validated with the val split when the metric needs
    it."""
    fields = config.train.model_dump()  # python mode: S3 secrets stay readable for the workers
    fields["model"] = _model_with(config.train.model, params).model_dump()
    if "lr" in params:
        fields["optim"] = {**fields["optim"], "lr": float(params["lr"])}
    fields.update(
        name=trial_id,
        storage=config.trials_storage(),
        output_dir=output_dir,
        validate_cross_source=config.metric.startswith("cross_"),
    )
    return TrainConfig.model_validate(fields)
