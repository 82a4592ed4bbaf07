"""The training job's console: the driver's progress display (datprl.platform.train.progress) follows the reports
appended to metrics.jsonl, and a real ``python jobs/train.py`` run prints the bar, the validation lines and the final
table without Ray's own chatter (Ray Data execution plans, Ray Train report dumps, deprecation warnings)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from datprl.platform.train.progress import TrainingProgress

POLL_S = 0.02


def _append(path: Path, text: str) -> None:
    with path.open("a") as f:
        f.write(text)


def _report(step: int, resumed: int = 0, **extra) -> str:
    fields = {"step": step, "resumed_from_step": resumed, "loss": 1.0 / step, "lr": 1e-3, "samples_per_s": 3.0}
    return json.dumps({**fields, **extra}) + "\n"


def _wait_for(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("the progress display did not take the report in time")
        time.sleep(POLL_S)


VALIDATION = {"val_psnr": 7.91, "val_input_psnr": 7.78, "val_delta_psnr/haze": 0.13, "val_delta_psnr/sr_x4": -0.02}


def test_captured_console_gets_whole_lines_of_the_new_reports_and_the_final_state(tmp_path, capsys):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(_report(3, val_psnr=99.99, val_input_psnr=1.0))  # an earlier attempt's report: not shown
    stream = io.StringIO()  # not a terminal
    with TrainingProgress(
        metrics, total_steps=6, start_step=3, file=stream, poll_s=POLL_S, line_interval_s=3600
    ) as progress:
        line = _report(4)
        _append(metrics, line[:10])  # a report half written: wait for the rest of its line
        time.sleep(10 * POLL_S)
        assert progress.step == 3 and progress.last is None
        _append(metrics, line[10:])
        _wait_for(lambda: progress.step == 4)
        _append(metrics, _report(5))
        _append(metrics, _report(6, **VALIDATION))  # read by the final drain at the latest
    assert progress.step == 6 and progress.last["val_psnr"] == 7.91
    bar = stream.getvalue()
    assert "\r" not in bar  # no redraws piled up in a log
    lines = bar.splitlines()
    # The first report, then nothing for line_interval_s, then the final state.
    assert len(lines) == 2, lines
    assert lines[0].startswith("train:  67%|") and "4/6" in lines[0] and "loss 0.2500" in lines[0]
    assert lines[1].startswith("train: 100%|") and "6/6" in lines[1] and "loss 0.1667, 3.0 samples/s" in lines[1]
    out = capsys.readouterr().out
    assert out == "[train] step 6 validation: PSNR 7.91 dB (input 7.78); per task dB vs input: haze +0.13 sr_x4 -0.02\n"


def test_verbose_prints_one_plain_line_per_report_and_notes_a_restart(tmp_path, capsys):
    metrics = tmp_path / "metrics.jsonl"
    stream = io.StringIO()
    with TrainingProgress(metrics, total_steps=6, enabled=False, file=stream, poll_s=POLL_S) as progress:
        for count, (step, resumed) in enumerate(((2, 0), (4, 0), (4, 3), (6, 3)), 1):  # restarted from step 3
            _append(metrics, _report(step, resumed))
            _wait_for(lambda n=count: progress.reports == n)
    assert stream.getvalue() == ""  # no bar
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "[train] step 2/6 loss 0.5000 lr 1.00e-03 3.0 samples/s"
    assert lines[1].startswith("[train] step 4/6 loss 0.2500 lr 1.00e-03 3.0 samples/s ETA ")  # rate of steps 2-4
    assert lines[2].startswith(
        "[train] training restarted from the checkpoint of step 3 (the previous attempt reached step 4"
    )
    assert lines[3] == "[train] step 4/6 loss 0.2500 lr 1.00e-03 3.0 samples/s"  # a new attempt: no rate yet
    assert lines[4] == "[train] step 6/6 loss 0.1667 lr 1.00e-03 3.0 samples/s"
    assert len(lines) == 5


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_terminal_bar_is_redrawn_in_place_and_left_at_its_final_state(tmp_path, capsys):
    metrics = tmp_path / "metrics.jsonl"
    terminal = _Terminal()
    with TrainingProgress(metrics, total_steps=4, file=terminal, poll_s=POLL_S) as progress:
        _append(metrics, _report(2))
        _wait_for(lambda: progress.step == 2)
        _append(metrics, _report(4, **VALIDATION))
    drawn = terminal.getvalue()
    assert drawn.endswith("\n")  # closed with leave=True: the final state stays
    final = drawn.rstrip("\n").split("\r")[-1]
    assert final.startswith("train: 100%|") and "4/4" in final and "loss 0.2500" in final
    assert "2/4" in drawn  # the intermediate state was drawn too
    assert "[train] step 4 validation: PSNR 7.91 dB" in capsys.readouterr().out


def test_malformed_lines_are_skipped(tmp_path, capsys):
    metrics = tmp_path / "metrics.jsonl"
    with TrainingProgress(metrics, total_steps=2, enabled=False, file=io.StringIO(), poll_s=POLL_S) as progress:
        _append(metrics, "not json\n" + json.dumps({"loss": 1.0}) + "\n" + _report(2))
    assert progress.step == 2
    assert capsys.readouterr().out.splitlines() == ["[train] step 2/2 loss 0.5000 lr 1.00e-03 3.0 samples/s"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(total_steps=0), "total_steps=0"),
        (dict(total_steps=5, start_step=6), "start_step=6 is outside 0..total_steps=5"),
    ],
)
def test_bad_arguments_name_the_problem(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        TrainingProgress(tmp_path / "metrics.jsonl", **kwargs)


QUIET_PROBE = """
import json, logging, os, sys
from datprl.platform.runtime import quiet_ray_logging, quiet_ray_train_worker

