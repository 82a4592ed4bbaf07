"""Typed configuration of the DATPRL-IR network and its named variants."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class PromptPoolConfig(BaseModel):
    """One prompt pool of the Prompt Composition Mechanism (arXiv 2603.01725, Sec. 3)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    size: int = Field(15, ge=1, description="number of prompts N in the pool")
    top_k: int = Field(3, ge=1, description="prompts composed per image")
    query_centering: bool | None = Field(
        None, description="this pool's own choice of ModelConfig.query_centering; None = that field's value"
    )
    fixed_keys: bool = Field(
        False,
        description="the keys are set from outside (training starts them at the description prototypes) and never "
        "trained: stored as a buffer under the same name, so checkpoints load either way (ours; the published keys "
        "are trained)",
    )
    routing: Literal["unsupervised", "task_labels"] = Field(
        "unsupervised",
        description="how the pool learns which prompts an image selects: unsupervised (the paper's, Sec. 3: only "
        "through the restoration and pool losses), or task_labels (ours, beyond the paper; task pool only): "
        "training adds L_tsel, which pulls each image's query to the keys of its recorded degradation task "
        "(key j belongs to task j mod T), so at inference the image alone routes to its task's prompts",
    )

    @model_validator(mode="after")
    def _top_k_fits(self) -> "PromptPoolConfig":
        if self.top_k > self.size:
            raise ValueError(f"top_k={self.top_k} exceeds the pool size={self.size}; use top_k <= size")
        return self


class ModelConfig(BaseModel):
    """Constructor arguments of :class:`datprl.models.network.DATPRLIR`.

    Block counts are listed from the full-resolution level down (level 1, 2, 3), for the encoder and decoder alike.
    A pool set to ``None`` is absent: no task pool and no domain pool gives the plain Restormer backbone.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    in_channels: int = Field(3, ge=1)
    width: int = Field(48, ge=1, description="channels at level 1 (Restormer 'dim')")
    heads: tuple[int, int, int, int] = (1, 2, 4, 8)
    encoder_blocks: tuple[int, int, int] = (4, 6, 6)
    bottleneck_blocks: int = Field(8, ge=1)
    decoder_blocks: tuple[int, int, int] = (6, 6, 4)
    refinement_blocks: int = Field(4, ge=0)
    ffn_expansion: float = Field(2.66, gt=0)
    task_pool: PromptPoolConfig | None = PromptPoolConfig(size=15, top_k=3)
    domain_pool: PromptPoolConfig | None = PromptPoolConfig(size=15, top_k=5)
    prompt_dim: int = Field(1024, ge=1, description="prompt dimension D")
    value_tokens: int = Field(2, ge=1, description="tokens T per prompt value")
    selection_noise_std: float = Field(
        0.1, ge=0, description="std of the noise added to similarities for top-k in training"
    )
    query_centering: bool = Field(
        False,
        description="subtract a running mean from each pool's query before the cosine with the keys (our fix of the "
        "prompt-selection collapse; the published network has none)",
    )
    query_center_momentum: float = Field(0.1, gt=0, le=1, description="update rate of that running mean")
    domain_query_features: Literal["shallow", "encoder1"] = Field(
        "shallow",
        description="what the domain query is computed from: shallow = the patch embedding, as published (one linear "
        "conv, so its 8x8 pooling sees little more than an 8x8 thumbnail's colours); encoder1 = the output of the "
        "first encoder level (same channels and resolution, after its transformer blocks), whose pooled statistics "
        "carry texture (ours; the parameters and their shapes are the same)",
    )
    temperature_min: float = Field(0.1, gt=0)
    temperature_max: float = Field(2.0, gt=0)
    fusion_heads: int = Field(8, ge=1, description="heads of the domain-task cross-attention")
    zero_init_output: bool = Field(
        True, description="start the final conv at zero so a fresh network is the identity (residual learning)"
    )

    @model_validator(mode="after")
    def _check(self) -> "ModelConfig":
        for level, (blocks, heads) in enumerate(zip(self.encoder_blocks, self.heads[:3]), start=1):
            if blocks < 1:
                raise ValueError(f"encoder_blocks[{level - 1}] must be >= 1")
        for i, h in enumerate(self.heads):
            channels = self.width * 2**i
            if channels % h:
                raise ValueError(f"heads[{i}]={h} must divide the level's {channels} channels (width={self.width})")
        if self.temperature_min > self.temperature_max:
            raise ValueError("temperature_min must not exceed temperature_max")
        if self.prompt_dim % self.fusion_heads:
            raise ValueError(f"fusion_heads={self.fusion_heads} must divide prompt_dim={self.prompt_dim}")
        if self.domain_pool is not None and self.task_pool is None:
            raise ValueError("a domain pool needs a task pool (the domain representation conditions the task one)")
        if self.domain_pool is not None and self.domain_pool.routing != "unsupervised":
            raise ValueError(
                "domain_pool.routing: task-label routing applies to the task pool only (the domain pool follows the "
                "descriptions through L_align and L_psel); set domain_pool.routing=unsupervised"
            )
        return self

    @property
    def uses_prompts(self) -> bool:
        return self.task_pool is not None
