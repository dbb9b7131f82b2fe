"""Fault injection, for the test suite: operations that last as long as a test says.

A test of what happens *while* a command runs (a signal, an executor killed, a
command past `command_timeout`) needs a command whose duration does not depend
on the machine's speed: a computation calibrated to "last long" on one CPU
finishes early on a faster one, and the test fails there. These operations
sleep instead.

They exist only on a worker started with `fault_injection = true` (or
`--fault-injection`), which only the test suite does. On any other worker their
names are refused like every name that is not on the allow-list: no client can
use them to hold a worker busy.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Final

__all__ = ["FAULT_OPERATIONS", "PREFIX"]

PREFIX: Final = "testing."
"""The wire names of fault-injection operations start with this."""

MAX_STALL_SECONDS: Final = 3600.0


def _stall(seconds: Any) -> None:
    """Hold the worker for `seconds` (at most an hour), doing nothing."""
    if type(seconds) not in (int, float) or not 0 <= seconds <= MAX_STALL_SECONDS:
        raise ValueError(f"testing.stall takes 0 to {MAX_STALL_SECONDS:g} seconds, "
                         f"not {seconds!r}")
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        time.sleep(min(left, 0.05))  # short naps: signals are handled between them


FAULT_OPERATIONS: Final[dict[str, Callable[..., Any]]] = {
    f"{PREFIX}stall": _stall,
}
"""Wire name -> operation, resolved only by a worker with fault injection on."""
