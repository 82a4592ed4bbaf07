"""Evaluation: metrics agree with direct computation, the do-nothing model scores its input, every output file is
written and readable, prompt usage adds up, task filtering, zero-shot marking and the command line (several splits
side by side; with no arguments the weights `jobs/train.py` exports, or a message saying to train first)."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from datprl.models import create_model, save_model
from datprl.platform.data.pipeline import DataConfig, evaluation_rows
from conftest import small_corpus
from datprl.platform.data.format import SampleRecord
from datprl.platform.data.shards import DatasetWriter
from datprl.platform.evaluation.metrics import selection_nmi
from datprl.platform.evaluation.evaluate import TRAINED_WEIGHTS, EvalConfig, evaluate, main
from datprl.platform.evaluation.metrics import PAPER, psnr, ssim

pytestmark = pytest.mark.ray

SPLIT = "test"


class Identity(torch.nn.Module):
    """Returns its input: no parameters, no ``config``, no ``return_aux``."""

    def forward(self, x):
        return x


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return small_corpus(tmp_path_factory.mktemp("eval-corpus") / "default")


@pytest.fixture(scope="module")
def data(dataset):
    return DataConfig(dataset=str(dataset))


@pytest.fixture(scope="module")
def rows(ray_local, data):
    return list(evaluation_rows(data, SPLIT))


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return create_model("paper_tiny")


@pytest.fixture(scope="module")
def tiny_run(ray_local, data, tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval-tiny")
    tiny.train()  # evaluate must switch to eval mode and restore the training mode afterwards
    result = evaluate(tiny, data, split=SPLIT, out_dir=out, max_grids_per_task=1, metadata={"step": 7})
    assert tiny.training
    return result, out


def test_metrics_match_direct_computation(tiny_run, rows, tiny):
    result, _ = tiny_run
    assert result.n_images == len(rows)
    by_key = {im["key"]: im for im in result.images}
    tiny.eval()
    with torch.inference_mode():
        for row in rows[:2]:
            lq, gt = torch.tensor(row["lq"])[None], torch.tensor(row["gt"])[None]
            out = tiny(lq)
            im = by_key[row["key"]]
            assert im["input_psnr"] == pytest.approx(float(psnr(lq, gt, PAPER)[0]), abs=1e-9)
            assert im["input_ssim"] == pytest.approx(float(ssim(lq, gt, PAPER)[0]), abs=1e-9)
            assert im["output_psnr"] == pytest.approx(float(psnr(out, gt, PAPER)[0]), abs=1e-3)
            assert im["output_ssim"] == pytest.approx(float(ssim(out, gt, PAPER)[0]), abs=1e-5)
    # per-row and headline means from the per-image input PSNRs computed here from the raw rows
    direct = {r["key"]: float(psnr(torch.tensor(r["lq"])[None], torch.tensor(r["gt"])[None])[0]) for r in rows}
    per_task = {}
    for r in rows:
        per_task.setdefault(r["task"], []).append(direct[r["key"]])
    for row in result.rows:
        assert row["input_psnr"] == pytest.approx(np.mean(per_task[row["task"]]))
        assert row["delta_psnr"] == pytest.approx(row["output_psnr"] - row["input_psnr"])
    assert result.mean["n_tasks"] == len(per_task) == 9
    assert result.mean["input_psnr"] == pytest.approx(np.mean([np.mean(v) for v in per_task.values()]))
    assert result.mean["output_psnr"] == pytest.approx(np.mean([r["output_psnr"] for r in result.rows]))
    assert result.protocol == PAPER.describe() and PAPER.describe() in result.markdown()
    # CT also in Hounsfield units, from the stored values: HU = x * 4095 - 1024
    ct_rows = [r for r in rows if r["units"] == "HU"]
    assert ct_rows and {r["task"] for r in ct_rows} == {"ct_low_dose"}
    for r in ct_rows:
        im = by_key[r["key"]]
        hu_in, hu_gt = (np.asarray(r[k], np.float64) * 4095 - 1024 for k in ("lq", "gt"))
        assert im["input_hu_mae"] == pytest.approx(np.abs(hu_in - hu_gt).mean())
    ct_row = next(row for row in result.rows if row["task"] == "ct_low_dose")
    assert ct_row["input_hu_mae"] == pytest.approx(np.mean([by_key[r["key"]]["input_hu_mae"] for r in ct_rows]))
    assert "Hounsfield" in result.markdown() and "[-160, 240] HU" in result.markdown()
    assert all("input_hu_mae" not in row for row in result.rows if row["task"] != "ct_low_dose")


def test_identity_model_scores_its_input(ray_local, data):
    result = evaluate(Identity(), data, split=SPLIT)
    assert result.prompt_usage is None and result.model_config is None
    for row in [*result.rows, result.mean]:
        assert row["output_psnr"] == row["input_psnr"] and row["output_ssim"] == row["input_ssim"]
        assert row["delta_psnr"] == 0
    assert "+0.00" in result.markdown()


def test_output_files_exist_and_parse(tiny_run, tiny):
    result, out = tiny_run
    for name in ("metrics.md", "metrics.csv", "metrics.json", "prompt_usage.png"):
        assert (out / name).is_file(), name
    assert not list(out.rglob("*.tmp")) and (out / "metrics.json").stat().st_mode & 0o777 == 0o644
    assert (out / "metrics.md").read_text() == result.markdown()
    assert "| **Mean** | all tasks (9) |" in result.markdown()

    table = list(csv.DictReader((out / "metrics.csv").open()))
    assert len(table) == len(result.rows) + 1 and table[-1]["domain"] == "mean"
    assert float(table[0]["output_psnr"]) == pytest.approx(result.rows[0]["output_psnr"])
    assert float(table[-1]["output_psnr"]) == pytest.approx(result.mean["output_psnr"])

    saved = json.loads((out / "metrics.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(result.rows)) and saved["mean"] == result.mean
    assert saved["protocol"] == PAPER.describe() and saved["split"] == SPLIT
    assert saved["model_config"] == tiny.config.model_dump(mode="json")
    assert saved["n_images"] == result.n_images == len(saved["images"]) and saved["metadata"] == {"step": 7}

    grids = sorted((out / "grids").glob("*.png"))
    assert len(grids) == 9  # one per task (max_grids_per_task=1)
    for path in grids:
        domain, task, key = path.stem.split("__")
        assert any(r["domain"] == domain and r["task"] == task for r in result.rows)
        with Image.open(path) as image:
            assert image.format == "PNG" and image.mode == "RGB"
            assert image.width == 3 * image.height
    with Image.open(out / "prompt_usage.png") as image:
        assert image.format == "PNG" and image.width > 100


def test_prompt_usage_adds_up(tiny_run, tiny):
    result, _ = tiny_run
    usage, n = result.prompt_usage, result.n_images
    assert set(usage) == {"task", "domain"}
    for pool, spec in (("task", tiny.config.task_pool), ("domain", tiny.config.domain_pool)):
        entry = usage[pool]
        assert entry["size"] == spec.size and entry["top_k"] == spec.top_k and entry["images"] == n
        assert sum(entry["total"]) == n * spec.top_k
        assert sum(sum(c) for c in entry["by_task"].values()) == n * spec.top_k
        assert sum(sum(c) for c in entry["by_domain"].values()) == n * spec.top_k
        for task, counts in entry["by_task"].items():
            assert max(counts) <= entry["images_by_task"][task]  # an image selects each prompt at most once
        for label in ("task", "domain"):  # the NMI is the one computed from the counts it reports
            assert entry[f"nmi_{label}"] == selection_nmi(entry[f"by_{label}"])
    assert "Prompt selection vs labels" in result.markdown() and "task pool: task " in result.markdown()


def test_task_filter_and_zero_shot_marking(ray_local, data, tiny, tmp_path):
    result = evaluate(
        create_model("restormer_tiny"),
        data,
        split=SPLIT,
        tasks=["haze", "cloud"],
        zero_shot_tasks=["haze"],
        out_dir=tmp_path,
    )
    assert {r["task"] for r in result.rows} == {"haze", "cloud"} and result.mean["n_tasks"] == 2
    assert {im["task"] for im in result.images} == {"haze", "cloud"}
    assert [r["zero_shot"] for r in result.rows if r["task"] == "haze"] == [True]
    text = result.markdown()
    assert "haze (zero-shot)" in text and "cloud (zero-shot)" not in text and "zero-shot tasks (1)" in text
    assert result.mean["zero_shot"]["n_tasks"] == 1 and result.mean["seen"]["n_tasks"] == 1
    assert result.prompt_usage is None and not (tmp_path / "prompt_usage.png").exists()  # no pools, no heatmap
    # max_grids_per_task (2) pictures of each task
    assert len(list((tmp_path / "grids").glob("*.png"))) == sum(min(2, r["n"]) for r in result.rows)
    with pytest.raises(ValueError, match="no 'test' samples"):
        evaluate(Identity(), data, split=SPLIT, tasks=["no_such_task"])


def test_cli_in_process(ray_local, dataset, tmp_path, capsys):
    out = tmp_path / "cli"
    # `split=val` is the spelling from before `splits` existed: it still evaluates that one split
    code = main(
        ["variant=paper_tiny", f"data.dataset={dataset}", f"out_dir={out}", "split=val", "tasks=[derain]", "device=cpu"]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "derain" in printed and "Metric protocol" in printed and "| val n |" in printed and "test n" not in printed
    saved = json.loads((out / "val" / "metrics.json").read_text())
    assert saved["split"] == "val" and saved["metadata"]["variant"] == "paper_tiny"
    assert math.isfinite(saved["mean"]["output_psnr"])
    assert (out / "config.yaml").is_file() and (out / "val" / "prompt_usage.png").is_file()
    assert (out / "summary.md").read_text() in printed and not (out / "test").exists()
    with pytest.raises(ValueError, match="nothing to evaluate"):
        EvalConfig(weights=None)
    with pytest.raises(ValueError, match="exactly one"):
        EvalConfig(weights="w.safetensors", variant="paper_tiny")
    with pytest.raises(ValueError, match=r"old spelling of splits=\[test\]"):
        EvalConfig(split="test", splits=["val"])
    assert EvalConfig().resolved_weights() == TRAINED_WEIGHTS == "outputs/train/model.safetensors"
    assert EvalConfig(variant="paper_tiny").resolved_weights() is None


# --- `python jobs/evaluate.py` with no arguments ------------------------------------------------------------------
SPLIT_TASKS = {
    "val": [("natural", "sr_x4"), ("remote_sensing", "haze")],
    "test": [("natural", "sr_x4"), ("remote_sensing", "haze"), ("medical", "ct_low_dose")],
}


def write_val_test_dataset(root) -> None:
    """Two samples of 24x24 pixels per task in a val split (2 tasks) and a test split (3 tasks, one of them a 12-bit
    grey scan stored as 16-bit), as the dataset builder lays them out."""
    rng = np.random.default_rng(0)
    with DatasetWriter(str(root), "val-test", max_samples_per_shard=16, command=["test"], package_versions={}) as w:
        for split, tasks in SPLIT_TASKS.items():
            for i in range(2):
                for domain, task in tasks:
                    grey = domain == "medical"
                    shape, dtype, high = ((24, 24), np.uint16, 4096) if grey else ((24, 24, 3), np.uint8, 256)
                    gt = rng.integers(0, high, shape).astype(dtype)
                    lq = np.clip(gt.astype(np.int64) + rng.integers(-high // 16, high // 16, shape), 0, high - 1)
                    record = SampleRecord(
                        key=f"{split}-{task}-{i}",
                        domain=domain,
                        task=task,
                        split=split,
                        source_id=f"{split}{i}",
                        source_package="test",
                        degradation={"seed": i},
                        seed=i,
                        bit_depth=16 if grey else 8,
                        channels=1 if grey else 3,
                        height=24,
                        width=24,
                        white_level=4095 if grey else None,
                    )
                    w.write(record, lq.astype(dtype), gt)


def test_no_arguments_evaluates_trained_weights_on_val_and_test(ray_local, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_val_test_dataset(tmp_path / "data" / "default")  # the default data.dataset, relative to the job's cwd
    torch.manual_seed(0)
    save_model(create_model("paper_tiny"), tmp_path / "outputs" / "train" / "model")
    # the training run's resolved config beside the weights names another dataset: evaluation says so
    (tmp_path / "outputs" / "train" / "config.yaml").write_text("data:\n  dataset: data/elsewhere\n")

    assert main([]) == 0
    printed = capsys.readouterr().out
    assert "was trained on data/elsewhere; evaluating on data/default (set data.dataset=data/elsewhere" in printed
    out = tmp_path / "outputs" / "eval"
    results = {split: json.loads((out / split / "metrics.json").read_text()) for split in ("val", "test")}
    for split, saved in results.items():
        assert saved["split"] == split and saved["metadata"]["weights"] == TRAINED_WEIGHTS
        assert {r["task"] for r in saved["rows"]} == {task for _, task in SPLIT_TASKS[split]}
        assert saved["n_images"] == 2 * len(SPLIT_TASKS[split])
        assert (out / split / "metrics.md").is_file() and len(list((out / split / "grids").glob("*.png"))) > 0

    summary = (out / "summary.md").read_text()
    assert summary in printed and TRAINED_WEIGHTS in summary and "`val` 4 images, `test` 6 images" in summary
    lines = summary.splitlines()
    header = next(line for line in lines if line.startswith("| domain"))
    assert header.index("val n") < header.index("val delta") < header.index("test n") < header.index("test delta")

    def cells(prefix: str) -> list[str]:
        return [c.strip() for c in next(line for line in lines if line.startswith(prefix)).strip("|").split("|")]

    haze = cells("| remote_sensing | haze |")
    for offset, split in ((2, "val"), (6, "test")):
        row = next(r for r in results[split]["rows"] if r["task"] == "haze")
        assert haze[offset : offset + 4] == [
            str(row["n"]),
            f"{row['input_psnr']:.2f}",
            f"{row['output_psnr']:.2f}",
            f"{row['delta_psnr']:+.2f}",
        ]
    ct = cells("| medical | ct_low_dose |")
    assert ct[2:6] == ["-"] * 4 and ct[6] == "2"  # not in val: dashes there, its numbers under test
    mean = cells("| **Mean** | all tasks |")
    for offset, split in ((2, "val"), (6, "test")):
        m = results[split]["mean"]
        assert mean[offset : offset + 4] == [
            str(m["n_images"]),
            f"{m['input_psnr']:.2f}",
            f"{m['output_psnr']:.2f}",
            f"{m['delta_psnr']:+.2f}",
        ]
    assert "different tasks (val 2, test 3)" in summary
    assert (out / "config.yaml").is_file()


def test_no_arguments_without_weights_says_to_train_first(repo_root, tmp_path):
    job = subprocess.run(
        [sys.executable, str(repo_root / "jobs" / "evaluate.py")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert job.returncode == 2, job.stderr
    assert "Traceback" not in job.stderr and "python jobs/train.py" in job.stderr
    assert f"no trained weights at {TRAINED_WEIGHTS}" in job.stderr and not (tmp_path / "outputs").exists()


def test_cli_names_a_missing_dataset_or_split(tmp_path, capsys):
    assert main(["variant=paper_tiny", f"data.dataset={tmp_path / 'none'}"]) == 2
    assert "python jobs/build_dataset.py" in capsys.readouterr().err
    write_val_test_dataset(tmp_path / "d")
    assert main(["variant=paper_tiny", f"data.dataset={tmp_path / 'd'}", "splits=[train]"]) == 2
    assert "split 'train' has no samples" in (err := capsys.readouterr().err) and "its splits: test, val" in err
    assert main(["variant=paper_tiny", f"data.dataset={tmp_path / 'd'}", "tasks=[ct_low_dose]"]) == 2
    assert "tasks ['ct_low_dose'] have no 'val' samples" in capsys.readouterr().err
