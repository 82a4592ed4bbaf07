"""datprl.platform.bench.model: a tiny end-to-end run returns a complete, positive report."""

from __future__ import annotations

import json

import pytest

from datprl.platform.bench.model import ModelBenchmarkConfig, format_report, main, run_benchmark
from datprl.platform.config import ConfigError, load_config

TINY = dict(variants=["paper_tiny", "restormer_tiny"], size=16, batch=1, warmup=0, rounds=1, device="cpu")


def test_tiny_run_reports_throughput_and_ratio() -> None:
    report = run_benchmark(ModelBenchmarkConfig(**TINY))
    rows = report["results"]
    assert [r["variant"] for r in rows] == ["paper_tiny", "restormer_tiny"]
    for r in rows:
        assert r["img_per_s"] > 0 and r["ms_per_iter"] > 0 and r["params"] > 0
        assert (r["batch"], r["size"], r["device"], r["dtype"]) == (1, 16, "cpu", "fp32")
        assert len(r["step_ms"]) == 1
    assert rows[0]["params"] > rows[1]["params"]  # the prompt machinery adds parameters
    ratio = report["ratios"]["fp32"]["paper_tiny/restormer_tiny"]
    assert ratio == pytest.approx(rows[0]["img_per_s"] / rows[1]["img_per_s"])
    text = format_report(report)
    assert "| paper_tiny |" in text and f"paper_tiny/restormer_tiny throughput ratio: {ratio:.2f}" in text


def test_cli_writes_json(tmp_path, capsys) -> None:
    out = tmp_path / "bench.json"
    argv = [f"{k}={json.dumps(v)}" for k, v in TINY.items()] + ["dtypes=[fp32,bf16]", f"json_out={out}"]
    assert main(argv) == 0
    report = json.loads(out.read_text())
    assert {r["dtype"] for r in report["results"]} == {"fp32", "bf16"}
    assert set(report["ratios"]) == {"fp32", "bf16"}
    assert "throughput ratio" in capsys.readouterr().out


@pytest.mark.parametrize("override", ["variants=[nope]", "dtypes=[fp16]", "variants=[paper,paper]"])
def test_bad_options_are_config_errors(override: str) -> None:
    with pytest.raises(ConfigError):
        load_config(ModelBenchmarkConfig, overrides=[override])


def test_compute_benchmark_times_every_arm_against_the_first(tmp_path, capsys) -> None:
    """datprl.platform.bench.compute: every arm's real training step is timed, the first arm is the baseline, and an
    arm added on the command line (here fp16) takes part."""
    from datprl.platform.bench.compute import main as compute_main

    out = tmp_path / "compute.json"
    argv = [
        "size=16",
        "batch=2",
        "warmup=1",
        "rounds=2",
        "steps=1",
        "threads=1",
        "device=cpu",
        "arms.fp16.precision=fp16",
        f"json_out={out}",
    ]
    assert compute_main(argv) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["arm"] for r in rows] == ["default", "adam fused", "adam for_loop", "channels_last", "bf16", "fp16"]
    assert rows[0]["speedup_vs_baseline"] == pytest.approx(1.0)
    assert {r["precision"] for r in rows} == {"fp32", "bf16", "fp16"} and rows[0]["adam"] == "foreach"
    for r in rows:
        assert 0 < r["min_ms"] <= r["median_ms"] <= r["max_ms"] and r["last_loss"] == r["last_loss"]  # not NaN
        assert r["speedup_vs_baseline"] == pytest.approx(rows[0]["median_ms"] / r["median_ms"])
    assert "| channels_last | fp32 | foreach | True | False |" in capsys.readouterr().out
