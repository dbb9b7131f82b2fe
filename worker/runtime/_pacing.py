"""Time that tells little: operations on private data end on a public schedule.

An operation can take longer on some values than on others — `cos` of infinity
is ten times slower than of a number, sorting sorted data is fast, a failing
factorisation stops early — and a client sees how long its commands take.
Measured on 512x512 arguments, a third of the allow-listed operations told one
bit per query that way, through the broker (`python -m benchmarks --only
sidechannels`).

So a worker daemon paces every operation on private data (`Pacer`), after
predictive mitigation (Askarov, Zhang and Myers, CCS 2010): its result is
released only at the time its *schedule* says, and the schedule is public — it
depends on the operation, on the size of its arguments and result (their
elements, in powers of two: a *bucket*), and on how often it grew:

- A new (operation, bucket) is first timed on *benign* arguments of the same
  shapes (zeros and halves, public ones copied): that run warms the kernels up,
  and its time, which no private value touched, sets the schedule at three times
  it.
- A run past its schedule doubles it until it covers the run, and the run is
  released at the new schedule: what a client learns is that the schedule grew.
- A schedule met `FORGIVE_AFTER` times in a row is halved, down to where it
  started: a moment of load on the machine does not slow an operation for ever,
  and the growth it can show again is at most one bit per that many runs.

So what the time of a command can tell about private values is bounded: one bit
per growth, and growths per (operation, bucket) are at most `log2(MAX / BASE)`
(30) plus one per `FORGIVE_AFTER` runs. `epochs` (in a worker's status) counts
them.
"""

from __future__ import annotations

import time
from typing import Final

__all__ = ["Pacer", "bucket"]

BASE: Final = 20e-6
"""Seconds every schedule allows at least."""
MAX: Final = 3600.0
"""A schedule does not grow past this (a command past `command_timeout` is stopped)."""
FORGIVE_AFTER: Final = 256
"""Runs within schedule after which it is halved (no lower than it started)."""
SLACK: Final = 3.0
"""A new schedule is this many times its benign run: a small operation's time varies
by more than its own length with the machine's load, caches and page faults."""
_SPIN: Final = 1e-3
"""Waits shorter than this spin rather than sleep (a sleep can overshoot by as much)."""

Key = tuple[str, int]


def bucket(elements: int) -> int:
    """The size class of an operation: its elements, in powers of two."""
    return max(elements, 1).bit_length()


class _Schedule:
    __slots__ = ("floor", "met", "seconds")

    def __init__(self, seconds: float) -> None:
        self.seconds = self.floor = max(BASE, seconds)
        self.met = 0


class Pacer:
    """The schedules of one worker's operations on private data."""

    __slots__ = ("_schedules", "epochs")

    def __init__(self) -> None:
        self._schedules: dict[Key, _Schedule] = {}
        self.epochs = 0
        """How often a schedule grew: all that the time of private operations tells."""

    def known(self, key: Key) -> bool:
        return key in self._schedules

    def calibrated(self, key: Key, benign_seconds: float, slack: float = SLACK) -> None:
        """A new schedule for `key`, `slack` times a run on benign arguments."""
        if not slack >= 1.0:
            raise ValueError(f"a schedule's slack is at least 1, not {slack!r}")
        self._schedules[key] = _Schedule(slack * benign_seconds)

    def pace(self, key: Key, started: float) -> None:
        """Return at `started` (a `time.perf_counter()`) plus `key`'s schedule, the
        schedule first grown if the run already took longer."""
        schedule = self._schedules.get(key)
        if schedule is None:
            schedule = self._schedules[key] = _Schedule(BASE)
        elapsed = time.perf_counter() - started
        seconds = schedule.seconds
        if elapsed > seconds:
            while seconds < elapsed and seconds < MAX:
                seconds *= 2
            schedule.seconds = seconds
            schedule.met = 0
            self.epochs += 1
        else:
            schedule.met += 1
            if schedule.met >= FORGIVE_AFTER and seconds > schedule.floor:
                schedule.seconds = max(schedule.floor, seconds / 2)
                schedule.met = 0
        _wait_until(started + seconds)


def _wait_until(deadline: float) -> None:
    left = deadline - time.perf_counter()
    if left > _SPIN:
        time.sleep(left - _SPIN)
    while time.perf_counter() < deadline:
        pass
