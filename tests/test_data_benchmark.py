"""datprl.platform.bench.data: a tiny end-to-end run compares both sides on equal work and reports a ratio."""

from __future__ import annotations

import json

import pytest

from datprl.platform.config import ConfigError, load_config
from datprl.platform.bench.data import DataBenchmarkConfig, format_report, main


@pytest.mark.ray
def test_tiny_run_compares_equal_work(ray_local, tiny_dataset, tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = [
        f"dataset={tiny_dataset}",
        "passes=1",
        "warmup=0",
        "crop_size=32",
        "batch_size=6",
        "shuffle_buffer=4",
        f"json_out={out}",
    ]
    assert main(argv) == 0
    report = json.loads(out.read_text())
    rows = report["results"]
    uncached, decoded_once = "training_batches[decode every pass]", "baseline[decoded once]"
    assert [r["consumer"] for r in rows] == ["baseline", "training_batches", "iterate_rows", uncached, decoded_once]
    assert [r["decoded_cache"] for r in rows] == [False, True, True, False, True]  # auto: the tiny split fits
    assert report["decoded_cache"] and report["cache_build_s"] > 0 and report["baseline_cache_build_s"] > 0
    assert report["train_samples"] == 12 and report["train_shards"] == 1 and report["per_task"] == 2
    for r in rows:  # every side handed out every sample once, as the same float32 3 x crop x crop samples
        assert r["samples_per_pass"] == 12 and r["corrupt_per_pass"] == 0
        assert (r["lq_shape"], r["lq_dtype"]) == ([3, 32, 32], "float32")
        assert r["samples_per_s"] > 0 and len(r["pass_s"]) == 1 and r["warmup_s"] == []
    assert rows[1]["emitted_per_pass"] == 6 * rows[1]["batches_per_pass"]  # balanced batches of 3 tasks x 2
    ratio = report["ratios"]["ray_pipeline/baseline"]
    assert ratio == pytest.approx(rows[1]["samples_per_s"] / rows[0]["samples_per_s"])
    amortised = (rows[1]["samples_per_pass"] / (report["cache_build_s"] + rows[1]["pass_s"][0])) / (
        rows[0]["samples_per_pass"] / rows[0]["pass_s"][0]
    )
    assert report["ratios"]["ray_pipeline/baseline incl. cache build"] == pytest.approx(amortised)
    assert report["ratios"]["ray_pipeline/baseline[decoded once]"] == pytest.approx(
        rows[1]["samples_per_s"] / rows[4]["samples_per_s"]
    )
    assert not any("[baseline" in name for name in report["ratios"])  # per-consumer ratios are Ray's sides only
    printed = capsys.readouterr().out
    assert f"ray_pipeline/baseline throughput ratio: {ratio:.2f}" in printed
    assert printed.count("| ray_data |") == 3 and printed.count("| webdataset+DataLoader |") == 2
    assert format_report(report) in printed


@pytest.mark.ray
def test_without_the_cache_every_ray_side_decodes_every_pass(ray_local, tiny_dataset, tmp_path):
    out = tmp_path / "bench.json"
    argv = [
        f"dataset={tiny_dataset}",
        "passes=1",
        "warmup=0",
        "crop_size=32",
        "batch_size=6",
        "cache_decoded=false",
        "consumers=[training_batches]",
        f"json_out={out}",
    ]
    assert main(argv) == 0
    report = json.loads(out.read_text())
    assert [r["consumer"] for r in report["results"]] == ["baseline", "training_batches"]
    assert not report["decoded_cache"] and report["cache_build_s"] == 0
    assert "ray_pipeline/baseline incl. cache build" not in report["ratios"]


@pytest.mark.parametrize(
    "override", ["dataset=s3://bucket/ds", "consumers=[iterate_rows,iterate_rows]", "consumers=[nope]", "passes=0"]
)
def test_bad_options_are_config_errors(override: str) -> None:
    with pytest.raises(ConfigError):
        load_config(DataBenchmarkConfig, overrides=[override])
