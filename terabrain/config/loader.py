"""Loading experiments: built-in names or YAML files, `--set` overrides, readable errors."""

from __future__ import annotations

import difflib
import re
import reprlib
import typing
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from terabrain.config.schema import ExperimentConfig
from terabrain.config.sections import Section
from terabrain.errors import ConfigError

EXPERIMENTS_PACKAGE = "terabrain.config.experiments"
DEFAULT_EXPERIMENT = "natural-patches-rica"


def builtin_names() -> list[str]:
    files = resources.files(EXPERIMENTS_PACKAGE).iterdir()
    return sorted(f.name[: -len(".yaml")] for f in files if f.name.endswith(".yaml"))


def builtin_text(name: str) -> str:
    if name not in builtin_names():
        # The list outgrew one bounded line; the nearest names, and where the rest are.
        close = difflib.get_close_matches(str(name)[:100], builtin_names(), n=3, cutoff=0.6)
        raise ConfigError(
            f"no built-in experiment {name!r}; "
            + (f"did you mean {' or '.join(close)}? " if close else "")
            + f"`terabrain configs` lists all {len(builtin_names())}"
        )
    return resources.files(EXPERIMENTS_PACKAGE).joinpath(f"{name}.yaml").read_text()


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key written twice in one mapping: the later one would
    silently replace the earlier."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


# YAML 1.1 (PyYAML) reads 1e-3 as text, since its floats need a dot; users write learning rates
# that way in files and in --set, so numbers in exponent form are floats here (as in YAML 1.2).
_UniqueKeyLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)

# An experiment is a few KB; a file far larger is a mistake (or not an experiment at all).
FILE_LIMIT_BYTES = 1 << 20
# Values after expanding YAML aliases: a real experiment has a few hundred. A few KB of nested
# aliases ("billion laughs") expand to billions, which validation and messages would walk.
VALUE_LIMIT = 100_000


def _expanded_size(node: yaml.Node, sizes: dict[int, int], open_nodes: set[int]) -> int:
    """Values in ``node`` once every alias is expanded; shared nodes are counted once per use
    but computed once, so this is linear in the file's size."""
    key = id(node)
    if key in sizes:
        return sizes[key]
    if key in open_nodes:
        raise ConfigError(_yaml_where(node.start_mark) + "an alias refers to itself")
    open_nodes.add(key)
    total = 1
    if isinstance(node, yaml.SequenceNode):
        total += sum(_expanded_size(child, sizes, open_nodes) for child in node.value)
    elif isinstance(node, yaml.MappingNode):
        total += sum(_expanded_size(k, sizes, open_nodes) + _expanded_size(v, sizes, open_nodes)
                     for k, v in node.value)
    open_nodes.discard(key)
    sizes[key] = total = min(total, VALUE_LIMIT + 1)
    if total > VALUE_LIMIT:
        raise ConfigError(_yaml_where(node.start_mark) + f"more than {VALUE_LIMIT} values once "
                          "its aliases are expanded; an experiment has a few hundred")
    return total


class _NotYAML(ConfigError):
    """A YAML syntax error (a ``--set`` value that is not YAML is taken as text)."""


def _yaml_where(mark: Any) -> str:
    return f"{mark.line + 1}:{mark.column + 1}: " if mark is not None else " "


def _parse_yaml(text: str, source: str) -> Any:
    loader = None
    try:
        loader = _UniqueKeyLoader(text)
        node = loader.get_single_node()
        if node is None:
            return None
        try:
            _expanded_size(node, {}, set())
        except ConfigError as error:
            raise ConfigError(f"{source}:{error}") from None
        return loader.construct_document(node)
    except yaml.MarkedYAMLError as error:
        problem = " ".join(str(error.problem or error.context or "invalid YAML").split())
        raise _NotYAML(f"{source}:{error.problem_mark.line + 1}:"
                          f"{error.problem_mark.column + 1}: not valid YAML: {problem[:120]}"
                          if error.problem_mark is not None
                          else f"{source}: not valid YAML: {problem[:120]}") from None
    except yaml.YAMLError as error:
        problem = getattr(error, "reason", None) or " ".join(str(error).split())
        raise _NotYAML(f"{source}: not valid YAML: {str(problem)[:120]}") from None
    except RecursionError:
        raise ConfigError(f"{source}: nested too deeply to be an experiment") from None
    finally:
        if loader is not None:
            loader.dispose()


