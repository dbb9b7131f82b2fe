"""Fewer `send`s: pika writes each frame, and each acknowledgement, with a system call
of its own.

pika buffers what a connection writes frame by frame (a message is at least three:
method, header, body) and sends the buffer a frame at a time. On loopback each
`send` runs TCP for both ends and may wake the broker to read a third of a message:
at a hundred owners those sends were a third of the aggregator's CPU and, with the
broker's reads, a good part of RabbitMQ's. `coalesce_writes` joins the small frames
waiting in a connection's buffer before they are sent; large ones (chunks of a big
message) go as they are, unjoined: copying them would cost more than it saves.
`ack_later` and `publish_later` write an acknowledgement or a message into that
buffer without sending it at once: it goes with the next message sent at once, or
the next read of the connection, whichever is first. A worker's serving loop reads
its connection after each round of commands, so a host's fifty workers send what
a round of their commands published in a few sends, not a hundred and fifty.

`publish_now` sends a message at once, but without pika's I/O loop: pika's
`basic_publish` writes the frames to the buffer, watches the socket for writability
(a system call), polls it and dispatches the event to the code that sends them, then
unwatches it (another): a poll, two `epoll_ctl`s and some forty Python calls to reach
one `send` a loopback socket would have taken at once. A small message with nothing
buffered before it goes straight to the socket; one behind something buffered is sent
with it; what the socket would not take (a large message), and a connection with
input waiting (which the loop must read first: see `publish_now`), go to pika's loop.
"""

from __future__ import annotations

import logging
import select
import socket
from collections import deque
from typing import Any

from pika.adapters.utils.io_services_utils import _AsyncPlaintextTransport as _PlainTransport

from ._framing import message_frames

__all__ = ["ack_later", "coalesce_writes", "publish_later", "publish_now", "unsent_bytes"]

log = logging.getLogger("torchrelay.broker")

JOIN_BYTES = 64 << 10
"""Frames are joined while the result stays within this."""


def coalesce_writes(connection: Any) -> bool:
    """Make `connection` (a pika `BlockingConnection`) send its waiting frames together;
    whether it could (the pika internals it relies on are pika 1.x's)."""
    transport = getattr(getattr(connection, "_impl", None), "_transport", None)
    buffers = getattr(transport, "_tx_buffers", None)
    produce = getattr(transport, "_produce", None)
    if transport is None or not isinstance(buffers, deque) or produce is None:
        log.debug("pika's transport is not as expected: frames are sent one by one")
        return False

    def produce_together() -> None:
        if len(buffers) > 1:
            _join_small(buffers)
        produce()

    transport._produce = produce_together
    return True


def _join_small(buffers: deque[bytes]) -> None:
    """Join the leading frames of `buffers` while they fit in `JOIN_BYTES`."""
    size, count = 0, 0
    for frame in buffers:
        if size + len(frame) > JOIN_BYTES:
            break
        size += len(frame)
        count += 1
    if count > 1:
        joined = b"".join(buffers.popleft() for _ in range(count))
        buffers.appendleft(joined)


def ack_later(channel: Any, tag: int, *, multiple: bool = False) -> None:
    """Acknowledge `tag` on `channel` (a pika `BlockingChannel`) with what the connection
    sends next, rather than with a send of its own."""
    impl = getattr(channel, "_impl", None)
    if impl is None:  # (not the pika 1.x it was written for: as pika does it)
        channel.basic_ack(tag, multiple=multiple)
        return
    impl.basic_ack(delivery_tag=tag, multiple=multiple)


def publish_later(channel: Any, exchange: str, routing_key: str, body: bytes, properties: Any,
                  *, mandatory: bool) -> None:
    """Publish on `channel` (a pika `BlockingChannel`, not in confirm mode) with what the
    connection sends next, rather than with a send of its own. (pika encodes the
    message here: `properties` may change once this returns.)"""
    impl = getattr(channel, "_impl", None)
    if impl is None:
        channel.basic_publish(exchange, routing_key, body, properties, mandatory=mandatory)
        return
    impl.basic_publish(exchange=exchange, routing_key=routing_key, body=body,
                       properties=properties, mandatory=mandatory)


def publish_now(channel: Any, exchange: str, routing_key: str, body: bytes, properties: Any,
                *, mandatory: bool) -> None:
    """Publish on `channel` (a pika `BlockingChannel`, not in confirm mode) and send it,
    with whatever the connection's buffer held, now: as `basic_publish` does, minus
    pika's loop when nothing waits to be read and the socket takes everything at once,
    and a small message's frames marshalled in one pass (`message_frames`).

    pika's loop reads before it returns: a connection the broker closed while we were
    away is found closed there, before the message is taken for sent (the caller then
    reconnects and publishes it again). So when anything waits to be read, the loop
    runs, as in `basic_publish`."""
    impl: Any = getattr(channel, "_impl", None)
    connection: Any = getattr(impl, "connection", None)
    transport: Any = getattr(connection, "_transport", None)
    body_max = getattr(connection, "_body_max_length", None)
    if not isinstance(transport, _PlainTransport) or body_max is None:
        # (TLS sends in states of its own, as pika does)
        channel.basic_publish(exchange, routing_key, body, properties, mandatory=mandatory)
        return
    quiet = transport._state == transport._STATE_ACTIVE and not _readable(transport._sock)
    if type(body) is not bytes or len(body) > JOIN_BYTES or not impl.is_open:
        # (pika's to frame, or to refuse)
        impl.basic_publish(exchange=exchange, routing_key=routing_key, body=body,
                           properties=properties, mandatory=mandatory)
    else:
        data = message_frames(impl.channel_number, exchange, routing_key, mandatory=mandatory,
                              properties=properties, body=body, body_max=body_max)
        connection.bytes_sent += len(data)
        connection.frames_sent += 2 + -(-len(body) // body_max)
        if quiet and not transport.get_write_buffer_size():
            # Nothing buffered before it: straight to the socket, in one send, rather
            # than into the buffer, with the socket watched for writability and then
            # unwatched, two system calls for nothing.
            _send_directly(transport, data)
        else:
            transport.write(data)
    if quiet and transport.get_write_buffer_size():
        # What pika's loop calls once the socket is writable: sends what it takes, and
        # stops watching for writability once nothing is left (else a poll would wake
        # for it); a send that fails aborts the connection, as it would in the loop.
        transport._on_socket_writable()
    if transport.get_write_buffer_size():
        channel._flush_output()  # pika's loop: reads, sends the rest, raises what broke


def _send_directly(transport: Any, data: bytes) -> None:
    """Send `data` on `transport` (an empty, active plain one); what the socket does not
    take, or a send that fails, goes to the transport's buffer after all, for pika's
    loop to send or report."""
    try:
        sent = transport._sigint_safe_send(transport._sock, data)
    except OSError:  # (would block, or broken: pika's loop sees it again and says so)
        sent = 0
    if sent < len(data):
        transport.write(data[sent:])


def _readable(sock: socket.socket) -> bool:
    """Whether `sock` has input waiting, or an error or hang-up to report (poll, not
    select: a descriptor past 1023 is out of select's range)."""
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(0))


def unsent_bytes(connection: Any) -> int:
    """How many bytes `connection` (a pika `BlockingConnection`) holds, written and not
    yet sent (0 where pika does not say: it then sends at once, see above)."""
    transport = getattr(getattr(connection, "_impl", None), "_transport", None)
    size = getattr(transport, "get_write_buffer_size", None)
    return int(size()) if size is not None else 0
