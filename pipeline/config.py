"""Stage configs: dataclass defaults < a YAML section < repeatable ``--set key=value``.

Every stage owns one dataclass (nested by concern). A YAML file holds one section per stage
(``adapt:``, ``cache:``, ...); each command reads its own section. Values are type-checked
against the annotations, unknown keys are errors, and every problem is reported at once.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import itertools
import math
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

from pipeline.errors import ConfigError

T = TypeVar("T")

SECTIONS = ("adapt", "cache", "select", "train", "evaluate", "finetune")
"""Top-level sections a config file may hold, one per stage command."""


def load_config(cls: type[T], section: str, path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Build ``cls`` from section ``section`` of the YAML at ``path`` plus ``--set`` overrides."""
    data: dict[str, Any] = read_section(path, section) if path is not None else {}
    return from_dict(cls, apply_overrides(data, overrides), prefix=f"{section}.")


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply `a.b=value` overrides to a nested mapping (in place; returned for chaining)."""
    for item in overrides:
        keys, value = parse_override(item)
        _assign(data, keys, value)
    return data


def apply_mapping(data: dict[str, Any], changes: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Apply ``{"a.b": value}`` changes (nested mappings allowed) to a nested mapping, in place."""
    for key, value in changes.items():
        if isinstance(value, dict):
            apply_mapping(data, value, f"{prefix}{key}.")
        else:
            _assign(data, f"{prefix}{key}".split("."), value)
    return data


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice in one mapping is an error (PyYAML keeps
    the last value silently: a config would run with a value its reader never sees)."""


def _unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    first: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        if key in first:
            raise ConfigError(f"duplicate key {key!r} at line {line} (first at line {first[key]}); keep one of them")
        first[key] = line
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def load_yaml(text: str, source: str) -> Any:
    """Parse YAML with duplicate keys refused; errors name `source`."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader: no arbitrary objects
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source} is not valid YAML: {exc}") from None


def read_section(path: str | Path, section: str) -> dict[str, Any]:
    """The mapping under ``section`` in a YAML config file (empty when the section is absent)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found; pass an existing YAML file to --config")
    doc = load_yaml(path.read_text(encoding="utf-8"), f"config file {path}") or {}
    if not isinstance(doc, dict):
        raise ConfigError(f"config file {path} must be a mapping of sections ({', '.join(SECTIONS)})")
    unknown = sorted(set(doc) - set(SECTIONS))
    if unknown:
        raise ConfigError(
            f"config file {path}: unknown section(s) {', '.join(unknown)}; known sections: {', '.join(SECTIONS)}"
        )
    body = doc.get(section) or {}
    if not isinstance(body, dict):
        raise ConfigError(f"config file {path}: section '{section}' must be a mapping")
    return body


def parse_override(item: str) -> tuple[list[str], Any]:
    """Split ``a.b=value`` into key path and a YAML-typed value (``k=32`` gives an int)."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set outputs.k=32")
    try:
        value = load_yaml(raw, f"--set {item!r}") if raw.strip() else None
    except ConfigError as exc:
        if "duplicate key" in str(exc):
            raise
        value = raw
    return key.strip().split("."), value


