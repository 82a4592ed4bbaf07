"""The training job's typed config (``python jobs/train.py --help`` lists every field)."""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from datprl.models.losses import LossWeights
from datprl.models.network import PARTS
from datprl.models.spec import ModelSpec
from datprl.platform.compute import ComputeConfig
from datprl.platform.config import NoRepeats, StrictModel
from datprl.platform.data.pipeline import DataConfig
from datprl.platform.storage import S3Settings


class OptimConfig(StrictModel):
    """The optimiser and schedule; defaults are the paper's recipe (Adam (0.9, 0.99), lr 4e-4 with cosine decay to
    1e-6, gradient clipping at 1.0; arXiv 2603.01725, Sec. 4.1)."""

    lr: float = Field(4e-4, gt=0)
    betas: tuple[float, float] = (0.9, 0.99)
    min_lr: float = Field(1e-6, ge=0, description="end of the cosine decay")
    warmup_steps: int = Field(0, ge=0)
    grad_clip: float | None = Field(1.0, gt=0, description="max gradient norm; None = no clipping")
    ema_decay: float | None = Field(None, gt=0, lt=1, description="EMA of the weights (e.g. 0.999); None = off")
    lr_scaling: Literal["none", "linear", "sqrt"] = Field(
        "none",
        description="how lr follows the number of workers (data-parallel: the global batch is the per-worker batch "
        "times the workers): none = lr as given for any global batch; linear/sqrt = lr x workers or x sqrt(workers), "
        "lr then being the 1-worker value. The training log states the global batch and the lr used",
    )


#: A named part of the network (``datprl.models.network.PARTS``), checked when the config is parsed.
PartName = Literal[tuple(PARTS)]  # type: ignore[valid-type]

#: File suffixes ``init.weights`` reads: our export (safetensors + .json sidecar), or a published-layout state dict.
INIT_SUFFIXES = (".safetensors", ".pth", ".pt")


class InitConfig(StrictModel):
    """Start a *new* run from existing weights instead of a fresh network (``platform/train/init.py``). A run that
    already has a checkpoint resumes from it and ignores this section; ``train_only`` and ``loaded_lr`` define the
    training and must stay the same when a run is resumed."""

    weights: str | None = Field(
        None,
        description="weights to start from (local path or s3://): our export <stem>.safetensors (its .json sidecar "
        "beside it), or a published-layout state dict (.pth/.pt, read with torch.load(weights_only=True), optionally "
        "nested under 'params'; or a .safetensors without our sidecar), renamed to our keys; null = train from scratch",
    )
    strict: bool = Field(
        True,
        description="every key of the configured network must be in the weights with its shape, and nothing else "
        "(else the run stops before Ray starts, naming the keys); false = load the keys whose names and shapes "
        "match, keep the rest freshly initialised, and report them (e.g. another pool size)",
    )
    train_only: Annotated[list[PartName], NoRepeats] = Field(
        default_factory=list,
        description=f"train only these parts of the network, the rest frozen ({', '.join(PARTS)}; "
        "datprl.models.network.PARTS); empty = train everything",
    )
    loaded_lr: float | None = Field(
        None,
        gt=0,
        description="learning rate of the parameters loaded from weights (a second optimiser group, same cosine "
        "schedule and lr_scaling; decays to min(optim.min_lr, loaded_lr)); null = optim.lr for all",
    )

    @field_validator("weights")
    @classmethod
    def _readable_kind(cls, weights: str | None) -> str | None:
        if weights is not None and not weights.endswith(INIT_SUFFIXES):
            raise ValueError(
                f"{weights!r} is neither our export (.safetensors with its .json sidecar) nor a published "
                f"checkpoint (.pth/.pt): the file name must end with one of {', '.join(INIT_SUFFIXES)}"
            )
        return weights

    @model_validator(mode="after")
    def _needs_weights(self) -> "InitConfig":
        if self.weights is None:
            for name in ("train_only", "loaded_lr"):
                if getattr(self, name):
                    raise ValueError(f"init.{name} applies to weights loaded by init.weights, which is null; set both")
        return self


