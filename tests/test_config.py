"""datprl.platform.config: YAML + CLI overrides -> validated schema, clear errors, atomic resolved-config saving."""

from __future__ import annotations

import os

import pytest
import yaml
from pydantic import Field, ValidationError

from datprl.platform import config as cfg
from datprl.platform.config import ConfigError, StrictModel, load_config, parse_cli, save_resolved_config


class Optim(StrictModel):
    lr: float = Field(1e-3, gt=0, description="learning rate")
    betas: tuple[float, float] = (0.9, 0.999)


class Pool(StrictModel):
    size: int = Field(15, ge=1, description="prompts in the pool")
    top_k: int = Field(3, ge=1)


class Train(StrictModel):
    optimizer: Optim = Optim()
    steps: int = 100
    sizes: list[int] = [128]
    name: str = "run"
    warmup: float | str = "auto"  # a union keeps YAML's type, so it shows whether `1e-4` loads as a float
    amp: bool = False


class Job(StrictModel):
    """Example job for the tests."""

    train: Train = Train()
    pool: Pool | None = Pool(size=15, top_k=5)  # default differs from Pool's own top_k
    tags: dict[str, str] = {}
    seed: int = 0


def write(tmp_path, text: str, name: str = "job.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_file_and_round_trip(tmp_path):
    path = write(tmp_path, "train:\n  optimizer: {lr: 1e-4, betas: [0.8, 0.9]}\n  warmup: 1e-4\npool: null\nseed: 7\n")
    job = load_config(Job, path)
    assert job.train.optimizer.lr == 1e-4 and job.train.optimizer.betas == (0.8, 0.9)
    assert job.train.warmup == 1e-4 and isinstance(job.train.warmup, float)
    assert job.pool is None and job.seed == 7 and job.train.steps == 100
    assert load_config(Job) == Job()

    job = load_config(Job, path, ["train.name=1e-4", "tags={a: '1.5'}", "pool.size=20"])  # float-looking strings
    saved = save_resolved_config(job, tmp_path / "runs" / "r1" / "config.yaml")
    text = saved.read_text()
    assert text.startswith("# resolved Job config, saved ") and "UTC" in text.splitlines()[0]
    assert isinstance(yaml.safe_load(text), dict)
    assert load_config(Job, saved) == job
    assert os.listdir(saved.parent) == ["config.yaml"]  # no temp file left behind


def test_overrides():
    job = load_config(
        Job,
        None,
        [
            "train.optimizer.lr=1e-4",
            "train.sizes=[1, 2]",
            "train.amp=true",
            "train.warmup=2e-3",
            "train.name=2024",
            "tags={a: b}",
            "seed=3",
            "pool={size: 20, top_k: 3}",
        ],
    )
    assert job.train.optimizer.lr == 1e-4 and job.train.sizes == [1, 2] and job.train.amp is True
    assert job.train.warmup == 2e-3 and isinstance(job.train.warmup, float)
    assert job.train.name == "2024"  # str field: the text as typed, not YAML's int
    assert job.tags == {"a": "b"} and job.seed == 3 and job.pool == Pool(size=20, top_k=3)
    assert load_config(Job, None, ["pool=null"]).pool is None
    # A dotted override into an unset section starts from the field's default (top_k=5), not Pool's own (3).
    assert load_config(Job, None, ["pool.size=20"]).pool == Pool(size=20, top_k=5)
    assert load_config(Job, None, ["pool=null", "pool.size=20"]).pool == Pool(size=20, top_k=5)
    assert load_config(Job, None, ["seed=1", "seed=2"]).seed == 2  # last one wins
    assert load_config(Job, None, ["tags.x=y"]).tags == {"x": "y"}  # mapping fields take any key


def test_overrides_on_top_of_file(tmp_path):
    path = write(tmp_path, "train:\n  steps: 5\n  optimizer: {lr: 0.5}\n")
    job = load_config(Job, path, ["train.optimizer.betas=[0.1, 0.2]"])
    assert job.train.steps == 5 and job.train.optimizer == Optim(lr=0.5, betas=(0.1, 0.2))


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.optimizer.lrr=1", ["'train.optimizer.lrr'", "valid keys at train.optimizer: lr, betas"]),
        ("trian.steps=1", ["'trian'", "valid keys at the top level: train, pool, tags, seed"]),
        ("pool.sise=3", ["'pool.sise'", "valid keys at pool: size, top_k"]),  # through an Optional section
        ("seed.x=1", ["'seed' is a value (int), not a section"]),
        ("train.optimizer.lr", ["not of the form key=value"]),
        ("=3", ["not of the form key=value"]),
        ("train.sizes=[1, 2", ["not valid YAML"]),
    ],
)
def test_bad_override_keys(override, expected):
    with pytest.raises(ConfigError) as info:
        load_config(Job, None, [override])
    assert all(part in str(info.value) for part in expected), str(info.value)


