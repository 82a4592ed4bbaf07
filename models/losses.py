"""Training losses of DATPRL-IR (arXiv 2603.01725, Sec. 3; weights from the authors' released training config).

The released code trains only L_pix + 0.1 L_fft; L_align, L_div, L_bal and L_con are described in the paper but not
released, so the forms below are ours (each documented with its formula). Every term is computed in float32, so the
losses are safe under mixed precision (autocast outputs bf16/fp16 similarities and images).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import Tensor, nn

from datprl.models.network import RestorationOutput, unwrap_model
from datprl.models.prompts import PoolSelection

__all__ = [
    "DATPRLLoss",
    "LossWeights",
    "TaskInputError",
    "alignment_loss",
    "balance_loss",
    "contrastive_selection_loss",
    "diversity_loss",
    "fft_errors",
    "fft_loss",
    "pixel_errors",
    "pixel_loss",
    "prior_selection_loss",
    "task_selection_loss",
]


def _same_shape(pred: Tensor, target: Tensor) -> None:
    # F.l1_loss would silently broadcast e.g. (B,3,H,W) against (3,H,W); fail loudly instead.
    if pred.shape != target.shape:
        raise ValueError(f"output shape {tuple(pred.shape)} differs from target shape {tuple(target.shape)}")


def _per_sample_l1(a: Tensor, b: Tensor) -> Tensor:
    return (a.float() - b.float()).abs().flatten(1).mean(1)


def _relative(per_sample: Tensor, input_error: Tensor | None) -> Tensor:
    """Mean over the batch of each sample's loss, divided by the same loss of its degraded input when given."""
    if input_error is None:
        return per_sample.mean()
    return (per_sample / (input_error.detach() + INPUT_ERROR_FLOOR)).mean()


#: Added to a sample's input error before dividing by it, so a nearly clean input does not blow its weight up.
INPUT_ERROR_FLOOR = 1e-3


def pixel_errors(pred: Tensor, target: Tensor) -> Tensor:
    """Each sample's L1 between ``pred`` and ``target``: (B,)."""
    _same_shape(pred, target)
    return _per_sample_l1(pred, target)


def pixel_loss(pred: Tensor, target: Tensor, degraded: Tensor | None = None) -> Tensor:
    """L_pix = mean |pred - target| (L1 between output and target; weight 1.0).

    With ``degraded`` (the network's input), each sample's L1 is divided by its input's L1 to the target
    (``LossWeights.input_relative="sample"``): doing nothing then costs 1 on every sample."""
    error = pixel_errors(pred, target)
    return _relative(error, None if degraded is None else pixel_errors(degraded, target))


def _spectrum(image: Tensor) -> Tensor:
    return torch.view_as_real(torch.fft.fft2(image.float(), dim=(-2, -1)))


def fft_errors(target: Tensor, *images: Tensor) -> tuple[Tensor, ...]:
    """Each of ``images``' per-sample L_fft (see :func:`fft_loss`) against ``target``: one (B,) tensor per image. The
    target's spectrum is computed once for all of them (a loss divided by the input's own L_fft needs two)."""
    for image in images:
        _same_shape(image, target)
    target_spectrum = _spectrum(target)
    return tuple(_per_sample_l1(_spectrum(image), target_spectrum) for image in images)


def fft_loss(pred: Tensor, target: Tensor, degraded: Tensor | None = None) -> Tensor:
    """L_fft = mean( |Re F(pred) - Re F(target)| , |Im F(pred) - Im F(target)| ), F = torch.fft.fft2 over (H, W)
    (weight 0.1).

    Inputs are cast to float32 first: half-precision FFTs are unsupported on CPU and lossy on GPU. The FFT is
    unnormalised (``norm="backward"``) as in the released code, so the term's scale grows with the patch size.
    ``degraded``: per-sample division by the input's own L_fft, as in :func:`pixel_loss`.
    """
    if degraded is None:
        return fft_errors(target, pred)[0].mean()
    error, input_error = fft_errors(target, pred, degraded)
    return _relative(error, input_error)