def _assign(data: dict[str, Any], keys: list[str], value: Any) -> None:
    node = data
    for key in keys[:-1]:
        child = node.get(key)
        if not isinstance(child, dict):
            child = {}
            node[key] = child
        node = child
    node[keys[-1]] = value


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Instantiate dataclass ``cls`` from a nested mapping; raise ConfigError listing all problems."""
    problems: list[str] = []
    obj = _build(cls, data, prefix, problems)
    if not problems:
        problems.extend(_check_tree(obj, prefix))
    if problems:
        raise ConfigError("invalid config: " + "; ".join(problems))
    return obj


def _build(cls: type, data: Any, prefix: str, problems: list[str]) -> Any:
    if not isinstance(data, dict):
        problems.append(f"{prefix.rstrip('.')}: expected a mapping, got {data!r}")
        return None
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    for key in unknown:
        problems.append(f"{prefix}{key}: unknown key; known keys: {', '.join(fields)}")
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        if name not in fields:
            continue
        kwargs[name] = _coerce(hints[name], value, f"{prefix}{name}", problems)
    if problems:
        return None
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, key: str, problems: list[str]) -> Any:
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, key, problems)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key + ".", problems)
    if origin is Literal:
        if value not in args:
            choices = ", ".join(repr(a) for a in args)
            problems.append(f"{key}: {value!r} is not one of {choices}")
        return value
    if origin is dict:
        if not isinstance(value, dict):
            problems.append(f"{key}: expected a mapping, got {value!r} (write {{k: v}} on the command line)")
            return value
        return {str(k): v for k, v in value.items()}
    if origin is list:
        if not isinstance(value, list | tuple):
            problems.append(f"{key}: expected a list, got {value!r} (write [a, b] on the command line)")
            return value
        return [_coerce(args[0], v, f"{key}[{i}]", problems) for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            problems.append(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            problems.append(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 2e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int | float):
            problems.append(f"{key}: expected a number, got {value!r}")
            return value
        if not math.isfinite(value):
            problems.append(f"{key}: {value!r} is not a finite number; give a real value")
            return value
        return float(value)
    if tp is str:
        if isinstance(value, dict | list) or value is None:
            problems.append(f"{key}: expected a string, got {value!r}")
            return value
        return str(value)
    raise TypeError(f"unsupported config type {tp!r} for {key}")


def _check_tree(obj: Any, prefix: str) -> list[str]:
    """Run each dataclass's ``check()`` (a list of problems, keys relative to it), depth first."""
    problems: list[str] = []
    for f in dataclasses.fields(obj):
        child = getattr(obj, f.name)
        if dataclasses.is_dataclass(child):
            problems.extend(_check_tree(child, f"{prefix}{f.name}."))
    check = getattr(obj, "check", None)
    if check is not None:
        problems.extend(f"{prefix}{p}" for p in check())
    return problems


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """A nested mapping as {"a.b": value} (leaves only)."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def identity_diff(old: dict, new: dict) -> list[str]:
    """Human-readable differences between two nested mappings (`key: old -> new`)."""
    a, b = flatten(old), flatten(new)
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict of a config (for YAML printing and manifests)."""
    return dataclasses.asdict(cfg)


SECRET_WORDS = ("secret", "password", "token", "key", "credential", "sas")


def to_yaml(cfg: Any, redact: bool = False) -> str:
    """YAML of a config; `redact` hides the values of secret-looking storage options in logs."""
    data = to_dict(cfg)
    if redact:
        _redact(data)
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=None)


def _redact(node: Any) -> None:
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "storage_options" and isinstance(v, dict):
                node[k] = {o: "***" if any(w in o.lower() for w in SECRET_WORDS) else x for o, x in v.items()}
            else:
                _redact(v)


def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings (the string literal under each field), read from the class source."""
    tree = ast.parse(inspect.getsource(cls).lstrip())
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in itertools.pairwise(body):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def reference_rows(cls: type, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, description) for every leaf field of a config class, nested keys dotted."""
    rows: list[tuple[str, str, str]] = []
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows.extend(reference_rows(tp, f"{prefix}{f.name}."))
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = "(required)"
        shown = yaml.safe_dump(default, default_flow_style=True).strip().removesuffix("...").strip()
        rows.append((f"{prefix}{f.name}", shown, docs.get(f.name, "")))
    return rows


def reference_markdown(cls: type, section: str) -> str:
    """A markdown table documenting every key of a stage config (docs/configuration.md, kept current by a test)."""
    lines = [f"`{section}:` section", "", "| key | default | meaning |", "| --- | --- | --- |"]
    for key, default, doc in reference_rows(cls):
        lines.append(f"| `{key}` | `{default}` | {doc} |")
    return "\n".join(lines)
