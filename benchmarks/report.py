"""The result table: one row per figure, with its baseline, ratio and target.

A measure that fails becomes a row that says so; the run goes on. Rows compare
a torchrelay figure against a baseline measured on the same broker and machine;
`Target` states the issue's goal for the ratio (or, for memory and bytes, for
the figure itself), and the table says whether it is met.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class Target:
    """`value <= limit` (or `>=`), printed as `text`."""

    limit: float
    at_most: bool
    text: str

    def met(self, value: float) -> bool:
        return value <= self.limit if self.at_most else value >= self.limit


def at_most(limit: float, text: str | None = None) -> Target:
    return Target(limit, True, text or f"<= {limit:g}x")


def at_least(limit: float, text: str | None = None) -> Target:
    return Target(limit, False, text or f">= {limit:g}x")


@dataclass(slots=True)
class Row:
    """One line of the table.

    `checked` is what the target is compared with; it defaults to `ratio`.
    `error` marks a figure that could not be measured (the row says why).
    """

    measure: str
    ours: str = ""
    baseline: str = ""
    ratio: float | None = None
    target: Target | None = None
    checked: float | None = None
    note: str = ""
    error: str | None = None

    @property
    def value_checked(self) -> float | None:
        return self.ratio if self.checked is None else self.checked

    @property
    def verdict(self) -> str:
        if self.error is not None:
            return "FAILED"
        if self.target is None:
            return "-"
        value = self.value_checked
        if value is None:
            return "?"
        return "yes" if self.target.met(value) else "NO"

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["target"] = None if self.target is None else self.target.text
        data["met"] = self.verdict
        return data


class Skipped(Exception):
    """A figure that cannot be measured here, for a known reason (not a failure)."""


def skipped(measure: str, reason: str) -> Row:
    return Row(measure, ours="skipped", note=reason)


def not_measured(measure: str, error: BaseException, target: Target | None = None) -> Row:
    """The row for an exception: skipped if it is `Skipped`, failed otherwise."""
    if isinstance(error, Skipped):
        return skipped(measure, str(error))
    return failed(measure, error, target)


def failed(measure: str, error: BaseException | str, target: Target | None = None) -> Row:
    """A row for a figure that could not be measured."""
    text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    text = " ".join(text.split())  # one line, whatever the exception said
    if len(text) > 160:
        text = text[:157] + "..."
    return Row(measure, ours="FAILED", target=target, error=text, note=text)


@dataclass(slots=True)
class MeasureResult:
    """What one measure produced: its rows, and its raw numbers for `--json`."""

    rows: list[Row] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)


_HEADERS = ("measure", "torchrelay", "baseline", "ratio", "target", "met", "note")


def render(rows: Sequence[Row]) -> str:
    """The rows as an aligned plain-text table (the note column is left ragged)."""
    cells = [
        (
            r.measure,
            r.ours,
            r.baseline or "-",
            "-" if r.ratio is None else f"{r.ratio:.2f}x",
            "-" if r.target is None else r.target.text,
            r.verdict,
            r.note,
        )
        for r in rows
    ]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(_HEADERS)]
    widths[-1] = 0

    def line(values: Sequence[str]) -> str:
        return " | ".join(v.ljust(w) for v, w in zip(values, widths, strict=True)).rstrip()

    rule = "-+-".join("-" * w for w in widths[:-1]) + "-+-" + "-" * 4
    return "\n".join([line(_HEADERS), rule, *(line(c) for c in cells)])
