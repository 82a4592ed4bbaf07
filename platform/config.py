"""The one configuration mechanism every job uses: a YAML file plus ``key=value`` CLI overrides, validated by a
pydantic schema, with the resolved config saved next to every run (torchtune style).

A job declares its schema from :class:`StrictModel` sections and starts with (the training job, whose schema is
:class:`datprl.platform.train.config.TrainConfig`)::

    config = parse_cli(TrainConfig, sys.argv[1:])           # python jobs/train.py cfg.yaml optim.lr=1e-4
    save_resolved_config(config, output_dir / "config.yaml")  # reload later with load_config(TrainConfig, that_path)

Every failure (missing file, YAML syntax, unknown key, bad value) is a :class:`ConfigError` naming the field by its
dotted path and where the value came from; pydantic's own errors never reach the user raw.
"""

from __future__ import annotations

import os
import re
import sys
import types
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path, PurePath
from typing import Annotated, Any, TypeVar, Union, get_args, get_origin

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import to_jsonable_python

from datprl.platform.storage import atomic_write_bytes

__all__ = [
    "StrictModel",
    "NoRepeats",
    "no_repeats",
    "ConfigError",
    "load_config",
    "parse_cli",
    "save_resolved_config",
    "config_to_dict",
]

T = TypeVar("T", bound=BaseModel)


class StrictModel(BaseModel):
    """Base of every config section: unknown keys are errors (a typo must not silently fall back to a default),
    and assignments are validated too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def no_repeats(hint: str = "") -> AfterValidator:
    """``Annotated[list[...], no_repeats(hint)]``: a list field whose entries must all differ; the error names the
    repeated entries and ends with ``hint`` (what to do instead), when given."""

    def check(values: list) -> list:
        repeated = sorted({v for v in values if values.count(v) > 1}, key=str)
        if repeated:
            raise ValueError(
                f"the entries must not repeat ({repeated} more than once); list each one "
                f"once{'; ' + hint if hint else ''}"
            )
        return values

    return AfterValidator(check)


NoRepeats = no_repeats()
"""``Annotated[list[...], NoRepeats]``: a list field whose entries must all differ (e.g. splits or variants to
evaluate or time once each)."""


class ConfigError(ValueError):
    """A config that cannot be loaded; the message names the field by dotted path, what is wrong, and the source
    (file path or ``CLI override 'key=value'``)."""


# --- YAML dialect -------------------------------------------------------------------------------------------------
# PyYAML implements YAML 1.1, whose float pattern needs a dot, so `lr: 1e-4` loads as the *string* "1e-4". A float
# field would coerce it, but a `float | str` field, an Any field or a list would keep the string. Files, overrides and
# saved configs therefore share one dialect with the YAML 1.2 float pattern; the dumper uses it too, so a string
# that looks like a float ("1e-4") is quoted on save and round-trips as a string.
_FLOAT_TAG = "tag:yaml.org,2002:float"
_FLOAT = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |[-+]?\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)


class _Loader(yaml.SafeLoader):
    pass


class _Dumper(yaml.SafeDumper):
    pass


for _cls in (_Loader, _Dumper):
    # Resolver tables are class attributes shared with SafeLoader/SafeDumper: copy them before editing.
    _cls.yaml_implicit_resolvers = {
        first: [r for r in rs if r[0] != _FLOAT_TAG] for first, rs in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    _cls.add_implicit_resolver(_FLOAT_TAG, _FLOAT, list("-+0123456789."))


def _yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader


# --- schema walking -----------------------------------------------------------------------------------------------
_OPEN = object()  # a mapping / Any field: keys below it are not checked against a schema


def _section(annotation: Any) -> Any:
    """The model class behind ``X``, ``X | None`` or ``Annotated[X, ...]``; _OPEN for mappings/Any; None for leaves."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _section(get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        kinds = [_section(a) for a in get_args(annotation) if a is not type(None)]
        sections = [k for k in kinds if k is not None]
        if len(sections) == 1:
            return sections[0]
        return _OPEN if sections else None  # several possible sections: leave the keys to pydantic
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if annotation is Any or annotation is dict or origin in (dict, Mapping):
        return _OPEN
    return None


def _is_text(annotation: Any) -> bool:
    """str / Path fields (optionally Optional): CLI values for them are taken verbatim, so `name=2024` is "2024"."""
    args = (
        [a for a in get_args(annotation) if a is not type(None)]
        if get_origin(annotation) in (Union, types.UnionType)
        else [annotation]
    )
    return len(args) == 1 and isinstance(args[0], type) and issubclass(args[0], (str, PurePath))


