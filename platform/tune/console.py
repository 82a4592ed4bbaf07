"""The sweep's console: one line per trial event instead of Ray Tune's status tables. Imports Ray Tune, so the driver
imports this module only after Ray is started (``datprl.platform.runtime.loopback_only`` must run first)."""

from __future__ import annotations

import time
from typing import Any

from ray.tune import Callback

from datprl.platform.tune.config import POOLS


def _params_text(params: dict[str, Any]) -> str:
    parts, done = [], set()
    for pool in POOLS:
        if f"{pool}.size" in params:
            parts.append(f"{pool} {params[f'{pool}.size']}/top-{params[f'{pool}.top_k']}")
            done |= {f"{pool}.size", f"{pool}.top_k"}
    for key, value in params.items():
        if key not in done:
            parts.append(f"{key} {value:.3g}" if isinstance(value, float) else f"{key} {value}")
    return ", ".join(parts)


class TrialLines(Callback):
    """The console of a sweep: one line per trial event (started, validated, finished, stopped early, failed), in
    place of Ray Tune's status tables (``verbose=0``)."""

    def __init__(self, metric: str, steps: int, total: int):
        self.metric, self.steps, self.total = metric, steps, total
        self.started: dict[str, float] = {}
        self.numbers: dict[str, int] = {}

    def _name(self, trial, trials=()) -> str:
        # The trial's place among the sweep's trials (a restored sweep lists its earlier trials too), so a trial keeps
        # its number across launches.
        if trial.trial_id not in self.numbers:
            ids = [t.trial_id for t in trials]
            self.numbers[trial.trial_id] = ids.index(trial.trial_id) + 1 if trial.trial_id in ids else len(ids) + 1
        return f"trial {self.numbers[trial.trial_id]}/{self.total} {trial.trial_id}"

    def _print(self, text: str) -> None:
        print(f"[tune] {text}", flush=True)

    def on_trial_start(self, iteration, trials, trial, **info):
        self.started[trial.trial_id] = time.monotonic()
        before = (trial.last_result or {}).get("step")
        how = (
            f"restarted (reported step {before} before; training resumes from its last checkpoint)"
            if before
            else ("started")
        )
        self._print(f"{self._name(trial, trials)} {how}: {_params_text(trial.config)}")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if self.metric in result:
            value = result[self.metric]
            self._print(
                f"{self._name(trial, trials)} step {result.get('step')}/{self.steps}: {self.metric} {value:+.4f}"
            )

    def on_trial_complete(self, iteration, trials, trial, **info):
        last = trial.last_result or {}
        step, value = last.get("step"), last.get(self.metric)
        shown = f"{self.metric} {value:+.4f}" if isinstance(value, (int, float)) else f"no {self.metric}"
        took = time.monotonic() - self.started.get(trial.trial_id, time.monotonic())
        how = "finished" if step is not None and step >= self.steps else "stopped early by ASHA"
        self._print(f"{self._name(trial, trials)} {how} at step {step}/{self.steps}: {shown} ({took:.0f} s)")

    def on_trial_error(self, iteration, trials, trial, **info):
        error = str(getattr(trial, "error_msg", None) or "see its error.txt").strip().splitlines()
        self._print(
            f"{self._name(trial, trials)} failed: {error[-1] if error else 'unknown error'} (trial folder {trial.path})"
        )
