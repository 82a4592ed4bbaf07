"""The DATPRL-IR network: a Restormer U-Net conditioned on a domain-aware task prompt representation."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from datprl.models.backbone import (
    BlockStack,
    Downsample,
    GatedFusionBlock,
    TransformerBlock,
    Upsample,
)
from datprl.models.config import ModelConfig
from datprl.models.prompts import DomainTaskFusion, PoolSelection, PromptPool, QueryProjector

PAD_MULTIPLE = 8  # three 2x downsamplings
DOMAIN_QUERY_GRID = 8  # pooling grids of the query projectors, as in the published network
TASK_QUERY_GRID = 4


@dataclass
class RestorationOutput:
    """Restored batch plus the prompt machinery's intermediate values (``return_aux=True``).

    task / domain: what each pool did (query, similarities, selected indices and weights, representation);
    None for an absent pool. prompt: PR_dt, the representation fused into the decoder (PR_t when there is no domain
    pool).
    """

    image: torch.Tensor
    task: PoolSelection | None
    domain: PoolSelection | None
    prompt: torch.Tensor | None


class DATPRLIR(nn.Module):
    """DATPRL-IR (ICLR 2026): query, retrieve, compose, fuse (arXiv 2603.01725, Sec. 3).

    ``model(x)`` maps a (B, C, H, W) batch in [0, 1] to its restoration of the same size; any H, W is accepted
    (zero-padded at bottom/right to a multiple of 8 and cropped back). ``model(x, return_aux=True)`` returns a
    :class:`RestorationOutput`.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        c, h, e = config.width, config.heads, config.ffn_expansion
        prompted = config.uses_prompts

        def plain(channels: int, heads: int, n: int) -> BlockStack:
            return BlockStack(TransformerBlock(channels, heads, e) for _ in range(n))

        def fused(channels: int, heads: int, n: int) -> BlockStack:
            if not prompted:
                return plain(channels, heads, n)
            return BlockStack(GatedFusionBlock(channels, heads, e, config.prompt_dim) for _ in range(n))

        self.patch_embed = nn.Conv2d(config.in_channels, c, 3, padding=1, bias=False)
        self.encoder_level1 = plain(c, h[0], config.encoder_blocks[0])
        self.down1_2 = Downsample(c)
        self.encoder_level2 = plain(c * 2, h[1], config.encoder_blocks[1])
        self.down2_3 = Downsample(c * 2)
        self.encoder_level3 = plain(c * 4, h[2], config.encoder_blocks[2])
        self.down3_4 = Downsample(c * 4)
        self.latent = fused(c * 8, h[3], config.bottleneck_blocks)
        self.up4_3 = Upsample(c * 8)
        self.reduce_chan_level3 = nn.Conv2d(c * 8, c * 4, 1, bias=False)
        self.decoder_level3 = fused(c * 4, h[2], config.decoder_blocks[2])
        self.up3_2 = Upsample(c * 4)
        self.reduce_chan_level2 = nn.Conv2d(c * 4, c * 2, 1, bias=False)
        self.decoder_level2 = fused(c * 2, h[1], config.decoder_blocks[1])
        self.up2_1 = Upsample(c * 2)
        self.decoder_level1 = fused(c * 2, h[0], config.decoder_blocks[0])
        self.refinement = fused(c * 2, h[0], config.refinement_blocks)
        self.output = nn.Conv2d(c * 2, config.in_channels, 3, padding=1, bias=False)
        if config.zero_init_output:
            # With the global residual this makes a fresh network the identity, so training starts from the input's
            # own quality instead of below it (published weights overwrite this when loaded).
            nn.init.zeros_(self.output.weight)

        d, t = config.prompt_dim, config.value_tokens
        pool_args = dict(
            dim=d,
            value_tokens=t,
            noise_std=config.selection_noise_std,
            temperature_range=(config.temperature_min, config.temperature_max),
            center_momentum=config.query_center_momentum,
        )

        def pool(spec) -> PromptPool:
            centering = config.query_centering if spec.query_centering is None else spec.query_centering
            return PromptPool(
                spec.size,
                spec.top_k,
                **pool_args,
                query_centering=centering,
                fixed_keys=spec.fixed_keys,
                routing=spec.routing,
            )

        self.task_query = self.task_pool = None
        self.domain_query = self.domain_pool = self.fusion = None
        if config.task_pool is not None:
            self.task_query = QueryProjector(c * 8, d, grid=TASK_QUERY_GRID)
            self.task_pool = pool(config.task_pool)
        if config.domain_pool is not None:
            self.domain_query = QueryProjector(c, d, grid=DOMAIN_QUERY_GRID)
            self.domain_pool = pool(config.domain_pool)
            self.fusion = DomainTaskFusion(d, config.fusion_heads)

    def forward(self, image: torch.Tensor, return_aux: bool = False) -> torch.Tensor | RestorationOutput:
        if image.ndim != 4 or image.shape[1] != self.config.in_channels:
            raise ValueError(
                f"expected a (batch, {self.config.in_channels}, height, width) tensor, got shape {tuple(image.shape)}; "
                "replicate grayscale images to 3 channels and add a batch axis"
            )
        height, width = image.shape[-2:]
        padded = F.pad(image, (0, -width % PAD_MULTIPLE, 0, -height % PAD_MULTIPLE))

        shallow = self.patch_embed(padded)
        enc1 = self.encoder_level1(shallow)
        enc2 = self.encoder_level2(self.down1_2(enc1))
        enc3 = self.encoder_level3(self.down2_3(enc2))
        deepest = self.down3_4(enc3)

        task = domain = prompt = None
        if self.task_pool is not None:
            task = self.task_pool(self.task_query(deepest))
            prompt = task.representation
        if self.domain_pool is not None:
            source = enc1 if self.config.domain_query_features == "encoder1" else shallow
            domain = self.domain_pool(self.domain_query(source))
            prompt = self.fusion(domain.representation, task.representation)

        latent = self.latent(deepest, prompt)
        dec3 = self.decoder_level3(self.reduce_chan_level3(torch.cat([self.up4_3(latent), enc3], 1)), prompt)
        dec2 = self.decoder_level2(self.reduce_chan_level2(torch.cat([self.up3_2(dec3), enc2], 1)), prompt)
        dec1 = self.decoder_level1(torch.cat([self.up2_1(dec2), enc1], 1), prompt)
        restored = (self.output(self.refinement(dec1, prompt)) + padded)[..., :height, :width]
        if return_aux:
            return RestorationOutput(restored, task, domain, prompt)
        return restored


