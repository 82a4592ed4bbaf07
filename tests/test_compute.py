"""The compute options (datprl.platform.compute) on CPU: every precision, channels-last, each Adam implementation and
torch.compile go through the real training step (``train_step``) and agree with the fp32 default where they should;
the start-up line states the global batch and the learning rate's scaling with the number of workers."""

from __future__ import annotations

import os

import pytest
import torch

from datprl.models import create_model
from datprl.models.losses import DATPRLLoss, LossWeights
from datprl.models.network import unwrap_model
from datprl.platform.compute import (
    ComputeConfig,
    adam_options,
    autocast,
    grad_scaler,
    prepare_module,
    resolve_adam_impl,
    resolve_precision,
    to_memory_format,
)
from datprl.platform.config import ConfigError, load_config
from datprl.platform.data.pipeline import DataConfig
from datprl.platform.train.config import OptimConfig, TrainConfig
from datprl.platform.train.loop import build_optimizer, describe_setup, scaled_lr, train_step

CPU = torch.device("cpu")


def _batch(size: int = 24, batch: int = 2) -> dict:
    generator = torch.Generator().manual_seed(1)
    lq = torch.rand(batch, 3, size, size, generator=generator)
    gt = (lq + 0.2 * torch.rand(batch, 3, size, size, generator=generator)).clamp(0, 1)
    return {"lq": lq, "gt": gt, "task": ["sr_x4"] * batch}


def _steps(compute: dict, steps: int = 2, variant: str = "paper_tiny") -> tuple[torch.nn.Module, list[dict], object]:
    """``steps`` training steps of a fresh, noise-free ``variant`` under ``compute``; (network, loss terms, scaler)."""
    config = TrainConfig(
        compute=ComputeConfig(**compute),
        loss=LossWeights(balance=0.0),
        optim=OptimConfig(lr=1e-3),
        text_embeddings=None,
    )
    torch.manual_seed(0)
    model = create_model(variant, selection_noise_std=0.0, query_centering=False)
    net = prepare_module(model, config.compute)
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer, scheduler, scaler = build_optimizer(params, config, 1, CPU)
    criterion = DATPRLLoss(config.loss)
    terms = [
        train_step(net, model, _batch(), criterion, optimizer, scheduler, params, config, CPU, None, scaler)
        for _ in range(steps)
    ]
    return model, terms, scaler


def _max_difference(a: torch.nn.Module, b: torch.nn.Module) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    return max((sa[k].float() - sb[k].float()).abs().max().item() for k in sa if sa[k].is_floating_point())


def _update_cosine(a: torch.nn.Module, b: torch.nn.Module) -> float:
    """Cosine between the two networks' weight changes from the common initialisation of :func:`_steps`."""
    torch.manual_seed(0)
    initial = dict(create_model("paper_tiny", selection_noise_std=0.0, query_centering=False).named_parameters())
    da = torch.cat([(p - initial[n]).flatten() for n, p in a.named_parameters()])
    db = torch.cat([(p - initial[n]).flatten() for n, p in b.named_parameters()])
    return float(torch.nn.functional.cosine_similarity(da, db, dim=0))


@pytest.fixture(scope="module")
def fp32_run():
    return _steps({})


def test_auto_resolves_by_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_precision("auto", "cpu") == "fp32" and resolve_precision("auto", "cuda") == "bf16"
    assert resolve_precision("fp16", "cpu") == "fp16"
    assert resolve_adam_impl("auto", "cpu") == "foreach" and resolve_adam_impl("auto", "cuda") == "fused"
    assert adam_options("fused", "cpu") == {"fused": True} and adam_options("for_loop", "cpu") == {"foreach": False}
    assert grad_scaler("bf16", "cpu") is None and grad_scaler("auto", "cpu") is None
    assert isinstance(grad_scaler("fp16", "cpu"), torch.amp.GradScaler)


def test_bad_values_name_the_field():
    with pytest.raises(ConfigError, match="compute.precision"):
        load_config(TrainConfig, None, ["compute.precision=fp8"])
    with pytest.raises(ConfigError, match="optim.lr_scaling"):
        load_config(TrainConfig, None, ["optim.lr_scaling=quadratic"])


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_trains_with_fp32_weights(precision, fp32_run):
    reference, reference_terms, _ = fp32_run
    network, seen = create_model("paper_tiny"), []
    network.output.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    with autocast(precision, CPU):  # the convolutions really run in the reduced type
        network(torch.rand(1, 3, 16, 16))
    assert seen == [{"bf16": torch.bfloat16, "fp16": torch.float16}[precision]]
    model, terms, scaler = _steps({"precision": precision})
    assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast keeps the master weights fp32
    assert all(torch.isfinite(torch.tensor(t["total"])) for t in terms)
    assert (scaler is not None) == (precision == "fp16")
    if scaler is not None:
        assert scaler.get_scale() > 0 and scaler.state_dict()["scale"] > 0  # saved with checkpoints
    # Same steps as fp32 up to the reduced precision's rounding: the loss agrees to a few per cent and the weights
    # moved the same way (Adam's update of a weight with a tiny gradient can flip sign under rounding, so the whole
    # update is compared by direction).
    assert abs(terms[0]["total"] - reference_terms[0]["total"]) < 0.05 * reference_terms[0]["total"]
    assert _update_cosine(model, reference) > 0.9


