"""The ablation job (datprl.platform.train.ablation): arms x seeds trained at equal budget through the training job's
own code path, aggregated into a table whose numbers are the means of the raw rows, resumed without retraining, and
config mistakes named by field. One tiny ablation (2 arms x 2 seeds x 3 steps on 32 px crops of two tasks) serves
the end-to-end tests; Ray Train start-up dominates its cost (about a minute on 2 cores)."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest

from PIL import Image

from conftest import small_corpus
from datprl.platform.config import load_config
from datprl.platform.data.handle import DatasetHandle
from datprl.platform.data.pipeline import DataConfig
from datprl.platform.train.ablation import (
    LABEL_HEIGHT,
    PANEL_GAP,
    AblationArm,
    AblationConfig,
    Score,
    aggregate,
    main,
    metrics_file,
    ordering_sentence,
    run_ablation,
    run_config,
    write_reports,
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


# --- reports from finished runs (fake run folders: no training) ----------------------------------------------------
ROUTING_ARMS = [
    AblationArm(name="paper_selection", variant="paper_tiny", priors=True),
    AblationArm(name="no_pools", variant="restormer_tiny"),  # no pools: no heatmap, no NMI
    AblationArm(name="task_label_routing", variant="paper_tiny_routed", priors=True),
]
# (width, height) of each arm's prompt_usage.png: different, so the composition's layout is checked.
PANEL_SIZES = {"paper_selection": (120, 70), "task_label_routing": (150, 90)}
NMI = {  # arm -> seed -> (task pool NMI with the task, domain pool NMI with the domain)
    "paper_selection": {0: (0.1, 0.8), 1: (0.3, 0.9)},
    "task_label_routing": {0: (0.9, 0.7), 1: (0.7, 0.9)},
}


def _fake_run(config: AblationConfig, arm: AblationArm, seed: int, splits: list[str]) -> None:
    """What a finished run leaves in its folder for each split: a ``metrics.json`` (two tasks, and with pools the
    selection NMIs as the evaluation stores them) and, with pools, a ``prompt_usage.png``."""
    run = run_config(config, arm, seed)
    for split in splits:
        path = metrics_file(run, split)
        path.parent.mkdir(parents=True, exist_ok=True)
        rows = [
            {"domain": "natural", "task": task, "n": 4, "input_psnr": 20.0, "output_psnr": 20.0 + delta + seed / 10}
            for task, delta in (("haze", 1.0), ("sr_x4", 0.5))
        ]
        usage = None
        if arm.name in NMI:
            task_nmi, domain_nmi = NMI[arm.name][seed]
            usage = {
                "task": {"nmi_task": task_nmi, "nmi_domain": 0.0},
                "domain": {"nmi_task": 0.0, "nmi_domain": domain_nmi},
            }
            colour = (200, 30, 30) if split == "test" else (30, 30, 200)
            Image.new("RGB", PANEL_SIZES[arm.name], colour).save(path.with_name("prompt_usage.png"))
        path.write_text(json.dumps({"rows": rows, "prompt_usage": usage}))


def test_reports_compose_the_heatmaps_and_list_the_nmis(tmp_path):
    splits = ["test", "val"]
    config = AblationConfig(arms=ROUTING_ARMS, seeds=[0, 1], output_dir=str(tmp_path / "out"))
    for seed in config.seeds:
        for arm in config.arms:
            _fake_run(config, arm, seed, splits)

    markdown = write_reports(config, splits)
    out = tmp_path / "out"
    assert (out / "ablation.md").read_text() == markdown
    panels = [PANEL_SIZES["paper_selection"], PANEL_SIZES["task_label_routing"]]  # no_pools has none
    for split in splits:
        with Image.open(out / f"prompt_usage_{split}.png") as figure:
            image = np.asarray(figure.convert("RGB"))
        assert image.shape[1] == sum(w for w, _ in panels) + PANEL_GAP * (len(panels) - 1)
        assert image.shape[0] == LABEL_HEIGHT + max(h for _, h in panels)
        # each panel pasted in the arms' order below the label band, its own split's heatmap
        colour = (200, 30, 30) if split == "test" else (30, 30, 200)
        assert tuple(image[LABEL_HEIGHT + 1, 1]) == colour
        assert tuple(image[LABEL_HEIGHT + 1, panels[0][0] + PANEL_GAP + 1]) == colour
        assert tuple(image[LABEL_HEIGHT + 1, panels[0][0] + 1]) == (255, 255, 255)  # the gap
        assert (image[:LABEL_HEIGHT] < 128).any()  # the arm labels
        assert f"[prompt_usage_{split}.png](prompt_usage_{split}.png)" in markdown
        section = markdown.split(f"## `{split}`", 1)[1].split("\n## ", 1)[0]
        assert "without a heatmap (their runs wrote none: no prompt pools): no_pools" in section
        nmi_rows = [line for line in section.splitlines() if line.startswith("| ") and "NMI" not in line]
        assert "| paper_selection | 0.20 ± 0.14 | 0.85 ± 0.07 |" in nmi_rows
        assert "| task_label_routing | 0.80 ± 0.14 | 0.80 ± 0.14 |" in nmi_rows
        assert "| no_pools | - | - |" in nmi_rows
    # the delta tables are the ones without the NMIs: mean over seeds 0 and 1 of +1.0 / +1.1 and +0.5 / +0.6
    assert _markdown_cells(markdown, "test")["no_pools"] == ["+1.05 ± 0.07", "+0.55 ± 0.07", "+0.80 ± 0.07"]


def test_reports_without_any_heatmap_say_so(tmp_path):
    config = AblationConfig(arms=ROUTING_ARMS[1:2], seeds=[0], output_dir=str(tmp_path / "out"))
    _fake_run(config, config.arms[0], 0, ["test", "val"])
    markdown = write_reports(config, ["test", "val"])
    assert not list((tmp_path / "out").glob("prompt_usage_*.png"))
    assert "No prompt-usage heatmaps: no run of seed 0 wrote one" in markdown
    assert "NMI" not in markdown  # no run reports one: no NMI table


def test_routing_config_parses_with_its_two_arms(repo_root):
    config = load_config(AblationConfig, repo_root / "infra" / "ablate-routing.yaml")
    assert [(a.name, a.variant, a.priors) for a in config.arms] == [
        ("paper_selection", "paper_tiny", True),
        ("task_label_routing", "paper_tiny_routed", True),
    ]
    assert config.seeds == [0, 1, 2] and config.output_dir == "outputs/ablation-routing"
    routed = run_config(config, config.arms[1], seed=0).model.resolve()
    assert routed.task_pool.routing == "task_labels" and (routed.task_pool.size, routed.task_pool.top_k) == (18, 2)
    assert run_config(config, config.arms[0], seed=0).model.resolve().task_pool.routing == "unsupervised"
    assert (
        "python jobs/ablate.py infra/ablate-routing.yaml" in (repo_root / "infra" / "ablate-routing.yaml").read_text()
    )
