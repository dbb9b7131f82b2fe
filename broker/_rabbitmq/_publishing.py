"""Publishing: the properties every message carries, confirms, and chunking.

Every message carries `type` (the command, or `<command>.reply`), `app_id`,
`correlation_id`, `reply_to` on commands, a `sender` header, and `user_id`: the
connection's user, which RabbitMQ checks (it refuses a message claiming another),
so a receiver knows who sent it whatever the header says. Commands are
published `mandatory`, so one that no queue can take comes back at once (as a
`RETURNED` delivery) instead of vanishing. With `confirm`, a publish returns only
once the broker has taken responsibility for the message.

Messages over the chunk size travel in chunks (`_chunks.py`), each with a
`chunk` header `[index, count, total bytes]`. The methods here are called under
the link's lock, with the `Channels` it hands out.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any, Final

import pika

from .._chunks import split_frame
from .._codec import Frame
from .._names import APP_ID, COMMAND_EXCHANGE, EVENTS_EXCHANGE
from ._coalescing import publish_later, publish_now
from ._framing import short_string
from ._link import Channels

__all__ = ["Publisher", "SmallMessageProperties"]

# Transient even for transfers between workers: their safety comes from the
# destination's confirmation (the source keeps its copy until then), and a
# persistent 1 GiB message would be written to the broker's disk for nothing.
_TRANSIENT: Final = 1
_SET_APART_BYTES: Final = 1 << 20
"""A dead-lettered message keeps its body up to this size (its size is always said)."""


class SmallMessageProperties(pika.BasicProperties):  # type: ignore[misc]
    """A publisher's properties for messages in one piece: its own (headers, user id,
    app id, transient) encoded once, the rest (`type`, `correlation_id`, `reply_to`)
    set per message, and nothing else. pika encodes properties field by field in
    Python for every message, a third of a small message's publication. The bytes
    are pika's own encoding of the same fields (a test compares them)."""

    _FLAGS: Final = (pika.BasicProperties.FLAG_HEADERS
                     | pika.BasicProperties.FLAG_DELIVERY_MODE
                     | pika.BasicProperties.FLAG_CORRELATION_ID
                     | pika.BasicProperties.FLAG_TYPE | pika.BasicProperties.FLAG_USER_ID
                     | pika.BasicProperties.FLAG_APP_ID)

    def __init__(self, user: str, headers: dict[str, Any]) -> None:
        super().__init__(app_id=APP_ID, user_id=user, headers=headers,
                         delivery_mode=_TRANSIENT)
        table: list[bytes] = []
        pika.data.encode_table(table, headers)
        self._head = b"".join(table) + bytes((_TRANSIENT,))
        self._tail = short_string(user) + short_string(APP_ID)

    def encode(self) -> list[bytes]:
        if self.reply_to is None:
            flags = self._FLAGS
            reply = b""
        else:
            flags = self._FLAGS | pika.BasicProperties.FLAG_REPLY_TO
            reply = short_string(self.reply_to)
        return [struct.pack(">H", flags), self._head, short_string(self.correlation_id),
                reply, short_string(self.type), self._tail]


class Publisher:
    """Publishes frames as `identity` (over a connection of `user`), in chunks of at
    most `chunk_size` bytes."""

    def __init__(self, identity: str, user: str, chunk_size: int) -> None:
        self.chunk_size = chunk_size
        self.progress: Callable[[str, int, int], None] | None = None
        """Told how far a message of at least `progress_from` bytes has gone."""
        self.progress_from = 256 << 20
        self.bytes_sent = 0
        self._headers: dict[str, Any] = {"sender": identity}
        self._user = user
        # One properties object, refilled for every small message: pika encodes it
        # during basic_publish, and building one costs as much as the rest.
        self._properties = SmallMessageProperties(user, self._headers)

    def publish(
        self,
        channels: Channels,
        exchange: str,
        routing_key: str,
        *,
        type: str,
        frame: Frame,
        correlation_id: str,
        reply_to: str | None = None,
        confirm: bool = False,
        headers: dict[str, Any] | None = None,
        behind: bool = False,
    ) -> None:
        """Publish one message (raises pika's `UnroutableError` / `NackError` under `confirm`);
        `behind`: a small unconfirmed one is written to the connection's buffer, to go with
        its next read (`publish_later`), rather than sent at once.

        A reconnect in the middle of a chunked message makes the caller run this
        again: the whole message is sent again, from chunk 0.
        """
        mandatory = exchange == COMMAND_EXCHANGE
        channel = channels.confirming() if confirm else channels.commands
        if headers is not None:  # a message set apart: its own properties, once
            kept = frame.nbytes <= _SET_APART_BYTES
            channel.basic_publish(
                exchange, routing_key, frame.tobytes() if kept else b"",
                pika.BasicProperties(
                    type=type, app_id=APP_ID, correlation_id=correlation_id, delivery_mode=2,
                    user_id=self._user,
                    headers={**self._headers, **headers, "x-torchrelay-bytes": frame.nbytes},
                ),
            )
            return
        if self.whole(frame):
            props = self._properties
            props.type, props.correlation_id, props.reply_to = type, correlation_id, reply_to
            if confirm:  # (pika waits for the broker's word)
                channel.basic_publish(exchange, routing_key, frame.tobytes(), props,
                                      mandatory=mandatory)
            else:
                send = publish_later if behind else publish_now
                send(channel, exchange, routing_key, frame.tobytes(), props, mandatory=mandatory)
            self.bytes_sent += frame.nbytes
            return
        chunks = list(split_frame(frame, self.chunk_size))
        progress = self.progress if frame.nbytes >= self.progress_from else None
        done = 0
        for index, chunk in enumerate(chunks):
            props = pika.BasicProperties(
                type=type, app_id=APP_ID, correlation_id=correlation_id, reply_to=reply_to,
                user_id=self._user,
                headers={**self._headers, "chunk": [index, len(chunks), frame.nbytes]},
                delivery_mode=_TRANSIENT,
            )
            # pika takes only bytes: one chunk is copied at a time, never the tensor.
            data = chunk if isinstance(chunk, bytes) else bytes(chunk)
            channel.basic_publish(exchange, routing_key, data, props, mandatory=mandatory)
            self.bytes_sent += len(data)
            if progress is not None:
                done += len(data)
                progress(f"{type} to {routing_key.rsplit('.', 1)[-1]}", done, frame.nbytes)

    def whole(self, frame: Frame) -> bool:
        """Whether `frame` goes as one message (else in chunks, each published waiting on
        pika: never from inside its read)."""
        return frame.nbytes <= self.chunk_size

    def event(self, channels: Channels, routing_key: str, body: bytes) -> None:
        """Announce on the events exchange: JSON, for people and tools as much as for us."""
        channels.commands.basic_publish(EVENTS_EXCHANGE, routing_key, body, pika.BasicProperties(
            type="event", app_id=APP_ID, user_id=self._user, content_type="application/json",
            headers=self._headers, delivery_mode=_TRANSIENT,
        ))
        self.bytes_sent += len(body)