def test_fp16_scaler_skips_a_step_with_non_finite_gradients():
    """A GradScaler step whose gradients are not finite (here from a NaN pixel) leaves the weights unchanged and
    halves the scale; the schedule still advances. Gradient clipping runs on the unscaled gradients."""
    config = TrainConfig(
        compute=ComputeConfig(precision="fp16"),
        optim=OptimConfig(lr=1e-3, grad_clip=1.0),
        loss=LossWeights(balance=0.0),
        text_embeddings=None,
    )
    torch.manual_seed(0)
    model = create_model("paper_tiny")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, scheduler, _ = build_optimizer(params, config, 1, CPU)
    # Not the default 65536, which overflows this network's fp16 gradients for its first steps (the scaler then
    # halves it until it fits): here only the NaN pixel overflows.
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    scale = scaler.get_scale()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    batch = _batch()
    batch["lq"][0, 0, 0, 0] = float("nan")
    train_step(model, model, batch, DATPRLLoss(config.loss), optimizer, scheduler, params, config, CPU, None, scaler)
    assert all(torch.equal(before[name], p) for name, p in model.named_parameters())
    assert scaler.get_scale() == scale / 2 and scheduler.last_epoch == 1
    train_step(model, model, _batch(), DATPRLLoss(config.loss), optimizer, scheduler, params, config, CPU, None, scaler)
    assert any(not torch.equal(before[name], p) for name, p in model.named_parameters())  # a finite step moves


def test_channels_last_matches_the_default_layout(fp32_run):
    reference, reference_terms, _ = fp32_run
    model, terms, _ = _steps({"channels_last": True})
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert to_memory_format(torch.rand(1, 3, 8, 8), True).is_contiguous(memory_format=torch.channels_last)
    assert abs(terms[-1]["total"] - reference_terms[-1]["total"]) < 1e-4
    assert _max_difference(model, reference) < 1e-4


@pytest.mark.parametrize("impl", ["fused", "foreach", "for_loop"])
def test_adam_implementations_take_the_same_steps(impl, fp32_run):
    reference, _, _ = fp32_run  # foreach, the CPU default
    model, _, _ = _steps({"adam_impl": impl})
    assert _max_difference(model, reference) < 1e-5


def test_compile_wraps_and_unwraps_the_network():
    """``compute.compile`` through ``prepare_module`` on a network small enough to compile in seconds: the compiled
    module shares the parameters, ``unwrap_model`` reaches the network, and the output equals eager."""
    network = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(4, 3, 1))
    compiled = prepare_module(network, ComputeConfig(compile=True, channels_last=True))
    assert unwrap_model(compiled) is network
    assert {id(p) for p in compiled.parameters()} == {id(p) for p in network.parameters()}
    x = torch.rand(2, 3, 16, 16)
    assert torch.allclose(compiled(x), network(x), atol=1e-5)


@pytest.mark.slow
@pytest.mark.skipif(
    not os.environ.get("DATPRL_COMPILE_TESTS"),
    reason="4 minutes of compilation on 2 CPUs, beyond "
    "the suite's budget: set DATPRL_COMPILE_TESTS=1 (the GPU check compiles the full networks)",
)
def test_compiled_network_trains_like_eager(fp32_run):
    """paper_tiny's training step under torch.compile (239 s of compilation on 2 busy CPUs)."""
    reference, reference_terms, _ = fp32_run
    model, terms, _ = _steps({"compile": True})
    assert abs(terms[0]["total"] - reference_terms[0]["total"]) < 1e-4
    assert _max_difference(model, reference) < 1e-4


def test_start_up_line_states_global_batch_and_lr_scaling(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    config = TrainConfig(data=DataConfig(per_task_batch=2), optim=OptimConfig(lr=1e-3, lr_scaling="linear"))
    assert scaled_lr(config.optim, 4) == pytest.approx(4e-3)
    assert scaled_lr(config.optim.model_copy(update={"lr_scaling": "sqrt"}), 4) == pytest.approx(2e-3)
    assert scaled_lr(config.optim.model_copy(update={"lr_scaling": "none"}), 4) == pytest.approx(1e-3)
    line = describe_setup(config, tasks=9, world=4, device=torch.device("cuda"))
    assert "global batch 72 (2/task x 9 tasks per worker x 4 workers)" in line
    assert "lr 0.004 (optim.lr 0.001, lr_scaling=linear)" in line
    assert "cuda bf16" in line and "Adam fused" in line and "find_unused_parameters off" in line
    single = describe_setup(TrainConfig(), tasks=9, world=1, device=CPU)
    assert "global batch 9 (1/task x 9 tasks per worker x 1 worker)" in single and "cpu fp32" in single
