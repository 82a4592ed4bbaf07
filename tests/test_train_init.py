"""Training from existing weights (the ``init`` section, datprl.platform.train.init_weights): our export loads
strictly and the published layout after renaming, a mismatch is named before Ray starts (exit 2) and loads partially
only when asked, ``train_only`` freezes the rest, ``loaded_lr`` gives the optimiser a second group on its own cosine
schedule, ``.pth`` files are read with ``torch.load(weights_only=True)`` only, the weights' SHA-256 reaches the
provenance, a resumed run ignores ``init.weights``, and bad fields are named. Everything here runs in-process on
CPU with the 1 M-parameter ``paper_tiny`` or the published fixture's tiny network; the one ``jobs/train.py`` run is in
the e2e tier."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import datprl.platform.train.fit as fit_module
from datprl.models import config_from_published, create_model, load_published, save_model, weights_digest
from datprl.models.losses import LossWeights
from datprl.models.network import PARTS, in_parts
from datprl.platform.config import ConfigError, config_to_dict, load_config
from datprl.platform.train.config import OptimConfig, TrainConfig
from datprl.platform.train.init_weights import check_init, read_init_weights
from datprl.platform.train.loop import build_training_state, train_step
from datprl.platform.train.provenance import build_provenance
from datprl.platform.train.runs import RunMismatch, check_run

from conftest import OFFICIAL_CHECKPOINT, forbid_ray

CPU = torch.device("cpu")
PUBLISHED_WEIGHTS = OFFICIAL_CHECKPOINT / "tiny.weights.safetensors"


pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """Our export of a paper_tiny with random weights (a non-zero output conv, so every part gets gradients)."""
    torch.manual_seed(7)
    model = create_model("paper_tiny")
    torch.nn.init.normal_(model.output.weight, std=0.02)
    path = save_model(model, tmp_path_factory.mktemp("export") / "start")
    return path, {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def published() -> tuple[dict, dict[str, torch.Tensor]]:
    return json.loads((OFFICIAL_CHECKPOINT / "tiny.config.json").read_text()), load_file(str(PUBLISHED_WEIGHTS))


def _published_model(published_config: dict, **changes) -> dict:
    """The model section that builds the published fixture's network (``paper`` with its sizes), with ``changes``."""
    c = config_from_published(published_config)
    spec = {
        "variant": "paper",
        "width": c.width,
        "encoder_blocks": list(c.encoder_blocks),
        "bottleneck_blocks": c.bottleneck_blocks,
        "decoder_blocks": list(c.decoder_blocks),
        "refinement_blocks": c.refinement_blocks,
        "prompt_dim": c.prompt_dim,
        "fusion_heads": c.fusion_heads,
        "task_pool": {"size": c.task_pool.size, "top_k": c.task_pool.top_k},
        "domain_pool": {"size": c.domain_pool.size, "top_k": c.domain_pool.top_k},
    }
    return {**spec, **changes}


def _config(**fields) -> TrainConfig:
    base = dict(
        loss=LossWeights(balance=0.0), optim=OptimConfig(lr=1e-3), text_embeddings=None, steps=10, name="init-test"
    )
    return TrainConfig(**{**base, **fields})


def _with_init(config: TrainConfig, **init) -> TrainConfig:
    """``config`` with another (validated) init section."""
    return TrainConfig.model_validate({**config.model_dump(), "init": init})


def _batch(size: int = 24, batch: int = 2) -> dict:
    generator = torch.Generator().manual_seed(1)
    lq = torch.rand(batch, 3, size, size, generator=generator)
    gt = (lq + 0.2 * torch.rand(batch, 3, size, size, generator=generator)).clamp(0, 1)
    return {"lq": lq, "gt": gt, "task": ["sr_x4"] * batch}


def _step(state: dict, config: TrainConfig) -> dict:
    s = state
    return train_step(
        s["net"], s["model"], _batch(), s["criterion"], s["optimizer"], s["scheduler"], s["params"], config, CPU, None
    )


def _equal_states(a: dict, b: dict, keys=None) -> bool:
    return all(torch.equal(a[k], b[k]) for k in (keys if keys is not None else a))


def test_our_export_loads_strictly_and_the_ema_starts_from_it(export, capsys):
    path, weights = export
    config = _config(init={"weights": str(path)}, optim=OptimConfig(lr=1e-3, ema_decay=0.99))
    record = check_init(config)
    assert record["kind"] == "export" and record["strict"] is True
    assert record["sha256"] == weights_digest(path)
    assert (record["loaded_keys"], record["missing_keys"], record["unexpected_keys"]) == (len(weights), 0, 0)
    assert "starting from init.weights" in capsys.readouterr().out

    state = build_training_state(config, CPU)
    assert _equal_states(weights, state["model"].state_dict())
    assert sorted(state["init_loaded"]) == sorted(weights)
    ema = state["ema"].module.state_dict()  # made after the load
    assert _equal_states(weights, ema, [k for k in weights if k in ema])


