"""What torchrelay declares on RabbitMQ, as the management console shows it.

- exchange `torchrelay.commands` (direct, durable): routing key = worker id;
- queue `torchrelay.worker.<id>` (durable; classic, or quorum for a cluster),
  bound with the worker's id and consumed by its one daemon (exclusively; on a
  quorum queue, a second daemon waits as a standby: single active consumer), with
  manual acks and a prefetch limit; it expires once no daemon has consumed it for
  `queue_expires` seconds, after which commands to that worker come back at once;
  a quorum queue, replicated on a cluster's nodes, dead-letters a command delivered
  more than `DELIVERY_LIMIT` times (one that kills whatever takes it cannot loop);
- queue `torchrelay.reply.<identity>.<token>`, one per endpoint, consumed
  exclusively; it outlives a dropped connection by a minute, so a reconnect
  loses no reply;
- exchange `torchrelay.events` (topic, durable): workers' announcements, and
  every worker queue bound with `presence.ask` (a command to all of them);
- exchange and queue `torchrelay.dead` (fanout, durable): where a worker queue
  dead-letters the commands its worker refused for good (one that crashed or
  wedged a worker before), for a person to inspect in the console.

Every declaration is here, so the arguments a queue is declared with are the
same wherever it is declared (RabbitMQ refuses a re-declaration that differs).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Final

import pika.exceptions as pe

from .._errors import BrokerError
from .._names import (
    COMMAND_EXCHANGE,
    DEFAULT_QUEUE_EXPIRES,
    EVENTS_EXCHANGE,
    PRESENCE_ASK,
    QUEUE_TYPES,
    worker_queue,
)
from ._consuming import consume

__all__ = [
    "DEAD_LETTERS",
    "DEFAULT_QUEUE_EXPIRES",
    "DELIVERY_LIMIT",
    "QUEUE_TYPES",
    "REPLY_QUEUE_EXPIRES_MS",
    "QueueSettings",
    "consume_worker_queue",
    "declare_command_exchange",
    "declare_reply_queue",
    "queue_consumers",
    "worker_queue_arguments",
]

REPLY_QUEUE_EXPIRES_MS: Final = 60_000
DELIVERY_LIMIT: Final = 20
"""Deliveries of one command a quorum worker queue allows (x-delivery-limit). Each
failover of a cluster node delivers what was in flight again; the executor's own
poisoned-command check refuses a command that crashed it long before this."""
DEAD_LETTERS: Final = "torchrelay.dead"


@dataclass(frozen=True, slots=True)
class QueueSettings:
    """How a worker queue is declared (the same everywhere, or RabbitMQ refuses)."""

    queue_type: str = "classic"
    expires: float | None = DEFAULT_QUEUE_EXPIRES

    def __post_init__(self) -> None:
        if self.queue_type not in QUEUE_TYPES:
            raise ValueError(f"queue_type is {' or '.join(QUEUE_TYPES)}, not "
                             f"{self.queue_type!r}")
        if self.expires is not None and self.expires <= 0:
            raise ValueError(f"queue expiry must be positive seconds, not {self.expires}")


def worker_queue_arguments(settings: QueueSettings = QueueSettings()) -> dict[str, Any]:
    arguments: dict[str, Any] = {"x-dead-letter-exchange": DEAD_LETTERS}
    if settings.expires is not None:
        arguments["x-expires"] = int(settings.expires * 1000)
    if settings.queue_type == "quorum":
        arguments["x-queue-type"] = "quorum"
        arguments["x-single-active-consumer"] = True
        arguments["x-delivery-limit"] = DELIVERY_LIMIT
    return arguments

log = logging.getLogger("torchrelay.broker")


_NOT_FOUND: Final = 404
_ADMINISTERED: Final = ("it is declared by an administrator with `torchrelay users add`, as a "
                        "participant with a user of its own may not")


def declare_command_exchange(connection: Any, channel: Any, *, administered: bool) -> None:
    """Declare the command exchange; when `administered` (the participant has a user of
    its own, with no right to declare shared things), check that it exists."""
    if not administered:
        channel.exchange_declare(COMMAND_EXCHANGE, "direct", durable=True)
        channel.exchange_declare(EVENTS_EXCHANGE, "topic", durable=True)
        return
    for exchange in (COMMAND_EXCHANGE, EVENTS_EXCHANGE):
        if not _exists(connection, lambda c, e=exchange: c.exchange_declare(e, passive=True)):
            raise BrokerError(f"there is no exchange {exchange}: {_ADMINISTERED}")


def declare_reply_queue(channel: Any, name: str) -> None:
    channel.queue_declare(name, arguments={"x-expires": REPLY_QUEUE_EXPIRES_MS})


def consume_worker_queue(
    connection: Any, channel: Any, worker_id: str, on_message: Any, *, administered: bool,
    settings: QueueSettings = QueueSettings(),
) -> None:
    """Declare and bind `worker_id`'s queue and consume it, exclusively. When
    `administered`, only check that they exist: binding needs the right to read the
    command exchange, with which a worker could bind any routing key.

    Raises `pika.exceptions.ChannelClosedByBroker` (RESOURCE_LOCKED) when another
    daemon already consumes it.
    """
    queue = worker_queue(worker_id)
    if administered:
        if not _exists(connection, lambda c: c.queue_declare(queue, passive=True)):
            raise BrokerError(f"there is no queue {queue}: {_ADMINISTERED}")
        consume(channel, queue, on_message)
        return
    _declare_dead_letters(connection, settings)
    arguments = worker_queue_arguments(settings)
    if _declares(connection, queue, arguments):
        channel.queue_declare(queue, durable=True, arguments=arguments)
    else:
        log.warning("queue %s exists with other arguments (another queue_type or expiry, or "
                    "an older torchrelay): it is used as it is; delete it to have it declared "
                    "anew with %s", queue, arguments)
        channel.queue_declare(queue, passive=True)
    channel.queue_bind(queue, COMMAND_EXCHANGE, routing_key=worker_id)
    channel.queue_bind(queue, EVENTS_EXCHANGE, routing_key=PRESENCE_ASK)
    consume(channel, queue, on_message)


def _declare_dead_letters(connection: Any, settings: QueueSettings) -> None:
    """The dead-letter exchange and queue, replicated on a cluster (quorum, as the worker
    queues are there). Best effort: a worker serves even when they cannot be declared
    (declared otherwise already, or a classic one's node down): its refused commands are
    then dropped rather than kept for inspection."""
    arguments = {"x-queue-type": "quorum"} if settings.queue_type == "quorum" else {}

    def declare(channel: Any) -> None:
        channel.exchange_declare(DEAD_LETTERS, "fanout", durable=True)
        channel.queue_declare(DEAD_LETTERS, durable=True, arguments=arguments)
        channel.queue_bind(DEAD_LETTERS, DEAD_LETTERS)

    try:
        _on_own_channel(connection, declare, refused_with=406)  # 406: exists, used as is
    except pe.ChannelClosedByBroker as e:
        log.warning("the dead-letter queue %s is unavailable (%s): commands refused for good "
                    "are dropped, not kept, until it is back", DEAD_LETTERS, e.reply_text)


def _exists(connection: Any, passive_declare: Any) -> bool:
    """Whether a passive declaration finds its object."""
    return _on_own_channel(connection, passive_declare, refused_with=_NOT_FOUND) is not None


def _on_own_channel(connection: Any, action: Any, *, refused_with: int) -> Any:
    """`action(channel)` on a channel of its own, since RabbitMQ refuses by closing the
    channel: its result, or None if refused with `refused_with` (others are raised)."""
    channel = connection.channel()
    try:
        result = action(channel)
    except pe.ChannelClosedByBroker as e:
        if e.reply_code != refused_with:
            raise
        return None
    channel.close()
    return result if result is not None else True


def _declares(connection: Any, queue: str, arguments: dict[str, Any]) -> bool:
    """Whether `queue` can be declared with `arguments` (RabbitMQ refuses to re-declare an
    existing queue with other ones: PRECONDITION_FAILED)."""
    return _on_own_channel(connection, lambda c: c.queue_declare(
        queue, durable=True, arguments=arguments), refused_with=406) is not None


def queue_consumers(connection: Any, queue: str) -> int | None:
    """How many consumers `queue` has; None when there is no such queue."""
    ok = _on_own_channel(connection, lambda c: c.queue_declare(queue, passive=True),
                         refused_with=_NOT_FOUND)
    return None if ok is None else int(ok.method.consumer_count)
