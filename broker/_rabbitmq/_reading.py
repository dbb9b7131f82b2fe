"""Deliveries read straight from pika's frame buffer.

pika turns every frame it reads into an object (`decode_frame`), offers it to its
callback manager, hands it to its channel's content assembler and, once a
delivery's three frames (method, header, body) are in, calls the channel's
consumer: some sixty Python calls for one small message, the largest part of what
a client spends on a reply and a worker on taking in a command.

`read_deliveries` takes over a connection's reader for the consumers `consume`
registers: a delivery whose three frames are whole and in order in what was read
is taken in one pass, its method decoded with `struct`, its properties with pika's
own `BasicProperties.decode`, its body sliced out, and its consumer called with
what pika would have called it with. At the first frame that is anything else (any
other method, a heartbeat, a frame not yet whole, a message in several body frames,
a consumer being cancelled, a channel pika is assembling content on) the rest of
the buffer goes to pika's reader, as it was, so everything but these deliveries,
and every error, is pika's.

pika's plain transport reads its socket until `recv` raises that it would block: an
exception through three frames and a log call, after every message. Its polls are
level-triggered, so `read_deliveries` also has a read shorter than asked for end
the reading: whatever came meanwhile wakes the next poll.

`wait_for_input` waits for a connection's input without pika's blocking loop
around the poll (its event-dispatch guard, a timer for the time limit, the loop's
checks and dispatch), 13 to 16 µs a wait: one poll, and a read when the socket is
all it reports; anything else it reports, and any timer, callback, event or output
pending after it, is pika's loop's to run at once.
"""

from __future__ import annotations

import functools
import logging
import struct
from collections.abc import Callable
from typing import Any, Final

import pika.spec
from pika.adapters.select_connection import PollEvents, PollPoller
from pika.adapters.utils.io_services_utils import _AsyncPlaintextTransport as _PlainTransport

__all__ = ["Sink", "read_deliveries", "settled", "wait_for_input"]

log = logging.getLogger("torchrelay.broker")

Sink = Callable[[Any, Any, bytes], None]
"""Takes one delivery: (pika's `Basic.Deliver`, its `BasicProperties`, the body)."""

_FRAME: Final = struct.Struct(">BHI")
"""A frame's head: type, channel, payload size."""
_FRAME_HEAD: Final = 7
_FRAME_END: Final = 0xCE
_METHOD, _HEADER, _BODY = 1, 2, 3
_DELIVER: Final = struct.pack(">I", pika.spec.Basic.Deliver.INDEX)
_BASIC: Final = struct.pack(">H", pika.spec.Basic.Deliver.INDEX >> 16)
_U64: Final = struct.Struct(">Q")
_PROPERTIES_AT: Final = _FRAME_HEAD + 12
"""Where a header frame's properties start: after class, weight and body size."""

_Deliver = pika.spec.Basic.Deliver
_Properties = pika.spec.BasicProperties


def _short_string(data: bytes, at: int) -> tuple[Any, int]:
    """pika's `decode_short_string`: text when it is UTF-8, else the bytes."""
    end = at + 1 + data[at]
    try:
        return data[at + 1:end].decode(), end
    except UnicodeDecodeError:
        return data[at + 1:end], end


class _Reader:
    """Stands in for a pika connection's `_on_data_available` (see the module)."""

    __slots__ = ("_by_pika", "_impl", "sinks")

    def __init__(self, impl: Any) -> None:
        self._impl = impl
        self._by_pika: Callable[[bytes], None] = impl._on_data_available
        self.sinks: dict[tuple[int, str], Sink] = {}

    def __call__(self, data: bytes) -> None:
        impl = self._impl
        impl._frame_buffer = impl._frame_buffer + data if impl._frame_buffer else data
        # Read from pika's own buffer each time: a sink that reads the connection again
        # (none does) reads what follows, in order, as it would within pika.
        while impl._frame_buffer and self._deliver_first(impl._frame_buffer):
            pass
        if impl._frame_buffer:
            self._by_pika(b"")

    def _deliver_first(self, buffer: bytes) -> bool:
        """Hand over the delivery `buffer` starts with, if it is one to take whole (it
        is then gone from pika's buffer before its sink is called, as pika does it)."""
        impl = self._impl
        end = len(buffer)
        if end <= _FRAME_HEAD + 4:
            return False
        kind, number, size = _FRAME.unpack_from(buffer, 0)
        if kind != _METHOD or buffer[_FRAME_HEAD:_FRAME_HEAD + 4] != _DELIVER:
            return False
        header = _FRAME_HEAD + size + 1
        if header + _FRAME_HEAD > end or buffer[header - 1] != _FRAME_END:
            return False
        kind, header_number, size = _FRAME.unpack_from(buffer, header)
        body = header + _FRAME_HEAD + size + 1
        if (kind != _HEADER or header_number != number or body + _FRAME_HEAD > end
                or buffer[body - 1] != _FRAME_END
                or buffer[header + _FRAME_HEAD:header + _FRAME_HEAD + 2] != _BASIC):
            return False
        try:
            body_size = _U64.unpack_from(buffer, header + _FRAME_HEAD + 4)[0]
            kind, body_number, size = _FRAME.unpack_from(buffer, body)
            following = body + _FRAME_HEAD + size + 1
            if (kind != _BODY or body_number != number or size != body_size
                    or following > end or buffer[following - 1] != _FRAME_END):
                return False
            tag, offset = _short_string(buffer, _FRAME_HEAD + 4)
            sink = self.sinks.get((number, tag))
            channel = impl._channels.get(number)
            if sink is None or channel is None or tag not in channel._consumers:
                self.sinks.pop((number, tag), None)  # (a consumer gone: pika says so)
                return False
            if (tag in channel._cancelled
                    or channel._content_assembler._method_frame is not None):
                return False
            delivery_tag = _U64.unpack_from(buffer, offset)[0]
            redelivered = bool(buffer[offset + 8] & 1)
            exchange, offset = _short_string(buffer, offset + 9)
            routing_key, _ = _short_string(buffer, offset)
            properties = _Properties()
            properties.decode(buffer[header + _PROPERTIES_AT:body - 1])
        except Exception:  # (malformed: pika reads it again and says what is wrong)
            return False
        impl._frame_buffer = buffer[following:]
        impl.frames_received += 3
        impl.bytes_received += following
        sink(_Deliver(tag, delivery_tag, redelivered, exchange, routing_key), properties,
             buffer[body + _FRAME_HEAD:following - 1])
        return True


