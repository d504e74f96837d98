"""The checks every job spec field goes through, and the error that gathers what they find.

Each check raises a :class:`SpecError` naming its field; :class:`FieldErrors`
runs independent checks and keeps going, so one SpecError lists every
malformed field of a spec at once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class SpecError(ValueError):
    """A job spec is malformed; each message names its field.

    ``errors`` lists every problem found in the spec, not only the first, so a
    person fixes them all in one go; ``str()`` joins them with ``; ``.
    """

    def __init__(self, *errors: str) -> None:
        super().__init__("; ".join(errors))
        self.errors: tuple[str, ...] = errors


class FieldErrors:
    """Collects the SpecErrors of independent fields; each field falls back to a default."""

    def __init__(self) -> None:
        self.items: list[str] = []

    def check(self, parse: Callable[[], T], default: T) -> T:
        try:
            return parse()
        except SpecError as exc:
            self.items.extend(exc.errors)
            return default

    def raise_any(self) -> None:
        if self.items:
            raise SpecError(*self.items)


def int_field(data: dict, key: str, path: str, default: int, minimum: int | None = None) -> int:
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(f"{path}{key}: must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise SpecError(f"{path}{key}: must be >= {minimum}, got {value}")
    return value


def mapping_field(data: dict, key: str, path: str) -> dict:
    value = data.get(key, {})
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise SpecError(f"{path}{key}: must be a mapping, got {type(value).__name__}")
    return value


def reject_unknown(data: dict, known: set[str], path: str) -> None:
    unknown = sorted(set(data) - known, key=str)
    if unknown:
        listed = ", ".join(sorted(known))
        raise SpecError(*(f"{path}{k}: unknown field (known: {listed})" for k in unknown))


def seconds_field(data: dict, key: str, default: float, path: str = "") -> float:
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise SpecError(f"{path}{key}: must be a number of seconds >= 0, got {value!r}")
    return float(value)


def missing(field_name: str) -> int:
    raise SpecError(f"{field_name}: required")