def test_published_layout_loads_as_load_published(published, tmp_path):
    published_config, published_weights = published
    config = _config(model=_published_model(published_config), init={"weights": str(PUBLISHED_WEIGHTS)})
    assert config.model.resolve() == config_from_published(published_config)
    record = check_init(config)
    assert record["kind"] == "published" and record["sha256"] == weights_digest(PUBLISHED_WEIGHTS)
    reference = load_published(published_config, published_weights).state_dict()
    assert _equal_states(reference, build_training_state(config, CPU)["model"].state_dict())

    # The released .pth layout: a torch pickle of tensors nested under "params", read with weights_only=True.
    pth = tmp_path / "published.pth"
    torch.save({"params": published_weights}, pth)
    read = read_init_weights(str(pth))
    assert read.kind == "published" and _equal_states(reference, read.state)


def test_a_shape_mismatch_names_the_key_and_loads_partially_when_asked(published):
    published_config, published_weights = published
    model = _published_model(published_config, task_pool={"size": 7, "top_k": 2})  # the fixture's pool has 5
    with pytest.raises(ValueError, match=r"task_pool\.prompt_\w+: \(5, .*init\.strict=false"):
        check_init(_config(model=model, init={"weights": str(PUBLISHED_WEIGHTS)}))

    config = _config(model=model, init={"weights": str(PUBLISHED_WEIGHTS), "strict": False})
    record = check_init(config)
    assert (
        record["strict"] is False and record["mismatched_keys"] == 2 and "task_pool.prompt_keys" in record["not_loaded"]
    )
    reference = load_published(published_config, published_weights).state_dict()
    state = build_training_state(config, CPU)
    loaded = state["model"].state_dict()
    fresh = {"task_pool.prompt_keys", "task_pool.prompt_values"}
    assert set(reference) - set(state["init_loaded"]) == fresh
    assert _equal_states(reference, loaded, [k for k in reference if k not in fresh])
    assert loaded["task_pool.prompt_values"].shape[0] == 7


def test_the_job_stops_before_ray_with_exit_2_naming_the_keys(published, tmp_path, monkeypatch, capsys):
    from conftest import write_tiny_dataset

    forbid_ray(monkeypatch, fit_module)
    dataset = write_tiny_dataset(tmp_path / "data")
    args = [
        f"storage={tmp_path / 'runs'}",
        f"output_dir={tmp_path / 'out'}",
        f"data.dataset={dataset}",
        "build_dataset_if_missing=false",
        "model.variant=paper_tiny",
        f"init.weights={PUBLISHED_WEIGHTS}",
    ]
    assert fit_module.main(args) == 2
    err = capsys.readouterr().err
    assert "train.py: error: init.weights" in err and "missing" in err and "init.strict=false" in err
    assert fit_module.main([*args[:-1], f"init.weights={tmp_path / 'nothing.pth'}"]) == 2
    assert "nothing.pth not found" in capsys.readouterr().err


def test_train_only_freezes_the_other_parts(export):
    path, weights = export
    config = _config(init={"weights": str(path), "train_only": ["pools", "refinement"]})
    state = build_training_state(config, CPU)
    trained = {n for n, p in state["model"].named_parameters() if p.requires_grad}
    assert trained and all(in_parts(n, ["pools", "refinement"]) for n in trained)
    assert len(state["params"]) == len(trained)
    _step(state, config)
    after = dict(state["model"].named_parameters())
    frozen = [n for n in after if n not in trained]
    assert frozen and all(torch.equal(after[n], weights[n]) for n in frozen)
    assert not torch.equal(after["task_pool.prompt_values"], weights["task_pool.prompt_values"])
    assert not torch.equal(after["refinement.0.ffn.project_out.weight"], weights["refinement.0.ffn.project_out.weight"])


def test_the_parts_cover_the_network_and_prompts_is_the_prompt_path():
    names = [name for name, _ in create_model("paper_tiny").named_parameters()]
    stages = ["encoder", "bottleneck", "decoder", "refinement", "output", "queries", "pools", "fusion"]
    assert [n for n in names if not in_parts(n, stages)] == []
    assert all(any(in_parts(n, [part]) for n in names) for part in PARTS)  # no part is empty in paper_tiny
    prompt_path = {n for n in names if in_parts(n, ["queries", "pools", "fusion", "gates"])}
    assert prompt_path == {n for n in names if in_parts(n, ["prompts"])}
    gates = {n for n in names if in_parts(n, ["gates"])}
    assert "latent.0.prompt_norm.weight" in gates and "refinement.0.feature_weight" in gates
    assert not any(".attn." in n or ".ffn." in n or n.startswith("encoder") for n in gates)