def _consume_until_short(transport: Any) -> None:
    """pika's `_consume` (its plain transport's read), ended by a short read too."""
    consumed = 0
    wanted = transport._MAX_RECV_BYTES
    while transport._state == transport._STATE_ACTIVE and consumed < transport._MAX_CONSUME_BYTES:
        data = transport._sigint_safe_recv(transport._sock, wanted)
        if not data:
            log.error("Socket EOF; %s", transport._sock)
            raise transport.RxEndOfFile()
        consumed += len(data)
        try:
            transport._protocol.data_received(data)
        except Exception as error:
            log.exception("protocol.data_received() failed: error=%r; %s", error,
                          transport._sock)
            raise
        if len(data) < wanted:
            return


def read_deliveries(connection: Any, channel_number: int, consumer_tag: str,
                    sink: Sink) -> bool:
    """Hand the deliveries to `consumer_tag` on `channel_number` of `connection` (a pika
    `BlockingConnection`) to `sink` as they are read (see the module); whether it could
    (the pika internals it relies on are pika 1.x's)."""
    impl: Any = getattr(connection, "_impl", None)
    reader = getattr(impl, "__dict__", {}).get("_on_data_available")
    if not isinstance(reader, _Reader):
        needed = ("_frame_buffer", "_channels", "bytes_received", "frames_received",
                  "_on_data_available")
        channel = getattr(impl, "_channels", {}).get(channel_number)
        if (impl is None or not all(hasattr(impl, name) for name in needed)
                or not isinstance(getattr(channel, "_consumers", None), dict)
                or not hasattr(channel, "_cancelled")
                or not hasattr(getattr(channel, "_content_assembler", None), "_method_frame")):
            log.debug("pika's connection is not as expected: deliveries are read by pika")
            return False
        reader = _Reader(impl)
        impl._on_data_available = reader
        transport = getattr(impl, "_transport", None)
        if isinstance(transport, _PlainTransport):  # (TLS reads in states of its own)
            transport._consume = functools.partial(_consume_until_short, transport)
    channels = impl._channels
    for number, tag in list(reader.sinks):  # (consumers gone with no delivery since)
        channel = channels.get(number)
        if channel is None or tag not in channel._consumers:
            del reader.sinks[(number, tag)]
    reader.sinks[(channel_number, consumer_tag)] = sink
    return True


def settled(connection: Any) -> bool:
    """Whether pika's loop has nothing to run on `connection` (a pika `BlockingConnection`)
    but its input: a plain transport, open, with nothing buffered to send, no event to
    dispatch, no timer or callback due."""
    impl: Any = getattr(connection, "_impl", None)
    transport: Any = getattr(impl, "_transport", None)
    if (not isinstance(transport, _PlainTransport) or transport._state != transport._STATE_ACTIVE
            or transport.get_write_buffer_size() or connection._ready_events
            or connection._channels_pending_dispatch or connection._closed_result.ready):
        return False
    due = impl.ioloop._get_remaining_interval()  # (callbacks from other threads are timers)
    return due is None or due > 0


def wait_for_input(connection: Any, time_limit: float | None) -> None:
    """`connection.process_data_events(time_limit)` (a pika `BlockingConnection`), but
    for one poll only, and without pika's loop when the connection is `settled` (see
    the module); callers wait again if they must."""
    poller: Any = getattr(getattr(getattr(connection, "_impl", None), "ioloop", None),
                          "_poller", None)
    polling: Any = getattr(poller, "_poll", None)
    if not isinstance(poller, PollPoller) or polling is None or not settled(connection):
        connection.process_data_events(time_limit=time_limit)
        return
    impl = connection._impl
    transport, due = impl._transport, impl.ioloop._get_remaining_interval()
    wait = min(t for t in (time_limit, due, poller._MAX_POLL_TIMEOUT) if t is not None)
    events = polling.poll(wait * poller.POLL_TIMEOUT_MULT)
    if events == [(transport._sock.fileno(), PollEvents.READ)]:
        transport._on_socket_readable()
    elif events:  # (anything else: pika's, as its loop would dispatch it)
        happened: dict[int, int] = {}
        for fileno, event in events:
            happened[fileno] = happened.get(fileno, 0) | event
        poller._dispatch_fd_events(happened)
    pending = connection._channels_pending_dispatch
    if all(number < 0 for number in pending):  # (what ends a wait: nothing to dispatch)
        pending.clear()
    if not settled(connection):
        connection.process_data_events(time_limit=0)  # (pika's: runs, sends, raises)
