"""`RabbitMQBroker` and its `RabbitMQEndpoint`: the parts put together.

An endpoint is a seat on a `Link` (connection, reconnect, the lock and the keeper
thread), one `Consumer` (deliveries in, acknowledgements out) and one
`Publisher` (properties, confirms, chunks). It adds only the `Endpoint`
vocabulary on top: which queue a command goes to, and how long to wait.

A worker daemon's endpoint, or each of a host's, sits on a `SharedConnection`:
one connection that one thread reads for all of them (`wait`), then serves each
what it received. When it serves several, what they publish is written behind, to
go together with its next read (`_coalescing.py`): a host's fifty workers answer a
round of commands in a few sends. One worker's answer has nothing to go with, and
goes at once (waiting for the serving loop to come round to its read cost a small
operation 60-90 us on loopback).
"""

from __future__ import annotations

import functools
import logging
import os
import secrets
import threading
import time
import urllib.parse
from collections.abc import Callable, Collection, Sequence
from typing import Any

import pika.exceptions as pe

from .._codec import Frame
from .._errors import BrokerError, ConnectionLost, UnknownWorker
from .._names import (
    COMMAND_EXCHANGE,
    DEFAULT_CHUNK_SIZE,
    EVENTS_EXCHANGE,
    PRESENCE_ASK,
    SHARED_ACCOUNTS,
    TLS_ENV,
    broker_addresses,
    reply_queue,
    worker_queue,
)
from .._trace import stamp
from .._transport import Broker, Delivery, Endpoint
from . import _topology as topology
from ._consuming import REPLY_PREFETCH, Allocate, Consumer, consume
from ._link import Channels, Link, LinkSettings, Seat, redact_url, tls_context
from ._publishing import Publisher
from ._reading import wait_for_input

__all__ = ["RabbitMQBroker", "RabbitMQEndpoint", "SharedConnection", "redact_url"]

log = logging.getLogger("torchrelay.broker")


NACK_RETRY_SECONDS = 15.0
"""How long a confirmed message the broker refuses is sent again (a cluster electing a
queue's new leader refuses for about a second)."""

_IN_USE = (403, 405)
"""How RabbitMQ refuses a consumer of a queue another consumes exclusively
(ACCESS_REFUSED "in exclusive use", or RESOURCE_LOCKED)."""


