"""Choosing a broker by URL, as kombu does: one table of schemes."""

from __future__ import annotations

import difflib
import urllib.parse
from collections.abc import Callable, Sequence
from typing import Any

from ._embedded import EmbeddedBroker, WorkerStarter
from ._errors import UnknownBrokerURL
from ._names import BROKER_ENV, broker_addresses, default_url
from ._rabbitmq import RabbitMQBroker
from ._transport import Broker

__all__ = ["BROKER_ENV", "default_url", "open_broker"]



def _embedded(url: str, start_worker: WorkerStarter | None, **options: Any) -> Broker:
    return EmbeddedBroker(start_worker, name=urllib.parse.urlsplit(url).netloc)


def _rabbitmq(url: str, start_worker: WorkerStarter | None, **options: Any) -> Broker:
    return RabbitMQBroker(url, **options)


_SCHEMES: dict[str, Callable[..., Broker]] = {
    "memory": _embedded,
    "amqp": _rabbitmq,
    "amqps": _rabbitmq,
}


def open_broker(
    url: str | Sequence[str] | None = None, *, start_worker: WorkerStarter | None = None,
    **options: Any,
) -> Broker:
    """The broker for `url`: `memory://` (in-process, the default) or `amqp[s]://` —
    several of those (a list, or comma-separated) for the nodes of one RabbitMQ cluster.

    `start_worker` lets an in-process broker start workers on first use; options
    (`heartbeat`, `prefetch`, `connect_timeout`) go to RabbitMQ.
    """
    url = ",".join(broker_addresses(url)) if url else "memory://"
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    factory = _SCHEMES.get(scheme)
    if factory is None:
        close = difflib.get_close_matches(scheme, list(_SCHEMES), n=1)
        hint = f"; did you mean {close[0]}://?" if close else ""
        raise UnknownBrokerURL(
            f"unknown broker URL scheme {scheme + '://' if scheme else repr(url)}"
            f" (known: {', '.join(s + '://' for s in _SCHEMES)}){hint}"
        )
    if factory is _embedded:
        options = {}
    return factory(url, start_worker, **options)
