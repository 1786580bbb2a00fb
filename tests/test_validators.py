"""The shared attrs validators: accepted and refused values, and errors naming the field, value and range."""

from __future__ import annotations

import math
import re
from typing import Any

import attrs
import pytest

from lvzoo.estimators.validators import (
    int_at_least,
    int_in,
    non_negative_int,
    number_in,
    one_of,
    optional,
    positive_int,
    positive_int_tuple,
    positive_number,
)


@attrs.frozen
class Example:
    count: int = attrs.field(default=2, validator=int_at_least(2).because("two draws are compared"))
    bits: int | None = attrs.field(default=None, validator=optional(int_in(1, 52)))
    rate: float = attrs.field(default=0.5, validator=number_in(0, 1, low_open=True))
    decay: float = attrs.field(default=0.0, validator=number_in(0, 1, high_open=True))
    scale: float = attrs.field(default=1.0, validator=positive_number)
    seed: int = attrs.field(default=0, validator=non_negative_int)
    mode: str = attrs.field(default="a", validator=one_of("a", "b"))
    sizes: tuple[int, ...] = attrs.field(default=(1, 2), validator=positive_int_tuple)
    batch: int | None = attrs.field(default=None, validator=optional(positive_int))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("count", 2),
        ("bits", None),
        ("bits", 52),
        ("rate", 1.0),
        ("decay", 0),
        ("scale", math.inf),
        ("seed", 0),
        ("mode", "b"),
        ("sizes", ()),
        ("batch", 3),
    ],
)
def test_accepted_values(field: str, value: Any) -> None:
    assert getattr(Example(**{field: value}), field) == value


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("count", 1, "count must be an int >= 2 (two draws are compared), got 1"),
        ("count", True, "count must be an int >= 2 (two draws are compared), got True"),
        ("count", 2.0, "count must be an int >= 2 (two draws are compared), got 2.0"),
        ("bits", 53, "bits must be None or an int in [1, 52], got 53"),
        ("rate", 0.0, "rate must be a number in (0, 1], got 0.0"),
        ("rate", math.nan, "rate must be a number in (0, 1], got nan"),
        ("decay", 1, "decay must be a number in [0, 1), got 1"),
        ("scale", 0, "scale must be a number > 0, got 0"),
        ("scale", "1", "scale must be a number > 0, got '1'"),
        ("seed", -1, "seed must be an int >= 0, got -1"),
        ("mode", "c", "mode must be one of a, b, got 'c'"),
        ("sizes", (3, 0), "sizes must be a tuple of ints >= 1, got (3, 0) (bad entry 0)"),
        ("batch", 0, "batch must be None or an int >= 1, got 0"),
    ],
)
def test_refused_values_name_field_value_and_range(field: str, value: Any, message: str) -> None:
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        Example(**{field: value})


def test_number_in_needs_a_bound() -> None:
    with pytest.raises(ValueError, match="bound"):
        number_in()
