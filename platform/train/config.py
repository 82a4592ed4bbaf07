"""The training job's typed config (``python jobs/train.py --help`` lists every field)."""

from __future__ import annotations

import logging
from typing import Any, Literal

from pydantic import Field

from datprl.models.losses import LossWeights
from datprl.platform.config import StrictModel
from datprl.platform.data.pipeline import (
    DataConfig,
)
from datprl.platform.storage import S3Settings

log = logging.getLogger(__name__)


class OptimConfig(StrictModel):
    """The paper's recipe (method.md "Training recipe")."""

    lr: float = Field(4e-4, gt=0)
    betas: tuple[float, float] = (0.9, 0.99)
    min_lr: float = Field(1e-6, ge=0, description="end of the cosine decay")
    warmup_steps: int = Field(0, ge=0)
    grad_clip: float | None = Field(1.0, gt=0, description="max gradient norm; None = no clipping")
    ema_decay: float | None = Field(None, gt=0, lt=1, description="EMA of the weights (e.g. 0.999); None = off")


class TrainConfig(StrictModel):
    """A training run. ``python jobs/train.py [config.yaml] [key=value ...]``; with no arguments: the embedded default."""

    name: str = Field("default", description="run name; launching the same name again resumes it")
    storage: str = Field("runs", description="run storage: local folder or s3://bucket/prefix (shared on clusters)")
    s3: S3Settings | None = None
    ray_address: str | None = Field(None, description="Ray cluster address; None = RAY_ADDRESS or a local Ray")
    # The embedded default (a 2-core machine, about 15 minutes): small crops and one sample per task per step buy more
    # optimiser steps, which the tiny network needs more than larger batches (tuning runs in the issue notes).
    data: DataConfig = DataConfig(crop_size=48, per_task_batch=1)
    build_dataset_if_missing: bool = Field(True, description="build the embedded default corpus when data.dataset has no manifest")
    variant: str = Field("paper_tiny", description="model variant (datprl.models.VARIANTS)")
    model_overrides: dict[str, Any] = Field(default_factory=dict, description="ModelConfig fields, e.g. {prompt_dim: 128}")
    loss: LossWeights = LossWeights()
    optim: OptimConfig = OptimConfig(lr=2e-3, ema_decay=0.995)
    steps: int = Field(1000, ge=1)
    num_workers: int | tuple[int, int] = Field(1, description="workers, or (min, max) for elastic training")
    cpus_per_worker: float = Field(1.0, gt=0)
    use_gpu: bool | Literal["auto"] = "auto"
    max_failures: int = Field(2, ge=0, description="worker failures survived (restart from the last checkpoint)")
    checkpoint_every: int = Field(250, ge=1)
    log_every: int = Field(50, ge=1)
    torch_threads: int | None = Field(None, ge=1, description="torch CPU threads per worker; None = Ray's default "
                                      "(cpus_per_worker)")
    text_embeddings: str | None = Field(None, description="Parquet of description embeddings keyed by source_id")
    zero_shot_tasks: list[str] = Field(default_factory=list, description="tasks held out of training, evaluated "
                                       "zero-shot (marked in the tables)")
    zero_shot_domains: list[str] = Field(default_factory=list, description="domains held out of training: all their "
                                         "tasks are evaluated zero-shot")
    evaluate_split: str | None = Field("val", description="split evaluated after training (and by validate_every); "
                                       "None = skip")
    validate_every: int | None = Field(250, ge=1, description="validate on evaluate_split every this many steps "
                                       "(rank 0; PSNR per task in the reports and the log); None = only at the end")
    output_dir: str = Field("outputs/train", description="exported weights, evaluation tables and pictures")
    seed: int = 0
