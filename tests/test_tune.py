"""The tune job (datprl.platform.tune): its config refuses bad searches before Ray starts, the define-by-run space
never draws a top-k above its pool's size, the outputs are computed from the trials' numbers (table, CSV, best config
that the training job loads, Optuna study in SQLite), and a sweep on S3 (moto) resumes after its driver is killed
without rerunning a finished trial or losing more than a running trial's steps since its last checkpoint."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from datprl.platform.config import ConfigError, load_config
from datprl.platform.train.config import TrainConfig
from datprl.platform.tune.config import TuneConfig, parameter_names, trial_train_config
from datprl.platform.tune.report import (
    TrialRow,
    best_row,
    spearman,
    trial_rows,
    tune_csv,
    tune_markdown,
    write_outputs,
)
from datprl.platform.tune.sweep import DefineByRun, SweepError, check_resources, main, prepare_sweep

from conftest import REPO_ROOT, forbid_ray, stop_session

TASKS = [("natural", "sr_x4"), ("remote_sensing", "haze")]


def write_split_dataset(root: Path) -> Path:
    """Two tasks with train (4 each), val and test (2 each) of 40x40 RGB pairs (clean: smooth random; degraded: the
    clean plus noise): the smallest dataset a sweep validates on both splits."""
    from datprl.platform.data.format import SampleRecord
    from datprl.platform.data.shards import DatasetWriter

    rng = np.random.default_rng(0)
    counts = {"train": 4, "val": 2, "test": 2}
    with DatasetWriter(str(root), "tiny-splits", max_samples_per_shard=16, command=["test"], package_versions={}) as w:
        for split, n in counts.items():
            for i in range(n):
                for domain, task in TASKS:
                    gt = np.kron(rng.integers(0, 256, (10, 10, 3)), np.ones((4, 4, 1))).astype(np.uint8)
                    lq = np.clip(gt + rng.normal(0, 20, gt.shape), 0, 255).astype(np.uint8)
                    record = SampleRecord(
                        key=f"{split}-{task}-{i}",
                        domain=domain,
                        task=task,
                        split=split,
                        source_id=f"{split}{i}",
                        source_package="test",
                        degradation={"seed": i},
                        seed=i,
                        bit_depth=8,
                        channels=3,
                        height=40,
                        width=40,
                        white_level=None,
                    )
                    w.write(record, lq, gt)
    return root


def _config(**overrides) -> TuneConfig:
    return load_config(TuneConfig, overrides=[f"{k}={v}" for k, v in overrides.items()])


# --- config: bad input fails before Ray starts ---------------------------------------------------------------------
@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("space.task_pool.top_k={low: 4, high: 4}", r"space\.task_pool: .*top_k\.low=4 exceeds size\.low=3.*use top_k"),
        ("space.domain_pool.top_k.high=20", r"space\.domain_pool: .*top_k\.high=20 exceeds size\.high=15"),
        ("space.task_pool.size={low: 9, high: 4}", r"space\.task_pool\.size: empty or reversed range: low=9 > high=4"),
        ("space.lr={low: 1e-2, high: 1e-4}", r"space\.lr: empty or reversed range"),
        ("space.prompt_dim=[]", r"space\.prompt_dim: .*at least 1"),
        ("space.prompt_dim=[62]", r"space\.prompt_dim: .*fusion_heads=\d+ must divide prompt_dim=62"),
        ("metric=psnr_gain", r"metric: unknown metric 'psnr_gain'.*cross_delta_psnr"),
        ("train.cross_source_split=null", r"metric=cross_delta_psnr needs a cross-source split"),
        ("search.grace_period=1000", r"grace_period=1000 .* must be below train\.steps=1000"),
        ("train.model.variant=task_only_tiny", r"space\.domain_pool searches a pool that train\.model"),
    ],
)
def test_bad_search_is_refused_naming_the_field(override, expected):
    with pytest.raises(ConfigError) as err:
        load_config(TuneConfig, overrides=[override])
    assert re.search(expected, str(err.value), re.S), str(err.value)


def test_unknown_field_fails_in_the_cli_before_ray_starts(capsys, monkeypatch):
    import datprl.platform.runtime as runtime

    forbid_ray(monkeypatch, runtime, message="Ray was started for a config that does not load")
    with pytest.raises(SystemExit) as exit_info:
        main(["space.task_pool.topk=3"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "unknown key 'space.task_pool.topk'" in err and "size, top_k" in err


def test_resources_that_would_starve_the_data_reads_are_refused(tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # the job's own local Ray: its CPUs are checked before it starts
    smoke = load_config(TuneConfig, REPO_ROOT / "infra/tune-smoke.yaml")
    check_resources(smoke, 2)  # 2 x (0.1 + 0.4) = 1 CPU held, 1 free
    with pytest.raises(SweepError, match=r"hold 1\.8 of 2 CPUs.*max_concurrent_trials=1 or fewer"):
        check_resources(smoke.model_copy(update={"train": smoke.train.model_copy(update={"cpus_per_worker": 0.8})}), 2)
    config = _config(**{"train.data.dataset": tmp_path / "none", "search.max_concurrent_trials": 4, "local_cpus": 2})
    with pytest.raises(
        SweepError, match="hold 4 of 2 CPUs.*max_concurrent_trials=1 or fewer"
    ):  # before any dataset build
        prepare_sweep(config)
    assert not (tmp_path / "none").exists()


def test_metric_split_and_task_are_checked_against_the_dataset(tmp_path):
    data = write_split_dataset(tmp_path / "data")
    base = {
        "train.data.dataset": data,
        "train.storage": tmp_path / "runs",
        "local_cpus": 2,
        "output_dir": tmp_path / "out",
    }
    with pytest.raises(SweepError, match=r"task 'cloud' is not in split 'test'.*\['haze', 'sr_x4'\]"):
        prepare_sweep(_config(**base, metric="cross_delta_psnr/cloud"))
    with pytest.raises(SweepError, match=r"split 'holdout', which .* does not have"):
        prepare_sweep(_config(**base, **{"train.cross_source_split": "holdout"}))
    config, restore = prepare_sweep(_config(**base, metric="cross_delta_psnr/haze"))
    assert restore is False and Path(config.train.data.dataset).is_absolute()


# --- the search space -----------------------------------------------------------------------------------------------
def test_define_by_run_draws_top_k_within_the_size_drawn():
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    config = _config(
        **{
            "space.task_pool": "{size: {low: 2, high: 5}, top_k: {low: 1, high: 4}}",
            "space.domain_pool": "{size: {low: 3, high: 9, log: true}, top_k: {low: 2, high: 3}}",
            "space.prompt_dim": "[32, 64]",
            "space.lr": "{low: 1e-4, high: 1e-2}",
        }
    )
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(lambda trial: DefineByRun(config)(trial) or 0.0, n_trials=300)
    drawn = [t.params for t in study.trials]
    assert list(drawn[0]) == parameter_names(config)
    for p in drawn:
        assert 2 <= p["task_pool.size"] <= 5 and 1 <= p["task_pool.top_k"] <= min(4, p["task_pool.size"])
        assert 3 <= p["domain_pool.size"] <= 9 and 2 <= p["domain_pool.top_k"] <= 3
        assert p["prompt_dim"] in (32, 64) and 1e-4 <= p["lr"] <= 1e-2
    # every size and every admissible top-k of it occurs (the constraint does not shrink the space)
    assert {(p["task_pool.size"], p["task_pool.top_k"]) for p in drawn} == {
        (s, k) for s in range(2, 6) for k in range(1, min(4, s) + 1)
    }

    train = trial_train_config(config, drawn[0], "abc", "/tmp/x")
    resolved = train.model.resolve()
    assert (resolved.task_pool.size, resolved.task_pool.top_k) == (
        drawn[0]["task_pool.size"],
        drawn[0]["task_pool.top_k"],
    )
    assert resolved.prompt_dim == drawn[0]["prompt_dim"] and train.optim.lr == drawn[0]["lr"]
    assert train.name == "abc" and train.storage.endswith("/tune/train") and train.validate_cross_source


# --- outputs from hand-made trials ----------------------------------------------------------------------------------
def _rows() -> list[TrialRow]:
    def row(trial_id, ts, tk, ds, dk, history, outcome):
        step = max(history) if history else 0
        return TrialRow(
            trial_id=trial_id,
            params={"task_pool.size": ts, "task_pool.top_k": tk, "domain_pool.size": ds, "domain_pool.top_k": dk},
            outcome=outcome,
            step=step,
            history=history,
            value=history[step] if history else None,
            first_rung=history.get(20),
            seconds=10.0,
        )

    return [
        row("a", 6, 3, 9, 3, {20: -3.0, 40: -2.5, 60: -2.0}, "completed"),
        row("b", 4, 2, 5, 1, {20: -2.9, 40: -2.4, 60: -1.5}, "completed"),
        row("c", 9, 4, 3, 1, {20: -3.9}, "early_stop"),
        row("d", 2, 1, 12, 4, {20: -1.0}, "early_stop"),  # better than both, but from 20 steps only
        TrialRow(
            trial_id="e",
            params={"task_pool.size": 3, "task_pool.top_k": 1, "domain_pool.size": 4, "domain_pool.top_k": 2},
            outcome="error",
            step=0,
            error="boom",
        ),
    ]


def _smoke_like(tmp_path: Path) -> TuneConfig:
    """The smoke sweep's search (60 steps, first rung at 20) with its outputs under ``tmp_path``."""
    overrides = [f"output_dir={tmp_path / 'out'}", "name=hand"]
    return load_config(TuneConfig, REPO_ROOT / "infra/tune-smoke.yaml", overrides)


