"""Cluster submission: the cluster configs validate, and jobs/train.py runs through `ray job submit` on a separately
started Ray head node with token authentication on, ending in a checkpoint and exported weights.

The head (tests/conftest.py's RayHead) is started by `ray start --head` in its own session (setsid), with its own temp
dir, free loopback ports and its own token, so it never touches the test session's in-process Ray. It is stopped by
signalling exactly the processes of that session and their descendants: `ray stop` would stop every Ray on the machine.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
import torch
import yaml

from conftest import RayHead, ray_cli
from datprl.platform.config import load_config
from datprl.platform.train.config import TrainConfig
from datprl.priors.job import DescribeConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
INFRA = REPO_ROOT / "infra"
LAUNCH = "ray job submit --working-dir . -- python jobs/train.py infra/train-cluster.yaml"
MiB = 1024**2


# ---------------------------------------------------------------------------------------------------------------------
# The configs


def test_cluster_training_config_validates():
    text = (INFRA / "train-cluster.yaml").read_text()
    header = [line.lstrip("# ").strip() for line in text.splitlines() if line.startswith("#")]
    assert LAUNCH in header, "the header comment must give the exact launch command"
    config = load_config(TrainConfig, INFRA / "train-cluster.yaml")
    assert config.storage.startswith("s3://") and config.data.dataset.startswith("s3://"), "nodes share s3:// storage"
    assert config.use_gpu is True and config.model.variant == "paper_centred" and config.data.crop_size == 128
    assert config.model.resolve().query_centering
    describe = load_config(DescribeConfig, INFRA / "describe-cluster.yaml")
    assert config.text_embeddings == f"{describe.output}/descriptions.parquet", "train on what the describe job writes"
    assert isinstance(config.num_workers, int) and config.num_workers > 1
    assert config.checkpoint_every < config.steps
    # The job runs in a temporary copy of the repo: a relative output_dir would be written into it.
    assert Path(config.output_dir).is_absolute()


def test_local_training_config_validates():
    config = load_config(TrainConfig, INFRA / "train-local.yaml")
    assert config.use_gpu is False and config.steps <= 20 and config.evaluate_split is None
    assert config.cpus_per_worker < 2, "a worker holding every CPU of a 2-CPU head starves the Ray Data reads"
    for path in (config.storage, config.data.dataset, config.output_dir):
        assert Path(path).is_absolute(), path


def test_ray_cluster_launcher_config():
    from ray.autoscaler._private.util import prepare_config, validate_config  # what `ray up` runs on the file

    raw = yaml.safe_load((INFRA / "ray-cluster.yaml").read_text())
    validate_config(prepare_config(copy.deepcopy(raw)))
    assert any("bash infra/setup.sh" in c for c in raw["setup_commands"])
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = [c for c in raw[key] if "ray start" in c]
        assert start and all("RAY_AUTH_MODE=token" in c for c in start), f"{key}: token auth must stay on"
        assert all(".venv/bin/activate" in c for c in start), f"{key}: Ray must run from the project's venv"
    assert "RAY_AUTH_MODE=disabled" not in yaml.safe_dump(raw)
    assert raw["file_mounts"].get("~/.ray/auth_token"), "every node needs the cluster's token"


# ---------------------------------------------------------------------------------------------------------------------
# A local head node of our own


class LocalHead(RayHead):
    """A head of the test's own (:class:`conftest.RayHead`) whose jobs run this venv's `python`, plus the `ray` CLI."""

    def __init__(self, num_cpus: int = 2, object_store_mib: int = 256):
        venv_bin = Path(sys.executable).parent  # the job's `python` is the head's: this venv's, where datprl lives
        env = dict(RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.2", PATH=f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}")
        super().__init__(num_cpus, object_store_mib, prefix="drc-", env=env, term_grace=15)

    def ray(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*ray_cli("ray"), *args], env=self.env, capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT
        )

    def submit(self, job_id: str, *args: str, timeout: float = 1200) -> subprocess.CompletedProcess:
        """`ray job submit` (blocks until the job ends; non-zero exit unless it succeeded). Right after `ray start` the
        head's dashboard agent may not have registered yet ("No available agent to submit job, please try again
        later" after the job server's 10 s wait, seen on a loaded machine): retry that, nothing else."""
        for attempt in range(4):
            done = self.ray(
                "job", "submit", "--address", self.dashboard, "--submission-id", job_id, *args, timeout=timeout
            )
            if done.returncode == 0 or "No available agent" not in done.stdout + done.stderr:
                break
            time.sleep(5)
        return done


