"""Resolving a run's configuration: ``--set key=value`` overrides, paper defaults and validation.

A run has two frozen attrs configs: the task's (``task.config_class``) and the estimator's
(``estimator.config_class``). User overrides are given as ``key=value`` strings (or already typed values from
the Python API); a bare ``key`` is looked up in both configs, ``task.key`` / ``estimator.key`` pick one. String
values are parsed by the field's annotated type (``int``, ``float``, ``bool``, ``str``, ``None`` unions,
``Literal[...]``, ``tuple[...]``). Every problem raises :class:`ConfigError` with a one-line message that names
the bad key or value and what would have been accepted.
"""

from __future__ import annotations

import ast
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any

import attrs

from lvzoo.tasks.base import Task, TaskConfig, resolve_config

TASK_PREFIX = "task."
ESTIMATOR_PREFIX = "estimator."
_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


class ConfigError(ValueError):
    """An invalid run configuration; the message is a single line meant for the user."""


def one_line(message: str) -> str:
    """Collapse a (possibly multi-line) message into one line."""
    return " ".join(message.split())


def parse_assignments(assignments: Iterable[str]) -> dict[str, str]:
    """``["a=1", "task.b=x"]`` -> ``{"a": "1", "task.b": "x"}``; refuses items without ``=``."""
    parsed: dict[str, str] = {}
    for item in assignments:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        parsed[key] = value.strip()
    return parsed


def field_types(config_class: type[Any]) -> dict[str, Any]:
    """Field name -> annotated type of an attrs class (the annotation string if it cannot be resolved)."""
    try:
        hints = typing.get_type_hints(config_class)
    except Exception:  # unresolvable forward references: fall back to the raw annotations
        hints = {}
    return {field.name: hints.get(field.name, field.type) for field in attrs.fields(config_class)}


def _type_name(annotation: Any) -> str:
    if isinstance(annotation, str):
        return annotation
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def parse_value(text: str, annotation: Any, key: str) -> Any:
    """Parse the string ``text`` as a value of type ``annotation`` (used for the ``--set`` value of ``key``)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and text.strip().lower() in ("none", "null"):
            return None
        for member in (a for a in args if a is not type(None)):
            try:
                return parse_value(text, member, key)
            except ConfigError:
                continue
        raise ConfigError(f"bad value for {key}: {text!r} is not a {_type_name(annotation)}")
    if origin is typing.Literal:
        for choice in args:
            if str(choice) == text:
                return choice
        accepted = ", ".join(repr(c) for c in args)
        raise ConfigError(f"bad value for {key}: {text!r}; accepted values: {accepted}")
    if origin is tuple:
        body = text.strip()
        if body[:1] in "([" and body[-1:] in ")]":
            body = body[1:-1]
        items = [part.strip() for part in body.split(",") if part.strip()]
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(parse_value(item, args[0], key) for item in items)
        if len(items) != len(args):
            raise ConfigError(f"bad value for {key}: {text!r} needs {len(args)} comma-separated items")
        return tuple(parse_value(item, member, key) for item, member in zip(items, args, strict=True))
    if annotation is bool:
        lowered = text.strip().lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        raise ConfigError(f"bad value for {key}: {text!r} is not a bool (use true/false)")
    if annotation is int:
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"bad value for {key}: {text!r} is not an int") from None
    if annotation is float:
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"bad value for {key}: {text!r} is not a float") from None
    if annotation is str:
        return text
    try:  # unknown or unresolved annotation: accept a Python literal, else keep the string
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _route(
    overrides: Mapping[str, Any], task_fields: Mapping[str, Any], estimator_fields: Mapping[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split user overrides into (task values, estimator values), parsing strings by field type."""
    accepted = [TASK_PREFIX + name for name in task_fields] + [ESTIMATOR_PREFIX + name for name in estimator_fields]
    task_values: dict[str, Any] = {}
    estimator_values: dict[str, Any] = {}
    for key, value in overrides.items():
        if key.startswith(TASK_PREFIX) and key[len(TASK_PREFIX) :] in task_fields:
            target, fields, name = task_values, task_fields, key[len(TASK_PREFIX) :]
        elif key.startswith(ESTIMATOR_PREFIX) and key[len(ESTIMATOR_PREFIX) :] in estimator_fields:
            target, fields, name = estimator_values, estimator_fields, key[len(ESTIMATOR_PREFIX) :]
        elif key in task_fields and key in estimator_fields:
            raise ConfigError(f"ambiguous key {key!r}: use {TASK_PREFIX}{key} or {ESTIMATOR_PREFIX}{key}")
        elif key in task_fields:
            target, fields, name = task_values, task_fields, key
        elif key in estimator_fields:
            target, fields, name = estimator_values, estimator_fields, key
        else:
            raise ConfigError(f"unknown key {key!r}; accepted keys: {', '.join(accepted)}")
        prefix = TASK_PREFIX if target is task_values else ESTIMATOR_PREFIX
        target[name] = parse_value(value, fields[name], prefix + name) if isinstance(value, str) else value
    return task_values, estimator_values


def _build(config_class: type[Any], values: Mapping[str, Any], what: str) -> Any:
    """Instantiate an attrs config, turning validator errors into a one-line :class:`ConfigError`."""
    try:
        return config_class(**values)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"invalid {what} config: {one_line(str(exc))}") from None


def split_overrides(
    overrides: Mapping[str, Any], task_config_class: type[TaskConfig], estimator_config_class: type[Any]
) -> tuple[TaskConfig, dict[str, Any]]:
    """Validated task config from the user values, and the user's estimator values (not yet merged)."""
    task_values, estimator_values = _route(
        overrides, field_types(task_config_class), field_types(estimator_config_class)
    )
    task_config: TaskConfig = _build(task_config_class, task_values, "task")
    return task_config, estimator_values


def resolve_configs(
    task_cls: type[Task[Any]], estimator_name: str, estimator_config_class: type[Any], overrides: Mapping[str, Any]
) -> tuple[TaskConfig, Any]:
    """The task config and estimator config of a run: field defaults, then the task's paper settings for
    ``estimator_name`` (:func:`lvzoo.tasks.base.resolve_config`), then the user's ``overrides`` (``--set``)."""
    task_values, estimator_values = _route(
        overrides, field_types(task_cls.config_class), field_types(estimator_config_class)
    )
    try:
        task_config, paper_estimator = resolve_config(task_cls, estimator_name, task_values)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"invalid task config: {one_line(str(exc))}") from None
    known = {field.name for field in attrs.fields(estimator_config_class)}
    unknown = sorted(set(paper_estimator) - known)
    if unknown:
        raise ConfigError(
            f"task settings set unknown estimator keys {unknown}; accepted keys: {', '.join(sorted(known)) or '(none)'}"
        )
    return task_config, _build(estimator_config_class, {**paper_estimator, **estimator_values}, "estimator")


def config_to_dict(config: Any) -> dict[str, Any]:
    """Field values of an attrs config (tuples kept as tuples)."""
    values: dict[str, Any] = attrs.asdict(config, recurse=True)
    return values