def test_outputs_from_hand_made_trials(tmp_path):
    import optuna

    config, rows = _smoke_like(tmp_path), _rows()
    best = best_row(rows, "max")
    assert best.trial_id == "b"  # the best *completed* trial: d's -1.0 is from a third of the budget
    markdown = tune_markdown(config, rows)
    assert "2 completed, 2 stopped early, 1 failed" in markdown
    table = [line for line in markdown.splitlines() if re.match(r"\| \*{0,2}[a-e]\*{0,2} \|", line)]
    assert [line.split("|")[1].strip(" *") for line in table] == ["b", "a", "d", "c", "e"]
    assert "| **b** | 4 | 2 | 5 | 1 | **-1.500** | 60 | -2.900 | 60/60 | completed (60 steps) |" in markdown
    assert "| c | 9 | 4 | 3 | 1 | -3.900 | 20 | -3.900 | 20/60 | early stop (ASHA at step 20) |" in markdown
    assert "error: boom" in markdown

    csv_rows = tune_csv(config, rows).splitlines()
    assert len(csv_rows) == 1 + len(rows) and csv_rows[0].startswith("trial_id,task_pool.size,task_pool.top_k")
    assert "20:-3.000000 40:-2.500000 60:-2.000000" in csv_rows[1]

    written = write_outputs(config, rows)
    out = Path(config.output_dir)
    assert {p.name for p in written.paths} == {"tune.md", "tune.csv", "tune.png", "best.yaml", "study.db"}
    assert (out / "tune.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    best_train = load_config(TrainConfig, out / "best.yaml")  # what jobs/train.py reads
    resolved = best_train.model.resolve()
    assert (
        resolved.task_pool.size,
        resolved.task_pool.top_k,
        resolved.domain_pool.size,
        resolved.domain_pool.top_k,
    ) == (4, 2, 5, 1)
    assert best_train.name == "hand-best" and best_train.storage == config.train.storage

    study = optuna.load_study(study_name="hand", storage=f"sqlite:///{out / 'study.db'}")
    states = {t.user_attrs["ray_trial_id"]: t.state.name for t in study.trials}
    assert states == {"a": "COMPLETE", "b": "COMPLETE", "c": "PRUNED", "d": "PRUNED", "e": "FAIL"}
    assert study.best_trial.user_attrs["ray_trial_id"] == "b" and study.best_value == -1.5
    assert study.trials[0].intermediate_values == {20: -3.0, 40: -2.5, 60: -2.0}


def test_spearman_and_its_exact_permutation_p():
    rho, p = spearman([1, 2, 3, 4, 5], [0.1, 0.2, 0.3, 0.5, 0.9])
    assert rho == pytest.approx(1.0) and p == pytest.approx(2 / 120)  # only the identity and the reversal
    rho, p = spearman([1, 2, 3, 4], [2.0, 1.0, 4.0, 3.0])
    assert rho == pytest.approx(0.6) and p > 0.05
    assert np.isnan(spearman([1, 1, 1], [1.0, 2.0, 3.0])[0])


def test_infra_configs_load_and_meet_the_issue():
    smoke = load_config(TuneConfig, REPO_ROOT / "infra/tune-smoke.yaml")
    assert smoke.search.num_samples >= 4 and smoke.local_cpus == 2 and smoke.build is not None
    assert "python jobs/tune.py infra/tune-smoke.yaml" in (REPO_ROOT / "infra/tune-smoke.yaml").read_text()
    cluster_text = (REPO_ROOT / "infra/tune-cluster.yaml").read_text()
    assert "ray job submit --working-dir . -- python jobs/tune.py infra/tune-cluster.yaml" in cluster_text
    cluster = load_config(TuneConfig, REPO_ROOT / "infra/tune-cluster.yaml")
    assert cluster.train.use_gpu is True and cluster.train.storage.startswith("s3://")
    assert cluster.search.max_concurrent_trials >= 2


# --- end to end: a sweep on S3, its driver killed mid-sweep, resumed -------------------------------------------------
def _launch(config_path: Path, log: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(REPO_ROOT / "jobs/tune.py"), str(config_path)],
        cwd=REPO_ROOT,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )


def _kill_session(process: subprocess.Popen) -> None:
    """SIGKILL the driver, then whatever of its session (its local Ray) is still alive 15 s later, and wait until none
    of it is left (conftest's :func:`stop_session`): a Ray of the killed driver that outlived it would make the next
    driver's Ray Train fail with "Found multiple active Ray instances" and hang on leaked trial resources."""
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    stop_session(process.pid, term_grace=15, kill_grace=45, first=None)


def _wait_for(process: subprocess.Popen, log: Path, timeout_s: float) -> int:
    """The driver's exit code; past ``timeout_s`` it is killed and the test fails with the end of its log and the Ray
    instances on the machine, so that a hang says where it hung."""
    import ray._private.services as services

    try:
        return process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        gcs = sorted(services.find_gcs_addresses())
        _kill_session(process)
        tail = "\n".join(log.read_text().splitlines()[-80:])
        pytest.fail(f"the driver did not finish in {timeout_s:.0f} s; Ray instances on the machine: {gcs}\n{tail}")


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_sweep_on_s3_resumes_after_its_driver_is_killed(tmp_path, s3_server):
    """The driver runs in its own process with its own local Ray. The test session's Ray is stopped meanwhile (and
    started again after): with two Ray instances on one machine, Ray Train V2's placement-group cleaner, which asks the
    state API without an address, fails with "Found multiple active Ray instances" and a trial's resources leak."""
    import ray

    from conftest import start_local_ray

    restart = ray.is_initialized()
    if restart:
        ray.shutdown()
    try:
        _resume_after_kill(tmp_path, s3_server)
    finally:
        if restart:
            start_local_ray()