logging.getLogger().addHandler(logging.StreamHandler())  # a console at INFO, as Ray Train gives its workers
logging.getLogger().setLevel(logging.INFO)
quiet_ray_logging(local=sys.argv[1] == "local")
logging.getLogger("ray.data._internal.execution.streaming_executor").info("Execution plan of Dataset d: ...")
logging.getLogger("ray.data._internal.progress").warning("Progress bars disabled. To enable, set ...")
logging.getLogger("ray.data.probe").warning("a Ray Data warning")
quiet_ray_train_worker()
from ray.train.v2._internal.execution import context
context.logger.info("Reporting training result 1: TrainingReport(...)")
context.logger.warning("a Ray Train warning")
names = ("RAY_DATA_LOGGING_CONFIG", "PYTHONWARNINGS", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER")
print(json.dumps({name: os.environ.get(name) for name in names}))
"""


@pytest.mark.parametrize("where", ["local", "cluster"])
def test_quiet_ray_logging_keeps_info_off_the_console_and_warnings_on(repo_root, tmp_path, where):
    """Without starting Ray: Ray Data's INFO lines and its progress-bar notice stay off the console (its log file
    still takes DEBUG), warnings still show, the variables the local Ray's workers inherit are set, and a worker's
    Ray Train report line (logged outside the ``ray.train`` loggers) is quietened."""
    drop = ("RAY_DATA_LOGGING_CONFIG", "PYTHONWARNINGS", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "RAY_ADDRESS")
    env = {**{k: v for k, v in os.environ.items() if k not in drop}, "TMPDIR": str(tmp_path)}
    job = subprocess.run(
        [sys.executable, "-c", QUIET_PROBE, where], cwd=repo_root, env=env, capture_output=True, text=True, timeout=120
    )
    assert job.returncode == 0, job.stderr
    console = job.stderr
    assert "a Ray Data warning" in console and "a Ray Train warning" in console
    for chatter in ("Execution plan", "Progress bars disabled", "Reporting training result"):
        assert chatter not in console, console
    variables = json.loads(job.stdout)
    assert variables["PYTHONWARNINGS"] == "ignore::DeprecationWarning"
    assert variables["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == ("0" if where == "local" else None)
    data_config = Path(variables["RAY_DATA_LOGGING_CONFIG"])
    assert data_config.parent.parent == tmp_path  # under the temporary folder
    config = json.loads(data_config.read_text())
    assert config["handlers"]["console"]["level"] == "WARNING" and config["loggers"]["ray.data"]["level"] == "DEBUG"


RAY_CHATTER = (
    "Execution plan",
    "Starting execution",
    "execution finished",
    "TrainingReport(",
    "Reporting training result",
    "DeprecationWarning",
    "PreemptionWatcher",
    "Progress bars disabled",
)


@pytest.mark.ray
@pytest.mark.e2e
def test_train_job_console_has_the_bar_and_the_table_but_no_ray_chatter(repo_root, tmp_path):
    """``python jobs/train.py`` as a person runs it (its own local Ray, output captured: not a terminal): the bar's
    final state, the validation lines and the evaluation table are there; Ray's INFO logs and deprecation warnings
    are not."""
    from conftest import write_tiny_dataset

    dataset = write_tiny_dataset(tmp_path / "tiny")
    args = [
        "name=console",
        f"storage={tmp_path / 'runs'}",
        f"output_dir={tmp_path / 'out'}",
        f"data.dataset={dataset}",
        "data.crop_size=32",
        "steps=6",
        "log_every=2",
        "checkpoint_every=3",
        "validate_every=3",
        "evaluate_split=train",
        "cpus_per_worker=0.5",
        "build_dataset_if_missing=false",
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PYTHONWARNINGS", "RAY_DATA_LOGGING_CONFIG")}
    job = subprocess.run(
        [sys.executable, "jobs/train.py", *args], cwd=repo_root, env=env, capture_output=True, text=True, timeout=540
    )
    console = job.stdout + job.stderr
    assert job.returncode == 0, console[-4000:]
    chatter = [line for line in console.splitlines() if any(marker in line for marker in RAY_CHATTER)]
    assert not chatter, "\n".join(chatter)
    assert any(line.startswith("train: 100%|") and "6/6" in line for line in job.stderr.splitlines()), job.stderr
    assert "[train] step 3 validation: PSNR" in job.stdout and "[train] step 6 validation: PSNR" in job.stdout
    assert "| **Mean** | all tasks (3) |" in job.stdout  # the final table
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 3, 4, 6]