def read_yaml_file(path: Path, source: str, what: str = "an experiment file") -> Any:
    """The YAML document in the file ``path`` (``source`` in messages), read as experiment
    files are: at most FILE_LIMIT_BYTES, UTF-8, no key written twice, aliases bounded; a
    ConfigError of one line otherwise. ``what`` names the kind of file in the size message."""
    size = path.stat().st_size
    if size > FILE_LIMIT_BYTES:
        raise ConfigError(f"{source}: {size} bytes; {what} is a few KB "
                          f"(at most {FILE_LIMIT_BYTES})")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(f"{source}: not a text (UTF-8) file: byte {error.start} "
                          "cannot be decoded") from None
    except OSError as error:
        raise ConfigError(f"{source}: cannot be read: {error.strerror or error}") from None
    return _parse_yaml(text, source)


def _read_source(source: str) -> dict[str, Any]:
    path = Path(source)
    if source.endswith((".yaml", ".yml")) or path.exists():
        if not path.is_file():
            raise ConfigError(f"experiment file not found: {source}")
        raw = read_yaml_file(path, source)
    else:
        raw = _parse_yaml(builtin_text(source), source)
    if raw is None:
        raise ConfigError(f"{source}: the file is empty; an experiment is a YAML mapping "
                          "(`terabrain show natural-patches-rica` prints one)")
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: an experiment is a YAML mapping, got {type(raw).__name__}")
    return raw


def apply_override(raw: dict[str, Any], assignment: str) -> None:
    """Apply ``a.b.c=value`` in place; ``value`` is parsed as YAML (numbers, lists, null)."""
    key, sep, text = assignment.partition("=")
    shown = _short(assignment)
    if not sep or not key:
        raise ConfigError(f"--set {shown}: expected KEY=VALUE, e.g. optimizer.lr=0.01")
    parts = key.split(".")
    if any(not part.strip() for part in parts):
        raise ConfigError(f"--set {shown}: {_short(key)} has an empty field name; expected "
                          "dotted names such as optimizer.lr=0.01")
    try:
        value = _parse_yaml(text, f"--set {shown}") if text.strip() != "" else ""
    except _NotYAML:
        value = text  # a path or a name with YAML's special characters
    node: Any = raw
    for depth, part in enumerate(parts):
        where = ".".join(parts[: depth + 1])
        last = depth == len(parts) - 1
        if isinstance(node, list):  # model.layers.0.steps: an index into a list
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(
                    f"--set {shown}: {_short(where)}: index out of range; the list has "
                    f"{len(node)} items (0..{len(node) - 1})"
                )
            part = int(part)
        elif not isinstance(node, dict):
            raise ConfigError(f"--set {shown}: {_short('.'.join(parts[:depth]))} is not a section")
        if last:
            node[part] = value
        else:
            if isinstance(node, dict) and node.get(part) is None:
                node[part] = {}
            node = node[part]


# Sections whose variants pydantic names in an error's location (model.rica.hidden): the
# user wrote model.hidden.
_UNION_SECTIONS = ("model", "data", "objective")


def _user_path(location: tuple) -> tuple:
    if len(location) >= 2 and location[0] in _UNION_SECTIONS and isinstance(location[1], str):
        return (location[0],) + tuple(location[2:])
    return tuple(location)


MESSAGE_LIMIT = 300