def _resume_after_kill(tmp_path: Path, s3_server: str) -> None:
    import ray._private.services as services

    others = services.find_gcs_addresses()
    if others:
        pytest.skip(f"another Ray runs on this machine ({sorted(others)}): Ray Train V2 cannot tell them apart")
    import boto3

    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket="tune")
    data = write_split_dataset(tmp_path / "data")
    out = tmp_path / "out"
    # 3 trials of 9 steps, one at a time; validation and checkpoint every 3 steps; ASHA's only rung at step 6, so a
    # trial at step 3 is certainly still running when the driver is killed.
    config = {
        "name": "resume",
        "output_dir": str(out),
        "local_cpus": 2,
        "space": {
            "task_pool": {"size": {"low": 2, "high": 6}, "top_k": {"low": 1, "high": 3}},
            "domain_pool": {"size": {"low": 2, "high": 6}, "top_k": {"low": 1, "high": 3}},
        },
        "search": {
            "num_samples": 3,
            "max_concurrent_trials": 1,
            "startup_trials": 3,
            "grace_period": 6,
            "reduction_factor": 2,
            "state_every_s": 1,
        },
        "train": {
            "storage": "s3://tune/runs",
            "data": {"dataset": str(data), "crop_size": 32, "per_task_batch": 1, "shuffle_buffer": 4},
            "build_dataset_if_missing": False,
            "text_embeddings": None,
            "steps": 9,
            "validate_every": 3,
            "checkpoint_every": 3,
            "log_every": 3,
            "validation_crop": None,
            "cpus_per_worker": 0.5,
            "torch_threads": 1,
            "use_gpu": False,
        },
    }
    config_path = tmp_path / "sweep.yaml"
    config_path.write_text(yaml.safe_dump(config))
    # The driver starts a local Ray of its own: nothing of the test session's Ray may reach it.
    drop = (
        "RAY_ADDRESS",
        "RAY_DATA_LOGGING_CONFIG",
        "PYTHONWARNINGS",
        "RAY_AIR_NEW_OUTPUT",
        "TUNE_GLOBAL_CHECKPOINT_S",
    )
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(AWS_ENDPOINT_URL_S3=s3_server, RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.2")

    first_log = tmp_path / "first.log"
    first = _launch(config_path, first_log, env)
    running = None
    deadline = time.monotonic() + 420
    try:
        while running is None:
            assert time.monotonic() < deadline, first_log.read_text()
            assert first.poll() is None, first_log.read_text()
            match = re.search(r"\[tune\] trial 2/3 (\S+) step 3/9", first_log.read_text())
            running = match.group(1) if match else None
            time.sleep(0.2)
    finally:
        _kill_session(first)
    printed = first_log.read_text()
    finished = re.findall(r"\[tune\] trial \d/3 (\S+) (?:finished|stopped early)", printed)
    assert len(finished) == 1 and running not in finished, printed
    before = {trial: _lines(out / "trials" / trial / "metrics.jsonl") for trial in (*finished, running)}
    assert max(r["step"] for r in before[running]) >= 3
    left = sorted(services.find_gcs_addresses())
    assert not left, f"the killed driver's Ray is still running ({left}): the resumed driver would start a second one"

    second_log = tmp_path / "second.log"
    second = _launch(config_path, second_log, env)
    try:
        assert _wait_for(second, second_log, 600) == 0, second_log.read_text()
    finally:
        if second.poll() is None:
            _kill_session(second)
    resumed = second_log.read_text()
    assert "resuming sweep 'resume'" in resumed, resumed
    started = re.findall(r"\[tune\] trial \d/3 (\S+) (?:re)?started", resumed)
    assert finished[0] not in started and running in started, resumed  # the finished trial is not run again
    assert _lines(out / "trials" / finished[0] / "metrics.jsonl") == before[finished[0]]
    after = _lines(out / "trials" / running / "metrics.jsonl")[len(before[running]) :]
    # the running trial resumed from its checkpoint at step 3 or later, not from step 0
    assert after and after[0]["resumed_from_step"] >= 3 and after[0]["resumed_from_step"] % 3 == 0, after
    assert after[-1]["step"] in (6, 9)

    import csv

    with (out / "tune.csv").open() as f:
        rows = {r["trial_id"]: r for r in csv.DictReader(f)}
    assert len(rows) == 3 and rows[finished[0]]["outcome"] in ("completed", "early_stop")
    # the resumed trial's curve holds both attempts (the first attempt's reports come from its metrics log)
    assert rows[running]["history"].startswith("3:") and rows[running]["steps_reached"] in ("6", "9")
    import optuna

    study = optuna.load_study(study_name="resume", storage=f"sqlite:///{out / 'study.db'}")
    assert len(study.trials) == 3 and study.best_trial.state.name == "COMPLETE"
    assert load_config(TrainConfig, out / "best.yaml").name == "resume-best"


def test_trial_rows_from_a_result_grid_like_object(tmp_path):
    import pandas as pd

    class Result:
        def __init__(self, trial_id, params, steps, values, error=None):
            self.metrics = {"trial_id": trial_id, "step": steps[-1], "time_total_s": 5.0}
            self.config = params
            self.error = error
            self.path = str(tmp_path / trial_id)
            self.metrics_dataframe = pd.DataFrame(
                {"step": steps, "cross_delta_psnr": values, "val_delta_psnr": [0.1] * len(steps)}
            )

    class Trial:
        def __init__(self, trial_id, status):
            self.trial_id, self.status = trial_id, status

    class Grid(list):
        pass

    params = {"task_pool.size": 5, "task_pool.top_k": 2, "domain_pool.size": 6, "domain_pool.top_k": 3}
    grid = Grid([Result("x", params, [10, 20, 30], [-1.0, float("nan"), -0.5]), Result("y", params, [10], [-2.0])])
    grid._experiment_analysis = type("A", (), {"trials": [Trial("x", "TERMINATED"), Trial("y", "TERMINATED")]})()
    config = _config(**{"train.steps": 30, "train.validate_every": 10})
    x, y = trial_rows(config, grid)
    assert (x.outcome, x.step, x.history, x.value, x.first_rung) == ("completed", 30, {10: -1.0, 30: -0.5}, -0.5, -1.0)
    assert (y.outcome, y.step, y.value) == ("early_stop", 10, -2.0) and x.extra == {"val_delta_psnr": 0.1}
