"""A fair share of a worker: whose command runs next, and who has had too much.

A worker runs one command at a time, and several participants share it. Left in
arrival order, one participant's queue of heavy commands keeps everyone else
waiting for all of them. So the commands a worker has received wait in one queue
per sender, each in its sender's order. The next to run is the oldest of all —
arrival order, which keeps what participants cause one another in order (a
worker's deletes before the client's listing that follows them) — unless its
sender has kept the worker busy for more than `SLACK` seconds longer than
another sender with commands waiting, over the last minute or so (busy seconds
decay with a half-life of `HALF_LIFE`): then the least busy sender's oldest
goes first. Small commands never reorder anything; a participant with a
light command waits at most for the heavy command in hand — none is
interrupted — and a heavy sender's next command waits until the others have
had their turns.

Busy time is wall time with the command in hand (what the others wait for),
not CPU time: a command that sleeps or waits on locks holds the worker as much.

Two limits keep one sender from crowding the others out of what a worker can
hold, in `[worker]`:

- `sender_max_queued` (no limit unless set): the messages (a batch is one) one
  sender may have waiting in the worker's hand; more are refused at once, naming
  the limit (never a `delete`: garbage would stay). The broker delivers a worker
  only `prefetch` messages ahead, so a sender with a backlog of more than that
  fills the window, and others' commands are not seen until it drains: on a
  worker shared with participants that might flood it, set it below `prefetch`.
  (Not by default: a worker that forwards many clients' calls down a chain sends
  another worker many messages at once, legitimately.)
- `sender_strikes` commands of one sender that ran past `command_timeout` or
  crashed the executor within `sender_penalty` seconds: its commands are then
  refused until `sender_penalty` seconds after the last, naming the limit.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Hashable
from typing import Generic, TypeVar

__all__ = ["HALF_LIFE", "FairQueue", "Strikes"]

HALF_LIFE = 30.0
"""Seconds after which a sender's busy time counts half."""

SLACK = 1.0
"""Busy seconds by which a sender may lead another before the other goes first."""

_DECAY = math.log(2) / HALF_LIFE

Job = TypeVar("Job")


class FairQueue(Generic[Job]):
    """Jobs waiting, one FIFO per sender; `pop` picks the least busy sender's oldest."""

    __slots__ = ("_busy", "_numbers", "_queues", "_size", "held")

    def __init__(self) -> None:
        self._queues: dict[str, deque[tuple[int, Job]]] = {}
        self._busy: dict[str, tuple[float, float]] = {}  # sender -> (busy seconds, as of)
        self._size = 0
        self._numbers = 0  # arrival order
        self.held: dict[str, int] = {}
        """Messages each sender has in the worker's hand (see `sender_max_queued`)."""

    def __len__(self) -> int:
        return self._size

    def push(self, sender: str, job: Job) -> None:
        queue = self._queues.get(sender)
        if queue is None:
            queue = self._queues[sender] = deque()
        self._numbers += 1
        queue.append((self._numbers, job))
        self._size += 1

    def pop(self) -> tuple[str, Job]:
        """The next job to run, and its sender (raises `IndexError` when none waits)."""
        queues = self._queues
        if len(queues) == 1:  # one sender: its order is the order (the usual case)
            (sender, queue), = queues.items()
        else:
            sender = min(queues, key=lambda s: queues[s][0][0])  # the oldest job's
            now = time.monotonic()
            least = min(queues, key=lambda s: self.busy(s, now))
            if self.busy(sender, now) - self.busy(least, now) > SLACK:
                sender = least
            queue = queues[sender]
        _, job = queue.popleft()
        if not queue:
            del queues[sender]
        self._size -= 1
        return sender, job

    def busy(self, sender: str, now: float) -> float:
        """`sender`'s busy seconds, decayed to `now`."""
        seconds, since = self._busy.get(sender, (0.0, now))
        return seconds * math.exp(-_DECAY * (now - since))

    def charge(self, sender: str, seconds: float) -> None:
        """`sender` kept the worker busy for `seconds` just now."""
        now = time.monotonic()
        self._busy[sender] = (self.busy(sender, now) + seconds, now)
        if len(self._busy) > 4096:  # forget the least busy (a new sender starts at 0)
            for quiet in sorted(self._busy, key=lambda s: self.busy(s, now))[:1024]:
                if quiet not in self._queues:
                    del self._busy[quiet]

    def has(self, sender: str) -> bool:
        """Whether `sender` has jobs waiting."""
        return sender in self._queues

    def waiting(self) -> dict[str, int]:
        """Jobs waiting, by sender."""
        return {sender: len(queue) for sender, queue in self._queues.items()}


Key = TypeVar("Key", bound=Hashable)


class Strikes:
    """Commands of each sender that overran or crashed the executor, by when (wall clock:
    they outlive executors), and the refusal they earn (see the module docstring)."""

    __slots__ = ("limit", "penalty", "when")

    def __init__(self, limit: int, penalty: float) -> None:
        self.limit = limit
        self.penalty = penalty
        self.when: dict[str, list[float]] = {}

    def add(self, sender: str, at: float) -> None:
        times = self.when.setdefault(sender, [])
        times.append(at)
        del times[:-self.limit]

    def refused_until(self, sender: str, now: float | None = None) -> float | None:
        """Until when `sender` is refused, or None."""
        times = self.when.get(sender)
        if not times or len(times) < self.limit:
            return None
        now = time.time() if now is None else now
        recent = [t for t in times if now - t < self.penalty]
        if len(recent) < self.limit:
            return None
        return recent[-1] + self.penalty
