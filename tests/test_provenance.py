"""Provenance of exported weights: the record training writes (build_provenance) and the sidecar that carries it
(save_model / read_provenance / load_model), old sidecars included."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from datetime import datetime, timezone

import pytest
import torch

from datprl.models.factory import create_model, load_model, read_provenance, save_model
from datprl.platform.evaluation.report import EvalResult
from datprl.platform.train.provenance import build_provenance, evaluation_summary, git_state

MANIFEST_SHA = hashlib.sha256(b"manifest").hexdigest()


def _row(domain: str, task: str, input_psnr: float, output_psnr: float, zero_shot: bool = False) -> dict:
    return {
        "domain": domain,
        "task": task,
        "zero_shot": zero_shot,
        "n": 4,
        "input_psnr": input_psnr,
        "input_ssim": 0.5,
        "output_psnr": output_psnr,
        "output_ssim": 0.6,
        "delta_psnr": output_psnr - input_psnr,
        "input_exact": 0,
        "output_exact": 0,
    }


def _evaluation() -> dict:
    rows = [_row("natural", "sr_x4", 24.0, 25.5), _row("medical", "ct_low_dose", 30.0, 29.0, zero_shot=True)]
    mean = {
        "n_tasks": 2,
        "n_images": 8,
        "input_psnr": 27.0,
        "input_ssim": 0.5,
        "output_psnr": 27.25,
        "output_ssim": 0.6,
        "delta_psnr": 0.25,
        "seen": {
            "n_tasks": 1,
            "n_images": 4,
            "input_psnr": 24.0,
            "input_ssim": 0.5,
            "output_psnr": 25.5,
            "output_ssim": 0.6,
            "delta_psnr": 1.5,
        },
        "zero_shot": {
            "n_tasks": 1,
            "n_images": 4,
            "input_psnr": 30.0,
            "input_ssim": 0.5,
            "output_psnr": 29.0,
            "output_ssim": 0.6,
            "delta_psnr": -1.0,
        },
    }
    images = [{"key": f"k{i}", "psnr": float("inf")} for i in range(8)]
    return EvalResult(
        rows=rows,
        mean=mean,
        protocol="test",
        split="val",
        dataset="/data/tiny",
        zero_shot_tasks=["ct_low_dose"],
        images=images,
    ).to_json()


def test_build_provenance_records_training_and_a_summary_of_the_evaluation():
    config = {"steps": 12, "model": {"variant": "paper_tiny"}, "data": {"dataset": "/data/tiny"}}
    before = datetime.now(timezone.utc).replace(microsecond=0)
    record = build_provenance(
        config,
        model_spec="paper_tiny (task_pool.top_k=4)",
        steps=12,
        manifest_sha256=MANIFEST_SHA,
        evaluation=_evaluation(),
    )
    assert record["trained"] is True and record["model"] == "paper_tiny (task_pool.top_k=4)"
    assert record["config"] == config and record["config"] is not config  # a copy: later edits do not leak in
    assert record["steps"] == 12 and record["dataset_manifest_sha256"] == MANIFEST_SHA
    created = datetime.fromisoformat(record["created"])
    assert created.tzinfo is not None and before <= created <= datetime.now(timezone.utc)
    assert record["datprl_version"] == "0.1.0"
    summary = record["evaluation"]
    assert summary["split"] == "val" and summary["dataset"] == "/data/tiny"
    assert (summary["n_images"], summary["n_tasks"]) == (8, 2)
    assert summary["mean"]["output_psnr"] == 27.25 and summary["mean"]["input_psnr"] == 27.0
    assert summary["mean"]["delta_psnr"] == 0.25
    assert summary["mean_seen"]["delta_psnr"] == 1.5 and summary["mean_zero_shot"]["delta_psnr"] == -1.0
    assert summary["tasks"] == [
        {"domain": "natural", "task": "sr_x4", "zero_shot": False, "n": 4, "delta_psnr": 1.5},
        {"domain": "medical", "task": "ct_low_dose", "zero_shot": True, "n": 4, "delta_psnr": -1.0},
    ]
    assert "images" not in summary  # per-image scores stay in the eval folder
    json.dumps(record, allow_nan=False)  # the sidecar is strict JSON


def test_build_provenance_without_evaluation_or_manifest():
    record = build_provenance({}, model_spec="paper_tiny", steps=0, manifest_sha256=None, evaluation=None)
    assert record["evaluation"] is None and record["dataset_manifest_sha256"] is None and record["steps"] == 0
    with pytest.raises(ValueError, match="config_to_dict"):
        build_provenance({"path": object()}, model_spec="paper_tiny", steps=1, manifest_sha256=None, evaluation=None)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(steps=-1), "steps"),
        (dict(steps=2.5), "steps"),
        (dict(manifest_sha256="abc"), "manifest_sha256"),
        (dict(model_spec=" "), "model_spec"),
        (dict(evaluation={"rows": []}), "EvalResult.to_json"),
    ],
)
def test_build_provenance_rejects_bad_input_with_the_fix(kwargs, match):
    args = dict(model_spec="paper_tiny", steps=1, manifest_sha256=None, evaluation=None) | kwargs
    with pytest.raises(ValueError, match=match):
        build_provenance({}, **args)


def test_evaluation_summary_turns_non_finite_means_into_null():
    evaluation = _evaluation()
    evaluation["mean"]["output_psnr"] = float("nan")
    assert evaluation_summary(evaluation)["mean"]["output_psnr"] is None


@pytest.mark.skipif(shutil.which("git") is None, reason="needs the git command")
def test_git_state_reads_the_repository_holding_the_file(tmp_path):
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(tmp_path / "repo"), *args], check=True, capture_output=True, text=True
        ).stdout.strip()

    repo = tmp_path / "repo"
    (repo / "pkg").mkdir(parents=True)
    code = repo / "pkg" / "code.py"
    code.write_text("x = 1\n")
    git("init", "-q")
    assert git_state(code) == (None, None)  # no commit yet
    git("add", "pkg/code.py")
    git("-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "-q", "-m", "one")
    head = git("rev-parse", "HEAD")
    assert git_state(code) == (head, False)
    code.write_text("x = 2\n")
    assert git_state(code) == (head, True)
    # Code installed into a virtualenv inside a repository is not that repository's code.
    installed = repo / ".venv" / "lib" / "site-packages" / "pkg" / "code.py"
    installed.parent.mkdir(parents=True)
    installed.write_text("x = 1\n")
    assert git_state(installed) == (None, None)
    outside = tmp_path / "plain" / "code.py"
    outside.parent.mkdir()
    outside.write_text("x = 1\n")
    assert git_state(outside) == (None, None)


def test_sidecar_carries_provenance_and_old_sidecars_still_load(tmp_path):
    torch.manual_seed(0)
    model = create_model("paper_tiny", zero_init_output=False)
    record = build_provenance(
        {"steps": 3}, model_spec="paper_tiny", steps=3, manifest_sha256=MANIFEST_SHA, evaluation=_evaluation()
    )
    weights = save_model(model, tmp_path / "trained", provenance=record)
    assert weights == tmp_path / "trained.safetensors"
    sidecar = json.loads((tmp_path / "trained.json").read_text())
    assert set(sidecar) == {"model", "provenance"} and sidecar["provenance"] == record
    assert read_provenance(weights) == record and read_provenance(tmp_path / "trained") == record
    loaded = load_model(weights)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))

    # Without provenance the sidecar is exactly the old format, and an old sidecar reads as "no provenance".
    old = save_model(model, tmp_path / "old")
    assert set(json.loads((tmp_path / "old.json").read_text())) == {"model"}
    assert read_provenance(old) is None and load_model(old).config == model.config


def test_bad_provenance_is_refused_before_anything_is_written(tmp_path):
    model = create_model("paper_tiny")
    with pytest.raises(ValueError, match="JSON-compatible"):
        save_model(model, tmp_path / "m", provenance={"steps": float("nan")})
    with pytest.raises(TypeError, match="build_provenance"):
        save_model(model, tmp_path / "m", provenance=["trained"])
    assert list(tmp_path.iterdir()) == []
    save_model(model, tmp_path / "m")
    (tmp_path / "m.json").write_text(json.dumps({"model": model.config.model_dump(mode="json"), "provenance": 3}))
    with pytest.raises(ValueError, match="provenance"):
        read_provenance(tmp_path / "m")
    with pytest.raises(FileNotFoundError, match="json"):
        read_provenance(tmp_path / "missing.safetensors")
