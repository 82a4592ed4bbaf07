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
