"""RabbitMQ through pika, in parts with one job each.

    _link.py        the connection: open with retries, reopen when it dies, one
                    thread at a time (the lock), a keeper thread for heartbeats,
                    a seat for each participant sharing it
    _consuming.py   deliveries into an inbox, chunks reassembled, acks in batches
    _publishing.py  message properties, mandatory routing, confirms, chunking
    _topology.py    the exchanges and queues, declared in one place
    _endpoint.py    RabbitMQBroker and RabbitMQEndpoint: the parts put together
    _management.py  the management HTTP API (queues, connections, virtual hosts)
"""

from __future__ import annotations

from ._endpoint import RabbitMQBroker, RabbitMQEndpoint, SharedConnection, redact_url
from ._management import ManagementAPI, ManagementError

__all__ = ["ManagementAPI", "ManagementError", "RabbitMQBroker", "RabbitMQEndpoint",
           "SharedConnection", "redact_url"]
