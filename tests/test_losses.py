"""Losses of DATPRL-IR (datprl.models.losses): minima, gradient paths into the prompt pools, weighting, bad inputs."""

from __future__ import annotations

import math

import pytest
import torch

from datprl.models import create_model
from datprl.models.network import RestorationOutput
from datprl.models.losses import (
    DATPRLLoss,
    LossWeights,
    TaskInputError,
    alignment_loss,
    balance_loss,
    contrastive_selection_loss,
    diversity_loss,
    fft_loss,
    pixel_loss,
    prior_selection_loss,
    task_key_mask,
    task_selection_loss,
)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    # trained domain keys (paper_tiny's are fixed), so every term's path to both pools' keys is checked
    return create_model("paper_tiny", domain_pool={"size": 9, "top_k": 3}).train()


def _run(model, batch=2, size=16, seed=0):
    torch.manual_seed(seed)
    x = torch.rand(batch, 3, size, size)
    model.zero_grad(set_to_none=True)
    return model(x, return_aux=True), torch.rand(batch, 3, size, size)


# ---------------------------------------------------------------------------------------------------------------------
# Each term's minimum


@pytest.mark.parametrize("loss", [pixel_loss, fft_loss])
def test_image_losses_zero_iff_equal(loss):
    a = torch.rand(2, 3, 8, 8)
    assert loss(a, a.clone()).item() == 0.0
    assert loss(a, a + 0.01 * torch.randn_like(a)).item() > 0


def test_pixel_loss_is_mean_l1():
    a, b = torch.zeros(1, 3, 4, 4), torch.full((1, 3, 4, 4), 0.5)
    assert pixel_loss(a, b).item() == pytest.approx(0.5)


