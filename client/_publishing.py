"""Publishing a session's commands: to one worker at a time, together.

Posted commands wait here, all to one worker and in order, until the script
waits for something, addresses another worker, has `MAX_QUEUED` of them, or
`QUEUE_DELAY` has passed — a background thread sees to that, so work starts on
the worker while the script computes locally. While the script publishes by itself
(it waits soon after it posts, as a loop of `x + x; sync()` does), that thread finds
nothing late and looks less and less often, down to once per `IDLE_LOOK`: each of its
looks wakes a thread the script's must then share the interpreter with, for nothing.
Then they go as one message: a command alone, or a batch. The background thread and
the script's share the endpoint safely (on RabbitMQ every pika action runs under the
link's lock) and the queue under this module's lock.

A lost connection fails everything in flight (the session's to say); a
publication that fails otherwise hands back what it could not send (`Unsent`).
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass

from torchrelay.broker import (
    BATCH,
    Command,
    ConnectionLost,
    Endpoint,
    Envelope,
    TorchRelayError,
    encode_batch,
)

__all__ = ["IDLE_LOOK", "MAX_QUEUED", "QUEUE_DELAY", "Publisher", "Queued", "Unsent"]

MAX_QUEUED = 256
"""Posted commands to one worker that wait for a ride at most; then they go."""

QUEUE_DELAY = 0.002
"""Seconds posted commands wait for more to join them, if the script does not wait first
(the background publisher looks this often while it finds commands waiting)."""

IDLE_LOOK = 0.016
"""Seconds between the background publisher's looks, at most, once it has found nothing
waiting for a while: how late a command posted after a run of prompt waits may go,
if the script does not wait for it (or post after it) first."""

Queued = tuple[Command, str, Envelope | None]
"""A command waiting to be published: itself, its correlation id, its envelope."""


@dataclass(frozen=True, slots=True)
class Unsent:
    """Commands to `worker_id` that could not be published, and why."""

    worker_id: str
    queued: list[Queued]
    error: TorchRelayError


class Publisher:
    """The commands waiting to be published, and their publication (see the module
    docstring)."""

    __slots__ = ("__weakref__", "_lock", "_lost_meanwhile", "_queued", "_since", "_to",
                 "closed", "endpoint", "on_published")

    def __init__(self, endpoint: Endpoint, *, background: str | None = None) -> None:
        """`background`: the name of a thread that publishes what waited too long (none
        for an in-process broker: its workers run only while the script waits anyway)."""
        self.endpoint = endpoint
        """What publishes (the session's: a wrapper of it, when it wraps its own)."""
        self._queued: list[Queued] = []
        self._to: str | None = None  # the worker they go to
        self._lock = threading.Lock()
        self._since = 0.0
        self._lost_meanwhile: ConnectionLost | None = None  # met by the background thread
        self.on_published: Callable[[list[Queued]], None] = _nothing
        """Told of the commands each publish sent, once it has sent them."""
        self.closed = False
        if background is not None:
            threading.Thread(target=_publish_late, args=(weakref.ref(self),), daemon=True,
                             name=background).start()

    def add(self, worker_id: str, queued: Queued) -> list[Unsent]:
        """Queue a command to `worker_id`, publishing what waits for another worker first
        (and the queue, once full). Raises `ConnectionLost`."""
        unsent: list[Unsent] = []
        with self._lock:
            if self._to != worker_id:
                unsent += self._publish()  # in order: what went to another goes first
                self._to = worker_id
            self._queued.append(queued)
            if len(self._queued) >= MAX_QUEUED:
                unsent += self._publish()
            elif len(self._queued) == 1:
                self._since = time.monotonic()
        return unsent

    def publish(self) -> list[Unsent]:
        """Publish what waits. Raises `ConnectionLost`, also for one the background
        thread met: nothing goes out after a loss as if it had not happened."""
        with self._lock:
            return self._publish()

    def replace(self, correlation_id: str, command: Command) -> bool:
        """Send `command`, with the envelope it had, in place of the command waiting under
        `correlation_id`; whether that one was still waiting (not published meanwhile)."""
        with self._lock:
            for index, (_, waiting, envelope) in enumerate(self._queued):
                if waiting == correlation_id:
                    self._queued[index] = (command, correlation_id, envelope)
                    return True
        return False

    def drop(self) -> None:
        """Forget what waits (it failed with everything in flight)."""
        with self._lock:
            self._queued.clear()
            self._lost_meanwhile = None  # (what it was about has just failed)

    def _publish(self) -> list[Unsent]:
        lost = self._lost_meanwhile
        if lost is not None:
            self._lost_meanwhile = None
            raise lost
        queued, worker_id = self._queued, self._to
        if not queued or worker_id is None:
            return []
        self._queued = []
        try:
            self._send(worker_id, queued)
        except ConnectionLost:
            raise  # everything outstanding is lost: the session fails it all
        except TorchRelayError as e:
            return [Unsent(worker_id, queued, e)]
        return []

    def publish_if_late(self) -> bool:
        """(The background thread's.) Publish what waited `QUEUE_DELAY`; a failure leaves
        it queued, for the script's thread to publish again and report. Whether anything
        was waiting."""
        if not self._queued:
            return False
        if time.monotonic() - self._since < QUEUE_DELAY:
            return True
        with self._lock:
            queued, worker_id = self._queued, self._to
            if not queued or worker_id is None or self._lost_meanwhile is not None:
                return bool(queued)
            self._queued = []
            try:
                self._send(worker_id, queued)
            except TorchRelayError as e:
                self._queued = queued + self._queued
                if isinstance(e, ConnectionLost):  # (the reconnect it made says so once)
                    self._lost_meanwhile = e
        return True

    def _send(self, worker_id: str, queued: list[Queued]) -> None:
        if len(queued) == 1:
            command, correlation_id, envelope = queued[0]
            self.endpoint.send_command(worker_id, command.name, command.encode(envelope),
                                        correlation_id)
        else:
            self.endpoint.send_command(worker_id, BATCH, encode_batch(queued),
                                        f"{queued[0][1]}+{len(queued)}")
        self.on_published(queued)


def _nothing(queued: list[Queued]) -> None:
    pass


def _publish_late(ref: weakref.ref[Publisher]) -> None:
    """The background thread: what waited `QUEUE_DELAY` unpublished goes now. It looks on
    its own clock rather than being woken for every command, so the script's thread pays
    nothing for it, every `QUEUE_DELAY` while it finds commands waiting, then, finding
    none, twice as long each time, up to `IDLE_LOOK`. It holds its publisher only while
    looking."""
    pause = QUEUE_DELAY
    while True:
        time.sleep(pause)
        publisher = ref()
        if publisher is None or publisher.closed:
            return
        pause = QUEUE_DELAY if publisher.publish_if_late() else min(2 * pause, IDLE_LOOK)
        del publisher
