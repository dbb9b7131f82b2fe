"""Leases: a participant that is gone gets its objects reclaimed, after a while.

A worker remembers, for each participant that sent it commands, the reply queues
it answered (a few of the latest). Every so often it asks the broker whether any
of them still has a consumer: a live session consumes its reply queue, and the
queue outlives a dropped connection only briefly. A participant with objects
here and no live reply queue for `lease` seconds (counted from when it was
first found without one) has them deleted (pointers
among them delete their targets down their chains, as garbage collection does).
A reconnect within the lease loses nothing. Other workers are never reclaimed:
they hold objects for the clients they forward for, and a worker that restarts
comes back with a new reply queue but the same command queue.

Not reclaimed yet: objects of a participant that never sent this worker a
command (they arrived by a move it asked another worker for), since there is no
reply queue to ask about; objects it reaches through a pointer on a worker it
did talk to are reclaimed down the chain with that pointer.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

__all__ = ["DEFAULT_LEASE", "DEFAULT_PRESENCE_INTERVAL", "Leases"]

log = logging.getLogger("torchrelay.worker")

DEFAULT_LEASE: Final = 600.0
"""Seconds a participant's objects outlive its last sign of life: ten minutes."""
DEFAULT_PRESENCE_INTERVAL: Final = 10.0
"""Seconds between two heartbeats of a worker on the events exchange (how others see
it is there)."""

_QUEUES_KEPT: Final = 8
_PARTICIPANTS_KEPT: Final = 100_000


@dataclass(slots=True)
class _Participant:
    queues: list[str] = field(default_factory=list)
    missed_since: float | None = None
    """When it was first found gone (a lease runs from then: never before it died)."""
    gone: bool = False
    """Its every reply queue is gone for good: nothing to ask until it comes back."""


class Leases:
    """Who is still there (see the module docstring)."""

    def __init__(self, lease: float, consumers: Callable[[str], int | None],
                 is_worker: Callable[[str], bool]) -> None:
        """`consumers(queue)`: how many consume it, None when it does not exist;
        `is_worker(identity)`: whether a worker of that id exists."""
        self.lease = lease
        self.interval = max(0.25, min(lease / 4, 30.0))
        """Seconds between two looks at who is still there."""
        self._consumers = consumers
        self._is_worker = is_worker
        self._participants: dict[str, _Participant] = {}
        self._workers: set[str] = set()
        self._next_check = 0.0

    def saw(self, identity: str, reply_to: str | None, now: float) -> None:
        """A command from `identity`, answered at `reply_to`: it is there."""
        participant = self._participants.get(identity)
        if participant is None:
            if len(self._participants) >= _PARTICIPANTS_KEPT:
                return  # (reclaimed ones are forgotten; this bounds a flood of names)
            participant = self._participants[identity] = _Participant()
        participant.missed_since = None
        participant.gone = False
        if reply_to is not None and reply_to not in participant.queues:
            participant.queues.append(reply_to)
            del participant.queues[:-_QUEUES_KEPT]

    def due(self, now: float) -> bool:
        return now >= self._next_check

    def expired(self, holders: set[str], now: float) -> list[str]:
        """Of `holders` (the identities holding objects here), those whose lease ran out;
        they are forgotten."""
        self._next_check = now + self.interval
        expired = []
        for identity in holders:
            if identity in self._workers:
                continue
            participant = self._participants.get(identity)
            if participant is None:
                continue  # never heard from here (its objects came by a move): see below
            if not participant.gone and self._alive(participant):
                participant.missed_since = None
            elif participant.missed_since is None:
                participant.missed_since = now
            elif now - participant.missed_since >= self.lease:
                if self._is_worker(identity):
                    self._workers.add(identity)
                    continue
                expired.append(identity)
                del self._participants[identity]
        return expired

    def _alive(self, participant: _Participant) -> bool:
        alive, remaining = False, []
        for queue in participant.queues:
            count = self._consumers(queue)
            if count is not None:
                remaining.append(queue)
                alive = alive or count > 0
        participant.queues = remaining
        participant.gone = not remaining
        return alive
