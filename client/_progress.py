"""A progress bar for large transfers, drawn on a terminal (and nowhere else)."""

from __future__ import annotations

import sys
import time
from typing import TextIO

__all__ = ["TerminalProgress"]

_WIDTH = 30


class TerminalProgress:
    """Draws `what [#####     ] 43%  220/512 MiB  180 MiB/s` on one line of `stream`,
    redrawn at most ten times a second, and ends it when the transfer is done."""

    def __init__(self, stream: TextIO = sys.stderr) -> None:
        self.stream = stream
        self._started: dict[str, float] = {}
        self._drawn = 0.0

    def __call__(self, what: str, done: int, total: int) -> None:
        now = time.monotonic()
        started = self._started.setdefault(what, now)
        finished = done >= total
        if not finished and now - self._drawn < 0.1:
            return
        self._drawn = now
        share = done / total if total else 1.0
        bar = "#" * int(share * _WIDTH)
        rate = done / (now - started) / (1 << 20) if now > started else 0.0
        self.stream.write(f"\r{what} [{bar:<{_WIDTH}}] {share:4.0%}  {done >> 20}/{total >> 20} "
                          f"MiB  {rate:.0f} MiB/s" + ("\n" if finished else ""))
        self.stream.flush()
        if finished:
            del self._started[what]
