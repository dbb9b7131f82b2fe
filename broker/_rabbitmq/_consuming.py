"""Consuming: pika's deliveries into an inbox, acknowledged in batches.

`Consumer`'s callbacks are what pika calls; they only turn messages into
`Delivery`s (reassembling chunked ones) and queue them. Like everything that
touches pika, they run under the link's lock, and so does every other method
here: the owner thread reaches them only through `Seat.run`.

Who sent a message is its `user_id`, which RabbitMQ checks against the
publishing connection's user. On an account several participants share
(`shared_accounts`, by default `guest`: for trying things out), the `sender`
header names the participant and is taken on trust; on any other account the
header must name the user itself. A message that claims someone else, or carries
no `user_id`, is dropped unseen, counted (`forged`) and logged once per user.

Acknowledgements go out in batches: replies once queued here, every
`REPLY_ACK_BATCH` of them (`AckBatch`; one lost with a dropped connection is
delivered again, and a duplicate is ignored by whoever waits for it); commands
once executed, every `ACK_BATCH` of them or within `ACK_DELAY` seconds
(`CommandAcks`: a worker runs its senders' commands in a fair order, not the
order they came, and holds a move's until it completes; a command redelivered
after a lost acknowledgement is recognised and skipped by the worker).

`urgent`, when set, sees each command as it arrives, even while its worker is
busy with another (this runs in whichever thread pumps the connection, under
the link's lock): one it answers at once (a status request) is acknowledged
then and never queued.

The callbacks are called as pika reads each message (`consume`), inside its I/O
loop: nothing they do may wait on pika. They acknowledge, and `urgent` answers,
into the connection's buffer (`ack_later`, `publish_later`), which the read that
is running sends before it returns.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Final

from .._chunks import Reassembler
from .._codec import tensor_buffer
from .._names import RETURNED
from .._trace import stamp
from .._transport import Delivery
from ._coalescing import ack_later
from ._reading import read_deliveries

__all__ = ["ACK_BATCH", "ACK_DELAY", "REPLY_ACK_BATCH", "REPLY_PREFETCH", "AckBatch",
           "CommandAcks", "Consumer", "consume"]

log = logging.getLogger("torchrelay.broker")

Allocate = Callable[[int], Any]
"""Makes a uint8 tensor of the given size (where received messages are put)."""

OnMessage = Callable[[Any, Any, Any, bytes], None]
"""A pika consumer callback: (channel, method, properties, body)."""

_COPIED_FROM: Final = 64 << 10

REPLY_PREFETCH: Final = 1024
REPLY_ACK_BATCH: Final = 128
ACK_BATCH: Final = 16
ACK_DELAY: Final = 0.05


def consume(channel: Any, queue: str, on_message: OnMessage) -> None:
    """Consume `queue` on `channel` (a pika `BlockingChannel`), exclusively, with each
    delivery handed to `on_message` as pika reads it.

    pika's blocking channel queues each delivery as an event and dispatches it once its
    read loop is done: an object, a dispatch request and a few calls more per message.
    Handed over as read instead, the way pika's own `consume()` generator takes them,
    with the wait for a delivery ended as that generator ends it (a dispatch request
    for no channel); a delivery whose frames are whole in what pika read is taken
    without pika's frame decoding (`read_deliveries`). `on_message` must then not wait
    on pika (see the module docstring). A cancellation by the broker is dispatched as
    pika does it, to the channel's cancel callbacks, and an error `on_message` raises is
    raised from the dispatch, once the read is done, as a queued delivery's would be.
    Raises what `basic_consume` raises (pika's `ChannelClosedByBroker` when another
    consumer holds the queue)."""
    subscribe = getattr(channel, "_basic_consume_impl", None)
    connection = getattr(channel, "connection", None)
    request = getattr(connection, "_request_channel_dispatch", None)
    queue_event = getattr(channel, "_add_pending_event", None)
    if subscribe is None or request is None or queue_event is None:  # not the pika 1.x
        channel.basic_consume(queue, on_message, exclusive=True)   # this was written for
        return
    stop_waiting = -channel.channel_number

    def deliver(method: Any, properties: Any, body: bytes) -> None:
        try:
            on_message(channel, method, properties, body)
        except Exception as error:
            # Raised inside pika's read, it would abort the connection (and a message
            # that always raises would bring it down again each time it came back):
            # raised where a queued delivery's error is, once the read is done.
            queue_event(_Raise(error))
            return
        request(stop_waiting)

    def as_read(event: Any) -> None:
        body = getattr(event, "body", None)
        if body is None:  # the broker cancelled the consumer
            queue_event(event)
            return
        deliver(event.method, event.properties, body)

    tag = subscribe(queue=queue, auto_ack=False, exclusive=True, consumer_tag=None,
                    alternate_event_sink=as_read)
    read_deliveries(connection, channel.channel_number, tag, deliver)


class _Raise:
    """A pending event of pika's blocking channel that raises `error` when dispatched."""

    __slots__ = ("error",)

    def __init__(self, error: Exception) -> None:
        self.error = error

    def dispatch(self) -> None:
        raise self.error


