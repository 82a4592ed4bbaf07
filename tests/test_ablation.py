"""The ablation job (datprl.platform.train.ablation): arms x seeds trained at equal budget through the training job's
own code path, aggregated into a table whose numbers are the means of the raw rows, resumed without retraining, and
config mistakes named by field. One tiny ablation (2 arms x 2 seeds x 3 steps on 32 px crops of two tasks) serves
the end-to-end tests; Ray Train start-up dominates its cost (about a minute on 2 cores)."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
import pytest

from conftest import small_corpus
from datprl.platform.data.handle import DatasetHandle
from datprl.platform.data.pipeline import DataConfig
from datprl.platform.train.ablation import (
    AblationArm,
    AblationConfig,
    Score,
    aggregate,
    main,
    ordering_sentence,
    run_ablation,
    run_config,
)
from datprl.platform.train.config import TrainConfig

TASKS = ["haze", "sr_x4"]
# The two cheapest arms (no text encoder to load; the priors path is the training job's, tested in test_train.py).
ARMS = [
    AblationArm(name="no_pools", variant="restormer_tiny"),
    AblationArm(name="task_pool_only", variant="task_only_tiny"),
]
SEEDS = [0, 1]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return small_corpus(tmp_path_factory.mktemp("ablation-corpus") / "default")


def _config(dataset: Path, root: Path, steps: int = 3) -> AblationConfig:
    """2 arms x 2 seeds x ``steps`` steps on 32 px crops of two tasks, one worker with half a CPU (Ray Data keeps the
    rest), evaluated on the test split only on 32 px central crops (val would double the evaluation time; the training
    job evaluates every task of the split, not only those trained); every path under ``root``."""
    train = TrainConfig(
        storage=str(root / "storage"),
        data=DataConfig(
            dataset=str(dataset), crop_size=32, tasks=TASKS, per_task_batch=1, shuffle_buffer=4, eval_crop=32
        ),
        build_dataset_if_missing=False,
        steps=steps,
        cpus_per_worker=0.5,
        validate_every=None,
        checkpoint_every=3,
        log_every=3,
        evaluate_split=None,
    )
    return AblationConfig(train=train, arms=ARMS, seeds=SEEDS, output_dir=str(root / "out"))


@pytest.fixture(scope="module")
def ablation(dataset, tmp_path_factory, ray_local) -> tuple[AblationConfig, Path]:
    root = tmp_path_factory.mktemp("ablation")
    config = _config(dataset, root)
    assert run_ablation(config) == 0
    return config, root


def _csv_rows(out: Path) -> list[dict]:
    with (out / "ablation.csv").open() as f:
        return list(csv.DictReader(f))


def _markdown_cells(markdown: str, split: str) -> dict[str, list[str]]:
    """Arm -> the cells of its row in the delta table of ``split``."""
    section = markdown.split(f"## `{split}`", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| arm ")]
    table = {}
    for line in rows:
        cells = [c.strip().strip("*") for c in line.strip("|").split("|")]
        table.setdefault(cells[0], cells[1:])  # the first table of the section: the delta table
    return table


# The three Ray checks share one 4-run ablation (about 3 minutes on 2 cores): marked slow, CI runs them after the
# default suite.
@pytest.mark.slow
@pytest.mark.ray
def test_ablation_writes_table_csv_and_plot_from_the_raw_numbers(ablation):
    config, root = ablation
    out = root / "out"
    for name in ("ablation.md", "ablation.csv", "ablation.png", "config.yaml"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "ablation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for arm in ARMS:
        for seed in SEEDS:
            assert (out / "runs" / f"{arm.name}_s{seed}" / "eval-test" / "metrics.json").exists()

    rows = _csv_rows(out)
    raw = [r for r in rows if r["kind"] == "raw" and r["split"] == "test"]
    tasks = DatasetHandle.open(str(config.train.data.dataset)).tasks("test")
    assert len(raw) == len(ARMS) * len(SEEDS) * len(tasks)
    assert {(r["arm"], int(r["seed"]), r["task"]) for r in raw} == {
        (a.name, s, t) for a in ARMS for s in SEEDS for t in tasks
    }

    markdown = (out / "ablation.md").read_text()
    cells = _markdown_cells(markdown, "test")
    for arm in ARMS:
        mine = [r for r in raw if r["arm"] == arm.name]
        expected = []
        for domain, task in sorted({(r["domain"], r["task"]) for r in mine}):  # the table's columns
            deltas = [float(r["delta_psnr"]) for r in mine if r["task"] == task]
            expected.append(f"{np.mean(deltas):+.2f} ± {np.std(deltas, ddof=1):.2f}")
        per_seed = [np.mean([float(r["delta_psnr"]) for r in mine if int(r["seed"]) == s]) for s in SEEDS]
        expected.append(f"{np.mean(per_seed):+.2f} ± {np.std(per_seed, ddof=1):.2f}")
        assert cells[arm.name] == expected, (arm.name, cells[arm.name], expected)
        assert all(abs(float(r["output_psnr"]) - float(r["input_psnr"]) - float(r["delta_psnr"])) < 1e-5 for r in mine)
    assert "Ordered by mean delta PSNR" in markdown and "seeds 0, 1" in markdown and "3 steps" in markdown
    assert "paper_backbone" in markdown  # the footnote: no_pools stands for both backbones


@pytest.mark.slow
@pytest.mark.ray
def test_second_launch_reuses_every_run(ablation, capsys):
    config, root = ablation
    metrics = sorted((root / "out" / "runs").glob("*/eval-test/metrics.json"))
    before = {p: p.stat().st_mtime_ns for p in metrics}
    capsys.readouterr()
    assert run_ablation(config) == 0
    printed = capsys.readouterr().out
    assert printed.count("reused") == len(ARMS) * len(SEEDS), printed
    assert {p: p.stat().st_mtime_ns for p in metrics} == before  # nothing trained or evaluated again


@pytest.mark.slow
@pytest.mark.ray
def test_results_of_another_budget_are_not_mixed_in(ablation, dataset, capsys):
    _, root = ablation
    assert run_ablation(_config(dataset, root, steps=4)) == 2
    assert "steps: 3 there, 4 asked for" in capsys.readouterr().err


def test_unknown_variant_is_named_by_field(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--dry-run", "arms=[{name: a, variant: nope}]"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "arms[0].variant" in err and "'restormer_tiny'" in err and "'nope'" in err


def test_config_checks():
    with pytest.raises(ValueError, match=r"arms\n.*arm names must differ.*'a'"):
        AblationConfig(arms=[AblationArm(name="a", variant="paper_tiny")] * 2)
    with pytest.raises(ValueError, match="no domain pool"):
        AblationArm(name="a", variant="task_only_tiny", priors=True)
    with pytest.raises(ValueError, match="text_embeddings is null"):
        AblationConfig(train=TrainConfig(text_embeddings=None))  # the default arms include one with priors
    assert [a.name for a in AblationConfig().arms] == [
        "no_pools",
        "task_pool_only",
        "both_pools_no_priors",
        "both_pools_with_priors",
    ]


def test_the_no_priors_arm_trains_the_domain_keys_the_variant_fixes():
    """paper_tiny fixes its domain keys at the descriptions' domain means; an arm without descriptions trains them (they
    would otherwise stay at their random start), and the arm with priors keeps the variant as it is."""
    config = AblationConfig()
    networks = {arm.name: run_config(config, arm, seed=0).model.resolve() for arm in config.arms}
    assert networks["both_pools_with_priors"].domain_pool.fixed_keys
    assert not networks["both_pools_no_priors"].domain_pool.fixed_keys
    assert networks["both_pools_no_priors"].domain_pool.query_centering is False  # otherwise the same pool
    assert networks["task_pool_only"].domain_pool is None


def _scores(arm: str, table: dict[int, dict[str, float]], input_psnr: float = 20.0) -> list[Score]:
    """Scores of ``arm``: seed -> task -> delta PSNR, every input at ``input_psnr``."""
    return [
        Score("test", arm, seed, "d", task, 1, input_psnr, input_psnr + delta)
        for seed, tasks in table.items()
        for task, delta in tasks.items()
    ]


def test_aggregate_on_hand_made_numbers():
    scores = (
        _scores("a", {0: {"x": 1.0, "y": 3.0}, 1: {"x": 2.0, "y": 5.0}, 2: {"x": 3.0, "y": 4.0}})
        + _scores("b", {0: {"x": 0.5, "y": 0.5}, 1: {"x": 0.5, "y": 1.5}, 2: {"x": 0.5, "y": 1.0}})
        + _scores("c", {0: {"x": 0.4, "y": 0.4}, 1: {"x": 0.8, "y": 1.6}, 2: {"x": 1.0, "y": 1.0}})
    )
    a, b, c = aggregate(scores, ["a", "b", "c"])
    x, y = ("d", "x"), ("d", "y")
    assert (a.delta[x].mean, a.delta[x].std, a.delta[x].min, a.delta[x].max) == pytest.approx((2.0, 1.0, 1.0, 3.0))
    assert (a.delta[y].mean, a.delta[y].std) == pytest.approx((4.0, 1.0))
    assert a.output[y].mean == pytest.approx(24.0)
    # the mean over tasks is taken per seed (2, 3.5, 3.5), then over seeds: its std is the seeds' spread
    assert a.seed_means[1][0] == pytest.approx(3.5)
    assert (a.mean_delta.mean, a.mean_delta.std) == pytest.approx((3.0, np.std([2, 3.5, 3.5], ddof=1)))
    assert (a.mean_delta.min, a.mean_delta.max) == pytest.approx((2.0, 3.5))
    assert b.mean_delta.mean == pytest.approx(0.75) and c.mean_delta.mean == pytest.approx(0.8666667)
    assert aggregate(_scores("s", {7: {"x": 1.5}}))[0].mean_delta.std == 0.0  # one seed: no spread

    sentence = ordering_sentence([b, c, a])
    # a is far ahead; c and b differ by less than their seed std: marked as indistinguishable
    assert re.search(r"a \(\+3\.00 dB\) > c \(\+0\.87 dB\) ≈ b \(\+0\.75 dB\)", sentence), sentence
    assert "3 seeds" in sentence

    with pytest.raises(ValueError, match="seed 1 reports tasks"):
        aggregate(_scores("a", {0: {"x": 1.0, "y": 1.0}, 1: {"x": 1.0}}))
