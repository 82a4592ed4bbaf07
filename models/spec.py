"""A job's model section: a registered variant plus typed, deep-merged field overrides.

Job configs carry a :class:`ModelSpec` (``model.variant=paper_tiny model.task_pool.top_k=4``); :meth:`ModelSpec.resolve`
gives the :class:`~datprl.models.config.ModelConfig` it stands for. An override changes only the fields it names:
``model.task_pool.top_k=4`` keeps the variant's pool size, ``model.domain_pool=null`` removes the domain pool. The
whole resolved network is validated when the section is, so a bad combination (``top_k`` above the pool's size, a
head count that does not divide the width) fails while the config is parsed, naming the field, before any job starts.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator, model_validator

from datprl.models.config import ModelConfig, PromptPoolConfig
from datprl.models.factory import VARIANTS

#: The name of a registered variant (checked when a config is parsed).
VariantName = Literal[tuple(VARIANTS)]  # type: ignore[valid-type]

_POOLS = ("task_pool", "domain_pool")


class PoolOverride(BaseModel):
    """Overrides of one prompt pool; a field left at None keeps the variant's value."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    size: int | None = Field(None, ge=1, description="prompts N in the pool; None = the variant's")
    top_k: int | None = Field(None, ge=1, description="prompts composed per image; None = the variant's")
    query_centering: bool | None = Field(
        None, description="centre this pool's query (PromptPoolConfig); None = the variant's"
    )
    fixed_keys: bool | None = Field(
        None, description="keys set from outside, never trained (PromptPoolConfig); None = the variant's"
    )
    routing: Literal["unsupervised", "task_labels"] | None = Field(
        None, description="unsupervised (the paper's) or task_labels (L_tsel; PromptPoolConfig); None = the variant's"
    )


def _scalar_overrides() -> dict[str, Any]:
    """Every non-pool field of ModelConfig as an optional override (None = the variant's value), with its
    description: one source of truth for the network's fields."""
    fields = {}
    for name, field in ModelConfig.model_fields.items():
        if name in _POOLS:
            continue
        described = f"{field.description}; None = the variant's" if field.description else "None = the variant's"
        fields[name] = (field.annotation | None, Field(None, description=described))
    return fields


def _merged_pool(base: PromptPoolConfig | None, override: PoolOverride | None) -> dict[str, Any] | None:
    """A pool's fields with the override's set values on top of the variant's (or the pool defaults, when the variant
    has no such pool); None when the override removes the pool or sets nothing on a variant without it."""
    if override is None or (base is None and not override.model_dump(exclude_none=True)):
        return None
    merged = (base or PromptPoolConfig()).model_dump()
    merged.update(override.model_dump(exclude_none=True))
    return merged


class _Variant(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    variant: VariantName = Field("paper_tiny", description="registered variant the overrides apply to")


# Field order of the section (help, saved YAML): variant, the scalar overrides, the pools.
_Overrides = create_model("_Overrides", __base__=_Variant, **_scalar_overrides())


class ModelSpec(_Overrides):
    """The network a job builds: ``variant`` (one of ``datprl.models.VARIANTS``) with field overrides on top."""

    task_pool: PoolOverride | None = Field(PoolOverride(), description="task pool overrides; null = no task pool")
    domain_pool: PoolOverride | None = Field(PoolOverride(), description="domain pool overrides; null = no domain pool")

    @field_validator(*_POOLS)
    @classmethod
    def _pool_fits(cls, override: PoolOverride | None, info) -> PoolOverride | None:
        variant = info.data.get("variant")
        if override is None or variant is None:
            return override
        merged = _merged_pool(getattr(VARIANTS[variant], info.field_name), override)
        size, top_k = (merged["size"], merged["top_k"]) if merged is not None else (1, 1)
        if top_k > size:
            name = info.field_name
            size_from = "" if override.size else f" (variant {variant}'s)"
            raise ValueError(f"{name}.top_k={top_k} exceeds {name}.size={size}{size_from}; use top_k <= size")
        return override

    @model_validator(mode="after")
    def _resolvable(self) -> "ModelSpec":
        try:
            self.resolve()
        except ValidationError as err:
            problems = "; ".join(
                f"{'.'.join(map(str, e['loc'])) or '(network)'}: {e['msg'].removeprefix('Value error, ')}"
                for e in err.errors()
            )
            raise ValueError(
                f"variant {self.variant} with these overrides is not a valid network: {problems}"
            ) from None
        return self

    def resolve(self) -> ModelConfig:
        """The variant's config with every set override applied (pools merged field by field)."""
        base = VARIANTS[self.variant]
        fields = base.model_dump()
        for name in ModelConfig.model_fields:
            if name in _POOLS:
                continue
            value = getattr(self, name)
            if value is not None:
                fields[name] = value
        for name in _POOLS:
            fields[name] = _merged_pool(getattr(base, name), getattr(self, name))
        return ModelConfig.model_validate(fields)

    def describe(self) -> str:
        """``variant`` plus the overrides that are set, e.g. ``paper_tiny (task_pool.top_k=4)``."""
        changes = [f"{k}={v}" for k, v in self.model_dump(exclude={"variant", *_POOLS}, exclude_none=True).items()]
        for name in _POOLS:
            override = getattr(self, name)
            if override is None:
                changes.append(f"{name}=null")
            else:
                changes += [f"{name}.{k}={v}" for k, v in override.model_dump(exclude_none=True).items()]
        return self.variant + (f" ({', '.join(changes)})" if changes else "")
