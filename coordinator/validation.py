"""Small typed readers for JSON objects a client sent: wrong types and unknown keys become
:class:`~coordinator.errors.InvalidRequest` (400) naming the field.

::

    >>> r = Fields({"goal": 10}, "plan")
    >>> r.integer("goal", 5, minimum=1)
    10
    >>> r.done()   # raises on keys nobody read
"""

from __future__ import annotations

import math
from typing import Any

from coordinator.errors import InvalidRequest

__all__ = ["Fields"]


def _utf8(value: str) -> bool:
    """JSON may carry lone surrogates (``"\\ud800"``), which no UTF-8 column can store, and
    NUL characters (``"\\u0000"``), which no PostgreSQL text column can."""
    if "\x00" in value:
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class Fields:
    def __init__(self, obj: Any, where: str) -> None:
        if not isinstance(obj, dict):
            raise InvalidRequest(f"{where} must be a JSON object")
        self.obj = obj
        self.where = where
        self._read: set[str] = set()

    def _get(self, key: str) -> Any:
        self._read.add(key)
        return self.obj.get(key)

    def _fail(self, key: str, what: str) -> InvalidRequest:
        return InvalidRequest(f"{self.where}.{key} must be {what}")

    def has(self, key: str) -> bool:
        return self.obj.get(key) is not None

    def raw(self, key: str) -> Any:
        return self._get(key)

    def integer(
        self,
        key: str,
        default: int | None,
        *,
        minimum: int | None = None,
        maximum: int | None = None,
    ) -> Any:
        value = self._get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._fail(key, "an integer")
        if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
            raise self._fail(key, f"in [{minimum}, {maximum}]")
        return value

    def number(
        self,
        key: str,
        default: float | None,
        *,
        minimum: float | None = None,
        maximum: float | None = None,
        exclusive_min: bool = False,
        exclusive_max: bool = False,
    ) -> Any:
        value = self._get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self._fail(key, "a finite number")
        try:
            value = float(value)  # a JSON integer may have hundreds of digits
        except OverflowError:
            raise self._fail(key, "a finite number") from None
        if not math.isfinite(value):
            raise self._fail(key, "a finite number")
        if minimum is not None and (value < minimum or (exclusive_min and value == minimum)):
            raise self._fail(key, f"{'>' if exclusive_min else '>='} {minimum}")
        if maximum is not None and (value > maximum or (exclusive_max and value == maximum)):
            raise self._fail(key, f"{'<' if exclusive_max else '<='} {maximum}")
        return value

    def string(
        self, key: str, default: str | None, *, max_len: int = 256, choices: Any = None
    ) -> Any:
        value = self._get(key)
        if value is None:
            return default
        if not isinstance(value, str) or not value or len(value) > max_len or not _utf8(value):
            raise self._fail(key, f"a non-empty string of at most {max_len} characters")
        if choices is not None and value not in choices:
            raise self._fail(key, f"one of {', '.join(sorted(choices))}")
        return value

    def boolean(self, key: str, default: bool | None) -> Any:
        value = self._get(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self._fail(key, "true or false")
        return value

    def strings(self, key: str, default: list[str] | None, *, max_items: int = 64) -> Any:
        value = self._get(key)
        if value is None:
            return default
        if (
            not isinstance(value, list)
            or len(value) > max_items
            or not all(isinstance(v, str) and 0 < len(v) <= 64 and _utf8(v) for v in value)
        ):
            raise self._fail(key, f"a list of at most {max_items} short strings")
        return list(value)

    def child(self, key: str) -> Fields:
        value = self._get(key)
        return Fields({} if value is None else value, f"{self.where}.{key}")

    def done(self) -> None:
        unknown = set(self.obj) - self._read
        if unknown:
            raise InvalidRequest(f"unknown fields in {self.where}: {', '.join(sorted(unknown))}")