class RabbitMQBroker(Broker):
    """A RabbitMQ server at `url` (`amqp://` or `amqps://`), or a cluster at several
    (comma-separated, or a list: tried in turn, see `broker_addresses`)."""

    def __init__(
        self,
        url: str | Sequence[str],
        *,
        heartbeat: int | None = None,
        prefetch: int = 64,
        connect_timeout: float = 15.0,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        max_message_bytes: int = 16 << 30,
        allocate: Allocate | None = None,
        shared_accounts: Collection[str] = SHARED_ACCOUNTS,
        tls_ca_file: str | None = None,
        tls_cert_file: str | None = None,
        tls_key_file: str | None = None,
        queue_type: str = "classic",
        queue_expires: float | None = topology.DEFAULT_QUEUE_EXPIRES,
        give_up: threading.Event | None = None,
    ) -> None:
        """`tls_*` (for `amqps://`): the CA that signed the broker's certificate
        (default: `$TORCHRELAY_TLS_CA_FILE`, else the system's CAs), and a client
        certificate and key to present (`$TORCHRELAY_TLS_CERT_FILE`, `..._KEY_FILE`).
        `give_up`: once set, connections stop retrying to reach the broker (a daemon
        stopping)."""
        if chunk_size < 4096:
            raise ValueError(f"chunk_size must be at least 4096 bytes, not {chunk_size}")
        self._addresses = broker_addresses(url)
        first = urllib.parse.urlsplit(self._addresses[0])
        for address in self._addresses[1:]:  # one cluster: one scheme, one user
            parts = urllib.parse.urlsplit(address)
            if (parts.scheme, parts.username) != (first.scheme, first.username):
                raise ValueError(f"the addresses of one broker share their scheme and user: "
                                 f"{redact_url(address)} is not like "
                                 f"{redact_url(self._addresses[0])}")
        url = self._addresses[0]
        self.url = ",".join(map(redact_url, self._addresses))
        self.heartbeat = heartbeat
        self.prefetch = prefetch
        self.connect_timeout = connect_timeout
        self.give_up = give_up or threading.Event()  # (never set: retry until the timeout)
        self.chunk_size = chunk_size
        self.max_message_bytes = max_message_bytes
        self.allocate = allocate
        """Where large received messages are put (a worker's executor: shared memory)."""
        self.user = urllib.parse.unquote(urllib.parse.urlsplit(url).username or "guest")
        self.shared_accounts = frozenset(shared_accounts)
        self.queues = topology.QueueSettings(queue_type, queue_expires)
        """How a worker queue served here is declared."""
        self.may_refuse = queue_type == "quorum" or len(self._addresses) > 1
        """Whether RabbitMQ may refuse a routable message: a quorum queue electing a
        leader, a cluster's node going down. Only then does a `confirm`ed publish wait
        for the broker's confirmation. A single node takes a transient message into a
        classic queue (unless a policy caps the queue: the transfer then waits for its
        reply, and fails, safely), and one it cannot route comes back (mandatory) as a
        `RETURNED` delivery. (A confirm is a round trip per transfer, 2.5 ms at 100
        owners, the worker waiting meanwhile.)"""
        self.tls = None
        tls_files = (tls_ca_file, tls_cert_file, tls_key_file)
        secure = urllib.parse.urlsplit(url).scheme == "amqps"
        if tls_files != (None, None, None) and not secure:
            raise ValueError(f"TLS settings need an amqps:// URL, not {self.url}")
        if secure:  # the environment's settings, where none are given
            ca, cert, key = (given or os.environ.get(variable) or None
                             for given, variable in zip(tls_files, TLS_ENV, strict=True))
            if (ca, cert, key) != (None, None, None):
                self.tls = tls_context(ca, cert, key)
        if self.user not in self.shared_accounts:
            self.verified_identity = self.user

    def connect(self, identity: str, *, serve_worker: str | None = None) -> RabbitMQEndpoint:
        self._check_identity(identity)
        role = "worker" if serve_worker is not None else "client"
        return RabbitMQEndpoint(self, Link(self._settings(f"torchrelay {role} {identity}")),
                                identity, serve_worker, owns_link=True)

    def share(self, name: str) -> SharedConnection:
        """One connection for the workers one thread serves, named `name` in the console
        ("torchrelay worker bob" for a daemon's one)."""
        return SharedConnection(self, Link(self._settings(name)))

    def _settings(self, connection_name: str) -> LinkSettings:
        return LinkSettings(self._addresses, connection_name, self.heartbeat,
                            self.connect_timeout, self.tls, self.give_up)

    def _check_identity(self, identity: str) -> None:
        if self.verified_identity not in (None, identity):
            raise BrokerError(
                f"{identity!r} cannot connect as RabbitMQ user {self.user!r}: a participant's "
                f"name is its user's name (connect as {self.user!r}, or with {identity!r}'s "
                "own user)")


class SharedConnection:
    """One connection serving the workers one thread serves (see the module docstring).

    Every endpoint on it keeps its own channels, queues, consumer, acknowledgements and
    sender identity, as on a connection of its own; what they share is the socket, the
    keeper thread and reconnecting (a reconnect tells each endpoint what it lost)."""

    def __init__(self, broker: RabbitMQBroker, link: Link) -> None:
        self.name = link.settings.connection_name
        self._broker = broker
        self._link = link
        self._endpoints: list[RabbitMQEndpoint] = []

    def serve(self, worker_id: str) -> RabbitMQEndpoint:
        """An endpoint serving `worker_id`'s queue on this connection."""
        self._broker._check_identity(worker_id)
        endpoint = RabbitMQEndpoint(self._broker, self._link, worker_id, worker_id,
                                    owns_link=False)
        self._endpoints.append(endpoint)
        for served in self._endpoints:  # (see the module docstring)
            served.writes_behind = len(self._endpoints) > 1
        return endpoint

    def wait(self, timeout: float) -> None:
        """Read the connection until one of its endpoints has received something, or
        `timeout` seconds have passed (0: only what is there now)."""
        if timeout <= 0:
            self._link.pump(self._look)
            return
        deadline = time.monotonic() + timeout
        while True:
            self._link.pump(self._read)
            if any(e.has_received for e in self._endpoints) or time.monotonic() >= deadline:
                return

    def _read(self, connection: Any, *, wait: bool = True) -> None:
        _read(connection, [e for e in self._endpoints if not e.closed], wait=wait)

    _look = functools.partialmethod(_read, wait=False)

    def close(self) -> None:
        """Close every endpoint on it (see `RabbitMQEndpoint.close`), then the connection."""
        for endpoint in self._endpoints:
            endpoint.close()
        self._link.close()


