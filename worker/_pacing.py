"""Time that tells nothing new: operations on private data end on a public schedule.

An operation can take longer on some values than on others — `cos` of infinity
is ten times slower than of a number, sorting sorted data is fast, a failing
factorisation stops early — and a client sees how long its commands take.
Measured on 512x512 arguments, about a third of the allow-listed operations
told one bit per query that way, through the broker (`python -m benchmarks
--only sidechannels`).

So a worker daemon paces every operation on private data (`Pacer`), after
predictive mitigation (Askarov, Zhang and Myers, CCS 2010): the operation's
result is released only at the time its *schedule* says, `base + rate x work`,
where `work` is a public measure of its size (the elements of its arguments and
result) and `rate` is the operation's current rate (per worker, per
operation). An operation that runs past its schedule doubles its rate until the
schedule covers it, and every later run of that operation is held to the new,
slower schedule. What the time of a command then tells is only how often the
schedules grew: at most `log2(MAX_RATE / MIN_RATE)` times per operation over a
worker's life (`epochs`, in its status), whatever a client asks.

The schedule is kept per operation, not per shape, so that a client cannot get
fresh schedules by varying shapes; the price is that one slow run slows that
operation for everyone on the worker (at most to its slowest rate, which the
fair-share limits bound).
"""

from __future__ import annotations

import time
from typing import Final

__all__ = ["Pacer"]

BASE: Final = 20e-6
"""Seconds every paced operation takes at least (a small operation's own cost)."""
MIN_RATE: Final = 1e-10
"""Seconds per element a schedule starts from (faster than any operation runs)."""
MAX_RATE: Final = 1e-2
"""A rate is not doubled past this: at most log2(MAX_RATE / MIN_RATE) = 27 epochs."""
_SPIN: Final = 1e-3
"""Waits shorter than this spin rather than sleep (a sleep can overshoot by as much)."""


class Pacer:
    """The schedules of one worker's operations on private data."""

    __slots__ = ("_rates", "epochs")

    def __init__(self) -> None:
        self._rates: dict[str, float] = {}
        self.epochs = 0
        """How often a schedule grew: all that the time of private operations tells."""

    def pace(self, op: str, work: int, started: float) -> None:
        """Return at `started` (a `time.perf_counter()`) plus `op`'s schedule for `work`
        elements, the schedule first grown if the operation already ran past it."""
        rate = self._rates.get(op, MIN_RATE)
        elapsed = time.perf_counter() - started
        if elapsed > BASE + rate * work and rate < MAX_RATE:
            while BASE + rate * work < elapsed and rate < MAX_RATE:
                rate *= 2
            self._rates[op] = rate
            self.epochs += 1
        _wait_until(started + BASE + rate * work)


def _wait_until(deadline: float) -> None:
    left = deadline - time.perf_counter()
    if left > _SPIN:
        time.sleep(left - _SPIN)
    while time.perf_counter() < deadline:
        pass
