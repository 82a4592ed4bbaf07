"""Prompt machinery of DATPRL-IR: query projectors, prompt pools with the Prompt Composition Mechanism (PCM), and the
domain-task fusion that yields the domain-aware task representation PR_dt (arXiv 2603.01725, Sec. 3)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


class QueryProjector(nn.Module):
    """Feature map -> query vector in R^D (Sec. 3): pool, conv, ReLU, pool, conv, ReLU, global pool, linear.

    The pools are adaptive averages to ``grid`` x ``grid`` and then half that, so the query does not depend on the
    image size; the published network uses grid 8 for the domain query (full-resolution shallow features) and 4 for
    the task query (1/8-resolution features), which the reference fixture pins down. Attribute ``mapper`` and its
    indices follow the published layout (convs at 1 and 4, linear at 8).
    """

    def __init__(self, channels: int, dim: int, grid: int) -> None:
        super().__init__()
        self.mapper = nn.Sequential(
            nn.AdaptiveAvgPool2d(grid),
            nn.Conv2d(channels, channels // 2, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(max(1, grid // 2)),
            nn.Conv2d(channels // 2, channels // 4, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(1),
            nn.Linear(channels // 4, dim),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.mapper(features)


@dataclass
class PoolSelection:
    """What one prompt pool did for a batch: everything the auxiliary losses and users need.

    query: (B, D) the query compared with the keys (centred when the pool centres its queries).
    similarities: (B, N) clean cosine similarities over the temperature, s_j = cos(q, K_j) / tau.
    indices: (B, k) selected prompts; weights: (B, k) softmax of the clean selected similarities.
    representation: (B, D), the pool's prompt representation.
    """

    query: torch.Tensor
    similarities: torch.Tensor
    indices: torch.Tensor
    weights: torch.Tensor
    representation: torch.Tensor


#: Standard deviation of the published random init of the prompt keys and values.
PROMPT_INIT_STD = 0.02


class PromptPool(nn.Module):
    """A pool of N prompts (key K_j in R^D, value V_j in R^{T x D}) composed by PCM (arXiv 2603.01725, Sec. 3).

    s_j = cos(q, K_j) / clamp(tau, t_min, t_max); top-k on s (+ noise_std * N(0,1) in training only);
    w = softmax(s_selected); A = sum_j w_j V_j; representation = GELU(LayerNorm(Linear(flatten(A)))).

    ``query_centering`` (not in the published network): the query is centred before the cosine, ``q - c``. Why: the
    published query projector ends in a linear layer with bias, and the component shared by all images dominates
    the query (pairwise cosine between the queries of different images >= 0.999 in a fresh network, >= 0.985 after
    training on the default corpus), so the cosine ranks the keys the same way for every image and top-k selects the
    same prompts whatever the image (normalised mutual information between selection and domain: 0.00). ``c`` is a
    running mean of the queries (buffer ``query_center``): the first training batch sets it, each later one moves
    it by ``center_momentum`` towards its own mean, and training and evaluation both subtract it, so a single image
    in evaluation is centred exactly as in training. (Centring training batches by their own mean instead let the
    shared component drift freely -- it receives no gradient -- to 60x the spread of the queries, and evaluation
    with a running mean then collapsed again.)
    """

    def __init__(
        self,
        size: int,
        top_k: int,
        dim: int,
        value_tokens: int,
        noise_std: float = 0.1,
        temperature_range: tuple[float, float] = (0.1, 2.0),
        query_centering: bool = False,
        center_momentum: float = 0.1,
        fixed_keys: bool = False,
        routing: str = "unsupervised",
    ) -> None:
        super().__init__()
        #: "unsupervised" (the paper's) or "task_labels": the training loss adds L_tsel (datprl.models.losses)
        self.routing = routing
        self.top_k = top_k
        self.center_momentum = center_momentum
        self.noise_std = noise_std
        self.temperature_range = temperature_range
        keys = torch.randn(size, dim) * PROMPT_INIT_STD
        if fixed_keys:  # a buffer of the same name: the state dict is the same, the optimiser never sees it
            self.register_buffer("prompt_keys", keys)
        else:
            self.prompt_keys = nn.Parameter(keys)
        self.prompt_values = nn.Parameter(torch.randn(size, value_tokens, dim) * PROMPT_INIT_STD)
        self.temperature = nn.Parameter(torch.tensor(1.0))
        self.value_aggregation = nn.Sequential(nn.Linear(value_tokens * dim, dim), nn.LayerNorm(dim), nn.GELU())
        # Registered only when used, so the published layout (and its checkpoints) stays exactly as it is.
        self.register_buffer("query_center", torch.zeros(dim) if query_centering else None)

    @property
    def size(self) -> int:
        return self.prompt_keys.shape[0]

    @property
    def fixed_keys(self) -> bool:
        """True when the keys are a buffer, set from outside and never trained."""
        return not isinstance(self.prompt_keys, nn.Parameter)

    @torch.no_grad()
    def start_keys_at(self, directions: torch.Tensor) -> None:
        """Set the first M keys to ``directions`` (M, D), M <= N, rescaled to the norm the random init gives a key on
        average (0.02 sqrt(D)): selection reads only their directions (cosine), and Adam's steps keep the same
        relative size as from the published init. The other keys keep their values."""
        size, dim = self.prompt_keys.shape
        if directions.ndim != 2 or directions.shape[1] != dim or directions.shape[0] > size:
            raise ValueError(
                f"expected at most {size} key directions of length {dim}, got shape {tuple(directions.shape)}"
            )
        unit = F.normalize(directions.to(self.prompt_keys), dim=-1)
        self.prompt_keys[: len(unit)] = unit * PROMPT_INIT_STD * dim**0.5

    def similarities(self, query: torch.Tensor) -> torch.Tensor:
        """(B, D) queries -> (B, N) cosine similarities divided by the clamped temperature."""
        tau = self.temperature.clamp(*self.temperature_range)
        return F.normalize(query, dim=-1) @ F.normalize(self.prompt_keys, dim=-1).t() / tau

    def centred(self, query: torch.Tensor) -> torch.Tensor:
        """The query the keys are compared with: ``query`` itself, or ``query - c`` with ``query_centering`` (the
        running centre ``c`` updated first with the batch in training)."""
        if self.query_center is None:
            return query
        if self.training:
            with torch.no_grad():
                batch = query.detach().mean(0).to(self.query_center.dtype)
                # The first batch sets the centre (no lag from a zero start); later ones move it by the momentum.
                fresh = (self.query_center == 0).all()
                moved = torch.where(fresh, batch, self.query_center.lerp(batch, self.center_momentum))
                # A non-finite batch (an fp16 overflow, whose optimiser step the GradScaler skips, or a NaN input)
                # leaves the centre as it was: a NaN centre would make every later selection NaN.
                self.query_center.copy_(torch.where(torch.isfinite(batch).all(), moved, self.query_center))
        return query - self.query_center.to(query.dtype)

    def forward(self, query: torch.Tensor) -> PoolSelection:
        query = self.centred(query.to(self.prompt_keys.dtype))
        sims = self.similarities(query)
        ranking = sims
        if self.training and self.noise_std > 0:
            # Noisy selection explores rarely chosen prompts; the weights below still use the clean scores.
            ranking = sims + self.noise_std * torch.randn_like(sims)
        indices = ranking.detach().topk(self.top_k, dim=-1).indices
        weights = sims.gather(1, indices).softmax(dim=-1)
        composed = torch.einsum("bk,bktd->btd", weights, self.prompt_values[indices])
        representation = self.value_aggregation(composed.flatten(1))
        return PoolSelection(query, sims, indices, weights, representation)


class DomainTaskFusion(nn.Module):
    """PR_dt = fuse(PR_d, PR_t) (Sec. 3): cross-attention (query PR_d, key/value PR_t), residual + LayerNorm,
    then a residual feed-forward D -> 2D -> D with GELU.

    Each representation is a single token, so the attention weights are identically 1 and the attention output is
    ``out_proj(W_v PR_t + b_v)``; we compute exactly that from the value rows of ``in_proj_weight`` (the query/key rows
    receive zero gradient, as in the published network). Parameter names follow the published layout.
    """

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.cross_attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, dim * 2), nn.GELU(), nn.Dropout(0.0), nn.Linear(dim * 2, dim))

    def forward(self, domain: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
        attn = self.cross_attention
        dim = domain.shape[-1]
        value = F.linear(task, attn.in_proj_weight[2 * dim :], attn.in_proj_bias[2 * dim :])
        fused = self.norm(domain + attn.out_proj(value))
        return fused + self.ffn(fused)
