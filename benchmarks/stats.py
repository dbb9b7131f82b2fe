"""Summaries of samples, and the small formatting helpers the table needs.

The machine these run on is noisy, so every figure is a median (or a
percentile) over many samples, never a mean that one stall can drag.
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from collections.abc import Sequence

_START = time.monotonic()


def median(samples: Sequence[float]) -> float:
    return float(statistics.median(samples))


def percentile(samples: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile: the smallest sample at or above `fraction` of them."""
    ordered = sorted(samples)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


def micros(seconds: float) -> str:
    return f"{seconds * 1e6:,.0f} us"


def millis(seconds: float) -> str:
    return f"{seconds * 1e3:,.1f} ms"


def mib(nbytes: float) -> str:
    return f"{nbytes / (1 << 20):,.0f} MiB"


def gib(nbytes: float) -> str:
    return f"{nbytes / (1 << 30):.2f} GiB"


def memory(nbytes: float) -> str:
    """Memory in MiB, or GiB from 1 GiB on."""
    return gib(nbytes) if nbytes >= 1 << 30 else mib(nbytes)


def byte_count(nbytes: float) -> str:
    """Bytes in the largest unit that keeps the number readable."""
    if nbytes < 10 << 10:
        return f"{nbytes:,.0f} B"
    if nbytes < 10 << 20:
        return f"{nbytes / (1 << 10):,.1f} KiB"
    return mib(nbytes)


def progress(message: str) -> None:
    """A progress line on stderr, so stdout holds only the table."""
    print(f"[bench +{time.monotonic() - _START:6.1f}s] {message}", file=sys.stderr, flush=True)
