"""Restormer building blocks (Zamir et al., CVPR 2022) as used by DATPRL-IR's backbone.

Parameter names follow the published checkpoints (``norm1.body.weight``, ``attn.qkv``...), so a published state dict
maps onto these modules key for key.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ChannelLayerNorm(nn.Module):
    """LayerNorm with bias over the channel axis of an NCHW tensor ("WithBias" in Restormer, eps 1e-5)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.LayerNorm(channels, eps=1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class TransposedAttention(nn.Module):
    """Multi-Dconv head transposed attention: attention across channels, linear in the number of pixels."""

    def __init__(self, channels: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.temperature = nn.Parameter(torch.ones(heads, 1, 1))
        self.qkv = nn.Conv2d(channels, channels * 3, kernel_size=1, bias=False)
        self.qkv_dwconv = nn.Conv2d(channels * 3, channels * 3, 3, padding=1, groups=channels * 3, bias=False)
        self.project_out = nn.Conv2d(channels, channels, kernel_size=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv_dwconv(self.qkv(x)).chunk(3, dim=1)
        q = F.normalize(q.reshape(b, self.heads, c // self.heads, h * w), dim=-1)
        k = F.normalize(k.reshape(b, self.heads, c // self.heads, h * w), dim=-1)
        v = v.reshape(b, self.heads, c // self.heads, h * w)
        attn = (q @ k.transpose(-2, -1) * self.temperature).softmax(dim=-1)
        return self.project_out((attn @ v).reshape(b, c, h, w))


class GatedDconvFeedForward(nn.Module):
    """Gated-Dconv feed-forward network: GELU(dwconv(x1)) * dwconv(x2)."""

    def __init__(self, channels: int, expansion: float) -> None:
        super().__init__()
        hidden = int(channels * expansion)
        self.project_in = nn.Conv2d(channels, hidden * 2, kernel_size=1, bias=False)
        self.dwconv = nn.Conv2d(hidden * 2, hidden * 2, 3, padding=1, groups=hidden * 2, bias=False)
        self.project_out = nn.Conv2d(hidden, channels, kernel_size=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = self.dwconv(self.project_in(x)).chunk(2, dim=1)
        return self.project_out(F.gelu(x1) * x2)


class TransformerBlock(nn.Module):
    """Plain Restormer block: x + attn(LN(x)), then x + ffn(LN(x))."""

    def __init__(self, channels: int, heads: int, expansion: float) -> None:
        super().__init__()
        self.norm1 = ChannelLayerNorm(channels)
        self.attn = TransposedAttention(channels, heads)
        self.norm2 = ChannelLayerNorm(channels)
        self.ffn = GatedDconvFeedForward(channels, expansion)

    def forward(self, x: torch.Tensor, prompt: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.ffn(self.norm2(x))


class GatedFusionBlock(TransformerBlock):
    """Restormer block with Adaptive Gated Fusion (AGF; arXiv 2603.01725, Sec. 3) of the prompt representation PR_dt.

    ``alpha = softmax([feature_weight, prompt_weight])[0]`` gates the features against a cross-attention read of
    ``LN(PR_dt)``:  ``x_in = alpha * x + CrossAttn(q = alpha W_q x, k, v = (1 - alpha) W_{k,v} LN(PR_dt))``;
    the block's attention then reads ``LN(x_in)`` and is added to the un-fused ``x``.

    PR_dt is a single token, so the attention weights are identically 1 and the read equals
    ``W_out((1 - alpha) W_v LN(PR_dt))`` for every pixel (so in the authors' released network too). We compute that
    exact value directly instead of an HW x 1 softmax; ``cross_attn_q``/``cross_attn_k`` stay as parameters so published
    checkpoints load key for key, and are frozen because their gradient is identically zero (which also keeps DDP
    free of ``find_unused_parameters``).
    """

    def __init__(self, channels: int, heads: int, expansion: float, prompt_dim: int) -> None:
        super().__init__(channels, heads, expansion)
        self.feature_weight = nn.Parameter(torch.ones(1))
        self.prompt_weight = nn.Parameter(torch.ones(1))
        self.prompt_norm = nn.LayerNorm(prompt_dim)
        self.cross_attn_q = nn.Linear(channels, channels)
        self.cross_attn_k = nn.Linear(prompt_dim, channels)
        self.cross_attn_v = nn.Linear(prompt_dim, channels)
        self.cross_attn_out = nn.Linear(channels, channels)
        for inert in (self.cross_attn_q, self.cross_attn_k):
            inert.requires_grad_(False)

    def gate(self) -> torch.Tensor:
        """(alpha, 1 - alpha): the feature and prompt shares of the fused input."""
        return torch.softmax(torch.cat([self.feature_weight, self.prompt_weight]), dim=0)

    def forward(self, x: torch.Tensor, prompt: torch.Tensor | None = None) -> torch.Tensor:
        if prompt is None:
            raise ValueError("GatedFusionBlock needs the prompt representation PR_dt")
        alpha, beta = self.gate()
        prompt_read = self.cross_attn_out(beta * self.cross_attn_v(self.prompt_norm(prompt)))
        fused = alpha * x + prompt_read.to(x.dtype)[:, :, None, None]
        x = x + self.attn(self.norm1(fused))
        return x + self.ffn(self.norm2(x))


class Downsample(nn.Module):
    """Halve resolution, double channels: 3x3 conv to C/2, then pixel-unshuffle by 2."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(channels, channels // 2, 3, padding=1, bias=False), nn.PixelUnshuffle(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class Upsample(nn.Module):
    """Double resolution, halve channels: 3x3 conv to 2C, then pixel-shuffle by 2."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(channels, channels * 2, 3, padding=1, bias=False), nn.PixelShuffle(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class BlockStack(nn.ModuleList):
    """A level's sequence of blocks that all receive the same prompt representation."""

    def forward(self, x: torch.Tensor, prompt: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        for block in self:
            x = block(x, prompt)
        return x