class RabbitMQEndpoint(Endpoint):
    """One participant's connection to RabbitMQ (see the module docstring)."""

    def __init__(
        self,
        broker: RabbitMQBroker,
        link: Link,
        identity: str,
        serve_worker: str | None,
        *,
        owns_link: bool,
    ) -> None:
        self.identity = identity
        self.connection_name = link.settings.connection_name
        self.closed = False
        # Named once: the queue outlives a dropped connection (it expires only after
        # a minute unused), so replies in flight survive a reconnect.
        self.reply_queue = reply_queue(identity, secrets.token_hex(4))
        self._broker = broker
        self._serve_worker = serve_worker
        # A user of one participant's own may not declare what all share: an
        # administrator did (`torchrelay users add`).
        self._administered = broker.verified_identity is not None
        self._consumer = Consumer(broker.max_message_bytes, broker.prefetch, broker.allocate,
                                  broker.shared_accounts)
        self._consumer.urgent = self._urgent
        self._channels: Channels | None = None
        self._next_stale_check = 0.0
        self._publisher = Publisher(identity, broker.user, broker.chunk_size)
        self.writes_behind = False
        """Whether its small commands and replies are written to go with the connection's
        next read, not sent at once (set by the `SharedConnection` serving it)."""
        self._link = link
        self._owns_link = owns_link
        try:
            self._seat: Seat = link.seat(self._on_open, self._on_keepalive)
        except BaseException:
            if owns_link:
                link.close()
            raise

    # -- set-up, under the link's lock ---------------------------------------------------

    def _on_open(self, channels: Channels, reconnecting: bool) -> None:
        survived = reconnecting and topology.queue_consumers(
            channels.connection, self.reply_queue
        ) is not None
        consumer = self._consumer
        consumer.reopened(channels.epoch)
        self._channels = channels
        commands, replies = channels.commands, channels.replies
        topology.declare_command_exchange(channels.connection, commands,
                                          administered=self._administered)
        commands.add_on_return_callback(consumer.on_return)
        replies.basic_qos(prefetch_count=REPLY_PREFETCH)
        topology.declare_reply_queue(replies, self.reply_queue)
        consume(replies, self.reply_queue, consumer.on_reply)
        if self._serve_worker is not None:
            commands.basic_qos(prefetch_count=self._broker.prefetch)
            commands.add_on_cancel_callback(consumer.on_cancel)
            self._consume_worker_queue(channels)
        if reconnecting and not survived and self.awaiting():
            raise ConnectionLost(
                f"{self.connection_name} reconnected to {self._broker.url}, but its reply queue "
                "was gone: replies to commands sent before are lost"
            )

    def _consume_worker_queue(self, channels: Channels) -> None:
        assert self._serve_worker is not None
        try:
            topology.consume_worker_queue(channels.connection, channels.commands,
                                          self._serve_worker, self._consumer.on_command,
                                          administered=self._administered,
                                          settings=self._broker.queues)
        except pe.ChannelClosedByBroker as e:
            if e.reply_code in _IN_USE:  # another daemon's exclusive consumer
                raise BrokerError(
                    f"worker {self._serve_worker!r} is already served by another daemon "
                    f"on {self._broker.url} ({e.reply_text})"
                ) from None
            raise BrokerError(f"worker {self._serve_worker!r} cannot consume its queue on "
                              f"{self._broker.url}: {e.reply_text}") from None

    def _resume_after_cancel(self, channels: Channels) -> None:
        """The broker cancelled our consumer (someone deleted the queue): declare it
        again and go on consuming, rather than stay connected and deaf."""
        self._consumer.cancelled = False
        queue = worker_queue(self._serve_worker or "")
        log.warning("%s: the broker cancelled our consumer of %s (the queue was deleted?); "
                    "declaring it again", self.connection_name, queue)
        self._consume_worker_queue(channels)
        log.warning("%s: consuming %s again", self.connection_name, queue)

    def _on_keepalive(self, channels: Channels) -> None:
        self._consumer.flush_acks(channels.commands, channels.replies, everything=True)

    # -- Endpoint --------------------------------------------------------------------

    def send_command(
        self,
        worker_id: str,
        type: str,
        frame: Frame,
        correlation_id: str,
        *,
        confirm: bool = False,
    ) -> None:
        publisher, reply_to = self._publisher, self.reply_queue
        confirm = confirm and self._broker.may_refuse
        # A confirmed message the broker refuses (nack) was not taken: on a cluster that
        # is what a quorum queue says while it elects a new leader, for a second or so.
        # Sent again until it is taken or NACK_RETRY_SECONDS have passed.
        deadline = time.monotonic() + NACK_RETRY_SECONDS
        pause = 0.05
        stamp("publish", correlation_id)
        behind = self.writes_behind and not confirm
        publish = self._publisher_run(behind)
        while True:
            try:
                publish(lambda channels: publisher.publish(
                    channels, COMMAND_EXCHANGE, worker_id, type=type, frame=frame,
                    correlation_id=correlation_id, reply_to=reply_to, confirm=confirm,
                    behind=behind,
                ))
                stamp("published", correlation_id)
                return
            except pe.UnroutableError:
                raise UnknownWorker(worker_id, f"no queue for it on {self._broker.url}") from None
            except pe.NackError:
                if time.monotonic() + pause > deadline:
                    raise BrokerError(f"RabbitMQ refused a message for worker {worker_id!r} "
                                      f"for {NACK_RETRY_SECONDS:g} s") from None
                log.info("RabbitMQ refused a message for worker %r; sending it again",
                         worker_id)
                time.sleep(pause)
                pause = min(pause * 2, 1.0)

    def send_reply(self, reply_to: str, type: str, frame: Frame, correlation_id: str) -> None:
        publisher = self._publisher
        stamp("publish", correlation_id)
        behind = self.writes_behind
        self._publisher_run(behind)(lambda channels: publisher.publish(
            channels, "", reply_to, type=type, frame=frame, correlation_id=correlation_id,
            behind=behind,
        ))
        stamp("published", correlation_id)

    def _publisher_run(self, behind: bool) -> Callable[[Callable[[Channels], None]], None]:
        """How a publication runs: one written behind (`behind`, read once with the
        publication, which it must agree with) is sent again should the connection die
        before its buffer is sent."""
        return self._seat.run_behind if behind else self._seat.run

    def _urgent(self, channel: Any, delivery: Delivery) -> bool:
        """Answer a command at once if our owner can (`answer_now`), under the lock."""
        answer = self.answer_now
        if answer is None or self._channels is None:
            return False
        sender = delivery.sender
        if any(d.sender == sender for d in self._consumer.inbox):
            return False  # what the asker sent before goes first
        answered = answer(delivery)
        if answered is None or not delivery.reply_to:
            return False
        kind, frame = answered
        if not self._publisher.whole(frame):
            return False  # (chunks wait on pika, which this runs inside): answered in turn
        # Behind: this runs inside pika's read (see `_consuming`), which sends it.
        self._publisher.publish(self._channels, "", delivery.reply_to, type=kind, frame=frame,
                                correlation_id=delivery.correlation_id, behind=True)
        return True

    def take_received(self) -> Delivery | None:
        consumer = self._consumer
        return self._seat.run(lambda channels: consumer.take())

    def poll(self) -> Delivery | None:
        def poll(channels: Channels) -> Delivery | None:
            consumer = self._consumer
            delivery = consumer.take()
            if delivery is None:
                channels.connection.process_data_events(time_limit=0)
                consumer.flush_acks(channels.commands, channels.replies, everything=False)
                delivery = consumer.take()
            return delivery

        return self._seat.run(poll)

    def receive(self, timeout: float) -> Delivery | None:
        deadline = time.monotonic() + timeout
        while True:
            delivery = self._seat.run(self._next_delivery)
            if delivery is not None:
                return delivery
            if time.monotonic() >= deadline:
                return None

    def _next_delivery(self, channels: Channels) -> Delivery | None:
        """A delivery waiting in the inbox, or pump I/O until one arrives or the next tick."""
        delivery = self._consumer.take()
        if delivery is None:
            _read(channels.connection, [self], wait=True)
            delivery = self._consumer.take()
        return delivery

    def _tend(self) -> None:
        """Under the lock, around each read of the connection: resume a consumer the
        broker cancelled, send the acknowledgements due, drop stale chunked messages."""
        consumer, channels = self._consumer, self._channels
        assert channels is not None
        if consumer.cancelled:
            self._resume_after_cancel(channels)
        consumer.flush_acks(channels.commands, channels.replies, everything=False)
        now = time.monotonic()
        if now >= self._next_stale_check:
            consumer.drop_stale()
            self._next_stale_check = now + 1.0

    @property
    def has_received(self) -> bool:
        """Whether a delivery waits to be taken (`take_received`)."""
        return bool(self._consumer.inbox)

    def ack(self, delivery: Delivery) -> None:
        """Acknowledge an executed command, in a batch with the ones before it.

        The acknowledgement goes out with the batch's last command or within
        `ACK_DELAY` seconds (at close at the latest): one frame for many commands.
        """
        consumer = self._consumer

        if not delivery.tag:
            return  # made up here (a refused chunked message): nothing to acknowledge

        def ack(channels: Channels) -> None:
            if delivery.epoch != channels.epoch:
                return  # from a connection that is gone; the broker has requeued it already
            if consumer.commands.add(delivery.tag):
                consumer.commands.flush(channels.commands)

        self._seat.run(ack)

    def flush_acks(self) -> None:
        """Acknowledge every delivery handled so far: written now, sent with the next
        message, or the next read of the connection, whichever comes first (`ack_later`)."""
        consumer = self._consumer
        self._seat.run(lambda channels: consumer.flush_acks(
            channels.commands, channels.replies, everything=True))

    def dead_letter(
        self, type: str, frame: Frame, correlation_id: str, sender: str, reason: str
    ) -> None:
        """Publish a command refused for good to `torchrelay.dead`, saying whose and why."""
        publisher = self._publisher
        headers = {"x-torchrelay-sender": sender, "x-torchrelay-reason": reason[:1000]}
        self._seat.run(lambda channels: publisher.publish(
            channels, topology.DEAD_LETTERS, "", type=type, frame=frame,
            correlation_id=correlation_id, headers=headers,
        ))

    def broadcast_command(self, type: str, frame: Frame, correlation_id: str) -> None:
        publisher = self._publisher
        self._seat.run(lambda channels: publisher.publish(
            channels, EVENTS_EXCHANGE, PRESENCE_ASK, type=type, frame=frame,
            correlation_id=correlation_id, reply_to=self.reply_queue,
        ))

    def publish_event(self, routing_key: str, body: bytes) -> None:
        publisher = self._publisher
        self._seat.run(lambda channels: publisher.event(channels, routing_key, body))

    @property
    def progress(self) -> Callable[[str, int, int], None] | None:
        return self._publisher.progress

    @progress.setter
    def progress(self, report: Callable[[str, int, int], None] | None) -> None:
        self._publisher.progress = self._consumer.progress = report

    @property
    def progress_from(self) -> int:
        return self._publisher.progress_from

    @progress_from.setter
    def progress_from(self, size: int) -> None:
        self._publisher.progress_from = self._consumer.progress_from = size

    def queue_consumers(self, queue: str) -> int | None:
        def consumers(channels: Channels) -> int | None:
            try:
                return topology.queue_consumers(channels.connection, queue)
            except pe.ChannelClosedByBroker as e:
                raise BrokerError(f"cannot inspect queue {queue}: {e.reply_text}") from None

        return self._seat.run(consumers)

    def ensure_worker(self, worker_id: str) -> None:
        queue = worker_queue(worker_id)
        count = self.queue_consumers(queue)
        if count is None:
            raise UnknownWorker(
                worker_id,
                f"there is no queue {queue} on {self._broker.url}; "
                f"start it with `torchrelay worker --id {worker_id}`",
            )
        if count == 0:
            raise UnknownWorker(
                worker_id, f"queue {queue} exists on {self._broker.url} but no daemon consumes it"
            )

    def take_unreturnable(self) -> list[Delivery]:
        return self._seat.run(lambda channels: self._consumer.take_unreturnable())

    @property
    def reconnects(self) -> int:
        return self._link.reconnects

    @property
    def bytes_sent(self) -> int:
        """Message bytes this endpoint published, over all its connections."""
        return self._publisher.bytes_sent

    @property
    def bytes_received(self) -> int:
        """Message bytes this endpoint received, over all its connections."""
        return self._consumer.bytes_received

    def stats(self) -> dict[str, Any]:
        return {"broker": self._broker.url, "connection": self.connection_name,
                "reconnects": self.reconnects, "forged": self._consumer.forged,
                "bytes_sent": self.bytes_sent, "bytes_received": self.bytes_received}

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        consumer = self._consumer
        # What ran is done: it must not come again.
        self._seat.leave(lambda channels: consumer.flush_acks(
            channels.commands, channels.replies, everything=True
        ))
        if self._owns_link:
            self._link.close()


def _read(connection: Any, endpoints: list[RabbitMQEndpoint], *, wait: bool) -> None:
    """Read `connection` for `endpoints` (under the lock), tending each before and after:
    with `wait`, until something arrives for one of them, but no longer than their
    acknowledgements may wait (a command acknowledged late comes again should the daemon
    die; the standing tick does not end a wait without events)."""
    for endpoint in endpoints:
        endpoint._tend()
    if not wait or any(e.has_received for e in endpoints):
        # A look is a wait that does not wait: pika's loop, which costs a worker more than
        # a small command's own work between two commands it holds, runs only for what
        # is not input.
        limit: float | None = 0
    else:
        due = [t for e in endpoints if (t := e._consumer.acks_due_in()) is not None]
        limit = min(due, default=None)
    wait_for_input(connection, limit)
    for endpoint in endpoints:
        endpoint._tend()

