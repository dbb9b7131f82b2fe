"""Workers as a client sees them: where pointers point, what a store holds."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torchrelay.broker import Describe, Status

from ._data import search

if TYPE_CHECKING:
    from ._session import Fleet

__all__ = ["ObjectDescription", "WorkerHandle"]


class ObjectDescription(str):
    """A stored object's description; its repr is the text itself, as in a notebook."""

    __slots__ = ()

    def __repr__(self) -> str:
        return str(self)


class WorkerHandle:
    """A worker as the client sees it: where pointers point and commands go."""

    __slots__ = ("fleet", "id")

    def __init__(self, fleet: Fleet, worker_id: str) -> None:
        self.fleet = fleet
        self.id = worker_id

    @property
    def _objects(self) -> dict[int, ObjectDescription]:
        """A snapshot of the worker's store: `{id: short description}`."""
        described = self.fleet.request(self.id, Describe(), show_garbage=True)
        return {int(k): ObjectDescription(v) for k, v in described.items()}

    def search(self, *tags: str) -> list[Any]:
        """The datasets this worker offers holding all of `tags` (`DatasetPointer`s)."""
        return search([self], tags)

    def status(self) -> dict[str, Any]:
        """The worker's health and counters."""
        status: dict[str, Any] = self.fleet.request(self.id, Status(), show_garbage=True)
        return status

    def __repr__(self) -> str:
        return f"<Worker {self.id} on {self.fleet.broker.url}>"
