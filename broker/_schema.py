"""The wire schema of declared classes: each field's annotation is its validation.

A command (or the envelope) is a dataclass whose annotations say what each field
may hold: `int`, `str`, a list of them, a union with None, or a constrained type —
`Annotated[int, Range(0, 2**53 - 1)]`, `Annotated[str, Text(128, pattern)]`.
`Schema.of(name, cls)` derives one check per field from them once; `validate`
then refuses anything else with one `ProtocolError` naming the field, what it must
be and what it got.
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

from ._errors import ProtocolError

__all__ = ["Range", "Schema", "Text"]

# -- constrained field types ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Range:
    """An integer field's inclusive bounds."""

    low: int
    high: int


@dataclass(frozen=True, slots=True)
class Text:
    """A string field's length bounds, and optionally the pattern it must match."""

    max_length: int
    pattern: str | None = None
    meaning: str = ""


# -- validators derived from annotations --------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Validator:
    check: Callable[[Any], bool]
    expected: str


def _validator(annotation: Any) -> _Validator:
    """How to check a decoded value against a field's annotation."""
    if annotation is Any:
        return _Validator(lambda v: True, "any value")
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is Annotated:
        return _constrained(args[0], args[1:])
    if annotation is int:
        return _constrained(int, (Range(-(1 << 63), (1 << 63) - 1),))
    if annotation is str:
        return _constrained(str, (Text(255),))
    if annotation is bool:
        return _Validator(lambda v: type(v) is bool, "a boolean")
    if annotation is float:
        return _Validator(lambda v: type(v) in (int, float) and math.isfinite(v),
                          "a finite number")
    if origin is list:
        (item,) = args
        if item is Any:
            return _Validator(lambda v: type(v) is list, "a list")
        inner = _validator(item).check
        return _Validator(
            lambda v: type(v) is list and all(inner(i) for i in v),
            f"a list of {_validator(item).expected}",
        )
    if origin is dict and args == (str, Any):
        return _Validator(
            lambda v: type(v) is dict and all(type(k) is str for k in v), "a map with string keys"
        )
    if origin in (typing.Union, _UNION_TYPE) and len(args) == 2 and type(None) in args:
        (inner_type,) = [a for a in args if a is not type(None)]
        inner_validator = _validator(inner_type)
        check = inner_validator.check
        return _Validator(lambda v: v is None or check(v), f"{inner_validator.expected} or nil")
    raise TypeError(f"no wire validation for fields annotated {annotation!r}")


_UNION_TYPE = type(int | None)


def _constrained(base: type, constraints: tuple[Any, ...]) -> _Validator:
    (constraint,) = constraints
    if base is int and isinstance(constraint, Range):
        low, high = constraint.low, constraint.high
        return _Validator(
            lambda v: type(v) is int and low <= v <= high, f"an integer from {low} to {high}"
        )
    if base is str and isinstance(constraint, Text):
        longest = constraint.max_length
        if constraint.pattern is None:
            return _Validator(
                lambda v: type(v) is str and 0 < len(v) <= longest,
                f"a non-empty string of at most {longest} characters",
            )
        matches = re.compile(constraint.pattern).fullmatch
        return _Validator(
            lambda v: type(v) is str and 0 < len(v) <= longest and matches(v) is not None,
            f"1 to {longest} {constraint.meaning}",
        )
    raise TypeError(f"no wire validation for {base.__name__} with {constraint!r}")


@dataclass(frozen=True, slots=True)
class _Field:
    name: str
    validator: _Validator
    required: bool


@dataclass(frozen=True, slots=True)
class Schema:
    """The wire form of one declared class: its fields, in declaration order."""

    owner: str
    fields: tuple[_Field, ...]
    names: frozenset[str]
    checks: dict[str, Callable[[Any], bool]]
    """name -> check of every field, for the hot path of `validate`."""
    required: int
    """How many fields must be given."""

    @classmethod
    def of(cls, owner: str, declared: type) -> Schema:
        hints = typing.get_type_hints(declared, include_extras=True)
        fields = tuple(
            _Field(
                f.name,
                _validator(hints[f.name]),
                f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING,
            )
            for f in dataclasses.fields(declared)
        )
        checks = {f.name: f.validator.check for f in fields}
        return cls(owner, fields, frozenset(checks), checks, sum(f.required for f in fields))

    def validate(self, values: dict[Any, Any]) -> None:
        """Raise `ProtocolError` unless `values` holds exactly valid fields of this schema."""
        checks = self.checks
        for key, value in values.items():
            check = checks.get(key)
            if check is None or not check(value):
                self._explain(values)
        if len(values) < len(checks) and len(values) - sum(
            1 for f in self.fields if not f.required and f.name in values
        ) < self.required:
            self._explain(values)

    def _explain(self, values: dict[Any, Any]) -> None:
        """Raise the `ProtocolError` that says what is wrong with `values`, if anything."""
        if not values.keys() <= self.names:
            unknown = sorted(str(k) for k in values.keys() - self.names)
            raise ProtocolError(f"{self.owner}: unknown fields {unknown}")
        missing = sorted(f.name for f in self.fields if f.required and f.name not in values)
        if missing:
            raise ProtocolError(f"{self.owner}: missing fields {missing}")
        for f in self.fields:
            if f.name in values and not f.validator.check(values[f.name]):
                raise ProtocolError(
                    f"{self.owner}: field {f.name!r} must be {f.validator.expected}, "
                    f"got {_shown(values[f.name])}"
                )


def _shown(value: Any) -> str:
    """A value named in an error: its type, and short scalars themselves."""
    if type(value) in (int, bool) or (type(value) is str and len(value) <= 40):
        return f"{type(value).__name__} {value!r}"
    return type(value).__name__