# The Adaptive Gated Fusion layers of a prompt-conditioned block (GatedFusionBlock), e.g. latent.0.prompt_norm.weight.
_GATES = r"[a-z_0-9]+\.\d+\.(feature_weight|prompt_weight|prompt_norm\.|cross_attn_)"

#: Named parts of the network by parameter name (regular expressions matched at the start of a name), for training
#: only some of them (``init.train_only`` of the training job). ``gates`` are the Adaptive Gated Fusion layers inside
#: the prompt-conditioned blocks of the bottleneck, decoder and refinement (a fused block's own attention and
#: feed-forward belong to its stage); ``prompts`` is the whole prompt path: queries, pools, domain-task fusion and
#: those gates. Parts overlap (``prompts`` holds ``pools``); a selection is their union.
PARTS: dict[str, str] = {
    "encoder": r"(patch_embed|encoder_level\d|down\d_\d)\.",
    "bottleneck": r"latent\.",
    "decoder": r"(up\d_\d|reduce_chan_level\d|decoder_level\d)\.",
    "refinement": r"refinement\.",
    "output": r"output\.",
    "queries": r"(task|domain)_query\.",
    "pools": r"(task|domain)_pool\.",
    "fusion": r"fusion\.",
    "gates": _GATES,
    "prompts": rf"((task|domain)_(query|pool)|fusion)\.|{_GATES}",
}


def in_parts(name: str, parts: Iterable[str]) -> bool:
    """Whether the parameter ``name`` (a key of the network's state dict) belongs to one of ``parts`` (keys of
    :data:`PARTS`)."""
    return any(re.match(PARTS[part], name) for part in parts)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The network inside DistributedDataParallel / DataParallel (``.module``) and ``torch.compile`` (``._orig_mod``)
    wrappers, which do not expose the network's pools and configuration as attributes."""
    while isinstance(inner := getattr(model, "module", getattr(model, "_orig_mod", None)), nn.Module):
        model = inner
    return model