def test_unknown_yaml_key_names_dotted_path(tmp_path):
    path = write(tmp_path, "train:\n  optimizer:\n    lr: 0.1\n    momentum: 0.9\n")
    with pytest.raises(ConfigError) as info:
        load_config(Job, path)
    msg = str(info.value)
    assert "train.optimizer.momentum: unknown key" in msg and "valid keys at train.optimizer: lr, betas" in msg
    assert str(path) in msg


def test_bad_values_name_the_field_and_source(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(Job, None, ["train.optimizer.lr=-1"])
    msg = str(info.value)
    assert "train.optimizer.lr: Input should be greater than 0" in msg
    assert "CLI override 'train.optimizer.lr=-1'" in msg

    with pytest.raises(ConfigError, match=r"train\.optimizer\.lr: .*valid number.*'abc'.*train\.optimizer\.lr=abc"):
        load_config(Job, None, ["train.optimizer.lr=abc"])

    path = write(tmp_path, "train:\n  sizes: [1, x]\npool: {size: 0}\n")
    with pytest.raises(ConfigError) as info:
        load_config(Job, path)
    msg = str(info.value)
    assert "train.sizes[1]:" in msg and "pool.size: Input should be greater than or equal to 1" in msg
    assert msg.count(str(path)) == 2  # both errors reported, each with its source
    assert not isinstance(info.value, ValidationError) and info.value.__cause__ is None


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_config(Job, tmp_path / "nope.yaml")
    bad = write(tmp_path, "seed: 1\ntrain:\n  steps: [1, 2\n  name: x\n")
    with pytest.raises(ConfigError, match=r"invalid YAML in .*job.yaml at line \d+"):
        load_config(Job, bad)
    with pytest.raises(ConfigError, match="top level .* must be a mapping"):
        load_config(Job, write(tmp_path, "- 1\n- 2\n", "list.yaml"))
    assert load_config(Job, write(tmp_path, "", "empty.yaml")) == Job()


def test_yaml_error_line_number(tmp_path):
    bad = write(tmp_path, "seed: 1\ntrain: {steps: 2\nname: x\n")  # unclosed flow mapping, reported on line 3
    with pytest.raises(ConfigError, match="at line 3"):
        load_config(Job, bad)


def test_parse_cli(tmp_path, capsys):
    path = write(tmp_path, "seed: 4\n", "exp.yml")
    job = parse_cli(Job, [str(path), "train.steps=9"])
    assert job.seed == 4 and job.train.steps == 9
    assert parse_cli(Job, ["train.steps=9"]) == Job(train=Train(steps=9))
    assert parse_cli(Job, [str(path)]).seed == 4
    assert parse_cli(Job, []) == Job()
    with pytest.raises(SystemExit) as info:  # errors exit like argparse, without a traceback
        parse_cli(Job, ["train.stepz=9"], prog="train")
    assert info.value.code == 2 and "train: error:" in capsys.readouterr().err


def test_help_lists_dotted_fields(capsys):
    with pytest.raises(SystemExit) as info:
        parse_cli(Job, ["seed=1", "--help"], prog="train")
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: train [--dry-run] [CONFIG.yaml] [key=value ...]")
    assert "Example job for the tests." in out
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ")}
    assert {"train.optimizer.lr", "train.optimizer.betas", "pool.size", "pool.top_k", "tags", "seed"} <= set(lines)
    assert "float = 0.001" in lines["train.optimizer.lr"] and "learning rate" in lines["train.optimizer.lr"]
    assert "int = 5" in lines["pool.top_k"]  # the parent's default instance, not Pool's own default
    assert "Pool | None" in lines["pool"]
    with pytest.raises(SystemExit) as info:
        parse_cli(Job, ["-h"])
    assert info.value.code == 0


def test_atomic_save_keeps_old_file_on_failure(tmp_path, monkeypatch):
    target = save_resolved_config(Job(seed=1), tmp_path / "config.yaml")
    before = target.read_text()

    def broken_replace(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr(cfg.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk gone"):
        save_resolved_config(Job(seed=2), target)
    assert target.read_text() == before and os.listdir(tmp_path) == ["config.yaml"]


def test_strict_model_validates_assignment():
    job = Job()
    with pytest.raises(ValidationError):
        job.train.optimizer.lr = -1.0
    with pytest.raises(ValidationError):
        Job(unknown=1)
    assert cfg.config_to_dict(Job())["train"]["optimizer"]["betas"] == [0.9, 0.999]
