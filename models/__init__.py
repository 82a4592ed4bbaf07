"""DATPRL-IR network, named variants, published-checkpoint loading and our safetensors weights format."""

from datprl.models.config import ModelConfig, PromptPoolConfig
from datprl.models.factory import (
    VARIANTS,
    config_from_published,
    convert_published_state_dict,
    count_parameters,
    create_model,
    load_model,
    load_published,
    match_state,
    save_model,
    variant_config,
    weights_digest,
)
from datprl.models.network import DATPRLIR, PARTS, RestorationOutput, in_parts, unwrap_model
from datprl.models.prompts import PoolSelection

__all__ = [
    "DATPRLIR",
    "PARTS",
    "VARIANTS",
    "ModelConfig",
    "PoolSelection",
    "PromptPoolConfig",
    "RestorationOutput",
    "config_from_published",
    "convert_published_state_dict",
    "count_parameters",
    "create_model",
    "in_parts",
    "load_model",
    "load_published",
    "match_state",
    "save_model",
    "unwrap_model",
    "variant_config",
    "weights_digest",
]
