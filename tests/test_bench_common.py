"""What the benchmarks share (datprl.platform.bench.common) and the builder's ensure_dataset, without Ray."""

from __future__ import annotations

import json
import os

import pytest

from datprl.platform.bench import common
from datprl.platform.bench.data import DataBenchmarkConfig
from datprl.platform.bench.model import ModelBenchmarkConfig
from datprl.platform.config import ConfigError, load_config
from datprl.platform.data import build as builder


@pytest.fixture
def builds(monkeypatch):
    """Replaces the dataset build with a recorder: the calls ensure_dataset makes, without building anything."""
    calls = []
    monkeypatch.setattr(builder, "build", lambda config, command=None: calls.append((config, command)) or {})
    return calls


def test_existing_dataset_is_left_alone(tiny_dataset, builds, capsys):
    assert builder.ensure_dataset(str(tiny_dataset)) is False
    assert common.ensure_dataset(str(tiny_dataset), "jobs/benchmark_data.py") is False
    assert builds == [] and capsys.readouterr().out == ""


def test_missing_dataset_builds_the_default_corpus_there(tmp_path, builds, capsys):
    target = str(tmp_path / "corpus")
    assert common.ensure_dataset(target, "jobs/benchmark_train.py") is True
    ((config, command),) = builds
    assert config.output == target and config.s3 is None and config.paired is None and config.clean is None
    assert command == ["jobs/benchmark_train.py", f"dataset={target}"]
    assert f"no dataset at {target}" in capsys.readouterr().out
    assert builder.ensure_dataset(target, command=("jobs/train.py",)) is True and builds[1][1] == ["jobs/train.py"]


def test_missing_dataset_without_building_names_the_fix(tmp_path, builds):
    with pytest.raises(FileNotFoundError, match="jobs/build_dataset.py output="):
        builder.ensure_dataset(str(tmp_path / "none"), build_if_missing=False)
    assert builds == []


def test_ensure_dataset_checks_the_manifest_in_a_bucket(s3_server, builds):
    import boto3

    from datprl.platform.storage import S3Settings, atomic_write_bytes

    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket="ensure")
    s3 = S3Settings(endpoint_url=s3_server)
    url = "s3://ensure/corpus"
    assert builder.ensure_dataset(url, s3) is True
    assert builds[0][0].output == url and builds[0][0].s3 == s3
    atomic_write_bytes(f"{url}/manifest.json", b"{}", s3)  # presence is enough: readers validate the manifest
    assert builder.ensure_dataset(url, s3) is False and len(builds) == 1


def test_save_report_writes_readable_json_atomically(tmp_path, capsys):
    path = tmp_path / "deep" / "report.json"
    common.save_report({"ratio": 1.5, "rows": [1, 2]}, path)
    assert json.loads(path.read_text()) == {"ratio": 1.5, "rows": [1, 2]}
    assert os.stat(path).st_mode & 0o777 == 0o644 and os.listdir(path.parent) == ["report.json"]
    assert f"results written to {path}" in capsys.readouterr().out
    common.save_report({"x": 1}, None)  # no path: nothing written, nothing said
    assert capsys.readouterr().out == "" and os.listdir(path.parent) == ["report.json"]


@pytest.mark.parametrize(
    "schema,override,message",
    [
        (DataBenchmarkConfig, "consumers=[iterate_rows,iterate_rows]", "must not repeat"),
        (ModelBenchmarkConfig, "dtypes=[fp32,fp32]", "must not repeat"),
        (ModelBenchmarkConfig, "variants=[restormer,restormer]", "must not repeat"),
        (DataBenchmarkConfig, "dataset=s3://bucket/ds", "local dataset folder"),
    ],
)
def test_shared_option_checks_name_the_problem(schema, override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(schema, overrides=[override])