class AckBatch:
    """Acknowledges the deliveries of one channel with one `multiple` ack per batch.

    Deliveries are acknowledged in the order they arrived, so acknowledging up to
    the last tag acknowledges exactly the ones added.
    """

    __slots__ = ("_count", "_every", "_oldest", "_tag", "_within")

    def __init__(self, every: int, within: float | None = None) -> None:
        self._every = every
        self._within = within
        self._tag = 0
        self._count = 0
        self._oldest = 0.0

    def add(self, tag: int) -> bool:
        """Count a delivery to acknowledge; whether the batch is full."""
        if not self._count:
            self._oldest = time.monotonic()
        self._tag = tag
        self._count += 1
        return self._count >= self._every

    def due(self) -> bool:
        """Whether the batch must go out now: full, or its oldest has waited long enough."""
        if not self._count:
            return False
        return self._count >= self._every or (
            self._within is not None and time.monotonic() - self._oldest >= self._within
        )

    def flush(self, channel: Any) -> None:
        """Acknowledge everything added so far."""
        if self._count:
            ack_later(channel, self._tag, multiple=True)
            self._tag = self._count = 0

    def forget(self) -> None:
        """The channel is gone: its unacknowledged deliveries were requeued."""
        self._tag = self._count = 0


class CommandAcks:
    """Acknowledges a channel's commands once handled, in whatever order: every command
    up to the oldest one still open with one `multiple` ack, those handled after it
    one by one (a multiple ack would take the open one along)."""

    __slots__ = ("_done", "_every", "_oldest", "_open", "_within")

    def __init__(self, every: int, within: float | None = None) -> None:
        self._every = every
        self._within = within
        self._open: set[int] = set()  # delivered, not handled
        self._done: list[int] = []  # handled, not acknowledged
        self._oldest = 0.0

    def delivered(self, tag: int) -> None:
        self._open.add(tag)

    def add(self, tag: int) -> bool:
        """`tag` was handled; whether the acknowledgements are due."""
        self._open.discard(tag)
        if not self._done:
            self._oldest = time.monotonic()
        self._done.append(tag)
        return len(self._done) >= self._every

    def due(self) -> bool:
        if not self._done:
            return False
        return len(self._done) >= self._every or (
            self._within is not None and time.monotonic() - self._oldest >= self._within
        )

    def due_in(self) -> float | None:
        if not self._done or self._within is None:
            return None
        return max(0.0, self._oldest + self._within - time.monotonic())

    def flush(self, channel: Any) -> None:
        done = self._done
        if not done:
            return
        if not self._open:
            ack_later(channel, max(done), multiple=True)
        else:
            oldest_open = min(self._open)
            below = [t for t in done if t < oldest_open]
            if below:
                ack_later(channel, max(below), multiple=True)
            for tag in done:
                if tag > oldest_open:
                    ack_later(channel, tag)
        self._done = []

    def forget(self) -> None:
        """The channel is gone: its unacknowledged deliveries were requeued."""
        self._open.clear()
        self._done = []