def test_fft_loss_under_bf16_autocast():
    a, b = torch.rand(2, 3, 8, 8, requires_grad=True), torch.rand(2, 3, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = (a * 1.0).to(torch.bfloat16)  # what an autocast network hands the loss
        value = fft_loss(low, b)
    assert value.dtype == torch.float32 and torch.isfinite(value)
    value.backward()
    assert a.grad is not None and a.grad.abs().sum() > 0
    assert value.item() == pytest.approx(fft_loss(low.float(), b).item())


def test_alignment_loss_bounds():
    v = torch.randn(4, 16)
    assert alignment_loss(v, 3 * v).item() == pytest.approx(0.0, abs=1e-6)
    assert alignment_loss(v, -v).item() == pytest.approx(2.0, abs=1e-6)


def test_alignment_mask_ignores_missing_rows():
    v = torch.randn(3, 8, requires_grad=True)
    text = torch.stack([v[0].detach(), torch.full((8,), float("nan")), -v[2].detach()])
    mask = torch.tensor([True, False, True])
    loss = alignment_loss(v, text, mask)
    assert loss.item() == pytest.approx(1.0, abs=1e-6)  # mean of 0 and 2; the NaN row never enters
    loss.backward()
    assert torch.isfinite(v.grad).all() and v.grad[1].abs().sum() == 0

    none = alignment_loss(v, text, torch.zeros(3, dtype=torch.bool))
    assert none.item() == 0.0 and none.requires_grad
    none.backward()  # graph intact, no error


def test_diversity_orthogonal_vs_identical():
    eye = torch.eye(8).reshape(8, 2, 4)  # eight orthogonal flattened values
    assert diversity_loss(eye).item() == 0.0
    same = torch.randn(1, 2, 4).expand(4, 2, 4)
    assert diversity_loss(same, threshold=0.1).item() == pytest.approx(0.9, abs=1e-5)
    assert diversity_loss(torch.randn(1, 2, 4)).item() == 0.0  # no pairs


def test_balance_uniform_vs_collapsed():
    n = 6
    assert balance_loss(torch.zeros(4, n)).item() == pytest.approx(0.0, abs=1e-6)
    # Each sample confident on a different prompt: still uniform on average over the batch.
    assert balance_loss(10 * torch.eye(n)).item() == pytest.approx(0.0, abs=1e-6)
    collapsed = torch.zeros(4, n)
    collapsed[:, 0] = 10.0
    value = balance_loss(collapsed).item()
    assert 0 < value < math.log(n) and value > 0.9 * math.log(n)


def test_contrastive_smaller_when_selected_similarities_larger():
    sims = torch.zeros(2, 6)
    idx = torch.tensor([[0, 1], [2, 3]])
    strong = sims.scatter(1, idx, 5.0)
    weak = sims.scatter(1, idx, 1.0)
    assert contrastive_selection_loss(strong, idx) < contrastive_selection_loss(weak, idx)
    assert contrastive_selection_loss(sims, idx).item() == pytest.approx(math.log(3))  # -log(2/6)
    assert contrastive_selection_loss(sims, torch.arange(6).expand(2, 6)).item() == pytest.approx(0.0, abs=1e-6)


# ---------------------------------------------------------------------------------------------------------------------
# Gradient paths into the prompt pools


def test_gradients_reach_pool_parameters(tiny):
    pools = {"task": tiny.task_pool, "domain": tiny.domain_pool}
    with torch.no_grad():  # make two values of each pool correlated so the diversity hinge is active
        for pool in pools.values():
            pool.prompt_values[1].copy_(pool.prompt_values[0] + 0.001 * torch.randn_like(pool.prompt_values[0]))

    def grads(term_fn):
        out, _ = _run(tiny)
        term_fn(out).backward()
        return {(n, p): getattr(pool, p).grad for n, pool in pools.items() for p in ("prompt_keys", "prompt_values")}

    def nonzero(g):
        return g is not None and g.abs().sum() > 0

    g = grads(lambda out: diversity_loss(tiny.task_pool.prompt_values) + diversity_loss(tiny.domain_pool.prompt_values))
    for name in pools:
        assert nonzero(g[name, "prompt_values"]) and g[name, "prompt_keys"] is None

    for term in (
        lambda out: balance_loss(out.task.similarities) + balance_loss(out.domain.similarities),
        lambda out: (
            contrastive_selection_loss(out.task.similarities, out.task.indices)
            + contrastive_selection_loss(out.domain.similarities, out.domain.indices)
        ),
    ):
        g = grads(term)
        for name in pools:
            assert nonzero(g[name, "prompt_keys"]) and g[name, "prompt_values"] is None

    text = torch.randn(2, tiny.config.prompt_dim)
    g = grads(lambda out: alignment_loss(out.domain.representation, text))
    assert nonzero(g["domain", "prompt_values"]) and nonzero(g["domain", "prompt_keys"])  # keys via the weights w
    assert g["task", "prompt_values"] is None and g["task", "prompt_keys"] is None


def test_prior_selection_teaches_the_query_the_descriptions_picks():
    """L_psel: its value is the two InfoNCE terms over the prompts the description picks; minimising it over a free
    query makes the query select exactly those prompts, and over the keys makes two groups of descriptions pick
    disjoint prompts."""
    torch.manual_seed(0)
    keys = torch.nn.Parameter(torch.randn(9, 16))
    text = torch.nn.functional.normalize(torch.randn(4, 16), dim=-1)
    query = torch.nn.Parameter(torch.randn(4, 16))

    def sims(q):
        return torch.nn.functional.normalize(q, dim=-1) @ torch.nn.functional.normalize(keys, dim=-1).t() / 0.5

    value = prior_selection_loss(sims(query), text, keys, 0.5, top_k=3)
    u = sims(text)
    picked = u.topk(3).indices
    assert value.item() == pytest.approx(
        (contrastive_selection_loss(u, picked) + contrastive_selection_loss(sims(query), picked)).item(), rel=1e-6
    )

    def overlap() -> int:  # how many of the description's picks the query selects, over the batch
        chosen = sims(query).topk(3).indices
        return sum(len(set(a) & set(b)) for a, b in zip(chosen.tolist(), picked.tolist()))

    before = overlap()
    optimiser = torch.optim.Adam([query], lr=0.05)
    for _ in range(300):
        optimiser.zero_grad()
        prior_selection_loss(sims(query), text, keys.detach(), 0.5, top_k=3).backward()
        optimiser.step()
    assert before <= 6 and overlap() >= 10, (before, overlap())  # of 12

    # Keys trained by the description side become prototypes: each of two groups of similar descriptions (group
    # means at cosine ~0.75) spreads its picks over 4-6 prompts with random keys, and agrees on one set of 3 after.
    torch.manual_seed(1)
    keys = torch.nn.Parameter(torch.randn(9, 16) * 0.02)
    a = torch.nn.functional.normalize(torch.randn(16), dim=0)
    b = torch.nn.functional.normalize(a + 0.8 * torch.nn.functional.normalize(torch.randn(16), dim=0), dim=0)
    groups = torch.nn.functional.normalize(
        torch.cat([a + 0.1 * torch.randn(8, 16), b + 0.1 * torch.randn(8, 16)]), dim=-1
    )

    def spread() -> list[int]:
        return [len(set((groups[i : i + 8] @ keys.detach().t()).topk(3).indices.flatten().tolist())) for i in (0, 8)]

    assert min(spread()) > 3
    optimiser = torch.optim.Adam([keys], lr=0.01)
    for _ in range(300):
        optimiser.zero_grad()
        prior_selection_loss(sims(torch.randn(16, 16)).detach(), groups, keys, 1.0, top_k=3).backward()
        optimiser.step()
    assert spread() == [3, 3]

    # Rows without a description are ignored; with none left the loss is 0 and still backpropagates.
    empty = prior_selection_loss(sims(query), text, keys, 0.5, top_k=3, mask=torch.zeros(4, dtype=torch.bool))
    assert empty.item() == 0.0 and empty.requires_grad
    with pytest.raises(ValueError, match="do not fit keys"):
        prior_selection_loss(sims(query), torch.randn(4, 8), keys, 0.5, top_k=3)


# ---------------------------------------------------------------------------------------------------------------------
# The combined loss


def test_combined_equals_weighted_sum(tiny):
    weights = LossWeights(
        pixel=1.0, fft=0.1, align=0.5, prior_selection=0.4, diversity=2.0, balance=0.3, contrastive=0.7
    )
    out, target = _run(tiny)
    text = torch.randn(2, tiny.config.prompt_dim)
    total, logs = DATPRLLoss(weights)(out, target, model=tiny, text_embedding=text)
    pool_terms = {f"{t}_{p}" for t in DATPRLLoss.POOL_TERMS for p in ("task", "domain")}
    expected_keys = {"pixel", "fft", "align", "prior_selection", "total"} | pool_terms
    assert set(logs) == expected_keys
    w = weights.model_dump()
    weighted = [(w[k] if k in w else w[k.rsplit("_", 1)[0]]) * v for k, v in logs.items() if k != "total"]
    assert total.item() == pytest.approx(sum(weighted), rel=1e-5)
    assert logs["total"] == pytest.approx(total.item())
    # ...and the logged terms are the pure functions' values.
    assert logs["pixel"] == pytest.approx(pixel_loss(out.image, target).item())
    assert logs["balance_domain"] == pytest.approx(balance_loss(out.domain.similarities).item())
    assert logs["diversity_task"] == pytest.approx(diversity_loss(tiny.task_pool.prompt_values, 0.1).item())
    assert logs["align"] == pytest.approx(alignment_loss(out.domain.representation, text).item())
    total.backward()
    assert tiny.domain_pool.prompt_keys.grad is not None


def test_zero_weights_drop_terms(tiny):
    out, target = _run(tiny)
    full_total, full = DATPRLLoss()(out, target, model=tiny)
    total, logs = DATPRLLoss(LossWeights(balance=0, diversity=0))(out, target)  # no model needed without diversity
    assert not any(k.startswith(("balance", "diversity")) for k in logs)
    assert "align" not in logs and "align" not in full  # no text embedding: skipped silently
    assert "prior_selection" not in full
    dropped = sum(0.1 * full[f"balance_{p}"] + full[f"diversity_{p}"] for p in ("task", "domain"))
    assert total.item() == pytest.approx(full_total.item() - dropped, rel=1e-5)


def test_task_only_and_restormer_variants():
    torch.manual_seed(0)
    task_only = create_model("task_only_tiny").train()
    out, target = _run(task_only)
    _, logs = DATPRLLoss()(out, target, model=task_only, text_embedding=torch.randn(2, 64))
    assert set(logs) == {"pixel", "fft", "diversity_task", "balance_task", "contrastive_task", "total"}

    restormer = create_model("restormer_tiny")
    out, target = _run(restormer)
    total, logs = DATPRLLoss()(out, target, text_embedding=torch.randn(2, 64))
    assert set(logs) == {"pixel", "fft", "total"}
    assert total.item() == pytest.approx(logs["pixel"] + 0.1 * logs["fft"], rel=1e-5)


def test_ddp_style_wrapper_is_unwrapped(tiny):
    class Wrapper(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

    out, target = _run(tiny)
    _, direct = DATPRLLoss()(out, target, model=tiny)
    _, wrapped = DATPRLLoss()(out, target, model=Wrapper(tiny))
    assert wrapped == direct


# ---------------------------------------------------------------------------------------------------------------------
# Bad inputs


def test_bad_inputs_raise():
    img = torch.rand(2, 3, 8, 8)
    with pytest.raises(ValueError, match="differs from target shape"):
        pixel_loss(img, img[0])
    with pytest.raises(ValueError, match="differs from target shape"):
        fft_loss(img, img[..., :4])
    with pytest.raises(ValueError, match="prompt_dim"):
        alignment_loss(torch.randn(2, 64), torch.randn(2, 1024))
    with pytest.raises(ValueError, match="batch sizes"):
        alignment_loss(torch.randn(2, 8), torch.randn(3, 8))
    with pytest.raises(ValueError, match="mask"):
        alignment_loss(torch.randn(2, 8), torch.randn(2, 8), torch.ones(2))
    with pytest.raises(ValueError, match=r"\(N, T, D\)"):
        diversity_loss(torch.randn(4, 8))
    with pytest.raises(ValueError, match="threshold"):
        diversity_loss(torch.randn(4, 2, 8), threshold=1.0)
    with pytest.raises(ValueError, match="batch, N"):
        balance_loss(torch.randn(6))
    with pytest.raises(ValueError, match="indices"):
        contrastive_selection_loss(torch.randn(2, 6), torch.tensor([[0, 6], [1, 2]]))
    with pytest.raises(ValueError):
        contrastive_selection_loss(torch.randn(2, 6), torch.tensor([0, 1]))
    with pytest.raises(ValueError):  # pydantic's ValidationError is a ValueError
        LossWeights(fft=-0.1)
    with pytest.raises(ValueError):
        LossWeights(pixle=1.0)


def test_diversity_without_model_raises(tiny):
    out, target = _run(tiny)
    with pytest.raises(ValueError, match="model="):
        DATPRLLoss()(out, target)
    with pytest.raises(ValueError, match="nothing to train"):
        DATPRLLoss(LossWeights(pixel=0, fft=0))(_run(create_model("restormer_tiny"))[0], target)


def _easy_and_hard_pair():
    """Two samples of one task: a nearly clean input (L1 0.01) and a heavily degraded one (L1 0.1)."""
    target = torch.zeros(2, 3, 8, 8)
    degraded = target.clone()
    degraded[0] += 0.01
    degraded[1] += 0.1
    return target, degraded


@pytest.mark.parametrize("mode", ["sample", "task"])
def test_input_relative_doing_nothing_costs_one(mode):
    target, degraded = _easy_and_hard_pair()
    output = RestorationOutput(degraded.clone(), None, None, None)
    loss = DATPRLLoss(
        LossWeights(input_relative=mode, fft=0, align=0, prior_selection=0, diversity=0, balance=0, contrastive=0)
    )
    _, logs = loss(output, target, degraded=degraded, tasks=["sr_x4", "sr_x4"])
    floor = 1e-3  # INPUT_ERROR_FLOOR, added to every divisor
    expected = (0.01 / (0.01 + floor) + 0.1 / (0.1 + floor)) / 2 if mode == "sample" else 0.055 / (0.055 + floor)
    assert logs["pixel"] == pytest.approx(expected, rel=1e-4)


def test_per_task_division_rewards_restoring_the_degraded_crop_where_per_sample_division_does_not():
    """Cutting the heavy error from 0.1 to 0.06 while the nearly clean crop's goes from 0.01 to 0.03: the mean squared
    error falls from 0.00505 to 0.00225 (+3.5 dB). Divided per sample this costs more than doing nothing (the easy
    crop's ratio triples); divided by the task's mean input error it is a gain."""
    target, degraded = _easy_and_hard_pair()
    output = RestorationOutput(torch.stack([target[0] + 0.03, target[1] + 0.06]), None, None, None)
    weights = dict(fft=0, align=0, prior_selection=0, diversity=0, balance=0, contrastive=0)
    per_sample = DATPRLLoss(LossWeights(input_relative="sample", **weights))(output, target, degraded=degraded)[1]
    per_task = DATPRLLoss(LossWeights(input_relative="task", **weights))(
        output, target, degraded=degraded, tasks=["sr_x4", "sr_x4"]
    )[1]
    assert per_sample["pixel"] > 1.5 and per_task["pixel"] < 0.85


def test_task_input_error_keeps_one_bias_corrected_mean_per_task_and_round_trips():
    scale = TaskInputError(momentum=0.9)
    pixel, fft = scale.update(["a", "b", "a"], torch.tensor([0.1, 0.4, 0.3]), torch.tensor([10.0, 40.0, 30.0]))
    # first batch: each task's divisor is its batch mean (plus the floor), whatever the momentum
    assert pixel.tolist() == pytest.approx([0.201, 0.401, 0.201]) and fft.tolist() == pytest.approx(
        [20.001, 40.001, 20.001]
    )
    pixel, _ = scale.update(["a"], torch.tensor([1.2]), torch.tensor([0.0]))
    assert pixel.item() == pytest.approx((0.9 * 0.1 * 0.2 + 0.1 * 1.2) / (1 - 0.81) + 1e-3)
    restored = TaskInputError()
    restored.load_state_dict(scale.state_dict())
    assert restored.momentum == 0.9 and restored.tasks == scale.tasks
    with pytest.raises(ValueError, match="2 task names for a batch of 1"):
        scale.update(["a", "b"], torch.tensor([0.1]), torch.tensor([0.1]))


def test_per_task_division_needs_the_tasks_and_earlier_boolean_configs_still_load():
    target, degraded = _easy_and_hard_pair()
    output = RestorationOutput(degraded.clone(), None, None, None)
    with pytest.raises(ValueError, match="needs each sample's task: pass tasks="):
        DATPRLLoss(LossWeights(input_relative="task"))(output, target, degraded=degraded)
    assert LossWeights(input_relative=True).input_relative == "sample"
    assert LossWeights(input_relative=False).input_relative == "none"
    with pytest.raises(ValueError, match="input_relative"):
        LossWeights(input_relative="batch")


# --- L_tsel: routing by the task label ----------------------------------------------------------------------------
def test_task_key_mask_gives_each_task_its_own_keys_or_shares_them_when_the_pool_is_smaller():
    own = task_key_mask(6, torch.tensor([0, 2]), num_tasks=3)  # 2 keys a task: task i owns keys i and i + 3
    assert own.tolist() == [[True, False, False, True, False, False], [False, False, True, False, False, True]]
    shared = task_key_mask(2, torch.tensor([0, 1, 2]), num_tasks=3)
    assert shared.tolist() == [[True, False], [False, True], [True, False]]


def test_task_selection_loss_is_low_when_the_query_picks_its_tasks_keys_and_pulls_towards_them():
    ids = torch.tensor([0, 1])
    right = torch.tensor([[5.0, -5.0, 5.0, -5.0], [-5.0, 5.0, -5.0, 5.0]])
    assert task_selection_loss(right, ids, 2) < 1e-3 < 9 < task_selection_loss(-right, ids, 2)
    sims = torch.zeros(2, 4, requires_grad=True)
    task_selection_loss(sims, ids, 2).backward()
    positive = task_key_mask(4, ids, 2)
    assert (sims.grad[positive] < 0).all() and (sims.grad[~positive] > 0).all()  # descent raises the task's keys


def test_task_selection_term_applies_to_a_label_routed_task_pool_only_and_needs_the_tasks():
    torch.manual_seed(0)
    routed = create_model("paper_tiny", task_pool={"size": 4, "top_k": 2, "routing": "task_labels"}).train()
    out, target = _run(routed)
    weights = LossWeights(align=0, prior_selection=0)
    with pytest.raises(ValueError, match="tasks="):
        DATPRLLoss(weights)(out, target, model=routed, tasks=["haze", "cloud"])
    with pytest.raises(ValueError, match="not among the training tasks"):
        DATPRLLoss(weights, tasks=["haze", "cloud"])(out, target, model=routed, tasks=["haze", "derain"])
    total, logs = DATPRLLoss(weights, tasks=["haze", "cloud"])(out, target, model=routed, tasks=["haze", "cloud"])
    assert logs["task_selection"] > 0
    total.backward()
    assert routed.task_pool.prompt_keys.grad.abs().sum() > 0 and routed.task_query.mapper[8].weight.grad.abs().sum() > 0
    # the paper's unsupervised pool gets no L_tsel, whatever the weight
    plain = create_model("paper_tiny").train()
    out, target = _run(plain)
    assert "task_selection" not in DATPRLLoss(weights, tasks=["haze", "cloud"])(out, target, model=plain)[1]


def test_label_routing_is_for_the_task_pool_only():
    with pytest.raises(ValueError, match="domain_pool.routing"):
        create_model("paper_tiny", domain_pool={"size": 9, "top_k": 3, "routing": "task_labels"})