def _short(value: Any, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters: messages quote input, never all of it."""
    text = value if isinstance(value, str) else repr(value)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 60
_REPR.maxlist = _REPR.maxdict = _REPR.maxtuple = _REPR.maxset = 6
_REPR.maxlevel = 3


def _quoted(value: Any) -> str:
    """A bounded repr of user input (the work is bounded too: nothing large is built)."""
    return _short(_REPR.repr(value))


def format_validation_error(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        location = _short(".".join(str(part) for part in _user_path(item["loc"])), 80)
        message = item["msg"].removeprefix("Value error, ")
        if message.startswith("@"):  # a section's check naming one of its fields
            field, _, message = message[1:].partition(": ")
            location = f"{location}.{_short(field, 40)}" if location else _short(field, 40)
        loc = item["loc"]
        if item["type"] == "missing" and len(loc) > 2 and loc[0] in _UNION_SECTIONS:
            tag = "source" if loc[0] == "data" else "kind"
            lines.append(f"{location} is required when {loc[0]}.{tag} is {loc[1]}")
            continue
        if item["type"] == "union_tag_invalid":
            context = item.get("ctx", {})
            location = f"{location}.{context.get('discriminator', '').strip(chr(39))}"
            message = (f"got {_quoted(context.get('tag'))}; allowed: "
                       f"{context.get('expected_tags', '').replace(chr(39), '')}")
        elif item["type"] == "extra_forbidden":
            message = "unknown key (check the spelling; `terabrain show NAME` lists the keys)"
        elif item["type"] == "literal_error":
            allowed = item.get("ctx", {}).get("expected", "")
            message = f"got {_quoted(item['input'])}; allowed: {allowed}"
        elif "input" in item and not isinstance(item["input"], dict):
            message = f"{message} (got {_quoted(item['input'])})"
        lines.append(f"{location}: {message}" if location else message)
    text = "invalid experiment: " + "; ".join(lines)
    return text if len(text) <= MESSAGE_LIMIT else text[: MESSAGE_LIMIT - 3] + "..."


def validate(raw: dict[str, Any]) -> ExperimentConfig:
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(format_validation_error(error)) from None


def _section_class(path: list[str]) -> type | None:
    """The Section class at ``path`` (e.g. ["supervised", "optimizer"]) of the schema, if the
    path leads through plain (non-union) sections."""
    current: Any = ExperimentConfig
    for part in path:
        field = current.model_fields.get(part) if isinstance(current, type) else None
        if field is None:
            return None
        candidates = [field.annotation, *typing.get_args(field.annotation)]
        current = next((c for c in candidates
                        if isinstance(c, type) and issubclass(c, BaseModel)), None)
    return current if isinstance(current, type) and issubclass(current, Section) else None


def _drop_settings_of_the_old_variant(raw: dict[str, Any], overrides: list[str]) -> None:
    """``--set optimizer.name=adam`` on an experiment with SGD momentum: the momentum came
    from the experiment, not from the user, and means nothing for Adam, so it goes (as a
    whole-section ``--set 'optimizer={name: adam}'`` would). A setting the user gives in the
    same command stays, and is refused if it does not apply."""
    given = {assignment.partition("=")[0] for assignment in overrides}
    for key in given:
        *path, tag = key.split(".")
        section = _section_class(path)
        node: Any = raw
        for part in path:
            node = node.get(part) if isinstance(node, dict) else None
        if section is None or not isinstance(node, dict):
            continue
        for name, info in section.model_fields.items():
            extra = info.json_schema_extra
            condition = extra.get("applies_when") if isinstance(extra, dict) else None
            if (condition and condition["field"] == tag and node.get(tag) not in condition["values"]
                    and ".".join([*path, name]) not in given):
                node.pop(name, None)


def load_experiment(source: str | None, overrides: list[str] = ()) -> ExperimentConfig:
    """A built-in name or a YAML path (None: the default experiment), with overrides."""
    raw = _read_source(source or DEFAULT_EXPERIMENT)
    for assignment in overrides:
        apply_override(raw, assignment)
    _drop_settings_of_the_old_variant(raw, list(overrides))
    return validate(raw)


def with_overrides(config: ExperimentConfig, overrides: list[str]) -> ExperimentConfig:
    """``config`` with ``--set`` style assignments applied, as `terabrain train --set` would."""
    raw = _tag_first(_applicable(config, config.model_dump(mode="json")))
    for assignment in overrides:
        apply_override(raw, assignment)
    _drop_settings_of_the_old_variant(raw, list(overrides))
    return validate(raw)


def _tag_first(value: Any) -> Any:
    """A section's variant tag (``kind``, ``source``) first: it says what the rest means."""
    if isinstance(value, dict):
        tags = [key for key in ("kind", "source") if key in value]
        ordered = {key: value[key] for key in tags}
        ordered.update((key, item) for key, item in value.items() if key not in tags)
        return {key: _tag_first(item) for key, item in ordered.items()}
    if isinstance(value, list):
        return [_tag_first(item) for item in value]
    return value


def _applicable(section: Any, dumped: Any) -> Any:
    """``dumped`` (``section``'s JSON dump) without the fields that do not apply to it
    (Section.inapplicable_fields: they are at their defaults, so nothing is lost)."""
    if isinstance(section, BaseModel):
        skipped = set(section.inapplicable_fields()) if isinstance(section, Section) else set()
        return {name: _applicable(getattr(section, name), value)
                for name, value in dumped.items() if name not in skipped}
    if isinstance(section, (list, tuple)) and isinstance(dumped, list):
        return [_applicable(item, value) for item, value in zip(section, dumped)]
    return dumped


def to_yaml(config: ExperimentConfig) -> str:
    """The fully resolved experiment, with only the fields that apply to it; `terabrain
    train` reads it back unchanged."""
    dumped = _applicable(config, config.model_dump(mode="json"))
    return yaml.safe_dump(_tag_first(dumped), sort_keys=False)


def describe_builtins() -> list[tuple[str, str]]:
    return [(name, load_experiment(name).description) for name in builtin_names()]
