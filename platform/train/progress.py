"""The driver's console during training: one progress bar (step/total, loss, samples/s, ETA) with the validation
results written above it, fed by the reports of the training workers.

    with TrainingProgress(Path(config.output_dir) / "metrics.jsonl", total_steps=config.steps, start_step=step):
        result = trainer.fit()

The driver does not receive the reports itself: Ray Train V2 hands them to its controller actor, whose callback
(``_metrics_log`` in :mod:`datprl.platform.train.fit`) appends rank 0's metrics of every report as one JSON line to
``<output_dir>/metrics.jsonl``. A background thread tails that file, from where it ended when the block was entered (a
resumed run appends to the file of its earlier attempts), and updates the display; leaving the block reads the last
lines and closes the bar. On a terminal the bar is drawn in place (tqdm); in a captured console (a pipe, a log file)
it is written as whole lines instead -- the first report, then at most one line every ``line_interval_s``, and the
final state -- so no carriage-return redraws pile up in the log. ``enabled=False`` (``verbose=true``) prints one
plain ``[train] step N/T ...`` line per report instead of the bar.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from pathlib import Path
from typing import TextIO

from tqdm import tqdm

log = logging.getLogger(__name__)

#: The bar: ``train:  50%|#####     | 3/6 [00:21, loss 1.1439, 20.3 samples/s, ETA 00:10]``. tqdm's own rate and
#: remaining time are left out: they would count Ray's start-up (tens of seconds before the first step) as training.
BAR_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]"
POLL_S = 0.5  # how often the file is checked; reports come every log_every steps (seconds to minutes apart)
LINE_INTERVAL_S = 30.0  # captured console: at most one progress line this often (plus the first and the last)


class TrainingProgress:
    """A context manager that shows the training reports appended to ``metrics_path`` while its block runs.

    ``total_steps`` is the run's last step and ``start_step`` the step it starts from (a resumed run's checkpoint);
    ``enabled=False`` prints plain step lines instead of the bar. ``file`` is the bar's stream (default
    ``sys.stderr``, tqdm's); step and validation lines go to ``sys.stdout`` with the job's other ``[train]`` lines.
    ``step`` is the last step reported, ``last`` the last report (None before the first) and ``reports`` how many
    reports were shown."""

    def __init__(
        self,
        metrics_path: Path,
        total_steps: int,
        start_step: int = 0,
        enabled: bool = True,
        *,
        file: TextIO | None = None,
        poll_s: float = POLL_S,
        line_interval_s: float = LINE_INTERVAL_S,
    ):
        if total_steps < 1:
            raise ValueError(f"total_steps={total_steps}: a run has at least one step (TrainConfig.steps >= 1)")
        if not 0 <= start_step <= total_steps:
            raise ValueError(
                f"start_step={start_step} is outside 0..total_steps={total_steps}; pass the step of the "
                "checkpoint the run resumes from, or 0"
            )
        self.metrics_path = Path(metrics_path)
        self.total_steps, self.start_step, self.enabled = total_steps, start_step, enabled
        self.step = start_step
        self.last: dict | None = None
        self.reports = 0
        self._file, self._poll_s, self._line_interval_s = file, poll_s, line_interval_s
        self._lock = threading.Lock()  # the thread's polls and the final drain never read the file at the same time
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._bar: tqdm | None = None
        self._stream: TextIO = sys.stderr
        self._offset = 0
        self._entered = 0.0
        self._attempt_start = start_step  # resumed_from_step of the attempt being shown
        self._rate_base: tuple[int, float] | None = None  # (step, time) of this attempt's first report
        self._rate: float | None = None  # steps/s since then
        self._last_at = 0.0
        self._line_at: float | None = None  # when the last progress line was written (captured console)
        self._line_step: int | None = None
        self._bad_lines = 0

    # -- the context manager ----------------------------------------------------------------------------------------

    def __enter__(self) -> TrainingProgress:
        self._stream = self._file if self._file is not None else sys.stderr
        try:
            self._offset = self.metrics_path.stat().st_size  # only the reports of this block
        except FileNotFoundError:
            self._offset = 0
        self._entered = time.monotonic()
        if self.enabled and _is_terminal(self._stream):
            self._bar = tqdm(
                total=self.total_steps,
                initial=self.start_step,
                desc="train",
                unit="step",
                file=self._stream,
                bar_format=BAR_FORMAT,
                dynamic_ncols=True,
                leave=True,
            )
            self._bar.set_postfix_str("starting", refresh=True)
        self._thread = threading.Thread(target=self._follow, name="training-progress", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10 * self._poll_s + 5)
        try:
            self._poll()  # the reports written between the thread's last look and the end of the block
        except Exception as err:  # noqa: BLE001 - the display must never replace the block's own outcome
            log.warning("training progress: could not read %s: %s", self.metrics_path, err)
        if self._bar is not None:
            self._bar.set_postfix_str(self._postfix(), refresh=False)
            self._bar.close()  # leave=True: the final state stays on the terminal
        elif self.enabled and self.last is not None and self._line_step != self.step:
            self._write_line()
        return False

    # -- reading the reports ------------------------------------------------------------------------------------------

    def _follow(self) -> None:
        while not self._stop.wait(self._poll_s):
            try:
                self._poll()
                if self._bar is not None:
                    with tqdm.get_lock():  # the elapsed time and the ETA tick between reports
                        self._bar.set_postfix_str(self._postfix(), refresh=True)
            except Exception as err:  # noqa: BLE001 - training goes on without a display; say why once
                log.warning("training progress display stopped: %s", err)
                return

    def _poll(self) -> None:
        with self._lock:
            try:
                size = self.metrics_path.stat().st_size
            except FileNotFoundError:
                return  # the controller creates it with the first report
            if size < self._offset:
                self._offset = 0  # replaced by a new, shorter file: read it from the start
            if size == self._offset:
                return
            with self.metrics_path.open("rb") as f:
                f.seek(self._offset)
                data = f.read(size - self._offset)
            end = data.rfind(b"\n")
            if end < 0:
                return  # a line still being written: wait for its end
            self._offset += end + 1
            for raw in data[:end].splitlines():
                if raw.strip():
                    self._take(raw)

    def _take(self, raw: bytes) -> None:
        try:
            report = json.loads(raw)
            step = int(report["step"])
        except (ValueError, KeyError, TypeError) as err:
            self._bad_lines += 1
            if self._bad_lines == 1:
                log.warning(
                    "training progress: skipping a line of %s that is not a report (%s): %.200r",
                    self.metrics_path,
                    err,
                    raw,
                )
            return
        now = time.monotonic()
        resumed = report.get("resumed_from_step")
        if isinstance(resumed, int) and resumed != self._attempt_start:
            if self.last is not None:  # a new attempt during this block: Ray Train restarted the worker group
                self._say(
                    f"[train] training restarted from the checkpoint of step {resumed} (the previous attempt "
                    f"reached step {self.step}; Ray Train restarts the workers after a failure)"
                )
            self._attempt_start, self._rate_base, self._rate = resumed, None, None
        if self._rate_base is None:
            self._rate_base = (step, now)
        elif step > self._rate_base[0] and now > self._rate_base[1]:
            self._rate = (step - self._rate_base[0]) / (now - self._rate_base[1])
        self.step, self.last, self._last_at = step, report, now
        self.reports += 1
        if not self.enabled:
            self._say(self._plain_line(report))
        elif self._bar is not None:
            with tqdm.get_lock():
                self._bar.n = min(step, self.total_steps)
                self._bar.set_postfix_str(self._postfix(), refresh=True)
        elif self._line_at is None or now - self._line_at >= self._line_interval_s or step >= self.total_steps:
            self._write_line()
        if isinstance(report.get("val_psnr"), (int, float)):
            self._say(_validation_line(report))

    # -- what is shown ------------------------------------------------------------------------------------------------

    def _eta_s(self) -> float | None:
        if self._rate is None or self._rate <= 0 or self.step >= self.total_steps:
            return None
        return max(0.0, (self.total_steps - self.step) / self._rate - (time.monotonic() - self._last_at))

    def _parts(self, report: dict, with_lr: bool) -> list[str]:
        """The report's loss, the alignment loss L_align when it is on, (learning rate,) samples/s and the ETA, each
        where known."""
        shown = [
            ("loss", "loss {:.4f}"),
            ("loss_align", "align {:.3f}"),
            *([("lr", "lr {:.2e}")] if with_lr else []),
            ("samples_per_s", "{:.1f} samples/s"),
        ]
        parts = [fmt.format(report[key]) for key, fmt in shown if isinstance(report.get(key), (int, float))]
        eta = self._eta_s()
        if eta is not None:
            parts.append(f"ETA {tqdm.format_interval(eta)}")
        return parts

    def _postfix(self) -> str:
        return "starting" if self.last is None else ", ".join(self._parts(self.last, with_lr=False))

    def _plain_line(self, report: dict) -> str:
        return " ".join([f"[train] step {report['step']}/{self.total_steps}", *self._parts(report, with_lr=True)])

    def _write_line(self) -> None:
        """The bar as one whole line, for a console that is not a terminal."""
        stream = self._stream
        text = tqdm.format_meter(
            min(self.step, self.total_steps),
            self.total_steps,
            time.monotonic() - self._entered,
            prefix="train",
            bar_format=BAR_FORMAT,
            postfix=self._postfix(),
            initial=self.start_step,
            ascii=not _unicode(stream),
        )
        stream.write(text + "\n")
        stream.flush()
        self._line_at, self._line_step = time.monotonic(), self.step

    def _say(self, text: str) -> None:
        """A line on stdout above the bar (tqdm clears the bar, writes, redraws it)."""
        out = sys.stdout
        with tqdm.external_write_mode(file=out):
            out.write(text + "\n")
            out.flush()


def _validation_line(report: dict) -> str:
    line = f"[train] step {report['step']} validation: PSNR {report['val_psnr']:.2f} dB"
    if isinstance(report.get("val_input_psnr"), (int, float)):
        line += f" (input {report['val_input_psnr']:.2f})"
    deltas = {
        k.split("/", 1)[1]: v
        for k, v in report.items()
        if k.startswith("val_delta_psnr/") and isinstance(v, (int, float))
    }
    if deltas:
        line += "; per task dB vs input: " + " ".join(f"{task} {delta:+.2f}" for task, delta in deltas.items())
    return line


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def _unicode(stream: TextIO) -> bool:
    # The block characters of the bar need an encoding that has them; ASCII '#' otherwise.
    return "utf" in (getattr(stream, "encoding", None) or "").lower()
