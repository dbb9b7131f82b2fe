"""Where one small command's time goes: a stamp at each layer it crosses, off by default.

A process traces when `start()` is called (the benchmark's client) or when its
environment has `TORCHRELAY_TRACE` naming a path (a worker daemon the benchmark
starts): its stamps are then written to `<path>.<pid>` when it exits, as JSON
lines `[stage, key, nanoseconds]`. The clock is `time.perf_counter_ns`, which is
CLOCK_MONOTONIC on Linux: one clock for every process of a machine, so the
stamps a client and a worker make of one command line up, and the broker's share
of its time is the gap between the publisher's last stamp and the consumer's
first.

Stages are named `<layer>.<what is done>`; the key is a correlation id where the
layer knows one, else "" (the benchmark groups a worker's stamps by the
`received` stamp that opens each command). Off, a stamp costs one call and a
comparison (about 60 ns); nothing is kept.
"""

from __future__ import annotations

import atexit
import json
import os
import time
from pathlib import Path
from typing import Final

__all__ = ["ENVIRONMENT", "Stamp", "stamp", "start", "stop"]

ENVIRONMENT: Final = "TORCHRELAY_TRACE"
"""The environment variable that makes a process trace (see the module docstring)."""

_LIMIT: Final = 1_000_000
"""Stamps kept at most (about 100 MB): a trace left on does not grow for ever."""

Stamp = tuple[str, str, int]



class _Tracing:
    __slots__ = ("stamps",)

    def __init__(self) -> None:
        self.stamps: list[Stamp] | None = None


_tracing = _Tracing()


def stamp(stage: str, key: str = "") -> None:
    """Note that `stage` of the command `key` is done, now (when tracing)."""
    stamps = _tracing.stamps
    if stamps is not None and len(stamps) < _LIMIT:
        stamps.append((stage, key, time.perf_counter_ns()))


def start() -> None:
    """Trace this process from now (stamps kept before are dropped)."""
    _tracing.stamps = []


def stop() -> list[Stamp]:
    """Stop tracing; the stamps made since `start`, in the order they were made."""
    stamps, _tracing.stamps = _tracing.stamps or [], None
    return stamps


def _write(path: Path) -> None:
    stamps = stop()
    with open(f"{path}.{os.getpid()}", "w", encoding="utf-8") as out:
        for item in stamps:
            out.write(json.dumps(item) + "\n")


if os.environ.get(ENVIRONMENT):  # a daemon the benchmark traces
    start()
    atexit.register(_write, Path(os.environ[ENVIRONMENT]))
