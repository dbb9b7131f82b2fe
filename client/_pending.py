"""The commands a session sent and has no answer to yet, in the order sent.

Beside the commands themselves it keeps what the session decides with: how many
go to each worker and how many do not settle in order (a call forwarded down a
chain of pointers), which tells whether a command may be published right behind
them (`may_overtake`); and the transfers on their way to each worker, which a
command there must wait for (`arriving`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from torchrelay.broker import Command, Transfer

__all__ = ["Outstanding", "Pending"]


@dataclass(slots=True)
class Outstanding:
    """A command sent, waiting for its answer."""

    worker_id: str
    command: Command
    number: int
    keep: bool
    """The caller will collect the value."""
    settles: bool
    """Its outcome is known on its worker before the worker starts the next command
    (it is not forwarded down a chain of pointers)."""
    garbage: list[int]
    """The deletes that ride with it (a Delete's own too): if it is lost, they ride
    again with the next command."""
    published: bool = False
    """It has gone out on a connection: a reply to it is due. (Posted and not yet
    published, it is not: a reconnect that lost the reply queue did not lose it.)"""


class Pending:
    """Outstanding commands by correlation id, in the order sent."""

    __slots__ = ("_arriving", "_entries", "_to", "_unsettled")

    def __init__(self) -> None:
        self._entries: dict[str, Outstanding] = {}
        self._to: dict[str, int] = {}  # worker id -> outstanding commands to it
        self._unsettled = 0  # outstanding commands that do not settle in order
        self._arriving: dict[str, int] = {}  # worker id -> transfers in flight towards it

    def __len__(self) -> int:
        return len(self._entries)

    def __bool__(self) -> bool:
        return bool(self._entries)

    def __iter__(self) -> Iterator[tuple[str, Outstanding]]:
        return iter(list(self._entries.items()))

    def get(self, correlation_id: str) -> Outstanding | None:
        return self._entries.get(correlation_id)

    def first(self) -> Outstanding:
        """The oldest (raises `StopIteration` when none is outstanding)."""
        return next(iter(self._entries.values()))

    def workers(self) -> set[str]:
        return {entry.worker_id for entry in self._entries.values()}

    def add(self, correlation_id: str, entry: Outstanding) -> None:
        self._entries[correlation_id] = entry
        self._to[entry.worker_id] = self._to.get(entry.worker_id, 0) + 1
        if not entry.settles:
            self._unsettled += 1
        if type(entry.command) is Transfer:
            destination = entry.command.destination
            self._arriving[destination] = self._arriving.get(destination, 0) + 1

    def forget(self, correlation_id: str) -> Outstanding | None:
        """No longer outstanding: answered, or given up on."""
        entry = self._entries.pop(correlation_id, None)
        if entry is not None:
            self._to[entry.worker_id] -= 1
            if not entry.settles:
                self._unsettled -= 1
            if type(entry.command) is Transfer:
                self._arriving[entry.command.destination] -= 1
        return entry

    def clear(self) -> None:
        self._entries.clear()
        self._to.clear()
        self._unsettled = 0
        self._arriving.clear()

    def may_overtake(self, worker_id: str) -> bool:
        """Whether a command to `worker_id` may be published behind those outstanding:
        all go to that worker and settle there in order, so it sees their effects."""
        return not self._unsettled and self._to.get(worker_id, 0) == len(self._entries)

    def arriving(self, worker_id: str) -> bool:
        """Whether a transfer towards `worker_id` is still on its way."""
        return bool(self._arriving.get(worker_id))
