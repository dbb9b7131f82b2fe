"""What torchrelay declares on RabbitMQ, as the management console shows it.

- exchange `torchrelay.commands` (direct, durable): routing key = worker id;
- queue `torchrelay.worker.<id>` (durable), bound with the worker's id and
  consumed exclusively by its one daemon, with manual acks and a prefetch limit;
- queue `torchrelay.reply.<identity>.<token>`, one per endpoint, consumed
  exclusively; it outlives a dropped connection by a minute, so a reconnect
  loses no reply.

Every declaration is here, so the arguments a queue is declared with are the
same wherever it is declared (RabbitMQ refuses a re-declaration that differs).
"""

from __future__ import annotations

from typing import Any, Final

import pika.exceptions as pe

from .._names import COMMAND_EXCHANGE, worker_queue

__all__ = [
    "REPLY_QUEUE_EXPIRES_MS",
    "consume_worker_queue",
    "declare_command_exchange",
    "declare_reply_queue",
    "queue_consumers",
]

REPLY_QUEUE_EXPIRES_MS: Final = 60_000


def declare_command_exchange(channel: Any) -> None:
    channel.exchange_declare(COMMAND_EXCHANGE, "direct", durable=True)


def declare_reply_queue(channel: Any, name: str) -> None:
    channel.queue_declare(name, arguments={"x-expires": REPLY_QUEUE_EXPIRES_MS})


def consume_worker_queue(channel: Any, worker_id: str, on_message: Any) -> None:
    """Declare and bind `worker_id`'s queue and consume it, exclusively.

    Raises `pika.exceptions.ChannelClosedByBroker` (RESOURCE_LOCKED) when another
    daemon already consumes it.
    """
    queue = worker_queue(worker_id)
    channel.queue_declare(queue, durable=True)
    channel.queue_bind(queue, COMMAND_EXCHANGE, routing_key=worker_id)
    channel.basic_consume(queue, on_message, exclusive=True)


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