def _model_at(schema: type[BaseModel], loc: Sequence[Any]) -> type[BaseModel] | None:
    """The model class at a pydantic error location, or None where it cannot be told (list items, union tags)."""
    current: Any = schema
    for part in loc:
        if not (isinstance(current, type) and isinstance(part, str) and part in current.model_fields):
            return None
        current = _section(current.model_fields[part].annotation)
    return current if isinstance(current, type) else None


def _dotted(loc: Sequence[Any]) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")


def _default(field: FieldInfo) -> Any:
    try:
        return field.get_default(call_default_factory=True)
    except Exception:  # a factory that needs the validated data: start empty instead
        return None


# --- overrides ----------------------------------------------------------------------------------------------------
def _apply_override(raw: dict, schema: type[BaseModel], text: str) -> tuple[str, ...]:
    """Set one ``a.b.c=value`` override into the raw dict (in place), checking the key against the schema first."""
    key, sep, value_text = text.partition("=")
    parts = tuple(p.strip() for p in key.split("."))
    if not sep or not all(parts):
        raise ConfigError(f"CLI override '{text}' is not of the form key=value (e.g. optim.lr=1e-4)")
    try:
        value = _yaml_load(value_text)
    except yaml.YAMLError as err:
        raise ConfigError(f"CLI override '{text}': the value is not valid YAML ({err.problem or err})") from None

    node, section = raw, schema
    for depth, part in enumerate(parts):
        here, dotted = ".".join(parts[:depth]) or "the top level", ".".join(parts[: depth + 1])
        field = None
        if section is not _OPEN:
            if part not in section.model_fields:
                raise ConfigError(
                    f"CLI override '{text}': unknown key '{dotted}'; "
                    f"valid keys at {here}: {', '.join(section.model_fields)}"
                )
            field = section.model_fields[part]
        if depth == len(parts) - 1:
            if (
                field is not None
                and _is_text(field.annotation)
                and (isinstance(value, (bool, int, float)) or not value_text.strip())
            ):
                value = value_text.strip()
            node[part] = value
            return parts
        section = _section(field.annotation) if field is not None else _OPEN
        if section is None:
            raise ConfigError(
                f"CLI override '{text}': '{dotted}' is a value ({_type_name(field.annotation)}), "
                f"not a section, so it has no key '{parts[depth + 1]}'"
            )
        child = node.get(part)
        if child is None:
            # Absent (or null) in the file: start from the schema's default section, so that `pool.size=20` keeps the
            # default's other values (which may differ from the section class's own defaults).
            default = _default(field) if field is not None else None
            child = (
                default.model_dump()
                if isinstance(default, BaseModel)
                else (dict(default) if isinstance(default, Mapping) else {})
            )
            node[part] = child
        elif not isinstance(child, dict):
            raise ConfigError(
                f"CLI override '{text}': '{dotted}' is {_short(child)} in the config file, "
                f"not a mapping, so it has no key '{parts[depth + 1]}'"
            )
        node = child
    raise AssertionError("unreachable")


# --- keys of earlier config versions ------------------------------------------------------------------------------
def _moved(schema: type[BaseModel]) -> dict[str, tuple[str | None, str]]:
    """A schema's ``moved_keys`` (old top-level key -> (new dotted key or None if removed, why))."""
    return getattr(schema, "moved_keys", {}) or {}


def _move_old_keys(raw: dict, schema: type[BaseModel], where: str) -> None:
    """Move an old top-level key of a config file to its new place (with a note on stderr), or fail with the
    reason it was removed and what to write instead."""
    for old, (new, why) in _moved(schema).items():
        if old not in raw:
            continue
        if new is None:
            raise ConfigError(f"'{old}'{where} is no longer a config key: {why}")
        value = raw.pop(old)
        node = raw
        *parents, leaf = new.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"'{old}'{where} moved to '{new}', but '{part}' is not a mapping there")
        if leaf in node and node[leaf] != value:
            raise ConfigError(
                f"'{old}'{where} is the old spelling of '{new}', and both are given with different "
                f"values ({_short(value)} and {_short(node[leaf])}); keep only '{new}'"
            )
        node[leaf] = value
        print(f"note: '{old}'{where} is now '{new}' ({why}); please rename it", file=sys.stderr)