def _tail(text: str, lines: int = 60) -> str:
    return "\n".join(text.splitlines()[-lines:])


# ---------------------------------------------------------------------------------------------------------------------
# Submission


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="stopping only our head reads /proc (Linux)")
def test_train_job_submitted_to_a_local_head(tmp_path, ray_local):
    from conftest import small_corpus

    from datprl.models import load_model

    dataset, runs, out = small_corpus(tmp_path / "data"), tmp_path / "runs", tmp_path / "out"
    local = load_config(TrainConfig, INFRA / "train-local.yaml")

    with LocalHead() as head:
        # Token auth is on: the job API refuses a request without the token.
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{head.dashboard}/api/jobs/", timeout=30)
        assert refused.value.code in (401, 403)

        job = f"datprl-train-{uuid.uuid4().hex[:8]}"
        # As documented (`ray job submit --working-dir . -- python jobs/train.py CONFIG`), plus this test's paths.
        submit = head.submit(
            job,
            "--working-dir",
            str(REPO_ROOT),
            "--",
            "python",
            "jobs/train.py",
            "infra/train-local.yaml",
            f"data.dataset={dataset}",
            f"storage={runs}",
            "name=submitted",
            f"output_dir={out}",
        )
        log = submit.stdout + submit.stderr
        (tmp_path / "job.log").write_text(log)  # the client's copy of the job's output, kept with pytest's tmp dirs
        assert submit.returncode == 0, f"ray job submit failed:\n{_tail(log)}"
        status = head.ray("job", "status", job, "--address", head.dashboard)
        assert f"Job '{job}' succeeded" in status.stdout, _tail(status.stdout + status.stderr)  # status SUCCEEDED
        assert f"| {local.steps}/{local.steps} [" in log, _tail(log)  # the progress bar's final state

        # What was uploaded: the unpacked working dir on the head. Ray honours .gitignore (.venv, data, runs, outputs)
        # and leaves out .git, .venv, venv and __pycache__ by default.
        uploaded = [
            p
            for p in (head.temp / "session_latest" / "runtime_resources" / "working_dir_files").iterdir()
            if p.is_dir()
        ]
        assert len(uploaded) == 1, uploaded
        files = [p for p in uploaded[0].rglob("*") if p.is_file()]
        size = sum(p.stat().st_size for p in files)
        print(f"uploaded working dir: {len(files)} files, {size / MiB:.2f} MiB unpacked")
        assert size < 50 * MiB  # Ray refuses packages near its gRPC message limit
        names = {p.relative_to(uploaded[0]).parts[0] for p in files}
        assert {"jobs", "platform", "infra"} <= names and not names & {".venv", "data", "runs", "outputs", ".git"}

    # Stopping our head left the test session's in-process Ray running.
    assert ray_local.get(ray_local.remote(lambda: "alive").remote(), timeout=60) == "alive"

    # The last checkpoint holds the final step; the exported weights load and are that checkpoint's weights (its
    # model.safetensors: the EMA weights when EMA is on, the trained weights otherwise).
    checkpoints = sorted((runs / "submitted").glob("checkpoint_*/state.pt"))
    assert checkpoints, sorted(p.name for p in (runs / "submitted").iterdir())
    states = {c.parent: torch.load(c, map_location="cpu", weights_only=True) for c in checkpoints}
    folder, final = max(states.items(), key=lambda item: item[1]["step"])
    assert final["step"] == local.steps, [s["step"] for s in states.values()]
    model = load_model(out / "model.safetensors")
    assert model.config == local.model.resolve()
    exported, saved = model.state_dict(), load_model(folder / "model.safetensors").state_dict()
    assert exported.keys() == saved.keys() == final["model"].keys()
    assert all(torch.equal(exported[k], saved[k]) for k in exported)
    if final.get("ema") is None:
        assert all(torch.equal(exported[k], final["model"][k]) for k in exported)
    assert (out / "config.yaml").exists()
