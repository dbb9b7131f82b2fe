"""The names torchrelay gives things on a broker, and its fixed settings (no imports:
the supervisor of a worker daemon reads them without loading torch)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Final

__all__ = [
    "APP_ID",
    "BROKER_ENV",
    "COMMAND_EXCHANGE",
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_QUEUE_EXPIRES",
    "EVENTS_EXCHANGE",
    "PRESENCE_ASK",
    "QUEUE_TYPES",
    "RETURNED",
    "SHARED_ACCOUNTS",
    "TLS_ENV",
    "broker_addresses",
    "default_url",
    "is_reply_queue_of",
    "reply_queue",
    "worker_queue",
]

APP_ID: Final = "torchrelay"
"""Every message's `app_id`, and every connection's product name."""

COMMAND_EXCHANGE: Final = "torchrelay.commands"
"""The direct exchange commands go through, routed by worker id."""

EVENTS_EXCHANGE: Final = "torchrelay.events"
"""The topic exchange workers announce themselves on: `worker.<id>.started`,
`worker.<id>.heartbeat` (with their figures, every `presence_interval` seconds) and
`worker.<id>.stopped`, as JSON. Every worker queue is also bound to it with
`PRESENCE_ASK`, so one command published there reaches every live worker."""

PRESENCE_ASK: Final = "presence.ask"
"""The routing key of a command meant for every worker (a client's `workers()`)."""

QUEUE_TYPES: Final = ("classic", "quorum")
"""How a worker queue may be declared: quorum queues are replicated by a cluster."""

DEFAULT_QUEUE_EXPIRES: Final = 7 * 24 * 3600.0
"""Seconds a worker queue outlives its last consumer: a week."""

RETURNED: Final = "returned"
"""Type of the synthetic reply for a command no worker could receive."""

SHARED_ACCOUNTS: Final = ("guest",)
"""Broker accounts that several participants may share (by default RabbitMQ's own,
for trying things out): on them a message's sender is the one it claims. On any
other account, it is the account's user, as RabbitMQ validates it."""

BROKER_ENV: Final = "TORCHRELAY_BROKER"
"""Environment variable consulted when no URL is given to the command line (several
addresses of one cluster: comma-separated)."""

DEFAULT_CHUNK_SIZE: Final = 8 << 20
"""Half of RabbitMQ 4's 16 MiB limit: room for properties, and few messages per GiB."""


TLS_ENV: Final = ("TORCHRELAY_TLS_CA_FILE", "TORCHRELAY_TLS_CERT_FILE", "TORCHRELAY_TLS_KEY_FILE")
"""Environment variables giving an `amqps://` connection's CA file, client certificate
and key, where the settings give none."""


def worker_queue(worker_id: str) -> str:
    """The name of the queue a worker consumes its commands from."""
    return f"torchrelay.worker.{worker_id}"


REPLY_PREFIX: Final = "torchrelay.reply."


def reply_queue(identity: str, token: str) -> str:
    """The name of one of `identity`'s reply queues (`token`: no dots)."""
    return f"{REPLY_PREFIX}{identity}.{token}"


def is_reply_queue_of(queue: str, identity: str) -> bool:
    """Whether `queue` is one of `identity`'s reply queues: the only place a worker
    answers `identity`'s commands (`bob`'s are not `bob.x`'s: the token has no dots,
    as the broker permissions of `torchrelay users` say too)."""
    prefix_length = len(REPLY_PREFIX) + len(identity) + 1
    return (len(queue) > prefix_length and queue.startswith(REPLY_PREFIX)
            and queue[len(REPLY_PREFIX):prefix_length - 1] == identity
            and queue[prefix_length - 1] == "." and "." not in queue[prefix_length:])


def default_url() -> str | None:
    """The broker named by `$TORCHRELAY_BROKER`, if any."""
    return os.environ.get(BROKER_ENV) or None


def broker_addresses(url: str | Sequence[str]) -> tuple[str, ...]:
    """The addresses of one broker: a URL, several comma-separated, or a list of them.
    Several are the nodes of one RabbitMQ cluster, tried in turn: whoever is connected
    to one that goes away goes on through another."""
    given = [url] if isinstance(url, str) else list(url)
    addresses = tuple(part.strip() for text in given for part in text.split(",")
                      if part.strip())
    if not addresses:
        raise ValueError("no broker address given")
    return addresses