def _moved_override(schema: type[BaseModel], text: str) -> str:
    """A CLI override of an old key, rewritten to the new key (with a note), or a ConfigError if it was removed."""
    key, sep, value = text.partition("=")
    head, dot, rest = key.strip().partition(".")
    if not sep or head not in _moved(schema):
        return text
    new, why = _moved(schema)[head]
    if new is None:
        raise ConfigError(f"CLI override '{text}': '{head}' is no longer a config key: {why}")
    print(f"note: CLI override '{text}': '{head}' is now '{new}' ({why})", file=sys.stderr)
    return f"{new}{dot}{rest}={value}"


# --- loading ------------------------------------------------------------------------------------------------------
def _read_yaml(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror or err}") from None
    try:
        data = _yaml_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err)
        raise ConfigError(f"invalid YAML in {path}{where}: {problem}") from None
    if data is None:  # an empty file is an empty config
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"the top level of {path} must be a mapping of keys to values, not {type(data).__name__}")
    return data


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _to_config_error(
    err: ValidationError, schema: type[BaseModel], path: Path | None, overrides: list[tuple[tuple[str, ...], str]]
) -> ConfigError:
    file_source = f"from {path}" if path is not None else f"from the defaults of {schema.__name__}"

    def source(loc: tuple) -> str:
        exact = [text for parts, text in overrides if loc[: len(parts)] == parts]  # override set this value or above
        if exact:
            return f"from CLI override '{exact[-1]}'"
        below = [text for parts, text in overrides if parts[: len(loc)] == loc]  # e.g. a cross-field check
        return file_source + (" with CLI override " + ", ".join(f"'{t}'" for t in below) if below else "")

    lines = []
    for e in err.errors(include_url=False):
        loc = tuple(e["loc"])
        if e["type"] == "extra_forbidden":
            parent = _model_at(schema, loc[:-1])
            what = "unknown key" + (
                f"; valid keys at {_dotted(loc[:-1]) or 'the top level'}: {', '.join(parent.model_fields)}"
                if parent is not None
                else ""
            )
        else:
            what = e["msg"].removeprefix("Value error, ")  # pydantic's prefix for a validator's ValueError
            if e["type"] != "missing" and not isinstance(e.get("input"), dict):
                what += f" (got {_short(e.get('input'))})"
        lines.append(f"{_dotted(loc) or '(top level)'}: {what} [{source(loc)}]")
    return ConfigError(f"invalid {schema.__name__} config:\n  " + "\n  ".join(lines))