class Consumer:
    """Turns pika deliveries into `Delivery`s in an inbox (see the module docstring)."""

    def __init__(
        self, max_message_bytes: int, prefetch: int, allocate: Allocate | None = None,
        shared_accounts: frozenset[str] = frozenset(),
    ) -> None:
        self.shared_accounts = shared_accounts
        self.progress: Callable[[str, int, int], None] | None = None
        """Told how far a chunked message of at least `progress_from` bytes has come."""
        self.progress_from = 256 << 20
        self.forged = 0
        """Messages dropped because they claimed a sender their user is not."""
        self._warned: set[str] = set()
        self.inbox: deque[Delivery] = deque()
        self.reassembler = Reassembler(max_message_bytes, allocate=allocate)
        self.allocate = allocate
        self.replies = AckBatch(REPLY_ACK_BATCH)
        # Never hold back more of the prefetch window than a quarter.
        self.commands = CommandAcks(max(1, min(ACK_BATCH, prefetch // 4)), ACK_DELAY)
        self.urgent: Callable[[Any, Delivery], bool] | None = None
        """Sees each command as it arrives; true when it answered it (see the module)."""
        self.bytes_received = 0
        self.epoch = 0
        self.cancelled = False
        """The broker cancelled our consumer of the worker queue (it was deleted)."""

    # -- pika callbacks -------------------------------------------------------------

    def on_reply(self, channel: Any, method: Any, props: Any, body: bytes) -> None:
        self.replies.add(method.delivery_tag)  # (acknowledged with its batch, whatever comes)
        self._take(True, channel, method, props, body)

    def on_command(self, channel: Any, method: Any, props: Any, body: bytes) -> None:
        self._take(False, channel, method, props, body)

    def _take(self, is_reply: bool, channel: Any, method: Any, props: Any, body: bytes) -> None:
        """`_deliver`, and a message it cannot take in dropped and said (whatever a sender
        put in it, a worker must not stop, nor meet it again at each restart)."""
        try:
            self._deliver(is_reply, channel, method, props, body)
        except Exception:
            log.exception("dropped a message (%s, correlation id %.100r) that could not be "
                          "taken in", getattr(props, "type", None),
                          getattr(props, "correlation_id", None))
            if not is_reply:  # never handled, never coming back: settled now
                ack_later(channel, method.delivery_tag)

    def on_cancel(self, method_frame: Any) -> None:
        self.cancelled = True

    def on_return(self, channel: Any, method: Any, props: Any, body: bytes) -> None:
        # A command nobody could receive: answer it ourselves, at once.
        self.inbox.append(Delivery(True, RETURNED, props.correlation_id or "",
                                   method.routing_key, b"", returned=True))

    def _deliver(self, is_reply: bool, channel: Any, method: Any, props: Any, body: bytes) -> None:
        self.bytes_received += len(body)
        headers = props.headers or {}
        sender = self._sender(props.user_id, headers.get("sender"))
        if sender is None:
            if not is_reply:  # never handled, never coming back: settled now
                ack_later(channel, method.delivery_tag)
            return
        chunk = headers.get("chunk")
        if chunk is None:
            whole: Any = body
            if self.allocate is not None and len(body) > _COPIED_FROM:
                # Decoding copies a body out of pika's bytes anyway: copied into memory of
                # the endpoint's choosing instead, its tensors need no other copy.
                whole = self.allocate(len(body))
                tensor_buffer(whole)[:] = body
            delivery = Delivery(
                is_reply, props.type or "", props.correlation_id or "", sender, whole,
                None if is_reply else props.reply_to, method.delivery_tag, method.redelivered,
                self.epoch,
            )
            stamp("received", delivery.correlation_id)
            if not is_reply:
                if self.urgent is not None and self.urgent(channel, delivery):
                    ack_later(channel, method.delivery_tag)  # answered already
                    return
                self.commands.delivered(method.delivery_tag)
            self.inbox.append(delivery)
            return
        origin = (is_reply, props.type or "", None if is_reply else props.reply_to)
        whole = self._add_chunk(sender, props.correlation_id or "", chunk, body, origin)
        if self.progress is not None:
            self._tell_progress(props.type or "", sender, chunk, len(body))
        self._report_dropped()
        if whole is None:
            if not is_reply:  # acked now, or the prefetch window would stall the rest
                ack_later(channel, method.delivery_tag)
            return
        if not is_reply:
            self.commands.delivered(method.delivery_tag)
        self.inbox.append(Delivery(
            is_reply, props.type or "", props.correlation_id or "", sender, whole,
            None if is_reply else props.reply_to, method.delivery_tag, method.redelivered,
            self.epoch, chunked=True,
        ))

    def _tell_progress(self, type: str, sender: str, chunk: Any, size: int) -> None:
        try:
            index, count, total = (int(n) for n in chunk)
        except (TypeError, ValueError):
            return
        if total >= self.progress_from and self.progress is not None:
            done = total if index == count - 1 else min(total, (index + 1) * size)
            self.progress(f"{type.removesuffix('.reply')} from {sender}", done, total)

    def _sender(self, user: str | None, claimed: Any) -> str | None:
        """Who sent a message (see the module docstring); None for a forgery."""
        if isinstance(claimed, bytes):
            claimed = claimed.decode(errors="replace")
        claimed = "" if claimed is None else str(claimed)
        if user is not None:
            if user in self.shared_accounts:
                return claimed or user
            if claimed in ("", user):
                return user
        self.forged += 1
        who = "" if user is None else user
        if who not in self._warned and len(self._warned) < 1000:
            self._warned.add(who)
            log.warning("dropped a message from user %r claiming to be %r (further ones from "
                        "this user are only counted)", user, claimed[:100])
        return None

    def _add_chunk(
        self, sender: str, correlation_id: str, chunk: Any, body: bytes, origin: Any
    ) -> Any:
        try:
            index, count, total = (int(n) for n in chunk)
            return self.reassembler.add((sender, correlation_id), index, count, total, body,
                                        origin=origin)
        except Exception as e:  # hostile headers, or a size this machine cannot hold
            log.warning("dropped a chunked message %s from %r: %s", correlation_id, sender, e)
            first = isinstance(chunk, list | tuple) and bool(chunk) and chunk[0] == 0
            if first:  # refused at its first chunk: tell the sender
                self._refuse(sender, correlation_id, origin, f"refused: {e}")
            return None

    def _report_dropped(self) -> None:
        for dropped in self.reassembler.take_dropped():
            sender, correlation_id = dropped.key
            log.warning("dropped a chunked message %s from %r: %s", correlation_id, sender,
                        dropped.reason)
            self._refuse(sender, correlation_id, dropped.origin, dropped.reason)

    def _refuse(self, sender: str, correlation_id: str, origin: Any, reason: str) -> None:
        """Queue a `refused` delivery in place of a message that will never be whole."""
        is_reply, type, reply_to = origin
        self.inbox.append(Delivery(is_reply, type, correlation_id, sender, b"", reply_to,
                                   epoch=self.epoch, chunked=True, refused=reason))

    def drop_stale(self) -> None:
        """Give up on chunked messages whose sender went quiet; tell their senders."""
        self.reassembler.drop_stale()
        self._report_dropped()

    # -- the owner's side (under the lock) ---------------------------------------------

    def take(self) -> Delivery | None:
        inbox = self.inbox
        return inbox.popleft() if inbox else None

    def acks_due_in(self) -> float | None:
        """Seconds until the command acknowledgements waiting are due; None if none wait."""
        return self.commands.due_in()

    def flush_acks(self, commands_channel: Any, replies_channel: Any, *, everything: bool) -> None:
        """Send the acknowledgements that are due (with `everything`, all of them)."""
        if everything or self.commands.due():
            self.commands.flush(commands_channel)
        if everything or self.replies.due():
            self.replies.flush(replies_channel)

    def reopened(self, epoch: int) -> None:
        """A new connection: what the old one delivered but we did not handle comes again.

        Commands not yet handled are requeued by the broker, except chunked ones
        already whole here (only their last chunk would come again); replies stay.
        """
        kept = [d for d in self.inbox if d.is_reply or d.chunked]
        self.inbox.clear()
        self.inbox.extend(kept)
        self.commands.forget()
        self.replies.forget()
        self.epoch = epoch

    def take_unreturnable(self) -> list[Delivery]:
        lost = [d for d in self.inbox if not d.is_reply and d.chunked]
        for delivery in lost:
            self.inbox.remove(delivery)
        return lost
