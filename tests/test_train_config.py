"""The training job's typed model section, --dry-run, old keys, and the run check before Ray starts (no Ray here)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import types

import pytest
import yaml

from datprl.models import VARIANTS, create_model, save_model
from datprl.models.spec import ModelSpec
from datprl.platform.config import ConfigError, config_to_dict, load_config
from datprl.platform.train import fit as fit_module
from datprl.platform.train.config import TrainConfig
from datprl.platform.train.runs import RunMismatch, check_run, differences

from conftest import forbid_ray


def _resolved(*overrides: str):
    return load_config(TrainConfig, None, list(overrides)).model.resolve()


def test_partial_pool_override_keeps_the_variants_other_values():
    network = _resolved("model.variant=paper_tiny", "model.task_pool.top_k=4")
    assert (network.task_pool.size, network.task_pool.top_k) == (6, 4)  # size from paper_tiny, not the class default
    assert network.domain_pool == VARIANTS["paper_tiny"].domain_pool
    assert network.width == VARIANTS["paper_tiny"].width
    network = _resolved("model.variant=paper", "model.domain_pool.size=20")
    assert (network.domain_pool.size, network.domain_pool.top_k) == (20, 5)  # paper's top-5 survives
    assert network.task_pool == VARIANTS["paper"].task_pool


def test_overrides_of_scalars_and_pool_removal():
    network = _resolved("model.variant=paper_tiny", "model.prompt_dim=128", "model.domain_pool=null")
    assert network.prompt_dim == 128 and network.domain_pool is None and network.task_pool.size == 6
    assert create_model(network).domain_pool is None
    # order of overrides does not matter: the variant is applied first, the overrides on top
    assert _resolved("model.task_pool.top_k=2", "model.variant=paper").task_pool.size == 15


@pytest.mark.parametrize(
    "overrides, field, words",
    [
        (
            ["model.variant=paper_tiny", "model.task_pool.top_k=9"],
            "model.task_pool",
            "top_k=9 exceeds task_pool.size=6",
        ),
        (["model.variant=nope"], "model.variant", "paper_tiny"),
        (["model.variant=paper", "model.task_pool=null"], "model", "a domain pool needs a task pool"),
        (["model.prompt_dim=0"], "model", "prompt_dim"),
    ],
)
def test_bad_model_sections_name_the_field(overrides, field, words):
    with pytest.raises(ConfigError) as err:
        load_config(TrainConfig, None, overrides)
    assert f"{field}:" in str(err.value) and words in str(err.value)


def test_a_task_named_twice_is_refused_with_the_knob_to_use():
    # The batcher would take per_task_batch samples for each entry: a silent double weight.
    with pytest.raises(ConfigError) as err:
        load_config(TrainConfig, None, ["data.tasks=[sr_x4, haze, sr_x4]"])
    assert "data.tasks:" in str(err.value) and "['sr_x4']" in str(err.value) and "per_task_batch" in str(err.value)
    assert load_config(TrainConfig, None, ["data.tasks=[sr_x4, haze]"]).data.tasks == ["sr_x4", "haze"]


def test_unknown_model_key_is_named():
    with pytest.raises(ConfigError, match=r"unknown key 'model.task_pool.sizes'; valid keys at model.task_pool: size"):
        load_config(TrainConfig, None, ["model.task_pool.sizes=3"])


def test_old_keys_migrate_or_fail_clearly(tmp_path, capsys):
    old = tmp_path / "old.yaml"
    old.write_text("variant: task_only_tiny\nsteps: 5\n")
    config = load_config(TrainConfig, old)
    assert config.model.variant == "task_only_tiny" and config.steps == 5
    assert "'variant' in" in capsys.readouterr().err
    assert load_config(TrainConfig, None, ["variant=paper"]).model.variant == "paper"
    both = tmp_path / "both.yaml"
    both.write_text("variant: paper\nmodel: {variant: paper_tiny}\n")
    with pytest.raises(ConfigError, match="both are given"):
        load_config(TrainConfig, both)
    removed = tmp_path / "removed.yaml"
    removed.write_text("model_overrides: {task_pool: {top_k: 4}}\n")
    with pytest.raises(ConfigError, match=r"model_overrides.*model\.task_pool\.size=20"):
        load_config(TrainConfig, removed)


def test_saved_config_round_trips_with_the_model_section(tmp_path):
    from datprl.platform.config import save_resolved_config

    overrides = ["model.variant=paper", "model.task_pool.top_k=4", "model.domain_pool=null"]
    config = load_config(TrainConfig, None, overrides)
    again = load_config(TrainConfig, save_resolved_config(config, tmp_path / "c.yaml"))
    assert again == config and again.model.resolve() == config.model.resolve()


def test_dry_run_prints_the_resolved_config_and_starts_nothing(repo_root):
    started = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "jobs/train.py", "--dry-run", "model.variant=paper_tiny", "model.task_pool.top_k=4"],
        cwd=repo_root,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert time.perf_counter() - started < 10
    config_doc, network_doc = yaml.safe_load_all(out.stdout)
    assert config_doc["model"]["variant"] == "paper_tiny" and config_doc["model"]["task_pool"]["top_k"] == 4
    assert network_doc["task_pool"] == {
        "size": 6,
        "top_k": 4,
        "query_centering": None,
        "fixed_keys": False,
        "routing": "unsupervised",
    }
    assert "Started a local Ray" not in out.stdout + out.stderr


def test_bad_model_field_fails_fast_naming_it(repo_root):
    started = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "jobs/train.py", "model.variant=paper_tiny", "model.task_pool.top_k=9"],
        cwd=repo_root,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and time.perf_counter() - started < 10
    assert "model.task_pool" in out.stderr and "top_k=9" in out.stderr
    assert "Traceback" not in out.stderr


# --- the run check -------------------------------------------------------------------------------------------------


def _fake_checkpoint(run_dir, saved: dict, step: int | None, name: str = "checkpoint_2026-01-01_00-00-00.000000"):
    """A checkpoint folder as the training loop writes it (config.json, progress.json or only state.pt)."""
    folder = run_dir / name
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(saved))
    if step is not None:
        (folder / "progress.json").write_text(json.dumps({"step": step, "steps": saved["steps"]}))
    return folder


def _config(tmp_path, *overrides: str) -> TrainConfig:
    return load_config(
        TrainConfig,
        None,
        [f"storage={tmp_path / 'runs'}", f"output_dir={tmp_path / 'out'}", "name=r", "steps=20", *overrides],
    )


def test_a_mismatched_run_is_refused_naming_fields_and_fix(tmp_path):
    trained = _config(tmp_path, "model.variant=paper_tiny")
    _fake_checkpoint(tmp_path / "runs" / "r", config_to_dict(trained), step=10)
    other = _config(tmp_path, "model.variant=task_only_tiny", "data.crop_size=64")
    with pytest.raises(RunMismatch) as err:
        check_run(other)
    message = str(err.value)
    assert "model.domain_pool.size" in message and "data.crop_size" in message
    assert "name=" in message and "resume=false" in message
    assert check_run(trained).kind == "resume" and check_run(trained).step == 10
    # fields that do not change the training may differ between attempts
    assert check_run(_config(tmp_path, "model.variant=paper_tiny", "num_workers=2", "log_every=7")).kind == "resume"


def test_a_run_on_a_rebuilt_dataset_is_refused(tmp_path):
    trained = _config(tmp_path)
    folder = _fake_checkpoint(tmp_path / "runs" / "r", config_to_dict(trained), step=10)
    (folder / "progress.json").write_text(json.dumps({"step": 10, "steps": 20, "dataset_manifest_sha256": "a" * 64}))
    assert check_run(trained, "a" * 64).kind == "resume"
    assert check_run(trained).kind == "resume"  # nothing to compare against: the config alone decides
    rebuilt = r"dataset content \(sha256 of .*\): 'aaaaaaaaaaaa' in the run, 'bbbbbbbbbbbb' asked for"
    with pytest.raises(RunMismatch, match=rebuilt):
        check_run(trained, "b" * 64)


def test_the_same_network_spelled_differently_is_the_same_run(tmp_path):
    trained = _config(tmp_path, "model.variant=paper_tiny", "model.task_pool.top_k=4")
    explicit = _config(tmp_path, "model.variant=paper_tiny", "model.task_pool={size: 6, top_k: 4}")
    assert differences(config_to_dict(trained), config_to_dict(explicit)) == []


def test_a_checkpoint_from_before_the_typed_section_is_compared_by_its_network(tmp_path):
    import torch

    old = config_to_dict(_config(tmp_path))
    old.pop("model")
    old.update(variant="paper_tiny", model_overrides={"prompt_dim": 32})
    folder = _fake_checkpoint(tmp_path / "runs" / "r", old, step=None)
    torch.save({"step": 20}, folder / "state.pt")  # old checkpoints: the step is only in the training state
    assert check_run(_config(tmp_path, "model.prompt_dim=32")).kind == "complete"
    with pytest.raises(RunMismatch, match="model.prompt_dim: 32 in the run, 64 asked for"):
        check_run(_config(tmp_path))


def test_main_stops_before_ray_on_a_mismatch_and_on_a_complete_run(tmp_path, monkeypatch, capsys):
    forbid_ray(monkeypatch, fit_module)
    from conftest import write_tiny_dataset

    dataset = write_tiny_dataset(tmp_path / "data")
    args = [
        f"storage={tmp_path / 'runs'}",
        f"output_dir={tmp_path / 'out'}",
        "name=r",
        "steps=20",
        f"data.dataset={dataset}",
        "build_dataset_if_missing=false",
    ]
    trained = load_config(TrainConfig, None, args)
    _fake_checkpoint(tmp_path / "runs" / "r", config_to_dict(fit_module.prepare(trained).config), step=20)
    save_model(create_model("paper_tiny"), tmp_path / "out" / "model")
    before = sorted(p.name for p in (tmp_path / "out").iterdir())

    assert fit_module.main([*args, "variant=task_only_tiny"]) == 2
    err = capsys.readouterr().err
    assert "model.domain_pool" in err and "name=<another name>" in err and "resume=false" in err

    assert fit_module.main(args) == 0
    assert "already complete (20/20 steps)" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == before  # no output rewritten


def test_a_new_run_keeps_an_earlier_runs_metrics_log_apart(tmp_path, monkeypatch, capsys):
    """A new run in an output_dir that holds another run's metrics.jsonl starts its own log (the old one is renamed,
    not appended to, not deleted); a resumed run appends to its own. build_trainer, which every trainer of the
    training, tune and benchmark jobs goes through, does it."""
    from conftest import write_tiny_dataset

    import ray.train.torch

    calls = []
    real_build_trainer = fit_module.build_trainer

    class StoppedTrainer:  # the TorchTrainer build_trainer makes, stopped before Ray would train
        def __init__(self, *args, **kwargs):
            pass

        def fit(self):
            return types.SimpleNamespace(error="stopped by the test")

    # No Ray: the real fit() and build_trainer() up to the trainer's own fit().
    monkeypatch.setattr(fit_module, "ray_session", lambda *args, **kwargs: contextlib.nullcontext())
    monkeypatch.setattr(fit_module, "init_ray", lambda *args, **kwargs: None)
    monkeypatch.setattr(fit_module, "ensure_priors", lambda config: None)
    monkeypatch.setattr(fit_module, "use_decoded_cache", lambda *args, **kwargs: False)
    monkeypatch.setattr(fit_module, "read_split", lambda *args, **kwargs: None)
    monkeypatch.setattr(ray.train.torch, "TorchTrainer", StoppedTrainer)
    monkeypatch.setattr(
        fit_module,
        "build_trainer",
        lambda run, callbacks=(): calls.append(run.status.kind) or real_build_trainer(run, callbacks),
    )
    dataset = write_tiny_dataset(tmp_path / "data")
    out = tmp_path / "out"
    out.mkdir()
    earlier = '{"step": 3000, "resumed_from_step": 0}\n'
    (out / "metrics.jsonl").write_text(earlier)
    config = _config(tmp_path, f"data.dataset={dataset}", "build_dataset_if_missing=false", "name=another")
    assert fit_module.train_and_evaluate(config) == 1 and calls == ["new"]
    assert not (out / "metrics.jsonl").exists()
    (kept,) = out.glob("metrics.*.jsonl")
    assert kept.read_text() == earlier and kept.name in capsys.readouterr().out
    assert fit_module.set_aside_metrics_log(out / "metrics.jsonl") is None  # nothing to set aside

    # The same run launched again resumes: its log is its own and stays where it is.
    (out / "metrics.jsonl").write_text('{"step": 10, "resumed_from_step": 0}\n')
    _fake_checkpoint(tmp_path / "runs" / "another", config_to_dict(fit_module.prepare(config).config), step=10)
    assert fit_module.train_and_evaluate(config) == 1 and calls == ["new", "resume"]
    assert (out / "metrics.jsonl").exists() and sorted(out.glob("metrics.*.jsonl")) == [kept]

    # Two set-aside logs with the same time stamp get distinct names.
    (out / "metrics.jsonl").write_text("x\n")
    stamp = kept.stat().st_mtime
    os.utime(out / "metrics.jsonl", (stamp, stamp))
    second = fit_module.set_aside_metrics_log(out / "metrics.jsonl")
    assert second != kept and second.read_text() == "x\n" and kept.read_text() == earlier


def test_resume_false_deletes_the_old_run(tmp_path):
    from datprl.platform.train.runs import delete_run

    config = _config(tmp_path, "resume=false")
    _fake_checkpoint(tmp_path / "runs" / "r", config_to_dict(_config(tmp_path, "model.variant=task_only_tiny")), 5)
    assert delete_run(config) and not (tmp_path / "runs" / "r").exists()
    assert check_run(config).kind == "new" and not delete_run(config)


def test_model_spec_describe():
    spec = ModelSpec.model_validate({"variant": "paper", "task_pool": {"top_k": 4}, "domain_pool": None})
    assert spec.describe() == "paper (task_pool.top_k=4, domain_pool=null)"
    assert ModelSpec().describe() == "paper_tiny"


def test_the_driver_reads_the_manifest_once(tmp_path, monkeypatch):
    """prepare() opens the dataset once; the handle then answers tasks, counts and shard sizes without re-reading."""
    from conftest import write_tiny_dataset

    from datprl.platform.data import handle as handle_module
    from datprl.platform.data.pipeline import split_tasks, use_decoded_cache

    dataset = write_tiny_dataset(tmp_path / "data")
    reads = []
    real = handle_module.storage.read_bytes
    monkeypatch.setattr(handle_module.storage, "read_bytes", lambda url, s3=None: reads.append(url) or real(url, s3))
    run = fit_module.prepare(_config(tmp_path, f"data.dataset={dataset}", "data.cache_decoded=true"))
    assert run.tasks == ["ct_low_dose", "haze", "sr_x4"] and run.status.kind == "new"
    assert run.dataset.samples_per_task("train") == {"ct_low_dose": 4, "haze": 4, "sr_x4": 4}
    assert split_tasks(run.config.data, "train", run.dataset) == run.tasks
    assert use_decoded_cache(run.config.data, "train", run.dataset) is True
    assert len(run.dataset.shard_urls("train")) == 1 and run.dataset.shard_bytes("train") > 0
    assert len(reads) == 1 and reads[0].endswith("manifest.json")
    assert len(run.dataset.manifest_sha256) == 64


def test_placement_strategy_reaches_ray_trains_scaling_config(tmp_path, monkeypatch):
    """``placement_strategy`` (default PACK, Ray's) goes to the trainer's ScalingConfig with the elastic worker range;
    a value Ray does not know is refused naming the field. No Ray: the dataset read and the trainer are stand-ins."""
    import ray.train.torch

    from conftest import write_tiny_dataset

    assert TrainConfig().placement_strategy == "PACK" == ray.train.ScalingConfig().placement_strategy
    with pytest.raises(ConfigError, match="placement_strategy"):
        _config(tmp_path, "placement_strategy=EVERYWHERE")
    dataset = write_tiny_dataset(tmp_path / "data")
    config = _config(
        tmp_path,
        f"data.dataset={dataset}",
        "data.cache_decoded=false",
        "placement_strategy=SPREAD",
        "num_workers=[1,2]",
        "cpus_per_worker=0.5",
        "text_embeddings=null",
    )
    monkeypatch.setattr(fit_module, "read_split", lambda *args, **kwargs: "train split")
    monkeypatch.setattr(ray.train.torch, "TorchTrainer", lambda loop, **kwargs: kwargs)
    kwargs = fit_module.build_trainer(fit_module.prepare(config))
    scaling = kwargs["scaling_config"]
    assert (scaling.placement_strategy, scaling.num_workers) == ("SPREAD", (1, 2))
    assert scaling.resources_per_worker == {"CPU": 0.5} and kwargs["datasets"] == {"train": "train split"}


def test_more_steps_continue_a_run_fewer_find_it_complete(tmp_path):
    trained = _config(tmp_path)  # steps=20
    _fake_checkpoint(tmp_path / "runs" / "r", config_to_dict(trained), step=20)
    assert check_run(trained).kind == "complete"
    longer = check_run(_config(tmp_path, "steps=30"))
    assert (longer.kind, longer.step, longer.previous_steps) == ("resume", 20, 20)
    assert check_run(_config(tmp_path, "steps=10")).kind == "complete"


def test_the_run_check_reads_checkpoints_on_s3(s3_server):
    """Run storage on s3:// (shared storage of a cluster): the same check, through the run's filesystem."""
    import boto3

    from datprl.platform.storage import S3Settings, atomic_write_bytes
    from datprl.platform.train.runs import delete_run

    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket="runs")
    s3 = {"endpoint_url": s3_server}
    trained = load_config(TrainConfig, None, ["storage=s3://runs/prefix", "name=r", "steps=20"]).model_copy(
        update={"s3": S3Settings(**s3)}
    )
    assert check_run(trained).kind == "new"
    folder = "s3://runs/prefix/r/checkpoint_2026-01-01_00-00-00.000000"
    atomic_write_bytes(f"{folder}/config.json", json.dumps(config_to_dict(trained)).encode(), trained.s3)
    atomic_write_bytes(f"{folder}/progress.json", json.dumps({"step": 7, "steps": 20}).encode(), trained.s3)
    assert (check_run(trained).kind, check_run(trained).step) == ("resume", 7)
    other = trained.model_copy(update={"model": ModelSpec(variant="task_only_tiny")})
    with pytest.raises(RunMismatch, match="model.domain_pool.size"):
        check_run(other)
    assert delete_run(trained) and check_run(trained).kind == "new"


@pytest.mark.parametrize("name", ["train-cluster.yaml", "train-gpu.yaml", "train-local.yaml", "train-quality.yaml"])
def test_every_training_recipe_loads_and_names_its_launch_command(repo_root, name):
    path = repo_root / "infra" / name
    config = load_config(TrainConfig, path)  # every field validated, unknown keys refused
    header = path.read_text().split("\n\n", 1)[0]
    assert f"python jobs/train.py infra/{name}" in header
    if name == "train-gpu.yaml":  # the paper's settings (Sec. 4.1): batch 2 per task, 128 px, lr 4e-4, 1M iterations
        assert config.model.variant == "paper" and config.use_gpu is True and config.loss.input_relative == "none"
        assert (config.data.crop_size, config.optim.lr, config.steps) == (128, 4e-4, 1_000_000)