def test_loaded_lr_gives_a_second_group_on_its_own_cosine(export):
    path, weights = export
    # A new task-pool size: its keys and values start fresh at optim.lr, the loaded rest at loaded_lr.
    config = _config(
        model={"variant": "paper_tiny", "task_pool": {"size": 8}},
        init={"weights": str(path), "strict": False, "loaded_lr": 1e-4},
    )
    state = build_training_state(config, CPU)
    fresh_group, loaded_group = state["optimizer"].param_groups
    assert (fresh_group["lr"], loaded_group["lr"]) == (pytest.approx(1e-3), pytest.approx(1e-4))
    pool = state["model"].task_pool
    assert {id(p) for p in fresh_group["params"]} == {id(pool.prompt_keys), id(pool.prompt_values)}
    assert len(loaded_group["params"]) == len(state["params"]) - 2
    # Both decay to optim.min_lr over the run's steps.
    end = [base * f(config.steps) for base, f in zip((1e-3, 1e-4), state["scheduler"].lr_lambdas)]
    assert end == [pytest.approx(config.optim.min_lr)] * 2
    # A resumed worker rebuilds the same groups from the checkpoint's init_loaded, so the saved optimiser state fits.
    _step(state, config)
    again = build_training_state(config, CPU, resumed={"init_loaded": state["init_loaded"]})
    again["optimizer"].load_state_dict(state["optimizer"].state_dict())
    again["scheduler"].load_state_dict(state["scheduler"].state_dict())
    assert [len(g["params"]) for g in again["optimizer"].param_groups] == [2, len(state["params"]) - 2]
    assert again["scheduler"].get_last_lr() == state["scheduler"].get_last_lr()

    # lr_scaling scales both; a strict load leaves the first group empty and still steps.
    scaled = _config(init={"weights": str(path), "loaded_lr": 1e-4}, optim=OptimConfig(lr=1e-3, lr_scaling="linear"))
    state = build_training_state(scaled, CPU, world=2)
    groups = state["optimizer"].param_groups
    assert [len(g["params"]) > 0 for g in groups] == [False, True]
    assert [g["lr"] for g in groups] == [pytest.approx(2e-3), pytest.approx(2e-4)]
    _step(state, scaled)
    assert not torch.equal(state["model"].output.weight, weights["output.weight"])


def test_a_resumed_worker_keeps_the_groups_and_never_reads_the_weights(tmp_path, export):
    _, weights = export
    config = _config(init={"weights": str(tmp_path / "gone.safetensors"), "loaded_lr": 1e-4})
    loaded = sorted(k for k in weights if not k.startswith("task_pool."))
    state = build_training_state(config, CPU, resumed={"init_loaded": loaded})  # would raise if it read the file
    fresh, kept = state["optimizer"].param_groups
    pool = state["model"].task_pool
    assert {id(p) for p in fresh["params"]} == {id(p) for p in pool.parameters() if p.requires_grad}
    assert state["init_loaded"] == loaded and len(kept["params"]) > 0