class TrainConfig(StrictModel):
    """A training run: ``python jobs/train.py [--dry-run] [config.yaml] [key=value ...]``; with no arguments, the
    embedded default."""

    name: str = Field("default", description="run name; launching the same name again resumes it")
    storage: str = Field("runs", description="run storage: local folder or s3://bucket/prefix (shared on clusters)")
    s3: S3Settings | None = None
    ray_address: str | None = Field(None, description="Ray cluster address; None = RAY_ADDRESS or a local Ray")
    # The embedded default (a 2-core machine, about 10 minutes): small crops and one sample per task per step buy more
    # optimiser steps, which the tiny network needs more than larger batches (measured in tuning runs on the default
    # corpus: 48 px crops and 9-sample batches gave the best validation PSNR in a fixed time).
    data: DataConfig = DataConfig(crop_size=48, per_task_batch=1)
    build_dataset_if_missing: bool = Field(
        True, description="build the embedded default corpus when data.dataset has no manifest"
    )
    model: ModelSpec = Field(
        ModelSpec(),
        description="the network: a registered variant plus typed overrides, e.g. "
        "model.variant=paper model.task_pool.top_k=4 model.domain_pool=null",
    )
    # Input-relative L_pix/L_fft in the embedded default: with the paper's plain L1 the low-PSNR tasks (haze, cloud,
    # CT) carry the gradient, and a tiny network trained for minutes then applies their global corrections to the
    # natural and remote-sensing SR and deblurring inputs it cannot tell apart: -0.5 dB on natural SR of unseen sources
    # in the in-process runs of this recipe, -2 to -9 dB on external images. Divided by its task's mean input error
    # (TaskInputError), a task the network cannot yet restore costs the same as doing nothing, and within a task the
    # crops weigh by their error (dividing each crop by its own error weighed nearly clean crops as much as degraded
    # ones; docs/experiments/main-job-recipe.md).
    loss: LossWeights = LossWeights(input_relative="task")
    optim: OptimConfig = OptimConfig(lr=2e-3, ema_decay=0.995)
    init: InitConfig = Field(
        InitConfig(),
        description="start a new run from existing weights (export or published checkpoint): strict or partial "
        "load, parts to train, their own lr; a resumed run takes its checkpoint instead",
    )
    compute: ComputeConfig = Field(
        ComputeConfig(),
        description="precision, torch.compile, channels-last, Adam implementation (datprl.platform.compute)",
    )
    steps: int = Field(1000, ge=1)
    num_workers: int | tuple[int, int] = Field(1, description="workers, or (min, max) for elastic training")
    cpus_per_worker: float = Field(1.0, gt=0)
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK",
        description="how the workers' placement group lays them out on the nodes (Ray's ScalingConfig option): PACK "
        "(Ray's default) fills few nodes, SPREAD spreads them when it can, STRICT_* insist. With elastic num_workers "
        "Ray counts the workers a restart gets by resources, not nodes: STRICT_SPREAD can then ask for more workers "
        "than there are nodes and never start",
    )
    use_gpu: bool | Literal["auto"] = "auto"
    max_failures: int = Field(2, ge=0, description="worker failures survived (restart from the last checkpoint)")
    checkpoint_every: int = Field(250, ge=1)
    log_every: int = Field(50, ge=1)
    torch_threads: int | None = Field(
        2,
        ge=1,
        description="torch CPU threads per worker; None = Ray's default "
        "(cpus_per_worker). 2: the embedded default's 2-CPU machine, where the "
        "worker holds 1 CPU and the decoded-cache reads leave the other mostly idle "
        "(1000 steps in 6 min instead of 13)",
    )
    text_embeddings: str | None = Field(
        "auto",
        description="Parquet of the descriptions' text embeddings keyed by "
        "source_id (jobs/describe.py), aligned with the domain prompts by L_align; "
        "auto = <data.dataset>/priors/descriptions.parquet; null = L_align off",
    )
    text_centering: bool = Field(
        True,
        description="subtract the table's mean text embedding before L_align (the "
        "descriptions' shared template otherwise rewards a constant domain prompt)",
    )
    domain_key_init: Literal["random", "descriptions", "domains"] = Field(
        "domains",
        description="how the domain pool's keys start: random (the published init, N(0, 0.02^2)), or descriptions = "
        "the k-means centroids (k = pool size) of the training images' description embeddings, so the prompts the "
        "descriptions pick follow what they describe from the first step (needs text embeddings; a resumed run "
        "takes its keys from the checkpoint); domains = each domain's mean description embedding, shared by "
        "pool size // domains keys (the table's domain column), so top-k picks one domain's group",
    )
    describe_if_missing: bool = Field(
        True,
        description="with text_embeddings=auto: describe the training images "
        "first when the table is missing (metadata describer; seconds)",
    )
    zero_shot_tasks: list[str] = Field(
        default_factory=list, description="tasks held out of training, evaluated zero-shot (marked in the tables)"
    )
    zero_shot_domains: list[str] = Field(
        default_factory=list, description="domains held out of training: all their tasks are evaluated zero-shot"
    )
    evaluate_split: str | None = Field(
        "val", description="split evaluated after training (and by validate_every); None = skip"
    )
    cross_source_split: str | None = Field(
        "test",
        description="split evaluated after training next to evaluate_split: in the default corpus the cross-source "
        "test (whole packages and volumes never trained on); None, or a dataset without it, = skip",
    )
    validate_every: int | None = Field(
        250,
        ge=1,
        description="validate on evaluate_split every this many steps "
        "(rank 0; PSNR per task in the reports and the log); None = only at the end",
    )
    validate_cross_source: bool = Field(
        False,
        description="periodic validation also scores cross_source_split (report keys cross_psnr, "
        "cross_delta_psnr = mean PSNR gain over tasks, cross_delta_psnr/<task>; the tune job's metric); doubles "
        "its cost",
    )
    validation_crop: int | None = Field(
        128,
        ge=8,
        description="periodic validation scores central crops of this size (a quarter of a 256 px tile's "
        "cost; the final evaluation uses full images); None = full images",
    )
    output_dir: str = Field("outputs/train", description="exported weights, evaluation tables and pictures")
    seed: int = 0
    resume: bool = Field(
        True,
        description="continue the run of this name from its last checkpoint; false = delete "
        "its checkpoints and start over",
    )
    verbose: bool = Field(
        False,
        description="show Ray's own INFO logs (Ray Data plans, Train reports) and plain "
        "step lines instead of the progress bar",
    )

    #: Keys of earlier versions of this config: where they live now (None: removed, with the message saying why).
    moved_keys: ClassVar[dict[str, tuple[str | None, str]]] = {
        "variant": ("model.variant", "the model section is typed now"),
        "model_overrides": (
            None,
            "its untyped dict was merged shallowly (a partial pool lost the variant's other "
            "values); set typed fields instead, e.g. model.task_pool.size=20 model.prompt_dim=128",
        ),
    }

    def dry_run_documents(self) -> dict[str, dict]:
        """Extra YAML documents ``--dry-run`` prints after the config: the network ``model`` resolves to."""
        return {"network": {"spec": self.model.describe(), **self.model.resolve().model_dump(mode="json")}}
