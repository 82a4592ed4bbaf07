"""The GPU check (``infra/gpu-check.sh``, datprl.platform.bench.gpu_check): the exit without a GPU, the config, the
Markdown summary of a JSON report, the FLOP count and the peak table behind MFU, and the CPU test mode running the
model and serving steps end to end (tiny sizes), a failing step and a step stopped at its budget."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from datprl.platform.bench.gpu_check import (
    NO_CUDA_EXIT,
    REPORT_JSON,
    REPORT_MD,
    GpuCheckConfig,
    format_markdown,
    main,
)
from datprl.platform.bench.model import PEAK_TFLOPS, count_flops, peak_tflops
from datprl.platform.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "infra" / "gpu-check.sh"
CPU_YAML = REPO / "infra" / "gpu-check-cpu.yaml"


def _without_gpu() -> dict[str, str]:
    return {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # hides a GPU this machine may have


def test_without_a_gpu_it_stops_at_once_with_one_line(tmp_path):
    out = tmp_path / "out"
    start = time.monotonic()
    done = subprocess.run(
        ["bash", str(SCRIPT), str(out)], env=_without_gpu(), capture_output=True, text=True, timeout=120
    )
    elapsed = time.monotonic() - start
    assert done.returncode == NO_CUDA_EXIT, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu-check: error: no CUDA device found"), done.stderr
    assert "device=cpu" in lines[0] and "infra/setup.sh" in lines[0]
    assert "Traceback" not in done.stdout + done.stderr and not out.exists()
    assert elapsed < 30, f"took {elapsed:.1f} s"
    # nothing of Ray or of the dataset builder was imported before the check
    probe = (
        "import sys; from datprl.platform.bench.gpu_check import main; code = main(['out_dir=unused']); "
        "print(code, sorted(m for m in sys.modules if m == 'ray' or m.startswith(('ray.', "
        "'datprl.platform.data.build'))))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], env=_without_gpu(), capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert done.stdout.split() == [str(NO_CUDA_EXIT), "[]"], done.stdout + done.stderr


def test_usage_without_an_output_folder():
    done = subprocess.run(["bash", str(SCRIPT), "device=cpu"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stderr.startswith("usage: bash infra/gpu-check.sh OUT_DIR")


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (["model.variants=[nope]"], "model.variants: unknown variants ['nope']"),
        (["model.dtypes=[bf16]", "model.compile_dtypes=[fp32]"], "compile_dtypes ['fp32'] are not in dtypes"),
        (["serving.batches=[4,1]"], "serving.batches: must be positive and increasing"),
        (["serving.variant=nope"], "serving.variant: unknown variants"),
        (["steps=[model,model]"], "steps: the entries must not repeat"),
        (["steps=[model,nope]"], "steps[1]: Input should be 'model'"),
        (["model.budget_s=500"], "model.budget_s=500.0 exceeds total_budget_s=460"),
        (["training.benchmark.dataset=elsewhere"], "training.benchmark.dataset='elsewhere' differs from dataset.path"),
        (["training.benchmark.device=cuda", "device=cpu"], "training.benchmark.device='cuda' differs from device"),
        (["training.benchmark.json_out=x.json"], "training.benchmark.json_out"),
        (["dataset.path=s3://bucket/data"], "dataset.path"),
        (["device=tpu"], "device: Input should be 'cuda' or 'cpu'"),
        (["serving.nope=1"], "unknown key 'serving.nope'"),
        (["starvation.steps=0"], "starvation.steps"),
    ],
)
def test_bad_configs_name_the_field(overrides, named):
    with pytest.raises(ConfigError) as error:
        load_config(GpuCheckConfig, overrides=["out_dir=x", *overrides])
    assert named in str(error.value)


def test_out_dir_is_required():
    with pytest.raises(ConfigError, match="out_dir: Field required"):
        load_config(GpuCheckConfig)


def test_config_passes_dataset_and_device_on_and_round_trips(tmp_path):
    from datprl.platform.config import save_resolved_config

    config = load_config(
        GpuCheckConfig, overrides=["out_dir=x", "device=cpu", f"dataset.path={tmp_path}", "training.benchmark.steps=20"]
    )
    bench = config.training.benchmark
    assert (bench.dataset, bench.device, bench.steps) == (str(tmp_path), "cpu", 20)
    assert (bench.variant, bench.crop_size, bench.per_task_batch) == ("paper", 128, 2)  # the GPU recipe stays
    save_resolved_config(config, tmp_path / "config.yaml")
    assert load_config(GpuCheckConfig, tmp_path / "config.yaml") == config
    default = load_config(GpuCheckConfig, overrides=["out_dir=x"])
    assert default.training.benchmark.device == "cuda" and default.model.batch == 18
    assert sum(default.budget(step) for step in default.steps) <= default.total_budget_s < 480  # 8 minutes


def test_flop_count_of_convolutions_is_analytic():
    batch, cin, cout, k, h, w = 2, 8, 16, 3, 12, 10
    conv = torch.nn.Conv2d(cin, cout, k, padding=1, bias=False)
    forward = 2 * batch * cin * cout * k * k * h * w
    assert count_flops(conv, torch.rand(batch, cin, h, w), None, "inference") == forward
    # the backward of a grouped (depthwise), strided conv: two gradients, each as costly as the forward (torch's own
    # formula ignores the groups)
    depthwise = torch.nn.Conv2d(16, 16, 3, stride=2, padding=1, groups=16)
    x = torch.rand(batch, 16, 12, 12, requires_grad=True)
    forward = 2 * batch * 16 * 1 * 9 * 6 * 6
    assert count_flops(depthwise, x, torch.rand(batch, 16, 6, 6), "train") == 3 * forward


def test_flop_count_of_the_network_train_is_about_three_forwards():
    from datprl.models import create_model

    model = create_model("paper_tiny")
    image = torch.rand(1, 3, 16, 16)
    inference = count_flops(model.eval(), image, image, "inference")
    train = count_flops(model.train(), image, image, "train")
    assert inference > 0 and 2.9 < train / inference <= 3.0  # the first conv's input needs no gradient


def test_peak_table_by_device_name():
    assert peak_tflops("NVIDIA H100 80GB HBM3", "bf16")[0] == 989.4
    assert peak_tflops("NVIDIA H100 PCIe", "bf16")[0] == 756.5  # not the SXM figure
    assert peak_tflops("NVIDIA H200", "bf16") == (989.4, "H200 dense bf16 989.4 TFLOP/s")
    assert (
        peak_tflops("NVIDIA H200", "fp32")[0]
        == PEAK_TFLOPS["H200"]["tf32" if torch.backends.cudnn.allow_tf32 else "fp32"]
    )
    assert peak_tflops("NVIDIA A100-SXM4-80GB", "bf16")[0] == 312.0
    assert peak_tflops("cpu", "bf16")[0] is None
    assert peak_tflops("cpu", "bf16", override=2.5) == (2.5, "2.5 TFLOP/s set in the config")


def test_gpus_are_listed_by_nvidia_smi(tmp_path, monkeypatch):
    from datprl.platform.bench.gpu_check import _gpus

    fake = tmp_path / "nvidia-smi"  # the CSV nvidia-smi prints for --query-gpu=... --format=csv,noheader,nounits
    fake.write_text("#!/bin/sh\necho 'NVIDIA H200, 143771, 570.86.15'\necho 'NVIDIA H200, 143771, 570.86.15'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert _gpus() == [{"name": "NVIDIA H200", "memory_gib": 140.4, "driver": "570.86.15"}] * 2


def test_multi_gpu_command_is_a_valid_training_config(tmp_path):
    import yaml

    from datprl.platform.bench.gpu_steps import train_command

    config = load_config(GpuCheckConfig, overrides=[f"out_dir={tmp_path}", "multi_gpu.overrides=[seed=3]"])
    command = train_command(config, tmp_path / "multi")
    done = subprocess.run([*command, "--dry-run"], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr
    resolved = yaml.safe_load(done.stdout.split("\n---\n")[0])
    assert (resolved["num_workers"], resolved["use_gpu"], resolved["steps"], resolved["seed"]) == (2, True, 20, 3)
    assert resolved["model"]["variant"] == "paper" and resolved["data"]["crop_size"] == 128  # infra/train-gpu.yaml
    assert resolved["evaluate_split"] is None and resolved["text_embeddings"] is None
    assert resolved["output_dir"] == str(tmp_path / "multi") and resolved["resume"] is False


def _report() -> dict:
    bench_row = dict(
        side="bare",
        batch_size=18,
        timed_steps=40,
        steps_per_s=5.0,
        samples_per_s=90.0,
        round_steps_per_s=[5.0],
        window_steps_per_s=[4.9, 5.1],
        warmup_s=[3.0],
    )
    ray_row = {**bench_row, "side": "ray_train", "steps_per_s": 4.5, "samples_per_s": 81.0, "e2e_s": [30.0]}
    model_rows = [
        dict(
            variant="paper",
            mode="train",
            dtype="bf16",
            channels_last=False,
            compiled=True,
            status="ok",
            img_per_s=250.0,
            ms_per_step=72.0,
            peak_mem_mib=20480.0,
            tflops=358.2,
            mfu=0.362,
            compile_s=61.5,
        ),
        dict(
            variant="restormer",
            mode="train",
            dtype="fp32",
            channels_last=False,
            compiled=False,
            status="failed",
            error="OutOfMemoryError: CUDA out of memory.",
        ),
    ]
    return {
        "created": "2026-01-01T00:00:00+00:00",
        "total_s": 401.5,
        "total_budget_s": 460,
        "environment": {
            "device": "cuda",
            "gpus": [{"name": "NVIDIA H200"}],
            "torch": "2.9.0+cu128",
            "cuda": "12.8",
            "ray": "2.60.0",
            "cpus": 16,
            "git_commit": "0123456789abcdef",
            "git_dirty": False,
        },
        "steps": {
            "model": {
                "title": "Model",
                "status": "ok",
                "seconds": 120.0,
                "budget_s": 130,
                "reason": None,
                "error": None,
                "data": {
                    "batch": 18,
                    "size": 128,
                    "device_name": "NVIDIA H200",
                    "iters": 10,
                    "warmup": 3,
                    "rows": model_rows,
                    "gflop_per_image": {"paper": {"train": 253.4}},
                    "peaks": {"bf16": "H200 dense bf16 989.4 TFLOP/s"},
                },
            },
            "serving": {
                "title": "Serving",
                "status": "ok",
                "seconds": 30.0,
                "budget_s": 50,
                "reason": None,
                "error": None,
                "data": {
                    "variant": "paper",
                    "device_name": "NVIDIA H200",
                    "sizes": [
                        {
                            "size": 1024,
                            "latency": {"p50_ms": 80.0, "p99_ms": 95.5, "img_per_s": 12.1},
                            "largest_batch": 16,
                            "first_failed_batch": 64,
                            "best_img_per_s": 20.4,
                            "batches": [
                                {
                                    "batch": 16,
                                    "status": "ok",
                                    "ms_per_batch": 784.3,
                                    "img_per_s": 20.4,
                                    "peak_mem_mib": 90000.0,
                                },
                                {"batch": 64, "status": "out of memory"},
                            ],
                        }
                    ],
                },
            },
            "training": {
                "title": "Training: Ray Train vs a bare loop",
                "status": "ok",
                "seconds": 80.0,
                "budget_s": 100,
                "reason": None,
                "error": None,
                "data": {
                    "device": "cuda",
                    "variant": "paper",
                    "crop_size": 128,
                    "cpus": 16,
                    "results": [bench_row, ray_row],
                    "ratio": 0.9,
                },
            },
            "starvation": {
                "title": "Training: data-loader starvation",
                "status": "failed",
                "seconds": 50.0,
                "budget_s": 50,
                "reason": None,
                "data": {},
                "error": [
                    "timed out after 50 s (budget); results measured until then are kept",
                    "RuntimeError: the pipeline | stalled",
                ],
            },
            "multi_gpu": {
                "title": "Multi-GPU",
                "status": "skipped",
                "seconds": 0.0,
                "data": {},
                "error": None,
                "reason": "torch sees 1 CUDA device(s) (NVIDIA H200); the multi-GPU check needs 2",
            },
        },
    }


def test_markdown_summary_of_a_json_report():
    report = json.loads(json.dumps(_report()))  # as read back from gpu-check.json
    text = format_markdown(report)
    lines = text.splitlines()
    assert lines[0] == "# GPU check"
    assert lines[2].startswith("NVIDIA H200; torch 2.9.0+cu128 (CUDA 12.8), Ray 2.60.0, 16 CPUs; commit 0123456789ab;")
    assert "| Model | ok | 120.0 s | 130 s |  |" in lines
    assert (
        "| Training: data-loader starvation | failed | 50.0 s | 50 s | timed out after 50 s (budget); results "
        "measured until then are kept |" in lines
    )
    assert (
        "| Multi-GPU | skipped | 0.0 s | - | torch sees 1 CUDA device(s) (NVIDIA H200); the multi-GPU check needs 2 |"
    ) in lines
    assert "| paper | train | bf16 | contiguous | yes | 250.0 | 72.00 | 20,480 | 358 | 36.2 % | 61.5 | ok |" in lines
    failed = "| restormer | train | fp32 | contiguous | no | - | - | - | - | - | - | failed: OutOfMemoryError: CUDA"
    assert failed + " out of memory. |" in lines
    assert "MFU = achieved FLOP/s / peak: bf16: H200 dense bf16 989.4 TFLOP/s." in lines
    assert "| 1024 | 80.0 | 95.5 | 12.10 | 20.40 | 16 | 64 |" in lines
    assert "| 1024 | 64 | - | - | - | out of memory |" in lines
    assert "ray_train/bare steps/s ratio: 0.90" in lines
    block = lines.index("```")
    assert lines[block + 1 : block + 4] == [
        "timed out after 50 s (budget); results measured until then are kept",
        "RuntimeError: the pipeline | stalled",
        "```",
    ]
    assert (
        "## Multi-GPU" in lines
        and "Skipped: torch sees 1 CUDA device(s) (NVIDIA H200); the multi-GPU check needs 2" in lines
    )


def test_markdown_of_a_multi_gpu_run_states_the_setup_and_the_equivalence_test():
    report = _report()
    report["steps"]["multi_gpu"].update(
        status="ok",
        reason=None,
        data={
            "command": ["python", "jobs/train.py", "num_workers=2"],
            "returncode": 0,
            "workers": 2,
            "gpus": 2,
            "reports": [{"step": 20, "samples_per_s": 300.0, "loss": 0.05}],
            "setup_line": "[train] global batch 36 (2/task x 9 tasks per worker x 2 workers); lr 0.0004",
            "ddp_equivalence_returncode": 1,
        },
    )
    lines = format_markdown(json.loads(json.dumps(report))).splitlines()
    assert "Stated at start: `[train] global batch 36 (2/task x 9 tasks per worker x 2 workers); lr 0.0004`." in lines
    assert "1-vs-2-worker DDP equivalence test on the GPUs: FAILED." in lines


TINY = [
    "model.variants=[paper_tiny]",
    "model.size=16",
    "model.batch=1",
    "model.dtypes=[fp32]",
    "model.channels_last=[false,true]",
    "model.compile_dtypes=[fp32]",
    "model.compile_backend=eager",
    "serving.sizes=[16,24]",
    "serving.batches=[1,2]",
    "serving.requests=2",
    "serving.batch_iters=1",
]


def test_cpu_mode_runs_model_and_serving_and_reports_a_failing_step(tmp_path, capsys):
    out = tmp_path / "out"
    missing = tmp_path / "no-dataset"
    code = main([str(CPU_YAML), f"out_dir={out}", "steps=[model,serving,training]", f"dataset.path={missing}", *TINY])
    assert code == 1  # the training step failed, the others ran
    report = json.loads((out / REPORT_JSON).read_text())
    assert (out / REPORT_MD).read_text() == format_markdown(report)
    assert load_config(GpuCheckConfig, out / "config.yaml").model.variants == ["paper_tiny"]
    steps = report["steps"]
    assert [(name, s["status"]) for name, s in steps.items()] == [
        ("model", "ok"),
        ("serving", "ok"),
        ("training", "failed"),
    ]

    model = steps["model"]["data"]
    runs = {(r["mode"], r["channels_last"], r["compiled"]): r for r in model["rows"]}
    assert set(runs) == {
        ("train", False, False),
        ("train", True, False),
        ("inference", False, False),
        ("inference", True, False),
        ("train", False, True),
        ("inference", False, True),
    }
    flops = model["gflop_per_image"]["paper_tiny"]
    assert 2.9 < flops["train"] / flops["inference"] <= 3.0
    for (mode, _, compiled), r in runs.items():
        assert r["status"] == "ok" and r["img_per_s"] > 0 and len(r["step_ms"]) == 2, r
        assert r["img_per_s"] == pytest.approx(1e3 / r["ms_per_step"])  # batch 1
        # MFU against the CPU test mode's nominal 1 TFLOP/s peak: FLOPs per step / median step time / peak
        assert r["mfu"] == pytest.approx(flops[mode] * 1e9 / (r["ms_per_step"] / 1e3) / 1e12)
        assert r["peak_mem_mib"] is None  # no CUDA allocator on the CPU
        assert (r.get("compile_s") or 0) > 0 if compiled else "compile_s" not in r
    assert model["max_rss_mib"] > 0 and model["peaks"]["fp32"] == "1.0 TFLOP/s set in the config"

    serving = steps["serving"]["data"]
    assert [s["size"] for s in serving["sizes"]] == [16, 24]
    for size in serving["sizes"]:
        assert 0 < size["latency"]["p50_ms"] <= size["latency"]["p99_ms"]
        assert [(b["batch"], b["status"]) for b in size["batches"]] == [(1, "ok"), (2, "ok")]
        assert size["largest_batch"] == 2 and size["first_failed_batch"] is None
        assert size["best_img_per_s"] == max(b["img_per_s"] for b in size["batches"])

    training = steps["training"]
    assert any(f"no dataset at {missing}" in line for line in training["error"]), training["error"]
    printed = capsys.readouterr().out
    assert "[gpu-check] Training: Ray Train vs a bare loop: failed" in printed and "| Serving | ok |" in printed


def test_a_step_past_its_budget_is_stopped_and_reported(tmp_path):
    out = tmp_path / "out"
    start = time.monotonic()
    code = main(
        [
            str(CPU_YAML),
            f"out_dir={out}",
            "steps=[serving]",
            "serving.budget_s=1",
            "serving.sizes=[256]",
            "serving.requests=1000",
        ]
    )
    assert code == 1 and time.monotonic() - start < 30
    serving = json.loads((out / REPORT_JSON).read_text())["steps"]["serving"]
    assert serving["status"] == "failed" and serving["error"][0].startswith("timed out after 1 s (budget)")
    assert "| Serving | failed |" in (out / REPORT_MD).read_text()


@pytest.mark.slow
@pytest.mark.ray
def test_cpu_mode_training_and_starvation(tmp_path, tiny_dataset):
    """The Ray steps of the CPU test mode on the tiny dataset: the training benchmark, the starvation measurement
    and the multi-GPU step's skip (about 2 minutes on 2 CPUs)."""
    out = tmp_path / "out"
    code = main(
        [
            str(CPU_YAML),
            f"out_dir={out}",
            "steps=[dataset,training,starvation,multi_gpu]",
            f"dataset.path={tiny_dataset}",
            "training.benchmark.crop_size=32",
            "starvation.steps=6",
        ]
    )
    report = json.loads((out / REPORT_JSON).read_text())
    steps = report["steps"]
    assert code == 0, {name: s["error"] for name, s in steps.items()}
    assert steps["dataset"]["data"]["built"] is False and steps["dataset"]["data"]["samples"]["train"] == 12
    training = steps["training"]["data"]
    assert [r["side"] for r in training["results"]] == ["bare", "ray_train"] and training["ratio"] > 0
    starvation = steps["starvation"]["data"]
    assert starvation["steps"] == 6 and 0 < starvation["wait_fraction"] < 1
    assert starvation["steps_per_pass"] == 4 and starvation["pass_starts"] == 1  # step 4 of the timed 2..7
    assert starvation["wait_s"] + starvation["step_s"] == pytest.approx(
        sum(starvation["wait_ms"][2:] + starvation["step_ms"][2:]) / 1e3
    )
    assert steps["multi_gpu"]["status"] == "skipped" and "needs 2" in steps["multi_gpu"]["reason"]
