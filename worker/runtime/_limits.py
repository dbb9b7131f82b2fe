"""What one command may cost a worker: checked before an operation runs and after.

A worker serves everyone who can reach its queue, so no single command may take
more than its share. The bounds, all settable in the worker's config:

- `command_timeout`: seconds a command may run; past it, the supervisor stops it
  (the executor process running it is replaced; see `_supervisor.py`).
- `max_elements`: elements of any tensor a command may produce, views included
  (`x.expand(2**50)` is refused before anything can reduce it). Every stored
  tensor is within it, so every reduction over one is too.
- `max_bytes`: bytes of tensor memory the worker's objects may hold, all of them
  together; a store or a result past it is refused. Defaults to half the
  machine's memory.
- `max_list_elements`: elements a value built of Python objects may hold
  (`tolist` of a tensor costs about nine times its memory, and travels as such).

How each is checked is in `_checks.py`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from torchrelay.broker import TorchRelayError

__all__ = ["BudgetExceeded", "Limits", "default_max_bytes"]


def default_max_bytes() -> int:
    """Half of this machine's physical memory."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    except (ValueError, OSError):  # not a POSIX system that says
        return 8 << 30


@dataclass(frozen=True, slots=True)
class Limits:
    """A worker's bounds on what one command may cost (see the module docstring)."""

    command_timeout: float = 60.0
    max_elements: int = 1 << 28
    max_bytes: int = field(default_factory=default_max_bytes)
    max_list_elements: int = 1 << 20


class BudgetExceeded(TorchRelayError, MemoryError):
    """A command would take more of the worker than its limits allow."""
