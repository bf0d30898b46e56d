"""Typed configs from YAML: dataclasses built from mappings, ``--set a.b=value`` overrides, one-line errors.

Every config section is a dataclass whose field names are the YAML keys; :func:`build` turns a mapping
into it, rejecting unknown keys and wrong types with an error that names the key (``train.batch must be
int, got 'x'``). Values that are impossible rather than mistyped are checked by each dataclass's
``__post_init__``.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path

import yaml


class ConfigError(ValueError):
    """A config that cannot be run; the message names the key and the problem on one line."""


class _Loader(yaml.SafeLoader):
    """YAML 1.1's safe loader, but ``1e-4`` is a float (YAML 1.2, and what anyone writing a learning rate means;
    1.1 wants ``1.0e-4`` and reads ``1e-4`` as a string)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _parse(text: str):
    return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)


def build(config_type: type, mapping: Mapping | None, prefix: str = ""):
    """A ``config_type`` dataclass from a mapping, nested dataclass fields included."""
    mapping = {} if mapping is None else mapping
    if not isinstance(mapping, Mapping):
        raise ConfigError(f"{prefix or 'config'} must be a mapping, got {mapping!r}")
    hints = typing.get_type_hints(config_type)
    values = {}
    for key, value in mapping.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if key not in hints:
            where = f" of {prefix}" if prefix else ""
            raise ConfigError(f"unknown key {name!r}; valid keys{where}: {', '.join(hints)}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            values[key] = build(hint, value, name)
        else:
            values[key] = check_type(name, value, hint)
    try:
        return config_type(**values)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{prefix + ': ' if prefix else ''}{exc}") from None


def check_type(name: str, value, hint):
    """``value`` as the annotated type (lists become tuples), or a :class:`ConfigError` naming the key."""
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    if value is None and type(None) in options:
        return None
    for option in options:  # exact types: a bool is not accepted as an int, nor an int as a str
        origin = typing.get_origin(option)
        if origin is tuple and isinstance(value, (list, tuple)):
            items = [a for a in typing.get_args(option) if a is not Ellipsis]
            kinds = items * len(value) if Ellipsis in typing.get_args(option) else items
            if len(kinds) == len(value) and all(_is(v, kind) for v, kind in zip(value, kinds, strict=True)):
                return tuple(float(v) if kind is float else v for v, kind in zip(value, kinds, strict=True))
        elif origin is dict and isinstance(value, Mapping):
            return dict(value)
        elif option is not type(None) and origin is None and _is(value, option):
            return float(value) if option is float else value
    expected = " or ".join(_type_name(o) for o in options)
    raise ConfigError(f"{name} must be {expected}, got {value!r}")


def _is(value, kind) -> bool:
    return type(value) in (int, float) if kind is float else type(value) is kind


def _type_name(option) -> str:
    if option is type(None):
        return "null"
    if typing.get_origin(option) is tuple:
        return "a list of " + "/".join(_type_name(a) for a in typing.get_args(option) if a is not Ellipsis)
    return getattr(option, "__name__", str(option))


def to_dict(config) -> dict:
    """A plain mapping (tuples as lists) that :func:`build` turns back into the same config."""
    def plain(value):
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (tuple, list)):
            return [plain(v) for v in value]
        if isinstance(value, Mapping):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(config)


def parse_override(text: str) -> tuple[list[str], object]:
    """``a.b=value`` -> (["a", "b"], value parsed as YAML), or a :class:`ConfigError`."""
    key, sep, value = text.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"expected key=value (e.g. train.steps=100), got {text!r}")
    try:
        return key.split("."), _parse(value)
    except yaml.YAMLError:
        raise ConfigError(f"cannot parse the value of {text!r}") from None


def apply_overrides(mapping: Mapping, overrides: Sequence[str]) -> dict:
    """A copy of ``mapping`` with each ``a.b=value`` override set (sections created when missing)."""
    result = _deep_copy(mapping)
    for text in overrides:
        path, value = parse_override(text)
        node = result
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"cannot set {text!r}: {part!r} is not a section")
            node = child
        node[path[-1]] = value
    return result


def _deep_copy(mapping: Mapping) -> dict:
    return {k: _deep_copy(v) if isinstance(v, Mapping) else v for k, v in mapping.items()}


def load_yaml(path: str | Path) -> dict:
    """A YAML file's top-level mapping, or a one-line :class:`ConfigError`."""
    path = Path(path)
    try:
        data = _parse(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read config {str(path)!r}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config {str(path)!r} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config {str(path)!r} must be a mapping, got {type(data).__name__}")
    return data