class TaskInputError:
    """Running mean, per task, of the degraded input's own L_pix and L_fft: the divisors of
    ``LossWeights.input_relative="task"``.

    Dividing each sample by its *own* input error (``"sample"``) weighs a nearly clean crop (a flat patch of a
    bicubic x4 input has L1 ~0.001) as much as a heavily degraded one: a relative gain on an easy crop is worth as much
    as one on a hard crop, though the hard crops decide the error and the PSNR. One divisor per task keeps what the
    per-sample form was for (every task weighs the same, whatever its input PSNR) and within a task weighs crops by
    their error, as plain L1 does. On the default corpus (main job, seed 0) the trained network's mean L1 on 48 px
    training crops of low-dose CT fell to 0.36 of the input's with per-task division, 0.59 with per-sample division.

    The mean is exponential (``momentum`` per step in which the task appears) with Adam's bias correction, so the first
    batch already gives a full-size divisor. Each Ray Train worker keeps its own (they see the same distribution); the
    state is saved with the checkpoint (:meth:`state_dict`)."""

    def __init__(self, momentum: float = 0.99) -> None:
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum={momentum} must be in [0, 1)")
        self.momentum = momentum
        self.tasks: dict[str, list[float]] = {}  # task -> [pixel mean, fft mean, steps seen]

    def update(self, tasks: Sequence[str], pixel: Tensor, fft: Tensor) -> tuple[Tensor, Tensor]:
        """Fold this batch's input errors ``pixel`` and ``fft`` (B,) into the means of ``tasks`` (B names); return the
        per-sample divisors (B,) for each, on ``pixel``'s device."""
        if len(tasks) != pixel.shape[0]:
            raise ValueError(f"{len(tasks)} task names for a batch of {pixel.shape[0]} samples")
        values = torch.stack([pixel.detach().float(), fft.detach().float()], 1).tolist()
        batch: dict[str, list[list[float]]] = {}
        for task, row in zip(tasks, values):
            batch.setdefault(task, []).append(row)
        m = self.momentum
        for task, rows in batch.items():
            mean_pixel, mean_fft, seen = self.tasks.get(task, [0.0, 0.0, 0])
            n = len(rows)
            self.tasks[task] = [
                m * mean_pixel + (1 - m) * sum(r[0] for r in rows) / n,
                m * mean_fft + (1 - m) * sum(r[1] for r in rows) / n,
                seen + 1,
            ]
        divisors = [self._corrected(task) for task in tasks]
        pixel_div, fft_div = torch.tensor(divisors, dtype=torch.float32, device=pixel.device).unbind(1)
        return pixel_div, fft_div

    def _corrected(self, task: str) -> tuple[float, float]:
        mean_pixel, mean_fft, seen = self.tasks[task]
        correction = 1 - self.momentum**seen
        return mean_pixel / correction + INPUT_ERROR_FLOOR, mean_fft / correction + INPUT_ERROR_FLOOR

    def state_dict(self) -> dict:
        return {"momentum": self.momentum, "tasks": {task: list(values) for task, values in self.tasks.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.momentum = float(state["momentum"])
        self.tasks = {
            task: [float(values[0]), float(values[1]), int(values[2])] for task, values in state["tasks"].items()
        }


def alignment_loss(domain_repr: Tensor, text_embedding: Tensor, mask: Tensor | None = None) -> Tensor:
    """L_align = mean_{b: mask_b} [ 1 - cos(PR_d^b, e_text^b) ] (weight 1.0).

    domain_repr: (B, D) domain representations PR_d; text_embedding: (B, D) embeddings of each image's description
    (from the frozen text encoder, so normally without grad; it is not detached, so a learnable projection may be
    trained through it). mask: optional (B,) bool, True where the sample has an embedding; the rows where it is
    False are ignored (their content, even NaN, never enters the graph). With no selected row the loss is 0 and
    still attached to ``domain_repr``'s graph, so ``backward()`` and DDP stay uniform across steps.
    """
    if domain_repr.ndim != 2 or text_embedding.ndim != 2:
        raise ValueError(
            f"expected (batch, dim) tensors, got domain_repr {tuple(domain_repr.shape)} "
            f"and text_embedding {tuple(text_embedding.shape)}"
        )
    if domain_repr.shape[1] != text_embedding.shape[1]:
        raise ValueError(
            f"text embedding dim {text_embedding.shape[1]} differs from the prompt dim D={domain_repr.shape[1]}; "
            "the text encoder's output dim must equal the model's prompt_dim: build the model with "
            f"prompt_dim={text_embedding.shape[1]} or project the embeddings to {domain_repr.shape[1]} dims"
        )
    if domain_repr.shape[0] != text_embedding.shape[0]:
        raise ValueError(
            f"batch sizes differ: {domain_repr.shape[0]} representations, {text_embedding.shape[0]} embeddings"
        )
    if mask is not None:
        if mask.shape != (domain_repr.shape[0],) or mask.dtype != torch.bool:
            raise ValueError(
                f"mask must be a bool tensor of shape ({domain_repr.shape[0]},), got {mask.dtype} {tuple(mask.shape)}"
            )
        # Index instead of multiplying by the mask: placeholder rows (zeros, NaN) then cannot poison the gradient.
        domain_repr, text_embedding = domain_repr[mask], text_embedding[mask]
    distance = 1 - F.cosine_similarity(domain_repr.float(), text_embedding.float(), dim=-1)
    return distance.sum() / max(distance.numel(), 1)


def diversity_loss(prompt_values: Tensor, threshold: float = 0.1) -> Tensor:
    """L_div = 2 / (N (N-1)) * sum_{i<j} max(0, cos(vec V_i, vec V_j) - threshold) (weight 1.0,
    threshold 0.1); vec V_j flattens the j-th value's T x D tokens.

    A plain hinge rather than a squared one: a squared hinge has vanishing gradient just above the threshold, so
    near-duplicate prompts (the collapse this term exists to prevent) would be separated only weakly; the plain hinge
    pushes every offending pair with constant force and stays in cosine units (at most 1 - threshold per pair),
    which keeps weight 1.0 interpretable. Pairs below the threshold (random init in high dimension) cost nothing.
    A pool with a single prompt has no pairs: 0.
    """
    if prompt_values.ndim != 3:
        raise ValueError(f"expected prompt values of shape (N, T, D), got {tuple(prompt_values.shape)}")
    if not -1.0 <= threshold < 1.0:
        raise ValueError(f"threshold must be in [-1, 1), got {threshold}")
    n = prompt_values.shape[0]
    unit = F.normalize(prompt_values.float().flatten(1), dim=-1)
    i, j = torch.triu_indices(n, n, offset=1, device=unit.device)
    cos = (unit[i] * unit[j]).sum(-1)
    return F.relu(cos - threshold).sum() / max(cos.numel(), 1)


def balance_loss(similarities: Tensor) -> Tensor:
    """L_bal = log N - H(p), H(p) = -sum_j p_j log p_j, p = (1/B) sum_b softmax_j(s_bj) over the whole pool
    (weight 0.1).

    0 when the pool is used uniformly on average over the batch, approaching log N when every sample puts all its
    mass on one prompt (with tau >= 0.1 the softmax never fully collapses, so log N is a supremum).
    """
    if similarities.ndim != 2:
        raise ValueError(f"expected similarities of shape (batch, N), got {tuple(similarities.shape)}")
    p = similarities.float().softmax(dim=-1).mean(0)
    entropy = -(p * p.clamp_min(torch.finfo(p.dtype).tiny).log()).sum()
    return math.log(similarities.shape[1]) - entropy


def contrastive_selection_loss(similarities: Tensor, indices: Tensor) -> Tensor:
    """L_con = (1/B) sum_b -log( sum_{j in S_b} exp(s_bj) / sum_{j=1..N} exp(s_bj) ) (weight
    0.1); S_b = indices[b], the prompts selected for sample b.

    InfoNCE with several positives: s = cos(q, K)/tau already carries the temperature, so the term pulls the query
    towards its selected keys (and those keys towards it) and pushes it from the unselected ones, sharpening the
    top-k selection; L_bal counteracts the resulting rich-get-richer tendency. 0 when k = N (nothing to push from).
    """
    if similarities.ndim != 2 or indices.ndim != 2 or indices.shape[0] != similarities.shape[0]:
        raise ValueError(
            f"expected similarities (batch, N) and indices (batch, k), got {tuple(similarities.shape)} and "
            f"{tuple(indices.shape)}"
        )
    n = similarities.shape[1]
    if indices.numel() and (indices.min() < 0 or indices.max() >= n):
        raise ValueError(
            f"selected indices must lie in [0, {n}), got range [{int(indices.min())}, {int(indices.max())}]"
        )
    s = similarities.float()
    return (s.logsumexp(-1) - s.gather(1, indices.long()).logsumexp(-1)).mean()


def prior_selection_loss(
    similarities: Tensor,
    text_embedding: Tensor,
    keys: Tensor,
    temperature: Tensor | float,
    top_k: int,
    mask: Tensor | None = None,
) -> Tensor:
    """L_psel: the domain pool selects, for an image, the prompts its description selects (ours; weight 1.0).

    With ``t`` the text embedding of the image's description (projected to D) and ``K`` the pool's keys,
    ``u_j = cos(t, K_j) / tau`` scores the prompts as the image's query does (``similarities``, s_j = cos(q, K_j) /
    tau), and ``P = top-k(u)`` are the prompts the description picks. Then

        L_psel = InfoNCE(u; P) + InfoNCE(s; P),  InfoNCE(x; P) = mean_b [logsumexp_j x_bj - logsumexp_{j in P_b} x_bj]

    The first term makes the keys prototypes of the descriptions (each key moves towards the descriptions that pick
    it and away from the others); the second teaches the image query, which sees only the degraded image, to pick the
    same ones. Why it exists: L_align reaches the selection only through the softmax weights of the prompts already
    selected (top-k has no gradient). Measured on the embedded default (paper_tiny, 1000 steps): the domain pool's
    NMI with the domain was 0.30 / 0.22 on val (seeds 0 / 1) without it and 0.22 / 0.54 / 0.59 (seeds 0 / 1 / 2) with
    it, at some cost in validation PSNR (docs/experiments/prompt-selection.md). mask: (B,) bool, rows
    without a description are ignored; with none left the loss is 0, still attached to the graph.
    """
    if similarities.ndim != 2 or text_embedding.ndim != 2 or keys.ndim != 2:
        raise ValueError(
            f"expected similarities (batch, N), text embeddings (batch, D) and keys (N, D), got "
            f"{tuple(similarities.shape)}, {tuple(text_embedding.shape)}, {tuple(keys.shape)}"
        )
    if text_embedding.shape[1] != keys.shape[1] or similarities.shape[1] != keys.shape[0]:
        raise ValueError(
            f"text embeddings of dim {text_embedding.shape[1]} and similarities over "
            f"{similarities.shape[1]} prompts do not fit keys of shape {tuple(keys.shape)}"
        )
    if mask is not None:
        similarities, text_embedding = similarities[mask], text_embedding[mask]
    if similarities.shape[0] == 0:
        return similarities.sum().float() * 0 + keys.sum().float() * 0
    text_scores = F.normalize(text_embedding.float(), dim=-1) @ F.normalize(keys.float(), dim=-1).t() / temperature
    picked = text_scores.detach().topk(top_k, dim=-1).indices
    return contrastive_selection_loss(text_scores, picked) + contrastive_selection_loss(similarities, picked)


def task_key_mask(num_prompts: int, task_ids: Tensor, num_tasks: int) -> Tensor:
    """(B, N) bool: the task pool's keys that belong to each sample's task under label routing.

    With at least as many prompts as tasks, key ``j`` belongs to task ``j mod T`` (so a pool of 2T prompts gives
    every task two of its own); with fewer, tasks share keys: task ``i`` owns key ``i mod N``."""
    keys = torch.arange(num_prompts, device=task_ids.device)
    if num_prompts >= num_tasks:
        return (keys[None] % num_tasks) == task_ids[:, None]
    return keys[None] == (task_ids % num_prompts)[:, None]


def task_selection_loss(similarities: Tensor, task_ids: Tensor, num_tasks: int) -> Tensor:
    """L_tsel (ours, beyond the paper): the task pool selects the keys of the sample's degradation task.

        L_tsel = mean_b [logsumexp_j s_bj - logsumexp_{j in P_b} s_bj],  P_b = the keys of task_b

    The paper's task pool selects without labels; on the embedded default that selection separated medical from RGB
    images but not haze from blur or rain (task-pool NMI with the task 0.20 / 0.27 on val / test), so the task prompt
    could not tell the decoder which degradation to remove. The corpus records each sample's task, and this
    InfoNCE term (the form of L_con, with the task's keys as the positives) routes by it: at inference the image
    alone picks its task's keys. ``task_ids``: (B,) indices into the training task list."""
    if similarities.ndim != 2 or task_ids.ndim != 1 or task_ids.shape[0] != similarities.shape[0]:
        raise ValueError(
            f"expected similarities (batch, N) and task ids (batch,), got {tuple(similarities.shape)} and "
            f"{tuple(task_ids.shape)}"
        )
    s = similarities.float()
    positive = task_key_mask(s.shape[1], task_ids, num_tasks)
    return (s.logsumexp(-1) - s.masked_fill(~positive, float("-inf")).logsumexp(-1)).mean()


class LossWeights(BaseModel):
    """Weights of the combined loss (defaults: the released training config's). A weight of 0 drops its term."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    pixel: float = Field(1.0, ge=0)
    fft: float = Field(0.1, ge=0)
    input_relative: Literal["none", "sample", "task"] = Field(
        "none",
        description="divide L_pix and L_fft by the same loss of the degraded input (ours), so every task weighs the "
        "same where plain L1 ('none', the paper's) lets the low-PSNR tasks (haze, cloud) dominate the gradient: "
        "'task' by the running mean of the input's loss over the sample's task (TaskInputError), 'sample' by the "
        "sample's own input loss (which weighs a nearly clean crop as much as a degraded one; kept to reproduce "
        "earlier runs)",
    )
    align: float = Field(1.0, ge=0)
    prior_selection: float = Field(
        1.0, ge=0, description="L_psel (ours): the domain pool selects what the image's description selects"
    )
    task_selection: float = Field(
        1.0,
        ge=0,
        description="L_tsel (ours, beyond the paper): a task pool with routing=task_labels selects the keys of the "
        "sample's task label (no effect on unsupervised pools, the paper's)",
    )
    task_selection_temperature: float = Field(
        0.1,
        gt=0,
        description="L_tsel scores cos(query, key) / this: the pool's own learnt temperature starts at 1, where even "
        "a perfect separation of 9 tasks over 18 keys leaves the loss near 0.7 and its gradient small",
    )
    diversity: float = Field(1.0, ge=0)
    balance: float = Field(0.1, ge=0)
    contrastive: float = Field(0.1, ge=0)
    diversity_threshold: float = Field(0.1, ge=0, lt=1, description="cosine above which prompt values are penalised")

    @field_validator("input_relative", mode="before")
    @classmethod
    def _booleans_of_earlier_configs(cls, value):
        # Configs saved before the per-task form said true (the per-sample division) or false.
        return {True: "sample", False: "none"}.get(value, value) if isinstance(value, bool) else value


class DATPRLLoss(nn.Module):
    """total = w_pix L_pix + w_fft L_fft + w_align L_align + w_psel L_psel (both on the domain pool)
              + w_tsel L_tsel (a task pool with routing=task_labels only; ours)
              + sum_{pool in task, domain} (w_div L_div + w_bal L_bal + w_con L_con).

    Pool terms are summed over the pools present (not averaged), so adding the domain pool does not dilute the task
    pool's regularisation. Pools present are read from ``output`` (``output.task`` / ``output.domain``); L_div needs the
    pools' ``prompt_values``, which ``RestorationOutput`` does not carry, so ``forward`` takes the ``model`` (a DDP or
    torch.compile wrapper is unwrapped). Alignment applies to the domain pool only and is skipped (no error) when there
    is no domain pool or no ``text_embedding``. Terms with weight 0 are neither computed nor logged. The Restormer
    variant (no pools) therefore gets L_pix + L_fft only.

    ``forward`` returns ``(total, logs)``: logs maps ``pixel``, ``fft``, ``align``, ``<term>_<pool>`` (e.g.
    ``balance_task``) and ``total`` to detached, unweighted floats (one device sync for all of them).
    """

    POOL_TERMS = ("diversity", "balance", "contrastive")

    @staticmethod
    def _pool(model: nn.Module | None, name: str, term: str):
        """The ``name`` pool of ``model`` (DDP / compile wrappers unwrapped): the terms that read prompt values or keys
        need it."""
        pool = getattr(unwrap_model(model), f"{name}_pool", None) if model is not None else None
        if pool is None:
            raise ValueError(
                f"the {term} loss needs the {name} pool's parameters: pass the model that produced the "
                f"output as model=..., or set LossWeights({term}=0)"
            )
        return pool

    def __init__(self, weights: LossWeights | None = None, tasks: Sequence[str] | None = None) -> None:
        super().__init__()
        self.weights = weights or LossWeights()
        #: the training task list: L_tsel's label of a sample is its task's index here
        self.task_index = {task: i for i, task in enumerate(tasks)} if tasks is not None else None
        #: the per-task divisors of ``input_relative="task"`` (None otherwise); checkpointed by the training loop
        self.input_error = TaskInputError() if self.weights.input_relative == "task" else None

    def forward(
        self,
        output: RestorationOutput,
        target: Tensor,
        model: nn.Module | None = None,
        text_embedding: Tensor | None = None,
        text_mask: Tensor | None = None,
        degraded: Tensor | None = None,
        tasks: Sequence[str] | None = None,
    ) -> tuple[Tensor, dict[str, float]]:
        w = self.weights
        terms: dict[str, tuple[float, Tensor]] = {}
        if w.input_relative != "none" and degraded is None:
            raise ValueError(
                f"LossWeights.input_relative={w.input_relative!r} needs the network's input: pass degraded=..."
            )
        if w.input_relative == "task":
            if tasks is None:
                raise ValueError(
                    "LossWeights.input_relative='task' needs each sample's task: pass tasks=[...] (the "
                    "batch's 'task' list)"
                )
            output_fft, input_fft = fft_errors(target, output.image, degraded)
            pixel_div, fft_div = self.input_error.update(tasks, pixel_errors(degraded, target), input_fft)
            if w.pixel:
                terms["pixel"] = (w.pixel, (pixel_errors(output.image, target) / pixel_div).mean())
            if w.fft:
                terms["fft"] = (w.fft, (output_fft / fft_div).mean())
        else:
            reference = degraded if w.input_relative == "sample" else None
            if w.pixel:
                terms["pixel"] = (w.pixel, pixel_loss(output.image, target, reference))
            if w.fft:
                terms["fft"] = (w.fft, fft_loss(output.image, target, reference))
        if w.align and output.domain is not None and text_embedding is not None:
            terms["align"] = (w.align, alignment_loss(output.domain.representation, text_embedding, text_mask))
        if w.prior_selection and output.domain is not None and text_embedding is not None:
            pool = self._pool(model, "domain", "prior_selection")
            tau = pool.temperature.clamp(*pool.temperature_range)
            terms["prior_selection"] = (
                w.prior_selection,
                prior_selection_loss(
                    output.domain.similarities, text_embedding, pool.prompt_keys, tau, pool.top_k, text_mask
                ),
            )
        task_pool = getattr(unwrap_model(model), "task_pool", None) if model is not None else None
        if w.task_selection and output.task is not None and getattr(task_pool, "routing", None) == "task_labels":
            if tasks is None or self.task_index is None:
                raise ValueError(
                    "LossWeights.task_selection needs each sample's task and the training task list: build the loss "
                    "as DATPRLLoss(weights, tasks=[...]) and pass tasks=[...] (the batch's 'task' list)"
                )
            unknown = sorted(set(tasks) - set(self.task_index))
            if unknown:
                raise ValueError(f"tasks {unknown} are not among the training tasks {list(self.task_index)}")
            ids = torch.tensor([self.task_index[t] for t in tasks], device=output.task.similarities.device)
            keys = task_pool.prompt_keys.float()
            cosines = F.normalize(output.task.query.float(), dim=-1) @ F.normalize(keys, dim=-1).t()
            terms["task_selection"] = (
                w.task_selection,
                task_selection_loss(cosines / w.task_selection_temperature, ids, len(self.task_index)),
            )
        pools: dict[str, PoolSelection] = {
            k: v for k, v in (("task", output.task), ("domain", output.domain)) if v is not None
        }
        for name, sel in pools.items():
            if w.diversity:
                pool = self._pool(model, name, "diversity")
                terms[f"diversity_{name}"] = (w.diversity, diversity_loss(pool.prompt_values, w.diversity_threshold))
            if w.balance:
                terms[f"balance_{name}"] = (w.balance, balance_loss(sel.similarities))
            if w.contrastive:
                terms[f"contrastive_{name}"] = (
                    w.contrastive,
                    contrastive_selection_loss(sel.similarities, sel.indices),
                )
        if not terms:
            raise ValueError("every applicable loss weight is 0: nothing to train")
        total = sum(weight * value for weight, value in terms.values())
        values = torch.stack([v.detach() for _, v in terms.values()] + [total.detach()]).tolist()
        return total, dict(zip([*terms, "total"], values))
