"""datprl.platform.bench.train: a tiny end-to-end run times both loops on equal work and reports their ratio."""

from __future__ import annotations

import json

import numpy as np
import pytest

from datprl.platform.config import ConfigError, load_config
from datprl.platform.bench.train import TrainBenchmarkConfig, format_report, main

from conftest import TINY_TASKS as TASKS


@pytest.mark.ray
@pytest.mark.e2e
def test_tiny_run_times_equal_work(ray_local, tiny_dataset, tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = [
        f"dataset={tiny_dataset}",
        "variant=paper_tiny",
        "crop_size=32",
        "per_task_batch=2",
        "steps=4",
        "warmup_steps=1",
        "report_every=1",
        "rounds=1",
        "threads=1",
        "shuffle_buffer=4",
        f"json_out={out}",
    ]
    assert main(argv) == 0
    report = json.loads(out.read_text())
    bare, ray_train = report["results"]
    assert (bare["side"], ray_train["side"]) == ("bare", "ray_train")
    assert report["data"]["tasks"] == sorted(t for _, t in TASKS) and report["data"]["steps_per_pass"] == 2
    for side in (bare, ray_train):  # same timed steps on the same batches (3 tasks x 2), one round each
        assert (side["batch_size"], side["timed_steps"]) == (6, 4)
        assert len(side["round_steps_per_s"]) == 1 and len(side["window_steps_per_s"]) == 4
        assert side["steps_per_s"] > 0 and side["samples_per_s"] == pytest.approx(6 * side["steps_per_s"])
        assert np.isfinite(side["last_loss"]).all()
    assert len(ray_train["e2e_s"]) == 1 and ray_train["e2e_s"][0] > 4 / ray_train["steps_per_s"]
    assert ray_train["corrupt"] == [0]
    assert report["ratio"] == pytest.approx(ray_train["steps_per_s"] / bare["steps_per_s"])
    printed = capsys.readouterr().out
    assert f"ray_train/bare steps/s ratio: {report['ratio']:.2f}" in printed
    assert format_report(report) in printed


@pytest.mark.parametrize(
    "override",
    [
        "dataset=s3://bucket/ds",
        "steps=0",
        "steps=15",
        "warmup_steps=5",
        "warmup_steps=0",
        "cpus_per_worker=2",
        "rounds=0",
        "threads=0",
        "omp_wait_policy=spin",
        "nope=1",
    ],
)
def test_bad_options_are_config_errors(override: str) -> None:
    with pytest.raises(ConfigError):
        load_config(TrainBenchmarkConfig, overrides=[override])


@pytest.mark.e2e  # no Ray, but 40 s on a busy 2-core machine (every arm builds, trains and validates a network)
def test_recipes_are_timed_interleaved_on_equal_steps(tiny_dataset, tmp_path, capsys):
    """The recipe benchmark on the tiny corpus (no Ray, no priors table: every arm without text embeddings): each
    arm takes the same timed steps in windows, validation is timed where the arm validates, the ratios divide by the
    baseline and the costs subtract from the reference."""
    from datprl.platform.bench.recipes import main as recipes_main

    out = tmp_path / "recipes.json"
    arms = (
        "arms={today: [data.crop_size=16, text_embeddings=null, evaluate_split=train, validation_crop=16, "
        "validate_every=10], "
        "first_release: [data.crop_size=16, text_embeddings=null, loss.input_relative=none, model.domain_pool.size=6, "
        "model.domain_pool.fixed_keys=false, torch_threads=null, evaluate_split=train, validation_crop=16, "
        "validate_every=10], no_validation: [data.crop_size=16, text_embeddings=null, validate_every=null]}"
    )
    argv = [f"dataset={tiny_dataset}", arms, "steps=4", "window=2", "warmup_steps=0", "validations=1"]
    assert recipes_main([*argv, f"json_out={out}"]) == 0
    report = json.loads(out.read_text())
    rows = {r["arm"]: r for r in report["results"]}
    assert list(rows) == ["today", "first_release", "no_validation"]
    for row in rows.values():
        assert row["timed_steps"] == 4 and len(row["step_ms_windows"]) == 2 and np.isfinite(row["last_loss"])
        assert row["samples_per_s"] == pytest.approx(1000 * row["batch_size"] / row["ms_per_step"])
    assert rows["first_release"]["threads"] == 1 and rows["today"]["threads"] == 2
    assert len(rows["today"]["validation_ms_runs"]) == 1 and rows["no_validation"]["validation_ms_runs"] == []
    assert rows["today"]["validation_ms_per_step"] == pytest.approx(rows["today"]["validation_ms"] / 10)
    assert rows["first_release"]["ratio"] == pytest.approx(1.0)
    assert rows["today"]["ratio"] == pytest.approx(
        rows["today"]["samples_per_s"] / rows["first_release"]["samples_per_s"]
    )
    assert rows["no_validation"]["cost_ms_per_step"] == pytest.approx(
        rows["today"]["ms_per_step"] - rows["no_validation"]["ms_per_step"]
    )
    printed = capsys.readouterr().out
    assert f"today/first_release samples/s ratio: {rows['today']['ratio']:.2f}" in printed


@pytest.mark.parametrize("override", ["steps=7", "baseline=nope", "reference=nope", "window=0", "validations=-1"])
def test_bad_recipe_options_are_config_errors(override: str) -> None:
    from datprl.platform.bench.recipes import RecipeBenchmarkConfig

    with pytest.raises(ConfigError):
        load_config(RecipeBenchmarkConfig, overrides=[override])


def test_a_bad_arm_override_names_the_arm(tiny_dataset) -> None:
    from datprl.platform.bench.recipes import RecipeBenchmarkConfig, arm_config

    config = load_config(RecipeBenchmarkConfig, overrides=[f"dataset={tiny_dataset}"])
    with pytest.raises(ConfigError, match="arm 'x'.*nope"):
        arm_config(config, "x", ["loss.nope=1"])