class _Runs:
    """Something torch.load would run when unpickled without weights_only: creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pth_files_are_read_with_weights_only(tmp_path):
    marker = tmp_path / "ran"
    torch.save({"params": {"output.weight": torch.zeros(3, 32, 3, 3)}, "trap": _Runs(marker)}, tmp_path / "a.pth")
    with pytest.raises(ValueError, match=r"weights_only=True"):
        read_init_weights(str(tmp_path / "a.pth"))
    assert not marker.exists()  # refused, not unpickled

    torch.save({"model": {"x": torch.zeros(1)}, "optimizer": {}, "step": 3}, tmp_path / "state.pt")
    with pytest.raises(ValueError, match=r"not a state dict of tensors.*model.safetensors beside it"):
        read_init_weights(str(tmp_path / "state.pt"))
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="holds a list, not a state dict"):
        read_init_weights(str(tmp_path / "list.pt"))


def test_provenance_carries_the_weights_sha256(export, tmp_path):
    path, _ = export
    config = _config(init={"weights": str(path)})
    record = check_init(config)
    provenance = build_provenance(
        config_to_dict(config), model_spec="paper_tiny", steps=3, manifest_sha256=None, evaluation=None, init=record
    )
    assert provenance["init"]["sha256"] == weights_digest(path) and provenance["init"]["path"] == str(path)
    assert build_provenance({}, model_spec="paper_tiny", steps=0, manifest_sha256=None, evaluation=None)["init"] is None
    with pytest.raises(ValueError, match="init must be"):
        build_provenance({}, model_spec="paper_tiny", steps=0, manifest_sha256=None, evaluation=None, init={"a": 1})


def test_a_resumed_run_ignores_init_weights_and_keeps_its_record(export, tmp_path, capsys):
    from conftest import write_tiny_dataset

    path, _ = export
    dataset = write_tiny_dataset(tmp_path / "data")
    base = _config(
        storage=str(tmp_path / "runs"),
        output_dir=str(tmp_path / "out"),
        data={"dataset": str(dataset)},
        build_dataset_if_missing=False,
    )
    run = fit_module.prepare(_with_init(base, weights=str(path)))
    assert run.status.kind == "new" and run.init["sha256"] == weights_digest(path)
    folder = tmp_path / "runs" / base.name / "checkpoint_2026-01-01_00-00-00.000000"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config_to_dict(run.config)))
    (folder / "progress.json").write_text(json.dumps({"step": 4, "steps": base.steps, "init": run.init}))
    capsys.readouterr()

    # The weights are gone: a resume does not read them, says so, and keeps the record of what the run started from.
    moved = _with_init(base, weights=str(tmp_path / "moved.safetensors"))
    resumed = fit_module.prepare(moved)
    assert resumed.status.kind == "resume" and resumed.init == run.init
    assert "init.weights not applied: run 'init-test' resumes from its checkpoint at step 4" in capsys.readouterr().out
    # What trains and at which lr defines the run: changing them is refused like any other identity field.
    with pytest.raises(RunMismatch, match=r"init\.loaded_lr: None in the run, 0\.0001 asked for"):
        check_run(_with_init(base, weights=str(path), loaded_lr=1e-4))


@pytest.mark.parametrize(
    ("overrides", "field", "words"),
    [
        (["init.weights=a.safetensors", "init.train_only=[pools,wings]"], "init.train_only", "prompts"),
        (["init.weights=model.bin"], "init.weights", ".pth"),
        (["init.weights=a.pth", "init.loaded_lr=0"], "init.loaded_lr", "greater than 0"),
        (["init.train_only=[pools]"], "init", "init.train_only applies to weights loaded by init.weights"),
        (["init.weights=a.pth", "init.train_only=[pools,pools]"], "init.train_only", "repeat"),
        (["init.bogus=1"], "init.bogus", ""),
    ],
)
def test_bad_init_fields_are_named(overrides, field, words):
    with pytest.raises(ConfigError) as error:
        load_config(TrainConfig, None, overrides)
    assert field in str(error.value) and words in str(error.value)


@pytest.mark.ray
@pytest.mark.e2e
def test_train_job_starts_from_an_export_and_records_it(repo_root, tmp_path, export):
    """``python jobs/train.py init.weights=<export> steps=4``: the driver names the weights, the workers start from
    them, and the exported sidecar's provenance carries their SHA-256; the same run continued to 6 steps resumes from
    its checkpoint instead."""
    from conftest import write_tiny_dataset

    path, _ = export
    dataset = write_tiny_dataset(tmp_path / "tiny")
    args = [
        f"data.dataset={dataset}",
        "build_dataset_if_missing=false",
        f"storage={tmp_path / 'runs'}",
        f"output_dir={tmp_path / 'out'}",
        "name=init",
        "steps=4",
        "data.crop_size=32",
        "model.variant=paper_tiny",
        "cpus_per_worker=0.5",
        "torch_threads=1",
        "use_gpu=false",
        "evaluate_split=null",
        "validate_every=null",
        "text_embeddings=null",
        "checkpoint_every=4",
        "log_every=2",
        f"init.weights={path}",
        "init.loaded_lr=1e-4",
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PYTHONWARNINGS")}
    job = subprocess.run(
        [sys.executable, "jobs/train.py", *args], cwd=repo_root, env=env, capture_output=True, text=True, timeout=540
    )
    console = job.stdout + job.stderr
    assert job.returncode == 0, console[-4000:]
    assert f"starting from init.weights {path} (our export" in console
    sidecar = json.loads((tmp_path / "out" / "model.json").read_text())
    assert sidecar["provenance"]["init"]["sha256"] == weights_digest(path)
    reports = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert reports[-1]["step"] == 4 and "lr_loaded" in reports[-1]

    # Continued for 2 more steps: the worker resumes from the checkpoint (its two optimiser groups rebuilt from
    # init_loaded), init.weights is not applied again, and the new export still records what the run started from.
    more = [*(a for a in args if not a.startswith("steps=")), "steps=6"]
    job = subprocess.run(
        [sys.executable, "jobs/train.py", *more], cwd=repo_root, env=env, capture_output=True, text=True, timeout=540
    )
    console = job.stdout + job.stderr
    assert job.returncode == 0, console[-4000:]
    assert "init.weights not applied: run 'init' resumes from its checkpoint at step 4" in console
    assert "resumed from step 4" in console
    sidecar = json.loads((tmp_path / "out" / "model.json").read_text())
    assert sidecar["provenance"]["init"]["sha256"] == weights_digest(path) and sidecar["provenance"]["steps"] == 6
