"""Provenance of exported weights: what a trained network is, what it was trained on, and how well it did.

:func:`build_provenance` assembles the record that ``jobs/train.py`` writes beside the weights it exports (the
``provenance`` object of the ``.json`` sidecar, see :func:`datprl.models.factory.save_model`) and that serving reports
at ``GET /v1/model``: the model spec and training config, the steps trained, the SHA-256 of the dataset manifest, a
summary of the final validation table, the git commit of the code and the creation time.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

__all__ = ["build_provenance", "evaluation_summary", "git_state"]

#: Seconds a ``git`` call may take before the commit is recorded as unknown (a hung network filesystem, a huge tree).
GIT_TIMEOUT_S = 5.0
_SHA256 = re.compile(r"[0-9a-f]{64}")
_SUMMARY_METRICS = ("input_psnr", "output_psnr", "delta_psnr", "input_ssim", "output_ssim")


def _number(value: Any) -> float | None:
    """A metric as a JSON-safe float (4 decimals), None when missing or not finite."""
    if value is None:
        return None
    value = float(value)
    return round(value, 4) if math.isfinite(value) else None


def evaluation_summary(evaluation: dict) -> dict:
    """The headline of an evaluation (``EvalResult.to_json()``): split, dataset, image and task counts, the mean over
    tasks of input/output PSNR and SSIM and their delta, the same for seen and zero-shot tasks when they are told
    apart, and each task's output-minus-input PSNR. Per-image scores are left out (they stay in the eval folder)."""
    missing = [key for key in ("rows", "mean", "split") if key not in evaluation]
    if missing:
        raise ValueError(
            f"evaluation lacks {missing}; pass EvalResult.to_json() (platform/evaluation/report.py), "
            "or None when nothing was evaluated"
        )
    mean = evaluation["mean"]
    summary: dict[str, Any] = {
        "split": evaluation["split"],
        "dataset": evaluation.get("dataset") or None,
        "n_images": mean.get("n_images", evaluation.get("n_images")),
        "n_tasks": mean.get("n_tasks", len(evaluation["rows"])),
        "mean": {key: _number(mean.get(key)) for key in _SUMMARY_METRICS},
    }
    for part in ("seen", "zero_shot"):
        if isinstance(mean.get(part), dict):
            summary[f"mean_{part}"] = {key: _number(mean[part].get(key)) for key in _SUMMARY_METRICS}
    summary["tasks"] = [
        {
            "domain": row["domain"],
            "task": row["task"],
            "zero_shot": bool(row.get("zero_shot", False)),
            "n": row.get("n"),
            "delta_psnr": _number(row.get("delta_psnr")),
        }
        for row in evaluation["rows"]
    ]
    return summary


def git_state(path: str | Path | None = None) -> tuple[str | None, bool | None]:
    """(commit, dirty) of the git repository holding ``path`` (default: this file), or (None, None) when git is not
    installed, the file is not in a repository (an installed wheel, a Ray job's uploaded working dir without
    ``.git``), or git does not answer within :data:`GIT_TIMEOUT_S`. ``dirty``: tracked files differ from the commit."""
    where = Path(path if path is not None else __file__).resolve()
    folder = where if where.is_dir() else where.parent

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", *args], cwd=folder, capture_output=True, text=True, timeout=GIT_TIMEOUT_S, check=False
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    top = git("rev-parse", "--show-toplevel")
    if not top:
        return None, None
    # A package installed into a virtualenv that lives inside some repository is not that repository's code.
    inside = where.relative_to(Path(top).resolve()).parts if where.is_relative_to(Path(top).resolve()) else ()
    if not inside or {"site-packages", "dist-packages"} & set(inside):
        return None, None
    commit = git("rev-parse", "HEAD")
    if not commit:
        return None, None  # a repository without commits yet
    status = git("status", "--porcelain", "--untracked-files=no")
    return commit, (None if status is None else bool(status))


def _package_version() -> str | None:
    try:
        return metadata.version("datprl-ir")
    except metadata.PackageNotFoundError:
        return None


def build_provenance(
    config_dict: dict,
    *,
    model_spec: str,
    steps: int,
    manifest_sha256: str | None,
    evaluation: dict | None,
    init: dict | None = None,
) -> dict:
    """The provenance record of weights exported after training (JSON-compatible).

    ``config_dict``: the resolved training config (``config_to_dict(TrainConfig)``). ``model_spec``: the network as
    a string (e.g. ``"paper_tiny (task_pool.top_k=4)"``). ``steps``: optimisation steps trained. ``manifest_sha256``:
    SHA-256 of the dataset's manifest (None when unknown). ``evaluation``: ``EvalResult.to_json()`` of the final
    validation, summarised by :func:`evaluation_summary`, or None. ``init``: the weights training started from (the
    ``init`` section: path, sha256, kind export/published, strict, key counts; from
    :func:`datprl.platform.train.init_weights.check_init`), None for a network trained from scratch. Adds the git
    commit (and whether tracked files were modified) of the code when it runs from a git checkout, the UTC creation
    time and the package version.
    """
    if not isinstance(config_dict, dict):
        raise TypeError(f"config_dict must be a dict (config_to_dict(config)), not {type(config_dict).__name__}")
    try:
        config = json.loads(json.dumps(config_dict))
    except (TypeError, ValueError) as err:
        raise ValueError(f"config_dict is not JSON-compatible ({err}); pass config_to_dict(config)") from None
    if not isinstance(model_spec, str) or not model_spec.strip():
        raise ValueError(f"model_spec must name the network (e.g. 'paper_tiny'), got {model_spec!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be the number of optimisation steps trained (an int >= 0), got {steps!r}")
    if manifest_sha256 is not None and not _SHA256.fullmatch(manifest_sha256):
        raise ValueError(
            f"manifest_sha256 must be 64 lower-case hex digits (hashlib.sha256(...).hexdigest()) or "
            f"None, got {manifest_sha256!r}"
        )
    if init is not None and (not isinstance(init, dict) or not _SHA256.fullmatch(str(init.get("sha256")))):
        raise ValueError(
            f"init must be the record of the weights training started from (check_init(config): a dict with their "
            f"sha256) or None, got {init!r}"
        )
    commit, dirty = git_state()
    return {
        "trained": True,
        "model": model_spec,
        "config": config,
        "steps": steps,
        "dataset_manifest_sha256": manifest_sha256,
        "evaluation": None if evaluation is None else evaluation_summary(evaluation),
        "init": None if init is None else json.loads(json.dumps(init)),
        "git_commit": commit,
        "git_dirty": dirty,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "datprl_version": _package_version(),
    }
