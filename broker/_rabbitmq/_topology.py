"""What torchrelay declares on RabbitMQ, as the management console shows it.

- exchange `torchrelay.commands` (direct, durable): routing key = worker id;
- queue `torchrelay.worker.<id>` (durable), bound with the worker's id and
  consumed exclusively by its one daemon, with manual acks and a prefetch limit;
- queue `torchrelay.reply.<identity>.<token>`, one per endpoint, consumed
  exclusively; it outlives a dropped connection by a minute, so a reconnect
  loses no reply;
- exchange and queue `torchrelay.dead` (fanout, durable): where a worker queue
  dead-letters the commands its worker refused for good (one that crashed or
  wedged a worker before), for a person to inspect in the console.

Every declaration is here, so the arguments a queue is declared with are the
same wherever it is declared (RabbitMQ refuses a re-declaration that differs).
"""

from __future__ import annotations

import logging
from typing import Any, Final

import pika.exceptions as pe

from .._errors import BrokerError
from .._names import COMMAND_EXCHANGE, worker_queue

__all__ = [
    "DEAD_LETTERS",
    "REPLY_QUEUE_EXPIRES_MS",
    "WORKER_QUEUE_ARGUMENTS",
    "consume_worker_queue",
    "declare_command_exchange",
    "declare_reply_queue",
    "queue_consumers",
]

REPLY_QUEUE_EXPIRES_MS: Final = 60_000
DEAD_LETTERS: Final = "torchrelay.dead"
WORKER_QUEUE_ARGUMENTS: Final = {"x-dead-letter-exchange": DEAD_LETTERS}

log = logging.getLogger("torchrelay.broker")


_NOT_FOUND: Final = 404
_ADMINISTERED: Final = ("it is declared by an administrator with `torchrelay users add`, as a "
                        "participant with a user of its own may not")


def declare_command_exchange(connection: Any, channel: Any, *, administered: bool) -> None:
    """Declare the command exchange; when `administered` (the participant has a user of
    its own, with no right to declare shared things), check that it exists."""
    if not administered:
        channel.exchange_declare(COMMAND_EXCHANGE, "direct", durable=True)
    elif not _exists(connection, lambda c: c.exchange_declare(COMMAND_EXCHANGE, passive=True)):
        raise BrokerError(f"there is no exchange {COMMAND_EXCHANGE}: {_ADMINISTERED}")


def declare_reply_queue(channel: Any, name: str) -> None:
    channel.queue_declare(name, arguments={"x-expires": REPLY_QUEUE_EXPIRES_MS})


def consume_worker_queue(
    connection: Any, channel: Any, worker_id: str, on_message: Any, *, administered: bool
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
        channel.basic_consume(queue, on_message, exclusive=True)
        return
    channel.exchange_declare(DEAD_LETTERS, "fanout", durable=True)
    channel.queue_declare(DEAD_LETTERS, durable=True)
    channel.queue_bind(DEAD_LETTERS, DEAD_LETTERS)
    if _declares(connection, queue, WORKER_QUEUE_ARGUMENTS):
        channel.queue_declare(queue, durable=True, arguments=WORKER_QUEUE_ARGUMENTS)
    else:
        log.warning("queue %s exists with other arguments (declared by an older torchrelay?): "
                    "it is used as it is, without dead-lettering; delete it to have it "
                    "declared anew", queue)
        channel.queue_declare(queue, passive=True)
    channel.queue_bind(queue, COMMAND_EXCHANGE, routing_key=worker_id)
    channel.basic_consume(queue, on_message, exclusive=True)


def _exists(connection: Any, passive_declare: Any) -> bool:
    """Whether a passive declaration finds its object (on a channel of its own: RabbitMQ
    answers a missing one by closing the channel)."""
    channel = connection.channel()
    try:
        passive_declare(channel)
    except pe.ChannelClosedByBroker as e:
        if e.reply_code != _NOT_FOUND:
            raise
        return False
    channel.close()
    return True


def _declares(connection: Any, queue: str, arguments: dict[str, Any]) -> bool:
    """Whether `queue` can be declared with `arguments` (RabbitMQ refuses to re-declare an
    existing queue with other ones, by closing the channel: tried on a channel of its own)."""
    channel = connection.channel()
    try:
        channel.queue_declare(queue, durable=True, arguments=arguments)
    except pe.ChannelClosedByBroker as e:
        if e.reply_code != 406:  # PRECONDITION_FAILED: other arguments
            raise
        return False
    channel.close()
    return True


def queue_consumers(connection: Any, queue: str) -> int | None:
    """How many consumers `queue` has; None when there is no such queue.

    Uses a channel of its own: RabbitMQ answers a passive declaration of a missing
    queue by closing the channel.
    """
    channel = connection.channel()
    try:
        ok = channel.queue_declare(queue, passive=True)
    except pe.ChannelClosedByBroker as e:
        if e.reply_code != 404:
            raise
        return None
    channel.close()
    return int(ok.method.consumer_count)
