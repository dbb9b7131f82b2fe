"""The broker interface: what a worker or a client needs from a message broker.

A `Broker` is chosen by URL (`open_broker`). Each participant — a worker, a
client, a worker acting as a client — opens one `Endpoint`: its own reply queue,
plus, for a worker, the command queue it serves. Endpoints move encoded frames
and know nothing of commands or tensors.

Addressing follows RabbitMQ: commands go to the worker's queue
(`torchrelay.worker.<id>`), replies to the requester's reply queue named in
`reply_to`, matched by `correlation_id`. A command that no worker can receive
comes back as a delivery of type `RETURNED` with the same correlation id, so the
requester fails fast instead of waiting for a reply that will never come.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ._codec import Body, Frame
from ._names import APP_ID, COMMAND_EXCHANGE, RETURNED, worker_queue

__all__ = [
    "APP_ID",
    "COMMAND_EXCHANGE",
    "RETURNED",
    "Broker",
    "Delivery",
    "Endpoint",
    "worker_queue",
]

@dataclass(slots=True)
class Delivery:
    """One received message.

    `is_reply` tells a reply (from the endpoint's reply queue) from a command
    (from the worker queue it serves). `chunked` says the message arrived in
    chunks and was reassembled here: its first chunks were acknowledged on
    arrival, so if it is not handled here it cannot come back from the broker.
    `tag` and `epoch` are the transport's handle for `ack`. `refused` is set on a
    message the transport could not take whole (a chunked one dropped half-way):
    it says why, and the body is empty; whoever handles it tells the sender.
    `returned` marks the notice a transport makes itself for a command nobody could
    receive (type `RETURNED`): only it, never a message that arrived saying so, means
    that.
    """

    is_reply: bool
    type: str
    correlation_id: str
    sender: str
    body: Body
    reply_to: str | None = None
    tag: int = 0
    redelivered: bool = False
    epoch: int = 0
    """Which connection of the endpoint received it; an ack must use the same one."""
    chunked: bool = False
    refused: str | None = None
    returned: bool = False


class Endpoint(ABC):
    """One participant's connection to the broker, used by one owner thread — with two
    exceptions, each safe by construction: on RabbitMQ every pika action runs under the
    link's one lock (`_rabbitmq/_link.Seat.run`), so a client's background publisher may
    `send_command` and the link's keeper thread may answer `answer_now` requests while
    the owner thread waits or computes; an in-process endpoint is never shared (the
    client starts no background publisher for it)."""

    identity: str
    """Who we are (a worker id, or a client name); sent with every message."""
    reply_queue: str
    """Where replies to our commands are delivered."""

    @abstractmethod
    def send_command(
        self,
        worker_id: str,
        type: str,
        frame: Frame,
        correlation_id: str,
        *,
        confirm: bool = False,
    ) -> None:
        """Publish a command to `worker_id`'s queue.

        With `confirm`, make sure the broker takes the message: where it may refuse
        one (a quorum queue, a cluster), return only once it has confirmed it,
        sending it again while refused. Unroutable, it fails the request: raised here,
        or answered as a `RETURNED` delivery.
        """

    @abstractmethod
    def send_reply(self, reply_to: str, type: str, frame: Frame, correlation_id: str) -> None:
        """Publish a reply to a requester's reply queue."""

    @abstractmethod
    def receive(self, timeout: float) -> Delivery | None:
        """The next delivery (command or reply), or None after `timeout` seconds."""

    def poll(self) -> Delivery | None:
        """A delivery that has arrived already, or None, without waiting."""
        return self.receive(0)

    def take_received(self) -> Delivery | None:
        """A delivery read from the connection already, or None, without reading it
        again (where reading has a cost of its own: a system call per look)."""
        return self.poll()

    @abstractmethod
    def ack(self, delivery: Delivery) -> None:
        """Acknowledge a command once it has been executed."""

    def flush_acks(self) -> None:  # noqa: B027 - most transports acknowledge at once
        """Acknowledge what is still batched, at the latest with the next message sent (a
        command acknowledged late comes again should this endpoint's process die)."""

    @abstractmethod
    def dead_letter(
        self, type: str, frame: Frame, correlation_id: str, sender: str, reason: str
    ) -> None:
        """Set aside a command refused for good, where a person can look at it."""

    @abstractmethod
    def ensure_worker(self, worker_id: str) -> None:
        """Raise `UnknownWorker` unless a worker consumes `worker_id`'s queue."""

    in_process = False
    """Whether the workers this endpoint reaches run in this process, and only while
    it waits (the embedded broker): then nothing is gained by publishing early."""

    progress: Callable[[str, int, int], None] | None = None
    """Told `(what, bytes done, bytes in all)` as a large message goes out or comes in
    chunk by chunk (messages of at least `progress_from` bytes); a client in a
    terminal draws a progress bar with it."""
    progress_from: int = 256 << 20

    answer_now: Callable[[Delivery], tuple[str, Frame] | None] | None = None
    """Its owner's answer to a command as it arrives, even while the owner is busy with
    another (a worker's status, from another thread): `(reply type, frame)`, or None to
    queue it as usual. Transports that cannot answer early ignore it."""

    awaiting: Callable[[], bool] = staticmethod(lambda: True)
    """Whether replies to messages already published are still awaited; its owner says
    (by default: assume so). A connection that comes back without its reply queue (a
    broker restart) is an error only then: else nothing was lost."""

    @property
    def quiescent(self) -> bool:
        """True when nothing can arrive until this endpoint sends something.

        Only an in-process broker can know this; a networked one never claims it.
        """
        return False

    def take_unreturnable(self) -> list[Delivery]:
        """Remove and return the received commands that closing would lose.

        A command delivered but not handled goes back to its queue when the
        endpoint closes, except one that arrived in chunks (`Delivery.chunked`).
        """
        return []

    def broadcast_command(self, type: str, frame: Frame, correlation_id: str) -> None:
        """Publish a command to every worker there is; each live one answers it (with
        the same correlation id). For presence: who is there."""
        raise NotImplementedError(f"{self.__class__.__name__} cannot broadcast")

    def publish_event(self, routing_key: str, body: bytes) -> None:  # noqa: B027
        """Announce something on the events exchange, for whoever listens (a worker's
        start, stop and heartbeat); nothing happens where nobody can listen."""

    def queue_consumers(self, queue: str) -> int | None:
        """How many consume `queue`; None when there is no such queue. (Asked of a broker
        between processes: an in-process one has no use for it.)"""
        raise NotImplementedError(f"{type(self).__name__} cannot inspect queues")

    def stats(self) -> dict[str, Any]:
        """Transport facts for a worker's status (connection name, reconnects...)."""
        return {}

    @abstractmethod
    def close(self) -> None:
        """Close the connection; unacknowledged commands return to their queue."""


class Broker(ABC):
    """A message broker, chosen by URL."""

    url: str
    """The URL, without credentials, for messages and logs."""
    verified_identity: str | None = None
    """The one identity its endpoints may have, which the broker vouches for in every
    message they send (a RabbitMQ user of one participant); None when endpoints name
    themselves (in-process, or an account several participants share)."""

    @abstractmethod
    def connect(self, identity: str, *, serve_worker: str | None = None) -> Endpoint:
        """Open an endpoint; with `serve_worker`, it also consumes that worker's queue."""

    def close(self) -> None:  # noqa: B027 - most brokers share nothing to release
        """Release resources shared by this broker's endpoints."""