def load_config(schema: type[T], path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> T:
    """Load ``schema`` from a YAML file (optional) with ``key=value`` overrides applied on top, and validate it.

    Override values are YAML (``lr=1e-4``, ``flag=true``, ``sizes=[1,2]``, ``pool={size: 20, top_k: 3}``,
    ``pool=null``); keys are dotted paths checked against the schema before anything is validated. A dotted override
    into a section the file does not set starts from the schema's default for that section. Raises
    :class:`ConfigError` for any problem.
    """
    file = Path(path) if path is not None else None
    raw = _read_yaml(file) if file is not None else {}
    _move_old_keys(raw, schema, f" in {file}" if file is not None else "")
    overrides = [_moved_override(schema, text) for text in overrides]
    applied = [(_apply_override(raw, schema, text), text) for text in overrides]
    try:
        return schema.model_validate(raw)
    except ValidationError as err:
        raise _to_config_error(err, schema, file, applied) from None  # from None: no raw pydantic traceback


# --- command line -------------------------------------------------------------------------------------------------
def _type_name(annotation: Any) -> str:
    if isinstance(annotation, type) and not get_args(annotation):
        return annotation.__name__
    return re.sub(r"(?:\w+\.)+(\w+)", r"\1", str(annotation))  # typing.Optional / pkg.mod.Cls -> Optional / Cls


_REQUIRED = object()


def _inline_yaml(value: Any) -> str:
    try:
        value = to_jsonable_python(value)
    except Exception:  # an exotic default: show its repr rather than fail the help
        value = repr(value)
    text = yaml.dump(value, Dumper=_Dumper, default_flow_style=True, width=10**6).strip()
    return text.removesuffix("...").strip()  # PyYAML ends a bare scalar document with "..."


def _help_rows(schema: type[BaseModel], instance: Any, prefix: str) -> list[tuple[str, str, str]]:
    """(dotted name, 'type = default', description) for every field, recursing into sections. Nested defaults are
    read from the parent's default instance, since that is what a job gets when it sets nothing."""
    rows = []
    for name, field in schema.model_fields.items():
        dotted = prefix + name
        if isinstance(instance, BaseModel):
            default = getattr(instance, name)
        else:
            default = _REQUIRED if field.is_required() else _default(field)
        shown = (
            "<required>"
            if default is _REQUIRED
            else "<section>"
            if isinstance(default, BaseModel)
            else _inline_yaml(default)
        )
        rows.append((dotted, f"{_type_name(field.annotation)} = {shown}", field.description or ""))
        section = _section(field.annotation)
        if isinstance(section, type):
            rows += _help_rows(section, default if isinstance(default, BaseModel) else None, dotted + ".")
    return rows


def _help_text(schema: type[BaseModel], prog: str) -> str:
    rows = _help_rows(schema, None, "")
    width = max((len(r[0]) for r in rows), default=0)
    type_width = min(max((len(r[1]) for r in rows), default=0), 48)
    doc = (schema.__doc__ or "").strip().splitlines()
    lines = [
        f"usage: {prog} [--dry-run] [CONFIG.yaml] [key=value ...]",
        "",
        "--dry-run prints the resolved config as YAML and exits without running anything.",
        "",
    ]
    if doc:
        lines += [doc[0], ""]
    lines += [f"Fields of {schema.__name__} (override any with dotted.key=value; values are YAML):"]
    lines += [f"  {n:<{width}}  {t:<{type_width}}  {d}".rstrip() for n, t, d in rows]
    return "\n".join(lines)


def parse_cli(schema: type[T], argv: Sequence[str], prog: str | None = None) -> T:
    """Entry-point parsing: ``[CONFIG.yaml|.yml] [key=value ...]``.

    ``-h``/``--help`` prints every field (dotted name, type, default, description) and exits 0; ``--dry-run`` prints
    the resolved config (:func:`dry_run_text`) and exits 0, before the job starts anything. A bad config prints
    ``error: ...`` to stderr and exits 2 (as argparse does), so a job never dies with a traceback for a typo.
    """
    argv = list(argv)
    prog = prog or Path(sys.argv[0] or "job").name
    if "-h" in argv or "--help" in argv:
        print(_help_text(schema, prog))
        raise SystemExit(0)
    dry_run = "--dry-run" in argv
    argv = [a for a in argv if a != "--dry-run"]
    unknown = [a for a in argv if a.startswith("--")]
    if unknown:
        print(
            f"{prog}: error: unknown option {unknown[0]}; options are --help and --dry-run, fields are set as "
            "key=value",
            file=sys.stderr,
        )
        raise SystemExit(2)
    path = None
    if argv and "=" not in argv[0] and argv[0].lower().endswith((".yaml", ".yml")):
        path, argv = argv[0], argv[1:]
    try:
        config = load_config(schema, path, argv)
    except ConfigError as err:
        print(f"{prog}: error: {err}\n(run with --help to list the fields)", file=sys.stderr)
        raise SystemExit(2) from None
    if dry_run:
        print(dry_run_text(config))
        raise SystemExit(0)
    return config


def dry_run_text(config: BaseModel) -> str:
    """What ``--dry-run`` prints: the resolved config as YAML (loadable with :func:`load_config`), then any extra
    documents the schema adds (``dry_run_documents()``, e.g. the network a model section resolves to)."""
    text = f"# resolved {type(config).__name__} config (--dry-run: nothing was started)\n" + _dump_yaml(
        config_to_dict(config)
    )
    extra = getattr(config, "dry_run_documents", None)
    for name, document in (extra() if extra is not None else {}).items():
        text += f"---\n# {name}\n" + _dump_yaml(document)
    return text.rstrip()


def _dump_yaml(data: Any) -> str:
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, allow_unicode=True, default_flow_style=False)


# --- saving -------------------------------------------------------------------------------------------------------
def config_to_dict(config: BaseModel) -> dict[str, Any]:
    """Plain JSON-compatible dict (tuples become lists, paths strings) - what is saved and logged."""
    return config.model_dump(mode="json")


def save_resolved_config(config: BaseModel, path: str | os.PathLike) -> Path:
    """Write the resolved config as YAML, atomically (:func:`datprl.platform.storage.atomic_write_bytes`: a reader
    never sees half a file), with a header comment recording the UTC time. ``load_config`` reads it back to an equal
    object."""
    path = Path(path)
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
    text = f"# resolved {type(config).__name__} config, saved {stamp} UTC\n" + _dump_yaml(config_to_dict(config))
    atomic_write_bytes(path, text.encode("utf-8"))
    return path
