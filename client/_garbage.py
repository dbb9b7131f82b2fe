"""Garbage: the objects of pointers that died, waiting for a ride to their worker.

A pointer that dies (`__del__`, in whatever thread the collector runs) dooms its
target. The ids wait here, by worker, and go with the next command to that
worker (`Envelope.garbage`: deleted before the command runs), or in a `Delete`
of their own before anything that shows a store (`_objects`, `sync`, `close`).
Garbage whose ride failed, or whose fate is unknown, waits for the next.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

__all__ = ["Garbage"]


class Garbage:
    """Object ids to delete, by worker (see the module docstring). Thread-safe."""

    __slots__ = ("_ids", "_lock")

    def __init__(self) -> None:
        self._ids: dict[str, list[int]] = {}
        self._lock = threading.Lock()  # pointers die in any thread

    def __bool__(self) -> bool:
        return bool(self._ids)  # (read without the lock: what is missed rides later)

    def add(self, worker_id: str, ids: Iterable[int]) -> None:
        """These objects on `worker_id` are garbage (again, if their ride failed)."""
        with self._lock:
            self._ids.setdefault(worker_id, []).extend(ids)

    def take(self, worker_id: str) -> list[int]:
        """The garbage for `worker_id`, to ride with a command to it now."""
        if worker_id not in self._ids:
            return []
        with self._lock:
            return self._ids.pop(worker_id, [])

    def take_any(self) -> tuple[str, list[int]] | None:
        """Some worker's garbage, to send in a `Delete` of its own; None when there is
        none."""
        with self._lock:
            return self._ids.popitem() if self._ids else None
