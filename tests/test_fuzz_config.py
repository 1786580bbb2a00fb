"""Hypothesis fuzzing of the configuration path the CLI takes (``--set`` parsing, routing, every registered task
and estimator config class): any input either plans a run or raises a one-line :class:`ConfigError`, never another
exception."""

from __future__ import annotations

import math
from typing import Any

import attrs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lvzoo import registry
from lvzoo.runners.cli_common import parse_assignments
from lvzoo.runners.plan import ConfigError, RunPlan, plan_run

TASKS = registry.tasks.names()
ESTIMATORS = registry.estimators.names()
FIELDS = sorted(
    {field.name for name in TASKS for field in attrs.fields(registry.tasks.load(name).config_class)}
    | {field.name for name in ESTIMATORS for field in attrs.fields(registry.estimators.load(name).config_class)}
)
TEXTS = st.one_of(
    st.text(max_size=12),
    st.sampled_from(["0", "1", "-1", "1e-3", "nan", "inf", "-inf", "true", "none", "1,2", "(3, 4)", "[5]", "", " "]),
    st.integers(-10**6, 10**6).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
)
TYPED = st.one_of(st.none(), st.booleans(), st.integers(-10**9, 10**9), st.floats(), st.text(max_size=6),
                  st.tuples(st.integers(-3, 600)), st.lists(st.integers(0, 5), max_size=3))
KEYS = st.one_of(
    st.sampled_from(FIELDS),
    st.sampled_from(FIELDS).map(lambda name: f"task.{name}"),
    st.sampled_from(FIELDS).map(lambda name: f"estimator.{name}"),
    st.text(max_size=10),
)


def plan_or_error(task: str, estimator: str, overrides: dict[str, Any]) -> RunPlan | None:
    try:
        return plan_run(task, estimator, overrides, epochs=1, seed=0, device="cpu", data_dir=None)
    except ConfigError as exc:
        message = str(exc)
        assert message and "\n" not in message, message
        return None


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(TASKS),
    st.sampled_from(ESTIMATORS),
    st.dictionaries(KEYS, TEXTS, max_size=4),
)
def test_string_overrides_plan_a_run_or_fail_in_one_line(task: str, estimator: str, overrides: dict[str, str]) -> None:
    plan = plan_or_error(task, estimator, overrides)
    if plan is not None:  # what was accepted holds valid, finite-where-numeric values
        for value in [*attrs.asdict(plan.task_config).values(), *attrs.asdict(plan.estimator_config).values()]:
            assert not (isinstance(value, float) and math.isnan(value)), plan


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(TASKS), st.sampled_from(ESTIMATORS), st.dictionaries(st.sampled_from(FIELDS), TYPED, max_size=4))
def test_typed_overrides_from_python_plan_a_run_or_fail_in_one_line(
    task: str, estimator: str, overrides: dict[str, Any]
) -> None:
    plan_or_error(task, estimator, overrides)


@given(st.lists(st.text(max_size=15), max_size=5))
def test_set_parsing_accepts_key_value_or_fails_in_one_line(items: list[str]) -> None:
    try:
        parsed = parse_assignments(items)
    except ConfigError as exc:
        assert "\n" not in str(exc) and "--set expects key=value" in str(exc)
        return
    assert len(parsed) <= len(items) and all("=" in item for item in items)


@pytest.mark.parametrize("name", ESTIMATORS)
def test_every_estimator_config_field_refuses_a_wrong_type_in_one_line(name: str) -> None:
    for field in attrs.fields(registry.estimators.load(name).config_class):
        plan_or_error("bitvec", name, {field.name: object()})
