"""One config loader for every service: nested dataclasses from YAML plus ``a.b=c`` overrides.

Each service declares a tree of ``@dataclass(kw_only=True)`` classes whose fields carry
defaults and whose ``__post_init__`` validates. ``load_config`` reads the YAML, applies the
command-line overrides (values parsed as YAML, so ``server.port=50051`` is an int), rejects
unknown keys by their dotted name and builds the tree.

Convention: each config class is a module-level ``XConfig`` beside the component it configures
(``HyperLoRAConfig`` in ``trainer.hypernetwork``, ``TeacherClientConfig`` in
``trainer.teacher_client``); a service's root (``TrainerConfig``, ``TeacherConfig``) composes them.
Validators raise ``ValueError`` naming their fields bare; every error leaves ``load_config`` as a
``ConfigError`` that starts with the section's dotted path (``hypernetwork.rank must be >= 1``).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override that does not fit the config schema."""


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Build ``cls`` from the YAML file at ``path`` (optional) and ``key.sub=value`` overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: top level must be a mapping, got {type(raw).__name__}")
    for item in overrides or []:
        _apply_override(raw, item)
    return _build(cls, raw, prefix="")


def config_from_dict(cls: type[T], raw: dict[str, Any], prefix: str = "") -> T:
    """Build ``cls`` from plain data (e.g. a config stored in a checkpoint), checked as a YAML file is;
    ``prefix`` names its place in error messages (``hypernetwork.``)."""
    return _build(cls, raw, prefix=prefix)


def config_to_dict(config: Any) -> dict[str, Any]:
    """The resolved config as plain data (for logs and checkpoints)."""
    return dataclasses.asdict(config)


def _apply_override(raw: dict[str, Any], item: str) -> None:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r} is not of the form key.sub=value")
    node = raw
    *parents, leaf = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {part!r} is not a section")
    node[leaf] = yaml.safe_load(value)


def _build(cls: type[T], raw: Any, prefix: str) -> T:
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        names = ", ".join(prefix + k for k in unknown)
        raise ConfigError(f"unknown config key(s) {names}; {cls.__name__} has {', '.join(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {name: _coerce(hints[name], value, prefix + name) for name, value in raw.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(_located(str(e), prefix, fields)) from None


def _located(message: str, prefix: str, fields: typing.Iterable[str]) -> str:
    """A validator's message (fields named bare) with the section's dotted path: ``rank must be
    >= 1`` -> ``hypernetwork.rank must be >= 1``; ``need lr > 0`` -> ``phases[0]: need lr > 0``."""
    first = message.split(" ", 1)[0].rstrip(":,")
    if not prefix:
        return message
    return prefix + message if first in fields else f"{prefix.rstrip('.')}: {message}"


def _coerce(hint: Any, value: Any, name: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, prefix=name + ".")
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, name) if len(inner) == 1 else value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        return [_coerce(args[0], v, f"{name}[{i}]") for i, v in enumerate(value)] if args else value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ConfigError(f"{name}: expected {hint.__name__}, got {value!r}")
    return value
