"""The RabbitMQ server the benchmark runs on: its version, and cleaning up after us.

Worker queues are durable: a daemon that stops leaves `torchrelay.worker.<id>`
behind for ever. Every queue this run creates has the run's random suffix in its
name, so at the end we list the server's queues (management API) and delete
ours through pika, never anyone else's.
"""

from __future__ import annotations

import base64
import contextlib
import json
import urllib.parse
import urllib.request
from collections.abc import Iterable
from typing import Any

import pika
import pika.exceptions

MANAGEMENT_PORT = 15672


def management_get(amqp_url: str, path: str, timeout: float = 5.0) -> Any:
    """GET `path` from the management API on the AMQP URL's host, with its credentials."""
    parts = urllib.parse.urlsplit(amqp_url)
    user = urllib.parse.unquote(parts.username or "guest")
    password = urllib.parse.unquote(parts.password or "guest")
    url = f"http://{parts.hostname or 'localhost'}:{MANAGEMENT_PORT}{path}"
    request = urllib.request.Request(url)
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    request.add_header("Authorization", f"Basic {token}")
    with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
        return json.load(response)


def server_version(amqp_url: str) -> str:
    """RabbitMQ's version, or why it could not be read."""
    try:
        overview = management_get(amqp_url, "/api/overview")
    except Exception as e:
        return f"unknown (management API: {type(e).__name__}: {e})"
    erlang = overview.get("erlang_version")
    version = str(overview.get("rabbitmq_version", "unknown"))
    return f"{version} (Erlang {erlang})" if erlang else version


def vhost(amqp_url: str) -> str:
    path = urllib.parse.urlsplit(amqp_url).path
    return urllib.parse.unquote(path[1:]) if len(path) > 1 else "/"


def queues_named(amqp_url: str, fragment: str) -> list[str]:
    """Names of the queues in the URL's virtual host whose name contains `fragment`."""
    quoted = urllib.parse.quote(vhost(amqp_url), safe="")
    listed = management_get(amqp_url, f"/api/queues/{quoted}?columns=name")
    return sorted(q["name"] for q in listed if fragment in q["name"])


def delete_queues(amqp_url: str, names: Iterable[str]) -> list[str]:
    """Delete `names` (missing ones are fine); the names actually deleted."""
    deleted: list[str] = []
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        for name in names:
            channel = connection.channel()
            try:
                channel.queue_delete(name)
                deleted.append(name)
            except pika.exceptions.ChannelClosedByBroker:
                continue  # already gone: the channel closed itself
            channel.close()
    finally:
        connection.close()
    return deleted


def cleanup(amqp_url: str, suffix: str, known: Iterable[str]) -> list[str]:
    """Delete every queue this run left: those named with `suffix`, and `known` ones."""
    names = set(known)
    # With no management API, the known (durable) queues are what matters most.
    with contextlib.suppress(Exception):
        names.update(queues_named(amqp_url, suffix))
    return delete_queues(amqp_url, sorted(names))
