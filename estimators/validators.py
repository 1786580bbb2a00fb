"""Composable attrs validators whose errors name the field, the bad value and the accepted values.

Use them on the fields of estimator and task configs (and in plugins)::

    @attrs.frozen
    class MyConfig(EstimatorConfig):
        num_samples: int = attrs.field(default=4, validator=int_at_least(2))
        tol: float = attrs.field(default=1e-6, validator=number_in(0, 1, low_open=True, high_open=True))
        seed: int | None = attrs.field(default=None, validator=optional(non_negative_int))

``MyConfig(num_samples=1)`` raises ``ValueError("num_samples must be an int >= 2, got 1")``. Booleans are never
accepted as numbers, and NaN is never accepted as a number.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import attrs

T = TypeVar("T")


@attrs.frozen
class Check(Generic[T]):
    """An attrs validator: ``accepts(value)`` decides; ``accepted`` describes the accepted values for the error."""

    accepted: str
    accepts: Callable[[Any], bool]

    def __call__(self, instance: object, attribute: attrs.Attribute[T], value: T) -> None:
        if not self.accepts(value):
            raise ValueError(f"{attribute.name} must be {self.accepted}, got {value!r}")

    def because(self, reason: str) -> Check[T]:
        """The same check, with ``reason`` added in parentheses to the description of the accepted values."""
        return Check(f"{self.accepted} ({reason})", self.accepts)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


def int_at_least(minimum: int) -> Check[int]:
    """An int (not a bool) ``>= minimum``."""
    return Check(f"an int >= {minimum}", lambda value: _is_int(value) and value >= minimum)


def int_in(low: int, high: int) -> Check[int]:
    """An int (not a bool) in ``[low, high]``."""
    return Check(f"an int in [{low}, {high}]", lambda value: _is_int(value) and low <= value <= high)


def number_in(
    low: float | None = None, high: float | None = None, *, low_open: bool = False, high_open: bool = False
) -> Check[float]:
    """An int or float (not a bool, not NaN) between the bounds; ``None`` leaves that side unbounded and
    ``low_open`` / ``high_open`` exclude the bound itself."""
    if low is None and high is None:
        raise ValueError("number_in needs a low or a high bound")

    def accepts(value: Any) -> bool:
        if not _is_number(value):
            return False
        above = low is None or (value > low if low_open else value >= low)
        below = high is None or (value < high if high_open else value <= high)
        return above and below

    if high is None:
        accepted = f"a number {'>' if low_open else '>='} {low}"
    elif low is None:
        accepted = f"a number {'<' if high_open else '<='} {high}"
    else:
        accepted = f"a number in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    return Check(accepted, accepts)


def one_of(*choices: str) -> Check[str]:
    """One of the given strings."""
    return Check(f"one of {', '.join(choices)}", lambda value: value in choices)


def optional(check: Check[T]) -> Check[T | None]:
    """``None`` or a value that ``check`` accepts."""
    return Check(f"None or {check.accepted}", lambda value: value is None or check.accepts(value))


#: An int >= 1.
positive_int = int_at_least(1)
#: An int >= 0.
non_negative_int = int_at_least(0)
#: An int or float > 0 (``inf`` included).
positive_number = number_in(0, low_open=True)
#: An int or float >= 0 (``inf`` included).
non_negative_number = number_in(0)
#: A finite int or float.
finite_number = number_in(-math.inf, math.inf, low_open=True, high_open=True)


def positive_int_tuple(instance: object, attribute: attrs.Attribute[tuple[int, ...]], value: tuple[int, ...]) -> None:
    """A tuple of ints (not bools) ``>= 1``; the error also names the first bad entry."""
    for entry in value:
        if not positive_int.accepts(entry):
            raise ValueError(f"{attribute.name} must be a tuple of ints >= 1, got {value!r} (bad entry {entry!r})")

